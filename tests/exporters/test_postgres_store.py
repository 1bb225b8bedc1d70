"""PostgresStateStore against a real server.

The server comes from the ``pg_dsn`` fixture (tests/exporters/conftest.py):
``$TEST_PG_DSN``, else a throwaway cluster; without either the tests skip, or fail
when ``CI=true``. The restart test uses a cluster of its own (``pg_cluster``).
Every test works in schemas of its own (``pf_test_<random>``), dropped at
teardown. A second store on the same schema stands for another process: it has
its own pool, writer and server sessions. The tests taking ``make`` run with each
writer (``writer="process"``, the default, and ``"loop"``).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import logging
import math
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import asyncpg  # type: ignore[import-untyped]
import pytest
from store_support import PgCluster, fields

import penguiflow_exporters
from penguiflow import Headers, Message, Node, NodePolicy, create
from penguiflow.state import (
    ERROR_KINDS,
    EVENTS_LOST_KIND,
    TERMINAL_KINDS,
    InMemoryStateStore,
    RemoteBinding,
    StateStoreError,
    StoredEvent,
    StoreUnavailable,
    TraceFilter,
    TraceSummaryBuilder,
    stored_from_fields,
)
from penguiflow_exporters._blocks import encode_block
from penguiflow_exporters._folds import fold_rows, merge_ranges
from penguiflow_exporters._records import Row, rows_of
from penguiflow_exporters.postgres import SCHEMA_VERSION, PostgresStateStore
from penguiflow_exporters.writer import WriteResult

MakeStore = Callable[..., Awaitable[PostgresStateStore]]


@pytest.fixture(params=["process", "loop"])
def writer(request: pytest.FixtureRequest) -> str:
    """The ``writer`` option of the stores ``make`` builds."""
    return str(request.param)


@pytest.fixture
async def make(pg_dsn: str, writer: str) -> AsyncIterator[MakeStore]:
    """``await make(schema=None, **options)``: an opened store; a new schema unless given.

    ``writer`` is the fixture's unless given. Every store is closed and every schema
    dropped at teardown.
    """
    stores: list[PostgresStateStore] = []
    schemas: list[str] = []

    async def factory(schema: str | None = None, **options: Any) -> PostgresStateStore:
        if schema is None:
            schema = f"pf_test_{uuid.uuid4().hex[:8]}"
            schemas.append(schema)
        options.setdefault("writer", writer)
        store = PostgresStateStore(pg_dsn, schema=schema, **options)
        stores.append(store)
        await store.open()
        return store

    try:
        yield factory
    finally:
        for store in stores:
            with contextlib.suppress(Exception):
                await store.close()
        conn = await asyncpg.connect(pg_dsn)
        try:
            for schema in schemas:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()


@pytest.fixture
async def sql(pg_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain connection, to look at what the store wrote."""
    conn = await asyncpg.connect(pg_dsn)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def schema(sql: asyncpg.Connection) -> AsyncIterator[str]:
    """A schema name nothing uses yet, dropped at teardown (for schemas built by hand)."""
    name = f"pf_test_{uuid.uuid4().hex[:8]}"
    try:
        yield name
    finally:
        await sql.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


def ev(trace: Any, seq: int, kind: str = "node_start", node: Any = "a", *,
       flow: str | None = "flow-1", ts: float | None = None, attempt: int = 0,
       payload: dict[str, Any] | None = None, **ids: Any) -> StoredEvent:
    return StoredEvent(trace, 1000.0 + seq if ts is None else ts, kind, node,
                       None if node is None else f"{node}-id",
                       {"seq": seq, "kind": kind} if payload is None else payload,
                       seq=seq, flow_id=flow, flow_name="demo", attempt=attempt, **ids)


def lost_marker(trace: str, count: int, *, ts: float) -> StoredEvent:
    """A ``store_events_lost`` marker, as the processor writes one."""
    return StoredEvent(trace, ts, EVENTS_LOST_KIND, None, None,
                       {"events_lost": count, "reason": "test"})


def fold(trace_id: str, events: Sequence[StoredEvent]) -> Any:
    builder = TraceSummaryBuilder(trace_id)
    for event in events:
        builder.add(event)
    return builder.summary()


def refused_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def writer_of(store: PostgresStateStore) -> Any:
    """The store's writer, once its first batch made it (None before)."""
    assert store._processor is not None
    return store._processor.writer._writer  # type: ignore[attr-defined]


def process_of(store: PostgresStateStore) -> Any:
    """The store's writer process (AsyncWriterProcess), if it writes through one."""
    writer = writer_of(store)
    return None if writer is None or writer.process is None else writer.process.process


async def catalog(sql: asyncpg.Connection, schema: str) -> list[tuple[Any, ...]]:
    """What a schema holds: its tables' columns (name, type, nullability, default,
    generation) and its indexes, sorted; empty when the schema does not exist."""
    columns = await sql.fetch(
        "SELECT table_name, column_name, data_type, is_nullable, column_default, "
        "generation_expression FROM information_schema.columns WHERE table_schema = $1",
        schema)
    indexes = await sql.fetch(
        "SELECT 'index', tablename, indexdef FROM pg_indexes WHERE schemaname = $1", schema)
    exists = await sql.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname = $1", schema)
    # The schema's name, where it appears (index definitions, sequence defaults), as S.
    return sorted([("schema", exists), *(
        tuple(v.replace(schema, "S") if isinstance(v, str) else v for v in row)
        for row in [*columns, *indexes])], key=repr)


# -- schema ------------------------------------------------------------------------------


async def test_open_creates_the_current_schema_directly(
        make: MakeStore, sql: asyncpg.Connection) -> None:
    store = await make()
    tables = {r[0] for r in await sql.fetch(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = $1",
        store.schema)}
    assert tables == {"blocks", "flow_seqs", "traces", "bindings", "schema_version"}
    assert await sql.fetchval(
        "SELECT data_type FROM information_schema.columns WHERE table_schema = $1 "
        "AND table_name = 'blocks' AND column_name = 'data'", store.schema) == "text"
    again = await make(schema=store.schema)  # current already: nothing to do
    assert again.schema == store.schema
    rows = await sql.fetch(f'SELECT version FROM "{store.schema}".schema_version')
    assert [r[0] for r in rows] == [SCHEMA_VERSION] == [5]


async def test_concurrent_opens_create_the_schema_once(make: MakeStore,
                                                      sql: asyncpg.Connection) -> None:
    first = await make()
    await sql.execute(f'DROP SCHEMA "{first.schema}" CASCADE')  # start from nothing
    # Separate pools, so separate server sessions: what several processes would do.
    await asyncio.gather(*(make(schema=first.schema) for _ in range(4)))
    rows = await sql.fetch(f'SELECT version FROM "{first.schema}".schema_version')
    assert [r[0] for r in rows] == [SCHEMA_VERSION]


async def test_a_newer_schema_version_is_refused(make: MakeStore,
                                                 sql: asyncpg.Connection) -> None:
    store = await make()
    await sql.execute(f'INSERT INTO "{store.schema}".schema_version (version) VALUES ($1)',
                      SCHEMA_VERSION + 1)
    with pytest.raises(StateStoreError, match=rf"version {SCHEMA_VERSION + 1}, newer") as info:
        await make(schema=store.schema)
    assert not isinstance(info.value, StoreUnavailable)


@pytest.mark.parametrize("version", [1, 2, 3])
async def test_an_old_schema_version_is_refused_and_left_unchanged(
        pg_dsn: str, sql: asyncpg.Connection, schema: str, version: int) -> None:
    s = f'"{schema}"'
    await sql.execute(
        f"CREATE SCHEMA {s}; CREATE TABLE {s}.schema_version (version integer PRIMARY KEY, "
        f"applied_ts double precision NOT NULL DEFAULT 0);"
        f"CREATE TABLE {s}.events (id bigserial PRIMARY KEY, trace_id text, payload json);"
        f"INSERT INTO {s}.events (trace_id, payload) VALUES ('t', '{{}}')")
    await sql.executemany(f"INSERT INTO {s}.schema_version (version) VALUES ($1)",
                          [(v,) for v in range(1, version + 1)])
    before = await catalog(sql, schema)
    store = PostgresStateStore(pg_dsn, schema=schema, writer="loop")
    with pytest.raises(StateStoreError) as info:
        await store.open()
    await store.close()
    message = str(info.value)
    assert f"has version {version}" in message and "migrates version 4" in message
    assert "another schema" in message and not isinstance(info.value, StoreUnavailable)
    assert await catalog(sql, schema) == before
    assert await sql.fetchval(f"SELECT max(version) FROM {s}.schema_version") == version
    assert await sql.fetchval(f"SELECT count(*) FROM {s}.events") == 1


_FOREIGN_SCHEMAS = {
    # Another application's: it counts its own migrations in a schema_version table.
    "its own version 5": "CREATE TABLE {s}.schema_version (version integer); "
                         "INSERT INTO {s}.schema_version VALUES (5); "
                         "CREATE TABLE {s}.users (id int PRIMARY KEY)",
    "flyway's table": "CREATE TABLE {s}.schema_version (version varchar(50), script text); "
                      "INSERT INTO {s}.schema_version VALUES ('1.0', 'V1__init.sql')",
    "a traces table": "CREATE TABLE {s}.traces (id int PRIMARY KEY, note text)",
}


@pytest.mark.parametrize("readonly", [False, True])
@pytest.mark.parametrize("shape", sorted(_FOREIGN_SCHEMAS))
async def test_a_foreign_schema_is_refused_at_open_and_left_unchanged(
        pg_dsn: str, sql: asyncpg.Connection, schema: str, shape: str,
        readonly: bool) -> None:
    # A foreign schema_version holding 5 was taken for a store: open succeeded and
    # every write then failed (split event by event); Flyway's gave a type error; a
    # foreign traces table, DuplicateTableError.
    s = f'"{schema}"'
    await sql.execute(f"CREATE SCHEMA {s}; " + _FOREIGN_SCHEMAS[shape].format(s=s))
    before = await catalog(sql, schema)
    store = PostgresStateStore(pg_dsn, schema=schema, writer="loop", readonly=readonly)
    with pytest.raises(StateStoreError, match="is not a penguiflow store") as info:
        await store.open()
    await store.close()
    assert "\n" not in str(info.value) and not isinstance(info.value, StoreUnavailable)
    assert await catalog(sql, schema) == before


async def test_a_role_without_create_on_the_database_opens_a_schema_made_for_it(
        pg_dsn: str, sql: asyncpg.Connection, schema: str) -> None:
    # CREATE SCHEMA IF NOT EXISTS needs CREATE on the database even when the schema
    # exists: the usual production set-up (a DBA makes the schema for the app's role)
    # failed with "permission denied for database".
    role = f"pf_role_{uuid.uuid4().hex[:8]}"
    await sql.execute(f"CREATE ROLE {role} LOGIN; "
                      f'CREATE SCHEMA "{schema}" AUTHORIZATION {role}')
    # (A role gets no CREATE on a database by default: PUBLIC has CONNECT and TEMP.)
    parts = urlsplit(pg_dsn)
    dsn = parts._replace(netloc=f"{role}@{parts.hostname}:{parts.port or 5432}").geturl()
    store = PostgresStateStore(dsn, schema=schema, writer="loop")
    try:
        await store.save_events([ev("t", 1)])
        await store.flush()
        assert [e.seq for e in await store.load_history("t")] == [1]
    finally:
        await store.close()
        await sql.execute(f'DROP SCHEMA "{schema}" CASCADE; DROP ROLE {role}')


async def test_a_reader_role_granted_some_tables_only_reads_them(
        pg_dsn: str, make: MakeStore, sql: asyncpg.Connection) -> None:
    # The layout check read information_schema, which shows a role only the columns
    # it has a privilege on: a reader granted the trace tables alone was refused as
    # "not a penguiflow store".
    store = await make()
    await store.save_events([ev("t", 1)])
    await store.flush()
    role = f"pf_reader_{uuid.uuid4().hex[:8]}"
    s = f'"{store.schema}"'
    await sql.execute(f"CREATE ROLE {role} LOGIN; GRANT USAGE ON SCHEMA {s} TO {role}; "
                      f"GRANT SELECT ON {s}.schema_version, {s}.traces, {s}.blocks TO {role}")
    parts = urlsplit(pg_dsn)
    dsn = parts._replace(netloc=f"{role}@{parts.hostname}:{parts.port or 5432}").geturl()
    reader = PostgresStateStore(dsn, schema=store.schema, readonly=True)
    try:
        assert [t.trace_id for t in await reader.list_traces()] == ["t"]
        assert len(await reader.load_history("t")) == 1
    finally:
        await reader.close()
        await sql.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")


def test_schema_name_is_validated() -> None:
    with pytest.raises(ValueError, match="lowercase identifier"):
        PostgresStateStore("postgresql://x@127.0.0.1/db", schema='Bad"Name')


# -- schema 4: built by hand as the version-4 store left it ------------------------------

# The version-4 layout, frozen (the DDL the store wrote through migrations 1-4).
_V4_DDL = """
CREATE SCHEMA {s};
CREATE TABLE {s}.schema_version (version integer PRIMARY KEY,
    applied_ts double precision NOT NULL DEFAULT extract(epoch FROM now()));
INSERT INTO {s}.schema_version (version) VALUES (1), (2), (3), (4);
CREATE TABLE {s}.traces (
    trace_id text COLLATE "C" PRIMARY KEY,
    first_seen bigint GENERATED BY DEFAULT AS IDENTITY,
    flow_name text, started_ts double precision NOT NULL, ended_ts double precision NOT NULL,
    node_count integer NOT NULL, error_count integer NOT NULL,
    remote_call_count integer NOT NULL, event_count bigint NOT NULL,
    open_count integer NOT NULL, cancelled boolean NOT NULL, failed boolean NOT NULL,
    nodes text[] NOT NULL,
    status text GENERATED ALWAYS AS (
        CASE WHEN cancelled THEN 'cancelled' WHEN failed THEN 'failed'
             WHEN open_count > 0 THEN 'running' ELSE 'succeeded' END) STORED);
CREATE INDEX traces_started_idx ON {s}.traces (started_ts DESC);
CREATE UNIQUE INDEX traces_first_seen_idx ON {s}.traces (first_seen);
CREATE TABLE {s}.bindings (id bigserial PRIMARY KEY, trace_id text COLLATE "C" NOT NULL,
    context_id text, task_id text, agent_url text);
CREATE UNIQUE INDEX bindings_unique_idx ON {s}.bindings (trace_id,
    (context_id IS NULL), COALESCE(context_id, ''), (task_id IS NULL), COALESCE(task_id, ''),
    (agent_url IS NULL), COALESCE(agent_url, ''));
CREATE INDEX bindings_context_idx ON {s}.bindings (context_id);
CREATE INDEX bindings_task_idx ON {s}.bindings (task_id);
CREATE TABLE {s}.blocks (id bigserial PRIMARY KEY, trace_key bigint, first bigint NOT NULL,
    n integer NOT NULL, ts_lo double precision NOT NULL, ts_hi double precision NOT NULL,
    data bytea NOT NULL);
CREATE INDEX blocks_trace_idx ON {s}.blocks (trace_key, first);
CREATE TABLE {s}.flow_seqs (flow_id text COLLATE "C" NOT NULL, lo bigint NOT NULL,
    hi bigint NOT NULL, PRIMARY KEY (flow_id, lo));
"""


def v4_block(items: Sequence[tuple[Any, ...]]) -> bytes:
    """A block as the version-4 store pickled it: one pickle of the items when all are
    runtime items (23 fields), else two with one memo (the first 14 fields, the rest)."""
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, 5)
    if all(len(item) == 23 for item in items):
        pickler.dump(list(items))
    else:
        pickler.dump([item[:14] for item in items])
        pickler.dump([item[14:] for item in items])
    return buffer.getvalue()


def v4_item(event: Any) -> tuple[Any, ...]:
    """The item the version-4 store kept for a buffered event (EventRecord or StoredEvent)."""
    if isinstance(event, tuple):
        return tuple(event)
    return (event.trace_id, event.ts, event.kind, event.node_name, event.node_id,
            event.invocation_id, event.parent_invocation_ids, event.span_id,
            event.parent_span_id, event.seq, event.attempt, event.queued_ts, event.flow_name,
            event.flow_id, event.payload)


async def make_v4_schema(sql: asyncpg.Connection, schema: str,
                         batches: Sequence[Sequence[Any]], block_events: int = 2000) -> None:
    """A schema as the version-4 store left it after writing ``batches`` (EventRecords
    and StoredEvents): per batch, each trace's share as blocks of at most
    ``block_events`` events, summaries folded, seq ranges per flow."""
    s = f'"{schema}"'
    await sql.execute(_V4_DDL.format(s=s))
    ranges: dict[Any, list[tuple[int, int]]] = {}
    for batch in batches:
        rows = rows_of(batch)
        folds = fold_rows(rows, terminal=TERMINAL_KINDS, errors=ERROR_KINDS)
        for trace_id, f in folds.items():
            await sql.execute(
                f"INSERT INTO {s}.traces AS t (trace_id, flow_name, started_ts, ended_ts, "
                f"node_count, error_count, remote_call_count, event_count, open_count, "
                f"cancelled, failed, nodes) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12) "
                f"ON CONFLICT (trace_id) DO UPDATE SET ended_ts = GREATEST(t.ended_ts, "
                f"EXCLUDED.ended_ts), started_ts = LEAST(t.started_ts, EXCLUDED.started_ts), "
                f"node_count = t.node_count + EXCLUDED.node_count, error_count = "
                f"t.error_count + EXCLUDED.error_count, event_count = t.event_count + "
                f"EXCLUDED.event_count, open_count = t.open_count + EXCLUDED.open_count, "
                f"failed = t.failed OR EXCLUDED.failed, cancelled = t.cancelled OR "
                f"EXCLUDED.cancelled, nodes = ARRAY(SELECT DISTINCT n FROM "
                f"unnest(t.nodes || EXCLUDED.nodes) AS n)",
                trace_id, f.flow_name, f.started, f.ended, f.starts, f.errors, f.remotes,
                f.events, f.open, f.cancelled, f.failed, sorted(f.nodes))
        groups: dict[Any, list[Any]] = {}
        for event in batch:
            groups.setdefault(event[0] if isinstance(event, tuple) else event.trace_id,
                              []).append(event)
        for trace_id, group in groups.items():
            first = 0 if trace_id is None else await sql.fetchval(
                f"SELECT coalesce(max(first + n), 0) FROM {s}.blocks WHERE trace_key = "
                f"(SELECT first_seen FROM {s}.traces WHERE trace_id = $1)", trace_id)
            for offset in range(0, len(group), block_events):
                chunk = [v4_item(e) for e in group[offset:offset + block_events]]
                stamps = [item[1] for item in chunk]
                await sql.execute(
                    f"INSERT INTO {s}.blocks (trace_key, first, n, ts_lo, ts_hi, data) "
                    f"VALUES ((SELECT first_seen FROM {s}.traces WHERE trace_id = $1), $2, $3, "
                    f"$4, $5, $6)", trace_id, first + offset if trace_id is not None else 0,
                    len(chunk), min(stamps), max(stamps), v4_block(chunk))
        for row in rows:
            if row.flow_id is not None:
                ranges[row.flow_id] = merge_ranges(ranges.get(row.flow_id, []), [row.seq])
    await sql.executemany(f"INSERT INTO {s}.flow_seqs (flow_id, lo, hi) VALUES ($1, $2, $3)",
                          [(f, lo, hi) for f, rs in ranges.items() for lo, hi in rs])


def v4_batches() -> list[list[Any]]:
    """Two batches of what a version-4 store held: runtime events (with and without
    extras and parents, two flows), StoredEvents with nested payloads and non-ASCII
    text, an event without a trace; trace "rt" spans several blocks."""
    runtime = [fields("rt", i, "node_start" if i % 2 else "node_success", node=f"n{i % 3}",
                      extra={"k": i, "deep": {"l": [1, 2.5, None]}} if i % 5 == 0 else None)
               for i in range(1, 26)]
    stored = [ev("st", 100 + i, "node_error" if i % 3 == 0 else "custom", "x",
                 payload={"i": i, "text": "pingüino ✓ \x00 \udc80", "nested": {"l": [True, None]}},
                 parent_invocation_ids=("a", "b"), span_id=f"q{i}") for i in range(6)]
    traceless = [ev(None, 200, "flow_cancelled", node=None)]
    return [[*runtime[:15], *stored[:3]], [*runtime[15:], *stored[3:], *traceless]]


async def test_a_v4_schema_is_migrated_in_place_and_every_event_reads_back_equal(
        make: MakeStore, sql: asyncpg.Connection, schema: str) -> None:
    batches = v4_batches()
    await make_v4_schema(sql, schema, batches, block_events=10)  # "rt": blocks of 10
    expected = [stored_from_fields(e) if isinstance(e, tuple) else e
                for batch in batches for e in batch]
    reference = InMemoryStateStore()
    await reference.save_events(expected)
    store = await make(schema=schema)
    for trace_id in ("rt", "st"):
        history = await store.load_history(trace_id)
        assert history == [e for e in expected if e.trace_id == trace_id]
        assert history == await reference.load_history(trace_id)
        assert await store.get_trace(trace_id) == await reference.get_trace(trace_id)
        assert await store.load_history_page(trace_id, offset=2, limit=11) == history[2:13]
    assert await store.list_traces() == await reference.list_traces()
    rows = await sql.fetch(f'SELECT version FROM "{schema}".schema_version ORDER BY 1')
    assert [r[0] for r in rows] == [1, 2, 3, 4, SCHEMA_VERSION]
    # Later writes: old events re-delivered are dropped (the seq ranges were kept), new
    # ones go after them.
    later = [fields("rt", 26, "node_success"), ev("st", 150)]
    await store.save_events([*batches[0][:3], ev("st", 101)])
    store.save_event_fields(later[0])  # type: ignore[arg-type]
    await store.save_events(later[1:])
    await reference.save_events([stored_from_fields(later[0]), later[1]])  # type: ignore[arg-type]
    for trace_id in ("rt", "st"):
        assert await store.load_history(trace_id) == await reference.load_history(trace_id)
        assert await store.get_trace(trace_id) == await reference.get_trace(trace_id)
    assert store.failures == {}


async def test_a_migrated_schema_has_the_layout_of_a_new_one(
        make: MakeStore, sql: asyncpg.Connection, schema: str) -> None:
    await make_v4_schema(sql, schema, v4_batches())
    migrated = await make(schema=schema)
    fresh = await make()
    assert await catalog(sql, migrated.schema) == await catalog(sql, fresh.schema)


async def test_a_v4_block_that_is_not_plain_data_stops_the_migration_unchanged(
        pg_dsn: str, sql: asyncpg.Connection, schema: str) -> None:
    await make_v4_schema(sql, schema, v4_batches())
    s = f'"{schema}"'
    block_id = await sql.fetchval(f"SELECT max(id) FROM {s}.blocks")

    class Evil:
        def __reduce__(self) -> Any:
            return (os.system, ("echo pwned",))

    await sql.execute(f"UPDATE {s}.blocks SET data = $1 WHERE id = $2",
                      pickle.dumps([Evil()], 5), block_id)
    before = await catalog(sql, schema)
    store = PostgresStateStore(pg_dsn, schema=schema, writer="loop")
    with pytest.raises(StateStoreError, match=rf"event block {block_id} \(blocks.id\) cannot "
                                              rf"be read .*nothing was changed") as info:
        await store.open()
    await store.close()
    assert "system" in str(info.value)  # it names what the block asked for, unrun
    assert await catalog(sql, schema) == before
    assert await sql.fetchval(f"SELECT max(version) FROM {s}.schema_version") == 4


class _BytesByCount:
    def __reduce__(self) -> Any:
        return (bytes, (10**9,))


@pytest.mark.parametrize("payload", [
    # bytes(n) would allocate n bytes (here 1 GB): refused, not run.
    pytest.param(lambda: pickle.dumps([_BytesByCount()], 5), id="bytes-by-count"),
    # One list referred to over and over: small as a pickle, huge once written out.
    pytest.param(lambda: _nested_references(40), id="unfolding-references"),
])
async def test_a_crafted_v4_block_is_refused_not_expanded(
        pg_dsn: str, sql: asyncpg.Connection, schema: str,
        payload: Callable[[], bytes]) -> None:
    await make_v4_schema(sql, schema, v4_batches())
    s = f'"{schema}"'
    block_id = await sql.fetchval(f"SELECT max(id) FROM {s}.blocks")
    await sql.execute(f"UPDATE {s}.blocks SET data = $1 WHERE id = $2", payload(), block_id)
    store = PostgresStateStore(pg_dsn, schema=schema, writer="loop")
    with pytest.raises(StateStoreError, match=rf"event block {block_id} .*nothing was changed"):
        await asyncio.wait_for(store.open(), 30)
    await store.close()
    assert await sql.fetchval(f"SELECT max(version) FROM {s}.schema_version") == 4


def _nested_references(levels: int) -> bytes:
    """A v4 block whose one event's payload is a list holding the same list twice,
    ``levels`` deep: ~2**levels values once unfolded."""
    value: Any = ["x"]
    for _ in range(levels):
        value = [value, value]
    item = v4_item(ev("rt", 1, payload={"v": value}))
    return v4_block([item])


# -- read-only stores never write --------------------------------------------------------


async def test_readonly_refuses_a_missing_schema_and_creates_nothing(
        pg_dsn: str, sql: asyncpg.Connection, schema: str) -> None:
    for store in (PostgresStateStore(pg_dsn, schema=schema, readonly=True),
                  penguiflow_exporters.open_store(pg_dsn, schema=schema, readonly=True)):
        with pytest.raises(StateStoreError, match=rf"has no schema '{schema}'") as info:
            await store.open()  # type: ignore[attr-defined]
        await store.close()
        assert "\n" not in str(info.value) and not isinstance(info.value, StoreUnavailable)
    assert await catalog(sql, schema) == [("schema", 0)]


async def test_readonly_refuses_a_foreign_schema_and_leaves_it_unchanged(
        pg_dsn: str, sql: asyncpg.Connection, schema: str) -> None:
    s = f'"{schema}"'
    await sql.execute(f"CREATE SCHEMA {s}; CREATE TABLE {s}.things (id int PRIMARY KEY, "
                      f"name text); INSERT INTO {s}.things VALUES (1, 'one')")
    before = await catalog(sql, schema)
    store = PostgresStateStore(pg_dsn, schema=schema, readonly=True)
    with pytest.raises(StateStoreError, match="is not a penguiflow store") as info:
        await store.list_traces()
    await store.close()
    assert "\n" not in str(info.value)
    assert await catalog(sql, schema) == before
    assert await sql.fetch(f"SELECT * FROM {s}.things") == [(1, "one")]


async def test_readonly_refuses_a_v4_schema_without_migrating_it(
        pg_dsn: str, sql: asyncpg.Connection, schema: str) -> None:
    await make_v4_schema(sql, schema, v4_batches())
    before = await catalog(sql, schema)
    store = PostgresStateStore(pg_dsn, schema=schema, readonly=True)
    with pytest.raises(StateStoreError, match=r"version 4, .*pf migrate .*without readonly"):
        await store.open()
    await store.close()
    assert await catalog(sql, schema) == before


async def test_readonly_reads_a_store_and_refuses_every_write(
        make: MakeStore, pg_dsn: str, sql: asyncpg.Connection) -> None:
    written = await make()
    events = [ev("t", 1), ev("t", 2, "node_success")]
    await written.save_events(events)
    await written.save_remote_binding(RemoteBinding("t", "c", "k", None))
    await written.flush()
    before = await catalog(sql, written.schema)
    reader = penguiflow_exporters.open_store(pg_dsn, schema=written.schema, readonly=True)
    async with reader:  # type: ignore[attr-defined]
        assert list(await reader.load_history("t")) == events
        assert await reader.get_trace("t") == await written.get_trace("t")
        assert await reader.load_bindings(trace_id="t") == [RemoteBinding("t", "c", "k", None)]
        with pytest.raises(StoreUnavailable, match="readonly"):
            await reader.save_event(ev("t", 3))
        with pytest.raises(StoreUnavailable, match="readonly"):
            await reader.save_remote_binding(RemoteBinding("t", "x", None, None))
        assert reader.failures == {}  # type: ignore[attr-defined]
    assert await catalog(sql, written.schema) == before


# -- writes ------------------------------------------------------------------------------


async def test_redelivered_events_are_stored_once(make: MakeStore) -> None:
    store = await make(batch_size=4)
    first = [ev("t1", i, "node_start" if i % 2 == 0 else "node_success", f"n{i // 2}")
             for i in range(6)]
    await store.save_events(first)
    await store.flush()
    before = await store.get_trace("t1")
    # Two already stored, one new, and the new one twice in the same batch.
    later = ev("t1", 6, "node_start", "n9")
    await store.save_events([first[2], first[3], later, later])
    await store.flush()
    history = await store.load_history("t1")
    assert history == [*first, later]
    after = await store.get_trace("t1")
    assert before is not None and after is not None
    assert (after.event_count, after.node_count) == (before.event_count + 1,
                                                     before.node_count + 1)
    assert after == fold("t1", history)
    assert store.failures == {}


async def test_events_without_a_flow_id_are_always_stored(make: MakeStore) -> None:
    store = await make()
    keyless = ev("t1", 1, flow=None)
    await store.save_events([keyless, keyless])
    assert await store.load_history("t1") == [keyless, keyless]


async def test_history_keeps_the_order_and_every_field(make: MakeStore) -> None:
    store = await make(batch_size=3)
    events = [
        StoredEvent("t1", 5.5, "node_start", "a", "a-id",
                    {"nested": {"list": [1, 2.5, None, True], "text": "pingüino ✓"}, "n": 1},
                    invocation_id="inv-1", parent_invocation_ids=("p1", "p2"), span_id="s1",
                    parent_span_id="s0", seq=1, attempt=2, queued_ts=5.25, flow_name="demo",
                    flow_id="f"),
        # Out of ts order on purpose: history is the order of occurrence, not of ts.
        ev("t1", 2, ts=1.0),
        ev(None, 3, "node_cancelled"),  # flow-level: belongs to no trace
        ev("t2", 4),
        ev("t1", 5, node=None),
        ev("t1", 6, "node_success"),
        ev("t1", 7, "node_success", parent_invocation_ids=("only",)),
    ]
    await store.save_events(events)
    history = await store.load_history("t1")
    assert history == [e for e in events if e.trace_id == "t1"]
    assert isinstance(history[0].parent_invocation_ids, tuple)
    assert isinstance(history[0].payload, dict)
    assert await store.load_history("missing") == []


async def test_payloads_keep_any_text_and_float_and_odd_values_become_plain(
        make: MakeStore, sql: asyncpg.Connection) -> None:
    # Blocks are JSON written ASCII-only: NUL, control characters and lone
    # surrogates travel as \\u escapes in a text column, NaN and the infinities as
    # JSON's extensions; what is not plain data is stored as its str.
    store = await make()
    text = "nul \x00 esc \x1b surrogate \udc80 pingüino ✓ 🐧"
    await store.save_events([
        StoredEvent("t1", 1.0, "node_error", "a", "a-id",
                    {"latency_ms": math.nan, "limit": -math.inf, "error": ValueError("boom"),
                     "text": text, text: [text]},
                    seq=1, flow_id="f"),
    ])
    (stored,) = await store.load_history("t1")
    assert math.isnan(stored.payload["latency_ms"])
    assert {k: v for k, v in stored.payload.items() if k != "latency_ms"} == {
        "limit": -math.inf, "error": "boom", "text": text, text: [text]}
    data = await sql.fetchval(f'SELECT data FROM "{store.schema}".blocks')
    assert data.isascii() and "\x00" not in data
    assert store.failures == {}


async def test_a_real_flow_is_recorded(make: MakeStore) -> None:
    store = await make()

    async def double(message: Message, ctx: Any) -> Message:
        return message.model_copy(update={"payload": message.payload * 2})

    async def add_one(message: Message, ctx: Any) -> Message:
        return message.model_copy(update={"payload": message.payload + 1})

    policy = NodePolicy(validate="none")
    first, second = Node(double, name="double", policy=policy), Node(add_one, name="add_one",
                                                                        policy=policy)
    flow = create(first.to(second), second.to(), state_store=store)
    flow.run()
    message = Message(payload=20, headers=Headers(tenant="acme"))
    try:
        await flow.emit(message)
        assert (await asyncio.wait_for(flow.fetch(), 5)).payload == 41
    finally:
        await asyncio.wait_for(flow.stop(), 5)  # flushes the store

    history = await store.load_history(message.trace_id)
    assert [e.kind for e in history] == ["node_start", "node_success"] * 2
    assert [e.node_name for e in history] == ["double", "double", "add_one", "add_one"]
    assert [e.seq for e in history] == sorted(e.seq for e in history)
    assert list(await flow.load_history(message.trace_id)) == history
    summary = await store.get_trace(message.trace_id)
    assert summary == fold(message.trace_id, history)
    assert summary is not None
    assert (summary.status, summary.nodes, summary.node_count) == (
        "succeeded", ("add_one", "double"), 2)
    assert store.failures == {}


async def blocks_of(sql: asyncpg.Connection, store: PostgresStateStore,
                    trace_id: str | None) -> list[tuple[int, int]]:
    """``(first, n)`` of the blocks of ``trace_id`` (None: the trace-less ones), in order."""
    s = f'"{store.schema}"'
    rows = await sql.fetch(
        f"SELECT first, n FROM {s}.blocks WHERE trace_key IS NOT DISTINCT FROM "
        f"(SELECT first_seen FROM {s}.traces WHERE trace_id = $1) ORDER BY first, id",
        trace_id)
    return [(r[0], r[1]) for r in rows]


async def ranges_of(sql: asyncpg.Connection, store: PostgresStateStore,
                    flow_id: str) -> list[tuple[int, int]]:
    rows = await sql.fetch(f'SELECT lo, hi FROM "{store.schema}".flow_seqs '
                           f"WHERE flow_id = $1 ORDER BY lo", flow_id)
    return [(r[0], r[1]) for r in rows]


async def test_a_redelivered_runtime_event_is_stored_and_counted_once(
        make: MakeStore, sql: asyncpg.Connection) -> None:
    store = await make(batch_size=100)  # each flush below writes one batch
    first = [fields("t1", i, "node_start" if i % 2 else "node_success") for i in range(1, 6)]
    for item in first:
        assert store.save_event_fields(item) is None
    await store.flush()
    # Re-delivered from an earlier batch (1, 2) and within this batch (6 twice).
    new = [fields("t1", 6), fields("t1", 7, "node_success")]
    for item in [first[0], new[0], first[1], new[0], new[1]]:
        assert store.save_event_fields(item) is None
    await store.flush()
    expected = [stored_from_fields(item) for item in [*first, *new]]
    assert await store.load_history("t1") == expected
    summary = await store.get_trace("t1")
    assert summary == fold("t1", expected) and summary is not None
    assert summary.event_count == 7
    assert await blocks_of(sql, store, "t1") == [(0, 5), (5, 2)]
    assert await ranges_of(sql, store, "flow-r") == [(1, 7)]
    # A batch of events all stored already writes nothing at all.
    for item in first:
        store.save_event_fields(item)
    await store.flush()
    assert await blocks_of(sql, store, "t1") == [(0, 5), (5, 2)]
    assert await store.get_trace("t1") == summary
    assert store.failures == {}


async def test_the_writer_reports_what_it_skipped_and_refused(make: MakeStore) -> None:
    # The EventWriter contract (writer.py), with either writer: positions in the batch
    # of the events stored before (or repeated in it), and of those refused.
    store = await make()
    writer = store._make_writer()
    try:
        a, b, c = fields("t", 1), ev("t", 2, flow="flow-r"), fields("t", 3)
        traceless, d = ev(None, 4, flow="flow-r"), fields("t", 5)

        async def write(items: list[Any]) -> tuple[list[int], list[tuple[int, str]]]:
            result = await writer.write(items)
            assert isinstance(result, WriteResult)
            return list(result.skipped), [tuple(r) for r in result.rejected]

        assert await write([a, b]) == ([], [])
        assert await write([a, c, b, c, traceless]) == ([0, 2, 3], [])
        assert await write([c, d, traceless]) == ([0, 2], [])  # stored before
        assert await write([a, b, c]) == ([0, 1, 2], [])
        bad = [ev("t\x00", 6, flow="flow-r"), ev("t", 7, node=7, flow="flow-r")]
        e = fields("u", 8)
        assert await write([bad[0], e, bad[1], e]) == ([3], [
            (0, "trace_id holds a control character (NUL, ESC, ...)"),
            (2, "node_name is a int, not a str")])
        wide = [ev("v", 1 << 63, flow="flow-r"), ev("v", -(1 << 63) - 1, flow="flow-r")]
        f = fields("v", 9)
        assert await write([wide[0], bad[0], f, wide[1]]) == ([], [
            (0, "seq does not fit in 64 bits"),
            (1, "trace_id holds a control character (NUL, ESC, ...)"),
            (3, "seq does not fit in 64 bits")])
    finally:
        await writer.close()
    history = await store.load_history("t")
    assert [x.seq for x in history] == [1, 2, 3, 5]
    assert await store.load_history("u") == [stored_from_fields(e)]
    assert await store.load_history("v") == [stored_from_fields(f)]


async def test_seq_ranges_stay_one_row_per_flow_in_a_normal_run(
        make: MakeStore, sql: asyncpg.Connection) -> None:
    store = await make(batch_size=3)  # many batches, each extending the range

    async def echo(message: Message, ctx: Any) -> Message:
        return message

    node = Node(echo, name="echo", policy=NodePolicy(validate="none"))
    flow = create(node.to(), state_store=store)
    flow.run()
    try:
        for i in range(5):
            await flow.emit(Message(payload=i, headers=Headers(tenant="acme")))
            await asyncio.wait_for(flow.fetch(), 5)
    finally:
        await asyncio.wait_for(flow.stop(), 5)
    seqs = [e.seq for s in await store.list_traces()
            for e in await store.load_history(s.trace_id)]
    stored = await sql.fetchval(f'SELECT sum(n) FROM "{store.schema}".blocks')
    assert len(seqs) >= 10 and stored >= len(seqs)  # and the flow's trace-less events
    assert await ranges_of(sql, store, flow.flow_id) == [(min(seqs), min(seqs) + stored - 1)]
    assert await sql.fetchval(f'SELECT count(*) FROM "{store.schema}".flow_seqs') == 1


async def test_seq_ranges_record_gaps_and_join_when_filled(
        make: MakeStore, sql: asyncpg.Connection) -> None:
    store = await make()
    await store.save_events([ev("t", s, flow="f") for s in (1, 2, 5, 6, 9)])
    await store.flush()
    assert await ranges_of(sql, store, "f") == [(1, 2), (5, 6), (9, 9)]
    # 4 extends a range downwards, 3 joins two, 7-8 join the last two.
    await store.save_events([ev("t", s, flow="f") for s in (4, 8, 2, 3, 7)])
    await store.flush()
    assert await ranges_of(sql, store, "f") == [(1, 9)]
    assert [e.seq for e in await store.load_history("t")] == [1, 2, 5, 6, 9, 4, 8, 3, 7]
    summary = await store.get_trace("t")
    assert summary is not None and summary.event_count == 9


async def test_node_names_with_any_printable_character_are_summarised(
        make: MakeStore) -> None:
    store = await make()
    odd = ["a,b", "é ✓", '"q"', "{}", "c d", ""]
    for i, name in enumerate(odd):
        await store.save_events([ev(f"t{i}", 10 * i + 1, node=name),
                                 ev("all", 10 * i + 2, node=name)])
        await store.flush()
    for i, name in enumerate(odd):
        summary = await store.get_trace(f"t{i}")
        assert summary is not None and summary.nodes == ((name,) if name else ())
    summary = await store.get_trace("all")
    assert summary is not None and summary.nodes == tuple(sorted(n for n in odd if n))


# -- events the store cannot hold --------------------------------------------------------


async def test_an_event_the_store_cannot_hold_is_lost_alone_and_counted(
        make: MakeStore, caplog: pytest.LogCaptureFixture) -> None:
    store = await make()
    good = [ev("ok", 1), ev("ok", 2, "node_success"), ev("other", 3)]
    bad = [ev("nul\x00id", 10), ev("lone\ud800", 11), ev("x" * 5_000_000, 12),
           ev(12345, 13), ev("ok", 14, node="a\x00b")]
    with caplog.at_level(logging.WARNING, logger="penguiflow_exporters"):
        await store.save_events([x for pair in itertools.zip_longest(good, bad)
                                 for x in pair if x is not None])
        await store.flush()
    assert store.failures["rejected"] == store.failures["events_lost"] == len(bad)
    assert store.failures["write_failed"] == 0
    (record,) = [r for r in caplog.records if r.getMessage() == "state_store_events_rejected"]
    reasons = " | ".join(record.__dict__["reasons"])
    for words in ("trace_id holds a control character", "trace_id holds a lone surrogate",
                  "trace_id is 5000000 characters long", "trace_id is a int",
                  "node_name holds a control character"):
        assert words in reasons, reasons
    # Everything else is stored; a trace that lost an event says so (marker, summary).
    ok = await store.load_history("ok")
    assert ok[:2] == good[:2]
    assert [(e.kind, e.payload["events_lost"]) for e in ok[2:]] == [(EVENTS_LOST_KIND, 1)]
    assert "refused" in ok[2].payload["reason"]
    summary = await store.get_trace("ok")
    assert summary is not None and (summary.status, summary.events_lost) == ("incomplete", 1)
    assert await store.load_history("other") == good[2:]
    other = await store.get_trace("other")
    assert other is not None and (other.status, other.events_lost) == ("running", 0)
    assert {s.trace_id for s in await store.list_traces()} == {"ok", "other"}


async def test_summaries_count_lost_events_and_say_incomplete_unless_cancelled_or_failed(
        make: MakeStore) -> None:
    store = await make()
    reference = InMemoryStateStore()
    events = [
        ev("incomplete-running", 1), lost_marker("incomplete-running", 2, ts=1001.5),
        ev("incomplete", 2), ev("incomplete", 3, "node_success"),
        lost_marker("incomplete", 1, ts=1003.5),
        ev("failed", 4), ev("failed", 5, "node_failed"), lost_marker("failed", 3, ts=1005.5),
        ev("cancelled", 6), ev("cancelled", 7, "trace_cancel_start"),
        ev("cancelled", 8, "node_failed"), lost_marker("cancelled", 1, ts=1008.5),
        ev("cancelled", 9, "node_success"), lost_marker("cancelled", 4, ts=1009.5),
        ev("whole", 10), ev("whole", 11, "node_success"),
    ]
    await store.save_events(events)
    await reference.save_events(events)
    statuses = {s.trace_id: (s.status, s.events_lost) for s in await store.list_traces()}
    assert statuses == {"incomplete-running": ("incomplete", 2), "incomplete": ("incomplete", 1),
                        "failed": ("failed", 3), "cancelled": ("cancelled", 5),
                        "whole": ("succeeded", 0)}
    for trace_filter in (TraceFilter(), TraceFilter(status="incomplete"),
                         TraceFilter(status="failed"), TraceFilter(status="succeeded")):
        assert await store.list_traces(trace_filter) == await reference.list_traces(
            trace_filter), trace_filter


# -- queries -----------------------------------------------------------------------------


def fleet() -> list[StoredEvent]:
    """Traces of every status, interleaved, some with equal start times or durations."""
    traces: dict[str, list[tuple[str, str, float, int]]] = {
        # trace: [(kind, node, ts, attempt)]
        "ok-1": [("node_start", "a", 10, 0), ("node_success", "a", 11, 0),
                 ("node_start", "b", 11, 0), ("node_success", "b", 14, 0)],
        "ok-2": [("node_start", "b", 20, 0), ("node_success", "b", 21, 0)],
        "retried": [("node_start", "a", 30, 0), ("node_error", "a", 31, 0),
                    ("node_start", "a", 32, 1), ("node_success", "a", 33, 0)],
        "failed": [("node_start", "c", 40, 0), ("node_error", "c", 41, 0),
                   ("node_failed", "c", 42, 0)],
        "running": [("node_start", "a", 50, 0)],
        "cancelled": [("node_start", "b", 60, 0), ("trace_cancel_start", "b", 61, 0),
                      ("node_trace_cancelled", "b", 62, 0)],
        "remote": [("node_start", "r", 20, 0), ("remote_call_start", "r", 20.5, 0),
                   ("remote_call_error", "r", 21, 0), ("node_success", "r", 21, 0)],
        "tie": [("node_start", "a", 20, 0), ("node_success", "a", 21, 0)],
    }
    streams = [[(t, *step) for step in steps] for t, steps in traces.items()]
    events: list[StoredEvent] = []
    seq = 0
    while any(streams):
        for stream in streams:
            if stream:
                trace, kind, node, ts, attempt = stream.pop(0)
                seq += 1
                events.append(ev(trace, seq, kind, node, ts=float(ts), attempt=attempt,
                                 flow="fleet"))
    events.append(lost_marker("ok-2", 1, ts=21.0))  # ok-2 becomes incomplete
    return events


FILTERS = [
    TraceFilter(),
    TraceFilter(limit=3),
    TraceFilter(order="slowest"),
    TraceFilter(order="slowest", limit=2),
    *(TraceFilter(status=s) for s in ("cancelled", "failed", "incomplete", "running",
                                      "succeeded")),
    TraceFilter(node="a"),
    TraceFilter(node="zzz"),
    TraceFilter(has_errors=True),
    TraceFilter(has_errors=False, order="slowest"),
    TraceFilter(since=20.0),
    TraceFilter(until=20.0),
    TraceFilter(since=20.0, until=40.0, node="b"),
    TraceFilter(status="succeeded", has_errors=True, since=15.0),
]


async def test_list_traces_and_get_trace_match_the_in_memory_store(make: MakeStore) -> None:
    store = await make(batch_size=5)  # summaries folded over several batches
    memory = InMemoryStateStore()
    events = fleet()
    await store.save_events(events)
    await memory.save_events(events)
    for trace_filter in FILTERS:
        assert await store.list_traces(trace_filter) == await memory.list_traces(
            trace_filter), trace_filter
    for trace_id in {e.trace_id for e in events if e.trace_id} | {"missing"}:
        assert await store.get_trace(trace_id) == await memory.get_trace(trace_id)


async def test_history_pages_across_block_boundaries_are_slices_of_the_history(
        make: MakeStore, sql: asyncpg.Connection) -> None:
    store = await make(batch_size=7)
    store._block_events = 4  # before the first batch makes the writer
    # One trace's events spread over blocks of many sizes: batches shared with
    # another trace, single events, a lone full batch.
    seq = iter(range(1, 1000))
    for share in (3, 1, 7, 0, 5, 1, 1, 6, 2, 7, 4):
        mine = [ev("p", next(seq), "node_start", f"n{i % 3}") for i in range(share)]
        theirs = [ev("q", next(seq)) for _ in range(7 - share)]
        await store.save_events([e for pair in itertools.zip_longest(mine, theirs)
                                 for e in pair if e is not None])
        await store.flush()
    history = await store.load_history("p")
    assert len(history) == 37
    blocks = await blocks_of(sql, store, "p")
    assert [n for _, n in blocks] == [3, 1, 4, 3, 4, 1, 1, 1, 4, 2, 2, 4, 3, 4]
    assert [first for first, _ in blocks] == [sum(n for _, n in blocks[:i])
                                              for i in range(len(blocks))]
    for offset in range(len(history) + 2):
        for limit in (1, 2, 3, 5, 7, 8, 20, 100):
            page = await store.load_history_page("p", offset=offset, limit=limit)
            assert page == history[offset:offset + limit], (offset, limit)
    assert await store.load_history_page("missing", limit=5) == []


async def test_resolve_trace_id_escapes_like_patterns(make: MakeStore) -> None:
    store = await make()
    ids = ["abc_1", "abcx1", "ab%", "abz", "a\\b", *(f"zz{i:02}" for i in range(12))]
    await store.save_events([ev(t, i) for i, t in enumerate(ids)])
    assert await store.resolve_trace_id("abc_") == ["abc_1"]
    assert await store.resolve_trace_id("ab%") == ["ab%"]
    assert await store.resolve_trace_id("a\\") == ["a\\b"]
    assert await store.resolve_trace_id("ab") == ["ab%", "abc_1", "abcx1", "abz"]
    assert await store.resolve_trace_id("zz") == [f"zz{i:02}" for i in range(10)]
    assert await store.resolve_trace_id("nope") == []


async def test_bindings(make: MakeStore) -> None:
    store = await make()
    bindings = [RemoteBinding("t1", "ctx-1", "task-1", "http://a"),
                RemoteBinding("t1", "ctx-1", "task-2", None),
                RemoteBinding("t2", None, "task-3", "http://b"),
                RemoteBinding("t2", None, None, None)]
    for binding in [*bindings, bindings[1], bindings[3]]:  # repeats are stored once
        await store.save_remote_binding(binding)
    assert await store.load_bindings(trace_id="t1") == bindings[:2]
    assert await store.load_bindings(context_id="ctx-1") == bindings[:2]
    assert await store.load_bindings(task_id="task-3") == [bindings[2]]
    assert await store.load_bindings(trace_id="t1", task_id="task-2") == [bindings[1]]
    assert await store.load_bindings(trace_id="t2") == bindings[2:]
    assert await store.load_bindings(trace_id="t2", context_id="ctx-1") == []
    with pytest.raises(ValueError, match="needs trace_id, context_id or task_id"):
        await store.load_bindings()


# -- concurrency and follow --------------------------------------------------------------


async def test_concurrent_writers_on_one_trace(make: MakeStore) -> None:
    one = await make(batch_size=25)
    two = await make(schema=one.schema, batch_size=25)
    mine = [ev("shared", i, "node_start" if i % 2 == 0 else "node_success", f"a{i % 7}",
               flow="one") for i in range(300)]
    theirs = [ev("shared", i, "node_start" if i % 2 == 0 else "node_success", f"b{i % 5}",
                 flow="two") for i in range(300)]

    async def write(store: PostgresStateStore, events: list[StoredEvent]) -> None:
        for start in range(0, len(events), 40):
            await store.save_events(events[start:start + 40])
            await asyncio.sleep(0)
        await store.flush()

    # Both also re-deliver part of the other's events, concurrently.
    await asyncio.gather(write(one, mine + theirs[:50]), write(two, theirs + mine[:50]))
    history = await one.load_history("shared")
    assert sorted(history, key=lambda e: (e.flow_id or "", e.seq)) == mine + theirs
    assert [e for e in history if e.flow_id == "one"] == mine  # each writer's order kept
    assert [e for e in history if e.flow_id == "two"] == theirs
    summary = await two.get_trace("shared")
    assert summary == fold("shared", history)
    assert summary is not None and summary.event_count == 600
    assert one.failures == two.failures == {}


async def collect(stream: Any, out: list[StoredEvent],
                  until: Callable[[StoredEvent], bool]) -> None:
    """Append ``stream``'s events to ``out`` until ``until(event)``; then close it."""
    async with contextlib.aclosing(stream):
        async for event in stream:
            out.append(event)
            if until(event):
                return


async def until_following(writer: PostgresStateStore, seen: list[StoredEvent],
                          trace: str) -> None:
    """Write probes into ``trace`` until the follower has seen one (it listens then)."""
    for i in range(250):
        await writer.save_event(ev(trace, 10_000 + i, "probe", flow=f"probe-{trace}"))
        await writer.flush()
        await asyncio.sleep(0.02)
        if seen:
            return
    raise AssertionError("the follower never received a probe")


async def test_follow_sees_events_written_by_another_store(make: MakeStore) -> None:
    writer = await make(batch_size=7)
    reader = await make(schema=writer.schema)
    seen: list[StoredEvent] = []
    everything: list[StoredEvent] = []
    last = ev("live", 59)
    follower = asyncio.create_task(collect(reader.follow("live"), seen, lambda e: e == last))
    watcher = asyncio.create_task(collect(reader.follow(), everything, lambda e: e == last))
    await until_following(writer, seen, "live")
    await until_following(writer, everything, "live")
    live = [ev("live", i) for i in range(60)]
    other = [ev("other", 100 + i) for i in range(60)]
    await writer.save_events([e for pair in zip(live, other, strict=True) for e in pair])
    await writer.flush()
    await asyncio.wait_for(asyncio.gather(follower, watcher), 10)
    assert [e for e in seen if e.kind != "probe"] == live
    # Every trace: each trace's events in order (a batch's share of a trace is one
    # block, so the traces of one batch come one after the other).
    everything = [e for e in everything if e.kind != "probe"]
    assert [e for e in everything if e.trace_id == "live"] == live
    assert [e for e in everything if e.trace_id == "other"] == other[:len(everything) - 60]


async def test_follow_handles_batches_touching_many_or_long_trace_ids(
        make: MakeStore) -> None:
    writer = await make()
    reader = await make(schema=writer.schema)
    long_id = "L" * 256  # with many ids, more than one NOTIFY payload may hold
    seen: list[StoredEvent] = []
    everything: list[StoredEvent] = []
    follower = asyncio.create_task(collect(reader.follow(long_id), seen,
                                           lambda e: e.kind == "node_success"))
    many = [ev(f"many-{i:04}-{'x' * 24}", i) for i in range(500)]
    watcher = asyncio.create_task(collect(reader.follow(), everything,
                                          lambda e: e == many[-1]))
    await until_following(writer, seen, long_id)
    await until_following(writer, everything, long_id)
    # 500 trace ids of 34 characters (~18 KB) and the long one: several NOTIFYs.
    await writer.save_events([ev(long_id, 1, "node_success", flow="long"), *many])
    await writer.flush()
    await asyncio.wait_for(asyncio.gather(follower, watcher), 10)
    assert seen[-1] == ev(long_id, 1, "node_success", flow="long")
    assert [e for e in everything if e.kind != "probe"][-500:] == many


_CHILD_WRITER = """
import asyncio, sys
from penguiflow.state import StoredEvent
from penguiflow_exporters.postgres import PostgresStateStore

async def main(dsn, schema):
    async with PostgresStateStore(dsn, schema=schema, batch_size=4) as store:
        for i in range(20):
            await store.save_event(StoredEvent("proc", 1000.0 + i, "node_start", "a", "a-id",
                                               {"i": i}, seq=i, flow_id="child"))
            if i % 3 == 0:
                await store.flush()
        await store.save_event(StoredEvent(None, 2000.0, "custom", None, None, {"last": 1},
                                           seq=20, flow_id="child"))

asyncio.run(main(*sys.argv[1:]))
"""


async def test_follow_sees_events_written_by_another_process(make: MakeStore,
                                                             pg_dsn: str) -> None:
    prober = await make()
    reader = await make(schema=prober.schema)
    seen: list[StoredEvent] = []
    everything: list[StoredEvent] = []
    follower = asyncio.create_task(collect(reader.follow("proc"), seen, lambda e: e.seq == 19))
    watcher = asyncio.create_task(collect(reader.follow(), everything,
                                          lambda e: e.trace_id is None))
    await until_following(prober, seen, "proc")
    await until_following(prober, everything, "proc")
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CHILD_WRITER, pg_dsn, prober.schema)
    assert await asyncio.wait_for(child.wait(), 30) == 0
    await asyncio.wait_for(asyncio.gather(follower, watcher), 10)
    written = [StoredEvent("proc", 1000.0 + i, "node_start", "a", "a-id", {"i": i}, seq=i,
                           flow_id="child") for i in range(20)]
    assert [e for e in seen if e.kind != "probe"] == written
    # Every trace: the trace-less event too, after the events written before it.
    assert [e for e in everything if e.kind != "probe"] == [
        *written, StoredEvent(None, 2000.0, "custom", None, None, {"last": 1}, seq=20,
                              flow_id="child")]


async def test_follow_ends_when_the_store_is_closed(make: MakeStore) -> None:
    store = await make()
    seen: list[StoredEvent] = []
    follower = asyncio.create_task(collect(store.follow("t1"), seen, lambda e: False))
    await until_following(store, seen, "t1")
    await store.close()
    await asyncio.wait_for(follower, 5)
    with pytest.raises(StoreUnavailable):
        await store.load_history("t1")
    with pytest.raises(StoreUnavailable):
        await anext(store.follow("t1"))


async def test_follow_raises_store_unavailable_when_its_connection_is_lost(
        make: MakeStore, sql: asyncpg.Connection) -> None:
    store = await make()
    seen: list[StoredEvent] = []
    follower = asyncio.create_task(collect(store.follow("t1"), seen, lambda e: False))
    await until_following(store, seen, "t1")
    # The follower's own connection is the one whose last query read new blocks of
    # the trace in this test's schema.
    killed = await sql.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE query LIKE '%AND first >= $2 ORDER BY first, id%' AND strpos(query, $1) > 0 "
        "AND pid <> pg_backend_pid()", f'"{store.schema}".blocks')
    assert killed == 1
    with pytest.raises(StoreUnavailable, match="lost the listening connection"):
        await asyncio.wait_for(follower, 5)


# -- failures ----------------------------------------------------------------------------


async def test_an_unreachable_server_is_store_unavailable() -> None:
    port = refused_port()
    store = PostgresStateStore(f"postgresql://pf:s3cret@127.0.0.1:{port}/db",
                               schema="pf_unreachable", connect_timeout_s=5)
    with pytest.raises(StoreUnavailable) as info:
        await store.open()
    message = str(info.value)
    assert f"127.0.0.1:{port}/db" in message
    assert "Start the server" in message
    assert "s3cret" not in message and "s3cret" not in repr(store)
    assert isinstance(info.value.__cause__, OSError)
    with pytest.raises(StoreUnavailable):
        await store.load_history("t1")
    await store.close()


async def test_a_flow_completes_while_its_store_is_unreachable(
        writer: str, caplog: pytest.LogCaptureFixture) -> None:
    store = PostgresStateStore(f"postgresql://pf@127.0.0.1:{refused_port()}/db",
                               schema="pf_unreachable", connect_timeout_s=5, writer=writer,
                               retries=1)

    async def echo(message: Message, ctx: Any) -> Message:
        return message

    node = Node(echo, name="echo", policy=NodePolicy(validate="none"))
    flow = create(node.to(), state_store=store)
    flow.run()
    try:
        await flow.emit(Message(payload="hi", headers=Headers(tenant="acme")))
        assert (await asyncio.wait_for(flow.fetch(), 5)).payload == "hi"
    finally:
        await asyncio.wait_for(flow.stop(), 10)  # its flush fails; stop() does not
    assert store.failures["write_failed"] >= 1 and store.failures["retried"] >= 1
    assert store.failures["events_lost"] >= 2
    assert "state_store_write_failed" in caplog.text
    await store.close()


async def test_other_driver_errors_are_state_store_errors(make: MakeStore,
                                                          sql: asyncpg.Connection) -> None:
    store = await make()
    await sql.execute(f'DROP TABLE "{store.schema}".traces')
    with pytest.raises(StateStoreError, match="listing traces") as info:
        await store.list_traces()
    assert not isinstance(info.value, StoreUnavailable)
    assert isinstance(info.value.__cause__, asyncpg.PostgresError)


async def test_a_corrupt_block_is_a_state_store_error_naming_it(
        make: MakeStore, sql: asyncpg.Connection) -> None:
    store = await make()
    events = [ev("t1", i) for i in range(1, 5)]
    for half in (events[:2], events[2:]):  # two blocks
        await store.save_events(half)
        await store.flush()
    s = f'"{store.schema}"'
    first_id, second_id = [r[0] for r in await sql.fetch(
        f"SELECT id FROM {s}.blocks ORDER BY id")]
    await sql.execute(f"UPDATE {s}.blocks SET data = $1 WHERE id = $2", "{garbage", first_id)
    pattern = rf"{store.schema}.*event block {first_id} \(blocks.id\) cannot be read: corrupt"
    with pytest.raises(StateStoreError, match=pattern) as info:
        await store.load_history("t1")
    assert not isinstance(info.value, StoreUnavailable)
    with pytest.raises(StateStoreError, match=pattern):
        await store.load_history_page("t1", offset=1, limit=2)
    # The other block still reads.
    assert await store.load_history_page("t1", offset=2, limit=2) == events[2:]
    # JSON of another shape is refused too.
    await sql.execute(f"UPDATE {s}.blocks SET data = $1 WHERE id = $2",
                      '{"v": 3, "n": 2, "cols": {}}', second_id)
    with pytest.raises(StateStoreError, match=rf"event block {second_id} .*version-1 or -2 block"):
        await store.load_history_page("t1", offset=2, limit=2)
    # And a runtime event whose columns are not the runtime's.
    odd = Row(*fields("t1", 3)[:15], "three", *fields("t1", 3)[16:], None)  # type: ignore[misc]
    await sql.execute(f"UPDATE {s}.blocks SET data = $1 WHERE id = $2",
                      encode_block([odd]), second_id)
    with pytest.raises(StateStoreError,
                       match=rf"event block {second_id} .*without int queue sizes"):
        await store.load_history_page("t1", offset=2, limit=2)


def _errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [str(r.__dict__["error"]) for r in caplog.records
            if r.getMessage() == "state_store_write_failed"]


async def test_an_event_the_database_refuses_is_lost_alone(
        make: MakeStore, sql: asyncpg.Connection, caplog: pytest.LogCaptureFixture) -> None:
    store = await make(flush_interval_s=3600.0)
    s = f'"{store.schema}"'
    await sql.execute(f"""
        CREATE FUNCTION {s}.refuse() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'refused by a trigger'; END $$;
        CREATE TRIGGER refuse BEFORE INSERT ON {s}.blocks
        FOR EACH ROW WHEN (NEW.data LIKE '%poison%') EXECUTE FUNCTION {s}.refuse()""")
    first = [ev("t", 1), ev("t", 2, "node_success")]
    await store.save_events(first)
    await store.flush()
    poisoned = ev("t", 3, payload={"poison": True})
    with caplog.at_level(logging.ERROR, logger="penguiflow_exporters"):
        await store.save_events([ev("u", 4), poisoned, ev("u", 5, "node_success")])
        await store.flush()
    # The batch was split until the one block the server refuses stood alone.
    assert store.failures["write_failed"] == 1 and store.failures["events_lost"] == 1
    (error,) = _errors_logged(caplog)
    assert "refused by a trigger" in error and "RaiseError" in error
    assert store.schema in error and store._where in error
    assert [e.seq for e in await store.load_history("u")] == [4, 5]
    history = await store.load_history("t")
    assert history[:2] == first and [e.kind for e in history[2:]] == [EVENTS_LOST_KIND]
    summary = await store.get_trace("t")
    assert summary is not None and (summary.status, summary.events_lost) == ("incomplete", 1)
    # Its seq was not taken: once the server takes it, it is stored.
    await sql.execute(f"DROP TRIGGER refuse ON {s}.blocks")
    await store.save_events([poisoned])
    assert (await store.load_history("t"))[-1] == poisoned


async def test_a_store_the_server_refuses_whole_loses_whole_batches_not_one_by_one(
        make: MakeStore, sql: asyncpg.Connection, caplog: pytest.LogCaptureFixture) -> None:
    # A table dropped (or a privilege revoked) under the store: every batch was
    # split down to single events, 2N transactions and N error lines for nothing.
    store = await make(flush_interval_s=3600.0, max_batch=100)
    await store.save_events([ev("t", 0)])
    await store.flush()
    await sql.execute(f'DROP TABLE "{store.schema}".blocks')
    with caplog.at_level(logging.ERROR, logger="penguiflow_exporters"):
        await store.save_events([ev("t", seq) for seq in range(1, 201)])
        await store.flush()
    # One failure per batch of 100, and for the trace's lost-events markers: not the
    # ~400 transactions and ~200 error lines of splitting each batch to single events.
    assert store.failures["events_lost"] == 200
    errors = _errors_logged(caplog)
    assert len(errors) == store.failures["write_failed"] <= 4, errors
    assert "UndefinedTableError" in errors[0]
    assert "privileges" in errors[0]  # says what to do


async def test_a_lock_held_past_lock_timeout_is_retried_not_lost(
        pg_dsn: str, make: MakeStore, sql: asyncpg.Connection) -> None:
    # LockNotAvailableError (lock_timeout) was taken for "these events are refused":
    # split and lost one by one while the server was only busy.
    dsn = pg_dsn + ("&" if "?" in pg_dsn else "?") + "lock_timeout=200"  # a server setting
    store = await make()  # the schema, made (and dropped at teardown) by the fixture
    retried = asyncio.Event()

    class Retry(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage() == "state_store_write_retry":
                retried.set()

    timed = PostgresStateStore(dsn, schema=store.schema, writer=store.writer,
                               flush_interval_s=3600.0)
    handler = Retry()
    logging.getLogger("penguiflow_exporters").addHandler(handler)
    try:
        await timed.open()
        async with sql.transaction():
            await sql.execute(f'LOCK TABLE "{store.schema}".blocks IN ACCESS EXCLUSIVE MODE')
            await timed.save_events([ev("t", seq) for seq in range(1, 9)])
            flushed = asyncio.ensure_future(timed.flush())
            await asyncio.wait_for(retried.wait(), 30)
        await asyncio.wait_for(flushed, 30)
        assert timed.failures["events_lost"] == 0 and timed.failures["retried"] >= 1
        assert [e.seq for e in await timed.load_history("t")] == list(range(1, 9))
    finally:
        logging.getLogger("penguiflow_exporters").removeHandler(handler)
        await timed.close()


async def _until_a_lock_is_awaited(sql: asyncpg.Connection) -> None:
    """Return once some session waits for a lock (the server's view: no event to await)."""
    async with asyncio.timeout(10):
        while not await sql.fetchval(  # noqa: ASYNC110 - the server's state: no event
                "SELECT count(*) FROM pg_locks WHERE NOT granted"):
            await asyncio.sleep(0.01)


async def test_close_is_bounded_by_close_timeout_while_a_query_waits_on_a_lock(
        make: MakeStore, sql: asyncpg.Connection) -> None:
    # The pool's close waited connect_timeout_s more for the stuck query's connection.
    store = await make(close_timeout_s=0.5, connect_timeout_s=30.0)
    await store.save_events([ev("t", 1)])
    async with sql.transaction():
        await sql.execute(f'LOCK TABLE "{store.schema}".blocks IN ACCESS EXCLUSIVE MODE')
        reading = asyncio.ensure_future(store.load_history("t"))
        await _until_a_lock_is_awaited(sql)
        started = time.monotonic()
        await asyncio.wait_for(store.close(), 20)
        assert time.monotonic() - started < 2.5  # 0.5 s, grace and scheduling; was 30
    with pytest.raises(StoreUnavailable):
        await reading


async def test_open_is_bounded_while_its_schema_is_locked(
        pg_dsn: str, make: MakeStore, sql: asyncpg.Connection) -> None:
    # A schema_version table locked elsewhere (VACUUM FULL, another tool's migration)
    # held open() for ever.
    store = await make()
    async with sql.transaction():
        await sql.execute(
            f'LOCK TABLE "{store.schema}".schema_version IN ACCESS EXCLUSIVE MODE')
        for readonly in (False, True):
            late = PostgresStateStore(pg_dsn, schema=store.schema, writer="loop",
                                      readonly=readonly, connect_timeout_s=0.5)
            with pytest.raises(StoreUnavailable, match="lock"):
                await asyncio.wait_for(late.open(), 20)
            await late.close()
    assert (await make(schema=store.schema)).schema == store.schema  # then it opens


async def test_a_reader_outlives_the_server_dropping_its_idle_connections(
        pg_dsn: str, make: MakeStore, sql: asyncpg.Connection) -> None:
    # Each pooled connection the server dropped while idle (a restart, a proxy's idle
    # cut) failed the next query sent on it: a long-lived reader (pf tail, the TUI)
    # showed an error after every server restart.
    store = await make()
    await store.save_events([ev("t", 1)])
    await store.flush()
    reader = PostgresStateStore(pg_dsn, schema=store.schema, readonly=True, pool_min=3,
                                pool_max=3)
    try:
        assert len(await reader.load_history("t")) == 1
        # Polled (the server's view of its sessions has no event to wait on): one CI
        # run found none of the pool's connections idle at the first look.
        dropped = 0
        deadline = asyncio.get_running_loop().time() + 10.0
        while dropped < 3 and asyncio.get_running_loop().time() < deadline:
            dropped += await sql.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = 'penguiflow' AND state = 'idle' "
                "AND pid <> pg_backend_pid()")
            if dropped < 3:
                await asyncio.sleep(0.05)
        assert dropped >= 3  # the whole pool
        assert len(await reader.load_history("t")) == 1
        assert (await reader.get_trace("t")) is not None
        assert [s.trace_id for s in await reader.list_traces()] == ["t"]
        assert await reader.resolve_trace_id("t") == ["t"]
    finally:
        await reader.close()


@pytest.mark.parametrize("readonly", [True, False])
async def test_open_outlives_the_server_dropping_the_pools_first_connections(
        pg_dsn: str, make: MakeStore, sql: asyncpg.Connection, readonly: bool,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The pool's connections, dropped by the server between their making and the
    # schema check (a restart, or an admin's pg_terminate_backend of idle sessions:
    # a parallel test run did it), failed open() with a driver error about a
    # connection "released back to the pool" that hid the real one.
    store = await make()
    await store.save_events([ev("t", 1)])
    await store.flush()
    made: list[Any] = []
    create_pool = asyncpg.create_pool

    async def pool_then_drop(*args: Any, **kwargs: Any) -> Any:
        pool = await create_pool(*args, **kwargs)
        pids = [h._con.get_server_pid() for h in pool._holders if h._con is not None]
        made.append(len(pids))
        await sql.execute("SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) pid", pids)
        return pool

    monkeypatch.setattr(asyncpg, "create_pool", pool_then_drop)
    other = PostgresStateStore(pg_dsn, schema=store.schema, readonly=readonly, pool_min=2,
                               pool_max=2)
    try:
        assert len(await other.load_history("t")) == 1
        assert made == [2]  # both of its connections were dropped before the check
    finally:
        await other.close()


async def test_open_waits_for_another_process_creating_the_schema(
        pg_dsn: str, sql: asyncpg.Connection, schema: str) -> None:
    # open()'s lock timeout (for its catalog reads) also cut the wait for the advisory
    # lock another process holds while it creates or migrates the schema: every other
    # worker starting meanwhile failed instead of finding the work done.
    from penguiflow_exporters._pg_schema import MIGRATE_LOCK

    store = PostgresStateStore(pg_dsn, schema=schema, writer="loop", connect_timeout_s=0.3)
    await sql.execute("SELECT pg_advisory_lock($1, $2)", MIGRATE_LOCK, store._lock_key)
    try:
        opening = asyncio.ensure_future(store.open())
        await _until_a_lock_is_awaited(sql)
        await asyncio.sleep(0.6)  # twice connect_timeout_s: still waiting, not failed
        assert not opening.done()
    finally:
        await sql.execute("SELECT pg_advisory_unlock($1, $2)", MIGRATE_LOCK, store._lock_key)
    try:
        await asyncio.wait_for(opening, 20)
        await store.save_events([ev("t", 1)])
        assert len(await store.load_history("t")) == 1
    finally:
        await store.close()


async def test_a_v4_upgrade_blocked_by_a_table_lock_is_bounded(
        pg_dsn: str, sql: asyncpg.Connection, schema: str) -> None:
    # Waiting for another process's upgrade must not cut (the advisory lock), but the
    # upgrade's own DDL on a table locked elsewhere must: it waited for ever, and every
    # other worker behind it.
    await make_v4_schema(sql, schema, v4_batches())
    async with sql.transaction():
        await sql.execute(f'LOCK TABLE "{schema}".blocks IN ACCESS SHARE MODE')
        store = PostgresStateStore(pg_dsn, schema=schema, writer="loop", connect_timeout_s=0.5)
        with pytest.raises(StoreUnavailable, match="lock"):
            await asyncio.wait_for(store.open(), 20)
        await store.close()
    store = PostgresStateStore(pg_dsn, schema=schema, writer="loop")
    try:
        await store.open()  # and once the lock is gone, the upgrade runs
    finally:
        await store.close()


async def test_a_lost_writer_connection_is_retried_and_nothing_is_lost(
        make: MakeStore, sql: asyncpg.Connection) -> None:
    store = await make(flush_interval_s=3600.0)
    save_runtime(store, fields("t", 1))
    await store.flush()
    killed = await sql.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE application_name = 'penguiflow-writer' AND datname = current_database()")
    assert killed >= 1
    save_runtime(store, fields("t", 2))
    await store.flush()
    save_runtime(store, fields("t", 3))
    assert [e.seq for e in await store.load_history("t")] == [1, 2, 3]
    assert store.failures["events_lost"] == 0
    if store.writer == "process":  # its connection finds out on the next batch
        assert store.failures["retried"] == 1


async def test_a_server_restart_loses_exactly_what_it_counts(
        pg_cluster: PgCluster, writer: str, caplog: pytest.LogCaptureFixture) -> None:
    dsn = f"postgresql://postgres@127.0.0.1:{pg_cluster.port}/postgres"
    schema = f"pf_test_{uuid.uuid4().hex[:8]}"
    # No retries: every batch the restart hits is lost, and must be counted.
    store = PostgresStateStore(dsn, schema=schema, writer=writer, retries=0, max_batch=40,
                               max_buffer=200, connect_timeout_s=5)
    await store.open()
    saved = 0

    async def save(count: int) -> None:
        nonlocal saved
        for _ in range(count):
            waiter = store.save_event_fields(  # the runtime's events: the child's, if any
                fields(f"t{saved % 7}", saved, node=f"n{saved % 3}", flow="restart"))
            if waiter is not None:
                await waiter
            saved += 1
            await asyncio.sleep(0)  # a turn for the writer

    try:
        with caplog.at_level(logging.ERROR, logger="penguiflow_exporters"):
            await save(300)
            await store.flush()
            restarting = asyncio.ensure_future(asyncio.to_thread(pg_cluster.restart))
            while not restarting.done():
                await save(20)
            await restarting
            await save(300)
    finally:
        await store.close()
    lost = store.failures["events_lost"]
    assert lost > 0 and store.failures["write_failed"] >= 1
    async with PostgresStateStore(dsn, schema=schema, readonly=True) as reader:
        summaries = await reader.list_traces(TraceFilter(limit=100))
        histories = [await reader.load_history(s.trace_id) for s in summaries]
    stored = [e for history in histories for e in history if e.kind != EVENTS_LOST_KIND]
    assert len(stored) + lost == saved
    assert len({e.seq for e in stored}) == len(stored)  # none twice
    # Every lost event is in its trace's count, and those traces say incomplete.
    assert sum(s.events_lost for s in summaries) == lost
    assert all(s.status == "incomplete" for s in summaries if s.events_lost)


@pytest.mark.parametrize("writer", ["loop"])
async def test_a_connection_left_in_a_transaction_is_replaced_and_the_batch_retried(
        pg_cluster: PgCluster, writer: str) -> None:
    # A reply lost mid-transaction can leave the driver believing a transaction is
    # open: every later batch on that connection would be refused ("cannot use
    # Connection.transaction() in a manually started transaction"), for ever.
    dsn = f"postgresql://postgres@127.0.0.1:{pg_cluster.port}/postgres"
    schema = f"pf_test_{uuid.uuid4().hex[:8]}"
    async with PostgresStateStore(dsn, schema=schema, writer=writer, retries=1) as store:
        await store.save_event(ev("t", 1))
        await store.flush()
        conn = writer_of(store)._conn
        await conn.execute("BEGIN")  # the state a lost reply leaves behind
        await store.save_event(ev("t", 2))
        await store.flush()
        assert conn.is_closed()  # dropped, not reused
        assert store.failures["retried"] == 1 and store.failures["events_lost"] == 0
        assert [e.seq for e in await store.load_history("t")] == [1, 2]


# -- the writer process ------------------------------------------------------------------


#: Overrides the ``writer`` fixture: these tests are about the writer process.
PROCESS_ONLY = pytest.mark.parametrize("writer", ["process"])


def test_an_unknown_writer_is_refused() -> None:
    with pytest.raises(ValueError, match="writer must be 'process' or 'loop'; got 'thread'"):
        PostgresStateStore("postgresql://pf@127.0.0.1/db", writer="thread")  # type: ignore[arg-type]


def test_the_writer_module_starts_without_importing_penguiflow() -> None:
    # The writer process runs this module: importing the core would cost ~0.8 s a start.
    code = ("import sys, penguiflow_exporters._pg_write; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'penguiflow'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "[]"


async def test_a_store_opened_and_queried_but_never_written_to_starts_no_writer(
        make: MakeStore) -> None:
    store = await make()
    assert await store.list_traces() == [] and await store.get_trace("t") is None
    assert await store.load_history("t") == []
    await store.flush()
    assert writer_of(store) is None
    await store.close()
    assert writer_of(store) is None


def runtime(*records: Any) -> list[StoredEvent]:
    """What the store reads back for EventRecords."""
    return [stored_from_fields(r) for r in records]


def save_runtime(store: PostgresStateStore, *records: Any) -> None:
    """Buffer EventRecords as the runtime does (the batches a writer process takes)."""
    for record in records:
        assert store.save_event_fields(record) is None


@PROCESS_ONLY
async def test_the_writer_process_takes_the_runtime_batches_from_the_first_one(
        make: MakeStore) -> None:
    store = await make(flush_interval_s=3600.0)
    save_runtime(store, fields("t", 1))
    assert writer_of(store) is None  # buffered only
    await store.flush()
    process = process_of(store)
    assert process is not None and process.started == 1 and process.pid is not None
    assert await store.load_history("t") == runtime(fields("t", 1))


@PROCESS_ONLY
async def test_batches_of_stored_events_alone_are_written_on_the_loop(
        make: MakeStore) -> None:
    # An import: pickling payloads to the child would cost what writing them here does.
    store = await make(flush_interval_s=3600.0)
    imported = [ev("t", 1), ev("t", 2, "node_success")]
    await store.save_events(imported)
    await store.flush()
    assert writer_of(store) is not None and process_of(store).started == 0
    save_runtime(store, fields("t", 3))
    await store.save_events([ev("t", 4)])  # with a runtime event: the child's
    await store.flush()
    assert process_of(store).started == 1
    assert await store.load_history("t") == [*imported, *runtime(fields("t", 3)), ev("t", 4)]


@PROCESS_ONLY
async def test_a_writer_process_that_died_between_batches_is_replaced(
        make: MakeStore) -> None:
    store = await make(flush_interval_s=3600.0)
    first = [fields("t", 1), fields("t", 2, "node_success")]
    save_runtime(store, *first)
    await store.flush()
    process = process_of(store)
    assert process is not None and process._proc is not None and process.started == 1
    dead = process._proc
    dead.kill()
    await dead.wait()
    later = [fields("t", 3, node="b")]
    save_runtime(store, *later)
    assert await store.load_history("t") == runtime(*first, *later)  # nothing lost
    assert process.started == 2 and store.failures["events_lost"] == 0


@PROCESS_ONLY
async def test_a_writer_process_that_dies_mid_batch_is_replaced_and_the_batch_retried(
        make: MakeStore, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    from penguiflow_exporters._writer_proc import AsyncWriterProcess

    store = await make(flush_interval_s=3600.0)
    first = [fields("t", 1), fields("t", 2, "node_success")]
    save_runtime(store, *first)
    await store.flush()
    process = process_of(store)
    assert process is not None and process.pid is not None and process.started == 1
    sending = asyncio.Event()
    exchange = AsyncWriterProcess._exchange

    async def signalling_exchange(self: Any, proc: Any, op: bytes, payload: bytes) -> Any:
        if op == b"W" and not sending.is_set():
            sending.set()  # the batch is handed to this very process
            await asyncio.sleep(0)  # let the test kill it first
        return await exchange(self, proc, op, payload)

    monkeypatch.setattr(AsyncWriterProcess, "_exchange", signalling_exchange)
    with caplog.at_level(logging.WARNING, logger="penguiflow_exporters"):
        save_runtime(store, fields("t", 3))
        flushing = asyncio.ensure_future(store.flush())
        await sending.wait()
        os.kill(process.pid, signal.SIGKILL)
        await flushing
    assert store.failures["retried"] == 1 and store.failures["events_lost"] == 0
    (retry,) = [r for r in caplog.records if r.getMessage() == "state_store_write_retry"]
    assert "writer process exited" in str(retry.__dict__["error"])
    assert store._where in str(retry.__dict__["error"])  # names the server, no password
    assert await store.load_history("t") == runtime(*first, fields("t", 3))
    assert process.started == 2


@PROCESS_ONLY
async def test_a_writer_process_that_cannot_start_falls_back_to_the_loop(
        make: MakeStore, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # As in a sandbox that forbids subprocesses: spawning fails.
    async def refuse(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError("subprocesses are not allowed here")

    monkeypatch.setattr(asyncio, "create_subprocess_exec", refuse)
    store = await make(flush_interval_s=3600.0)
    with caplog.at_level(logging.WARNING, logger="penguiflow_exporters"):
        first = [fields("t", 1, "node_start"), fields("t", 2, "node_success")]
        save_runtime(store, *first)
        await store.flush()
        later = [fields("t", 3, "node_start", node="b")]
        save_runtime(store, *later)
        assert await store.load_history("t") == runtime(*first, *later)  # nothing lost
    assert writer_of(store).process is None  # writing on the loop from now on
    assert store.failures == {}
    warnings = [r for r in caplog.records
                if r.getMessage() == "state_store_writer_process_unavailable"]
    assert len(warnings) == 1 and "not allowed" in str(warnings[0].__dict__["error"])


@PROCESS_ONLY
async def test_close_stops_the_writer_process(make: MakeStore) -> None:
    store = await make()
    save_runtime(store, fields("t", 1))
    await store.flush()
    process = process_of(store)
    assert process is not None
    pid = process.pid
    assert pid is not None
    await store.close()
    assert process.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped, not a zombie


# -- a big trace ---------------------------------------------------------------------------


async def test_a_trace_larger_than_the_buffer_is_stored_and_read_back_whole(
        make: MakeStore) -> None:
    # 30,000 events through save_event, one at a time, into a buffer of 5,000 (the
    # producer waits whenever the writer falls behind): every event is stored, in
    # order. The ingest rate and load time of a 100k-event trace are
    # benchmarks/stores.py's rows.
    count = 30_000
    flow = uuid.uuid4().hex[:16]
    t0 = 1_700_000_000.0
    events = [
        StoredEvent(
            "big", t0 + i * 1e-5, "node_start" if i % 2 == 0 else "node_success",
            f"s{i % 5}", f"node-{i % 5}",
            {"ts": t0 + i * 1e-5, "node_name": f"s{i % 5}", "latency_ms": 0.021,
             "q_depth_in": i % 3, "trace_cancelled": False, "note": None},
            invocation_id=f"{i:016x}", span_id=f"{i:016x}", seq=i, queued_ts=t0,
            flow_name="bench", flow_id=flow)
        for i in range(count)
    ]
    store = await make(max_buffer=5_000)
    for event in events:
        await store.save_event(event)
    history = await store.load_history("big")
    assert history == events
    page = await store.load_history_page("big", offset=count - 10, limit=100)
    assert page == events[-10:]
    assert store.failures == {}


async def test_a_database_not_in_utf8_stores_any_payload_and_refuses_only_its_row(
        pg_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    # Blocks are ASCII (JSON escapes): a LATIN1 database, which refuses "日本" in a
    # text value, stores any payload, and it comes back as written. A node name the
    # database cannot hold in its column loses its own event only, with the reason.
    name = f"pf_latin1_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(pg_dsn)
    try:
        await admin.execute(f"CREATE DATABASE {name} ENCODING 'LATIN1' LC_COLLATE 'C' "
                            "LC_CTYPE 'C' TEMPLATE template0")
        base, _, query = pg_dsn.partition("?")
        dsn = base.rsplit("/", 1)[0] + f"/{name}" + (f"?{query}" if query else "")
        store = PostgresStateStore(dsn, writer="loop")
        try:
            events = [StoredEvent("t-latin1", 1000.0 + i, "node_start",
                                  "nœud" if i == 1 else "café", "a-id",
                                  {"text": "日本 é 🐧", "i": i}, seq=i, flow_id="f",
                                  flow_name="demo") for i in range(3)]
            with caplog.at_level(logging.WARNING):
                await store.save_events(events)
                back = await store.load_history("t-latin1")
        finally:
            await store.close()
        stored = [(e.payload, e.node_name) for e in back if e.kind == "node_start"]
        assert stored == [({"text": "日本 é 🐧", "i": i}, "café") for i in (0, 2)]
        assert store.failures["events_lost"] == 1
        [warned] = [r for r in caplog.records if r.msg == "state_store_events_rejected"]
        assert warned.reasons == ["node_name holds 'œ', which the database's encoding "  # type: ignore[attr-defined]
                                  "(iso8859-1) cannot hold: create the database WITH "
                                  "ENCODING 'UTF8'"]
    finally:
        with contextlib.suppress(Exception):
            await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
        await admin.close()
