"""§11 playbooks: ``call_playbook`` and ``Context.call_playbook`` (with §7.3 cancellation)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pfcore_support import Recorder, msg, within

from penguiflow import FlowError, FlowErrorCode, Headers, Node, NodePolicy, call_playbook, create
from penguiflow.core import TraceCancelled

NONE = NodePolicy(validate="none")


class Sub:
    """A one-node playbook whose node is observable and can be made to block."""

    def __init__(self, name: str, *, result: Any = None, block: bool = False,
                 raises: Exception | None = None, errors_to_rookery: bool = False) -> None:
        self.name = name
        self.result = result
        self.block = block
        self.raises = raises
        self.errors_to_rookery = errors_to_rookery
        self.seen: list[Any] = []
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.gate = asyncio.Event()
        self.recorder = Recorder()
        self.flows: list[Any] = []

    async def body(self, message: Any, ctx: Any) -> Any:
        self.seen.append(message)
        self.started.set()
        if self.block:
            try:
                await self.gate.wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        if self.raises is not None:
            raise self.raises
        if callable(self.result):
            return self.result(message)
        return self.result

    def __call__(self) -> tuple[Any, None]:
        flow = create(Node(self.body, name=self.name, policy=NONE).to(),
                      middlewares=[self.recorder],
                      emit_errors_to_rookery=self.errors_to_rookery)
        self.flows.append(flow)
        return flow, None

    @property
    def flow(self) -> Any:
        assert len(self.flows) == 1
        return self.flows[0]

    async def assert_stopped(self) -> None:
        """The subflow reports not running (spec: cancel() then raises) and has no workers."""
        with pytest.raises(RuntimeError, match="PenguiFlow is not running"):
            await self.flow.cancel("any")
        assert worker_tasks(self.name) == []

    async def cleanup(self) -> None:
        for flow in self.flows:
            await within(flow.stop())


def worker_tasks(node_name: str) -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks()
            if t.get_name() == f"penguiflow:{node_name}" and not t.done()]


async def test_returns_payload_of_first_rookery_message() -> None:
    sub = Sub("pb_echo", result=lambda m: m.model_copy(update={"payload": m.payload * 2}))
    parent = msg(21)
    assert await within(call_playbook(sub, parent)) == 42
    assert len(sub.flows) == 1
    await sub.assert_stopped()


async def test_returns_raw_item_when_not_a_message() -> None:
    sub = Sub("pb_raw", result=lambda m: {"answer": m.payload})
    result = await within(call_playbook(sub, msg("x")))
    assert result == {"answer": "x"}
    await sub.assert_stopped()


async def test_subflow_receives_parent_message_trace_headers_and_meta() -> None:
    sub = Sub("pb_seen", result=lambda m: m)
    parent = msg("q", headers=Headers(tenant="t1", topic="top", priority=3),
                 meta={"k": "v"})
    assert await within(call_playbook(sub, parent, runtime=None)) == "q"
    assert len(sub.seen) == 1
    seen = sub.seen[0]
    assert seen is parent
    assert seen.trace_id == parent.trace_id
    assert seen.headers == Headers(tenant="t1", topic="top", priority=3)
    assert seen.meta == {"k": "v"}
    starts = sub.recorder.of("node_start", node="pb_seen")
    assert [e.trace_id for e in starts] == [parent.trace_id]


async def test_first_rookery_item_wins() -> None:
    async def fan(message: Any, ctx: Any) -> None:
        await ctx.emit(message.model_copy(update={"payload": "first"}))
        await ctx.emit(message.model_copy(update={"payload": "second"}))

    def playbook() -> tuple[Any, None]:
        return create(Node(fan, name="pb_fan", policy=NONE).to()), None

    assert await within(call_playbook(playbook, msg("x"))) == "first"
    assert worker_tasks("pb_fan") == []


async def test_timeout_raises_and_stops_subflow() -> None:
    sub = Sub("pb_slow", block=True)
    try:
        with pytest.raises(TimeoutError):
            await within(call_playbook(sub, msg("x"), timeout=0.05))
        assert sub.started.is_set()
        assert sub.cancelled.is_set()  # the blocked node was stopped
        await sub.assert_stopped()
    finally:
        await sub.cleanup()


async def test_timeout_keyword_is_positional_too() -> None:
    sub = Sub("pb_slow_pos", block=True)
    try:
        with pytest.raises(TimeoutError):
            await within(call_playbook(sub, msg("x"), 0.05))
        await sub.assert_stopped()
    finally:
        await sub.cleanup()


async def test_node_error_returns_flow_error_with_emit_errors_to_rookery() -> None:
    boom = ValueError("boom")
    sub = Sub("pb_fail", raises=boom, errors_to_rookery=True)
    parent = msg("x")
    result = await within(call_playbook(sub, parent))
    assert isinstance(result, FlowError)
    assert result.code == FlowErrorCode.NODE_EXCEPTION.value
    assert result.trace_id == parent.trace_id
    assert result.node_name == "pb_fail"
    assert result.unwrap() is boom
    await sub.assert_stopped()


async def test_pre_cancelled_parent_raises_without_emitting(start: Any) -> None:
    parent_flow = start(create(Node(Sub("parent_idle").body, name="parent_idle",
                                    policy=NONE).to()))
    parent = msg("x")
    parent_flow.ensure_trace_event(parent.trace_id).set()
    sub = Sub("pb_never", result="nope")
    try:
        with pytest.raises(TraceCancelled) as info:
            await within(call_playbook(sub, parent, runtime=parent_flow))
        assert info.value.trace_id == parent.trace_id
        assert sub.seen == []
        assert sub.recorder.of(trace_id=parent.trace_id) == []
        await sub.assert_stopped()
    finally:
        await sub.cleanup()


async def test_parent_cancel_while_running_cancels_subflow_trace(start: Any) -> None:
    parent_flow = start(create(Node(Sub("parent_idle2").body, name="parent_idle2",
                                    policy=NONE).to()))
    parent = msg("x")
    sub = Sub("pb_block", block=True)
    task = asyncio.ensure_future(call_playbook(sub, parent, runtime=parent_flow))
    try:
        await within(sub.started.wait())
        assert not task.done()
        parent_flow.ensure_trace_event(parent.trace_id).set()
        with pytest.raises(TraceCancelled) as info:
            await within(task)
        assert info.value.trace_id == parent.trace_id
        assert sub.cancelled.is_set()
        assert len(sub.recorder.of("trace_cancel_start", trace_id=parent.trace_id)) == 1
        assert sub.recorder.of("node_success", trace_id=parent.trace_id) == []
        await sub.assert_stopped()
    finally:
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await sub.cleanup()


async def test_caller_cancelled_cancels_subflow_trace_and_stops_it() -> None:
    sub = Sub("pb_block_caller", block=True)
    parent = msg("x")
    task = asyncio.ensure_future(call_playbook(sub, parent))
    try:
        await within(sub.started.wait())
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await within(task)
        assert sub.cancelled.is_set()
        assert len(sub.recorder.of("trace_cancel_start", trace_id=parent.trace_id)) == 1
        await sub.assert_stopped()
    finally:
        await sub.cleanup()


# -- Context.call_playbook ----------------------------------------------------------


async def test_context_call_playbook_from_a_node(start: Any) -> None:
    sub = Sub("pb_inner", result=lambda m: m.model_copy(update={"payload": m.payload + "!"}))

    async def caller(message: Any, ctx: Any) -> Any:
        value = await ctx.call_playbook(sub, message)
        return message.model_copy(update={"payload": value})

    flow = start(create(Node(caller, name="caller", policy=NONE).to()))
    m = msg("hi")
    await flow.emit(m)
    out = await within(flow.fetch())
    assert out.payload == "hi!"
    assert out.trace_id == m.trace_id
    assert sub.seen[0].trace_id == m.trace_id
    await sub.assert_stopped()


async def test_context_call_playbook_passes_runtime(start: Any) -> None:
    """Only a call that received the context's runtime can see the parent's cancel event."""
    sub = Sub("pb_runtime", result="unreachable")
    outcome: list[Any] = []
    done = asyncio.Event()

    async def caller(message: Any, ctx: Any) -> None:
        ctx.runtime.ensure_trace_event(message.trace_id).set()
        try:
            outcome.append(await ctx.call_playbook(sub, message))
        except TraceCancelled as exc:
            outcome.append(exc)
        finally:
            done.set()

    flow = start(create(Node(caller, name="caller_rt", policy=NONE).to()))
    m = msg("x")
    await flow.emit(m)
    await within(done.wait())
    assert len(outcome) == 1
    assert isinstance(outcome[0], TraceCancelled)
    assert outcome[0].trace_id == m.trace_id
    assert sub.seen == []
    await sub.assert_stopped()


async def test_context_call_playbook_passes_timeout(start: Any) -> None:
    sub = Sub("pb_ctx_slow", block=True)
    outcome: list[Any] = []
    done = asyncio.Event()

    async def caller(message: Any, ctx: Any) -> None:
        try:
            outcome.append(await ctx.call_playbook(sub, message, timeout=0.05))
        except TimeoutError as exc:
            outcome.append(exc)
        finally:
            done.set()

    flow = start(create(Node(caller, name="caller_to", policy=NONE).to()))
    await flow.emit(msg("x"))
    try:
        await within(done.wait())
        assert len(outcome) == 1 and isinstance(outcome[0], TimeoutError)
        await sub.assert_stopped()
    finally:
        await sub.cleanup()


async def test_parent_trace_cancel_interrupts_node_and_subflow(
    start: Any, recorder: Recorder
) -> None:
    sub = Sub("pb_nested", block=True)
    caller_saw: list[BaseException] = []

    async def caller(message: Any, ctx: Any) -> Any:
        try:
            return await ctx.call_playbook(sub, message)
        except (TraceCancelled, asyncio.CancelledError) as exc:
            caller_saw.append(exc)
            raise

    flow = start(create(Node(caller, name="caller_nested", policy=NodePolicy(
        validate="none", max_retries=2, backoff_base=0.001)).to(),
        middlewares=[recorder], emit_errors_to_rookery=True))
    m = msg("x")
    try:
        await flow.emit(m)
        await within(sub.started.wait())
        assert await within(flow.cancel(m.trace_id)) is True
        await recorder.wait_for("node_trace_cancelled", trace_id=m.trace_id)
        await recorder.wait_for("trace_cancel_finish", trace_id=m.trace_id)
        assert len(caller_saw) == 1
        assert sub.cancelled.is_set()
        assert len(sub.recorder.of("trace_cancel_start", trace_id=m.trace_id)) == 1
        await sub.assert_stopped()
        kinds = recorder.kinds(trace_id=m.trace_id, node="caller_nested")
        assert "node_retry" not in kinds
        assert "node_failed" not in kinds
        assert len(sub.seen) == 1  # not retried
        with pytest.raises(asyncio.QueueEmpty):
            flow.fetch_nowait()
    finally:
        await sub.cleanup()


async def test_calls_outside_a_node_leave_no_state_in_the_parent(start: Any) -> None:
    # Each call made the parent hold a cancel event for the trace (spec §11), and with
    # no work of it in the parent nothing ever dropped it: one leaked state per call
    # in a long-running flow. A pre-cancel (the caller's own set event) still holds.
    parent_flow = start(create(Node(Sub("parent_host").body, name="parent_host",
                                    policy=NONE).to()))
    sub = Sub("pb_many", result="ok")
    try:
        for _ in range(3):
            assert await within(call_playbook(sub, msg("x"), runtime=parent_flow)) == "ok"
        assert len(parent_flow._rt.traces) == 0
        cancelled = msg("y")
        parent_flow.ensure_trace_event(cancelled.trace_id).set()
        with pytest.raises(TraceCancelled):
            await within(call_playbook(sub, cancelled, runtime=parent_flow))
        assert list(parent_flow._rt.traces) == [cancelled.trace_id]
        idle = msg("z")
        parent_flow.ensure_trace_event(idle.trace_id)
        assert await parent_flow.cancel(idle.trace_id) is False  # nothing to cancel
        assert idle.trace_id not in parent_flow._rt.traces
    finally:
        await sub.cleanup()
