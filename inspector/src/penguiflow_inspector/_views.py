"""The rows the inspector shows: invocations, attempts, remote calls, cancels,
deadlines, bus hops, and the :class:`TraceView` holding them (built by
:func:`penguiflow_inspector.model.build_trace`, which re-exports these names).

Plain data: nothing here reads a store or folds events; :meth:`TraceView.at` and
the event queries delegate to the replay index (``_replay``) the builder attaches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol

from ._event_log import EventRow, EventRows

if TYPE_CHECKING:
    from penguiflow.state import StoredEvent

Status = Literal["running", "ok", "error", "timeout", "cancelled", "skipped", "incomplete"]
"""A trace's or an invocation's status; only a trace is ``"incomplete"`` (see TraceView)."""


class Replay(Protocol):
    """What a :class:`TraceView` asks of the replay index its builder attaches
    (``_replay.ReplayIndex``), so that the rows need not import the index."""

    @property
    def ts(self) -> Sequence[float]: ...

    @property
    def events(self) -> Sequence[StoredEvent]: ...

    def own_positions(self, invocation_id: str) -> list[int]: ...

    def prepare(self) -> None: ...

    def at(self, t: float) -> TraceView: ...


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
    flow_id: str | None = None
    """The flow whose trace was cancelled: a trace can span several flows (a served
    agent recording into the same store, a playbook); each cancels its own part,
    and only that flow's events (its invocations, its remote cancels) count here."""
    flow_name: str | None = None

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
    _index: Replay | None = field(default=None, compare=False)

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
