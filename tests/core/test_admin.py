"""The ``penguiflow-admin`` CLI (spec §19): load_state_store, render_events, main.

Stores are reached the way users reach them, through a ``module:callable`` spec. The
factories below live in this module, which pytest registers in ``sys.modules`` under
``__name__`` (``tests/`` is not a package), so ``f"{__name__}:make_store"`` resolves;
modules that must really be imported are written to ``tmp_path``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from pfcore_support import Recorder, msg, within

import penguiflow.admin as admin
from penguiflow import Message, Node, NodePolicy, RemoteBinding, StateStore, StoredEvent, create
from penguiflow.admin import load_state_store, main, render_events

NONE = NodePolicy(validate="none")
SPEC = f"{__name__}:make_store"
# Keys render_events fills in from the StoredEvent's own fields.
COLUMNS = ("event", "trace_id", "node_name", "node_id", "ts")


class MemoryStore(StateStore):
    """Rows keyed by trace id, laid out like a SQL table: the columns are kept on the
    StoredEvent and left out of the payload, so rendering has to fill them back in."""

    def __init__(self, rows: dict[str | None, list[StoredEvent]]) -> None:
        self.rows = rows
        self.bindings: list[RemoteBinding] = []

    async def save_event(self, event: StoredEvent) -> None:
        payload = {k: v for k, v in event.payload.items() if k not in COLUMNS}
        row = StoredEvent(
            event.trace_id, event.ts, event.kind, event.node_name, event.node_id, payload
        )
        self.rows.setdefault(event.trace_id, []).append(row)

    async def load_history(self, trace_id: str) -> Sequence[StoredEvent]:
        return list(self.rows.get(trace_id, ()))

    async def save_remote_binding(self, binding: RemoteBinding) -> None:
        self.bindings.append(binding)


# The "database" every store opened by a factory shares; reset per test by `database`.
DATABASE: dict[str | None, list[StoredEvent]] = {}


def make_store() -> MemoryStore:
    return MemoryStore(DATABASE)


async def make_store_async() -> MemoryStore:
    await asyncio.sleep(0)
    return MemoryStore(DATABASE)


NOT_CALLABLE = 42


class Incomplete:
    async def save_event(self, event: StoredEvent) -> None: ...

    save_remote_binding = "not a method"


def make_incomplete() -> Incomplete:
    return Incomplete()


def make_unavailable() -> MemoryStore:
    raise ConnectionError("store unavailable: check PENGUIFLOW_DSN")


class BrokenStore(MemoryStore):
    async def load_history(self, trace_id: str) -> Sequence[StoredEvent]:
        raise RuntimeError(f"history of {trace_id} is corrupt")


def make_broken() -> BrokenStore:
    return BrokenStore(DATABASE)


@pytest.fixture
def database(monkeypatch: pytest.MonkeyPatch) -> dict[str | None, list[StoredEvent]]:
    rows: dict[str | None, list[StoredEvent]] = {}
    monkeypatch.setattr(sys.modules[__name__], "DATABASE", rows)
    return rows


@pytest.fixture
async def trace_id(database: dict[str | None, list[StoredEvent]]) -> str:
    """Run a real two-node flow into a MemoryStore; return the trace id it recorded."""

    async def append(message: Message, ctx: Any, name: str) -> Message:
        return message.model_copy(update={"payload": [*message.payload, name]})

    async def a(message: Message, ctx: Any) -> Message:
        return await append(message, ctx, "a")

    async def b(message: Message, ctx: Any) -> Message:
        return await append(message, ctx, "b")

    node_a, node_b = Node(a, name="a", policy=NONE), Node(b, name="b", policy=NONE)
    recorder = Recorder()
    flow = create(node_a.to(node_b), node_b.to(), state_store=make_store(),
                  middlewares=[recorder])
    flow.run()
    message = msg([])
    try:
        await flow.emit(message)
        assert (await within(flow.fetch())).payload == ["a", "b"]
        # Middlewares run after the store save, so b's success is persisted by now.
        await recorder.wait_for("node_success", node="b", trace_id=message.trace_id)
    finally:
        await within(flow.stop())
    recorded: str = message.trace_id
    return recorded


def expected_line(event: StoredEvent) -> str:
    return json.dumps(
        {
            **event.payload,
            "event": event.kind,
            "trace_id": event.trace_id,
            "node_name": event.node_name,
            "node_id": event.node_id,
            "ts": event.ts,
        },
        sort_keys=True,
    )


def out_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    captured = capsys.readouterr()
    assert captured.err == ""
    return captured.out.splitlines()


def test_all_is_exactly_the_contract() -> None:
    assert admin.__all__ == ["load_state_store", "render_events", "main"]


# --- history ---------------------------------------------------------------------------


def test_history_prints_one_sorted_json_line_per_stored_event(
    trace_id: str, database: dict[str | None, list[StoredEvent]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    stored = database[trace_id]
    assert [(e.kind, e.node_name) for e in stored] == [
        ("node_start", "a"), ("node_success", "a"), ("node_start", "b"), ("node_success", "b"),
    ]
    assert all(not set(COLUMNS) & set(e.payload) for e in stored)

    assert main(["history", trace_id, "--state-store", SPEC]) == 0

    lines = out_lines(capsys)
    assert lines == [expected_line(e) for e in stored]
    for line, event in zip(lines, stored, strict=True):
        record = json.loads(line)
        assert list(record) == sorted(record)
        assert record["event"] == event.kind
        assert record["trace_id"] == trace_id
        assert record["node_name"] == event.node_name
        assert record["node_id"] == event.node_id
        assert record["ts"] == event.ts
        assert record["q_depth_in"] == event.payload["q_depth_in"]


@pytest.mark.parametrize(("tail", "kept"), [("2", 2), ("1", 1), ("99", 4), ("0", 0), ("-3", 0)])
def test_history_tail_keeps_the_last_n_events(
    trace_id: str, database: dict[str | None, list[StoredEvent]],
    capsys: pytest.CaptureFixture[str], tail: str, kept: int,
) -> None:
    assert main(["history", trace_id, "--state-store", SPEC, "--tail", tail]) == 0
    stored = database[trace_id]
    assert out_lines(capsys) == [expected_line(e) for e in stored[len(stored) - kept:]]


def test_history_of_an_unknown_trace_prints_nothing(
    database: dict[str | None, list[StoredEvent]], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["history", "missing", "--state-store", SPEC]) == 0
    assert out_lines(capsys) == []


def test_an_async_factory_is_awaited(
    trace_id: str, database: dict[str | None, list[StoredEvent]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["history", trace_id, "--state-store", f"{__name__}:make_store_async"]) == 0
    assert out_lines(capsys) == [expected_line(e) for e in database[trace_id]]


# --- replay ----------------------------------------------------------------------------


def test_replay_prints_a_header_then_the_events(
    trace_id: str, database: dict[str | None, list[StoredEvent]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["replay", trace_id, "--state-store", SPEC]) == 0
    stored = database[trace_id]
    assert out_lines(capsys) == [
        f"# replay trace={trace_id} events=4",
        *(expected_line(e) for e in stored),
    ]


def test_replay_header_counts_the_tailed_events(
    trace_id: str, database: dict[str | None, list[StoredEvent]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["replay", trace_id, "--state-store", SPEC, "--tail", "1"]) == 0
    assert out_lines(capsys) == [
        f"# replay trace={trace_id} events=1",
        expected_line(database[trace_id][-1]),
    ]


def test_replay_of_an_unknown_trace_says_so(
    database: dict[str | None, list[StoredEvent]], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["replay", "missing", "--state-store", SPEC]) == 0
    assert out_lines(capsys) == ["# trace missing has no stored events"]


def test_replay_sleeps_delay_seconds_between_events_only(
    trace_id: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []
    pauses: list[tuple[float, int]] = []

    async def fake_sleep(delay: float) -> None:
        seen.extend(capsys.readouterr().out.splitlines())
        pauses.append((delay, len(seen)))

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    assert main(["replay", trace_id, "--state-store", SPEC, "--delay", "0.25"]) == 0
    seen.extend(capsys.readouterr().out.splitlines())
    # Header and event 1, then a pause before each of events 2, 3 and 4; none after.
    assert pauses == [(0.25, 2), (0.25, 3), (0.25, 4)]
    assert len(seen) == 5


def test_replay_delay_defaults_to_zero_and_does_not_pause(
    trace_id: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    slept: list[float] = []

    async def fake_sleep(delay: float) -> None:
        slept.append(delay)

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    assert main(["replay", trace_id, "--state-store", SPEC]) == 0
    assert slept == []
    assert len(out_lines(capsys)) == 5


# --- render_events ---------------------------------------------------------------------


class Opaque:
    def __str__(self) -> str:
        return "<opaque>"


def test_render_fills_missing_fields_only_and_existing_payload_keys_win() -> None:
    event = StoredEvent(
        "t1", 12.5, "node_start", "a", "a-id",
        {"event": "custom", "node_name": None, "z": 1, "A": [1, 2]},
    )
    (line,) = render_events([event])
    assert line == (
        '{"A": [1, 2], "event": "custom", "node_id": "a-id", "node_name": null, '
        '"trace_id": "t1", "ts": 12.5, "z": 1}'
    )
    assert event.payload == {"event": "custom", "node_name": None, "z": 1, "A": [1, 2]}


def test_render_uses_str_for_values_json_cannot_encode() -> None:
    when = dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    event = StoredEvent(None, 1.0, "k", None, None, {"when": when, "obj": Opaque()})
    assert json.loads(render_events([event])[0]) == {
        "event": "k", "node_id": None, "node_name": None, "trace_id": None, "ts": 1.0,
        "obj": "<opaque>", "when": "2024-01-02 03:04:05+00:00",
    }


@pytest.mark.parametrize(
    ("tail", "kept"), [(None, [0, 1, 2]), (2, [1, 2]), (5, [0, 1, 2]), (0, []), (-1, [])]
)
def test_render_tail(tail: int | None, kept: list[int]) -> None:
    events = [StoredEvent("t", float(i), "k", None, None, {"i": i}) for i in range(3)]
    assert [json.loads(line)["i"] for line in render_events(events, tail=tail)] == kept


def test_render_of_no_events_is_empty() -> None:
    assert render_events([]) == []
    assert render_events([], tail=3) == []


# --- load_state_store ------------------------------------------------------------------


async def test_load_state_store_calls_the_factory(
    database: dict[str | None, list[StoredEvent]],
) -> None:
    store = await load_state_store(SPEC)
    assert isinstance(store, MemoryStore)
    assert store.rows is database
    assert isinstance(await load_state_store(f"{__name__}:make_store_async"), MemoryStore)


@pytest.mark.parametrize(
    "spec", ["", "no_colon", f"{__name__}.make_store", ":make_store", f"{__name__}:", ":"]
)
async def test_a_spec_without_both_sides_is_a_value_error(spec: str) -> None:
    with pytest.raises(ValueError, match=r"expected the form 'package\.module:callable'"):
        await load_state_store(spec)


async def test_a_non_callable_attribute_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="object of type int, which is not callable"):
        await load_state_store(f"{__name__}:NOT_CALLABLE")


async def test_a_store_lacking_the_methods_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="lacking load_history, save_remote_binding") as info:
        await load_state_store(f"{__name__}:make_incomplete")
    assert "subclass penguiflow.state.StateStore" in str(info.value)


async def test_an_unknown_module_or_attribute_names_the_spec() -> None:
    with pytest.raises(ModuleNotFoundError, match="PYTHONPATH") as info:
        await load_state_store("no_such_pkg_for_admin.stores:make")
    assert info.value.name == "no_such_pkg_for_admin"
    with pytest.raises(AttributeError, match="has no attribute 'make_nothing'"):
        await load_state_store(f"{__name__}:make_nothing")


async def test_a_module_on_sys_path_is_imported_and_dotted_attributes_resolve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"admin_stores_{os.getpid()}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(f"""
        import sys
        _tests = sys.modules[{__name__!r}]

        class Stores:
            @staticmethod
            async def make():
                return _tests.make_store()
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    try:
        assert isinstance(await load_state_store(f"{name}:Stores.make"), MemoryStore)
    finally:
        sys.modules.pop(name, None)


# --- main: errors and where it may run -------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_colon", "error: invalid state store spec 'no_colon': expected the form "
                     "'package.module:callable', e.g. 'myapp.stores:make_store'"),
        (f"{__name__}:NOT_CALLABLE",
         f"error: '{__name__}:NOT_CALLABLE' names an object of type int, which is not callable"),
        (f"{__name__}:make_incomplete",
         f"error: '{__name__}:make_incomplete' returned an object of type Incomplete "
         "lacking load_history"),
        (f"{__name__}:make_unavailable", "error: store unavailable: check PENGUIFLOW_DSN"),
        (f"{__name__}:make_broken", "error: history of t1 is corrupt"),
    ],
)
@pytest.mark.parametrize("command", ["history", "replay"])
def test_handler_exceptions_print_error_and_return_1(
    database: dict[str | None, list[StoredEvent]], capsys: pytest.CaptureFixture[str],
    command: str, spec: str, message: str,
) -> None:
    assert main([command, "t1", "--state-store", spec]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(message)
    assert captured.err.endswith("\n")
    assert captured.err.count("\n") == 1


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["bogus"],
        ["history"],
        ["history", "t1"],
        ["history", "t1", "--state-store", SPEC, "--tail", "x"],
        ["replay", "t1", "--state-store", SPEC, "--delay", "soon"],
        ["replay", "t1", "--state-store", SPEC, "--delay", "-1"],
        ["replay", "t1", "--state-store", SPEC, "--delay", "nan"],
        ["history", "t1", "--state-store", SPEC, "--delay", "1"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "usage: penguiflow-admin" in capsys.readouterr().err


def test_help_names_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: penguiflow-admin")
    assert "history" in out and "replay" in out


async def test_main_runs_from_a_worker_thread(
    trace_id: str, database: dict[str | None, list[StoredEvent]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert await asyncio.to_thread(main, ["history", trace_id, "--state-store", SPEC]) == 0
    assert out_lines(capsys) == [expected_line(e) for e in database[trace_id]]


async def test_main_inside_a_running_loop_fails_with_the_fix(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["history", "t1", "--state-store", SPEC]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert "asyncio.to_thread(main, argv)" in err


# --- the console script ----------------------------------------------------------------

CLI_STORE = """
from penguiflow.state import StateStore, StoredEvent


class FileStore(StateStore):
    def __init__(self):
        self.rows = [StoredEvent("t1", 1.5, "node_start", "a", "a-id", {"x": 1})]

    async def save_event(self, event):
        self.rows.append(event)

    async def load_history(self, trace_id):
        return [e for e in self.rows if e.trace_id == trace_id]

    async def save_remote_binding(self, binding):
        pass


def make():
    return FileStore()
"""


@pytest.fixture
def cli_dir(tmp_path: Path) -> Path:
    (tmp_path / "cli_store.py").write_text(CLI_STORE)
    return tmp_path


def test_console_script_imports_specs_from_the_working_directory(cli_dir: Path) -> None:
    script = Path(sys.executable).with_name("penguiflow-admin")
    assert script.exists()

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        return subprocess.run([str(script), *argv], cwd=cli_dir, env=env, capture_output=True,
                              text=True, timeout=60, check=False)

    proc = run("replay", "t1", "--state-store", "cli_store:make")
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout == (
        "# replay trace=t1 events=1\n"
        '{"event": "node_start", "node_id": "a-id", "node_name": "a", "trace_id": "t1", '
        '"ts": 1.5, "x": 1}\n'
    )
    proc = run("history", "t1", "--state-store", "cli_store:nope")
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: 'cli_store' has no attribute 'nope'")
    assert run("history").returncode == 2


def test_main_leaves_sys_path_as_it_found_it(
    cli_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(cli_dir)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(cli_dir))])
    monkeypatch.delitem(sys.modules, "cli_store", raising=False)
    before = list(sys.path)
    try:
        assert main(["history", "t1", "--state-store", "cli_store:make"]) == 0
    finally:
        sys.modules.pop("cli_store", None)
    assert sys.path == before
    assert json.loads(out_lines(capsys)[0])["x"] == 1


# --- trace id prefixes ---------------------------------------------------------------


class ResolvingStore(MemoryStore):
    """A store that resolves trace id prefixes, as PenguiFlow's own stores do."""

    async def resolve_trace_id(self, prefix: str) -> list[str]:
        return sorted(t for t in self.rows if t is not None and t.startswith(prefix))[:10]


def make_resolving_store() -> ResolvingStore:
    return ResolvingStore(DATABASE)


RESOLVING = f"{__name__}:make_resolving_store"


def test_history_resolves_a_unique_prefix(
    trace_id: str, database: dict[str | None, list[StoredEvent]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["history", trace_id[:6], "--state-store", RESOLVING]) == 0
    assert out_lines(capsys) == [expected_line(e) for e in database[trace_id]]
    assert main(["replay", trace_id[:6], "--state-store", RESOLVING]) == 0
    assert out_lines(capsys)[0] == f"# replay trace={trace_id} events=4"


def test_an_exact_id_prints_what_it_printed_before(
    trace_id: str, database: dict[str | None, list[StoredEvent]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Another trace whose id extends this one: the exact id still means this one.
    database[trace_id + "-retry"] = database[trace_id][:1]
    assert main(["history", trace_id, "--state-store", SPEC]) == 0
    plain = out_lines(capsys)
    assert main(["history", trace_id, "--state-store", RESOLVING]) == 0
    assert out_lines(capsys) == plain == [expected_line(e) for e in database[trace_id]]


def test_an_ambiguous_prefix_is_an_error_listing_the_candidates(
    trace_id: str, database: dict[str | None, list[StoredEvent]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    database["ab12"] = database["ab34"] = database[trace_id][:1]
    for command in ("history", "replay"):
        assert main([command, "ab", "--state-store", RESOLVING]) == 1
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err == ("error: trace id prefix 'ab' is ambiguous (2 traces match: "
                                "ab12, ab34); give more characters\n")


def test_ten_candidates_may_mean_more(
    trace_id: str, database: dict[str | None, list[StoredEvent]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    for n in range(12):
        database[f"ff{n:02d}"] = database[trace_id][:1]
    assert main(["history", "ff", "--state-store", RESOLVING]) == 1
    err = capsys.readouterr().err
    assert "ambiguous (10+ traces match: ff00, ff01," in err and "ff09)" in err


def test_an_unknown_prefix_is_an_error_for_history_and_a_comment_for_replay(
    trace_id: str, capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["history", "zz", "--state-store", RESOLVING]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: no trace id starts with 'zz' in this store")
    # Spec §19: replay of a trace without events says so and succeeds.
    assert main(["replay", "zz", "--state-store", RESOLVING]) == 0
    assert out_lines(capsys) == ["# trace zz has no stored events"]


def test_a_store_that_cannot_resolve_keeps_the_2_1_behaviour(
    trace_id: str, capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["history", trace_id[:6], "--state-store", SPEC]) == 0
    assert out_lines(capsys) == []
