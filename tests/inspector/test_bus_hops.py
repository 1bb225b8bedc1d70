"""The inspector on a trace that crossed processes (a flow run over a message bus)."""

from __future__ import annotations

from typing import Any

from penguiflow.state import StoredEvent
from penguiflow.tracing import spans_from_events
from penguiflow_inspector.model import AbandonedView, build_trace, bus_hops
from penguiflow_inspector.render import trace_json, trace_text

TRACE = "hops-trace"
T0 = 1_700_000_000.0
DEAD, ALIVE = "dead0000dead0000", "a11e0000a11e0000"


def event(seq: int, dt: float, kind: str, node: str | None, inv: str | None, worker: str,
          *, queued: float | None = None, **extra: Any) -> StoredEvent:
    payload = {"ts": T0 + dt, "event": kind, "node_name": node, "trace_id": TRACE, **extra}
    return StoredEvent(TRACE, T0 + dt, kind, node, node, payload, invocation_id=inv,
                       span_id=inv, seq=seq, queued_ts=None if queued is None else T0 + queued,
                       flow_name="shop", flow_id=worker)


def crossed() -> list[StoredEvent]:
    """a ran on ALIVE; b's input went to DEAD, which died mid-node; ALIVE took it over."""
    return [
        event(0, 0.000, "message_fetch", "a", None, ALIVE, queued=0.0, edge="OpenSea->a",
              deliveries=1, worker_id=ALIVE),
        event(1, 0.001, "node_start", "a", "i" * 16, ALIVE),
        event(2, 0.002, "node_success", "a", "i" * 16, ALIVE, latency_ms=1.0),
        event(3, 0.004, "message_fetch", "b", None, DEAD, queued=0.003, edge="a->b",
              deliveries=1, worker_id=DEAD),
        event(4, 0.005, "node_start", "b", "j" * 16, DEAD),
        # DEAD was killed; 1 s later ALIVE claimed the entry and ran b again.
        event(5, 1.005, "message_fetch", "b", None, ALIVE, queued=0.003, edge="a->b",
              deliveries=2, worker_id=ALIVE, previous_worker=DEAD),
        event(6, 1.006, "node_start", "b", "k" * 16, ALIVE),
        event(7, 1.008, "node_success", "b", "k" * 16, ALIVE, latency_ms=2.0),
    ]


def test_hops_show_the_wait_in_the_broker_and_the_redelivery() -> None:
    view = build_trace(crossed())
    hops, abandoned = bus_hops(view)
    assert [(h.edge, h.worker, h.deliveries, h.previous_worker) for h in hops] == [
        ("OpenSea->a", ALIVE, 1, None), ("a->b", DEAD, 1, None), ("a->b", ALIVE, 2, DEAD)]
    assert round(hops[2].waited_ms or 0) == 1002  # sent at +3 ms, taken at +1005 ms
    assert abandoned == [AbandonedView("j" * 16, "b", DEAD)]
    text = trace_text(view)
    assert "hops across processes: 3 on 2 workers" in text
    assert f"redelivered (delivery 2, taken from stopped worker {DEAD})" in text
    assert any(line.lstrip("* ").startswith("b") and "abandoned" in line
               for line in text.splitlines())  # its waterfall row
    assert "abandoned attempts" in text and f"b ({'j' * 16}) on worker {DEAD}" in text
    data = trace_json(view)
    assert data["abandoned"] == [{"invocation_id": "j" * 16, "node_name": "b", "worker": DEAD}]
    assert [h["deliveries"] for h in data["hops"]] == [1, 1, 2]


def test_a_single_process_trace_has_no_hops_section() -> None:
    events = [e for e in crossed() if e.kind != "message_fetch"]
    view = build_trace(events)
    assert bus_hops(view) == ([], [])
    assert "hops across processes" not in trace_text(view)


def test_an_attempt_closed_as_abandoned_ends_there_and_the_trace_is_not_running() -> None:
    events = crossed()
    # ALIVE recorded, when it took b's input again, that DEAD's attempt was abandoned.
    events.insert(6, event(8, 1.0055, "node_abandoned", "b", "j" * 16, ALIVE,
                           worker_id=DEAD, claimed_by=ALIVE, edge="a->b"))
    view = build_trace(events)
    assert view.status == "ok"  # without the record: "running", for ever
    [dead] = [i for i in view.invocations if i.invocation_id == "j" * 16]
    assert dead.end == T0 + 1.0055 and "abandoned: worker " + DEAD in (dead.error or "")
    assert bus_hops(view)[1] == [AbandonedView("j" * 16, "b", DEAD)]
    # The critical path runs through the attempt that finished, not the abandoned one.
    assert view.critical_path == ["k" * 16]
    text = trace_text(view)
    assert "status succeeded" in text and f"b ({'j' * 16}) on worker {DEAD}" in text
    # pf export ends its span there too, as an error naming the worker that stopped.
    [span] = [s for s in spans_from_events(events)
              if s.attributes.get("pf.invocation.id") == "j" * 16]
    assert span.end_ns == int((T0 + 1.0055) * 1e9) and span.status == "error"
    assert span.attributes["error.type"] == "abandoned"
    assert span.attributes["pf.worker.id"] == DEAD


def test_without_the_record_an_open_attempt_keeps_the_trace_running() -> None:
    view = build_trace(crossed())
    assert view.status == "running"
