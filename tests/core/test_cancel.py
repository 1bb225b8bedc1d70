"""§7.3 per-trace cancellation."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pfcore_support import Recorder, msg, within

from penguiflow import Node, NodePolicy, create
from penguiflow.core import TraceCancelled

NONE = NodePolicy(validate="none")


class Blocker:
    """A node body that blocks on messages whose payload is ``"block"``."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.gate = asyncio.Event()
        self.seen: list[Any] = []

    async def __call__(self, message: Any, ctx: Any) -> Any:
        self.seen.append(message)
        if getattr(message, "payload", message) == "block":
            self.started.set()
            try:
                await self.gate.wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        return message


def blocking_node(name: str = "worker", **policy: Any) -> tuple[Node, Blocker]:
    body = Blocker()

    async def fn(message: Any, ctx: Any) -> Any:
        return await body(message, ctx)

    policy.setdefault("validate", "none")
    return Node(fn, name=name, policy=NodePolicy(**policy)), body


def test_trace_cancelled_exception() -> None:
    exc = TraceCancelled("abc")
    assert isinstance(exc, Exception)
    assert exc.trace_id == "abc"
    assert str(exc) == "trace cancelled: abc"


async def test_cancel_requires_a_running_flow() -> None:
    node, _ = blocking_node()
    flow = create(node.to())
    with pytest.raises(RuntimeError) as info:
        await flow.cancel("t")
    assert str(info.value) == "PenguiFlow is not running"


async def test_cancel_unknown_trace_returns_false(start: Any, recorder: Recorder) -> None:
    node, _ = blocking_node()
    flow = start(create(node.to(), middlewares=[recorder]))
    assert await flow.cancel("no-such-trace") is False
    assert recorder.of("trace_cancel_start") == []


async def test_cancel_in_flight_invocation(start: Any, recorder: Recorder) -> None:
    node, body = blocking_node(max_retries=3, backoff_base=0.001)
    flow = start(create(node.to(), emit_errors_to_rookery=True, middlewares=[recorder]))
    m = msg("block")
    await flow.emit(m)
    await within(body.started.wait())
    event = flow.ensure_trace_event(m.trace_id)
    assert not event.is_set()

    assert await within(flow.cancel(m.trace_id)) is True
    assert event.is_set()
    await within(body.cancelled.wait())  # the user coroutine sees CancelledError

    (begin,) = await recorder.wait_for("trace_cancel_start", trace_id=m.trace_id)
    assert begin.node_name == "OpenSea"
    assert begin.extra["pending"] >= 1
    assert begin.trace_pending >= 1
    assert begin.trace_inflight >= 1
    assert begin.trace_cancelled is True
    assert begin.outgoing_edges == 1
    payload = begin.to_payload()
    assert payload["outgoing"] == 1
    assert payload["trace_cancelled"] is True

    (finish,) = await recorder.wait_for("trace_cancel_finish", trace_id=m.trace_id)
    assert finish.node_name == "Rookery"
    assert finish.trace_pending == 0
    assert finish.trace_inflight == 0
    assert finish.trace_cancelled is False

    kinds = recorder.kinds(trace_id=m.trace_id)
    assert "node_trace_cancelled" in kinds
    assert kinds.count("node_start") == 1  # never retried
    assert "node_retry" not in kinds
    assert "node_failed" not in kinds
    assert kinds.index("trace_cancel_start") < kinds.index("trace_cancel_finish")
    assert len(body.seen) == 1

    # Nothing of the cancelled trace reaches Rookery: the next item is another trace's.
    other = msg("after")
    await flow.emit(other)
    assert await within(flow.fetch()) is other
    # The trace is finished: cancelling again reports False.
    assert await flow.cancel(m.trace_id) is False


async def test_cancel_is_idempotent(start: Any, recorder: Recorder) -> None:
    node, body = blocking_node()
    flow = start(create(node.to(), middlewares=[recorder]))
    m = msg("block")
    await flow.emit(m)
    await within(body.started.wait())
    first = await within(flow.cancel(m.trace_id))
    second = await within(flow.cancel(m.trace_id))
    assert first is True
    assert second in (True, False)
    await recorder.wait_for("trace_cancel_finish", trace_id=m.trace_id)
    assert len(recorder.of("trace_cancel_start", trace_id=m.trace_id)) == 1
    assert len(recorder.of("trace_cancel_finish", trace_id=m.trace_id)) == 1
    assert await flow.cancel(m.trace_id) is False


async def test_cancel_removes_queued_messages_and_spares_other_traces(
    start: Any, recorder: Recorder
) -> None:
    node, body = blocking_node()
    flow = start(create(node.to(), middlewares=[recorder]))
    doomed = msg("block")
    doomed_follow_up = doomed.model_copy(update={"payload": "follow-up"})
    survivor = msg("survivor")
    await flow.emit(doomed)
    await within(body.started.wait())
    await flow.emit(doomed_follow_up)  # queued behind the blocked invocation
    await flow.emit(survivor)

    assert await within(flow.cancel(doomed.trace_id)) is True
    assert await within(flow.fetch()) is survivor
    await recorder.wait_for("trace_cancel_finish", trace_id=doomed.trace_id)
    (begin,) = recorder.of("trace_cancel_start", trace_id=doomed.trace_id)
    assert begin.extra["pending"] == 2
    # The queued follow-up was removed, never dequeued.
    assert [getattr(s, "payload", s) for s in body.seen] == ["block", "survivor"]
    assert recorder.of("trace_cancel_drop", trace_id=doomed.trace_id) == []
    assert recorder.kinds(trace_id=survivor.trace_id) == ["node_start", "node_success"]


async def test_queue_depths_after_a_cancel_are_the_live_ones(
    start: Any, recorder: Recorder
) -> None:
    # Removing a cancelled trace's items gave the queue a new deque while contexts
    # read depths from the old one: every later event, of any trace, said 5 for ever.
    node, body = blocking_node()
    flow = start(create(node.to(), middlewares=[recorder]))
    blocker, later = msg("block"), msg("later")
    await flow.emit(blocker)
    await within(body.started.wait())
    doomed = msg("doomed")
    for i in range(5):
        await flow.emit(doomed.model_copy(update={"payload": i}))
    assert await within(flow.cancel(doomed.trace_id)) is True
    body.gate.set()
    assert await within(flow.fetch()) is blocker
    await flow.emit(later)
    assert await within(flow.fetch()) is later
    (started,) = recorder.of("node_start", trace_id=later.trace_id)
    assert started.queue_depth_in == 0 == flow.context(node).queue_depth_in()


async def test_cancel_removes_undelivered_results_from_rookery(
    start: Any, recorder: Recorder
) -> None:
    async def fn(message: Any, ctx: Any) -> Any:
        return message

    flow = start(create(Node(fn, name="echo", policy=NONE).to(), middlewares=[recorder]))
    m = msg("x")
    await flow.emit(m)
    await recorder.wait_for("node_success", trace_id=m.trace_id)
    assert await within(flow.cancel(m.trace_id)) is True
    await recorder.wait_for("trace_cancel_finish", trace_id=m.trace_id)
    other = msg("y")
    await flow.emit(other)
    assert await within(flow.fetch()) is other


async def test_dequeued_message_of_cancelled_trace_is_dropped(
    start: Any, recorder: Recorder
) -> None:
    """A message of a trace that is still draining is dropped when a worker dequeues it."""
    holding = asyncio.Event()
    release = asyncio.Event()

    async def stubborn(message: Any, ctx: Any) -> Any:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            # Finish slowly so that the trace stays pending for a while.
            holding.set()
            await release.wait()
            raise

    other_calls: list[Any] = []

    async def other(message: Any, ctx: Any) -> Any:
        other_calls.append(message)
        return message

    slow = Node(stubborn, name="slow", policy=NONE)
    idle = Node(other, name="idle", policy=NONE)
    flow = start(create(slow.to(), idle.to(), middlewares=[recorder]))
    m = msg("x")
    await flow.emit(m, to=slow)
    await recorder.wait_for("node_start", trace_id=m.trace_id, node="slow")

    cancel_task = asyncio.ensure_future(flow.cancel(m.trace_id))
    await within(holding.wait())
    late = m.model_copy(update={"payload": "late"})
    await flow.emit(late, to=idle)
    (drop,) = await recorder.wait_for("trace_cancel_drop", trace_id=m.trace_id)
    assert drop.node_name == "idle"
    assert other_calls == []
    release.set()
    assert await within(cancel_task) is True
    await recorder.wait_for("trace_cancel_finish", trace_id=m.trace_id)
    assert len(recorder.of("trace_cancel_finish", trace_id=m.trace_id)) == 1


async def test_ensure_trace_event_is_stable(start: Any) -> None:
    node, _ = blocking_node()
    flow = start(create(node.to()))
    event = flow.ensure_trace_event("t1")
    assert isinstance(event, asyncio.Event)
    assert flow.ensure_trace_event("t1") is event
    assert flow.ensure_trace_event("t2") is not event


async def test_register_external_task_for_none_trace_is_a_no_op(start: Any) -> None:
    node, _ = blocking_node()
    flow = start(create(node.to()))
    task = asyncio.ensure_future(asyncio.Event().wait())
    flow.register_external_task(None, task)
    await within(flow.stop())
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_finished_external_task_is_forgotten(start: Any) -> None:
    node, _ = blocking_node()
    flow = start(create(node.to()))
    done_task = asyncio.ensure_future(asyncio.sleep(0, result="ok"))
    flow.register_external_task("t", done_task)
    assert await within(done_task) == "ok"
    await within(flow.stop())
    assert done_task.result() == "ok"


async def test_cancel_during_retry_backoff_stops_retrying(start: Any, recorder: Recorder) -> None:
    async def failing(message: Any, ctx: Any) -> Any:
        raise RuntimeError("again")

    policy = NodePolicy(validate="none", max_retries=5, backoff_base=30.0)
    flow = start(create(Node(failing, name="f", policy=policy).to(), middlewares=[recorder]))
    m = msg("x")
    await flow.emit(m)
    await recorder.wait_for("node_retry", trace_id=m.trace_id)
    assert await within(flow.cancel(m.trace_id)) is True
    await recorder.wait_for("trace_cancel_finish", trace_id=m.trace_id)
    kinds = recorder.kinds(trace_id=m.trace_id)
    assert kinds.count("node_start") == 1
    assert "node_failed" not in kinds



async def test_a_cancelled_trace_leaves_nothing_in_a_join(start: Any, recorder: Recorder) -> None:
    from penguiflow import Message
    from penguiflow.patterns import join_k

    async def fan_body(message: Any, ctx: Any) -> Any:
        return message

    async def fast_body(message: Any, ctx: Any) -> Any:
        return message.model_copy(update={"payload": f"{message.payload}:fast"})

    fan = Node(fan_body, name="fan", policy=NONE)
    fast = Node(fast_body, name="fast", policy=NONE)
    slow, body = blocking_node("slow")
    join = join_k("join", 2)
    flow = start(create(fan.to(fast, slow), fast.to(join), slow.to(join), join.to(),
                        middlewares=[recorder]))
    first = msg("block")
    await flow.emit(first)
    await within(body.started.wait())
    # The fast branch reached the join, which holds it waiting for the slow one.
    await recorder.wait_for("node_success", trace_id=first.trace_id, node="join")
    assert await within(flow.cancel(first.trace_id)) is True
    await recorder.wait_for("trace_cancel_finish", trace_id=first.trace_id)

    # The same trace id again (a client retrying it): joined from this run alone.
    again = Message(payload="go", headers=first.headers, trace_id=first.trace_id)
    await flow.emit(again)
    out = await within(flow.fetch())
    assert sorted(out.payload) == ["go", "go:fast"]


async def test_a_cancel_while_node_start_is_recorded_keeps_the_node_from_running(
        start: Any, recorder: Recorder) -> None:
    """The worker has dequeued the message and awaits a slow observer on node_start:
    the cancel finds nothing to interrupt, and the node must still never run."""
    in_start = asyncio.Event()
    go_on = asyncio.Event()

    async def slow_observer(event: Any) -> None:
        if event.event_type == "node_start":
            in_start.set()
            await go_on.wait()

    ran: list[Any] = []

    async def body(message: Any, ctx: Any) -> Any:
        ran.append(message)
        return message

    flow = start(create(Node(body, name="n", policy=NONE).to(),
                        middlewares=[slow_observer, recorder]))
    m = msg("x")
    await flow.emit(m)
    await within(in_start.wait())
    assert await within(flow.cancel(m.trace_id)) is True
    go_on.set()
    await recorder.wait_for("trace_cancel_finish", trace_id=m.trace_id)
    (cancelled,) = recorder.of("node_trace_cancelled", trace_id=m.trace_id)
    assert cancelled.node_name == "n"
    assert ran == []  # before: the node ran, and its result reached Rookery
    assert not recorder.of("node_success", trace_id=m.trace_id)


async def test_fetch_returns_at_once_while_a_slow_observer_records_the_cancel_finish(
        start: Any, recorder: Recorder) -> None:
    """Fetching the last item of a cancelled trace finishes the cancel; a slow
    observer of trace_cancel_finish must not hold the fetch (a caller's timeout
    there lost the item, which had left Rookery already, and the finish event)."""
    gate = asyncio.Event()

    async def slow_observer(event: Any) -> None:
        if event.event_type == "trace_cancel_finish":
            await gate.wait()

    async def body(message: Any, ctx: Any) -> Any:
        return message

    flow = start(create(Node(body, name="n", policy=NONE).to(),
                        middlewares=[slow_observer, recorder]))
    m = msg("x")
    await flow.emit(m)
    await recorder.wait_for("node_success", trace_id=m.trace_id)
    # The trace is cancelled by its event (as a remote peer does), its result kept.
    flow.ensure_trace_event(m.trace_id).set()
    item = await within(flow.fetch())
    assert item.payload == "x"
    assert not recorder.of("trace_cancel_finish", trace_id=m.trace_id)
    gate.set()
    await recorder.wait_for("trace_cancel_finish", trace_id=m.trace_id)


async def test_a_stray_cancelled_error_fails_the_invocation_unretried_not_the_worker(
        start: Any, recorder: Recorder) -> None:
    """A node awaiting a task something else cancelled sees CancelledError that
    neither stop() nor a trace cancel sent: its invocation fails, without the
    retries its policy allows (CancelledError is never retried); the worker goes on."""
    calls: list[Any] = []

    async def body(message: Any, ctx: Any) -> Any:
        calls.append(message.payload)
        if message.payload == "bad":
            child = asyncio.ensure_future(asyncio.Event().wait())
            await asyncio.sleep(0)
            child.cancel()
            await child  # CancelledError, this task's cancelling() == 0
        return message

    policy = NodePolicy(validate="none", max_retries=2, backoff_base=0.001)
    flow = start(create(Node(body, name="n", policy=policy).to(),
                        middlewares=[recorder], emit_errors_to_rookery=True))
    bad, good = msg("bad"), msg("good")
    await flow.emit(bad)
    failure = await within(flow.fetch())
    assert failure.trace_id == bad.trace_id and "raised CancelledError" in failure.message
    assert failure.exception_type == "RuntimeError"  # no private class leaks out
    (failed,) = await recorder.wait_for("node_failed", trace_id=bad.trace_id)
    assert failed.node_name == "n"
    assert not recorder.of("node_retry", trace_id=bad.trace_id) and calls == ["bad"]
    await flow.emit(good)  # before: the worker had ended, and this waited for ever
    assert (await within(flow.fetch())).payload == "good"


async def test_a_cancel_after_a_restart_finishes_only_once_the_trace_drains(
        start: Any, recorder: Recorder) -> None:
    """stop() leaves a queued message of a trace; after run() again, that trace's
    count must include it, or a cancel finishes while the trace still runs."""
    first, third = asyncio.Event(), asyncio.Event()

    async def body(message: Any, ctx: Any) -> Any:
        if message.payload == 1:
            first.set()
            await asyncio.Event().wait()  # cut by stop()
        if message.payload == 3:
            third.set()
            await asyncio.Event().wait()  # cut by the cancel
        return message

    flow = start(create(Node(body, name="a", policy=NONE).to(), middlewares=[recorder]))
    one = msg(1)
    await flow.emit(one)
    await within(first.wait())
    await flow.emit(one.model_copy(update={"payload": 2}))  # stays queued
    await within(flow.stop())
    flow.run()
    await flow.emit(one.model_copy(update={"payload": 3}))
    await within(third.wait())  # 2 went through to Rookery; 3 runs
    assert await within(flow.cancel(one.trace_id)) is True
    await recorder.wait_for("trace_cancel_finish", trace_id=one.trace_id)
    kinds = recorder.kinds(trace_id=one.trace_id)
    # Before: the finish came first, while the third message still ran.
    assert kinds.index("node_trace_cancelled") < kinds.index("trace_cancel_finish")
    assert kinds.count("trace_cancel_finish") == 1


class _SwallowingBus:
    """A 2.1 publish-only bus whose first publish on a->b waits, and swallows a
    cancellation."""

    def __init__(self) -> None:
        self.waiting = asyncio.Event()
        self.hold = True

    async def publish(self, envelope: Any) -> None:
        if not self.hold or envelope.edge != "a->b":
            return
        self.hold = False
        self.waiting.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            return  # swallowed: bad manners, but a user's bus may do it


async def test_a_cancel_swallowed_while_routing_does_not_outlive_its_item(
        start: Any, recorder: Recorder) -> None:
    bus = _SwallowingBus()

    async def same(message: Any, ctx: Any) -> Any:
        return message

    a = Node(same, name="a", policy=NONE)
    b = Node(same, name="b", policy=NONE)
    flow = start(create(a.to(b), b.to(), message_bus=bus, middlewares=[recorder]))
    first, second = msg("1"), msg("2")
    await flow.emit(first)
    await within(bus.waiting.wait())  # a routes its result: the publish holds it
    assert await within(flow.cancel(first.trace_id)) is True
    await recorder.wait_for("trace_cancel_finish", trace_id=first.trace_id)
    # The next message through the same worker is not taken for cancelled.
    await flow.emit(second)
    assert (await within(flow.fetch())).payload == "2"
    assert not recorder.of("node_trace_cancelled", trace_id=second.trace_id)
