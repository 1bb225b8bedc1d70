"""SQLiteStateStore: a TraceStore in one SQLite file (stdlib ``sqlite3``).

Threading. ``sqlite3`` calls block, so every one of them runs on ONE worker
thread that owns the connection (a single-thread executor); coroutines await it
with ``run_in_executor`` and the event loop never waits on the disk. One thread,
not a pool: the jobs then run in submission order, so a query submitted after a
flush reads what the flush wrote (read-your-writes), and ``close()`` runs after
every job already submitted. JSON encoding and decoding run on that thread too:
it holds the GIL, but the loop gets it back every switch interval (5 ms) instead
of waiting for a whole batch.

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
import json
import json.decoder
import json.encoder
import json.scanner
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import chain, islice
from pathlib import Path
from typing import Any, TypeVar

from penguiflow._memory_store import check_page
from penguiflow.metrics import event_payload
from penguiflow.state import (
    RemoteBinding,
    StateStoreError,
    StoredEvent,
    StoreUnavailable,
    TraceFilter,
    TraceSummary,
)

from ._buffered import BufferedStore
from ._columns import runtime_columns
from ._fold import fold_rows, status_of
from ._gc import gc_paused

_NO_EXTRA: Mapping[str, Any] = {}

__all__ = ["DEFAULT_PATH", "SCHEMA_VERSION", "SQLiteStateStore"]

#: Where the store lives when no path is given (relative to the working directory).
DEFAULT_PATH = ".penguiflow/traces.db"

#: The schema this module writes; ``_MIGRATIONS[v]`` takes a file from v to v + 1.
SCHEMA_VERSION = 3

_T = TypeVar("_T")

_MIGRATIONS: tuple[tuple[str, ...], ...] = (
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

# Columns after `id`, in the order of the rows _event_rows builds (trace_key and
# flow_key are trace_id and flow_id there, replaced by their keys under the lock).
_EVENT_COLUMNS = (
    "trace_key, flow_key, seq, ts, kind, node_name, node_id, invocation_id, "
    "parent_invocation_ids, span_id, parent_span_id, attempt, queued_ts, flow_name, "
    "latency_ms, q_in, q_out, outgoing, queue_maxsize, trace_inflight, trace_cancelled, "
    "trace_pending, payload")
# Plain INSERT: a re-delivered event fails UNIQUE (flow_key, seq) and the batch is
# retried row by row with INSERT OR IGNORE (see _write_sync).
_INSERT_EVENT = f"INSERT INTO events ({_EVENT_COLUMNS}) VALUES ({', '.join('?' * 23)})"
_INSERT_EVENT_OR_IGNORE = _INSERT_EVENT.replace("INSERT", "INSERT OR IGNORE", 1)
# Rows per INSERT statement on the fast path. One multi-row VALUES statement per
# _ROWS_PER_INSERT events instead of executemany's bind/step/reset per event: ~1.5x
# the rows/s on the CI machine (executemany spends ~4 us per row outside SQLite's
# own work); 64 x 23 parameters stay far below SQLite's 32,766.
_ROWS_PER_INSERT = 64
_INSERT_EVENTS = _INSERT_EVENT + (", (" + ", ".join("?" * 23) + ")") * (_ROWS_PER_INSERT - 1)
_SELECT_EVENTS = (
    # No trace_id column: it is the argument (one str less per row).
    "SELECT e.ts, e.kind, e.node_name, e.node_id, e.payload, e.invocation_id, "
    "e.parent_invocation_ids, e.span_id, e.parent_span_id, e.seq, e.attempt, e.queued_ts, "
    "e.flow_name, f.flow_id, e.latency_ms, e.q_in, e.q_out, e.outgoing, e.queue_maxsize, "
    "e.trace_inflight, e.trace_cancelled, e.trace_pending FROM events e "
    "LEFT JOIN flows f ON f.key = e.flow_key "
    "WHERE e.trace_key = (SELECT key FROM traces WHERE trace_id = ?) ORDER BY e.id"
)
_TRACE_COLUMNS = (
    "trace_id, flow_name, status, started_ts, ended_ts, node_count, error_count, "
    "remote_call_count, event_count, nodes"
)
# A batch's summaries are folded in Python (_fold.fold_rows) while its rows are at hand: one
# row per trace reaches SQLite instead of a GROUP BY over the batch's events with
# two correlated sub-queries per trace (~4 us per event, measured). New traces are
# inserted whole, in order of their first event (their key is list_traces'
# tie-break); stored ones are merged here, with TraceSummaryBuilder's semantics.
_INSERT_TRACE = (
    f"INSERT INTO traces (key, {_TRACE_COLUMNS}, open_count, failed, cancelled) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
_UPDATE_TRACE = (
    "UPDATE traces SET flow_name = ifnull(flow_name, ?1), "
    "status = CASE WHEN cancelled OR ?2 THEN 'cancelled' WHEN failed OR ?3 THEN 'failed' "
    "WHEN open_count + ?4 > 0 THEN 'running' ELSE 'succeeded' END, "
    "started_ts = min(started_ts, ?5), ended_ts = max(ended_ts, ?6), "
    "node_count = node_count + ?7, error_count = error_count + ?8, "
    "remote_call_count = remote_call_count + ?9, event_count = event_count + ?10, "
    "nodes = CASE WHEN ?11 = '[]' OR ?11 = nodes THEN nodes "
    "ELSE (SELECT json_group_array(value) FROM (SELECT value FROM json_each(nodes) "
    "UNION SELECT value FROM json_each(?11) ORDER BY 1)) END, "
    "open_count = open_count + ?4, failed = failed OR ?3, cancelled = cancelled OR ?2 "
    "WHERE key = ?12 AND trace_id = ?13")
# Keys cached per store (keys never change once committed); cleared past this size.
_KEY_CACHE_MAX = 100_000
_BUSY_TIMEOUT_MS = 5000
_BATCH_SIZE = 10_000
_RESOLVE_LIMIT = 10
# Rows decoded per json call: the scanner memoises object keys within a call, so
# payloads share their key strings and the call overhead is paid once per chunk
# (~1.3x faster than a call per payload, measured); bounded because the C call
# holds the GIL.
_DECODE_CHUNK = 1000

_UNAVAILABLE_CODES = frozenset({
    sqlite3.SQLITE_PERM, sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_READONLY,
    sqlite3.SQLITE_IOERR, sqlite3.SQLITE_FULL, sqlite3.SQLITE_CANTOPEN,
})
_PATH_FIX = ("pass a writable path: SQLiteStateStore('/path/to/traces.db') or "
             "PENGUIFLOW_STORE=sqlite:////path/to/traces.db")


# -- JSON ------------------------------------------------------------------------------


def _json_default(obj: Any) -> Any:
    """Make what the json module cannot encode encodable (never raises)."""
    # Payloads may hold read-only mappings (FlowEvent.extra) and sets; anything
    # else is stored as its str(), like logging does, rather than failing a batch.
    if isinstance(obj, Mapping):
        return dict(obj)
    if isinstance(obj, set | frozenset):
        return list(obj)
    return str(obj)


def _make_encoder() -> Callable[[Any], str]:
    c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
    if c_make_encoder is None:  # no C accelerator (e.g. PyPy)
        return json.JSONEncoder(default=_json_default, separators=(",", ":")).encode
    # json.dumps builds a new C encoder on every call; building it once is 35% faster
    # per payload (2.1 vs 2.9 us, measured). No circular-reference markers: a cycle
    # raises RecursionError, which the per-event fallback below handles.
    iterencode = c_make_encoder(None, _json_default, json.encoder.encode_basestring_ascii,
                                None, ":", ",", False, False, True)
    join = "".join

    def encode(obj: Any) -> str:
        return join(iterencode(obj, 0))

    return encode


def _make_decoder() -> Callable[[str], Any]:
    c_make_scanner = getattr(json.scanner, "c_make_scanner", None)
    loads = json.loads
    if c_make_scanner is None:
        return loads
    # json.loads wraps the C scanner in two regex calls for surrounding whitespace;
    # scanning directly decodes ~30% faster (what keeps a 100k-event load_history
    # under a second). Text with surrounding whitespace (written by someone else)
    # takes the json.loads path.
    scan = c_make_scanner(json.decoder.JSONDecoder())

    def decode(text: str) -> Any:
        try:
            obj, end = scan(text, 0)
        except StopIteration:
            return loads(text)
        return obj if end == len(text) else loads(text)

    return decode


_encode = _make_encoder()
_decode = _make_decoder()


def _encode_safely(payload: Mapping[str, Any]) -> str:
    """Encode a payload the fast encoder refused (cycle, tuple keys): value by value."""
    try:
        return _encode(payload)
    except (TypeError, ValueError, RecursionError):
        pass
    items: dict[str, Any] = {}
    for key, value in payload.items():
        try:
            _encode(value)
        except (TypeError, ValueError, RecursionError):
            value = repr(value)
        items[str(key)] = value
    return _encode(items)


_NO_COLUMNS: tuple[Any, ...] = (None,) * 8


def _event_rows(batch: Iterable[StoredEvent | tuple[Any, ...]], *,
                safe: bool = False) -> list[tuple[Any, ...]]:
    """The ``_INSERT_EVENT`` parameters of ``batch``, with ``trace_id`` and ``flow_id``
    where their keys go; ``safe`` never raises on odd values.

    ``batch`` holds StoredEvents and the runtime's EVENT_FIELDS tuples. A tuple
    becomes a row by replacing only ``parents`` and ``extra`` with their JSON: no
    payload dict, no StoredEvent (this loop holds the GIL, which the flow's event
    loop is waiting for). A StoredEvent's payload is stored whole, runtime columns
    NULL, unless it is exactly a runtime payload (see _columns).
    """
    encode, encode_payload = _encode, _encode_safely if safe else _encode
    rows: list[tuple[Any, ...]] = []
    append = rows.append
    for ev in batch:
        if type(ev) is tuple:
            (trace_id, ts, kind, node_name, node_id, invocation_id, parents, span_id,
             parent_span_id, seq, attempt, queued_ts, flow_name, flow_id, latency_ms, q_in,
             q_out, outgoing, maxsize, inflight, cancelled, pending, extra) = ev
            append((trace_id, flow_id, seq, ts, kind, node_name, node_id, invocation_id,
                    encode(parents) if parents else "[]", span_id, parent_span_id,
                    attempt, queued_ts, flow_name, latency_ms, q_in, q_out, outgoing,
                    maxsize, inflight, cancelled, pending,
                    encode_payload(extra) if extra else "{}"))
        else:
            assert isinstance(ev, StoredEvent)
            columns = runtime_columns(ev)
            if columns is None:  # not a runtime payload: stored whole
                runtime: tuple[Any, ...] = _NO_COLUMNS
                payload: Any = ev.payload
            else:
                runtime, payload = columns[:8], columns[8]
            append((ev.trace_id, ev.flow_id, ev.seq, ev.ts, ev.kind, ev.node_name, ev.node_id,
                    ev.invocation_id,
                    encode(ev.parent_invocation_ids) if ev.parent_invocation_ids else "[]",
                    ev.span_id, ev.parent_span_id, ev.attempt, ev.queued_ts, ev.flow_name,
                    *runtime, encode_payload(payload) if payload else "{}"))
    return rows


def _keyed(rows: Iterable[tuple[Any, ...]], trace_keys: Mapping[Any, int],
           flow_keys: Mapping[Any, int]) -> Iterator[tuple[Any, ...]]:
    """``rows`` with their trace and flow ids replaced by keys (None stays None)."""
    tk, fk = trace_keys.get, flow_keys.get
    for row in rows:
        yield (tk(row[0]), fk(row[1]), *row[2:])


def _insert_all(conn: sqlite3.Connection, rows: Iterator[tuple[Any, ...]], count: int) -> None:
    """Insert ``count`` keyed ``rows``, ``_ROWS_PER_INSERT`` per statement."""
    per = _ROWS_PER_INSERT
    execute, flat = conn.execute, chain.from_iterable
    for _ in range(count // per):
        execute(_INSERT_EVENTS, tuple(flat(islice(rows, per))))
    conn.executemany(_INSERT_EVENT, rows)  # the rest


class _StaleKeys(Exception):
    """A cached trace key no longer names its trace (rolled back, retried uncached)."""


def _barrier() -> None:
    """An empty worker-thread job: awaiting it waits for every job submitted before."""


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

    def __init__(self, path: str | os.PathLike[str] = DEFAULT_PATH,
                 **buffer_kwargs: Any) -> None:
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
        # Committed trace and flow keys (worker thread only); see _keys.
        self._trace_keys: dict[Any, int] = {}
        self._flow_keys: dict[Any, int] = {}

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
        code = getattr(exc, "sqlite_errorcode", None)
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
                for statement in _MIGRATIONS[version]:
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version + 1,))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    async def _close(self) -> None:
        await self._call(self._close_sync)

    async def close(self) -> None:
        """Flush what is buffered, close the file and stop the worker thread; idempotent."""
        try:
            if not self._closed and not self._opened and self._buffer:
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
        """Write everything buffered so far, including a batch being written, then return.

        Raises:
            StoreUnavailable: the store is closed.
        """
        await super().flush()
        if self._opened:
            # BufferedStore.flush() returns once the buffer is empty, while the
            # background writer may still be writing the batch it took. Jobs run in
            # submission order, so an empty job returns after that batch is committed.
            await self._call(_barrier)

    async def _write(self, batch: list[Any]
                     ) -> Sequence[StoredEvent | tuple[Any, ...]]:
        """Insert ``batch`` and fold its new events into ``traces``; one transaction.

        ``batch`` may hold the runtime's EVENT_FIELDS tuples (``_takes_fields``):
        they become rows on the worker thread, never StoredEvents.

        Returns:
            The events actually stored, in order: those whose ``event_key`` was
            not stored before (first occurrence within the batch), and every event
            without a key.
        """
        return await self._call(self._write_sync, batch)

    def _write_sync(self, batch: list[_Item]) -> list[_Item]:
        conn = self._connection()
        # Encoded before taking the write lock, so other writers wait less.
        try:
            rows = _event_rows(batch)
        except (TypeError, ValueError, RecursionError):
            rows = _event_rows(batch, safe=True)
        fast = True
        while True:
            try:
                # Optimistic: re-deliveries are rare, so insert the whole batch and
                # let UNIQUE (flow_key, seq) catch one; then the transaction is rolled
                # back and the batch retried row by row with INSERT OR IGNORE.
                return self._store_rows(conn, batch, rows, fast=fast)
            except sqlite3.IntegrityError:
                if not fast:
                    raise
                fast = False
            except _StaleKeys:
                self._trace_keys.clear()
                self._flow_keys.clear()

    def _store_rows(self, conn: sqlite3.Connection, batch: list[_Item],
                    rows: list[tuple[Any, ...]], *, fast: bool) -> list[_Item]:
        """Insert ``rows`` (of ``batch``) and fold them into ``traces``; one transaction.

        ``fast``: one executemany, raising IntegrityError on a stored (or repeated)
        event key. Otherwise row by row, skipping those (and rows SQLite refuses).
        """
        conn.execute("BEGIN IMMEDIATE")
        try:
            trace_keys, new_traces, flow_keys, new_flows = self._keys(conn, rows)
            if fast:
                _insert_all(conn, _keyed(rows, trace_keys, flow_keys), len(rows))
                new, kept = batch, rows
            else:
                new, kept = [], []
                execute = conn.execute
                for item, row, keyed in zip(batch, rows, _keyed(rows, trace_keys, flow_keys),
                                            strict=True):
                    before = conn.total_changes
                    execute(_INSERT_EVENT_OR_IGNORE, keyed)
                    if conn.total_changes != before:
                        new.append(item)
                        kept.append(row)
            folds = fold_rows(kept, 0, 3, 4, 5, 11, 13)
            inserts: list[tuple[Any, ...]] = []
            updates: list[tuple[Any, ...]] = []
            for trace_id, (flow_name, started, ended, starts, errors, remotes, count, opened,
                           failed, cancelled, nodes) in folds.items():
                names = _encode(sorted(nodes)) if nodes else "[]"
                if trace_id in new_traces:
                    inserts.append((trace_keys[trace_id], trace_id, flow_name,
                                    status_of(cancelled, failed, opened), started, ended,
                                    starts, errors, remotes, count, names, opened,
                                    int(failed), int(cancelled)))
                else:
                    updates.append((flow_name, int(cancelled), int(failed), opened, started,
                                    ended, starts, errors, remotes, count, names,
                                    trace_keys[trace_id], trace_id))
            if inserts:
                conn.executemany(_INSERT_TRACE, inserts)
            if updates:
                before = conn.total_changes
                conn.executemany(_UPDATE_TRACE, updates)
                if conn.total_changes - before != len(updates):
                    # A cached key whose trace was deleted meanwhile (retention, see
                    # the guide), its key possibly reused: start again from the file.
                    raise _StaleKeys
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        # Committed: the new keys are now everyone's.
        for cache, added in ((self._trace_keys, new_traces), (self._flow_keys, new_flows)):
            if len(cache) + len(added) > _KEY_CACHE_MAX:
                cache.clear()
            cache.update(added)
        return new

    def _keys(self, conn: sqlite3.Connection, rows: list[tuple[Any, ...]]
              ) -> tuple[dict[Any, int], dict[Any, int], dict[Any, int], dict[Any, int]]:
        """Trace and flow keys of ``rows`` (under the write lock), and those new here.

        Keys already committed come from the cache or the file (another process may
        have stored the trace); new ones are numbered after the largest key, in order
        of first appearance. New flows are inserted here, new traces by the fold.
        """
        trace_ids = dict.fromkeys(row[0] for row in rows)
        flow_ids = dict.fromkeys(row[1] for row in rows)
        trace_keys, new_traces = self._resolve(conn, trace_ids, self._trace_keys, "traces",
                                               "trace_id")
        flow_keys, new_flows = self._resolve(conn, flow_ids, self._flow_keys, "flows",
                                             "flow_id")
        if new_flows:
            conn.executemany("INSERT INTO flows (key, flow_id) VALUES (?, ?)",
                             [(key, flow_id) for flow_id, key in new_flows.items()])
        return trace_keys, new_traces, flow_keys, new_flows

    @staticmethod
    def _resolve(conn: sqlite3.Connection, ids: dict[Any, None], cache: dict[Any, int],
                 table: str, column: str) -> tuple[dict[Any, int], dict[Any, int]]:
        ids.pop(None, None)
        keys = {i: cache[i] for i in ids if i in cache}
        if len(keys) == len(ids):
            return keys, {}
        missing = [i for i in ids if i not in keys]
        # Table and column names are the constants passed by _keys.
        keys.update(conn.execute(
            f"SELECT {column}, key FROM {table} WHERE {column} IN "
            f"(SELECT value FROM json_each(?))", (_encode(missing),)))
        cache.update((i, keys[i]) for i in missing if i in keys)
        (last,) = conn.execute(f"SELECT ifnull(max(key), 0) FROM {table}").fetchone()
        new = {i: last + n for n, i in enumerate((i for i in missing if i not in keys), 1)}
        keys.update(new)
        return keys, new

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
        with gc_paused():
            return self._decode_history(trace_id, offset, limit)

    def _decode_history(self, trace_id: str, offset: int,
                        limit: int | None) -> list[StoredEvent]:
        if limit is None:
            cursor = self._connection().execute(_SELECT_EVENTS, (trace_id,))
        else:
            cursor = self._connection().execute(_SELECT_EVENTS + " LIMIT ? OFFSET ?",
                                                (trace_id, limit, offset))
        events: list[StoredEvent] = []
        append = events.append
        decode, payload_of, no_extra = _decode, event_payload, _NO_EXTRA
        # Chunk by chunk rather than fetchall(): the row tuples die young, so at most
        # a chunk of them is alive besides the events.
        while rows := cursor.fetchmany(_DECODE_CHUNK):
            try:
                for (ts, kind, node_name, node_id, payload, invocation_id, parents, span_id,
                     parent_span_id, seq, attempt, queued_ts, flow_name, flow_id, latency_ms,
                     q_in, q_out, outgoing, maxsize, inflight, cancelled, pending) in rows:
                    if q_in is None:  # the whole payload was stored (v1 rows, StoredEvents)
                        full = decode(payload)
                    else:  # runtime columns + extra: rebuilt as the runtime built it
                        full = payload_of(kind, ts, node_name, node_id, trace_id, latency_ms,
                                          q_in, q_out, outgoing, maxsize, attempt, inflight,
                                          bool(cancelled), pending,
                                          no_extra if payload == "{}" else decode(payload))
                    append(StoredEvent(
                        trace_id, ts, kind, node_name, node_id, full,
                        invocation_id=invocation_id,
                        parent_invocation_ids=(() if parents == "[]" else tuple(decode(parents))),
                        span_id=span_id, parent_span_id=parent_span_id, seq=seq,
                        attempt=attempt, queued_ts=queued_ts, flow_name=flow_name,
                        flow_id=flow_id))
            except ValueError as exc:
                raise StateStoreError(f"SQLite store {str(self.path)!r}: an event of trace "
                                      f"{trace_id!r} has a corrupt payload ({exc})") from exc
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
