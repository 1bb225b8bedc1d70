"""MessageBus hook: one envelope published per floe put (spec §15.2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["BusEnvelope", "MessageBus"]


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
