"""Where a store's cost on the chain N=5 goes, in the flow's own process.

    uv run python benchmarks/store_overhead.py [--m 20000] [--reps 3]

The chain N=5 throughput workload of ``run.py`` (identity nodes, validate="none",
queue 64, 500 warm-up, a producer awaiting ``emit`` and a consumer awaiting
``fetch``), timed in µs per hop, with these stores, interleaved per repetition:

* ``none``: no store (the denominator of every ratio);
* ``discard``: a store whose values sink drops each event: the runtime's cost of
  building the events alone;
* ``list``: a store whose values sink appends each event to a list: building plus
  keeping them (allocation and the collector's passes over a growing heap);
* ``sqlite``: ``SQLiteStateStore`` with its defaults (100k-event buffer, writer
  process): what ``run.py``'s row measures;
* ``sqlite-1M``: the same with a buffer that never fills in the window: the
  store's cost in the flow's process, whatever the writer's pace;
* ``postgres``: ``PostgresStateStore`` with its defaults, in a new schema per run
  (dropped after it) on ``$PF_BENCH_PG_DSN`` / ``$TEST_PG_DSN``;
* ``postgres-1M``: the same with a buffer that never fills in the window.

``taskset -c 0 uv run python benchmarks/store_overhead.py --stores none,sqlite``
gives the figures on one busy core: the flow and its writer process share it.

``durable`` adds ``stop()`` (which flushes the store) to the window. Medians; the
order of the stores is rotated each repetition. "paired ratio" is the median (and
range) of each repetition's figure over the same repetition's first store's.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flows
import harness
import stores

from penguiflow import Node, NodePolicy, create
from penguiflow.state import InMemoryStateStore
from penguiflow_exporters.sqlite import SQLiteStateStore


class _SinkStore(InMemoryStateStore):
    """Takes the runtime's fastest path; ``keep`` decides what becomes of an event."""

    def __init__(self, keep: bool) -> None:
        super().__init__()
        self.kept: list[tuple[Any, ...]] = []
        self._sink: Callable[[tuple[Any, ...]], None] = (
            self.kept.append if keep else _discard)

    def save_event_fields(self, fields: Any) -> None:
        self._sink(tuple(fields))

    def event_values_sink(self) -> Callable[[tuple[Any, ...]], None]:
        return self._sink


def _discard(values: tuple[Any, ...]) -> None:
    return None


_PG: stores.PostgresKind | None = None


async def _store(kind: str, directory: Path) -> Any:
    global _PG
    if kind in ("postgres", "postgres-1M"):
        if _PG is None:
            _PG = stores.PostgresKind()  # StoreUnavailable without a DSN: said, exit
        return await (_PG.new(max_buffer=1_000_000) if kind == "postgres-1M" else _PG.new())
    if kind == "none":
        return None
    if kind in ("discard", "list"):
        return _SinkStore(keep=kind == "list")
    if kind == "sqlite":
        return SQLiteStateStore(directory / "t.db")
    if kind == "sqlite-1M":
        return SQLiteStateStore(directory / "t.db", max_buffer=1_000_000)
    raise SystemExit(f"unknown store {kind!r}")


async def _one(kind: str, m: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        store = await _store(kind, Path(tmp))
        policy = NodePolicy(validate="none")
        nodes = [Node(flows.identity, name=f"s{i}", policy=policy) for i in range(5)]
        adjacencies: list[Any] = [nodes[i].to(nodes[i + 1]) for i in range(4)]
        adjacencies.append(nodes[-1].to())
        extra = {"state_store": store} if store is not None else {}
        flow = create(*adjacencies, queue_maxsize=flows.QUEUE_MAXSIZE, **extra)
        flow.run()
        await harness.pump(flow.emit, flow.fetch, flows.make_messages(500), 500)
        if kind.startswith(("sqlite", "postgres")):
            await store.flush()
        elapsed, out = await harness.pump(flow.emit, flow.fetch, flows.make_messages(m), m)
        if len(out) != m:
            raise AssertionError(f"{kind}: fetched {len(out)} of {m}")
        t0 = time.perf_counter()
        await flow.stop()
        stopping = time.perf_counter() - t0
        if isinstance(store, SQLiteStateStore):
            await store.close()
        elif kind.startswith("postgres"):
            assert _PG is not None
            await _PG.discard(store)
    hops = m * 5
    return elapsed / hops * 1e6, (elapsed + stopping) / hops * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--m", type=int, default=20_000, help="messages per run")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (median)")
    parser.add_argument("--stores", default="none,discard,list,sqlite,sqlite-1M")
    args = parser.parse_args()
    kinds = args.stores.split(",")
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
    try:
        for rep in range(args.reps):
            # Rotated each repetition: a kind's place in the order moved its figure
            # by up to ~15% (two runs of the very same store, one after the other).
            for kind in kinds[rep % len(kinds):] + kinds[:rep % len(kinds)]:
                samples[kind].append(await _one(kind, args.m))
    except stores.StoreUnavailable as exc:
        raise SystemExit(f"store_overhead: {exc}") from None
    finally:
        if _PG is not None:
            await _PG.aclose()
    base = statistics.median(s[0] for s in samples[kinds[0]])
    print(f"# chain N=5, M={args.m}, {args.reps} reps; ratios to {kinds[0]!r}'s {base:.2f} µs/hop")
    print("| store | µs/hop | ratio | paired ratio (range) | until durable, µs/hop | ratio |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for kind in kinds:
        pump = statistics.median(s[0] for s in samples[kind])
        durable = statistics.median(s[1] for s in samples[kind])
        # Each repetition's figure over the same repetition's first kind: the
        # machine's speed drifts from minute to minute (a no-store hop of 5 to 9 us
        # in one session), and a pair measured a few seconds apart shares it.
        paired = [s[0] / b[0] for s, b in zip(samples[kind], samples[kinds[0]], strict=True)]
        print(f"| {kind} | {pump:.2f} | {pump / base:.2f}\u00d7 | "
              f"{statistics.median(paired):.2f}\u00d7 ({min(paired):.2f}\u2013{max(paired):.2f}) | "
              f"{durable:.2f} | {durable / base:.2f}\u00d7 |")


if __name__ == "__main__":
    asyncio.run(main())
