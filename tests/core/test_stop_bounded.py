"""stop() is bounded when the state store hangs (``stop(store_timeout_s=...)``)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import pytest
from pfcore_support import Recorder, msg, within

from penguiflow import Node, NodePolicy, create
from penguiflow.errors import InvalidArgument, PenguiFlowError
from penguiflow.state import RemoteBinding, StoredEvent

NONE = NodePolicy(validate="none")


async def echo(message: Any, ctx: Any) -> Any:
    return message


class HungWriterStore:
    """A buffering store whose writer hangs: ``flush()`` waits for ``release``.

    ``pending_events`` counts what was saved and never written, as the
    durable stores report it.
    """

    def __init__(self) -> None:
        self.buffered: list[StoredEvent] = []
        self.release = asyncio.Event()
        self.flush_started = asyncio.Event()
        self.flush_cancelled = False

    @property
    def pending_events(self) -> int:
        return len(self.buffered)

    async def save_event(self, event: StoredEvent) -> None:
        self.buffered.append(event)

    async def load_history(self, trace_id: str) -> Sequence[StoredEvent]:
        return [e for e in self.buffered if e.trace_id == trace_id]

    async def save_remote_binding(self, binding: RemoteBinding) -> None:
        return None

    async def flush(self) -> None:
        self.flush_started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.flush_cancelled = True
            raise
        self.buffered.clear()


class HungDatabaseStore:
    """A store without a buffer whose ``save_event`` hangs once ``hang`` is set."""

    def __init__(self) -> None:
        self.hang = False
        self.saved: list[StoredEvent] = []

    async def save_event(self, event: StoredEvent) -> None:
        if self.hang:
            await asyncio.Event().wait()
        self.saved.append(event)

    async def load_history(self, trace_id: str) -> Sequence[StoredEvent]:
        return [e for e in self.saved if e.trace_id == trace_id]

    async def save_remote_binding(self, binding: RemoteBinding) -> None:
        return None


def timeouts(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == "state_store_flush_timeout"]


async def test_a_hung_flush_costs_at_most_the_timeout_and_is_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = HungWriterStore()
    flow = create(Node(echo, name="echo", policy=NONE).to(), state_store=store)
    flow.run()
    await flow.emit(msg("hello"))
    await within(flow.fetch())
    loop = asyncio.get_running_loop()
    started = loop.time()
    await within(flow.stop(store_timeout_s=0.2))
    elapsed = loop.time() - started

    assert 0.2 <= elapsed < 2.0
    assert not flow.running
    assert store.flush_cancelled  # no flush is left running behind stop()
    (record,) = timeouts(caplog)
    assert record.levelno == logging.WARNING
    assert record.store == f"{__name__}.HungWriterStore"  # type: ignore[attr-defined]
    assert record.timeout_s == 0.2  # type: ignore[attr-defined]
    # node_start, node_success of the message and node_cancelled at stop: never written.
    assert record.pending_events == store.pending_events == 3  # type: ignore[attr-defined]
    assert flow.observer_failures["state_store_flush_timeout"] == 1


async def test_the_flow_runs_again_after_a_hung_flush(caplog: pytest.LogCaptureFixture) -> None:
    store = HungWriterStore()
    flow = create(Node(echo, name="echo", policy=NONE).to(), state_store=store)
    flow.run()
    await within(flow.stop(store_timeout_s=0.05))
    assert len(timeouts(caplog)) == 1

    flow.run()
    await flow.emit(msg("again"))
    assert (await within(flow.fetch())).payload == "again"
    store.release.set()  # the writer recovered: this stop flushes in time
    await within(flow.stop(store_timeout_s=0.2))
    assert store.pending_events == 0
    assert len(timeouts(caplog)) == 1


async def test_a_hung_save_at_stop_is_cut_short_too(caplog: pytest.LogCaptureFixture) -> None:
    # The workers' last events (node_cancelled) go to a store whose database hangs.
    store = HungDatabaseStore()
    a = Node(echo, name="a", policy=NONE)
    b = Node(echo, name="b", policy=NONE)
    flow = create(a.to(b), b.to(), state_store=store)
    flow.run()
    await flow.emit(msg(1))
    await within(flow.fetch())
    store.hang = True
    await within(flow.stop(store_timeout_s=0.1))

    assert not flow.running
    (record,) = timeouts(caplog)
    assert record.pending_events is None  # type: ignore[attr-defined]  # the store cannot say
    assert flow.observer_failures["state_store_flush_timeout"] == 1
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("penguiflow:")]

    store.hang = False
    flow.run()
    await flow.emit(msg(2))
    assert (await within(flow.fetch())).payload == 2
    await within(flow.stop())


async def test_no_timeout_waits_for_the_store(caplog: pytest.LogCaptureFixture) -> None:
    store = HungWriterStore()
    flow = create(Node(echo, name="echo", policy=NONE).to(), state_store=store)
    flow.run()
    stopping = asyncio.ensure_future(flow.stop(store_timeout_s=None))
    await within(store.flush_started.wait())
    assert not stopping.done()
    store.release.set()
    await within(stopping)
    assert store.pending_events == 0
    assert timeouts(caplog) == []
    assert "state_store_flush_timeout" not in flow.observer_failures


async def test_a_negative_timeout_is_refused_before_anything_stops() -> None:
    flow = create(Node(echo, name="echo", policy=NONE).to())
    flow.run()
    with pytest.raises(InvalidArgument, match="store_timeout_s must be >= 0") as info:
        await flow.stop(store_timeout_s=-1.0)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, PenguiFlowError)
    assert flow.running
    await within(flow.stop())


async def test_without_a_store_a_hung_middleware_is_cut_short_too(
    caplog: pytest.LogCaptureFixture,
) -> None:
    hang = asyncio.Event()

    async def stuck_at_stop(event: Any) -> None:
        if hang.is_set():
            await asyncio.Event().wait()

    flow = create(Node(echo, name="echo", policy=NONE).to(), middlewares=[stuck_at_stop])
    flow.run()
    hang.set()
    await within(flow.stop(store_timeout_s=0.1))
    assert not flow.running
    (record,) = [r for r in caplog.records if r.getMessage() == "observer_stop_timeout"]
    assert record.workers_cut == 1  # type: ignore[attr-defined]
    assert flow.observer_failures["observer_stop_timeout"] == 1
    assert timeouts(caplog) == []


async def test_a_node_that_ignores_its_cancellation_is_named_not_blamed_on_observers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # It was reported as observer_stop_timeout (or the store's flush timeout): the
    # user went looking for a slow middleware or database that did not exist.
    running, release, returned = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def stubborn(message: Any, ctx: Any) -> Any:
        running.set()
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue  # the bug: swallowed
        returned.set()
        return message

    flow = create(Node(stubborn, name="stubborn", policy=NONE).to(), middlewares=[Recorder()])
    flow.run()
    await flow.emit(msg("x"))
    await within(running.wait())
    worker = flow._workers[0].task
    assert worker is not None
    caplog.set_level(logging.WARNING, logger="penguiflow.core")
    try:
        await within(flow.stop(store_timeout_s=0.1))
        assert not flow.running
        (record,) = [r for r in caplog.records if r.getMessage() == "node_stop_timeout"]
        assert record.nodes == ["stubborn"]  # type: ignore[attr-defined]
        assert flow.observer_failures["node_stop_timeout"] == 1
        assert "observer_stop_timeout" not in flow.observer_failures
        assert "observer_stop_timeout" not in caplog.text
    finally:
        # Let it end, so the test leaves no task behind: its worker then waits for
        # the next item, where a cancel ends it.
        release.set()
        await within(returned.wait())
        worker.cancel()
        await within(asyncio.gather(worker, return_exceptions=True))


async def test_a_middleware_slow_to_unwind_is_not_blamed_on_the_node(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # An exporter-like middleware, slow on node_cancelled and bounded by wait_for,
    # needs more than one loop turn to unwind the second cancel: the node that was
    # cancelled cleanly was named as ignoring its cancellation.
    started = asyncio.Event()

    async def exporter(event: Any) -> None:
        if event.event_type == "node_cancelled":
            await asyncio.wait_for(asyncio.Event().wait(), 30)

    async def work(message: Any, ctx: Any) -> Any:
        started.set()
        await asyncio.Event().wait()  # cancellable

    flow = create(Node(work, name="innocent", policy=NONE).to(), middlewares=[exporter])
    flow.run()
    await flow.emit(msg("x"))
    await within(started.wait())
    caplog.set_level(logging.WARNING, logger="penguiflow.core")
    await within(flow.stop(store_timeout_s=0.1))
    assert "node_stop_timeout" not in flow.observer_failures
    assert flow.observer_failures["observer_stop_timeout"] == 1


async def test_a_hung_message_bus_publish_is_cut_short_and_reported(
        caplog: pytest.LogCaptureFixture) -> None:
    # emit_nowait publishes to the bus in the background; stop() awaits those
    # publishes (spec), and one to a broker that never answers hung stop() for ever.
    publishing = asyncio.Event()

    class HungBus:
        async def publish(self, envelope: Any) -> None:
            publishing.set()
            await asyncio.Event().wait()  # an unreachable broker, no client timeout

    flow = create(Node(echo, name="echo", policy=NONE).to(), message_bus=HungBus())
    flow.run()
    flow.emit_nowait(msg("x"))
    await within(publishing.wait())
    loop = asyncio.get_running_loop()
    started = loop.time()
    await within(flow.stop(store_timeout_s=0.2))
    assert loop.time() - started < 2.0
    assert not flow.running
    assert flow.observer_failures["background_stop_timeout"] == 1
    [record] = [r for r in caplog.records if r.getMessage() == "background_stop_timeout"]
    assert record.tasks_cut == 1  # type: ignore[attr-defined]
