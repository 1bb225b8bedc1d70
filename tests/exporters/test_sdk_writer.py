"""The live tracer's SDK writer: processors get exactly what start_span + end would give them.

The writer (penguiflow_exporters._sdkwriter) hands finished spans straight to
an SDK TracerProvider's processors. It may do so only when the result cannot be
told apart from the API path; everywhere else it must decline, and the span
must still be recorded, through the API.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    TraceIdRatioBased,
)

from penguiflow._tracer import LiveTracer
from penguiflow.spandata import SpanData, SpanEventData, SpanLinkData
from penguiflow_exporters._sdkwriter import sdk_span_writer
from penguiflow_exporters.otel import PenguiFlowIdGenerator

TRACE = 0x5EED5EED5EED5EED5EED5EED5EED5EED


class _Starting(SpanProcessor):
    """A processor that needs on_start: a finished span cannot be given to it."""

    def __init__(self) -> None:
        self.started = 0

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        self.started += 1


def _records() -> list[SpanData]:
    """A root, a retried failing node span with a link, and a CLIENT span."""
    t = 1_700_000_000_000_000_000
    root = SpanData("invoke_workflow f", TRACE, 0x1, None, "internal", t, t + 900,
                    {"gen_ai.operation.name": "invoke_workflow", "gen_ai.workflow.name": "f"},
                    status="ok")
    node = SpanData(
        "invoke_agent n", TRACE, 0x2, 0x1, "internal", t + 10, t + 500,
        {"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "n", "pf.attempts": 2,
         "error.type": "ValueError"},
        events=[SpanEventData("pf.retry", t + 100, {"pf.attempt": 0, "pf.backoff_ms": 1.5}),
                SpanEventData("exception", t + 400, {"exception.type": "ValueError",
                                                     "exception.message": "boom"})],
        links=[SpanLinkData(TRACE, 0x9, {"pf.edge": "a->n"})],
        status="error", status_description="ValueError: boom")
    client = SpanData("send_message agent", TRACE, 0x3, 0x2, "client", t + 20, t + 300,
                      {"a2a.method.name": "message/stream", "a2a.task.id": "task-1",
                       "server.port": 8080, "pf.remote.stream_chunks": 3,
                       "gen_ai.time_to_first_chunk": 0.01})
    return [root, node, client]


def _provider(*processors: SpanProcessor, **kwargs: Any) -> tuple[TracerProvider,
                                                                  InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tp = TracerProvider(id_generator=PenguiFlowIdGenerator(), **kwargs)
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    for processor in processors:
        tp.add_span_processor(processor)
    return tp, exporter


def _shape(span: ReadableSpan) -> dict[str, Any]:
    """Everything an exporter reads from a span."""
    return {
        "name": span.name, "context": span.context, "parent": span.parent,
        "parent_remote": span.parent.is_remote if span.parent else None,
        "flags": span.context.trace_flags if span.context else None,
        "kind": span.kind, "attributes": dict(span.attributes or {}),
        "events": [(e.name, e.timestamp, dict(e.attributes or {})) for e in span.events],
        "links": [(k.context, dict(k.attributes or {})) for k in span.links],
        "status": (span.status.status_code, span.status.description),
        "times": (span.start_time, span.end_time), "resource": span.resource.attributes,
        "scope": span.instrumentation_scope,
        "dropped": (span.dropped_attributes, span.dropped_events, span.dropped_links),
    }


@pytest.fixture
def both() -> Iterator[tuple[LiveTracer, InMemorySpanExporter, LiveTracer, InMemorySpanExporter]]:
    fast_tp, fast_out = _provider()
    api_tp, api_out = _provider(_Starting())
    yield LiveTracer(fast_tp), fast_out, LiveTracer(api_tp), api_out
    fast_tp.shutdown()
    api_tp.shutdown()


def test_the_writer_gives_processors_what_start_span_would(both: Any) -> None:
    fast, fast_out, api, api_out = both
    assert fast._writer is not None and api._writer is not None
    for record in _records():
        fast._emit(record)
    for record in _records():
        api._emit(record)
    assert fast._writer.written == 3 and api._writer.written == 0
    assert fast.failures == api.failures == 0
    written, started = fast_out.get_finished_spans(), api_out.get_finished_spans()
    assert [_shape(s) for s in written] == [_shape(s) for s in started]
    assert written[1].parent is not None and written[1].parent.span_id == 0x1


def test_a_processor_that_needs_on_start_moves_later_spans_to_the_api_path() -> None:
    tp, exporter = _provider()
    tracer = LiveTracer(tp)
    root, node, client = _records()
    tracer._emit(root)
    starting = _Starting()
    tp.add_span_processor(starting)  # after the writer checked the processors
    tracer._emit(node)
    tracer._emit(client)
    assert tracer._writer is not None and tracer._writer.written == 1
    assert starting.started == 2
    assert [s.name for s in exporter.get_finished_spans()] == [
        "invoke_workflow f", "invoke_agent n", "send_message agent"]
    tp.shutdown()


@pytest.mark.parametrize("kwargs", [
    {"sampler": ALWAYS_OFF},
    {"sampler": TraceIdRatioBased(0.5)},
    {"sampler": ParentBased(ALWAYS_OFF)},
    {"sampler": ParentBased(ALWAYS_ON, local_parent_sampled=ALWAYS_OFF)},
    {"span_limits": SpanLimits(max_attribute_length=8)},
], ids=["always-off", "ratio", "parent-based-off", "local-parent-off", "value-length-limit"])
def test_the_writer_declines_a_provider_it_cannot_mirror(kwargs: dict[str, Any]) -> None:
    tp, _ = _provider(**kwargs)
    assert sdk_span_writer(tp, "1") is None
    tp.shutdown()


def test_the_writer_declines_what_is_not_the_sdk_provider_itself() -> None:
    class Custom(TracerProvider):
        pass

    assert sdk_span_writer(Custom(), "1") is None
    assert sdk_span_writer(object(), "1") is None
    tp, _ = _provider(sampler=ParentBased(ALWAYS_ON))  # the SDK default, spelled out
    assert sdk_span_writer(tp, "1") is not None
    tp.shutdown()


def test_spans_over_the_limits_are_cut_by_the_sdk_as_through_the_api() -> None:
    tp, exporter = _provider(span_limits=SpanLimits(max_span_attributes=3, max_events=1))
    tracer = LiveTracer(tp)
    for record in _records():
        tracer._emit(record)
    root, node, client = exporter.get_finished_spans()
    # The root fits and is written; the other two exceed a limit and go through the API.
    assert tracer._writer is not None and tracer._writer.written == 1
    assert len(root.attributes or {}) == 2 and root.dropped_attributes == 0
    assert len(node.attributes or {}) == 3 and node.dropped_attributes == 1
    assert len(node.events) == 1 and node.dropped_events == 1
    assert len(client.attributes or {}) == 3 and client.dropped_attributes == 2
    tp.shutdown()


def test_a_processor_that_raises_is_counted_and_later_spans_still_go_out() -> None:
    class Exploding(SimpleSpanProcessor):
        def on_end(self, span: ReadableSpan) -> None:
            if span.name.startswith("invoke_workflow"):
                raise RuntimeError("exporter bug")
            super().on_end(span)

    exporter = InMemorySpanExporter()
    tp = TracerProvider(id_generator=PenguiFlowIdGenerator())
    tp.add_span_processor(Exploding(exporter))
    tracer = LiveTracer(tp)
    for record in _records():
        tracer._emit(record)
    assert tracer.failures == 1
    assert [s.name for s in exporter.get_finished_spans()] == [
        "invoke_agent n", "send_message agent"]
    tp.shutdown()


def test_through_the_writer_spans_carry_the_stored_ids_whatever_the_id_generator() -> None:
    exporter = InMemorySpanExporter()
    tp = TracerProvider()  # the SDK's random id generator, not PenguiFlow's
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = LiveTracer(tp)
    for record in _records():
        tracer._emit(record)
    spans = exporter.get_finished_spans()
    assert [(s.context.trace_id, s.context.span_id) for s in spans] == [
        (TRACE, 0x1), (TRACE, 0x2), (TRACE, 0x3)]
    assert [s.parent.span_id if s.parent else None for s in spans] == [None, 0x1, 0x2]
    tp.shutdown()


@pytest.mark.parametrize("path", ["writer", "api"])
async def test_a_raising_processor_counts_per_flow_and_starves_no_other_processor(
        path: str) -> None:
    # The tracer's failures were its own (shared by every flow of the provider) and
    # never reached flow.observer_failures / pf.observer.failures as documented; and
    # through the writer the SDK's loop stopped at the raising processor, so the
    # healthy one after it got no span at all.
    from penguiflow import Headers, Message, Node, NodePolicy, create

    class Down(SpanProcessor):
        def on_end(self, span: ReadableSpan) -> None:
            raise RuntimeError("processor down")

    extra: tuple[SpanProcessor, ...] = (_Starting(),) if path == "api" else ()
    exporter = InMemorySpanExporter()
    tp = TracerProvider()
    tp.add_span_processor(Down())
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    for processor in extra:
        tp.add_span_processor(processor)

    async def ok(msg: Any, ctx: Any) -> Any:
        return msg

    policy = NodePolicy(validate="none")
    a, b = Node(ok, name="a", policy=policy), Node(ok, name="b", policy=policy)
    flow = create(a.to(b), b.to(), tracer_provider=tp)
    flow.run()
    for i in range(3):
        await flow.emit(Message(payload=i, headers=Headers(tenant="t")))
        await flow.fetch()
    await flow.stop()
    assert flow.observer_failures == {"tracer_failed": 9}  # 3 traces x (root + 2 nodes)
    # The SDK's own loop (the API path) still stops at the first raising processor.
    assert len(exporter.get_finished_spans()) == (9 if path == "writer" else 0)
    tp.shutdown()
