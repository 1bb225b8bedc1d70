"""A trace's event log: one :class:`EventRow` per stored event, made when it is read.

A view of a 100k-event trace does not hold 100k rows: :class:`EventRows` is a
sequence over the stored events (and, for a part of the log, their positions)
that builds a row each time one is read. The screens read the few lines in
view, ``--json`` reads each row once; nothing keeps them. Why: rows built up
front were 100k long-lived objects (and as many ``extra`` dicts) that the
cyclic garbage collector traversed again and again while the trace was built
(~0.2 s of ``build_trace``'s ~0.45 s at 100k events), and a replay step
copied up to 100k references to cut the log at its time; a slice of
``EventRows`` is a ``range``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, overload

if TYPE_CHECKING:
    from penguiflow.state import StoredEvent

__all__ = ["BASE_KEYS", "EventRow", "EventRows", "event_row"]

#: The payload keys every event has (``FlowEvent.to_payload``); the rest is the kind's extra.
BASE_KEYS = frozenset({
    "ts", "event", "node_name", "node_id", "trace_id", "latency_ms", "q_depth_in",
    "q_depth_out", "q_depth_total", "outgoing", "queue_maxsize", "attempt", "trace_inflight",
    "trace_cancelled", "trace_pending",
})


@dataclass(slots=True)
class EventRow:
    """One stored event, flattened for the event log (and ``--json``)."""

    seq: int
    ts: float
    kind: str
    node_name: str | None
    invocation_id: str | None
    attempt: int
    latency_ms: float | None
    span_id: str | None
    extra: dict[str, Any] = field(default_factory=dict)
    """The payload's kind-specific items (exception, remote_* keys, ...), sorted by key."""


def event_row(ev: StoredEvent) -> EventRow:
    """The event log's row of one stored event."""
    payload = ev.payload
    latency = payload.get("latency_ms")
    # Set difference runs in C: ~3x faster than filtering every item.
    extra_keys = payload.keys() - BASE_KEYS
    return EventRow(ev.seq, ev.ts, ev.kind, ev.node_name, ev.invocation_id, ev.attempt,
                    latency if isinstance(latency, int | float) else None, ev.span_id,
                    {k: payload[k] for k in sorted(extra_keys)} if extra_keys else {})


class EventRows(Sequence[EventRow]):
    """The rows of ``events`` at ``positions`` (default: all), built on each read.

    Reading the same index twice builds two equal rows (treat them as
    read-only). A slice is another ``EventRows`` sharing the events, in O(1)
    for a contiguous part (``positions`` a ``range``).
    """

    __slots__ = ("_events", "_positions")

    def __init__(self, events: Sequence[StoredEvent],
                 positions: Sequence[int] | None = None) -> None:
        self._events = events
        self._positions: Sequence[int] = (range(len(events)) if positions is None
                                          else positions)

    def __len__(self) -> int:
        return len(self._positions)

    @overload
    def __getitem__(self, index: int) -> EventRow: ...

    @overload
    def __getitem__(self, index: slice) -> EventRows: ...

    def __getitem__(self, index: int | slice) -> EventRow | EventRows:
        if isinstance(index, slice):
            return EventRows(self._events, self._positions[index])
        return event_row(self._events[self._positions[index]])

    def stored(self) -> Iterator[StoredEvent]:
        """The stored events behind the rows, in order (flow ids, queued times)."""
        events = self._events
        for position in self._positions:
            yield events[position]

    def __iter__(self) -> Iterator[EventRow]:
        events = self._events
        for position in self._positions:
            yield event_row(events[position])

    def __eq__(self, other: object) -> bool:
        """Equal to any sequence of the same rows (a list of EventRow included)."""
        if not isinstance(other, Sequence) or isinstance(other, str | bytes):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]  # mutable rows: not hashable, like a list

    def __repr__(self) -> str:
        return f"<EventRows: {len(self)} events>"
