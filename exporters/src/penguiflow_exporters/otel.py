"""OpenTelemetry SDK set-up for PenguiFlow: ids, providers, OTLP export, lifecycle.

The core (``penguiflow``) speaks the ``opentelemetry-api`` only; this module is
the SDK side an application turns on::

    from penguiflow_exporters.otel import configure_tracing

    with configure_tracing("my-service", endpoint="http://localhost:4318"):
        ...  # run flows; spans and metrics go to the collector (Jaeger, ...)

What it guarantees:

* **Same ids everywhere.** The penguiflow trace id *is* the OTel trace id and
  an invocation id *is* its node span's id. The runtime sees to that under any
  SDK ``TracerProvider`` (see :mod:`penguiflow._tracer`); the provider built
  here also gets :class:`PenguiFlowIdGenerator`, which hands the SDK the ids the
  runtime parked (:func:`penguiflow.tracing.park_ids`) for every tracer.
* **Configuration resolves argument → environment → constant**, with the
  standard ``OTEL_*`` variables (``OTEL_SERVICE_NAME``,
  ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_EXPORTER_OTLP_[TRACES_|METRICS_]ENDPOINT``,
  ``..._HEADERS``, ``..._TIMEOUT``, ``..._PROTOCOL``, ``OTEL_TRACES_SAMPLER``).
* **Observers never break the flow.** Spans are exported from the SDK's
  background thread; every export has a bounded timeout; a failed export is
  counted on the handle (:attr:`TelemetryHandle.stats`) and logged without
  flooding (the first failure with the likely fix, then one summary a minute);
  :meth:`TelemetryHandle.force_flush` and :meth:`TelemetryHandle.shutdown`
  return within their timeout even when the collector stalls.
* **Every lost span is counted.** The SDK's ``BatchSpanProcessor`` drops a span
  when its queue (``max_queue_size``) is full, and says so only in a log line;
  here the queue is admitted through a counter
  (:class:`~penguiflow_exporters._export_counting.CountingBatchProcessor`),
  so after a flush ``spans ended == spans_exported + spans_failed +
  spans_dropped + spans_lost_at_shutdown``, exactly.

Converting stored spans (:class:`penguiflow.spandata.SpanData`) for ``pf
export`` -- :func:`readable_spans`, :func:`export_spans`, :func:`otlp_json` --
lives in :mod:`penguiflow_exporters._spanexport` and is re-exported here.
"""

from __future__ import annotations

import atexit
import importlib
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Final, Literal

from opentelemetry import metrics as metrics_api
from opentelemetry import trace as trace_api
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.sdk.trace.sampling import (
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)

from penguiflow.tracing import register_span_writer, take_pending_span_id, take_pending_trace_id

from ._export_counting import (
    FAILURE_LOG_INTERVAL_S,
    CountingBatchProcessor,
    CountingMetricExporter,
    CountingSpanExporter,
    ExportStats,
    FailureLog,
    RateLimitFilter,
)
from ._sdkwriter import sdk_span_writer
from ._spanexport import (
    DEFAULT_SERVICE_NAME,
    OTLPExportError,
    export_spans,
    make_resource,
    otlp_json,
    readable_spans,
    signal_endpoint,
)

__all__ = [
    "DEFAULT_SERVICE_NAME",
    "DEFAULT_SHUTDOWN_TIMEOUT_S",
    "FAILURE_LOG_INTERVAL_S",
    "ExportStats",
    "OTLPExportError",
    "PenguiFlowIdGenerator",
    "PenguiFlowRatioSampler",
    "TelemetryHandle",
    "TelemetryWarning",
    "configure_tracing",
    "export_spans",
    "make_resource",
    "otlp_json",
    "readable_spans",
    "signal_endpoint",
]

_log = logging.getLogger(__name__)

# The live tracer's fast path into SDK TracerProviders (penguiflow_exporters._sdkwriter)
# is found through this package's "penguiflow.span_writers" entry point, imported or
# not; registering it here as well keeps it when the package runs uninstalled (a
# source tree on sys.path, no entry points). The same factory is only asked once.
register_span_writer(sdk_span_writer)

#: How long :meth:`TelemetryHandle.shutdown` (and the exit hook) waits for the
#: last export before giving up on what is still queued.
DEFAULT_SHUTDOWN_TIMEOUT_S: Final = 5.0
# The SDK's BatchSpanProcessor defaults (its OTEL_BSP_* variables win over them).
_DEFAULT_MAX_QUEUE_SIZE: Final = 2048
_DEFAULT_MAX_EXPORT_BATCH_SIZE: Final = 512

_PROTOCOLS: Final = ("http/protobuf", "grpc")
_GRPC_MISSING: Final = (
    'protocol="grpc" needs the gRPC exporter: pip install "penguiflow-exporters[grpc]" '
    '(or use the default protocol="http/protobuf", port 4318)'
)
# The SDK's OTLP exporters log one ERROR per failed batch and a WARNING per retry;
# while a handle is live these loggers are rate-limited (see RateLimitFilter).
_SDK_EXPORTER_LOGGERS: Final = (
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.proto.http.metric_exporter",
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
    "opentelemetry.sdk._shared_internal",
)


class TelemetryWarning(UserWarning):
    """Telemetry was set up in a way that will not do what the caller expects."""


class PenguiFlowRatioSampler(TraceIdRatioBased):
    """``TraceIdRatioBased`` that samples the fraction ``rate`` of PenguiFlow's traces.

    The SDK's ratio sampler compares the trace id's low 64 bits with the rate.
    PenguiFlow's default trace ids are ``uuid4().hex`` (spec), whose low 64 bits
    start with the fixed variant bits ``10``: every such id falls in
    ``[0.5, 0.75)`` of the range, so a rate of 0.25 sampled no trace and 0.8
    every one. This sampler reads the top 48 bits instead, random both in a
    uuid4 and in a W3C random trace id. Deterministic per trace id, like the
    SDK's: every process deciding on one trace decides alike.
    :func:`configure_tracing` uses it for ``OTEL_TRACES_SAMPLER=traceidratio``
    and ``parentbased_traceidratio``.
    """

    def should_sample(self, parent_context: Any, trace_id: int, name: str,
                      kind: Any = None, attributes: Any = None, links: Any = None,
                      trace_state: Any = None) -> SamplingResult:
        """Sample when the trace id's top 48 bits, scaled to 64, are below the bound."""
        sampled = ((trace_id >> 80) << 16) < self.bound
        return SamplingResult(Decision.RECORD_AND_SAMPLE if sampled else Decision.DROP,
                              attributes if sampled else None,
                              _parent_trace_state(parent_context))

    def get_description(self) -> str:
        return f"PenguiFlowRatioSampler{{{self.rate}}}"


def _parent_trace_state(parent_context: Any) -> Any:
    from opentelemetry import trace as _trace

    span_context = _trace.get_current_span(parent_context).get_span_context()
    return span_context.trace_state if span_context.is_valid else None


def _penguiflow_ratio(sampler: Sampler) -> Sampler:
    """``sampler`` with the SDK's ``TraceIdRatioBased`` (bare, or as a ``ParentBased``
    root) swapped for :class:`PenguiFlowRatioSampler` of the same rate: the SDK's
    rule sampled none of PenguiFlow's default trace ids at a rate <= 0.5."""
    if type(sampler) is TraceIdRatioBased:
        return PenguiFlowRatioSampler(sampler.rate)
    if type(sampler) is ParentBased and type(sampler._root) is TraceIdRatioBased:
        return ParentBased(
            root=PenguiFlowRatioSampler(sampler._root.rate),
            remote_parent_sampled=sampler._remote_parent_sampled,
            remote_parent_not_sampled=sampler._remote_parent_not_sampled,
            local_parent_sampled=sampler._local_parent_sampled,
            local_parent_not_sampled=sampler._local_parent_not_sampled)
    return sampler


def _env_sampler() -> Sampler | None:
    """The ratio samplers of ``OTEL_TRACES_SAMPLER`` as :class:`PenguiFlowRatioSampler`;
    None for any other value (the SDK reads those itself)."""
    name = os.environ.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if name not in ("traceidratio", "parentbased_traceidratio"):
        return None
    raw = os.environ.get("OTEL_TRACES_SAMPLER_ARG", "1.0")
    try:
        rate = float(raw)
        if not 0.0 <= rate <= 1.0:
            raise ValueError(raw)
    except ValueError:
        warnings.warn(f"OTEL_TRACES_SAMPLER_ARG={raw!r} is not a rate in [0, 1]; "
                      "sampling every trace", TelemetryWarning, stacklevel=3)
        rate = 1.0
    ratio = PenguiFlowRatioSampler(rate)
    return ratio if name == "traceidratio" else ParentBased(root=ratio)


class PenguiFlowIdGenerator(IdGenerator):
    """An SDK ``IdGenerator`` that uses the ids PenguiFlow parked, else random ones.

    The runtime calls :func:`penguiflow.tracing.park_ids` right before
    ``tracer.start_span``; the SDK then asks this generator for the trace id
    (root spans only) and the span id. Without parked ids it behaves like the
    SDK's ``RandomIdGenerator``, so spans of other libraries are unaffected.

    Optional since the runtime puts the same logic in front of any provider's
    generator on its own tracer; :func:`configure_tracing` still installs it,
    and a provider built with it behaves as before.
    """

    def __init__(self, fallback: IdGenerator | None = None) -> None:
        """Args:
            fallback: where ids come from when none is parked (default random).
        """
        self._fallback = fallback or RandomIdGenerator()

    def generate_span_id(self) -> int:
        """The parked span id, or a fresh random one."""
        span_id = take_pending_span_id()
        # The SDK asks for the trace id only for a root span, and always before
        # the span id; drop a parked trace id it did not take, so it cannot leak
        # into the next, unrelated root span started on this thread.
        take_pending_trace_id()
        return span_id or self._fallback.generate_span_id()

    def generate_trace_id(self) -> int:
        """The parked trace id, or a fresh random one."""
        return take_pending_trace_id() or self._fallback.generate_trace_id()


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None


def _bounded(call: Callable[[], object], timeout_s: float, what: str,
             threads: list[threading.Thread]) -> bool:
    """Run ``call`` on a daemon thread; True when it returned a truthy/None result in time.

    The SDK's ``force_flush`` ignores its timeout (it exports synchronously) and
    ``shutdown`` joins the export thread for up to 30 s, so either can block the
    caller for as long as a stalled collector holds the request. A daemon
    thread bounds the wait. A thread that finished in time is joined before
    returning; one that did not is added to ``threads`` (the handle joins those
    at shutdown, bounded; what is still running then dies with the process).
    """
    done = threading.Event()
    ok = [False]

    def run() -> None:
        try:
            ok[0] = call() is not False
        except Exception:
            _log.exception("telemetry %s failed", what)
        finally:
            done.set()

    thread = threading.Thread(target=run, name=f"penguiflow-telemetry-{what}", daemon=True)
    thread.start()
    if not done.wait(max(timeout_s, 0.0)):
        threads.append(thread)
        _log.warning("telemetry %s did not finish within %.2f s (collector slow or down?); "
                     "not waiting longer, spans still queued may be lost", what, timeout_s)
        return False
    thread.join()  # done is its last act: it returns at once
    return ok[0]


class TelemetryHandle:
    """The providers :func:`configure_tracing` built, and their lifecycle.

    Use it as a context manager, or call :meth:`shutdown` before the process
    exits (an exit hook does it too, bounded by ``shutdown_timeout_s``).
    Neither method raises; both return within their timeout.
    """

    def __init__(self, tracer_provider: TracerProvider, meter_provider: MeterProvider | None,
                 failures: FailureLog, *, shutdown_timeout_s: float,
                 traces_endpoint: str | None, metrics_endpoint: str | None) -> None:
        self.tracer_provider: Final = tracer_provider
        """The SDK tracer provider (pass it explicitly when ``set_global=False``)."""
        self.meter_provider: Final = meter_provider
        """The SDK meter provider, or None when ``metrics=False``."""
        self.traces_endpoint: Final = traces_endpoint
        """Where spans go (None when a custom ``exporter=`` was given)."""
        self.metrics_endpoint: Final = metrics_endpoint
        """Where metrics go (None without OTLP metrics)."""
        self._failures = failures
        self._shutdown_timeout_s = shutdown_timeout_s
        self._lock = threading.Lock()
        self._closed = False
        #: Threads of a force_flush/shutdown that ran out of time (joined at shutdown).
        self._stragglers: list[threading.Thread] = []
        #: Counts what a shutdown that gave up waiting leaves unsent as lost.
        self._settle: Callable[[], None] | None = None
        self._filter = RateLimitFilter()
        for name in _SDK_EXPORTER_LOGGERS:
            logging.getLogger(name).addFilter(self._filter)
        atexit.register(self._at_exit)

    @property
    def stats(self) -> ExportStats:
        """A snapshot of the export counters (exported, failed, last error)."""
        return self._failures.snapshot()

    @property
    def is_shutdown(self) -> bool:
        """Whether :meth:`shutdown` was called."""
        return self._closed

    def force_flush(self, timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S) -> bool:
        """Export what is buffered now; wait at most ``timeout_s``.

        Returns:
            True when everything buffered reached the collector in time; False
            when the time ran out, an export failed (see :attr:`stats`), or
            the handle is shut down (logged).
        """
        if self._closed:
            _log.warning("TelemetryHandle.force_flush() after shutdown(): nothing to flush")
            return False
        # A flush that timed out earlier still blocks on the SDK's export lock (a
        # stalled collector): a new thread would only queue behind it, one more per
        # call for as long as the stall lasts. Wait on that one instead, bounded.
        started = time.monotonic()
        self._stragglers = [t for t in self._stragglers if t.is_alive()]
        flushing = [t for t in self._stragglers if t.name == "penguiflow-telemetry-force_flush"]
        for thread in flushing:
            thread.join(max(timeout_s - (time.monotonic() - started), 0.0))
        if any(t.is_alive() for t in flushing):
            _log.warning("telemetry force_flush: an earlier flush is still stuck exporting "
                         "(collector slow or down?); not starting another")
            return False
        timeout_s = max(timeout_s - (time.monotonic() - started), 0.0)
        tracer, meter = self.tracer_provider, self.meter_provider
        millis = max(int(timeout_s * 1000), 1)
        before = self._failures.snapshot()

        def flush() -> bool:
            flushed = tracer.force_flush(millis)
            if meter is not None:
                flushed = meter.force_flush(millis) and flushed
            return flushed

        flushed = _bounded(flush, timeout_s, "force_flush", self._stragglers)
        # The SDK's flush reports "done", not "delivered": an export that failed
        # meanwhile shows in the counters only.
        after = self._failures.snapshot()
        return flushed and (after.span_exports_failed, after.metric_exports_failed) == (
            before.span_exports_failed, before.metric_exports_failed)

    def shutdown(self, timeout_s: float | None = None) -> bool:
        """Flush and stop the providers; idempotent (a second call logs a warning).

        Args:
            timeout_s: the longest to wait (default ``shutdown_timeout_s`` of
                :func:`configure_tracing`); spans still unsent then are dropped.

        Returns:
            True when everything shut down in time, and then no thread the
            handle started is left (``penguiflow-telemetry-*``). On False, the
            threads still blocked on the collector end with its answer or
            their export timeout (or with the process: they are daemons).
        """
        with self._lock:
            if self._closed:
                _log.warning("TelemetryHandle.shutdown() called again; already shut down")
                return True
            self._closed = True
        atexit.unregister(self._at_exit)
        timeout = self._shutdown_timeout_s if timeout_s is None else timeout_s
        tracer, meter = self.tracer_provider, self.meter_provider
        millis = max(int(timeout * 1000), 1)

        def stop() -> None:
            tracer.shutdown()
            if meter is not None:
                meter.shutdown(timeout_millis=millis)

        deadline = time.monotonic() + max(timeout, 0.0)
        try:
            ok = _bounded(stop, timeout, "shutdown", self._stragglers)
            # Threads of an earlier force_flush that timed out: the stop ended their
            # exports, or they end now; waited for within the same bound.
            for thread in self._stragglers:
                thread.join(max(deadline - time.monotonic(), 0.0))
            self._stragglers = [t for t in self._stragglers if t.is_alive()]
            if not ok and self._settle is not None:
                self._settle()
            return ok and not self._stragglers
        finally:
            for name in _SDK_EXPORTER_LOGGERS:
                logging.getLogger(name).removeFilter(self._filter)

    def _at_exit(self) -> None:
        if not self._closed:
            self.shutdown()

    def __enter__(self) -> TelemetryHandle:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self._closed:
            self.shutdown()

    def __repr__(self) -> str:
        state = "shut down" if self._closed else "live"
        return f"<TelemetryHandle {state} traces={self.traces_endpoint!r}>"


def _resolve_protocol(protocol: str | None, signal: str) -> str:
    value = (protocol or os.environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL")
             or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf").strip().lower()
    if value not in _PROTOCOLS:
        raise ValueError(f"unsupported OTLP protocol {value!r} for {signal}; "
                         f"use one of {', '.join(_PROTOCOLS)} (argument protocol= or "
                         "OTEL_EXPORTER_OTLP_PROTOCOL)")
    return value


def _grpc_class(module: str, name: str) -> Any:
    """A class of the optional gRPC exporter package, or an ImportError naming the fix."""
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as exc:
        raise ImportError(_GRPC_MISSING) from exc


def _otlp_span_exporter(protocol: str, endpoint: str, headers: Mapping[str, str] | None,
                        timeout_s: float | None) -> SpanExporter:
    if protocol == "grpc":
        grpc_exporter: type[SpanExporter] = _grpc_class(
            "opentelemetry.exporter.otlp.proto.grpc.trace_exporter", "OTLPSpanExporter")
        return grpc_exporter(endpoint=endpoint, headers=dict(headers or {}) or None,
                             timeout=timeout_s)  # type: ignore[call-arg]
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=endpoint, headers=headers, timeout=timeout_s)


def _otlp_metric_exporter(protocol: str, endpoint: str, headers: Mapping[str, str] | None,
                          timeout_s: float | None) -> MetricExporter:
    if protocol == "grpc":
        grpc_exporter: type[MetricExporter] = _grpc_class(
            "opentelemetry.exporter.otlp.proto.grpc.metric_exporter", "OTLPMetricExporter")
        return grpc_exporter(endpoint=endpoint, headers=dict(headers or {}) or None,
                             timeout=timeout_s)  # type: ignore[call-arg]
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

    return OTLPMetricExporter(endpoint=endpoint, headers=headers, timeout=timeout_s)


def _set_globals(tracer_provider: TracerProvider, meter_provider: MeterProvider | None) -> None:
    # The API sets each global provider once and ignores later calls (with a log
    # line only); check what won, and say how to fix it when it was not ours.
    trace_api.set_tracer_provider(tracer_provider)
    if trace_api.get_tracer_provider() is not tracer_provider:
        warnings.warn(
            "configure_tracing(): a global TracerProvider was already set (an earlier "
            "configure_tracing() or the application's own set-up), and OpenTelemetry lets it "
            "be set only once, so the runtime's spans keep going to that one. Call "
            "configure_tracing() once at start-up, shut the old handle down and reuse it, or "
            "pass set_global=False and use handle.tracer_provider explicitly.",
            TelemetryWarning, stacklevel=3)
    if meter_provider is not None:
        metrics_api.set_meter_provider(meter_provider)
        if metrics_api.get_meter_provider() is not meter_provider:
            warnings.warn(
                "configure_tracing(): a global MeterProvider was already set and OpenTelemetry "
                "lets it be set only once, so metrics keep going to that one. Configure once at "
                "start-up, or pass metrics=False / set_global=False.",
                TelemetryWarning, stacklevel=3)


def configure_tracing(
    service_name: str | None = None,
    endpoint: str | None = None,
    *,
    protocol: str | None = None,
    headers: Mapping[str, str] | None = None,
    resource_attributes: Mapping[str, Any] | None = None,
    sampler: Sampler | None = None,
    exporter: SpanExporter | None = None,
    span_processor: Literal["batch", "simple"] = "batch",
    metrics: bool = True,
    metric_reader: MetricReader | None = None,
    metric_interval_s: float | None = None,
    export_timeout_s: float | None = None,
    shutdown_timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S,
    set_global: bool = True,
    max_queue_size: int | None = None,
    max_export_batch_size: int | None = None,
) -> TelemetryHandle:
    """Set up the OTel SDK so PenguiFlow's spans and metrics reach an OTLP collector.

    Builds a ``TracerProvider`` with :class:`PenguiFlowIdGenerator` and a
    resource, a span processor in front of an OTLP exporter, and (``metrics``)
    a ``MeterProvider`` with a periodic OTLP metric reader; registers both as
    the global providers unless ``set_global=False``.

    Args:
        service_name: ``service.name``; else ``OTEL_SERVICE_NAME``, else
            :data:`DEFAULT_SERVICE_NAME`.
        endpoint: the collector's base URL (``http://localhost:4318``; the
            ``/v1/traces`` and ``/v1/metrics`` paths are appended); else
            ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` / ``..._METRICS_ENDPOINT``
            (used as they are), else ``OTEL_EXPORTER_OTLP_ENDPOINT`` (base),
            else ``http://localhost:4318`` (``localhost:4317`` for gRPC).
        protocol: ``"http/protobuf"`` (default) or ``"grpc"`` (needs the
            ``[grpc]`` extra); else ``OTEL_EXPORTER_OTLP_PROTOCOL``.
        headers: sent with every export (auth tokens); merged over
            ``OTEL_EXPORTER_OTLP_[TRACES_]HEADERS``.
        resource_attributes: merged over ``OTEL_RESOURCE_ATTRIBUTES``.
        sampler: an SDK sampler; default from ``OTEL_TRACES_SAMPLER``
            (parent-based always-on), its ratio samplers as
            :class:`PenguiFlowRatioSampler`. An SDK ``TraceIdRatioBased`` given
            here (bare or as a ``ParentBased`` root) is used as
            :class:`PenguiFlowRatioSampler` of the same rate too: set on the
            provider built here, so every tracer of it (the application's, a
            node's own spans) samples alike. Sampling is decided once per
            trace: a trace is exported whole or not at all. (On an
            application's own provider, a bare ``TraceIdRatioBased`` is kept,
            with a warning: see the observability guide.)
        exporter: a span exporter to use instead of OTLP (tests pass the SDK's
            ``InMemorySpanExporter``).
        span_processor: ``"batch"`` (background thread; the only choice that
            never blocks the caller on the network) or ``"simple"`` (exports
            synchronously on span end; for in-memory exporters).
        metrics: build the MeterProvider.
        metric_reader: a reader to use instead of the periodic OTLP one
            (tests pass ``InMemoryMetricReader``).
        metric_interval_s: how often metrics are exported; else
            ``OTEL_METRIC_EXPORT_INTERVAL`` (ms), else 60 s.
        export_timeout_s: the longest one export (retries included) may take;
            else ``OTEL_EXPORTER_OTLP_[TRACES_]TIMEOUT`` (seconds, as the
            Python SDK reads it), else the SDK's 10 s.
        shutdown_timeout_s: the longest :meth:`TelemetryHandle.shutdown` (and
            the exit hook) waits.
        set_global: register the providers as OpenTelemetry's global ones (what
            the runtime and instrumented libraries use). The API allows that
            once per process: a second time warns with :class:`TelemetryWarning`.
        max_queue_size: ``"batch"`` only: spans that may wait for export; one
            more is dropped and counted (:attr:`ExportStats.spans_dropped`);
            else ``OTEL_BSP_MAX_QUEUE_SIZE``, else 2048.
        max_export_batch_size: ``"batch"`` only: spans per export request; else
            ``OTEL_BSP_MAX_EXPORT_BATCH_SIZE``, else 512 (never above
            ``max_queue_size``).

    Returns:
        The handle: flush, shut down, inspect :attr:`TelemetryHandle.stats`.

    Raises:
        ValueError: ``protocol`` or ``span_processor`` is not a supported value,
            a queue size is below 1, or ``OTEL_BSP_MAX_QUEUE_SIZE`` /
            ``OTEL_BSP_MAX_EXPORT_BATCH_SIZE`` is not an integer.
        ImportError: ``protocol="grpc"`` without the ``[grpc]`` extra installed.
    """
    if span_processor not in ("batch", "simple"):
        raise ValueError(f"span_processor must be 'batch' or 'simple', not {span_processor!r}")
    queue_size = (_env_int("OTEL_BSP_MAX_QUEUE_SIZE", _DEFAULT_MAX_QUEUE_SIZE)
                  if max_queue_size is None else max_queue_size)
    batch_size = (_env_int("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", _DEFAULT_MAX_EXPORT_BATCH_SIZE)
                  if max_export_batch_size is None else max_export_batch_size)
    if queue_size < 1 or batch_size < 1:
        raise ValueError(f"max_queue_size and max_export_batch_size must be >= 1 span; got "
                         f"{queue_size} and {batch_size} (arguments or OTEL_BSP_* variables)")
    resource = make_resource(service_name, resource_attributes)
    traces_url: str | None = None
    if exporter is None:
        traces_protocol = _resolve_protocol(protocol, "traces")
        traces_url = signal_endpoint("traces", endpoint, grpc=traces_protocol == "grpc")
        exporter = _otlp_span_exporter(traces_protocol, traces_url, headers, export_timeout_s)
    failures = FailureLog({"spans": traces_url or type(exporter).__name__})
    counted = CountingSpanExporter(exporter, failures)
    tracer_provider = TracerProvider(
        sampler=_penguiflow_ratio(sampler) if sampler is not None else _env_sampler(),
        resource=resource, id_generator=PenguiFlowIdGenerator(),
        # Our handle's exit hook shuts down bounded; the SDK's own would wait up
        # to 30 s per processor on a stalled collector.
        shutdown_on_exit=False)
    processor: SpanProcessor = (
        CountingBatchProcessor(counted, failures, max_queue_size=queue_size,
                                max_export_batch_size=min(batch_size, queue_size))
        if span_processor == "batch" else SimpleSpanProcessor(counted))
    tracer_provider.add_span_processor(processor)

    meter_provider: MeterProvider | None = None
    metrics_url: str | None = None
    if metrics:
        if metric_reader is None:
            metrics_protocol = _resolve_protocol(protocol, "metrics")
            metrics_url = signal_endpoint("metrics", endpoint, grpc=metrics_protocol == "grpc")
            failures.endpoints["metrics"] = metrics_url
            metric_exporter = CountingMetricExporter(
                _otlp_metric_exporter(metrics_protocol, metrics_url, headers, export_timeout_s),
                failures)
            metric_reader = PeriodicExportingMetricReader(
                metric_exporter,
                export_interval_millis=None if metric_interval_s is None
                else metric_interval_s * 1000,
                export_timeout_millis=None if export_timeout_s is None
                else export_timeout_s * 1000)
        meter_provider = MeterProvider(metric_readers=[metric_reader], resource=resource,
                                       shutdown_on_exit=False)

    handle = TelemetryHandle(tracer_provider, meter_provider, failures,
                             shutdown_timeout_s=shutdown_timeout_s,
                             traces_endpoint=traces_url, metrics_endpoint=metrics_url)
    if isinstance(processor, CountingBatchProcessor):
        handle._settle = processor.settle
    if set_global:
        _set_globals(tracer_provider, meter_provider)
    return handle

