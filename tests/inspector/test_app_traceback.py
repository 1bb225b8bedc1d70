"""A failed invocation's detail pane shows its traceback (escaped, scrollable), from the
``traceback`` item the runtime puts in a failure event's payload; without one (older
stores, other writers) the pane simply has no traceback section."""

from __future__ import annotations

import asyncio
from typing import Any

from test_app import opened, text_of
from tui_traces import TRACE, demo_events

from penguiflow import Headers, Message, Node, NodePolicy, create
from penguiflow.state import InMemoryStateStore, StoredEvent
from penguiflow_inspector.app import InspectorApp
from penguiflow_inspector.widgets.detail import TRACEBACK_LINES, DetailPane
from penguiflow_inspector.widgets.waterfall import Waterfall


async def select(pilot: Any, name: str) -> str:
    """Move the waterfall's cursor to the row named ``name``; the detail pane's text."""
    screen = await opened(pilot)
    wf = screen.query_one(Waterfall)
    for _ in range(wf.row_count):
        if wf.selected is not None and wf.selected.name == name:
            return text_of(screen.query_one(DetailPane))
        await pilot.press("j")
    raise AssertionError(f"no row {name!r}")


async def test_a_real_failure_shows_its_traceback_in_the_detail_pane() -> None:
    async def explode(msg: Message, ctx: object) -> Message:
        raise ValueError("the answer is not 42")

    store = InMemoryStateStore()
    node = Node(explode, name="explode", policy=NodePolicy(validate="none"))
    flow = create(node.to(), state_store=store, emit_errors_to_rookery=True)
    flow.run()
    message = Message(payload="go", headers=Headers(tenant="t"))
    await flow.emit(message)
    await asyncio.wait_for(flow.fetch(), 10)  # the FlowError: the trace has ended
    await flow.stop()
    app = InspectorApp(trace_id=message.trace_id, store=store)
    async with app.run_test(size=(140, 40)) as pilot:
        detail = await select(pilot, "explode")
        assert "traceback" in detail
        assert "Traceback (most recent call last)" in detail
        assert 'raise ValueError("the answer is not 42")' in detail
        assert "ValueError: the answer is not 42" in detail
    await store.close()


def with_traceback(value: object) -> list[StoredEvent]:
    """The fixture trace, its ``search`` error carrying ``value`` as its traceback."""
    events = demo_events()
    for ev in events:
        if ev.kind == "node_error" and ev.node_name == "search":
            ev.payload = {**ev.payload, "traceback": value}
    return events


async def test_a_long_hostile_traceback_is_cut_from_the_top_escaped_and_scrolls() -> None:
    lines = ["Traceback (most recent call last):"]
    lines += [f'  File "app.py", line {n}, in step{n}\x1b[31m [red]x[/red]'
              for n in range(TRACEBACK_LINES + 20)]
    lines.append("ConnectionError: reset\x07")
    async with InMemoryStateStore() as store:
        await store.save_events(with_traceback("\n".join(lines)))
        app = InspectorApp(trace_id=TRACE, store=store)
        async with app.run_test(size=(120, 24)) as pilot:
            detail = await select(pilot, "search")
            assert "\x1b" not in detail and "\x07" not in detail
            assert "ConnectionError: reset\\x07" in detail  # where it failed: kept
            assert "line 79, in step79\\x1b[31m [red]x[/red]" in detail  # as typed
            assert "step0\\x1b" not in detail  # the top is cut...
            assert f"… {len(lines) - TRACEBACK_LINES} lines above" in detail  # ...and says so
            scroll = app.screen.query_one("#detail-scroll")
            assert scroll.max_scroll_y > 0  # longer than the pane: it scrolls
            scroll.focus()
            await pilot.press("G")
            # scroll_end glides there: on a busy machine the press returned before its
            # last frame (CI read 61.9998 of 62).
            await pilot.wait_for_scheduled_animations()
            assert scroll.scroll_y == scroll.max_scroll_y


async def test_no_traceback_item_or_an_odd_one_leaves_the_pane_without_it() -> None:
    """Error path: an event without the key (an older store) or with a value that is
    not text shows the error as before, no traceback section, no failure."""
    for value in (None, 42, {"not": "a traceback"}):
        async with InMemoryStateStore() as store:
            events = demo_events() if value is None else with_traceback(value)
            await store.save_events(events)
            app = InspectorApp(trace_id=TRACE, store=store)
            async with app.run_test(size=(120, 30)) as pilot:
                detail = await select(pilot, "search")
                assert "ConnectionError('search backend reset')" in detail
                assert "traceback" not in detail
