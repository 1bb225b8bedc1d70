"""Event blocks, the readers' side: StoredEvents in, block tuples, StoredEvents out.

The block format, its encoding and the write-side helpers are in _batch.py
(stdlib only, shared with the SQLite writer process); they are re-exported here.
Reading is restricted to plain data: a block that names anything else (tampered
with, or written by another tool) is refused with :class:`StateStoreError`, never
executed.
"""

from __future__ import annotations

import asyncio
import io
import pickle
from collections.abc import Callable, Iterable, Mapping
from operator import add, attrgetter
from typing import Any

from penguiflow.metrics import event_payload
from penguiflow.state import StateStoreError, StoredEvent

from ._batch import (
    _RUNTIME_LEN,
    BLOCK_EVENTS,
    SAFE_GLOBALS,
    Ranges,
    block_items,
    block_rows,
    encode_block,
    group_by_trace,
    merge_ranges,
    split_fresh,
)
from ._gc import gc_paused

__all__ = [
    "BLOCK_EVENTS",
    "Ranges",
    "Sealed",
    "block_rows",
    "decode_block",
    "encode_block",
    "events_of",
    "expand",
    "group_by_trace",
    "kept_items",
    "merge_ranges",
    "split_fresh",
    "stored_item",
    "writer_payload",
]

_NO_EXTRA: Mapping[str, Any] = {}

#: The 15-item block tuple of a StoredEvent (positions 0-13 as EVENT_FIELDS, the
#: payload at 14): one C-level call per event (attrgetter builds the tuple).
stored_item: Callable[[StoredEvent], tuple[Any, ...]] = attrgetter(
    "trace_id", "ts", "kind", "node_name", "node_id", "invocation_id",
    "parent_invocation_ids", "span_id", "parent_span_id", "seq", "attempt", "queued_ts",
    "flow_name", "flow_id", "payload")


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return SAFE_GLOBALS[module, name]
        except KeyError:
            raise pickle.UnpicklingError(
                f"a block names {module}.{name}; stores only write plain data") from None


def decode_block(data: bytes | bytearray | memoryview) -> list[tuple[Any, ...]]:
    """A block's item tuples.

    Raises:
        StateStoreError: the bytes are not a block this module wrote (corrupt,
            truncated, or naming anything but plain data).
    """
    try:
        unpickler = _Unpickler(io.BytesIO(data))
        heads = unpickler.load()
        if type(heads) is list and heads and type(heads[0]) is tuple and len(
                heads[0]) == _RUNTIME_LEN:
            return heads  # runtime items alone: one pickle (see encode_block)
        tails = unpickler.load()
    except Exception as exc:
        raise StateStoreError(f"corrupt event block ({type(exc).__name__}: {exc})") from exc
    if type(heads) is not list or type(tails) is not list or len(heads) != len(tails):
        raise StateStoreError("corrupt event block (not two lists of one length)")
    try:
        return list(map(add, heads, tails))
    except TypeError as exc:
        raise StateStoreError(f"corrupt event block ({exc})") from exc


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


class Sealed:
    """Runtime tuples already encoded, as one chunk of a writer process's payload.

    A store feeding a writer process seals the runtime's tuples a few hundred at a
    time as they arrive (BufferedStore), so the flow's process encodes them while
    they are still in the CPU's cache and frees them at once: ~1.7 us less per hop
    of the chain N=5 benchmark than buffering ~10,000 tuples and encoding them in
    a batch (measured, SQLite). ``data`` is :func:`encode_block` of the tuples,
    which the writer decodes as it decodes any chunk; ``n`` is how many they are.
    """

    __slots__ = ("data", "n")

    def __init__(self, items: list[tuple[Any, ...]]) -> None:
        self.data = encode_block(items)
        self.n = len(items)


def expand(batch: list[Any]) -> list[Any]:
    """``batch`` with each :class:`Sealed` replaced by its tuples, in order (``batch``
    itself when it holds none): for whatever reads events one by one in this
    process (an in-process writer, followers, a re-delivery's positions)."""
    if Sealed not in set(map(type, batch)):
        return batch
    items: list[Any] = []
    with gc_paused():
        for item in batch:
            if type(item) is Sealed:
                items += block_items(item.data)
            else:
                items.append(item)
    return items


def kept_items(batch: list[Any], skipped: list[int] | None, *, grouped: bool) -> list[Any]:
    """The items of ``batch`` a writer stored, in batch order, given the positions of
    those it skipped (already stored): positions in ``batch`` (each Sealed counting
    as its tuples), or (``grouped``) in the order the batch's blocks hold them
    (grouped by trace, see group_by_trace). With nothing skipped, ``batch`` itself
    (Sealed included)."""
    if not skipped:
        return batch
    batch = expand(batch)
    if grouped:
        positions: dict[Any, list[int]] = {}
        for i, item in enumerate(batch):
            trace_id = item[0] if isinstance(item, tuple) else item.trace_id
            positions.setdefault(trace_id, []).append(i)
        order = [i for group in positions.values() for i in group]
        dropped = {order[i] for i in skipped}
    else:
        dropped = set(skipped)
    return [item for i, item in enumerate(batch) if i not in dropped]


# Events encoded between two yields to the event loop (1-3 ms of work).
_SLICE = 1000


async def writer_payload(batch: list[Any]) -> tuple[bytes, bool]:
    """``batch`` (StoredEvents, the runtime's EVENT_FIELDS tuples, Sealed chunks of
    them) pickled for a store's writer process, and whether it went as blocks
    (``grouped``).

    The runtime's tuples alone (its fast path) go as encoded slices of the batch,
    which the writer groups, folds and encodes: Sealed chunks as they are (usually
    the whole batch), tuples encoded here (~0.9 us per event, against ~1.5 to group
    and encode blocks, measured). Otherwise (an import, a replay) the
    batch is grouped by trace and encoded into blocks here, so the writer only
    decodes their heads; positions the writer reports are then the blocks' (see
    kept_items). Runs on the event loop, yielding every ~1,000 events; the GC is
    paused throughout, so the collector never traverses the batch's tuples (with a
    large heap, the collections they set off cost more than encoding them).
    """
    with gc_paused():
        types = set(map(type, batch))
        if types == {Sealed}:  # sealed as they came: nothing left to encode
            return pickle.dumps((False, [item.data for item in batch]), 5), False
        if Sealed in types:  # with tuples from before sealing began, or StoredEvents
            batch = expand(batch)
            types = set(map(type, batch))
        if types == {tuple}:
            chunks: list[bytes] = []
            for start in range(0, len(batch), BLOCK_EVENTS):
                if start:
                    await asyncio.sleep(0)
                chunks.append(encode_block(batch[start:start + BLOCK_EVENTS]))
            return pickle.dumps((False, chunks), 5), False
        groups: dict[Any, list[tuple[Any, ...]]] = {}
        mixed = tuple in types
        for start in range(0, len(batch), _SLICE):
            if start:
                await asyncio.sleep(0)
            part = batch[start:start + _SLICE]
            # StoredEvents alone (an import): converted by a C-level map rather than a
            # generator testing each item's type.
            group_by_trace((item if isinstance(item, tuple) else stored_item(item)
                            for item in part) if mixed else map(stored_item, part),
                           into=groups)
        blocks: list[bytes] = []
        encoded = 0
        for group in groups.values():
            for start in range(0, len(group), BLOCK_EVENTS):
                chunk = group[start:start + BLOCK_EVENTS]
                blocks.append(encode_block(chunk))
                encoded += len(chunk)
                if encoded >= _SLICE:
                    await asyncio.sleep(0)
                    encoded = 0
        del groups
        return pickle.dumps((True, blocks), 5), True
