"""The live tracer: the runtime's events become OTel spans through the API.

Who calls what. The event pipeline hands every event (as the flat
EVENT_FIELDS tuple the store fast path also uses) to :meth:`LiveTracer.on_fields`,
which feeds the shared :class:`~penguiflow._spans.SpanModel`. When the model
ends a span, :meth:`LiveTracer._emit` starts and ends it at once through
``opentelemetry-api``, with the event times as ``start_time``/``end_time`` and
the model's ids parked for the SDK's id generator (see
:mod:`penguiflow.tracing`). Starting a span only when it is complete costs one
``start_span`` per span and keeps the live spans identical to the ones
``pf export`` rebuilds from stored events. A span writer, when a factory offers
one for the provider, records the finished span instead, for a fraction of
``start_span`` + ``end``.

Ids under any SDK provider. The live spans must carry the model's ids: a user
span started in a node is parented to the node span's id, made current before
the node span exists. A writer records the ids as they are. Through the API,
the SDK takes ids from its tracer's ``id_generator``; the tracer penguiflow
starts its spans with gets :class:`_RuntimeIds` in front of the provider's own
generator, so the parked ids win whatever generator the application configured
(random, vendor-specific), while every other tracer keeps that generator. A
provider whose tracer takes no id generator (not the SDK's) is detected at the
first span whose ids differ, logged once and counted (``foreign_ids``): its
spans may then not form one trace.

User code still nests under its node: around each invocation the worker makes
a non-recording span carrying the node span's (future) ids current, so a span
the user starts in a node is a child of the node span. Likewise the CLIENT span
of a remote call is current while the transport runs, so the transport injects
its ``traceparent``.

Sampling: one decision per trace, asked of the provider's sampler once, as the
trace opens in the model (its first event; an adopted caller's parent applied
first), and as the SDK asks it for the root span (no parent; the root's name,
kind and attributes at start, which are all the root starts with: its outcome,
``error.type``, is set after); carried as the sampled flag of every parent
context the model hands out (node and CLIENT spans, user spans, links). Nothing
read before the trace opens (a log-correlation hook reading the node's context
while ``node_start`` is logged) decides it, and a link only reads the linked
trace's decision: a trace is never decided twice, nor on other inputs. A parent-based
sampler then keeps or drops a trace whole: never a root dropped while its node
and user spans are exported as orphans. The SDK's default sampler (parent-based,
always on) is not asked: everything is sampled. A trace that continues a
caller's (``PenguiFlow.adopt_trace_parent``, a W3C ``traceparent``) is decided
as the SDK decides a span with a remote parent: the sampler is asked with the
caller's span (and its sampled flag) as parent, so the default sampler keeps it
only if the caller sampled it. The writer fast path takes sampled spans only.
The SDK's ``TraceIdRatioBased`` reads bits PenguiFlow's uuid4 trace ids fix: as a
``ParentBased`` root, the penguiflow tracer applies its rate to the top bits
instead (:class:`_TopBitsRatio`), logged once (a node's own spans follow their
node span). A bare one is kept, logged once: every tracer of the provider
samples every span by it, so a swap on the penguiflow tracer alone split traces.

One tracer serves every flow of a tracer provider in the process, so a playbook
subflow, which shares its parent's trace, adds its spans to the same trace and
the root span ends once both flows are done with it.

Observer rule: whatever the OTel SDK raises is logged and counted
(``failures``), never propagated into the flow.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections import OrderedDict
from threading import get_ident
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)

from ._ids import otel_trace_id
from ._otel_metrics import FlowMetrics, ObservedFlow
from ._spans import SpanModel, span_id_of
from .spandata import SpanData
from .tracing import (
    LogScope,
    current_scope,
    park_ids,
    span_writer_for,
    take_pending_span_id,
    take_pending_trace_id,
)

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider


__all__ = ["LiveTracer", "enter_client_span", "enter_derived_client_span", "enter_invocation",
           "exit_client_span", "exit_invocation", "tracer_for"]

logger = logging.getLogger("penguiflow.tracing")

_KINDS = {
    "internal": SpanKind.INTERNAL, "client": SpanKind.CLIENT, "server": SpanKind.SERVER,
    "producer": SpanKind.PRODUCER, "consumer": SpanKind.CONSUMER,
}
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_UNSAMPLED = TraceFlags(TraceFlags.DEFAULT)
#: Samplers that sample every trace: not asked (see LiveTracer._flags).
_ALWAYS_ON = ("AlwaysOnSampler", "ParentBased{root:AlwaysOnSampler,")
#: Traces whose sampling decision a live tracer remembers (oldest forgotten first;
#: a deterministic sampler, as the ratio ones are, gives the same answer again).
_DECISIONS_MAX = 65_536
#: Ended traces whose decision a live tracer still remembers (oldest forgotten
#: first): a span a node's left-over task starts late, and a link from a trace
#: that took over, get the decision the trace had (an adopted caller's included),
#: and the sampler is not asked again per hop.
_ENDED_MAX = 4096
_ROOT_CONTEXT = otel_context.Context()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("penguiflow")
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0"


def _sdk_configured(provider: Any) -> bool:
    # With no SDK the global provider is the API's proxy (or a no-op): tracing
    # would cost a no-op call per span, so the runtime skips it altogether.
    return not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)


class _RuntimeIds:
    """The penguiflow tracer's id generator: the parked ids, else the provider's own.

    Duck-typed on the SDK's ``IdGenerator`` (the core does not import the SDK):
    the SDK's ``Tracer.start_span`` asks ``generate_trace_id`` (root spans only,
    first), ``is_trace_id_random`` (root spans) and ``generate_span_id``. Only
    the live tracer starts spans through this tracer, and it parks ids first.
    """

    __slots__ = ("inner",)

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def generate_span_id(self) -> int:
        span_id = take_pending_span_id()
        # A parked trace id the SDK did not ask for (a child span) must not
        # leak into the next root span started on this thread.
        take_pending_trace_id()
        return span_id or int(self.inner.generate_span_id())

    def generate_trace_id(self) -> int:
        return take_pending_trace_id() or int(self.inner.generate_trace_id())

    def is_trace_id_random(self) -> bool:
        # A penguiflow trace id is the message's (any id its producer chose, or a
        # digest of it): no promise of 56 random bits for the W3C random flag.
        return False


def _adopt_ids(tracer: Any) -> bool:
    """Put :class:`_RuntimeIds` in front of ``tracer``'s id generator; False if it has none.

    ``tracer`` is the penguiflow-scoped tracer: the SDK caches one per
    instrumentation scope, so no other library's spans go through it.
    """
    inner = getattr(tracer, "id_generator", None)
    if isinstance(inner, _RuntimeIds):
        return True
    if not (callable(getattr(inner, "generate_span_id", None))
            and callable(getattr(inner, "generate_trace_id", None))):
        return False
    try:
        tracer.id_generator = _RuntimeIds(inner)
    except AttributeError:  # a read-only attribute: not the SDK's tracer
        return False
    return True


class LiveTracer:
    """Spans (and metrics) for every flow traced through one tracer provider."""

    def __init__(self, tracer_provider: TracerProvider) -> None:
        version = _version()
        self._tracer = tracer_provider.get_tracer("penguiflow", version)
        # Through the API, the parked ids win over the provider's id generator.
        self._takes_ids = _adopt_ids(self._tracer)
        # An SDK-specific writer (see penguiflow.tracing.register_span_writer)
        # records a finished span for a fraction of start_span + end.
        self._writer = span_writer_for(tracer_provider, version)
        self._provider_name = type(tracer_provider).__qualname__
        #: Any sampler, asked for traces with a remote parent (None: the remote
        #: flag decides, as a provider without a sampler records nothing anyway).
        self._provider_sampler: Any = _penguiflow_sampler(
            self._tracer, getattr(tracer_provider, "sampler", None), self._provider_name)
        self._sampler = _asked_sampler(self._provider_sampler)
        self._decisions: OrderedDict[int, TraceFlags] = OrderedDict()
        #: The decisions of the last _ENDED_MAX traces that ended.
        self._ended: OrderedDict[int, TraceFlags] = OrderedDict()
        # A sampler asked decides each trace as it opens (see _on_open); none asked,
        # the model calls nothing more per trace.
        self.model = SpanModel(self._emit, self._on_parent,
                               self._on_open if self._sampler is not None else None)
        # Metrics per meter provider (None: the global one), each flow's span ends
        # recorded with its own: flows of one tracer provider share its trace model
        # (a playbook subflow adds to its parent's trace) but not their meters.
        self._meters: dict[Any, tuple[FlowMetrics, weakref.WeakSet[ObservedFlow]]] = {}
        self._flow_metrics: dict[str, FlowMetrics] = {}
        #: The metrics of the flow whose event is being fed (its spans end now).
        self._metrics: FlowMetrics | None = None
        #: Count of spans the SDK refused (logged once per kind of failure).
        self.failures = 0
        #: Spans the provider started with other ids than the runtime's (logged once).
        self.foreign_ids = 0

    # -- wiring -----------------------------------------------------------------------------

    def attach(self, flow: ObservedFlow, meter_provider: MeterProvider | None = None) -> None:
        """Record ``flow``'s metrics with ``meter_provider`` (default: the global one)
        and track it for that provider's queue-depth and traces-in-flight gauges.

        Raises:
            Exception: whatever the meter provider raised making the instruments
                (``flow.run()`` logs, counts it and runs the flow untraced).
        """
        entry = self._meters.get(meter_provider)
        if entry is None:
            entry = self._meters[meter_provider] = (FlowMetrics(meter_provider),
                                                    weakref.WeakSet())
        metrics, flows = entry
        flows.add(flow)
        metrics.watch(flows)
        self._flow_metrics[flow.flow_id] = metrics

    def on_fields(self, fields: tuple[Any, ...]) -> int:
        """Feed one EVENT_FIELDS tuple (see :data:`penguiflow.state.EVENT_FIELDS`).

        Returns how many spans (or metric points) the SDK refused meanwhile: the
        caller counts them as its flow's ``tracer_failed`` (this tracer serves every
        flow of its provider, so :attr:`failures` is not one flow's)."""
        (trace_id, ts, kind, node_name, node_id, invocation_id, parents, _span, _parent,
         _seq, attempt, queued_ts, flow_name, flow_id, latency_ms, *_rest, extra) = fields
        before = self.failures
        self._metrics = self._flow_metrics.get(flow_id)
        self.model.feed(trace_id, ts, kind, node_name, node_id, invocation_id, parents,
                        attempt, latency_ms, flow_name, flow_id, queued_ts, extra)
        return self.failures - before

    def trace_done(self, trace_id: Any, flow_id: str | None) -> int:
        """``flow_id`` holds nothing more of ``trace_id``: end the root if it was the last.

        Returns the failures meanwhile, as :meth:`on_fields`."""
        before = self.failures
        self._metrics = self._flow_metrics.get(flow_id) if flow_id is not None else None
        model = self.model
        otel_id = model.otel_id_of(trace_id) if self._decisions else None
        # Now, for spans still open (a worker cut by stop() ends its trace here).
        model.end_trace(trace_id, flow_id, end_ns=time.time_ns())
        if otel_id is not None and not model.is_open(trace_id):
            # Decided for the trace's life only: the table then holds live traces,
            # so its bound never evicts the decision of one still running (its
            # later spans were exported as orphans of an unsampled caller).
            flags = self._decisions.pop(otel_id, None)
            if flags is not None:
                ended = self._ended
                ended[otel_id] = flags
                if len(ended) > _ENDED_MAX:
                    ended.popitem(last=False)
        return self.failures - before

    def flow_stopped(self, flow: ObservedFlow) -> int:
        """End the traces ``flow`` still had open (their spans end at their last event).

        Returns the failures meanwhile, as :meth:`on_fields`."""
        before = self.failures
        self._metrics = self._flow_metrics.get(flow.flow_id)
        now = time.time_ns()
        for trace_id in self.model.open_traces():
            self.model.end_trace(trace_id, flow.flow_id,
                                 stopped=trace_id in flow._traces, end_ns=now)
        # Parents it adopted for traces it never started: they never will here.
        self.model.drop_pending(flow.flow_id)
        metrics = self._metrics
        if metrics is not None:
            try:
                metrics.note_failures(flow)
            except Exception as exc:
                self.failures += 1
                logger.warning("otel_metrics_failed", exc_info=True, extra={"error": repr(exc)})
        # A flow run again attaches again; one never run again is forgotten.
        self._flow_metrics.pop(flow.flow_id, None)
        return self.failures - before

    # -- contexts for user code -------------------------------------------------------------

    def context_for(self, trace_id: Any, span_id: str) -> otel_context.Context:
        """An OTel context whose current span has ``span_id`` in ``trace_id``'s trace.

        Its sampled flag is read when first used (a user span starting, a
        transport injecting): the trace's decision, made as the trace opened in
        the model (:meth:`_on_open`). The worker makes it current before the
        invocation's first event reaches the model, and a log-correlation hook
        may read it while that event is logged: the trace is not open then, so
        the flag is provisional and not kept (see :class:`_InvocationSpan`)."""
        return trace.set_span_in_context(_InvocationSpan(self, trace_id, span_id))

    def remote_context(self, trace_id: Any, invocation_id: str | None
                       ) -> otel_context.Context | None:
        """The context of the remote CLIENT span ``invocation_id`` has open, if any."""
        span = self.model.remote_span(str(trace_id), invocation_id)
        if span is None:
            return None
        return trace.set_span_in_context(NonRecordingSpan(SpanContext(
            span.trace_id, span.span_id, is_remote=False,
            trace_flags=self._flags(span.trace_id))))

    # -- emitting -------------------------------------------------------------------------

    def _emit(self, span: SpanData) -> None:
        writer = self._writer
        try:
            # The writer records as sampled: an unsampled trace takes the API path,
            # where the sampler drops (or records only) it as configured.
            if writer is None or (self._decisions and self._decisions.get(span.trace_id)
                                  is _UNSAMPLED) or not writer(span):
                try:
                    self._start_and_end(span)
                finally:
                    park_ids(0, 0)  # an SDK that did not take them must not hand them out later
        except Exception as exc:
            self.failures += 1
            logger.warning("otel_span_failed", exc_info=True, extra={
                "span": span.name, "error": repr(exc)})
        metrics = self._metrics
        try:
            if metrics is not None:
                metrics.record(span)
        except Exception as exc:
            self.failures += 1
            logger.warning("otel_metrics_failed", exc_info=True, extra={"error": repr(exc)})

    def _on_parent(self, root: SpanData, parent_span_id: int, sampled: bool) -> None:
        """Decide ``root``'s trace as a trace under the remote span ``parent_span_id``.

        A trace already decided keeps its decision (a trace is kept or dropped
        whole)."""
        otel_id = root.trace_id
        if otel_id in self._decisions:
            return
        remote = SpanContext(otel_id, parent_span_id, is_remote=True,
                             trace_flags=_SAMPLED if sampled else _UNSAMPLED)
        sampler = self._provider_sampler
        if sampler is None or not callable(getattr(sampler, "should_sample", None)):
            keep = sampled
        else:
            try:
                keep = sampler.should_sample(
                    trace.set_span_in_context(NonRecordingSpan(remote)), otel_id, root.name,
                    SpanKind.INTERNAL, _start_attributes(root)).decision.is_sampled()
            except Exception as exc:
                self.failures += 1
                logger.warning("otel_sampler_failed", extra={"error": repr(exc)[:300]})
                keep = False
        self._decide(otel_id, _SAMPLED if keep else _UNSAMPLED)

    def _on_open(self, root: SpanData) -> None:
        """Decide the trace of ``root``, just opened in the model (its adopted parent,
        if any, applied already): before any node of it runs user code, so no
        thread of a node ever asks the sampler (only a sampler asked is called)."""
        self._flags(root.trace_id, root)

    def _decide(self, otel_id: int, flags: TraceFlags) -> TraceFlags:
        # The first decision stands: two threads deciding at once (a node's threads
        # reading its context after the decision was forgotten) agree.
        flags = self._decisions.setdefault(otel_id, flags)
        if len(self._decisions) > _DECISIONS_MAX:
            self._decisions.popitem(last=False)
        return flags

    def provisional_flags(self, trace_id: Any) -> TraceFlags:
        """The sampled flag to show for ``trace_id`` before it opens in the model:
        its decision if it has one, else its adopted caller's flag, else sampled.
        Not a decision: nothing is asked of the sampler, nothing kept."""
        otel_id = self.model.otel_id_of(trace_id)
        flags = self._decisions.get(otel_id) if self._decisions else None
        if flags is not None:
            return flags
        sampled = self.model.pending_sampled(trace_id)
        return _UNSAMPLED if sampled is False else _SAMPLED

    def opening(self, trace_id: Any, invocation_id: str) -> bool:
        """Whether ``trace_id``, not open in the model, is about to open: its caller
        adopted (a parent pending), or a flow of this tracer has it in flight while
        ``invocation_id`` never started in it (the worker logging the trace's first
        ``node_start``, which then reaches the model). Otherwise its trace has ended
        (a task or a thread the node left running reads its context late)."""
        model = self.model
        if model.pending_sampled(trace_id) is not None:
            return True
        if model.invocation_ended(invocation_id):
            return False
        try:
            return any(trace_id in flow._traces
                       for _metrics, flows in self._meters.values() for flow in flows)
        except RuntimeError:  # a flow attached meanwhile (a read from another thread)
            return False

    def _unkept_flags(self, otel_id: int) -> TraceFlags:
        """The sampled flag of the trace ``otel_id``, not open (ended, its decision
        forgotten): the sampler asked as the SDK asks for a root span of which only
        the trace id is known (bare name, no attributes), and not kept, so ended
        traces add nothing to the decisions. A deterministic sampler (the ratio
        ones) gives the answer the trace had."""
        if self._ended and self.model.root_of(otel_id) is None:
            flags = self._ended.get(otel_id)
            if flags is not None:  # ended lately (not open again): the decision it had
                return flags
        sampler = self._sampler
        if sampler is None:
            return _SAMPLED
        try:
            sampled = sampler.should_sample(_ROOT_CONTEXT, otel_id, _ROOT_NAME,
                                            SpanKind.INTERNAL).decision.is_sampled()
        except Exception as exc:
            self.failures += 1
            logger.warning("otel_sampler_failed", extra={"error": repr(exc)[:300]})
            sampled = False
        return _SAMPLED if sampled else _UNSAMPLED

    def _linked_flags(self, otel_id: int) -> TraceFlags:
        """The sampled flag of a link to the trace ``otel_id`` (another trace than
        the linking span's): its decision while it is open, else the sampler's
        answer, not kept (:meth:`_unkept_flags`)."""
        flags = self._decisions.get(otel_id) if self._decisions else None
        return flags if flags is not None else self._unkept_flags(otel_id)

    def _flags(self, otel_id: int, root: SpanData | None = None) -> TraceFlags:
        """The sampled flag of the trace ``otel_id``: decided once per trace.

        Asked as the SDK asks for the root span when it starts (its name, kind and
        start attributes; see :func:`_start_attributes`), so a sampler reading them
        decides the root as it decided the trace: never a root dropped under
        exported children, nor the reverse. Only an open trace (``root`` given or
        known to the model) is decided; any other has ended (a read before a trace
        opens is provisional, see :class:`_InvocationSpan`): the sampler is asked
        again and nothing kept (:meth:`_unkept_flags`)."""
        sampler = self._sampler
        if sampler is None:
            # Everything is sampled but traces a remote parent decided otherwise.
            flags = self._decisions.get(otel_id) if self._decisions else None
            if flags is None and self._ended and self.model.root_of(otel_id) is None:
                flags = self._ended.get(otel_id)  # ended (not open again under its id)
            return flags if flags is not None else _SAMPLED
        flags = self._decisions.get(otel_id)
        if flags is None:
            if root is None:
                root = self.model.root_of(otel_id)
                if root is None:
                    # Ended, its decision forgotten: asked again, never kept (the
                    # table holds live traces only).
                    return self._unkept_flags(otel_id)
            # An empty context, not None: None is the *current* one, which may be
            # a node's (the sampler would read it as the root's parent).
            try:
                sampled = sampler.should_sample(
                    _ROOT_CONTEXT, otel_id, root.name, SpanKind.INTERNAL,
                    _start_attributes(root)).decision.is_sampled()
            except Exception as exc:
                # A broken sampler: the SDK could not start this trace's root either,
                # so the trace is dropped whole (counted), never exported as orphans.
                self.failures += 1
                logger.warning("otel_sampler_failed", extra={"error": repr(exc)[:300]})
                sampled = False
            flags = self._decide(otel_id, _SAMPLED if sampled else _UNSAMPLED)
        return flags

    def _start_and_end(self, span: SpanData) -> None:
        flags = self._flags(span.trace_id, span if span.root else None)
        if span.parent_span_id is None:
            parent = _ROOT_CONTEXT
        else:
            parent = trace.set_span_in_context(NonRecordingSpan(SpanContext(
                span.trace_id, span.parent_span_id, is_remote=False, trace_flags=flags)))
        # A link's flag is never decided: the linked trace (another one, a node
        # behind a new trace id) has usually ended, its decision forgotten; deciding
        # it again kept one stale decision per such handoff. Its decision is read,
        # else the sampler asked again (not kept): never the linking span's flag.
        trace_id = span.trace_id
        links = [Link(SpanContext(link.trace_id, link.span_id, is_remote=False,
                                  trace_flags=flags if link.trace_id == trace_id
                                  else self._linked_flags(link.trace_id)), link.attributes)
                 for link in span.links] if span.links else None
        park_ids(span.trace_id, span.span_id)
        # Attributes are passed as they are: the SDK copies them into its own
        # bounded mapping, so a copy here would be paid twice. A root starts with
        # what the trace was decided on (_flags); the rest is set once started.
        attributes = _start_attributes(span) if span.root else span.attributes
        otel_span = self._tracer.start_span(
            span.name, context=parent, kind=_KINDS[span.kind],
            attributes=attributes, links=links, start_time=span.start_ns)
        if attributes is not span.attributes and otel_span.is_recording():
            otel_span.set_attributes({key: value for key, value in span.attributes.items()
                                      if key not in attributes})
        if otel_span.is_recording() and otel_span.get_span_context().span_id != span.span_id:
            self._foreign_ids()
        for event in span.events:
            otel_span.add_event(event.name, event.attributes, timestamp=event.time_ns)
        if span.status == "error":
            otel_span.set_status(Status(StatusCode.ERROR, span.status_description))
        elif span.status == "ok":
            otel_span.set_status(Status(StatusCode.OK))
        otel_span.end(end_time=span.end_ns)


    def _foreign_ids(self) -> None:
        self.foreign_ids += 1
        if self.foreign_ids == 1:
            logger.warning(
                "otel_foreign_span_ids: the tracer provider %s started a penguiflow span "
                "with other ids than the runtime's (its tracer takes no SDK id_generator), "
                "so a run's spans may land in several traces and differ from the ids "
                "stored with its events; use opentelemetry-sdk's TracerProvider",
                self._provider_name, extra={"provider": self._provider_name,
                                            "takes_ids": self._takes_ids})


#: Root span attributes that the runtime sets as the trace goes (its outcome): a
#: root span starts without them, so its sampler sees what the trace's decision saw.
_END_ATTRIBUTES = frozenset({"error.type"})
#: The name a sampler is asked with for a trace whose root is gone (ended).
_ROOT_NAME = "invoke_workflow"


def _start_attributes(root: SpanData) -> Any:
    """``root``'s attributes as a sampler sees them at its start (no outcome)."""
    attributes = root.attributes
    if _END_ATTRIBUTES.isdisjoint(attributes):
        return attributes
    return {key: value for key, value in attributes.items() if key not in _END_ATTRIBUTES}


# One tracer per tracer provider (see module docstring: subflows share traces).
def _asked_sampler(sampler: Any) -> Any:
    """The provider's sampler, or None when it samples everything (not asked)."""
    if sampler is None or not callable(getattr(sampler, "should_sample", None)):
        return None
    try:
        description = str(sampler.get_description())
    except Exception:
        return sampler
    return None if description.startswith(_ALWAYS_ON) else sampler


_SDK_SAMPLING = "opentelemetry.sdk.trace.sampling"


def _is_sdk(sampler: Any, name: str) -> bool:
    kind = type(sampler)
    return kind.__name__ == name and kind.__module__ == _SDK_SAMPLING


class _TopBitsRatio:
    """The SDK's ``TraceIdRatioBased`` rate applied to a trace id's top 48 bits.

    ``TraceIdRatioBased`` reads the low 64 bits, which in PenguiFlow's default
    trace ids (``uuid4().hex``) start with the fixed variant bits ``10``: a rate
    of 0.5 or below sampled no trace at all. Same rule as
    ``penguiflow_exporters.otel.PenguiFlowRatioSampler`` (this core module does
    not import the exporters package): deterministic per trace id.
    """

    def __init__(self, rate: float, bound: int) -> None:
        self.rate = rate
        self.bound = bound

    def should_sample(self, parent_context: Any, trace_id: int, name: str, kind: Any = None,
                      attributes: Any = None, links: Any = None, trace_state: Any = None
                      ) -> Any:
        from opentelemetry.sdk.trace.sampling import Decision, SamplingResult

        sampled = ((trace_id >> 80) << 16) < self.bound
        parent = trace.get_current_span(parent_context).get_span_context()
        return SamplingResult(Decision.RECORD_AND_SAMPLE if sampled else Decision.DROP,
                              attributes if sampled else None,
                              parent.trace_state if parent.is_valid else None)

    def get_description(self) -> str:
        return f"PenguiFlowRatioSampler{{{self.rate}}}"


def _penguiflow_sampler(tracer: Any, sampler: Any, provider_name: str) -> Any:
    """``sampler``, or, when it is ``ParentBased`` with the SDK's ``TraceIdRatioBased``
    root, the same with that rate on the trace id's top bits (see
    :class:`_TopBitsRatio`), set on the penguiflow tracer only; logged.

    A bare ``TraceIdRatioBased`` is kept (and logged): every tracer of the
    provider samples each span by it, a node's own spans (the application's
    tracers) included, so a swap on the penguiflow tracer alone would split
    traces. Under ``ParentBased``, only root spans read the rate: a node's own
    spans follow their node span's flag.
    """
    try:
        if _is_sdk(sampler, "TraceIdRatioBased"):
            logger.warning(
                "otel_ratio_sampler_low_bits: the tracer provider %s samples with %s, which "
                "reads a trace id's low 64 bits: PenguiFlow's uuid4 trace ids fix two of "
                "them, so it keeps a wrong share of PenguiFlow's traces (none at a rate of "
                "0.5 or less, all at 0.75 or more). Every tracer of the provider applies it "
                "to every span, so traces stay whole; use "
                "penguiflow_exporters.otel.PenguiFlowRatioSampler on the provider (or "
                "ParentBased(TraceIdRatioBased(rate))) to sample the rate asked",
                provider_name, sampler.get_description(), extra={"provider": provider_name})
            return sampler
        if not (_is_sdk(sampler, "ParentBased")
                and _is_sdk(sampler._root, "TraceIdRatioBased")):
            return sampler
        root = sampler._root
        fixed = type(sampler)(
            _TopBitsRatio(root.rate, root.bound),
            remote_parent_sampled=sampler._remote_parent_sampled,
            remote_parent_not_sampled=sampler._remote_parent_not_sampled,
            local_parent_sampled=sampler._local_parent_sampled,
            local_parent_not_sampled=sampler._local_parent_not_sampled)
        tracer.sampler = fixed
    except Exception as exc:  # not the SDK's shape after all: left as it is
        logger.warning("otel_ratio_sampler_kept", extra={"error": repr(exc)[:300]})
        return sampler
    logger.warning(
        "otel_ratio_sampler_replaced: the tracer provider %s samples with %s, which reads "
        "a trace id's low 64 bits: PenguiFlow's uuid4 trace ids fix two of them, so it "
        "would keep a wrong share of traces (none at a rate <= 0.5). PenguiFlow's spans "
        "are sampled with %s instead; root spans of other tracers still use the SDK's "
        "rule (use penguiflow_exporters.otel.PenguiFlowRatioSampler on the provider)",
        provider_name, sampler.get_description(), fixed.get_description(),
        extra={"provider": provider_name})
    return fixed


_TRACERS: weakref.WeakKeyDictionary[Any, LiveTracer] = weakref.WeakKeyDictionary()


class _InvocationSpan(NonRecordingSpan):
    """The current span around a node's code: its context built when first read.

    Built with its trace's decision, once the trace is open in the model. Read
    before (a log-correlation hook reading the current span while the worker
    logs ``node_start``, which then reaches the model), it shows a provisional
    flag (:meth:`LiveTracer.provisional_flags`) and keeps nothing: deciding then
    decided the trace without its root and before its adopted parent. Read first
    after the trace ended (a task or a thread the node left running), it is
    built with the sampler's answer, asked once and not kept by the tracer
    (:meth:`LiveTracer._unkept_flags`): an unsampled trace's late user spans
    are dropped with it, not exported as orphans.
    """

    def __init__(self, tracer: LiveTracer, trace_id: Any, span_id: str) -> None:
        self._tracer = tracer
        self._trace_id = trace_id
        self._span_id = span_id
        self._built: SpanContext | None = None
        #: The thread asking the sampler for this span's trace (0: none).
        self._deciding = 0

    @property
    def _context(self) -> SpanContext:  # type: ignore[override]
        return self.get_span_context()

    def get_span_context(self) -> SpanContext:
        built = self._built
        if built is None:
            tracer = self._tracer
            model = tracer.model
            otel_id = model.otel_id_of(self._trace_id)
            span_id = span_id_of(self._span_id)
            if model.root_of(otel_id) is None and tracer.opening(self._trace_id,
                                                                 self._span_id):
                return SpanContext(otel_id, span_id, is_remote=False,
                                   trace_flags=tracer.provisional_flags(self._trace_id))
            thread = get_ident()
            if self._deciding == thread:
                # A sampler reading the current span while this thread asks it.
                return SpanContext(otel_id, span_id, is_remote=False, trace_flags=_UNSAMPLED)
            # Another thread of the node may be deciding too (the decision of its
            # open trace evicted by the table's bound): both ask, the first answer
            # kept is the one both get. An ended trace: asked, nothing kept.
            self._deciding = thread
            try:
                flags = tracer._flags(otel_id)
            finally:
                self._deciding = 0
            built = self._built = SpanContext(otel_id, span_id, is_remote=False,
                                              trace_flags=flags)
        return built


def tracer_for(tracer_provider: TracerProvider | None) -> LiveTracer | None:
    """The live tracer of ``tracer_provider`` (default: the global one), or None.

    None when no SDK is configured: the runtime then pays nothing for tracing.

    Raises:
        Exception: whatever the provider raised while handing out its tracer (the
            caller, ``flow.run()``, logs and counts it and runs the flow untraced:
            an observer never stops the flow it observes).
    """
    provider = tracer_provider if tracer_provider is not None else trace.get_tracer_provider()
    if not _sdk_configured(provider):
        return None
    tracer = _TRACERS.get(provider)
    if tracer is None:
        tracer = _TRACERS[provider] = LiveTracer(provider)
    return tracer


Tokens = tuple[object | None, object | None]


def enter_invocation(tracer: LiveTracer | None, log_scope: bool, trace_id: Any, inv: str,
                     node_name: str | None, node_id: str | None) -> Tokens:
    """Make the invocation's node span (and log scope) current; see :func:`exit_invocation`.

    The worker calls it once per invocation (all attempts) in its own task, so
    the user's code, and every span or log line it makes, sees them.
    """
    span_token = None
    if tracer is not None and trace_id is not None:
        span_token = otel_context.attach(tracer.context_for(trace_id, inv))
    scope_token = None
    if log_scope:
        tid = None if trace_id is None else str(trace_id)
        scope_token = current_scope.set(LogScope(
            trace_id=tid, otel_trace_id=None if tid is None else otel_trace_id(tid),
            span_id=inv, node_name=node_name, node_id=node_id, invocation_id=inv))
    return span_token, scope_token


def exit_invocation(tokens: Tokens) -> None:
    """Undo :func:`enter_invocation`."""
    span_token, scope_token = tokens
    if scope_token is not None:
        current_scope.reset(scope_token)  # type: ignore[arg-type]
    if span_token is not None:
        otel_context.detach(span_token)  # type: ignore[arg-type]


def enter_client_span(runtime: Any, trace_id: Any, invocation_id: str | None) -> object | None:
    """Make the open remote CLIENT span of ``invocation_id`` current; a token or None.

    None (and nothing done) when ``runtime`` traces nothing. Undo with
    :func:`exit_client_span` in the same task.
    """
    events = getattr(runtime, "_events", None)
    tracer = getattr(events, "tracer", None)
    if tracer is None or trace_id is None:
        return None
    context = tracer.remote_context(trace_id, invocation_id)
    return None if context is None else otel_context.attach(context)


def enter_derived_client_span(trace_id: Any, invocation_id: str, index: int) -> object:
    """Make the ids of a remote CLIENT span current without an SDK; a token.

    With no tracer the model is not running, but the ids it would give the
    ``index``-th remote call of ``invocation_id`` are derived from the trace id
    alone (:func:`penguiflow._spans.derived_span_id`), as the inspector derives
    them from stored events. Making them current lets a transport inject a
    ``traceparent`` that names that call, so an agent serving it records its
    run in the caller's trace (and under the call) even when neither side
    exports spans. Undo with :func:`exit_client_span`.
    """
    from ._spans import derived_span_id

    tid = str(trace_id)
    context = trace.set_span_in_context(NonRecordingSpan(SpanContext(
        int(otel_trace_id(tid), 16), derived_span_id(tid, invocation_id, "remote", str(index)),
        is_remote=False, trace_flags=_SAMPLED)))
    return otel_context.attach(context)


def exit_client_span(token: object) -> None:
    """Undo :func:`enter_client_span`."""
    otel_context.detach(token)  # type: ignore[arg-type]
