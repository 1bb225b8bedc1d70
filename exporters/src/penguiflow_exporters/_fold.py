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

__all__ = ["fold_rows", "status_of"]


def fold_rows(rows: Iterable[tuple[Any, ...]], trace: int, ts: int, kind: int, node: int,
              attempt: int, flow_name: int) -> dict[Any, list[Any]]:
    """Per trace id (in order of first event), the summary of ``rows``.

    The other arguments are the positions of those fields in a row. Rows without a
    trace id are skipped. Each value is ``[flow_name, started, ended, starts, errors,
    remotes, events, open, failed, cancelled, nodes]`` (``nodes`` a set).
    """
    folds: dict[Any, list[Any]] = {}
    get = folds.get
    terminal, errors = _TERMINAL_KINDS, _ERROR_KINDS
    for row in rows:
        trace_id = row[trace]
        if trace_id is None:
            continue
        t, k = row[ts], row[kind]
        f = get(trace_id)
        if f is None:
            f = folds[trace_id] = [row[flow_name], t, t, 0, 0, 0, 1, 0, False, False, set()]
        else:
            f[6] += 1
            if t < f[1]:
                f[1] = t
            if t > f[2]:
                f[2] = t
            if f[0] is None:
                f[0] = row[flow_name]
        if k == "node_start":
            if row[attempt] == 0:
                f[3] += 1
                f[7] += 1
            name = row[node]
            if name:
                f[10].add(name)
        elif k in terminal:
            f[7] -= 1
            if k == "node_failed":  # the one kind both terminal and an error
                f[8] = True
                f[4] += 1
        elif k in errors:
            f[4] += 1
        elif k == "trace_cancel_start":
            f[9] = True
        elif k == "remote_call_start":
            f[5] += 1
    return folds

