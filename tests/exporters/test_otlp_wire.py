"""Spans over the real OTLP/HTTP wire, decoded by a real receiver (no HTTP mocks).

Live spans (OTel API + parked ids) and stored spans (``SpanData`` through
``export_spans`` / ``otlp_json``) must arrive with exactly the ids, parents,
links, events, attributes, times and statuses they were given; a collector
that refuses, is down or stalls must never raise into, or hold up, the caller.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from typing import Any

import pytest
from google.protobuf.json_format import ParseDict
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status as PbStatus
from otlp_receiver import OTLPReceiver, ReceivedSpan, any_value, down_url

from penguiflow.spandata import SpanData, SpanEventData, SpanLinkData
from penguiflow.tracing import park_ids
from penguiflow_exporters.otel import (
    OTLPExportError,
    TelemetryHandle,
    configure_tracing,
    export_spans,
    otlp_json,
)

TRACE = 0x0AF7651916CD43DD8448EB211C80319C
ROOT, NODE_A, NODE_B, NODE_C = 0x1111111111111111, 0xA1A1A1A1A1A1A1A1, 0xB2B2B2B2B2B2B2B2, 0xC3
T0 = 1_700_000_000_123_456_789  # epoch ns with every digit significant


def _by_id(spans: list[ReceivedSpan]) -> dict[int, ReceivedSpan]:
    return {span.span_id: span for span in spans}


# -- live spans through configure_tracing ---------------------------------------------------


def test_live_spans_arrive_with_the_parked_ids(otlp_receiver: OTLPReceiver) -> None:
    with configure_tracing("wire-live", otlp_receiver.url, metrics=False,
                           set_global=False) as handle:
        tracer = handle.tracer_provider.get_tracer("penguiflow")
        park_ids(TRACE, ROOT)
        root = tracer.start_span("invoke_workflow demo",
                                 attributes={"pf.trace_id": f"{TRACE:032x}"})
        parent = trace.set_span_in_context(root)
        park_ids(TRACE, NODE_A)
        node_a = tracer.start_span("invoke_agent a", context=parent,
                                   attributes={"pf.attempt": 1, "pf.retry": True, "w": 0.5})
        node_a.add_event("pf.node.retry", {"pf.attempt": 0, "error.type": "ValueError"},
                         timestamp=T0)
        node_a.end()
        park_ids(TRACE, NODE_B)
        node_b = tracer.start_span(
            "invoke_agent b", context=parent, kind=trace.SpanKind.CLIENT,
            links=[trace.Link(node_a.get_span_context(), {"pf.edge": "a->b"})],
            attributes={"tags": ("x", "y")})
        node_b.set_status(trace.Status(trace.StatusCode.ERROR, "boom"))
        node_b.end()
        root.end()
        assert handle.force_flush(5)

    got = _by_id(otlp_receiver.wait_for_spans(3))
    assert set(got) == {ROOT, NODE_A, NODE_B}
    assert {span.trace_id for span in got.values()} == {TRACE}
    assert got[ROOT].parent_span_id is None
    assert got[NODE_A].parent_span_id == ROOT and got[NODE_B].parent_span_id == ROOT
    assert got[ROOT].attributes == {"pf.trace_id": f"{TRACE:032x}"}
    assert got[NODE_A].attributes == {"pf.attempt": 1, "pf.retry": True, "w": 0.5}
    assert got[NODE_B].attributes == {"tags": ("x", "y")}
    (event,) = got[NODE_A].span.events
    assert (event.name, event.time_unix_nano) == ("pf.node.retry", T0)
    assert {kv.key: any_value(kv.value) for kv in event.attributes} == {
        "pf.attempt": 0, "error.type": "ValueError"}
    (link,) = got[NODE_B].span.links
    assert int.from_bytes(link.trace_id, "big") == TRACE
    assert int.from_bytes(link.span_id, "big") == NODE_A
    assert {kv.key: any_value(kv.value) for kv in link.attributes} == {"pf.edge": "a->b"}
    assert got[NODE_B].span.kind == PbSpan.SPAN_KIND_CLIENT
    assert got[NODE_B].span.status.code == PbStatus.STATUS_CODE_ERROR
    assert got[NODE_B].span.status.message == "boom"
    assert got[ROOT].resource["service.name"] == "wire-live"
    assert handle.stats.spans_exported == 3 and handle.stats.span_exports_failed == 0


# -- stored spans: export_spans and otlp_json --------------------------------------------------


def _stored_trace() -> list[SpanData]:
    """A root, a retried node, a failed fan-in node with a link, a server span, an open span."""
    return [
        SpanData("invoke_workflow demo", TRACE, ROOT, None, "internal", T0, T0 + 9_000_000,
                 attributes={"gen_ai.operation.name": "invoke_workflow", "pf.trace_id": "x"}),
        SpanData("invoke_agent a", TRACE, NODE_A, ROOT, "internal", T0 + 1_000, T0 + 2_000_001,
                 attributes={"pf.attempts": 2, "pf.flag": False, "pf.ratio": 0.25,
                             "pf.tags": ("p", "q")},
                 events=[SpanEventData("pf.node.retry", T0 + 1_500,
                                       {"pf.attempt": 0, "pf.backoff_ms": 12.5})],
                 status="ok"),
        SpanData("invoke_agent b", TRACE, NODE_B, NODE_A, "client", T0 + 3_000, T0 + 4_000,
                 links=[SpanLinkData(TRACE, NODE_A, {"pf.edge": "a->b"}),
                        SpanLinkData(TRACE, ROOT)],
                 events=[SpanEventData("exception", T0 + 3_500,
                                       {"exception.type": "ValueError",
                                        "exception.message": "bad"})],
                 status="error", status_description="ValueError: bad"),
        SpanData("message/send", TRACE, NODE_C, NODE_B, "server", T0 + 3_100, T0 + 3_900),
        SpanData("invoke_agent open", TRACE, 0xD4, ROOT, "internal", T0 + 5_000, None,
                 events=[SpanEventData("pf.stream.chunk", T0 + 6_000)]),
    ]


def _assert_same(sent: SpanData, got: ReceivedSpan) -> None:
    span = got.span
    assert (span.name, got.trace_id, got.span_id, got.parent_span_id) == (
        sent.name, sent.trace_id, sent.span_id, sent.parent_span_id)
    assert span.kind == {"internal": 1, "server": 2, "client": 3}[sent.kind]
    assert span.start_time_unix_nano == sent.start_ns
    expected_end = sent.end_ns if sent.end_ns is not None else max(
        [sent.start_ns, *(e.time_ns for e in sent.events)])
    assert span.end_time_unix_nano == expected_end
    assert got.attributes == sent.attributes
    assert [(e.name, e.time_unix_nano, {kv.key: any_value(kv.value) for kv in e.attributes})
            for e in span.events] == [(e.name, e.time_ns, e.attributes) for e in sent.events]
    assert [(int.from_bytes(link.trace_id, "big"), int.from_bytes(link.span_id, "big"),
             {kv.key: any_value(kv.value) for kv in link.attributes})
            for link in span.links] == [(lk.trace_id, lk.span_id, lk.attributes)
                                        for lk in sent.links]
    assert span.status.code == {"unset": 0, "ok": 1, "error": 2}[sent.status]
    assert span.status.message == (sent.status_description or "")
    assert (got.scope_name, got.scope_version) == ("penguiflow", _penguiflow_version())


def _penguiflow_version() -> str:
    import penguiflow

    return penguiflow.__version__


def test_export_spans_delivers_span_data_intact(otlp_receiver: OTLPReceiver) -> None:
    stored = _stored_trace()
    assert export_spans(stored, otlp_receiver.url, service_name="wire-export",
                        headers={"x-tenant": "demo"}) == len(stored)
    got = _by_id(otlp_receiver.wait_for_spans(len(stored)))
    for sent in stored:
        _assert_same(sent, got[sent.span_id])
    assert got[ROOT].resource["service.name"] == "wire-export"
    assert otlp_receiver.headers[0]["x-tenant"] == "demo"
    assert otlp_receiver.headers[0]["content-type"] == "application/x-protobuf"


def test_export_of_nothing_posts_nothing(otlp_receiver: OTLPReceiver) -> None:
    assert export_spans([], otlp_receiver.url) == 0
    assert otlp_receiver.requests == 0


def _ids_to_base64(obj: Any) -> Any:
    # The inverse of otlp_json's id rule: proto3 JSON (ParseDict) wants bytes as base64.
    if isinstance(obj, list):
        return [_ids_to_base64(item) for item in obj]
    if isinstance(obj, dict):
        return {key: (base64.b64encode(bytes.fromhex(value)).decode()
                      if key in ("traceId", "spanId", "parentSpanId") else _ids_to_base64(value))
                for key, value in obj.items()}
    return obj


def test_otlp_json_is_what_the_wire_carries(otlp_receiver: OTLPReceiver) -> None:
    stored = _stored_trace()
    export_spans(stored, otlp_receiver.url, service_name="wire-json")
    otlp_receiver.wait_for_spans(len(stored))
    (wire,) = otlp_receiver.trace_requests

    document = otlp_json(stored, service_name="wire-json")
    text = json.dumps(document)  # plain JSON types only
    parsed = ParseDict(_ids_to_base64(json.loads(text)), ExportTraceServiceRequest())
    assert parsed == wire

    spans = document["resourceSpans"][0]["scopeSpans"][0]["spans"]
    by_id = {span["spanId"]: span for span in spans}
    node_b = by_id[f"{NODE_B:016x}"]
    # The OTLP/JSON spec's forms: hex ids, nanoseconds as strings, enums as ints.
    assert node_b["traceId"] == f"{TRACE:032x}" and node_b["parentSpanId"] == f"{NODE_A:016x}"
    assert node_b["startTimeUnixNano"] == str(T0 + 3_000)
    assert node_b["kind"] == 3 and node_b["status"] == {"code": 2, "message": "ValueError: bad"}
    assert node_b["links"][0] == {
        "traceId": f"{TRACE:032x}", "spanId": f"{NODE_A:016x}",
        "attributes": [{"key": "pf.edge", "value": {"stringValue": "a->b"}}],
        "flags": node_b["links"][0]["flags"]}
    assert document["resourceSpans"][0]["scopeSpans"][0]["scope"]["name"] == "penguiflow"


def test_otlp_json_of_nothing_is_an_empty_request() -> None:
    assert otlp_json([]) == {"resourceSpans": []}


# -- a collector that refuses, is down, or stalls ---------------------------------------------


def test_export_spans_names_a_refusal(otlp_receiver: OTLPReceiver) -> None:
    otlp_receiver.mode = "reject"
    with pytest.raises(OTLPExportError, match="400") as info:
        export_spans(_stored_trace(), otlp_receiver.url, timeout_s=2)
    assert info.value.endpoint == f"{otlp_receiver.url}/v1/traces"
    assert info.value.sent == 0 and info.value.total == 5
    assert "collector" in str(info.value)


@pytest.mark.parametrize("failure", ["down", "unavailable"])
def test_export_spans_fails_within_its_timeout(otlp_receiver: OTLPReceiver,
                                               failure: str) -> None:
    url = down_url() if failure == "down" else otlp_receiver.url
    otlp_receiver.mode = "unavailable"
    started = time.perf_counter()
    with pytest.raises(OTLPExportError) as info:
        export_spans(_stored_trace(), url, timeout_s=0.5)
    elapsed = time.perf_counter() - started
    assert elapsed < 1.5, f"export took {elapsed:.2f}s with timeout_s=0.5"
    assert url in str(info.value)


def _span_cost_us(handle: TelemetryHandle, spans: int = 300, repeats: int = 3) -> float:
    """Best-of-``repeats`` µs to start and end one span (best-of: the machine is shared)."""
    tracer = handle.tracer_provider.get_tracer("penguiflow")
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(spans):
            tracer.start_span("hop").end()
        best = min(best, (time.perf_counter() - started) / spans * 1e6)
    return best


def _healthy_span_cost_us(receiver: OTLPReceiver) -> float:
    # The same pipeline against a collector that answers: the export thread
    # encodes and posts as much as in the failing cases, so only the failure differs.
    with configure_tracing("baseline", receiver.url, metrics=False,
                           set_global=False) as handle:
        return _span_cost_us(handle)


def test_collector_down_never_raises_and_is_counted(otlp_receiver: OTLPReceiver,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="penguiflow_exporters.otel")
    healthy_us = _healthy_span_cost_us(otlp_receiver)
    handle = configure_tracing("down", down_url(), metrics=False, set_global=False,
                               export_timeout_s=0.5)
    down_us = _span_cost_us(handle)  # 900 spans
    # Span end only queues; the network is the background thread's business.
    assert down_us < 3 * healthy_us + 30, (
        f"{down_us:.1f} µs per span with the collector down, {healthy_us:.1f} µs healthy")

    started = time.perf_counter()
    assert handle.force_flush(timeout_s=3) is False  # ran, but nothing was delivered
    assert time.perf_counter() - started < 3.5
    stats = handle.stats
    assert stats.spans_failed == 900 and stats.span_exports_failed >= 2
    assert stats.spans_exported == 0
    started = time.perf_counter()
    assert handle.shutdown(timeout_s=3)
    assert time.perf_counter() - started < 3.5
    # Two or more failed batches, one warning (with the fix), not one per batch.
    warnings = [r for r in caplog.records if r.name == "penguiflow_exporters.otel"]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" in warnings[0].getMessage()


def test_slow_collector_does_not_hold_up_the_caller(otlp_receiver: OTLPReceiver) -> None:
    healthy_us = _healthy_span_cost_us(otlp_receiver)
    otlp_receiver.mode = "stall"
    handle = configure_tracing("slow", otlp_receiver.url, metrics=False, set_global=False,
                               export_timeout_s=20)
    try:
        tracer = handle.tracer_provider.get_tracer("penguiflow")
        for _ in range(10):
            tracer.start_span("hop").end()
        started = time.perf_counter()
        assert handle.force_flush(timeout_s=0.3) is False
        flush_s = time.perf_counter() - started
        otlp_receiver.wait_for_requests(1)  # the export did reach the stalled collector
        stalled_us = _span_cost_us(handle)
        started = time.perf_counter()
        assert handle.shutdown(timeout_s=0.3) is False
        shutdown_s = time.perf_counter() - started
    finally:
        otlp_receiver.release()
    assert flush_s < 0.6, f"force_flush(timeout_s=0.3) took {flush_s:.2f}s"
    assert shutdown_s < 0.6, f"shutdown(timeout_s=0.3) took {shutdown_s:.2f}s"
    assert stalled_us < 3 * healthy_us + 30, (
        f"{stalled_us:.1f} µs per span while the collector stalls, {healthy_us:.1f} µs healthy")
