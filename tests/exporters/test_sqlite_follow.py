"""A read-only SQLite store follows what another process writes to the file.

SQLite has no cross-process notification: a read-only store's ``follow()`` reads
the file every ``FOLLOW_POLL_S`` for the blocks committed since its last look.
The writer here is a real second process (``WRITER``), driven line by line over
its stdin: each line is one event saved and flushed, acknowledged on stdout.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from penguiflow.state import StateStoreError, StoredEvent, StoreUnavailable
from penguiflow_exporters import open_store
from penguiflow_exporters.sqlite import FOLLOW_POLL_S, SQLiteStateStore

#: Saves one event per stdin line ``<trace_id> <kind> <seq>`` and prints ``ok <seq>``
#: once it is committed.
WRITER = """
import asyncio, sys
from penguiflow.state import StoredEvent
from penguiflow_exporters.sqlite import SQLiteStateStore

async def main():
    async with SQLiteStateStore(sys.argv[1], writer="thread") as store:
        print("ready", flush=True)
        while line := await asyncio.to_thread(sys.stdin.readline):
            trace_id, kind, seq = line.split()
            ts = 1_700_000_000.0 + int(seq)
            await store.save_event(StoredEvent(
                trace_id, ts, kind, "n", "n-id", {"event": kind, "ts": ts}, seq=int(seq),
                flow_id="writer", flow_name="follow-test"))
            await store.flush()
            print("ok", seq, flush=True)

asyncio.run(main())
"""


class Writer:
    """The writing process."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.seq = 0

    async def write(self, trace_id: str, kind: str = "node_start") -> int:
        """Save one event in the other process; return its seq once it is committed."""
        self.seq += 1
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{trace_id} {kind} {self.seq}\n".encode())
        await self.proc.stdin.drain()
        line = await asyncio.wait_for(self.proc.stdout.readline(), 30)
        assert line.split() == [b"ok", str(self.seq).encode()], line
        return self.seq


@contextlib.asynccontextmanager
async def writer(path: Path) -> AsyncIterator[Writer]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WRITER, str(path),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readline(), 30) == b"ready\n"
        yield Writer(proc)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        await asyncio.wait_for(proc.wait(), 30)


class Follower:
    """Consumes ``store.follow(trace_id)`` in a task; wakes waiters on each event."""

    def __init__(self, store: SQLiteStateStore, trace_id: str | None) -> None:
        self.events: list[StoredEvent] = []
        self.changed = asyncio.Event()
        self.agen = store.follow(trace_id)
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        try:
            async for event in self.agen:
                self.events.append(event)
                self.changed.set()
        finally:
            self.changed.set()  # ended or failed: wake the waiter to say so

    async def until(self, predicate: object, timeout: float) -> float:
        """Wait until ``predicate(events)``; return the seconds it took."""
        t0 = time.monotonic()

        async def wait() -> None:
            while not predicate(self.events):  # type: ignore[operator]
                if self.task.done():
                    self.task.result()
                    raise AssertionError(f"follow() ended early after {self.events!r}")
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(wait(), timeout)
        return time.monotonic() - t0

    async def aclose(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.agen.aclose()


async def subscribed(follower: Follower, w: Writer, trace_id: str) -> None:
    """Write probe events of ``trace_id`` until the follower yields one (its start
    is a read in a thread: until then it may not have marked where it starts)."""
    for _ in range(50):
        seq = await w.write(trace_id, "probe")
        with contextlib.suppress(TimeoutError):
            await follower.until(lambda evs, s=seq: any(e.seq == s for e in evs), 4 * FOLLOW_POLL_S)
            return
    raise AssertionError("follow() never yielded a probe event")


async def reader(path: Path) -> SQLiteStateStore:
    store = open_store(f"sqlite:///{path}", readonly=True)
    assert isinstance(store, SQLiteStateStore)
    await store.open()
    return store


@pytest.fixture
async def db(tmp_path: Path) -> Path:
    path = tmp_path / "traces.db"
    async with SQLiteStateStore(path, writer="thread") as store:  # a store to read
        await store.save_event(StoredEvent("old", 1.0, "node_start", "n", "n-id", {},
                                           seq=1, flow_id="old-flow"))
    return path


async def test_a_readonly_store_follows_a_trace_another_process_writes(db: Path) -> None:
    store = await reader(db)
    async with writer(db) as w:
        one, every = Follower(store, "live"), Follower(store, None)
        try:
            await subscribed(one, w, "live")
            await subscribed(every, w, "live")
            seqs = [await w.write("live"), await w.write("other"), await w.write("live", "x")]
            took = await one.until(lambda evs: any(e.seq == seqs[-1] for e in evs), 5)
            assert took < 1.0  # well within a second of the commit
            await every.until(lambda evs: any(e.seq == seqs[-1] for e in evs), 5)
            history = [e for e in await store.load_history("live") if e.kind != "probe"]
        finally:
            await one.aclose()
            await every.aclose()
        # Once each, in order, exactly as stored; only the followed trace's.
        assert [e for e in one.events if e.kind != "probe"] == history
        assert [(e.trace_id, e.seq) for e in every.events if e.kind != "probe"] == [
            ("live", seqs[0]), ("other", seqs[1]), ("live", seqs[2])]
    await store.close()


def on_disk(path: Path) -> tuple[str, list[str]]:
    """The file's digest and the names beside it (-wal, -shm, -journal...)."""
    return (hashlib.sha256(path.read_bytes()).hexdigest(),
            sorted(p.name for p in path.parent.iterdir()))


def replace_with_garbage(path: Path) -> None:
    path.unlink()
    path.write_bytes(b"not a database at all" * 100)


async def test_following_reads_and_never_writes_the_file(db: Path) -> None:
    before = on_disk(db)
    store = await reader(db)
    follower = Follower(store, None)
    # Nothing is written: nothing comes (a few polls' worth), and the file is as it was.
    with pytest.raises(TimeoutError):
        await follower.until(lambda evs: bool(evs), 3 * FOLLOW_POLL_S)
    await follower.aclose()
    await store.close()
    assert on_disk(db) == before


async def test_follow_ends_when_the_readonly_store_closes(db: Path) -> None:
    store = await reader(db)
    follower = Follower(store, "any")
    await asyncio.sleep(0)  # (started; it ends whether or not it has marked its start)
    await store.close()
    await asyncio.wait_for(follower.task, 5)
    assert follower.events == []


async def test_follow_on_a_closed_readonly_store_raises(db: Path) -> None:
    store = await reader(db)
    await store.close()
    agen = store.follow("any")
    with pytest.raises(StoreUnavailable, match="closed"):
        await asyncio.wait_for(anext(agen), 5)
    await agen.aclose()


async def test_follow_reports_a_file_that_stops_being_a_store(db: Path) -> None:
    """The file replaced by something that is not a trace store: follow raises
    (the store's one-line message), it does not spin or yield garbage."""
    store = await reader(db)
    follower = Follower(store, None)
    async with writer(db) as w:
        await subscribed(follower, w, "t")
    replace_with_garbage(db)
    with pytest.raises(StateStoreError):
        await follower.until(lambda evs: False, 5)
    await follower.aclose()
    await store.close()


async def test_following_survives_writers_coming_and_going(db: Path) -> None:
    """One writing process ends, another starts later: the reader follows across both
    (its connection outlives the writers' and reads what the next one commits)."""
    store = await reader(db)
    follower = Follower(store, "t")
    try:
        async with writer(db) as w:
            await subscribed(follower, w, "t")
        async with writer(db) as w:
            w.seq = 1000
            seq = await w.write("t", "after")
            await follower.until(lambda evs: any(e.seq == seq for e in evs), 5)
    finally:
        await follower.aclose()
        await store.close()


async def test_a_follower_reads_a_replaced_file_from_its_start(db: Path) -> None:
    # The follower kept the old file's last block id as its mark: every block of the
    # new file with a smaller id (all of them, for a while) was skipped.
    async def write(trace: str, n: int) -> None:
        async with SQLiteStateStore(db, writer="thread") as store:
            await store.save_events([StoredEvent(trace, 1.0 + i, "node_start", "n", "n", {},
                                                 seq=i, flow_id=trace) for i in range(n)])

    for i in range(10):  # ten blocks in the old file
        await write(f"old{i}", 2)
    store = await reader(db)
    everything = Follower(store, None)
    try:
        for k in range(50):  # probes, until the follower has its mark and reads
            await write(f"old-late{k}", 1)
            with contextlib.suppress(TimeoutError):
                await everything.until(lambda evs: bool(evs), 4 * FOLLOW_POLL_S)
                break
        assert everything.events, "follow() never yielded a probe event"
        for suffix in ("", "-wal", "-shm"):  # the file goes; another takes its place
            await asyncio.to_thread(db.with_name(db.name + suffix).unlink, missing_ok=True)
        for i in range(3):
            await write(f"new{i}", 2)
        await everything.until(lambda evs: sum(e.trace_id.startswith("new") for e in evs) == 6,
                               10)
    finally:
        await everything.aclose()
        await store.close()
