"""A2A rows: our server against a2a-sdk's, our client against plain httpx.

* **Round trip** — a one-node echo flow served by ``create_a2a_app`` vs the same
  echo agent on a2a-sdk's ``DefaultRequestHandler``; each server in its own
  process, both called by the same client (one keep-alive ``httpx.AsyncClient``
  posting the same ``SendMessage`` JSON-RPC request), one request at a time.
  µs per round trip; target ratio ≤ 1.0.
* **Streaming** — an a2a-sdk agent streaming ``chunks`` artifact updates; read
  through ``A2AClientTransport.stream`` vs the same SSE stream read with plain
  httpx (``aiter_lines`` + ``json.loads`` of each ``data:`` line). Chunks/s;
  target ratio ≥ 0.8.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from harness import Row, interleave, median_of

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Server:
    """``a2a_servers.py KIND`` started in a child process; :meth:`url` waits until it
    listens."""

    def __init__(self, proc: asyncio.subprocess.Process, kind: str, port: int) -> None:
        self.proc, self.kind, self.port = proc, kind, port
        self._ready: asyncio.Future[str] | None = None

    async def url(self) -> str:
        """The base URL, once the server said ``ready``; RuntimeError if it did not."""
        if self._ready is None:
            self._ready = asyncio.ensure_future(self._wait_ready())
        return await self._ready

    async def _wait_ready(self) -> str:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 30)
        if line.strip() != b"ready":
            raise RuntimeError(f"the {self.kind} A2A server did not start (said {line!r})")
        return f"http://127.0.0.1:{self.port}"


@contextlib.asynccontextmanager
async def serving(*specs: tuple[str, int]) -> AsyncIterator[dict[str, _Server]]:
    """Start every ``(kind, chunks)`` server at once (their imports overlap: each
    takes ~2 s to start, most of the quick mode's time when started one after
    another) and wait until each listens or failed, so that none is still starting
    while a row is timed; yield them by kind; stop them all on exit."""
    servers: dict[str, _Server] = {}
    try:
        for kind, chunks in specs:
            port = _free_port()
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(HERE / "a2a_servers.py"), kind, str(port), str(chunks),
                stdout=subprocess.PIPE)
            servers[kind] = _Server(proc, kind, port)
        # A server that failed to start fails its row (when it asks for the URL) only.
        await asyncio.gather(*(server.url() for server in servers.values()),
                             return_exceptions=True)
        yield servers
    finally:
        for server in servers.values():
            with contextlib.suppress(ProcessLookupError):
                server.proc.terminate()
        for server in servers.values():
            with contextlib.suppress(ProcessLookupError, asyncio.TimeoutError):
                await asyncio.wait_for(server.proc.wait(), 10)


def _send_body(text: str) -> bytes:
    return json.dumps({
        "jsonrpc": "2.0", "id": str(uuid.uuid4()), "method": "SendMessage",
        "params": {"message": {"messageId": str(uuid.uuid4()), "role": "ROLE_USER",
                               "parts": [{"text": text}]}}}).encode()


async def _round_trips(client: Any, url: str, count: int) -> dict[str, float]:
    headers = {"A2A-Version": "1.0", "Content-Type": "application/json"}
    start = time.perf_counter()
    for i in range(count):
        response = await client.post(url + "/", content=_send_body(f"hi {i}"), headers=headers)
        answer = response.json()
        state = answer["result"]["task"]["status"]["state"]
        if state != "TASK_STATE_COMPLETED":
            raise RuntimeError(f"{url} answered {answer!r}")
    return {"us": (time.perf_counter() - start) / count * 1e6}


async def round_trip_row(servers: dict[str, _Server], reps: int, count: int) -> Row:
    import httpx

    ours_url, sdk_url = await servers["ours"].url(), await servers["sdk"].url()
    async with httpx.AsyncClient(timeout=30) as client:
        for url in (ours_url, sdk_url):  # warm-up: connections, first-call imports
            await _round_trips(client, url, max(10, count // 10))
        sdk, ours = await interleave([
            lambda: _round_trips(client, sdk_url, count),
            lambda: _round_trips(client, ours_url, count)], reps)
    return Row("A2A SendMessage round trip, one-node echo flow vs a2a-sdk echo agent",
               "µs", median_of(sdk, "us"), median_of(ours, "us"),
               [r["us"] for r in sdk], [r["us"] for r in ours],
               note="floor = a2a-sdk 1.3 DefaultRequestHandler; target ratio <= 1.0")


async def _stream_httpx(client: Any, url: str, chunks: int) -> dict[str, float]:
    body = json.loads(_send_body("stream"))
    body["method"] = "SendStreamingMessage"
    headers = {"A2A-Version": "1.0", "Accept": "text/event-stream"}
    seen = 0
    start = time.perf_counter()
    async with client.stream("POST", url + "/", json=body, headers=headers) as response:
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                result = json.loads(line[5:])["result"]
                if "artifactUpdate" in result:
                    seen += 1
    elapsed = time.perf_counter() - start
    if seen != chunks + 1:
        raise RuntimeError(f"plain httpx read {seen} artifact updates, expected {chunks + 1}")
    return {"chunks_s": seen / elapsed}


async def _stream_ours(transport: Any, url: str, chunks: int) -> dict[str, float]:
    from penguiflow import Headers, Message
    from penguiflow.remote import RemoteCallRequest

    request = RemoteCallRequest(message=Message(payload="stream", headers=Headers(tenant="b")),
                                skill="echo", agent_url=url)
    seen = 0
    start = time.perf_counter()
    async for event in transport.stream(request):
        if event.text and not event.done:  # the closing done event carries no chunk
            seen += 1
    elapsed = time.perf_counter() - start
    if seen != chunks + 1:
        raise RuntimeError(f"A2AClientTransport read {seen} chunks, expected {chunks + 1}")
    return {"chunks_s": seen / elapsed}


async def streaming_row(servers: dict[str, _Server], reps: int, chunks: int) -> Row:
    import httpx

    from penguiflow_a2a import A2AClientTransport

    url = await servers["sdk-stream"].url()
    async with httpx.AsyncClient(timeout=httpx.Timeout(30, read=None)) as client:
        transport = A2AClientTransport(httpx_client=client)
        await _stream_httpx(client, url, chunks)  # warm-up (and the card is cached)
        await _stream_ours(transport, url, chunks)
        plain, ours = await interleave([
            lambda: _stream_httpx(client, url, chunks),
            lambda: _stream_ours(transport, url, chunks)], reps)
        await transport.aclose()
    return Row(f"A2A streaming, {chunks} chunks from an a2a-sdk agent: A2AClientTransport vs "
               "plain httpx SSE", "chunks/s",
               median_of(plain, "chunks_s"), median_of(ours, "chunks_s"),
               [r["chunks_s"] for r in plain], [r["chunks_s"] for r in ours],
               note="floor = httpx aiter_lines + json.loads; target ratio >= 0.8")


async def a2a_rows(reps: int, quick: bool, progress: Callable[[str], None]) -> list[Row]:
    """Both rows; a row that cannot run says why instead of failing the table."""
    rows: list[Row] = []
    chunks = 50 if quick else 2000
    async with serving(("ours", 0), ("sdk", 0), ("sdk-stream", chunks)) as servers:
        for name, make in (
                ("A2A round trip", lambda: round_trip_row(servers, reps, 20 if quick else 300)),
                ("A2A streaming", lambda: streaming_row(servers, reps, chunks))):
            progress(name)
            try:
                rows.append(await make())
            except Exception as exc:
                rows.append(Row(name, "", None, None, note=f"skipped: {exc!r}"))
    return rows
