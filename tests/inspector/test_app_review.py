"""Defects a review of the TUI found (each test fails on the code before its fix)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

from rich.cells import cell_len
from test_app import opened, text_of, wait_for
from textual.pilot import Pilot
from textual.widgets import DataTable
from tui_traces import T0, TRACE, chain_events, demo_events

from penguiflow.state import InMemoryStateStore, StoredEvent, TraceFilter
from penguiflow_inspector.app import InspectorApp
from penguiflow_inspector.screens.message import MessageScreen
from penguiflow_inspector.screens.trace import TraceScreen
from penguiflow_inspector.screens.traces import TracesScreen
from penguiflow_inspector.widgets.detail import DetailPane
from penguiflow_inspector.widgets.event_log import EventLog
from penguiflow_inspector.widgets.replay_bar import ReplayBar
from penguiflow_inspector.widgets.waterfall import Waterfall


@contextlib.asynccontextmanager
async def opened_on(events: Sequence[StoredEvent], size: tuple[int, int],
                    ) -> AsyncIterator[tuple[InspectorApp, Pilot[Any], TraceScreen]]:
    """``pf inspect TRACE`` over a store holding ``events``, in a terminal of ``size``,
    once the trace is loaded: the app, its pilot and the trace screen."""
    async with InMemoryStateStore() as store:
        await store.save_events(events)
        app = InspectorApp(trace_id=TRACE, store=store)
        async with app.run_test(size=size) as pilot:
            yield app, pilot, await opened(pilot)


class EventsGoneStore(InMemoryStateStore):
    """Lists its traces but has lost their events (blocks deleted after the listing)."""

    async def load_history(self, trace_id: str) -> Sequence[StoredEvent]:
        return []

    async def load_history_page(self, trace_id: str, *, offset: int = 0,
                                limit: int) -> Sequence[StoredEvent]:
        return []


async def test_a_trace_without_stored_events_says_so_instead_of_crashing() -> None:
    async with EventsGoneStore() as store:
        await store.save_events(demo_events())
        app = InspectorApp(trace_id=TRACE[:6], store=store)
        async with app.run_test(size=(100, 30)) as pilot:
            await wait_for(pilot, lambda: isinstance(app.screen, MessageScreen),
                           what="the message")
            title = text_of(app.screen.query_one("#message-title"))
            assert f"trace {TRACE} has no stored events" in title
            await pilot.press("q")
        assert app.return_code == 1


async def test_the_trace_list_opens_with_the_filter_it_is_given() -> None:
    """``pf traces --errors --since … --limit 1`` in a terminal: the list the TUI shows."""
    async with InMemoryStateStore() as store:
        ids = [f"{i:032x}" for i in range(1, 5)]
        for n, trace_id in enumerate(ids):  # trace n starts n seconds later; 1 has no errors
            events = demo_events(trace_id) if n != 1 else chain_events(3, trace_id)
            for ev in events:
                ev.ts += n
            await store.save_events(events)
        wanted = TraceFilter(has_errors=True, since=T0 + 0.5, until=T0 + 3.5, order="slowest",
                             limit=1)
        app = InspectorApp(store=store, mode="traces", trace_filter=wanted)
        async with app.run_test(size=(100, 24)) as pilot:
            await wait_for(pilot, lambda: isinstance(app.screen, TracesScreen)
                           and app.screen.summaries != [], what="the list")
            screen = app.screen
            assert isinstance(screen, TracesScreen)
            table = screen.query_one(DataTable)
            # ids[2] and ids[3] have errors and start in the window; the slowest, one row.
            assert table.row_count == 1
            assert table.coordinate_to_cell_key((0, 0)).row_key.value in ids[2:]
            filters = text_of(screen.query_one("#filters"))
            assert "slowest first" in filters and "with errors" in filters
            assert "since 11-14 22:13:20" in filters and "until 11-14 22:13:23" in filters
            await pilot.press("e")  # the keys change the filter it started from
            await wait_for(pilot, lambda: screen.has_errors is False
                           and "no errors" in text_of(screen.query_one("#filters")))
            await wait_for(pilot, lambda: [s.trace_id for s in screen.summaries] == [ids[1]],
                           what="the trace without errors in the window")


def _two_processes(trace_id: str = TRACE) -> list[StoredEvent]:
    """One trace recorded by two processes (flow ids): each stored its batch, so the
    log's order is b's events (20, 30, 60, 70 ms) then a's (0, 10, 40, 50 ms)."""
    def recorder(flow: str) -> Any:
        events: list[StoredEvent] = []

        def ev(ms: float, kind: str, node: str, inv: str, parents: tuple[str, ...] = ()) -> None:
            ts = T0 + ms / 1000.0
            events.append(StoredEvent(
                trace_id, ts, kind, node, node, {"event": kind, "ts": ts, "node_name": node},
                invocation_id=inv, parent_invocation_ids=parents, span_id=inv,
                seq=len(events) + 1, flow_name="demo", flow_id=flow))
        return events, ev

    a, a_ev = recorder("worker-a")
    b, b_ev = recorder("worker-b")
    a_ev(0, "node_start", "a1", "ia1")
    a_ev(10, "node_success", "a1", "ia1")
    b_ev(20, "node_start", "b1", "ib1", ("ia1",))
    b_ev(30, "node_success", "b1", "ib1")
    a_ev(40, "node_start", "a2", "ia2", ("ib1",))
    a_ev(50, "node_success", "a2", "ia2")
    b_ev(60, "node_start", "b2", "ib2", ("ia2",))
    b_ev(70, "node_success", "b2", "ib2")
    return b + a


async def test_replay_steps_in_time_order_when_the_log_is_not() -> None:
    async with opened_on(_two_processes(), (120, 30)) as (_app, pilot, screen):
        bar = screen.query_one(ReplayBar)
        assert screen.full is not None
        assert [round((e.ts - T0) * 1000) for e in screen.full.events][:2] == [20, 30]

        def where() -> tuple[int, str]:
            assert screen.replay_t is not None
            return (round((screen.replay_t - T0) * 1000),
                    text_of(bar).split("ev ")[1].split()[0])

        await pilot.press("r")
        seen = [where()]
        for _ in range(8):
            await pilot.press("full_stop")
            seen.append(where())
        assert seen == [(0, "1/8"), (10, "2/8"), (20, "3/8"), (30, "4/8"), (40, "5/8"),
                        (50, "6/8"), (60, "7/8"), (70, "8/8"), (70, "8/8")]
        back = []
        for _ in range(8):
            await pilot.press("comma")
            back.append(where()[0])
        assert back == [60, 50, 40, 30, 20, 10, 0, 0]


def _gather_events(trace_id: str = TRACE) -> list[StoredEvent]:
    """One invocation makes two remote calls at once: alpha (task-A) and beta (task-B)."""
    events: list[StoredEvent] = []

    def ev(ms: float, kind: str, **extra: Any) -> None:
        ts = T0 + ms / 1000.0
        events.append(StoredEvent(
            trace_id, ts, kind, "fan", "fan", {"event": kind, "ts": ts, "node_name": "fan",
                                               **extra},
            invocation_id="i1", span_id="i1", seq=len(events) + 1, flow_name="demo",
            flow_id="f1"))

    ev(0, "node_start")
    ev(1, "remote_call_start", remote_agent_url="http://A", remote_skill="alpha")
    ev(2, "remote_call_start", remote_agent_url="http://B", remote_skill="beta")
    ev(5, "remote_stream_event", remote_task_id="task-A", remote_task_state="working",
       remote_text_bytes=3)
    ev(6, "remote_stream_event", remote_task_id="task-B", remote_task_state="input-required",
       remote_text_bytes=3)
    ev(20, "remote_call_success", remote_task_id="task-B", remote_task_state="completed")
    ev(30, "remote_call_success", remote_task_id="task-A", remote_task_state="completed")
    ev(31, "node_success")
    return events


async def test_two_concurrent_calls_each_show_only_their_own_events() -> None:
    async with opened_on(_gather_events(), (160, 36)) as (_app, pilot, screen):
        wf = screen.query_one(Waterfall)
        shown: dict[str, tuple[list[str], str]] = {}
        for position in range(wf.row_count):
            if position:
                await pilot.press("j")
            row = wf.selected
            if row is not None and row.kind == "remote":
                shown[row.name] = (screen.query_one(EventLog).lines,
                                   text_of(screen.query_one(DetailPane)))
        alpha_log, alpha_detail = shown["alpha"]
        beta_log, beta_detail = shown["beta"]
        assert [line.split()[0] for line in alpha_log] == ["+1.0ms", "+5.0ms", "+30.0ms"]
        assert [line.split()[0] for line in beta_log] == ["+2.0ms", "+6.0ms", "+20.0ms"]
        assert not any("task-B" in line or "beta" in line for line in alpha_log)
        # The payload preview: alpha's own skill and states, none of beta's.
        assert "beta" not in alpha_detail and "input-required" not in alpha_detail
        assert "alpha" not in beta_detail and "task-A" not in beta_detail


WIDE_NAMES = ("数据处理节点数据处理节点数据处理节点", "🐧" * 15, "e\u0301" * 15, "短", "plain")


async def test_wide_and_combining_names_keep_the_waterfall_columns_aligned() -> None:
    events: list[StoredEvent] = []
    for n, name in enumerate(WIDE_NAMES):  # all start at 0 ms, all end at 10 ms
        for ms, kind in ((0, "node_start"), (10, "node_success")):
            ts = T0 + ms / 1000.0
            events.append(StoredEvent(TRACE, ts, kind, name, name,
                                      {"event": kind, "ts": ts, "node_name": name},
                                      invocation_id=f"{n + 1:016x}", span_id=f"{n + 1:016x}",
                                      seq=len(events) + 1, flow_name="demo", flow_id="f1"))
    async with opened_on(events, (120, 30)) as (_app, _pilot, screen):
        wf = screen.query_one(Waterfall)
        width = wf.scrollable_content_region.width
        lines = [wf.render_line(y).text for y in range(1, len(WIDE_NAMES) + 1)]
        # The bar starts, and the duration ends, in the same terminal cell on every row.
        bar_cells = {cell_len(line[: line.index("█")]) for line in lines}
        assert len(bar_cells) == 1, lines
        assert {cell_len(line) for line in lines} == {width}, lines
        assert all(line.endswith(" 10.0 ms") for line in lines), lines
        # (The first cell is the critical path's mark.)
        assert lines[0][1:].startswith("数据处理") and "…" in lines[0]
        assert lines[1][1:].startswith("🐧🐧") and "…" in lines[1]
        assert lines[2][1:].startswith("e\u0301" * 15 + " ") and "…" not in lines[2]


async def test_the_remote_tab_keeps_the_highlighted_call_through_a_replay_step() -> None:
    async with opened_on(demo_events(), (120, 30)) as (_app, pilot, screen):
        await pilot.press("r", *["right_square_bracket"] * 20, "2", "j")
        table = screen.query_one("#remote-calls", DataTable)
        split = screen.query_one("#remote-split")
        assert table.cursor_row == 1 and text_of(split).startswith("review")
        await pilot.press("comma")  # one event back: the tab is painted again
        assert screen.replay_t is not None and screen.replay_t < T0 + 0.131
        assert table.cursor_row == 1
        assert text_of(split).startswith("review"), text_of(split)


async def test_a_huge_error_is_cut_in_the_detail_pane_saying_how_much() -> None:
    error = "ValueError('" + "y" * 1_000_000 + "')"
    events: list[StoredEvent] = []
    for ms, kind, extra in ((0, "node_start", {}), (5, "node_failed", {"exception": error})):
        ts = T0 + ms / 1000.0
        events.append(StoredEvent(TRACE, ts, kind, "big", "big",
                                  {"event": kind, "ts": ts, "node_name": "big", **extra},
                                  invocation_id="i1", span_id="i1", seq=len(events) + 1,
                                  flow_name="demo", flow_id="f1"))
    async with opened_on(events, (120, 40)) as (_app, _pilot, screen):
        wf = screen.query_one(Waterfall)
        assert wf.selected is not None and wf.selected.name == "big"
        detail = text_of(screen.query_one(DetailPane))
        shown = 4000  # the pane's cap (widgets/detail.py ERROR_CHARS)
        assert f"… {len(error) - shown:,} more characters (pf inspect --json has " \
               "the whole error)" in " ".join(detail.split())
        assert "ValueError('yyyy" in detail
        assert len(detail) < 20 * shown


async def test_the_replay_bar_measures_time_and_total_from_the_first_event() -> None:
    """The first message waited 4 s in a queue (queued_ts 4 s before the first event):
    the trace lasted 1 s, and the bar counts from its first event."""
    events: list[StoredEvent] = []
    steps = ((0, "node_start", "a", -4000.0), (500, "node_success", "a", None),
             (500, "node_start", "b", 500.0), (1000, "node_success", "b", None))
    for ms, kind, node, queued in steps:
        ts = T0 + ms / 1000.0
        events.append(StoredEvent(TRACE, ts, kind, node, node,
                                  {"event": kind, "ts": ts, "node_name": node},
                                  invocation_id=f"i{node}", span_id=f"i{node}",
                                  seq=len(events) + 1, flow_name="demo", flow_id="f1",
                                  queued_ts=None if queued is None else T0 + queued / 1000.0))
    async with opened_on(events, (120, 20)) as (_app, pilot, screen):
        bar = screen.query_one(ReplayBar)

        def head() -> str:
            return " ".join(text_of(bar).split(" ev ")[0].split())

        await pilot.press("r")
        assert head() == "‖ 1x +0.0 ms/1.00 s", text_of(bar)
        assert "━" not in text_of(bar)
        await pilot.press("full_stop")
        assert head() == "‖ 1x +500.0 ms/1.00 s", text_of(bar)
        await pilot.press(*["left_square_bracket"] * 30)  # scrubbing stops at the start
        assert screen.replay_t == T0 and head() == "‖ 1x +0.0 ms/1.00 s"
        await pilot.press(*["right_square_bracket"] * 30)
        assert head() == "‖ 1x +1.00 s/1.00 s" and "─" not in text_of(bar)


async def test_the_filter_matches_the_shown_words_and_ands_them() -> None:
    async with opened_on(demo_events(), (120, 30)) as (_app, pilot, screen):
        wf = screen.query_one(Waterfall)

        async def names(query: str) -> list[str]:
            await pilot.press("slash", *query, "enter")
            shown = [row.name for i in range(wf.row_count)
                     if (row := wf.row_at(i)) is not None]
            await pilot.press("escape")  # clears the filter
            assert wf.query_text == ""
            return shown

        # The status words the screen shows, not the model's.
        assert await names("succeeded") == ["plan", "search", "fetch", "summarise",
                                            "summarise", "merge"]
        assert "plan" not in await names("ok")
        # Several words: each must match (a name and an id prefix here).
        assert await names("search b1000") == ["search"]
        assert await names("summarise succeeded") == ["summarise", "summarise"]
        assert await names("critic succeeded") == []


async def test_ctrl_c_exits_130_from_the_trace_the_list_and_the_search_box() -> None:
    async with InMemoryStateStore() as store:
        await store.save_events(demo_events())
        for mode, keys in (("trace", ()), ("trace", ("slash", "x")), ("traces", ())):
            app = InspectorApp(trace_id=TRACE, store=store, mode=mode)  # type: ignore[arg-type]
            async with app.run_test(size=(100, 30)) as pilot:
                if mode == "trace":
                    await opened(pilot)
                else:
                    await wait_for(pilot, lambda app=app: isinstance(app.screen, TracesScreen))
                await pilot.press(*keys, "ctrl+c")
                await wait_for(pilot, lambda app=app: app.return_code is not None,
                               what="the app to exit")
            assert app.return_code == 130, (mode, keys)


async def test_ctrl_c_copies_a_selection_in_the_search_box_and_quits_without_one() -> None:
    # The quit binding took Ctrl-C from the search box's copy (Textual's own Ctrl-C
    # copies a selection): with text selected it copies, as before; else it quits.
    from textual.widgets import Input
    from textual.widgets.input import Selection

    async with opened_on(demo_events(), (100, 30)) as (app, pilot, _):
        await pilot.press("slash", *"fetch")
        box = app.screen.query_one(Input)
        box.selection = Selection(0, len(box.value))
        await pilot.press("ctrl+c")
        await pilot.pause()
        assert app.return_code is None  # still open
        assert app.clipboard == "fetch"
        await pilot.press("ctrl+c")  # nothing selected now: quits
        await wait_for(pilot, lambda: app.return_code is not None, what="the app to exit")
    assert app.return_code == 130


async def test_ctrl_c_copies_a_mouse_selection_once_then_quits_with_the_search_box_focused(
) -> None:
    # A mouse selection copied while the search box had the focus was never
    # cleared: every Ctrl-C copied it again and none quit.
    from textual.selection import Selection as ScreenSelection

    async with opened_on(demo_events(), (100, 30)) as (app, pilot, _):
        await pilot.press("slash")
        summary = app.screen.query_one("#summary")
        app.screen.selections = {summary: ScreenSelection(None, None)}
        await pilot.pause()
        selected = app.screen.get_selected_text()
        assert selected
        await pilot.press("ctrl+c")
        await pilot.pause()
        assert app.return_code is None and app.clipboard == selected
        await pilot.press("ctrl+c")
        await wait_for(pilot, lambda: app.return_code is not None, what="the app to exit")
    assert app.return_code == 130


def _cycle_events() -> list[StoredEvent]:
    """A malformed wait graph: a names b as its parent, and b names a."""
    events: list[StoredEvent] = []
    for ms, kind, node, parent in ((0, "node_start", "a", "ib"), (1, "node_start", "b", "ia"),
                                   (5, "node_success", "a", "ib"),
                                   (6, "node_success", "b", "ia")):
        ts = T0 + ms / 1000.0
        events.append(StoredEvent(TRACE, ts, kind, node, node,
                                  {"event": kind, "ts": ts, "node_name": node},
                                  invocation_id=f"i{node}", parent_invocation_ids=(parent,),
                                  span_id=f"i{node}", seq=len(events) + 1, flow_name="demo",
                                  flow_id="f1"))
    return events


async def test_a_cycle_in_the_wait_graph_lists_each_invocation_once_on_the_critical_path(
) -> None:
    async with opened_on(_cycle_events(), (120, 20)) as (_app, pilot, screen):
        assert screen.full is not None
        assert screen.full.critical_path == ["ia", "ib"]
        assert text_of(screen.query_one("#summary")).rstrip().endswith("◆ 2")
        await pilot.press("r", *["full_stop"] * 3)  # at the last event
        assert screen.rows is not None and screen.rows.view.replay_t == T0 + 0.006
        assert screen.rows.view.critical_path == ["ia", "ib"]
        await pilot.press("comma")  # b still running: it "ends" last
        assert screen.rows.view.critical_path == ["ia", "ib"]
