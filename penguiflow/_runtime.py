"""FlowRuntime: what a flow's contexts and node workers share, and nothing more.

``PenguiFlow`` (``core``) builds the graph and owns the lifecycle and the public
API; the engine the messages run through is this object. Contexts and workers
hold it directly and never see the ``PenguiFlow``, so ``core`` imports them and
they do not import ``core``::

    core ──> _worker ──> _runtime ──> _context
      └────────────────────┴──────────────┘

Its surface is exactly what they use:

* **puts and accounting** (contexts): :meth:`origin_of`, :meth:`put`,
  :meth:`put_nowait`, :meth:`refuse_if_cancelled`, :meth:`wait_chunk_capacity`;
* **a worker's item** : :attr:`traces`, :attr:`events`, :attr:`registry`,
  :meth:`record` / :meth:`emit_event` (events), :meth:`route_result`,
  :meth:`deliver_rookery`, :meth:`release` + :meth:`cancel_finished` (the item
  is done), :attr:`stopping` (a cancel comes from ``stop()``, not a trace).

Everything runs on the event loop thread: no locks. Who changes a trace's
counts, and when, is explained in ``_traces``; the scheduling and cancellation
of workers in ``_worker``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, overload

from ._events import EVENT_LEVELS, logger
from ._graph import ROOKERY
from ._graph import owner_label as _label
from ._ids import root_span_id
from ._playbook import emit_parent
from ._traces import TraceCancelled, TraceState
from .bus import BusEnvelope
from .errors import SAFE_TEXT_LIMIT, FlowNotRunning, safe_repr
from .metrics import event_from_fields
from .state import EventRecord, stored_from_fields
from .types import WM, FinalAnswer, Message

if TYPE_CHECKING:
    from ._context import Context
    from ._events import EventPipeline
    from ._graph import Floe, Origin
    from .binding import BusBinding
    from .bus import MessageBus
    from .node import Node
    from .registry import ModelRegistry

__all__ = ["FlowRuntime"]

_new_record = tuple.__new__

# The wall clock, bound once: read twice per hop by FlowRuntime.record.
_wall = time.time


#: Streams whose trace drained without a done chunk whose numbers are kept.
IDLE_STREAMS_MAX = 10_000


class FlowRuntime:
    """The engine of one ``PenguiFlow``: per-trace accounting, puts, events, routing.

    Built by ``PenguiFlow.__init__`` and handed to every context it wires and
    every worker it starts. Attributes are read by the hot path, hence plain
    slots; only the owning flow assigns them.
    """

    __slots__ = (
        "binding",
        "bus_tasks",
        "drained",
        "egress",
        "emit_errors_to_rookery",
        "error_text_max",
        "events",
        "external",
        "flow_id",
        "idle_streams",
        "message_bus",
        "name",
        "node_contexts",
        "nodes",
        "queue_maxsize",
        "registry",
        "rookery",
        "running",
        "stopped",
        "stopping",
        "trace_streams",
        "trace_tasks",
        "traces",
    )

    def __init__(
        self,
        *,
        name: str,
        flow_id: str,
        queue_maxsize: int,
        emit_errors_to_rookery: bool,
        message_bus: MessageBus | None,
        events: EventPipeline,
        error_text_max: int = SAFE_TEXT_LIMIT,
    ) -> None:
        #: The flow's name and instance id (event fields).
        self.name = name
        self.flow_id = flow_id
        #: Capacity of every floe; ``<= 0``: unbounded (and no chunk backpressure).
        self.queue_maxsize = queue_maxsize
        self.emit_errors_to_rookery = emit_errors_to_rookery
        #: Characters of a failure's exception text and traceback kept per event.
        self.error_text_max = error_text_max
        self.message_bus = message_bus
        #: The event pipeline (logger, store, middlewares, tracer) and its failure counts.
        self.events = events
        #: The registry passed to ``run()``.
        self.registry: ModelRegistry | None = None
        #: Bookkeeping of every live trace (see ``_traces``).
        self.traces: dict[Any, TraceState] = {}
        #: ``run()`` was called and ``stop()`` has not finished.
        self.running = False
        #: ``stop()`` is in progress: a worker's CancelledError is the end, not a trace cancel.
        self.stopping = False
        #: ``stop()`` finished (and ``run()`` was not called again).
        self.stopped = False
        #: The graph, set once by the flow after wiring (:meth:`attach_graph`).
        self.nodes: Sequence[Node] = ()
        self.rookery: Context | None = None
        self.egress: Sequence[Floe] = ()
        #: Tasks registered with ``register_external_task`` (cancelled by ``stop()``).
        self.external: set[asyncio.Future[Any]] = set()
        #: Traced runs only: external tasks per trace, and drained traces whose root
        #: span waits for those tasks to end.
        self.trace_tasks: dict[Any, set[asyncio.Future[Any]]] = {}
        self.drained: set[Any] = set()
        #: The nodes' contexts (set with the graph; see forget_trace).
        self.node_contexts: list[Context] = []
        #: Per trace in flight, the node streams it chunked on (``(context, stream
        #: id)``), and the streams whose traces drained without a done chunk, oldest
        #: first: their numbers are kept (2.1: a stream numbers on until done, and
        #: the trace id may come again, a conversation's next message), up to
        #: IDLE_STREAMS_MAX.
        self.trace_streams: dict[Any, set[tuple[Context, Any]]] = {}
        self.idle_streams: OrderedDict[tuple[Context, Any], None] = OrderedDict()
        #: Background bus publishes (``emit_nowait`` paths) and cancel finishes.
        self.bus_tasks: set[asyncio.Task[None]] = set()
        #: Set while the flow runs over a delivering bus (see ``penguiflow.binding``):
        #: every put is then sent through it instead of a local queue.
        self.binding: BusBinding | None = None

    def attach_graph(self, nodes: Sequence[Node], rookery: Context,
                     egress: Sequence[Floe]) -> None:
        """Record the wired graph: its nodes, the Rookery context and the egress floes."""
        self.nodes = nodes
        self.rookery = rookery
        self.egress = egress

    # -- puts and accounting (contexts) ------------------------------------------

    def origin_of(self, ctx: Context) -> Origin:
        """The origin of an item ``ctx`` emits now: its invocation and the time."""
        inv = ctx._inv
        if inv is None:
            if not self.events.listening:
                return None
            # OpenSea: a playbook's message names the invocation that called it.
            inv = emit_parent.get()
        return (inv, time.time())

    def origin_for(self, inv: str | None) -> Origin:
        """The origin of an item produced by invocation ``inv`` (None: unobserved)."""
        return None if inv is None else (inv, time.time())

    def count(self, item: Any) -> Any:
        """Count one more pending item for ``item``'s trace (if it has one); returns
        that trace id (None: nothing counted), what :meth:`release` gives back."""
        trace_id = item.trace_id if type(item) is Message else getattr(item, "trace_id", None)
        if trace_id is not None:
            state = self.traces.get(trace_id)
            if state is None:
                state = self.traces[trace_id] = TraceState()
            state.pending += 1
        return trace_id

    async def put(self, floe: Floe, item: Any, origin: Origin) -> None:
        """Count ``item``, publish it to the bus (if any), put it; waits while full."""
        binding = self.binding
        if binding is not None:
            # Bound to a delivering bus: the item leaves this process; it is counted
            # where (and when) the bus delivers it to a local floe.
            await binding.send(floe, item, origin)
            return
        self.count(item)
        try:
            if self.message_bus is not None:
                await self._publish(floe, item)
            await floe.queue.put_tagged(item, origin)
        except BaseException:
            # The put never happened (cancelled while the floe was full): give the
            # count back, or the trace could never drain.
            trace_id = getattr(item, "trace_id", None)
            if trace_id is not None and self.release(trace_id):
                self.spawn(self.cancel_finished(trace_id))
            raise

    def put_nowait(self, floe: Floe, item: Any, origin: Origin) -> None:
        """Put ``item`` now (``asyncio.QueueFull`` when full); the bus publish runs later.

        Bound to a delivering bus, the send runs in the background (in order with
        other sends of this task) and ``QueueFull`` is never raised: the edge's
        capacity is the broker's, and the send waits for it.
        """
        binding = self.binding
        if binding is not None:
            binding.send_soon(floe, item, origin)
            return
        floe.queue.put_tagged_nowait(item, origin)
        self.count(item)
        if self.message_bus is not None:
            self.spawn(self._publish(floe, item))

    def release(self, trace_id: Any) -> bool:
        """Count one item of ``trace_id`` as consumed; True if a cancelled trace drained.

        The caller then awaits :meth:`cancel_finished` (or spawns it).
        """
        state = self.traces.get(trace_id)
        if state is None:
            return False
        state.pending -= 1
        if state.chunk_waiters and state.pending <= self.queue_maxsize:
            state.wake_chunk_waiters()
        if state.pending > 0:
            return False
        del self.traces[trace_id]
        state.wake_chunk_waiters()
        if self.trace_streams:
            self._end_streams(trace_id, state.cancelled)
        if self.events.tracer is not None and not state.cancelled:
            # A cancelled trace ends its root span after trace_cancel_finish.
            self.trace_drained(trace_id)
        return state.cancelled

    def stream_used(self, ctx: Context, stream_id: Any, trace_id: Any) -> None:
        """``trace_id`` chunked on ``ctx``'s stream ``stream_id`` (opened it, or joined
        it): the stream goes idle when its last trace drains without a done chunk
        (see :meth:`release`)."""
        streams = self.trace_streams.get(trace_id)
        if streams is None:
            self.trace_streams[trace_id] = {(ctx, stream_id)}
        else:
            streams.add((ctx, stream_id))
        if self.idle_streams:
            self.idle_streams.pop((ctx, stream_id), None)

    def _end_streams(self, trace_id: Any, cancelled: bool) -> None:
        """``trace_id`` drained: each node stream it chunked on that no trace in
        flight still uses goes idle. Its number is kept, so the next message of a
        trace using it numbers on (2.1), but only for the last
        :data:`IDLE_STREAMS_MAX` idle streams: without a done chunk, a server kept
        one entry per request for ever (a per-request stream id as well as the
        default, the trace id). A cancelled trace's streams are over (see
        ``Context.forget_streams``): forgotten."""
        used = self.trace_streams.pop(trace_id, None)
        if not used:
            return
        idle = self.idle_streams
        live = self.traces.keys()
        for ctx, sid in used:
            streams = ctx._open_streams
            users = streams.get(sid)
            if users is None:  # done, or forgotten, since
                continue
            users.discard(trace_id)
            if not (users & live):
                del streams[sid]
                if cancelled:
                    ctx._stream_seq.pop(sid, None)
                else:
                    idle[(ctx, sid)] = None
        while len(idle) > IDLE_STREAMS_MAX:
            (ctx, sid), _ = idle.popitem(last=False)
            if sid not in ctx._open_streams:  # (reopened since: not idle after all)
                ctx._stream_seq.pop(sid, None)

    def refuse_if_cancelled(self, trace_id: Any) -> None:
        """Raise :class:`TraceCancelled` if ``trace_id`` is cancelled."""
        state = self.traces.get(trace_id)
        if state is not None and state.cancelled:
            raise TraceCancelled(trace_id)

    async def wait_chunk_capacity(self, trace_id: Any) -> None:
        """Wait until the trace has room for one more chunk (spec §9).

        Raises:
            TraceCancelled: the trace was cancelled while waiting (checked on the
                state object held here: a cancel may drain and discard the
                trace's bookkeeping before this waiter runs again).
        """
        maxsize = self.queue_maxsize
        if maxsize <= 0:
            return
        loop = asyncio.get_running_loop()
        while True:
            state = self.traces.get(trace_id)
            if state is None or state.pending - 1 < maxsize:
                return
            waiter: asyncio.Future[None] = loop.create_future()
            if state.chunk_waiters is None:
                state.chunk_waiters = []
            state.chunk_waiters.append(waiter)
            await waiter
            if state.cancelled:
                raise TraceCancelled(trace_id)
            if self.stopping or not self.running:
                # Returning would put the chunk on a floe nobody drains any more.
                raise FlowNotRunning(
                    "PenguiFlow stopped while emit_chunk() waited for room; call run() "
                    "again first")

    # -- results (workers) -------------------------------------------------------

    async def deliver_rookery(self, ctx: Context, item: Any, origin: Origin) -> None:
        """Out-of-band delivery: own egress floe, else the first one, else the buffer."""
        if type(item) is Message and isinstance(item.payload, WM):
            state = self.traces.get(item.trace_id)
            if state is not None:
                if state.wm_hops is None:
                    state.wm_hops = set()
                state.wm_hops.add(item.payload.hops)
        floe = ctx._outgoing.get(ROOKERY)
        if floe is None and self.egress:
            floe = self.egress[0]
        if floe is not None:
            await self.put(floe, item, origin)
            return
        self.count(item)
        rookery = self.rookery
        assert rookery is not None, "attach_graph() wires Rookery before any run"
        rookery._buffer.append(item)
        for waiter in rookery._waiters:
            if not waiter.done():
                waiter.set_result(None)
                break

    async def route_result(self, node: Node, ctx: Context, incoming: Any, result: Any,
                           inv: str | None) -> None:
        """Send a node's non-None ``result`` on: successors, Rookery, or the loop (§8)."""
        origin = self.origin_for(inv) if inv is not None else self.origin_of(ctx)
        if type(result) is Message or isinstance(result, Message):
            payload = result.payload
            if isinstance(payload, WM):
                await self._controller_step(ctx, incoming, result, payload, origin)
                return
            if isinstance(payload, FinalAnswer):
                await self.deliver_rookery(ctx, result, origin)
                return
        elif getattr(result, "trace_id", None) is None:
            # A plain value (a dict, a str) carries no trace id: its origin says which
            # trace produced it, so that fetch_traced can tell concurrent traces' results
            # apart. Only this branch pays for it; Messages never come here.
            trace_id = getattr(incoming, "trace_id", None)
            if trace_id is not None:
                origin = (inv, _wall(), trace_id)
        put = self.put
        for floe in ctx._outgoing.values():
            await put(floe, result, origin)

    async def _controller_step(self, ctx: Context, incoming: Any, result: Message, wm: WM,
                               origin: Origin) -> None:
        """Spec §8: budgets and deadline, else loop back to the node itself."""
        deadline = result.deadline_s
        if deadline is not None and time.time() > deadline:
            text = "Deadline exceeded"
        elif wm.budget_tokens is not None and wm.tokens_used >= wm.budget_tokens:
            text = "Token budget exhausted"
        else:
            text = None
            next_hops = wm.hops
            previous = incoming.payload if isinstance(incoming, Message) else None
            if isinstance(previous, WM) and wm.hops <= previous.hops:
                next_hops = previous.hops + 1
            if wm.budget_hops is not None and next_hops >= wm.budget_hops:
                text = "Hop budget exhausted"
        if text is not None:
            # Runtime-made copies get their own meta dict: model_copy is shallow.
            final = result.model_copy(update={"payload": FinalAnswer(text=text),
                                              "meta": dict(result.meta)})
            await self.deliver_rookery(ctx, final, origin)
            return
        looped = result.model_copy(update={"payload": wm.model_copy(update={"hops": next_hops}),
                                           "meta": dict(result.meta)})
        snapshot = None
        if wm.budget_hops is None and wm.budget_tokens is None:
            # Unbounded loop: stream every intermediate state to the caller. Taken
            # before the loop goes on: nothing after the emit may fail, or a retry of
            # this attempt would start a second loop (and each hop double it).
            snapshot = _snapshot(looped)
        own = ctx._outgoing.get(ctx.owner)
        if own is None:
            try:
                await ctx.emit(looped, to=ctx.owner)  # raises 2.1's KeyError
            except KeyError as exc:
                exc.add_note(
                    f"Node {_label(ctx.owner)!r} returned a Message carrying a WM: a controller "
                    "step, which loops back to the node itself. Create the node with "
                    "allow_cycle=True and wire it to itself (node.to(node, ...)), or "
                    "return a FinalAnswer to end the loop.")
                raise
        elif self.binding is None:
            # Never waits for room: the node's own worker is the only one that takes
            # from this floe, so waiting on a full one deadlocked every trace once
            # more than queue_maxsize looped at once. The floe then holds at most
            # one message per looping trace; new work waits on the node's other
            # incoming floes, which stay bounded.
            ctx.loop_back(own, looped)
        else:  # over a bus: the broker's edge, which other processes may drain
            await ctx.emit(looped, to=ctx.owner)
        if snapshot is not None:
            await self.deliver_rookery(ctx, snapshot, origin)

    def put_past_full(self, floe: Floe, item: Any, origin: Origin) -> None:
        """:meth:`put_nowait`, past the floe's maxsize if it is full (a controller's
        loop back to itself; see :meth:`_controller_step`). Not for a bound bus."""
        floe.queue.put_tagged_past_full(item, origin)
        self.count(item)
        if self.message_bus is not None:
            self.spawn(self._publish(floe, item))

    def forget_trace(self, trace_id: Any) -> None:
        """Drop the per-trace state nodes hold for ``trace_id`` (join_k's incomplete
        group: its ``_forget_trace`` hook), and the streams it left open at any node
        (also at those it had moved on from)."""
        for node in self.nodes:
            forget = getattr(node.func, "_forget_trace", None)
            if forget is not None:
                forget(trace_id, self)
        for ctx in self.node_contexts:
            if ctx._open_streams:
                ctx.forget_streams(trace_id)

    async def cancel_finished(self, trace_id: Any) -> None:
        """A cancelled trace drained: forget nodes' per-trace state, ``trace_cancel_finish``."""
        self.forget_trace(trace_id)
        assert self.rookery is not None
        await self.emit_event("trace_cancel_finish", self.rookery, trace_id)
        if self.events.tracer is not None:
            self.trace_drained(trace_id)

    # -- bus -------------------------------------------------------------------

    async def _publish(self, floe: Floe, item: Any) -> None:
        bus = self.message_bus
        if bus is None:
            return
        is_msg = isinstance(item, Message)
        envelope = BusEnvelope(
            edge=floe.label,
            source=_label(floe.source),
            target=_label(floe.target),
            trace_id=getattr(item, "trace_id", None),
            payload=item,
            headers=item.headers.model_dump() if is_msg else None,
            meta=dict(item.meta) if is_msg else None,
        )
        try:
            await bus.publish(envelope)
        except Exception as exc:
            self.events.failures["message_bus_publish_failed"] += 1
            logger.exception("message_bus_publish_failed",
                             extra={"edge": envelope.edge, "trace_id": envelope.trace_id,
                                    "error": safe_repr(exc)})

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        """Run ``coro`` in the background; ``stop()`` awaits it. The task."""
        task = asyncio.get_running_loop().create_task(coro)
        self.bus_tasks.add(task)
        task.add_done_callback(self.bus_tasks.discard)
        return task

    # -- external tasks and root spans -------------------------------------------

    def ensure_trace_event(self, trace_id: Any) -> asyncio.Event:
        """Return (creating if needed) the cancel event of ``trace_id``."""
        state = self.traces.get(trace_id)
        if state is None:
            state = self.traces[trace_id] = TraceState()
        if state.cancel_event is None:
            state.cancel_event = asyncio.Event()
        return state.cancel_event

    def discard_idle(self, trace_id: Any) -> None:
        """Forget ``trace_id``'s state if it holds nothing: no work pending or in
        flight, not cancelled, no chunk waiting for room. Only :meth:`release` drops a
        state otherwise, so one made by :meth:`ensure_trace_event` for a trace with
        no work here (a top-level ``call_playbook``) would stay for ever."""
        state = self.traces.get(trace_id)
        if (state is not None and state.pending <= 0 and state.inflight <= 0
                and not state.cancelled and not state.chunk_waiters):
            del self.traces[trace_id]

    def register_external_task(self, trace_id: Any, task: asyncio.Future[Any]) -> None:
        """Track ``task`` for ``trace_id`` so that ``stop()`` cancels it."""
        self.external.add(task)
        task.add_done_callback(self.external.discard)
        self._track_for_trace(trace_id, task)

    def spawn_for_trace(self, trace_id: Any, coro: Any) -> asyncio.Task[Any]:
        """Run ``coro`` in the background for ``trace_id``: ``stop()`` waits for it
        (up to its deadline, then cuts it) instead of cancelling it at once.

        For work that must outlive the node call that started it and that a stop
        must not cut short: a remote cancel's round trip (a RemoteNode cut short by
        ``stop()`` cancels its remote task). A traced run's root span waits for it
        too, as for a registered external task. The task.
        """
        task = self.spawn(coro)
        self._track_for_trace(trace_id, task)
        return task

    def _track_for_trace(self, trace_id: Any, task: asyncio.Future[Any]) -> None:
        if self.events.tracer is not None:
            # Such a task may still record events (a remote cancel's round trip)
            # after the trace drained: the root span waits for it (see trace_drained).
            tasks = self.trace_tasks.setdefault(trace_id, set())
            tasks.add(task)
            task.add_done_callback(lambda done: self._external_done(trace_id, done))

    def _external_done(self, trace_id: Any, task: asyncio.Future[Any]) -> None:
        tasks = self.trace_tasks.get(trace_id)
        if tasks is None:
            return
        tasks.discard(task)
        if not tasks:
            del self.trace_tasks[trace_id]
            if trace_id in self.drained:
                self.drained.discard(trace_id)
                self._trace_done(trace_id)

    def trace_drained(self, trace_id: Any) -> None:
        """``trace_id`` holds nothing more here: end its root span, once its tasks end."""
        if self.trace_tasks.get(trace_id):
            self.drained.add(trace_id)
        else:
            self._trace_done(trace_id)

    def _trace_done(self, trace_id: Any) -> None:
        tracer = self.events.tracer
        if tracer is not None:
            refused = tracer.trace_done(trace_id, self.flow_id)
            if refused:
                self.events.failures["tracer_failed"] += refused

    # -- events ----------------------------------------------------------------

    async def emit_event(
        self,
        kind: str,
        ctx: Context,
        trace_id: Any,
        *,
        attempt: int = 0,
        latency_ms: float | None = None,
        extra: Mapping[str, Any] | None = None,
        level: int | None = None,
        invocation_id: str | None = None,
        parents: tuple[str, ...] = (),
        queued_ts: float | None = None,
    ) -> None:
        """Build and deliver one FlowEvent, unless nobody would see it."""
        if level is None:
            level = EVENT_LEVELS.get(kind, logging.INFO)
        events = self.events
        log = logger.isEnabledFor(level)
        if not (events.listening or log):
            return
        fields = self.record(kind, ctx, trace_id, attempt, latency_ms,
                             MappingProxyType(dict(extra)) if extra else None,
                             invocation_id, parents, queued_ts, True)
        if events.direct and not log:
            # Only tuple consumers listen (a fast-path store, the tracer): the
            # store's writer builds the StoredEvent later, off the hot path.
            waiter = events.take_fields(fields)
            if waiter is not None:
                await events.wait_store(waiter, kind, fields[0])
            return
        if log or events.middlewares or events.tracer is not None:
            await events.deliver(event_from_fields(fields), fields, level, log)
            return
        # Only a store without the fast path listens: its StoredEvent, no FlowEvent.
        await events.store(stored_from_fields(fields))

    @overload
    def record(
        self, kind: str, ctx: Context, trace_id: Any, attempt: int, latency_ms: float | None,
        extra: Mapping[str, Any] | None, invocation_id: str | None, parents: tuple[str, ...],
        queued_ts: float | None, collect: Literal[False] = False,
    ) -> Awaitable[None] | None: ...

    @overload
    def record(
        self, kind: str, ctx: Context, trace_id: Any, attempt: int, latency_ms: float | None,
        extra: Mapping[str, Any] | None, invocation_id: str | None, parents: tuple[str, ...],
        queued_ts: float | None, collect: Literal[True],
    ) -> EventRecord: ...

    def record(
        self, kind: str, ctx: Context, trace_id: Any, attempt: int, latency_ms: float | None,
        extra: Mapping[str, Any] | None, invocation_id: str | None, parents: tuple[str, ...],
        queued_ts: float | None, collect: bool = False,
    ) -> Any:
        """Number one event, build its :class:`~penguiflow.state.EventRecord` and hand
        it to the tuple consumers, synchronously (the worker's fast path); with
        ``collect``, return it instead.

        ``extra`` is None or a read-only mapping nobody mutates. Every event of
        the flow is built here, whoever consumes it: the record feeds stores and
        the tracer directly, and is the source of a FlowEvent or StoredEvent
        when one is needed.

        Synchronous on purpose: it runs twice per hop, and a coroutine per event
        (plus keyword parsing) cost ~40% of the store's hop overhead (measured). The
        tuple is built here rather than by a helper for the same reason: a call
        more per event was ~15% of recording one (measured). Without ``collect``
        only valid when tuple consumers are the only ones (``EventPipeline.direct``
        and the logger disabled for ``kind``): the worker checks that per
        invocation. Returns the store's waiter when its buffer is full under
        ``on_full="block"``, else None; a consumer that raises is logged and
        counted, never propagated.
        """
        span_id: str | None = None
        parent_span: str | None = None
        if trace_id is not None:
            state = self.traces.get(trace_id)
            if state is not None:
                pending: int | None = state.pending
                inflight = state.inflight
                cancel_event = state.cancel_event
                cancelled = cancel_event is not None and cancel_event.is_set()
                root = state.root_span
                if root is None:
                    root = state.root_span = root_span_id(str(trace_id))
            else:
                pending, inflight, cancelled = 0, 0, False
                root = root_span_id(str(trace_id))
            if type(trace_id) is not str:
                # A user object's own id type (an int, a UUID): events record its text.
                trace_id = str(trace_id)
            if invocation_id is not None:
                span_id = invocation_id
                parent_span = parents[0] if len(parents) == 1 else root
            else:
                span_id = root
        else:
            pending, inflight, cancelled = None, 0, False
        events = self.events
        events.seq = seq = events.seq + 1
        # Context.queue_depth_in/out inlined for a single queue (most nodes): two
        # method calls per event were ~10% of recording one (measured).
        one = ctx._in_one
        depth_in = len(one) if one is not None else ctx.queue_depth_in()
        one = ctx._out_one
        depth_out = len(one) if one is not None else ctx.queue_depth_out()
        # None rather than an empty mapping for ``extra``: a tuple of atoms only
        # is untracked by the GC, which matters while thousands are buffered.
        # tuple.__new__ rather than EventRecord(...): the named tuple's own __new__
        # parses 23 arguments in Python (~0.4 us against ~0.15, measured).
        values = (
            trace_id, _wall(), kind, ctx._owner.name, ctx._owner_id, invocation_id, parents,
            span_id, parent_span, seq, attempt, queued_ts, self.name, self.flow_id,
            latency_ms, depth_in, depth_out, len(ctx._out_queues),
            self.queue_maxsize, inflight, cancelled, pending, extra,
        )
        if not collect:
            # The store alone, taking plain tuples: the values as they are, no
            # EventRecord built here nor copied back to a plain tuple there (the
            # store buffers plain tuples, which the collector untracks): -0.2 us an
            # event, 2.34x -> 2.14x on chain N=5 + SQLite (measured).
            values_sink = events.sole_values
            if values_sink is not None:
                try:
                    return values_sink(values)
                except Exception as exc:
                    events.store_failed(kind, trace_id, exc)
                    return None
        fields = _new_record(EventRecord, values)
        if collect:
            return fields
        sink = events.sole_store
        if sink is None:
            return events.take_fields(fields)
        # The store alone: straight to it (take_fields' work, one call less per event).
        try:
            return sink(fields)
        except Exception as exc:
            events.store_failed(kind, trace_id, exc)
            return None


def _snapshot(message: Message) -> Message:
    """A copy of a looping controller's message for Rookery, immune to the next hop's
    in-place changes: a deep copy; facts no deep copy can take (a client holding a
    lock, nesting past the recursion limit) are shared, in a list of their own."""
    try:
        return message.model_copy(deep=True)
    except Exception:
        wm = message.payload
        return message.model_copy(update={
            "payload": wm.model_copy(update={"facts": list(wm.facts)}),
            "meta": dict(message.meta)})
