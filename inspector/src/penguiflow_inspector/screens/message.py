"""A plain message in place of a screen: unknown trace id, store down, ..."""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Static

from ..model import printable

__all__ = ["MessageScreen"]


class MessageScreen(ModalScreen[None]):
    """``title`` in bold red, ``detail`` below, and how to leave."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "dismiss", "Back"),
        Binding("q", "app.quit", "Quit"),
    ]
    DEFAULT_CSS = """
    MessageScreen { align: center middle; }
    MessageScreen > Vertical {
        width: 80%; max-width: 90; height: auto;
        border: heavy $error; background: $surface; padding: 1 2;
    }
    """

    def __init__(self, title: str, detail: str) -> None:
        super().__init__()
        self.title_text = title
        self.detail = detail

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(Text(printable(self.title_text), style="bold red"), id="message-title")
            yield Static(Text(printable(self.detail, multiline=True)), id="message-detail")
            yield Static(Text("q quit · Esc back", style="dim"))
