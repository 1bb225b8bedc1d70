"""fold_rows: a batch's trace summaries, folded in Python from the rows being written.

Both durable stores keep one summary row per trace and fold each batch's newly
stored events into it. Folding in SQL (a GROUP BY over the batch's new rows, with
sub-queries for the flow name and node set) cost ~4-5 us per event on the 2-core
CI machine, more than the rest of the write path but the insert itself; folding
the rows already at hand in Python costs ~0.5-1 us, and only one row per trace
reaches the database. Semantics are TraceSummaryBuilder's (tests/exporters
compare the stores with InMemoryStateStore).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from penguiflow.state import _ERROR_KINDS, _TERMINAL_KINDS
from penguiflow.state import _trace_status as status_of

from . import _batch

__all__ = ["fold_rows", "status_of"]


def fold_rows(rows: Iterable[tuple[Any, ...]], trace: int, ts: int, kind: int, node: int,
              attempt: int, flow_name: int, *,
              groups: dict[Any, list[tuple[Any, ...]]] | None = None) -> dict[Any, list[Any]]:
    """:func:`penguiflow_exporters._batch.fold_rows` with the core's kinds (see there)."""
    return _batch.fold_rows(rows, trace, ts, kind, node, attempt, flow_name,
                            terminal=_TERMINAL_KINDS, errors=_ERROR_KINDS, groups=groups)
