"""A node's stream numbering: no gap after a failed chunk, nothing kept after its trace.

Each case once misbehaved: a chunk that failed to go out (an unknown target, a
cancel while it waited for room) still used up its number, so the consumer saw
a gap; and a trace whose node streamed without a ``done`` chunk left its stream's
number and bookkeeping in the node's context for ever (one entry per request).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pfcore_support import msg, within

from penguiflow import Message, Node, NodePolicy, StreamChunk, create
from penguiflow import _runtime as runtime_module

NONE = NodePolicy(validate="none")


async def _chunks(flow: Any, count: int) -> list[StreamChunk]:
    out = [await within(flow.fetch()) for _ in range(count)]
    return [m.payload for m in out]


async def test_a_chunk_that_failed_to_go_out_leaves_no_gap_in_the_numbers() -> None:
    async def streamer(m: Message, ctx: Any) -> None:
        await ctx.emit_chunk(parent=m, text="a")
        with pytest.raises(KeyError):
            await ctx.emit_chunk(parent=m, text="lost", to="nowhere")
        with pytest.raises(KeyError):  # a failed done: the stream stays open
            await ctx.emit_chunk(parent=m, text="", done=True, to="nowhere")
        await ctx.emit_chunk(parent=m, text="b")
        await ctx.emit_chunk(parent=m, text="", done=True)

    node = Node(streamer, name="streamer", policy=NONE)
    flow = create(node.to())
    flow.run()
    try:
        await flow.emit(msg("x"))
        chunks = await _chunks(flow, 3)
        assert [(c.seq, c.text, c.done) for c in chunks] == [
            (0, "a", False), (1, "b", False), (2, "", True)]
    finally:
        await within(flow.stop())


async def test_a_chunk_cancelled_while_waiting_for_room_gives_its_number_back() -> None:
    waiting = asyncio.Event()

    async def streamer(m: Message, ctx: Any) -> None:
        await ctx.emit_chunk(parent=m, text="first")
        task = asyncio.ensure_future(ctx.emit_chunk(parent=m, text="blocked"))
        state = ctx.runtime._rt.traces[m.trace_id]
        # Until it waits for room (Rookery is full): the runtime offers no event for
        # "a chunk started waiting", so yield turns (a few), bounded.
        for _ in range(100):
            if state.chunk_waiters:
                break
            await asyncio.sleep(0)
        assert state.chunk_waiters
        waiting.set()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await ctx.emit_chunk(parent=m, text="", done=True)

    node = Node(streamer, name="streamer", policy=NONE)
    flow = create(node.to(), queue_maxsize=1)
    flow.run()
    try:
        await flow.emit(msg("x"))
        await within(waiting.wait())
        chunks = await _chunks(flow, 2)
        assert [(c.seq, c.text) for c in chunks] == [(0, "first"), (1, "")]
    finally:
        await within(flow.stop())


async def test_streams_left_without_done_are_kept_for_the_last_requests_only(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # 2.1 numbers a stream on until its done chunk, across messages of one trace id
    # (a conversation's next message continues at 3): kept. But a server whose
    # node streams without done kept one entry per request for ever: only the
    # last IDLE_STREAMS_MAX idle streams are kept now.
    monkeypatch.setattr(runtime_module, "IDLE_STREAMS_MAX", 10)

    async def streamer(m: Message, ctx: Any) -> None:
        for n in range(3):
            await ctx.emit_chunk(parent=m, text=f"t{n}")

    node = Node(streamer, name="streamer", policy=NONE)
    flow = create(node.to())
    flow.run()
    try:
        conversation = msg("hello")
        await flow.emit(conversation)
        assert [c.seq for c in await _chunks(flow, 3)] == [0, 1, 2]
        await flow.emit(conversation)  # its next message numbers on
        assert [c.seq for c in await _chunks(flow, 3)] == [3, 4, 5]
        for _ in range(50):
            await flow.emit(msg("x"))
            assert [c.seq for c in await _chunks(flow, 3)] == [0, 1, 2]
        ctx = flow.context(node)
        assert flow._rt.traces == {} and ctx._open_streams == {}
        assert len(ctx._stream_seq) == 10 and len(flow._rt.idle_streams) == 10
        assert flow._rt.trace_streams == {}
        await flow.emit(conversation)  # long forgotten: a new stream
        assert [c.seq for c in await _chunks(flow, 3)] == [0, 1, 2]
    finally:
        await within(flow.stop())
    assert flow._rt.idle_streams == {} and ctx._stream_seq == {}


async def test_per_request_stream_ids_left_without_done_are_bounded_too(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The bound held only for the default stream id (the trace id): a node
    # streaming under f"{trace}-answer" without done kept an entry per request in
    # both its numbers and its open streams, for ever.
    monkeypatch.setattr(runtime_module, "IDLE_STREAMS_MAX", 10)

    async def streamer(m: Message, ctx: Any) -> None:
        for n in range(2):
            await ctx.emit_chunk(parent=m, text=f"t{n}", stream_id=f"{m.trace_id}-answer")

    node = Node(streamer, name="streamer", policy=NONE)
    flow = create(node.to())
    flow.run()
    try:
        for _ in range(40):
            await flow.emit(msg("x"))
            assert [c.seq for c in await _chunks(flow, 2)] == [0, 1]
        ctx = flow.context(node)
        assert flow._rt.traces == {} and ctx._open_streams == {}
        assert len(ctx._stream_seq) == 10 and len(flow._rt.idle_streams) == 10
        assert flow._rt.trace_streams == {}
    finally:
        await within(flow.stop())


async def test_a_shared_explicit_stream_id_keeps_numbering_across_traces() -> None:
    # 2.1: numbers are kept per context and stream id until a done chunk; a
    # stream id that is not a trace's own is not ended by the trace draining.
    async def streamer(m: Message, ctx: Any) -> None:
        await ctx.emit_chunk(parent=m, text="s", stream_id="status")

    node = Node(streamer, name="streamer", policy=NONE)
    flow = create(node.to())
    flow.run()
    try:
        seqs = []
        for _ in range(3):
            await flow.emit(msg("x"))
            seqs += [c.seq for c in await _chunks(flow, 1)]
        assert seqs == [0, 1, 2]
    finally:
        await within(flow.stop())


async def test_a_chunk_one_successor_took_keeps_its_number_when_the_next_put_is_cut() -> None:
    # The number went back when the chunk had already reached one of two successors
    # (the other full, the put cut by the node's timeout): the retry's chunk reused
    # it, and the first successor saw seq 0 twice.
    seen: list[tuple[int, str]] = []
    busy, release, both = asyncio.Event(), asyncio.Event(), asyncio.Event()
    attempts = 0

    async def streamer(m: Message, ctx: Any) -> None:
        nonlocal attempts
        attempts += 1
        await ctx.emit_chunk(parent=m, text=f"attempt{attempts}")

    async def fast(m: Message, ctx: Any) -> None:
        seen.append((m.payload.seq, m.payload.text))
        if len(seen) == 2:
            both.set()

    async def slow(m: Message, ctx: Any) -> None:
        busy.set()
        await release.wait()

    s = Node(streamer, name="s", policy=NodePolicy(validate="none", timeout_s=0.2,
                                                   max_retries=1, backoff_base=0.0))
    a, b = Node(fast, name="a", policy=NONE), Node(slow, name="b", policy=NONE)
    flow = create(s.to(a, b), a.to(), b.to(), queue_maxsize=1)
    flow.run()
    try:
        to_b = next(f for f in flow._floes if f.source is s and f.target is b)
        filler = msg("fill")
        await flow._rt.put(to_b, filler, None)  # b takes it and blocks
        await within(busy.wait())
        await flow._rt.put(to_b, filler, None)  # queued: s -> b is full
        await flow.emit(msg("x"))
        await within(both.wait())  # both attempts reached a
        assert [seq for seq, _ in seen] == [0, 1]
    finally:
        release.set()
        await within(flow.stop())
