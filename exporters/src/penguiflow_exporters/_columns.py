"""Runtime columns from a StoredEvent's payload: the inverse of ``event_payload``.

The stores keep the runtime's fields (latency, queue depths, trace accounting)
as columns and only the kind-specific ``extra`` items as JSON; a payload is
rebuilt on read with :func:`penguiflow.metrics.event_payload`. Events from the
runtime arrive as tuples and are columnar already. A ``StoredEvent`` handed to
``save_event`` (an import, a replay, another runtime) has a whole payload dict:
:func:`runtime_columns` splits it when, and only when, rebuilding gives the very
same payload back; anything else is stored whole, so nothing is ever altered.

Why: JSON-encoding the whole payload was the largest Python cost of ingesting
StoredEvents (~9 µs of ~30 µs per event on Postgres, measured); splitting costs
a few dict lookups and encodes only the extras, usually none.
"""

from __future__ import annotations

from typing import Any

from penguiflow.state import StoredEvent

__all__ = ["runtime_columns"]

_STANDARD = frozenset({
    "ts", "event", "node_name", "node_id", "trace_id", "latency_ms", "q_depth_in",
    "q_depth_out", "q_depth_total", "outgoing", "queue_maxsize", "attempt", "trace_inflight",
    "trace_cancelled", "trace_pending",
})


def runtime_columns(ev: StoredEvent) -> tuple[Any, ...] | None:
    """``(latency_ms, q_in, q_out, outgoing, maxsize, inflight, cancelled, pending, extra)``
    of ``ev``'s payload, or None when the payload is not exactly a runtime payload.

    ``extra`` is a dict of the remaining items (possibly empty).
    """
    p = ev.payload
    try:
        q_in = p["q_depth_in"]
        q_out = p["q_depth_out"]
        outgoing = p["outgoing"]
        maxsize = p["queue_maxsize"]
        inflight = p["trace_inflight"]
        cancelled = p["trace_cancelled"]
        latency = p["latency_ms"]
        if (p["ts"] != ev.ts or p["event"] != ev.kind or p["node_name"] != ev.node_name
                or p["node_id"] != ev.node_id or p["trace_id"] != ev.trace_id
                or p["attempt"] != ev.attempt or type(p["attempt"]) is not int):
            return None
    except (KeyError, TypeError):
        return None
    # Exact types only: the columns give back ints, a bool and a float or None.
    if (type(q_in) is not int or type(q_out) is not int or type(outgoing) is not int
            or type(maxsize) is not int or type(inflight) is not int
            or type(cancelled) is not bool or p["q_depth_total"] != q_in + q_out
            or not (latency is None or type(latency) is float)):
        return None
    pending = p.get("trace_pending")
    if (pending is None and "trace_pending" in p) or (
            pending is not None and type(pending) is not int):
        return None  # an explicit None is not rebuilt (the runtime omits the key)
    # 14 standard keys, 15 with trace_pending: only longer payloads have extras.
    extra: dict[str, Any] = {k: v for k, v in p.items() if k not in _STANDARD} \
        if len(p) > (14 if pending is None else 15) else {}
    return latency, q_in, q_out, outgoing, maxsize, inflight, cancelled, pending, extra
