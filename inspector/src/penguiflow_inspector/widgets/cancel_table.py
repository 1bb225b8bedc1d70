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

from ..model import TraceView
from .waterfall import format_ms

__all__ = ["CancelTable", "render_cancels"]


def render_cancels(view: TraceView) -> RenderableType:
    """The tab's content for ``view``."""
    names = {inv.invocation_id: inv.node_name for inv in view.invocations}
    parts: list[RenderableType] = []
    if not view.cancels:
        parts.append(Text("No cancel in this trace.", style="dim"))
    for n, cancel in enumerate(view.cancels, 1):
        t0 = cancel.requested
        table = Table("step", "what", "after request", "round trip", box=None, padding=(0, 1),
                      header_style="bold", title=f"cancel {n}", title_justify="left",
                      title_style="bold magenta")
        table.add_row("requested", "trace_cancel_start",
                      f"+{format_ms((t0 - view.start) * 1e3)} in trace", "")
        for task_id, ts, rtt, reason in cancel.propagated:
            table.add_row("propagated", f"task {task_id or '?'} ({reason})",
                          format_ms((ts - t0) * 1e3), format_ms(rtt))
        for inv_id, ts in cancel.interrupted:
            table.add_row("interrupted", f"{names.get(inv_id, '?')} {inv_id}",
                          format_ms((ts - t0) * 1e3), "")
        table.add_row("acknowledged", "trace_cancel_finish",
                      format_ms(cancel.latency_ms) if cancel.acknowledged else "never", "")
        parts.append(table)
        if cancel.kept_running:
            kept = ", ".join(f"{names.get(i, '?')} {i}" for i in cancel.kept_running)
            parts.append(Text(f"kept running after the cancel: {kept}", style="yellow"))
    parts.append(Text(""))
    if not view.deadlines:
        parts.append(Text("No deadline skips in this trace.", style="dim"))
    else:
        dl = Table("node", "at", "deadline", "remaining", box=None, padding=(0, 1),
                   header_style="bold", title="deadlines", title_justify="left",
                   title_style="bold")
        for d in view.deadlines:
            deadline = ("—" if d.deadline is None
                        else f"+{format_ms((d.deadline - view.start) * 1e3)}")
            dl.add_row(d.node_name or "—", f"+{format_ms((d.ts - view.start) * 1e3)}",
                       deadline, format_ms(d.remaining_ms))
        parts.append(dl)
    return Group(*parts)


class CancelTable(Static):
    """Shows :func:`render_cancels`."""

    def show(self, view: TraceView) -> None:
        self.update(render_cancels(view))
