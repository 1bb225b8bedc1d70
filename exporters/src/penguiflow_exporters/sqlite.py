"""SQLiteStateStore: a TraceStore in one SQLite file (stdlib ``sqlite3``).

Writes. Batches are written by a child process (``writer="process"``, the
default; see _writer_proc.py for why, and _sqlite_write.py for the transaction)
that the event loop feeds through a pipe, or, with ``writer="thread"``, on the
worker thread below. Either way a batch is one transaction storing its events as
blocks (see _batch.py), folding them into the trace summaries and recording
their ``(flow_id, seq)`` ranges, so a re-delivered event is stored once.

Threading. Reads, bindings, opening and migrating run on ONE worker thread that
owns the store's connection (a single-thread executor); coroutines await it with
``run_in_executor`` and the event loop never waits on the disk. One thread, not a
pool: the jobs run in submission order, and ``close()`` runs after every job
already submitted. Every query flushes first, and a flush returns once the
writer has committed, so a query reads what was saved before it.

Durability. WAL mode with ``synchronous=NORMAL``: a commit is not fsynced (the
WAL is, at checkpoints), so a power cut may lose the last commits but cannot
corrupt the file, and a process crash loses nothing committed. Readers never
block the writer.

Several processes may share one file (the default path is relative to the
working directory). A batch reads the summaries it updates, so it takes the
write lock up front (``BEGIN IMMEDIATE``); a second writer waits up to
``busy_timeout`` (5 s) instead of failing at once.

Schema. Created and migrated by the store; ``schema_version`` records each
version applied. A file written by a newer version is refused (StateStoreError),
never altered.

Errors. ``sqlite3`` exceptions are translated where a job is awaited:
:class:`StoreUnavailable` when the file cannot be opened or written (bad path,
permissions, lock held too long, disk full), :class:`StateStoreError` otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import json.encoder
import logging
import os
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, TypeVar

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

from ._blocks import (
    BLOCK_EVENTS,
    decode_block,
    encode_block,
    events_of,
    expand,
    kept_items,
    stored_item,
    writer_payload,
)
from ._buffered import BufferedStore
from ._gc import gc_paused
from ._sqlite_write import BatchWriter
from ._writer_proc import AsyncWriterProcess, WriterError

__all__ = ["DEFAULT_PATH", "SCHEMA_VERSION", "SQLiteStateStore"]

#: Where the store lives when no path is given (relative to the working directory).
DEFAULT_PATH = ".penguiflow/traces.db"

#: The schema this module writes (see ``_MIGRATIONS``).
SCHEMA_VERSION = 4

_T = TypeVar("_T")

logger = logging.getLogger("penguiflow_exporters.store")

# Versions 1-3 are SQL; version 4 (_to_v4, below) encodes blocks in Python.
_SQL_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        # `id` orders events by occurrence. A plain INTEGER PRIMARY KEY (rowid alias)
        # rather than AUTOINCREMENT: that keyword updates sqlite_sequence on every row
        # and cost 30% of ingest throughput (measured); a new rowid is always above
        # every existing one, so the order of the rows present is the same.
        """CREATE TABLE events (
            id INTEGER PRIMARY KEY,
            event_key TEXT UNIQUE,
            trace_id TEXT,
            ts REAL NOT NULL,
            kind TEXT NOT NULL,
            node_name TEXT,
            node_id TEXT,
            attempt INTEGER NOT NULL,
            invocation_id TEXT,
            parent_invocation_ids TEXT NOT NULL,
            span_id TEXT,
            parent_span_id TEXT,
            seq INTEGER NOT NULL,
            queued_ts REAL,
            flow_name TEXT,
            flow_id TEXT,
            payload TEXT NOT NULL
        )""",
        "CREATE INDEX events_trace ON events (trace_id, id)",
        # One row per trace: the TraceSummary fields plus the builder's state that
        # the summary does not show (open invocations, failed, cancelled), so a
        # batch folds only its new events in. `nodes` is a sorted JSON array.
        """CREATE TABLE traces (
            trace_id TEXT PRIMARY KEY,
            flow_name TEXT,
            status TEXT NOT NULL,
            started_ts REAL NOT NULL,
            ended_ts REAL NOT NULL,
            node_count INTEGER NOT NULL,
            error_count INTEGER NOT NULL,
            remote_call_count INTEGER NOT NULL,
            event_count INTEGER NOT NULL,
            nodes TEXT NOT NULL,
            open_count INTEGER NOT NULL,
            failed INTEGER NOT NULL,
            cancelled INTEGER NOT NULL
        )""",
        "CREATE INDEX traces_started ON traces (started_ts)",
        "CREATE TABLE bindings (id INTEGER PRIMARY KEY, trace_id TEXT NOT NULL, "
        "context_id TEXT, task_id TEXT, agent_url TEXT)",
        # Unique on all four ids. NULLs are distinct in a UNIQUE constraint, so they
        # are mapped to x'' (an empty BLOB, which never equals a TEXT value).
        "CREATE UNIQUE INDEX bindings_ids ON bindings (trace_id, ifnull(context_id, x''), "
        "ifnull(task_id, x''), ifnull(agent_url, x''))",
        "CREATE INDEX bindings_context ON bindings (context_id)",
        "CREATE INDEX bindings_task ON bindings (task_id)",
    ),
    (
        # v2: the payload's runtime fields become columns, so a batch binds the
        # runtime's tuples almost as they come instead of building and encoding a
        # payload dict per event on the writer thread (which holds the GIL the flow's
        # loop needs). `q_in IS NULL` marks a row whose `payload` is the whole
        # payload as JSON (every v1 row, and events saved as StoredEvents); otherwise
        # `payload` holds only the kind's `extra` items ('{}' when none) and the
        # payload is rebuilt on read with penguiflow.metrics.event_payload, the
        # function the runtime builds it with. Added columns are NULL in v1 rows, so
        # the migration rewrites nothing.
        "ALTER TABLE events ADD COLUMN latency_ms REAL",
        "ALTER TABLE events ADD COLUMN q_in INTEGER",
        "ALTER TABLE events ADD COLUMN q_out INTEGER",
        "ALTER TABLE events ADD COLUMN outgoing INTEGER",
        "ALTER TABLE events ADD COLUMN queue_maxsize INTEGER",
        "ALTER TABLE events ADD COLUMN trace_inflight INTEGER",
        "ALTER TABLE events ADD COLUMN trace_cancelled INTEGER",
        "ALTER TABLE events ADD COLUMN trace_pending INTEGER",
    ),
    (
        # v3: integer keys instead of text ids in the two indexes every event
        # inserts into. A trace's key is its `traces` row (`key`, an INTEGER PRIMARY
        # KEY, so VACUUM keeps it), a flow's its `flows` row. `events_trace` becomes
        # (trace_key, id): new traces get increasing keys, so inserts land at the
        # index's end instead of at random 32-character trace ids across the whole
        # index (which, past the page cache, rewrote a random page per event), and
        # the `event_key` TEXT UNIQUE index becomes UNIQUE (flow_key, seq): the same
        # identity (keys were exactly "<flow_id>:<seq>"), appended too. The events
        # lose their trace_id, flow_id and event_key texts (~70 bytes a row). With the
        # multi-row INSERT and the summary fold in Python (see _store_rows), raw ingest
        # went from ~32k to ~75k events/s on the 2-core CI machine (benchmarks/stores.py).
        # Tables are rebuilt (SQLite cannot drop a UNIQUE column): old rows keep their
        # ids, so their order, and traces keep their rowids (list_traces' tie-break).
        "CREATE TABLE flows (key INTEGER PRIMARY KEY, flow_id TEXT NOT NULL UNIQUE)",
        "INSERT INTO flows (flow_id) SELECT flow_id FROM events WHERE flow_id IS NOT NULL "
        "GROUP BY flow_id ORDER BY min(id)",
        """CREATE TABLE traces_v3 (
            key INTEGER PRIMARY KEY,
            trace_id TEXT NOT NULL UNIQUE,
            flow_name TEXT,
            status TEXT NOT NULL,
            started_ts REAL NOT NULL,
            ended_ts REAL NOT NULL,
            node_count INTEGER NOT NULL,
            error_count INTEGER NOT NULL,
            remote_call_count INTEGER NOT NULL,
            event_count INTEGER NOT NULL,
            nodes TEXT NOT NULL,
            open_count INTEGER NOT NULL,
            failed INTEGER NOT NULL,
            cancelled INTEGER NOT NULL
        )""",
        "INSERT INTO traces_v3 SELECT rowid, trace_id, flow_name, status, started_ts, "
        "ended_ts, node_count, error_count, remote_call_count, event_count, nodes, open_count, "
        "failed, cancelled FROM traces ORDER BY rowid",
        "DROP TABLE traces",
        "ALTER TABLE traces_v3 RENAME TO traces",
        "CREATE INDEX traces_started ON traces (started_ts)",
        """CREATE TABLE events_v3 (
            id INTEGER PRIMARY KEY,
            trace_key INTEGER,
            flow_key INTEGER,
            seq INTEGER NOT NULL,
            ts REAL NOT NULL,
            kind TEXT NOT NULL,
            node_name TEXT,
            node_id TEXT,
            invocation_id TEXT,
            parent_invocation_ids TEXT NOT NULL,
            span_id TEXT,
            parent_span_id TEXT,
            attempt INTEGER NOT NULL,
            queued_ts REAL,
            flow_name TEXT,
            latency_ms REAL,
            q_in INTEGER,
            q_out INTEGER,
            outgoing INTEGER,
            queue_maxsize INTEGER,
            trace_inflight INTEGER,
            trace_cancelled INTEGER,
            trace_pending INTEGER,
            payload TEXT NOT NULL
        )""",
        "INSERT INTO events_v3 SELECT e.id, t.key, f.key, e.seq, e.ts, e.kind, e.node_name, "
        "e.node_id, e.invocation_id, e.parent_invocation_ids, e.span_id, e.parent_span_id, "
        "e.attempt, e.queued_ts, e.flow_name, e.latency_ms, e.q_in, e.q_out, e.outgoing, "
        "e.queue_maxsize, e.trace_inflight, e.trace_cancelled, e.trace_pending, e.payload "
        "FROM events e LEFT JOIN traces t ON t.trace_id = e.trace_id "
        "LEFT JOIN flows f ON f.flow_id = e.flow_id ORDER BY e.id",
        "DROP TABLE events",
        "ALTER TABLE events_v3 RENAME TO events",
        "CREATE INDEX events_trace ON events (trace_key, id)",
        "CREATE UNIQUE INDEX events_flow_seq ON events (flow_key, seq)",
    ),
)

# Migration 3 -> 4 (_to_v4, below): events move into blocks (see _blocks.py),
# several per row: a row per event capped ingest at ~80k events/s and a 100k-event
# load_history at ~1.2 s here, whatever the row held (schema 3's figures, see the
# state-stores guide). `first` is the index in its trace of the block's first event
# (its trace's event_count before the batch), so a page of a trace is found on the
# (trace_key, first) index; `ts_lo` / `ts_hi` bound its events' times (retention of
# trace-less events). flow_seqs holds, per flow, the seq numbers stored, as
# disjoint ranges (usually one per flow): a re-delivered event is found there
# instead of in a unique index that every event inserted into.
_V4_TABLES = (
    """CREATE TABLE blocks (
        id INTEGER PRIMARY KEY,
        trace_key INTEGER,
        first INTEGER NOT NULL,
        n INTEGER NOT NULL,
        ts_lo REAL NOT NULL,
        ts_hi REAL NOT NULL,
        data BLOB NOT NULL
    )""",
    "CREATE INDEX blocks_trace ON blocks (trace_key, first)",
    "CREATE TABLE flow_seqs (flow_key INTEGER NOT NULL, lo INTEGER NOT NULL, "
    "hi INTEGER NOT NULL, PRIMARY KEY (flow_key, lo)) WITHOUT ROWID",
)
_INSERT_BLOCK = ("INSERT INTO blocks (trace_key, first, n, ts_lo, ts_hi, data) "
                 "VALUES (?, ?, ?, ?, ?, ?)")
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
    "remote_call_count, event_count, nodes"
)
_BUSY_TIMEOUT_MS = 5000
_BATCH_SIZE = 10_000
_RESOLVE_LIMIT = 10
_UNAVAILABLE_CODES = frozenset({
    sqlite3.SQLITE_PERM, sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_READONLY,
    sqlite3.SQLITE_IOERR, sqlite3.SQLITE_FULL, sqlite3.SQLITE_CANTOPEN,
})
_PATH_FIX = ("pass a writable path: SQLiteStateStore('/path/to/traces.db') or "
             "PENGUIFLOW_STORE=sqlite:////path/to/traces.db")


# -- JSON (node lists, id lists, schema-3 rows) -------------------------------------------

_encode = json.JSONEncoder(separators=(",", ":"), default=str).encode
_decode = json.loads
# -- migration 3 -> 4 -----------------------------------------------------------------------

# A schema-3 row in the layout of the runtime's EVENT_FIELDS tuple (trace_id,
# flow_id by join), `payload` last.
_V3_ROWS = (
    "SELECT t.trace_id, e.ts, e.kind, e.node_name, e.node_id, e.invocation_id, "
    "e.parent_invocation_ids, e.span_id, e.parent_span_id, e.seq, e.attempt, e.queued_ts, "
    "e.flow_name, f.flow_id, e.latency_ms, e.q_in, e.q_out, e.outgoing, e.queue_maxsize, "
    "e.trace_inflight, e.trace_cancelled, e.trace_pending, e.payload, e.trace_key "
    "FROM events e LEFT JOIN traces t ON t.key = e.trace_key "
    "LEFT JOIN flows f ON f.key = e.flow_key ORDER BY e.trace_key, e.id")


def _v3_item(row: Sequence[Any]) -> tuple[Any, ...]:
    """The block item of a schema-3 row: a runtime tuple when its payload was split
    into columns (``q_in`` set), else the whole payload's 15-tuple."""
    parents = tuple(_decode(row[6])) if row[6] != "[]" else ()
    head = (*row[:6], parents, *row[7:14])
    if row[15] is None:  # stored whole (v1 rows, StoredEvents)
        return (*head, _decode(row[22]))
    extra = None if row[22] == "{}" else _decode(row[22])
    return (*head, *row[14:20], bool(row[20]), row[21], extra)


def _to_v4(conn: sqlite3.Connection) -> None:
    """Schema 3 -> 4: events into blocks (in Python: blocks are pickled), flow seq
    ranges from the events' (flow_key, seq), then the events table dropped."""
    for statement in _V4_TABLES:
        conn.execute(statement)
    # Gaps and islands: consecutive seqs of a flow share seq - row_number().
    conn.execute(
        "INSERT INTO flow_seqs SELECT flow_key, min(seq), max(seq) FROM ("
        "SELECT flow_key, seq, seq - row_number() OVER (PARTITION BY flow_key ORDER BY seq) "
        "AS island FROM events WHERE flow_key IS NOT NULL) GROUP BY flow_key, island")
    blocks: list[tuple[Any, ...]] = []
    cursor = conn.execute(_V3_ROWS)
    trace_key: Any = object()
    first = 0
    items: list[tuple[Any, ...]] = []

    def close_block() -> None:
        stamps = [item[1] for item in items]
        blocks.append((trace_key, first, len(items), min(stamps), max(stamps),
                       encode_block(items)))

    while rows := cursor.fetchmany(BLOCK_EVENTS):
        for row in rows:
            if row[23] != trace_key or len(items) == BLOCK_EVENTS:
                if items:
                    close_block()
                first = first + len(items) if row[23] == trace_key else 0
                trace_key, items = row[23], []
            items.append(_v3_item(row))
        conn.executemany(_INSERT_BLOCK, blocks)
        blocks.clear()
    if items:
        close_block()
        conn.executemany(_INSERT_BLOCK, blocks)
    conn.execute("DROP TABLE events")


#: ``_MIGRATIONS[v]`` takes a file from version v to v + 1.
_MIGRATIONS: tuple[tuple[str, ...] | Callable[[sqlite3.Connection], None], ...] = (
    *_SQL_MIGRATIONS, _to_v4)


class _NoWriterProcess(Exception):
    """No writer process could be started (see SQLiteStateStore._store_batch)."""


def _items_of(batch: list[Any]) -> list[tuple[Any, ...]]:
    """The block items of ``batch`` (StoredEvents and runtime tuples), for the thread
    writer."""
    with gc_paused():
        return [item if isinstance(item, tuple) else stored_item(item) for item in expand(batch)]


# -- rows <-> objects ------------------------------------------------------------------


def _summary(row: Sequence[Any]) -> TraceSummary:
    """A TraceSummary from a row of the ``_TRACE_COLUMNS``."""
    (trace_id, flow_name, status, started, ended, node_count, error_count, remote_count,
     event_count, nodes) = row
    return TraceSummary(trace_id, flow_name, status, started, ended, node_count, error_count,
                        remote_count, event_count, tuple(_decode(nodes)))


# -- the store ---------------------------------------------------------------------------


_Item = StoredEvent | tuple[Any, ...]


class SQLiteStateStore(BufferedStore):
    """A :class:`~penguiflow.state.TraceStore` in one SQLite file.

    ``save_event`` only buffers (see :class:`BufferedStore` for batching and the
    full-buffer policy); batches, queries and bindings run on the store's worker
    thread. Every query first flushes the buffer, so it sees every event saved
    before it. Use it as ``async with SQLiteStateStore(path) as store:`` or call
    ``close()``; it opens itself on first use.

    Args:
        path: the database file; its parent directories are created.
        **buffer_kwargs: ``batch_size``, ``max_buffer``, ``flush_interval_s``,
            ``on_full`` (see :class:`BufferedStore`).

    Raises:
        StoreUnavailable: (on open, from any call) the file cannot be created,
            opened or written; or the store is closed.
        StateStoreError: the file is not a database, or was written by a newer
            schema version than :data:`SCHEMA_VERSION`.
    """

    def __init__(self, path: str | os.PathLike[str] = DEFAULT_PATH, *,
                 writer: Literal["process", "thread"] = "process",
                 **buffer_kwargs: Any) -> None:
        if writer not in ("process", "thread"):
            raise ValueError(f"writer must be 'process' or 'thread'; got {writer!r}")
        # Bigger batches than the base's 2,000: fewer commits and WAL page writes
        # (~10% more events/s with 10,000, measured); a batch holds the write lock
        # for ~0.1 s.
        buffer_kwargs.setdefault(
            "batch_size", min(_BATCH_SIZE, buffer_kwargs.get("max_buffer", _BATCH_SIZE)))
        super().__init__(**buffer_kwargs)
        self._takes_fields = True
        self.path = Path(path)
        # Threads are started on first use; the executor is shut down by close().
        self._executor = ThreadPoolExecutor(max_workers=1,
                                            thread_name_prefix="penguiflow-sqlite")
        self._shut_down = False
        #: Owned by the worker thread: only touched from functions run by ``_call``.
        self._conn: sqlite3.Connection | None = None
        #: ``"process"`` or ``"thread"``: where batches are written (see _sqlite_write).
        self.writer = writer
        # The writer process (started by the first batch), or, for writer="thread",
        # the BatchWriter on the worker thread's connection (built on first use).
        self._proc_writer: AsyncWriterProcess | None = (
            None if writer == "thread" else AsyncWriterProcess(
            "penguiflow_exporters._sqlite_write",
                {"path": str(self.path), "terminal": TERMINAL_KINDS, "errors": ERROR_KINDS,
                 "busy_timeout_ms": _BUSY_TIMEOUT_MS}))
        # Started with the first buffered event (see _ensure_writer), not at open():
        # a store opened only to read never starts a writer.
        self._starting: asyncio.Task[None] | None = None
        self._batch_writer: BatchWriter | None = None
        # The runtime's tuples go to the writer process encoded as they come (Sealed).
        self._sealing = self._proc_writer is not None

    def __repr__(self) -> str:
        return f"SQLiteStateStore({str(self.path)!r})"

    # -- worker-thread plumbing ------------------------------------------------------

    async def _call(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run ``fn(*args)`` on the worker thread; translate sqlite3 errors."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except sqlite3.Error as exc:
            raise self._translate(exc) from exc
        except RuntimeError as exc:
            if self._shut_down:  # the executor refused the job: the store was closed meanwhile
                raise StoreUnavailable(f"{self!r} is closed; create a new one") from exc
            raise

    def _translate(self, exc: sqlite3.Error) -> StateStoreError:
        return self._translate_code(getattr(exc, "sqlite_errorcode", None), str(exc))

    def _translate_code(self, code: int | None, exc: str) -> StateStoreError:
        primary = None if code is None else code & 0xFF  # extended codes keep it in the low byte
        if primary in _UNAVAILABLE_CODES:
            if primary in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                fix = (f"another connection held the write lock for more than "
                       f"{_BUSY_TIMEOUT_MS / 1000:g} s")
            elif primary in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR):
                fix = "check the disk (full or failing)"
            else:
                fix = _PATH_FIX
            return StoreUnavailable(f"SQLite store {str(self.path)!r}: {exc}; {fix}")
        if primary == sqlite3.SQLITE_NOTADB:
            return StateStoreError(f"SQLite store {str(self.path)!r}: {exc}; the file is not a "
                                   f"penguiflow trace database, {_PATH_FIX}")
        return StateStoreError(f"SQLite store {str(self.path)!r}: {exc}")

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreUnavailable(f"{self!r} is closed; create a new one")
        return self._conn

    # -- lifecycle ---------------------------------------------------------------------

    async def _open(self) -> None:
        await self._call(self._open_sync)

    def _open_sync(self) -> None:
        if self._conn is not None:  # two opens raced; both ran here, in turn
            return
        path = self.path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailable(
                f"SQLite store {str(path)!r}: cannot create the directory "
                f"{str(path.parent)!r} ({exc.strerror or exc}); {_PATH_FIX}") from exc
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE below).
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            # Applies to a new file only (before its first table). Schema 3's indexes
            # are appended to, so big pages mean fewer page splits and WAL frames per
            # batch: 64 KiB (the maximum) ingested ~10-20% faster than 16 KiB, itself
            # ~20% faster than the default 4 KiB, into fresh files and into one holding
            # 1M events alike (measured on the 2-core CI machine).
            conn.execute("PRAGMA page_size = 65536")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            self._migrate(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")  # two processes opening a new file migrate once
        try:
            # applied_ts: epoch seconds (unixepoch() needs SQLite 3.38).
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL, "
                         "applied_ts REAL NOT NULL "
                         "DEFAULT ((julianday('now') - 2440587.5) * 86400.0))")
            (current,) = conn.execute(
                "SELECT ifnull(max(version), 0) FROM schema_version").fetchone()
            if current > SCHEMA_VERSION:
                raise StateStoreError(
                    f"SQLite store {str(self.path)!r} has schema version {current}, newer than "
                    f"this penguiflow-exporters supports ({SCHEMA_VERSION}); upgrade "
                    f"penguiflow-exporters or use another path")
            for version in range(current, SCHEMA_VERSION):
                migration = _MIGRATIONS[version]
                if callable(migration):
                    migration(conn)
                else:
                    for statement in migration:
                        conn.execute(statement)
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version + 1,))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    async def _close(self) -> None:
        if self._starting is not None:
            await asyncio.wait([self._starting])
        if self._proc_writer is not None:
            await self._proc_writer.close()
        await self._call(self._close_sync)

    async def close(self) -> None:
        """Flush what is buffered, close the file and stop the worker thread; idempotent."""
        try:
            if not self._closed and not self._opened and (self._buffer or self._tail):
                # BufferedStore.close() flushes an opened store only, and a store
                # opens lazily on its first write: events saved just before close()
                # would be dropped. flush() opens it (or logs and counts the loss).
                await self.flush()
            await super().close()
        finally:
            # Also when the store never opened (its thread may have tried). The
            # thread is idle once the connection is closed: no need to wait for it.
            self._shut_down = True
            self._executor.shutdown(wait=False)

    def _close_sync(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- writes ------------------------------------------------------------------------

    async def flush(self) -> None:
        """Write everything buffered so far, and wait for batches being written.

        Raises:
            StoreUnavailable: the store was opened and is closed.
        """
        if self._closed and self._opened:
            raise StoreUnavailable(f"{self!r} is closed; create a new one")
        await super().flush()

    async def _prepare(self, batch: list[Any]) -> tuple[list[_Item], Any, bool]:
        """``batch`` ready for the writer: its block items, or its blocks (encoded) for
        the writer process.

        ``batch`` may hold the runtime's EVENT_FIELDS tuples (``_takes_fields``):
        they are written as they are, never as StoredEvents. Runs on the event loop
        while the writer commits the previous batch (see writer_payload).
        """
        if self._proc_writer is None:
            return batch, _items_of(batch), False
        data, grouped = await writer_payload(batch)
        return batch, data, grouped

    def _ensure_writer(self) -> None:
        super()._ensure_writer()
        if self._proc_writer is not None and self._starting is None:
            # Start the writer process while the first batch fills (~0.05 s).
            self._starting = asyncio.get_running_loop().create_task(self._start_writer())

    async def _start_writer(self) -> None:
        assert self._proc_writer is not None
        # A failure here is not lost: the first batch starts it again, and reports.
        with contextlib.suppress(Exception):
            await self.open()
            await self._proc_writer.start()

    async def _write(self, prepared: tuple[list[_Item], Any, bool]
                     ) -> Sequence[StoredEvent | tuple[Any, ...]]:
        """Store a prepared batch as blocks and fold it into ``traces``; one transaction.

        Returns:
            The events actually stored, in order, as buffered: those whose
            ``(flow_id, seq)`` was not stored before (first occurrence within the
            batch), and every event without a flow id.
        """
        batch, data, grouped = prepared
        if self._proc_writer is not None:
            try:
                skipped = await self._store_batch(data)
            except _NoWriterProcess:
                # Written here instead, as writer="thread" would: nothing is lost.
                skipped, grouped = await self._store_batch(_items_of(batch)), False
        else:
            skipped = await self._store_batch(data)
        # Positions are the blocks' (grouped by trace) when the batch went as blocks.
        return kept_items(batch, skipped, grouped=grouped)

    async def _store_batch(self, data: Any) -> list[int] | None:
        """Have the writer store a prepared batch; the positions it skipped, if any.

        Raises:
            _NoWriterProcess: no writer process could be started; the store writes
                on its worker thread from now on (logged once).
        """
        writer = self._proc_writer
        if writer is None:
            return await self._call(self._write_sync, data)
        try:
            skipped: list[int] | None = await writer.request(b"W", data)
        except WriterError as exc:
            if exc.starting and exc.gone:  # no process (not: a database error in one)
                self._proc_writer = None
                self._sealing = False
                logger.warning("state_store_writer_process_unavailable", extra={
                    "store": repr(self), "error": str(exc),
                    "fallback": "writing on the store's worker thread (writer='thread')"})
                raise _NoWriterProcess from exc
            raise self._writer_error(exc) from exc
        return skipped

    def _write_sync(self, items: list[tuple[Any, ...]]) -> list[int] | None:
        # The batch allocates a tuple per event and a block per trace: with a big heap
        # (a flow's messages, a buffer of events), the collections those allocations
        # trigger cost more than the batch (~40% of an import, measured).
        with gc_paused():
            return self._thread_writer().write(items)

    def _thread_writer(self) -> BatchWriter:
        if self._batch_writer is None:
            self._batch_writer = BatchWriter(self._connection(), terminal=TERMINAL_KINDS,
                                             errors=ERROR_KINDS)
        return self._batch_writer

    def _writer_error(self, exc: WriterError) -> StateStoreError:
        if exc.gone:
            return StoreUnavailable(
                f"SQLite store {str(self.path)!r}: {exc}; the batch was not stored, and "
                f"the next one starts a new writer (or pass writer='thread')")
        return self._translate_code(exc.code, str(exc))

    async def save_remote_binding(self, binding: RemoteBinding) -> None:
        """Store a binding, once (an identical one is ignored); written at once, not buffered."""
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

        The skipped rows are walked on the ``(trace_id, id)`` index, not decoded.

        Raises:
            ValueError: ``limit < 1`` or ``offset < 0``.
        """
        check_page(offset, limit)
        return await self._query(self._load_history_sync, trace_id, offset, limit)

    def _load_history_sync(self, trace_id: str, offset: int = 0,
                           limit: int | None = None) -> list[StoredEvent]:
        conn = self._connection()
        with gc_paused():
            try:
                if limit is None:
                    events: list[StoredEvent] = []
                    for (data,) in conn.execute(_SELECT_BLOCKS, (trace_id,)):
                        events += events_of(decode_block(data))
                    return events
                return self._page(conn, trace_id, offset, offset + limit)
            except StateStoreError as exc:
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
