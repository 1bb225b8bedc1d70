"""Fan-in: contexts with several incoming floes, and fetching after stop.

A node or Rookery with several incoming floes is served in arrival order across
floes; targeted fetches, concurrent fetchers and stop() never lose or strand an
item.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pfcore_support import Recorder, msg, within

from penguiflow import Node, NodePolicy, create
from penguiflow._ids import otel_trace_id, root_span_id
from penguiflow.core import ROOKERY


def node(name: str) -> Node:
    async def passthrough(message: Any, ctx: Any) -> Any:
        return message

    return Node(passthrough, name=name, policy=NodePolicy(validate="none"))


def two_egress_flow(**kwargs: Any) -> tuple[Any, Node, Node]:
    a, b = node("a"), node("b")
    return create(a.to(), b.to(), **kwargs), a, b


async def test_join_node_sees_items_in_arrival_order_across_floes() -> None:
    a, b, j = node("a"), node("b"), node("j")
    flow = create(a.to(j), b.to(j), j.to())
    ctx_a, ctx_b, ctx_j = flow.context(a), flow.context(b), flow.context(j)
    ctx_a.emit_nowait("a1")
    ctx_b.emit_nowait("b1")
    ctx_a.emit_nowait("a2")
    ctx_b.emit_nowait("b2")
    got = [await within(ctx_j.fetch()) for _ in range(4)]
    assert got == ["a1", "b1", "a2", "b2"]


async def test_rookery_with_two_egress_floes_delivers_in_arrival_order(start: Any) -> None:
    flow, a, b = two_egress_flow()
    start(flow)
    first, second, third = msg("x"), msg("y"), msg("z")
    await flow.emit(first, to=b)
    assert (await within(flow.fetch())).payload == "x"
    await flow.emit(second, to=a)
    await flow.emit(third, to=b)
    got = {(await within(flow.fetch())).payload for _ in range(2)}
    assert got == {"y", "z"}


async def test_targeted_fetch_then_plain_fetch_skips_stale_arrivals(start: Any) -> None:
    flow, a, b = two_egress_flow()
    rookery = flow.context(ROOKERY)
    rookery_a = flow.context(a)
    rookery_a.emit_nowait("only-a")  # a's egress floe, as if a had produced it
    assert await within(flow.fetch(from_=a)) == "only-a"
    flow.context(b).emit_nowait("then-b")
    # The arrival entry of "only-a" is stale; the plain fetch must skip it.
    assert await within(rookery.fetch()) == "then-b"


async def test_fetch_any_from_a_subset_and_fetch_nowait() -> None:
    flow, a, b = two_egress_flow()
    rookery = flow.context(ROOKERY)
    with pytest.raises(asyncio.QueueEmpty, match="no messages available"):
        flow.fetch_nowait()
    flow.context(b).emit_nowait("from-b")
    assert await within(rookery.fetch_any(from_=[a, b])) == "from-b"
    flow.context(a).emit_nowait("from-a")
    assert flow.fetch_nowait() == "from-a"


async def test_waiting_fetchers_are_each_woken_by_a_put() -> None:
    flow, a, b = two_egress_flow()
    rookery = flow.context(ROOKERY)
    waiting = [asyncio.ensure_future(rookery.fetch()) for _ in range(2)]
    await asyncio.sleep(0)  # let both fetchers park (no item exists yet to await)
    flow.context(a).emit_nowait(1)
    flow.context(b).emit_nowait(2)
    assert sorted(await within(asyncio.gather(*waiting))) == [1, 2]


async def test_a_cancelled_fetcher_passes_its_wakeup_on() -> None:
    flow, a, _ = two_egress_flow()
    rookery = flow.context(ROOKERY)
    first = asyncio.ensure_future(rookery.fetch_any())
    second = asyncio.ensure_future(rookery.fetch_any())
    await asyncio.sleep(0)
    flow.context(a).emit_nowait("item")  # wakes `first` ...
    first.cancel()  # ... which is cancelled before it runs
    assert await within(second) == "item"


async def test_many_targeted_fetches_keep_arrival_bookkeeping_bounded() -> None:
    flow, a, b = two_egress_flow(queue_maxsize=0)
    rookery = flow.context(ROOKERY)
    for i in range(3000):
        flow.context(a).emit_nowait(i)
        assert await rookery.fetch(from_=a) == i
    # Stale entries are compacted away instead of growing with every item.
    assert len(rookery._arrivals) <= 1025
    flow.context(b).emit_nowait("b")
    assert await within(rookery.fetch()) == "b"


async def test_stop_wakes_a_waiting_fetch_with_a_clear_error() -> None:
    flow, _, _ = two_egress_flow()
    flow.run()
    pending = asyncio.ensure_future(flow.fetch())
    await asyncio.sleep(0)
    await flow.stop()
    with pytest.raises(RuntimeError, match="stopped while fetch"):
        await within(pending)


async def test_stop_wakes_a_single_floe_fetch_too() -> None:
    a = node("a")
    flow = create(a.to())
    flow.run()
    pending = asyncio.ensure_future(flow.fetch())
    await asyncio.sleep(0)
    await flow.stop()
    with pytest.raises(RuntimeError, match="stopped while fetch"):
        await within(pending)


async def test_after_stop_leftovers_can_be_fetched_then_fetch_fails_fast(
    recorder: Any,
) -> None:
    a = node("a")
    flow = create(a.to(), middlewares=[recorder])
    flow.run()
    await flow.emit(msg("left"))
    await flow.emit(msg("over"))
    # node_success follows the routing of the result: both are in Rookery now.
    await recorder.wait_for("node_success", count=2)
    await flow.stop()
    assert [(await within(flow.fetch())).payload for _ in range(2)] == ["left", "over"]
    with pytest.raises(RuntimeError, match="stopped and Rookery is empty"):
        await flow.fetch()


async def test_fetch_any_after_stop_takes_what_is_left_then_fails_fast(
    recorder: Any,
) -> None:
    # fetch_any skipped fetch's stopped check: on a stopped flow it waited for ever.
    flow, a, b = two_egress_flow(middlewares=[recorder])
    flow.run()
    await flow.emit(msg("left"), to=b)
    await recorder.wait_for("node_success")
    await flow.stop()
    assert (await within(flow.fetch_any())).payload == "left"
    for from_ in (None, [a, b]):
        with pytest.raises(RuntimeError, match="stopped and Rookery is empty"):
            await within(flow.fetch_any(from_))


async def test_emit_after_stop_is_refused_and_run_again_accepts() -> None:
    a = node("a")
    flow = create(a.to())
    flow.run()
    await flow.stop()
    with pytest.raises(RuntimeError, match="call run\\(\\) again"):
        await flow.emit(msg(1))
    with pytest.raises(RuntimeError, match="call run\\(\\) again"):
        flow.emit_nowait(msg(1))
    flow.run()
    try:
        await flow.emit(msg(2))
        assert (await within(flow.fetch())).payload == 2
    finally:
        await flow.stop()


async def test_emit_before_run_is_buffered_and_processed_once_running() -> None:
    a = node("a")
    flow = create(a.to())
    flow.emit_nowait(msg("early"))
    flow.run()
    try:
        assert (await within(flow.fetch())).payload == "early"
    finally:
        await flow.stop()


def test_otel_trace_id_rule() -> None:
    tid = "0af7651916cd43dd8448eb211c80319c"
    assert otel_trace_id(tid) == tid
    assert otel_trace_id(tid.upper()) == tid
    derived = otel_trace_id("order-42")
    assert len(derived) == 32 and derived != "0" * 32
    assert derived == otel_trace_id("order-42")
    assert otel_trace_id("0" * 32) != "0" * 32
    assert root_span_id(tid) == root_span_id(tid) and len(root_span_id(tid)) == 16


async def test_a_stop_cancelled_midway_still_stops_every_worker() -> None:
    entered = asyncio.Event()

    async def stubborn(message: Any, ctx: Any) -> Any:
        entered.set()
        try:
            await asyncio.Event().wait()
        finally:
            # Cleanup that takes a few loop turns, during which stop() is cancelled.
            for _ in range(3):
                await asyncio.sleep(0)

    flow = create(Node(stubborn, policy=NodePolicy(validate="none")).to())
    flow.run()
    await flow.emit(msg(1))
    await within(entered.wait())
    workers = [t for t in asyncio.all_tasks() if t.get_name().startswith("penguiflow:")]
    external = asyncio.ensure_future(asyncio.Event().wait())
    flow.register_external_task("some-trace", external)
    stopping = asyncio.ensure_future(flow.stop())
    await asyncio.sleep(0)  # stop() has started cancelling the workers
    stopping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopping
    # The shielded shutdown goes on without the caller: every worker ends, and
    # the cleanup after them (external tasks) still happens.
    await within(asyncio.gather(*workers, return_exceptions=True))
    await within(asyncio.gather(external, return_exceptions=True))
    assert external.cancelled()


async def test_a_targeted_fetch_keeps_the_arrival_order_of_what_remains() -> None:
    # The item a fetch from a named floe takes leaves its ring behind: the next
    # plain fetch took a later item of that floe before an earlier one of another.
    flow, a, b = two_egress_flow()
    rookery = flow.context(ROOKERY)
    for ctx, item in ((a, "a1"), (b, "b1"), (a, "a2"), (b, "b2"), (a, "a3")):
        flow.context(ctx).emit_nowait(item)
    assert await within(rookery.fetch(from_=a)) == "a1"
    assert rookery.fetch_nowait(from_=a) == "a2"
    assert await within(rookery.fetch(from_=[b])) == "b1"
    assert [await within(rookery.fetch()) for _ in range(2)] == ["b2", "a3"]


async def test_a_cancel_keeps_the_arrival_order_of_what_remains() -> None:
    # cancel() removes a trace's queued items; their rings went stale and made the
    # join take z (queued after y) first: spec §6, strictly in arrival order.
    gate = asyncio.Event()
    taken: list[str] = []

    async def join(message: Any, ctx: Any) -> Any:
        taken.append(message.payload)
        if message.payload == "first":
            await gate.wait()
        return message

    a, b = node("a"), node("b")
    j = Node(join, name="j", policy=NodePolicy(validate="none"))
    recorder = Recorder()
    flow = create(a.to(j), b.to(j), j.to(), middlewares=[recorder])
    ctx_a, ctx_b = flow.context(a), flow.context(b)
    first, cancelled, y, z = msg("first"), msg("cancelled"), msg("y"), msg("z")
    ctx_a.emit_nowait(first)
    flow.run()
    try:
        await recorder.wait_for("node_start", node="j")  # j holds "first"
        for ctx, item in ((ctx_a, cancelled), (ctx_b, y), (ctx_a, z)):
            ctx.emit_nowait(item)
        await within(flow.cancel(cancelled.trace_id))
        gate.set()
        for _ in range(3):
            await within(flow.fetch())
        assert taken == ["first", "y", "z"]
    finally:
        await flow.stop()
