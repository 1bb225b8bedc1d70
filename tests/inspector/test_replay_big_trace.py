"""Replay and scrolling on a big-ish trace show exactly what the events say.

The replay step and the waterfall scroll are optimised (the replayed rows are
the full trace's rows sliced with the in-flight ones swapped in, the critical
path is a slice of a precomputed spine, the panes redraw only what changed);
these tests pin the behaviour those shortcuts must keep, against ground truth
computed here from the raw events, not from the model. No timing is asserted.

The trace: 1,500 invocations starting 1 ms apart and lasting 0.5-9 ms, so
several are in flight at any time, in a chain (each waits for the previous
one) with some joins; every 7th makes a remote call, every 11th fails once
and is retried, and the last few never finish.
"""

from __future__ import annotations

import random
from typing import Any

from textual.pilot import Pilot
from tui_traces import T0, _Recorder

from penguiflow.state import StoredEvent
from penguiflow_inspector.app import InspectorApp
from penguiflow_inspector.model import build_trace, critical_path
from penguiflow_inspector.screens.trace import TraceScreen
from penguiflow_inspector.widgets.detail import DetailPane
from penguiflow_inspector.widgets.event_log import EventLog
from penguiflow_inspector.widgets.rows import Rows
from penguiflow_inspector.widgets.waterfall import Waterfall

INVOCATIONS = 1500
UNFINISHED = 3


def overlapping_events(seed: int = 6) -> list[StoredEvent]:
    rng = random.Random(seed)
    planned: list[tuple[float, str, str, str, dict[str, Any]]] = []
    previous: list[str] = []
    for i in range(INVOCATIONS):
        inv, node = f"{i + 1:016x}", f"node{i % 6}"
        start, duration = i * 1.0 + rng.uniform(0.0, 0.4), rng.uniform(0.5, 9.0)
        parents = tuple(previous[-2:] if i % 13 == 12 else previous[-1:])
        planned.append((start, "node_start", node, inv, {"parents": parents}))
        if i % 11 == 5:  # fails once, retried
            planned.append((start + duration * 0.3, "node_error", node, inv,
                            {"exception": "ValueError()"}))
            planned.append((start + duration * 0.3, "node_retry", node, inv,
                            {"attempt": 1, "sleep_s": 0.0}))
            planned.append((start + duration * 0.4, "node_start", node, inv,
                            {"attempt": 1, "parents": parents}))
        if i % 7 == 3:
            planned.append((start + duration * 0.2, "remote_call_start", node, inv,
                            {"remote_skill": "echo", "remote_agent_url": "http://agent"}))
            planned.append((start + duration * 0.7, "remote_call_success", node, inv,
                            {"remote_status": "success", "remote_task_state": "completed"}))
        if i < INVOCATIONS - UNFINISHED:
            planned.append((start + duration, "node_success", node, inv, {}))
        previous.append(inv)
    planned.sort(key=lambda p: p[0])
    r = _Recorder()
    for ms, kind, node, inv, extra in planned:
        r.ev(ms, kind, node, inv, **extra)
    return r.events


EVENTS = overlapping_events()
EVENT_TIMES = frozenset(ev.ts for ev in EVENTS)


def started_by(t: float) -> list[str]:
    """Invocation ids with an event at or before ``t``, in order of their first event."""
    first: dict[str, float] = {}
    for ev in EVENTS:
        if ev.ts <= t and ev.invocation_id is not None:
            first.setdefault(ev.invocation_id, ev.ts)
    return sorted(first, key=lambda inv: first[inv])


def in_flight_at(t: float) -> set[str]:
    """Invocations started by ``t`` whose node_success comes after ``t`` (or never)."""
    done = {ev.invocation_id for ev in EVENTS if ev.kind == "node_success" and ev.ts <= t}
    return set(started_by(t)) - done


def calls_started_by(t: float) -> dict[str, int]:
    """Per invocation, how many remote calls it had started by ``t``."""
    out: dict[str, int] = {}
    for ev in EVENTS:
        if ev.kind == "remote_call_start" and ev.ts <= t and ev.invocation_id is not None:
            out[ev.invocation_id] = out.get(ev.invocation_id, 0) + 1
    return out


def expected_rows(t: float) -> list[tuple[str, str]]:
    """(kind, invocation id) per waterfall row at ``t``: each invocation, then its calls."""
    calls = calls_started_by(t)
    rows: list[tuple[str, str]] = []
    for inv in started_by(t):
        rows.append(("inv", inv))
        rows += [("remote", inv)] * calls.get(inv, 0)
    return rows


def sample_times() -> list[float]:
    ts = sorted({ev.ts for ev in EVENTS})
    rng = random.Random(1)
    picked = [*rng.sample(ts, 60), ts[0], ts[-1], ts[len(ts) // 2]]
    return sorted(picked + [t + 1e-7 for t in picked[:30]])


def test_replayed_rows_are_the_invocations_started_and_in_flight_at_t() -> None:
    view = build_trace(EVENTS)
    full = Rows.of(view)
    for t in sample_times():
        at = view.at(t)
        rows = Rows.of(at, full)  # the replay step's way: the full rows, sliced
        assert [(r.kind, r.item.invocation_id) for r in rows.rows] == expected_rows(t), t
        running = {r.key for r in rows.rows if r.kind == "inv" and r.status == "running"}
        assert running == in_flight_at(t), t
        assert all((r.end is None) == (r.key in running) for r in rows.rows if r.kind == "inv")
        # The same rows, the same objects, as flattening the replayed view from scratch.
        fresh = Rows.of(at)
        assert [(r.kind, id(r.item)) for r in rows.rows] == [
            (r.kind, id(r.item)) for r in fresh.rows], t
        for position in range(0, len(fresh.rows), 37):
            assert rows.index_of(fresh.rows[position].key) == position
        present = {r.key for r in fresh.rows}
        future = [r.key for r in full.rows if r.key not in present]
        assert all(rows.index_of(key) is None for key in future[:50])
        # The critical path at t is the from-scratch one over the rows as they were
        # (between events: at an event's time, an invocation ending exactly at t ties
        # with the running ones, and at() starts from a running one).
        if t not in EVENT_TIMES:
            assert at.critical_path == critical_path(at.invocations, at.end), t
        assert rows.critical == frozenset(at.critical_path)


async def _opened(pilot: Pilot[Any]) -> TraceScreen:
    """The trace screen; opened on a built view, it shows it when it mounts."""
    await pilot.pause()
    screen = pilot.app.screen
    assert isinstance(screen, TraceScreen) and screen.loaded.is_set()
    return screen


def _visible_names(wf: Waterfall) -> list[str]:
    """The node name column of the rows drawn on screen (line 0 is the axis)."""
    lines = [wf.render_line(y).text for y in range(1, wf.scrollable_content_region.height)]
    return [line[1:].split()[0] if line.strip() else "" for line in lines]


async def test_stepping_shows_the_invocations_in_flight_and_the_selection_as_of_t() -> None:
    view = build_trace(EVENTS)
    app = InspectorApp(view=view)
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await _opened(pilot)
        wf = screen.query_one(Waterfall)
        screen.action_scrub(0.5)
        await pilot.press("G")  # the invocation started last: in flight
        selected = wf.selected
        assert selected is not None and selected.kind == "inv" and selected.end is None
        statuses: set[str] = set()
        after_end = 0
        for _ in range(60):  # until two steps after it finished (~30 steps)
            if after_end == 2:
                break
            await pilot.press("full_stop")
            t = screen.replay_t
            assert t is not None
            rows = wf.rows
            assert rows is not None and rows.view.replay_t == t
            assert [(r.kind, r.item.invocation_id) for r in rows.rows] == expected_rows(t)
            running = {r.key for r in rows.rows if r.kind == "inv" and r.status == "running"}
            assert running == in_flight_at(t)
            # The cursor stays on the same invocation; the panes show it as of t.
            assert wf.selected is not None and wf.selected.key == selected.key
            detail = wf.selected.item
            events_at_t = [ev for ev in EVENTS if ev.invocation_id == selected.key
                           and ev.ts <= t]
            log = screen.query_one(EventLog)
            assert len(log.lines) == len(events_at_t)
            assert [line.split()[1] for line in log.lines] == [ev.kind for ev in events_at_t]
            content = screen.query_one(DetailPane).content
            assert content is not None and selected.key in _plain(content)
            assert ("running" in _plain(content)) == (detail.end is None)
            statuses.add(detail.status)
            after_end += detail.end is not None
        assert statuses == {"running", "ok"}  # it finished while stepping
        # Stepping back and forth lands on the same rows as stepping forward did.
        forward = [(r.kind, r.key, r.status) for r in wf.rows.rows]  # type: ignore[union-attr]
        await pilot.press("comma", "full_stop")
        assert [(r.kind, r.key, r.status) for r in wf.rows.rows] == forward  # type: ignore[union-attr]


async def test_paging_down_shows_the_next_rows_in_order() -> None:
    view = build_trace(EVENTS)
    app = InspectorApp(view=view)
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await _opened(pilot)
        wf = screen.query_one(Waterfall)
        all_rows = expected_rows(view.end)
        names = {ev.invocation_id: ev.node_name for ev in EVENTS}
        for _ in range(8):
            await pilot.press("pagedown")
            top = int(wf.scroll_offset.y)
            assert top <= wf.cursor < top + wf.scrollable_content_region.height - 1
            shown = _visible_names(wf)
            wanted = [names[inv] if kind == "inv" else "└"
                      for kind, inv in all_rows[top: top + len(shown)]]
            assert shown == wanted, (top, shown[:5], wanted[:5])
            kind, inv = all_rows[wf.cursor]
            assert wf.selected is not None and wf.selected.kind == kind
            assert wf.selected.item.invocation_id == inv
            log = screen.query_one(EventLog)
            inv_events = [ev for ev in EVENTS if ev.invocation_id == inv]
            if kind == "inv":
                assert len(log.lines) == len(inv_events)
            assert inv in _plain(screen.query_one(DetailPane).content) or kind == "remote"


def _plain(renderable: Any) -> str:
    from rich.console import Console

    console = Console(width=200, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(renderable)
    console.file.close()
    return console.export_text()


def test_the_trace_has_what_the_tests_need() -> None:
    assert len(EVENTS) > 3000 and EVENTS[0].ts >= T0
    middle = EVENTS[len(EVENTS) // 2].ts
    assert len(in_flight_at(middle)) >= 3  # overlapping invocations
    assert any(ev.kind == "node_retry" for ev in EVENTS)
