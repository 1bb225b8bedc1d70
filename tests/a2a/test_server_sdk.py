"""Our server against the official a2a-sdk 1.3 client (a2a.md §13.1), 1.0 and 0.3.

Every case runs on a real loopback socket. Slow flows wait on an asyncio.Event
the test controls (``Gate`` / ``gate``), never on sleeps.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from a2a.client import Client, ClientConfig, create_client
from a2a.types import (
    AgentCapabilities,
    AgentCard,
    AgentInterface,
    CancelTaskRequest,
    GetTaskRequest,
    ListTasksRequest,
    Message,
    Part,
    Role,
    SendMessageRequest,
    StreamResponse,
    SubscribeToTaskRequest,
    TaskPushNotificationConfig,
    TaskState,
)
from a2a.utils.errors import (
    PushNotificationNotSupportedError,
    TaskNotCancelableError,
    TaskNotFoundError,
    UnsupportedOperationError,
)
from google.protobuf.timestamp_pb2 import Timestamp
from server_support import (
    V1,
    Gate,
    chunk_flow,
    echo_flow,
    http,
    no_running_tasks,
    rpc,
    served,
    user_message,
)

TEXTS = ["echo:", " hello", " (done)"]


def request(text: str, context_id: str | None = None) -> SendMessageRequest:
    message = Message(role=Role.ROLE_USER, message_id=str(uuid.uuid4()), parts=[Part(text=text)])
    if context_id:
        message.context_id = context_id
    return SendMessageRequest(message=message)


@asynccontextmanager
async def sdk_client(target: str | AgentCard, **config: Any) -> AsyncIterator[Client]:
    async with http() as hc:
        client = await create_client(target, client_config=ClientConfig(httpx_client=hc,
                                                                        **config))
        try:
            yield client
        finally:
            await client.close()


def kinds(events: list[StreamResponse]) -> list[str]:
    return [str(e.WhichOneof("payload")) for e in events]


def state_of(event: StreamResponse) -> int:
    return event.status_update.status.state if event.HasField("status_update") \
        else event.task.status.state


async def test_blocking_send_returns_the_completed_task_with_artifacts() -> None:
    flow = chunk_flow(TEXTS, final={"ok": True})
    async with served(flow) as (url, adapter), sdk_client(url, streaming=False) as client:
        events = [e async for e in client.send_message(request("hello"))]
        assert kinds(events) == ["task"]
        task = events[0].task
        assert task.status.state == TaskState.TASK_STATE_COMPLETED
        by_id = {a.artifact_id: a for a in task.artifacts}
        assert [p.text for p in by_id["stream"].parts] == TEXTS
        assert by_id["result"].parts[0].data.struct_value["ok"] is True
        assert task.history[0].parts[0].text == "hello"
        fetched = await client.get_task(GetTaskRequest(id=task.id))
        assert fetched.status.state == TaskState.TASK_STATE_COMPLETED
        no_running_tasks(adapter, flow)


async def test_streaming_send_event_order_and_context_reuse() -> None:
    flow = chunk_flow(TEXTS, final="fin")
    async with served(flow) as (url, _), sdk_client(url) as client:
        events = [e async for e in client.send_message(request("hello"))]
        assert kinds(events) == ["task", "status_update", *["artifact_update"] * 4,
                                 "status_update"]
        assert events[0].task.status.state == TaskState.TASK_STATE_SUBMITTED
        assert state_of(events[1]) == TaskState.TASK_STATE_WORKING
        chunks = [e.artifact_update for e in events[2:5]]
        assert [c.artifact.parts[0].text for c in chunks] == TEXTS
        assert [(c.append, c.last_chunk) for c in chunks] == [
            (False, False), (True, False), (True, True)]
        result = events[5].artifact_update
        assert (result.artifact.parts[0].text, result.last_chunk) == ("fin", True)
        assert state_of(events[-1]) == TaskState.TASK_STATE_COMPLETED
        first = events[0].task
        again = [e async for e in client.send_message(request("again", first.context_id))]
        assert again[0].task.context_id == first.context_id
        assert again[0].task.id != first.id
        task = await client.get_task(GetTaskRequest(id=first.id))
        assert [p.text for p in task.artifacts[0].parts] == TEXTS


async def test_list_tasks_status_timestamp_after_keeps_tasks_changed_since() -> None:
    # Before: statusTimestampAfter was ignored (a poller asking "what changed since T"
    # got every task) and a value of the wrong type (5) was accepted.
    def stamp(text: str) -> Timestamp:
        value = Timestamp()
        value.FromJsonString(text)
        return value

    async with served(echo_flow()) as (url, adapter), sdk_client(url, streaming=False) as client:
        async def sent(text: str) -> Any:
            events = [e async for e in client.send_message(request(text))]
            return events[-1].task

        old = await sent("old")
        record = adapter.tasks.get(old.id)
        assert record is not None
        # As if it had ended in 2020 (no sleeping until the clock moves on).
        record.status["timestamp"] = "2020-06-01T00:00:00.000Z"
        new = await sent("new")

        async def listed(after: str) -> list[str]:
            page = await client.list_tasks(ListTasksRequest(status_timestamp_after=stamp(after)))
            assert page.total_size == len(page.tasks)
            return [t.id for t in page.tasks]

        assert await listed("2025-01-01T00:00:00Z") == [new.id]
        assert await listed("2020-06-01T00:00:00Z") == [new.id, old.id]  # at or after
        assert await listed("2020-06-01T00:00:00.001Z") == [new.id]
        assert await listed("2999-01-01T00:00:00Z") == []
        all_tasks = await client.list_tasks(ListTasksRequest())
        assert {t.id for t in all_tasks.tasks} == {old.id, new.id}

        async with http() as raw:
            async def answer(after: object) -> dict[str, object]:
                response = await raw.post(url + "/", headers=V1, json=rpc(
                    "ListTasks", {"statusTimestampAfter": after}))
                return dict(response.json())

            ok = await answer("2020-06-01T02:00:00+02:00")  # an offset is RFC 3339 too
            assert [t["id"] for t in ok["result"]["tasks"]] == [new.id, old.id]
            for bad in (5, "yesterday", "2026-01-01", "2026-01-01T00:00:00",
                        "2026-02-30T00:00:00Z"):
                error = (await answer(bad))["error"]
                assert error["code"] == -32602, (bad, error)
                assert "statusTimestampAfter" in error["message"]
                assert "RFC 3339" in error["message"]
            # A task that has just been submitted has a status timestamp too.
            sent = await raw.post(url + "/", headers=V1, json=rpc("SendMessage", {
                "message": user_message("x"), "configuration": {"returnImmediately": True}}))
            assert "timestamp" in sent.json()["result"]["task"]["status"]


async def test_cancel_a_running_task_closes_the_open_stream() -> None:
    gate = Gate()
    flow = gate.flow()
    async with served(flow) as (url, adapter), sdk_client(url) as client:
        stream = client.send_message(request("slow"))
        first = await anext(stream)
        working = await anext(stream)
        assert state_of(working) == TaskState.TASK_STATE_WORKING
        await asyncio.wait_for(gate.started.wait(), 5)
        canceled = await client.cancel_task(CancelTaskRequest(id=first.task.id))
        assert canceled.status.state == TaskState.TASK_STATE_CANCELED
        rest = [e async for e in stream]
        assert kinds(rest) == ["status_update"]
        assert state_of(rest[0]) == TaskState.TASK_STATE_CANCELED
        await asyncio.wait_for(gate.cancelled.wait(), 5)
        with pytest.raises(TaskNotCancelableError):
            await client.cancel_task(CancelTaskRequest(id=first.task.id))
        no_running_tasks(adapter, flow)


async def test_resubscribe_after_aclose_gets_snapshot_then_live_events() -> None:
    gate = asyncio.Event()
    flow = chunk_flow(TEXTS, gate=gate, final="end")
    async with served(flow) as (url, adapter), sdk_client(url) as client:
        stream = client.send_message(request("resub"))
        task = (await anext(stream)).task
        await anext(stream)  # WORKING
        assert (await anext(stream)).artifact_update.artifact.parts[0].text == TEXTS[0]
        await stream.aclose()
        events = client.subscribe(SubscribeToTaskRequest(id=task.id))
        snapshot = await anext(events)
        assert snapshot.task.id == task.id
        assert snapshot.task.status.state == TaskState.TASK_STATE_WORKING
        assert [p.text for p in snapshot.task.artifacts[0].parts] == [TEXTS[0]]
        gate.set()
        live = [e async for e in events]
        assert kinds(live) == ["artifact_update"] * 3 + ["status_update"]
        assert [e.artifact_update.artifact.parts[0].text for e in live[:2]] == TEXTS[1:]
        assert state_of(live[-1]) == TaskState.TASK_STATE_COMPLETED
        with pytest.raises(UnsupportedOperationError):
            async for _ in client.subscribe(SubscribeToTaskRequest(id=task.id)):
                pass
        with pytest.raises(TaskNotFoundError):
            await client.get_task(GetTaskRequest(id="nope"))
        with pytest.raises(TaskNotFoundError):
            await client.cancel_task(CancelTaskRequest(id="nope"))
        no_running_tasks(adapter, flow)


async def test_failed_flow_is_a_failed_task_with_the_error_text() -> None:
    from server_support import node

    from penguiflow import Message as PfMessage
    from penguiflow import create

    async def boom(message: PfMessage, ctx: Any) -> None:
        raise ValueError("kaboom")

    flow = create(node(boom).to(), emit_errors_to_rookery=True)
    async with served(flow) as (url, _), sdk_client(url) as client:
        events = [e async for e in client.send_message(request("x"))]
        last = events[-1].status_update.status
        assert last.state == TaskState.TASK_STATE_FAILED
        assert "kaboom" in last.message.parts[0].text


async def test_push_config_calls_raise_push_not_supported() -> None:
    # The card says pushNotifications: false; the SDK client maps -32003 to its
    # PushNotificationNotSupportedError (before: MethodNotFoundError).
    async with served(echo_flow()) as (url, _), sdk_client(url) as client:
        with pytest.raises(PushNotificationNotSupportedError):
            await client.create_task_push_notification_config(TaskPushNotificationConfig(
                task_id="t", url="http://127.0.0.1:9/hook"))


# -- 0.3 -------------------------------------------------------------------------------------
def v03_card(url: str) -> AgentCard:
    return AgentCard(
        name="Echo", description="0.3 view", version="1",
        supported_interfaces=[AgentInterface(protocol_binding="JSONRPC", protocol_version="0.3",
                                             url=url + "/")],
        capabilities=AgentCapabilities(streaming=True), default_input_modes=["text/plain"],
        default_output_modes=["text/plain"])


async def test_sdk_client_on_a_0_3_only_card() -> None:
    gate = asyncio.Event()
    flow = chunk_flow(TEXTS, gate=gate, final="end")
    async with served(flow) as (url, adapter), sdk_client(v03_card(url)) as client:
        stream = client.send_message(request("via compat"))
        task = (await anext(stream)).task
        assert task.status.state == TaskState.TASK_STATE_SUBMITTED
        assert state_of(await anext(stream)) == TaskState.TASK_STATE_WORKING
        await anext(stream)
        await stream.aclose()
        resub = client.subscribe(SubscribeToTaskRequest(id=task.id))
        assert (await anext(resub)).task.status.state == TaskState.TASK_STATE_WORKING
        gate.set()
        live = [e async for e in resub]
        assert state_of(live[-1]) == TaskState.TASK_STATE_COMPLETED
        got = await client.get_task(GetTaskRequest(id=task.id))
        assert [p.text for p in got.artifacts[0].parts] == TEXTS
        with pytest.raises(TaskNotCancelableError):
            await client.cancel_task(CancelTaskRequest(id=task.id))
        no_running_tasks(adapter, flow)


async def test_sdk_0_3_client_cancels_a_running_task() -> None:
    gate = Gate()
    async with served(gate.flow()) as (url, _), sdk_client(v03_card(url)) as client:
        stream = client.send_message(request("slow"))
        task = (await anext(stream)).task
        await anext(stream)
        await asyncio.wait_for(gate.started.wait(), 5)
        canceled = await client.cancel_task(CancelTaskRequest(id=task.id))
        assert canceled.status.state == TaskState.TASK_STATE_CANCELED
        rest = [e async for e in stream]
        assert state_of(rest[-1]) == TaskState.TASK_STATE_CANCELED


async def test_raw_0_3_requests() -> None:
    from server_support import rpc, sse_results

    flow = echo_flow()
    async with served(flow) as (url, _), http() as client:
        message = {"kind": "message", "messageId": "m1", "role": "user",
                   "parts": [{"kind": "text", "text": "hi 0.3"}]}
        sent = (await client.post(url + "/", json=rpc("message/send",
                                                      {"message": message}))).json()
        task = sent["result"]
        assert task["kind"] == "task" and task["status"]["state"] == "completed"
        assert task["artifacts"][0]["parts"] == [{"kind": "data", "data": {"n": "hi 0.3"}}]
        assert task["history"][0]["role"] == "user"
        got = (await client.post(url + "/", json=rpc("tasks/get", {"id": task["id"]}))).json()
        assert got["result"]["kind"] == "task" and got["result"]["id"] == task["id"]
        missing = (await client.post(url + "/", json=rpc("tasks/get", {"id": "x"}))).json()
        assert missing["error"]["code"] == -32001
        cancel = (await client.post(url + "/", json=rpc("tasks/cancel",
                                                        {"id": task["id"]}))).json()
        assert cancel["error"]["code"] == -32002
        resub = (await client.post(url + "/", json=rpc("tasks/resubscribe",
                                                       {"id": task["id"]}))).json()
        assert resub["error"]["code"] == -32004
        async with client.stream("POST", url + "/", json=rpc("message/stream", {
                "message": {**message, "messageId": "m2"}})) as response:
            results = [env["result"] async for env in sse_results(response)]
        assert [r["kind"] for r in results] == ["task", "status-update", "artifact-update",
                                                "status-update"]
        assert [r.get("final") for r in results if r["kind"] == "status-update"] == [
            False, True]
        assert results[2]["append"] is False and results[2]["lastChunk"] is True
        assert results[-1]["status"]["state"] == "completed"


async def test_raw_0_3_cancel_and_resubscribe_running_task() -> None:
    from server_support import rpc, sse_results

    gate = Gate()
    async with served(gate.flow()) as (url, _), http() as client:
        message = {"kind": "message", "messageId": "m1", "role": "user",
                   "parts": [{"kind": "text", "text": "slow"}]}
        sent = (await client.post(url + "/", json=rpc("message/send", {
            "message": message, "configuration": {"blocking": False}}))).json()
        task_id = sent["result"]["id"]
        assert sent["result"]["status"]["state"] in ("submitted", "working")
        await asyncio.wait_for(gate.started.wait(), 5)
        async with client.stream("POST", url + "/", json=rpc("tasks/resubscribe",
                                                             {"id": task_id})) as response:
            results = sse_results(response)
            snapshot = (await anext(results))["result"]
            assert snapshot["kind"] == "task" and snapshot["status"]["state"] == "working"
            cancel = (await client.post(url + "/", json=rpc("tasks/cancel",
                                                            {"id": task_id}))).json()
            assert cancel["result"]["status"]["state"] == "canceled"
            rest = [env["result"] async for env in results]
        assert [(r["kind"], r["status"]["state"], r["final"]) for r in rest] == [
            ("status-update", "canceled", True)]
