"""One flow, three processes: two ``pf worker`` processes and this client, over Redis.

The client (this process) runs no node (``nodes=[]``): it sends 50 orders through
the shop flow (``shop.py``: fan-out to price and stock, ``join_k``, invoice), and
its results come back to it. Mid-run it kills worker 1 with SIGKILL; the entries
worker 1 held go idle in Redis, worker 2 claims them after ``claim_idle_s`` (1 s
here) and runs them again, and the outputs of the re-run nodes are dropped as
duplicates (same hop ids). Every trace completes, once. The store (Postgres when
``PENGUIFLOW_STORE`` or ``TEST_PG_DSN`` names one, else SQLite in a temporary
directory) then tells which parcels were redelivered and which traces ran on both
workers.

Redis: ``$PENGUIFLOW_BUS`` if set, else a throwaway ``redis-server`` on a free
loopback port (without one installed, the example says how to get one and exits 0).
Every process it starts is stopped before it exits, whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # shop.py, whatever the working directory

import redis.asyncio as aioredis  # noqa: E402
from shop import PRICES, build  # noqa: E402

from penguiflow import Headers, Message  # noqa: E402
from penguiflow_distributed import RedisMessageBus  # noqa: E402
from penguiflow_exporters import open_store  # noqa: E402

ORDERS = 50
KILL_AFTER = 12  # results back before worker 1 is killed
BUDGET_S = 50  # the whole run, startup included
SKUS = sorted(PRICES)


def _die_with_parent() -> None:
    """In a child, before exec (Linux): SIGKILL it if this process dies first, so a
    killed example (a test's timeout) leaves no Redis or worker behind."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Children:
    """Every process this example starts, stopped (their whole group) on exit."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        # A session of its own: killing the group also takes the worker's helpers
        # (its store's writer process, which also exits when its pipe closes).
        preexec = _die_with_parent if sys.platform.startswith("linux") else None
        proc = subprocess.Popen(argv, start_new_session=True,  # type: ignore[call-overload]
                                preexec_fn=preexec, **kwargs)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError):  # the group, helpers included
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def start_redis(children: Children, tmp: Path) -> str | None:
    """A throwaway redis-server on a free loopback port; its URL (None: none installed)."""
    server = shutil.which("redis-server")
    if server is None:
        return None
    port = free_port()
    children.start([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                    "--appendonly", "no", "--dir", str(tmp)],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = aioredis.Redis.from_url(url)
    try:
        for _ in range(100):
            with contextlib.suppress(OSError, aioredis.ConnectionError):
                await client.ping()
                return url
            await asyncio.sleep(0.05)
    finally:
        await client.aclose()
    raise RuntimeError(f"redis-server did not answer on port {port}")


def with_options(url: str, **options: object) -> str:
    """``url`` with ``options`` in its query, unless the query sets them already."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    for key, value in options.items():
        query.setdefault(key, str(value))
    return urlunsplit(parts._replace(query=urlencode(query)))


def start_worker(children: Children, n: int, bus_url: str, store_url: str,
                 tmp: Path) -> tuple[subprocess.Popen[bytes], Path]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p))
    log = tmp / f"worker{n}.log"
    with log.open("wb") as err:
        proc = children.start(
            [sys.executable, "-m", "penguiflow_distributed.worker", "shop:build",
             "--bus", bus_url, "--store", store_url, "--grace", "5", "--log-level", "WARNING"],
            stdout=subprocess.DEVNULL, stderr=err, env=env)
    return proc, log


def _read(log: Path) -> str:
    return log.read_text(errors="replace")


async def worker_id(proc: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> str:
    """The worker id the worker prints once it reads its edges."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in _read(log).splitlines():
            if line.startswith("pf worker: worker "):
                return line.split()[3]
        if proc.poll() is not None:
            break
        await asyncio.sleep(0.05)
    raise RuntimeError(f"worker (pid {proc.pid}) did not start:\n{_read(log)}")


def expected(order: dict[str, object]) -> dict[str, object]:
    qty = int(order["qty"])  # type: ignore[call-overload]
    return {"total": round(PRICES[str(order["sku"])] * qty, 2), "in_stock": qty <= 3}


async def run(children: Children, tmp: Path) -> int:
    bus_url = os.environ.get("PENGUIFLOW_BUS")
    if bus_url:
        print("redis: $PENGUIFLOW_BUS")
    else:
        bus_url = await start_redis(children, tmp)
        if bus_url is None:
            print("no Redis: install redis-server (apt-get install redis-server, brew install "
                  "redis) or set PENGUIFLOW_BUS=redis://host:6379/0")
            return 0
        print("redis: a throwaway redis-server on 127.0.0.1")
    namespace = f"shopdemo{uuid.uuid4().hex[:8]}"  # this run's keys only
    bus_url = with_options(bus_url, namespace=namespace, claim_idle_s=1)
    try:
        return await demo(children, tmp, bus_url)
    finally:
        if os.environ.get("PENGUIFLOW_BUS"):  # a Redis of yours: leave nothing in it
            children.stop_all()  # first, or a worker would recreate its streams
            await purge(bus_url, namespace)


async def demo(children: Children, tmp: Path, bus_url: str) -> int:
    """Two workers, one client, a SIGKILL; then what the store says."""
    store_var = next((v for v in ("PENGUIFLOW_STORE", "TEST_PG_DSN") if os.environ.get(v)),
                     None)
    if store_var:
        store_url = os.environ[store_var]
        print(f"store: {store_url.split(':', 1)[0]} (${store_var})")
    else:
        store_url = f"sqlite:///{tmp}/traces.db"
        print("store: sqlite, in a temporary directory")

    workers = [start_worker(children, n, bus_url, store_url, tmp) for n in (1, 2)]
    ids = [await worker_id(proc, log) for proc, log in workers]
    names = {wid: f"w{n}" for n, wid in enumerate(ids, 1)}
    for n, ((proc, _log), wid) in enumerate(zip(workers, ids, strict=True), 1):
        print(f"worker {n} ready: id {wid}, pid {proc.pid}, runs every node")

    flow = build()
    bus = RedisMessageBus.from_url(bus_url)
    orders = {}
    async with open_store(store_url) as store:
        flow.run(message_bus=bus, state_store=store, nodes=[])  # a client: runs no node
        try:
            await asyncio.wait_for(bus.ready(), 10)
            client_id = flow.binding.worker_id if flow.binding else "?"
            names[client_id] = "client"
            for i in range(ORDERS):
                order = {"order": i, "sku": SKUS[i % len(SKUS)], "qty": 1 + i % 5}
                msg = Message(payload=order, headers=Headers(tenant="shop"))
                orders[msg.trace_id] = order
                await flow.emit(msg)
            print(f"client: {ORDERS} orders sent (nodes=[]: this process runs no node)")
            results: dict[str, object] = {}
            for n in range(1, ORDERS + 1):
                result = await asyncio.wait_for(flow.fetch(), 20)
                results[result.trace_id] = result.payload
                if n == KILL_AFTER:
                    victim = workers[0][0]
                    victim.send_signal(signal.SIGKILL)
                    victim.wait()
                    print(f"client: {KILL_AFTER} results back; SIGKILL worker 1 (pid {victim.pid})")
            with contextlib.suppress(TimeoutError):  # a result twice would come now
                extra = await asyncio.wait_for(flow.fetch(), 1.5)
                print(f"client: unexpected extra result of trace {extra.trace_id}")
                return 1
            right = all(results.get(t) == expected(o) for t, o in orders.items())
            print(f"client: all {len(results)} results back, once each, every one right: {right}")
            if not right:
                return 1
        finally:
            await flow.stop()

    # Worker 2 drains on SIGTERM: its last events reach the store before it exits.
    survivor = workers[1][0]
    survivor.send_signal(signal.SIGTERM)
    print(f"worker 2 stopped by SIGTERM, exit status {survivor.wait(15)}")
    await report(store_url, store_var, list(orders), names)
    return 0


async def purge(bus_url: str, namespace: str) -> None:
    """Delete this run's keys (a shared Redis keeps no leftovers of the demo)."""
    client = aioredis.Redis.from_url(bus_url.split("?", 1)[0])
    try:
        keys = [key async for key in client.scan_iter(match=f"{namespace}:*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


async def report(store_url: str, store_var: str | None, trace_ids: list[str],
                 names: dict[str, str]) -> None:
    """What the store recorded: redeliveries, duplicates, traces run on both workers.

    Every ``message_fetch`` event says which edge a parcel came along, which worker
    took it (``worker_id``) and how many times it was delivered (``deliveries``).
    """
    redelivered = duplicates = 0
    crossed: list[tuple[int, str, dict[str, list[str]]]] = []
    async with open_store(store_url, readonly=True) as store:
        for trace_id in trace_ids:
            hops: dict[str, list[str]] = defaultdict(list)  # edge -> who took it
            again = 0
            for ev in await store.load_history(trace_id):
                if ev.kind == "message_emit" and ev.payload.get("duplicate"):
                    duplicates += 1
                if ev.kind != "message_fetch" or ev.payload["edge"].endswith("->Rookery"):
                    continue
                deliveries = ev.payload["deliveries"]
                who = names.get(ev.payload["worker_id"], "?")
                if deliveries > 1:
                    again += 1
                    who += f" (delivery {deliveries})"
                hops[ev.payload["edge"]].append(who)
            redelivered += again
            workers = {who.split()[0] for takers in hops.values() for who in takers}
            if {"w1", "w2"} <= workers:
                crossed.append((again, trace_id, hops))
    print(f"store: {redelivered} parcels delivered again after the kill "
          f"(message_fetch with deliveries > 1)")
    print(f"store: {duplicates} outputs of re-run nodes dropped as duplicates "
          f"(message_emit with duplicate=True)")
    print(f"store: {len(crossed)} of {len(trace_ids)} traces ran on both workers")
    if not crossed:
        return
    _again, trace_id, hops = max(crossed, key=lambda c: c[0])  # one that was redelivered
    print(f"e.g. trace {trace_id}, edge by edge:")
    for edge, takers in hops.items():
        print(f"  {edge:<18} {', then '.join(takers)}")
    if store_var:
        print(f'see it: pf inspect {trace_id[:12]} --plain --store "${store_var}"')
    else:
        print("see it: run with PENGUIFLOW_STORE=sqlite:////tmp/shop.db to keep the store, "
              "then pf inspect <trace id> --plain --store sqlite:////tmp/shop.db")


async def main() -> int:
    children = Children()
    try:
        with tempfile.TemporaryDirectory(prefix="pf-distributed-") as tmp:
            try:  # well within the 60 s the example tests allow
                return await asyncio.wait_for(run(children, Path(tmp)), BUDGET_S)
            finally:
                children.stop_all()
    finally:
        children.stop_all()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
