"""Stored text reaches the screen escaped: control characters visibly (``\\x1b``), never
raw, and Rich markup in names shown as typed, never interpreted, in every widget.

The fixture trace's names, ids and errors are replaced by hostile ones: a node
whose name would retitle the terminal (OSC 0, ended by BEL), names and errors
holding Rich markup, NUL and a C1 CSI (U+009B). The assertions read the text the
screen composes (every widget, as the terminal would get it).
"""

from __future__ import annotations

from typing import Any

from test_app import opened, wait_for
from textual.widgets import DataTable
from tui_traces import TRACE, demo_events

from penguiflow.state import InMemoryStateStore, StoredEvent
from penguiflow_inspector.app import InspectorApp
from penguiflow_inspector.screens.traces import TracesScreen
from penguiflow_inspector.widgets.waterfall import Waterfall

TITLE = "x\x1b]0;pwned\x07"  # OSC 0: would set the terminal's title
MARKUP = "[red]boom[/red]"
ERROR = "Boom\x00[bold]x[/bold]\x9b2J"
RAW = ("\x1b", "\x07", "\x00", "\x9b")

RENAMES = {"plan": TITLE, "search": MARKUP, "summarise": f"sum{MARKUP}",
           "http://agents.local/summarise": f"http://{TITLE}", "task-91c2": "task\x07[b]",
           "critic": "critic\x9b", "demo-flow": "[bold]flow\x1b[2J",
           "ConnectionError('search backend reset')": ERROR}


def hostile(value: Any) -> Any:
    if isinstance(value, str):
        return RENAMES.get(value, value)
    if isinstance(value, dict):
        return {k: hostile(v) for k, v in value.items()}
    return value


def hostile_events() -> list[StoredEvent]:
    events = demo_events()
    for ev in events:
        ev.node_name = hostile(ev.node_name)
        ev.payload = hostile(ev.payload)
        ev.flow_name = hostile(ev.flow_name)
    return events


def screen_text(app: InspectorApp) -> str:
    """The text of every line the screen composes (what the terminal is sent)."""
    return "\n".join(strip.text for strip in app.screen._compositor.render_strips())


def assert_safe(text: str) -> None:
    for char in RAW:
        assert char not in text, f"raw {char!r} on screen"


async def test_every_widget_shows_stored_text_escaped_and_markup_as_typed() -> None:
    async with InMemoryStateStore() as store:
        await store.save_events(hostile_events())
        app = InspectorApp(trace_id=TRACE, store=store)
        async with app.run_test(size=(140, 40)) as pilot:
            screen = await opened(pilot)
            await pilot.pause()
            text = screen_text(app)
            assert_safe(text)
            assert "x\\x1b]0;pwned\\x07" in text  # the waterfall row, escaped
            assert MARKUP in text  # markup shown as typed
            assert "[bold]flow\\x1b[2J" in text  # the summary line's flow name
            # The row holding the error: detail pane and event log.
            await pilot.press("j")
            assert screen.query_one(Waterfall).selected.name == MARKUP  # type: ignore[union-attr]
            await pilot.pause()
            text = screen_text(app)
            assert_safe(text)
            assert "Boom\\x00[bold]x[/bold]\\u009b2J" in text
            assert "exception=Boom\\x00[bold]x[/bold]" in text  # the event log's extras
            # Remote tab: the calls' table, the agents' stats, the split line.
            await pilot.press("2")
            await pilot.pause()
            text = screen_text(app)
            assert_safe(text)
            assert "http://x\\x1b]0;pwned\\x07" in text
            assert "task\\x07[b]" in text
            assert f"sum{MARKUP}" in text
            # Cancel & deadline tab: the interrupted invocation's name.
            await pilot.press("3")
            await pilot.pause()
            text = screen_text(app)
            assert_safe(text)
            assert "critic\\u009b" in text
            # The trace list: the flow name.
            await pilot.press("escape")
            await wait_for(pilot, lambda: isinstance(app.screen, TracesScreen)
                           and app.screen.query_one(DataTable).row_count == 1,
                           what="the trace list")
            await pilot.pause()
            text = screen_text(app)
            assert_safe(text)
            assert "[bold]flow\\x1b[2J" in text


async def test_an_error_message_with_markup_and_controls_is_shown_as_typed() -> None:
    """Error path: an id typed with markup and controls is echoed escaped, as typed."""
    async with InMemoryStateStore() as store:
        await store.save_events(demo_events())
        app = InspectorApp(trace_id=f"{MARKUP}\x1b[2J", store=store)
        async with app.run_test(size=(100, 30)) as pilot:
            await wait_for(pilot, lambda: "unknown trace id" in screen_text(app),
                           what="the message")
            text = screen_text(app)
            assert_safe(text)
            assert "[red]boom[/red]\\x1b[2J" in text
            await pilot.press("q")
        assert app.return_code == 2
