"""``pf migrate`` upgrades a schema-4 SQLite store, which the readers refuse until then.

The schema-4 file is written by the schema-4 store itself: its modules are taken
from the repository's history (commit ``463bfbb``, the last one with schema 4)
into a temporary package and run in a child Python (so nothing of the old code,
which paused the GC, runs in this process). It records three traces, one per
schema-4 block layout: hand-made StoredEvents (a retried error and a remote call:
payload items to carry over); a real flow's run after a StoredEvent of the same
trace (a block of both: each item in two parts) and one written by the store's
writer process (the runtime's 23 fields). After ``pf migrate``, ``pf inspect``
and ``pf traces`` show exactly what was recorded.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from penguiflow_inspector.cli import main
from penguiflow_inspector.migrate import sqlite_schema_version

REPO = Path(__file__).resolve().parents[2]
#: The last commit whose SQLite store wrote schema 4.
SCHEMA_4_COMMIT = "463bfbb"
SCHEMA_4_MODULES = ("__init__.py", "sqlite.py", "_sqlite_write.py", "_batch.py", "_blocks.py",
                    "_buffered.py", "_gc.py", "_serve.py", "_writer_proc.py")
MADE = "0d1d" * 8
RUN = "f1e1" * 8
RUN_BY_PROCESS = "9c0c" * 8

_RECORD = textwrap.dedent('''
    import asyncio, sys
    sys.path.insert(0, sys.argv[1])
    from penguiflow_v4_store.sqlite import SCHEMA_VERSION, SQLiteStateStore
    from penguiflow import Headers, Message, Node, NodePolicy, create
    from penguiflow.state import StoredEvent

    assert SCHEMA_VERSION == 4, SCHEMA_VERSION
    T0 = 1_700_000_000.0

    def ev(ms, kind, node, inv, seq, **payload):
        ts = T0 + ms / 1000
        return StoredEvent("{made}", ts, kind, node, node, {{"ts": ts, "event": kind, **payload}},
                           invocation_id=inv, flow_id="made-flow", seq=seq, attempt=0,
                           flow_name="made")

    async def main(path):
        async with SQLiteStateStore(path, writer="thread") as store:
            await store.save_events([
                ev(0, "node_start", "fetch", "a" * 16, 1),
                ev(5, "node_error", "fetch", "a" * 16, 2, exception="ConnectionError('reset')"),
                ev(5, "node_retry", "fetch", "a" * 16, 3, sleep_s=0.01),
                ev(16, "node_start", "fetch", "a" * 16, 4),
                ev(17, "remote_call_start", "fetch", "a" * 16, 5, remote_skill="echo",
                   remote_agent_url="http://agent.local"),
                ev(30, "remote_call_success", "fetch", "a" * 16, 6, remote_task_id="task-1",
                   remote_task_state="completed"),
                ev(31, "node_success", "fetch", "a" * 16, 7, latency_ms=15.0),
            ])

            # With the run's first events in one batch: a block of both kinds of items.
            await store.save_event(StoredEvent("{run}", T0, "app_note", None, None,
                                               {{"note": "before the run"}}, flow_id="app"))
            await run(store, "{run}")
        async with SQLiteStateStore(path, writer="process") as store:
            await run(store, "{by_process}")

    async def run(store, trace_id):
        async def work(msg, ctx):
            return msg

        node = Node(work, name="work", policy=NodePolicy(validate="none"))
        flow = create(node.to(), state_store=store, name="run")
        flow.run()
        try:
            await flow.emit(Message(payload=1, headers=Headers(tenant="t"), trace_id=trace_id))
            await asyncio.wait_for(flow.fetch(), 30)
        finally:
            await flow.stop()

    asyncio.run(main(sys.argv[2]))
''').format(made=MADE, run=RUN, by_process=RUN_BY_PROCESS)


def _schema_4_package(root: Path) -> Path:
    """The schema-4 store's modules, from git, as the package ``penguiflow_v4_store``."""
    package = root / "penguiflow_v4_store"
    package.mkdir(parents=True)
    for name in SCHEMA_4_MODULES:
        proc = subprocess.run(
            ["git", "-C", str(REPO), "show", f"{SCHEMA_4_COMMIT}:exporters/src/"
             f"penguiflow_exporters/{name}"], capture_output=True, check=False)
        if proc.returncode != 0:
            pytest.skip(f"needs the repository's git history (commit {SCHEMA_4_COMMIT}, the "
                        f"schema-4 store): {proc.stderr.decode(errors='replace').strip()}")
        # Its writer process is started as ``python -m <module>``: this package's.
        (package / name).write_bytes(proc.stdout.replace(
            b'"penguiflow_exporters._sqlite_write"', b'"penguiflow_v4_store._sqlite_write"'))
    return root


@pytest.fixture(scope="module")
def schema_4_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pristine schema-4 store (copy it before changing it)."""
    if shutil.which("git") is None:
        pytest.skip("needs git, to take the schema-4 store from the repository's history")
    root = tmp_path_factory.mktemp("schema4")
    code = _schema_4_package(root / "code")
    path = root / "traces.db"
    proc = subprocess.run([sys.executable, "-c", _RECORD, str(code), str(path)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert sqlite_schema_version(path) == 4
    return path


@pytest.fixture
def old_store(schema_4_file: Path, tmp_path: Path) -> Path:
    path = tmp_path / "traces.db"
    shutil.copyfile(schema_4_file, path)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_readers_refuse_a_schema_4_store_and_name_pf_migrate(
        old_store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = sha256(old_store)
    assert main(["inspect", MADE, "--store", f"sqlite:///{old_store}"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("pf inspect: ") and "schema version 4" in line
    assert "pf migrate" in line
    assert sha256(old_store) == before


def test_pf_migrate_upgrades_it_and_the_readers_show_what_was_recorded(
        old_store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{old_store}"
    assert main(["migrate", "--store", url]) == 0
    assert capsys.readouterr().out == f"upgraded {str(old_store)!r} from schema 4 to 5\n"
    assert sorted(p.name for p in old_store.parent.iterdir()) == ["traces.db"]

    assert main(["inspect", MADE, "--json", "--store", url]) == 0
    view = json.loads(capsys.readouterr().out)
    assert (view["status"], view["flow_name"], view["events_lost"]) == ("succeeded", "made", 0)
    assert [e["kind"] for e in view["events"]] == [
        "node_start", "node_error", "node_retry", "node_start", "remote_call_start",
        "remote_call_success", "node_success"]
    (fetch,) = view["invocations"]
    assert [(a["outcome"], a["error"], a["backoff_ms"]) for a in fetch["attempts"]] == [
        ("error", "ConnectionError('reset')", 10.0), ("ok", None, None)]
    (call,) = view["remote_calls"]
    assert (call["skill"], call["agent_url"], call["task_id"], call["outcome"]) == (
        "echo", "http://agent.local", "task-1", "success")

    for trace_id in (RUN, RUN_BY_PROCESS):
        assert main(["inspect", trace_id, "--json", "--store", url]) == 0
        run = json.loads(capsys.readouterr().out)
        assert (run["status"], run["flow_name"]) == ("succeeded", "run")
        assert [i["node_name"] for i in run["invocations"]] == ["work"]
        assert {"node_start", "node_success"} <= {e["kind"] for e in run["events"]}
        notes = [e["extra"] for e in run["events"] if e["kind"] == "app_note"]
        assert notes == ([{"note": "before the run"}] if trace_id == RUN else [])

    assert main(["traces", "--json", "--store", url]) == 0
    assert sorted(t["trace_id"] for t in json.loads(capsys.readouterr().out)) == sorted(
        [MADE, RUN, RUN_BY_PROCESS])


def test_pf_migrate_on_a_current_store_says_so(
        old_store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{old_store}"
    assert main(["migrate", "--store", url]) == 0
    capsys.readouterr()
    assert main(["migrate", "--store", url]) == 0
    assert capsys.readouterr().out == f"{str(old_store)!r} is already at schema 5; nothing to do\n"
    assert sorted(p.name for p in old_store.parent.iterdir()) == ["traces.db"]


def _foreign(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE people (id INTEGER PRIMARY KEY, name TEXT)")
    conn.executemany("INSERT INTO people (name) VALUES (?)", [("Ada",), ("Grace",)])
    conn.commit()
    conn.close()


@pytest.mark.parametrize(("make", "phrase"), [
    (_foreign, "is not a penguiflow trace database"),
    (lambda p: p.write_bytes(b""), "holds no penguiflow traces"),
    (lambda p: p.write_text("not a database " * 200), "is not a SQLite database"),
], ids=["foreign", "empty", "text"])
def test_pf_migrate_refuses_what_is_not_a_trace_store_and_changes_nothing(
        make: object, phrase: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "traces.db"
    make(path)  # type: ignore[operator]
    before = sha256(path)
    assert main(["migrate", "--store", f"sqlite:///{path}"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("pf migrate: ") and phrase in line
    assert sha256(path) == before  # not even switched to WAL mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["traces.db"]


@pytest.mark.parametrize("url", ["sqlite:///{tmp}/nowhere/traces.db", "memory://",
                                 "redis://localhost/0"])
def test_pf_migrate_needs_a_store_to_upgrade(url: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["migrate", "--store", url.format(tmp=tmp_path)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("pf migrate: ") and "Traceback" not in line
    assert list(tmp_path.iterdir()) == []
