"""Patterns (spec §12): map_concurrent, join_k, predicate_router, union_router.

Routers are tested twice: as units, invoked with a recording stand-in context, and end to
end in a running flow.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

import pytest
from pfcore_support import Recorder
from pydantic import BaseModel, Field, ValidationError

from penguiflow.core import PenguiFlow, create
from penguiflow.errors import FlowError
from penguiflow.node import Node, NodePolicy
from penguiflow.patterns import join_k, map_concurrent, predicate_router, union_router
from penguiflow.policies import DictRoutingPolicy, RoutingRequest
from penguiflow.types import Headers, Message

TIMEOUT = 5.0


def _msg(payload: Any = None, **kwargs: Any) -> Message:
    return Message(payload=payload, headers=Headers(tenant="acme"), **kwargs)


@asynccontextmanager
async def running(flow: PenguiFlow) -> AsyncIterator[PenguiFlow]:
    flow.run()
    try:
        yield flow
    finally:
        await flow.stop()


async def fetch(flow: PenguiFlow) -> Any:
    return await asyncio.wait_for(flow.fetch(), TIMEOUT)


def _tagger(name: str) -> Node:
    async def tag(message: Any, ctx: Any) -> Any:
        if isinstance(message, Message):
            return message.model_copy(update={"payload": f"{name}:{message.payload}"})
        return (name, message)

    return Node(tag, name=name, policy=NodePolicy(validate="none"))


class RecordingContext:
    """Stand-in for a node Context: successors in ``_outgoing``, records ``emit``."""

    def __init__(self, *successors: Node) -> None:
        self._outgoing: dict[Node, None] = dict.fromkeys(successors)
        self.emitted: list[tuple[Any, Any]] = []

    async def emit(self, msg: Any, to: Any = None) -> None:
        self.emitted.append((msg, to))


# --- map_concurrent ---------------------------------------------------------------------


class Gates:
    """Per-item futures that let a test decide when each worker call finishes."""

    def __init__(self, count: int) -> None:
        loop = asyncio.get_running_loop()
        self.futures = [loop.create_future() for _ in range(count)]
        self.started: list[int] = []
        self.active = 0
        self.max_active = 0
        self.changed = asyncio.Condition()

    async def worker(self, item: int) -> int:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        self.started.append(item)
        async with self.changed:
            self.changed.notify_all()
        try:
            return int(await self.futures[item]) * 10
        finally:
            self.active -= 1

    async def wait_started(self, count: int) -> None:
        async with self.changed:
            await asyncio.wait_for(
                self.changed.wait_for(lambda: len(self.started) >= count), TIMEOUT
            )


async def test_map_concurrent_preserves_input_order_and_bounds_concurrency() -> None:
    gates = Gates(5)
    task = asyncio.ensure_future(map_concurrent(range(5), gates.worker, max_concurrency=2))
    await gates.wait_started(2)
    assert gates.started == [0, 1]
    # Finish items out of order: results must still come back in input order.
    for index, item in enumerate([1, 0, 3, 2, 4]):
        gates.futures[item].set_result(item)
        if index + 3 <= 5:
            await gates.wait_started(index + 3)
    assert await asyncio.wait_for(task, TIMEOUT) == [0, 10, 20, 30, 40]
    assert gates.max_active == 2


@pytest.mark.parametrize("limit", [0, -3, 1])
async def test_map_concurrent_limit_below_one_means_one(limit: int) -> None:
    gates = Gates(3)
    task = asyncio.ensure_future(map_concurrent([0, 1, 2], gates.worker, max_concurrency=limit))
    for item in range(3):
        await gates.wait_started(item + 1)
        assert gates.active == 1
        gates.futures[item].set_result(item)
    assert await asyncio.wait_for(task, TIMEOUT) == [0, 10, 20]
    assert gates.max_active == 1


async def test_map_concurrent_default_limit_is_eight() -> None:
    gates = Gates(10)
    task = asyncio.ensure_future(map_concurrent(range(10), gates.worker))
    await gates.wait_started(8)
    assert gates.active == 8
    for future in gates.futures:
        future.set_result(1)
    assert await asyncio.wait_for(task, TIMEOUT) == [10] * 10
    assert gates.max_active == 8


async def test_map_concurrent_empty_and_generators() -> None:
    async def double(x: int) -> int:
        return x * 2

    assert await map_concurrent([], double) == []
    assert await map_concurrent((i for i in range(4)), double, max_concurrency=3) == [0, 2, 4, 6]


async def test_map_concurrent_first_exception_propagates_and_cancels_the_rest() -> None:
    blocked = asyncio.Event()
    cancelled: list[int] = []

    async def worker(item: int) -> int:
        if item == 0:
            try:
                blocked.set()
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.append(item)
                raise
        await asyncio.wait_for(blocked.wait(), TIMEOUT)
        raise ValueError(f"boom {item}")

    with pytest.raises(ValueError, match="boom 1"):
        await asyncio.wait_for(map_concurrent([0, 1, 2], worker, max_concurrency=2), TIMEOUT)
    assert cancelled == [0]


# --- join_k -----------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, -1])
def test_join_k_rejects_non_positive_k(k: int) -> None:
    with pytest.raises(ValueError, match="positive"):
        join_k("join", k)


def test_join_k_node_shape() -> None:
    node = join_k("join", 2)
    assert isinstance(node, Node)
    assert node.name == "join"
    assert node.policy.validate == "none"


@pytest.mark.parametrize("ending", ["cancel", "stop"])
async def test_a_join_drops_its_flows_group_at_cancel_or_stop(ending: str) -> None:
    # A group whose other input failed was kept: cancel() found nothing in flight and
    # returned False without dropping it, and stop() kept it too, so a later run of
    # the same trace id was joined with the leftover ("Afail" with "Aok").
    none = NodePolicy(validate="none")

    async def a(message: Message, ctx: Any) -> Message:
        return message.model_copy(update={"payload": f"A{message.payload}"})

    async def b(message: Message, ctx: Any) -> Message:
        if message.payload == "fail":
            raise RuntimeError("b failed")
        return message.model_copy(update={"payload": f"B{message.payload}"})

    async def src(message: Message, ctx: Any) -> Message:
        return message

    source, left, right = (Node(src, name="src", policy=none), Node(a, name="a", policy=none),
                           Node(b, name="b", policy=none))
    join = join_k("join", 2)
    recorder = Recorder()
    flow = create(source.to(left, right), left.to(join), right.to(join), join.to(),
                  emit_errors_to_rookery=True, middlewares=[recorder])
    async with running(flow):
        await flow.emit(_msg("fail", trace_id="order-42"))
        assert isinstance(await fetch(flow), FlowError)
        await recorder.wait_for("node_success", trace_id="order-42", node="join")  # held
        if ending == "cancel":
            assert await flow.cancel("order-42") is False  # nothing in flight
    async with running(flow):
        await flow.emit(_msg("ok", trace_id="order-42"))
        assert sorted((await fetch(flow)).payload) == ["Aok", "Bok"]


def _gated_join(gate: asyncio.Event, held: str, recorder: Recorder
                ) -> Callable[[], PenguiFlow]:
    """fan -> a, b -> join_k(2) -> Rookery, where b waits for ``gate`` on the payload
    ``held``: a builder of flows, every one made of these very nodes."""
    none = NodePolicy(validate="none")

    async def fan(message: Message, ctx: Any) -> Message:
        return message

    async def gated(message: Message, ctx: Any) -> Message:
        if message.payload == held:
            await gate.wait()
        return message

    fan_node, a, b = (Node(fan, name="fan", policy=none), Node(fan, name="a", policy=none),
                      Node(gated, name="b", policy=none))
    join = join_k("join", 2)
    return lambda: create(fan_node.to(a, b), a.to(join), b.to(join), join.to(),
                          middlewares=[recorder])


async def test_a_join_group_waiting_on_a_queued_input_completes_after_stop_and_run(
) -> None:
    # stop() keeps queued items for the next run(): a join's group must stay too, or
    # the input still queued starts a group of one that never completes.
    gate = asyncio.Event()
    recorder = Recorder()
    flow = _gated_join(gate, "first", recorder)()
    async with running(flow):
        await flow.emit(_msg("first", trace_id="T1"))
        await flow.emit(_msg("second", trace_id="T2"))  # its b input queues behind T1's
        await recorder.wait_for("node_success", trace_id="T2", node="join")  # a's, held
    gate.set()
    async with running(flow):  # (T1's invocation at b was cut by stop: T1 is gone)
        joined = await fetch(flow)
    assert (joined.trace_id, joined.payload) == ("T2", ["second", "second"])


async def test_a_join_node_shared_by_two_flows_keeps_their_groups_apart() -> None:
    # One join node in two flows at once (a playbook's subflows built from module-level
    # nodes): the first flow's stop() dropped the second's half-filled group as well.
    gate = asyncio.Event()
    recorder = Recorder()
    build = _gated_join(gate, "slow", recorder)
    slow, fast = build(), build()
    async with running(slow):
        await slow.emit(_msg("slow", trace_id="S"))
        await recorder.wait_for("node_success", trace_id="S", node="join")  # "slow" of a held
        async with running(fast):
            await fast.emit(_msg("fast", trace_id="F"))
            assert (await fetch(fast)).payload == ["fast", "fast"]
        gate.set()
        assert (await fetch(slow)).payload == ["slow", "slow"]


async def test_join_k_groups_messages_per_trace() -> None:
    node = join_k("join", 3)
    a1, b1 = _msg("a1"), _msg("b1")
    a2 = _msg("a2", trace_id=a1.trace_id)
    a3 = _msg("a3", trace_id=a1.trace_id)
    b2 = _msg("b2", trace_id=b1.trace_id)
    ctx = object()

    assert await node.invoke(a1, ctx, registry=None) is None
    assert await node.invoke(b1, ctx, registry=None) is None
    assert await node.invoke(a2, ctx, registry=None) is None
    assert await node.invoke(b2, ctx, registry=None) is None
    joined = await node.invoke(a3, ctx, registry=None)

    assert isinstance(joined, Message)
    assert joined.payload == ["a1", "a2", "a3"]
    assert joined.trace_id == a1.trace_id
    assert joined.headers == a1.headers
    assert a1.payload == "a1", "the first message must not be mutated"

    # The bucket was discarded: the same trace starts a fresh group.
    assert await node.invoke(_msg("a4", trace_id=a1.trace_id), ctx, registry=None) is None


async def test_join_k_with_k_one_emits_every_message() -> None:
    node = join_k("join", 1)
    message = _msg("only")
    joined = await node.invoke(message, None, registry=None)
    assert joined.payload == ["only"]
    assert joined is not message


class Traced(BaseModel):
    trace_id: str
    value: int


async def test_join_k_non_message_objects_are_listed_raw() -> None:
    node = join_k("join", 2)
    first, second = Traced(trace_id="t", value=1), Traced(trace_id="t", value=2)
    assert await node.invoke(first, None, registry=None) is None
    joined = await node.invoke(second, None, registry=None)
    assert joined == [first, second]
    assert joined[0] is first


@pytest.mark.parametrize("message", ["plain string", {"trace_id": "t"}, Traced.model_construct()])
async def test_join_k_requires_trace_id(message: Any) -> None:
    with pytest.raises(ValueError, match="trace_id"):
        await join_k("join", 2).invoke(message, None, registry=None)


async def test_join_k_in_a_fan_out_fan_in_flow() -> None:
    join = join_k("join", 2)
    left, right = _tagger("left"), _tagger("right")

    async def split(message: Message, ctx: Any) -> Message:
        return message

    start = Node(split, name="split", policy=NodePolicy(validate="none"))
    flow = create(start.to(left, right), left.to(join), right.to(join), join.to())
    message = _msg("x")
    async with running(flow):
        await flow.emit(message)
        result = await fetch(flow)
    assert isinstance(result, Message)
    assert result.trace_id == message.trace_id
    assert sorted(result.payload) == ["left:x", "right:x"]


# --- predicate_router -------------------------------------------------------------------


def test_predicate_router_node_shape() -> None:
    router = predicate_router("router", lambda message: None)
    assert isinstance(router, Node)
    assert router.name == "router"
    assert router.policy.validate == "none"


async def test_predicate_router_resolves_nodes_names_and_sequences() -> None:
    a, b = _tagger("a"), _tagger("b")
    decisions: list[Any] = [a, "b", ["a", b], ("b", "b", "a"), []]
    router = predicate_router("router", lambda message: decisions.pop(0))
    ctx = RecordingContext(a, b)
    for _ in range(5):
        assert await router.invoke("m", ctx, registry=None) is None
    assert ctx.emitted == [("m", [a]), ("m", [b]), ("m", [a, b]), ("m", [b, a])]


async def test_predicate_router_none_drops() -> None:
    ctx = RecordingContext(_tagger("a"))
    router = predicate_router("router", lambda message: None)
    assert await router.invoke("m", ctx, registry=None) is None
    assert ctx.emitted == []


async def test_predicate_router_accepts_async_predicate() -> None:
    a = _tagger("a")

    async def predicate(message: Any) -> str:
        return "a"

    ctx = RecordingContext(a)
    await predicate_router("router", predicate).invoke("m", ctx, registry=None)
    assert ctx.emitted == [("m", [a])]


async def test_predicate_router_unknown_successor_name() -> None:
    router = predicate_router("router", lambda message: ["a", "ghost"])
    ctx = RecordingContext(_tagger("a"))
    with pytest.raises(KeyError, match="No successor named 'ghost'"):
        await router.invoke("m", ctx, registry=None)
    assert ctx.emitted == []


@pytest.mark.parametrize("decision", [42, [_tagger("a"), 3.5], [None]])
async def test_predicate_router_rejects_non_node_non_str(decision: Any) -> None:
    router = predicate_router("router", lambda message: decision)
    with pytest.raises(TypeError, match="Node or str"):
        await router.invoke("m", RecordingContext(_tagger("a")), registry=None)


async def test_predicate_router_policy_sees_request_and_overrides() -> None:
    a, b = _tagger("a"), _tagger("b")
    seen: list[RoutingRequest] = []

    def policy(request: RoutingRequest) -> str:
        seen.append(request)
        return "b"

    router = predicate_router("router", lambda message: "a", policy=policy)
    ctx = RecordingContext(a, b)
    message = _msg("m")
    await router.invoke(message, ctx, registry=None)

    assert ctx.emitted == [(message, [b])]
    (request,) = seen
    assert request.message is message
    assert request.context is ctx
    assert request.node is router
    assert request.proposed == (a,)
    assert request.trace_id == message.trace_id


async def test_predicate_router_policy_none_drops_and_trace_id_may_be_missing() -> None:
    class Dropper:
        def __init__(self) -> None:
            self.requests: list[RoutingRequest] = []

        async def select(self, request: RoutingRequest) -> None:
            self.requests.append(request)

    policy = Dropper()
    router = predicate_router("router", lambda message: ["a"], policy=policy)
    ctx = RecordingContext(_tagger("a"))
    await router.invoke("no trace", ctx, registry=None)
    assert ctx.emitted == []
    assert policy.requests[0].trace_id is None


async def test_predicate_router_policy_decision_is_validated() -> None:
    router = predicate_router("router", lambda message: "a", policy=lambda request: "ghost")
    with pytest.raises(KeyError, match="No successor named 'ghost'"):
        await router.invoke("m", RecordingContext(_tagger("a")), registry=None)


async def test_predicate_router_in_a_flow_forwards_original_message() -> None:
    low, high = _tagger("low"), _tagger("high")
    router = predicate_router("router", lambda m: "high" if m.payload > 10 else "low")
    flow = create(router.to(low, high), low.to(), high.to())
    small, big = _msg(1), _msg(99)
    async with running(flow):
        await flow.emit(small)
        first = await fetch(flow)
        await flow.emit(big)
        second = await fetch(flow)
    assert (first.payload, first.trace_id) == ("low:1", small.trace_id)
    assert (second.payload, second.trace_id) == ("high:99", big.trace_id)


async def test_predicate_router_in_a_flow_drops_in_order() -> None:
    sink = _tagger("sink")
    router = predicate_router("router", lambda m: None if m.payload == "drop" else "sink")
    flow = create(router.to(sink), sink.to())
    dropped, kept = _msg("drop"), _msg("keep")
    async with running(flow):
        await flow.emit(dropped)
        await flow.emit(kept)
        # The router handles messages one at a time in order, so the first item to reach
        # Rookery proves the dropped message went nowhere.
        result = await fetch(flow)
    assert (result.payload, result.trace_id) == ("sink:keep", kept.trace_id)


async def test_predicate_router_with_dict_policy_in_a_flow() -> None:
    a, b = _tagger("a"), _tagger("b")
    routed = _msg("x")
    policy = DictRoutingPolicy({routed.trace_id: "b"}, default="a")
    router = predicate_router("router", lambda m: ["a", "b"], policy=policy)
    flow = create(router.to(a, b), a.to(), b.to())
    other = _msg("y")
    async with running(flow):
        await flow.emit(routed)
        first = await fetch(flow)
        await flow.emit(other)
        second = await fetch(flow)
    assert first.payload == "b:x"
    assert second.payload == "a:y"


async def test_predicate_router_unknown_name_is_a_node_error_in_a_flow() -> None:
    sink = _tagger("sink")
    router = predicate_router("router", lambda m: "ghost")
    flow = create(router.to(sink), sink.to(), emit_errors_to_rookery=True)
    message = _msg("x")
    async with running(flow):
        await flow.emit(message)
        error = await fetch(flow)
    assert isinstance(error, FlowError)
    assert error.node_name == "router"
    assert error.trace_id == message.trace_id
    assert isinstance(error.unwrap(), KeyError)
    assert "No successor named 'ghost'" in str(error.unwrap())


# --- union_router -----------------------------------------------------------------------


class Search(BaseModel):
    kind: Literal["search"] = "search"
    query: str


class Answer(BaseModel):
    kind: Literal["answer"] = "answer"
    text: str


Action = Annotated[Search | Answer, Field(discriminator="kind")]


class Ping(BaseModel):
    ping: int


class Pong(BaseModel):
    pong: int


def test_union_router_node_shape() -> None:
    router = union_router("router", Action)
    assert isinstance(router, Node)
    assert router.name == "router"
    assert router.policy.validate == "none"


async def test_union_router_routes_validated_object_by_kind() -> None:
    search, answer = _tagger("search"), _tagger("answer")
    router = union_router("router", Action)
    ctx = RecordingContext(search, answer)
    await router.invoke({"kind": "answer", "text": "hi"}, ctx, registry=None)
    await router.invoke(Search(query="q"), ctx, registry=None)
    assert ctx.emitted == [(Answer(text="hi"), [answer]), (Search(query="q"), [search])]
    assert isinstance(ctx.emitted[0][0], Answer)


async def test_union_router_routes_by_class_name_without_kind() -> None:
    ping, pong = _tagger("Ping"), _tagger("Pong")
    router = union_router("router", Ping | Pong)
    ctx = RecordingContext(ping, pong)
    await router.invoke({"pong": 2}, ctx, registry=None)
    assert ctx.emitted == [(Pong(pong=2), [pong])]


async def test_union_router_validation_error() -> None:
    router = union_router("router", Action)
    with pytest.raises(ValidationError):
        await router.invoke({"kind": "unknown"}, RecordingContext(), registry=None)


async def test_union_router_missing_successor() -> None:
    router = union_router("router", Action)
    with pytest.raises(KeyError, match="No successor named 'answer'"):
        await router.invoke({"kind": "answer", "text": "x"}, RecordingContext(), registry=None)


async def test_union_router_policy_gets_validated_object() -> None:
    search, answer = _tagger("search"), _tagger("answer")
    seen: list[RoutingRequest] = []

    async def policy(request: RoutingRequest) -> Sequence[str] | None:
        seen.append(request)
        return None if isinstance(request.message, Answer) else ["answer", "search"]

    router = union_router("router", Action, policy=policy)
    ctx = RecordingContext(search, answer)
    await router.invoke({"kind": "search", "query": "q"}, ctx, registry=None)
    await router.invoke({"kind": "answer", "text": "t"}, ctx, registry=None)
    assert ctx.emitted == [(Search(query="q"), [answer, search])]
    assert [request.proposed for request in seen] == [(search,), (answer,)]
    assert seen[0].message == Search(query="q")
    assert seen[0].node is router
    assert seen[0].trace_id is None


async def test_union_router_in_a_flow() -> None:
    search, answer = _tagger("search"), _tagger("answer")
    router = union_router("router", Action)
    flow = create(router.to(search, answer), search.to(), answer.to())
    async with running(flow):
        await flow.emit({"kind": "search", "query": "penguins"})
        result = await fetch(flow)
    assert result == ("search", Search(query="penguins"))
