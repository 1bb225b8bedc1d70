"""``pf migrate``: upgrade a trace store to the schema this penguiflow-exporters writes.

The readers (``pf inspect``, ``pf traces``, ``pf tail``, ``pf export``, the
terminal UI) never write, so they refuse a store at an older schema version and
say to run this. ``pf migrate`` opens the store with a writing store
(``open_store(url)``, then ``open()``: opening is what migrates) and closes it,
then prints one line saying what it did: ``upgraded '<path>' from schema 4 to 5``
or ``'<path>' is already at schema 5; nothing to do``.

SQLite: the file's version is read first, through a read-only ``sqlite3``
connection (``mode=ro``), so that a missing, empty or foreign file is refused
without ever being opened for writing (a writing store sets its pragmas, WAL
mode among them, before it looks at the tables), and so that the line can say
which version it upgraded from. Postgres: the schema's version is read first on a
read-only session (``stored_schema_version``), so a database with no store in
that schema (``?schema=NAME`` in the URL selects one other than ``penguiflow``)
is refused, exit 2, instead of getting an empty store, and the line says which
version it upgraded from.

Every failure is a :class:`~penguiflow_inspector._store.CommandError`: exit 2
when the URL names something that is not a trace store this version can
upgrade, 1 when the store cannot be reached or written.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TextIO, TypeVar

from penguiflow.state import StateStoreError, StoreUnavailable
from penguiflow_exporters import open_store
from penguiflow_exporters.sqlite import schema_version

from ._store import EXIT_OK, EXIT_USAGE, CommandError, one_line, redact, store_url

__all__ = ["add_arguments", "migrate", "run", "sqlite_schema_version"]

_T = TypeVar("_T")

_STORE_HELP = ("the store to upgrade: sqlite:///path.db or postgresql://user@host:port/db "
               "(?schema=NAME for a Postgres schema other than penguiflow) "
               "(default: $PENGUIFLOW_STORE, else sqlite:///.penguiflow/traces.db)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``pf migrate``'s arguments to its sub-parser."""
    parser.add_argument("--store", metavar="URL", help=_STORE_HELP)


def run(ns: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Run ``pf migrate``; prints what it did on ``out``. Raises :class:`CommandError`."""
    out.write(asyncio.run(migrate(store_url(ns.store))) + "\n")
    return EXIT_OK


def sqlite_schema_version(path: Path) -> int | None:
    """The schema version of the SQLite file at ``path``; it only reads (``mode=ro``:
    a writing store leaves its file in rollback-journal mode on close, so nothing is
    created beside it). See ``penguiflow_exporters.sqlite.schema_version``."""
    return schema_version(path)


async def migrate(url: str) -> str:
    """Upgrade the store at ``url`` to the current schema; returns what was done, one line.

    Raises:
        CommandError: (exit 2) ``memory://`` or an unsupported URL; a SQLite path
            with nothing there, an empty or foreign file, or a version the store
            cannot upgrade (the file is left as it was); (exit 1) the store cannot
            be reached, opened or written.
    """
    try:
        store = open_store(url)
    except ValueError as exc:
        raise CommandError(str(exc).replace(url, redact(url)), EXIT_USAGE) from None
    if url.startswith("memory:"):
        raise CommandError("memory:// has nothing to migrate (it starts empty in every "
                           "process); pass --store sqlite:///... or postgresql://...",
                           EXIT_USAGE)
    path = getattr(store, "path", None)
    before = _sqlite_before(path) if isinstance(path, Path) else None
    version_of = getattr(store, "stored_schema_version", None)  # Postgres
    if version_of is not None:
        before = await _store_step(version_of, url)
        if not before:
            await store.close()
            schema = getattr(store, "schema", "penguiflow")
            raise CommandError(
                f"no penguiflow trace store in Postgres schema {schema!r} at {redact(url)}"
                f"{' (an empty schema_version table)' if before == 0 else ''}: nothing to "
                "migrate, and nothing was created; pass --store URL (with ?schema=NAME for "
                "another schema) or set PENGUIFLOW_STORE to the store to upgrade",
                EXIT_USAGE)

    async def open_and_close() -> bool:
        store_log = logging.getLogger("penguiflow_exporters.store")
        store_log.addFilter(_not_the_index_warning)  # this command is its fix
        try:
            opener = getattr(store, "open", None)
            if opener is not None:  # every durable store: opening creates or migrates
                await opener()
            # Postgres: the bindings indexes of an older version 5 (an open leaves
            # them: rebuilding takes the table's lock, which only this command may).
            upgrade = getattr(store, "upgrade_binding_indexes", None)
            if upgrade is None:
                return False
            try:
                return bool(await upgrade())
            except StoreUnavailable:
                raise
            except StateStoreError as exc:  # the role may not: schema current, indexes not
                raise CommandError(one_line(exc).replace(url, redact(url))) from None
        finally:
            store_log.removeFilter(_not_the_index_warning)
            await store.close()

    indexes = await _store_step(open_and_close, url)
    if version_of is not None:
        after = await _store_step(version_of, url)
        where = f"{redact(url)} (Postgres schema {getattr(store, 'schema', '?')!r})"
    elif isinstance(path, Path):
        after = sqlite_schema_version(path)
        where = repr(str(path))
    else:
        return (f"{redact(url)} is at the schema this penguiflow-exporters writes "
                "(opening it with a writing store upgrades an older one)")
    rebuilt = (" and rebuilt its remote-bindings indexes (ids of any length are stored "
               "now)") if indexes else ""
    if after == before:
        if indexes:
            return f"{where}: schema {after}; rebuilt its remote-bindings indexes (ids of " \
                   "any length are stored now)"
        return f"{where} is already at schema {after}; nothing to do"
    return f"upgraded {where} from schema {before} to {after}{rebuilt}"


def _not_the_index_warning(record: logging.LogRecord) -> bool:
    """Drop the store's "run pf migrate" warning while pf migrate opens the store."""
    return record.getMessage() != "state_store_bindings_index_old"


async def _store_step(step: Callable[[], Awaitable[_T]], url: str) -> _T:
    """``await step()``, the store's errors as :class:`CommandError`: exit 1 when it
    cannot be reached, 2 when it refuses (a version it cannot upgrade, unchanged)."""
    try:
        return await step()
    except StoreUnavailable as exc:
        raise CommandError(f"trace store: {one_line(exc).replace(url, redact(url))}") from None
    except StateStoreError as exc:  # refused: a version it cannot upgrade (file unchanged)
        raise CommandError(one_line(exc).replace(url, redact(url)), EXIT_USAGE) from None
    except OSError as exc:
        raise CommandError(
            f"cannot reach the trace store {redact(url)}: {one_line(exc)}") from None


def _sqlite_before(path: Path) -> int:
    """The version of a SQLite store that ``pf migrate`` may open for writing.

    Raises:
        CommandError: (exit 2) nothing at ``path``, an empty or foreign file;
            (exit 1) it cannot be read.
    """
    if not path.exists():
        raise CommandError(f"no trace store at {str(path)!r}: nothing to migrate; pass "
                           "--store URL or set PENGUIFLOW_STORE to the store to upgrade",
                           EXIT_USAGE)
    try:
        version = sqlite_schema_version(path)
    except sqlite3.DatabaseError as exc:
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None and code & 0xFF == sqlite3.SQLITE_NOTADB:
            raise CommandError(f"{str(path)!r} is not a SQLite database; nothing to migrate",
                               EXIT_USAGE) from None
        raise CommandError(f"cannot read {str(path)!r}: {one_line(exc)}") from None
    if version is None:
        raise CommandError(f"{str(path)!r} is not a penguiflow trace database (it has other "
                           "tables); nothing to migrate, and it was not changed", EXIT_USAGE)
    if version == 0:
        raise CommandError(f"{str(path)!r} holds no penguiflow traces (an empty database); "
                           "nothing to migrate, and it was not changed", EXIT_USAGE)
    return version

