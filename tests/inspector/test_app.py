"""Pilot tests of the inspector's Textual app on fixed-timestamp fixture traces.

Synchronisation is by condition, never by sleep: :func:`wait_for` pumps the
app's message queue (``pilot.pause()``) until a condition holds or a deadline
passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from textual.pilot import Pilot
from textual.widgets import DataTable, TabbedContent
from tui_traces import T0, TRACE, chain_events, demo_events, running_events

from penguiflow.state import InMemoryStateStore, StoredEvent
from penguiflow_inspector.app import InspectorApp
from penguiflow_inspector.model import build_trace
from penguiflow_inspector.screens import trace as trace_module
from penguiflow_inspector.screens.help import HelpScreen
from penguiflow_inspector.screens.message import MessageScreen
from penguiflow_inspector.screens.trace import FIRST_PAGE, TraceScreen
from penguiflow_inspector.screens.traces import TracesScreen
from penguiflow_inspector.widgets.detail import DetailPane
from penguiflow_inspector.widgets.event_log import EventLog
from penguiflow_inspector.widgets.remote_table import RemoteTable
from penguiflow_inspector.widgets.waterfall import Waterfall


async def wait_for(pilot: Pilot[Any], condition: Callable[[], bool], timeout: float = 10.0,
                   what: str = "condition") -> None:
    """Process the app's messages until ``condition()`` holds; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.01)


def trace_screen(app: InspectorApp) -> TraceScreen:
    screen = app.screen
    assert isinstance(screen, TraceScreen), screen
    return screen


async def opened(pilot: Pilot[Any]) -> TraceScreen:
    app = pilot.app
    assert isinstance(app, InspectorApp)
    await wait_for(pilot, lambda: isinstance(app.screen, TraceScreen)
                   and app.screen.loaded.is_set(), what="the trace to load")
    return trace_screen(app)


@contextlib.asynccontextmanager
async def live_screen(store: InMemoryStateStore) -> AsyncIterator[tuple[Pilot[Any], TraceScreen]]:
    """``pf inspect`` of TRACE's running events in ``store``: its screen, live, once it
    follows the store."""
    await store.save_events(running_events())
    app = InspectorApp(trace_id=TRACE, store=store)
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await opened(pilot)
        assert screen.live
        await wait_for(pilot, screen._following.is_set, what="the follower subscribed")
        yield pilot, screen


def text_of(widget: Any) -> str:
    """The plain text a Static-like widget shows."""
    from rich.console import Console

    console = Console(width=200, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(widget.content)
    console.file.close()
    return console.export_text()


@pytest.fixture
async def demo_store() -> Any:
    async with InMemoryStateStore() as store:
        await store.save_events(demo_events())
        yield store


async def test_navigation_selection_detail_and_log(demo_store: InMemoryStateStore) -> None:
    app = InspectorApp(trace_id=TRACE[:8], store=demo_store)  # a prefix is enough
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await opened(pilot)
        wf = screen.query_one(Waterfall)
        assert screen.trace_id == TRACE
        assert [wf.row_at(i).name for i in range(wf.row_count)] == [  # type: ignore[union-attr]
            "plan", "search", "fetch", "summarise", "summarise", "merge", "critic", "review",
            "late"]  # a deadline skip: a row at its time, the node never ran
        assert wf.selected is not None and wf.selected.name == "plan"
        await pilot.press("j", "j")
        assert wf.selected is not None and wf.selected.name == "fetch"
        detail = text_of(screen.query_one(DetailPane))
        assert "b200000000000002" in detail and "timed out" in detail and TRACE in detail
        assert [line.split()[1] for line in screen.query_one(EventLog).lines] == [
            "node_start", "node_timeout", "node_retry", "node_start", "node_success"]
        await pilot.press("k")
        assert wf.selected is not None and wf.selected.name == "search"
        assert "ConnectionError('search backend reset')" in text_of(screen.query_one(DetailPane))
        await pilot.press("G")
        assert wf.selected is not None and wf.selected.name == "late"
        await pilot.press("g")
        assert wf.cursor == 0
        # Mouse: line 0 is the axis, so the 4th line of the waterfall is row 3.
        await pilot.click(Waterfall, offset=(5, 4))
        assert wf.selected is not None and wf.selected.name == "summarise"
        assert wf.selected.kind == "inv"


async def test_tabs_remote_and_cancel(demo_store: InMemoryStateStore) -> None:
    app = InspectorApp(trace_id=TRACE, store=demo_store)
    async with app.run_test(size=(120, 32)) as pilot:
        screen = await opened(pilot)
        tabs = screen.query_one(TabbedContent)
        await pilot.press("2")
        assert tabs.active == "remote"
        table = screen.query_one("#remote-calls", DataTable)
        assert table.row_count == 2
        assert "task-91c2" in [str(c) for c in table.get_row_at(0)]
        stats = text_of(screen.query_one("#remote-stats"))
        assert "http://agents.local/summarise" in stats and "75.0 ms" in stats
        split = text_of(screen.query_one("#remote-split"))
        assert "submitted 10.5 ms" in split and "working 57.0 ms" in split
        await pilot.press("down")
        assert "no task states" not in text_of(screen.query_one("#remote-split"))
        await pilot.press("3")
        assert tabs.active == "cancel"
        cancel = text_of(screen.query_one("#cancel-table"))
        assert "task task-44d0 (trace_cancel)" in cancel
        assert "acknowledged" in cancel and "11.0 ms" in cancel
        assert "late by" in cancel and "25.0 ms" in cancel  # how late the skipped message was
        await pilot.press("1")
        assert tabs.active == "waterfall"
        assert isinstance(app.focused, Waterfall)
        assert isinstance(screen.query_one(RemoteTable), RemoteTable)


async def test_replay_stepping_scrub_and_play(demo_store: InMemoryStateStore) -> None:
    app = InspectorApp(trace_id=TRACE, store=demo_store)
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await opened(pilot)
        wf = screen.query_one(Waterfall)
        await pilot.press("r")
        assert screen.replay_t == pytest.approx(T0)
        assert wf.row_count == 1 and wf.row_at(0).status == "running"  # type: ignore[union-attr]
        await pilot.press("full_stop")
        assert screen.replay_t == pytest.approx(T0 + 0.010)
        assert wf.row_at(0).status == "ok"  # type: ignore[union-attr]
        await pilot.press("full_stop")
        # node_start of search, fetch, summarise share ts=12ms: one step shows all three.
        assert screen.replay_t == pytest.approx(T0 + 0.012)
        assert wf.row_count == 4
        running = [wf.row_at(i).status for i in range(1, 4)]  # type: ignore[union-attr]
        assert running == ["running"] * 3
        await pilot.press("full_stop")  # the remote call starts, in flight
        assert wf.row_count == 5 and wf.row_at(4).kind == "remote"  # type: ignore[union-attr]
        assert "ev 6/29" in text_of(screen.query_one("#replay"))
        await pilot.press("comma", "comma")
        assert screen.replay_t == pytest.approx(T0 + 0.010)
        await pilot.press("right_square_bracket")  # +5 % of 133 ms
        assert screen.replay_t == pytest.approx(T0 + 0.010 + 0.05 * 0.133)
        await pilot.press("plus")
        assert screen.speed_index == 5
        await pilot.press("minus", "minus")
        assert screen.speed_index == 3
        # Play at the slowest speed (0.01x: the rest of the trace takes ~12 s) so a
        # loaded machine cannot reach the end before the assertion; then pause.
        await pilot.press("minus", "minus", "minus")
        assert screen.speed_index == 0
        await pilot.press("space")
        assert screen.playing
        await pilot.press("space")
        assert not screen.playing
        for _ in range(5):
            await pilot.press("plus")
        await pilot.press("plus", "plus", "plus")  # 100x: plays 10 ms of trace per tick
        await pilot.press("space")
        await wait_for(pilot, lambda: not screen.playing, what="playback to reach the end")
        assert screen.replay_t == pytest.approx(screen.full.end)  # type: ignore[union-attr]
        await pilot.press("r")
        assert screen.replay_t is None and wf.row_count == 9


async def test_filter_by_node_kind_and_text(demo_store: InMemoryStateStore) -> None:
    app = InspectorApp(trace_id=TRACE, store=demo_store)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await opened(pilot)
        wf = screen.query_one(Waterfall)
        await pilot.press("slash", *"node:fetch")
        assert wf.row_count == 1 and wf.selected is not None and wf.selected.name == "fetch"
        search = screen.query_one("#search")
        search.value = "kind:cancelled"  # type: ignore[attr-defined]
        await pilot.pause()
        assert [wf.row_at(i).name for i in range(wf.row_count)] == [  # type: ignore[union-attr]
            "critic", "review"]
        search.value = "kind:remote task-91c2"  # type: ignore[attr-defined]
        await pilot.pause()
        assert wf.row_count == 1 and wf.selected is not None and wf.selected.kind == "remote"
        await pilot.press("enter")
        assert not search.display and isinstance(app.focused, Waterfall)
        assert "filter" in text_of(screen.query_one("#summary"))
        await pilot.press("escape")  # clears the filter
        assert wf.row_count == 9


async def test_live_updates_as_events_are_stored() -> None:
    events = demo_events()
    async with InMemoryStateStore() as store:
        await store.save_events(running_events())
        app = InspectorApp(trace_id=TRACE, store=store)
        async with app.run_test(size=(100, 30)) as pilot:
            screen = await opened(pilot)
            assert screen.live  # the summary said "running": the screen follows the store
            wf = screen.query_one(Waterfall)
            assert wf.row_count == 4
            await wait_for(pilot, lambda: screen.workers_in("follow"), what="the follower")
            await pilot.pause()
            await store.save_events(events[5:])
            await wait_for(pilot, lambda: wf.row_count == 9, what="the live rebuild")
            assert screen.full is not None and screen.full.status == "cancelled"
            assert "● live" in text_of(screen.query_one("#replay"))


async def test_a_live_screen_that_falls_behind_reloads_and_misses_nothing() -> None:
    """A follower bounded to 50 events gets a burst of 200 while a flow keeps storing
    one event per turn of the loop: it lags; the screen says so, follows again and
    re-reads the history while events keep coming, and ends showing each stored
    event once (none lost between the new follower and the history read)."""
    import dataclasses

    from penguiflow.followers import Followers

    more = [dataclasses.replace(e, seq=e.seq + 100) for e in chain_events(1500)]
    async with InMemoryStateStore() as store:
        store._followers = Followers(max_pending=50)
        async with live_screen(store) as (pilot, screen):
            # Recorded as said: a notification leaves the screen after a few
            # seconds, which a slow machine can take before the last check.
            notices: list[str] = []
            notify = screen.notify

            def recording(message: str, *args: Any, **kwargs: Any) -> None:
                notices.append(str(message))
                notify(message, *args, **kwargs)

            screen.notify = recording  # type: ignore[method-assign]

            async def flow() -> None:
                await store.save_events(more[:200])  # one publish: more than it may hold
                for stored in more[200:]:
                    await store.save_event(stored)
                    await asyncio.sleep(0)  # a busy flow: one event per turn

            writer = asyncio.create_task(flow())
            await wait_for(pilot, writer.done, timeout=60, what="the flow")
            history = await store.load_history(TRACE)
            await wait_for(pilot, lambda: len(screen.events) == len(history), timeout=60,
                           what="every stored event on screen")
            assert any("fell" in notice and "reloading" in notice for notice in notices)
            shown = [e.event_key for e in screen.events]  # in time order
            assert len(set(shown)) == len(shown)
            assert set(shown) == {e.event_key for e in history}


async def test_a_rebuild_overtaken_by_a_later_fold_never_puts_back_fewer_events() -> None:
    """A live fold's rebuild can post its view after a later fold extended the screen's
    events (a slow build under load): that view must not replace them. It did, and
    the events folded since were gone from the screen for good (the test above saw
    29-48 of 3,005 missing on a busy machine)."""
    import dataclasses

    from penguiflow_inspector.messages import TraceLoaded
    from penguiflow_inspector.widgets.rows import build_view

    async with InMemoryStateStore() as store, live_screen(store) as (pilot, screen):
        earlier = list(screen.events)  # what a first fold's rebuild was made of
        more = [dataclasses.replace(e, seq=e.seq + 100) for e in chain_events(20)]
        await store.save_events(more)
        total = len(earlier) + len(more)
        await wait_for(pilot, lambda: len(screen.events) == total, what="the fold")
        grown = screen.events
        screen.post_message(TraceLoaded(build_view(earlier), earlier, 0.0,
                                        generation=screen._generation, rebuilt=True))
        await pilot.pause()
        await pilot.pause()
        assert screen.events is grown and len(screen.events) == total
        assert len(screen.full.events) == total if screen.full is not None else False


async def test_unknown_id_shows_a_message_and_exits_2(demo_store: InMemoryStateStore) -> None:
    app = InspectorApp(trace_id="ffff", store=demo_store)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, MessageScreen), what="the message")
        assert "unknown trace id 'ffff'" in text_of(app.screen.query_one("#message-title"))
        assert "pf traces" in text_of(app.screen.query_one("#message-detail"))
        await pilot.press("q")
    assert app.return_code == 2


async def test_ambiguous_prefix_is_a_usage_error() -> None:
    async with InMemoryStateStore() as store:
        await store.save_events(demo_events("abc1" + "0" * 28) + demo_events("abc2" + "0" * 28))
        app = InspectorApp(trace_id="abc", store=store)
        async with app.run_test() as pilot:
            await wait_for(pilot, lambda: isinstance(app.screen, MessageScreen))
            assert "ambiguous" in text_of(app.screen.query_one("#message-title"))
            await pilot.press("q")
        assert app.return_code == 2


async def test_store_down_shows_a_message_and_exits_1() -> None:
    store = InMemoryStateStore()
    await store.close()  # every read now raises StoreUnavailable
    app = InspectorApp(trace_id=TRACE, store=store)
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, MessageScreen))
        assert "store is unavailable" in text_of(app.screen.query_one("#message-title"))
        await pilot.press("q")
    assert app.return_code == 1


async def test_bad_store_url_shows_a_message_and_exits_2() -> None:
    app = InspectorApp("nosuch://x", TRACE)
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, MessageScreen))
        assert "cannot open the store" in text_of(app.screen.query_one("#message-title"))
        assert "unsupported store URL" in text_of(app.screen.query_one("#message-detail"))
        await pilot.press("q")
    assert app.return_code == 2


async def test_opens_its_own_sqlite_store(tmp_path: Path) -> None:
    from penguiflow_exporters import open_store

    url = f"sqlite:///{tmp_path}/traces.db"
    async with open_store(url) as store:
        await store.save_events(demo_events())
    app = InspectorApp(url, TRACE)
    async with app.run_test() as pilot:
        screen = await opened(pilot)
        assert screen.query_one(Waterfall).row_count == 9
        assert screen.timings["summary"] <= screen.timings["waterfall"]
        await pilot.press("q")
    assert app.return_code == 0


async def test_traces_screen_filters_and_opens_a_trace() -> None:
    async with InMemoryStateStore() as store:
        ids = [f"{i:032x}" for i in range(1, 4)]
        for n, trace_id in enumerate(ids):
            events = demo_events(trace_id) if n != 1 else chain_events(3, trace_id)
            for ev in events:  # trace n starts n seconds later
                ev.ts += n
            await store.save_events(events)
        app = InspectorApp(store=store, mode="traces")
        async with app.run_test(size=(100, 24)) as pilot:
            await wait_for(pilot, lambda: isinstance(app.screen, TracesScreen)
                           and app.screen.query_one(DataTable).row_count == 3)
            screen = app.screen
            assert isinstance(screen, TracesScreen)
            table = screen.query_one(DataTable)
            # newest first; the id column shows a 12-character prefix (pf inspect takes one)
            assert [table.coordinate_to_cell_key((i, 0)).row_key.value
                    for i in range(3)] == ids[::-1]
            assert [str(table.get_row_at(i)[0]) for i in range(3)] == [
                i[:12] for i in ids[::-1]]
            await pilot.press("s", "s", "s")  # any -> cancelled -> failed -> incomplete
            await pilot.press("s")  # -> running
            await pilot.press("s")  # -> succeeded
            await wait_for(pilot, lambda: table.row_count == 1)
            assert screen.status == "succeeded"
            await pilot.press("s")  # back to any
            await pilot.press("e")  # with errors: the two demo traces
            await wait_for(pilot, lambda: table.row_count == 2)
            await pilot.press("e", "e", "o")
            await wait_for(pilot, lambda: table.row_count == 3 and screen.order == "slowest")
            await pilot.press("n", *"merge", "enter")
            await wait_for(pilot, lambda: table.row_count == 2)
            assert "node merge" in text_of(screen.query_one("#filters"))
            await pilot.press("enter")
            opened_screen = await opened(pilot)
            assert opened_screen.trace_id in ids
            await pilot.press("escape")  # back to the list
            assert isinstance(app.screen, TracesScreen)


async def test_tail_mode_reloads_the_list_as_traces_arrive() -> None:
    async with InMemoryStateStore() as store:
        await store.save_events(demo_events())
        app = InspectorApp(store=store, mode="tail")
        async with app.run_test() as pilot:
            await wait_for(pilot, lambda: isinstance(app.screen, TracesScreen)
                           and app.screen.query_one(DataTable).row_count == 1)
            screen = app.screen
            assert isinstance(screen, TracesScreen)
            await wait_for(pilot, lambda: any(w.group == "follow" and not w.is_finished
                                              for w in screen.workers))
            await pilot.pause()
            await store.save_events(chain_events(2, "1" * 32))
            await wait_for(pilot, lambda: screen.query_one(DataTable).row_count == 2)


async def test_help_and_theme(demo_store: InMemoryStateStore) -> None:
    app = InspectorApp(trace_id=TRACE, store=demo_store)
    async with app.run_test(size=(80, 24)) as pilot:
        await opened(pilot)
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        assert isinstance(app.screen, TraceScreen)
        dark = app.current_theme.dark
        await pilot.press("t")
        assert app.current_theme.dark is not dark
        await pilot.press("c")
        assert not app.screen.query_one(Waterfall).show_critical


class GatedStore(InMemoryStateStore):
    """Holds every history page after the first until ``gate`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.pages: list[tuple[int, int]] = []

    async def load_history_page(self, trace_id: str, *, offset: int = 0,
                                limit: int) -> Sequence[StoredEvent]:
        self.pages.append((offset, limit))
        if offset > 0:
            await self.gate.wait()
        return await super().load_history_page(trace_id, offset=offset, limit=limit)


async def test_a_big_trace_paints_its_first_page_then_the_whole_trace(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trace_module, "REST_PAGE", 1500)  # the rest in two pages
    events = chain_events(FIRST_PAGE)  # two events per invocation: 4,000
    async with GatedStore() as store:
        await store.save_events(events)
        app = InspectorApp(trace_id=TRACE, store=store)
        async with app.run_test(size=(100, 30)) as pilot:
            await wait_for(pilot, lambda: isinstance(app.screen, TraceScreen)
                           and app.screen.rows is not None, what="the first screen")
            screen = trace_screen(app)
            wf = screen.query_one(Waterfall)
            # the first screen: the first page's invocations, marked partial
            assert not screen.loaded.is_set() and screen.events == []
            assert wf.row_count == FIRST_PAGE // 2
            summary = text_of(screen.query_one("#summary"))
            assert f"loading 2,000 / {len(events):,} events" in summary, summary
            assert wf.render_line(1).cell_length == wf.scrollable_content_region.width
            await pilot.press("j")  # the partial screen is usable
            assert wf.cursor == 1
            store.gate.set()
            await opened(pilot)
            assert wf.row_count == FIRST_PAGE and len(screen.events) == len(events)
            assert screen.events == events and screen.full is not None
            summary = text_of(screen.query_one("#summary"))
            assert "loading" not in summary and f"{len(events)} ev" in summary, summary
            assert store.pages == [(0, FIRST_PAGE), (FIRST_PAGE, 1500),
                                   (FIRST_PAGE + 1500, 1500)]
            assert "first screen" in screen.timings and "waterfall" in screen.timings


async def test_a_trace_within_one_page_is_read_once_and_never_partial() -> None:
    async with GatedStore() as store:
        await store.save_events(chain_events(FIRST_PAGE // 2 - 1))
        app = InspectorApp(trace_id=TRACE, store=store)
        async with app.run_test(size=(100, 30)) as pilot:
            screen = await opened(pilot)
            assert store.pages == [(0, FIRST_PAGE)]
            assert "first screen" not in screen.timings and screen.loading_note == ""


async def test_a_store_without_pages_is_read_whole() -> None:
    class OldStore(InMemoryStateStore):
        def __getattribute__(self, name: str) -> Any:
            if name == "load_history_page":
                raise AttributeError(name)
            return super().__getattribute__(name)

    async with OldStore() as store:
        await store.save_events(chain_events(FIRST_PAGE))
        app = InspectorApp(trace_id=TRACE, store=store)
        async with app.run_test(size=(100, 30)) as pilot:
            screen = await opened(pilot)
            assert screen.query_one(Waterfall).row_count == FIRST_PAGE
            assert "first screen" not in screen.timings


async def test_large_trace_scrolls_by_drawing_only_visible_rows() -> None:
    view = build_trace(chain_events(5000))
    app = InspectorApp(view=view)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await opened(pilot)
        wf = screen.query_one(Waterfall)
        assert wf.row_count == 5000
        await pilot.press("G")
        assert wf.cursor == 4999 and wf.scroll_offset.y > 4900
        await pilot.press("pageup")
        assert wf.cursor < 4999
        line = wf.render_line(1)
        assert line.cell_length == wf.scrollable_content_region.width


def test_trace_mode_needs_an_id() -> None:
    with pytest.raises(ValueError, match="needs a trace_id"):
        InspectorApp()
