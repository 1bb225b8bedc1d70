"""Agents calling agents: a served run nested under the remote call that asked for it.

When agent B serves agent A's A2A request, B's flow runs in A's trace (same
trace id) and records a ``trace_parent`` event naming A's CLIENT span: the
call id of A's remote call row. When both record into one store, the inspector
shows one trace with B's invocations under A's call: in the model
(``served_under``), the waterfall rows, ``--plain``/``--json`` and the app.

Every trace here is built by hand at fixed times (T0 + ms), two flows (two
flow ids) in one trace.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from test_app import opened, wait_for
from tui_traces import demo_events

from penguiflow._spans import derived_span_id
from penguiflow.state import InMemoryStateStore, StoredEvent
from penguiflow_exporters import open_store
from penguiflow_inspector import render
from penguiflow_inspector.app import InspectorApp
from penguiflow_inspector.cli import main
from penguiflow_inspector.model import InvocationView, build_trace, served_runs
from penguiflow_inspector.widgets.rows import Row, Rows, _flatten
from penguiflow_inspector.widgets.waterfall import Waterfall

T0 = 1_700_000_000.0
TRACE = "5e7ed0000000000000000000000000a2"
CALLER, SERVER = "flow-a", "flow-b"
ASK, SIDE, DONE = "a1a1a1a1a1a1a1a1", "a2a2a2a2a2a2a2a2", "a3a3a3a3a3a3a3a3"
ANSWER, POLISH = "b1b1b1b1b1b1b1b1", "b2b2b2b2b2b2b2b2"
#: The call id of ``ask``'s first remote call, derived as the model does.
CALL = f"{derived_span_id(TRACE, ASK, 'remote', '0'):016x}"


class Flows:
    """Builds the StoredEvents of several flows of one trace (per-flow seq numbers)."""

    def __init__(self) -> None:
        self.events: list[StoredEvent] = []
        self.seq: dict[str, int] = {}

    def __call__(self, flow_id: str, ms: float, kind: str, node: str | None = None,
                 inv: str | None = None, *, parents: tuple[str, ...] = (),
                 **extra: Any) -> None:
        ts = T0 + ms / 1000.0
        seq = self.seq[flow_id] = self.seq.get(flow_id, 0) + 1
        payload: dict[str, Any] = {"event": kind, "ts": ts, "node_name": node,
                                   "trace_id": TRACE, "attempt": 0, "latency_ms": None,
                                   **extra}
        self.events.append(StoredEvent(
            TRACE, ts, kind, node, node, payload, invocation_id=inv,
            parent_invocation_ids=parents, span_id=inv, seq=seq,
            flow_name="agent-a" if flow_id == CALLER else "agent-b", flow_id=flow_id))

    def sorted(self) -> list[StoredEvent]:
        """In ``load_history`` order (time, then seq)."""
        return sorted(self.events, key=lambda e: (e.ts, e.seq))


def two_agents(*, parent: str = CALL, late: bool = False,
               trace_parent: bool = True) -> list[StoredEvent]:
    """Agent A: ``ask`` calls agent B's ``answer`` skill while ``side`` runs; ``done`` last.

    Agent B (another flow in the same trace): ``answer`` then ``polish``; its
    ``trace_parent`` names ``parent`` (before its first event, or with ``late``
    after its first invocation's events).
    """
    r = Flows()
    r(CALLER, 0, "node_start", "ask", ASK)
    r(CALLER, 1, "remote_call_start", "ask", ASK, remote_skill="answer",
      remote_agent_url="http://agent-b.local", remote_transport="http",
      remote_streaming=False, remote_request_bytes=120)
    if trace_parent and not late:
        attributes: dict[str, Any] = {"a2a.task.id": "task-b1"}
        r(SERVER, 2, "trace_parent", None, None, parent_span_id=parent, **attributes)
    r(SERVER, 3, "node_start", "answer", ANSWER)
    r(CALLER, 5, "node_start", "side", SIDE)
    if trace_parent and late:
        r(SERVER, 6, "trace_parent", None, None, parent_span_id=parent)
    r(CALLER, 10, "node_success", "side", SIDE)
    r(SERVER, 20, "node_success", "answer", ANSWER)
    r(SERVER, 21, "node_start", "polish", POLISH, parents=(ANSWER,))
    r(SERVER, 38, "node_success", "polish", POLISH, parents=(ANSWER,))
    r(CALLER, 40, "remote_call_success", "ask", ASK, remote_status="success",
      remote_response_bytes=300, remote_context_id="ctx-1", remote_task_id="task-b1",
      remote_task_state="completed")
    r(CALLER, 42, "node_success", "ask", ASK)
    r(CALLER, 43, "node_start", "done", DONE, parents=(ASK, SIDE))
    r(CALLER, 45, "node_success", "done", DONE, parents=(ASK, SIDE))
    return r.sorted()


def shape(rows: list[Row]) -> list[tuple[str, str, int]]:
    return [(row.kind, row.name, row.depth) for row in rows]


NESTED = [("inv", "ask", 0), ("remote", "answer", 1), ("inv", "answer", 2),
          ("inv", "polish", 2), ("inv", "side", 0), ("inv", "done", 0)]
TOP_LEVEL = [("inv", "ask", 0), ("remote", "answer", 1), ("inv", "answer", 0),
             ("inv", "side", 0), ("inv", "polish", 0), ("inv", "done", 0)]


# -- model -------------------------------------------------------------------------------------


@pytest.mark.parametrize("late", [False, True], ids=["parent-first", "parent-late"])
def test_served_invocations_name_the_call_they_served(late: bool) -> None:
    view = build_trace(two_agents(late=late))
    assert [i.node_name for i in view.invocations] == ["ask", "answer", "side", "polish", "done"]
    served = {i.node_name: i.served_under for i in view.invocations}
    assert served == {"ask": None, "side": None, "done": None, "answer": CALL, "polish": CALL}
    (call,) = view.remote_calls
    assert call.call_id == CALL and call.invocation_id == ASK
    assert call.outcome == "success" and call.task_id == "task-b1"
    runs = served_runs(view)
    assert list(runs) == [CALL]
    assert [i.node_name for i in runs[CALL]] == ["answer", "polish"]
    # The trace_parent event stays in the event log, with its attributes.
    (row,) = [e for e in view.events if e.kind == "trace_parent"]
    assert row.extra["parent_span_id"] == CALL and row.invocation_id is None


def test_replay_keeps_served_under() -> None:
    view = build_trace(two_agents())
    full_rows = Rows.of(view)
    at = view.at(T0 + 0.010)  # answer running (re-folded), polish not started yet
    answer = at.invocation(ANSWER)
    assert answer is not None and answer.end is None and answer.served_under == CALL
    assert answer is not view.invocation(ANSWER)  # a re-folded row, not the full one
    replayed = Rows.of(at, full_rows)
    assert shape(replayed.rows) == [("inv", "ask", 0), ("remote", "answer", 1),
                                    ("inv", "answer", 2), ("inv", "side", 0)]
    assert replayed.index_of(ANSWER) == 2 and replayed.index_of(SIDE) == 3
    assert replayed.index_of(DONE) is None
    # Before the served flow started: only the caller's rows.
    early = Rows.of(view.at(T0 + 0.0015), full_rows)
    assert shape(early.rows) == [("inv", "ask", 0), ("remote", "answer", 1)]
    # The whole trace again.
    assert shape(Rows.of(view.at(view.end), full_rows).rows) == NESTED


# -- rows --------------------------------------------------------------------------------------


@pytest.mark.parametrize("late", [False, True], ids=["parent-first", "parent-late"])
def test_rows_nest_the_served_run_under_its_call(late: bool) -> None:
    view = build_trace(two_agents(late=late))
    rows = _flatten(view)
    assert shape(rows) == NESTED
    assert [row.key for row in rows] == [ASK, CALL, ANSWER, POLISH, SIDE, DONE]
    index = Rows.of(view)
    assert [index.index_of(k) for k in (ASK, CALL, ANSWER, POLISH, SIDE, DONE)] == [
        0, 1, 2, 3, 4, 5]


def test_a_parent_that_is_not_in_the_trace_leaves_the_rows_at_the_top() -> None:
    view = build_trace(two_agents(parent="0123456789abcdef"))
    assert view.invocation(ANSWER).served_under == "0123456789abcdef"  # type: ignore[union-attr]
    assert served_runs(view) == {}
    assert shape(_flatten(view)) == TOP_LEVEL
    text = render.trace_text(view)
    assert "⤷" not in text


def test_a_trace_without_trace_parent_is_unchanged() -> None:
    view = build_trace(two_agents(trace_parent=False))
    assert all(i.served_under is None for i in view.invocations)
    assert served_runs(view) == {}
    assert shape(_flatten(view)) == TOP_LEVEL
    demo = build_trace(demo_events())
    rows = _flatten(demo)
    assert all(row.depth == (1 if row.kind == "remote" else 0) for row in rows)
    assert all(d["served_under"] is None for d in render.trace_json(demo)["invocations"])
    assert "⤷" not in render.trace_text(demo)


def test_a_cycle_of_served_runs_stays_at_the_top() -> None:
    # Malformed: the caller's own flow claims to serve its own call.
    r = Flows()
    r(CALLER, 0, "trace_parent", None, None, parent_span_id=CALL)
    r(CALLER, 1, "node_start", "ask", ASK)
    r(CALLER, 2, "remote_call_start", "ask", ASK, remote_skill="answer")
    r(CALLER, 3, "remote_call_success", "ask", ASK)
    r(CALLER, 4, "node_success", "ask", ASK)
    view = build_trace(r.sorted())
    assert view.invocation(ASK).served_under == CALL  # type: ignore[union-attr]
    assert served_runs(view) == {}
    assert shape(_flatten(view)) == [("inv", "ask", 0), ("remote", "answer", 1)]
    labels = [line[2:20].rstrip() for line in waterfall_lines(render.trace_text(view))]
    assert labels == ["ask", "↳ answer"]


def test_a_served_agent_calling_a_third_one_nests_two_levels() -> None:
    events = two_agents()
    r = Flows()
    r.seq[SERVER] = 100  # after flow-b's events in two_agents
    third_call = f"{derived_span_id(TRACE, POLISH, 'remote', '0'):016x}"
    r(SERVER, 22, "remote_call_start", "polish", POLISH, remote_skill="lint")
    r("flow-c", 23, "trace_parent", None, None, parent_span_id=third_call)
    r("flow-c", 24, "node_start", "lint", "c1c1c1c1c1c1c1c1")
    r("flow-c", 30, "node_success", "lint", "c1c1c1c1c1c1c1c1")
    r(SERVER, 31, "remote_call_success", "polish", POLISH)
    view = build_trace(sorted(events + r.events, key=lambda e: (e.ts, e.seq)))
    assert shape(_flatten(view)) == [
        ("inv", "ask", 0), ("remote", "answer", 1), ("inv", "answer", 2),
        ("inv", "polish", 2), ("remote", "lint", 3), ("inv", "lint", 4),
        ("inv", "side", 0), ("inv", "done", 0)]
    labels = [line[2:20].rstrip() for line in waterfall_lines(render.trace_text(view))]
    assert labels == ["ask", "↳ answer", "  ⤷ answer", "  ⤷ polish", "  ↳ lint",
                      "    ⤷ lint", "side", "done"]


# -- --plain and --json ------------------------------------------------------------------------


def waterfall_lines(text: str) -> list[str]:
    body = text.split("waterfall (")[1].splitlines()[1:]
    return body[: body.index("")]


def test_plain_lists_the_served_run_under_its_call() -> None:
    view = build_trace(two_agents())
    lines = waterfall_lines(render.trace_text(view))
    labels = [line[2:20].rstrip() for line in lines]
    assert labels == ["ask", "↳ answer", "  ⤷ answer", "  ⤷ polish", "side", "done"]
    call = labels.index("↳ answer")
    assert lines[call].startswith("  ↳ answer") and lines[call].endswith("remote")
    assert lines[call + 1][1:].startswith("   ⤷ answer") and "succeeded" in lines[call + 1]
    # Truncated like the other rows.
    assert render.trace_text(view, max_rows=3).count("\n  ... 3 more rows") == 1


def test_plain_without_served_runs_sorts_by_start_as_before() -> None:
    view = build_trace(two_agents(trace_parent=False))
    labels = [line[2:20].rstrip() for line in waterfall_lines(render.trace_text(view))]
    assert labels == ["ask", "↳ answer", "answer", "side", "polish", "done"]


def test_json_invocations_carry_served_under() -> None:
    view = build_trace(two_agents())
    data = json.loads(json.dumps(render.trace_json(view)))
    served = {i["node_name"]: i["served_under"] for i in data["invocations"]}
    assert served == {"ask": None, "answer": CALL, "side": None, "polish": CALL, "done": None}
    assert data["remote_calls"][0]["call_id"] == CALL


def test_pf_inspect_shows_two_agents_of_one_store_as_one_trace(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path}/agents.db"

    async def fill() -> None:
        async with open_store(url) as store:  # both agents record into the one store
            events = two_agents()
            await store.save_events([e for e in events if e.flow_id == CALLER])
            await store.save_events([e for e in events if e.flow_id == SERVER])

    asyncio.run(fill())
    assert main(["inspect", TRACE, "--plain", "--store", url]) == 0
    labels = [line[2:20].rstrip() for line in waterfall_lines(capsys.readouterr().out)]
    assert labels == ["ask", "↳ answer", "  ⤷ answer", "  ⤷ polish", "side", "done"]
    assert main(["inspect", TRACE, "--json", "--store", url]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {i["node_name"]: i["served_under"] for i in data["invocations"]}["polish"] == CALL


# -- the app -----------------------------------------------------------------------------------


def _line_text(wf: Waterfall, position: int) -> str:
    row = wf.row_at(position)
    assert row is not None
    return "".join(s.text for s in wf._row_strip(row, 100, False))


async def test_app_draws_the_served_run_under_its_call() -> None:
    async with InMemoryStateStore() as store:
        await store.save_events(two_agents())
        app = InspectorApp(trace_id=TRACE, store=store)
        async with app.run_test(size=(120, 30)) as pilot:
            screen = await opened(pilot)
            wf = screen.query_one(Waterfall)
            assert [(r.kind, r.name, r.depth) for r in
                    (wf.row_at(i) for i in range(wf.row_count)) if r is not None] == NESTED
            assert _line_text(wf, 1)[1:].startswith("  └ answer")
            assert _line_text(wf, 2)[1:].startswith("    ⤷ answer")
            assert _line_text(wf, 3)[1:].startswith("    ⤷ polish")
            assert _line_text(wf, 4)[1:].startswith("side")
            await pilot.press("j", "j")
            assert wf.selected is not None and wf.selected.key == ANSWER
            selected = wf.selected.item
            assert isinstance(selected, InvocationView) and selected.served_under == CALL
            # Replay keeps the nesting.
            await pilot.press("r")
            await wait_for(pilot, lambda: screen.replay_t is not None, what="replay")
            for _ in range(4):
                await pilot.press("full_stop")
            await wait_for(pilot, lambda: wf.row_count >= 3, what="the served row")
            assert [(r.name, r.depth) for r in
                    (wf.row_at(i) for i in range(3)) if r is not None] == [
                ("ask", 0), ("answer", 1), ("answer", 2)]
