"""The TUI says what ``pf traces`` and ``pf inspect --plain`` say: the store's status
words and symbols, one duration format, deadline skips as skipped rows, relative
deadlines, and never the runtime's internal endpoint names (OpenSea, Rookery)."""

from __future__ import annotations

from test_app import opened, text_of, wait_for
from test_app_escaping import screen_text
from tui_traces import TRACE, demo_events

from penguiflow.state import InMemoryStateStore
from penguiflow_inspector import render
from penguiflow_inspector.app import InspectorApp
from penguiflow_inspector.model import STATUS_SYMBOL, build_trace, format_duration
from penguiflow_inspector.screens.traces import TracesScreen
from penguiflow_inspector.widgets.detail import DetailPane
from penguiflow_inspector.widgets.event_log import EventLog
from penguiflow_inspector.widgets.waterfall import Waterfall


async def test_a_deadline_skip_is_a_skipped_row_with_a_relative_deadline() -> None:
    async with InMemoryStateStore() as store:
        await store.save_events(demo_events())
        app = InspectorApp(trace_id=TRACE, store=store)
        async with app.run_test(size=(120, 32)) as pilot:
            screen = await opened(pilot)
            wf = screen.query_one(Waterfall)
            await pilot.press("G")
            row = wf.selected
            assert row is not None and (row.kind, row.name, row.status) == (
                "skip", "late", "skipped")
            assert "late" in screen_text(app) and STATUS_SYMBOL["skipped"] in screen_text(app)
            detail = text_of(screen.query_one(DetailPane))
            assert f"skipped {STATUS_SYMBOL['skipped']}" in detail
            assert "skipped at +127.0 ms" in detail  # relative to the trace's start (-2 ms)
            assert "deadline   +102.0 ms" in detail
            assert "late by    25.0 ms" in detail
            assert [line.split()[1] for line in screen.query_one(EventLog).lines] == [
                "deadline_skip"]
            # The filter finds it as pf's kind:skipped does.
            await pilot.press("slash", *"kind:skipped", "enter")
            assert [wf.row_at(i).name for i in range(wf.row_count)] == ["late"]  # type: ignore[union-attr]


async def test_status_words_symbols_and_durations_match_pf() -> None:
    view = build_trace(demo_events())
    plain = render.trace_text(view)
    async with InMemoryStateStore() as store:
        await store.save_events(demo_events())
        app = InspectorApp(trace_id=TRACE, store=store)
        async with app.run_test(size=(120, 32)) as pilot:
            screen = await opened(pilot)
            summary = text_of(screen.query_one("#summary"))
            # --plain: "status cancelled ... 131.0 ms"; the header says the same.
            assert "status cancelled" in plain and "cancelled" in summary
            assert format_duration(view.duration_ms) in plain
            assert format_duration(view.duration_ms) in summary
            assert summary.startswith(STATUS_SYMBOL["cancelled"])
            # Attempts say what --plain says of them.
            await pilot.press("j", "j")  # fetch: timed out, then succeeded
            detail = text_of(screen.query_one(DetailPane))
            assert "succeeded" in detail and "timed out" in detail
            await pilot.press("escape")  # (no filter open) -> the trace list
            await wait_for(pilot, lambda: isinstance(app.screen, TracesScreen)
                           and bool(app.screen.summaries), what="the list")
            await pilot.pause()
            assert f"{STATUS_SYMBOL['cancelled']} cancelled" in screen_text(app)


async def test_the_runtime_endpoints_are_never_named() -> None:
    """The fixture's cancel events name OpenSea and Rookery (as the runtime's do)."""
    assert {e.node_name for e in demo_events()} >= {"OpenSea", "Rookery"}
    async with InMemoryStateStore() as store:
        await store.save_events(demo_events())
        app = InspectorApp(trace_id=TRACE, store=store)
        async with app.run_test(size=(120, 40)) as pilot:
            screen = await opened(pilot)
            log = screen.query_one(EventLog)
            await pilot.press("slash", *"node:nothing-matches", "enter")  # no row selected:
            assert len(log.lines) == len(demo_events())  # the log shows every event
            lines = "\n".join(log.lines)
            assert "trace_cancel_start  emit" in lines and "trace_cancel_finish result" in lines
            for tab in ("1", "2", "3"):
                await pilot.press(tab)
                await pilot.pause()
                text = screen_text(app) + lines
                assert "OpenSea" not in text and "Rookery" not in text


async def test_a_deadline_skip_with_no_node_or_deadline_is_still_a_row() -> None:
    """Error path: a ``deadline_skip`` written without a node name or a deadline (another
    writer, an older runtime) is a ``?`` skipped row; the pane leaves out what it lacks."""
    events = [e for e in demo_events() if e.kind != "deadline_skip"]
    skip = next(e for e in demo_events() if e.kind == "deadline_skip")
    skip.node_name = None
    skip.payload = {k: v for k, v in skip.payload.items()
                    if k not in ("deadline_s", "node_name")}
    async with InMemoryStateStore() as store:
        await store.save_events([*events, skip])
        app = InspectorApp(trace_id=TRACE, store=store)
        async with app.run_test(size=(120, 32)) as pilot:
            screen = await opened(pilot)
            await pilot.press("G")
            row = screen.query_one(Waterfall).selected
            assert row is not None and (row.name, row.status) == ("?", "skipped")
            detail = text_of(screen.query_one(DetailPane))
            assert "skipped at +127.0 ms" in detail
            assert "deadline   " not in detail and "late by" not in detail
