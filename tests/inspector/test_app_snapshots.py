"""SVG snapshots of each screen over the fixed-timestamp fixture trace.

Update after an intended change with ``pytest tests/inspector/test_app_snapshots.py
--snapshot-update`` and look at the SVGs (``snapshot_report.html`` shows a diff
when one fails).
"""

from __future__ import annotations

from typing import Any

import pytest
from tui_traces import TRACE, chain_events, demo_events

from penguiflow.state import InMemoryStateStore
from penguiflow_inspector.app import InspectorApp
from penguiflow_inspector.model import build_trace
from penguiflow_inspector.screens.traces import TracesScreen


def demo_app() -> InspectorApp:
    return InspectorApp(view=build_trace(demo_events()))


@pytest.mark.parametrize(("name", "press", "size"), [
    ("waterfall", ["j", "j", "j"], (120, 32)),
    ("waterfall_80x24", ["j"], (80, 24)),
    ("remote_80x24", ["2"], (80, 24)),
    ("cancel_80x24", ["3"], (80, 24)),
    ("remote", ["2"], (120, 32)),
    ("cancel", ["3"], (120, 32)),
    ("replay", ["r", *["full_stop"] * 8], (120, 32)),
    ("filter", ["slash", *"kind:cancelled", "enter"], (100, 28)),
    ("help", ["question_mark"], (100, 32)),
], ids=lambda v: v if isinstance(v, str) else "")
def test_trace_screens(snap_compare: Any, name: str, press: list[str],
                       size: tuple[int, int]) -> None:
    assert snap_compare(demo_app(), press=press, terminal_size=size)


@pytest.mark.parametrize("size", [(100, 20), (80, 24)], ids=["100x20", "80x24"])
def test_traces_screen(snap_compare: Any, size: tuple[int, int]) -> None:
    store = InMemoryStateStore()
    ids = [f"{i:x}{i:x}f7651916cd43dd8448eb211c8031{i:x}c" for i in range(1, 4)]

    async def fill_and_wait(pilot: Any) -> None:
        for n, trace_id in enumerate(ids):
            events = demo_events(trace_id) if n != 1 else chain_events(40, trace_id)
            for ev in events:
                ev.ts += 60 * n
            await store.save_events(events)
        screen = pilot.app.screen
        assert isinstance(screen, TracesScreen)
        screen.reload()
        await pilot.wait_for_scheduled_animations()
        while len(screen.summaries) != 3:
            await pilot.pause(0.01)

    app = InspectorApp(store=store, mode="traces")
    assert snap_compare(app, run_before=fill_and_wait, terminal_size=size)
    assert TRACE  # the fixture's main id is not in this list
