"""The Cancel & deadline tab: how each cancel travelled, and skipped deadlines.

For each cancel: requested → propagated (one line per remote CancelTask, with
its round trip) → interrupted invocations → acknowledged, each with its delay
after the request; then the invocations that kept producing events after the
request. Deadlines: each skipped message with its remaining budget.
"""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from ..model import (
    TraceView,
    cancel_flow,
    display_name,
    format_duration,
    format_offset,
    printable,
)

__all__ = ["CancelTable", "render_cancels"]


def render_cancels(view: TraceView) -> RenderableType:
    """The tab's content for ``view``; stored text (names, ids, reasons) is escaped and
    never read as markup; times are relative (to the trace's start, the request)."""
    names = {inv.invocation_id: inv.node_name for inv in view.invocations}

    def who(inv_id: str) -> Text:
        return Text(printable(f"{names.get(inv_id, '?')} {inv_id}"))

    parts: list[RenderableType] = []
    if not view.cancels:
        parts.append(Text("No cancel in this trace.", style="dim"))
    for n, cancel in enumerate(view.cancels, 1):
        t0 = cancel.requested
        table = Table("step", "what", "after request", "round trip", box=None, padding=(0, 1),
                      header_style="bold", title_justify="left",
                      # Text, not str: a flow name is stored text, never markup.
                      # (Rich applies title_style to a str title only.)
                      title=Text(printable(f"cancel {n}{cancel_flow(view, cancel)}"),
                                 style="bold magenta"))
        table.add_row("requested", "trace_cancel_start",
                      f"{format_offset(t0, view.start)} in trace", "")
        for task_id, ts, rtt, reason in cancel.propagated:
            table.add_row("propagated", Text(printable(f"task {task_id or '?'} ({reason})")),
                          format_duration((ts - t0) * 1e3), format_duration(rtt))
        for task_id, ts, rtt, reason, error in cancel.failed:
            table.add_row(Text("propagation failed", style="red"),
                          Text(printable(f"task {task_id or '?'} ({reason}): {error}")),
                          format_duration((ts - t0) * 1e3), format_duration(rtt))
        for inv_id, ts in cancel.interrupted:
            table.add_row("interrupted", who(inv_id), format_duration((ts - t0) * 1e3), "")
        table.add_row("acknowledged", "trace_cancel_finish",
                      format_duration(cancel.latency_ms) if cancel.acknowledged else "never", "")
        parts.append(table)
        if cancel.kept_running:
            kept = Text("kept running after the cancel: ", style="yellow")
            kept.append(", ".join(str(who(i)) for i in cancel.kept_running))
            parts.append(kept)
    parts.append(Text(""))
    if not view.deadlines:
        parts.append(Text("No deadline skips in this trace.", style="dim"))
    else:
        dl = Table("node", "skipped at", "deadline", "late by", box=None, padding=(0, 1),
                   header_style="bold", title="deadlines (the node never ran)",
                   title_justify="left", title_style="bold")
        for d in view.deadlines:
            late = None if d.remaining_ms is None else -d.remaining_ms
            dl.add_row(Text(printable(display_name(d.node_name or "-"))),
                       format_offset(d.ts, view.start),
                       "-" if d.deadline is None else format_offset(d.deadline, view.start),
                       format_duration(late))
        parts.append(dl)
    return Group(*parts)


class CancelTable(Static):
    """Shows :func:`render_cancels`."""

    def show(self, view: TraceView) -> None:
        self.update(render_cancels(view))
