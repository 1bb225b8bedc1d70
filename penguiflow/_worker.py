"""The node worker: one task per node running the reliability envelope.

Scheduling: a worker takes one item at a time, in arrival order, and runs the
node *inside its own task*: there is no task per message. Per-trace
cancellation therefore cancels the worker task itself, and only while the
worker is inside an invocation of that trace (``interruptible``): the
``CancelledError`` is then delivered at the very await where the user's code is
suspended, the worker recognises its own request (``cancel_requested``), calls
``Task.uncancel()`` and moves on to the next item. A ``CancelledError`` that the
worker did not request comes from ``stop()`` and ends the worker.

Timeouts use ``asyncio.timeout`` (no extra task either); retries sleep inside
the same interruptible window, so a cancel also cuts a backoff short.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from ._events import EVENT_LEVELS, logger
from ._ids import new_invocation_id
from ._tracer import enter_invocation, exit_invocation
from ._traces import TraceCancelled
from .binding import Inbound
from .errors import FlowError, FlowErrorCode, safe_repr, safe_str, safe_traceback
from .tracing import _log_scope
from .types import FinalAnswer, Message

if TYPE_CHECKING:
    from ._context import Context
    from ._graph import FloeQueue, Origin
    from ._runtime import FlowRuntime
    from .node import Node

__all__ = ["NodeWorker"]

_DEBUG = logging.DEBUG
_INFO = logging.INFO
_perf = time.perf_counter
_now = time.time
_LEVELS = {kind: EVENT_LEVELS[kind] for kind in ("node_error", "node_timeout")}
# BaseExceptions a worker lets through: the process is exiting (Ctrl-C, sys.exit),
# and, in its loop, a cancel (stop(), or a trace cancel it handles itself).
_EXITING = (KeyboardInterrupt, SystemExit)
_PROPAGATED = (asyncio.CancelledError, KeyboardInterrupt, SystemExit)


def _unreported(trace_id: Any, node_name: object) -> None:
    """Say, once per failed message, that its FlowError reaches no one.

    Without ``emit_errors_to_rookery`` nothing reaches Rookery for a failed
    message, so a caller awaiting ``fetch()`` for this trace waits forever.
    """
    with contextlib.suppress(Exception):  # a failing logger: nothing left to report to
        logger.warning(
            "trace %s failed at node %r and its FlowError reaches no one: a fetch() for "
            "this trace waits forever. Pass create(..., emit_errors_to_rookery=True) to "
            "receive the FlowError from fetch(); the node_failed event has the details.",
            safe_str(trace_id, 256), safe_str(node_name, 256),
            extra={"trace_id": trace_id, "node_name": node_name,
                   "event": "node_failed_unreported"})



class NodeWorker:
    """Runs ``node`` over its incoming floes until cancelled by ``stop()``.

    It sees its flow only through ``rt``, the flow's runtime
    (``penguiflow._runtime.FlowRuntime``).
    """

    __slots__ = ("_cancel_sent", "cancel_requested", "ctx", "interruptible", "node", "rt",
                 "running_trace", "task")

    def __init__(self, rt: FlowRuntime, node: Node, ctx: Context) -> None:
        self.rt = rt
        self.node = node
        self.ctx = ctx
        self.task: asyncio.Task[None] | None = None
        #: Trace id of the invocation in progress (None between items).
        self.running_trace: Any = None
        #: True only while awaiting the user's code or a retry backoff.
        self.interruptible = False
        #: Set by ``PenguiFlow.cancel`` right before it cancels ``task``.
        self.cancel_requested = False
        #: Whether that request cancelled ``task`` (not when the node cancelled its
        #: own trace: see :meth:`request_trace_cancel`).
        self._cancel_sent = False

    def request_trace_cancel(self, trace_id: Any) -> bool:
        """Interrupt the current invocation if it belongs to ``trace_id``.

        A node that cancels its own trace (a guard aborting the request it handles,
        a routing policy) is not interrupted: it is the caller, and cancelling the
        running task from inside would leave a cancel pending that ``uncancel()``
        does not withdraw (Python 3.11 and 3.12), so the worker's next wait for an
        item would raise it and the node would stop taking messages for good. Its
        invocation ends as cancelled when it returns instead (its result dropped).
        """
        task = self.task
        if (self.interruptible and self.running_trace == trace_id and task is not None
                and not self.cancel_requested):
            self.cancel_requested = True
            self._cancel_sent = task is not asyncio.current_task()
            if self._cancel_sent:
                task.cancel()
            return True
        return False

    def _consume_cancel_request(self) -> bool:
        # True when a trace cancel (not stop) interrupted us; re-arms the task.
        if self.cancel_requested and not self.rt.stopping:
            self.cancel_requested = False
            if self._cancel_sent and self.task is not None:
                self._cancel_sent = False
                self.task.uncancel()
            return True
        return False

    async def run(self) -> None:
        """The worker loop; ends with ``node_cancelled`` when ``stop()`` cancels it."""
        ctx = self.ctx
        incoming = list(ctx._incoming.values())
        single: FloeQueue | None = incoming[0].queue if len(incoming) == 1 else None
        process = self.process
        if self.rt.binding is not None:
            process = self._process_delivered
        try:
            if not incoming:
                await asyncio.get_running_loop().create_future()  # nothing can arrive
            while True:
                if single is not None:
                    item = await single.get()
                    origin = single.last_origin
                else:
                    item = await ctx._take_arrival()
                    origin = ctx.last_origin
                try:
                    await process(item, origin)
                except _PROPAGATED:
                    raise
                except BaseException as exc:
                    # A runtime or observer bug must cost one item, not the node:
                    # a dead worker would leave every later message waiting forever.
                    # (Any BaseException but a cancel or the process exiting: a
                    # library's own BaseException subclass included.)
                    self._worker_error(exc)
        except asyncio.CancelledError:
            self.running_trace = None
            await self.rt.emit_event("node_cancelled", ctx, None)
            raise

    async def _process_delivered(self, item: Any, origin: Origin) -> None:
        """:meth:`process` for a flow bound to a delivering bus: the item's outputs
        derive their hop ids from its parcel, and the parcel is settled (acknowledged)
        only once they are sent; an item whose processing was cut short (stop, a
        worker bug) is left unsettled, to be delivered again."""
        binding = self.rt.binding
        if binding is None or type(origin) is not Inbound:
            await self.process(item, origin)
            return
        token = binding.begin(origin)
        try:
            await self.process(item, origin)
        except asyncio.CancelledError:
            raise  # stop(): left unsettled, delivered again (here or elsewhere)
        except BaseException:
            # A runtime or observer bug (counted by run()): the item is lost once,
            # not redelivered for ever.
            await binding.settle(origin)
            raise
        else:
            # Outputs sent in the background (emit_nowait) must be on their edges
            # before the input goes: a crash in between would lose them for good.
            if await binding.sends_done():
                await binding.settle(origin)
        finally:
            binding.end(token)

    def _worker_error(self, exc: BaseException) -> None:
        self.rt.events.failures["worker_error"] += 1
        with contextlib.suppress(Exception):  # a failing logger: nothing left to report to
            logger.error("node_worker_error", exc_info=exc, extra={
                "node_name": safe_str(self.node.name), "error": safe_repr(exc)})

    async def process(self, item: Any, origin: Origin) -> None:
        """Handle one dequeued item: deadline, cancel check, attempts, accounting."""
        rt = self.rt
        trace_id = item.trace_id if type(item) is Message else getattr(item, "trace_id", None)
        try:
            if type(item) is Message or isinstance(item, Message):
                deadline = item.deadline_s
                if deadline is not None and _now() > deadline:
                    await self._deadline_skip(item, origin)
                    return
            if trace_id is not None:
                state = rt.traces.get(trace_id)
                if state is not None and state.cancelled:
                    await rt.emit_event("trace_cancel_drop", self.ctx, trace_id)
                    return
            await self._invoke(item, origin, trace_id)
        finally:
            if trace_id is not None and rt.release(trace_id):
                await rt.cancel_finished(trace_id)

    async def _deadline_skip(self, item: Message, origin: Origin) -> None:
        rt = self.rt
        await rt.emit_event("deadline_skip", self.ctx, item.trace_id,
                               extra={"deadline_s": item.deadline_s})
        answer = item
        if not isinstance(item.payload, FinalAnswer):
            answer = item.model_copy(update={"payload": FinalAnswer(text="Deadline exceeded"),
                                             "meta": dict(item.meta)})
        await rt.deliver_rookery(self.ctx, answer, origin)

    async def _invoke(self, item: Any, origin: Origin, trace_id: Any) -> None:
        rt = self.rt
        node = self.node
        ctx = self.ctx
        policy = node.policy
        events = rt.events
        registry = rt.registry
        direct = registry is None or policy.validate == "none"
        func = node.func
        timeout = policy.timeout_s
        # One logger check per invocation on the hot path: DEBUG implies INFO.
        info = logger.isEnabledFor(_INFO)
        # An invocation id is needed by any listener, the DEBUG log, and log scopes.
        observed = (events.listening or _log_scope.on
                    or (info and logger.isEnabledFor(_DEBUG)))
        inv = new_invocation_id() if observed else None
        # Only a fast-path store listens (the common production set-up): record
        # start and success synchronously, without an _emit_event coroutine each.
        record = rt.record if events.direct and not info else None
        parents: tuple[str, ...] = ()
        queued: float | None = None
        if origin is not None:
            queued = origin[1]
            if origin[0] is not None:
                parents = (origin[0],)
        state = rt.traces.get(trace_id) if trace_id is not None else None
        if state is not None:
            state.inflight += 1
        ctx._inv = inv
        ctx._parents = parents
        self.running_trace = trace_id
        attempt = 0
        tokens = None
        if inv is not None and (events.tracer is not None or _log_scope.on):
            tokens = enter_invocation(events.tracer, _log_scope.on, trace_id, inv, node.name,
                                      node.node_id)
        try:
            while True:
                if record is not None:
                    waiter = record("node_start", ctx, trace_id, attempt, 0.0, None, inv,
                                    parents, queued)
                    if waiter is not None:
                        await events.wait_store(waiter, "node_start", trace_id)
                elif observed:
                    await rt.emit_event("node_start", ctx, trace_id, attempt=attempt,
                                           latency_ms=0.0, invocation_id=inv, parents=parents,
                                           queued_ts=queued)
                if state is not None and state.cancelled:
                    # Cancelled while node_start was recorded (a slow observer, a full
                    # store buffer): not interruptible then, so the cancel found
                    # nothing to interrupt; the node must not run at all.
                    await self._trace_cancelled(trace_id, attempt, inv, None)
                    return
                started = _perf()
                error: BaseException | None = None
                retry = True
                timed_out = False
                result: Any = None
                self.interruptible = True
                try:
                    if timeout is None:
                        if direct:
                            result = await func(item, ctx)
                        else:
                            result = await node.invoke(item, ctx, registry=registry)
                    else:
                        async with asyncio.timeout(timeout) as scope:
                            if direct:
                                result = await func(item, ctx)
                            else:
                                result = await node.invoke(item, ctx, registry=registry)
                except asyncio.CancelledError as exc:
                    self.interruptible = False
                    if self._consume_cancel_request():
                        await self._trace_cancelled(trace_id, attempt, inv, started)
                        return
                    task = asyncio.current_task()
                    if rt.stopping or task is None or task.cancelling():
                        raise  # stop() (or a cancel of this task): left as it is
                    # Nobody cancelled this task: the node awaited a task or future
                    # someone else cancelled. The invocation fails (re-raised, it
                    # would end the worker for good), without retries: CancelledError
                    # is never retried (spec §7.4).
                    retry = False
                    error = RuntimeError(
                        f"node {node.name!r} raised CancelledError, but neither stop() nor "
                        "a cancel of its trace cancelled it (it awaited a task or future "
                        "that something else cancelled); failed, not retried")
                    error.__cause__ = exc
                except TraceCancelled:
                    # Raised by code that found the trace cancelled (call_playbook,
                    # RemoteNode): a cancellation, never a failure to retry.
                    self.interruptible = False
                    self._consume_cancel_request()
                    await self._trace_cancelled(trace_id, attempt, inv, started)
                    return
                except Exception as exc:
                    error = exc
                    timed_out = timeout is not None and isinstance(exc, TimeoutError) and \
                        scope.expired()
                except _EXITING:
                    raise  # the process is exiting (Ctrl-C, sys.exit): not the node's failure
                except BaseException as exc:
                    # Another BaseException (a library's own subclass): the invocation
                    # fails, as for an Exception, but is not retried (as CancelledError
                    # is not: it says "stop", not "try again"). Re-raised, it would end
                    # the worker silently and leave every later message waiting.
                    error = exc
                    retry = False
                self.interruptible = False
                if self._consume_cancel_request():
                    # The user's code swallowed the CancelledError; the trace is
                    # cancelled all the same, so its result is dropped.
                    await self._trace_cancelled(trace_id, attempt, inv, started)
                    return
                latency_ms = (_perf() - started) * 1000.0
                if error is None:
                    if result is not None:
                        # Routing may wait on a full floe: a trace cancel must be able
                        # to cut that wait short too, or the result lands after it.
                        self.interruptible = True
                        try:
                            await rt.route_result(node, ctx, item, result, inv)
                        except asyncio.CancelledError:
                            self.interruptible = False
                            if self._consume_cancel_request():
                                await self._trace_cancelled(trace_id, attempt, inv, started)
                                return
                            raise
                        except Exception as exc:  # e.g. a controller without a self-edge
                            error = exc
                        self.interruptible = False
                        if self._consume_cancel_request():
                            # Cancelled while routing, and something on the way (a
                            # message bus's publish) swallowed the CancelledError: the
                            # request must not outlive this item (the next one would
                            # be taken for cancelled, this task's cancel count stay up).
                            await self._trace_cancelled(trace_id, attempt, inv, started)
                            return
                    if error is None:
                        # A join widened its wait graph to every input it joined.
                        parents = ctx._parents
                        streamed = None
                        if ctx._chunks:
                            streamed = MappingProxyType({
                                "stream_chunks": ctx._chunks,
                                "stream_first_chunk_ts": ctx._first_chunk})
                        if record is not None:
                            waiter = record("node_success", ctx, trace_id, attempt, latency_ms,
                                            streamed, inv, parents, queued)
                            if waiter is not None:
                                await events.wait_store(waiter, "node_success", trace_id)
                        elif observed or info:  # events.wants(INFO), known already
                            await rt.emit_event("node_success", ctx, trace_id,
                                                   attempt=attempt, latency_ms=latency_ms,
                                                   extra=streamed, invocation_id=inv,
                                                   parents=parents, queued_ts=queued)
                        return
                attempt = await self._failed_attempt(item, trace_id, attempt, error, timed_out,
                                                     latency_ms, inv, parents, retry=retry)
                if attempt < 0:
                    return
                if state is not None and state.cancelled:
                    await self._trace_cancelled(trace_id, attempt, inv, None)
                    return
        finally:
            self.interruptible = False
            self.running_trace = None
            ctx._inv = None
            ctx._parents = ()
            if ctx._chunks:
                ctx._chunks = 0
                ctx._first_chunk = None
            if tokens is not None:
                exit_invocation(tokens)
            if state is not None:
                state.inflight -= 1

    async def _failed_attempt(self, item: Any, trace_id: Any, attempt: int, error: BaseException,
                              timed_out: bool, latency_ms: float, inv: str | None,
                              parents: tuple[str, ...], *, retry: bool = True) -> int:
        """Report a failed attempt; back off and return the next attempt, or -1.

        ``retry=False``: the failure is final whatever the policy allows (a stray
        CancelledError: never retried, spec §7.4)."""
        rt = self.rt
        node = self.node
        ctx = self.ctx
        policy = node.policy
        kind = "node_timeout" if timed_out else "node_error"
        cap = rt.error_text_max
        # Never repr() a user's exception directly: it may raise or recurse (safe_repr).
        shown = safe_repr(error, cap)
        # The traceback is formatted here only, on a failure, and only when the
        # event has a consumer (a listener or the logger): the success path never
        # pays for it, and an unobserved failure neither (it reads source lines).
        trace_text = safe_traceback(error, cap) if rt.events.wants(_LEVELS[kind]) else None
        extra: dict[str, Any] = {"exception": shown}
        if trace_text is not None:
            extra["traceback"] = trace_text
        await rt.emit_event(kind, ctx, trace_id, attempt=attempt, latency_ms=latency_ms,
                               extra=extra, invocation_id=inv, parents=parents)
        # A cancel that came while the event was recorded (not interruptible then)
        # found nothing to interrupt: an interrupted invocation is neither retried
        # nor reported failed (spec §7.3).
        if await self._cancelled_meanwhile(trace_id, attempt, inv):
            return -1
        if retry and attempt < policy.max_retries:
            attempt += 1
            sleep_s = policy.backoff_for(attempt)
            await rt.emit_event("node_retry", ctx, trace_id, attempt=attempt,
                                   latency_ms=None,
                                   extra={"sleep_s": sleep_s, "exception": shown},
                                   invocation_id=inv, parents=parents)
            if await self._cancelled_meanwhile(trace_id, attempt, inv):
                return -1
            self.interruptible = True
            try:
                await asyncio.sleep(sleep_s)
            except asyncio.CancelledError:
                self.interruptible = False
                if self._consume_cancel_request():
                    await self._trace_cancelled(trace_id, attempt, inv, None)
                    return -1
                raise
            self.interruptible = False
            return attempt
        name = node.name
        if timed_out:
            flow_error = FlowError.from_exception(
                trace_id=trace_id, node_name=name, node_id=node.node_id, exc=error,
                code=FlowErrorCode.NODE_TIMEOUT,
                message=f"Node '{name}' timed out after {policy.timeout_s:.2f}s",
                metadata={"attempt": attempt, "latency_ms": latency_ms,
                          "timeout_s": policy.timeout_s},
            )
        else:
            metadata = {"attempt": attempt, "latency_ms": latency_ms, "exception_repr": shown}
            hint = _notes_of(error, cap)
            if hint:  # what the raiser added (PEP 678): the runtime's hints among them
                metadata["hint"] = hint
            flow_error = FlowError.from_exception(
                trace_id=trace_id, node_name=name, node_id=node.node_id, exc=error,
                code=FlowErrorCode.NODE_EXCEPTION,
                message=f"Node '{name}' raised {type(error).__name__}: {safe_str(error, cap)}",
                metadata=metadata,
            )
        extra = {"exception": shown, "flow_error": flow_error.to_payload()}
        if trace_text is not None:
            extra["traceback"] = trace_text
        if ctx._chunks:  # what streamed before it failed (the span's TTFC, the metric's)
            extra["stream_chunks"] = ctx._chunks
            extra["stream_first_chunk_ts"] = ctx._first_chunk
        if ctx._open_streams:
            ctx.forget_streams(trace_id)
        await rt.emit_event("node_failed", ctx, trace_id, attempt=attempt,
                               latency_ms=latency_ms, extra=extra,
                               invocation_id=inv, parents=parents)
        if trace_id is not None:
            if rt.emit_errors_to_rookery:
                await rt.deliver_rookery(ctx, flow_error, rt.origin_for(inv))
            else:
                _unreported(trace_id, name)
        return -1

    async def _cancelled_meanwhile(self, trace_id: Any, attempt: int, inv: str | None) -> bool:
        """Whether ``trace_id`` was cancelled while this invocation could not be
        interrupted; if so, the invocation is ended as cancelled here."""
        state = self.rt.traces.get(trace_id) if trace_id is not None else None
        if state is None or not state.cancelled:
            return False
        self._consume_cancel_request()
        await self._trace_cancelled(trace_id, attempt, inv, None)
        return True

    async def _trace_cancelled(self, trace_id: Any, attempt: int, inv: str | None,
                               started: float | None) -> None:
        latency = None if started is None else (_perf() - started) * 1000.0
        ctx = self.ctx
        streamed = None
        if ctx._chunks:  # what streamed before the cancel (the span's TTFC, the metric's)
            streamed = {"stream_chunks": ctx._chunks,
                        "stream_first_chunk_ts": ctx._first_chunk}
        await self.rt.emit_event("node_trace_cancelled", ctx, trace_id, attempt=attempt,
                                  latency_ms=latency, extra=streamed, invocation_id=inv)


def _notes_of(error: BaseException, cap: int) -> str | None:
    """The notes added to ``error`` (PEP 678) as one bounded text, or None (none, or
    notes that cannot be read: a hostile ``__notes__`` must not cost the failure
    its report)."""
    try:
        notes = getattr(error, "__notes__", None)
        if not isinstance(notes, list | tuple) or not notes:
            return None
        return safe_str(" ".join(map(safe_str, notes)), cap)
    except Exception:
        return None
