"""``build_trace`` and ``TraceView.at`` stay fast on a 100k-event trace.

The trace is one chain of 50k invocations (node_start + node_success each):
the worst case for the critical path (50k long) and for replay (a step that
walked it back to its root cost 18-21 ms; it now joins the whole trace's path
and slices it). Bounds are CPU time, with the cyclic GC running as usual (the
inspector never switches it), and 3-5x the figures measured on the loaded 2-core
CI machine on its busiest days (build 0.47-0.72 s, replay step 2-3 ms; on a
quieter day 0.17-0.25 s and 0.2 ms), so they catch a regression by a factor, not
noise. The targets they protect: first paint
< 1 s including the store's load, replay < 50 ms per step on screen (the
model's share of it must stay small: Textual's repaint takes most of it). Under a tracer
(coverage, a debugger) every line costs ~4x more, so the bounds are 5x wider
there: still a guard against an accidental O(n^2).
"""

from __future__ import annotations

import random
import sys
import time

from penguiflow.state import StoredEvent
from penguiflow_inspector.model import build_trace

TRACE = "ab" * 16
T0 = 1_700_000_000.0
#: How much slower this run is than a plain interpreter (coverage traces every line).
SLOWDOWN = 5.0 if sys.gettrace() is not None else 1.0


def chain(n_events: int) -> list[StoredEvent]:
    events: list[StoredEvent] = []
    previous: tuple[str, ...] = ()
    for i in range(n_events // 2):
        inv = f"{i + 1:016x}"
        start = T0 + i * 0.001
        for kind, ts in (("node_start", start), ("node_success", start + 0.0015)):
            events.append(StoredEvent(TRACE, ts, kind, f"n{i % 7}", "x",
                                      {"ts": ts, "event": kind, "latency_ms": 1.5},
                                      invocation_id=inv, parent_invocation_ids=previous,
                                      queued_ts=start, flow_name="perf", flow_id="F"))
        previous = (inv,)
    events.sort(key=lambda e: e.ts)
    for seq, event in enumerate(events):
        event.seq = seq
    return events


def test_build_and_replay_100k_events() -> None:
    events = chain(100_000)
    started = time.process_time()
    view = build_trace(events)
    build_s = time.process_time() - started
    assert len(view.invocations) == 50_000 and len(view.critical_path) == 50_000
    assert build_s < 2.0 * SLOWDOWN, f"build_trace took {build_s:.2f} s CPU for 100k events"

    view.prepare_replay()
    rng = random.Random(6)
    times = [rng.uniform(view.start, view.end) for _ in range(40)]
    started = time.process_time()
    for t in times:
        at = view.at(t)
        assert at.replay_t == t
    step_ms = (time.process_time() - started) / len(times) * 1000
    assert step_ms < 15.0 * SLOWDOWN, f"TraceView.at took {step_ms:.1f} ms CPU per step"
