"""Shared measurement helpers: pumps, interleaving, statistics, the result table."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

Emit = Callable[[Any], Awaitable[Any]]
Fetch = Callable[[], Awaitable[Any]]
# One repetition of one side of a workload: returns named metrics (e.g. {"us_per_hop": 0.6}).
Measure = Callable[[], Awaitable[dict[str, float]]]


async def pump(
    emit: Emit, fetch: Fetch, msgs: Sequence[Any], expected: int
) -> tuple[float, list[Any]]:
    """Producer awaiting ``emit`` for every message and consumer awaiting ``fetch``
    ``expected`` times, started together. Returns (elapsed seconds, fetched items)."""
    out: list[Any] = []
    append = out.append

    async def producer() -> None:
        for m in msgs:
            await emit(m)

    async def consumer() -> None:
        for _ in range(expected):
            append(await fetch())

    gc.collect()
    t0 = time.perf_counter()
    await asyncio.gather(producer(), consumer())
    return time.perf_counter() - t0, out


async def one_at_a_time(emit: Emit, fetch: Fetch, msgs: Sequence[Any], warmup: int) -> list[float]:
    """``emit`` then ``fetch`` one message at a time; per-message latencies in µs
    (the first ``warmup`` messages are not recorded)."""
    for m in msgs[:warmup]:
        await emit(m)
        await fetch()
    gc.collect()
    samples: list[float] = []
    clock = time.perf_counter_ns
    for m in msgs[warmup:]:
        t0 = clock()
        await emit(m)
        await fetch()
        samples.append((clock() - t0) / 1000.0)
    return samples


#: A repetition (or store step) taking longer than this is reported as hung.
WATCHDOG_S = 60.0


@contextlib.asynccontextmanager
async def watchdog(what: str, seconds: float = WATCHDOG_S) -> AsyncIterator[None]:
    """Fail instead of hanging: after ``seconds``, print every task's stack on stderr
    and cancel the body, which then raises ``RuntimeError`` naming ``what``."""
    task = asyncio.current_task()
    assert task is not None
    fired = False

    def fire() -> None:
        nonlocal fired
        fired = True
        print(f"[bench] watchdog: {what} still running after {seconds:g}s; task stacks:",
              file=sys.stderr)
        for t in asyncio.all_tasks():
            print(f"--- {t!r}", file=sys.stderr)
            t.print_stack(file=sys.stderr)
        task.cancel()

    handle = asyncio.get_running_loop().call_later(seconds, fire)
    try:
        yield
    except asyncio.CancelledError:
        if fired and task.uncancel() == 0:
            raise RuntimeError(f"{what} hung (no result after {seconds:g}s)") from None
        raise
    finally:
        handle.cancel()


def percentiles(samples_us: Sequence[float]) -> dict[str, float]:
    cuts = statistics.quantiles(samples_us, n=100, method="inclusive")
    return {"p50": statistics.median(samples_us), "p99": cuts[98]}


async def interleave(sides: Sequence[Measure], reps: int) -> list[list[dict[str, float]]]:
    """Run every side once per repetition, rotating the order each repetition so no side
    always goes first. Returns, per side, the list of per-repetition metric dicts."""
    results: list[list[dict[str, float]]] = [[] for _ in sides]
    for rep in range(reps):
        k = rep % len(sides)
        order = list(range(len(sides)))[k:] + list(range(len(sides)))[:k]
        for i in order:
            results[i].append(await sides[i]())
    return results


def median_of(reps: Sequence[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in reps)


@dataclass(slots=True)
class Row:
    """One table line. ``floor`` is the baseline column: the bare-asyncio floor, or the
    runtime without observers for the observer rows (``baseline`` says which)."""

    workload: str
    unit: str
    floor: float | None
    ours: float | None
    floor_samples: list[float] = field(default_factory=list)
    ours_samples: list[float] = field(default_factory=list)
    baseline: str = "floor"
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.floor is None or self.ours is None or self.floor == 0:
            return None
        return self.ours / self.floor

    def as_json(self) -> dict[str, Any]:
        return {
            "workload": self.workload,
            "unit": self.unit,
            "baseline": self.baseline,
            "floor": self.floor,
            "ours": self.ours,
            "ratio": self.ratio,
            "floor_samples": self.floor_samples,
            "ours_samples": self.ours_samples,
            "note": self.note,
        }


def _fmt(v: float | None) -> str:
    if v is None:
        return "—"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def render_table(rows: Sequence[Row]) -> str:
    header = ("workload", "floor", "ours", "ratio")
    body = []
    for r in rows:
        name = f"{r.workload}, {r.unit}"
        if r.note:
            name += f" ({r.note})"
        if r.ratio is None:
            ratio = "—"
        elif 0.9 <= r.ratio < 1.1:
            # Near a target: two decimals, so that 0.95 never reads as "1.0x".
            ratio = f"{r.ratio:.2f}×"  # noqa: RUF001
        elif r.ratio >= 0.95:
            ratio = f"{r.ratio:.1f}×"  # noqa: RUF001
        else:
            ratio = f"{r.ratio:.2g}×"  # noqa: RUF001
        body.append((name, _fmt(r.floor), _fmt(r.ours), ratio))
    widths = [max(len(header[i]), *(len(b[i]) for b in body)) for i in range(4)]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |",
        "| "
        + " | ".join(("-" * w) if i == 0 else ("-" * (w - 1) + ":") for i, w in enumerate(widths))
        + " |",
    ]
    for b in body:
        cells = [b[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(b[1:], widths[1:], strict=True)
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
