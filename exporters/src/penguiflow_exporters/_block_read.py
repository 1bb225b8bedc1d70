"""Blocks read back: :func:`decode_block`, the readers' side of :mod:`._blocks`.

A block is refused (:class:`~._records.BlockError`) unless it is one a writer of
this schema could have written: its size claims are bounded before anything of
that size is made, and each event column holds only the types a writer stores
there (values older writers stored unchecked are mended, not refused).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from functools import partial
from itertools import chain, compress, repeat
from operator import is_, itemgetter
from typing import Any

from ._blocks import _COLUMN_INDEX
from ._records import (
    _ID_FIELDS,
    _INT8,
    _KIND,
    _NONE,
    _NUMBER_OR_NONE,
    _PAYLOAD,
    _SEQ,
    _TABLE_CELLS,
    _TEXT,
    _TEXT_OR_NONE,
    _TS,
    COLUMNS,
    BlockError,
    Row,
    _cut,
    _int8,
    _new,
    _safe_text,
)

__all__ = [
    "decode_block",
]

def _read_long_int(digits: str) -> int | str:
    """``json.loads``'s ``parse_int`` for a block holding an int too long for
    ``int()``: that int as :func:`_safe_text` writes it (its digits' text)."""
    try:
        return int(digits)
    except ValueError:
        return _cut(digits)


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


#: Most events a block may say it holds. Every writer of this schema (5) writes at
#: most BLOCK_EVENTS, and so did SQLite's schema 4, whose upgrade re-encodes each
#: block as one; Postgres's schema 4 wrote a trace's share of a batch as one block
#: (up to its batch_size: 10,000 by default, at most its max_buffer, 100,000 by
#: default), which the upgrade to 5 keeps whole. A block claiming more is refused
#: before anything of that size is made: a few bytes claiming 10**9 events were a
#: MemoryError (10**7: 7.4 GB); a claim of 100,000 makes ~50 MB of Rows.
_MAX_BLOCK_EVENTS = 100_000


#: What a decoded event column may hold (see _check_columns): the types check_row
#: lets a writer store (trace id, kind, names and flow ids, ts, seq, payload), and
#: the StoredEvent's own for the ids, parent ids and queued_ts, which readers need
#: of that type (the trace view and spans index by them, subtract them). Not listed:
#: the runtime columns and ``extra``, where a writer stores any value (events_of
#: refuses a runtime event whose payload cannot be made of them).
_NUMBER: frozenset[type] = frozenset({int, float})
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
