"""Blocks: a batch's events, grouped by trace, encoded for the database.

A batch's events are grouped by trace, and each trace's share becomes one
*block*: one database row holding up to :data:`~._records.BLOCK_EVENTS` events in
order, as one JSON document of columns (``{"v": 2, "n": 3, "trace_id": "t", "cols":
{"ts": [...], "kind": [...], ...}, "same": {"flow_name": "demo", ...}}``: a column
of one value is written once under ``same``, one that is None for every event not
at all). Payloads that are dicts of the same keys are a table of their own
(``"payload": {"keys", "cols", "same", "alias"}``). Version 2 adds two ways of
writing less, both read back to the same values: an event column of few distinct
values (kind, node) as ``{"d": [distinct], "i": [index per event]}``, and a
payload column that holds the very objects of an event column (a StoredEvent's
payload repeating its ts, kind and node) as ``alias: {key: column}``; ~230 -> ~110
bytes an event for a runtime event's StoredEvent. Readers (:mod:`._block_read`)
read versions 1 and 2.

Why blocks: a database row costs 5-10 us to insert into an indexed table whatever
its size, and one object per column to read back, so a row per event capped
ingest at ~80k events/s; a block costs one row and one C call to encode or decode.
Why JSON: it is plain data that any tool can read, and decoding a crafted block
cannot run code or allocate more than the block's own size. Columns rather than
one object per event: a column list is one ``zip`` away, and a block is a third
smaller.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from enum import Enum
from itertools import chain, compress, repeat
from operator import is_, itemgetter
from typing import Any, NamedTuple

import orjson
import pydantic_core

from ._records import (
    _INT8,
    _MAX_TEXT,
    _PAYLOAD,
    _TABLE_CELLS,
    _TRACE_ID,
    _TS,
    BLOCK_EVENTS,
    COLUMNS,
    ColumnRows,
    Row,
    RowLike,
    _new,
    _safe_text,
    values_of,
)

__all__ = [
    "Block",
    "block_rows",
    "encode_block",
    "iter_blocks",
    "plain",
    "safe_row",
]

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


def encode_block(rows: Sequence[RowLike], *, ascii_only: bool = False, _stage: int = 0) -> str:
    """One block (see the module docstring) of ``rows``, all of one trace.

    ``ascii_only``: write only ASCII (``\\u`` escapes), for a database whose encoding is
    not UTF-8 (a LATIN1 Postgres refuses "日本"); else the text is UTF-8's, which
    the Rust encoder writes ~1.6x faster. Both read back to the same values.

    Never raises: a row whose ``extra`` or ``payload`` JSON cannot write (a cycle,
    nesting too deep) is written with that value replaced by its text.
    """
    n = len(rows)
    columns: list[Sequence[Any]] = (list(rows.columns) if type(rows) is ColumnRows
                                    else list(zip(*rows, strict=True)) if n
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
    doc = {"v": 2, "n": n, "trace_id": columns[_TRACE_ID][0] if n else None, "cols": cols,
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


class Block(NamedTuple):
    """One block row as a writer inserts it."""

    trace_id: Any
    offset: int  #: index of its first event among the batch's events of its trace
    n: int
    ts_lo: float
    ts_hi: float
    data: str


def group_by_trace(rows: Iterable[RowLike]) -> Mapping[Any, Sequence[RowLike]]:
    """``rows`` per trace id (None for trace-less events), in order of first appearance
    (a :class:`ColumnRows`' groups are ColumnRows)."""
    if type(rows) is ColumnRows:
        return _column_groups(rows)
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


def _column_groups(rows: ColumnRows) -> dict[Any, Sequence[RowLike]]:
    trace_ids = rows.columns[_TRACE_ID]
    first = trace_ids[0] if trace_ids else None
    # One trace (the usual) told as the tuple path tells groups, by hash and ==
    # (a dict), not by == alone: a str subclass's odd __eq__ must not merge traces.
    if len(rows) < 2 or len(dict.fromkeys(trace_ids)) == 1:
        return {first: rows} if len(rows) else {}
    positions: dict[Any, list[int]] = {}
    get = positions.get
    for i, trace_id in enumerate(trace_ids):
        group = get(trace_id)
        if group is None:
            positions[trace_id] = [i]
        else:
            group.append(i)
    return {trace_id: rows.take(group) for trace_id, group in positions.items()}




_payload_of = itemgetter(_PAYLOAD)


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
            # A group of one block is its own chunk: no copy (a ColumnRows' slice
            # copies each of its columns).
            chunk = group if len(group) <= max_events else group[offset:offset + max_events]
            if shape is not None:
                yield shape.block(trace_id, offset, chunk, ascii_only)
                continue
            stamps = values_of(chunk, _TS)
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
        if any(type(group) is ColumnRows for group in groups.values()):
            return None  # StoredEvents': their payloads take the general path
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
