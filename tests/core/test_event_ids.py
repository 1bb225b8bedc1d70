"""The event model's ids: enough to rebuild a trace from its events alone."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from pfcore_support import Recorder, msg, within

from penguiflow import Node, NodePolicy, create
from penguiflow._ids import root_span_id
from penguiflow.state import StoredEvent


def node(name: str, func: Any = None, **policy: Any) -> Node:
    async def passthrough(message: Any, ctx: Any) -> Any:
        return message

    return Node(func or passthrough, name=name,
                policy=NodePolicy(validate="none", **policy))


async def test_a_chain_records_who_consumed_whose_output(start: Any, recorder: Recorder) -> None:
    a, b, c = node("a"), node("b"), node("c")
    flow = start(create(a.to(b), b.to(c), c.to(), middlewares=[recorder]))
    message = msg("x")
    await flow.emit(message)
    await within(flow.fetch())
    starts = {e.node_name: e for e in recorder.of("node_start")}
    inv = {name: ev.invocation_id for name, ev in starts.items()}
    assert len(set(inv.values())) == 3 and all(len(i) == 16 for i in inv.values())
    assert starts["a"].parent_invocation_ids == ()
    assert starts["b"].parent_invocation_ids == (inv["a"],)
    assert starts["c"].parent_invocation_ids == (inv["b"],)
    root = root_span_id(message.trace_id)
    assert starts["a"].span_id == inv["a"] and starts["a"].parent_span_id == root
    assert starts["c"].parent_span_id == inv["b"]
    for ev in recorder.of("node_start"):
        assert ev.queued_ts is not None and ev.queued_ts <= ev.ts
        assert ev.flow_name == "penguiflow"
    successes = {e.node_name: e for e in recorder.of("node_success")}
    assert {n: e.invocation_id for n, e in successes.items()} == inv
    seqs = [e.seq for e in recorder.events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


async def test_retries_share_the_invocation_and_number_their_attempts(
    start: Any, recorder: Recorder,
) -> None:
    calls = 0

    async def flaky(message: Any, ctx: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise ValueError("not yet")
        return message

    flow = start(create(node("flaky", flaky, max_retries=2, backoff_base=0.001).to(),
                        middlewares=[recorder], name="retrying"))
    await flow.emit(msg(1))
    await within(flow.fetch())
    events = recorder.of(trace_id=recorder.events[0].trace_id)
    assert [e.event_type for e in events] == [
        "node_start", "node_error", "node_retry", "node_start", "node_error", "node_retry",
        "node_start", "node_success",
    ]
    assert {e.invocation_id for e in events} == {events[0].invocation_id}
    assert [e.attempt for e in events if e.event_type == "node_start"] == [0, 1, 2]
    assert {e.flow_name for e in events} == {"retrying"}


async def test_trace_level_events_belong_to_the_root_span(start: Any, recorder: Recorder) -> None:
    import asyncio

    entered = asyncio.Event()

    async def blocking(message: Any, ctx: Any) -> Any:
        entered.set()
        await asyncio.Event().wait()

    flow = start(create(node("slow", blocking).to(), middlewares=[recorder]))
    message = msg(1)
    await flow.emit(message)
    await within(entered.wait())
    assert await flow.cancel(message.trace_id)
    await recorder.wait_for("trace_cancel_finish")
    root = root_span_id(message.trace_id)
    (cancel_start,) = recorder.of("trace_cancel_start")
    assert cancel_start.span_id == root and cancel_start.invocation_id is None
    (interrupted,) = recorder.of("node_trace_cancelled")
    assert interrupted.invocation_id == recorder.of("node_start")[0].invocation_id


async def test_stored_events_carry_the_ids(start: Any) -> None:
    saved: list[StoredEvent] = []

    class Store:
        async def save_event(self, event: StoredEvent) -> None:
            saved.append(event)

        async def load_history(self, trace_id: str) -> list[StoredEvent]:
            return [e for e in saved if e.trace_id == trace_id]

        async def save_remote_binding(self, binding: Any) -> None:
            return None

    a, b = node("a"), node("b")
    flow = start(create(a.to(b), b.to(), state_store=Store()))
    message = msg("x")
    await flow.emit(message)
    await within(flow.fetch())
    history = await flow.load_history(message.trace_id)
    assert [e.kind for e in history] == ["node_start", "node_success"] * 2
    first_b = history[2]
    assert first_b.node_name == "b"
    assert first_b.parent_invocation_ids == (history[0].invocation_id,)
    assert first_b.span_id == first_b.invocation_id
    assert "invocation_id" not in first_b.payload  # the 2.1 payload is unchanged


async def test_unobserved_flows_build_no_events(start: Any, caplog: pytest.LogCaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from penguiflow._runtime import FlowRuntime

    built: list[str] = []
    original = FlowRuntime.record  # every event of a flow is built here

    def spy(self: Any, kind: str, *args: Any) -> Any:
        built.append(kind)
        return original(self, kind, *args)

    monkeypatch.setattr(FlowRuntime, "record", spy)
    caplog.set_level(logging.WARNING, logger="penguiflow.core")
    flow = start(create(node("a").to()))
    await flow.emit(msg(1))
    await within(flow.fetch())
    assert built == []
    caplog.set_level(logging.DEBUG, logger="penguiflow.core")
    await flow.emit(msg(2))
    await within(flow.fetch())
    assert built == ["node_start", "node_success"]
    assert [r.event for r in caplog.records] == ["node_start", "node_success"]
    assert caplog.records[0].trace_id == caplog.records[1].trace_id


async def test_a_failing_middleware_is_counted_and_the_flow_completes(start: Any) -> None:
    async def broken(event: Any) -> None:
        raise RuntimeError("observer bug")

    flow = start(create(node("a").to(), middlewares=[broken]))
    await flow.emit(msg(1))
    assert (await within(flow.fetch())).payload == 1
    assert flow.observer_failures == {"middleware_error": 2}


def test_invocation_ids_stay_valid_and_distinct_across_pool_refills() -> None:
    from penguiflow import _ids

    ids = [_ids.new_invocation_id() for _ in range(3 * _ids._BATCH + 7)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 16 and set(i) <= set("0123456789abcdef") and i != "0" * 16
               for i in ids)


def test_a_forked_process_hands_out_other_ids_than_its_parent() -> None:
    import multiprocessing

    from penguiflow import _ids

    _ids.new_invocation_id()  # the pool now holds ids the parent will hand out
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        child = pool.apply(_ids_of_a_child)
    parent = [_ids.new_invocation_id() for _ in range(100)]
    assert not set(child) & set(parent)


def _ids_of_a_child() -> list[str]:
    from penguiflow._ids import new_invocation_id

    return [new_invocation_id() for _ in range(100)]


def test_a_root_span_id_is_the_same_in_every_version_and_thread() -> None:
    """Stored events and exported spans of earlier runs name root spans by this
    derivation: it must never change (values computed by the first release's code),
    and the shared keyed-up hasher must not leak one call's input into another's."""
    import concurrent.futures

    known = {"trace-1": "92490ee17f6752c2", "": "60ed33a27d070051",
             "\ud800x": "7c7a57c0896c1cd7", "\u00e9" * 3: "7c1ae9359df74613"}
    assert {t: root_span_id(t) for t in known} == known
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(root_span_id, list(known) * 500))
    assert results == list(known.values()) * 500
