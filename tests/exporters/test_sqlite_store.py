"""SQLiteStateStore on real files: schema, idempotency, queries, threading, errors."""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
from store_support import fields

from penguiflow import Headers, Message, Node, NodePolicy, create
from penguiflow.state import (
    InMemoryStateStore,
    RemoteBinding,
    StateStoreError,
    StoredEvent,
    StoreUnavailable,
    TraceFilter,
)
from penguiflow_exporters import open_store
from penguiflow_exporters.sqlite import SCHEMA_VERSION, SQLiteStateStore

_seq = itertools.count()


def ev(trace_id: str | None, kind: str, ts: float, *, node: str = "a", attempt: int = 0,
       flow_id: str | None = "flow-1", seq: int | None = None, **extra: Any) -> StoredEvent:
    """A StoredEvent shaped like the runtime's (unique ``seq`` unless given)."""
    payload = {"ts": ts, "event": kind, "node_name": node, "node_id": f"id-{node}",
               "trace_id": trace_id, "latency_ms": 1.5, "attempt": attempt, **extra}
    return StoredEvent(trace_id, ts, kind, node, f"id-{node}", payload,
                       invocation_id=f"inv-{trace_id}-{node}", parent_invocation_ids=("p1", "p2"),
                       span_id=f"inv-{trace_id}-{node}", parent_span_id="root", attempt=attempt,
                       seq=next(_seq) if seq is None else seq, queued_ts=ts - 0.5,
                       flow_name="demo", flow_id=flow_id)


def invocation(trace_id: str, node: str, start: float, end: float,
               terminal: str = "node_success") -> list[StoredEvent]:
    return [ev(trace_id, "node_start", start, node=node), ev(trace_id, terminal, end, node=node)]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStateStore]:
    async with SQLiteStateStore(tmp_path / "traces.db") as opened:
        yield opened


def read(path: Path, sql: str) -> list[Any]:
    """Query the file through a separate connection (as another process would)."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


# -- schema and file -----------------------------------------------------------------


async def test_creates_the_parent_directory_and_records_the_schema_version(
        tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "traces.db"
    async with SQLiteStateStore(path):
        pass
    # A new file is created at the current version directly: one row.
    assert [v for (v,) in read(path, "SELECT version FROM schema_version")] == [SCHEMA_VERSION]
    tables = {name for (name,) in read(path, "SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"blocks", "flow_seqs", "traces", "flows", "bindings", "schema_version"} <= tables
    assert "events" not in tables  # events live in blocks
    async with SQLiteStateStore(path):  # reopening migrates nothing
        pass
    assert [v for (v,) in read(path, "SELECT version FROM schema_version")] == [SCHEMA_VERSION]


async def test_a_newer_schema_version_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "traces.db"
    async with SQLiteStateStore(path):
        pass
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION + 1,))
    conn.close()
    store = SQLiteStateStore(path)
    newer = rf"schema version {SCHEMA_VERSION + 1}, newer .* upgrade"
    with pytest.raises(StateStoreError, match=newer) as info:
        await store.open()
    assert not isinstance(info.value, StoreUnavailable)
    await store.close()
    assert max(v for (v,) in read(path, "SELECT version FROM schema_version")) == (
        SCHEMA_VERSION + 1)


async def _double(msg: Message, ctx: Any) -> Message:
    return msg.model_copy(update={"payload": msg.payload * 2})


async def test_wal_mode_and_synchronous_normal(store: SQLiteStateStore) -> None:
    assert read(store.path, "PRAGMA journal_mode") == [("wal",)]
    conn = store._conn
    assert conn is not None
    synchronous = await store._call(lambda: conn.execute("PRAGMA synchronous").fetchone())
    assert synchronous == (1,)  # NORMAL


async def test_open_store_url_builds_a_sqlite_store(tmp_path: Path) -> None:
    async with open_store(f"sqlite:///{tmp_path}/by-url.db") as opened:
        assert isinstance(opened, SQLiteStateStore)
        assert opened.path == tmp_path / "by-url.db"


# -- writes ------------------------------------------------------------------------------


async def test_every_field_is_restored_in_order_of_occurrence(store: SQLiteStateStore) -> None:
    events = [
        ev("t", "node_start", 5.0, seq=10),
        ev("t", "node_error", 3.0, seq=11, exception="ValueError('x')"),  # ts out of order
        ev("t", "node_retry", 3.0, seq=12, sleep_s=0.25, nested={"a": [1, 2.5, None]}),
        ev("t", "node_success", 3.0, seq=13, flag=True, text="é ✓ \"quoted\""),
    ]
    no_parents = StoredEvent("t", 6.0, "remote_call_start", None, None,
                             MappingProxyType({"remote_skill": "s"}), seq=14)
    await store.save_events([*events[:2]])
    await store.flush()
    await store.save_events([*events[2:], no_parents])
    history = await store.load_history("t")
    assert history == [*events, StoredEvent("t", 6.0, "remote_call_start", None, None,
                                            {"remote_skill": "s"}, seq=14)]
    assert all(type(e.payload) is dict for e in history)
    assert history[0].parent_invocation_ids == ("p1", "p2")
    assert history[-1].parent_invocation_ids == () and history[-1].event_key is None
    assert await store.load_history("unknown") == []


async def test_a_redelivered_event_is_stored_once_and_counted_once(
        store: SQLiteStateStore) -> None:
    events = [*invocation("t", "a", 1.0, 2.0), ev("t", "node_error", 1.5)]
    await store.save_events(events)
    await store.flush()
    before = await store.get_trace("t")
    await store.save_events(events)  # a whole batch of duplicates
    late = ev("t", "node_start", 3.0, node="b")
    await store.save_events([events[0], late, events[0]])
    assert await store.load_history("t") == [*events, late]
    after = await store.get_trace("t")
    assert before is not None and after is not None
    assert (before.event_count, before.node_count, before.error_count) == (3, 1, 1)
    assert (after.event_count, after.node_count, after.error_count) == (4, 2, 1)
    assert after.status == "running"  # b has no terminal event
    assert read(store.path, "SELECT sum(n) FROM blocks") == [(4,)]
    ((lo, hi),) = read(store.path, "SELECT lo, hi FROM flow_seqs")  # still one range
    assert hi - lo == 3


async def test_a_trace_deleted_behind_the_stores_back_is_stored_anew(
        tmp_path: Path) -> None:
    """Retention (see the guide) may delete a trace whose key the store cached, and
    its key may be reused by a new trace: a late event must not land in it."""
    path = tmp_path / "traces.db"
    async with SQLiteStateStore(path) as store, SQLiteStateStore(path) as other:
        await store.save_events([ev("a", "node_start", 1.0), ev("b", "node_start", 2.0)])
        await store.flush()  # keys of a and b cached
        conn = sqlite3.connect(path)
        with conn:
            conn.execute("DELETE FROM blocks WHERE trace_key IN "
                         "(SELECT key FROM traces WHERE trace_id = 'b')")
            conn.execute("DELETE FROM traces WHERE trace_id = 'b'")
        conn.close()
        new = ev("c", "node_start", 3.0)
        await other.save_events([new])
        await other.flush()  # c takes b's key (the largest, freed)
        late = ev("b", "node_success", 4.0)
        await store.save_events([late])
        assert await store.load_history("b") == [late]
        assert await store.load_history("c") == [new]
        c, b = await store.get_trace("c"), await store.get_trace("b")
        assert c is not None and b is not None
        assert (c.event_count, c.status, b.event_count) == (1, "running", 1)


async def test_the_writer_skips_what_is_stored_and_repeated(store: SQLiteStateStore) -> None:
    first = ev("t", "node_start", 1.0)
    keyless = ev("t", "node_success", 2.0, flow_id=None)
    writer = store._make_writer()
    try:
        assert (await writer.write([first, keyless])).skipped == []
        second = ev("t", "node_start", 3.0, node="b")
        # Stored key, new key, in-batch duplicate, and a keyless event (always stored).
        result = await writer.write([first, second, second, keyless])
        assert list(result.skipped) == [0, 2] and not result.rejected
    finally:
        await writer.close()
    assert [e.kind for e in await store.load_history("t")] == [
        "node_start", "node_success", "node_start", "node_success"]


@pytest.mark.parametrize("writer", ["process", "thread"])
async def test_followers_get_the_new_events_of_a_batch_mixing_traces(
        tmp_path: Path, writer: str) -> None:
    async with SQLiteStateStore(tmp_path / "t.db", writer=writer) as store:  # type: ignore[arg-type]
        a1 = ev("t1", "node_start", 1.0)
        await store.save_event(a1)
        await store.flush()
        got: list[StoredEvent] = []
        follow = store.follow()

        async def collect() -> None:
            async for e in follow:
                got.append(e)

        task = asyncio.ensure_future(collect())
        await asyncio.sleep(0)  # subscribed (the in-process followers need no I/O)
        b2, c = ev("t2", "node_start", 2.0), ev("t2", "node_success", 3.0)
        await store.save_events([b2, a1, c])  # a1 again: a re-delivery
        await store.flush()
        await store.close()
        await asyncio.wait_for(task, 10)
        # Blocks group the batch by trace, while followers get batch order, minus
        # the re-delivery.
        assert got == [b2, c]


async def test_events_without_a_trace_are_stored_but_make_no_trace(
        store: SQLiteStateStore) -> None:
    await store.save_event(ev(None, "node_cancelled", 1.0))
    await store.flush()
    assert read(store.path, "SELECT sum(n), min(trace_key) FROM blocks") == [(1, None)]
    assert await store.list_traces() == []


async def test_odd_payload_values_keep_the_batch(store: SQLiteStateStore) -> None:
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    odd = ev("t", "node_error", 1.0, cycle=cyclic, when=Path("/x"), nan=float("nan"))
    fine = ev("t", "node_start", 0.5)
    await store.save_events([fine, odd])
    history = await store.load_history("t")
    assert [e.kind for e in history] == ["node_start", "node_error"]
    assert history[0] == fine
    # JSON holds no cycle: that one value becomes its text, the rest stays as it was
    assert history[1].payload["cycle"] == "[[...]]"
    assert history[1].payload["when"] == "/x"  # str() of an unknown type
    assert math.isnan(history[1].payload["nan"])
    assert store.failures["write_failed"] == 0


async def test_two_stores_on_one_file_fold_into_one_summary(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    async with SQLiteStateStore(path) as one, SQLiteStateStore(path) as two:
        await one.save_events(invocation("t", "a", 1.0, 2.0))
        await one.flush()
        await two.save_events(invocation("t", "b", 3.0, 4.0))
        await two.flush()
        summary = await one.get_trace("t")
        assert summary is not None
        assert (summary.event_count, summary.nodes, summary.ended_ts) == (4, ("a", "b"), 4.0)
        assert len(await two.load_history("t")) == 4


def _open_when_all_are_ready(path: str, barrier: Any, errors: Any) -> None:
    async def open_it() -> None:
        barrier.wait()  # every process opens the new file at the same moment
        async with SQLiteStateStore(path, writer="thread") as store:
            await store.list_traces()
    try:
        asyncio.run(open_it())
    except Exception as exc:
        errors.put(repr(exc))


def test_processes_opening_one_new_file_together_all_get_it(tmp_path: Path) -> None:
    # Switching a new file to WAL while another process does fails at once with
    # SQLITE_BUSY (no busy handler): two pf workers starting on one new store file
    # lost one of them about one time in ten.
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    errors = ctx.Queue()
    for trial in range(10):
        barrier = ctx.Barrier(4)
        procs = [ctx.Process(target=_open_when_all_are_ready,
                             args=(str(tmp_path / f"new-{trial}.db"), barrier, errors))
                 for _ in range(4)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(60)
    found = []
    while not errors.empty():
        found.append(errors.get())
    assert found == []


# -- a real flow ------------------------------------------------------------------------


async def test_a_real_flow_is_persisted_and_flushed_by_stop(tmp_path: Path) -> None:
    async def double(message: Message, ctx: Any) -> Message:
        return message.model_copy(update={"payload": message.payload * 2})

    a = Node(double, name="a", policy=NodePolicy(validate="none"))
    b = Node(double, name="b", policy=NodePolicy(validate="none"))
    # A long interval: only stop()'s flush writes the events.
    store = SQLiteStateStore(tmp_path / "flow.db", flush_interval_s=60.0)
    flow = create(a.to(b), b.to(), state_store=store, name="doubler")
    flow.run()
    message = Message(payload=3, headers=Headers(tenant="acme"))
    await flow.emit(message)
    result = await asyncio.wait_for(flow.fetch(), 5.0)
    assert result.payload == 12
    await flow.stop()
    try:
        history = await store.load_history(message.trace_id)
        assert [(e.kind, e.node_name) for e in history] == [
            ("node_start", "a"), ("node_success", "a"), ("node_start", "b"),
            ("node_success", "b")]
        assert history[2].parent_invocation_ids == (history[0].invocation_id,)
        assert [e.seq for e in history] == sorted(e.seq for e in history)
        assert {e.flow_id for e in history} == {flow.flow_id}
        assert history[0].payload["event"] == "node_start"
        summary = await store.get_trace(message.trace_id)
        assert summary is not None
        assert (summary.flow_name, summary.status, summary.node_count, summary.nodes,
                summary.event_count) == ("doubler", "succeeded", 2, ("a", "b"), 4)
        assert summary.started_ts == history[0].ts and summary.ended_ts == history[-1].ts
    finally:
        await store.close()


# -- queries ---------------------------------------------------------------------------


def fleet() -> list[StoredEvent]:
    """Traces of every status; ``tie1``/``tie2`` start together, ``slow`` lasts longest."""
    return [
        *invocation("ok", "a", 10.0, 12.0),
        *invocation("failed", "b", 20.0, 21.0, terminal="node_failed"),
        ev("failed", "node_error", 20.5, node="b"),
        ev("cancel", "node_start", 30.0, node="a"),
        ev("cancel", "trace_cancel_start", 31.0, node="OpenSea"),
        ev("cancel", "node_trace_cancelled", 35.0, node="a"),
        ev("running", "node_start", 40.0, node="c"),
        ev("running", "remote_call_start", 41.0, node="c"),
        ev("running", "remote_call_error", 42.0, node="c"),
        *invocation("slow", "a", 5.0, 105.0),
        *invocation("tie1", "d", 50.0, 51.0),
        *invocation("tie2", "d", 50.0, 51.0),
        *invocation("a_b%c", "a", 1.0, 2.0),
    ]


FILTERS = [
    TraceFilter(),
    TraceFilter(status="succeeded"),
    TraceFilter(status="failed"),
    TraceFilter(status="cancelled"),
    TraceFilter(status="running"),
    TraceFilter(node="a"),
    TraceFilter(node="d", order="slowest"),
    TraceFilter(node="missing"),
    TraceFilter(has_errors=True),
    TraceFilter(has_errors=False),
    TraceFilter(since=20.0),
    TraceFilter(until=30.0),
    TraceFilter(since=10.0, until=40.0),
    TraceFilter(order="slowest"),
    TraceFilter(order="slowest", limit=3),
    TraceFilter(limit=2),
    TraceFilter(status="succeeded", node="a", has_errors=False, since=1.0, order="slowest"),
]


@pytest.mark.parametrize("trace_filter", FILTERS, ids=repr)
async def test_list_traces_matches_the_reference_semantics(
        store: SQLiteStateStore, trace_filter: TraceFilter) -> None:
    reference = InMemoryStateStore()
    events = fleet()
    await reference.save_events(events)
    # Several batches, so summaries are folded incrementally.
    for start in range(0, len(events), 4):
        await store.save_events(events[start:start + 4])
        await store.flush()
    assert await store.list_traces(trace_filter) == await reference.list_traces(trace_filter)


async def test_list_traces_statuses_and_orders(store: SQLiteStateStore) -> None:
    await store.save_events(fleet())

    async def ids(**kwargs: Any) -> list[str]:
        return [s.trace_id for s in await store.list_traces(TraceFilter(**kwargs))]

    assert await ids() == ["tie1", "tie2", "running", "cancel", "failed", "ok", "slow", "a_b%c"]
    assert await ids(status="failed") == ["failed"]
    assert await ids(status="cancelled") == ["cancel"]
    assert await ids(status="running") == ["running"]
    assert await ids(has_errors=True) == ["running", "failed"]
    assert await ids(node="c") == ["running"]
    assert await ids(since=10.0, until=30.0) == ["failed", "ok"]
    assert await ids(order="slowest", limit=2) == ["slow", "cancel"]
    running = await store.get_trace("running")
    assert running is not None
    assert (running.remote_call_count, running.error_count) == (1, 1)


async def test_get_trace_reads_its_own_writes(store: SQLiteStateStore) -> None:
    assert await store.get_trace("ok") is None
    await store.save_events(invocation("ok", "a", 10.0, 12.0))  # still buffered
    summary = await store.get_trace("ok")
    assert summary is not None and summary.duration_ms == 2000.0


async def test_resolve_trace_id(store: SQLiteStateStore) -> None:
    ids = [f"ab{i:02d}" for i in range(12)] + ["a_b%c", "aXc", "AB00", "b1"]
    await store.save_events([ev(t, "node_start", 1.0) for t in ids])
    assert await store.resolve_trace_id("ab") == [f"ab{i:02d}" for i in range(10)]
    assert await store.resolve_trace_id("ab1") == ["ab10", "ab11"]
    assert await store.resolve_trace_id("a_") == ["a_b%c"]  # wildcards are literal
    assert await store.resolve_trace_id("a_b%") == ["a_b%c"]
    assert await store.resolve_trace_id("%") == []
    assert await store.resolve_trace_id("AB") == ["AB00"]  # case-sensitive
    assert await store.resolve_trace_id("zz") == []
    assert len(await store.resolve_trace_id("")) == 10


async def test_bindings(store: SQLiteStateStore) -> None:
    one = RemoteBinding("t1", "ctx1", "task1", "http://agent")
    two = RemoteBinding("t1", "ctx2", "task2", None)
    three = RemoteBinding("t2", "ctx1", None, "http://agent")
    for binding in (one, two, three, one, three, RemoteBinding("t2", "ctx1", None, None)):
        await store.save_remote_binding(binding)
    assert read(store.path, "SELECT count(*) FROM bindings") == [(4,)]
    assert await store.load_bindings(trace_id="t1") == [one, two]
    assert await store.load_bindings(context_id="ctx1") == [
        one, three, RemoteBinding("t2", "ctx1", None, None)]
    assert await store.load_bindings(task_id="task2") == [two]
    assert await store.load_bindings(trace_id="t2", context_id="ctx1", task_id="task1") == []
    assert await store.load_bindings(trace_id="t1", task_id="task1") == [one]
    with pytest.raises(ValueError, match="needs trace_id"):
        await store.load_bindings()


async def test_follow_yields_newly_stored_events_once(store: SQLiteStateStore) -> None:
    seen: list[StoredEvent] = []
    everything: list[StoredEvent] = []

    async def collect(into: list[StoredEvent], count: int, trace_id: str | None) -> None:
        async for event in store.follow(trace_id):
            into.append(event)
            if len(into) == count:
                return

    tasks = [asyncio.create_task(collect(seen, 3, "t")),
             asyncio.create_task(collect(everything, 4, None))]
    await asyncio.sleep(0)  # let the followers subscribe
    first = invocation("t", "a", 1.0, 2.0)
    await store.save_events([*first, ev("other", "node_start", 1.0)])
    await store.flush()
    await store.save_events(first)  # re-delivered: not stored, not yielded
    last = ev("t", "node_start", 3.0, node="b")
    await store.save_event(last)
    await store.flush()
    await asyncio.wait_for(asyncio.gather(*tasks), 5.0)
    assert seen == [*first, last]
    assert [e.trace_id for e in everything] == ["t", "t", "other", "t"]


# -- threading -------------------------------------------------------------------------


def many(count: int, trace_id: str = "big") -> list[StoredEvent]:
    events = []
    for i in range(count):
        kind = "node_start" if i % 2 == 0 else "node_success"
        events.append(ev(trace_id, kind, 1000.0 + i * 1e-3, node=f"n{i % 7}", seq=i,
                         flow_id=f"flow-{trace_id}", q_depth_in=i % 3, trace_inflight=1))
    return events


async def test_a_large_flush_does_not_block_the_event_loop(tmp_path: Path) -> None:
    events = many(50_000)
    # One 50k batch, written by the flush below (the background writer sleeps).
    async with SQLiteStateStore(tmp_path / "t.db", batch_size=100_000, max_buffer=100_000,
                                flush_interval_s=60.0) as store:
        await store.save_events(events)
        ticks: list[float] = []

        async def ticker() -> None:
            while True:
                await asyncio.sleep(0.001)
                ticks.append(time.perf_counter())

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0.01)
        start = time.perf_counter()
        await store.flush()
        end = time.perf_counter()
        task.cancel()
        during = [start, *(t for t in ticks if start < t < end), end]
        longest_gap = max(b - a for a, b in itertools.pairwise(during))
        assert read(store.path, "SELECT sum(n) FROM blocks") == [(50_000,)]
    # A blocking write would leave one gap as long as the whole flush.
    print(f"\n50k-event flush: {end - start:.3f} s, {len(during) - 2} ticks, "
          f"longest gap {longest_gap * 1000:.1f} ms")
    assert len(during) - 2 >= 10, (len(during), end - start)
    assert longest_gap < (end - start) / 2, (longest_gap, end - start)


async def test_a_big_trace_is_read_back_whole_and_by_pages(tmp_path: Path) -> None:
    # The ingest rate and load time of a 100k-event trace are benchmarks/stores.py's rows.
    events = many(30_000)
    async with SQLiteStateStore(tmp_path / "big.db") as store:
        await store.save_events(events)
        assert await store.load_history("big") == events
        assert await store.load_history_page("big", offset=29_990, limit=100) == events[-10:]
        assert store.failures == {}


# -- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("make_bad", ["parent_is_a_file", "path_is_a_directory"])
async def test_an_unwritable_path_is_unavailable(tmp_path: Path, make_bad: str) -> None:
    if make_bad == "parent_is_a_file":
        (tmp_path / "file").write_text("x")
        path = tmp_path / "file" / "traces.db"
    else:
        path = tmp_path / "dir.db"
        path.mkdir()
    store = SQLiteStateStore(path, retries=1)
    with pytest.raises(StoreUnavailable, match="writable path") as info:
        await store.open()
    assert str(path) in str(info.value)
    assert info.value.__cause__ is not None
    # The write path never raises into the flow: the batch is retried, logged, counted.
    await store.save_event(ev("t", "node_start", 1.0))
    await store.flush()
    assert store.failures["retried"] >= 1 and store.failures["events_lost"] == 1
    await store.close()


async def test_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"not a database" * 512)
    store = SQLiteStateStore(path)
    with pytest.raises(StateStoreError, match="not a penguiflow trace database"):
        await store.open()
    await store.close()


def closed_calls(store: SQLiteStateStore) -> Iterable[Any]:
    yield store.save_event(ev("t", "node_start", 1.0))
    yield store.flush()
    yield store.load_history("t")
    yield store.list_traces()
    yield store.get_trace("t")
    yield store.resolve_trace_id("t")
    yield store.load_bindings(trace_id="t")
    yield store.save_remote_binding(RemoteBinding("t", "c", "k", None))
    yield store.open()


async def test_a_closed_store_is_unavailable(tmp_path: Path) -> None:
    store = SQLiteStateStore(tmp_path / "t.db")
    await store.save_event(ev("t", "node_start", 1.0))
    await store.close()
    await store.close()  # idempotent
    for call in closed_calls(store):
        with pytest.raises(StoreUnavailable, match="closed"):
            await call
    # close() flushed what was buffered.
    async with SQLiteStateStore(tmp_path / "t.db") as reopened:
        assert len(await reopened.load_history("t")) == 1


async def test_pages_across_blocks_are_slices_of_the_history(tmp_path: Path) -> None:
    # Batches of 1,500 and blocks of at most 2,000 events: blocks of several sizes.
    async with SQLiteStateStore(tmp_path / "t.db", batch_size=1500) as store:
        events = many(5_000)
        for start in range(0, len(events), 700):
            await store.save_events(events[start:start + 700])
        await store.flush()
        sizes = [n for (n,) in read(store.path, "SELECT n FROM blocks ORDER BY first")]
        assert sum(sizes) == 5_000 and len(set(sizes)) > 1
        history = await store.load_history("big")
        assert history == events
        for offset, limit in [(0, 1), (0, 2000), (1499, 2), (1500, 1500), (2999, 4000),
                              (4999, 10), (5000, 1), (123, 4567)]:
            page = await store.load_history_page("big", offset=offset, limit=limit)
            assert page == history[offset:offset + limit], (offset, limit)
        assert await store.load_history_page("nope", offset=0, limit=5) == []


async def test_a_corrupt_block_is_reported_with_its_trace(tmp_path: Path) -> None:
    async with SQLiteStateStore(tmp_path / "t.db") as store:
        await store.save_events(invocation("t", "a", 1.0, 2.0))
        await store.flush()
        conn = sqlite3.connect(store.path)
        with conn:
            conn.execute("UPDATE blocks SET data = x'00ff'")
        conn.close()
        with pytest.raises(StateStoreError, match=r"trace 't': corrupt event block"):
            await store.load_history("t")
        with pytest.raises(StateStoreError, match="corrupt event block"):
            await store.load_history_page("t", offset=0, limit=1)


# -- the writer process ------------------------------------------------------------------


def test_an_unknown_writer_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="writer must be 'process' or 'thread'; got 'fork'"):
        SQLiteStateStore(tmp_path / "t.db", writer="fork")  # type: ignore[arg-type]


def test_the_writer_module_starts_without_importing_penguiflow_or_asyncio() -> None:
    # The writer process runs this module: importing the core would cost ~0.8 s a
    # start, and asyncio ~40% of the child's start-up (the first batch waits for it).
    code = ("import sys, penguiflow_exporters._sqlite_write; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('penguiflow', 'asyncio')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "[]"


async def save_records(store: SQLiteStateStore, trace: str, seqs: range) -> None:
    """The runtime's records (what goes to the writer process; StoredEvents alone are
    written on the store's thread)."""
    for seq in seqs:
        waiter = store.save_event_fields(fields(trace, seq))
        if waiter is not None:
            await waiter


def _process(store: SQLiteStateStore) -> Any:
    """The store's writer process (AsyncWriterProcess), once a batch started it."""
    lazy = store._processor.writer  # type: ignore[union-attr]
    return lazy._writer._writer.process


async def test_a_writer_process_that_died_between_batches_is_replaced(
        tmp_path: Path) -> None:
    async with SQLiteStateStore(tmp_path / "t.db", flush_interval_s=3600.0) as store:
        await save_records(store, "t", range(1, 3))
        await store.flush()
        writer = _process(store)
        assert writer._proc is not None and writer.started == 1
        dead = writer._proc
        dead.kill()
        await dead.wait()
        await save_records(store, "t", range(3, 5))
        assert [e.seq for e in await store.load_history("t")] == [1, 2, 3, 4]  # nothing lost
        assert writer.started == 2 and store.failures["events_lost"] == 0


async def test_a_failure_inside_the_writer_loses_only_the_refused_events(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "t.db"
    async with SQLiteStateStore(path, flush_interval_s=3600.0) as store:
        conn = sqlite3.connect(path)
        with conn:
            conn.execute("CREATE TRIGGER refuse BEFORE INSERT ON traces "
                         "WHEN NEW.trace_id = 'u' "
                         "BEGIN SELECT RAISE(ABORT, 'refused by a trigger'); END")
        conn.close()
        await save_records(store, "t", range(1, 3))
        await store.flush()
        with caplog.at_level(logging.ERROR, logger="penguiflow_exporters"):
            await save_records(store, "u", range(3, 4))
            await save_records(store, "v", range(4, 5))
            await store.flush()
        # The batch was split: v's event is stored, u's (refused) is lost and counted.
        assert store.failures["events_lost"] == 1 and store.failures["write_failed"] >= 1
        errors = [str(r.__dict__.get("error")) for r in caplog.records]
        assert any("refused by a trigger" in e and str(path) in e for e in errors), errors
        assert await store.get_trace("u") is None
        assert [e.kind for e in await store.load_history("v")] == ["node_start"]
        assert [e.seq for e in await store.load_history("t")] == [1, 2]
        assert _process(store).started == 1


async def test_close_stops_the_writer_process(tmp_path: Path) -> None:
    store = SQLiteStateStore(tmp_path / "t.db")
    await save_records(store, "t", range(1, 3))
    await store.flush()
    writer = _process(store)
    pid = writer.pid
    assert pid is not None
    await store.close()
    assert writer.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped, not a zombie


async def test_a_store_only_read_starts_no_writer(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    async with SQLiteStateStore(path) as writer_store:
        await writer_store.save_events(invocation("t", "a", 1.0, 2.0))
    async with SQLiteStateStore(path) as reader:
        assert [e.kind for e in await reader.load_history("t")] == ["node_start",
                                                                    "node_success"]
        assert await reader.list_traces() != []
        assert reader._processor.writer._writer is None  # type: ignore[union-attr]


async def test_a_writer_that_refuses_its_options_is_not_kept(tmp_path: Path) -> None:
    from penguiflow_exporters._writer_proc import AsyncWriterProcess, WriterError

    writer = AsyncWriterProcess("penguiflow_exporters._sqlite_write",
                                {"path": str(tmp_path / "t.db")})
    with pytest.raises(WriterError, match="KeyError"):  # no busy_timeout_ms, no kinds
        await writer.start()
    assert writer.pid is None and writer.started == 1
    with pytest.raises(WriterError, match="KeyError"):  # tried anew, not "init first"
        await writer.request(b"W", b"")
    assert writer.started == 2
    await writer.close()


async def test_a_writer_process_that_cannot_start_falls_back_to_the_thread(
        tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # As in a sandbox that forbids subprocesses: spawning fails.
    async def refuse(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError("subprocesses are not allowed here")

    monkeypatch.setattr(asyncio, "create_subprocess_exec", refuse)
    with caplog.at_level(logging.WARNING, logger="penguiflow_exporters"):
        async with SQLiteStateStore(tmp_path / "t.db", flush_interval_s=3600.0) as store:
            await save_records(store, "t", range(1, 3))
            await store.flush()
            await save_records(store, "t", range(3, 4))
            assert [e.seq for e in await store.load_history("t")] == [1, 2, 3]  # nothing lost
            assert store.failures["events_lost"] == 0
    warnings = [r for r in caplog.records
                if r.getMessage() == "state_store_writer_process_unavailable"]
    assert len(warnings) == 1 and "not allowed" in str(warnings[0].__dict__["error"])


async def test_events_packed_for_a_writer_process_that_never_started_go_to_the_thread(
        tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Packing needs no process (it is a pickle), so runs of events are packed while
    # the first batch waits; that batch then finds no process, and the thread writer
    # takes it, packs unpacked.
    async def refuse(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError("subprocesses are not allowed here")

    monkeypatch.setattr(asyncio, "create_subprocess_exec", refuse)
    with caplog.at_level(logging.WARNING, logger="penguiflow_exporters"):
        async with SQLiteStateStore(tmp_path / "t.db", flush_interval_s=3600.0) as store:
            sink = store.event_values_sink()
            assert sink is not None
            sink(tuple(fields("t", 1)))
            assert store._processor is not None and store._processor._starting is not None
            await asyncio.wait_for(store._processor._starting, 10)  # the writer is built
            for seq in range(2, 602):
                sink(tuple(fields("t", seq)))
            assert store._processor._extra == 2 * 249  # packed while the batch waited
            await store.flush()
            assert [e.seq for e in await store.load_history("t")] == list(range(1, 602))
            assert store.failures["events_lost"] == 0
    warnings = [r for r in caplog.records
                if r.getMessage() == "state_store_writer_process_unavailable"]
    assert len(warnings) == 1


_BAD_SUMMARIES = {
    # Values SQLite keeps whatever the column says, from a file edited by another tool.
    "nodes not json": ("nodes", "not json"),
    "nodes a number": ("nodes", 5),
    "nodes nested deep": ("nodes", "[" * 100_000),
    "nodes of numbers": ("nodes", "[1, 2]"),
    "started text": ("started_ts", "abc"),
    "ended a blob": ("ended_ts", b"\x00\x01"),
    "count text": ("event_count", "many"),
    "flow name not utf-8": ("flow_name", b"\xff\xfeA"),  # TEXT holding these bytes
    "status not utf-8": ("status", b"\xc3("),
    "flow name a blob": ("flow_name", memoryview(b"\xff")),  # a BLOB
}


@pytest.mark.parametrize("readonly", [False, True])
@pytest.mark.parametrize("case", sorted(_BAD_SUMMARIES))
async def test_one_bad_summary_row_loses_only_what_it_holds(
        tmp_path: Path, case: str, readonly: bool) -> None:
    # Each failed list_traces() as a whole before (JSONDecodeError, TypeError,
    # RecursionError, "Could not decode to UTF-8"), so pf traces listed nothing.
    path = tmp_path / "traces.db"
    async with SQLiteStateStore(path, writer="thread") as writing:
        await writing.save_events(invocation("good", "a", 10.0, 11.0)
                                  + invocation("bad", "b", 20.0, 21.0))
    column, value = _BAD_SUMMARIES[case]
    with sqlite3.connect(path) as conn:
        cell = "CAST(? AS TEXT)" if type(value) is bytes else "?"
        conn.execute(f"UPDATE traces SET {column} = {cell} WHERE trace_id = 'bad'", (value,))
    async with SQLiteStateStore(path, readonly=readonly) as store:
        listed = {s.trace_id: s for s in await store.list_traces()}
        assert sorted(listed) == ["bad", "good"]
        good = await store.get_trace("good")
        assert good == listed["good"] and good is not None
        assert (good.nodes, good.event_count, good.status) == (("a",), 2, "succeeded")
        bad = await store.get_trace("bad")
        assert bad == listed["bad"] and bad is not None
        assert len(await store.load_history("bad")) == 2  # its events are all there
    shown = {"nodes": bad.nodes, "started_ts": bad.started_ts, "ended_ts": bad.ended_ts,
             "event_count": bad.event_count, "flow_name": bad.flow_name,
             "status": bad.status}[column]
    if column == "nodes":
        assert shown == ()
    elif column.endswith("_ts"):
        assert math.isnan(shown)
    elif column == "event_count":
        assert shown == 0
    elif case == "flow name a blob":
        assert shown == "b'\\xff'"
    else:
        assert isinstance(shown, str) and "\ufffd" in shown
