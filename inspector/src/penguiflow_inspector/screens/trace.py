"""The trace screen: waterfall + detail + event log, Remote and Cancel tabs, replay, live.

Loading (all in ``@work`` workers that post back, see ``messages.py``):

1. resolve the id (a unique prefix is enough), then ``get_trace`` -> the
   summary line is painted at once (O(1) in every store);
2. the first page of events (``load_history_page``, :data:`FIRST_PAGE` events)
   + ``build_trace`` (in a thread) -> the waterfall. A trace that fits in that
   page is then complete; a bigger one paints this first screen at once, marked
   "loading n / total events" in the summary line, reads the rest page by page
   (:data:`REST_PAGE`) and swaps in the full view when it is built. A store
   without ``load_history_page`` is read whole with ``load_history``.

Live: when the trace is running (or the app was opened by ``pf tail``), a
worker follows the store and posts each event; a 4 Hz timer folds what arrived
into a rebuild, so a busy trace costs at most four rebuilds a second. The
follower starts before the history is read (what both see is folded once, by
event key), so no event committed in between is missed.

Replay: ``r`` enters replay at the trace's first event; the screen then shows
``view.at(t)`` (in-flight invocations drawn open-ended) on the full trace's
time axis. ``,``/``.`` step event by event, ``[``/``]`` scrub by 5 %, space
plays at the chosen speed, a click on the replay bar jumps there.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import Footer, Input, Static, TabbedContent, TabPane

from penguiflow.state import FollowerLagged, StateStoreError, StoredEvent

from ..messages import EventsArrived, LoadFailed, RowSelected, ScrubTo, SummaryLoaded, TraceLoaded
from ..model import STATUS_SYMBOL, TraceView, format_duration, printable, status_word
from ..widgets._keys import KeyedScroll
from ..widgets.cancel_table import CancelTable
from ..widgets.detail import DetailPane
from ..widgets.event_log import EventLog
from ..widgets.remote_table import RemoteTable
from ..widgets.replay_bar import ReplayBar
from ..widgets.rows import Row, Rows, build_view, parse_query, view_at
from ..widgets.waterfall import Waterfall

if TYPE_CHECKING:
    from penguiflow.state import TraceStore, TraceSummary

__all__ = ["SPEEDS", "TraceScreen"]

#: Replay speeds (x recorded time); the default is 1x.
SPEEDS = (0.01, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 100.0)
_TICK_S = 0.1
_LIVE_REFRESH_S = 0.25
#: Events read and built first (a trace that fits is read in one query; a bigger
#: one shows a first screen from them while the rest loads).
FIRST_PAGE = 2000
#: Events per later read: the rest of a big trace, with progress in between. Big:
#: each read skips its offset on the store's index (Postgres visits those rows).
REST_PAGE = 50_000


class TraceScreen(Screen[None]):
    """One trace. Open with a store and an id (or id prefix), or with a built view."""

    CSS_PATH = "trace.tcss"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("1", "show_tab('waterfall')", "Waterfall"),
        Binding("2", "show_tab('remote')", "Remote"),
        Binding("3", "show_tab('cancel')", "Cancel"),
        Binding("slash", "search", "Search"),
        Binding("escape", "escape", "Back", show=False),
        Binding("r", "replay", "Replay"),
        Binding("space", "play", "Play", show=False),
        Binding("full_stop", "step(1)", "Step", show=False),
        Binding("comma", "step(-1)", "Step back", show=False),
        Binding("plus,equals_sign", "speed(1)", "Faster", show=False),
        Binding("minus", "speed(-1)", "Slower", show=False),
        Binding("right_square_bracket", "scrub(0.05)", "Scrub +", show=False),
        Binding("left_square_bracket", "scrub(-0.05)", "Scrub -", show=False),
        Binding("c", "critical", "Critical", show=False),
    ]

    def __init__(self, store: TraceStore | None, trace_id: str | None = None, *,
                 view: TraceView | None = None, live: bool = False) -> None:
        super().__init__()
        self.store = store
        self.trace_id = trace_id or (view.trace_id if view is not None else "")
        self.full: TraceView | None = view
        self.rows: Rows | None = None
        #: Rows of the full view: its event times drive stepping and the bar's count.
        self._index: Rows | None = None
        self.summary: TraceSummary | None = None
        self.live = live
        self.events: list[StoredEvent] = []
        self._keys: set[str] = set()
        self._pending: list[StoredEvent] = []
        #: Set once the live follower has started (see :meth:`follow`).
        self._following = asyncio.Event()
        #: Bumped by a reload: a view made from events of an earlier generation
        #: (a live rebuild still running) must not replace the reloaded history.
        self._generation = 0
        self.replay_t: float | None = None
        self.playing = False
        self.speed_index = SPEEDS.index(1.0)
        self._play_timer: Timer | None = None
        self.loaded = asyncio.Event()
        #: Wall seconds from mount to the summary / the waterfall (the benchmark reads them).
        self.timings: dict[str, float] = {}
        self._mounted_at = 0.0
        #: "loading n / total events" while a big trace's first screen is shown.
        self.loading_note = ""
        #: What the detail pane and event log were last drawn from (see _show_selection).
        self._selection_shown: tuple[object, ...] | None = None

    # ------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        yield Static("loading…", id="summary")
        with TabbedContent(id="tabs", initial="waterfall"):
            with TabPane("Waterfall", id="waterfall"), Horizontal(id="waterfall-body"):
                with Vertical(id="waterfall-left"):
                    yield Waterfall(id="wf", on_select=self._show_selection)
                    yield EventLog(id="log")
                with KeyedScroll(id="detail-scroll"):
                    yield DetailPane(id="detail")
            with TabPane("Remote", id="remote"):
                yield RemoteTable(id="remote-table")
            with TabPane("Cancel & deadline", id="cancel"), KeyedScroll(id="cancel-scroll"):
                yield CancelTable(id="cancel-table")
        yield Input(placeholder="filter: node:NAME kind:remote|error|timeout|cancelled text",
                    id="search")
        yield ReplayBar(id="replay")
        yield Footer()

    def on_mount(self) -> None:
        self._mounted_at = time.perf_counter()
        self.query_one("#search", Input).display = False
        self.query_one(Waterfall).focus()
        self.set_interval(_LIVE_REFRESH_S, self._fold_pending)
        if self.full is not None:
            self._show_full(self.full)
        else:
            if self.live:
                self.follow()
            self.load()

    # ------------------------------------------------------------ loading

    @work(exclusive=True, group="load")
    async def load(self) -> None:
        """Resolve the id, paint the summary, then load and rebuild the events."""
        assert self.store is not None
        store = self.store
        t0 = time.perf_counter()
        generation = self._generation
        try:
            matches = await store.resolve_trace_id(self.trace_id)
            if not matches:
                self.post_message(LoadFailed(
                    f"unknown trace id {self.trace_id!r}",
                    "No trace with this id or prefix in the store. "
                    "`pf traces` lists the recorded ones.", 2))
                return
            if len(matches) > 1:
                self.post_message(LoadFailed(
                    f"ambiguous trace id prefix {self.trace_id!r}",
                    "It matches: " + ", ".join(matches) + ". Type more of the id.", 2))
                return
            self.trace_id = matches[0]
            summary = await store.get_trace(self.trace_id)
            if summary is not None:
                # An incomplete trace (its store lost events) may still be running.
                if summary.status in ("running", "incomplete") \
                        and not self.workers_in("follow"):
                    self.live = True
                    self.follow()  # before reading the history: nothing falls in between
                    await self._following.wait()
                self.post_message(SummaryLoaded(summary))
            page_of = getattr(store, "load_history_page", None)
            if page_of is None:  # a TraceStore from before load_history_page
                events = list(await store.load_history(self.trace_id))
            else:
                events = list(await page_of(self.trace_id, limit=FIRST_PAGE))
                if len(events) == FIRST_PAGE:
                    total = summary.event_count if summary is not None else 0
                    await self._load_rest(page_of, events, total, t0, generation)
        except StateStoreError as exc:
            self.loading_note = ""
            self.post_message(LoadFailed("the store is unavailable", str(exc), 1))
            return
        if not events:  # resolved a moment ago, its events since deleted (as `--plain` says)
            self.post_message(LoadFailed(
                f"trace {self.trace_id} has no stored events",
                "The store lists this trace but holds none of its events "
                "(deleted, or not written yet). `pf traces` lists the recorded ones.", 1))
            return
        view = await asyncio.to_thread(build_view, events)
        self.post_message(TraceLoaded(view, events, time.perf_counter() - t0,
                                      generation=generation))

    async def _load_rest(self, page_of: Any, events: list[StoredEvent], total: int,
                         t0: float, generation: int) -> None:
        """A big trace: paint a first screen from ``events`` (the first page), then
        append the rest page by page, updating the "loading n / total" note."""
        head = await asyncio.to_thread(build_view, list(events))
        self._set_loading(len(events), total)
        self.post_message(TraceLoaded(head, list(events), time.perf_counter() - t0,
                                      partial=max(total, len(events)),
                                      generation=generation))
        while True:
            page = await page_of(self.trace_id, offset=len(events), limit=REST_PAGE)
            events += page
            if len(page) < REST_PAGE:
                break
            self._set_loading(len(events), total)
        self._set_loading(len(events), len(events), building=True)

    def _set_loading(self, loaded: int, total: int, *, building: bool = False) -> None:
        total = max(total, loaded)  # a running trace can outgrow its summary
        self.loading_note = (f"building {total:,} events…" if building
                             else f"loading {loaded:,} / {total:,} events")
        if self.full is not None:
            self._paint_summary()

    @work(group="follow")
    async def follow(self) -> None:
        """Post each event stored for this trace from now on (ends with the screen).

        Sets ``_following`` once the store's follower has taken its first step: a
        SQLite or in-memory follower has then marked where it starts (on the
        store's one reading thread, ahead of any later read), so the history read
        after it (see :meth:`load`) leaves no gap between the two.
        """
        assert self.store is not None
        events = self.store.follow(self.trace_id or None)
        first = asyncio.ensure_future(anext(events, None))
        lagged = False
        try:
            await asyncio.sleep(0)  # the follower's first step runs
            self._following.set()
            event = await first
            while event is not None:
                if not self.trace_id or event.trace_id == self.trace_id:
                    self.post_message(EventsArrived([event]))
                event = await anext(events, None)
        except FollowerLagged as exc:
            # The screen fell behind a very busy trace: what it missed is in the
            # store, so follow again and re-read the history (arrivals are
            # deduplicated against it by event key).
            lagged = True
            self.notify(f"live updates fell {exc.skipped:,} events behind; reloading",
                        severity="warning", markup=False)
        except StateStoreError as exc:
            self.notify(f"live updates stopped: {printable(exc)}", severity="warning",
                        markup=False)
        finally:
            self._following.set()
            if not first.done():  # the screen closed before the first event
                first.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await first
            # A TraceStore's follow() need only be an AsyncIterator; ours are
            # generators, closed here to release what they hold.
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                await aclose()
        if lagged:
            await self._reload_live()

    async def _reload_live(self) -> None:
        """After a lag: follow again, then re-read the history, leaving no gap.

        The new follower must have subscribed before the history is read (an
        event stored in between is then in one or the other, or both:
        deduplicated by key), and arrivals wait unfolded until the reloaded
        history is shown (folded into the old events, they would be replaced by
        it); a view a live rebuild is still making is stale.
        """
        self._generation += 1
        self.loaded.clear()
        self.workers.cancel_group(self, "rebuild")
        self._following.clear()
        self.follow()
        await self._following.wait()
        self.load()

    @work(exclusive=True, group="rebuild")
    async def _rebuild(self, events: list[StoredEvent]) -> None:
        t0 = time.perf_counter()
        generation = self._generation
        view = await asyncio.to_thread(build_view, events)
        self.post_message(TraceLoaded(view, events, time.perf_counter() - t0,
                                      generation=generation, rebuilt=True))

    def on_summary_loaded(self, message: SummaryLoaded) -> None:
        self.summary = message.summary
        self.timings.setdefault("summary", time.perf_counter() - self._mounted_at)
        s = message.summary
        if self.full is None:
            self._paint_summary(f"loading {s.event_count} events…")

    def workers_in(self, group: str) -> bool:
        return any(w.group == group and not w.is_finished for w in self.workers)

    def on_trace_loaded(self, message: TraceLoaded) -> None:
        if message.generation != self._generation:
            return  # made before a reload: the reloaded history replaces it
        if message.rebuilt:
            # The screen's events are already what the rebuild was made of, or more:
            # a fold after it extended them (its own rebuild follows). A rebuild's view
            # that was overtaken so must not put back its shorter list: the events
            # folded since would be lost from the screen, their keys with them (seen
            # under load: 29-48 of 3,005 events missing for good).
            if message.events is self.events:
                self._show_full(message.view)
            return
        if message.partial:
            if self.loaded.is_set():  # the full view won the race (cannot happen today)
                return
            self.timings.setdefault("first screen", time.perf_counter() - self._mounted_at)
            self.full = message.view
            self._index = Rows.of(message.view)
            self._show(message.view, now=None)
            return
        self.loading_note = ""
        self.events = list(message.events)
        self._keys = {k for e in self.events if (k := e.event_key) is not None}
        self.timings.setdefault("waterfall", time.perf_counter() - self._mounted_at)
        self._show_full(message.view)

    def on_load_failed(self, message: LoadFailed) -> None:
        # (The message then bubbles up to the app, which shows it: once.)
        self.query_one("#summary", Static).update(Text(printable(message.title),
                                                       style="bold red"))

    def on_events_arrived(self, message: EventsArrived) -> None:
        for event in message.events:
            key = event.event_key
            if key is None or key not in self._keys:
                self._pending.append(event)

    def _fold_pending(self) -> None:
        """Throttled live refresh: rebuild once with everything that arrived."""
        if not self._pending or self.full is None or not self.loaded.is_set():
            return  # (while a big trace loads, what arrives waits for its full view)
        fresh: list[StoredEvent] = []
        for event in self._pending:
            key = event.event_key
            if key is None or key not in self._keys:  # not already in the loaded history
                fresh.append(event)
                if key is not None:
                    self._keys.add(key)
        self._pending = []
        if not fresh:
            return
        events = [*self.events, *fresh]
        events.sort(key=lambda e: (e.ts, e.seq))
        self.events = events
        self._rebuild(events)

    # ------------------------------------------------------------ painting

    def _show_full(self, view: TraceView) -> None:
        self.full = view
        self._index = Rows.of(view)
        if self.replay_t is not None:
            self._show_at(self.replay_t)
        else:
            self._show(view, now=None)
        self.loaded.set()

    def _show(self, view: TraceView, *, now: float | None) -> None:
        assert self.full is not None
        if view is self.full and self._index is not None:
            self.rows = self._index
        else:
            self.rows = Rows.of(view, self._index)
        full = self.full
        self.query_one(Waterfall).set_rows(self.rows, span=(full.start, max(full.end,
                                                                           full.start + 1e-6)),
                                           now=now)
        self._paint_summary()
        self._paint_tabs()
        self._paint_replay()

    def _paint_summary(self, note: str = "") -> None:
        view, s = self.full, self.summary
        text = Text()
        status: str
        if view is not None:
            status, lost = view.status, view.events_lost
            duration = format_duration(view.duration_ms)
            flow, counts = view.flow_name or "", (f"{len(view.invocations)} inv · "
                                                  f"{len(view.remote_calls)} remote · "
                                                  f"{len(view.events)} ev")
        elif s is not None:
            status, duration, lost = s.status, format_duration(s.duration_ms), s.events_lost
            flow, counts = s.flow_name or "", f"{s.node_count} inv · {s.event_count} ev"
        else:
            return
        word = status_word(status)
        style = {"succeeded": "green", "failed": "bold red", "cancelled": "bold magenta",
                 "running": "cyan", "incomplete": "bold yellow", "skipped": "dim"}.get(word, "")
        symbol = STATUS_SYMBOL.get(word)
        if symbol:
            text.append(f"{symbol} ", style=style)
        text.append(f"{printable(self.trace_id[:12])} ", style="bold")
        if flow:
            text.append(f"{printable(flow)} ")
        text.append(f"{word} ", style=style)
        if lost:  # the store could not keep some events: say how many, beside any status
            text.append(f"({lost} event{'' if lost == 1 else 's'} lost) ", style="bold yellow")
        text.append(f"{duration} · {counts}")
        if view is not None and view.critical_path:
            text.append(f" · ◆ {len(view.critical_path)}", style="yellow")
        wf = self.query_one(Waterfall)
        if wf.query_text:
            text.append(f" · filter {printable(wf.query_text)!r}: {wf.row_count}",
                        style="italic")
        if note := note or self.loading_note:
            text.append(f" · {note}", style="italic dim")
        self.query_one("#summary", Static).update(text, layout=False)  # one line (trace.tcss)

    def _current(self) -> TraceView | None:
        return self.rows.view if self.rows is not None else self.full

    def _paint_tabs(self) -> None:
        view = self._current()
        if view is None:
            return
        active = self.query_one(TabbedContent).active
        if active == "remote":
            self.query_one(RemoteTable).show(view)
        elif active == "cancel":
            self.query_one(CancelTable).show(view)

    def on_row_selected(self, message: RowSelected) -> None:
        self._show_selection(message.row)

    def _show_selection(self, row: Row | None) -> None:
        """The detail pane and event log of ``row`` (the waterfall calls it synchronously,
        so they are painted in the same frame as the waterfall)."""
        if self.rows is None:
            return
        view = self.rows.view
        events = self.rows.events_for(row)
        # What the two panes show depends on nothing else: unchanged (a replay step
        # that leaves the selected row as it was), they are not rendered again.
        shown = ((view.trace_id, view.start, view.otel_trace_id, view.status, view.end)
                 if row is None else (row.kind, row.item, view.start, view.otel_trace_id),
                 len(events), events[-1] if events else None)
        if shown == self._selection_shown:
            return
        self._selection_shown = shown
        self.query_one(DetailPane).show(view, row, events)
        self.query_one(EventLog).show(events, view.start)

    @on(TabbedContent.TabActivated)
    def _tab_changed(self) -> None:
        self._paint_tabs()

    # ------------------------------------------------------------ replay

    def _show_at(self, t: float) -> None:
        assert self.full is not None
        self.replay_t = t
        self._show(view_at(self.full, t), now=t)

    def _paint_replay(self) -> None:
        full, index = self.full, self._index
        if full is None or index is None:
            return
        t = self.replay_t
        total = len(full.events)
        # Time and total from one origin, the first event (where duration_ms starts):
        # the root's queued start may be earlier.
        self.query_one(ReplayBar).show(
            replaying=t is not None, playing=self.playing, speed=SPEEDS[self.speed_index],
            t_ms=0.0 if t is None else max(0.0, t - _origin(full)) * 1e3,
            total_ms=full.duration_ms,
            event_no=total if t is None else index.events_until(t), event_count=total,
            live=self.live)

    def action_replay(self) -> None:
        """Enter replay at the first event, or leave it (back to the full trace)."""
        if self.full is None:
            return
        if self.replay_t is None:
            # The earliest event (not the log's first: several processes' batches
            # are stored in the order they were written).
            first = self.full.first_event_ts
            first = self.full.start if first is None else first
            self._show_at(first)
        else:
            self._stop_play()
            self.replay_t = None
            self._show(self.full, now=None)

    def action_step(self, direction: int) -> None:
        if self.full is None:
            return
        if self.replay_t is None:
            self.action_replay()
            return
        assert self._index is not None and self.replay_t is not None
        t = self.replay_t
        target = (self._index.next_event_ts(t) if direction > 0
                  else self._index.prev_event_ts(t))
        if target is not None:
            self._show_at(target)

    def action_scrub(self, fraction: float) -> None:
        if self.full is None:
            return
        full = self.full
        origin = _origin(full)  # the replay bar's 0 (see _paint_replay)
        t = self.replay_t if self.replay_t is not None else origin
        self._show_at(max(origin, min(full.end, t + fraction * (full.end - origin))))

    def on_scrub_to(self, message: ScrubTo) -> None:
        if self.full is not None:
            origin = _origin(self.full)
            self._show_at(origin + message.fraction * (self.full.end - origin))

    def action_speed(self, delta: int) -> None:
        self.speed_index = max(0, min(len(SPEEDS) - 1, self.speed_index + delta))
        self._paint_replay()

    def action_play(self) -> None:
        if self.full is None:
            return
        if self.playing:
            self._stop_play()
            self._paint_replay()
            return
        if self.replay_t is None or self.replay_t >= self.full.end:
            self.replay_t = None
            self.action_replay()
        self.playing = True
        self._play_timer = self.set_interval(_TICK_S, self._tick)
        self._paint_replay()

    def _stop_play(self) -> None:
        self.playing = False
        if self._play_timer is not None:
            self._play_timer.stop()
            self._play_timer = None

    def _tick(self) -> None:
        if self.full is None or self.replay_t is None:
            self._stop_play()
            return
        t = self.replay_t + _TICK_S * SPEEDS[self.speed_index]
        if t >= self.full.end:
            t = self.full.end
            self._stop_play()
        self._show_at(t)

    # ------------------------------------------------------------ search, tabs

    def action_show_tab(self, tab: str) -> None:
        # Focus into the new pane first: TabbedContent follows focus, so a focused
        # widget left in the old pane would switch it straight back.
        target = {"waterfall": "#wf", "remote": "#remote-calls", "cancel": "#cancel-scroll"}[tab]
        self.query_one(target).focus()
        self.query_one(TabbedContent).active = tab

    def action_search(self) -> None:
        search = self.query_one("#search", Input)
        search.display = True
        search.focus()

    @on(Input.Changed, "#search")
    def _search_changed(self, event: Input.Changed) -> None:
        wf = self.query_one(Waterfall)
        wf.query_text = event.value.strip()
        wf.set_query(parse_query(event.value))
        self._paint_summary()

    @on(Input.Submitted, "#search")
    def _search_done(self) -> None:
        self.query_one("#search", Input).display = False
        self.query_one(Waterfall).focus()

    def action_escape(self) -> None:
        search = self.query_one("#search", Input)
        if search.display:
            search.display = False
            self.query_one(Waterfall).focus()
        elif search.value:
            search.value = ""
        elif len(self.app.screen_stack) > 2:
            self.app.pop_screen()
        else:  # the app was opened on this trace: the list takes its place
            show_list = getattr(self.app, "show_trace_list", None)
            if show_list is not None:
                show_list()

    def action_critical(self) -> None:
        wf = self.query_one(Waterfall)
        wf.show_critical = not wf.show_critical
        wf.refresh()


def _origin(view: TraceView) -> float:
    """Where the replay bar starts: the first event (``duration_ms``'s origin)."""
    return view.start if view.first_event_ts is None else view.first_event_ts


def stored_events_sorted(events: Sequence[StoredEvent]) -> list[StoredEvent]:
    """Events in order of occurrence (ts, then per-flow seq)."""
    return sorted(events, key=lambda e: (e.ts, e.seq))
