"""Defects a review of the TUI found (each test fails on the code before its fix)."""

from __future__ import annotations

from collections.abc import Sequence

from test_app import text_of, wait_for
from tui_traces import TRACE, demo_events

from penguiflow.state import InMemoryStateStore, StoredEvent
from penguiflow_inspector.app import InspectorApp
from penguiflow_inspector.screens.message import MessageScreen


class EventsGoneStore(InMemoryStateStore):
    """Lists its traces but has lost their events (blocks deleted after the listing)."""

    async def load_history(self, trace_id: str) -> Sequence[StoredEvent]:
        return []

    async def load_history_page(self, trace_id: str, *, offset: int = 0,
                                limit: int) -> Sequence[StoredEvent]:
        return []


async def test_a_trace_without_stored_events_says_so_instead_of_crashing() -> None:
    async with EventsGoneStore() as store:
        await store.save_events(demo_events())
        app = InspectorApp(trace_id=TRACE[:6], store=store)
        async with app.run_test(size=(100, 30)) as pilot:
            await wait_for(pilot, lambda: isinstance(app.screen, MessageScreen),
                           what="the message")
            title = text_of(app.screen.query_one("#message-title"))
            assert f"trace {TRACE} has no stored events" in title
            await pilot.press("q")
        assert app.return_code == 1
