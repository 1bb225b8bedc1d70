"""ProcessedStore: what the durable stores share around their BatchProcessor.

A durable store is three parts: a :class:`~penguiflow_exporters.processor.BatchProcessor`
(the write path, written once), its backend's
:class:`~penguiflow_exporters.writer.EventWriter`, and the backend's queries. This
base wires the first two to the TraceStore surface (``save_event``, the runtime's
``save_event_fields`` and ``event_values_sink``, ``flush``, ``close``, ``follow``) so
each backend writes only its writer and its queries.

Read-only stores (``readonly=True``: ``pf inspect``, ``pf traces``, ``pf export``)
have no processor: every write raises :class:`~penguiflow.state.StoreUnavailable`
naming the option, and opening never creates or alters anything.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any

from penguiflow.followers import Followers
from penguiflow.state import EventRecord, StoredEvent, StoreUnavailable, stored_from_fields

from ._writer_proc import as_sent
from .processor import RELEASE_GRACE_S, BatchProcessor, OnFull
from .writer import EventWriter

__all__ = ["ProcessedStore"]


class ProcessedStore:
    """Base of the durable stores: a processor in front of ``_make_writer()``'s writer.

    Subclasses implement ``_make_writer``, ``_open`` (connect for reading; create or
    migrate the schema unless read-only), ``_close`` and the queries, and call
    ``super().__init__`` with the processor's options.
    """

    def __init__(self, *, readonly: bool = False, on_full: OnFull = "block",
                 max_batch: int = 2000, max_buffer: int = 100_000,
                 schedule_delay_s: float = 0.05, close_timeout_s: float = 5.0,
                 retries: int = 3, batch_size: int | None = None,
                 flush_interval_s: float | None = None) -> None:
        # batch_size / flush_interval_s: the names these options had before the
        # processor (kept so that existing code runs unchanged).
        if batch_size is not None:
            max_batch = batch_size
        if flush_interval_s is not None:
            schedule_delay_s = flush_interval_s
        if close_timeout_s <= 0:
            raise ValueError(f"close_timeout_s must be > 0; got {close_timeout_s!r}")
        self.readonly = readonly
        self.close_timeout_s = close_timeout_s
        self._followers = Followers()
        self._opened = False
        self._closed = False
        #: When close() should be done (set by close(); see _close_time_left).
        self._close_deadline: float | None = None
        self._processor: BatchProcessor | None = None
        if not readonly:
            self._processor = BatchProcessor(
                _LazyWriter(self), max_batch=max_batch, max_buffer=max_buffer,
                schedule_delay_s=schedule_delay_s, on_full=on_full, retries=retries,
                on_stored=self._publish, name=type(self).__name__)

    # -- what subclasses implement ----------------------------------------------------

    def _make_writer(self) -> EventWriter:
        raise NotImplementedError

    async def _open(self) -> None:
        raise NotImplementedError

    async def _close(self) -> None:
        raise NotImplementedError

    # -- lifecycle ----------------------------------------------------------------------

    async def open(self) -> None:
        """Connect (and, unless read-only, create or migrate the schema); idempotent."""
        if self._closed:
            raise StoreUnavailable(f"{self!r} is closed; create a new one")
        if not self._opened:
            await self._open()
            self._opened = True

    async def __aenter__(self) -> Any:
        await self.open()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    def _close_time_left(self, default: float) -> float:
        """What is left of ``close_timeout_s`` for :meth:`_close`'s releasing (a short
        grace at least); ``default`` outside close()."""
        deadline = self._close_deadline
        if deadline is None:
            return default
        return max(deadline - asyncio.get_running_loop().time(), RELEASE_GRACE_S)

    async def close(self) -> None:
        """Write what is buffered (within ``close_timeout_s``), then release everything.

        Idempotent. Events that could not be written in time are logged and counted
        (``failures["abandoned"]``, ``failures["events_lost"]``).
        """
        if self._closed:
            return
        self._close_deadline = asyncio.get_running_loop().time() + self.close_timeout_s
        try:
            if self._processor is not None:
                await self._processor.shutdown(self.close_timeout_s)
        finally:
            self._closed = True
            self._followers.close()
            if self._opened:
                await self._close()

    @property
    def failures(self) -> Counter[str]:
        """What went wrong on the write path (see BatchProcessor); empty when read-only."""
        return self._processor.failures if self._processor is not None else Counter()

    @property
    def on_full(self) -> str | None:
        """The full-buffer policy (``"block"`` or ``"drop"``); None when read-only."""
        return self._processor.on_full if self._processor is not None else None

    @property
    def pending_events(self) -> int:
        """Events saved and not yet written (``PenguiFlow.stop`` reports them on timeout)."""
        return self._processor.pending_events if self._processor is not None else 0

    # -- writes ---------------------------------------------------------------------------

    def _writable(self) -> BatchProcessor:
        if self._processor is None:
            raise StoreUnavailable(
                f"{self!r} was opened read-only (readonly=True); open it without "
                f"readonly to write")
        if self._closed:
            raise StoreUnavailable(f"{self!r} is closed; create a new one")
        return self._processor

    async def save_event(self, event: StoredEvent) -> None:
        """Buffer one event (no I/O); waits only while the buffer is full (``on_full``)."""
        waiter = self._writable().submit(event)
        if waiter is not None:
            await waiter

    def save_event_fields(self, fields: EventRecord) -> Awaitable[None] | None:
        """The runtime's fast path: buffer an EventRecord; an awaitable only when full.

        Buffered as a plain tuple: the collector untracks a plain tuple of atoms, never
        a named tuple, and with 100k events buffered its full collections cost the
        flow's process ~3.8 us per event (measured); the copy costs ~0.1.
        """
        processor = self._processor
        if processor is None:
            self._writable()
        assert processor is not None
        return processor.submit(tuple(fields))

    def event_values_sink(self) -> Callable[[tuple[Any, ...]], Awaitable[None] | None] | None:
        """The runtime's fastest path (optional, see ``penguiflow.state.TraceStore``): a
        callable taking an event as its EventRecord's values in a plain tuple, which
        it buffers as is (no copy); an awaitable only when full, as
        :meth:`save_event_fields`. None when read-only (the runtime then calls
        ``save_event_fields``, whose error says how to write). Raises
        ``StoreUnavailable`` once the store is closed.
        """
        return self._processor.submit if self._processor is not None else None

    async def save_events(self, events: Sequence[StoredEvent]) -> None:
        """Buffer several events, in order."""
        await self._writable().submit_many(events)

    async def flush(self) -> None:
        """Return once everything saved so far is written (or counted as lost).

        Raises:
            StoreUnavailable: the store is closed.
        """
        if self._closed:
            raise StoreUnavailable(f"{self!r} is closed; create a new one")
        if self._processor is not None:
            await self._processor.flush()

    # -- follow ---------------------------------------------------------------------------

    def _publish(self, items: Sequence[Any]) -> None:
        if self._followers:
            # A runtime event as its writer stores it (odd values of its extra made
            # plain): the same whether it reached the writer packed or not.
            self._followers.publish(
                stored_from_fields(as_sent(item)) if isinstance(item, tuple) else item  # type: ignore[arg-type]
                for item in items)

    async def follow(self, trace_id: str | None = None) -> AsyncGenerator[StoredEvent, None]:
        """Yield each event of ``trace_id`` (or of every trace) once this store wrote it.

        Only events written after the call; read ``load_history`` first for the
        past. Ends when the store is closed.
        """
        if self._closed:
            raise StoreUnavailable(f"{self!r} is closed; create a new one")
        async for event in self._followers.iterate(trace_id):
            yield event


class _LazyWriter:
    """The store's writer, built (and the store opened) on the first write.

    So a store that is only read never starts a writer (a process, a connection).
    """

    def __init__(self, store: ProcessedStore) -> None:
        self._store = store
        self._writer: EventWriter | None = None
        self._lock = asyncio.Lock()

    async def _built(self) -> EventWriter:
        if self._writer is None:
            async with self._lock:  # start() and the first write may both get here
                if self._writer is None:
                    await self._store.open()
                    self._writer = self._store._make_writer()
        return self._writer

    async def start(self, first: Any = None) -> None:
        """Open the store and start the writer's process (if it has one) now;
        ``first``: the first item saved (a hint of what will follow)."""
        start = getattr(await self._built(), "start", None)
        if start is not None:
            await start(first)

    async def write(self, items: Sequence[Any]) -> Any:
        return await (await self._built()).write(items)

    def packs(self) -> bool:
        """Whether :meth:`pack` would pack now: the writer is built and packs."""
        writer = self._writer
        if writer is None or getattr(writer, "pack", None) is None:
            return False
        packs = getattr(writer, "packs", None)
        return not callable(packs) or bool(packs())

    def pack(self, items: list[Any]) -> Any:
        """The writer's ``pack`` (None before the writer is built, or without one)."""
        pack = getattr(self._writer, "pack", None)
        return None if pack is None else pack(items)

    async def prepare(self, items: Sequence[Any]) -> Any:
        """The writer's ``prepare`` (None when it has none: ``write`` then)."""
        prepare = getattr(await self._built(), "prepare", None)
        return None if prepare is None else await prepare(items)

    async def write_prepared(self, items: Sequence[Any], prepared: Any) -> Any:
        return await (await self._built()).write_prepared(  # type: ignore[attr-defined]
            items, prepared)

    async def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            with contextlib.suppress(Exception):
                await writer.close()
