"""The benchmark script executes in quick mode and prints its table (no timing asserted)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXPECTED = [
    "chain N=1, µs/hop",
    "chain N=5, µs/hop",
    "chain N=20, µs/hop",
    "fan-out 1→8→join, µs/msg",
    "latency N=1 p50, µs",
    "latency N=1 p99, µs",
    "latency N=5 p50, µs",
    "latency N=5 p99, µs",
    "chain N=5 + no-op middleware, µs/hop",
    "chain N=5 + InMemoryStateStore, µs/hop",
    "chain N=5 + InMemoryStateStore until durable, µs/hop",
    "chain N=5 + SQLiteStateStore, µs/hop",
    "chain N=5 + SQLiteStateStore until durable, µs/hop",
    "SQLiteStateStore raw ingest, 2k events, events/s",
    "SQLiteStateStore load_history, 2k-event trace, ms",
]
# Present, but skipped (with the reason in the row) when no Postgres server is reachable.
OPTIONAL = [
    "chain N=5 + PostgresStateStore, µs/hop",
    "PostgresStateStore raw ingest, 2k events, events/s",
    "PostgresStateStore load_history, 2k-event trace, ms",
]


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _unmeasured_env() -> dict[str, str]:
    """This process's environment, without coverage's measuring of child Pythons.

    The benchmarks' numbers are not checked here, and every code path they run is
    measured by the suites; measured, each of the two scripts and every process it
    starts ran ~1.5-2x slower (~8 s of CI)."""
    env = dict(os.environ)
    env.pop("COVERAGE_PROCESS_CONFIG", None)
    env.pop("COVERAGE_PROCESS_START", None)
    return env


def test_benchmarks_quick_mode_prints_table(tmp_path: Path) -> None:
    out_json = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--json", str(out_json)],
        cwd=ROOT,
        env=_unmeasured_env(),
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("# python ") for line in lines)
    table = [_cells(line) for line in lines if line.startswith("|")]
    assert table[0] == ["workload", "floor", "ours", "ratio"]
    rows = {cells[0]: cells for cells in table[2:]}
    for name in EXPECTED:
        matches = [key for key in rows if key.startswith(name)]
        assert matches, f"missing row {name!r} in:\n{proc.stdout}"
        _, floor, ours, ratio = rows[matches[0]]
        assert float(floor) > 0 and float(ours) > 0, rows[matches[0]]
        assert ratio.endswith("\u00d7")
    for name in OPTIONAL:
        matches = [key for key in rows if key.startswith(name)]
        assert matches, f"missing row {name!r} in:\n{proc.stdout}"
        _, floor, ours, ratio = rows[matches[0]]
        assert "(skipped: " in matches[0] or (float(ours) > 0 and ratio.endswith("\u00d7"))

    doc = json.loads(out_json.read_text(encoding="utf-8"))
    assert len(doc["rows"]) == len(table) - 2
    assert all(r["ours"] is not None and r["floor"] is not None
               for r in doc["rows"] if not r["note"].startswith("skipped"))


DISTRIBUTED_ROWS = [
    "floor: redis-py XADD→XREADGROUP→XACK, 2 processes, msgs/s",
    "floor: one-hop latency p50 (XADD stamp → XREADGROUP return), µs",
    "chain N=5, 2 workers (a,b,c / d,e), throughput per hop, msgs/s",
    "chain N=5, 2 workers (a,b,c / d,e), one-hop latency p50 = e2e/6, µs",
    "chain N=5, 2 workers (a,b,c / d,e), one-hop latency p50, send→node stamps, µs",
    "chain N=5, 1 worker (all nodes each), throughput per hop, msgs/s",
    "chain N=5, 2 workers (all nodes each), throughput per hop, msgs/s",
    "chain N=5, 4 workers (all nodes each), throughput per hop, msgs/s",
]


def test_distributed_benchmark_quick_mode_prints_table(tmp_path: Path) -> None:
    """benchmarks/distributed.py --quick (~7 s): against $TEST_REDIS_URL when set, else
    the script's own throwaway redis-server; neither: skipped, or failed under CI=true."""
    env = _unmeasured_env()
    env.pop("PF_BENCH_REDIS_URL", None)
    if os.environ.get("TEST_REDIS_URL"):
        env["PF_BENCH_REDIS_URL"] = os.environ["TEST_REDIS_URL"]
    elif shutil.which("redis-server") is None:
        reason = "TEST_REDIS_URL is unset and redis-server is not installed"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but no Redis for the distributed benchmark: {reason}",
                        pytrace=False)
        pytest.skip(reason)
    out_json = tmp_path / "dist.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "distributed.py"), "--quick",
         "--json", str(out_json)],
        cwd=ROOT, env=env, capture_output=True, text=True, encoding="utf-8", timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    table = [_cells(line) for line in proc.stdout.splitlines() if line.startswith("|")]
    assert table[0] == ["workload", "floor", "ours", "ratio"]
    rows = {cells[0]: cells for cells in table[2:]}
    assert len(rows) == len(DISTRIBUTED_ROWS), proc.stdout
    for name in DISTRIBUTED_ROWS:
        matches = [key for key in rows if key.startswith(name)]
        assert matches, f"missing row {name!r} in:\n{proc.stdout}"
        _, floor, ours, ratio = rows[matches[0]]
        assert float(floor) > 0, rows[matches[0]]
        if name.startswith("floor:"):
            assert ours == ratio == "—", rows[matches[0]]
        else:
            assert float(ours) > 0 and ratio.endswith("\u00d7"), rows[matches[0]]
    assert "Redis commands per hop" in proc.stdout
    doc = json.loads(out_json.read_text(encoding="utf-8"))
    assert len(doc["rows"]) == len(DISTRIBUTED_ROWS)
