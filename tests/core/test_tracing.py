"""Live OTel spans: the mapping table of the observability design, scenario by scenario.

The runtime depends on the OTel API only; these tests give each flow a real SDK
TracerProvider (with PenguiFlow's id generator) and an InMemorySpanExporter, so
no global state is touched.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from pfcore_support import Recorder, msg, within

from penguiflow import Headers, Message, Node, NodePolicy, create
from penguiflow._tracer import tracer_for
from penguiflow.patterns import join_k
from penguiflow.remote import InMemoryAgent, InMemoryTransport, RemoteNode
from penguiflow.state import InMemoryStateStore
from penguiflow.tracing import (
    derived_span_id,
    inject_trace_headers,
    root_span_id,
    spans_from_events,
)
from penguiflow_exporters.otel import PenguiFlowIdGenerator

URL = "http://agents.example:8080/a2a"


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


class _Starting(SpanProcessor):
    """A processor with its own on_start: the SDK writer must decline this provider."""

    def __init__(self) -> None:
        self.started = 0

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        self.started += 1


@pytest.fixture(params=["sdk-writer", "start_span"])
def provider(request: pytest.FixtureRequest,
             exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    """Every scenario runs both ways the live tracer records a span: the SDK writer
    (penguiflow_exporters' fast path) and the API's start_span + end."""
    tp = TracerProvider(id_generator=PenguiFlowIdGenerator())
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    starting = _Starting()
    if request.param == "start_span":
        tp.add_span_processor(starting)
    yield tp
    tp.shutdown()
    # The path the parameter names was the one taken, for every penguiflow span.
    spans = exporter.get_finished_spans()
    ours = [s for s in spans if s.instrumentation_scope
            and s.instrumentation_scope.name == "penguiflow"]
    writer = getattr(tracer_for(tp), "_writer", None)
    if request.param == "start_span":
        assert writer is None or writer.written == 0
        assert starting.started == len(spans)
    else:
        assert writer is not None and writer.written == len(ours)


def _by_name(spans: tuple[ReadableSpan, ...] | list[ReadableSpan]) -> dict[str, ReadableSpan]:
    out: dict[str, ReadableSpan] = {}
    for span in spans:
        assert span.name not in out, f"two spans named {span.name}"
        out[span.name] = span
    return out


def _hex(value: int, width: int) -> str:
    return f"{value:0{width}x}"


async def _noop(msg: Message, ctx: Any) -> Message:
    return msg


def _node(func: Any, name: str, **policy: Any) -> Node:
    return Node(func, name=name, policy=NodePolicy(validate="none", **policy))


def _flaky(fails: int = 1) -> Any:
    """A node function raising ValueError on its first ``fails`` calls."""
    calls = 0

    async def flaky(msg: Message, ctx: Any) -> Message:
        nonlocal calls
        calls += 1
        if calls <= fails:
            raise ValueError("first attempt fails")
        return msg

    return flaky


async def _run_one(flow: Any, message: Message) -> Any:
    flow.run()
    try:
        await flow.emit(message)
        return await within(flow.fetch())
    finally:
        await flow.stop()


async def test_linear_chain_spans_nest_and_carry_the_stored_ids(
        provider: TracerProvider, exporter: InMemorySpanExporter) -> None:
    store = InMemoryStateStore()
    a, b = _node(_noop, "a"), _node(_noop, "b")
    flow = create(a.to(b), b.to(), name="linear", state_store=store, tracer_provider=provider)
    m = msg("x")
    await _run_one(flow, m)

    spans = _by_name(exporter.get_finished_spans())
    assert set(spans) == {"invoke_workflow linear", "invoke_agent a", "invoke_agent b"}
    root, sa, sb = spans["invoke_workflow linear"], spans["invoke_agent a"], spans["invoke_agent b"]
    # The penguiflow trace id IS the OTel trace id; the root span id is derived from it.
    for span in (root, sa, sb):
        assert _hex(span.context.trace_id, 32) == m.trace_id
        assert span.kind is SpanKind.INTERNAL
    assert _hex(root.context.span_id, 16) == root_span_id(m.trace_id)
    assert root.parent is None
    assert root.attributes["gen_ai.operation.name"] == "invoke_workflow"
    assert root.attributes["gen_ai.workflow.name"] == "linear"
    assert root.attributes["pf.trace_id"] == m.trace_id
    # a consumed the ingress: child of the root; b consumed a's output: child of a.
    assert sa.parent.span_id == root.context.span_id
    assert sb.parent.span_id == sa.context.span_id
    assert sa.attributes["gen_ai.agent.name"] == "a"
    assert sa.attributes["gen_ai.operation.name"] == "invoke_agent"
    assert sa.attributes["pf.node.id"] == a.node_id
    assert sa.status.status_code is StatusCode.UNSET
    assert "pf.attempts" not in sa.attributes  # one attempt: not said
    # Stored events and spans agree on ids and times.
    history = await store.load_history(m.trace_id)
    starts = {e.node_name: e for e in history if e.kind == "node_start"}
    ends = {e.node_name: e for e in history if e.kind == "node_success"}
    for name, span in (("a", sa), ("b", sb)):
        assert _hex(span.context.span_id, 16) == starts[name].invocation_id
        assert span.attributes["pf.invocation.id"] == starts[name].invocation_id
        assert span.start_time == round(starts[name].ts * 1e9)
        assert span.end_time == round(ends[name].ts * 1e9)
    assert root.start_time <= sa.start_time and root.end_time >= sb.end_time


async def test_fan_in_gets_one_link_per_upstream_invocation(
        provider: TracerProvider, exporter: InMemorySpanExporter) -> None:
    fan = _node(_noop, "fan")
    w0, w1 = _node(_noop, "w0"), _node(_noop, "w1")
    join = join_k("join", 2)
    flow = create(fan.to(w0, w1), w0.to(join), w1.to(join), join.to(), tracer_provider=provider)
    m = msg("x")
    await _run_one(flow, m)

    finished = exporter.get_finished_spans()
    # join_k runs once per input; the run that completes the group joined both.
    joins = [s for s in finished if s.name == "invoke_agent join"]
    assert len(joins) == 2
    (sj,) = [s for s in joins if s.links]
    spans = _by_name([s for s in finished if s.name != "invoke_agent join"])
    root = spans["invoke_workflow penguiflow"]
    assert sj.parent.span_id == root.context.span_id  # several upstreams: the root
    linked = {link.context.span_id: link.attributes["pf.edge"] for link in sj.links}
    assert linked == {spans["invoke_agent w0"].context.span_id: "w0->join",
                      spans["invoke_agent w1"].context.span_id: "w1->join"}
    assert spans["invoke_agent w0"].parent.span_id == spans["invoke_agent fan"].context.span_id


async def test_retry_then_success_records_retry_events_on_one_span(
        provider: TracerProvider, exporter: InMemorySpanExporter) -> None:
    flaky = _flaky()

    node = _node(flaky, "flaky", max_retries=2, backoff_base=0.001)
    flow = create(node.to(), tracer_provider=provider)
    await _run_one(flow, msg("x"))

    span = _by_name(exporter.get_finished_spans())["invoke_agent flaky"]
    assert span.status.status_code is StatusCode.UNSET
    assert span.attributes["pf.attempts"] == 2
    assert "error.type" not in span.attributes
    (retry,) = [e for e in span.events if e.name == "pf.node.retry"]
    assert retry.attributes["pf.attempt"] == 1
    assert retry.attributes["error.type"] == "ValueError"
    assert retry.attributes["pf.backoff_ms"] == pytest.approx(1.0)
    (exc,) = [e for e in span.events if e.name == "exception"]
    assert exc.attributes["exception.type"] == "ValueError"
    # The stored traceback, as OTel's semantic conventions name it (Jaeger shows it).
    stacktrace = exc.attributes["exception.stacktrace"]
    assert stacktrace.startswith("Traceback (most recent call last):\n")
    assert "ValueError" in stacktrace.splitlines()[-1]


async def test_timeout_then_failure_is_an_error_span_with_timeout_events(
        provider: TracerProvider, exporter: InMemorySpanExporter) -> None:
    async def slow(msg: Message, ctx: Any) -> Message:
        await asyncio.Event().wait()
        return msg

    node = _node(slow, "slow", timeout_s=0.01, max_retries=1, backoff_base=0.001)
    flow = create(node.to(), tracer_provider=provider, emit_errors_to_rookery=True)
    await _run_one(flow, msg("x"))

    span = _by_name(exporter.get_finished_spans())["invoke_agent slow"]
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == "timeout"
    assert [e.attributes["pf.attempt"] for e in span.events if e.name == "pf.node.timeout"] == [
        0, 1]
    assert "timed out" in (span.status.description or "")


async def test_failure_after_retries_names_the_exception_class(
        provider: TracerProvider, exporter: InMemorySpanExporter) -> None:
    async def broken(msg: Message, ctx: Any) -> Message:
        raise KeyError("nope")

    node = _node(broken, "broken")
    flow = create(node.to(), tracer_provider=provider, emit_errors_to_rookery=True)
    await _run_one(flow, msg("x"))

    span = _by_name(exporter.get_finished_spans())["invoke_agent broken"]
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == "KeyError"


async def test_trace_cancel_mid_node_marks_spans_cancelled(
        provider: TracerProvider, exporter: InMemorySpanExporter) -> None:
    entered = asyncio.Event()

    async def blocker(msg: Message, ctx: Any) -> Message:
        entered.set()
        await asyncio.Event().wait()
        return msg

    node = _node(blocker, "blocker")
    flow = create(node.to(), tracer_provider=provider)
    flow.run()
    m = msg("x")
    try:
        await flow.emit(m)
        await within(entered.wait())
        assert await within(flow.cancel(m.trace_id)) is True
    finally:
        await flow.stop()

    spans = _by_name(exporter.get_finished_spans())
    node_span, root = spans["invoke_agent blocker"], spans["invoke_workflow penguiflow"]
    assert node_span.status.status_code is StatusCode.ERROR
    assert node_span.attributes["error.type"] == "cancelled"
    assert root.status.status_code is StatusCode.ERROR
    assert root.attributes["error.type"] == "cancelled"
    names = [e.name for e in root.events]
    assert names.index("pf.cancel.requested") < names.index("pf.cancel.acknowledged")


async def test_deadline_exceeded_is_recorded_on_the_root(
        provider: TracerProvider, exporter: InMemorySpanExporter) -> None:
    node = _node(_noop, "late")
    flow = create(node.to(), tracer_provider=provider)
    m = Message(payload="x", headers=Headers(tenant="t"), deadline_s=1.0)  # long past
    await _run_one(flow, m)

    root = _by_name(exporter.get_finished_spans())["invoke_workflow penguiflow"]
    assert root.status.status_code is StatusCode.ERROR
    assert root.attributes["error.type"] == "deadline_exceeded"
    (skip,) = [e for e in root.events if e.name == "pf.deadline.skip"]
    assert skip.attributes["gen_ai.agent.name"] == "late"
    assert skip.attributes["pf.deadline.unix_ms"] == 1000


async def test_remote_stream_is_a_client_span_with_a2a_ids_and_chunks(
        provider: TracerProvider, exporter: InMemorySpanExporter) -> None:
    transport = InMemoryTransport({URL: InMemoryAgent(chunks=["a", "b", "c"])})
    remote = RemoteNode(transport=transport, skill="summarise", agent_url=URL, name="remote",
                        streaming=True, policy=NodePolicy(validate="none"))
    flow = create(remote.to(), tracer_provider=provider)
    flow.run()
    m = msg("x")
    try:
        await flow.emit(m)
        while True:
            item = await within(flow.fetch())
            if not hasattr(item, "done"):  # the final result, after the chunks
                break
    finally:
        await flow.stop()

    spans = _by_name(exporter.get_finished_spans())
    client, node_span = spans["invoke_agent summarise"], spans["invoke_agent remote"]
    assert client.kind is SpanKind.CLIENT
    assert client.parent.span_id == node_span.context.span_id
    (task,) = transport.tasks.values()
    assert client.attributes["gen_ai.conversation.id"] == task.context_id
    assert client.attributes["a2a.task.id"] == task.task_id
    assert client.attributes["a2a.method.name"] == "message/stream"
    assert client.attributes["server.address"] == "agents.example"
    assert client.attributes["server.port"] == 8080
    assert client.attributes["pf.stream.chunks"] == 3
    assert client.attributes["gen_ai.response.time_to_first_chunk"] >= 0
    assert client.status.status_code is StatusCode.UNSET
    assert node_span.attributes["pf.stream.chunks"] == 3


async def test_remote_cancel_propagates_and_ends_the_client_span_cancelled(
        provider: TracerProvider, exporter: InMemorySpanExporter) -> None:
    gate = asyncio.Event()
    transport = InMemoryTransport({URL: InMemoryAgent(chunks=["a", "b"], gate=gate)})
    remote = RemoteNode(transport=transport, skill="slow", agent_url=URL, name="remote",
                        streaming=True, policy=NodePolicy(validate="none"))
    flow = create(remote.to(), tracer_provider=provider)
    flow.run()
    m = msg("x")
    try:
        await flow.emit(m)
        task = await within(transport.next_task(URL))
        await within(task.started.wait())
        assert await within(flow.cancel(m.trace_id)) is True
        await within(task.cancel_requested.wait())
    finally:
        await flow.stop()

    spans = _by_name(exporter.get_finished_spans())
    client, root = spans["invoke_agent slow"], spans["invoke_workflow penguiflow"]
    assert client.status.status_code is StatusCode.ERROR
    assert client.attributes["error.type"] == "cancelled"
    assert any(e.name == "pf.cancel.propagated" for e in client.events)
    names = [e.name for e in root.events]
    assert "pf.cancel.requested" in names and "pf.cancel.propagated" in names


async def test_user_spans_and_injected_headers_nest_under_the_node_span(
        provider: TracerProvider, exporter: InMemorySpanExporter) -> None:
    seen: dict[str, Any] = {}

    async def work(msg: Message, ctx: Any) -> Message:
        with provider.get_tracer("user").start_as_current_span("user.db_call"):
            pass
        seen["headers"] = inject_trace_headers({})
        return msg

    node = _node(work, "work")
    flow = create(node.to(), tracer_provider=provider)
    m = msg("x")
    await _run_one(flow, m)

    spans = _by_name(exporter.get_finished_spans())
    user, node_span = spans["user.db_call"], spans["invoke_agent work"]
    assert user.parent.span_id == node_span.context.span_id
    assert user.context.trace_id == node_span.context.trace_id
    # The propagator uses the global provider's context, which is the API's: the
    # header still carries the node span, as a transport would send it.
    assert seen["headers"]["traceparent"].split("-")[1:3] == [
        m.trace_id, _hex(node_span.context.span_id, 16)]
    # Outside the node nothing is current any more.
    assert not trace.get_current_span().get_span_context().is_valid


async def test_spans_rebuilt_from_stored_events_equal_the_live_ones(
        provider: TracerProvider, exporter: InMemorySpanExporter) -> None:
    flaky = _flaky()

    store = InMemoryStateStore()
    transport = InMemoryTransport({URL: InMemoryAgent(chunks=["a", "b"])})
    remote = RemoteNode(transport=transport, skill="s", agent_url=URL, name="remote",
                        streaming=True, policy=NodePolicy(validate="none"))
    first = _node(flaky, "first", max_retries=1, backoff_base=0.001)
    flow = create(first.to(remote), remote.to(), state_store=store, tracer_provider=provider)
    flow.run()
    m = msg("x")
    try:
        await flow.emit(m)
        while not isinstance(await within(flow.fetch()), Message):
            pass
    finally:
        await flow.stop()

    live = {s.context.span_id: s for s in exporter.get_finished_spans()}
    rebuilt = {s.span_id: s for s in spans_from_events(await store.load_history(m.trace_id))}
    assert set(live) == set(rebuilt) and len(live) == 4
    for span_id, data in rebuilt.items():
        span = live[span_id]
        assert span.name == data.name
        assert span.context.trace_id == data.trace_id
        assert (span.parent.span_id if span.parent else None) == data.parent_span_id
        assert (span.start_time, span.end_time) == (data.start_ns, data.end_ns)
        assert dict(span.attributes) == data.attributes
        assert [(e.name, e.timestamp) for e in span.events] == [
            (e.name, e.time_ns) for e in data.events]


async def test_a_failing_span_processor_never_breaks_the_flow(
        exporter: InMemorySpanExporter) -> None:
    class Exploding(SimpleSpanProcessor):
        def on_end(self, span: ReadableSpan) -> None:
            raise RuntimeError("exporter bug")

    tp = TracerProvider(id_generator=PenguiFlowIdGenerator())
    tp.add_span_processor(Exploding(exporter))
    node = _node(_noop, "n")
    flow = create(node.to(), tracer_provider=tp)
    m = msg("x")
    out = await _run_one(flow, m)
    assert out.payload == "x"
    assert flow._events.tracer is not None
    assert flow._events.tracer.failures >= 1  # the node span, at least: counted, not raised
    tp.shutdown()


class _NoTracer(TracerProvider):
    def get_tracer(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("vendor tracer broken")


class _NoMeter:
    def get_meter(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("meter broken")


@pytest.mark.parametrize("broken", ["tracer", "meter"])
async def test_a_provider_that_cannot_hand_out_its_tracer_never_stops_the_flow(
        broken: str, caplog: pytest.LogCaptureFixture) -> None:
    # Before, flow.run() raised whatever get_tracer / get_meter raised.
    tp = _NoTracer() if broken == "tracer" else TracerProvider()
    extra: dict[str, Any] = {"meter_provider": _NoMeter()} if broken == "meter" else {}
    flow = create(_node(_noop, "n").to(), tracer_provider=tp, **extra)
    out = await _run_one(flow, msg("x"))
    assert out.payload == "x"
    assert flow.observer_failures == {"tracer_failed": 1}
    [record] = [r for r in caplog.records if r.getMessage() == "tracer_failed"]
    assert "broken" in record.error  # type: ignore[attr-defined]
    tp.shutdown()


async def test_each_flow_reports_its_metrics_to_its_own_meter_provider(
        exporter: InMemorySpanExporter) -> None:
    # Two flows on one tracer provider, two meter providers: before, the second
    # flow's metrics went to the first flow's meters (one tracer per provider).
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    tp = TracerProvider(id_generator=PenguiFlowIdGenerator())
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    readers = [InMemoryMetricReader(), InMemoryMetricReader()]
    for name, reader in zip("ab", readers, strict=True):
        flow = create(_node(_noop, f"node_{name}").to(), tracer_provider=tp,
                      meter_provider=MeterProvider(metric_readers=[reader]))
        await _run_one(flow, msg(name))
    seen = [{p.attributes["gen_ai.agent.name"] for p in _metric_points(r)["pf.node.duration"]}
            for r in readers]
    assert seen == [{"node_a"}, {"node_b"}]
    tp.shutdown()


class _EvenTraces:
    """A sampler keeping the traces whose id is even (deterministic, like ratio ones)."""

    def should_sample(self, parent_context: Any, trace_id: int, name: str,
                      *args: Any, **kwargs: Any) -> Any:
        from opentelemetry.sdk.trace.sampling import Decision, SamplingResult

        return SamplingResult(Decision.RECORD_AND_SAMPLE if trace_id % 2 == 0
                              else Decision.DROP)

    def get_description(self) -> str:
        return "EvenTraces"


@pytest.mark.parametrize("root", ["even", "off", "raises"])
async def test_a_sampler_keeps_or_drops_each_trace_whole(
        exporter: InMemorySpanExporter, root: str) -> None:
    # Before, node and user spans were always marked sampled: a parent-based
    # sampler dropped the root and exported its children as orphans.
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased

    class _Raising(_EvenTraces):
        def should_sample(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("sampler bug")

    chosen = {"even": _EvenTraces(), "off": ALWAYS_OFF, "raises": _Raising()}[root]
    tp = TracerProvider(sampler=ParentBased(root=chosen))
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    user = tp.get_tracer("app")

    async def traced(message: Message, ctx: Any) -> Message:
        with user.start_as_current_span("user.work"):
            return message

    a, b = _node(traced, "a"), _node(_noop, "b")
    flow = create(a.to(b), b.to(), tracer_provider=tp)
    messages = [msg(i) for i in range(16)]
    flow.run()
    try:
        for m in messages:
            await flow.emit(m)
            await within(flow.fetch())
    finally:
        await flow.stop()
    tp.shutdown()
    spans = exporter.get_finished_spans()
    by_trace: dict[int, list[ReadableSpan]] = {}
    for span in spans:
        by_trace.setdefault(span.context.trace_id, []).append(span)
    for trace_spans in by_trace.values():  # each exported trace is whole: no orphan
        ids = {s.context.span_id for s in trace_spans}
        assert sorted(s.name for s in trace_spans) == [
            "invoke_agent a", "invoke_agent b", "invoke_workflow penguiflow", "user.work"]
        assert all(s.parent is None or s.parent.span_id in ids for s in trace_spans)
    kept = {int(m.trace_id, 16) for m in messages if int(m.trace_id, 16) % 2 == 0}
    assert set(by_trace) == {"even": kept, "off": set(), "raises": set()}[root]
    if root == "raises":  # a broken sampler: the traces dropped, counted, the flow unharmed
        assert flow.observer_failures.get("tracer_failed", 0) >= len(messages)


async def test_without_an_sdk_nothing_is_traced_or_built() -> None:
    node = _node(_noop, "n")
    flow = create(node.to())  # the global provider is the API's no-op proxy
    flow.run()
    try:
        assert flow._events.tracer is None
        assert flow._events.listening is False
        await flow.emit(msg("x"))
        assert (await within(flow.fetch())).payload == "x"
    finally:
        await flow.stop()


async def test_metrics_record_node_duration_errors_retries_and_gauges(
        provider: TracerProvider) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    flaky = _flaky()

    async def broken(msg: Message, ctx: Any) -> Message:
        raise KeyError("nope")

    a = _node(flaky, "flaky", max_retries=1, backoff_base=0.001)
    b = _node(broken, "broken")
    flow = create(a.to(b), b.to(), tracer_provider=provider, meter_provider=meters,
                  emit_errors_to_rookery=True)
    flow.run()
    try:
        await flow.emit(msg("x"))
        await within(flow.fetch())
        # Gauges are read from the live flow when the reader collects.
        gauges = {m.name: m for rm in reader.get_metrics_data().resource_metrics
                  for sm in rm.scope_metrics for m in sm.metrics}
        assert "pf.queue.depth" in gauges and "pf.traces.in_flight" in gauges
        edges = {p.attributes["pf.edge"] for p in gauges["pf.queue.depth"].data.data_points}
        assert "flaky->broken" in edges
    finally:
        await flow.stop()
        metrics = {m.name: m for rm in reader.get_metrics_data().resource_metrics
                   for sm in rm.scope_metrics for m in sm.metrics}
        meters.shutdown()

    durations = {p.attributes["gen_ai.agent.name"]: p.count
                 for p in metrics["pf.node.duration"].data.data_points}
    assert durations == {"flaky": 1, "broken": 1}
    (err,) = metrics["pf.node.errors"].data.data_points
    assert dict(err.attributes) == {"gen_ai.agent.name": "broken", "error.type": "KeyError"}
    assert err.value == 1
    (retry,) = metrics["pf.node.retries"].data.data_points
    assert retry.attributes["gen_ai.agent.name"] == "flaky" and retry.value == 1


async def test_a_transport_injecting_traceparent_names_the_client_span(
        provider: TracerProvider, exporter: InMemorySpanExporter) -> None:
    sent: list[dict[str, str]] = []

    class Injecting(InMemoryTransport):
        async def send(self, request: Any) -> Any:
            sent.append(inject_trace_headers({}))  # what an HTTP transport would send
            return await super().send(request)

    transport = Injecting({URL: InMemoryAgent()})
    remote = RemoteNode(transport=transport, skill="lookup", agent_url=URL, name="remote",
                        policy=NodePolicy(validate="none"))
    flow = create(remote.to(), tracer_provider=provider)
    m = msg("x")
    await _run_one(flow, m)

    client = _by_name(exporter.get_finished_spans())["invoke_agent lookup"]
    assert client.kind is SpanKind.CLIENT
    (headers,) = sent
    _version, trace_hex, span_hex, _flags = headers["traceparent"].split("-")
    assert (trace_hex, span_hex) == (m.trace_id, _hex(client.context.span_id, 16))


async def test_a_streaming_node_reports_its_chunks_on_its_span_and_event(
        provider: TracerProvider, exporter: InMemorySpanExporter) -> None:
    async def talk(msg: Message, ctx: Any) -> Message:
        for word in ("a", "b", "c"):
            await ctx.emit_chunk(parent=msg, text=word)
        await ctx.emit_chunk(parent=msg, text="", done=True)  # no text: not a chunk
        return msg

    store = InMemoryStateStore()
    node = _node(talk, "talk")
    flow = create(node.to(), tracer_provider=provider, state_store=store)
    m = msg("x")
    flow.run()
    try:
        await flow.emit(m)
        while not isinstance((await within(flow.fetch())).payload, str):
            pass
    finally:
        await flow.stop()

    span = _by_name(exporter.get_finished_spans())["invoke_agent talk"]
    assert span.attributes["pf.stream.chunks"] == 3
    ttfc = span.attributes["gen_ai.response.time_to_first_chunk"]
    assert 0 <= ttfc <= (span.end_time - span.start_time) / 1e9
    (success,) = [e for e in await store.load_history(m.trace_id) if e.kind == "node_success"]
    assert success.payload["stream_chunks"] == 3
    assert success.payload["stream_first_chunk_ts"] >= success.ts - (span.end_time -
                                                                    span.start_time) / 1e9


@pytest.mark.parametrize("outcome", ["node_failed", "node_trace_cancelled"])
async def test_chunks_streamed_before_a_failure_or_cancel_are_on_the_span_and_event(
        provider: TracerProvider, exporter: InMemorySpanExporter, outcome: str) -> None:
    # Only a success reported them: an LLM node that streamed and then failed (or
    # was cancelled) lost its time to first chunk on the span, the metric and the store.
    streamed = asyncio.Event()

    async def talk(msg: Message, ctx: Any) -> Message:
        await ctx.emit_chunk(parent=msg, text="a")
        await ctx.emit_chunk(parent=msg, text="b")
        if outcome == "node_failed":
            raise RuntimeError("model error after streaming")
        streamed.set()
        await asyncio.Event().wait()  # until cancelled
        return msg

    store = InMemoryStateStore()
    recorder = Recorder()
    flow = create(_node(talk, "talk").to(), tracer_provider=provider, state_store=store,
                  middlewares=[recorder])
    m = msg("x")
    flow.run()
    try:
        await flow.emit(m)
        if outcome == "node_trace_cancelled":
            await within(streamed.wait())
            assert await flow.cancel(m.trace_id)
        await within(recorder.wait_for(outcome, trace_id=m.trace_id))
    finally:
        await flow.stop()

    span = _by_name(exporter.get_finished_spans())["invoke_agent talk"]
    assert span.attributes["pf.stream.chunks"] == 2
    assert 0 <= span.attributes["gen_ai.response.time_to_first_chunk"] <= (
        span.end_time - span.start_time) / 1e9
    (event,) = [e for e in await store.load_history(m.trace_id) if e.kind == outcome]
    assert event.payload["stream_chunks"] == 2
    assert event.payload["stream_first_chunk_ts"] <= event.ts


async def test_a_slow_remote_cancel_lands_in_the_same_trace_after_the_acknowledgement(
        provider: TracerProvider, exporter: InMemorySpanExporter) -> None:
    gate = asyncio.Event()
    transport = InMemoryTransport({URL: InMemoryAgent(chunks=["a", "b"], gate=gate,
                                                      cancel_latency_s=0.05)})
    remote = RemoteNode(transport=transport, skill="slow", agent_url=URL, name="remote",
                        streaming=True, policy=NodePolicy(validate="none"))
    root_ended = asyncio.Event()

    class RootWatch(SpanProcessor):
        def on_end(self, span: ReadableSpan) -> None:  # called on the loop's thread
            if span.parent is None:
                root_ended.set()

    provider.add_span_processor(RootWatch())
    store = InMemoryStateStore()
    flow = create(remote.to(), tracer_provider=provider, state_store=store)
    flow.run()
    m = msg("x")
    try:
        await flow.emit(m)
        task = await within(transport.next_task(URL))
        await within(task.started.wait())
        assert await within(flow.cancel(m.trace_id)) is True
        # The root ends once the remote cancel's round trip is done.
        await within(root_ended.wait())
    finally:
        await flow.stop()

    finished = exporter.get_finished_spans()
    roots = [s for s in finished if s.parent is None]
    assert len(roots) == 1  # late events did not open a second root
    names = [e.name for e in roots[0].events]
    assert names.index("pf.cancel.acknowledged") < names.index("pf.cancel.propagated")
    client = _by_name(finished)["invoke_agent slow"]
    assert client.attributes["error.type"] == "cancelled"
    history = await store.load_history(m.trace_id)
    (cancelled,) = [e for e in history if e.kind == "remote_call_cancelled"]
    (start,) = [e for e in history if e.kind == "remote_call_start"]
    assert cancelled.invocation_id == start.invocation_id is not None
    rebuilt = {s.span_id: s for s in spans_from_events(history)}
    assert {s.context.span_id for s in finished} == set(rebuilt)
    for span in finished:
        data = rebuilt[span.context.span_id]
        assert (span.start_time, span.end_time, span.name) == (data.start_ns, data.end_ns,
                                                               data.name)


async def test_an_adopted_trace_parent_hangs_the_root_under_the_callers_span(
        provider: TracerProvider, exporter: InMemorySpanExporter) -> None:
    store = InMemoryStateStore()
    flow = create(_node(_noop, "a").to(), state_store=store, tracer_provider=provider)
    m = msg("x")
    caller_span = "00f067aa0ba902b7"
    flow.run()
    try:
        await flow.adopt_trace_parent(m.trace_id, parent_span_id=caller_span,
                                      attributes={"a2a.task.id": "task-1"})
        await flow.emit(m)
        await within(flow.fetch())
    finally:
        await flow.stop()

    root = _by_name(exporter.get_finished_spans())["invoke_workflow penguiflow"]
    assert root.parent is not None and _hex(root.parent.span_id, 16) == caller_span
    assert root.context.trace_id == int(m.trace_id, 16)
    assert root.attributes["a2a.task.id"] == "task-1"
    # The store learns the parent too: pf export rebuilds the same root.
    history = await store.load_history(m.trace_id)
    assert history[0].kind == "trace_parent"
    rebuilt = [s for s in spans_from_events(history) if s.parent_span_id == int(caller_span, 16)]
    assert [s.name for s in rebuilt] == ["invoke_workflow penguiflow"]


async def test_a_playbooks_spans_nest_under_the_node_that_called_it(
        provider: TracerProvider, exporter: InMemorySpanExporter) -> None:
    # The subflow's node span was a child of the root, beside the caller: a
    # waterfall could not tell which node's time the playbook was part of.
    store = InMemoryStateStore()

    def playbook() -> tuple[Any, None]:
        inner, after = _node(_noop, "inner"), _node(_noop, "inner2")
        return create(inner.to(after), after.to(), state_store=store,
                      tracer_provider=provider), None

    async def caller(message: Message, ctx: Any) -> Message:
        await ctx.call_playbook(playbook, message)
        return message

    m = msg("x")
    await _run_one(create(_node(caller, "caller").to(), state_store=store,
                          tracer_provider=provider), m)
    spans = _by_name(exporter.get_finished_spans())
    calling, inner = spans["invoke_agent caller"], spans["invoke_agent inner"]
    assert inner.parent is not None and inner.parent.span_id == calling.context.span_id
    assert inner.context.trace_id == calling.context.trace_id
    assert inner.start_time >= calling.start_time and inner.end_time <= calling.end_time
    # The store says the same: the entry invocation's parent is the calling one.
    starts = {e.node_name: e for e in await store.load_history(m.trace_id)
              if e.kind == "node_start"}
    assert starts["inner"].parent_invocation_ids == (starts["caller"].invocation_id,)
    assert starts["caller"].parent_invocation_ids == ()


async def test_a_trace_under_an_unsampled_caller_is_dropped_whole(
        provider: TracerProvider, exporter: InMemorySpanExporter) -> None:
    # A caller sampling 1% sends flags 00 on 99% of its calls: with the default
    # (parent-based) sampler those traces were exported anyway, 100% of them as
    # orphans whose parent no backend ever receives.
    user = provider.get_tracer("app")
    sent: list[dict[str, str]] = []

    class Recording(InMemoryTransport):
        async def send(self, request: Any) -> Any:
            headers: dict[str, str] = {}
            inject_trace_headers(headers)
            sent.append(headers)
            return await super().send(request)

    async def traced(message: Message, ctx: Any) -> Message:
        with user.start_as_current_span("user.work"):
            return message

    remote = RemoteNode(transport=Recording({URL: InMemoryAgent()}), skill="lookup",
                        agent_url=URL, name="remote", policy=NodePolicy(validate="none"))
    a = _node(traced, "a")
    store = InMemoryStateStore()
    flow = create(a.to(remote), remote.to(), state_store=store, tracer_provider=provider)
    kept, dropped = msg("kept"), msg("dropped")
    flow.run()
    try:
        for m, sampled in ((kept, True), (dropped, False)):
            await flow.adopt_trace_parent(m.trace_id, parent_span_id="00f067aa0ba902b7",
                                          sampled=sampled)
            await flow.emit(m)
            await within(flow.fetch())
    finally:
        await flow.stop()
    spans = exporter.get_finished_spans()
    assert {s.context.trace_id for s in spans} == {int(kept.trace_id, 16)}
    assert sorted(s.name for s in spans) == [
        "invoke_agent a", "invoke_agent lookup", "invoke_agent remote",
        "invoke_workflow penguiflow", "user.work"]
    # Downstream agents are told too: the call made in the dropped trace says 00.
    assert [h["traceparent"][-2:] for h in sent] == ["01", "00"]
    assert sent[1]["traceparent"].split("-")[1] == dropped.trace_id
    # The store records the caller's flag (only when unsampled: older events unchanged).
    parents = {m.trace_id: next(e for e in await store.load_history(m.trace_id)
                                if e.kind == "trace_parent") for m in (kept, dropped)}
    assert "parent_sampled" not in parents[kept.trace_id].payload
    assert parents[dropped.trace_id].payload["parent_sampled"] is False
    assert flow.observer_failures.get("tracer_failed", 0) == 0


async def test_a_long_trace_under_an_unsampled_caller_stays_dropped_while_others_come_and_go(
        provider: TracerProvider, exporter: InMemorySpanExporter,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Decisions were kept in a bounded table, oldest evicted first and never
    # removed when their trace ended: after that many newer traces, a long one's
    # decision was gone and its later spans exported as orphans.
    import penguiflow._tracer as tracer_module

    monkeypatch.setattr(tracer_module, "_DECISIONS_MAX", 4)
    gate, started = asyncio.Event(), asyncio.Event()

    async def maybe_slow(message: Message, ctx: Any) -> Message:
        if message.payload == "long":
            started.set()
            await gate.wait()
        return message

    # Two flows of one provider (one tracer): the long trace holds the first one.
    flow = create(_node(maybe_slow, "a").to(), tracer_provider=provider)
    other = create(_node(maybe_slow, "b").to(), tracer_provider=provider)
    long = msg("long")
    flow.run()
    other.run()
    try:
        await flow.adopt_trace_parent(long.trace_id, parent_span_id="00f067aa0ba902b7",
                                      sampled=False)
        await flow.emit(long)
        await within(started.wait())
        for n in range(10):  # short traces, unsampled callers too: they come and go
            m = msg(n)
            await other.adopt_trace_parent(m.trace_id, parent_span_id="00f067aa0ba902b7",
                                           sampled=False)
            await other.emit(m)
            await within(other.fetch())
        gate.set()
        await within(flow.fetch())
    finally:
        await flow.stop()
        await other.stop()
    assert exporter.get_finished_spans() == ()
    assert tracer_for(provider)._decisions == {}  # only live traces are decided


@pytest.mark.parametrize("sampler", ["always_on", "raises"])
async def test_the_providers_sampler_decides_a_trace_under_a_remote_parent(
        exporter: InMemorySpanExporter, sampler: str) -> None:
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased

    class _Raising(_EvenTraces):
        def should_sample(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("sampler bug")

    # ALWAYS_ON ignores parents (as the SDK applies it to a remote parent); a
    # ParentBased whose remote-sampled delegate raises drops the trace, counted.
    chosen = ALWAYS_ON if sampler == "always_on" else ParentBased(
        root=_EvenTraces(), remote_parent_sampled=_Raising())
    tp = TracerProvider(sampler=chosen)
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    flow = create(_node(_noop, "a").to(), tracer_provider=tp)
    m = msg("x")
    flow.run()
    try:
        await flow.adopt_trace_parent(m.trace_id, parent_span_id="00f067aa0ba902b7",
                                      sampled=sampler != "always_on")
        await flow.emit(m)
        await within(flow.fetch())
    finally:
        await flow.stop()
    tp.shutdown()
    names = sorted(s.name for s in exporter.get_finished_spans())
    if sampler == "always_on":
        assert names == ["invoke_agent a", "invoke_workflow penguiflow"]
    else:
        assert names == []
        assert flow.observer_failures.get("tracer_failed", 0) >= 1


@pytest.mark.parametrize("bad", ["0" * 16, "00F067AA0BA902B7", "abc", "z" * 16])
async def test_adopt_trace_parent_refuses_a_span_id_that_is_not_w3c(bad: str) -> None:
    flow = create(_node(_noop, "a").to())
    with pytest.raises(ValueError, match="16 lowercase hex digits"):
        await flow.adopt_trace_parent("t", parent_span_id=bad)


async def test_the_client_span_names_the_method_the_transport_reports(
        provider: TracerProvider, exporter: InMemorySpanExporter) -> None:
    class Reporting(InMemoryTransport):
        async def send(self, request: Any) -> Any:
            result = await super().send(request)
            result.meta = {**(result.meta or {}), "a2a_method": "SendMessage"}
            return result

    store = InMemoryStateStore()
    remote = RemoteNode(transport=Reporting({URL: InMemoryAgent()}), skill="lookup",
                        agent_url=URL, name="remote", policy=NodePolicy(validate="none"))
    m = msg("x")
    await _run_one(create(remote.to(), state_store=store, tracer_provider=provider), m)

    client = _by_name(exporter.get_finished_spans())["invoke_agent lookup"]
    assert client.attributes["a2a.method.name"] == "SendMessage"
    success = [e for e in await store.load_history(m.trace_id)
               if e.kind == "remote_call_success"]
    assert success[0].payload["remote_method"] == "SendMessage"


async def test_without_an_sdk_the_traceparent_still_names_each_call_by_its_derived_id() -> None:
    sent: list[dict[str, str]] = []

    class Injecting(InMemoryTransport):
        async def send(self, request: Any) -> Any:
            sent.append(inject_trace_headers({}))
            if len(sent) == 1:
                raise ConnectionError("first attempt fails")  # the retry is call index 1
            return await super().send(request)

    store = InMemoryStateStore()
    remote = RemoteNode(transport=Injecting({URL: InMemoryAgent()}), skill="lookup",
                        agent_url=URL, name="remote",
                        policy=NodePolicy(validate="none", max_retries=1, backoff_base=0.001))
    m = msg("x")
    await _run_one(create(remote.to(), state_store=store), m)  # no tracer_provider, no SDK

    (inv,) = {e.invocation_id for e in await store.load_history(m.trace_id)
              if e.kind == "remote_call_start"}
    assert [h["traceparent"].split("-")[1:3] for h in sent] == [
        [m.trace_id, _hex(derived_span_id(m.trace_id, inv, "remote", str(i)), 16)]
        for i in range(2)]


# -- remote and cancel metrics ----------------------------------------------------------


def _metric_points(reader: Any) -> dict[str, list[Any]]:
    """Every data point the reader collects now, by instrument name."""
    return {m.name: list(m.data.data_points)
            for rm in reader.get_metrics_data().resource_metrics
            for sm in rm.scope_metrics for m in sm.metrics}


@pytest.fixture
def reader() -> Iterator[Any]:
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    metric_reader = InMemoryMetricReader()
    yield metric_reader
    metric_reader.shutdown()


def _meters(reader: Any) -> Any:
    from opentelemetry.sdk.metrics import MeterProvider

    return MeterProvider(metric_readers=[reader])


async def test_remote_metrics_record_latency_bytes_and_time_to_first_chunk(
        provider: TracerProvider, exporter: InMemorySpanExporter, reader: Any) -> None:
    store = InMemoryStateStore()
    transport = InMemoryTransport({URL: InMemoryAgent(chunks=["alpha", "beta", "gamma"])})
    remote = RemoteNode(transport=transport, skill="summarise", agent_url=URL, name="remote",
                        streaming=True, policy=NodePolicy(validate="none"))
    flow = create(remote.to(), tracer_provider=provider, meter_provider=_meters(reader),
                  state_store=store)
    m = msg({"question": "what?"})
    flow.run()
    try:
        await flow.emit(m)
        while hasattr(await within(flow.fetch()), "done"):
            pass  # the chunks, then the result
    finally:
        await flow.stop()

    points = _metric_points(reader)
    spans = _by_name(exporter.get_finished_spans())
    client, node_span = spans["invoke_agent summarise"], spans["invoke_agent remote"]
    labels = {"pf.remote.outcome": "success", "a2a.method.name": "message/stream",
              "gen_ai.agent.name": "summarise", "server.address": "agents.example"}
    # Latency: one call, as long as its CLIENT span.
    (latency,) = points["pf.remote.duration"]
    assert dict(latency.attributes) == labels
    assert latency.count == 1
    assert latency.sum == pytest.approx((client.end_time - client.start_time) / 1e9)
    # Bytes: what the stored events measured, sent and received, under the same labels.
    history = await store.load_history(m.trace_id)
    (start,) = [e for e in history if e.kind == "remote_call_start"]
    (success,) = [e for e in history if e.kind == "remote_call_success"]
    (sent,) = points["pf.remote.bytes_sent"]
    (received,) = points["pf.remote.bytes_received"]
    assert dict(sent.attributes) == dict(received.attributes) == labels
    assert sent.value == start.payload["remote_request_bytes"] > 0
    assert received.value == success.payload["remote_response_bytes"] > 0
    # Time to first chunk: one stream, one sample, the call's. The RemoteNode
    # re-emits the chunks (its span says so) but the same first chunk was
    # measured twice before, once without the call's labels.
    (ttfc,) = points["pf.stream.time_to_first_chunk"]
    assert dict(ttfc.attributes) == labels
    assert ttfc.count == 1
    assert ttfc.sum == pytest.approx(client.attributes["gen_ai.response.time_to_first_chunk"])
    assert node_span.attributes["gen_ai.response.time_to_first_chunk"] >= 0


async def test_a_failed_remote_call_is_measured_with_outcome_error(
        provider: TracerProvider, reader: Any) -> None:
    transport = InMemoryTransport({URL: InMemoryAgent(fail_with="agent down")})
    remote = RemoteNode(transport=transport, skill="lookup", agent_url=URL, name="remote",
                        policy=NodePolicy(validate="none"))
    flow = create(remote.to(), tracer_provider=provider, meter_provider=_meters(reader),
                  emit_errors_to_rookery=True)
    await _run_one(flow, msg("x"))

    points = _metric_points(reader)
    (latency,) = points["pf.remote.duration"]
    assert latency.attributes["pf.remote.outcome"] == "error"
    assert latency.attributes["a2a.method.name"] == "message/send"
    assert latency.count == 1
    (sent,) = points["pf.remote.bytes_sent"]
    assert sent.attributes["pf.remote.outcome"] == "error" and sent.value > 0
    assert "pf.remote.bytes_received" not in points  # nothing came back
    assert "pf.stream.time_to_first_chunk" not in points


async def test_a_trace_cancel_records_its_latency_and_the_remote_call_as_cancelled(
        provider: TracerProvider, exporter: InMemorySpanExporter, reader: Any) -> None:
    gate = asyncio.Event()
    transport = InMemoryTransport({URL: InMemoryAgent(chunks=["a", "b"], gate=gate)})
    remote = RemoteNode(transport=transport, skill="slow", agent_url=URL, name="remote",
                        streaming=True, policy=NodePolicy(validate="none"))
    flow = create(remote.to(), name="cancelling", tracer_provider=provider,
                  meter_provider=_meters(reader))
    flow.run()
    m = msg("x")
    try:
        await flow.emit(m)
        task = await within(transport.next_task(URL))
        await within(task.started.wait())
        assert await within(flow.cancel(m.trace_id)) is True
        await within(task.cancel_requested.wait())
    finally:
        await flow.stop()

    points = _metric_points(reader)
    root = _by_name(exporter.get_finished_spans())["invoke_workflow cancelling"]
    times = {e.name: e.timestamp for e in root.events}
    (cancel,) = points["pf.cancel.latency"]
    assert dict(cancel.attributes) == {"gen_ai.workflow.name": "cancelling"}
    assert cancel.count == 1
    assert cancel.sum == pytest.approx(
        (times["pf.cancel.acknowledged"] - times["pf.cancel.requested"]) / 1e9)
    (latency,) = points["pf.remote.duration"]
    assert latency.attributes["pf.remote.outcome"] == "cancelled"


async def test_workers_do_not_keep_the_span_run_was_called_in(
        provider: TracerProvider, exporter: InMemorySpanExporter) -> None:
    # The worker tasks copied run()'s context: a flow started lazily inside a request's
    # span parented every later user span (of unrelated work) to that ended span.
    # An application's own context variables still reach the nodes.
    import contextvars

    app_var: contextvars.ContextVar[str] = contextvars.ContextVar("app_var")
    seen: list[str] = []
    tracer = provider.get_tracer("app")

    async def work(item: Any, ctx: Any) -> Any:
        seen.append(app_var.get("unset"))
        with tracer.start_as_current_span("user.work"):
            pass
        return item

    flow = create(_node(work, "a").to(), tracer_provider=provider)
    app_var.set("app-wide")
    with tracer.start_as_current_span("startup-request"):
        flow.run()
    try:
        await flow.emit({"job": 2})  # no trace: the node has no span of its own
        await within(flow.fetch())
    finally:
        await flow.stop()
    spans = _by_name(exporter.get_finished_spans())
    assert spans["user.work"].parent is None
    assert spans["user.work"].context.trace_id != spans["startup-request"].context.trace_id
    assert seen == ["app-wide"]


async def test_a_node_name_utf8_cannot_hold_does_not_sink_the_span_batch(
        provider: TracerProvider, exporter: InMemorySpanExporter) -> None:
    # A lone surrogate in a node or flow name went into the span names, and the OTLP
    # encoder refused the whole batch for it (up to 512 spans of other traces).
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    flow = create(_node(_noop, "a\udcffb").to(), name="f\ud800", tracer_provider=provider)
    await _run_one(flow, msg("x"))
    spans = _by_name(exporter.get_finished_spans())
    assert set(spans) == {"invoke_workflow f\ufffd", "invoke_agent a\ufffdb"}
    assert encode_spans(list(spans.values())).resource_spans


async def test_a_context_variable_a_node_sets_stays_in_its_worker() -> None:
    # Every worker ran in one shared context copy for a while: a ContextVar one node
    # set (its bus turn, its log scope, a user's own) was seen by every other node.
    import contextvars

    var: contextvars.ContextVar[str] = contextvars.ContextVar("per_worker", default="unset")
    seen: list[str] = []

    async def setter(item: Any, ctx: Any) -> Any:
        var.set("set by a")
        return item

    async def reader(item: Any, ctx: Any) -> Any:
        seen.append(var.get())
        return item

    a, b = _node(setter, "a"), _node(reader, "b")
    flow = create(a.to(b), b.to())
    flow.run()
    try:
        await flow.emit({"x": 1})
        await within(flow.fetch())
    finally:
        await flow.stop()
    assert seen == ["unset"]


async def test_a_remote_call_cut_by_the_timeout_ends_its_span_and_the_retry_gets_its_own(
        provider: TracerProvider, exporter: InMemorySpanExporter) -> None:
    # Before: the cut call's CLIENT span stayed open and the retry's replaced it,
    # so it was never exported and the transport's span under it was an orphan.
    from penguiflow.remote import RemoteCallResult

    user = provider.get_tracer("app")
    calls = 0

    class SlowFirst:
        async def send(self, request: Any) -> Any:
            nonlocal calls
            calls += 1
            with user.start_as_current_span(f"transport.send{calls}"):
                if calls == 1:
                    await asyncio.Event().wait()  # cut by the node's timeout
                return RemoteCallResult(result="ok", context_id="ctx", task_id=f"task{calls}")

        def stream(self, request: Any) -> Any:
            raise NotImplementedError

        async def cancel(self, *, agent_url: str, task_id: str) -> None:
            return None

    store = InMemoryStateStore()
    remote = RemoteNode(transport=SlowFirst(), skill="s", agent_url=URL, name="remote",
                        policy=NodePolicy(validate="none", timeout_s=0.1, max_retries=1,
                                          backoff_base=0.001))
    flow = create(remote.to(), tracer_provider=provider, state_store=store)
    m = msg("x")
    assert await _run_one(flow, m) == "ok"
    spans = exporter.get_finished_spans()
    ids = {s.context.span_id for s in spans}
    assert all(s.parent is None or s.parent.span_id in ids for s in spans)  # no orphan
    first, second = sorted((s for s in spans if s.name == "invoke_agent s"),
                           key=lambda s: s.start_time)
    assert first.status.status_code is StatusCode.ERROR
    assert first.attributes["error.type"] == "timeout"
    assert first.end_time <= second.start_time
    assert second.status.status_code is StatusCode.UNSET
    assert second.attributes["a2a.task.id"] == "task2"
    # pf export rebuilds the same spans from the stored events.
    rebuilt = {s.span_id for s in spans_from_events(await store.load_history(m.trace_id))}
    assert {s.context.span_id for s in spans if s.instrumentation_scope
            and s.instrumentation_scope.name == "penguiflow"} == rebuilt


async def test_a_remote_cancel_that_fails_still_ends_the_client_span_cancelled(
        provider: TracerProvider, exporter: InMemorySpanExporter) -> None:
    from penguiflow.remote import RemoteStreamEvent

    started = asyncio.Event()

    class Refusing:
        def stream(self, request: Any) -> Any:
            async def events() -> Any:
                yield RemoteStreamEvent(text="c", context_id="ctx", task_id="task1")
                started.set()
                await asyncio.Event().wait()
                yield RemoteStreamEvent(text="never", done=True)
            return events()

        async def send(self, request: Any) -> Any:
            raise NotImplementedError

        async def cancel(self, *, agent_url: str, task_id: str) -> None:
            raise RuntimeError("CancelTask refused: agent unreachable")

    remote = RemoteNode(transport=Refusing(), skill="s", agent_url=URL, name="remote",
                        streaming=True, policy=NodePolicy(validate="none"))
    recorder = Recorder()
    flow = create(remote.to(), tracer_provider=provider, middlewares=[recorder])
    flow.run()
    m = msg("x")
    try:
        await flow.emit(m)
        await within(started.wait())
        assert await within(flow.cancel(m.trace_id))
        await recorder.wait_for("trace_cancel_finish", trace_id=m.trace_id)
        await recorder.wait_for("remote_cancel_error", trace_id=m.trace_id)
    finally:
        await flow.stop()
    client = _by_name(exporter.get_finished_spans())["invoke_agent s"]
    # Before: ended only with the trace, UNSET, as if the call had succeeded.
    assert client.status.status_code is StatusCode.ERROR
    assert client.attributes["error.type"] == "cancelled"
    assert "pf.cancel.propagation_failed" in [e.name for e in client.events]


async def test_a_trace_continued_after_stop_and_run_exports_its_root_once(
        provider: TracerProvider, exporter: InMemorySpanExporter) -> None:
    # stop() ends the root of a trace whose second message is still queued; run()
    # again continues the trace under the same root id, which was exported twice.
    started = asyncio.Event()

    async def slow(message: Message, ctx: Any) -> Message:
        started.set()
        if message.payload == 1:
            await asyncio.Event().wait()  # cut by stop()
        return message

    flow = create(_node(slow, "slow").to(), tracer_provider=provider)
    first = msg(1)
    second = Message(payload=2, headers=first.headers, trace_id=first.trace_id)
    flow.run()
    await flow.emit(first)
    await flow.emit(second)
    await within(started.wait())
    await flow.stop()
    flow.run()
    try:
        assert (await within(flow.fetch())).payload == 2
    finally:
        await flow.stop()
    spans = exporter.get_finished_spans()
    roots = [s for s in spans if s.parent is None]
    assert len(roots) == 1
    assert all(s.parent.span_id == roots[0].context.span_id for s in spans if s.parent)


async def _streamed_call_stored_with(key: str, value: Any) -> tuple[list[Any], list[Any]]:
    """The stored history of one streaming remote call (two chunks), and the same
    with ``key`` of every remote event's payload set to ``value`` (a foreign or
    hand-edited store's)."""
    store = InMemoryStateStore()
    transport = InMemoryTransport({URL: InMemoryAgent(chunks=["a", "b"])})
    remote = RemoteNode(transport=transport, skill="s", agent_url=URL, name="remote",
                        streaming=True, policy=NodePolicy(validate="none"))
    flow = create(remote.to(), state_store=store)
    flow.run()
    m = msg("x")
    try:
        await flow.emit(m)
        await within(flow.fetch())
    finally:
        await flow.stop()
    history = list(await store.load_history(m.trace_id))
    return history, [dataclasses.replace(e, payload={**e.payload, key: value})
                     if e.kind.startswith("remote_") else e for e in history]


@pytest.mark.parametrize("index", [-1, "0", True, 2.0, None])
async def test_a_stored_remote_call_index_that_is_not_a_count_leaves_the_call_whole(
        index: Any) -> None:
    # ``remote_call_index`` is RemoteNode's own count (an int >= 0). A stored value
    # that is not one (an old or foreign writer, a hand-edited file) is ignored by
    # every remote event alike: the call keeps its chunks and its end.
    history, odd = await _streamed_call_stored_with("remote_call_index", index)

    def client(events: Any) -> Any:
        (span,) = [s for s in spans_from_events(events) if s.kind == "client"]
        return span

    expected, got = client(history), client(odd)
    assert got.end_ns == expected.end_ns is not None
    assert [e.name for e in got.events] == [e.name for e in expected.events]
    assert got.attributes == expected.attributes and got.span_id == expected.span_id


@pytest.mark.parametrize(("url", "server"), [
    ("http://[evil", {}),  # urlsplit refuses an unclosed IPv6 bracket
    ("http://\x1b[2Jhost:1/", {}),  # the same, from an escape sequence
    ("http://Ho\x1bst:1/", {"server.address": "ho\x1bst", "server.port": 1}),
    ("http://host:99999/", {"server.address": "host"}),  # a port out of range
    ("not a url", {}),
])
async def test_a_stored_agent_url_that_is_no_url_keeps_the_client_span(
        url: str, server: dict[str, Any]) -> None:
    # A stored remote_agent_url is rebuilt into the CLIENT span by pf export and the
    # span model; one urlsplit refuses made the whole export fail with a traceback.
    _, odd = await _streamed_call_stored_with("remote_agent_url", url)
    (span,) = [s for s in spans_from_events(odd) if s.kind == "client"]
    assert span.attributes["pf.remote.agent_url"] == url
    got = {k: v for k, v in span.attributes.items() if k.startswith("server.")}
    assert got == server
    assert span.end_ns is not None


async def test_a_served_request_under_a_callers_span_is_measured_as_a_trace_not_a_node(
        provider: TracerProvider, reader: Any) -> None:
    # The root under the caller's span (adopt_trace_parent, as the A2A server does)
    # was taken for a node span: pf.node.duration{agent="?"} for every request, and a
    # cancelled one counted a node error "?" and no pf.cancel.latency.
    entered = asyncio.Event()

    async def maybe_slow(message: Message, ctx: Any) -> Message:
        if message.payload == "slow":
            entered.set()
            await asyncio.Event().wait()
        return message

    flow = create(_node(maybe_slow, "a").to(), name="served", tracer_provider=provider,
                  meter_provider=_meters(reader))
    done, cancelled = msg("fast"), msg("slow")
    flow.run()
    try:
        for m in (done, cancelled):
            await flow.adopt_trace_parent(m.trace_id, parent_span_id="00f067aa0ba902b7")
            await flow.emit(m)
        await within(flow.fetch())
        await within(entered.wait())
        assert await within(flow.cancel(cancelled.trace_id)) is True
    finally:
        await flow.stop()

    points = _metric_points(reader)
    agents = sorted(p.attributes["gen_ai.agent.name"] for p in points["pf.node.duration"])
    assert agents == ["a", "a"]
    (error,) = points["pf.node.errors"]
    assert dict(error.attributes) == {"gen_ai.agent.name": "a", "error.type": "cancelled"}
    (latency,) = points["pf.cancel.latency"]
    assert dict(latency.attributes) == {"gen_ai.workflow.name": "served"}
    assert latency.count == 1


async def test_gauges_add_up_the_flows_that_share_a_name(
        provider: TracerProvider, reader: Any) -> None:
    # Two replicas of one flow: each reported one observation with the same
    # attributes and the SDK kept one: 4 traces in flight read as 1 or 3.
    gate = asyncio.Event()
    entered: list[int] = []
    all_in = asyncio.Event()

    async def slow(message: Message, ctx: Any) -> Message:
        entered.append(1)
        if len(entered) == 2:
            all_in.set()
        await gate.wait()
        return message

    meters = _meters(reader)
    flows = [create(_node(slow, "a").to(), name="checkout", tracer_provider=provider,
                    meter_provider=meters, queue_maxsize=8) for _ in range(2)]
    for flow in flows:
        flow.run()
    try:
        for _ in range(3):
            await flows[0].emit(msg("x"))
        await flows[1].emit(msg("y"))
        await within(all_in.wait())  # each flow's node holds one, the rest queued
        points = _metric_points(reader)
        in_flight = sum(len(flow._traces) for flow in flows)
        queued = sum(floe.queue.qsize() for flow in flows for floe in flow.floes)
        gate.set()
        for flow in flows:
            for _ in range(len(flow._traces)):
                await within(flow.fetch())
    finally:
        gate.set()
        for flow in flows:
            await flow.stop()
    assert in_flight == 4 and queued == 2
    (traces,) = points["pf.traces.in_flight"]
    assert dict(traces.attributes) == {"gen_ai.workflow.name": "checkout"}
    assert traces.value == 4
    depth = {p.attributes["pf.edge"]: p.value for p in points["pf.queue.depth"]}
    assert sum(depth.values()) == 2
    assert len(points["pf.queue.depth"]) == len(depth)  # one point per edge


async def test_the_observer_failures_counter_keeps_a_collected_flows_failures(
        provider: TracerProvider, reader: Any, caplog: pytest.LogCaptureFixture) -> None:
    # The cumulative counter was re-summed over the live flows: a flow garbage-
    # collected took its failures with it (3 -> 0), which a backend reads as a reset.
    import gc
    import weakref

    # The failures' log records (their tracebacks) would keep the flow alive.
    caplog.set_level(logging.CRITICAL, logger="penguiflow")

    async def broken(event: Any) -> None:
        raise RuntimeError("middleware bug")

    def total() -> int:
        return sum(p.value for p in _metric_points(reader).get("pf.observer.failures", []))

    meters = _meters(reader)
    flow = create(_node(_noop, "a").to(), tracer_provider=provider, meter_provider=meters,
                  middlewares=[broken])
    await _run_one(flow, msg("x"))
    failed = sum(flow.observer_failures.values())
    assert failed > 0
    assert total() == failed
    gone = weakref.ref(flow)
    del flow
    gc.collect()
    assert gone() is None
    other = create(_node(_noop, "b").to(), tracer_provider=provider, meter_provider=meters)
    await _run_one(other, msg("y"))
    assert total() == failed  # and stays so
    assert total() == failed


async def test_a_flow_stopped_and_dropped_between_collections_keeps_its_failures(
        provider: TracerProvider, reader: Any, caplog: pytest.LogCaptureFixture) -> None:
    import gc
    import weakref

    # The failures' log records (their tracebacks) would keep the flow alive.
    caplog.set_level(logging.CRITICAL, logger="penguiflow")

    async def broken(event: Any) -> None:
        raise RuntimeError("middleware bug")

    flow = create(_node(_noop, "a").to(), tracer_provider=provider,
                  meter_provider=_meters(reader), middlewares=[broken])
    await _run_one(flow, msg("x"))  # never collected while it lived
    failed = sum(flow.observer_failures.values())
    gone = weakref.ref(flow)
    del flow
    gc.collect()
    assert gone() is None
    assert sum(p.value for p in _metric_points(reader)["pf.observer.failures"]) == failed


async def test_a_streaming_node_without_a_remote_call_measures_its_first_chunk(
        provider: TracerProvider, reader: Any) -> None:
    async def talk(message: Message, ctx: Any) -> Message:
        await ctx.emit_chunk(parent=message, text="a")
        return message

    flow = create(_node(talk, "talk").to(), tracer_provider=provider,
                  meter_provider=_meters(reader))
    flow.run()
    try:
        await flow.emit(msg("x"))
        while not isinstance((await within(flow.fetch())).payload, str):
            pass
    finally:
        await flow.stop()
    (ttfc,) = _metric_points(reader)["pf.stream.time_to_first_chunk"]
    assert dict(ttfc.attributes) == {"gen_ai.agent.name": "talk"} and ttfc.count == 1


async def test_a_peers_huge_task_id_is_bounded_on_the_cancel_events_too(
        provider: TracerProvider, exporter: InMemorySpanExporter) -> None:
    # _remote_ids bounded the task id on the CLIENT span, the cancel path copied it
    # as it came: 2 MB in pf.cancel.propagated, on the root and the CLIENT span.
    from penguiflow.errors import PEER_TEXT_LIMIT
    from penguiflow.remote import RemoteStreamEvent

    huge = "t" * 2_000_000

    class Hostile:
        def __init__(self) -> None:
            self.streaming, self.cancelled = asyncio.Event(), asyncio.Event()

        async def send(self, request: Any) -> Any:
            raise NotImplementedError

        async def stream(self, request: Any) -> Any:
            yield RemoteStreamEvent(text="a", context_id="ctx", task_id=huge)
            self.streaming.set()  # the node took the event: the task id is known
            await asyncio.Event().wait()

        async def cancel(self, *, agent_url: str, task_id: str) -> None:
            self.cancelled.set()

    transport = Hostile()
    remote = RemoteNode(transport=transport, skill="s", agent_url=URL, name="remote",
                        streaming=True, policy=NodePolicy(validate="none"))
    flow = create(remote.to(), tracer_provider=provider)
    m = msg("x")
    flow.run()
    try:
        await flow.emit(m)
        await within(transport.streaming.wait())
        assert await within(flow.cancel(m.trace_id)) is True
        await within(transport.cancelled.wait())
    finally:
        await flow.stop()

    spans = _by_name(exporter.get_finished_spans())
    propagated = [e for name in ("invoke_agent s", "invoke_workflow penguiflow")
                  for e in spans[name].events if e.name == "pf.cancel.propagated"]
    assert len(propagated) == 2
    for event in propagated:
        task_id = event.attributes["a2a.task.id"]
        assert isinstance(task_id, str) and task_id.startswith("tttt")
        assert len(task_id) <= PEER_TEXT_LIMIT + 64
        assert all(len(str(v)) <= PEER_TEXT_LIMIT + 64 for v in event.attributes.values())


class _DropHealthChecks:
    """A sampler dropping the traces of the workflow ``healthcheck`` by the root's
    name or its ``gen_ai.workflow.name``: what it is given at the root's start."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, Any]] = []

    def should_sample(self, parent_context: Any, trace_id: int, name: str, kind: Any = None,
                      attributes: Any = None, *args: Any, **kwargs: Any) -> Any:
        from opentelemetry.sdk.trace.sampling import Decision, SamplingResult

        self.asked.append((name, dict(attributes or {})))
        drop = (name.endswith(" healthcheck")
                or (attributes or {}).get("gen_ai.workflow.name") == "healthcheck")
        return SamplingResult(Decision.DROP if drop else Decision.RECORD_AND_SAMPLE,
                              None if drop else attributes)

    def get_description(self) -> str:
        return "DropHealthChecks"


class _ErroredOnly(_DropHealthChecks):
    """A sampler keeping the spans that start with ``error.type``: it cannot know
    at a root's start, so the trace is dropped (never its root alone)."""

    def should_sample(self, parent_context: Any, trace_id: int, name: str, kind: Any = None,
                      attributes: Any = None, *args: Any, **kwargs: Any) -> Any:
        from opentelemetry.sdk.trace.sampling import Decision, SamplingResult

        keep = "error.type" in (attributes or {})
        return SamplingResult(Decision.RECORD_AND_SAMPLE if keep else Decision.DROP,
                              attributes if keep else None)


@pytest.mark.parametrize("sampler", ["drop-healthchecks", "errored-only"])
async def test_a_sampler_reading_the_roots_name_and_attributes_decides_the_trace_whole(
        exporter: InMemorySpanExporter, sampler: str) -> None:
    # The trace was decided with the name "invoke_workflow" and no attributes, its
    # root started as "invoke_workflow healthcheck" with them: the root dropped, the
    # node spans exported as orphans; or (errored-only) the root kept for its
    # end-time error.type and every node span dropped.
    from opentelemetry.sdk.trace.sampling import ParentBased

    chosen = _DropHealthChecks() if sampler == "drop-healthchecks" else _ErroredOnly()
    tp = TracerProvider(sampler=ParentBased(root=chosen))
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    user = tp.get_tracer("app")

    async def traced(message: Message, ctx: Any) -> Message:
        with user.start_as_current_span("user.work"):
            return message

    for name in ("healthcheck", "checkout"):
        a, b = _node(traced, "a"), _node(_noop, "b")
        flow = create(a.to(b), b.to(), name=name, tracer_provider=tp)
        flow.run()
        try:
            await flow.emit(msg("ok"))
            await within(flow.fetch())
            # Skipped for its deadline at its first node: the root ends with
            # error.type=deadline_exceeded, which a sampler never sees at its start.
            await flow.emit(msg("late", deadline_s=1.0))
            await within(flow.fetch())
        finally:
            await flow.stop()
    tp.shutdown()
    spans = exporter.get_finished_spans()
    ids = {s.context.span_id for s in spans}
    assert [s.name for s in spans if s.parent is not None and s.parent.span_id not in ids] == []
    roots = sorted(s.name for s in spans if s.parent is None)
    if sampler == "drop-healthchecks":
        assert roots == ["invoke_workflow checkout"] * 2
        # Both checkout traces whole (the late one is its root alone).
        assert sorted(s.name for s in spans) == sorted(
            ["invoke_workflow checkout"] * 2 + ["invoke_agent a", "invoke_agent b", "user.work"])
    else:
        assert spans == ()
    # The decision saw what the root starts with: its name, never its outcome.
    assert {name for name, _ in chosen.asked if name.startswith("invoke_workflow")} <= {
        "invoke_workflow healthcheck", "invoke_workflow checkout"}
    assert all("error.type" not in attributes for name, attributes in chosen.asked
               if name.startswith("invoke_workflow"))


async def test_a_node_answering_with_a_new_trace_id_starts_that_trace_under_its_root(
        provider: TracerProvider, exporter: InMemorySpanExporter) -> None:
    # b's span went into the new trace with a's span (in the old trace) as parent:
    # an orphan there, whose parent no backend shows in that trace.
    async def split(message: Message, ctx: Any) -> Message:
        return Message(payload="child", headers=message.headers)  # a fresh trace id

    a, b = _node(split, "a"), _node(_noop, "b")
    flow = create(a.to(b), b.to(), name="f", tracer_provider=provider)
    m = msg("x")
    out = await _run_one(flow, m)
    assert out.trace_id != m.trace_id

    spans = exporter.get_finished_spans()
    by_trace: dict[int, dict[str, ReadableSpan]] = {}
    for span in spans:
        by_trace.setdefault(span.context.trace_id, {})[span.name] = span
    old, new = by_trace[int(m.trace_id, 16)], by_trace[int(out.trace_id, 16)]
    assert set(old) == {"invoke_workflow f", "invoke_agent a"}
    assert set(new) == {"invoke_workflow f", "invoke_agent b"}
    sb = new["invoke_agent b"]
    assert sb.parent is not None and sb.parent.span_id == new["invoke_workflow f"].context.span_id
    (link,) = sb.links
    assert (link.context.trace_id, link.context.span_id) == (
        int(m.trace_id, 16), old["invoke_agent a"].context.span_id)
    assert link.attributes["pf.edge"] == "a->b"


async def test_a_trace_only_adopted_opens_nothing_in_the_tracer(
        provider: TracerProvider, exporter: InMemorySpanExporter) -> None:
    # The A2A server adopts the caller's traceparent before it emits; when the emit
    # was refused (or the client left) the trace stayed open in the tracer, with
    # its sampling decision, until stop(): one per such request.
    flow = create(_node(_noop, "a").to(), tracer_provider=provider)
    flow.run()
    tracer = tracer_for(provider)
    assert tracer is not None
    try:
        for _ in range(50):
            await flow.adopt_trace_parent(msg("refused").trace_id,
                                          parent_span_id="00f067aa0ba902b7")
        served = msg("served")
        await flow.adopt_trace_parent(served.trace_id, parent_span_id="00f067aa0ba902b7")
        await flow.emit(served)
        await within(flow.fetch())
        await within(flow.emit(msg("plain")))
        await within(flow.fetch())
        assert tracer.model.open_traces() == []
        assert tracer._decisions == {}
    finally:
        await flow.stop()
    assert tracer.model._pending_parents == {}
    # The request that ran is exported whole, under its caller's span.
    roots = [s for s in exporter.get_finished_spans() if s.name == "invoke_workflow penguiflow"]
    assert len(roots) == 2
    (adopted,) = [s for s in roots if s.parent is not None]
    assert adopted.context.trace_id == int(served.trace_id, 16)
    assert _hex(adopted.parent.span_id, 16) == "00f067aa0ba902b7"


class _ReadsCurrentSpan(logging.Filter):
    """What OTel log correlation does per record (opentelemetry-instrumentation-logging,
    the SDK's LoggingHandler): read the current span's context."""

    def __init__(self) -> None:
        super().__init__()
        self.flags: dict[int, list[bool]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            self.flags.setdefault(context.trace_id, []).append(context.trace_flags.sampled)
        return True


@pytest.fixture
def log_correlation() -> Iterator[_ReadsCurrentSpan]:
    hook = _ReadsCurrentSpan()
    handler = logging.Handler()  # its filters run for each record (NullHandler's do not)
    handler.emit = lambda record: None  # type: ignore[method-assign]
    handler.addFilter(hook)
    penguiflow_logger = logging.getLogger("penguiflow")
    level = penguiflow_logger.level
    penguiflow_logger.addHandler(handler)
    # The worker logs node_start at DEBUG, in the node's context, before the
    # event reaches the tracer's model.
    penguiflow_logger.setLevel(logging.DEBUG)
    try:
        yield hook
    finally:
        penguiflow_logger.removeHandler(handler)
        penguiflow_logger.setLevel(level)


@pytest.mark.parametrize("sampler", ["default", "parent-based-ratio"])
async def test_a_log_hook_reading_the_span_never_exports_an_unsampled_callers_trace(
        exporter: InMemorySpanExporter, log_correlation: _ReadsCurrentSpan,
        sampler: str) -> None:
    # The hook read the node's context while node_start was logged, before the
    # adopted parent was applied: the trace was decided as a new root and kept
    # (every user span an orphan under the default sampler, the whole trace under
    # ParentBased(ratio 1.0)), although the caller did not sample it.
    from opentelemetry.sdk.trace.sampling import ParentBased

    from penguiflow_exporters.otel import PenguiFlowRatioSampler

    tp = (TracerProvider() if sampler == "default"
          else TracerProvider(sampler=ParentBased(PenguiFlowRatioSampler(1.0))))
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    user = tp.get_tracer("app")

    async def traced(message: Message, ctx: Any) -> Message:
        with user.start_as_current_span("user.work"):
            return message

    flow = create(_node(traced, "a").to(), tracer_provider=tp)
    kept, dropped = msg("kept"), msg("dropped")
    flow.run()
    try:
        for m, sampled in ((kept, True), (dropped, False), (msg("plain"), None)):
            if sampled is not None:
                await flow.adopt_trace_parent(m.trace_id, parent_span_id="00f067aa0ba902b7",
                                              sampled=sampled)
            await flow.emit(m)
            await within(flow.fetch())
    finally:
        await flow.stop()
    tp.shutdown()
    spans = exporter.get_finished_spans()
    assert int(dropped.trace_id, 16) not in {s.context.trace_id for s in spans}
    ids = {s.context.span_id for s in spans}
    assert [s.name for s in spans
            if s.parent is not None and s.parent.span_id not in ids
            and s.name != "invoke_workflow penguiflow"] == []
    assert sorted(s.name for s in spans if s.context.trace_id == int(kept.trace_id, 16)) == [
        "invoke_agent a", "invoke_workflow penguiflow", "user.work"]
    # The log lines of the unsampled caller's trace say so, even the early one.
    assert log_correlation.flags[int(dropped.trace_id, 16)]
    assert not any(log_correlation.flags[int(dropped.trace_id, 16)])
    assert all(log_correlation.flags[int(kept.trace_id, 16)])


async def test_a_log_hook_reading_the_span_never_decides_a_trace_without_its_root(
        exporter: InMemorySpanExporter, log_correlation: _ReadsCurrentSpan) -> None:
    # The same early read asked the sampler with the bare name "invoke_workflow"
    # and no attributes, and kept that answer: a sampler keeping the workflow
    # "important" dropped its node and user spans and kept the root alone.
    from opentelemetry.sdk.trace.sampling import Decision, ParentBased, SamplingResult

    asked: list[tuple[str, Any]] = []

    class KeepImportant:
        def should_sample(self, parent_context: Any, trace_id: int, name: str,
                          kind: Any = None, attributes: Any = None, *args: Any,
                          **kwargs: Any) -> Any:
            asked.append((name, dict(attributes or {})))
            keep = (attributes or {}).get("gen_ai.workflow.name") == "important"
            return SamplingResult(Decision.RECORD_AND_SAMPLE if keep else Decision.DROP,
                                  attributes if keep else None)

        def get_description(self) -> str:
            return "KeepImportant"

    tp = TracerProvider(sampler=ParentBased(root=KeepImportant()))
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    user = tp.get_tracer("app")

    async def traced(message: Message, ctx: Any) -> Message:
        with user.start_as_current_span("user.work"):
            return message

    for name in ("important", "other"):
        await _run_one(create(_node(traced, "a").to(), name=name, tracer_provider=tp),
                       msg(name))
    tp.shutdown()
    assert sorted(s.name for s in exporter.get_finished_spans()) == [
        "invoke_agent a", "invoke_workflow important", "user.work"]
    assert {name for name, _ in asked} <= {"invoke_workflow important", "invoke_workflow other"}


async def test_two_threads_of_a_node_both_nest_their_spans_in_a_sampled_trace(
        exporter: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch) -> None:
    # While one thread of the node was inside the sampler (deciding the trace when
    # it first read the node's context), the other got an unsampled context:
    # ParentBased dropped its span from a sampled trace. A trace is decided as it
    # opens, so a node thread asks the sampler only if the decision of its open
    # trace was forgotten: the table's bound evicting it (65,536 traces open at
    # once), here every decision at once.
    import threading

    from opentelemetry.sdk.trace.sampling import Decision, ParentBased, SamplingResult

    from penguiflow import _tracer

    monkeypatch.setattr(_tracer, "_DECISIONS_MAX", 0)
    released = threading.Event()
    lock = threading.Lock()
    held: list[str] = []

    class HeldInAThread:
        def should_sample(self, parent_context: Any, trace_id: int, name: str,
                          *args: Any, **kwargs: Any) -> Any:
            if threading.current_thread() is not threading.main_thread():
                with lock:
                    first = not held
                    held.append(name)
                if first:
                    released.wait(10)  # the node's other thread reads its context meanwhile
            return SamplingResult(Decision.RECORD_AND_SAMPLE)

        def get_description(self) -> str:
            return "HeldInAThread"

    tp = TracerProvider(sampler=ParentBased(root=HeldInAThread()))
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    user = tp.get_tracer("app")

    def tool(i: int) -> None:
        try:
            with user.start_as_current_span(f"tool{i}"):
                pass
        finally:
            released.set()

    async def threaded(message: Message, ctx: Any) -> Message:
        await asyncio.gather(asyncio.to_thread(tool, 1), asyncio.to_thread(tool, 2))
        return message

    await _run_one(create(_node(threaded, "a").to(), tracer_provider=tp), msg("x"))
    tp.shutdown()
    spans = _by_name(exporter.get_finished_spans())
    assert set(spans) == {"invoke_workflow penguiflow", "invoke_agent a", "tool1", "tool2"}
    node = spans["invoke_agent a"].context.span_id
    assert spans["tool1"].parent.span_id == spans["tool2"].parent.span_id == node
    # Both node threads asked (one while the other was held in the sampler).
    assert held == ["invoke_workflow penguiflow"] * 2


class _LeftOver:
    """A one-node flow on ``tp`` whose node leaves a task running that starts the
    user spans ``names`` once :meth:`release` lets it (after the trace ended)."""

    def __init__(self, tp: TracerProvider, names: list[str]) -> None:
        user = tp.get_tracer("app")
        self._go = asyncio.Event()
        self._later: list[asyncio.Task[None]] = []

        async def after() -> None:
            await self._go.wait()
            for name in names:
                with user.start_as_current_span(name):
                    pass

        async def work(message: Message, ctx: Any) -> Message:
            self._later.append(asyncio.get_running_loop().create_task(after()))
            return message

        self.flow = create(_node(work, "a").to(), tracer_provider=tp)
        tracer = tracer_for(tp)
        assert tracer is not None
        self.tracer = tracer

    async def release(self) -> None:
        self._go.set()
        await within(asyncio.gather(*self._later))


@pytest.mark.parametrize("rate", [0.0, 1.0])
@pytest.mark.parametrize("invocations", ["remembered", "forgotten", "decision forgotten"])
async def test_a_task_the_node_left_running_follows_its_trace_after_it_ended(
        exporter: InMemorySpanExporter, rate: float, invocations: str) -> None:
    # A task the node started and left running (fire and forget) read the node's
    # context first after the trace ended: its decision gone, the context showed
    # "sampled" without asking the sampler, and the task's span was exported, an
    # orphan of a trace the sampler dropped whole.
    from opentelemetry.sdk.trace.sampling import Decision, ParentBased, SamplingResult

    asked: list[str] = []

    class Counted:
        def should_sample(self, parent_context: Any, trace_id: int, name: str,
                          *args: Any, **kwargs: Any) -> Any:
            asked.append(name)
            keep = rate == 1.0
            return SamplingResult(Decision.RECORD_AND_SAMPLE if keep else Decision.DROP)

        def get_description(self) -> str:
            return "Counted"

    tp = TracerProvider(sampler=ParentBased(root=Counted()))
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    left = _LeftOver(tp, ["post-process", "post-process again"])
    flow, tracer = left.flow, left.tracer
    flow.run()
    try:
        await flow.emit(msg("x"))
        await within(flow.fetch())
        assert tracer.model.open_traces() == []
        if invocations != "remembered":
            # As many later invocations as the model remembers would have done.
            tracer.model._invs.clear()
            tracer.model._invs_old.clear()
        if invocations == "decision forgotten":
            tracer._ended.clear()  # as many later traces as it remembers ended
        asked.clear()
        await left.release()
        late_asks, kept = list(asked), len(tracer._decisions)
    finally:
        await flow.stop()
    tp.shutdown()
    spans = _by_name(exporter.get_finished_spans())
    if rate == 0.0:
        assert spans == {}
    else:
        node = spans["invoke_agent a"].context.span_id
        assert spans["post-process"].parent.span_id == node
        assert spans["post-process again"].parent.span_id == node
    # The ended trace's decision is remembered (the last _ENDED_MAX traces): the
    # sampler is not asked again; past that, asked once. Nothing kept either way.
    assert late_asks == (["invoke_workflow"] if invocations == "decision forgotten" else [])
    assert kept == 0


async def test_a_late_span_of_a_trace_kept_for_its_caller_is_exported_under_the_node(
        exporter: InMemorySpanExporter) -> None:
    # A trace adopted under a sampled caller (the A2A server) is kept by ParentBased
    # whatever its root sampler says; a span its node's left-over task started after
    # the trace ended was asked of the root sampler alone, and dropped.
    from opentelemetry.sdk.trace.sampling import Decision, ParentBased, SamplingResult

    class DropRoots:
        def should_sample(self, *args: Any, **kwargs: Any) -> Any:
            return SamplingResult(Decision.DROP)

        def get_description(self) -> str:
            return "DropRoots"

    tp = TracerProvider(sampler=ParentBased(root=DropRoots()))
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    left = _LeftOver(tp, ["post-process"])
    flow = left.flow
    flow.run()
    try:
        m = msg("x")
        await flow.adopt_trace_parent(m.trace_id, parent_span_id="00f067aa0ba902b7",
                                      sampled=True)
        await flow.emit(m)
        await within(flow.fetch())
        assert left.tracer.model.open_traces() == []
        await left.release()
    finally:
        await flow.stop()
    tp.shutdown()
    spans = _by_name(exporter.get_finished_spans())
    assert spans["post-process"].parent.span_id == spans["invoke_agent a"].context.span_id


async def test_links_to_ended_traces_do_not_ask_the_sampler_again_per_hop(
        exporter: InMemorySpanExporter) -> None:
    # Each node behind a new trace id asked the sampler again for its link to the
    # ended upstream trace: a stateful sampler (a budget) was charged per hop.
    from opentelemetry.sdk.trace.sampling import Decision, ParentBased, SamplingResult

    asked: list[int] = []

    class Budget:
        def should_sample(self, parent_context: Any, trace_id: int, *args: Any,
                          **kwargs: Any) -> Any:
            asked.append(trace_id)
            return SamplingResult(Decision.RECORD_AND_SAMPLE)

        def get_description(self) -> str:
            return "Budget"

    tp = TracerProvider(sampler=ParentBased(Budget()))
    tp.add_span_processor(SimpleSpanProcessor(exporter))

    async def split(message: Message, ctx: Any) -> Message:
        return Message(payload="child", headers=message.headers)  # a fresh trace id

    a, b = _node(split, "a"), _node(_noop, "b")
    flow = create(a.to(b), b.to(), tracer_provider=tp)
    flow.run()
    try:
        for _ in range(10):
            await flow.emit(msg("x"))
            await within(flow.fetch())
    finally:
        await flow.stop()
    tp.shutdown()
    # Twice per trace: PenguiFlow's decision as it opens, the SDK's root start.
    assert len(asked) == 2 * 20


async def test_a_link_to_a_dropped_trace_says_it_was_not_sampled(
        exporter: InMemorySpanExporter) -> None:
    # A node behind a new trace id linked to its upstream's span in the dropped
    # (and ended) trace with its own trace's flag: "sampled".
    from opentelemetry.sdk.trace.sampling import ParentBased

    from penguiflow_exporters.otel import PenguiFlowRatioSampler

    dropped, kept = "f" * 32, "0" * 31 + "1"  # top bits: above, below a 0.5 rate
    tp = TracerProvider(sampler=ParentBased(PenguiFlowRatioSampler(0.5)))
    tp.add_span_processor(SimpleSpanProcessor(exporter))

    async def split(message: Message, ctx: Any) -> Message:
        return Message(payload="child", headers=message.headers, trace_id=kept)

    a, b = _node(split, "a"), _node(_noop, "b")
    flow = create(a.to(b), b.to(), tracer_provider=tp)
    tracer = tracer_for(tp)
    assert tracer is not None
    await _run_one(flow, Message(payload="x", headers=Headers(tenant="t"), trace_id=dropped))
    tp.shutdown()
    spans = _by_name(exporter.get_finished_spans())
    assert set(spans) == {"invoke_workflow penguiflow", "invoke_agent b"}
    [link] = spans["invoke_agent b"].links
    assert link.context.trace_id == int(dropped, 16)
    assert not link.context.trace_flags.sampled
    assert len(tracer._decisions) == 0


async def test_linking_to_an_ended_trace_decides_nothing_again(
        exporter: InMemorySpanExporter) -> None:
    # The link of a node behind a new trace id asked for the upstream trace's
    # flag by deciding it again: that trace had ended (its decision forgotten), so
    # one stale decision stayed per handoff, until 65,536 of them evicted the
    # decisions of live traces (their spans then exported under unsampled callers).
    from opentelemetry.sdk.trace.sampling import ParentBased

    from penguiflow_exporters.otel import PenguiFlowRatioSampler

    tp = TracerProvider(sampler=ParentBased(PenguiFlowRatioSampler(1.0)))
    tp.add_span_processor(SimpleSpanProcessor(exporter))

    async def split(message: Message, ctx: Any) -> Message:
        return Message(payload="child", headers=message.headers)  # a fresh trace id

    a, b = _node(split, "a"), _node(_noop, "b")
    flow = create(a.to(b), b.to(), name="f", tracer_provider=tp)
    tracer = tracer_for(tp)
    assert tracer is not None
    flow.run()
    try:
        for i in range(20):
            await flow.emit(msg(i))
            await within(flow.fetch())
        assert tracer.model.open_traces() == []
        assert len(tracer._decisions) == 0
    finally:
        await flow.stop()
    tp.shutdown()
    linked = [s for s in exporter.get_finished_spans() if s.links]
    assert len(linked) == 20
    assert all(link.context.trace_flags.sampled for s in linked for link in s.links)


async def test_a_cancelled_stream_with_its_task_known_is_one_first_chunk_sample(
        provider: TracerProvider, exporter: InMemorySpanExporter, reader: Any) -> None:
    # The node span ends first (node_trace_cancelled) and was measured, its call's
    # CLIENT span still open; the remote cancel's event then ended the CLIENT span,
    # measured again: two samples for one stream (and a node id kept for ever).
    hold = asyncio.Event()

    async def one_then_hold(request: Any) -> Any:
        yield "first"
        await hold.wait()
        yield "never"

    transport = InMemoryTransport({URL: InMemoryAgent(chunks=one_then_hold)})
    remote = RemoteNode(transport=transport, skill="slow", agent_url=URL, name="remote",
                        streaming=True, policy=NodePolicy(validate="none"))
    flow = create(remote.to(), tracer_provider=provider, meter_provider=_meters(reader))
    flow.run()
    m = msg("x")
    try:
        await flow.emit(m)
        task = await within(transport.next_task(URL))
        await within(flow.fetch())  # the first chunk, re-emitted by the RemoteNode
        assert await within(flow.cancel(m.trace_id)) is True
        await within(task.cancel_requested.wait())
    finally:
        await flow.stop()

    spans = _by_name(exporter.get_finished_spans())
    client, node_span = spans["invoke_agent slow"], spans["invoke_agent remote"]
    assert client.attributes["error.type"] == node_span.attributes["error.type"] == "cancelled"
    assert node_span.end_time <= client.end_time
    (ttfc,) = _metric_points(reader)["pf.stream.time_to_first_chunk"]
    assert ttfc.count == 1
    assert ttfc.attributes["gen_ai.agent.name"] == "slow"
    assert ttfc.sum == pytest.approx(client.attributes["gen_ai.response.time_to_first_chunk"])


@pytest.mark.parametrize("upstream_ended", [True, False])
def test_a_new_traces_node_hangs_under_its_root_however_long_its_upstream_ran(
        upstream_ended: bool) -> None:
    # The upstream invocation's trace was looked up among the last 8k-16k
    # invocations *started*: an upstream running long (an LLM call) while more
    # started elsewhere was forgotten, and the downstream span of the new trace
    # named the upstream's span (old trace) as its parent: an orphan there.
    import os
    import uuid

    from penguiflow._spans import SpanModel

    out: list[Any] = []
    model = SpanModel(out.append)
    old, new = uuid.uuid4().hex, uuid.uuid4().hex
    up, down = os.urandom(8).hex(), os.urandom(8).hex()

    def feed(trace_id: str, ts: float, kind: str, name: str, inv: str,
             parents: tuple[str, ...] = ()) -> None:
        model.feed(trace_id, ts, kind, name, name, inv, parents, 0, None, "f", "f1", None, None)

    feed(old, 1.0, "node_start", "slow", up)
    for i in range(17_000):  # other traces' invocations while "slow" runs
        other = os.urandom(8).hex()
        feed(f"other{i % 200}", 1.0, "node_start", "x", other)
        feed(f"other{i % 200}", 1.0, "node_success", "x", other)
    if upstream_ended:
        feed(old, 2.0, "node_success", "slow", up)
        model.end_trace(old, "f1")
    # "slow" answered with a Message of the trace ``new`` (its downstream may start
    # before the upstream's own end is recorded: a full queue).
    feed(new, 3.0, "node_start", "next", down, (up,))
    feed(new, 4.0, "node_success", "next", down, (up,))
    model.end_trace(new, "f1")
    spans = {s.name: s for s in out if s.trace_id == int(new, 16)}
    assert set(spans) == {"invoke_workflow f", "invoke_agent next"}
    node = spans["invoke_agent next"]
    assert node.parent_span_id == spans["invoke_workflow f"].span_id
    (link,) = node.links
    assert (link.trace_id, link.attributes["pf.edge"]) == (int(old, 16), "slow->next")


async def test_a_trace_id_run_again_gets_a_decision_of_its_own(
        exporter: InMemorySpanExporter) -> None:
    # The decisions of ended traces are remembered for their late spans; a trace id
    # run again (no caller this time) read its first run's "unsampled" (that run was
    # adopted under an unsampled caller): its user spans were dropped and the
    # traceparent it sent on said -00.
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    user = tp.get_tracer("app")
    sent: list[str] = []

    async def work(message: Message, ctx: Any) -> Message:
        with user.start_as_current_span(f"user-{message.payload}"):
            headers: dict[str, str] = {}
            inject_trace_headers(headers)
            sent.append(headers.get("traceparent", ""))
        return message

    trace_id = "reused-trace-id-0001"
    for run in ("first", "second"):
        flow = create(_node(work, "a").to(), tracer_provider=tp)
        flow.run()
        try:
            if run == "first":
                await flow.adopt_trace_parent(trace_id, parent_span_id="00f067aa0ba902b7",
                                              sampled=False)
            await flow.emit(Message(payload=run, headers=Headers(tenant="t"),
                                    trace_id=trace_id))
            await within(flow.fetch())
        finally:
            await flow.stop()
    tp.shutdown()
    names = {s.name for s in exporter.get_finished_spans()}
    assert "user-first" not in names and "user-second" in names
    assert sent[0].endswith("-00") and sent[1].endswith("-01")
