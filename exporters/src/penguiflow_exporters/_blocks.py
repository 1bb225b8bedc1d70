"""Event blocks: how the durable stores (schema 4) keep events, several to a row.

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
  (a dict) at position 14 (:func:`stored_item`).

Encoding. ``pickle`` protocol 5: ~0.3-0.8 us per event to encode and ~0.7 to
decode, against ~5.7 and ~4.6 for JSON on the CI machine, and half the bytes
(repeated strings are written once per block). Only plain data is written:
anything else (a read-only mapping, an enum, a user object in ``extra``) is
replaced on the way in by its plain equivalent (dict, int, str, ...) or by its
``str()``, as the JSON stores did. Reading is restricted to those types: a block
that names anything else (tampered with, or written by another tool) is refused
with :class:`StateStoreError`, never executed. The flip side: blocks are opaque
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
from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from enum import Enum
from operator import itemgetter
from typing import Any

from penguiflow.metrics import event_payload
from penguiflow.state import StateStoreError, StoredEvent

__all__ = [
    "Ranges",
    "decode_block",
    "encode_block",
    "events_of",
    "group_by_trace",
    "merge_ranges",
    "split_fresh",
    "stored_item",
]

#: Sorted, disjoint, inclusive ``(lo, hi)`` seq ranges of one flow.
Ranges = list[tuple[int, int]]

_NO_EXTRA: Mapping[str, Any] = {}
_RUNTIME_LEN = 23

# -- items ---------------------------------------------------------------------------------


def stored_item(ev: StoredEvent) -> tuple[Any, ...]:
    """The 15-item block tuple of a StoredEvent (positions 0-13 as EVENT_FIELDS)."""
    return (ev.trace_id, ev.ts, ev.kind, ev.node_name, ev.node_id, ev.invocation_id,
            ev.parent_invocation_ids, ev.span_id, ev.parent_span_id, ev.seq, ev.attempt,
            ev.queued_ts, ev.flow_name, ev.flow_id, ev.payload)


def group_by_trace(items: Iterable[tuple[Any, ...]]) -> dict[Any, list[tuple[Any, ...]]]:
    """``items`` per trace id (None for trace-less events), in order of first appearance."""
    groups: dict[Any, list[tuple[Any, ...]]] = {}
    get = groups.get
    for item in items:
        group = get(item[0])
        if group is None:
            groups[item[0]] = [item]
        else:
            group.append(item)
    return groups


# -- encoding ------------------------------------------------------------------------------

# The only globals a block may name: constructors of plain data, called with plain
# data (what _Pickler's reductions below produce, and what pickle itself writes
# for complex numbers).
_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("builtins", name): getattr(builtins, name)
    for name in ("dict", "list", "tuple", "set", "frozenset", "str", "int", "float", "bool",
                 "bytes", "bytearray", "complex")
}
_SAFE_CALLABLES = frozenset(map(id, _SAFE_GLOBALS.values()))
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


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _SAFE_GLOBALS[module, name]
        except KeyError:
            raise pickle.UnpicklingError(
                f"a block names {module}.{name}; stores only write plain data") from None


def encode_block(items: Sequence[tuple[Any, ...]]) -> bytes:
    """``items`` (block tuples, see the module docstring) as one block's bytes.

    Never raises for odd values: what pickle cannot write even as plain data (a
    cycle through a replaced mapping, say) is written as its ``str()``, event by
    event.
    """
    buffer = io.BytesIO()
    try:
        _Pickler(buffer, 5).dump(items)
    except (pickle.PicklingError, TypeError, ValueError, RecursionError, AttributeError):
        return encode_block([_safe_item(item) for item in items])
    return buffer.getvalue()


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


def decode_block(data: bytes | bytearray | memoryview) -> list[tuple[Any, ...]]:
    """A block's item tuples.

    Raises:
        StateStoreError: the bytes are not a block this module wrote (corrupt,
            truncated, or naming anything but plain data).
    """
    try:
        items = _Unpickler(io.BytesIO(data)).load()
    except Exception as exc:
        raise StateStoreError(f"corrupt event block ({type(exc).__name__}: {exc})") from exc
    if type(items) is not list:
        raise StateStoreError(f"corrupt event block (a {type(items).__name__}, not a list)")
    return items


def events_of(items: Iterable[tuple[Any, ...]]) -> list[StoredEvent]:
    """StoredEvents of block tuples, every field restored (payloads as dicts).

    Raises:
        StateStoreError: an item has neither layout.
    """
    events: list[StoredEvent] = []
    append = events.append
    payload_of, no_extra = event_payload, _NO_EXTRA
    try:
        for item in items:
            if len(item) == _RUNTIME_LEN:
                (trace_id, ts, kind, node_name, node_id, invocation_id, parents, span_id,
                 parent_span_id, seq, attempt, queued_ts, flow_name, flow_id, latency_ms, q_in,
                 q_out, outgoing, maxsize, inflight, cancelled, pending, extra) = item
                payload: Any = payload_of(kind, ts, node_name, node_id, trace_id, latency_ms,
                                          q_in, q_out, outgoing, maxsize, attempt, inflight,
                                          cancelled, pending, extra or no_extra)
            else:
                (trace_id, ts, kind, node_name, node_id, invocation_id, parents, span_id,
                 parent_span_id, seq, attempt, queued_ts, flow_name, flow_id, payload) = item
            append(StoredEvent(
                trace_id, ts, kind, node_name, node_id, payload, invocation_id=invocation_id,
                parent_invocation_ids=parents if type(parents) is tuple else tuple(parents or ()),
                span_id=span_id, parent_span_id=parent_span_id, seq=seq, attempt=attempt,
                queued_ts=queued_ts, flow_name=flow_name, flow_id=flow_id))
    except (TypeError, ValueError) as exc:
        raise StateStoreError(f"corrupt event block (an event of {len(item)} fields: "
                              f"{exc})") from exc
    return events


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
