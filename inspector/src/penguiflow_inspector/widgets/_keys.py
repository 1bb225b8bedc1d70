"""The waterfall's movement keys on the other tabs' widgets, so ``j``/``k`` (and
``g``/``G``) move in every tab as ``?`` says: the Remote tab's call table, the
trace list, and the scrolled Cancel & deadline and detail panes."""

from __future__ import annotations

from typing import Any, ClassVar

from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.widgets import DataTable

__all__ = ["KeyedScroll", "KeyedTable"]


class KeyedTable(DataTable[Any]):
    """A row-cursor DataTable that also moves with ``j``/``k``, ``g``/``G``."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("j", "cursor_down", "Down", show=False),
        Binding("k", "cursor_up", "Up", show=False),
        Binding("g", "scroll_top", "Top", show=False),
        Binding("G", "scroll_bottom", "Bottom", show=False),
    ]


class KeyedScroll(VerticalScroll):
    """A VerticalScroll that also scrolls with ``j``/``k``, ``g``/``G``."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("j", "scroll_down", "Down", show=False),
        Binding("k", "scroll_up", "Up", show=False),
        Binding("g", "scroll_home", "Top", show=False),
        Binding("G", "scroll_end", "Bottom", show=False),
    ]
