"""``build_trace`` and ``TraceView.at`` on a 100k-event trace: the deepest shape.

The trace is one chain of 50k invocations (node_start + node_success each): a
critical path 50k long, which a recursive walk could not follow (Python's
recursion limit is 1,000), and the replay's worst case (a step used to walk the
path back to its root).

How fast they are is measured by ``benchmarks/inspector.py`` (``whole waterfall``
and ``step`` on a stored 100k-event trace, with targets), not asserted here:
benchmarks are scripts, and these tests check what the user sees.
"""

from __future__ import annotations

import bisect
import random
from operator import attrgetter

from penguiflow.state import StoredEvent
from penguiflow_inspector.model import build_trace

TRACE = "ab" * 16
T0 = 1_700_000_000.0
STEP_S, RUN_S = 0.001, 0.0015  # invocation i starts at T0 + i * STEP_S and runs RUN_S


def chain(n_events: int) -> list[StoredEvent]:
    events: list[StoredEvent] = []
    previous: tuple[str, ...] = ()
    for i in range(n_events // 2):
        inv = f"{i + 1:016x}"
        start = T0 + i * STEP_S
        for kind, ts in (("node_start", start), ("node_success", start + RUN_S)):
            events.append(StoredEvent(TRACE, ts, kind, f"n{i % 7}", "x",
                                      {"ts": ts, "event": kind, "latency_ms": 1.5},
                                      invocation_id=inv, parent_invocation_ids=previous,
                                      queued_ts=start, flow_name="perf", flow_id="F"))
        previous = (inv,)
    events.sort(key=lambda e: e.ts)
    for seq, event in enumerate(events):
        event.seq = seq
    return events


def test_a_50k_deep_chain_builds_whole_and_replays_as_of_each_time() -> None:
    events = chain(100_000)
    view = build_trace(events)
    ids = [f"{i + 1:016x}" for i in range(50_000)]
    assert [inv.invocation_id for inv in view.invocations] == ids
    assert view.critical_path == ids  # followed to the root, not cut by recursion
    assert view.status == "ok" and all(inv.status == "ok" for inv in view.invocations)

    starts = [T0 + i * STEP_S for i in range(50_000)]
    view.prepare_replay()
    rng = random.Random(6)
    times = [e.ts for e in events]
    for t in [rng.uniform(view.start, view.end) for _ in range(40)]:
        at = view.at(t)
        assert at.replay_t == t
        started = bisect.bisect_right(starts, t)  # events with ts <= t are in the view
        assert list(map(attrgetter("invocation_id"), at.invocations)) == ids[:started]
        # Only the last two can still run (each runs 1.5 steps); C-level passes
        # over the rest keep this test quick under coverage.
        assert None not in list(map(attrgetter("end"), at.invocations[:-3]))
        tail = at.invocations[-3:]
        running = [inv.invocation_id for inv in tail if inv.end is None]
        assert running == [ids[i] for i in range(max(0, started - 3), started)
                           if t < starts[i] + RUN_S]
        assert [inv.status for inv in tail if inv.end is None] == ["running"] * len(running)
        # The path ends at the invocation that ended last, the running ones ending
        # "at t" (the first of them, on that tie), and goes back to the root.
        last = running[0] if running else ids[started - 1]
        assert at.critical_path == ids[: ids.index(last, max(0, started - 3)) + 1]
        assert len(at.events) == bisect.bisect_right(times, t)
