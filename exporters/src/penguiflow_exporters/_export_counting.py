"""Counted OTLP export: every span's fate counted, failures logged without flooding.

The SDK's exporters and ``BatchSpanProcessor`` lose spans quietly (a full queue, a
refused batch: a log line each, nothing a program can read). The wrappers here,
installed by :func:`~penguiflow_exporters.otel.configure_tracing`, count each
outcome into one :class:`ExportStats` (read as ``TelemetryHandle.stats``) so that
after a flush ``spans ended == spans_exported + spans_failed + spans_dropped +
spans_lost_at_shutdown``, exactly, and log failures at most once a
:data:`FAILURE_LOG_INTERVAL_S` (:class:`FailureLog`, :class:`RateLimitFilter`).
Their log lines keep the ``penguiflow_exporters.otel`` logger, as before this
module was split from that one.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, MetricsData
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

__all__ = ["FAILURE_LOG_INTERVAL_S", "CountingBatchProcessor", "CountingMetricExporter",
           "CountingSpanExporter", "ExportStats", "FailureLog", "RateLimitFilter"]

_log = logging.getLogger("penguiflow_exporters.otel")

#: At most one "exports still failing" summary per this many seconds.
FAILURE_LOG_INTERVAL_S: Final = 60.0


@dataclasses.dataclass(slots=True)
class ExportStats:
    """What the handle's exporters did so far (a snapshot; see :attr:`TelemetryHandle.stats`)."""

    spans_exported: int = 0
    """Spans the collector accepted."""
    spans_failed: int = 0
    """Spans in batches the collector refused or never answered for (lost)."""
    span_exports_failed: int = 0
    """Failed span export calls (one per batch)."""
    metric_exports_failed: int = 0
    """Failed metric export calls."""
    last_error: str | None = None
    """The most recent failure, as the exporter reported it (its exception, or the
    error the SDK exporter logged, e.g. the collector's HTTP status)."""
    spans_dropped: int = 0
    """Spans refused because the export queue was full (``max_queue_size``
    spans waiting: the collector is slower than the flow); never sent."""
    spans_lost_at_shutdown: int = 0
    """Spans ended after :meth:`TelemetryHandle.shutdown`, or still queued or
    being exported when it gave up waiting (see its ``timeout_s``): not sent, as
    far as anyone knows then. An export that still ends afterwards moves its spans
    from here to ``spans_exported`` or ``spans_failed``."""


class _LogWindow:
    """Occurrences of one thing to log, at most one line per
    :data:`FAILURE_LOG_INTERVAL_S` (the caller holds its lock)."""

    __slots__ = ("_count", "_next")

    def __init__(self) -> None:
        self._count = 0
        self._next = 0.0

    def due(self, now: float, *, first: bool) -> int | None:
        """Count one; the occurrences since the last line when a line is due now (the
        ``first`` of a series always is), else None."""
        self._count += 1
        if not first and now < self._next:
            return None
        count, self._count = self._count, 0
        self._next = now + FAILURE_LOG_INTERVAL_S
        return count


class FailureLog:
    """Counts export outcomes and logs failures without flooding the application's log.

    The first failure is logged at WARNING with the likely fix; while failures
    go on, at most one summary per :data:`FAILURE_LOG_INTERVAL_S`; the first
    success after failures at INFO. Thread-safe (exports run on SDK threads).
    """

    def __init__(self, endpoints: dict[str, str],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.endpoints = endpoints
        self._clock = clock
        """Where each signal (``spans``, ``metrics``) goes, for the messages."""
        self.stats = ExportStats()
        self._lock = threading.Lock()
        self._failing = False
        self._failures = _LogWindow()
        self._drops = _LogWindow()

    def success(self, spans: int) -> None:
        with self._lock:
            self.stats.spans_exported += spans
            recovered, self._failing = self._failing, False
        if recovered:
            _log.info("OTLP export to %s works again", self.endpoints.get("spans"))

    def failure(self, signal: str, spans: int, error: str | None) -> None:
        now = self._clock()
        with self._lock:
            if signal == "spans":
                self.stats.span_exports_failed += 1
                self.stats.spans_failed += spans
            else:
                self.stats.metric_exports_failed += 1
            # No reason given (the SDK exporter logged none we saw): keep the last one.
            self.stats.last_error = (error or self.stats.last_error
                                     or f"{signal} export failed (the exporter gave no reason)")
            first, self._failing = not self._failing, True
            count = self._failures.due(now, first=first)
        if count is None:
            return
        if first:
            _log.warning(
                "OTLP export of %s to %s failed (%s); the flow goes on and the data is dropped. "
                "Is a collector listening there? Set endpoint= or OTEL_EXPORTER_OTLP_ENDPOINT "
                "(Jaeger takes OTLP/HTTP on port 4318).",
                signal, self.endpoints.get(signal), error or "the exporter logged why")
        else:
            _log.warning("OTLP export of %s to %s still failing: %d failed exports in the last "
                         "%.0f s", signal, self.endpoints.get(signal), count,
                         FAILURE_LOG_INTERVAL_S)

    def snapshot(self) -> ExportStats:
        with self._lock:
            return dataclasses.replace(self.stats)

    def dropped(self, capacity: int) -> None:
        """Count one span refused by a full queue; log the first, then one a minute."""
        now = self._clock()
        with self._lock:
            self.stats.spans_dropped += 1
            first = self.stats.spans_dropped == 1
            count = self._drops.due(now, first=first)
        if count is None:
            return
        if first:
            _log.warning(
                "span export queue full (%d spans waiting for %s): spans are dropped and "
                "counted in TelemetryHandle.stats.spans_dropped. The collector is slower than "
                "the flow; raise configure_tracing(max_queue_size=...) / OTEL_BSP_MAX_QUEUE_SIZE "
                "or sample fewer traces.", capacity, self.endpoints.get("spans"))
        else:
            _log.warning("span export queue still full: %d more spans dropped", count)

    def lost_at_shutdown(self, spans: int) -> None:
        with self._lock:
            self.stats.spans_lost_at_shutdown += spans


# The last ERROR an SDK exporter logged, per thread (set by RateLimitFilter).
_sdk_error = threading.local()


def _last_sdk_error() -> str | None:
    message = getattr(_sdk_error, "message", None)
    retry = getattr(_sdk_error, "retry", None)
    if isinstance(message, str) and isinstance(retry, str):
        return f"{message} (last retry: {retry})"
    return message if isinstance(message, str) else None


def _forget_sdk_error() -> None:
    _sdk_error.message = _sdk_error.retry = None


class RateLimitFilter(logging.Filter):
    """Let each (logger, message template) through at most once per interval."""

    def __init__(self, interval_s: float = FAILURE_LOG_INTERVAL_S) -> None:
        super().__init__()
        self._interval = interval_s
        self._seen: dict[tuple[str, object], float] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            # What the SDK exporter logs right before it returns FAILURE (e.g. the
            # collector's HTTP status), and the retries' cause before that (e.g.
            # connection refused), on the exporting thread: its last_error.
            try:
                text = record.getMessage()
            except Exception:
                text = str(record.msg)
            if record.levelno >= logging.ERROR:
                _sdk_error.message = text
            else:
                _sdk_error.retry = text
        key = (record.name, record.msg)
        now = time.monotonic()
        with self._lock:
            if now < self._seen.get(key, 0.0):
                return False
            self._seen[key] = now + self._interval
        return True


class CountingSpanExporter(SpanExporter):
    """Wraps the real exporter: counts outcomes, turns an exception into FAILURE."""

    def __init__(self, inner: SpanExporter, failures: FailureLog) -> None:
        self._inner = inner
        self._failures = failures
        #: Told how many spans left the batch queue, and how many an export ended
        #: with (see CountingBatchProcessor).
        self.on_taken: Callable[[int], None] | None = None
        self.on_done: Callable[[int], None] | None = None

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self.on_taken is not None:
            self.on_taken(len(spans))
        _forget_sdk_error()
        try:
            result = self._inner.export(spans)
        except Exception as exc:  # an observer never raises into the SDK's thread
            self._ended(len(spans))
            self._failures.failure("spans", len(spans), repr(exc))
            return SpanExportResult.FAILURE
        self._ended(len(spans))
        if result is SpanExportResult.SUCCESS:
            self._failures.success(len(spans))
        else:
            self._failures.failure("spans", len(spans), _last_sdk_error())
        return result

    def _ended(self, spans: int) -> None:
        if self.on_done is not None:
            self.on_done(spans)

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


class CountingMetricExporter(MetricExporter):
    """Wraps the real metric exporter: counts failures, never raises."""

    def __init__(self, inner: MetricExporter, failures: FailureLog) -> None:
        # The reader asks the exporter for these; forward the inner one's choice.
        super().__init__(preferred_temporality=inner._preferred_temporality,
                         preferred_aggregation=inner._preferred_aggregation)
        self._inner = inner
        self._failures = failures

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000,
               **kwargs: Any) -> MetricExportResult:
        _forget_sdk_error()
        try:
            result = self._inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs)
        except Exception as exc:
            self._failures.failure("metrics", 0, repr(exc))
            return MetricExportResult.FAILURE
        if result is not MetricExportResult.SUCCESS:
            self._failures.failure("metrics", 0, _last_sdk_error())
        return result

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self._inner.force_flush(timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self._inner.shutdown(timeout_millis=timeout_millis, **kwargs)


class CountingBatchProcessor(SpanProcessor):
    """The SDK's ``BatchSpanProcessor`` with its queue admitted through a counter.

    The SDK drops a span when ``max_queue_size`` spans wait, logging a line and
    counting nothing the handle can read. Here every sampled span is admitted
    first: ``queued`` counts the spans handed to the SDK and not yet taken by
    an export (the exporter calls :meth:`taken` as a batch starts), so it is
    never below the SDK queue's real length and the SDK's own drop never
    happens; a span arriving when ``queued == max_queue_size`` is refused here
    (the newest, where the SDK would have evicted the oldest) and counted in
    :attr:`ExportStats.spans_dropped`. After a flush every ended span is in
    exactly one counter. What ``shutdown`` leaves queued or being exported, or
    what ends after it, is counted in :attr:`ExportStats.spans_lost_at_shutdown`
    (:meth:`settle`; also when the handle's shutdown gave up waiting on a hung
    export); an export that still ends after that count moves its spans back
    out, into exported or failed.
    """

    def __init__(self, exporter: CountingSpanExporter, failures: FailureLog, *,
                 max_queue_size: int, max_export_batch_size: int) -> None:
        self._failures = failures
        self._capacity = max_queue_size
        self._lock = threading.Lock()
        self._queued = 0
        #: Spans taken off the queue by an export that has not ended.
        self._exporting = 0
        self._closed = False
        self._settled = False
        exporter.on_taken = self.taken
        exporter.on_done = self.done
        self._inner = BatchSpanProcessor(exporter, max_queue_size=max_queue_size,
                                         max_export_batch_size=max_export_batch_size)

    # on_start and _on_ending stay SpanProcessor's no-ops, as the SDK's batch
    # processor leaves them: the live tracer's fast path (_sdkwriter) needs that.

    def on_end(self, span: ReadableSpan) -> None:
        if not (span.context and span.context.trace_flags.sampled):
            return  # the SDK skips these too: not ended spans to export
        with self._lock:
            closed = self._closed
            admitted = not closed and self._queued < self._capacity
            if admitted:
                self._queued += 1
        if admitted:
            self._inner.on_end(span)
        elif closed:
            self._failures.lost_at_shutdown(1)
        else:
            self._failures.dropped(self._capacity)

    def taken(self, spans: int) -> None:
        """An export took ``spans`` spans off the queue (called by the exporter)."""
        with self._lock:
            self._queued -= spans
            self._exporting += spans

    def done(self, spans: int) -> None:
        """An export of ``spans`` spans ended, either way (called by the exporter)."""
        with self._lock:
            self._exporting -= spans
            late = self._settled
        if late:  # counted as lost by settle(): it is exported or failed after all
            self._failures.lost_at_shutdown(-spans)

    def settle(self) -> None:
        """Count what is still queued or being exported as lost at shutdown (once).

        Called when shutdown ends, and by :meth:`TelemetryHandle.shutdown` when it
        gave up waiting (a hung export): the stats then say what did not go out,
        instead of nothing until the hung export ends, if ever.
        """
        with self._lock:
            if self._settled:
                return
            self._closed = self._settled = True
            left = self._queued + self._exporting
        if left:
            self._failures.lost_at_shutdown(left)

    def shutdown(self) -> None:
        with self._lock:
            self._closed = True
        self._inner.shutdown()  # type: ignore[no-untyped-call]  # the SDK leaves it unannotated
        self.settle()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)
