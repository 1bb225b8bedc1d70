"""One flow across real worker processes on a real Redis (issue 16 §2-§3).

Each test starts ``pf worker`` processes (``conftest.Worker``), runs a client flow in
the test's own event loop (``nodes=[]``: it only emits and fetches), and compares
what the client fetched with a single-process run of the same flow.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import dist_flows
import pytest
from dist_support import RedisServer, Worker, bus_url, eventually

from penguiflow import Message, ModelRegistry, StreamChunk
from penguiflow.core import PenguiFlow
from penguiflow_distributed import RedisMessageBus
from penguiflow_exporters.sqlite import SQLiteStateStore

Builder = Callable[[], Any]


def _flow(builder: Builder) -> tuple[PenguiFlow, ModelRegistry | None]:
    made = builder()
    return made if isinstance(made, tuple) else (made, None)


async def local_run(builder: Builder, messages: Sequence[Message]) -> dict[str, Any]:
    """The single-process reference: trace id -> final payload."""
    flow, registry = _flow(builder)
    flow.run(registry=registry)
    try:
        for msg in messages:
            await flow.emit(msg)
        return _by_trace([await asyncio.wait_for(flow.fetch(), 10) for _ in messages])
    finally:
        await flow.stop()


def _by_trace(results: Sequence[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for result in results:
        assert isinstance(result, Message), result
        assert result.trace_id not in out, f"{result.trace_id} fetched twice"
        payload = result.payload
        out[result.trace_id] = payload.model_dump() if hasattr(payload, "model_dump") else payload
    return out


class Client:
    """A flow running no node: it emits and fetches over the bus."""

    def __init__(self, builder: Builder, url: str) -> None:
        self.flow, self.registry = _flow(builder)
        self.bus = RedisMessageBus.from_url(url)

    async def __aenter__(self) -> Client:
        self.flow.run(registry=self.registry, message_bus=self.bus, nodes=[])
        await self.bus.ready()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.flow.stop()

    async def run(self, messages: Sequence[Message], *, timeout: float = 30) -> dict[str, Any]:
        for msg in messages:
            await self.flow.emit(msg)
        return _by_trace([await asyncio.wait_for(self.flow.fetch(), timeout)
                          for _ in messages])


async def start(workers: list[Worker], flow: str, url: str, *nodes: str | None,
                store: str | None = None) -> list[Worker]:
    new = [Worker(flow, url, nodes=n, store=store) for n in nodes]
    workers.extend(new)
    await asyncio.gather(*(w.ready() for w in new))
    return new


def stats_of(worker: Worker) -> dict[str, int]:
    """The bus counters a worker printed when it stopped."""
    for line in reversed(worker.lines):
        if " stopped (" in line and "; stats " in line:
            return dict(json.loads(line.split("; stats ", 1)[1]))
    raise AssertionError(f"no stats line: {''.join(worker.lines)[-2000:]}")


# -- the shapes, across processes ------------------------------------------------------


async def test_a_chain_split_over_two_workers_gives_the_single_process_results(
        redis_url: str, namespace: str, workers: list[Worker]) -> None:
    url = bus_url(redis_url, namespace)
    first, second = await start(workers, "chain", url, "a,b,c", "d,e")
    messages = [dist_flows.message(f"m{i}:") for i in range(20)]
    async with Client(dist_flows.chain, url) as client:
        got = await client.run(messages)
    assert got == await local_run(dist_flows.chain, messages)
    assert set(got.values()) == {f"m{i}:abcde" for i in range(20)}
    assert first.terminate() == 0 and second.terminate() == 0
    # Both workers did their share: a, b, c on one; d, e on the other.
    assert stats_of(first)["delivered"] == 60 and stats_of(second)["delivered"] == 40


async def test_fan_out_and_join_across_three_workers(
        redis_url: str, namespace: str, workers: list[Worker]) -> None:
    url = bus_url(redis_url, namespace)
    # The join runs in two processes: its groups must be shared, not per process.
    await start(workers, "fanout", url, "split,left", "right,join", "join,total")
    messages = [dist_flows.message(i) for i in range(30)]
    async with Client(dist_flows.fanout, url) as client:
        got = await client.run(messages)
    assert got == await local_run(dist_flows.fanout, messages)
    assert sorted(got.values()) == [5 * i for i in range(30)]


async def test_routing_and_a_controller_loop_over_two_workers(
        redis_url: str, namespace: str, workers: list[Worker]) -> None:
    url = bus_url(redis_url, namespace)
    await start(workers, "routing", url, None, None)
    await start(workers, "controller", url, "think", "think")
    routed = [dist_flows.message(i) for i in range(10)]
    async with Client(dist_flows.routing, url) as client:
        assert await client.run(routed) == await local_run(dist_flows.routing, routed)
    loops = [dist_flows.controller_message(f"q{i}") for i in range(5)]
    async with Client(dist_flows.controller, url) as client:
        got = await client.run(loops)
    assert got == await local_run(dist_flows.controller, loops)
    assert {v["text"] for v in got.values()} == {"f0|f1|f2"}


async def test_streamed_chunks_reach_the_emitter_in_order(
        redis_url: str, namespace: str, workers: list[Worker]) -> None:
    url = bus_url(redis_url, namespace)
    await start(workers, "streaming", url, "source", "talker")
    messages = [dist_flows.message(f"s{i}") for i in range(5)]
    async with Client(dist_flows.streaming, url) as client:
        for msg in messages:
            await client.flow.emit(msg)
        seen: dict[str, list[Any]] = {m.trace_id: [] for m in messages}
        for _ in range(len(messages) * 4):  # three chunks and the answer per trace
            item = await asyncio.wait_for(client.flow.fetch(), 30)
            seen[item.trace_id].append(item.payload)
    for msg in messages:
        chunks, answer = seen[msg.trace_id][:3], seen[msg.trace_id][3]
        assert all(isinstance(c, StreamChunk) for c in chunks)
        assert [c.text for c in chunks] == [f"{msg.payload}-{i}" for i in range(3)]
        assert [c.seq for c in chunks] == [0, 1, 2] and chunks[-1].done
        assert answer == f"said:{msg.payload}"


async def test_registry_models_cross_as_models(
        redis_url: str, namespace: str, workers: list[Worker]) -> None:
    url = bus_url(redis_url, namespace)
    await start(workers, "validated", url, "intake", "pack")
    # Validated nodes take the model itself (no Message, so no trace id): a plain
    # value still comes home to the process that emitted it.
    orders = [dist_flows.Order(sku=f"k{i}", qty=i) for i in range(5)]
    async with Client(dist_flows.validated, url) as client:
        for order in orders:
            await client.flow.emit(order)
        results = [await asyncio.wait_for(client.flow.fetch(), 30) for _ in orders]
    assert all(type(r) is dist_flows.Order for r in results)
    assert sorted((r.qty, tuple(r.tags)) for r in results) == [
        (10 * i, ("in", "packed")) for i in range(5)]


# -- faults ------------------------------------------------------------------------------


async def test_a_worker_killed_mid_node_loses_no_trace(
        redis_url: str, namespace: str, workers: list[Worker], tmp_path: Path) -> None:
    url = bus_url(redis_url, namespace, claim_idle_s=1)
    store_url = f"sqlite:///{tmp_path / 'traces.db'}"
    victim, survivor = await start(workers, "chain", url, None, None, store=store_url)
    messages = [dist_flows.message(f"m{i}:", delay=0.01) for i in range(200)]
    async with Client(dist_flows.chain, url) as client:
        for msg in messages:
            await client.flow.emit(msg)
        results = [await asyncio.wait_for(client.flow.fetch(), 30) for _ in range(40)]
        victim.kill()  # SIGKILL, with ~160 traces in flight
        restarted = (await start(workers, "chain", url, None, store=store_url))[0]
        results += [await asyncio.wait_for(client.flow.fetch(), 60) for _ in range(160)]
    got = _by_trace(results)  # each trace exactly once: duplicates were dropped
    assert got == {m.trace_id: f"{m.payload}abcde" for m in messages}
    assert survivor.terminate() == 0 and restarted.terminate() == 0
    claimed = stats_of(survivor)["claimed"] + stats_of(restarted)["claimed"]
    duplicates = stats_of(survivor)["duplicates"] + stats_of(restarted)["duplicates"]
    # Only what the victim held could run twice: at most its prefetch per edge.
    assert 0 < claimed <= 5 * 16 and duplicates <= claimed
    # The store shows the dead attempt (started on the victim, never ended) and the
    # redelivered one, finished by another worker.
    async with SQLiteStateStore(tmp_path / "traces.db", readonly=True) as store:
        fetched = [e for m in messages for e in await store.load_history(m.trace_id)
                   if e.kind == "message_fetch" and e.payload.get("deliveries", 1) > 1]
    assert fetched and {e.payload["worker_id"] for e in fetched} <= {
        survivor.worker_id, restarted.worker_id}
    assert {e.payload["previous_worker"] for e in fetched} == {victim.worker_id}
    # An attempt the victim had started (and written) is closed by the worker that
    # ran its input again, never one of another worker.
    async with SQLiteStateStore(tmp_path / "traces.db", readonly=True) as store:
        histories = [await store.load_history(m.trace_id) for m in messages]
    victims = {e.invocation_id for h in histories for e in h
               if e.kind == "node_start" and e.flow_id == victim.worker_id}
    abandoned = [e for h in histories for e in h if e.kind == "node_abandoned"]
    # Each stopped attempt is closed once.
    assert len({e.invocation_id for e in abandoned}) == len(abandoned)
    for e in abandoned:
        assert e.invocation_id in victims and e.payload["worker_id"] == victim.worker_id
        assert e.flow_id in {survivor.worker_id, restarted.worker_id}
    # pf inspect marks the redelivery on a trace that crossed the workers.
    shown = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-m", "penguiflow_inspector.cli", "inspect", fetched[0].trace_id,
        "--plain", "--store", store_url], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert f"taken from stopped worker {victim.worker_id}" in shown.stdout


async def test_a_redis_restart_mid_run_loses_no_trace(
        own_redis: RedisServer, namespace: str, workers: list[Worker]) -> None:
    url = bus_url(own_redis.url, namespace, claim_idle_s=2, max_backoff_s=0.5)
    first, second = await start(workers, "chain", url, "a,b,c", "d,e")
    messages = [dist_flows.message(f"m{i}:", delay=0.005) for i in range(100)]
    async with Client(dist_flows.chain, url) as client:
        for msg in messages:
            await client.flow.emit(msg)
        results = [await asyncio.wait_for(client.flow.fetch(), 30) for _ in range(20)]
        await asyncio.to_thread(own_redis.restart)  # AOF: the streams come back
        results += [await asyncio.wait_for(client.flow.fetch(), 60) for _ in range(80)]
        assert client.bus.stats["reconnects"] >= 1
    assert _by_trace(results) == {m.trace_id: f"{m.payload}abcde" for m in messages}
    assert first.terminate() == 0 and second.terminate() == 0
    assert stats_of(first)["reconnects"] >= 1 and stats_of(second)["reconnects"] >= 1


async def test_a_cancel_from_the_client_reaches_a_node_in_another_process(
        redis_url: str, namespace: str, workers: list[Worker], tmp_path: Path) -> None:
    url = bus_url(redis_url, namespace)
    (worker,) = await start(workers, "blocking", url, None)
    started, mark = tmp_path / "started", tmp_path / "cancelled"
    msg = dist_flows.message("x", started=str(started), mark=str(mark))
    async with Client(dist_flows.blocking, url) as client:
        await client.flow.emit(msg)
        await eventually(started.exists, "the node started")
        assert await client.flow.cancel(msg.trace_id) is True
        await eventually(mark.exists, "the node saw the cancel")
    assert mark.read_text() == str(worker.proc.pid) != str(os.getpid())
    assert worker.terminate() == 0


# -- pf worker ---------------------------------------------------------------------------


async def test_pf_worker_logs_its_id_and_drains_on_sigterm(
        redis_url: str, namespace: str, workers: list[Worker]) -> None:
    (worker,) = await start(workers, "chain", bus_url(redis_url, namespace), "a")
    assert worker.worker_id and len(worker.worker_id) == 16
    assert worker.terminate(timeout=15) == 0
    assert any(f"worker {worker.worker_id} stopped" in line for line in worker.lines)


@pytest.mark.parametrize(("argv", "message"), [
    (["dist_flows:nope", "--bus", "redis://127.0.0.1:1/0"],
     "module 'dist_flows' has no attribute 'nope'"),
    (["dist_flows", "--bus", "redis://127.0.0.1:1/0"], "expected MODULE:ATTR"),
    (["dist_flows:chain"], "no bus: pass --bus"),
    (["dist_flows:chain", "--bus", "http://x"], "a Redis URL starts with redis://"),
    (["dist_flows:chain", "--bus", "redis://h/0?claim_idle_s=soon"],
     "claim_idle_s in the bus URL must be a float; got 'soon'"),
    (["dist_flows:chain", "--bus", "redis://h/0?dedup_ttl_s=inf"],
     "dedup_ttl_s must be from 1 second (a Redis TTL) to 1e+15 seconds"),
    (["dist_flows:message", "--bus", "redis://127.0.0.1:1/0"],
     "dist_flows:message() raised TypeError"),
    (["dist_flows:NONE", "--bus", "redis://127.0.0.1:1/0"],
     "dist_flows:NONE is a NodePolicy, not a PenguiFlow"),
    (["dist_flows:chain", "--bus", "redis://127.0.0.1:1/0", "--nodes", "a,zz"],
     "nodes= names no node of this flow: 'zz'"),
])
def test_pf_worker_refuses_bad_arguments_with_one_line(
        argv: list[str], message: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from penguiflow_distributed.worker import main

    monkeypatch.delenv("PENGUIFLOW_BUS", raising=False)
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
