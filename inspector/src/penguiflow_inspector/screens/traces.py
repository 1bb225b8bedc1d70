"""The fleet screen: recent traces, newest (or slowest) first, with filters.

``store.list_traces(TraceFilter(...))`` runs in a worker; with ``live`` (``pf
tail``) a second worker follows every trace and marks the list dirty, and a
1 Hz timer reloads it, so a busy store costs one query a second.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Input, Static

from penguiflow.state import TRACE_STATUSES, StateStoreError, TraceFilter, TraceSummary

from ..messages import EventsArrived, LoadFailed, TracesLoaded
from ..model import STATUS_SYMBOL, format_clock, format_duration, printable
from ..widgets._keys import KeyedTable
from .trace import TraceScreen

if TYPE_CHECKING:
    from penguiflow.state import TraceStore

__all__ = ["TracesScreen"]

_STATUS_STYLE = {"succeeded": "green", "failed": "bold red", "cancelled": "bold magenta",
                 "running": "cyan", "incomplete": "bold yellow"}
_STATUSES: tuple[str | None, ...] = (None, *TRACE_STATUSES)
_ERRORS: tuple[bool | None, ...] = (None, True, False)


class TracesScreen(Screen[None]):
    """A table of trace summaries; Enter opens one."""

    CSS_PATH = "traces.tcss"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("s", "cycle_status", "Status"),
        Binding("e", "cycle_errors", "Errors"),
        Binding("o", "toggle_order", "Order"),
        Binding("n", "node_filter", "Node"),
        Binding("R", "reload", "Reload"),
        Binding("escape", "close_node_filter", "Close filter", show=False),
    ]

    def __init__(self, store: TraceStore, *, live: bool = False, limit: int = 200,
                 wanted: TraceFilter | None = None) -> None:
        """``wanted``: the filter to start from (``pf traces``' flags; its limit
        replaces ``limit``); the keys then change it."""
        super().__init__()
        self.store = store
        self.live = live
        self.limit = limit if wanted is None else wanted.limit
        self.status: str | None = None if wanted is None else wanted.status
        self.has_errors: bool | None = None if wanted is None else wanted.has_errors
        self.order = "newest" if wanted is None else wanted.order
        self.node: str | None = None if wanted is None else wanted.node
        #: ``--since`` / ``--until`` (no key changes them).
        self.since: float | None = None if wanted is None else wanted.since
        self.until: float | None = None if wanted is None else wanted.until
        self.summaries: list[TraceSummary] = []
        self._dirty = False

    def compose(self) -> ComposeResult:
        yield Static(id="filters")
        table = KeyedTable(id="traces", cursor_type="row", zebra_stripes=True)
        table.add_columns("trace", "started (UTC)", "duration", "status", "nodes", "inv",
                          "errors", "events", "flow")
        yield table
        yield Input(placeholder="node name (empty: any node), Enter to apply", id="node-filter")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#node-filter", Input).display = False
        self.query_one(DataTable).focus()
        self._paint_filters()
        self.reload()
        if self.live:
            self.follow()
            self.set_interval(1.0, self._reload_if_dirty)

    def trace_filter(self) -> TraceFilter:
        """The filter the screen's keys have set."""
        return TraceFilter(status=self.status, node=self.node, has_errors=self.has_errors,
                           since=self.since, until=self.until, order=self.order,
                           limit=self.limit)

    @work(exclusive=True, group="list")
    async def reload(self) -> None:
        try:
            summaries = await self.store.list_traces(self.trace_filter())
        except StateStoreError as exc:
            self.post_message(LoadFailed("the store is unavailable", str(exc), 1))
            return
        self.post_message(TracesLoaded(summaries))

    @work(group="follow")
    async def follow(self) -> None:
        try:
            async for event in self.store.follow(None):
                self.post_message(EventsArrived([event]))
        except StateStoreError as exc:
            self.notify(f"live updates stopped: {printable(exc)}", severity="warning",
                        markup=False)

    def on_events_arrived(self, _message: EventsArrived) -> None:
        self._dirty = True

    def _reload_if_dirty(self) -> None:
        if self._dirty:
            self._dirty = False
            self.reload()

    def on_traces_loaded(self, message: TracesLoaded) -> None:
        self.summaries = list(message.summaries)
        self._fill(self.summaries)

    def _fill(self, summaries: Sequence[TraceSummary]) -> None:
        table: DataTable[str | Text] = self.query_one(DataTable)
        key = None
        if table.row_count and 0 <= table.cursor_row < len(self.summaries):
            key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        table.clear()
        for s in summaries:
            started = format_clock(s.started_ts, "%m-%d %H:%M:%S", utc=True)
            symbol = STATUS_SYMBOL.get(s.status)
            status = (f"{symbol} " if symbol else "") + s.status + (
                f" ({s.events_lost} lost)" if s.events_lost else "")
            # pf traces's columns and words, narrowed to fit 80 columns: a 12-character
            # id prefix (pf inspect takes a prefix), the flow last. Stored text as
            # Text: a str cell would be read as markup ("[red]...").
            table.add_row(Text(printable(s.trace_id[:12])), started,
                          format_duration(s.duration_ms),
                          Text(status, style=_STATUS_STYLE.get(s.status, "")),
                          str(len(s.nodes)), str(s.node_count),
                          Text(str(s.error_count), style="red" if s.error_count else "dim"),
                          str(s.event_count), Text(printable(s.flow_name or "-")),
                          key=s.trace_id)
        if key is not None and key in table.rows:
            table.move_cursor(row=table.get_row_index(key))
        self._paint_filters()

    def _paint_filters(self) -> None:
        errors = {None: "errors any", True: "with errors", False: "no errors"}[self.has_errors]
        text = Text()
        text.append(f"{len(self.summaries)} traces", style="bold")
        text.append(f" · {self.order} first · status {self.status or 'any'} · {errors}"
                    f" · node {printable(self.node or 'any')}")
        if self.since is not None:
            text.append(f" · since {format_clock(self.since, '%m-%d %H:%M:%S', utc=True)}")
        if self.until is not None:
            text.append(f" · until {format_clock(self.until, '%m-%d %H:%M:%S', utc=True)}")
        if self.live:
            text.append(" · ● live", style="cyan")
        self.query_one("#filters", Static).update(text)

    @on(DataTable.RowSelected, "#traces")
    def _open(self, event: DataTable.RowSelected) -> None:
        trace_id = event.row_key.value
        if trace_id is not None:
            self.app.push_screen(TraceScreen(self.store, trace_id, live=self.live))

    def action_cycle_status(self) -> None:
        self.status = _STATUSES[(_STATUSES.index(self.status) + 1) % len(_STATUSES)]
        self.reload()
        self._paint_filters()

    def action_cycle_errors(self) -> None:
        self.has_errors = _ERRORS[(_ERRORS.index(self.has_errors) + 1) % len(_ERRORS)]
        self.reload()
        self._paint_filters()

    def action_toggle_order(self) -> None:
        self.order = "slowest" if self.order == "newest" else "newest"
        self.reload()
        self._paint_filters()

    def action_node_filter(self) -> None:
        box = self.query_one("#node-filter", Input)
        box.display = True
        box.focus()

    @on(Input.Submitted, "#node-filter")
    def _node_set(self, event: Input.Submitted) -> None:
        self.node = event.value.strip() or None
        self.action_close_node_filter()
        self.reload()
        self._paint_filters()

    def action_close_node_filter(self) -> None:
        self.query_one("#node-filter", Input).display = False
        self.query_one(DataTable).focus()
