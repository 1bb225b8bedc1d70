"""§15.3 RemoteNode / RemoteTransport behaviour (events, streaming, bindings, cancellation)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import pytest
from pfcore_support import Recorder, msg, within
from pydantic import BaseModel

from penguiflow import FlowError, FlowErrorCode, Node, NodePolicy, StreamChunk, create
from penguiflow import remote as remote_module
from penguiflow.core import Context
from penguiflow.remote import (
    RemoteCallRequest,
    RemoteCallResult,
    RemoteNode,
    RemoteStreamEvent,
    RemoteTransport,
)
from penguiflow.state import RemoteBinding, StateStore, StoredEvent

URL = "http://agent.example"
REMOTE_KINDS = (
    "remote_call_start",
    "remote_stream_event",
    "remote_call_success",
    "remote_call_error",
    "remote_call_cancelled",
    "remote_cancel_error",
)


class FakeTransport(RemoteTransport):
    """A scripted transport; ``stream`` can park until ``release`` is set."""

    def __init__(
        self,
        *,
        result: RemoteCallResult | None = None,
        events: Sequence[RemoteStreamEvent] = (),
        failures: Sequence[Exception] = (),
        stream_error: Exception | None = None,
        block: bool = False,
        cancel_error: Exception | None = None,
        on_send: Callable[[RemoteCallRequest], None] | None = None,
    ) -> None:
        self.result = result if result is not None else RemoteCallResult(result="ok")
        self.events = list(events)
        self.failures = list(failures)
        self.stream_error = stream_error
        self.block = block
        self.cancel_error = cancel_error
        self.on_send = on_send
        self.requests: list[RemoteCallRequest] = []
        self.cancels: list[tuple[str, str]] = []
        self.in_flight = asyncio.Event()
        self.release = asyncio.Event()
        self.stream_cancelled = asyncio.Event()
        self.cancel_called = asyncio.Event()

    async def send(self, request: RemoteCallRequest) -> RemoteCallResult:
        self.requests.append(request)
        if self.failures:
            raise self.failures.pop(0)
        if self.on_send is not None:
            self.on_send(request)
        return self.result

    async def stream(self, request: RemoteCallRequest) -> AsyncIterator[RemoteStreamEvent]:
        self.requests.append(request)
        for event in self.events:
            yield event
        if self.stream_error is not None:
            raise self.stream_error
        if self.block:
            self.in_flight.set()
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.stream_cancelled.set()
                raise

    async def cancel(self, *, agent_url: str, task_id: str) -> None:
        self.cancels.append((agent_url, task_id))
        self.cancel_called.set()
        if self.cancel_error is not None:
            raise self.cancel_error


class RecordingStore(StateStore):
    def __init__(self) -> None:
        self.events: list[StoredEvent] = []
        self.bindings: list[RemoteBinding] = []

    async def save_event(self, event: StoredEvent) -> None:
        self.events.append(event)

    async def load_history(self, trace_id: str) -> Sequence[StoredEvent]:
        return [e for e in self.events if e.trace_id == trace_id]

    async def save_remote_binding(self, binding: RemoteBinding) -> None:
        self.bindings.append(binding)


def remote(transport: FakeTransport, **kwargs: Any) -> Node:
    kwargs.setdefault("skill", "search")
    kwargs.setdefault("agent_url", URL)
    kwargs.setdefault("name", "remote")
    return RemoteNode(transport=transport, **kwargs)


def remote_kinds(recorder: Recorder, trace_id: Any) -> list[str]:
    return [k for k in recorder.kinds(trace_id=trace_id) if k in REMOTE_KINDS]


async def settled(recorder: Recorder, trace_id: str, kinds: Sequence[str]) -> None:
    """Wait until one of ``kinds`` was recorded for ``trace_id``."""
    while not any(recorder.of(k, trace_id=trace_id) for k in kinds):
        seen = len(recorder.of(None, trace_id=trace_id))
        await recorder.wait_for(None, count=seen + 1, trace_id=trace_id)  # type: ignore[arg-type]


def fast_retry(retries: int) -> NodePolicy:
    return NodePolicy(validate="none", max_retries=retries, backoff_base=0.001)


# -- factory ------------------------------------------------------------------------


def test_remote_node_factory_returns_plain_node() -> None:
    node = remote(FakeTransport())
    assert type(node) is Node
    assert node.name == "remote"
    assert node.policy == NodePolicy()
    policy = NodePolicy(validate="none", timeout_s=3.0)
    assert remote(FakeTransport(), policy=policy).policy is policy


# -- unary --------------------------------------------------------------------------


async def test_unary_success_events_request_and_binding(start: Any, recorder: Recorder) -> None:
    transport = FakeTransport(result=RemoteCallResult(
        result={"answer": 42}, context_id="ctx-1", task_id="task-1"))
    store = RecordingStore()
    flow = start(create(remote(transport).to(), middlewares=[recorder], state_store=store))
    m = msg({"q": "penguins"}, meta={"user": "u1"})
    await flow.emit(m)
    assert await within(flow.fetch()) == {"answer": 42}
    await recorder.wait_for("node_success", trace_id=m.trace_id)

    assert len(transport.requests) == 1
    req = transport.requests[0]
    assert isinstance(req, RemoteCallRequest)
    assert req.message is m
    assert req.metadata is m.meta
    assert (req.skill, req.agent_url, req.agent_card, req.timeout_s) == ("search", URL, None, None)

    assert remote_kinds(recorder, m.trace_id) == ["remote_call_start", "remote_call_success"]
    kinds = recorder.kinds(trace_id=m.trace_id, node="remote")
    assert kinds.index("remote_call_success") < kinds.index("node_success")
    (start_ev,) = recorder.of("remote_call_start")
    assert start_ev.node_name == "remote"
    assert start_ev.latency_ms == 0.0
    assert set(start_ev.extra) == {"remote_skill", "remote_transport", "remote_streaming",
                                   "remote_request_bytes", "remote_agent_url"}
    assert start_ev.extra["remote_skill"] == "search"
    assert start_ev.extra["remote_transport"] == "FakeTransport"
    assert start_ev.extra["remote_streaming"] is False
    assert start_ev.extra["remote_request_bytes"] > 0
    assert start_ev.extra["remote_agent_url"] == URL

    (success,) = recorder.of("remote_call_success")
    assert success.latency_ms is not None and success.latency_ms >= 0
    assert success.extra["remote_status"] == "success"
    assert success.extra["remote_response_bytes"] > 0
    assert success.extra["remote_stream_events"] == 0
    assert success.extra["remote_context_id"] == "ctx-1"
    assert success.extra["remote_task_id"] == "task-1"
    assert success.extra["remote_agent_url"] == URL

    assert store.bindings == [RemoteBinding(trace_id=m.trace_id, context_id="ctx-1",
                                            task_id="task-1", agent_url=URL)]
    assert [e.kind for e in store.events if e.kind in REMOTE_KINDS] == [
        "remote_call_start", "remote_call_success"]

    # The call is over: a later cancel of the trace does not reach the transport.
    assert await flow.cancel(m.trace_id) is False
    assert transport.cancels == []
    assert recorder.of("remote_call_cancelled") == []


async def test_unary_none_valued_keys_are_omitted(start: Any, recorder: Recorder) -> None:
    transport = FakeTransport(result=RemoteCallResult(result="plain"))
    store = RecordingStore()
    flow = start(create(remote(transport).to(), middlewares=[recorder], state_store=store))
    m = msg("x")
    await flow.emit(m)
    assert await within(flow.fetch()) == "plain"
    (success,) = await recorder.wait_for("remote_call_success", trace_id=m.trace_id)
    assert "remote_context_id" not in success.extra
    assert "remote_task_id" not in success.extra
    assert None not in success.extra.values()
    assert None not in recorder.of("remote_call_start")[0].extra.values()
    assert store.bindings == []  # ids unknown: no binding


async def test_binding_needs_both_ids_and_prefers_reported_agent_url(
    start: Any, recorder: Recorder
) -> None:
    half = FakeTransport(result=RemoteCallResult(result=1, context_id="c-only"))
    store = RecordingStore()
    flow = start(create(remote(half).to(), middlewares=[recorder], state_store=store))
    await flow.emit(msg("x"))
    assert await within(flow.fetch()) == 1
    assert store.bindings == []

    full = FakeTransport(result=RemoteCallResult(result=2, context_id="c", task_id="t",
                                                 agent_url="http://elsewhere"))
    store2 = RecordingStore()
    flow2 = start(create(remote(full, name="remote2").to(), state_store=store2))
    m = msg("y")
    await flow2.emit(m)
    assert await within(flow2.fetch()) == 2
    assert store2.bindings == [RemoteBinding(trace_id=m.trace_id, context_id="c",
                                             task_id="t", agent_url="http://elsewhere")]


async def test_request_carries_agent_card_and_policy_timeout(start: Any) -> None:
    transport = FakeTransport()
    card = {"name": "agent"}
    node = remote(transport, agent_card=card,
                  policy=NodePolicy(validate="none", timeout_s=2.5))
    flow = start(create(node.to()))
    m = msg("x")
    await flow.emit(m)
    assert await within(flow.fetch()) == "ok"
    (req,) = transport.requests
    assert req.agent_card == card
    assert req.timeout_s == 2.5
    assert req.message.payload == "x" and req.message.headers == m.headers


async def test_record_binding_false_saves_no_binding(start: Any, recorder: Recorder) -> None:
    transport = FakeTransport(result=RemoteCallResult(result="r", context_id="c", task_id="t"))
    store = RecordingStore()
    flow = start(create(remote(transport, record_binding=False).to(),
                        middlewares=[recorder], state_store=store))
    m = msg("x")
    await flow.emit(m)
    assert await within(flow.fetch()) == "r"
    await recorder.wait_for("remote_call_success", trace_id=m.trace_id)
    assert store.bindings == []


# -- streaming ----------------------------------------------------------------------


async def test_streaming_chunks_events_and_result(start: Any, recorder: Recorder) -> None:
    meta0 = {"b": 1, "a": 2}
    events = [
        RemoteStreamEvent(text="Hel", meta=meta0),
        RemoteStreamEvent(context_id="c-1", task_id="t-1", result="partial"),
        RemoteStreamEvent(text="lo", context_id="c-1", task_id="t-1"),
        RemoteStreamEvent(result="final"),
        RemoteStreamEvent(text="", done=True),
    ]
    transport = FakeTransport(events=events)
    store = RecordingStore()
    flow = start(create(remote(transport, streaming=True).to(),
                        middlewares=[recorder], state_store=store))
    m = msg("stream please", meta={"m": 1})
    await flow.emit(m)

    items = [await within(flow.fetch()) for _ in range(4)]
    chunks = [item.payload for item in items[:3]]
    assert all(isinstance(c, StreamChunk) for c in chunks)
    assert [(c.seq, c.text, c.done) for c in chunks] == [(0, "Hel", False), (1, "lo", False),
                                                         (2, "", True)]
    assert all(c.stream_id == m.trace_id for c in chunks)
    assert chunks[0].meta == meta0 and chunks[0].meta is not meta0
    assert chunks[1].meta == {} and chunks[2].meta == {}
    for item in items[:3]:
        assert item.trace_id == m.trace_id
        assert item.headers == m.headers
        assert item.meta == {"m": 1}
    assert items[3] == "final"  # the last non-None result

    await recorder.wait_for("remote_call_success", trace_id=m.trace_id)
    assert transport.requests[0].message is m
    assert transport.requests[0].metadata is m.meta
    assert remote_kinds(recorder, m.trace_id) == (
        ["remote_call_start"] + ["remote_stream_event"] * 5 + ["remote_call_success"])
    assert recorder.of("remote_call_start")[0].extra["remote_streaming"] is True

    stream_events = recorder.of("remote_stream_event", trace_id=m.trace_id)
    extras = [e.extra for e in stream_events]
    assert [x["remote_stream_seq"] for x in extras] == [0, 1, 2, 3, 4]
    assert [x["remote_chunk_done"] for x in extras] == [False, False, False, False, True]
    assert extras[0]["remote_chunk_meta_keys"] == ["a", "b"]
    assert all("remote_chunk_meta_keys" not in x for x in extras[1:])
    assert extras[0]["remote_chunk_bytes"] > 0 and extras[2]["remote_chunk_bytes"] > 0
    assert all("remote_chunk_bytes" not in extras[i] for i in (1, 3, 4))
    assert "remote_context_id" not in extras[0] and "remote_task_id" not in extras[0]
    for x in extras[1:]:
        assert (x["remote_context_id"], x["remote_task_id"]) == ("c-1", "t-1")
    for x in extras:
        assert None not in x.values()

    (success,) = recorder.of("remote_call_success", trace_id=m.trace_id)
    assert success.extra["remote_stream_events"] == 5
    assert success.extra["remote_response_bytes"] > 0
    assert (success.extra["remote_context_id"], success.extra["remote_task_id"]) == ("c-1", "t-1")
    assert success.latency_ms is not None

    # The ids were reported twice, but the binding is saved once.
    assert store.bindings == [RemoteBinding(trace_id=m.trace_id, context_id="c-1",
                                            task_id="t-1", agent_url=URL)]


async def test_streaming_error_after_a_chunk(start: Any, recorder: Recorder) -> None:
    boom = ConnectionError("stream broke")
    transport = FakeTransport(events=[RemoteStreamEvent(text="a")], stream_error=boom)
    flow = start(create(remote(transport, streaming=True).to(), middlewares=[recorder],
                        emit_errors_to_rookery=True))
    m = msg("x")
    await flow.emit(m)
    first = await within(flow.fetch())
    assert first.payload.text == "a" and first.payload.seq == 0
    err = await within(flow.fetch())
    assert isinstance(err, FlowError)
    assert err.unwrap() is boom
    assert remote_kinds(recorder, m.trace_id) == [
        "remote_call_start", "remote_stream_event", "remote_call_error"]


# -- errors -------------------------------------------------------------------------


async def test_transport_error_then_retry_succeeds(start: Any, recorder: Recorder) -> None:
    boom = ConnectionError("down")
    transport = FakeTransport(failures=[boom], result=RemoteCallResult(result="second"))
    flow = start(create(remote(transport, policy=fast_retry(1)).to(), middlewares=[recorder]))
    m = msg("x")
    await flow.emit(m)
    assert await within(flow.fetch()) == "second"
    await recorder.wait_for("node_success", trace_id=m.trace_id)
    assert len(transport.requests) == 2
    assert remote_kinds(recorder, m.trace_id) == [
        "remote_call_start", "remote_call_error", "remote_call_start", "remote_call_success"]
    (error,) = recorder.of("remote_call_error", trace_id=m.trace_id)
    assert error.extra["remote_status"] == "error"
    assert error.extra["remote_error"] == repr(boom)
    assert error.extra["remote_agent_url"] == URL
    assert None not in error.extra.values()
    kinds = recorder.kinds(trace_id=m.trace_id, node="remote")
    assert kinds.index("remote_call_error") < kinds.index("node_error") < kinds.index(
        "node_retry")


async def test_transport_error_fails_node_with_flow_error(start: Any, recorder: Recorder) -> None:
    boom = ConnectionError("unreachable")
    transport = FakeTransport(failures=[boom])
    flow = start(create(remote(transport).to(), middlewares=[recorder],
                        emit_errors_to_rookery=True))
    m = msg("x")
    await flow.emit(m)
    err = await within(flow.fetch())
    assert isinstance(err, FlowError)
    assert err.code == FlowErrorCode.NODE_EXCEPTION.value
    assert err.trace_id == m.trace_id and err.node_name == "remote"
    assert err.unwrap() is boom
    assert remote_kinds(recorder, m.trace_id) == ["remote_call_start", "remote_call_error"]
    assert len(recorder.of("node_failed", trace_id=m.trace_id)) == 1


class Envelope(BaseModel):
    trace_id: str
    payload: str


async def test_non_message_input_is_a_type_error(start: Any, recorder: Recorder) -> None:
    transport = FakeTransport()
    flow = start(create(remote(transport).to(), middlewares=[recorder],
                        emit_errors_to_rookery=True))
    await flow.emit("not a message")
    (failed,) = await recorder.wait_for("node_failed", node="remote")
    assert failed.extra["flow_error"]["exception_type"] == "TypeError"

    await flow.emit(Envelope(trace_id="env-1", payload="x"))
    err = await within(flow.fetch())
    assert isinstance(err, FlowError)
    assert isinstance(err.unwrap(), TypeError)
    assert err.trace_id == "env-1"
    assert transport.requests == []
    assert recorder.of("remote_call_start") == []


async def test_detached_context_is_refused() -> None:
    transport = FakeTransport()
    node = remote(transport)
    with pytest.raises(Exception):  # noqa: B017 - the spec does not name the type
        await within(node.invoke(msg("x"), Context(node), registry=None))
    assert transport.requests == []


# -- cancellation -------------------------------------------------------------------


async def _start_blocked_stream(start: Any, recorder: Recorder, transport: FakeTransport,
                                **kwargs: Any) -> tuple[Any, Any, RecordingStore]:
    store = RecordingStore()
    flow = start(create(remote(transport, streaming=True, **kwargs).to(),
                        middlewares=[recorder], state_store=store))
    m = msg("x")
    await flow.emit(m)
    await within(transport.in_flight.wait())
    return flow, m, store


async def test_trace_cancel_in_flight_cancels_remote_task(start: Any, recorder: Recorder) -> None:
    transport = FakeTransport(block=True, events=[
        RemoteStreamEvent(text="a", context_id="c-9", task_id="t-9")])
    flow, m, store = await _start_blocked_stream(start, recorder, transport,
                                                 policy=fast_retry(2))
    assert await within(flow.cancel(m.trace_id)) is True
    await within(transport.cancel_called.wait())
    (cancelled,) = await recorder.wait_for("remote_call_cancelled", trace_id=m.trace_id)
    await recorder.wait_for("node_trace_cancelled", trace_id=m.trace_id)
    await within(transport.stream_cancelled.wait())
    await within(flow.stop())

    assert transport.cancels == [(URL, "t-9")]
    assert cancelled.node_name == "remote"
    assert cancelled.latency_ms is not None and cancelled.latency_ms >= 0
    assert cancelled.extra["remote_cancel_reason"] == "trace_cancel"
    assert cancelled.extra["remote_status"] == "cancelled"
    assert cancelled.extra["remote_context_id"] == "c-9"
    assert cancelled.extra["remote_task_id"] == "t-9"
    assert cancelled.extra["remote_agent_url"] == URL
    assert len(recorder.of("remote_call_cancelled")) == 1
    assert recorder.of("remote_call_success") == []
    assert recorder.of("remote_call_error") == []
    assert recorder.of("remote_cancel_error") == []
    assert len(transport.requests) == 1  # not retried
    assert len(store.bindings) == 1


async def test_record_binding_false_still_propagates_cancel(
    start: Any, recorder: Recorder
) -> None:
    transport = FakeTransport(block=True, events=[
        RemoteStreamEvent(context_id="c", task_id="t", agent_url="http://reported")])
    flow, m, store = await _start_blocked_stream(start, recorder, transport,
                                                 record_binding=False)
    assert await within(flow.cancel(m.trace_id)) is True
    await recorder.wait_for("remote_call_cancelled", trace_id=m.trace_id)
    assert transport.cancels == [("http://reported", "t")]
    assert store.bindings == []


async def test_cancel_raising_emits_remote_cancel_error(start: Any, recorder: Recorder) -> None:
    transport = FakeTransport(block=True, cancel_error=RuntimeError("cannot cancel"),
                              events=[RemoteStreamEvent(context_id="c", task_id="t")])
    flow, m, _ = await _start_blocked_stream(start, recorder, transport)
    assert await within(flow.cancel(m.trace_id)) is True
    (err,) = await recorder.wait_for("remote_cancel_error", trace_id=m.trace_id)
    await recorder.wait_for("trace_cancel_finish", trace_id=m.trace_id)
    await within(flow.stop())
    assert err.node_name == "remote"
    assert transport.cancels == [(URL, "t")]
    assert recorder.of("remote_call_cancelled") == []
    assert recorder.of("remote_call_success") == []
    assert len(recorder.of("remote_cancel_error")) == 1


async def test_pre_cancelled_trace_when_binding_discovered(
    start: Any, recorder: Recorder
) -> None:
    holder: list[Any] = []

    def cancel_before_reply(request: RemoteCallRequest) -> None:
        holder[0].ensure_trace_event(request.message.trace_id).set()

    transport = FakeTransport(on_send=cancel_before_reply,
                              result=RemoteCallResult(result="late", context_id="c",
                                                      task_id="t"))
    store = RecordingStore()
    flow = start(create(remote(transport, policy=fast_retry(1)).to(), middlewares=[recorder],
                        state_store=store))
    holder.append(flow)
    m = msg("x")
    await flow.emit(m)
    (cancelled,) = await recorder.wait_for("remote_call_cancelled", trace_id=m.trace_id)
    await recorder.wait_for("trace_cancel_finish", trace_id=m.trace_id)
    assert cancelled.extra["remote_cancel_reason"] == "pre_cancelled"
    assert cancelled.extra["remote_task_id"] == "t"
    assert transport.cancels == [(URL, "t")]
    assert recorder.of("remote_call_success") == []
    assert recorder.of("remote_call_error") == []
    assert len(transport.requests) == 1  # trace cancellation is never retried
    assert store.bindings == [RemoteBinding(trace_id=m.trace_id, context_id="c",
                                            task_id="t", agent_url=URL)]
    with pytest.raises(asyncio.QueueEmpty):
        flow.fetch_nowait()  # the late result never reaches Rookery


@pytest.mark.parametrize("retries", [0, 1])
async def test_pre_cancelled_is_trace_cancellation_not_failure(
    start: Any, recorder: Recorder, retries: int
) -> None:
    holder: list[Any] = []

    def cancel_before_reply(request: RemoteCallRequest) -> None:
        holder[0].ensure_trace_event(request.message.trace_id).set()

    transport = FakeTransport(on_send=cancel_before_reply,
                              result=RemoteCallResult(result="late", context_id="c",
                                                      task_id="t"))
    flow = start(create(remote(transport, policy=fast_retry(retries)).to(),
                        middlewares=[recorder], emit_errors_to_rookery=True))
    holder.append(flow)
    m = msg("x")
    await flow.emit(m)
    await settled(recorder, m.trace_id, ("node_failed", "node_trace_cancelled"))
    kinds = recorder.kinds(trace_id=m.trace_id, node="remote")
    assert "node_retry" not in kinds
    assert "node_failed" not in kinds
    assert "node_trace_cancelled" in kinds
    with pytest.raises(asyncio.QueueEmpty):
        flow.fetch_nowait()  # no FlowError for a cancelled trace


async def test_stop_cleans_up_in_flight_remote_call(start: Any, recorder: Recorder) -> None:
    transport = FakeTransport(block=True, events=[RemoteStreamEvent(context_id="c",
                                                                    task_id="t")])
    flow, _m, _ = await _start_blocked_stream(start, recorder, transport)
    await within(flow.stop())
    assert transport.stream_cancelled.is_set()
    # stop() is not a trace cancel: no "trace_cancel" remote cancellation, no success.
    assert all(e.extra.get("remote_cancel_reason") != "trace_cancel"
               for e in recorder.of("remote_call_cancelled"))
    assert recorder.of("remote_call_success") == []
    assert [t for t in asyncio.all_tasks() if t.get_name() == "penguiflow:remote"] == []


class HangingCancel(FakeTransport):
    """A 2.1 transport whose cancel never returns (an unreachable agent, no timeout)."""

    async def cancel(self, *, agent_url: str, task_id: str) -> None:
        self.cancels.append((agent_url, task_id))
        self.cancel_called.set()
        await asyncio.Event().wait()


@pytest.mark.parametrize("stop_kwargs", [{}, {"store_timeout_s": None}])
async def test_stop_waits_for_a_remote_cancel_that_never_returns_only_its_own_bound(
        start: Any, recorder: Recorder, monkeypatch: pytest.MonkeyPatch,
        stop_kwargs: dict[str, Any]) -> None:
    # Before: stop() waited for the node's local_cancel up to its store_timeout_s
    # (5 s, then background_stop_timeout), and stop(store_timeout_s=None) for ever.
    monkeypatch.setattr(remote_module, "REMOTE_CANCEL_TIMEOUT_S", 0.2, raising=False)
    transport = HangingCancel(block=True, events=[RemoteStreamEvent(context_id="c",
                                                                    task_id="t")])
    flow, _m, _ = await _start_blocked_stream(start, recorder, transport)
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with asyncio.timeout(4):
        await flow.stop(**stop_kwargs)
    assert loop.time() - started < 2.0
    assert transport.cancels == [(URL, "t")]  # the cancel was tried
    (error,) = recorder.of("remote_cancel_error")
    assert error.extra["remote_cancel_reason"] == "local_cancel"
    assert ("HangingCancel.cancel() was not confirmed within REMOTE_CANCEL_TIMEOUT_S=0.2 s"
            in error.extra["remote_error"])


class SlowToConfirm(FakeTransport):
    """A transport whose cancel confirms CANCELED after a while, within its own
    declared bound (as A2AClientTransport's cancel_timeout_s)."""

    cancel_timeout_s = 1.0

    async def cancel(self, *, agent_url: str, task_id: str) -> None:
        self.cancels.append((agent_url, task_id))
        await asyncio.sleep(0.3)  # the agent's time to confirm, not a synchronization


async def test_a_cancel_within_the_transports_own_bound_is_not_cut_short(
        start: Any, recorder: Recorder) -> None:
    # A cancel the agent confirms within the transport's own bound (+ the margin),
    # itself below REMOTE_CANCEL_TIMEOUT_S, is waited for and recorded as cancelled.
    transport = SlowToConfirm(block=True, events=[RemoteStreamEvent(context_id="c",
                                                                    task_id="t")])
    flow, m, _ = await _start_blocked_stream(start, recorder, transport)
    await within(flow.cancel(m.trace_id))
    (cancelled,) = await recorder.wait_for("remote_call_cancelled", trace_id=m.trace_id)
    await within(flow.stop())
    assert recorder.of("remote_cancel_error") == []
    assert cancelled.extra["remote_cancel_reason"] == "trace_cancel"
    assert "remote_cancel_by_transport" not in cancelled.extra
    assert transport.cancels == [(URL, "t")]


class OddBound(SlowToConfirm):
    """A declared bound past the cap, or one that cannot be read."""

    def __init__(self, bound: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._bound = bound

    @property  # type: ignore[override]
    def cancel_timeout_s(self) -> Any:
        if isinstance(self._bound, Exception):
            raise self._bound
        return self._bound


@pytest.mark.parametrize("bound", [60.0, 10 ** 400, RuntimeError("config not loaded")])
async def test_a_stop_holds_a_cancel_at_the_cap_whatever_the_transport_declares(
        start: Any, recorder: Recorder, monkeypatch: pytest.MonkeyPatch, bound: Any) -> None:
    # stop() waits for the cancel of the call it cuts short: a transport declaring a
    # longer bound (or one whose bound cannot be read, which kept the cancel from
    # being sent at all) is held at REMOTE_CANCEL_TIMEOUT_S, its outcome recorded.
    monkeypatch.setattr(remote_module, "REMOTE_CANCEL_TIMEOUT_S", 0.1, raising=False)
    transport = OddBound(bound, block=True, events=[RemoteStreamEvent(context_id="c",
                                                                      task_id="t")])
    flow, _m, _ = await _start_blocked_stream(start, recorder, transport)
    await within(flow.stop())
    (error,) = recorder.of("remote_cancel_error")
    assert error.extra["remote_cancel_reason"] == "local_cancel"
    assert transport.cancels == [(URL, "t")]
    assert "not confirmed within REMOTE_CANCEL_TIMEOUT_S=0.1 s" in error.extra["remote_error"]


async def test_a_trace_cancel_waits_for_the_transports_own_bound_past_the_cap(
        start: Any, recorder: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    # Nothing waits on a trace cancel but the trace's end: the transport's own bound
    # decides it (A2AClientTransport waits up to 10 s for CANCELED), not the cap
    # that keeps stop() short; an unreadable bound falls back to the cap.
    monkeypatch.setattr(remote_module, "REMOTE_CANCEL_TIMEOUT_S", 0.1, raising=False)
    transport = OddBound(60.0, block=True, events=[RemoteStreamEvent(context_id="c",
                                                                     task_id="t")])
    flow, m, _ = await _start_blocked_stream(start, recorder, transport)
    await within(flow.cancel(m.trace_id))
    (cancelled,) = await recorder.wait_for("remote_call_cancelled", trace_id=m.trace_id)
    assert cancelled.extra["remote_cancel_reason"] == "trace_cancel"
    assert recorder.of("remote_cancel_error") == []


class CancelsItself(FakeTransport):
    """A transport that cancelled the task itself (as A2AClientTransport does when a
    call gives up at its timeout), and says so through ``already_cancelled``."""

    def already_cancelled(self, *, agent_url: str, task_id: str) -> bool:
        return (agent_url, task_id) == (URL, "t")


async def test_a_task_the_transport_cancelled_itself_is_not_cancelled_again(
        start: Any, recorder: Recorder) -> None:
    transport = CancelsItself(block=True, events=[RemoteStreamEvent(context_id="c",
                                                                    task_id="t")])
    flow, _m, _ = await _start_blocked_stream(start, recorder, transport)
    await within(flow.stop())
    assert transport.stream_cancelled.is_set()
    assert transport.cancels == []
    assert recorder.of("remote_cancel_error") == []
    # The call's end is still recorded, saying who cancelled it.
    (cancelled,) = recorder.of("remote_call_cancelled")
    assert cancelled.extra["remote_cancel_reason"] == "local_cancel"
    assert cancelled.extra["remote_cancel_by_transport"] is True


@pytest.mark.parametrize("stop", [False, True])
async def test_a_trace_cancel_of_a_task_the_transport_cancelled_records_the_calls_end(
        start: Any, recorder: Recorder, stop: bool) -> None:
    # Before: the watcher saw already_cancelled and returned without an event: no
    # remote_call_cancelled, and the CLIENT span ended error.type=unfinished.
    transport = CancelsItself(block=True, events=[RemoteStreamEvent(context_id="c",
                                                                    task_id="t")])
    flow, m, store = await _start_blocked_stream(start, recorder, transport)
    await within(flow.cancel(m.trace_id))
    if stop:
        await within(flow.stop())
    (cancelled,) = await recorder.wait_for("remote_call_cancelled", trace_id=m.trace_id)
    assert cancelled.extra["remote_cancel_reason"] == "trace_cancel"
    assert cancelled.extra["remote_status"] == "cancelled"
    assert cancelled.extra["remote_cancel_by_transport"] is True
    assert cancelled.extra["remote_task_id"] == "t"
    assert transport.cancels == []
    await within(flow.stop())
    assert [e.kind for e in store.events].count("remote_call_cancelled") == 1


class GaveUpAndFailed(CancelsItself):
    """The transport's own give-up cancel failed (``wait_cancelled`` says False)."""

    async def wait_cancelled(self, *, agent_url: str, task_id: str) -> bool:
        return False


class GaveUpAndHangs(CancelsItself):
    """The transport's own cancel never answers (``wait_cancelled`` never returns)."""

    cancel_timeout_s = 0.1

    async def wait_cancelled(self, *, agent_url: str, task_id: str) -> bool:
        await asyncio.Event().wait()
        return True


async def test_a_transport_cancel_never_confirmed_is_an_error_not_a_cancel(
        start: Any, recorder: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(remote_module, "REMOTE_CANCEL_MARGIN_S", 0.05, raising=False)
    transport = GaveUpAndHangs(block=True, events=[RemoteStreamEvent(context_id="c",
                                                                     task_id="t")])
    flow, m, _ = await _start_blocked_stream(start, recorder, transport)
    await within(flow.cancel(m.trace_id))
    (error,) = await recorder.wait_for("remote_cancel_error", trace_id=m.trace_id)
    await within(flow.stop())
    assert error.extra["remote_cancel_by_transport"] is True
    assert "not confirmed within 0.15 s" in error.extra["remote_error"]
    assert recorder.of("remote_call_cancelled") == []
    assert transport.cancels == []


async def test_a_failed_transport_cancel_leaves_the_cancel_to_the_node(
        start: Any, recorder: Recorder) -> None:
    transport = GaveUpAndFailed(block=True, events=[RemoteStreamEvent(context_id="c",
                                                                      task_id="t")])
    flow, m, _ = await _start_blocked_stream(start, recorder, transport)
    await within(flow.cancel(m.trace_id))
    (cancelled,) = await recorder.wait_for("remote_call_cancelled", trace_id=m.trace_id)
    await within(flow.stop())
    assert transport.cancels == [(URL, "t")]
    assert "remote_cancel_by_transport" not in cancelled.extra


# -- byte counting never fails the call ------------------------------------------------


async def test_hostile_texts_and_payloads_are_measured_not_fatal(start: Any,
                                                                 recorder: Recorder) -> None:
    # A lone surrogate arrives in a chunk's text (valid JSON "\udcff" decodes to one),
    # and a payload pydantic cannot write goes to a transport that handles it itself:
    # measuring their bytes made the call fail (UnicodeEncodeError after the chunk had
    # reached the caller; PydanticSerializationError before the transport was called).
    class Opaque:
        def __repr__(self) -> str:
            raise RuntimeError("no repr either")

    lone = json.loads('"hello \\udcff"')
    transport = FakeTransport(events=[RemoteStreamEvent(text=lone),
                                      RemoteStreamEvent(done=True, result="ok")])
    flow = start(create(remote(transport, streaming=True, policy=fast_retry(0)).to(),
                        middlewares=[recorder]))
    streamed = msg("x")
    opaque = msg(Opaque())
    for m in (streamed, opaque):
        await flow.emit(m)
        await settled(recorder, m.trace_id, ["remote_call_success", "remote_call_error"])
    for m in (streamed, opaque):
        assert remote_kinds(recorder, m.trace_id) == [
            "remote_call_start", "remote_stream_event", "remote_stream_event",
            "remote_call_success"]
    chunk = recorder.of("remote_stream_event", trace_id=streamed.trace_id)[0]
    assert chunk.extra["remote_chunk_bytes"] == len("hello ") + 3
    assert transport.requests[-1].message is opaque
    (start_event,) = recorder.of("remote_call_start", trace_id=opaque.trace_id)
    assert start_event.extra["remote_request_bytes"] >= 0
