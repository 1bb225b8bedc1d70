"""InMemoryStateStore: the reference TraceStore, for tests and examples.

Everything lives in process memory; writes are synchronous appends (no I/O,
so no buffering is needed). It implements the whole query surface with the
same semantics the SQLite and Postgres stores must match.

The runtime hands it each event as its EventRecord (``save_event_fields``),
kept as it is: the StoredEvent (payload dict included) is built when the event is
first read, once. Building it on the flow's hot path put the chain N=5 benchmark
at ~5x its time without a store (measured).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from types import TracebackType

from .followers import Followers
from .state import (
    EventRecord,
    RemoteBinding,
    StoredEvent,
    StoreUnavailable,
    TraceFilter,
    TraceSummary,
    TraceSummaryBuilder,
    check_page,
    stored_from_fields,
)

__all__ = ["InMemoryStateStore"]


class InMemoryStateStore:
    """Keeps events, summaries and bindings in memory (a :class:`TraceStore`).

    Re-delivered events (same ``event_key``) are stored once.
    """

    def __init__(self) -> None:
        # Per trace id ("" for trace-less events): StoredEvents, and the runtime's
        # tuples until first read (see _events_of).
        self._events: dict[str, list[StoredEvent | EventRecord]] = {}
        # ``(flow_id, seq)`` of every event stored (an event_key, as a tuple).
        self._keys: set[tuple[str, int]] = set()
        self._summaries: dict[str, TraceSummaryBuilder] = {}
        self._bindings: list[RemoteBinding] = []
        self._followers = Followers()
        self._closed = False

    async def __aenter__(self) -> InMemoryStateStore:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUnavailable("InMemoryStateStore is closed; create a new one")

    async def save_event(self, event: StoredEvent) -> None:
        """Store one event (ignored if its ``event_key`` was stored before)."""
        self._check_open()
        flow_id = event.flow_id
        if flow_id is not None:
            key = (flow_id, event.seq)
            if key in self._keys:
                return
            self._keys.add(key)
        trace_id = event.trace_id
        if trace_id is not None:
            self._events.setdefault(trace_id, []).append(event)
            builder = self._summaries.get(trace_id)
            if builder is None:
                builder = self._summaries[trace_id] = TraceSummaryBuilder(trace_id)
            builder.add(event)
        else:
            self._events.setdefault("", []).append(event)
        if self._followers:
            self._followers.publish((event,))

    def save_event_fields(self, fields: EventRecord) -> None:
        """The runtime's fast path: store an :class:`EventRecord` (see the module docstring).

        Same semantics as :meth:`save_event` of its StoredEvent.
        """
        if self._closed:
            raise StoreUnavailable("InMemoryStateStore is closed; create a new one")
        flow_id = fields.flow_id
        if flow_id is not None:
            key = (flow_id, fields.seq)
            keys = self._keys
            if key in keys:
                return
            keys.add(key)
        trace_id = fields.trace_id
        events = self._events.get(trace_id if trace_id is not None else "")
        if events is None:
            events = self._events[trace_id if trace_id is not None else ""] = []
        # A plain tuple: the collector untracks those (never a named tuple), so a
        # store holding 100k events does not slow every full collection down.
        events.append(tuple(fields))  # type: ignore[arg-type]
        if trace_id is not None:
            builder = self._summaries.get(trace_id)
            if builder is None:
                builder = self._summaries[trace_id] = TraceSummaryBuilder(trace_id)
            builder.add_fields(fields.ts, fields.kind, fields.node_name, fields.attempt,
                               fields.flow_name)
        if self._followers:
            self._followers.publish((stored_from_fields(fields),))

    async def save_events(self, events: Sequence[StoredEvent]) -> None:
        """Store several events, in order."""
        for event in events:
            await self.save_event(event)

    async def load_history(self, trace_id: str) -> Sequence[StoredEvent]:
        """The events of ``trace_id`` in order of occurrence."""
        self._check_open()
        return self._events_of(trace_id, 0, None)

    def _events_of(self, trace_id: str, start: int, stop: int | None) -> list[StoredEvent]:
        # Tuples in the slice become StoredEvents, in place: built once, when read.
        events = self._events.get(trace_id)
        if not events:
            return []
        part: list[StoredEvent] = []
        for i, item in enumerate(events[start:stop], start):
            if type(item) is tuple:
                item = events[i] = stored_from_fields(item)
            part.append(item)  # type: ignore[arg-type]  # a StoredEvent by now
        return part

    async def load_history_page(self, trace_id: str, *, offset: int = 0,
                                limit: int) -> Sequence[StoredEvent]:
        """``load_history(trace_id)[offset:offset + limit]`` (see TraceStore).

        Raises:
            ValueError: ``limit < 1`` or ``offset < 0``.
        """
        check_page(offset, limit)
        self._check_open()
        return self._events_of(trace_id, offset, offset + limit)

    async def save_remote_binding(self, binding: RemoteBinding) -> None:
        """Store a binding (once)."""
        self._check_open()
        if binding not in self._bindings:
            self._bindings.append(binding)

    async def list_traces(self, filter: TraceFilter | None = None) -> list[TraceSummary]:
        """Summaries matching ``filter`` (default: the 50 newest)."""
        self._check_open()
        return (filter or TraceFilter()).apply(b.summary() for b in self._summaries.values())

    async def get_trace(self, trace_id: str) -> TraceSummary | None:
        """The summary of ``trace_id``, or None."""
        self._check_open()
        builder = self._summaries.get(trace_id)
        return builder.summary() if builder is not None else None

    async def resolve_trace_id(self, prefix: str) -> list[str]:
        """Trace ids starting with ``prefix`` (at most 10, sorted)."""
        self._check_open()
        return sorted(t for t in self._summaries if t.startswith(prefix))[:10]

    async def load_bindings(self, *, trace_id: str | None = None,
                            context_id: str | None = None,
                            task_id: str | None = None) -> list[RemoteBinding]:
        """Bindings matching every given id.

        Raises:
            ValueError: no id was given.
        """
        if trace_id is None and context_id is None and task_id is None:
            raise ValueError("load_bindings needs trace_id, context_id or task_id")
        self._check_open()
        return [b for b in self._bindings
                if (trace_id is None or b.trace_id == trace_id)
                and (context_id is None or b.context_id == context_id)
                and (task_id is None or b.task_id == task_id)]

    async def follow(self, trace_id: str | None = None) -> AsyncIterator[StoredEvent]:
        """Yield events stored from now on (of one trace, or all); ends on close()."""
        self._check_open()
        async for event in self._followers.iterate(trace_id):
            yield event

    async def flush(self) -> None:
        """Nothing is buffered: a no-op (part of the TraceStore contract)."""

    async def close(self) -> None:
        """Stop followers; later calls raise StoreUnavailable. Idempotent."""
        if not self._closed:
            self._closed = True
            self._followers.close()
