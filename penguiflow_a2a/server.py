"""Serve a PenguiFlow as an A2A agent: the 2.1 adapter and routes, plus A2A 1.0 JSON-RPC.

:class:`A2AServerAdapter` owns the bridge between HTTP requests and a running
flow. It is the flow's only Rookery consumer: one dispatcher task fetches every
item and routes it to the task of its trace (``fetch_traced`` when the flow has
it, so plain values a node returned are still matched to their request; never by
arrival order). Each request becomes a task in a bounded registry
(:mod:`._tasks`), which turns chunks into artifact updates, the final value into a
result artifact plus COMPLETED, a FlowError into FAILED and a cancel into
CANCELED, and broadcasts those events to every stream watching the task.

:func:`create_a2a_app` serves the 2.1 routes of spec §16 unchanged, and on the
same app the A2A 1.0 card (``/.well-known/agent-card.json``) and JSON-RPC
endpoint (``POST /``, 1.0 and 0.3 method names; see :mod:`._jsonrpc`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import to_jsonable_python

from penguiflow.errors import FlowError, InvalidTraceId, PenguiFlowError
from penguiflow.state import RemoteBinding
from penguiflow.types import Headers, Message, StreamChunk, check_trace_id

from ._legacy import LegacyFrames, legacy_frames, legacy_response
from ._tasks import Subscriber, TaskRecord, TaskRegistry
from .protocol import payload_to_parts

__all__ = [
    "A2AAgentCard",
    "A2ASkill",
    "A2AMessagePayload",
    "A2ATaskCancelRequest",
    "A2AServerAdapter",
    "create_a2a_app",
]

#: A validated W3C traceparent: ``(trace_id, parent_span_id)``, optionally with the
#: caller's sampled flag as a third item (absent: sampled).
TraceParent = tuple[str, str] | tuple[str, str, bool]


#: Caller trace ids remembered as joined by a 2.1 request (see ``_open_legacy``).
_JOINED_MAX = 65_536


def traceparent_sampled(parent: TraceParent) -> bool:
    """The sampled flag of ``parent`` (True unless its third item is False)."""
    return len(parent) < 3 or parent[2] is not False


logger = logging.getLogger("penguiflow_a2a.server")

#: Request headers whose values never reach the flow, the store, spans or logs.
DEFAULT_REDACT_HEADERS = frozenset(
    {"authorization", "cookie", "x-api-key", "api-key", "proxy-authorization"})

AuthCallable = Callable[[Mapping[str, str]], Any]


class A2ASkill(BaseModel):
    """One skill of the agent card (extra fields, e.g. ``tags``, are kept)."""

    model_config = ConfigDict(extra="allow")
    name: str
    description: str
    mode: str = "both"
    inputs: dict[str, Any] = Field(default_factory=dict)
    outputs: dict[str, Any] = Field(default_factory=dict)


class A2AAgentCard(BaseModel):
    """The agent's card as the 2.1 ``GET /agent`` route serves it."""

    model_config = ConfigDict(extra="allow")
    name: str
    description: str
    version: str = "1.0.0"
    schema_version: str = "1.0"
    tags: list[str] = Field(default_factory=list)
    capabilities: list[str] = Field(default_factory=list)
    skills: list[A2ASkill] = Field(default_factory=list)
    contact_url: str | None = None
    documentation_url: str | None = None

    def to_payload(self) -> dict[str, Any]:
        """The card as a plain dict (``model_dump()``)."""
        return self.model_dump()


class A2AMessagePayload(BaseModel):
    """Body of the 2.1 ``/message/send`` and ``/message/stream`` routes."""

    model_config = ConfigDict(populate_by_name=True)
    payload: Any
    headers: Mapping[str, Any] = Field(default_factory=dict)
    meta: dict[str, Any] = Field(default_factory=dict)
    trace_id: str | None = Field(default=None, alias="traceId")
    context_id: str | None = Field(default=None, alias="contextId")
    task_id: str | None = Field(default=None, alias="taskId")
    deadline_s: float | None = Field(default=None, alias="deadlineSeconds")


class A2ATaskCancelRequest(BaseModel):
    """Body of the 2.1 ``/tasks/cancel`` route."""

    model_config = ConfigDict(populate_by_name=True)
    task_id: str = Field(alias="taskId")


class A2ARequestError(PenguiFlowError):
    """A request the adapter refuses; the app answers HTTP ``status_code`` with ``detail``."""

    def __init__(self, *, status_code: int, detail: Any) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail


class A2AServerAdapter:
    """Runs A2A requests through ``flow`` (spec §16); see the module docstring.

    ``flow`` needs only ``run(*, registry)``, ``stop``, ``emit``, ``fetch``, ``cancel``
    and ``save_remote_binding``; ``fetch_traced`` and ``adopt_trace_parent`` are
    used when present. Keyword-only options beyond the 2.1 ones:

    * ``auth``: ``callable(headers) -> principal`` (sync or async); raise
      ``A2ARequestError(status_code=401|403, detail=...)`` to refuse. ``auth_scheme``
      names it on the card (default: an HTTP Bearer scheme). Each task belongs to
      the principal that created it: another principal gets "not found" for it
      (compared with ``==``, so return the same value, e.g. a user id, for every
      request of one caller; returning None for everyone shares every task).
    * ``rate_limit``: requests per second per principal (client host without auth).
    * ``redact_headers``: header names whose values are never stored or forwarded.
    * ``max_body_bytes``: larger request bodies get HTTP 413 unread.
    * ``max_tasks`` / ``task_ttl_s``: how many tasks are kept, and how long after
      they end; ``subscriber_queue_size``: events buffered per stream before a
      stream that does not keep up is dropped.
    * ``stream_send_timeout_s``: how long one write of a stream may wait for its
      client to take bytes (default 30 s; None: no bound). A client that stopped
      reading is then given up (logged ``a2a_stream_client_stalled``) rather than
      holding its response, and its task's subscriber, for ever.

    Raises:
        ValueError: ``stream_send_timeout_s`` is not a positive number or None.
    """

    def __init__(
        self, flow: Any, *, agent_card: A2AAgentCard | Mapping[str, Any], agent_url: str,
        target: Any = None, registry: Any = None,
        default_headers: Mapping[str, Any] | None = None,
        auth: AuthCallable | None = None, auth_scheme: Mapping[str, Any] | None = None,
        rate_limit: float | None = None, redact_headers: Collection[str] = DEFAULT_REDACT_HEADERS,
        max_body_bytes: int = 1 << 20, max_tasks: int = 10_000, task_ttl_s: float = 3600.0,
        subscriber_queue_size: int = 1024, stream_send_timeout_s: float | None = 30.0,
    ) -> None:
        if stream_send_timeout_s is not None and not (
                isinstance(stream_send_timeout_s, int | float)
                and not isinstance(stream_send_timeout_s, bool) and stream_send_timeout_s > 0):
            raise ValueError(f"stream_send_timeout_s must be a number of seconds > 0, or None "
                             f"for no bound; got {stream_send_timeout_s!r}")
        self.stream_send_timeout_s = stream_send_timeout_s
        self.agent_card = (agent_card if isinstance(agent_card, A2AAgentCard)
                           else A2AAgentCard.model_validate(agent_card))
        self.agent_url = agent_url
        self.auth, self.rate_limit, self.max_body_bytes = auth, rate_limit, max_body_bytes
        self.auth_scheme = dict(auth_scheme) if auth_scheme is not None else (
            {"bearer": {"httpAuthSecurityScheme": {"scheme": "Bearer"}}} if auth else None)
        self.redact_headers = frozenset(h.lower() for h in redact_headers)
        self.subscriber_queue_size = subscriber_queue_size
        self.tasks = TaskRegistry(max_tasks=max_tasks, ttl_s=task_ttl_s)
        #: Caller trace ids a request joined (traceparent), the latest kept: a later
        #: request under the same one runs under a fresh trace id (_join_caller_trace).
        self._joined: OrderedDict[str, None] = OrderedDict()
        #: Rookery items no task claimed (late after a cancel, or not attributable).
        self.unrouted_items = 0
        self._flow, self._target, self._registry = flow, target, registry
        self._default_headers = {k: v for k, v in (default_headers or {}).items()
                                 if k.lower() not in self.redact_headers}
        self._started = False
        self._failure: str | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._lock = asyncio.Lock()

    # -- lifecycle ------------------------------------------------------------------------
    @property
    def started(self) -> bool:
        """Whether the adapter is started (requests are accepted unless :attr:`failure`)."""
        return self._started

    @property
    def failure(self) -> str | None:
        """Why the adapter can no longer serve requests, or None while it can.

        Set when the flow's results can no longer be read (its ``fetch`` raised):
        no request could ever be answered, so new ones get HTTP 503 (JSON-RPC:
        an internal error) naming this reason instead of waiting for ever, and the
        tasks that were running ended FAILED. A health check can report it; a
        restart of the server (``stop()`` then ``start()``) clears it.
        """
        return self._failure

    async def start(self) -> None:
        """Run the flow and the Rookery dispatcher (idempotent)."""
        async with self._lock:
            if self._started:
                return
            self._flow.run(registry=self._registry)
            self._failure = None
            self._dispatcher = asyncio.create_task(self._dispatch(), name="a2a-dispatcher")
            self._started = True

    async def stop(self) -> None:
        """Stop the dispatcher, end running tasks ("shutting down"), stop the flow once."""
        async with self._lock:
            if not self._started:
                return
            self._started = False
            tasks = [t for t in (self._dispatcher, *self._background) if t is not None]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._dispatcher = None
            self._fail_running("A2A server is shutting down")
            await self._flow.stop()

    def spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        """Run ``coro`` in a task the adapter tracks (and cancels at stop)."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _fail_running(self, reason: str) -> None:
        for record in self.tasks.running():
            self.tasks.publish(record, record.failed(reason))

    # -- Rookery dispatch -------------------------------------------------------------------
    async def _dispatch(self) -> None:
        fetch_traced = getattr(self._flow, "fetch_traced", None)
        while True:
            try:
                if fetch_traced is not None:
                    trace_id, item = await fetch_traced()
                else:
                    item = await self._flow.fetch()
                    trace_id = getattr(item, "trace_id", None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # The flow cannot be read any more: no waiting request could ever finish.
                logger.exception("a2a_dispatcher_failed")
                self._failure = (f"the flow's results can no longer be read "
                                 f"({type(exc).__name__}: {str(exc)[:200]}); restart the server")
                self._fail_running(f"the flow failed: {type(exc).__name__}")
                return
            try:
                self._route(trace_id, item, traced=fetch_traced is not None)
            except Exception:  # one unrenderable result must not stop every other request
                logger.exception("a2a_route_failed", extra={"trace_id": trace_id})
                record = self.tasks.by_trace(trace_id)
                if record is not None:
                    self.tasks.publish(record, record.failed("the result could not be encoded"))

    def _route(self, trace_id: Any, item: Any, *, traced: bool) -> None:
        record = self.tasks.by_trace(trace_id) if trace_id is not None else None
        if record is None and trace_id is None and not traced:
            # A duck-typed flow cannot say whose plain value this is: safe only if
            # exactly one request is waiting.
            waiting = [t for t in self.tasks.running() if t.launched]
            record = waiting[0] if len(waiting) == 1 else None
        if record is None:
            self.unrouted_items += 1
            logger.warning("a2a_unrouted_item", extra={
                "trace_id": trace_id, "item_type": type(item).__name__})
            return
        payload = item.payload if isinstance(item, Message) else item
        if isinstance(payload, StreamChunk):
            self.tasks.publish(record, record.chunk_event(payload))
        elif isinstance(item, FlowError):
            self.tasks.publish(record, record.failed(item.message, error=item))
        else:
            meta = item.meta if isinstance(item, Message) and item.meta else None
            parts = payload_to_parts(to_jsonable_python(payload, fallback=repr))
            self.tasks.publish(record, record.result_event(parts))
            self.tasks.publish(record, record.completed(payload, meta))

    # -- task creation, launch, cancel (shared by the 2.1 routes and JSON-RPC) -------------
    def headers_for(self, extra: Mapping[str, Any]) -> Headers:
        """``Headers`` from ``default_headers`` updated with ``extra`` (redacted names dropped).

        Raises:
            A2ARequestError: 422, the headers do not validate (e.g. no tenant).
        """
        merged = {**self._default_headers,
                  **{k: v for k, v in extra.items()
                     if not (isinstance(k, str) and k.lower() in self.redact_headers)}}
        try:
            return Headers(**merged)
        except (ValidationError, TypeError) as exc:
            errors = exc.errors() if isinstance(exc, ValidationError) else [{"msg": str(exc)}]
            detail = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e['msg']}".lstrip(": ")
                               for e in errors)
            raise A2ARequestError(status_code=422, detail=f"invalid headers: {detail}") from exc

    async def open_task(
        self, *, message: Message, task_id: str, context_id: str,
        user_message: dict[str, Any], parent_span_id: str | None = None, method: str,
        owner: Any = None, parent_sampled: bool = True,
    ) -> TaskRecord:
        """Register a task for ``message`` and persist its RemoteBinding (not emitted yet).

        ``owner`` is the principal of the request (None without ``auth``); only it
        sees the task. ``parent_span_id`` and ``parent_sampled``: the caller's span
        and sampled flag (W3C ``traceparent``) the trace continues. If the caller is
        cancelled while the binding is saved, the task ends FAILED (it would
        otherwise hold a slot, SUBMITTED, for ever).

        Raises:
            A2ARequestError: 503 when not started, when the flow's results can no
                longer be read (:attr:`failure`), or when ``max_tasks`` tasks all run;
                409 when ``task_id`` or the trace id is already running, or
                ``task_id`` is a finished task of another principal.
        """
        if not self._started:
            raise A2ARequestError(status_code=503, detail="A2A server adapter is not started")
        if self._failure is not None:
            raise A2ARequestError(status_code=503, detail=(
                f"A2A server adapter cannot serve requests: {self._failure}"))
        existing = self.tasks.get(task_id)
        if (existing is not None and not existing.terminal) or self.tasks.trace_active(
                message.trace_id):
            raise A2ARequestError(status_code=409, detail=f"task {task_id} is already active")
        if existing is not None and not existing.visible_to(owner):
            # Task ids are one namespace (2.1's), but a finished task stays its
            # owner's: reusing its id would hand its record to another caller.
            raise A2ARequestError(status_code=409, detail=(
                f"task id {task_id} is taken; send without taskId or choose another"))
        if not self.tasks.room():
            raise A2ARequestError(status_code=503, detail=(
                f"too many running tasks ({self.tasks.max_tasks}); retry later"))
        user_message = {**user_message, "contextId": context_id, "taskId": task_id}
        record = TaskRecord(task_id=task_id, context_id=context_id, trace_id=message.trace_id,
                            history=[user_message], owner=owner)
        self.tasks.add(record)
        try:
            await self._record_task(record, message, parent_span_id, method,
                                    parent_sampled)
        except BaseException:
            # Cancelled (the client left) before anyone could launch the task.
            self.abandon(record, "the request ended before its task started")
            raise
        return record

    async def _record_task(self, record: TaskRecord, message: Message,
                           parent_span_id: str | None, method: str,
                           parent_sampled: bool = True) -> None:
        task_id, context_id = record.task_id, record.context_id
        binding = RemoteBinding(message.trace_id, context_id, task_id, self.agent_url)
        try:
            await self._flow.save_remote_binding(binding)
        except Exception:  # a store failure never fails the request (spec §15.1)
            logger.exception("a2a_binding_failed", extra={"task_id": task_id})
        record_parent = getattr(self._flow, "adopt_trace_parent", None)
        if parent_span_id is not None and record_parent is not None:
            attributes = {"a2a.task.id": task_id, "a2a.context.id": context_id,
                          "a2a.method": method}
            # Passed only when False: a duck-typed flow written before the flag
            # still adopts sampled parents.
            sampled = {} if parent_sampled else {"sampled": False}
            try:
                await record_parent(message.trace_id, parent_span_id=parent_span_id,
                                    attributes=attributes, **sampled)
            except Exception:
                logger.exception("a2a_adopt_trace_parent_failed", extra={"task_id": task_id})

    def _join_caller_trace(self, trace_id: str) -> bool:
        """Whether a request may run under its caller's ``trace_id`` (traceparent).

        Only the first request under a caller trace joins it (True, and it is
        remembered); later ones (False) run under a fresh trace id. A trace id the
        flow used before may still be in use there after its task ended: a cancelled
        task's trace is cancelled until its nodes' cleanup is over, and a message
        emitted under it meanwhile is dropped (its task stayed WORKING for ever, a
        blocking send never answered). 2.1 also defaults taskId to the trace id.
        """
        if (self.tasks.trace_active(trace_id) or trace_id in self._joined
                or self.tasks.get(trace_id) is not None):
            return False
        self._joined[trace_id] = None
        if len(self._joined) > _JOINED_MAX:
            self._joined.popitem(last=False)
        return True

    def abandon(self, record: TaskRecord, reason: str) -> None:
        """End ``record`` FAILED with ``reason`` if its message was never emitted.

        For a request that went away before launching its task (a 2.1 stream whose
        response never started, a cancelled request): without this the task stayed
        SUBMITTED, holding a ``max_tasks`` slot and its trace id, for ever. A task
        already launched or ended is left alone. Idempotent.
        """
        if not record.launched and not record.terminal:
            self.tasks.publish(record, record.failed(reason))

    async def launch(self, record: TaskRecord, message: Message) -> None:
        """Emit ``message`` to the target; the task goes WORKING (or FAILED if emit fails)."""
        if record.launched or record.terminal:
            return
        record.launched = True
        try:
            await self._flow.emit(message, to=self._target)
        except asyncio.CancelledError:
            # The caller left while the flow waited for room (the 2.1 stream route
            # emits in its request): the message was never put, and nothing else
            # would end the task, which held a task slot for ever.
            if not record.terminal:
                self.tasks.publish(record, record.failed(
                    "the client left before the flow accepted the message"))
            raise
        except Exception as exc:
            logger.exception("a2a_emit_failed", extra={"task_id": record.task_id})
            self.tasks.publish(record, record.failed(f"could not start the flow: {exc}"))
            return
        if not record.terminal and record.state != "TASK_STATE_WORKING":
            self.tasks.publish(record, record.working())

    async def cancel_record(self, record: TaskRecord) -> bool:
        """Cancel ``record``'s trace in the flow and mark the task CANCELED.

        Returns what ``flow.cancel`` returned (False for a task never emitted).
        """
        cancelled = False
        if record.launched and self._started:
            try:
                cancelled = bool(await self._flow.cancel(record.trace_id))
            except RuntimeError:  # the flow is not running
                cancelled = False
        self.tasks.publish(record, record.canceled())
        return cancelled

    def subscribe(self, record: TaskRecord) -> Subscriber:
        """A new bounded subscriber of ``record``'s live events."""
        sub = Subscriber(self.subscriber_queue_size)
        record.subscribers.add(sub)
        return sub

    # -- the 2.1 API (spec §16) -------------------------------------------------------------
    async def _open_legacy(self, request: A2AMessagePayload | Mapping[str, Any],
                           parent: TraceParent | None, method: str, principal: Any,
                           ) -> tuple[A2AMessagePayload, TaskRecord, Message]:
        if not isinstance(request, A2AMessagePayload):
            request = A2AMessagePayload.model_validate(request)
        if not self._started:
            raise A2ARequestError(status_code=503, detail="A2A server adapter is not started")
        headers = self.headers_for(request.headers)
        if request.trace_id is not None:
            # Checked before the task exists: the flow refuses to emit such an id, and
            # then the task had already failed and its binding was saved for a trace
            # that never ran (and the answer was a 500).
            try:
                check_trace_id(request.trace_id)
            except InvalidTraceId as exc:
                raise A2ARequestError(status_code=422, detail=f"invalid traceId: {exc}"
                                      ) from None
        trace_id = request.trace_id
        # The caller's trace is joined once: 2.1 defaults taskId and contextId to the
        # trace id, so a second request from the same client span (an instrumented
        # client sends the same traceparent) would reuse the first one's task id and
        # history. It runs under a fresh trace id, as in 2.1.
        if trace_id is None and parent is not None and self._join_caller_trace(parent[0]):
            trace_id = parent[0]
        else:
            parent = None
        message = Message(payload=request.payload, headers=headers,
                          deadline_s=request.deadline_s, meta=dict(request.meta))
        if trace_id is not None:
            message.trace_id = trace_id
        task_id = request.task_id or message.trace_id
        context_id = request.context_id or message.trace_id
        user = {"messageId": str(uuid.uuid4()), "role": "ROLE_USER",
                "parts": payload_to_parts(to_jsonable_python(request.payload, fallback=repr))}
        record = await self.open_task(message=message, task_id=task_id, context_id=context_id,
                                      user_message=user, method=method,
                                      parent_span_id=parent[1] if parent else None,
                                      parent_sampled=parent is None or traceparent_sampled(
                                          parent),
                                      owner=principal)
        return request, record, message

    async def handle_send(self, request: A2AMessagePayload | Mapping[str, Any], *,
                          traceparent: TraceParent | None = None,
                          principal: Any = None) -> dict[str, Any]:
        """``message/send``: run the request and answer with its outcome (spec §16).

        Keyword-only additions: ``traceparent``, the ``(trace_id, parent_span_id)``
        (optionally ``+ (sampled,)``) of a validated W3C traceparent (the run joins
        that trace unless it is active);
        ``principal``, the caller as ``auth`` identified it (the task's owner).

        Raises:
            A2ARequestError: 503 (not started / shutting down), 422 (headers, or a
                ``traceId`` that is not a valid trace id), 409 (task already active),
                500 (the flow could not be started).
        """
        request, record, message = await self._open_legacy(request, traceparent, "message/send",
                                                           principal)
        await self.launch(record, message)
        await record.done.wait()
        try:
            return legacy_response(record)
        except LookupError as exc:  # ended without a result: shut down or never started
            raise A2ARequestError(status_code=503 if not self._started else 500,
                                  detail=str(exc)) from None

    async def stream(self, request: A2AMessagePayload | Mapping[str, Any], *,
                     traceparent: TraceParent | None = None, principal: Any = None,
                     ) -> tuple[LegacyFrames, str, str]:
        """``message/stream``: ``(SSE frames, task id, context id)`` (spec §16).

        The message is emitted when the iterator is first advanced. The iterator
        has an ``aclose()``: closing it before the message was emitted (the response
        never started, the client left) ends the task FAILED instead of leaving it
        SUBMITTED for ever; whoever drops the iterator unread must call it.
        ``traceparent`` and ``principal`` as for :meth:`handle_send`.
        """
        _, record, message = await self._open_legacy(request, traceparent, "message/stream",
                                                     principal)
        sub = self.subscribe(record)
        abandon = functools.partial(self.abandon, record,
                                    "the stream ended before the message was sent to the flow")
        frames = LegacyFrames(legacy_frames(
            record, sub, functools.partial(self.launch, record, message), abandon), abandon)
        return frames, record.task_id, record.context_id

    async def cancel(self, request: A2ATaskCancelRequest | Mapping[str, Any], *,
                     principal: Any = None) -> dict[str, Any]:
        """``tasks/cancel``: cancel the task's trace (spec §16).

        ``principal`` (keyword-only addition): the caller as ``auth`` identified it;
        another principal's task is answered as an unknown one.
        """
        if not isinstance(request, A2ATaskCancelRequest):
            request = A2ATaskCancelRequest.model_validate(request)
        record = self.tasks.find(request.task_id, principal)
        if record is None:
            return {"taskId": request.task_id, "cancelled": False}
        if record.terminal:
            cancelled = False
            if self._started:
                with contextlib.suppress(RuntimeError):
                    cancelled = bool(await self._flow.cancel(record.trace_id))
        else:
            cancelled = await self.cancel_record(record)
        return {"taskId": record.task_id, "cancelled": cancelled, "traceId": record.trace_id,
                "contextId": record.context_id}


def create_a2a_app(adapter: A2AServerAdapter, *, include_docs: bool = True) -> Any:
    """A FastAPI app serving ``adapter``: the 2.1 routes plus A2A 1.0 (spec §16).

    Raises:
        RuntimeError: FastAPI is not installed (``pip install penguiflow[a2a-server]``).
    """
    try:
        import fastapi  # noqa: F401
    except ImportError as exc:
        raise RuntimeError("create_a2a_app needs FastAPI: install penguiflow[a2a-server] "
                           "(pip install 'penguiflow[a2a-server]')") from exc
    from ._app import build_app

    return build_app(adapter, include_docs=include_docs)
