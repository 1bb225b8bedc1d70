"""The ``pf`` commands: store selection, output modes, filters and every error path.

A SQLite file is filled with hand-made traces at fixed times (relative to
now, so ``--since 10m`` means something), including two ids that share a
prefix. Each command must print one line and exit 1 (runtime) or 2 (usage)
for an unknown id, an ambiguous prefix, a missing/empty/unreachable store or
a bad value -- never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import types
from datetime import UTC, datetime
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar

import pytest

from penguiflow.state import StoredEvent, TraceFilter
from penguiflow_exporters import open_store
from penguiflow_inspector import cli
from penguiflow_inspector.cli import COMMANDS, WORKER_MISSING, main, parse_when

NOW = time.time()
OK_TRACE = "feed" + "0" * 27 + "1"
FAILED_TRACE = "feed" + "0" * 26 + "12"
OLD_TRACE = "0ld" + "0" * 29


def _events(trace_id: str, start: float, node: str, *, fail: bool = False,
            duration: float = 0.1) -> list[StoredEvent]:
    inv = trace_id[-16:]
    end_kind = "node_failed" if fail else "node_success"
    extra = {"exception": "ValueError('bad')"} if fail else {}
    # As the runtime records a failure: the attempt's node_error, then node_failed.
    error = [StoredEvent(trace_id, start + duration, "node_error", node, node, extra,
                         invocation_id=inv, flow_id=trace_id, seq=3, flow_name="cli-test")]
    return [
        StoredEvent(trace_id, start, "node_start", node, node, {}, invocation_id=inv,
                    flow_id=trace_id, seq=1, flow_name="cli-test"),
        *(error if fail else []),
        StoredEvent(trace_id, start + duration, end_kind, node, node, extra,
                    invocation_id=inv, flow_id=trace_id, seq=2, flow_name="cli-test"),
    ]


@pytest.fixture(scope="module")
def store_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('pf-cli')}/traces.db"

    async def fill() -> None:
        async with open_store(url) as store:
            await store.save_events(
                _events(OLD_TRACE, NOW - 3600, "archive", duration=2.0)
                + _events(OK_TRACE, NOW - 60, "work")
                + _events(FAILED_TRACE, NOW - 30, "check", fail=True, duration=0.5))

    asyncio.run(fill())
    return url


@pytest.fixture
def empty_store_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path}/empty.db"

    async def create() -> None:
        async with open_store(url) as store:
            await store.flush()

    asyncio.run(create())
    return url


def pf(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "penguiflow_inspector.cli", *args],
                          capture_output=True, text=True, timeout=60, check=False)


def one_line_error(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"pf {command}: "), err
    assert "Traceback" not in err
    return lines[0]


# -- the surface ------------------------------------------------------------------------------


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for name, _ in COMMANDS:
        assert name in out
    assert [name for name, _ in COMMANDS] == ["inspect", "traces", "tail", "export", "demo",
                                              "migrate", "worker"]


def test_pf_worker_without_penguiflow_distributed_says_how_to_install_it(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "penguiflow_distributed.worker", None)  # not installed
    assert main(["worker", "app:flow", "--bus", "redis://127.0.0.1:1/0"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == WORKER_MISSING and "pip install penguiflow-distributed" in err


def test_pf_worker_hands_its_arguments_to_penguiflow_distributed(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["worker", "no_such_module_here:flow", "--bus", "redis://127.0.0.1:1/0"]) == 2
    assert capsys.readouterr().err.strip() == (
        "pf worker: error: cannot import 'no_such_module_here': "
        "No module named 'no_such_module_here'")


def test_no_command_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: pf" in capsys.readouterr().out


def test_console_scripts_are_installed() -> None:
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts["pf"] == "penguiflow_inspector.cli:main"
    assert scripts["penguiflow-admin"] == "penguiflow.admin:main"


def test_pf_runs_as_a_module_subprocess() -> None:
    proc = pf("--help")
    assert proc.returncode == 0
    assert "inspect" in proc.stdout


# -- inspect ----------------------------------------------------------------------------------


def test_inspect_prints_plain_text_when_stdout_is_not_a_terminal(
        store_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", FAILED_TRACE[:31], "--store", store_url]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"trace {FAILED_TRACE}  flow cli-test  status failed")
    assert "check" in out and "ValueError('bad')" in out
    assert "critical path: check" in out


def test_inspect_json_has_stable_keys(store_url: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", OK_TRACE, "--json", "--store", store_url]) == 0
    view = json.loads(capsys.readouterr().out)
    assert list(view) == ["trace_id", "otel_trace_id", "root_span_id", "flow_name", "status",
                          "events_lost", "start", "end", "duration_ms", "invocations",
                          "remote_calls", "remote_stats", "cancels", "deadlines", "critical_path",
                          "hops", "abandoned", "events"]
    assert view["hops"] == [] and view["abandoned"] == []
    assert view["events_lost"] == 0
    assert view["status"] == "succeeded" and view["duration_ms"] == pytest.approx(100.0, abs=0.01)
    assert [e["kind"] for e in view["events"]] == ["node_start", "node_success"]


def test_store_comes_from_the_environment(store_url: str, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PENGUIFLOW_STORE", store_url)
    assert main(["inspect", OK_TRACE, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["trace_id"] == OK_TRACE


class FakeApp:
    """Stands in for the Textual app: records how pf would have started it."""

    started: ClassVar[list[dict[str, Any]]] = []

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.return_code = 0

    def run(self) -> None:
        FakeApp.started.append(self.kwargs)


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "_is_terminal", lambda stream: True)


@pytest.fixture
def fake_app(monkeypatch: pytest.MonkeyPatch) -> None:
    """The TUI replaced by FakeApp, which records how it was started."""
    fake = types.ModuleType("penguiflow_inspector.app")
    fake.InspectorApp = FakeApp  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "penguiflow_inspector.app", fake)
    FakeApp.started.clear()


def test_a_terminal_opens_the_tui_on_the_resolved_trace(
        store_url: str, terminal: None, fake_app: None) -> None:
    assert main(["inspect", OK_TRACE[:31], "--store", store_url]) == 0
    assert main(["traces", "--store", store_url]) == 0
    assert FakeApp.started == [
        {"store_url": store_url, "trace_id": OK_TRACE, "mode": "trace"},
        # The screen scrolls: the 200 newest, as before it took pf traces' flags
        # (a first version gave it --limit's printing default, 50).
        {"store_url": store_url, "mode": "traces", "trace_filter": TraceFilter(limit=200)}]


def test_the_tui_lists_the_traces_pf_traces_flags_select(
        store_url: str, terminal: None, fake_app: None) -> None:
    since, until = (datetime.fromtimestamp(NOW - 600, UTC), datetime.fromtimestamp(NOW + 600, UTC))
    assert main(["traces", "--store", store_url, "--errors", "--status", "ok", "--node", "work",
                 "--since", since.isoformat(), "--until", until.isoformat(), "--slowest",
                 "--limit", "7"]) == 0
    assert FakeApp.started == [{"store_url": store_url, "mode": "traces", "trace_filter":
                                TraceFilter(status="succeeded", node="work", has_errors=True,
                                            since=since.timestamp(),
                                            until=until.timestamp(),
                                            order="slowest", limit=7)}]


def test_without_the_tui_a_terminal_gets_plain_text_and_a_note(
        store_url: str, terminal: None, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "penguiflow_inspector.app", None)  # import fails
    assert main(["inspect", OK_TRACE, "--store", store_url]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"trace {OK_TRACE}")
    assert "terminal UI is not available" in captured.err


# -- traces -----------------------------------------------------------------------------------


def listed(capsys: pytest.CaptureFixture[str], *args: str) -> list[str]:
    assert main(["traces", "--json", *args]) == 0
    return [t["trace_id"] for t in json.loads(capsys.readouterr().out)]


def test_traces_newest_first_and_filtered(store_url: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    s = ("--store", store_url)
    assert listed(capsys, *s) == [FAILED_TRACE, OK_TRACE, OLD_TRACE]
    assert listed(capsys, *s, "--status", "ok") == [OK_TRACE, OLD_TRACE]
    assert listed(capsys, *s, "--status", "error") == [FAILED_TRACE]
    assert listed(capsys, *s, "--status", "failed") == [FAILED_TRACE]
    assert listed(capsys, *s, "--errors") == [FAILED_TRACE]
    assert listed(capsys, *s, "--node", "work") == [OK_TRACE]
    # Ten minutes before the traces were stored, as an ISO time: "10m" counts from
    # the wall clock, and a slow run reached this test over 9 minutes after NOW.
    cutoff = datetime.fromtimestamp(NOW - 600, UTC).isoformat()
    assert listed(capsys, *s, "--since", cutoff) == [FAILED_TRACE, OK_TRACE]
    assert listed(capsys, *s, "--until", cutoff) == [OLD_TRACE]
    assert listed(capsys, *s, "--slowest") == [OLD_TRACE, FAILED_TRACE, OK_TRACE]
    assert listed(capsys, *s, "--limit", "1") == [FAILED_TRACE]
    assert listed(capsys, *s, "--status", "cancelled") == []


def test_traces_plain_table(store_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["traces", "--plain", "--store", store_url]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("TRACE ID")
    assert [line.split()[0] for line in lines[1:]] == [FAILED_TRACE, OK_TRACE, OLD_TRACE]
    assert main(["traces", "--plain", "--store", store_url, "--node", "nope"]) == 0
    assert "no traces match" in capsys.readouterr().err


def test_parse_when_relative_and_iso() -> None:
    assert parse_when("10m", now=1000.0) == 400.0
    assert parse_when("2h", now=10_000.0) == 2800.0
    assert parse_when("1.5d", now=200_000.0) == 200_000.0 - 1.5 * 86400
    assert parse_when("2025-01-31T12:00:00+00:00") == 1738324800.0


@pytest.mark.parametrize(("args", "needle"), [
    (["--status", "bogus"], "invalid choice"),
    (["--since", "yesterday-ish"], "not a time"),
    (["--limit", "0"], "must be 1 or more"),
    (["--limit", "ten"], "not a whole number"),
    (["--limit", "9" * 20], "must be at most"),  # before: an OverflowError traceback
])
def test_bad_filter_values_are_one_line_usage_errors(args: list[str], needle: str) -> None:
    proc = pf("traces", *args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr


@pytest.mark.parametrize(("command", "expected"), [
    ("tail", 0), ("traces", 130), ("inspect", 130), ("export", 130)])
def test_ctrl_c_ends_pf_tail_and_interrupts_anything_else(
        command: str, expected: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # Ctrl-C is how `pf tail` ends; any other command was cut short, its output maybe
    # partial (half a --json document): exit 130, not 0 (nor export's traceback).
    def interrupted(*_args: Any, **_kwargs: Any) -> int:
        raise KeyboardInterrupt

    if command == "export":
        monkeypatch.setattr(cli.export, "run", interrupted)
    else:
        monkeypatch.setitem(cli._COMMANDS, command, interrupted)
    argv = {"tail": ["tail"], "traces": ["traces"], "inspect": ["inspect", "abc"],
            "export": ["export", "abc"]}[command]
    assert main(argv) == expected


def test_since_after_until_is_a_usage_error(store_url: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["traces", "--store", store_url, "--since", "1m", "--until", "1h"]) == 2
    assert "--since must be before --until" in one_line_error(capsys.readouterr().err,
                                                               "traces")


# -- error paths, every command ---------------------------------------------------------------

READERS = [("inspect", ["inspect", "X"]), ("traces", ["traces"]), ("tail", ["tail", "X"])]


@pytest.mark.parametrize(("command", "argv"), READERS)
def test_a_missing_sqlite_file_is_not_created(command: str, argv: list[str], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path}/typo.db"
    assert main([*argv, "--store", url]) == 2
    assert "no trace store at" in one_line_error(capsys.readouterr().err, command)
    assert not (tmp_path / "typo.db").exists()


@pytest.mark.parametrize(("command", "argv"), [*READERS, ("demo", ["demo", "--no-open"])])
def test_an_unreachable_store(command: str, argv: list[str],
                              capsys: pytest.CaptureFixture[str]) -> None:
    url = "postgresql://pf:secret@127.0.0.1:1/nowhere"  # nothing listens on port 1
    assert main([*argv, "--store", url]) == 1
    line = one_line_error(capsys.readouterr().err, command)
    assert "trace store" in line and "secret" not in line


@pytest.mark.parametrize(("command", "argv"), [("inspect", ["inspect", "X"]),
                                               ("traces", ["traces"])])
def test_an_empty_store(command: str, argv: list[str], empty_store_url: str,
                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*argv, "--store", empty_store_url]) == 1
    line = one_line_error(capsys.readouterr().err, command)
    assert "holds no traces yet" in line and "pf demo" in line


@pytest.mark.parametrize(("command", "argv"), [("inspect", ["inspect"]), ("tail", ["tail"])])
def test_unknown_and_ambiguous_ids(command: str, argv: list[str], store_url: str,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*argv, "abc", "--store", store_url]) == 2
    assert "no trace id starts with 'abc'" in one_line_error(capsys.readouterr().err, command)
    assert main([*argv, "feed", "--store", store_url]) == 2
    line = one_line_error(capsys.readouterr().err, command)
    assert "ambiguous" in line and OK_TRACE in line and FAILED_TRACE in line


@pytest.mark.parametrize("url", ["memory://", "redis://localhost/0"])
@pytest.mark.parametrize("command", ["inspect", "traces", "demo"])
def test_stores_a_command_cannot_use_are_usage_errors(
        url: str, command: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [command, *(["X"] if command == "inspect" else []), "--store", url]
    assert main(argv) == 2
    one_line_error(capsys.readouterr().err, command)


def test_traceback_free_subprocess_error(tmp_path: Path) -> None:
    proc = pf("inspect", "abc", "--store", f"sqlite:///{tmp_path}/none.db")
    assert proc.returncode == 2 and proc.stdout == ""
    one_line_error(proc.stderr, "inspect")


def test_commands_table_matches_the_dispatch() -> None:
    assert set(cli._COMMANDS) | {"export"} == {name for name, _ in COMMANDS}
