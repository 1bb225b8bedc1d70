"""§10 FlowEvent, logging on ``penguiflow.core``, middlewares."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any

import pytest
from pfcore_support import Recorder, msg, within

from penguiflow import FlowEvent, Node, NodePolicy, create
from penguiflow import metrics as pf_metrics
from penguiflow import middlewares as pf_middlewares

NONE = NodePolicy(validate="none")
LOGGER = "penguiflow.core"

FIELDS = [
    "event_type",
    "ts",
    "node_name",
    "node_id",
    "trace_id",
    "attempt",
    "latency_ms",
    "queue_depth_in",
    "queue_depth_out",
    "outgoing_edges",
    "queue_maxsize",
    "trace_pending",
    "trace_inflight",
    "trace_cancelled",
]


def make_event(**overrides: Any) -> FlowEvent:
    values: dict[str, Any] = {
        "event_type": "node_success",
        "ts": 100.5,
        "node_name": "n",
        "node_id": "nid",
        "trace_id": "t1",
        "attempt": 1,
        "latency_ms": 12.5,
        "queue_depth_in": 2,
        "queue_depth_out": 3,
        "outgoing_edges": 4,
        "queue_maxsize": 64,
        "trace_pending": 5,
        "trace_inflight": 1,
        "trace_cancelled": False,
    }
    values.update(overrides)
    return FlowEvent(**values)


# --- FlowEvent as data ---------------------------------------------------------------


def test_flow_event_is_exported_from_metrics_and_middlewares() -> None:
    assert pf_metrics.FlowEvent is FlowEvent
    assert pf_middlewares.FlowEvent is FlowEvent
    assert hasattr(pf_middlewares, "Middleware")


def test_flow_event_shape() -> None:
    assert dataclasses.is_dataclass(FlowEvent)
    assert hasattr(FlowEvent, "__slots__")
    names = [f.name for f in dataclasses.fields(FlowEvent)]
    # Spec fields in order (additional keyword-only fields are allowed).
    assert [n for n in names if n in [*FIELDS, "extra"]] == [*FIELDS, "extra"]
    positional = FlowEvent(
        "node_start", 1.0, None, None, None, 0, None, 0, 0, 0, 64, None, 0, False
    )
    assert positional.event_type == "node_start"
    assert dict(positional.extra) == {}
    with pytest.raises(TypeError):
        FlowEvent(event_type="x")  # type: ignore[call-arg]


def test_flow_event_is_frozen_with_read_only_extra() -> None:
    source = {"exception": "boom"}
    ev = make_event(extra=source)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ev.attempt = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        ev.extra["new"] = 1  # type: ignore[index]
    source["exception"] = "changed"
    assert ev.extra["exception"] == "boom"
    assert dict(ev.extra) == {"exception": "boom"}


def test_queue_depth_property() -> None:
    assert make_event(queue_depth_in=2, queue_depth_out=3).queue_depth == 5


def test_to_payload() -> None:
    ev = make_event()
    assert ev.to_payload() == {
        "ts": 100.5,
        "event": "node_success",
        "node_name": "n",
        "node_id": "nid",
        "trace_id": "t1",
        "latency_ms": 12.5,
        "q_depth_in": 2,
        "q_depth_out": 3,
        "q_depth_total": 5,
        "outgoing": 4,
        "queue_maxsize": 64,
        "attempt": 1,
        "trace_inflight": 1,
        "trace_cancelled": False,
        "trace_pending": 5,
    }


def test_to_payload_omits_missing_trace_pending_and_merges_extra() -> None:
    ev = make_event(trace_pending=None, trace_id=None, extra={"attempt": 9, "custom": [1]})
    payload = ev.to_payload()
    assert "trace_pending" not in payload
    assert payload["trace_id"] is None
    assert payload["attempt"] == 9  # extra keys win
    assert payload["custom"] == [1]
    assert set(payload) == {
        "ts",
        "event",
        "node_name",
        "node_id",
        "trace_id",
        "latency_ms",
        "q_depth_in",
        "q_depth_out",
        "q_depth_total",
        "outgoing",
        "queue_maxsize",
        "attempt",
        "trace_inflight",
        "trace_cancelled",
        "custom",
    }


def test_metric_samples() -> None:
    samples = make_event(trace_cancelled=True).metric_samples()
    assert samples == {
        "queue_depth_in": 2.0,
        "queue_depth_out": 3.0,
        "queue_depth_total": 5.0,
        "attempt": 1.0,
        "trace_inflight": 1.0,
        "trace_cancelled": 1.0,
        "trace_pending": 5.0,
        "latency_ms": 12.5,
    }
    assert all(isinstance(v, float) for v in samples.values())


def test_metric_samples_optional_values() -> None:
    samples = make_event(trace_pending=None, latency_ms=None).metric_samples()
    assert samples == {
        "queue_depth_in": 2.0,
        "queue_depth_out": 3.0,
        "queue_depth_total": 5.0,
        "attempt": 1.0,
        "trace_inflight": 1.0,
        "trace_cancelled": 0.0,
    }


def test_metric_samples_extra_latency_override() -> None:
    assert make_event(extra={"latency_ms": "21.0"}).metric_samples()["latency_ms"] == 21.0
    assert (
        make_event(latency_ms=None, extra={"latency_ms": 7}).metric_samples()["latency_ms"] == 7.0
    )
    assert make_event(extra={"latency_ms": "fast"}).metric_samples()["latency_ms"] == 12.5


def test_tag_values() -> None:
    ev = make_event(
        extra={"s": "x", "i": 3, "f": 1.5, "b": True, "l": [1], "d": {"k": 1}, "n": None}
    )
    assert ev.tag_values() == {
        "event_type": "node_success",
        "node_name": "n",
        "node_id": "nid",
        "trace_id": "t1",
        "s": "x",
        "i": "3",
        "f": "1.5",
        "b": "True",
    }
    bare = make_event(node_name=None, node_id=None, trace_id=None)
    assert bare.tag_values() == {"event_type": "node_success"}


# --- events built by the runtime -----------------------------------------------------


async def test_runtime_event_fields(start: Any, recorder: Recorder) -> None:
    async def fn(message: Any, ctx: Any) -> Any:
        return message

    a, b = Node(fn, name="a", policy=NONE), Node(fn, name="b", policy=NONE)
    flow = start(create(a.to(b), b.to(), queue_maxsize=8, middlewares=[recorder]))
    m = msg("x")
    before = time.time()
    await flow.emit(m)
    assert await within(flow.fetch()) is m
    await recorder.wait_for("node_success", trace_id=m.trace_id, node="b")
    events = recorder.of(trace_id=m.trace_id)
    assert [(e.node_name, e.event_type) for e in events] == [
        ("a", "node_start"),
        ("a", "node_success"),
        ("b", "node_start"),
        ("b", "node_success"),
    ]
    start_a = events[0]
    assert start_a.node_id == a.node_id
    assert start_a.attempt == 0
    assert start_a.latency_ms == 0.0
    assert start_a.queue_maxsize == 8
    assert start_a.outgoing_edges == 1
    assert start_a.trace_cancelled is False
    assert start_a.extra == {} or dict(start_a.extra) == {}
    assert before <= start_a.ts <= time.time()
    assert events[3].node_id == b.node_id
    assert isinstance(events[3].latency_ms, float)
    assert events[1].ts <= events[2].ts


async def test_queue_depths_in_events(start: Any, recorder: Recorder) -> None:
    started, gate = asyncio.Event(), asyncio.Event()

    async def fn(message: Any, ctx: Any) -> Any:
        if message == 0:
            started.set()
            await gate.wait()
        return message

    flow = start(create(Node(fn, name="n", policy=NONE).to(), middlewares=[recorder]))
    await flow.emit(0)
    await within(started.wait())
    for i in (1, 2, 3):
        await flow.emit(i)
    gate.set()
    await recorder.wait_for("node_success", count=4)
    successes = recorder.of("node_success")
    starts = recorder.of("node_start")
    # While handling message 1, messages 2 and 3 are queued and 0's result sits in Rookery.
    assert starts[1].queue_depth_in == 2
    assert starts[1].queue_depth_out == 1
    assert starts[1].to_payload()["q_depth_total"] == 3
    # node_success comes after the result was delivered.
    assert [e.queue_depth_out for e in successes] == [1, 2, 3, 4]
    assert all(e.trace_id is None for e in starts)
    assert all(e.trace_pending is None and e.trace_inflight == 0 for e in starts)
    assert [await within(flow.fetch()) for _ in range(4)] == [0, 1, 2, 3]


async def test_stop_emits_node_cancelled_per_worker(recorder: Recorder) -> None:
    async def fn(message: Any, ctx: Any) -> Any:
        return message

    a, b = Node(fn, name="a", policy=NONE), Node(fn, name="b", policy=NONE)
    flow = create(a.to(b), b.to(), middlewares=[recorder])
    flow.run()
    await within(flow.stop())
    cancelled = recorder.of("node_cancelled")
    assert sorted(e.node_name for e in cancelled) == ["a", "b"]
    assert all(e.trace_id is None and e.trace_pending is None for e in cancelled)


# --- logging --------------------------------------------------------------------------


def _records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER]


async def test_events_are_logged_with_payload_attributes(
    start: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)

    async def fn(message: Any, ctx: Any) -> Any:
        return message

    node = Node(fn, name="echo", policy=NONE)
    flow = start(create(node.to()))
    m = msg("x")
    await flow.emit(m)
    await within(flow.fetch())
    await within(flow.stop())
    by_kind = {r.getMessage(): r for r in _records(caplog) if getattr(r, "trace_id", None)}
    start_rec, success_rec = by_kind["node_start"], by_kind["node_success"]
    assert start_rec.levelno == logging.DEBUG
    assert success_rec.levelno == logging.INFO
    assert success_rec.event == "node_success"  # type: ignore[attr-defined]
    assert success_rec.node_name == "echo"  # type: ignore[attr-defined]
    assert success_rec.node_id == node.node_id  # type: ignore[attr-defined]
    assert success_rec.trace_id == m.trace_id  # type: ignore[attr-defined]
    assert success_rec.q_depth_total == 1  # type: ignore[attr-defined]  # result in Rookery
    assert success_rec.outgoing == 1  # type: ignore[attr-defined]
    cancelled = [r for r in _records(caplog) if r.getMessage() == "node_cancelled"]
    assert cancelled and all(r.levelno == logging.DEBUG for r in cancelled)


async def test_failure_kinds_are_logged_at_their_levels(
    start: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)

    async def bad(message: Any, ctx: Any) -> Any:
        raise ValueError("bad")

    async def hang(message: Any, ctx: Any) -> Any:
        await asyncio.Event().wait()

    recorder = Recorder()
    failing = Node(
        bad, name="bad", policy=NodePolicy(validate="none", max_retries=1, backoff_base=0.001)
    )
    slow = Node(hang, name="slow", policy=NodePolicy(validate="none", timeout_s=0.01))
    flow = start(create(failing.to(), slow.to(), middlewares=[recorder]))
    await flow.emit(msg("x"))
    await recorder.wait_for("node_failed", count=2)
    await recorder.wait_for("node_retry")
    expected = {
        "node_start": logging.DEBUG,
        "node_error": logging.ERROR,
        "node_retry": logging.INFO,
        "node_timeout": logging.WARNING,
        "node_failed": logging.ERROR,
    }
    records = _records(caplog)
    for kind, level in expected.items():
        matching = [r for r in records if getattr(r, "event", None) == kind]
        assert matching, kind
        assert {r.levelno for r in matching} == {level}, kind
        assert all(r.getMessage() == kind for r in matching)
    retry = next(r for r in records if getattr(r, "event", None) == "node_retry")
    assert retry.node_name == "bad"  # type: ignore[attr-defined]
    assert retry.sleep_s == pytest.approx(0.001)  # type: ignore[attr-defined]


async def test_deadline_and_cancel_kinds_are_logged_at_info(
    start: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    started = asyncio.Event()

    async def fn(message: Any, ctx: Any) -> Any:
        if message.payload == "block":
            started.set()
            await asyncio.Event().wait()
        return message

    recorder = Recorder()
    flow = start(create(Node(fn, name="n", policy=NONE).to(), middlewares=[recorder]))
    await flow.emit(msg("late", deadline_s=time.time() - 1))
    await within(flow.fetch())
    blocked = msg("block")
    await flow.emit(blocked)
    await within(started.wait())
    assert await flow.cancel(blocked.trace_id) is True
    await recorder.wait_for("trace_cancel_finish")
    records = _records(caplog)
    for kind in (
        "deadline_skip",
        "trace_cancel_start",
        "trace_cancel_finish",
        "node_trace_cancelled",
    ):
        matching = [r for r in records if getattr(r, "event", None) == kind]
        assert len(matching) == 1, kind
        assert matching[0].levelno == logging.INFO, kind
    skip = next(r for r in records if getattr(r, "event", None) == "deadline_skip")
    assert isinstance(skip.deadline_s, float)  # type: ignore[attr-defined]
    begin = next(r for r in records if getattr(r, "event", None) == "trace_cancel_start")
    assert begin.pending >= 1  # type: ignore[attr-defined]


# --- middlewares ----------------------------------------------------------------------


async def test_middlewares_run_in_registration_order(start: Any) -> None:
    log: list[tuple[str, str]] = []

    def make(name: str) -> Any:
        async def mw(event: FlowEvent) -> None:
            log.append((name, event.event_type))

        return mw

    async def fn(message: Any, ctx: Any) -> Any:
        return message

    flow = create(Node(fn, policy=NONE).to(), middlewares=[make("first"), make("second")])
    flow.add_middleware(make("third"))
    start(flow)
    await flow.emit("x")
    await within(flow.fetch())
    await within(flow.stop())
    assert len(log) % 3 == 0 and log
    for i in range(0, len(log), 3):
        names = [entry[0] for entry in log[i : i + 3]]
        kinds = {entry[1] for entry in log[i : i + 3]}
        assert names == ["first", "second", "third"]
        assert len(kinds) == 1
    assert [k for n, k in log if n == "first"] == ["node_start", "node_success", "node_cancelled"]


async def test_middleware_failure_is_isolated(
    start: Any, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)

    async def broken(event: FlowEvent) -> None:
        raise RuntimeError("observer crashed")

    async def fn(message: Any, ctx: Any) -> Any:
        return message

    flow = start(create(Node(fn, policy=NONE).to(), middlewares=[broken, recorder]))
    m = msg("x")
    await flow.emit(m)
    assert await within(flow.fetch()) is m
    await recorder.wait_for("node_success", trace_id=m.trace_id)
    assert recorder.kinds(trace_id=m.trace_id) == ["node_start", "node_success"]
    errors = [r for r in _records(caplog) if r.getMessage() == "middleware_error"]
    assert len(errors) >= 2
    assert all(r.levelno >= logging.ERROR for r in errors)


async def test_every_middleware_receives_every_event(start: Any) -> None:
    first, second = Recorder(), Recorder()

    async def fn(message: Any, ctx: Any) -> Any:
        return message

    flow = start(create(Node(fn, policy=NONE).to(), middlewares=[first, second]))
    await flow.emit(msg("x"))
    await within(flow.fetch())
    await within(flow.stop())
    assert first.events == second.events
    assert [e.event_type for e in first.events] == ["node_start", "node_success", "node_cancelled"]


async def test_record_remote_event_goes_through_the_pipeline(
    start: Any, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    done = asyncio.Event()

    async def fn(message: Any, ctx: Any) -> Any:
        await ctx.runtime.record_remote_event(
            event="remote_call_start",
            node=node,
            context=ctx,
            trace_id=message.trace_id,
            latency_ms=0.0,
            extra={"remote_skill": "search"},
        )
        done.set()
        return None

    node = Node(fn, name="remote", policy=NONE)
    flow = start(create(node.to(), middlewares=[recorder]))
    m = msg("x")
    await flow.emit(m)
    await within(done.wait())
    (ev,) = recorder.of("remote_call_start")
    assert ev.attempt == 0
    assert ev.node_name == "remote"
    assert ev.node_id == node.node_id
    assert ev.trace_id == m.trace_id
    assert ev.latency_ms == 0.0
    assert ev.extra["remote_skill"] == "search"
    assert ev.outgoing_edges == 1
    (record,) = [r for r in _records(caplog) if getattr(r, "event", None) == "remote_call_start"]
    assert record.levelno == logging.INFO


PAYLOAD_KEYS = {
    "ts",
    "event",
    "node_name",
    "node_id",
    "trace_id",
    "latency_ms",
    "q_depth_in",
    "q_depth_out",
    "q_depth_total",
    "outgoing",
    "queue_maxsize",
    "attempt",
    "trace_inflight",
    "trace_cancelled",
}

# The spec's keys, plus PenguiFlow's one addition: ``traceback`` on the three
# failure kinds (the formatted traceback, capped like ``exception``).
EXTRA_KEYS = {
    "node_start": set(),
    "node_success": set(),
    "node_error": {"exception", "traceback"},
    "node_timeout": {"exception", "traceback"},
    "node_retry": {"sleep_s", "exception"},
    "node_failed": {"exception", "flow_error", "traceback"},
    "deadline_skip": {"deadline_s"},
    "trace_cancel_drop": set(),
    "node_trace_cancelled": set(),
    "node_cancelled": set(),
    "trace_cancel_start": {"pending"},
    "trace_cancel_finish": set(),
}


async def test_runtime_payloads_have_exactly_the_specified_keys(recorder: Recorder) -> None:
    started = asyncio.Event()

    async def fn(message: Any, ctx: Any) -> Any:
        if message.payload == "fail":
            raise ValueError("x")
        if message.payload == "block":
            started.set()
            await asyncio.Event().wait()
        return message

    async def hang(message: Any, ctx: Any) -> Any:
        await asyncio.Event().wait()

    policy = NodePolicy(validate="none", max_retries=1, backoff_base=0.001)
    main = Node(fn, name="main", policy=policy)
    slow = Node(hang, name="slow", policy=NodePolicy(validate="none", timeout_s=0.01))
    flow = create(main.to(), slow.to(), middlewares=[recorder], emit_errors_to_rookery=True)
    flow.run()
    try:
        await flow.emit(msg("ok"), to=main)
        await within(flow.fetch())
        await flow.emit(msg("fail"), to=main)
        await within(flow.fetch())
        await flow.emit(msg("late", deadline_s=time.time() - 1), to=main)
        await within(flow.fetch())
        await flow.emit(msg("t"), to=slow)
        await within(flow.fetch())
        blocked = msg("block")
        await flow.emit(blocked, to=main)
        await within(started.wait())
        await flow.cancel(blocked.trace_id)
        await recorder.wait_for("trace_cancel_finish")
    finally:
        await within(flow.stop())
    seen = {e.event_type for e in recorder.events}
    assert seen >= set(EXTRA_KEYS) - {"trace_cancel_drop"}
    for ev in recorder.events:
        expected_extra = EXTRA_KEYS[ev.event_type]
        assert set(ev.extra) == expected_extra, ev.event_type
        pending = {"trace_pending"} if ev.trace_pending is not None else set()
        assert set(ev.to_payload()) == PAYLOAD_KEYS | pending | expected_extra, ev.event_type
