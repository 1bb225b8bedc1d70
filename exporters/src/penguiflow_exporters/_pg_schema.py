"""The Postgres store's schema: its layout (version 5), the checks on open, and the
migration from version 4.

Everything lives in one Postgres schema; ``schema_version`` records its version.
There is one current version, :data:`SCHEMA_VERSION`:

* a schema that does not exist, or has no ``schema_version`` table, gets version 5
  directly (the store creates its tables there);
* a version-4 schema (pickled blocks in ``bytea``) is migrated in place, in one
  transaction (:func:`_v4_to_v5`);
* any other version (1-3, or newer than this package knows) is refused with a
  :class:`~penguiflow.state.StateStoreError` naming the version and what to do,
  and nothing is changed.

A read-only store (:func:`check_schema`) only looks: a schema that does not exist,
is not a penguiflow store's, or is not at version 5 is refused, and nothing is
created or altered.

Layout (version 5):

* ``blocks``: events, a trace's share of a batch to a row (_blocks.py): ``data`` is
  one JSON document of columns, ASCII only (json escapes every other character,
  NUL and lone surrogates included, so any str survives; ``text`` rather than
  ``jsonb``, which refuses ``\\u0000``). ``trace_key`` is the trace's
  ``traces.first_seen`` (NULL for events without a trace), ``first`` the index in
  its trace of the block's first event, ``n`` its event count, ``ts_lo``/``ts_hi``
  its timestamps' bounds, ``id`` (bigserial) the order blocks were committed in.
  Index ``(trace_key, first)``: a trace's history is its blocks in ``first``
  order, and a page seeks straight to the blocks holding it. Large blocks are
  lz4-compressed where the server offers lz4 (Postgres >= 14), else pglz.
* ``flow_seqs``: per flow id, the seqs stored, as disjoint ``[lo, hi]`` ranges (one
  row per flow in a normal run). An event is identified by ``(flow_id, seq)``.
* ``traces``: one summary row per trace, folded in Python by each batch's
  transaction (see _pg_write.py); ``status`` is generated from the counters with
  TRACE_STATUSES' precedence, ``events_lost`` sums the trace's lost-event markers.
* ``bindings``: remote bindings, unique on all four columns (through a hash of them;
  hash indexes for the lookups, so a value of any length is stored: see
  _BINDINGS_INDEXES; ``pf migrate`` gives an older version-5 schema these).
"""

from __future__ import annotations

import logging
from typing import Any, Final

from penguiflow.state import StateStoreError

from ._blocks import encode_block
from ._legacy_v4 import decode_v4_block
from ._records import BlockError
from .processor import StoreRefused

__all__ = ["MIGRATE_LOCK", "SCHEMA_VERSION", "check_schema",
           "create_or_migrate", "old_bindings_indexes", "stored_version",
           "upgrade_bindings_indexes"]

logger = logging.getLogger("penguiflow_exporters.store")

#: The schema version this module creates; version 4 is migrated, others refused.
SCHEMA_VERSION: Final = 5
#: First key of the two-key advisory lock opening takes ("PFmg"); the second is the
#: store's lock key (derived from the schema name).
MIGRATE_LOCK: Final = 0x50466D67

_STATUS: Final = """
    status text GENERATED ALWAYS AS (
        CASE WHEN cancelled THEN 'cancelled'
             WHEN failed THEN 'failed'
             WHEN events_lost > 0 THEN 'incomplete'
             WHEN open_count > 0 THEN 'running'
             ELSE 'succeeded' END) STORED"""

#: The bindings' indexes. Unique on all four columns, NULLs equal to each other but
#: not to '' (quote_nullable writes NULL unquoted), through a hash of them, and hash
#: indexes for the lookups: a btree entry holds at most 2,704 bytes, so indexing the
#: values themselves refused a binding with a ~3 KB agent_url (SQLite stores it).
#: Schemas made before (the values in btrees) are given these on a writing open.
_BINDINGS_INDEXES: Final = """
CREATE UNIQUE INDEX bindings_unique_idx ON {s}.bindings ((md5(
    quote_nullable(trace_id) || ',' || quote_nullable(context_id) || ',' ||
    quote_nullable(task_id) || ',' || quote_nullable(agent_url))));
CREATE INDEX bindings_trace_idx ON {s}.bindings USING hash (trace_id);
CREATE INDEX bindings_context_idx ON {s}.bindings USING hash (context_id);
CREATE INDEX bindings_task_idx ON {s}.bindings USING hash (task_id);
"""
_OLD_BINDINGS_INDEXES: Final = (
    "DROP INDEX IF EXISTS {s}.bindings_unique_idx, {s}.bindings_trace_idx, "
    "{s}.bindings_context_idx, {s}.bindings_task_idx;")

_V5: Final = """
CREATE TABLE {s}.schema_version (
    version integer PRIMARY KEY,
    applied_ts double precision NOT NULL DEFAULT extract(epoch FROM now())
);
CREATE TABLE {s}.blocks (
    id bigserial PRIMARY KEY,
    trace_key bigint,
    first bigint NOT NULL,
    n integer NOT NULL,
    ts_lo double precision NOT NULL,
    ts_hi double precision NOT NULL,
    data text NOT NULL
);
CREATE INDEX blocks_trace_idx ON {s}.blocks (trace_key, first);
CREATE TABLE {s}.flow_seqs (
    -- "C" collation: byte comparisons (a libc locale costs on every index insert).
    flow_id text COLLATE "C" NOT NULL,
    lo bigint NOT NULL,
    hi bigint NOT NULL,
    PRIMARY KEY (flow_id, lo)
);
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
    events_lost bigint NOT NULL DEFAULT 0,
""" + _STATUS + """
);
CREATE UNIQUE INDEX traces_first_seen_idx ON {s}.traces (first_seen);
CREATE INDEX traces_started_idx ON {s}.traces (started_ts DESC);
CREATE TABLE {s}.bindings (
    id bigserial PRIMARY KEY,
    trace_id text COLLATE "C" NOT NULL,
    context_id text,
    task_id text,
    agent_url text
);
""" + _BINDINGS_INDEXES


# lz4 (Postgres >= 14 built with it) compresses a large block ~4x faster than the
# default pglz (a 10,000-event block took ~30 ms to COPY with pglz, ~7 ms with lz4,
# measured). Blocks under ~2 KB are stored inline, uncompressed.
_HAS_LZ4: Final = ("SELECT coalesce(bool_or('lz4' = ANY(enumvals)), false) FROM pg_settings "
                   "WHERE name = 'default_toast_compression'")


def _quoted(schema: str) -> str:
    return f'"{schema}"'


async def _version(conn: Any, schema: str, where: str) -> int | None:
    """The schema's recorded version; None without a ``schema_version`` table, 0 when
    that table is empty.

    Raises:
        StateStoreError: a ``schema_version`` table that is not ours (another tool's,
            e.g. Flyway's, with a text ``version`` column).
    """
    s = _quoted(schema)
    if await conn.fetchval("SELECT to_regclass($1)", f"{s}.schema_version") is None:
        return None
    # The catalog, not information_schema: that one shows only the columns the role
    # has a privilege on, and a reader's role may have SELECT on some tables only.
    kind = await conn.fetchval(
        "SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
        "JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = $1 AND c.relname = 'schema_version' AND a.attname = 'version' "
        "AND NOT a.attisdropped", schema)
    if kind != "integer":
        raise _foreign(schema, where, "its schema_version table is another tool's")
    return int(await conn.fetchval(f"SELECT coalesce(max(version), 0) FROM {s}.schema_version"))


#: What a version-5 store has (tables and columns), checked on open: a schema that
#: records version 5 but lacks them is another application's, refused at once, not
#: a store whose every write then fails.
_V5_COLUMNS: Final = {
    "blocks": frozenset({"id", "trace_key", "first", "n", "ts_lo", "ts_hi", "data"}),
    "flow_seqs": frozenset({"flow_id", "lo", "hi"}),
    "traces": frozenset({
        "trace_id", "first_seen", "flow_name", "started_ts", "ended_ts", "node_count",
        "error_count", "remote_call_count", "event_count", "open_count", "cancelled",
        "failed", "nodes", "events_lost", "status"}),
    "bindings": frozenset({"id", "trace_id", "context_id", "task_id", "agent_url"}),
}


async def _check_layout(conn: Any, schema: str, where: str) -> None:
    """Raise unless ``schema`` has every table and column of version 5 (catalog reads)."""
    rows = await conn.fetch(  # the catalog: see _version
        "SELECT c.relname, a.attname FROM pg_attribute a "
        "JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = $1 AND c.relname = ANY($2::text[]) AND a.attnum > 0 "
        "AND NOT a.attisdropped", schema, list(_V5_COLUMNS))
    found: dict[str, set[str]] = {}
    for row in rows:
        found.setdefault(row["relname"], set()).add(row["attname"])
    missing = sorted(f"{table}.{column}" for table, columns in _V5_COLUMNS.items()
                     for column in columns - found.get(table, set()))
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise _foreign(schema, where, f"it records version {SCHEMA_VERSION} but lacks {shown}")


def _foreign(schema: str, where: str, why: str) -> StateStoreError:
    return StoreRefused(
        f"Postgres schema {schema!r} at {where} is not a penguiflow store ({why}); nothing "
        f"was changed. Use another schema (schema=...)")


def _refuse(version: int, schema: str, where: str) -> StateStoreError:
    """The error for a schema version this module neither uses nor migrates."""
    head = f"Postgres schema {schema!r} at {where} has version {version}"
    if version > SCHEMA_VERSION:
        return StateStoreError(
            f"{head}, newer than this penguiflow-exporters supports ({SCHEMA_VERSION}); "
            f"upgrade penguiflow-exporters, or use another schema (schema=...)")
    if version == 0:
        return StateStoreError(
            f"Postgres schema {schema!r} at {where} is not a penguiflow store (its "
            f"schema_version table is empty); use another schema (schema=...)")
    return StateStoreError(
        f"{head}, which this penguiflow-exporters cannot migrate (it migrates version 4 "
        f"to {SCHEMA_VERSION}); open it once with a penguiflow-exporters release that "
        f"writes version 4 (it migrates older versions in place), then with this one; "
        f"or use another schema (schema=...). Nothing was changed")


def _store_url(schema: str) -> str:
    """What ``pf migrate --store`` takes for ``schema`` (a placeholder for the URL)."""
    return "<url>" if schema == "penguiflow" else f"'<url>?schema={schema}'"


async def stored_version(conn: Any, schema: str, where: str) -> int | None:
    """The version ``schema`` records, reading the catalog only: None when the schema
    does not exist or has no ``schema_version`` table, 0 when that table is empty.

    Raises:
        StateStoreError: a ``schema_version`` table that is not ours.
    """
    if await conn.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = $1", schema) is None:
        return None
    return await _version(conn, schema, where)


async def check_schema(conn: Any, schema: str, where: str) -> None:
    """A read-only store's check: ``schema`` holds a version-5 penguiflow store.

    Reads the catalog only.

    Raises:
        StateStoreError: the schema does not exist, is not a penguiflow store's,
            or has another version (the message says what to do).
    """
    exists = await conn.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = $1", schema)
    if exists is None:
        raise StateStoreError(
            f"Postgres at {where} has no schema {schema!r}: nothing was recorded there "
            f"(a read-only store creates nothing); check the schema name (schema=...)")
    version = await _version(conn, schema, where)
    if version is None:
        raise StateStoreError(
            f"Postgres schema {schema!r} at {where} is not a penguiflow store (it has no "
            f"schema_version table); check the schema name (schema=...)")
    if version == 4:
        raise StateStoreError(
            f"Postgres schema {schema!r} at {where} has version 4, which a read-only store "
            f"does not migrate; run pf migrate --store {_store_url(schema)} (or open it "
            f"once without readonly=True) to migrate it to version {SCHEMA_VERSION}")
    if version != SCHEMA_VERSION:
        raise _refuse(version, schema, where)
    await _check_layout(conn, schema, where)


async def create_or_migrate(conn: Any, schema: str, where: str, lock_key: int) -> None:
    """A writable store's open: create the schema at version 5, or migrate version 4.

    The usual case (version 5 already) takes no lock and runs no DDL. Otherwise one
    transaction under an advisory lock (processes opening together wait for each
    other, and find the work done): a refused version rolls back, changing nothing.

    Raises:
        StateStoreError: a version neither current nor 4, or a v4 block that cannot
            be read (the message names it).
    """
    version = await _version(conn, schema, where)
    if version == SCHEMA_VERSION:
        # (An older version 5's value btrees on the bindings are kept: rebuilding
        # them takes the table's lock for as long as it runs, which an open must not
        # do behind a production database's back; `pf migrate` does it.)
        await _check_layout(conn, schema, where)
        return
    if version is not None and version != 4:
        raise _refuse(version, schema, where)
    s = _quoted(schema)
    async with conn.transaction():
        # No lock timeout for this one lock (the store's open sets one for the rest):
        # another process creating or migrating the schema holds it as long as that
        # takes, and this one must wait for it, then find the work done. The DDL
        # after keeps the timeout: a table locked elsewhere must not hold it for ever.
        timeout = await conn.fetchval("SHOW lock_timeout")
        await conn.execute("SET LOCAL lock_timeout = 0")
        await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", MIGRATE_LOCK, lock_key)
        await conn.execute("SELECT set_config('lock_timeout', $1, true)", timeout)
        # Looked up first: CREATE SCHEMA IF NOT EXISTS needs CREATE on the database even
        # when the schema exists, which a role given a schema made for it lacks.
        if await conn.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = $1",
                               schema) is None:
            await conn.execute(f"CREATE SCHEMA {s}")
        version = await _version(conn, schema, where)  # another process may have done it
        if version == SCHEMA_VERSION:
            await _check_layout(conn, schema, where)
            return
        lz4 = bool(await conn.fetchval(_HAS_LZ4))
        if version is None:
            tables = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = $1 "
                                      "ORDER BY tablename LIMIT 4", schema)
            if tables:  # another application's schema: never add our tables beside them
                names = ", ".join(row["tablename"] for row in tables[:3])
                raise _foreign(schema, where, f"it holds tables of its own: {names}"
                                              + (", ..." if len(tables) > 3 else ""))
            await conn.execute(_V5.format(s=s))
            if lz4:
                await conn.execute(f"ALTER TABLE {s}.blocks ALTER COLUMN data "
                                   f"SET COMPRESSION lz4")
        elif version == 4:
            await _v4_to_v5(conn, schema, lz4)
            if await old_bindings_indexes(conn, schema):
                await conn.execute((_OLD_BINDINGS_INDEXES + _BINDINGS_INDEXES).format(s=s))
        else:
            raise _refuse(version, schema, where)
        await conn.execute(f"INSERT INTO {s}.schema_version (version) VALUES ($1)",
                           SCHEMA_VERSION)


async def old_bindings_indexes(conn: Any, schema: str) -> bool:
    """Whether ``schema``'s bindings are indexed by their values (btrees, made before
    the hash indexes of _BINDINGS_INDEXES): the server then refuses a binding whose
    ids exceed a btree's index row limit (2,704 bytes, after compression)."""
    definition = await conn.fetchval(
        "SELECT indexdef FROM pg_indexes WHERE schemaname = $1 "
        "AND indexname = 'bindings_unique_idx'", schema)
    return definition is not None and "md5" not in definition


async def upgrade_bindings_indexes(conn: Any, schema: str, lock_key: int) -> bool:
    """Replace the bindings' value btrees by _BINDINGS_INDEXES (same uniqueness, so no
    row conflicts), under the migration lock; True when it did. ``pf migrate`` runs
    it: it holds the table's lock while the indexes are rebuilt, which a store's
    open must not do unasked.

    Raises:
        asyncpg.PostgresError: as the DDL raised it (a lock not had in time, a role
            that does not own the table).
    """
    s = _quoted(schema)
    async with conn.transaction():
        # Processes migrating together wait for each other, then find the work done.
        await conn.execute("SET LOCAL lock_timeout = 0")
        await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", MIGRATE_LOCK, lock_key)
        await conn.execute("SET LOCAL lock_timeout = '30s'")
        if not await old_bindings_indexes(conn, schema):  # done meanwhile
            return False
        await conn.execute((_OLD_BINDINGS_INDEXES + _BINDINGS_INDEXES).format(s=s))
    return True


# -- migration 4 -> 5 ---------------------------------------------------------------------

_MIGRATION_FETCH: Final = 500  # blocks per round trip (at most ~2,000 events each)


async def _v4_to_v5(conn: Any, schema: str, lz4: bool) -> None:
    """Version 4 -> 5, in the caller's transaction: every block's pickle becomes JSON
    (_legacy_v4.decode_v4_block, then _blocks.encode_block), ``blocks.data`` becomes
    ``text``, and ``traces`` gains ``events_lost`` (its ``status`` regenerated with
    "incomplete"). Block ids, keys and positions are kept."""
    s = _quoted(schema)
    await conn.execute(
        f"ALTER TABLE {s}.blocks ADD COLUMN doc text;"
        + (f"ALTER TABLE {s}.blocks ALTER COLUMN doc SET COMPRESSION lz4;" if lz4 else "")
        + "CREATE TEMPORARY TABLE pf_v5_docs (id bigint PRIMARY KEY, doc text NOT NULL) "
          "ON COMMIT DROP;"
        f"DECLARE pf_v4_blocks NO SCROLL CURSOR FOR SELECT id, data FROM {s}.blocks "
        f"ORDER BY id")
    while rows := await conn.fetch(f"FETCH {_MIGRATION_FETCH} FROM pf_v4_blocks"):
        docs = []
        for block_id, data in rows:
            try:
                block = decode_v4_block(data)  # bounded: see _legacy_v4
                docs.append((block_id, encode_block(block, ascii_only=True)))  # any encoding
            except BlockError as exc:
                raise StateStoreError(
                    f"cannot migrate Postgres schema {schema!r} to version "
                    f"{SCHEMA_VERSION}: event block {block_id} (blocks.id) cannot be read "
                    f"({exc}); nothing was changed. Delete that row, or use another "
                    f"schema") from exc
        await conn.copy_records_to_table("pf_v5_docs", records=docs)
        await conn.execute(f"UPDATE {s}.blocks b SET doc = d.doc FROM pf_v5_docs d "
                           f"WHERE b.id = d.id; DELETE FROM pf_v5_docs")
    await conn.execute(
        f"CLOSE pf_v4_blocks;"
        f"ALTER TABLE {s}.blocks DROP COLUMN data;"
        f"ALTER TABLE {s}.blocks RENAME COLUMN doc TO data;"
        f"ALTER TABLE {s}.blocks ALTER COLUMN data SET NOT NULL;"
        f"ALTER TABLE {s}.traces DROP COLUMN status;"
        f"ALTER TABLE {s}.traces ADD COLUMN events_lost bigint NOT NULL DEFAULT 0,"
        f" ADD COLUMN {_STATUS.strip()}")
