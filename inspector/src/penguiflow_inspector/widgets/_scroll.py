"""Virtual-size updates for the Line API widgets that do not re-lay out the screen.

Assigning ``ScrollView.virtual_size`` (a ``Reactive(layout=True)``) asks Textual for
a layout of the whole screen: 20-40 ms at 120x40 with the trace screen's widgets on
the slow CI machine, paid on every replay step (a new row appears) and every
selection (the event log changes length). A ScrollView's own size does not depend
on its virtual size: a layout would only update its scrollbars
(``Widget._size_updated``), which is what :func:`set_virtual_size` does, directly.
When a scrollbar appears or disappears the content width changes, and that case
still takes the layout.
"""

from __future__ import annotations

from textual.geometry import Size
from textual.scroll_view import ScrollView
from textual.widget import Widget

__all__ = ["set_virtual_size"]


def set_virtual_size(view: ScrollView, size: Size) -> None:
    """Set ``view.virtual_size`` and refresh the view, re-laying out only if a scrollbar
    shows or hides."""
    if size == view.virtual_size:
        return
    scroll_update = getattr(view, "_scroll_update", None)
    if scroll_update is None or not view.is_mounted:  # another Textual: the plain way
        view.virtual_size = size
        return
    shown = (view.show_vertical_scrollbar, view.show_horizontal_scrollbar)
    view.set_reactive(Widget.virtual_size, size)
    scroll_update(size)  # scrollbar visibility and size, scroll offset clamped
    if (view.show_vertical_scrollbar, view.show_horizontal_scrollbar) != shown:
        view.refresh(layout=True)
    else:
        view.refresh()
