"""The waterfall's rows and the screens' view helpers, computed from a TraceView.

Nothing here draws: :class:`Rows` flattens a :class:`~penguiflow_inspector.model.TraceView`
into waterfall rows (each invocation followed by the remote calls it made, each
call by the invocations that served it when the called agent records into the
same store) and
indexes the events per invocation, once per full view, in O(events); the view
at a replay time reuses both (its rows are the full rows sliced, with the few
in flight swapped in). Drawing a row is done on demand by the waterfall (only
the visible ones), so a 100k-event trace costs one pass here and then a few
rows per frame.

The model functions (``build_trace``, ``TraceView.at``, ``remote_stats``) are
reached through the small wrappers at the bottom: one place where the screens
meet the model.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import compress, islice
from operator import attrgetter, is_not, le
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from penguiflow.tracing import derived_span_id

from .. import model
from ..model import (
    DeadlineView,
    EventRow,
    InvocationView,
    RemoteCallView,
    RemoteStats,
    TraceView,
)

if TYPE_CHECKING:
    from penguiflow.state import StoredEvent

__all__ = [
    "Query",
    "Row",
    "Rows",
    "build_view",
    "glyphs",
    "parse_query",
    "remote_stats_for",
    "view_at",
]

RowKind = Literal["inv", "remote", "skip"]


class Row(NamedTuple):
    """One waterfall row: an invocation, a remote call (drawn indented under it), or
    a message skipped at a node because its deadline had passed (``"skip"``: the
    node never ran; placed at its time among the invocations).

    A NamedTuple: a 100k-event trace has ~50k rows, built once per full view
    (a replay step reuses them), so construction cost matters (~0.2 µs here
    against ~1 µs for a frozen dataclass).
    """

    kind: RowKind
    item: InvocationView | RemoteCallView | DeadlineView
    depth: int = 0
    """Nesting: 0 for an invocation, 1 for its remote calls, 2 for an invocation that
    served one of those calls (another agent's flow in the same trace), 3 for its calls..."""

    @property
    def key(self) -> str:
        """A stable id across rebuilds (replay, live): the invocation or call id."""
        item = self.item
        if isinstance(item, InvocationView):
            return item.invocation_id
        if isinstance(item, DeadlineView):
            return f"skip:{item.ts!r}:{item.node_name}"
        return item.call_id

    @property
    def start(self) -> float:
        item = self.item
        return item.ts if isinstance(item, DeadlineView) else item.start

    @property
    def end(self) -> float | None:
        item = self.item
        return item.ts if isinstance(item, DeadlineView) else item.end

    @property
    def name(self) -> str:
        item = self.item
        if isinstance(item, InvocationView):
            return item.node_name
        if isinstance(item, DeadlineView):
            return model.display_name(item.node_name or "?")
        return item.skill or item.agent_url or "remote"

    @property
    def status(self) -> str:
        """``ok|error|timeout|cancelled|running|skipped`` (remote outcomes mapped)."""
        item = self.item
        if isinstance(item, InvocationView):
            return item.status
        if isinstance(item, DeadlineView):
            return "skipped"
        return {"success": "ok"}.get(item.outcome, item.outcome)


@dataclass(slots=True, frozen=True)
class Query:
    """A parsed search: ``node:NAME kind:KIND free text`` (all parts optional, ANDed)."""

    node: str | None = None
    kind: str | None = None
    """``inv``, ``remote``, or a status (``error``, ``timeout``, ``cancelled``,
    ``skipped``...), as ``pf``'s filters (:func:`~penguiflow_inspector.model.matches_kind`)."""
    text: str = ""

    @property
    def empty(self) -> bool:
        return self.node is None and self.kind is None and not self.text

    def matches(self, row: Row) -> bool:
        if self.node is not None and self.node not in _node_of(row).lower():
            return False
        if self.kind is not None and not _kind_matches(row, self.kind):
            return False
        if self.text:
            # Each word somewhere in the row (words ANDed, as the parts are).
            haystack = _haystack(row)
            return all(any(word in h for h in haystack) for word in self.text.split())
        return True


def parse_query(text: str) -> Query:
    """Parse the search box: ``node:`` and ``kind:`` prefixes, the rest is free text."""
    node = kind = None
    words: list[str] = []
    for token in text.lower().split():
        if token.startswith("node:") and len(token) > 5:
            node = token[5:]
        elif token.startswith("kind:") and len(token) > 5:
            kind = token[5:]
        else:
            words.append(token)
    return Query(node, kind, " ".join(words))


def _kind_matches(row: Row, kind: str) -> bool:
    item = row.item
    if isinstance(item, DeadlineView):
        return kind in ("skip", "skipped")
    return model.matches_kind(item, kind)


def _node_of(row: Row) -> str:
    item = row.item
    if isinstance(item, InvocationView):
        return item.node_name
    return item.node_name or ""


def _haystack(row: Row) -> list[str]:
    item = row.item
    # The words the screen shows: its status word ("succeeded", "failed", "timed
    # out"...), the endpoints' display names ("emit", "result").
    status = model.status_word(row.status)
    if isinstance(item, DeadlineView):
        return [row.name.lower(), status]
    parts = [row.name, model.display_name(row.name), row.key, status, item.error or ""]
    if isinstance(item, RemoteCallView):
        parts += [item.agent_url or "", item.context_id or "", item.task_id or ""]
    else:
        parts += [item.span_id or ""]
    return [p.lower() for p in parts]


def glyphs(row: Row) -> str:
    """Short markers after a row's name: retries, timeout, chunks, cancel, error."""
    item = row.item
    out: list[str] = []
    if isinstance(item, DeadlineView):
        return model.STATUS_SYMBOL["skipped"]
    if isinstance(item, InvocationView):
        if len(item.attempts) > 1:
            out.append(f"↻{len(item.attempts) - 1}")
        if any(a.outcome == "timeout" for a in item.attempts) or item.status == "timeout":
            out.append("◔")
        if item.chunks:
            out.append(f"≋{item.chunks}")
    elif item.chunks:  # chunks, as every output counts them (not status-only events)
        out.append(f"≋{item.chunks}")
    if row.status == "cancelled":
        out.append("✕")
    elif row.status == "error":
        out.append("!")
    return "".join(out)


@dataclass(slots=True)
class Rows:
    """The rows of one view, its critical path, and the whole trace's event times."""

    view: TraceView
    rows: list[Row] = field(default_factory=list)
    event_ts: Sequence[float] = ()
    """In time order (the log's order is not, when several processes record one
    trace): stepping and the replay bar's count bisect it."""
    _critical: frozenset[str] | None = None
    _positions: dict[str, int] | None = None
    #: Of a full view's rows, for the replayed views made from it (see ``_replayed``):
    #: the row of each invocation (one more: where the unplaced calls start), and
    #: the ids of the calls no invocation made.
    _inv_rows: list[int] | None = None
    _unplaced: frozenset[str] | None = None
    #: Of a replayed view's rows: the full view's, and the segments replaced in them
    #: (full start, full end, length here), so that ``index_of`` needs no dict of its own.
    _base: Rows | None = None
    _edits: list[tuple[int, int, int]] = field(default_factory=list)
    #: Whether any invocation has ``served_under`` (then a replayed view is flattened
    #: afresh: served runs are not contiguous segments in start order).
    _served: bool | None = None

    @property
    def served(self) -> bool:
        """Whether a replayed view's rows are flattened afresh: served runs, or deadline
        skips (rows placed by time among the invocations), break the fast path."""
        if self._served is None:
            self._served = bool(self.view.deadlines) or any(
                map(_SERVED_UNDER, self.view.invocations))
        return self._served

    @classmethod
    def of(cls, view: TraceView, base: Rows | None = None) -> Rows:
        """Flatten ``view``; with ``base`` (the full trace's rows), reuse its rows.

        A replayed view's (``view.at(t)``) rows are the full trace's up to the
        last invocation started by ``t``,
        with the few that ``at`` re-folded (in flight at ``t``) swapped in: a
        list slice and a few replacements instead of ~50k new rows per step at
        100k events (and the garbage collections they set off).
        """
        if base is None:
            return cls(view, _flatten(view), _in_time_order(view.event_times))
        full = base.view
        if (view.replay_t is not None and full.replay_t is None
                and view._index is not None and view._index is full._index
                and not base.served):
            rows, edits = base._replayed(view)
            return cls(view, rows, base.event_ts, _base=base, _edits=edits)
        return cls(view, _flatten(view), base.event_ts)

    def _replayed(self, view: TraceView) -> tuple[list[Row], list[tuple[int, int, int]]]:
        """The rows of ``view = self.view.at(t)``: what :func:`_flatten` gives, for less.

        ``at(t)`` keeps the full view's invocation list up to the last one started
        by ``t``, in the same order, and replaces (by new objects) only those with
        events after ``t``; an invocation it keeps made exactly the same calls (their
        events are its events, all before ``t``). The calls no invocation made are
        the full view's ones that exist at ``t``.
        """
        if self._inv_rows is None:  # once per full view, on its first replayed view
            full = self.view
            present = {c.call_id for c in full.remote_calls}
            inv_rows: list[int] = []
            placed: set[str] = set()
            n = 0
            for inv in full.invocations:  # as _flatten counts them
                inv_rows.append(n)
                made = [c for c in inv.remote_calls if c in present]
                placed.update(made)
                n += 1 + len(made)
            inv_rows.append(n)
            self._inv_rows, self._unplaced = inv_rows, frozenset(present - placed)
        inv_rows, unplaced = self._inv_rows, self._unplaced
        assert unplaced is not None
        invocations = view.invocations
        k = len(invocations)
        rows = self.rows[: inv_rows[k]]
        # The re-folded invocations (C loops: ~1 ms for 50k invocations).
        changed = list(compress(range(k), map(is_not, invocations, self.view.invocations)))
        edits: list[tuple[int, int, int]] = []
        if changed:
            calls = {c.call_id: c for c in view.remote_calls}
            for i in reversed(changed):  # from the end: a replacement can change the length
                inv = invocations[i]
                segment = [Row("inv", inv)]
                segment += [Row("remote", calls[c], 1) for c in inv.remote_calls if c in calls]
                rows[inv_rows[i]: inv_rows[i + 1]] = segment
                edits.append((inv_rows[i], inv_rows[i + 1], len(segment)))
            edits.reverse()
        if unplaced:
            rows += [Row("remote", c, 1) for c in view.remote_calls if c.call_id in unplaced]
        return rows, edits

    @property
    def critical(self) -> frozenset[str]:
        """The ids on the view's critical path (built on first use: ~25k ids mid-replay)."""
        if self._critical is None:
            self._critical = frozenset(self.view.critical_path)
        return self._critical

    def index_of(self, key: str) -> int | None:
        """The row index of an invocation/call id, or None.

        A dict built on first use; a replayed view's rows ask the full view's dict
        and shift by the segments replaced before it (building a dict per replay
        step would cost ~15 ms at 100k events).
        """
        base = self._base
        if base is None:
            if self._positions is None:
                self._positions = {row.key: i for i, row in enumerate(self.rows)}
            return self._positions.get(key)
        p = base.index_of(key)
        if p is None:
            return None
        assert base._inv_rows is not None and base._unplaced is not None
        if p >= base._inv_rows[len(self.view.invocations)]:
            if key not in base._unplaced:
                return None  # an invocation (or its call) not started yet
            start = len(self.rows) - 1
            while start >= 0 and self.rows[start].key in base._unplaced:
                start -= 1
            return self._scan(key, start + 1, len(self.rows))
        shift = 0
        for first, end, length in self._edits:
            if p < first:
                break
            if p < end:
                return self._scan(key, first + shift, first + shift + length)
            shift += length - (end - first)
        return p + shift

    def _scan(self, key: str, start: int, end: int) -> int | None:
        for i in range(start, end):
            if self.rows[i].key == key:
                return i
        return None

    def events_for(self, row: Row | None) -> Sequence[EventRow]:
        """The events of the selected row (all events when nothing is selected)."""
        until = self.view.replay_t
        if row is None:
            events: Sequence[EventRow] = self.view.events
            if until is not None and len(events) == len(self.event_ts):
                events = events[: self.events_until(until)]
            return events
        item = row.item
        if isinstance(item, DeadlineView):  # its deadline_skip event (a scan: rare rows)
            return [e for e in self.view.events if e.kind == "deadline_skip"
                    and e.ts == item.ts and e.node_name == item.node_name]
        key = item.invocation_id
        inv_events = self.view.events_of(key) if key is not None else []
        if isinstance(item, InvocationView):
            return inv_events
        return _call_events(self.view.trace_id, key or "", item, inv_events)

    def next_event_ts(self, t: float) -> float | None:
        """The first event time strictly after ``t``."""
        i = bisect.bisect_right(self.event_ts, t)
        return self.event_ts[i] if i < len(self.event_ts) else None

    def prev_event_ts(self, t: float) -> float | None:
        """The last event time strictly before ``t``."""
        i = bisect.bisect_left(self.event_ts, t)
        return self.event_ts[i - 1] if i > 0 else None

    def events_until(self, t: float) -> int:
        """How many events happened at or before ``t``."""
        return bisect.bisect_right(self.event_ts, t)


_SERVED_UNDER = attrgetter("served_under")

#: The events ``Fold._call`` gives to an open call of their invocation; the last four
#: end it.
_CALL_EVENTS = frozenset({"remote_stream_event", "remote_call_success", "remote_call_error",
                          "remote_call_cancelled", "remote_cancel_error"})
_CALL_ENDS = _CALL_EVENTS - {"remote_stream_event"}


def _call_events(trace_id: str, key: str, call: RemoteCallView,
                 inv_events: Sequence[EventRow]) -> list[EventRow]:
    """The events of ``call`` among its invocation's, assigned as ``Fold`` assigns
    them: the n-th ``remote_call_start`` opens the invocation's n-th call; a later
    event goes to the open call with its task id, else to the first open call
    without one, else to the last opened. Two calls in flight at once (a gather)
    so keep their own events, which a time window mixed."""
    opened: list[list[Any]] = []  # [call index, task id] of the calls still open
    mine: list[EventRow] = []
    count = 0
    for ev in inv_events:
        kind = ev.kind
        if kind == "remote_call_start":
            index = count
            count += 1
            opened.append([index, None])
        elif kind in _CALL_EVENTS:
            if not opened:
                continue
            target = opened[-1]
            task_id = ev.extra.get("remote_task_id")
            if task_id is not None:
                task_id = str(task_id)
                target = next((c for c in opened if c[1] == task_id),
                              next((c for c in opened if c[1] is None), target))
                target[1] = task_id
            index = target[0]
            if kind in _CALL_ENDS:
                opened.remove(target)
        elif kind.startswith("remote_"):  # another kind: by the call's time window
            if ev.ts >= call.start and (call.end is None or ev.ts <= call.end):
                mine.append(ev)
            continue
        else:
            continue
        if f"{derived_span_id(trace_id, key, 'remote', str(index)):016x}" == call.call_id:
            mine.append(ev)
    return mine


def _in_time_order(times: Sequence[float]) -> Sequence[float]:
    """``times`` sorted (itself when it already is: one pass, no copy)."""
    if all(map(le, times, islice(times, 1, None))):
        return times
    return sorted(times)


def _flatten(view: TraceView) -> list[Row]:
    """The rows of ``view`` (:func:`_flatten_calls`), with each deadline skip placed at
    its time among the top-level invocations (after those that started at the same
    time), as ``pf inspect --plain`` lists them."""
    rows = _flatten_calls(view)
    if not view.deadlines:
        return rows
    tops = [i for i, row in enumerate(rows) if row.depth == 0 and row.kind == "inv"]
    starts = [rows[i].start for i in tops]
    out: list[Row] = []
    taken = 0
    for deadline in sorted(view.deadlines, key=attrgetter("ts")):
        at = bisect.bisect_right(starts, deadline.ts)
        cut = tops[at] if at < len(tops) else len(rows)  # (after the last one: at the end)
        out += rows[taken:cut]
        out.append(Row("skip", deadline))
        taken = cut
    out += rows[taken:]
    return out


def _flatten_calls(view: TraceView) -> list[Row]:
    """Each invocation followed by the remote calls it made, then the calls no
    invocation made, in start order.

    An invocation that served a call in the view (its flow's ``trace_parent``:
    another agent recording into the same store) is placed right after that
    call's row, one level deeper, with the other invocations that served it,
    in start order (see :func:`~penguiflow_inspector.model.served_runs`).
    """
    calls = {c.call_id: c for c in view.remote_calls}
    if any(map(_SERVED_UNDER, view.invocations)):
        served = model.served_runs(view)
        if served:
            return _flatten_served(view, calls, served)
    rows: list[Row] = []
    placed: set[str] = set()
    for inv in view.invocations:
        rows.append(Row("inv", inv))
        for call_id in inv.remote_calls:
            call = calls.get(call_id)
            if call is not None:
                rows.append(Row("remote", call, 1))
                placed.add(call_id)
    for call in view.remote_calls:
        if call.call_id not in placed:
            rows.append(Row("remote", call, 1))
    return rows


def _flatten_served(view: TraceView, calls: dict[str, RemoteCallView],
                    served: dict[str, list[InvocationView]]) -> list[Row]:
    """:func:`_flatten` with served runs nested under their calls (a depth-first walk)."""
    nested = {inv.invocation_id for runs in served.values() for inv in runs}
    rows: list[Row] = []
    placed: set[str] = set()
    stack: list[tuple[InvocationView | RemoteCallView, int]] = []

    def walk() -> None:
        while stack:
            item, depth = stack.pop()
            if isinstance(item, InvocationView):
                rows.append(Row("inv", item, depth))
                made = [calls[c] for c in item.remote_calls if c in calls]
                stack.extend((call, depth + 1) for call in reversed(made))
            else:
                rows.append(Row("remote", item, depth))
                placed.add(item.call_id)
                stack.extend((inv, depth + 1) for inv in reversed(served.get(item.call_id, [])))

    for inv in view.invocations:
        if inv.invocation_id not in nested:
            stack.append((inv, 0))
            walk()
    for call in view.remote_calls:
        if call.call_id not in placed:
            stack.append((call, 1))
            walk()
    return rows


# ----------------------------------------------------------------- model seams


def build_view(events: Sequence[StoredEvent]) -> TraceView:
    """``model.build_trace(events)`` (the screens' one way in, so tests can swap it)."""
    return model.build_trace(events)


def view_at(view: TraceView, t: float) -> TraceView:
    """``view.at(t)``: the trace as it was at time ``t`` (in-flight invocations included)."""
    return view.at(t)


def remote_stats_for(view: TraceView) -> list[RemoteStats]:
    """``model.remote_stats(view)``: per-agent calls, errors, p50/p95."""
    return model.remote_stats(view)


def state_split(call: RemoteCallView, now: float | None = None) -> list[tuple[str, float]]:
    """The call's time per reported task state (``now`` closes a running call's last one)."""
    return call.state_split_ms(now)


def payload_preview(events: Sequence[EventRow], limit: int = 6) -> list[tuple[str, Any]]:
    """The kind-specific items of a row's events (latest value wins), at most ``limit``."""
    merged: dict[str, Any] = {}
    for ev in events:
        merged.update(ev.extra)
    return list(merged.items())[-limit:]
