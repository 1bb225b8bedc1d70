"""The PenguiFlow runtime: graph construction, lifecycle, emit/fetch, cancellation.

``PenguiFlow`` is the public face: it builds the graph (contexts and floes),
starts and stops the workers, and offers emit/fetch/cancel. The engine the
messages run through, shared by every context and worker, is its
:class:`~penguiflow._runtime.FlowRuntime`; they never call ``PenguiFlow`` itself.

Backpressure: every floe is a bounded queue (``queue_maxsize``, default 64); a
producer awaiting ``emit`` waits while a target floe is full, so a slow node
throttles everything upstream of it. ``emit_nowait`` raises ``QueueFull``
instead of waiting.

Cancellation (``cancel(trace_id)``): the trace's cancel event is set, its queued
items are removed from every floe, and workers running one of its invocations
are interrupted (see ``_worker``). Other traces are untouched. The trace's
pending count then drains to zero and ``trace_cancel_finish`` is emitted once.

Stopping (``stop()``): workers are cancelled (each records ``node_cancelled``),
external and background tasks are awaited, then a buffering store is flushed.
The waits that depend on the store (the workers' last events, the flush) share
one deadline, ``store_timeout_s``: a hung writer or database costs at most that
long, and what was not stored is reported (``state_store_flush_timeout``).
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context

from ._context import Context, Targets
from ._events import EventPipeline, logger
from ._graph import (
    OPEN_SEA,
    ROOKERY,
    CycleError,
    Endpoint,
    Floe,
    Owner,
    check_acyclic,
    owner_label,
)
from ._ids import new_invocation_id
from ._playbook import call_playbook
from ._runtime import FlowRuntime
from ._tracer import tracer_for
from ._traces import TraceCancelled, TraceState
from ._worker import NodeWorker
from .binding import _TURN, BusBinding, Inbound, is_delivering
from .errors import (
    SAFE_TEXT_LIMIT,
    ConfigurationError,
    FlowAlreadyRunning,
    FlowNotRunning,
    InvalidArgument,
    InvalidArgumentType,
    safe_repr,
    safe_str,
)
from .tracing import current_scope
from .types import WM, Message
from .wire import WireTypes

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

#: Default bound, in seconds, of what ``stop()`` waits for the state store: the
#: workers' last events and the flush (``stop(store_timeout_s=...)``).
STOP_STORE_TIMEOUT_S = 5.0

# Names that user code imports from here although they are not in __all__
# (call_playbook is in it: user code imports it from here too).
_COMPAT = (TraceCancelled, Endpoint, OPEN_SEA, ROOKERY)

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
            (keyword-only addition); default: the global one. The metrics are
            measured from the flow's spans: with no SDK tracer provider (nothing
            traced) none are recorded. A provider that raises while handing out
            its tracer or meter is logged and counted (``tracer_failed``) and the
            flow runs untraced.
        error_text_max: how many characters of a failed node's exception text
            (``exception``, the FlowError's message) and of its formatted
            traceback (``traceback``) an event keeps (keyword-only addition;
            default 8192). Longer text keeps its first ``error_text_max``
            characters and ends with ``"… [cut: N more characters]"``.

    Raises:
        CycleError: the graph has a cycle and ``allow_cycles`` is False.
        InvalidArgumentType: an adjacency is not ``(Node, (Node, ...))``, or
            ``error_text_max`` is not an int.
        InvalidArgument: ``error_text_max`` is below 1.
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
        error_text_max: int = SAFE_TEXT_LIMIT,
    ) -> None:
        _check_error_text_max(error_text_max)
        # None: the global providers, looked up at run(); with no SDK configured
        # the runtime does no tracing work at all.
        self._tracer_provider = tracer_provider
        self._meter_provider = meter_provider
        self._allow_cycles = allow_cycles
        self._state_store = state_store
        events = EventPipeline(state_store, list(middlewares or ()))
        rt = self._rt = FlowRuntime(
            name=name, flow_id=new_invocation_id(), queue_maxsize=queue_maxsize,
            emit_errors_to_rookery=emit_errors_to_rookery, message_bus=message_bus,
            events=events, error_text_max=error_text_max)
        # The same objects as the runtime's, read under these names by the live
        # tracer and the OTel metrics (penguiflow._tracer, _otel_metrics).
        self._events = events
        self._traces: dict[Any, TraceState] = rt.traces
        self._workers: list[NodeWorker] = []
        #: The shutdown in progress: a stop() that comes while it runs awaits it.
        self._stopping: asyncio.Future[None] | None = None

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
        owners: list[Owner] = [*nodes, OPEN_SEA, ROOKERY]
        self._contexts: dict[Owner, Context] = {
            owner: Context(owner, self, flow_runtime=rt) for owner in owners}
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
        egress: list[Floe] = []
        for node in nodes:
            succ = edges[node]
            if not succ or succ == [node]:
                floe = self._connect(node, ROOKERY)
                floes.append(floe)
                egress.append(floe)
        self._floes = floes
        rt.attach_graph(nodes, self._contexts[ROOKERY], egress)
        rt.node_contexts = [self._contexts[node] for node in nodes]

    def _connect(self, source: Owner, target: Owner) -> Floe:
        floe = Floe(source, target, maxsize=self._rt.queue_maxsize)
        self._contexts[source].add_outgoing_floe(floe)
        self._contexts[target].add_incoming_floe(floe)
        return floe

    # -- introspection ---------------------------------------------------------

    @property
    def name(self) -> str:
        """The flow's name in events and spans (assignable)."""
        return self._rt.name

    @name.setter
    def name(self, value: str) -> None:
        self._rt.name = value

    @property
    def flow_id(self) -> str:
        """Random id of this instance: with an event's ``seq`` it identifies the event."""
        return self._rt.flow_id

    @property
    def registry(self) -> ModelRegistry | None:
        """The registry passed to ``run`` (None if none)."""
        return self._rt.registry

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
        return self._rt.running

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
        nodes: Iterable[str] | None = None,
    ) -> None:
        """Start one worker task per node (needs a running event loop).

        Args:
            registry: models for nodes that validate.
            state_store: attach (or replace) the state store for this run
                (PenguiFlow addition; same as the constructor argument).
            message_bus: attach (or replace) the message bus for this run. A
                *delivering* bus (``penguiflow.binding.DeliveringBus``, e.g.
                ``penguiflow_distributed.RedisMessageBus``) carries every put
                between processes instead of only publishing it.
            nodes: with a delivering bus, the names of the nodes this process
                runs (keyword-only addition): None runs every node, ``[]`` none
                (a client that only emits and fetches). Results come back to the
                process that emitted their trace.

        Raises:
            FlowAlreadyRunning: (a ``RuntimeError``) the flow is running.
            ConfigurationError: (a ``RuntimeError``) ``registry`` lacks a node
                whose policy validates.
            RuntimeError: no running event loop.
        """
        rt = self._rt
        if rt.running:
            raise FlowAlreadyRunning(
                "PenguiFlow already running",
                hint="await flow.stop() before calling run() again, or build one flow per "
                     "concurrent use (a running flow serves many traces at once)")
        loop = asyncio.get_running_loop()
        if state_store is not None:
            self._state_store = state_store
            self._events.set_store(state_store)
        if message_bus is not None:
            rt.message_bus = message_bus
        if registry is not None:
            missing = sorted(
                str(n.name) for n in self._nodes
                if n.policy.validate != "none" and (n.name or n.node_id) not in registry
            )
            if missing:
                raise ConfigurationError(
                    "ModelRegistry is missing entries for nodes requiring validation: "
                    f"{', '.join(missing)}",
                    hint="register each with registry.register(name, InModel, OutModel), "
                         "or build those nodes with NodePolicy(validate='none')")
        local = self._local_nodes(nodes, rt.message_bus)
        rt.registry = registry
        try:
            tracer = tracer_for(self._tracer_provider)
            if tracer is not None:
                tracer.attach(self, self._meter_provider)
        except Exception as exc:  # a broken provider: the flow runs, untraced
            tracer = None
            self._events.failures["tracer_failed"] += 1
            logger.error("tracer_failed", extra={
                "flow": rt.name, "error": f"{type(exc).__name__}: {safe_str(exc)}",
                "hint": "the tracer or meter provider raised while handing out its "
                        "tracer or meter; this flow runs without tracing"})
        self._events.set_tracer(tracer)
        rt.running = True
        rt.stopped = False
        workers_context = contextvars.copy_context()
        workers_context.run(_forget_the_callers_request)
        if local is not None:
            self._bind(local, registry, workers_context)
        for node in self._nodes:
            if local is not None and owner_label(node) not in local:
                continue
            worker = NodeWorker(rt, node, self._contexts[node])
            # Long-lived tasks serve every later trace: they must not keep what is
            # the caller's own request (its current span, log scope, bus turn). A
            # copy each: a task's ContextVar.set (its turn, its log scope) writes to
            # its own context, and one shared by every worker would leak across them.
            worker.task = loop.create_task(worker.run(), name=f"penguiflow:{node.name}",
                                           context=workers_context.copy())
            self._workers.append(worker)

    def _local_nodes(self, nodes: Iterable[str] | None,
                     bus: MessageBus | None) -> frozenset[str] | None:
        """The labels of the nodes to run here when bound to a delivering bus, else None."""
        if bus is None or not is_delivering(bus):
            if nodes is not None:
                raise ConfigurationError(
                    "nodes= needs a delivering message bus",
                    hint="pass message_bus=RedisMessageBus(url) (penguiflow-distributed) to "
                         "run a share of the flow's nodes in this process, or drop nodes=")
            return None
        labels = [owner_label(n) for n in self._nodes]
        if nodes is None:
            return frozenset(labels)
        if isinstance(nodes, str):
            raise InvalidArgumentType(
                f"nodes must be a list of node names, not a str ({nodes!r}); "
                f"e.g. nodes=[{nodes!r}]")
        chosen = frozenset(nodes)
        unknown = sorted(chosen.difference(labels))
        if unknown:
            raise ConfigurationError(
                f"nodes= names no node of this flow: {', '.join(map(repr, unknown))}",
                hint=f"the flow's nodes are {', '.join(sorted(labels))}")
        return chosen

    def _bind(self, local: frozenset[str], registry: ModelRegistry | None,
              context: contextvars.Context) -> None:
        rt = self._rt
        bus = rt.message_bus
        assert bus is not None
        types = WireTypes(registry.models() if registry is not None else ())
        extra = getattr(bus, "types", None)
        if extra:
            types.add(extra)
        binding = BusBinding(
            rt=rt, bus=bus, floes={f.label: f for f in self._floes},  # type: ignore[arg-type]
            contexts=self._contexts, local_nodes=local, types=types,
            cancel_local=self._cancel_local)
        rt.binding = binding
        task = asyncio.get_running_loop().create_task(
            bus.bind(binding), name=f"penguiflow:bind:{self.name}",  # type: ignore[attr-defined]
            context=context.copy())
        rt.external.add(task)
        task.add_done_callback(_bind_done)

    @property
    def binding(self) -> BusBinding | None:
        """The flow's binding to a delivering bus while it runs bound, else None."""
        return self._rt.binding

    async def stop(self, *, store_timeout_s: float | None = STOP_STORE_TIMEOUT_S) -> None:
        """Stop every worker and background task; the flow can ``run()`` again.

        Blocked node coroutines see ``CancelledError``. Pending ``fetch`` calls
        raise :class:`~penguiflow.errors.FlowNotRunning` (a ``RuntimeError``)
        instead of waiting forever.

        Args:
            store_timeout_s: how long, in total, ``stop()`` waits for the state
                store: for the workers' last events (``node_cancelled``) to be
                taken and for a buffering store's ``flush()`` (keyword-only
                addition; default :data:`STOP_STORE_TIMEOUT_S`, 5 s; None waits
                as long as it takes). When it runs out, the waits are cut short
                (the flush is cancelled, or not started), one
                ``state_store_flush_timeout`` WARNING names the store, the
                timeout and how many events were not stored (the store's
                ``pending_events``, when it has one), the failure is counted in
                :attr:`observer_failures`, and ``stop()`` returns. Without a
                store the same bound applies to the workers' last events
                reaching middlewares (``observer_stop_timeout``). A node that
                ignores its cancellation (catches ``CancelledError`` and goes on)
                is named in a ``node_stop_timeout`` WARNING instead. The same
                deadline bounds the wait for background message-bus publishes
                and registered external tasks: those still running then are
                cancelled, counted and logged (``background_stop_timeout``).

        Raises:
            InvalidArgument: (a ``ValueError``) ``store_timeout_s`` is negative.
        """
        if store_timeout_s is not None and not store_timeout_s >= 0:
            raise InvalidArgument(
                f"store_timeout_s must be >= 0 seconds, or None to wait for the store as "
                f"long as it takes; got {store_timeout_s!r}")
        rt = self._rt
        stopping = self._stopping
        if stopping is None or stopping.done():
            if not rt.running:
                return
            # One shutdown, whoever asks: a stop() arriving while it runs (the app and
            # an A2A adapter both stopping the flow) waits for the same one, so that
            # every caller returns once the flow has stopped (spec §7.1), and two
            # callers at the same instant cannot run two shutdowns.
            stopping = self._stopping = asyncio.ensure_future(
                self._shutdown(asyncio.current_task(), store_timeout_s))
        # Shielded: a caller cancelled mid-stop must not leave workers behind;
        # the shutdown finishes in the background and the caller sees the cancel.
        await asyncio.shield(stopping)

    async def _shutdown(self, current: asyncio.Task[Any] | None,
                        store_timeout_s: float | None) -> None:
        rt = self._rt
        rt.stopping = True
        loop = asyncio.get_running_loop()
        deadline = None if store_timeout_s is None else loop.time() + store_timeout_s
        try:
            tasks = [w.task for w in self._workers if w.task is not None]
            for task in tasks:
                task.cancel()
            # A worker's last act is recording node_cancelled, which waits while a
            # blocking store's buffer is full: bounded by the store's deadline.
            cut = await _settle([t for t in tasks if t is not current], deadline)
            if cut:
                cut -= self._report_stuck_nodes(store_timeout_s, current)
            externals: list[asyncio.Future[Any]] = [t for t in rt.external if t is not current]
            for fut in externals:
                fut.cancel()
            # Bounded too: a registered task that ignores its cancel must not hang stop().
            others_cut = await _settle(externals, deadline)
            binding = rt.binding
            if binding is not None:
                # Sends and settles still on their way get a moment (an edge may be
                # full with nobody left to drain it), then the bus stops: what was
                # delivered here and not settled goes to another process once its
                # entries are claimed.
                await _settle(list(rt.bus_tasks), loop.time() + BOUND_STOP_S)
                try:
                    await binding.bus.unbind()
                except Exception as exc:
                    logger.error("message_bus_unbind_failed", extra={"error": safe_repr(exc)})
            # Background publishes (emit_nowait to a message bus) are awaited, up to the
            # same deadline: a broker that never answers (no client timeout) must not
            # hang stop(); those cut short are counted and named in one warning.
            others_cut += await _settle(list(rt.bus_tasks), deadline)
            if others_cut:
                self._events.failures["background_stop_timeout"] += others_cut
                logger.warning("background_stop_timeout", extra={
                    "timeout_s": store_timeout_s, "tasks_cut": others_cut,
                    "detail": "message-bus publishes or registered tasks still running "
                              "when stop()'s store_timeout_s ran out were cancelled"})
            if cut or not await self._flush_store(deadline):
                self._report_store_timeout(store_timeout_s, cut)
            tracer = self._events.tracer
            if tracer is not None:
                refused = tracer.flow_stopped(self)
                if refused:
                    self._events.failures["tracer_failed"] += refused
            self._contexts[ROOKERY].fail_waiters(FlowNotRunning(
                "PenguiFlow stopped while fetch() was waiting; call run() again first"))
            # An emit() waiting for room: the nodes that would make it are stopped.
            # Failed before the counts below are made anew, and given a loop turn to
            # give back the count each took for its message: a give-back after the
            # recount would take one from an item still queued.
            stopped = FlowNotRunning(
                "PenguiFlow stopped while emit() waited for room on a full floe; its "
                "message was not put; call run() again first")
            for floe in self._floes:
                floe.queue.fail_putters(stopped)
            await asyncio.sleep(0)
            rt.trace_tasks.clear()
            rt.drained.clear()
            for state in rt.traces.values():
                state.wake_chunk_waiters()
            rt.traces.clear()
            # Unfinished streams' seqs go with the runtime's per-trace bookkeeping (spec:
            # stop "clears all per-trace bookkeeping").
            for ctx in self._contexts.values():
                ctx._stream_seq.clear()
                ctx._open_streams.clear()
            rt.trace_streams.clear()
            rt.idle_streams.clear()
            if binding is not None:
                # Parcels the bus delivered here and nobody settled are still pending
                # in the broker, under this flow's worker id: they are delivered again
                # (to whichever process claims them, or read back by this flow's next
                # run). Kept here too, the same process would run them twice.
                for floe in self._floes:
                    unsettled: set[int] = {
                        id(item) for item, origin in zip(
                            floe.queue._queue, floe.queue._origins, strict=True)
                        if type(origin) is Inbound and origin.handle is not None}
                    if unsettled:
                        def delivered(item: Any, ids: set[int] = unsettled) -> bool:
                            return id(item) in ids
                        floe.queue.remove_tagged_where(delivered)
            # What stays queued (taken up again after run(), or fetched) is counted
            # anew: the counts just cleared covered it, and a restarted flow whose
            # traces undercount it finishes a cancel before they drain.
            for floe in self._floes:
                for item in floe.queue._queue:
                    rt.count(item)
            for item in self._contexts[ROOKERY]._buffer:
                rt.count(item)
            # This flow's join groups go too, except those of traces with items still
            # queued (just counted anew): such an input completes its group after
            # run(). A group whose other input failed, or was cut by this stop, would
            # otherwise join a later run of its trace id with the leftover.
            for node in self._nodes:
                forget_all = getattr(node.func, "_forget_all", None)
                if forget_all is not None:
                    forget_all(rt, rt.traces.keys())
        finally:
            self._workers.clear()
            rt.external.clear()
            rt.binding = None
            rt.running = False
            rt.stopping = False
            rt.stopped = True

    async def _flush_store(self, deadline: float | None) -> bool:
        """Flush a buffering store before ``deadline``; False if it did not finish in time.

        Buffering stores (PenguiFlow's SQLite/Postgres stores) write in the
        background; stop() makes what the flow recorded durable. Duck-typed so a
        plain 2.1 StateStore needs no flush(). What ``flush()`` returns is awaited
        when it is awaitable (an ``async def``, a wrapper returning the inner
        store's coroutine) and otherwise ignored: a 2.1 store's own synchronous
        ``flush`` helper has then done its work (it made stop() raise TypeError).
        """
        flush = getattr(self._state_store, "flush", None)
        if flush is None:
            return True
        try:
            result = flush()
            if not inspect.isawaitable(result):
                return True
            task: asyncio.Future[Any] = asyncio.ensure_future(result)
        except Exception as raised:  # a synchronous flush that raised: a failed flush
            self._events.failures["state_store_flush_failed"] += 1
            logger.error("state_store_flush_failed", exc_info=raised,
                         extra={"error": safe_repr(raised)})
            return True
        if await _settle([task], deadline):
            return False
        exc = None if task.cancelled() else task.exception()
        if exc is not None:
            self._events.failures["state_store_flush_failed"] += 1
            logger.error("state_store_flush_failed", exc_info=exc, extra={"error": safe_repr(exc)})
        return True

    def _report_stuck_nodes(self, timeout_s: float | None,
                            current: asyncio.Task[Any] | None) -> int:
        """Name the nodes whose workers outlived a second cancel in the node's own
        code; how many there are.

        Such a node ignores cancellation (catches ``CancelledError`` and goes on):
        that is the node's doing, not the store's or a middleware's, so it is
        reported as such (``node_stop_timeout``) and left running, as asyncio
        cannot end it. A worker still in observer code is not counted here.
        """
        # In the node's own code (interruptible: awaiting it), not in an observer's
        # (recording node_cancelled, a middleware slow to unwind): that stays the
        # observer's or the store's timeout, reported by the caller.
        stuck = [w.node.name for w in self._workers
                 if w.task is not None and w.task is not current and not w.task.done()
                 and w.interruptible]
        if stuck:
            self._events.failures["node_stop_timeout"] += len(stuck)
            logger.warning("node_stop_timeout", extra={
                "timeout_s": timeout_s, "nodes": stuck[:20],
                "detail": "these nodes ignored their cancellation (a CancelledError "
                          "caught and not re-raised?) and still run after stop()"})
        return len(stuck)

    def _report_store_timeout(self, timeout_s: float | None, workers_cut: int) -> None:
        """One WARNING for a stop() that ran out of ``store_timeout_s`` (never raises)."""
        store = self._state_store
        if store is None:
            # No store: the workers' last events waited on a middleware or the tracer.
            self._events.failures["observer_stop_timeout"] += 1
            logger.warning("observer_stop_timeout",
                           extra={"timeout_s": timeout_s, "workers_cut": workers_cut})
            return
        try:
            pending = getattr(store, "pending_events", None)
        except Exception:  # a store's property that raises: the count is unknown
            pending = None
        self._events.failures["state_store_flush_timeout"] += 1
        kind = type(store)
        logger.warning("state_store_flush_timeout", extra={
            "store": f"{kind.__module__}.{kind.__qualname__}",
            "timeout_s": timeout_s,
            # Events saved but not yet written; None when the store does not say.
            "pending_events": pending if isinstance(pending, int) else None,
            "workers_cut": workers_cut,
        })

    # -- emit / fetch ------------------------------------------------------------

    def _check_open(self) -> None:
        rt = self._rt
        if rt.stopped and not rt.running:
            raise FlowNotRunning(
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
            UnknownTarget: (a ``KeyError``) ``to`` is not an ingress node.
            FlowNotRunning: (a ``RuntimeError``) the flow was stopped.
            InvalidTraceId: (a ``ValueError``) ``msg`` has an invalid trace id
                (nothing is emitted).
        """
        self._check_open()
        if self._wm_already_delivered(msg):
            return
        await self._contexts[OPEN_SEA].emit(msg, to)

    def emit_nowait(self, msg: Any, to: Targets = None) -> None:
        """Like :meth:`emit` but raises ``asyncio.QueueFull`` instead of waiting.

        Raises ``InvalidTraceId`` on an invalid trace id, as :meth:`emit` does.
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
        """Await the next item delivered to Rookery (Message, value or FlowError).

        Raises:
            FlowNotRunning: (a ``RuntimeError``) the flow is stopped and nothing
                delivered is left to fetch, or ``stop()`` ran while waiting.
        """
        rt = self._rt
        rookery = self._contexts[ROOKERY]
        if rt.stopped and not rt.running:
            # Nothing will arrive any more: what is there now, else the error (a
            # wait on the floe named by from_ would be for ever when what is left
            # is elsewhere).
            try:
                item = rookery.fetch_nowait(from_)
            except asyncio.QueueEmpty:
                raise FlowNotRunning(
                    "PenguiFlow is stopped and Rookery is empty: call run() first") from None
        else:
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
        """Like :meth:`fetch` but always races the egress floes.

        Raises:
            FlowNotRunning: as :meth:`fetch` (a stopped flow waited for ever here).
        """
        rt = self._rt
        if rt.stopped and not rt.running:
            return await self.fetch(from_)  # what is left, else FlowNotRunning
        item = await self._contexts[ROOKERY].fetch_any(from_)
        await self._consumed(item)
        return item

    def fetch_nowait(self, from_: Targets = None) -> Any:
        """Return an item already delivered to Rookery; ``asyncio.QueueEmpty`` if none."""
        rt = self._rt
        item = self._contexts[ROOKERY].fetch_nowait(from_)
        trace_id = getattr(item, "trace_id", None)
        if trace_id is not None and rt.release(trace_id):
            rt.spawn(rt.cancel_finished(trace_id))
        return item

    async def _consumed(self, item: Any) -> None:
        trace_id = item.trace_id if type(item) is Message else getattr(item, "trace_id", None)
        if trace_id is not None:
            rt = self._rt
            if rt.release(trace_id):
                # In the background (stop() awaits it): the item has left Rookery, so
                # a fetch cancelled here (a caller's timeout) would lose it, and the
                # trace's trace_cancel_finish with it.
                rt.spawn(rt.cancel_finished(trace_id))

    # -- events ----------------------------------------------------------------

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
        await self._rt.emit_event(event, context, trace_id, latency_ms=latency_ms, extra=extra,
                                  level=level,
                                  invocation_id=invocation_id or context.invocation_id)

    async def adopt_trace_parent(self, trace_id: str, *, parent_span_id: str,
                                 attributes: Mapping[str, Any] | None = None,
                                 sampled: bool = True) -> None:
        """Make ``trace_id``'s root span a child of ``parent_span_id`` (another process's span).

        A server that runs a request inside its caller's trace (W3C ``traceparent``:
        the flow's trace id is the caller's) calls it before emitting the message,
        so the root ``invoke_workflow`` span, exported or rebuilt from the store,
        hangs under the caller's CLIENT span. It records one ``trace_parent`` event
        (extra: ``parent_span_id`` plus ``attributes``, e.g. ``a2a.task.id``),
        which is how stores and ``pf export`` learn the parent too
        (keyword-only addition).

        ``sampled`` is the caller's sampled flag (the traceparent's ``01`` bit).
        With tracing on, the provider's sampler decides the trace as the SDK
        decides a span with a remote parent: the default (parent-based) sampler
        then keeps the trace only if the caller sampled it, so a caller sampling
        1% does not get 100% of its callees' traces as orphans. An unsampled
        parent is recorded in the event as ``parent_sampled: False``.

        Raises:
            InvalidArgument: (a ``ValueError``) ``parent_span_id`` is not 16
                lowercase hex digits, non-zero.
        """
        if (not isinstance(parent_span_id, str) or len(parent_span_id) != 16
                or parent_span_id.strip("0123456789abcdef") or parent_span_id == "0" * 16):
            raise InvalidArgument(
                f"parent_span_id must be 16 lowercase hex digits, not all zero (the span id "
                f"of a W3C traceparent), got {parent_span_id!r}")
        extra: dict[str, Any] = {**(attributes or {}), "parent_span_id": parent_span_id}
        if not sampled:
            extra["parent_sampled"] = False
        await self._rt.emit_event("trace_parent", self._contexts[OPEN_SEA], trace_id,
                                  extra=extra)

    # -- cancellation ------------------------------------------------------------

    def ensure_trace_event(self, trace_id: str) -> asyncio.Event:
        """Return (creating if needed) the cancel event of ``trace_id``."""
        return self._rt.ensure_trace_event(trace_id)

    def _discard_idle_trace(self, trace_id: str) -> None:
        """Forget ``trace_id``'s bookkeeping if it holds no work (``call_playbook``
        calls it when done: its ``ensure_trace_event`` made one)."""
        self._rt.discard_idle(trace_id)

    def register_external_task(self, trace_id: str | None, task: asyncio.Future[Any]) -> None:
        """Track ``task`` for ``trace_id`` so that ``stop()`` cancels it."""
        if trace_id is None:
            return
        self._rt.register_external_task(trace_id, task)

    async def cancel(self, trace_id: str) -> bool:
        """Cancel one trace; True if it had pending or in-flight work.

        Raises:
            FlowNotRunning: (a ``RuntimeError``) the flow is not running.
        """
        rt = self._rt
        if not rt.running:
            raise FlowNotRunning(
                "PenguiFlow is not running",
                hint="call flow.run() first; a stopped flow has no traces left to cancel")
        binding = rt.binding
        if binding is not None:
            # Its work may be in any process: every one is told (and this one too).
            # Bound, work held elsewhere cannot be seen from here: True unless this
            # process knew the trace as cancelled already.
            fresh = not binding.is_cancelled(trace_id)
            had_work = self._has_work(trace_id)
            await binding.cancel(trace_id)
            return had_work or fresh
        return await self._cancel_local(trace_id)

    def _has_work(self, trace_id: str) -> bool:
        state = self._rt.traces.get(trace_id)
        return state is not None and (state.pending > 0 or state.inflight > 0)

    async def _cancel_local(self, trace_id: str) -> bool:
        """Cancel the work of ``trace_id`` held in this process; True if it had some."""
        rt = self._rt
        state = rt.traces.get(trace_id)
        if state is None or (state.pending <= 0 and state.inflight <= 0):
            # Nothing in flight, but nodes may still hold a part of it (a join's
            # incomplete group, whose other inputs failed): the cancel drops it; and
            # an idle state (made by ensure_trace_event) goes too.
            rt.forget_trace(trace_id)
            rt.discard_idle(trace_id)
            return False
        event = rt.ensure_trace_event(trace_id)
        if not event.is_set():
            event.set()
            await rt.emit_event("trace_cancel_start", self._contexts[OPEN_SEA], trace_id,
                                extra={"pending": state.pending})

        def belongs(item: Any) -> bool:
            return getattr(item, "trace_id", None) == trace_id

        drained = False
        binding = rt.binding
        for floe in self._floes:
            for _item, origin in floe.queue.remove_tagged_where(belongs):
                if binding is not None and type(origin) is Inbound:
                    # Dropped by the cancel: done, never to be delivered again.
                    rt.spawn(binding.settle(origin))
                drained = rt.release(trace_id) or drained
        for worker in self._workers:
            worker.request_trace_cancel(trace_id)
        if drained:
            await rt.cancel_finished(trace_id)
        return True

    # -- 2.1 distribution helpers ----------------------------------------------

    async def load_history(self, trace_id: str) -> Sequence[StoredEvent]:
        """Return the stored events of ``trace_id``.

        Raises:
            ConfigurationError: (a ``RuntimeError``) the flow has no state store.
        """
        if self._state_store is None:
            raise ConfigurationError(
                "PenguiFlow was created without a state_store",
                hint="pass state_store=... to create()/PenguiFlow() or to run(), e.g. "
                     "penguiflow.state.InMemoryStateStore() in tests")
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
                f"running={self.running})")


async def _settle(tasks: Sequence[asyncio.Future[Any]], deadline: float | None) -> int:
    """Wait for ``tasks`` until ``deadline`` (loop time; None: no limit).

    Tasks still running at the deadline are cancelled (again) and given one loop
    turn to end, no more: a task that ignores cancellation must not hang
    ``stop()``. Returns
    how many were cut short. Their outcomes are retrieved, so nothing is
    reported as "never retrieved".
    """
    if not tasks:
        return 0
    timeout = None if deadline is None else max(
        0.0, deadline - asyncio.get_running_loop().time())
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in done:
        _retrieve(task)
    for task in pending:
        task.cancel()
        task.add_done_callback(_retrieve)
    if pending:
        # One loop turn to take the cancellation: a worker cut short while its last
        # event waited for the store ends here, before stop() returns.
        await asyncio.wait(pending, timeout=0)
    return len(pending)


#: How long ``stop()`` waits for a bound flow's sends and settles in flight.
BOUND_STOP_S = 2.0


def _bind_done(task: asyncio.Task[Any]) -> None:
    """Log a bind that failed (the bus could not start delivering)."""
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        logger.error("message_bus_bind_failed", exc_info=exc, extra={"error": safe_repr(exc)})


def _retrieve(task: asyncio.Future[Any]) -> None:
    # What a worker or a flush raised was logged where it happened (or is judged
    # by the caller): marking it retrieved keeps asyncio from reporting it again.
    if not task.cancelled():
        task.exception()


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
    raise InvalidArgumentType(
        "create() takes adjacencies built with node.to(successor, ...), i.e. "
        f"(Node, (Node, ...)) pairs; got {adjacency!r}{hint}")


def _check_error_text_max(value: object) -> None:
    if type(value) is not int:  # bool is an int, but True characters is no bound
        raise InvalidArgumentType(
            f"error_text_max must be an int, the characters of exception text and traceback "
            f"an event keeps (default 8192); got {safe_repr(value, 80)}")
    if value < 1:
        raise InvalidArgument(
            f"error_text_max must be >= 1 character (default 8192; longer text is cut and "
            f"the cut said); got {value}")


def create(*adjacencies: Adjacency, **kwargs: Any) -> PenguiFlow:
    """Build a :class:`PenguiFlow` (forwards everything to the constructor)."""
    return PenguiFlow(*adjacencies, **kwargs)


def _forget_the_callers_request() -> None:
    """Run in the copy of ``run()``'s caller's context the workers get: they keep its
    other variables (an application's own), not its current span (user spans in nodes
    of later, unrelated traces were parented to it), log scope or bus turn."""
    otel_context.attach(otel_context.Context())
    current_scope.set(None)
    _TURN.set(None)
