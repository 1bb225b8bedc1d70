"""The remote seam: calling agents in other processes from a node (spec §15.3).

``RemoteTransport`` is the contract (``send``, ``stream``, ``cancel``);
``RemoteNode`` wraps a transport into an ordinary :class:`~penguiflow.node.Node`
that records the six remote event kinds, maps a remote stream onto
``StreamChunk``s, saves the trace ↔ context/task binding, and propagates a trace
cancel to ``transport.cancel``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ._tracer import enter_client_span, enter_derived_client_span, exit_client_span
from ._traces import TraceCancelled
from .errors import ContextDetached, PenguiFlowError, safe_repr
from .node import Node, NodePolicy
from .state import RemoteBinding
from .tracing import _forget_remote_ids, note_remote_ids
from .types import Message

if TYPE_CHECKING:
    from ._memory_transport import AgentTask, InMemoryAgent, InMemoryTransport, RemoteAgentError

__all__ = [
    "AgentTask",
    "InMemoryAgent",
    "InMemoryTransport",
    "RemoteAgentError",
    "RemoteError",
    "RemoteStreamError",
    "RemoteCallRequest",
    "RemoteCallResult",
    "RemoteNode",
    "RemoteStreamEvent",
    "RemoteTransport",
]


@dataclass(slots=True)
class RemoteCallRequest:
    """What a transport receives: the original message and where to send it."""

    message: Message
    skill: str
    agent_url: str
    agent_card: Mapping[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    timeout_s: float | None = None


@dataclass(slots=True)
class RemoteCallResult:
    """A unary call's outcome with the remote ids when known."""

    result: Any
    context_id: str | None = None
    task_id: str | None = None
    agent_url: str | None = None
    meta: Mapping[str, Any] | None = None


@dataclass(slots=True)
class RemoteStreamEvent:
    """One event of a remote stream; ``result`` carries the final value."""

    text: str | None = None
    done: bool = False
    meta: Mapping[str, Any] | None = None
    context_id: str | None = None
    task_id: str | None = None
    agent_url: str | None = None
    result: Any = None


class RemoteTransport(Protocol):
    """How a RemoteNode reaches a remote agent. Subclass it or match its shape."""

    async def send(self, request: RemoteCallRequest) -> RemoteCallResult:
        """Make a unary call."""
        ...

    def stream(self, request: RemoteCallRequest) -> AsyncIterator[RemoteStreamEvent]:
        """Return an async iterator of stream events (often an async generator)."""
        ...

    async def cancel(self, *, agent_url: str, task_id: str) -> None:
        """Cancel a remote task."""
        ...


class RemoteError(PenguiFlowError):
    """A remote call failed on the calling side of the seam.

    Transports raise their own subclasses (the A2A client's ``A2AError``), so
    ``except RemoteError`` catches any transport's failure; the node's retry
    policy applies to them like to any exception.
    """


class RemoteStreamError(RemoteError, RuntimeError):
    """A transport broke the stream contract (a transport raises it: RemoteNode
    takes every event of a stream, one after ``done`` included)."""


def _task_state(meta: Mapping[str, Any] | None) -> Any:
    # Transports report A2A task states in meta; the inspector splits latency by them.
    return meta.get("task_state") if meta else None


def _method(meta: Mapping[str, Any] | None) -> Any:
    # The protocol method a transport actually sent (``a2a_method`` in its meta), for
    # the CLIENT span's ``a2a.method.name``: a streaming call may fall back to unary.
    return meta.get("a2a_method") if meta else None


def _size(value: Any) -> int:
    """The UTF-8 size of ``value`` as JSON (text as is), for the bytes metrics.

    Never raises: a measurement must not fail the call it measures. A lone
    surrogate (valid JSON ``"\\udcff"`` decodes to one) counts as its 3 bytes; a
    payload pydantic cannot write is measured by its text, as anything else JSON
    refuses; and one whose text fails too counts as 0.
    """
    if value is None:
        return 0
    try:
        if isinstance(value, str):
            return len(value.encode("utf-8", "surrogatepass"))
        if hasattr(value, "model_dump_json"):
            try:
                return len(value.model_dump_json().encode("utf-8", "surrogatepass"))
            except Exception:
                return len(safe_repr(value).encode("utf-8", "surrogatepass"))
        try:
            return len(json.dumps(value, default=str).encode("utf-8", "surrogatepass"))
        except (TypeError, ValueError, RecursionError):
            return len(str(value).encode("utf-8", "surrogatepass"))
    except Exception:
        return 0


#: The longest a RemoteNode waits for a remote cancel of a call cut short locally
#: (``local_cancel``: its timeout, or ``flow.stop()``), its transport's own cancel of
#: the task included, and for any cancel by a transport that declares no bound:
#: past it the cancel is given up and recorded as ``remote_cancel_error`` ("not
#: confirmed within ..."). Below ``flow.stop()``'s default deadline (5 s), so a stop
#: that waits for the cancel records its outcome, and never held longer whatever its
#: ``store_timeout_s`` (``None`` included). A transport's own bound (a
#: ``cancel_timeout_s`` attribute, a positive number of seconds:
#: ``A2AClientTransport`` has one) plus :data:`REMOTE_CANCEL_MARGIN_S` decides a
#: trace cancel (nothing waits on it but the trace's end), and a local cancel when
#: shorter.
REMOTE_CANCEL_TIMEOUT_S = 4.0
#: Added to a transport's own ``cancel_timeout_s``: its cancel reports its own
#: timeout before the node gives up on it.
REMOTE_CANCEL_MARGIN_S = 1.0
#: A transport's own bound past which it is not believed (an hour: a value meant
#: in milliseconds).
_OWN_BOUND_MAX_S = 3600.0


def _cancel_bound(transport: Any, reason: str) -> tuple[float, str]:
    """How long the node waits for ``transport``'s cancel of a call (``reason``: see
    the ``remote_cancel_reason`` table), and where that comes from (for the message
    when it expires). Never raises: a ``cancel_timeout_s`` that cannot be read, or
    is not a positive number of at most an hour, is ignored."""
    cap = REMOTE_CANCEL_TIMEOUT_S
    try:
        own = getattr(transport, "cancel_timeout_s", None)
        if (isinstance(own, (int, float)) and not isinstance(own, bool)
                and 0 < own <= _OWN_BOUND_MAX_S):
            bound = float(own) + REMOTE_CANCEL_MARGIN_S
            if reason != "local_cancel" or bound < cap:
                return bound, (f"{bound:g} s (its cancel_timeout_s={float(own):g} s + "
                               f"{REMOTE_CANCEL_MARGIN_S:g} s)")
    except Exception:  # a property that raises, an int too large for a float
        pass
    return cap, f"REMOTE_CANCEL_TIMEOUT_S={cap:g} s"


def _cancelled_by_transport(transport: Any, agent_url: str, task_id: str) -> bool:
    """Whether ``transport`` says it cancelled that task itself, or is cancelling it
    (an A2A call that gave up at its timeout sends CancelTask): an optional,
    duck-typed ``already_cancelled(*, agent_url, task_id) -> bool`` beside the
    RemoteTransport protocol. Never raises (a transport without it, or whose answer
    fails: False)."""
    asked = getattr(transport, "already_cancelled", None)
    if not callable(asked):
        return False
    try:
        return asked(agent_url=agent_url, task_id=task_id) is True
    except Exception:
        return False


async def _transport_cancel_held(transport: Any, agent_url: str, task_id: str) -> bool:
    """Whether the cancel ``transport`` made of that task itself held: an optional,
    duck-typed ``wait_cancelled(*, agent_url, task_id) -> bool`` coroutine that
    waits for a cancel still on its way (False: it failed, the node cancels the task
    itself). Without it, or when it fails: True (``already_cancelled`` said so).
    The caller bounds it."""
    wait = getattr(transport, "wait_cancelled", None)
    if not callable(wait):
        return True
    try:
        return await wait(agent_url=agent_url, task_id=task_id) is not False
    except Exception:
        return True


def _clean(extra: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in extra.items() if v is not None}


def RemoteNode(
    *,
    transport: RemoteTransport,
    skill: str,
    agent_url: str,
    name: str,
    agent_card: Mapping[str, Any] | None = None,
    policy: NodePolicy | None = None,
    streaming: bool = False,
    record_binding: bool = True,
) -> Node:
    """Return a Node that delegates each message to a remote agent.

    The node's input must be a :class:`Message`; it returns the remote result
    (the last non-None ``result`` of a stream). Transport exceptions are
    recorded as ``remote_call_error`` and re-raised, so the node's retry policy
    applies.
    """
    transport_name = type(transport).__name__
    # Remote calls made so far by each recent invocation (one per attempt): the index
    # in a CLIENT span's derived id. Bounded: an invocation's attempts are close in time.
    calls_by_invocation: dict[str, int] = {}

    async def remote_call(message: Any, ctx: Any) -> Any:
        if not isinstance(message, Message):
            # Builtin TypeError (spec §15.3): raised in the node's attempt, its type is
            # what the node's FlowError reports.
            raise TypeError(
                f"RemoteNode '{name}' expects a Message, got {type(message).__name__}; wrap "
                "the payload: Message(payload=..., headers=Headers(tenant=...))")
        runtime = getattr(ctx, "runtime", None)
        if runtime is None:
            raise ContextDetached(
                f"RemoteNode '{name}' needs a context attached to a running flow: put the "
                "node in a flow and run() it (a detached Context cannot call out)")
        trace_id = message.trace_id
        request = RemoteCallRequest(message=message, skill=skill, agent_url=agent_url,
                                    agent_card=agent_card, metadata=message.meta,
                                    timeout_s=node.policy.timeout_s)
        ids: dict[str, Any] = {"context_id": None, "task_id": None, "agent_url": agent_url,
                               "index": None}
        watcher: list[asyncio.Task[None]] = []
        # Captured now: a remote cancel records its events from another task, maybe
        # after this invocation ended, and they still belong to this call.
        invocation = getattr(ctx, "_inv", None)

        async def record(kind: str, latency_ms: float | None, *, level: int = logging.INFO,
                         **extra: Any) -> None:
            if ids["index"]:  # a later call of the invocation (a retry): which one
                extra["remote_call_index"] = ids["index"]
            await runtime.record_remote_event(event=kind, node=node, context=ctx,
                                              trace_id=trace_id, latency_ms=latency_ms,
                                              level=level, extra=_clean(extra),
                                              invocation_id=invocation)

        async def cancel_remote(reason: str) -> None:
            started = time.perf_counter()
            bound, bound_text = _cancel_bound(transport, reason)
            # One deadline for the whole cancel: a wait for the transport's own cancel
            # and then the node's.
            deadline = asyncio.get_running_loop().time() + bound
            where = {"remote_context_id": ids["context_id"], "remote_task_id": ids["task_id"],
                     "remote_agent_url": ids["agent_url"]}
            if _cancelled_by_transport(transport, ids["agent_url"], ids["task_id"]):
                # The transport cancelled it itself (its call gave up): not cancelled
                # twice, but the call's end is still recorded (its CLIENT span waits
                # for it). A give-up cancel that failed leaves it to the node.
                try:
                    async with asyncio.timeout_at(deadline):
                        held = await _transport_cancel_held(
                            transport, ids["agent_url"], ids["task_id"])
                except TimeoutError:
                    await record("remote_cancel_error",
                                 (time.perf_counter() - started) * 1000,
                                 level=logging.WARNING, remote_cancel_reason=reason,
                                 remote_cancel_by_transport=True,
                                 remote_error=(f"{transport_name}'s own cancel of the task "
                                               f"was not confirmed within {bound_text}"),
                                 **where)
                    return
                if held:
                    await record("remote_call_cancelled",
                                 (time.perf_counter() - started) * 1000,
                                 remote_cancel_reason=reason, remote_status="cancelled",
                                 remote_cancel_by_transport=True, **where)
                    return
                started = time.perf_counter()
            try:
                # Bounded: flow.stop() waits for this (whatever its store_timeout_s,
                # None included), and a transport's cancel may never return.
                async with asyncio.timeout_at(deadline):
                    await transport.cancel(agent_url=ids["agent_url"],
                                           task_id=ids["task_id"])
            except Exception as exc:
                error = safe_repr(exc)
                if isinstance(exc, TimeoutError):
                    error = (f"{transport_name}.cancel() was not confirmed within "
                             f"{bound_text} and was given up: the agent may still cancel "
                             f"the task, or be unreachable")
                await record("remote_cancel_error", (time.perf_counter() - started) * 1000,
                             level=logging.WARNING,
                             remote_cancel_reason=reason, remote_error=error, **where)
                return
            await record("remote_call_cancelled", (time.perf_counter() - started) * 1000,
                         remote_cancel_reason=reason, remote_status="cancelled", **where)

        def in_background(coro: Any) -> asyncio.Future[Any]:
            # A remote cancel outlives this call, and flow.stop() (which cancels the
            # call) waits for it, bounded by stop()'s deadline, rather than cancelling
            # it: otherwise the CancelTask never left and the remote task ran on.
            flow_runtime = getattr(ctx, "_rt", None)
            spawn = getattr(flow_runtime, "spawn_for_trace", None)
            if spawn is not None:
                task: asyncio.Future[Any] = spawn(trace_id, coro)
                return task
            task = asyncio.get_running_loop().create_task(coro)
            runtime.register_external_task(trace_id, task)
            return task

        async def bind(context_id: str | None, task_id: str | None, url: str | None) -> None:
            # Log lines from here on (any transport's, the runtime's) carry the ids.
            note_remote_ids(context_id, task_id)
            if context_id is not None:
                ids["context_id"] = context_id
            if task_id is not None:
                ids["task_id"] = task_id
            if url:
                ids["agent_url"] = url
            if watcher or ids["context_id"] is None or ids["task_id"] is None:
                return
            if record_binding:
                await runtime.save_remote_binding(RemoteBinding(
                    trace_id=trace_id, context_id=ids["context_id"], task_id=ids["task_id"],
                    agent_url=ids["agent_url"]))
            cancel_event = runtime.ensure_trace_event(trace_id)
            if cancel_event.is_set():
                watcher.append(asyncio.current_task())  # type: ignore[arg-type]
                await cancel_remote("pre_cancelled")
                raise TraceCancelled(trace_id)

            async def watch() -> None:
                await cancel_event.wait()
                # Shielded, in a task stop() waits for: a stop() arriving meanwhile
                # cancels this watcher, not the CancelTask on its way.
                await asyncio.shield(in_background(cancel_remote("trace_cancel")))

            task = asyncio.get_running_loop().create_task(watch())
            watcher.append(task)
            runtime.register_external_task(trace_id, task)

        _forget_remote_ids()  # a retry's lines must not carry the last call's task id
        index = 0
        if invocation is not None:
            index = calls_by_invocation.pop(invocation, -1) + 1
            calls_by_invocation[invocation] = index
            if len(calls_by_invocation) > 1024:
                del calls_by_invocation[next(iter(calls_by_invocation))]
            ids["index"] = index
        await record("remote_call_start", 0.0, remote_skill=skill,
                     remote_transport=transport_name, remote_streaming=streaming,
                     remote_request_bytes=_size(message), remote_agent_url=agent_url)
        # The call's CLIENT span is current while the transport runs, so a transport
        # that injects `traceparent` names this span (no-op without tracing).
        span_token = enter_client_span(runtime, trace_id, invocation)
        if invocation is not None and span_token is None and trace_id is not None:
            # No SDK: still name this call in the traceparent the transport sends.
            span_token = enter_derived_client_span(trace_id, invocation, index)
        started = time.perf_counter()
        final_state: Any = None
        method: Any = None
        try:
            stream_events = 0
            response_bytes = 0
            value: Any = None
            if not streaming:
                result = await transport.send(request)
                await bind(result.context_id, result.task_id, result.agent_url)
                value = result.result
                response_bytes = _size(value)
                final_state = _task_state(result.meta)
                method = _method(result.meta)
            else:
                async for event in transport.stream(request):
                    # Every event counts, one after a done one too (a final result
                    # or state after the last chunk): the spec (§15.3) iterates the
                    # whole stream and returns the last non-None result.
                    await bind(event.context_id, event.task_id, event.agent_url)
                    meta = dict(event.meta) if event.meta else None
                    if event.text is not None:
                        await ctx.emit_chunk(parent=message, text=event.text, done=event.done,
                                             meta=meta)
                    chunk_bytes = _size(event.text) + (_size(meta) if meta else 0)
                    response_bytes += chunk_bytes
                    state = _task_state(event.meta)
                    if state is not None:
                        final_state = state
                    method = _method(event.meta) or method
                    # latency_ms = time since the call started: per-event timing.
                    await record("remote_stream_event", (time.perf_counter() - started) * 1000,
                                 remote_stream_seq=stream_events,
                                 remote_chunk_bytes=chunk_bytes or None,
                                 # Text bytes alone: 0 for a status-only event.
                                 remote_text_bytes=_size(event.text),
                                 remote_chunk_done=event.done,
                                 remote_chunk_meta_keys=sorted(meta) if meta else None,
                                 remote_task_state=state, remote_method=method,
                                 remote_context_id=ids["context_id"],
                                 remote_task_id=ids["task_id"],
                                 remote_agent_url=ids["agent_url"])
                    stream_events += 1
                    if event.result is not None:
                        value = event.result
                response_bytes += _size(value)
        except TraceCancelled:
            raise
        except asyncio.CancelledError:
            # Cut short locally (timeout or stop) while the trace lives on: do not
            # leave the remote task running. A trace cancel is the watcher's job.
            cancel_event = runtime.ensure_trace_event(trace_id)
            if ids["task_id"] is not None and not cancel_event.is_set():
                in_background(cancel_remote("local_cancel"))
            raise
        except Exception as exc:
            await record("remote_call_error", (time.perf_counter() - started) * 1000,
                         level=logging.WARNING, remote_status="error",
                         remote_error=safe_repr(exc), remote_agent_url=ids["agent_url"],
                         remote_context_id=ids["context_id"], remote_task_id=ids["task_id"],
                         remote_method=method)
            raise
        finally:
            if span_token is not None:
                exit_client_span(span_token)
            # However the call ended, unless the trace itself is being cancelled
            # (then the watcher is doing the remote cancel), the watcher has
            # nothing left to watch: do not leave it waiting until stop().
            if (watcher and watcher[0] is not asyncio.current_task()
                    and not runtime.ensure_trace_event(trace_id).is_set()):
                watcher[0].cancel()
        await record("remote_call_success", (time.perf_counter() - started) * 1000,
                     remote_status="success", remote_response_bytes=response_bytes,
                     remote_stream_events=stream_events, remote_context_id=ids["context_id"],
                     remote_task_id=ids["task_id"], remote_agent_url=ids["agent_url"],
                     remote_task_state=final_state, remote_method=method)
        return value

    node = Node(remote_call, name=name, policy=policy or NodePolicy())
    return node


#: The in-memory fakes of this seam, re-exported here (``penguiflow.remote.InMemoryTransport``)
#: and imported on first use: they build on this module's names, so an import at
#: import time would make the contract and its fake import each other.
_FAKES = frozenset({"AgentTask", "InMemoryAgent", "InMemoryTransport", "RemoteAgentError"})


def __getattr__(name: str) -> Any:
    if name in _FAKES:
        from . import _memory_transport

        return getattr(_memory_transport, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
