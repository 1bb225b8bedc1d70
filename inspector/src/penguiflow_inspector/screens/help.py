"""The ``?`` screen: every key binding, and what the glyphs and colours mean."""

from __future__ import annotations

from typing import ClassVar

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

__all__ = ["HELP_KEYS", "HelpScreen"]

#: (keys, what) per section; the README and docs quote this table.
HELP_KEYS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("Trace", (
        ("j / k, ↓ / ↑", "move the selection (in every tab: the Remote tab's calls, "
                         "the Cancel & deadline text)"),
        ("PgUp / PgDn, g / G", "page, top, bottom"),
        ("1 / 2 / 3", "Waterfall, Remote, Cancel & deadline tabs"),
        ("/", "filter: node:NAME kind:inv|remote|error|timeout|cancelled|running|skipped text"),
        ("Esc", "close the filter, clear it, then go back to the trace list"),
        ("c", "toggle the critical-path highlight (◆)"),
    )),
    ("Replay", (
        ("r", "enter / leave replay (starts at the first event)"),
        ("space", "play / pause"),
        (", / .", "step one event back / forward"),
        ("[ / ]", "scrub 5 % back / forward (or click the bar)"),
        ("- / +", "slower / faster (0.01x … 100x)"),
    )),
    ("Trace list", (
        ("j / k, ↓ / ↑", "move"),
        ("Enter", "open the highlighted trace"),
        ("s", "status filter: any, cancelled, failed, incomplete, running, succeeded"),
        ("e", "errors filter: any, with errors, without"),
        ("o", "order: newest first / slowest first"),
        ("n", "node filter (Esc closes the box)"),
        ("R", "reload"),
    )),
    ("Anywhere", (
        ("?", "this help (Esc, q or ? closes it)"),
        ("t", "dark / light theme"),
        ("q", "quit"),
        ("Ctrl-C", "quit at once (exit status 130)"),
    )),
)

_LEGEND = ("█ invocation (colour = outcome: green succeeded, red failed, yellow timed out, "
           "magenta cancelled, cyan running)   ▬ remote call   ░ queue wait   ▸ still running   "
           "↻n retries   ◔ timed out   ≋n chunks   ✕ cancelled   ! failed   "
           "↷ skipped (its deadline had passed: the node never ran)   ◆ critical path.   "
           "Status words are pf traces's: ✓ succeeded, ! failed, ✕ cancelled, ▸ running, "
           "? incomplete (the store lost events), ↷ skipped.")


class HelpScreen(ModalScreen[None]):
    """Keys and legend; any of Esc, q, ? closes it."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,q,question_mark", "dismiss", "Close"),
    ]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll {
        width: 90%; max-width: 100; height: 90%;
        border: round $accent; background: $surface; padding: 0 1;
    }
    """

    def compose(self) -> ComposeResult:
        table = Table(box=None, padding=(0, 1), show_header=False)
        table.add_column(style="bold cyan", no_wrap=True)
        table.add_column()
        for section, keys in HELP_KEYS:
            table.add_row(Text(section, style="bold underline"), "")
            for key, what in keys:
                table.add_row(key, what)
        with VerticalScroll():
            yield Static(Text("pf inspect — keys", style="bold"))
            yield Static(table)
            yield Static(Text(_LEGEND, style="dim"))
