"""A2AClientTransport against a real a2a-sdk 1.3 agent on 127.0.0.1 (a2a.md §13.2).

The peer is ``sdk_agent.serve_agent``: an AgentExecutor echo agent with modes,
served by uvicorn in the test's own event loop, recording every request.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from sdk_agent import SdkAgent, serve_agent

from penguiflow import Headers, Message, NodePolicy, create
from penguiflow.remote import RemoteCallRequest, RemoteNode, RemoteStreamEvent
from penguiflow.state import InMemoryStateStore
from penguiflow_a2a._card import parse_card
from penguiflow_a2a.client import A2AClientTransport
from penguiflow_a2a.errors import (
    A2AProtocolError,
    A2ARPCError,
    A2ATaskFailed,
    A2ATaskInterrupted,
    TaskNotCancelableError,
)
from penguiflow_exporters.otel import PenguiFlowIdGenerator

WAIT = 10.0  # hang guard for one awaited step

# The exact union card a2a-sdk 1.3 served in the capture (a2a.md §4), plus unknown fields.
UNION_CARD: dict[str, Any] = {
    "name": "Echo Agent", "description": "Echoes text back in 3 streamed chunks.",
    "supportedInterfaces": [
        {"url": "http://127.0.0.1:35647/", "protocolBinding": "JSONRPC",
         "protocolVersion": "1.0"},
        {"url": "http://127.0.0.1:35647/", "protocolBinding": "JSONRPC",
         "protocolVersion": "0.3"},
        {"url": "http://127.0.0.1:35647/rest", "protocolBinding": "HTTP+JSON",
         "protocolVersion": "1.0"}],
    "version": "0.0.1", "capabilities": {"streaming": True, "pushNotifications": False},
    "defaultInputModes": ["text/plain"], "defaultOutputModes": ["text/plain"],
    "skills": [{"id": "echo", "name": "Echo", "description": "Echo text", "tags": ["echo"],
                "examples": ["hello"]}],
    "preferredTransport": "JSONRPC", "protocolVersion": "0.3",
    "url": "http://127.0.0.1:35647/",
    "x-unknown": {"anything": [1, 2]}, "signatures": [],
}


@pytest.fixture
async def agent() -> AsyncIterator[SdkAgent]:
    async with serve_agent() as served:
        yield served


@pytest.fixture
async def transport() -> AsyncIterator[A2AClientTransport]:
    async with A2AClientTransport(timeout_s=WAIT, resubscribe_backoff_s=0.02) as t:
        yield t


def request(url: str, payload: Any = "hello", **meta: Any) -> RemoteCallRequest:
    return RemoteCallRequest(message=Message(payload=payload, headers=Headers(tenant="t"),
                                             meta=meta),
                             skill="echo", agent_url=url)


async def collect(stream: AsyncIterator[RemoteStreamEvent]) -> list[RemoteStreamEvent]:
    async with asyncio.timeout(WAIT):
        return [event async for event in stream]


class Events:
    """A flow middleware keeping every FlowEvent; tests await a kind."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self._changed = asyncio.Event()

    async def __call__(self, event: Any) -> None:
        self.events.append(event)
        self._changed.set()

    def of(self, kind: str) -> list[Any]:
        return [e for e in self.events if e.event_type == kind]

    async def wait_for(self, kind: str) -> Any:
        async with asyncio.timeout(WAIT):
            while not self.of(kind):
                self._changed.clear()
                await self._changed.wait()
        return self.of(kind)[0]


# -- card -------------------------------------------------------------------------------
def test_union_card_picks_jsonrpc_1_0_and_ignores_the_0_3_extras() -> None:
    ep = parse_card(UNION_CARD, agent_url="http://127.0.0.1:35647", source="card")
    assert (ep.version, ep.rpc_url, ep.streaming) == ("1.0", "http://127.0.0.1:35647/", True)
    assert ep.tenant is None and ep.name == "Echo Agent"


def test_card_variants() -> None:
    only_03 = {"url": "http://h/rpc", "preferredTransport": "JSONRPC",
               "protocolVersion": "0.3.0", "capabilities": {"streaming": False}}
    ep = parse_card(only_03, agent_url="http://h", source="http://h/card")
    assert (ep.version, ep.rpc_url, ep.streaming) == ("0.3", "http://h/rpc", False)
    tenanted = {"supportedInterfaces": [
        {"url": "/rpc", "protocolBinding": "JSONRPC", "protocolVersion": "0.3"},
        {"url": "/v1", "protocolBinding": "JSONRPC", "protocolVersion": "1.0.1",
         "tenant": "acme"}]}
    ep = parse_card(tenanted, agent_url="http://h",
                    source="http://h/.well-known/agent-card.json")
    assert (ep.version, ep.rpc_url, ep.tenant) == ("1.0", "http://h/v1", "acme")
    with pytest.raises(A2AProtocolError, match=r"http://h/card.*no JSON-RPC interface"):
        parse_card({"supportedInterfaces": [{"url": "/r", "protocolBinding": "HTTP+JSON",
                                             "protocolVersion": "1.0"}]},
                   agent_url="http://h", source="http://h/card")
    with pytest.raises(A2AProtocolError, match="not a JSON object"):
        parse_card([1], agent_url="http://h", source="http://h/card")


async def test_tenant_is_echoed_in_params(transport: A2AClientTransport) -> None:
    card = {"supportedInterfaces": [{"url": "http://h/", "protocolBinding": "JSONRPC",
                                     "protocolVersion": "1.0", "tenant": "acme"}]}
    ep = await transport.endpoint("http://h", card)
    _method, body = transport._channel.envelope(ep, "get", {"id": "x"})
    assert b'"tenant": "acme"' in body


async def test_card_that_is_not_there_is_a_clear_error(agent: SdkAgent) -> None:
    async with A2AClientTransport(timeout_s=WAIT) as t:
        with pytest.raises(A2AProtocolError,
                           match=r"/nope/\.well-known/agent-card\.json: HTTP 404"):
            await t.send(request(agent.base_url + "/nope"))


# -- unary ---------------------------------------------------------------------------------
async def test_send_returns_the_result_and_every_request_says_a2a_version_1_0(
        agent: SdkAgent, transport: A2AClientTransport) -> None:
    result = await transport.send(request(agent.base_url))
    assert result.result == "echo: hello (done)"
    assert result.task_id and result.context_id and result.agent_url == agent.base_url
    assert result.meta == {"task_state": "completed", "a2a_method": "SendMessage"}
    await transport.send(request(agent.base_url, "again"))  # the card is cached
    paths = [(r.path, r.rpc_method) for r in agent.requests]
    assert paths == [("/.well-known/agent-card.json", None), ("/", "SendMessage"),
                     ("/", "SendMessage")]
    assert all(r.headers.get("a2a-version") == "1.0" for r in agent.requests)
    sent = agent.rpc_requests()[0].body
    uuid.UUID(sent["id"])
    message = sent["params"]["message"]
    assert message["role"] == "ROLE_USER" and message["parts"] == [{"text": "hello"}]
    uuid.UUID(message["messageId"])
    assert "contextId" not in message


async def test_data_payload_and_context_continuation(agent: SdkAgent,
                                                     transport: A2AClientTransport) -> None:
    first = await transport.send(request(agent.base_url, {"k": 1}))
    assert agent.rpc_requests()[0].body["params"]["message"]["parts"] == [{"data": {"k": 1}}]
    again = await transport.send(request(agent.base_url, "more",
                                         a2a_context_id=first.context_id))
    assert again.context_id == first.context_id and again.task_id != first.task_id


async def test_headers_go_on_every_request_and_a_given_client_is_not_closed(
        agent: SdkAgent) -> None:
    async with httpx.AsyncClient() as client:
        async with A2AClientTransport(headers={"Authorization": "Bearer xyz"},
                                      httpx_client=client, timeout_s=WAIT) as t:
            await t.send(request(agent.base_url))
        assert not client.is_closed
    assert all(r.headers.get("authorization") == "Bearer xyz" for r in agent.requests)


async def test_failed_task_raises_with_the_remote_message(
        agent: SdkAgent, transport: A2AClientTransport) -> None:
    with pytest.raises(A2ATaskFailed, match="boom: remote failure") as info:
        await transport.send(request(agent.base_url, "fail now"))
    assert info.value.state == "failed" and info.value.task_id
    assert agent.base_url in str(info.value)
    with pytest.raises(A2ATaskFailed, match="boom: remote failure"):
        await collect(transport.stream(request(agent.base_url, "fail now")))


async def test_input_required_raises_interrupted(agent: SdkAgent,
                                                 transport: A2AClientTransport) -> None:
    with pytest.raises(A2ATaskInterrupted, match="input-required") as info:
        await transport.send(request(agent.base_url, "input please"))
    assert "RemoteNode cannot" in str(info.value) and str(info.value.task_id) in str(info.value)
    seen: list[RemoteStreamEvent] = []
    with pytest.raises(A2ATaskInterrupted, match="need more input"):
        async for event in transport.stream(request(agent.base_url, "input please")):
            seen.append(event)
    assert not any(e.done for e in seen)


async def test_message_only_reply(agent: SdkAgent, transport: A2AClientTransport) -> None:
    result = await transport.send(request(agent.base_url, "message me"))
    assert result.result == "echo: message me" and result.context_id
    events = await collect(transport.stream(request(agent.base_url, "message me")))
    assert [(e.done, e.result) for e in events] == [(True, "echo: message me")]


async def test_executor_exception_is_an_rpc_error(agent: SdkAgent,
                                                  transport: A2AClientTransport) -> None:
    with pytest.raises(A2ARPCError, match="kaboom") as info:
        await transport.send(request(agent.base_url, "raise it"))
    assert info.value.code == -32603 and info.value.method == "SendMessage"
    with pytest.raises(A2ARPCError, match="kaboom") as info:  # an `event: error` frame
        await collect(transport.stream(request(agent.base_url, "raise it")))
    assert info.value.method == "SendStreamingMessage"


# -- streaming ----------------------------------------------------------------------------
async def test_stream_yields_chunks_in_order_then_done_once(
        agent: SdkAgent, transport: A2AClientTransport) -> None:
    events = await collect(transport.stream(request(agent.base_url, "world")))
    chunks = [(e.text, dict(e.meta or {})) for e in events if e.text]
    assert [text for text, _ in chunks] == ["echo:", " world", " (done)"]
    assert [(meta["append"], meta["last_chunk"]) for _, meta in chunks] == [
        (False, False), (True, False), (True, True)]
    assert all(meta["artifact_id"] == "echo-artifact" for _, meta in chunks)
    states = [dict(e.meta or {}).get("task_state") for e in events if e.text is None]
    assert states == ["submitted", "working"]
    assert [e.done for e in events].count(True) == 1 and events[-1].done
    assert events[-1].result == "echo: world (done)"
    assert events[-1].meta == {"task_state": "completed", "a2a_method": "SendStreamingMessage"}
    assert len({(e.task_id, e.context_id) for e in events}) == 1
    (rpc,) = agent.rpc_requests()
    assert rpc.rpc_method == "SendStreamingMessage"
    assert rpc.headers["accept"] == "text/event-stream" and rpc.headers["a2a-version"] == "1.0"


async def test_resubscribe_after_a_drop_delivers_every_chunk_once(
        agent: SdkAgent, transport: A2AClientTransport) -> None:
    # Frames forwarded: task, WORKING, chunk 1; chunk 2 is swallowed and the stream
    # closed; the agent then parks before chunk 3 until the resubscription is live.
    agent.cut_next_stream_after = 3

    async def release_when_subscribed() -> None:
        await agent.subscribed.wait()
        agent.release.set()

    helper = asyncio.create_task(release_when_subscribed())
    events = await collect(transport.stream(request(agent.base_url, "slow resub")))
    await helper
    assert [e.text for e in events if e.text] == ["echo:", " slow resub", " (done)"]
    assert events[-1].done and events[-1].result == "echo: slow resub (done)"
    assert [e.done for e in events].count(True) == 1
    methods = [r.rpc_method for r in agent.rpc_requests()]
    assert methods == ["SendStreamingMessage", "SubscribeToTask"]
    assert agent.rpc_requests()[1].body["params"]["id"] == events[-1].task_id


async def test_streaming_false_card_falls_back_to_send_message(
        caplog: pytest.LogCaptureFixture) -> None:
    async with serve_agent(streaming=False) as agent, \
            A2AClientTransport(timeout_s=WAIT) as t:
        with caplog.at_level(logging.INFO, logger="penguiflow_a2a.client"):
            events = await collect(t.stream(request(agent.base_url)))
    assert [(e.done, e.result) for e in events] == [(True, "echo: hello (done)")]
    assert events[0].meta and events[0].meta["a2a_method"] == "SendMessage"
    assert [r.rpc_method for r in agent.rpc_requests()] == ["SendMessage"]
    lines = [r for r in caplog.records if r.name == "penguiflow_a2a.client"]
    assert len(lines) == 1 and "falling back to SendMessage" in lines[0].getMessage()


async def test_a_0_3_only_card_speaks_0_3_on_the_wire() -> None:
    async with serve_agent(v03_only=True) as agent, A2AClientTransport(timeout_s=WAIT) as t:
        result = await t.send(request(agent.base_url, "via compat"))
        events = await collect(t.stream(request(agent.base_url, "via compat")))
        with pytest.raises(TaskNotCancelableError):
            await t.cancel(agent_url=agent.base_url, task_id=events[-1].task_id or "")
    assert result.result == "echo: via compat (done)"
    assert result.meta and result.meta["a2a_method"] == "message/send"
    assert [e.text for e in events if e.text] == ["echo:", " via compat", " (done)"]
    assert events[-1].result == "echo: via compat (done)"
    assert [r.rpc_method for r in agent.rpc_requests()] == [
        "message/send", "message/stream", "tasks/cancel"]
    assert all(r.headers.get("a2a-version") == "0.3" for r in agent.rpc_requests())
    part = agent.rpc_requests()[0].body["params"]["message"]["parts"][0]
    assert part == {"kind": "text", "text": "via compat"}


# -- cancel --------------------------------------------------------------------------------
async def test_cancel_then_cancel_again_is_not_cancelable(
        agent: SdkAgent, transport: A2AClientTransport) -> None:
    stream = transport.stream(request(agent.base_url, "slow cancel-me"))
    task_id = None
    async with asyncio.timeout(WAIT):
        async for event in stream:
            task_id = event.task_id
            if task_id:
                break
        await agent.parked.wait()
    assert task_id is not None
    await transport.cancel(agent_url=agent.base_url, task_id=task_id)
    assert agent.cancelled == [task_id]
    with pytest.raises(A2ATaskFailed, match="canceled by request") as info:
        async with asyncio.timeout(WAIT):
            async for _ in stream:
                pass
    assert info.value.state == "canceled"
    with pytest.raises(TaskNotCancelableError) as again:
        await transport.cancel(agent_url=agent.base_url, task_id=task_id)
    assert again.value.code == -32002 and agent.base_url in str(again.value)


# -- inside a flow ---------------------------------------------------------------------------
@pytest.mark.parametrize("streaming", [False, True])
async def test_remote_node_in_a_flow(agent: SdkAgent, transport: A2AClientTransport,
                                     streaming: bool) -> None:
    store = InMemoryStateStore()
    node = RemoteNode(transport=transport, skill="echo", agent_url=agent.base_url,
                      name="remote", streaming=streaming, policy=NodePolicy(validate="none"))
    flow = create(node.to(), state_store=store)
    flow.run()
    try:
        m = Message(payload="hi", headers=Headers(tenant="t"))
        await flow.emit(m)
        out = await asyncio.wait_for(flow.fetch(), WAIT)
        chunks = []
        while getattr(out, "payload", None) is not None and hasattr(out.payload, "seq"):
            chunks.append(out.payload)  # StreamChunks reach Rookery before the result
            out = await asyncio.wait_for(flow.fetch(), WAIT)
    finally:
        await flow.stop()
    assert out == "echo: hi (done)" or getattr(out, "payload", out) == "echo: hi (done)"
    history = await store.load_history(m.trace_id)
    kinds = [e.kind for e in history if e.kind.startswith("remote_")]
    assert kinds[0] == "remote_call_start" and kinds[-1] == "remote_call_success"
    success = next(e for e in history if e.kind == "remote_call_success").payload
    assert success["remote_task_id"] and success["remote_context_id"]
    assert success["remote_task_state"] == "completed"
    if streaming:
        assert [c.text for c in chunks if c.text] == ["echo:", " hi", " (done)"]
        stream_events = [e.payload for e in history if e.kind == "remote_stream_event"]
        assert len(stream_events) == 6  # submitted, working, 3 chunks, done
        assert all(p["remote_task_id"] == success["remote_task_id"] for p in stream_events)
        assert success["remote_method"] == "SendStreamingMessage"
    else:
        assert "remote_stream_event" not in kinds
        assert success["remote_method"] == "SendMessage"


async def _cancel_mid_stream(agent: SdkAgent, node: RemoteNode) -> tuple[Events, Any]:
    """Run ``node`` on a message the agent parks, cancel its trace once the node knows
    the remote task id; the flow's events and its ``remote_call_cancelled``."""
    events = Events()
    flow = create(node.to(), middlewares=[events], state_store=InMemoryStateStore())
    flow.run()
    try:
        m = Message(payload="slow cancel-me", headers=Headers(tenant="t"))
        await flow.emit(m)
        async with asyncio.timeout(WAIT):
            await agent.parked.wait()
        await events.wait_for("remote_stream_event")  # the node knows the task id
        assert await asyncio.wait_for(flow.cancel(m.trace_id), WAIT) is True
        cancelled = await events.wait_for("remote_call_cancelled")
    finally:
        await flow.stop()
    return events, cancelled


async def test_flow_cancel_mid_stream_cancels_the_remote_task(
        agent: SdkAgent, transport: A2AClientTransport) -> None:
    node = RemoteNode(transport=transport, skill="echo", agent_url=agent.base_url,
                      name="remote", streaming=True, policy=NodePolicy(validate="none"))
    events, cancelled = await _cancel_mid_stream(agent, node)
    assert agent.cancel_seen.is_set()
    assert agent.cancelled == [cancelled.extra["remote_task_id"]]
    assert cancelled.extra["remote_cancel_reason"] == "trace_cancel"
    assert cancelled.latency_ms is not None and cancelled.latency_ms > 0
    assert events.of("remote_call_success") == []
    assert "CancelTask" in [r.rpc_method for r in agent.rpc_requests()]


async def test_flow_stop_mid_stream_cancels_the_remote_task(
        agent: SdkAgent, transport: A2AClientTransport) -> None:
    # The docs say a call cut short by flow.stop() leaves no remote task running; the
    # node's CancelTask ran in a task registered for stop() to cancel, so stop()
    # cancelled it before it was sent and the agent's task stayed WORKING.
    events = Events()
    node = RemoteNode(transport=transport, skill="echo", agent_url=agent.base_url,
                      name="remote", streaming=True, policy=NodePolicy(validate="none"))
    flow = create(node.to(), middlewares=[events], state_store=InMemoryStateStore())
    flow.run()
    try:
        await flow.emit(Message(payload="slow stop-me", headers=Headers(tenant="t")))
        async with asyncio.timeout(WAIT):
            await agent.parked.wait()
        stream_event = await events.wait_for("remote_stream_event")  # the task id is known
    finally:
        async with asyncio.timeout(WAIT):
            await flow.stop()
    # stop() returned after the CancelTask round trip: no waiting needed here.
    task_id = stream_event.extra["remote_task_id"]
    assert agent.cancelled == [task_id]
    (cancelled,) = events.of("remote_call_cancelled")
    assert cancelled.extra["remote_cancel_reason"] == "local_cancel"
    assert cancelled.extra["remote_task_id"] == task_id
    agent.release.set()


async def test_a_remote_node_whose_transport_times_out_cancels_the_remote_task(
        agent: SdkAgent) -> None:
    # A2AClientTransport(timeout_s=...) gave up on the stream and the node failed,
    # but no CancelTask was sent: the agent's task stayed WORKING (and each retry of
    # the node started another one).
    events = Events()
    async with A2AClientTransport(timeout_s=1.0) as transport:
        node = RemoteNode(transport=transport, skill="echo", agent_url=agent.base_url,
                          name="remote", streaming=True, policy=NodePolicy(validate="none"))
        flow = create(node.to(), middlewares=[events], emit_errors_to_rookery=True)
        flow.run()
        try:
            await flow.emit(Message(payload="slow timeout", headers=Headers(tenant="t")))
            error = await events.wait_for("remote_call_error")
            out = await asyncio.wait_for(flow.fetch(), WAIT)
            while getattr(getattr(out, "payload", None), "text", None) is not None:
                out = await asyncio.wait_for(flow.fetch(), WAIT)  # the chunks first
        finally:
            await flow.stop()
    task_id = error.extra["remote_task_id"]
    assert agent.cancelled == [task_id]
    assert "A2ATimeoutError" in error.extra["remote_error"]
    assert "the task was cancelled (CancelTask)" in error.extra["remote_error"]
    assert "A2ATimeoutError" in str(getattr(out, "message", out))
    agent.release.set()


# -- trace context and the version header ------------------------------------------------------
async def test_traceparent_names_the_remote_client_span(
        agent: SdkAgent, transport: A2AClientTransport) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(id_generator=PenguiFlowIdGenerator())
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    node = RemoteNode(transport=transport, skill="echo", agent_url=agent.base_url,
                      name="remote", policy=NodePolicy(validate="none"))
    flow = create(node.to(), tracer_provider=provider)
    flow.run()
    try:
        m = Message(payload="traced", headers=Headers(tenant="t"))
        await flow.emit(m)
        await asyncio.wait_for(flow.fetch(), WAIT)
    finally:
        await flow.stop()
        provider.shutdown()
    (client,) = [s for s in exporter.get_finished_spans() if s.kind is SpanKind.CLIENT]
    (rpc,) = agent.rpc_requests()
    _version, trace_hex, span_hex, _flags = rpc.headers["traceparent"].split("-")
    assert trace_hex == m.trace_id == format(client.context.trace_id, "032x")
    assert span_hex == format(client.context.span_id, "016x")


async def test_the_sdk_server_rejects_a_1_0_method_without_the_version_header(
        agent: SdkAgent) -> None:
    body = {"jsonrpc": "2.0", "id": "1", "method": "GetTask", "params": {"id": "nope"}}
    async with httpx.AsyncClient(timeout=WAIT) as client:
        bare = (await client.post(agent.base_url + "/", json=body)).json()
        versioned = (await client.post(agent.base_url + "/", json=body,
                                       headers={"A2A-Version": "1.0"})).json()
    assert bare["error"]["code"] == -32009
    assert versioned["error"]["code"] == -32001  # the header is what makes it 1.0


async def test_a_cancel_reaches_an_agent_given_by_an_inline_card(
        agent: SdkAgent, transport: A2AClientTransport) -> None:
    # The card is given to the node; its agent URL serves none (a gateway path).
    async with httpx.AsyncClient() as client:
        card = (await client.get(f"{agent.base_url}/.well-known/agent-card.json")).json()
    node = RemoteNode(transport=transport, skill="echo", agent_url=f"{agent.base_url}/nocard",
                      agent_card=card, name="remote", streaming=True,
                      policy=NodePolicy(validate="none"))
    events, cancelled = await _cancel_mid_stream(agent, node)
    # Before: CancelTask fetched <agent_url>/.well-known/agent-card.json (404) and
    # was never sent; the remote task ran on.
    assert agent.cancelled == [cancelled.extra["remote_task_id"]]
    assert events.of("remote_cancel_error") == []


async def test_a_subclass_may_still_set_cancel_timeout_s() -> None:
    # cancel_timeout_s became a property RemoteNode reads; a subclass that set it in
    # its __init__ (as before) failed with "property ... has no setter".
    class Configured(A2AClientTransport):
        def __init__(self) -> None:
            super().__init__()
            self.cancel_timeout_s = 3.0

    transport = Configured()
    try:
        assert transport.cancel_timeout_s == 3.0
    finally:
        await transport.aclose()
