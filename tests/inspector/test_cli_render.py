"""``--plain`` and ``--json`` renderings of a trace with everything in it, in-process.

Uses the demo flow on the in-memory store (no subprocess), so the report is
checked for each section: waterfall glyphs, remote calls with states, the
cancel's steps, the deadline, the critical path; and ``pf tail``'s lines.
"""

from __future__ import annotations

import asyncio
import json

from penguiflow.state import StoredEvent
from penguiflow_exporters import open_store
from penguiflow_inspector import render
from penguiflow_inspector.demo import record_demo
from penguiflow_inspector.model import TraceView, build_trace


async def _demo_view() -> tuple[TraceView, list[StoredEvent]]:
    async with open_store("memory://") as store:
        run = await record_demo(store)
        events = list(await store.load_history(run.trace_id))
    assert run.events == len(events)
    return build_trace(events), events


def test_plain_report_has_every_section() -> None:
    view, _ = asyncio.run(_demo_view())
    text = render.trace_text(view)
    assert text.startswith(f"trace {view.trace_id}  flow pf-demo  status cancelled")
    assert "↻1" in text and "◔1" in text and "≋4" in text and "✕" in text
    assert "remote calls" in text and "states: submitted" in text and "per agent:" in text
    assert "propagated to task task-" in text and "(trace_cancel, round trip" in text
    assert "interrupted researcher" in text and "kept running after the request: nothing" in text
    assert "notify skipped at" in text
    assert "critical path: plan → slow_tool → join → summarize → researcher" in text
    short = render.trace_text(view, max_rows=2)
    assert "more rows (pf inspect --json has them all)" in short
    # A replayed view mid-trace: something is still running, drawn shaded.
    middle = view.at(view.start + (view.end - view.start) / 2)
    assert "▒" in render.trace_text(middle)


def test_json_round_trips_and_tail_lines() -> None:
    view, events = asyncio.run(_demo_view())
    data = json.loads(json.dumps(render.trace_json(view)))
    assert data["status"] == "cancelled" and len(data["events"]) == len(events)
    line = render.event_line(next(e for e in events if e.kind == "node_retry"))
    assert "node_retry" in line and "attempt 1" in line and "exception=" in line
    event = json.loads(json.dumps(render.event_json(events[0])))
    assert event["kind"] == "node_start" and event["trace_id"] == view.trace_id
