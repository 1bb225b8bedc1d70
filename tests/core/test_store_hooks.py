"""Core-side store and bus hooks beyond 2.1: flush on stop, the in-memory bus."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from pfcore_support import msg, within

from penguiflow import Node, NodePolicy, create
from penguiflow.bus import InMemoryMessageBus
from penguiflow.state import InMemoryStateStore, StoredEvent


def passthrough(name: str) -> Node:
    async def run(message: Any, ctx: Any) -> Any:
        return message

    return Node(run, name=name, policy=NodePolicy(validate="none"))


class BufferingStore(InMemoryStateStore):
    """Holds events until flush(), like the SQLite/Postgres stores' buffer."""

    def __init__(self, *, fail_flush: bool = False) -> None:
        super().__init__()
        self.pending: list[StoredEvent] = []
        self.fail_flush = fail_flush
        self.flushes = 0

    async def save_event(self, event: StoredEvent) -> None:
        self.pending.append(event)

    async def flush(self) -> None:
        self.flushes += 1
        if self.fail_flush:
            raise ConnectionError("database went away")
        pending, self.pending = self.pending, []
        for event in pending:
            await super().save_event(event)


async def test_stop_flushes_a_buffering_store() -> None:
    store = BufferingStore()
    flow = create(passthrough("a").to(), state_store=store)
    flow.run()
    message = msg(1)
    await flow.emit(message)
    await within(flow.fetch())
    assert await store.load_history(message.trace_id) == []  # still buffered
    await flow.stop()
    assert store.flushes == 1
    kinds = [e.kind for e in await store.load_history(message.trace_id)]
    assert kinds == ["node_start", "node_success"]


async def test_a_failing_flush_is_logged_and_counted_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = BufferingStore(fail_flush=True)
    flow = create(passthrough("a").to(), state_store=store)
    flow.run()
    await flow.emit(msg(1))
    await within(flow.fetch())
    with caplog.at_level(logging.ERROR, logger="penguiflow.core"):
        await flow.stop()
    assert not flow.running
    assert flow.observer_failures["state_store_flush_failed"] == 1
    assert [r.getMessage() for r in caplog.records] == ["state_store_flush_failed"]


@pytest.mark.parametrize("shape", ["sync", "sync_raising", "delegating", "decorated"])
async def test_any_flush_shape_is_called_and_awaited_only_when_awaitable(shape: str) -> None:
    # A 2.1 store's synchronous flush helper made stop() raise TypeError half-way
    # through its shutdown (per-trace state, fetch waiters and join groups left
    # behind). And a flush that returns the inner store's coroutine, or an async
    # flush under a plain decorator, must still be awaited (stop() makes the
    # events durable).
    import functools

    class Shaped(BufferingStore):
        def __init__(self) -> None:
            super().__init__()
            self.sync_calls = 0

    def plain(func: Any) -> Any:
        @functools.wraps(func)
        def wrapper(*args: Any) -> Any:
            return func(*args)
        return wrapper

    class SyncFlush(Shaped):
        def flush(self) -> None:  # type: ignore[override]
            self.sync_calls += 1
            if shape == "sync_raising":
                raise OSError("disk full")

    class Delegating(Shaped):
        def flush(self) -> Any:  # type: ignore[override]
            return BufferingStore.flush(self)

    class Decorated(Shaped):
        @plain
        async def flush(self) -> None:
            await BufferingStore.flush(self)

    store: Shaped = {"sync": SyncFlush, "sync_raising": SyncFlush, "delegating": Delegating,
                     "decorated": Decorated}[shape]()
    flow = create(passthrough("a").to(), state_store=store)
    flow.run()
    message = msg(1)
    await flow.emit(message)
    await within(flow.fetch())
    await flow.stop()
    assert not flow.running
    stored = [e.kind for e in await store.load_history(message.trace_id)]
    if shape.startswith("sync"):
        assert store.sync_calls == 1 and stored == []
        assert flow.observer_failures.get("state_store_flush_failed", 0) == (
            1 if shape == "sync_raising" else 0)
    else:
        assert stored == ["node_start", "node_success"]
    flow.run()  # and the flow is whole: it runs again
    try:
        await flow.emit(msg(2))
        assert (await within(flow.fetch())).payload == 2
    finally:
        await flow.stop()


async def test_in_memory_bus_records_one_envelope_per_floe_put() -> None:
    bus = InMemoryMessageBus()
    a, b = passthrough("a"), passthrough("b")
    flow = create(a.to(b), b.to(), message_bus=bus)
    flow.run()
    try:
        await flow.emit(msg("x"))
        await within(flow.fetch())
    finally:
        await flow.stop()
    assert bus.edges() == {"OpenSea->a": 1, "a->b": 1, "b->Rookery": 1}
    assert [e.target for e in bus.envelopes] == ["a", "b", "Rookery"]


async def test_in_memory_store_is_a_trace_store() -> None:
    async with InMemoryStateStore() as store:
        flow = create(passthrough("a").to(), state_store=store)
        flow.run()
        message = msg(1)
        try:
            await flow.emit(message)
            await within(flow.fetch())
        finally:
            await flow.stop()
        summary = await store.get_trace(message.trace_id)
        assert summary is not None and summary.status == "succeeded"
        assert summary.nodes == ("a",) and summary.node_count == 1
        assert await store.resolve_trace_id(message.trace_id[:6]) == [message.trace_id]


class FieldsStore(InMemoryStateStore):
    """Takes the runtime's fast path (EVENT_FIELDS tuples), like the buffered stores."""

    def __init__(self, *, fail: bool = False) -> None:
        super().__init__()
        self.fields: list[tuple[Any, ...]] = []
        self.fail = fail

    def save_event_fields(self, fields: tuple[Any, ...]) -> None:
        if self.fail:
            raise ConnectionError("buffer unavailable")
        self.fields.append(fields)


async def test_fast_path_tuples_rebuild_exactly_the_stored_events_of_the_slow_path() -> None:
    from penguiflow.state import EVENT_FIELDS, stored_from_fields

    fast, slow = FieldsStore(), InMemoryStateStore()

    async def fails_once(message: Any, ctx: Any) -> Any:
        if not getattr(fails_once, "done", False):
            fails_once.done = True  # type: ignore[attr-defined]
            raise ValueError("first attempt")
        return message

    def build(store: Any) -> Any:
        first = Node(fails_once, name="flaky",
                     policy=NodePolicy(validate="none", max_retries=1, backoff_base=0.0))
        second = passthrough("b")
        return create(first.to(second), second.to(), state_store=store)

    for store in (fast, slow):
        fails_once.done = False  # type: ignore[attr-defined]
        flow = build(store)
        flow.run()
        try:
            await flow.emit(msg("x"))
            await within(flow.fetch())
        finally:
            await flow.stop()
    assert all(len(f) == len(EVENT_FIELDS) for f in fast.fields)
    everything = [stored_from_fields(f) for f in fast.fields]
    # stop() adds one node_cancelled per worker, outside any trace.
    assert [e.kind for e in everything if e.trace_id is None] == ["node_cancelled"] * 2
    rebuilt = [e for e in everything if e.trace_id is not None]
    (trace,) = {e.trace_id for e in rebuilt}
    expected = await slow.load_history(next(t for t in slow._events if t))
    assert [e.kind for e in rebuilt] == [e.kind for e in expected] == [
        "node_start", "node_error", "node_retry", "node_start", "node_success",
        "node_start", "node_success"]
    for got, want in zip(rebuilt, expected, strict=True):
        assert set(got.payload) == set(want.payload)
        assert got.payload["event"] == want.payload["event"]
        assert got.attempt == want.attempt and got.node_name == want.node_name
    retry = rebuilt[2]
    assert retry.payload["sleep_s"] == 0.0 and "ValueError" in retry.payload["exception"]
    assert retry.trace_id == trace and retry.flow_id is not None


async def test_a_fast_path_store_that_raises_is_counted_and_the_flow_completes() -> None:
    store = FieldsStore(fail=True)
    flow = create(passthrough("a").to(), state_store=store)
    flow.run()
    try:
        await flow.emit(msg(1))
        assert (await within(flow.fetch())).payload == 1
    finally:
        await flow.stop()
    # node_start, node_success, and node_cancelled when stop() ends the worker.
    assert flow.observer_failures["state_store_save_failed"] == 3


async def test_run_can_attach_a_store_and_a_bus() -> None:
    store, bus = InMemoryStateStore(), InMemoryMessageBus()
    flow = create(passthrough("a").to())
    flow.run(state_store=store, message_bus=bus)
    message = msg(1)
    try:
        await flow.emit(message)
        await within(flow.fetch())
    finally:
        await flow.stop()
    kinds = [e.kind for e in await flow.load_history(message.trace_id)]
    assert kinds == ["node_start", "node_success"]
    assert bus.edges() == {"OpenSea->a": 1, "a->Rookery": 1}


async def one_message_through(flow: Any) -> Any:
    """Run ``flow``, pass one message through it, stop it; return the message."""
    flow.run()
    try:
        message = msg(1)
        await flow.emit(message)
        await within(flow.fetch())
    finally:
        await flow.stop()
    return message


async def test_a_subclass_overriding_save_event_sees_every_event() -> None:
    # InMemoryStateStore takes the runtime's tuples (save_event_fields); a user's
    # subclass written against the spec overrides save_event, which must still be
    # what the runtime calls.
    class Auditing(InMemoryStateStore):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[StoredEvent] = []

        async def save_event(self, event: StoredEvent) -> None:
            self.seen.append(event)
            await super().save_event(event)

    store = Auditing()
    message = await one_message_through(create(passthrough("a").to(), state_store=store))
    mine = [e for e in store.seen if e.trace_id == message.trace_id]
    assert [e.kind for e in mine] == ["node_start", "node_success"]
    assert await store.load_history(message.trace_id) == mine
    assert [e.kind for e in store.seen if e.trace_id is None] == ["node_cancelled"]  # stop()


async def test_the_in_memory_store_keeps_what_the_runtime_recorded() -> None:
    store = InMemoryStateStore()
    recorded: list[Any] = []

    async def keep(event: Any) -> None:
        recorded.append(event)

    a, b = passthrough("a"), passthrough("b")
    message = await one_message_through(
        create(a.to(b), b.to(), state_store=store, middlewares=[keep]))
    history = await store.load_history(message.trace_id)
    assert history == [StoredEvent.from_flow_event(e) for e in recorded
                       if e.trace_id == message.trace_id]
    assert await store.load_history(message.trace_id) == history  # read twice, same
    summary = await store.get_trace(message.trace_id)
    assert summary is not None and summary.node_count == 2 and summary.status == "succeeded"


class ValuesStore(FieldsStore):
    """Also offers the plain-tuple sink (``event_values_sink``), as the durable stores."""

    def __init__(self, *, fail: bool = False, factory_fails: bool = False) -> None:
        super().__init__(fail=fail)
        self.values: list[tuple[Any, ...]] = []
        self.sink_calls = 0
        self.factory_fails = factory_fails

    def event_values_sink(self) -> Any:
        if self.factory_fails:
            raise RuntimeError("no sink today")
        return self._take_values

    def _take_values(self, values: tuple[Any, ...]) -> None:
        self.sink_calls += 1
        if self.fail:
            raise ConnectionError("buffer unavailable")
        self.values.append(values)


async def test_a_store_offering_a_values_sink_gets_plain_tuples_of_the_same_events() -> None:
    from penguiflow.state import EventRecord, stored_from_fields

    fast, slow = ValuesStore(), InMemoryStateStore()
    for store in (fast, slow):
        a, b = passthrough("a"), passthrough("b")
        await one_message_through(create(a.to(b), b.to(), state_store=store))
    # The hot path's node_start/node_success came as plain tuples, nothing else did.
    assert {type(v) for v in fast.values} == {tuple}
    assert [v[2] for v in fast.values] == ["node_start", "node_success"] * 2
    rebuilt = [stored_from_fields(EventRecord(*v)) for v in fast.values]
    (trace,) = {e.trace_id for e in rebuilt}
    expected = await slow.load_history(next(t for t in slow._events if t))
    assert [(e.kind, e.node_name, set(e.payload)) for e in rebuilt] == [
        (e.kind, e.node_name, set(e.payload)) for e in expected]
    assert all(e.trace_id == trace for e in rebuilt)


async def test_a_values_sink_that_raises_is_counted_and_the_flow_completes() -> None:
    store = ValuesStore(fail=True)
    flow = create(passthrough("a").to(), state_store=store)
    flow.run()
    try:
        await flow.emit(msg(1))
        assert (await within(flow.fetch())).payload == 1
    finally:
        await flow.stop()
    assert store.sink_calls == 2  # the hot path (node_start, node_success) took the sink
    assert flow.observer_failures["state_store_save_failed"] == 3  # each counted once


async def test_a_values_sink_factory_that_raises_falls_back_to_save_event_fields(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = ValuesStore(factory_fails=True)
    with caplog.at_level(logging.WARNING, logger="penguiflow"):
        message = await one_message_through(create(passthrough("a").to(), state_store=store))
    assert store.values == []
    assert [f[2] for f in store.fields if f[0] == message.trace_id] == [
        "node_start", "node_success"]
    (record,) = [r for r in caplog.records if r.getMessage() == "state_store_values_sink_failed"]
    assert "no sink today" in record.error  # type: ignore[attr-defined]


async def test_a_subclass_overriding_save_event_fields_is_not_bypassed_by_the_values_sink(
) -> None:
    class Auditing(ValuesStore):
        def __init__(self) -> None:
            super().__init__()
            self.audited: list[str] = []

        def save_event_fields(self, fields: tuple[Any, ...]) -> None:
            self.audited.append(fields[2])
            super().save_event_fields(fields)

    store = Auditing()
    await one_message_through(create(passthrough("a").to(), state_store=store))
    assert store.values == []  # its own override is the path, not the base's sink
    assert store.audited[:2] == ["node_start", "node_success"]


async def test_a_save_event_fields_set_on_the_instance_is_not_bypassed_by_the_values_sink(
) -> None:
    # A wrapper or a spy put on the instance (not the class) is the path too.
    store = ValuesStore()
    spied: list[str] = []
    real = store.save_event_fields

    def spy(fields: tuple[Any, ...]) -> None:
        spied.append(fields[2])
        real(fields)

    store.save_event_fields = spy  # type: ignore[method-assign]
    await one_message_through(create(passthrough("a").to(), state_store=store))
    assert store.sink_calls == 0
    assert spied[:2] == ["node_start", "node_success"]
