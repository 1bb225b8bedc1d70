"""FlowEvent: the one record every observer (logs, stores, spans, middlewares) sees.

The spec's fields come first, in the spec's order. Fields after ``extra`` are
PenguiFlow additions: keyword-only with defaults, so 2.1 code that builds or
reads events is unaffected. They carry the ids of
``docs/concepts/events.md`` so that a trace can be rebuilt from stored events
alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from .errors import safe_str

if TYPE_CHECKING:
    from .state import EventRecord

__all__ = ["FlowEvent"]

_EMPTY: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class FlowEvent:
    """An immutable runtime event.

    ``extra`` is stored as a read-only mapping proxy over a copy of what was
    passed. The keyword-only fields are PenguiFlow's additions:

    Attributes:
        invocation_id: the node invocation this event belongs to (16 hex; the
            node span's span id), or None for events outside an invocation.
        parent_invocation_ids: the invocation(s) whose output this invocation
            consumed; empty when the input came from OpenSea.
        span_id: the OTel span id the event belongs to (the invocation's, or the
            trace's root span for trace-level events).
        parent_span_id: the parent span's id (the root span for a node span).
        seq: a per-flow, strictly increasing event number (total order).
        queued_ts: wall-clock time (epoch s) at which the invocation's input was
            put on its floe, when known.
        flow_name: the name of the flow that emitted the event.
        flow_id: random id of the emitting PenguiFlow instance (``(flow_id,
            seq)`` identifies the event).
    """

    event_type: str
    ts: float
    node_name: str | None
    node_id: str | None
    trace_id: str | None
    attempt: int
    latency_ms: float | None
    queue_depth_in: int
    queue_depth_out: int
    outgoing_edges: int
    queue_maxsize: int
    trace_pending: int | None
    trace_inflight: int
    trace_cancelled: bool
    extra: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)
    invocation_id: str | None = field(default=None, kw_only=True)
    parent_invocation_ids: tuple[str, ...] = field(default=(), kw_only=True)
    span_id: str | None = field(default=None, kw_only=True)
    parent_span_id: str | None = field(default=None, kw_only=True)
    seq: int = field(default=0, kw_only=True)
    queued_ts: float | None = field(default=None, kw_only=True)
    flow_name: str | None = field(default=None, kw_only=True)
    flow_id: str | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        extra = self.extra
        if extra is not _EMPTY:
            # Always a copy: the caller's dict may change after the event is built.
            object.__setattr__(self, "extra", MappingProxyType(dict(extra)) if extra else _EMPTY)

    @property
    def queue_depth(self) -> int:
        """``queue_depth_in + queue_depth_out``."""
        return self.queue_depth_in + self.queue_depth_out

    def to_payload(self) -> dict[str, Any]:
        """Return the spec's flat dict (extra items merged last; extra keys win)."""
        return event_payload(
            self.event_type, self.ts, self.node_name, self.node_id, self.trace_id,
            self.latency_ms, self.queue_depth_in, self.queue_depth_out, self.outgoing_edges,
            self.queue_maxsize, self.attempt, self.trace_inflight, self.trace_cancelled,
            self.trace_pending, self.extra,
        )

    def metric_samples(self) -> dict[str, float]:
        """Return numeric samples; ``extra["latency_ms"]`` overrides ``latency_ms``."""
        samples = {
            "queue_depth_in": float(self.queue_depth_in),
            "queue_depth_out": float(self.queue_depth_out),
            "queue_depth_total": float(self.queue_depth_in + self.queue_depth_out),
            "attempt": float(self.attempt),
            "trace_inflight": float(self.trace_inflight),
            "trace_cancelled": 1.0 if self.trace_cancelled else 0.0,
        }
        if self.trace_pending is not None:
            samples["trace_pending"] = float(self.trace_pending)
        if self.latency_ms is not None:
            samples["latency_ms"] = float(self.latency_ms)
        if "latency_ms" in self.extra:
            # A non-numeric extra latency is a label, not a sample.
            with contextlib.suppress(TypeError, ValueError):
                samples["latency_ms"] = float(self.extra["latency_ms"])
        return samples

    def tag_values(self) -> dict[str, str]:
        """Return string tags: the kind, the set ids, and scalar extra items."""
        tags = {"event_type": self.event_type}
        if self.node_name is not None:
            tags["node_name"] = self.node_name
        if self.node_id is not None:
            tags["node_id"] = self.node_id
        if self.trace_id is not None:
            tags["trace_id"] = self.trace_id
        for key, value in self.extra.items():
            if isinstance(value, str | int | float | bool):
                # safe_str: a str/int subclass's own __str__ may raise.
                tags[key] = value if type(value) is str else safe_str(value)
        return tags

    def ids(self) -> dict[str, Any]:
        """Return PenguiFlow's additional ids as a dict (what stores persist)."""
        return {
            "invocation_id": self.invocation_id,
            "parent_invocation_ids": list(self.parent_invocation_ids),
            "span_id": self.span_id,
            "parent_span_id": self.parent_span_id,
            "seq": self.seq,
            "queued_ts": self.queued_ts,
            "flow_name": self.flow_name,
            "flow_id": self.flow_id,
        }


def event_payload(
    event_type: str, ts: float, node_name: str | None, node_id: str | None,
    trace_id: str | None, latency_ms: float | None, queue_depth_in: int, queue_depth_out: int,
    outgoing_edges: int, queue_maxsize: int, attempt: int, trace_inflight: int,
    trace_cancelled: bool, trace_pending: int | None, extra: Mapping[str, Any],
) -> dict[str, Any]:
    """The ``to_payload()`` dict from its parts (shared with the runtime's store path)."""
    payload: dict[str, Any] = {
        "ts": ts,
        "event": event_type,
        "node_name": node_name,
        "node_id": node_id,
        "trace_id": trace_id,
        "latency_ms": latency_ms,
        "q_depth_in": queue_depth_in,
        "q_depth_out": queue_depth_out,
        "q_depth_total": queue_depth_in + queue_depth_out,
        "outgoing": outgoing_edges,
        "queue_maxsize": queue_maxsize,
        "attempt": attempt,
        "trace_inflight": trace_inflight,
        "trace_cancelled": trace_cancelled,
    }
    if trace_pending is not None:
        payload["trace_pending"] = trace_pending
    if extra:
        payload.update(extra)
    return payload


# The runtime builds two events per hop when anyone listens; the dataclass's
# frozen __init__ (object.__setattr__ per field) costs ~1.9 µs, setting the slots
# through their descriptors ~0.8 µs. Same object, same invariants: ``extra`` must
# already be a read-only mapping (the runtime passes ``_EMPTY`` or a fresh proxy).
_new = object.__new__


def _slot_setter(name: str) -> Callable[[FlowEvent, Any], None]:
    # The slot's member descriptor writes straight into the instance, bypassing
    # the frozen dataclass's __setattr__.
    setter: Callable[[FlowEvent, Any], None] = vars(FlowEvent)[name].__set__
    return setter

_set_event_type = _slot_setter("event_type")
_set_ts = _slot_setter("ts")
_set_node_name = _slot_setter("node_name")
_set_node_id = _slot_setter("node_id")
_set_trace_id = _slot_setter("trace_id")
_set_attempt = _slot_setter("attempt")
_set_latency_ms = _slot_setter("latency_ms")
_set_queue_depth_in = _slot_setter("queue_depth_in")
_set_queue_depth_out = _slot_setter("queue_depth_out")
_set_outgoing_edges = _slot_setter("outgoing_edges")
_set_queue_maxsize = _slot_setter("queue_maxsize")
_set_trace_pending = _slot_setter("trace_pending")
_set_trace_inflight = _slot_setter("trace_inflight")
_set_trace_cancelled = _slot_setter("trace_cancelled")
_set_extra = _slot_setter("extra")
_set_invocation_id = _slot_setter("invocation_id")
_set_parent_invocation_ids = _slot_setter("parent_invocation_ids")
_set_span_id = _slot_setter("span_id")
_set_parent_span_id = _slot_setter("parent_span_id")
_set_seq = _slot_setter("seq")
_set_queued_ts = _slot_setter("queued_ts")
_set_flow_name = _slot_setter("flow_name")
_set_flow_id = _slot_setter("flow_id")


def make_event(
    event_type: str, ts: float, node_name: str | None, node_id: str | None,
    trace_id: str | None, attempt: int, latency_ms: float | None, queue_depth_in: int,
    queue_depth_out: int, outgoing_edges: int, queue_maxsize: int,
    trace_pending: int | None, trace_inflight: int, trace_cancelled: bool,
    extra: Mapping[str, Any], invocation_id: str | None,
    parent_invocation_ids: tuple[str, ...], span_id: str | None, parent_span_id: str | None,
    seq: int, queued_ts: float | None, flow_name: str | None, flow_id: str | None = None,
) -> FlowEvent:
    """Build a FlowEvent without the dataclass ``__init__`` (runtime-internal).

    ``extra`` must already be a read-only mapping that nobody else mutates.
    """
    ev: FlowEvent = _new(FlowEvent)
    _set_event_type(ev, event_type)
    _set_ts(ev, ts)
    _set_node_name(ev, node_name)
    _set_node_id(ev, node_id)
    _set_trace_id(ev, trace_id)
    _set_attempt(ev, attempt)
    _set_latency_ms(ev, latency_ms)
    _set_queue_depth_in(ev, queue_depth_in)
    _set_queue_depth_out(ev, queue_depth_out)
    _set_outgoing_edges(ev, outgoing_edges)
    _set_queue_maxsize(ev, queue_maxsize)
    _set_trace_pending(ev, trace_pending)
    _set_trace_inflight(ev, trace_inflight)
    _set_trace_cancelled(ev, trace_cancelled)
    _set_extra(ev, extra)
    _set_invocation_id(ev, invocation_id)
    _set_parent_invocation_ids(ev, parent_invocation_ids)
    _set_span_id(ev, span_id)
    _set_parent_span_id(ev, parent_span_id)
    _set_seq(ev, seq)
    _set_queued_ts(ev, queued_ts)
    _set_flow_name(ev, flow_name)
    _set_flow_id(ev, flow_id)
    return ev


def event_from_fields(fields: EventRecord) -> FlowEvent:
    """The FlowEvent of an EventRecord (``penguiflow.state``; runtime-internal).

    ``extra`` may be None (no extra items) or a read-only mapping nobody mutates.
    """
    (trace_id, ts, kind, node_name, node_id, invocation_id, parents, span_id, parent_span_id,
     seq, attempt, queued_ts, flow_name, flow_id, latency_ms, q_in, q_out, outgoing, maxsize,
     inflight, cancelled, pending, extra) = fields
    return make_event(kind, ts, node_name, node_id, trace_id, attempt, latency_ms, q_in, q_out,
                      outgoing, maxsize, pending, inflight, cancelled,
                      _EMPTY if extra is None else extra, invocation_id, parents, span_id,
                      parent_span_id, seq, queued_ts, flow_name, flow_id)
