"""A trace whose store lost events is shown as incomplete, with the count (issue 14).

The lossy trace is written to a real SQLite store that drops: ``on_full="drop"``
with room for 8 events, and 40 events saved without yielding to the writer, so
exactly 32 are dropped and the store writes one ``store_events_lost`` marker into
the trace. Every reader must then say "incomplete" and "32 lost" (instead of the
"ok" the 8 kept events would make), and show the marker as a line of its own,
not as a node: ``pf inspect --plain/--json``, ``pf traces``, ``pf tail`` and the
terminal UI.
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
from pathlib import Path
from typing import Any

import pytest
from inspector_support import FollowingStderr
from test_app import opened, text_of

from penguiflow.state import EVENTS_LOST_KIND, StoredEvent
from penguiflow_exporters.sqlite import SQLiteStateStore
from penguiflow_inspector import cli, render
from penguiflow_inspector.app import InspectorApp
from penguiflow_inspector.cli import main
from penguiflow_inspector.model import build_trace
from penguiflow_inspector.widgets.detail import render_detail
from penguiflow_inspector.widgets.event_log import EventLog, format_event
from penguiflow_inspector.widgets.waterfall import Waterfall

LOSSY = "1055" + "a" * 28
T0 = 1_700_000_000.0
INVOCATIONS = 20
#: What the store keeps (``max_buffer``) and so drops of the 2 x 20 events.
KEPT = 8
LOST = 2 * INVOCATIONS - KEPT
REASON = "dropped: the store's buffer was full (on_full='drop')"


def _node(trace_id: str, i: int, kind: str, *, flow: str = "lossy",
          **payload: Any) -> StoredEvent:
    ts = T0 + i * 0.001 + (0.0005 if kind != "node_start" else 0.0)
    return StoredEvent(trace_id, ts, kind, f"step{i % 3}", f"step{i % 3}", payload,
                       invocation_id=f"{i + 1:016x}", flow_id=f"{flow}-{trace_id}",
                       seq=2 * i + (kind != "node_start"), flow_name=flow)


async def _record_lossy(path: Path) -> None:
    store = SQLiteStateStore(path, on_full="drop", max_buffer=KEPT, max_batch=4,
                             writer="thread")
    try:
        await store.open()
        # No await that suspends: the writer cannot run, so the buffer stays full.
        for i in range(INVOCATIONS):
            for kind in ("node_start", "node_success"):
                await store.save_event(_node(LOSSY, i, kind))
        await store.flush()
        assert store.failures["dropped"] == LOST
    finally:
        await store.close()


@pytest.fixture(scope="module")
def lossy_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("lossy") / "traces.db"
    asyncio.run(_record_lossy(path))
    return f"sqlite:///{path}"


def test_pf_inspect_plain_says_incomplete_with_the_count(
        lossy_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", LOSSY[:6], "--plain", "--store", lossy_url]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"trace {LOSSY}  flow lossy  status incomplete "
                               f"({LOST} events lost)  ")
    assert "incomplete: what follows lacks the events the store could not keep" in lines
    (marker,) = [line for line in lines if "store lost" in line]
    assert marker.endswith(f": store lost {LOST} events of this trace: {REASON}")
    # The marker is not a node: the waterfall has the 4 invocations that were kept.
    assert sum(line.lstrip("* ").startswith("step") for line in lines) == KEPT // 2


def test_pf_inspect_json_has_the_status_and_the_count(
        lossy_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", LOSSY, "--json", "--store", lossy_url]) == 0
    view = json.loads(capsys.readouterr().out)
    assert view["status"] == "incomplete" and view["events_lost"] == LOST
    assert len(view["invocations"]) == KEPT // 2
    assert all(i["status"] == "succeeded" for i in view["invocations"])
    (marker,) = [e for e in view["events"] if e["kind"] == EVENTS_LOST_KIND]
    assert marker["node_name"] is None and marker["invocation_id"] is None
    assert marker["extra"] == {"events_lost": LOST, "reason": REASON}


def test_pf_traces_shows_the_status_and_the_lost_column(
        lossy_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["traces", "--plain", "--store", lossy_url]) == 0
    header, row = capsys.readouterr().out.splitlines()
    columns = header.split()
    assert columns[columns.index("STATUS"):] == [
        "STATUS", "NODES", "INVOCATIONS", "ERRORS", "REMOTE", "EVENTS", "LOST", "FLOW"]
    cells = row.split()
    assert cells[0] == LOSSY
    assert (cells[-8], cells[-6], cells[-2], cells[-1]) == (
        "incomplete", str(KEPT // 2), str(LOST), "lossy")
    assert main(["traces", "--json", "--store", lossy_url, "--status", "incomplete"]) == 0
    (summary,) = json.loads(capsys.readouterr().out)
    assert summary["status"] == "incomplete" and summary["events_lost"] == LOST
    assert main(["traces", "--json", "--store", lossy_url, "--status", "ok"]) == 0
    assert json.loads(capsys.readouterr().out) == []


async def test_pf_tail_prints_the_marker_as_a_sentence(lossy_url: str) -> None:
    shown: list[str] = []
    err = FollowingStderr()
    tail = asyncio.create_task(cli.tail(lossy_url, LOSSY, lambda e: shown.append(
        render.event_line(e)), err))
    following = asyncio.create_task(err.following.wait())
    done, _ = await asyncio.wait({tail, following}, timeout=30,
                                 return_when=asyncio.FIRST_COMPLETED)
    tail.cancel()
    following.cancel()
    assert following in done, err.getvalue()  # the history is printed before that line
    assert len(shown) == KEPT + 1
    (marker,) = [line for line in shown if "store lost" in line]
    assert marker.endswith(f"{LOSSY[:12]} store lost {LOST} events of this trace: {REASON}")
    assert EVENTS_LOST_KIND not in marker


async def test_the_tui_header_and_detail_show_incomplete_and_the_count(lossy_url: str) -> None:
    app = InspectorApp(store_url=lossy_url, trace_id=LOSSY)
    async with app.run_test(size=(120, 30)) as pilot:
        screen = await opened(pilot)
        header = text_of(screen.query_one("#summary"))
        assert f"lossy incomplete ({LOST} events lost)" in header
        assert screen.query_one(Waterfall).row_count == KEPT // 2  # no row for the marker
        # The event log of the whole trace (what it shows with no row selected).
        assert screen.full is not None
        log = screen.query_one(EventLog)
        log.show(screen.full.events, screen.full.start)
        (marker,) = [line for line in log.lines if "store lost" in line]
        assert marker.split(None, 1)[1] == f"store lost {LOST} events of this trace: {REASON}"
        # The detail pane of the trace itself says it too.
        detail = _plain(render_detail(screen.full, None, screen.full.events))
        assert "status      incomplete" in detail and f"events lost {LOST}" in detail


def _plain(renderable: Any) -> str:
    from rich.console import Console

    console = Console(width=120, record=True, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


# -- the model, without a store ------------------------------------------------------------


def _marker(trace_id: str, ts: float, payload: dict[str, Any]) -> StoredEvent:
    return StoredEvent(trace_id, ts, EVENTS_LOST_KIND, None, None, payload)


def test_a_cancel_or_a_failure_that_was_kept_wins_and_the_count_is_still_shown() -> None:
    failed = [_node(LOSSY, 0, "node_start"), _node(LOSSY, 0, "node_failed", exception="E()"),
              _marker(LOSSY, T0 + 0.01, {"events_lost": 3, "reason": "refused by the store"})]
    view = build_trace(failed)
    assert (view.status, view.events_lost) == ("error", 3)
    assert render.trace_text(view).startswith(
        f"trace {LOSSY}  flow lossy  status failed (3 events lost)  ")
    cancel = StoredEvent(LOSSY, T0 + 0.0002, "trace_cancel_start", None, None, {})
    view = build_trace([failed[0], cancel, failed[2]])
    assert (view.status, view.events_lost) == ("cancelled", 3)


def test_markers_add_up_and_replay_counts_those_recorded_by_then() -> None:
    events = [_node(LOSSY, 0, "node_start"),
              _marker(LOSSY, T0 + 0.0001, {"events_lost": 1, "reason": "dropped: a"}),
              _node(LOSSY, 0, "node_success"),
              _marker(LOSSY, T0 + 0.0009, {"events_lost": 2, "reason": "not written: b"})]
    view = build_trace(events)
    assert (view.status, view.events_lost) == ("incomplete", 3)
    assert view.lost_reasons == ("dropped: a", "not written: b")
    assert [(v.status, v.events_lost) for v in (view.at(T0), view.at(T0 + 0.0001),
                                                view.at(T0 + 0.0009))] == [
        ("running", 0), ("incomplete", 1), ("incomplete", 3)]
    rows = [format_event(row, view.start) for row in view.events]
    assert rows[1].startswith("+")  # an offset into the trace, then what the marker says
    assert rows[1].endswith(" store lost 1 event of this trace: dropped: a")


@pytest.mark.parametrize("payload", [{"events_lost": "3"}, {"events_lost": -1},
                                     {"events_lost": True}, {}])
def test_a_malformed_marker_is_listed_but_changes_nothing(payload: dict[str, Any]) -> None:
    events = [_node(LOSSY, 0, "node_start"), _node(LOSSY, 0, "node_success"),
              _marker(LOSSY, T0 + 0.0009, payload)]
    view = build_trace(events)
    assert (view.status, view.events_lost) == ("ok", 0)
    assert [row.kind for row in view.events][-1] == EVENTS_LOST_KIND
    assert "incomplete" not in render.trace_text(view)


ENDLESS = "0e0d" * 8


async def _record_lost_ends(path: Path) -> None:
    """Eight node_starts kept, their eight node_successes dropped: the trace reads
    "incomplete", with invocations open for ever."""
    store = SQLiteStateStore(path, on_full="drop", max_buffer=KEPT, max_batch=4,
                             writer="thread")
    try:
        await store.open()
        for kind in ("node_start", "node_success"):
            for i in range(KEPT):
                await store.save_event(_node(ENDLESS, i, kind))
        await store.flush()
        assert store.failures["dropped"] == KEPT
    finally:
        await store.close()


def _notices(err: io.StringIO) -> list[str]:
    return [line for line in err.getvalue().splitlines() if "will not end" in line]


async def test_pf_tail_says_once_why_a_trace_that_lost_its_ends_may_never_end(
        tmp_path: Path) -> None:
    # pf tail cannot see this trace end. It keeps following (the ends may still
    # come, from a flow still running) and says why, once, instead of waiting in
    # silence.
    path = tmp_path / "traces.db"
    await _record_lost_ends(path)

    err = FollowingStderr("will not end by itself")
    shown: list[str] = []
    tail = asyncio.create_task(cli.tail(f"sqlite:///{path}", ENDLESS, lambda e: shown.append(
        render.event_line(e)), err, interval_s=0.01))
    warned = asyncio.create_task(err.said.wait())
    done, _ = await asyncio.wait({tail, warned}, timeout=30,
                                 return_when=asyncio.FIRST_COMPLETED)
    assert warned in done, err.getvalue()
    # ~30 more polls (10 ms apart), and still following: the notice is not repeated.
    await asyncio.wait({tail}, timeout=0.3)
    assert not tail.done(), err.getvalue()
    tail.cancel()
    with pytest.raises(asyncio.CancelledError):
        await tail
    assert _notices(err) == [
        f"pf tail: trace {ENDLESS} lost {KEPT} events; {KEPT} invocation(s) shown have no "
        "end yet, and if their ends were lost the tail will not end by itself (Ctrl-C to stop)"]
    assert len(shown) == KEPT + 1  # the kept starts and the marker


async def test_pf_tail_says_nothing_of_the_sort_when_the_ends_come(tmp_path: Path) -> None:
    # The ends are stored after the history was shown and before the first poll
    # (from pf tail's own "following" line, so in that order): the tail reads them,
    # ends by itself, and never said it might not.
    path = tmp_path / "traces.db"
    await _record_lost_ends(path)

    async def store_the_ends() -> None:
        async with SQLiteStateStore(path, writer="thread") as late:
            for i in range(KEPT):
                await late.save_event(_node(ENDLESS, i, "node_success"))

    class EndsComeLater(FollowingStderr):
        def write(self, text: str) -> int:
            if "following" in text:  # on another thread: this one runs the tail
                ends = threading.Thread(target=asyncio.run, args=(store_the_ends(),))
                ends.start()
                ends.join()
            return super().write(text)

    err = EndsComeLater()
    shown: list[str] = []
    await asyncio.wait_for(cli.tail(f"sqlite:///{path}", ENDLESS, lambda e: shown.append(
        render.event_line(e)), err, interval_s=0.01), 30)
    assert "ended: incomplete" in err.getvalue()
    assert _notices(err) == []
    assert len(shown) == 2 * KEPT + 1
