"""Distributed rows (issue 16 §5): a chain N=5 over Redis Streams against a bare redis-py floor.

    uv run python benchmarks/distributed.py [--quick] [--reps N] [--json FILE] [-v]
                                            [--profile DIR]

Redis: ``$PF_BENCH_REDIS_URL`` (e.g. ``redis://127.0.0.1:6379/0``; every key this
script writes is under a ``pfbench...`` prefix and deleted at the end), else a
throwaway ``redis-server`` on a free loopback port (no persistence), stopped at the
end. Every process the script starts (that server, the floor's consumer, the
workers) is stopped on the way out, also after a failure, Ctrl-C or SIGTERM.

* **floor** -- two processes on the same Redis, bare ``redis.asyncio``: this
  process awaits one ``XADD`` per message (200-byte body + a ``time.time()``
  stamp); a consumer process loops ``XREADGROUP`` (COUNT 16, BLOCK 1000, as the
  bus reads) and ``XACK`` per entry. *Throughput*: M messages, from the first
  XADD to the consumer's receipt+ack of the last (it stamps that time back on a
  side stream). *Latency*: one message in flight (ping-pong: the consumer answers
  each on a side stream, which is not timed); one hop = the XADD's stamp to the
  moment the consumer's XREADGROUP returned it (same machine, wall clock).
* **chain N=5** -- ``a -> b -> c -> d -> e -> Rookery`` of identity nodes
  (``validate="none"``, queue 64), run by ``pf worker`` processes (``--nodes``),
  fed and drained by this process (``flow.run(nodes=[])``, ``emit``/``fetch``).
  Every put crosses Redis: a trace makes **6 stream hops** (client->a, a->b, ...,
  d->e, and e's result to the client's reply stream), each one SEND script, one
  XREADGROUP and a share of one batched SETTLE script (the reply is settled on receipt).
  *Throughput per hop* = 6·M / t for M traces, a producer task awaiting ``emit``
  and a consumer task awaiting ``fetch`` (as ``benchmarks/run.py``), after a
  warm-up. *One-hop latency*: one trace in flight; ``e2e/6`` = the p50 of
  emit->fetch divided by 6 (node work and the client's own sending included);
  ``send->node stamps`` = each node compares ``time.time()`` with the parcel's
  send stamp (``Inbound.ts``, taken just before the bus's SEND), the direct
  analogue of the floor's figure, pooled over the 5 node hops.
* **workers** -- ``2 workers (a,b,c / d,e)``: a pipeline split; ``k workers (all
  nodes each)``: k replicas sharing every edge's consumer group. Every set (2 + 1 +
  2 + 4 workers) runs from the start in a namespace of its own, with its own client
  flow here; a set not being measured idles in blocking reads (~8 reads per process
  per second).

Throughput: each repetition runs the floor and each worker set once, in a rotating
order (as ``benchmarks/run.py`` interleaves); latency: the floor and the split chain
likewise. Medians over repetitions; ``ratio = ours / floor`` (throughput per hop:
issue 16's target is ≥ 0.5x; one-hop latency p50: ≤ 2x). After the table, per
throughput run: CPU µs per message/hop of each process group (``/proc``, Redis
``INFO cpu``) and how many Redis commands ran per message/hop (``INFO
commandstats``, commands inside Lua scripts included).

``--profile DIR`` runs the workers under cProfile (``DIR/worker-<namespace>-<k>.prof``,
written when they drain) and this process too (``DIR/client.prof``): not for timing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import itertools
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from penguiflow import PenguiFlow

SCRIPT = Path(__file__).resolve()
HERE = SCRIPT.parent
FLOW_NAME = "pfbench_chain"
NODES = ("a", "b", "c", "d", "e")
HOPS = len(NODES) + 1  # client->a, a->b, b->c, c->d, d->e, e->client
QUEUE_MAXSIZE = 64
GROUP = "pf"
BODY = b"x" * 200


# --------------------------------------------------------------------------- the flow
# Imported by the workers as ``distributed:build_chain`` (this folder on PYTHONPATH):
# nothing at module level but the standard library.


async def _node(msg: Any, ctx: Any) -> Any:
    lat = msg.meta.get("lat")
    if lat is not None:  # latency runs only: parcel sent -> this node running
        from penguiflow.binding import BusBinding

        inbound = BusBinding.current()
        if inbound is not None:
            lat.append(time.time() - inbound.ts)
    return msg


def build_chain() -> PenguiFlow:
    """``a -> b -> c -> d -> e -> Rookery``, identity nodes, validate="none", queue 64."""
    from penguiflow import Node, NodePolicy, create

    nodes = [Node(_node, name=n, policy=NodePolicy(validate="none")) for n in NODES]
    adjacencies = [left.to(right) for left, right in itertools.pairwise(nodes)]
    adjacencies.append(nodes[-1].to())
    return create(*adjacencies, name=FLOW_NAME, queue_maxsize=QUEUE_MAXSIZE)


# --------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    reps: int = 5
    floor_m: int = 10_000  # messages per floor throughput repetition
    chain_m: int = 1_500  # traces per chain throughput repetition (x6 hops)
    chain_warmup: int = 200
    latency_m: int = 300  # per repetition, one in flight (floor pings / chain traces)
    latency_warmup: int = 30
    scaling: tuple[int, ...] = (1, 2, 4)


QUICK = Config(reps=1, floor_m=500, chain_m=120, chain_warmup=20, latency_m=20,
               latency_warmup=5)


# --------------------------------------------------------------------------- processes


class Processes:
    """Every child process this script starts; :meth:`kill_all` on the way out."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, args: Sequence[str], **kwargs: Any) -> tuple[
            subprocess.Popen[bytes], Path]:
        log = self.tmp / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(list(args), stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, **kwargs)
        self.procs.append(proc)
        return proc, log

    async def wait_for_line(self, proc: subprocess.Popen[bytes], log: Path, prefix: str,
                            timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in _read_log(log).splitlines():
                if line.startswith(prefix):
                    return line
            if proc.poll() is not None:
                break
            await asyncio.sleep(0.02)
        tail = _read_log(log)[-3000:]
        raise RuntimeError(f"{proc.args!r} did not print {prefix!r} (exit {proc.poll()}):\n"
                           f"{tail}")

    @staticmethod
    def stop(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> int | None:
        """SIGTERM, wait, SIGKILL if needed; the exit status after SIGTERM (None: killed)."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                return proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                return None
        return proc.returncode

    def kill_all(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
        self.procs.clear()


def _read_log(log: Path) -> str:
    return log.read_text("utf-8", "replace")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def start_redis(procs: Processes) -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("distributed.py: PF_BENCH_REDIS_URL is unset and redis-server is "
                         "not installed (apt-get install redis-server)")
    port = _free_port()
    data = procs.tmp / "redis"
    data.mkdir()
    proc, _log = procs.start("redis-server", [
        binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
        "--appendonly", "no", "--dir", str(data)])
    url = f"redis://127.0.0.1:{port}/0"
    import redis.asyncio as aioredis

    deadline = time.monotonic() + 10
    while True:
        r = aioredis.Redis.from_url(url)
        try:
            await r.ping()
            return url
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {port}") from None
            await asyncio.sleep(0.02)
        finally:
            await r.aclose()


# --------------------------------------------------------------------------- CPU accounting


def _proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (Linux /proc; 0.0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


Snapshot = tuple[float, float, float, dict[str, int]]


async def cpu_snapshot(r: Any, pids: Sequence[int]) -> Snapshot:
    """CPU seconds so far of (this process, the processes ``pids``, the Redis server),
    and the Redis server's command counts (INFO commandstats; commands run inside
    Lua scripts are counted too)."""
    info = await r.info("cpu")
    server = float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
    stats = await r.info("commandstats")
    calls = {key.removeprefix("cmdstat_"): int(v["calls"]) for key, v in stats.items()}
    return time.process_time(), sum(_proc_cpu_s(pid) for pid in pids), server, calls


def cpu_per(before: Snapshot, after: Snapshot, units: int) -> dict[str, float]:
    """Per unit (message or hop): CPU µs of this process, of the others and of Redis,
    and ``cmd_<name>``: how many times Redis ran each command."""
    own, peers, server = ((b - a) / units * 1e6
                          for a, b in zip(before[:3], after[:3], strict=True))
    out = {"cpu_own_us": own, "cpu_peers_us": peers, "cpu_redis_us": server}
    for name, n in after[3].items():
        if name not in ("info", "ping"):
            out[f"cmd_{name}"] = (n - before[3].get(name, 0)) / units
    return out


# --------------------------------------------------------------------------- the floor


async def floor_consumer(url: str, stream: str, done: str, answers: str) -> None:
    """The floor's second process: XREADGROUP + XACK per entry, forever (until 'q')."""
    import redis.asyncio as aioredis
    from redis.exceptions import ResponseError

    r = aioredis.Redis.from_url(url)
    with contextlib.suppress(ResponseError):
        await r.xgroup_create(stream, GROUP, id="0", mkstream=True)
    print("floor consumer: ready", flush=True)
    while True:
        reply = await r.xreadgroup(GROUP, "c1", {stream: ">"}, count=16, block=1000)
        now = time.time()
        for _stream, entries in reply or ():
            for entry, fields in entries:
                await r.xack(stream, GROUP, entry)
                kind = fields[b"k"]
                if kind == b"end":  # the last of a throughput run: stamp it back
                    await r.xadd(done, {b"t": repr(time.time())})
                elif kind == b"ping":  # one in flight: its one-hop latency, answered
                    await r.xadd(answers, {b"t0": fields[b"t"], b"t1": repr(now)})
                elif kind == b"q":
                    await r.aclose()
                    return


class Floor:
    """This process's side of the floor (the producer), over its own redis-py client."""

    def __init__(self, url: str, prefix: str, procs: Processes) -> None:
        self.url = url
        self.stream = f"{prefix}:floor"
        self.done = f"{prefix}:floor:done"
        self.answers = f"{prefix}:floor:answers"
        self.procs = procs
        self.proc: subprocess.Popen[bytes] | None = None
        self.r: Any = None
        self.last_done = b"0-0"
        self.last_answer = b"0-0"

    async def start(self) -> None:
        import redis.asyncio as aioredis

        self.r = aioredis.Redis.from_url(self.url)
        self.proc, log = self.procs.start("floor-consumer", [
            sys.executable, str(SCRIPT), "--floor-consumer", self.url,
            self.stream, self.done, self.answers])
        await self.procs.wait_for_line(self.proc, log, "floor consumer: ready")

    async def close(self) -> None:
        if self.r is not None:
            with contextlib.suppress(Exception):
                await self.r.xadd(self.stream, {b"d": b"", b"t": b"0", b"k": b"q"})
            await self.r.aclose()
        if self.proc is not None:
            await asyncio.to_thread(self.procs.stop, self.proc, 5.0)

    async def _until(self, stream: str, last: bytes) -> tuple[bytes, dict[bytes, bytes]]:
        while True:
            reply = await self.r.xread({stream: last}, count=1, block=10_000)
            if reply:
                entry, fields = reply[0][1][0]
                return entry, fields
            raise RuntimeError("the floor consumer stopped answering")

    async def throughput(self, m: int) -> dict[str, float]:
        r, stream = self.r, self.stream
        await r.xtrim(stream, maxlen=0)  # the consumed entries of the last run
        import gc

        gc.collect()
        assert self.proc is not None
        cpu0 = await cpu_snapshot(r, [self.proc.pid])
        t0 = time.time()
        for _ in range(m - 1):
            await r.xadd(stream, {b"d": BODY, b"t": repr(time.time()), b"k": b"x"})
        await r.xadd(stream, {b"d": BODY, b"t": repr(time.time()), b"k": b"end"})
        self.last_done, fields = await self._until(self.done, self.last_done)
        elapsed = float(fields[b"t"]) - t0
        cpu = cpu_per(cpu0, await cpu_snapshot(r, [self.proc.pid]), m)
        return {"msgs_s": m / elapsed, "s": elapsed, "wall_us": elapsed / m * 1e6, **cpu}

    async def latency(self, m: int, warmup: int) -> dict[str, float]:
        r, stream = self.r, self.stream
        await r.xtrim(stream, maxlen=0)
        hops: list[float] = []
        rtts: list[float] = []
        for i in range(warmup + m):
            t0 = time.perf_counter()
            await r.xadd(stream, {b"d": BODY, b"t": repr(time.time()), b"k": b"ping"})
            self.last_answer, fields = await self._until(self.answers, self.last_answer)
            rtt = time.perf_counter() - t0
            if i >= warmup:
                hops.append((float(fields[b"t1"]) - float(fields[b"t0"])) * 1e6)
                rtts.append(rtt * 1e6)
        return {"p50_us": statistics.median(hops), "rtt_p50_us": statistics.median(rtts)}


# --------------------------------------------------------------------------- the chain


class Chain:
    """The client flow in this process and the ``pf worker`` processes of one namespace."""

    def __init__(self, url: str, namespace: str, procs: Processes,
                 profile: Path | None) -> None:
        self.url = url
        self.namespace = namespace
        self.bus_url = f"{url}?namespace={namespace}"
        self.procs = procs
        self.profile = profile
        self.workers: list[subprocess.Popen[bytes]] = []
        self.flow: Any = None
        self.bus: Any = None
        self._n = 0
        #: A plain redis-py client for Redis INFO (CPU accounting), set by run_all.
        self.stats_client: Any = None

    def _worker_command(self, k: int, nodes: str | None) -> list[str]:
        tail = ["distributed:build_chain", "--bus", self.bus_url, "--grace", "10",
                "--log-level", "WARNING"]
        if nodes is not None:
            tail += ["--nodes", nodes]
        if self.profile is not None:
            out = self.profile / f"worker-{self.namespace}-{k}.prof"
            return [sys.executable, "-m", "cProfile", "-o", str(out), "-m",
                    "penguiflow_distributed.worker", *tail]
        pf = Path(sys.executable).with_name("pf")
        if pf.exists():
            return [str(pf), "worker", *tail]
        return [sys.executable, "-m", "penguiflow_distributed.worker", *tail]

    def spawn(self, count: int, nodes: Sequence[str | None]) -> list[
            tuple[subprocess.Popen[bytes], Path]]:
        """Start ``count`` workers (``nodes[i]``: the i-th one's --nodes); see :meth:`wait`."""
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])}
        started = []
        for i in range(count):
            self._n += 1
            proc, log = self.procs.start(
                f"worker-{self.namespace}-{self._n}",
                self._worker_command(self._n, nodes[i]), env=env, cwd=str(HERE))
            self.workers.append(proc)
            started.append((proc, log))
        return started

    async def wait(self, started: Sequence[tuple[subprocess.Popen[bytes], Path]]) -> None:
        """Wait until the workers ``spawn`` started read their edges."""
        for proc, log in started:
            await self.procs.wait_for_line(proc, log, "pf worker: worker ")

    async def start_client(self) -> None:
        from penguiflow_distributed import RedisMessageBus

        self.flow = build_chain()
        self.bus = RedisMessageBus.from_url(self.bus_url)
        self.flow.run(message_bus=self.bus, nodes=[])
        await asyncio.wait_for(self.bus.ready(), 30)

    async def close(self) -> list[int | None]:
        """Stop the client flow and the workers (SIGTERM: they drain), together."""
        flow, self.flow = self.flow, None
        stops = [asyncio.to_thread(self.procs.stop, p, 20.0) for p in self.workers]
        if flow is not None:
            stops.append(flow.stop())
        codes = await asyncio.gather(*stops)
        self.workers = []
        return list(codes[:len(stops) - (flow is not None)])

    @staticmethod
    def _messages(m: int, *, latency: bool = False) -> list[Any]:
        from penguiflow import Headers, Message

        return [Message(payload=i, headers=Headers(tenant="bench"),
                        meta={"lat": []} if latency else {}) for i in range(m)]

    async def warm_up(self, m: int) -> None:
        from harness import pump

        _elapsed, out = await pump(self.flow.emit, self.flow.fetch, self._messages(m), m)
        _check(out, m)

    async def throughput(self, m: int) -> dict[str, float]:
        import gc

        from harness import pump

        pids = [p.pid for p in self.workers]
        msgs = self._messages(m)
        gc.collect()
        cpu0 = await cpu_snapshot(self.stats_client, pids)
        elapsed, out = await pump(self.flow.emit, self.flow.fetch, msgs, m)
        cpu = cpu_per(cpu0, await cpu_snapshot(self.stats_client, pids), m * HOPS)
        _check(out, m)
        return {"hop_msgs_s": m * HOPS / elapsed, "traces_s": m / elapsed, "s": elapsed,
                "wall_us": elapsed / (m * HOPS) * 1e6, **cpu}

    async def latency(self, m: int, warmup: int) -> dict[str, float]:
        import gc

        flow = self.flow
        msgs = self._messages(warmup + m, latency=True)
        e2e: list[float] = []
        stamps: list[float] = []
        gc.collect()
        for i, msg in enumerate(msgs):
            t0 = time.perf_counter()
            await flow.emit(msg)
            out = await flow.fetch()
            dt = time.perf_counter() - t0
            if out.payload != msg.payload:
                raise AssertionError(f"latency run got {out.payload!r} for {msg.payload!r}")
            if i >= warmup:
                e2e.append(dt * 1e6)
                stamps.extend(s * 1e6 for s in out.meta["lat"])
        if len(stamps) != len(NODES) * m:
            raise AssertionError(f"{len(stamps)} node stamps for {m} traces")
        return {"e2e_p50_us": statistics.median(e2e),
                "hop_p50_us": statistics.median(e2e) / HOPS,
                "stamp_p50_us": statistics.median(stamps)}


def _check(out: Sequence[Any], m: int) -> None:
    got = sorted(item.payload for item in out)
    if got != list(range(m)):
        raise AssertionError(f"the chain lost or duplicated traces ({len(out)} of {m})")


# --------------------------------------------------------------------------- rows


Side = Callable[[], Awaitable[dict[str, float]]]


async def _interleave(sides: Sequence[Side], reps: int, what: str) -> list[list[dict[str, float]]]:
    from harness import interleave, watchdog

    async with watchdog(what, 60.0 * reps):
        return await interleave(sides, reps)


def _row(workload: str, unit: str, floor: list[dict[str, float]] | None, fkey: str,
         ours: list[dict[str, float]] | None, okey: str, note: str = "") -> Any:
    from harness import Row

    fs = [r[fkey] for r in floor] if floor else []
    os_ = [r[okey] for r in ours] if ours else []
    return Row(workload, unit, statistics.median(fs) if fs else None,
               statistics.median(os_) if os_ else None, fs, os_, note=note)


async def run_all(cfg: Config, url: str, procs: Processes, prefix: str,
                  profile: Path | None, progress: Callable[[str], None]
                  ) -> tuple[list[Any], list[str]]:
    """Start every worker set at once (one namespace each: a set not being measured
    idles in blocking reads), then interleave the floor and every set's throughput
    run, then the floor's and the split chain's latency runs."""
    floor = Floor(url, prefix, procs)
    split = Chain(url, f"{prefix}s", procs, profile)
    replicas = {k: Chain(url, f"{prefix}r{k}", procs, profile) for k in cfg.scaling}
    chains = [split, *replicas.values()]
    try:
        progress("floor: starting its consumer process")
        await floor.start()
        progress(f"starting {2 + sum(cfg.scaling)} pf worker processes")
        started = split.spawn(2, ["a,b,c", "d,e"])
        for k, chain in replicas.items():
            started += chain.spawn(k, [None] * k)
        for chain in chains:
            chain.stats_client = floor.r
            await chain.wait(started[:len(chain.workers)])
            started = started[len(chain.workers):]
            await chain.start_client()
        progress("warm-up")
        await floor.throughput(max(cfg.floor_m // 10, 50))
        await floor.latency(cfg.latency_warmup, 0)
        for chain in chains:
            await chain.warm_up(cfg.chain_warmup)

        def floor_tp() -> Awaitable[dict[str, float]]:
            return floor.throughput(cfg.floor_m)

        def chain_tp(chain: Chain) -> Side:
            return lambda: chain.throughput(cfg.chain_m)

        progress("throughput: floor, split, " + ", ".join(f"{k} workers" for k in replicas))
        ftp, ctp, *scaled_reps = await _interleave(
            [floor_tp, chain_tp(split), *(chain_tp(c) for c in replicas.values())],
            cfg.reps, "throughput")
        progress("latency: floor, split")
        flat, clat = await _interleave(
            [lambda: floor.latency(cfg.latency_m, cfg.latency_warmup),
             lambda: split.latency(cfg.latency_m, cfg.latency_warmup)], cfg.reps, "latency")
        progress("stopping")
        codes = [c for chain_codes in await asyncio.gather(*(c.close() for c in chains))
                 for c in chain_codes]
        if any(code != 0 for code in codes):
            progress(f"warning: worker exit statuses {codes} (0 expected after SIGTERM)")
    finally:
        for chain in chains:
            with contextlib.suppress(Exception):
                await chain.close()
        await floor.close()

    scaled = list(zip(replicas, scaled_reps, strict=True))
    rows = [
        _row("floor: redis-py XADD→XREADGROUP→XACK, 2 processes", "msgs/s",
             ftp, "msgs_s", None, ""),
        _row("floor: one-hop latency p50 (XADD stamp → XREADGROUP return)", "µs",
             flat, "p50_us", None, ""),
        _row("chain N=5, 2 workers (a,b,c / d,e), throughput per hop", "msgs/s",
             ftp, "msgs_s", ctp, "hop_msgs_s",
             f"{statistics.median(r['traces_s'] for r in ctp):.0f} traces/s"),
        _row("chain N=5, 2 workers (a,b,c / d,e), one-hop latency p50 = e2e/6", "µs",
             flat, "p50_us", clat, "hop_p50_us",
             f"e2e p50 {statistics.median(r['e2e_p50_us'] for r in clat):.0f} µs"),
        _row("chain N=5, 2 workers (a,b,c / d,e), one-hop latency p50, send→node stamps",
             "µs", flat, "p50_us", clat, "stamp_p50_us"),
    ]
    base = statistics.median(r["hop_msgs_s"] for r in scaled[0][1])
    for k, c in scaled:
        mine = statistics.median(r["hop_msgs_s"] for r in c)
        rows.append(_row(f"chain N=5, {k} worker{'s' if k > 1 else ''} (all nodes each), "
                         "throughput per hop", "msgs/s", ftp, "msgs_s", c, "hop_msgs_s",
                         f"{mine / base:.2f}x 1 worker"))

    def cpu(label: str, reps: list[dict[str, float]], own: str, peers: str, unit: str) -> str:
        med = {k: statistics.median(r.get(k, 0.0) for r in reps)
               for k in sorted({k for r in reps for k in r})}
        total = med["cpu_own_us"] + med["cpu_peers_us"] + med["cpu_redis_us"]
        cmds = ", ".join(f"{k[4:]} {v:.2f}" for k, v in sorted(
            med.items(), key=lambda kv: -kv[1]) if k.startswith("cmd_") and v >= 0.01)
        return (f"#   {label}: {own} {med['cpu_own_us']:.0f} + {peers} "
                f"{med['cpu_peers_us']:.0f} + redis-server {med['cpu_redis_us']:.0f} = "
                f"{total:.0f} µs CPU per {unit}, wall {med['wall_us']:.0f} µs per {unit} "
                f"({total / med['wall_us']:.2f} cores busy); Redis commands per {unit}: "
                f"{cmds}")

    notes = ["# CPU per message / hop during the throughput runs (medians; /proc and "
             "Redis INFO cpu):",
             cpu("floor", ftp, "producer", "consumer", "msg"),
             cpu("chain, 2 workers (a,b,c / d,e)", ctp, "client", "workers", "hop")]
    notes += [cpu(f"chain, {k} worker{'s' if k > 1 else ''} (all nodes)", c, "client",
                  "workers", "hop") for k, c in scaled]
    return rows, notes


async def _delete_keys(url: str, prefix: str) -> int:
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(url)
    n = 0
    try:
        batch: list[bytes] = []
        async for key in r.scan_iter(match=f"{prefix}*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                n += await r.unlink(*batch)
                batch = []
        if batch:
            n += await r.unlink(*batch)
    finally:
        await r.aclose()
    return n


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--floor-consumer"]:
        asyncio.run(floor_consumer(*argv[1:5]))
        return 0
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny M, 1 rep: smoke mode")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 5)")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE",
                        help="also write the results as JSON to FILE")
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR",
                        help="cProfile the workers and this process into DIR (not for timing)")
    parser.add_argument("-v", "--verbose", action="store_true", help="progress on stderr")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else Config()
    if args.reps is not None:
        cfg = dataclasses.replace(cfg, reps=max(1, args.reps))
    sys.path.insert(0, str(HERE))
    from harness import render_table

    def progress(msg: str) -> None:
        if args.verbose:
            print(f"[bench] {time.perf_counter() - t0:6.2f}s {msg}", file=sys.stderr, flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="pfbench-dist-"))
    procs = Processes(tmp)
    prefix = f"pfbench{uuid.uuid4().hex[:8]}"
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.UTC)
    t0 = time.perf_counter()
    url = os.environ.get("PF_BENCH_REDIS_URL") or ""
    where = f"$PF_BENCH_REDIS_URL ({url.split('@')[-1]})" if url else ""
    server = ""

    terms = 0

    def on_sigterm(task: asyncio.Task[Any]) -> None:
        # First SIGTERM: cancel the run (as Ctrl-C does), the clean-up below runs.
        # A second one: kill the children now and leave.
        nonlocal terms
        terms += 1
        if terms == 1:
            task.cancel()
            return
        procs.kill_all()
        shutil.rmtree(tmp, ignore_errors=True)
        os._exit(143)

    async def go() -> tuple[list[Any], list[str]]:
        nonlocal url, where, server
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, on_sigterm, task)
        if not url:
            url = await start_redis(procs)
            where = f"a throwaway redis-server on {url} (PF_BENCH_REDIS_URL is unset)"
        import redis.asyncio as aioredis

        r = aioredis.Redis.from_url(url)
        try:
            server = str((await r.info("server")).get("redis_version", "?"))
        finally:
            await r.aclose()
        print(f"# redis: {where}", file=sys.stderr, flush=True)
        try:
            return await run_all(cfg, url, procs, prefix, args.profile, progress)
        finally:
            with contextlib.suppress(Exception):
                await _delete_keys(url, prefix)

    profiler: Any = None
    if args.profile is not None:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    try:
        rows, notes = asyncio.run(go())
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("distributed.py: interrupted; every process it started is stopped",
              file=sys.stderr)
        return 130 if not terms else 143
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(str(args.profile / "client.prof"))
        procs.kill_all()
        shutil.rmtree(tmp, ignore_errors=True)
    wall = time.perf_counter() - t0

    import redis

    print(f"# PenguiFlow distributed benchmarks — {started:%Y-%m-%d %H:%M} UTC")
    print(f"# python {platform.python_version()} ({platform.python_implementation()}), "
          f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, redis-py "
          f"{redis.__version__}, Redis {server}; redis: {where}")
    print(f"# reps={cfg.reps} (median, floor/ours interleaved); floor M={cfg.floor_m}; chain "
          f"M={cfg.chain_m} traces x {HOPS} hops (+{cfg.chain_warmup} warm-up); latency "
          f"{cfg.latency_m} one at a time (+{cfg.latency_warmup}); wall {wall:.1f}s"
          + ("; QUICK MODE (numbers meaningless)" if args.quick else ""))
    print()
    print(render_table(rows))
    print()
    print("\n".join(notes))
    if args.json is not None:
        doc = {"date": started.isoformat(), "python": platform.python_version(),
               "platform": platform.platform(), "cpus": os.cpu_count(), "redis": server,
               "config": dataclasses.asdict(cfg), "wall_s": wall,
               "rows": [r.as_json() for r in rows], "cpu": notes}
        args.json.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
