"""Followers: live subscribers to a store's newly stored events (public: for store authors).

A store implements ``TraceStore.follow()`` with one :class:`Followers`: each
``follow()`` call subscribes a queue (:meth:`Followers.iterate`), the store calls
:meth:`Followers.publish` with the events it has just stored, and
:meth:`Followers.close` when it closes, which ends every subscription. The
in-memory store and the SQLite and Postgres stores (``penguiflow-exporters``)
share it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .state import StoredEvent

__all__ = ["Followers"]


class Followers:
    """A set of ``follow()`` subscriptions (of one trace id, or of all: None)."""

    __slots__ = ("_subs",)

    def __init__(self) -> None:
        self._subs: list[tuple[str | None, asyncio.Queue[StoredEvent | None]]] = []

    def __bool__(self) -> bool:
        return bool(self._subs)

    def publish(self, events: Iterable[StoredEvent]) -> None:
        """Hand each event to the subscribers that want its trace."""
        subs = self._subs
        for event in events:
            for wanted, queue in subs:
                if wanted is None or wanted == event.trace_id:
                    queue.put_nowait(event)

    def close(self) -> None:
        """End every subscription (their iterators return)."""
        for _, queue in self._subs:
            queue.put_nowait(None)

    async def iterate(self, trace_id: str | None) -> AsyncIterator[StoredEvent]:
        """Subscribe and yield events until :meth:`close`."""
        queue: asyncio.Queue[StoredEvent | None] = asyncio.Queue()
        entry = (trace_id, queue)
        self._subs.append(entry)
        try:
            while True:
                event = await queue.get()
                if event is None:
                    return
                yield event
        finally:
            self._subs.remove(entry)
