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

import bisect
import datetime as dt
import math
import re
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import TYPE_CHECKING, Any, Final, Literal, NamedTuple

from penguiflow.state import ERROR_KINDS, EVENTS_LOST_KIND, counts_as_failed_invocation
from penguiflow.tracing import derived_span_id, otel_trace_id, root_span_id

from ._event_log import EventRow, EventRows

if TYPE_CHECKING:
    from penguiflow.state import StoredEvent

__all__ = [
    "MARK_SYMBOL",
    "STATUS_SYMBOL",
    "STATUS_WORD",
    "AbandonedView",
    "AttemptView",
    "HopView",
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
    "display_edge",
    "display_name",
    "failed_invocation_count",
    "format_duration",
    "format_offset",
    "matches_kind",
    "printable",
    "served_runs",
    "status_word",
]

Status = Literal["running", "ok", "error", "timeout", "cancelled", "skipped", "incomplete"]
"""A trace's or an invocation's status; only a trace is ``"incomplete"`` (see TraceView)."""


# -- shared vocabulary: what every output (pf traces, --plain, the TUI, --json) says --------

STATUS_WORD: Final[Mapping[str, str]] = {
    "ok": "succeeded", "error": "failed", "timeout": "failed", "cancelled": "cancelled",
    "running": "running", "skipped": "skipped", "incomplete": "incomplete",
    "succeeded": "succeeded", "failed": "failed", "success": "succeeded",
}
"""A model status (:data:`Status`, a remote call's outcome) -> the store's word for it.

The words are the store's (``TraceSummary.status``: succeeded, failed, cancelled,
running, incomplete) plus ``skipped`` (a message dropped because its deadline had
passed). A timeout is a failure: it says ``failed`` (its symbol is
``MARK_SYMBOL["timeout"]``). The store's own words map to themselves."""

STATUS_SYMBOL: Final[Mapping[str, str]] = {
    "succeeded": "✓", "failed": "!", "cancelled": "✕", "running": "▸", "skipped": "↷",
    "incomplete": "?",
}
"""A status word (:data:`STATUS_WORD`'s values) -> its one-cell symbol."""

MARK_SYMBOL: Final[Mapping[str, str]] = {
    "retry": "↻", "timeout": "◔", "chunks": "≋", "critical": "◆", "remote": "↳",
}
"""Markers after a row's name: ``↻n`` retries, ``◔`` an attempt timed out, ``≋n``
stream chunks; ``◆`` the critical path; ``↳`` a remote call under its invocation."""


def status_word(status: str) -> str:
    """The word every output shows for a model status or remote outcome (see
    :data:`STATUS_WORD`); an unknown status is returned as it is."""
    return STATUS_WORD.get(status, status)


def axis_fraction(t: float, t0: float, t1: float) -> float:
    """Where ``t`` falls on the time axis ``t0``..``t1``, as a fraction in [0, 1]; 0
    when that is no number: stored times so far apart that their difference
    overflows (``1e308`` and ``-1e308``: an infinite span) or not finite at all."""
    try:
        frac = (t - t0) / (t1 - t0)
    except (ZeroDivisionError, OverflowError):
        return 0.0
    return min(max(frac, 0.0), 1.0) if math.isfinite(frac) else 0.0


def _finite(value: Any) -> float | None:
    """``value`` if it is a finite number, else None: a stored ``queued_ts`` of NaN
    or infinity (nothing checks it on the way in) is shown as unknown, never drawn."""
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def format_clock(ts: float, pattern: str | None = None, *, utc: bool = False) -> str:
    """``ts`` (epoch seconds) as a local (or UTC) time, by ``pattern`` (strftime) or
    to the millisecond. A stored time that is no time (NaN, infinite, or out of
    the calendar's range: a writer that recorded milliseconds) is shown as its
    number (``ts=1.7e+12``), never an error: one odd event must not stop a view."""
    try:
        moment = dt.datetime.fromtimestamp(ts, dt.UTC if utc else None)
    except (OverflowError, OSError, ValueError, TypeError):
        return f"ts={ts:.3g}" if isinstance(ts, float | int) else "ts=?"
    return (moment.strftime(pattern) if pattern
            else moment.isoformat(sep=" ", timespec="milliseconds"))


def format_duration(ms: float | None) -> str:
    """A duration in milliseconds for people, in at most 9 cells: ``0.8 ms``,
    ``812.4 ms``, ``1.23 s``, ``143 s``; ``-`` for None. Every output formats
    durations with it, so two screens showing one duration print the same text."""
    if ms is None or math.isnan(ms):
        return "-"
    sign, ms = ("-", -ms) if ms < 0 else ("", ms)
    if ms < 999.95:
        return f"{sign}{ms:.1f} ms"
    if ms < 99_995:
        return f"{sign}{ms / 1000:.2f} s"
    return f"{sign}{ms / 1000:.0f} s"


def format_offset(ts: float | None, origin: float) -> str:
    """``ts`` relative to ``origin`` (both epoch seconds): ``+1.23 s`` after it,
    ``-0.8 ms`` before it (never ``+-``); ``-`` for None."""
    if ts is None:
        return "-"
    ms = (ts - origin) * 1000.0
    return ("-" if ms < 0 else "+") + format_duration(abs(ms))


#: Characters a terminal could act on: C0 controls, DEL, C1 controls (U+0080-U+009F,
#: e.g. U+009B, a one-character CSI), and lone surrogates (not encodable: a crash).
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_UNPRINTABLE_BUT_NEWLINE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\ud800-\udfff]")
_SHORT_ESCAPES: Final = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    short = _SHORT_ESCAPES.get(char)
    if short is not None:
        return short
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x80 else f"\\u{code:04x}"


def printable(text: object, *, multiline: bool = False) -> str:
    """``text`` (from a store: names, ids, errors, payloads) safe to print to a terminal.

    Every control character is shown escaped, never written raw: C0 (``\\x1b``,
    ``\\x07``, ``\\x00``, ``\\n``, ``\\t``, ``\\r``), DEL (``\\x7f``), C1
    (``\\u009b``) and lone surrogates (``\\ud800``). With ``multiline`` newlines are
    kept (a traceback); everything else is. Other Unicode passes unchanged. A node
    named ``"x\\x1b]0;pwned\\x07"`` would otherwise retitle the user's terminal.
    Non-str values are ``str()``-ed first; the text is returned as is when clean
    (one regex search).
    """
    text = text if isinstance(text, str) else str(text)
    pattern = _UNPRINTABLE_BUT_NEWLINE if multiline else _UNPRINTABLE
    return pattern.sub(_escape, text) if pattern.search(text) else text


#: The runtime's internal endpoints (``penguiflow.core``): messages enter a flow from
#: OpenSea and leave it to Rookery. Users see the words below instead.
_ENDPOINT_WORDS: Final = {"OpenSea": "emit", "Rookery": "result"}


def display_name(name: str) -> str:
    """A node name as users see it: the runtime's endpoints ``OpenSea`` and ``Rookery``
    (named on events such as ``trace_cancel_finish``) read ``emit`` and ``result``."""
    return _ENDPOINT_WORDS.get(name, name)


def display_edge(edge: str) -> str:
    """An edge label as users see it: ``OpenSea->a`` reads ``emit->a``, ``a->Rookery``
    reads ``a->result`` (the runtime's internal endpoint names never reach the user;
    ``--json`` keeps the raw label)."""
    parts = edge.split("->")
    return "->".join(_ENDPOINT_WORDS.get(p.strip(), p) for p in parts)


class AttemptView(NamedTuple):
    """One attempt of an invocation (see :attr:`InvocationView.attempts`)."""

    attempt: int
    start: float
    end: float | None
    outcome: Literal["running", "ok", "error", "timeout", "cancelled"]
    error: str | None = None
    backoff_ms: float | None = None
    """The sleep before the next attempt, when this one was retried."""


@dataclass(slots=True)
class InvocationView:
    """One execution of one node on one input (all attempts): a waterfall row."""

    invocation_id: str
    node_name: str
    node_id: str | None
    start: float
    end: float | None
    """None while still running (at the replay time)."""
    status: Status
    queued_ts: float | None
    parents: tuple[str, ...]
    raw_attempts: tuple[tuple[Any, ...], ...] = field(default=(), repr=False)
    """:attr:`attempts` as plain tuples of the AttemptView fields (read ``attempts``)."""
    error: str | None = None
    """The final exception repr or FlowError message."""
    chunks: int = 0
    remote_calls: tuple[str, ...] = ()
    """ids of the RemoteCallView rows this invocation made."""
    span_id: str | None = None
    parent_span_id: str | None = None
    served_under: str | None = None
    """The call id (CLIENT span id) of the remote call this invocation's flow served.

    Set when the invocation's flow recorded a ``trace_parent`` event (an agent
    serving another agent's request in the caller's trace): its
    ``parent_span_id``. It may name a call that is not in this trace (the
    caller records elsewhere); see :func:`served_runs` for the ones that are.
    """

    @property
    def attempts(self) -> tuple[AttemptView, ...]:
        """Every attempt, in order; the last one may still be running.

        Kept as plain tuples of atoms, which the cyclic GC stops tracking after
        its first look, and named when read: a list of slotted objects per
        invocation was two more long-lived containers that every later full
        collection traversed (50k invocations: ~0.1 s of ``build_trace``).
        """
        return tuple(map(AttemptView._make, self.raw_attempts))

    @property
    def duration_ms(self) -> float | None:
        return None if self.end is None else (self.end - self.start) * 1000.0

    @property
    def queue_wait_ms(self) -> float | None:
        return None if self.queued_ts is None else (self.start - self.queued_ts) * 1000.0


@dataclass(slots=True)
class RemoteCallView:
    """One RemoteNode call: a waterfall row and a Remote-tab row."""

    call_id: str
    """The derived CLIENT span id (16 hex), unique within the trace."""
    invocation_id: str | None
    node_name: str | None
    agent_url: str | None
    skill: str | None
    context_id: str | None
    task_id: str | None
    start: float
    end: float | None
    outcome: Literal["running", "success", "error", "cancelled"]
    streaming: bool
    bytes_sent: int | None = None
    bytes_received: int | None = None
    stream_events: int = 0
    chunks: int = 0
    """Stream events that carried text (``≋``): status-only events are not chunks."""
    time_to_first_chunk_ms: float | None = None
    states: list[tuple[str, float]] = field(default_factory=list)
    """A2A task states as reported, with the time each was seen."""
    error: str | None = None

    @property
    def latency_ms(self) -> float | None:
        return None if self.end is None else (self.end - self.start) * 1000.0

    def state_split_ms(self, now: float | None = None) -> list[tuple[str, float]]:
        """Time spent in each reported task state, in order (ms).

        A state lasts from the time it was first seen to the time the next one
        was seen, the last one until the call ended (or ``now``, for a call
        still running; without ``now`` a running call's last state is left
        out). Time before the first reported state is not attributed. A unary
        call reports only its final state: one segment of 0 ms.
        """
        out: list[tuple[str, float]] = []
        last = len(self.states) - 1
        for i, (state, seen) in enumerate(self.states):
            if i < last:
                until: float | None = self.states[i + 1][1]
            else:
                until = self.end if self.end is not None else now
            if until is not None:
                out.append((state, max(0.0, (until - seen) * 1000.0)))
        return out


@dataclass(slots=True)
class RemoteStats:
    """Per-agent latency summary for the Remote tab."""

    agent: str
    calls: int
    errors: int
    p50_ms: float | None
    p95_ms: float | None


@dataclass(slots=True)
class CancelView:
    """One trace cancel: requested → propagated (per remote cancel) → acknowledged."""

    requested: float
    acknowledged: float | None
    propagated: list[tuple[str | None, float, float | None, str]] = field(default_factory=list)
    """Per remote CancelTask: (task id, time, round trip ms, reason)."""
    failed: list[tuple[str | None, float, float | None, str, str]] = field(default_factory=list)
    """Per remote CancelTask that failed (``remote_cancel_error``): (task id, time,
    round trip ms, reason, the error)."""
    interrupted: list[tuple[str, float]] = field(default_factory=list)
    """Invocations interrupted by the cancel: (invocation id, time)."""
    kept_running: list[str] = field(default_factory=list)
    """Invocation ids that still produced events after the cancel was requested."""

    @property
    def latency_ms(self) -> float | None:
        return None if self.acknowledged is None else (self.acknowledged - self.requested) * 1e3


@dataclass(slots=True)
class DeadlineView:
    """A message skipped because its deadline had passed."""

    node_name: str | None
    ts: float
    deadline: float | None
    remaining_ms: float | None


@dataclass(slots=True, repr=False)
class TraceView:
    """Everything the screens show about one trace."""

    trace_id: str
    flow_name: str | None
    start: float
    end: float
    status: Status
    """cancelled > error > timeout > incomplete > running > ok (or skipped): see
    :func:`build_trace`."""
    invocations: list[InvocationView]
    """In start order."""
    remote_calls: list[RemoteCallView]
    events: Sequence[EventRow]
    """The event log, in ``load_history`` order: rows built when read (see ``_event_log``)."""
    cancels: list[CancelView]
    deadlines: list[DeadlineView]
    critical_path: list[str]
    """Invocation ids, first to last, of the chain that determined the duration."""
    otel_trace_id: str = ""
    root_span_id: str = ""
    replay_t: float | None = None
    """The time this view was rebuilt at by :meth:`at`; None for the whole trace."""
    events_lost: int = 0
    """Events of this trace the store could not keep, as its ``store_events_lost``
    markers count them (at the replay time: the markers recorded by then)."""
    lost_reasons: tuple[str, ...] = ()
    """Why, per marker, in order (``"dropped: the store's buffer was full ..."``)."""
    first_event_ts: float | None = None
    """``ts`` of the trace's first event, where :attr:`duration_ms` starts (``start``,
    the root span's start and the waterfall's axis, may be earlier: the first
    ingress' ``queued_ts``)."""
    _index: _Index | None = field(default=None, compare=False)

    def __repr__(self) -> str:
        # Short on purpose: asyncio formats a finished task's result with repr()
        # (CPython 3.11's asyncio.run does, for its SIGINT handler), and the
        # dataclass repr of a 100k-event view took ~1.2 s.
        return (f"<TraceView {self.trace_id} {self.status}: {len(self.invocations)} "
                f"invocations, {len(self.remote_calls)} remote calls, "
                f"{len(self.events)} events>")

    @property
    def duration_ms(self) -> float:
        """First event to last (at a replay time: to ``end``), in ms: the store's
        ``TraceSummary.duration_ms``, so ``pf traces`` and ``pf inspect`` agree."""
        origin = self.start if self.first_event_ts is None else self.first_event_ts
        return max(0.0, (self.end - origin) * 1000.0)

    @property
    def event_times(self) -> Sequence[float]:
        """``ts`` of every event of the whole trace, in log order (shared by replayed views)."""
        if self._index is None:
            return [row.ts for row in self.events]
        return self._index.ts

    def events_of(self, invocation_id: str) -> Sequence[EventRow]:
        """The events whose ``invocation_id`` is this one, in order (at a replay time:
        those at or before it)."""
        index = self._index
        if index is None:
            return [row for row in self.events if row.invocation_id == invocation_id]
        positions = index.own_positions(invocation_id)
        if self.replay_t is not None:
            t, ts = self.replay_t, index.ts
            positions = [p for p in positions if ts[p] <= t]
        return EventRows(index.events, positions)

    def invocation(self, invocation_id: str) -> InvocationView | None:
        """The invocation with this id, or None (a linear scan)."""
        return next((i for i in self.invocations if i.invocation_id == invocation_id), None)

    def remote_call(self, call_id: str) -> RemoteCallView | None:
        """The remote call with this id, or None (a linear scan)."""
        return next((c for c in self.remote_calls if c.call_id == call_id), None)

    def prepare_replay(self) -> None:
        """Build the index :meth:`at` uses now (else on the first ``at``); idempotent.

        ~0.1 s CPU at 100k events (0.2 s at 200k) on the shared 2-core machine: a
        TUI can call it in a worker after the first paint so that the first replay
        step is quick.
        """
        if self._index is None:
            raise ValueError("TraceView.prepare_replay needs a view made by build_trace")
        self._index.prepare()

    def at(self, t: float) -> TraceView:
        """The trace as it was at time ``t`` (epoch seconds), from its events with ts <= t.

        Invocations and remote calls in flight at ``t`` have ``end=None`` and
        status ``"running"`` / outcome ``"running"``; ``end`` of the view is
        ``t`` clipped to the trace's span; ``replay_t`` is ``t``. Rows that had
        finished by ``t`` are shared with the full view (treat views as
        read-only). Calling ``at`` on a replayed view rebuilds from the whole
        trace again, so a scrubber can go backwards.

        Cost: bisections, a look at the blocks of invocations started by ``t``
        that have events after it, a re-fold of the events of those rows only,
        and the critical path walked back only until it joins the whole trace's
        (then a slice of it); the event log is cut with a ``range``, not copied.
        Measured on a 100k-event trace (50k invocations in one chain: the longest
        critical path), CPython 3.11 on the shared 2-core machine, the cyclic GC
        running as usual: ~0.2 ms CPU per step (0.4 ms at 200k events; 18-21 ms
        when the path was walked to its root at every step; the target for a
        whole replay step on screen is < 50 ms), after a one-off index build
        (see :meth:`prepare_replay`). ``benchmarks/inspector.py`` measures a step
        on screen (``step``); ``tests/inspector/test_model_perf.py`` checks the
        view it gives on that trace.
        """
        index = self._index
        if index is None:
            raise ValueError("TraceView.at needs a view made by build_trace")
        return index.at(t)


# -- building ---------------------------------------------------------------------------------

#: Kinds the cancel & deadline views and the lost-event count are folded from (see
#: ``_Fold.trace_level``).
_TRACE_LEVEL = frozenset({"trace_cancel_start", "trace_cancel_finish", "remote_call_cancelled",
                          "node_trace_cancelled", "deadline_skip", EVENTS_LOST_KIND})


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _outcome(raw_attempt: tuple[Any, ...]) -> str:
    """The ``outcome`` of an attempt kept as a plain tuple (see InvocationView.attempts)."""
    return str(raw_attempt[3])


def _flow_error_message(payload: Mapping[str, Any]) -> str | None:
    flow_error = payload.get("flow_error")
    if isinstance(flow_error, Mapping) and flow_error.get("message") is not None:
        return str(flow_error["message"])
    return _text(payload.get("exception"))


class _Fold:
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
        handler = _HANDLERS.get(ev.kind)
        if handler is not None:
            handler(self, ev, ev.payload)

    def note_after_cancel(self, inv: str, ts: float) -> None:
        """Remember the first event of ``inv`` after each cancel request (kept running?)."""
        for cancel, seen in zip(self.cancels, self.first_after, strict=True):
            if ts > cancel.requested and inv not in seen:
                seen[inv] = ts

    # -- invocations ----------------------------------------------------------------

    def _invocation(self, ev: StoredEvent) -> InvocationView | None:
        inv_id = ev.invocation_id
        if inv_id is None:
            return None
        inv = self.invocations.get(inv_id)
        if inv is None:
            inv = self.invocations[inv_id] = InvocationView(
                inv_id, ev.node_name or "?", ev.node_id, ev.ts, None, "running",
                _finite(ev.queued_ts),
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
        if attempts and _outcome(attempts[-1]) == "running":
            attempt, start, _end, _running, _error, backoff_ms = attempts[-1]
            inv.raw_attempts = (*attempts[:-1], (attempt, start, ts, outcome, error, backoff_ms))

    def node_error(self, ev: StoredEvent, payload: Mapping[str, Any]) -> None:
        inv = self._invocation(ev)
        if inv is not None:
            error = _text(payload.get("exception"))
            self._close_attempt(inv, ev.ts, "error", error)

    def node_timeout(self, ev: StoredEvent, payload: Mapping[str, Any]) -> None:
        inv = self._invocation(ev)
        if inv is not None:
            error = _text(payload.get("exception")) or "timeout"
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
            self._close_attempt(inv, ev.ts, "error", _text(payload.get("exception")))
            timed_out = bool(inv.raw_attempts) and _outcome(inv.raw_attempts[-1]) == "timeout"
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
            worker = _text(payload.get("worker_id")) or "?"
            self._close_attempt(inv, ev.ts, "cancelled", f"abandoned: worker {worker} stopped")
            inv.end, inv.status = ev.ts, "cancelled"
            inv.error = (f"abandoned: worker {worker} stopped mid-node; worker "
                         f"{_text(payload.get('claimed_by')) or '?'} ran its input again")

    # -- remote calls ---------------------------------------------------------------

    def remote_call_start(self, ev: StoredEvent, payload: Mapping[str, Any]) -> None:
        key = ev.invocation_id or ""
        index = self.call_count.get(key, 0)
        self.call_count[key] = index + 1
        call = RemoteCallView(
            f"{derived_span_id(self.trace_id, key, 'remote', str(index)):016x}",
            ev.invocation_id, ev.node_name, _text(payload.get("remote_agent_url")),
            _text(payload.get("remote_skill")), None, None, ev.ts, None, "running",
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
        call.error = _text(payload.get("remote_error"))
        self._end_call(call, ev.ts, "error")

    def remote_call_cancelled(self, ev: StoredEvent, payload: Mapping[str, Any]) -> None:
        reason = str(payload.get("remote_cancel_reason") or "trace_cancel")
        if reason != "local_cancel" and self.cancels:
            latency = payload.get("latency_ms")
            self.cancels[-1].propagated.append((
                _text(payload.get("remote_task_id")), ev.ts,
                float(latency) if isinstance(latency, int | float) else None, reason))
        call = self._call(ev, payload)
        if call is not None:
            call.error = f"cancelled ({reason})"
            self._end_call(call, ev.ts, "cancelled")

    def remote_cancel_error(self, ev: StoredEvent, payload: Mapping[str, Any]) -> None:
        """The remote CancelTask failed: the call was cancelled here all the same."""
        reason = str(payload.get("remote_cancel_reason") or "trace_cancel")
        error = _text(payload.get("remote_error")) or "?"
        if reason != "local_cancel" and self.cancels:
            latency = payload.get("latency_ms")
            self.cancels[-1].failed.append((
                _text(payload.get("remote_task_id")), ev.ts,
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
        self.cancels.append(CancelView(requested=ev.ts, acknowledged=None))
        self.first_after.append({})

    def trace_cancel_finish(self, ev: StoredEvent, payload: Mapping[str, Any]) -> None:
        if self.cancels and self.cancels[-1].acknowledged is None:
            self.cancels[-1].acknowledged = ev.ts

    def _cancel_interrupted(self, ev: StoredEvent) -> None:
        if self.cancels and ev.invocation_id is not None:
            self.cancels[-1].interrupted.append((ev.invocation_id, ev.ts))

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
            _HANDLERS[kind](self, ev, payload)

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


_Handler = Any  # Callable[[_Fold, StoredEvent, Mapping[str, Any]], None]
_HANDLERS: dict[str, _Handler] = {
    name: getattr(_Fold, name) for name in (
        "node_start", "node_error", "node_timeout", "node_retry", "node_success",
        "node_failed", "node_trace_cancelled", "node_abandoned", "remote_call_start",
        "remote_stream_event",
        "remote_call_success", "remote_call_error", "remote_call_cancelled",
        "remote_cancel_error", "trace_cancel_start", "trace_cancel_finish", "deadline_skip",
        "trace_parent", EVENTS_LOST_KIND)
}


def _trace_status(invocations: Sequence[InvocationView], cancels: Sequence[CancelView],
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
    while current is not None:
        chain.append(current.invocation_id)
        current = _waited_for(current, lookup, end)
        if len(chain) > len(lookup):  # a cycle: a malformed wait graph
            break
    chain.reverse()
    return chain


def _waited_for(inv: InvocationView, lookup: Mapping[str, InvocationView],
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


@dataclass(frozen=True, slots=True)
class HopView:
    """One message a process took from the message bus (a ``message_fetch`` event)."""

    ts: float
    edge: str
    node_name: str | None
    worker: str | None
    """The worker id (flow id) of the process that took it."""
    waited_ms: float | None
    """From when it was sent to when it was taken: the time it spent in the broker."""
    deliveries: int
    previous_worker: str | None
    """Who held it before, when it was claimed from a worker that stopped."""


@dataclass(frozen=True, slots=True)
class AbandonedView:
    """An attempt that started on a worker that stopped before it ended; its input
    was delivered again to another worker (see :func:`bus_hops`)."""

    invocation_id: str
    node_name: str | None
    worker: str


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
                None if (queued := _finite(ev.queued_ts)) is None else (ev.ts - queued) * 1000.0,
                deliveries if isinstance(deliveries, int) else 1,
                previous if isinstance(previous, str) else None))
        elif ev.kind == "node_start" and ev.invocation_id is not None:
            started.setdefault(ev.invocation_id, (ev.node_name, ev.flow_id))
        elif ev.kind == "node_abandoned" and ev.invocation_id is not None:
            closed[ev.invocation_id] = _text(ev.payload.get("worker_id")) or "?"
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
    fold = _Fold(trace_id, index=True)
    _fold_all(fold, events)
    return _finish(trace_id, events, fold)


def _fold_all(fold: _Fold, events: Sequence[StoredEvent]) -> None:
    """The hot loop of ``build_trace``: the replay index and the rows."""
    # Locals, not attribute look-ups: this runs once per event (~2 µs each).
    first, last = fold.first_pos, fold.last_pos
    fold.next_pos = nxt = array("q", [-1]) * len(events)
    trace_level = fold.trace_level
    handlers = _HANDLERS
    trace_kinds = _TRACE_LEVEL
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
                fold.note_after_cancel(inv, ev.ts)
        if kind in trace_kinds:
            trace_level.append(pos)
        handler = handlers.get(kind)
        if handler is not None:
            fold.pos = pos
            handler(fold, ev, ev.payload)


def _finish(trace_id: str, events: Sequence[StoredEvent], fold: _Fold) -> TraceView:
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
        status=_trace_status(invocations, fold.cancels, fold.deadlines, fold.events_lost),
        invocations=invocations, remote_calls=calls, events=EventRows(events),
        cancels=fold.cancels, deadlines=fold.deadlines,
        critical_path=critical_path(invocations, fold.end),
        otel_trace_id=otel_trace_id(trace_id) if trace_id else "",
        root_span_id=root_span_id(trace_id) if trace_id else "",
        events_lost=fold.events_lost, lost_reasons=tuple(fold.lost_reasons),
        first_event_ts=min(times))
    view._index = _Index(view, events, fold, times)
    return view


def _served_late(events: Sequence[StoredEvent], fold: _Fold) -> None:
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


#: Invocations per block of ``_Index.block_lasts``.
_BLOCK = 64


class _Index:
    """What :meth:`TraceView.at` needs to rebuild the trace at a time quickly.

    Everything that is O(invocations) is computed once here; a step is then a
    few bisections, one pass over the invocations started by ``t`` and a
    re-fold of the rows with events after ``t``.
    """

    def __init__(self, view: TraceView, events: Sequence[StoredEvent], fold: _Fold,
                 ts: list[float]) -> None:
        self.view = view
        self.events = events
        #: ``ts`` of every event, in log order.
        self.ts = ts
        self.first_pos, self.next_pos, self.borrowed = fold.first_pos, fold.next_pos, fold.borrowed
        self.fold: _Fold | None = fold

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
            parent = _waited_for(inv, self.by_id, math.inf)
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
        sub = _Fold(view.trace_id)
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
        trace_level = _Fold(view.trace_id)
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
        limit = len(self.by_id)
        while last is not None and len(chain) <= limit:
            on_spine = spine_at.get(last)
            if on_spine is not None and spine_final[on_spine] <= t:
                # From here back, every choice is the whole trace's: a slice of the spine.
                chain.reverse()
                return self.spine[: on_spine + 1] + chain
            chain.append(last)
            if final[last] <= t:
                last = waited[last]
            else:
                parent = _waited_for(lookup[last], lookup, t)
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
                _outcome(a) in ("error", "timeout") for a in item.raw_attempts)
        if kind == "timeout":
            return item.status == "timeout" or any(
                _outcome(a) == "timeout" for a in item.raw_attempts)
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
