"""The app on a SQLite file that another process is writing: the open trace (and
``pf tail``'s trace list) update within a second.

The writer is a real flow in a second process (``FLOW``): ``first -> gate ->
second``, where ``gate`` waits for a line on its stdin, so the test decides when
``second`` runs. The app opens the file read-only, as ``pf inspect`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from test_app import opened, wait_for
from textual.pilot import Pilot
from textual.worker import WorkerState

from penguiflow_inspector.app import InspectorApp
from penguiflow_inspector.screens.trace import TraceScreen
from penguiflow_inspector.screens.traces import TracesScreen
from penguiflow_inspector.widgets.waterfall import Waterfall

#: A real flow recording into the SQLite file ``argv[1]``. Prints ``ready <trace id>``
#: once ``first`` is stored and ``gate`` has started, then waits for a line per message.
FLOW = """
import asyncio, sys
from penguiflow import Headers, Message, Node, create
from penguiflow_exporters.sqlite import SQLiteStateStore

async def main():
    store = SQLiteStateStore(sys.argv[1], writer="thread")

    async def first(msg, ctx):
        return msg

    async def gate(msg, ctx):
        await store.flush()
        print("ready", msg.trace_id, flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        return msg

    async def second(msg, ctx):
        return msg

    a, b, c = Node(first, name="first"), Node(gate, name="gate"), Node(second, name="second")
    flow = create(a.to(b), b.to(c), c.to(), state_store=store)
    flow.run()
    for _ in range(int(sys.argv[2])):
        await flow.emit(Message(payload="go", headers=Headers(tenant="t")))
        await asyncio.wait_for(flow.fetch(), 60)
    await flow.stop()
    await store.close()

asyncio.run(main())
"""


class Flow:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def ready(self) -> str:
        """The trace id of the message now waiting in ``gate``."""
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 60)
        word, trace_id = line.decode().split()
        assert word == "ready"
        return trace_id

    async def release(self) -> None:
        """Let ``gate`` finish: ``second`` runs and the message's trace ends."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")
        await self.proc.stdin.drain()


@contextlib.asynccontextmanager
async def flow_process(path: Path, messages: int = 1) -> AsyncIterator[Flow]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", FLOW, str(path), str(messages),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    try:
        yield Flow(proc)
    finally:
        if proc.returncode is None:
            assert proc.stdin is not None
            proc.stdin.close()  # a gate still waiting reads EOF and lets its message go
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def following(pilot: Pilot[Any], screen: TraceScreen | TracesScreen) -> None:
    """Return once the screen's follower has marked where it starts reading.

    The follower's first step queues that read on the store's one reading thread;
    a query issued after it (here ``resolve_trace_id``) completes after it.
    """
    store = screen.store
    assert store is not None
    await wait_for(pilot, lambda: any(w.group == "follow" and w.state == WorkerState.RUNNING
                                      for w in screen.workers), what="the follower")
    await store.resolve_trace_id("")


def names(screen: TraceScreen) -> list[str]:
    wf = screen.query_one(Waterfall)
    return [row.name for i in range(wf.row_count) if (row := wf.row_at(i)) is not None]


async def test_an_open_trace_updates_within_a_second_as_another_process_writes(
        tmp_path: Path) -> None:
    path = tmp_path / "traces.db"
    async with flow_process(path) as flow:
        trace_id = await flow.ready()
        app = InspectorApp(f"sqlite:///{path}", trace_id)
        async with app.run_test(size=(100, 30)) as pilot:
            screen = await opened(pilot)
            assert screen.live  # the trace is running: the screen follows the file
            assert names(screen) == ["first", "gate"]
            await asyncio.wait_for(following(pilot, screen), 10)
            await flow.release()
            t0 = time.monotonic()
            await wait_for(pilot, lambda: "second" in names(screen), timeout=5,
                           what="the other process's new invocation")
            assert time.monotonic() - t0 < 1.0
            await wait_for(pilot, lambda: screen.full is not None
                           and screen.full.status == "ok", what="the trace's end")
            await pilot.press("q")
        assert app.return_code == 0


async def test_the_trace_list_under_tail_shows_a_trace_another_process_starts(
        tmp_path: Path) -> None:
    path = tmp_path / "traces.db"
    async with flow_process(path, messages=2) as flow:
        first = await flow.ready()
        app = InspectorApp(f"sqlite:///{path}", mode="tail")
        async with app.run_test(size=(100, 30)) as pilot:
            await wait_for(pilot, lambda: isinstance(app.screen, TracesScreen)
                           and len(app.screen.summaries) == 1, what="the list")
            screen = app.screen
            assert isinstance(screen, TracesScreen)
            await asyncio.wait_for(following(pilot, screen), 10)
            await flow.release()
            second = await flow.ready()  # a second trace has started in the other process
            await wait_for(pilot, lambda: [s.trace_id for s in screen.summaries]
                           == [second, first], timeout=5, what="the new trace in the list")
            await flow.release()


async def test_a_store_file_that_goes_bad_stops_live_updates_with_a_notice(
        tmp_path: Path) -> None:
    """Error path: the followed file is deleted; the screen says
    live updates stopped (it keeps what it shows) instead of failing."""
    path = tmp_path / "traces.db"
    async with flow_process(path) as flow:
        trace_id = await flow.ready()
        app = InspectorApp(f"sqlite:///{path}", trace_id)
        async with app.run_test(size=(100, 30)) as pilot:
            screen = await opened(pilot)
            await asyncio.wait_for(following(pilot, screen), 10)
            await asyncio.to_thread(_delete, path)
            await wait_for(pilot, lambda: _notified(app, "live updates stopped"),
                           what="the notice")
            assert names(screen) == ["first", "gate"]
            await flow.release()


def _delete(path: Path) -> None:
    path.unlink()


def _notified(app: Any, text: str) -> bool:
    return any(text in str(n.message) for n in app._notifications)



async def test_an_event_stored_while_the_history_is_read_is_not_lost() -> None:
    """The follower starts before the history read: an event committed just after
    the read (before a late follower would have started) still shows."""
    from tui_traces import TRACE, demo_events, running_events

    from penguiflow.state import InMemoryStateStore

    late = demo_events()[5]  # the next event after the running prefix

    class CommitsDuringRead(InMemoryStateStore):
        async def load_history_page(self, trace_id: str, **page: Any) -> Any:
            events = await super().load_history_page(trace_id, **page)
            await self.save_event(late)  # committed after the read
            return events

    async with CommitsDuringRead() as store:
        await store.save_events(running_events())
        app = InspectorApp(trace_id=TRACE, store=store)
        async with app.run_test(size=(100, 30)) as pilot:
            screen = await opened(pilot)
            await wait_for(pilot, lambda: any(e.event_key == late.event_key
                                              for e in screen.events),
                           what="the event stored during the read")
