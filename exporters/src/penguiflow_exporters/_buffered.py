"""BufferedStore: the write path shared by the SQLite and Postgres stores.

Why a buffer: the runtime awaits ``save_event`` inline for every event (spec
§15.1), so a store that did I/O there would put the database on the flow's hot
path. Here ``save_event`` appends to an in-memory deque and returns; a
background task writes batches (``batch_size`` events, or whatever has
accumulated after ``flush_interval_s``). The runtime's fast path
(``save_event_fields``) appends its tuples to a short tail that joins the deque
every few hundred events, pickled into one chunk when the store feeds a writer
process (see _blocks.Sealed for why).

When the buffer is full (``max_buffer`` events waiting, e.g. the database is
down or slower than the flow), the ``on_full`` policy decides:

* ``"drop"`` (default): the new event is dropped, ``failures["dropped"]`` is
  incremented and a warning is logged (at most once per second). The flow is
  never slowed by its observer, the same choice OpenTelemetry's
  BatchSpanProcessor makes.
* ``"block"``: ``save_event`` waits until the writer has made room: nothing is
  lost, and a slow store slows the flow down.

A batch that fails to write is logged (``state_store_write_failed``), counted
in ``failures["write_failed"]`` and ``failures["events_lost"]``, and dropped;
the writer carries on with the next batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Sequence
from types import TracebackType
from typing import Any, Literal

from penguiflow.followers import Followers
from penguiflow.state import (
    RemoteBinding,
    StateStoreError,
    StoredEvent,
    StoreUnavailable,
    TraceFilter,
    TraceSummary,
    stored_from_fields,
)

from ._blocks import Sealed, expand

__all__ = ["BufferedStore"]

logger = logging.getLogger("penguiflow_exporters.store")

# Batches prepared ahead of the one being written, at most (memory: a batch each).
_AHEAD = 2

# The runtime's tuples gathered in the tail before it joins the buffer (sealed or
# not): 128-256 measured best for sealing (encoded while still in the CPU cache);
# 64 and 1,024 were ~3% and ~13% slower per hop.
_TAIL = 256


class BufferedStore:
    """Base class: buffering, background batch writes, flush/close, live follow.

    Subclasses implement ``_open``, ``_close``, ``_write`` (one batch, in order;
    must ignore events whose ``event_key`` is already stored) and the queries.
    """

    #: Set by a subclass whose ``_write`` takes EVENT_FIELDS tuples as they were buffered.
    _takes_fields = False

    def __init__(
        self,
        *,
        batch_size: int = 2000,
        max_buffer: int = 200_000,
        flush_interval_s: float = 0.05,
        on_full: Literal["drop", "block"] = "drop",
    ) -> None:
        if batch_size < 1 or max_buffer < batch_size:
            raise ValueError(
                f"need 1 <= batch_size <= max_buffer; got batch_size={batch_size}, "
                f"max_buffer={max_buffer}")
        if on_full not in ("drop", "block"):
            raise ValueError(f"on_full must be 'drop' or 'block'; got {on_full!r}")
        self.batch_size = batch_size
        self.max_buffer = max_buffer
        self.flush_interval_s = flush_interval_s
        self.on_full = on_full
        #: Counts of what went wrong: ``dropped``, ``write_failed``, ``events_lost``.
        self.failures: Counter[str] = Counter()
        # StoredEvents, EVENT_FIELDS tuples from the runtime's fast path (built into
        # StoredEvents by the writer: tuples of atoms are not GC-tracked, so a full
        # buffer does not slow every garbage collection down), or such tuples
        # already encoded (Sealed). ``_count``: the events they are.
        self._buffer: deque[StoredEvent | tuple[Any, ...] | Sealed] = deque()
        self._count = 0
        # The runtime's latest tuples, after everything in ``_buffer``: the fast path
        # appends here, and every ``_TAIL`` events the tail joins the buffer, sealed
        # when ``_sealing`` (a store feeding a writer process sets it, see Sealed).
        self._tail: list[tuple[Any, ...]] = []
        self._sealing = False
        self._sealed = 0  # Sealed items in ``_buffer``
        self._wake: asyncio.Event | None = None
        self._room: asyncio.Event | None = None
        self._writer: asyncio.Task[None] | None = None
        # Held while a batch is taken from the buffer and prepared; each batch's
        # write waits for the previous one (see _write_some): batches stay in order,
        # and flush() and close() wait for the batches in flight.
        self._take_lock = asyncio.Lock()
        self._last_commit: asyncio.Task[None] | None = None
        self._commits: set[asyncio.Task[None]] = set()
        self._opened = False
        self._closed = False
        self._last_drop_warning = 0.0
        self._followers = Followers()
        # save_event_fields appends to the tail without further checks while it
        # holds fewer events (see _reset_headroom); 0 before the writer runs and
        # once closed, so that the first event starts it and a closed store raises.
        self._headroom = 0

    # -- lifecycle --------------------------------------------------------------

    async def open(self) -> None:
        """Connect / create the schema; idempotent. ``save_event`` opens lazily too."""
        if self._closed:
            raise StoreUnavailable(f"{type(self).__name__} is closed; create a new one")
        if not self._opened:
            await self._open()
            self._opened = True

    async def __aenter__(self) -> BufferedStore:
        await self.open()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        """Flush what is buffered, stop the writer, release resources; idempotent."""
        if self._closed:
            return
        if self._buffer or self._tail or self._opened:
            # Also for a store never opened: its first batch opens it.
            with contextlib.suppress(StateStoreError):
                await self.flush()
        self._closed = True
        self._headroom = 0
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
            self._writer = None
        self._followers.close()
        if self._opened:
            await self._close()

    # -- write path ---------------------------------------------------------------

    def _ensure_writer(self) -> None:
        if self._writer is None or self._writer.done():
            self._wake = asyncio.Event()
            self._room = asyncio.Event()
            self._writer = asyncio.get_running_loop().create_task(
                self._run_writer(), name=f"{type(self).__name__}-writer")
            self._reset_headroom()

    def _reset_headroom(self) -> None:
        # The tail may grow to _TAIL events (at most a batch) as long as buffer and
        # tail stay within max_buffer; the event that finds it full takes the slow
        # path (_buffer_item), which moves the tail into the buffer.
        if self._writer is None or self._closed:
            self._headroom = 0
        else:
            self._headroom = max(0, min(_TAIL, self.batch_size,
                                        self.max_buffer - self._count))

    def _move_tail(self) -> None:
        """Append the tail to the buffer: one Sealed when sealing, else its tuples."""
        tail = self._tail
        if not tail:
            return
        if self._sealing:  # encode_block never raises: odd values are written as text
            self._buffer.append(Sealed(tail))
            self._sealed += 1
        else:
            self._buffer.extend(tail)
        self._count += len(tail)
        tail.clear()  # sealed: the tuples are freed now, their memory reused

    async def save_event(self, event: StoredEvent) -> None:
        """Buffer one event (never does I/O); see the module docstring for a full buffer."""
        waiter = self._buffer_item(event)
        if waiter is not None:
            await waiter

    def save_event_fields(self, fields: tuple[Any, ...]) -> Awaitable[None] | None:
        """The runtime's fast path: buffer an EVENT_FIELDS tuple, no I/O, no await.

        Returns an awaitable only when the buffer is full under ``on_full="block"``.
        """
        tail = self._tail
        # One comparison in the common case (twice per hop of every flow): below
        # the headroom the store is open, its writer runs and there is room.
        if len(tail) < self._headroom:
            tail.append(fields)
            return None
        return self._buffer_item(fields)

    def _buffer_item(self, item: StoredEvent | tuple[Any, ...]) -> Awaitable[None] | None:
        # Synchronous on purpose: the common case costs no coroutine. Returns an
        # awaitable only when a full buffer must be waited on (on_full="block").
        if self._closed:
            raise StoreUnavailable(f"{type(self).__name__} is closed; create a new one")
        if self._writer is None:
            self._ensure_writer()
        self._move_tail()
        if self._count >= self.max_buffer:
            if self.on_full == "drop":
                self._dropped(1)
                return None
            return self._append_when_room(item)
        self._append(item)
        return None

    def _append(self, item: StoredEvent | tuple[Any, ...]) -> None:
        # Behind whatever is buffered (the tail is empty: _buffer_item moved it).
        if isinstance(item, tuple):
            self._tail.append(item)
        else:
            self._buffer.append(item)
            self._count += 1
        if self._count + len(self._tail) >= self.batch_size:
            assert self._wake is not None
            self._wake.set()
        self._reset_headroom()

    async def _append_when_room(self, item: StoredEvent | tuple[Any, ...]) -> None:
        while self._count >= self.max_buffer:
            assert self._room is not None and self._wake is not None
            self._room.clear()
            self._wake.set()
            await self._room.wait()
        self._move_tail()  # tuples that came meanwhile go first
        self._append(item)

    async def save_events(self, events: Sequence[StoredEvent]) -> None:
        """Buffer several events, in order (the full-buffer policy applies to each)."""
        if self._closed:
            raise StoreUnavailable(f"{type(self).__name__} is closed; create a new one")
        if self._count + len(self._tail) + len(events) <= self.max_buffer:
            # All fit: one C-level extend instead of an await per event (an import
            # of 100k events spent ~0.5 s in save_event calls, measured).
            if self._writer is None:
                self._ensure_writer()
            self._move_tail()
            self._buffer.extend(events)
            self._count += len(events)
            if self._count >= self.batch_size:
                assert self._wake is not None
                self._wake.set()
            self._reset_headroom()
            return
        for event in events:
            await self.save_event(event)

    def _dropped(self, count: int) -> None:
        self.failures["dropped"] += count
        now = time.monotonic()
        if now - self._last_drop_warning >= 1.0:
            self._last_drop_warning = now
            logger.warning("state_store_buffer_full", extra={
                "store": type(self).__name__, "dropped_total": self.failures["dropped"],
                "max_buffer": self.max_buffer})

    async def _run_writer(self) -> None:
        assert self._wake is not None and self._room is not None
        while True:
            if not (self._buffer or self._tail):
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.flush_interval_s)
                continue
            if self._count + len(self._tail) < self.batch_size:
                # Let a batch accumulate, unless a flush is asking for it now.
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.flush_interval_s)
            await self._write_some()

    async def _write_some(self) -> None:
        """Take a batch, prepare it and start writing it; return once the write started.

        Two stages, each in batch order: ``_prepare`` (encoding, off the database)
        under ``_take_lock``, then ``_write``, in a task of its own that first waits
        for the previous batch's write. So the next batch is prepared while this
        one is written, and up to ``_AHEAD`` batches are prepared ahead: a store
        whose writes wait on another process (SQLite's writer, a Postgres server)
        keeps both busy (~1.5x the events/s of preparing and writing in turn,
        measured).
        """
        async with self._take_lock:
            while len(self._commits) >= _AHEAD:
                await asyncio.wait(list(self._commits), return_when=asyncio.FIRST_COMPLETED)
            taken = self._take()
            if self._room is not None:
                self._room.set()
            if not taken:
                return
            batch: list[Any]
            if self._takes_fields:
                batch = taken  # the subclass converts the tuples itself
            else:
                batch = [stored_from_fields(item) if isinstance(item, tuple) else item
                         for item in expand(taken)]
            try:
                if not self._opened:
                    await self.open()
                prepared = await self._prepare(batch)
            except Exception as exc:
                self._failed(batch, exc)
                return
            task = asyncio.get_running_loop().create_task(
                self._commit(batch, prepared, self._last_commit))
            self._last_commit = task
            self._commits.add(task)
            task.add_done_callback(self._commits.discard)
        # Let the write start (e.g. hand the batch to a thread) before the caller
        # prepares the next batch, which holds the loop for a while.
        await asyncio.sleep(0)

    def _take(self) -> list[Any]:
        """Take the next batch: ``batch_size`` events from the buffer, the tail joining
        it when it falls short (a Sealed is taken whole: the batch may be a little
        larger)."""
        buffer, limit = self._buffer, self.batch_size
        if self._count < limit:
            self._move_tail()
        taken: list[Any]
        if self._count <= limit:  # all of it: one C-level copy
            taken = list(buffer)
            buffer.clear()
            self._count = self._sealed = 0
        elif not self._sealed:  # an event per item (an import, say)
            popleft = buffer.popleft
            taken = [popleft() for _ in range(limit)]
            self._count -= limit
        else:
            taken, count, popleft = [], 0, buffer.popleft
            while count < limit:
                item = popleft()
                taken.append(item)
                if type(item) is Sealed:
                    count += item.n
                    self._sealed -= 1
                else:
                    count += 1
            self._count -= count
        self._reset_headroom()
        return taken

    async def _commit(self, batch: list[Any], prepared: Any,
                      previous: asyncio.Task[None] | None) -> None:
        """Write a prepared batch once the previous one is written (never raises)."""
        if previous is not None:
            await asyncio.wait([previous])
        try:
            written = await self._write(prepared)
        except Exception as exc:
            self._failed(batch, exc)
            return
        if self._followers:
            self._notify(written)

    def _failed(self, batch: list[Any], exc: Exception) -> None:
        self.failures["write_failed"] += 1
        self.failures["events_lost"] += len(batch)
        logger.error("state_store_write_failed", exc_info=exc, extra={
            "store": type(self).__name__, "events": len(batch), "error": repr(exc)})

    async def flush(self) -> None:
        """Write everything buffered so far (and wait for batches in flight).

        A no-op on a closed store: ``close()`` already flushed it.
        """
        if self._closed:
            return
        # Written from here rather than by waking the writer: a flush must not wait
        # for the writer's batching delay.
        while self._buffer or self._tail:
            await self._write_some()
        # Then every batch taken so far (by us or the writer) is written: one being
        # prepared holds the take lock until its write is queued, and each write
        # waits for the one before.
        async with self._take_lock:
            last = self._last_commit
        if last is not None:
            await asyncio.wait([last])

    # -- follow ---------------------------------------------------------------------

    def _notify(self, written: Sequence[StoredEvent | tuple[Any, ...]]) -> None:
        self._followers.publish(stored_from_fields(item) if isinstance(item, tuple) else item
                                for item in expand(list(written)))

    async def follow(self, trace_id: str | None = None) -> AsyncIterator[StoredEvent]:
        """Yield each event of ``trace_id`` (or of every trace) once it is stored.

        Only events stored after the call are yielded; read ``load_history``
        first for the past. Ends when the store is closed.
        """
        if self._closed:
            raise StoreUnavailable(f"{type(self).__name__} is closed; create a new one")
        async for event in self._followers.iterate(trace_id):
            yield event

    # -- subclass hooks -------------------------------------------------------------

    async def _open(self) -> None:
        raise NotImplementedError

    async def _close(self) -> None:
        raise NotImplementedError

    async def _prepare(self, batch: list[Any]) -> Any:
        """What ``_write`` takes for ``batch`` (default: the batch itself).

        Runs in batch order, overlapping the previous batch's ``_write``: a store
        encodes here what does not depend on what is stored. Raising loses the
        batch (logged and counted, like a failed write).
        """
        return batch

    async def _write(self, batch: Any
                     ) -> Sequence[StoredEvent | tuple[Any, ...]]:
        """Write ``batch`` (what ``_prepare`` returned); return the events actually
        stored (new ``event_key``s).

        With ``_takes_fields`` set, ``batch`` also holds the runtime's EVENT_FIELDS
        tuples as buffered (the subclass converts them, e.g. off the event loop), and
        the events returned may be such tuples too.
        """
        raise NotImplementedError

    async def load_history(self, trace_id: str) -> Sequence[StoredEvent]:
        raise NotImplementedError

    async def load_history_page(self, trace_id: str, *, offset: int = 0,
                                limit: int) -> Sequence[StoredEvent]:
        raise NotImplementedError

    async def save_remote_binding(self, binding: RemoteBinding) -> None:
        raise NotImplementedError

    async def list_traces(self, filter: TraceFilter | None = None) -> list[TraceSummary]:
        raise NotImplementedError

    async def get_trace(self, trace_id: str) -> TraceSummary | None:
        raise NotImplementedError

    async def resolve_trace_id(self, prefix: str) -> list[str]:
        raise NotImplementedError

    async def load_bindings(self, *, trace_id: str | None = None,
                            context_id: str | None = None,
                            task_id: str | None = None) -> list[RemoteBinding]:
        raise NotImplementedError

    def _extra(self) -> dict[str, Any]:
        return {"store": type(self).__name__}
