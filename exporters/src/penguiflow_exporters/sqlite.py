"""SQLiteStateStore: a TraceStore in one SQLite file (stdlib ``sqlite3``).

Shape. A :class:`~penguiflow_exporters.processor.BatchProcessor` buffers events
and hands batches to the SQLite writer (``_sqlite_write.SQLiteWriter``: schema,
migration, one transaction per batch), which runs in a child process
(``writer="process"``, the default) or on a thread of the store
(``writer="thread"``). Why a process: the writer's work (validating, folding,
encoding JSON, binding rows: ~3 us per event) would otherwise share the flow's
GIL; in a child it runs on the machine's other core, and the flow's process only
pickles each batch onto a pipe. Measured on the 2-core CI machine: see
docs/guides/state-stores.md and benchmarks/README.md.

Reads, bindings, opening and migrating run on ONE worker thread that owns the
store's reading connection (a single-thread executor): the event loop never
waits on the disk. Every query flushes first, so it reads what was saved before.

Durability. WAL mode with ``synchronous=NORMAL``: a power cut may lose the last
commits but cannot corrupt the file; a process crash loses nothing committed.
The WAL is checkpointed as it passes 4 MB. Several processes may share one file:
a batch takes the write lock up front (``BEGIN IMMEDIATE``), a second writer
waits up to ``busy_timeout`` (5 s).

Read-only (``readonly=True``, what ``pf`` opens): the file is opened with
``mode=ro``; a missing, empty or foreign file, a directory, or one at another
schema version, is refused with one clear line and left byte-for-byte
unchanged. Nothing is created beside it either: a WAL-mode file without a
``-wal`` holding writes is read ``immutable=1`` (``mode=ro`` alone would create
its ``-wal`` and ``-shm``), reopened as soon as the file or its side files
change; one with both (a live writer) is read ``mode=ro``; one whose ``-wal``
holds writes but has no ``-shm`` (its writer did not close) is refused
(:class:`StoreUnavailable`) and names the fix, ``pf migrate``.

Following. A writing store's ``follow()`` yields what this store object writes,
as it is written. A read-only store's reads the file every :data:`FOLLOW_POLL_S`
for blocks committed since the last look, by any process (SQLite has no
notifications across processes): a trace another process is writing updates in
``pf inspect`` within a fraction of a second. Polling only reads (``mode=ro``).

Errors. ``sqlite3`` exceptions are translated where a job is awaited:
:class:`StoreUnavailable` when the file cannot be opened or written (bad path,
permissions, lock held too long, disk full), :class:`StateStoreError` otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import sqlite3
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

from penguiflow.state import (
    ERROR_KINDS,
    TERMINAL_KINDS,
    RemoteBinding,
    StateStoreError,
    StoredEvent,
    StoreUnavailable,
    TraceFilter,
    TraceSummary,
    check_page,
)

from ._base import ProcessedStore
from ._block_read import decode_block
from ._events import events_of
from ._records import BlockError
from ._sqlite_files import (
    PATH_FIX,
    has_hot_journal,
    read_only_uri,
    schema_version,
    text_factory,
    translate,
    wal_size,
)
from ._sqlite_write import (
    BUSY_TIMEOUT_MS,
    SCHEMA_VERSION,
    SchemaError,
    check_schema,
    connect,
    file_identity,
    release,
    schema_version_of,
)
from ._sqlite_writers import ProcessOrThread, ThreadWriter, translate_writer
from ._writer_proc import ProcessWriter
from .processor import StoreRefused
from .writer import EventWriter

__all__ = ["DEFAULT_PATH", "FOLLOW_POLL_S", "SCHEMA_VERSION", "SQLiteStateStore", "schema_version"]

#: Where the store lives when no path is given (relative to the working directory).
DEFAULT_PATH = ".penguiflow/traces.db"

_T = TypeVar("_T")

logger = logging.getLogger("penguiflow_exporters.store")

_SELECT_BLOCKS = (
    "SELECT data FROM blocks "
    "WHERE trace_key = (SELECT key FROM traces WHERE trace_id = ?) ORDER BY first")
# The blocks holding events [offset, end) of a trace: from the last block starting
# at or before `offset`, seeking on (trace_key, first), never walking the rest.
_SELECT_PAGE = (
    "SELECT first, data FROM blocks WHERE trace_key = ?1 AND first >= "
    "(SELECT ifnull(max(first), 0) FROM blocks WHERE trace_key = ?1 AND first <= ?2) "
    "AND first < ?3 ORDER BY first")
_TRACE_COLUMNS = (
    "trace_id, flow_name, status, started_ts, ended_ts, node_count, error_count, "
    "remote_call_count, event_count, nodes, events_lost"
)
_RESOLVE_LIMIT = 10
#: How often a read-only store's ``follow()`` reads the file for commits of other
#: processes (a query on an index: ~20 us when nothing is new). 0.2 s: a live view
#: shows a write well within a second.
FOLLOW_POLL_S: Final = 0.2
# follow() on a read-only store, as Postgres's (blocks are only ever inserted, with
# increasing ids; a trace's blocks hold its events [first, first + n), contiguous).
_LAST_BLOCK = "SELECT ifnull(max(id), 0) FROM blocks"
_TRACE_END = ("SELECT ifnull(max(first + n), 0) FROM blocks "
              "WHERE trace_key = (SELECT key FROM traces WHERE trace_id = ?)")
_FOLLOW_ALL = "SELECT id, data FROM blocks WHERE id > ? ORDER BY id"
_FOLLOW_TRACE = ("SELECT first, n, data FROM blocks "
                 "WHERE trace_key = (SELECT key FROM traces WHERE trace_id = ?) "
                 "AND first >= ? ORDER BY first, id")
_MAX_BATCH = 10_000
_READER_FIX = "point the reader at a store a flow has written (pf traces --store URL)"
_decode = json.loads


def _summary(row: Sequence[Any]) -> TraceSummary:
    """A TraceSummary from a row of the ``_TRACE_COLUMNS``.

    Never raises: the row is read as the writer wrote it, and a value of another
    type (a file edited by hand or by another tool: SQLite keeps what it is given)
    is read as unknown (a time as NaN, a count as 0, ``nodes`` that are no JSON list
    of names as none), so one bad row cannot fail the fleet view around it."""
    (trace_id, flow_name, status, started, ended, node_count, error_count, remote_count,
     event_count, nodes, events_lost) = row
    return TraceSummary(_str(trace_id), _str_or_none(flow_name), _str(status),
                        _time(started), _time(ended), _int(node_count), _int(error_count),
                        _int(remote_count), _int(event_count), _names_of(nodes),
                        _int(events_lost))


def _str(value: Any) -> str:
    return value if type(value) is str else str(value)


def _str_or_none(value: Any) -> str | None:
    return None if value is None else _str(value)


def _time(value: Any) -> float:
    return value if type(value) is float or type(value) is int else math.nan


def _int(value: Any) -> int:
    return value if type(value) is int else 0


def _names_of(nodes: Any) -> tuple[str, ...]:
    try:
        names = _decode(nodes) if type(nodes) is str else None
    except (ValueError, RecursionError):
        return ()
    if type(names) is not list:
        return ()
    return tuple(name for name in names if type(name) is str)


class SQLiteStateStore(ProcessedStore):
    """A :class:`~penguiflow.state.TraceStore` in one SQLite file.

    ``save_event`` only buffers (see :class:`~penguiflow_exporters.processor.BatchProcessor`
    for batching and ``on_full``); batches are written by the writer (``writer``),
    queries and bindings run on the store's worker thread, each after a flush.
    Use it as ``async with SQLiteStateStore(path) as store:`` or call ``close()``;
    it opens itself on first use.

    Args:
        path: the database file; its parent directories are created (unless
            ``readonly``).
        writer: ``"process"`` (default) or ``"thread"``: where batches are written.
        readonly: open for reading only (see the module docstring).
        close_timeout_s: how long ``close()`` waits for buffered events to be
            written before giving them up (counted). ``PenguiFlow.stop()`` does not
            close the store: it flushes it, bounded by its own ``store_timeout_s``.
        **options: the processor's ``on_full`` (``"block"``), ``max_batch`` (here
            10,000 by default), ``max_buffer``, ``schedule_delay_s``, ``retries``
            (``batch_size`` and ``flush_interval_s`` are accepted as older names).

    Raises:
        StoreUnavailable: (on open, from any call) the file cannot be created,
            opened or written; or the store is closed.
        StateStoreError: the file is not a penguiflow trace database, or has a
            schema version this one cannot use (the message says which and what
            to do); the file is not changed.
    """

    def __init__(self, path: str | os.PathLike[str] = DEFAULT_PATH, *,
                 writer: Literal["process", "thread"] = "process", readonly: bool = False,
                 close_timeout_s: float = 5.0, **options: Any) -> None:
        if writer not in ("process", "thread"):
            raise ValueError(f"writer must be 'process' or 'thread'; got {writer!r}")
        if options.get("max_batch") is None and options.get("batch_size") is None:
            # Bigger batches than the processor's 2,000: fewer transactions and
            # key/range look-ups per event (chain N=5 with the store ~10% faster with
            # 10,000, measured); a batch holds the write lock for ~0.05 s.
            options["max_batch"] = min(_MAX_BATCH, options.get("max_buffer", 100_000))
        super().__init__(readonly=readonly, close_timeout_s=close_timeout_s, **options)
        self.path = Path(path)
        #: ``"process"`` or ``"thread"``: where batches are written.
        self.writer = writer
        self._executor = ThreadPoolExecutor(max_workers=1,
                                            thread_name_prefix="penguiflow-sqlite")
        self._shut_down = False
        #: Owned by the worker thread: only touched from functions run by ``_call``.
        self._conn: sqlite3.Connection | None = None
        self._identity: tuple[int, int] | None = None
        #: A read-only store's connection is ``immutable`` (see ``_sqlite_files.read_only_uri``):
        #: the file's state then, reopened when it changes (a writer showed up).
        self._immutable: tuple[object, ...] | None = None
        #: A reopen under way or failed: the next query opens the file again.
        self._reopening = False
        #: How many times the file was found replaced (a follower's marks are per file).
        self._generation = 0
        self._went_away = False  # missing or another file at a reopen: a new one comes

    def __repr__(self) -> str:
        # getattr: a repr that raises (of a store whose __init__ refused its arguments,
        # shown in that traceback) would hide the error it is shown beside.
        return f"SQLiteStateStore({str(getattr(self, 'path', '?'))!r})"

    @property
    def generation(self) -> int:
        """How many times this store found its file replaced by another (rotated,
        moved over, deleted and made anew) and reopened it: 0 until then.

        What a reader shows as "new since the last look" is per file: a reader that
        counts events already shown (``pf tail``) starts again from nothing when
        this changes, since the new file's traces and positions say nothing of the
        old one's.
        """
        return self._generation

    def _make_writer(self) -> EventWriter:
        path = str(self.path)
        if self.writer == "thread":
            return ThreadWriter(path)
        return ProcessOrThread(path, ProcessWriter(
            "penguiflow_exporters._sqlite_write",
            {"path": path, "terminal": TERMINAL_KINDS, "errors": ERROR_KINDS,
             "busy_timeout_ms": BUSY_TIMEOUT_MS},
            translate=lambda exc: translate_writer(path, exc)))

    # -- worker-thread plumbing ------------------------------------------------------

    async def _call(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run ``fn(*args)`` on the worker thread; translate sqlite3 errors."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except sqlite3.Error as exc:
            error = translate(str(self.path), getattr(exc, "sqlite_errorcode", None), str(exc))
            if self.readonly:  # a reader is not asked for a writable path
                error = type(error)(str(error).replace(PATH_FIX, _READER_FIX))
            raise error from exc
        except SchemaError as exc:
            raise StoreRefused(f"SQLite store: {exc}") from exc
        except RuntimeError as exc:
            if self._shut_down:  # the executor refused the job: the store was closed meanwhile
                raise StoreUnavailable(f"{self!r} is closed; create a new one") from exc
            raise

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            if not self._reopening:
                raise StoreUnavailable(f"{self!r} is closed; create a new one")
            self._reopen()  # the last reopen failed (the file was away): try again
        elif self._immutable is not None:
            # An immutable connection sees no other process's writes and takes no
            # lock: reopen when anything changed (a writer opened, wrote, checkpointed).
            if self._immutable_state() != self._immutable:
                self._reopen()
        elif self._identity is not None and file_identity(str(self.path)) != self._identity:
            # Deleted or replaced under us: read (and write bindings to) the file now there.
            self._reopen()
        assert self._conn is not None
        return self._conn

    def _reopen(self) -> None:
        """Close and open the file again. A failure (the file gone a moment, being
        replaced) is raised for this query only: the next one tries again, where the
        store would otherwise stay "closed" for good (``pf tail`` ended by a rotation)."""
        if self._identity is not None and file_identity(str(self.path)) != self._identity:
            # Missing or another file (a rotation): whatever is there next is another
            # one, even with the old one's inode number (freed once closed, reused).
            self._went_away = True
        self._close_sync()
        self._reopening = True
        self._open_sync()
        self._reopening = False

    def _immutable_state(self) -> tuple[object, ...]:
        """What an immutable connection's reads depend on: the file's identity, size and
        modification time, and which side files exist (two stats more per query)."""
        path = str(self.path)
        try:
            st = os.stat(path)
        except OSError:
            return ()
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, wal_size(self.path),
                os.path.exists(f"{path}-shm"))

    # -- lifecycle ---------------------------------------------------------------------

    async def _open(self) -> None:
        await self._call(self._open_sync)

    def _open_sync(self) -> None:
        if self._conn is not None:  # two opens raced; both ran here, in turn
            return
        path = self.path
        if self.readonly:
            if path.is_dir():
                raise StoreRefused(f"SQLite store {str(path)!r} is a directory, not a trace "
                                   "store; point the reader at the store's file "
                                   "(sqlite:///path/to/traces.db)")
            if not path.is_file():
                if path.exists():  # a FIFO would hang the open; a device reads as nothing
                    raise StoreRefused(f"SQLite store {str(path)!r} is not a regular file "
                                       "(a FIFO, a device or a socket); point the reader at "
                                       "the store's file (sqlite:///path/to/traces.db)")
                raise StoreUnavailable(f"SQLite store {str(path)!r} does not exist; point the "
                                       "reader at a store a flow has written")
            if not os.access(path, os.R_OK):
                raise StoreUnavailable(f"SQLite store {str(path)!r} cannot be read (permission "
                                       "denied); run as a user who may read it, or copy it")
            if has_hot_journal(path):
                raise StoreUnavailable(
                    f"SQLite store {str(path)!r} has a rollback journal left by a writer that "
                    "stopped mid-write (-journal), which only a writer can roll back; open "
                    "it once with a writing store (SQLiteStateStore(path), or a flow using "
                    "it), then read it")
            # mode=ro: SQLite never writes the file (nor creates one); immutable=1 for a
            # WAL-mode file with nothing to read beside it, so no side file is created.
            # Taken before the connection: a change after is seen by the next query.
            state = self._immutable_state()
            uri, immutable = read_only_uri(path)
            conn = sqlite3.connect(uri, uri=True, isolation_level=None,
                                   check_same_thread=False)
            try:
                conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
                if self._reopening and self._went_away and schema_version_of(conn) == 0:
                    # The file came back empty: its new writer is setting it up (a
                    # rotation). Not there yet, rather than "not a store".
                    raise StoreUnavailable(f"SQLite store {str(path)!r} is being set up "
                                           "anew (an empty database for now)")
                check_schema(conn, str(path))
            except BaseException:
                conn.close()
                raise
            self._immutable = state if immutable else None
        else:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreUnavailable(
                    f"SQLite store {str(path)!r}: cannot create the directory "
                    f"{str(path.parent)!r} ({exc.strerror or exc}); {PATH_FIX}") from exc
            conn = connect(str(path))
        conn.text_factory = text_factory
        self._conn = conn
        identity = file_identity(str(path))
        if self._identity is not None and (identity != self._identity or self._went_away):
            self._generation += 1  # another file now: followers read it from its start
        self._went_away = False
        self._identity = identity

    async def _close(self) -> None:
        self._reopening = False  # closed for good: no query opens it again
        try:
            # Bounded: the reading thread may be stuck in a query waiting on another
            # connection's lock (up to busy_timeout); its connection is interrupted
            # and closed by the thread once the query ends, without us.
            await asyncio.wait_for(self._call(self._close_sync),
                                   self._close_time_left(self.close_timeout_s))
        except TimeoutError:
            conn = self._conn
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.interrupt()  # safe from another thread (sqlite3_interrupt)
            logger.warning("state_store_close_timeout", extra={
                "store": repr(self), "detail": "a query of the store was still waiting "
                "(a lock held elsewhere): interrupted, its connection closed after it"})
        finally:
            self._shut_down = True
            self._executor.shutdown(wait=False)

    def _close_sync(self) -> None:
        self._immutable = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def close(self) -> None:
        """Write what is buffered (within ``close_timeout_s``), close the file; idempotent.

        A writing store then returns the file to rollback-journal mode when no other
        connection has it open (``_sqlite_write.release``), so that read-only readers
        create nothing beside it.
        """
        was_closed = self._closed
        try:
            await ProcessedStore.close(self)
        finally:
            if not self._shut_down:
                self._shut_down = True
                self._executor.shutdown(wait=False)
        if not was_closed and not self.readonly and self._opened:
            await asyncio.to_thread(release, str(self.path))

    async def follow(self, trace_id: str | None = None) -> AsyncGenerator[StoredEvent, None]:
        """Yield each event of ``trace_id`` (or of every trace) stored from now on.

        A writing store yields the events it writes itself, once each batch is
        written. A read-only store reads the file every :data:`FOLLOW_POLL_S` and
        yields the events committed since, by any process, in the order of the
        store's blocks (a trace's: order of occurrence). Only events stored after
        the call; read ``load_history`` first for the past. Ends when the store is
        closed.

        Raises:
            StoreUnavailable: the store is closed, or the file cannot be read.
        """
        if self._closed:
            raise StoreUnavailable(f"{self!r} is closed; create a new one")
        if not self.readonly:
            async for event in ProcessedStore.follow(self, trace_id):
                yield event
            return
        await self.open()
        closed = self._followers.iterate(None)  # ends when the store closes
        waiter = asyncio.ensure_future(anext(closed, None))
        try:
            last = await self._call(self._follow_mark_sync, trace_id)
            while not self._closed:
                done, _ = await asyncio.wait({waiter}, timeout=FOLLOW_POLL_S)
                if done or self._closed:
                    return
                try:
                    events, last = await self._call(self._follow_sync, trace_id, last)
                except StoreUnavailable:
                    if self._closed:  # closed while the query ran
                        return
                    raise
                for event in events:
                    yield event
        finally:
            waiter.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await waiter
            await closed.aclose()

    def _follow_mark_sync(self, trace_id: str | None) -> tuple[int, int]:
        """Where following starts: the file's generation, and its last block id or the
        trace's next event index."""
        conn = self._connection()
        row = (conn.execute(_LAST_BLOCK) if trace_id is None
               else conn.execute(_TRACE_END, (trace_id,))).fetchone()
        return self._generation, int(row[0])

    def _follow_sync(self, trace_id: str | None,
                     mark: tuple[int, int]) -> tuple[list[StoredEvent], tuple[int, int]]:
        """The events stored after ``mark`` (see :meth:`_follow_mark_sync`), and the new
        mark. A file replaced since is read from its start: the old file's block ids and
        positions say nothing of the new one's (its blocks were all skipped)."""
        conn = self._connection()
        generation, last = mark
        if generation != self._generation:
            last = 0
        events: list[StoredEvent] = []
        try:
            if trace_id is None:
                for block_id, data in conn.execute(_FOLLOW_ALL, (last,)):
                    events += events_of(decode_block(data))
                    last = block_id
            else:
                for first, n, data in conn.execute(_FOLLOW_TRACE, (trace_id, last)):
                    events += events_of(decode_block(data)[max(0, last - first):])
                    last = first + n
        except BlockError as exc:
            raise StateStoreError(f"SQLite store {str(self.path)!r}: {exc}") from exc
        return events, (self._generation, last)

    async def save_remote_binding(self, binding: RemoteBinding) -> None:
        """Store a binding, once (an identical one is ignored); written at once, not buffered."""
        self._writable()
        await self.open()
        await self._call(self._save_binding_sync, binding)

    def _save_binding_sync(self, binding: RemoteBinding) -> None:
        self._connection().execute(
            "INSERT OR IGNORE INTO bindings (trace_id, context_id, task_id, agent_url) "
            "VALUES (?, ?, ?, ?)",
            (binding.trace_id, binding.context_id, binding.task_id, binding.agent_url))

    # -- queries -----------------------------------------------------------------------

    async def _query(self, fn: Callable[..., _T], *args: Any) -> _T:
        # Flush first (read-your-writes); flush() also raises once the store is closed.
        await self.flush()
        await self.open()
        return await self._call(fn, *args)

    async def load_history(self, trace_id: str) -> Sequence[StoredEvent]:
        """The events of ``trace_id`` in order of occurrence, every field restored.

        ``payload`` comes back as a dict and ``parent_invocation_ids`` as a tuple.
        """
        return await self._query(self._load_history_sync, trace_id)

    async def load_history_page(self, trace_id: str, *, offset: int = 0,
                                limit: int) -> Sequence[StoredEvent]:
        """At most ``limit`` events of ``trace_id`` after the first ``offset`` (see TraceStore).

        Only the blocks holding those events are read, sought on the
        ``blocks (trace_key, first)`` index; the skipped events are not decoded.

        Raises:
            ValueError: ``limit < 1`` or ``offset < 0``.
        """
        check_page(offset, limit)
        return await self._query(self._load_history_sync, trace_id, offset, limit)

    def _load_history_sync(self, trace_id: str, offset: int = 0,
                           limit: int | None = None) -> list[StoredEvent]:
        conn = self._connection()
        try:
            if limit is None:
                events: list[StoredEvent] = []
                for (data,) in conn.execute(_SELECT_BLOCKS, (trace_id,)):
                    events += events_of(decode_block(data))
                return events
            return self._page(conn, trace_id, offset, offset + limit)
        except BlockError as exc:
            raise StateStoreError(f"SQLite store {str(self.path)!r}, trace {trace_id!r}: "
                                  f"{exc}") from exc

    @staticmethod
    def _page(conn: sqlite3.Connection, trace_id: str, start: int,
              end: int) -> list[StoredEvent]:
        """Events ``start`` to ``end`` (excluded) of a trace: only the blocks holding them
        are read, and only those events built."""
        row = conn.execute("SELECT key FROM traces WHERE trace_id = ?", (trace_id,)).fetchone()
        if row is None:
            return []
        events: list[StoredEvent] = []
        for first, data in conn.execute(_SELECT_PAGE, (row[0], start, end)):
            items = decode_block(data)
            events += events_of(items[max(0, start - first):end - first])
        return events

    async def list_traces(self, filter: TraceFilter | None = None) -> list[TraceSummary]:
        """Summaries matching ``filter`` (default: the 50 newest), as ``TraceFilter.apply``.

        Ties in the order are broken by the order in which the traces were first stored.
        """
        return await self._query(self._list_traces_sync, filter or TraceFilter())

    def _list_traces_sync(self, f: TraceFilter) -> list[TraceSummary]:
        clauses: list[str] = []
        params: list[Any] = []
        if f.status is not None:
            clauses.append("status = ?")
            params.append(f.status)
        if f.node is not None:
            clauses.append("EXISTS (SELECT 1 FROM json_each(traces.nodes) WHERE value = ?)")
            params.append(f.node)
        if f.has_errors is not None:
            clauses.append("error_count > 0" if f.has_errors else "error_count = 0")
        if f.since is not None:
            clauses.append("started_ts >= ?")
            params.append(f.since)
        if f.until is not None:
            clauses.append("started_ts < ?")
            params.append(f.until)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        # TraceFilter.apply sorts stably with reverse=True: ties keep insertion order
        # (rowid). The duration is computed exactly as TraceSummary.duration_ms.
        order = ("started_ts DESC, rowid" if f.order == "newest"
                 else "(ended_ts - started_ts) * 1000.0 DESC, started_ts DESC, rowid")
        params.append(f.limit)
        rows = self._connection().execute(
            f"SELECT {_TRACE_COLUMNS} FROM traces {where} ORDER BY {order} LIMIT ?", params)
        return [_summary(row) for row in rows]

    async def get_trace(self, trace_id: str) -> TraceSummary | None:
        """The summary of ``trace_id``, or None if no event of it is stored."""
        return await self._query(self._get_trace_sync, trace_id)

    def _get_trace_sync(self, trace_id: str) -> TraceSummary | None:
        row = self._connection().execute(
            f"SELECT {_TRACE_COLUMNS} FROM traces WHERE trace_id = ?", (trace_id,)).fetchone()
        return None if row is None else _summary(row)

    async def resolve_trace_id(self, prefix: str) -> list[str]:
        """Trace ids starting with ``prefix`` (case-sensitive), sorted, at most 10."""
        return await self._query(self._resolve_sync, prefix)

    def _resolve_sync(self, prefix: str) -> list[str]:
        # A range scan on the primary key rather than LIKE: LIKE ignores ASCII case
        # and cannot use the index; the ids starting with `prefix` are exactly the
        # run of ids >= prefix that start with it (BINARY order = code point order).
        found: list[str] = []
        for (trace_id,) in self._connection().execute(
                "SELECT trace_id FROM traces WHERE trace_id >= ? ORDER BY trace_id LIMIT ?",
                (prefix, _RESOLVE_LIMIT)):
            if not trace_id.startswith(prefix):
                break
            found.append(trace_id)
        return found

    async def load_bindings(self, *, trace_id: str | None = None,
                            context_id: str | None = None,
                            task_id: str | None = None) -> list[RemoteBinding]:
        """Bindings matching every given id, in the order they were stored.

        Raises:
            ValueError: no id was given.
            StoreUnavailable: the store is closed.
        """
        if trace_id is None and context_id is None and task_id is None:
            raise ValueError("load_bindings needs trace_id, context_id or task_id")
        await self.open()  # raises StoreUnavailable once closed
        wanted = {"trace_id": trace_id, "context_id": context_id, "task_id": task_id}
        return await self._call(self._load_bindings_sync,
                                {k: v for k, v in wanted.items() if v is not None})

    def _load_bindings_sync(self, wanted: dict[str, str]) -> list[RemoteBinding]:
        # Column names come from the fixed dict above, never from the caller.
        where = " AND ".join(f"{column} = ?" for column in wanted)
        rows = self._connection().execute(
            f"SELECT trace_id, context_id, task_id, agent_url FROM bindings WHERE {where} "
            "ORDER BY id", list(wanted.values()))
        return [RemoteBinding(*row) for row in rows]
