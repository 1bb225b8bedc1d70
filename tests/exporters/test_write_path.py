"""The durable stores' write path under faults (issue 14 §2), on a real SQLite file.

Each test is a fault a probe from outside found: sustained load, one bad event in a
big batch, a writer killed mid-batch, the file deleted under a running store, a WAL
that grew without bound, a hung database at close. The processor is the same for
Postgres (tests/exporters/test_postgres_store.py covers its own faults).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import gc
import hashlib
import logging
import math
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from array import array
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from penguiflow import Headers, Message, Node, NodePolicy, create
from penguiflow.state import (
    EventRecord,
    RemoteBinding,
    StateStoreError,
    StoredEvent,
    StoreUnavailable,
)
from penguiflow_exporters import open_store
from penguiflow_exporters.sqlite import SQLiteStateStore

WRITERS = pytest.mark.parametrize("writer", ["process", "thread"])


def event(trace: Any, seq: int, *, node: Any = "a", kind: str = "node_start",
          flow: str = "flow-w") -> StoredEvent:
    return StoredEvent(trace, 1000.0 + seq, kind, node, None, {"seq": seq}, flow_id=flow,
                       seq=seq)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def _double(msg: Message, ctx: Any) -> Message:
    return msg.model_copy(update={"payload": msg.payload * 2})


def chain(store: Any, **kwargs: Any) -> Any:
    a = Node(_double, name="a", policy=NodePolicy(validate="none"))
    b = Node(_double, name="b", policy=NodePolicy(validate="none"))
    return create(a.to(b), b.to(), state_store=store, **kwargs)


class Gated:
    """The store's real writer, each batch held until ``gate`` opens."""

    def __init__(self, inner: Any, gate: asyncio.Event, entered: asyncio.Event) -> None:
        self.inner, self.gate, self.entered = inner, gate, entered

    async def write(self, items: Any) -> Any:
        self.entered.set()
        await self.gate.wait()
        return await self.inner.write(items)

    async def close(self) -> None:
        await self.inner.close()


class GatedStore(SQLiteStateStore):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate, self.entered = asyncio.Event(), asyncio.Event()

    def _make_writer(self) -> Any:
        return Gated(super()._make_writer(), self.gate, self.entered)


# -- load -------------------------------------------------------------------------------


@WRITERS
async def test_sustained_load_loses_nothing_by_default(tmp_path: Path, writer: str) -> None:
    # A small buffer, so the flow runs into it again and again: by default it waits.
    store = SQLiteStateStore(tmp_path / "t.db", writer=writer, max_buffer=256, max_batch=64)
    flow = chain(store)
    flow.run()
    messages = [Message(payload=i, headers=Headers(tenant="t")) for i in range(1500)]
    async def emit_all() -> None:  # while fetching: the flow's own queues are bounded too
        for m in messages:
            await flow.emit(m)

    emitter = asyncio.ensure_future(emit_all())
    try:
        results = [await asyncio.wait_for(flow.fetch(), 30) for _ in messages]
        await emitter
    finally:
        emitter.cancel()
        await flow.stop()
    assert sorted(r.payload for r in results) == [4 * i for i in range(1500)]
    await store.flush()
    assert not store.failures, dict(store.failures)
    for m in messages[::100]:
        kinds = Counter(e.kind for e in await store.load_history(m.trace_id))
        assert kinds["node_start"] == 2 and kinds["node_success"] == 2
        summary = await store.get_trace(m.trace_id)
        assert summary is not None and summary.status == "succeeded"
    await store.close()


async def test_drop_is_explicit_counted_exactly_and_marks_traces_incomplete(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    store = GatedStore(tmp_path / "t.db", writer="thread", on_full="drop", max_buffer=40,
                       max_batch=10)
    saved: Counter[str] = Counter()
    with caplog.at_level(logging.WARNING, logger="penguiflow_exporters"):
        for seq in range(200):
            # Valid ids a printable-ASCII check would refuse get their markers too.
            trace = ("trace-0", "order\xa07", "line\u2028sep", "zw\u200bsp")[seq % 4]
            await store.save_event(event(trace, seq))
            saved[trace] += 1
        await asyncio.wait_for(store.entered.wait(), 10)
        store.gate.set()
        await store.flush()
    dropped = store.failures["dropped"]
    assert dropped > 0 and store.failures["events_lost"] == dropped
    assert "state_store_buffer_full" in caplog.text
    lost_total = stored_total = 0
    for trace, count in saved.items():
        history = await store.load_history(trace)
        events = [e for e in history if e.kind != "store_events_lost"]
        markers = [e for e in history if e.kind == "store_events_lost"]
        lost = sum(m.payload["events_lost"] for m in markers)
        assert len(events) + lost == count  # every event is stored or counted, once
        summary = await store.get_trace(trace)
        assert summary is not None and summary.events_lost == lost
        assert summary.status == ("incomplete" if lost else "running")
        lost_total += lost
        stored_total += len(events)
    assert lost_total == dropped and stored_total + dropped == 200
    await store.close()


@WRITERS
async def test_a_reader_right_after_flush_sees_the_losses_of_its_writes(
        tmp_path: Path, writer: str) -> None:
    # The marker of an event refused by the flush's own write was made after the flush
    # had decided what to wait for: a reader right after (pf inspect after
    # flow.stop()) saw a trace that lost an event as "running", for up to
    # schedule_delay_s; with the event loop ending after a flush, for good.
    path = tmp_path / "t.db"
    async with SQLiteStateStore(path, writer=writer, schedule_delay_s=30.0) as store:
        for seq in range(10):
            await store.save_event(event("t0", seq, node="bad\x00" if seq == 5 else "a"))
        await asyncio.wait_for(store.flush(), 10)  # before: long before the marker
        assert store.failures["rejected"] == 1
        async with SQLiteStateStore(path, readonly=True) as reader:
            summary = await reader.get_trace("t0")
        assert summary is not None
        assert (summary.status, summary.events_lost, summary.event_count) == (
            "incomplete", 1, 10)  # 9 events and the marker


class _ClosedCache(Mapping[str, Any]):
    """A payload value like a closed ``dbm`` database: reading it raises OSError."""

    def __getitem__(self, key: str) -> Any:
        raise OSError("cache file closed")

    def __iter__(self) -> Iterator[str]:
        raise OSError("cache file closed")

    def __len__(self) -> int:
        return 1


@WRITERS
async def test_an_event_whose_value_raises_oserror_loses_only_itself(
        tmp_path: Path, writer: str) -> None:
    # An OSError is what the database being unreachable raises: the batch was retried,
    # then lost whole (20 events for one bad value). It is the event's fault.
    async with SQLiteStateStore(tmp_path / "t.db", writer=writer, retries=1) as store:
        events = [event("t0", seq) for seq in range(20)]
        events[10] = StoredEvent("t0", 1010.0, "node_start", "a", None,
                                 {"cache": _ClosedCache()}, flow_id="flow-w", seq=10)
        await store.save_events(events)
        await store.flush()
        history = await store.load_history("t0")
        failures = dict(store.failures)
    assert len([e for e in history if e.kind != "store_events_lost"]) == 19
    assert failures["events_lost"] == 1 and failures.get("retried", 0) == 0


class _TraceId(str, enum.Enum):
    ORDER = "order-7"


async def test_a_str_subclass_trace_id_that_lost_events_is_marked_incomplete(
        tmp_path: Path) -> None:
    # Stored as its text, but its losses got no marker (the marker wanted a plain
    # str): the trace read "running" with events missing.
    store = GatedStore(tmp_path / "t.db", writer="thread", on_full="drop", max_buffer=3,
                       max_batch=1)
    for seq in range(8):
        await store.save_event(event(_TraceId.ORDER, seq))
    await asyncio.wait_for(store.entered.wait(), 10)
    store.gate.set()
    await store.flush()
    dropped = store.failures["dropped"]
    summary = await store.get_trace("order-7")
    await store.close()
    assert dropped > 0 and summary is not None
    assert (summary.status, summary.events_lost) == ("incomplete", dropped)


# -- one bad event loses only itself ------------------------------------------------------

_BAD_TRACE_IDS = st.one_of(
    st.just("nul\x00id"), st.just("esc\x1b]0;pwned\x07"), st.just("lone\ud800"),
    st.just("x" * 5_000_000), st.integers(), st.just(b"bytes"), st.just(""))
_BAD_NODES = st.one_of(st.just("n\x00"), st.just("n\udfff"), st.just("n" * 5000),
                       st.integers())


@given(bad=st.lists(st.one_of(_BAD_TRACE_IDS.map(lambda t: ("trace", t)),
                              _BAD_NODES.map(lambda n: ("node", n))), min_size=1, max_size=5),
       positions=st.lists(st.integers(0, 299), min_size=5, max_size=5))
@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
def test_a_bad_event_loses_only_itself(tmp_path: Path, bad: list[tuple[str, Any]],
                                       positions: list[int]) -> None:
    async def scenario() -> None:
        path = tmp_path / f"bad-{time.monotonic_ns()}.db"
        async with SQLiteStateStore(path, writer="thread", max_batch=10_000) as store:
            good = [event(f"good-{seq % 7}", seq) for seq in range(300)]
            items: list[StoredEvent] = list(good)
            for (what, value), at in zip(bad, positions, strict=False):
                seq = 10_000 + at
                odd = event(value, seq) if what == "trace" else event("good-0", seq, node=value)
                items.insert(at, odd)
            await store.save_events(items)
            await store.flush()
            assert store.failures["rejected"] == len(bad)
            assert store.failures["events_lost"] == len(bad)
            for t in range(7):
                history = [e for e in await store.load_history(f"good-{t}")
                           if e.kind != "store_events_lost"]
                assert history == [e for e in good if e.trace_id == f"good-{t}"]

    asyncio.run(scenario())


@WRITERS
async def test_one_bad_event_in_a_10k_batch_of_other_traces(
    tmp_path: Path, writer: str, caplog: pytest.LogCaptureFixture,
) -> None:
    async with SQLiteStateStore(tmp_path / "t.db", writer=writer, max_batch=10_000) as store:
        items = [event(f"t-{i % 1000}", i) for i in range(10_000)]
        items[5000] = event("bad\x00trace", 5000)
        with caplog.at_level(logging.WARNING, logger="penguiflow_exporters"):
            await store.save_events(items)
            await store.flush()
        assert store.failures["rejected"] == 1 and store.failures["events_lost"] == 1
        record = next(r for r in caplog.records if r.getMessage() == "state_store_events_rejected")
        assert "trace_id holds a control character" in str(record.reasons)  # type: ignore[attr-defined]
        traces = await store.list_traces()
        assert sum(s.event_count for s in await _all(store)) == 9_999
        assert traces


async def _all(store: Any) -> list[Any]:
    from penguiflow.state import TraceFilter

    return await store.list_traces(TraceFilter(limit=100_000))


# -- a writer that dies, a database that fails ---------------------------------------------


async def test_a_writer_process_killed_mid_batch_loses_nothing(tmp_path: Path) -> None:
    store = GatedStore(tmp_path / "t.db", writer="process")
    async with store:
        assert store.save_event_fields(next(iter(_records("warm", range(1)))) ) is None
        store.gate.set()
        await store.flush()  # the writer process runs
        process = store._processor.writer._writer.inner._writer.process  # type: ignore[union-attr]
        pid = process.pid
        assert pid is not None
        store.gate.clear()
        store.entered.clear()
        for record in _records("t-kill", range(1, 501)):  # runtime records: to the child
            assert store.save_event_fields(record) is None
        await asyncio.wait_for(store.entered.wait(), 10)
        os.kill(pid, signal.SIGKILL)
        store.gate.set()
        await store.flush()
        # The dead process was StoreUnavailable: the batch was retried in a new one.
        assert process.started == 2
        assert store.failures["retried"] >= 1 and store.failures["events_lost"] == 0
        assert len(await store.load_history("t-kill")) == 500


async def test_a_replacement_writer_killed_while_it_starts_is_started_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The child died (the OOM killer), and so did its replacement while it started:
    # that was taken for "no writer process can be started here", and the store
    # wrote on a thread (slower) for the rest of its life.
    from penguiflow_exporters import _writer_proc

    exchange = _writer_proc.AsyncWriterProcess._exchange
    kill_at_init = asyncio.Event()

    async def dying(self: Any, proc: Any, op: bytes, payload: bytes) -> Any:
        if op == b"I" and kill_at_init.is_set():  # fault injection: SIGKILL at start
            kill_at_init.clear()
            os.kill(proc.pid, signal.SIGKILL)
            await proc.wait()
        return await exchange(self, proc, op, payload)

    monkeypatch.setattr(_writer_proc.AsyncWriterProcess, "_exchange", dying)
    async with SQLiteStateStore(tmp_path / "t.db", writer="process") as store:
        for record in _records("t", range(1, 11)):
            store.save_event_fields(record)
        await store.flush()
        process = store._processor.writer._writer._writer.process  # type: ignore[union-attr]
        os.kill(process.pid, signal.SIGKILL)
        kill_at_init.set()
        for record in _records("t", range(11, 31)):
            store.save_event_fields(record)
        await store.flush()
        assert type(store._processor.writer._writer._writer).__name__ == "ProcessWriter"  # type: ignore[union-attr]
        assert process.started == 3 and store.failures["events_lost"] == 0
        assert len(await store.load_history("t")) == 30


async def test_writer_processes_that_can_no_longer_start_give_way_to_the_thread(
        tmp_path: Path) -> None:
    # After one writer was ready, every later death at start was taken for a passing
    # one: with children that can never start again (the environment changed under a
    # long-lived service), every batch was retried, then lost, for ever.
    async with SQLiteStateStore(tmp_path / "t.db", writer="process") as store:
        for record in _records("t", range(1, 11)):
            store.save_event_fields(record)
        await store.flush()
        process = store._processor.writer._writer._writer.process  # type: ignore[union-attr]
        process.module = "penguiflow_exporters._no_such_module"  # children now die at start
        await process.kill()
        for record in _records("t", range(11, 31)):
            store.save_event_fields(record)
        await asyncio.wait_for(store.flush(), 60)
        assert type(store._processor.writer._writer._writer).__name__ == "ThreadWriter"  # type: ignore[union-attr]
        assert store.failures["events_lost"] == 0
        assert len(await store.load_history("t")) == 30


def _records(trace: str, seqs: range) -> list[EventRecord]:
    return [EventRecord(trace, 1000.0 + seq, "node_start", "a", None, None, (), None, None, seq,
                        0, None, "f", "flow-w", None, 0, 0, 1, 64, 1, False, None, None)
            for seq in seqs]


class FailingWriter:
    def __init__(self, fails: int) -> None:
        self.fails = fails

    async def write(self, items: Any) -> Any:
        raise StoreUnavailable("injected: the database is down")

    async def close(self) -> None:
        return None


async def test_events_lost_counts_events_exactly_across_batches(tmp_path: Path) -> None:
    class Down(SQLiteStateStore):
        def _make_writer(self) -> Any:
            return FailingWriter(0)

    store = Down(tmp_path / "t.db", writer="thread", max_batch=7, retries=1,
                 close_timeout_s=30)
    await store.save_events([event(f"t-{i % 3}", i) for i in range(100)])
    await store.flush()
    # 100 events in 15 batches of at most 7: every event counted once, not a batch once.
    assert store.failures["events_lost"] == 100
    assert store.failures["write_failed_events"] == 100
    assert store.failures["write_failed"] >= 15  # the batches (and their markers' retry)
    # The markers could not be written either, and do not loop: flush returned.
    await store.close()


# -- the file under a running store ------------------------------------------------------


@WRITERS
async def test_a_deleted_file_is_detected_and_the_store_reopens(
    tmp_path: Path, writer: str, caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "t.db"
    async with SQLiteStateStore(path, writer=writer) as store:
        await store.save_events([event("before", i) for i in range(10)])
        await store.flush()
        for suffix in ("", "-wal", "-shm"):
            await asyncio.to_thread(Path(f"{path}{suffix}").unlink, missing_ok=True)
        with caplog.at_level(logging.WARNING, logger="penguiflow_exporters"):
            await store.save_events([event("after", i) for i in range(10, 20)])
            await store.flush()
        assert store.failures["file_replaced"] == 1
        assert any("deleted or replaced" in getattr(r, "detail", "") for r in caplog.records)
        assert path.is_file()
        assert [e.seq for e in await store.load_history("after")] == list(range(10, 20))
    # what is on disk now is a whole store: another reader sees it
    async with open_store(f"sqlite:///{path}", readonly=True) as reader:
        assert len(await reader.load_history("after")) == 10


@pytest.mark.parametrize("writer", ["thread", "process"])
async def test_a_file_moved_away_without_its_wal_keeps_what_was_written(
        tmp_path: Path, writer: str) -> None:
    # Rotation by `mv t.db t.db.1` leaves -wal/-shm behind: reopening the path
    # used to delete that WAL (with every commit not yet checkpointed) when the
    # new, empty file opened, and the old file had no tables at all.
    path = tmp_path / "t.db"
    async with SQLiteStateStore(path, writer=writer) as store:
        await store.save_events([event("before", i) for i in range(3000)])
        await store.flush()
        await asyncio.to_thread(path.rename, tmp_path / "t.db.1")
        await store.save_events([event("after", i) for i in range(3000, 3100)])
        await store.flush()
        assert store.failures["file_replaced"] == 1
    async with open_store(f"sqlite:///{tmp_path / 't.db.1'}", readonly=True) as old:
        assert len(await old.load_history("before")) == 3000
    async with open_store(f"sqlite:///{path}", readonly=True) as new:
        assert len(await new.load_history("after")) == 100


async def test_closing_after_the_file_was_deleted_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    store = SQLiteStateStore(path, writer="thread")
    await store.save_events([event("t", i) for i in range(10)])
    await store.flush()
    for suffix in ("", "-wal", "-shm"):
        await asyncio.to_thread(Path(f"{path}{suffix}").unlink, missing_ok=True)
    await store.close()
    assert _names(tmp_path) == []  # before: an empty t.db, which readers took for a store


async def test_the_wal_stays_within_a_few_mb(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    # with a reader that keeps the file open the whole time (the inspector, say)
    async with SQLiteStateStore(path, writer="thread") as store, \
            open_store(f"sqlite:///{path}", readonly=True) as reader:
        for chunk in range(15):
            await store.save_events([event(f"w-{i % 50}", chunk * 10_000 + i)
                                     for i in range(10_000)])
            await store.flush()
            await reader.list_traces()
            wal = _size(f"{path}-wal")
            assert wal <= 12 << 20, f"WAL at {wal} bytes after {chunk + 1}0k events"
    assert _size(str(path)) > 4 << 20


def test_the_wal_restarts_under_sustained_writes_of_small_traces(tmp_path: Path) -> None:
    # Batches of many 10-event traces (a busy flow): the checkpoint runs on a thread
    # of its own while the next batch is encoded; the WAL must still restart (not
    # grow to the writer's own last-resort checkpoint), every event stay, and no
    # checkpoint thread outlive close().
    from penguiflow_exporters import _sqlite_write

    path = str(tmp_path / "t.db")
    writer = _sqlite_write.SQLiteWriter(path, terminal=frozenset({"node_success"}),
                                        errors=frozenset())
    writer.open()
    largest = 0
    for batch in range(30):
        assert writer.write(_busy_rows(batch)) == ([], [], [])
        largest = max(largest, _size(f"{path}-wal"))
    writer.close()
    # Restarted: about the threshold plus the batches written meanwhile, well
    # below the size past which the writer checkpoints at once.
    assert largest <= 2 * _sqlite_write.WAL_CHECKPOINT_BYTES < _sqlite_write.WAL_HARD_BYTES
    assert not [t for t in threading.enumerate() if t.name == "penguiflow-sqlite-checkpoint"]
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT sum(n) FROM blocks").fetchone() == (30 * 2000,)
        assert conn.execute("SELECT count(*), sum(event_count) FROM traces").fetchone() == (
            30 * 200, 30 * 2000)


def test_a_reader_holding_a_snapshot_does_not_hold_each_batch_up(tmp_path: Path) -> None:
    # An open read transaction keeps the WAL from restarting; past WAL_HARD_BYTES
    # each batch checkpoints at once, and that checkpoint waited the whole busy
    # timeout (5 s) for the reader: every batch, for as long as the reader lived.
    from penguiflow_exporters import _sqlite_write

    path = str(tmp_path / "t.db")
    writer = _sqlite_write.SQLiteWriter(path, terminal=frozenset(), errors=frozenset())
    writer.open()
    writer.write(_busy_rows(0))
    reader = sqlite3.connect(path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM traces").fetchone()  # a snapshot, held
    batch = 0
    while _size(f"{path}-wal") <= _sqlite_write.WAL_HARD_BYTES + (2 << 20):
        batch += 1
        started = time.monotonic()
        writer.write(_busy_rows(batch))
        assert time.monotonic() - started < 2.0, f"batch {batch} waited for the reader"
    reader.execute("COMMIT")
    reader.close()
    for more in range(2):  # the reader gone: the next checkpoint truncates the WAL
        writer.write(_busy_rows(batch + 1 + more))
    assert _size(f"{path}-wal") <= 2 * _sqlite_write.WAL_CHECKPOINT_BYTES
    writer.close()


def test_a_checkpoint_of_a_deleted_file_creates_nothing(tmp_path: Path) -> None:
    from penguiflow_exporters import _sqlite_write

    checkpointer = _sqlite_write._Checkpointer()
    checkpointer.open(str(tmp_path / "gone.db"), 1000)
    assert not checkpointer.start()  # nothing to checkpoint: no connection
    checkpointer.close()
    assert _names(tmp_path) == []


def _busy_rows(batch: int, n: int = 2000, flow: str = "flow-w") -> list[tuple[Any, ...]]:
    from penguiflow_exporters._records import tuple_rows

    rows = []
    for i in range(n):
        seq = batch * n + i + 1
        rows.append(EventRecord(f"trace-{flow}-{batch}-{i % 200}", 1000.0 + seq, "node_start",
                                f"n{i % 5}", "nid", f"{seq:016x}", (f"{seq - 1:016x}",),
                                f"{seq:016x}", None, seq, 0, 999.5 + seq, "demo", flow, 0.25,
                                1, 2, 1, 64, 1, False, 1, None))
    return tuple_rows(rows)


def test_a_file_restored_under_a_running_checkpoint_is_not_written_into(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A backup restored with `mv` over the store's file just as a checkpoint starts:
    # the checkpoint belongs to the old file (its WAL); copied into the restored
    # file, it left that file corrupt ("database disk image is malformed").
    from penguiflow_exporters import _sqlite_write

    path, backup = str(tmp_path / "t.db"), str(tmp_path / "backup.db")
    # The backup: a copy taken while its store ran (a file in WAL mode).
    other = _sqlite_write.SQLiteWriter(str(tmp_path / "o.db"), terminal=frozenset(),
                                       errors=frozenset())
    other.open()
    for batch in range(100, 103):
        other.write(_busy_rows(batch, 700, "flow-o"))
    assert other._conn is not None
    other._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    shutil.copy(tmp_path / "o.db", backup)
    other.close()
    with contextlib.closing(sqlite3.connect(backup)) as conn:  # closed: no lock left
        restored = conn.execute("SELECT count(*), sum(event_count) FROM traces").fetchone()

    writer = _sqlite_write.SQLiteWriter(path, terminal=frozenset(), errors=frozenset())
    writer.open()
    for batch in range(3):
        writer.write(_busy_rows(batch))
    batch = 3
    start = _sqlite_write._Checkpointer.start

    def restore_then_start(self: Any) -> bool:
        # The first checkpoint after batch 12 (the WAL has restarted since the first).
        if batch >= 12 and os.path.exists(backup):
            os.replace(backup, path)
        return start(self)

    monkeypatch.setattr(_sqlite_write._Checkpointer, "start", restore_then_start)
    notices: list[tuple[str, str]] = []
    for batch in range(3, 40):  # restore_then_start reads it
        notices += writer.write(_busy_rows(batch))[2]
        if notices:
            break
    writer.close()
    assert [counter for counter, _ in notices] == ["file_replaced"]
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert conn.execute("SELECT count(*), sum(event_count) FROM traces").fetchone() == (
            restored[0] + 200, restored[1] + 2000)  # the restored file, and the last batch


def _size(path: str) -> int:
    return os.path.getsize(path)


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# -- close is bounded -----------------------------------------------------------------------


@WRITERS
async def test_close_returns_in_bounded_time_when_the_database_hangs(
    tmp_path: Path, writer: str, caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "t.db"
    async with SQLiteStateStore(path, writer=writer) as store:
        await store.save_event(event("ok", 0))
        await store.flush()
    store = SQLiteStateStore(path, writer=writer, close_timeout_s=0.5)
    await store.open()
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # the database hangs: every write waits on it
    try:
        await store.save_events([event("stuck", i) for i in range(1, 301)])
        started = time.monotonic()
        with caplog.at_level(logging.ERROR, logger="penguiflow_exporters"):
            await store.close()
        elapsed = time.monotonic() - started
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert elapsed < 3.0
    assert store.failures["abandoned"] == 300 and store.failures["events_lost"] == 300
    assert "state_store_close_timeout" in caplog.text
    # The write given up on must not commit once the lock is free: those 300 were
    # counted as not stored (before, a thread writer stored them all the same).
    for thread in [t for t in threading.enumerate() if t.name.startswith("penguiflow-sqlite")]:
        await asyncio.to_thread(thread.join, 10)
    check = sqlite3.connect(path)
    try:
        assert check.execute("SELECT count(*) FROM traces WHERE trace_id = 'stuck'"
                             ).fetchone() == (0,)
    finally:
        check.close()


# -- schema ---------------------------------------------------------------------------------

_V4_DDL = (
    "CREATE TABLE schema_version (version INTEGER NOT NULL, applied_ts REAL NOT NULL "
    "DEFAULT 0)",
    """CREATE TABLE traces (key INTEGER PRIMARY KEY, trace_id TEXT NOT NULL UNIQUE,
        flow_name TEXT, status TEXT NOT NULL, started_ts REAL NOT NULL, ended_ts REAL NOT NULL,
        node_count INTEGER NOT NULL, error_count INTEGER NOT NULL,
        remote_call_count INTEGER NOT NULL, event_count INTEGER NOT NULL, nodes TEXT NOT NULL,
        open_count INTEGER NOT NULL, failed INTEGER NOT NULL, cancelled INTEGER NOT NULL)""",
    "CREATE INDEX traces_started ON traces (started_ts)",
    "CREATE TABLE bindings (id INTEGER PRIMARY KEY, trace_id TEXT NOT NULL, context_id TEXT, "
    "task_id TEXT, agent_url TEXT)",
    "CREATE TABLE flows (key INTEGER PRIMARY KEY, flow_id TEXT NOT NULL UNIQUE)",
    """CREATE TABLE blocks (id INTEGER PRIMARY KEY, trace_key INTEGER, first INTEGER NOT NULL,
        n INTEGER NOT NULL, ts_lo REAL NOT NULL, ts_hi REAL NOT NULL, data BLOB NOT NULL)""",
    "CREATE INDEX blocks_trace ON blocks (trace_key, first)",
    "CREATE TABLE flow_seqs (flow_key INTEGER NOT NULL, lo INTEGER NOT NULL, "
    "hi INTEGER NOT NULL, PRIMARY KEY (flow_key, lo)) WITHOUT ROWID",
)


def _v4_file(path: Path) -> list[StoredEvent]:
    """A schema-4 file as the previous store wrote it: one trace, two blocks (a block
    of runtime tuples, a block of StoredEvents in the two-pickle layout)."""
    import pickle

    runtime = [EventRecord("old", 10.0 + i, "node_start" if i == 0 else "node_success", "a",
                           "a-id", "inv", (), "s", None, i, 0, 9.0, "legacy", "flow-old", 1.5,
                           0, 0, 1, 64, 1, False, None, None) for i in range(2)]
    stored = StoredEvent("old", 20.0, "custom", None, None, {"note": "kept"}, flow_id="flow-old",
                         seq=2)
    heads = [(stored.trace_id, stored.ts, stored.kind, None, None, None, (), None, None, 2, 0,
              None, None, "flow-old")]
    conn = sqlite3.connect(path, isolation_level=None)
    for statement in _V4_DDL:
        conn.execute(statement)
    conn.executemany("INSERT INTO schema_version (version) VALUES (?)", [(1,), (2,), (3,), (4,)])
    conn.execute("INSERT INTO traces VALUES (1, 'old', 'legacy', 'succeeded', 10.0, 20.0, 1, 0, "
                 "0, 3, '[\"a\"]', 0, 0, 0)")
    conn.execute("INSERT INTO flows VALUES (1, 'flow-old')")
    conn.execute("INSERT INTO flow_seqs VALUES (1, 0, 2)")
    conn.execute("INSERT INTO blocks (trace_key, first, n, ts_lo, ts_hi, data) VALUES "
                 "(1, 0, 2, 10.0, 11.0, ?)", (pickle.dumps([tuple(r) for r in runtime], 5),))
    conn.execute("INSERT INTO blocks (trace_key, first, n, ts_lo, ts_hi, data) VALUES "
                 "(1, 2, 1, 20.0, 20.0, ?)",
                 (pickle.dumps(heads, 5) + pickle.dumps([(stored.payload,)], 5),))
    conn.close()
    from penguiflow.state import stored_from_fields

    return [*map(stored_from_fields, runtime), stored]


async def test_a_schema_4_file_is_upgraded_and_reads_back_equal(tmp_path: Path) -> None:
    path = tmp_path / "v4.db"
    expected = _v4_file(path)
    async with SQLiteStateStore(path, writer="thread") as store:
        assert list(await store.load_history("old")) == expected
        summary = await store.get_trace("old")
        assert summary is not None and summary.status == "succeeded"
        await store.save_event(event("old", 3, flow="flow-old"))  # already stored: seq 3 is new
        await store.save_event(StoredEvent("old", 30.0, "custom", None, None, {},
                                           flow_id="flow-old", seq=2))  # a re-delivery
        await store.flush()
        assert len(await store.load_history("old")) == 4
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT max(version) FROM schema_version").fetchone() == (5,)
    assert conn.execute("SELECT count(*) FROM blocks WHERE typeof(data) = 'blob'").fetchone() \
        == (0,)  # no pickle is left in the file
    conn.close()


async def test_a_crafted_schema_4_block_is_refused_not_unfolded(tmp_path: Path) -> None:
    # A 249-byte block of one list referring to itself twice per level, 25 levels deep,
    # passed the restricted unpickler and unfolded into 571 MB of JSON (2.2 GB of RAM)
    # while the file was migrated; the Postgres migration already refused it.
    import io
    import pickle

    path = tmp_path / "v4.db"
    _v4_file(path)
    bomb: list[Any] = ["x" * 10]
    for _ in range(40):  # 2**40 leaves once written out
        bomb = [bomb, bomb]
    heads = [("old", 30.0, "custom", None, None, None, (), None, None, 9, 0, None, None,
              "flow-old")]
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, 5)  # one memo for both pickles, as schema 4 wrote
    pickler.dump(heads)
    pickler.dump([({"bomb": bomb},)])
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("INSERT INTO blocks (trace_key, first, n, ts_lo, ts_hi, data) VALUES "
                 "(1, 3, 1, 30.0, 30.0, ?)", (buffer.getvalue(),))
    conn.close()
    before = sha256(path)
    store = SQLiteStateStore(path, writer="thread")
    with pytest.raises(StateStoreError, match="unfolds into too many values"):
        await asyncio.wait_for(store.open(), 30)
    await store.close()
    assert sha256(path) == before


@pytest.mark.parametrize(("version", "message"), [
    (3, "schema version 3, which this penguiflow-exporters cannot upgrade"),
    (6, "schema version 6, newer than this penguiflow-exporters supports"),
])
async def test_other_schema_versions_are_refused_and_left_unchanged(
    tmp_path: Path, version: int, message: str,
) -> None:
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL, applied_ts REAL)")
    conn.execute("INSERT INTO schema_version VALUES (?, 0)", (version,))
    conn.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, payload TEXT)")
    conn.close()
    before = sha256(path)
    store = SQLiteStateStore(path, writer="thread")
    with pytest.raises(StateStoreError, match=message):
        await store.open()
    await store.close()
    assert sha256(path) == before


@pytest.mark.parametrize("readonly", [False, True])
async def test_a_foreign_database_is_refused_byte_for_byte_unchanged(
    tmp_path: Path, readonly: bool,
) -> None:
    path = tmp_path / "people.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE people (name TEXT)")
    conn.execute("INSERT INTO people VALUES ('ada')")
    conn.close()
    before = sha256(path)
    store = open_store(f"sqlite:///{path}", readonly=readonly)
    with pytest.raises(StateStoreError, match="not a penguiflow trace database"):
        await store.open()  # type: ignore[attr-defined]
    await store.close()
    assert sha256(path) == before
    assert _names(tmp_path) == ["people.db"]


_FOREIGN_VERSIONS = {
    # Other applications' schema_version tables, and versions penguiflow never writes.
    "its own version 5": ["CREATE TABLE users (id INTEGER PRIMARY KEY)",
                          "CREATE TABLE schema_version (version INTEGER)",
                          "INSERT INTO schema_version VALUES (5)"],
    "text": ["CREATE TABLE schema_version (version TEXT)",
             "INSERT INTO schema_version VALUES ('alembic-123')"],
    "blob": ["CREATE TABLE schema_version (version)", "INSERT INTO schema_version VALUES (x'05')"],
    "infinite": ["CREATE TABLE schema_version (version)",
                 "INSERT INTO schema_version VALUES (1e999)"],
    "no version column": ["CREATE TABLE schema_version (id INTEGER, script TEXT)",
                          "INSERT INTO schema_version VALUES (1, 'V1__init.sql')"],
    "empty, beside its tables": ["CREATE TABLE users (id INTEGER PRIMARY KEY)",
                                 "CREATE TABLE schema_version (version INTEGER)"],
}


@pytest.mark.parametrize("readonly", [False, True])
@pytest.mark.parametrize("shape", sorted(_FOREIGN_VERSIONS))
async def test_a_foreign_schema_version_table_is_refused_unchanged(
        tmp_path: Path, shape: str, readonly: bool) -> None:
    # Each was taken for a store before: a traceback (int('alembic-123'),
    # int(inf)), "no such column"/"no such table" at the first read, or (an empty
    # table beside another application's) a writing store created its tables there.
    path = tmp_path / "app.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for statement in _FOREIGN_VERSIONS[shape]:
        conn.execute(statement)
    conn.close()
    before = sha256(path)
    store = open_store(f"sqlite:///{path}", readonly=readonly, writer="thread")
    with pytest.raises(StateStoreError, match="not a penguiflow trace database"):
        await store.open()  # type: ignore[attr-defined]
    await store.close()
    assert sha256(path) == before
    assert _names(tmp_path) == ["app.db"]


async def _a_written_store(path: Path) -> None:
    async with SQLiteStateStore(path, writer="thread") as store:
        await store.save_events([StoredEvent("t1", 1.0 + i, "node_start", "a", "a", {},
                                             flow_id="f", seq=i + 1) for i in range(50)])
    assert _names(path.parent) == [path.name]


def _reader_refusal(path: Path) -> str:
    """The one-line refusal of a read-only open of ``path`` (a store error)."""
    async def attempt() -> str:
        store = open_store(f"sqlite:///{path}", readonly=True)
        try:
            with pytest.raises(StateStoreError) as info:
                await asyncio.wait_for(store.open(), 10)  # type: ignore[attr-defined]
        finally:
            await store.close()
        return str(info.value)
    return asyncio.run(attempt())


def test_readers_name_what_is_wrong_with_a_file_that_is_no_store(tmp_path: Path) -> None:
    # Each got a message naming something else before: a FIFO or /dev/null "does
    # not exist"; a cut-short store "database disk image is malformed" with no fix;
    # a writer's leftover rollback journal "attempt to write a readonly database".
    fifo = tmp_path / "fifo.db"
    os.mkfifo(fifo)
    assert "not a regular file (a FIFO" in _reader_refusal(fifo)  # and no hang
    device = tmp_path / "null.db"
    device.symlink_to("/dev/null")
    assert "not a regular file" in _reader_refusal(device)
    cut = tmp_path / "cut" / "traces.db"
    cut.parent.mkdir()
    asyncio.run(_a_written_store(cut))
    cut.write_bytes(cut.read_bytes()[:4096])  # the header and part of the first page
    before = sha256(cut)
    assert "the file is damaged (cut short or overwritten)" in _reader_refusal(cut)
    assert sha256(cut) == before and _names(cut.parent) == ["traces.db"]
    hot = tmp_path / "hot" / "traces.db"
    hot.parent.mkdir()
    asyncio.run(_a_written_store(hot))
    conn = sqlite3.connect(hot, isolation_level=None)
    conn.execute("PRAGMA journal_mode=DELETE")
    conn.execute("PRAGMA cache_size=1")
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("UPDATE blocks SET data = data || ' '")  # spills: the journal is hot
    copy = tmp_path / "copy" / "traces.db"
    copy.parent.mkdir()
    shutil.copy(hot, copy)
    shutil.copy(hot.with_name("traces.db-journal"), copy.with_name("traces.db-journal"))
    conn.execute("ROLLBACK")
    conn.close()
    sums = {name: sha256(copy.parent / name) for name in _names(copy.parent)}
    assert "rollback journal left by a writer that stopped mid-write" in _reader_refusal(copy)
    assert {name: sha256(copy.parent / name) for name in _names(copy.parent)} == sums


def test_a_reader_without_permission_says_so(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # Root reads any file, so the refusal is checked with os.access answering as it
    # does for another user; it said "unable to open database file" before.
    path = tmp_path / "traces.db"
    asyncio.run(_a_written_store(path))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == path
                        else real_access(p, mode, **kw))
    assert "cannot be read (permission denied)" in _reader_refusal(path)


async def test_a_readonly_store_refuses_empty_and_missing_files_and_writes(
    tmp_path: Path,
) -> None:
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    with pytest.raises(StateStoreError, match="holds no penguiflow traces"):
        await open_store(f"sqlite:///{empty}", readonly=True).open()  # type: ignore[attr-defined]
    assert empty.read_bytes() == b""
    missing = tmp_path / "missing.db"
    with pytest.raises(StoreUnavailable, match="does not exist"):
        await open_store(f"sqlite:///{missing}", readonly=True).open()  # type: ignore[attr-defined]
    assert _names(tmp_path) == ["empty.db"]

    path = tmp_path / "t.db"
    async with SQLiteStateStore(path) as store:
        await store.save_event(event("r", 1))
    async with open_store(f"sqlite:///{path}", readonly=True) as reader:
        assert len(await reader.load_history("r")) == 1
        with pytest.raises(StoreUnavailable, match="read-only"):
            await reader.save_event(event("r", 2))


class _UserThing:
    """A class of the test module: the writer child must never import it."""


async def test_user_classes_and_functions_in_an_event_reach_the_writer_process_as_text(
        tmp_path: Path) -> None:
    # The pickle to the child named them by reference: the child imported the
    # user's module (or failed on a lambda, and the event was lost).
    store = SQLiteStateStore(tmp_path / "t.db", writer="process")
    sink = store.event_values_sink()
    assert sink is not None
    odd = EventRecord("odd", 1000.0, "node_start", "a", None, None, (), None, None, 1,
                      0, None, "f", "flow-w", None, 0, 0, 1, 64, 1, False, None,
                      {"cls": _UserThing, "fn": lambda: 1, "builtin": len})
    for record in [*_records("good", range(2, 302)), odd]:
        waiter = sink(tuple(record))
        if waiter is not None:
            await waiter
    await store.flush()
    try:
        assert store.failures["events_lost"] == 0
        (stored,) = await store.load_history("odd")
        assert "_UserThing" in stored.payload["cls"] and "lambda" in stored.payload["fn"]
        assert len(await store.load_history("good")) == 300
    finally:
        await store.close()


class _Name(str):
    """A str subclass as a node name (the writer stores it as a plain str)."""


async def test_the_writer_process_stores_what_the_thread_writer_stores(tmp_path: Path) -> None:
    # Runtime batches reach the child as plain tuples (subclasses, buffers and user
    # objects become their plain equivalents on the way): the child must store
    # exactly what a writer in this process stores, whatever the batch holds. (A
    # marshal of the batches, tried, wrote an array's raw bytes.)
    plain = _records("plain", range(1, 201))
    named = [r._replace(trace_id="named", node_name=_Name("sub"), seq=r.seq + 1000)
             for r in _records("x", range(1, 101))]
    extra = [r._replace(trace_id="extra", seq=r.seq + 2000,
                        extra={"buf": bytearray(b"ab\x00"), "z": 1 + 2j, "set": {3},
                               "array": array("d", [1.5, 2.5])})
             for r in _records("x", range(1, 51))]
    histories = {}
    for writer in ("process", "thread"):
        store = SQLiteStateStore(tmp_path / f"{writer}.db", writer=writer)
        sink = store.event_values_sink()
        assert sink is not None
        try:
            for batch in (plain, named, extra):
                for record in batch:
                    waiter = sink(tuple(record))
                    if waiter is not None:
                        await waiter
                await store.flush()
            assert store.failures["events_lost"] == 0
            histories[writer] = {trace: list(await store.load_history(trace))
                                 for trace in ("plain", "named", "extra")}
        finally:
            await store.close()
    assert [len(h) for h in histories["process"].values()] == [200, 100, 50]
    assert histories["process"] == histories["thread"]
    assert histories["process"]["named"][0].node_name == "sub"
    assert "1.5" in str(histories["process"]["extra"][0].payload["array"])



async def test_the_runtime_values_sink_buffers_plain_tuples_and_refuses_when_closed(
    tmp_path: Path,
) -> None:
    class Watched(SQLiteStateStore):
        """Both paths, each counting what takes it (defined together: the sink is used)."""

        def __init__(self, path: Path) -> None:
            super().__init__(path)
            self.fields_kinds: list[str] = []

        def save_event_fields(self, fields: Any) -> Any:
            self.fields_kinds.append(fields[2])
            return super().save_event_fields(fields)

        def event_values_sink(self) -> Any:
            return super().event_values_sink()

    path = tmp_path / "t.db"
    store = Watched(path)
    sink = store.event_values_sink()
    assert sink is not None
    node = Node(_echo, name="a", policy=NodePolicy(validate="none"))
    flow = create(node.to(), state_store=store)
    flow.run()
    message = Message(payload=1, headers=Headers(tenant="t"))
    try:
        await flow.emit(message)
        await asyncio.wait_for(flow.fetch(), 10)
    finally:
        await flow.stop()
    kinds = [e.kind for e in await store.load_history(message.trace_id)]
    assert kinds == ["node_start", "node_success"]
    # The hot path's events took the sink; only stop()'s came through the fields.
    assert store.fields_kinds == ["node_cancelled"]
    await store.close()
    with pytest.raises(StoreUnavailable, match="closed"):
        sink(tuple(EventRecord(*([None] * 23))))
    async with open_store(f"sqlite:///{path}", readonly=True) as reader:
        # Read-only: no sink; the runtime's save_event_fields says why it cannot write.
        assert reader.event_values_sink() is None  # type: ignore[attr-defined]


async def _echo(message: Any, ctx: Any) -> Any:
    return message


# -- the host process is left alone ---------------------------------------------------------


async def test_stores_never_touch_the_garbage_collector(tmp_path: Path) -> None:
    threshold, enabled = gc.get_threshold(), gc.isenabled()
    store = SQLiteStateStore(tmp_path / "t.db")
    flow = chain(store)
    flow.run()
    try:
        for i in range(200):
            await flow.emit(Message(payload=i, headers=Headers(tenant="t")))
            await asyncio.wait_for(flow.fetch(), 10)
            assert gc.isenabled() == enabled and gc.get_threshold() == threshold
    finally:
        await flow.stop()
    await store.flush()
    await _all(store)
    assert gc.isenabled() == enabled and gc.get_threshold() == threshold
    await store.close()


def test_no_library_module_switches_the_garbage_collector() -> None:
    root = Path(__file__).resolve().parents[2]
    offenders = []
    for package in ("penguiflow", "penguiflow_a2a", "exporters/src", "inspector/src",
                    "distributed/src"):
        for source in sorted((root / package).rglob("*.py")):
            text = source.read_text()
            # _serve.py runs only in the store's own writer process, never in the host's.
            if source.name == "_serve.py":
                continue
            for call in ("gc.disable(", "gc.set_threshold(", "gc.freeze(", "gc.enable("):
                if call in text:
                    offenders.append(f"{source.relative_to(root)}: {call}")
    assert not offenders, offenders


# -- the writer process starts early, batches overlap ----------------------------------------


def _child(store: SQLiteStateStore) -> Any:
    """The store's writer process handle (None before the store built its writer)."""
    built = store._processor.writer._writer  # type: ignore[union-attr]
    return None if built is None else built._writer.process


async def test_the_writer_process_starts_with_the_first_runtime_event(tmp_path: Path) -> None:
    # The first batch used to wait ~80 ms for the process to spawn: it now starts
    # when the first runtime event is saved, long before the batch is due.
    store = SQLiteStateStore(tmp_path / "t.db", schedule_delay_s=60)
    async with store:
        waiter = store.save_event_fields(_records("early", range(1))[0])
        assert waiter is None
        starting = store._processor._starting  # type: ignore[union-attr]
        assert starting is not None
        await asyncio.wait_for(asyncio.shield(starting), 30)
        child = _child(store)
        assert child is not None and child.pid is not None
        assert store.pending_events == 1  # started, and nothing written yet
    async with open_store(f"sqlite:///{tmp_path / 't.db'}", readonly=True) as reader:
        assert len(await reader.load_history("early")) == 1


async def test_an_import_of_stored_events_starts_no_writer_process(tmp_path: Path) -> None:
    async with SQLiteStateStore(tmp_path / "t.db") as store:
        await store.save_events([event("import", i) for i in range(10)])
        await store.flush()
        child = _child(store)
        assert child is None or child.pid is None  # written on the thread
        assert len(await store.load_history("import")) == 10


async def test_a_producer_that_never_waits_lets_the_writer_take_full_batches(
        tmp_path: Path) -> None:
    # A bulk loop of save_event_fields never has to wait for room; once per full
    # batch it gets one turn of the event loop, so the writer starts on that batch
    # while the loop goes on (the two processes overlap instead of taking turns).
    store = SQLiteStateStore(tmp_path / "t.db", max_batch=100, schedule_delay_s=60)
    async with store:
        records = _records("bulk", range(1, 1001))
        turns = 0
        for record in records:
            waiter = store.save_event_fields(record)
            if waiter is not None:
                turns += 1
                await waiter
        # At least the first full batch gave the writer its turn; at most one turn
        # per full batch (while the writer is busy the buffer grows past a batch).
        assert 1 <= turns <= len(records) // 100
        await store.flush()
        assert [e.seq for e in await store.load_history("bulk")] == list(range(1, 1001))


class _CountingWriter:
    """Records each batch's size; says when it wrote one."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.wrote = asyncio.Event()

    async def write(self, items: Any) -> Any:
        from penguiflow_exporters.writer import WriteResult

        self.batches.append(len(items))
        self.wrote.set()
        return WriteResult()

    async def close(self) -> None:
        return None


@pytest.mark.parametrize("on_full", ["block", "drop"])
async def test_a_writer_waiting_for_more_is_woken_by_a_full_batch(on_full: str) -> None:
    # The writer waits schedule_delay_s (a minute here) for a partial batch to fill;
    # the item that fills it must wake it at once.
    from penguiflow_exporters.processor import BatchProcessor

    writer = _CountingWriter()
    processor = BatchProcessor(writer, max_batch=100, schedule_delay_s=60,
                               on_full=on_full)  # type: ignore[arg-type]
    records = [tuple(r) for r in _records("wake", range(1, 151))]
    processor.submit(records[0])
    await asyncio.sleep(0)  # the writer task starts: one item, so it waits for more
    for record in records[1:]:
        processor.submit(record)  # (the turn "block" offers at 100 is not taken)
    await asyncio.wait_for(writer.wrote.wait(), 10)
    assert writer.batches == [100]
    assert await processor.shutdown() == 0
    assert writer.batches == [100, 50]


async def test_an_event_whose_payload_no_reader_could_read_is_refused_alone(
        tmp_path: Path) -> None:
    # A payload of None, 5 or [1, 2] used to be stored, and then every read of its
    # trace failed ("corrupt event block"): the one event is refused instead.
    bad = [StoredEvent("mixed", 1000.5 + i, "node_start", "a", None, payload,  # type: ignore[arg-type]
                       flow_id="flow-w", seq=100 + i)
           for i, payload in enumerate([None, 5, [1, 2]])]
    async with SQLiteStateStore(tmp_path / "t.db") as store:
        await store.save_events([event("mixed", 1), *bad, event("mixed", 2)])
        await store.flush()
        history = await store.load_history("mixed")
        assert [e.seq for e in history if e.kind == "node_start"] == [1, 2]
        assert store.failures["rejected"] == 3 and store.failures["events_lost"] == 3
        summary = await store.get_trace("mixed")
        assert summary is not None and summary.events_lost == 3


# -- closing while the database hangs (found by a review) ------------------------------


class _HungDatabase:
    """An exclusive lock on the file: every write of the store waits on it."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.conn.execute("BEGIN EXCLUSIVE")

    def release(self) -> None:
        self.conn.execute("ROLLBACK")
        self.conn.close()


async def _hung_store(path: Path, **options: Any) -> tuple[SQLiteStateStore, _HungDatabase]:
    async with SQLiteStateStore(path) as first:  # the schema, written before the lock
        await first.save_event(event("ok", 0))
    store = SQLiteStateStore(path, close_timeout_s=0.5, **options)
    await store.open()
    return store, _HungDatabase(path)


def _writer_children() -> list[int]:
    """Pids of this process's children running a store writer (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == os.getpid() and b"_sqlite_write" in cmdline:
            found.append(int(entry))
    return found


async def test_two_closes_at_once_count_the_events_left_once(tmp_path: Path) -> None:
    store, hung = await _hung_store(tmp_path / "t.db")
    try:
        await store.save_events([event("stuck", i) for i in range(1, 301)])
        await asyncio.gather(store.close(), store.close())
    finally:
        hung.release()
    # Before: each close counted the 300 events it found unwritten (600 lost of 300).
    assert store.failures["abandoned"] == 300 and store.failures["events_lost"] == 300


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_a_buffer_of_one_batch_under_a_fast_producer_never_holds_the_loop(
        tmp_path: Path, writer: str) -> None:
    # max_buffer alone sets max_batch to the same size: with one batch in flight
    # and producers waiting, the writer task looped without ever awaiting and the
    # event loop froze for good. In a child process, so that a regression fails
    # after the timeout instead of hanging the suite.
    script = f"""
import asyncio
from array import array
from penguiflow.state import StoredEvent
from penguiflow_exporters.sqlite import SQLiteStateStore

async def main():
    store = SQLiteStateStore({str(tmp_path / "t.db")!r}, writer={writer!r}, max_buffer=100)
    await store.save_events([StoredEvent(f"t{{i % 10}}", 1000.0 + i, "node_start", "a", None,
                                         {{"i": i}}, flow_id="f", seq=i) for i in range(500)])
    await store.close()
    print(sum(t.event_count for t in await SQLiteStateStore(
        {str(tmp_path / "t.db")!r}, readonly=True).list_traces()))

asyncio.run(main())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["500"]


async def test_a_read_returns_under_sustained_load(tmp_path: Path) -> None:
    # A read flushes first; flush() waited until the buffer was empty and no write
    # was in flight at once, which a producer at the writer's pace never allows:
    # load_history hung for as long as the load lasted.
    store = SQLiteStateStore(tmp_path / "t.db", writer="thread")
    await store.save_event(event("ready", 0))
    stop, loaded = asyncio.Event(), asyncio.Event()
    produced = 0

    async def producer() -> None:
        nonlocal produced
        while not stop.is_set():
            await store.save_events([event(f"t{produced % 10}", produced + i + 1)
                                     for i in range(1000)])
            produced += 1000
            if produced >= 20_000:
                loaded.set()  # the load is on
            await asyncio.sleep(0.001)

    load = asyncio.ensure_future(producer())
    try:
        await asyncio.wait_for(loaded.wait(), 30)
        history = await asyncio.wait_for(store.load_history("ready"), 10)
        assert [e.trace_id for e in history] == ["ready"]
        assert not load.done()  # returned while the producer still ran
    finally:
        stop.set()
        await load
        await store.close()


def test_a_store_never_closed_says_what_the_ending_loop_lost(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # asyncio.run() ended with events still buffered and no close(): they were lost
    # with no count and no log line.
    store = SQLiteStateStore(tmp_path / "t.db", flush_interval_s=3600.0)

    async def forgetful() -> None:
        await store.save_events([event("t", 1)])
        await store.flush()
        await store.save_events([event("t", i) for i in range(2, 52)])  # then returns

    with caplog.at_level(logging.ERROR, logger="penguiflow_exporters"):
        asyncio.run(forgetful())
    assert store.failures["abandoned"] == 50 and store.failures["events_lost"] == 50
    (line,) = [r for r in caplog.records if r.getMessage() == "state_store_not_closed"]
    assert line.__dict__["events_not_stored"] == 50 and "close()" in line.__dict__["hint"]


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_a_write_cut_off_by_the_ending_loop_is_counted_lost_and_not_stored(
        tmp_path: Path, writer: str) -> None:
    # The loop ended while a batch was being written: the write was cancelled (and
    # rolled back), but its events had already left pending_events, so they were
    # neither stored nor counted (0 of 300 lost).
    held: list[_HungDatabase] = []
    stores: list[SQLiteStateStore] = []

    async def forgetful() -> None:
        store, hung = await _hung_store(tmp_path / "t.db", writer=writer)
        stores.append(store)
        held.append(hung)
        await store.save_events([event("stuck", i) for i in range(1, 301)])
        deadline = time.monotonic() + 15
        while store._processor._taken < 300:  # the batch is in the writer's hands
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        # ... and returns, never closing the store

    try:
        asyncio.run(forgetful())
    finally:
        for hung in held:
            hung.release()
    (store,) = stores
    assert store.failures["abandoned"] == 300 and store.failures["events_lost"] == 300
    assert asyncio.run(_stored(tmp_path / "t.db", "stuck")) == 0  # not also stored
    # A close() in a later loop finds nothing more to count (it counted them again).
    asyncio.run(store.close())
    assert store.failures["events_lost"] == 300 and store.pending_events == 0


# Events a test saves while close() runs, at most: a few thousand are written within
# close's time even on a slow machine (a producer that never stops saves faster than
# a writer writes: then close rightly gives up what it could not write in time).
_DURING_CLOSE = 3000


class _OnceRefusing:
    """The store's real writer, until its processor refuses new events (the second
    flush of a close): then a write hangs (``hang``) or fails once as unavailable."""

    def __init__(self, inner: Any, store: Any, hang: bool) -> None:
        self.inner, self.store, self.hang = inner, store, hang
        self.entered = asyncio.Event()
        self.failed = 0

    async def write(self, items: Any) -> Any:
        if self.store._processor._refusing:
            self.entered.set()
            if self.hang:
                await asyncio.Event().wait()
            elif not self.failed:
                self.failed += 1
                raise StoreUnavailable("the connection was reset")
        return await self.inner.write(items)

    async def close(self) -> None:
        await self.inner.close()


def _refusing_store(path: Path, hang: bool) -> Any:
    class Store(SQLiteStateStore):
        def _make_writer(self) -> Any:
            inner = super()._make_writer()
            self.wrapped.inner = inner  # (built when the first write needs it)
            return self.wrapped

    store = Store(path, writer="thread")
    store.wrapped = _OnceRefusing(None, store, hang)
    return store


async def _save_during_close(store: SQLiteStateStore) -> tuple[asyncio.Future[None], list[int]]:
    """Save 1,000 events, then start a task saving more (until the store refuses)."""
    await store.save_events([event("before", i) for i in range(1, 1001)])
    saved = [1000]

    async def producer() -> None:
        with contextlib.suppress(StoreUnavailable):
            while saved[0] < 1000 + _DURING_CLOSE:
                await store.save_event(event("during", 2000 + saved[0]))
                saved[0] += 1
                await asyncio.sleep(0)

    task = asyncio.ensure_future(producer())
    await asyncio.sleep(0)
    return task, saved


async def _stored(path: Path, *traces: str) -> int:
    async with SQLiteStateStore(path, readonly=True) as reader:
        return sum([len(await reader.load_history(t)) for t in traces])


def test_a_close_cut_short_by_the_ending_loop_counts_what_it_had_not_written(
        tmp_path: Path) -> None:
    # The loop ended while close() wrote the events saved during its first flush:
    # the writer task took the close as counting them, the close was cancelled
    # before it did: 2,226 of 3,233 neither stored nor counted (in a review).
    store = _refusing_store(tmp_path / "t.db", hang=True)
    accepted: list[int] = []

    async def main() -> None:
        producer, saved = await _save_during_close(store)
        closing = asyncio.ensure_future(store.close())
        await asyncio.wait_for(store.wrapped.entered.wait(), 10)  # the second flush hangs
        await producer
        accepted.append(saved[0])
        assert not closing.done()  # and the loop ends under it

    asyncio.run(main())
    (saved,) = accepted
    lost = store.failures["events_lost"]
    assert saved > 1000 and lost > 0
    assert asyncio.run(_stored(tmp_path / "t.db", "before", "during")) + lost == saved


async def test_close_retries_a_write_of_the_events_saved_during_it(tmp_path: Path) -> None:
    # Those events were written with retries off (the processor already "closed"):
    # one reset connection lost a batch with most of the close's time left.
    store = _refusing_store(tmp_path / "t.db", hang=False)
    producer, saved = await _save_during_close(store)
    await store.close()
    await producer
    assert store.wrapped.failed == 1 and store.failures["retried"] == 1
    assert store.failures["events_lost"] == 0
    assert await _stored(tmp_path / "t.db", "before", "during") == saved[0]


async def test_events_saved_while_close_writes_are_stored_or_counted(tmp_path: Path) -> None:
    # close() flushed what was there when it was called, then cleared the buffer:
    # events a concurrent task saved meanwhile were neither stored nor counted.
    store = SQLiteStateStore(tmp_path / "t.db")
    producer, saved = await _save_during_close(store)
    await store.close()
    await producer
    during = await _stored(tmp_path / "t.db", "during")
    assert await _stored(tmp_path / "t.db", "before") == 1000 and saved[0] > 1000
    assert 1000 + during + store.failures["events_lost"] == saved[0]
    assert store.failures["events_lost"] == 0  # nothing hung: all of them written


def test_a_store_whose_event_loop_ended_refuses_the_next_one_plainly(tmp_path: Path) -> None:
    # Reused in a second asyncio.run(), the store took events onto a writer task of
    # the ended loop: never written, never counted, and close() raised
    # "Event loop is closed".
    store = SQLiteStateStore(tmp_path / "t.db", writer="thread")

    async def first() -> None:
        await store.save_events([event("one", i) for i in range(10)])
        await store.flush()

    async def second() -> None:
        try:
            with pytest.raises(StoreUnavailable, match="event loop that ended without close"):
                await store.save_events([event("two", i) for i in range(10, 20)])
        finally:
            await store.close()

    asyncio.run(first())
    asyncio.run(second())
    assert store.failures["events_lost"] == 0  # nothing was taken and then lost


async def test_a_close_cancelled_by_its_caller_still_finishes(tmp_path: Path) -> None:
    store, hung = await _hung_store(tmp_path / "t.db")
    try:
        await store.save_events([event("stuck", i) for i in range(1, 301)])
        await asyncio.sleep(0)  # the writer process takes its batch
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(store.close(), 0.1)  # the caller gives up
        # The shutdown goes on by itself: the events are counted, the writer
        # process ends (before: neither, and the child lived on). Polled: nothing
        # of it is awaitable from here.
        deadline = time.monotonic() + 15
        while store.failures["abandoned"] != 300 or _writer_children():
            assert time.monotonic() < deadline, (dict(store.failures), _writer_children())
            await asyncio.sleep(0.05)
    finally:
        hung.release()
    assert store.failures["events_lost"] == 300


async def test_a_flush_waiting_when_close_times_out_returns(tmp_path: Path) -> None:
    store, hung = await _hung_store(tmp_path / "t.db")
    try:
        await store.save_events([event("stuck", i) for i in range(1, 11)])
        flushing = asyncio.ensure_future(store.flush())
        await asyncio.sleep(0)
        await store.close()
        await asyncio.wait_for(flushing, 5)  # before: it waited for ever
    finally:
        hung.release()


async def test_closing_a_store_under_a_flow_waiting_for_room_does_not_fail_the_flow(
        tmp_path: Path) -> None:
    store, hung = await _hung_store(tmp_path / "t.db", max_batch=1, max_buffer=2)
    flow = chain(store)
    flow.run()
    try:
        await flow.emit(Message(payload=1, headers=Headers(tenant="t")))
        # The buffer is full and the writer hangs: the nodes wait for room.
        deadline = time.monotonic() + 10
        while store.pending_events < 3:  # 2 buffered or in flight + 1 waiting: polled
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        await store.close()
        out = await asyncio.wait_for(flow.fetch(), 10)
        assert out.payload == 4
    finally:
        hung.release()
        await flow.stop()
    assert store.failures["events_lost"] >= 1
    # Before: the waiting node got StoreUnavailable, which cost its worker the item
    # it was processing (counted as a worker error).
    assert "worker_error" not in flow.observer_failures


async def test_loss_markers_are_not_counted_as_lost_events(tmp_path: Path) -> None:
    store, hung = await _hung_store(tmp_path / "t.db", on_full="drop", max_batch=2,
                                    max_buffer=2)
    try:
        for i in range(1, 4):  # no await suspends: the third finds the buffer full
            await store.save_event(event("t", i))
        await asyncio.sleep(0.05)  # the writer takes the two, with the drop's marker
        await store.close()
    finally:
        hung.release()
    assert store.failures["dropped"] == 1
    # 1 dropped + 2 left at the close; before: 4, the marker counted as an event.
    assert store.failures["abandoned"] == 2 and store.failures["events_lost"] == 3


async def test_events_lost_while_a_batch_is_split_are_not_counted_again(
        tmp_path: Path) -> None:
    path = tmp_path / "foreign.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE other (x)")
    conn.commit()
    conn.close()
    store = SQLiteStateStore(path, writer="thread", close_timeout_s=0.5)
    await store.save_events([event("t", i) for i in range(2000)])
    await store.close()
    # Every write is refused (a foreign file): the batch is split, part of it counted
    # lost, then the close times out. Before: those parts were counted again.
    assert store.failures["events_lost"] == 2000


async def test_a_store_that_refuses_every_write_fails_a_batch_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "foreign.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE other (x)")
    conn.commit()
    conn.close()
    before = sha256(path)
    store = SQLiteStateStore(path, writer="thread", max_batch=2000)
    with caplog.at_level(logging.ERROR, logger="penguiflow_exporters"):
        await store.save_events([event("t", i) for i in range(2000)])
        await store.flush()
    # Before: split down to single events, ~4,000 attempts and 2,001 error lines.
    assert store.failures["write_failed"] <= 2  # the batch, and its loss marker's
    assert store.failures["events_lost"] == 2000
    failed = [r for r in caplog.records if r.getMessage() == "state_store_write_failed"]
    assert 1 <= len(failed) <= 2
    assert "penguiflow" in failed[0].error  # type: ignore[attr-defined]  # says why
    await store.close()
    assert sha256(path) == before


class _AnswerLostOnce:
    """The real writer; the first batch carrying a loss marker is committed, then its
    answer is lost (a connection dropped after COMMIT): the processor retries it."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.lost = inner, False

    async def write(self, items: Any) -> Any:
        result = await self.inner.write(items)
        if not self.lost and any(getattr(i, "kind", None) == "store_events_lost"
                                 for i in items):
            self.lost = True
            raise StoreUnavailable("the connection dropped after COMMIT")
        return result

    async def close(self) -> None:
        await self.inner.close()


class _AnswerLostStore(SQLiteStateStore):
    def _make_writer(self) -> Any:
        return _AnswerLostOnce(super()._make_writer())


async def test_a_loss_marker_retried_after_its_commit_is_stored_once(tmp_path: Path) -> None:
    store = _AnswerLostStore(tmp_path / "t.db", writer="thread", on_full="drop",
                             max_batch=2, max_buffer=2)
    async with store:
        for i in range(1, 4):  # the third is dropped: the trace gets a marker
            await store.save_event(event("t", i))
        await store.flush()
        for i in range(4, 6):
            await store.save_event(event("t", i))
        await store.flush()
        history = await store.load_history("t")
        assert store.failures["retried"] == 1 and store.failures["dropped"] == 1
    markers = [e for e in history if e.kind == "store_events_lost"]
    # Before: the retry stored the marker again (the events were skipped as stored).
    assert len(markers) == 1 and markers[0].payload["events_lost"] == 1
    assert len(history) == 5


@pytest.mark.parametrize("bad_ts", [float("inf"), 1004])
async def test_a_lost_event_gives_its_trace_a_marker_at_its_own_time(
        tmp_path: Path, bad_ts: float) -> None:
    # ts=inf: refused (rightly), and its marker, stamped inf too, refused and not even
    # counted: the trace showed "running" with nothing lost. An int ts (valid) that is
    # lost for another reason: the marker took the time it was made, so the trace
    # lasted from 1000 to now.
    async with SQLiteStateStore(tmp_path / "t.db", writer="thread") as store:
        lost = StoredEvent("t", bad_ts, "node_start", "bad\x00node" if bad_ts == 1004 else "a",
                           None, {}, flow_id="f", seq=2)
        await store.save_events([event("t", 1, flow="f"), lost, event("t", 3, flow="f")])
        await store.flush()
        summary = await store.get_trace("t")
        assert summary is not None
        assert (summary.status, summary.events_lost) == ("incomplete", 1)
        (marker,) = [e for e in await store.load_history("t") if e.kind == "store_events_lost"]
        if bad_ts == 1004:
            assert marker.ts == 1004.0
        else:  # no time of its own to give: the marker's is when it was made
            assert math.isfinite(marker.ts)
    assert store.failures["events_lost"] == 1 and "markers_lost" not in store.failures


async def test_close_is_bounded_while_a_query_waits_on_a_lock_held_elsewhere(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # close() waited for the store's reading thread without a bound: a query waiting
    # on another connection's write lock held it for the whole busy_timeout (5 s).
    entered = threading.Event()

    class Watched(SQLiteStateStore):
        def _save_binding_sync(self, binding: Any) -> None:
            entered.set()
            super()._save_binding_sync(binding)

    path = tmp_path / "t.db"
    store = Watched(path, writer="thread", close_timeout_s=0.5)
    await store.save_event(event("t0", 1))
    await store.flush()
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    binding = asyncio.ensure_future(store.save_remote_binding(
        RemoteBinding("t0", "ctx", "task", "http://agent")))
    try:
        assert await asyncio.to_thread(entered.wait, 10)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await store.close()
        assert loop.time() - started < 1.5  # before: ~5 s (the busy timeout)
        assert "state_store_close_timeout" in caplog.text
    finally:
        other.execute("ROLLBACK")
        other.close()
        with contextlib.suppress(Exception):
            await binding
