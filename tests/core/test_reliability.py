"""§7.4 reliability envelope: deadlines, retries, timeouts, FlowError, emit_errors_to_rookery."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from pfcore_support import Recorder, msg, within
from pydantic import BaseModel, ValidationError

from penguiflow import (
    FinalAnswer,
    FlowError,
    FlowErrorCode,
    Message,
    ModelRegistry,
    Node,
    NodePolicy,
    create,
)


def flaky(name: str, failures: int, exc_factory: Any = None, **policy: Any) -> tuple[Node, list]:
    """A node failing ``failures`` times (recording raised exceptions), then echoing."""
    raised: list[BaseException] = []
    make = exc_factory or (lambda n: ValueError(f"boom {n}"))

    async def fn(message: Any, ctx: Any) -> Any:
        if len(raised) < failures:
            exc = make(len(raised))
            raised.append(exc)
            raise exc
        return message

    policy.setdefault("validate", "none")
    return Node(fn, name=name, policy=NodePolicy(**policy)), raised


# --- retries --------------------------------------------------------------------------


async def test_retries_until_success(start: Any, recorder: Recorder) -> None:
    node, raised = flaky("flaky", 2, max_retries=2, backoff_base=0.001, backoff_mult=2.0)
    flow = start(create(node.to(), middlewares=[recorder]))
    m = msg("payload")
    await flow.emit(m)
    assert await within(flow.fetch()) is m
    assert len(raised) == 2
    await recorder.wait_for("node_success", trace_id=m.trace_id)
    kinds = recorder.kinds(trace_id=m.trace_id)
    assert kinds == [
        "node_start",
        "node_error",
        "node_retry",
        "node_start",
        "node_error",
        "node_retry",
        "node_start",
        "node_success",
    ]
    starts = recorder.of("node_start", trace_id=m.trace_id)
    assert [e.attempt for e in starts] == [0, 1, 2]
    assert all(e.latency_ms == 0.0 for e in starts)
    retries = recorder.of("node_retry", trace_id=m.trace_id)
    assert [e.attempt for e in retries] == [1, 2]
    assert all(e.latency_ms is None for e in retries)
    assert [e.extra["sleep_s"] for e in retries] == pytest.approx([0.001, 0.002])
    assert retries[0].extra["exception"] == repr(raised[0])
    errors = recorder.of("node_error", trace_id=m.trace_id)
    assert [e.extra["exception"] for e in errors] == [repr(e) for e in raised]
    assert [e.attempt for e in errors] == [0, 1]
    (success,) = recorder.of("node_success", trace_id=m.trace_id)
    assert success.latency_ms is not None and success.latency_ms >= 0.0
    assert success.attempt == 2


async def test_backoff_is_capped_by_max_backoff(start: Any, recorder: Recorder) -> None:
    node, _ = flaky(
        "capped", 3, max_retries=3, backoff_base=0.002, backoff_mult=10.0, max_backoff=0.005
    )
    flow = start(create(node.to(), middlewares=[recorder]))
    await flow.emit("x")
    assert await within(flow.fetch()) == "x"
    sleeps = [e.extra["sleep_s"] for e in recorder.of("node_retry")]
    assert sleeps == pytest.approx([0.002, 0.005, 0.005])


async def test_retries_exhausted_builds_node_exception_flow_error(
    start: Any, recorder: Recorder
) -> None:
    node, raised = flaky("worker", 10, max_retries=1, backoff_base=0.001)
    flow = start(create(node.to(), emit_errors_to_rookery=True, middlewares=[recorder]))
    m = msg("doomed")
    await flow.emit(m)
    err = await within(flow.fetch())
    assert isinstance(err, FlowError)
    assert len(raised) == 2  # total attempts = max_retries + 1
    assert err.code == FlowErrorCode.NODE_EXCEPTION.value
    assert err.message == "Node 'worker' raised ValueError: boom 1"
    assert err.trace_id == m.trace_id
    assert err.node_name == "worker"
    assert err.node_id == node.node_id
    assert err.unwrap() is raised[-1]
    assert err.exception_type == "ValueError"
    assert set(err.metadata) == {"attempt", "latency_ms", "exception_repr"}
    assert err.metadata["attempt"] == 1
    assert err.metadata["exception_repr"] == repr(raised[-1])
    assert isinstance(err.metadata["latency_ms"], float)

    (failed,) = await recorder.wait_for("node_failed", trace_id=m.trace_id)
    assert failed.extra["flow_error"] == err.to_payload()
    assert failed.extra["exception"] == repr(raised[-1])
    assert recorder.kinds(trace_id=m.trace_id).count("node_start") == 2
    assert "node_success" not in recorder.kinds(trace_id=m.trace_id)


async def test_no_retries_by_default(start: Any, recorder: Recorder) -> None:
    node, raised = flaky("once", 10)
    flow = start(create(node.to(), emit_errors_to_rookery=True, middlewares=[recorder]))
    await flow.emit(msg("x"))
    err = await within(flow.fetch())
    assert isinstance(err, FlowError)
    assert len(raised) == 1
    assert err.metadata["attempt"] == 0
    assert recorder.of("node_retry") == []


async def test_failure_without_flag_delivers_nothing(start: Any, recorder: Recorder) -> None:
    async def fn(message: Any, ctx: Any) -> Any:
        if message.payload == "bad":
            raise RuntimeError("nope")
        return message

    flow = start(create(Node(fn, policy=NodePolicy(validate="none")).to(), middlewares=[recorder]))
    bad, good = msg("bad"), msg("good")
    await flow.emit(bad)
    await flow.emit(good)
    # Messages are processed in order, so anything produced for `bad` would come first.
    assert await within(flow.fetch()) is good
    assert len(recorder.of("node_failed", trace_id=bad.trace_id)) == 1


async def test_failed_object_without_trace_id_is_not_delivered(
    start: Any, recorder: Recorder
) -> None:
    async def fn(message: Any, ctx: Any) -> Any:
        if message == "bad":
            raise RuntimeError("nope")
        return message

    flow = start(
        create(
            Node(fn, policy=NodePolicy(validate="none")).to(),
            emit_errors_to_rookery=True,
            middlewares=[recorder],
        )
    )
    await flow.emit("bad")
    await flow.emit("good")
    assert await within(flow.fetch()) == "good"
    (failed,) = recorder.of("node_failed")
    assert failed.trace_id is None
    assert failed.trace_pending is None


async def test_error_flow_error_goes_to_rookery_even_from_inner_node(start: Any) -> None:
    async def ok(message: Any, ctx: Any) -> Any:
        return message

    async def bad(message: Any, ctx: Any) -> Any:
        raise KeyError("missing")

    none = NodePolicy(validate="none")
    first, second, last = (
        Node(ok, name="first", policy=none),
        Node(bad, name="second", policy=none),
        Node(ok, name="last", policy=none),
    )
    flow = start(create(first.to(second), second.to(last), last.to(), emit_errors_to_rookery=True))
    m = msg("x")
    await flow.emit(m)
    err = await within(flow.fetch())
    assert isinstance(err, FlowError)
    assert err.node_name == "second"
    assert err.message == "Node 'second' raised KeyError: 'missing'"


# --- timeouts -------------------------------------------------------------------------


async def test_timeout_then_failure(start: Any, recorder: Recorder) -> None:
    calls: list[int] = []

    async def hang(message: Any, ctx: Any) -> Any:
        calls.append(1)
        await asyncio.Event().wait()

    policy = NodePolicy(validate="none", timeout_s=0.02, max_retries=1, backoff_base=0.001)
    node = Node(hang, name="slow", policy=policy)
    flow = start(create(node.to(), emit_errors_to_rookery=True, middlewares=[recorder]))
    m = msg("x")
    await flow.emit(m)
    err = await within(flow.fetch())
    assert isinstance(err, FlowError)
    assert len(calls) == 2
    assert err.code == "NODE_TIMEOUT"
    assert err.message == "Node 'slow' timed out after 0.02s"
    assert err.trace_id == m.trace_id
    assert err.node_name == "slow"
    assert set(err.metadata) == {"attempt", "latency_ms", "timeout_s"}
    assert err.metadata["attempt"] == 1
    assert err.metadata["timeout_s"] == 0.02
    assert isinstance(err.unwrap(), TimeoutError)
    assert str(err).startswith("[NODE_TIMEOUT] Node 'slow' timed out after 0.02s trace=")

    await recorder.wait_for("node_failed", trace_id=m.trace_id)
    assert recorder.kinds(trace_id=m.trace_id) == [
        "node_start",
        "node_timeout",
        "node_retry",
        "node_start",
        "node_timeout",
        "node_failed",
    ]
    timeouts = recorder.of("node_timeout", trace_id=m.trace_id)
    assert all(isinstance(e.extra["exception"], str) for e in timeouts)
    assert "TimeoutError" in timeouts[0].extra["exception"]
    assert recorder.of("node_failed")[0].extra["flow_error"]["code"] == "NODE_TIMEOUT"


async def test_timeout_applies_to_objects_without_trace_id(start: Any, recorder: Recorder) -> None:
    async def hang(message: Any, ctx: Any) -> Any:
        await asyncio.Event().wait()

    node = Node(hang, name="slow", policy=NodePolicy(validate="none", timeout_s=0.01))
    flow = start(create(node.to(), middlewares=[recorder]))
    await flow.emit("plain string")
    (failed,) = await recorder.wait_for("node_failed")
    assert failed.trace_id is None
    assert failed.extra["flow_error"]["code"] == "NODE_TIMEOUT"
    assert len(recorder.of("node_timeout")) == 1


async def test_fast_node_within_timeout_succeeds(start: Any) -> None:
    async def quick(message: Any, ctx: Any) -> Any:
        return "ok"

    node = Node(quick, policy=NodePolicy(validate="none", timeout_s=2.0))
    flow = start(create(node.to()))
    await flow.emit(msg("x"))
    assert await within(flow.fetch()) == "ok"


# --- validation inside the flow -------------------------------------------------------


class Query(BaseModel):
    q: str


class Answer(BaseModel):
    a: int


async def test_validation_coerces_in_and_out(start: Any) -> None:
    received: list[Any] = []

    async def answer(message: Any, ctx: Any) -> Any:
        received.append(message)
        return {"a": str(len(message.q))}

    registry = ModelRegistry()
    registry.register("answer", Query, Answer)
    flow = start(create(Node(answer).to()), registry=registry)
    await flow.emit({"q": "four"})
    assert await within(flow.fetch()) == Answer(a=4)
    assert received == [Query(q="four")]


async def test_output_validation_failure_is_a_node_exception(start: Any) -> None:
    async def broken(message: Any, ctx: Any) -> Any:
        return {"a": "NaN"}

    registry = ModelRegistry()
    registry.register("broken", Message, Answer)
    flow = start(create(Node(broken).to(), emit_errors_to_rookery=True), registry=registry)
    m = msg("y")
    await flow.emit(m)
    err = await within(flow.fetch())
    assert isinstance(err, FlowError)
    assert err.code == "NODE_EXCEPTION"
    assert err.message.startswith("Node 'broken' raised ValidationError: ")
    assert isinstance(err.unwrap(), ValidationError)
    assert err.exception_type == "ValidationError"
    assert err.trace_id == m.trace_id


async def test_invalid_input_never_reaches_the_node(start: Any, recorder: Recorder) -> None:
    called: list[Any] = []

    async def typed(message: Any, ctx: Any) -> Any:
        called.append(message)
        return message

    registry = ModelRegistry()
    registry.register("typed", Query, Query)
    flow = start(create(Node(typed).to(), middlewares=[recorder]), registry=registry)
    await flow.emit({"q": ["not", "a", "string"]})
    await flow.emit({"q": "fine"})
    assert await within(flow.fetch()) == Query(q="fine")
    assert called == [Query(q="fine")]
    (failed,) = recorder.of("node_failed")
    assert "ValidationError" in failed.extra["flow_error"]["message"]


# --- deadlines ------------------------------------------------------------------------


async def test_expired_deadline_skips_the_node(start: Any, recorder: Recorder) -> None:
    called: list[Any] = []

    async def first(message: Any, ctx: Any) -> Any:
        called.append(message)
        return message

    async def last(message: Any, ctx: Any) -> Any:
        called.append(message)
        return message

    none = NodePolicy(validate="none")
    a, b = Node(first, name="first", policy=none), Node(last, name="last", policy=none)
    flow = start(create(a.to(b), b.to(), middlewares=[recorder]))
    deadline = time.time() - 5
    m = msg({"question": "?"}, deadline_s=deadline, meta={"k": "v"})
    await flow.emit(m)
    out = await within(flow.fetch())
    assert isinstance(out, Message)
    assert out.payload == FinalAnswer(text="Deadline exceeded")
    assert out.trace_id == m.trace_id
    assert out.headers == m.headers
    assert out.meta == {"k": "v"}
    assert m.payload == {"question": "?"}  # a copy was sent, the original is untouched
    assert called == []
    (skip,) = await recorder.wait_for("deadline_skip", trace_id=m.trace_id)
    assert skip.extra["deadline_s"] == deadline
    assert skip.node_name == "first"
    assert "node_start" not in recorder.kinds(trace_id=m.trace_id)


async def test_expired_final_answer_is_kept(start: Any) -> None:
    async def fn(message: Any, ctx: Any) -> Any:
        raise AssertionError("must not be called")

    flow = start(create(Node(fn, policy=NodePolicy(validate="none")).to()))
    answer = FinalAnswer(text="already answered", citations=["c"])
    await flow.emit(msg(answer, deadline_s=time.time() - 1))
    out = await within(flow.fetch())
    assert out.payload == answer


async def test_future_deadline_runs_normally(start: Any) -> None:
    async def fn(message: Any, ctx: Any) -> Any:
        return message.model_copy(update={"payload": "done"})

    flow = start(create(Node(fn, policy=NodePolicy(validate="none")).to()))
    await flow.emit(msg("x", deadline_s=time.time() + 60))
    assert (await within(flow.fetch())).payload == "done"


# --- results and per-trace accounting --------------------------------------------------


async def test_none_result_is_not_emitted_but_succeeds(start: Any, recorder: Recorder) -> None:
    async def fn(message: Any, ctx: Any) -> Any:
        return None if message.payload == "drop" else message

    flow = start(create(Node(fn, policy=NodePolicy(validate="none")).to(), middlewares=[recorder]))
    dropped, kept = msg("drop"), msg("keep")
    await flow.emit(dropped)
    await flow.emit(kept)
    assert await within(flow.fetch()) is kept
    assert recorder.kinds(trace_id=dropped.trace_id) == ["node_start", "node_success"]


async def test_trace_pending_counts_outputs_before_releasing_input(
    start: Any, recorder: Recorder
) -> None:
    async def fn(message: Any, ctx: Any) -> Any:
        return message

    none = NodePolicy(validate="none")
    a, b = Node(fn, name="a", policy=none), Node(fn, name="b", policy=none)
    flow = start(create(a.to(b), b.to(), middlewares=[recorder]))
    m = msg("x")
    await flow.emit(m)
    # Nothing is fetched until b has finished, so Rookery still holds b's output.
    await recorder.wait_for("node_success", trace_id=m.trace_id, node="b")
    start_a = recorder.of("node_start", trace_id=m.trace_id, node="a")[0]
    success_a = recorder.of("node_success", trace_id=m.trace_id, node="a")[0]
    success_b = recorder.of("node_success", trace_id=m.trace_id, node="b")[0]
    assert start_a.trace_pending == 1
    assert success_a.trace_pending == 2  # output to b counted, input not yet released
    assert success_b.trace_pending == 2  # output in Rookery + input of b
    assert start_a.trace_cancelled is False
    assert await within(flow.fetch()) is m
