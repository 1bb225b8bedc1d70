"""The PenguiFlow runtime: graph construction, lifecycle, emit/fetch, cancellation.

Backpressure: every floe is a bounded queue (``queue_maxsize``, default 64); a
producer awaiting ``emit`` waits while a target floe is full, so a slow node
throttles everything upstream of it. ``emit_nowait`` raises ``QueueFull``
instead of waiting.

Cancellation (``cancel(trace_id)``): the trace's cancel event is set, its queued
items are removed from every floe, and workers running one of its invocations
are interrupted (see ``_worker``). Other traces are untouched. The trace's
pending count then drains to zero and ``trace_cancel_finish`` is emitted once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, overload

from ._context import Context, Targets
from ._events import EVENT_LEVELS, EventPipeline, logger
from ._graph import OPEN_SEA, ROOKERY, CycleError, Endpoint, Floe, Origin, Owner, check_acyclic
from ._graph import owner_label as _label
from ._ids import new_invocation_id, root_span_id
from ._tracer import tracer_for
from ._traces import TraceCancelled, TraceState
from ._worker import NodeWorker
from .bus import BusEnvelope
from .errors import safe_repr
from .metrics import event_from_fields
from .state import EventRecord, stored_from_fields
from .types import WM, FinalAnswer, Message

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider

    from .bus import MessageBus
    from .node import Node
    from .registry import ModelRegistry
    from .state import RemoteBinding, StateStore, StoredEvent

__all__ = [
    "Context",
    "Floe",
    "PenguiFlow",
    "CycleError",
    "call_playbook",
    "create",
    "DEFAULT_QUEUE_MAXSIZE",
]

DEFAULT_QUEUE_MAXSIZE = 64

_new_record = tuple.__new__

# Names that user code imports from here although they are not in __all__.
_COMPAT = (TraceCancelled, Endpoint, OPEN_SEA, ROOKERY)

# The wall clock, bound once: read twice per hop by PenguiFlow._record.
_wall = time.time

Adjacency = tuple["Node", Sequence["Node"]]


class PenguiFlow:
    """A typed flow of nodes connected by bounded queues.

    Args:
        *adjacencies: ``(node, successors)`` pairs, as returned by ``Node.to``.
        queue_maxsize: capacity of every floe; ``<= 0`` means unbounded.
        allow_cycles: skip the cycle check.
        middlewares: async callables receiving every FlowEvent.
        emit_errors_to_rookery: deliver a node's final FlowError to Rookery.
        state_store: persists every FlowEvent (see ``penguiflow.state``).
        message_bus: receives one envelope per floe put (see ``penguiflow.bus``).
        name: the flow's name in events and spans (keyword-only addition;
            default ``"penguiflow"``).
        tracer_provider: the OTel tracer provider to trace with (keyword-only
            addition); default: the global one, looked up at ``run()``. With
            no SDK configured nothing is traced and nothing is paid.
        meter_provider: the OTel meter provider for the flow's metrics
            (keyword-only addition); default: the global one.

    Raises:
        CycleError: the graph has a cycle and ``allow_cycles`` is False.
    """

    def __init__(
        self,
        *adjacencies: Adjacency,
        queue_maxsize: int = DEFAULT_QUEUE_MAXSIZE,
        allow_cycles: bool = False,
        middlewares: Sequence[Any] | None = None,
        emit_errors_to_rookery: bool = False,
        state_store: StateStore | None = None,
        message_bus: MessageBus | None = None,
        name: str = "penguiflow",
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
    ) -> None:
        self.name = name
        # None: the global providers, looked up at run(); with no SDK configured
        # the runtime does no tracing work at all.
        self._tracer_provider = tracer_provider
        self._meter_provider = meter_provider
        #: Random id of this instance: with an event's ``seq`` it identifies the event.
        self.flow_id = new_invocation_id()
        self._queue_maxsize = queue_maxsize
        self._allow_cycles = allow_cycles
        self._emit_errors_to_rookery = emit_errors_to_rookery
        self._state_store = state_store
        self._message_bus = message_bus
        self._events = EventPipeline(state_store, list(middlewares or ()))
        self._registry: ModelRegistry | None = None
        self._traces: dict[Any, TraceState] = {}
        self._workers: list[NodeWorker] = []
        self._external: set[asyncio.Future[Any]] = set()
        # Traced runs only: external tasks per trace, and drained traces whose root
        # span waits for those tasks to end.
        self._trace_tasks: dict[Any, set[asyncio.Future[Any]]] = {}
        self._drained: set[Any] = set()
        self._bus_tasks: set[asyncio.Task[None]] = set()
        self._running = False
        self._stopping = False
        self._stopped = False

        nodes: list[Node] = []
        edges: dict[Node, list[Node]] = {}
        for adjacency in adjacencies:
            node, successors = _check_adjacency(adjacency)
            for member in (node, *successors):
                if member not in edges:
                    edges[member] = []
                    nodes.append(member)
            for successor in successors:
                if successor not in edges[node]:
                    edges[node].append(successor)
        if not allow_cycles:
            check_acyclic(nodes, edges)
        self._nodes = nodes
        self._contexts: dict[Owner, Context] = {n: Context(n, self) for n in nodes}
        self._contexts[OPEN_SEA] = Context(OPEN_SEA, self)
        self._contexts[ROOKERY] = Context(ROOKERY, self)
        floes: list[Floe] = []
        has_parent: set[Node] = set()
        for src in nodes:
            for dst in edges[src]:
                floes.append(self._connect(src, dst))
                if dst is not src or not dst.allow_cycle:
                    has_parent.add(dst)
        for node in nodes:
            if node not in has_parent:
                floes.append(self._connect(OPEN_SEA, node))
        self._egress: list[Floe] = []
        for node in nodes:
            succ = edges[node]
            if not succ or succ == [node]:
                floe = self._connect(node, ROOKERY)
                floes.append(floe)
                self._egress.append(floe)
        self._floes = floes

    def _connect(self, source: Owner, target: Owner) -> Floe:
        floe = Floe(source, target, maxsize=self._queue_maxsize)
        self._contexts[source].add_outgoing_floe(floe)
        self._contexts[target].add_incoming_floe(floe)
        return floe

    # -- introspection ---------------------------------------------------------

    @property
    def registry(self) -> ModelRegistry | None:
        """The registry passed to ``run`` (None if none)."""
        return self._registry

    @property
    def nodes(self) -> tuple[Node, ...]:
        """Every node, in declaration order."""
        return tuple(self._nodes)

    @property
    def floes(self) -> tuple[Floe, ...]:
        """Every floe: node edges, then ingress, then egress."""
        return tuple(self._floes)

    @property
    def running(self) -> bool:
        """Whether ``run()`` was called and ``stop()`` has not finished."""
        return self._running

    @property
    def observer_failures(self) -> Mapping[str, int]:
        """Counts of swallowed observer failures by kind (e.g. ``middleware_error``)."""
        return dict(self._events.failures)

    def context(self, owner: Owner) -> Context:
        """Return the context of a node or endpoint of this flow."""
        return self._contexts[owner]

    def add_middleware(self, mw: Any) -> None:
        """Append a middleware; it receives every later event."""
        self._events.add_middleware(mw)

    # -- lifecycle -------------------------------------------------------------

    def run(
        self,
        *,
        registry: ModelRegistry | None = None,
        state_store: StateStore | None = None,
        message_bus: MessageBus | None = None,
    ) -> None:
        """Start one worker task per node (needs a running event loop).

        Args:
            registry: models for nodes that validate.
            state_store: attach (or replace) the state store for this run
                (PenguiFlow addition; same as the constructor argument).
            message_bus: attach (or replace) the message bus for this run.

        Raises:
            RuntimeError: already running, no running loop, or ``registry``
                lacks a node whose policy validates.
        """
        if self._running:
            raise RuntimeError("PenguiFlow already running")
        loop = asyncio.get_running_loop()
        if state_store is not None:
            self._state_store = state_store
            self._events.set_store(state_store)
        if message_bus is not None:
            self._message_bus = message_bus
        if registry is not None:
            missing = sorted(
                str(n.name) for n in self._nodes
                if n.policy.validate != "none" and (n.name or n.node_id) not in registry
            )
            if missing:
                raise RuntimeError(
                    "ModelRegistry is missing entries for nodes requiring validation: "
                    f"{', '.join(missing)}"
                )
        self._registry = registry
        tracer = tracer_for(self._tracer_provider, self._meter_provider)
        self._events.set_tracer(tracer)
        if tracer is not None:
            tracer.attach(self)
        self._running = True
        self._stopped = False
        for node in self._nodes:
            worker = NodeWorker(self, node, self._contexts[node])
            worker.task = loop.create_task(worker.run(), name=f"penguiflow:{node.name}")
            self._workers.append(worker)

    async def stop(self) -> None:
        """Stop every worker and background task; the flow can ``run()`` again.

        Blocked node coroutines see ``CancelledError``. Pending ``fetch`` calls
        raise ``RuntimeError`` instead of waiting forever.
        """
        if not self._running:
            return
        if self._stopping:
            return
        # Shielded: a caller cancelled mid-stop must not leave workers behind;
        # the shutdown finishes in the background and the caller sees the cancel.
        await asyncio.shield(self._shutdown(asyncio.current_task()))

    async def _shutdown(self, current: asyncio.Task[Any] | None) -> None:
        self._stopping = True
        try:
            tasks = [w.task for w in self._workers if w.task is not None]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*(t for t in tasks if t is not current),
                                 return_exceptions=True)
            externals: list[asyncio.Future[Any]] = [
                t for t in self._external if t is not current]
            for fut in externals:
                fut.cancel()
            await asyncio.gather(*externals, return_exceptions=True)
            if self._bus_tasks:
                await asyncio.gather(*self._bus_tasks, return_exceptions=True)
            await self._flush_store()
            tracer = self._events.tracer
            if tracer is not None:
                tracer.flow_stopped(self)
            self._trace_tasks.clear()
            self._drained.clear()
            for state in self._traces.values():
                state.wake_chunk_waiters()
            self._traces.clear()
            self._contexts[ROOKERY].fail_waiters(RuntimeError(
                "PenguiFlow stopped while fetch() was waiting; call run() again first"))
        finally:
            self._workers.clear()
            self._external.clear()
            self._running = False
            self._stopping = False
            self._stopped = True

    async def _flush_store(self) -> None:
        # Buffering stores (PenguiFlow's SQLite/Postgres stores) write in the
        # background; stop() makes what the flow recorded durable. Duck-typed so a
        # plain 2.1 StateStore needs no flush().
        flush = getattr(self._state_store, "flush", None)
        if flush is None:
            return
        try:
            await flush()
        except Exception as exc:
            self._events.failures["state_store_flush_failed"] += 1
            logger.exception("state_store_flush_failed", extra={"error": safe_repr(exc)})

    # -- emit / fetch ------------------------------------------------------------

    def _check_open(self) -> None:
        if self._stopped and not self._running:
            raise RuntimeError(
                "PenguiFlow is stopped: call run() again before emitting into it")

    def _wm_already_delivered(self, msg: Any) -> bool:
        if type(msg) is Message and isinstance(msg.payload, WM):
            state = self._traces.get(msg.trace_id)
            hops = state.wm_hops if state is not None else None
            return hops is not None and msg.payload.hops in hops
        return False

    async def emit(self, msg: Any, to: Targets = None) -> None:
        """Send ``msg`` into the flow through OpenSea; waits while a floe is full.

        ``msg.trace_id`` (if not None) must be a valid trace id: a str of 1-256
        characters, no control characters, no lone surrogates
        (``penguiflow.types.check_trace_id``).

        Raises:
            KeyError: ``to`` is not an ingress node.
            RuntimeError: the flow was stopped.
            ValueError: ``msg`` has an invalid trace id (nothing is emitted).
        """
        self._check_open()
        if self._wm_already_delivered(msg):
            return
        await self._contexts[OPEN_SEA].emit(msg, to)

    def emit_nowait(self, msg: Any, to: Targets = None) -> None:
        """Like :meth:`emit` but raises ``asyncio.QueueFull`` instead of waiting.

        Raises ``ValueError`` on an invalid trace id, as :meth:`emit` does.
        """
        self._check_open()
        if self._wm_already_delivered(msg):
            return
        self._contexts[OPEN_SEA].emit_nowait(msg, to)

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
    ) -> Any:
        """``Context.emit_chunk`` from OpenSea (its own per-stream counters)."""
        self._check_open()
        return await self._contexts[OPEN_SEA].emit_chunk(
            parent=parent, text=text, stream_id=stream_id, seq=seq, done=done, meta=meta,
            to=to)

    async def fetch(self, from_: Targets = None) -> Any:
        """Await the next item delivered to Rookery (Message, value or FlowError)."""
        rookery = self._contexts[ROOKERY]
        if self._stopped and not self._running and not rookery._buffer and not any(
                f.queue.qsize() for f in rookery._incoming.values()):
            raise RuntimeError("PenguiFlow is stopped and Rookery is empty: call run() first")
        item = await rookery.fetch(from_)
        await self._consumed(item)
        return item

    async def fetch_traced(self, from_: Targets = None) -> tuple[Any, Any]:
        """Like :meth:`fetch`, and say which trace the item belongs to: ``(trace_id, item)``.

        The trace id is the item's own ``trace_id`` (Messages, FlowErrors, chunks)
        or, for a plain value a node returned (a dict, a str), the trace of the
        message that node was processing. None only for an item that has neither
        (one put into the flow by hand). A server that runs many requests through
        one flow uses it to answer each request with its own result, never by
        arrival order (keyword-only addition; the A2A adapter relies on it).
        """
        rookery = self._contexts[ROOKERY]
        item = await self.fetch(from_)
        trace_id = getattr(item, "trace_id", None)
        if trace_id is None:
            origin = rookery.last_origin
            if origin is not None and len(origin) > 2:
                trace_id = origin[2]
        return trace_id, item

    async def fetch_any(self, from_: Targets = None) -> Any:
        """Like :meth:`fetch` but always races the egress floes."""
        item = await self._contexts[ROOKERY].fetch_any(from_)
        await self._consumed(item)
        return item

    def fetch_nowait(self, from_: Targets = None) -> Any:
        """Return an item already delivered to Rookery; ``asyncio.QueueEmpty`` if none."""
        item = self._contexts[ROOKERY].fetch_nowait(from_)
        trace_id = getattr(item, "trace_id", None)
        if trace_id is not None and self._release(trace_id):
            self._spawn_bus(self._cancel_finished(trace_id))
        return item

    async def _consumed(self, item: Any) -> None:
        trace_id = item.trace_id if type(item) is Message else getattr(item, "trace_id", None)
        if trace_id is not None and self._release(trace_id):
            await self._cancel_finished(trace_id)

    # -- puts and accounting -----------------------------------------------------

    def _origin_of(self, ctx: Context) -> Origin:
        inv = ctx._inv
        if inv is None and not self._events.listening:
            return None
        return (inv, time.time())

    def _origin_for(self, inv: str | None) -> Origin:
        return None if inv is None else (inv, time.time())

    def _count(self, item: Any) -> None:
        trace_id = item.trace_id if type(item) is Message else getattr(item, "trace_id", None)
        if trace_id is not None:
            state = self._traces.get(trace_id)
            if state is None:
                state = self._traces[trace_id] = TraceState()
            state.pending += 1

    async def _put(self, floe: Floe, item: Any, origin: Origin) -> None:
        self._count(item)
        try:
            if self._message_bus is not None:
                await self._publish(floe, item)
            await floe.queue.put_tagged(item, origin)
        except BaseException:
            # The put never happened (cancelled while the floe was full): give the
            # count back, or the trace could never drain.
            trace_id = getattr(item, "trace_id", None)
            if trace_id is not None and self._release(trace_id):
                self._spawn_bus(self._cancel_finished(trace_id))
            raise

    def _put_nowait(self, floe: Floe, item: Any, origin: Origin) -> None:
        floe.queue.put_tagged_nowait(item, origin)
        self._count(item)
        if self._message_bus is not None:
            self._spawn_bus(self._publish(floe, item))

    def _release(self, trace_id: Any) -> bool:
        """Count one item of ``trace_id`` as consumed; True if a cancelled trace drained."""
        state = self._traces.get(trace_id)
        if state is None:
            return False
        state.pending -= 1
        if state.chunk_waiters and state.pending <= self._queue_maxsize:
            state.wake_chunk_waiters()
        if state.pending > 0:
            return False
        del self._traces[trace_id]
        state.wake_chunk_waiters()
        if self._events.tracer is not None and not state.cancelled:
            # A cancelled trace ends its root span after trace_cancel_finish.
            self._trace_drained(trace_id)
        return state.cancelled

    def _refuse_if_cancelled(self, trace_id: Any) -> None:
        state = self._traces.get(trace_id)
        if state is not None and state.cancelled:
            raise TraceCancelled(trace_id)

    async def _wait_chunk_capacity(self, trace_id: Any) -> None:
        """Wait until the trace has room for one more chunk (spec §9).

        Raises:
            TraceCancelled: the trace was cancelled while waiting (checked on the
                state object held here: a cancel may drain and discard the
                trace's bookkeeping before this waiter runs again).
        """
        maxsize = self._queue_maxsize
        if maxsize <= 0:
            return
        loop = asyncio.get_running_loop()
        while True:
            state = self._traces.get(trace_id)
            if state is None or state.pending - 1 < maxsize:
                return
            waiter: asyncio.Future[None] = loop.create_future()
            if state.chunk_waiters is None:
                state.chunk_waiters = []
            state.chunk_waiters.append(waiter)
            await waiter
            if state.cancelled:
                raise TraceCancelled(trace_id)
            if self._stopping or not self._running:
                return

    async def _deliver_rookery(self, ctx: Context, item: Any, origin: Origin) -> None:
        """Out-of-band delivery: own egress floe, else the first one, else the buffer."""
        if type(item) is Message and isinstance(item.payload, WM):
            state = self._traces.get(item.trace_id)
            if state is not None:
                if state.wm_hops is None:
                    state.wm_hops = set()
                state.wm_hops.add(item.payload.hops)
        floe = ctx._outgoing.get(ROOKERY)
        if floe is None and self._egress:
            floe = self._egress[0]
        if floe is not None:
            await self._put(floe, item, origin)
            return
        self._count(item)
        rookery = self._contexts[ROOKERY]
        rookery._buffer.append(item)
        for waiter in rookery._waiters:
            if not waiter.done():
                waiter.set_result(None)
                break

    async def _route_result(self, node: Node, ctx: Context, incoming: Any, result: Any,
                            inv: str | None) -> None:
        origin = self._origin_for(inv) if inv is not None else self._origin_of(ctx)
        if type(result) is Message or isinstance(result, Message):
            payload = result.payload
            if isinstance(payload, WM):
                await self._controller_step(ctx, incoming, result, payload, origin)
                return
            if isinstance(payload, FinalAnswer):
                await self._deliver_rookery(ctx, result, origin)
                return
        elif getattr(result, "trace_id", None) is None:
            # A plain value (a dict, a str) carries no trace id: its origin says which
            # trace produced it, so that fetch_traced can tell concurrent traces' results
            # apart. Only this branch pays for it; Messages never come here.
            trace_id = getattr(incoming, "trace_id", None)
            if trace_id is not None:
                origin = (inv, _wall(), trace_id)
        put = self._put
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
            await self._deliver_rookery(ctx, final, origin)
            return
        looped = result.model_copy(update={"payload": wm.model_copy(update={"hops": next_hops}),
                                           "meta": dict(result.meta)})
        await ctx.emit(looped, to=ctx.owner)
        if wm.budget_hops is None and wm.budget_tokens is None:
            # Unbounded loop: stream every intermediate state to the caller.
            await self._deliver_rookery(ctx, looped.model_copy(deep=True), origin)

    # -- bus -------------------------------------------------------------------

    async def _publish(self, floe: Floe, item: Any) -> None:
        bus = self._message_bus
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
            self._events.failures["message_bus_publish_failed"] += 1
            logger.exception("message_bus_publish_failed",
                             extra={"edge": envelope.edge, "trace_id": envelope.trace_id,
                                    "error": safe_repr(exc)})

    def _spawn_bus(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._bus_tasks.add(task)
        task.add_done_callback(self._bus_tasks.discard)

    # -- events ----------------------------------------------------------------

    async def _emit_event(
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
        events = self._events
        log = logger.isEnabledFor(level)
        if not (events.listening or log):
            return
        fields = self._event_fields(kind, ctx, trace_id, attempt, latency_ms,
                                    MappingProxyType(dict(extra)) if extra else None,
                                    invocation_id, parents, queued_ts)
        if events.direct and not log:
            # Only tuple consumers listen (a fast-path store, the tracer): the
            # store's writer builds the StoredEvent later, off the hot path.
            waiter = events.take_fields(fields)
            if waiter is not None:
                await waiter
            return
        if log or events.middlewares or events.tracer is not None:
            await events.deliver(event_from_fields(fields), fields, level, log)
            return
        # Only a store without the fast path listens: its StoredEvent, no FlowEvent.
        await events.store(stored_from_fields(fields))

    def _event_fields(
        self, kind: str, ctx: Context, trace_id: Any, attempt: int, latency_ms: float | None,
        extra: Mapping[str, Any] | None, invocation_id: str | None, parents: tuple[str, ...],
        queued_ts: float | None,
    ) -> EventRecord:
        """Number one event and return its EventRecord (``penguiflow.state``).

        ``extra`` is None or a read-only mapping nobody mutates. Every event of
        the flow is built by :meth:`_record`, whoever consumes it: the tuple feeds
        stores and the tracer directly, and is the source of a FlowEvent or
        StoredEvent when one is needed.
        """
        return self._record(kind, ctx, trace_id, attempt, latency_ms, extra, invocation_id,
                            parents, queued_ts, True)

    @overload
    def _record(
        self, kind: str, ctx: Context, trace_id: Any, attempt: int, latency_ms: float | None,
        extra: Mapping[str, Any] | None, invocation_id: str | None, parents: tuple[str, ...],
        queued_ts: float | None, collect: Literal[False] = False,
    ) -> Awaitable[None] | None: ...

    @overload
    def _record(
        self, kind: str, ctx: Context, trace_id: Any, attempt: int, latency_ms: float | None,
        extra: Mapping[str, Any] | None, invocation_id: str | None, parents: tuple[str, ...],
        queued_ts: float | None, collect: Literal[True],
    ) -> EventRecord: ...

    def _record(
        self, kind: str, ctx: Context, trace_id: Any, attempt: int, latency_ms: float | None,
        extra: Mapping[str, Any] | None, invocation_id: str | None, parents: tuple[str, ...],
        queued_ts: float | None, collect: bool = False,
    ) -> Any:
        """Number one event, build its EVENT_FIELDS tuple and hand it to the tuple
        consumers, synchronously (the worker's fast path); with ``collect``, return it.

        Synchronous on purpose: it runs twice per hop, and a coroutine per event
        (plus keyword parsing) cost ~40% of the store's hop overhead (measured). The
        tuple is built here rather than by a helper for the same reason: a call
        more per event was ~15% of recording one (measured). Only valid when tuple
        consumers are the only ones (``EventPipeline.direct`` and the logger
        disabled for ``kind``): the worker checks that per invocation. Returns the
        store's waiter when its buffer is full under ``on_full="block"``, else
        None; a consumer that raises is logged and counted, never propagated.
        """
        span_id: str | None = None
        parent_span: str | None = None
        if trace_id is not None:
            state = self._traces.get(trace_id)
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
            if invocation_id is not None:
                span_id = invocation_id
                parent_span = parents[0] if len(parents) == 1 else root
            else:
                span_id = root
        else:
            pending, inflight, cancelled = None, 0, False
        events = self._events
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
        fields = _new_record(EventRecord, (
            trace_id, _wall(), kind, ctx._owner.name, ctx._owner_id, invocation_id, parents,
            span_id, parent_span, seq, attempt, queued_ts, self.name, self.flow_id,
            latency_ms, depth_in, depth_out, len(ctx._out_queues),
            self._queue_maxsize, inflight, cancelled, pending, extra,
        ))
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

    async def record_remote_event(
        self,
        *,
        event: str,
        node: Node,
        context: Context,
        trace_id: str | None,
        latency_ms: float | None,
        level: int = logging.INFO,
        extra: Mapping[str, Any] | None = None,
        invocation_id: str | None = None,
    ) -> None:
        """Emit a FlowEvent of kind ``event`` (attempt 0) through the pipeline.

        ``invocation_id`` (keyword-only addition) names the invocation the event
        belongs to; default: the one ``context`` is running. A task that outlives
        the invocation (a remote cancel) passes the id it captured.
        """
        await self._emit_event(event, context, trace_id, latency_ms=latency_ms, extra=extra,
                               level=level, invocation_id=invocation_id or context._inv)

    async def adopt_trace_parent(self, trace_id: str, *, parent_span_id: str,
                                 attributes: Mapping[str, Any] | None = None) -> None:
        """Make ``trace_id``'s root span a child of ``parent_span_id`` (another process's span).

        A server that runs a request inside its caller's trace (W3C ``traceparent``:
        the flow's trace id is the caller's) calls it before emitting the message,
        so the root ``invoke_workflow`` span, exported or rebuilt from the store,
        hangs under the caller's CLIENT span. It records one ``trace_parent`` event
        (extra: ``parent_span_id`` plus ``attributes``, e.g. ``a2a.task.id``),
        which is how stores and ``pf export`` learn the parent too
        (keyword-only addition).

        Raises:
            ValueError: ``parent_span_id`` is not 16 lowercase hex digits, non-zero.
        """
        if (not isinstance(parent_span_id, str) or len(parent_span_id) != 16
                or parent_span_id.strip("0123456789abcdef") or parent_span_id == "0" * 16):
            raise ValueError(
                f"parent_span_id must be 16 lowercase hex digits, not all zero (the span id "
                f"of a W3C traceparent), got {parent_span_id!r}")
        extra = {**(attributes or {}), "parent_span_id": parent_span_id}
        await self._emit_event("trace_parent", self._contexts[OPEN_SEA], trace_id, extra=extra)

    # -- cancellation ------------------------------------------------------------

    def ensure_trace_event(self, trace_id: str) -> asyncio.Event:
        """Return (creating if needed) the cancel event of ``trace_id``."""
        state = self._traces.get(trace_id)
        if state is None:
            state = self._traces[trace_id] = TraceState()
        if state.cancel_event is None:
            state.cancel_event = asyncio.Event()
        return state.cancel_event

    def register_external_task(self, trace_id: str | None, task: asyncio.Future[Any]) -> None:
        """Track ``task`` for ``trace_id`` so that ``stop()`` cancels it."""
        if trace_id is None:
            return
        self._external.add(task)
        task.add_done_callback(self._external.discard)
        if self._events.tracer is not None:
            # Such a task may still record events (a remote cancel's round trip)
            # after the trace drained: the root span waits for it (see _trace_done).
            tasks = self._trace_tasks.setdefault(trace_id, set())
            tasks.add(task)
            task.add_done_callback(lambda done: self._external_done(trace_id, done))

    def _external_done(self, trace_id: Any, task: asyncio.Future[Any]) -> None:
        tasks = self._trace_tasks.get(trace_id)
        if tasks is None:
            return
        tasks.discard(task)
        if not tasks:
            del self._trace_tasks[trace_id]
            if trace_id in self._drained:
                self._drained.discard(trace_id)
                self._trace_done(trace_id)

    def _trace_drained(self, trace_id: Any) -> None:
        """``trace_id`` holds nothing more here: end its root span, once its tasks end."""
        if self._trace_tasks.get(trace_id):
            self._drained.add(trace_id)
        else:
            self._trace_done(trace_id)

    def _trace_done(self, trace_id: Any) -> None:
        tracer = self._events.tracer
        if tracer is not None:
            tracer.trace_done(trace_id, self.flow_id)

    async def cancel(self, trace_id: str) -> bool:
        """Cancel one trace; True if it had pending or in-flight work.

        Raises:
            RuntimeError: the flow is not running.
        """
        if not self._running:
            raise RuntimeError("PenguiFlow is not running")
        state = self._traces.get(trace_id)
        if state is None or (state.pending <= 0 and state.inflight <= 0):
            return False
        event = self.ensure_trace_event(trace_id)
        if not event.is_set():
            event.set()
            await self._emit_event("trace_cancel_start", self._contexts[OPEN_SEA], trace_id,
                                   extra={"pending": state.pending})

        def belongs(item: Any) -> bool:
            return getattr(item, "trace_id", None) == trace_id

        drained = False
        for floe in self._floes:
            for _ in floe.queue.remove_where(belongs):
                drained = self._release(trace_id) or drained
        for worker in self._workers:
            worker.request_trace_cancel(trace_id)
        if drained:
            await self._cancel_finished(trace_id)
        return True

    async def _cancel_finished(self, trace_id: Any) -> None:
        for node in self._nodes:
            # Per-trace state a node holds (join_k's incomplete group) goes with it.
            forget = getattr(node.func, "_forget_trace", None)
            if forget is not None:
                forget(trace_id)
        await self._emit_event("trace_cancel_finish", self._contexts[ROOKERY], trace_id)
        if self._events.tracer is not None:
            self._trace_drained(trace_id)

    # -- 2.1 distribution helpers ----------------------------------------------

    async def load_history(self, trace_id: str) -> Sequence[StoredEvent]:
        """Return the stored events of ``trace_id``.

        Raises:
            RuntimeError: the flow was created without a state store.
        """
        if self._state_store is None:
            raise RuntimeError("PenguiFlow was created without a state_store")
        return await self._state_store.load_history(trace_id)

    async def save_remote_binding(self, binding: RemoteBinding) -> None:
        """Persist ``binding`` in the state store, if any; failures are logged."""
        if self._state_store is None:
            return
        try:
            await self._state_store.save_remote_binding(binding)
        except Exception as exc:
            self._events.failures["state_store_binding_failed"] += 1
            logger.exception("state_store_binding_failed",
                             extra={"trace_id": binding.trace_id, "error": safe_repr(exc)})

    def __repr__(self) -> str:
        return (f"PenguiFlow(name={self.name!r}, nodes={len(self._nodes)}, "
                f"running={self._running})")


def _check_adjacency(adjacency: Any) -> tuple[Node, Sequence[Node]]:
    from .node import Node

    if (isinstance(adjacency, tuple) and len(adjacency) == 2
            and isinstance(adjacency[0], Node)
            and isinstance(adjacency[1], Sequence)
            and all(isinstance(n, Node) for n in adjacency[1])):
        return adjacency[0], adjacency[1]
    hint = ""
    if isinstance(adjacency, Node):
        hint = f" (did you mean {adjacency.name}.to()?)"
    raise TypeError(
        "create() takes adjacencies built with node.to(successor, ...), i.e. "
        f"(Node, (Node, ...)) pairs; got {adjacency!r}{hint}")


def create(*adjacencies: Adjacency, **kwargs: Any) -> PenguiFlow:
    """Build a :class:`PenguiFlow` (forwards everything to the constructor)."""
    return PenguiFlow(*adjacencies, **kwargs)


# Re-exported: user code imports call_playbook from penguiflow.core.
from ._playbook import call_playbook  # noqa: E402
