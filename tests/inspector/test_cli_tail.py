"""``pf tail`` in one process sees events another process's flow stores.

``pf tail`` runs as a real subprocess; this test process runs a flow that
records into the same store. Nothing sleeps to synchronise: the test waits
for tail's "following" line on stderr (printed once it has read what is
already there), then for the expected JSON lines, each with a deadline.
SQLite is polled (its ``follow`` is in-process); Postgres pushes (LISTEN/NOTIFY).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TextIO

import pytest
from inspector_support import FollowingStderr

from penguiflow import Headers, Message, Node, NodePolicy, create
from penguiflow.state import StoredEvent
from penguiflow_exporters import open_store
from penguiflow_inspector.cli import tail

DEADLINE_S = 30.0


class Tail:
    """A ``pf tail`` subprocess whose output lines arrive on queues."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "penguiflow_inspector.cli", "tail", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.out: queue.Queue[str] = queue.Queue()
        self.err: queue.Queue[str] = queue.Queue()
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.pumps = [threading.Thread(target=self._pump, args=(stream, sink), daemon=True)
                      for stream, sink in ((self.proc.stdout, self.out),
                                           (self.proc.stderr, self.err))]
        for pump in self.pumps:
            pump.start()

    @staticmethod
    def _pump(stream: TextIO, sink: queue.Queue[str]) -> None:
        for line in stream:
            sink.put(line)

    def wait_following(self) -> None:
        line = self.err.get(timeout=DEADLINE_S)
        assert "following" in line, line

    def events_until(self, done: Any) -> list[dict[str, Any]]:
        """JSON lines until ``done(event)`` is true (or fail at the deadline)."""
        seen: list[dict[str, Any]] = []
        deadline = time.monotonic() + DEADLINE_S
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"pf tail did not show it; saw {seen}"
            event = json.loads(self.out.get(timeout=remaining))
            seen.append(event)
            if done(event):
                return seen

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            return self.proc.wait(timeout=DEADLINE_S)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(timeout=DEADLINE_S)
            for pump in self.pumps:  # they end at EOF, now that the process has
                pump.join(timeout=DEADLINE_S)
            for stream in (self.proc.stdout, self.proc.stderr):
                if stream is not None:
                    stream.close()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/traces.db"


async def _run_flow(url: str, trace_id: str) -> None:
    async def work(msg: Message, ctx: Any) -> Message:
        return msg

    async with open_store(url) as store:
        node = Node(work, name="work", policy=NodePolicy(validate="none"))
        flow = create(node.to(), state_store=store, name="tailed")
        flow.run()
        try:
            await flow.emit(Message(payload=1, headers=Headers(tenant="t"), trace_id=trace_id))
            await asyncio.wait_for(flow.fetch(), DEADLINE_S)
        finally:
            await flow.stop()


async def _seed(url: str, trace_id: str) -> None:
    async with open_store(url) as store:
        await store.save_events([StoredEvent(trace_id, time.time(), "node_start", "seed",
                                             "seed", {}, invocation_id="1" * 16,
                                             flow_id=f"seed-{trace_id}", seq=1)])


def _tail_every_trace(url: str) -> None:
    asyncio.run(_seed(url, uuid.uuid4().hex))  # the store exists, with an older trace
    tail = Tail("--json", "--store", url)
    try:
        tail.wait_following()
        trace_id = uuid.uuid4().hex
        asyncio.run(_run_flow(url, trace_id))
        seen = tail.events_until(lambda e: e["kind"] == "node_success")
    finally:
        code = tail.stop()
    assert [(e["trace_id"], e["kind"]) for e in seen] == [(trace_id, "node_start"),
                                                          (trace_id, "node_success")]
    assert seen[0]["flow_name"] == "tailed" and seen[0]["node_name"] == "work"
    assert code == 0


def _tail_one_trace(url: str) -> None:
    trace_id = uuid.uuid4().hex
    asyncio.run(_seed(url, trace_id))
    tail = Tail(trace_id[:10], "--json", "--store", url)
    try:
        (history,) = tail.events_until(lambda e: True)
        assert (history["trace_id"], history["node_name"]) == (trace_id, "seed")
        tail.wait_following()
        asyncio.run(_run_flow(url, uuid.uuid4().hex))  # another trace: not shown
        asyncio.run(_run_flow(url, trace_id))  # the same trace, from another flow
        seen = tail.events_until(lambda e: e["kind"] == "node_success")
    finally:
        code = tail.stop()
    assert [(e["trace_id"], e["node_name"], e["kind"]) for e in seen] == [
        (trace_id, "work", "node_start"), (trace_id, "work", "node_success")]
    assert code == 0


def test_tail_sqlite_every_trace(sqlite_url: str) -> None:
    _tail_every_trace(sqlite_url)


def test_tail_sqlite_one_trace_history_first(sqlite_url: str) -> None:
    _tail_one_trace(sqlite_url)


def test_tail_postgres_every_trace(pg_database: str) -> None:
    _tail_every_trace(pg_database)


def test_tail_postgres_one_trace_history_first(pg_database: str) -> None:
    _tail_one_trace(pg_database)


def test_tail_plain_lines(sqlite_url: str) -> None:
    trace_id = uuid.uuid4().hex
    asyncio.run(_seed(sqlite_url, trace_id))
    tail = Tail(trace_id, "--plain", "--store", sqlite_url)
    try:
        line = tail.out.get(timeout=DEADLINE_S)
    finally:
        tail.stop()
    assert trace_id[:12] in line and "node_start" in line and "seed" in line


async def _run_held_flow(url: str, trace_id: str, started: threading.Event,
                         release: threading.Event) -> None:
    """A flow whose one node waits for ``release``; ``started`` is set once its
    node_start is stored (flushed), so a reader in another process can see the trace."""
    async with open_store(url) as store:
        async def held(msg: Message, ctx: Any) -> Message:
            await store.flush()
            started.set()
            await asyncio.to_thread(release.wait, DEADLINE_S)
            return msg

        flow = create(Node(held, name="held", policy=NodePolicy(validate="none")).to(),
                      state_store=store, name="tailed")
        flow.run()
        try:
            await flow.emit(Message(payload=1, headers=Headers(tenant="t"), trace_id=trace_id))
            await asyncio.wait_for(flow.fetch(), DEADLINE_S)
        finally:
            await flow.stop()


def test_tail_of_one_trace_exits_when_it_ends(sqlite_url: str) -> None:
    trace_id = uuid.uuid4().hex
    started, release = threading.Event(), threading.Event()
    runner = threading.Thread(target=lambda: asyncio.run(
        _run_held_flow(sqlite_url, trace_id, started, release)), daemon=True)
    runner.start()
    tail: Tail | None = None
    try:
        assert started.wait(DEADLINE_S)
        tail = Tail(trace_id[:12], "--plain", "--store", sqlite_url)
        tail.wait_following()  # it has read the running trace's history
        release.set()  # the node returns: the trace succeeds
        code = tail.proc.wait(timeout=DEADLINE_S)  # no Ctrl-C: it ends by itself
        for pump in tail.pumps:
            pump.join(timeout=DEADLINE_S)
        out = "".join(tail.out.queue)
        last = "".join(tail.err.queue).strip().splitlines()[-1]
    finally:
        release.set()
        runner.join(timeout=DEADLINE_S)
        if tail is not None:
            tail.stop()
    assert code == 0
    assert "node_success" in out and "held" in out
    assert last.startswith(f"pf tail: trace {trace_id} ended: succeeded after ")
    assert last.endswith(" events")


def test_tail_of_every_trace_does_not_exit_when_one_ends(sqlite_url: str) -> None:
    asyncio.run(_seed(sqlite_url, uuid.uuid4().hex))
    tail = Tail("--json", "--store", sqlite_url)
    try:
        tail.wait_following()
        asyncio.run(_run_flow(sqlite_url, uuid.uuid4().hex))  # a whole trace, ended
        tail.events_until(lambda e: e["kind"] == "node_success")
        assert tail.proc.poll() is None  # still following
    finally:
        code = tail.stop()
    assert code == 0


# -- a big trace: each poll reads only what is new -------------------------------------------


def _event(trace_id: str, seq: int) -> StoredEvent:
    return StoredEvent(trace_id, 1.7e9 + seq, "node_start", "n", "n", {},
                       invocation_id=f"{seq:016x}", flow_id="f", seq=seq)


async def _tail_appended(url: str, trace_id: str | None, appended: list[StoredEvent],
                         expected: int) -> list[StoredEvent]:
    """Run ``tail`` in-process, append ``appended`` (one commit each) once it follows,
    and return what it showed once it has shown ``expected`` events."""
    shown: list[StoredEvent] = []
    enough = asyncio.Event()

    def show(event: StoredEvent) -> None:
        shown.append(event)
        if len(shown) >= expected:
            enough.set()

    err = FollowingStderr()
    task = asyncio.create_task(tail(url, trace_id, show, err, interval_s=0.01))
    try:
        await asyncio.wait_for(err.following.wait(), DEADLINE_S)
        async with open_store(url) as writer:
            for event in appended:
                await writer.save_event(event)
                await writer.flush()
        await asyncio.wait_for(enough.wait(), DEADLINE_S)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return shown


def test_tail_reads_only_the_new_events_of_a_big_trace(
        sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Re-reading the whole history on each poll cost 76% of a core on a 150k-event trace.
    from penguiflow_exporters import sqlite as sqlite_store

    big = 20_000

    async def seed() -> None:
        async with open_store(sqlite_url) as store:
            await store.save_events([_event("big", seq) for seq in range(1, big + 1)])

    asyncio.run(seed())
    built: list[int] = []  # events the reader's store built from the file, per call

    appended = [_event("big", seq) for seq in range(big + 1, big + 4)]
    with monkeypatch.context() as patch:
        # The real decoder, counted: only the reader built events while patched.
        events_of = sqlite_store.events_of
        patch.setattr(sqlite_store, "events_of",
                      lambda items: built.append(len(items)) or events_of(items))
        shown = asyncio.run(_tail_appended(sqlite_url, None, appended, expected=3))
    assert [e.seq for e in shown] == [big + 1, big + 2, big + 3]
    assert sum(built) == 3, f"tail built {sum(built)} events to show 3"


def test_tail_shows_a_long_history_page_by_page_then_the_new_events(
        sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from penguiflow_inspector import cli

    monkeypatch.setattr(cli, "TAIL_PAGE", 7)  # 25 stored events: four pages, the last short

    async def seed() -> None:
        async with open_store(sqlite_url) as store:
            await store.save_events([_event("long", seq) for seq in range(1, 26)])

    asyncio.run(seed())
    appended = [_event("long", seq) for seq in range(26, 29)]
    shown = asyncio.run(_tail_appended(sqlite_url, "long", appended, expected=28))
    assert [e.seq for e in shown] == list(range(1, 29))


def _tail_across(url: str, away: Callable[[Path], Awaitable[None]]
                 ) -> tuple[list[StoredEvent], str]:
    """Run ``tail`` (every trace) on the SQLite store ``url`` holding one trace; once it
    follows, let ``away`` take the file away, check that tail is still running, store a
    trace "new" in a new file there; return what tail showed, and its stderr."""
    path = Path(url.removeprefix("sqlite:///"))

    async def scenario() -> tuple[list[StoredEvent], str]:
        async with open_store(url) as store:
            await store.save_events([_event("old", 1)])
        shown: list[StoredEvent] = []
        arrived = asyncio.Event()

        def show(event: StoredEvent) -> None:
            shown.append(event)
            arrived.set()

        err = FollowingStderr()
        task = asyncio.create_task(tail(url, None, show, err, interval_s=0.01))
        try:
            await asyncio.wait_for(err.following.wait(), DEADLINE_S)
            await away(path)
            await asyncio.sleep(0.1)  # polls that find no store there (time must pass)
            assert not task.done()
            await asyncio.to_thread(path.unlink, missing_ok=True)
            async with open_store(url) as store:
                await store.save_events([_event("new", 1)])
            await asyncio.wait_for(arrived.wait(), DEADLINE_S)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return shown, err.getvalue()

    return asyncio.run(scenario())


def test_tail_waits_out_a_store_file_away_for_a_moment(sqlite_url: str) -> None:
    # A poll that found no file (a rotation, a replace in two steps) ended pf tail.
    async def deleted(path: Path) -> None:
        for suffix in ("", "-wal", "-shm"):
            await asyncio.to_thread(path.with_name(path.name + suffix).unlink, missing_ok=True)

    shown, err = _tail_across(sqlite_url, deleted)
    assert [e.trace_id for e in shown] == ["new"]
    assert "trying again" in err


def test_tail_follows_a_store_file_rotated_under_it(sqlite_url: str) -> None:
    # Renamed away and made anew between two polls: the reader found another file,
    # empty a moment, and took it for "not a trace store", ending pf tail.
    async def rotated(path: Path) -> None:
        await asyncio.to_thread(path.rename, path.with_name(path.name + ".1"))
        await asyncio.to_thread(path.touch)  # the new file, empty for a moment

    shown, _ = _tail_across(sqlite_url, rotated)
    assert [e.trace_id for e in shown] == ["new"]


def test_tail_reads_a_replaced_store_file_from_its_start(sqlite_url: str,
                                                        tmp_path: Path) -> None:
    # A log rotation that carries on a running trace in the new file: its events
    # there start again at position 0. Counting the old file's 3 events as shown,
    # tail skipped the new file's first 3 and said the trace ended with 3 events.
    path = Path(sqlite_url.removeprefix("sqlite:///"))
    trace_id = "7" * 32

    def stored(kind: str, node: str, seq: int) -> StoredEvent:
        return StoredEvent(trace_id, 1.7e9 + seq, kind, node, node, {},
                           invocation_id=f"{node}{node}", flow_id="f", seq=seq)

    async def scenario() -> list[str]:
        async with open_store(sqlite_url) as store:  # the old file: b still runs
            await store.save_events([stored("node_start", "a", 1),
                                     stored("node_success", "a", 2),
                                     stored("node_start", "b", 3)])
        shown: list[str] = []
        three = asyncio.Event()

        def show(event: StoredEvent) -> None:
            shown.append(f"{event.kind} {event.node_name}")
            if len(shown) == 3:
                three.set()

        err = FollowingStderr()
        task = asyncio.create_task(tail(sqlite_url, trace_id, show, err, interval_s=0.01))
        try:
            await asyncio.wait_for(three.wait(), DEADLINE_S)
            new = tmp_path / "new.db"
            async with open_store(f"sqlite:///{new}") as store:  # the rest, rotated in
                await store.save_events([stored("node_success", "b", 4),
                                         stored("node_start", "c", 5),
                                         stored("node_success", "c", 6)])
            await asyncio.to_thread(new.replace, path)
            await asyncio.wait_for(task, DEADLINE_S)  # it ends by itself: the trace ended
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert "ended" in err.getvalue()
        return shown

    assert asyncio.run(scenario()) == [
        "node_start a", "node_success a", "node_start b",
        "node_success b", "node_start c", "node_success c"]


def test_tail_into_a_closed_pipe_ends_quietly(sqlite_url: str) -> None:
    # `pf tail ID | head -1`: the reader goes; before, "cannot reach the trace
    # store ...: Broken pipe" and exit 1, as if the store had failed.
    trace_id = "e" * 32

    async def record() -> None:
        async with open_store(sqlite_url) as store:
            await store.save_events([_event(trace_id, seq) for seq in range(1, 3001)])

    asyncio.run(record())
    proc = subprocess.Popen([sys.executable, "-m", "penguiflow_inspector.cli", "tail",
                             trace_id, "--store", sqlite_url],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline()  # one line, then the reader is gone
    proc.stdout.close()
    try:
        err = proc.stderr.read()
        assert proc.wait(timeout=DEADLINE_S) == 0
    finally:
        proc.stderr.close()
        if proc.poll() is None:
            proc.kill()
    assert "Broken pipe" not in err and "cannot reach" not in err and "Traceback" not in err


def test_tail_of_every_trace_passes_over_a_trace_it_cannot_read(sqlite_url: str) -> None:
    # A new trace with a corrupt block ended the whole tail with exit 1; it is said
    # once on stderr and passed over, and the other traces are still followed.
    asyncio.run(_seed(sqlite_url, uuid.uuid4().hex))
    path = sqlite_url.removeprefix("sqlite:///")
    shown: list[StoredEvent] = []
    err = FollowingStderr()

    async def run() -> None:
        good = asyncio.Event()

        def show(event: StoredEvent) -> None:
            shown.append(event)
            if event.trace_id == "good":
                good.set()

        task = asyncio.create_task(tail(sqlite_url, None, show, err, interval_s=0.01))
        try:
            await asyncio.wait_for(err.following.wait(), DEADLINE_S)
            with sqlite3.connect(path) as conn:  # a summary and its block, one commit
                conn.execute(
                    "INSERT INTO traces (key, trace_id, flow_name, status, started_ts, "
                    "ended_ts, node_count, error_count, remote_call_count, event_count, "
                    "nodes, open_count, failed, cancelled, events_lost) VALUES "
                    "(9999, 'bad', 'f', 'running', 1.7e9, 1.7e9, 1, 0, 0, 1, '[\"n\"]', 1, "
                    "0, 0, 0)")
                conn.execute("INSERT INTO blocks (trace_key, first, n, ts_lo, ts_hi, data) "
                             "VALUES (9999, 0, 1, 1.7e9, 1.7e9, '{garbage')")
            async with open_store(sqlite_url) as writer:
                await writer.save_event(_event("good", 1))
            await asyncio.wait_for(good.wait(), DEADLINE_S)
            assert not task.done()  # still following
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    asyncio.run(run())
    assert [e.trace_id for e in shown] == ["good"]
    assert "pf tail: trace bad skipped: " in err.getvalue()
    assert "corrupt event block" in err.getvalue()
