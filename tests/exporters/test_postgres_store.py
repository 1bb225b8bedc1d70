"""PostgresStateStore against a real server.

The server comes from the ``pg_dsn`` fixture (tests/exporters/conftest.py):
``$TEST_PG_DSN``, else a throwaway cluster; without either the tests skip, or fail
when ``CI=true``. Every test works in schemas of its own (``pf_test_<random>``),
dropped at teardown. A second store on the same schema stands for another
process: it has its own pool and its own server sessions. The tests taking ``make``
run with each writer (``writer="process"``, the default, and ``"loop"``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import os
import pickle
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pytest
from store_support import fields, kill_writer_mid_batch

from penguiflow import Headers, Message, Node, NodePolicy, create
from penguiflow.state import (
    InMemoryStateStore,
    RemoteBinding,
    StateStoreError,
    StoredEvent,
    StoreUnavailable,
    TraceFilter,
    TraceSummaryBuilder,
    stored_from_fields,
)
from penguiflow_exporters._blocks import decode_block, encode_block
from penguiflow_exporters.postgres import SCHEMA_VERSION, PostgresStateStore

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


def ev(trace: str | None, seq: int, kind: str = "node_start", node: str | None = "a", *,
       flow: str | None = "flow-1", ts: float | None = None, attempt: int = 0,
       **ids: Any) -> StoredEvent:
    return StoredEvent(trace, 1000.0 + seq if ts is None else ts, kind, node,
                       None if node is None else f"{node}-id", {"seq": seq, "kind": kind},
                       seq=seq, flow_id=flow, flow_name="demo", attempt=attempt, **ids)


def fold(trace_id: str, events: list[StoredEvent]) -> Any:
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


# -- schema ------------------------------------------------------------------------------


async def test_open_creates_the_schema_and_records_its_version(
        make: MakeStore, sql: asyncpg.Connection) -> None:
    store = await make()
    tables = {r[0] for r in await sql.fetch(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = $1",
        store.schema)}
    assert tables == {"blocks", "flow_seqs", "traces", "bindings", "schema_version"}
    again = await make(schema=store.schema)  # already migrated: nothing to do
    assert again.schema == store.schema
    rows = await sql.fetch(f'SELECT version FROM "{store.schema}".schema_version')
    assert [r[0] for r in rows] == list(range(1, SCHEMA_VERSION + 1))


async def test_concurrent_opens_migrate_once(make: MakeStore, sql: asyncpg.Connection) -> None:
    first = await make()
    await sql.execute(f'DROP SCHEMA "{first.schema}" CASCADE')  # start from nothing
    # Separate pools, so separate server sessions: what several processes would do.
    await asyncio.gather(*(make(schema=first.schema) for _ in range(4)))
    rows = await sql.fetch(f'SELECT version FROM "{first.schema}".schema_version')
    assert [r[0] for r in rows] == list(range(1, SCHEMA_VERSION + 1))


async def test_a_newer_schema_version_is_refused(make: MakeStore,
                                                 sql: asyncpg.Connection) -> None:
    store = await make()
    await sql.execute(f'INSERT INTO "{store.schema}".schema_version (version) VALUES ($1)',
                      SCHEMA_VERSION + 1)
    with pytest.raises(StateStoreError, match=rf"version {SCHEMA_VERSION + 1}, newer") as info:
        await make(schema=store.schema)
    assert not isinstance(info.value, StoreUnavailable)


def test_schema_name_is_validated() -> None:
    with pytest.raises(ValueError, match="lowercase identifier"):
        PostgresStateStore("postgresql://x@127.0.0.1/db", schema='Bad"Name')


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


async def test_payload_values_are_stored_as_plain_data(make: MakeStore) -> None:
    # Blocks keep any float (JSON could not hold NaN or the infinities); what is
    # not plain data is stored as its str (see _blocks.py).
    store = await make()
    await store.save_events([
        StoredEvent("t1", 1.0, "node_error", "a", "a-id",
                    {"latency_ms": math.nan, "limit": -math.inf, "error": ValueError("boom")},
                    seq=1, flow_id="f"),
    ])
    (stored,) = await store.load_history("t1")
    assert math.isnan(stored.payload["latency_ms"])
    assert {k: v for k, v in stored.payload.items() if k != "latency_ms"} == {
        "limit": -math.inf, "error": "boom"}
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
    await store._writer_started()  # writer="process": every batch goes to the writer
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


async def test_write_returns_the_buffered_objects_it_stored(make: MakeStore) -> None:
    # The base class hands these to in-process followers: they must be the
    # buffered objects themselves (runtime tuples or StoredEvents), in order.
    store = await make()
    await store._writer_started()  # writer="process": _prepare makes its payloads
    a, b, c = fields("t", 1), ev("t", 2, flow="flow-r"), fields("t", 3)
    traceless, d = ev(None, 4, flow="flow-r"), fields("t", 5)

    async def write(batch: list[Any]) -> list[int]:
        return [id(x) for x in await store._write(await store._prepare(batch))]

    assert await write([a, b]) == [id(a), id(b)]
    assert await write([a, c, b, c, traceless]) == [id(c), id(traceless)]
    assert await write([c, d, traceless]) == [id(d)]  # stored before, none repeated here
    assert await write([a, b, c]) == []
    # Runtime tuples alone (the writer process groups them itself), re-delivered too.
    e, f = fields("t", 6), fields("u", 7)
    assert await write([e, d, f, e]) == [id(e), id(f)]


async def test_write_returns_the_new_events_of_a_batch_mixing_traces(make: MakeStore) -> None:
    store = await make()
    await store._writer_started()  # writer="process": _prepare makes its payloads
    for a1, b2, c in ((ev("t1", 1), ev("t2", 2), ev("t2", 3, "node_success")),
                      (fields("t3", 4), fields("t4", 5), fields("t4", 6, "node_success"))):
        assert await store._write(await store._prepare([a1])) == [a1]
        # StoredEvents go to the writer process grouped by trace (t2's two events,
        # then t1's), runtime tuples in batch order; either way the events returned
        # (what followers get) are in batch order, the re-delivery left out.
        assert await store._write(await store._prepare([b2, a1, c])) == [b2, c]
    assert [e.seq for e in await store.load_history("t2")] == [2, 3]
    assert [e.seq for e in await store.load_history("t4")] == [5, 6]
    assert store.failures == {}


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
    return events


FILTERS = [
    TraceFilter(),
    TraceFilter(limit=3),
    TraceFilter(order="slowest"),
    TraceFilter(order="slowest", limit=2),
    *(TraceFilter(status=s) for s in ("cancelled", "failed", "running", "succeeded")),
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
        make: MakeStore, sql: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    from penguiflow_exporters import _blocks, postgres

    # A trace's share of a batch: 1-2 blocks (encoded on the loop, or for the writer).
    monkeypatch.setattr(postgres, "BLOCK_EVENTS", 4)
    monkeypatch.setattr(_blocks, "BLOCK_EVENTS", 4)
    store = await make(batch_size=7)
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
    long_id = "L" * 9000  # longer than a NOTIFY payload may be
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
        caplog: pytest.LogCaptureFixture) -> None:
    store = PostgresStateStore(f"postgresql://pf@127.0.0.1:{refused_port()}/db",
                               schema="pf_unreachable", connect_timeout_s=5)

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
    assert store.failures["write_failed"] >= 1
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


class _Evil:
    def __reduce__(self) -> Any:
        return (print, ("not plain data",))


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
    await sql.execute(f"UPDATE {s}.blocks SET data = $1 WHERE id = $2",
                      b"\x80\x05garbage", first_id)
    pattern = rf"{store.schema}.*event block {first_id} \(blocks.id\) cannot be read: corrupt"
    with pytest.raises(StateStoreError, match=pattern) as info:
        await store.load_history("t1")
    assert not isinstance(info.value, StoreUnavailable)
    with pytest.raises(StateStoreError, match=pattern):
        await store.load_history_page("t1", offset=1, limit=2)
    # The other block still reads.
    assert await store.load_history_page("t1", offset=2, limit=2) == events[2:]
    # A block naming anything but plain data is refused, never run.
    await sql.execute(f"UPDATE {s}.blocks SET data = $1 WHERE id = $2",
                      pickle.dumps([_Evil()], 5), second_id)
    with pytest.raises(StateStoreError, match=rf"event block {second_id} .*builtins.print"):
        await store.load_history_page("t1", offset=2, limit=2)
    # So is an item of neither layout.
    await sql.execute(f"UPDATE {s}.blocks SET data = $1 WHERE id = $2",
                      encode_block([("t1", 1.0)]), second_id)
    with pytest.raises(StateStoreError, match=rf"event block {second_id} .*2 fields"):
        await store.load_history_page("t1", offset=2, limit=2)


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


def _errors_logged(caplog: pytest.LogCaptureFixture) -> list[BaseException]:
    return [r.exc_info[1] for r in caplog.records
            if r.getMessage() == "state_store_write_failed" and r.exc_info and r.exc_info[1]]


@PROCESS_ONLY
async def test_a_store_opened_and_queried_but_never_written_to_starts_no_writer(
        make: MakeStore) -> None:
    store = await make(writer="process")
    assert await store.list_traces() == [] and await store.get_trace("t") is None
    assert await store.load_history("t") == []
    await store.flush()
    writer = store._proc_writer
    assert writer is not None and writer.started == 0 and writer.pid is None
    await store.close()
    assert writer.started == 0


@PROCESS_ONLY
async def test_the_writer_process_starts_with_the_first_buffered_event(
        make: MakeStore) -> None:
    store = await make(writer="process", flush_interval_s=3600.0)
    assert store._starting is None  # open() starts none
    await store.save_events([ev("t", 1)])
    assert store._starting is not None  # the event did
    await store._writer_started()
    writer = store._proc_writer
    assert writer is not None and writer.started == 1 and writer.pid is not None
    await store.flush()
    assert await store.load_history("t") == [ev("t", 1)]


@PROCESS_ONLY
async def test_a_writer_process_that_died_between_batches_is_replaced(
        make: MakeStore) -> None:
    store = await make(writer="process", flush_interval_s=3600.0)
    await store._writer_started()  # else the first batches are written on the loop
    first = [ev("t", 1), ev("t", 2, "node_success")]
    await store.save_events(first)
    await store.flush()
    writer = store._proc_writer
    assert writer is not None and writer._proc is not None and writer.started == 1
    dead = writer._proc
    dead.kill()
    await dead.wait()
    later = [ev("t", 3, node="b")]
    await store.save_events(later)
    assert await store.load_history("t") == [*first, *later]  # nothing lost
    assert writer.started == 2 and store.failures["write_failed"] == 0


@PROCESS_ONLY
async def test_a_writer_process_that_dies_mid_batch_loses_that_batch_only(
        make: MakeStore, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    store = await make(writer="process", flush_interval_s=3600.0)
    await store._writer_started()  # else the first batches are written on the loop
    first = [ev("t", 1), ev("t", 2, "node_success")]
    await store.save_events(first)
    await store.flush()
    writer = store._proc_writer
    assert writer is not None and writer.pid is not None and writer.started == 1
    with caplog.at_level(logging.ERROR, logger="penguiflow_exporters"):
        await kill_writer_mid_batch(store, [ev("t", 3)], monkeypatch)
    assert store.failures["write_failed"] == 1 and store.failures["events_lost"] == 1
    (error,) = _errors_logged(caplog)
    assert isinstance(error, StoreUnavailable) and "writer process exited" in str(error)
    assert store._where in str(error)  # names the server (never the password)
    later = [ev("t", 4, "node_success")]
    await store.save_events(later)
    assert await store.load_history("t") == [*first, *later]
    assert writer.started == 2


@PROCESS_ONLY
async def test_a_failure_inside_the_writer_is_reported_and_the_store_carries_on(
        make: MakeStore, sql: asyncpg.Connection, caplog: pytest.LogCaptureFixture) -> None:
    store = await make(writer="process", flush_interval_s=3600.0)
    await store._writer_started()  # else the first batches are written on the loop
    s = f'"{store.schema}"'
    await sql.execute(f"""
        CREATE FUNCTION {s}.refuse() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'refused by a trigger'; END $$;
        CREATE TRIGGER refuse BEFORE INSERT ON {s}.blocks
        FOR EACH ROW WHEN (NEW.trace_key IS NOT NULL AND NEW.first > 0)
        EXECUTE FUNCTION {s}.refuse()""")
    first = [ev("t", 1), ev("t", 2, "node_success")]
    await store.save_events(first)
    await store.flush()
    with caplog.at_level(logging.ERROR, logger="penguiflow_exporters"):
        await store.save_events([ev("t", 3), ev("u", 4)])  # t's block starts at 2: refused
        await store.flush()
    assert store.failures["write_failed"] == 1 and store.failures["events_lost"] == 2
    (error,) = _errors_logged(caplog)
    assert isinstance(error, StateStoreError) and not isinstance(error, StoreUnavailable)
    message = str(error)
    assert "refused by a trigger" in message and "RaiseError" in message
    assert store.schema in message and store._where in message
    # Rolled back whole: no summary for u, t untouched, its seqs not taken.
    assert await store.get_trace("u") is None
    assert await store.load_history("t") == first
    await sql.execute(f"DROP TRIGGER refuse ON {s}.blocks")
    again = [ev("t", 3), ev("u", 4)]
    await store.save_events(again)
    assert await store.load_history("t") == [*first, again[0]]
    assert await store.load_history("u") == [again[1]]
    assert store._proc_writer is not None and store._proc_writer.started == 1


@PROCESS_ONLY
async def test_a_writer_whose_connection_is_lost_reports_unavailable_then_reconnects(
        make: MakeStore, sql: asyncpg.Connection, caplog: pytest.LogCaptureFixture) -> None:
    store = await make(writer="process", flush_interval_s=3600.0)
    await store._writer_started()  # else the first batches are written on the loop
    await store.save_events([ev("t", 1)])
    await store.flush()
    killed = await sql.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE application_name = 'penguiflow-writer' AND datname = current_database()")
    assert killed >= 1
    with caplog.at_level(logging.ERROR, logger="penguiflow_exporters"):
        await store.save_events([ev("t", 2)])
        await store.flush()
    assert store.failures["write_failed"] == 1
    (error,) = _errors_logged(caplog)
    assert isinstance(error, StoreUnavailable), error
    assert f"cannot reach Postgres at {store._where}" in str(error)
    await store.save_events([ev("t", 3)])
    assert [e.seq for e in await store.load_history("t")] == [1, 3]
    assert store._proc_writer is not None and store._proc_writer.started == 1


@PROCESS_ONLY
async def test_close_stops_the_writer_process(make: MakeStore) -> None:
    store = await make(writer="process")
    await store._writer_started()  # else the first batches are written on the loop
    await store.save_events([ev("t", 1)])
    await store.flush()
    writer = store._proc_writer
    assert writer is not None
    pid = writer.pid
    assert pid is not None
    await store.close()
    assert writer.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped, not a zombie


# -- throughput (printed, not asserted) ----------------------------------------------------


async def test_ingest_rate_and_load_time(make: MakeStore,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    count = 100_000
    flow = uuid.uuid4().hex[:16]
    t0 = time.time()
    events = [
        StoredEvent(
            "big", t0 + i * 1e-5, "node_start" if i % 2 == 0 else "node_success",
            f"s{i % 5}", f"node-{i % 5}",
            {"ts": t0 + i * 1e-5, "event": "node_start" if i % 2 == 0 else "node_success",
             "node_name": f"s{i % 5}", "node_id": f"node-{i % 5}", "trace_id": "big",
             "latency_ms": 0.021, "q_depth_in": 3, "q_depth_out": 1, "q_depth_total": 4,
             "outgoing": 1, "queue_maxsize": 64, "attempt": 0, "trace_inflight": 1,
             "trace_cancelled": False, "trace_pending": 1},
            invocation_id=f"{i:016x}", span_id=f"{i:016x}", seq=i, queued_ts=t0,
            flow_name="bench", flow_id=flow)
        for i in range(count)
    ]
    store = await make()
    started = time.perf_counter()
    await store.save_events(events)
    await store.flush()
    ingest = count / (time.perf_counter() - started)
    started = time.perf_counter()
    history = await store.load_history("big")
    load_ms = (time.perf_counter() - started) * 1000
    assert len(history) == count and history[-1] == events[-1]
    assert store.failures == {}
    with capsys.disabled():
        print(f"\nPostgresStateStore: raw ingest {ingest:,.0f} events/s; "
              f"load_history of {count:,} events {load_ms:,.0f} ms")


# -- migration from schema version 1 -------------------------------------------------


def migration_sql(index: int, s: str) -> str:
    """The SQL of migration ``index`` (0: the v1 DDL) for the quoted schema ``s``."""
    from penguiflow_exporters.postgres import _MIGRATIONS

    step = _MIGRATIONS[index]
    assert isinstance(step, str), f"migration {index} is code, not SQL"
    return step.format(s=s)


async def _make_v1_schema(sql: asyncpg.Connection, schema: str,
                          events: list[StoredEvent]) -> None:
    """A schema as a version-1 store left it: the v1 DDL, full JSON payloads, summaries."""
    import json

    s = f'"{schema}"'
    await sql.execute(f"CREATE SCHEMA {s}; CREATE TABLE {s}.schema_version (version integer "
                      f"PRIMARY KEY, applied_ts double precision NOT NULL DEFAULT 0)")
    await sql.execute(migration_sql(0, s))
    await sql.execute(f"INSERT INTO {s}.schema_version (version) VALUES (1)")
    for e in events:
        await sql.execute(
            f"INSERT INTO {s}.events (event_key, trace_id, ts, kind, node_name, node_id, "
            f"attempt, invocation_id, parent_invocation_ids, span_id, parent_span_id, seq, "
            f"queued_ts, flow_name, flow_id, payload) VALUES "
            f"($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16)",
            e.event_key, e.trace_id, e.ts, e.kind, e.node_name, e.node_id, e.attempt,
            e.invocation_id, list(e.parent_invocation_ids), e.span_id, e.parent_span_id,
            e.seq, e.queued_ts, e.flow_name, e.flow_id, json.dumps(dict(e.payload)))
    assert all(e.trace_id == "t" for e in events)
    summary = fold("t", events)
    await sql.execute(
        f"INSERT INTO {s}.traces (trace_id, flow_name, started_ts, ended_ts, node_count, "
        f"error_count, remote_call_count, event_count, open_count, cancelled, failed, nodes) "
        f"VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,false,false,$10)",
        "t", summary.flow_name, summary.started_ts, summary.ended_ts, summary.node_count,
        summary.error_count, summary.remote_call_count, summary.event_count,
        summary.node_count - sum(e.kind == "node_success" for e in events),
        list(summary.nodes))


async def test_a_v1_schema_is_migrated_and_keeps_its_events_and_summaries(
        make: MakeStore, sql: asyncpg.Connection) -> None:
    schema = f"pf_test_{uuid.uuid4().hex[:8]}"
    old = [ev("t", 1), ev("t", 2, "node_success"), ev("t", 3, node="b")]
    try:
        await _make_v1_schema(sql, schema, old)
        store = await make(schema=schema)
        assert await store.load_history("t") == old
        assert await store.get_trace("t") == fold("t", old)
        more = [ev("t", 4, "node_success", node="b"), old[0]]  # old[0] is re-delivered
        await store.save_events(more)
        assert await store.load_history("t") == [*old, more[0]]
        assert await store.get_trace("t") == fold("t", [*old, more[0]])
        rows = await sql.fetch(f'SELECT version FROM "{schema}".schema_version ORDER BY 1')
        assert [r[0] for r in rows] == list(range(1, SCHEMA_VERSION + 1))
    finally:
        await sql.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def runtime_ev(trace: str | None, seq: int, kind: str = "node_start", *, ts: float,
               flow: str = "flow-2", **extra: Any) -> StoredEvent:
    """A StoredEvent whose payload is exactly a runtime payload (columns since v2)."""
    from penguiflow.metrics import event_payload

    payload = event_payload(kind, ts, "a", "a-id", trace, 0.25, 1, 2, 1, 64, 0, 1, False, 3,
                            extra)
    return StoredEvent(trace, ts, kind, "a", "a-id", payload, seq=seq, flow_id=flow,
                       flow_name="demo", parent_invocation_ids=("p",))


def _old_row(e: StoredEvent) -> tuple[Any, ...]:
    """The ``events`` values of a schema-2/3 row (trace id first, payload last): runtime
    payloads split into columns, others whole."""
    import json

    from store_support import runtime_columns

    columns = runtime_columns(e)
    runtime = (None,) * 8 if columns is None else columns[:8]
    payload = dict(e.payload) if columns is None else columns[8]
    return (e.trace_id, e.ts, e.kind, e.node_name, e.node_id, e.invocation_id,
            list(e.parent_invocation_ids), e.span_id, e.parent_span_id, e.seq, e.attempt,
            e.queued_ts, e.flow_name, e.flow_id, *runtime,
            json.dumps(payload) if payload else None)


async def _insert_old_summaries(sql: asyncpg.Connection, s: str,
                                events: list[StoredEvent]) -> None:
    """The ``traces`` rows of a schema-2/3 store (``s``: the quoted schema)."""
    for trace_id in dict.fromkeys(e.trace_id for e in events if e.trace_id is not None):
        of_trace = [e for e in events if e.trace_id == trace_id]
        summary = fold(trace_id, of_trace)
        opened = summary.node_count - sum(e.kind == "node_success" for e in of_trace)
        await sql.execute(
            f"INSERT INTO {s}.traces (trace_id, flow_name, started_ts, ended_ts, node_count, "
            f"error_count, remote_call_count, event_count, open_count, cancelled, failed, "
            f"nodes) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,false,false,$10)",
            trace_id, summary.flow_name, summary.started_ts, summary.ended_ts,
            summary.node_count, summary.error_count, summary.remote_call_count,
            summary.event_count, opened, list(summary.nodes))


async def _make_v2_schema(sql: asyncpg.Connection, schema: str,
                          events: list[StoredEvent]) -> None:
    """A schema as a version-2 store left it: text trace ids in ``events``, runtime
    payloads split into columns (others whole), summaries in arrival order."""
    s = f'"{schema}"'
    await sql.execute(f"CREATE SCHEMA {s}; CREATE TABLE {s}.schema_version (version integer "
                      f"PRIMARY KEY, applied_ts double precision NOT NULL DEFAULT 0)")
    await sql.execute(migration_sql(0, s))
    await sql.execute(migration_sql(1, s))
    await sql.execute(f"INSERT INTO {s}.schema_version (version) VALUES (1), (2)")
    for e in events:
        await sql.execute(
            f"INSERT INTO {s}.events (trace_id, ts, kind, node_name, node_id, invocation_id, "
            f"parent_invocation_ids, span_id, parent_span_id, seq, attempt, queued_ts, "
            f"flow_name, flow_id, latency_ms, q_in, q_out, outgoing, queue_maxsize, "
            f"trace_inflight, trace_cancelled, trace_pending, payload) VALUES ($1,$2,$3,$4,$5,"
            f"$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17,$18,$19,$20,$21,$22,$23)",
            *_old_row(e))
    await _insert_old_summaries(sql, s, events)


async def test_node_names_with_any_character_are_summarised(make: MakeStore) -> None:
    # Names travel to the summary upsert joined by a unit separator, or as JSON when
    # a name contains one.
    store = await make()
    odd = ["a,b", "c\x1fd", "é ✓", '"q"', "{}", ""]
    for i, name in enumerate(odd):
        await store.save_events([ev(f"t{i}", 10 * i + 1, node=name),
                                 ev("all", 10 * i + 2, node=name)])
        await store.flush()
    for i, name in enumerate(odd):
        summary = await store.get_trace(f"t{i}")
        assert summary is not None and summary.nodes == ((name,) if name else ())
    summary = await store.get_trace("all")
    assert summary is not None and summary.nodes == tuple(sorted(n for n in odd if n))


async def test_a_v2_schema_is_migrated_to_trace_keys_and_keeps_everything(
        make: MakeStore, sql: asyncpg.Connection) -> None:
    schema = f"pf_test_{uuid.uuid4().hex[:8]}"
    # Two traces starting at the same ts (the tie-break is the order they were first
    # stored), runtime-split and whole payloads, and an event without a trace.
    old = [runtime_ev("u", 1, ts=1.0), ev("t", 7, ts=1.0),
           runtime_ev("u", 2, "node_error", ts=1.5, exception="ValueError('x')"),
           ev("t", 8, "node_success", ts=2.0), runtime_ev(None, 3, "node_cancelled", ts=3.0)]
    reference = InMemoryStateStore()
    await reference.save_events(old)
    try:
        await _make_v2_schema(sql, schema, old)
        store = await make(schema=schema)
        for trace_id in ("t", "u"):
            assert await store.load_history(trace_id) == await reference.load_history(trace_id)
            assert await store.get_trace(trace_id) == await reference.get_trace(trace_id)
        assert await store.list_traces() == await reference.list_traces()
        more = [old[0], old[3], runtime_ev("u", 4, "node_success", ts=4.0),
                ev("t", 9, ts=5.0, node="b")]  # the first two are re-delivered
        await store.save_events(more)
        await reference.save_events(more[2:])
        for trace_id in ("t", "u"):
            assert await store.load_history(trace_id) == await reference.load_history(trace_id)
            assert await store.get_trace(trace_id) == await reference.get_trace(trace_id)
        assert await store.list_traces() == await reference.list_traces()
        rows = await sql.fetch(f'SELECT version FROM "{schema}".schema_version ORDER BY 1')
        assert [r[0] for r in rows] == list(range(1, SCHEMA_VERSION + 1))
        assert await sql.fetchval(f'SELECT sum(n) FROM "{schema}".blocks') == len(old) + 2
        assert await sql.fetchval("SELECT to_regclass($1)", f'"{schema}".events') is None
    finally:
        await sql.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


async def test_a_failing_migration_is_rolled_back_and_reported(
        make: MakeStore, sql: asyncpg.Connection) -> None:
    schema = f"pf_test_{uuid.uuid4().hex[:8]}"
    try:
        await _make_v1_schema(sql, schema, [ev("t", 1), ev("t", 1, node="b", flow="f:1")])
        # Someone else's column in the way of migration 2.
        await sql.execute(f'ALTER TABLE "{schema}".events ADD COLUMN q_in text')
        with pytest.raises(StateStoreError, match='column "q_in"'):
            await make(schema=schema)
        rows = await sql.fetch(f'SELECT version FROM "{schema}".schema_version')
        assert [r[0] for r in rows] == [1]
        assert await sql.fetchval(
            "SELECT count(*) FROM information_schema.columns WHERE table_schema = $1 "
            "AND column_name = 'latency_ms'", schema) == 0
    finally:
        await sql.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


async def _make_v3_schema(sql: asyncpg.Connection, schema: str,
                          events: list[StoredEvent]) -> None:
    """A schema as a version-3 store left it: one ``events`` row per event keyed by its
    trace's ``first_seen``, runtime payloads split into columns (others whole)."""
    s = f'"{schema}"'
    await sql.execute(f"CREATE SCHEMA {s}; CREATE TABLE {s}.schema_version (version integer "
                      f"PRIMARY KEY, applied_ts double precision NOT NULL DEFAULT 0)")
    for version in range(3):
        await sql.execute(migration_sql(version, s))
    await sql.execute(f"INSERT INTO {s}.schema_version (version) VALUES (1), (2), (3)")
    await _insert_old_summaries(sql, s, events)
    for e in events:
        await sql.execute(
            f"INSERT INTO {s}.events (trace_key, ts, kind, node_name, node_id, invocation_id, "
            f"parent_invocation_ids, span_id, parent_span_id, seq, attempt, queued_ts, "
            f"flow_name, flow_id, latency_ms, q_in, q_out, outgoing, queue_maxsize, "
            f"trace_inflight, trace_cancelled, trace_pending, payload) VALUES ("
            f"(SELECT first_seen FROM {s}.traces WHERE trace_id = $1),$2,$3,$4,$5,$6,$7,$8,"
            f"$9,$10,$11,$12,$13,$14,$15,$16,$17,$18,$19,$20,$21,$22,$23)",
            *_old_row(e))


def cancelled_runtime_ev(trace: str, seq: int, *, ts: float) -> StoredEvent:
    """A runtime-shaped StoredEvent with trace_cancelled set and no trace_pending."""
    from penguiflow.metrics import event_payload

    payload = event_payload("node_success", ts, "a", "a-id", trace, None, 0, 0, 1, 64, 0, 0,
                            True, None, {})
    return StoredEvent(trace, ts, "node_success", "a", "a-id", payload, seq=seq,
                       flow_id="flow-2", flow_name="demo")


async def test_a_v3_schema_is_migrated_to_blocks_and_keeps_everything(
        make: MakeStore, sql: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    from penguiflow_exporters import postgres

    # Small blocks and fetches, so the conversion splits a trace and its reads.
    monkeypatch.setattr(postgres, "BLOCK_EVENTS", 10)
    monkeypatch.setattr(postgres, "_MIGRATION_FETCH", 7)
    schema = f"pf_test_{uuid.uuid4().hex[:8]}"
    # "t": 25 events, runtime-split (with and without extras) and whole payloads,
    # from two flows, flow-1's seqs with a gap; "u" interleaved; two trace-less.
    old: list[StoredEvent] = []
    for i in range(25):
        if i % 3 == 0:
            old.append(runtime_ev("t", 100 + i, "node_error" if i % 2 else "node_start",
                                  ts=10.0 + i, **({"exception": f"E{i}"} if i % 2 else {})))
        elif i == 7:
            old.append(cancelled_runtime_ev("t", 100 + i, ts=10.0 + i))
        else:
            old.append(ev("t", i if i < 12 else i + 5, "node_success" if i % 2 else "node_start",
                          f"n{i % 4}", ts=10.0 + i))
        if i in (4, 11, 20):
            old.append(ev("u", 50 + i, ts=9.0 + i, node="b"))
        if i in (2, 17):
            old.append(runtime_ev(None, 200 + i, "node_cancelled", ts=30.0 + i))
    reference = InMemoryStateStore()
    await reference.save_events(old)
    try:
        await _make_v3_schema(sql, schema, old)
        store = await make(schema=schema)
        rows = await sql.fetch(f'SELECT version FROM "{schema}".schema_version ORDER BY 1')
        assert [r[0] for r in rows] == list(range(1, SCHEMA_VERSION + 1))
        assert await sql.fetchval("SELECT to_regclass($1)", f'"{schema}".events') is None
        for trace_id in ("t", "u"):
            assert await store.load_history(trace_id) == await reference.load_history(trace_id)
            assert await store.get_trace(trace_id) == await reference.get_trace(trace_id)
        assert await store.list_traces() == await reference.list_traces()
        assert await blocks_of(sql, store, "t") == [(0, 10), (10, 10), (20, 5)]
        assert await blocks_of(sql, store, "u") == [(0, 3)]
        assert await blocks_of(sql, store, None) == [(0, 2)]
        # Rows with runtime columns became runtime tuples, the others whole payloads.
        layouts = {len(item) for row in await sql.fetch(f'SELECT data FROM "{schema}".blocks')
                   for item in decode_block(row[0])}
        assert layouts == {15, 23}
        for flow_id in ("flow-1", "flow-2"):
            seqs = sorted(e.seq for e in old if e.flow_id == flow_id)
            islands = [(lo, hi) for lo, hi in zip(
                [s for s in seqs if s - 1 not in seqs], [s for s in seqs if s + 1 not in seqs],
                strict=True)]
            assert len(islands) > 1  # gaps
            assert await ranges_of(sql, store, flow_id) == islands
        history = await store.load_history("t")
        assert await store.load_history_page("t", offset=8, limit=5) == history[8:13]
        # Later writes: old events re-delivered are dropped, new ones go after them.
        more = [old[0], old[5], runtime_ev("t", 300, "node_success", ts=50.0),
                ev("u", 301, ts=51.0, node="b")]
        await store.save_events(more)
        await reference.save_events(more[2:])
        for trace_id in ("t", "u"):
            assert await store.load_history(trace_id) == await reference.load_history(trace_id)
            assert await store.get_trace(trace_id) == await reference.get_trace(trace_id)
        assert (await blocks_of(sql, store, "t"))[-1] == (25, 1)
    finally:
        await sql.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


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
        first = [ev("t", 1, "node_start"), ev("t", 2, "node_success")]
        await store.save_events(first)
        await store.flush()
        later = [ev("t", 3, "node_start", "b")]
        await store.save_events(later)
        assert await store.load_history("t") == [*first, *later]  # nothing lost
    assert store._proc_writer is None  # writing on the loop from now on
    assert store.failures["write_failed"] == 0
    warnings = [r for r in caplog.records
                if r.getMessage() == "state_store_writer_process_unavailable"]
    assert len(warnings) == 1 and "not allowed" in str(warnings[0].__dict__["error"])
