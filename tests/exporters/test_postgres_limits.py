"""PostgresStateStore at the server's limits and on odd input, against a real server
(the ``pg_dsn`` fixture; see test_postgres_store.py for ``make``, ``sql``, ``schema``):
block sizes, a server that stops answering, ids the server cannot hold, DSN options."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg  # type: ignore[import-untyped]
import pytest
import test_postgres_store as pgs

import penguiflow_exporters._pg_write as pg_write
from penguiflow.state import (
    EVENTS_LOST_KIND,
    RemoteBinding,
    StateStoreError,
    StoreUnavailable,
    TraceFilter,
)
from penguiflow_exporters import open_store
from penguiflow_exporters._pg_dsn import describe_dsn
from penguiflow_exporters.postgres import PostgresStateStore
from penguiflow_exporters.sqlite import SQLiteStateStore
from penguiflow_inspector.cli import main as pf_main

# The Postgres suite's fixtures, used here too.
writer, make, sql, schema = pgs.writer, pgs.make, pgs.sql, pgs.schema
ev = pgs.ev


# -- block size ----------------------------------------------------------------------


async def test_a_block_over_the_byte_cap_is_cut_and_every_event_stored(
        make: Any, sql: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    """One trace's share of a batch larger than a COPY row may be (1 GB on a real
    server, BLOCK_BYTES lowered here) is stored in several blocks, none over the cap,
    and reads back whole; it was one block, which the server refused, and the batch
    was lost."""
    monkeypatch.setattr(pg_write, "BLOCK_BYTES", 20_000, raising=False)
    store = await make()
    events = [ev("big", i, payload={"s": chr(0x4e00 + i) * 2_000 + str(i)}) for i in range(30)]
    events.append(ev("small", 0, flow="flow-2"))
    for event in events:
        await store.save_event(event)
    await store.flush()
    assert store.failures["events_lost"] == 0
    assert await store.load_history("big") == events[:-1]
    assert await store.load_history("small") == events[-1:]
    page = await store.load_history_page("big", offset=7, limit=11)
    assert page == events[7:18]
    rows = await sql.fetch(
        f'SELECT first, n, octet_length(data) AS size FROM "{store.schema}".blocks '
        f"WHERE trace_key = (SELECT first_seen FROM \"{store.schema}\".traces "
        f"WHERE trace_id = 'big') ORDER BY first")
    assert len(rows) > 1
    assert all(row["size"] <= 20_000 for row in rows)
    assert [row["first"] for row in rows] == list(
        itertools.accumulate([0] + [row["n"] for row in rows[:-1]]))
    assert sum(row["n"] for row in rows) == 30
    summary = await store.get_trace("big")
    assert summary is not None and summary.event_count == 30



# -- a server that stops answering ---------------------------------------------------


class FreezingProxy:
    """A TCP proxy to the test server that stops forwarding on :meth:`freeze` while
    keeping every connection open: a hung server, or a network partition."""

    def __init__(self, dsn: str) -> None:
        parts = urlsplit(dsn)
        self._target = (parts.hostname or "127.0.0.1", parts.port or 5432)
        self._dsn = dsn
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        """Listen; the DSN that goes through the proxy."""
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        parts = urlsplit(self._dsn)
        user = parts.netloc.rpartition("@")[0]
        return urlunsplit(parts._replace(netloc=f"{user}@127.0.0.1:{port}"))

    def freeze(self) -> None:
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()

    async def _handle(self, client_r: asyncio.StreamReader,
                      client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(*self._target)
        self._writers += [client_w, server_w]
        for reader, writer in ((client_r, server_w), (server_r, client_w)):
            task = asyncio.create_task(self._pipe(reader, writer))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@pytest.fixture
async def proxy(pg_dsn: str) -> AsyncIterator[FreezingProxy]:
    proxy = FreezingProxy(pg_dsn)
    try:
        yield proxy
    finally:
        await proxy.close()


async def test_a_server_that_stops_answering_fails_reads_and_writes_in_bounded_time(
        proxy: FreezingProxy, schema: str, writer: str) -> None:
    """Reads raise StoreUnavailable naming the store and command_timeout_s, and
    flush() returns with the batch counted lost, when the server stops answering
    (connection open, no replies); get_trace and flush() waited for ever."""
    store = PostgresStateStore(await proxy.start(), schema=schema, writer=writer,
                               connect_timeout_s=1.0, command_timeout_s=0.5, retries=1,
                               close_timeout_s=2.0)
    try:
        await store.save_event(ev("t", 0))
        await store.flush()
        assert (summary := await store.get_trace("t")) is not None
        assert summary.event_count == 1
        proxy.freeze()
        with pytest.raises(StoreUnavailable, match=(
                rf"Postgres at .*{schema}.* did not answer while reading a trace summary"
                rf".*command_timeout_s=0\.5")):
            await asyncio.wait_for(store.get_trace("t"), 30)
        for seq in range(1, 6):
            await store.save_event(ev("t", seq))
        await asyncio.wait_for(store.flush(), 30)
        assert store.failures["events_lost"] == 5
        assert store.failures["retried"] >= 1
        proxy.thaw()
    finally:
        await store.close()


def test_command_timeout_is_validated() -> None:
    for bad in (0, -1.0, "60", None):
        with pytest.raises(ValueError, match="command_timeout_s"):
            PostgresStateStore("postgresql://u@h/d", command_timeout_s=bad)


# -- the schema a store URL names ----------------------------------------------------


def with_schema(dsn: str, schema: str) -> str:
    return f"{dsn}{'&' if '?' in dsn else '?'}schema={schema}"


def test_the_schema_query_parameter_is_taken_out_of_the_dsn() -> None:
    from penguiflow_exporters.postgres import split_schema

    dsn = "postgresql://u:p%40w@h:5433/db?sslmode=disable&schema=myapp&application_name=a"
    assert split_schema(dsn) == (
        "postgresql://u:p%40w@h:5433/db?sslmode=disable&application_name=a", "myapp")
    assert split_schema("postgresql://u@h/db?schema=x") == ("postgresql://u@h/db", "x")
    assert split_schema("postgresql://u@h/db") == ("postgresql://u@h/db", None)
    assert PostgresStateStore("postgresql://u@h/db?schema=myapp").schema == "myapp"
    assert PostgresStateStore("postgresql://u@h/db").schema == "penguiflow"
    with pytest.raises(ValueError, match="schema"):
        PostgresStateStore("postgresql://u@h/db?schema=a", schema="b")
    with pytest.raises(ValueError, match="schema"):
        PostgresStateStore("postgresql://u@h/db?schema=Not-Valid")
    # An unset variable in the URL must not land in the shared default schema.
    for empty in ("?schema=", "?schema", "?sslmode=disable&schema=%20", "?sch%65ma="):
        with pytest.raises(ValueError, match="schema= is empty"):
            PostgresStateStore("postgresql://u@h/db" + empty)
    with pytest.raises(ValueError, match="not empty"):
        PostgresStateStore("postgresql://u@h/db", schema="")
    assert split_schema("postgresql://u@h/db?sch%65ma=x") == ("postgresql://u@h/db", "x")


async def test_a_store_url_selects_its_schema_and_pf_reads_it(
        pg_dsn: str, schema: str, sql: asyncpg.Connection,
        capsys: pytest.CaptureFixture[str]) -> None:
    """``?schema=`` in a store URL selects the schema, for open_store and pf alike;
    there was no way to point pf at a schema other than penguiflow."""
    url = with_schema(pg_dsn, schema)
    async with open_store(url, writer="loop") as store:
        await store.save_event(ev("in-myapp", 0))
    assert await sql.fetchval(f'SELECT count(*) FROM "{schema}".traces') == 1
    async with open_store(url, readonly=True) as reader:
        assert [e.seq for e in await reader.load_history("in-myapp")] == [0]
    capsys.readouterr()
    assert await asyncio.to_thread(pf_main, ["traces", "--json", "--store", url]) == 0
    assert [t["trace_id"] for t in json.loads(capsys.readouterr().out)] == ["in-myapp"]


async def test_pf_migrate_refuses_a_schema_with_no_store_and_creates_nothing(
        pg_dsn: str, schema: str, sql: asyncpg.Connection,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Like SQLite's: exit 2 and nothing created; it created an empty store."""
    assert await asyncio.to_thread(
        pf_main, ["migrate", "--store", with_schema(pg_dsn, schema)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"pf migrate: no penguiflow trace store in Postgres schema "
                           f"{schema!r}")
    assert await sql.fetchval(
        "SELECT count(*) FROM pg_namespace WHERE nspname = $1", schema) == 0


async def test_pf_migrate_upgrades_the_v4_schema_its_url_names_and_says_what_it_did(
        pg_dsn: str, schema: str, sql: asyncpg.Connection,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A read-only store's advice names the schema, and pf migrate with that URL
    upgrades it, saying from which version; the advice acted on penguiflow."""
    await pgs.make_v4_schema(sql, schema, pgs.v4_batches())
    with pytest.raises(StateStoreError, match=(
            rf"has version 4.*run pf migrate --store '<url>\?schema={schema}'")):
        async with PostgresStateStore(pg_dsn, schema=schema, readonly=True):
            pass
    url = with_schema(pg_dsn, schema)
    capsys.readouterr()
    assert await asyncio.to_thread(pf_main, ["migrate", "--store", url]) == 0
    assert capsys.readouterr().out == (
        f"upgraded {url} (Postgres schema {schema!r}) from schema 4 to 5\n")
    assert await asyncio.to_thread(pf_main, ["migrate", "--store", url]) == 0
    assert capsys.readouterr().out == (
        f"{url} (Postgres schema {schema!r}) is already at schema 5; nothing to do\n")
    assert await asyncio.to_thread(pf_main, ["traces", "--json", "--store", url]) == 0
    assert sorted(t["trace_id"] for t in json.loads(capsys.readouterr().out)) == ["rt", "st"]


# -- read-only sessions ----------------------------------------------------------------


async def test_a_reader_opens_with_target_session_attrs_read_write_and_stays_read_only(
        make: Any, pg_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``?target_session_attrs=read-write`` in the DSN (common for a primary behind
    several hosts) no longer makes every read-only store, so every pf reader, fail to
    connect; its sessions are still read-only, after the pool has reset them too."""
    store = await make()
    await store.save_event(ev("t", 0))
    await store.flush()
    url = with_schema(f"{pg_dsn}?target_session_attrs=read-write", store.schema)
    async with PostgresStateStore(url, readonly=True, pool_max=1) as reader:
        for _ in range(3):  # the one connection, released and reset between queries
            assert (summary := await reader.get_trace("t")) is not None
            assert summary.event_count == 1
        assert await reader._query("checking", "fetchval", "SHOW transaction_read_only") == "on"
        with pytest.raises(StateStoreError):
            await reader._query("writing", "execute",
                                f'DELETE FROM "{store.schema}".traces')
    capsys.readouterr()
    assert await asyncio.to_thread(pf_main, ["traces", "--json", "--store", url]) == 0
    assert [t["trace_id"] for t in json.loads(capsys.readouterr().out)] == ["t"]


# -- lookups of values no store can hold ---------------------------------------------


def _lookups(trace_id: Any) -> list[tuple[str, Callable[[Any], Awaitable[Any]], Any]]:
    return [
        ("load_history", lambda s: s.load_history(trace_id), []),
        ("load_history_page", lambda s: s.load_history_page(trace_id, limit=5), []),
        ("get_trace", lambda s: s.get_trace(trace_id), None),
        ("resolve_trace_id", lambda s: s.resolve_trace_id(trace_id), []),
        ("list_traces(node=)", lambda s: s.list_traces(TraceFilter(node=trace_id)), []),
        ("load_bindings", lambda s: s.load_bindings(context_id=trace_id), []),
        ("load_bindings", lambda s: s.load_bindings(trace_id="t", task_id=trace_id), []),
    ]


async def test_lookups_of_ids_postgres_cannot_hold_find_nothing_as_on_sqlite(
        make: Any, tmp_path: Any) -> None:
    """A NUL in an id is not found, on Postgres as on SQLite; Postgres raised a
    StateStoreError (CharacterNotInRepertoire) from every lookup. A lone surrogate
    (an undecodable argv byte) finds nothing either."""
    pg = await make()
    async with SQLiteStateStore(tmp_path / "t.db") as lite:
        for store in (pg, lite):
            await store.save_event(ev("t", 0))
            await store.save_remote_binding(RemoteBinding("t", "c", "k", "u"))
            for name, lookup, nothing in _lookups("t\x00"):
                assert await lookup(store) == nothing, (store, name)
    for name, lookup, nothing in _lookups("t\udcff"):
        assert await lookup(pg) == nothing, name
    assert await pg.load_bindings(trace_id="t") == [RemoteBinding("t", "c", "k", "u")]


@pytest.fixture
async def latin1_dsn(pg_dsn: str, sql: asyncpg.Connection) -> AsyncIterator[str]:
    """A LATIN1 database of the test's own, dropped after."""
    name = f"pf_latin1_{uuid.uuid4().hex[:8]}"
    await sql.execute(f"CREATE DATABASE {name} ENCODING 'LATIN1' LC_COLLATE 'C' "
                      f"LC_CTYPE 'C' TEMPLATE template0")
    parts = urlsplit(pg_dsn)
    try:
        yield urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        await sql.execute(f"DROP DATABASE {name} WITH (FORCE)")


async def test_lookups_of_characters_a_latin1_database_lacks_find_nothing(
        latin1_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    """On a LATIN1 database, looking up an id with a character LATIN1 lacks (which
    no event could store) finds nothing; it raised UntranslatableCharacterError."""
    async with PostgresStateStore(latin1_dsn, writer="loop") as store:
        await store.save_event(ev("café", 0))
        assert [e.trace_id for e in await store.load_history("café")] == ["café"]
        for name, lookup, nothing in _lookups("🐧"):
            assert await lookup(store) == nothing, name
    capsys.readouterr()
    assert await asyncio.to_thread(pf_main, ["inspect", "🐧", "--store", latin1_dsn]) == 2
    assert "no trace id starts with '🐧'" in capsys.readouterr().err


async def test_pf_inspect_of_an_undecodable_argument_says_no_trace_matches(
        make: Any, pg_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``pf inspect $'\\xff'`` (a lone surrogate in argv) says no trace id starts with
    it, exit 2; it exited 1 with a DataError."""
    store = await make()
    await store.save_event(ev("abc", 0))
    await store.flush()
    capsys.readouterr()
    url = with_schema(pg_dsn, store.schema)
    assert await asyncio.to_thread(pf_main, ["inspect", "\udcff", "--store", url]) == 2
    err = capsys.readouterr().err
    assert "no trace id starts with" in err and "DataError" not in err


# -- an unencoded @ in the password ----------------------------------------------------


async def test_an_unencoded_at_in_the_password_is_refused_naming_no_host(
        capsys: pytest.CaptureFixture[str]) -> None:
    """The driver splits user info at the first @, the description at the last: the
    error named 127.0.0.1 while the driver looked up a host 'RETpw@127.0.0.1'. Now
    the DSN is refused as unparseable, with the percent-encoding hint, before
    connecting anywhere."""
    url = "postgresql://pf:S3C@RETpw@127.0.0.1:5432/db"
    assert describe_dsn(url) == "<unparseable DSN>"
    assert describe_dsn("postgresql://pf:S3C%40RETpw@127.0.0.1:5432/db") == (
        "postgresql://pf@127.0.0.1:5432/db")
    store = PostgresStateStore(url, writer="loop")
    with pytest.raises(StateStoreError) as info:
        await store.open()
    await store.close()
    message = str(info.value)
    assert not isinstance(info.value, StoreUnavailable)
    assert "percent-encode" in message and "%40 for @" in message
    assert "127.0.0.1" not in message and "RETpw" not in message
    assert await asyncio.to_thread(pf_main, ["traces", "--store", url]) == 2
    err = capsys.readouterr().err
    assert "percent-encode" in err and "RETpw" not in err and "Start the server" not in err


# -- a flow id's length in bytes ---------------------------------------------------------


async def test_a_flow_id_over_1024_utf8_bytes_is_refused_alike_on_sqlite_and_postgres(
        make: Any, tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    """1,000 CJK characters (3,000 bytes) passed check_row's 1,024-character limit,
    and Postgres' flow_seqs index (2,704 bytes at most) refused the event with a
    driver error while SQLite stored it. Now both refuse it alone, saying why."""
    rng = random.Random(5)
    cjk = "".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(1000))
    long_ascii = "f" * 1024
    pg = await make()
    async with SQLiteStateStore(tmp_path / "t.db") as lite:
        for store in (pg, lite):
            caplog.clear()
            await store.save_event(ev("t", 1, flow=cjk))
            await store.save_event(ev("t", 2, flow=long_ascii))
            await store.save_event(ev("t", 3, flow="short"))
            await store.flush()
            assert store.failures["rejected"] == 1, store
            assert store.failures["events_lost"] == 1, store
            history = await store.load_history("t")
            assert [e.seq for e in history if e.kind != EVENTS_LOST_KIND] == [2, 3]
            assert [e.payload["events_lost"] for e in history
                    if e.kind == EVENTS_LOST_KIND] == [1]
            (record,) = [r for r in caplog.records if r.msg == "state_store_events_rejected"]
            assert record.reasons == ["flow_id is 3000 bytes long in UTF-8 (at most 1024)"]


# -- remote bindings -------------------------------------------------------------------

_OLD_BINDINGS_INDEXES = """
DROP INDEX {s}.bindings_unique_idx, {s}.bindings_trace_idx, {s}.bindings_context_idx,
    {s}.bindings_task_idx;
CREATE UNIQUE INDEX bindings_unique_idx ON {s}.bindings (
    trace_id,
    (context_id IS NULL), COALESCE(context_id, ''),
    (task_id IS NULL), COALESCE(task_id, ''),
    (agent_url IS NULL), COALESCE(agent_url, ''));
CREATE INDEX bindings_context_idx ON {s}.bindings (context_id);
CREATE INDEX bindings_task_idx ON {s}.bindings (task_id);
"""


def _long_text(n: int, seed: int) -> str:
    """``n`` characters that do not compress (an index keeps a compressed value)."""
    rng = random.Random(seed)
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(n))


async def test_remote_bindings_with_long_values_are_stored_as_on_sqlite(
        make: Any, tmp_path: Any) -> None:
    """A ~3 KB agent_url (a URL with a signed query) or context id is stored and
    found; Postgres refused it (index row size exceeds btree maximum 2704)."""
    url = "https://agent.example/a2a?sig=" + _long_text(3000, 1)
    context = _long_text(4000, 2)
    bindings = [RemoteBinding("t", context, "k", url), RemoteBinding("t", None, None, None),
                RemoteBinding("t", "", None, None)]
    pg = await make()
    async with SQLiteStateStore(tmp_path / "t.db") as lite:
        for store in (pg, lite):
            for binding in bindings + bindings:  # each stored once
                await store.save_remote_binding(binding)
            assert await store.load_bindings(trace_id="t") == bindings, store
            assert await store.load_bindings(context_id=context) == bindings[:1], store
            assert await store.load_bindings(task_id="k", trace_id="t") == bindings[:1]


async def test_an_older_schemas_bindings_indexes_are_kept_on_open_and_rebuilt_by_migrate(
        make: Any, sql: asyncpg.Connection, pg_dsn: str) -> None:
    """A version-5 schema made before (bindings indexed by value) is left as it is by
    a writing open: rebuilding its indexes holds the table's lock (a first version
    did it on open, failing every open behind a long transaction that had read the
    table, and queueing every bindings query). A binding over the old limit is
    refused early, naming the fix; pf migrate rebuilds the indexes, keeping the
    bindings and their uniqueness, and says so."""
    from penguiflow_inspector.migrate import migrate

    store = await make()
    s = f'"{store.schema}"'
    await sql.execute(_OLD_BINDINGS_INDEXES.format(s=s))  # the earlier layout
    await store.save_remote_binding(RemoteBinding("t", "c", None, "u"))
    await store.close()
    again = await make(schema=store.schema)
    assert await again.load_bindings(trace_id="t") == [RemoteBinding("t", "c", None, "u")]
    definition = await sql.fetchval(
        "SELECT indexdef FROM pg_indexes WHERE schemaname = $1 "
        "AND indexname = 'bindings_unique_idx'", store.schema)
    assert "md5" not in definition  # untouched by the open
    long = RemoteBinding("t", "c", None, "https://a/?" + _long_text(3000, 3))
    with pytest.raises(StateStoreError, match=r"too long for the bindings indexes.*pf migrate"):
        await again.save_remote_binding(long)
    # What the old indexes can take is the server's to say (it compresses index
    # values): a long but compressible id is stored (a first version refused it).
    repetitive = RemoteBinding("t", "c", None, "https://a/?" + "x" * 5000)
    await again.save_remote_binding(repetitive)
    url = f"{pg_dsn}{'&' if '?' in pg_dsn else '?'}schema={store.schema}"
    said = await migrate(url)
    assert "rebuilt its remote-bindings indexes" in said
    assert "nothing to do" in await migrate(url)  # once
    definition = await sql.fetchval(
        "SELECT indexdef FROM pg_indexes WHERE schemaname = $1 "
        "AND indexname = 'bindings_unique_idx'", store.schema)
    assert "md5" in definition
    # A store open all along stores it now too (a first version kept refusing).
    await again.save_remote_binding(RemoteBinding("t", "c", None, "u"))  # stored once
    await again.save_remote_binding(long)
    assert await again.load_bindings(trace_id="t") == [
        RemoteBinding("t", "c", None, "u"), repetitive, long]


@pytest.mark.parametrize(("binding", "says"), [
    (RemoteBinding("t", "c\x00", "k", "u"), "context_id holds NUL"),
    (RemoteBinding("t", "c", "\ud800", "u"), "task_id holds a lone surrogate"),
    (RemoteBinding("t", 5, "k", "u"), "context_id is a int, not a str or None"),  # type: ignore[arg-type]
    (RemoteBinding(7, "c", "k", "u"), "trace_id is a int, not a str"),  # type: ignore[arg-type]
])
async def test_a_binding_postgres_cannot_hold_is_refused_naming_the_field(
        make: Any, binding: RemoteBinding, says: str) -> None:
    """A clear StateStoreError naming the field, not the driver's DataError or the
    server's CharacterNotInRepertoire; the store goes on."""
    store = await make()
    with pytest.raises(StateStoreError, match=rf"cannot store the remote binding.*{says}"):
        await store.save_remote_binding(binding)
    await store.save_remote_binding(RemoteBinding("t", "c", "k", "u"))
    assert await store.load_bindings(trace_id="t") == [RemoteBinding("t", "c", "k", "u")]


async def test_a_timed_out_reads_query_is_cancelled_on_the_server(
        make: Any, sql: asyncpg.Connection) -> None:
    """A server that is slow, not hung: the timed-out read's query ran on after its
    socket closed, and every retry added one (six timeouts left six backends busy)."""
    store = await make(command_timeout_s=0.3)
    await store.open()
    marker = f"pf-cancel-{uuid.uuid4().hex}"
    with pytest.raises(TimeoutError):
        await store._call("fetchval", f"SELECT pg_sleep(30), '{marker}'")
    # Closed at once (a one-shot pf command showing the error): the cancel still
    # goes out first (a first version dropped it with the pool).
    await store.close()

    # Polled: the server's view of its sessions has no event to await.
    running = 1
    for _ in range(100):  # up to ~5 s, not the query's 30 s: cancelled
        running = await sql.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
            "AND query LIKE $1 AND pid <> pg_backend_pid()", f"%{marker}%")
        if not running:
            break
        await asyncio.sleep(0.05)
    assert running == 0


async def test_pf_migrate_names_the_owner_when_its_role_may_not_rebuild_the_indexes(
        make: Any, sql: asyncpg.Connection, pg_dsn: str) -> None:
    """A role that may use the store but does not own its tables: the command said
    the store was refused and to grant privileges, which cannot help."""
    from penguiflow_inspector.migrate import CommandError, migrate

    store = await make()
    await store.close()
    s = f'"{store.schema}"'
    await sql.execute(_OLD_BINDINGS_INDEXES.format(s=s))
    role = f"pf_user_{uuid.uuid4().hex[:8]}"
    await sql.execute(f"CREATE ROLE {role} LOGIN")
    try:
        await sql.execute(f"GRANT USAGE ON SCHEMA {s} TO {role}; "
                          f"GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA {s} TO {role}; "
                          f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA {s} TO {role}")
        parts = urlsplit(pg_dsn)
        as_role = urlunsplit(parts._replace(netloc=f"{role}@{parts.hostname}:{parts.port}"))
        url = f"{as_role}{'&' if '?' in as_role else '?'}schema={store.schema}"
        with pytest.raises(CommandError, match="only the owner of the bindings table") as info:
            await migrate(url)
        assert info.value.exit_code == 1
    finally:
        await sql.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")
