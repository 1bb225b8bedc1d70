"""§15.1 StateStore and §15.2 MessageBus hooks as wired by the core runtime."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

import pytest
from pfcore_support import Recorder, msg, within

from penguiflow import (
    BusEnvelope,
    FinalAnswer,
    FlowEvent,
    Message,
    MessageBus,
    Node,
    NodePolicy,
    RemoteBinding,
    StateStore,
    StoredEvent,
    create,
)
from penguiflow import bus as pf_bus
from penguiflow import state as pf_state

NONE = NodePolicy(validate="none")
LOGGER = "penguiflow.core"


class MemoryStore(StateStore):
    def __init__(self, log: list[tuple[str, str]] | None = None, *, fail: bool = False) -> None:
        self.events: list[StoredEvent] = []
        self.bindings: list[RemoteBinding] = []
        self.log = log
        self.fail = fail

    async def save_event(self, event: StoredEvent) -> None:
        if self.fail:
            raise OSError("disk full")
        self.events.append(event)
        if self.log is not None:
            self.log.append(("store", event.kind))

    async def load_history(self, trace_id: str) -> Sequence[StoredEvent]:
        return [e for e in self.events if e.trace_id == trace_id]

    async def save_remote_binding(self, binding: RemoteBinding) -> None:
        if self.fail:
            raise OSError("disk full")
        self.bindings.append(binding)


class MemoryBus(MessageBus):
    def __init__(self, *, fail: bool = False) -> None:
        self.envelopes: list[BusEnvelope] = []
        self.fail = fail

    async def publish(self, envelope: BusEnvelope) -> None:
        if self.fail:
            raise ConnectionError("broker down")
        self.envelopes.append(envelope)


class SlowBus(MemoryBus):
    """Yields to the loop many times before recording, so unawaited publishes would be lost."""

    async def publish(self, envelope: BusEnvelope) -> None:
        for _ in range(50):
            await asyncio.sleep(0)
        await super().publish(envelope)


async def test_emit_publishes_before_the_put(start: Any) -> None:
    bus = SlowBus()
    seen_at_invocation: list[list[str]] = []

    async def fn(message: Any, ctx: Any) -> Any:
        seen_at_invocation.append([e.edge for e in bus.envelopes])
        return message

    flow = start(create(Node(fn, name="a", policy=NONE).to(), message_bus=bus))
    m = msg("x")
    await flow.emit(m)
    assert await within(flow.fetch()) is m
    assert seen_at_invocation == [["OpenSea->a"]]
    assert [e.edge for e in bus.envelopes] == ["OpenSea->a", "a->Rookery"]


def echo(name: str) -> Node:
    async def fn(message: Any, ctx: Any) -> Any:
        return message

    return Node(fn, name=name, policy=NONE)


def test_hook_modules_expose_their_names() -> None:
    assert pf_state.StateStore is StateStore
    assert pf_state.StoredEvent is StoredEvent
    assert pf_state.RemoteBinding is RemoteBinding
    assert pf_bus.MessageBus is MessageBus
    assert pf_bus.BusEnvelope is BusEnvelope


# --- data classes ---------------------------------------------------------------------


def test_stored_event_from_flow_event() -> None:
    ev = FlowEvent(
        event_type="node_error",
        ts=5.0,
        node_name="n",
        node_id="nid",
        trace_id="t",
        attempt=0,
        latency_ms=1.0,
        queue_depth_in=0,
        queue_depth_out=0,
        outgoing_edges=1,
        queue_maxsize=64,
        trace_pending=1,
        trace_inflight=1,
        trace_cancelled=False,
        extra={"exception": "ValueError('x')"},
    )
    stored = StoredEvent.from_flow_event(ev)
    assert dataclasses.is_dataclass(StoredEvent)
    assert hasattr(StoredEvent, "__slots__")
    # Spec fields first, in order (additional keyword-only fields are allowed).
    assert [f.name for f in dataclasses.fields(StoredEvent)][:6] == [
        "trace_id",
        "ts",
        "kind",
        "node_name",
        "node_id",
        "payload",
    ]
    assert stored.kind == "node_error"
    assert (stored.trace_id, stored.ts, stored.node_name, stored.node_id) == ("t", 5.0, "n", "nid")
    assert stored.payload == ev.to_payload()
    assert stored.payload["exception"] == "ValueError('x')"
    positional = StoredEvent("t", 5.0, "node_error", "n", "nid", {"k": 1})
    assert positional.payload == {"k": 1}


def test_remote_binding_value_equality() -> None:
    a = RemoteBinding(trace_id="t", context_id="c", task_id="k", agent_url="http://x")
    b = RemoteBinding("t", "c", "k", "http://x")
    assert a == b
    assert a != RemoteBinding("t", "c", "other", "http://x")
    assert hasattr(RemoteBinding, "__slots__")


def test_bus_envelope_fields() -> None:
    env = BusEnvelope("a->b", "a", "b", "t", "payload", {"tenant": "x"}, {"k": 1})
    assert [f.name for f in dataclasses.fields(BusEnvelope)] == [
        "edge",
        "source",
        "target",
        "trace_id",
        "payload",
        "headers",
        "meta",
    ]
    assert env == BusEnvelope(
        edge="a->b",
        source="a",
        target="b",
        trace_id="t",
        payload="payload",
        headers={"tenant": "x"},
        meta={"k": 1},
    )
    assert hasattr(BusEnvelope, "__slots__")
    with pytest.raises(TypeError):
        BusEnvelope(edge="a->b")  # type: ignore[call-arg]


def test_protocols_are_subclassable_with_own_init() -> None:
    store = MemoryStore()
    bus = MemoryBus()
    assert StateStore in type(store).__mro__
    assert MessageBus in type(bus).__mro__
    assert store.events == [] and bus.envelopes == []


# --- state store ----------------------------------------------------------------------


async def test_every_event_is_logged_then_persisted_then_passed_to_middlewares(
    start: Any, caplog: pytest.LogCaptureFixture
) -> None:
    log: list[tuple[str, str]] = []
    store = MemoryStore(log)
    recorder = Recorder()

    async def mw(event: FlowEvent) -> None:
        log.append(("mw", event.event_type))

    class LogTap(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if hasattr(record, "event") and record.getMessage() == record.event:
                log.append(("log", record.event))

    caplog.set_level(logging.DEBUG, logger=LOGGER)
    tap = LogTap()
    logging.getLogger(LOGGER).addHandler(tap)
    try:
        a, b = echo("a"), echo("b")
        flow = start(create(a.to(b), b.to(), state_store=store, middlewares=[recorder, mw]))
        m = msg("x")
        await flow.emit(m)
        assert await within(flow.fetch()) is m
        await within(flow.stop())
    finally:
        logging.getLogger(LOGGER).removeHandler(tap)
    assert store.events == [StoredEvent.from_flow_event(ev) for ev in recorder.events]
    kinds = [e.kind for e in store.events]
    assert kinds.count("node_cancelled") == 2
    assert any(e.trace_id is None for e in store.events)
    # Each event: logged, then stored, then passed to the middleware.
    expected = [entry for kind in kinds for entry in (("log", kind), ("store", kind), ("mw", kind))]
    assert log == expected


async def test_load_history(start: Any) -> None:
    store = MemoryStore()
    flow = start(create(echo("a").to(), state_store=store))
    m = msg("x")
    await flow.emit(m)
    await within(flow.fetch())
    history = await flow.load_history(m.trace_id)
    assert [e.kind for e in history][:2] == ["node_start", "node_success"]
    assert all(e.trace_id == m.trace_id for e in history)


async def test_load_history_without_store() -> None:
    flow = create(echo("a").to())
    with pytest.raises(RuntimeError) as info:
        await flow.load_history("t")
    assert str(info.value) == "PenguiFlow was created without a state_store"


async def test_failing_store_is_logged_and_flow_continues(
    start: Any, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    flow = start(create(echo("a").to(), state_store=MemoryStore(fail=True), middlewares=[recorder]))
    m = msg("x")
    await flow.emit(m)
    assert await within(flow.fetch()) is m
    await recorder.wait_for("node_success", trace_id=m.trace_id)
    failures = [
        r
        for r in caplog.records
        if r.name == LOGGER and r.getMessage() == "state_store_save_failed"
    ]
    assert len(failures) >= 2
    assert all(r.levelno == logging.ERROR for r in failures)
    assert failures[0].exc_info is not None


async def test_save_remote_binding(caplog: pytest.LogCaptureFixture) -> None:
    binding = RemoteBinding("t", "c", "k", "http://agent")
    store = MemoryStore()
    flow = create(echo("a").to(), state_store=store)
    await flow.save_remote_binding(binding)
    assert store.bindings == [binding]
    # Without a store: a no-op; a failing store: swallowed and logged.
    await create(echo("b").to()).save_remote_binding(binding)
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    await create(echo("c").to(), state_store=MemoryStore(fail=True)).save_remote_binding(binding)
    assert [r.getMessage() for r in caplog.records if r.name == LOGGER] == [
        "state_store_binding_failed"
    ]


# --- message bus ----------------------------------------------------------------------


async def test_one_envelope_per_floe_put(start: Any) -> None:
    bus = MemoryBus()
    a, b = echo("a"), echo("b")
    flow = start(create(a.to(b), b.to(), message_bus=bus))
    m = msg({"q": 1}, meta={"k": "v"})
    await flow.emit(m)
    # On the emit path the publish is awaited before the put.
    assert [e.edge for e in bus.envelopes] == ["OpenSea->a"]
    assert await within(flow.fetch()) is m
    await within(flow.stop())
    assert [e.edge for e in bus.envelopes] == ["OpenSea->a", "a->b", "b->Rookery"]
    assert [(e.source, e.target) for e in bus.envelopes] == [
        ("OpenSea", "a"),
        ("a", "b"),
        ("b", "Rookery"),
    ]
    for env in bus.envelopes:
        assert env.payload is m
        assert env.trace_id == m.trace_id
        assert env.headers == m.headers.model_dump()
        assert env.meta == {"k": "v"}
        assert env.meta is not m.meta


async def test_emit_nowait_paths_publish_too(start: Any) -> None:
    bus = SlowBus()

    async def fan(message: Any, ctx: Any) -> Any:
        ctx.emit_nowait(message)
        return None

    f, sink = Node(fan, name="fan", policy=NONE), echo("sink")
    flow = start(create(f.to(sink), sink.to(), message_bus=bus))
    m = msg("x")
    flow.emit_nowait(m)
    assert await within(flow.fetch()) is m
    await within(flow.stop())  # awaits the background publishes
    assert sorted(e.edge for e in bus.envelopes) == sorted(
        ["OpenSea->fan", "fan->sink", "sink->Rookery"]
    )


async def test_non_message_envelopes(start: Any) -> None:
    bus = MemoryBus()
    flow = start(create(echo("a").to(), message_bus=bus))
    await flow.emit("plain")
    assert await within(flow.fetch()) == "plain"
    await within(flow.stop())
    for env in bus.envelopes:
        assert env.payload == "plain"
        assert env.trace_id is None
        assert env.headers is None
        assert env.meta is None


async def test_out_of_band_rookery_delivery_publishes(start: Any) -> None:
    bus = MemoryBus()
    flow = start(create(echo("a").to(), message_bus=bus))
    m = msg("late", deadline_s=time.time() - 1)
    await flow.emit(m)
    out = await within(flow.fetch())
    await within(flow.stop())
    assert [e.edge for e in bus.envelopes] == ["OpenSea->a", "a->Rookery"]
    egress = bus.envelopes[1]
    assert egress.target == "Rookery"
    assert egress.payload is out
    assert isinstance(egress.payload, Message)
    assert egress.payload.payload == FinalAnswer(text="Deadline exceeded")


async def test_failing_bus_is_logged_and_delivery_continues(
    start: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    flow = start(create(echo("a").to(), message_bus=MemoryBus(fail=True)))
    first, second = msg("1"), msg("2")
    await flow.emit(first)
    assert await within(flow.fetch()) is first
    flow.emit_nowait(second)
    assert await within(flow.fetch()) is second
    await within(flow.stop())
    failures = [
        r
        for r in caplog.records
        if r.name == LOGGER and r.getMessage() == "message_bus_publish_failed"
    ]
    assert len(failures) == 4  # OpenSea->a and a->Rookery, for both messages
    assert all(r.levelno == logging.ERROR for r in failures)
