"""80x24 is the size the screens are laid out for (see the snapshots); smaller ones
must stay usable: no crash, the status and the rows still drawn."""

from __future__ import annotations

import pytest
from test_app import opened, wait_for
from test_app_escaping import screen_text
from tui_traces import TRACE, demo_events

from penguiflow.state import InMemoryStateStore
from penguiflow_inspector.app import InspectorApp
from penguiflow_inspector.screens.traces import TracesScreen


@pytest.mark.parametrize("size", [(80, 24), (60, 16), (40, 12)])
async def test_every_screen_draws_at_small_sizes(size: tuple[int, int]) -> None:
    async with InMemoryStateStore() as store:
        await store.save_events(demo_events())
        app = InspectorApp(trace_id=TRACE, store=store)
        async with app.run_test(size=size) as pilot:
            await opened(pilot)
            await pilot.pause()
            assert "cancelled" in screen_text(app) and "plan" in screen_text(app)
            for key in ("2", "3", "question_mark", "escape", "r", "full_stop", "r", "1"):
                await pilot.press(key)
            await pilot.pause()
            assert "plan" in screen_text(app)
            await pilot.press("escape")
            await wait_for(pilot, lambda: isinstance(app.screen, TracesScreen)
                           and bool(app.screen.summaries), what="the list")
            await pilot.pause()
            assert TRACE[:8] in screen_text(app)
