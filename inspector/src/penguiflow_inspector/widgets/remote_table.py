"""The Remote tab: every remote call, per-agent p50/p95, and a call's task-state split."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable, Static

from ..model import RemoteCallView, TraceView, format_duration, printable, status_word
from ._keys import KeyedTable
from .rows import remote_stats_for, state_split

__all__ = ["RemoteTable"]

_OUTCOME_STYLE = {"success": "green", "error": "bold red", "cancelled": "bold magenta",
                  "running": "cyan"}


class RemoteTable(Vertical):
    """Per-agent stats above, the calls in the middle, the highlighted call's split below."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._calls: list[RemoteCallView] = []

    def compose(self) -> ComposeResult:
        yield Static(id="remote-stats")
        table = KeyedTable(id="remote-calls", cursor_type="row", zebra_stripes=True)
        # What a narrow terminal must show first: who, what, how it ended, how long.
        table.add_columns("agent", "skill", "outcome", "latency", "contextId", "taskId",
                          "bytes ⇅")
        yield table
        yield Static(id="remote-split")

    def show(self, view: TraceView) -> None:
        self._calls = list(view.remote_calls)
        stats = Table("agent", "calls", "errors", "p50", "p95", box=None, padding=(0, 1),
                      header_style="bold")
        for s in remote_stats_for(view):
            stats.add_row(Text(printable(s.agent)), str(s.calls), str(s.errors),
                          format_duration(s.p50_ms), format_duration(s.p95_ms))
        if not self._calls:
            self.query_one("#remote-stats", Static).update("No remote calls in this trace.")
        else:
            self.query_one("#remote-stats", Static).update(stats)
        table: DataTable[str | Text] = self.query_one("#remote-calls", DataTable)
        # A repaint (a replay step, a live rebuild) keeps the highlighted call.
        was = table.cursor_row
        key = (table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
               if 0 <= was < table.row_count else None)
        table.clear()
        for call in self._calls:
            # Stored text as Text: a str cell would be read as markup ("[red]...").
            table.add_row(Text(printable(call.agent_url or "-")),
                          Text(printable(call.skill or "-")),
                          Text(status_word(call.outcome),
                               style=_OUTCOME_STYLE.get(call.outcome, "")),
                          format_duration(call.latency_ms),
                          Text(printable(call.context_id or "-")),
                          Text(printable(call.task_id or "-")),
                          f"{call.bytes_sent or 0}/{call.bytes_received or 0}",
                          key=call.call_id)
        row = (table.get_row_index(key) if key is not None and key in table.rows
               else min(max(was, 0), max(table.row_count - 1, 0)))
        if row:
            table.move_cursor(row=row, animate=False)
        self._show_split(row)

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._show_split(event.cursor_row)

    def _show_split(self, index: int) -> None:
        split_pane = self.query_one("#remote-split", Static)
        if not 0 <= index < len(self._calls):
            split_pane.update("")
            return
        call = self._calls[index]
        split = state_split(call)
        # The ids too: at 80 columns the table's own id columns are scrolled out of view.
        head = (f"{printable(call.skill or 'call')} {format_duration(call.latency_ms)}"
                f" · task {printable(call.task_id or '-')}"
                f" · context {printable(call.context_id or '-')}")
        if not split:
            split_pane.update(Text(f"{head}: no task states reported"))
            return
        split_pane.update(Text(head + ": " + "  →  ".join(
            f"{printable(state)} {format_duration(ms)}" for state, ms in split)))
