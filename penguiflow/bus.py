"""MessageBus hook: one envelope published per floe put (spec §15.2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["BusEnvelope", "InMemoryMessageBus", "MessageBus"]


@dataclass(slots=True)
class BusEnvelope:
    """What a bus receives for each floe put.

    ``edge`` is ``"<source>-><target>"`` (node name, node id if nameless,
    endpoint name, or ``*``); ``headers``/``meta`` are a dump and a copy of the
    Message's, or None for other objects.
    """

    edge: str
    source: str
    target: str
    trace_id: str | None
    payload: Any
    headers: dict[str, Any] | None
    meta: dict[str, Any] | None


class MessageBus(Protocol):
    """Publish-only hook; in-process queues still deliver. Failures are logged
    as ``message_bus_publish_failed`` and never affect delivery."""

    async def publish(self, envelope: BusEnvelope) -> None:
        """Publish one envelope."""
        ...


class InMemoryMessageBus:
    """Records every published envelope (tests, examples); ``edges`` counts per edge."""

    def __init__(self) -> None:
        self.envelopes: list[BusEnvelope] = []

    async def publish(self, envelope: BusEnvelope) -> None:
        """Record ``envelope``."""
        self.envelopes.append(envelope)

    def edges(self) -> dict[str, int]:
        """How many envelopes were published per edge label."""
        counts: dict[str, int] = {}
        for envelope in self.envelopes:
            counts[envelope.edge] = counts.get(envelope.edge, 0) + 1
        return counts
