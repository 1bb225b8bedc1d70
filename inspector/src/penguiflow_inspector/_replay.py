"""The replay index: what :meth:`TraceView.at` needs to rebuild a trace as it was at
a time, quickly (computed once per view, then bisections and a re-fold of the rows
in flight at each step).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from itertools import pairwise
from typing import TYPE_CHECKING, Any

from ._event_log import EventRow, EventRows
from ._fold import (
    Fold,
    waited_for,
)
from ._views import (
    InvocationView,
    Status,
    TraceView,
)

if TYPE_CHECKING:
    from penguiflow.state import StoredEvent



#: Invocations per block of ``ReplayIndex.block_lasts``.
_BLOCK = 64


class ReplayIndex:
    """What :meth:`TraceView.at` needs to rebuild the trace at a time quickly.

    Everything that is O(invocations) is computed once here; a step is then a
    few bisections, one pass over the invocations started by ``t`` and a
    re-fold of the rows with events after ``t``.
    """

    def __init__(self, view: TraceView, events: Sequence[StoredEvent], fold: Fold,
                 ts: list[float]) -> None:
        self.view = view
        self.events = events
        #: ``ts`` of every event, in log order.
        self.ts = ts
        self.first_pos, self.next_pos, self.borrowed = fold.first_pos, fold.next_pos, fold.borrowed
        self.fold: Fold | None = fold

    def own_positions(self, invocation_id: str) -> list[int]:
        """Positions of the events whose invocation id is ``invocation_id``, in order."""
        out: list[int] = []
        position, following = self.first_pos.get(invocation_id, -1), self.next_pos
        while position >= 0:
            out.append(position)
            position = following[position]
        return out

    def positions(self, invocation_id: str) -> list[int]:
        """:meth:`own_positions` and the events of its remote calls that have no
        invocation id (what replay re-folds the row from), in order."""
        own = self.own_positions(invocation_id)
        borrowed = self.borrowed.get(invocation_id)
        return sorted(own + borrowed) if borrowed else own

    def _prepare(self) -> None:
        # On the first replay, not in build_trace: opening a trace (first paint)
        # does not pay for it (~25% of build_trace's time at 100k events).
        fold = self.fold
        assert fold is not None
        self.fold = None
        view = self.view
        ts = self.ts
        self.monotonic = all(a <= b for a, b in pairwise(ts))
        invocations = view.invocations
        self.inv_starts = [i.start for i in invocations]
        if self.monotonic:  # an invocation's last event is its latest
            last_pos, borrowed = fold.last_pos, self.borrowed
            self.inv_lasts = [ts[last_pos[i.invocation_id]] for i in invocations]
            if borrowed:
                for n, inv in enumerate(invocations):
                    more = borrowed.get(inv.invocation_id)
                    if more:
                        self.inv_lasts[n] = max(self.inv_lasts[n], ts[more[-1]])
        else:
            self.inv_lasts = [max(ts[p] for p in self.positions(i.invocation_id))
                              for i in invocations]
        self.call_starts = [c.start for c in view.remote_calls]
        self.call_lasts = [fold.last_ts.get(c.call_id, c.start) for c in view.remote_calls]
        self.trace_level = fold.trace_level
        self.first_after = fold.first_after
        self.by_id = {i.invocation_id: i for i in invocations}
        ended = sorted((i.end, n) for n, i in enumerate(invocations) if i.end is not None)
        self.end_times = [e for e, _ in ended]
        self.end_order = [n for _, n in ended]
        self.first_error = min((i.end for i in invocations if i.status == "error"
                                and i.end is not None), default=math.inf)
        self.first_timeout = min((i.end for i in invocations if i.status == "timeout"
                                  and i.end is not None), default=math.inf)
        # The parent each invocation waited for in the whole trace, and when that
        # choice became final (every parent ended): valid at any t after that.
        self.waited: dict[str, str | None] = {}
        self.waited_final: dict[str, float] = {}
        for inv in invocations:
            parent = waited_for(inv, self.by_id, math.inf)
            self.waited[inv.invocation_id] = None if parent is None else parent.invocation_id
            ends = [self.by_id[p].end for p in inv.parents if p in self.by_id]
            self.waited_final[inv.invocation_id] = (
                math.inf if any(e is None for e in ends)
                else max((e for e in ends if e is not None), default=-math.inf))
        self._prepare_spine(invocations)
        # The latest last event per block of _BLOCK invocations (in start order):
        # ``at`` looks for the invocations with events after t only in blocks that have one.
        lasts = self.inv_lasts
        self.block_lasts = [max(lasts[b: b + _BLOCK]) for b in range(0, len(lasts), _BLOCK)]

    def _prepare_spine(self, invocations: list[InvocationView]) -> None:
        """The spine: the whole trace's wait chain from the invocation that ended last.

        A critical path at a replay time walks the wait graph back from the
        invocation running (or ended last) at t, one parent per step: 25k steps
        at the middle of a 50k-invocation chain. Where the walk reaches an
        invocation on the spine whose whole chain of choices was final by t
        (``spine_final``: the latest ``waited_final`` from the root to there), the
        rest of the path is a slice of the spine. ``spine_at`` maps an id to its
        position; a cycle in a malformed wait graph leaves the spine empty.
        """
        self.spine: list[str] = []
        self.spine_at: dict[str, int] = {}
        self.spine_final: list[float] = []
        if not invocations:
            return
        end = max(i.end if i.end is not None else math.inf for i in invocations)
        current: str | None = next(i.invocation_id for i in invocations
                                   if (i.end if i.end is not None else math.inf) == end)
        chain: list[str] = []
        seen: set[str] = set()
        while current is not None:
            if current in seen:
                return  # a cycle: no spine, every step walks
            seen.add(current)
            chain.append(current)
            current = self.waited[current]
        chain.reverse()
        final = self.waited_final
        latest = -math.inf
        spine_final: list[float] = []
        for inv_id in chain:
            latest = max(latest, final[inv_id])
            spine_final.append(latest)
        self.spine, self.spine_final = chain, spine_final
        self.spine_at = {inv_id: n for n, inv_id in enumerate(chain)}

    def prepare(self) -> None:
        """Build the replay index if it is not built yet."""
        if self.fold is not None:
            self._prepare()

    def at(self, t: float) -> TraceView:
        self.prepare()
        view = self.view
        rows: Sequence[EventRow]
        if self.monotonic:  # a slice of the log: a range, no copy
            rows = view.events[: bisect.bisect_right(self.ts, t)]
        else:
            rows = EventRows(self.events, [p for p, ts in enumerate(self.ts) if ts <= t])
        # Invocations started by t; those with events after t are re-folded from
        # their own events up to t (few: the ones in flight at t).
        k = bisect.bisect_right(self.inv_starts, t)
        lasts = self.inv_lasts
        invocations = view.invocations[:k]
        stale = [i for b, last in enumerate(self.block_lasts[: (k + _BLOCK - 1) // _BLOCK])
                 if last > t
                 for i in range(b * _BLOCK, min(k, (b + 1) * _BLOCK)) if lasts[i] > t]
        events, ts = self.events, self.ts
        sub = Fold(view.trace_id)
        running: list[InvocationView] = []
        if stale:
            positions = sorted(p for i in stale
                               for p in self.positions(invocations[i].invocation_id)
                               if ts[p] <= t)
            for p in positions:
                sub.apply(p, events[p])
            sub.close_orphan_calls(self.call_ends_after(t))
            for i in stale:
                row = sub.invocations.get(invocations[i].invocation_id, invocations[i])
                # (the trace_parent events are not re-folded: keep the whole trace's)
                row.served_under = invocations[i].served_under
                invocations[i] = row
                if row.end is None:
                    running.append(row)
        kc = bisect.bisect_right(self.call_starts, t)
        fresh = {c.call_id: c for c in sub.calls}
        calls = [fresh.get(c.call_id, c) for i, c in enumerate(view.remote_calls[:kc])
                 if self.call_lasts[i] <= t or c.call_id in fresh]
        # Cancels and deadlines: re-fold the (few) trace-level events up to t.
        trace_level = Fold(view.trace_id)
        for p in self.trace_level:
            if ts[p] <= t:
                trace_level.trace_level_only(events[p])
        for cancel, seen in zip(trace_level.cancels, self.first_after, strict=False):
            interrupted = {inv for inv, _ in cancel.interrupted}
            cancel.kept_running = [inv for inv, first in seen.items()
                                   if first <= t and inv not in interrupted]
        end = min(max(t, view.start), view.end)
        status: Status
        if trace_level.cancels:
            status = "cancelled"
        elif self.first_error <= t:
            status = "error"
        elif self.first_timeout <= t:
            status = "timeout"
        elif trace_level.events_lost:
            status = "incomplete"
        elif running:
            status = "running"
        elif not invocations and trace_level.deadlines:
            status = "skipped"
        else:
            status = "ok"
        return TraceView(
            trace_id=view.trace_id, flow_name=view.flow_name, start=view.start, end=end,
            status=status, invocations=invocations, remote_calls=calls, events=rows,
            cancels=trace_level.cancels, deadlines=trace_level.deadlines,
            critical_path=self._critical_path(t, running, sub.invocations),
            otel_trace_id=view.otel_trace_id, root_span_id=view.root_span_id,
            replay_t=t, events_lost=trace_level.events_lost,
            lost_reasons=tuple(trace_level.lost_reasons),
            first_event_ts=view.first_event_ts, _index=self)

    def call_ends_after(self, t: float) -> dict[str, float]:
        """Ids of the calls whose last event (their outcome) comes after ``t``."""
        return {c.call_id: last for c, last in zip(self.view.remote_calls, self.call_lasts,
                                                   strict=True) if last > t}

    def _critical_path(self, t: float, running: list[InvocationView],
                       refolded: dict[str, InvocationView]) -> list[str]:
        """:func:`critical_path` at ``t``, reusing the whole trace's choices where final."""
        if running:  # they end "at t", after everything that has ended
            last: str | None = running[0].invocation_id
        else:
            j = bisect.bisect_right(self.end_times, t)
            if j == 0:
                return []
            last = self.view.invocations[self.end_order[j - 1]].invocation_id
        lookup = _Overlay(self.by_id, refolded) if refolded else self.by_id
        waited, final = self.waited, self.waited_final
        spine_at, spine_final = self.spine_at, self.spine_final
        chain: list[str] = []
        seen: set[str] = set()
        # (A malformed wait graph may have a cycle: stop before the first revisit.)
        while last is not None and last not in seen:
            seen.add(last)
            on_spine = spine_at.get(last)
            if on_spine is not None and spine_final[on_spine] <= t:
                # From here back, every choice is the whole trace's: a slice of the spine.
                chain.reverse()
                return self.spine[: on_spine + 1] + chain
            chain.append(last)
            if final[last] <= t:
                last = waited[last]
            else:
                parent = waited_for(lookup[last], lookup, t)
                last = None if parent is None else parent.invocation_id
        chain.reverse()
        return chain


class _Overlay(Mapping[str, InvocationView]):
    """``base`` with some rows replaced (the rows re-folded at a replay time)."""

    def __init__(self, base: Mapping[str, InvocationView],
                 top: Mapping[str, InvocationView]) -> None:
        self.base, self.top = base, top

    def __getitem__(self, key: str) -> InvocationView:
        found = self.top.get(key)
        return found if found is not None else self.base[key]

    def get(self, key: str, default: Any = None) -> Any:
        found = self.top.get(key)
        return found if found is not None else self.base.get(key, default)

    def __iter__(self) -> Any:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)
