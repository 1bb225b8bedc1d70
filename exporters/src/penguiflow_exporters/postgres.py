"""PostgresStateStore: a TraceStore on PostgreSQL (asyncpg), shared by many processes.

Everything lives in one Postgres schema (``penguiflow`` by default), which the
store creates and migrates itself; ``schema_version`` records the version, and a
store refuses a schema newer than it knows (:data:`SCHEMA_VERSION`).

Layout (schema version 4):

* ``blocks``: events, several to a row (see _blocks.py). Each batch writes, per
  trace, one row holding that trace's new events in order (one per 2,000 events,
  BLOCK_EVENTS, for a bigger share), encoded as one ``bytea`` value;
  ``trace_key`` is the trace's ``traces.first_seen`` (NULL for
  events without a trace), ``first`` the index in its trace of the block's first
  event, ``n`` its event count, ``ts_lo``/``ts_hi`` its timestamps' bounds, ``id``
  (bigserial) the order blocks were committed in. Index ``(trace_key, first)``:
  a trace's history is its blocks in ``first`` order, and a page seeks straight
  to the blocks holding it. Large blocks are lz4-compressed when the server
  offers lz4 (Postgres >= 14), else pglz.
* ``flow_seqs``: per flow id, the seq numbers stored, as disjoint ``[lo, hi]``
  ranges (one row per flow in a normal run, whose seqs have no gaps). An event is
  identified by ``(flow_id, seq)``: a re-delivered one is dropped before encoding
  (_blocks.split_fresh), so it is stored once and counted once.
* ``traces``: one summary row per trace, folded incrementally, in the write
  transaction, from the newly stored events only (in Python, see _batch.fold_rows).
* ``bindings``: remote bindings, unique on all four columns.

Why blocks: a row costs the server 5-10 us to insert into an indexed table
whatever its size, and the client a Python object per column to read back. One
row per event (versions 1-3) capped raw ingest at ~48k events/s and
``load_history`` of a 100k-event trace at ~1.1 s on the 2-core CI machine; with
blocks the same benchmark (benchmarks/stores.py: 100k events in traces of 10;
one 100k-event trace) measures ~105-120k events/s and ~350-600 ms (medians
of 3 over several runs; this machine is noisy). Events are opaque to SQL: read
them through a store (``load_history``, ``penguiflow-admin history``, ``pf
export``).

Write path, per batch (at most 10,000 events). ``_prepare`` folds the summaries
and encodes the blocks as if nothing in the batch were stored yet, on the event
loop while the previous batch is being written (so the two overlap). ``_write``,
one transaction: take the write lock; read the ranges of the batch's flows; if
the batch holds a stored seq after all (a re-delivery), drop those events and
fold and encode again; upsert the summaries, which RETURNs each trace's key and
new event count (so its first block's ``first`` is the count before this batch);
replace the touched flows' ranges; one binary COPY of the blocks; NOTIFY.
Measured per 10,000 events of the benchmark: encoding ~15-25 ms, the summary
upsert ~25-30 ms (one row per trace: traces of 10 events make it the largest
server cost), the COPY ~15-20 ms.

Where batches are written (``writer``). The transaction's code (SQL, folding,
re-encoding a re-delivery) is _pg_write.BatchWriter, run either way:

* ``"process"`` (default): by a child process (``python -m
  penguiflow_exporters._pg_write``, its own asyncpg connection and event loop),
  over asyncio pipes driven by the flow's event loop itself (_writer_proc.
  AsyncWriterProcess; a worker thread handing batches over starved for the GIL
  while the loop was busy). ``_prepare`` only pickles the runtime's tuples, a
  slice at a time, and the child groups, folds and encodes them; a batch holding
  StoredEvents (an import) is grouped by trace and encoded into blocks here, and
  the child decodes only their heads to fold and deduplicate and stores the bytes
  as they came (see _pg_write). Why: on the loop, folding, binding and the driver
  (~4 us per event) share the flow's process and GIL: the chain N=5 benchmark
  with the store ran at 2.2-4.5x its time without one. The child is started in
  the background with the first event buffered (~0.25 s: interpreter, asyncpg,
  connection), not by ``open()``, so a store opened only to read starts none;
  batches taken before it is ready are written on the loop. A child that dies
  costs the batch it was writing (StoreUnavailable, counted); the next batch
  starts a new one.
* ``"loop"``: on the flow's event loop, with the pool (the behaviour before).

Concurrency (any number of stores, in any number of processes):

* ``open()`` migrates under a transaction-scoped advisory lock, so processes
  starting together do not race on ``CREATE`` (or on converting v3's events).
* Writers serialise their batches on a second advisory lock per schema, held
  from reading the ranges to commit. So no two writers can store the same event
  (the ranges read are current), a trace's blocks get consecutive ``first``
  values, block ids become visible in id order (a follower reading ``id > last``
  never skips a block that committed late), and summary upserts cannot deadlock.
* Live follow: each committed batch NOTIFYs the schema's channel with the ids of
  the traces it touched; :meth:`PostgresStateStore.follow` LISTENs on its own
  connection and reads the new blocks (every trace: by id; one trace: by
  ``first``), so a reader in another process follows a live trace. A trace's
  events come in order; following every trace, a batch's events come trace by
  trace (a block each), not interleaved as they occurred.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import pickle
import re
import zlib
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterator,
    Sequence,
)
from typing import Any, Final, Literal
from urllib.parse import parse_qs, urlsplit

import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type information

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
    block_rows,
    decode_block,
    encode_block,
    events_of,
    expand,
    kept_items,
    split_fresh,
    stored_item,
    writer_payload,
)
from ._buffered import BufferedStore
from ._gc import gc_paused
from ._pg_write import ANY_TRACE, BLOCK_COLUMNS, Batch, BatchWriter
from ._writer_proc import AsyncWriterProcess, WriterError

logger = logging.getLogger("penguiflow_exporters.store")

__all__ = ["PostgresStateStore", "SCHEMA_VERSION"]

# Lowercase only, so the name means the same quoted or not; <= 56 characters so
# that the NOTIFY channel "<schema>.events" fits Postgres' 63-byte identifiers.
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,55}")
# First key of the two-key advisory lock migrations take ("PFmg"; writers take
# _pg_write.WRITE_LOCK); the second key is derived from the schema name, so stores
# on different schemas do not contend.
_MIGRATE_LOCK: Final = 0x50466D67
_BATCH_SIZE: Final = 10_000
# Events _prepare converts or encodes between two yields to the event loop.
_SLICE: Final = 1000
# NUL marks a lost listener connection, since Postgres text can never contain it.
_LISTENER_LOST: Final = "\x00"

_V1: Final = """
CREATE TABLE {s}.events (
    id bigserial PRIMARY KEY,
    -- "C" collation: byte comparisons; with a libc locale the two text indexes
    -- alone cut COPY throughput from ~140k to ~63k rows/s.
    event_key text COLLATE "C" UNIQUE,
    trace_id text COLLATE "C",
    ts double precision NOT NULL,
    kind text NOT NULL,
    node_name text,
    node_id text,
    attempt integer NOT NULL,
    invocation_id text,
    parent_invocation_ids text[] NOT NULL,
    span_id text,
    parent_span_id text,
    seq bigint NOT NULL,
    queued_ts double precision,
    flow_name text,
    flow_id text,
    payload json NOT NULL
);
CREATE INDEX events_trace_idx ON {s}.events (trace_id, id);

CREATE TABLE {s}.traces (
    trace_id text COLLATE "C" PRIMARY KEY,
    -- Order in which traces were first stored: breaks ties the way
    -- TraceFilter.apply's stable sort does for the in-memory store.
    first_seen bigint GENERATED BY DEFAULT AS IDENTITY,
    flow_name text,
    started_ts double precision NOT NULL,
    ended_ts double precision NOT NULL,
    node_count integer NOT NULL,
    error_count integer NOT NULL,
    remote_call_count integer NOT NULL,
    event_count bigint NOT NULL,
    open_count integer NOT NULL,
    cancelled boolean NOT NULL,
    failed boolean NOT NULL,
    nodes text[] NOT NULL,
    status text GENERATED ALWAYS AS (
        CASE WHEN cancelled THEN 'cancelled'
             WHEN failed THEN 'failed'
             WHEN open_count > 0 THEN 'running'
             ELSE 'succeeded' END) STORED
);
CREATE INDEX traces_started_idx ON {s}.traces (started_ts DESC);

CREATE TABLE {s}.bindings (
    id bigserial PRIMARY KEY,
    trace_id text COLLATE "C" NOT NULL,
    context_id text,
    task_id text,
    agent_url text
);
-- Unique on all four columns with NULLs equal to each other but not to '' (what
-- UNIQUE NULLS NOT DISTINCT says on Postgres >= 15, written for older servers).
-- It leads with trace_id, so it is also the by-trace index.
CREATE UNIQUE INDEX bindings_unique_idx ON {s}.bindings (
    trace_id,
    (context_id IS NULL), COALESCE(context_id, ''),
    (task_id IS NULL), COALESCE(task_id, ''),
    (agent_url IS NULL), COALESCE(agent_url, ''));
CREATE INDEX bindings_context_idx ON {s}.bindings (context_id);
CREATE INDEX bindings_task_idx ON {s}.bindings (task_id);
"""

# v2: the payload's runtime fields become columns and the event key becomes the
# pair (flow_id, seq), so a batch is COPYed straight from the runtime's
# EVENT_FIELDS tuples (same column order): no payload dict, JSON text or key
# string is built per event on the flow's event loop. `q_in IS NULL` marks a row
# whose `payload` is the whole payload (v1 rows, events saved as StoredEvents);
# otherwise `payload` is the kind's `extra` items (NULL when none) and the payload
# is rebuilt on read with penguiflow.metrics.event_payload, as the runtime builds
# it. The (flow_id, seq) index replaces event_key's: keys were exactly
# "<flow_id>:<seq>", so v1 rows stay deduplicated.
_V2: Final = """
ALTER TABLE {s}.events
    ADD COLUMN latency_ms double precision,
    ADD COLUMN q_in integer,
    ADD COLUMN q_out integer,
    ADD COLUMN outgoing integer,
    ADD COLUMN queue_maxsize integer,
    ADD COLUMN trace_inflight integer,
    ADD COLUMN trace_cancelled boolean,
    ADD COLUMN trace_pending integer,
    ALTER COLUMN payload DROP NOT NULL,
    ALTER COLUMN flow_id TYPE text COLLATE "C";
CREATE UNIQUE INDEX events_flow_seq_idx ON {s}.events (flow_id, seq);
ALTER TABLE {s}.events DROP COLUMN event_key;
"""

# v3: events carry their trace's `first_seen` (an integer unique per trace) as
# `trace_key` instead of the trace id, so the by-trace index every event inserts
# into is (trace_key, id): appended to (new traces get increasing keys) instead of
# written at random 32-character ids across the index, and ~33 bytes a row fewer
# to COPY. The summary fold moved to Python and runs first (see _write_batch): its
# upsert RETURNs the keys. traces_first_seen_idx maps keys back to ids (follow).
_V3: Final = """
CREATE UNIQUE INDEX traces_first_seen_idx ON {s}.traces (first_seen);
ALTER TABLE {s}.events ADD COLUMN trace_key bigint;
UPDATE {s}.events e SET trace_key = t.first_seen FROM {s}.traces t
    WHERE t.trace_id = e.trace_id;
CREATE INDEX events_trace_key_idx ON {s}.events (trace_key, id);
ALTER TABLE {s}.events DROP COLUMN trace_id;
"""

# v4: event blocks (see _blocks.py). Each batch stores, per trace, ONE row of its
# new events (a block) instead of a row per event, and idempotency moves from a
# UNIQUE (flow_id, seq) index to `flow_seqs`, the ranges of seqs stored per flow
# (checked and extended under the write lock). `first` is the index, in its trace,
# of the block's first event (so pages seek on (trace_key, first)); 0 for blocks
# of trace-less events (trace_key NULL), which only follow() reads. `ts_lo` /
# `ts_hi` bound the block's timestamps (for retention or ad-hoc SQL: the events
# themselves are opaque to SQL). The old rows are converted by _v4_blocks below.
_V4_TABLES: Final = """
CREATE TABLE {s}.blocks (
    id bigserial PRIMARY KEY,
    trace_key bigint,
    first bigint NOT NULL,
    n integer NOT NULL,
    ts_lo double precision NOT NULL,
    ts_hi double precision NOT NULL,
    data bytea NOT NULL
);
CREATE INDEX blocks_trace_idx ON {s}.blocks (trace_key, first);
CREATE TABLE {s}.flow_seqs (
    flow_id text COLLATE "C" NOT NULL,
    lo bigint NOT NULL,
    hi bigint NOT NULL,
    PRIMARY KEY (flow_id, lo)
);
-- Gaps and islands: consecutive seqs of a flow share seq - row_number().
INSERT INTO {s}.flow_seqs (flow_id, lo, hi)
SELECT flow_id, min(seq), max(seq) FROM (
    SELECT flow_id, seq, seq - row_number() OVER (PARTITION BY flow_id ORDER BY seq) AS island
    FROM {s}.events WHERE flow_id IS NOT NULL) AS e
GROUP BY flow_id, island;
"""
# lz4 (Postgres >= 14 built with it) compresses a large block ~4x faster than the
# default pglz: a 10,000-event block (~1.6 MB) took ~30 ms to COPY with pglz and
# ~7 ms with lz4 (measured). Blocks under ~2 KB are stored inline, uncompressed.
_HAS_LZ4: Final = ("SELECT coalesce(bool_or('lz4' = ANY(enumvals)), false) FROM pg_settings "
                   "WHERE name = 'default_toast_compression'")
# Every v3 event, with its trace id, a trace's events together in order of occurrence.
_V4_EVENTS: Final = """
SELECT e.trace_key, t.trace_id, e.ts, e.kind, e.node_name, e.node_id, e.invocation_id,
       e.parent_invocation_ids, e.span_id, e.parent_span_id, e.seq, e.attempt, e.queued_ts,
       e.flow_name, e.flow_id, e.latency_ms, e.q_in, e.q_out, e.outgoing, e.queue_maxsize,
       e.trace_inflight, e.trace_cancelled, e.trace_pending, e.payload
FROM {s}.events e LEFT JOIN {s}.traces t ON t.first_seen = e.trace_key
ORDER BY e.trace_key, e.id
"""
_MIGRATION_FETCH: Final = 20_000
_UNSET: Final = object()


async def _v4_blocks(conn: Any, s: str) -> None:
    """Migration 4: ``events`` rows become blocks (and ranges); ``events`` is dropped.

    Runs in the migration's transaction, under its lock. Streams the rows with a
    cursor: per trace (then the trace-less ones), in id order, blocks of at most
    BLOCK_EVENTS events, as a batch of today's store would write them: a row with
    runtime columns (``q_in`` set) as the runtime's EVENT_FIELDS tuple (``payload``
    being its ``extra``), any other with its whole payload.
    """
    await conn.execute(_V4_TABLES.format(s=s))
    if await conn.fetchval(_HAS_LZ4):
        await conn.execute(f"ALTER TABLE {s}.blocks ALTER COLUMN data SET COMPRESSION lz4")
    # A SQL cursor rather than asyncpg's: it can be closed before DROP TABLE.
    await conn.execute(f"DECLARE pf_v4_events NO SCROLL CURSOR FOR {_V4_EVENTS.format(s=s)}")
    records: list[tuple[Any, ...]] = []
    pending = 0  # events in `records`
    key: Any = _UNSET
    chunk: list[tuple[Any, ...]] = []
    first = 0

    def close_chunk() -> None:
        nonlocal pending
        if chunk:
            records.append(_block_record(key, first if key is not None else 0, chunk))
            pending += len(chunk)

    while rows := await conn.fetch(f"FETCH {_MIGRATION_FETCH} FROM pf_v4_events"):
        for row in rows:
            if row[0] != key:
                close_chunk()
                key, first, chunk = row[0], 0, []
            elif len(chunk) == BLOCK_EVENTS:
                close_chunk()
                first, chunk = first + len(chunk), []
            chunk.append(_v3_item(row))
        if pending >= _MIGRATION_FETCH:
            await _copy_blocks(conn, s, records)
            records, pending = [], 0
    close_chunk()
    if records:
        await _copy_blocks(conn, s, records)
    await conn.execute(f"CLOSE pf_v4_events; DROP TABLE {s}.events")


def _v3_item(row: Any) -> tuple[Any, ...]:
    """The block item of a v3 ``events`` row (see _V4_EVENTS for the columns)."""
    (_, trace_id, ts, kind, node_name, node_id, invocation_id, parents, span_id,
     parent_span_id, seq, attempt, queued_ts, flow_name, flow_id, latency_ms, q_in, q_out,
     outgoing, maxsize, inflight, cancelled, pending, payload) = row
    head = (trace_id, ts, kind, node_name, node_id, invocation_id,
            tuple(parents) if parents else (), span_id, parent_span_id, seq, attempt,
            queued_ts, flow_name, flow_id)
    if q_in is None:  # a whole payload (v1 rows, StoredEvents not split)
        return (*head, payload if payload is not None else {})
    return (*head, latency_ms, q_in, q_out, outgoing, maxsize, inflight, cancelled, pending,
            payload or None)


def _block_record(trace_key: int | None, first: int, items: Sequence[tuple[Any, ...]]
                  ) -> tuple[Any, ...]:
    """The ``blocks`` record (BLOCK_COLUMNS) of ``items``, a trace's events in order."""
    stamps = [item[1] for item in items]
    return (trace_key, first, len(items), min(stamps), max(stamps), encode_block(items))


async def _copy_blocks(conn: Any, s: str, records: Sequence[tuple[Any, ...]]) -> None:
    await conn.copy_records_to_table("blocks", schema_name=s.strip('"'),
                                     columns=BLOCK_COLUMNS, records=records)


#: Migration ``i`` brings the schema from version ``i`` to ``i + 1``: SQL (``{s}``
#: the quoted schema name), or a coroutine function taking the connection and it.
_MIGRATIONS: Final[tuple[str | Callable[[Any, str], Awaitable[None]], ...]] = (
    _V1, _V2, _V3, _v4_blocks)
#: The schema version this module writes; a newer one is refused at open().
SCHEMA_VERSION: Final = len(_MIGRATIONS)

# Positions match _summary() below.
_SUMMARY_COLUMNS: Final = (
    "trace_id, flow_name, status, started_ts, ended_ts, node_count, error_count, "
    "remote_call_count, event_count, nodes")

# Errors meaning "the server cannot be reached or refuses us": StoreUnavailable.
# Every other driver error becomes a StateStoreError.
_UNAVAILABLE: Final[tuple[type[BaseException], ...]] = (
    OSError,  # refused, unreachable, DNS failure; TimeoutError is an OSError
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InvalidCatalogNameError,
)
# The same, by class name: how a writer process reports its exceptions (WriterError.types
# lists every class of the exception's MRO, so subclasses match).
_UNAVAILABLE_NAMES: Final = frozenset(t.__name__ for t in _UNAVAILABLE)
_DRIVER_ERRORS: Final[tuple[type[BaseException], ...]] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)


class PostgresStateStore(BufferedStore):
    """A :class:`~penguiflow.state.TraceStore` on PostgreSQL, safe across processes.

    ``save_event`` only buffers (see :class:`BufferedStore`); batches are written
    in the background and by ``flush()``. Every query flushes first, so a store
    reads its own writes. Use it as ``async with PostgresStateStore(dsn) as store``.

    Args:
        dsn: ``postgresql://user[:password]@host:port/database``. Messages name the
            host, port and database, never the password.
        schema: the Postgres schema holding the tables (lowercase identifier, at
            most 56 characters); created and migrated on ``open()``.
        pool_min / pool_max: asyncpg pool bounds (``follow`` uses its own
            connection besides).
        connect_timeout_s: how long connecting may take before StoreUnavailable.
        writer: where batches are written: ``"process"`` (default), by a child
            process with its own connection (see the module docstring), or
            ``"loop"``, on the flow's event loop with the pool.
        **buffer_kwargs: ``batch_size`` (10,000 here, not 2,000), ``max_buffer``,
            ``flush_interval_s``, ``on_full`` of :class:`BufferedStore`.

    Raises:
        ValueError: an invalid ``schema`` name, pool bounds or ``writer``.
        StoreUnavailable: (from the methods) the server cannot be reached or
            refused the credentials, or the store is closed.
        StateStoreError: (from the methods) any other database failure, including
            a schema newer than :data:`SCHEMA_VERSION`.
    """

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "penguiflow",
        pool_min: int = 1,
        pool_max: int = 4,
        connect_timeout_s: float = 10.0,
        writer: Literal["process", "loop"] = "process",
        **buffer_kwargs: Any,
    ) -> None:
        if writer not in ("process", "loop"):
            raise ValueError(f"writer must be 'process' or 'loop'; got {writer!r}")
        if not _SCHEMA_NAME.fullmatch(schema):
            raise ValueError(
                f"schema must be a lowercase identifier of at most 56 characters "
                f"([a-z_][a-z0-9_]*); got {schema!r}")
        if not 0 <= pool_min <= pool_max or pool_max < 1:
            raise ValueError(
                f"need 0 <= pool_min <= pool_max and pool_max >= 1; "
                f"got pool_min={pool_min}, pool_max={pool_max}")
        # Bigger batches than the base's 2,000: a batch costs ~8 round trips and
        # one summary upsert whatever its size, and a trace's share of it is one
        # block (one row), so bigger batches mean fewer, bigger rows.
        buffer_kwargs.setdefault(
            "batch_size", min(_BATCH_SIZE, buffer_kwargs.get("max_buffer", _BATCH_SIZE)))
        super().__init__(**buffer_kwargs)
        self._takes_fields = True  # batches hold the runtime's tuples: see _write
        self.schema = schema
        self._dsn = dsn
        self._where = _describe_dsn(dsn)
        self._pool_min = pool_min
        self._pool_max = pool_max
        self._connect_timeout_s = connect_timeout_s
        #: ``"process"`` or ``"loop"``: where batches are written.
        self.writer = writer
        self._pool: Any = None
        self._open_lock = asyncio.Lock()
        # Held by _write for a whole batch, so batches commit in the order they
        # were taken from the buffer (whoever calls _write).
        self._write_lock = asyncio.Lock()
        self._follow_wakes: set[asyncio.Queue[str | None]] = set()
        crc = zlib.crc32(schema.encode())
        self._lock_key = crc - (1 << 32) if crc >= 1 << 31 else crc  # a signed int4
        self._channel = f"{schema}.events"
        s = f'"{schema}"'
        self._s = s
        key_of = f"(SELECT first_seen FROM {s}.traces WHERE trace_id = $1)"
        self._sql_history = (
            f"SELECT id, data FROM {s}.blocks WHERE trace_key = {key_of} ORDER BY first, id")
        # The blocks overlapping events [$2, $2 + $3): from the last block starting
        # at or before $2, on the (trace_key, first) index; no OFFSET walk.
        self._sql_history_page = (
            f"SELECT id, first, data FROM {s}.blocks WHERE trace_key = {key_of} "
            f"AND first < $2::int8 + $3::int8 AND first >= (SELECT coalesce(max(first), 0) "
            f"FROM {s}.blocks WHERE trace_key = {key_of} AND first <= $2::int8) ORDER BY first, id")
        self._sql_last_block = f"SELECT coalesce(max(id), 0) FROM {s}.blocks"
        self._sql_trace_end = (
            f"SELECT coalesce(max(first + n), 0) FROM {s}.blocks WHERE trace_key = {key_of}")
        self._sql_follow_all = f"SELECT id, data FROM {s}.blocks WHERE id > $1 ORDER BY id"
        # A trace's blocks after the last one seen, by position (its index), not by
        # id: the (trace_key, id) pairs of a long trace need no second index.
        self._sql_follow_trace = (
            f"SELECT id, first, n, data FROM {s}.blocks WHERE trace_key = {key_of} "
            f"AND first >= $2 ORDER BY first, id")
        # The transaction, run on the event loop with the pool (writer="loop", and
        # writer="process" until its writer process is ready).
        self._batch_writer = BatchWriter(
            schema, lock_key=self._lock_key, channel=self._channel,
            terminal=TERMINAL_KINDS, errors=ERROR_KINDS, block_events=BLOCK_EVENTS)
        # writer="process": the child writing batches, and the task starting it
        # (with the first buffered event, see _ensure_writer; not at open(): a store
        # opened only to read never starts a writer).
        self._proc_writer: AsyncWriterProcess | None = None
        self._starting: asyncio.Task[None] | None = None
        if writer == "process":
            self._proc_writer = AsyncWriterProcess("penguiflow_exporters._pg_write", {
                "dsn": dsn, "schema": schema, "lock_key": self._lock_key,
                "channel": self._channel, "terminal": TERMINAL_KINDS,
                "errors": ERROR_KINDS, "block_events": BLOCK_EVENTS,
                "connect_timeout_s": connect_timeout_s})

    def __repr__(self) -> str:
        return f"PostgresStateStore({self._where!r}, schema={self.schema!r})"

    # -- errors -------------------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        """Translate driver and socket errors raised inside into the store's errors."""
        try:
            yield
        except StateStoreError:
            raise
        except _UNAVAILABLE as exc:
            raise self._unavailable(doing, f"{type(exc).__name__}: {exc}") from exc
        except _DRIVER_ERRORS as exc:
            raise self._failed_while(doing, f"{type(exc).__name__}: {exc}") from exc

    def _unavailable(self, doing: str, error: str) -> StoreUnavailable:
        return StoreUnavailable(
            f"cannot reach Postgres at {self._where} while {doing}: {error}. Start the "
            f"server, or fix the host, port, database or credentials in the DSN "
            f"(e.g. PENGUIFLOW_STORE)")

    def _failed_while(self, doing: str, error: str) -> StateStoreError:
        return StateStoreError(
            f"Postgres at {self._where} (schema {self.schema!r}) failed while {doing}: {error}")

    def _writer_error(self, exc: WriterError) -> StateStoreError:
        """The store's error for a batch the writer process failed (see _errors)."""
        if exc.gone:
            return StoreUnavailable(
                f"Postgres store at {self._where} (schema {self.schema!r}): {exc}; the "
                f"batch was not stored, and the next one starts a new writer (or pass "
                f"writer='loop')")
        if _UNAVAILABLE_NAMES.intersection(exc.types):
            return self._unavailable("writing events", str(exc))
        return self._failed_while("writing events", str(exc))

    def _checked_pool(self) -> Any:
        if self._pool is None:
            raise StoreUnavailable(f"{self!r} is closed; create a new one")
        return self._pool

    # -- lifecycle ----------------------------------------------------------------

    async def _open(self) -> None:
        # The base's open() may be entered by the writer and a query at once.
        async with self._open_lock:
            if self._pool is not None:
                return
            with self._errors("connecting"):
                pool = await asyncpg.create_pool(
                    self._dsn, min_size=self._pool_min, max_size=self._pool_max,
                    timeout=self._connect_timeout_s, init=_init_connection,
                    server_settings={"application_name": "penguiflow"})
            try:
                with self._errors("creating or migrating the schema"):
                    async with pool.acquire() as conn:
                        await self._migrate(conn)
            except BaseException:
                pool.terminate()
                raise
            self._pool = pool

    async def _migrate(self, conn: Any) -> None:
        s = self._s
        current = await self._schema_version(conn)
        if current == SCHEMA_VERSION:
            return  # the usual case: no lock, no DDL
        async with conn.transaction():
            # Serialises concurrent open()s (other processes included) until commit.
            await conn.execute("SELECT pg_advisory_xact_lock($1, $2)",
                               _MIGRATE_LOCK, self._lock_key)
            await conn.execute(
                f"CREATE SCHEMA IF NOT EXISTS {s};"
                f"CREATE TABLE IF NOT EXISTS {s}.schema_version ("
                f" version integer PRIMARY KEY,"
                f" applied_ts double precision NOT NULL DEFAULT extract(epoch FROM now()))")
            current = await self._schema_version(conn)
            for version in range(current + 1, SCHEMA_VERSION + 1):
                step = _MIGRATIONS[version - 1]
                if isinstance(step, str):
                    await conn.execute(step.format(s=s))
                else:
                    await step(conn, s)
                await conn.execute(
                    f"INSERT INTO {s}.schema_version (version) VALUES ($1)", version)

    async def _schema_version(self, conn: Any) -> int:
        """The schema's recorded version (0 if none).

        Raises:
            StateStoreError: the schema is newer than this module knows.
        """
        table = await conn.fetchval("SELECT to_regclass($1)", f"{self._s}.schema_version")
        if table is None:
            return 0
        found = await conn.fetchval(f"SELECT max(version) FROM {self._s}.schema_version")
        version = int(found or 0)
        if version > SCHEMA_VERSION:
            raise StateStoreError(
                f"Postgres schema {self.schema!r} at {self._where} has version {version}, "
                f"newer than this penguiflow-exporters supports ({SCHEMA_VERSION}); "
                f"upgrade penguiflow-exporters, or use another schema")
        return version

    async def close(self) -> None:
        """Flush what is buffered, stop the writer process, close the pool; idempotent."""
        if self._starting is not None and not self._starting.done():
            # Let the start finish (it opens the store), so that _close stops what it
            # started, whatever close() finds opened.
            await asyncio.wait([self._starting])
        await super().close()

    async def _close(self) -> None:
        for wake in list(self._follow_wakes):
            wake.put_nowait(None)
        if self._proc_writer is not None:
            # After the batch it may be writing (none should be: close() flushed
            # first): requests are serialised.
            await self._proc_writer.close()
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), self._connect_timeout_s)
        except Exception:
            # Closing must release the connections whatever state the server is in.
            pool.terminate()

    # -- write path ---------------------------------------------------------------

    async def flush(self) -> None:
        """Write everything buffered so far (and the batches in flight), then return;
        also once the writer process has started, if it was starting.

        A flushed store is in its steady state: the batches after it go to the
        writer process, not to the loop (a service flushing at start-up, or a
        benchmark's warm-up, must not leave the start to its first busy second).
        """
        await super().flush()
        starting = self._starting
        if starting is not None and not starting.done():
            await asyncio.wait([starting])

    async def _prepare(self, batch: list[Any]) -> tuple[list[Any], Any, bool]:
        """``batch`` ready for ``_write``: ``(batch, data, grouped)``.

        For the writer process, once it has started, ``data`` is its pickled
        ``(grouped, chunks)`` (see _pg_write): the runtime's tuples alone as encoded
        slices of the batch, or the batch grouped by trace and encoded into blocks
        (``grouped``: the positions it reports are then the blocks'). Otherwise
        (writer="loop", or while the writer process is starting) a :class:`Batch`
        folded and encoded for the transaction on the loop.

        Runs on the event loop while the previous batch is being written (see
        BufferedStore._write_some), yielding to it between slices.
        """
        starting = self._starting
        if starting is None or not starting.done():
            return batch, await self._folded(batch), False
        data, grouped = await writer_payload(batch)
        return batch, data, grouped

    def _ensure_writer(self) -> None:
        super()._ensure_writer()
        self._start_writer_soon()

    def _start_writer_soon(self) -> None:
        """Start the writer process in the background, once (writer="process")."""
        if self._proc_writer is not None and self._starting is None:
            # ~0.25 s (the interpreter, asyncpg, a connection), which the first
            # batches would otherwise wait for (~25% of a 100k-event import,
            # measured): they are written on the loop meanwhile (see _prepare).
            self._starting = asyncio.get_running_loop().create_task(self._start_writer())

    async def _start_writer(self) -> None:
        assert self._proc_writer is not None
        # A failure here is not lost: the first batch for the writer process starts
        # it again, and reports.
        with contextlib.suppress(Exception):
            await self.open()
            await self._proc_writer.start()
            # No chunks: the child only connects.
            await self._proc_writer.request(b"W", pickle.dumps((True, []), 5))
            # From now on the runtime's tuples go to it encoded as they come (Sealed);
            # not before: batches written on the loop meanwhile would decode them.
            self._sealing = True

    async def _writer_started(self) -> None:
        """Start the writer process if it was not, and wait until it started (or
        failed to); for tests."""
        self._start_writer_soon()
        if self._starting is not None:
            await asyncio.wait([self._starting])

    async def _folded(self, batch: list[Any]) -> Batch:
        """Fold and encode ``batch`` as if none of it were stored yet (usually true);
        the transaction checks the guess against the stored ranges under its lock."""
        # The block tuples live only inside this pause, so the collector never
        # traverses them: with a large heap (100k events buffered, say), the
        # collections set off by ~10k surviving tuples per batch cost more than
        # encoding them (measured ~80k vs ~125k events/s). The pause spans only
        # this CPU work and the loop turns it yields, never a wait for I/O.
        #
        # Yields every ~_SLICE events (1-3 ms of work): the batch being written
        # needs a loop turn for each of its statements (~8), and the server works
        # on the big ones (summaries, COPY) while this goes on. Converting and
        # folding a whole batch in one go (~25 ms) held those turns back until
        # this was nearly done, and the loop then sat idle while the server
        # worked (measured ~90k events/s, against ~105-120k).
        writer = self._batch_writer
        batch = expand(batch)  # Sealed tuples, from before a fallback to the loop

        def items() -> list[tuple[Any, ...]]:  # only for a re-delivery, under the lock
            with gc_paused():
                return [item if isinstance(item, tuple) else stored_item(item) for item in batch]

        with gc_paused():
            await asyncio.sleep(0)  # the batch being written goes first
            converted: list[tuple[Any, ...]] = []
            for start in range(0, len(batch), _SLICE):
                converted += [item if isinstance(item, tuple) else stored_item(item)
                              for item in batch[start:start + _SLICE]]
                await asyncio.sleep(0)
            # Against nothing stored: only repeats within the batch are dropped.
            fresh, own = split_fresh(converted, {})
            if fresh is not converted:
                return Batch(None, {}, [], items)  # the transaction sorts it out
            groups: dict[Any, list[tuple[Any, ...]]] = {}
            folds = writer.fold(converted, groups)
            del converted, fresh
            await asyncio.sleep(0)
            blocks: list[tuple[Any, ...]] = []
            some: dict[Any, list[tuple[Any, ...]]] = {}  # small groups, encoded together
            count = 0
            for trace_id, group in groups.items():
                if len(group) > BLOCK_EVENTS:  # a big share of a trace: a block at a time
                    blocks += block_rows(some, folds, BLOCK_EVENTS)
                    some, count = {}, 0
                    for offset in range(0, len(group), BLOCK_EVENTS):
                        ((_, _, n, lo, hi, data),) = block_rows(
                            {trace_id: group[offset:offset + BLOCK_EVENTS]}, None, BLOCK_EVENTS)
                        blocks.append((trace_id, offset, n, lo, hi, data))
                        await asyncio.sleep(0)
                    continue
                some[trace_id] = group
                count += len(group)
                if count >= _SLICE:
                    blocks += block_rows(some, folds, BLOCK_EVENTS)
                    some, count = {}, 0
                    await asyncio.sleep(0)
            blocks += block_rows(some, folds, BLOCK_EVENTS)
            del groups, some
        return Batch(own, folds, blocks, items)

    async def _write(self, prepared: tuple[list[Any], Any, bool]
                     ) -> Sequence[StoredEvent | tuple[Any, ...]]:
        """Store a prepared batch in one transaction; return the events that were new.

        Events whose ``(flow_id, seq)`` is already stored (or repeated in the batch)
        are skipped; events without a flow id are always stored. The items returned
        are the batch's own (StoredEvents or runtime tuples), in order.
        """
        async with self._write_lock:
            return await self._write_locked(prepared)

    async def _write_locked(self, prepared: tuple[list[Any], Any, bool]) -> list[Any]:
        batch, data, grouped = prepared
        if isinstance(data, Batch):  # on the loop, with the pool
            pool = self._checked_pool()
            with self._errors("writing events"):
                async with pool.acquire() as conn:
                    skipped = await self._batch_writer.write(conn, data)
        else:
            assert self._proc_writer is not None
            try:
                skipped = await self._proc_writer.request(b"W", data)
            except WriterError as exc:
                if not (exc.starting and exc.gone):
                    raise self._writer_error(exc) from exc
                # No writer process can be had here (spawning failed, or it died
                # before answering): write on the loop from now on, as
                # writer="loop" would, this batch included: nothing is lost. A
                # database error reported by a live writer is not this case.
                self._proc_writer, self._starting = None, None
                self._sealing = False
                logger.warning("state_store_writer_process_unavailable", extra={
                    "store": repr(self), "error": str(exc),
                    "fallback": "writing on the event loop (writer='loop')"})
                return await self._write_locked((batch, await self._folded(batch), False))
        # Positions are the blocks' (grouped by trace) when the batch went as blocks.
        return kept_items(batch, skipped, grouped=grouped)

    # -- queries ------------------------------------------------------------------

    async def _ready(self) -> Any:
        """Flush (so the store reads its own writes), open, return the pool."""
        await self.flush()
        await self.open()
        return self._checked_pool()

    async def load_history(self, trace_id: str) -> list[StoredEvent]:
        """The events of ``trace_id`` in order of occurrence (all fields restored).

        Raises:
            StateStoreError: also when a block of the trace cannot be decoded.
        """
        pool = await self._ready()
        with self._errors("loading a trace"):
            rows = await pool.fetch(self._sql_history, trace_id)
        events: list[StoredEvent] = []
        with gc_paused():
            for block_id, data in rows:
                with self._reading(block_id):
                    events += events_of(decode_block(data))
        return events

    async def load_history_page(self, trace_id: str, *, offset: int = 0,
                                limit: int) -> list[StoredEvent]:
        """At most ``limit`` events of ``trace_id`` after the first ``offset`` (see TraceStore).

        Only the blocks holding those events are read (sought on the
        ``(trace_key, first)`` index), and only the events returned are built.

        Raises:
            ValueError: ``limit < 1`` or ``offset < 0``.
            StateStoreError: also when one of those blocks cannot be decoded.
        """
        check_page(offset, limit)
        pool = await self._ready()
        with self._errors("loading a trace"):
            rows = await pool.fetch(self._sql_history_page, trace_id, offset, limit)
        events: list[StoredEvent] = []
        if not rows:
            return events
        skip = offset - rows[0][1]  # events of the first block before the page
        with gc_paused():
            for block_id, _, data in rows:
                with self._reading(block_id):
                    items = decode_block(data)
                    if skip >= len(items):
                        skip -= len(items)
                        continue
                    events += events_of(items[skip:skip + limit - len(events)])
                    skip = 0
                if len(events) == limit:
                    break
        return events

    @contextlib.contextmanager
    def _reading(self, block_id: int) -> Iterator[None]:
        """Name the block (and where it is) in a decoding error raised inside."""
        try:
            yield
        except StateStoreError as exc:
            raise StateStoreError(
                f"Postgres at {self._where} (schema {self.schema!r}): event block "
                f"{block_id} (blocks.id) cannot be read: {exc}") from exc

    async def list_traces(self, filter: TraceFilter | None = None) -> list[TraceSummary]:
        """Summaries matching ``filter`` (default: the 50 newest), as ``filter.apply`` orders.

        Ties are broken like the in-memory store's stable sort: the trace stored
        first comes first.
        """
        f = filter or TraceFilter()
        args: list[Any] = []

        def arg(value: Any) -> str:
            args.append(value)
            return f"${len(args)}"

        where = []
        if f.status is not None:
            where.append(f"status = {arg(f.status)}")
        if f.node is not None:
            where.append(f"{arg(f.node)} = ANY(nodes)")
        if f.has_errors is not None:
            where.append("error_count > 0" if f.has_errors else "error_count = 0")
        if f.since is not None:
            where.append(f"started_ts >= {arg(float(f.since))}")
        if f.until is not None:
            where.append(f"started_ts < {arg(float(f.until))}")
        if f.order == "slowest":
            # Same arithmetic as TraceSummary.duration_ms, so equal floats tie alike.
            order = "(ended_ts - started_ts) * 1000.0 DESC, started_ts DESC, first_seen"
        else:
            order = "started_ts DESC, first_seen"
        sql = (f"SELECT {_SUMMARY_COLUMNS} FROM {self._s}.traces"
               f"{' WHERE ' + ' AND '.join(where) if where else ''}"
               f" ORDER BY {order} LIMIT {arg(f.limit)}")
        pool = await self._ready()
        with self._errors("listing traces"):
            rows = await pool.fetch(sql, *args)
        return [_summary(row) for row in rows]

    async def get_trace(self, trace_id: str) -> TraceSummary | None:
        """The summary of ``trace_id``, or None."""
        pool = await self._ready()
        with self._errors("reading a trace summary"):
            row = await pool.fetchrow(
                f"SELECT {_SUMMARY_COLUMNS} FROM {self._s}.traces WHERE trace_id = $1",
                trace_id)
        return None if row is None else _summary(row)

    async def resolve_trace_id(self, prefix: str) -> list[str]:
        """Trace ids starting with ``prefix`` (at most 10, sorted by code point)."""
        pattern = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        pool = await self._ready()
        with self._errors("resolving a trace id"):
            rows = await pool.fetch(
                f"SELECT trace_id FROM {self._s}.traces WHERE trace_id LIKE $1 ESCAPE '\\' "
                f"ORDER BY trace_id LIMIT 10", pattern)
        return [str(row[0]) for row in rows]

    async def save_remote_binding(self, binding: RemoteBinding) -> None:
        """Store ``binding`` now (bindings are not buffered); a repeated one is stored once."""
        await self.open()
        pool = self._checked_pool()
        with self._errors("saving a remote binding"):
            await pool.execute(
                f"INSERT INTO {self._s}.bindings (trace_id, context_id, task_id, agent_url) "
                f"VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                binding.trace_id, binding.context_id, binding.task_id, binding.agent_url)

    async def load_bindings(self, *, trace_id: str | None = None,
                            context_id: str | None = None,
                            task_id: str | None = None) -> list[RemoteBinding]:
        """Bindings matching every given id, in the order they were saved.

        Raises:
            ValueError: no id was given.
        """
        if trace_id is None and context_id is None and task_id is None:
            raise ValueError("load_bindings needs trace_id, context_id or task_id")
        given = {"trace_id": trace_id, "context_id": context_id, "task_id": task_id}
        where, args = [], []
        for column, value in given.items():
            if value is not None:
                args.append(value)
                where.append(f"{column} = ${len(args)}")
        await self.open()
        pool = self._checked_pool()
        with self._errors("loading remote bindings"):
            rows = await pool.fetch(
                f"SELECT trace_id, context_id, task_id, agent_url FROM {self._s}.bindings "
                f"WHERE {' AND '.join(where)} ORDER BY id", *args)
        return [RemoteBinding(row[0], row[1], row[2], row[3]) for row in rows]

    # -- follow -------------------------------------------------------------------

    async def follow(self, trace_id: str | None = None) -> AsyncIterator[StoredEvent]:
        """Yield each event of ``trace_id`` (or of every trace) once it is committed.

        Events written by any store on this schema, in any process, are yielded,
        in order of occurrence; only events committed after the follow started
        listening are (read ``load_history`` first for the past). Ends when this
        store is closed. Uses a connection of its own; close the iterator
        (``aclose()``, or ``contextlib.aclosing``) to release it early.

        Raises:
            StoreUnavailable: the server cannot be reached, or the listening
                connection was lost (re-follow from the last event seen).
        """
        await self.open()
        wake: asyncio.Queue[str | None] = asyncio.Queue()

        def on_notify(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
            wake.put_nowait(payload)

        def on_lost(_conn: Any) -> None:
            wake.put_nowait(_LISTENER_LOST)

        with self._errors("starting to follow"):
            conn = await asyncpg.connect(self._dsn, timeout=self._connect_timeout_s,
                                         server_settings={"application_name": "penguiflow"})
        try:
            with self._errors("starting to follow"):
                await _init_connection(conn)
                # LISTEN before reading the high-water mark: a batch committed in
                # between is then either below the mark or announced.
                await conn.add_listener(self._channel, on_notify)
                conn.add_termination_listener(on_lost)
                # Every trace: the last block id; one trace: the index of its next
                # event (see _sql_follow_trace).
                last = int(await (conn.fetchval(self._sql_last_block) if trace_id is None
                                  else conn.fetchval(self._sql_trace_end, trace_id)))
            self._follow_wakes.add(wake)
            while True:
                payloads = [await wake.get()]
                while not wake.empty():  # one query for a burst of notifications
                    payloads.append(wake.get_nowait())
                if None in payloads:
                    return
                if _LISTENER_LOST in payloads:
                    raise StoreUnavailable(
                        f"lost the listening connection to Postgres at {self._where}; "
                        f"follow again (from load_history) once the server is back")
                if trace_id is not None and not any(_mentions(p, trace_id) for p in payloads):
                    continue
                with self._errors("following"):
                    rows = await (conn.fetch(self._sql_follow_all, last) if trace_id is None
                                  else conn.fetch(self._sql_follow_trace, trace_id, last))
                for row in rows:
                    with gc_paused(), self._reading(row[0]):
                        events = events_of(decode_block(row[-1]))
                    # Advanced before yielding: the consumer may stop at any event.
                    last = row[0] if trace_id is None else row[1] + row[2]
                    for event in events:
                        yield event
        finally:
            self._follow_wakes.discard(wake)
            try:
                await asyncio.wait_for(conn.close(), 5.0)
            except Exception:
                conn.terminate()  # the server is gone or slow: drop the socket


# -- helpers ------------------------------------------------------------------------


async def _init_connection(conn: Any) -> None:
    # Binary format, because COPY is binary; the wire form of json is its text, so
    # the encoder takes an already-serialised str and the decoder parses the bytes.
    await conn.set_type_codec("json", schema="pg_catalog", format="binary",
                              encoder=str.encode, decoder=_load_json)


_raw_decode = json.JSONDecoder().raw_decode


def _load_json(data: bytes) -> Any:
    # raw_decode on the decoded text skips json.loads' encoding detection and
    # whitespace handling: ~1.8 us instead of ~3 us for an event payload.
    try:
        return _raw_decode(data.decode())[0]
    except ValueError:  # e.g. leading whitespace in a row written by other tools
        return json.loads(data)


def _summary(row: Any) -> TraceSummary:
    return TraceSummary(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7],
                        row[8], tuple(sorted(row[9])))


def _mentions(payload: str | None, trace_id: str) -> bool:
    if payload is None or payload == ANY_TRACE:
        return True
    try:
        return trace_id in json.loads(payload)
    except ValueError:  # not ours: check rather than miss an event
        return True


def _describe_dsn(dsn: str) -> str:
    """The DSN without password or query string (which may carry one)."""
    try:
        parts = urlsplit(dsn)
        query_host = parse_qs(parts.query).get("host", [""])[0]
    except ValueError:
        return "<unparseable DSN>"
    if not parts.scheme:
        return "<key=value DSN>"  # libpq keyword form: do not echo it (password=...)
    user, _, hosts = parts.netloc.rpartition("@")
    user = user.partition(":")[0]
    hosts = hosts or query_host or "localhost"
    if "," not in hosts and not hosts.startswith("/") and not re.search(r":\d+$", hosts):
        hosts += ":5432"
    return f"{parts.scheme}://{user + '@' if user else ''}{hosts}{parts.path}"
