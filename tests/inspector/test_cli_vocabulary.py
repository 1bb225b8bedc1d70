"""One vocabulary across ``pf traces``, ``pf inspect --plain`` and ``--json``.

On the demo trace (``pf demo``): the filter ``kind:error`` finds the two
invocations whose first attempt failed (``fetch`` raised, ``slow_tool`` timed
out) although their retries worked -- the two ``pf traces`` counts under ERROR
EVENTS; the node whose message arrived after its deadline is a ``skipped`` row;
statuses are the store's words; durations print the same in both commands;
the runtime's internal endpoints (OpenSea, Rookery) never show. Also: a
failure's traceback under its invocation (capped), ``pf --version``.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pytest

from penguiflow.state import StoredEvent
from penguiflow_exporters import open_store
from penguiflow_inspector import cli, render
from penguiflow_inspector.cli import main
from penguiflow_inspector.demo import record_demo
from penguiflow_inspector.model import (
    STATUS_SYMBOL,
    STATUS_WORD,
    build_trace,
    failed_invocation_count,
    format_duration,
    format_offset,
    matches_kind,
)


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    url = f"sqlite:///{tmp_path_factory.mktemp('pf-vocab')}/demo.db"

    async def record() -> str:
        async with open_store(url) as store:
            return (await record_demo(store)).trace_id

    return url, asyncio.run(record())


def run(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(list(args)) == 0
    return capsys.readouterr().out


def test_kind_error_finds_the_invocations_whose_failure_was_retried(
        demo_url: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    url, trace_id = demo_url
    view = json.loads(run(capsys, "inspect", trace_id, "--store", url, "--json"))
    summary, = json.loads(run(capsys, "traces", "--store", url, "--json"))
    events = [StoredEvent(trace_id, e["ts"], e["kind"], e["node_name"], None, e["extra"],
                          invocation_id=e["invocation_id"], attempt=e["attempt"])
              for e in view["events"]]
    model = build_trace(events)
    assert sorted(i.node_name for i in model.invocations if matches_kind(i, "error")) == [
        "fetch", "slow_tool"]
    assert [i.node_name for i in model.invocations if matches_kind(i, "timeout")] == [
        "slow_tool"]
    assert all(i.status == "ok" for i in model.invocations if matches_kind(i, "error"))
    # The same number pf traces shows under ERRORS, with the same meaning: the
    # invocations kind:error finds (here every failure was retried successfully).
    assert summary["error_count"] == failed_invocation_count(model) == 2
    assert [i.node_name for i in model.invocations if matches_kind(i, "cancelled")] == [
        "researcher"]
    assert {c.skill for c in model.remote_calls if matches_kind(c, "remote")} == {
        "write", "research"}
    assert not any(matches_kind(i, "no-such-kind") for i in model.invocations)


def test_a_remote_node_whose_calls_failed_is_one_invocation_with_errors(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A RemoteNode retried twice, each attempt's remote call failing: ERRORS counts
    # the invocation and the three failed calls (4), and --plain said "1 invocations
    # ... (4 with errors, 1 failed)": more invocations with errors than invocations.
    from penguiflow import Headers, Message, NodePolicy, create
    from penguiflow.remote import InMemoryAgent, InMemoryTransport, RemoteNode

    url = f"sqlite:///{tmp_path}/remote.db"

    async def down(request: Any) -> Any:
        raise ConnectionError("agent down")

    async def record() -> str:
        transport = InMemoryTransport({"inmemory://a": InMemoryAgent(handler=down)})
        node = RemoteNode(transport=transport, skill="s", agent_url="inmemory://a",
                          name="caller", policy=NodePolicy(validate="none", max_retries=2,
                                                           backoff_base=0.001))
        async with open_store(url) as store:
            flow = create(node.to(), state_store=store, emit_errors_to_rookery=True)
            flow.run()
            message = Message(payload="x", headers=Headers(tenant="t"))
            await flow.emit(message)
            await asyncio.wait_for(flow.fetch(), 10)
            await flow.stop()
        return message.trace_id

    trace_id = asyncio.run(record())
    row = run(capsys, "traces", "--store", url, "--plain").splitlines()[1].split()
    errors, remote = row[row.index("failed") + 3:][:2]
    first = run(capsys, "inspect", trace_id, "--store", url, "--plain").splitlines()[0]
    assert "1 invocations of 1 nodes (1 with errors, 1 failed)" in first
    assert "3 remote calls (3 failed)" in first
    assert (errors, remote) == ("4", "3")  # ERRORS: the invocation + its 3 failed calls


def test_traces_and_inspect_say_the_same(demo_url: tuple[str, str],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    url, trace_id = demo_url
    table = run(capsys, "traces", "--store", url, "--plain").splitlines()
    header, row = table[0].split(), table[1].split()
    assert header[header.index("STATUS"):] == [
        "STATUS", "NODES", "INVOCATIONS", "ERRORS", "REMOTE", "EVENTS", "LOST", "FLOW"]
    symbol, word, nodes, invocations, errors = row[row.index("✕"):][:5]
    plain = run(capsys, "inspect", trace_id, "--store", url, "--plain")
    first = plain.splitlines()[0]
    summary, = json.loads(run(capsys, "traces", "--store", url, "--json"))
    view = json.loads(run(capsys, "inspect", trace_id, "--store", url, "--json"))
    assert (symbol, word) == (STATUS_SYMBOL["cancelled"], "cancelled")
    assert view["status"] == summary["status"] == "cancelled"
    assert f"status {word}" in first
    assert f"{invocations} invocations of {nodes} nodes ({errors} with errors, 0 failed)" in first
    assert (nodes, invocations) == ("7", "8")
    # One duration, printed by one function: the same text in both commands.
    shown = format_duration(summary["duration_ms"])
    assert shown in table[1] and f"  {shown}  " in first
    assert view["duration_ms"] == pytest.approx(summary["duration_ms"], abs=0.05)
    # Invocation statuses are the store's words, in --plain and --json alike.
    assert {i["status"] for i in view["invocations"]} <= set(STATUS_WORD.values())
    assert re.search(r"^\* plan +succeeded ", plain, re.M)


def test_a_deadline_skip_is_a_skipped_row_at_a_relative_time(
        demo_url: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    url, trace_id = demo_url
    plain = run(capsys, "inspect", trace_id, "--store", url, "--plain")
    (row,) = [line for line in plain.splitlines() if line.endswith("↷ deadline passed")]
    assert row.split()[:2] == ["notify", "skipped"]
    (line,) = [line for line in plain.splitlines() if "notify skipped at" in line]
    assert re.fullmatch(r"  notify skipped at \+\d+\.\d ms: deadline was at [+-]\d+\.\d ms, "
                        r"\d+\.\d ms before the skip", line), line
    assert "+-" not in plain and "OpenSea" not in plain and "Rookery" not in plain
    tail = subprocess.run([sys.executable, "-m", "penguiflow_inspector.cli", "tail",
                           trace_id, "--store", url, "--plain"],
                          capture_output=True, text=True, timeout=60, check=True).stdout
    assert "trace_cancel_finish" in tail and "Rookery" not in tail and "OpenSea" not in tail


def test_offsets_and_durations_never_read_plus_minus() -> None:
    assert format_offset(10.0 - 0.0008, 10.0) == "-0.8 ms"
    assert format_offset(11.234, 10.0) == "+1.23 s"
    assert format_offset(None, 10.0) == "-"
    assert [format_duration(ms) for ms in (0.04, 999.94, 999.96, 1234.0, 143_000.0, None)] == [
        "0.0 ms", "999.9 ms", "1.00 s", "1.23 s", "143 s", "-"]


def _failing(traceback: Any) -> list[StoredEvent]:
    payload = {"exception": "ValueError('bad')"}
    if traceback is not None:
        payload["traceback"] = traceback
    return [StoredEvent("t" * 32, 1.0, "node_start", "step", "step", {}, invocation_id="a" * 16),
            StoredEvent("t" * 32, 1.5, "node_failed", "step", "step", payload,
                        invocation_id="a" * 16)]


def test_a_traceback_is_shown_under_its_failure_capped() -> None:
    lines = [f'  File "app.py", line {n}, in f{n}' for n in range(30)] + ["ValueError: bad"]
    text = render.trace_text(build_trace(_failing("\n".join(lines) + "\n")))
    block = text.split("errors (")[1].splitlines()
    assert block[1].startswith("  step (aaaaaaaaaaaaaaaa) failed: ValueError('bad')")
    assert block[2:22] == [f"      {line}" for line in lines[:20]]
    assert block[22] == "      … 11 more lines (pf inspect --json has the whole traceback)"
    short = render.trace_text(build_trace(_failing("Traceback:\nValueError: bad")))
    assert "      Traceback:\n      ValueError: bad\n" in short


@pytest.mark.parametrize("traceback", [None, "", 42, {"frames": 3}])
def test_no_traceback_or_an_odd_one_shows_nothing(traceback: Any) -> None:
    text = render.trace_text(build_trace(_failing(traceback)))
    assert text.split("errors (")[1].splitlines()[2:4] == ["", "critical path: step"]


def test_version_names_both_packages(capsys: pytest.CaptureFixture[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "penguiflow_inspector.cli", "--version"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0
    assert done.stdout == (f"pf (penguiflow-inspector) {version('penguiflow-inspector')}; "
                           f"penguiflow {version('penguiflow')}\n")


def test_version_of_an_uninstalled_package_is_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> str:
        raise PackageNotFoundError(name)

    monkeypatch.setattr(cli, "version", missing)
    assert cli.version_line() == "pf (penguiflow-inspector) unknown; penguiflow unknown"


def test_demo_json_is_faithful(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # --json keeps raw payloads: the deadline is the stored epoch, not a relative time.
    url = f"sqlite:///{tmp_path}/d.db"
    (trace,) = [line for line in run(capsys, "demo", "--store", url, "--no-open",
                                     "--plain").splitlines()]
    view = json.loads(run(capsys, "inspect", trace, "--store", url, "--json"))
    (deadline,) = view["deadlines"]
    assert deadline["node_name"] == "notify" and deadline["deadline"] > 1e9
