"""Fixed-timestamp fixture traces for the TUI tests and snapshots (no clocks, fixed ids).

``demo_events()`` is one trace with everything the screens draw: a fan-out and
join, a retried error, a timeout then success, a streaming remote call with
task states, a remote call cancelled by a trace cancel, and a deadline skip.
``chain_events(n)`` is a long chain (two events per invocation) for scrolling
and the benchmark.
"""

from __future__ import annotations

from typing import Any

from penguiflow.state import StoredEvent

T0 = 1_700_000_000.0
TRACE = "0af7651916cd43dd8448eb211c80319c"
FLOW = "demo-flow"
FLOW_ID = "f10a"


class _Recorder:
    def __init__(self, trace_id: str = TRACE) -> None:
        self.trace_id = trace_id
        self.events: list[StoredEvent] = []

    def ev(self, ms: float, kind: str, node: str | None, inv: str | None = None, *,
           attempt: int = 0, parents: tuple[str, ...] = (), queued_ms: float | None = None,
           latency_ms: float | None = None, **extra: Any) -> None:
        ts = T0 + ms / 1000.0
        payload: dict[str, Any] = {"event": kind, "ts": ts, "node_name": node,
                                   "trace_id": self.trace_id, "attempt": attempt,
                                   "latency_ms": latency_ms, **extra}
        self.events.append(StoredEvent(
            self.trace_id, ts, kind, node, node, payload, invocation_id=inv,
            parent_invocation_ids=parents, span_id=inv, seq=len(self.events) + 1,
            attempt=attempt, queued_ts=None if queued_ms is None else T0 + queued_ms / 1000.0,
            # One flow id per trace: (flow_id, seq) is the store's dedup key.
            flow_name=FLOW, flow_id=f"{FLOW_ID}-{self.trace_id}"))


def demo_events(trace_id: str = TRACE) -> list[StoredEvent]:
    """The all-features fixture trace (131 ms long)."""
    r = _Recorder(trace_id)
    a1, b1, b2, b3, c1, c2 = ("a100000000000001", "b100000000000001", "b200000000000002",
                              "b300000000000003", "c100000000000001", "c200000000000002")
    r.ev(0, "node_start", "plan", a1, queued_ms=-2)
    r.ev(10, "node_success", "plan", a1, latency_ms=10)
    # search: error, retry, success
    r.ev(12, "node_start", "search", b1, parents=(a1,), queued_ms=10)
    r.ev(12, "node_start", "fetch", b2, parents=(a1,), queued_ms=10)
    r.ev(12, "node_start", "summarise", b3, parents=(a1,), queued_ms=10)
    r.ev(13, "remote_call_start", "summarise", b3, remote_skill="summarise",
         remote_transport="memory", remote_streaming=True, remote_request_bytes=512,
         remote_agent_url="http://agents.local/summarise")
    r.ev(20, "node_error", "search", b1, latency_ms=8,
         exception="ConnectionError('search backend reset')")
    r.ev(20, "node_retry", "search", b1, attempt=1, sleep_s=0.005,
         exception="ConnectionError('search backend reset')")
    r.ev(20.5, "remote_stream_event", "summarise", b3, remote_stream_seq=0,
         remote_chunk_bytes=120, remote_chunk_done=False, remote_task_state="submitted",
         remote_context_id="ctx-7f3a", remote_task_id="task-91c2", latency_ms=7.5)
    r.ev(25, "node_start", "search", b1, attempt=1, parents=(a1,), queued_ms=10)
    r.ev(30, "node_timeout", "fetch", b2, latency_ms=18, exception="TimeoutError()")
    r.ev(30, "node_retry", "fetch", b2, attempt=1, sleep_s=0.004, exception="TimeoutError()")
    r.ev(31, "remote_stream_event", "summarise", b3, remote_stream_seq=1,
         remote_chunk_bytes=300, remote_chunk_done=False, remote_task_state="working",
         remote_context_id="ctx-7f3a", remote_task_id="task-91c2", latency_ms=18)
    r.ev(34, "node_start", "fetch", b2, attempt=1, parents=(a1,), queued_ms=10)
    r.ev(40, "node_success", "search", b1, attempt=1, latency_ms=15)
    r.ev(55, "remote_stream_event", "summarise", b3, remote_stream_seq=2,
         remote_chunk_bytes=800, remote_chunk_done=True, remote_task_state="working",
         remote_context_id="ctx-7f3a", remote_task_id="task-91c2", latency_ms=42)
    r.ev(60, "node_success", "fetch", b2, attempt=1, latency_ms=26)
    r.ev(88, "remote_call_success", "summarise", b3, remote_status="success",
         remote_response_bytes=1220, remote_stream_events=3, remote_context_id="ctx-7f3a",
         remote_task_id="task-91c2", remote_task_state="completed", latency_ms=75)
    r.ev(90, "node_success", "summarise", b3, latency_ms=78)
    r.ev(92, "node_start", "merge", c1, parents=(b1, b2, b3), queued_ms=90)
    r.ev(110, "node_success", "merge", c1, latency_ms=18)
    r.ev(111, "node_start", "critic", c2, parents=(c1,), queued_ms=110)
    r.ev(112, "remote_call_start", "critic", c2, remote_skill="review",
         remote_transport="memory", remote_streaming=True, remote_request_bytes=2048,
         remote_agent_url="http://agents.local/review")
    r.ev(115, "remote_stream_event", "critic", c2, remote_stream_seq=0, remote_chunk_bytes=64,
         remote_chunk_done=False, remote_task_state="working", remote_context_id="ctx-2b9e",
         remote_task_id="task-44d0", latency_ms=3)
    r.ev(120, "trace_cancel_start", "OpenSea", None, pending=2)
    r.ev(125, "deadline_skip", "late", "d100000000000001", deadline_s=T0 + 0.1)
    r.ev(126, "remote_call_cancelled", "critic", c2, remote_cancel_reason="trace_cancel",
         remote_status="cancelled", remote_context_id="ctx-2b9e", remote_task_id="task-44d0",
         latency_ms=4)
    r.ev(127, "node_trace_cancelled", "critic", c2, latency_ms=16)
    r.ev(131, "trace_cancel_finish", "Rookery", None)
    return r.events


def chain_events(invocations: int, trace_id: str = TRACE, *,
                 step_ms: float = 1.0) -> list[StoredEvent]:
    """A chain of ``invocations`` nodes (5 names round-robin), two events each."""
    r = _Recorder(trace_id)
    parent: tuple[str, ...] = ()
    for i in range(invocations):
        inv = f"{i + 1:016x}"
        node = f"step{i % 5}"
        r.ev(i * step_ms, "node_start", node, inv, parents=parent, queued_ms=i * step_ms)
        r.ev(i * step_ms + step_ms * 0.8, "node_success", node, inv, latency_ms=step_ms * 0.8)
        parent = (inv,)
    return r.events


def running_events(trace_id: str = TRACE) -> list[StoredEvent]:
    """The first events of the demo trace: ``plan`` done, three invocations in flight."""
    return demo_events(trace_id)[:5]
