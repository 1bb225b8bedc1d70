"""The waterfall: one row per invocation or remote call on a shared time axis.

Remote calls are drawn indented under their invocation (``└``), and the
invocations that served a call (the called agent recording into the same
store) one level deeper under it (``⤷``). A message skipped because its
deadline had passed is a row of its own at its time (``↷ skipped``: the node
never ran).

Virtualised with the Line API (the Toolong approach): the widget holds the
flattened :class:`~.rows.Rows` and draws only the lines in view, each computed
from its row on demand, so scrolling a 100k-event trace costs the same as a
small one. Line 0 is the time axis and stays put; rows start at line 1.

Colours come from component classes (``waterfall--ok`` ...) styled in
``waterfall.tcss`` with theme variables, so dark and light themes both read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from rich.cells import cell_len, set_cell_size
from rich.segment import Segment
from rich.style import Style
from textual.binding import Binding, BindingType
from textual.events import Click
from textual.geometry import Region, Size
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip

from ..messages import RowSelected
from ..model import (
    STATUS_SYMBOL,
    InvocationView,
    axis_fraction,
    display_name,
    format_duration,
    printable,
)
from ._scroll import set_virtual_size
from .rows import Query, Row, Rows, glyphs

__all__ = ["Waterfall"]

_STATUS_CLASSES = ("ok", "error", "timeout", "cancelled", "running", "skipped")


class Waterfall(ScrollView, can_focus=True):
    """Invocations and remote calls as bars; ``◆`` marks the critical path."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("j,down", "cursor(1)", "down", show=False),
        Binding("k,up", "cursor(-1)", "up", show=False),
        Binding("pagedown", "page(1)", "page down", show=False),
        Binding("pageup", "page(-1)", "page up", show=False),
        Binding("g,home", "jump(0)", "top", show=False),
        Binding("G,end", "jump(-1)", "bottom", show=False),
    ]
    COMPONENT_CLASSES: ClassVar[set[str]] = {
        *(f"waterfall--{c}" for c in _STATUS_CLASSES),
        "waterfall--remote", "waterfall--queue", "waterfall--critical",
        "waterfall--cursor", "waterfall--axis", "waterfall--name",
    }

    cursor: reactive[int] = reactive(0, always_update=False, init=False)

    def __init__(self, *, id: str | None = None,
                 on_select: Callable[[Row | None], None] | None = None) -> None:
        """``on_select``: called with the selected row whenever the selection or the rows
        change, synchronously (else a :class:`RowSelected` message is posted). The trace
        screen updates its detail pane and event log from it in the same call, so that a
        key press paints one frame, not one for the waterfall and another after the
        message has bubbled up to the screen."""
        super().__init__(id=id)
        self._on_select = on_select
        #: The widget's base style for the current render pass (``rich_style`` walks
        #: the DOM: ~0.3 ms a call, too slow to ask once per row).
        self._base_style: Style | None = None
        self.rows: Rows | None = None
        self._visible: list[int] | None = None
        self.query_text = ""
        self._span = (0.0, 1.0)
        self._now: float | None = None
        self.show_critical = True

    # ------------------------------------------------------------ data

    def set_rows(self, rows: Rows, *, span: tuple[float, float] | None = None,
                 now: float | None = None) -> None:
        """Show ``rows``; keeps the cursor on the same invocation/call when it still exists."""
        key = self.selected.key if self.selected is not None else None
        self.rows = rows
        view = rows.view
        self._span = span or (view.start, max(view.end, view.start + 1e-6))
        self._now = now
        self._apply_filter()
        if key is not None:
            index = self._position_of(key)
            if index is not None:
                self.set_reactive(Waterfall.cursor, index)
        self._clamp_cursor()
        self._selected()
        self.refresh()

    def _selected(self) -> None:
        if self._on_select is not None:
            self._on_select(self.selected)
        else:
            self.post_message(RowSelected(self.selected))

    def set_query(self, query: Query) -> int:
        """Filter the rows; returns how many match."""
        self._query = query
        self._apply_filter()
        self.set_reactive(Waterfall.cursor, 0)
        self.scroll_to(y=0, animate=False)
        self._selected()
        self.refresh()
        return self.row_count

    _query: Query = Query()

    def _apply_filter(self) -> None:
        rows = self.rows.rows if self.rows is not None else []
        q = self._query
        self._visible = None if q.empty else [i for i, r in enumerate(rows) if q.matches(r)]
        set_virtual_size(self, Size(self.size.width, self.row_count + 1))

    def _position_of(self, key: str) -> int | None:
        if self.rows is None:
            return None
        index = self.rows.index_of(key)
        if index is None or self._visible is None:
            return index
        try:
            return self._visible.index(index)
        except ValueError:
            return None

    @property
    def row_count(self) -> int:
        if self._visible is not None:
            return len(self._visible)
        return len(self.rows.rows) if self.rows is not None else 0

    def row_at(self, position: int) -> Row | None:
        """The row at a position of the (filtered) list."""
        if self.rows is None or not 0 <= position < self.row_count:
            return None
        index = self._visible[position] if self._visible is not None else position
        return self.rows.rows[index]

    @property
    def selected(self) -> Row | None:
        return self.row_at(self.cursor)

    # ------------------------------------------------------------ cursor

    def _clamp_cursor(self) -> None:
        if self.cursor >= self.row_count:
            self.set_reactive(Waterfall.cursor, max(0, self.row_count - 1))
        self._scroll_to_cursor()

    def watch_cursor(self, _old: int, _new: int) -> None:
        self._scroll_to_cursor()
        self._selected()
        self.refresh()

    def _scroll_to_cursor(self) -> None:
        body = max(1, self.scrollable_content_region.height - 1)
        top = int(self.scroll_offset.y)
        if self.cursor < top:
            self.scroll_to(y=self.cursor, animate=False, immediate=True)
        elif self.cursor >= top + body:
            self.scroll_to(y=self.cursor - body + 1, animate=False, immediate=True)

    def action_cursor(self, delta: int) -> None:
        self.cursor = max(0, min(self.row_count - 1, self.cursor + delta))

    def action_page(self, direction: int) -> None:
        self.action_cursor(direction * max(1, self.scrollable_content_region.height - 2))

    def action_jump(self, where: int) -> None:
        self.cursor = 0 if where == 0 else max(0, self.row_count - 1)

    def on_click(self, event: Click) -> None:
        if event.y >= 1:
            position = int(self.scroll_offset.y) + event.y - 1
            if 0 <= position < self.row_count:
                self.cursor = position

    def on_resize(self) -> None:
        self.virtual_size = Size(self.size.width, self.row_count + 1)

    # ------------------------------------------------------------ drawing

    def _layout(self, width: int) -> tuple[int, int, int]:
        label = max(14, min(30, width // 3))
        dur = 9  # format_duration's widest: "-812.4 ms"
        return label, max(8, width - label - dur - 1), dur

    def render_lines(self, crop: Region) -> list[Strip]:
        self._base_style = self.rich_style  # once per pass (see __init__)
        try:
            return super().render_lines(crop)
        finally:
            self._base_style = None

    @property
    def base_style(self) -> Style:
        base = self._base_style
        return base if base is not None else self.rich_style

    def render_line(self, y: int) -> Strip:
        width = self.scrollable_content_region.width
        if y == 0:
            return self._axis(width)
        position = int(self.scroll_offset.y) + y - 1
        row = self.row_at(position)
        if row is None:
            return Strip.blank(width, self.base_style)
        return self._row_strip(row, width, position == self.cursor)

    def _axis(self, width: int) -> Strip:
        label_w, bar_w, dur_w = self._layout(width)
        t0, t1 = self._span
        total_ms = (t1 - t0) * 1000.0
        cells = [" "] * bar_w
        ticks = 4 if bar_w >= 40 else 2
        # The end label first, then the others left to right where they fit with a
        # space on each side (at 80 columns "66.5 ms" and "133.0 ms" would touch).
        taken: list[tuple[int, int]] = []
        for k in (ticks, *range(ticks)):
            col = min(bar_w - 1, round(k * (bar_w - 1) / ticks))
            text = format_duration(total_ms * k / ticks) if k else "0"
            start = min(max(0, col - len(text) // 2), bar_w - len(text)) if k else 0
            end = start + len(text)
            if start < 0 or any(start <= b and a <= end for a, b in taken):
                continue
            taken.append((start, end))
            cells[start:end] = text
        style = self.get_component_rich_style("waterfall--axis")
        head = f"{'node / call':<{label_w}}"
        tail = f"{'dur':>{dur_w}} "
        return Strip([Segment(head + "".join(cells) + " " + tail[:-1], style)]).adjust_cell_length(
            width, style)

    def _col(self, t: float, bar_w: int) -> int:
        t0, t1 = self._span
        frac = axis_fraction(t, t0, t1) if t1 > t0 else 0.0
        return max(0, min(bar_w - 1, int(frac * bar_w)))

    def _row_strip(self, row: Row, width: int, is_cursor: bool) -> Strip:
        label_w, bar_w, dur_w = self._layout(width)
        style_of = self.get_component_rich_style
        base = self.base_style
        status_style = style_of(f"waterfall--{row.status}"
                                if row.status in _STATUS_CLASSES else "waterfall--ok")
        critical = self.show_critical and self.rows is not None and row.key in self.rows.critical
        mark = "◆" if critical else " "
        # A call one level under its invocation; a served run (another agent's flow in
        # this trace) one level under the call it served, its calls under it...
        depth = row.depth or (1 if row.kind == "remote" else 0)
        indent = "  " * depth + ("└ " if row.kind == "remote" else "⤷ ") if depth else ""
        marks = glyphs(row)
        room = label_w - 3 - cell_len(marks)
        # Escaped: a stored name is never written raw (ESC, BEL... would act on the terminal).
        name = indent + printable(display_name(row.name))
        # Cut and padded by terminal cells, not characters: a CJK or emoji name takes
        # two cells a character, a combining accent none (the columns stay aligned).
        if cell_len(name) > room:
            # (A wide character cut in half leaves a padding space: the … goes there.)
            name = set_cell_size(name, max(1, room - 1)).rstrip(" ") + "…"
        name = set_cell_size(name, room)
        name_style = style_of("waterfall--name")
        if critical:
            name_style += Style(bold=True)
        segments = [
            Segment(mark, style_of("waterfall--critical")),
            Segment(name, name_style),
            Segment(f" {marks}" if marks else " ", status_style),
            Segment(" ", base),
        ]
        segments += self._bar(row, bar_w, status_style)
        end = row.end if row.end is not None else self._now
        dur = None if end is None or row.kind == "skip" else (end - row.start) * 1000.0
        segments.append(Segment(" " + f"{format_duration(dur):>{dur_w}}", status_style))
        if is_cursor:
            # Over each segment's own style (Strip.apply_style would go under it).
            cursor = style_of("waterfall--cursor")
            segments = [Segment(s.text, (s.style or base) + cursor) for s in segments]
        return Strip(segments).adjust_cell_length(width, base)

    def _bar(self, row: Row, bar_w: int, status_style: Style) -> list[Segment]:
        style_of = self.get_component_rich_style
        # One character and one style per cell, filled by slices, then merged into
        # runs of equal style (a per-cell Segment rebuild cost ~0.2 ms a row).
        chars = [" "] * bar_w
        styles = [self.base_style] * bar_w
        item = row.item
        end = row.end if row.end is not None else (self._now or self._span[1])
        start_col = self._col(row.start, bar_w)
        end_col = max(start_col, self._col(end, bar_w))

        def fill(c0: int, c1: int, ch: str, style: Style) -> None:  # cells c0 .. c1 - 1
            if c1 > c0:
                chars[c0:c1] = [ch] * (c1 - c0)
                styles[c0:c1] = [style] * (c1 - c0)

        if isinstance(item, InvocationView):
            if item.queued_ts is not None and item.queued_ts < item.start:
                fill(self._col(item.queued_ts, bar_w), start_col, "░",
                     style_of("waterfall--queue"))
            ok = style_of("waterfall--ok")
            fill(start_col, end_col + 1, "█", status_style)
            # Each failed attempt keeps its own colour: a retry reads as red, then green.
            attempts = item.attempts
            for n, attempt in enumerate(attempts, 1):
                a_end = attempt.end if attempt.end is not None else end
                a_style = (style_of(f"waterfall--{attempt.outcome}")
                           if attempt.outcome in _STATUS_CLASSES else ok)
                if item.status != "ok" and n == len(attempts):
                    a_style = status_style
                a0, a1 = self._col(attempt.start, bar_w), self._col(a_end, bar_w)
                fill(a0, max(a0, a1) + 1, "█", a_style)
                if attempt.attempt > 0:
                    chars[a0], styles[a0] = "▌", a_style
        elif row.kind == "skip":  # the node never ran: a mark where its message was dropped
            chars[start_col], styles[start_col] = STATUS_SYMBOL["skipped"], status_style
        else:
            remote = style_of("waterfall--remote") if row.status == "ok" else status_style
            fill(start_col, end_col + 1, "▬", remote)
        if row.end is None:
            chars[end_col], styles[end_col] = "▸", status_style
        out: list[Segment] = []
        run, prev = 0, styles[0]
        for c in range(1, bar_w):
            style = styles[c]
            if style is not prev and style != prev:
                out.append(Segment("".join(chars[run:c]), prev))
                run, prev = c, style
        out.append(Segment("".join(chars[run:]), prev))
        return out
