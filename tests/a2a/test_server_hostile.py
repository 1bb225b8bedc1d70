"""Hostile and heavy use of the A2A server: bad bodies, huge bodies, slow readers, load,
auth, rate limits, secrets, trace context, and fuzzed JSON-RPC bodies."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_support import (
    CARD,
    TIMEOUT,
    V1,
    Gate,
    collect_stream,
    echo_flow,
    free_port,
    http,
    make_adapter,
    no_running_tasks,
    node,
    rpc,
    served,
    sse_results,
    user_message,
)

from penguiflow import Message, create
from penguiflow.state import InMemoryStateStore
from penguiflow_a2a.server import A2ARequestError, A2AServerAdapter, create_a2a_app
from penguiflow_a2a.sse import aiter_sse


async def call(client: httpx.AsyncClient, url: str, body: Any, headers: Any = None) -> Any:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = await client.post(url + "/", content=content,
                                 headers={"content-type": "application/json", **(headers or {})})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    return response.json()


async def test_envelope_and_param_errors() -> None:
    async with served(echo_flow()) as (url, _), http() as client:
        async def code(body: Any, headers: Any = V1) -> tuple[int, str]:
            error = (await call(client, url, body, headers))["error"]
            return error["code"], error["message"]

        assert (await code(b"{not json"))[0] == -32700
        assert (await code(b"\xff\xfe"))[0] == -32700
        assert (await code([rpc("GetTask", {"id": "x"})]))[0] == -32600
        assert (await code({**rpc("GetTask", {"id": "x"}), "jsonrpc": "1.0"}))[0] == -32600
        assert (await code(rpc("GetTask", {"id": "x"}, rpc_id=[1])))[0] == -32600
        assert (await code(rpc("GetTask", {"id": "x"}, rpc_id=1.5)))[0] == -32600
        assert (await code(rpc("Nope", {})))[0] == -32601
        assert (await code(rpc("GetTask", [])))[0] == -32602
        wrong = await code(rpc("GetTask", {"id": 5}))
        assert wrong[0] == -32602 and "'id'" in wrong[1] and "int" in wrong[1]
        history = await code(rpc("GetTask", {"id": "x", "historyLength": "3"}))
        assert history[0] == -32602 and "historyLength" in history[1]
        parts = await code(rpc("SendMessage", {"message": {"messageId": "m", "parts": []}}))
        assert parts[0] == -32602 and "message.parts" in parts[1]
        assert (await code(rpc("SendMessage", {"message": "hi"})))[0] == -32602
        assert (await code(rpc("ListTasks", {"pageToken": "zz"})))[0] == -32602
        assert (await code(rpc("ListTasks", {"status": "DONE"})))[0] == -32602
        no_header = await code(rpc("SendMessage", {"message": user_message("x")}), headers={})
        assert no_header == (-32009, "A2A version '0.3' is not supported by this handler for "
                                     "method SendMessage; send the header A2A-Version: 1.0")
        assert (await code(rpc("GetTask", {"id": "x"}), {"A2A-Version": "2.0"}))[0] == -32009
        via_query = await client.post(url + "/?A2A-Version=1.0", json=rpc("GetTask", {"id": "x"}))
        assert via_query.json()["error"]["code"] == -32001
        assert via_query.json()["error"]["data"][0]["reason"] == "TASK_NOT_FOUND"
        # A 0.3 method with the 1.0 header is answered (in 0.3 form).
        assert (await code(rpc("tasks/get", {"id": "x"}), V1))[0] == -32001
        unknown_task = await code(rpc("SendMessage", {
            "message": user_message("x", taskId="nope")}))
        assert unknown_task[0] == -32001
        deep = b'{"jsonrpc":"2.0","id":1,"method":"GetTask","params":' + b"[" * 100_000
        assert (await code(deep))[0] == -32700
        assert (await code(b'{"id": ' + b"9" * 5000 + b"}"))[0] == -32700
        assert (await code(b'{"id": NaN}'))[0] == -32700
        # Digits outside ASCII ('²'.isdigit() is True, int('²') raises) and 0.3 file
        # parts whose file is no object were internal errors (-32603).
        assert (await code(rpc("ListTasks", {"pageToken": "\u00b2"})))[0] == -32602
        for file in ("https://x/y.png", 5, ["uri"]):
            bad_file = await code(rpc("message/send", {"message": {
                "messageId": "m", "role": "user", "parts": [{"kind": "file", "file": file}]}}),
                headers={})
            assert bad_file[0] == -32602 and "message.parts" in bad_file[1]


async def test_file_parts_whose_bytes_or_url_are_not_text_are_bad_params() -> None:
    # Before: a 0.3 file part with "bytes": 5 / [1, 2] / {} / true was base64-encoded
    # as it stood; the TypeError came back as -32603 "Internal error: TypeError" (and a
    # logged traceback). The 1.0 raw / url fields were not checked at all.
    async with served(echo_flow()) as (url, _), http() as client:
        for value in (5, [1, 2], {"a": 1}, True):
            for file, part in (({"bytes": value, "mimeType": "x/y"}, {"raw": value}),
                               ({"uri": value}, {"url": value})):
                old = (await call(client, url, rpc("message/send", {"message": {
                    "messageId": "m", "role": "user",
                    "parts": [{"kind": "file", "file": file}]}}), headers={}))["error"]
                new = (await call(client, url, rpc("SendMessage", {"message": {
                    "messageId": "m", "role": "ROLE_USER", "parts": [part]}}), V1))["error"]
                for error in (old, new):
                    assert error["code"] == -32602, error
                    assert "message.parts" in error["message"]
                    assert type(value).__name__ in error["message"]
                assert "file.bytes" in old["message"] or "file.uri" in old["message"]


@pytest.mark.parametrize(("method", "headers"), [
    ("CreateTaskPushNotificationConfig", V1), ("GetTaskPushNotificationConfig", V1),
    ("ListTaskPushNotificationConfigs", V1), ("DeleteTaskPushNotificationConfig", V1),
    ("tasks/pushNotificationConfig/set", {}), ("tasks/pushNotificationConfig/get", {}),
    ("tasks/pushNotificationConfig/list", {}), ("tasks/pushNotificationConfig/delete", {})])
async def test_push_config_methods_are_not_supported_not_unknown(
        method: str, headers: dict[str, str]) -> None:
    # Before: -32601 Method not found. The card says pushNotifications: false, and
    # the spec's (and a2a-sdk's) answer is -32003 PushNotificationNotSupported.
    params = {"taskId": "t", "id": "c", "url": "http://127.0.0.1:9/hook"}
    async with served(echo_flow()) as (url, _), http() as client:
        error = (await call(client, url, rpc(method, params), headers))["error"]
        assert error["code"] == -32003
        assert error["message"] == "Push notifications are not supported by the agent"
        if headers:  # 1.0 errors carry the ErrorInfo reason; 0.3 errors do not
            assert error["data"][0]["reason"] == "PUSH_NOTIFICATION_NOT_SUPPORTED"
            # The version is still checked first, as for every 1.0 method.
            no_header = (await call(client, url, rpc(method, params), {}))["error"]
            assert no_header["code"] == -32009
        else:
            assert "data" not in error


async def test_terminal_task_and_tenant_errors() -> None:
    async with served(echo_flow(), default_headers=None) as (url, _), http() as client:
        no_tenant = (await call(client, url, rpc("SendMessage", {
            "message": user_message("x")}), V1))["error"]
        assert no_tenant["code"] == -32602 and "tenant" in no_tenant["message"]
        assert "default_headers" in no_tenant["message"]
        done = (await call(client, url, rpc("SendMessage", {
            "tenant": "t", "message": user_message("x")}), V1))["result"]["task"]
        assert done["status"]["state"] == "TASK_STATE_COMPLETED"
        follow = (await call(client, url, rpc("SendMessage", {
            "tenant": "t", "message": user_message("y", taskId=done["id"])}), V1))["error"]
        assert follow["code"] == -32004 and "terminal" in follow["message"]
        listed = (await call(client, url, rpc("ListTasks", {
            "contextId": done["contextId"], "status": "TASK_STATE_COMPLETED"}), V1))["result"]
        assert [t["id"] for t in listed["tasks"]] == [done["id"]]
        assert listed["totalSize"] == 1 and listed["nextPageToken"] == ""


async def test_list_tasks_pages() -> None:
    async with served(echo_flow()) as (url, _), http() as client:
        for i in range(5):
            await call(client, url, rpc("SendMessage", {"message": user_message(f"m{i}")}), V1)
        seen: list[str] = []
        token = ""
        while True:
            page = (await call(client, url, rpc("ListTasks", {
                "pageSize": 2, "pageToken": token}), V1))["result"]
            assert len(page["tasks"]) <= 2 and page["totalSize"] == 5
            seen += [t["id"] for t in page["tasks"]]
            token = page["nextPageToken"]
            if not token:
                break
        assert len(set(seen)) == 5


async def test_oversized_bodies_get_413_and_the_server_keeps_serving() -> None:
    async with served(echo_flow()) as (url, adapter), http() as client:
        big = b'{"x": "' + b"a" * (5 << 20) + b'"}'
        for path in ("/", "/message/send"):
            response = await client.post(url + path, content=big,
                                         headers={"content-type": "application/json"})
            assert response.status_code == 413

        async def chunked() -> AsyncIterator[bytes]:
            for _ in range(80):
                yield b"a" * 65536

        response = await client.post(url + "/", content=chunked())
        assert response.status_code == 413
        ok = await call(client, url, rpc("SendMessage", {"message": user_message("x")}), V1)
        assert ok["result"]["task"]["status"]["state"] == "TASK_STATE_COMPLETED"
        no_running_tasks(adapter, adapter._flow)


async def test_slow_subscriber_is_dropped_while_others_complete() -> None:
    release = asyncio.Event()
    adapter_ref: list[A2AServerAdapter] = []

    async def flood(message: Message, ctx: Any) -> str:
        await release.wait()
        sent = 0
        # Emit until the stalled subscriber is cut off (bounded, whatever the socket buffers).
        adapter = adapter_ref[0]
        record = adapter.tasks.by_trace(message.trace_id)
        while adapter.tasks.dropped_subscribers == 0 and sent < 4000:
            await ctx.emit_chunk(parent=message, text="x" * 32768)
            sent += 1
            # Pace to the fastest reader (the test's good one), not to the stalled one.
            # (Polling: a queue's size has no event to wait on.)
            busy = record.subscribers
            while busy and min(s.queue.qsize() for s in busy) > 8:  # noqa: ASYNC110
                await asyncio.sleep(0.001)
        return f"sent {sent}"

    flow = create(node(flood).to(), queue_maxsize=4)  # small bursts: pacing below works
    stalled = socket.socket()
    async with served(flow, subscriber_queue_size=32) as (url, adapter), http() as client:
        adapter_ref.append(adapter)
        started = await call(client, url, rpc("SendMessage", {
            "message": user_message("go"), "configuration": {"returnImmediately": True}}), V1)
        task_id = started["result"]["task"]["id"]
        record = adapter.tasks.get(task_id)
        assert record is not None
        port = int(url.rsplit(":", 1)[1])
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(stalled, ("127.0.0.1", port))
        body = json.dumps(rpc("SubscribeToTask", {"id": task_id})).encode()
        await loop.sock_sendall(stalled, (
            f"POST / HTTP/1.1\r\nHost: x\r\nA2A-Version: 1.0\r\nContent-Type: application/json"
            f"\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body)
        reader = asyncio.create_task(collect_stream(client, url, rpc("SubscribeToTask",
                                                                      {"id": task_id})))
        async with asyncio.timeout(5):
            # Both streams are open server-side (no event to wait on: poll).
            while len(record.subscribers) < 2:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        release.set()
        events = await asyncio.wait_for(reader, 30)
        assert "statusUpdate" in events[-1]["result"], (len(events), str(events[-1])[:300])
        assert events[-1]["result"]["statusUpdate"]["status"]["state"] == "TASK_STATE_COMPLETED"
        assert adapter.tasks.dropped_subscribers == 1
        assert record.subscribers == set()
        # The stalled connection is closed by the server: draining it reaches EOF.
        try:
            async with asyncio.timeout(30):
                while await loop.sock_recv(stalled, 1 << 20):
                    pass
        finally:
            stalled.close()
        no_running_tasks(adapter, flow)


async def test_two_hundred_concurrent_streams_complete() -> None:
    flow = echo_flow()
    limits = httpx.Limits(max_connections=200)
    async with served(flow) as (url, adapter), http(limits=limits) as client:
        streams = await asyncio.gather(*[
            collect_stream(client, url, rpc("SendStreamingMessage",
                                            {"message": user_message(f"s{i}")}))
            for i in range(200)])
        for i, events in enumerate(streams):
            result = [e["result"] for e in events]
            assert result[-2]["artifactUpdate"]["artifact"]["parts"] == [
                {"data": {"n": f"s{i}"}}]
            assert result[-1]["statusUpdate"]["status"]["state"] == "TASK_STATE_COMPLETED"
        no_running_tasks(adapter, flow)


async def test_auth_and_rate_limit() -> None:
    async def auth(headers: Any) -> str:
        value = headers.get("authorization", "")
        if not value:
            raise A2ARequestError(status_code=401, detail="missing token")
        if value != "Bearer good":
            raise A2ARequestError(status_code=403, detail="forbidden")
        return "alice"

    async with served(echo_flow(), auth=auth, rate_limit=2) as (url, _), http() as client:
        card = (await client.get(url + "/.well-known/agent-card.json")).json()
        assert card["securitySchemes"] == {"bearer": {"httpAuthSecurityScheme": {
            "scheme": "Bearer"}, "type": "http", "scheme": "Bearer"}}
        assert card["security"] == [{"bearer": []}]
        body = rpc("GetTask", {"id": "x"})
        missing = await client.post(url + "/", json=body, headers=V1)
        assert missing.status_code == 401 and missing.json() == {"detail": "missing token"}
        assert missing.headers["www-authenticate"] == "Bearer"
        bad = await client.post(url + "/message/send", json={"payload": 1},
                                headers={"authorization": "Bearer bad"})
        assert bad.status_code == 403
        good = {**V1, "authorization": "Bearer good"}
        answers = [await client.post(url + "/", json=body, headers=good) for _ in range(3)]
        assert [a.status_code for a in answers[:2]] == [200, 200]
        assert answers[2].status_code == 429
        assert int(answers[2].headers["retry-after"]) >= 1


SCHEMES = {
    "bearer": {"httpAuthSecurityScheme": {"scheme": "Bearer", "bearerFormat": "JWT"}},
    "key": {"apiKeySecurityScheme": {"location": "header", "name": "X-Key",
                                     "description": "a key"}},
    "oidc": {"openIdConnectSecurityScheme": {"openIdConnectUrl": "https://o/.well-known"}},
    "mtls": {"mtlsSecurityScheme": {"description": "m"}},
    "oauth": {"oauth2SecurityScheme": {"oauth2MetadataUrl": "https://m", "flows": {
        "authorizationCode": {"authorizationUrl": "https://a", "tokenUrl": "https://t",
                              "scopes": {"r": "read"}, "pkceRequired": True}}}},
}


@pytest.mark.parametrize("auth_scheme", [None, SCHEMES])
async def test_the_card_tells_0_3_clients_which_auth_it_wants(auth_scheme: Any) -> None:
    # Before: securitySchemes were written in 1.0 form only and there was no 0.3
    # "security" list, though the card lists a 0.3 interface: a2a-sdk's 0.3 card model
    # read the Bearer scheme as mutualTLS and saw no auth required. a2a-sdk's own union
    # card (agent_card_to_dict) is the reference for the same 1.0 card.
    from a2a.compat.v0_3 import types as t03
    from a2a.server.request_handlers.response_helpers import agent_card_to_dict
    from a2a.types import AgentCard
    from google.protobuf.json_format import ParseDict

    async with served(echo_flow(), auth=lambda _headers: "alice",
                      auth_scheme=auth_scheme) as (url, _), http() as client:
        card = (await client.get(url + "/.well-known/agent-card.json")).json()
    v03 = t03.AgentCard.model_validate(card)
    assert v03.security_schemes is not None
    bearer = v03.security_schemes["bearer"].root
    assert isinstance(bearer, t03.HTTPAuthSecurityScheme) and bearer.scheme == "Bearer"
    assert v03.security and {"bearer": []} in v03.security
    sdk = agent_card_to_dict(ParseDict(card, AgentCard(), ignore_unknown_fields=True))
    assert card["securitySchemes"] == sdk["securitySchemes"]
    assert card["security"] == sdk["security"]
    if auth_scheme is not None:
        kinds = {name: type(s.root).__name__ for name, s in v03.security_schemes.items()}
        assert kinds == {"bearer": "HTTPAuthSecurityScheme", "key": "APIKeySecurityScheme",
                         "oidc": "OpenIdConnectSecurityScheme",
                         "mtls": "MutualTLSSecurityScheme", "oauth": "OAuth2SecurityScheme"}


def two_principals(headers: Any) -> str:
    """``auth`` for two callers: ``Bearer alice`` and ``Bearer bob``."""
    value = headers.get("authorization", "")
    if value not in ("Bearer alice", "Bearer bob"):
        raise A2ARequestError(status_code=401, detail="unknown caller")
    return value.split()[1]


async def test_tasks_are_private_to_the_principal_that_created_them() -> None:
    # Before, any authenticated caller could list, read, cancel and subscribe to
    # any other caller's task: lookups were by id alone.
    gate = Gate()
    flow = gate.flow()
    alice = {**V1, "authorization": "Bearer alice"}
    bob = {**V1, "authorization": "Bearer bob"}
    async with served(flow, auth=two_principals) as (url, adapter), http() as client:
        task = (await call(client, url, rpc("SendMessage", {
            "message": user_message("alice's secret"),
            "configuration": {"returnImmediately": True}}), alice))["result"]["task"]
        await asyncio.wait_for(gate.started.wait(), 10)
        tid = task["id"]

        async def error(method: str, params: Any, headers: Any) -> tuple[int, str]:
            answer = await call(client, url, rpc(method, params), headers)
            assert "result" not in answer, (method, answer)
            return answer["error"]["code"], answer["error"]["message"]

        # Bob: exactly what an unknown id gets (TaskNotFound), and an empty list.
        unknown = await error("GetTask", {"id": "no-such-task"}, bob)
        assert await error("GetTask", {"id": tid}, bob) == unknown
        assert (await error("CancelTask", {"id": tid}, bob))[0] == -32001
        assert (await error("SubscribeToTask", {"id": tid}, bob))[0] == -32001
        assert (await error("tasks/get", {"id": tid}, bob))[0] == -32001
        assert (await error("SendMessage", {"message": user_message(
            "follow", taskId=tid)}, bob))[0] == -32001
        listed = (await call(client, url, rpc("ListTasks", {}), bob))["result"]
        assert listed["tasks"] == [] and listed["totalSize"] == 0
        legacy = await client.post(url + "/tasks/cancel", json={"taskId": tid},
                                   headers={"authorization": "Bearer bob"})
        assert legacy.json() == {"taskId": tid, "cancelled": False}  # the unknown-task answer
        assert adapter.tasks.get(tid).state == "TASK_STATE_WORKING"  # untouched

        # Alice still sees and controls her task.
        mine = (await call(client, url, rpc("ListTasks", {}), alice))["result"]
        assert [t["id"] for t in mine["tasks"]] == [tid] and mine["totalSize"] == 1
        got = (await call(client, url, rpc("GetTask", {"id": tid}), alice))["result"]
        assert got["history"][0]["parts"] == [{"text": "alice's secret"}]
        cancelled = (await call(client, url, rpc("CancelTask", {"id": tid}), alice))["result"]
        assert cancelled["status"]["state"] == "TASK_STATE_CANCELED"

        # The 2.1 routes record the owner too.
        gate.release.set()
        sent = await client.post(url + "/message/send", json={"payload": "x", "taskId": "k1"},
                                 headers={"authorization": "Bearer alice"})
        assert sent.status_code == 200
        assert (await error("GetTask", {"id": "k1"}, bob))[0] == -32001
        assert (await call(client, url, rpc("GetTask", {"id": "k1"}), alice))["result"]["id"] \
            == "k1"
        # Bob cannot take over alice's finished task by sending under its id: its
        # record (and history) would have become his.
        taken = await client.post(url + "/message/send", json={"payload": "y", "taskId": "k1"},
                                  headers={"authorization": "Bearer bob"})
        assert taken.status_code == 409 and "k1" in taken.json()["detail"]
        mine = (await call(client, url, rpc("GetTask", {"id": "k1"}), alice))["result"]
        assert mine["id"] == "k1" and mine["status"]["state"] == "TASK_STATE_COMPLETED"
        assert (await error("GetTask", {"id": "k1"}, bob))[0] == -32001
        no_running_tasks(adapter, flow)


async def test_secret_headers_never_reach_store_binding_or_message(
        caplog: pytest.LogCaptureFixture) -> None:
    seen: list[Message] = []

    async def work(message: Message, ctx: Any) -> str:
        seen.append(message)
        return "ok"

    store = InMemoryStateStore()
    flow = create(node(work).to(), state_store=store)
    caplog.set_level(logging.DEBUG)
    async with served(flow) as (url, _), http() as client:
        secret = {"authorization": "Bearer SECRET-1", "cookie": "sid=SECRET-2",
                  "x-api-key": "SECRET-3"}
        await client.post(url + "/message/send", headers=secret, json={
            "payload": "a", "headers": {"tenant": "t", "authorization": "SECRET-4"}})
        await call(client, url, rpc("SendMessage", {"message": user_message(
            "b", metadata={"api-key": "SECRET-5", "note": "fine"})}), {**V1, **secret})
    dump = repr([m.model_dump() for m in seen]) + repr(store._bindings)
    for trace in {m.trace_id for m in seen}:
        dump += repr(await store.load_history(trace))
    dump += caplog.text
    assert "SECRET" not in dump
    assert seen[1].meta == {"note": "fine"}


async def test_traceparent_sets_the_served_trace_id() -> None:
    seen: list[Message] = []

    async def work(message: Message, ctx: Any) -> str:
        seen.append(message)
        return "ok"

    store = InMemoryStateStore()
    trace_id, span_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    async with served(create(node(work).to(), state_store=store)) as (url, _), http() as client:
        header = {**V1, "traceparent": f"00-{trace_id}-{span_id}-01"}
        await call(client, url, rpc("SendMessage", {"message": user_message("a")}), header)
        await client.post(url + "/message/send", json={"payload": "b"},
                          headers={"traceparent": f"00-{'1' * 32}-{span_id}-00"})
        for bad in (f"00-{'0' * 32}-{span_id}-01", f"00-{trace_id.upper()}-{span_id}-01",
                    f"ff-{trace_id}-{span_id}-01", f"00-{trace_id}-{span_id}-01-extra"):
            await call(client, url, rpc("SendMessage", {"message": user_message("c")}),
                       {**V1, "traceparent": bad})
    assert seen[0].trace_id == trace_id
    assert seen[1].trace_id == "1" * 32
    assert all(m.trace_id not in (trace_id, "0" * 32) for m in seen[2:])
    parents = [e for e in await store.load_history(trace_id) if e.kind == "trace_parent"]
    assert parents and parents[0].payload["parent_span_id"] == span_id
    assert parents[0].payload["a2a.method"] == "SendMessage"
    assert "parent_sampled" not in parents[0].payload
    # flags 00: the caller did not sample its span; the trace is decided so (dropped
    # by the default sampler, see test_tracing) and the flag is kept in the store.
    unsampled = [e for e in await store.load_history("1" * 32) if e.kind == "trace_parent"]
    assert unsampled[0].payload["parent_sampled"] is False
    assert unsampled[0].payload["a2a.method"] == "message/send"


async def test_a_second_2_1_request_from_the_same_client_span_gets_its_own_task() -> None:
    # An instrumented 2.1 client sends the same traceparent on every request made in
    # one span. taskId and contextId default to the trace id (2.1), so the second
    # request reused the first one's task id, and their histories merged.
    async def work(message: Message, ctx: Any) -> str:
        return f"done {message.payload}"

    store = InMemoryStateStore()
    trace_id, span_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    header = {"traceparent": f"00-{trace_id}-{span_id}-01"}
    async with served(create(node(work).to(), state_store=store)) as (url, _), http() as client:
        answers = [(await client.post(url + "/message/send", json={"payload": n},
                                      headers=header)).json() for n in (1, 2)]
        # A first request with a taskId of its own joins the trace too; the next
        # one without (its taskId would default to the trace id) does not.
        other = "5bf92f3577b34da6a3ce929d0e0e4736"
        header2 = {"traceparent": f"00-{other}-{span_id}-01"}
        named = (await client.post(url + "/message/send", json={
            "payload": 3, "taskId": "mine"}, headers=header2)).json()
        unnamed = (await client.post(url + "/message/send", json={"payload": 4},
                                     headers=header2)).json()
    first, second = answers
    assert first["traceId"] == first["taskId"] == trace_id  # the caller's trace, joined
    assert second["taskId"] == second["traceId"] != trace_id
    assert [a["output"] for a in answers] == ["done 1", "done 2"]
    assert (named["traceId"], named["taskId"]) == (other, "mine")
    assert unnamed["traceId"] == unnamed["taskId"] not in (other, "mine")
    answers += [named, unnamed]
    for answer in answers:
        ends = [e for e in await store.load_history(answer["traceId"])
                if e.kind == "node_success"]
        assert len(ends) == 1


async def test_a_retry_under_a_just_cancelled_callers_trace_is_answered() -> None:
    # A RemoteNode retry after its timeout cancelled the first call sends the same
    # traceparent. The retry was given the caller's trace id again (no *running* task
    # had it) while the flow was still cancelling that trace (a node's cleanup): the
    # cancel swallowed its message, the task stayed WORKING and the blocking
    # SendMessage never answered.
    started, cleaning, cleaned = asyncio.Event(), asyncio.Event(), asyncio.Event()
    seen: list[Message] = []

    async def work(message: Message, ctx: Any) -> str:
        seen.append(message)
        if message.payload == "slow":
            started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cleaning.set()
                await asyncio.shield(cleaned.wait())  # e.g. a remote cancel round trip
                raise
        return f"ok {message.payload}"

    flow = create(node(work).to())
    emitted = asyncio.Event()
    emit = flow.emit

    async def emit_and_tell(message: Message, *args: Any, **kwargs: Any) -> None:
        await emit(message, *args, **kwargs)
        if message.payload == "retry":
            emitted.set()

    flow.emit = emit_and_tell  # type: ignore[method-assign]
    trace_id, span_id = "ab" * 16, "cd" * 8
    header = {**V1, "traceparent": f"00-{trace_id}-{span_id}-01"}
    async with served(flow) as (url, adapter), http() as client:
        try:
            first = (await call(client, url, rpc("SendMessage", {
                "message": user_message("slow"), "configuration": {"returnImmediately": True}}),
                header))["result"]["task"]
            await asyncio.wait_for(started.wait(), TIMEOUT)
            cancelled = (await call(client, url, rpc("CancelTask", {"id": first["id"]}),
                                    V1))["result"]
            assert cancelled["status"]["state"] == "TASK_STATE_CANCELED"
            await asyncio.wait_for(cleaning.wait(), TIMEOUT)  # the trace is still cancelling
            sending = asyncio.ensure_future(call(client, url, rpc("SendMessage", {
                "message": user_message("retry")}), header))
            await asyncio.wait_for(emitted.wait(), TIMEOUT)  # emitted while cancelling
            cleaned.set()  # the node is free again (it runs one message at a time)
            retry = await asyncio.wait_for(sending, TIMEOUT)
            task = retry["result"]["task"]
            assert task["status"]["state"] == "TASK_STATE_COMPLETED"
            assert task["artifacts"][0]["parts"] == [{"text": "ok retry"}]
            assert seen[0].trace_id == trace_id  # the first request joined the caller's trace
            assert seen[1].trace_id != trace_id
        finally:
            cleaned.set()
            await adapter.stop()  # ends a stuck blocking send, so the server can exit


@pytest.mark.parametrize("how", ["timeout_graceful_shutdown", "adapter.stop() first"])
async def test_shutdown_with_open_streams_and_blocking_sends_is_bounded(how: str) -> None:
    """uvicorn waits for open responses to end before the lifespan shutdown that would
    stop the adapter, and a server cannot observe that wait without signal handlers
    (a library installs none): the documented bounds are uvicorn's
    ``timeout_graceful_shutdown``, or stopping the adapter before the server."""
    gate = Gate()
    port = free_port()
    adapter = make_adapter(gate.flow(), port)
    grace = 0.5 if how == "timeout_graceful_shutdown" else None
    server = uvicorn.Server(uvicorn.Config(create_a2a_app(adapter), host="127.0.0.1",
                                           port=port, log_level="critical", lifespan="on",
                                           timeout_graceful_shutdown=grace))
    serving = asyncio.create_task(server.serve())
    async with asyncio.timeout(TIMEOUT):
        while not server.started:  # polled, as server_support.serve does
            if serving.done():
                serving.result()
            await asyncio.sleep(0.01)
    url = f"http://127.0.0.1:{port}"
    async with http() as client:
        async def stream() -> list[Any]:
            seen: list[Any] = []
            with contextlib.suppress(httpx.HTTPError):  # cut by the graceful timeout
                async with client.stream("POST", url + "/", headers=V1, json=rpc(
                        "SendStreamingMessage", {"message": user_message("s")})) as response:
                    seen += [envelope async for envelope in sse_results(response)]
            return seen

        streaming = asyncio.create_task(stream())
        blocking = asyncio.create_task(client.post(url + "/", headers=V1, json=rpc(
            "SendMessage", {"message": user_message("b")})))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TIMEOUT
        while sum(t.state == "TASK_STATE_WORKING" for t in adapter.tasks) < 2:
            assert loop.time() < deadline
            await asyncio.sleep(0.01)
        started = loop.time()
        if grace is None:
            await adapter.stop()
        server.should_exit = True
        await asyncio.wait_for(serving, TIMEOUT)  # before: never, while the task ran
        assert loop.time() - started < 5.0
        assert not adapter.started and adapter.tasks.running() == []
        seen, answer = await streaming, await blocking
    if grace is None:  # every open response ended properly, with the reason
        last = seen[-1]["result"]["statusUpdate"]["status"]
        assert last["state"] == "TASK_STATE_FAILED"
        assert "shutting down" in last["message"]["parts"][0]["text"]
        task = answer.json()["result"]["task"]
        assert task["status"]["state"] == "TASK_STATE_FAILED"
    gate.release.set()


async def test_results_holding_nan_or_infinity_are_sent_as_strict_json() -> None:
    # Python writes NaN / Infinity, which is not JSON: the 2.1 reply was an HTTP 500
    # and the JSON-RPC answers were refused by strict parsers. They are null now.
    async def score(message: Message, _ctx: Any) -> Any:
        await _ctx.emit_chunk(parent=message, text="scoring", meta={"p": math.inf})
        return {"score": math.nan, "range": [-math.inf, 1.5], "name": "x"}

    def strict(text: str) -> Any:
        def refuse(constant: str) -> Any:
            raise AssertionError(f"{constant} on the wire: {text[:200]}")
        return json.loads(text, parse_constant=refuse)

    expected = {"score": None, "range": [None, 1.5], "name": "x"}
    async with served(create(node(score).to())) as (url, _), http() as client:
        legacy = await client.post(url + "/message/send", json={"payload": "go"})
        assert legacy.status_code == 200
        assert strict(legacy.text)["output"] == expected
        answer = await client.post(url + "/", headers=V1, json=rpc(
            "SendMessage", {"message": user_message("go")}))
        task = strict(answer.text)["result"]["task"]
        assert task["artifacts"][-1]["parts"][0]["data"] == expected
        async with client.stream("POST", url + "/", headers=V1, json=rpc(
                "SendStreamingMessage", {"message": user_message("go")})) as response:
            frames = [strict(event.data) async for event in aiter_sse(response.aiter_raw())]
        assert frames[-1]["result"]["statusUpdate"]["status"]["state"] == "TASK_STATE_COMPLETED"
        async with client.stream("POST", url + "/message/stream",
                                 json={"payload": "go"}) as response:
            legacy_frames = [event async for event in aiter_sse(response.aiter_raw())]
        done = [e for e in legacy_frames if e.event == "artifact"]
        assert done and strict(done[-1].data)["output"] == expected


class QuietFlow:
    """A duck-typed flow (what the adapter needs of one) doing nothing; the tests below
    give it the ``fetch`` (and ``cancel``) whose behaviour they are about."""

    def run(self, *, registry: Any = None) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def emit(self, message: Any, to: Any = None) -> None:
        pass

    async def fetch(self) -> Any:
        await asyncio.Event().wait()  # nothing ever comes

    async def cancel(self, trace_id: str) -> bool:
        return True

    async def save_remote_binding(self, binding: Any) -> None:
        pass


async def test_after_the_flow_can_no_longer_be_read_requests_get_503_not_a_hang(
        caplog: pytest.LogCaptureFixture) -> None:
    # The Rookery read raised: no result can ever be routed again. A request accepted
    # after that waited for ever; it is refused now, with the reason, and the
    # adapter says why (``failure``).
    class BrokenRookery(QuietFlow):
        def __init__(self) -> None:
            self.read = asyncio.Event()

        async def fetch(self) -> Any:
            self.read.set()
            raise RuntimeError("rookery read failed")

    flow = BrokenRookery()
    caplog.set_level(logging.ERROR, logger="penguiflow_a2a")
    async with served(flow) as (url, adapter), http() as client:
        await asyncio.wait_for(flow.read.wait(), TIMEOUT)
        assert adapter._dispatcher is not None
        await asyncio.wait_for(asyncio.shield(adapter._dispatcher), TIMEOUT)
        assert adapter.started and adapter.failure is not None
        assert "RuntimeError: rookery read failed" in adapter.failure
        legacy = await asyncio.wait_for(
            client.post(url + "/message/send", json={"payload": "hi"}), TIMEOUT)
        assert legacy.status_code == 503
        assert "rookery read failed" in legacy.json()["detail"]
        answer = await asyncio.wait_for(client.post(url + "/", headers=V1, json=rpc(
            "SendMessage", {"message": user_message("hi")})), TIMEOUT)
        error = answer.json()["error"]
        assert error["code"] == -32603 and "rookery read failed" in error["message"]
        assert adapter.tasks.running() == []
    assert any(r.getMessage() == "a2a_dispatcher_failed" for r in caplog.records)


async def test_cancel_racing_the_tasks_own_end_answers_not_cancelable() -> None:
    # The task's result is routed while the flow is cancelling it: the task ends
    # COMPLETED, so CancelTask must say -32002 (not cancelable), not answer 200
    # with a COMPLETED task as if the cancel had worked.
    class RacingFlow(QuietFlow):
        def __init__(self) -> None:
            self.results: asyncio.Queue[Any] = asyncio.Queue()
            self.fetches = 0
            self.next_fetch = asyncio.Event()

        async def fetch(self) -> Any:
            self.fetches += 1
            if self.fetches > 1:
                self.next_fetch.set()  # the previous result has been routed
            return await self.results.get()

        async def cancel(self, trace_id: str) -> bool:
            await self.results.put("finished first")
            await self.next_fetch.wait()
            return True

    async with served(RacingFlow()) as (url, adapter), http() as client:
        started = await call(client, url, rpc("SendMessage", {
            "message": user_message("go"), "configuration": {"returnImmediately": True}}), V1)
        task_id = started["result"]["task"]["id"]
        answer = await asyncio.wait_for(call(client, url, rpc("CancelTask", {"id": task_id}),
                                             V1), TIMEOUT)
        assert answer["error"]["code"] == -32002, answer
        assert "TASK_STATE_COMPLETED" in answer["error"]["message"]
        record = adapter.tasks.get(task_id)
        assert record is not None and record.state == "TASK_STATE_COMPLETED"


@pytest.mark.parametrize("route", ["SendStreamingMessage", "/message/stream"])
async def test_a_stream_client_that_stops_reading_is_given_up(route: str) -> None:
    # The task ends before the subscriber's queue overflows, so no "dropped" cut:
    # the response's writer waited in send() for ever, for a client that reads
    # nothing. Each write is bounded (stream_send_timeout_s) now.
    big = "x" * 200_000

    async def work(message: Message, ctx: Any) -> str:
        for i in range(40):
            await ctx.emit_chunk(parent=message, text=big, done=i == 39)
        return "done"

    stalled = asyncio.Event()

    class Notice(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage() == "a2a_stream_client_stalled":
                stalled.set()

    notice = Notice()
    logging.getLogger("penguiflow_a2a").addHandler(notice)
    port = free_port()
    adapter = make_adapter(create(node(work).to()), port, stream_send_timeout_s=0.5)
    server = uvicorn.Server(uvicorn.Config(create_a2a_app(adapter), host="127.0.0.1",
                                           port=port, log_level="critical", lifespan="on",
                                           timeout_graceful_shutdown=0.5))
    serving = asyncio.create_task(server.serve())
    reader = socket.socket()
    try:
        async with asyncio.timeout(TIMEOUT):
            while not server.started:  # noqa: ASYNC110 - polled, as server_support.serve does
                await asyncio.sleep(0.01)
        if route.startswith("/"):
            path, body, extra = route, json.dumps({"payload": "go"}).encode(), ""
        else:
            path, extra = "/", "A2A-Version: 1.0\r\n"
            body = json.dumps(rpc(route, {"message": user_message("go")})).encode()
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        reader.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(reader, ("127.0.0.1", port))
        await loop.sock_sendall(reader, (
            f"POST {path} HTTP/1.1\r\nHost: x\r\n{extra}Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
        await asyncio.wait_for(stalled.wait(), TIMEOUT)  # before: never
        # The response's coroutine has ended: uvicorn holds no task for it.
        async with asyncio.timeout(TIMEOUT):
            while server.server_state.tasks:  # noqa: ASYNC110 - no event to wait on
                await asyncio.sleep(0.01)
        assert [t.state for t in adapter.tasks] == ["TASK_STATE_COMPLETED"]
    finally:
        logging.getLogger("penguiflow_a2a").removeHandler(notice)
        server.should_exit = True
        await asyncio.wait_for(serving, TIMEOUT)
        reader.close()


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, True, "30"])
def test_stream_send_timeout_must_be_positive_seconds(bad: Any) -> None:
    with pytest.raises(ValueError, match="stream_send_timeout_s must be a number of seconds"):
        make_adapter(echo_flow(), 1, stream_send_timeout_s=bad)


# -- fuzz -----------------------------------------------------------------------------------
_METHODS = ["SendMessage", "SendStreamingMessage", "GetTask", "ListTasks", "CancelTask",
            "SubscribeToTask", "message/send", "message/stream", "tasks/get", "tasks/cancel",
            "tasks/resubscribe", "Other"]
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20)
_params = st.fixed_dictionaries({}, optional={
    "id": _json | st.text(), "message": _json | st.fixed_dictionaries(
        {"parts": st.lists(st.fixed_dictionaries({}, optional={
            "text": _json, "data": _json}), max_size=3)},
        optional={"messageId": _json, "taskId": _json, "contextId": _json,
                  "metadata": _json}),
    "configuration": _json, "historyLength": _json, "pageSize": _json, "pageToken": _json,
    "status": _json, "tenant": _json})
_envelopes = st.fixed_dictionaries({"jsonrpc": st.sampled_from(["2.0", "1.0", 2]),
                                    "method": st.sampled_from(_METHODS) | _json,
                                    "params": _params | _json, "id": _json})
_raw = st.sampled_from([
    b'{"jsonrpc":"2.0","id":"\\ud800","method":"SendMessage","params":{"message":'
    b'{"messageId":"\\udfff","parts":[{"text":"nul\\u0000 \\ud800"}]}}}',
    b"[" * 5000 + b"]" * 5000, b'{"a":' * 3000, b"1" * 10000, b"", b"\x00", b"null",
    b'{"jsonrpc":"2.0","id":1,"method":"SendMessage","params":{"message":{"parts":'
    b'[{"data":' + b"9" * 4000 + b"}]}}}"])
_bodies = _raw | _envelopes.map(lambda e: json.dumps(e).encode()) | st.binary(max_size=64)


def test_fuzzed_bodies_always_get_a_json_rpc_answer() -> None:
    with asyncio.Runner() as runner:
        adapter = A2AServerAdapter(echo_flow(), agent_card=CARD, agent_url="http://a",
                                   default_headers={"tenant": "t"})
        app = create_a2a_app(adapter)
        lifespan = app.router.lifespan_context(app)
        runner.run(lifespan.__aenter__())
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x")

        async def one(body: bytes, version: str | None) -> None:
            headers = {"content-type": "application/json"}
            if version:
                headers["A2A-Version"] = version
            async with asyncio.timeout(10):
                response = await client.post("/", content=body, headers=headers)
            assert response.status_code == 200
            if response.headers["content-type"].startswith("text/event-stream"):
                frames = [f for f in response.text.split("\r\n\r\n") if f.startswith("data: ")]
                final = json.loads(frames[-1][6:])["result"]
                assert final["statusUpdate"]["status"]["state"] in (
                    "TASK_STATE_COMPLETED", "TASK_STATE_FAILED")
                return
            answer = response.json()
            assert answer["jsonrpc"] == "2.0" and ("result" in answer) != ("error" in answer)

        @settings(max_examples=300, deadline=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(body=_bodies, version=st.sampled_from([None, "1.0", "0.3", "x"]))
        def check(body: bytes, version: str | None) -> None:
            runner.run(one(body, version))

        try:
            check()
            assert adapter.tasks.running() == []
        finally:
            runner.run(client.aclose())
            runner.run(lifespan.__aexit__(None, None, None))
