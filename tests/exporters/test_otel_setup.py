"""configure_tracing: ids, resolution of arguments and OTEL_* variables, globals, lifecycle.

Tests pass ``set_global=False`` and use ``handle.tracer_provider`` unless they
test the globals themselves; those take the ``otel_globals`` fixture, which
restores OpenTelemetry's once-only global providers afterwards.
"""

from __future__ import annotations

import importlib.util
import logging

import pytest
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from otlp_receiver import OTLPReceiver

from penguiflow.tracing import park_ids, take_pending_span_id, take_pending_trace_id
from penguiflow_exporters._spanexport import make_resource, signal_endpoint
from penguiflow_exporters.otel import (
    DEFAULT_SERVICE_NAME,
    PenguiFlowIdGenerator,
    PenguiFlowRatioSampler,
    TelemetryHandle,
    TelemetryWarning,
    configure_tracing,
)

TRACE = 0x4BF92F3577B34DA6A3CE929D0E0E4736
SPAN, CHILD = 0x00F067AA0BA902B7, 0x0123456789ABCDEF

_OTEL_VARS = (
    "OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES", "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
    "OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
    "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_EXPORTER_OTLP_COMPRESSION", "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
    "OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG",
)


@pytest.fixture(autouse=True)
def _clean_otel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The developer's shell may carry OTEL_* variables; each test sets its own.
    for name in _OTEL_VARS:
        monkeypatch.delenv(name, raising=False)


def _in_memory(**options: object) -> tuple[TelemetryHandle, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    handle = configure_tracing("unit", exporter=exporter, span_processor="simple",
                               metrics=False, set_global=False, **options)  # type: ignore[arg-type]
    return handle, exporter


# -- PenguiFlowIdGenerator ---------------------------------------------------------------


def test_parked_ids_become_the_span_ids() -> None:
    handle, exporter = _in_memory()
    with handle:
        tracer = handle.tracer_provider.get_tracer("penguiflow")
        park_ids(TRACE, SPAN)
        root = tracer.start_span("root")
        park_ids(TRACE, CHILD)
        child = tracer.start_span("child", context=trace.set_span_in_context(root))
        child.end()
        root.end()
        unparked = tracer.start_span("free")
        unparked.end()
    spans = {span.name: span for span in exporter.get_finished_spans()}
    assert (spans["root"].context.trace_id, spans["root"].context.span_id) == (TRACE, SPAN)
    assert (spans["child"].context.trace_id, spans["child"].context.span_id) == (TRACE, CHILD)
    assert spans["child"].parent is not None and spans["child"].parent.span_id == SPAN
    # Without parked ids: random, valid, and not a left-over of the parked ones.
    free = spans["free"].context
    assert free.is_valid and free.trace_id != TRACE and free.span_id not in (SPAN, CHILD)


def test_a_parked_trace_id_a_child_span_ignores_does_not_leak() -> None:
    generator = PenguiFlowIdGenerator()
    park_ids(TRACE, CHILD)
    # A child span: the SDK asks for the span id only (the trace is the parent's).
    assert generator.generate_span_id() == CHILD
    assert take_pending_trace_id() == 0 and take_pending_span_id() == 0
    assert generator.generate_trace_id() != TRACE


def test_ids_come_from_the_fallback_when_nothing_is_parked() -> None:
    class Fixed(PenguiFlowIdGenerator):
        def generate_span_id(self) -> int:
            return 7

        def generate_trace_id(self) -> int:
            return 9

    generator = PenguiFlowIdGenerator(fallback=Fixed())
    assert (generator.generate_trace_id(), generator.generate_span_id()) == (9, 7)


def test_a_sampler_is_honoured_and_ids_still_taken() -> None:
    handle, exporter = _in_memory(sampler=ALWAYS_OFF)
    with handle:
        park_ids(TRACE, SPAN)
        span = handle.tracer_provider.get_tracer("t").start_span("dropped")
        span.end()
    assert span.get_span_context().span_id == SPAN and not span.is_recording()
    assert exporter.get_finished_spans() == ()


@pytest.mark.parametrize("rate", [0.1, 0.25, 0.5, 0.8])
def test_the_ratio_sampler_samples_that_fraction_of_default_trace_ids(rate: float) -> None:
    # The SDK's TraceIdRatioBased reads the low 64 bits, fixed to [0.5, 0.75) of
    # the range in a uuid4: 0.1 and 0.25 sampled nothing, 0.8 everything.
    from penguiflow.types import Message

    ids = [int(Message(payload=None, headers={"tenant": "t"}).trace_id, 16)
           for _ in range(20_000)]
    sampler = PenguiFlowRatioSampler(rate)
    kept = sum(sampler.should_sample(None, i, "x").decision.is_sampled() for i in ids)
    assert abs(kept / len(ids) - rate) < 0.02  # 6 standard deviations and more
    assert [sampler.should_sample(None, i, "x").decision for i in ids[:50]] == [
        sampler.should_sample(None, i, "x").decision for i in ids[:50]]  # deterministic


@pytest.mark.parametrize(("name", "parent_based"), [
    ("traceidratio", False), ("parentbased_traceidratio", True)])
def test_the_environments_ratio_samplers_read_penguiflows_ids(
        monkeypatch: pytest.MonkeyPatch, name: str, parent_based: bool) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", name)
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.25")
    handle, _ = _in_memory()
    with handle:
        description = handle.tracer_provider.sampler.get_description()
    assert "PenguiFlowRatioSampler{0.25}" in description
    assert description.startswith("ParentBased") is parent_based


def test_a_ratio_that_is_not_a_rate_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "25%")
    with pytest.warns(TelemetryWarning, match=r"OTEL_TRACES_SAMPLER_ARG='25%'"):
        handle, _ = _in_memory()
    with handle:
        assert "PenguiFlowRatioSampler{1.0}" in handle.tracer_provider.sampler.get_description()


# -- resolution: argument -> environment -> constant --------------------------------------


def test_endpoint_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    assert signal_endpoint("traces", None) == "http://localhost:4318/v1/traces"
    assert signal_endpoint("metrics", None, grpc=True) == "http://localhost:4317"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")
    assert signal_endpoint("traces", None) == "http://collector:4318/v1/traces"
    assert signal_endpoint("traces", None, grpc=True) == "http://collector:4318/"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://traces:9999/custom")
    assert signal_endpoint("traces", None) == "http://traces:9999/custom"
    assert signal_endpoint("metrics", None) == "http://collector:4318/v1/metrics"
    # The argument wins over both; a signal path on it is re-based per signal.
    assert signal_endpoint("traces", "http://arg:4318") == "http://arg:4318/v1/traces"
    assert signal_endpoint("metrics", "http://arg:4318/v1/traces") == "http://arg:4318/v1/metrics"
    assert signal_endpoint("traces", "grpc-host:4317", grpc=True) == "grpc-host:4317"


def test_resource_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    assert make_resource().attributes["service.name"] == DEFAULT_SERVICE_NAME
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.name=from-attrs,deployment.env=ci")
    assert make_resource().attributes["service.name"] == "from-attrs"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-env")
    resource = make_resource(attributes={"team": "penguins"})
    assert resource.attributes["service.name"] == "from-env"
    assert resource.attributes["deployment.env"] == "ci"
    assert resource.attributes["team"] == "penguins"
    assert make_resource("from-arg").attributes["service.name"] == "from-arg"


def test_environment_alone_configures_the_export(otlp_receiver: OTLPReceiver,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_receiver.url)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "env-service")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=test")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-api-key=s3cret,x-team=pf")
    with configure_tracing(metrics=False, set_global=False) as handle:
        assert handle.traces_endpoint == f"{otlp_receiver.url}/v1/traces"
        handle.tracer_provider.get_tracer("t").start_span("from-env").end()
        assert handle.force_flush(5)
    (span,) = otlp_receiver.wait_for_spans(1)
    assert span.resource["service.name"] == "env-service"
    assert span.resource["deployment.environment.name"] == "test"
    assert otlp_receiver.headers[0]["x-api-key"] == "s3cret"
    assert otlp_receiver.headers[0]["x-team"] == "pf"


def test_arguments_win_over_the_environment(otlp_receiver: OTLPReceiver,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")  # discard port
    monkeypatch.setenv("OTEL_SERVICE_NAME", "env-service")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-api-key=from-env")
    with configure_tracing("arg-service", otlp_receiver.url, headers={"x-api-key": "from-arg"},
                           metrics=False, set_global=False) as handle:
        handle.tracer_provider.get_tracer("t").start_span("s").end()
        assert handle.force_flush(5)
    (span,) = otlp_receiver.wait_for_spans(1)
    assert span.resource["service.name"] == "arg-service"
    assert otlp_receiver.headers[0]["x-api-key"] == "from-arg"


def test_metrics_go_to_the_collector(otlp_receiver: OTLPReceiver) -> None:
    with configure_tracing("metered", otlp_receiver.url, set_global=False) as handle:
        assert handle.meter_provider is not None
        assert handle.metrics_endpoint == f"{otlp_receiver.url}/v1/metrics"
        counter = handle.meter_provider.get_meter("penguiflow").create_counter("pf.test.hops")
        counter.add(3, {"node": "a"})
        assert handle.force_flush(5)
    (request, *_) = otlp_receiver.wait_for_metrics()
    names = [metric.name for rm in request.resource_metrics for sm in rm.scope_metrics
             for metric in sm.metrics]
    assert "pf.test.hops" in names
    assert handle.stats.metric_exports_failed == 0


def test_a_metric_reader_can_be_passed() -> None:
    reader = InMemoryMetricReader()
    with configure_tracing("metered", exporter=InMemorySpanExporter(), metric_reader=reader,
                           set_global=False) as handle:
        assert handle.meter_provider is not None
        handle.meter_provider.get_meter("m").create_counter("c").add(1)
        data = reader.get_metrics_data()
    assert data is not None
    assert handle.metrics_endpoint is None


def test_unsupported_settings_are_named() -> None:
    with pytest.raises(ValueError, match="http/protobuf, grpc"):
        configure_tracing(protocol="http/json", set_global=False)
    with pytest.raises(ValueError, match="'batch' or 'simple'"):
        configure_tracing(span_processor="sync", set_global=False)  # type: ignore[arg-type]


@pytest.mark.skipif(importlib.util.find_spec("opentelemetry.exporter.otlp.proto.grpc") is not None,
                    reason="the [grpc] extra is installed here")
def test_grpc_without_the_extra_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ImportError, match=r'pip install "penguiflow-exporters\[grpc\]"'):
        configure_tracing(protocol="grpc", metrics=False, set_global=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    with pytest.raises(ImportError, match="grpc"):
        configure_tracing(exporter=InMemorySpanExporter(), set_global=False)


# -- globals ------------------------------------------------------------------------------


@pytest.mark.usefixtures("otel_globals")
def test_set_global_registers_both_providers() -> None:
    reader = InMemoryMetricReader()
    with configure_tracing("global", exporter=InMemorySpanExporter(),
                           metric_reader=reader) as handle:
        assert trace.get_tracer_provider() is handle.tracer_provider
        assert metrics.get_meter_provider() is handle.meter_provider


@pytest.mark.usefixtures("otel_globals")
def test_a_second_global_set_up_warns_with_the_fix() -> None:
    first = configure_tracing("first", exporter=InMemorySpanExporter(),
                              metric_reader=InMemoryMetricReader())
    try:
        with pytest.warns(TelemetryWarning, match="set_global=False") as caught:
            second = configure_tracing("second", exporter=InMemorySpanExporter(),
                                       metric_reader=InMemoryMetricReader())
        assert len(caught) == 2  # tracer and meter provider
        assert trace.get_tracer_provider() is first.tracer_provider
        second.shutdown()
    finally:
        first.shutdown()


# -- lifecycle ----------------------------------------------------------------------------


def test_shutdown_is_idempotent_and_later_use_is_reported(caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    handle, exporter = _in_memory()
    handle.tracer_provider.get_tracer("t").start_span("before").end()
    assert handle.force_flush(1)
    assert handle.shutdown() and handle.is_shutdown
    with caplog.at_level(logging.WARNING, logger="penguiflow_exporters.otel"):
        assert handle.shutdown()
        assert handle.force_flush(1) is False
    assert [r.getMessage() for r in caplog.records] == [
        "TelemetryHandle.shutdown() called again; already shut down",
        "TelemetryHandle.force_flush() after shutdown(): nothing to flush",
    ]
    with handle:  # exiting a shut-down handle is silent
        pass
    assert [span.name for span in exporter.get_finished_spans()] == ["before"]
    assert "shut down" in repr(handle)


def test_an_exporter_that_raises_is_counted_not_propagated() -> None:
    class Broken(InMemorySpanExporter):
        def export(self, spans: object) -> object:  # type: ignore[override]
            raise ConnectionError("collector on fire")

    with configure_tracing("broken", exporter=Broken(), span_processor="simple", metrics=False,
                           set_global=False) as handle:
        handle.tracer_provider.get_tracer("t").start_span("s").end()  # must not raise
        stats = handle.stats
    assert stats.span_exports_failed == 1 and stats.spans_failed == 1
    assert stats.last_error is not None and "collector on fire" in stats.last_error


def test_metric_export_failures_are_counted(otlp_receiver: OTLPReceiver) -> None:
    otlp_receiver.mode = "reject"
    with configure_tracing("metered", otlp_receiver.url, exporter=InMemorySpanExporter(),
                           set_global=False, export_timeout_s=1) as handle:
        assert handle.meter_provider is not None
        handle.meter_provider.get_meter("m").create_counter("c").add(1)
        assert handle.force_flush(5) is False
        stats = handle.stats
    assert stats.metric_exports_failed >= 1 and stats.span_exports_failed == 0


def test_failures_are_summarised_not_repeated(caplog: pytest.LogCaptureFixture) -> None:
    from penguiflow_exporters import otel
    from penguiflow_exporters._export_counting import FailureLog

    now = [100.0]
    log = FailureLog({"spans": "http://collector/v1/traces"}, clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger="penguiflow_exporters.otel")
    for _ in range(5):
        log.failure("spans", 10, "refused")
    now[0] += otel.FAILURE_LOG_INTERVAL_S
    log.failure("spans", 10, None)  # the minute is over: one summary
    log.failure("spans", 10, None)
    log.success(3)
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 3, messages
    assert "failed (refused)" in messages[0] and "http://collector/v1/traces" in messages[0]
    assert "still failing: 5 failed exports" in messages[1]  # 4 held back + this one
    assert messages[2] == "OTLP export to http://collector/v1/traces works again"
    stats = log.snapshot()
    assert (stats.span_exports_failed, stats.spans_failed, stats.spans_exported) == (7, 70, 3)
    assert stats.last_error == "refused"


def test_gzip_compression_from_the_environment(otlp_receiver: OTLPReceiver,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")
    with configure_tracing("zipped", otlp_receiver.url, metrics=False,
                           set_global=False) as handle:
        park_ids(TRACE, SPAN)
        handle.tracer_provider.get_tracer("t").start_span("compressed").end()
        assert handle.force_flush(5)
    (span,) = otlp_receiver.wait_for_spans(1)
    assert (span.trace_id, span.span_id) == (TRACE, SPAN)
    assert otlp_receiver.headers[0]["content-encoding"] == "gzip"
