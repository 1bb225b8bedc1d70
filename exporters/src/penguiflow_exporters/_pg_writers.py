"""Where a Postgres store's batches are written: a writer process, or the event loop.

:class:`ProcessOrLoop` (``writer="process"``, the default) hands the runtime's
batches to a :class:`~._writer_proc.ProcessWriter` running ``python -m
penguiflow_exporters._pg_write`` and writes imports (StoredEvents alone) on the
loop with the :class:`~._pg_write.PostgresWriter`; once no process can be started
(:class:`NoProcess`), everything goes to the loop. It follows the writer contract
of ``writer.py``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any

from penguiflow.state import StateStoreError, StoreUnavailable

from ._packs import Pack, PackedBatch, as_list
from ._pg_write import PostgresWriter
from ._writer_proc import ProcessWriter
from .writer import WriteResult

__all__ = ["NoProcess", "ProcessOrLoop", "for_child"]

logger = logging.getLogger("penguiflow_exporters.store")


class NoProcess(StoreUnavailable):
    """No writer process can be started here (spawning failed, or it died starting)."""


class ProcessOrLoop:
    """``writer="process"``: the runtime's batches go to the writer process.

    A batch of StoredEvents alone (an import, a replay: not the runtime's fast path)
    is written on the loop: pickling a payload dict to the child costs about what
    encoding it here does (~3.4 against ~4.5 us per event, measured), and the
    processor writes one batch at a time, so the two processes took turns: 100k
    StoredEvents went in at ~74k events/s through the child, ~127k on the loop.
    The runtime's EventRecords (no payload) pickle for ~2 us against ~6 of work
    moved off the flow's process.

    Where spawning is refused (a sandbox) or the child dies before it answers, the
    store writes on the loop from then on, this batch included, and logs it once:
    nothing is lost. A database error a live child reports is not this case.
    """

    def __init__(self, process: ProcessWriter, loop: PostgresWriter) -> None:
        self.process: ProcessWriter | None = process
        self.loop = loop

    async def start(self, first: Any = None) -> None:
        """Start the writer process now (the processor does when it starts, so the
        first batch does not wait for it), unless the first item saved is a
        StoredEvent (an import: those are written on the loop); one that cannot
        start is left to the first write, which falls back to the loop."""
        if self.process is not None and isinstance(first, tuple):
            with contextlib.suppress(StateStoreError):
                await self.process.start()

    def packs(self) -> bool:
        """Whether :meth:`pack` packs: until the loop writes instead."""
        return self.process is not None

    def pack(self, items: list[Any]) -> Pack | None:
        """The runtime events ``items`` pickled for the writer process now (see
        ``_packs``); None once the loop writes instead."""
        return None if self.process is None else self.process.pack(items)

    async def prepare(self, items: Sequence[Any]) -> Any:
        """The child's payload for a batch it will write; None for the loop's."""
        process = self.process
        if process is None or not for_child(items):
            return None
        return await process.prepare(items)

    async def write_prepared(self, items: Sequence[Any], prepared: Any) -> WriteResult:
        return await self._write(items, prepared)

    async def write(self, items: Sequence[Any]) -> WriteResult:
        return await self._write(items, None)

    async def _write(self, items: Sequence[Any], prepared: Any) -> WriteResult:
        process = self.process
        # Any runtime event (a tuple; usually the first) sends the batch to the child.
        if process is not None and for_child(items):
            try:
                if prepared is not None:
                    return await process.write_prepared(items, prepared)
                return await process.write(items)
            except NoProcess as exc:
                self.process = None
                await process.close()
                logger.warning("state_store_writer_process_unavailable", extra={
                    "error": str(exc), "fallback": "writing on the event loop (writer='loop')"})
        return await self.loop.write(as_list(items))

    async def close(self) -> None:
        if self.process is not None:
            await self.process.close()
        await self.loop.close()


def for_child(items: Sequence[Any]) -> bool:
    """Whether a batch goes to the writer process: any runtime event (a tuple) in it;
    a PackedBatch holds some by construction (no pass that would unpack it)."""
    return type(items) is PackedBatch or any(isinstance(item, tuple) for item in items)
