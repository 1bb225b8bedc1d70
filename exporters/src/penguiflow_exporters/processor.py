"""BatchProcessor: the one buffering write path of the durable stores (public).

The runtime hands a store every event on the flow's hot path (twice per hop), so
a store must not do I/O there. The processor buffers each event in memory and a
background task hands batches to an :class:`~penguiflow_exporters.writer.EventWriter`
(``max_batch`` events, or whatever has accumulated after ``schedule_delay_s``).

Full buffer (``max_buffer`` events waiting: the database is down or slower than
the flow), by ``on_full``:

* ``"block"`` (default): the producer waits, in order, until the writer has made
  room. Nothing is lost; a slow database slows the flow down.
* ``"drop"``: the new event is dropped, counted and logged (at most once a
  second). The flow is never slowed by its observer; OpenTelemetry's
  ``BatchSpanProcessor`` makes this choice.

A trace that lost events (dropped, refused, or in a batch that could not be
written) gets a marker event of kind ``store_events_lost`` (payload
``{"events_lost": n, "reason": ...}``) with the next batch, so the store's
summary and ``pf inspect`` show the trace as incomplete, with the count, instead
of a status the missing events would have changed.

Failures (see the writer contract): a batch whose write raises
:class:`~penguiflow.state.StoreUnavailable` is retried ``retries`` times with
back-off, then lost; one that raises anything else is split in halves, each
written on its own, down to the single events the backend refuses. Every event
not stored is counted exactly once in ``failures["events_lost"]``, and once under
its cause: ``dropped``, ``rejected``, ``write_failed_events`` or ``abandoned``
(still buffered or being written when ``shutdown`` gave up or the event loop
ended). ``failures`` also counts ``retried``
writes and ``write_failed`` batches.

Shutdown is bounded: ``shutdown(timeout)`` writes what it can within the time and
reports (logs, counts, returns) how many events it could not store, the batch being
written when the time ran out included. Events submitted while its flush runs are
written too; from then on ``submit`` raises. An event loop that ends with the
processor never shut down cancels the write in flight: its events, and those
buffered, are counted ``abandoned``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Generator, Sequence
from typing import Any, Literal

from penguiflow.state import StateStoreError, StoredEvent, StoreUnavailable

from ._folds import LOST_KIND
from ._packs import Pack, PackedBatch
from ._records import MAX_TRACE_ID, _text_problem
from .writer import EventWriter, WriteResult

__all__ = ["RELEASE_GRACE_S", "BatchProcessor", "OnFull", "StoreRefused"]

logger = logging.getLogger("penguiflow_exporters.store")

OnFull = Literal["block", "drop"]

#: The least time a closing step is given to release a connection or process (its
#: writer's close, a store's pool) once the close deadline has passed.
RELEASE_GRACE_S = 0.1

# Runtime events per pack at most (see ``_packs``): well under the collector's young
# threshold (700 allocations), so that the tuples are freed before a young pass.
_PACK_MAX = 256
# No packing for smaller batches: a pickler per few events costs more than it saves.
_PACK_MIN = 64

# Traces whose lost events are tracked for markers, at most (a flood of drops across
# a million traces must not grow memory without bound; past it only totals count).
_MAX_LOST_TRACES = 10_000


class StoreRefused(StateStoreError):
    """The store as a whole refuses every write (a file that is not a penguiflow
    database, a schema newer than this version): no event of any batch is at fault,
    so a writer raises this and the processor does not split the batch."""


class _Marker(StoredEvent):
    """A ``store_events_lost`` marker. Synthetic: never counted in ``failures`` (a
    marker lost is ``markers_lost``, not ``events_lost``); once stored it is an event
    of its trace like any other (``load_history`` returns it, ``event_count`` counts it)."""

    __slots__ = ()


class _OneTurn:
    """An awaitable that gives the event loop one turn (``asyncio.sleep(0)``'s bare
    yield); an object, not a coroutine, so that it is shared and never "never
    awaited"."""

    __slots__ = ()

    def __await__(self) -> Generator[None, None, None]:
        yield


_ONE_TURN = _OneTurn()


class BatchProcessor:
    """Buffers events and writes them in batches through one writer.

    Args:
        writer: the backend (see :mod:`penguiflow_exporters.writer`).
        max_batch: most events handed to one ``write``.
        max_buffer: most events buffered (written or not yet) before ``on_full``.
        schedule_delay_s: how long a partial batch waits for more events.
        on_full: ``"block"`` (default) or ``"drop"``; see the module docstring.
        retries: attempts after a ``StoreUnavailable`` before a batch is lost.
        retry_delay_s: the first back-off; doubled per attempt.
        on_stored: called with the items of each write actually stored (for
            ``follow()``); what it raises is logged and ignored.
        name: the store's name in log lines.

    Raises:
        ValueError: an argument is out of range (the message names it).
    """

    def __init__(
        self,
        writer: EventWriter,
        *,
        max_batch: int = 2000,
        max_buffer: int = 100_000,
        schedule_delay_s: float = 0.05,
        on_full: OnFull = "block",
        retries: int = 3,
        retry_delay_s: float = 0.1,
        on_stored: Callable[[Sequence[Any]], None] | None = None,
        name: str = "store",
    ) -> None:
        if max_batch < 1 or max_buffer < max_batch:
            raise ValueError(
                f"need 1 <= max_batch <= max_buffer; got max_batch={max_batch}, "
                f"max_buffer={max_buffer}")
        if on_full not in ("block", "drop"):
            raise ValueError(f"on_full must be 'block' or 'drop'; got {on_full!r}")
        if schedule_delay_s < 0 or retries < 0 or retry_delay_s < 0:
            raise ValueError("schedule_delay_s, retries and retry_delay_s must be >= 0")
        self.writer = writer
        self.max_batch = max_batch
        self.max_buffer = max_buffer
        self.schedule_delay_s = schedule_delay_s
        self.on_full = on_full
        self.retries = retries
        self.retry_delay_s = retry_delay_s
        self.on_stored = on_stored
        self.name = name
        #: Counts of what went wrong (see the module docstring).
        self.failures: Counter[str] = Counter()
        # Events and packs, in order: ``len(_buffer) + _extra`` events.
        self._buffer: deque[Any] = deque()
        # Events in the buffer's packs beyond one each (0 without packs).
        self._extra = 0
        # Runtime events per pack: max_batch cut into the fewest equal runs of at most
        # _PACK_MAX, rounded down (2000 -> 250: a batch is whole packs; 2001 -> 250,
        # and the full-batch wake comes a run later); 0: no packing (small batches,
        # or a writer without ``pack``).
        self._pack_size = 0
        if max_batch >= _PACK_MIN and callable(getattr(writer, "pack", None)):
            self._pack_size = max_batch // -(-max_batch // _PACK_MAX)
        # The buffer's length at which the fast path calls _marked(): when its newest
        # _pack_size entries are events to pack (packing), or when it holds a full
        # batch (no packing).
        self._mark = self._pack_size or max_batch
        # Packing: whether the writer was woken for the full batch the buffer holds.
        self._batch_woken = False
        # The fast path appends while len(buffer) < _limit: max_buffer - _extra while
        # running and nobody waits for room, else 0 (every submit takes the slow path).
        self._limit = 0
        # Events (never markers) taken for the write in flight and not yet resolved
        # (stored, refused or counted lost): a batch being split resolves part by
        # part, and only what is still unresolved may be counted at a close timeout.
        self._in_flight = 0
        self._resolved = 0
        #: The one shutdown (a second close() awaits it instead of counting again).
        self._closing: asyncio.Task[int] | None = None
        self._waiters: deque[tuple[Any, asyncio.Future[None]]] = deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._starting: asyncio.Task[None] | None = None
        self._flushing = 0
        # The event loop that ran the writer task ended without shutdown(): the store
        # (its tasks, a writer process's pipes) belonged to it and is unusable now.
        self._loop_ended = False
        # Flush marks: events taken from the buffer so far, events whose write ended
        # (stored or lost), and the last marker seq whose write ended. A flush waits
        # for the marks of what was submitted before it, not for an idle writer
        # (which a producer at the writer's pace never lets happen).
        self._taken = 0
        self._finished = 0
        self._markers_finished = 0
        #: Pending flushes: events and markers to wait for, whether the markers
        #: were extended to the losses of the flush's own writes, and the future.
        self._flushes: list[tuple[int, int, bool, asyncio.Future[None]]] = []
        self._closed = False
        # Set by shutdown once it stops taking events (its second flush, or when
        # it closes): submit raises from then on. Not _closed, which ends retries
        # and tells the writer task that shutdown counts what is left.
        self._refusing = False
        self._lost_by_trace: Counter[str] = Counter()
        self._marker_flow = f"penguiflow-lost-{uuid.uuid4().hex}"
        self._marker_seq = 0
        # True when markers should be written even without events to ride with: set
        # by a new loss, cleared when a markers-only write failed (the database is
        # down: they wait for the next batch of events instead of looping).
        self._markers_due = False
        self._lost_reason: dict[str, str] = {}
        self._lost_ts: dict[str, float] = {}
        self._last_drop_log = 0.0

    # -- producers ------------------------------------------------------------------

    @property
    def pending_events(self) -> int:
        """Events accepted and not yet written (buffered, waiting, or being written)."""
        return len(self._buffer) + self._extra + len(self._waiters) + self._in_flight

    @property
    def closed(self) -> bool:
        """True once :meth:`shutdown` has stopped writing (it refuses new events a
        little earlier: from its second flush on, see the module docstring)."""
        return self._closed

    def submit(self, item: Any) -> Awaitable[None] | None:
        """Buffer one item (never does I/O); an awaitable only when it must wait.

        Synchronous so that the common case costs one comparison and an append:
        the runtime calls it twice per hop. Returns an awaitable when the buffer is
        full under ``on_full="block"`` (await it: the item is buffered, in order,
        when it completes) and, under ``"block"``, once per ``max_batch`` items, one
        that gives the event loop a turn (the writer starts on the full batch);
        else None.

        Raises:
            StoreUnavailable: the processor was shut down.
        """
        buffer = self._buffer
        if len(buffer) < self._limit:
            buffer.append(item)
            # Wake the writer for the first event (it then waits schedule_delay_s for
            # more) and for a full batch; pack the newest events. Only as the length
            # reaches a mark: items arrive one at a time, so a rise passes through
            # it. (Setting the wake for every item of a buffer behind the writer was
            # ~0.2 us an event, measured.)
            n = len(buffer)
            if n == 1 or n == self._mark:
                return self._marked(n)
            return None
        return self._submit_slow(item)

    def _marked(self, n: int) -> Awaitable[None] | None:
        wake = self._wake
        assert wake is not None  # set once running
        if n != self._mark:  # the first event: the writer waits schedule_delay_s for more
            wake.set()
            return None
        if self._pack_size:
            # (A mark is never 1 then: the first event is not packed on its own.)
            self._pack_newest()
            if self._batch_woken or len(self._buffer) + self._extra < self.max_batch:
                return None
            self._batch_woken = True  # until the writer takes a batch
        wake.set()
        if self.on_full == "block":
            # A full batch: one turn of the event loop, so that the writer starts on
            # it now even under a producer that never waits (a bulk save_event
            # loop): its work and the producer's overlap. Not under "drop", whose
            # producer is never held up at all.
            return _ONE_TURN
        return None

    def _pack_newest(self) -> None:
        """Pack the buffer's newest ``_pack_size`` entries (events, by ``_mark``)."""
        buffer, size = self._buffer, self._pack_size
        self._mark = len(buffer) + size  # the next run, whatever becomes of this one
        if type(buffer[-1]) is not tuple or not self._writer_packs():
            # StoredEvents (an import), or a writer that writes in this process now
            # (a thread, the event loop, a fall-back): nothing to pack, nothing popped.
            return
        pop = buffer.pop
        items = [pop() for _ in range(size)]
        items.reverse()
        pack = None
        try:
            pack = self.writer.pack(items)  # type: ignore[attr-defined]
        except Exception as exc:  # the events stay as they are: dumps_rows takes them
            logger.debug("state_store_pack_failed", extra={
                "store": self.name, "error": _text(exc)})
        finally:  # (whatever pack() raised, the events are back in the buffer)
            if type(pack) is Pack and pack.count == size:
                buffer.append(pack)
                self._extra += size - 1
                if self._limit:
                    self._limit = self.max_buffer - self._extra
            else:  # not now (odd values): left as events, which dumps_rows takes
                buffer.extend(items)
            self._mark = len(buffer) + size

    def _writer_packs(self) -> bool:
        """The writer's ``packs()`` (True without one); False when it raises."""
        packs = getattr(self.writer, "packs", None)
        if packs is None:
            return True
        try:
            return bool(packs())
        except Exception as exc:
            logger.debug("state_store_pack_failed", extra={
                "store": self.name, "error": _text(exc)})
            return False

    def _settle(self) -> None:
        """Set ``_mark`` after the buffer changed other than by the fast path: the
        fast path packs when the entries after the newest pack number _pack_size."""
        size = self._pack_size
        if not size:
            return
        buffer = self._buffer
        loose = 0
        for entry in reversed(buffer):
            if type(entry) is Pack or loose == size - 1:
                break
            loose += 1
        self._mark = len(buffer) + size - loose

    def _submit_slow(self, item: Any) -> Awaitable[None] | None:
        if self._refusing:
            raise StoreUnavailable(f"{self.name} is closed; create a new one")
        if self._loop_ended:
            raise StoreUnavailable(
                f"{self.name} was used by an event loop that ended without close(); "
                "create a new store in this event loop, and close it before the loop ends")
        if self._task is None:
            self._start(item)
            return self.submit(item)
        if len(self._buffer) + self._extra + len(self._waiters) < self.max_buffer \
                and not self._waiters:
            self._buffer.append(item)
            self._settle()
            assert self._wake is not None
            self._wake.set()
            return None
        if self.on_full == "drop":
            self._drop(item)
            return None
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((item, future))
        self._limit = 0
        assert self._wake is not None
        self._wake.set()
        return future

    async def submit_many(self, items: Sequence[Any]) -> None:
        """Buffer several items in order (``on_full`` applies to each)."""
        for item in items:
            waiter = self.submit(item)
            if waiter is not None:
                await waiter

    def _start(self, first: Any = None) -> None:
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._task = loop.create_task(self._run(), name=f"{self.name}-writer")
        self._limit = self.max_buffer - self._extra
        if hasattr(self.writer, "start"):
            # The writer's process (if it has one) starts while the first batch fills:
            # spawning it took ~80 ms, which the first write waited out.
            self._starting = loop.create_task(self._start_writer(first),
                                              name=f"{self.name}-writer-start")

    async def _start_writer(self, first: Any) -> None:
        try:
            await self.writer.start(first)  # type: ignore[attr-defined]
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the first write tries again, and reports it
            logger.debug("state_store_writer_start_failed", extra={
                "store": self.name, "error": _text(exc)})

    def _drop(self, item: Any) -> None:
        self.failures["dropped"] += 1
        self._lost([item], "dropped: the store's buffer was full (on_full='drop')")
        now = time.monotonic()
        if now - self._last_drop_log >= 1.0:
            self._last_drop_log = now
            logger.warning("state_store_buffer_full", extra={
                "store": self.name, "dropped_total": self.failures["dropped"],
                "max_buffer": self.max_buffer,
                "hint": "on_full='block' (the default) slows the flow instead of dropping"})

    # -- the writer task --------------------------------------------------------------

    async def _run(self) -> None:
        wake = self._wake
        assert wake is not None
        loop = asyncio.get_running_loop()
        # The write in flight. While it runs, a full next batch is taken and prepared
        # (a writer process's batch is pickled here: ~1.5 us an event) so that this
        # process's share overlaps the writer's; batches are still written one at
        # a time, in order.
        sending: asyncio.Task[None] | None = None
        try:
            while True:
                if sending is not None:
                    # Nothing buffered (waiting producers too: they are let in only as
                    # the write in flight makes room) or less than a batch: nothing
                    # to prepare meanwhile, so wait for the write. Never loop without
                    # awaiting: that would hold the event loop for ever.
                    if sending.done() or not self._buffer or (
                            len(self._buffer) + self._extra < self.max_batch
                            and not self._waiters):
                        await sending  # done, or nothing worth preparing meanwhile
                        sending = None
                        continue
                elif len(self._buffer) + self._extra < self.max_batch and not self._waiters \
                        and not self._flushing:
                    wake.clear()
                    if not self._buffer and not (self._lost_by_trace and self._markers_due):
                        await wake.wait()
                    else:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(wake.wait(), self.schedule_delay_s)
                batch = self._take()
                if batch:
                    prepared = await self._prepare(batch)
                    if sending is not None:
                        await sending
                    sending = loop.create_task(self._send(batch, prepared))
                elif sending is None and not self._waiters and self._flushing:
                    # Nothing to write while a flush waits (it is resolved by the
                    # write that ended it): never a loop that does not yield.
                    await asyncio.sleep(0)
        finally:
            if sending is not None and not sending.done():
                sending.cancel()
                await asyncio.gather(sending, return_exceptions=True)
            self._resolve_flushes(all_=True)  # stopped: nothing more will be written
            if not self._closed:
                self._cut_short()
                self._loop_ended = True
                self._limit = 0  # every later submit takes the slow path, and refuses

    def _cut_short(self) -> None:
        """The writing task was cancelled without shutdown(): the event loop is ending
        (``asyncio.run`` returned) with the store never closed. What it still held is
        lost: counted and said, not silently."""
        self._abandon("state_store_not_closed", {
            "hint": "await store.close() (or flow.stop()) before the event loop ends"})

    def _abandon(self, message: str, details: dict[str, Any]) -> int:
        """Count what is still pending as abandoned (once: it is then forgotten, so a
        later close() finds nothing more), log ``message`` if anything was, and let
        waiting producers go on. Returns the count."""
        left = self.pending_events
        markers = len(self._lost_by_trace)
        if markers:
            # Traces whose losses were never marked: their markers are lost too.
            self.failures["markers_lost"] += markers
            self._lost_by_trace.clear()
        if left or markers:
            self.failures["abandoned"] += left
            self.failures["events_lost"] += left
            logger.error(message, extra={
                "store": self.name, "events_not_stored": left,
                "markers_not_stored": markers, **details})
        for _, future in self._waiters:
            # Resolved, not failed: the runtime awaits these on a node's path, and
            # an observer closing must not fail the flow it observes. Their events
            # were counted above.
            if not future.done():
                future.set_result(None)
        self._waiters.clear()
        self._buffer.clear()
        self._extra = 0
        self._in_flight = 0
        return left

    async def _prepare(self, batch: Sequence[Any]) -> Any:
        """The writer's ``prepare(batch)`` (optional; see ``writer.py``), or None."""
        prepare = getattr(self.writer, "prepare", None)
        if prepare is None:
            return None
        try:
            return await prepare(batch)
        except asyncio.CancelledError:
            raise
        except Exception:  # then write() prepares it again, and reports what fails
            return None

    async def _send(self, batch: Sequence[Any], prepared: Any) -> None:
        self._resolved = 0
        events = _events_in(batch)
        try:
            await self._write(batch, prepared)
            # Only a write that ran to its end settles its events here. One cut off
            # (a shutdown's deadline, the event loop ending) leaves its unresolved
            # events pending, and whoever ended it counts them lost (before, they
            # left pending_events uncounted: neither stored nor lost). A cancelled
            # write is rolled back (the thread's transaction interrupted, the writer
            # process killed mid-frame), unless the database committed it in the
            # instant before the cut: then its events are stored and counted too.
            # The race errs that way, never towards a loss left uncounted.
            self._in_flight -= events - self._resolved
        finally:
            self._resolved = 0
            self._finished += events
            if events < len(batch):
                self._markers_finished = max(self._markers_finished, batch[-1].seq or 0)
            self._admit_waiters()
            if self._flushes:
                self._resolve_flushes()

    def _flushed(self, events: int, markers: int) -> bool:
        if self._finished < events:
            return False
        # Markers due then: written, or waiting for events to ride with (not due).
        return (not markers or self._markers_finished >= markers
                or (not self._markers_due and self._marker_seq < markers))

    def _resolve_flushes(self, *, all_: bool = False) -> None:
        left = []
        for events, markers, extended, future in self._flushes:
            if not all_ and not extended and self._finished >= events and \
                    self._lost_by_trace and self._markers_due:
                # The flush's own writes lost events (refused, or a batch that could
                # not be written): their traces' markers are part of what it waits
                # for, or a reader right after it (pf inspect after flow.stop()) sees
                # a trace that lost events as running. Extended once, so that a
                # flush still returns under sustained losses.
                left.append((events, self._marker_seq + len(self._lost_by_trace), True,
                             future))
                if self._wake is not None:
                    self._wake.set()
            elif all_ or self._flushed(events, markers):
                if not future.done():
                    future.set_result(None)
            else:
                left.append((events, markers, extended, future))
        self._flushes = left

    def _resolve(self, events: int) -> None:
        """``events`` of the write in flight are stored, refused or counted lost."""
        self._resolved += events
        self._in_flight -= events

    def _take(self) -> Sequence[Any]:
        buffer, limit = self._buffer, self.max_batch
        batch: Any
        if self._extra:
            batch = self._take_packed()
        elif len(buffer) <= limit:
            batch = list(buffer)
            buffer.clear()
        else:
            popleft = buffer.popleft
            batch = [popleft() for _ in range(limit)]
        self._batch_woken = False
        self._settle()
        # Markers are not events: pending_events (and a close timeout's count of
        # events not stored) must not include them.
        self._in_flight += len(batch)
        self._taken += len(batch)
        if self._lost_by_trace and (batch or self._markers_due):
            batch += self._markers()
        self._admit_waiters()
        return batch  # type: ignore[no-any-return]

    def _take_packed(self) -> PackedBatch | list[Any]:
        """Up to max_batch events from a buffer holding packs (whole packs only)."""
        buffer, limit = self._buffer, self.max_batch
        popleft = buffer.popleft
        entries: list[Any] = []
        events = 0
        packs = 0
        while buffer:
            entry = buffer[0]
            size = entry.count if type(entry) is Pack else 1
            if events + size > limit and entries:
                break
            entries.append(popleft())
            events += size
            if type(entry) is Pack:
                packs += 1
                self._extra -= size - 1
        if self._limit:
            self._limit = self.max_buffer - self._extra
        return PackedBatch(entries, events) if packs else entries

    def _admit_waiters(self) -> None:
        """Move waiting producers' items into the buffer, in order, while there is room."""
        waiters, buffer = self._waiters, self._buffer
        admitted = False
        while waiters and len(buffer) + self._extra + self._in_flight < self.max_buffer:
            item, future = waiters.popleft()
            buffer.append(item)
            admitted = True
            if not future.done():
                future.set_result(None)
        if admitted:
            self._settle()
        if not waiters and not self._refusing:
            self._limit = self.max_buffer - self._extra

    def _markers(self) -> list[_Marker]:
        # Stamped with the latest lost event's time: a marker must not stretch the
        # trace's duration to the moment it was written.
        # Each with an event key of its own (this processor's marker flow, a seq):
        # a write that committed but whose answer was lost is retried, and the
        # store must skip the marker then as it skips the events.
        first = self._marker_seq + 1
        self._marker_seq += len(self._lost_by_trace)
        markers = [
            _Marker(trace_id, self._lost_ts.get(trace_id, time.time()), LOST_KIND, None, None,
                    {"events_lost": count, "reason": self._lost_reason.get(trace_id, "")},
                    flow_id=self._marker_flow, seq=seq)
            for seq, (trace_id, count) in enumerate(self._lost_by_trace.items(), first)]
        self._lost_by_trace.clear()
        self._lost_reason.clear()
        self._lost_ts.clear()
        return markers

    async def _write(self, batch: Sequence[Any], prepared: Any = None) -> None:
        """Write ``batch`` (retrying, then splitting it; see the module docstring);
        ``prepared``: what the writer's ``prepare`` made of it, for the first try."""
        delay = self.retry_delay_s
        for attempt in range(self.retries + 1):
            try:
                if prepared is not None:  # (kept for a retry: the batch is the same)
                    result = await self.writer.write_prepared(  # type: ignore[attr-defined]
                        batch, prepared)
                else:
                    result = await self.writer.write(batch)
            except StoreUnavailable as exc:
                if attempt < self.retries and not self._closed:
                    self.failures["retried"] += 1
                    logger.warning("state_store_write_retry", extra={
                        "store": self.name, "events": len(batch), "attempt": attempt + 1,
                        "error": _text(exc)})
                    await asyncio.sleep(delay)
                    delay *= 2
                    continue
                self._write_failed(batch, exc)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if len(batch) == 1 or isinstance(exc, StoreRefused):
                    # Refused for good: a marker is not re-sent (it would be refused
                    # again, for ever); it is counted instead. A store that refuses
                    # every write is not split down to single events (2N attempts,
                    # N error lines, for nothing).
                    self._write_failed(batch, exc, requeue=False)
                    return
                # Something in the batch was refused: write the halves, so only the
                # events the backend cannot take are lost.
                middle = len(batch) // 2
                await self._write(batch[:middle])
                await self._write(batch[middle:])
                return
            self._written(batch, result)
            return

    def _written(self, batch: Sequence[Any], result: WriteResult) -> None:
        self._resolve(_events_in(batch))
        stored: Sequence[Any] = batch
        for counter, message in result.notices:
            self.failures[counter] += 1
            logger.warning("state_store_notice", extra={
                "store": self.name, "notice": counter, "detail": message})
        if result.rejected:
            rejected = {i: reason for i, reason in result.rejected}
            lost = [batch[i] for i in rejected if type(batch[i]) is not _Marker]
            markers = len(rejected) - len(lost)
            if markers:  # never expected (a marker is stamped to be storable): counted
                self.failures["markers_lost"] += markers
            self.failures["rejected"] += len(lost)
            self._lost(lost, "refused by the store")
            reasons = sorted(set(rejected.values()))
            logger.warning("state_store_events_rejected", extra={
                "store": self.name, "events": len(lost), "reasons": reasons[:5]})
            skip = set(rejected) | set(result.skipped)
            stored = [item for i, item in enumerate(batch) if i not in skip]
        elif result.skipped:
            skip = set(result.skipped)
            stored = [item for i, item in enumerate(batch) if i not in skip]
        if self.on_stored is not None and stored:
            try:
                self.on_stored(stored)
            except Exception as exc:  # a follower's failure is not the store's
                logger.error("state_store_follow_failed", extra={
                    "store": self.name, "error": _text(exc)})

    def _write_failed(self, batch: Sequence[Any], exc: BaseException, *,
                      requeue: bool = True) -> None:
        events = [item for item in batch if type(item) is not _Marker]
        self._resolve(len(events))
        self.failures["write_failed"] += 1
        self.failures["write_failed_events"] += len(events)
        self._lost(events, f"not written: {_text(exc)}")
        if not requeue:
            self.failures["markers_lost"] += len(batch) - len(events)
        for marker in batch:  # markers are re-sent with the next batch of events
            if type(marker) is _Marker and requeue:
                self._count_lost(marker.trace_id, int(marker.payload["events_lost"]),
                                 str(marker.payload["reason"]), marker.ts, due=False)
        if not events:
            self._markers_due = False
        logger.error("state_store_write_failed", extra={
            "store": self.name, "events": len(events), "error": _text(exc)})

    def _lost(self, items: Sequence[Any], reason: str) -> None:
        """Count ``items`` as lost and remember their traces for the markers."""
        self.failures["events_lost"] += len(items)
        for item in items:
            if isinstance(item, tuple):
                trace_id, ts = item[0], item[1]
            else:
                trace_id, ts = getattr(item, "trace_id", None), getattr(item, "ts", None)
            # Only a trace id a store can hold gets a marker (a refused id has none).
            # (The store's own rule: NBSP or U+2028 are fine, isprintable() is not it.)
            # A str subclass (an Enum of ids) is stored as its text: so is its marker.
            if isinstance(trace_id, str) and trace_id and \
                    _text_problem(trace_id, MAX_TRACE_ID) is None:
                self._count_lost(str.__str__(trace_id), 1, reason, _marker_ts(ts))

    def _count_lost(self, trace_id: str | None, count: int, reason: str,
                    ts: float | None = None, *, due: bool = True) -> None:
        if trace_id is None:
            return
        if due:
            self._markers_due = True
        if trace_id in self._lost_by_trace or len(self._lost_by_trace) < _MAX_LOST_TRACES:
            self._lost_by_trace[trace_id] += count
            self._lost_reason[trace_id] = reason
            if ts is not None and ts > self._lost_ts.get(trace_id, float("-inf")):
                self._lost_ts[trace_id] = ts
        else:
            self.failures["untracked_losses"] += count
        if self._wake is not None:
            self._wake.set()

    # -- flush and shutdown -------------------------------------------------------------

    async def flush(self) -> None:
        """Return once everything submitted before the call is written (or lost).

        Events submitted after the call are not waited for: a flush returns under
        sustained load too (it is what every read of the store starts with)."""
        if self._task is None or self._task.done():
            return
        assert self._wake is not None
        events = self._taken + len(self._buffer) + self._extra + len(self._waiters)
        markers = self._marker_seq + len(self._lost_by_trace) if self._lost_by_trace else 0
        if self._flushed(events, markers):
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._flushes.append((events, markers, False, future))
        self._flushing += 1  # the writer takes a partial batch at once meanwhile
        try:
            self._wake.set()
            await future
        finally:
            self._flushing -= 1
            if not future.done():  # the caller gave up
                future.cancel()
                self._flushes = [f for f in self._flushes if f[3] is not future]

    async def shutdown(self, timeout: float | None = 5.0) -> int:
        """Write what is buffered (within ``timeout`` seconds), stop, close the writer.

        Returns:
            The number of events not stored because the time ran out (also
            counted as ``abandoned`` and ``events_lost``, and logged).
        """
        if self._closing is None:
            # A task of its own: a second caller awaits the same one (counting the
            # events left once), and a caller cancelled mid-way (its own timeout)
            # does not leave the writer task running and the writer open.
            self._closing = asyncio.get_running_loop().create_task(self._shutdown(timeout))
        return await asyncio.shield(self._closing)

    async def _flush_to_close(self) -> None:
        await self.flush()
        # No event is taken from here on (submit raises StoreUnavailable), and those
        # submitted while the flush above ran are written too: they were left in the
        # buffer and cleared, neither stored nor counted.
        self._refusing = True
        self._limit = 0
        await self.flush()

    async def _shutdown(self, timeout: float | None) -> int:
        # One deadline for the whole shutdown: writing what is left, then closing the
        # writer with what remains of it (a grace of RELEASE_GRACE_S at least, to release
        # the backend's connection or process cleanly).
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._flush_to_close(), timeout)
        self._closed = self._refusing = True
        self._limit = 0
        try:
            for task in (self._task, self._starting):
                # Done already (or of an event loop that ended): nothing to wait for.
                if task is not None and not task.done():
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
        finally:
            # Counted once the writer task is stopped: the batch it was writing when
            # the time ran out is among them (see _send). In a finally: a shutdown
            # cancelled here (the event loop ending) still counts them, the writer
            # task no longer does (_closed).
            abandoned = self._abandon("state_store_close_timeout", {
                "timeout_s": timeout,
                "hint": "the database or the writer hangs; raise close_timeout_s to wait "
                        "longer"})
        left = None if deadline is None else max(deadline - loop.time(), RELEASE_GRACE_S)
        try:
            await asyncio.wait_for(self.writer.close(), left)
        except TimeoutError:
            logger.error("state_store_writer_close_timeout", extra={
                "store": self.name, "timeout_s": timeout})
        except Exception as exc:
            if not self._loop_ended:
                raise
            # Its pipes belonged to the loop that ended: released as far as possible.
            logger.warning("state_store_writer_close_failed", extra={
                "store": self.name, "error": _text(exc)})
        return abandoned


def _events_in(batch: Sequence[Any]) -> int:
    """The events of a batch (its markers, if any, are at its end)."""
    if type(batch) is PackedBatch:
        return batch.events + _events_in(batch.tail)
    n = len(batch)
    while n and type(batch[n - 1]) is _Marker:
        n -= 1
    return n


def _text(exc: BaseException) -> str:
    try:
        return f"{type(exc).__name__}: {exc}"[:2000]
    except Exception:
        return type(exc).__name__


def _marker_ts(ts: Any) -> float | None:
    """The time a lost event gives its trace's marker: a finite int or float (the store
    refuses any other), else None (the marker then takes the time it is made)."""
    if type(ts) is float:
        return ts if math.isfinite(ts) else None
    if type(ts) is int and -(1 << 53) <= ts <= 1 << 53:
        return float(ts)
    return None
