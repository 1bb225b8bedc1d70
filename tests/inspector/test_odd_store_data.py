"""The pf commands on stored data the runtime never writes but a store accepts.

A store checks that ``ts`` is finite; other numbers (``queued_ts``, payload
values) go in as they are, and a writer may record ``ts`` in milliseconds. One
such event must never crash a view of the whole store, and ``--json`` must stay
JSON that every parser reads.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import time
from pathlib import Path
from typing import Any

import pytest

from penguiflow.state import EVENTS_LOST_KIND, StoredEvent
from penguiflow_exporters import open_store
from penguiflow_inspector.cli import main, tail

MS_TRACE = "a" * 31 + "1"
INF_TRACE = "b" * 31 + "2"
NAN_TRACE = "c" * 31 + "3"
FAR_TRACE = "d" * 31 + "4"  # finite times whose difference overflows to infinity


def _event(trace: str, ts: float, kind: str, seq: int, payload: dict[str, object] | None = None,
           **fields: object) -> StoredEvent:
    return StoredEvent(trace, ts, kind, "n", "n", payload or {}, invocation_id="inv-" + trace[:4],
                       flow_id="f", seq=seq, **fields)  # type: ignore[arg-type]


@pytest.fixture
def odd_store(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'odd.db'}"
    now = time.time()

    async def fill() -> None:
        async with open_store(url) as store:
            await store.save_events([
                # A writer that recorded milliseconds: year 58,000 and more.
                _event(MS_TRACE, now * 1000, "node_start", 1),
                _event(MS_TRACE, now * 1000 + 10, "node_success", 2),
                _event(INF_TRACE, now, "node_start", 3, queued_ts=-math.inf),
                _event(INF_TRACE, now + 1, "node_success", 4),
                _event(INF_TRACE, now + 1, "deadline_skip", 5, {"deadline_s": math.inf}),
                _event(NAN_TRACE, now, "node_start", 6, queued_ts=math.nan),
                _event(NAN_TRACE, now + 1, "node_retry", 7, {"sleep_s": math.nan}),
                _event(NAN_TRACE, now + 2, "node_success", 8),
                _event(FAR_TRACE, -1e308, "node_start", 9),
                _event(FAR_TRACE, 1e308, "node_success", 10),
            ])

    asyncio.run(fill())
    return url


@pytest.mark.parametrize("argv", [
    ["traces"], ["inspect", MS_TRACE[:8], "--plain"], ["inspect", INF_TRACE[:8], "--plain"],
    ["export", MS_TRACE[:8]], ["export", INF_TRACE[:8]], ["inspect", NAN_TRACE[:8], "--plain"],
    ["inspect", FAR_TRACE[:8], "--plain"], ["export", FAR_TRACE[:8]]])
def test_odd_times_never_crash_a_command(odd_store: str, argv: list[str],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    # Before: ValueError "year 58901 is out of range" (pf traces: the whole store),
    # OverflowError on an infinite queued_ts or deadline; "cannot convert float NaN
    # to integer" drawing the waterfall of a trace from -1e308 to 1e308.
    assert main([*argv, "--store", odd_store]) == 0
    out = capsys.readouterr().out
    if argv[0] == "traces":
        assert MS_TRACE[:12] in out and "ts=" in out  # the number, not a date
    if argv[0] == "export":
        spans = json.loads(out)["resourceSpans"][0]["scopeSpans"][0]["spans"]
        assert all(0 <= int(s["startTimeUnixNano"]) < 2**63 for s in spans)


@pytest.mark.parametrize("argv", [["inspect", NAN_TRACE[:8], "--json"],
                                  ["inspect", INF_TRACE[:8], "--json"],
                                  ["inspect", FAR_TRACE[:8], "--json"]])
def test_json_output_never_holds_nan_or_infinity(odd_store: str, argv: list[str],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*argv, "--store", odd_store]) == 0
    text = capsys.readouterr().out

    def refuse(token: str) -> None:
        raise AssertionError(f"not JSON: {token}")

    json.loads(text, parse_constant=refuse)  # what jq or JavaScript would refuse


async def test_tail_of_an_incomplete_trace_waits_for_its_open_invocation(
        tmp_path: Path) -> None:
    # A trace whose store lost events reads "incomplete" whether it still runs or
    # not: pf tail took that for "ended" and left before the node finished.
    url = f"sqlite:///{tmp_path / 'tail.db'}"
    trace = "d" * 31 + "4"
    now = time.time()
    async with open_store(url) as store:
        await store.save_events([
            _event(trace, now, "node_start", 1),
            StoredEvent(trace, now, EVENTS_LOST_KIND, None, None,
                        {"events_lost": 2, "reason": "dropped"}, flow_id="lost", seq=1)])
    shown: list[str] = []
    two = asyncio.Event()

    def show(event: StoredEvent) -> None:
        shown.append(event.kind)
        if len(shown) == 2:
            two.set()

    following = asyncio.ensure_future(tail(url, trace, show, io.StringIO(), interval_s=0.02))
    await asyncio.wait_for(two.wait(), 10)
    # Ten polls and more: it must still be following (before, it ended after two).
    await asyncio.sleep(0.3)
    assert not following.done()
    async with open_store(url) as store:
        await store.save_event(_event(trace, now + 1, "node_success", 2))
    await asyncio.wait_for(following, 10)
    assert shown[-1] == "node_success"


def test_export_of_an_empty_store_says_so_like_every_command(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'empty.db'}"

    async def make() -> None:
        async with open_store(url):
            pass

    asyncio.run(make())
    for command in ("inspect", "export"):
        assert main([command, "abc", "--store", url]) == 1  # export said 2, "no trace id"
        assert "holds no traces yet" in capsys.readouterr().err


def test_plain_says_how_many_rows_of_each_list_it_left_out(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'long.db'}"
    trace = "e" * 31 + "5"
    now = time.time()

    async def fill() -> None:
        async with open_store(url) as store:
            await store.save_events([
                _event(trace, now + i * 1e-3, "deadline_skip", i, {"deadline_s": now})
                for i in range(250)])

    asyncio.run(fill())
    assert main(["inspect", trace[:8], "--plain", "--store", url]) == 0
    assert "... 50 more deadline skips" in capsys.readouterr().out


def test_a_terminal_that_cannot_encode_the_glyphs_gets_them_escaped(odd_store: str) -> None:
    import os
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "penguiflow_inspector.cli", "traces", "--store", odd_store],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert done.returncode == 0, done.stderr  # before: a UnicodeEncodeError traceback
    assert "\\u2713" in done.stdout


async def test_a_remote_cancel_that_failed_is_shown_under_its_cancel(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # remote_cancel_error was ignored: the call read "cut short locally (no remote
    # outcome recorded)" and the cancel showed no propagation at all.
    from penguiflow import Headers, Message, NodePolicy, create
    from penguiflow.remote import InMemoryAgent, InMemoryTransport, RemoteNode
    from penguiflow_exporters.sqlite import SQLiteStateStore

    class RefusingCancel(InMemoryTransport):
        async def cancel(self, *, agent_url: str, task_id: str) -> None:
            raise RuntimeError("cancel endpoint down")

    url = "inmemory://slow"
    gate = asyncio.Event()
    transport = RefusingCancel({url: InMemoryAgent(chunks=["a", "b"], gate=gate)})
    remote = RemoteNode(transport=transport, skill="s", agent_url=url, name="caller",
                        streaming=True, policy=NodePolicy(validate="none"))
    path = tmp_path / "t.db"
    store = SQLiteStateStore(path)
    seen = {kind: asyncio.Event() for kind in ("remote_stream_event", "remote_cancel_error")}

    async def watch(event: Any) -> None:
        if event.event_type in seen:
            seen[event.event_type].set()

    flow = create(remote.to(), state_store=store, middlewares=[watch])
    flow.run()
    message = Message(payload=1, headers=Headers(tenant="t"))
    try:
        await flow.emit(message)
        # The task is known (its first status event), so a cancel goes to the agent.
        await asyncio.wait_for(seen["remote_stream_event"].wait(), 10)
        assert await flow.cancel(message.trace_id)
        await asyncio.wait_for(seen["remote_cancel_error"].wait(), 10)
    finally:
        await flow.stop()
        await store.close()
    argv = ["inspect", message.trace_id, "--plain", "--store", f"sqlite:///{path}"]
    assert await asyncio.to_thread(main, argv) == 0  # it runs its own event loop
    out = capsys.readouterr().out
    assert "the remote cancel failed: RuntimeError('cancel endpoint down')" in out
    assert "FAILED" in out and "cut short locally" not in out
