"""The keys do what ``?`` says, in every tab and screen (Pilot, fixture trace)."""

from __future__ import annotations

from typing import Any

from test_app import opened, wait_for
from textual.widgets import DataTable, TabbedContent
from tui_traces import TRACE, demo_events

from penguiflow.state import InMemoryStateStore
from penguiflow_inspector.app import InspectorApp
from penguiflow_inspector.model import build_trace
from penguiflow_inspector.screens.help import HELP_KEYS
from penguiflow_inspector.screens.message import MessageScreen
from penguiflow_inspector.screens.trace import TraceScreen
from penguiflow_inspector.screens.traces import TracesScreen
from penguiflow_inspector.widgets.waterfall import Waterfall


async def store_with(*trace_ids: str) -> InMemoryStateStore:
    store = InMemoryStateStore()
    for n, trace_id in enumerate(trace_ids):
        events = demo_events(trace_id)
        for ev in events:
            ev.ts += 60 * n
        await store.save_events(events)
    return store


def help_says(section: str, key: str) -> str:
    return dict(dict(HELP_KEYS)[section])[key]


async def test_j_and_k_move_in_the_remote_and_cancel_tabs_too() -> None:
    assert "every tab" in help_says("Trace", "j / k, ↓ / ↑")
    store = await store_with(TRACE)
    app = InspectorApp(trace_id=TRACE, store=store)
    async with app.run_test(size=(80, 14)) as pilot:
        screen = await opened(pilot)
        await pilot.press("j")
        assert screen.query_one(Waterfall).cursor == 1
        await pilot.press("2")
        assert screen.query_one(TabbedContent).active == "remote"
        calls = screen.query_one("#remote-calls", DataTable)
        assert calls.cursor_row == 0
        await pilot.press("j")
        assert calls.cursor_row == 1
        assert "review" in str(screen.query_one("#remote-split").content)  # the 2nd call
        await pilot.press("k")
        assert calls.cursor_row == 0
        await pilot.press("G")
        assert calls.cursor_row == calls.row_count - 1
        await pilot.press("g")
        assert calls.cursor_row == 0
        await pilot.press("3")
        cancel = screen.query_one("#cancel-scroll")
        assert cancel.max_scroll_y > 0  # at 80x14 the tab is taller than its pane
        await pilot.press("j", "j")
        assert cancel.scroll_y == 2
        await pilot.press("k")
        assert cancel.scroll_y == 1
        await pilot.press("1")
        assert screen.query_one(Waterfall).cursor == 1  # the waterfall kept its place
    await store.close()


async def test_esc_on_the_trace_the_app_opened_goes_to_the_trace_list() -> None:
    assert "trace list" in help_says("Trace", "Esc")
    other = "1" + TRACE[1:]
    store = await store_with(TRACE, other)
    app = InspectorApp(trace_id=TRACE, store=store)  # as `pf inspect ID`
    async with app.run_test(size=(100, 30)) as pilot:
        await opened(pilot)
        await pilot.press("escape")
        await wait_for(pilot, lambda: isinstance(app.screen, TracesScreen)
                       and len(app.screen.summaries) == 2, what="the trace list")
        table = app.screen.query_one(DataTable)
        await pilot.press("j")  # the trace list moves with j/k too
        assert table.cursor_row == 1
        await pilot.press("k", "enter")
        screen = await opened(pilot)
        assert screen.trace_id == other  # newest first
        await pilot.press("escape")
        assert isinstance(app.screen, TracesScreen)  # back, as from any opened trace
        await pilot.press("q")
    assert app.return_code == 0
    await store.close()


async def test_esc_first_closes_the_filter_then_clears_it_then_goes_back() -> None:
    store = await store_with(TRACE)
    app = InspectorApp(trace_id=TRACE, store=store)
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await opened(pilot)
        wf = screen.query_one(Waterfall)
        await pilot.press("slash", *"node:fetch")
        assert wf.row_count == 1
        await pilot.press("escape")  # closes the box, keeps the filter
        assert not screen.query_one("#search").display and wf.row_count == 1
        await pilot.press("escape")  # clears it
        assert wf.row_count == 9 and isinstance(app.screen, TraceScreen)
        await pilot.press("escape")
        await wait_for(pilot, lambda: isinstance(app.screen, TracesScreen), what="the list")
    await store.close()


async def test_esc_after_an_unknown_id_reaches_the_list_and_q_then_exits_0() -> None:
    """Error path: the trace failed to load; Esc closes the message, then goes to
    the list (the user moved on: quitting from there is not a failure)."""
    store = await store_with(TRACE)
    app = InspectorApp(trace_id="ffff", store=store)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, MessageScreen), what="the error")
        assert app.exit_code == 2
        await pilot.press("escape")
        await wait_for(pilot, lambda: isinstance(app.screen, TraceScreen), what="the trace")
        await pilot.press("escape")
        await wait_for(pilot, lambda: isinstance(app.screen, TracesScreen), what="the list")
        await pilot.press("q")
    assert app.return_code == 0
    await store.close()


async def test_esc_without_a_store_stays_and_says_why() -> None:
    """Error path: a trace shown from a built view (no store) has no list to go to."""
    app = InspectorApp(view=build_trace(demo_events()))
    async with app.run_test(size=(100, 30)) as pilot:
        await opened(pilot)
        await pilot.press("escape")
        assert isinstance(app.screen, TraceScreen)
        assert any("no trace list" in str(n.message) for n in app._notifications)


def _bound_keys(*classes: Any) -> set[str]:
    keys: set[str] = set()
    for cls in classes:
        for klass in cls.__mro__:
            for binding in getattr(klass, "BINDINGS", ()):
                keys.update(k.strip() for k in binding.key.split(","))
    return keys


def test_every_key_the_help_names_is_bound() -> None:
    from penguiflow_inspector.widgets._keys import KeyedScroll, KeyedTable

    names = {"j": "j", "k": "k", "↓": "down", "↑": "up", "PgUp": "pageup",
             "PgDn": "pagedown", "g": "g", "G": "G", "1": "1", "2": "2", "3": "3",
             "/": "slash", "Esc": "escape", "c": "c", "r": "r", "space": "space",
             ",": "comma", ".": "full_stop", "[": "left_square_bracket",
             "]": "right_square_bracket", "-": "minus", "+": "plus", "Enter": "enter",
             "s": "s", "e": "e", "o": "o", "n": "n", "R": "R", "?": "question_mark",
             "t": "t", "q": "q", "Ctrl-C": "ctrl+c"}
    bound = {
        "Trace": _bound_keys(TraceScreen, Waterfall, KeyedTable, KeyedScroll),
        "Replay": _bound_keys(TraceScreen),
        "Trace list": _bound_keys(TracesScreen, KeyedTable),
        "Anywhere": _bound_keys(InspectorApp),
    }
    for section, keys in HELP_KEYS:
        for spec, _what in keys:
            parts = [p for token in spec.split(" / ")
                     for p in (token.split(", ") if len(token) > 1 else [token])]
            for part in parts:
                key = names[part]
                assert key in bound[section], (section, spec, key)
