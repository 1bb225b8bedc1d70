"""Folding a trace's events into the rows of a TraceView, and what follows from the
rows: the trace's status and its critical path.

:class:`Fold` applies events in order (all of them in ``build_trace``, only the
rows in flight at a replay time in ``_replay``); :func:`trace_status` and
:func:`critical_path` read the rows it made.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from penguiflow.state import EVENTS_LOST_KIND
from penguiflow.tracing import derived_span_id

from ._views import (
    CancelView,
    DeadlineView,
    InvocationView,
    RemoteCallView,
    Status,
)
from ._words import (
    finite,
)

if TYPE_CHECKING:
    from penguiflow.state import StoredEvent



#: Kinds the cancel & deadline views and the lost-event count are folded from (see
#: ``Fold.trace_level``).
TRACE_LEVEL = frozenset({"trace_cancel_start", "trace_cancel_finish", "remote_call_cancelled",
                          "node_trace_cancelled", "deadline_skip", EVENTS_LOST_KIND})


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def text_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def outcome_of(raw_attempt: tuple[Any, ...]) -> str:
    """The ``outcome`` of an attempt kept as a plain tuple (see InvocationView.attempts)."""
    return str(raw_attempt[3])


def _flow_error_message(payload: Mapping[str, Any]) -> str | None:
    flow_error = payload.get("flow_error")
    if isinstance(flow_error, Mapping) and flow_error.get("message") is not None:
        return str(flow_error["message"])
    return text_or_none(payload.get("exception"))


def _same_flow(cancel: CancelView, flow_id: str | None) -> bool:
    # A store without flow ids (older rows, save_event callers): one flow.
    return flow_id is None or cancel.flow_id is None or cancel.flow_id == flow_id


class Fold:
    """Applies one trace's events, in order, to the rows of a TraceView.

    Used three ways: over every event (``build_trace``), over the events of the
    rows in flight at a replay time, and over the trace-level events only
    (cancels and deadlines at a replay time).
    """

    def __init__(self, trace_id: str, *, index: bool = False) -> None:
        self.trace_id = trace_id
        self.invocations: dict[str, InvocationView] = {}
        self.calls: list[RemoteCallView] = []
        self.open_calls: dict[str, list[RemoteCallView]] = {}
        self.call_count: dict[str, int] = {}
        self.cancels: list[CancelView] = []
        self.deadlines: list[DeadlineView] = []
        self.events_lost = 0
        self.lost_reasons: list[str] = []
        self.start = math.inf
        self.end = -math.inf
        self.flow_name: str | None = None
        #: Per cancel: invocation id -> the first ts after the request it had an event.
        self.first_after: list[dict[str, float]] = []
        self.index = index
        #: With ``index``, the positions of each invocation's events as a chain (its
        #: first, its last, and per position the next one, -1 at the end): no list
        #: per invocation for the GC to track (dicts of ints are not tracked at all);
        #: ``borrowed``: positions of events without an invocation id that belong to
        #: an invocation's remote call (replay re-folds them with it); the last ts of
        #: each remote call; the positions of trace-level events.
        self.first_pos: dict[str, int] = {}
        self.last_pos: dict[str, int] = {}
        self.next_pos = array("q")
        self.borrowed: dict[str, list[int]] = {}
        self.last_ts: dict[str, float] = {}
        self.trace_level: list[int] = []
        #: The position of the event being applied.
        self.pos = 0
        #: flow id -> the span id its ``trace_parent`` event named (served flows only);
        #: ``late_parents``: one came after invocations had rows (fixed up in ``_finish``).
        self.flow_parents: dict[str, str] = {}
        self.late_parents = False

    # -- dispatch -------------------------------------------------------------------

    def apply(self, pos: int, ev: StoredEvent) -> None:
        """Apply one event to the rows (not to the event log: see ``build_trace``)."""
        self.pos = pos
        handler = HANDLERS.get(ev.kind)
        if handler is not None:
            handler(self, ev, ev.payload)

    def note_after_cancel(self, inv: str, ts: float, flow_id: str | None = None) -> None:
        """Remember the first event of ``inv`` after each cancel request of its flow
        (kept running?)."""
        for cancel, seen in zip(self.cancels, self.first_after, strict=True):
            if ts > cancel.requested and inv not in seen and _same_flow(cancel, flow_id):
                seen[inv] = ts

    def cancel_of(self, ev: StoredEvent) -> CancelView | None:
        """The latest cancel of ``ev``'s flow (events without a flow id: the latest)."""
        for cancel in reversed(self.cancels):
            if _same_flow(cancel, ev.flow_id):
                return cancel
        return None

    # -- invocations ----------------------------------------------------------------

    def _invocation(self, ev: StoredEvent) -> InvocationView | None:
        inv_id = ev.invocation_id
        if inv_id is None:
            return None
        inv = self.invocations.get(inv_id)
        if inv is None:
            inv = self.invocations[inv_id] = InvocationView(
                inv_id, ev.node_name or "?", ev.node_id, ev.ts, None, "running",
                finite(ev.queued_ts),
                tuple(ev.parent_invocation_ids), span_id=ev.span_id or inv_id,
                parent_span_id=ev.parent_span_id,
                served_under=self.flow_parents.get(ev.flow_id or "") if self.flow_parents else None)
        elif len(ev.parent_invocation_ids) > len(inv.parents):
            # A join names every input it joined on its terminal event.
            inv.parents = tuple(ev.parent_invocation_ids)
        return inv

    def node_start(self, ev: StoredEvent, payload: Mapping[str, Any]) -> None:
        inv = self._invocation(ev)
        if inv is not None:  # the AttemptView fields, in order (see InvocationView.attempts)
            inv.raw_attempts += ((ev.attempt, ev.ts, None, "running", None, None),)

    def _close_attempt(self, inv: InvocationView, ts: float,
                       outcome: Literal["ok", "error", "timeout", "cancelled"],
                       error: str | None = None) -> None:
        attempts = inv.raw_attempts
        if attempts and outcome_of(attempts[-1]) == "running":
            attempt, start, _end, _running, _error, backoff_ms = attempts[-1]
            inv.raw_attempts = (*attempts[:-1], (attempt, start, ts, outcome, error, backoff_ms))

    def node_error(self, ev: StoredEvent, payload: Mapping[str, Any]) -> None:
        inv = self._invocation(ev)
        if inv is not None:
            error = text_or_none(payload.get("exception"))
            self._close_attempt(inv, ev.ts, "error", error)

    def node_timeout(self, ev: StoredEvent, payload: Mapping[str, Any]) -> None:
        inv = self._invocation(ev)
        if inv is not None:
            error = text_or_none(payload.get("exception")) or "timeout"
            self._close_attempt(inv, ev.ts, "timeout", error)

    def node_retry(self, ev: StoredEvent, payload: Mapping[str, Any]) -> None:
        inv = self._invocation(ev)
        if inv is not None and inv.raw_attempts:
            sleep_s = _num(payload.get("sleep_s"))
            *head, (attempt, start, end, outcome, error, _backoff) = inv.raw_attempts
            inv.raw_attempts = (*head, (attempt, start, end, outcome, error,
                                        None if sleep_s is None else sleep_s * 1000.0))

    def node_success(self, ev: StoredEvent, payload: Mapping[str, Any]) -> None:
        inv = self._invocation(ev)
        if inv is not None:
            self._close_attempt(inv, ev.ts, "ok")
            inv.end, inv.status, inv.error = ev.ts, "ok", None

    def node_failed(self, ev: StoredEvent, payload: Mapping[str, Any]) -> None:
        inv = self._invocation(ev)
        if inv is not None:
            message = _flow_error_message(payload)
            self._close_attempt(inv, ev.ts, "error", text_or_none(payload.get("exception")))
            timed_out = bool(inv.raw_attempts) and outcome_of(inv.raw_attempts[-1]) == "timeout"
            inv.end, inv.error = ev.ts, message
            inv.status = "timeout" if timed_out else "error"

    def node_trace_cancelled(self, ev: StoredEvent, payload: Mapping[str, Any]) -> None:
        self._cancel_interrupted(ev)
        inv = self._invocation(ev)
        if inv is not None:
            self._close_attempt(inv, ev.ts, "cancelled")
            inv.end, inv.status = ev.ts, "cancelled"

    def node_abandoned(self, ev: StoredEvent, payload: Mapping[str, Any]) -> None:
        """Another worker took the input again: its worker had stopped mid-node."""
        inv = self._invocation(ev)
        if inv is not None:
            worker = text_or_none(payload.get("worker_id")) or "?"
            self._close_attempt(inv, ev.ts, "cancelled", f"abandoned: worker {worker} stopped")
            inv.end, inv.status = ev.ts, "cancelled"
            inv.error = (f"abandoned: worker {worker} stopped mid-node; worker "
                         f"{text_or_none(payload.get('claimed_by')) or '?'} ran its input again")

    # -- remote calls ---------------------------------------------------------------

    def remote_call_start(self, ev: StoredEvent, payload: Mapping[str, Any]) -> None:
        key = ev.invocation_id or ""
        index = self.call_count.get(key, 0)
        self.call_count[key] = index + 1
        call = RemoteCallView(
            f"{derived_span_id(self.trace_id, key, 'remote', str(index)):016x}",
            ev.invocation_id, ev.node_name, text_or_none(payload.get("remote_agent_url")),
            text_or_none(payload.get("remote_skill")), None, None, ev.ts, None, "running",
            bool(payload.get("remote_streaming")))
        sent = payload.get("remote_request_bytes")
        call.bytes_sent = sent if isinstance(sent, int) else None
        self.calls.append(call)
        self.open_calls.setdefault(key, []).append(call)
        inv = self.invocations.get(key)
        if inv is not None:
            inv.remote_calls += (call.call_id,)
        if self.index:
            self.last_ts[call.call_id] = ev.ts

    def _call(self, ev: StoredEvent, payload: Mapping[str, Any]) -> RemoteCallView | None:
        """The open call an event belongs to: same invocation, same task id if known."""
        task_id = payload.get("remote_task_id")
        if ev.invocation_id is None and task_id is not None:
            # The runtime's cancel watcher records remote_call_cancelled outside the
            # invocation's context (no invocation id): find the call by its task.
            open_calls = [c for calls in self.open_calls.values() for c in calls
                          if c.task_id == task_id]
        else:
            open_calls = self.open_calls.get(ev.invocation_id or "") or []
        if not open_calls:
            return None
        call = open_calls[-1]
        if task_id is not None:
            call = next((c for c in open_calls if c.task_id == task_id),
                        next((c for c in open_calls if c.task_id is None), call))
        context_id = payload.get("remote_context_id")
        if context_id is not None:
            call.context_id = str(context_id)
        if task_id is not None:
            call.task_id = str(task_id)
        url = payload.get("remote_agent_url")
        if url:
            call.agent_url = str(url)
        if self.index:
            self.last_ts[call.call_id] = ev.ts
            owner = call.invocation_id
            if ev.invocation_id is None and owner is not None:
                # Replay re-folds an invocation from its own events: make this one of them.
                self.borrowed.setdefault(owner, []).append(self.pos)
        return call

    def _end_call(self, call: RemoteCallView, ts: float,
                  outcome: Literal["success", "error", "cancelled"]) -> None:
        call.end, call.outcome = ts, outcome
        open_calls = self.open_calls.get(call.invocation_id or "")
        if open_calls:
            # By identity, from the end (usually the last call): `in`/`remove` compared
            # dataclasses field by field, O(n^2) for thousands of calls at once.
            for i in range(len(open_calls) - 1, -1, -1):
                if open_calls[i] is call:
                    del open_calls[i]
                    break

    @staticmethod
    def _state(call: RemoteCallView, state: Any, ts: float) -> None:
        if state is not None and (not call.states or call.states[-1][0] != state):
            call.states.append((str(state), ts))

    def remote_stream_event(self, ev: StoredEvent, payload: Mapping[str, Any]) -> None:
        call = self._call(ev, payload)
        if call is None:
            return
        call.stream_events += 1
        chunk_bytes = payload.get("remote_chunk_bytes")
        if isinstance(chunk_bytes, int):
            call.bytes_received = (call.bytes_received or 0) + chunk_bytes
        text_bytes = payload.get("remote_text_bytes")
        if isinstance(text_bytes, int) and text_bytes > 0:  # status-only events carry no text
            call.chunks += 1
            if call.time_to_first_chunk_ms is None:
                call.time_to_first_chunk_ms = (ev.ts - call.start) * 1000.0
            inv = self.invocations.get(ev.invocation_id or "")
            if inv is not None:
                inv.chunks += 1
        self._state(call, payload.get("remote_task_state"), ev.ts)

    def remote_call_success(self, ev: StoredEvent, payload: Mapping[str, Any]) -> None:
        call = self._call(ev, payload)
        if call is None:
            return
        received = payload.get("remote_response_bytes")
        if isinstance(received, int):
            call.bytes_received = received
        self._state(call, payload.get("remote_task_state"), ev.ts)
        self._end_call(call, ev.ts, "success")

    def remote_call_error(self, ev: StoredEvent, payload: Mapping[str, Any]) -> None:
        call = self._call(ev, payload)
        if call is None:
            return
        call.error = text_or_none(payload.get("remote_error"))
        self._end_call(call, ev.ts, "error")

    def remote_call_cancelled(self, ev: StoredEvent, payload: Mapping[str, Any]) -> None:
        reason = str(payload.get("remote_cancel_reason") or "trace_cancel")
        cancel = self.cancel_of(ev) if reason != "local_cancel" else None
        if cancel is not None:
            latency = payload.get("latency_ms")
            cancel.propagated.append((
                text_or_none(payload.get("remote_task_id")), ev.ts,
                float(latency) if isinstance(latency, int | float) else None, reason))
        call = self._call(ev, payload)
        if call is not None:
            call.error = f"cancelled ({reason})"
            self._end_call(call, ev.ts, "cancelled")

    def remote_cancel_error(self, ev: StoredEvent, payload: Mapping[str, Any]) -> None:
        """The remote CancelTask failed: the call was cancelled here all the same."""
        reason = str(payload.get("remote_cancel_reason") or "trace_cancel")
        error = text_or_none(payload.get("remote_error")) or "?"
        cancel = self.cancel_of(ev) if reason != "local_cancel" else None
        if cancel is not None:
            latency = payload.get("latency_ms")
            cancel.failed.append((
                text_or_none(payload.get("remote_task_id")), ev.ts,
                float(latency) if isinstance(latency, int | float) else None, reason, error))
        call = self._call(ev, payload)
        if call is not None:
            call.error = f"cancelled ({reason}); the remote cancel failed: {error}"
            self._end_call(call, ev.ts, "cancelled")

    # -- served runs ----------------------------------------------------------------

    def trace_parent(self, ev: StoredEvent, payload: Mapping[str, Any]) -> None:
        """A flow serving a remote caller's request in this trace names the caller's span."""
        parent = payload.get("parent_span_id")
        if ev.flow_id is None or not isinstance(parent, str) or not parent:
            return
        self.flow_parents[ev.flow_id] = parent.lower()
        if self.invocations:  # maybe some of this flow's: see _finish
            self.late_parents = True

    # -- cancels and deadlines ------------------------------------------------------

    def trace_cancel_start(self, ev: StoredEvent, payload: Mapping[str, Any]) -> None:
        self.cancels.append(CancelView(requested=ev.ts, acknowledged=None,
                                       flow_id=ev.flow_id, flow_name=ev.flow_name))
        self.first_after.append({})

    def trace_cancel_finish(self, ev: StoredEvent, payload: Mapping[str, Any]) -> None:
        cancel = self.cancel_of(ev)
        if cancel is not None and cancel.acknowledged is None:
            cancel.acknowledged = ev.ts

    def _cancel_interrupted(self, ev: StoredEvent) -> None:
        cancel = self.cancel_of(ev) if ev.invocation_id is not None else None
        if cancel is not None and ev.invocation_id is not None:
            cancel.interrupted.append((ev.invocation_id, ev.ts))

    def deadline_skip(self, ev: StoredEvent, payload: Mapping[str, Any]) -> None:
        deadline = _num(payload.get("deadline_s"))
        self.deadlines.append(DeadlineView(
            ev.node_name, ev.ts, deadline,
            None if deadline is None else (deadline - ev.ts) * 1000.0))

    def store_events_lost(self, ev: StoredEvent, payload: Mapping[str, Any]) -> None:
        """A store's marker: it could not keep ``events_lost`` events of this trace."""
        lost = payload.get("events_lost")
        if type(lost) is int and lost > 0:
            self.events_lost += lost
            self.lost_reasons.append(str(payload.get("reason") or "no reason recorded"))

    def trace_level_only(self, ev: StoredEvent) -> None:
        """Apply a trace-level event to the cancels and deadlines alone."""
        kind, payload = ev.kind, ev.payload
        if kind == "node_trace_cancelled":
            self._cancel_interrupted(ev)
        elif kind == "remote_call_cancelled":
            self.remote_call_cancelled(ev, payload)
        else:
            HANDLERS[kind](self, ev, payload)

    # -- results --------------------------------------------------------------------

    def close_orphan_calls(self, later: Mapping[str, float] | None = None) -> None:
        """Calls still open when their invocation ended were cut short locally.

        ``later``: call ids with an outcome event after the replay time (a
        remote cancel on its way back), which stay open.
        """
        for key, open_calls in self.open_calls.items():
            inv = self.invocations.get(key)
            if inv is None or inv.end is None:
                continue
            for call in list(open_calls):
                if later is not None and call.call_id in later:
                    continue
                call.error = call.error or "cut short locally (no remote outcome recorded)"
                self._end_call(call, inv.end, "cancelled")

    def kept_running(self) -> None:
        for cancel, seen in zip(self.cancels, self.first_after, strict=True):
            interrupted = {inv for inv, _ in cancel.interrupted}
            cancel.kept_running = [inv for inv in seen if inv not in interrupted]


Handler = Any  # Callable[[Fold, StoredEvent, Mapping[str, Any]], None]
HANDLERS: dict[str, Handler] = {
    name: getattr(Fold, name) for name in (
        "node_start", "node_error", "node_timeout", "node_retry", "node_success",
        "node_failed", "node_trace_cancelled", "node_abandoned", "remote_call_start",
        "remote_stream_event",
        "remote_call_success", "remote_call_error", "remote_call_cancelled",
        "remote_cancel_error", "trace_cancel_start", "trace_cancel_finish", "deadline_skip",
        "trace_parent", EVENTS_LOST_KIND)
}


def trace_status(invocations: Sequence[InvocationView], cancels: Sequence[CancelView],
                  deadlines: Sequence[DeadlineView], events_lost: int = 0) -> Status:
    """cancelled > error (an invocation failed; timeout if it timed out) > incomplete
    (the store lost events of the trace) > running > ok.

    A trace with no invocation but a deadline skip is ``skipped``. Lost events
    hide what would have decided between running and ok (a terminal event, a
    failure), so neither is shown; a cancel or a failure that was kept still is.
    """
    if cancels:
        return "cancelled"
    running = False
    timeout = False
    for inv in invocations:
        status = inv.status
        if status == "error":
            return "error"
        if status == "timeout":
            timeout = True
        elif status == "running":
            running = True
    if timeout:
        return "timeout"
    if events_lost:
        return "incomplete"
    if running:
        return "running"
    if not invocations and deadlines:
        return "skipped"
    return "ok"


def critical_path(invocations: Sequence[InvocationView], end: float,
                  by_id: Mapping[str, InvocationView] | None = None) -> list[str]:
    """The chain of invocations that determined the trace's duration, first to last.

    Starts from the invocation that ended last (one still running counts as
    ending at ``end``) and steps, repeatedly, to the parent (from the recorded
    wait graph, ``parent_invocation_ids``) that finished last: the input it
    actually waited for. ``by_id`` may map ids to rows (else built here).
    """
    if not invocations:
        return []
    lookup = by_id if by_id is not None else {i.invocation_id: i for i in invocations}

    def finished(inv: InvocationView) -> float:
        return inv.end if inv.end is not None else end

    current: InvocationView | None = max(invocations, key=finished)
    chain: list[str] = []
    seen: set[str] = set()
    # A malformed wait graph may have a cycle: the path stops before its first revisit.
    while current is not None and current.invocation_id not in seen:
        seen.add(current.invocation_id)
        chain.append(current.invocation_id)
        current = waited_for(current, lookup, end)
    chain.reverse()
    return chain


def waited_for(inv: InvocationView, lookup: Mapping[str, InvocationView],
                end: float) -> InvocationView | None:
    """The parent of ``inv`` that finished last (running ones finish at ``end``)."""
    best: InvocationView | None = None
    best_end = -math.inf
    for parent_id in inv.parents:
        parent = lookup.get(parent_id)
        if parent is None:
            continue
        parent_end = parent.end if parent.end is not None else end
        if parent_end > best_end:
            best, best_end = parent, parent_end
    return best
