"""A real flow traced through configure_tracing: over the wire, and with the collector down.

The runtime's live spans go through the real OTLP/HTTP exporter to the receiver on
127.0.0.1; their ids must be the ones the StateStore recorded. A collector that is
down or stalls must not slow or break the flow.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from opentelemetry import trace
from otlp_receiver import OTLPReceiver, down_url

from penguiflow import Headers, Message, Node, NodePolicy, create
from penguiflow.state import InMemoryStateStore
from penguiflow.tracing import root_span_id
from penguiflow_exporters.otel import configure_tracing


async def _double(msg: Message, ctx: Any) -> Message:
    return msg.model_copy(update={"payload": msg.payload * 2})


def _chain(**kwargs: Any) -> Any:
    a = Node(_double, name="a", policy=NodePolicy(validate="none"))
    b = Node(_double, name="b", policy=NodePolicy(validate="none"))
    return create(a.to(b), b.to(), name="wire", **kwargs)


async def _pump(flow: Any, count: int) -> list[Message]:
    messages = [Message(payload=i, headers=Headers(tenant="t")) for i in range(count)]
    flow.run()

    async def produce() -> None:
        for m in messages:
            await flow.emit(m)

    async def consume() -> list[Message]:
        return [await flow.fetch() for _ in messages]

    try:
        # Together: the floes hold fewer items than `count`, so emit waits for fetch.
        _, out = await asyncio.wait_for(asyncio.gather(produce(), consume()), 30)
    finally:
        await flow.stop()
    assert sorted(o.payload for o in out) == [4 * i for i in range(count)]
    return messages


async def test_live_spans_of_a_flow_arrive_with_the_stored_ids(
        otlp_receiver: OTLPReceiver) -> None:
    store = InMemoryStateStore()
    with configure_tracing("wire-test", endpoint=otlp_receiver.url, set_global=False,
                           metrics=False) as telemetry:
        (m,) = await _pump(_chain(state_store=store,
                                  tracer_provider=telemetry.tracer_provider), 1)
        assert telemetry.force_flush(5.0)
    spans = otlp_receiver.wait_for_spans(3)
    by_name = {s.span.name: s for s in spans}
    assert set(by_name) == {"invoke_workflow wire", "invoke_agent a", "invoke_agent b"}
    assert {f"{s.trace_id:032x}" for s in spans} == {m.trace_id}
    root = by_name["invoke_workflow wire"]
    assert f"{root.span_id:016x}" == root_span_id(m.trace_id)
    assert root.resource["service.name"] == "wire-test"
    history = await store.load_history(m.trace_id)
    stored = {e.node_name: e.invocation_id for e in history if e.kind == "node_start"}
    assert f"{by_name['invoke_agent a'].span_id:016x}" == stored["a"]
    assert f"{by_name['invoke_agent b'].span_id:016x}" == stored["b"]
    assert by_name["invoke_agent b"].parent_span_id == by_name["invoke_agent a"].span_id


async def test_with_configure_tracing_set_globally_user_spans_arrive_under_their_node(
        otlp_receiver: OTLPReceiver, otel_globals: None) -> None:
    async def work(msg: Message, ctx: Any) -> Message:
        # The application's own instrumentation, through the global API.
        with trace.get_tracer("app").start_as_current_span("app.lookup"):
            return await _double(msg, ctx)

    store = InMemoryStateStore()
    with configure_tracing("wire-user", endpoint=otlp_receiver.url,
                           metrics=False) as telemetry:
        a = Node(work, name="a", policy=NodePolicy(validate="none"))
        b = Node(_double, name="b", policy=NodePolicy(validate="none"))
        # No tracer_provider: the flow finds the global one configure_tracing set.
        (m,) = await _pump(create(a.to(b), b.to(), name="wire", state_store=store), 1)
        assert telemetry.force_flush(5.0)
    spans = otlp_receiver.wait_for_spans(4)
    by_name = {s.span.name: s for s in spans}
    assert set(by_name) == {"invoke_workflow wire", "invoke_agent a", "invoke_agent b",
                            "app.lookup"}
    # One trace, the message's; the user's span is a child of the node it ran in.
    assert {f"{s.trace_id:032x}" for s in spans} == {m.trace_id}
    assert by_name["app.lookup"].parent_span_id == by_name["invoke_agent a"].span_id
    assert by_name["app.lookup"].scope_name == "app"
    history = await store.load_history(m.trace_id)
    received = {s.span_id for s in spans}
    for event in history:
        assert int(event.span_id, 16) in received
        assert event.parent_span_id is None or int(event.parent_span_id, 16) in received


async def test_a_collector_that_is_down_or_stalls_does_not_slow_the_flow(
        otlp_receiver: OTLPReceiver) -> None:
    count = 300

    async def timed(endpoint: str | None) -> float:
        if endpoint is None:
            started = time.perf_counter()
            await _pump(_chain(), count)
            return time.perf_counter() - started
        telemetry = configure_tracing("down-test", endpoint=endpoint, set_global=False,
                                      metrics=False, export_timeout_s=0.5)
        try:
            started = time.perf_counter()
            await _pump(_chain(tracer_provider=telemetry.tracer_provider), count)
            return time.perf_counter() - started
        finally:
            shut = time.perf_counter()
            telemetry.shutdown(timeout_s=1.0)
            assert time.perf_counter() - shut < 2.0  # bounded, whatever the collector does

    healthy = await timed(otlp_receiver.url)
    down = await timed(down_url())
    otlp_receiver.mode = "stall"
    try:
        stalled = await timed(otlp_receiver.url)
    finally:
        otlp_receiver.release()
    # Exports run on the batch processor's thread: the flow itself never waits on
    # the network. Generous bound (shared CI machines), far below a 0.5 s timeout
    # per batch that a flow blocked on exports would pay.
    assert down < healthy * 3 + 0.5
    assert stalled < healthy * 3 + 0.5
