"""§6 graph construction: create, PenguiFlow, OpenSea/Rookery, floes, cycles."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest
from pfcore_support import Recorder, msg, within

from penguiflow import (
    DEFAULT_QUEUE_MAXSIZE,
    CycleError,
    FlowError,
    Node,
    NodePolicy,
    PenguiFlow,
    create,
)
from penguiflow.core import OPEN_SEA, ROOKERY, Endpoint, Floe

NONE = NodePolicy(validate="none")


def passthrough(name: str, **kwargs: Any) -> Node:
    async def fn(message: Any, ctx: Any) -> Any:
        return message

    return Node(fn, name=name, policy=NONE, **kwargs)


def test_default_queue_maxsize_is_64() -> None:
    assert DEFAULT_QUEUE_MAXSIZE == 64


def test_create_with_no_adjacencies_returns_an_empty_flow() -> None:
    flow = create()
    assert isinstance(flow, PenguiFlow)


def test_create_forwards_keyword_arguments() -> None:
    a = passthrough("a")
    b = passthrough("b")
    with pytest.raises(CycleError):
        create(a.to(b), b.to(a))
    assert isinstance(create(a.to(b), b.to(a), allow_cycles=True), PenguiFlow)


# --- cycles ------------------------------------------------------------------------


def test_cycle_error_is_a_runtime_error() -> None:
    assert issubclass(CycleError, RuntimeError)


def test_two_node_cycle_is_rejected() -> None:
    a, b = passthrough("a"), passthrough("b")
    with pytest.raises(CycleError) as info:
        PenguiFlow(a.to(b), b.to(a))
    assert str(info.value) == "Flow contains a cycle; enable allow_cycles to bypass"


def test_longer_cycle_is_rejected_by_create() -> None:
    a, b, c = passthrough("a"), passthrough("b"), passthrough("c")
    with pytest.raises(CycleError) as info:
        create(a.to(b), b.to(c), c.to(a))
    assert str(info.value) == "Flow contains a cycle; enable allow_cycles to bypass"
    assert info.value.args == ("Flow contains a cycle; enable allow_cycles to bypass",)


def test_self_edge_without_allow_cycle_is_a_cycle() -> None:
    a = passthrough("a")
    with pytest.raises(CycleError):
        create(a.to(a))


def test_self_edge_with_allow_cycle_is_accepted() -> None:
    a = passthrough("a", allow_cycle=True)
    assert isinstance(create(a.to(a)), PenguiFlow)


def test_allow_cycle_only_excuses_self_edges() -> None:
    a = passthrough("a", allow_cycle=True)
    b = passthrough("b")
    with pytest.raises(CycleError):
        create(a.to(a, b), b.to(a))


def test_allow_cycles_bypasses_the_check() -> None:
    a, b = passthrough("a"), passthrough("b")
    assert isinstance(create(a.to(b), b.to(a), allow_cycles=True), PenguiFlow)
    c = passthrough("c")
    assert isinstance(create(c.to(c), allow_cycles=True), PenguiFlow)


# --- endpoints and floes -------------------------------------------------------------


def test_endpoints() -> None:
    assert Endpoint("OpenSea") == OPEN_SEA
    assert Endpoint("Rookery") == ROOKERY
    assert OPEN_SEA.name == "OpenSea"
    assert ROOKERY.name == "Rookery"
    assert OPEN_SEA != ROOKERY
    assert hash(Endpoint("OpenSea")) == hash(OPEN_SEA)
    assert len({Endpoint("x"), Endpoint("x")}) == 1
    assert dataclasses.is_dataclass(Endpoint)
    assert hasattr(Endpoint, "__slots__")
    assert [f.name for f in dataclasses.fields(Endpoint)] == ["name"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        OPEN_SEA.name = "Other"  # type: ignore[misc]


async def test_floe_attributes() -> None:
    a, b = passthrough("a"), passthrough("b")
    floe = Floe(a, b, maxsize=3)
    assert floe.source is a
    assert floe.target is b
    assert isinstance(floe.queue, asyncio.Queue)
    assert floe.queue.maxsize == 3
    with pytest.raises(TypeError):
        Floe(a, b, 3)  # type: ignore[misc]


# --- structure observed through behaviour --------------------------------------------


async def test_linear_flow_delivers_egress_output(start: Any) -> None:
    a = passthrough("a")
    b = passthrough("b")
    flow = start(create(a.to(b), b.to()))
    m = msg("hello")
    await flow.emit(m)
    assert await within(flow.fetch()) is m


async def test_duplicate_edges_collapse(start: Any) -> None:
    counts: list[int] = []
    b_calls: list[Any] = []

    async def a_fn(message: Any, ctx: Any) -> Any:
        counts.append(ctx.outgoing_count())
        return message

    async def b_fn(message: Any, ctx: Any) -> Any:
        b_calls.append(message)
        return message

    a = Node(a_fn, name="a", policy=NONE)
    b = Node(b_fn, name="b", policy=NONE)
    flow = start(create(a.to(b), a.to(b), b.to()))
    await flow.emit("x")
    assert await within(flow.fetch()) == "x"
    await flow.emit("y")
    assert await within(flow.fetch()) == "y"
    assert b_calls == ["x", "y"]
    assert counts == [1, 1]


async def test_adjacency_is_the_union_of_declared_edges(start: Any) -> None:
    outgoing: dict[str, int] = {}
    done = asyncio.Event()

    def probe(name: str) -> Node:
        async def fn(message: Any, ctx: Any) -> Any:
            outgoing[name] = ctx.outgoing_count()
            if len(outgoing) == 3:
                done.set()
            return message if name == "a" else None

        return Node(fn, name=name, policy=NONE)

    a, b, c = probe("a"), probe("b"), probe("c")
    flow = start(create(a.to(b), a.to(c)))
    await flow.emit("go")
    await within(done.wait())
    # a -> b and a -> c from two declarations; b and c are egress nodes (one floe each).
    assert outgoing == {"a": 2, "b": 1, "c": 1}


async def test_context_wiring_counts(start: Any) -> None:
    seen: dict[str, tuple[int, Any, Any]] = {}
    done = asyncio.Event()

    def probe(name: str, **kwargs: Any) -> Node:
        async def fn(message: Any, ctx: Any) -> Any:
            seen[name] = (ctx.outgoing_count(), ctx.owner, ctx.runtime)
            if name == "c":
                done.set()
                return None
            return message

        return Node(fn, name=name, policy=NONE, **kwargs)

    a, b, c = probe("a"), probe("b"), probe("c")
    flow = start(create(a.to(b, c), b.to(c), c.to()))
    await flow.emit("go")
    await within(done.wait())
    assert seen["a"][0] == 2  # a->b, a->c (no egress: a has successors)
    assert seen["a"][1] is a
    assert seen["a"][2] is flow
    assert seen["b"][0] == 1  # b->c
    assert seen["c"][0] == 1  # c->Rookery


async def test_controller_with_only_a_self_edge_has_ingress_and_egress(start: Any) -> None:
    outgoing: list[int] = []

    async def ctrl_fn(message: Any, ctx: Any) -> Any:
        outgoing.append(ctx.outgoing_count())
        return "out"

    ctrl = Node(ctrl_fn, name="ctrl", policy=NONE, allow_cycle=True)
    flow = start(create(ctrl.to(ctrl)))
    await flow.emit("in", to=ctrl)
    assert await within(flow.fetch()) == "out"
    # "out" is not a WM message, so it goes to every outgoing floe: itself and Rookery.
    assert outgoing[0] == 2


async def test_ingress_only_for_parentless_nodes(start: Any) -> None:
    a, b = passthrough("a"), passthrough("b")
    flow = start(create(a.to(b), b.to()))
    with pytest.raises(KeyError) as info:
        await flow.emit("x", to=b)
    assert info.value.args[0] == "Unknown target b for OpenSea"
    with pytest.raises(KeyError):
        flow.emit_nowait("x", to=b)
    with pytest.raises(KeyError):
        await flow.emit("x", to=[a, b])


async def test_self_edge_of_allow_cycle_node_with_other_parent_has_no_ingress(
    start: Any,
) -> None:
    a = passthrough("a")
    ctrl = passthrough("ctrl", allow_cycle=True)
    flow = start(create(a.to(ctrl), ctrl.to(ctrl)))
    with pytest.raises(KeyError):
        await flow.emit("x", to=ctrl)
    await flow.emit("x", to=a)
    assert await within(flow.fetch()) == "x"


@pytest.mark.parametrize("shape", ["two_node_cycle", "plain_self_edge"])
async def test_all_nodes_with_parents_means_emit_delivers_nowhere(start: Any, shape: str) -> None:
    called: list[Any] = []

    async def fn(message: Any, ctx: Any) -> Any:
        called.append(message)
        return message

    a = Node(fn, name="a", policy=NONE)
    b = Node(fn, name="b", policy=NONE)
    adj = [a.to(b), b.to(a)] if shape == "two_node_cycle" else [a.to(a)]
    flow = start(create(*adj, allow_cycles=True, queue_maxsize=1))
    for _ in range(5):
        flow.emit_nowait(msg("x"))
        await within(flow.emit(msg("y")))
    with pytest.raises(KeyError):
        await flow.emit("x", to=a)
    await flow.stop()
    assert called == []


async def test_broadcast_to_every_ingress_node(start: Any) -> None:
    got: dict[str, Any] = {}
    both = asyncio.Event()

    def probe(name: str) -> Node:
        async def fn(message: Any, ctx: Any) -> Any:
            got[name] = message
            if len(got) == 2:
                both.set()
            return None

        return Node(fn, name=name, policy=NONE)

    a, b = probe("a"), probe("b")
    flow = start(create(a.to(), b.to()))
    m = msg("fan")
    await flow.emit(m)
    await within(both.wait())
    assert got["a"] is m
    assert got["b"] is m


async def test_emit_to_a_single_or_several_ingress_nodes(start: Any) -> None:
    got: list[tuple[str, Any]] = []
    changed = asyncio.Event()

    def probe(name: str) -> Node:
        async def fn(message: Any, ctx: Any) -> Any:
            got.append((name, message))
            changed.set()
            return None

        return Node(fn, name=name, policy=NONE)

    a, b, c = probe("a"), probe("b"), probe("c")
    flow = start(create(a.to(), b.to(), c.to()))
    await flow.emit("only-b", to=b)
    await flow.emit("a-and-c", to=[a, c])

    async def until(n: int) -> None:
        while len(got) < n:
            changed.clear()
            await changed.wait()

    await within(until(3))
    assert sorted(got) == [("a", "a-and-c"), ("b", "only-b"), ("c", "a-and-c")]


# --- queues ---------------------------------------------------------------------------


def _blocking_sink(name: str, started: asyncio.Event, gate: asyncio.Event) -> Node:
    async def fn(message: Any, ctx: Any) -> Any:
        started.set()
        await gate.wait()
        return None

    return Node(fn, name=name, policy=NONE)


@pytest.mark.parametrize(("maxsize", "capacity"), [(None, 64), (1, 1), (3, 3)])
async def test_ingress_queue_capacity(start: Any, maxsize: int | None, capacity: int) -> None:
    started, gate = asyncio.Event(), asyncio.Event()
    sink = _blocking_sink("sink", started, gate)
    kwargs = {} if maxsize is None else {"queue_maxsize": maxsize}
    flow = start(create(sink.to(), **kwargs))
    await flow.emit("first")
    await within(started.wait())  # the worker holds "first"; the queue is empty again
    for i in range(capacity):
        flow.emit_nowait(f"m{i}")
    with pytest.raises(asyncio.QueueFull):
        flow.emit_nowait("overflow")
    gate.set()


@pytest.mark.parametrize("maxsize", [0, -1])
async def test_non_positive_queue_maxsize_means_unbounded(start: Any, maxsize: int) -> None:
    started, gate = asyncio.Event(), asyncio.Event()
    sink = _blocking_sink("sink", started, gate)
    flow = start(create(sink.to(), queue_maxsize=maxsize))
    await flow.emit("first")
    await within(started.wait())
    for i in range(300):
        flow.emit_nowait(f"m{i}")
    gate.set()


async def test_egress_floe_uses_the_same_queue_maxsize(start: Any) -> None:
    """Nobody fetches: the egress floe holds queue_maxsize items, then the node blocks."""
    calls: list[Any] = []
    changed = asyncio.Event()

    async def fn(message: Any, ctx: Any) -> Any:
        calls.append(message)
        changed.set()
        return message

    node = Node(fn, name="n", policy=NONE)
    flow = start(create(node.to(), queue_maxsize=2))
    for i in range(4):
        await within(flow.emit(i))

    async def until(n: int) -> None:
        while len(calls) < n:
            changed.clear()
            await changed.wait()

    # Two results fill Rookery's floe; the third call's put blocks, so no fourth call yet.
    await within(until(3))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(until(4), 0.1)
    assert [await within(flow.fetch()) for _ in range(4)] == [0, 1, 2, 3]


# --- workers --------------------------------------------------------------------------


async def test_worker_processes_messages_one_at_a_time_in_order(start: Any) -> None:
    active = 0
    peak = 0
    order: list[int] = []

    async def fn(message: Any, ctx: Any) -> Any:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        for _ in range(3):
            await asyncio.sleep(0)  # give a concurrent invocation the chance to start
        order.append(message)
        active -= 1
        return message

    node = Node(fn, name="serial", policy=NONE)
    flow = start(create(node.to()))
    for i in range(6):
        await flow.emit(i)
    fetched = [await within(flow.fetch()) for _ in range(6)]
    assert fetched == list(range(6))
    assert order == list(range(6))
    assert peak == 1


async def test_worker_tasks_are_named_and_removed_by_stop(start: Any) -> None:
    a, b = passthrough("alpha"), passthrough("beta")
    flow = start(create(a.to(b), b.to()))
    names = {t.get_name() for t in asyncio.all_tasks()}
    assert {"penguiflow:alpha", "penguiflow:beta"} <= names
    await flow.stop()
    remaining = {t.get_name() for t in asyncio.all_tasks() if not t.done()}
    assert not {n for n in remaining if n.startswith("penguiflow:")}


async def test_flow_level_events_name_endpoints(start: Any) -> None:
    """Events from the endpoints carry the endpoint name as node_name and node_id."""
    recorder = Recorder()
    started, gate = asyncio.Event(), asyncio.Event()
    sink = _blocking_sink("sink", started, gate)
    flow = start(create(sink.to(), middlewares=[recorder]))
    m = msg("x")
    await flow.emit(m)
    await within(started.wait())
    assert await flow.cancel(m.trace_id) is True
    (ev,) = await recorder.wait_for("trace_cancel_start")
    assert ev.node_name == "OpenSea"
    assert ev.node_id == "OpenSea"
    (fin,) = await recorder.wait_for("trace_cancel_finish")
    assert fin.node_name == "Rookery"
    assert fin.node_id == "Rookery"


async def test_out_of_band_delivery_without_any_egress_floe_uses_rookery_buffer(
    start: Any,
) -> None:
    """a -> b -> c -> b (allow_cycles): no node is an egress node, so a FlowError is put
    into the Rookery context's buffer, from which fetch reads first."""

    async def bad(message: Any, ctx: Any) -> Any:
        raise RuntimeError("no way out")

    a = Node(bad, name="a", policy=NONE)
    b, c = passthrough("b"), passthrough("c")
    flow = start(create(a.to(b), b.to(c), c.to(b), allow_cycles=True, emit_errors_to_rookery=True))
    m = msg("x")
    await flow.emit(m)
    err = await within(flow.fetch())
    assert isinstance(err, FlowError)
    assert err.node_name == "a"
    assert err.trace_id == m.trace_id
    # Fetching consumed it: the trace has nothing pending any more.
    assert await flow.cancel(m.trace_id) is False


# --- malformed input (beyond the 2.1 text: PenguiFlow's own messages) -----------------


def test_a_bare_node_instead_of_an_adjacency_says_how_to_fix_it() -> None:
    a = passthrough("a")
    with pytest.raises(TypeError, match=r"node\.to\(successor, \.\.\.\).*did you mean a\.to\(\)"):
        create(a)


def test_successors_must_be_nodes() -> None:
    a = passthrough("a")
    with pytest.raises(TypeError, match=r"adjacencies built with node\.to"):
        create((a, ["b"]))


# -- FloeQueue: asyncio.Queue's contract, with each item's origin --------------------------


async def test_a_floe_queue_keeps_asyncio_queues_contract_and_each_items_origin() -> None:
    from penguiflow._graph import FloeQueue

    queue = FloeQueue(maxsize=2)
    with pytest.raises(asyncio.QueueEmpty):
        queue.get_nowait()
    getter = asyncio.ensure_future(queue.get())
    await asyncio.sleep(0)  # the getter waits on the empty queue
    queue.put_tagged_nowait("a", ("inv-a", 1.0))
    assert await getter == "a" and queue.last_origin == ("inv-a", 1.0)
    queue.put_tagged_nowait("b", ("inv-b", 2.0))
    queue.put_nowait("c")  # an untagged put: no origin
    assert queue.full() and queue.qsize() == 2
    with pytest.raises(asyncio.QueueFull):
        queue.put_nowait("d")
    putter = asyncio.ensure_future(queue.put_tagged("d", ("inv-d", 4.0)))
    await asyncio.sleep(0)
    assert not putter.done()  # waits for room
    assert queue.get_nowait() == "b" and queue.last_origin == ("inv-b", 2.0)
    await putter  # the get woke it
    assert [queue.get_nowait(), queue.last_origin] == ["c", None]
    assert [queue.get_nowait(), queue.last_origin] == ["d", ("inv-d", 4.0)]
    # join() waits for every put item's task_done(), as asyncio.Queue's does.
    joined = asyncio.ensure_future(queue.join())
    await asyncio.sleep(0)
    assert not joined.done()
    for _ in range(4):
        queue.task_done()
    await joined
    with pytest.raises(ValueError):
        queue.task_done()
    # put_tagged with room wakes a waiting getter and rings the doorbell.
    rung: list[FloeQueue] = []
    queue.doorbell = rung.append
    getter = asyncio.ensure_future(queue.get())
    await asyncio.sleep(0)
    await queue.put_tagged("e", ("inv-e", 5.0))
    assert await getter == "e" and queue.last_origin == ("inv-e", 5.0) and rung == [queue]
