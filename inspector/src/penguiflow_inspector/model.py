"""What the inspector shows, derived from a trace's stored events alone.

Contract shared by the ``pf`` command's plain/JSON output and the Textual app:
``build_trace(events)`` turns the ``StoredEvent``s of one trace (in
``load_history`` order) into a :class:`TraceView`; nothing here touches a
store, a terminal or the OTel SDK, so every screen is testable on fixture
events. Times are epoch seconds (floats, as stored); durations are ms.

The waterfall rows are node invocations and remote calls. The critical path is
computed from the runtime's recorded wait graph (``parent_invocation_ids``),
not from span nesting. Replay rebuilds the trace as it was at time ``t``
(invocations in flight included) with :meth:`TraceView.at`.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Sequence
from typing import TYPE_CHECKING

from penguiflow.state import ERROR_KINDS, counts_as_failed_invocation
from penguiflow.tracing import otel_trace_id, root_span_id

from ._event_log import EventRow, EventRows
from ._fold import (
    HANDLERS,
    TRACE_LEVEL,
    Fold,
    critical_path,
    outcome_of,
    text_or_none,
    trace_status,
)
from ._replay import ReplayIndex
from ._views import (
    AbandonedView,
    AttemptView,
    CancelView,
    DeadlineView,
    HopView,
    InvocationView,
    RemoteCallView,
    RemoteStats,
    TraceView,
)
from ._words import (
    MARK_SYMBOL,
    STATUS_SYMBOL,
    STATUS_WORD,
    axis_fraction,
    display_edge,
    display_name,
    finite,
    format_clock,
    format_duration,
    format_offset,
    printable,
    status_word,
)

if TYPE_CHECKING:
    from penguiflow.state import StoredEvent

__all__ = [
    "MARK_SYMBOL",
    "STATUS_SYMBOL",
    "STATUS_WORD",
    "AbandonedView",
    "AttemptView",
    "HopView",
    "axis_fraction",
    "build_trace",
    "bus_hops",
    "critical_path",
    "remote_stats",
    "CancelView",
    "DeadlineView",
    "EventRow",
    "InvocationView",
    "RemoteCallView",
    "RemoteStats",
    "TraceView",
    "cancel_flow",
    "display_edge",
    "display_name",
    "failed_invocation_count",
    "format_clock",
    "format_duration",
    "format_offset",
    "matches_kind",
    "printable",
    "served_runs",
    "status_word",
]



def bus_hops(view: TraceView) -> tuple[list[HopView], list[AbandonedView]]:
    """The trace's hops across processes (empty for a single-process flow) and the
    attempts abandoned by workers that stopped mid-node.

    An invocation is abandoned when the worker that took its input again recorded
    so (``node_abandoned``), or, where that record is missing (no store on that
    worker), when it has no end, ran on a worker that a later delivery names as
    ``previous_worker``, and the trace went on without it.
    """
    hops: list[HopView] = []
    started: dict[str, tuple[str | None, str | None]] = {}
    closed: dict[str, str] = {}
    for ev in view.events.stored() if isinstance(view.events, EventRows) else ():
        if ev.kind == "message_fetch":
            p = ev.payload
            deliveries = p.get("deliveries")
            previous = p.get("previous_worker")
            hops.append(HopView(
                ev.ts, str(p.get("edge", "?")), ev.node_name, ev.flow_id,
                None if (queued := finite(ev.queued_ts)) is None else (ev.ts - queued) * 1000.0,
                deliveries if isinstance(deliveries, int) else 1,
                previous if isinstance(previous, str) else None))
        elif ev.kind == "node_start" and ev.invocation_id is not None:
            started.setdefault(ev.invocation_id, (ev.node_name, ev.flow_id))
        elif ev.kind == "node_abandoned" and ev.invocation_id is not None:
            closed[ev.invocation_id] = text_or_none(ev.payload.get("worker_id")) or "?"
    # Stored per process, so interleaved out of order across processes: by time.
    hops.sort(key=lambda h: h.ts)
    gone = {h.previous_worker for h in hops if h.previous_worker}
    abandoned: list[AbandonedView] = []
    for inv in view.invocations:
        worker = started.get(inv.invocation_id, (None, None))[1]
        if inv.invocation_id in closed:
            abandoned.append(AbandonedView(inv.invocation_id, inv.node_name,
                                           worker or closed[inv.invocation_id]))
        elif inv.end is None and worker is not None and worker in gone:
            abandoned.append(AbandonedView(inv.invocation_id, inv.node_name, worker))
    return hops, abandoned


def build_trace(events: Sequence[StoredEvent]) -> TraceView:
    """Build the view of one trace from its stored events, in ``load_history`` order.

    Unknown kinds are kept in the event log and otherwise ignored; events of
    an invocation whose ``node_start`` is missing still make a row (from the
    first event seen). ``store_events_lost`` markers (a store could not keep
    some of the trace's events) make the trace ``"incomplete"`` unless it was
    cancelled or failed, with ``events_lost`` their total. The view reads
    ``events`` later (its event log, replay): do not change the sequence
    afterwards. Raises ValueError for no events (there is no trace to show).

    Cost at 100k events (50k invocations), CPU on the shared 2-core machine:
    ~0.25 s with the cyclic GC running as usual (``benchmarks/inspector.py``'s
    ``whole waterfall`` row includes it). The fold keeps about three GC-tracked
    objects per invocation and none per event (the event log is built when read,
    the per-invocation index is a chain of ints): each long-lived container costs
    every later full collection.
    """
    if not events:
        raise ValueError("build_trace needs at least one event")
    trace_id = next((e.trace_id for e in events if e.trace_id is not None), "")
    fold = Fold(trace_id, index=True)
    _fold_all(fold, events)
    return _finish(trace_id, events, fold)


def _fold_all(fold: Fold, events: Sequence[StoredEvent]) -> None:
    """The hot loop of ``build_trace``: the replay index and the rows."""
    # Locals, not attribute look-ups: this runs once per event (~2 µs each).
    first, last = fold.first_pos, fold.last_pos
    fold.next_pos = nxt = array("q", [-1]) * len(events)
    trace_level = fold.trace_level
    handlers = HANDLERS
    trace_kinds = TRACE_LEVEL
    for pos, ev in enumerate(events):
        kind = ev.kind
        inv = ev.invocation_id
        if inv is not None:
            before = last.get(inv)
            if before is None:
                first[inv] = pos
            else:
                nxt[before] = pos
            last[inv] = pos
            if fold.cancels:
                fold.note_after_cancel(inv, ev.ts, ev.flow_id)
        if kind in trace_kinds:
            trace_level.append(pos)
        handler = handlers.get(kind)
        if handler is not None:
            fold.pos = pos
            handler(fold, ev, ev.payload)


def _finish(trace_id: str, events: Sequence[StoredEvent], fold: Fold) -> TraceView:
    times = [e.ts for e in events]
    queued = [i.queued_ts for i in fold.invocations.values() if i.queued_ts is not None]
    # The root span starts at the first ingress queued_ts (or the first event).
    fold.start = min(min(times), min(queued, default=math.inf))
    fold.end = max(times)
    fold.flow_name = next((e.flow_name for e in events if e.flow_name is not None), None)
    fold.close_orphan_calls()
    fold.kept_running()
    if fold.late_parents:
        _served_late(events, fold)
    invocations = sorted(fold.invocations.values(), key=lambda i: i.start)
    calls = sorted(fold.calls, key=lambda c: c.start)
    view = TraceView(
        trace_id=trace_id, flow_name=fold.flow_name, start=fold.start, end=fold.end,
        status=trace_status(invocations, fold.cancels, fold.deadlines, fold.events_lost),
        invocations=invocations, remote_calls=calls, events=EventRows(events),
        cancels=fold.cancels, deadlines=fold.deadlines,
        critical_path=critical_path(invocations, fold.end),
        otel_trace_id=otel_trace_id(trace_id) if trace_id else "",
        root_span_id=root_span_id(trace_id) if trace_id else "",
        events_lost=fold.events_lost, lost_reasons=tuple(fold.lost_reasons),
        first_event_ts=min(times))
    view._index = ReplayIndex(view, events, fold, times)
    return view


def _served_late(events: Sequence[StoredEvent], fold: Fold) -> None:
    """Set ``served_under`` of the rows made before their flow's ``trace_parent`` event."""
    parents = fold.flow_parents
    invocations = fold.invocations
    for inv_id, first in fold.first_pos.items():
        inv = invocations.get(inv_id)
        if inv is not None and inv.served_under is None:
            flow_id = events[first].flow_id
            if flow_id is not None:
                inv.served_under = parents.get(flow_id)


def served_runs(view: TraceView) -> dict[str, list[InvocationView]]:
    """Call id -> the invocations that served that remote call, in start order.

    Only calls in ``view`` and invocations whose chain of callers (served run,
    the call that asked for it, the invocation that made the call, ...) ends
    at a row that is not served by a call in the view: the rows can be drawn
    nested under their call. A malformed chain (a cycle) leaves its rows out,
    so they stay at the top level. Empty (and O(invocations)) for a trace
    without ``trace_parent`` events.
    """
    calls = {c.call_id: c for c in view.remote_calls}
    candidates = [i for i in view.invocations
                  if i.served_under is not None and i.served_under in calls]
    if not candidates:
        return {}
    by_id = {i.invocation_id: i for i in view.invocations}
    rooted: dict[str, bool] = {}

    def is_rooted(inv: InvocationView) -> bool:
        chain: list[str] = []
        current: InvocationView | None = inv
        ok = True
        while current is not None:
            known = rooted.get(current.invocation_id)
            if known is not None:
                ok = known
                break
            if current.invocation_id in chain:
                ok = False  # a cycle
                break
            chain.append(current.invocation_id)
            call = calls.get(current.served_under) if current.served_under else None
            if call is None:
                break  # a top-level row
            current = by_id.get(call.invocation_id) if call.invocation_id else None
        for inv_id in chain:
            rooted[inv_id] = ok
        return ok

    out: dict[str, list[InvocationView]] = {}
    for inv in candidates:  # in start order
        if is_rooted(inv):
            assert inv.served_under is not None
            out.setdefault(inv.served_under, []).append(inv)
    return out


# -- per-agent stats ---------------------------------------------------------------------------


def _percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of ascending values; None when empty."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[rank - 1]


def remote_stats(view: TraceView) -> list[RemoteStats]:
    """Per-agent (agent URL, else skill) call count, errors and p50/p95 latency.

    Latencies are of finished calls; percentiles are nearest-rank. Ordered by
    agent name.
    """
    groups: dict[str, list[RemoteCallView]] = {}
    for call in view.remote_calls:
        groups.setdefault(call.agent_url or call.skill or "?", []).append(call)
    out = []
    for agent in sorted(groups):
        calls = groups[agent]
        latencies = sorted(c.latency_ms for c in calls if c.latency_ms is not None)
        out.append(RemoteStats(agent, len(calls), sum(c.outcome == "error" for c in calls),
                               _percentile(latencies, 50), _percentile(latencies, 95)))
    return out


# -- filters and counts shared by the outputs ---------------------------------------------------


def matches_kind(item: InvocationView | RemoteCallView, kind: str) -> bool:
    """Whether a waterfall row matches ``kind:KIND`` of the filter syntax.

    ``inv`` / ``remote``: the row's type. ``error`` (or ``failed``): an invocation
    with a failed attempt -- a ``node_error`` or ``node_timeout`` in any attempt, even
    if a retry then succeeded (what ``pf traces`` counts under ERRORS) -- or a
    remote call that failed. ``timeout``: an invocation with an attempt that timed
    out. Any other word is a status, in the model's words or the store's
    (``cancelled``, ``running``, ``succeeded``/``ok``, ``skipped``).
    """
    kind = kind.lower()
    is_inv = isinstance(item, InvocationView)
    status: str
    if kind in ("inv", "remote"):
        return is_inv == (kind == "inv")
    if isinstance(item, InvocationView):
        if kind in ("error", "failed"):
            return item.status in ("error", "timeout") or any(
                outcome_of(a) in ("error", "timeout") for a in item.raw_attempts)
        if kind == "timeout":
            return item.status == "timeout" or any(
                outcome_of(a) == "timeout" for a in item.raw_attempts)
        status = item.status
    else:
        if kind in ("error", "failed"):
            return item.outcome == "error"
        if kind == "timeout":
            return False
        status = item.outcome
    return kind == status or kind == status_word(status)


def failed_invocation_count(view: TraceView) -> int:
    """The trace's failed invocations, as ``TraceSummary.error_count`` counts them
    (:func:`penguiflow.state.counts_as_failed_invocation`): node invocations with a
    failed attempt, retried or not, and failed remote calls -- the number ``pf
    traces`` shows under ERRORS, and the rows ``kind:error`` finds."""
    events = view.events
    stored = events.stored() if isinstance(events, EventRows) else events
    return sum(1 for ev in stored
               if ev.kind in ERROR_KINDS and counts_as_failed_invocation(ev.kind, ev.attempt))


def cancel_flow(view: TraceView, cancel: CancelView) -> str:
    """``" in flow <name>"`` when ``view``'s cancels come from several flows (an agent
    serving a call in the same trace cancels its own part), else ``""``."""
    if len({c.flow_id for c in view.cancels}) < 2:
        return ""
    return f" in flow {cancel.flow_name or cancel.flow_id or '?'}"
