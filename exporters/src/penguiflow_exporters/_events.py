"""Stored rows back to StoredEvents: the readers' side of the blocks (see _block_read.py)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from penguiflow.metrics import event_payload
from penguiflow.state import StoredEvent

from ._records import BlockError, Row

__all__ = ["events_of"]

_NO_EXTRA: Mapping[str, Any] = {}


def events_of(rows: Iterable[Row]) -> list[StoredEvent]:
    """StoredEvents of rows, every field restored.

    A runtime row (``payload`` None) gets the payload the runtime's
    ``FlowEvent.to_payload()`` would have built from its columns.

    Raises:
        BlockError: a row's runtime columns are not what the runtime writes.
    """
    events: list[StoredEvent] = []
    append = events.append
    for row in rows:
        payload: Any = row.payload
        if payload is None:
            try:
                payload = event_payload(
                    row.kind, row.ts, row.node_name, row.node_id, row.trace_id,
                    row.latency_ms, row.queue_depth_in, row.queue_depth_out,
                    row.outgoing_edges, row.queue_maxsize, row.attempt, row.trace_inflight,
                    row.trace_cancelled, row.trace_pending, row.extra or _NO_EXTRA)
            except (TypeError, ValueError, AttributeError) as exc:
                raise BlockError(f"corrupt event block (a runtime event: {exc})") from exc
        elif type(payload) is not dict:
            raise BlockError("corrupt event block (a payload that is not an object)")
        append(StoredEvent(
            row.trace_id, row.ts, row.kind, row.node_name, row.node_id, payload,
            invocation_id=row.invocation_id, parent_invocation_ids=row.parent_invocation_ids,
            span_id=row.span_id, parent_span_id=row.parent_span_id, seq=row.seq,
            attempt=row.attempt, queued_ts=row.queued_ts, flow_name=row.flow_name,
            flow_id=row.flow_id))
    return events
