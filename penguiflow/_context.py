"""Context: a node's (or endpoint's) view of its floes.

A context emits through its flow's runtime (:class:`ContextRuntime`, which
``penguiflow._runtime.FlowRuntime`` implements): the runtime counts each put
for its trace, publishes it to the bus and tags it with its origin. The
context never sees the ``PenguiFlow`` itself, only exposes it as ``runtime``.

Fetching from several incoming floes uses a *doorbell* instead of a task per
floe: each incoming queue rings the context on every put, the context keeps the
order in which queues rang (``_arrivals``) and wakes one waiting fetcher. The
worker of a node with one incoming floe (the common chain case) reads that
queue directly.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeAlias

from ._graph import Endpoint, Floe, FloeQueue, Origin, Owner, owner_label
from ._playbook import call_playbook
from .errors import ConfigurationError, ContextDetached, InvalidTraceId, UnknownTarget, safe_repr
from .types import TRACE_ID_RULE, Message, StreamChunk, check_trace_id

__all__ = ["Context", "ContextRuntime"]

Targets: TypeAlias = "Owner | Sequence[Owner] | None"

_DETACHED = "Context is not attached to a running flow"  # 2.1's text, exactly
# A stream's recorded traces past which those that finished are let go (emit_chunk).
_STREAM_USERS_PRUNE = 8
_NO_INCOMING = "context has no incoming floes to fetch from"  # 2.1's text, exactly


class ContextRuntime(Protocol):
    """What a context needs from the flow that drives it (``FlowRuntime`` is one)."""

    @property
    def traces(self) -> Mapping[Any, Any]:
        """The traces with work in the flow (read only: which are still in flight)."""
        ...

    def origin_of(self, ctx: Context) -> Origin:
        """The origin to tag an item ``ctx`` emits now with."""
        ...

    async def put(self, floe: Floe, item: Any, origin: Origin) -> None:
        """Count, publish and put ``item`` on ``floe``; waits while it is full."""
        ...

    def put_nowait(self, floe: Floe, item: Any, origin: Origin) -> None:
        """Count, put and (later) publish ``item``; ``asyncio.QueueFull`` when full."""
        ...

    def put_past_full(self, floe: Floe, item: Any, origin: Origin) -> None:
        """:meth:`put_nowait`, past the floe's maxsize if it is full."""
        ...

    def refuse_if_cancelled(self, trace_id: Any) -> None:
        """Raise ``TraceCancelled`` if ``trace_id`` is cancelled."""
        ...

    async def wait_chunk_capacity(self, trace_id: Any) -> None:
        """Wait until ``trace_id`` may have one more chunk outstanding (spec §9)."""
        ...

    def stream_used(self, ctx: Context, stream_id: Any, trace_id: Any) -> None:
        """``trace_id`` chunked on ``ctx``'s stream ``stream_id`` (opened or joined it)."""
        ...


class Context:
    """Wiring and I/O of one flow participant.

    ``Context(owner, runtime=None)``: ``owner`` is a Node or an Endpoint; a
    detached context (``runtime=None``) can be passed to ``Node.invoke`` but
    cannot emit. ``runtime`` is the ``PenguiFlow`` it belongs to, exposed as
    :attr:`runtime`.

    Args:
        owner: the Node or Endpoint.
        runtime: the flow, or None for a detached context.
        flow_runtime: what the context emits through (keyword-only addition);
            by default the runtime of ``runtime`` when it is a ``PenguiFlow``.
            A context built by hand as ``Context(node, flow)`` has no floes
            until some are added (spec §9: emitting puts on exactly those); what
            it puts is accounted to its trace as the flow's own puts are. Use
            ``flow.context(owner)`` for the flow's own, wired context.
    """

    __slots__ = (
        "_arrivals",
        "_arrivals_cap",
        "_buffer",
        "_chunks",
        "_first_chunk",
        "_in_one",
        "_in_queues",
        "_incoming",
        "_inv",
        "_is_node",
        "_open_streams",
        "_out_one",
        "_out_queues",
        "_outgoing",
        "_own_queue",
        "_owner",
        "_owner_id",
        "_parents",
        "_rt",
        "_runtime",
        "_stale",
        "_stream_seq",
        "_waiters",
        "last_origin",
    )

    def __init__(self, owner: Owner, runtime: Any = None, *,
                 flow_runtime: ContextRuntime | None = None) -> None:
        self._owner = owner
        self._runtime = runtime
        if flow_runtime is None and runtime is not None:
            # Context(node, flow) built by hand: it emits through that flow's
            # runtime, so what it puts is counted for its trace (cancel and
            # drain see it) and crosses the flow's bus, like the flow's own.
            flow_runtime = getattr(runtime, "_rt", None)
        self._rt = flow_runtime
        #: ``node_id`` for nodes, the endpoint's name for endpoints (event field).
        self._owner_id: str = owner.name if isinstance(owner, Endpoint) else owner.node_id
        self._incoming: dict[Owner, Floe] = {}
        self._outgoing: dict[Owner, Floe] = {}
        # Plain lists of the queues: queue depths are read for every event. The
        # ``_one`` deque is the only queue's items when there is exactly one (most
        # nodes): its len() is the depth, ~0.1 us less per event than summing the
        # list (measured).
        self._in_queues: list[FloeQueue] = []
        self._out_queues: list[FloeQueue] = []
        self._in_one: deque[Any] | None = None
        self._out_one: deque[Any] | None = None
        self._buffer: deque[Any] = deque()
        self._arrivals: deque[FloeQueue] = deque()
        self._arrivals_cap = 1024
        #: Per incoming queue, how many of its oldest rings are stale: their items
        #: were taken by a fetch from a named floe (skipped when popped).
        self._stale: dict[FloeQueue, int] = {}
        #: The node's floe to itself, when it has one and other incoming floes (a
        #: controller): taken first while full (see _take_arrival).
        self._own_queue: FloeQueue | None = None
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._stream_seq: dict[str, int] = {}
        #: A node's streams not ended yet, with the traces that used them (emit_chunk).
        self._open_streams: dict[str, set[Any]] = {}
        self._is_node = not isinstance(owner, Endpoint)
        # The invocation this node is running right now (set by its worker when
        # the flow is observed); outputs emitted through this context record it
        # as their origin.
        self._inv: str | None = None
        #: Invocations whose output the invocation in progress consumed (its wait
        #: graph); a joining node (join_k) widens it to every input it joined.
        self._parents: tuple[str, ...] = ()
        #: Chunks with text emitted by the observed invocation in progress, and the
        #: time of the first: reported on its node_success (spans, inspector).
        self._chunks = 0
        self._first_chunk: float | None = None
        #: Origin of the item the latest fetch returned (see ``FloeQueue``).
        self.last_origin: Origin = None

    # -- wiring --------------------------------------------------------------

    @property
    def owner(self) -> Owner:
        """The Node or Endpoint this context belongs to."""
        return self._owner

    @property
    def runtime(self) -> Any:
        """The ``PenguiFlow`` this context is attached to, or None when detached.

        Typed ``Any`` so that this module does not depend on ``penguiflow.core``.
        """
        return self._runtime

    @property
    def invocation_id(self) -> str | None:
        """The invocation the owning node is running now (set by its worker when
        the flow is observed: a listener, a log scope or DEBUG logging); None
        between items and when unobserved. Events and outputs of the invocation
        carry it (keyword-only addition)."""
        return self._inv

    def add_incoming_floe(self, floe: Floe) -> None:
        """Register ``floe`` as an input (ignored when its source is None)."""
        if floe.source is None:
            return
        self._incoming[floe.source] = floe
        self._in_queues = [f.queue for f in self._incoming.values()]
        self._in_one = self._in_queues[0]._queue if len(self._in_queues) == 1 else None
        if len(self._incoming) > 1:
            ring, unring = self._ring, self._unring
            for incoming in self._incoming.values():
                incoming.queue.doorbell = ring
                incoming.queue.unring = unring
            own = self._incoming.get(self._owner)
            self._own_queue = own.queue if own is not None else None

    def add_outgoing_floe(self, floe: Floe) -> None:
        """Register ``floe`` as an output (ignored when its target is None)."""
        if floe.target is None:
            return
        self._outgoing[floe.target] = floe
        self._out_queues = [f.queue for f in self._outgoing.values()]
        self._out_one = self._out_queues[0]._queue if len(self._out_queues) == 1 else None

    def outgoing_count(self) -> int:
        """Number of outgoing floes."""
        return len(self._outgoing)

    def forget_streams(self, trace_id: Any) -> None:
        """``trace_id`` is over for these streams (an invocation of it failed for good,
        or it was cancelled): a stream no other trace uses goes with it, seq and all,
        or a rerun of the trace would number its chunks on from it."""
        ended = []
        for sid, users in self._open_streams.items():
            users.discard(trace_id)
            if not users:
                ended.append(sid)
        for sid in ended:
            del self._open_streams[sid]
            self._stream_seq.pop(sid, None)

    def queue_depth_in(self) -> int:
        """Items waiting on the incoming floes."""
        depth = 0
        for queue in self._in_queues:
            depth += len(queue._queue)
        return depth

    def queue_depth_out(self) -> int:
        """Items waiting on the outgoing floes."""
        depth = 0
        for queue in self._out_queues:
            depth += len(queue._queue)
        return depth

    def _resolve(self, targets: Targets, table: dict[Owner, Floe]) -> list[Floe]:
        wanted: list[Any]
        if isinstance(targets, Sequence) and not isinstance(targets, str):
            wanted = list(targets)
        else:
            wanted = [targets]
        floes = []
        for target in wanted:
            floe = table.get(target)
            if floe is None:
                name = owner_label(target) if isinstance(target, Endpoint) or hasattr(
                    target, "node_id") else repr(target)
                raise self._unknown_target(name, table)
            floes.append(floe)
        return floes

    def _unknown_target(self, name: str, table: dict[Owner, Floe]) -> KeyError:
        message = f"Unknown target {name} for {owner_label(self._owner)}"  # 2.1's text
        known = ", ".join(owner_label(o) for o in table) or "none"
        hint = (f"the known ones are: {known}; pass one of those Node objects (not a name), "
                "or declare the edge with node.to(...)")
        if isinstance(self._owner, Endpoint):
            # The flow's own emit/fetch (OpenSea, Rookery): a PenguiFlow usage error.
            return UnknownTarget(message, hint=hint)
        # Inside a node the error becomes the node's failure, and 2.1 documents its
        # type there (a FlowError's exception_type "KeyError", spec §8): a plain
        # KeyError, with 2.1's exact text.
        return KeyError(message)

    def _unwired(self) -> None:
        """Emitting without a flow's runtime: an error for a detached context; a
        context built by hand as ``Context(node, flow)`` puts on its own floes, as
        2.1 did (spec §9), with none of the flow's per-trace accounting."""
        if self._runtime is None:
            raise ContextDetached(
                _DETACHED,
                hint="a Context built as Context(owner) can only be passed to Node.invoke; "
                     "emit through the ctx a running flow gives the node, or through "
                     "flow.emit(...)")

    # -- emit ----------------------------------------------------------------

    async def emit(self, msg: Any, to: Targets = None) -> None:
        """Put ``msg`` on every outgoing floe, or on those to ``to``; waits while full.

        Raises:
            ContextDetached: (a ``RuntimeError``) the context is detached.
            UnknownTarget: (a ``KeyError``) ``to`` names something that is not a
                successor; a node's context raises a plain ``KeyError`` (2.1's
                type, reported as the node's failure).
            InvalidTraceId: (a ``ValueError``) ``msg`` has an invalid trace id
                (``types.check_trace_id``).
        """
        rt = self._rt
        if rt is None:
            self._unwired()
        tid = msg.trace_id if type(msg) is Message else getattr(msg, "trace_id", None)
        if tid is not None and not (type(tid) is str and tid.isascii() and tid.isalnum()
                                    and len(tid) <= 256):
            _check_trace_id(tid)  # the fast accept path above is check_trace_id's own
        floes = self._outgoing.values() if to is None else self._resolve(to, self._outgoing)
        if rt is None:  # built by hand with a flow (see _unwired): its floes only
            for floe in floes:
                await floe.queue.put_tagged(msg, None)
            return
        origin = rt.origin_of(self)
        put = rt.put
        for floe in floes:
            await put(floe, msg, origin)

    def emit_nowait(self, msg: Any, to: Targets = None) -> None:
        """Like :meth:`emit` but never waits.

        Raises:
            asyncio.QueueFull: a target floe is full (nothing is put anywhere).
            InvalidTraceId: (a ``ValueError``) ``msg`` has an invalid trace id
                (nothing is put anywhere).
            ContextDetached, UnknownTarget: as :meth:`emit`.
        """
        rt = self._rt
        if rt is None:
            self._unwired()
        tid = msg.trace_id if type(msg) is Message else getattr(msg, "trace_id", None)
        if tid is not None and not (type(tid) is str and tid.isascii() and tid.isalnum()
                                    and len(tid) <= 256):
            _check_trace_id(tid)
        floes = list(self._outgoing.values()) if to is None else self._resolve(
            to, self._outgoing)
        if any(f.queue.full() for f in floes):
            raise asyncio.QueueFull
        if rt is None:  # built by hand with a flow (see _unwired)
            for floe in floes:
                floe.queue.put_tagged_nowait(msg, None)
            return
        origin = rt.origin_of(self)
        for floe in floes:
            rt.put_nowait(floe, msg, origin)

    def loop_back(self, floe: Floe, msg: Any) -> None:
        """Put ``msg`` (a controller's next step) on ``floe``, this node's floe to
        itself, now, past its maxsize if it is full (see the runtime's controller
        step). Checks the trace id as :meth:`emit` does."""
        rt = self._rt
        if rt is None:
            self._unwired()
        tid = msg.trace_id if type(msg) is Message else getattr(msg, "trace_id", None)
        if tid is not None:
            _check_trace_id(tid)
        if rt is None:  # built by hand with a flow (see _unwired): its floe only
            floe.queue.put_tagged_past_full(msg, None)
            return
        rt.put_past_full(floe, msg, rt.origin_of(self))

    async def emit_chunk(
        self,
        *,
        parent: Message,
        text: str,
        stream_id: str | None = None,
        seq: int | None = None,
        done: bool = False,
        meta: dict[str, Any] | None = None,
        to: Targets = None,
    ) -> StreamChunk:
        """Emit one :class:`StreamChunk` of ``parent``'s stream and return it.

        ``stream_id`` defaults to ``parent.trace_id``; ``seq`` defaults to the
        previous number of that stream + 1 (first 0) and a ``done`` chunk resets
        the stream. Every chunk but a stream's first waits until the trace has
        fewer than ``queue_maxsize`` other unconsumed items (chunk backpressure).

        Raises:
            ContextDetached: (a ``RuntimeError``) the context is detached.
            TraceCancelled: the parent's trace is cancelled (before or while
                waiting for capacity); nothing is emitted.
        """
        rt = self._rt
        if rt is None:
            self._unwired()
        else:
            rt.refuse_if_cancelled(parent.trace_id)
        sid = stream_id if stream_id is not None else parent.trace_id
        previous = self._stream_seq.get(sid)
        if seq is None:
            seq = 0 if previous is None else previous + 1
        closed: set[Any] | None = None
        if done:
            self._stream_seq.pop(sid, None)
            if self._open_streams:
                closed = self._open_streams.pop(sid, None)
        else:
            self._stream_seq[sid] = seq
            if self._is_node:
                # When every trace that used the stream has failed for good or been
                # cancelled, the stream is over (forget_streams), so a rerun numbers
                # its chunks from 0 again. (An endpoint's streams, e.g. those of
                # flow.emit_chunk, run no invocation: kept until done or stop().)
                users = self._open_streams.get(sid)
                if users is None:
                    self._open_streams[sid] = {parent.trace_id}
                    if rt is not None:
                        rt.stream_used(self, sid, parent.trace_id)
                elif parent.trace_id not in users:
                    if len(users) >= _STREAM_USERS_PRUNE and rt is not None:
                        # A long-lived stream id many traces share ("status"): keep
                        # the traces still in flight only, or the set grows for ever.
                        users.intersection_update(rt.traces)
                    users.add(parent.trace_id)
                    if rt is not None:
                        rt.stream_used(self, sid, parent.trace_id)
        try:
            chunk = StreamChunk(stream_id=sid, seq=seq, text=text, done=done,
                                meta=dict(meta) if meta else {})
            message = Message(payload=chunk, headers=parent.headers,
                              trace_id=parent.trace_id, deadline_s=parent.deadline_s,
                              meta=dict(parent.meta))
            if to is not None:
                self._resolve(to, self._outgoing)  # an unknown target: before any put
            _check_trace_id(parent.trace_id)
            if previous is not None and rt is not None:
                await rt.wait_chunk_capacity(parent.trace_id)
                rt.refuse_if_cancelled(parent.trace_id)
        except BaseException:
            # Nothing was emitted (a bad target or text, a cancel while waiting for
            # room): the stream's number goes back, so the consumer sees no gap --
            # unless another chunk of the stream took a number meanwhile. (Once the
            # puts start, a floe or the bus may have the chunk: its number stays.)
            if self._stream_seq.get(sid) == (None if done else seq):
                if previous is None:
                    self._stream_seq.pop(sid, None)
                else:
                    self._stream_seq[sid] = previous
                if closed is not None:
                    self._open_streams[sid] = closed
            raise
        await self.emit(message, to)
        if text and self._inv is not None:  # only observed invocations have an id
            self._chunks += 1
            if self._first_chunk is None:
                self._first_chunk = time.time()
        return chunk

    # -- fetch ---------------------------------------------------------------

    def _ring(self, queue: FloeQueue) -> None:
        arrivals = self._arrivals
        arrivals.append(queue)
        if len(arrivals) > self._arrivals_cap:
            self._compact_arrivals()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
                break

    def _unring(self, queue: FloeQueue, positions: list[int], size: int) -> None:
        """Forget the rings of the items at ``positions`` of ``queue`` (``size`` items
        before they were removed: a cancel). Its last ``size`` rings are its items',
        in order (a ring is forgotten when its item is taken, see :meth:`_took`), so
        the others keep the order they arrived in."""
        gone = set(positions)
        index = size  # the item of the ring looked at, counted from the queue's end
        kept: deque[FloeQueue] = deque()
        for rung in reversed(self._arrivals):
            if rung is queue:
                index -= 1
                if index < 0 or index in gone:  # < 0: more rings than items, stale
                    continue
            kept.appendleft(rung)
        self._arrivals = kept
        self._stale.pop(queue, None)  # its stale rings went with the others

    def _took(self, queue: FloeQueue) -> None:
        """``queue``'s front item was taken without its ring (a fetch from a named
        floe): its oldest ring, that item's, is stale, and is skipped when popped,
        so the next fetch in arrival order does not take a later item of ``queue``
        before an earlier one of another floe. (Counted, not removed: removing it
        scanned the rings of every other floe, per fetch.)"""
        if queue.doorbell is not None:
            self._stale[queue] = self._stale.get(queue, 0) + 1

    def _pop_ring(self) -> FloeQueue | None:
        """The oldest ring that is not stale (None: no ring left)."""
        arrivals = self._arrivals
        stale = self._stale
        while arrivals:
            queue = arrivals.popleft()
            if stale:
                skip = stale.get(queue)
                if skip:
                    if skip == 1:
                        del stale[queue]
                    else:
                        stale[queue] = skip - 1
                    continue
            return queue
        return None

    def _compact_arrivals(self) -> None:
        # Entries go stale when items are taken by a targeted fetch or removed by
        # cancel; keep only as many (latest) entries per queue as it holds items.
        need = {f.queue: f.queue.qsize() for f in self._incoming.values()}
        kept: deque[FloeQueue] = deque()
        for queue in reversed(self._arrivals):
            if need.get(queue, 0) > 0:
                need[queue] -= 1
                kept.appendleft(queue)
        self._arrivals = kept
        self._arrivals_cap = max(1024, 2 * len(kept))
        self._stale.clear()  # only live rings are kept

    async def _wait_ring(self) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # We were woken but will not consume: pass the wake-up on.
                for other in self._waiters:
                    if other is not waiter and not other.done():
                        other.set_result(None)
                        break
            raise
        finally:
            self._waiters.remove(waiter)

    def fail_waiters(self, exc: BaseException) -> None:
        """Make every pending fetch on this context raise ``exc`` (used by stop)."""
        for waiter in list(self._waiters):
            if not waiter.done():
                waiter.set_exception(exc)
        for floe in self._incoming.values():
            floe.queue.fail_getters(exc)

    async def _take_arrival(self) -> Any:
        own = self._own_queue
        if own is not None and 0 < own._maxsize <= len(own._queue):
            # A controller whose floe to itself is full: its looping traces go first.
            # Its loop back never waits for room (its own worker is the only one
            # that makes any), so admitting new work now would let that floe grow
            # with every request taken in; this keeps it within maxsize + 1.
            item = own.get_nowait()
            self.last_origin = own.last_origin
            self._took(own)
            return item
        while True:
            while True:
                queue = self._pop_ring()
                if queue is None:
                    break
                if queue.qsize():
                    item = queue.get_nowait()
                    self.last_origin = queue.last_origin
                    return item
            if self._buffer:
                self.last_origin = None
                return self._buffer.popleft()
            await self._wait_ring()

    async def _race(self, floes: Sequence[Floe]) -> Any:
        while True:
            for floe in floes:
                queue = floe.queue
                if queue.qsize():
                    item = queue.get_nowait()
                    self.last_origin = queue.last_origin
                    self._took(queue)
                    return item
            await self._wait_ring()

    async def fetch(self, from_: Targets = None) -> Any:
        """Return the next item: from the buffer, the one incoming floe, or any.

        Raises:
            ConfigurationError: (a ``RuntimeError``) the context has no incoming
                floes (and nothing buffered), e.g. OpenSea's.
            UnknownTarget: (a ``KeyError``) ``from_`` names something that is
                not a predecessor.
        """
        if self._buffer:
            self.last_origin = None
            return self._buffer.popleft()
        if from_ is not None:
            floes = self._resolve(from_, self._incoming)
            if len(floes) > 1:
                return await self._race(floes)
            return await self._get(floes[0].queue)
        incoming = self._incoming
        if len(incoming) == 1:
            for floe in incoming.values():
                return await self._get(floe.queue)
        if not incoming:
            raise _no_incoming(self._owner)
        return await self._take_arrival()

    async def _get(self, queue: FloeQueue) -> Any:
        item = await queue.get()
        self.last_origin = queue.last_origin
        if queue.doorbell is not None:  # one of several incoming floes, named
            self._took(queue)
        return item

    def fetch_nowait(self, from_: Targets = None) -> Any:
        """Return an item that is ready now.

        Raises:
            asyncio.QueueEmpty: nothing is ready.
        """
        if self._buffer:
            self.last_origin = None
            return self._buffer.popleft()
        floes = (list(self._incoming.values()) if from_ is None
                 else self._resolve(from_, self._incoming))
        if from_ is None:
            # Honour arrival order across floes when it is tracked.
            while True:
                queue = self._pop_ring()
                if queue is None:
                    break
                if queue.qsize():
                    item = queue.get_nowait()
                    self.last_origin = queue.last_origin
                    return item
        for floe in floes:
            if floe.queue.qsize():
                item = floe.queue.get_nowait()
                self.last_origin = floe.queue.last_origin
                self._took(floe.queue)
                return item
        raise asyncio.QueueEmpty("no messages available")

    async def fetch_any(self, from_: Targets = None) -> Any:
        """Return the first item to arrive on any (or the listed) incoming floes."""
        if self._buffer:
            self.last_origin = None
            return self._buffer.popleft()
        floes = (list(self._incoming.values()) if from_ is None
                 else self._resolve(from_, self._incoming))
        if not floes:
            raise _no_incoming(self._owner)
        if len(floes) == 1:
            return await self._get(floes[0].queue)
        if from_ is None:
            return await self._take_arrival()
        return await self._race(floes)

    # -- playbooks -----------------------------------------------------------

    async def call_playbook(
        self,
        playbook: Callable[[], Any],
        parent_msg: Message,
        *,
        timeout: float | None = None,
    ) -> Any:
        """Run ``playbook`` as a subflow of this context's flow (see ``call_playbook``)."""
        return await call_playbook(playbook, parent_msg, timeout, runtime=self._runtime,
                                   invocation_id=self._inv)

    def __repr__(self) -> str:
        return f"Context(owner={owner_label(self._owner)!r})"


def _check_trace_id(trace_id: object) -> None:
    """``check_trace_id``, but an object's own id type (2.1 allowed any: an order
    number, a ``uuid.UUID``) is taken when it is hashable and its ``str()`` is a
    valid trace id: the runtime keys the trace by the object's id, and events
    record its ``str()``.

    Raises:
        InvalidTraceId: the id is an invalid str, unhashable, or its ``str()``
            fails or is not a valid trace id.
    """
    if isinstance(trace_id, str):
        check_trace_id(trace_id)
        return
    try:
        hash(trace_id)
        text = str(trace_id)
    except Exception as exc:
        raise InvalidTraceId(
            f"invalid trace_id: a {type(trace_id).__name__} that cannot be hashed or "
            f"printed ({safe_repr(exc)[:200]}); an object's trace id may also be a hashable "
            f"value (an int, a uuid.UUID) whose str() is one: {TRACE_ID_RULE}") from None
    check_trace_id(text)


def _no_incoming(owner: Owner) -> ConfigurationError:
    return ConfigurationError(
        _NO_INCOMING,
        hint=f"{owner_label(owner)} has no incoming floe: fetch results with flow.fetch() "
             "(Rookery), and give a node a predecessor with pred.to(node) to fetch from it")
