"""The TraceStore contract (penguiflow.state, spec §7.5 / §15.1), run against every store.

Each test taking ``store`` / ``make_store`` runs once per backend: ``memory``
(InMemoryStateStore, the reference), ``sqlite`` and ``postgres``. Tests marked
``BUFFERED`` cover the buffered write path of the SQLite/Postgres stores only.

Rules: no sleeps for timing (events, middlewares and ``asyncio.Event`` gates
synchronise), every await that could hang has a guard, flows are stopped and
stores closed by the fixtures. A store known to break a case is listed in
``KNOWN_VIOLATIONS`` and that case is xfail(strict=True) for it only.
"""

from __future__ import annotations

import asyncio
import enum
import gc
import itertools
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
from store_support import StoreFactory, drop_schemas, fields, store_class, unique_schema

import penguiflow_exporters
from penguiflow import FlowError, Headers, Message, Node, NodePolicy, create
from penguiflow.metrics import FlowEvent
from penguiflow.remote import InMemoryAgent, InMemoryTransport, RemoteNode
from penguiflow.state import (
    ERROR_KINDS,
    EVENTS_LOST_KIND,
    TRACE_STATUSES,
    InMemoryStateStore,
    RemoteBinding,
    StoredEvent,
    StoreUnavailable,
    TraceFilter,
    TraceSummary,
    TraceSummaryBuilder,
    stored_from_fields,
)

TIMEOUT = 10.0
BASE_TS = 1_700_000_000.0
BUFFERED = pytest.mark.parametrize("store_kind", ["sqlite", "sqlite-thread", "postgres",
                                                  "postgres-loop"])

#: (test function name, store kind) -> why it is expected to fail (xfail strict).
KNOWN_VIOLATIONS: dict[tuple[str, str], str] = {}


@pytest.fixture(autouse=True)
def _known_violations(request: pytest.FixtureRequest) -> None:
    callspec = getattr(request.node, "callspec", None)
    kind = callspec.params.get("store_kind") if callspec is not None else None
    reason = KNOWN_VIOLATIONS.get((request.node.originalname, str(kind)))
    if reason is not None:
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


async def within(awaitable: Any, timeout: float = TIMEOUT) -> Any:
    """Await with a hang guard."""
    return await asyncio.wait_for(awaitable, timeout)


def msg(payload: Any = None, **kwargs: Any) -> Message:
    return Message(payload=payload, headers=Headers(tenant="acme"), **kwargs)


def node(name: str, fn: Callable[[Any, Any], Any] | None = None, **policy: Any) -> Node:
    """A Node named ``name`` (default: returns its input), validation off."""

    async def echo(message: Any, ctx: Any) -> Any:
        return message

    policy.setdefault("validate", "none")
    return Node(fn or echo, name=name, policy=NodePolicy(**policy))


def gated(name: str, entered: asyncio.Event, gate: asyncio.Event) -> Node:
    """A node that signals ``entered`` then waits for ``gate`` before echoing."""

    async def run(message: Any, ctx: Any) -> Any:
        entered.set()
        await gate.wait()
        return message

    return node(name, run)


class Recorder:
    """A middleware keeping every FlowEvent; tests await the events they need.

    The runtime hands an event to the store before the middlewares, so once
    the recorder has seen an event the store has received it.
    """

    def __init__(self) -> None:
        self.events: list[FlowEvent] = []
        self._changed = asyncio.Event()

    async def __call__(self, event: FlowEvent) -> None:
        self.events.append(event)
        self._changed.set()

    def of(self, trace_id: str, kind: str | None = None) -> list[FlowEvent]:
        return [e for e in self.events
                if e.trace_id == trace_id and (kind is None or e.event_type == kind)]

    async def wait_for(self, kind: str, *, trace_id: str | None = None, count: int = 1) -> None:
        def seen() -> int:
            return sum(1 for e in self.events if e.event_type == kind
                       and (trace_id is None or e.trace_id == trace_id))

        async def wait() -> None:
            while seen() < count:
                self._changed.clear()
                await self._changed.wait()

        await within(wait())


def expected_history(recorder: Recorder, trace_id: str) -> list[StoredEvent]:
    return [StoredEvent.from_flow_event(e) for e in recorder.of(trace_id)]


_seq = itertools.count(1)


def ev(trace_id: str | None, ts: float, kind: str, node_name: str | None = None, *,
       attempt: int = 0, flow_id: str | None = "synthetic-flow", **fields: Any) -> StoredEvent:
    """A synthetic StoredEvent with a fresh ``seq`` (so a fresh ``event_key``)."""
    fields.setdefault("flow_name", "synthetic")
    payload = fields.pop("payload", {"event": kind, "ts": ts, "node_name": node_name,
                                     "trace_id": trace_id, "attempt": attempt})
    return StoredEvent(trace_id, ts, kind, node_name,
                       None if node_name is None else f"id-{node_name}", payload,
                       attempt=attempt, flow_id=flow_id, seq=fields.pop("seq", next(_seq)),
                       **fields)


def reference_summary(trace_id: str, events: Iterable[StoredEvent]) -> TraceSummary:
    builder = TraceSummaryBuilder(trace_id)
    for event in events:
        builder.add(event)
    return builder.summary()


def ids(summaries: Sequence[TraceSummary]) -> list[str]:
    return [s.trace_id for s in summaries]


def binding_key(b: RemoteBinding) -> tuple[str, str, str, str]:
    return (b.trace_id, b.context_id or "", b.task_id or "", b.agent_url or "")


def sorted_bindings(bindings: Iterable[RemoteBinding]) -> list[RemoteBinding]:
    return sorted(bindings, key=binding_key)


def options(factory: StoreFactory, **opts: Any) -> dict[str, Any]:
    """Constructor options for the buffered stores; none for the memory store."""
    return opts if factory.buffered else {}


@pytest.fixture
async def run_flow(make_store: StoreFactory) -> AsyncIterator[Callable[..., Any]]:
    """``run_flow(*adjacencies, **kwargs)`` creates and runs a flow, stopped at teardown.

    Depends on ``make_store`` so that flows stop before their stores close.
    """
    started: list[Any] = []

    def _run(*adjacencies: Any, **kwargs: Any) -> Any:
        flow = create(*adjacencies, **kwargs)
        flow.run()
        started.append(flow)
        return flow

    yield _run
    for flow in reversed(started):
        await within(flow.stop())


class Follower:
    """Consumes ``store.follow(trace_id)`` in a task, keeping what it yields."""

    def __init__(self, store: Any, trace_id: str | None) -> None:
        self.events: list[StoredEvent] = []
        self.ended = False
        self._changed = asyncio.Event()
        self._agen = store.follow(trace_id)
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        async for event in self._agen:
            self.events.append(event)
            self._changed.set()
        self.ended = True
        self._changed.set()

    async def wait_until(self, predicate: Callable[[list[StoredEvent]], bool]) -> None:
        async def wait() -> None:
            while not predicate(self.events):
                if self.task.done():
                    self.task.result()
                    raise AssertionError(f"follow() ended early after {self.events!r}")
                self._changed.clear()
                await self._changed.wait()

        await within(wait())

    async def aclose(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self._agen.aclose()


async def subscribed(store: Any, trace_id: str) -> Follower:
    """A Follower of ``trace_id`` once its subscription is live.

    ``follow`` is an async generator: it subscribes when first iterated, maybe
    after I/O (LISTEN). Probe events of the trace are saved until one comes
    back, so no later event can be missed. Correctness does not depend on the
    probe interval, only the number of probes does.
    """
    follower = Follower(store, trace_id)
    probed = asyncio.ensure_future(
        follower.wait_until(lambda evs: any(e.kind == "probe" for e in evs)))
    try:
        for attempt in range(200):
            await store.save_event(ev(trace_id, BASE_TS, "probe", flow_id="probe", seq=attempt))
            await store.flush()
            done, _ = await asyncio.wait({probed}, timeout=0.05)
            if done:
                probed.result()
                return follower
    finally:
        probed.cancel()
        await asyncio.gather(probed, return_exceptions=True)
    await follower.aclose()
    raise AssertionError("follow() never yielded a probe event")


def failing_saves(base: type[Any], kind: str) -> type[Any]:
    """A subclass of ``base`` whose saves raise for events of ``kind``."""

    class FailingSaves(base):  # type: ignore[misc,valid-type]
        async def save_event(self, event: StoredEvent) -> None:
            if event.kind == kind:
                raise RuntimeError(f"injected save failure for {kind}")
            await super().save_event(event)

        if hasattr(base, "save_event_fields"):
            def save_event_fields(self, fields: tuple[Any, ...]) -> Any:
                if fields[2] == kind:
                    raise RuntimeError(f"injected save failure for {kind}")
                return super().save_event_fields(fields)

    return FailingSaves


class _GatedWriter:
    """The store's real writer, each batch held until ``store.gate`` opens."""

    def __init__(self, store: Any, inner: Any) -> None:
        self._store = store
        self._inner = inner

    async def write(self, items: Any) -> Any:
        store = self._store
        store.entered.set()
        await store.gate.wait()
        result = await self._inner.write(items)
        store.batches_written += 1
        store.committed += 1
        store.written.set()
        return result

    async def close(self) -> None:
        await self._inner.close()


def held_writes(base: type[Any]) -> type[Any]:
    """A durable store whose batch writes (its real writer's) wait for ``store.gate``."""

    class HeldWrites(base):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.gate = asyncio.Event()
            self.entered = asyncio.Event()
            self.written = asyncio.Event()
            self.blocked = asyncio.Event()
            self.batches_written = self.committed = 0

        def _make_writer(self) -> Any:
            return _GatedWriter(self, super()._make_writer())

        def save_event_fields(self, fields: Any) -> Any:
            waiter = super().save_event_fields(fields)
            if waiter is not None:
                self.blocked.set()
            return waiter

        def release(self) -> None:
            self.gate.set()

        async def close(self) -> None:
            self.gate.set()
            await super().close()

    return HeldWrites


class _FailingWriter:
    """The store's real writer, whose first ``fails`` writes raise StoreUnavailable."""

    def __init__(self, inner: Any, fails: int) -> None:
        self._inner = inner
        self.fails = fails

    async def write(self, items: Any) -> Any:
        if self.fails > 0:
            self.fails -= 1
            raise StoreUnavailable("injected: the database went away")
        return await self._inner.write(items)

    async def close(self) -> None:
        await self._inner.close()


def failing_first_write(base: type[Any]) -> type[Any]:
    """A durable store whose first batch fails every attempt (retries included)."""

    class FailingFirstWrite(base):  # type: ignore[misc,valid-type]
        def _make_writer(self) -> Any:
            return _FailingWriter(super()._make_writer(), fails=self._processor.retries + 1)

    return FailingFirstWrite


# ---------------------------------------------------------------------------
# events: order, fields, idempotency
# ---------------------------------------------------------------------------


async def test_load_history_returns_events_in_saved_order_with_every_field(store: Any) -> None:
    t, u = "trace-fields-t", "trace-fields-u"
    rich = {"event": "node_success", "latency_ms": 12.5, "q_depth_in": 0, "ok": True,
            "none": None, "nested": {"list": [1, "two", 3.25], "deep": {"x": "ÿ ✓ 雪"}},
            "exception": "ValueError('boom')"}
    saved_t = [
        ev(t, BASE_TS + 1.000001, "node_start", "a", invocation_id="inv-a", span_id="inv-a",
           parent_span_id="root-t", parent_invocation_ids=(), queued_ts=BASE_TS + 0.999999,
           flow_id="flow-1", seq=1),
        # the same timestamp, another flow (seq restarts per flow)
        ev(t, BASE_TS + 1.000001, "node_start", "b", invocation_id="inv-b", span_id="inv-b",
           parent_span_id="inv-a", parent_invocation_ids=("inv-a",), flow_id="flow-2", seq=1),
        ev(t, BASE_TS + 1.5, "node_success", "a", invocation_id="inv-a", span_id="inv-a",
           parent_span_id="root-t", attempt=2, queued_ts=BASE_TS + 0.5, flow_id="flow-1",
           seq=3, payload=rich, flow_name="named-flow"),
        # a clock that stepped back: still returned in the order saved
        ev(t, BASE_TS + 0.25, "node_success", "b", invocation_id="inv-b",
           parent_invocation_ids=("inv-a", "inv-z"), flow_id="flow-2", seq=2),
        # no flow id, so no event_key: stored as is
        ev(t, BASE_TS + 2.0, "custom_kind", None, flow_id=None, seq=0, payload={}),
    ]
    saved_u = [ev(u, BASE_TS + 1.2, "node_start", "c", flow_id="flow-1", seq=2),
               ev(u, BASE_TS + 1.3, "node_success", "c", flow_id="flow-1", seq=4)]
    await store.save_event(saved_t[0])
    await store.save_events([saved_t[1], saved_u[0], saved_t[2]])
    await store.save_event(saved_u[1])
    await store.save_events(saved_t[3:])
    await store.flush()

    history_t = list(await store.load_history(t))
    assert history_t == saved_t
    for got, want in zip(history_t, saved_t, strict=True):
        assert isinstance(got.parent_invocation_ids, tuple)
        assert dict(got.payload) == dict(want.payload)
        assert got.event_key == want.event_key
    assert list(await store.load_history(u)) == saved_u
    assert list(await store.load_history("no-such-trace")) == []


async def test_runtime_shaped_and_near_miss_payloads_come_back_identical(store: Any) -> None:
    """Durable stores keep a runtime payload's fields as columns and rebuild it on read;
    a payload that only looks like one (wrong type, explicit None, a mismatching id)
    must come back exactly as saved too."""
    from penguiflow.metrics import event_payload

    t = "trace-runtime-shaped"

    def runtime(kind: str, ts: float, seq: int, **extra: Any) -> StoredEvent:
        payload = event_payload(kind, ts, "n", "id-n", t, 1.5, 2, 1, 1, 64, 0, 1, False, 3,
                                extra)
        return ev(t, ts, kind, "n", flow_id="f-rt", seq=seq, payload=payload)

    plain = runtime("node_success", BASE_TS + 1, 1)
    with_extra = runtime("node_error", BASE_TS + 2, 2, exception="ValueError('x')",
                         nested={"a": [1, 2]})
    near_misses = []
    for seq, change in enumerate([
        {"q_depth_in": 2.0},            # a float where the runtime writes an int
        {"trace_pending": None},        # the runtime omits the key instead
        {"trace_id": "someone-else"},   # does not match the event's trace id
        {"q_depth_total": 99},          # not q_depth_in + q_depth_out
        {"trace_cancelled": 0},         # an int where the runtime writes a bool
    ], start=3):
        base = runtime("node_start", BASE_TS + seq, seq)
        near_misses.append(ev(t, base.ts, base.kind, "n", flow_id="f-rt", seq=seq,
                              payload={**base.payload, **change}))
    saved = [plain, with_extra, *near_misses]
    await store.save_events(saved)
    await store.flush()

    history = list(await store.load_history(t))
    assert history == saved
    for got, want in zip(history, saved, strict=True):
        assert dict(got.payload) == dict(want.payload)
        assert {k: type(v) for k, v in got.payload.items()} == {
            k: type(v) for k, v in want.payload.items()}


async def test_history_of_a_real_flow_is_what_the_flow_emitted(
    store: Any, run_flow: Callable[..., Any],
) -> None:
    recorder = Recorder()
    a, b = node("a"), node("b")
    flow = run_flow(a.to(b), b.to(), state_store=store, middlewares=[recorder],
                    name="history-flow")
    messages = [msg(i) for i in range(3)]
    for m in messages:
        await flow.emit(m)
    for _ in messages:
        await within(flow.fetch())
    for m in messages:
        await recorder.wait_for("node_success", trace_id=m.trace_id, count=2)
    await store.flush()
    for m in messages:
        history = list(await store.load_history(m.trace_id))
        assert history == expected_history(recorder, m.trace_id)
        assert [e.kind for e in history] == ["node_start", "node_success"] * 2
        assert list(await flow.load_history(m.trace_id)) == history


async def test_history_pages_concatenate_to_load_history(store: Any) -> None:
    t, u = "trace-pages-t", "trace-pages-u"
    saved = [ev(t, BASE_TS + i * 0.001, "node_start" if i % 2 else "node_success", f"n{i % 3}",
                invocation_id=f"inv-{i}", flow_id="flow-1" if i % 4 else "flow-2")
             for i in range(23)]
    saved[5] = ev(t, BASE_TS - 1, "node_error", "n5", flow_id="flow-1")  # a clock step back
    other = [ev(u, BASE_TS + i, "node_start", "x") for i in range(3)]
    # interleaved with another trace, over several batches and single saves
    await store.save_events([*saved[:7], other[0]])
    await store.save_event(saved[7])
    await store.save_events([other[1], *saved[8:], other[2]])
    history = list(await store.load_history(t))
    assert history == saved  # load_history_page flushes too; this one did
    for size in (1, 2, 5, 22, 23, 24, 1000):
        pages: list[StoredEvent] = []
        offset = 0
        while True:
            page = list(await store.load_history_page(t, offset=offset, limit=size))
            assert len(page) <= size
            pages += page
            offset += len(page)
            if len(page) < size:
                break
        assert pages == history, size
    assert list(await store.load_history_page(t, offset=20, limit=2)) == history[20:22]
    assert list(await store.load_history_page(t, offset=23, limit=5)) == []
    assert list(await store.load_history_page(t, offset=500, limit=5)) == []
    assert list(await store.load_history_page(u, limit=10)) == other
    assert list(await store.load_history_page("no-such-trace", limit=10)) == []
    # a page reads the store's own buffered writes, as load_history does
    late = ev(t, BASE_TS + 5, "node_success", "n0")
    await store.save_event(late)
    assert list(await store.load_history_page(t, offset=23, limit=5)) == [late]


async def test_history_page_rejects_a_bad_limit_or_offset(store: Any) -> None:
    await store.save_event(ev("trace-page-args", BASE_TS, "node_start", "a"))
    for limit in (0, -3):
        with pytest.raises(ValueError, match=r"limit >= 1 .*call load_history"):
            await store.load_history_page("trace-page-args", limit=limit)
    with pytest.raises(ValueError, match=r"offset >= 0 .*offset=0"):
        await store.load_history_page("trace-page-args", offset=-1, limit=5)


async def test_error_count_counts_failed_invocations_not_error_events(store: Any) -> None:
    # What pf traces shows under ERRORS and kind:error finds: an invocation failing
    # three attempts is one, as is one that failed once and then succeeded; a failed
    # remote call is one more. Six error events, three failed invocations.
    t = "trace-failed-invocations"
    events = [ev(t, BASE_TS + 1, "node_start", "a"), ev(t, BASE_TS + 2, "node_error", "a")]
    for attempt in (1, 2):
        events += [ev(t, BASE_TS + 2 + attempt, "node_start", "a", attempt=attempt),
                   ev(t, BASE_TS + 2.5 + attempt, "node_timeout", "a", attempt=attempt)]
    events += [ev(t, BASE_TS + 5, "node_failed", "a", attempt=2),
               ev(t, BASE_TS + 6, "node_start", "b"), ev(t, BASE_TS + 7, "node_error", "b"),
               ev(t, BASE_TS + 8, "node_start", "b", attempt=1),
               ev(t, BASE_TS + 9, "node_success", "b", attempt=1),
               ev(t, BASE_TS + 10, "remote_call_error", "b", attempt=1)]
    await store.save_events(events)
    await store.flush()
    summary = await store.get_trace(t)
    assert summary == reference_summary(t, events)
    assert sum(e.kind in ERROR_KINDS for e in events) == 6
    assert summary is not None and summary.error_count == 3 and summary.node_count == 2


async def test_resaving_the_same_events_stores_them_once(store: Any) -> None:
    t = "trace-idempotent"
    events = [ev(t, BASE_TS + 1, "node_start", "a"), ev(t, BASE_TS + 1.5, "node_error", "a"),
              ev(t, BASE_TS + 1.6, "node_start", "a", attempt=1),
              ev(t, BASE_TS + 2, "node_success", "a", attempt=1)]
    await store.save_events(events)
    await store.flush()
    summary = await store.get_trace(t)
    assert summary == reference_summary(t, events)

    # re-delivered: across batches, and twice within one batch
    await store.save_events(events)
    await store.save_events([events[1], events[1], events[3]])
    for event in events:
        await store.save_event(event)
    await store.flush()
    assert list(await store.load_history(t)) == events
    assert await store.get_trace(t) == summary
    assert (summary.event_count, summary.node_count, summary.error_count) == (4, 1, 1)
    assert ids(await store.list_traces()) == [t]


# ---------------------------------------------------------------------------
# bindings
# ---------------------------------------------------------------------------


async def test_bindings_are_saved_once_and_loaded_by_any_id(store: Any) -> None:
    b1 = RemoteBinding("t1", "ctx-1", "task-1", "http://agent-a")
    b2 = RemoteBinding("t1", "ctx-1", "task-2", "http://agent-a")
    b3 = RemoteBinding("t2", "ctx-2", "task-3", None)
    b4 = RemoteBinding("t3", None, None, "http://agent-b")
    for binding in (b1, b2, b3, b4):
        await store.save_remote_binding(binding)
    # duplicates (the same object, an equal copy, None ids)
    await store.save_remote_binding(b1)
    await store.save_remote_binding(RemoteBinding("t1", "ctx-1", "task-1", "http://agent-a"))
    await store.save_remote_binding(RemoteBinding("t3", None, None, "http://agent-b"))

    async def load(**wanted: Any) -> list[RemoteBinding]:
        return sorted_bindings(await store.load_bindings(**wanted))

    assert await load(trace_id="t1") == [b1, b2]
    assert await load(context_id="ctx-1") == [b1, b2]
    assert await load(task_id="task-3") == [b3]
    assert await load(trace_id="t1", task_id="task-2") == [b2]
    assert await load(trace_id="t1", context_id="ctx-1", task_id="task-1") == [b1]
    assert await load(trace_id="t3") == [b4]
    assert await load(trace_id="t2", context_id="ctx-1") == []
    assert await load(task_id="no-such-task") == []
    with pytest.raises(ValueError):
        await store.load_bindings()


# ---------------------------------------------------------------------------
# list_traces / get_trace / resolve_trace_id
# ---------------------------------------------------------------------------


async def test_list_traces_statuses_come_from_real_flows(
    store: Any, run_flow: Callable[..., Any],
) -> None:
    recorder = Recorder()

    async def explode(message: Any, ctx: Any) -> Any:
        raise ValueError("boom")

    # succeeded
    ok = run_flow(node("work").to(), state_store=store, middlewares=[recorder], name="ok")
    m_ok = msg("fine")
    await ok.emit(m_ok)
    await within(ok.fetch())
    await recorder.wait_for("node_success", trace_id=m_ok.trace_id)

    # failed
    failing = run_flow(node("explode", explode).to(), state_store=store, middlewares=[recorder],
                       emit_errors_to_rookery=True, name="failing")
    m_failed = msg("bad")
    await failing.emit(m_failed)
    assert isinstance(await within(failing.fetch()), FlowError)
    await recorder.wait_for("node_failed", trace_id=m_failed.trace_id)

    # cancelled
    entered, never = asyncio.Event(), asyncio.Event()
    cancelling = run_flow(gated("cancel_me", entered, never).to(), state_store=store,
                          middlewares=[recorder], name="cancelling")
    m_cancelled = msg("cancel")
    await cancelling.emit(m_cancelled)
    await within(entered.wait())
    assert await cancelling.cancel(m_cancelled.trace_id)
    await recorder.wait_for("trace_cancel_finish", trace_id=m_cancelled.trace_id)

    # running: its node is blocked on an event
    stuck_in, stuck_gate = asyncio.Event(), asyncio.Event()
    running = run_flow(gated("stuck", stuck_in, stuck_gate).to(), state_store=store,
                       middlewares=[recorder], name="running")
    m_running = msg("block")
    await running.emit(m_running)
    await within(stuck_in.wait())

    await store.flush()
    expected = {m_ok.trace_id: "succeeded", m_failed.trace_id: "failed",
                m_cancelled.trace_id: "cancelled", m_running.trace_id: "running"}
    summaries = await store.list_traces()
    assert {s.trace_id: s.status for s in summaries} == expected
    # newest first
    assert ids(summaries) == [m_running.trace_id, m_cancelled.trace_id, m_failed.trace_id,
                              m_ok.trace_id]
    for trace_id, status in expected.items():
        assert ids(await store.list_traces(TraceFilter(status=status))) == [trace_id]
    assert ids(await store.list_traces(TraceFilter(has_errors=True))) == [m_failed.trace_id]
    assert ids(await store.list_traces(TraceFilter(has_errors=False))) == [
        m_running.trace_id, m_cancelled.trace_id, m_ok.trace_id]
    assert ids(await store.list_traces(TraceFilter(node="explode"))) == [m_failed.trace_id]
    assert ids(await store.list_traces(TraceFilter(node="stuck", status="running"))) == [
        m_running.trace_id]
    assert await store.list_traces(TraceFilter(node="work", status="failed")) == []
    failed = await store.get_trace(m_failed.trace_id)
    # One failed invocation: its node_error counts, its node_failed does not again.
    assert failed is not None and failed.error_count == 1
    for trace_id in expected:
        history = await store.load_history(trace_id)
        assert await store.get_trace(trace_id) == reference_summary(trace_id, history)
    stuck_gate.set()


def _synthetic_traces() -> dict[str, list[StoredEvent]]:
    """Four traces with chosen starts, durations, nodes and errors."""
    return {
        # 500 ms, alpha, clean
        "tr-a": [ev("tr-a", BASE_TS + 100, "node_start", "alpha"),
                 ev("tr-a", BASE_TS + 100.5, "node_success", "alpha")],
        # 3000 ms, alpha (one retried error) then beta: succeeded, with errors
        "tr-b": [ev("tr-b", BASE_TS + 200, "node_start", "alpha"),
                 ev("tr-b", BASE_TS + 200.5, "node_error", "alpha"),
                 ev("tr-b", BASE_TS + 200.6, "node_retry", "alpha", attempt=1),
                 ev("tr-b", BASE_TS + 201, "node_start", "alpha", attempt=1),
                 ev("tr-b", BASE_TS + 201.5, "node_success", "alpha", attempt=1),
                 ev("tr-b", BASE_TS + 202, "node_start", "beta"),
                 ev("tr-b", BASE_TS + 202.5, "remote_call_start", "beta"),
                 ev("tr-b", BASE_TS + 203, "node_success", "beta")],
        # 100 ms, gamma, clean
        "tr-c": [ev("tr-c", BASE_TS + 300, "node_start", "gamma"),
                 ev("tr-c", BASE_TS + 300.1, "node_success", "gamma")],
        # 2000 ms, beta, failed
        "tr-d": [ev("tr-d", BASE_TS + 400, "node_start", "beta"),
                 ev("tr-d", BASE_TS + 401, "node_error", "beta"),
                 ev("tr-d", BASE_TS + 402, "node_failed", "beta")],
    }


async def test_list_traces_orders_filters_and_limits(store: Any) -> None:
    traces = _synthetic_traces()
    for trace_id in ("tr-d", "tr-a", "tr-c", "tr-b"):  # saved out of start order
        await store.save_events(traces[trace_id])
    await store.flush()
    ref = {t: reference_summary(t, events) for t, events in traces.items()}

    async def listed(**criteria: Any) -> list[str]:
        return ids(await store.list_traces(TraceFilter(**criteria)))

    assert await store.list_traces() == [ref["tr-d"], ref["tr-c"], ref["tr-b"], ref["tr-a"]]
    assert await store.list_traces(None) == await store.list_traces(TraceFilter())
    assert await listed(order="slowest") == ["tr-b", "tr-d", "tr-a", "tr-c"]
    assert await listed(limit=2) == ["tr-d", "tr-c"]
    assert await listed(order="slowest", limit=1) == ["tr-b"]
    assert await listed(since=BASE_TS + 200) == ["tr-d", "tr-c", "tr-b"]  # since inclusive
    assert await listed(until=BASE_TS + 300) == ["tr-b", "tr-a"]  # until exclusive
    assert await listed(since=BASE_TS + 200, until=BASE_TS + 400) == ["tr-c", "tr-b"]
    assert await listed(since=BASE_TS + 500) == []
    assert await listed(node="beta") == ["tr-d", "tr-b"]
    assert await listed(node="alpha") == ["tr-b", "tr-a"]
    assert await listed(node="delta") == []
    assert await listed(has_errors=True) == ["tr-d", "tr-b"]
    assert await listed(has_errors=False) == ["tr-c", "tr-a"]
    assert await listed(status="failed") == ["tr-d"]
    assert await listed(status="succeeded") == ["tr-c", "tr-b", "tr-a"]
    assert await listed(status="running") == []
    assert await listed(node="beta", has_errors=True, order="slowest", limit=1) == ["tr-b"]
    assert await listed(node="alpha", since=BASE_TS + 150, status="succeeded") == ["tr-b"]
    for trace_id, summary in ref.items():
        assert await store.get_trace(trace_id) == summary
    assert ref["tr-b"].duration_ms == pytest.approx(3000.0)
    assert ref["tr-b"].remote_call_count == 1


def test_trace_filter_rejects_bad_criteria() -> None:
    for status in TRACE_STATUSES:
        TraceFilter(status=status)
    TraceFilter(order="slowest", limit=1)
    with pytest.raises(ValueError, match="status"):
        TraceFilter(status="done")
    with pytest.raises(ValueError, match="order"):
        TraceFilter(order="oldest")
    with pytest.raises(ValueError, match="limit"):
        TraceFilter(limit=0)
    with pytest.raises(ValueError, match="limit"):
        TraceFilter(limit=-5)


async def test_get_trace_summarises_a_real_flow_with_a_remote_call(
    store: Any, run_flow: Callable[..., Any],
) -> None:
    recorder = Recorder()
    attempts: list[int] = []

    async def flaky(message: Any, ctx: Any) -> Any:
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionError("transient")
        return message

    transport = InMemoryTransport({"mem://agent": InMemoryAgent()})
    remote = RemoteNode(transport=transport, skill="echo", agent_url="mem://agent",
                        name="remote")
    first = node("flaky", flaky, max_retries=1, backoff_base=0.0)
    flow = run_flow(first.to(remote), remote.to(), state_store=store, middlewares=[recorder],
                    name="summary-flow")
    message = msg({"q": "hello"})
    await flow.emit(message)
    assert await within(flow.fetch()) == {"q": "hello"}
    await recorder.wait_for("node_success", trace_id=message.trace_id, count=2)
    await store.flush()

    t = message.trace_id
    history = list(await store.load_history(t))
    assert history == expected_history(recorder, t)
    summary = await store.get_trace(t)
    assert summary is not None
    assert summary == reference_summary(t, history)
    assert summary.trace_id == t
    assert summary.flow_name == "summary-flow"
    assert summary.status == "succeeded"
    assert summary.node_count == 2  # invocations started; the retry is not a new one
    assert summary.error_count == 1
    assert summary.remote_call_count == 1
    assert summary.event_count == len(history)
    assert summary.nodes == ("flaky", "remote")
    assert summary.started_ts == min(e.ts for e in history)
    assert summary.ended_ts == max(e.ts for e in history)
    assert summary.duration_ms == pytest.approx(
        (summary.ended_ts - summary.started_ts) * 1000.0)
    assert summary.duration_ms > 0
    assert await store.get_trace("no-such-trace") is None

    (task,) = transport.tasks.values()
    assert await store.load_bindings(trace_id=t) == [
        RemoteBinding(t, task.context_id, task.task_id, "mem://agent")]


async def test_resolve_trace_id_by_prefix(store: Any) -> None:
    names = ["abc123", "abc456", "abd789", "a_c000", "axc111", "a%c222"]
    names += [f"dead{i:02d}" for i in range(12)]
    for i, trace_id in enumerate(names):
        await store.save_event(ev(trace_id, BASE_TS + i, "node_start", "n"))
    await store.flush()

    async def resolve(prefix: str) -> set[str]:
        found = await store.resolve_trace_id(prefix)
        assert isinstance(found, list)
        assert len(found) == len(set(found))
        return set(found)

    assert await resolve("abc") == {"abc123", "abc456"}
    assert await resolve("ab") == {"abc123", "abc456", "abd789"}
    assert await resolve("abc123") == {"abc123"}
    assert await resolve("zzz") == set()
    # LIKE wildcards in a prefix are literal characters
    assert await resolve("a_") == {"a_c000"}
    assert await resolve("a%") == {"a%c222"}
    dead = await resolve("dead")
    assert len(dead) == 10
    assert all(t.startswith("dead") for t in dead)


# ---------------------------------------------------------------------------
# follow
# ---------------------------------------------------------------------------


async def test_follow_yields_live_events_of_one_trace_in_order(
    store: Any, run_flow: Callable[..., Any],
) -> None:
    followed, other = msg("followed"), msg("other")
    follower = await subscribed(store, followed.trace_id)
    try:
        entered, gate = asyncio.Event(), asyncio.Event()
        recorder = Recorder()
        flow = run_flow(gated("hold", entered, gate).to(), state_store=store,
                        middlewares=[recorder], name="follow-flow")
        await flow.emit(followed)
        await flow.emit(other)
        # live: node_start arrives while the node is still blocked
        await follower.wait_until(lambda evs: any(e.kind == "node_start" for e in evs))
        assert not gate.is_set()
        gate.set()
        for _ in range(2):
            await within(flow.fetch())
        await recorder.wait_for("node_success", trace_id=other.trace_id)
        # a sentinel saved after everything: once it arrives, all before it has
        await store.save_event(ev(followed.trace_id, BASE_TS, "sentinel", flow_id="probe",
                                  seq=10_000))
        await store.flush()
        await follower.wait_until(lambda evs: any(e.kind == "sentinel" for e in evs))
    finally:
        await follower.aclose()

    assert all(e.trace_id == followed.trace_id for e in follower.events)
    live = [e for e in follower.events if e.flow_id == flow.flow_id]
    history = [e for e in await store.load_history(followed.trace_id)
               if e.flow_id == flow.flow_id]
    assert [(e.kind, e.seq) for e in live] == [(e.kind, e.seq) for e in history]
    assert [e.kind for e in live] == ["node_start", "node_success"]


async def test_follow_ends_when_the_store_closes(store: Any) -> None:
    follower = await subscribed(store, "trace-closing")
    await within(store.close())
    await within(follower.task)
    assert follower.ended


async def test_follow_on_a_closed_store_raises_store_unavailable(store: Any) -> None:
    await store.close()
    agen = store.follow("any-trace")
    try:
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(anext(agen), 2.0)
    finally:
        await agen.aclose()


# ---------------------------------------------------------------------------
# concurrency, flush on stop, failures
# ---------------------------------------------------------------------------


async def test_concurrent_writers_keep_every_trace_in_order(
    make_store: StoreFactory, run_flow: Callable[..., Any],
) -> None:
    store = await make_store.make(**options(make_store, batch_size=7))
    flows, recorders, sent = [], [], []
    for name in ("writer-a", "writer-b"):
        recorder = Recorder()
        a, b = node(f"{name}-first"), node(f"{name}-second")
        flows.append(run_flow(a.to(b), b.to(), state_store=store, middlewares=[recorder],
                              name=name))
        recorders.append(recorder)
        sent.append([msg(i) for i in range(20)])

    async def drive(flow: Any, messages: list[Message]) -> None:
        for m in messages:
            await flow.emit(m)
        for _ in messages:
            await within(flow.fetch())

    await within(asyncio.gather(*(drive(f, ms) for f, ms in zip(flows, sent, strict=True))))
    for flow in flows:
        await within(flow.stop())
    await store.flush()

    for recorder, messages in zip(recorders, sent, strict=True):
        for m in messages:
            history = list(await store.load_history(m.trace_id))
            assert history == expected_history(recorder, m.trace_id)
            assert len(history) == 4
    summaries = await store.list_traces(TraceFilter(limit=100))
    assert len(summaries) == 40
    assert {s.status for s in summaries} == {"succeeded"}
    assert {s.flow_name for s in summaries} == {"writer-a", "writer-b"}


async def test_stop_flushes_so_history_is_complete_after_it(
    make_store: StoreFactory, run_flow: Callable[..., Any],
) -> None:
    # Buffered stores: no timer flush, no batch-size flush; only stop() writes.
    store = await make_store.make(**options(make_store, flush_interval_s=3600.0,
                                            batch_size=10_000))
    a, b = node("a"), node("b")
    flow = run_flow(a.to(b), b.to(), state_store=store, name="flushing")
    messages = [msg(i) for i in range(5)]
    for m in messages:
        await flow.emit(m)
    for _ in messages:
        await within(flow.fetch())
    await within(flow.stop())

    # Another store on the same database sees everything: it is written, not buffered.
    reader = store if not make_store.buffered else await make_store.make(same_as=store)
    for m in messages:
        history = list(await reader.load_history(m.trace_id))
        assert [e.kind for e in history] == ["node_start", "node_success"] * 2
        assert [e.flow_id for e in history] == [flow.flow_id] * 4
        assert [e.seq for e in history] == sorted(e.seq for e in history)
        assert list(await store.load_history(m.trace_id)) == history
    assert len(await reader.list_traces()) == 5


async def test_a_failing_save_is_counted_and_logged_and_the_flow_completes(
    make_store: StoreFactory, run_flow: Callable[..., Any], caplog: pytest.LogCaptureFixture,
) -> None:
    store = await make_store.make(failing_saves(make_store.cls, "node_start"))
    recorder = Recorder()
    flow = run_flow(node("a").to(), state_store=store, middlewares=[recorder], name="failing")
    messages = [msg(i) for i in range(3)]
    with caplog.at_level(logging.ERROR, logger="penguiflow.core"):
        for m in messages:
            await flow.emit(m)
        results = [await within(flow.fetch()) for _ in messages]
        await recorder.wait_for("node_success", count=3)
    assert sorted(r.payload for r in results) == [0, 1, 2]
    assert flow.observer_failures["state_store_save_failed"] == 3
    failures = [r for r in caplog.records if r.getMessage() == "state_store_save_failed"]
    assert len(failures) == 3
    assert all(r.levelno == logging.ERROR and r.name == "penguiflow.core" for r in failures)
    await store.flush()
    for m in messages:
        assert [e.kind for e in await store.load_history(m.trace_id)] == ["node_success"]


async def test_a_closed_store_raises_store_unavailable(
    store: Any, run_flow: Callable[..., Any],
) -> None:
    event = ev("trace-closed", BASE_TS, "node_start", "a")
    await store.save_event(event)
    await store.flush()
    await store.close()
    await store.close()  # idempotent

    calls: list[Callable[[], Any]] = [
        lambda: store.save_event(ev("trace-closed", BASE_TS + 1, "node_success", "a")),
        lambda: store.save_events([ev("trace-closed", BASE_TS + 1, "node_success", "a")]),
        lambda: store.load_history("trace-closed"),
        lambda: store.load_history_page("trace-closed", limit=10),
        lambda: store.save_remote_binding(RemoteBinding("trace-closed", "c", "t", None)),
        lambda: store.list_traces(),
        lambda: store.get_trace("trace-closed"),
        lambda: store.resolve_trace_id("trace"),
        lambda: store.load_bindings(trace_id="trace-closed"),
    ]
    for call in calls:
        with pytest.raises(StoreUnavailable):
            await within(call())
    if hasattr(store, "save_event_fields"):
        with pytest.raises(StoreUnavailable):
            store.save_event_fields(("trace-closed", BASE_TS, "node_start") + (None,) * 20)

    # a flow whose store is closed still runs; every save is a counted failure
    flow = run_flow(node("a").to(), state_store=store, name="closed-store")
    await flow.emit(msg("x"))
    assert (await within(flow.fetch())).payload == "x"
    assert flow.observer_failures["state_store_save_failed"] >= 1


# ---------------------------------------------------------------------------
# open_store and PenguiFlow.load_history
# ---------------------------------------------------------------------------


async def _round_trip(store: Any) -> None:
    event = ev("trace-open-store", BASE_TS, "node_start", "a")
    async with store:
        await store.save_event(event)
        await store.flush()
        assert list(await store.load_history("trace-open-store")) == [event]


async def test_open_store_memory() -> None:
    store = penguiflow_exporters.open_store("memory://")
    assert isinstance(store, InMemoryStateStore)
    await _round_trip(store)


async def test_open_store_sqlite_paths_and_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    cls = store_class("sqlite")
    absolute = tmp_path / "abs" / "traces.db"
    store = penguiflow_exporters.open_store(f"sqlite:///{absolute}")
    assert isinstance(store, cls)
    await _round_trip(store)
    assert absolute.is_file()

    monkeypatch.chdir(tmp_path)
    relative = penguiflow_exporters.open_store("sqlite:///rel/traces.db", on_full="drop")
    assert isinstance(relative, cls)
    assert relative.on_full == "drop"
    await _round_trip(relative)
    assert (tmp_path / "rel" / "traces.db").is_file()

    with pytest.raises(ValueError):
        penguiflow_exporters.open_store("sqlite://")


async def test_open_store_postgres(pg_dsn: str) -> None:
    cls = store_class("postgres")
    schema = unique_schema()
    try:
        store = penguiflow_exporters.open_store(pg_dsn, schema=schema)
        assert isinstance(store, cls)
        await _round_trip(store)
        alias = "postgres://" + pg_dsn.split("://", 1)[1]
        aliased = penguiflow_exporters.open_store(alias, schema=schema)
        assert isinstance(aliased, cls)
        await aliased.close()
    finally:
        await drop_schemas(pg_dsn, [schema])


async def test_open_store_defaults_to_penguiflow_store_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PENGUIFLOW_STORE", "memory://")
    assert isinstance(penguiflow_exporters.open_store(), InMemoryStateStore)
    assert isinstance(penguiflow_exporters.open_store(None), InMemoryStateStore)

    path = tmp_path / "env" / "traces.db"
    monkeypatch.setenv("PENGUIFLOW_STORE", f"sqlite:///{path}")
    store = penguiflow_exporters.open_store()
    assert isinstance(store, store_class("sqlite"))
    await _round_trip(store)
    assert path.is_file()

    # unset (or empty): the embedded SQLite default, relative to the working directory
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PENGUIFLOW_STORE", "")
    default = penguiflow_exporters.open_store()
    assert isinstance(default, store_class("sqlite"))
    await _round_trip(default)
    assert (tmp_path / ".penguiflow" / "traces.db").is_file()


@pytest.mark.parametrize("url", ["redis://localhost:6379/0", "mysql://db", "traces.db", "file:x"])
def test_open_store_rejects_unknown_schemes_naming_the_supported_ones(url: str) -> None:
    with pytest.raises(ValueError) as info:
        penguiflow_exporters.open_store(url)
    message = str(info.value)
    assert url in message
    for scheme in ("memory://", "sqlite://", "postgresql://"):
        assert scheme in message


async def test_flow_load_history_without_a_store_raises() -> None:
    flow = create(node("a").to())
    with pytest.raises(RuntimeError) as info:
        await flow.load_history("any-trace")
    assert str(info.value) == "PenguiFlow was created without a state_store"


# ---------------------------------------------------------------------------
# the buffered write path (SQLite and Postgres only)
# ---------------------------------------------------------------------------


@BUFFERED
async def test_full_buffer_drop_policy_counts_drops_and_spares_the_flow(
    make_store: StoreFactory, run_flow: Callable[..., Any], caplog: pytest.LogCaptureFixture,
) -> None:
    store = await make_store.make(held_writes(make_store.cls), on_full="drop", max_buffer=2,
                                  batch_size=1)
    recorder = Recorder()
    flow = run_flow(node("a").to(), state_store=store, middlewares=[recorder], name="dropping")
    messages = [msg(i) for i in range(10)]
    with caplog.at_level(logging.WARNING, logger="penguiflow_exporters"):
        for m in messages:
            await flow.emit(m)
        results = [await within(flow.fetch()) for _ in messages]
        await recorder.wait_for("node_success", count=len(messages))
        await within(store.entered.wait())
    # the flow finished although no batch could be written
    assert sorted(r.payload for r in results) == list(range(10))
    assert store.batches_written == 0
    assert store.failures["dropped"] > 0
    assert "state_store_save_failed" not in flow.observer_failures
    assert [r for r in caplog.records
            if r.levelno == logging.WARNING and r.name.startswith("penguiflow_exporters")]

    store.gate.set()
    await within(store.written.wait())
    await store.flush()
    stored = marked = 0
    for m in messages:
        everything = list(await store.load_history(m.trace_id))
        history = [e for e in everything if e.kind != "store_events_lost"]
        full = expected_history(recorder, m.trace_id)
        assert all(e in full for e in history)  # whatever was kept is intact
        stored += len(history)
        # a trace that lost events says how many (the marker the store writes)
        lost = sum(e.payload["events_lost"] for e in everything if e not in history)
        assert len(history) + lost == len(full)
        marked += lost
    assert stored + store.failures["dropped"] == len(recorder.events)
    assert marked == store.failures["dropped"]


async def check_tuples_and_stored_events_keep_their_order(store: Any) -> None:
    """Several hundred runtime tuples (with a writer process, encoded a few hundred at
    a time as they come: see _blocks.Sealed; in memory, kept as tuples until read),
    then a StoredEvent, then more tuples, some of them re-delivered: stored and
    followed once each, in the order saved."""
    follower = await subscribed(store, "t-mixed")
    first = [fields("t-mixed", i, extra={"i": i} if i % 97 == 0 else None)
             for i in range(1, 601)]
    middle = ev("t-mixed", BASE_TS, "marker", flow_id="flow-m", seq=1)
    last = [fields("t-mixed", i, "node_success") for i in range(601, 901)]
    for item in [*first, middle, *last[:150], *first[-5:], *last[150:]]:
        if item is middle:
            await store.save_event(middle)
            continue
        # As the runtime does: await what it returns (never a wait for room here,
        # at most one turn of the loop per full batch).
        waiter = store.save_event_fields(item)
        if waiter is not None:
            await waiter
    await store.flush()
    expected = [*map(stored_from_fields, first), middle, *map(stored_from_fields, last)]
    try:
        history = list(await store.load_history("t-mixed"))
        assert history[-901:] == expected  # after the follower's probe events
        page = await store.load_history_page("t-mixed", offset=len(history) - 2, limit=1)
        assert list(page) == [expected[-2]]
        await follower.wait_until(lambda evs: any(e.seq == 900 for e in evs))
    finally:
        await follower.aclose()
    assert [e for e in follower.events if e.flow_id != "probe"] == expected
    summary = await store.get_trace("t-mixed")
    assert summary == reference_summary("t-mixed", await store.load_history("t-mixed"))
    assert getattr(store, "failures", {}) == {}


async def test_runtime_tuples_and_stored_events_keep_their_order(store: Any) -> None:
    await check_tuples_and_stored_events_keep_their_order(store)


@BUFFERED
async def test_tuples_and_stored_events_keep_their_order_across_batches(
    make_store: StoreFactory,
) -> None:
    # batch_size=100: batches cut across Sealed chunks and the StoredEvent.
    await check_tuples_and_stored_events_keep_their_order(
        await make_store.make(make_store.cls, batch_size=100))


@BUFFERED
async def test_full_buffer_block_policy_loses_nothing(
    make_store: StoreFactory, run_flow: Callable[..., Any],
) -> None:
    store = await make_store.make(held_writes(make_store.cls), on_full="block", max_buffer=2,
                                  batch_size=1)
    recorder = Recorder()
    flow = run_flow(node("a").to(), state_store=store, middlewares=[recorder], name="blocking")
    messages = [msg(i) for i in range(6)]
    for m in messages:
        await flow.emit(m)
    await within(store.blocked.wait())  # the flow waits on the full buffer
    store.gate.set()
    for _ in messages:
        await within(flow.fetch())
    await recorder.wait_for("node_success", count=len(messages))
    await within(flow.stop())
    await store.flush()
    assert store.failures["dropped"] == 0
    for m in messages:
        assert list(await store.load_history(m.trace_id)) == expected_history(
            recorder, m.trace_id)


@BUFFERED
async def test_a_batch_of_long_traces_with_bad_and_repeated_events_is_stored_exactly(
    make_store: StoreFactory,
) -> None:
    # Batches of long traces' StoredEvents reach the writers by column (ColumnRows):
    # the event refused, the ones stored before and the one repeated in the batch
    # must be told apart exactly as in a batch of tuples.
    store = await make_store.make(make_store.cls, batch_size=1000)
    first = [ev(t, BASE_TS + i, "node_start" if i % 2 == 0 else "node_success",
                f"n{i % 7}") for i in range(150) for t in ("long-a", "long-b")]
    await store.save_events(first[:100])
    await within(store.flush())
    bad = ev("long-a", BASE_TS + 500, "node_start", "bad\x00name")
    again = ev("long-b", BASE_TS + 501, "node_start", "n1")
    await store.save_events([*first[40:100], *first[100:], bad, again, again])
    await within(store.flush())
    for t in ("long-a", "long-b"):
        history = list(await store.load_history(t))
        markers = [e.payload["events_lost"] for e in history if e.kind == EVENTS_LOST_KIND]
        assert [e for e in history if e.kind != EVENTS_LOST_KIND] == [
            e for e in [*first, again] if e.trace_id == t]
        assert markers == ([1] if t == "long-a" else [])  # the refused event, said
        assert await store.get_trace(t) == reference_summary(t, history)
    assert store.failures["rejected"] == 1 and store.failures["events_lost"] == 1


@BUFFERED
async def test_a_failed_batch_is_counted_and_later_batches_are_written(
    make_store: StoreFactory, caplog: pytest.LogCaptureFixture,
) -> None:
    store = await make_store.make(failing_first_write(make_store.cls), flush_interval_s=3600.0,
                                  retries=1)
    lost = [ev("trace-lost", BASE_TS + 1, "node_start", "a"),
            ev("trace-lost", BASE_TS + 2, "node_success", "a")]
    kept = [ev("trace-kept", BASE_TS + 3, "node_start", "a"),
            ev("trace-kept", BASE_TS + 4, "node_success", "a")]
    with caplog.at_level(logging.ERROR, logger="penguiflow_exporters"):
        await store.save_events(lost)
        await within(store.flush())  # the failure is absorbed, not raised
    assert store.failures["write_failed"] == 1
    assert store.failures["events_lost"] == 2
    assert [r for r in caplog.records
            if r.levelno == logging.ERROR and r.name.startswith("penguiflow_exporters")]

    await store.save_events(kept)
    await within(store.flush())
    assert store.failures["write_failed"] == 1
    assert list(await store.load_history("trace-kept")) == kept
    # The lost trace keeps a marker saying so: never a status its missing events hid.
    (marker,) = await store.load_history("trace-lost")
    assert marker.kind == "store_events_lost" and marker.payload["events_lost"] == 2
    assert "injected: the database went away" in marker.payload["reason"]
    lost = await store.get_trace("trace-lost")
    assert lost is not None and lost.status == "incomplete" and lost.events_lost == 2
    assert sorted(ids(await store.list_traces())) == ["trace-kept", "trace-lost"]


def held_inside_write(kind: str, base: type[Any]) -> type[Any]:
    """A store whose batch write blocks *inside* the real write, until ``release()``.

    Both durable stores' writer (an EventWriter: a SQLite or Postgres transaction,
    in a writer process or not) is the write, so the batch is held around it.
    """
    return held_writes(base)


@BUFFERED
async def test_flush_waits_for_the_batch_the_writer_is_writing(
    make_store: StoreFactory,
) -> None:
    store = await make_store.make(held_inside_write(make_store.kind, make_store.cls),
                                  batch_size=1)
    event = ev("trace-in-flight", BASE_TS, "node_start", "a")
    await store.save_event(event)
    await within(store.entered.wait())  # the background writer is writing the batch

    committed_when_flush_returned: list[int] = []
    flush = asyncio.ensure_future(store.flush())
    flush.add_done_callback(lambda _: committed_when_flush_returned.append(store.committed))
    for _ in range(5):  # lets an early-returning flush return before the batch is released
        await asyncio.sleep(0)
    store.release()
    await within(flush)
    assert committed_when_flush_returned == [1], (
        "flush() returned while the writer's batch was still uncommitted")
    reader = await make_store.make(same_as=store)
    assert list(await reader.load_history("trace-in-flight")) == [event]


# -- runtime events packed for a writer process (penguiflow_exporters._packs) ----------

PROCESS_WRITERS = pytest.mark.parametrize("store_kind", ["sqlite", "postgres"])


def runtime_values(trace_id: Any, seq: int, kind: str = "node_start",
                   extra: Any = None) -> tuple[Any, ...]:
    """An event as the runtime hands it to ``event_values_sink()``: 23 plain values."""
    return (trace_id, BASE_TS + seq, kind, "a", "a-id", f"{seq:016x}", (), None, None, seq,
            0, None, "packed", "flow-packed", 0.5, 0, 0, 1, 64, 1, False, None, extra)


async def warmed_sink(store: Any) -> Callable[[tuple[Any, ...]], Any]:
    """The store's values sink, once its writer (process) runs: one event written."""
    sink = store.event_values_sink()
    assert sink is not None
    await store.save_event(ev("warm-up", BASE_TS, "probe", flow_id="probe", seq=1))
    await store.flush()
    return sink  # type: ignore[no-any-return]


@PROCESS_WRITERS
async def test_runtime_events_waiting_for_the_writer_do_not_make_the_collector_run(
    store: Any,
) -> None:
    # Held as tuples, 20k events waiting for the writer made CPython's collector run
    # a young pass every ~700 of them, each examining every tuple still young: ~1 us
    # a hop of chain N=5. Packed for the writer process as they come, they are freed
    # while young. Nothing yields below, so the writer takes none of them meanwhile.
    sink = await warmed_sink(store)
    gc.collect()
    young = gc.get_stats()[0]["collections"]
    for seq in range(1, 20_001):
        sink(("held", BASE_TS + seq, "node_start", "a", "a-id", None, (), None, None, seq,
              0, None, "packed", "flow-packed", None, 0, 0, 1, 64, 1, False, None, None))
    young = gc.get_stats()[0]["collections"] - young
    await within(store.flush(), 60)
    assert [e.seq for e in await store.load_history("held")] == list(range(1, 20_001))
    assert store.failures["events_lost"] == 0
    assert young <= 3, f"{young} young collections while 20,000 events waited"


class Colour(enum.Enum):
    RED = "red"


@PROCESS_WRITERS
async def test_a_follower_gets_each_event_as_stored_packed_or_not(store: Any) -> None:
    # 1010 events: four packs of 250, then 10 left as they are. A follower gets the
    # odd values of an extra (a read-only mapping, an enum) as the store writes them,
    # whichever way the event went.
    sink = await warmed_sink(store)
    follower = await subscribed(store, "followed")
    try:
        for seq in range(1, 1011):
            extra = {"n": seq, "tag": "\u2028 \x1b[31m", "colour": Colour.RED} \
                if seq % 100 == 0 or seq == 1005 else None
            sink(runtime_values("followed", seq, extra=MappingProxyType(extra)
                                if extra else None))
        assert store._processor._extra == 4 * 249  # packed, as the writer is held up
        await within(store.flush())
        await follower.wait_until(lambda evs: sum(e.kind == "node_start" for e in evs) == 1010)
    finally:
        await follower.aclose()
    live = [e for e in follower.events if e.kind == "node_start"]
    assert live == [e for e in await store.load_history("followed") if e.kind == "node_start"]
    assert [e.seq for e in live] == list(range(1, 1011))
    assert live[99].payload["n"] == 100 and live[99].payload["tag"] == "\u2028 \x1b[31m"
    assert live[99].payload["colour"] == live[1004].payload["colour"] == "red"
    assert live[0].invocation_id == f"{1:016x}" and live[0].payload["latency_ms"] == 0.5


@PROCESS_WRITERS
async def test_one_event_a_process_writer_refuses_inside_a_pack_is_the_only_one_lost(
    store: Any,
) -> None:
    sink = await warmed_sink(store)
    for seq in range(1, 601):
        sink(runtime_values("bad\x00id" if seq == 300 else "good", seq))
    assert store._processor._extra == 2 * 249  # the bad one is inside the first pack
    await within(store.flush())
    assert store.failures["rejected"] == 1 and store.failures["events_lost"] == 1
    assert [e.seq for e in await store.load_history("good")] == \
        [seq for seq in range(1, 601) if seq != 300]


class _SplitOnPoison:
    """The store's real writer (packing too), whose writes raise for a batch holding
    an event of kind ``poison``: the processor splits the batch, down to that event."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.sizes: list[int] = []

    def pack(self, items: list[Any]) -> Any:
        return self._inner.pack(items)

    async def write(self, items: Any) -> Any:
        self.sizes.append(len(items))
        if any(type(item) is tuple and item[2] == "poison" for item in items):
            raise ValueError("injected: this batch holds a poison event")
        return await self._inner.write(items)

    async def close(self) -> None:
        await self._inner.close()


@PROCESS_WRITERS
async def test_a_packed_batch_split_after_an_error_loses_only_the_event_at_fault(
    make_store: StoreFactory,
) -> None:
    writers: list[_SplitOnPoison] = []

    class Splitting(make_store.cls):  # type: ignore[misc,name-defined]
        def _make_writer(self) -> Any:
            writers.append(_SplitOnPoison(super()._make_writer()))
            return writers[-1]

    store = await make_store.make(Splitting)
    sink = await warmed_sink(store)
    for seq in range(1, 1001):
        sink(runtime_values("split", seq, "poison" if seq == 777 else "node_start"))
    assert store._processor._extra == 4 * 249
    await within(store.flush())
    assert store.failures["events_lost"] == 1
    history = await store.load_history("split")
    assert [e.seq for e in history if e.kind == "node_start"] == \
        [seq for seq in range(1, 1001) if seq != 777]
    assert [e.payload["events_lost"] for e in history if e.kind == "store_events_lost"] == [1]
    assert writers[0].sizes[1] == 1000 and 1 in writers[0].sizes  # split down to one


class _PackFailsOnce:
    """The store's real writer, whose first ``pack`` raises (a writer's bug)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.calls = 0

    def pack(self, items: list[Any]) -> Any:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("injected: pack() failed")
        return self._inner.pack(items)

    async def write(self, items: Any) -> Any:
        return await self._inner.write(items)

    async def close(self) -> None:
        await self._inner.close()


@PROCESS_WRITERS
async def test_events_that_cannot_be_packed_are_written_with_the_packed_ones(
    make_store: StoreFactory,
) -> None:
    # Three runs of 250: the first meets a pack() that raises, the second holds an
    # extra nested past the pickler's recursion limit; both stay events, which the
    # batch writes between the packs, in order, with the third run (packed).
    writers: list[_PackFailsOnce] = []

    class PackFailsOnce(make_store.cls):  # type: ignore[misc,name-defined]
        def _make_writer(self) -> Any:
            writers.append(_PackFailsOnce(super()._make_writer()))
            return writers[-1]

    store = await make_store.make(PackFailsOnce)
    sink = await warmed_sink(store)
    deep: list[Any] = []
    for _ in range(5000):
        deep = [deep]
    for seq in range(1, 751):
        sink(runtime_values("mixed", seq, extra={"deep": deep} if seq == 400 else None))
    assert store._processor._extra == 249  # the third run alone was packed
    await within(store.flush())
    assert writers[0].calls == 3 and store.failures["events_lost"] == 0
    history = await store.load_history("mixed")
    assert [e.seq for e in history] == list(range(1, 751))
    assert "deep" in history[399].payload


class _ClosedCache(Mapping[str, Any]):
    """A payload value like a closed ``dbm`` database: reading it raises OSError."""

    def __getitem__(self, key: str) -> Any:
        raise OSError("cache file closed")

    def __iter__(self) -> Any:
        raise OSError("cache file closed")

    def __len__(self) -> int:
        return 1


async def test_an_event_whose_value_raises_oserror_loses_only_itself(
        make_store: StoreFactory) -> None:
    # An OSError is what an unreachable database raises: a durable store took it as
    # the database's, retried the batch, then lost it whole. It is the event's fault.
    store = await make_store.make(**options(make_store, retries=1))
    events = [StoredEvent("t-oserror", 1000.0 + i, "node_start", "a", None, {"i": i},
                          flow_id="f-oserror", seq=i) for i in range(20)]
    events[10] = StoredEvent("t-oserror", 1010.0, "node_start", "a", None,
                             {"cache": _ClosedCache()}, flow_id="f-oserror", seq=10)
    await store.save_events(events)
    history = await store.load_history("t-oserror")
    kept = [e for e in history if e.kind != "store_events_lost"]
    if make_store.buffered:
        assert len(kept) == 19
        assert store.failures["events_lost"] == 1 and store.failures["retried"] == 0
    else:  # the memory store keeps the object as it is
        assert len(kept) == 20
