"""StateStore hooks: persisted events and remote bindings (spec §15.1)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from .errors import PenguiFlowError
from .metrics import event_payload

if TYPE_CHECKING:
    from ._memory_store import InMemoryStateStore
    from .metrics import FlowEvent

__all__ = [
    "RemoteBinding",
    "StateStore",
    "StoredEvent",
    "StateStoreError",
    "StoreUnavailable",
    "FollowerLagged",
    "TraceFilter",
    "TraceStore",
    "TraceSummary",
    "TraceSummaryBuilder",
    "TRACE_STATUSES",
    "InMemoryStateStore",
    "EVENT_FIELDS",
    "EVENTS_LOST_KIND",
    "ERROR_KINDS",
    "PER_ATTEMPT_ERROR_KINDS",
    "counts_as_failed_invocation",
    "EventRecord",
    "TERMINAL_KINDS",
    "check_page",
    "stored_from_fields",
    "trace_status",
]


@dataclass(slots=True)
class StoredEvent:
    """A FlowEvent as persisted: the spec's six fields plus PenguiFlow's ids.

    The keyword-only fields mirror :class:`~penguiflow.metrics.FlowEvent`'s
    additions so that a store can rebuild spans and waterfalls without the
    runtime.
    """

    trace_id: str | None
    ts: float
    kind: str
    node_name: str | None
    node_id: str | None
    payload: Mapping[str, Any]
    invocation_id: str | None = field(default=None, kw_only=True)
    parent_invocation_ids: tuple[str, ...] = field(default=(), kw_only=True)
    span_id: str | None = field(default=None, kw_only=True)
    parent_span_id: str | None = field(default=None, kw_only=True)
    seq: int = field(default=0, kw_only=True)
    attempt: int = field(default=0, kw_only=True)
    queued_ts: float | None = field(default=None, kw_only=True)
    flow_name: str | None = field(default=None, kw_only=True)
    #: Random id of the emitting PenguiFlow instance; ``(flow_id, seq)`` identifies
    #: an event, so a store can ignore a re-delivered one (idempotent writes).
    flow_id: str | None = field(default=None, kw_only=True)

    @property
    def event_key(self) -> str | None:
        """``"<flow_id>:<seq>"``, unique per event; None when the event has no flow id."""
        return None if self.flow_id is None else f"{self.flow_id}:{self.seq}"

    @classmethod
    def from_flow_event(cls, ev: FlowEvent) -> StoredEvent:
        """Convert a FlowEvent: ``kind`` = event type, ``payload`` = ``to_payload()``."""
        return make_stored(
            ev.trace_id, ev.ts, ev.event_type, ev.node_name, ev.node_id, ev.to_payload(),
            ev.invocation_id, ev.parent_invocation_ids, ev.span_id, ev.parent_span_id, ev.seq,
            ev.attempt, ev.queued_ts, ev.flow_name, ev.flow_id,
        )


class EventRecord(NamedTuple):
    """One runtime event as the runtime hands it to fast-path consumers (stores, tracer).

    A named tuple rather than a StoredEvent: building it is one C-level tuple
    construction (~0.1 us, twice per hop). The collector never untracks a named
    tuple (only plain tuples of atoms), so a store that buffers thousands copies
    them to plain tuples (``tuple(record)``, as the durable stores do). The payload
    dict is not built here: :func:`stored_from_fields` derives it from the runtime
    columns (``latency_ms`` to ``extra``) exactly as :meth:`FlowEvent.to_payload`
    does, when the event is first read. Read fields by name.
    """

    trace_id: Any
    ts: float
    kind: str
    node_name: str | None
    node_id: str | None
    invocation_id: str | None
    parent_invocation_ids: tuple[str, ...]
    span_id: str | None
    parent_span_id: str | None
    seq: int
    attempt: int
    queued_ts: float | None
    flow_name: str | None
    flow_id: str | None
    latency_ms: float | None
    queue_depth_in: int
    queue_depth_out: int
    outgoing_edges: int
    queue_maxsize: int
    trace_inflight: int
    trace_cancelled: bool
    trace_pending: int | None
    #: None (no extra items) or a read-only mapping nobody mutates.
    extra: Mapping[str, Any] | None


#: The field names of :class:`EventRecord`, in order (kept for code written before it).
EVENT_FIELDS = EventRecord._fields

EventFields = EventRecord
_NO_EXTRA: Mapping[str, Any] = {}


def stored_from_fields(fields: EventRecord) -> StoredEvent:
    """Build the StoredEvent (payload included) of an :class:`EventRecord`.

    ``extra`` may be None (no extra items).
    """
    (trace_id, ts, kind, node_name, node_id, invocation_id, parents, span_id, parent_span_id,
     seq, attempt, queued_ts, flow_name, flow_id, latency_ms, q_in, q_out, outgoing, maxsize,
     inflight, cancelled, pending, extra) = fields
    payload = event_payload(kind, ts, node_name, node_id, trace_id, latency_ms, q_in, q_out,
                            outgoing, maxsize, attempt, inflight, cancelled, pending,
                            extra or _NO_EXTRA)
    return make_stored(trace_id, ts, kind, node_name, node_id, payload, invocation_id, parents,
                       span_id, parent_span_id, seq, attempt, queued_ts, flow_name, flow_id)


def make_stored(
    trace_id: str | None, ts: float, kind: str, node_name: str | None, node_id: str | None,
    payload: Mapping[str, Any], invocation_id: str | None,
    parent_invocation_ids: tuple[str, ...], span_id: str | None, parent_span_id: str | None,
    seq: int, attempt: int, queued_ts: float | None, flow_name: str | None,
    flow_id: str | None,
) -> StoredEvent:
    """Build a StoredEvent from positional parts (runtime-internal).

    StoredEvent is a plain (not frozen) slotted dataclass, so its own ``__init__``
    is the cheapest way: setting the slots through their descriptors, as
    ``make_event`` does for the frozen FlowEvent, measured ~20% slower here.
    """
    return StoredEvent(trace_id, ts, kind, node_name, node_id, payload,
                       invocation_id=invocation_id, parent_invocation_ids=parent_invocation_ids,
                       span_id=span_id, parent_span_id=parent_span_id, seq=seq, attempt=attempt,
                       queued_ts=queued_ts, flow_name=flow_name, flow_id=flow_id)


@dataclass(slots=True)
class RemoteBinding:
    """Links a trace to a remote agent's A2A context and task."""

    trace_id: str
    context_id: str | None
    task_id: str | None
    agent_url: str | None


class StateStore(Protocol):
    """Where events and bindings are persisted.

    Subclass it (with your own ``__init__``) or implement the three methods.
    The runtime never lets a store exception reach the flow: failures are
    logged as ``state_store_save_failed`` / ``state_store_binding_failed``.
    """

    async def save_event(self, event: StoredEvent) -> None:
        """Persist one event; called in order of occurrence."""
        ...

    async def load_history(self, trace_id: str) -> Sequence[StoredEvent]:
        """Return the events of ``trace_id`` in the order they were saved."""
        ...

    async def save_remote_binding(self, binding: RemoteBinding) -> None:
        """Persist a trace ↔ remote context/task binding."""
        ...


# ---------------------------------------------------------------------------
# Beyond the 2.1 protocol: what the inspector and `pf` query (PenguiFlow additions)
# ---------------------------------------------------------------------------


class StateStoreError(PenguiFlowError):
    """A store failed; driver exceptions are translated to this at the boundary."""


class StoreUnavailable(StateStoreError):
    """The store cannot be reached (server down, bad path, closed store)."""


class FollowerLagged(StateStoreError):
    """A ``follow()`` iterator fell so far behind the store that events meant for it
    were not kept (see :class:`penguiflow.followers.Followers`). Everything before
    the gap was yielded; ``skipped`` says how many were not. Catch it to catch up
    with ``load_history_page`` and follow again."""

    def __init__(self, message: str, *, skipped: int) -> None:
        super().__init__(message)
        #: Events not delivered to the iterator, up to the moment it raised.
        self.skipped = skipped


#: Trace statuses, in the order a status wins over another when several apply.
#: ``"incomplete"``: the store lost some of the trace's events (see
#: ``TraceSummary.events_lost``), so whether it still runs or succeeded is unknown.
TRACE_STATUSES = ("cancelled", "failed", "incomplete", "running", "succeeded")

#: Kind of the marker event a store writes into a trace that lost events (payload
#: ``{"events_lost": n, "reason": "..."}``; see penguiflow_exporters.processor).
EVENTS_LOST_KIND = "store_events_lost"

#: Event kinds that report an error (node errors, timeouts and failures, remote call
#: and remote cancel errors).
ERROR_KINDS = frozenset({"node_error", "node_timeout", "node_failed", "remote_call_error",
                         "remote_cancel_error"})
#: Error kinds recorded once per attempt. ``TraceSummary.error_count`` counts failed
#: invocations, so of these only attempt 0's: an invocation whose attempt fails is
#: tried again and a success ends it, so its first failed attempt is always attempt 0.
PER_ATTEMPT_ERROR_KINDS = frozenset({"node_error", "node_timeout"})


def counts_as_failed_invocation(kind: str, attempt: int | None) -> bool:
    """Whether an event of ``kind`` at ``attempt`` adds one to ``error_count``: a
    node invocation's first failed attempt (``node_error``/``node_timeout`` at
    attempt 0; not its retries nor its ``node_failed``) or a failed remote call."""
    if kind in PER_ATTEMPT_ERROR_KINDS:
        return not attempt
    return kind in ERROR_KINDS and kind != "node_failed"
#: Event kinds that end an invocation (``node_start`` opens one). ``node_abandoned``
#: is recorded by another process: the worker that ran the invocation stopped
#: mid-node, and the one that took its input again closes it (see
#: ``penguiflow.binding``).
TERMINAL_KINDS = frozenset({"node_success", "node_failed", "node_trace_cancelled",
                            "node_abandoned"})


def check_page(offset: int, limit: int) -> None:
    """Validate ``load_history_page``'s arguments (every store calls it).

    Raises:
        ValueError: ``limit < 1`` or ``offset < 0``, naming the fix.
    """
    if limit < 1:
        raise ValueError(f"load_history_page needs limit >= 1 (got {limit}); "
                         "to read the whole trace, call load_history")
    if offset < 0:
        raise ValueError(f"load_history_page needs offset >= 0 (got {offset}); "
                         "the first page is offset=0")


def trace_status(cancelled: bool, failed: bool, open_count: int, events_lost: int = 0) -> str:
    """A trace's status from its fold: cancelled > failed > incomplete > running >
    succeeded (see :data:`TRACE_STATUSES`)."""
    if cancelled:
        return "cancelled"
    if failed:
        return "failed"
    if events_lost > 0:
        return "incomplete"
    return "running" if open_count > 0 else "succeeded"


@dataclass(frozen=True, slots=True)
class TraceSummary:
    """One trace as the fleet view lists it, folded from its stored events.

    Attributes:
        trace_id: the trace.
        flow_name: the flow that recorded its first event.
        status: ``"cancelled"`` (a cancel was requested), else ``"failed"`` (a
            node failed after its retries), else ``"incomplete"`` (the store lost
            some of its events: ``events_lost``), else ``"running"`` (an
            invocation has no terminal event yet), else ``"succeeded"``.
        started_ts / ended_ts: first and last event times (epoch seconds).
        node_count: node invocations started.
        error_count: failed invocations: node invocations with a failed
            attempt (retried or not), plus failed remote calls and remote cancels
            (:func:`counts_as_failed_invocation`).
        remote_call_count: remote calls started.
        event_count: events stored.
        nodes: the distinct node names that ran, sorted.
        events_lost: events of the trace the store could not keep (dropped on a
            full buffer, refused, or lost with a failed write), as its
            ``store_events_lost`` markers count them.
    """

    trace_id: str
    flow_name: str | None
    status: str
    started_ts: float
    ended_ts: float
    node_count: int
    error_count: int
    remote_call_count: int
    event_count: int
    nodes: tuple[str, ...]
    events_lost: int = 0

    @property
    def duration_ms(self) -> float:
        """``ended_ts - started_ts`` in milliseconds."""
        return (self.ended_ts - self.started_ts) * 1000.0


class TraceSummaryBuilder:
    """Folds a trace's events, in any batches, into a :class:`TraceSummary`.

    Stores keep one builder per trace (or its columns) and feed it each newly
    stored event exactly once; ``summary()`` is then O(1).
    """

    __slots__ = ("cancelled", "ended", "errors", "events", "events_lost", "failed", "flow_name",
                 "nodes", "open", "remotes", "started", "starts", "trace_id")

    def __init__(self, trace_id: str) -> None:
        self.trace_id = trace_id
        self.flow_name: str | None = None
        self.started = float("inf")
        self.ended = float("-inf")
        self.starts = self.errors = self.remotes = self.events = self.open = 0
        self.events_lost = 0
        self.cancelled = self.failed = False
        self.nodes: set[str] = set()

    def add(self, event: StoredEvent) -> None:
        """Fold one event in."""
        self.add_fields(event.ts, event.kind, event.node_name, event.attempt, event.flow_name)
        if event.kind == EVENTS_LOST_KIND:
            lost = event.payload.get("events_lost")
            if type(lost) is int and lost > 0:
                self.events_lost += lost

    def add_fields(self, ts: float, kind: str, node_name: str | None, attempt: int,
                   flow_name: str | None) -> None:
        """Fold one event in, given the fields a summary reads (additive: for a store
        that keeps the runtime's EVENT_FIELDS tuples rather than StoredEvents)."""
        self.events += 1
        if ts < self.started:
            self.started = ts
        if ts > self.ended:
            self.ended = ts
        if self.flow_name is None:
            self.flow_name = flow_name
        if kind == "node_start":
            if attempt == 0:
                self.starts += 1
                self.open += 1
            if node_name:
                self.nodes.add(node_name)
        elif kind in TERMINAL_KINDS:
            self.open -= 1
        if kind in ERROR_KINDS and counts_as_failed_invocation(kind, attempt):
            self.errors += 1
        if kind == "node_failed":
            self.failed = True
        elif kind == "trace_cancel_start":
            self.cancelled = True
        elif kind == "remote_call_start":
            self.remotes += 1

    def summary(self) -> TraceSummary:
        """The summary of everything folded so far."""
        status = trace_status(self.cancelled, self.failed, self.open, self.events_lost)
        started = self.started if self.events else 0.0
        ended = self.ended if self.events else 0.0
        return TraceSummary(self.trace_id, self.flow_name, status, started, ended, self.starts,
                            self.errors, self.remotes, self.events, tuple(sorted(self.nodes)),
                            self.events_lost)


@dataclass(frozen=True, slots=True)
class TraceFilter:
    """What ``list_traces`` returns.

    Attributes:
        status: one of :data:`TRACE_STATUSES`, or None for any.
        node: only traces in which a node of this name ran.
        has_errors: True: only traces with errors; False: only without.
        since / until: ``since <= started_ts < until`` (epoch seconds).
        order: ``"newest"`` (by start, newest first) or ``"slowest"`` (by duration).
        limit: at most this many summaries (>= 1).
    """

    status: str | None = None
    node: str | None = None
    has_errors: bool | None = None
    since: float | None = None
    until: float | None = None
    order: str = "newest"
    limit: int = 50

    def __post_init__(self) -> None:
        if self.status is not None and self.status not in TRACE_STATUSES:
            raise ValueError(f"TraceFilter.status must be one of {', '.join(TRACE_STATUSES)} "
                             f"or None; got {self.status!r}")
        if self.order not in ("newest", "slowest"):
            raise ValueError(f"TraceFilter.order must be 'newest' or 'slowest'; got {self.order!r}")
        if self.limit < 1:
            raise ValueError(f"TraceFilter.limit must be >= 1; got {self.limit!r}")

    def matches(self, summary: TraceSummary) -> bool:
        """Whether ``summary`` passes every set criterion (order/limit aside)."""
        if self.status is not None and summary.status != self.status:
            return False
        if self.node is not None and self.node not in summary.nodes:
            return False
        if self.has_errors is not None and (summary.error_count > 0) != self.has_errors:
            return False
        if self.since is not None and summary.started_ts < self.since:
            return False
        return not (self.until is not None and summary.started_ts >= self.until)

    def apply(self, summaries: Iterable[TraceSummary]) -> list[TraceSummary]:
        """Filter, order and cut ``summaries`` (the reference semantics for stores)."""
        kept = [s for s in summaries if self.matches(s)]
        if self.order == "slowest":
            kept.sort(key=lambda s: (s.duration_ms, s.started_ts), reverse=True)
        else:
            kept.sort(key=lambda s: s.started_ts, reverse=True)
        return kept[: self.limit]


class TraceStore(StateStore, Protocol):
    """A StateStore the inspector can query (what PenguiFlow's stores implement).

    Contract:
        * ``save_event`` never blocks on I/O: it buffers, and a background task
          writes batches. ``flush()`` writes everything buffered so far (the
          runtime calls it from ``PenguiFlow.stop()``).
        * A re-delivered event (same ``event_key``) is stored once.
        * ``load_history`` returns events in order of occurrence;
          ``load_history_page`` returns the same events a page at a time.
        * Driver errors surface as :class:`StateStoreError` /
          :class:`StoreUnavailable`.
        * Async context manager: ``async with store:`` opens and closes it.
        * Optional fast path (not part of this Protocol, looked up by name):
          ``save_event_fields(record) -> Awaitable | None`` takes an
          :class:`EventRecord` without doing I/O; the runtime uses it
          instead of ``save_event`` when present (see :func:`stored_from_fields`).
        * Optional fastest path, beside ``save_event_fields``:
          ``event_values_sink() -> Callable | None``, asked once when the store
          is attached; the callable takes each event as the plain tuple of its
          EventRecord's values (``EventRecord(*values)`` rebuilds it) and
          returns what ``save_event_fields`` would. Used only when defined by
          the class defining ``save_event_fields`` or a subclass of it, and
          not when ``save_event_fields`` is set on the instance.
    """

    async def save_events(self, events: Sequence[StoredEvent]) -> None:
        """Persist several events (order kept)."""
        ...

    async def load_history_page(
        self, trace_id: str, *, offset: int = 0, limit: int,
    ) -> Sequence[StoredEvent]:
        """At most ``limit`` events of ``trace_id``, skipping the first ``offset``.

        Same order as :meth:`load_history` (events are appended, so offsets stay
        valid while a trace grows): the pages ``offset=0, limit=n``,
        ``offset=n, limit=n``, ... concatenate to exactly ``load_history``, and a
        page shorter than ``limit`` is the last. An unknown trace, or an offset
        past the end, gives an empty page. Flushes first, as ``load_history``
        does. The durable stores skip the first ``offset`` rows on their
        ``(trace_id, id)`` index without decoding or sending them, but a deep
        page still walks them: read a big trace in few, large pages.

        Raises:
            ValueError: ``limit < 1`` or ``offset < 0``.
        """
        ...

    async def list_traces(self, filter: TraceFilter | None = None) -> list[TraceSummary]:
        """Summaries of the traces matching ``filter`` (default: 50 newest)."""
        ...

    async def get_trace(self, trace_id: str) -> TraceSummary | None:
        """The summary of one trace, or None."""
        ...

    async def resolve_trace_id(self, prefix: str) -> list[str]:
        """Full trace ids starting with ``prefix`` (at most 10)."""
        ...

    async def load_bindings(
        self,
        *,
        trace_id: str | None = None,
        context_id: str | None = None,
        task_id: str | None = None,
    ) -> list[RemoteBinding]:
        """Bindings matching every given id (at least one must be given)."""
        ...

    def follow(self, trace_id: str | None = None) -> AsyncIterator[StoredEvent]:
        """Yield events as they are stored (of one trace, or of all), live."""
        ...

    async def flush(self) -> None:
        """Write everything buffered so far."""
        ...

    async def close(self) -> None:
        """Flush and release resources; idempotent."""
        ...



def __getattr__(name: str) -> Any:
    # The fake is re-exported here (``penguiflow.state.InMemoryStateStore``), lazily:
    # it builds on this module's names, so importing it at import time would make
    # the contract module and its fake import each other (style guide §17).
    if name == "InMemoryStateStore":
        from ._memory_store import InMemoryStateStore

        return InMemoryStateStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
