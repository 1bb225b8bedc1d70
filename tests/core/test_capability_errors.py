"""Error paths and guarantees, observed through real running flows.

Remote failures and timeouts (§15.3 with the in-memory transport), stream-contract
violations, chunks refused after a cancel (§7.3, §9), zero budgets and past deadlines
(§7.4, §8), routing to names that are not successors (§12, §13), and chunk ordering under
backpressure with a slow consumer (§9).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pfcore_support import Recorder, msg, within

from penguiflow import (
    WM,
    DictRoutingPolicy,
    FinalAnswer,
    FlowError,
    FlowErrorCode,
    Message,
    Node,
    NodePolicy,
    StreamChunk,
    create,
    predicate_router,
)
from penguiflow.core import TraceCancelled
from penguiflow.metrics import FlowEvent
from penguiflow.remote import (
    InMemoryAgent,
    InMemoryTransport,
    RemoteAgentError,
    RemoteCallRequest,
    RemoteCallResult,
    RemoteNode,
    RemoteStreamEvent,
    RemoteTransport,
)

NONE = NodePolicy(validate="none")
URL = "mem://agent"
REMOTE_KINDS = ("remote_call_start", "remote_stream_event", "remote_call_success",
                "remote_call_error", "remote_call_cancelled", "remote_cancel_error")


def remote(transport: Any, *, streaming: bool = True, **policy: Any) -> Node:
    policy.setdefault("validate", "none")
    return RemoteNode(transport=transport, skill="answer", agent_url=URL, name="remote",
                      streaming=streaming, policy=NodePolicy(**policy))


def remote_kinds(recorder: Recorder, trace_id: str) -> list[str]:
    return [k for k in recorder.kinds(trace_id=trace_id) if k in REMOTE_KINDS]


def echo(name: str) -> Node:
    async def fn(message: Any, ctx: Any) -> Any:
        return message

    return Node(fn, name=name, policy=NONE)


async def assert_next_is_probe(flow: Any) -> None:
    """Nothing else is waiting in Rookery: a fresh probe trace is the next item fetched."""
    probe = msg(FinalAnswer(text="probe"))
    await flow.emit(probe)
    item = await within(flow.fetch())
    assert getattr(item, "trace_id", None) == probe.trace_id, item


# -- a remote stream failing part-way -------------------------------------------------------


async def test_remote_stream_failure_delivers_earlier_chunks_then_flow_error(
        start: Any, recorder: Recorder) -> None:
    agent = InMemoryAgent(chunks=["a", "b", "c"], fail_after_chunks=2, fail_with="agent crashed")
    transport = InMemoryTransport({URL: agent})
    flow = start(create(remote(transport).to(), middlewares=[recorder],
                        emit_errors_to_rookery=True))
    m = msg("question")
    await flow.emit(m)

    first = await within(flow.fetch())
    second = await within(flow.fetch())
    assert [(c.payload.text, c.payload.seq) for c in (first, second)] == [("a", 0), ("b", 1)]
    assert all(c.trace_id == m.trace_id and not c.payload.done for c in (first, second))
    err = await within(flow.fetch())
    assert isinstance(err, FlowError)
    assert err.code == FlowErrorCode.NODE_EXCEPTION.value
    assert (err.trace_id, err.node_name) == (m.trace_id, "remote")
    assert isinstance(err.unwrap(), RemoteAgentError)
    assert str(err.unwrap()) == "agent crashed"

    await recorder.wait_for("node_failed", trace_id=m.trace_id)
    # submitted + working status events, then the two chunks; then the error.
    assert remote_kinds(recorder, m.trace_id) == [
        "remote_call_start", *["remote_stream_event"] * 4, "remote_call_error"]
    kinds = recorder.kinds(trace_id=m.trace_id, node="remote")
    assert kinds.index("remote_call_error") < kinds.index("node_error") < kinds.index(
        "node_failed")
    (error,) = recorder.of("remote_call_error", trace_id=m.trace_id)
    (task,) = transport.tasks.values()
    assert error.extra["remote_error"] == repr(err.unwrap())
    assert error.extra["remote_status"] == "error"
    assert error.extra["remote_task_id"] == task.task_id
    assert task.state == "failed"
    await assert_next_is_probe(flow)


async def test_remote_stream_failure_without_rookery_errors_delivers_only_chunks(
        start: Any, recorder: Recorder) -> None:
    transport = InMemoryTransport({URL: InMemoryAgent(chunks=["a", "b"], fail_after_chunks=1)})
    flow = start(create(remote(transport).to(), middlewares=[recorder]))
    m = msg("question")
    await flow.emit(m)
    chunk = await within(flow.fetch())
    assert chunk.payload.text == "a"
    await recorder.wait_for("node_failed", trace_id=m.trace_id)
    assert recorder.of("remote_call_error", trace_id=m.trace_id)
    assert not recorder.of("remote_call_success", trace_id=m.trace_id)
    await assert_next_is_probe(flow)


async def test_failed_remote_call_leaves_no_background_task(start: Any) -> None:
    transport = InMemoryTransport({URL: InMemoryAgent(chunks=["a", "b"], fail_after_chunks=1)})
    flow = start(create(remote(transport).to(), emit_errors_to_rookery=True))
    baseline = asyncio.all_tasks()
    await flow.emit(msg("question"))
    assert (await within(flow.fetch())).payload.text == "a"
    assert isinstance(await within(flow.fetch()), FlowError)
    extra = asyncio.all_tasks() - baseline
    if extra:
        # Short bound: anything legitimate finishes within a few loop iterations.
        _done, lingering = await asyncio.wait(extra, timeout=0.2)
        assert not lingering, lingering


# -- a remote call timing out ---------------------------------------------------------------


async def test_remote_stream_timeout_fails_node_and_cancels_remote_task(
        start: Any, recorder: Recorder) -> None:
    gate = asyncio.Event()  # never set: the agent hangs after "submitted"
    transport = InMemoryTransport({URL: InMemoryAgent(gate=gate, chunks=["never"])})
    flow = start(create(remote(transport, timeout_s=0.05).to(), middlewares=[recorder],
                        emit_errors_to_rookery=True))
    m = msg("question")
    await flow.emit(m)

    err = await within(flow.fetch())
    assert isinstance(err, FlowError)
    assert err.code == FlowErrorCode.NODE_TIMEOUT.value
    assert err.metadata["timeout_s"] == 0.05
    assert isinstance(err.unwrap(), TimeoutError)
    (cancelled,) = await recorder.wait_for("remote_call_cancelled", trace_id=m.trace_id)
    (task,) = transport.tasks.values()
    assert transport.cancels == [(URL, task.task_id)]
    assert cancelled.extra["remote_cancel_reason"] == "local_cancel"
    assert cancelled.extra["remote_status"] == "cancelled"
    assert cancelled.extra["remote_task_id"] == task.task_id
    assert cancelled.extra["remote_context_id"] == task.context_id
    assert task.state == "canceled"
    assert len(recorder.of("node_timeout", trace_id=m.trace_id)) == 1
    assert len(recorder.of("node_failed", trace_id=m.trace_id)) == 1
    kinds = remote_kinds(recorder, m.trace_id)
    assert "remote_call_success" not in kinds and "remote_call_error" not in kinds
    assert kinds.count("remote_call_cancelled") == 1
    assert not gate.is_set()


async def test_each_timed_out_attempt_cancels_its_own_remote_task(
        start: Any, recorder: Recorder) -> None:
    transport = InMemoryTransport({URL: InMemoryAgent(gate=asyncio.Event())})
    node = remote(transport, timeout_s=0.05, max_retries=1, backoff_base=0.0)
    flow = start(create(node.to(), middlewares=[recorder], emit_errors_to_rookery=True))
    m = msg("question")
    await flow.emit(m)
    err = await within(flow.fetch())
    assert err.code == FlowErrorCode.NODE_TIMEOUT.value and err.metadata["attempt"] == 1
    events = await recorder.wait_for("remote_call_cancelled", count=2, trace_id=m.trace_id)
    assert len(transport.tasks) == 2
    assert sorted(transport.cancels) == sorted((URL, t) for t in transport.tasks)
    assert {e.extra["remote_task_id"] for e in events} == set(transport.tasks)
    assert {t.state for t in transport.tasks.values()} == {"canceled"}
    assert len(recorder.of("node_timeout", trace_id=m.trace_id)) == 2


async def test_unary_remote_timeout_is_a_node_timeout(start: Any, recorder: Recorder) -> None:
    # A unary call learns its task id only from the result, so the remote side is only
    # cancelled through the transport coroutine itself being cancelled.
    transport = InMemoryTransport({URL: InMemoryAgent(gate=asyncio.Event())})
    flow = start(create(remote(transport, streaming=False, timeout_s=0.05).to(),
                        middlewares=[recorder], emit_errors_to_rookery=True))
    m = msg("question")
    await flow.emit(m)
    err = await within(flow.fetch())
    assert err.code == FlowErrorCode.NODE_TIMEOUT.value
    await recorder.wait_for("node_failed", trace_id=m.trace_id)
    (task,) = transport.tasks.values()
    assert task.state == "canceled"
    assert "remote_call_success" not in remote_kinds(recorder, m.trace_id)


# -- events after done: every event of a stream counts (spec §15.3) -----------------------


class TalksAfterDone(RemoteTransport):
    """Sends one chunk, a done chunk, then a text chunk and a final result after it."""

    async def send(self, request: RemoteCallRequest) -> RemoteCallResult:
        raise NotImplementedError

    async def stream(self, request: RemoteCallRequest) -> AsyncIterator[RemoteStreamEvent]:
        ids = {"context_id": "c-1", "task_id": "t-1"}
        yield RemoteStreamEvent(text="a", **ids)
        yield RemoteStreamEvent(text="", done=True, result="early", **ids)
        yield RemoteStreamEvent(text="late", **ids)
        yield RemoteStreamEvent(result={"answer": "final"}, **ids)

    async def cancel(self, *, agent_url: str, task_id: str) -> None:
        return None


async def test_events_after_done_are_taken_and_the_last_result_wins(
        start: Any, recorder: Recorder) -> None:
    # A transport may send its final result (or state) after the last chunk: the
    # node iterates the whole stream, as 2.1 code expects, and fails nothing.
    flow = start(create(remote(TalksAfterDone()).to(), middlewares=[recorder],
                        emit_errors_to_rookery=True))
    m = msg("question")
    await flow.emit(m)
    texts: list[tuple[str, bool]] = []
    item = await within(flow.fetch())
    while isinstance(item, Message) and isinstance(item.payload, StreamChunk):
        texts.append((item.payload.text, item.payload.done))
        item = await within(flow.fetch())
    assert texts == [("a", False), ("", True), ("late", False)]
    assert item == {"answer": "final"}
    await recorder.wait_for("node_success", trace_id=m.trace_id)
    assert remote_kinds(recorder, m.trace_id) == [
        "remote_call_start", *["remote_stream_event"] * 4, "remote_call_success"]


# -- chunks after a cancel ----------------------------------------------------------------


async def test_node_emitting_chunks_after_its_trace_was_cancelled_is_refused(
        start: Any, recorder: Recorder) -> None:
    started = asyncio.Event()
    refused: list[BaseException] = []

    async def stubborn(message: Any, ctx: Any) -> Any:
        await ctx.emit_chunk(parent=message, text="before")
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            # The trace is cancelled; try to keep streaming anyway, both ways.
            for emit in (ctx.emit_chunk, ctx.runtime.emit_chunk):
                try:
                    await emit(parent=message, text="after")
                except TraceCancelled as exc:
                    refused.append(exc)
            raise
        return None

    flow = start(create(Node(stubborn, name="stubborn", policy=NONE).to(),
                        middlewares=[recorder]))
    m = msg("go")
    await flow.emit(m)
    before = await within(flow.fetch())
    assert before.payload.text == "before"
    await within(started.wait())
    assert await flow.cancel(m.trace_id) is True
    await recorder.wait_for("node_trace_cancelled", trace_id=m.trace_id)
    assert len(refused) == 2
    assert all(isinstance(e, TraceCancelled) and e.trace_id == m.trace_id for e in refused)
    await assert_next_is_probe(flow)


async def test_flow_emit_chunk_on_a_cancelled_trace_is_refused(start: Any) -> None:
    seen: list[Any] = []

    async def sink(message: Any, ctx: Any) -> Any:
        seen.append(message)
        return message

    flow = start(create(Node(sink, name="sink", policy=NONE).to()))
    parent = msg("p")
    flow.ensure_trace_event(parent.trace_id).set()
    with pytest.raises(TraceCancelled) as info:
        await flow.emit_chunk(parent=parent, text="x")
    assert info.value.trace_id == parent.trace_id
    await assert_next_is_probe(flow)
    assert all(getattr(s, "trace_id", None) != parent.trace_id for s in seen)


async def test_throttled_chunk_producer_is_refused_when_the_trace_is_cancelled(
        start: Any, recorder: Recorder) -> None:
    started = asyncio.Event()
    texts: list[str] = []

    async def slow_sink(message: Any, ctx: Any) -> Any:
        texts.append(message.payload.text)
        started.set()
        await asyncio.Event().wait()  # holds the first chunk until cancelled

    flow = start(create(Node(slow_sink, name="sink", policy=NONE).to(), queue_maxsize=1,
                        middlewares=[recorder]))
    parent = msg("p")
    await flow.emit_chunk(parent=parent, text="0")  # taken by the sink
    await flow.emit_chunk(parent=parent, text="1")  # queued: the trace is now at capacity
    third = asyncio.ensure_future(flow.emit_chunk(parent=parent, text="2"))
    try:
        await within(started.wait())
        assert not third.done()  # throttled: pending - 1 >= queue_maxsize
        assert await flow.cancel(parent.trace_id) is True
        with pytest.raises(TraceCancelled):
            await within(third)
    finally:
        third.cancel()
    await recorder.wait_for("trace_cancel_finish", trace_id=parent.trace_id)
    assert texts == ["0"]


async def test_throttled_chunk_producer_refused_when_cancel_drains_the_trace(
        start: Any, recorder: Recorder) -> None:
    a, b = echo("a"), echo("b")
    flow = start(create(a.to(), b.to(), queue_maxsize=2, middlewares=[recorder]))
    parent = msg("p")
    await flow.emit_chunk(parent=parent, text="0")  # broadcast: one copy per ingress node
    await flow.emit_chunk(parent=parent, text="1")
    third = asyncio.ensure_future(flow.emit_chunk(parent=parent, text="2"))
    try:
        # Both echoes passed both chunks on: four unfetched items wait in Rookery.
        await recorder.wait_for("node_success", count=4, trace_id=parent.trace_id)
        assert not third.done()
        assert await flow.cancel(parent.trace_id) is True
        with pytest.raises(TraceCancelled):
            await within(third)
    finally:
        third.cancel()
    await assert_next_is_probe(flow)


async def test_no_item_of_a_cancelled_trace_reaches_rookery_after_cancel(
        start: Any, recorder: Recorder) -> None:
    flow = start(create(echo("echo").to(), queue_maxsize=1, middlewares=[recorder]))
    first = msg("first")
    await flow.emit(first)  # fills the Rookery floe
    await flow.emit(msg("second", trace_id=first.trace_id))
    # The second invocation started; its result is then blocked on the full Rookery floe
    # (middlewares never suspend, so the worker reaches the put before we resume).
    await recorder.wait_for("node_start", count=2, trace_id=first.trace_id)
    assert await flow.cancel(first.trace_id) is True
    await assert_next_is_probe(flow)


# -- zero budgets and past deadlines ------------------------------------------------------


def controller() -> tuple[Node, list[Any]]:
    calls: list[Any] = []

    async def fn(message: Any, ctx: Any) -> Any:
        calls.append(message)
        return message  # unchanged: the runtime decides whether to loop

    return Node(fn, name="controller", policy=NONE, allow_cycle=True), calls


@pytest.mark.parametrize(("wm", "text"), [
    (WM(query="q", budget_hops=0), "Hop budget exhausted"),
    (WM(query="q", budget_tokens=0), "Token budget exhausted"),
    (WM(query="q", budget_hops=None, budget_tokens=0), "Token budget exhausted"),
])
async def test_zero_budget_answers_once_on_the_first_hop(
        start: Any, recorder: Recorder, wm: WM, text: str) -> None:
    node, calls = controller()
    flow = start(create(node.to(node), middlewares=[recorder]))
    m = msg(wm)
    await flow.emit(m)
    out = await within(flow.fetch())
    assert isinstance(out, Message) and out.trace_id == m.trace_id
    assert out.payload == FinalAnswer(text=text)
    await recorder.wait_for("node_success", trace_id=m.trace_id)
    await assert_next_is_probe(flow)  # delivered exactly once
    assert len(calls) == 2  # the controller ran once for the WM (and once for the probe)
    assert recorder.kinds(trace_id=m.trace_id).count("node_start") == 1
    assert recorder.kinds(trace_id=m.trace_id).count("node_success") == 1


async def test_past_deadline_answers_without_invoking_the_controller(
        start: Any, recorder: Recorder) -> None:
    node, calls = controller()
    flow = start(create(node.to(node), middlewares=[recorder]))
    m = msg(WM(query="q", budget_hops=None), deadline_s=time.time() - 60)
    await flow.emit(m)
    out = await within(flow.fetch())
    assert out.payload == FinalAnswer(text="Deadline exceeded")
    assert (out.trace_id, out.deadline_s) == (m.trace_id, m.deadline_s)
    (skip,) = await recorder.wait_for("deadline_skip", trace_id=m.trace_id)
    assert skip.extra["deadline_s"] == m.deadline_s
    await assert_next_is_probe(flow)
    assert all(c.trace_id != m.trace_id for c in calls)
    assert "node_start" not in recorder.kinds(trace_id=m.trace_id)


# -- routing to something that is not a successor -----------------------------------------


def recording(name: str, seen: list[Any]) -> Node:
    async def fn(message: Any, ctx: Any) -> Any:
        seen.append(message)
        return message

    return Node(fn, name=name, policy=NONE)


async def assert_next_is_probe_through_router(flow: Any, seen: list[Any], failed: Any) -> None:
    # Nothing was half-routed: the good successor never saw the failed message.
    assert all(s.trace_id != failed.trace_id for s in seen)
    await assert_next_is_probe(flow)


@pytest.mark.parametrize("decision", ["ghost", ["good", "ghost"]])
async def test_routing_to_an_unknown_successor_name_fails_the_router(
        start: Any, recorder: Recorder, decision: Any) -> None:
    seen: list[Any] = []
    good = recording("good", seen)
    router = predicate_router("router", lambda _m: decision)
    flow = start(create(router.to(good), good.to(), middlewares=[recorder],
                        emit_errors_to_rookery=True))
    m = msg("x")
    await flow.emit(m)
    err = await within(flow.fetch())
    assert isinstance(err, FlowError)
    assert (err.code, err.node_name, err.trace_id) == (
        FlowErrorCode.NODE_EXCEPTION.value, "router", m.trace_id)
    exc = err.unwrap()
    assert isinstance(exc, KeyError) and exc.args == ("No successor named 'ghost'",)
    (failed,) = await recorder.wait_for("node_failed", trace_id=m.trace_id, node="router")
    assert "No successor named 'ghost'" in failed.extra["flow_error"]["message"]
    await assert_next_is_probe_through_router(flow, seen, m)


async def test_dict_policy_naming_a_non_successor_fails_clearly(
        start: Any, recorder: Recorder) -> None:
    seen: list[Any] = []
    good = recording("good", seen)
    m = msg("x")
    policy = DictRoutingPolicy({m.trace_id: "elsewhere"}, default="good")
    router = predicate_router("router", lambda _m: "good", policy=policy)
    flow = start(create(router.to(good), good.to(), middlewares=[recorder],
                        emit_errors_to_rookery=True))
    await flow.emit(m)
    err = await within(flow.fetch())
    assert isinstance(err, FlowError) and err.node_name == "router"
    exc = err.unwrap()
    assert isinstance(exc, KeyError) and exc.args == ("No successor named 'elsewhere'",)
    await assert_next_is_probe_through_router(flow, seen, m)


async def test_dict_policy_returning_a_node_that_is_not_a_successor_fails_clearly(
        start: Any, recorder: Recorder) -> None:
    seen: list[Any] = []
    good = recording("good", seen)
    stranger = recording("stranger", seen)  # in the flow, but not after the router
    m = msg("x")
    router = predicate_router("router", lambda _m: "good",
                              policy=DictRoutingPolicy({m.trace_id: stranger}, default=good))
    flow = start(create(router.to(good), good.to(), stranger.to(), middlewares=[recorder],
                        emit_errors_to_rookery=True))
    await flow.emit(m, to=router)
    err = await within(flow.fetch())
    assert isinstance(err, FlowError) and err.node_name == "router"
    exc = err.unwrap()
    assert isinstance(exc, KeyError) and "stranger" in str(exc)
    assert all(s.trace_id != m.trace_id for s in seen)
    probe = msg(FinalAnswer(text="probe"))
    await flow.emit(probe, to=router)
    assert (await within(flow.fetch())).trace_id == probe.trace_id


# -- backpressure: a slow consumer neither loses nor reorders chunks ----------------------


class PendingWatch:
    """Middleware: the highest ``trace_pending`` seen, and the relay's completions."""

    def __init__(self) -> None:
        self.max_pending = 0
        self.relayed = 0
        self._changed = asyncio.Event()

    async def __call__(self, event: FlowEvent) -> None:
        if event.trace_pending is not None:
            self.max_pending = max(self.max_pending, event.trace_pending)
        if event.event_type == "node_success" and event.node_name == "relay":
            self.relayed += 1
            self._changed.set()

    async def relayed_at_least(self, n: int) -> None:
        async def _wait() -> None:
            while self.relayed < n:
                self._changed.clear()
                await self._changed.wait()

        await within(_wait())


async def test_slow_consumer_gets_every_chunk_in_order_and_throttles_the_producer(
        start: Any) -> None:
    maxsize, total = 2, 200
    produced: list[int] = []

    async def producer(message: Any, ctx: Any) -> Any:
        for i in range(total):
            chunk = await ctx.emit_chunk(parent=message, text=f"t{i}", done=i == total - 1)
            produced.append(chunk.seq)
        return None

    async def relay(message: Any, ctx: Any) -> Any:
        return message

    watch = PendingWatch()
    source = Node(producer, name="producer", policy=NONE)
    middle = Node(relay, name="relay", policy=NONE)
    flow = start(create(source.to(middle), middle.to(), queue_maxsize=maxsize,
                        middlewares=[watch]))
    m = msg("go")
    await flow.emit(m)

    async def consume() -> list[StreamChunk]:
        chunks: list[StreamChunk] = []
        while len(chunks) < total:
            # Slow consumer: before each fetch, let the flow fill Rookery's floe completely.
            await watch.relayed_at_least(min(len(chunks) + maxsize, total))
            # Throttled: the producer never runs more than ~maxsize chunks ahead of the
            # consumer (an unthrottled producer gets maxsize + 3 ahead through the floes).
            assert len(produced) <= len(chunks) + maxsize + 1, (len(produced), len(chunks))
            item = await flow.fetch()
            assert item.trace_id == m.trace_id
            chunks.append(item.payload)
        return chunks

    chunks = await within(consume(), 10.0)
    assert [c.seq for c in chunks] == list(range(total))
    assert [c.text for c in chunks] == [f"t{i}" for i in range(total)]
    assert [c.done for c in chunks] == [False] * (total - 1) + [True]
    assert produced == list(range(total))
    assert maxsize <= watch.max_pending <= maxsize + 3
    await assert_next_is_probe(flow)
