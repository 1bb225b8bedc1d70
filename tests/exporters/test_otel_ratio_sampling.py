"""The SDK's ratio sampler given explicitly: it must sample the fraction asked of
PenguiFlow's traces (default ids ``uuid4().hex``), not none of them.

``TraceIdRatioBased`` reads a trace id's low 64 bits, which in a uuid4 start with
the fixed variant bits ``10``: ``ParentBased(TraceIdRatioBased(0.5))`` sampled 0
of 200 traces, silently. Only ``OTEL_TRACES_SAMPLER`` was read with
:class:`PenguiFlowRatioSampler`.
"""

from __future__ import annotations

import logging
import random
import uuid
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from penguiflow import Headers, Message, Node, NodePolicy, create
from penguiflow_exporters.otel import PenguiFlowRatioSampler, configure_tracing

RATE = 0.25


def _messages(n: int = 200) -> list[Message]:
    rng = random.Random(7)  # uuid4 ids, as Message makes them, but the same each run
    return [Message(payload=i, headers=Headers(tenant="t"),
                    trace_id=uuid.UUID(int=rng.getrandbits(128), version=4).hex)
            for i in range(n)]


def _expected(messages: list[Message]) -> set[int]:
    ratio = PenguiFlowRatioSampler(RATE)
    return {int(m.trace_id, 16) for m in messages
            if ratio.should_sample(None, int(m.trace_id, 16), "x").decision.is_sampled()}


async def _noop(message: Message, ctx: Any) -> Message:
    return message


async def _traced(tp: Any, messages: list[Message], work: Any = _noop) -> None:
    """Run ``messages`` one at a time through a one-node flow of ``work``."""
    flow = create(Node(work, name="a", policy=NodePolicy(validate="none")).to(),
                  tracer_provider=tp)
    flow.run()
    try:
        for m in messages:
            await flow.emit(m)
            await flow.fetch()
    finally:
        await flow.stop()


def _check_whole(spans: tuple[ReadableSpan, ...], kept: set[int]) -> None:
    assert {s.context.trace_id for s in spans} == kept
    # ~RATE of them, each whole: its root and its node span, no orphan.
    assert 0.15 < len(kept) / 200 < 0.35
    assert len(spans) == 2 * len(kept)
    ids = {s.context.span_id for s in spans}
    assert all(s.parent is None or s.parent.span_id in ids for s in spans)


@pytest.mark.parametrize("parent_based", [True, False])
async def test_configure_tracing_samples_the_ratio_asked_of_default_trace_ids(
        parent_based: bool) -> None:
    exporter = InMemorySpanExporter()
    ratio = TraceIdRatioBased(RATE)
    handle = configure_tracing("t", exporter=exporter, span_processor="simple", metrics=False,
                               set_global=False,
                               sampler=ParentBased(ratio) if parent_based else ratio)
    with handle:
        description = handle.tracer_provider.sampler.get_description()
        messages = _messages()
        await _traced(handle.tracer_provider, messages)
    assert f"PenguiFlowRatioSampler{{{RATE}}}" in description
    assert description.startswith("ParentBased") is parent_based
    _check_whole(exporter.get_finished_spans(), _expected(messages))


async def test_an_applications_provider_with_the_sdks_parent_based_ratio_samples_that_ratio(
        caplog: pytest.LogCaptureFixture) -> None:
    exporter = InMemorySpanExporter()
    tp = TracerProvider(sampler=ParentBased(TraceIdRatioBased(RATE)))
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    messages = _messages()
    with caplog.at_level(logging.WARNING, logger="penguiflow.tracing"):
        await _traced(tp, messages)
    tp.shutdown()
    _check_whole(exporter.get_finished_spans(), _expected(messages))
    # Said once: the provider's other tracers still apply the SDK's rule.
    (said,) = [r for r in caplog.records
               if r.getMessage().startswith("otel_ratio_sampler_replaced")]
    assert "PenguiFlowRatioSampler" in said.getMessage()


@pytest.mark.parametrize("rate", [0.25, 0.75])
async def test_an_applications_bare_ratio_sampler_keeps_each_trace_whole_with_its_user_spans(
        rate: float, caplog: pytest.LogCaptureFixture) -> None:
    # The penguiflow tracer alone sampled a bare TraceIdRatioBased on the top bits
    # while the application's tracers (the user's spans in a node) kept the SDK's
    # low-bits rule: at 0.75, 50 of 200 user spans orphans (their node span
    # dropped); at 0.25, 44 traces exported without their user spans. Every tracer
    # of the provider applies a bare ratio to every span: it is kept, and said.
    exporter = InMemorySpanExporter()
    tp = TracerProvider(sampler=TraceIdRatioBased(rate))
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    app = tp.get_tracer("my.app")

    async def work(message: Message, ctx: Any) -> Message:
        with app.start_as_current_span("llm.call"):
            return message

    messages = _messages()
    with caplog.at_level(logging.WARNING, logger="penguiflow.tracing"):
        await _traced(tp, messages, work)
    tp.shutdown()
    spans = exporter.get_finished_spans()
    ids = {s.context.span_id for s in spans}
    assert [s.name for s in spans if s.parent is not None and s.parent.span_id not in ids] == []
    names: dict[int, list[str]] = {}
    for span in spans:
        names.setdefault(span.context.trace_id, []).append(span.name)
    assert all(sorted(n) == ["invoke_agent a", "invoke_workflow penguiflow", "llm.call"]
               for n in names.values())
    (said,) = [r for r in caplog.records
               if r.getMessage().startswith("otel_ratio_sampler_low_bits")]
    assert "PenguiFlowRatioSampler" in said.getMessage()
    assert not [r for r in caplog.records
                if r.getMessage().startswith("otel_ratio_sampler_replaced")]
