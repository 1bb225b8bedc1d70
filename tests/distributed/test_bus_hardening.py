"""RedisMessageBus under misuse and hostile input: a URL or a client the bus cannot
use, a stopped bus, a link breaking mid-recovery, an entry whose error cannot be
rendered, a flow run again after stop(), a cancelled trace id emitted again.

Each test fails on the code before its fix (found by a review of the bus)."""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import subprocess
import sys
import time
from typing import Any

import dist_flows
import pytest
import redis.asyncio as aioredis
from dist_support import HERE, cut_links, eventually, named
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, model_validator
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError

from penguiflow import Headers, Message, Node, NodePolicy, create
from penguiflow.core import PenguiFlow
from penguiflow.errors import FlowNotRunning, InvalidArgument
from penguiflow.wire import dumps_item
from penguiflow_distributed import BusBindError, RedisMessageBus
from penguiflow_distributed.bus import _redact

NONE = NodePolicy(validate="none")


def msg(payload: Any, trace_id: str | None = None) -> Message:
    extra = {} if trace_id is None else {"trace_id": trace_id}
    return Message(payload=payload, headers=Headers(tenant="t"), **extra)


def echo(name: str = "echo") -> PenguiFlow:
    async def step(m: Message, ctx: Any) -> Message:
        return m.model_copy(update={"payload": f"{m.payload}!"})
    return create(Node(step, name="echo", policy=NONE).to(), name=name)


# -- what the bus is given ---------------------------------------------------------------


@pytest.mark.parametrize(("url", "why"), [
    ("redis://127.0.0.1:notaport/0", "Port could not be cast to integer"),
    ("redis://127.0.0.1:6379/0?socket_timeout=abc", "Invalid value for 'socket_timeout'"),
    ("redis://u:s3cret@127.0.0.1:99999/0", "Port out of range"),
])
def test_a_url_redis_py_cannot_take_is_refused_at_once_naming_it(url: str, why: str) -> None:
    # Before: accepted; bind then raised outside its try, and ready(), every emit()
    # and pf worker waited for ever.
    with pytest.raises(InvalidArgument, match=why) as info:
        RedisMessageBus.from_url(url)
    assert "cannot be used" in str(info.value) and "s3cret" not in str(info.value)
    with pytest.raises(InvalidArgument, match=why):
        RedisMessageBus(url)


#: Characters a password may hold that a URL reserves ('/', '?', '#' end the
#: authority when unescaped: urllib and redis-py then read the password as the host,
#: the port or the path).
_HOSTILE = "/?#@:%&=;[] .aZ9"


@settings(max_examples=300, deadline=None)
@given(before=st.text(_HOSTILE, max_size=6), after=st.text(_HOSTILE, max_size=6),
       user=st.sampled_from(["", "admin"]))
def test_a_password_with_reserved_characters_never_shows(
        before: str, after: str, user: str) -> None:
    # Before: redis://admin:Sup3rS3cret/x@h:6390/0 was refused with "the bus URL
    # 'redis://admin:Sup3rS3cret/x@...' cannot be used: Port could not be cast to
    # integer value as 'Sup3rS3cret'": the password twice (also in pf worker's output).
    secret = "Sup3rS3cret"
    url = f"redis://{user}:{before}{secret}{after}@127.0.0.1:6390/0?db=1"
    for make in (RedisMessageBus, RedisMessageBus.from_url):
        try:
            bus = make(url)
        except InvalidArgument as exc:
            assert secret not in str(exc) and secret not in repr(exc)
            if any(c in before for c in "/?#"):
                # What is wrong, and the fix.
                assert "percent-encode" in str(exc)
        else:
            assert secret not in repr(bus)
    assert secret not in _redact(url)


def test_a_password_with_a_slash_is_refused_naming_the_fix() -> None:
    with pytest.raises(InvalidArgument, match=r"'redis://\*\*\*@127.0.0.1:6390/0' cannot "
                                              r"be used: .*unescaped '/', '\?' or '#'.*"
                                              r"percent-encode") as info:
        RedisMessageBus.from_url("redis://admin:Sup3rS3cret/x@127.0.0.1:6390/0")
    assert "Sup3rS3cret" not in str(info.value)


@pytest.mark.parametrize(("url", "shown"), [
    # (A query holding an '@' is masked whole: it may be a password's tail.)
    ("redis://127.0.0.1:6390/10?client_name=worker@host-1",
     "redis://127.0.0.1:6390/10?***"),
    ("redis://u:s3cret@127.0.0.1:6390/10?client_name=worker@host-1",
     "redis://u:***@127.0.0.1:6390/10?***"),
    ("unix:///var/run/redis@main/redis.sock?db=3", "unix:///var/run/redis@main/redis.sock"),
])
def test_a_url_with_an_at_sign_outside_its_user_part_is_taken(url: str, shown: str) -> None:
    # Before: refused with InvalidArgument (as if a password held an unescaped '/'),
    # "redacted" as redis://***@host-1, hiding the host, the port and the db; redis-py
    # takes these URLs, and so did the bus before.
    aioredis.Redis.from_url(url)  # redis-py reads it
    for make in (RedisMessageBus, RedisMessageBus.from_url):
        bus = make(url)
        assert shown.partition("?")[0] in repr(bus)
        assert "s3cret" not in repr(bus)
    assert _redact(url) == shown.replace("/redis.sock", "/redis.sock?db=3")


async def test_a_bus_whose_option_holds_an_at_sign_delivers(redis_url: str,
                                                             namespace: str) -> None:
    base, _, _ = redis_url.partition("?")
    flow = echo()
    bus = RedisMessageBus.from_url(f"{base}?client_name=worker@host-1", namespace=namespace)
    flow.run(message_bus=bus)
    try:
        await asyncio.wait_for(bus.ready(), 10)
        await flow.emit(msg("hi"))
        assert (await asyncio.wait_for(flow.fetch(), 10)).payload == "hi!"
    finally:
        await flow.stop()


def test_a_password_holding_a_question_mark_before_an_option_is_still_refused() -> None:
    # 'u:9?a=...@host/0' reads as host u, port 9 and an option: the '@' after the
    # option's value, before a host and a path, may end a user part.
    with pytest.raises(InvalidArgument, match="percent-encode") as info:
        RedisMessageBus.from_url("redis://admin:9?a=Sup3rS3cret@127.0.0.1:6390/0")
    assert "Sup3rS3cret" not in str(info.value)


def test_pf_worker_never_prints_a_password_holding_a_slash() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])}
    done = subprocess.run(
        [sys.executable, "-m", "penguiflow_distributed.worker", "dist_flows:chain",
         "--bus", "redis://admin:Sup3rS3cret/x@127.0.0.1:6390/0"],
        env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "percent-encode" in done.stderr and "Sup3rS3cret" not in done.stderr


def test_a_unix_socket_url_rides_from_url_with_its_keywords() -> None:
    # Before: from_url rebuilt it as unix:/tmp/redis.sock and refused it.
    bus = RedisMessageBus.from_url("unix:///tmp/redis.sock?db=10&namespace=shop")
    assert (bus.url, bus.namespace) == ("unix:///tmp/redis.sock?db=10", "shop")
    bus = RedisMessageBus.from_url("unix://u:pw@/tmp/redis.sock?namespace=shop")
    assert bus.url == "unix://u:pw@/tmp/redis.sock"
    assert "pw" not in repr(bus)


async def test_a_client_that_decodes_replies_is_refused_with_the_fix(redis_url: str) -> None:
    # Before: accepted, and every entry read back (str keys) was counted undecodable
    # and deleted: each message silently lost.
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        with pytest.raises(InvalidArgument, match=r"decode_responses=True.*pass a client "
                                                  r"made without decode_responses"):
            RedisMessageBus(client=client)
    finally:
        await client.aclose()


async def test_a_client_pool_too_small_for_the_readers_fails_the_bind_naming_the_size(
        redis_url: str, namespace: str) -> None:
    # Before: the readers pinned every pooled connection, each send met "Too many
    # connections", retried for ever as "Redis unreachable": emit() hung.
    client = aioredis.Redis.from_url(redis_url, max_connections=4)
    flow = dist_flows.chain()  # 5 edges to nodes + the reply stream: 6 readers
    bus = RedisMessageBus(namespace=namespace, client=client)
    flow.run(message_bus=bus)
    try:
        with pytest.raises(BusBindError, match=r"max_connections=4, and this bus needs "
                                               r"at least 10 .*max_connections >= 18"):
            await asyncio.wait_for(bus.ready(), 10)
        with pytest.raises(BusBindError):
            await asyncio.wait_for(flow.emit(msg("x")), 10)
    finally:
        await flow.stop()
        await client.aclose()


async def test_a_client_pool_with_room_for_the_bus_carries_messages(
        redis_url: str, namespace: str) -> None:
    client = aioredis.Redis.from_url(redis_url, max_connections=10)
    flow = dist_flows.chain()
    bus = RedisMessageBus(namespace=namespace, client=client)
    flow.run(message_bus=bus)
    try:
        await asyncio.wait_for(bus.ready(), 10)
        for n in range(5):
            await flow.emit(msg(f"m{n}:"))
        got = {(await asyncio.wait_for(flow.fetch(), 10)).payload for _ in range(5)}
        assert got == {f"m{n}:abcde" for n in range(5)}
        assert bus.stats["link_errors"] == 0  # a busy pool is no Redis outage
    finally:
        await flow.stop()
        await client.aclose()


async def test_the_bus_s_own_pool_carries_a_burst_of_sends_without_waiting(
        redis_url: str, namespace: str, caplog: pytest.LogCaptureFixture) -> None:
    # Before: the bus's own client was capped at 100 connections; 400 concurrent
    # emits waited ~2,000 times for one, and the warning told the user to raise a
    # pool they never made.
    async def step(m: Message, ctx: Any) -> Message:
        return m
    flow = create(Node(step, name="e", policy=NONE).to(), name="burst", queue_maxsize=1000)
    bus = RedisMessageBus(redis_url, namespace=namespace, block_ms=100)
    flow.run(message_bus=bus)
    try:
        await asyncio.wait_for(bus.ready(), 10)
        with caplog.at_level(logging.WARNING):
            await asyncio.gather(*(flow.emit(msg(n)) for n in range(400)))
            got = {(await asyncio.wait_for(flow.fetch(), 20)).payload for _ in range(400)}
        assert got == set(range(400))
        assert bus.stats["pool_waits"] == 0
        assert not [r for r in caplog.records if r.getMessage() == "bus_pool_exhausted"]
    finally:
        await flow.stop()


async def test_a_max_connections_in_the_url_too_small_names_the_url(
        redis_url: str, namespace: str) -> None:
    flow = dist_flows.chain()
    bus = RedisMessageBus(f"{redis_url}?max_connections=4", namespace=namespace)
    flow.run(message_bus=bus)
    try:
        with pytest.raises(BusBindError, match=r"the bus URL caps the bus's connection pool "
                                               r"at max_connections=4.*raise max_connections "
                                               r"in the bus URL to >= 18 .*, or drop it"):
            await asyncio.wait_for(bus.ready(), 10)
    finally:
        await flow.stop()


# -- a stopped bus -----------------------------------------------------------------------


async def test_ready_and_cancel_after_stop_raise_flow_not_running(
        redis_url: str, namespace: str) -> None:
    bus = RedisMessageBus(redis_url, namespace=namespace)
    flow = echo()
    flow.run(message_bus=bus)
    await asyncio.wait_for(bus.ready(), 10)
    await flow.stop()
    # Before: both waited for ever for a bind that would never come.
    with pytest.raises(FlowNotRunning, match="call run"):
        await asyncio.wait_for(bus.ready(), 5)
    with pytest.raises(FlowNotRunning, match="this cancel was not broadcast"):
        await asyncio.wait_for(bus.cancel("t1"), 5)
    # And a run() again binds it again: ready() right after run() waits for that bind.
    flow.run(message_bus=bus)
    try:
        await asyncio.wait_for(bus.ready(), 10)
        await flow.emit(msg("again"))
        assert (await asyncio.wait_for(flow.fetch(), 10)).payload == "again!"
    finally:
        await flow.stop()


# -- readers never stranded, never dead ---------------------------------------------------


async def test_a_link_break_during_recovery_strands_no_entry(
        redis_url: str, namespace: str, redis: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    bus = RedisMessageBus(named(redis_url, namespace), namespace=namespace, block_ms=100,
                          max_backoff_s=0.05)
    flow = echo()
    flow.run(message_bus=bus, nodes=[])
    try:
        await asyncio.wait_for(bus.ready(), 10)
        consumer = flow.flow_id
        reply = bus.reply_stream(consumer)
        bus._reading = False  # the reader stays off once its link breaks (below)
        await cut_links(redis, namespace)
        await eventually(lambda: bus.stats["link_errors"] >= 1, "the reader saw the break")
        result = msg("lost")
        await redis.xadd(reply, {b"e": "echo->Rookery", b"d": dumps_item(result),
                                 b"t": result.trace_id,
                                 b"m": f"{consumer} hop1 - {time.time()!r} -"})
        assert await redis.xreadgroup("pf", consumer, {reply: ">"})  # the lost reply
        # The recovery finds the entry (XPENDING), then the link breaks before its
        # XRANGE is answered.
        original = Connection.pack_commands
        calls = 0

        def breaking(self: Any, commands: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RedisConnectionError("the link broke during recovery (test)")
            return original(self, commands)

        monkeypatch.setattr(Connection, "pack_commands", breaking)
        bus._reading = True
        # Before: held for ever (skipped by the next recovery, kept alive, never
        # claimed): fetch() never returned.
        got = await asyncio.wait_for(flow.fetch(), 10)
        assert got.payload == "lost" and calls >= 2
        assert bus.stats["recovered"] == 1
    finally:
        await flow.stop()


class _Unprintable(Exception):
    def __repr__(self) -> str:
        raise RuntimeError("repr refused")

    def __str__(self) -> str:
        raise RuntimeError("str refused")


class Sku(BaseModel):
    sku: str

    @model_validator(mode="before")
    @classmethod
    def check(cls, value: Any) -> Any:
        if isinstance(value, dict) and value.get("sku") == "boom":
            raise _Unprintable()
        return value


async def test_an_entry_whose_error_cannot_be_rendered_loses_only_itself(
        redis_url: str, namespace: str, redis: Any) -> None:
    bus = RedisMessageBus(redis_url, namespace=namespace, types=[Sku], block_ms=100)

    async def same(m: Message, ctx: Any) -> Message:
        return m
    flow = create(Node(same, name="echo", policy=NONE).to(), name="hostile")
    flow.run(message_bus=bus)
    try:
        await asyncio.wait_for(bus.ready(), 10)
        await flow.emit(msg(Sku.model_construct(sku="boom")))  # the hostile one
        # Before: the edge's reader died on it, and every later entry waited for ever.
        await flow.emit(msg(Sku(sku="ok")))
        got = await asyncio.wait_for(flow.fetch(), 10)
        assert got.payload == Sku(sku="ok")
        binding = flow.binding
        assert binding is not None and binding.stats["undeliverable"] == 1
        assert not [t for t in bus._tasks if t.done()]
    finally:
        await flow.stop()


async def test_a_reader_lets_go_of_an_entry_that_breaks_its_delivery_and_reads_on(
        redis_url: str, namespace: str, redis: Any, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    bus = RedisMessageBus(redis_url, namespace=namespace, block_ms=100)
    flow = echo()
    flow.run(message_bus=bus)
    try:
        await asyncio.wait_for(bus.ready(), 10)
        binding = flow.binding
        assert binding is not None
        deliver = binding.deliver
        broken = asyncio.Event()

        async def once_broken(parcel: Any, **kw: Any) -> None:
            if parcel.trace_id == "bad" and not broken.is_set():
                broken.set()
                raise _Unprintable()
            await deliver(parcel, **kw)

        async def reject_fails(*_a: Any, **_kw: Any) -> None:
            raise _Unprintable()

        monkeypatch.setattr(binding, "deliver", once_broken)
        monkeypatch.setattr(binding, "reject", reject_fails)
        with caplog.at_level(logging.ERROR):
            await flow.emit(msg("bad", trace_id="bad"))
            await broken.wait()
            await flow.emit(msg("next"))
            assert (await asyncio.wait_for(flow.fetch(), 10)).payload == "next!"
        assert bus.stats["deliver_errors"] == 1
        assert "bus_deliver_failed" in {r.getMessage() for r in caplog.records}
        stream = bus.edge_stream("OpenSea->echo")
        held = bus._in_hand.get(stream, set())
        # Let go (not held, so claimable again), still pending in Redis.
        pending = await redis.xpending(stream, "pf")
        assert pending["pending"] == 1 and _str(pending["min"]) not in held
    finally:
        await flow.stop()


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# -- a flow run again, a trace id used again -------------------------------------------------


async def test_messages_queued_at_stop_run_once_after_run_again(
        redis_url: str, namespace: str) -> None:
    runs: collections.Counter[str] = collections.Counter()
    first = asyncio.Event()

    async def slow(m: Message, ctx: Any) -> Message:
        runs[m.payload] += 1
        first.set()
        await asyncio.sleep(0.3)
        return m
    flow = create(Node(slow, name="slow", policy=NONE).to(), name="rerun")
    bus = RedisMessageBus(redis_url, namespace=namespace, claim_idle_s=0.5, block_ms=100)
    flow.run(message_bus=bus)
    await asyncio.wait_for(bus.ready(), 10)
    for n in range(6):
        await flow.emit(msg(f"m{n}"))
    await first.wait()
    await eventually(lambda: bus.stats["delivered"] >= 2, "more delivered than the one running")
    await flow.stop()
    flow.run(message_bus=bus)
    try:
        await asyncio.wait_for(bus.ready(), 10)
        got = {(await asyncio.wait_for(flow.fetch(), 15)).payload for _ in range(6)}
        assert got == {f"m{n}" for n in range(6)}
        # Past claim_idle_s: before, the claimer took the entries still queued here
        # (no longer held by the bus) and this same process ran each twice.
        await asyncio.sleep(2 * bus.claim_idle_s)  # waiting for a claim that must not come
        assert bus.stats["claimed"] == 0
        twice = {p: n for p, n in runs.items() if n > 1}
        # Only the one running at stop() runs again (it was cut off).
        assert len(twice) <= 1, twice
    finally:
        await flow.stop()


async def test_emitting_a_cancelled_trace_id_again_is_refused_naming_the_fix(
        redis_url: str, namespace: str) -> None:
    bus = RedisMessageBus(redis_url, namespace=namespace, block_ms=100)
    flow = echo()
    flow.run(message_bus=bus)
    try:
        await asyncio.wait_for(bus.ready(), 10)
        await flow.cancel("order-42")
        # Before: sent, dropped by every process as cancelled, and fetch() hung.
        with pytest.raises(InvalidArgument, match=r"trace id 'order-42' was cancelled.*"
                                                  r"new trace id \(e.g. 'order-42:2'\)"):
            await flow.emit(msg("retry", trace_id="order-42"))
        with pytest.raises(InvalidArgument, match="was cancelled"):
            flow.emit_nowait(msg("retry", trace_id="order-42"))
        await flow.emit(msg("retry", trace_id="order-42:2"))
        assert (await asyncio.wait_for(flow.fetch(), 10)).payload == "retry!"
    finally:
        await flow.stop()


def test_a_password_read_as_a_query_value_never_shows() -> None:
    # redis://admin:9?client_name=Sup3rS3cret@redis-prod: user admin, password
    # "9?client_name=Sup3rS3cret" (unescaped '?'). urllib reads an option there; the
    # URL is taken (redis-py reads host admin, port 9) but the tail never shows.
    for url in ("redis://admin:9?client_name=Sup3rS3cret@redis-prod",
                "redis://admin:9?Sup3rS3cret&client_name=y@redis-prod"):
        for make in (RedisMessageBus, RedisMessageBus.from_url):
            assert "Sup3rS3cret" not in repr(make(url))
        assert "Sup3rS3cret" not in _redact(url)
