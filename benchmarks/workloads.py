"""The workloads of docs/benchmarks guide: each builds floor and penguiflow sides, runs them
interleaved in the same process and returns table rows (medians over repetitions)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import a2a_rows
import floor
import flows
import otel
import stores
from harness import (
    Measure,
    Row,
    interleave,
    median_of,
    one_at_a_time,
    percentiles,
    pump,
    watchdog,
)

GraphFactory = Callable[[], contextlib.AbstractAsyncContextManager[Any]]


@dataclass(frozen=True, slots=True)
class Config:
    reps: int = 5
    chain_ns: tuple[int, ...] = (1, 5, 20)
    chain_m: int = 20_000
    chain_warmup: int = 500
    fan_m: int = 5_000
    fan_warmup: int = 200
    latency_ns: tuple[int, ...] = (1, 5)
    latency_warmup: int = 200
    latency_m: int = 2_000
    observers_n: int = 5
    store_events: int = 100_000
    store_load_events: int = 100_000
    store_reps: int = 3
    floor_only: bool = False


QUICK = Config(
    reps=1,
    chain_m=300,
    chain_warmup=20,
    fan_m=60,
    fan_warmup=10,
    latency_warmup=10,
    latency_m=100,
    store_events=2_000,
    store_load_events=2_000,
    store_reps=1,
)


# --------------------------------------------------------------------------- checks


def _check_chain(out: Sequence[Any], m: int) -> None:
    got = [x.payload for x in out]
    if got != list(range(m)):
        raise AssertionError("chain delivered wrong or reordered payloads")


def _check_fan(out: Sequence[Any], m: int, width: int) -> None:
    firsts = []
    for x in out:
        p = x.payload
        if not isinstance(p, list) or len(p) != width or len(set(p)) != 1:
            raise AssertionError(f"fan-out delivered a malformed join result: {p!r}")
        firsts.append(p[0])
    if sorted(firsts) != list(range(m)):
        raise AssertionError("fan-out lost or duplicated messages")


# --------------------------------------------------------------------------- measures


def _throughput(
    graph: GraphFactory,
    make: Callable[[int], Sequence[Any]],
    m: int,
    warmup: int,
    check: Callable[[Sequence[Any]], None],
    per: float,
) -> Measure:
    """Fresh graph per repetition; warm-up through it, then time ``m`` messages.
    Reports µs per unit (``per`` units per run, e.g. M·N hops)."""

    async def measure() -> dict[str, float]:
        warm = make(warmup)
        msgs = make(m)
        async with graph() as g:
            await pump(g.emit, g.fetch, warm, warmup)
            elapsed, out = await pump(g.emit, g.fetch, msgs, m)
        check(out)
        return {"us": elapsed / per * 1e6, "s": elapsed}

    return measure


def _latency(graph: GraphFactory, make: Callable[[int], Sequence[Any]], cfg: Config) -> Measure:
    async def measure() -> dict[str, float]:
        msgs = make(cfg.latency_warmup + cfg.latency_m)
        async with graph() as g:
            samples = await one_at_a_time(g.emit, g.fetch, msgs, cfg.latency_warmup)
        return percentiles(samples)

    return measure


async def _pair(
    floor_side: Measure, ours_side: Measure | None, reps: int
) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    if ours_side is None:
        (f,) = await interleave([floor_side], reps)
        return f, []
    f, o = await interleave([floor_side, ours_side], reps)
    return f, o


def _row(
    workload: str,
    unit: str,
    key: str,
    f: list[dict[str, float]],
    o: list[dict[str, float]],
    **kw: Any,
) -> Row:
    return Row(
        workload=workload,
        unit=unit,
        floor=median_of(f, key) if f else None,
        ours=median_of(o, key) if o else None,
        floor_samples=[r[key] for r in f],
        ours_samples=[r[key] for r in o],
        **kw,
    )


# --------------------------------------------------------------------------- workloads


async def chain_throughput(cfg: Config, n: int) -> Row:
    m = cfg.chain_m

    def check(out: Sequence[Any]) -> None:
        _check_chain(out, m)

    fs = _throughput(lambda: floor.chain(n), floor.make_messages, m, cfg.chain_warmup, check, m * n)
    os_ = None
    if not cfg.floor_only:
        os_ = _throughput(
            lambda: flows.chain(n), flows.make_messages, m, cfg.chain_warmup, check, m * n
        )
    f, o = await _pair(fs, os_, cfg.reps)
    return _row(f"chain N={n}", "µs/hop", "us", f, o)


async def fan_out(cfg: Config) -> Row:
    m, width = cfg.fan_m, floor.FAN_WIDTH

    def check(out: Sequence[Any]) -> None:
        _check_fan(out, m, width)

    fs = _throughput(lambda: floor.fan_out(width), floor.make_messages, m, cfg.fan_warmup, check, m)
    os_ = None
    if not cfg.floor_only:
        os_ = _throughput(
            lambda: flows.fan_out(width), flows.make_messages, m, cfg.fan_warmup, check, m
        )
    f, o = await _pair(fs, os_, cfg.reps)
    return _row(f"fan-out 1→{width}→join", "µs/msg", "us", f, o)


async def latency(cfg: Config, n: int) -> list[Row]:
    fs = _latency(lambda: floor.chain(n), floor.make_messages, cfg)
    os_ = None if cfg.floor_only else _latency(lambda: flows.chain(n), flows.make_messages, cfg)
    f, o = await _pair(fs, os_, cfg.reps)
    return [_row(f"latency N={n} {k}", "µs", k, f, o) for k in ("p50", "p99")]


async def _hook(setup: flows.ObserverSetup | None, name: str) -> None:
    hook = getattr(setup, name, None)
    if hook is not None:
        await hook()


def _observed(cfg: Config, n: int, setup: flows.ObserverSetup | None) -> Measure:
    """The chain N=n throughput with an observer set-up (None: without observers).

    ``us``: the pump window (first emit to last fetch), as the other chain rows; a
    buffering store may still hold events then. ``durable_us``: the same window plus
    ``stop()``, which flushes the store: the time until every event is written.
    """
    m, per = cfg.chain_m, cfg.chain_m * n

    async def measure() -> dict[str, float]:
        async with watchdog(f"chain N={n} + {type(setup).__name__}"):
            return await _measure()

    async def _measure() -> dict[str, float]:
        warm = flows.make_messages(cfg.chain_warmup)
        msgs = flows.make_messages(m)
        await _hook(setup, "prepare")  # e.g. open a fresh store: not timed
        flow = flows.build_chain(n, setup)
        flow.run()
        stopped = False
        try:
            await pump(flow.emit, flow.fetch, warm, cfg.chain_warmup)
            await _hook(setup, "settle")  # e.g. flush the warm-up's events: not timed
            elapsed, out = await pump(flow.emit, flow.fetch, msgs, m)
            t0 = time.perf_counter()
            await flow.stop()
            stop_s = time.perf_counter() - t0
            stopped = True
        finally:
            if not stopped:
                await flow.stop()
        _check_chain(out, m)
        result = {"us": elapsed / per * 1e6, "durable_us": (elapsed + stop_s) / per * 1e6,
                  "stop_ms": stop_s * 1e3}
        release = getattr(setup, "release", None)
        if release is not None:
            # 2 events (node_start, node_success) per hop, warm-up included.
            result["missing"] = float(await release((cfg.chain_warmup + m) * 2 * n))
        return result

    return measure


async def with_observers(cfg: Config) -> list[Row]:
    """Chain N=observers_n with each named observer set-up, as a ratio to the same chain
    without observers. Baseline and every set-up are interleaved in one loop."""
    if cfg.floor_only:
        return []
    n, m = cfg.observers_n, cfg.chain_m

    def check(out: Sequence[Any]) -> None:
        _check_chain(out, m)

    names: list[str] = []
    setups: list[flows.ObserverSetup] = []
    unavailable: list[Row] = []
    for name, factory in flows.OBSERVERS.items():
        try:
            setup = factory()
            await _hook(setup, "check")
        except flows.ObserverUnavailable as exc:
            unavailable.append(
                Row(f"chain N={n} + {name}", "µs/hop", None, None, note=f"skipped: {exc}")
            )
            continue
        setups.append(setup)
        names.append(name)
    bare = _throughput(
        lambda: floor.chain(n), floor.make_messages, m, cfg.chain_warmup, check, m * n
    )
    try:
        results = await interleave(
            [bare, _observed(cfg, n, None)] + [_observed(cfg, n, s) for s in setups], cfg.reps
        )
    finally:
        for s in setups:
            async with watchdog(f"{type(s).__name__}.aclose"):
                await s.aclose()
    floor_res, base = results[0], results[1]
    rows: list[Row] = []
    for name, setup, res in zip(names, setups, results[2:], strict=True):
        # Views of the same samples: the observer's own cost (vs the runtime without
        # observers), for a store also until durable (stop() flushes), and the whole
        # hop against the bare-asyncio floor.
        rows.append(_row(f"chain N={n} + {name}", "µs/hop", "us", base, res,
                         baseline="no observers", note="floor = no observers"))
        if getattr(setup, "has_store", False):
            missing = sum(int(r.get("missing", 0)) for r in res)
            failed = int(getattr(setup, "failed", 0))
            note = "floor = no observers, both incl. stop()"
            if missing or failed:
                note += f"; NOT DURABLE: {missing} events missing, {failed} dropped/lost"
            rows.append(_row(f"chain N={n} + {name} until durable", "µs/hop", "durable_us",
                             base, res, baseline="no observers", note=note))
        rows.append(_row(f"chain N={n} + {name} vs bare floor", "µs/hop", "us", floor_res, res))
    return rows + unavailable


async def run_all(cfg: Config, progress: Callable[[str], None]) -> list[Row]:
    rows: list[Row] = []
    for n in cfg.chain_ns:
        progress(f"chain N={n}")
        rows.append(await chain_throughput(cfg, n))
    progress("fan-out")
    rows.append(await fan_out(cfg))
    for n in cfg.latency_ns:
        progress(f"latency N={n}")
        rows += await latency(cfg, n)
    if not cfg.floor_only:
        progress("with observers")
        observed = await with_observers(cfg)
        rows += observed
        spans = 2_000 if cfg.chain_m < 1_000 else otel.SPANS  # quick mode: few spans
        rows += otel.otel_rows(observed, cfg.reps, spans)
        progress("stock TracerProvider()")
        rows += otel.stock_provider_rows(cfg.reps, cfg.chain_m < 1_000)
        rows += await stores.store_rows(cfg.store_events, cfg.store_load_events,
                                        cfg.store_reps, progress)
        rows += await a2a_rows.a2a_rows(cfg.reps, cfg.chain_m < 1_000, progress)
    return rows
