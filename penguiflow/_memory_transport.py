"""An in-memory RemoteTransport: remote agents as local coroutines.

It lets flows that delegate to remote agents be written, run and tested before
any network transport exists, with the behaviour a real agent shows on the
wire: an A2A-like task lifecycle (``submitted → working → completed``, or
``canceled`` / ``failed``), latency before the first response, a stream of
text chunks, and cancellation that takes time to acknowledge.

Tests control timing with events instead of sleeps: ``InMemoryAgent.gate``
(when given, the agent waits for it before answering) and
``InMemoryTransport.next_task(agent_url)`` (returns as soon as the agent has
opened a task for a call).
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .remote import RemoteCallRequest, RemoteCallResult, RemoteError, RemoteStreamEvent

__all__ = ["AgentTask", "InMemoryAgent", "InMemoryTransport", "RemoteAgentError"]

#: Task states, as A2A names them.
SUBMITTED, WORKING, COMPLETED, CANCELED, FAILED = (
    "submitted", "working", "completed", "canceled", "failed")

Handler = Callable[[RemoteCallRequest], Awaitable[Any]]
Streamer = Callable[[RemoteCallRequest], AsyncIterator[str]]


class RemoteAgentError(RemoteError, RuntimeError):
    """What an in-memory agent raises to the caller: ``fail_with``, or a canceled task."""


class _TaskCanceled(Exception):
    """Internal: the task was cancelled while the agent was waiting or working."""


@dataclass
class InMemoryAgent:
    """The behaviour of one fake remote agent.

    Attributes:
        handler: computes a unary result (and a stream's final result) from the
            request; default: echo the message payload.
        chunks: a stream's text chunks: a sequence, or an async generator
            function taking the request; default: one chunk, ``str(result)``.
        latency_s: delay before the agent starts working (after ``submitted``).
        chunk_interval_s: delay between stream chunks.
        cancel_latency_s: time the agent takes to acknowledge a cancel.
        fail_with: raise ``RemoteAgentError(fail_with)`` after ``latency_s``.
        fail_after_chunks: for streams, fail after this many chunks.
        gate: when given, the agent waits for this event before answering
            (tests use it instead of sleeps).
        skills: skill names this agent accepts (empty: any).
    """

    handler: Handler | None = None
    chunks: Sequence[str] | Streamer | None = None
    latency_s: float = 0.0
    chunk_interval_s: float = 0.0
    cancel_latency_s: float = 0.0
    fail_with: str | None = None
    fail_after_chunks: int | None = None
    gate: asyncio.Event | None = None
    skills: Sequence[str] = ()


@dataclass
class AgentTask:
    """One remote task as the fake agent sees it, with timestamped states."""

    task_id: str
    context_id: str
    agent_url: str
    skill: str
    state: str = SUBMITTED
    history: list[tuple[str, float]] = field(default_factory=list)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    cancel_requested: asyncio.Event = field(default_factory=asyncio.Event)

    def move(self, state: str) -> None:
        """Record a state transition (wall clock)."""
        self.state = state
        self.history.append((state, time.time()))


class InMemoryTransport:
    """A :class:`~penguiflow.remote.RemoteTransport` whose agents live in-process.

    Args:
        agents: ``agent_url -> InMemoryAgent``; more can be added with
            :meth:`register`.

    Context ids: a request whose ``message.meta`` has ``"context_id"`` continues
    that conversation; otherwise each trace gets one context id (the same for
    every call of that trace), like an A2A client reusing ``contextId``.
    """

    def __init__(self, agents: Mapping[str, InMemoryAgent] | None = None) -> None:
        self._agents: dict[str, InMemoryAgent] = dict(agents or {})
        self.tasks: dict[str, AgentTask] = {}
        self.requests: list[RemoteCallRequest] = []
        self.cancels: list[tuple[str, str]] = []
        self._contexts: dict[str, str] = {}
        self._ids = itertools.count(1)
        self._handed_out: dict[str, int] = {}
        self._task_waiters: list[asyncio.Future[None]] = []

    def register(self, agent_url: str, agent: InMemoryAgent) -> None:
        """Serve ``agent`` at ``agent_url``."""
        self._agents[agent_url] = agent

    def _agent(self, request: RemoteCallRequest) -> InMemoryAgent:
        agent = self._agents.get(request.agent_url)
        if agent is None:
            known = ", ".join(sorted(self._agents)) or "none"
            raise LookupError(
                f"no in-memory agent at {request.agent_url!r} (known: {known}); "
                "register one with InMemoryTransport.register(url, InMemoryAgent(...))")
        if agent.skills and request.skill not in agent.skills:
            raise LookupError(
                f"agent {request.agent_url!r} has no skill {request.skill!r} "
                f"(skills: {', '.join(agent.skills)})")
        return agent

    def _open_task(self, request: RemoteCallRequest) -> AgentTask:
        self.requests.append(request)
        meta = request.message.meta
        context_id = meta.get("context_id") if isinstance(meta.get("context_id"), str) else None
        if context_id is None:
            context_id = self._contexts.setdefault(request.message.trace_id,
                                                   f"ctx-{uuid.uuid4().hex[:12]}")
        task = AgentTask(task_id=f"task-{next(self._ids)}-{uuid.uuid4().hex[:8]}",
                         context_id=context_id, agent_url=request.agent_url,
                         skill=request.skill)
        task.move(SUBMITTED)
        self.tasks[task.task_id] = task
        task.started.set()
        for waiter in self._task_waiters:
            if not waiter.done():
                waiter.set_result(None)
        return task

    async def _guarded(self, task: AgentTask, awaitable: Awaitable[Any]) -> Any:
        """Await ``awaitable`` unless the task is cancelled first (cancel wins ties)."""
        if task.cancel_requested.is_set():
            if inspect.iscoroutine(awaitable):
                awaitable.close()  # never started: close it rather than leak it
            raise _TaskCanceled
        work = asyncio.ensure_future(awaitable)
        cancel = asyncio.ensure_future(task.cancel_requested.wait())
        try:
            await asyncio.wait({work, cancel}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for fut in (work, cancel):
                if not fut.done():
                    fut.cancel()
            await asyncio.gather(work, cancel, return_exceptions=True)
        if cancel.done() and not cancel.cancelled():
            raise _TaskCanceled
        return work.result()

    async def _work(self, agent: InMemoryAgent, task: AgentTask) -> None:
        if agent.latency_s:
            await self._guarded(task, asyncio.sleep(agent.latency_s))
        task.move(WORKING)
        if agent.gate is not None:
            await self._guarded(task, agent.gate.wait())
        if agent.fail_with is not None and agent.fail_after_chunks is None:
            task.move(FAILED)
            raise RemoteAgentError(agent.fail_with)

    async def _result(self, agent: InMemoryAgent, request: RemoteCallRequest) -> Any:
        if agent.handler is not None:
            return await agent.handler(request)
        return request.message.payload

    async def send(self, request: RemoteCallRequest) -> RemoteCallResult:
        """Run the agent to completion and return its result."""
        agent = self._agent(request)
        task = self._open_task(request)
        try:
            await self._work(agent, task)
            result = await self._guarded(task, self._result(agent, request))
        except _TaskCanceled:
            self._end_canceled(task)
            raise RemoteAgentError(f"task {task.task_id} was canceled") from None
        except asyncio.CancelledError:
            self._end_canceled(task)
            raise
        task.move(COMPLETED)
        return RemoteCallResult(result=result, context_id=task.context_id,
                                task_id=task.task_id, agent_url=request.agent_url,
                                meta={"task_state": COMPLETED})

    async def stream(self, request: RemoteCallRequest) -> AsyncIterator[RemoteStreamEvent]:
        """Yield a status event, the text chunks, then a ``done`` event with the result."""
        agent = self._agent(request)
        task = self._open_task(request)

        def event(text: str | None = None, *, done: bool = False,
                  state: str | None = None, result: Any = None) -> RemoteStreamEvent:
            return RemoteStreamEvent(text=text, done=done,
                                     meta={"task_state": state} if state else None,
                                     context_id=task.context_id, task_id=task.task_id,
                                     agent_url=request.agent_url, result=result)

        try:
            yield event(state=SUBMITTED)
            await self._work(agent, task)
            yield event(state=WORKING)
            result = await self._guarded(task, self._result(agent, request))
            chunks = agent.chunks if agent.chunks is not None else [str(result)]
            source: AsyncIterator[str] = (chunks(request) if callable(chunks)
                                          else _iterate(chunks))
            sent = 0
            async for text in source:
                if agent.fail_after_chunks is not None and sent >= agent.fail_after_chunks:
                    task.move(FAILED)
                    raise RemoteAgentError(agent.fail_with or "stream failed")
                if sent and agent.chunk_interval_s:
                    await self._guarded(task, asyncio.sleep(agent.chunk_interval_s))
                if task.cancel_requested.is_set():
                    raise _TaskCanceled
                yield event(text)
                sent += 1
        except _TaskCanceled:
            # Like an A2A server: a final status update in the terminal state.
            self._end_canceled(task)
            yield event(done=True, state=CANCELED)
            return
        except asyncio.CancelledError:
            self._end_canceled(task)
            raise
        task.move(COMPLETED)
        yield event("", done=True, state=COMPLETED, result=result)

    @staticmethod
    def _end_canceled(task: AgentTask) -> None:
        if task.state not in (COMPLETED, FAILED, CANCELED):
            task.move(CANCELED)

    async def cancel(self, *, agent_url: str, task_id: str) -> None:
        """Cancel a task; takes the agent's ``cancel_latency_s`` to acknowledge.

        Raises:
            LookupError: no such task at that agent.
        """
        task = self.tasks.get(task_id)
        if task is None or task.agent_url != agent_url:
            raise LookupError(f"no task {task_id!r} at {agent_url!r}")
        self.cancels.append((agent_url, task_id))
        task.cancel_requested.set()
        agent = self._agents.get(agent_url)
        if agent is not None and agent.cancel_latency_s:
            await asyncio.sleep(agent.cancel_latency_s)
        self._end_canceled(task)

    async def next_task(self, agent_url: str) -> AgentTask:
        """Return the next task opened at ``agent_url`` (waiting until there is one).

        Successive calls return successive tasks of that agent, oldest first, so a
        test can follow each call without sleeping.
        """
        while True:
            seen = self._handed_out.setdefault(agent_url, 0)
            opened = [t for t in self.tasks.values() if t.agent_url == agent_url]
            if len(opened) > seen:
                self._handed_out[agent_url] = seen + 1
                return opened[seen]
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._task_waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._task_waiters:
                    self._task_waiters.remove(waiter)


async def _iterate(items: Sequence[str]) -> AsyncIterator[str]:
    for item in items:
        yield item
