"""The in-memory RemoteTransport (``penguiflow.remote.InMemoryTransport``), used directly.

RemoteNode's own events are covered in test_remote_node.py; here the transport is driven
by hand: results and ids, context reuse, the stream shape, the A2A-like task lifecycle,
gates, cancellation and injected failures.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from pfcore_support import msg, within

from penguiflow.remote import (
    AgentTask,
    InMemoryAgent,
    InMemoryTransport,
    RemoteAgentError,
    RemoteCallRequest,
    RemoteCallResult,
    RemoteStreamEvent,
)

URL = "mem://agent"


def request(message: Any = None, *, url: str = URL, skill: str = "echo") -> RemoteCallRequest:
    return RemoteCallRequest(message=message if message is not None else msg("hi"), skill=skill,
                             agent_url=url)


def states(task: AgentTask) -> list[str]:
    return [state for state, _ts in task.history]


async def until(predicate: Callable[[], bool]) -> None:
    """Yield to the loop until ``predicate()`` holds (hang-guarded).

    Only used to let a stream consumer task that was just created run up to the agent's
    gate: the transport has no signal for "the agent is parked at its gate", so bare
    ``sleep(0)`` yields are the only way to let that coroutine take its first step.
    """

    async def _poll() -> None:
        while not predicate():  # noqa: ASYNC110 - no event exists to wait on (see above)
            await asyncio.sleep(0)  # a pure yield, not a timing assumption

    await within(_poll())


async def opened(transport: InMemoryTransport, url: str = URL) -> AgentTask:
    task = await within(transport.next_task(url))
    assert task.started.is_set()
    return task


async def collect(events: AsyncIterator[RemoteStreamEvent]) -> list[RemoteStreamEvent]:
    return [event async for event in events]


async def upper(req: RemoteCallRequest) -> Any:
    return {"out": str(req.message.payload).upper(), "skill": req.skill}


# -- unary ------------------------------------------------------------------------------


async def test_send_returns_handler_result_with_context_and_task_ids() -> None:
    transport = InMemoryTransport({URL: InMemoryAgent(handler=upper)})
    req = request(msg("hello"))
    result = await within(transport.send(req))
    assert isinstance(result, RemoteCallResult)
    assert result.result == {"out": "HELLO", "skill": "echo"}
    assert isinstance(result.context_id, str) and result.context_id
    assert isinstance(result.task_id, str) and result.task_id in transport.tasks
    assert result.agent_url == URL
    assert result.meta is not None and result.meta["task_state"] == "completed"
    assert transport.requests == [req] and transport.requests[0] is req
    task = transport.tasks[result.task_id]
    assert (task.context_id, task.agent_url, task.skill) == (result.context_id, URL, "echo")


async def test_default_handler_echoes_the_payload() -> None:
    transport = InMemoryTransport({URL: InMemoryAgent()})
    payload = {"k": [1, 2]}
    result = await within(transport.send(request(msg(payload))))
    assert result.result == payload


async def test_register_serves_a_new_agent() -> None:
    transport = InMemoryTransport()
    transport.register("mem://late", InMemoryAgent(handler=upper))
    result = await within(transport.send(request(msg("x"), url="mem://late")))
    assert result.result["out"] == "X" and result.agent_url == "mem://late"


async def test_same_trace_reuses_one_context_id() -> None:
    transport = InMemoryTransport({URL: InMemoryAgent()})
    first = msg("one")
    again = msg("two", trace_id=first.trace_id)
    other = msg("three")
    r1 = await within(transport.send(request(first)))
    r2 = await within(transport.send(request(again)))
    r3 = await within(transport.send(request(other)))
    assert r1.context_id == r2.context_id
    assert r3.context_id != r1.context_id
    assert len({r1.task_id, r2.task_id, r3.task_id}) == 3  # one task per call


async def test_meta_context_id_continues_a_conversation() -> None:
    transport = InMemoryTransport({URL: InMemoryAgent()})
    started = await within(transport.send(request(msg("hello"))))
    # A different trace that names the conversation continues it.
    follow_up = msg("and then?", meta={"context_id": started.context_id})
    continued = await within(transport.send(request(follow_up)))
    assert continued.context_id == started.context_id
    assert continued.task_id != started.task_id
    explicit = await within(transport.send(request(msg("x", meta={"context_id": "ctx-given"}))))
    assert explicit.context_id == "ctx-given"
    assert transport.tasks[explicit.task_id].context_id == "ctx-given"


async def test_unary_history_submitted_working_completed() -> None:
    transport = InMemoryTransport({URL: InMemoryAgent()})
    result = await within(transport.send(request()))
    task = transport.tasks[result.task_id]
    assert states(task) == ["submitted", "working", "completed"]
    assert task.state == "completed"
    stamps = [ts for _state, ts in task.history]
    assert stamps == sorted(stamps)
    assert task.started.is_set() and not task.cancel_requested.is_set()


# -- streaming --------------------------------------------------------------------------


async def test_stream_status_events_chunks_in_order_then_done_with_result() -> None:
    transport = InMemoryTransport({URL: InMemoryAgent(handler=upper, chunks=["a", "b", "c"])})
    events = await within(collect(transport.stream(request(msg("q")))))
    assert len(events) == 6
    submitted, working, *chunks, done = events
    assert (submitted.text, submitted.done, submitted.meta) == (
        None, False, {"task_state": "submitted"})
    assert (working.text, working.done, working.meta) == (None, False, {"task_state": "working"})
    assert [c.text for c in chunks] == ["a", "b", "c"]
    assert all(not c.done and c.result is None for c in chunks)
    assert done.done and done.text == ""
    assert done.meta == {"task_state": "completed"}
    assert done.result == {"out": "Q", "skill": "echo"}
    assert {(e.context_id, e.task_id, e.agent_url) for e in events} == {
        (done.context_id, done.task_id, URL)}
    task = transport.tasks[done.task_id]
    assert states(task) == ["submitted", "working", "completed"]


async def test_stream_default_chunk_is_the_stringified_result() -> None:
    transport = InMemoryTransport({URL: InMemoryAgent()})
    events = await within(collect(transport.stream(request(msg(42)))))
    assert [e.text for e in events] == [None, None, "42", ""]
    assert events[-1].result == 42


async def test_stream_chunks_from_an_async_generator_function() -> None:
    async def words(req: RemoteCallRequest) -> AsyncIterator[str]:
        for word in str(req.message.payload).split():
            yield word

    transport = InMemoryTransport({URL: InMemoryAgent(chunks=words)})
    events = await within(collect(transport.stream(request(msg("to be or not")))))
    assert [e.text for e in events if e.text] == ["to", "be", "or", "not"]


async def test_stream_context_id_follows_the_trace_like_send() -> None:
    transport = InMemoryTransport({URL: InMemoryAgent()})
    first = msg("a")
    sent = await within(transport.send(request(first)))
    events = await within(collect(transport.stream(request(msg("b", trace_id=first.trace_id)))))
    assert {e.context_id for e in events} == {sent.context_id}


# -- gate -------------------------------------------------------------------------------


async def test_gate_holds_a_unary_call_until_set() -> None:
    gate = asyncio.Event()
    transport = InMemoryTransport({URL: InMemoryAgent(gate=gate, handler=upper)})
    call = asyncio.ensure_future(transport.send(request(msg("x"))))
    try:
        task = await opened(transport)
        # With no latency the agent runs straight to its gate when it opens the task.
        assert task.state == "working"
        assert not call.done()
        gate.set()
        result = await within(call)
    finally:
        call.cancel()
    assert result.result["out"] == "X"
    assert states(task) == ["submitted", "working", "completed"]


async def test_gate_holds_a_stream_after_submitted() -> None:
    gate = asyncio.Event()
    transport = InMemoryTransport({URL: InMemoryAgent(gate=gate, chunks=["a"])})
    events = transport.stream(request())
    first = await within(anext(events))
    assert first.meta == {"task_state": "submitted"}
    task = transport.tasks[first.task_id]
    assert task.started.is_set()
    nxt = asyncio.ensure_future(anext(events))
    try:
        await until(lambda: task.state == "working")
        assert not nxt.done()
        gate.set()
        working = await within(nxt)
    finally:
        nxt.cancel()
    assert working.meta == {"task_state": "working"}
    rest = await within(collect(events))
    assert [e.text for e in rest] == ["a", ""]
    assert task.state == "completed"


async def test_next_task_hands_out_each_opened_task_once_oldest_first() -> None:
    gate = asyncio.Event()
    transport = InMemoryTransport({URL: InMemoryAgent(gate=gate),
                                   "mem://other": InMemoryAgent(gate=gate)})
    waiting = asyncio.ensure_future(transport.next_task(URL))
    calls = [asyncio.ensure_future(transport.send(request(msg(i)))) for i in range(2)]
    calls.append(asyncio.ensure_future(transport.send(request(msg(9), url="mem://other"))))
    try:
        first = await within(waiting)  # was waiting before any task existed
        second = await opened(transport)
        other = await opened(transport, "mem://other")
        assert [t.task_id for t in (first, second)] == [
            t.task_id for t in transport.tasks.values() if t.agent_url == URL]
        assert other.agent_url == "mem://other"
        assert first.task_id != second.task_id
        gate.set()
        results = await within(asyncio.gather(*calls))
    finally:
        for call in calls:
            call.cancel()
    assert [r.task_id for r in results] == [first.task_id, second.task_id, other.task_id]


# -- cancellation -----------------------------------------------------------------------


async def test_caller_cancelling_a_unary_call_moves_the_task_to_canceled() -> None:
    transport = InMemoryTransport({URL: InMemoryAgent(gate=asyncio.Event())})
    call = asyncio.ensure_future(transport.send(request()))
    task = await opened(transport)
    assert task.state == "working"
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await within(call)
    assert states(task) == ["submitted", "working", "canceled"]


async def test_caller_cancelling_a_stream_moves_the_task_to_canceled() -> None:
    transport = InMemoryTransport({URL: InMemoryAgent(gate=asyncio.Event())})
    events = transport.stream(request())
    first = await within(anext(events))
    task = transport.tasks[first.task_id]
    nxt = asyncio.ensure_future(anext(events))
    await until(lambda: task.state == "working")
    nxt.cancel()
    with pytest.raises(asyncio.CancelledError):
        await within(nxt)
    assert states(task) == ["submitted", "working", "canceled"]


async def test_transport_cancel_records_and_marks_the_task_canceled() -> None:
    transport = InMemoryTransport({URL: InMemoryAgent(gate=asyncio.Event())})
    events = transport.stream(request())
    first = await within(anext(events))
    task = transport.tasks[first.task_id]
    await within(transport.cancel(agent_url=URL, task_id=task.task_id))
    assert transport.cancels == [(URL, task.task_id)]
    assert task.cancel_requested.is_set()
    assert task.state == "canceled"
    await events.aclose()


async def test_cancel_of_an_unknown_task_is_a_lookup_error() -> None:
    transport = InMemoryTransport({URL: InMemoryAgent()})
    result = await within(transport.send(request()))
    with pytest.raises(LookupError, match="no task 'task-nope'"):
        await transport.cancel(agent_url=URL, task_id="task-nope")
    # A real task id at the wrong agent is unknown there too.
    with pytest.raises(LookupError, match="mem://elsewhere"):
        await transport.cancel(agent_url="mem://elsewhere", task_id=result.task_id)
    assert transport.cancels == []


async def test_cancel_after_completion_leaves_the_task_completed() -> None:
    transport = InMemoryTransport({URL: InMemoryAgent()})
    result = await within(transport.send(request()))
    await within(transport.cancel(agent_url=URL, task_id=result.task_id))
    assert transport.tasks[result.task_id].state == "completed"


async def test_cancel_latency_delays_the_acknowledgement() -> None:
    # cancel_latency_s is long enough that the loop cannot reach it between our checks;
    # the test asserts ordering only and never waits for the latency to elapse by itself.
    transport = InMemoryTransport({URL: InMemoryAgent(gate=asyncio.Event(),
                                                      cancel_latency_s=0.2)})
    events = transport.stream(request())
    first = await within(anext(events))
    task = transport.tasks[first.task_id]
    cancelling = asyncio.ensure_future(
        transport.cancel(agent_url=URL, task_id=task.task_id))
    try:
        await within(task.cancel_requested.wait())
        # Requested (and recorded) but not yet acknowledged.
        assert transport.cancels == [(URL, task.task_id)]
        assert not cancelling.done()
        assert task.state == "submitted"
        await within(cancelling)
    finally:
        cancelling.cancel()
        await events.aclose()
    assert task.state == "canceled"
    assert states(task)[-1] == "canceled"


async def test_transport_cancel_ends_a_running_unary_task() -> None:
    gate = asyncio.Event()
    transport = InMemoryTransport({URL: InMemoryAgent(gate=gate)})
    call = asyncio.ensure_future(transport.send(request()))
    try:
        task = await opened(transport)
        assert task.state == "working"
        await within(transport.cancel(agent_url=URL, task_id=task.task_id))
        gate.set()  # let the agent go on if it is (wrongly) still running
        outcome: Any
        try:
            outcome = await within(call)
        except (asyncio.CancelledError, Exception) as exc:  # any end will do
            outcome = exc
    finally:
        call.cancel()
    if isinstance(outcome, RemoteCallResult):
        assert outcome.meta is not None and outcome.meta["task_state"] == "canceled"
    assert states(task) == ["submitted", "working", "canceled"]


async def test_transport_cancel_ends_a_running_stream() -> None:
    gate = asyncio.Event()
    transport = InMemoryTransport({URL: InMemoryAgent(gate=gate, chunks=["a", "b"])})
    events = transport.stream(request())
    first = await within(anext(events))
    task = transport.tasks[first.task_id]
    await within(transport.cancel(agent_url=URL, task_id=task.task_id))
    gate.set()
    rest: list[RemoteStreamEvent] = []
    try:
        async for event in events:
            rest.append(event)
    except (asyncio.CancelledError, Exception):  # ending in an error is fine
        pass
    assert [e.text for e in rest if e.text] == []
    assert all((e.meta or {}).get("task_state") != "completed" for e in rest)
    assert states(task)[-1] == "canceled"
    assert "completed" not in states(task)


async def test_cancel_after_local_cancel_records_canceled_once() -> None:
    transport = InMemoryTransport({URL: InMemoryAgent(gate=asyncio.Event())})
    events = transport.stream(request())
    first = await within(anext(events))
    task = transport.tasks[first.task_id]
    nxt = asyncio.ensure_future(anext(events))
    await until(lambda: task.state == "working")
    nxt.cancel()
    with pytest.raises(asyncio.CancelledError):
        await within(nxt)
    await within(transport.cancel(agent_url=URL, task_id=task.task_id))
    assert states(task) == ["submitted", "working", "canceled"]


# -- injected failures ------------------------------------------------------------------


async def test_fail_with_fails_a_unary_call() -> None:
    transport = InMemoryTransport({URL: InMemoryAgent(fail_with="agent down")})
    with pytest.raises(RemoteAgentError, match=r"^agent down$") as info:
        await within(transport.send(request()))
    assert isinstance(info.value, RuntimeError)
    (task,) = transport.tasks.values()
    assert states(task) == ["submitted", "working", "failed"]


async def test_fail_with_fails_a_stream_after_submitted() -> None:
    transport = InMemoryTransport({URL: InMemoryAgent(fail_with="agent down", chunks=["a"])})
    seen: list[RemoteStreamEvent] = []
    with pytest.raises(RemoteAgentError, match="agent down"):
        async for event in transport.stream(request()):
            seen.append(event)
    assert [e.meta for e in seen] == [{"task_state": "submitted"}]
    (task,) = transport.tasks.values()
    assert states(task) == ["submitted", "working", "failed"]


@pytest.mark.parametrize(("fail_with", "message"), [("mid-stream", "mid-stream"),
                                                    (None, "stream failed")])
async def test_fail_after_chunks_fails_mid_stream(fail_with: str | None, message: str) -> None:
    agent = InMemoryAgent(chunks=["a", "b", "c", "d"], fail_after_chunks=2, fail_with=fail_with)
    transport = InMemoryTransport({URL: agent})
    seen: list[RemoteStreamEvent] = []
    with pytest.raises(RemoteAgentError) as info:
        async for event in transport.stream(request()):
            seen.append(event)
    assert str(info.value) == message
    assert [e.text for e in seen] == [None, None, "a", "b"]
    assert not any(e.done for e in seen)
    (task,) = transport.tasks.values()
    assert states(task) == ["submitted", "working", "failed"]


# -- lookup errors ----------------------------------------------------------------------


async def test_unknown_agent_url_is_a_lookup_error_naming_the_fix() -> None:
    transport = InMemoryTransport({URL: InMemoryAgent()})
    req = request(url="mem://missing")
    with pytest.raises(LookupError) as info:
        await transport.send(req)
    text = str(info.value)
    assert "mem://missing" in text and URL in text  # what was asked for, what exists
    assert "InMemoryTransport.register" in text  # how to fix it
    with pytest.raises(LookupError, match="mem://missing"):
        await anext(transport.stream(req))
    assert transport.tasks == {} and transport.requests == []


async def test_unknown_agent_url_with_no_agents_says_none() -> None:
    with pytest.raises(LookupError, match=r"known: none"):
        await InMemoryTransport().send(request())


async def test_unknown_skill_is_a_lookup_error_listing_the_skills() -> None:
    transport = InMemoryTransport({URL: InMemoryAgent(skills=("search", "summarise"))})
    with pytest.raises(LookupError) as info:
        await transport.send(request(skill="translate"))
    text = str(info.value)
    assert "'translate'" in text and "search" in text and "summarise" in text
    with pytest.raises(LookupError, match="translate"):
        await anext(transport.stream(request(skill="translate")))
    assert transport.tasks == {}
    # A listed skill is served; an agent without a skill list accepts any skill.
    assert (await within(transport.send(request(msg("ok"), skill="search")))).result == "ok"
    transport.register("mem://any", InMemoryAgent())
    anything = request(msg("ok"), url="mem://any", skill="whatever")
    assert (await within(transport.send(anything))).result == "ok"
