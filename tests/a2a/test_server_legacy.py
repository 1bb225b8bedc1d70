"""The 2.1 adapter and routes (spec §16), unchanged: card, send, stream, cancel, lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import httpx
import pytest
from server_support import (
    CARD,
    Gate,
    chunk_flow,
    echo_flow,
    free_port,
    http,
    make_adapter,
    no_running_tasks,
    node,
    serve,
    served,
)

from penguiflow import FlowError, Message, StreamChunk, create
from penguiflow.state import InMemoryStateStore, RemoteBinding
from penguiflow.streaming import format_sse_event
from penguiflow_a2a.server import (
    A2AAgentCard,
    A2AMessagePayload,
    A2ARequestError,
    A2AServerAdapter,
    A2ASkill,
    A2ATaskCancelRequest,
    create_a2a_app,
)


def frames(raw: str) -> list[tuple[str, list[str]]]:
    """``(event name, data lines)`` per SSE frame of a 2.1 stream."""
    out = []
    for block in raw.split("\n\n"):
        if not block.strip():
            continue
        lines = block.split("\n")
        name = next((line[7:] for line in lines if line.startswith("event: ")), "")
        out.append((name, [line[6:] for line in lines if line.startswith("data: ")]))
    return out


def test_models_follow_the_2_1_contract() -> None:
    card = A2AAgentCard.model_validate({**CARD, "extra_field": 1})
    assert card.to_payload() == card.model_dump()
    assert card.to_payload()["extra_field"] == 1
    assert (card.version, card.schema_version) == ("2.0.0", "1.0")
    skill = A2ASkill(name="s", description="d", tags=["x"])
    assert (skill.mode, skill.inputs, skill.outputs) == ("both", {}, {})
    by_alias = A2AMessagePayload.model_validate(
        {"payload": 1, "traceId": "t", "contextId": "c", "taskId": "k", "deadlineSeconds": 2.5})
    by_name = A2AMessagePayload(payload=1, trace_id="t", context_id="c", task_id="k",
                                deadline_s=2.5)
    assert by_alias == by_name
    assert A2ATaskCancelRequest(task_id="a") == A2ATaskCancelRequest.model_validate({"taskId": "a"})
    err = A2ARequestError(status_code=418, detail="teapot")
    assert (err.status_code, err.detail) == (418, "teapot")


async def test_send_success_binding_and_meta() -> None:
    store = InMemoryStateStore()

    async def work(message: Message, ctx: Any) -> Message:
        return message.model_copy(update={"payload": message.payload.upper(),
                                          "meta": {"seen": True}})

    flow = create(node(work).to(), state_store=store)
    async with served(flow) as (url, adapter), http() as client:
        response = await client.post(url + "/message/send", json={
            "payload": "hi", "headers": {"tenant": "t1"}, "traceId": "trace-1",
            "meta": {"k": "v"}})
        assert response.status_code == 200
        assert response.json() == {"status": "succeeded", "taskId": "trace-1",
                                   "contextId": "trace-1", "traceId": "trace-1",
                                   "output": "HI", "meta": {"seen": True}}
        assert store._bindings == [RemoteBinding("trace-1", "trace-1", "trace-1", url)]
        agent = await client.get(url + "/agent")
        assert agent.json() == adapter.agent_card.to_payload()
        no_running_tasks(adapter, flow)


async def test_send_failed_with_flow_error_payload() -> None:
    async def boom(message: Message, ctx: Any) -> None:
        raise ValueError("kaboom")

    flow = create(node(boom, "boom").to(), emit_errors_to_rookery=True)
    async with served(flow) as (url, _), http() as client:
        body = (await client.post(url + "/message/send", json={
            "payload": "x", "taskId": "task-9", "contextId": "ctx-9"})).json()
    assert body["status"] == "failed"
    assert (body["taskId"], body["contextId"]) == ("task-9", "ctx-9")
    assert body["error"]["code"] == "NODE_EXCEPTION"
    assert body["error"]["node_name"] == "boom"
    assert "kaboom" in body["error"]["message"]


async def test_send_cancelled_missing_tenant_and_active_task() -> None:
    gate = Gate()
    flow = gate.flow()
    async with served(flow, default_headers=None) as (url, adapter), http() as client:
        missing = await client.post(url + "/message/send", json={"payload": "x"})
        assert missing.status_code == 422
        send = asyncio.create_task(client.post(url + "/message/send", json={
            "payload": "slow", "headers": {"tenant": "t"}, "taskId": "T1"}))
        await asyncio.wait_for(gate.started.wait(), 5)
        again = await client.post(url + "/message/send", json={
            "payload": "dup", "headers": {"tenant": "t"}, "taskId": "T1"})
        assert again.status_code == 409
        cancel = await client.post(url + "/tasks/cancel", json={"taskId": "T1"})
        body = cancel.json()
        assert body["taskId"] == "T1" and body["cancelled"] is True
        assert body["contextId"] == body["traceId"]
        result = (await asyncio.wait_for(send, 5)).json()
        assert result == {"status": "cancelled", "taskId": "T1", "contextId": body["contextId"],
                          "traceId": body["traceId"]}
        await asyncio.wait_for(gate.cancelled.wait(), 5)
        unknown = await client.post(url + "/tasks/cancel", json={"taskId": "nope"})
        assert unknown.json() == {"taskId": "nope", "cancelled": False}
        no_running_tasks(adapter, flow)


async def test_stream_frames_in_order_with_chunks() -> None:
    flow = chunk_flow(["a", "b\nc", "d"], final={"total": 3})
    async with (served(flow) as (url, _), http() as client,
                client.stream("POST", url + "/message/stream",
                              json={"payload": "go", "traceId": "tr"}) as response):
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-a2a-task-id"] == "tr"
        assert response.headers["x-a2a-context-id"] == "tr"
        raw = (await response.aread()).decode()
    ids = {"taskId": "tr", "contextId": "tr"}
    expected_chunks = [format_sse_event(StreamChunk(stream_id="tr", seq=i, text=t,
                                                    done=i == 2, meta=ids))
                       for i, t in enumerate(["a", "b\nc", "d"])]
    expected = (f"event: status\ndata: {json.dumps({'status': 'accepted', **ids})}\n\n"
                + "".join(expected_chunks)
                + f"event: artifact\ndata: {json.dumps({**ids, 'output': {'total': 3}})}\n\n"
                + f"event: done\ndata: {json.dumps(ids)}\n\n")
    assert raw == expected


async def test_stream_cancelled_gives_trace_cancelled_then_done() -> None:
    gate = asyncio.Event()
    flow = chunk_flow(["first", "never"], gate=gate)
    async with served(flow) as (url, adapter), http() as client:
        async with client.stream("POST", url + "/message/stream",
                                 json={"payload": "go", "taskId": "S"}) as response:
            lines = response.aiter_lines()
            seen: list[str] = []
            while not any(line.startswith("event: chunk") for line in seen):
                seen.append(await anext(lines))
            cancel = await client.post(url + "/tasks/cancel", json={"taskId": "S"})
            assert cancel.json()["cancelled"] is True
            rest = frames("\n".join([line async for line in lines]))
        assert [name for name, _ in rest][-2:] == ["error", "done"]
        error = json.loads(rest[-2][1][0])
        assert error == {"taskId": "S", "contextId": error["contextId"],
                         "code": "TRACE_CANCELLED", "message": "Trace cancelled"}
        no_running_tasks(adapter, flow)


async def test_stream_flow_error_frame() -> None:
    async def boom(message: Message, ctx: Any) -> None:
        raise RuntimeError("bad")

    flow = create(node(boom).to(), emit_errors_to_rookery=True)
    async with served(flow) as (url, _), http() as client:
        raw = (await client.post(url + "/message/stream", json={"payload": 1})).text
    names = [name for name, _ in frames(raw)]
    assert names == ["status", "error", "done"]
    error = json.loads(frames(raw)[1][1][0])
    assert error["code"] == "NODE_EXCEPTION" and {"taskId", "contextId"} <= error.keys()


async def test_concurrent_plain_dict_results_are_correlated() -> None:
    flow = echo_flow()
    async with served(flow) as (url, adapter), http() as client:
        replies = await asyncio.gather(*[
            client.post(url + "/message/send", json={"payload": i}) for i in range(20)])
        for i, reply in enumerate(replies):
            assert reply.json()["output"] == {"n": i}
        no_running_tasks(adapter, flow)


class DuckFlow:
    """Only run/stop/emit/fetch/cancel/save_remote_binding: results in reverse order."""

    def __init__(self) -> None:
        self.out: asyncio.Queue[Any] = asyncio.Queue()
        self.pending: list[Message] = []
        self.stops = 0
        self.bindings: list[RemoteBinding] = []
        self.running = False

    def run(self, *, registry: Any = None) -> None:
        self.running = True

    async def stop(self) -> None:
        self.stops += 1

    async def emit(self, msg: Message, to: Any = None) -> None:
        self.pending.append(msg)
        if len(self.pending) == 3:  # answer all three, last first, with trace-carrying items
            for m in reversed(self.pending):
                await self.out.put(m.model_copy(update={"payload": m.payload * 2}))

    async def fetch(self, from_: Any = None) -> Any:
        return await self.out.get()

    async def cancel(self, trace_id: str) -> bool:
        return False

    async def save_remote_binding(self, binding: RemoteBinding) -> None:
        self.bindings.append(binding)


async def test_duck_typed_flow_lifespan_and_correlation() -> None:
    flow = DuckFlow()
    adapter = A2AServerAdapter(flow, agent_card=CARD, agent_url="http://agent",
                               default_headers={"tenant": "t"})
    app = create_a2a_app(adapter, include_docs=False)
    async with app.router.lifespan_context(app):
        assert adapter.started
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
            assert (await client.get("/docs")).status_code == 404
            replies = await asyncio.gather(*[
                client.post("/message/send", json={"payload": i}) for i in (1, 2, 3)])
        assert [r.json()["output"] for r in replies] == [2, 4, 6]
        assert len(flow.bindings) == 3
    assert not adapter.started and flow.stops == 1
    await adapter.stop()
    assert flow.stops == 1


async def test_plain_values_from_a_duck_flow_go_to_the_single_waiter() -> None:
    class Plain(DuckFlow):
        async def emit(self, msg: Message, to: Any = None) -> None:
            await self.out.put({"plain": msg.payload})

    flow = Plain()
    adapter = A2AServerAdapter(flow, agent_card=CARD, agent_url="http://agent",
                               default_headers={"tenant": "t"})
    with pytest.raises(A2ARequestError) as not_started:
        await adapter.handle_send(A2AMessagePayload(payload=1))
    assert not_started.value.status_code == 503
    await adapter.start()
    await adapter.start()
    try:
        reply = await adapter.handle_send(A2AMessagePayload(payload=5))
        assert reply["output"] == {"plain": 5}
    finally:
        await adapter.stop()
    assert flow.stops == 1


async def test_stop_wakes_waiting_requests() -> None:
    gate = Gate()
    adapter = A2AServerAdapter(gate.flow(), agent_card=CARD, agent_url="http://agent",
                               default_headers={"tenant": "t"})
    await adapter.start()
    waiting = asyncio.create_task(adapter.handle_send({"payload": "x"}))
    await asyncio.wait_for(gate.started.wait(), 5)
    await adapter.stop()
    with pytest.raises(A2ARequestError) as info:
        await asyncio.wait_for(waiting, 5)
    assert info.value.status_code == 503 and "shutting down" in info.value.detail


async def test_adapter_stream_api_emits_on_first_advance() -> None:
    flow = chunk_flow(["x"], final="end")
    adapter = A2AServerAdapter(flow, agent_card=A2AAgentCard(**CARD), agent_url="http://a",
                               default_headers={"tenant": "t"})
    await adapter.start()
    try:
        frames_iter, task_id, context_id = await adapter.stream(
            A2AMessagePayload(payload="p", task_id="K", context_id="C"))
        assert (task_id, context_id) == ("K", "C")
        assert adapter.tasks.get("K") is not None and not adapter.tasks.get("K").launched
        out = [f async for f in frames_iter]
        assert [name for name, _ in frames(b"".join(out).decode())] == [
            "status", "done", "artifact", "done"]  # the chunk is done=True: "done" event name
        assert (await adapter.cancel({"taskId": "K"}))["cancelled"] is False
    finally:
        await adapter.stop()


def test_missing_fastapi_is_a_clear_runtime_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "fastapi", None)
    adapter = A2AServerAdapter(echo_flow(), agent_card=CARD, agent_url="http://a")
    with pytest.raises(RuntimeError, match=r"penguiflow\[a2a-server\]"):
        create_a2a_app(adapter)


async def test_flow_error_outside_rookery_unrouted_is_counted() -> None:
    flow = echo_flow()
    adapter = A2AServerAdapter(flow, agent_card=CARD, agent_url="http://a",
                               default_headers={"tenant": "t"})
    await adapter.start()
    try:
        # An item of a trace no request waits for: counted and dropped, not misrouted.
        await flow.emit(Message(payload=1, headers={"tenant": "t"}))
        reply = await adapter.handle_send({"payload": 2})
        assert reply["output"] == {"n": 2}
        assert adapter.unrouted_items == 1
    finally:
        await adapter.stop()
    assert isinstance(FlowError, type)


async def test_a_stream_client_leaving_before_its_message_is_taken_ends_its_task() -> None:
    """The 2.1 stream route emits in the request: a client that leaves while the
    flow waits for room cancels that emit; the task must end (it held a slot for ever)."""
    gate = Gate()
    async with served(gate.flow(queue_maxsize=1), max_tasks=3) as (url, adapter):
        port = int(url.rsplit(":", 1)[1])
        async with httpx.AsyncClient(timeout=30) as client:
            first = asyncio.ensure_future(client.post(f"{url}/message/send", json={"payload": 1}))
            await asyncio.wait_for(gate.started.wait(), 10)  # the node holds the first
            second = asyncio.ensure_future(client.post(f"{url}/message/send",
                                                       json={"payload": 2}))
            # Polled (no event to await across the server): the second is queued.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while sum(t.state == "TASK_STATE_WORKING" for t in adapter.tasks) < 2:
                assert loop.time() < deadline
                await asyncio.sleep(0.01)
            # A third, on the stream route: its emit waits for room; its client leaves.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            body = json.dumps({"payload": 3}).encode()
            writer.write(b"POST /message/stream HTTP/1.1\r\nHost: x\r\nContent-Type: "
                         b"application/json\r\nContent-Length: " + str(len(body)).encode()
                         + b"\r\n\r\n" + body)
            await writer.drain()
            assert await asyncio.wait_for(reader.read(100), 10)  # the stream began
            writer.close()
            # Polled: the server notices the departure on its own. Before, the task
            # stayed SUBMITTED for ever.
            deadline = loop.time() + 10
            while not any(t.state == "TASK_STATE_FAILED" for t in adapter.tasks):
                assert loop.time() < deadline, [(t.state, t.launched) for t in adapter.tasks]
                await asyncio.sleep(0.01)
            gate.release.set()
            assert (await first).status_code == 200 and (await second).status_code == 200
            assert adapter.tasks.running() == []


async def test_a_lone_surrogate_in_an_output_or_chunk_reaches_the_client() -> None:
    # Legal in a Python str, not in UTF-8: the send reply was a 500, and the stream
    # was cut short at the chunk (the client saw an incomplete chunked body).
    async def work(message: Message, ctx: Any) -> Message:
        return message.model_copy(update={"payload": "a\ud800b 日本"})

    async with served(create(node(work).to())) as (url, _), http() as client:
        response = await client.post(url + "/message/send",
                                     json={"payload": "hi", "traceId": "t1"})
        assert response.status_code == 200
        assert response.json()["output"] == "a\ud800b 日本"

    flow = chunk_flow(["a", "b\ud800c", "d"], final={"t": "x\udfffy"})
    async with (served(flow) as (url, _), http() as client,
                client.stream("POST", url + "/message/stream",
                              json={"payload": "go", "traceId": "tr"}) as response):
        got = frames((await response.aread()).decode())
    assert [name for name, _ in got] == ["status", "chunk", "chunk", "done", "artifact",
                                         "done"]
    assert got[2][1][0] == "b\ufffdc"  # raw text on the wire: the surrogate replaced
    assert json.loads(got[4][1][0])["output"] == {"t": "x\udfffy"}  # JSON: escaped


# -- ids a header cannot carry, responses that never start, invalid trace ids --------------
@pytest.mark.parametrize(("field", "value", "header"), [
    ("contextId", "ctx-\u2603", "ctx-%E2%98%83"),  # not Latin-1: was a 500
    ("taskId", "task\r\nX-Evil: 1", "task%0D%0AX-Evil:%201"),  # was a dropped connection
    ("taskId", "task\x00", "task%00"),
    ("taskId", "edge ", "edge%20"),  # h11 refuses a trailing blank
    ("taskId", "t\u00e2che-\u00e9", "t\u00e2che-\u00e9"),  # Latin-1: sent as is, as 2.1 did
])
async def test_stream_ids_a_header_cannot_carry_are_percent_encoded(
        field: str, value: str, header: str) -> None:
    flow = echo_flow()
    async with (served(flow) as (url, adapter), http() as client,
                client.stream("POST", url + "/message/stream",
                              json={"payload": "hi", field: value}) as response):
        assert response.status_code == 200
        name = "x-a2a-task-id" if field == "taskId" else "x-a2a-context-id"
        assert response.headers[name] == header
        assert "x-evil" not in response.headers
        got = frames((await response.aread()).decode())
        assert [n for n, _ in got] == ["status", "artifact", "done"]
        assert json.loads(got[0][1][0])[field] == value  # the exact id, in the body
        no_running_tasks(adapter, flow)


async def test_ids_a_header_cannot_carry_never_leave_tasks_behind() -> None:
    # Each such stream left a task SUBMITTED for ever: three exhausted max_tasks=3.
    flow = echo_flow()
    async with served(flow, max_tasks=3) as (url, adapter), http() as client:
        for i in range(4):
            response = await client.post(url + "/message/stream",
                                         json={"payload": i, "contextId": f"ctx-{i}-\u2603"})
            assert response.status_code == 200
        sent = await client.post(url + "/message/send", json={"payload": "normal"})
        assert sent.status_code == 200 and sent.json()["output"] == {"n": "normal"}
        no_running_tasks(adapter, flow)


def failing_response_start(app: Any) -> Any:
    """ASGI middleware: ``/message/stream``'s response start fails (as an unsendable
    header did), so the response never streams a byte."""

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/message/stream":
            await app(scope, receive, send)
            return

        async def broken(message: Any) -> None:
            if message["type"] == "http.response.start" and message["status"] == 200:
                raise OSError("the response could not be started")
            await send(message)

        await app(scope, receive, broken)

    return wrapped


async def test_a_stream_response_that_never_starts_ends_its_task() -> None:
    flow = echo_flow()
    port = free_port()
    adapter = make_adapter(flow, port, max_tasks=1)
    async with serve(adapter, port, wrap=failing_response_start) as url, http() as client:
        with contextlib.suppress(httpx.HTTPError):  # a 500 or a closed connection
            response = await client.post(url + "/message/stream",
                                         json={"payload": 1, "taskId": "K"})
            assert response.status_code != 200
        record = adapter.tasks.get("K")
        assert record is not None and not record.launched
        assert record.state == "TASK_STATE_FAILED"  # was SUBMITTED for ever
        assert "before the message was sent" in record.outcome.detail
        # Its slot is free again (max_tasks=1).
        sent = await client.post(url + "/message/send", json={"payload": 2})
        assert sent.status_code == 200
        no_running_tasks(adapter, flow)


async def test_stream_frames_closed_before_the_emit_end_the_task() -> None:
    # An async generator closed before its first advance never runs its finally:
    # the message was never emitted, and the task stayed SUBMITTED for ever.
    flow = echo_flow()
    adapter = A2AServerAdapter(flow, agent_card=CARD, agent_url="http://a",
                               default_headers={"tenant": "t"})
    await adapter.start()
    try:
        frames_iter, task_id, _ = await adapter.stream({"payload": "p"})
        await frames_iter.aclose()
        record = adapter.tasks.get(task_id)
        assert record is not None and record.state == "TASK_STATE_FAILED"
        assert adapter.tasks.running() == [] and record.subscribers == set()
        assert (await adapter.handle_send({"payload": "next"}))["output"] == {"n": "next"}
    finally:
        await adapter.stop()


@pytest.mark.parametrize("trace_id", ["", "bad\x00trace", "x" * 300, "line\nbreak"])
async def test_an_invalid_trace_id_is_a_422_before_any_task(trace_id: str) -> None:
    # Was: HTTP 500, a FAILED task, and a RemoteBinding saved for a trace that never ran.
    store = InMemoryStateStore()
    flow = echo_flow(state_store=store)
    async with served(flow) as (url, adapter), http() as client:
        for route in ("/message/send", "/message/stream"):
            response = await client.post(url + route,
                                         json={"payload": "hi", "traceId": trace_id})
            assert response.status_code == 422
            assert response.json()["detail"].startswith("invalid traceId: ")
        assert len(adapter.tasks) == 0 and store._bindings == []
        ok = await client.post(url + "/message/send", json={"payload": "hi", "traceId": "ok-1"})
        assert ok.status_code == 200 and ok.json()["traceId"] == "ok-1"


async def test_the_first_advance_of_a_stream_emits_the_message_so_it_can_be_cancelled() -> None:
    # Spec §16: "the message is emitted when the iterator is first advanced", and a
    # cancel of a stream still running answers True. The accepted frame came first
    # and the emit only at the second advance: a cancel after reading it found no
    # trace running (False), and the node never ran.
    gate = Gate()
    adapter = A2AServerAdapter(gate.flow(), agent_card=CARD, agent_url="http://a",
                               default_headers={"tenant": "t"})
    await adapter.start()
    try:
        frames_iter, task_id, _ = await adapter.stream({"payload": "p"})
        first = await anext(frames_iter)
        assert first.startswith(b"event: status") and b"accepted" in first
        await asyncio.wait_for(gate.started.wait(), 10)  # the node runs already
        answer = await adapter.cancel({"taskId": task_id})
        assert answer["cancelled"] is True
        rest = b"".join([frame async for frame in frames_iter])
        assert b"TRACE_CANCELLED" in rest and rest.endswith(b"\n\n")
    finally:
        await adapter.stop()

