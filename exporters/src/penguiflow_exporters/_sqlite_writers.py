"""Where an SQLite store's batches are written: a thread of the store's process, or
a writer process with the thread as its fall-back.

:class:`ThreadWriter` runs :class:`~._sqlite_write.SQLiteWriter` on one thread of
its own; :class:`ProcessOrThread` hands the runtime's batches to a
:class:`~._writer_proc.ProcessWriter` (``python -m penguiflow_exporters._sqlite_write``)
and sends imports (StoredEvents alone) to a thread, and everything to the thread
once no process can be started. Both follow the writer contract of ``writer.py``
and raise the store's errors (see :func:`translate_writer`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from penguiflow.state import ERROR_KINDS, TERMINAL_KINDS, StateStoreError, StoreUnavailable

from ._packs import Pack, PackedBatch, as_list
from ._records import event_rows, reading_events
from ._sqlite_files import PATH_FIX, translate
from ._sqlite_write import SchemaError, SQLiteWriter
from ._writer_proc import ProcessWriter, WriterError
from .processor import StoreRefused
from .writer import EventWriter, WriteResult

__all__ = ["CannotStart", "ProcessOrThread", "ThreadWriter", "translate_writer"]

_T = TypeVar("_T")

logger = logging.getLogger("penguiflow_exporters.store")


class CannotStart(StoreUnavailable):
    """No writer process can be started here (a sandbox that forbids subprocesses)."""


def translate_writer(path: str, exc: WriterError) -> StateStoreError:
    if exc.gone and exc.starting:
        return CannotStart(f"SQLite store {path!r}: {exc}")
    if exc.gone:
        return StoreUnavailable(f"SQLite store {path!r}: {exc}; the next batch starts a new "
                                "writer process")
    if "SchemaError" in exc.types:
        return StoreRefused(str(exc).removeprefix("SchemaError: "))
    if "OSError" in exc.types:
        return StoreUnavailable(f"SQLite store {path!r}: {exc}; {PATH_FIX}")
    return translate(path, exc.code, str(exc))


class ThreadWriter:
    """The SQLite writer on a thread of the store's process (``writer="thread"``)."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._sync = SQLiteWriter(path, terminal=TERMINAL_KINDS, errors=ERROR_KINDS)
        self._executor = ThreadPoolExecutor(max_workers=1,
                                            thread_name_prefix="penguiflow-sqlite-writer")

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except sqlite3.Error as exc:
            raise translate(self._path, getattr(exc, "sqlite_errorcode", None),
                            str(exc)) from exc
        except SchemaError as exc:
            raise StoreRefused(str(exc)) from exc
        except OSError as exc:
            raise StoreUnavailable(f"SQLite store {self._path!r}: {exc}; {PATH_FIX}") from exc

    def _write_sync(self, items: Sequence[Any]) -> Any:
        self._sync.open()
        with reading_events():
            rows = event_rows(items)
        return self._sync.write(rows)

    async def write(self, items: Sequence[Any]) -> WriteResult:
        try:
            skipped, rejected, notices = await self._run(self._write_sync, items)
        except asyncio.CancelledError:
            # Given up on (a close that timed out): the thread cannot be cancelled,
            # so its transaction is interrupted (rolled back) instead of committing
            # after the batch was counted as not stored.
            self._sync.interrupt()
            raise
        return WriteResult(skipped, rejected, notices)

    async def close(self) -> None:
        try:
            await self._run(self._sync.close)
        finally:
            self._executor.shutdown(wait=False)


class ProcessOrThread:
    """The process writer, or the thread writer once no process can be started.

    A host that forbids subprocesses (a sandbox) still gets its events stored: the
    first batch that cannot start a writer process is written on a thread instead,
    from then on, with one warning.
    """

    def __init__(self, path: str, process: ProcessWriter) -> None:
        self._path = path
        self._writer: EventWriter = process
        self._thread: ThreadWriter | None = None
        self._fell_back = False

    def _to_thread(self, items: Sequence[Any]) -> bool:
        # StoredEvents alone (an import, a replay): their payload dicts cost as much
        # to pickle to the child as to write here (raw ingest measured ~130k events/s
        # through the child, ~200k here).
        # Any runtime tuple sends the batch to the child; the first item is one in a
        # runtime batch, so the scan stops there (a set of every item's type was a
        # pass over the batch twice per write on the flow's thread).
        # A PackedBatch holds runtime events by construction (packs come only from
        # pack(), below, before any fall-back).
        return not self._fell_back and type(items) is not PackedBatch and \
            not any(type(item) is tuple for item in items)

    def packs(self) -> bool:
        """Whether :meth:`pack` packs: until the thread writes instead."""
        return not self._fell_back

    def pack(self, items: list[Any]) -> Pack | None:
        """The runtime events ``items`` pickled for the writer process now (see
        ``_packs``); None once the thread writes instead."""
        if self._fell_back:
            return None
        return self._writer.pack(items)  # type: ignore[attr-defined,no-any-return]

    async def start(self, first: Any = None) -> None:
        """Start the writer process now (the processor does when it starts, so the
        first batch does not wait ~80 ms for it), unless the first item saved is a
        StoredEvent (an import: those go to the thread); one that cannot start is
        left to the first write, which falls back to the thread."""
        if not self._fell_back and isinstance(first, tuple):
            with contextlib.suppress(StateStoreError):
                await self._writer.start()  # type: ignore[attr-defined]

    async def prepare(self, items: Sequence[Any]) -> Any:
        """The child's payload for a batch it will write; None for the thread's."""
        if self._to_thread(items) or self._fell_back:
            return None
        return await self._writer.prepare(items)  # type: ignore[attr-defined]

    async def write_prepared(self, items: Sequence[Any], prepared: Any) -> WriteResult:
        return await self._write(items, prepared)

    async def write(self, items: Sequence[Any]) -> WriteResult:
        return await self._write(items, None)

    async def _write(self, items: Sequence[Any], prepared: Any) -> WriteResult:
        if self._to_thread(items):
            if self._thread is None:
                self._thread = ThreadWriter(self._path)
            return await self._thread.write(as_list(items))
        try:
            if prepared is not None and not self._fell_back:
                return await self._writer.write_prepared(  # type: ignore[attr-defined,no-any-return]
                    items, prepared)
            return await self._writer.write(as_list(items) if self._fell_back else items)
        except CannotStart as exc:
            if self._fell_back:
                raise
            self._fell_back = True
            logger.warning("state_store_writer_process_unavailable", extra={
                "store": f"SQLiteStateStore({self._path!r})", "error": str(exc),
                "fallback": "writing on a thread of this process (writer='thread')"})
            await self._writer.close()
            self._writer = ThreadWriter(self._path)
            return await self._writer.write(as_list(items))

    async def close(self) -> None:
        try:
            await self._writer.close()
        finally:
            if self._thread is not None:
                await self._thread.close()
