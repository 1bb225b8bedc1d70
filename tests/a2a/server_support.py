"""Helpers for the A2A server tests: flows to serve, a real loopback server, SSE reading.

Servers run on real sockets (uvicorn in the test's event loop): httpx's
ASGITransport buffers whole responses, so it cannot show a stream's frames as
they happen, a cancel mid-stream, or a client that stops reading.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import uvicorn

from penguiflow import Message, Node, NodePolicy, create
from penguiflow.core import PenguiFlow
from penguiflow_a2a.server import A2AServerAdapter, create_a2a_app
from penguiflow_a2a.sse import aiter_sse

CARD = {"name": "Echo", "description": "Echoes its input", "version": "2.0.0",
        "tags": ["echo"], "skills": [{"name": "echo", "description": "echo text"}]}

TIMEOUT = 10.0


def free_port() -> int:
    """A loopback port free right now (reserved before the card, which names it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def node(fn: Callable[..., Any], name: str = "work") -> Node:
    return Node(fn, name=name, policy=NodePolicy(validate="none"))


def echo_flow(**kwargs: Any) -> PenguiFlow:
    """Returns ``{"n": payload}`` (a plain dict: no trace id of its own)."""

    async def work(message: Message, ctx: Any) -> dict[str, Any]:
        return {"n": message.payload}

    return create(node(work).to(), **kwargs)


def chunk_flow(texts: list[str], *, final: Any = "done", gate: asyncio.Event | None = None,
               **kwargs: Any) -> PenguiFlow:
    """Emits one chunk per text (waiting on ``gate`` after the first), then returns ``final``."""

    async def work(message: Message, ctx: Any) -> Any:
        for i, text in enumerate(texts):
            await ctx.emit_chunk(parent=message, text=text, done=i == len(texts) - 1)
            if i == 0 and gate is not None:
                await gate.wait()
        return final

    return create(node(work).to(), **kwargs)


class Gate:
    """A flow whose node tells the test it started, then waits until released."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.cancelled = asyncio.Event()

    def flow(self, **kwargs: Any) -> PenguiFlow:
        async def work(message: Message, ctx: Any) -> str:
            self.started.set()
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
            return f"released {message.payload}"

        return create(node(work).to(), **kwargs)


def make_adapter(flow: Any, port: int, **kwargs: Any) -> A2AServerAdapter:
    kwargs.setdefault("default_headers", {"tenant": "acme"})
    return A2AServerAdapter(flow, agent_card=CARD, agent_url=f"http://127.0.0.1:{port}",
                            **kwargs)


@contextlib.asynccontextmanager
async def serve(adapter: A2AServerAdapter, port: int, *,
                wrap: Callable[[Any], Any] | None = None) -> AsyncIterator[str]:
    """Serve ``create_a2a_app(adapter)`` on 127.0.0.1:``port``; yields the base URL.

    ``wrap``: an ASGI middleware put around the app (to inject a server-side fault).
    """
    app = create_a2a_app(adapter)
    server = uvicorn.Server(uvicorn.Config(app if wrap is None else wrap(app),
                                           host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(TIMEOUT):
            while not server.started:
                if task.done():
                    task.result()
                await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, TIMEOUT)


@contextlib.asynccontextmanager
async def served(flow: Any, **kwargs: Any) -> AsyncIterator[tuple[str, A2AServerAdapter]]:
    """A fresh adapter around ``flow`` served on a free port: ``(base URL, adapter)``."""
    port = free_port()
    adapter = make_adapter(flow, port, **kwargs)
    async with serve(adapter, port) as url:
        yield url, adapter


def http(**kwargs: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=httpx.Timeout(TIMEOUT, read=None), **kwargs)


V1 = {"A2A-Version": "1.0"}


def rpc(method: str, params: Any, rpc_id: Any = "1") -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rpc_id, "method": method, "params": params}


def user_message(text: str, **extra: Any) -> dict[str, Any]:
    return {"messageId": "m-" + text[:8], "role": "ROLE_USER", "parts": [{"text": text}],
            **extra}


async def sse_results(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The JSON-RPC envelopes of an SSE response, in order."""
    async for event in aiter_sse(response.aiter_raw()):
        yield json.loads(event.data)


async def collect_stream(client: httpx.AsyncClient, url: str, body: dict[str, Any],
                         headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """POST ``body`` and collect every envelope until the server closes the stream."""
    async with client.stream("POST", url, json=body, headers=headers or V1) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return [envelope async for envelope in sse_results(response)]


def no_running_tasks(adapter: A2AServerAdapter, flow: Any) -> None:
    """Nothing leaked: no running task, no routed trace, no pending trace in the flow."""
    assert adapter.tasks.running() == []
    assert not any(adapter.tasks.trace_active(t.trace_id) for t in adapter.tasks)
    traces = getattr(flow, "_traces", None)
    if traces is not None:
        assert dict(traces) == {}
