"""The replay bar (Dolphie-style): mode, speed, time and a scrubbable progress line.

The screen owns the replay state and calls :meth:`ReplayBar.show`; a click on
the bar posts :class:`~penguiflow_inspector.messages.ScrubTo`.
"""

from __future__ import annotations

from rich.text import Text
from textual.events import Click
from textual.widgets import Static

from ..messages import ScrubTo
from ..model import format_duration

__all__ = ["ReplayBar"]

_PREFIX = 44  # cells before the progress line; a click maps x - _PREFIX onto it


class ReplayBar(Static):
    """``▶ 1x +12.3ms/40.0ms ev 12/80 ━━━━━━──────``."""

    def show(self, *, replaying: bool, playing: bool, speed: float, t_ms: float,
             total_ms: float, event_no: int, event_count: int, live: bool) -> None:
        width = max(10, self.size.width - _PREFIX - 1) if self.size.width else 30
        if not replaying:
            state = "● live" if live else "■ full"
            self.update(Text(f"{state:<8} {event_count} events  "
                             "r: replay  space: play  ,/.: step  [/]: scrub",
                             style="dim"), layout=False)  # one line, always (see tcss)
            return
        icon = "▶" if playing else "‖"
        frac = 0.0 if total_ms <= 0 else max(0.0, min(1.0, t_ms / total_ms))
        done = int(frac * width)
        # (at most 8 + 20 + 1 + 13 cells: durations are up to 9 wide, "+131.0 ms/...")
        head = (f"{icon} {speed:g}x".ljust(8)
                + f"+{format_duration(t_ms)}/{format_duration(total_ms)}".ljust(20) + " "
                + f"ev {event_no}/{event_count}")[:_PREFIX - 1]
        text = Text(head.ljust(_PREFIX), style="bold")
        text.append("━" * done, style="bold cyan")
        text.append("─" * (width - done), style="dim")
        self.update(text, layout=False)

    def on_click(self, event: Click) -> None:
        width = max(10, self.size.width - _PREFIX - 1)
        if event.x >= _PREFIX:
            self.post_message(ScrubTo(min(1.0, (event.x - _PREFIX) / width)))
