"""Readers never write (issue 14 §4).

``pf inspect``, ``pf traces``, ``pf tail``, ``pf export`` and
``open_store(..., readonly=True)`` never create or alter anything: pointed at a
foreign SQLite database, an empty file or a path where nothing exists, they
refuse with one clear line (exit 2 for ``pf``) and leave the file byte-for-byte
unchanged (checked with its sha256 before and after), with no ``-wal``,
``-shm`` or ``-journal`` file beside it, and create nothing at a missing path.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from penguiflow.state import StateStoreError, StoredEvent, StoreUnavailable
from penguiflow_exporters import open_store
from penguiflow_inspector.cli import main

#: Each reading command, with a trace id where it takes one.
READERS = {
    "inspect": ["inspect", "abc", "--plain"],
    "traces": ["traces"],
    "tail": ["tail", "abc"],
    "export": ["export", "abc", "--json", "-"],
}
SIDE_FILES = ("-wal", "-shm", "-journal")


def foreign_database(path: Path) -> None:
    """Somebody else's SQLite database: a table ``people`` with a few rows."""
    conn = sqlite3.connect(path)
    try:
        conn.execute("CREATE TABLE people (id INTEGER PRIMARY KEY, name TEXT, born INTEGER)")
        conn.executemany("INSERT INTO people (name, born) VALUES (?, ?)",
                         [("Ada", 1815), ("Grace", 1906), ("Edsger", 1930)])
        conn.commit()
    finally:
        conn.close()


def foreign_wal_database(path: Path) -> None:
    """Somebody else's database in WAL mode, closed: no ``-wal``/``-shm`` beside it, but
    ``mode=ro`` alone would create both."""
    foreign_database(path)
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode = WAL").fetchone() == ("wal",)
    finally:
        conn.close()
    assert listing(path.parent) == [path.name]


def empty_file(path: Path) -> None:
    path.write_bytes(b"")


#: target name -> (how to make it, a phrase the refusal must contain)
TARGETS: dict[str, tuple[Callable[[Path], None] | None, str]] = {
    "foreign": (foreign_database, "is not a penguiflow trace database"),
    "foreign-wal": (foreign_wal_database, "is not a penguiflow trace database"),
    "empty": (empty_file, "holds no penguiflow traces"),
    "missing": (None, "no trace store at"),
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(params=sorted(TARGETS))
def target(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Path]:
    make, _ = TARGETS[request.param]
    path = tmp_path / "store" / "traces.db"
    if make is not None:
        path.parent.mkdir()
        make(path)
    return request.param, path


@pytest.mark.parametrize("command", sorted(READERS))
def test_a_reader_refuses_in_one_line_and_leaves_the_file_unchanged(
        command: str, target: tuple[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    kind, path = target
    before = sha256(path) if path.exists() else None
    folder = path.parent if path.parent.exists() else path.parent.parent
    files_before = listing(folder)

    code = main([*READERS[command], "--store", f"sqlite:///{path}"])

    captured = capsys.readouterr()
    assert code == 2, captured.err
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"pf {command}: "), captured.err
    assert TARGETS[kind][1] in lines[0] and "Traceback" not in captured.err
    assert captured.out == ""
    assert listing(folder) == files_before  # no side file, nothing created
    if before is None:
        assert not path.exists() and not path.parent.exists()
    else:
        assert sha256(path) == before
        assert not any(path.with_name(path.name + s).exists() for s in SIDE_FILES)


async def test_open_store_readonly_refuses_with_one_line_and_changes_nothing(
        target: tuple[str, Path]) -> None:
    kind, path = target
    before = sha256(path) if path.exists() else None
    store = open_store(f"sqlite:///{path}", readonly=True)
    try:
        with pytest.raises(StateStoreError) as info:
            await store.open()
        with pytest.raises(StateStoreError):  # a query opens it first: the same refusal
            await store.list_traces()
    finally:
        await store.close()
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    if kind == "missing":
        assert isinstance(info.value, StoreUnavailable) and "does not exist" in message
        assert not path.exists() and not path.parent.exists()
    else:
        assert TARGETS[kind][1] in message
        assert sha256(path) == before
        assert listing(path.parent) == ["traces.db"]


async def test_a_read_only_store_refuses_writes(tmp_path: Path) -> None:
    path = tmp_path / "traces.db"
    async with open_store(f"sqlite:///{path}") as store:  # a real, writable one first
        await store.save_events([_event()])
    before = sha256(path)
    reader = open_store(f"sqlite:///{path}", readonly=True)
    try:
        assert [s.trace_id for s in await reader.list_traces()] == [TRACE]
        with pytest.raises(StoreUnavailable, match="readonly"):
            await reader.save_event(_event(seq=2))
    finally:
        await reader.close()
    assert sha256(path) == before


TRACE = "5afe" * 8


def _event(seq: int = 1) -> StoredEvent:
    return StoredEvent(TRACE, 1_700_000_000.0 + seq, "node_start", "n", "n", {},
                       invocation_id="a" * 16, flow_id="f", seq=seq, flow_name="safe")


def _to_wal(path: Path) -> None:
    """Leave a closed store in WAL mode (copied while a writer had it, say): no side
    file beside it, but ``mode=ro`` alone would create ``-wal`` and ``-shm``."""
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode = WAL").fetchone() == ("wal",)
    finally:
        conn.close()


@pytest.mark.parametrize("journal", ["rollback", "wal"])
@pytest.mark.parametrize("command", ["inspect", "traces"])
def test_reading_a_real_store_creates_no_file_beside_it(
        command: str, journal: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "traces.db"

    async def record() -> None:
        async with open_store(f"sqlite:///{path}") as store:
            await store.save_events([_event()])

    asyncio.run(record())
    if journal == "wal":
        _to_wal(path)
    assert listing(tmp_path) == ["traces.db"]  # the writer cleaned up after itself
    before = sha256(path)
    argv = ["inspect", TRACE, "--plain"] if command == "inspect" else ["traces"]
    assert main([*argv, "--store", f"sqlite:///{path}"]) == 0
    assert TRACE in capsys.readouterr().out
    assert sha256(path) == before
    assert listing(tmp_path) == ["traces.db"]


async def test_a_read_only_store_on_a_wal_file_creates_nothing_and_sees_a_later_writer(
        tmp_path: Path) -> None:
    path = tmp_path / "traces.db"
    async with open_store(f"sqlite:///{path}") as store:
        await store.save_events([_event()])
    _to_wal(path)
    before = sha256(path)
    reader = open_store(f"sqlite:///{path}", readonly=True)
    try:
        assert [s.trace_id for s in await reader.list_traces()] == [TRACE]
        assert listing(tmp_path) == ["traces.db"] and sha256(path) == before
        # A writer opens the file (WAL, side files), writes and closes: the reader,
        # still open, reads the new trace then, and after the writer is gone.
        async with open_store(f"sqlite:///{path}") as writer:
            await writer.save_events([StoredEvent("later", 1_700_000_100.0, "node_start",
                                                  "n", "n", {}, invocation_id="b" * 16,
                                                  flow_id="g", seq=1)])
            await writer.flush()
            assert {s.trace_id for s in await reader.list_traces()} == {TRACE, "later"}
        assert {s.trace_id for s in await reader.list_traces()} == {TRACE, "later"}
        assert len(await reader.load_history("later")) == 1
    finally:
        await reader.close()


def _crashed_writer(path: Path, folder: Path) -> Path:
    """A copy of the store at ``path``, in ``folder``, as a writer that died left it:
    writes in its ``-wal`` not checkpointed, and no ``-shm``."""
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        conn.execute("UPDATE traces SET flow_name = 'recovered'")
        conn.commit()
        folder.mkdir()
        for suffix in ("", "-wal"):  # copied while the connection is open: a crash
            (folder / (path.name + suffix)).write_bytes(
                path.with_name(path.name + suffix).read_bytes())
    finally:
        conn.close()
    crashed = folder / path.name
    assert listing(folder) == ["traces.db", "traces.db-wal"]
    assert crashed.with_name("traces.db-wal").stat().st_size > 0
    return crashed


def test_a_wal_its_writer_did_not_close_is_refused_and_migrate_recovers_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "traces.db"

    async def record() -> None:
        async with open_store(f"sqlite:///{path}") as store:
            await store.save_events([_event()])

    asyncio.run(record())
    crashed = _crashed_writer(path, tmp_path / "crashed")
    url = f"sqlite:///{crashed}"
    before = {name: sha256(crashed.parent / name) for name in listing(crashed.parent)}
    # Reading it would create its -shm: refused (exit 1: the store exists, but
    # cannot be read as it is), saying how to recover it.
    assert main(["traces", "--store", url]) == 1
    line, = capsys.readouterr().err.splitlines()
    assert "did not close" in line and f"pf migrate --store {url}" in line
    assert {name: sha256(crashed.parent / name) for name in listing(crashed.parent)} == before
    assert main(["migrate", "--store", url]) == 0
    capsys.readouterr()
    assert main(["traces", "--json", "--store", url]) == 0
    assert '"flow_name": "recovered"' in capsys.readouterr().out


@pytest.mark.parametrize("command", sorted(READERS))
def test_a_directory_is_not_a_trace_store(
        command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "traces.db"
    folder.mkdir()
    assert main([*READERS[command], "--store", f"sqlite:///{folder}"]) == 2
    line, = capsys.readouterr().err.splitlines()
    assert line.startswith(f"pf {command}: {str(folder)!r} is a directory, not a trace store")
    assert listing(tmp_path) == ["traces.db"] and listing(folder) == []


async def test_open_store_readonly_refuses_a_directory(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path}", readonly=True)
    try:
        with pytest.raises(StateStoreError, match="is a directory, not a trace store") as info:
            await store.open()
    finally:
        await store.close()
    assert not isinstance(info.value, StoreUnavailable)  # refused: not a store, not down
    assert listing(tmp_path) == []


async def test_a_reader_goes_on_after_its_file_was_away_a_moment(tmp_path: Path) -> None:
    # A reopen that failed (the file deleted, about to be replaced) left the store
    # "closed; create a new one" for good: pf tail ended at a rotation.
    path = tmp_path / "traces.db"
    async with open_store(f"sqlite:///{path}") as store:
        await store.save_events([_event()])
    reader = open_store(f"sqlite:///{path}", readonly=True)
    try:
        assert [s.trace_id for s in await reader.list_traces()] == [TRACE]
        path.unlink()
        with pytest.raises(StateStoreError):
            await reader.list_traces()
        async with open_store(f"sqlite:///{path}") as store:  # the file is back
            await store.save_events([StoredEvent("later", 1_700_000_100.0, "node_start", "n",
                                                 "n", {}, invocation_id="b" * 16,
                                                 flow_id="g", seq=1)])
        assert [s.trace_id for s in await reader.list_traces()] == ["later"]
    finally:
        await reader.close()
    with pytest.raises(StoreUnavailable, match="is closed"):
        await reader.list_traces()


async def test_a_reader_beside_a_live_writer_reads_under_its_locks(tmp_path: Path) -> None:
    # Right after the writer truncated its WAL (-wal empty, -shm there) the reader
    # took the file for writer-less and read it immutable: without locks, a checkpoint
    # during a long read could tear it. Both side files there: mode=ro, locked reads.
    path = tmp_path / "traces.db"
    async with open_store(f"sqlite:///{path}") as writer:
        await writer.save_events([_event()])
        await writer.flush()
        conn = sqlite3.connect(path)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()
        assert path.with_name("traces.db-wal").stat().st_size == 0
        assert path.with_name("traces.db-shm").exists()
        reader = open_store(f"sqlite:///{path}", readonly=True)
        try:
            assert [s.trace_id for s in await reader.list_traces()] == [TRACE]
            assert reader._immutable is None  # type: ignore[attr-defined]
        finally:
            await reader.close()
