"""Middlewares: async callables that receive every FlowEvent."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from .metrics import FlowEvent

__all__ = ["FlowEvent", "Middleware"]


@runtime_checkable
class Middleware(Protocol):
    """Any object with ``async __call__(event) -> None``.

    Middlewares are awaited in registration order for every event. One that
    raises is logged as ``middleware_error`` and skipped; the flow and the
    other middlewares carry on.
    """

    async def __call__(self, event: FlowEvent) -> None: ...
