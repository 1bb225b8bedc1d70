"""Per-trace bookkeeping: pending count, in-flight invocations, cancel event.

Who changes what (all on the event loop thread, so no locks):

* ``pending`` rises by one whenever an object carrying this trace id is put on a
  floe (or into the Rookery buffer) and falls by one when a worker is done with
  it, when ``PenguiFlow.fetch*`` returns it, or when ``cancel`` removes it from a
  queue. A node's outputs are counted before its input is released, so the count
  never touches zero mid-flight.
* ``inflight`` counts live invocations; ``cancel`` uses the workers' own record of
  what they are running to interrupt exactly this trace's invocations.
* At zero the state is discarded: chunk waiters are woken, the WM-hops memory
  forgotten and, if the trace was cancelled, ``trace_cancel_finish`` follows.
"""

from __future__ import annotations

import asyncio

from .errors import TraceCancelled

__all__ = ["TraceCancelled", "TraceState"]


class TraceState:
    """Mutable bookkeeping of one live trace (see module docstring)."""

    __slots__ = ("cancel_event", "chunk_waiters", "inflight", "pending", "root_span", "wm_hops")

    def __init__(self) -> None:
        self.pending = 0
        self.inflight = 0
        self.cancel_event: asyncio.Event | None = None
        self.wm_hops: set[int] | None = None
        self.chunk_waiters: list[asyncio.Future[None]] | None = None
        #: Cached root span id (derived from the trace id on first use).
        self.root_span: str | None = None

    @property
    def cancelled(self) -> bool:
        """Whether ``cancel()`` was called for this trace."""
        event = self.cancel_event
        return event is not None and event.is_set()

    def wake_chunk_waiters(self) -> None:
        """Release every ``emit_chunk`` waiting for this trace's capacity."""
        waiters = self.chunk_waiters
        if waiters:
            self.chunk_waiters = None
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)
