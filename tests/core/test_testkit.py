"""FlowTestKit (spec §17): run_one, assert_node_sequence, simulate_error."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

import penguiflow.testkit as testkit
from penguiflow.core import PenguiFlow, create
from penguiflow.errors import FlowError, FlowErrorCode
from penguiflow.node import Node, NodePolicy
from penguiflow.testkit import assert_node_sequence, run_one, simulate_error
from penguiflow.types import Headers, Message


def _msg(payload: Any = None) -> Message:
    return Message(payload=payload, headers=Headers(tenant="acme"))


def _step(name: str) -> Node:
    async def step(message: Message, ctx: Any) -> Message:
        return message.model_copy(update={"payload": [*message.payload, name]})

    return Node(step, name=name, policy=NodePolicy(validate="none"))


def _chain() -> PenguiFlow:
    a, b, c = _step("a"), _step("b"), _step("c")
    return create(a.to(b), b.to(c), c.to())


def test_all_is_exactly_the_three_helpers() -> None:
    assert testkit.__all__ == ["run_one", "assert_node_sequence", "simulate_error"]


# --- run_one / assert_node_sequence -----------------------------------------------------


async def test_run_one_returns_first_rookery_item_and_records_sequence() -> None:
    flow = _chain()
    message = _msg([])
    result = await run_one(flow, message)
    assert isinstance(result, Message)
    assert result.payload == ["a", "b", "c"]
    assert result.trace_id == message.trace_id
    assert_node_sequence(message.trace_id, ["a", "b", "c"])
    assert_node_sequence(message.trace_id, ("a", "b", "c"))


async def test_run_one_always_stops_the_flow_so_it_can_run_again() -> None:
    flow = _chain()
    first, second = _msg([]), _msg(["x"])
    assert (await run_one(flow, first)).payload == ["a", "b", "c"]
    assert (await run_one(flow, second)).payload == ["x", "a", "b", "c"]
    assert_node_sequence(first.trace_id, ["a", "b", "c"])
    assert_node_sequence(second.trace_id, ["a", "b", "c"])


async def test_run_one_attaches_the_recorder_once_per_flow() -> None:
    flow = _chain()
    message = _msg([])
    await run_one(flow, message)
    await run_one(flow, message)  # same trace again: its recording is replaced
    starts = [e for e in testkit._EVENTS[message.trace_id] if e.event_type == "node_start"]
    assert [e.node_name for e in starts] == ["a", "b", "c"]


async def test_run_one_rejects_non_messages() -> None:
    flow = _chain()
    with pytest.raises(TypeError, match="Message"):
        await run_one(flow, {"payload": []})  # type: ignore[arg-type]
    # The flow was never started.
    assert (await run_one(flow, _msg([]))).payload == ["a", "b", "c"]


async def test_run_one_timeout_stops_the_flow() -> None:
    release = asyncio.Event()

    async def stuck(message: Message, ctx: Any) -> Message:
        await release.wait()
        return message

    flow = create(Node(stuck, name="stuck", policy=NodePolicy(validate="none")).to())
    message = _msg("x")
    with pytest.raises(TimeoutError):
        await run_one(flow, message, timeout_s=0.05)
    release.set()
    # Stopped by run_one: it can be run again (run() would raise if still running).
    assert (await run_one(flow, _msg("y"))).payload == "y"
    assert_node_sequence(message.trace_id, ["stuck"])


async def test_run_one_without_timeout() -> None:
    result = await asyncio.wait_for(run_one(_chain(), _msg([]), timeout_s=None), 5)
    assert result.payload == ["a", "b", "c"]


async def test_run_one_passes_the_registry() -> None:
    from penguiflow.registry import ModelRegistry

    async def validated(message: Any, ctx: Any) -> Any:
        return message

    flow = create(Node(validated, name="validated").to())
    with pytest.raises(RuntimeError, match="validated"):
        await run_one(flow, _msg("x"), registry=ModelRegistry())
    # run() failed before starting anything, and run_one still left the flow stoppable.
    assert (await run_one(flow, _msg("y"))).payload == "y"


def test_assert_node_sequence_without_records() -> None:
    with pytest.raises(AssertionError, match="No recorded events"):
        assert_node_sequence("never-seen-trace", ["a"])


async def test_assert_node_sequence_mismatch_shows_expected_and_actual() -> None:
    message = _msg([])
    await run_one(_chain(), message)
    with pytest.raises(AssertionError) as info:
        assert_node_sequence(message.trace_id, ["a", "c"])
    text = str(info.value)
    assert "['a', 'c']" in text
    assert "['a', 'b', 'c']" in text


async def test_assert_node_sequence_collapses_retries() -> None:
    flaky = Node(
        simulate_error("flaky", FlowErrorCode.NODE_EXCEPTION, fail_times=2),
        name="flaky",
        policy=NodePolicy(validate="none", max_retries=2, backoff_base=0.0),
    )
    after = _step("after")
    flow = create(flaky.to(after), after.to())
    message = _msg([])
    result = await run_one(flow, message)
    assert result.payload == ["after"]
    starts = [e for e in testkit._EVENTS[message.trace_id] if e.event_type == "node_start"]
    assert [e.node_name for e in starts] == ["flaky", "flaky", "flaky", "after"]
    assert_node_sequence(message.trace_id, ["flaky", "after"])


async def test_recorder_keeps_the_last_64_traces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(testkit, "_EVENTS", type(testkit._EVENTS)())
    recorder = testkit._RECORDER
    await recorder(SimpleNamespace(trace_id=None, event_type="node_cancelled"))  # type: ignore[arg-type]
    for index in range(70):
        event = SimpleNamespace(trace_id=f"t{index}", event_type="node_start", node_name="n")
        await recorder(event)  # type: ignore[arg-type]
    assert len(testkit._EVENTS) == 64
    with pytest.raises(AssertionError, match="No recorded events"):
        assert_node_sequence("t5", ["n"])
    assert_node_sequence("t6", ["n"])
    assert_node_sequence("t69", ["n"])


async def test_failed_node_reaches_rookery_as_flow_error() -> None:
    boom = Node(
        simulate_error("boom", "NODE_TIMEOUT", fail_times=5),
        name="boom",
        policy=NodePolicy(validate="none"),
    )
    flow = create(boom.to(), emit_errors_to_rookery=True)
    message = _msg("x")
    error = await run_one(flow, message)
    assert isinstance(error, FlowError)
    assert error.code == "NODE_EXCEPTION"
    assert str(error.unwrap()) == "[NODE_TIMEOUT] simulated failure in boom (attempt 1)"
    assert_node_sequence(message.trace_id, ["boom"])


# --- simulate_error ---------------------------------------------------------------------


async def test_simulate_error_fails_then_returns_the_message() -> None:
    func = simulate_error("fetch", FlowErrorCode.NODE_EXCEPTION, fail_times=2)
    message = _msg("x")
    for attempt in (1, 2):
        with pytest.raises(RuntimeError) as info:
            await func(message, None)
        assert str(info.value) == (
            f"[NODE_EXCEPTION] simulated failure in fetch (attempt {attempt})"
        )
    assert await func(message, None) is message
    assert func.simulation.attempts == 3
    assert func.simulation.failures == 2


async def test_simulate_error_result_and_exception_type() -> None:
    func = simulate_error("n", "CUSTOM", result="ok", exception_type=ValueError)
    assert func.simulation.attempts == 0
    assert func.simulation.failures == 0
    with pytest.raises(ValueError, match=r"^\[CUSTOM\] simulated failure in n \(attempt 1\)$"):
        await func("m", None)
    assert await func("m", None) == "ok"
    assert await func("m", None) == "ok"
    assert (func.simulation.attempts, func.simulation.failures) == (3, 1)


async def test_simulate_error_result_factory_sync_and_async() -> None:
    sync = simulate_error("n", "X", result_factory=lambda message: f"built:{message}")
    with pytest.raises(RuntimeError):
        await sync("m", None)
    assert await sync("m", None) == "built:m"

    async def factory(message: str) -> str:
        return message.upper()

    async_func = simulate_error("n", "X", result_factory=factory)
    with pytest.raises(RuntimeError):
        await async_func("m", None)
    assert await async_func("m", None) == "M"


def test_simulation_properties_are_read_only() -> None:
    func = simulate_error("n", "X")
    with pytest.raises(AttributeError):
        func.simulation.attempts = 5  # type: ignore[misc]
    with pytest.raises(AttributeError):
        func.simulation.failures = 5  # type: ignore[misc]


def test_simulate_error_is_a_valid_node_function() -> None:
    func = simulate_error("fetcher", "X")
    node = Node(func)
    assert node.name == "fetcher"
    assert Node(func, name="other").name == "other"


@pytest.mark.parametrize("fail_times", [0, -1])
def test_simulate_error_rejects_fail_times_below_one(fail_times: int) -> None:
    with pytest.raises(ValueError, match="fail_times"):
        simulate_error("n", "X", fail_times=fail_times)


def test_simulate_error_rejects_result_and_factory_together() -> None:
    with pytest.raises(ValueError, match="result"):
        simulate_error("n", "X", result=1, result_factory=lambda message: 2)
