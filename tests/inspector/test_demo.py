"""``pf demo`` then ``pf inspect --json``, as a person would run them: real subprocesses.

The demo records one trace into a fresh SQLite file (and a fresh Postgres
database); ``pf inspect <prefix> --json`` must then show everything the
inspector promises from stored events alone: the nodes, the retry, the
timeout, the join's slow branch on the critical path, both remote calls with
task states and latency, the stream chunks, the deadline skip, and the cancel
propagated to the researcher's remote task.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

HANG_GUARD_S = 60.0


def pf(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``pf`` in a subprocess (stdout is a pipe: never the TUI)."""
    return subprocess.run([sys.executable, "-m", "penguiflow_inspector.cli", *args],
                          capture_output=True, text=True, timeout=HANG_GUARD_S, check=False,
                          cwd=cwd)


def check_demo_trace(store_url: str) -> dict[str, Any]:
    demo = pf("demo", "--no-open", "--store", store_url)
    assert demo.returncode == 0, demo.stderr
    assert "Traceback" not in demo.stderr
    trace_id = demo.stdout.strip()
    assert len(trace_id) == 32, demo.stdout
    assert f"pf inspect {trace_id[:8]}" in demo.stderr

    shown = pf("inspect", trace_id[:8], "--json", "--store", store_url)
    assert shown.returncode == 0, shown.stderr
    view = json.loads(shown.stdout)
    assert view["trace_id"] == trace_id
    assert view["otel_trace_id"] == trace_id and len(view["root_span_id"]) == 16
    assert view["flow_name"] == "pf-demo"
    assert view["status"] == "cancelled"
    invs = view["invocations"]
    by_node: dict[str, list[dict[str, Any]]] = {}
    for inv in invs:
        by_node.setdefault(inv["node_name"], []).append(inv)
    assert set(by_node) == {"plan", "fetch", "slow_tool", "writer", "join", "summarize",
                            "researcher"}
    (fetch,) = by_node["fetch"]
    assert [a["outcome"] for a in fetch["attempts"]] == ["error", "ok"]
    assert fetch["attempts"][0]["backoff_ms"] == pytest.approx(40.0)
    assert "ConnectionError" in fetch["attempts"][0]["error"]
    (slow,) = by_node["slow_tool"]
    assert [a["outcome"] for a in slow["attempts"]] == ["timeout", "ok"]
    assert all(inv["queue_wait_ms"] is not None and inv["queue_wait_ms"] >= 0 for inv in invs)
    (researcher,) = by_node["researcher"]
    assert researcher["status"] == "cancelled" and researcher["chunks"] >= 2
    assert by_node["writer"][0]["chunks"] == 4
    # The critical path runs through the slow branch and the join, to the cancelled call.
    names = {inv["invocation_id"]: inv["node_name"] for inv in invs}
    assert [names[i] for i in view["critical_path"]] == [
        "plan", "slow_tool", "join", "summarize", "researcher"]
    # Remote calls: ids, states, latency split, bytes.
    calls = {c["skill"]: c for c in view["remote_calls"]}
    writer, research = calls["write"], calls["research"]
    assert writer["outcome"] == "success" and writer["streaming"] is True
    assert [s["state"] for s in writer["states"]] == ["submitted", "working", "completed"]
    split = {s["state"]: s["ms"] for s in writer["state_split_ms"]}
    assert split["submitted"] >= 50.0  # the writer agent's 60 ms before it works
    assert writer["latency_ms"] >= sum(split.values()) - 1.0
    assert writer["time_to_first_chunk_ms"] > 0 and writer["bytes_received"] > 0
    assert writer["context_id"] and writer["task_id"]
    assert research["outcome"] == "cancelled" and research["task_id"]
    assert [s["state"] for s in research["states"]] == ["submitted", "working"]
    assert {s["agent"] for s in view["remote_stats"]} == {"inmemory://writer",
                                                          "inmemory://researcher"}
    # The cancel reached the researcher's remote task, with the agent's 50 ms round trip.
    (cancel,) = view["cancels"]
    (propagated,) = cancel["propagated"]
    assert propagated["task_id"] == research["task_id"]
    assert propagated["reason"] == "trace_cancel"
    assert propagated["round_trip_ms"] >= 45.0
    assert cancel["acknowledged"] is not None
    assert [i["invocation_id"] for i in cancel["interrupted"]] == [researcher["invocation_id"]]
    (deadline,) = view["deadlines"]
    assert deadline["node_name"] == "notify" and deadline["remaining_ms"] < 0
    kinds = {e["kind"] for e in view["events"]}
    assert {"node_retry", "node_timeout", "remote_stream_event", "remote_call_cancelled",
            "trace_cancel_start", "trace_cancel_finish", "deadline_skip"} <= kinds

    plain = pf("inspect", trace_id, "--plain", "--store", store_url)
    assert plain.returncode == 0, plain.stderr
    assert "critical path: plan → slow_tool → join → summarize → researcher" in plain.stdout
    assert "propagated to task" in plain.stdout
    return view


def test_demo_then_inspect_json_sqlite(tmp_path: Path) -> None:
    check_demo_trace(f"sqlite:///{tmp_path}/t.db")


def test_demo_records_to_the_default_store_of_the_working_directory(tmp_path: Path) -> None:
    demo = pf("demo", "--no-open", "--json", cwd=tmp_path)
    assert demo.returncode == 0, demo.stderr
    trace_id = json.loads(demo.stdout)["trace_id"]
    assert (tmp_path / ".penguiflow" / "traces.db").exists()
    listed = pf("traces", "--json", cwd=tmp_path)
    assert [t["trace_id"] for t in json.loads(listed.stdout)] == [trace_id]


def test_demo_then_inspect_json_postgres(pg_database: str) -> None:
    check_demo_trace(pg_database)
