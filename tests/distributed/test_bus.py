"""RedisMessageBus and the binding, in one process (two flows = two "processes").

Faster than real processes, and able to reach inside: capacity, duplicates,
poison entries, joins under redelivery, cancels, misuse and an unreachable Redis.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

import dist_flows
import pytest
import redis.asyncio as aioredis
from dist_support import RedisServer, SilentProxy, cut_links, eventually, free_port, named

from penguiflow import Headers, Message, Node, NodePolicy, create
from penguiflow.binding import Parcel, is_delivering
from penguiflow.bus import InMemoryMessageBus
from penguiflow.core import PenguiFlow
from penguiflow.errors import (
    ConfigurationError,
    FlowNotRunning,
    InvalidArgument,
    WireEncodingError,
)
from penguiflow.state import InMemoryStateStore
from penguiflow.wire import dumps_item
from penguiflow_distributed import RedisMessageBus

NONE = NodePolicy(validate="none")


class Pair:
    """A client flow (no nodes) and a worker flow (every node) on one Redis."""

    def __init__(self, build: Any, url: str, namespace: str, **bus: Any) -> None:
        self.client, self.worker = build(), build()
        self.client_bus = RedisMessageBus(url, namespace=namespace, **bus)
        self.worker_bus = RedisMessageBus(url, namespace=namespace, **bus)

    async def start(self, *, worker: bool = True, **run: Any) -> Pair:
        if worker:
            self.worker.run(message_bus=self.worker_bus, **run)
            await self.worker_bus.ready()
        self.client.run(message_bus=self.client_bus, nodes=[])
        await self.client_bus.ready()
        return self

    async def stop(self) -> None:
        await self.client.stop()
        await self.worker.stop()


def msg(payload: Any, trace_id: str | None = None, **meta: Any) -> Message:
    extra = {} if trace_id is None else {"trace_id": trace_id}
    return Message(payload=payload, headers=Headers(tenant="t"), meta=meta, **extra)


# -- the surface -----------------------------------------------------------------------


def test_the_redis_bus_delivers_and_the_2_1_buses_only_publish() -> None:
    assert is_delivering(RedisMessageBus())
    assert not is_delivering(InMemoryMessageBus())


def test_every_keyword_can_ride_on_the_url() -> None:
    bus = RedisMessageBus.from_url(
        "redis://u:secret@h:6380/2?namespace=shop&claim_idle_s=2.5&prefetch=4&socket_timeout=3")
    assert (bus.namespace, bus.claim_idle_s, bus.prefetch) == ("shop", 2.5, 4)
    # redis-py's own options stay on the URL; the password never shows.
    assert bus.url == "redis://u:secret@h:6380/2?socket_timeout=3"
    assert "secret" not in repr(bus) and "***" in repr(bus)
    assert RedisMessageBus.from_url("redis://h/0?namespace=a", namespace="b").namespace == "b"


@pytest.mark.parametrize("url", [
    "redis://h:6379/0?password=s3cret&namespace=shop",  # redis-py takes it as the password
    "redis://u:s3cret@h:6379/0?ssl_password=s3cret",
    "rediss://h/0?socket_timeout=3&Password=s3cret",
])
def test_a_password_in_the_url_query_never_shows(url: str) -> None:
    bus = RedisMessageBus.from_url(url)
    assert "s3cret" not in repr(bus) and "***" in repr(bus)
    with pytest.raises(InvalidArgument, match="starts with redis://") as info:
        RedisMessageBus.from_url(url.replace("redis", "http", 1))
    assert "s3cret" not in str(info.value)


def test_a_ttl_out_of_redis_range_on_the_url_is_refused_naming_it() -> None:
    with pytest.raises(InvalidArgument, match="dedup_ttl_s must be from 1 second"):
        RedisMessageBus.from_url("redis://h/0?dedup_ttl_s=inf")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"claim_idle_s": 0}, r"claim_idle_s must be > 0 and at most 1e\+15 seconds; got 0"),
    ({"claim_idle_s": math.inf}, "claim_idle_s must be > 0 and at most 1e"),
    ({"link_timeout_s": math.nan}, "link_timeout_s must be > 0 and at most 1e"),
    ({"prefetch": 0}, "block_ms, prefetch and max_deliveries must be >= 1"),
    ({"max_deliveries": 0}, "max_deliveries=0"),
    ({"reply_ttl_s": -1}, "reply_ttl_s must be from 1 second"),
    ({"dedup_ttl_s": 0.5}, r"dedup_ttl_s must be from 1 second \(a Redis TTL\) to 1e\+15 "
                           r"seconds \(Redis's expiry limit\); got 0.5"),
    # Before: an OverflowError traceback (inf), or accepted and every send then
    # refused by Redis ("invalid expire time").
    ({"dedup_ttl_s": math.inf}, "dedup_ttl_s must be from 1 second .*; got inf"),
    ({"join_ttl_s": 1e18}, r"join_ttl_s must be from 1 second .*; got 1e\+18"),
    ({"reply_ttl_s": math.nan}, "reply_ttl_s must be from 1 second .*; got nan"),
    ({"namespace": "a:b"}, "namespace must be a non-empty name without ':'"),
])
def test_bad_bus_options_are_refused_with_what_to_fix(kwargs: dict[str, Any],
                                                     message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        RedisMessageBus(**kwargs)


async def test_nodes_needs_a_delivering_bus_and_names_real_nodes() -> None:
    flow = dist_flows.chain()
    with pytest.raises(ConfigurationError, match="nodes= needs a delivering message bus"):
        flow.run(nodes=["a"])
    with pytest.raises(ConfigurationError, match="nodes= needs a delivering message bus"):
        flow.run(message_bus=InMemoryMessageBus(), nodes=[])
    with pytest.raises(ConfigurationError, match=r"names no node of this flow: 'x'") as info:
        flow.run(message_bus=RedisMessageBus(), nodes=["a", "x"])
    assert info.value.hint == "the flow's nodes are a, b, c, d, e"
    with pytest.raises(TypeError, match="nodes must be a list of node names, not a str"):
        flow.run(message_bus=RedisMessageBus(), nodes="a")
    assert not flow.running


# -- delivery ------------------------------------------------------------------------


async def test_an_edge_holds_at_most_queue_maxsize_entries(
        redis_url: str, namespace: str, redis: Any) -> None:
    def build() -> PenguiFlow:
        async def sink(m: Message, ctx: Any) -> Message:
            return m
        return create(Node(sink, name="sink", policy=NONE).to(), queue_maxsize=3,
                      name="bounded")

    pair = await Pair(build, redis_url, namespace).start(worker=False)  # nobody consumes
    try:
        for i in range(3):
            await pair.client.emit(msg(i))
        blocked = asyncio.ensure_future(pair.client.emit(msg(3)))
        done, _ = await asyncio.wait([blocked], timeout=0.3)
        assert not done and pair.client_bus.stats["full_waits"] > 0
        assert await redis.xlen(f"{namespace}:bounded:edge:OpenSea->sink") == 3
        # A consumer frees room: the waiting emit goes through, and all four arrive.
        pair.worker.run(message_bus=pair.worker_bus)
        await blocked
        got = sorted([(await asyncio.wait_for(pair.client.fetch(), 10)).payload
                      for _ in range(4)])
        assert got == [0, 1, 2, 3]
    finally:
        await pair.stop()


def _nowait_flow() -> PenguiFlow:
    """a forwards with emit_nowait (and returns nothing) to b; edges hold one entry."""
    async def a(m: Message, ctx: Any) -> None:
        ctx.emit_nowait(m)

    async def b(m: Message, ctx: Any) -> Message:
        return m
    nb = Node(b, name="b", policy=NONE)
    return create(Node(a, name="a", policy=NONE).to(nb), nb.to(), queue_maxsize=1,
                  name="nowait")


async def test_an_input_is_settled_only_once_its_emit_nowait_output_is_sent(
        redis_url: str, namespace: str, redis: Any) -> None:
    pair = await Pair(_nowait_flow, redis_url, namespace).start(nodes=["a"])
    consumer = _nowait_flow()
    try:
        binding = pair.worker.binding
        assert binding is not None
        await pair.client.emit(msg(1))  # forwarded: a->b now holds its one entry
        await eventually(lambda: binding.stats["settled"] == 1, "the first input settled")
        await pair.client.emit(msg(2))  # its forward waits for room on a->b
        await eventually(lambda: pair.worker_bus.stats["full_waits"] >= 5,
                         "the second forward waiting for room")
        # The node returned long ago, but its output is not on its edge: the input
        # stays unsettled (a crash now redelivers it; before, it was acknowledged
        # and the output lost with the process).
        assert binding.stats["settled"] == 1
        pending = await redis.xpending(f"{namespace}:nowait:edge:OpenSea->a", "pf")
        assert pending["pending"] == 1
        # b starts consuming: the forward goes through, then the input is settled.
        consumer.run(message_bus=RedisMessageBus(redis_url, namespace=namespace),
                     nodes=["b"])
        got = sorted([(await asyncio.wait_for(pair.client.fetch(), 10)).payload
                      for _ in range(2)])
        assert got == [1, 2]
        await eventually(lambda: binding.stats["settled"] == 2, "the second input settled")
    finally:
        await consumer.stop()
        await pair.stop()


async def test_a_large_emit_nowait_fan_out_arrives_in_order_without_draining_the_pool(
        redis_url: str, namespace: str, caplog: pytest.LogCaptureFixture) -> None:
    count = 300  # more than redis-py's pool holds (100): one send task each ran dry
    seen: list[int] = []

    def build() -> PenguiFlow:
        async def fan(m: Message, ctx: Any) -> None:
            for i in range(count):
                ctx.emit_nowait(m.model_copy(update={"payload": i}))

        async def sink(m: Message, ctx: Any) -> None:
            seen.append(m.payload)
        to = Node(sink, name="sink", policy=NONE)
        return create(Node(fan, name="fan", policy=NONE).to(to), to.to(), name="fanout")

    pair = await Pair(build, redis_url, namespace).start()
    try:
        with caplog.at_level(logging.WARNING, logger="penguiflow_distributed"):
            await pair.client.emit(msg("go"))
            await eventually(lambda: len(seen) == count, f"{count} items at the sink")
        # Before: dozens out of order, and hundreds of MaxConnectionsError retried
        # as "Redis unreachable".
        assert seen == list(range(count))
        assert pair.worker_bus.stats["link_errors"] == 0
        assert "bus_redis_unreachable" not in [r.getMessage() for r in caplog.records]
    finally:
        await pair.stop()


async def test_emit_nowait_refuses_an_unencodable_payload_at_once(
        redis_url: str, namespace: str) -> None:
    seen: list[BaseException] = []

    def build() -> PenguiFlow:
        async def a(m: Message, ctx: Any) -> None:
            try:
                ctx.emit_nowait(m.model_copy(update={"payload": object()}))
            except WireEncodingError as exc:
                seen.append(exc)
            ctx.emit_nowait(m)

        async def b(m: Message, ctx: Any) -> Message:
            return m
        nb = Node(b, name="b", policy=NONE)
        return create(Node(a, name="a", policy=NONE).to(nb), nb.to(), name="nowait2")

    pair = await Pair(build, redis_url, namespace).start()
    try:
        await pair.client.emit(msg("ok"))
        assert (await asyncio.wait_for(pair.client.fetch(), 10)).payload == "ok"
        assert len(seen) == 1 and "on edge 'a->b'" in str(seen[0])
        assert pair.worker.binding is not None
        assert pair.worker.binding.stats["send_failures"] == 0
    finally:
        await pair.stop()


async def test_an_emit_nowait_send_redis_refuses_is_logged_counted_and_settled(
        redis_url: str, namespace: str, redis: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    # A plain string where a->b's stream should be: Redis refuses the send (WRONGTYPE).
    await redis.set(f"{namespace}:nowait:edge:a->b", "not a stream")
    pair = await Pair(_nowait_flow, redis_url, namespace).start(nodes=["a"])
    try:
        binding = pair.worker.binding
        assert binding is not None
        with caplog.at_level(logging.ERROR, logger="penguiflow.binding"):
            await pair.client.emit(msg(1))
            await eventually(lambda: binding.stats["settled"] == 1, "the input settled")
        assert binding.stats["send_failures"] == 1
        failed = [r for r in caplog.records if r.getMessage() == "bus_send_failed"]
        assert len(failed) == 1 and "WRONGTYPE" in failed[0].error  # type: ignore[attr-defined]
        # Settled, not held for ever: running the node again could not send it either.
        pending = await redis.xpending(f"{namespace}:nowait:edge:OpenSea->a", "pf")
        assert pending["pending"] == 0
    finally:
        await pair.stop()


async def test_a_complete_join_group_does_not_outlive_its_output(
        namespace: str, redis: Any) -> None:
    from penguiflow_distributed import _scripts

    items, members = f"{namespace}:join:g:items", f"{namespace}:join:g:members"

    async def gather(member: str, data: str) -> list[Any]:
        return list(await redis.eval(_scripts.GATHER, 2, items, members, member, data,
                                     2, 100))

    assert await gather("A", "a") == [0, 1]
    await redis.expire(items, 50)
    await redis.expire(members, 50)
    assert await gather("B", "b") == [1, 1, b"a", b"b"]  # grew: its TTL starts again
    assert 90 < await redis.ttl(items) <= 100 and 90 < await redis.ttl(members) <= 100
    # Time passes; then a late redelivery of A, and an input past k: the group answers
    # the same, but its TTL runs on (refreshed, it outlived its output's hop key and a
    # later arrival sent the joined message a second time).
    await redis.expire(items, 30)
    await redis.expire(members, 30)
    assert await gather("A", "a") == [1, 0, b"a", b"b"]
    assert await gather("C", "c") == [1, 1, b"a", b"b"]
    assert await redis.ttl(items) <= 30 and await redis.ttl(members) <= 30
    assert await redis.lrange(items, 0, -1) == [b"a", b"b"]


async def test_a_parcel_sent_twice_is_delivered_once(
        redis_url: str, namespace: str) -> None:
    pair = await Pair(dist_flows.chain, redis_url, namespace).start(worker=False)
    try:
        binding = pair.client.binding
        assert binding is not None
        from penguiflow.wire import dumps_item

        item = msg("x:")
        parcel = Parcel("OpenSea->a", dumps_item(item), item.trace_id, binding.worker_id,
                        "hop-1", None, 1.0, None)
        assert await pair.client_bus.send(parcel, maxsize=0) is not None
        assert await pair.client_bus.send(parcel, maxsize=0) is None  # the same hop
        assert pair.client_bus.stats["duplicates"] == 1
        pair.worker.run(message_bus=pair.worker_bus)
        assert (await asyncio.wait_for(pair.client.fetch(), 10)).payload == "x:abcde"
        with pytest.raises(asyncio.QueueEmpty):
            pair.client.fetch_nowait()
    finally:
        await pair.stop()


async def test_a_poison_entry_is_dropped_counted_and_the_flow_goes_on(
        redis_url: str, namespace: str, redis: Any, caplog: pytest.LogCaptureFixture) -> None:
    store = InMemoryStateStore()
    pair = Pair(dist_flows.chain, redis_url, namespace)
    pair.worker.run(message_bus=pair.worker_bus, state_store=store)
    await pair.worker_bus.ready()
    await pair.start(worker=False)
    stream = f"{namespace}:chain:edge:OpenSea->a"
    try:
        with caplog.at_level(logging.ERROR):
            await redis.xadd(stream, {b"junk": b"\x00\xff"})  # not a parcel at all
            await redis.xadd(stream, {b"e": b"OpenSea->a", b"d": b"{not json", b"t": b"tp",
                                      b"m": b"w h1 - 1.0 -"})  # its item is not JSON
            await pair.client.emit(msg("ok:"))
            assert (await asyncio.wait_for(pair.client.fetch(), 10)).payload == "ok:abcde"
        assert pair.worker_bus.stats["undecodable"] == 1
        binding = pair.worker.binding
        assert binding is not None and binding.stats["undeliverable"] == 1
        # Settles are flushed by a task of their own, after the result may be fetched.
        await eventually(lambda: not any(pair.worker_bus._in_hand.values()),
                         "every entry taken was settled")
        assert await redis.xlen(stream) == 0  # both settled: never delivered again
        assert {"bus_entry_undecodable", "message_undeliverable"} <= {
            r.getMessage() for r in caplog.records}
        kinds = [e.kind for e in await store.load_history("tp")]
        assert kinds == ["message_undeliverable"]
    finally:
        await pair.stop()


async def test_a_hostile_entry_that_decodes_yet_breaks_delivery_loses_only_itself(
        redis_url: str, namespace: str, redis: Any) -> None:
    # Both decode to an item; the first's FlowError has a trace id that is not text
    # (it killed the edge's reader), the second names an edge its stream does not
    # carry (held for ever, on a queue no node here takes from).
    pair = Pair(dist_flows.chain, redis_url, namespace)
    pair.worker.run(message_bus=pair.worker_bus, nodes=["a", "b"])
    other = dist_flows.chain()
    other_bus = RedisMessageBus(redis_url, namespace=namespace)
    other.run(message_bus=other_bus, nodes=["c", "d", "e"])
    await pair.worker_bus.ready()
    await other_bus.ready()
    await pair.start(worker=False)
    first = f"{namespace}:chain:edge:OpenSea->a"
    second = f"{namespace}:chain:edge:a->b"
    try:
        await redis.xadd(first, {
            b"e": b"OpenSea->a", b"t": b"", b"m": b"x h1 - 1.0 -",
            b"d": b'{"e": {"trace_id": [1], "code": "X", "message": "m"}}'})
        for i in range(3):
            await redis.xadd(second, {b"e": b"c->d", b"d": dumps_item(msg("bad", "bad")),
                                      b"t": b"bad", b"m": f"x h{i} - 1.0 -".encode()})
        for n in range(3):  # both edges still carry every message
            await pair.client.emit(msg(f"ok{n}:"))
            assert (await asyncio.wait_for(pair.client.fetch(), 10)).payload == f"ok{n}:abcde"
        binding = pair.worker.binding
        assert binding is not None and binding.stats["undeliverable"] == 4
        await eventually(lambda: not any(pair.worker_bus._in_hand.values()),
                         "every entry taken was settled")
        assert await redis.xlen(first) == 0 and await redis.xlen(second) == 0
    finally:
        await other.stop()
        await pair.stop()


async def test_a_bad_cancel_entry_does_not_stop_a_process_from_starting(
        redis_url: str, namespace: str, redis: Any, caplog: pytest.LogCaptureFixture) -> None:
    await redis.xadd(f"{namespace}:chain:control", {b"cancel": b"\xff\xfe not utf-8"})
    with caplog.at_level(logging.ERROR):
        pair = await asyncio.wait_for(Pair(dist_flows.chain, redis_url, namespace).start(), 10)
    try:
        await pair.client.emit(msg("ok:"))
        assert (await asyncio.wait_for(pair.client.fetch(), 10)).payload == "ok:abcde"
        assert "bus_cancel_failed" in {r.getMessage() for r in caplog.records}
    finally:
        await pair.stop()


async def test_a_plain_result_over_the_bus_names_its_trace_as_in_one_process(
        redis_url: str, namespace: str) -> None:
    def build() -> PenguiFlow:
        async def answer(m: Message, ctx: Any) -> dict[str, str]:
            return {"answer": m.payload}
        return create(Node(answer, name="answer", policy=NONE).to(), name="plain")

    pair = await Pair(build, redis_url, namespace).start()
    try:
        await pair.client.emit(msg("x", "T-bus"))
        got = await asyncio.wait_for(pair.client.fetch_traced(), 10)
        assert got == ("T-bus", {"answer": "x"})
    finally:
        await pair.stop()


async def test_a_cancel_while_the_fetch_event_is_recorded_still_stops_the_trace(
        redis_url: str, namespace: str) -> None:
    # The worker records message_fetch through a middleware that holds it until the
    # client's cancel has reached the worker: the node must not run the trace.
    ran: list[str] = []
    cancel_seen = asyncio.Event()
    holding = asyncio.Event()

    async def hold(event: Any) -> None:
        if event.event_type == "message_fetch" and event.trace_id == "T1":
            holding.set()
            await cancel_seen.wait()

    def build() -> PenguiFlow:
        async def a(m: Message, ctx: Any) -> Message:
            ran.append(m.trace_id)
            return m
        return create(Node(a, name="a", policy=NONE).to(), name="held")

    pair = Pair(build, redis_url, namespace)
    pair.worker.add_middleware(hold)
    await pair.start()
    try:
        await pair.client.emit(msg("x", "T1"))
        await asyncio.wait_for(holding.wait(), 10)
        assert await pair.client.cancel("T1")
        binding = pair.worker.binding
        assert binding is not None
        await eventually(lambda: binding.is_cancelled("T1"), "the cancel reached the worker")
        cancel_seen.set()
        await eventually(lambda: binding.stats["cancel_drops"] == 1, "the parcel dropped")
        await pair.client.emit(msg("y", "T2"))  # the worker goes on with the next trace
        assert (await asyncio.wait_for(pair.client.fetch(), 10)).payload == "y"
        assert ran == ["T2"]
    finally:
        await pair.stop()


class _UnreadableStore(InMemoryStateStore):
    async def load_history(self, trace_id: str) -> list[Any]:
        raise OSError("the database went away")


async def _first_worker_and_client(build: Any, url: str, namespace: str, store: Any
                                   ) -> tuple[PenguiFlow, PenguiFlow, RedisMessageBus, PenguiFlow]:
    """Worker 1 and a client running on one Redis (entries claimable after 0.3 s), and
    worker 2 built with its bus, not yet running: it takes over once worker 1 stops."""
    first, second, client = build(), build(), build()
    first_bus, second_bus, client_bus = (
        RedisMessageBus(url, namespace=namespace, claim_idle_s=0.3) for _ in range(3))
    first.run(message_bus=first_bus, state_store=store)
    client.run(message_bus=client_bus, nodes=[])
    await first_bus.ready()
    await client_bus.ready()
    return first, second, second_bus, client


@pytest.mark.parametrize("readable", [True, False])
async def test_an_attempt_of_a_stopped_worker_is_closed_by_the_one_that_ran_it_again(
        redis_url: str, namespace: str, readable: bool,
        caplog: pytest.LogCaptureFixture) -> None:
    # Worker 1 starts `a` on the trace's input and stops mid-node without settling
    # it (as a killed process would); worker 2 claims the input and runs `a` again.
    # The first attempt never ends where it ran: worker 2 records that it was
    # abandoned, so the trace does not show as running for ever.
    store = InMemoryStateStore() if readable else _UnreadableStore()
    started = asyncio.Event()

    def build() -> PenguiFlow:
        async def a(m: Message, ctx: Any) -> Message:
            if not started.is_set():
                started.set()
                await asyncio.Event().wait()  # the first attempt never ends
            return m
        return create(Node(a, name="a", policy=NONE).to(), name="abandon")

    first, second, second_bus, client = await _first_worker_and_client(
        build, redis_url, namespace, store)
    try:
        await client.emit(msg("x", "T-ab"))
        await asyncio.wait_for(started.wait(), 10)
        first_id = first.binding.worker_id if first.binding else None
        await first.stop()  # holds the entry unsettled: claimable after 0.3 s
        with caplog.at_level(logging.WARNING):
            second.run(message_bus=second_bus, state_store=store)
            assert (await asyncio.wait_for(client.fetch(), 10)).payload == "x"
            binding = second.binding
            assert binding is not None
            await second.stop()  # awaits the background close
        history = await InMemoryStateStore.load_history(store, "T-ab")
        starts = [e for e in history if e.kind == "node_start"]
        assert len(starts) == 2 and starts[0].flow_id == first_id
        closed = [e for e in history if e.kind == "node_abandoned"]
        [summary] = [t for t in await store.list_traces() if t.trace_id == "T-ab"]
        if readable:
            assert [(e.invocation_id, e.node_name, e.flow_id) for e in closed] == [
                (starts[0].invocation_id, "a", binding.worker_id)]
            assert closed[0].payload["worker_id"] == first_id
            assert binding.stats["abandoned"] == 1 and summary.status == "succeeded"
        else:  # logged, the attempt left open, the flow unharmed
            assert closed == [] and summary.status == "running"
            assert "bus_abandoned_lookup_failed" in {r.getMessage() for r in caplog.records}
    finally:
        await client.stop()
        await second.stop()
        await first.stop()


async def test_a_delivery_given_up_while_waiting_leaves_other_counts_alone(
        redis_url: str, namespace: str) -> None:
    # A parcel whose header names trace T but whose item is a plain value (no trace
    # of its own: a foreign writer) counts nothing when delivered; if its delivery
    # is given up while the floe is full, T's own count must stay as it was, or T
    # would look drained while its message is still in the node (a cancel would
    # find nothing to stop).
    release = asyncio.Event()
    holding = asyncio.Event()

    def build() -> PenguiFlow:
        async def a(m: Any, ctx: Any) -> Any:
            holding.set()
            await release.wait()
            return m
        return create(Node(a, name="a", policy=NONE).to(), name="gave-up", queue_maxsize=1)

    pair = Pair(build, redis_url, namespace)
    await pair.start()
    binding = pair.worker.binding
    assert binding is not None
    try:
        await pair.client.emit(msg("held", "T-real"))
        await asyncio.wait_for(holding.wait(), 10)
        # Fill the local floe by hand (the broker would hold a second emit back).
        fills = msg("fills", "T-other")
        await binding.deliver(Parcel("OpenSea->a", dumps_item(fills), "T-other",
                                     binding.worker_id, "hop-fills", None, time.time(), None),
                              handle=None)
        parcel = Parcel("OpenSea->a", dumps_item("plain"), "T-real", binding.worker_id,
                        "hop-foreign", None, time.time(), None)
        delivery = asyncio.ensure_future(binding.deliver(parcel, handle=None))
        await asyncio.sleep(0)  # it is waiting on the full floe: give it up
        delivery.cancel()
        with pytest.raises(asyncio.CancelledError):
            await delivery
        assert pair.worker._rt.traces["T-real"].pending == 1
        assert await pair.worker.cancel("T-real")  # still found running, and stopped
    finally:
        release.set()
        await pair.stop()


async def test_a_fan_out_claimed_together_closes_the_stopped_attempt_once(
        redis_url: str, namespace: str) -> None:
    # `a` sends three parcels to `b`: all three share `a`'s invocation as parent.
    # Worker 1 starts `b` on the first and stops; worker 2 claims all three. Each
    # claim finds the same open attempt; it is closed once, not once per parcel
    # (three node_abandoned would leave the trace's open count negative).
    store = InMemoryStateStore()
    started = asyncio.Event()

    def build() -> PenguiFlow:
        async def a(m: Message, ctx: Any) -> None:
            for i in range(3):
                await ctx.emit(m.model_copy(update={"payload": f"{m.payload}{i}"}))

        async def b(m: Message, ctx: Any) -> Message:
            if not started.is_set():
                started.set()
                await asyncio.Event().wait()  # the first attempt never ends
            return m

        na, nb = Node(a, name="a", policy=NONE), Node(b, name="b", policy=NONE)
        return create(na.to(nb), nb.to(), name="fan-abandon")

    first, second, second_bus, client = await _first_worker_and_client(
        build, redis_url, namespace, store)
    a_ended = asyncio.Event()

    async def watch() -> None:
        async for event in store.follow("T-fan"):
            if event.kind == "node_success" and event.node_name == "a":
                a_ended.set()
                return

    # Registered before any event of the trace is stored (the emit goes through Redis).
    watcher = asyncio.create_task(watch())
    try:
        await client.emit(msg("x", "T-fan"))
        await asyncio.wait_for(started.wait(), 10)
        # `a` may still be emitting its third parcel when `b` starts on the first:
        # stopped then, its attempt is open too, and rightly closed as abandoned.
        await asyncio.wait_for(a_ended.wait(), 10)
        await first.stop()
        second.run(message_bus=second_bus, state_store=store)
        got = sorted([(await asyncio.wait_for(client.fetch(), 10)).payload for _ in range(3)])
        assert got == ["x0", "x1", "x2"]
        binding = second.binding
        assert binding is not None
        await second.stop()  # awaits the background closes
        history = await InMemoryStateStore.load_history(store, "T-fan")
        b_starts = [e for e in history if e.kind == "node_start" and e.node_name == "b"]
        closed = [e for e in history if e.kind == "node_abandoned"]
        assert [e.invocation_id for e in closed] == [b_starts[0].invocation_id]
        assert binding.stats["abandoned"] == 1
        [summary] = [t for t in await store.list_traces() if t.trace_id == "T-fan"]
        assert summary.status == "succeeded"
    finally:
        watcher.cancel()
        await client.stop()
        await second.stop()
        await first.stop()


async def test_redis_refusing_writes_for_a_while_holds_the_input_and_loses_nothing(
        own_redis: RedisServer, namespace: str) -> None:
    # Out of memory under noeviction (the guide's advice) or a replica after a
    # failover answers writes with an error for a while: the node's output send
    # waits it out instead of failing the node, whose input would then be
    # acknowledged with nothing on its edge: the trace lost.
    release = asyncio.Event()

    def build() -> PenguiFlow:
        async def a(m: Message, ctx: Any) -> Message:
            await release.wait()
            return m.model_copy(update={"payload": m.payload + "a"})
        return create(Node(a, name="a", policy=NONE).to(), name="oom")

    pair = await Pair(build, own_redis.url, namespace, max_backoff_s=0.05).start()
    redis = aioredis.Redis.from_url(own_redis.url)
    try:
        await pair.client.emit(msg("x:", "T-oom"))
        await eventually(lambda: any(pair.worker_bus._in_hand.values()), "the input taken")
        await redis.config_set("maxmemory", "1")
        release.set()
        await eventually(lambda: pair.worker_bus.stats["link_errors"] >= 2,
                         "the refused send retried")
        assert await redis.xlen(f"{namespace}:oom:edge:OpenSea->a") == 1  # not settled
        await redis.config_set("maxmemory", "0")
        assert (await asyncio.wait_for(pair.client.fetch(), 10)).payload == "x:a"
    finally:
        await redis.config_set("maxmemory", "0")
        await redis.aclose()
        await pair.stop()


async def test_a_failover_to_read_only_is_waited_out_by_every_loop(
        own_redis: RedisServer, namespace: str, caplog: pytest.LogCaptureFixture) -> None:
    # After a failover the old primary is a replica: every write (XADD, XREADGROUP,
    # XCLAIM, EXPIRE) answers READONLY until it is promoted again. Reader,
    # keep-alive, claimer and sends all back off as for a broken link (one warning,
    # counted), never an ERROR per turn, and the work resumes where it stood.
    pair = await Pair(dist_flows.chain, own_redis.url, namespace, claim_idle_s=0.3,
                      max_backoff_s=0.05).start()
    redis = aioredis.Redis.from_url(own_redis.url)
    try:
        with caplog.at_level(logging.WARNING):
            await redis.replicaof("127.0.0.1", str(free_port()))  # a primary that is gone
            sending = asyncio.ensure_future(pair.client.emit(msg("x:", "T-ro")))
            await eventually(lambda: pair.client_bus.stats["link_errors"] >= 1,
                             "the client's send refused")
            for _ in range(2000):  # until both keep-alives were refused (Redis counts)
                stats = await redis.info("commandstats")
                if stats.get("cmdstat_expire", {}).get("rejected_calls", 0) >= 4:
                    break
                await asyncio.sleep(0.01)
            else:
                pytest.fail("the keep-alives never ran during the outage")
            assert not sending.done()  # the emit waits; it does not fail
            await redis.replicaof("no", "one")
            await asyncio.wait_for(sending, 10)
            assert (await asyncio.wait_for(pair.client.fetch(), 10)).payload == "x:abcde"
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert errors == []
        assert "bus_redis_unreachable" in {r.getMessage() for r in caplog.records}
    finally:
        await redis.replicaof("no", "one")
        await redis.aclose()
        await pair.stop()


async def test_results_never_wait_for_a_client_that_went_away(
        redis_url: str, namespace: str, redis: Any) -> None:
    def build() -> PenguiFlow:
        async def echo(m: Message, ctx: Any) -> Message:
            return m
        return create(Node(echo, name="echo", policy=NONE).to(), queue_maxsize=2,
                      name="replies")

    gone = await Pair(build, redis_url, namespace).start()
    other = RedisMessageBus(redis_url, namespace=namespace)
    client = build()
    client.run(message_bus=other, nodes=[])
    await other.ready()
    try:
        # Ten results for a client that never fetches them, more than the edges hold:
        # the worker must not wait for room in that client's reply stream.
        for i in range(10):
            await gone.client.emit(msg(i))
        reply = other.reply_stream(gone.client.flow_id)
        await eventually(lambda: gone.worker_bus.stats["sent"] >= 10, "ten results sent")
        assert await redis.xlen(reply) > 2  # more than an edge's capacity, waiting
        assert 0 < await redis.ttl(reply) <= 3600  # it expires without its reader
        await gone.client.stop()
        assert await redis.exists(reply) == 0  # a clean stop deletes it at once
        await client.emit(msg("still served"))
        assert (await asyncio.wait_for(client.fetch(), 10)).payload == "still served"
    finally:
        await client.stop()
        await gone.worker.stop()
    # A clean stop leaves no consumer behind in the edges' groups.
    consumers = await redis.xinfo_consumers(f"{namespace}:replies:edge:OpenSea->echo", "pf")
    assert consumers == []


async def _taken_by_the_dead(redis: Any, stream: str, count: int = 1) -> None:
    """The next ``count`` entries of ``stream`` taken by a process that died
    ("died-1"), the first of them then by another that died too ("died-2"): the
    first delivered twice, the others once, none settled."""
    await redis.xreadgroup("pf", "died-1", {stream: ">"}, count=count)
    first = (await redis.xpending_range(stream, "pf", min="-", max="+", count=1))[0]
    await redis.xclaim(stream, "pf", "died-2", 0, [first["message_id"]])


async def test_an_entry_every_taker_died_on_goes_to_the_dead_letter_stream(
        redis_url: str, namespace: str, redis: Any, caplog: pytest.LogCaptureFixture) -> None:
    store = InMemoryStateStore()
    pair = await Pair(dist_flows.chain, redis_url, namespace, max_deliveries=2,
                      claim_idle_s=0.3).start(worker=False)
    stream = f"{namespace}:chain:edge:OpenSea->a"
    try:
        await redis.xgroup_create(stream, "pf", id="0", mkstream=True)
        await pair.client.emit(msg("poison:", trace_id="dl"))
        # Two processes took it and died before settling it (delivered twice).
        await _taken_by_the_dead(redis, stream)
        with caplog.at_level(logging.ERROR):
            pair.worker.run(message_bus=pair.worker_bus, state_store=store)
            await eventually(lambda: pair.worker_bus.stats["dead_lettered"] == 1,
                             "the entry dead-lettered", timeout=10)
            await eventually(lambda: not pair.worker_bus._in_hand.get(stream),
                             "the entry settled")
        dead = await redis.xrange(f"{namespace}:chain:dead:OpenSea->a")
        assert len(dead) == 1 and dead[0][1][b"previous_worker"] == b"died-2"
        assert b"delivered 2 times (max_deliveries=2)" in dead[0][1][b"reason"]
        assert await redis.xlen(stream) == 0 and pair.worker_bus.stats["claimed"] == 0
        [event] = [e for e in await store.load_history("dl")
                   if e.kind == "message_undeliverable"]
        assert "died-2" in event.payload["error"]
        assert "message_undeliverable" in [r.getMessage() for r in caplog.records]
        # The flow goes on with the next message.
        await pair.client.emit(msg("ok:"))
        assert (await asyncio.wait_for(pair.client.fetch(), 10)).payload == "ok:abcde"
    finally:
        await pair.stop()


async def test_dead_lettering_moves_the_entry_in_one_step(
        redis_url: str, namespace: str, redis: Any) -> None:
    # The entry is added to the dead-letter stream and removed from its edge in one
    # Redis call: with the later settle never happening (a crash right after), it
    # is already gone from the edge and its pending list, so it is not dead-lettered
    # a second time by the next claimer.
    pair = await Pair(dist_flows.chain, redis_url, namespace, max_deliveries=2,
                      claim_idle_s=0.3).start(worker=False)
    stream = f"{namespace}:chain:edge:OpenSea->a"
    try:
        await redis.xgroup_create(stream, "pf", id="0", mkstream=True)
        await pair.client.emit(msg("poison:", trace_id="dl1"))
        await _taken_by_the_dead(redis, stream)
        settled: list[Any] = []

        async def no_settle(inbound: Any) -> None:  # the process "dies" before it
            settled.append(inbound)

        pair.worker_bus.settle = no_settle  # type: ignore[method-assign]
        pair.worker.run(message_bus=pair.worker_bus)
        await eventually(lambda: pair.worker_bus.stats["dead_lettered"] == 1,
                         "the entry dead-lettered", timeout=10)
        assert len(await redis.xrange(f"{namespace}:chain:dead:OpenSea->a")) == 1
        assert await redis.xlen(stream) == 0
        assert (await redis.xpending(stream, "pf"))["pending"] == 0
        assert settled  # the settle did come after (and found nothing left to do)
    finally:
        pair.worker_bus._in_hand.clear()
        await pair.stop()


async def test_dead_lettering_is_idempotent_and_takes_a_foreign_entry_of_many_fields(
        redis_url: str, namespace: str, redis: Any) -> None:
    pair = await Pair(dist_flows.chain, redis_url, namespace, max_deliveries=2,
                      claim_idle_s=0.3).start(worker=False)
    bus = pair.worker_bus
    stream = f"{namespace}:chain:edge:OpenSea->a"
    dead = f"{namespace}:chain:dead:OpenSea->a"
    try:
        await redis.xgroup_create(stream, "pf", id="0", mkstream=True)
        sent = msg("many:", trace_id="dl2")
        # Past what Lua's unpack takes (~8,000 values): the parcel's own fields are kept.
        junk = {f"x{i}".encode(): b"v" for i in range(5000)}
        entry = (await redis.xadd(stream, {
            b"e": "OpenSea->a", b"d": dumps_item(sent), b"t": sent.trace_id,
            b"m": f"{pair.client.flow_id} hop-dl2 - {time.time()!r} -", **junk})).decode()
        await _taken_by_the_dead(redis, stream)
        pair.worker.run(message_bus=bus)
        await eventually(lambda: bus.stats["dead_lettered"] == 1, "dead-lettered", timeout=10)
        [(_id, fields)] = await redis.xrange(dead)
        assert fields[b"dropped_fields"] == b"5000" and fields[b"entry"] == entry.encode()
        assert {b"e", b"d", b"t", b"m"} <= set(fields) and b"x1" not in fields
        assert await redis.xlen(stream) == 0
        # Asked again (a retry after a lost reply): the entry is gone, nothing added.
        assert await bus._eval("DEAD", [dead, stream], ["pf", entry, b"k", b"v"]) == 0
        assert await redis.xlen(dead) == 1
    finally:
        await pair.stop()


async def test_an_entry_that_cannot_be_dead_lettered_strands_no_other_claimed_entry(
        redis_url: str, namespace: str, redis: Any, caplog: pytest.LogCaptureFixture) -> None:
    pair = await Pair(dist_flows.chain, redis_url, namespace, max_deliveries=2,
                      claim_idle_s=0.3).start(worker=False)
    bus = pair.worker_bus
    stream = f"{namespace}:chain:edge:OpenSea->a"
    try:
        await redis.xgroup_create(stream, "pf", id="0", mkstream=True)
        # A key of another type where the dead letters go: Redis refuses the move.
        await redis.set(f"{namespace}:chain:dead:OpenSea->a", "x")
        await pair.client.emit(msg("poison:", trace_id="dl3"))
        await pair.client.emit(msg("fine:", trace_id="ok3"))
        # Both taken by a process that died; the first one twice (max_deliveries).
        await _taken_by_the_dead(redis, stream, count=2)
        with caplog.at_level(logging.ERROR, logger="penguiflow_distributed"):
            pair.worker.run(message_bus=bus)
            # The second is claimed in the same batch and still runs.
            got = await asyncio.wait_for(pair.client.fetch(), 10)
            assert (got.trace_id, got.payload) == ("ok3", "fine:abcde")
            await eventually(lambda: "bus_claim_entry_failed" in caplog.messages,
                             "the refused move logged")
    finally:
        await redis.delete(f"{namespace}:chain:dead:OpenSea->a")
        await pair.stop()


_RUNS: dict[str, int] = {}


async def test_entries_waiting_for_room_stay_with_their_worker_and_run_once(
        redis_url: str, namespace: str, redis: Any) -> None:
    gate = asyncio.Event()

    def build() -> PenguiFlow:
        async def slow(m: Message, ctx: Any) -> Message:
            _RUNS[m.payload] = _RUNS.get(m.payload, 0) + 1
            await gate.wait()
            return m
        return create(Node(slow, name="slow", policy=NONE).to(), queue_maxsize=2,
                      name="roomless")

    # Six entries a dead process left pending: more than a floe holds (2), so the
    # process claiming them waits for room while holding the rest. They must stay
    # refreshed meanwhile: not claimed again elsewhere, each run once.
    options = {"claim_idle_s": 0.3, "max_deliveries": 3}
    pair = await Pair(build, redis_url, namespace, **options).start(worker=False)
    stream = f"{namespace}:roomless:edge:OpenSea->slow"
    other_bus = RedisMessageBus(redis_url, namespace=namespace, **options)
    other = build()
    try:
        from penguiflow.wire import dumps_item

        await redis.xgroup_create(stream, "pf", id="0", mkstream=True)
        sent = [msg(f"m{i}") for i in range(6)]
        for i, item in enumerate(sent):
            await redis.xadd(stream, {b"e": b"OpenSea->slow", b"d": dumps_item(item),
                                      b"t": item.trace_id.encode(),
                                      b"m": f"{pair.client.flow_id} hop-{i} - 1.0 -".encode()})
        await redis.xreadgroup("pf", "died", {stream: ">"}, count=6)
        pair.worker.run(message_bus=pair.worker_bus)
        other.run(message_bus=other_bus)
        await eventually(lambda: pair.worker_bus.stats["claimed"]
                         + other_bus.stats["claimed"] >= 4, "the entries claimed")
        # Several claim periods while the nodes are blocked.
        await asyncio.sleep(1.5)  # nothing to await: claims that must NOT happen
        gate.set()
        got = sorted([(await asyncio.wait_for(pair.client.fetch(), 10)).payload
                      for _ in range(6)])
        assert got == sorted(m.payload for m in sent)
        assert {m.payload: _RUNS.get(m.payload) for m in sent} == {
            m.payload: 1 for m in sent}
        assert pair.worker_bus.stats["claimed"] + other_bus.stats["claimed"] == 6
        assert pair.worker_bus.stats["dead_lettered"] + other_bus.stats["dead_lettered"] == 0
    finally:
        await other.stop()
        await pair.stop()


async def test_a_settle_redis_refuses_loses_only_its_own_entry(
        redis_url: str, namespace: str, redis: Any, caplog: pytest.LogCaptureFixture) -> None:
    from penguiflow.binding import Inbound
    from penguiflow_distributed.bus import _Handle

    pair = await Pair(dist_flows.chain, redis_url, namespace).start()
    try:
        bad, good = f"{namespace}:not-a-stream", f"{namespace}:side"
        await redis.set(bad, "x")
        await redis.xgroup_create(good, "pf", id="0", mkstream=True)
        entry = await redis.xadd(good, {b"k": b"v"})
        await redis.xreadgroup("pf", "someone", {good: ">"})  # pending, to be settled
        bus = pair.worker_bus
        before = bus.stats["settled"]
        with caplog.at_level(logging.ERROR, logger="penguiflow_distributed"):
            # Both in one batch: Redis refuses the first (WRONGTYPE), not the second.
            await bus.settle(Inbound(None, 0.0, None, "a->b", _Handle(bad, "1-0"), "", "", 1))
            await bus.settle(Inbound(None, 0.0, None, "a->b",
                                     _Handle(good, entry.decode()), "", "", 1))
            await eventually(lambda: "bus_settle_refused" in caplog.messages,
                             "the refused settle logged")
        assert (await redis.xpending(good, "pf"))["pending"] == 0
        assert await redis.xlen(good) == 0 and bus.stats["settled"] == before + 1
        # Only the settled one is remembered as settled: the refused one is still
        # pending, and a claim must be free to take it again.
        assert (good, entry.decode()) in bus._settled_lately
        assert (bad, "1-0") not in bus._settled_lately
        # The flow goes on.
        await pair.client.emit(msg("after:"))
        assert (await asyncio.wait_for(pair.client.fetch(), 10)).payload == "after:abcde"
    finally:
        await pair.stop()


async def test_a_reply_stream_deleted_under_its_reader_is_read_again(
        redis_url: str, namespace: str, redis: Any) -> None:
    pair = await Pair(dist_flows.chain, redis_url, namespace).start()
    try:
        await pair.client.emit(msg("one:"))
        assert (await asyncio.wait_for(pair.client.fetch(), 10)).payload == "one:abcde"
        # Expired (reply_ttl_s) or deleted while the reader blocks: Redis answers
        # UNBLOCKED; the reader recreates its group instead of dying.
        await redis.delete(pair.client_bus.reply_stream(pair.client.flow_id))
        await pair.client.emit(msg("two:"))
        assert (await asyncio.wait_for(pair.client.fetch(), 10)).payload == "two:abcde"
    finally:
        await pair.stop()


async def test_a_read_whose_reply_the_link_lost_is_read_back(
        redis_url: str, namespace: str, redis: Any) -> None:
    pair = await Pair(dist_flows.chain, named(redis_url, namespace), namespace).start(worker=False)
    try:
        bus, consumer = pair.client_bus, pair.client.flow_id
        reply = bus.reply_stream(consumer)
        bus._reading = False  # the reader stays off once its link breaks (below)
        await cut_links(redis, namespace)
        await eventually(lambda: bus.stats["link_errors"] >= 1, "the reader saw the link break")
        result = msg("lost")
        await redis.xadd(reply, {b"e": "e->Rookery", b"d": dumps_item(result),
                                 b"t": result.trace_id,
                                 b"m": f"{consumer} hop1 - {time.time()!r} -"})
        # Redis hands the entry to the client's consumer, and the reply carrying it is
        # lost with the link: only the consumer's pending list still knows it.
        assert await redis.xreadgroup("pf", consumer, {reply: ">"})
        bus._reading = True
        got = await asyncio.wait_for(pair.client.fetch(), 10)
        assert (got.payload, got.trace_id) == ("lost", result.trace_id)
        assert bus.stats["recovered"] == 1
        await pair.client.emit(msg("next:"))  # and the reader reads on as before
        pair.worker.run(message_bus=pair.worker_bus)
        assert (await asyncio.wait_for(pair.client.fetch(), 10)).payload == "next:abcde"
    finally:
        await pair.stop()


async def _cut_blocked_reads(redis: Any, name: str) -> None:
    """Kill every connection named ``name`` (see dist_support.named) blocked in
    XREADGROUP; return once as many are blocked again (each reader reconnected and
    read back its pending entries first)."""
    def reading(c: dict[str, Any]) -> bool:
        return c.get("cmd") == "xreadgroup" and c.get("name") == name
    blocked = {c["id"] for c in await redis.client_list() if reading(c)}
    for client_id in blocked:
        await redis.client_kill_filter(_id=client_id)
    async def again() -> int:
        return sum(1 for c in await redis.client_list()
                   if reading(c) and c["id"] not in blocked)
    for _ in range(2000):  # polled: Redis's client list has nothing to await
        if await again() >= len(blocked):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the readers never read again")


async def test_link_flaps_while_a_node_runs_do_not_dead_letter_its_input(
        redis_url: str, namespace: str, redis: Any, tmp_path: Any) -> None:
    # max_deliveries=2: the input is handed out once; a read-back after a broken
    # link counted as a delivery (XREADGROUP <id>) would put it at the limit.
    options: dict[str, Any] = {"max_deliveries": 2, "claim_idle_s": 0.5, "block_ms": 100,
                               "max_backoff_s": 0.05}
    url = named(redis_url, namespace)
    pair = await Pair(dist_flows.blocking, url, namespace, **options).start()
    other = dist_flows.blocking()
    other_bus = RedisMessageBus(url, namespace=namespace, **options)
    started = tmp_path / "s"
    try:
        meta = {"started": str(started), "mark": str(tmp_path / "m")}
        await pair.client.emit(msg("one", trace_id="flap", **meta))
        await eventually(started.exists, "the node started")
        for _ in range(3):  # the worker's links break while the node runs
            await _cut_blocked_reads(redis, namespace)
        assert pair.worker_bus.stats["recovered"] == 0  # held here: nothing to read back
        await pair.worker.stop()  # it dies with the input unsettled
        started.unlink()
        other.run(message_bus=other_bus)
        await eventually(lambda: started.exists() or other_bus.stats["dead_lettered"] > 0,
                         "the input taken by another worker")
        # Before: claimed with 4 deliveries counted, and dead-lettered unrun.
        assert other_bus.stats["dead_lettered"] == 0 and started.exists()
        assert other_bus.stats["claimed"] == 1
        assert await redis.xlen(f"{namespace}:blocking:dead:gate->hold") == 0
    finally:
        await other.stop()
        await pair.stop()


async def test_an_entry_a_recovering_reader_and_the_claimer_both_get_runs_once(
        redis_url: str, namespace: str, redis: Any) -> None:
    # A reader reading back its lost read, and the claimer whose XCLAIM of the same
    # entry is in flight, both receive it from Redis: only one may deliver it.
    pair = await Pair(dist_flows.chain, named(redis_url, namespace), namespace,
                      claim_idle_s=1000).start()
    try:
        bus, consumer = pair.worker_bus, pair.worker.flow_id
        stream = bus.edge_stream("a->b")
        bus._reading = False
        await cut_links(redis, namespace)
        await eventually(lambda: bus.stats["link_errors"] >= 1, "the reader saw the link break")
        sent = msg("x:")
        await redis.xadd(stream, {b"e": "a->b", b"d": dumps_item(sent), b"t": sent.trace_id,
                                  b"m": f"{pair.client.flow_id} hop1 - {time.time()!r} -"})
        assert await redis.xreadgroup("pf", consumer, {stream: ">"})  # the lost read
        conn = await bus._redis.connection_pool.get_connection()
        claim = bus._redis.xclaim

        async def xclaim_then_recover(*args: Any, **kwargs: Any) -> Any:
            claimed = await claim(*args, **kwargs)  # done at Redis; its reply not yet seen
            await bus._recover(conn, stream, consumer)
            return claimed

        bus._redis.xclaim = xclaim_then_recover  # type: ignore[method-assign]
        try:
            await bus._claim(stream, consumer, 0)
        finally:
            bus._redis.xclaim = claim  # type: ignore[method-assign]
            await bus._redis.connection_pool.release(conn)
        assert (bus.stats["recovered"], bus.stats["claimed"]) == (1, 0)
        bus._reading = True
        got = await asyncio.wait_for(pair.client.fetch(), 10)
        assert (got.payload, got.trace_id) == ("x:bcde", sent.trace_id)
        await eventually(lambda: not any(bus._in_hand.values()), "the entry was settled")
        assert bus.stats["delivered"] == 4  # a->b and the three hops after it, once each
    finally:
        await pair.stop()


async def test_an_entry_recovered_and_settled_while_a_claim_was_in_flight_runs_once(
        redis_url: str, namespace: str, redis: Any) -> None:
    # As above, and the recovered entry is run and settled before the claim's reply
    # is seen: no longer in hand, it must still not be delivered by the claim.
    pair = await Pair(dist_flows.chain, named(redis_url, namespace), namespace,
                      claim_idle_s=1000).start()
    try:
        bus, consumer = pair.worker_bus, pair.worker.flow_id
        stream = bus.edge_stream("a->b")
        bus._reading = False
        await cut_links(redis, namespace)
        await eventually(lambda: bus.stats["link_errors"] >= 1, "the reader saw the link break")
        sent = msg("x:")
        await redis.xadd(stream, {b"e": "a->b", b"d": dumps_item(sent), b"t": sent.trace_id,
                                  b"m": f"{pair.client.flow_id} hop1 - {time.time()!r} -"})
        assert await redis.xreadgroup("pf", consumer, {stream: ">"})  # the lost read
        conn = await bus._redis.connection_pool.get_connection()
        claim = bus._redis.xclaim

        async def xclaim_then_recover(*args: Any, **kwargs: Any) -> Any:
            claimed = await claim(*args, **kwargs)  # done at Redis; its reply not yet seen
            await bus._recover(conn, stream, consumer)
            # The node runs what _recover delivered and its input is settled.
            await eventually(lambda: not any(bus._in_hand.values()), "recovered, settled")
            return claimed

        bus._redis.xclaim = xclaim_then_recover  # type: ignore[method-assign]
        try:
            await bus._claim(stream, consumer, 0)
        finally:
            bus._redis.xclaim = claim  # type: ignore[method-assign]
            await bus._redis.connection_pool.release(conn)
        assert (bus.stats["recovered"], bus.stats["claimed"]) == (1, 0)
        bus._reading = True
        got = await asyncio.wait_for(pair.client.fetch(), 10)
        assert (got.payload, got.trace_id) == ("x:bcde", sent.trace_id)
        await eventually(lambda: not any(bus._in_hand.values()), "the entry was settled")
        assert bus.stats["delivered"] == 4  # a->b and the three hops after it, once each
    finally:
        await pair.stop()


async def test_a_recovering_reader_skips_an_entry_settled_since_its_read_was_sent(
        redis_url: str, namespace: str, redis: Any) -> None:
    # The read-back's reply can come after the settle of an entry it lists (run and
    # settled here meanwhile): that entry is not delivered again.
    pair = await Pair(dist_flows.chain, named(redis_url, namespace), namespace,
                      claim_idle_s=1000).start()
    try:
        bus, consumer = pair.worker_bus, pair.worker.flow_id
        stream = bus.edge_stream("a->b")
        bus._reading = False
        # The blocked read ends (its link cut) and the reader parks.
        await cut_links(redis, namespace)
        await eventually(lambda: bus.stats["link_errors"] >= 1, "the reader saw the link break")
        sent = msg("x:")
        entry = await redis.xadd(stream, {
            b"e": "a->b", b"d": dumps_item(sent), b"t": sent.trace_id,
            b"m": f"{pair.client.flow_id} hop1 - {time.time()!r} -"})
        assert await redis.xreadgroup("pf", consumer, {stream: ">"})  # the lost read
        bus._settled_lately[stream, entry.decode()] = None  # as if run and settled
        conn = await bus._redis.connection_pool.get_connection()
        try:
            await bus._recover(conn, stream, consumer)
        finally:
            await bus._redis.connection_pool.release(conn)
        assert bus.stats["recovered"] == 0 and not bus._in_hand.get(stream)
    finally:
        await pair.stop()


async def test_scripts_redis_forgot_are_loaded_again(
        redis_url: str, namespace: str, redis: Any) -> None:
    pair = await Pair(dist_flows.chain, redis_url, namespace).start()
    try:
        await pair.client.emit(msg("one:"))
        assert (await asyncio.wait_for(pair.client.fetch(), 10)).payload == "one:abcde"
        await redis.script_flush()  # as a Redis restart does
        await pair.client.emit(msg("two:"))
        assert (await asyncio.wait_for(pair.client.fetch(), 10)).payload == "two:abcde"
    finally:
        await pair.stop()


async def test_a_script_call_cut_off_mid_reply_leaves_no_stale_reply_behind(
        redis_url: str, namespace: str, redis: Any) -> None:
    # The bus sends its scripts on connections of its own: one whose call was
    # cancelled before the reply came must not serve the next call (which would read
    # the late reply of the first as its own).
    pair = await Pair(dist_flows.fanout, redis_url, namespace).start(worker=False)
    bus = pair.client_bus
    try:
        await redis.execute_command("CLIENT", "PAUSE", 20_000, "WRITE")
        try:
            stuck = asyncio.create_task(bus.gather("join|t1", "hop-a", b"1", 2))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 20
            # Wait until Redis holds the call (postponed by the pause): the bytes left.
            while not any(c.get("cmd") == "evalsha" and "b" in c.get("flags", "")
                          for c in await redis.client_list()):
                assert loop.time() < deadline, "the script call never reached Redis"
                await asyncio.sleep(0.01)
            stuck.cancel()
            with pytest.raises(asyncio.CancelledError):
                await stuck
        finally:
            await redis.execute_command("CLIENT", "UNPAUSE")
        # A different question, whose answer the first call's reply ({0, 1}) is not.
        assert await bus.gather("join|t2", "hop-x", b"x", 1) == ([b"x"], True)
        assert await bus.gather("join|t2", "hop-y", b"y", 1) == ([b"x"], True)
    finally:
        await pair.stop()


async def test_a_script_refused_by_redis_raises_and_the_next_call_is_answered(
        redis_url: str, namespace: str, redis: Any) -> None:
    pair = await Pair(dist_flows.fanout, redis_url, namespace).start(worker=False)
    bus = pair.client_bus
    try:
        # A key of another type where the join keeps its items: Redis refuses the
        # script with an error reply (not a broken link): raised, not retried.
        await redis.set(f"{namespace}:{pair.client.name}:join:join|t1:items", b"x")
        with pytest.raises(aioredis.ResponseError, match="WRONGTYPE"):
            await bus.gather("join|t1", "hop-a", b"1", 2)
        # The error reply was read whole: the same link answers the next call rightly.
        assert await bus.gather("join|t2", "hop-a", b"1", 1) == ([b"1"], True)
    finally:
        await pair.stop()


async def test_a_burst_of_script_calls_keeps_few_connections_back(
        redis_url: str, namespace: str, redis: Any) -> None:
    # Sixty joins at once each need a connection; after the burst the bus keeps at
    # most _SPARE_MAX of them for itself and gives the rest back to the pool that its
    # readers, keep-alive and claimer share (else a burst could starve them).
    from penguiflow_distributed.bus import _SPARE_MAX

    pair = await Pair(dist_flows.fanout, redis_url, namespace).start(worker=False)
    bus = pair.client_bus
    try:
        replies = await asyncio.gather(*(
            bus.gather(f"join|burst{i}", "hop-a", b"1", 1) for i in range(60)))
        assert replies == [([b"1"], True)] * 60
        pool = bus._redis.connection_pool
        assert len(bus._spare) <= _SPARE_MAX
        # What is not kept went back to the pool: held only by the bus's loops.
        assert len(pool._in_use_connections) <= len(bus._tasks) + len(bus._spare)
    finally:
        await pair.stop()


async def test_script_connections_killed_by_redis_are_all_replaced(
        redis_url: str, namespace: str, redis: Any) -> None:
    # As after a Redis restart: every connection the bus keeps for its scripts is
    # dead. The next call fails on one, drops them all, and is answered on a new one.
    pair = await Pair(dist_flows.fanout, named(redis_url, namespace), namespace).start(
        worker=False)
    bus = pair.client_bus
    try:
        await asyncio.gather(*(bus.gather(f"join|k{i}", "hop-a", b"1", 1) for i in range(4)))
        kept = len(bus._spare)
        assert kept >= 2
        killed = 0
        for client in await redis.client_list():  # this bus's only (others share Redis)
            if client.get("cmd") == "evalsha" and client.get("name") == namespace:
                await redis.execute_command("CLIENT", "KILL", "ID", client["id"])
                killed += 1
        assert killed >= kept
        errors = bus.stats["link_errors"]
        assert await bus.gather("join|after", "hop-a", b"z", 1) == ([b"z"], True)
        # One failed try, not one per dead connection: the first failure dropped all.
        assert bus.stats["link_errors"] == errors + 1
        assert len(bus._spare) == 1  # the new one; the dead ones are gone
        assert await bus.gather("join|after2", "hop-a", b"y", 1) == ([b"y"], True)
    finally:
        await pair.stop()


async def test_a_link_that_goes_silent_is_replaced_after_link_timeout_s(
        redis_url: str, namespace: str, caplog: pytest.LogCaptureFixture) -> None:
    # A NAT or firewall drops the client's connections without a word: no reply, no
    # reset. The client's next send (and its blocked reply read) must give up after
    # link_timeout_s, reconnect and go on, not wait for TCP's ~15 minutes.
    proxy = await SilentProxy(redis_url).start()
    client, worker = dist_flows.chain(), dist_flows.chain()
    worker_bus = RedisMessageBus(redis_url, namespace=namespace)
    client_bus = RedisMessageBus(proxy.url, namespace=namespace, link_timeout_s=1,
                                 block_ms=100, max_backoff_s=0.2)
    worker.run(message_bus=worker_bus)
    await worker_bus.ready()
    client.run(message_bus=client_bus, nodes=[])
    await client_bus.ready()
    try:
        await client.emit(msg("one:"))
        assert (await asyncio.wait_for(client.fetch(), 10)).payload == "one:abcde"
        proxy.silence()
        # Bounded well below TCP's ~15 minutes: link_timeout_s (1 s) per dead call.
        with caplog.at_level(logging.WARNING, logger="penguiflow_distributed"):
            await asyncio.wait_for(client.emit(msg("two:")), 15)
            assert (await asyncio.wait_for(client.fetch(), 15)).payload == "two:abcde"
        assert client_bus.stats["link_errors"] >= 1
        assert client_bus.stats["reconnects"] >= 1
        assert any(r.getMessage() == "bus_redis_unreachable" for r in caplog.records)
    finally:
        await client.stop()
        await worker.stop()
        await proxy.stop()


def test_link_timeout_s_must_be_positive_and_rides_on_the_url() -> None:
    with pytest.raises(InvalidArgument, match="link_timeout_s must be > 0"):
        RedisMessageBus("redis://127.0.0.1:6379/0", link_timeout_s=0)
    bus = RedisMessageBus.from_url("redis://127.0.0.1:6379/0?link_timeout_s=2.5")
    assert bus.link_timeout_s == 2.5 and "link_timeout_s" not in bus.url


async def test_a_payload_with_no_json_form_fails_at_emit_naming_edge_and_type(
        redis_url: str, namespace: str) -> None:
    pair = await Pair(dist_flows.chain, redis_url, namespace).start(worker=False)
    try:
        with pytest.raises(WireEncodingError,
                           match=r"cannot send a object on edge 'OpenSea->a'") as info:
            await pair.client.emit(msg(object()))
        assert isinstance(info.value, TypeError)
    finally:
        await pair.stop()


async def test_a_join_counts_a_redelivered_input_once(
        redis_url: str, namespace: str) -> None:
    pair = await Pair(dist_flows.fanout, redis_url, namespace).start(worker=False)
    try:
        bus = pair.client_bus
        first = await bus.gather("join|t1", "hop-a", b"1", 2)
        again = await bus.gather("join|t1", "hop-a", b"1", 2)  # hop-a redelivered
        assert first == (None, True) and again == (None, False)
        assert await bus.gather("join|t1", "hop-b", b"2", 2) == ([b"1", b"2"], True)
        # The complete group is the answer to any input that comes again.
        assert await bus.gather("join|t1", "hop-a", b"1", 2) == ([b"1", b"2"], False)
    finally:
        await pair.stop()


@pytest.mark.parametrize("protocol", [2, 3])
async def test_a_cancel_drops_the_traces_queued_entries_and_stops_its_node(
        redis_url: str, namespace: str, redis: Any, tmp_path: Any, protocol: int) -> None:
    # RESP3 (?protocol=3 on the URL) too: redis-py parses its replies another shape.
    url = f"{redis_url}{'&' if '?' in redis_url else '?'}protocol={protocol}"
    store = InMemoryStateStore()
    pair = Pair(dist_flows.blocking, url, namespace)
    pair.worker.run(message_bus=pair.worker_bus, state_store=store)
    await pair.worker_bus.ready()
    await pair.start(worker=False)
    try:
        meta = {"started": str(tmp_path / "s"), "mark": str(tmp_path / "m")}
        first = msg("one", trace_id="tc", **meta)
        await pair.client.emit(first)
        await pair.client.emit(msg("two", trace_id="tc", **meta))  # queued behind it
        await eventually((tmp_path / "s").exists, "the node started")
        assert await pair.client.cancel("tc") is True
        await eventually((tmp_path / "m").exists, "the node saw the cancel")
        binding = pair.worker.binding
        assert binding is not None
        await eventually(lambda: binding.stats["cancel_drops"] + binding.stats["settled"] >= 3,
                         "every entry of the trace settled")
        assert await redis.xlen(f"{namespace}:blocking:edge:gate->hold") == 0
        kinds = [e.kind for e in await store.load_history("tc")]
        assert "trace_cancel_start" in kinds and "node_cancelled" not in kinds
        assert await pair.client.cancel("tc") is False  # known as cancelled already
    finally:
        await pair.stop()


async def test_cancels_still_arrive_after_redis_refused_a_read_of_the_control_stream(
        redis_url: str, namespace: str, redis: Any, tmp_path: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    pair = Pair(dist_flows.blocking, redis_url, namespace, block_ms=50, max_backoff_s=0.05)
    await pair.start()
    control = f"{namespace}:blocking:control"
    try:
        with caplog.at_level(logging.ERROR, logger="penguiflow_distributed"):
            # A key of another type where the control stream goes: XREAD -> WRONGTYPE.
            await redis.set(control, "not a stream")
            reader = next(t for t in pair.worker_bus._tasks if t.get_name() == "pf-bus:control")
            await eventually(lambda: pair.worker_bus.stats.get("read_errors", 0) >= 1
                             or reader.done(), "the worker's control read refused")
            await redis.delete(control)
        meta = {"started": str(tmp_path / "s"), "mark": str(tmp_path / "m")}
        await pair.client.emit(msg("one", trace_id="tc", **meta))
        await eventually((tmp_path / "s").exists, "the node started")
        assert await pair.client.cancel("tc") is True
        # Before: the control reader had died on WRONGTYPE, and the cancel never came.
        await eventually((tmp_path / "m").exists, "the node saw the cancel")
        assert pair.worker_bus.stats["cancels_received"] == 1
        assert any(r.getMessage() == "bus_read_failed" and "WRONGTYPE" in r.error
                   and r.stream == control for r in caplog.records)
    finally:
        await pair.stop()


async def test_an_unreachable_redis_is_retried_logged_once_and_stop_still_returns(
        caplog: pytest.LogCaptureFixture) -> None:
    bus = RedisMessageBus(f"redis://127.0.0.1:{free_port()}/0", max_backoff_s=0.05)
    flow = dist_flows.chain()
    with caplog.at_level(logging.WARNING, logger="penguiflow_distributed"):
        flow.run(message_bus=bus)
        await eventually(lambda: bus.stats["link_errors"] >= 3, "three failed attempts")
        await asyncio.wait_for(flow.stop(), 5)
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings.count("bus_redis_unreachable") == 1
    assert not flow.running


async def test_an_emit_waiting_for_a_redis_that_never_answered_ends_when_the_flow_stops(
        ) -> None:
    bus = RedisMessageBus(f"redis://127.0.0.1:{free_port()}/0", max_backoff_s=0.05)
    flow = dist_flows.chain()
    flow.run(message_bus=bus, nodes=[])
    sending = asyncio.ensure_future(flow.emit(msg("x")))
    ready = asyncio.ensure_future(bus.ready())
    await eventually(lambda: bus.stats["link_errors"] >= 2, "the bind retrying its link")
    await asyncio.wait_for(flow.stop(), 10)
    # Before: the emit (and ready()) waited for ever for a bind that was given up.
    with pytest.raises(FlowNotRunning, match="stopped before its bus was bound"):
        await asyncio.wait_for(sending, 5)
    with pytest.raises(FlowNotRunning, match="the bus never read"):
        await asyncio.wait_for(ready, 5)


async def test_sends_and_cancels_retrying_while_redis_is_down_end_when_the_flow_stops(
        own_redis: RedisServer, namespace: str) -> None:
    bus = RedisMessageBus(own_redis.url, namespace=namespace, max_backoff_s=0.05)
    flow = dist_flows.chain()
    flow.run(message_bus=bus, nodes=[])
    await bus.ready()
    own_redis.stop()
    sending = asyncio.ensure_future(flow.emit(msg("x", trace_id="T-down")))
    cancelling = asyncio.ensure_future(flow.cancel("T-other"))
    await eventually(lambda: bus.stats["link_errors"] >= 4, "the send and cancel retrying")
    await asyncio.wait_for(flow.stop(), 10)
    # Before: an AttributeError ('NoneType' object has no attribute 'connection_pool').
    for waiting, what in ((sending, "send"), (cancelling, "cancel")):
        with pytest.raises(FlowNotRunning, match=f"stopped while this {what} was retried "
                                                 r"\(Redis at redis://127.0.0.1:"):
            await asyncio.wait_for(waiting, 5)


async def test_an_emit_waiting_for_room_on_a_full_edge_ends_when_the_flow_stops(
        redis_url: str, namespace: str) -> None:
    flow = create(Node(_echo, name="sink", policy=NONE).to(), queue_maxsize=1, name="full")
    bus = RedisMessageBus(redis_url, namespace=namespace)
    flow.run(message_bus=bus, nodes=[])
    await flow.emit(msg(0))  # nobody consumes: the edge is full now
    blocked = asyncio.ensure_future(flow.emit(msg(1)))
    await eventually(lambda: bus.stats["full_waits"] > 0, "the emit waiting for room")
    await asyncio.wait_for(flow.stop(), 10)
    with pytest.raises(FlowNotRunning, match="waited for room on edge 'OpenSea->sink'"):
        await asyncio.wait_for(blocked, 5)


async def _echo(m: Message, ctx: Any) -> Message:
    return m


# -- one trace across processes -----------------------------------------------------------


async def test_spans_of_every_process_make_one_trace_with_one_root(
        redis_url: str, namespace: str) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    def build() -> PenguiFlow:
        async def a(m: Message, ctx: Any) -> Message:
            return m
        async def b(m: Message, ctx: Any) -> Message:
            return m
        na, nb = Node(a, name="a", policy=NONE), Node(b, name="b", policy=NONE)
        return create(na.to(nb), nb.to(), name="traced", tracer_provider=provider)

    client, first, second = build(), build(), build()
    buses = [RedisMessageBus(redis_url, namespace=namespace) for _ in range(3)]
    first.run(message_bus=buses[1], nodes=["a"])
    second.run(message_bus=buses[2], nodes=["b"])
    client.run(message_bus=buses[0], nodes=[])
    for bus in buses:
        await bus.ready()
    try:
        sent = msg("x", trace_id="one-trace")
        await client.emit(sent)
        assert (await asyncio.wait_for(client.fetch(), 10)).payload == "x"
    finally:
        for flow in (client, first, second):
            await flow.stop()
    spans = exporter.get_finished_spans()
    assert len({s.context.trace_id for s in spans}) == 1
    roots = [s for s in spans if s.parent is None]
    assert len(roots) == 1 and roots[0].name.startswith("invoke_workflow")
    nodes = {s.attributes["pf.invocation.id"]: s for s in spans
             if s.attributes and "pf.invocation.id" in s.attributes}
    by_worker = {s.attributes["pf.worker.id"]: s for s in nodes.values()}
    assert set(by_worker) == {first.flow_id, second.flow_id}
    span_a, span_b = by_worker[first.flow_id], by_worker[second.flow_id]
    assert span_a.parent is not None and span_a.parent.span_id == roots[0].context.span_id
    # b ran in another process, under the span of the invocation that sent it its input.
    assert span_b.parent is not None and span_b.parent.span_id == span_a.context.span_id


# -- policies across processes ---------------------------------------------------------------

_ATTEMPTS: dict[str, int] = {}


def _policies() -> PenguiFlow:
    async def gate(m: Message, ctx: Any) -> Message:
        return m

    async def flaky(m: Message, ctx: Any) -> Message:
        _ATTEMPTS[m.trace_id] = _ATTEMPTS.get(m.trace_id, 0) + 1
        if m.payload == "retry" and _ATTEMPTS[m.trace_id] == 1:
            raise RuntimeError("first attempt fails")
        if m.payload == "slow":
            await asyncio.sleep(5)
        return m.model_copy(update={"payload": f"ok after {_ATTEMPTS[m.trace_id]}"})

    g = Node(gate, name="gate", policy=NONE)
    f = Node(flaky, name="flaky", policy=NodePolicy(validate="none", max_retries=1,
                                                    timeout_s=0.2, backoff_base=0.01))
    return create(g.to(f), f.to(), name="policies", emit_errors_to_rookery=True)


async def test_retries_timeouts_and_deadlines_hold_across_processes(
        redis_url: str, namespace: str) -> None:
    import time

    from penguiflow import FinalAnswer
    from penguiflow.errors import FlowError

    pair = await Pair(_policies, redis_url, namespace).start()
    try:
        await pair.client.emit(msg("retry", trace_id="r1"))
        assert (await asyncio.wait_for(pair.client.fetch(), 10)).payload == "ok after 2"
        await pair.client.emit(msg("slow", trace_id="s1"))
        error = await asyncio.wait_for(pair.client.fetch(), 10)
        # The worker's FlowError crossed the wire (its exception object stayed behind).
        assert isinstance(error, FlowError) and error.code == "NODE_TIMEOUT"
        assert (error.trace_id, error.node_name) == ("s1", "flaky") and _ATTEMPTS["s1"] == 2
        expired = Message(payload="late", headers=Headers(tenant="t"), trace_id="d1",
                          deadline_s=time.time() - 1)
        await pair.client.emit(expired)
        answer = await asyncio.wait_for(pair.client.fetch(), 10)
        assert answer.payload == FinalAnswer(text="Deadline exceeded") and "d1" not in _ATTEMPTS
    finally:
        await pair.stop()


async def test_bus_counters_are_exported_as_metrics(redis_url: str, namespace: str) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    pair = Pair(dist_flows.chain, redis_url, namespace,
                meter_provider=MeterProvider(metric_readers=[reader]))
    await pair.start()
    try:
        await pair.client.emit(msg("m:"))
        await asyncio.wait_for(pair.client.fetch(), 10)
    finally:
        await pair.stop()
    data = reader.get_metrics_data()
    assert data is not None
    points = {m.name: sum(p.value for p in m.data.data_points)
              for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
    # Two buses (client and worker) on one provider: the client sent 1, the worker 5.
    assert points["penguiflow.bus.sent"] == 6 and points["penguiflow.bus.settled"] >= 6
    assert points["penguiflow.bus.reconnects"] == 0


async def test_a_redis_that_refuses_the_bus_fails_every_send_with_the_reason(
        redis_url: str, namespace: str, redis: Any, caplog: pytest.LogCaptureFixture) -> None:
    from penguiflow_distributed import BusBindError

    # A plain string where the bus needs its stream: Redis answers WRONGTYPE.
    await redis.set(f"{namespace}:chain:edge:OpenSea->a", "not a stream")
    flow = dist_flows.chain()
    bus = RedisMessageBus(redis_url, namespace=namespace)
    with caplog.at_level(logging.ERROR):
        flow.run(message_bus=bus)
        with pytest.raises(BusBindError, match="refused the bus for flow 'chain'") as info:
            await asyncio.wait_for(flow.emit(msg("x")), 5)
        await flow.stop()
    assert "WRONGTYPE" in str(info.value) and isinstance(info.value, RuntimeError)
    assert "message_bus_bind_failed" in [r.getMessage() for r in caplog.records]
