"""The server's task registry: one record per A2A task, its 1.0 events and subscribers.

A :class:`TaskRecord` is the single source of truth for a task the server runs: its
state, history and aggregated artifacts (what ``GetTask`` / ``SubscribeToTask``
show), and the live event stream every subscriber gets. All state changes go
through :meth:`TaskRecord.publish`, which applies the event to the record and then
broadcasts it, so a snapshot taken at subscription time plus the events that
follow is always the whole story (no event falls between the two: both happen on
the event loop without an ``await`` in between).

Events are A2A 1.0 ``StreamResponse`` objects (``{"statusUpdate": ...}`` /
``{"artifactUpdate": ...}``); the JSON-RPC layer converts them to 0.3 at the wire
and the 2.1 routes read the raw chunk / outcome riding along.

Each record keeps its ``owner``: the principal the server's ``auth`` callable returned
for the request that created it (None without ``auth``). Lookups on a caller's behalf
(:meth:`TaskRegistry.find`, :meth:`TaskRegistry.page` with ``principal``) only see the
caller's own tasks, so another principal's task is indistinguishable from one that
does not exist.

Memory is bounded on two axes: each subscriber's queue has ``queue_size`` slots
and a subscriber whose queue is full is dropped (its stream ends) instead of
buffering without bound; the registry keeps at most ``max_tasks`` records and
forgets terminal tasks ``ttl_s`` seconds after they ended.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal

from penguiflow.types import StreamChunk

from .protocol import CANCELED, COMPLETED, FAILED, FINAL_STATES, SUBMITTED, WORKING

__all__ = ["Outcome", "Subscriber", "TaskEvent", "TaskRecord", "TaskRegistry", "now_iso"]

logger = logging.getLogger("penguiflow_a2a.server")

#: The artifact of a task's streamed chunks, and the one of its final result.
STREAM_ARTIFACT: Final = "stream"
RESULT_ARTIFACT: Final = "result"

_seq = itertools.count()


def now_iso() -> str:
    """Current UTC time as A2A writes timestamps (ISO-8601, ``Z``), to the
    microsecond, as a2a-sdk writes them: ListTasks' ``statusTimestampAfter`` compares
    them with the caller's time, and a change made after that time within the same
    millisecond, stored truncated to it, would read as made before and never be
    listed as changed since."""
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a task ended, for the 2.1 routes (the 1.0 side reads the status instead).

    ``kind``: ``succeeded`` (``value`` = the result payload, ``meta`` = a result
    Message's meta), ``failed`` (``error`` = the FlowError), ``cancelled``, or
    ``error`` (``detail``: the server shut down, the emit failed, ...).
    """

    kind: Literal["succeeded", "failed", "cancelled", "error"]
    value: Any = None
    meta: dict[str, Any] | None = None
    error: Any = None
    detail: str = ""


@dataclass(frozen=True, slots=True)
class TaskEvent:
    """One broadcast event: the 1.0 StreamResponse plus what the 2.1 stream needs."""

    result: dict[str, Any]
    chunk: StreamChunk | None = None
    outcome: Outcome | None = None

    @property
    def final(self) -> bool:
        """True for the event that ends the task's streams."""
        return self.outcome is not None


class Subscriber:
    """A bounded queue of a task's events; ``None`` in it means "stream over"."""

    __slots__ = ("cut", "queue")

    def __init__(self, size: int) -> None:
        self.queue: asyncio.Queue[TaskEvent | None] = asyncio.Queue(maxsize=size + 1)
        #: Set when the subscriber is dropped: its HTTP stream is closed at once (the
        #: writer may be blocked on a client that reads nothing).
        self.cut = asyncio.Event()

    def offer(self, event: TaskEvent) -> bool:
        """Queue ``event``; False (and the subscriber is cut off) if the queue is full.

        One slot is kept for the end marker, so a dropped subscriber's reader always
        learns that its stream is over, and what it had queued is freed now.
        """
        if self.queue.qsize() >= self.queue.maxsize - 1:
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queue.put_nowait(None)
            self.cut.set()
            return False
        self.queue.put_nowait(event)
        return True

    def close(self) -> None:
        """End the stream after the events already queued."""
        self.queue.put_nowait(None)


@dataclass(slots=True, eq=False)
class TaskRecord:
    """One task: ids, owner, 1.0 state, history, artifacts, subscribers, outcome."""

    task_id: str
    context_id: str
    trace_id: str
    history: list[dict[str, Any]]
    state: str = SUBMITTED
    status: dict[str, Any] = field(
        default_factory=lambda: {"state": SUBMITTED, "timestamp": now_iso()})
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    subscribers: set[Subscriber] = field(default_factory=set)
    outcome: Outcome | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    launched: bool = False
    created: float = field(default_factory=time.monotonic)
    ended: float | None = None
    seq: int = field(default_factory=lambda: next(_seq))
    #: The principal that created the task (``auth``'s return value; None without auth).
    owner: Any = None
    _streams: set[str] = field(default_factory=set)

    @property
    def terminal(self) -> bool:
        """True once the task reached a final state (it never changes again)."""
        return self.state in FINAL_STATES

    def status_time(self) -> datetime | None:
        """When the task's status last changed (its ``status.timestamp``), or None."""
        stamp = self.status.get("timestamp")
        try:
            return datetime.fromisoformat(stamp) if isinstance(stamp, str) else None
        except ValueError:
            return None

    def visible_to(self, principal: Any) -> bool:
        """Whether ``principal`` may see or act on this task: it is the task's owner.

        Principals are compared with ``==`` (so ``auth`` must return an equal value,
        e.g. the same user id string, for every request of one caller). Without
        ``auth`` every caller and every owner is None, so every task is visible.
        A principal whose ``==`` raises sees nothing (never a 500, never a leak).
        """
        try:
            return bool(self.owner == principal)
        except Exception:
            return False

    # -- 1.0 views ----------------------------------------------------------------------
    def snapshot(self, *, history_length: int | None = None,
                 include_artifacts: bool = True) -> dict[str, Any]:
        """The task as a 1.0 ``Task`` object (history cut to the last ``history_length``)."""
        task: dict[str, Any] = {"id": self.task_id, "contextId": self.context_id,
                                "status": dict(self.status)}
        if include_artifacts and self.artifacts:
            task["artifacts"] = [{**a, "parts": list(a["parts"])} for a in self.artifacts]
        history = self.history if history_length is None else (
            self.history[-history_length:] if history_length > 0 else [])
        if history:
            task["history"] = list(history)
        return task

    def agent_message(self, text: str) -> dict[str, Any]:
        """A 1.0 agent Message of this task holding ``text``."""
        return {"messageId": str(uuid.uuid4()), "contextId": self.context_id,
                "taskId": self.task_id, "role": "ROLE_AGENT", "parts": [{"text": text}]}

    # -- transitions --------------------------------------------------------------------
    def publish(self, event: TaskEvent) -> int:
        """Apply ``event`` to the record, then offer it to every subscriber.

        Returns how many subscribers were dropped because their queue was full.
        A final event also closes every stream and sets :attr:`done`.
        """
        if "statusUpdate" in event.result:
            status = event.result["statusUpdate"]["status"]
            self.state, self.status = status["state"], status
        else:
            self._aggregate(event.result["artifactUpdate"])
        if event.outcome is not None:
            self.outcome = event.outcome
            self.ended = time.monotonic()
        dropped = 0
        for sub in list(self.subscribers):
            if not sub.offer(event):
                self.subscribers.discard(sub)
                dropped += 1
        if event.final:
            for sub in self.subscribers:
                sub.close()
            self.subscribers.clear()
            self.done.set()
        return dropped

    def _aggregate(self, update: dict[str, Any]) -> None:
        artifact = update["artifact"]
        for existing in self.artifacts:
            if existing["artifactId"] == artifact["artifactId"] and update.get("append"):
                existing["parts"].extend(artifact["parts"])
                return
        self.artifacts.append({**artifact, "parts": list(artifact["parts"])})

    def status_event(self, state: str, *, text: str | None = None,
                     outcome: Outcome | None = None) -> TaskEvent:
        """A statusUpdate event moving the task to ``state``."""
        status: dict[str, Any] = {"state": state}
        if text is not None:
            status["message"] = self.agent_message(text)
        status["timestamp"] = now_iso()
        return TaskEvent({"statusUpdate": {"taskId": self.task_id, "contextId": self.context_id,
                                           "status": status}}, outcome=outcome)

    def chunk_event(self, chunk: StreamChunk) -> TaskEvent:
        """An artifactUpdate carrying one StreamChunk's text (appended after the first)."""
        artifact_id = (STREAM_ARTIFACT if chunk.stream_id == self.trace_id
                       else f"{STREAM_ARTIFACT}-{chunk.stream_id}")
        update: dict[str, Any] = {
            "taskId": self.task_id, "contextId": self.context_id,
            "artifact": {"artifactId": artifact_id, "name": STREAM_ARTIFACT,
                         "parts": [{"text": chunk.text}]}}
        if artifact_id in self._streams:
            update["append"] = True
        self._streams.add(artifact_id)
        if chunk.done:
            update["lastChunk"] = True
        return TaskEvent({"artifactUpdate": update}, chunk=chunk)

    def result_event(self, parts: list[dict[str, Any]]) -> TaskEvent:
        """The artifactUpdate of the final result (one artifact, ``lastChunk``)."""
        return TaskEvent({"artifactUpdate": {
            "taskId": self.task_id, "contextId": self.context_id,
            "artifact": {"artifactId": RESULT_ARTIFACT, "name": RESULT_ARTIFACT,
                         "parts": parts},
            "lastChunk": True}})

    def working(self) -> TaskEvent:
        """The WORKING status event (the flow accepted the message)."""
        return self.status_event(WORKING)

    def completed(self, value: Any, meta: dict[str, Any] | None) -> TaskEvent:
        """The COMPLETED status event, carrying the 2.1 outcome."""
        return self.status_event(COMPLETED, outcome=Outcome("succeeded", value=value, meta=meta))

    def failed(self, text: str, *, error: Any = None) -> TaskEvent:
        """The FAILED status event (a FlowError's message, or why the server gave up)."""
        kind: Literal["failed", "error"] = "failed" if error is not None else "error"
        return self.status_event(FAILED, text=text,
                                 outcome=Outcome(kind, error=error, detail=text))

    def canceled(self) -> TaskEvent:
        """The CANCELED status event."""
        return self.status_event(CANCELED, text="canceled by request",
                                  outcome=Outcome("cancelled"))


class TaskRegistry:
    """Tasks by id, the running ones by trace id; bounded in count and in time.

    ``max_tasks`` caps the records kept; when full, the terminal task that ended
    first is forgotten to make room, and if every task is still running the new
    one is refused (:meth:`room` returns False). Terminal tasks are forgotten
    ``ttl_s`` seconds after they ended.
    """

    def __init__(self, *, max_tasks: int, ttl_s: float) -> None:
        self.max_tasks = max_tasks
        self.ttl_s = ttl_s
        self._tasks: dict[str, TaskRecord] = {}
        self._by_trace: dict[str, TaskRecord] = {}
        #: Subscribers cut off because they did not keep up (see Subscriber.offer).
        self.dropped_subscribers = 0

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[TaskRecord]:
        return iter(list(self._tasks.values()))

    def get(self, task_id: str) -> TaskRecord | None:
        """The task ``task_id`` if it is still kept, whoever owns it (server-side use)."""
        self.purge()
        return self._tasks.get(task_id)

    def find(self, task_id: str, principal: Any) -> TaskRecord | None:
        """The task ``task_id`` if it is kept and ``principal`` owns it, else None.

        Another principal's task is answered exactly like an unknown one, so a caller
        cannot even learn that it exists.
        """
        record = self.get(task_id)
        return record if record is not None and record.visible_to(principal) else None

    def by_trace(self, trace_id: Any) -> TaskRecord | None:
        """The running task of ``trace_id``, if any."""
        return self._by_trace.get(trace_id)

    def running(self) -> list[TaskRecord]:
        """The tasks not yet in a final state."""
        return [t for t in self._tasks.values() if not t.terminal]

    def trace_active(self, trace_id: str) -> bool:
        """Whether a running task already uses ``trace_id``."""
        return trace_id in self._by_trace

    def room(self) -> bool:
        """Make room for one more task; False if all ``max_tasks`` are still running."""
        self.purge()
        if len(self._tasks) < self.max_tasks:
            return True
        ended = [t for t in self._tasks.values() if t.ended is not None]
        if not ended:
            return False
        oldest = min(ended, key=lambda t: t.ended or 0.0)
        del self._tasks[oldest.task_id]
        return True

    def add(self, record: TaskRecord) -> None:
        """Keep ``record`` (replacing a terminal task of the same id) and route its trace."""
        self._tasks[record.task_id] = record
        self._by_trace[record.trace_id] = record

    def publish(self, record: TaskRecord, event: TaskEvent) -> None:
        """``record.publish(event)``, counting dropped subscribers and unrouting at the end."""
        if record.terminal:
            return  # a task never changes after its final state (late items are ignored)
        dropped = record.publish(event)
        if dropped:
            self.dropped_subscribers += dropped
            logger.warning("a2a_subscriber_dropped", extra={
                "task_id": record.task_id, "dropped": dropped,
                "reason": "subscriber queue full (client not reading)"})
        if event.final and self._by_trace.get(record.trace_id) is record:
            del self._by_trace[record.trace_id]

    def purge(self) -> None:
        """Forget terminal tasks older than ``ttl_s``."""
        limit = time.monotonic() - self.ttl_s
        for task_id in [k for k, t in self._tasks.items()
                        if t.ended is not None and t.ended < limit]:
            del self._tasks[task_id]

    def page(self, *, context_id: str | None, state: str | None, page_size: int,
             after_seq: int | None, principal: Any = None,
             status_since: datetime | None = None,
             ) -> tuple[list[TaskRecord], int, int | None]:
        """``principal``'s tasks newest first, filtered, from after cursor ``after_seq``.

        ``status_since`` (aware) keeps only tasks whose status timestamp is at or
        after it. Returns ``(page, total matching, cursor of the next page or
        None)``; the total counts only ``principal``'s tasks.
        """
        self.purge()

        def changed_since(task: TaskRecord) -> bool:
            if status_since is None:
                return True
            when = task.status_time()
            return when is not None and when >= status_since

        matching = sorted((t for t in self._tasks.values()
                           if t.visible_to(principal)
                           and (context_id is None or t.context_id == context_id)
                           and (state is None or t.state == state)
                           and changed_since(t)),
                          key=lambda t: t.seq, reverse=True)
        start = [t for t in matching if after_seq is None or t.seq < after_seq]
        page = start[:page_size]
        more = len(start) > page_size
        return page, len(matching), (page[-1].seq if more and page else None)
