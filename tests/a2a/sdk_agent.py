"""An a2a-sdk 1.3 echo agent served on 127.0.0.1, the peer of the client interop tests.

The executor's behaviour is chosen by the first word of the user's text:

* (anything else) — Task, WORKING, three artifact chunks ``echo:``, `` <text>``,
  `` (done)`` (append / last_chunk as the SDK sample), COMPLETED.
* ``slow`` — like the echo, but after the second chunk it waits on
  :attr:`SdkAgent.release` (the test sets it) before the third; :attr:`SdkAgent.parked`
  is set when it starts waiting.
* ``fail`` — WORKING, then FAILED with the message ``boom: remote failure``.
* ``raise`` — the executor raises ``RuntimeError("kaboom")``.
* ``input`` — WORKING, then INPUT_REQUIRED with ``need more input``.
* ``message`` — a message-only reply ``echo: <text>`` (no task).

Every HTTP request is recorded (path, lower-cased headers, JSON-RPC method) by a
small ASGI middleware, which can also cut the next ``SendStreamingMessage`` response
after N SSE frames (a clean close before a final state) to force a resubscribe.
"""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes
from a2a.server.tasks import InMemoryTaskStore, TaskUpdater
from a2a.types import (
    AgentCapabilities,
    AgentCard,
    AgentInterface,
    AgentSkill,
    Message,
    Part,
    Role,
    Task,
    TaskState,
    TaskStatus,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

Scope = MutableMapping[str, Any]
ASGIMessage = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[ASGIMessage]]
Send = Callable[[ASGIMessage], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass
class Seen:
    """One HTTP request as the agent received it."""

    path: str
    http_method: str
    headers: dict[str, str]
    rpc_method: str | None
    body: Any


@dataclass
class SdkAgent:
    """The controls and records of one served agent."""

    base_url: str = ""
    requests: list[Seen] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    parked: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: list[str] = field(default_factory=list)
    cancel_seen: asyncio.Event = field(default_factory=asyncio.Event)
    #: cut the next SendStreamingMessage response after this many SSE frames.
    cut_next_stream_after: int | None = None
    #: set when a SubscribeToTask / tasks/resubscribe response sent its first frame.
    subscribed: asyncio.Event = field(default_factory=asyncio.Event)

    def rpc_requests(self) -> list[Seen]:
        """The JSON-RPC POSTs, in order."""
        return [r for r in self.requests if r.rpc_method is not None]


class ModeExecutor(AgentExecutor):
    """The echo executor with modes (see the module docstring)."""

    def __init__(self, agent: SdkAgent) -> None:
        self.agent = agent

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        text = context.get_user_input()
        mode = text.split(" ", 1)[0]
        assert context.task_id is not None and context.context_id is not None
        if mode == "message":
            await event_queue.enqueue_event(Message(
                role=Role.ROLE_AGENT, message_id=str(uuid.uuid4()),
                context_id=context.context_id, parts=[Part(text=f"echo: {text}")]))
            return
        task = context.current_task or Task(
            id=context.task_id, context_id=context.context_id,
            status=TaskStatus(state=TaskState.TASK_STATE_SUBMITTED),
            history=[context.message] if context.message else [])
        await event_queue.enqueue_event(task)
        up = TaskUpdater(event_queue, context.task_id, context.context_id)
        await up.start_work(up.new_agent_message([Part(text="working")]))
        if mode == "raise":
            raise RuntimeError("kaboom")
        if mode == "fail":
            await up.failed(up.new_agent_message([Part(text="boom: remote failure")]))
            return
        if mode == "input":
            await up.requires_input(up.new_agent_message([Part(text="need more input")]))
            return
        words = ["echo:", " " + text, " (done)"]
        for i, word in enumerate(words):
            if mode == "slow" and i == 2:
                self.agent.parked.set()
                await self.agent.release.wait()
            await up.add_artifact([Part(text=word)], artifact_id="echo-artifact", name="echo",
                                  append=i > 0, last_chunk=i == 2)
        await up.complete()

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        assert context.task_id is not None and context.context_id is not None
        self.agent.cancelled.append(context.task_id)
        self.agent.cancel_seen.set()
        up = TaskUpdater(event_queue, context.task_id, context.context_id)
        await up.cancel(up.new_agent_message([Part(text="canceled by request")]))


def _recording(app: ASGIApp, agent: SdkAgent) -> ASGIApp:
    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        raw = b"".join(chunks)
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        rpc = body.get("method") if isinstance(body, dict) else None
        agent.requests.append(Seen(
            path=scope["path"], http_method=scope["method"],
            headers={k.decode().lower(): v.decode() for k, v in scope["headers"]},
            rpc_method=rpc if isinstance(rpc, str) else None, body=body))
        replayed = False

        async def replay() -> ASGIMessage:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()

        cut: int | None = None
        if rpc in ("SendStreamingMessage", "message/stream"):
            cut, agent.cut_next_stream_after = agent.cut_next_stream_after, None
        frames = 0
        closed = False

        async def watched(message: ASGIMessage) -> None:
            nonlocal frames, closed
            if closed:
                return
            is_frame = message["type"] == "http.response.body" and b"data:" in message.get(
                "body", b"")
            if is_frame and rpc in ("SubscribeToTask", "tasks/resubscribe"):
                agent.subscribed.set()
            if cut is not None and is_frame:
                if frames >= cut:
                    closed = True
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    return
                frames += 1
            await send(message)

        await app(scope, replay, watched)

    return middleware


def free_socket() -> socket.socket:
    """A listening-ready TCP socket bound to a free port on 127.0.0.1."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def build_card(base: str, *, streaming: bool = True) -> AgentCard:
    """The 1.0 (union) card with JSON-RPC 1.0 and 0.3 interfaces at ``base/``."""
    return AgentCard(
        name="Echo Agent", description="Echoes text back in 3 streamed chunks.",
        version="0.0.1",
        supported_interfaces=[
            AgentInterface(protocol_binding="JSONRPC", protocol_version="1.0", url=f"{base}/"),
            AgentInterface(protocol_binding="JSONRPC", protocol_version="0.3", url=f"{base}/"),
        ],
        capabilities=AgentCapabilities(streaming=streaming, push_notifications=False),
        default_input_modes=["text/plain"], default_output_modes=["text/plain"],
        skills=[AgentSkill(id="echo", name="Echo", description="Echo text", tags=["echo"])])


def v03_card(base: str) -> dict[str, Any]:
    """A 0.3-only card: ``url`` + ``preferredTransport`` + ``protocolVersion``."""
    return {"name": "Echo Agent 0.3", "description": "0.3 only", "url": f"{base}/",
            "preferredTransport": "JSONRPC", "protocolVersion": "0.3.0", "version": "0.0.1",
            "capabilities": {"streaming": True}, "defaultInputModes": ["text/plain"],
            "defaultOutputModes": ["text/plain"],
            "skills": [{"id": "echo", "name": "Echo", "description": "Echo", "tags": []}]}


@asynccontextmanager
async def serve_agent(*, streaming: bool = True, v03_only: bool = False
                      ) -> AsyncIterator[SdkAgent]:
    """Serve the mode executor in this event loop; yields its :class:`SdkAgent`."""
    sock = free_socket()
    port = sock.getsockname()[1]
    agent = SdkAgent(base_url=f"http://127.0.0.1:{port}")
    card = build_card(agent.base_url, streaming=streaming)
    handler = DefaultRequestHandler(agent_executor=ModeExecutor(agent),
                                    task_store=InMemoryTaskStore(), agent_card=card)
    routes: list[Any] = list(create_jsonrpc_routes(handler, rpc_url="/",
                                                   enable_v0_3_compat=True))
    if v03_only:
        async def card_route(request: Request) -> JSONResponse:
            return JSONResponse(v03_card(agent.base_url))

        routes.insert(0, Route("/.well-known/agent-card.json", card_route))
    else:
        routes = [*create_agent_card_routes(card), *routes]
    app = _recording(Starlette(routes=routes), agent)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="off",
                                           timeout_graceful_shutdown=1))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(10):
            while not server.started:  # startup poll (uvicorn has no started event)
                if task.done():
                    task.result()
                await asyncio.sleep(0.01)
        yield agent
    finally:
        agent.release.set()
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        sock.close()
