"""RedisMessageBus under misuse and hostile input: a URL or a client the bus cannot
use, a stopped bus, a link breaking mid-recovery, an entry whose error cannot be
rendered, a flow run again after stop(), a cancelled trace id emitted again.

Each test fails on the code before its fix (found by a review of the bus)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import dist_flows
import pytest
import redis.asyncio as aioredis

from penguiflow import Headers, Message, Node, NodePolicy, create
from penguiflow.core import PenguiFlow
from penguiflow.errors import FlowNotRunning, InvalidArgument
from penguiflow_distributed import BusBindError, RedisMessageBus

NONE = NodePolicy(validate="none")


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Any]:
    client = aioredis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


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
