"""§9 Context: emit / fetch / fetch_any / fetch_nowait, emit_chunk, chunk backpressure."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pfcore_support import Recorder, msg, within

from penguiflow import Context, Message, Node, NodePolicy, StreamChunk, create
from penguiflow import core as pf_core
from penguiflow.core import OPEN_SEA, Floe

NONE = NodePolicy(validate="none")


def plain(name: str) -> Node:
    async def fn(message: Any, ctx: Any) -> Any:
        return message

    return Node(fn, name=name, policy=NONE)


def test_context_is_exported_from_core() -> None:
    assert pf_core.Context is Context


# --- detached contexts and manual wiring ------------------------------------------------


async def test_detached_context_properties_and_emit() -> None:
    node = plain("n")
    ctx = Context(node)
    assert ctx.owner is node
    assert ctx.runtime is None
    assert ctx.outgoing_count() == 0
    with pytest.raises(RuntimeError) as info:
        await ctx.emit("x")
    assert str(info.value) == "Context is not attached to a running flow"


async def test_endpoint_owner() -> None:
    ctx = Context(OPEN_SEA)
    assert ctx.owner == OPEN_SEA


async def test_fetch_without_incoming_floes() -> None:
    ctx = Context(plain("n"))
    with pytest.raises(RuntimeError) as info:
        await within(ctx.fetch())
    assert str(info.value) == "context has no incoming floes to fetch from"


async def test_floes_with_missing_ends_are_ignored() -> None:
    node = plain("n")
    ctx = Context(node)
    ctx.add_outgoing_floe(Floe(node, None, maxsize=1))
    ctx.add_incoming_floe(Floe(None, node, maxsize=1))
    assert ctx.outgoing_count() == 0
    with pytest.raises(RuntimeError, match="no incoming floes"):
        await within(ctx.fetch())


async def test_manual_wiring_fetch_and_depths() -> None:
    a, b, c = plain("a"), plain("b"), plain("c")
    ctx_b = Context(b)
    ab, cb = Floe(a, b, maxsize=4), Floe(c, b, maxsize=4)
    bc = Floe(b, c, maxsize=4)
    ctx_b.add_incoming_floe(ab)
    ctx_b.add_incoming_floe(cb)
    ctx_b.add_outgoing_floe(bc)
    assert ctx_b.outgoing_count() == 1
    ab.queue.put_nowait("a1")
    ab.queue.put_nowait("a2")
    cb.queue.put_nowait("c1")
    bc.queue.put_nowait("out")
    assert ctx_b.queue_depth_in() == 3
    assert ctx_b.queue_depth_out() == 1
    assert await within(ctx_b.fetch(from_=c)) == "c1"
    assert await within(ctx_b.fetch(from_=a)) == "a1"
    assert ctx_b.fetch_nowait(from_=a) == "a2"
    with pytest.raises(asyncio.QueueEmpty) as info:
        ctx_b.fetch_nowait()
    assert str(info.value) == "no messages available"
    with pytest.raises(KeyError):
        await within(ctx_b.fetch(from_=plain("stranger")))
    with pytest.raises(KeyError):
        await within(ctx_b.fetch_any(from_=plain("stranger")))


async def test_single_incoming_floe_fetch() -> None:
    a, b = plain("a"), plain("b")
    ctx = Context(b)
    floe = Floe(a, b, maxsize=0)
    ctx.add_incoming_floe(floe)
    waiter = asyncio.ensure_future(ctx.fetch())
    floe.queue.put_nowait("late")
    assert await within(waiter) == "late"


async def test_fetch_any_buffers_simultaneous_items() -> None:
    a, b, c = plain("a"), plain("b"), plain("c")
    ctx = Context(b)
    ab, cb = Floe(a, b, maxsize=4), Floe(c, b, maxsize=4)
    ctx.add_incoming_floe(ab)
    ctx.add_incoming_floe(cb)
    ab.queue.put_nowait("from-a")
    cb.queue.put_nowait("from-c")
    first = await within(ctx.fetch_any())
    second = await within(ctx.fetch())
    assert {first, second} == {"from-a", "from-c"}
    with pytest.raises(asyncio.QueueEmpty):
        ctx.fetch_nowait()


async def test_fetch_any_from_listed_sources() -> None:
    a, b, c = plain("a"), plain("b"), plain("c")
    ctx = Context(b)
    ab, cb = Floe(a, b, maxsize=4), Floe(c, b, maxsize=4)
    ctx.add_incoming_floe(ab)
    ctx.add_incoming_floe(cb)
    ab.queue.put_nowait("from-a")
    cb.queue.put_nowait("from-c")
    assert await within(ctx.fetch_any(from_=[c])) == "from-c"
    assert await within(ctx.fetch_any(from_=a)) == "from-a"


# --- contexts inside a running flow ---------------------------------------------------


async def test_node_can_emit_to_chosen_successors(start: Any) -> None:
    errors: list[BaseException] = []

    async def router(message: Any, ctx: Any) -> Any:
        assert ctx.runtime is not None
        await ctx.emit(f"{message}->b", to=b)
        await ctx.emit(f"{message}->bc", to=[b, c])
        try:
            await ctx.emit("lost", to=stranger)
        except KeyError as exc:
            errors.append(exc)
        return None

    r = Node(router, name="router", policy=NONE)
    b, c, stranger = plain("b"), plain("c"), plain("stranger")
    flow = start(create(r.to(b, c), b.to(), c.to()))
    await flow.emit("m")
    from_b = [await within(flow.fetch(from_=b)) for _ in range(2)]
    from_c = await within(flow.fetch(from_=c))
    assert from_b == ["m->b", "m->bc"]
    assert from_c == "m->bc"
    assert len(errors) == 1


async def test_context_emit_without_target_broadcasts(start: Any) -> None:
    async def fan(message: Any, ctx: Any) -> Any:
        await ctx.emit(message)
        return None

    f = Node(fan, name="fan", policy=NONE)
    b, c = plain("b"), plain("c")
    flow = start(create(f.to(b, c), b.to(), c.to()))
    m = msg("x")
    await flow.emit(m)
    assert await within(flow.fetch(from_=b)) is m
    assert await within(flow.fetch(from_=c)) is m


async def test_context_emit_nowait_raises_queue_full(start: Any) -> None:
    outcome: list[str] = []
    done = asyncio.Event()

    async def burst(message: Any, ctx: Any) -> Any:
        ctx.emit_nowait("one")
        try:
            ctx.emit_nowait("two")
        except asyncio.QueueFull:
            outcome.append("full")
        done.set()
        return None

    sink_started, gate = asyncio.Event(), asyncio.Event()

    async def sink(message: Any, ctx: Any) -> Any:
        sink_started.set()
        await gate.wait()
        return None

    p = Node(burst, name="burst", policy=NONE)
    s = Node(sink, name="sink", policy=NONE)
    flow = start(create(p.to(s), s.to(), queue_maxsize=1))
    await flow.emit("go")
    await within(done.wait())
    assert outcome == ["full"]
    gate.set()


async def test_attached_context_without_floes_emits_nowhere(start: Any) -> None:
    node = plain("n")
    flow = start(create(node.to()))
    ctx = Context(node, flow)
    assert ctx.runtime is flow
    await within(ctx.emit("x"))
    ctx.emit_nowait("y")
    assert ctx.queue_depth_out() == 0


async def test_a_context_built_by_hand_with_a_flow_puts_on_its_own_floes(start: Any) -> None:
    # 2.1 (spec section 9): Context(owner, runtime) wired with add_outgoing_floe emits
    # onto those floes; only a detached one (runtime None) refuses.
    a, b, c = plain("a"), plain("b"), plain("c")
    flow = start(create(a.to()))
    ctx = Context(a, flow)
    to_b, to_c = Floe(a, b, maxsize=1), Floe(a, c, maxsize=1)
    ctx.add_outgoing_floe(to_b)
    ctx.add_outgoing_floe(to_c)
    await within(ctx.emit("x"))
    assert (to_b.queue.qsize(), to_c.queue.qsize()) == (1, 1)
    with pytest.raises(asyncio.QueueFull):
        ctx.emit_nowait("y", to=b)  # full: nothing put anywhere
    inbox = Context(b)
    inbox.add_incoming_floe(to_b)
    assert await within(inbox.fetch()) == "x"
    ctx.emit_nowait("y", to=b)
    assert (to_b.queue.qsize(), to_c.queue.qsize()) == (1, 1)
    with pytest.raises(RuntimeError, match="Context is not attached to a running flow"):
        await Context(a).emit("z")


# --- emit_chunk -----------------------------------------------------------------------


async def test_emit_chunk_sequence_numbers(start: Any) -> None:
    produced: list[StreamChunk] = []

    async def producer(message: Any, ctx: Any) -> Any:
        produced.append(await ctx.emit_chunk(parent=message, text="a"))
        produced.append(await ctx.emit_chunk(parent=message, text="b"))
        produced.append(await ctx.emit_chunk(parent=message, text="c", done=True))
        produced.append(await ctx.emit_chunk(parent=message, text="d"))
        produced.append(await ctx.emit_chunk(parent=message, text="e", done=True))
        produced.append(await ctx.emit_chunk(parent=message, text="x", stream_id="s2", seq=5))
        produced.append(await ctx.emit_chunk(parent=message, text="y", stream_id="s2"))
        return None

    flow = start(create(Node(producer, policy=NONE).to()))
    parent = msg("p")
    await flow.emit(parent)
    delivered = [await within(flow.fetch()) for _ in range(7)]
    assert [c.seq for c in produced] == [0, 1, 2, 0, 1, 5, 6]
    assert [c.stream_id for c in produced] == [parent.trace_id] * 5 + ["s2", "s2"]
    assert [c.done for c in produced] == [False, False, True, False, True, False, False]
    assert [c.text for c in produced] == list("abcdexy")
    assert [d.payload for d in delivered] == produced


async def test_emit_chunk_wraps_chunk_in_a_message(start: Any) -> None:
    produced: list[StreamChunk] = []
    chunk_meta = {"token": 1}

    async def producer(message: Any, ctx: Any) -> Any:
        produced.append(await ctx.emit_chunk(parent=message, text="hi", meta=chunk_meta))
        chunk_meta["token"] = 2  # the chunk kept a copy
        return None

    flow = start(create(Node(producer, policy=NONE).to()))
    parent = msg("p", meta={"user": "u"}, deadline_s=4_000_000_000.0)
    await flow.emit(parent)
    out = await within(flow.fetch())
    assert isinstance(out, Message)
    chunk = out.payload
    assert isinstance(chunk, StreamChunk)
    assert chunk == produced[0]
    assert chunk.meta == {"token": 1}
    assert out.trace_id == parent.trace_id
    assert out.headers == parent.headers
    assert out.deadline_s == parent.deadline_s
    assert out.meta == {"user": "u"}
    assert out.meta is not parent.meta
    assert out is not parent


async def test_chunk_counters_are_per_context(start: Any) -> None:
    seqs: dict[str, list[int]] = {"p1": [], "p2": []}

    def producer(name: str) -> Node:
        async def fn(message: Any, ctx: Any) -> Any:
            for text in ("x", "y"):
                chunk = await ctx.emit_chunk(parent=message, text=text, stream_id="shared")
                seqs[name].append(chunk.seq)
            return None

        return Node(fn, name=name, policy=NONE)

    flow = start(create(producer("p1").to(), producer("p2").to()))
    await flow.emit(msg("go"))
    for _ in range(4):
        await within(flow.fetch())
    assert seqs == {"p1": [0, 1], "p2": [0, 1]}


async def test_chunk_producer_resumes_as_rookery_is_drained(start: Any) -> None:
    async def producer(message: Any, ctx: Any) -> Any:
        for i in range(6):
            await ctx.emit_chunk(parent=message, text=str(i), done=i == 5)
        return None

    flow = start(create(Node(producer, policy=NONE).to(), queue_maxsize=2))
    await flow.emit(msg("go"))
    chunks = [(await within(flow.fetch())).payload for _ in range(6)]
    assert [c.seq for c in chunks] == list(range(6))
    assert chunks[-1].done is True


def _backpressure_flow(queue_maxsize: int) -> tuple[Any, dict[str, Any]]:
    state: dict[str, Any] = {
        "sent": [],
        "progress": asyncio.Event(),
        "gate": asyncio.Event(),
        "held": 0,
        "both_holding": asyncio.Event(),
    }

    async def producer(message: Any, ctx: Any) -> Any:
        for i in range(3):
            await ctx.emit_chunk(parent=message, text=str(i))
            state["sent"].append(i)
            state["progress"].set()
        return None

    def consumer(name: str) -> Node:
        async def fn(message: Any, ctx: Any) -> Any:
            if not state["gate"].is_set():
                state["held"] += 1
                if state["held"] == 2:
                    state["both_holding"].set()
                await state["gate"].wait()
            return None

        return Node(fn, name=name, policy=NONE)

    p, b, c = Node(producer, name="producer", policy=NONE), consumer("b"), consumer("c")
    flow = create(p.to(b, c), b.to(), c.to(), queue_maxsize=queue_maxsize)
    return flow, state


async def _until_sent(state: dict[str, Any], n: int) -> None:
    while len(state["sent"]) < n:
        state["progress"].clear()
        await state["progress"].wait()


async def test_chunk_backpressure_counts_trace_pending_not_queue_space(start: Any) -> None:
    """With queue_maxsize=2: chunk 0 fans out to b and c (pending 3 with the parent); both
    consumers hold their copy, so every queue is empty, yet chunk 1 must wait."""
    flow, state = _backpressure_flow(2)
    start(flow)
    await flow.emit(msg("go"))
    await within(state["both_holding"].wait())
    assert state["sent"] == [0]
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(_until_sent(state, 2), 0.1)
    state["gate"].set()
    await within(_until_sent(state, 3))
    assert state["sent"] == [0, 1, 2]


async def test_stop_releases_a_throttled_chunk_producer(start: Any) -> None:
    flow, state = _backpressure_flow(2)
    start(flow)
    await flow.emit(msg("go"))
    await within(state["both_holding"].wait())
    assert state["sent"] == [0]
    await within(flow.stop())
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("penguiflow:")]


async def test_unbounded_queues_disable_chunk_backpressure(start: Any) -> None:
    flow, state = _backpressure_flow(0)
    start(flow)
    await flow.emit(msg("go"))
    await within(state["both_holding"].wait())
    await within(_until_sent(state, 3))
    assert state["sent"] == [0, 1, 2]
    state["gate"].set()


async def test_fetched_items_are_consumed_for_accounting(start: Any, recorder: Recorder) -> None:
    async def producer(message: Any, ctx: Any) -> Any:
        await ctx.emit_chunk(parent=message, text="a")
        return message

    flow = start(create(Node(producer, policy=NONE).to(), middlewares=[recorder]))
    m = msg("go")
    await flow.emit(m)
    await within(flow.fetch())
    await within(flow.fetch())
    # Once the worker has processed a later message, it has released m.
    probe = msg("probe")
    await flow.emit(probe)
    await within(flow.fetch())
    await within(flow.fetch())
    # Nothing of the trace is pending any more, so there is nothing to cancel.
    assert await flow.cancel(m.trace_id) is False
