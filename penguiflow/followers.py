"""Followers: live subscribers to a store's newly stored events (public: for store authors).

A store implements ``TraceStore.follow()`` with one :class:`Followers`: each
``follow()`` call subscribes a queue (:meth:`Followers.iterate`), the store calls
:meth:`Followers.publish` with the events it has just stored, and
:meth:`Followers.close` when it closes, which ends every subscription. The
in-memory store and the SQLite and Postgres stores (``penguiflow-exporters``)
share it.

Bounded: publishing never waits (it runs on the store's write path), so a
subscriber that does not keep up would otherwise hold every event stored since it
fell behind, without limit (an iterator started and then forgotten, a terminal
slower than the flow). Each subscription holds at most ``max_pending`` events;
past that it stops taking any, counts what it misses, and its iterator, once it
has yielded everything before the gap, raises
:class:`~penguiflow.state.FollowerLagged` with the count.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Iterable
from typing import TYPE_CHECKING, cast

from .state import FollowerLagged

if TYPE_CHECKING:
    from .state import StoredEvent

__all__ = ["DEFAULT_MAX_PENDING", "Followers"]

#: Events a subscription holds for its iterator, at most, by default.
DEFAULT_MAX_PENDING = 10_000

# Queued after the last event a lagging subscription kept: its iterator raises there.
_LAGGED = object()


class _Subscription:
    __slots__ = ("queue", "skipped", "trace_id")

    def __init__(self, trace_id: str | None) -> None:
        self.trace_id = trace_id
        self.queue: asyncio.Queue[object] = asyncio.Queue()
        #: Events not kept since the subscription fell behind (0: it keeps up).
        self.skipped = 0


class Followers:
    """A set of ``follow()`` subscriptions (of one trace id, or of all: None).

    Args:
        max_pending: most events one subscription holds for its iterator (see the
            module docstring); at least 1.

    Raises:
        ValueError: ``max_pending`` is below 1.
    """

    __slots__ = ("_subs", "max_pending")

    def __init__(self, *, max_pending: int = DEFAULT_MAX_PENDING) -> None:
        if type(max_pending) is not int or max_pending < 1:
            raise ValueError(f"max_pending must be an int >= 1; got {max_pending!r}")
        self.max_pending = max_pending
        self._subs: list[_Subscription] = []

    def __bool__(self) -> bool:
        return bool(self._subs)

    def publish(self, events: Iterable[StoredEvent]) -> None:
        """Hand each event to the subscribers that want its trace; never waits."""
        subs = self._subs
        limit = self.max_pending
        for event in events:
            for sub in subs:
                wanted = sub.trace_id
                if wanted is None or wanted == event.trace_id:
                    if sub.skipped:
                        sub.skipped += 1
                    elif sub.queue.qsize() < limit:
                        sub.queue.put_nowait(event)
                    else:  # behind by max_pending: nothing after the gap is kept
                        sub.skipped = 1
                        sub.queue.put_nowait(_LAGGED)

    def close(self) -> None:
        """End every subscription (their iterators return)."""
        for sub in self._subs:
            sub.queue.put_nowait(None)

    async def iterate(self, trace_id: str | None) -> AsyncGenerator[StoredEvent, None]:
        """Subscribe and yield events until :meth:`close`.

        Raises:
            FollowerLagged: the subscription held ``max_pending`` events and missed
                the next ones; raised after yielding every event before the gap.
        """
        sub = _Subscription(trace_id)
        self._subs.append(sub)
        try:
            while True:
                event = await sub.queue.get()
                if event is None:
                    return
                if event is _LAGGED:
                    raise FollowerLagged(
                        f"follow({trace_id!r}) fell more than {self.max_pending} events "
                        f"behind the store and missed {sub.skipped} of them; read the "
                        "rest with load_history_page() and call follow() again (or "
                        "consume the iterator faster)", skipped=sub.skipped)
                yield cast("StoredEvent", event)
        finally:
            self._subs.remove(sub)
