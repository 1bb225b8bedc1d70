"""Graph primitives: endpoints, floes (edges with bounded queues), cycle checks.

A floe's queue is an ``asyncio.Queue`` subclass that carries, beside each item,
its *origin*: the invocation id that produced it and when it was queued. The
origin is what lets the runtime record which invocation consumed whose output
without wrapping user objects (users may read ``floe.queue`` directly and must
see their own objects).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

from .errors import CycleError

if TYPE_CHECKING:
    from .node import Node

__all__ = ["OPEN_SEA", "ROOKERY", "CycleError", "Endpoint", "Floe", "Owner", "check_acyclic"]

#: ``(producing invocation id, wall-clock enqueue time)`` or None when unobserved; a
#: plain value (no ``trace_id`` of its own) a node returned also carries its trace id
#: third, for ``PenguiFlow.fetch_traced``; an item a delivering bus brought is tagged
#: with its ``penguiflow.binding.Inbound`` (those three first, then the parcel's ids).
Origin: TypeAlias = (
    "tuple[str | None, float] | tuple[str | None, float, Any] | tuple[Any, ...] | None")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A synthetic flow endpoint: ``OpenSea`` (ingress) or ``Rookery`` (egress)."""

    name: str


OPEN_SEA = Endpoint("OpenSea")
ROOKERY = Endpoint("Rookery")

Owner: TypeAlias = "Node | Endpoint"


class _Tagged:
    """An item travelling through the slow (blocking) put path with its origin."""

    __slots__ = ("item", "origin")

    def __init__(self, item: Any, origin: Origin) -> None:
        self.item = item
        self.origin = origin


class FloeQueue(asyncio.Queue[Any]):
    """An ``asyncio.Queue`` that records each item's origin in a parallel deque.

    ``put_tagged`` sets ``next_origin`` and puts synchronously when there is
    room (the hot path allocates nothing); ``last_origin`` is the origin of the
    item the latest ``get``/``get_nowait`` returned. ``doorbell`` is called with
    the queue after every put, so a context with several incoming floes can
    wait for any of them without a task per floe.
    """

    _queue: deque[Any]
    _maxsize: int
    _origins: deque[Origin]
    _getters: deque[asyncio.Future[Any]]

    def _init(self, maxsize: int) -> None:
        self._queue = deque()
        self._origins = deque()
        self.next_origin: Origin = None
        self.last_origin: Origin = None
        self.doorbell: Callable[[FloeQueue], None] | None = None
        #: Called with the queue, the positions of the items a removal took (in the
        #: queue's order before it) and its size before, so a context that keeps
        #: the order queues rang in can forget exactly those items' rings.
        self.unring: Callable[[FloeQueue, list[int], int], None] | None = None

    # asyncio's full() calls qsize(), and put_nowait/get call full()/empty() on every
    # item: the same answers, one call and one len() each (hot path, ~0.1 us per hop).
    def qsize(self) -> int:
        return len(self._queue)

    def empty(self) -> bool:
        return not self._queue

    def full(self) -> bool:
        return 0 < self._maxsize <= len(self._queue)

    # asyncio's put_nowait/get_nowait, inlined (same semantics, Python 3.13's
    # shutdown included): each is on every hop, and the calls they make to full(),
    # empty(), _finished.clear() and _wakeup_next cost ~0.15 us per hop together.
    _is_shutdown = False  # set by asyncio.Queue.shutdown() (3.13+)

    def put_nowait(self, item: Any) -> None:
        if self._is_shutdown:
            raise asyncio.QueueShutDown  # type: ignore[attr-defined]  # 3.13+
        if 0 < self._maxsize <= len(self._queue):
            raise asyncio.QueueFull
        self._put(item)
        if not self._unfinished_tasks:  # type: ignore[attr-defined]
            self._finished.clear()  # type: ignore[attr-defined]
        self._unfinished_tasks += 1  # type: ignore[attr-defined]
        getters = self._getters
        while getters:
            getter = getters.popleft()
            if not getter.done():
                getter.set_result(None)
                break

    def get_nowait(self) -> Any:
        queue = self._queue
        if not queue:
            if self._is_shutdown:
                raise asyncio.QueueShutDown  # type: ignore[attr-defined]  # 3.13+
            raise asyncio.QueueEmpty
        self.last_origin = self._origins.popleft()
        item = queue.popleft()
        putters = self._putters  # type: ignore[attr-defined]
        while putters:
            putter = putters.popleft()
            if not putter.done():
                putter.set_result(None)
                break
        return item

    def _put(self, item: Any) -> None:
        if type(item) is _Tagged:
            self._queue.append(item.item)
            self._origins.append(item.origin)
        else:
            self._queue.append(item)
            self._origins.append(self.next_origin)
            self.next_origin = None
        if self.doorbell is not None:
            self.doorbell(self)

    def _get(self) -> Any:
        self.last_origin = self._origins.popleft()
        return self._queue.popleft()

    async def put_tagged(self, item: Any, origin: Origin) -> None:
        """Put ``item`` with its origin, waiting while the queue is full."""
        if self._is_shutdown or 0 < self._maxsize <= len(self._queue):
            await self.put(_Tagged(item, origin))  # waits (or raises QueueShutDown)
            return
        # put_nowait inlined (the hot path: every hop's put comes here).
        self._queue.append(item)
        self._origins.append(origin)
        if self.doorbell is not None:
            self.doorbell(self)
        if not self._unfinished_tasks:  # type: ignore[attr-defined]
            self._finished.clear()  # type: ignore[attr-defined]
        self._unfinished_tasks += 1  # type: ignore[attr-defined]
        getters = self._getters
        while getters:
            getter = getters.popleft()
            if not getter.done():
                getter.set_result(None)
                break

    def put_tagged_past_full(self, item: Any, origin: Origin) -> None:
        """Put ``item`` with its origin now, past ``maxsize`` if the queue is full: for
        a controller's loop back to itself, whose own worker is the only one that
        makes room (waiting would wait for ever)."""
        maxsize, self._maxsize = self._maxsize, 0  # unbounded for this one put
        try:
            self.put_tagged_nowait(item, origin)
        finally:
            self._maxsize = maxsize

    async def get(self) -> Any:
        """Remove and return an item, waiting while the queue is empty."""
        if self._queue:  # the hot path: no wait, no extra coroutine
            return self.get_nowait()
        return await super().get()

    def put_tagged_nowait(self, item: Any, origin: Origin) -> None:
        """Put ``item`` with its origin; ``asyncio.QueueFull`` when full."""
        self.next_origin = origin
        try:
            self.put_nowait(item)
        finally:
            self.next_origin = None

    def remove_where(self, predicate: Callable[[Any], bool]) -> list[Any]:
        """Remove and return every queued item matching ``predicate``; wake putters."""
        return [item for item, _origin in self.remove_tagged_where(predicate)]

    def remove_tagged_where(self, predicate: Callable[[Any], bool]) -> list[tuple[Any, Origin]]:
        """:meth:`remove_where`, returning ``(item, origin)`` pairs."""
        removed: list[tuple[Any, Origin]] = []
        positions: list[int] = []
        kept: deque[Any] = deque()
        kept_origins: deque[Origin] = deque()
        for i, (item, origin) in enumerate(zip(self._queue, self._origins, strict=True)):
            if predicate(item):
                removed.append((item, origin))
                positions.append(i)
            else:
                kept.append(item)
                kept_origins.append(origin)
        if removed:
            if self.unring is not None:
                self.unring(self, positions, len(self._queue))
            # In place, not a new deque: contexts keep a reference to this one to
            # read queue depths cheaply (Context._in_one / _out_one), and a new one
            # left them reporting the old depth for ever.
            self._queue.clear()
            self._queue.extend(kept)
            self._origins.clear()
            self._origins.extend(kept_origins)
            for _ in removed:
                # Each removal frees one slot: let one blocked producer in per slot.
                self._wakeup_next(self._putters)  # type: ignore[attr-defined]
        return removed

    def fail_putters(self, exc: BaseException) -> None:
        """Make every coroutine blocked in ``put()`` raise ``exc`` (used by stop: an
        emit waiting for room that nobody will make)."""
        putters = self._putters  # type: ignore[attr-defined]
        while putters:
            putter = putters.popleft()
            if not putter.done():
                putter.set_exception(exc)

    def fail_getters(self, exc: BaseException) -> None:
        """Make every coroutine blocked in ``get()`` raise ``exc`` (used by stop)."""
        while self._getters:
            getter = self._getters.popleft()
            if not getter.done():
                getter.set_exception(exc)


class Floe:
    """A directed edge ``source -> target`` with a bounded queue.

    ``maxsize <= 0`` makes the queue unbounded.
    """

    __slots__ = ("label", "queue", "source", "target")

    def __init__(self, source: Owner | None, target: Owner | None, *, maxsize: int) -> None:
        self.source = source
        self.target = target
        self.queue: FloeQueue = FloeQueue(maxsize=max(maxsize, 0))
        self.label = f"{owner_label(source)}->{owner_label(target)}"

    def __repr__(self) -> str:
        return f"Floe({self.label}, qsize={self.queue.qsize()})"


def owner_label(owner: Owner | None) -> str:
    """The name used for an owner in edge labels: node name, node id, or ``*``."""
    if owner is None:
        return "*"
    name = owner.name
    if name:
        return name
    return getattr(owner, "node_id", None) or "*"


def check_acyclic(nodes: Iterable[Node], edges: dict[Node, list[Node]]) -> None:
    """Raise :class:`CycleError` unless the graph is a DAG (Kahn's algorithm).

    Self-edges of nodes built with ``allow_cycle=True`` are ignored.
    """
    node_list = list(nodes)
    indegree = dict.fromkeys(node_list, 0)
    for src, targets in edges.items():
        for dst in targets:
            if dst is src and src.allow_cycle:
                continue
            indegree[dst] += 1
    ready = deque(n for n, deg in indegree.items() if deg == 0)
    visited = 0
    while ready:
        node = ready.popleft()
        visited += 1
        for dst in edges.get(node, ()):
            if dst is node and node.allow_cycle:
                continue
            indegree[dst] -= 1
            if indegree[dst] == 0:
                ready.append(dst)
    if visited != len(node_list):
        stuck = sorted(owner_label(n) for n, deg in indegree.items() if deg > 0)
        # The message is 2.1's, exactly; the note names the nodes to look at.
        error = CycleError(
            "Flow contains a cycle; enable allow_cycles to bypass",
            hint=(f"Nodes on the cycle or downstream of it: {', '.join(stuck)}. Break the "
                  "cycle, build a looping node with Node(..., allow_cycle=True) (self-edge "
                  "only), or pass allow_cycles=True to create()."))
        error.nodes = tuple(stuck)
        raise error
