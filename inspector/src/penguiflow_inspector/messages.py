"""Messages between the inspector's workers, widgets and screens.

Store reads run in ``@work`` workers; they post these back to the screen that
asked, which is the only place widgets are updated (Textual's rule: touch the
DOM from the event loop's handlers, not from a worker's middle).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from textual.message import Message

if TYPE_CHECKING:
    from penguiflow.state import StoredEvent, TraceSummary

    from .model import TraceView
    from .widgets.rows import Row

__all__ = [
    "EventsArrived",
    "LoadFailed",
    "RowSelected",
    "ScrubTo",
    "SummaryLoaded",
    "TraceLoaded",
    "TracesLoaded",
]


class SummaryLoaded(Message):
    """The trace's summary (O(1) in every store): painted before the events load."""

    def __init__(self, summary: TraceSummary) -> None:
        super().__init__()
        self.summary = summary


class TraceLoaded(Message):
    """The trace's events, loaded and rebuilt into a view.

    ``partial``: the view holds only the first events of a trace of this many
    (a first screen); a full ``TraceLoaded`` follows. ``generation``: the screen's
    load generation it was made in (a reload starts a new one; older ones are stale).
    ``rebuilt``: made by a live rebuild from the screen's own list of events (``events``
    is that very list), not read from the store.
    """

    def __init__(self, view: TraceView, events: Sequence[StoredEvent], load_s: float,
                 partial: int = 0, *, generation: int = 0, rebuilt: bool = False) -> None:
        super().__init__()
        self.view = view
        self.events = events
        self.load_s = load_s
        self.partial = partial
        self.generation = generation
        self.rebuilt = rebuilt


class LoadFailed(Message):
    """A store read failed; ``exit_code`` is what the app exits with when opened on it."""

    def __init__(self, title: str, detail: str, exit_code: int) -> None:
        super().__init__()
        self.title = title
        self.detail = detail
        self.exit_code = exit_code


class EventsArrived(Message):
    """Live events from ``store.follow()`` (a batch)."""

    def __init__(self, events: Sequence[StoredEvent]) -> None:
        super().__init__()
        self.events = events


class TracesLoaded(Message):
    """The fleet view's summaries."""

    def __init__(self, summaries: Sequence[TraceSummary]) -> None:
        super().__init__()
        self.summaries = summaries


class RowSelected(Message):
    """The waterfall's cursor moved to ``row`` (None: nothing selected)."""

    def __init__(self, row: Row | None) -> None:
        super().__init__()
        self.row = row


class ScrubTo(Message):
    """The replay bar was clicked: jump to ``fraction`` (0..1) of the trace."""

    def __init__(self, fraction: float) -> None:
        super().__init__()
        self.fraction = fraction
