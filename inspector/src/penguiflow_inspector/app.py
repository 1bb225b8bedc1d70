"""The inspector's Textual app: the controller that opens the store and the first screen.

``pf inspect ID`` -> :class:`~.screens.trace.TraceScreen`; ``pf traces`` ->
:class:`~.screens.traces.TracesScreen`; ``pf tail [ID]`` -> either, following
the store live. The store is reached through the same ``TraceStore`` seam the
runtime writes to, so tests run the app on the in-memory store and production
on SQLite or Postgres.

The app only reads: it opens its store with ``readonly=True`` (see ``_store``),
so it never creates or alters a file.

Exit status (``app.return_code`` after ``run()``), as ``pf``'s: 0; 1 when the
store could not be reached or read; 2 when the store URL is not supported or
names something that is not a trace store (missing, empty, foreign, another
schema version), or the app was opened on an unknown or ambiguous trace id.
The error is shown in the app first; ``q`` leaves. Ctrl-C exits 130 at once.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, ClassVar, Literal

from textual import work
from textual.app import App
from textual.binding import Binding, BindingType
from textual.widgets import Input
from textual.widgets.input import Selection

from penguiflow.state import StateStoreError

from ._store import EXIT_INTERRUPTED, CommandError, open_reader, store_url
from .messages import LoadFailed
from .screens.help import HelpScreen
from .screens.message import MessageScreen
from .screens.trace import TraceScreen
from .screens.traces import TracesScreen

if TYPE_CHECKING:
    from penguiflow.state import TraceFilter, TraceStore

    from .model import TraceView

__all__ = ["InspectorApp", "Mode"]

Mode = Literal["trace", "traces", "tail"]


class InspectorApp(App[None]):
    """``pf inspect`` / ``pf traces`` / ``pf tail``.

    Args:
        store_url: the store to open (``open_store`` rules: None means
            ``$PENGUIFLOW_STORE``, else the SQLite default). Ignored with ``store``.
        trace_id: the trace (a unique prefix is enough); required in ``"trace"`` mode.
        mode: ``"trace"`` one trace, ``"traces"`` the fleet list, ``"tail"``
            either of them following the store live.
        store: an already opened store (tests, embedding); the app does not close it.
        view: a built TraceView to show without any store (fixtures, demos).
        trace_filter: the trace list's filter to start from (``pf traces``' flags).
    """

    TITLE = "pf inspect"
    # Each widget's stylesheet sits beside it; the app loads them all (widgets take no CSS_PATH).
    CSS_PATH = [  # noqa: RUF012 (Textual's own class attribute)
        "widgets/waterfall.tcss", "widgets/detail.tcss", "widgets/event_log.tcss",
        "widgets/remote_table.tcss", "widgets/cancel_table.tcss", "widgets/replay_bar.tcss",
    ]
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "Quit"),
        Binding("question_mark", "help", "Help"),
        Binding("t", "toggle_theme", "Theme", show=False),
        # Ctrl-C ends the app as it ends every other `pf` command: exit 130 (Textual's
        # own binding only says how to quit). Priority: a focused Input keeps it too.
        Binding("ctrl+c", "interrupt", "Quit", show=False, priority=True),
    ]

    def __init__(self, store_url: str | None = None, trace_id: str | None = None, *,
                 mode: Mode = "trace", store: TraceStore | None = None,
                 view: TraceView | None = None,
                 trace_filter: TraceFilter | None = None) -> None:
        super().__init__()
        if mode == "trace" and trace_id is None and view is None:
            raise ValueError("InspectorApp(mode='trace') needs a trace_id (or a view)")
        self.store_url = store_url
        self.trace_id = trace_id
        self.mode = mode
        self.store: TraceStore | None = store
        self._owns_store = store is None
        self._view = view
        self.trace_filter = trace_filter
        self._exit_code = 0

    def on_mount(self) -> None:
        if self._view is not None:
            self.push_screen(TraceScreen(None, view=self._view))
        elif self.store is not None:
            self._open_first_screen()
        else:
            self.open_store()

    @work(exclusive=True, group="store")
    async def open_store(self) -> None:
        """Open ``store_url`` read-only; a bad URL, a refused or unreachable store
        becomes a message."""
        try:
            store = await open_reader(store_url(self.store_url))
        except CommandError as exc:
            self.post_message(LoadFailed("cannot open the store", exc.message, exc.exit_code))
            return
        self.store = store
        self.call_later(self._open_first_screen)

    def _open_first_screen(self) -> None:
        assert self.store is not None
        live = self.mode == "tail"
        if self.trace_id is not None and self.mode != "traces":
            self.push_screen(TraceScreen(self.store, self.trace_id, live=live))
        else:
            self.push_screen(TracesScreen(self.store, live=live, wanted=self.trace_filter))

    def on_load_failed(self, message: LoadFailed) -> None:
        self.show_error(message.title, message.detail, message.exit_code)

    def show_error(self, title: str, detail: str, exit_code: int) -> None:
        """Show ``title``/``detail``; when nothing else is open, quitting exits ``exit_code``."""
        if len(self.screen_stack) <= 2:
            # Opened directly on this trace (or the store failed): the process fails.
            self._exit_code = exit_code
        self.push_screen(MessageScreen(title, detail))

    def show_trace_list(self) -> None:
        """Esc on the trace the app was opened on (``pf inspect ID``): the trace list
        replaces it (Enter opens a trace again, Esc comes back to the list). The user
        has moved on from a trace that failed to load: ``q`` then exits 0."""
        if self.store is None:
            self.notify("no trace list: this trace was opened without a store",
                        severity="warning", markup=False)
            return
        self._exit_code = 0
        self.switch_screen(TracesScreen(self.store, live=self.mode == "tail"))

    @property
    def exit_code(self) -> int:
        """What ``q`` will exit with (0 unless the first screen failed to load)."""
        return self._exit_code

    async def action_quit(self) -> None:
        self.exit(return_code=self._exit_code)

    def action_interrupt(self) -> None:
        """Ctrl-C: copy the selected text when there is some (in the search box, or
        selected with the mouse: a trace id, an error), as Textual's Ctrl-C does;
        else exit 130 (128 + SIGINT), as ``pf``'s other commands."""
        focused = self.focused
        if isinstance(focused, Input) and not focused.selection.is_empty:
            self.copy_to_clipboard(focused.selected_text)
            focused.selection = Selection.cursor(focused.cursor_position)
        elif text := self.screen.get_selected_text():
            self.copy_to_clipboard(text)
            self.screen.clear_selection()  # (whatever has the focus)
        else:
            self.exit(return_code=EXIT_INTERRUPTED)
            return
        self.notify("copied; Ctrl-C again (nothing selected) quits", timeout=3)

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def action_toggle_theme(self) -> None:
        self.theme = "textual-light" if self.current_theme.dark else "textual-dark"

    async def on_unmount(self) -> None:
        if self._owns_store and self.store is not None:
            with contextlib.suppress(StateStoreError):  # closing a store that is down
                await self.store.close()
