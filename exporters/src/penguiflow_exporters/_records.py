"""Rows, blocks and batch folds: what the durable stores' writers share.

This module imports nothing from penguiflow (only the stdlib, pydantic-core and
orjson): a writer process runs it and starts in ~0.2 s because of that (importing
the core takes ~0.7 s). Its names are private to
``penguiflow_exporters``; the public side is :mod:`penguiflow_exporters.writer`.

Rows. A writer sees every event as a :class:`Row`: the 23 fields of the runtime's
:class:`~penguiflow.state.EventRecord`, by name, plus ``payload`` (or, in the
host's process, the plain tuple of the same values: :func:`tuple_rows`). A runtime event
has ``payload`` None (readers derive it from the runtime columns, as the runtime
would, so the flow's process never builds it); an event handed to ``save_event``
has its payload and None in the runtime columns. ``tests/exporters`` check that
:data:`COLUMNS` extends ``EventRecord._fields``.

Blocks. A batch's events are grouped by trace, and each trace's share becomes one
*block*: one database row holding up to :data:`BLOCK_EVENTS` events in order, as
one JSON document of columns (``{"v": 2, "n": 3, "trace_id": "t", "cols": {"ts":
[...], "kind": [...], ...}, "same": {"flow_name": "demo", ...}}``: a column of one
value is written once under ``same``, one that is None for every event not at all).
Payloads that are dicts of the same keys are a table of their own (``"payload":
{"keys", "cols", "same", "alias"}``). Version 2 adds two ways of writing less,
both read back to the same values: an event column of few distinct values (kind,
node) as ``{"d": [distinct], "i": [index per event]}``, and a payload column that
holds the very objects of an event column (a StoredEvent's payload repeating its
ts, kind and node) as ``alias: {key: column}``; ~230 -> ~110 bytes an event for
a runtime event's StoredEvent. Readers read versions 1 and 2.
Why blocks: a database row costs 5-10 us to insert into an indexed table whatever
its size, and one object per column to read back, so a row per event capped
ingest at ~80k events/s; a block costs one row and one C call to encode or decode.
Why JSON: it is plain data that any tool can read, and decoding a crafted block
cannot run code or allocate more than the block's own size. Columns rather than
one object per event: a column list is one ``zip`` away, and a block is a third
smaller.

Validation. A writer stores what a database can index and a reader can trust; an
event that fails :func:`check_row` (a trace id that is not a str, too long, or
holds NUL, control characters or lone surrogates; likewise node and flow names) is
refused alone, with the reason, and the rest of its batch is stored.

Idempotency. An event is identified by ``(flow_id, seq)``. Writers keep, per flow,
the seqs stored as sorted, disjoint ranges and drop every event already in them
(or repeated in the batch) before encoding: :func:`split_fresh`.
"""

from __future__ import annotations

import io
import json
import math
import pickle
from bisect import bisect_right
from collections.abc import Iterable, Iterator, Mapping, Sequence
from decimal import Decimal
from enum import Enum
from functools import partial
from itertools import chain, compress, repeat
from operator import attrgetter, is_, is_not, itemgetter
from typing import Any, NamedTuple

import orjson
import pydantic_core

__all__ = [
    "BLOCK_EVENTS",
    "COLUMNS",
    "Block",
    "Fold",
    "Ranges",
    "Row",
    "RowLike",
    "WriteReply",
    "block_rows",
    "check_row",
    "check_rows",
    "decode_block",
    "encode_block",
    "fold_rows",
    "iter_blocks",
    "merge_ranges",
    "row_of",
    "plain",
    "rows_of",
    "trace_id_of",
    "flow_id_of",
    "tuple_rows",
    "safe_row",
    "split_fresh",
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


# -- validation ----------------------------------------------------------------------------


def _text_problem(value: str, limit: int, encoding: str = "utf-8") -> str | None:
    if len(value) > limit:
        return f"is {len(value)} characters long (at most {limit})"
    if value.isascii():
        if value.isprintable():
            return None
        return "holds a control character (NUL, ESC, ...)"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "holds a lone surrogate (not encodable as UTF-8)"
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
    ids, and the kind, are None or such a str of at most 1,024 characters; ``ts``
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
        problem = _text_problem(str.__str__(value), MAX_NAME, encoding)
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
        # One column at a time (itemgetter, C-level): transposing all 24 columns of a
        # 10k-event batch cost ~4x more than reading the 8 checked here.
        column = list(map(_COLUMN_OF[name], rows))
        try:
            distinct = set(column)
        except TypeError:  # an unhashable value: certainly not a str
            suspect = True
            break
        # check_row's rules for this column, on each distinct value (a batch of
        # 10-event traces has a thousand trace ids): None where allowed, else a
        # non-empty exact str without a text problem. Anything else: row by row.
        limit = MAX_TRACE_ID if name == "trace_id" else MAX_NAME
        for value in distinct:
            if value is None:
                if name == "kind":
                    suspect = True
                    break
            elif type(value) is not str or not value \
                    or _text_problem(value, limit, encoding) is not None:
                suspect = True
                break
        if suspect:
            break
    if not suspect:
        ts = list(map(_COLUMN_OF["ts"], rows))
        seq = list(map(_COLUMN_OF["seq"], rows))
        attempt = list(map(_COLUMN_OF["attempt"], rows))
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


def _int8(numbers: list[Any]) -> bool:
    """Whether ``numbers`` (ints and floats) lie within a 64-bit integer's range."""
    return bool(min(numbers) >= -_INT8 and max(numbers) < _INT8)


def _payloads_ok(rows: Sequence[RowLike]) -> bool:
    """Whether every payload is a dict, or None on a runtime event (int queue columns)."""
    payloads = list(map(_COLUMN_OF["payload"], rows))
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
    payloads = list(map(_COLUMN_OF["payload"], rows))
    runtime = payloads.count(None)
    if runtime == len(rows):
        return True
    stored = rows if not runtime else list(
        compress(rows, map(is_not, payloads, repeat(None))))
    for name in _ID_FIELDS:
        if not set(map(type, map(_COLUMN_OF[name], stored))) <= _TEXT_OR_NONE:
            return False
    queued = list(map(_COLUMN_OF["queued_ts"], stored))
    types = set(map(type, queued))
    if not types <= _NUMBER_OR_NONE or (int in types and not _int8(
            list(compress(queued, map(is_, map(type, queued), repeat(int)))))):
        return False
    parents = list(map(_COLUMN_OF["parent_invocation_ids"], stored))
    return (set(map(type, parents)) <= {tuple, list, type(None)}
            and set(map(type, chain.from_iterable(filter(None, parents)))) <= _TEXT)


# -- encoding ------------------------------------------------------------------------------

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


def _read_long_int(digits: str) -> int | str:
    """``json.loads``'s ``parse_int`` for a block holding an int too long for
    ``int()``: that int as :func:`_safe_text` writes it (its digits' text)."""
    try:
        return int(digits)
    except ValueError:
        return _cut(digits)


def _key(key: Any) -> Any:
    """``key`` if JSON writes it as an object key (a str, float, bool, or an int short
    enough for decimal text), else its text."""
    if type(key) in (str, float, bool) or (type(key) is int and
                                           key.bit_length() <= _MAX_INT_BITS):
        return key
    return _safe_text(key)


def plain(obj: Any) -> Any:
    """What JSON writes for an object it has no encoding for: its plain equivalent
    (mapping -> dict, set/tuple -> list, enum -> value) or its text."""
    if isinstance(obj, Enum):
        value = obj.value
        return value if type(value) in (bool, int, float, str) else _safe_text(value)
    if isinstance(obj, Mapping):
        return {_key(key): value for key, value in obj.items()}
    if isinstance(obj, (set, frozenset, tuple, list)):
        return list(obj)
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return bytes(obj).decode("utf-8", "backslashreplace")
    return _safe_text(obj)


# check_circular off: a cycle raises ValueError (or RecursionError) either way, and the
# check costs ~10% of encoding. Non-str keys that JSON cannot write (tuples) go through
# _plain's text via the fallback below.
_encoder = json.JSONEncoder(separators=(",", ":"), default=plain, check_circular=False)
_encode = _encoder.encode
_ENCODE_ERRORS = (TypeError, ValueError, RecursionError, OverflowError)
_fast_encode = pydantic_core.to_json
_orjson_dumps = orjson.dumps
_FAST_ERRORS = (pydantic_core.PydanticSerializationError, ValueError, TypeError)


def _writable(value: Any, depth: int) -> Any:
    """``value`` if JSON can write it; else its text (``repr``); else, when that
    raises ValueError (an int too long for decimal text inside), a mapping or list
    of its items made writable the same way, ``depth`` levels down."""
    try:
        _encode(value)
        return value
    except _ENCODE_ERRORS:
        pass
    try:
        text = repr(value)
    except ValueError:
        text = None
    except BaseException:
        return _safe_text_repr(value)
    if text is not None or not depth:
        return _safe_text_repr(value)
    if isinstance(value, Mapping):
        return {_key(key): _writable(item, depth - 1) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_writable(item, depth - 1) for item in value]
    return _safe_text(value)


def _safe_value(value: Any, label: str) -> Any:
    """``value`` if JSON can write it; a mapping keeps its writable items and gets
    the others' text (see :func:`_writable`); anything else becomes
    ``{label: its text}``, or, a list holding an int too long for decimal text, its
    items made writable."""
    try:
        _encode(value)
        return value
    except _ENCODE_ERRORS:
        pass
    if isinstance(value, Mapping):
        return {_key(key): _writable(item, 2) for key, item in value.items()}
    if isinstance(value, int):  # too long for decimal text: its digits, as text
        return _safe_text(value)
    kept = _writable(value, 3)
    return {label: kept} if type(kept) is str else kept


def safe_row(row: Row | tuple[Any, ...]) -> Row:
    """``row`` (a Row or its plain tuple) with what JSON cannot write in ``extra`` or
    ``payload`` (a cycle, nesting too deep) replaced by its text, item by item."""
    if type(row) is not Row:
        row = _new(Row, row)
    extra = _safe_value(row.extra, "unserialisable_extra")
    payload = _safe_value(row.payload, "unserialisable_payload")
    safe = row._replace(extra=extra, payload=payload)
    try:
        _encode(list(safe))
    except _ENCODE_ERRORS:  # an id column of an odd type: its text
        safe = _new(Row, [v if v is None or type(v) in (str, float, bool)
                          or (type(v) is int and v.bit_length() <= _MAX_INT_BITS)
                          or i in _MADE_SAFE else _safe_text(v)
                          for i, v in enumerate(safe)])
    return safe


def _text_row(row: Row | tuple[Any, ...]) -> Row:
    """``row`` with its extra and payload as their text, and every other value that
    is not a str, float, bool, None or 64-bit int as its text: what JSON writes."""
    if type(row) is not Row:
        row = _new(Row, row)
    values = [v if v is None or type(v) in (str, float, bool)
              or (type(v) is int and -_INT8 <= v < _INT8) else _safe_text(v)
              for v in row[:_PAYLOAD]]
    extra_at = COLUMNS.index("extra")
    if row.extra is not None:
        values[extra_at] = {"unserialisable_extra": _safe_text(row.extra)}
    payload = row.payload
    return _new(Row, (*values, None if payload is None else
                      {"unserialisable_payload": _safe_text(payload)}))


def _safe_text_repr(value: Any) -> str:
    try:
        text = repr(value)
    except BaseException:
        return _safe_text(value)
    return text if len(text) <= _MAX_TEXT else text[:_MAX_TEXT] + "...[cut]"


_PAYLOAD = COLUMNS.index("payload")
#: The columns whose values' type the schema fixes (see _columns): all but
#: ``payload`` and ``extra``, whose values are anything JSON holds (an extra of
#: ``False`` next to one of ``0`` was read back as two ``0``).
_TYPED = frozenset(COLUMNS) - {"payload", "extra"}
#: The columns ``safe_row`` has already made writable value by value.
_MADE_SAFE = frozenset({COLUMNS.index("extra"), _PAYLOAD})


#: Values JSON writes as themselves: a value of another type goes through ``plain``
#: (stdlib encoder), which the Rust encoder would write its own way.
_SCALARS = frozenset({str, int, float, bool, type(None)})
_FINITE = frozenset({str, int, bool, type(None)})  # scalars never NaN nor infinite
_CONTAINERS = frozenset({list, tuple, dict})


#: Bits past which an int's decimal text may exceed the 4,300 digits ``str()`` and
#: ``json.loads`` convert by default (``sys.int_info.default_max_str_digits``;
#: raising the limit is process-wide: a library does not). pydantic-core writes such
#: an int; :func:`decode_block` reads it back as its digits' text, as
#: :func:`_safe_text` writes it on the stdlib path.
_MAX_INT_BITS = 14_000


def _small_ints(values: Sequence[Any], types: set[type]) -> bool:
    """Whether the ints among ``values`` (whose types are ``types``) have at most
    ``_MAX_INT_BITS`` bits. Longer ones go through the stdlib encoder, which writes
    them as their (cut) text: pydantic-core would write every digit, in time
    quadratic in their length (a 1.2-million-digit int took 2.6 s)."""
    if int not in types:
        return True
    if len(types) == 1:  # ints only: two C-level passes
        return bool(max(max(values).bit_length(), min(values).bit_length()) <= _MAX_INT_BITS)
    ints = compress(values, map(is_, map(type, values), repeat(int)))
    return max(map(int.bit_length, ints), default=0) <= _MAX_INT_BITS


def _plain(values: list[Any], ints: bool = True) -> bool:
    """Whether ``values`` are JSON's own types: scalars, or lists/tuples/str-keyed
    dicts of scalars (one level; deeper is left to the stdlib encoder); with
    ``ints``, ints of at most ``_MAX_INT_BITS`` bits. C-level passes only: a block
    of a few events must not pay a Python step per value."""
    types = set(map(type, values))
    if types <= _SCALARS:
        return not ints or _small_ints(values, types)
    if not types <= _SCALARS | _CONTAINERS:
        return False
    nested = list(compress(values, map(_CONTAINERS.__contains__, map(type, values))))
    if dict not in types:  # lists and tuples (parent ids): their items only
        items = list(chain.from_iterable(nested))
        item_types = set(map(type, items))
        return item_types <= _SCALARS and (not ints or (_small_ints(items, item_types)
                                                        and _small_ints(values, types)))
    dicts = [value for value in nested if type(value) is dict]
    items = list(chain.from_iterable(value for value in nested if type(value) is not dict))
    items += chain.from_iterable(map(dict.values, dicts))
    item_types = set(map(type, items))
    return (item_types <= _SCALARS
            and set(map(type, chain.from_iterable(dicts))) <= {str}
            and (not ints or (_small_ints(items, item_types)
                              and _small_ints(values, types))))


def _plain_doc(head: list[Any], events: tuple[dict[str, Any], dict[str, Any]],
               payloads: tuple[dict[str, Any], dict[str, Any]] | None = None) -> bool:
    """Whether ``head`` and every value of the ``(same, cols)`` pairs ``events`` (the
    event columns) and ``payloads`` (the payload table's) are :func:`_plain`.

    The columns (most of the values) are looked at by type first, with no copy:
    columns of scalars only (the usual) need nothing more. Ints are looked at only
    in payloads (the user's data): an event's are bounded by :func:`check_rows`
    (seq, attempt) or are the runtime's (queue sizes, its ``extra``)."""
    values = list(head)
    user: list[Any] = []
    same, cols = events
    values += same.values()
    if not set(map(type, chain.from_iterable(cols.values()))) <= _SCALARS:
        values += chain.from_iterable(cols.values())
    if "payload" in same:
        user.append(same["payload"])
    user += cols.get("payload", ())
    if payloads is not None:
        same, cols = payloads
        user += same.values()
        for column in cols.values():
            types = set(map(type, column))
            if not types <= _SCALARS:
                user += column
            elif not _small_ints(column, types):
                return False
    return _plain(values, ints=False) and (not user or _plain(user))


def _columns(names: Sequence[Any], columns: Sequence[Sequence[Any]], n: int,
             typed: frozenset[str] = frozenset()) -> tuple[dict[str, Any], dict[str, Any]]:
    """Columns by name, and those of one value (written once); all-None ones left out.

    A column of equal values JSON writes differently (``1``, ``True``, ``1.0``) is
    not one value: it is written in full (see :func:`_alike`). Except the columns
    named in ``typed``, whose type the schema fixes (an event's queue sizes are
    ints, its ts a float): a block of a 10-event trace paid ~0.7 us an event to
    check them, and a bool where an int belongs reads back as that int."""
    cols: dict[str, Any] = {}
    same: dict[str, Any] = {}
    checked: list[tuple[Any, Sequence[Any]]] = []
    for name, column in zip(names, columns, strict=True):
        first = column[0] if n else None
        # The last value first: a column that varies (ts, seq, ids: most of a batch's)
        # is told by one comparison instead of a count over the whole column (count's
        # own test: identity, then ==). ~0.25 us an event off a batch's look (measured).
        if (not n or column[-1] is first or column[-1] == first) \
                and column.count(first) == n:
            if first is not None:
                same[name] = first
            # The event columns' None is None: check_rows lets a payload be None
            # only on a runtime event, and refuses any non-mapping payload.
            if n and name not in typed and (first is not None or not typed):
                checked.append((name, column))
        else:
            cols[name] = column
    if checked and not _all_alike([column for _name, column in checked], n):
        for name, column in checked:
            if not _alike(column[0], column):
                same.pop(name, None)
                cols[name] = column
    return cols, same


_TEXT_ITEMS = frozenset({str, type(None)})
_SEQUENCES = frozenset({list, tuple})


def _all_alike(columns: list[Sequence[Any]], n: int) -> bool:
    """Whether :func:`_alike` holds for every one of ``columns`` (each of ``n`` values
    equal to its first), checked together: a few C-level passes per block instead of
    several per column (blocks of a 10-event trace paid ~0.8 us an event)."""
    kinds = [type(column[0]) for column in columns]
    got = list(map(type, chain.from_iterable(columns)))
    if got != list(chain.from_iterable(map(repeat, kinds, repeat(n)))):
        return False
    for column in columns:  # 0.0 == -0.0: their signs (one float column in a few)
        if column[0] == 0.0 and type(column[0]) is float and \
                len(set(map(math.copysign, repeat(1.0), column))) != 1:
            return False
    return all(_alike_objects(column) for column, kind in zip(columns, kinds, strict=True)
               if kind not in _SCALARS)


def _alike(first: Any, column: Sequence[Any]) -> bool:
    """Whether the values of ``column``, all equal to ``first``, are written as one
    JSON value: ``1 == True == 1.0`` and ``0.0 == -0.0``, but JSON writes each its
    own way, and a column written once would give them all ``first``'s; an object
    whose ``==`` says True to anything (``mock.ANY``) would become its neighbour."""
    kind = type(first)
    if set(map(type, column)) != {kind}:
        return False
    if kind is float:
        return first != 0.0 or len(set(map(math.copysign, repeat(1.0), column))) == 1
    return kind in _SCALARS or _alike_objects(column)


def _alike_objects(column: Sequence[Any]) -> bool:
    """For a column of equal containers or other objects (of one type): whether they
    are written alike. The very same object, always; else containers whose keys and
    items are text (parent ids); anything else (``[1]`` and ``[True]``, two equal
    Decimals of different text) is written value by value."""
    first = column[0]
    if all(map(is_, column, repeat(first))):
        return True
    kind = type(first)
    if kind is dict:
        return (set(map(type, chain.from_iterable(column))) <= _TEXT_ITEMS and
                set(map(type, chain.from_iterable(map(dict.values, column)))) <= _TEXT_ITEMS)
    return kind in _SEQUENCES and set(map(type, chain.from_iterable(column))) <= _TEXT_ITEMS


def _payload_table(payloads: Sequence[Any]) -> dict[str, Any] | None:
    """The payloads as a table when they are dicts with the same str keys (a store's
    saved events usually are): the keys once, then a column per key, so JSON writes
    each key once per block instead of once per event (~40% of encoding a
    StoredEvent, measured). None otherwise. The table keeps the first payload's key
    order (a JSON object's keys have none)."""
    n = len(payloads)
    if n < 2 or set(map(type, payloads)) != {dict}:
        return None
    keys = tuple(payloads[0])
    if set(map(type, keys)) - {str} or set(map(len, payloads)) != {len(keys)} \
            or len(keys) * n > _TABLE_CELLS:  # more than a reader makes of a table
        return None
    if not keys:
        return {"keys": [], "cols": {}, "same": {}}
    try:
        # Same size and every key found: the same keys (no per-payload key tuple).
        # A column per key, straight from the dicts: one list per key, and no
        # tuple per payload (each a GC-tracked allocation: in a process holding many
        # objects the collector's passes cost more than the reads).
        values = [tuple(map(itemgetter(key), payloads)) for key in keys]
    except KeyError:
        return None
    cols, same = _columns(keys, values, n)
    return {"keys": list(keys), "cols": cols, "same": same}


def _payload_rows(table: Any, n: int, events: Sequence[Sequence[Any]]
                  ) -> list[dict[str, Any]]:
    """The payloads of a payload table; ``events``: the block's event columns (in
    COLUMNS order), which an ``alias`` names."""
    if type(table) is not dict or type(table.get("keys")) is not list:
        raise BlockError("corrupt event block (bad payload table)")
    keys: list[Any] = table["keys"]
    cols, same = table.get("cols") or {}, table.get("same") or {}
    alias = table.get("alias") or {}
    if type(cols) is not dict or type(same) is not dict or type(alias) is not dict:
        raise BlockError("corrupt event block (bad payload table)")
    columns: list[Any] = []
    for key in keys:
        if key in same:
            columns.append([same[key]] * n)
            continue
        if key in alias:
            position = _COLUMN_INDEX.get(alias[key]) if type(alias[key]) is str else None
            if position is None:
                raise BlockError(f"corrupt event block (payload column {key!r} names "
                                 f"no event column)")
            columns.append(events[position])
            continue
        column = cols.get(key)
        if column is None:
            column = [None] * n
        if type(column) is not list or len(column) != n:
            raise BlockError(f"corrupt event block (payload column {key!r} is not {n} values)")
        columns.append(column)
    if not keys:
        return [{} for _ in range(n)]
    return [dict(zip(keys, values, strict=True)) for values in zip(*columns, strict=True)]


def encode_block(rows: Sequence[RowLike], *, ascii_only: bool = False, _stage: int = 0) -> str:
    """One block (see the module docstring) of ``rows``, all of one trace.

    ``ascii_only``: write only ASCII (``\\u`` escapes), for a database whose encoding is
    not UTF-8 (a LATIN1 Postgres refuses "日本"); else the text is UTF-8's, which
    the Rust encoder writes ~1.6x faster. Both read back to the same values.

    Never raises: a row whose ``extra`` or ``payload`` JSON cannot write (a cycle,
    nesting too deep) is written with that value replaced by its text.
    """
    n = len(rows)
    columns: list[tuple[Any, ...]] = (list(zip(*rows, strict=True)) if n
                                      else [()] * len(COLUMNS))
    # A column of one value (None included) is written once, under "same"; most of
    # a trace's columns are (its flow, its queue sizes, no extra), which halves the
    # values JSON writes.
    payloads = columns[_PAYLOAD] if n else ()
    table = _payload_table(payloads)
    if table is not None:
        columns[_PAYLOAD] = (None,) * n
    cols, same = _columns(COLUMNS, columns, n, _TYPED)
    same.pop("trace_id", None)
    doc = {"v": 2, "n": n, "trace_id": rows[0][_TRACE_ID] if n else None, "cols": cols,
           "same": same}
    if table is not None:
        doc["payload"] = table
        plain_doc = _plain_doc([doc["trace_id"]], (same, cols),
                               (table["same"], table["cols"]))
        _alias(table, cols, columns)
    else:
        plain_doc = _plain_doc([doc["trace_id"]], (same, cols))
    if n >= _INDEXED_MIN:
        _index(cols)
    if plain_doc:
        # Only JSON's own types (checked above): the Rust encoder writes the same
        # JSON as ``_encode`` (floats by shortest repr, NaN as NaN), ~5x faster.
        # A lone surrogate makes it refuse: then ``_encode`` escapes it (and writes
        # ASCII whatever ``ascii_only`` says).
        try:
            return _fast_encode(doc, inf_nan_mode="constants", ensure_ascii=ascii_only).decode()
        except _FAST_ERRORS:
            pass
    try:
        return _encode(doc)
    except _ENCODE_ERRORS:
        # The values JSON cannot write as their text (_stage 1); if anything still
        # fails, the whole extra and payload as text (_stage 2): never a loop.
        if _stage == 0:
            return encode_block([safe_row(row) for row in rows], ascii_only=ascii_only,
                                _stage=1)
        if _stage == 1:
            return encode_block([_text_row(row) for row in rows], ascii_only=ascii_only,
                                _stage=2)
        raise  # pragma: no cover - text and numbers only: JSON writes them


#: Payload keys that often hold the very objects of an event's column (a StoredEvent
#: made from a runtime event repeats its ts, kind and node in its payload): such a
#: payload column is written as a reference to that column ("alias").
_ALIASES = {"ts": "ts", "event": "kind", "kind": "kind", "node_name": "node_name",
            "node_id": "node_id", "invocation_id": "invocation_id", "span_id": "span_id",
            "queued_ts": "queued_ts", "flow_id": "flow_id", "flow_name": "flow_name"}
_COLUMN_INDEX = {name: i for i, name in enumerate(COLUMNS)}


def _alias(table: dict[str, Any], cols: Mapping[str, Any], columns: Sequence[Any]) -> None:
    """Write each payload column whose values are the very objects of an event
    column (identity: exact, and one C-level pass) as ``alias: {key: column}``."""
    alias: dict[str, str] = {}
    payload_cols = table["cols"]
    for key in [key for key in payload_cols if _ALIASES.get(key) in cols]:
        name = _ALIASES[key]
        if all(map(is_, payload_cols[key], columns[_COLUMN_INDEX[name]])):
            alias[key] = name
            del payload_cols[key]
    if alias:
        table["alias"] = alias


#: Event columns of few distinct values (an event's kind and node: a trace has a
#: handful) written as ``{"d": [distinct values], "i": [index per event]}``: a
#: 32-character node id is then 1-2 characters per event.
_INDEXED = ("kind", "node_name", "node_id")
_INDEXED_MIN = 16  # events in a block below which indexing does not pay


def _index(cols: dict[str, Any]) -> None:
    n = 0
    for name in _INDEXED:
        column = cols.get(name)
        if column is None:
            continue
        n = n or len(column)
        # str or None (check_rows saw to it), so hashing cannot merge unequal values.
        distinct = dict.fromkeys(column)
        if len(distinct) * 4 <= n:
            position = {value: i for i, value in enumerate(distinct)}
            cols[name] = {"d": list(distinct), "i": list(map(position.__getitem__, column))}


def _unindex(column: Any, n: int, name: str) -> list[Any]:
    """An indexed column (see :func:`_index`) as its n values."""
    distinct, index = column.get("d"), column.get("i")
    try:
        if type(distinct) is not list or type(index) is not list or len(index) != n \
                or min(index, default=0) < 0:
            raise ValueError
        return list(map(distinct.__getitem__, index))
    except (ValueError, TypeError, IndexError):
        raise BlockError(f"corrupt event block (indexed column {name!r} is not {n} "
                         "values)") from None


class BlockError(ValueError):
    """A block is not one this module wrote (corrupt, truncated, or foreign)."""


#: Most events a block may say it holds. Every writer of this schema (5) writes at
#: most BLOCK_EVENTS, and so did SQLite's schema 4, whose upgrade re-encodes each
#: block as one; Postgres's schema 4 wrote a trace's share of a batch as one block
#: (up to its batch_size: 10,000 by default, at most its max_buffer, 100,000 by
#: default), which the upgrade to 5 keeps whole. A block claiming more is refused
#: before anything of that size is made: a few bytes claiming 10**9 events were a
#: MemoryError (10**7: 7.4 GB); a claim of 100,000 makes ~50 MB of Rows.
_MAX_BLOCK_EVENTS = 100_000
#: Payload cells (keys x events) a payload table may make whatever the size of its
#: text (values that repeat are written once, absent ones not at all): encode_block
#: writes no table of more (the payloads then go whole, as text as long as they), and
#: decode_block refuses one (100,000 empty keys for 10,000 events: 10**9 cells).
_TABLE_CELLS = 4_000_000

#: What a decoded event column may hold (see _check_columns): the types check_row
#: lets a writer store (trace id, kind, names and flow ids, ts, seq, payload), and
#: the StoredEvent's own for the ids, parent ids and queued_ts, which readers need
#: of that type (the trace view and spans index by them, subtract them). Not listed:
#: the runtime columns and ``extra``, where a writer stores any value (events_of
#: refuses a runtime event whose payload cannot be made of them).
_NONE = type(None)
_TEXT_OR_NONE: frozenset[type] = frozenset({str, _NONE})
_TEXT: frozenset[type] = frozenset({str})
_NUMBER: frozenset[type] = frozenset({int, float})
_NUMBER_OR_NONE: frozenset[type] = frozenset({int, float, _NONE})
_INT: frozenset[type] = frozenset({int})
_LIST_OR_NONE: frozenset[type] = frozenset({list, _NONE})
_DICT_OR_NONE: frozenset[type] = frozenset({dict, _NONE})
_TYPES_OF: tuple[tuple[str, frozenset[type]], ...] = (
    ("trace_id", _TEXT_OR_NONE), ("kind", _TEXT), ("node_name", _TEXT_OR_NONE),
    ("node_id", _TEXT_OR_NONE), ("invocation_id", _TEXT_OR_NONE),
    ("span_id", _TEXT_OR_NONE), ("parent_span_id", _TEXT_OR_NONE),
    ("flow_name", _TEXT_OR_NONE), ("flow_id", _TEXT_OR_NONE), ("ts", _NUMBER),
    ("seq", _INT), ("queued_ts", _NUMBER_OR_NONE),
    ("parent_invocation_ids", _LIST_OR_NONE), ("payload", _DICT_OR_NONE))
_COLUMN_TYPES = tuple((COLUMNS.index(name), name, types) for name, types in _TYPES_OF)
_DICT: frozenset[type] = frozenset({dict})
#: The text columns and kind (all(kind) then refuses a null or empty one).
_text_views = itemgetter(*(COLUMNS.index(name) for name, types in _TYPES_OF
                           if types in (_TEXT_OR_NONE, _TEXT)))
(_QUEUED_TS, _PARENTS, _Q_IN, _Q_OUT) = (COLUMNS.index(name) for name in (
    "queued_ts", "parent_invocation_ids", "queue_depth_in", "queue_depth_out"))


def _check_columns(columns: Sequence[list[Any]], views: Sequence[list[Any]]) -> None:
    """Raise BlockError naming the first of a block's ``columns`` (in COLUMNS order)
    holding a value no writer stores there (see _TYPES_OF).

    ``views``: the values of each column to look at (one for a column of one value
    repeated; an indexed column's distinct values). The types of every value looked
    at are taken in one pass and counted per kind of column, numbers are summed
    (a sum of finite numbers is finite but for an overflow): C-level passes only,
    yet ~20% of decoding a 2,000-event block and ~40% of a 10-event one (measured):
    a type per value costs about what parsing it does.
    """
    if not columns[0]:
        return
    texts = list(chain.from_iterable(_text_views(views)))
    numbers = views[_TS] + views[_SEQ] + views[_QUEUED_TS]
    parents = views[_PARENTS]
    kinds = list(map(type, chain(texts, numbers, parents)))
    t, m = len(texts), len(numbers)
    head, mid, tail = kinds[:t], kinds[t:t + m], kinds[t + m:]
    try:
        if (head.count(str) + head.count(_NONE) == t and all(views[_KIND])
                and mid.count(float) + mid.count(int) + mid.count(_NONE) == m
                and _all_finite(views[_TS]) and type(sum(views[_SEQ])) is int
                and tail.count(list) + tail.count(_NONE) == len(tail)
                # join: TypeError unless every parent id is a str
                and "".join(map("".join, filter(None, parents))) is not None
                and _payloads_made(columns, views)):
            return
    except (TypeError, OverflowError):  # a null ts; an int past a float's range
        pass
    _name_the_column(columns, views)


#: The columns check_row did not look at before 2026-12-07 (any value was stored):
#: a block holding another type there is read with it mended, not refused.
_UNCHECKED_IDS = tuple(COLUMNS.index(name) for name in _ID_FIELDS)


def _mend_unchecked(columns: list[list[Any]], views: list[list[Any]]) -> None:
    """Mend, in place, the values of the columns older writers stored unchecked
    (ids, parent ids, queued_ts) that readers cannot use: an id that is not a str
    as its text, parent ids as a tuple of their texts (anything but a list: none),
    a queued time that is not a number of 64 bits (a bool, text, a long int) as
    None. A clean block pays a few C-level passes."""
    for position in _UNCHECKED_IDS:
        if not set(map(type, views[position])) <= _TEXT_OR_NONE:
            columns[position] = [v if v is None or type(v) is str else _safe_text(v)
                                 for v in columns[position]]
            views[position] = columns[position]
    parents = views[_PARENTS]
    if not (set(map(type, parents)) <= _LIST_OR_NONE
            and set(map(type, chain.from_iterable(filter(None, parents)))) <= _TEXT):
        columns[_PARENTS] = [[v if type(v) is str else _safe_text(v) for v in value]
                             if type(value) is list else None for value in columns[_PARENTS]]
        views[_PARENTS] = columns[_PARENTS]
    queued = views[_QUEUED_TS]
    types = set(map(type, queued))
    if not types <= _NUMBER_OR_NONE or (int in types and not _int8(
            [v for v in queued if type(v) is int])):
        columns[_QUEUED_TS] = [v if type(v) is float or v is None
                               or (type(v) is int and -_INT8 <= v < _INT8) else None
                               for v in columns[_QUEUED_TS]]
        views[_QUEUED_TS] = columns[_QUEUED_TS]


def _all_finite(numbers: list[Any]) -> bool:
    """Whether ``numbers`` (ints and floats) are finite: their sum is, unless it
    overflows (then one by one). Raises TypeError for a value not a number."""
    return math.isfinite(sum(numbers)) or all(map(math.isfinite, numbers))


def _payloads_made(columns: Sequence[list[Any]], views: Sequence[list[Any]]) -> bool:
    """Whether payloads are objects, or null on a runtime event (int queue sizes:
    a reader makes its payload of its columns)."""
    types = set(map(type, views[_PAYLOAD]))
    if types == _DICT:
        return True
    if not types <= _DICT_OR_NONE:
        return False
    if dict in types:  # some events of each: the runtime ones' queue sizes
        runtime = list(map(is_, columns[_PAYLOAD], repeat(None)))
        sizes = [list(compress(columns[i], runtime)) for i in (_Q_IN, _Q_OUT)]
    else:
        sizes = [views[_Q_IN], views[_Q_OUT]]
    return set(map(type, chain.from_iterable(sizes))) == _INT


def _name_the_column(columns: Sequence[list[Any]], views: Sequence[list[Any]]) -> None:
    """Raise BlockError for the first column _check_columns refused (one by one, so
    the error can name it; only ever for a corrupt block)."""
    for position, name, allowed in _COLUMN_TYPES:
        values = views[position]
        odd = sorted({t.__name__ for t in map(type, values) if t not in allowed})
        if odd:
            raise BlockError(f"corrupt event block (column {name!r} holds a "
                             f"{' and a '.join(odd)}, where a writer stores "
                             f"{' or '.join(sorted(t.__name__ for t in allowed))})")
        problem = None
        try:
            if name == "kind" and not all(values):
                problem = "an empty kind"
            elif name == "ts" and not _all_finite(values):
                problem = "a number that is not finite"
        except OverflowError:
            problem = "a number that is not finite"
        if name == "parent_invocation_ids" and not set(
                map(type, chain.from_iterable(filter(None, values)))) <= _TEXT:
            problem = "a parent id that is not a str"
        elif name == "payload" and not _payloads_made(columns, views):
            problem = "no payload on an event without int queue sizes"
        if problem is not None:
            raise BlockError(f"corrupt event block (column {name!r} holds {problem})")
    raise BlockError("corrupt event block (a value of the wrong type)")  # pragma: no cover


_make_row = partial(_new, Row)  # C-level: a comprehension's step per Row was ~80 ns


def decode_block(text: str | bytes) -> list[Row]:
    """The Rows of a block, in order.

    Raises:
        BlockError: the text is not a block (not JSON, wrong shape, columns of
            different lengths, more events than any writer puts in a block, a value
            of a type no writer stores in its column).
    """
    try:
        try:
            doc = json.loads(text)
        except ValueError as exc:
            # An int of more digits than int() converts (written by pydantic-core):
            # read again, such ints as text (not the first try: a parse_int hook is
            # a Python call per int).
            if isinstance(exc, json.JSONDecodeError) or "integer string" not in str(exc):
                raise
            doc = json.loads(text, parse_int=_read_long_int)
    except (ValueError, RecursionError) as exc:
        raise BlockError(f"corrupt event block ({type(exc).__name__}: {exc})") from exc
    if type(doc) is not dict or doc.get("v") not in (1, 2) \
            or type(doc.get("cols")) is not dict:
        raise BlockError("corrupt event block (not a version-1 or -2 block document)")
    n = doc.get("n")
    if type(n) is not int or n < 0:
        raise BlockError("corrupt event block (bad event count)")
    if n > _MAX_BLOCK_EVENTS:  # before anything of n's size is made
        raise BlockError(f"corrupt event block (it claims {str(n)[:30]} events; a "
                         f"block holds at most {_MAX_BLOCK_EVENTS})")
    cols: dict[str, Any] = doc["cols"]
    same = doc.get("same") or {}
    if type(same) is not dict:
        raise BlockError("corrupt event block (bad 'same' columns)")
    none = [None] * n
    columns: list[list[Any]] = []
    views: list[list[Any]] = []  # what _check_columns looks at: one value of a repeat
    for name in COLUMNS:
        if name == "trace_id":
            value = [doc.get("trace_id")]
            columns.append(value * n)
            views.append(value)
            continue
        if name in same:
            value = [same[name]]
            columns.append(value * n)
            views.append(value)
            continue
        column = cols.get(name, none)
        if column is none:
            views.append(column[:1])
        elif type(column) is dict:
            indexed: dict[str, Any] = column
            column = _unindex(indexed, n, name)
            views.append(indexed["d"])  # its distinct values (a list: _unindex checked)
        elif type(column) is not list or len(column) != n:
            raise BlockError(f"corrupt event block (column {name!r} is not {n} values)")
        else:
            views.append(column)
        columns.append(column)
    if "payload" in doc:
        table = doc["payload"]
        keys = table.get("keys") if type(table) is dict else None
        # Every key of the table is a cell of each of its n payloads, written once
        # or not at all when its value repeats: 100,000 keys of no value in ~600 kB
        # would make 10**9 cells. An honest table's cells are bounded by its text.
        if type(keys) is list and len(keys) * n > max(_TABLE_CELLS, 16 * len(text)):
            raise BlockError(f"corrupt event block (a payload table of {len(keys)} keys "
                             f"for {n} events in {len(text)} characters)")
        columns[_PAYLOAD] = _payload_rows(table, n, columns)
        views[_PAYLOAD] = [{}]  # dicts, every one (made by _payload_rows)
    _mend_unchecked(columns, views)
    _check_columns(columns, views)
    # Lists (or null) of str (checked above) as tuples; a new list, as the column may
    # be ``none``, every absent column's.
    parents = views[_PARENTS]
    if len(parents) < n:  # one value repeated
        columns[_PARENTS] = [tuple(parents[0] or ())] * n
    elif None in parents:
        columns[_PARENTS] = [tuple(value or ()) for value in parents]
    else:
        columns[_PARENTS] = list(map(tuple, parents))
    return list(map(_make_row, zip(*columns, strict=True)))


class Block(NamedTuple):
    """One block row as a writer inserts it."""

    trace_id: Any
    offset: int  #: index of its first event among the batch's events of its trace
    n: int
    ts_lo: float
    ts_hi: float
    data: str


def group_by_trace(rows: Iterable[RowLike]) -> dict[Any, list[RowLike]]:
    """``rows`` per trace id (None for trace-less events), in order of first appearance."""
    groups: dict[Any, list[RowLike]] = {}
    get = groups.get
    for row in rows:
        trace_id = row[_TRACE_ID]
        group = get(trace_id)
        if group is None:
            groups[trace_id] = [row]
        else:
            group.append(row)
    return groups


_ts_of = itemgetter(_TS)
_payload_of = itemgetter(_PAYLOAD)
flow_id_of = itemgetter(_FLOW_ID)
_seq_of = itemgetter(_SEQ)
trace_id_of = itemgetter(_TRACE_ID)


def block_rows(groups: Mapping[Any, Sequence[RowLike]],
               max_events: int = BLOCK_EVENTS, *, ascii_only: bool = False) -> list[Block]:
    """The blocks of ``groups`` (:func:`group_by_trace`), in order (``ascii_only``: see
    :func:`encode_block`)."""
    return list(iter_blocks(groups, max_events, ascii_only=ascii_only))


def iter_blocks(groups: Mapping[Any, Sequence[RowLike]],
                max_events: int = BLOCK_EVENTS, *, ascii_only: bool = False
                ) -> Iterator[Block]:
    """:func:`block_rows`, each block encoded when it is taken (the batch is looked
    at as a whole when the first one is).

    A batch of runtime events (no payloads) of plain values is looked at once, as a
    whole (:class:`_BatchShape`), and each block then costs a transpose and one C
    call: a batch of 10-event traces is ~350 blocks of ~6 events, and looking at
    each block on its own (:func:`encode_block`) was ~8 us an event, most of a
    SQLite batch's time (measured).
    """
    shape = _BatchShape.of(groups)
    for trace_id, group in groups.items():
        for offset in range(0, len(group), max_events):
            chunk = group[offset:offset + max_events]
            if shape is not None:
                yield shape.block(trace_id, offset, chunk, ascii_only)
                continue
            stamps = list(map(_ts_of, chunk))
            yield Block(trace_id, offset, len(chunk), min(stamps), max(stamps),
                        encode_block(chunk, ascii_only=ascii_only))


#: Events per block on average above which a batch takes the general path.
_SHAPE_MAX_AVERAGE = 64


class _BatchShape:
    """What the blocks of one batch of runtime events share: the columns of one
    value across the batch (``same``: the same in each of its blocks) and the
    positions of the others, whose values are all JSON's own (checked once).

    A block then writes every other column in full, where :func:`encode_block`
    would also write once a column of one value within the block: a little more
    text (a few %) for a fraction of the time.
    """

    __slots__ = ("finite", "names", "positions", "same")

    def __init__(self, same: dict[str, Any], names: list[str], finite: bool) -> None:
        self.same = same
        self.names = names
        self.positions = [_COLUMN_INDEX[name] for name in names]
        #: No NaN or infinity anywhere in the batch: its blocks may go through orjson,
        #: which writes them as null (pydantic-core writes NaN, Infinity).
        self.finite = finite

    @classmethod
    def of(cls, groups: Mapping[Any, Sequence[RowLike]]) -> _BatchShape | None:
        """The shape of the batch ``groups``, or None when it needs the general path
        (a payload, a value JSON does not write as itself, a single event)."""
        rows = list(chain.from_iterable(groups.values()))
        n = len(rows)
        # Only for many small blocks, whose own steps it saves. Blocks of one or two
        # events share nothing; large ones pay their steps once per many events, and
        # looking at the whole batch (every column's types) cost more: one 100k-event
        # trace's runtime events, 290k -> 250k events/s (measured).
        if n < 2 or len(groups) * 2 > n or len(groups) * _SHAPE_MAX_AVERAGE < n:
            return None
        if list(map(_payload_of, rows)).count(None) != n:  # before the transpose
            return None
        columns: list[tuple[Any, ...]] = list(zip(*rows, strict=True))
        # Every column of one value checked to be written alike (1 and 1.0, -0.0),
        # the typed ones too: once per batch it is cheap, and a trace's value must
        # not become another trace's.
        cols, same = _columns(COLUMNS, columns, n)
        same.pop("trace_id", None)
        cols.pop("payload", None)
        # JSON's own values only: a pass per column (the usual: scalars, and tuples
        # of parent ids), _plain for the rest (extra's mappings): ~0.3 us an event,
        # where _plain_doc over the whole batch took ~2.
        odd: list[Any] = list(same.values())
        # Finite: no float that is NaN or infinite (a sum of finite floats is finite
        # unless it overflows, which only sends the batch to the other encoder);
        # anything nested (extra's mappings) is not looked into, and counts as not.
        finite = all(map(_finite, odd))
        for column in cols.values():
            # A column of one type (the usual) is one count: ~3x cheaper than a set.
            kinds = list(map(type, column))
            if kinds.count(kinds[0]) == n and kinds[0] in _SCALARS:
                if kinds[0] is float and finite:
                    finite = math.isfinite(sum(column))
                continue
            types = set(kinds)
            if types <= _SCALARS:
                if float in types and finite:
                    finite = math.isfinite(sum(compress(column, map(is_, kinds,
                                                                    repeat(float)))))
                continue
            if types <= _SEQUENCES | {type(None)}:
                inner = set(map(type, chain.from_iterable(filter(None, column))))
                if inner <= _SCALARS:  # parent ids
                    finite = finite and float not in inner
                    continue
            odd += column
            finite = False
        if odd and not _plain(odd, ints=False):
            return None
        return cls(same, [name for name in COLUMNS if name in cols and name != "trace_id"],
                   finite)

    def block(self, trace_id: Any, offset: int, chunk: Sequence[RowLike],
              ascii_only: bool) -> Block:
        """The block of ``chunk`` (rows of ``trace_id`` in this batch)."""
        n = len(chunk)
        columns = list(zip(*chunk, strict=True))
        cols = dict(zip(self.names, map(columns.__getitem__, self.positions), strict=True))
        if n >= _INDEXED_MIN:
            _index(cols)
        stamps = columns[_TS]
        doc = {"v": 2, "n": n, "trace_id": trace_id, "cols": cols, "same": self.same}
        if self.finite and not ascii_only:
            # orjson writes JSON's own values as pydantic-core does, ~2.5x faster
            # (measured on chain N=5's batches); it refuses an int past 64 bits and a
            # lone surrogate, which the encoders below take.
            try:
                return Block(trace_id, offset, n, min(stamps), max(stamps),
                             _orjson_dumps(doc).decode())
            except TypeError:  # orjson.JSONEncodeError
                pass
        try:
            data = _fast_encode(doc, inf_nan_mode="constants", ensure_ascii=ascii_only).decode()
        except _FAST_ERRORS:  # a lone surrogate: the general path escapes it
            data = encode_block(chunk, ascii_only=ascii_only)
        return Block(trace_id, offset, n, min(stamps), max(stamps), data)


def _finite(value: Any) -> bool:
    """Whether ``value`` is a scalar, or a list or tuple of scalars, with no NaN or
    infinity (anything else: False, not looked into)."""
    kind = type(value)
    if kind in _FINITE:
        return True
    if kind is float:
        return math.isfinite(value)
    return kind in _SEQUENCES and all(
        type(item) in _FINITE or (type(item) is float and math.isfinite(item))
        for item in value)


# -- summaries -----------------------------------------------------------------------------


class Fold:
    """The summary of one trace's events in a batch (TraceSummaryBuilder's semantics)."""

    __slots__ = ("cancelled", "ended", "errors", "events", "events_lost", "failed",
                 "flow_name", "nodes", "open", "remotes", "started", "starts")

    def __init__(self, flow_name: Any, ts: float) -> None:
        self.flow_name = flow_name
        self.started = self.ended = ts
        self.starts = self.errors = self.remotes = self.open = self.events_lost = 0
        self.events = 0
        self.failed = self.cancelled = False
        self.nodes: set[str] = set()


#: The kind of the marker event a store writes when it lost events of a trace
#: (payload ``{"events_lost": n, "reason": ...}``): penguiflow.state.EVENTS_LOST_KIND.
LOST_KIND = "store_events_lost"


#: The core's PER_ATTEMPT_ERROR_KINDS (penguiflow.state), spelled here: this module
#: imports no penguiflow.
_PER_ATTEMPT = frozenset({"node_error", "node_timeout"})


def fold_rows(rows: Iterable[RowLike], *, terminal: frozenset[str],
              errors: frozenset[str]) -> dict[Any, Fold]:
    """Per trace id (in order of first event), the summary of ``rows``.

    Folded in Python while the rows are at hand: one summary row per trace reaches
    the database instead of a GROUP BY over the batch (~4-5 us per event in SQL,
    measured, against ~0.2 here). ``terminal`` and ``errors`` are the core's
    TERMINAL_KINDS and ERROR_KINDS (passed in: this module imports no penguiflow).
    Rows without a trace id are skipped. (Counting by kind with ``Counter`` per
    trace was tried: no faster.)
    """
    folds: dict[Any, Fold] = {}
    get = folds.get
    for row in rows:
        trace_id = row[_TRACE_ID]
        if trace_id is None:
            continue
        t, k = row[_TS], row[_KIND]
        f = get(trace_id)
        if f is None:
            f = folds[trace_id] = Fold(row[_FLOW_NAME], t)
        else:
            if t < f.started:
                f.started = t
            if t > f.ended:
                f.ended = t
            if f.flow_name is None:
                f.flow_name = row[_FLOW_NAME]
        f.events += 1
        if k == "node_start":
            if row[_ATTEMPT] == 0:
                f.starts += 1
                f.open += 1
            if row[_NODE_NAME]:
                f.nodes.add(row[_NODE_NAME])
        elif k in terminal:
            f.open -= 1
            if k == "node_failed":  # an error, but its invocation's first failure counted
                f.failed = True
        elif k in errors:
            # error_count counts failed invocations: a node's per-attempt errors only
            # at attempt 0 (its first failure is always there), remote errors each.
            if row[_ATTEMPT] == 0 or k not in _PER_ATTEMPT:
                f.errors += 1
        elif k == "trace_cancel_start":
            f.cancelled = True
        elif k == "remote_call_start":
            f.remotes += 1
        elif k == LOST_KIND:
            payload = row[_PAYLOAD]
            lost = payload.get("events_lost") if isinstance(payload, Mapping) else None
            f.events_lost += lost if type(lost) is int and lost > 0 else 0
    return folds


# -- idempotency ---------------------------------------------------------------------------


def split_fresh(rows: Sequence[RowLike], stored: Mapping[Any, Ranges]
                ) -> tuple[list[int], dict[Any, Ranges]]:
    """Positions of the rows already stored (or repeated in ``rows``), and each
    touched flow's ranges once the others are stored.

    ``stored`` maps flow ids to the ranges already stored (missing: none). Rows
    without a flow id are always fresh.
    """
    flows = set(map(flow_id_of, rows))
    if len(flows) == 1:  # the usual batch: one runtime's events, in seq order
        (flow,) = flows
        if flow is None:
            return [], {}
        seqs = list(map(_seq_of, rows))
        ranges = stored.get(flow)
        if len(set(seqs)) == len(seqs) and (not ranges or min(seqs) > ranges[-1][1]):
            return [], {flow: merge_ranges(ranges or [], seqs)}
    seen: dict[Any, set[int]] = {}
    skipped: list[int] = []
    by_flow: dict[Any, list[int]] = {}
    for i, row in enumerate(rows):
        flow = row[_FLOW_ID]
        if flow is None:
            continue
        seq = row[_SEQ]
        flow_seen = seen.get(flow)
        if flow_seen is None:
            flow_seen = seen[flow] = set()
        if seq in flow_seen or _in(stored.get(flow), seq):
            skipped.append(i)
            continue
        flow_seen.add(seq)
        by_flow.setdefault(flow, []).append(seq)
    return skipped, {flow: merge_ranges(stored.get(flow) or [], seqs)
                     for flow, seqs in by_flow.items()}


def _in(ranges: Ranges | None, seq: int) -> bool:
    if not ranges:
        return False
    i = bisect_right(ranges, (seq, math.inf)) - 1
    return i >= 0 and ranges[i][0] <= seq <= ranges[i][1]


def merge_ranges(ranges: Ranges, seqs: Sequence[int]) -> Ranges:
    """``ranges`` with ``seqs`` added (sorted, disjoint, adjacent ranges joined)."""
    if not seqs:
        return list(ranges)
    unique = set(seqs)
    lo, hi = min(unique), max(unique)
    if hi - lo + 1 == len(unique):  # a run (the runtime's usual batch): no sort
        runs = [(lo, hi)]
    else:
        runs = []
        ordered = sorted(unique)
        start = prev = ordered[0]
        for seq in ordered[1:]:
            if seq != prev + 1:
                runs.append((start, prev))
                start = seq
            prev = seq
        runs.append((start, prev))
    if not ranges:
        return runs
    merged: Ranges = []
    for lo, hi in sorted([*ranges, *runs]):
        if merged and lo <= merged[-1][1] + 1:
            if hi > merged[-1][1]:
                merged[-1] = (merged[-1][0], hi)
        else:
            merged.append((lo, hi))
    return merged
