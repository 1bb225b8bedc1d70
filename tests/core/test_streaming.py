"""Streaming helpers (spec §14): SSE / WebSocket rendering, stream_flow, emit_stream_events."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pfcore_support import Recorder

from penguiflow.core import Context, PenguiFlow, create
from penguiflow.errors import FlowError
from penguiflow.node import Node, NodePolicy
from penguiflow.streaming import (
    chunk_to_ws_json,
    emit_stream_events,
    format_sse_event,
    stream_flow,
)
from penguiflow.types import Headers, Message, StreamChunk

TIMEOUT = 5.0


def _msg(payload: Any = None) -> Message:
    return Message(payload=payload, headers=Headers(tenant="acme"))


@asynccontextmanager
async def running(flow: PenguiFlow) -> AsyncIterator[PenguiFlow]:
    flow.run()
    try:
        yield flow
    finally:
        await flow.stop()


async def collect(stream: AsyncIterator[Any]) -> list[Any]:
    async def drain() -> list[Any]:
        return [item async for item in stream]

    return await asyncio.wait_for(drain(), TIMEOUT)


# --- format_sse_event -------------------------------------------------------------------


def test_sse_chunk_frame() -> None:
    chunk = StreamChunk(stream_id="s", seq=3, text="hello")
    assert format_sse_event(chunk) == "event: chunk\nid: 3\ndata: hello\n\n"


def test_sse_done_frame_with_meta_and_retry() -> None:
    chunk = StreamChunk(stream_id="s", seq=7, text="bye", done=True, meta={"lang": "français"})
    frame = format_sse_event(chunk, retry_ms=1500)
    assert frame == 'event: done\nid: 7\ndata: bye\ndata: {"lang": "français"}\nretry: 1500\n\n'


def test_sse_event_name_override_and_zero_retry() -> None:
    chunk = StreamChunk(stream_id="s", seq=0, text="", done=True)
    assert format_sse_event(chunk, event_name="token", retry_ms=0) == (
        "event: token\nid: 0\ndata: \nretry: 0\n\n"
    )


@settings(max_examples=300, deadline=None)
@given(text=st.lists(st.sampled_from(
    ["a", " ", ":", "\r", "\n", "\r\n", "data: x", "event: evil", "id: 9", "retry: 1",
     "\x00", "\u2028", "é"])).map("".join))
def test_no_chunk_text_adds_a_field_or_an_event(text: str) -> None:
    # A lone CR was left inside a data line; SSE readers end a line there, so the
    # text after it could set the event name or id, or start an event of its own.
    from penguiflow_a2a.sse import SSEDecoder

    decoder = SSEDecoder()
    frame = format_sse_event(StreamChunk(stream_id="s", seq=4, text=text))
    events = decoder.feed(frame.encode("utf-8", "surrogatepass"))
    assert len(events) == 1, (text, frame)
    (event,) = events
    assert (event.event, event.id) == ("chunk", "4")
    assert event.data == text.replace("\r\n", "\n").replace("\r", "\n")


def test_an_event_name_with_a_line_break_is_refused() -> None:
    chunk = StreamChunk(stream_id="s", seq=0, text="t")
    for name in ("chunk\ndata: injected", "a\rb", "a\r\nb"):
        with pytest.raises(ValueError, match="event_name must be one line"):
            format_sse_event(chunk, event_name=name)


def test_sse_multiline_text_stays_in_one_frame() -> None:
    chunk = StreamChunk(stream_id="s", seq=1, text="a\nb\r\nc")
    frame = format_sse_event(chunk)
    assert frame == "event: chunk\nid: 1\ndata: a\ndata: b\ndata: c\n\n"
    assert frame.count("\n\n") == 1


# --- chunk_to_ws_json -------------------------------------------------------------------


def test_ws_json_fields() -> None:
    chunk = StreamChunk(stream_id="s", seq=2, text="héllo", meta={"k": 1})
    text = chunk_to_ws_json(chunk)
    assert "héllo" in text, "ensure_ascii must be off"
    assert json.loads(text) == {
        "stream_id": "s",
        "seq": 2,
        "text": "héllo",
        "done": False,
        "meta": {"k": 1},
    }


def test_ws_json_extra_wins() -> None:
    chunk = StreamChunk(stream_id="s", seq=0, text="t", done=True)
    decoded = json.loads(chunk_to_ws_json(chunk, extra={"seq": 99, "channel": "c"}))
    assert decoded == {
        "stream_id": "s",
        "seq": 99,
        "text": "t",
        "done": True,
        "meta": {},
        "channel": "c",
    }


def test_ws_json_unserialisable_meta() -> None:
    chunk = StreamChunk(stream_id="s", seq=0, text="t", meta={"obj": object()})
    with pytest.raises(TypeError):
        chunk_to_ws_json(chunk)


# --- stream_flow ------------------------------------------------------------------------


def _chunking_flow(words: list[str], *, final: bool = True, **kwargs: Any) -> PenguiFlow:
    async def talker(message: Message, ctx: Context) -> Any:
        for index, word in enumerate(words):
            await ctx.emit_chunk(parent=message, text=word, done=index == len(words) - 1)
        if final:
            return message.model_copy(update={"payload": "final"})
        return None

    node = Node(talker, name="talker", policy=NodePolicy(validate="none"))
    return create(node.to(), **kwargs)


async def test_stream_flow_stops_after_done_chunk() -> None:
    flow = _chunking_flow(["a", "b", "c"])
    parent = _msg("q")
    async with running(flow):
        items = await collect(stream_flow(flow, parent))
    assert [type(item) for item in items] == [StreamChunk] * 3
    assert [(c.text, c.seq, c.done) for c in items] == [
        ("a", 0, False),
        ("b", 1, False),
        ("c", 2, True),
    ]
    assert {c.stream_id for c in items} == {parent.trace_id}


async def test_stream_flow_include_final_yields_final_payload() -> None:
    flow = _chunking_flow(["a", "b"])
    async with running(flow):
        items = await collect(stream_flow(flow, _msg("q"), include_final=True, timeout=TIMEOUT))
        # The flow is still running and usable afterwards: stream_flow never stops it.
        again = await collect(stream_flow(flow, _msg("q2"), include_final=True))
    assert [getattr(item, "text", item) for item in items] == ["a", "b", "final"]
    assert again[-1] == "final"


async def test_stream_flow_non_chunk_payload_ends_stream() -> None:
    async def echo(message: Message, ctx: Context) -> Message:
        return message.model_copy(update={"payload": {"answer": 42}})

    node = Node(echo, name="echo", policy=NodePolicy(validate="none"))
    flow = create(node.to())
    async with running(flow):
        assert await collect(stream_flow(flow, _msg("q"), to=node)) == [{"answer": 42}]


async def test_stream_flow_yields_raw_items_without_payload() -> None:
    async def fail(message: Message, ctx: Context) -> None:
        raise RuntimeError("nope")

    node = Node(fail, name="fail", policy=NodePolicy(validate="none"))
    flow = create(node.to(), emit_errors_to_rookery=True)
    async with running(flow):
        (item,) = await collect(stream_flow(flow, _msg("q")))
    assert isinstance(item, FlowError)
    assert item.node_name == "fail"


async def test_stream_flow_fetch_timeout() -> None:
    async def silent(message: Message, ctx: Context) -> None:
        return None

    node = Node(silent, name="silent", policy=NodePolicy(validate="none"))
    flow = create(node.to())
    async with running(flow):
        with pytest.raises(TimeoutError):
            await collect(stream_flow(flow, _msg("q"), timeout=0.05))


# --- emit_stream_events -----------------------------------------------------------------


class ChunkRecorder:
    """Stand-in for a Context that records ``emit_chunk`` calls."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    async def emit_chunk(self, **kwargs: Any) -> StreamChunk:
        self.calls.append(kwargs)
        return StreamChunk(stream_id="s", seq=len(self.calls) - 1, text=kwargs["text"])


async def _events(*items: Any) -> AsyncIterator[Any]:
    for item in items:
        yield item


async def test_emit_stream_events_default_adapter_adds_final_chunk() -> None:
    ctx, parent, target = ChunkRecorder(), _msg("p"), object()
    await emit_stream_events(_events(1, "two"), ctx, parent, to=target, final_meta={"end": 1})  # type: ignore[arg-type]
    assert ctx.calls == [
        {"parent": parent, "text": "1", "done": False, "meta": {}, "to": target},
        {"parent": parent, "text": "two", "done": False, "meta": {}, "to": target},
        {"parent": parent, "text": "", "done": True, "meta": {"end": 1}, "to": target},
    ]


async def test_emit_stream_events_adapter_done_suppresses_final_chunk() -> None:
    ctx, parent = ChunkRecorder(), _msg("p")

    def adapter(event: dict[str, Any]) -> tuple[str, bool, dict[str, Any]]:
        return event["t"], event.get("done", False), {"i": event["i"]}

    source = _events({"t": "a", "i": 0}, {"t": "b", "i": 1, "done": True})
    await emit_stream_events(source, ctx, parent, adapter=adapter, final_meta={"x": 1})  # type: ignore[arg-type]
    assert [(c["text"], c["done"], c["meta"]) for c in ctx.calls] == [
        ("a", False, {"i": 0}),
        ("b", True, {"i": 1}),
    ]
    assert all(call["to"] is None for call in ctx.calls)


async def test_emit_stream_events_empty_source() -> None:
    ctx = ChunkRecorder()
    await emit_stream_events(_events(), ctx, _msg("p"))  # type: ignore[arg-type]
    assert [(c["text"], c["done"], c["meta"]) for c in ctx.calls] == [("", True, {})]


async def test_emit_stream_events_source_error_propagates() -> None:
    async def broken() -> AsyncIterator[str]:
        yield "a"
        raise ValueError("source broke")

    ctx = ChunkRecorder()
    with pytest.raises(ValueError, match="source broke"):
        await emit_stream_events(broken(), ctx, _msg("p"))  # type: ignore[arg-type]
    assert [c["text"] for c in ctx.calls] == ["a"]


async def test_emit_stream_events_detached_context() -> None:
    ctx = Context(Node(_noop, name="n"))
    with pytest.raises(RuntimeError):
        await emit_stream_events(_events("a"), ctx, _msg("p"))


async def _noop(message: Any, ctx: Any) -> None:
    return None


async def test_emit_stream_events_in_a_flow() -> None:
    async def producer(message: Message, ctx: Context) -> Message:
        await emit_stream_events(_events("x", "y"), ctx, message, final_meta={"n": 2})
        return message.model_copy(update={"payload": "complete"})

    node = Node(producer, name="producer", policy=NodePolicy(validate="none"))
    flow = create(node.to())
    async with running(flow):
        items = await collect(stream_flow(flow, _msg("q"), include_final=True))
    chunks = items[:-1]
    assert [(c.text, c.seq, c.done, c.meta) for c in chunks] == [
        ("x", 0, False, {}),
        ("y", 1, False, {}),
        ("", 2, True, {"n": 2}),
    ]
    assert items[-1] == "complete"


async def test_a_stream_cut_short_numbers_the_next_run_of_its_trace_from_zero() -> None:
    # The seq of a stream that never sent done (its node failed) was kept for ever:
    # one entry per failed trace, and a retry of the same trace id numbered on (2, 3).
    attempts: list[int] = []

    async def talk(message: Message, ctx: Context) -> Message:
        attempts.append(1)
        await ctx.emit_chunk(parent=message, text="a")
        await ctx.emit_chunk(parent=message, text="b")
        if len(attempts) == 1:
            raise RuntimeError("model error after streaming")
        await ctx.emit_chunk(parent=message, text="", done=True)
        return message

    node = Node(talk, name="talk", policy=NodePolicy(validate="none"))
    flow = create(node.to(), emit_errors_to_rookery=True)
    flow.run()
    try:
        first = Message(payload="x", headers=Headers(tenant="t"), trace_id="same")
        await flow.emit(first)
        got = [await asyncio.wait_for(flow.fetch(), 5) for _ in range(3)]
        assert isinstance(got[-1], FlowError)
        assert flow.context(node)._stream_seq == {}
        await flow.emit(first)
        chunks = [await asyncio.wait_for(flow.fetch(), 5) for _ in range(3)]
        assert [c.payload.seq for c in chunks] == [0, 1, 2]
    finally:
        await flow.stop()


async def test_an_endpoint_stream_numbers_on_across_drains_and_a_named_stream_is_forgotten(
) -> None:
    # flow.emit_chunk from outside the flow runs no invocation: its trace drains at
    # each fetch, and its seq must go on (spec §9: previous + 1). A stream with its own
    # stream_id opened by an invocation that then failed goes with that invocation.
    async def passthrough(message: Message, ctx: Context) -> Message:
        return message

    async def named(message: Message, ctx: Context) -> Message:
        await ctx.emit_chunk(parent=message, text="x", stream_id=f"custom-{message.trace_id}")
        raise RuntimeError("fails mid-stream")

    flow = create(Node(passthrough, name="pass", policy=NodePolicy(validate="none")).to())
    flow.run()
    try:
        parent = Message(payload="q", headers=Headers(tenant="t"), trace_id="tr1")
        seqs = []
        for i in range(3):
            await flow.emit_chunk(parent=parent, text=f"part{i}")
            seqs.append((await asyncio.wait_for(flow.fetch(), 5)).payload.seq)
        assert seqs == [0, 1, 2]
    finally:
        await flow.stop()
    node = Node(named, name="named", policy=NodePolicy(validate="none"))
    flow = create(node.to(), emit_errors_to_rookery=True)
    flow.run()
    try:
        for i in range(3):
            await flow.emit(Message(payload="q", headers=Headers(tenant="t"), trace_id=f"t{i}"))
            assert isinstance((await asyncio.wait_for(flow.fetch(), 5)).payload, StreamChunk)
            assert isinstance(await asyncio.wait_for(flow.fetch(), 5), FlowError)
        assert flow.context(node)._stream_seq == {}
    finally:
        await flow.stop()


async def test_a_trace_stream_spanning_invocations_goes_when_one_of_them_fails() -> None:
    # The stream opened by the trace's first message went on in its second; that one
    # failed, and the stream (not opened by it) was kept: a rerun numbered on from 2.
    async def talk(message: Message, ctx: Context) -> None:
        await ctx.emit_chunk(parent=message, text=f"part-{message.payload}")
        if message.payload == "boom":
            raise RuntimeError("model error mid-stream")

    node = Node(talk, name="talk", policy=NodePolicy(validate="none"))
    flow = create(node.to(), emit_errors_to_rookery=True)
    flow.run()
    try:
        def part(payload: str) -> Message:
            return Message(payload=payload, headers=Headers(tenant="t"), trace_id="conv")

        await flow.emit(part("a"))
        assert (await asyncio.wait_for(flow.fetch(), 5)).payload.seq == 0
        await flow.emit(part("boom"))
        assert (await asyncio.wait_for(flow.fetch(), 5)).payload.seq == 1
        assert isinstance(await asyncio.wait_for(flow.fetch(), 5), FlowError)
        await flow.emit(part("a"))
        assert (await asyncio.wait_for(flow.fetch(), 5)).payload.seq == 0
    finally:
        await flow.stop()


async def test_streams_ended_with_done_are_not_kept() -> None:
    # A node streaming many answers (each ended with done) kept every stream id.
    flow = _chunking_flow(["a", "b"], final=False)
    async with running(flow):
        for _ in range(50):
            await flow.emit(_msg("q"))
            for _ in range(2):
                await asyncio.wait_for(flow.fetch(), 5)
        contexts = [c for c in flow._contexts.values() if c._is_node]
        assert [(c._open_streams, c._stream_seq) for c in contexts] == [({}, {})]


async def test_a_stream_goes_with_the_trace_that_used_it_last_and_with_a_cancel() -> None:
    # A stream id two traces share went when the trace that opened it failed, though
    # the other still used it (its next chunk restarted at 0); and a cancel left the
    # stream at a node the trace had moved on from (a rerun numbered on from it).
    gate = asyncio.Event()

    async def speak(message: Message, ctx: Context) -> Message:
        sid = message.meta.get("sid")
        await ctx.emit_chunk(parent=message, text="x", stream_id=sid)
        if message.payload == "fail":
            raise RuntimeError("fails for good")
        return message

    async def after(message: Message, ctx: Context) -> Message:
        if message.payload == "slow":
            await gate.wait()
        return message

    s = Node(speak, name="s", policy=NodePolicy(validate="none"))
    w = Node(after, name="w", policy=NodePolicy(validate="none"))
    recorder = Recorder()
    flow = create(s.to(w), w.to(), middlewares=[recorder])
    ctx = flow.context(s)

    def part(payload: str, trace: str, sid: str | None = None) -> Message:
        return Message(payload=payload, headers=Headers(tenant="t"), trace_id=trace,
                       meta={"sid": sid} if sid else {})

    async with running(flow):
        for payload, trace in [("ok", "A"), ("ok", "B"), ("fail", "A")]:
            await flow.emit(part(payload, trace, "answer"))
            await recorder.wait_for("node_success" if payload == "ok" else "node_failed",
                                    trace_id=trace, node="s")
        assert ctx._stream_seq == {"answer": 2}  # B used it last: it goes on
        await flow.emit(part("slow", "T"))
        await recorder.wait_for("node_start", trace_id="T", node="w")
        assert await flow.cancel("T") is True
        await recorder.wait_for("trace_cancel_finish", trace_id="T")
        assert "T" not in ctx._stream_seq


async def test_a_stream_id_every_trace_shares_keeps_a_bounded_record() -> None:
    # Each trace sending a chunk on a shared, never-ended stream id ("status") was
    # recorded for good: one entry per trace, for the life of the flow.
    async def status(message: Message, ctx: Context) -> None:
        await ctx.emit_chunk(parent=message, text="working", stream_id="status")

    node = Node(status, name="status", policy=NodePolicy(validate="none"))
    flow = create(node.to())
    async with running(flow):
        for _ in range(200):
            await flow.emit(_msg("q"))
            await asyncio.wait_for(flow.fetch(), 5)
        ctx = flow.context(node)
        assert ctx._stream_seq == {"status": 199}  # numbered on across traces
        # Every trace that used it drained: the stream is idle (its number kept
        # among the last IDLE_STREAMS_MAX), and no trace is recorded against it.
        assert "status" not in ctx._open_streams
        assert list(flow._rt.idle_streams) == [(ctx, "status")]
        assert flow._rt.trace_streams == {}
