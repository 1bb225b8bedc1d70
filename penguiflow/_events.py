"""The event pipeline: log, persist, then hand to middlewares.

Order per event (spec §10): 1. log on ``penguiflow.core`` at the kind's level
with ``to_payload()`` as ``extra``; 2. ``await state_store.save_event``; 3. await
each middleware in registration order. Steps 2 and 3 are observers: whatever
they raise is logged, counted in :attr:`EventPipeline.failures`, and the flow
goes on.

Cost: the runtime asks :meth:`EventPipeline.wants` before building an event,
so with no store, no middleware and the logger below the kind's level an
event costs one cached ``isEnabledFor`` call and nothing is allocated.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from .metrics import FlowEvent
from .state import StoredEvent

if TYPE_CHECKING:
    from .state import StateStore

__all__ = ["EVENT_LEVELS", "EventPipeline", "logger"]

logger = logging.getLogger("penguiflow.core")

#: Logging level of each event kind; kinds not listed log at INFO.
EVENT_LEVELS: dict[str, int] = {
    "node_start": logging.DEBUG,
    "node_success": logging.INFO,
    "node_error": logging.ERROR,
    "node_timeout": logging.WARNING,
    "node_retry": logging.INFO,
    "node_failed": logging.ERROR,
    "deadline_skip": logging.INFO,
    "trace_cancel_drop": logging.INFO,
    "node_trace_cancelled": logging.INFO,
    "node_cancelled": logging.DEBUG,
    "trace_cancel_start": logging.INFO,
    "trace_cancel_finish": logging.INFO,
}

# LogRecord attributes an ``extra`` key may not overwrite (logging raises KeyError).
_RESERVED = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys() | {"message", "asctime"}
)

EventSink = Callable[[FlowEvent], Awaitable[None]]


class EventPipeline:
    """Delivers FlowEvents to the logger, the state store and middlewares."""

    __slots__ = ("_store", "failures", "fast_store", "listening", "middlewares", "seq")

    def __init__(self, store: StateStore | None, middlewares: list[Any]) -> None:
        self._store = store
        #: The store's ``save_event_fields`` fast path, when it has one.
        self.fast_store: Callable[[tuple[Any, ...]], Awaitable[None] | None] | None = getattr(
            store, "save_event_fields", None)
        self.middlewares: list[Any] = middlewares
        self.failures: Counter[str] = Counter()
        self.seq = 0
        self.listening = store is not None or bool(middlewares)

    def set_store(self, store: StateStore) -> None:
        """Attach ``store`` (counters and the event sequence carry on)."""
        self._store = store
        self.fast_store = getattr(store, "save_event_fields", None)
        self.listening = True

    def add_middleware(self, mw: Any) -> None:
        """Append a middleware; it sees every later event."""
        self.middlewares.append(mw)
        self.listening = True

    def wants(self, level: int) -> bool:
        """Whether an event at ``level`` has any consumer (so is worth building)."""
        return self.listening or logger.isEnabledFor(level)

    def next_seq(self) -> int:
        """Return the next per-flow event sequence number."""
        self.seq += 1
        return self.seq

    async def deliver(self, event: FlowEvent, level: int, log: bool) -> None:
        """Run the three pipeline steps for ``event``; never raises (but on cancel).

        ``log`` is whether the logger is enabled for ``level`` (the caller knows).
        """
        if log:
            payload = event.to_payload()
            try:
                logger.log(level, event.event_type, extra=payload)
            except KeyError:
                # A user-supplied extra key collides with a LogRecord attribute:
                # log it under a prefixed name rather than lose the event.
                safe = {(f"pf_{k}" if k in _RESERVED else k): v for k, v in payload.items()}
                logger.log(level, event.event_type, extra=safe)
        if self.fast_store is not None:
            # The same path as unlogged events, so a store sees one path, in order.
            await self.store_fields((
                event.trace_id, event.ts, event.event_type, event.node_name, event.node_id,
                event.invocation_id, event.parent_invocation_ids, event.span_id,
                event.parent_span_id, event.seq, event.attempt, event.queued_ts,
                event.flow_name, event.flow_id, event.latency_ms, event.queue_depth_in,
                event.queue_depth_out, event.outgoing_edges, event.queue_maxsize,
                event.trace_inflight, event.trace_cancelled, event.trace_pending,
                event.extra or None,
            ))
        elif self._store is not None:
            await self.store(StoredEvent.from_flow_event(event))
        for mw in self.middlewares:
            try:
                await mw(event)
            except Exception as exc:
                self.failures["middleware_error"] += 1
                logger.exception(
                    "middleware_error",
                    extra={"event": event.event_type, "trace_id": event.trace_id,
                           "middleware": repr(mw), "error": repr(exc)},
                )

    async def store_fields(self, fields: tuple[Any, ...]) -> None:
        """Step 2 through the store's fast path; failures are logged and counted."""
        assert self.fast_store is not None
        try:
            waiter = self.fast_store(fields)
            if waiter is not None:
                await waiter
        except Exception as exc:
            self.store_failed(fields[2], fields[0], exc)

    def store_failed(self, kind: str, trace_id: Any, exc: Exception) -> None:
        """Log and count a store failure (called from an ``except`` block)."""
        self.failures["state_store_save_failed"] += 1
        logger.exception("state_store_save_failed",
                         extra={"event": kind, "trace_id": trace_id, "error": repr(exc)})

    async def store(self, stored: StoredEvent) -> None:
        """Step 2 alone: persist ``stored``; failures are logged and counted."""
        store = self._store
        if store is None:
            return
        try:
            await store.save_event(stored)
        except Exception as exc:
            self.store_failed(stored.kind, stored.trace_id, exc)
