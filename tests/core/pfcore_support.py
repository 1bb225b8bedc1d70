"""Shared helpers for the core conformance tests (black-box, spec-derived)."""

from __future__ import annotations

import asyncio
from typing import Any

_ANY: Any = object()
TIMEOUT = 3.0


def msg(payload: Any = None, **kwargs: Any) -> Any:
    """A Message for tenant ``acme``."""
    from penguiflow import Headers, Message

    headers = kwargs.pop("headers", None) or Headers(tenant="acme")
    return Message(payload=payload, headers=headers, **kwargs)


async def within(awaitable: Any, timeout: float = TIMEOUT) -> Any:
    """Await with a hang guard."""
    return await asyncio.wait_for(awaitable, timeout)


class Recorder:
    """A middleware recording every FlowEvent; lets tests await specific events."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self._changed = asyncio.Event()

    async def __call__(self, event: Any) -> None:
        self.events.append(event)
        self._changed.set()

    def of(self, kind: str | None = None, trace_id: Any = _ANY, node: Any = _ANY) -> list[Any]:
        return [
            e
            for e in self.events
            if (kind is None or e.event_type == kind)
            and (trace_id is _ANY or e.trace_id == trace_id)
            and (node is _ANY or e.node_name == node)
        ]

    def kinds(self, trace_id: Any = _ANY, node: Any = _ANY) -> list[str]:
        return [e.event_type for e in self.of(None, trace_id, node)]

    async def wait_for(
        self,
        kind: str,
        *,
        count: int = 1,
        trace_id: Any = _ANY,
        node: Any = _ANY,
        timeout: float = TIMEOUT,
    ) -> list[Any]:
        async def _wait() -> list[Any]:
            while len(self.of(kind, trace_id, node)) < count:
                self._changed.clear()
                await self._changed.wait()
            return self.of(kind, trace_id, node)

        return await asyncio.wait_for(_wait(), timeout)
