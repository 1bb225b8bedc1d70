"""The SQLite store's schema and writer (stdlib only: a writer process runs it).

:class:`SQLiteWriter` stores one batch of :class:`~._records.Row` in one
transaction. :class:`~penguiflow_exporters.sqlite.SQLiteStateStore` runs it in a
child process (``writer="process"``, the default, through ``_writer_proc``) or on a
thread of its own (``writer="thread"``).

Schema (version 5, :data:`SCHEMA_VERSION`):

* ``traces``: one summary row per trace, folded from each batch's new events in
  Python (``_folds.fold_rows``); ``key`` numbers traces in order of first event.
* ``blocks``: the events, as JSON column blocks (``_blocks``), one row per trace
  per batch (at most 2,000 events); ``first`` is the index in its trace of the
  block's first event, so a page of a trace seeks on ``(trace_key, first)``.
* ``flows`` and ``flow_seqs``: per flow, the seqs stored as disjoint ranges, so a
  re-delivered event is stored once.
* ``bindings``: remote bindings; ``schema_version``: one row per version applied.

:func:`migrate` creates version 5 in an empty file and upgrades version 4 (the
layout before, with pickled blocks: decoded by a restricted unpickler, once,
re-encoded as JSON) in one transaction. Any other file (another version, or a
database that is not a penguiflow one) is refused with :class:`SchemaError`, and
left unchanged.

File identity. A writer remembers the device and inode of the file it opened and
checks them before each batch: a file deleted or replaced under a running store
is reopened (a notice the processor logs and counts as ``file_replaced``), never
written into an unlinked inode for ever. The WAL is checkpointed whenever it
passes :data:`WAL_CHECKPOINT_BYTES` (on a thread of its own, so its syncs overlap
the next batch), and truncated to that size.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ._blocks import block_rows, group_by_trace
from ._folds import Fold, fold_rows, split_fresh
from ._records import (
    _FLOW_ID,
    _TRACE_ID,
    BlockError,
    Ranges,
    RowLike,
    WriteReply,
    check_rows,
    loads_rows,
    reading_events,
    select,
    values_of,
)
from ._serve import serve

__all__ = ["SCHEMA_VERSION", "SQLiteWriter", "SchemaError", "check_schema", "connect",
           "file_identity", "main", "schema_version_of",
           "migrate", "release"]

#: The schema version this module writes.
SCHEMA_VERSION = 5
#: The WAL size past which a writer checkpoints, and to which SQLite truncates it.
WAL_CHECKPOINT_BYTES = 4 << 20
#: The WAL size past which a writer checkpoints at once, not waiting for its
#: background checkpoint (see SQLiteWriter._maintain_wal).
WAL_HARD_BYTES = 3 * WAL_CHECKPOINT_BYTES
_CHECKPOINT_ROUNDS = 4
#: How long a truncating checkpoint waits for readers to move to the latest commit.
TRUNCATE_WAIT_MS = 50
BUSY_TIMEOUT_MS = 5000
#: The page size of a new file.
PAGE_SIZE = 65536

_TABLES = (
    """CREATE TABLE traces (
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
        cancelled INTEGER NOT NULL,
        events_lost INTEGER NOT NULL DEFAULT 0
    )""",
    "CREATE INDEX traces_started ON traces (started_ts)",
    "CREATE TABLE flows (key INTEGER PRIMARY KEY, flow_id TEXT NOT NULL UNIQUE)",
    """CREATE TABLE blocks (
        id INTEGER PRIMARY KEY,
        trace_key INTEGER,
        first INTEGER NOT NULL,
        n INTEGER NOT NULL,
        ts_lo REAL NOT NULL,
        ts_hi REAL NOT NULL,
        data TEXT NOT NULL
    )""",
    "CREATE INDEX blocks_trace ON blocks (trace_key, first)",
    "CREATE TABLE flow_seqs (flow_key INTEGER NOT NULL, lo INTEGER NOT NULL, "
    "hi INTEGER NOT NULL, PRIMARY KEY (flow_key, lo)) WITHOUT ROWID",
    "CREATE TABLE bindings (id INTEGER PRIMARY KEY, trace_id TEXT NOT NULL, "
    "context_id TEXT, task_id TEXT, agent_url TEXT)",
    "CREATE UNIQUE INDEX bindings_ids ON bindings (trace_id, ifnull(context_id, x''), "
    "ifnull(task_id, x''), ifnull(agent_url, x''))",
    "CREATE INDEX bindings_context ON bindings (context_id)",
    "CREATE INDEX bindings_task ON bindings (task_id)",
)
_SCHEMA_VERSION_TABLE = (
    "CREATE TABLE schema_version (version INTEGER NOT NULL, applied_ts REAL NOT NULL "
    "DEFAULT ((julianday('now') - 2440587.5) * 86400.0))")
# The tables a version-4 file has (besides schema_version); see _to_v5.
_V4_TABLES = frozenset({"traces", "flows", "blocks", "flow_seqs", "bindings"})


class SchemaError(Exception):
    """The file is not a penguiflow trace database this version can use (unchanged)."""


def schema_version_of(conn: sqlite3.Connection) -> int | None:
    """The file's schema version: 0 for an empty database, None for a foreign one.

    Foreign: tables but no ``schema_version``, or one penguiflow never writes: no
    ``version`` column, no row (a migration commits its row with its tables), a
    version that is not a whole number (``'alembic-123'``, a blob, ``1e999``), or
    version 4 or 5 without the tables they have. Another application's table of
    that name must be refused, not read as ours (nor written into)."""
    tables = {name for (name,) in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")}
    if not tables:
        return 0
    if "schema_version" not in tables:
        return None
    try:
        versions = {version for (version,) in conn.execute(
            "SELECT DISTINCT typeof(version) FROM schema_version")}
        (version,) = conn.execute("SELECT max(version) FROM schema_version").fetchone()
    except sqlite3.OperationalError:  # no version column
        return None
    if versions != {"integer"} or type(version) is not int or version < 1:
        return None
    if version in (4, SCHEMA_VERSION) and not _V4_TABLES.issubset(tables):
        return None
    return version


def check_schema(conn: sqlite3.Connection, path: str) -> None:
    """Refuse (:class:`SchemaError`) a file a reader cannot read; never writes."""
    version = schema_version_of(conn)
    if version == SCHEMA_VERSION:
        return
    if version == 0:
        raise SchemaError(f"{path!r} holds no penguiflow traces (an empty database); "
                          "point the reader at a store a flow has written")
    if version is None:
        raise SchemaError(f"{path!r} is not a penguiflow trace database (it has other "
                          "tables); point the reader at a penguiflow store")
    if version == 4:
        raise SchemaError(f"{path!r} has schema version 4; open it once with a writing "
                          "store (e.g. run a flow with it, or `pf migrate` it) to upgrade "
                          f"it to {SCHEMA_VERSION}, then read it")
    raise SchemaError(_unsupported(path, version))


def _unsupported(path: str, version: int) -> str:
    if version > SCHEMA_VERSION:
        return (f"{path!r} has schema version {version}, newer than this "
                f"penguiflow-exporters supports ({SCHEMA_VERSION}); upgrade "
                "penguiflow-exporters or use another path")
    return (f"{path!r} has schema version {version}, which this penguiflow-exporters "
            f"cannot upgrade (only version 4 is migrated to {SCHEMA_VERSION}); "
            "start a new store at another path")


def migrate(conn: sqlite3.Connection, path: str) -> None:
    """Create the schema in an empty file, or upgrade version 4; else SchemaError.

    One ``BEGIN IMMEDIATE`` transaction, so two processes opening a new file migrate
    it once, and a refused or failed migration leaves the file as it was.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = schema_version_of(conn)
        if version == SCHEMA_VERSION:
            conn.execute("COMMIT")
            return
        if version is None:
            raise SchemaError(f"{path!r} is not a penguiflow trace database (it has other "
                              "tables); use another path")
        if version == 0:
            conn.execute(_SCHEMA_VERSION_TABLE)
            for statement in _TABLES:
                conn.execute(statement)
        elif version == 4:
            _to_v5(conn)
        else:
            raise SchemaError(_unsupported(path, version))
        conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _to_v5(conn: sqlite3.Connection) -> None:
    """Version 4 -> 5: blocks re-encoded from pickle to JSON; traces gain events_lost."""
    from ._blocks import encode_block
    from ._legacy_v4 import decode_v4_block  # only ever needed here

    conn.execute("ALTER TABLE traces ADD COLUMN events_lost INTEGER NOT NULL DEFAULT 0")
    conn.execute("CREATE TABLE blocks_v5 (id INTEGER PRIMARY KEY, trace_key INTEGER, "
                 "first INTEGER NOT NULL, n INTEGER NOT NULL, ts_lo REAL NOT NULL, "
                 "ts_hi REAL NOT NULL, data TEXT NOT NULL)")
    rows = conn.execute("SELECT id, trace_key, first, n, ts_lo, ts_hi, data FROM blocks "
                        "ORDER BY id")
    for block_id, trace_key, first, n, ts_lo, ts_hi, data in rows.fetchall():
        try:
            converted = decode_v4_block(data)
        except BlockError as exc:
            raise SchemaError(f"cannot upgrade schema 4 to {SCHEMA_VERSION}: block {block_id} "
                              f"({exc}); the file is unchanged") from exc
        conn.execute("INSERT INTO blocks_v5 VALUES (?, ?, ?, ?, ?, ?, ?)",
                     (block_id, trace_key, first, n, ts_lo, ts_hi, encode_block(converted)))
    conn.execute("DROP TABLE blocks")
    conn.execute("ALTER TABLE blocks_v5 RENAME TO blocks")
    conn.execute("CREATE INDEX blocks_trace ON blocks (trace_key, first)")


def connect(path: str, *, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> sqlite3.Connection:
    """A writing connection to a penguiflow store: checked, set up and migrated.

    The file is checked before anything is written to it: a foreign database, or
    one at a version this module cannot migrate, raises :class:`SchemaError` with
    the file unchanged (not even switched to WAL).
    """
    # Switching a file to WAL while another process sets it up (or switches it back at
    # its close) fails with SQLITE_BUSY at once, without the busy handler: two
    # workers opening one new file failed 13 times in 120. Retried within the
    # busy timeout, as a lock wait would be.
    deadline = time.monotonic() + busy_timeout_ms / 1000
    pause = 0.005
    while True:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            _set_up(conn, path, busy_timeout_ms)
        except sqlite3.OperationalError as exc:
            conn.close()
            code = (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF
            if code not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) or (
                    time.monotonic() + pause > deadline):
                raise
            time.sleep(pause * (0.5 + random.random()))  # jitter: racers do not collide again
            pause = min(pause * 2, 0.1)
            continue
        except BaseException:
            conn.close()
            raise
        return conn


def _set_up(conn: sqlite3.Connection, path: str, busy_timeout_ms: int) -> None:
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    version = schema_version_of(conn)
    if version is None:
        raise SchemaError(f"{path!r} is not a penguiflow trace database (it has other "
                          "tables); use another path")
    if version not in (0, 4, SCHEMA_VERSION):
        raise SchemaError(_unsupported(path, version))
    if version == 0:
        # A new file only (before its first table): big pages mean fewer page
        # splits and WAL frames per batch (~10-20% more events/s than 16 KiB).
        conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
    if version == 4:
        # Upgraded before the switch to WAL (itself a change to the file's header): a
        # block the upgrade refuses rolls back to the file as it was, byte for byte.
        migrate(conn, path)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute(f"PRAGMA journal_size_limit = {WAL_CHECKPOINT_BYTES}")
    migrate(conn, path)


def release(path: str) -> None:
    """Leave a closed store as one plain file: back to rollback-journal mode.

    So a reader opening it read-only (``mode=ro``) creates no ``-wal``/``-shm`` files
    beside it. Best effort: while another process has the file open, it stays in
    WAL mode (that process's close will try again).
    """
    with contextlib.suppress(sqlite3.Error):
        # mode=rw: a file deleted meanwhile is not created again (empty) by its close.
        uri = f"file:{urllib.parse.quote(os.path.abspath(path))}?mode=rw"
        conn = sqlite3.connect(uri, isolation_level=None, timeout=0, uri=True)
        try:
            conn.execute("PRAGMA journal_mode = DELETE")
        finally:
            conn.close()


_encode = json.JSONEncoder(separators=(",", ":")).encode
_quote = json.encoder.encode_basestring_ascii
_KEY_CACHE_MAX = 100_000

_INSERT_BLOCK = ("INSERT INTO blocks (trace_key, first, n, ts_lo, ts_hi, data) "
                 "VALUES (?, ?, ?, ?, ?, ?)")
_SUMMARY_COLUMNS = (
    "trace_id, flow_name, status, started_ts, ended_ts, node_count, error_count, "
    "remote_call_count, event_count, nodes, open_count, failed, cancelled, events_lost")
# The status rule (penguiflow.state.trace_status) stated in SQL.
_INSERT_TRACE = (
    f"INSERT INTO traces (key, {_SUMMARY_COLUMNS}) VALUES (?1, ?2, ?3, "
    "CASE WHEN ?13 THEN 'cancelled' WHEN ?12 THEN 'failed' WHEN ?14 > 0 THEN 'incomplete' "
    "WHEN ?11 > 0 THEN 'running' ELSE 'succeeded' END, "
    "?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)")
_UPDATE_TRACE = (
    "UPDATE traces SET flow_name = ifnull(flow_name, ?1), "
    "status = CASE WHEN cancelled OR ?2 THEN 'cancelled' WHEN failed OR ?3 THEN 'failed' "
    "WHEN events_lost + ?14 > 0 THEN 'incomplete' "
    "WHEN open_count + ?4 > 0 THEN 'running' ELSE 'succeeded' END, "
    "started_ts = min(started_ts, ?5), ended_ts = max(ended_ts, ?6), "
    "node_count = node_count + ?7, error_count = error_count + ?8, "
    "remote_call_count = remote_call_count + ?9, event_count = event_count + ?10, "
    "nodes = CASE WHEN ?11 = '[]' OR ?11 = nodes THEN nodes "
    "ELSE (SELECT json_group_array(value) FROM (SELECT value FROM json_each(nodes) "
    "UNION SELECT value FROM json_each(?11) ORDER BY 1)) END, "
    "open_count = open_count + ?4, failed = failed OR ?3, cancelled = cancelled OR ?2, "
    "events_lost = events_lost + ?14 "
    "WHERE key = ?12 AND trace_id = ?13")


def _names(nodes: Iterable[str]) -> str:
    """The sorted JSON array of node names (``traces.nodes``)."""
    return f"[{','.join(map(_quote, sorted(nodes)))}]" if nodes else "[]"


class _StaleKeys(Exception):
    """A cached trace key no longer names its trace (rolled back, retried uncached)."""


class SQLiteWriter:
    """Writes batches of Rows into one SQLite file; one transaction per batch.

    Args:
        path: the database file (created with its schema on :meth:`open`).
        terminal / errors: the core's TERMINAL_KINDS and ERROR_KINDS.
    """

    def __init__(self, path: str, *, terminal: frozenset[str], errors: frozenset[str],
                 busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> None:
        self.path = path
        self._terminal = terminal
        self._errors = errors
        self._busy_timeout_ms = busy_timeout_ms
        self._conn: sqlite3.Connection | None = None
        #: Set by interrupt(): the write in progress must not commit (its batch was
        #: counted as not stored by a close that gave up waiting for it).
        self._given_up = False
        self._identity: tuple[int, int] | None = None
        self._trace_keys: dict[Any, int] = {}
        self._flow_keys: dict[Any, int] = {}
        self._checkpointer = _Checkpointer()

    def open(self) -> None:
        """Connect and create or migrate the schema (SchemaError: refused, unchanged)."""
        if self._conn is not None:
            return
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        self._conn = connect(self.path, busy_timeout_ms=self._busy_timeout_ms)
        self._checkpointer.open(self.path, self._busy_timeout_ms)
        self._identity = file_identity(self.path)
        self._trace_keys.clear()
        self._flow_keys.clear()

    def close(self) -> None:
        """Checkpoint and truncate the WAL, close the file; idempotent."""
        self._checkpointer.close()  # first: the writer's is then the last connection
        conn, self._conn = self._conn, None
        if conn is None:
            return
        # Another connection may be reading: then the next writer checkpoints.
        self._truncate_wal(conn)
        conn.close()

    def interrupt(self) -> None:
        """Abort the write running on another thread: it rolls back instead of
        committing (also when it is still waiting for the file's lock, which
        SQLite's own interrupt does not cut short). Safe from any thread; every
        later write of this writer is refused the same way."""
        self._given_up = True
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.interrupt()

    def _reopen_if_replaced(self) -> list[tuple[str, str]]:
        if self._conn is not None and file_identity(self.path) == self._identity:
            return []
        was_open = self._conn is not None
        self._checkpointer.close()  # it holds the old file too
        if self._conn is not None:
            # Checkpoint into the old file first (the connection still holds it):
            # a file moved away without its -wal would otherwise lose the commits
            # still in the WAL, which SQLite deletes when the new, empty file opens.
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._conn.close()
            self._conn = None
        self.open()
        if not was_open:
            return []
        return [("file_replaced", f"{self.path!r} was deleted or replaced while the store "
                 "was writing to it; the store reopened the path (events written before "
                 "went with the old file)")]

    def write(self, rows: Sequence[RowLike]) -> WriteReply:
        """Store ``rows`` (see the writer contract in ``writer.py``).

        Returns:
            ``(skipped, rejected, notices)``: positions already stored, positions
            refused with the reason, and what the writer noticed.
        """
        notices = self._reopen_if_replaced()
        with reading_events():
            rejected = check_rows(rows)
        keep: list[int] = []
        good = rows
        if rejected:
            refused = {i for i, _ in rejected}
            keep = [i for i in range(len(rows)) if i not in refused]
            good = select(rows, keep)
        while True:
            try:
                skipped = self._store(good)
                break
            except _StaleKeys:
                self._trace_keys.clear()
                self._flow_keys.clear()
        if keep:
            skipped = [keep[i] for i in skipped]
        self._maintain_wal()
        return skipped, rejected, notices

    def _store(self, rows: Sequence[RowLike]) -> list[int]:
        conn = self._conn
        assert conn is not None
        if not rows:
            return []
        # The batch's summaries and blocks before the transaction (most of its
        # work): meanwhile the checkpoint started after the last batch syncs, and
        # the write lock is held only for the statements. Made again, rarely, when
        # some events turn out to be stored already.
        with reading_events():
            folds = fold_rows(rows, terminal=self._terminal, errors=self._errors)
            blocks = block_rows(group_by_trace(rows))
        # Caught up with (nothing is written meanwhile), so that this transaction
        # restarts the WAL from its beginning.
        self._checkpointer.join()
        # The write lock up front: a batch reads the keys, ranges and counts it updates.
        conn.execute("BEGIN IMMEDIATE")
        try:
            trace_keys, new_traces, flow_keys, new_flows = self._keys(
                values_of(rows, _TRACE_ID), values_of(rows, _FLOW_ID))
            skipped, ranges = split_fresh(rows, self._stored_ranges(flow_keys, new_flows))
            if skipped:
                dropped = set(skipped)
                rows = select(rows, [i for i in range(len(rows)) if i not in dropped])
                with reading_events():
                    folds = fold_rows(rows, terminal=self._terminal, errors=self._errors)
                    blocks = block_rows(group_by_trace(rows))
            for flow_id, flow_ranges in ranges.items():
                key = flow_keys[flow_id]
                conn.execute("DELETE FROM flow_seqs WHERE flow_key = ?", (key,))
                conn.executemany("INSERT INTO flow_seqs (flow_key, lo, hi) VALUES (?, ?, ?)",
                                 [(key, lo, hi) for lo, hi in flow_ranges])
            counts = self._event_counts(trace_keys, new_traces)
            self._store_summaries(folds, trace_keys, new_traces)
            conn.executemany(_INSERT_BLOCK, [
                (trace_keys.get(block.trace_id), counts.get(block.trace_id, 0) + block.offset,
                 block.n, block.ts_lo, block.ts_hi, block.data)
                for block in blocks])
            if self._given_up:
                raise sqlite3.OperationalError("interrupted: the store gave up on this write")
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
        return skipped

    def _store_summaries(self, folds: Mapping[Any, Fold], trace_keys: Mapping[Any, int],
                         new_traces: Mapping[Any, int]) -> None:
        inserts: list[tuple[Any, ...]] = []
        updates: list[tuple[Any, ...]] = []
        for trace_id, f in folds.items():
            if trace_id in new_traces:
                inserts.append((trace_keys[trace_id], trace_id, f.flow_name, f.started, f.ended,
                                f.starts, f.errors, f.remotes, f.events, _names(f.nodes), f.open,
                                int(f.failed), int(f.cancelled), f.events_lost))
            else:
                updates.append((f.flow_name, int(f.cancelled), int(f.failed), f.open, f.started,
                                f.ended, f.starts, f.errors, f.remotes, f.events,
                                _names(f.nodes), trace_keys[trace_id], trace_id,
                                f.events_lost))
        assert self._conn is not None
        if inserts:
            self._conn.executemany(_INSERT_TRACE, inserts)
        if updates:
            self._conn.executemany(_UPDATE_TRACE, updates)

    def _maintain_wal(self) -> None:
        """Checkpoint once the WAL passes WAL_CHECKPOINT_BYTES (readers may keep the
        auto-checkpoint from resetting it; journal_size_limit then truncates it).

        On a thread of its own (:class:`_Checkpointer`), so that its syncs overlap
        the encoding of the next batch, which waits for it before its transaction
        (so that the WAL restarts): inline, they were ~a quarter of a batch of small
        traces (measured). Past WAL_HARD_BYTES (a reader kept the WAL from being
        restarted), here and at once.
        """
        try:
            size = os.path.getsize(self.path + "-wal")
        except OSError:
            return
        if size <= WAL_CHECKPOINT_BYTES or self._conn is None:
            return
        if size <= WAL_HARD_BYTES:
            self._checkpointer.start()  # unless one is running already
            return
        self._checkpointer.join()
        self._truncate_wal(self._conn)

    def _truncate_wal(self, conn: sqlite3.Connection) -> None:
        """Checkpoint the whole WAL and truncate it, unless a reader holds it.

        Waiting only ``TRUNCATE_WAIT_MS`` for readers, not the busy timeout: a reader
        holding a snapshot for long (an open read transaction) made every batch
        wait the full 5 s, the flow then held up by the full buffer. The WAL then
        grows while that reader lives; the next batch after it ends truncates it.
        """
        with contextlib.suppress(sqlite3.Error):
            conn.execute(f"PRAGMA busy_timeout = {TRUNCATE_WAIT_MS}")
            try:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")

    def _event_counts(self, trace_keys: Mapping[Any, int],
                      new_traces: Mapping[Any, int]) -> dict[Any, int]:
        """Events stored so far of the batch's known traces (their blocks' ``first``).

        Raises:
            _StaleKeys: a cached key no longer names its trace (deleted meanwhile by
                retention, and its key possibly reused).
        """
        known = {key: trace_id for trace_id, key in trace_keys.items()
                 if trace_id not in new_traces}
        if not known:
            return {}
        counts: dict[Any, int] = {}
        assert self._conn is not None
        for key, trace_id, count in self._conn.execute(
                "SELECT key, trace_id, event_count FROM traces "
                "WHERE key IN (SELECT value FROM json_each(?))", (_encode(list(known)),)):
            if known.get(key) == trace_id:
                counts[trace_id] = count
        if len(counts) != len(known):
            raise _StaleKeys
        return counts

    def _stored_ranges(self, flow_keys: Mapping[Any, int],
                       new_flows: Mapping[Any, int]) -> dict[Any, Ranges]:
        known = {key: flow_id for flow_id, key in flow_keys.items() if flow_id not in new_flows}
        if not known:
            return {}
        ranges: dict[Any, Ranges] = {}
        assert self._conn is not None
        for key, lo, hi in self._conn.execute(
                "SELECT flow_key, lo, hi FROM flow_seqs "
                "WHERE flow_key IN (SELECT value FROM json_each(?)) ORDER BY flow_key, lo",
                (_encode(list(known)),)):
            ranges.setdefault(known[key], []).append((lo, hi))
        return ranges

    def _keys(self, trace_ids: Iterable[Any], flow_ids: Iterable[Any]
              ) -> tuple[dict[Any, int], dict[Any, int], dict[Any, int], dict[Any, int]]:
        """Trace and flow keys of a batch (under the write lock), and those new here."""
        trace_keys, new_traces = self._resolve(dict.fromkeys(trace_ids), self._trace_keys,
                                               "traces", "trace_id")
        flow_keys, new_flows = self._resolve(dict.fromkeys(flow_ids), self._flow_keys,
                                             "flows", "flow_id")
        if new_flows:
            assert self._conn is not None
            self._conn.executemany("INSERT INTO flows (key, flow_id) VALUES (?, ?)",
                                   [(key, flow_id) for flow_id, key in new_flows.items()])
        return trace_keys, new_traces, flow_keys, new_flows

    def _resolve(self, ids: dict[Any, None], cache: dict[Any, int], table: str,
                 column: str) -> tuple[dict[Any, int], dict[Any, int]]:
        ids.pop(None, None)
        keys = {i: cache[i] for i in ids if i in cache}
        if len(keys) == len(ids):
            return keys, {}
        missing = [i for i in ids if i not in keys]
        assert self._conn is not None
        # Table and column names are the constants passed by _keys.
        keys.update(self._conn.execute(
            f"SELECT {column}, key FROM {table} WHERE {column} IN "
            f"(SELECT value FROM json_each(?))", (_encode(missing),)))
        cache.update((i, keys[i]) for i in missing if i in keys)
        (last,) = self._conn.execute(f"SELECT ifnull(max(key), 0) FROM {table}").fetchone()
        new = {i: last + n for n, i in enumerate((i for i in missing if i not in keys), 1)}
        keys.update(new)
        return keys, new


class _Checkpointer:
    """Passive WAL checkpoints on a thread and a connection of their own.

    A passive checkpoint runs beside the writer's transactions (it takes no write
    lock): it copies the frames committed so far into the file and syncs it; the
    writer's next transaction then restarts the WAL, which ``journal_size_limit``
    truncates. One at a time; a failure is left to the next one (or to the
    writer's own checkpoint past WAL_HARD_BYTES).

    The connection is opened with the writer's (:meth:`open`), not by name when a
    checkpoint starts: a file replaced meanwhile (a backup restored with ``mv``)
    would get the old file's WAL copied into it, and be corrupt.
    """

    def __init__(self) -> None:
        self._conn: sqlite3.Connection | None = None
        self._thread: threading.Thread | None = None

    def open(self, path: str, busy_timeout_ms: int) -> None:
        """Connect to ``path``, which the writer has just opened (and checked)."""
        self.close()
        with contextlib.suppress(sqlite3.Error):
            # mode=rw: never creates the file; used on the checkpoint thread only.
            uri = f"file:{urllib.parse.quote(os.path.abspath(path))}?mode=rw"
            self._conn = sqlite3.connect(uri, isolation_level=None, uri=True,
                                         timeout=busy_timeout_ms / 1000,
                                         check_same_thread=False)

    def start(self) -> bool:
        """Start a checkpoint; False when one is still running (or none can run)."""
        if self._conn is None or (self._thread is not None and self._thread.is_alive()):
            return False
        # A daemon: a process that exits without closing its store is not held up.
        self._thread = threading.Thread(target=self._run, args=(self._conn,),
                                        name="penguiflow-sqlite-checkpoint", daemon=True)
        self._thread.start()
        return True

    def join(self) -> None:
        """Wait for the checkpoint running, if any."""
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()

    def close(self) -> None:
        """Wait for the checkpoint running, then close the connection."""
        self.join()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    @staticmethod
    def _run(conn: sqlite3.Connection) -> None:
        with contextlib.suppress(sqlite3.Error):
            # Until it catches up with the writer (then the writer's next
            # transaction restarts the WAL): each round copies what the writer
            # committed during the last, less and less. Bounded: under a writer
            # that outpaces it, the writer checkpoints itself past WAL_HARD_BYTES.
            for _ in range(_CHECKPOINT_ROUNDS):
                busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                if busy or copied >= frames:
                    break


def file_identity(path: str) -> tuple[int, int] | None:
    """``(device, inode)`` of the file at ``path``, None when there is none: a file
    deleted or replaced under a store changes it."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class _Handler:
    """The SQLite writer process's handler (see _serve.serve)."""

    def __init__(self) -> None:
        self._writer: SQLiteWriter | None = None

    def init(self, options: dict[str, Any]) -> None:
        writer = SQLiteWriter(options["path"], terminal=options["terminal"],
                              errors=options["errors"],
                              busy_timeout_ms=options.get("busy_timeout_ms", BUSY_TIMEOUT_MS))
        writer.open()
        self._writer = writer

    def write(self, payload: bytes) -> WriteReply:
        assert self._writer is not None
        return self._writer.write(loads_rows(payload))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def main() -> None:
    """The child's entry point (``python -m penguiflow_exporters._sqlite_write``)."""
    handler = _Handler()
    try:
        serve(handler)
    finally:
        handler.close()


if __name__ == "__main__":
    main()
