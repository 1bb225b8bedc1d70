"""The inspector TUI on a stored 100k-event trace: first paint, replay step, scroll.

For each durable store (SQLite; Postgres when ``$PF_BENCH_PG_DSN`` / ``$TEST_PG_DSN``
answers): store one trace of ``--events`` events (a chain of 5 node names, two
events per invocation, every 50th invocation making a streaming remote call),
then open ``InspectorApp`` on it headless (``run_test``, 120x40) and time:

* ``summary``: app start -> the summary line painted (resolve + ``get_trace``);
* ``first screen``: app start -> a first waterfall painted from the first page
  (``load_history_page``, 2,000 events; traces bigger than a page only) while the
  rest is read and built;
* ``first paint``: app start -> the whole trace's waterfall painted (every page read,
  ``build_trace`` of all of it, the first screen of rows);
* ``step``: one replay step (``.``), key press -> repainted, median and p95 of
  ``--steps`` presses from the middle of the trace;
* ``scroll``: one ``PgDn`` in the waterfall, key press -> repainted.

Targets (issue 6 §4): first screen < 1000 ms (and first paint, ideally), step and scroll < 50 ms. No
timing is asserted anywhere; ``--events 2000`` only checks that it runs.

    uv run python benchmarks/inspector.py [--events 100000] [--steps 30]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from stores import KINDS, StoreUnavailable, open_kind

from penguiflow.state import StoredEvent

TRACE = "5eed" * 8
T0 = 1_700_000_000.0
TARGETS_MS = {"summary": 1000.0, "first screen": 1000.0, "first paint": 1000.0,
              "step": 50.0, "scroll": 50.0}


def trace_events(n_events: int, trace_id: str = TRACE) -> list[StoredEvent]:
    """About ``n_events`` events of one trace, in order, with fixed ids and times."""
    events: list[StoredEvent] = []
    seq = 0

    def ev(ms: float, kind: str, node: str, inv: str, parents: tuple[str, ...] = (),
           **extra: Any) -> None:
        nonlocal seq
        seq += 1
        ts = T0 + ms / 1000.0
        payload = {"ts": ts, "event": kind, "node_name": node, "node_id": node,
                   "trace_id": trace_id, "latency_ms": 0.8, "attempt": 0, **extra}
        events.append(StoredEvent(trace_id, ts, kind, node, node, payload, invocation_id=inv,
                                  parent_invocation_ids=parents, span_id=inv, seq=seq,
                                  queued_ts=ts if kind == "node_start" else None,
                                  flow_name="bench", flow_id="bench-flow"))

    parent: tuple[str, ...] = ()
    i = 0
    while len(events) < n_events:
        inv = f"{i + 1:016x}"
        node = f"step{i % 5}"
        ev(i, "node_start", node, inv, parent)
        if i % 50 == 49:
            ev(i + 0.1, "remote_call_start", node, inv, remote_skill="echo",
               remote_agent_url="http://agent", remote_streaming=True)
            ev(i + 0.5, "remote_call_success", node, inv, remote_status="success",
               remote_task_id=f"task-{i}", remote_task_state="completed")
        ev(i + 0.8, "node_success", node, inv)
        parent = (inv,)
        i += 1
    return events


async def measure(kind_name: str, events: list[StoredEvent], steps: int) -> dict[str, Any]:
    from penguiflow_inspector.app import InspectorApp
    from penguiflow_inspector.screens.trace import TraceScreen

    kind = await open_kind(KINDS[kind_name])
    try:
        store = await kind.new()
        await store.save_events(events)
        await store.flush()
        app = InspectorApp(trace_id=TRACE, store=store)  # type: ignore[arg-type]
        t0 = time.perf_counter()
        async with app.run_test(size=(120, 40)) as pilot:
            while not (isinstance(app.screen, TraceScreen) and app.screen.loaded.is_set()):
                await pilot.pause(0.005)
            await pilot.pause()  # the first screen of rows is painted
            first_paint = (time.perf_counter() - t0) * 1000.0
            screen = app.screen
            summary = screen.timings.get("summary", float("nan")) * 1000.0
            first_screen = screen.timings.get("first screen", float("nan")) * 1000.0
            screen.action_scrub(0.5)
            await pilot.pause()
            step_ms: list[float] = []
            for _ in range(steps):
                t = time.perf_counter()
                await pilot.press("full_stop")
                step_ms.append((time.perf_counter() - t) * 1000.0)
            await pilot.press("r")  # back to the full trace for scrolling
            scroll_ms: list[float] = []
            for _ in range(steps):
                t = time.perf_counter()
                await pilot.press("pagedown")
                scroll_ms.append((time.perf_counter() - t) * 1000.0)
        await kind.discard(store)
    finally:
        await kind.aclose()
    return {"summary": summary, "first screen": first_screen, "first paint": first_paint,
            "step": statistics.median(step_ms), "step p95": _p95(step_ms),
            "scroll": statistics.median(scroll_ms), "scroll p95": _p95(scroll_ms)}


def _p95(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args(argv)
    events = trace_events(args.events)
    print(f"inspector on one trace of {len(events)} events "
          f"(python {sys.version.split()[0]})")
    header = ("store", "measure", "target ms", "ms (median)", "p95 ms")
    rows: list[tuple[str, ...]] = []
    for name in KINDS:
        try:
            result = asyncio.run(measure(name, events, args.steps))
        except StoreUnavailable as exc:
            rows.append((name, "skipped", "—", str(exc)[:40], ""))
            continue
        for key in ("summary", "first screen", "first paint", "step", "scroll"):
            p95 = result.get(f"{key} p95")
            rows.append((name, key, f"{TARGETS_MS[key]:.0f}", f"{result[key]:.1f}",
                         "" if p95 is None else f"{p95:.1f}"))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
