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
