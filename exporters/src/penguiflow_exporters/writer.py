"""The writer contract: what a durable store's backend implements (public).

A store is a :class:`~penguiflow_exporters.processor.BatchProcessor` (buffering,
back-pressure, retries, counted failures: written once) in front of an
:class:`EventWriter` (one per backend: SQLite, Postgres), the shape of
OpenTelemetry's ``BatchSpanProcessor`` around a ``SpanExporter``. A writer only
writes: it never buffers, retries or drops on its own.

``write(items)`` stores one batch, in order, in one transaction, and returns a
:class:`WriteResult`:

* items whose ``(flow_id, seq)`` is stored already are skipped (a re-delivery is
  stored once), listed in ``skipped``;
* an item the backend cannot store (a trace id that is not a str, holds NUL or a
  lone surrogate, is 5 MB long...) is refused alone, listed in ``rejected`` with
  the reason; the rest of the batch is stored.

Errors: :class:`~penguiflow.state.StoreUnavailable` means "try again later" (the
server is down, the file is locked or gone, the disk is full): the processor
retries the same batch with back-off.
:class:`~penguiflow_exporters.processor.StoreRefused` means the store as a whole
takes no write (a foreign database, a newer schema): the batch is counted lost at
once, not split. Any other exception means the batch holds something the backend
refused: the processor splits the batch and writes the halves, so only the
offending events are lost.

Optional: ``prepare(items)`` returns what ``write_prepared(items, prepared)``
then stores (a writer process's pickled batch). The processor prepares the next
batch while the previous one is written, so the flow's process and the writer
work at the same time; batches are still written one at a time, in order. A
writer without ``prepare`` gets ``write`` only.

Optional: ``pack(items)``, synchronous, takes a list of the runtime's plain
tuples and returns a :class:`Pack` of them (their pickle, for a writer process) or
None (not now). The processor calls it on the flow's path for each run of a few
hundred runtime events as they arrive, and holds the pack instead of the tuples
(the collector examines every tuple held, see ``_packs``). A writer with ``pack``
may then be handed a :class:`PackedBatch`: a read-only sequence of the batch's items,
in order, which unpacks itself when iterated, indexed inside a pack or sliced.
A writer whose ability to pack can change (a fall-back to writing in this
process) may also define ``packs() -> bool``: while it returns False, the
processor does not offer it events to pack.

Items are the runtime's :class:`~penguiflow.state.EventRecord` tuples and
:class:`~penguiflow.state.StoredEvent` objects, in any mix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple, Protocol, runtime_checkable

if TYPE_CHECKING:
    from penguiflow.state import EventRecord, StoredEvent

from ._packs import Pack, PackedBatch

__all__ = ["EventWriter", "Pack", "PackedBatch", "WriteResult"]


class WriteResult(NamedTuple):
    """What a writer did with a batch besides storing it."""

    #: Positions (in the batch) of items stored before, or repeated in the batch.
    skipped: Sequence[int] = ()
    #: Positions of items refused, each with the reason (a sentence naming the field).
    rejected: Sequence[tuple[int, str]] = ()
    #: Things the writer noticed and handled, ``(counter, message)``: the processor
    #: logs each as a warning and counts it in ``failures[counter]`` (e.g.
    #: ``("file_replaced", "...")`` when a SQLite file was replaced and reopened).
    notices: Sequence[tuple[str, str]] = ()


@runtime_checkable
class EventWriter(Protocol):
    """One backend's write side (see the module docstring for the contract)."""

    async def write(self, items: Sequence[EventRecord | StoredEvent]) -> WriteResult:
        """Store ``items`` in order, in one transaction (see the module docstring)."""
        ...

    async def close(self) -> None:
        """Release the writer's resources; idempotent. No write follows."""
        ...
