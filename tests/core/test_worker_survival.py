"""A node's worker survives what its node or its observers do, and a cancel that
comes at an awkward moment still cancels.

Each case here once ended a node's worker for good (every later message of that
node then waited forever), or let a cancelled invocation be retried or reported
failed: a node that cancels its own trace, a BaseException that is not an
Exception, a trace cancel that arrives while a failed attempt is being recorded,
and two stop() calls at once.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pfcore_support import Recorder, msg, within

from penguiflow import FlowError, Message, Node, NodePolicy, create
from penguiflow.errors import FlowErrorCode


class LibrarySignal(BaseException):
    """A library's own BaseException subclass (neither a cancel nor an exit)."""


def running(func: Any, name: str) -> tuple[Any, Recorder]:
    """A one-node flow of ``func``, run, and the recorder of its events."""
    recorder = Recorder()
    flow = create(Node(func, name=name, policy=NodePolicy(validate="none")).to(),
                  middlewares=[recorder])
    flow.run()
    return flow, recorder


def alive(flow: Any) -> bool:
    return bool(flow._workers) and all(
        w.task is not None and not w.task.done() for w in flow._workers)


async def test_a_node_that_cancels_its_own_trace_keeps_taking_messages() -> None:
    flows: list[Any] = []

    async def guard(m: Message, ctx: Any) -> Any:
        if m.payload == "abort":
            assert await flows[0].cancel(m.trace_id)  # a guard aborting its request
            return m  # dropped: the trace is cancelled
        return m

    flow, recorder = running(guard, "guard")
    flows.append(flow)
    try:
        aborted = msg("abort")
        await flow.emit(aborted)
        await recorder.wait_for("trace_cancel_finish", trace_id=aborted.trace_id)
        assert recorder.kinds(trace_id=aborted.trace_id, node="guard") == [
            "node_start", "node_trace_cancelled"]
        following = msg("next")
        await flow.emit(following)
        out = await within(flow.fetch())  # before: never (the worker had stopped)
        assert out.trace_id == following.trace_id
        assert alive(flow)
        assert recorder.kinds(trace_id=following.trace_id, node="guard") == [
            "node_start", "node_success"]
    finally:
        await within(flow.stop())


async def test_a_routing_policy_that_cancels_the_trace_keeps_the_router_alive() -> None:
    flows: list[Any] = []

    async def route(m: Message, ctx: Any) -> Any:
        if m.payload == "abort":
            await flows[0].cancel(m.trace_id)
            return None
        return m

    flow, recorder = running(route, "route")
    flows.append(flow)
    try:
        for payload in ("abort", "abort", "ok"):
            await flow.emit(msg(payload))
        out = await within(flow.fetch())
        assert out.payload == "ok"
        assert len(recorder.of("node_trace_cancelled", node="route")) == 2
        assert alive(flow)
    finally:
        await within(flow.stop())


async def test_a_base_exception_fails_its_invocation_not_the_worker() -> None:
    calls: list[str] = []

    async def work(m: Message, ctx: Any) -> Any:
        calls.append(m.payload)
        if m.payload == "bad":
            raise LibrarySignal("not an Exception")
        return m

    recorder = Recorder()
    flow = create(Node(work, name="work", policy=NodePolicy(validate="none", max_retries=2,
                                                          backoff_base=0.001)).to(),
                  emit_errors_to_rookery=True, middlewares=[recorder])
    flow.run()
    try:
        bad, good = msg("bad"), msg("good")
        await flow.emit(bad)
        await flow.emit(good)
        first = await within(flow.fetch())
        second = await within(flow.fetch())
        by_trace = {getattr(x, "trace_id", None): x for x in (first, second)}
        error = by_trace[bad.trace_id]
        assert isinstance(error, FlowError) and error.code == FlowErrorCode.NODE_EXCEPTION.value
        assert "LibrarySignal" in error.message
        assert by_trace[good.trace_id].payload == "good"
        # Failed once, not retried: a BaseException says "stop", not "try again".
        assert calls == ["bad", "good"]
        assert recorder.kinds(trace_id=bad.trace_id) == ["node_start", "node_error",
                                                          "node_failed"]
        assert alive(flow)
    finally:
        await within(flow.stop())


async def test_a_middleware_raising_a_base_exception_is_an_observer_failure(
        caplog: pytest.LogCaptureFixture) -> None:
    async def picky(event: Any) -> None:
        if event.event_type == "node_success":
            raise LibrarySignal("middleware")

    async def work(m: Message, ctx: Any) -> Any:
        return m

    flow = create(Node(work, name="work", policy=NodePolicy(validate="none")).to(),
                  middlewares=[picky])
    flow.run()
    try:
        for i in range(2):
            await flow.emit(msg(i))
        assert sorted([(await within(flow.fetch())).payload for _ in range(2)]) == [0, 1]
        assert flow.observer_failures["middleware_error"] == 2
        assert alive(flow)
        assert any(r.getMessage() == "middleware_error" for r in caplog.records)
    finally:
        await within(flow.stop())


class SlowRecorder(Recorder):
    """A middleware that holds ``node_error`` until released: the window in which a
    failed attempt is being recorded (the worker cannot be interrupted then)."""

    def __init__(self) -> None:
        super().__init__()
        self.holding = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, event: Any) -> None:
        await super().__call__(event)
        if event.event_type == "node_error":
            self.holding.set()
            await self.release.wait()


@pytest.mark.parametrize("max_retries", [0, 2])
async def test_a_cancel_while_a_failure_is_recorded_is_neither_retried_nor_failed(
        max_retries: int) -> None:
    calls: list[str] = []

    async def fails(m: Message, ctx: Any) -> Any:
        calls.append(m.payload)
        raise ValueError("boom")

    recorder = SlowRecorder()
    flow = create(Node(fails, name="fails", policy=NodePolicy(
        validate="none", max_retries=max_retries, backoff_base=30.0)).to(),
        emit_errors_to_rookery=True, middlewares=[recorder])
    flow.run()
    try:
        m = msg("x")
        await flow.emit(m)
        await within(recorder.holding.wait())
        cancelling = asyncio.ensure_future(flow.cancel(m.trace_id))
        await recorder.wait_for("trace_cancel_start", trace_id=m.trace_id)
        recorder.release.set()
        # Before: with retries it slept the 30 s backoff first; without, it reported
        # node_failed and put a FlowError in Rookery for the cancelled trace.
        await recorder.wait_for("trace_cancel_finish", trace_id=m.trace_id)
        await within(cancelling)
        assert recorder.kinds(trace_id=m.trace_id, node="fails") == [
            "node_start", "node_error", "node_trace_cancelled"]
        assert calls == ["x"]
        assert not _rookery(flow)  # no FlowError for the cancelled trace
    finally:
        recorder.release.set()
        await within(flow.stop())


def _rookery(flow: Any) -> Any:
    from penguiflow.core import ROOKERY

    return flow._contexts[ROOKERY]._buffer


async def test_a_stop_during_another_stop_returns_once_the_flow_has_stopped() -> None:
    flushing = asyncio.Event()
    release = asyncio.Event()

    async def echo(m: Message, ctx: Any) -> Any:
        return m

    class SlowFlush:
        """A store whose flush waits: stop() is in progress meanwhile."""

        async def save_event(self, event: Any) -> None:
            pass

        async def load_history(self, trace_id: str) -> list[Any]:
            return []

        async def save_remote_binding(self, binding: Any) -> None:
            pass

        async def flush(self) -> None:
            flushing.set()
            await release.wait()

    flow = create(Node(echo, name="echo", policy=NodePolicy(validate="none")).to(),
                  state_store=SlowFlush())
    flow.run()
    first = asyncio.ensure_future(flow.stop(store_timeout_s=None))
    await within(flushing.wait())

    async def second_stop() -> tuple[bool, int]:
        # The flush is released only once this stop() is under way.
        asyncio.get_running_loop().call_soon(release.set)
        await flow.stop()
        return flow.running, len(flow._workers)

    # Before: the second stop() returned at once, the flow still running.
    assert await within(second_stop()) == (False, 0)
    await within(first)
    assert not flow.running


async def test_an_emit_failed_by_stop_does_not_take_a_count_from_queued_items() -> None:
    # stop() failed an emit() waiting for room only after it had counted the queued
    # items anew: the failed emit then gave back a count it no longer held, so after
    # run() the trace looked drained with an item still queued, and a cancel said
    # "finished" before the invocation it interrupted had ended.
    gate = asyncio.Event()
    entered = asyncio.Event()

    async def work(m: Message, ctx: Any) -> Any:
        entered.set()
        await gate.wait()
        return m

    recorder = Recorder()
    flow = create(Node(work, name="work", policy=NodePolicy(validate="none")).to(),
                  queue_maxsize=2, middlewares=[recorder])
    flow.run()
    trace_id = "t" * 32

    def message(i: int) -> Message:
        return msg(i, trace_id=trace_id)

    await flow.emit(message(0))
    await within(entered.wait())  # the node holds item 0
    await flow.emit(message(1))
    await flow.emit(message(2))  # the floe is full now
    blocked = asyncio.ensure_future(flow.emit(message(3)))
    await asyncio.sleep(0)  # one turn: the emit finds the floe full and waits for room
    assert not blocked.done()
    await within(flow.stop())
    with pytest.raises(Exception, match="stopped while emit"):
        await within(blocked)
    assert flow._rt.traces[trace_id].pending == 2  # items 1 and 2, still queued
    entered.clear()
    recorder.events.clear()
    flow.run()
    try:
        await within(entered.wait())  # item 1 in the node, item 2 queued
        assert await flow.cancel(trace_id)
        await recorder.wait_for("trace_cancel_finish", trace_id=trace_id)
        kinds = recorder.kinds(trace_id=trace_id)
        assert kinds.index("node_trace_cancelled") < kinds.index("trace_cancel_finish")
        assert trace_id not in flow._rt.traces
    finally:
        gate.set()
        await within(flow.stop())


class _CancelledFuture:
    """What an observer meets when something it awaits was cancelled by another task
    (a closed HTTP client's pending request, a pool torn down): a CancelledError."""

    async def __call__(self, *_: Any) -> None:
        future = asyncio.get_running_loop().create_future()
        future.cancel()
        await future


@pytest.mark.parametrize("observer", ["middleware", "store", "store_waiter"])
async def test_an_observer_raising_cancelled_error_costs_one_event_not_the_worker(
        observer: str, caplog: pytest.LogCaptureFixture) -> None:
    # A middleware (or save_event) re-raised a CancelledError that was not the
    # flow's: the worker took it for stop(), ended, and every later message of the
    # node waited for ever (the trace never drained).
    from penguiflow.state import InMemoryStateStore

    broken = _CancelledFuture()

    class CancellingStore(InMemoryStateStore):
        async def save_event(self, event: Any) -> None:
            await broken()

    class CancellingWaiterStore(InMemoryStateStore):
        """A fast-path store whose "buffer full" waiter it cancels (closing, say)."""

        def save_event_fields(self, fields: Any) -> Any:
            return broken()

    async def echo(m: Message, ctx: Any) -> Message:
        return m

    node = Node(echo, name="echo", policy=NodePolicy(validate="none"))
    if observer == "middleware":
        flow = create(node.to(), middlewares=[broken])
        counter = "middleware_error"
    else:
        store = CancellingStore() if observer == "store" else CancellingWaiterStore()
        flow = create(node.to(), state_store=store)
        counter = "state_store_save_failed"
    flow.run()
    try:
        for n in range(3):
            m = msg(n)
            await flow.emit(m)
            out = await within(flow.fetch())
            assert out.trace_id == m.trace_id
        assert alive(flow)
        assert flow._rt.traces == {}  # every trace drained
        # node_start and node_success of each message: counted, each one.
        assert flow.observer_failures[counter] == 6
        assert counter in caplog.text
    finally:
        await within(flow.stop())


async def test_a_node_retried_past_a_float_sized_backoff_still_fails_with_its_error() -> None:
    # backoff_base * backoff_mult ** attempt overflowed before the cap applied: the
    # OverflowError cost the item (no node_failed, no FlowError, fetch() waited).
    attempts = 0

    async def flaky(message: Any, ctx: Any) -> Any:
        nonlocal attempts
        attempts += 1
        raise RuntimeError("backend down")

    policy = NodePolicy(validate="none", max_retries=320, backoff_base=1e-9,
                        backoff_mult=10.0, max_backoff=1e-9)
    flow = create(Node(flaky, name="flaky", policy=policy).to(), emit_errors_to_rookery=True)
    flow.run()
    try:
        await flow.emit(msg(1))
        error = await within(flow.fetch())
        assert isinstance(error, FlowError) and "backend down" in str(error)
        assert attempts == 321
        assert flow.observer_failures.get("worker_error", 0) == 0
    finally:
        await flow.stop()
