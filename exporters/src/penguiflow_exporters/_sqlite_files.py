"""The SQLite file under a store: how to read it without writing, and what its errors mean.

What the store, its writers and ``pf migrate`` share about the file itself, apart
from the schema (``_sqlite_write``): the URI that opens a file read-only without
creating anything beside it (:func:`read_only_uri`), the side files that say what
state a writer left it in (``-wal``, ``-shm``, ``-journal``), the text factory of
reading connections, and the translation of an SQLite error code into the store's
errors (:func:`translate`: :class:`~penguiflow.state.StoreUnavailable` when trying
again later may work, :class:`~penguiflow_exporters.processor.StoreRefused` when
the file is not or no longer a usable database).
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from urllib.parse import quote

from penguiflow.state import StateStoreError, StoreUnavailable

from ._sqlite_write import BUSY_TIMEOUT_MS, schema_version_of
from .processor import StoreRefused

__all__ = ["PATH_FIX", "has_hot_journal", "is_wal", "read_only_uri", "schema_version",
           "text_factory", "translate", "wal_size"]

#: How to fix a path the store cannot use (appended to its errors).
PATH_FIX = ("pass a writable path: SQLiteStateStore('/path/to/traces.db') or "
            "PENGUIFLOW_STORE=sqlite:////path/to/traces.db")

_UNAVAILABLE_CODES = frozenset({
    sqlite3.SQLITE_PERM, sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_READONLY,
    sqlite3.SQLITE_IOERR, sqlite3.SQLITE_FULL, sqlite3.SQLITE_CANTOPEN,
})


def text_factory(data: bytes) -> str:
    """A stored TEXT value (the reading connections' text factory): what is not
    UTF-8 (SQLite stores what another tool gives it) has U+FFFD in place, where
    sqlite3 failed the whole query (every trace of a list, for one bad row)."""
    return data.decode("utf-8", "replace")


def translate(path: str, code: int | None, message: str) -> StateStoreError:
    """The store's error for an SQLite error code (StoreUnavailable: try again later)."""
    primary = None if code is None else code & 0xFF  # extended codes keep it in the low byte
    if primary in _UNAVAILABLE_CODES:
        if primary in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            fix = (f"another connection held the write lock for more than "
                   f"{BUSY_TIMEOUT_MS / 1000:g} s")
        elif primary in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR):
            fix = "check the disk (full or failing)"
        else:
            fix = PATH_FIX
        return StoreUnavailable(f"SQLite store {path!r}: {message}; {fix}")
    if primary == sqlite3.SQLITE_NOTADB:
        return StoreRefused(f"SQLite store {path!r}: {message}; the file is not a "
                            f"penguiflow trace database, {PATH_FIX}")
    if primary == sqlite3.SQLITE_CORRUPT:
        return StoreRefused(f"SQLite store {path!r}: {message}; the file is damaged (cut "
                            "short or overwritten): restore it from a copy, or use another path")
    return StateStoreError(f"SQLite store {path!r}: {message}")


def has_hot_journal(path: Path) -> bool:
    """Whether a non-empty ``-journal`` lies beside ``path`` (a writer in rollback-journal
    mode stopped mid-transaction; a read-only connection fails on it, "attempt to write
    a readonly database", which names the wrong fix)."""
    try:
        return (path.with_name(path.name + "-journal").stat().st_size > 0
                and not is_wal(path))
    except OSError:
        return False


def is_wal(path: Path) -> bool:
    """Whether the SQLite file at ``path`` is in WAL mode (header bytes 18-19 are 2).

    False when it cannot be read or is no SQLite file: opening it then reports why.
    """
    try:
        with open(path, "rb") as file:
            header = file.read(100)
    except OSError:
        return False
    return header.startswith(b"SQLite format 3\x00") and header[18:20] == b"\x02\x02"


def wal_size(path: Path) -> int | None:
    """The size of the ``-wal`` file beside ``path``; None when there is none."""
    try:
        return os.stat(f"{path}-wal").st_size
    except OSError:
        return None


def read_only_uri(path: Path, *, recovering: bool = False) -> tuple[str, bool]:
    """The URI that reads ``path`` without creating anything beside it, and whether it
    is ``immutable``.

    ``mode=ro`` alone makes SQLite create the ``-wal`` and ``-shm`` files of a
    WAL-mode file when they are missing. So a WAL-mode file without a ``-wal``
    (or with an empty one and no ``-shm``: nothing un-checkpointed) is opened
    ``immutable=1``: no lock, no side file; the caller reopens it once a writer
    shows up (see ``SQLiteStateStore._connection``). With both ``-wal`` and
    ``-shm`` (a live writer, even one that just truncated its WAL) ``mode=ro``
    creates nothing and reads under the writer's locks. A ``-wal`` holding writes with no
    ``-shm`` (its writer did not close) cannot be read without creating the
    ``-shm``: :class:`StoreUnavailable` naming the fix, unless ``recovering``
    (``pf migrate``, about to open a writer that recovers them anyway).
    """
    base = f"file:{quote(str(path.resolve()))}?mode=ro"
    if not is_wal(path):
        return base, False
    wal = wal_size(path)
    if wal is not None and os.path.exists(f"{path}-shm"):
        # Both side files (a live writer, even right after it truncated its WAL):
        # mode=ro creates nothing, and reads under the writer's locks, never torn.
        return base, False
    if not wal:
        return base + "&immutable=1", True
    if recovering:
        return base, False
    raise StoreUnavailable(
        f"SQLite store {str(path)!r}: '{path}-wal' holds writes its writer never "
        f"checkpointed (it did not close) and no '{path}-shm' is beside it, so reading "
        f"would create one; run `pf migrate --store sqlite:///{path}` (or any flow with "
        "this store) once to recover them, then read it")


def schema_version(path: str | os.PathLike[str]) -> int | None:
    """The schema version of the SQLite file at ``path``, read without writing (``mode=ro``).

    Returns 0 for a database without tables (an empty file included) and None for one
    with tables but no ``schema_version`` (not a penguiflow store). Creates nothing
    beside a WAL-mode file, except the ``-shm`` of one whose writer did not close
    (``pf migrate`` reads this before a writer recovers that file).

    Raises:
        sqlite3.Error: the file cannot be read or is not a SQLite database.
    """
    uri, _ = read_only_uri(Path(path), recovering=True)
    conn = sqlite3.connect(uri, uri=True)
    try:
        return schema_version_of(conn)
    finally:
        conn.close()
