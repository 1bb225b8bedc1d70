"""The detail pane: everything known about the selected waterfall row.

Attributes, attempts, a payload preview (the kind-specific ``extra`` items of
its events), the error and traceback text, and the OTel trace/span ids to
paste into Jaeger's search box.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from textual.css.styles import RulesMap
from textual.strip import Strip
from textual.style import Style
from textual.visual import RenderOptions, RichVisual, VisualType
from textual.widgets import Static

from ..model import (
    STATUS_SYMBOL,
    DeadlineView,
    EventRow,
    InvocationView,
    RemoteCallView,
    TraceView,
    display_name,
    format_duration,
    format_offset,
    printable,
    status_word,
)
from .rows import Row, payload_preview, state_split

__all__ = ["DetailPane", "render_detail"]


#: Lines of a failure's traceback the pane shows (it scrolls; --json has all of it).
TRACEBACK_LINES = 60
#: Characters of a row's error the pane shows (a 1 MB error took ~2 s a selection).
ERROR_CHARS = 4000
_ATTEMPT_WORD = {"ok": "succeeded", "error": "failed", "timeout": "timed out"}


def _rel(view: TraceView, t: float | None) -> str:
    return format_offset(t, view.start)


def _kv(table: Table, key: str, value: object, style: str = "") -> None:
    """A row of the pane; the value is stored text, shown escaped (never as markup)."""
    if value not in (None, "", ()):
        table.add_row(key, Text(printable(value), style=style))


def _status(status: str) -> Text:
    """The store's word, then its symbol (``succeeded ✓``, ``failed !``, ``skipped ↷``...)."""
    word = status_word(status)
    symbol = STATUS_SYMBOL.get(word)
    return Text(f"{word} {symbol}" if symbol else word, style=f"bold {_STYLE.get(word, '')}")


_STYLE = {"succeeded": "green", "failed": "red", "cancelled": "magenta", "running": "cyan",
          "incomplete": "yellow", "skipped": "dim"}


def traceback_of(events: Sequence[EventRow]) -> list[str] | None:
    """The last ``traceback`` item among ``events`` (a failure's formatted traceback,
    a string or a list of strings), as lines; None when no event has one."""
    found: object = None
    for ev in events:
        value = ev.extra.get("traceback")
        if value:
            found = value
    if isinstance(found, str):
        return found.rstrip("\n").split("\n")
    if isinstance(found, list | tuple):
        return [line for item in found for line in str(item).rstrip("\n").split("\n")]
    return None


def render_detail(view: TraceView, row: Row | None,
                  events: Sequence[EventRow]) -> RenderableType:
    """The pane's content for ``row`` (the trace's own summary when None)."""
    table = Table.grid(padding=(0, 1))
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    parts: list[RenderableType] = [table]
    if row is None:
        _kv(table, "trace", view.trace_id)
        table.add_row("status", _status(view.status))
        _kv(table, "events lost", view.events_lost or None, "bold yellow")
        _kv(table, "duration", format_duration(view.duration_ms))
        _kv(table, "otel trace", view.otel_trace_id)
        return Group(*parts)
    item = row.item
    table.add_row("status", _status(row.status))
    if isinstance(item, DeadlineView):
        _kv(table, "node", display_name(item.node_name or "?"))
        _kv(table, "skipped at", _rel(view, item.ts))
        _kv(table, "deadline", None if item.deadline is None else _rel(view, item.deadline))
        if item.remaining_ms is not None:
            late = -item.remaining_ms
            _kv(table, "late by" if late >= 0 else "remaining", format_duration(abs(late)))
        _kv(table, "why", "its message's deadline had passed: the node never ran")
        return Group(*parts)
    if isinstance(item, InvocationView):
        _kv(table, "node", item.node_name)
        _kv(table, "invocation", item.invocation_id)
        _kv(table, "start", _rel(view, item.start))
        _kv(table, "duration", format_duration(item.duration_ms))
        _kv(table, "queue wait", None if item.queue_wait_ms is None
            else format_duration(item.queue_wait_ms))
        _kv(table, "parents", ", ".join(item.parents))
        _kv(table, "chunks", item.chunks or None)
        _kv(table, "otel trace", view.otel_trace_id)
        _kv(table, "span", item.span_id)
        _kv(table, "parent span", item.parent_span_id)
        if item.attempts:
            # One line per attempt (a table's columns are cut to nothing at 80x24).
            parts.append(Text("attempts", style="bold"))
            for a in item.attempts:
                dur = None if a.end is None else (a.end - a.start) * 1000.0
                line = Text(f"#{a.attempt} ")
                line.append(_ATTEMPT_WORD.get(a.outcome, a.outcome),
                            style=_STYLE.get(status_word(a.outcome), ""))
                line.append(f" {format_duration(dur)} at {_rel(view, a.start)}")
                if a.backoff_ms:
                    line.append(f", then {format_duration(a.backoff_ms)} backoff", style="dim")
                parts.append(line)
        error = item.error or next((a.error for a in reversed(item.attempts) if a.error), None)
    else:
        assert isinstance(item, RemoteCallView)
        _kv(table, "agent", item.agent_url)
        _kv(table, "skill", item.skill)
        _kv(table, "contextId", item.context_id)
        _kv(table, "taskId", item.task_id)
        _kv(table, "start", _rel(view, item.start))
        _kv(table, "latency", format_duration(item.latency_ms))
        _kv(table, "first chunk", None if item.time_to_first_chunk_ms is None
            else format_duration(item.time_to_first_chunk_ms))
        _kv(table, "bytes", f"{item.bytes_sent or 0} sent / {item.bytes_received or 0} received")
        _kv(table, "stream events", item.stream_events or None)
        _kv(table, "otel trace", view.otel_trace_id)
        _kv(table, "span", item.call_id)
        split = state_split(item)
        if split:
            _kv(table, "task states", "  ".join(f"{s} {format_duration(ms)}"
                                                for s, ms in split))
        error = item.error
    if error:
        parts.append(Text("error", style="bold"))
        cut = len(error) - ERROR_CHARS
        parts.append(Text(printable(error[:ERROR_CHARS] if cut > 0 else error, multiline=True),
                          style="bold red"))
        if cut > 0:
            parts.append(Text(f"… {cut:,} more characters (pf inspect --json has the whole "
                              "error)", style="dim"))
    lines = traceback_of(events) if row.status != "ok" or error else None
    if lines:
        shown = [printable(line) for line in lines[-TRACEBACK_LINES:]]
        if len(lines) > TRACEBACK_LINES:  # the end is where it failed: keep that
            shown.insert(0, f"… {len(lines) - TRACEBACK_LINES} lines above "
                            "(pf inspect --json has the whole traceback)")
        parts.append(Text("traceback", style="bold"))
        parts.append(Text("\n".join(shown), style="red", no_wrap=True, overflow="fold"))
    preview = payload_preview(events)
    if preview:
        payload = Table.grid(padding=(0, 1))
        payload.add_column(style="dim", no_wrap=True)
        payload.add_column(overflow="fold")
        for key, value in preview:
            if key == "traceback":
                continue  # shown above, in full lines
            text = printable(repr(value) if not isinstance(value, str) else value)
            payload.add_row(Text(printable(key)),
                            Text(text if len(text) <= 400 else text[:399] + "…"))
        parts.append(Text("payload (event extras)", style="bold"))
        parts.append(payload)
    return Group(*parts)


class _RenderedOnce(RichVisual):
    """A Rich renderable rendered once per width and style.

    ``RichVisual`` renders twice per update: once to measure the height (the
    layout check in :meth:`DetailPane.show`), once to paint. Rich tables are slow
    to render (several ms for this pane on the CI machine), so both share one.
    """

    def __init__(self, widget: DetailPane, renderable: RenderableType) -> None:
        super().__init__(widget, renderable)
        self._pane = widget
        self._done: tuple[int, Style, list[Strip]] | None = None

    def render_strips(self, width: int, height: int | None, style: Style,
                      options: RenderOptions) -> list[Strip]:
        done = self._done
        if done is None or done[0] != width or done[1] != style:
            done = self._done = (width, style, super().render_strips(width, None, style,
                                                                     options))
        return done[2] if height is None else done[2][:height]

    def get_height(self, rules: RulesMap, width: int) -> int:
        pane = self._pane
        options = RenderOptions(pane._get_style, rules)
        return len(self.render_strips(width, None, pane.visual_style, options))


class DetailPane(Static):
    """Shows :func:`render_detail` of the selection."""

    @property
    def content(self) -> VisualType:
        """The renderable shown (what :func:`render_detail` returned)."""
        content = Static.content.fget(self)  # type: ignore[attr-defined]
        return content._renderable if isinstance(content, _RenderedOnce) else content

    @content.setter
    def content(self, content: VisualType) -> None:
        Static.content.fset(self, content)  # type: ignore[attr-defined]

    def show(self, view: TraceView, row: Row | None, events: Sequence[EventRow]) -> None:
        """Show ``row``; the screen is laid out again only when the pane's height changes.

        (``Static.update`` lays out the whole screen each time: 20-40 ms here, on
        every replay step and cursor move, for a pane that mostly keeps its height.)
        """
        self.update(_RenderedOnce(self, render_detail(view, row, events)), layout=False)
        width, height = self.content_size
        if not width or self.get_content_height(self.size, self.size, width) != height:
            self.refresh(layout=True)
