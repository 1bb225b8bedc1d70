"""Plain-text and JSON renderings of the inspector's views (``--plain`` / ``--json``).

JSON keys are stable (documented in ``docs/guides/inspector.md``): times are
epoch seconds, durations milliseconds, ids strings, absent values ``null``.
Plain text is for people reading a terminal or a CI log: a summary line, a
waterfall drawn with block characters, remote calls, cancels, deadlines and
the critical path.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Final

from penguiflow.state import EVENTS_LOST_KIND, StoredEvent, TraceSummary

from ._event_log import BASE_KEYS, EventRows
from .model import (
    MARK_SYMBOL,
    STATUS_SYMBOL,
    AbandonedView,
    AttemptView,
    CancelView,
    DeadlineView,
    EventRow,
    HopView,
    InvocationView,
    RemoteCallView,
    TraceView,
    axis_fraction,
    bus_hops,
    cancel_flow,
    display_edge,
    display_name,
    format_clock,
    format_duration,
    format_offset,
    matches_kind,
    printable,
    remote_stats,
    served_runs,
    status_word,
)

__all__ = [
    "event_json",
    "trace_json_parts",
    "event_line",
    "lost_line",
    "summary_json",
    "summary_table",
    "trace_json",
    "trace_text",
]

#: Columns of the waterfall's bar.
BAR_WIDTH: Final = 40
#: Waterfall rows ``--plain`` prints before saying how many more there are.
MAX_ROWS: Final = 200
#: Lines of a failure's traceback ``--plain`` prints (``--json`` has all of it).
TRACEBACK_LINES: Final = 20


# -- JSON -------------------------------------------------------------------------------------


def _attempt(a: AttemptView) -> dict[str, Any]:
    return {"attempt": a.attempt, "start": a.start, "end": a.end, "outcome": a.outcome,
            "error": a.error, "backoff_ms": a.backoff_ms}


def _invocation(i: InvocationView) -> dict[str, Any]:
    return {
        "invocation_id": i.invocation_id, "node_name": i.node_name, "node_id": i.node_id,
        "status": status_word(i.status), "start": i.start, "end": i.end,
        "duration_ms": i.duration_ms,
        "queued_ts": i.queued_ts, "queue_wait_ms": i.queue_wait_ms, "parents": list(i.parents),
        "attempts": [_attempt(a) for a in i.attempts], "error": i.error, "chunks": i.chunks,
        "remote_calls": list(i.remote_calls), "span_id": i.span_id,
        "parent_span_id": i.parent_span_id, "served_under": i.served_under,
    }


def _remote(c: RemoteCallView) -> dict[str, Any]:
    return {
        "call_id": c.call_id, "invocation_id": c.invocation_id, "node_name": c.node_name,
        "agent_url": c.agent_url, "skill": c.skill, "context_id": c.context_id,
        "task_id": c.task_id, "start": c.start, "end": c.end, "latency_ms": c.latency_ms,
        "outcome": c.outcome, "streaming": c.streaming, "bytes_sent": c.bytes_sent,
        "bytes_received": c.bytes_received, "stream_events": c.stream_events,
        "time_to_first_chunk_ms": c.time_to_first_chunk_ms,
        "states": [{"state": s, "ts": ts} for s, ts in c.states],
        "state_split_ms": [{"state": s, "ms": ms} for s, ms in c.state_split_ms()],
        "error": c.error,
    }


def _cancel(c: CancelView) -> dict[str, Any]:
    return {
        "requested": c.requested, "acknowledged": c.acknowledged, "latency_ms": c.latency_ms,
        "propagated": [{"task_id": task, "ts": ts, "round_trip_ms": rtt, "reason": reason}
                       for task, ts, rtt, reason in c.propagated],
        "propagation_failed": [
            {"task_id": task, "ts": ts, "round_trip_ms": rtt, "reason": reason, "error": error}
            for task, ts, rtt, reason, error in c.failed],
        "interrupted": [{"invocation_id": inv, "ts": ts} for inv, ts in c.interrupted],
        "kept_running": list(c.kept_running),
        "flow_id": c.flow_id, "flow_name": c.flow_name,
    }


def _deadline(d: DeadlineView) -> dict[str, Any]:
    return {"node_name": d.node_name, "ts": d.ts, "deadline": d.deadline,
            "remaining_ms": d.remaining_ms}


def _event_json(ev: StoredEvent) -> dict[str, Any]:
    """One event of ``--json``'s ``events``: the event log's row (``EventRow``) as data,
    made straight from the stored event (no row object per event)."""
    payload = ev.payload
    latency = payload.get("latency_ms")
    extra_keys = payload.keys() - BASE_KEYS
    return {"seq": ev.seq, "ts": ev.ts, "kind": ev.kind, "node_name": ev.node_name,
            "invocation_id": ev.invocation_id, "attempt": ev.attempt,
            "latency_ms": latency if isinstance(latency, int | float) else None,
            "span_id": ev.span_id,
            "extra": {k: payload[k] for k in sorted(extra_keys)} if extra_keys else {}}


def _event_row(e: EventRow) -> dict[str, Any]:
    return {"seq": e.seq, "ts": e.ts, "kind": e.kind, "node_name": e.node_name,
            "invocation_id": e.invocation_id, "attempt": e.attempt, "latency_ms": e.latency_ms,
            "span_id": e.span_id, "extra": e.extra}


def trace_json_parts(view: TraceView) -> Iterator[tuple[str, Any]]:
    """The items of :func:`trace_json` in order, each list as an iterator made when it is
    reached: ``pf inspect --json`` writes them one by one without holding the whole
    view as data (a 200k-event trace was ~170 MB more and 1.5 s to build)."""
    yield from (("trace_id", view.trace_id), ("otel_trace_id", view.otel_trace_id),
                ("root_span_id", view.root_span_id), ("flow_name", view.flow_name),
                ("status", status_word(view.status)), ("events_lost", view.events_lost),
                ("start", view.start), ("end", view.end), ("duration_ms", view.duration_ms))
    yield "invocations", map(_invocation, view.invocations)
    yield "remote_calls", map(_remote, view.remote_calls)
    yield "remote_stats", ({"agent": s.agent, "calls": s.calls, "errors": s.errors,
                            "p50_ms": s.p50_ms, "p95_ms": s.p95_ms} for s in remote_stats(view))
    yield "cancels", map(_cancel, view.cancels)
    yield "deadlines", map(_deadline, view.deadlines)
    yield "critical_path", iter(view.critical_path)
    yield from _hops_json(view).items()
    events = view.events
    yield "events", (map(_event_json, events.stored()) if isinstance(events, EventRows)
                     else map(_event_row, events))


def trace_json(view: TraceView) -> dict[str, Any]:
    """The whole view as JSON-ready data (stable keys; see the inspector guide)."""
    return {key: list(value) if isinstance(value, Iterator) else value
            for key, value in trace_json_parts(view)}


def _hops_json(view: TraceView) -> dict[str, Any]:
    hops, abandoned = bus_hops(view)
    return {
        "hops": [{"ts": h.ts, "edge": h.edge, "edge_display": display_edge(h.edge),
                  "node_name": h.node_name, "worker": h.worker,
                  "waited_ms": h.waited_ms, "deliveries": h.deliveries,
                  "previous_worker": h.previous_worker} for h in hops],
        "abandoned": [{"invocation_id": a.invocation_id, "node_name": a.node_name,
                       "worker": a.worker} for a in abandoned],
    }


def summary_json(summary: TraceSummary) -> dict[str, Any]:
    """One ``pf traces`` row as JSON-ready data (``node_count`` is the store's name for
    the invocations started, kept; ``invocation_count`` says what it is)."""
    return {
        "trace_id": summary.trace_id, "flow_name": summary.flow_name, "status": summary.status,
        "started_ts": summary.started_ts, "ended_ts": summary.ended_ts,
        "duration_ms": summary.duration_ms, "node_count": summary.node_count,
        "invocation_count": summary.node_count,
        "error_count": summary.error_count, "remote_call_count": summary.remote_call_count,
        "event_count": summary.event_count, "events_lost": summary.events_lost,
        "nodes": list(summary.nodes),
    }


def event_json(event: StoredEvent) -> dict[str, Any]:
    """One stored event as JSON-ready data (``pf tail --json``)."""
    return {
        "trace_id": event.trace_id, "ts": event.ts, "kind": event.kind,
        "node_name": event.node_name, "node_id": event.node_id,
        "invocation_id": event.invocation_id,
        "parent_invocation_ids": list(event.parent_invocation_ids), "span_id": event.span_id,
        "parent_span_id": event.parent_span_id, "seq": event.seq, "attempt": event.attempt,
        "queued_ts": event.queued_ts, "flow_name": event.flow_name, "flow_id": event.flow_id,
        "payload": dict(event.payload),
    }


# -- plain text -------------------------------------------------------------------------------


_ms = format_duration
_p = printable


_clock = format_clock


def _bar(start: float, end: float | None, t0: float, span: float, width: int = BAR_WIDTH) -> str:
    """``start``..``end`` on a ``width``-column axis from ``t0`` over ``span`` seconds."""
    stop = end if end is not None else t0 + span
    if span > 0:
        left = int(axis_fraction(start, t0, t0 + span) * width)
        right = int(axis_fraction(stop, t0, t0 + span) * width + 0.999)
    else:
        left, right = 0, width
    left = min(max(left, 0), width - 1)
    right = min(max(right, left + 1), width)
    fill = "█" if end is not None else "▒"  # in flight: shaded to the axis' end
    return "·" * left + fill * (right - left) + "·" * (width - right)


def _glyphs(inv: InvocationView) -> str:
    marks = []
    retries = len(inv.attempts) - 1
    if retries > 0:
        marks.append(f"{MARK_SYMBOL['retry']}{retries}")
    timeouts = sum(a.outcome == "timeout" for a in inv.attempts)
    if timeouts:
        marks.append(f"{MARK_SYMBOL['timeout']}{timeouts}")
    if inv.chunks:
        marks.append(f"{MARK_SYMBOL['chunks']}{inv.chunks}")
    word = status_word(inv.status)
    if word != "succeeded":
        marks.append(STATUS_SYMBOL.get(word, ""))
    return " ".join(marks)


def lost_line(marker: StoredEvent | EventRow) -> str:
    """What a ``store_events_lost`` marker says, as one line for people:
    ``store lost 3 events of this trace: <reason>`` (the event log, ``--plain``,
    ``pf tail``); the reason is escaped (:func:`~penguiflow_inspector.model.printable`)."""
    items = marker.payload if isinstance(marker, StoredEvent) else marker.extra
    count = items.get("events_lost")
    count = count if type(count) is int else 0
    reason = _p(items.get("reason") or "") or "no reason recorded"
    return f"store lost {count} event{'' if count == 1 else 's'} of this trace: {reason}"


def _traceback_lines(view: TraceView, inv: InvocationView,
                     limit: int = TRACEBACK_LINES) -> list[str]:
    """The last ``traceback`` item among the invocation's events, indented and
    escaped, cut at ``limit`` lines; nothing when no event has one."""
    found: Any = None
    for row in view.events_of(inv.invocation_id):
        value = row.extra.get("traceback")
        if value:
            found = value
    # split("\n"), not splitlines(): that also breaks at \r, \x1c-\x1e and \x85, which
    # are shown escaped in the line they belong to.
    if isinstance(found, str):
        text_lines = found.rstrip("\n").split("\n")
    elif isinstance(found, list | tuple):
        text_lines = [line for item in found for line in str(item).rstrip("\n").split("\n")]
    else:
        return []
    out = [f"      {_p(line)}".rstrip() for line in text_lines[:limit]]
    if len(text_lines) > limit:
        more = len(text_lines) - limit
        out.append(f"      … {more} more line{'s' if more != 1 else ''} (pf inspect --json "
                   "has the whole traceback)")
    return out


def _error_lines(view: TraceView, max_rows: int) -> list[str]:
    """Every invocation with a failed attempt: its final error, or the attempts that
    failed before a retry worked; the failure's traceback when one was recorded."""
    failed = [i for i in view.invocations if matches_kind(i, "error")]
    if not failed:
        return []
    lines = ["", f"errors ({sum(i.status in ('error', 'timeout') for i in failed)} "
                 f"failed invocations, {len(failed)} with a failed attempt)"]
    for inv in failed[:max_rows]:
        head = f"  {_p(inv.node_name)} ({_p(inv.invocation_id)})"
        if inv.error:
            lines.append(f"{head} {status_word(inv.status)}: {_p(inv.error)}")
        else:
            lines.append(f"{head} {status_word(inv.status)} after a retry")
        for a in inv.attempts:
            if a.outcome in ("error", "timeout") and (a.error or a.outcome) != inv.error:
                how = "timed out" if a.outcome == "timeout" else "failed"
                lines.append(f"    attempt {a.attempt} {how}: {_p(a.error or a.outcome)}")
        lines += _traceback_lines(view, inv)
    lines += _more(len(failed), max_rows)
    return lines


def trace_text(view: TraceView, *, max_rows: int = MAX_ROWS) -> str:
    """A readable report of one trace (``pf inspect --plain``).

    A trace whose store lost events says so on its first line (``status
    incomplete (N events lost)``, or the lost count beside a cancelled or failed
    status) and lists each ``store_events_lost`` marker under ``incomplete``.
    Every text from the store is escaped (:func:`~penguiflow_inspector.model.printable`);
    statuses are the store's words (:data:`~penguiflow_inspector.model.STATUS_WORD`).
    """
    names = {i.invocation_id: _p(i.node_name) for i in view.invocations}
    lost = (f" ({view.events_lost} event{'s' if view.events_lost != 1 else ''} lost)"
            if view.events_lost else "")
    failed = sum(i.status in ("error", "timeout") for i in view.invocations)
    nodes = len({i.node_name for i in view.invocations})
    skipped = f"  {len(view.deadlines)} skipped" if view.deadlines else ""
    # Invocations with errors and failed remote calls apart: together they are
    # ERRORS (the store's error_count), but "4 with errors" of 1 invocation (a
    # remote node whose 3 attempts' calls failed) read as a contradiction.
    with_errors = sum(matches_kind(i, "error") for i in view.invocations)
    calls_failed = sum(c.outcome == "error" for c in view.remote_calls)
    calls = f"{len(view.remote_calls)} remote calls" + (
        f" ({calls_failed} failed)" if calls_failed else "")
    lines = [
        f"trace {_p(view.trace_id)}  flow {_p(view.flow_name or '-')}  "
        f"status {status_word(view.status)}{lost}  {_ms(view.duration_ms)}  "
        f"{len(view.invocations)} invocations of {nodes} nodes "
        f"({with_errors} with errors, {failed} failed){skipped}  "
        f"{calls}  {len(view.events)} events",
        f"started {_clock(view.start)}  otel trace id {view.otel_trace_id}  "
        f"root span id {view.root_span_id}",
    ]
    if view.events_lost:
        lines += ["", "incomplete: what follows lacks the events the store could not keep"]
        markers = _markers(view)
        lines += [f"  {format_offset(row.ts, view.start)}: {lost_line(row)}"
                  for row in markers[:max_rows]]
        lines += _more(len(markers), max_rows, "markers")
    lines += [
        "",
        f"waterfall (0 .. {_ms((view.end - view.start) * 1000)}; █ ran, ▒ still running; "
        f"{MARK_SYMBOL['retry']} retries, {MARK_SYMBOL['timeout']} timeouts, "
        f"{MARK_SYMBOL['chunks']} chunks, {STATUS_SYMBOL['failed']} failed, "
        f"{STATUS_SYMBOL['cancelled']} cancelled, {STATUS_SYMBOL['skipped']} skipped "
        "(deadline passed); * on the critical path)",
    ]
    hops = bus_hops(view)
    rows, total = _waterfall_rows(view, {a.invocation_id for a in hops[1]}, max_rows)
    lines.extend(rows)
    lines += _more(total, max_rows, "rows")
    lines += _error_lines(view, max_rows)
    if view.remote_calls:
        lines += ["", "remote calls"]
        for c in view.remote_calls[:max_rows]:
            split = " → ".join(f"{_p(s)} {_ms(ms)}" for s, ms in c.state_split_ms())
            first = ("" if c.time_to_first_chunk_ms is None
                     else ", first chunk " + _ms(c.time_to_first_chunk_ms))
            lines.append(
                f"  {_p(c.node_name or '-')} → {_p(c.agent_url or '-')} "
                f"skill {_p(c.skill or '-')}: "
                f"{status_word(c.outcome)} in {_ms(c.latency_ms)}{first}"
                f", sent {c.bytes_sent if c.bytes_sent is not None else '-'} B"
                f", received {c.bytes_received if c.bytes_received is not None else '-'} B"
                f", {c.stream_events} stream events")
            lines.append(f"      context {_p(c.context_id or '-')}  task {_p(c.task_id or '-')}  "
                         f"span {_p(c.call_id)}" + (f"  states: {split}" if split else ""))
            if c.error:
                lines.append(f"      {_p(c.error)}")
        lines += _more(len(view.remote_calls), max_rows, "remote calls")
        lines.append("  per agent:")
        for s in remote_stats(view):
            lines.append(f"    {_p(s.agent)}: {s.calls} calls, {s.errors} errors, "
                         f"p50 {_ms(s.p50_ms)}, p95 {_ms(s.p95_ms)}")
    for n, cancel in enumerate(view.cancels, 1):
        lines += ["", f"cancel {n}: requested at {format_offset(cancel.requested, view.start)}"
                  + _p(cancel_flow(view, cancel))]
        for task, ts, rtt, reason in cancel.propagated:
            lines.append(f"  propagated to task {_p(task or '?')} at "
                         f"{format_offset(ts, cancel.requested)} ({_p(reason)}, "
                         f"round trip {_ms(rtt)})")
        for task, ts, rtt, reason, error in cancel.failed:
            lines.append(f"  propagation to task {_p(task or '?')} FAILED at "
                         f"{format_offset(ts, cancel.requested)} ({_p(reason)}, "
                         f"after {_ms(rtt)}): {_p(error)}")
        if cancel.acknowledged is not None:
            lines.append(f"  acknowledged after {_ms(cancel.latency_ms)}")
        else:
            lines.append("  not acknowledged (yet)")
        for inv_id, ts in cancel.interrupted:
            lines.append(f"  interrupted {names.get(inv_id, '?')} ({_p(inv_id)}) after "
                         f"{_ms((ts - cancel.requested) * 1000)}")
        kept = ", ".join(f"{names.get(i, '?')} ({_p(i)})" for i in cancel.kept_running)
        lines.append(f"  kept running after the request: {kept or 'nothing'}")
    if view.deadlines:
        lines += ["", "deadlines (times from the trace's start)"]
        lines += [f"  {_p(d.node_name or '-')} skipped at {format_offset(d.ts, view.start)}: "
                  + _deadline_words(d, view.start) for d in view.deadlines[:max_rows]]
        lines += _more(len(view.deadlines), max_rows, "deadline skips")
    lines += _hop_lines(view, max_rows, hops)
    if view.critical_path:
        path = " → ".join(names.get(i, "?") for i in view.critical_path)
        lines += ["", f"critical path: {path}"]
    return "\n".join(lines) + "\n"


def _deadline_words(d: DeadlineView, origin: float) -> str:
    """``deadline was at +0.3 ms, passed 0.2 ms before`` (never an epoch)."""
    if d.deadline is None:
        return "its deadline had passed"
    late = "" if d.remaining_ms is None else (
        f", {_ms(-d.remaining_ms)} before the skip" if d.remaining_ms <= 0
        else f", {_ms(d.remaining_ms)} still left")
    return f"deadline was at {format_offset(d.deadline, origin)}{late}"


def _hop_lines(view: TraceView, max_rows: int,
               found: tuple[list[HopView], list[AbandonedView]]) -> list[str]:
    """The hops across processes (a flow run over a message bus), and the attempts
    abandoned by workers that stopped mid-node; nothing for a single-process trace."""
    hops, abandoned = found
    if not hops:
        return []
    waits = sorted(h.waited_ms for h in hops if h.waited_ms is not None)
    workers = {h.worker for h in hops if h.worker}  # (counted raw, printed escaped)
    lines = ["", f"hops across processes: {len(hops)} on {len(workers)} "
                 f"worker{'s' if len(workers) != 1 else ''}"
                 + (f", waited in the broker p50 {_ms(waits[len(waits) // 2])}, "
                    f"max {_ms(waits[-1])}" if waits else "")]
    for h in hops[:max_rows]:
        again = (f"  redelivered (delivery {h.deliveries}"
                 + (f", taken from stopped worker {_p(h.previous_worker)}" if h.previous_worker
                    else "") + ")") if h.deliveries > 1 else ""
        lines.append(f"  {format_offset(h.ts, view.start):>10} {_p(display_edge(h.edge)):<24} "
                     f"worker {_p(h.worker or '-')}  waited {_ms(h.waited_ms)}{again}")
    lines += _more(len(hops), max_rows, "hops")
    if abandoned:
        lines += ["", "abandoned attempts (their worker stopped mid-node; the input ran "
                      "again elsewhere)"]
        lines += [f"  {_p(a.node_name or '-')} ({_p(a.invocation_id)}) on worker {_p(a.worker)}"
                  for a in abandoned[:max_rows]]
        lines += _more(len(abandoned), max_rows, "abandoned attempts")
    return lines


def _more(total: int, shown: int, what: str = "") -> list[str]:
    """The line saying how many of a list ``--plain`` left out, if it left any out."""
    if total <= shown:
        return []
    return [f"  ... {total - shown} more {what + ' ' if what else ''}"
            "(pf inspect --json has them all)"]


def _markers(view: TraceView) -> list[EventRow]:
    """The trace's ``store_events_lost`` rows (a scan of the event log: only when some
    were folded)."""
    return [row for row in view.events if row.kind == EVENTS_LOST_KIND]


def _waterfall_rows(view: TraceView, abandoned: frozenset[str] | set[str] = frozenset(),
                    limit: int | None = None) -> tuple[list[str], int]:
    """The ``--plain`` waterfall lines, the first ``limit`` of them, and how many there
    are: invocations, remote calls and deadline skips in start order.

    Only the lines printed are formatted (~14 µs each: 1.4 s for the 100k rows of a
    200k-event trace, of which ``--plain`` prints 200).

    A served run (the invocations of another agent's flow that served a remote
    call in this trace, see :func:`served_runs`) is listed right under its
    call's line, one level deeper (``⤷``), with its own calls (``↳``). An
    invocation in ``abandoned`` (its worker stopped mid-node) says so as its status.
    """
    span = view.end - view.start
    critical = set(view.critical_path)

    def inv_line(inv: InvocationView, depth: int) -> str:
        mark = "*" if inv.invocation_id in critical else " "
        name = _p(inv.node_name)
        name = f"{'  ' * depth}⤷ {name}" if depth else name
        status = "abandoned" if inv.invocation_id in abandoned else status_word(inv.status)
        return (f"{mark} {name[:18]:<18} {status:<10} "
                f"{format_offset(inv.start, view.start):>10} "
                f"{_ms(inv.duration_ms):>9} "
                f"|{_bar(inv.start, inv.end, view.start, span)}| {_glyphs(inv)}").rstrip()

    def call_line(call: RemoteCallView, depth: int) -> str:
        label = f"{'  ' * depth}{MARK_SYMBOL['remote']} {_p(call.skill or call.node_name or '?')}"
        return (f"  {label[:18]:<18} {status_word(call.outcome):<10} "
                f"{format_offset(call.start, view.start):>10} "
                f"{_ms(call.latency_ms):>9} "
                f"|{_bar(call.start, call.end, view.start, span)}| remote").rstrip()

    def skip_line(d: DeadlineView) -> str:
        # A message dropped at a node because its deadline had passed: the node never ran.
        return (f"  {_p(display_name(d.node_name or '?'))[:18]:<18} {'skipped':<10} "
                f"{format_offset(d.ts, view.start):>10} {'-':>9} "
                f"|{_bar(d.ts, d.ts, view.start, span).replace('█', STATUS_SYMBOL['skipped'])}| "
                f"{STATUS_SYMBOL['skipped']} deadline passed")

    served = served_runs(view)
    nested = {inv.invocation_id for runs in served.values() for inv in runs}
    # Per level: its invocations and the calls they made, by start (a stable sort:
    # an invocation before a call that started at the same time).
    top: list[InvocationView | RemoteCallView | DeadlineView] = [
        i for i in view.invocations if i.invocation_id not in nested]
    top += view.deadlines
    made: dict[str, list[RemoteCallView]] = {}
    for call in view.remote_calls:
        if call.invocation_id is not None and call.invocation_id in nested:
            made.setdefault(call.invocation_id, []).append(call)
        else:
            top.append(call)
    top.sort(key=lambda item: item.ts if isinstance(item, DeadlineView) else item.start)
    if not served:  # the usual case: one level, already in order
        order = [(x, 0) for x in top]
    else:
        order = []
        stack: list[tuple[InvocationView | RemoteCallView | DeadlineView, int]] = [
            (x, 0) for x in reversed(top)]
    while served and stack:
        item, depth = stack.pop()
        order.append((item, depth))
        if not isinstance(item, RemoteCallView):
            continue
        runs = served.get(item.call_id)
        if runs:
            level: list[InvocationView | RemoteCallView | DeadlineView] = list(runs)
            for inv in runs:
                level += made.get(inv.invocation_id, [])
            level.sort(key=lambda x: x.ts if isinstance(x, DeadlineView) else x.start)
            stack.extend((x, depth + 1) for x in reversed(level))
    out = [inv_line(item, depth) if isinstance(item, InvocationView)
           else skip_line(item) if isinstance(item, DeadlineView)
           else call_line(item, depth)
           for item, depth in (order if limit is None else order[:limit])]
    return out, len(order)


def summary_table(summaries: Sequence[TraceSummary]) -> str:
    """``pf traces --plain``: one row per trace, a header first.

    STATUS is the store's word; NODES the distinct nodes that ran; INVOCATIONS the
    node invocations started; ERRORS the store's ``error_count``: failed invocations
    (an invocation with a failed attempt counts once, also when a retry fixed it;
    a failed remote call counts too);
    LOST the events the store could not keep (``-`` for none). Store text is escaped.
    """
    header = (f"{'TRACE ID':<32}  {'STARTED':<23}  {'DURATION':>9}  {'STATUS':<12}  "
              f"{'NODES':>5}  {'INVOCATIONS':>11}  {'ERRORS':>6}  {'REMOTE':>6}  "
              f"{'EVENTS':>6}  {'LOST':>6}  FLOW")
    lines = [header]
    for s in summaries:
        word = status_word(s.status)
        lines.append(f"{_p(s.trace_id):<32}  {_clock(s.started_ts):<23}  "
                     f"{_ms(s.duration_ms):>9}  {STATUS_SYMBOL.get(word, ' ')} {_p(word):<10}  "
                     f"{len(s.nodes):>5}  {s.node_count:>11}  {s.error_count:>6}  "
                     f"{s.remote_call_count:>6}  {s.event_count:>6}  "
                     f"{s.events_lost or '-':>6}  {_p(s.flow_name or '-')}")
    return "\n".join(lines) + "\n"


def event_line(event: StoredEvent) -> str:
    """``pf tail --plain``: one event on one line (a lost-events marker says what it
    means); store text escaped, edges in their display form."""
    if event.kind == EVENTS_LOST_KIND:
        return " ".join([_clock(event.ts), _p((event.trace_id or "-")[:12]),
                         lost_line(event)])
    payload = event.payload
    latency = payload.get("latency_ms")
    extra = {k: v for k, v in payload.items() if k in _SHOWN_EXTRA and v is not None}
    if isinstance(extra.get("edge"), str):
        extra["edge"] = display_edge(extra["edge"])
    parts = [_clock(event.ts), _p((event.trace_id or "-")[:12]), f"{_p(event.kind):<22}",
             f"{_p(display_name(event.node_name or '-')):<14}"]
    if event.attempt:
        parts.append(f"attempt {event.attempt}")
    if isinstance(latency, int | float) and latency:
        parts.append(_ms(float(latency)))
    parts += [f"{k}={_p(v)}" for k, v in extra.items()]
    return " ".join(parts).rstrip()


#: Extra items ``pf tail --plain`` shows (the rest is in --json).
_SHOWN_EXTRA: Final = ("exception", "remote_task_state", "remote_skill", "remote_error",
                       "remote_cancel_reason", "edge")
