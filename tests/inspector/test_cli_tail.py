"""``pf tail`` in one process sees events another process's flow stores.

``pf tail`` runs as a real subprocess; this test process runs a flow that
records into the same store. Nothing sleeps to synchronise: the test waits
for tail's "following" line on stderr (printed once it has read what is
already there), then for the expected JSON lines, each with a deadline.
SQLite is polled (its ``follow`` is in-process); Postgres pushes (LISTEN/NOTIFY).
"""

from __future__ import annotations

import asyncio
import json
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, TextIO

import pytest

from penguiflow import Headers, Message, Node, NodePolicy, create
from penguiflow.state import StoredEvent
from penguiflow_exporters import open_store

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
