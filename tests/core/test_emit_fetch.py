"""§7.1 lifecycle and §7.2 emit / fetch."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pfcore_support import Recorder, msg, within
from pydantic import BaseModel

from penguiflow import (
    FinalAnswer,
    Message,
    ModelRegistry,
    Node,
    NodePolicy,
    StreamChunk,
    create,
)
from penguiflow.errors import FlowNotRunning

NONE = NodePolicy(validate="none")


def echo(name: str = "echo", **kwargs: Any) -> Node:
    async def fn(message: Any, ctx: Any) -> Any:
        return message

    return Node(fn, name=name, **kwargs)


class Item(BaseModel):
    value: int


# --- run / stop -----------------------------------------------------------------------


async def test_run_twice_raises(start: Any) -> None:
    flow = start(create(echo(policy=NONE).to()))
    with pytest.raises(RuntimeError) as info:
        flow.run()
    assert str(info.value) == "PenguiFlow already running"


def test_run_requires_a_running_event_loop() -> None:
    flow = create(echo(policy=NONE).to())
    with pytest.raises(RuntimeError):
        flow.run()


async def test_run_checks_registry_coverage(start: Any) -> None:
    zeta = echo("zeta")
    alpha = echo("alpha")
    free = echo("free", policy=NONE)
    mid = echo("mid", policy=NodePolicy(validate="in"))
    flow = create(zeta.to(alpha), alpha.to(free), free.to(mid), mid.to())
    registry = ModelRegistry()
    registry.register("alpha", Item, Item)
    with pytest.raises(RuntimeError) as info:
        flow.run(registry=registry)
    text = str(info.value)
    prefix = "ModelRegistry is missing entries for nodes requiring validation: "
    assert text.startswith(prefix)
    listed = text[len(prefix) :]
    assert "mid" in listed and "zeta" in listed
    assert listed.index("mid") < listed.index("zeta")
    assert "alpha" not in listed and "free" not in listed
    # The failed run left the flow stopped: it can be run once the registry is complete.
    registry.register("zeta", Item, Item)
    registry.register("mid", Item, Item)
    start(flow, registry=registry)
    assert flow.registry is registry
    await flow.emit({"value": "7"})
    assert await within(flow.fetch()) == Item(value=7)


async def test_registry_property(start: Any) -> None:
    flow = create(echo(policy=NONE).to())
    assert flow.registry is None
    start(flow)
    assert flow.registry is None


async def test_run_without_registry_skips_validation(start: Any) -> None:
    flow = start(create(echo().to()))
    await flow.emit({"value": "not validated"})
    assert await within(flow.fetch()) == {"value": "not validated"}


async def test_stop_is_a_no_op_when_not_running() -> None:
    flow = create(echo(policy=NONE).to())
    await within(flow.stop())
    await within(flow.stop())


async def test_stop_cancels_blocked_node_and_allows_rerun(start: Any) -> None:
    started = asyncio.Event()
    saw_cancel = asyncio.Event()

    async def blocker(message: Any, ctx: Any) -> Any:
        if message == "block":
            started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                saw_cancel.set()
                raise
        return message

    node = Node(blocker, policy=NONE)
    flow = start(create(node.to()))
    await flow.emit("block")
    await within(started.wait())
    await within(flow.stop())
    assert saw_cancel.is_set()
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("penguiflow:")]
    with pytest.raises(RuntimeError, match=r"^PenguiFlow is not running$"):
        await flow.cancel("any")
    # ... and it can be run again.
    start(flow)
    await flow.emit("again")
    assert await within(flow.fetch()) == "again"


async def test_stop_cancels_registered_external_tasks(start: Any) -> None:
    flow = start(create(echo(policy=NONE).to()))
    external = asyncio.ensure_future(asyncio.Event().wait())
    flow.register_external_task("trace-1", external)
    flow.register_external_task(None, asyncio.ensure_future(asyncio.sleep(0)))
    await within(flow.stop())
    assert external.cancelled()


async def test_add_middleware_appends(start: Any) -> None:
    seen: list[str] = []

    async def mw(event: Any) -> None:
        seen.append(event.event_type)

    flow = create(echo(policy=NONE).to())
    flow.add_middleware(mw)
    start(flow)
    await flow.emit("x")
    assert await within(flow.fetch()) == "x"
    assert "node_start" in seen
    assert "node_success" in seen


# --- emit / fetch ---------------------------------------------------------------------


async def test_fetch_returns_the_raw_delivered_objects(start: Any) -> None:
    async def shape(message: Any, ctx: Any) -> Any:
        if message == "str":
            return "plain"
        if message == "model":
            return FinalAnswer(text="t")
        return message

    flow = start(create(Node(shape, policy=NONE).to()))
    m = msg({"k": 1})
    await flow.emit(m)
    assert await within(flow.fetch()) is m
    await flow.emit("str")
    assert await within(flow.fetch()) == "plain"
    await flow.emit("model")
    assert await within(flow.fetch()) == FinalAnswer(text="t")


async def test_messages_flow_through_validated_nodes(start: Any) -> None:
    seen: list[Any] = []

    async def bump(message: Any, ctx: Any) -> Any:
        seen.append(message)
        return message

    node = Node(bump, name="bump")
    registry = ModelRegistry()
    registry.register("bump", Message, Message)
    flow = start(create(node.to()), registry=registry)
    m = msg(1)
    await flow.emit(m)
    out = await within(flow.fetch())
    assert isinstance(out, Message)
    assert out.trace_id == m.trace_id
    assert isinstance(seen[0], Message)


async def test_emit_with_unknown_target_raises_key_error(start: Any) -> None:
    a = echo("a", policy=NONE)
    stranger = echo("stranger", policy=NONE)
    flow = start(create(a.to()))
    with pytest.raises(KeyError) as info:
        await flow.emit("x", to=stranger)
    assert info.value.args[0] == "Unknown target stranger for OpenSea"
    with pytest.raises(KeyError):
        flow.emit_nowait("x", to=stranger)
    with pytest.raises(KeyError):
        await flow.emit("x", to=[a, stranger])


async def test_fetch_from_unknown_source_raises_key_error(start: Any) -> None:
    a = echo("a", policy=NONE)
    b = echo("b", policy=NONE)
    flow = start(create(a.to(b), b.to()))
    with pytest.raises(KeyError) as info:
        await within(flow.fetch(from_=a))
    assert info.value.args[0] == "Unknown target a for Rookery"
    with pytest.raises(KeyError):
        await within(flow.fetch_any(from_=a))


async def test_fetch_from_a_specific_egress_node(start: Any) -> None:
    async def left(message: Any, ctx: Any) -> Any:
        return f"left:{message}"

    async def right(message: Any, ctx: Any) -> Any:
        return f"right:{message}"

    lnode, rnode = Node(left, policy=NONE), Node(right, policy=NONE)
    flow = start(create(lnode.to(), rnode.to()))
    await flow.emit("x")
    assert await within(flow.fetch(from_=rnode)) == "right:x"
    assert await within(flow.fetch_any(from_=[lnode])) == "left:x"


@pytest.mark.parametrize("method", ["fetch", "fetch_any"])
async def test_fetch_races_several_egress_floes_without_losing_items(
    start: Any, method: str
) -> None:
    async def left(message: Any, ctx: Any) -> Any:
        return f"left:{message}"

    async def right(message: Any, ctx: Any) -> Any:
        return f"right:{message}"

    flow = start(create(Node(left, policy=NONE).to(), Node(right, policy=NONE).to()))
    for i in range(3):
        await flow.emit(i)
    got = [await within(getattr(flow, method)()) for _ in range(6)]
    assert sorted(got) == sorted([f"{side}:{i}" for side in ("left", "right") for i in range(3)])


async def test_emit_awaits_while_the_ingress_floe_is_full(start: Any) -> None:
    started, gate = asyncio.Event(), asyncio.Event()
    processed: list[Any] = []

    async def slow(message: Any, ctx: Any) -> Any:
        started.set()
        await gate.wait()
        processed.append(message)
        return None

    flow = start(create(Node(slow, policy=NONE).to(), queue_maxsize=1))
    await flow.emit(1)
    await within(started.wait())
    await within(flow.emit(2))  # fills the queue
    with pytest.raises(asyncio.QueueFull):
        flow.emit_nowait(3)
    pending = asyncio.ensure_future(flow.emit(3))
    for _ in range(20):
        await asyncio.sleep(0)
    assert not pending.done()
    gate.set()
    await within(pending)
    assert processed[:1] == [1]


async def test_emit_nowait_delivers(start: Any) -> None:
    flow = start(create(echo(policy=NONE).to()))
    m = msg("quick")
    flow.emit_nowait(m)
    assert await within(flow.fetch()) is m


async def test_flow_emit_chunk_numbers_per_stream(start: Any) -> None:
    flow = start(create(echo(policy=NONE).to()))
    parent = msg("p", meta={"req": 1}, deadline_s=None)
    first = await flow.emit_chunk(parent=parent, text="a")
    second = await flow.emit_chunk(parent=parent, text="b", done=True)
    third = await flow.emit_chunk(parent=parent, text="c")
    assert [first.seq, second.seq, third.seq] == [0, 1, 0]
    assert isinstance(first, StreamChunk)
    assert first.stream_id == parent.trace_id
    delivered = [await within(flow.fetch()) for _ in range(3)]
    assert [d.payload for d in delivered] == [first, second, third]
    for d in delivered:
        assert isinstance(d, Message)
        assert d.trace_id == parent.trace_id
        assert d.headers == parent.headers
        assert d.meta == {"req": 1}
        assert d.meta is not parent.meta


async def test_flow_emit_chunk_with_target_and_stream_id(start: Any) -> None:
    a, b = echo("a", policy=NONE), echo("b", policy=NONE)
    flow = start(create(a.to(), b.to()))
    parent = msg("p")
    chunk = await flow.emit_chunk(parent=parent, text="hi", stream_id="s1", to=b, meta={"m": 1})
    assert chunk.stream_id == "s1"
    assert chunk.meta == {"m": 1}
    out = await within(flow.fetch(from_=b))
    assert out.payload == chunk
    assert out.meta == {}
    with pytest.raises(KeyError):
        await flow.emit_chunk(parent=parent, text="x", to=echo("nowhere", policy=NONE))


def _stuck(start: Any) -> tuple[Any, asyncio.Event]:
    """A running flow of one node that never returns, floes of one item; and the
    event its node sets once it holds a message."""
    entered = asyncio.Event()

    async def stuck(message: Any, ctx: Any) -> Any:
        entered.set()
        await asyncio.Event().wait()

    return start(create(Node(stuck, name="stuck", policy=NONE).to(), queue_maxsize=1)), entered


async def test_an_emit_waiting_for_room_raises_when_the_flow_stops(start: Any) -> None:
    flow, entered = _stuck(start)
    await flow.emit(msg(0))  # taken by the node, which never returns
    await within(entered.wait())
    await flow.emit(msg(1))  # fills the floe
    blocked = asyncio.ensure_future(flow.emit(msg(2)))
    await asyncio.sleep(0)  # it reaches the full floe and waits
    assert not blocked.done()
    await within(flow.stop())
    # Before: still waiting after stop() returned, for ever.
    with pytest.raises(FlowNotRunning, match="waited for room"):
        await within(blocked)


async def test_an_emit_chunk_waiting_for_room_raises_when_the_flow_stops(start: Any) -> None:
    flow, entered = _stuck(start)
    parent = msg("p")
    await flow.emit_chunk(parent=parent, text="0")
    await within(entered.wait())
    await flow.emit_chunk(parent=parent, text="1")
    blocked = asyncio.ensure_future(flow.emit_chunk(parent=parent, text="2"))
    await asyncio.sleep(0)  # waits for the trace's chunk capacity
    assert not blocked.done()
    await within(flow.stop())
    # Before: released by stop(), it went on to wait on the full floe for ever.
    with pytest.raises(FlowNotRunning):
        await within(blocked)


async def test_fetch_from_a_drained_egress_of_a_stopped_flow_raises(
        start: Any, recorder: Recorder) -> None:
    async def same(message: Any, ctx: Any) -> Any:
        return message

    a, b = Node(same, name="a", policy=NONE), Node(same, name="b", policy=NONE)
    flow = start(create(a.to(), b.to(), middlewares=[recorder]))
    m = msg(1)
    await flow.emit(m, to=a)
    await recorder.wait_for("node_success", trace_id=m.trace_id)  # routed to Rookery
    await within(flow.stop())
    # The result left is on a's egress: before, fetch(from_=b) waited for ever.
    with pytest.raises(FlowNotRunning, match="Rookery is empty"):
        await within(flow.fetch(from_=b))
    assert (await within(flow.fetch(from_=a))).payload == 1
