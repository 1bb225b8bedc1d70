"""The telemetry handle accounts for every span, says why exports fail, and cleans up.

Against a real OTLP/HTTP exporter posting to a loopback receiver
(``otlp_receiver.py``): spans refused by a full export queue are counted
exactly (the SDK's batch processor alone drops them with a log line only),
``last_error`` carries the collector's answer, and no thread the handle
started outlives ``shutdown()``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from otlp_receiver import OTLPReceiver, down_url

from penguiflow_exporters.otel import TelemetryHandle, configure_tracing

QUEUE = 8
BATCH = 4


def telemetry_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("penguiflow-telemetry-")]


def end_spans(handle: TelemetryHandle, count: int) -> None:
    tracer = handle.tracer_provider.get_tracer("penguiflow")
    for _ in range(count):
        tracer.start_span("hop").end()


@pytest.fixture(autouse=True)
def _no_timer_exports(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # The batch processor exports on a full batch, or every OTEL_BSP_SCHEDULE_DELAY
    # ms; a long delay leaves the batch size as the only trigger, so what is queued
    # when does not depend on the machine's speed.
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "600000")
    for name in ("OTEL_BSP_MAX_QUEUE_SIZE", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
                 "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    yield
    assert telemetry_threads() == []


def small_queue(url: str, **options: object) -> TelemetryHandle:
    return configure_tracing("flood", url, metrics=False, set_global=False,
                             max_queue_size=QUEUE, max_export_batch_size=BATCH, **options)


def test_spans_a_full_queue_refuses_are_counted_exactly(otlp_receiver: OTLPReceiver) -> None:
    otlp_receiver.mode = "stall"
    handle = small_queue(otlp_receiver.url, export_timeout_s=20)
    try:
        end_spans(handle, BATCH)  # a full batch: the export thread takes it ...
        otlp_receiver.wait_for_requests(1)  # ... and is held by the collector
        end_spans(handle, 100)  # QUEUE fit in the queue; the rest is refused
        stalled = handle.stats
    finally:
        otlp_receiver.release()
    otlp_receiver.mode = "ok"
    assert stalled.spans_dropped == 100 - QUEUE
    assert handle.force_flush(timeout_s=5)
    stats = handle.stats
    received = len(otlp_receiver.spans())
    assert received == BATCH + QUEUE
    # Every ended span is in exactly one counter.
    assert stats.spans_exported == received
    assert stats.spans_dropped == BATCH + 100 - received
    assert (stats.spans_failed, stats.spans_lost_at_shutdown, stats.last_error) == (0, 0, None)
    assert handle.shutdown(timeout_s=5)


def test_a_flood_is_accounted_for(otlp_receiver: OTLPReceiver,
                                  caplog: pytest.LogCaptureFixture) -> None:
    # Not held: the export thread and the flood race; whatever the interleaving,
    # sent + dropped == ended, and the drop is logged once with the fix, not per span.
    handle = small_queue(otlp_receiver.url)
    end_spans(handle, 5000)
    assert handle.shutdown(timeout_s=10)
    stats = handle.stats
    assert stats.spans_dropped > 0
    assert stats.spans_exported == len(otlp_receiver.spans())
    assert stats.spans_exported + stats.spans_dropped == 5000
    assert (stats.spans_failed, stats.spans_lost_at_shutdown) == (0, 0)
    full = [r.getMessage() for r in caplog.records if "queue full" in r.getMessage()]
    assert len(full) == 1 and "max_queue_size" in full[0], full


def test_spans_ended_after_shutdown_are_counted(otlp_receiver: OTLPReceiver) -> None:
    handle = small_queue(otlp_receiver.url)
    end_spans(handle, 3)
    assert handle.shutdown(timeout_s=5)
    end_spans(handle, 2)
    stats = handle.stats
    assert (stats.spans_exported, stats.spans_lost_at_shutdown, stats.spans_dropped) == (3, 2, 0)


def test_a_refusing_collector_sets_last_error(otlp_receiver: OTLPReceiver) -> None:
    otlp_receiver.mode = "reject"  # HTTP 400
    handle = small_queue(otlp_receiver.url)
    end_spans(handle, 2)
    assert handle.force_flush(timeout_s=5) is False
    stats = handle.stats
    assert stats.spans_failed == 2 and stats.span_exports_failed == 1
    assert stats.last_error is not None and "400" in stats.last_error, stats.last_error
    assert handle.shutdown(timeout_s=5)


def test_a_collector_that_is_down_sets_last_error() -> None:
    handle = small_queue(down_url(), export_timeout_s=0.5)
    end_spans(handle, 2)
    assert handle.force_flush(timeout_s=5) is False
    stats = handle.stats
    assert stats.spans_failed == 2
    assert stats.last_error is not None and "Failed to export" in stats.last_error, \
        stats.last_error
    assert handle.shutdown(timeout_s=5)


def test_no_telemetry_thread_outlives_shutdown(otlp_receiver: OTLPReceiver) -> None:
    handle = small_queue(otlp_receiver.url)
    end_spans(handle, 10)
    assert handle.force_flush(timeout_s=5)
    assert telemetry_threads() == []  # a flush that finished joined its thread
    assert handle.shutdown(timeout_s=5)
    assert telemetry_threads() == []


def test_a_flush_that_timed_out_is_joined_by_shutdown(otlp_receiver: OTLPReceiver) -> None:
    otlp_receiver.mode = "stall"
    handle = small_queue(otlp_receiver.url, export_timeout_s=20)
    try:
        end_spans(handle, 2)
        assert handle.force_flush(timeout_s=0.2) is False  # held by the collector
        otlp_receiver.wait_for_requests(1)
        assert telemetry_threads() == ["penguiflow-telemetry-force_flush"]
    finally:
        otlp_receiver.release()
    assert handle.shutdown(timeout_s=5)
    assert telemetry_threads() == []
    assert handle.stats.spans_exported == 2


def test_a_shutdown_that_gives_up_counts_what_did_not_go_out(
        otlp_receiver: OTLPReceiver) -> None:
    # The stats said nothing was lost while every span was stuck behind a hung export:
    # the count came only once the SDK's own shutdown returned, i.e. never if the
    # collector never answers. Then an export that still ends moves its spans back.
    otlp_receiver.mode = "stall"
    handle = small_queue(otlp_receiver.url, export_timeout_s=20)
    try:
        end_spans(handle, BATCH + 2)  # a full batch goes out (and hangs), 2 wait
        otlp_receiver.wait_for_requests(1)
        assert handle.shutdown(timeout_s=0.3) is False
        stats = handle.stats
        assert (stats.spans_exported, stats.spans_lost_at_shutdown) == (0, BATCH + 2)
    finally:
        otlp_receiver.release()
    for thread in threading.enumerate():
        if thread.name.startswith("penguiflow-telemetry-"):
            thread.join(10)
    stats = handle.stats
    assert (stats.spans_exported, stats.spans_lost_at_shutdown) == (BATCH + 2, 0)


@pytest.mark.parametrize("option", ["max_queue_size", "max_export_batch_size"])
def test_queue_sizes_below_one_are_refused(option: str) -> None:
    with pytest.raises(ValueError, match=r"must be >= 1 span"):
        configure_tracing("bad", "http://127.0.0.1:9", metrics=False, set_global=False,
                          **{option: 0})  # type: ignore[arg-type]


def test_a_queue_size_from_the_environment_must_be_an_integer(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "lots")
    with pytest.raises(ValueError, match=r"OTEL_BSP_MAX_QUEUE_SIZE='lots' is not an integer"):
        configure_tracing("bad", "http://127.0.0.1:9", metrics=False, set_global=False)


def test_flushes_against_a_stalled_exporter_do_not_pile_up_threads() -> None:
    # Each force_flush that timed out left a thread blocked on the SDK's export lock,
    # and the next one started another: a service flushing per request piled them up.
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    from penguiflow_exporters.otel import configure_tracing

    release = threading.Event()

    class Stalled(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            release.wait(30)
            return SpanExportResult.SUCCESS

        def shutdown(self) -> None:
            pass

    def flush_threads() -> int:
        return sum(t.name == "penguiflow-telemetry-force_flush" and t.is_alive()
                   for t in threading.enumerate())

    handle = configure_tracing("t", exporter=Stalled(), metrics=False, set_global=False)
    try:
        tracer = handle.tracer_provider.get_tracer("x")
        for i in range(5):
            with tracer.start_as_current_span(f"s{i}"):
                pass
            assert handle.force_flush(0.1) is False
            assert flush_threads() == 1  # before: i + 1
    finally:
        release.set()
        handle.shutdown(5.0)
