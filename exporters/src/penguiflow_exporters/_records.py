"""Rows and their validation: what every part of the durable stores' write path shares.

This module and its siblings (:mod:`._blocks`, :mod:`._block_read`, :mod:`._folds`)
import nothing from penguiflow (only the stdlib, pydantic-core and orjson): a
writer process runs them and starts in ~0.2 s because of that (importing the core
takes ~0.7 s). Their names are private to ``penguiflow_exporters``; the public side
is :mod:`penguiflow_exporters.writer`.

Rows. A writer sees every event as a :class:`Row`: the 23 fields of the runtime's
:class:`~penguiflow.state.EventRecord`, by name, plus ``payload`` (or, in the
host's process, the plain tuple of the same values: :func:`tuple_rows`). A runtime event
has ``payload`` None (readers derive it from the runtime columns, as the runtime
would, so the flow's process never builds it); an event handed to ``save_event``
has its payload and None in the runtime columns. ``tests/exporters`` check that
:data:`COLUMNS` extends ``EventRecord._fields``.

Validation. A writer stores what a database can index and a reader can trust; an
event that fails :func:`check_row` (a trace id that is not a str, too long, or
holds NUL, control characters or lone surrogates; likewise node and flow names) is
refused alone, with the reason, and the rest of its batch is stored.

Also here, for the encoder and the reader alike: :class:`BlockError`, and the
bounded, never-raising text of any value (``_safe_text``).
"""

from __future__ import annotations

import contextlib
import io
import math
import pickle
from collections.abc import Iterable, Iterator, Mapping, Sequence
from decimal import Decimal
from itertools import chain, compress, repeat
from operator import attrgetter, is_, is_not, itemgetter
from typing import Any, Final, NamedTuple

__all__ = [
    "BLOCK_EVENTS",
    "COLUMNS",
    "BlockError",
    "EventValueError",
    "Ranges",
    "Row",
    "RowLike",
    "WriteReply",
    "check_row",
    "check_rows",
    "values_of",
    "ColumnRows",
    "event_rows",
    "row_of",
    "rows_of",
    "tuple_rows",
    "reading_events",
    "select",
]

#: Sorted, disjoint, inclusive ``(lo, hi)`` seq ranges of one flow.
Ranges = list[tuple[int, int]]


#: What a writer's transaction returns: positions skipped (stored before), positions
#: refused with their reasons, and notices ``(counter, message)`` for the processor to
#: log and count (``writer.WriteResult``'s fields).
WriteReply = tuple[list[int], list[tuple[int, str]], list[tuple[str, str]]]


#: Most events in one block: decoding one is a C call that holds the GIL ~1 us per
#: event, so 2,000 keeps it under a few ms, and a 100k-event trace is 50 rows.
BLOCK_EVENTS = 2000


#: Longest id or name a writer stores (trace ids: penguiflow.types.TRACE_ID_MAX_LEN).
MAX_TRACE_ID = 256


MAX_NAME = 1024
#: The flow id is counted in UTF-8 bytes, not characters: Postgres indexes it
#: (``flow_seqs``' primary key), and a btree entry holds at most 2,704 bytes, which
#: 1,000 CJK characters (3,000 bytes) exceeded: the server refused the event.
_BYTES_COUNTED: Final = frozenset({"flow_id"})


class Row(NamedTuple):
    """One event as a writer sees it (see the module docstring)."""

    trace_id: Any
    ts: float
    kind: str
    node_name: Any
    node_id: Any
    invocation_id: Any
    parent_invocation_ids: Any
    span_id: Any
    parent_span_id: Any
    seq: int
    attempt: int
    queued_ts: Any
    flow_name: Any
    flow_id: Any
    latency_ms: Any = None
    queue_depth_in: Any = None
    queue_depth_out: Any = None
    outgoing_edges: Any = None
    queue_maxsize: Any = None
    trace_inflight: Any = None
    trace_cancelled: Any = None
    trace_pending: Any = None
    extra: Any = None
    payload: Any = None


COLUMNS: tuple[str, ...] = Row._fields


#: What the write path takes: a Row, or the plain tuple of its values (tuple_rows).
RowLike = tuple[Any, ...]


# Positions of the columns the write path reads per row. The write path takes Rows
# or plain 24-tuples alike (see tuple_rows), so it reads rows by position.
(_TRACE_ID, _TS, _KIND, _NODE_NAME, _FLOW_NAME, _FLOW_ID, _SEQ, _ATTEMPT) = (
    COLUMNS.index(name) for name in (
        "trace_id", "ts", "kind", "node_name", "flow_name", "flow_id", "seq", "attempt"))


_RUNTIME_LEN = 23  # len(EventRecord._fields)


_NONE_RUNTIME = (None,) * 9


_new = tuple.__new__


_stored_head = attrgetter(
    "trace_id", "ts", "kind", "node_name", "node_id", "invocation_id",
    "parent_invocation_ids", "span_id", "parent_span_id", "seq", "attempt", "queued_ts",
    "flow_name", "flow_id")


def row_of(item: Any) -> Row:
    """The Row of a buffered item: an EventRecord (or any 23- or 24-tuple), or an
    object with StoredEvent's attributes."""
    if isinstance(item, tuple):
        if len(item) == _RUNTIME_LEN:
            return _new(Row, (*item, None))
        return _new(Row, item)
    return _new(Row, (*_stored_head(item), *_NONE_RUNTIME, item.payload))


def plain_rows(items: Iterable[Any]) -> list[tuple[Any, ...]]:
    """Each item as a plain tuple: an EventRecord's 23 values, a StoredEvent's row."""
    return [tuple(item) if isinstance(item, tuple) else
            (*_stored_head(item), *_NONE_RUNTIME, item.payload) for item in items]


def rows_of(items: Iterable[Any]) -> list[Row]:
    """:func:`row_of` of each item, in order."""
    return list(map(row_of, items))


def tuple_rows(items: Iterable[Any]) -> list[tuple[Any, ...]]:
    """:func:`row_of` of each item as a plain tuple (the same 24 values, in
    :data:`COLUMNS` order), for a writer running in the host's process.

    Why not Rows there: one allocation per event instead of two, and a plain tuple
    of untracked values is untracked by the host's garbage collector at its first
    young collection, where a named tuple is scanned by every later one. (Only a
    runtime event's row gets there: a StoredEvent's row holds its payload dict, and
    CPython keeps a tuple holding any container tracked, even an untracked dict:
    measured, ~13% of a 100k-event ``save_event`` ingest is the collector's middle
    and full passes over those rows.) SQLite
    ``save_event`` of one 100k-event trace (written on the store's thread): 200-213k
    -> 215-225k events/s (measured alone). The write path therefore reads rows by
    position, through named constants (``_TRACE_ID``, ...): the issue's exception
    for a named record costing more than 0.2 us; the functions that report on one
    row (:func:`check_row`, :func:`safe_row`) take either.
    """
    return [((*item, None) if len(item) == _RUNTIME_LEN else tuple(item))
            if isinstance(item, tuple) else
            (*_stored_head(item), *_NONE_RUNTIME, item.payload) for item in items]


class ColumnRows(Sequence[RowLike]):
    """Rows kept as columns: one sequence per name of :data:`COLUMNS`, ``n`` values each.

    A sequence of rows like any other (iterating, indexing and slicing give the
    same plain tuples :func:`tuple_rows` makes), for a batch of StoredEvents
    (:func:`event_rows`). The write path reads its columns directly
    (:func:`values_of`, and the encoder's transpose): no tuple per event is made.

    Why: a StoredEvent's row holds its payload dict, so the collector keeps it
    tracked; a 10k-event batch of them is promoted through the generations while
    it is written and sets off the host's full collections. Measured, one 100k-event
    trace through ``save_event``: the rows and the collections they caused were
    ~130 ms of ~590 (tuple rows and their transposes: 183 ms, columns: 53 ms).
    """

    __slots__ = ("_n", "columns")

    def __init__(self, columns: Sequence[Sequence[Any]], n: int) -> None:
        #: One sequence per name of :data:`COLUMNS`, in that order.
        self.columns = columns
        self._n = n

    @classmethod
    def of_events(cls, items: Sequence[Any], trace_ids: list[Any] | None = None
                  ) -> ColumnRows:
        """The rows of ``items``, objects with StoredEvent's attributes (no runtime
        columns: their values are None); ``trace_ids``: their trace ids, if read."""
        n = len(items)
        nones = (None,) * n
        columns: list[Sequence[Any]] = [
            trace_ids if trace_ids is not None and get is _STORED_GETTERS[0]
            else list(map(get, items)) for get in _STORED_GETTERS]
        columns += [nones] * len(_NONE_RUNTIME)
        columns.append(list(map(_payload_attr, items)))
        return cls(columns, n)

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[RowLike]:
        return zip(*self.columns, strict=True)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            start, stop, step = index.indices(self._n)
            return ColumnRows([c[index] for c in self.columns], len(range(start, stop, step)))
        if not -self._n <= index < self._n:
            raise IndexError("ColumnRows index out of range")
        return tuple(c[index] for c in self.columns)

    def take(self, positions: Sequence[int]) -> ColumnRows:
        """The rows at ``positions``, in that order, as columns."""
        if len(positions) == 1:  # itemgetter of one index gives the value, not a tuple
            (i,) = positions
            return ColumnRows([(c[i],) for c in self.columns], 1)
        pick = itemgetter(*positions)
        return ColumnRows([pick(c) for c in self.columns], len(positions))


_STORED_GETTERS = tuple(map(attrgetter, COLUMNS[:_RUNTIME_LEN - len(_NONE_RUNTIME)]))


_payload_attr = attrgetter("payload")


def event_rows(items: Sequence[Any]) -> Sequence[RowLike]:
    """The rows of a writer's batch, in the host's process: a :class:`ColumnRows` when
    every item is a StoredEvent (no tuple) and its traces are long in the batch,
    else :func:`tuple_rows`.

    Why not columns for short traces: a batch of 10-event traces is a block per
    trace, and gathering each one's columns (24 per block) cost more than the
    collections the tuples set off: raw ingest of 10-event traces, 81-92k -> 73-83k
    events/s with columns (measured); one 100k-event trace, ~165k -> ~250k.
    """
    if items and not any(map(isinstance, items, repeat(tuple))):
        trace_ids = list(map(_trace_id_attr, items))
        try:
            traces = len(set(trace_ids))
        except TypeError:  # an unhashable trace id (refused, row by row)
            traces = len(items)
        if traces * _COLUMNS_MIN_AVERAGE <= len(items):
            return ColumnRows.of_events(items, trace_ids)
    return tuple_rows(items)


#: Events per trace, on average in a batch, from which its StoredEvents go by column.
_COLUMNS_MIN_AVERAGE = 64


_trace_id_attr = attrgetter("trace_id")


def select(rows: Sequence[RowLike], positions: Sequence[int]) -> Sequence[RowLike]:
    """The rows at ``positions`` (in that order), of the same kind as ``rows``."""
    if type(rows) is ColumnRows:
        return rows.take(positions) if positions else ColumnRows([()] * len(COLUMNS), 0)
    return [rows[i] for i in positions]


def values_of(rows: Sequence[RowLike], index: int) -> Sequence[Any]:
    """Field ``index`` (a position in :data:`COLUMNS`) of each of ``rows``: a
    :class:`ColumnRows`' own column, else read row by row."""
    if type(rows) is ColumnRows:
        return rows.columns[index]
    return list(map(itemgetter(index), rows))


def loads_rows(payload: bytes) -> list[RowLike]:
    """The rows a store's parent process sent its writer process (``_writer_proc``),
    as plain 24-tuples (the write path reads rows by position: a Row each was ~10%
    of the SQLite writer process's time, measured).

    The pipe is between a store and the child it started: its bytes are trusted
    (the database never holds pickle; see the module docstring).
    """
    rows: list[RowLike] = []
    stream = io.BytesIO(payload)
    while stream.tell() < len(payload):  # one pickle per slice of the batch
        rows += [values if len(values) > _RUNTIME_LEN else (*values, None)
                 for values in pickle.load(stream)]
    return rows


def _text_problem(value: str, limit: int, encoding: str = "utf-8", *,
                  in_bytes: bool = False) -> str | None:
    """Why ``value`` cannot be stored as an id or name of at most ``limit``
    characters (``in_bytes``: bytes of UTF-8), or None."""
    if len(value) > limit:
        return f"is {len(value)} characters long (at most {limit})"
    if value.isascii():
        if value.isprintable():
            return None
        return "holds a control character (NUL, ESC, ...)"
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        return "holds a lone surrogate (not encodable as UTF-8)"
    if in_bytes and size > limit:
        return f"is {size} bytes long in UTF-8 (at most {limit})"
    if encoding != "utf-8":
        try:
            value.encode(encoding)
        except UnicodeEncodeError as exc:
            return (f"holds {value[exc.start]!r}, which the database's encoding "
                    f"({encoding}) cannot hold: create the database WITH ENCODING 'UTF8'")
    if any(ord(ch) < 32 or 0x7F <= ord(ch) < 0xA0 for ch in value):
        return "holds a control character (NUL, ESC, ...)"
    return None


def check_row(row: Row | tuple[Any, ...], encoding: str = "utf-8") -> str | None:
    """Why ``row`` (a Row or its plain tuple) cannot be stored, or None when it can.

    A trace id is None or a str of 1-256 characters with no control characters or
    lone surrogates (the rule ``PenguiFlow.emit`` applies); node and flow names and
    ids, and the kind, are None or such a str of at most 1,024 characters (the flow
    id: 1,024 bytes of UTF-8, since Postgres indexes it); ``ts``
    and ``seq`` are numbers. ``encoding`` (a Python codec) is the database's: a
    Postgres database not in UTF-8 cannot hold every character in its columns.
    """
    if type(row) is not Row:
        row = _new(Row, row)
    trace_id = row.trace_id
    if trace_id is not None:
        if not isinstance(trace_id, str):
            return f"trace_id is a {type(trace_id).__name__}, not a str"
        # A str subclass is checked (and stored: JSON and SQLite read its characters,
        # not its methods) as the plain str it holds, whichever writer runs.
        trace_id = str.__str__(trace_id)
        if not trace_id:
            return "trace_id is empty"
        problem = _text_problem(trace_id, MAX_TRACE_ID, encoding)
        if problem is not None:
            return f"trace_id {problem}"
    if type(row.kind) is not str or not row.kind:
        return "kind is not a non-empty str"
    for name in ("kind", "node_name", "node_id", "flow_name", "flow_id"):
        value = getattr(row, name)
        if value is None:
            continue
        if not isinstance(value, str):
            return f"{name} is a {type(value).__name__}, not a str"
        problem = _text_problem(str.__str__(value), MAX_NAME, encoding,
                                in_bytes=name in _BYTES_COUNTED)
        if problem is not None:
            return f"{name} {problem}"
    ts = row.ts
    if type(ts) not in (int, float) or (type(ts) is int and not -_INT8 <= ts < _INT8) \
            or not math.isfinite(ts):
        return "ts is not a finite number"
    if type(row.seq) is not int:
        return f"seq is a {type(row.seq).__name__}, not an int"
    if not -_INT8 <= row.seq < _INT8:
        return "seq does not fit in 64 bits"
    if type(row.attempt) is int and not -_INT8 <= row.attempt < _INT8:
        return "attempt does not fit in 64 bits"
    # What readers need of these (decode_block refuses a block holding anything
    # else): ids to index by, parent ids to join, a queued time to subtract.
    for name in _ID_FIELDS:
        value = getattr(row, name)
        if value is not None and not isinstance(value, str):
            return f"{name} is a {type(value).__name__}, not a str"
    parents = row.parent_invocation_ids
    if parents is not None and (not isinstance(parents, tuple | list)
                                or not all(isinstance(p, str) for p in parents)):
        return "parent_invocation_ids is not a tuple of str"
    if row.queued_ts is not None and type(row.queued_ts) not in (int, float):
        return f"queued_ts is a {type(row.queued_ts).__name__}, not a number"
    if type(row.queued_ts) is int and not -_INT8 <= row.queued_ts < _INT8:
        return "queued_ts does not fit in 64 bits"
    payload = row.payload
    if payload is None:
        # A runtime event's payload is made when it is read, from its queue columns.
        if type(row.queue_depth_in) is not int or type(row.queue_depth_out) is not int:
            return "payload is None (a StoredEvent's payload is a mapping)"
    elif not isinstance(payload, Mapping):
        return f"payload is a {type(payload).__name__}, not a mapping"
    return None


_INT8 = 1 << 63  # seqs, attempts and int timestamps are 64-bit integers in every store


_TEXT_FIELDS = ("trace_id", "kind", "node_name", "node_id", "flow_name", "flow_id")


_ID_FIELDS = ("invocation_id", "span_id", "parent_span_id")


_COLUMN_OF = {name: itemgetter(i) for i, name in enumerate(COLUMNS)}


def _column(rows: Sequence[RowLike], name: str) -> Sequence[Any]:
    """:func:`column` by name."""
    return values_of(rows, _COLUMN_INDEX[name])


_COLUMN_INDEX = {name: i for i, name in enumerate(COLUMNS)}


def check_rows(rows: Sequence[RowLike], encoding: str = "utf-8") -> list[tuple[int, str]]:
    """``(position, reason)`` of each row :func:`check_row` refuses, in order.

    Checks each distinct value of a column once (a batch holds few distinct trace
    ids, node names and kinds), so a clean batch costs a few C-level passes instead
    of a Python call per event (~2.5 us per event, measured, against ~0.2).
    """
    if not rows:
        return []
    suspect = False
    for name in _TEXT_FIELDS:
        # One column at a time (itemgetter, C-level; a ColumnRows' own): transposing
        # all 24 columns of a 10k-event batch cost ~4x more than reading the 8 here.
        values = _column(rows, name)
        try:
            distinct = set(values)
        except TypeError:  # an unhashable value: certainly not a str
            suspect = True
            break
        # check_row's rules for this column, on each distinct value (a batch of
        # 10-event traces has a thousand trace ids): None where allowed, else a
        # non-empty exact str without a text problem. Anything else: row by row.
        limit = MAX_TRACE_ID if name == "trace_id" else MAX_NAME
        in_bytes = name in _BYTES_COUNTED
        for value in distinct:
            if value is None:
                if name == "kind":
                    suspect = True
                    break
            elif type(value) is not str or not value \
                    or _text_problem(value, limit, encoding, in_bytes=in_bytes) is not None:
                suspect = True
                break
        if suspect:
            break
    if not suspect:
        ts = _column(rows, "ts")
        seq = _column(rows, "seq")
        attempt = _column(rows, "attempt")
        # Bounds first: math.isfinite raises on an int past a float's range.
        suspect = not (set(map(type, ts)) <= {float, int} and _int8(ts)
                       and all(map(math.isfinite, ts))
                       and set(map(type, seq)) == {int} and _int8(seq)
                       and set(map(type, attempt)) == {int} and _int8(attempt)
                       and _payloads_ok(rows) and _stored_ids_ok(rows))
    if not suspect:
        return []
    return [(i, problem) for i, problem in
            enumerate(map(check_row, rows, repeat(encoding))) if problem is not None]


def _int8(numbers: Sequence[Any]) -> bool:
    """Whether ``numbers`` (ints and floats) lie within a 64-bit integer's range."""
    return bool(min(numbers) >= -_INT8 and max(numbers) < _INT8)


def _payloads_ok(rows: Sequence[RowLike]) -> bool:
    """Whether every payload is a dict, or None on a runtime event (int queue columns)."""
    payloads = _column(rows, "payload")
    types = set(map(type, payloads))
    if types <= {dict}:
        return True
    if not types <= {dict, type(None)}:
        return False
    runtime = rows if len(types) == 1 else list(
        compress(rows, map(is_, payloads, repeat(None))))
    return (set(map(type, map(_COLUMN_OF["queue_depth_in"], runtime))) == {int}
            and set(map(type, map(_COLUMN_OF["queue_depth_out"], runtime))) == {int})


def _stored_ids_ok(rows: Sequence[RowLike]) -> bool:
    """Whether the ids, parent ids and queued times of the rows that are not the
    runtime's (those with a payload: StoredEvents, from any caller) are of the
    types :func:`check_row` wants; the runtime's own rows are made of those types
    and are not looked at (a clean runtime batch: one pass over its payloads)."""
    payloads = _column(rows, "payload")
    runtime = payloads.count(None)
    if runtime == len(rows):
        return True
    stored = rows if not runtime else list(
        compress(rows, map(is_not, payloads, repeat(None))))
    for name in _ID_FIELDS:
        if not set(map(type, _column(stored, name))) <= _TEXT_OR_NONE:
            return False
    queued = list(_column(stored, "queued_ts"))
    types = set(map(type, queued))
    if not types <= _NUMBER_OR_NONE or (int in types and not _int8(
            list(compress(queued, map(is_, map(type, queued), repeat(int)))))):
        return False
    parents = _column(stored, "parent_invocation_ids")
    return (set(map(type, parents)) <= {tuple, list, type(None)}
            and set(map(type, chain.from_iterable(filter(None, parents)))) <= _TEXT)


_PAYLOAD = COLUMNS.index("payload")

#: Type sets of the checks here and of the reader's (``_block_read._TYPES_OF``).
_NONE = type(None)
_TEXT: frozenset[type] = frozenset({str})
_TEXT_OR_NONE: frozenset[type] = frozenset({str, _NONE})
_NUMBER_OR_NONE: frozenset[type] = frozenset({int, float, _NONE})


class EventValueError(ValueError):
    """A value of an event raised while a writer read it (a user object's ``__eq__``,
    a Mapping whose ``items()`` fails): the event's fault, not the database's."""


@contextlib.contextmanager
def reading_events() -> Iterator[None]:
    """Around a writer's reading of event values (rows, checks, folds, blocks): an
    ``OSError`` raised there (``TimeoutError`` included) comes from a value of an
    event, not from the file or the server, and is raised as :class:`EventValueError`.

    Why: the processor retries a batch that raised ``StoreUnavailable`` (which an
    ``OSError`` becomes: the database unreachable) and then loses it whole; any other
    error splits the batch down to the one event at fault, which alone is lost.
    """
    try:
        yield
    except OSError as exc:
        raise EventValueError(f"a value of an event raised {type(exc).__name__} while it "
                              f"was read: {exc}") from exc


# -- shared by the encoder (_blocks) and the reader (_block_read) ---------------------------

class BlockError(ValueError):
    """A block is not one this package's writers wrote (corrupt, truncated, or foreign)."""


#: Payload cells (keys x events) a payload table may make whatever the size of its
#: text (values that repeat are written once, absent ones not at all): encode_block
#: writes no table of more (the payloads then go whole, as text as long as they), and
#: decode_block refuses one (100,000 empty keys for 10,000 events: 10**9 cells).
_TABLE_CELLS = 4_000_000

#: The longest text _safe_text gives (longer is cut, saying how much was cut).
_MAX_TEXT = 8192


def _safe_text(value: Any) -> str:
    """``str(value)``, bounded, and never raising (a broken __str__ gets a placeholder)."""
    try:
        text = str(value)
    except Exception:
        if isinstance(value, int):  # too many digits for str(): its digits anyway
            return _cut(_long_int_text(value))
        try:
            text = object.__repr__(value)
        except Exception:  # pragma: no cover - object.__repr__ does not fail
            text = "<unprintable>"
    if type(text) is not str:  # a str subclass whose __str__ returns one
        text = str.__str__(text)
    return _cut(text)


def _cut(text: str) -> str:
    if len(text) > _MAX_TEXT:
        text = text[:_MAX_TEXT] + f"...[cut: {len(text) - _MAX_TEXT} more characters]"
    return text


def _long_int_text(value: int) -> str:
    """The decimal digits of an int ``str()`` refuses (Decimal's conversion has no
    digit limit); past ~1.2 million digits, where even that gets slow, its hex."""
    if value.bit_length() > 4_000_000:
        return f"{value:#x}"
    return str(Decimal(value))
