"""Packs: runtime events a store holds already pickled for its writer process.

A durable store buffers the runtime's events until its writer takes them: up to
``max_buffer`` of them (100k by default) when the writer is behind. Each is a tuple
of 23 values, and CPython's collector examines every tuple kept alive, on each young
collection it survives, before it finds that an all-atoms tuple needs no tracking:
with a store holding the events as tuples, the collector's young passes took
~1-1.5 us a hop of chain N=5, against ~0.15 without a store (measured with
``gc.callbacks``). Those events are pickled for the writer process anyway; doing
it as soon as a few hundred have arrived frees the tuples while they are young, and
what the buffer holds is bytes, which the collector never examines.

A :class:`Pack` is the pickle of ``count`` consecutive runtime events (the format of
one slice of the writer process's payload: ``_records.loads_rows`` reads a payload
of packs and slices back to back). A :class:`PackedBatch` is a batch some of whose
events are in packs: it is a read-only sequence of the events, in order, and turns
its packs back into tuples only when something reads the events one by one (a
follower, a refused event, a batch split after an error); handed whole to the
writer process, its packs go as they are.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator, Sequence
from typing import Any, overload

__all__ = ["Pack", "PackedBatch", "as_list"]


class Pack:
    """``count`` runtime events (plain tuples, in order) pickled as one list."""

    __slots__ = ("count", "data")

    def __init__(self, data: bytes, count: int) -> None:
        self.data = data
        self.count = count

    def events(self) -> list[Any]:
        """The events as tuples again (values the pickler made plain stay plain:
        a read-only mapping comes back as a dict, as the store writes it)."""
        return pickle.loads(self.data)  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        return f"Pack({self.count} events, {len(self.data)} bytes)"


class PackedBatch(Sequence[Any]):
    """A batch of events, some in packs: ``entries`` (events and :class:`Pack`\\ s, in
    order) followed by ``tail`` (events, then the batch's markers, which the
    processor appends with ``+=``).

    ``len()`` counts events. Reading the last items, where the markers are, costs
    nothing; reading inside a pack, iterating or slicing unpacks every pack once.
    """

    __slots__ = ("_items", "entries", "events", "tail")

    def __init__(self, entries: list[Any], events: int) -> None:
        self.entries = entries
        #: Events in ``entries`` (what the processor counts as written or lost).
        self.events = events
        self.tail: list[Any] = []
        self._items: list[Any] | None = None

    def __len__(self) -> int:
        return self.events + len(self.tail)

    def __iadd__(self, more: Sequence[Any]) -> PackedBatch:
        self.tail.extend(more)
        self._items = None
        return self

    def items(self) -> list[Any]:
        """Every item as it was submitted (packs unpacked), in order; made once."""
        if self._items is None:
            items: list[Any] = []
            for entry in self.entries:
                if type(entry) is Pack:
                    items += entry.events()
                else:
                    items.append(entry)
            items += self.tail
            self._items = items
        return self._items

    @overload
    def __getitem__(self, index: int) -> Any: ...

    @overload
    def __getitem__(self, index: slice) -> list[Any]: ...

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, int) and self._items is None:
            size = len(self)
            position = index + size if index < 0 else index
            if self.events <= position < size:
                return self.tail[position - self.events]
        return self.items()[index]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.items())

    def __repr__(self) -> str:
        return f"PackedBatch({self.events} events in {len(self.entries)} entries, " \
               f"{len(self.tail)} more)"


def as_list(items: Sequence[Any]) -> Sequence[Any]:
    """``items`` as a plain list when it is a :class:`PackedBatch` (for a writer that
    reads events one by one: a thread's, the event loop's), else as it is."""
    return items.items() if type(items) is PackedBatch else items
