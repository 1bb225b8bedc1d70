"""The event log: the selection's stored events, one line each, virtualised.

Like the waterfall it draws only the visible lines (a whole 100k-event trace
is shown when nothing is selected).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from rich.segment import Segment
from textual.geometry import Size
from textual.scroll_view import ScrollView
from textual.strip import Strip

from penguiflow.state import EVENTS_LOST_KIND

from ..model import (
    EventRow,
    display_edge,
    display_name,
    format_duration,
    format_offset,
    printable,
)
from ..render import lost_line
from ._scroll import set_virtual_size

__all__ = ["EventLog", "format_event"]

_ERROR_KINDS = frozenset({"node_error", "node_failed", "remote_call_error", "remote_cancel_error"})
_WARN_KINDS = frozenset({"node_timeout", "deadline_skip", "node_retry", EVENTS_LOST_KIND})


def format_event(ev: EventRow, t0: float) -> str:
    """``+12.3ms  node_start  name #0  key=value ...`` for one event, every stored text
    escaped (:func:`~penguiflow_inspector.model.printable`); a store's lost-events marker
    reads ``+12.3ms  store lost 3 events of this trace: <reason>``.

    The offset is :func:`~penguiflow_inspector.model.format_offset`'s, without its
    space: one token in a dense column (the kind is the line's second word)."""
    offset = format_offset(ev.ts, t0).replace(" ", "")
    if ev.kind == EVENTS_LOST_KIND:
        return f"{offset:<9} {lost_line(ev)}"
    extra = " ".join(f"{printable(k)}={_value(k, v)}" for k, v in ev.extra.items())
    name = printable(display_name(ev.node_name or ""))
    latency = f" {format_duration(ev.latency_ms)}" if ev.latency_ms else ""
    return (f"{offset:<9} {printable(ev.kind):<19} {name}"
            f" #{ev.attempt}{latency}  {extra}")


def _value(key: str, value: object) -> str:
    if key == "edge" and isinstance(value, str):  # OpenSea->a reads emit->a
        value = display_edge(value)
    return printable(value)


class EventLog(ScrollView, can_focus=False):
    """A read-only list of events (scrolled with the mouse; the keys belong to the waterfall)."""

    COMPONENT_CLASSES: ClassVar[set[str]] = {"event-log--error", "event-log--warn",
                                             "event-log--text"}

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._events: Sequence[EventRow] = ()
        self._t0 = 0.0

    def show(self, events: Sequence[EventRow], t0: float) -> None:
        self._events = events
        self._t0 = t0
        set_virtual_size(self, Size(self.size.width, len(events)))
        if self.scroll_offset.y:
            self.scroll_to(y=0, animate=False, immediate=True)
        self.refresh()

    @property
    def lines(self) -> list[str]:
        """The log's text (for tests and plain dumps)."""
        return [format_event(ev, self._t0) for ev in self._events]

    def render_line(self, y: int) -> Strip:
        width = self.scrollable_content_region.width
        index = int(self.scroll_offset.y) + y
        if not 0 <= index < len(self._events):
            return Strip.blank(width, self.rich_style)
        ev = self._events[index]
        cls = ("event-log--error" if ev.kind in _ERROR_KINDS
               else "event-log--warn" if ev.kind in _WARN_KINDS else "event-log--text")
        style = self.get_component_rich_style(cls)
        text = format_event(ev, self._t0)
        return Strip([Segment(text, style)]).crop(0, width).adjust_cell_length(
            width, self.rich_style)
