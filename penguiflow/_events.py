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

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from .errors import safe_repr
from .metrics import FlowEvent
from .state import EventRecord, StoredEvent

if TYPE_CHECKING:
    from ._tracer import LiveTracer
    from .state import StateStore

__all__ = ["EVENT_LEVELS", "EventPipeline", "cancelling", "logger"]

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
    "node_abandoned": logging.WARNING,
    "node_cancelled": logging.DEBUG,
    "trace_cancel_start": logging.INFO,
    "trace_cancel_finish": logging.INFO,
}

# LogRecord attributes an ``extra`` key may not overwrite (logging raises KeyError).
_RESERVED = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys() | {"message", "asctime"}
)

EventSink = Callable[[FlowEvent], Awaitable[None]]


def cancelling() -> bool:
    """Whether the current task is being cancelled: a ``CancelledError`` is then its
    own and must propagate; otherwise an observer raised it, and it is the
    observer's failure (outside a task there is nothing to keep alive)."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


def fast_path_of(store: Any) -> Callable[[EventRecord], Awaitable[None] | None] | None:
    """``store.save_event_fields`` when the runtime may use it instead of ``save_event``.

    Not when a subclass overrides ``save_event`` below the class that defines
    ``save_event_fields`` (say, a user's ``InMemoryStateStore`` subclass that logs
    each event): the spec's ``save_event`` is then what must be called.
    """
    fast = getattr(store, "save_event_fields", None)
    if fast is None:
        return None
    cls = type(store)
    owner = next((c for c in cls.__mro__ if "save_event_fields" in c.__dict__), None)
    if owner is not None and getattr(cls, "save_event", None) is not getattr(
            owner, "save_event", None):
        return None
    return fast  # type: ignore[no-any-return]


ValuesSink = Callable[[tuple[Any, ...]], Awaitable[None] | None]


def _owner(cls: type, name: str) -> type | None:
    return next((c for c in cls.__mro__ if name in c.__dict__), None)


def values_path_of(store: Any) -> ValuesSink | None:
    """``store.event_values_sink()`` when the runtime may hand it plain tuples.

    The fastest store path: the runtime hands the event's values (an EventRecord's
    23 fields, in order, as a plain tuple) to the callable the store returned once,
    so neither side builds or copies a named tuple (~0.1 us each, twice per hop).
    Only when the runtime would use the store's ``save_event_fields`` anyway
    (:func:`fast_path_of`) and the class that defines ``event_values_sink`` is the
    one that defines ``save_event_fields`` or a subclass of it: a subclass that
    overrides ``save_event_fields`` alone (to log each event, say) gets every event
    through its override, and so does a store whose ``save_event_fields`` was set
    on the instance (a wrapper or a test's spy). A store whose
    ``event_values_sink()`` returns None or raises (logged) gets
    ``save_event_fields``.
    """
    factory = getattr(store, "event_values_sink", None)
    if factory is None or fast_path_of(store) is None:
        return None
    if "save_event_fields" in getattr(store, "__dict__", ()):
        return None
    cls = type(store)
    fields_owner = _owner(cls, "save_event_fields")
    values_owner = _owner(cls, "event_values_sink")
    if fields_owner is None or values_owner is None or not issubclass(values_owner,
                                                                      fields_owner):
        return None
    try:
        sink = factory()
    except Exception as exc:
        logger.warning("state_store_values_sink_failed", extra={
            "store": safe_repr(store), "error": safe_repr(exc),
            "fallback": "save_event_fields"})
        return None
    return sink if callable(sink) else None


class EventPipeline:
    """Delivers FlowEvents to the logger, the state store and middlewares."""

    __slots__ = ("_store", "direct", "failures", "fast_store", "fast_values", "listening",
                 "middlewares", "seq", "sole_store", "sole_values", "tracer")

    def __init__(self, store: StateStore | None, middlewares: list[Any]) -> None:
        self._store = store
        #: The store's ``save_event_fields`` fast path, when it has one.
        self.fast_store: Callable[[EventRecord], Awaitable[None] | None] | None = (
            fast_path_of(store))
        #: The store's plain-tuple sink (:func:`values_path_of`), when it has one.
        self.fast_values: ValuesSink | None = values_path_of(store)
        self.middlewares: list[Any] = middlewares
        self.failures: Counter[str] = Counter()
        self.seq = 0
        #: The live OTel tracer, when an SDK is configured (see penguiflow._tracer).
        self.tracer: LiveTracer | None = None
        self.listening = False
        #: True when every consumer takes EVENT_FIELDS tuples (a fast-path store,
        #: the tracer) and no middleware listens: events need no FlowEvent.
        self.direct = False
        #: ``fast_store`` when the store is the only tuple consumer (no tracer):
        #: the runtime may then hand tuples straight to it.
        self.sole_store: Callable[[EventRecord], Awaitable[None] | None] | None = None
        #: ``fast_values`` under the same condition as ``sole_store``.
        self.sole_values: ValuesSink | None = None
        self._update()

    def _update(self) -> None:
        store_ok = self._store is None or self.fast_store is not None
        self.listening = (self._store is not None or bool(self.middlewares)
                          or self.tracer is not None)
        self.direct = self.listening and store_ok and not self.middlewares
        self.sole_store = self.fast_store if self.tracer is None else None
        self.sole_values = self.fast_values if self.tracer is None else None

    @property
    def state_store(self) -> StateStore | None:
        """The flow's state store, if any."""
        return self._store

    def set_store(self, store: StateStore) -> None:
        """Attach ``store`` (counters and the event sequence carry on)."""
        self._store = store
        self.fast_store = fast_path_of(store)
        self.fast_values = values_path_of(store)
        self._update()

    def set_tracer(self, tracer: LiveTracer | None) -> None:
        """Attach (or detach, with None) the live OTel tracer."""
        self.tracer = tracer
        self._update()

    def add_middleware(self, mw: Any) -> None:
        """Append a middleware; it sees every later event."""
        self.middlewares.append(mw)
        self._update()

    def wants(self, level: int) -> bool:
        """Whether an event at ``level`` has any consumer (so is worth building)."""
        return self.listening or logger.isEnabledFor(level)

    def next_seq(self) -> int:
        """Return the next per-flow event sequence number."""
        self.seq += 1
        return self.seq

    async def deliver(self, event: FlowEvent, fields: EventRecord, level: int,
                      log: bool) -> None:
        """Run the three pipeline steps for ``event``; never raises (but on cancel).

        ``fields`` is the event's EVENT_FIELDS tuple (what tuple consumers take);
        ``log`` is whether the logger is enabled for ``level`` (the caller knows).
        """
        if log:
            payload = event.to_payload()
            try:
                try:
                    logger.log(level, event.event_type, extra=payload)
                except KeyError:
                    # A user-supplied extra key collides with a LogRecord attribute:
                    # log it under a prefixed name rather than lose the event.
                    safe = {(f"pf_{k}" if k in _RESERVED else k): v
                            for k, v in payload.items()}
                    logger.log(level, event.event_type, extra=safe)
            except Exception:
                # Logging is an observer too (a filter or handler set-up that raises
                # on some value): counted, never the worker's death.
                self.failures["logging_failed"] += 1
        if self.fast_store is not None or self.tracer is not None:
            # The same path as unlogged events, so a store sees one path, in order.
            await self.store_fields(fields)
        if self.fast_store is None and self._store is not None:
            await self.store(StoredEvent.from_flow_event(event))
        for mw in self.middlewares:
            try:
                await mw(event)
            except asyncio.CancelledError as exc:
                if cancelling():
                    raise
                # Not this task's cancel (the middleware awaited something another
                # task cancelled): re-raising it ended the worker for good.
                self.failures["middleware_error"] += 1
                logger.error("middleware_error", extra={
                    "event": event.event_type, "trace_id": event.trace_id,
                    "middleware": safe_repr(mw),
                    "error": f"{safe_repr(exc)} (raised by the middleware, not a cancel "
                             "of the flow)"})
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:  # a library's own BaseException too: an observer
                self.failures["middleware_error"] += 1
                logger.exception(
                    "middleware_error",
                    extra={"event": event.event_type, "trace_id": event.trace_id,
                           "middleware": safe_repr(mw), "error": safe_repr(exc)},
                )

    async def store_fields(self, fields: EventRecord) -> None:
        """Step 2 through the tuple consumers; failures are logged and counted."""
        waiter = self.take_fields(fields)
        if waiter is not None:
            await self.wait_store(waiter, fields.kind, fields.trace_id)

    async def wait_store(self, waiter: Awaitable[None], kind: str, trace_id: Any) -> None:
        """Await a store's waiter (its buffer was full); a ``CancelledError`` that is
        not this task's own cancel (the store cancelled its waiter, say while
        closing) is a store failure, logged and counted, not the end of the caller."""
        try:
            await waiter
        except asyncio.CancelledError as exc:
            if cancelling():
                raise
            self.store_failed(kind, trace_id, RuntimeError(
                f"the store's wait for buffer room was cancelled by the store ({safe_repr(exc)})"))

    def take_fields(self, fields: EventRecord) -> Awaitable[None] | None:
        """Hand ``fields`` to the fast-path store and the tracer, synchronously.

        Returns the store's waiter when its buffer is full under
        ``on_full="block"``. Never raises: failures are logged and counted.
        """
        waiter = None
        sink = self.fast_store
        if sink is not None:
            try:
                waiter = sink(fields)
            except Exception as exc:
                self.store_failed(fields.kind, fields.trace_id, exc)
        tracer = self.tracer
        if tracer is not None:
            try:
                refused = tracer.on_fields(fields)
                if refused:  # spans the SDK refused (logged by the tracer)
                    self.failures["tracer_failed"] += refused
            except Exception as exc:
                self.failures["tracer_failed"] += 1
                logger.exception("tracer_failed", extra={
                    "event": fields.kind, "trace_id": fields.trace_id, "error": safe_repr(exc)})
        return waiter

    def store_failed(self, kind: str, trace_id: Any, exc: Exception) -> None:
        """Log and count a store failure (called from an ``except`` block)."""
        self.failures["state_store_save_failed"] += 1
        logger.exception("state_store_save_failed",
                         extra={"event": kind, "trace_id": trace_id, "error": safe_repr(exc)})

    async def store(self, stored: StoredEvent) -> None:
        """Step 2 alone: persist ``stored``; failures are logged and counted."""
        store = self._store
        if store is None:
            return
        try:
            await store.save_event(stored)
        except asyncio.CancelledError as exc:
            if cancelling():
                raise
            self.store_failed(stored.kind, stored.trace_id, RuntimeError(
                f"save_event raised {safe_repr(exc)}, not a cancel of the flow"))
        except Exception as exc:
            self.store_failed(stored.kind, stored.trace_id, exc)
