"""``penguiflow_inspector.model``: what the inspector derives from stored events alone.

Every trace here is built by hand with fixed timestamps (T0 + offsets), so each
assertion states an exact relation: bars, attempts, queue waits, remote state
splits, cancel round trips, the critical path, and replay at several times.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from rich.console import Console

from penguiflow._ids import otel_trace_id, root_span_id
from penguiflow._spans import derived_span_id
from penguiflow.state import StoredEvent
from penguiflow_inspector.model import TraceView, build_trace, critical_path, remote_stats
from penguiflow_inspector.render import trace_text
from penguiflow_inspector.widgets.cancel_table import render_cancels

T0 = 1_700_000_000.0
TRACE = "0af7651916cd43dd8448eb211c80319c"


def near(ms: float) -> Any:
    """Equal to ``ms`` within 1 µs (epoch-second floats carry ~0.2 µs of rounding)."""
    return pytest.approx(ms, abs=1e-3)


class Recorder:
    """Builds one trace's StoredEvents in order, with seq numbers."""

    def __init__(self) -> None:
        self.events: list[StoredEvent] = []

    def __call__(self, dt: float, kind: str, node: str | None = None, inv: str | None = None,
                 *, parents: tuple[str, ...] = (), attempt: int = 0,
                 queued: float | None = None, latency_ms: float | None = None,
                 flow: str = "f1", **extra: Any) -> StoredEvent:
        payload: dict[str, Any] = {"ts": T0 + dt, "event": kind, "node_name": node,
                                   "node_id": node, "trace_id": TRACE,
                                   "latency_ms": latency_ms, "attempt": attempt, **extra}
        ev = StoredEvent(TRACE, T0 + dt, kind, node, node, payload, invocation_id=inv,
                         parent_invocation_ids=parents, span_id=inv, attempt=attempt,
                         queued_ts=None if queued is None else T0 + queued,
                         seq=len(self.events), flow_name="demo" if flow == "f1" else f"demo-{flow}",
                         flow_id=flow)
        self.events.append(ev)
        return ev


A, B, C, J, R = ("a" * 16, "b" * 16, "c" * 16, "d" * 16, "e" * 16)


def fan_out_join() -> Recorder:
    """a -> (b fast, c slow) -> join j; b retried once, c's first attempt timed out."""
    r = Recorder()
    r(0.000, "node_start", "a", A, queued=0.0)
    r(0.010, "node_success", "a", A, latency_ms=10.0)
    r(0.011, "node_start", "b", B, parents=(A,), queued=0.010)
    r(0.012, "node_start", "c", C, parents=(A,), queued=0.010)
    r(0.020, "node_error", "b", B, exception="ConnectionError('transient')")
    r(0.020, "node_retry", "b", B, attempt=1, sleep_s=0.005,
      exception="ConnectionError('transient')")
    r(0.025, "node_start", "b", B, parents=(A,), attempt=1, queued=0.010)
    r(0.030, "node_success", "b", B, attempt=1)
    r(0.112, "node_timeout", "c", C, exception="TimeoutError()")
    r(0.112, "node_retry", "c", C, attempt=1, sleep_s=0.0, exception="TimeoutError()")
    r(0.112, "node_start", "c", C, parents=(A,), attempt=1, queued=0.010)
    r(0.150, "node_success", "c", C, attempt=1)
    r(0.031, "future_kind_we_do_not_know", "b", None, anything=1)  # tolerated
    r(0.151, "node_start", "j", J, parents=(C,), queued=0.150)
    r(0.160, "node_success", "j", J, parents=(B, C))  # a join names every input at the end
    return r


def test_invocations_attempts_retries_timeouts_and_queue_wait() -> None:
    view = build_trace(fan_out_join().events)
    assert [i.node_name for i in view.invocations] == ["a", "b", "c", "j"]
    a, b, c, j = view.invocations
    assert (a.start, a.end, a.status) == (T0, T0 + 0.010, "ok")
    assert b.duration_ms == near(19.0)
    assert b.queue_wait_ms == near(1.0)
    assert [(x.attempt, x.outcome, x.error, x.backoff_ms) for x in b.attempts] == [
        (0, "error", "ConnectionError('transient')", near(5.0)),
        (1, "ok", None, None)]
    assert [(x.outcome, x.end) for x in c.attempts] == [("timeout", T0 + 0.112),
                                                         ("ok", T0 + 0.150)]
    assert c.status == "ok" and c.error is None
    assert j.parents == (B, C)
    assert view.status == "ok"
    assert view.start == T0 and view.end == T0 + 0.160
    assert view.duration_ms == near(160.0)
    assert view.flow_name == "demo"
    assert view.otel_trace_id == otel_trace_id(TRACE) == TRACE
    assert view.root_span_id == root_span_id(TRACE)
    # The unknown kind is in the log, with its extra items, and broke nothing.
    unknown = [e for e in view.events if e.kind == "future_kind_we_do_not_know"]
    assert unknown[0].extra == {"anything": 1}
    assert len(view.events) == len(fan_out_join().events)


def test_critical_path_follows_the_slow_branch_through_the_join() -> None:
    view = build_trace(fan_out_join().events)
    assert view.critical_path == [A, C, J]  # c (slow, timed out once) is what j waited for
    assert critical_path([], T0) == []


def test_failed_invocation_after_retries_is_an_error_and_a_timeout_when_it_timed_out() -> None:
    r = Recorder()
    r(0.0, "node_start", "x", A)
    r(0.1, "node_timeout", "x", A, exception="TimeoutError()")
    r(0.1, "node_failed", "x", A, exception="TimeoutError()",
      flow_error={"message": "node x timed out", "code": "NODE_TIMEOUT"})
    r(0.2, "node_start", "y", B)
    r(0.3, "node_error", "y", B, exception="ValueError('bad')")
    r(0.3, "node_failed", "y", B, exception="ValueError('bad')")
    view = build_trace(r.events)
    x, y = view.invocations
    assert (x.status, x.error) == ("timeout", "node x timed out")
    assert (y.status, y.error) == ("error", "ValueError('bad')")
    assert view.status == "error"
    only_timeout = build_trace(r.events[:3])
    assert only_timeout.status == "timeout"


def remote_trace() -> Recorder:
    """A streaming call (submitted -> working -> completed) and one cancelled mid-stream."""
    r = Recorder()
    url, slow = "inmemory://writer", "inmemory://researcher"
    r(0.000, "node_start", "writer", A)
    r(0.001, "remote_call_start", "writer", A, remote_skill="write", remote_streaming=True,
      remote_request_bytes=40, remote_agent_url=url)
    r(0.002, "remote_stream_event", "writer", A, remote_text_bytes=0, remote_chunk_bytes=24,
      remote_task_state="submitted", remote_context_id="ctx-1", remote_task_id="task-1")
    r(0.021, "remote_stream_event", "writer", A, remote_text_bytes=0, remote_chunk_bytes=22,
      remote_task_state="working", remote_context_id="ctx-1", remote_task_id="task-1")
    r(0.031, "remote_stream_event", "writer", A, remote_text_bytes=8, remote_chunk_bytes=8,
      remote_context_id="ctx-1", remote_task_id="task-1")
    r(0.041, "remote_stream_event", "writer", A, remote_text_bytes=9, remote_chunk_bytes=9,
      remote_context_id="ctx-1", remote_task_id="task-1")
    r(0.051, "remote_call_success", "writer", A, latency_ms=50.0, remote_status="success",
      remote_response_bytes=120, remote_stream_events=4, remote_task_state="completed",
      remote_context_id="ctx-1", remote_task_id="task-1")
    r(0.052, "node_success", "writer", A)
    r(0.053, "node_start", "researcher", B, parents=(A,))
    r(0.054, "remote_call_start", "researcher", B, remote_skill="research",
      remote_streaming=True, remote_request_bytes=10, remote_agent_url=slow)
    r(0.055, "remote_stream_event", "researcher", B, remote_text_bytes=0,
      remote_task_state="submitted", remote_context_id="ctx-1", remote_task_id="task-2")
    r(0.056, "remote_stream_event", "researcher", B, remote_text_bytes=0,
      remote_task_state="working", remote_context_id="ctx-1", remote_task_id="task-2")
    r(0.100, "remote_stream_event", "researcher", B, remote_text_bytes=11,
      remote_context_id="ctx-1", remote_task_id="task-2")
    r(0.101, "trace_cancel_start", "OpenSea", None, pending=1)
    r(0.102, "node_trace_cancelled", "researcher", B, latency_ms=49.0)
    r(0.103, "node_success", "side", C)  # finished after the request: kept running
    # The runtime records this one from its cancel watcher, without the invocation id.
    r(0.152, "remote_call_cancelled", "researcher", None, latency_ms=50.0,
      remote_cancel_reason="trace_cancel", remote_status="cancelled",
      remote_context_id="ctx-1", remote_task_id="task-2", remote_agent_url=slow)
    r(0.153, "trace_cancel_finish", "Rookery", None)
    return r


def test_remote_calls_ids_bytes_states_and_time_to_first_chunk() -> None:
    view = build_trace(remote_trace().events)
    writer, researcher = view.remote_calls
    assert writer.call_id == f"{derived_span_id(TRACE, A, 'remote', '0'):016x}"
    assert view.invocation(A) is not None and view.invocation(A).remote_calls == (writer.call_id,)
    assert view.remote_call(writer.call_id) is writer
    assert (writer.agent_url, writer.skill, writer.context_id, writer.task_id) == (
        "inmemory://writer", "write", "ctx-1", "task-1")
    assert (writer.outcome, writer.streaming, writer.bytes_sent, writer.bytes_received) == (
        "success", True, 40, 120)
    assert writer.latency_ms == near(50.0)
    assert writer.stream_events == 4
    assert writer.time_to_first_chunk_ms == near(30.0)
    assert [s for s, _ in writer.states] == ["submitted", "working", "completed"]
    split = writer.state_split_ms()
    assert [s for s, _ in split] == ["submitted", "working", "completed"]
    assert [ms for _, ms in split] == [near(19.0), near(30.0),
                                       near(0.0)]
    assert view.invocations[0].chunks == 2
    assert (researcher.outcome, researcher.task_id) == ("cancelled", "task-2")
    assert researcher.error == "cancelled (trace_cancel)"
    stats = {s.agent: s for s in remote_stats(view)}
    assert stats["inmemory://writer"].p50_ms == near(50.0)
    assert stats["inmemory://researcher"].calls == 1
    assert stats["inmemory://writer"].errors == 0


def test_cancel_requested_propagated_acknowledged_and_kept_running() -> None:
    view = build_trace(remote_trace().events)
    assert view.status == "cancelled"
    (cancel,) = view.cancels
    assert cancel.requested == T0 + 0.101
    assert cancel.acknowledged == T0 + 0.153
    assert cancel.latency_ms == near(52.0)
    assert cancel.propagated == [("task-2", T0 + 0.152, 50.0, "trace_cancel")]
    assert cancel.interrupted == [(B, T0 + 0.102)]
    assert cancel.kept_running == [C]
    researcher = view.invocation(B)
    assert researcher is not None and researcher.status == "cancelled"
    assert researcher.attempts[-1].outcome == "cancelled"


def test_each_flow_of_a_trace_has_its_own_cancel() -> None:
    # An orchestrator (f1) cancels; its CancelTask makes the agent serving it in the
    # same trace (f2, same store) cancel its part. Each cancel was credited with
    # the other's work: f1 with f2's interruption as "kept running", f2 with the
    # propagation f1 made, because every event went to the latest cancel.
    r = Recorder()
    r(0.000, "node_start", "ask", A)
    r(0.001, "remote_call_start", "ask", A, remote_skill="research", remote_streaming=True,
      remote_agent_url="http://agent")
    r(0.010, "node_start", "research", B, flow="f2")
    r(0.101, "trace_cancel_start", flow="f1")
    r(0.102, "node_trace_cancelled", "ask", A)
    r(0.103, "trace_cancel_finish", flow="f1")
    r(0.104, "trace_cancel_start", flow="f2")
    r(0.105, "node_trace_cancelled", "research", B, flow="f2")
    r(0.106, "trace_cancel_finish", flow="f2")
    r(0.107, "remote_call_cancelled", "ask", A, remote_cancel_reason="trace_cancel",
      remote_task_id="task-1", latency_ms=6.0)
    view = build_trace(r.events)
    first, second = view.cancels
    assert (first.flow_id, second.flow_id) == ("f1", "f2")
    assert first.propagated == [("task-1", T0 + 0.107, 6.0, "trace_cancel")]
    assert second.propagated == []
    assert first.interrupted == [(A, T0 + 0.102)] and second.interrupted == [(B, T0 + 0.105)]
    assert first.kept_running == [] and second.kept_running == []
    assert first.latency_ms == near(2.0) and second.latency_ms == near(2.0)
    text = trace_text(view)
    assert "cancel 1: requested at +101.0 ms in flow demo" in text
    assert "cancel 2: requested at +104.0 ms in flow demo-f2" in text
    # The Cancel tab names the flows too, as stored text (never read as markup).
    r.events[-4] = dataclasses.replace(r.events[-4], flow_name="[bold]agent[/]")
    tab = Console(width=100, record=True)
    tab.print(render_cancels(build_trace(r.events)))
    assert "cancel 2 in flow [bold]agent[/]" in tab.export_text()
    # Replayed between the two: only the first, already with its own interruption.
    (early,) = view.at(T0 + 0.1035).cancels
    assert early.interrupted == [(A, T0 + 0.102)] and early.kept_running == []


def test_remote_error_and_unary_call_and_percentiles() -> None:
    r = Recorder()
    for n, (inv, ms, ok) in enumerate([(A, 10, True), (B, 20, True), (C, 30, False),
                                       (J, 40, True)]):
        base = n * 1.0
        r(base, "node_start", "ask", inv)
        r(base, "remote_call_start", "ask", inv, remote_skill="ask", remote_streaming=False,
          remote_agent_url="http://a")
        if ok:
            r(base + ms / 1e3, "remote_call_success", "ask", inv, remote_task_state="completed",
              remote_task_id=f"t{n}", remote_response_bytes=5)
        else:
            r(base + ms / 1e3, "remote_call_error", "ask", inv,
              remote_error="RemoteAgentError('boom')")
        r(base + ms / 1e3, "node_success", "ask", inv)
    view = build_trace(r.events)
    (stats,) = remote_stats(view)
    assert (stats.calls, stats.errors) == (4, 1)
    assert stats.p50_ms == near(20.0)
    assert stats.p95_ms == near(40.0)
    failed = view.remote_calls[2]
    assert (failed.outcome, failed.error) == ("error", "RemoteAgentError('boom')")
    assert view.remote_calls[0].state_split_ms() == [("completed", 0.0)]


def test_a_call_cut_short_locally_ends_with_its_invocation() -> None:
    r = Recorder()
    r(0.0, "node_start", "ask", A)
    r(0.0, "remote_call_start", "ask", A, remote_streaming=False, remote_agent_url="http://a")
    r(0.1, "node_timeout", "ask", A, exception="TimeoutError()")
    r(0.1, "node_failed", "ask", A, exception="TimeoutError()")
    (call,) = build_trace(r.events).remote_calls
    assert (call.outcome, call.end) == ("cancelled", T0 + 0.1)


def test_deadline_skip() -> None:
    r = Recorder()
    r(0.5, "deadline_skip", "late", None, deadline_s=T0 + 0.25)
    view = build_trace(r.events)
    (skip,) = view.deadlines
    assert (skip.node_name, skip.ts, skip.deadline) == ("late", T0 + 0.5, T0 + 0.25)
    assert skip.remaining_ms == near(-250.0)
    assert view.status == "skipped"


def test_replay_at_several_times() -> None:
    view = build_trace(fan_out_join().events)
    before = view.at(T0 - 1)
    assert before.invocations == [] and before.events == [] and before.critical_path == []
    early = view.at(T0 + 0.015)  # a done; b and c in flight
    assert [(i.node_name, i.status, i.end) for i in early.invocations] == [
        ("a", "ok", T0 + 0.010), ("b", "running", None), ("c", "running", None)]
    assert early.status == "running"
    assert early.replay_t == T0 + 0.015 and early.end == T0 + 0.015
    assert all(e.ts <= T0 + 0.015 for e in early.events)
    b = early.invocations[1]
    assert [(x.attempt, x.outcome) for x in b.attempts] == [(0, "running")]
    assert early.critical_path == [A, B]  # b is running: it ends "now"
    mid = view.at(T0 + 0.120)  # b done after a retry; c on its second attempt
    b, c = mid.invocations[1:3]
    assert b.status == "ok" and len(b.attempts) == 2
    assert c.status == "running" and [x.outcome for x in c.attempts] == ["timeout", "running"]
    done = view.at(T0 + 10)
    assert done.critical_path == view.critical_path == [A, C, J]
    assert [i.status for i in done.invocations] == [i.status for i in view.invocations]
    # The full view is untouched by replays, and replays can go backwards.
    assert view.invocations[1].status == "ok"
    assert view.at(T0 + 0.015).invocations[1].status == "running"


def test_replay_of_remote_calls_and_cancels() -> None:
    view = build_trace(remote_trace().events)
    streaming = view.at(T0 + 0.035)
    (writer,) = streaming.remote_calls
    assert writer.outcome == "running" and writer.end is None
    assert [s for s, _ in writer.states] == ["submitted", "working"]
    assert writer.state_split_ms(now=T0 + 0.035) == [("submitted", near(19.0)),
                                                     ("working", near(14.0))]
    assert writer.state_split_ms() == [("submitted", near(19.0))]
    assert streaming.invocations[0].chunks == 1
    cancelling = view.at(T0 + 0.110)
    (cancel,) = cancelling.cancels
    assert cancel.acknowledged is None and cancel.propagated == []
    assert cancel.interrupted == [(B, T0 + 0.102)]
    assert cancel.kept_running == [C]
    assert cancelling.status == "cancelled"
    researcher = cancelling.remote_calls[1]
    assert researcher.outcome == "running"  # its cancel has not come back yet
    assert view.at(T0 + 0.2).remote_calls[1].outcome == "cancelled"


def test_build_trace_needs_events_and_at_needs_an_index() -> None:
    with pytest.raises(ValueError, match="at least one event"):
        build_trace([])
    bare = TraceView(TRACE, None, T0, T0, "ok", [], [], [], [], [], [])
    with pytest.raises(ValueError, match="build_trace"):
        bare.at(T0)
