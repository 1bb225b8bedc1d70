"""StateStore hooks: persisted events and remote bindings (spec §15.1)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .metrics import FlowEvent

__all__ = ["RemoteBinding", "StateStore", "StoredEvent"]


@dataclass(slots=True)
class StoredEvent:
    """A FlowEvent as persisted: the spec's six fields plus PenguiFlow's ids.

    The keyword-only fields mirror :class:`~penguiflow.metrics.FlowEvent`'s
    additions so that a store can rebuild spans and waterfalls without the
    runtime.
    """

    trace_id: str | None
    ts: float
    kind: str
    node_name: str | None
    node_id: str | None
    payload: Mapping[str, Any]
    invocation_id: str | None = field(default=None, kw_only=True)
    parent_invocation_ids: tuple[str, ...] = field(default=(), kw_only=True)
    span_id: str | None = field(default=None, kw_only=True)
    parent_span_id: str | None = field(default=None, kw_only=True)
    seq: int = field(default=0, kw_only=True)
    attempt: int = field(default=0, kw_only=True)
    queued_ts: float | None = field(default=None, kw_only=True)
    flow_name: str | None = field(default=None, kw_only=True)

    @classmethod
    def from_flow_event(cls, ev: FlowEvent) -> StoredEvent:
        """Convert a FlowEvent: ``kind`` = event type, ``payload`` = ``to_payload()``."""
        return cls(
            trace_id=ev.trace_id,
            ts=ev.ts,
            kind=ev.event_type,
            node_name=ev.node_name,
            node_id=ev.node_id,
            payload=ev.to_payload(),
            invocation_id=ev.invocation_id,
            parent_invocation_ids=ev.parent_invocation_ids,
            span_id=ev.span_id,
            parent_span_id=ev.parent_span_id,
            seq=ev.seq,
            attempt=ev.attempt,
            queued_ts=ev.queued_ts,
            flow_name=ev.flow_name,
        )


@dataclass(slots=True)
class RemoteBinding:
    """Links a trace to a remote agent's A2A context and task."""

    trace_id: str
    context_id: str | None
    task_id: str | None
    agent_url: str | None


class StateStore(Protocol):
    """Where events and bindings are persisted.

    Subclass it (with your own ``__init__``) or implement the three methods.
    The runtime never lets a store exception reach the flow: failures are
    logged as ``state_store_save_failed`` / ``state_store_binding_failed``.
    """

    async def save_event(self, event: StoredEvent) -> None:
        """Persist one event; called in order of occurrence."""
        ...

    async def load_history(self, trace_id: str) -> Sequence[StoredEvent]:
        """Return the events of ``trace_id`` in the order they were saved."""
        ...

    async def save_remote_binding(self, binding: RemoteBinding) -> None:
        """Persist a trace ↔ remote context/task binding."""
        ...
