"""Event blocks and batch folds: the write path the durable stores share (stdlib only).

This module imports nothing from penguiflow (nor from this package's other
modules): the stores' writer processes run it (see _writer_proc.py), and start in
~0.1 s because of that. The readers' side is _blocks.py.

Event blocks are how the durable stores (schema 4) keep events, several to a row.
A batch's events are grouped by trace, and each trace's share becomes one
*block*: one row holding those events, in order, as one encoded value. Why: on
the 2-core CI machine a row costs 5-10 us to insert into an indexed table
whatever its size, and a Python object per column to read back, so one row per
event capped ingest at ~80k events/s (SQLite) and ~48k (Postgres) and
``load_history`` of 100k events at ~1.1 s. A block of a trace's events costs one
row, one index entry, and one C call to encode or decode.

Items. A block holds the store's buffered items as tuples of two layouts, told
apart by their length, sharing positions 0-13 (:data:`~penguiflow.state.EVENT_FIELDS`'
first fourteen: trace id, ts, kind, node name, node id, invocation id, parents,
span id, parent span id, seq, attempt, queued ts, flow name, flow id):

* 23 items: the runtime's ``EVENT_FIELDS`` tuple, as buffered (the payload is
  rebuilt on read with :func:`penguiflow.metrics.event_payload`, as the runtime
  builds it);
* 15 items: a :class:`StoredEvent` handed to ``save_event``, its whole payload
  (a dict) at position 14 (``_blocks.stored_item``).

Encoding. ``pickle`` protocol 5: ~0.3-0.8 us per event to encode and ~0.7 to
decode, against ~5.7 and ~4.6 for JSON on the CI machine, and half the bytes
(repeated strings are written once per block). A block is two pickles with one
memo: the items' first fourteen fields, then the rest (:func:`encode_block`).
Only plain data is written: anything else (a read-only mapping, an enum, a user
object in ``extra``) is replaced on the way in by its plain equivalent (dict,
int, str, ...) or by its ``str()``, as the JSON stores did. The readers
(_blocks.decode_block) are restricted to those types: a block that names
anything else (tampered with, or written by another tool) is refused with
``StateStoreError``, never executed. The flip side: blocks are opaque
to SQL; read events through a store (``load_history``, ``penguiflow-admin
history``, ``pf export``).

Idempotency. An event is identified by ``(flow_id, seq)``. Stores keep, per flow,
the seq numbers stored as sorted, disjoint ranges (a flow's events arrive in seq
order, so that is usually one range per flow) and drop, before encoding, every
event already in them or repeated in the batch: :func:`split_fresh`.
"""

from __future__ import annotations

import builtins
import io
import pickle
import threading
from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from enum import Enum
from operator import add, itemgetter
from typing import Any

__all__ = [
    "BLOCK_EVENTS",
    "SAFE_GLOBALS",
    "Ranges",
    "block_heads",
    "block_items",
    "block_rows",
    "encode_block",
    "fold_rows",
    "group_by_trace",
    "heads_and_rows",
    "merge_ranges",
    "skipped_positions",
    "split_fresh",
]

#: Sorted, disjoint, inclusive ``(lo, hi)`` seq ranges of one flow.
Ranges = list[tuple[int, int]]

_RUNTIME_LEN = 23

#: Most events in one block. Encoding or decoding a block is one C call that holds
#: the GIL (~1-2 us per event): 2,000 keeps it under ~5 ms, so the flow's event loop
#: is never held up longer by a store's worker thread, and a page of a trace decodes
#: little more than it needs; rows stay few (50 for a 100k-event trace).
BLOCK_EVENTS = 2000

# -- items ---------------------------------------------------------------------------------


def group_by_trace(items: Iterable[tuple[Any, ...]], *,
                   into: dict[Any, list[tuple[Any, ...]]] | None = None
                   ) -> dict[Any, list[tuple[Any, ...]]]:
    """``items`` per trace id (None for trace-less events), in order of first appearance;
    added to ``into`` when given (to group a batch a slice at a time)."""
    groups: dict[Any, list[tuple[Any, ...]]] = {} if into is None else into
    get = groups.get
    for item in items:
        group = get(item[0])
        if group is None:
            groups[item[0]] = [item]
        else:
            group.append(item)
    return groups


_ts_of = itemgetter(1)


def block_rows(groups: Mapping[Any, Sequence[tuple[Any, ...]]],
               folds: Mapping[Any, Sequence[Any]] | None = None,
               max_events: int = BLOCK_EVENTS
               ) -> list[tuple[Any, int, int, float, float, bytes]]:
    """The blocks of ``groups`` (see :func:`group_by_trace`), in order.

    Each is ``(trace_id, offset, n, ts_lo, ts_hi, data)``: ``offset`` is the index of
    its first event within its group, ``n`` its events (at most ``max_events``),
    ``ts_lo``/``ts_hi`` their earliest and latest ``ts``, ``data`` the encoded block.
    ``folds`` (fold_rows of the same items) spares finding the times of a group
    that fits one block.
    """
    rows: list[tuple[Any, int, int, float, float, bytes]] = []
    append = rows.append
    fold_of = (folds or {}).get
    for trace_id, group in groups.items():
        if len(group) <= max_events:  # the usual case: no slicing, times from the fold
            fold = fold_of(trace_id)
            if fold is None:
                stamps = list(map(_ts_of, group))
                append((trace_id, 0, len(group), min(stamps), max(stamps), encode_block(group)))
            else:
                append((trace_id, 0, len(group), fold[1], fold[2], encode_block(group)))
            continue
        for offset in range(0, len(group), max_events):
            chunk = group[offset:offset + max_events]
            stamps = list(map(_ts_of, chunk))
            append((trace_id, offset, len(chunk), min(stamps), max(stamps),
                    encode_block(chunk)))
    return rows


# -- encoding ------------------------------------------------------------------------------

# The only globals a block may name: constructors of plain data, called with plain
# data (what _Pickler's reductions below produce, and what pickle itself writes
# for complex numbers).
SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("builtins", name): getattr(builtins, name)
    for name in ("dict", "list", "tuple", "set", "frozenset", "str", "int", "float", "bool",
                 "bytes", "bytearray", "complex")
}
_SAFE_CALLABLES = frozenset(map(id, SAFE_GLOBALS.values()))
_PLAIN_BASES: tuple[tuple[type, Any], ...] = (
    (int, int), (float, float), (str, str), (bytes, bytes), (tuple, tuple), (list, list),
    (frozenset, frozenset), (set, set), (complex, complex),
)


def _plain(obj: Any) -> Any:
    """The reduction writing ``obj`` as plain data (see the module docstring)."""
    if isinstance(obj, Enum):  # before int/str: an IntEnum or StrEnum keeps its value
        value = obj.value
        if type(value) in (bool, int, float, str, bytes):
            return (type(value), (value,))
    elif isinstance(obj, Mapping):
        return (dict, (dict(obj),))
    else:
        for base, ctor in _PLAIN_BASES:
            if isinstance(obj, base):
                return (ctor, (ctor(obj),))
    try:
        text = str(obj)
    except Exception:  # a broken __str__ must not lose the event
        text = object.__repr__(obj)
    return (str, (text,))


class _Pickler(pickle.Pickler):
    # The C pickler calls reducer_override only for objects that are not of an
    # exact built-in type (dict, tuple, str, int, ... are written directly), so
    # plain events cost nothing here.
    def reducer_override(self, obj: Any) -> Any:
        if id(obj) in _SAFE_CALLABLES:
            return NotImplemented  # the constructors our reductions name
        return _plain(obj)


_head_of, _tail_of = itemgetter(slice(0, 14)), itemgetter(slice(14, None))


_local = threading.local()


def encode_block(items: Sequence[tuple[Any, ...]]) -> bytes:
    """``items`` (block tuples, see the module docstring) as one block's bytes.

    Runtime items alone (23 fields each): one pickle of the list. Otherwise two
    pickles back to back, with one memo: the items' first fourteen fields
    (``item[:14]``), then the rest (``item[14:]``: the payload alone, or the runtime
    columns and ``extra``). Either way what a writer needs to fold and deduplicate
    is in the first pickle, so it decodes only that (:func:`block_heads`): for a
    StoredEvent, the payload dict is most of the decoding. Never raises for odd
    values: what pickle cannot write even as plain data (a cycle through a
    replaced mapping, say) is written as its ``str()``, event by event.
    """
    # One pickler per thread, reset per block: building one per block cost ~0.3 us
    # per event of a 10-event block (measured).
    buffer: io.BytesIO
    pickler: _Pickler
    try:
        buffer, pickler = _local.pickler
    except AttributeError:
        buffer = io.BytesIO()
        pickler = _Pickler(buffer, 5)
        _local.pickler = buffer, pickler
    buffer.seek(0)
    buffer.truncate()
    pickler.clear_memo()
    try:
        if set(map(len, items)) == {_RUNTIME_LEN}:
            pickler.dump(items if type(items) is list else list(items))
        else:
            pickler.dump(list(map(_head_of, items)))
            pickler.dump(list(map(_tail_of, items)))
    except (pickle.PicklingError, TypeError, ValueError, RecursionError, AttributeError):
        del _local.pickler  # its state after a failed dump is not worth trusting
        return encode_block([_safe_item(item) for item in items])
    return buffer.getvalue()


BlockRow = tuple[Any, int, int, float, float, bytes]


def heads_and_rows(blocks: Sequence[bytes]
                   ) -> tuple[list[tuple[Any, ...]], list[BlockRow]]:
    """The heads of a writer process's blocks (see :func:`block_heads`), in order, and
    each block's row ``(trace_id, offset, n, ts_lo, ts_hi, data)`` as
    :func:`block_rows` gives it (``offset`` counted over the blocks of its trace)."""
    heads: list[tuple[Any, ...]] = []
    rows: list[BlockRow] = []
    offsets: dict[Any, int] = {}
    for data in blocks:
        block = block_heads(data)
        trace_id = block[0][0]
        offset = offsets.get(trace_id, 0)
        offsets[trace_id] = offset + len(block)
        stamps = list(map(_ts_of, block))
        rows.append((trace_id, offset, len(block), min(stamps), max(stamps), data))
        heads += block
    return heads, rows


def block_heads(data: bytes) -> list[tuple[Any, ...]]:
    """At least the first fourteen fields of a block's items (see :func:`encode_block`).

    For blocks this process (or its parent) just encoded: not restricted to plain
    data, unlike the readers' ``decode_block``.
    """
    heads: list[tuple[Any, ...]] = pickle.loads(data)  # stops at the first pickle's end
    return heads


def block_items(data: bytes) -> list[tuple[Any, ...]]:
    """A block's whole items (see :func:`block_heads` for which blocks)."""
    unpickler = pickle.Unpickler(io.BytesIO(data))
    heads: list[tuple[Any, ...]] = unpickler.load()
    if heads and len(heads[0]) == _RUNTIME_LEN:
        return heads
    return list(map(add, heads, unpickler.load()))


def _safe_item(item: tuple[Any, ...]) -> tuple[Any, ...]:
    try:
        _Pickler(io.BytesIO(), 5).dump(item)
        return item
    except (pickle.PicklingError, TypeError, ValueError, RecursionError, AttributeError):
        pass
    # Keep the ids and stamps (plain), replace the odd extra or payload by its text.
    head = tuple(v if type(v) in (str, int, float, bool, tuple) or v is None else str(v)
                 for v in item[:14])
    if len(item) == _RUNTIME_LEN:
        return (*head, *item[14:22], {"unserialisable_extra": _text(item[22])})
    return (*head, {"unserialisable_payload": _text(item[14])})


def _text(value: Any) -> str:
    try:
        return repr(value)
    except Exception:
        return object.__repr__(value)


def fold_rows(rows: Iterable[tuple[Any, ...]], trace: int, ts: int, kind: int, node: int,
              attempt: int, flow_name: int, *, terminal: frozenset[str],
              errors: frozenset[str],
              groups: dict[Any, list[tuple[Any, ...]]] | None = None) -> dict[Any, list[Any]]:
    """Per trace id (in order of first event), the summary of ``rows``.

    Both durable stores keep one summary row per trace and fold each batch's newly
    stored events into it, here, in Python: folding in SQL (a GROUP BY over the
    batch's new rows, with sub-queries for the flow name and node set) cost ~4-5 us
    per event on the 2-core CI machine, this ~0.5-1 us, and only one row per trace
    reaches the database. Semantics are TraceSummaryBuilder's (tests/exporters
    compare the stores with InMemoryStateStore).

    The other arguments are the positions of those fields in a row. Rows without a
    trace id are skipped. Each value is ``[flow_name, started, ended, starts, errors,
    remotes, events, open, failed, cancelled, nodes]`` (``nodes`` a set).

    ``terminal`` and ``errors`` are the core's kinds that end an invocation and
    that count as errors (``penguiflow.state``; passed in, so that this module
    imports nothing from penguiflow).

    ``groups``, when given (empty), also receives the rows per trace id, in order,
    trace-less ones under None: the grouping costs a list append in the same pass.
    """
    folds: dict[Any, list[Any]] = {}
    get = folds.get
    for row in rows:
        trace_id = row[trace]
        if trace_id is None:
            if groups is not None:
                groups.setdefault(None, []).append(row)
            continue
        t, k = row[ts], row[kind]
        f = get(trace_id)
        if f is None:
            f = folds[trace_id] = [row[flow_name], t, t, 0, 0, 0, 1, 0, False, False, set()]
            if groups is not None:
                groups[trace_id] = [row]
        else:
            if groups is not None:
                groups[trace_id].append(row)
            f[6] += 1
            if t < f[1]:
                f[1] = t
            if t > f[2]:
                f[2] = t
            if f[0] is None:
                f[0] = row[flow_name]
        if k == "node_start":
            if row[attempt] == 0:
                f[3] += 1
                f[7] += 1
            name = row[node]
            if name:
                f[10].add(name)
        elif k in terminal:
            f[7] -= 1
            if k == "node_failed":  # the one kind both terminal and an error
                f[8] = True
                f[4] += 1
        elif k in errors:
            f[4] += 1
        elif k == "trace_cancel_start":
            f[9] = True
        elif k == "remote_call_start":
            f[5] += 1
    return folds


# -- idempotency ---------------------------------------------------------------------------


_flow_of, _seq_of = itemgetter(13), itemgetter(9)


def split_fresh(items: Sequence[tuple[Any, ...]], stored: Mapping[Any, Ranges]
                ) -> tuple[Sequence[tuple[Any, ...]], dict[Any, Ranges]]:
    """The items of ``items`` not stored yet, and each touched flow's new ranges.

    ``stored`` maps flow ids to the ranges already stored (missing: none). An
    item is dropped when its ``(flow_id, seq)`` is in those ranges or came earlier
    in ``items``; items without a flow id are always kept. The ranges returned
    (for every flow id in ``items``) include the kept items' seqs.
    """
    by_flow: dict[Any, list[int]] = {}
    flows = set(map(_flow_of, items))
    if len(flows) == 1:  # the usual batch: one runtime's events, collected in C
        (flow,) = flows
        if flow is not None:
            by_flow[flow] = list(map(_seq_of, items))
    else:
        get = by_flow.get
        for item in items:
            flow = item[13]
            if flow is not None:
                seqs = get(flow)
                if seqs is None:
                    by_flow[flow] = [item[9]]
                else:
                    seqs.append(item[9])
    clean = True
    for flow, seqs in by_flow.items():
        ranges = stored.get(flow)
        if len(set(seqs)) != len(seqs) or (ranges and min(seqs) <= ranges[-1][1]
                                           and _any_in(ranges, seqs)):
            clean = False
            break
    fresh: Sequence[tuple[Any, ...]] = items
    if not clean:  # the rare re-delivery: filter event by event
        fresh, seen = [], set()
        by_flow = {}
        for item in items:
            flow = item[13]
            if flow is not None:
                key = (flow, item[9])
                if key in seen or _in(stored.get(flow), item[9]):
                    continue
                seen.add(key)
                by_flow.setdefault(flow, []).append(item[9])
            fresh.append(item)
    return fresh, {flow: merge_ranges(stored.get(flow) or [], seqs)
                   for flow, seqs in by_flow.items()}


def skipped_positions(items: Sequence[Any], fresh: Sequence[Any]) -> list[int]:
    """Positions of the items of ``items`` not in ``fresh`` (what split_fresh kept: a
    subsequence of it, by identity; an object buffered twice is kept at its first
    position only)."""
    skipped: list[int] = []
    j, end = 0, len(fresh)
    for i, item in enumerate(items):
        if j < end and fresh[j] is item:
            j += 1
        else:
            skipped.append(i)
    return skipped


def _in(ranges: Ranges | None, seq: int) -> bool:
    if not ranges:
        return False
    i = bisect_right(ranges, (seq, float("inf"))) - 1
    return i >= 0 and ranges[i][0] <= seq <= ranges[i][1]


def _any_in(ranges: Ranges, seqs: Iterable[int]) -> bool:
    return any(_in(ranges, seq) for seq in seqs)


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
