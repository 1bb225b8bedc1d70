"""A2AClientTransport against hostile or broken peers: raw ``asyncio.start_server``
sockets on 127.0.0.1 that speak just enough HTTP/1.1 to misbehave precisely.

Plus property tests of the SSE decoder the client parses streams with.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from penguiflow import Headers, Message, NodePolicy, create
from penguiflow.remote import RemoteCallRequest, RemoteNode, RemoteStreamEvent
from penguiflow_a2a.client import GIVE_UP_CANCEL_S, A2AClientTransport
from penguiflow_a2a.errors import (
    A2AConnectionError,
    A2AProtocolError,
    A2ARPCError,
    A2ATimeoutError,
    TaskNotCancelableError,
    TaskNotFoundError,
    UnsupportedOperationError,
    VersionNotSupportedError,
)
from penguiflow_a2a.sse import SSEDecoder, SSEError, SSEEvent

WAIT = 10.0
TASK = "task-1"
CTX = "ctx-1"


@dataclass
class Req:
    """One request the peer read."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any

    @property
    def rpc(self) -> str | None:
        return self.body.get("method") if isinstance(self.body, dict) else None


Respond = Callable[[Req, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Peer:
    url: str
    requests: list[Req] = field(default_factory=list)

    def rpcs(self) -> list[str | None]:
        return [r.rpc for r in self.requests if r.rpc is not None]


async def _read_request(reader: asyncio.StreamReader) -> Req | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = {k.strip().lower(): v.strip()
               for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    raw = await reader.readexactly(int(headers.get("content-length", "0")))
    return Req(method, path, headers, json.loads(raw) if raw else None)


def card(url: str, *, version: str = "1.0", streaming: bool = True) -> dict[str, Any]:
    return {"name": "hostile", "supportedInterfaces": [
        {"url": f"{url}/", "protocolBinding": "JSONRPC", "protocolVersion": version}],
        "capabilities": {"streaming": streaming}}


def http(body: bytes, *, status: int = 200, ctype: str = "application/json") -> bytes:
    return (f"HTTP/1.1 {status} X\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def rpc_result(req: Req, result: Any) -> bytes:
    return http(json.dumps({"jsonrpc": "2.0", "id": req.body["id"], "result": result}).encode())


def rpc_error(req: Req, code: int, message: str) -> bytes:
    return http(json.dumps({"jsonrpc": "2.0", "id": req.body["id"],
                            "error": {"code": code, "message": message}}).encode())


SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
            b"Connection: close\r\n\r\n")


def frame(result: Any, *, event: str | None = None, crlf: bool = True) -> bytes:
    nl = "\r\n" if crlf else "\n"
    head = f"event: {event}{nl}" if event else ""
    return f"{head}data: {json.dumps(result)}{nl}{nl}".encode()


def status(state: str, text: str | None = None) -> dict[str, Any]:
    st_: dict[str, Any] = {"state": state}
    if text is not None:
        st_["message"] = {"messageId": "m", "role": "ROLE_AGENT", "parts": [{"text": text}]}
    return st_


def task(state: str, parts: list[str] | None = None) -> dict[str, Any]:
    t: dict[str, Any] = {"id": TASK, "contextId": CTX, "status": status(state)}
    if parts:
        t["artifacts"] = [{"artifactId": "a", "parts": [{"text": p} for p in parts]}]
    return t


def chunk(text: str, *, append: bool) -> dict[str, Any]:
    update: dict[str, Any] = {"taskId": TASK, "contextId": CTX,
                              "artifact": {"artifactId": "a", "parts": [{"text": text}]}}
    if append:
        update["append"] = True
    return {"result": {"artifactUpdate": update}}


def wrap(result: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": "x", "result": result}


@asynccontextmanager
async def peer(respond: Respond, *, card_for: Callable[[str], Any] | None = card
               ) -> AsyncIterator[Peer]:
    """Serve ``respond`` on a fresh port; the card from ``card_for`` (None: ``respond``
    answers the card request too)."""
    handlers: set[asyncio.Task[Any]] = set()
    state = Peer(url="")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            while not writer.is_closing():
                req = await _read_request(reader)
                if req is None:
                    break
                state.requests.append(req)
                if card_for is not None and req.path == "/.well-known/agent-card.json":
                    writer.write(http(json.dumps(card_for(state.url)).encode()))
                else:
                    await respond(req, writer)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    state.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        yield state
    finally:
        server.close()
        for h in handlers:
            h.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()


def request(url: str, payload: Any = "hi", timeout_s: float | None = None) -> RemoteCallRequest:
    return RemoteCallRequest(message=Message(payload=payload, headers=Headers(tenant="t")),
                             skill="s", agent_url=url, timeout_s=timeout_s)


async def collect(stream: AsyncIterator[RemoteStreamEvent]) -> list[RemoteStreamEvent]:
    async with asyncio.timeout(WAIT):
        return [event async for event in stream]


def client(**kwargs: Any) -> A2AClientTransport:
    kwargs.setdefault("timeout_s", WAIT)
    kwargs.setdefault("resubscribe_backoff_s", 0.01)
    return A2AClientTransport(**kwargs)


# -- unreachable, silent, garbled -------------------------------------------------------------
async def test_connection_refused_names_the_url() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()  # nothing listens there now
    async with client() as t:
        with pytest.raises(A2AConnectionError, match=url) as info:
            await t.send(request(url))
        assert info.value.agent_url == url and info.value.__cause__ is not None
        with pytest.raises(A2AConnectionError, match=url):
            await collect(t.stream(request(url)))


@pytest.mark.parametrize("where", ["card", "rpc", "stream"])
async def test_a_peer_that_never_answers_times_out(where: str) -> None:
    forever = asyncio.Event()

    async def silent(req: Req, writer: asyncio.StreamWriter) -> None:
        if where == "stream":
            writer.write(SSE_HEAD + frame(wrap({"task": task("TASK_STATE_WORKING")})))
            await writer.drain()
        await forever.wait()

    async with peer(silent, card_for=None if where == "card" else card) as p, \
            client(timeout_s=0.3) as t:
        started = time.monotonic()
        with pytest.raises(A2ATimeoutError, match=p.url):
            if where == "stream":
                await collect(t.stream(request(p.url)))
            else:
                await t.send(request(p.url))
        assert time.monotonic() - started < 3.0


@pytest.mark.parametrize("streaming", [False, True])
async def test_a_requests_own_timeout_wins_over_the_transports(streaming: bool) -> None:
    # A blocking SendMessage answers when the task ends: a request that allows 10 s
    # must not be cut at the transport's 0.3 s (httpx's read timeout did), also
    # where stream() falls back to SendMessage for an agent that does not stream.
    async def slow_agent(req: Req, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.8)  # the agent's work, longer than the transport's bound
        writer.write(rpc_result(req, {"task": task("TASK_STATE_COMPLETED", ["done"])}))

    async with peer(slow_agent, card_for=lambda url: card(url, streaming=False)) as p, \
            client(timeout_s=0.3) as t:
        if streaming:
            events = await collect(t.stream(request(p.url, timeout_s=WAIT)))
            assert events[-1].done and events[-1].result == "done"
        else:
            assert (await t.send(request(p.url, timeout_s=WAIT))).result == "done"
        with pytest.raises(A2ATimeoutError):  # without its own timeout: the transport's
            await t.send(request(p.url))


async def test_a_closed_transport_refuses_calls_instead_of_opening_a_new_client() -> None:
    async def answer(req: Req, writer: asyncio.StreamWriter) -> None:
        writer.write(rpc_result(req, {"task": task("TASK_STATE_COMPLETED", ["ok"])}))

    async with peer(answer) as p:
        t = client()
        assert (await t.send(request(p.url))).result == "ok"
        await t.aclose()
        calls: list[Callable[[], Awaitable[Any]]] = [
            lambda: t.send(request(p.url)), lambda: collect(t.stream(request(p.url))),
            lambda: t.cancel(agent_url=p.url, task_id=TASK)]
        for call in calls:
            with pytest.raises(A2AConnectionError, match="A2AClientTransport is closed"):
                await call()
        assert t._channel._client is None  # no new httpx client was opened (and leaked)
        await t.aclose()  # still idempotent


@pytest.mark.parametrize("body", [b"<html>oops</html>", b"[" * 200_000])
async def test_non_json_body_is_a_protocol_error(body: bytes) -> None:
    async def garbage(req: Req, writer: asyncio.StreamWriter) -> None:
        writer.write(http(body, ctype="text/html"))

    async with peer(garbage) as p, client() as t:
        with pytest.raises(A2AProtocolError, match=r"SendMessage.*not a JSON object"):
            await t.send(request(p.url))
        with pytest.raises(A2AProtocolError, match="SendStreamingMessage"):
            await collect(t.stream(request(p.url)))


async def test_bad_cards_are_clear_errors() -> None:
    async def unused(req: Req, writer: asyncio.StreamWriter) -> None:
        raise AssertionError("no RPC expected")

    async with peer(unused, card_for=lambda _u: "just a string") as p, client() as t:
        with pytest.raises(A2AProtocolError, match=r"agent-card\.json is not a JSON object"):
            await t.send(request(p.url))
    async with peer(unused, card_for=lambda _u: {"name": "x"}) as p, client() as t:
        with pytest.raises(A2AProtocolError, match="no JSON-RPC interface"):
            await t.send(request(p.url))


@pytest.mark.parametrize(("status_code", "error"), [(500, A2AConnectionError),
                                                    (404, A2AProtocolError)])
async def test_http_errors_with_non_json_bodies(status_code: int, error: type) -> None:
    async def broken(req: Req, writer: asyncio.StreamWriter) -> None:
        writer.write(http(b"Internal trouble", status=status_code, ctype="text/plain"))

    async with peer(broken) as p, client() as t:
        with pytest.raises(error, match=f"HTTP {status_code}"):
            await t.send(request(p.url))


@pytest.mark.parametrize(("code", "error"), [
    (-32001, TaskNotFoundError), (-32002, TaskNotCancelableError),
    (-32004, UnsupportedOperationError), (-32009, VersionNotSupportedError),
    (-32603, A2ARPCError), (-1, A2ARPCError)])
async def test_json_rpc_error_codes_map_to_subclasses(code: int,
                                                      error: type[A2ARPCError]) -> None:
    async def erring(req: Req, writer: asyncio.StreamWriter) -> None:
        writer.write(rpc_error(req, code, "nope"))

    async with peer(erring) as p, client() as t:
        with pytest.raises(error) as info:
            await t.send(request(p.url))
    assert type(info.value) is error
    assert info.value.code == code and "SendMessage" in str(info.value) and p.url in str(
        info.value)


async def test_oversized_bodies_and_events_are_refused() -> None:
    async def huge(req: Req, writer: asyncio.StreamWriter) -> None:
        if req.rpc == "SendMessage":
            writer.write(http(b'{"result": "' + b"x" * 100_000 + b'"}'))
            return
        writer.write(SSE_HEAD + b"data: ")
        for _ in range(160):  # 10 MiB if nobody stops reading; no blank line ever
            writer.write(b"y" * 65536)
            await writer.drain()

    async with peer(huge) as p, client(max_event_bytes=4096, max_body_bytes=4096) as t:
        with pytest.raises(A2AProtocolError, match="over 4096 bytes"):
            await t.send(request(p.url))
        with pytest.raises(A2AProtocolError, match="exceeds 4096 bytes"):
            await collect(t.stream(request(p.url)))


# -- streams ---------------------------------------------------------------------------------
async def test_sse_with_crlf_pings_mixed_line_ends_and_an_error_frame() -> None:
    async def stream(req: Req, writer: asyncio.StreamWriter) -> None:
        writer.write(SSE_HEAD + b": ping - 2026-11-24\r\n\r\n")
        writer.write(frame(wrap({"task": task("TASK_STATE_WORKING")})))
        data = frame(chunk("a", append=False), crlf=False)
        writer.write(data[:7])  # split mid-line, across two writes
        await writer.drain()
        writer.write(data[7:] + b":ping\n\n")
        writer.write(frame({"error": {"code": -32603, "message": "kaboom"}, "id": "x",
                            "jsonrpc": "2.0"}, event="error"))

    async with peer(stream) as p, client() as t:
        seen: list[RemoteStreamEvent] = []
        with pytest.raises(A2ARPCError, match="kaboom") as info:
            async with asyncio.timeout(WAIT):
                async for event in t.stream(request(p.url)):
                    seen.append(event)
    assert info.value.code == -32603
    assert [e.text for e in seen] == [None, "a"]
    assert seen[1].meta == {"artifact_id": "a", "append": False, "last_chunk": False,
                            "task_state": "working", "a2a_method": "SendStreamingMessage"}


async def test_an_upfront_json_error_to_a_stream_request() -> None:
    async def upfront(req: Req, writer: asyncio.StreamWriter) -> None:
        writer.write(rpc_error(req, -32004, "Task is in terminal state"))

    async with peer(upfront) as p, client() as t:
        with pytest.raises(UnsupportedOperationError, match="terminal state"):
            await collect(t.stream(request(p.url)))


async def test_nothing_is_delivered_after_the_final_state() -> None:
    async def chatty(req: Req, writer: asyncio.StreamWriter) -> None:
        writer.write(SSE_HEAD + frame(wrap({"task": task("TASK_STATE_WORKING")})))
        writer.write(frame(chunk("a", append=False)))
        writer.write(frame(wrap({"statusUpdate": {"taskId": TASK, "contextId": CTX,
                                                  "status": status("TASK_STATE_COMPLETED")}})))
        writer.write(frame(chunk("late", append=True)))
        await asyncio.Event().wait()  # and never close: the client must not wait

    async with peer(chatty) as p, client() as t:
        events = await collect(t.stream(request(p.url)))
    assert [e.text for e in events] == [None, "a", ""]
    assert events[-1].done and events[-1].result == "a"


async def test_resubscribe_reconciles_from_the_snapshot() -> None:
    async def dropping(req: Req, writer: asyncio.StreamWriter) -> None:
        if req.rpc == "SendStreamingMessage":
            writer.write(SSE_HEAD + frame(wrap({"task": task("TASK_STATE_WORKING")})))
            writer.write(frame(chunk("a", append=False)) + frame(chunk("b", append=True)))
            writer.write(b"data: {\"result\": {\"artifactUp")  # cut mid-event
            writer.close()
            return
        assert req.rpc == "SubscribeToTask" and req.body["params"]["id"] == TASK
        writer.write(SSE_HEAD + frame(wrap({"task": task("TASK_STATE_WORKING",
                                                         ["a", "b", "c"])})))
        writer.write(frame(chunk("d", append=True)))
        writer.write(frame(wrap({"statusUpdate": {"taskId": TASK, "contextId": CTX,
                                                  "status": status("TASK_STATE_COMPLETED")}})))
        writer.close()

    async with peer(dropping) as p, client() as t:
        events = await collect(t.stream(request(p.url)))
    assert [e.text for e in events if e.text] == ["a", "b", "c", "d"]
    assert events[-1].done and events[-1].result == "abcd"
    assert p.rpcs() == ["SendStreamingMessage", "SubscribeToTask"]


async def test_resubscribe_to_an_ended_task_falls_back_to_get_task() -> None:
    async def ended(req: Req, writer: asyncio.StreamWriter) -> None:
        if req.rpc == "SendStreamingMessage":
            writer.write(SSE_HEAD + frame(wrap({"task": task("TASK_STATE_WORKING")})))
            writer.write(frame(chunk("a", append=False)))
            writer.close()
        elif req.rpc == "SubscribeToTask":
            writer.write(rpc_error(req, -32004, "Task task-1 is in terminal state"))
        else:
            assert req.rpc == "GetTask"
            writer.write(rpc_result(req, task("TASK_STATE_COMPLETED", ["a", "b"])))

    async with peer(ended) as p, client() as t:
        events = await collect(t.stream(request(p.url)))
    assert [e.text for e in events if e.text] == ["a", "b"]
    assert events[-1].result == "ab"
    assert p.rpcs() == ["SendStreamingMessage", "SubscribeToTask", "GetTask"]


async def test_a_peer_that_keeps_dropping_gives_up_after_bounded_attempts() -> None:
    async def flaky(req: Req, writer: asyncio.StreamWriter) -> None:
        if req.rpc == "SendStreamingMessage":
            writer.write(SSE_HEAD + frame(wrap({"task": task("TASK_STATE_WORKING")})))
        writer.close()  # resubscribes: closed without a word

    async with peer(flaky) as p, client(resubscribe_attempts=3) as t:
        with pytest.raises(A2AConnectionError,
                           match=f"{p.url}.*{TASK}.*3 consecutive resubscribe"):
            await collect(t.stream(request(p.url)))
    assert p.rpcs() == ["SendStreamingMessage"] + ["SubscribeToTask"] * 3


async def test_resumes_that_bring_events_earn_back_the_resubscribe_budget() -> None:
    # A proxy that cuts the connection after every event: each resume works (it brings
    # the next chunk), so the stream is followed to its end however many cuts it
    # takes; the budget counts consecutive failures, not resumes.
    cuts = 6

    async def cutting(req: Req, writer: asyncio.StreamWriter) -> None:
        if req.rpc == "SendStreamingMessage":
            writer.write(SSE_HEAD + frame(wrap({"task": task("TASK_STATE_WORKING")})))
            writer.write(frame(chunk("c0", append=False)))
        else:
            n = sum(r.rpc == "SubscribeToTask" for r in p.requests)
            done = [f"c{i}" for i in range(n)]
            writer.write(SSE_HEAD + frame(wrap({"task": task("TASK_STATE_WORKING", done)})))
            writer.write(frame(chunk(f"c{n}", append=True)))
            if n == cuts:
                writer.write(frame(wrap({"statusUpdate": {
                    "taskId": TASK, "contextId": CTX,
                    "status": status("TASK_STATE_COMPLETED")}})))
        writer.close()

    async with peer(cutting) as p, client(resubscribe_attempts=2) as t:
        events = await collect(t.stream(request(p.url)))
    assert [e.text for e in events if e.text] == [f"c{i}" for i in range(cuts + 1)]
    assert events[-1].done and events[-1].result == "".join(f"c{i}" for i in range(cuts + 1))
    assert p.rpcs() == ["SendStreamingMessage"] + ["SubscribeToTask"] * cuts


async def test_a_resubscribe_that_cannot_connect_in_time_is_one_failed_attempt() -> None:
    # The agent's RPC address goes dark mid-stream: its port then belongs to a
    # listener whose accept queue is full, so a connect hangs until the transport's
    # connect timeout. Each resubscribe is a failed attempt within the budget (an
    # A2AConnectionError in the end), not an A2ATimeoutError at the first one.
    dark: list[socket.socket] = []
    rpc_port = 0

    async def first_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(SSE_HEAD + frame(wrap({"task": task("TASK_STATE_WORKING")})))
        await writer.drain()
        rpc_server.close()  # from now on nothing answers on this port...
        hole = socket.socket()
        hole.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        hole.bind(("127.0.0.1", rpc_port))
        hole.listen(0)
        dark.append(hole)
        for _ in range(4):  # ...and connects hang: the accept queue is full
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", rpc_port))
            dark.append(filler)
        writer.close()  # the stream drops

    rpc_server = await asyncio.start_server(first_stream, "127.0.0.1", 0)
    rpc_port = rpc_server.sockets[0].getsockname()[1]

    def card_elsewhere(_url: str) -> dict[str, Any]:
        return card(f"http://127.0.0.1:{rpc_port}")

    try:
        async with peer(lambda req, w: asyncio.sleep(0), card_for=card_elsewhere) as p, \
                client(timeout_s=0.3, resubscribe_attempts=2) as t:
            with pytest.raises(A2AConnectionError, match=r"2 consecutive resubscribe.*Timeout"):
                await collect(t.stream(request(p.url, timeout_s=WAIT)))
    finally:
        rpc_server.close()
        for sock in dark:
            sock.close()


async def test_a_stream_dropped_before_any_task_cannot_be_resumed() -> None:
    async def mute(req: Req, writer: asyncio.StreamWriter) -> None:
        writer.write(SSE_HEAD + b": ping\r\n\r\n")
        writer.close()

    async with peer(mute) as p, client() as t:
        with pytest.raises(A2AConnectionError, match="cannot be resumed"):
            await collect(t.stream(request(p.url)))


async def test_a_stream_gone_silent_is_resumed_then_given_up_without_a_timeout() -> None:
    # With no timeout_s (the default), a peer that stopped sending (no event, no
    # keep-alive) held the call for ever; it is now a lost stream after the idle bound.
    forever = asyncio.Event()

    async def hung(req: Req, writer: asyncio.StreamWriter) -> None:
        if req.rpc == "SendStreamingMessage":
            writer.write(SSE_HEAD + frame(wrap({"task": task("TASK_STATE_WORKING")})))
            writer.write(frame(chunk("a", append=False)))
        else:  # the resubscribe: the snapshot, then silence again
            writer.write(SSE_HEAD + frame(wrap({"task": task("TASK_STATE_WORKING", ["a"])})))
        await writer.drain()
        await forever.wait()

    async with peer(hung) as p, client(timeout_s=None, stream_idle_timeout_s=0.3,
                                       resubscribe_attempts=1) as t:
        seen: list[RemoteStreamEvent] = []
        with pytest.raises(A2AConnectionError, match=r"sent nothing .* for 0\.3 s"):
            async with asyncio.timeout(WAIT):
                async for event in t.stream(request(p.url)):
                    seen.append(event)
    assert [e.text for e in seen if e.text] == ["a"]
    assert p.rpcs() == ["SendStreamingMessage", "SubscribeToTask"]


async def test_keep_alive_comments_hold_a_quiet_stream_open() -> None:
    # The idle bound counts bytes, not events: a slow task whose server pings lives on.
    async def slow(req: Req, writer: asyncio.StreamWriter) -> None:
        writer.write(SSE_HEAD + frame(wrap({"task": task("TASK_STATE_WORKING")})))
        for _ in range(6):  # 6 x 0.1 s of pings: twice the 0.3 s idle bound
            await writer.drain()
            await asyncio.sleep(0.1)
            writer.write(b": ping\r\n\r\n")
        writer.write(frame(wrap({"statusUpdate": {"taskId": TASK, "contextId": CTX,
                                                  "status": status("TASK_STATE_COMPLETED")}})))
        writer.close()

    async with peer(slow) as p, client(timeout_s=None, stream_idle_timeout_s=0.3) as t:
        events = await collect(t.stream(request(p.url)))
    assert events[-1].done and p.rpcs() == ["SendStreamingMessage"]


@pytest.mark.parametrize("call", ["send", "stream"])
async def test_without_timeout_s_a_card_that_never_comes_times_out(call: str) -> None:
    # The docs promise a stream is never waited on for ever; a peer that accepted
    # the card request and never answered held the call for ever (no timeout_s).
    forever = asyncio.Event()

    async def silent(req: Req, writer: asyncio.StreamWriter) -> None:
        await forever.wait()

    async with peer(silent, card_for=None) as p, client(timeout_s=None,
                                                          stream_idle_timeout_s=0.3) as t:
        started = time.monotonic()
        with pytest.raises(A2ATimeoutError, match=r"reading the agent card took more than "
                                                  r"0\.3 s.*stream_idle_timeout_s") as info:
            async with asyncio.timeout(WAIT):
                if call == "send":
                    await t.send(request(p.url))
                else:
                    await collect(t.stream(request(p.url)))
        assert info.value.agent_url == p.url and time.monotonic() - started < 3.0
        assert [r.path for r in p.requests] == ["/.well-known/agent-card.json"]


@pytest.mark.parametrize("call", ["send", "stream"])
async def test_without_timeout_s_a_get_task_that_never_answers_times_out(call: str) -> None:
    # GetTask: polled by send after an early answer, and read by a stream whose task
    # ended while it was away (SubscribeToTask -> TaskNotFound). Each was unbounded.
    forever = asyncio.Event()

    async def early_then_silent(req: Req, writer: asyncio.StreamWriter) -> None:
        if req.rpc == "SendMessage":
            writer.write(rpc_result(req, {"task": task("TASK_STATE_SUBMITTED")}))
        elif req.rpc == "SendStreamingMessage":  # the task, then the stream drops
            writer.write(SSE_HEAD + frame(wrap({"task": task("TASK_STATE_WORKING")})))
            await writer.drain()
            writer.close()
        elif req.rpc == "SubscribeToTask":
            writer.write(rpc_error(req, -32001, "Task not found"))
        else:  # GetTask
            await forever.wait()

    async with peer(early_then_silent) as p, client(timeout_s=None,
                                                     stream_idle_timeout_s=0.3) as t:
        with pytest.raises(A2ATimeoutError, match=rf"GetTask of task {TASK} took more than "
                                                  r"0\.3 s") as info:
            async with asyncio.timeout(WAIT):
                if call == "send":
                    await t.send(request(p.url))
                else:
                    await collect(t.stream(request(p.url)))
        assert info.value.method == "GetTask"
        assert p.rpcs()[-1] == "GetTask"


@pytest.mark.parametrize("call", ["send", "stream"])
async def test_a_call_past_its_timeout_cancels_the_task_it_gave_up_on(call: str) -> None:
    # timeout_s gave up on a task whose id it knew, but sent no CancelTask: the
    # agent's task kept running (each retry started another) with nobody waiting.
    forever = asyncio.Event()
    cancels: list[Any] = []

    async def never_ends(req: Req, writer: asyncio.StreamWriter) -> None:
        if req.rpc == "SendMessage":
            writer.write(rpc_result(req, {"task": task("TASK_STATE_SUBMITTED")}))
        elif req.rpc == "SendStreamingMessage":
            writer.write(SSE_HEAD + frame(wrap({"task": task("TASK_STATE_WORKING")})))
            await writer.drain()
            await forever.wait()
        elif req.rpc == "CancelTask":
            cancels.append(req.body["params"])
            writer.write(rpc_result(req, task("TASK_STATE_CANCELED")))
        else:  # GetTask
            writer.write(rpc_result(req, task("TASK_STATE_WORKING")))

    async with peer(never_ends) as p, client(timeout_s=0.5, poll_interval_s=0.01) as t:
        with pytest.raises(A2ATimeoutError, match=r"within 0\.5 s|more than 0\.5 s") as info:
            async with asyncio.timeout(WAIT):
                if call == "send":
                    await t.send(request(p.url))
                else:
                    await collect(t.stream(request(p.url)))
    assert cancels == [{"id": TASK}]
    assert TASK in str(info.value) and "the task was cancelled (CancelTask)" in str(info.value)
    assert info.value.agent_url == p.url


async def test_a_cancel_after_a_timeout_that_fails_is_said_not_raised() -> None:
    forever = asyncio.Event()

    async def uncancellable(req: Req, writer: asyncio.StreamWriter) -> None:
        if req.rpc == "SendStreamingMessage":
            writer.write(SSE_HEAD + frame(wrap({"task": task("TASK_STATE_WORKING")})))
            await writer.drain()
            await forever.wait()
        else:  # CancelTask
            writer.write(rpc_error(req, -32603, "Internal error"))

    async with peer(uncancellable) as p, client(timeout_s=0.5) as t:
        with pytest.raises(A2ATimeoutError, match=r"within 0\.5 s; cancelling it failed: .*"
                                                  r"Internal error"):
            await collect(t.stream(request(p.url)))
    assert p.rpcs() == ["SendStreamingMessage", "CancelTask"]


@pytest.mark.parametrize("call", ["send", "stream"])
@pytest.mark.parametrize("agent", ["slow_to_cancel", "silent_on_cancel"])
async def test_a_call_past_its_timeout_raises_promptly_whatever_the_cancel_does(
        call: str, agent: str) -> None:
    # Before: the CancelTask sent on giving up then polled for CANCELED, bounded by
    # cancel_timeout_s (10 s): timeout_s=0.5 raised after ~10.5 s.
    forever = asyncio.Event()

    async def respond(req: Req, writer: asyncio.StreamWriter) -> None:
        if req.rpc == "SendMessage":
            writer.write(rpc_result(req, {"task": task("TASK_STATE_SUBMITTED")}))
        elif req.rpc == "SendStreamingMessage":
            writer.write(SSE_HEAD + frame(wrap({"task": task("TASK_STATE_WORKING")})))
            await writer.drain()
            await forever.wait()
        elif req.rpc == "CancelTask" and agent == "silent_on_cancel":
            await forever.wait()
        else:  # GetTask, or a CancelTask accepted: the task is still winding down
            writer.write(rpc_result(req, task("TASK_STATE_WORKING")))

    async with peer(respond) as p, client(timeout_s=None, poll_interval_s=0.01) as t:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(A2ATimeoutError) as info:
            async with asyncio.timeout(WAIT):
                if call == "send":
                    await t.send(request(p.url, timeout_s=0.5))
                else:
                    await collect(t.stream(request(p.url, timeout_s=0.5)))
        took = loop.time() - started
        rpcs = p.rpcs()
    # timeout_s, plus at most GIVE_UP_CANCEL_S (1 s) for the CancelTask (slack for load).
    assert took < 0.5 + GIVE_UP_CANCEL_S + 1.0, took
    assert rpcs.count("CancelTask") == 1
    assert rpcs[rpcs.index("CancelTask"):] == ["CancelTask"]  # sent once, CANCELED not polled
    if agent == "slow_to_cancel":
        assert "CancelTask was accepted (the task was still working" in str(info.value)
        assert t.already_cancelled(agent_url=p.url, task_id=TASK)
    else:
        assert "cancelling it failed" in str(info.value)
        # Not cancelled: a caller (RemoteNode) may still cancel it itself.
        assert not t.already_cancelled(agent_url=p.url, task_id=TASK)


async def test_a_flow_stop_while_the_transport_cancels_a_given_up_task_cancels_it_once(
        ) -> None:
    # Before: the transport gave up on the stream and sent CancelTask; flow.stop() in
    # that window cut the node, whose own local_cancel sent a second CancelTask for
    # the same task (and recorded a remote_cancel_error when it failed).
    forever, got_cancel, release = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def respond(req: Req, writer: asyncio.StreamWriter) -> None:
        if req.rpc == "SendStreamingMessage":
            writer.write(SSE_HEAD + frame(wrap({"task": task("TASK_STATE_WORKING")}))
                         + frame(wrap(chunk("part", append=False)["result"])))
            await writer.drain()
            await forever.wait()
        elif req.rpc == "CancelTask":
            got_cancel.set()
            await release.wait()  # the give-up cancel is on its way when stop() comes
            writer.write(rpc_result(req, task("TASK_STATE_CANCELED")))
        else:
            writer.write(rpc_result(req, task("TASK_STATE_WORKING")))

    kept = _Kept()

    async with peer(respond) as p, client(timeout_s=0.5, poll_interval_s=0.01) as t:
        asked = _spy_wait_cancelled(t)
        flow = create(_streaming_node(t, p.url).to(), middlewares=[kept],
                      emit_errors_to_rookery=True)
        flow.run()
        try:
            await flow.emit(Message(payload="hi", headers=Headers(tenant="t")))
            async with asyncio.timeout(WAIT):
                await got_cancel.wait()
            stopping = asyncio.ensure_future(flow.stop())
            async with asyncio.timeout(WAIT):
                await asked.wait()  # the node's cancel found the transport's on its way
            release.set()
            async with asyncio.timeout(WAIT):
                await stopping
        finally:
            release.set()
            async with asyncio.timeout(WAIT):
                await flow.stop()
        rpcs = p.rpcs()
    assert rpcs.count("CancelTask") == 1, rpcs
    assert kept.of("remote_cancel_error") == []
    # The call's end is recorded, as the transport's cancel.
    (cancelled,) = kept.of("remote_call_cancelled")
    assert cancelled.extra["remote_cancel_reason"] == "local_cancel"
    assert cancelled.extra["remote_cancel_by_transport"] is True


class _Kept:
    """A middleware keeping every event; ``cancelled`` is set at the call's
    ``remote_call_cancelled``."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self.cancelled = asyncio.Event()

    async def __call__(self, event: Any) -> None:
        self.events.append(event)
        if event.event_type == "remote_call_cancelled":
            self.cancelled.set()

    def of(self, kind: str) -> list[Any]:
        return [e for e in self.events if e.event_type == kind]


def _streaming_node(t: A2AClientTransport, url: str) -> Any:
    return RemoteNode(transport=t, skill="s", agent_url=url, name="remote", streaming=True,
                      policy=NodePolicy(validate="none", max_retries=0))


async def _trace_cancel_in_give_up_window(flow: Any, got_cancel: asyncio.Event,
                                          release: asyncio.Event, asked: asyncio.Event,
                                          kept: _Kept) -> None:
    """Run ``flow``; cancel its trace while the transport's give-up CancelTask is on
    its way (the agent holds it until ``release``); wait for the call's end."""
    flow.run()
    m = Message(payload="hi", headers=Headers(tenant="t"))
    try:
        await flow.emit(m)
        async with asyncio.timeout(WAIT):
            await got_cancel.wait()
        await flow.cancel(m.trace_id)  # while the give-up CancelTask is on its way
        async with asyncio.timeout(WAIT):
            await asked.wait()
        release.set()
        async with asyncio.timeout(WAIT):
            await kept.cancelled.wait()
    finally:
        release.set()
        async with asyncio.timeout(WAIT):
            await flow.stop()


def _spy_wait_cancelled(t: A2AClientTransport) -> asyncio.Event:
    """Set once RemoteNode asks ``t`` about its own cancel (``wait_cancelled``)."""
    asked = asyncio.Event()
    original = t.wait_cancelled

    async def spy(*, agent_url: str, task_id: str) -> bool:
        asked.set()
        return await original(agent_url=agent_url, task_id=task_id)

    t.wait_cancelled = spy  # type: ignore[method-assign]
    return asked


def _agent_cancelling_on_release(forever: asyncio.Event, got_cancel: asyncio.Event,
                                 release: asyncio.Event, *, fail: bool = False,
                                 ) -> Callable[[Req, asyncio.StreamWriter], Awaitable[None]]:
    """A streaming agent that never ends; its first CancelTask waits for ``release``
    (then fails when ``fail``), any later one is accepted at once."""
    answered: list[str] = []

    async def respond(req: Req, writer: asyncio.StreamWriter) -> None:
        if req.rpc == "SendStreamingMessage":
            writer.write(SSE_HEAD + frame(wrap({"task": task("TASK_STATE_WORKING")}))
                         + frame(wrap(chunk("part", append=False)["result"])))
            await writer.drain()
            await forever.wait()
        elif req.rpc == "CancelTask" and not answered:
            answered.append(req.rpc)
            got_cancel.set()
            await release.wait()
            writer.write(rpc_error(req, -32603, "Internal error") if fail
                         else rpc_result(req, task("TASK_STATE_CANCELED")))
        else:
            writer.write(rpc_result(req, task("TASK_STATE_CANCELED")))
    return respond


async def test_a_trace_cancel_while_the_transport_cancels_a_given_up_task_records_its_end(
        ) -> None:
    # Before: the transport gave up on the stream and sent CancelTask; a trace cancel
    # in that window saw already_cancelled and recorded nothing: no
    # remote_call_cancelled, and the CLIENT span ended error.type=unfinished.
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
        InMemorySpanExporter,
    )

    from penguiflow_exporters.otel import PenguiFlowIdGenerator

    forever, got_cancel, release = asyncio.Event(), asyncio.Event(), asyncio.Event()
    kept = _Kept()
    exporter = InMemorySpanExporter()
    provider = TracerProvider(id_generator=PenguiFlowIdGenerator())
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    async with (peer(_agent_cancelling_on_release(forever, got_cancel, release)) as p,
                client(timeout_s=0.5, poll_interval_s=0.01) as t):
        asked = _spy_wait_cancelled(t)
        flow = create(_streaming_node(t, p.url).to(), middlewares=[kept],
                      tracer_provider=provider)
        await _trace_cancel_in_give_up_window(flow, got_cancel, release, asked, kept)
        rpcs = p.rpcs()
    provider.shutdown()
    assert rpcs.count("CancelTask") == 1, rpcs
    (cancelled,) = kept.of("remote_call_cancelled")
    assert cancelled.extra["remote_cancel_reason"] == "trace_cancel"
    assert cancelled.extra["remote_cancel_by_transport"] is True
    assert kept.of("remote_cancel_error") == []
    (span,) = [s for s in exporter.get_finished_spans() if s.kind.name == "CLIENT"]
    assert span.attributes is not None
    assert span.attributes.get("error.type") != "unfinished"
    assert "trace_cancel" in (span.status.description or "")
    # The trace's root says the cancel reached the agent.
    assert any(e.name == "pf.cancel.propagated" for s in exporter.get_finished_spans()
               for e in s.events), [(s.name, [e.name for e in s.events])
                                    for s in exporter.get_finished_spans()]


async def test_a_given_up_task_whose_cancel_failed_is_cancelled_by_the_node() -> None:
    # Before: already_cancelled said True from the moment the call gave up, so a
    # failed give-up CancelTask left the remote task running (the node sent none).
    forever, got_cancel, release = asyncio.Event(), asyncio.Event(), asyncio.Event()
    kept = _Kept()
    async with (peer(_agent_cancelling_on_release(forever, got_cancel, release,
                                                  fail=True)) as p,
                client(timeout_s=0.5, poll_interval_s=0.01) as t):
        asked = _spy_wait_cancelled(t)
        flow = create(_streaming_node(t, p.url).to(), middlewares=[kept])
        # Once released, the agent fails the transport's CancelTask.
        await _trace_cancel_in_give_up_window(flow, got_cancel, release, asked, kept)
        rpcs = p.rpcs()
    assert rpcs.count("CancelTask") == 2, rpcs  # the transport's, failed; the node's
    (cancelled,) = kept.of("remote_call_cancelled")
    assert "remote_cancel_by_transport" not in cancelled.extra


def test_a_stream_idle_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="stream_idle_timeout_s must be > 0"):
        A2AClientTransport(stream_idle_timeout_s=0)


# -- polling ------------------------------------------------------------------------------------
async def test_send_polls_get_task_when_the_agent_answers_early() -> None:
    answers = iter([task("TASK_STATE_WORKING"), task("TASK_STATE_COMPLETED", ["x", "y"])])

    async def early(req: Req, writer: asyncio.StreamWriter) -> None:
        if req.rpc == "SendMessage":
            writer.write(rpc_result(req, {"task": task("TASK_STATE_SUBMITTED")}))
        else:
            writer.write(rpc_result(req, next(answers)))

    async with peer(early) as p, client(poll_interval_s=0.001) as t:
        result = await t.send(request(p.url))
    assert result.result == "xy" and result.task_id == TASK
    assert p.rpcs() == ["SendMessage", "GetTask", "GetTask"]


async def test_cancel_polls_until_canceled_and_reports_other_ends() -> None:
    ends = {"good": iter([task("TASK_STATE_WORKING"), task("TASK_STATE_CANCELED")]),
            "bad": iter([task("TASK_STATE_COMPLETED")])}
    which = {"now": "good"}

    async def slow_cancel(req: Req, writer: asyncio.StreamWriter) -> None:
        if req.rpc == "CancelTask":
            writer.write(rpc_result(req, task("TASK_STATE_WORKING")))
        else:
            writer.write(rpc_result(req, next(ends[which["now"]])))

    async with peer(slow_cancel) as p, client(poll_interval_s=0.001) as t:
        await t.cancel(agent_url=p.url, task_id=TASK)
        assert p.rpcs() == ["CancelTask", "GetTask", "GetTask"]
        which["now"] = "bad"
        with pytest.raises(TaskNotCancelableError, match="ended completed"):
            await t.cancel(agent_url=p.url, task_id=TASK)


# -- the SSE decoder ---------------------------------------------------------------------------
_text = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\r\n"),
                max_size=30)
_event = st.tuples(st.sampled_from([None, "error", "message"]),
                   st.lists(_text, min_size=1, max_size=3))


def _encode(events: list[tuple[str | None, list[str]]], newline: str) -> bytes:
    out = [": ping" + newline]
    for name, lines in events:
        if name:
            out.append(f"event: {name}{newline}")
        out.extend(f"data: {line}{newline}" for line in lines)
        out.append(newline)
    return "".join(out).encode()


def _decode(chunks: list[bytes]) -> list[SSEEvent]:
    decoder = SSEDecoder()
    events = [e for c in chunks for e in decoder.feed(c)]
    return events + decoder.close()


@settings(max_examples=150, deadline=None)
@given(events=st.lists(_event, max_size=5), newline=st.sampled_from(["\r\n", "\n", "\r"]),
       cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12))
def test_sse_decoding_does_not_depend_on_chunking(events: list[tuple[str | None, list[str]]],
                                                  newline: str, cuts: list[int]) -> None:
    data = _encode(events, newline)
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    whole = _decode([data])
    assert _decode(chunks) == whole
    assert [(e.event, e.data) for e in whole] == [
        (name or "message", "\n".join(lines)) for name, lines in events]


@settings(max_examples=200, deadline=None)
@given(blobs=st.lists(st.binary(max_size=300), max_size=8))
def test_sse_decoder_never_raises_anything_but_sse_error(blobs: list[bytes]) -> None:
    decoder = SSEDecoder(max_event_bytes=256)
    try:
        for blob in blobs:
            decoder.feed(blob)
        decoder.close()
    except SSEError:
        pass


def test_a_leading_byte_order_mark_is_dropped_not_the_first_event() -> None:
    # WHATWG: one leading U+FEFF is skipped; the first event (a stream's Task
    # snapshot) used to be read as a field named "\ufeffdata" and ignored.
    stream = "\ufeffdata: first\n\ndata: \ufeffsecond\n\n".encode()
    for size in (1, 2, len(stream)):  # the BOM's 3 bytes split across chunks too
        decoder = SSEDecoder()
        events = [e for i in range(0, len(stream), size) for e in decoder.feed(stream[i:i + size])]
        assert [e.data for e in events] == ["first", "\ufeffsecond"]
    decoder = SSEDecoder()  # a stream of one unterminated line, BOM included
    assert decoder.feed("\ufeffdata: only".encode()) == []
    assert decoder.close() == []  # undispatched: discarded, as without the BOM


def test_an_sse_line_that_never_ends_is_refused_at_the_cap_in_linear_time() -> None:
    # A hostile peer: "data: xxx..." with no line break, in 4 KB chunks. Before, each
    # chunk re-joined and re-scanned the whole pending line: 18.6 s of CPU (with the
    # event loop blocked) to reach the 16 MB cap; now each chunk costs its own size.
    decoder = SSEDecoder()
    chunk = b"x" * 4096
    started = time.process_time()
    with pytest.raises(SSEError, match="exceeds 16777216 bytes"):
        decoder.feed(b"data: ")
        for _ in range(5000):
            decoder.feed(chunk)
    assert time.process_time() - started < 2.0
