"""OTel metrics of a traced flow, recorded from the spans the model ends.

Instruments (names in :mod:`penguiflow.semconv`, documented in
``docs/reference/telemetry.md``): histograms of node duration, remote call
duration (by agent, method and outcome), cancel latency (requested →
acknowledged) and time to first chunk; counters of node errors by
``error.type``, retries and remote bytes; observable gauges of queue depth per
edge and traces in flight, and an observable counter of observer failures
(store, middleware, tracer), read from the live flows when a reader collects.

Recording from *finished spans* keeps metrics and spans consistent and costs
nothing per event. Without a MeterProvider the API's no-op instruments are used.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from opentelemetry import metrics

from . import semconv as sc
from ._graph import owner_label
from .spandata import SpanData

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation

    from ._graph import Floe

__all__ = ["FlowMetrics", "ObservedFlow"]


class ObservedFlow(Protocol):
    """What the tracer and the metrics read of a running flow (a PenguiFlow).

    A protocol rather than ``PenguiFlow`` itself, so that these modules do not
    import ``core`` (not even for types): the core imports them.
    """

    @property
    def name(self) -> str: ...

    @property
    def flow_id(self) -> str: ...

    @property
    def floes(self) -> tuple[Floe, ...]: ...

    @property
    def observer_failures(self) -> Mapping[str, int]: ...

    @property
    def _traces(self) -> Mapping[Any, Any]:
        """The traces in flight (a trace id per key)."""


def _seconds(span: SpanData) -> float:
    return ((span.end_ns or span.start_ns) - span.start_ns) / 1e9


class FlowMetrics:
    """The instruments; :meth:`record` takes each span as it ends."""

    def __init__(self, meter_provider: MeterProvider | None = None) -> None:
        provider = meter_provider if meter_provider is not None else metrics.get_meter_provider()
        meter = provider.get_meter("penguiflow")
        self._node_duration = meter.create_histogram(
            sc.M_NODE_DURATION, unit="s", description="Duration of node invocations")
        self._node_errors = meter.create_counter(
            sc.M_NODE_ERRORS, unit="{invocation}",
            description="Node invocations that ended in error, by error.type")
        self._retries = meter.create_counter(
            sc.M_NODE_RETRIES, unit="{retry}", description="Node attempts retried")
        self._remote_duration = meter.create_histogram(
            sc.M_REMOTE_DURATION, unit="s", description="Duration of remote agent calls")
        self._bytes_sent = meter.create_counter(
            sc.M_REMOTE_BYTES_SENT, unit="By", description="Bytes sent to remote agents")
        self._bytes_received = meter.create_counter(
            sc.M_REMOTE_BYTES_RECEIVED, unit="By",
            description="Bytes received from remote agents")
        self._cancel_latency = meter.create_histogram(
            sc.M_CANCEL_LATENCY, unit="s",
            description="Trace cancel: requested to acknowledged")
        self._ttfc = meter.create_histogram(
            sc.M_TIME_TO_FIRST_CHUNK, unit="s", description="Time to the first stream chunk")
        self._flows: Iterable[ObservedFlow] = ()
        #: Observer failures of flows no longer live (their last counts), and each
        #: live flow's last counts: the cumulative counter never goes back when a
        #: flow is garbage-collected.
        self._failures_gone: dict[str, int] = {}
        self._failures_seen: dict[str, dict[str, int]] = {}
        #: The reader's thread (callbacks) and the loop (a flow stopping) both
        #: update the failure totals.
        self._failures_lock = threading.Lock()
        meter.create_observable_gauge(
            sc.M_QUEUE_DEPTH, callbacks=[self._observe_queues], unit="{item}",
            description="Items waiting on each edge")
        meter.create_observable_gauge(
            sc.M_TRACES_IN_FLIGHT, callbacks=[self._observe_traces], unit="{trace}",
            description="Traces with items pending in a flow")
        meter.create_observable_counter(
            sc.M_OBSERVER_FAILURES, callbacks=[self._observe_failures], unit="{failure}",
            description="Observer (store, middleware) failures, by kind")

    def watch(self, flows: Iterable[ObservedFlow]) -> None:
        """Read the gauges from ``flows`` (a live, weak collection)."""
        self._flows = flows

    def record(self, span: SpanData) -> None:
        """Record what ``span`` (just ended) measured."""
        attrs = span.attributes
        error_type = attrs.get(sc.ERROR_TYPE) if span.status == "error" else None
        if span.kind == "client":
            outcome = "error" if error_type is None and span.status == "error" else (
                "cancelled" if error_type == sc.ERROR_CANCELLED else
                "error" if error_type is not None else "success")
            labels: dict[str, Any] = {
                sc.PF_REMOTE_OUTCOME: outcome,
                sc.A2A_METHOD_NAME: attrs.get(sc.A2A_METHOD_NAME, "?"),
                sc.GEN_AI_AGENT_NAME: attrs.get(sc.GEN_AI_AGENT_NAME, "?"),
            }
            if sc.SERVER_ADDRESS in attrs:
                labels[sc.SERVER_ADDRESS] = attrs[sc.SERVER_ADDRESS]
            self._remote_duration.record(_seconds(span), labels)
            sent = attrs.get(sc.PF_REMOTE_BYTES_SENT)
            if isinstance(sent, int):
                self._bytes_sent.add(sent, labels)
            received = attrs.get(sc.PF_REMOTE_BYTES_RECEIVED)
            if isinstance(received, int):
                self._bytes_received.add(received, labels)
            ttfc = attrs.get(sc.GEN_AI_TIME_TO_FIRST_CHUNK)
            if isinstance(ttfc, float):
                self._ttfc.record(ttfc, labels)
            return
        if span.root:  # a trace's root span (under a caller's span too)
            requested = acknowledged = None
            for event in span.events:
                if event.name == sc.EV_CANCEL_REQUESTED and requested is None:
                    requested = event.time_ns
                elif event.name == sc.EV_CANCEL_ACKNOWLEDGED:
                    acknowledged = event.time_ns
            if requested is not None and acknowledged is not None:
                workflow = attrs.get(sc.GEN_AI_WORKFLOW_NAME, "?")
                self._cancel_latency.record((acknowledged - requested) / 1e9,
                                            {sc.GEN_AI_WORKFLOW_NAME: workflow})
            return
        labels = {sc.GEN_AI_AGENT_NAME: attrs.get(sc.GEN_AI_AGENT_NAME, "?")}
        if error_type is not None:
            self._node_errors.add(1, {**labels, sc.ERROR_TYPE: error_type})
            self._node_duration.record(_seconds(span), {**labels, sc.ERROR_TYPE: error_type})
        else:
            self._node_duration.record(_seconds(span), labels)
        ttfc = attrs.get(sc.GEN_AI_TIME_TO_FIRST_CHUNK)
        if isinstance(ttfc, float) and not span.remote_first_chunk:
            # A RemoteNode re-emits its call's chunks: measured once, by the call
            # (the model says so on the node span, whichever span ends first).
            self._ttfc.record(ttfc, labels)
        retries = sum(1 for event in span.events if event.name == sc.EV_RETRY)
        if retries:
            self._retries.add(retries, labels)

    # -- observable instruments (called by the SDK's reader) -----------------------------

    def _observe_queues(self, options: CallbackOptions) -> Iterable[Observation]:
        from opentelemetry.metrics import Observation

        # Summed per attribute set: flows sharing a name (and edge labels) would
        # otherwise report several values for one series, of which one is kept.
        depths: dict[tuple[str, str], int] = {}
        for flow in list(self._flows):
            name = flow.name
            for floe in flow.floes:
                key = (f"{owner_label(floe.source)}->{owner_label(floe.target)}", name)
                depths[key] = depths.get(key, 0) + floe.queue.qsize()
        return [Observation(depth, {sc.PF_EDGE: edge, sc.GEN_AI_WORKFLOW_NAME: name})
                for (edge, name), depth in depths.items()]

    def _observe_traces(self, options: CallbackOptions) -> Iterable[Observation]:
        from opentelemetry.metrics import Observation

        counts: dict[str, int] = {}
        for flow in list(self._flows):
            counts[flow.name] = counts.get(flow.name, 0) + len(flow._traces)
        return [Observation(count, {sc.GEN_AI_WORKFLOW_NAME: name})
                for name, count in counts.items()]

    def note_failures(self, flow: ObservedFlow) -> None:
        """Remember ``flow``'s observer failures so far (it stops: it may be gone
        by the next collection)."""
        counts = flow.observer_failures
        with self._failures_lock:
            seen = self._failures_seen.setdefault(flow.flow_id, {})
            for kind, count in counts.items():
                if count > seen.get(kind, 0):
                    seen[kind] = count

    def _observe_failures(self, options: CallbackOptions) -> Iterable[Observation]:
        from opentelemetry.metrics import Observation

        # A running total: what flows no longer live counted stays counted.
        live: set[str] = set()
        for flow in list(self._flows):
            live.add(flow.flow_id)
            self.note_failures(flow)
        with self._failures_lock:  # a flow stopping on the loop notes its counts
            gone = self._failures_gone
            for flow_id in [f for f in self._failures_seen if f not in live]:
                for kind, count in self._failures_seen.pop(flow_id).items():
                    gone[kind] = gone.get(kind, 0) + count
            totals = dict(gone)
            for seen in self._failures_seen.values():
                for kind, count in seen.items():
                    totals[kind] = totals.get(kind, 0) + count
        return [Observation(count, {sc.PF_OBSERVER_FAILURE: kind})
                for kind, count in totals.items()]

