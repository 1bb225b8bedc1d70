"""The A2A JSON-RPC endpoint: envelope checks, version negotiation, the six methods.

Every body gets an answer: a JSON-RPC result or error (HTTP 200, plain JSON), or,
for ``SendStreamingMessage`` / ``SubscribeToTask`` once the request is valid, an
SSE stream whose frames are ``data: {"result": ..., "id": ..., "jsonrpc": "2.0"}``
ending in CRLF CRLF (a2a.md §7, §11). Errors found before the first event are
plain JSON, never SSE.

Versions: the ``A2A-Version`` header (or query parameter) says which protocol the
client speaks; none means 0.3 (spec 3.6.2). 1.0 methods (PascalCase) need 1.0
(else -32009). 0.3 methods (``message/send`` ...) are answered in 0.3 form with
or without a header, so a client that sends ``A2A-Version: 1.0`` with old method
names still works (the SDK server answers -32603 there; being lenient costs
nothing and the answer is unambiguous). Internally everything is 1.0; the
``protocol`` converters rewrite 0.3 messages in and results out.

Tasks belong to the principal that created them (the ``auth`` callable's value):
every lookup is made on the caller's behalf, so another principal's task is
TaskNotFound (-32001), exactly like an unknown id, and ListTasks lists only the
caller's tasks. Without ``auth`` every caller is the same (None) principal.

Push notifications are not offered (the card says ``pushNotifications: false``): the
push-config methods answer -32003 PushNotificationNotSupported, as a2a-sdk does.

JSON is emitted with ``ensure_ascii`` so text with lone surrogates (legal in a
JSON string escape, not encodable as UTF-8) can never crash a response.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final, NoReturn

from penguiflow.types import Message

from . import protocol as p
from .protocol import ErrorCode
from .server import A2ARequestError, TraceParent, traceparent_sampled

if TYPE_CHECKING:
    from ._tasks import Subscriber, TaskRecord
    from .server import A2AServerAdapter

__all__ = ["RpcReply", "handle_rpc"]

#: Seconds between SSE keep-alive comments on a quiet stream (the SDK's cadence).
PING_S: Final = 15.0
DEFAULT_PAGE_SIZE: Final = 50
MAX_PAGE_SIZE: Final = 100
#: Deepest JSON nesting accepted: payloads are walked recursively downstream.
MAX_DEPTH: Final = 64

logger = logging.getLogger("penguiflow_a2a.server")

_REASONS: Final[Mapping[int, str]] = {
    ErrorCode.TASK_NOT_FOUND: "TASK_NOT_FOUND",
    ErrorCode.TASK_NOT_CANCELABLE: "TASK_NOT_CANCELABLE",
    ErrorCode.UNSUPPORTED_OPERATION: "UNSUPPORTED_OPERATION",
    ErrorCode.VERSION_NOT_SUPPORTED: "VERSION_NOT_SUPPORTED",
    ErrorCode.INVALID_PARAMS: "INVALID_PARAMS",
    ErrorCode.PUSH_NOT_SUPPORTED: "PUSH_NOTIFICATION_NOT_SUPPORTED",
}
#: The pseudo-operation of the push-config methods (answered -32003, never run).
_PUSH = "push-config"


class RpcError(Exception):
    """A JSON-RPC error answer (``code``, ``message``)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(slots=True)
class RpcReply:
    """What to send back: a JSON ``body``, or an SSE ``stream`` (closed early if ``cut``)."""

    body: bytes | None = None
    stream: AsyncIterator[bytes] | None = None
    cut: asyncio.Event | None = None


def _dumps(obj: Any) -> bytes:
    return p.wire_json(obj).encode()


def _error(rpc_id: Any, exc: RpcError, version: str) -> bytes:
    error: dict[str, Any] = {"code": exc.code, "message": exc.message}
    reason = _REASONS.get(exc.code)
    if version == p.V1_0 and reason is not None:
        error["data"] = [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": reason,
                          "domain": "a2a-protocol.org", "metadata": {}}]
    return _dumps({"error": error, "id": rpc_id, "jsonrpc": "2.0"})


def _no_nan(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


def _invalid(field: str, expected: str, value: Any) -> NoReturn:
    raise RpcError(ErrorCode.INVALID_PARAMS,
                   f"Invalid params: '{field}' must be {expected}, got {type(value).__name__}")


def _get(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], expected: str,
         path: str, *, required: bool = False) -> Any:
    value = obj.get(key)
    if value is None:
        if required:
            raise RpcError(ErrorCode.INVALID_PARAMS, f"Invalid params: '{path}' is required")
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        _invalid(path, expected, value)
    return value


_RFC3339: Final = re.compile(
    r"(\d{4}-\d{2}-\d{2})[Tt](\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?([Zz]|[+-]\d{2}:\d{2})")


def _timestamp(obj: Mapping[str, Any], key: str, path: str) -> datetime | None:
    """``obj[key]`` as an aware datetime: an RFC 3339 timestamp string (None if absent)."""
    value: str | None = _get(obj, key, str, "an RFC 3339 timestamp string", path)
    if value is None:
        return None
    match = _RFC3339.fullmatch(value)
    when = None
    if match is not None:
        date, clock, fraction, offset = match.groups()
        fraction = (fraction or "0")[:6].ljust(6, "0")  # datetime keeps microseconds
        offset = "+00:00" if offset in ("Z", "z") else offset
        try:
            when = datetime.fromisoformat(f"{date}T{clock}.{fraction}{offset}")
        except ValueError:  # 2026-02-30, 25:00:00 ...
            when = None
    if when is None:
        raise RpcError(ErrorCode.INVALID_PARAMS, (
            f"Invalid params: '{path}' must be an RFC 3339 timestamp such as "
            f"'2026-01-31T12:00:00Z' (date, 'T', time, 'Z' or an offset), got {value[:64]!r}"))
    return when


def _count(obj: Mapping[str, Any], key: str, path: str) -> int | None:
    value: int | None = _get(obj, key, int, "an integer", path)
    if value is not None and value < 0:
        raise RpcError(ErrorCode.INVALID_PARAMS, f"Invalid params: '{path}' must be >= 0")
    return value


async def handle_rpc(adapter: A2AServerAdapter, body: bytes, *, version: str | None,
                     traceparent: TraceParent | None, principal: Any = None) -> RpcReply:
    """Answer one JSON-RPC request ``body`` (bytes as received; never raises).

    ``principal`` is the caller as ``auth`` identified it (None without auth): new
    tasks are recorded as its own, and it sees and acts on its own tasks only.
    """
    rpc_id: Any = None
    answer_version = p.V1_0
    try:
        try:
            request = json.loads(body, parse_constant=_no_nan)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise RpcError(ErrorCode.PARSE_ERROR, f"Parse error: {exc}"[:300]) from None
        if not isinstance(request, dict):
            raise RpcError(ErrorCode.INVALID_REQUEST, "Invalid Request: not a JSON object")
        if _too_deep(request):
            raise RpcError(ErrorCode.INVALID_REQUEST,
                           f"Invalid Request: JSON nested deeper than {MAX_DEPTH} levels")
        candidate = request.get("id")
        if isinstance(candidate, str | int) and not isinstance(candidate, bool):
            rpc_id = candidate
        elif candidate is not None:
            raise RpcError(ErrorCode.INVALID_REQUEST,
                           "Invalid Request: 'id' must be a string, an integer or null")
        if request.get("jsonrpc") != "2.0":
            raise RpcError(ErrorCode.INVALID_REQUEST, "Invalid Request: 'jsonrpc' must be '2.0'")
        method = request.get("method")
        if not isinstance(method, str):
            raise RpcError(ErrorCode.INVALID_REQUEST, "Invalid Request: 'method' must be a string")
        params = request.get("params", {})
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise RpcError(ErrorCode.INVALID_PARAMS, "Invalid params: 'params' must be an object")
        found = p.operation_of(method)
        if found is None and method in p.PUSH_CONFIG_METHODS:
            # Known A2A methods of a capability this server does not have: the
            # spec's answer is -32003, not "no such method" (after the version check).
            found = (_PUSH, p.PUSH_CONFIG_METHODS[method])
        if found is None:
            raise RpcError(ErrorCode.METHOD_NOT_FOUND, "Method not found")
        operation, answer_version = found
        spoken = p.parse_version(version)
        if spoken is None:
            raise RpcError(ErrorCode.VERSION_NOT_SUPPORTED,
                           f"A2A version {version!r} is not supported; this server speaks "
                           f"{p.V1_0} and {p.V0_3}")
        if answer_version == p.V1_0 and spoken != p.V1_0:
            raise RpcError(ErrorCode.VERSION_NOT_SUPPORTED,
                           f"A2A version '{spoken}' is not supported by this handler for method "
                           f"{method}; send the header {p.VERSION_HEADER}: {p.V1_0}")
        if operation == _PUSH:
            raise RpcError(ErrorCode.PUSH_NOT_SUPPORTED,
                           "Push notifications are not supported by the agent")
        call = _Call(adapter, rpc_id, answer_version == p.V0_3, traceparent, method, principal)
        return await call.run(operation, params)
    except RpcError as exc:
        return RpcReply(body=_error(rpc_id, exc, answer_version))
    except Exception as exc:  # a bug must still get a JSON-RPC answer, not a 500
        logger.exception("a2a_rpc_internal_error")
        error = RpcError(ErrorCode.INTERNAL_ERROR, f"Internal error: {type(exc).__name__}")
        return RpcReply(body=_error(rpc_id, error, answer_version))


def _too_deep(value: Any) -> bool:
    # Iterative: recursion is what a hostile body would exploit.
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            return True
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return False


class _Call:
    """One validated call; methods return the reply or raise :class:`RpcError`."""

    def __init__(self, adapter: A2AServerAdapter, rpc_id: Any, v03: bool,
                 traceparent: TraceParent | None, method: str, principal: Any) -> None:
        self.adapter, self.rpc_id, self.v03 = adapter, rpc_id, v03
        self.traceparent, self.method, self.principal = traceparent, method, principal

    def result(self, result: Any) -> RpcReply:
        return RpcReply(body=_dumps({"result": result, "id": self.rpc_id, "jsonrpc": "2.0"}))

    def task_result(self, task: dict[str, Any]) -> RpcReply:
        return self.result(p.task_to_v03(task) if self.v03 else task)

    async def run(self, operation: str, params: dict[str, Any]) -> RpcReply:
        if operation in ("send", "stream"):
            return await self.send(params, stream=operation == "stream")
        if operation == "list":
            return self.list(params)
        history = _count(params, "historyLength", "historyLength")
        record = self.task(params)
        if operation == "get":
            return self.task_result(record.snapshot(history_length=history))
        if operation == "cancel":
            if record.terminal:
                raise RpcError(ErrorCode.TASK_NOT_CANCELABLE, "Task cannot be canceled")
            await self.adapter.cancel_record(record)
            if record.state != p.CANCELED:
                # It reached another final state while the flow was cancelling it
                # (its result was routed meanwhile): not cancelled, as the spec's
                # -32002 says, rather than a 200 carrying a COMPLETED task.
                raise RpcError(ErrorCode.TASK_NOT_CANCELABLE, (
                    f"Task cannot be canceled: it ended {record.state} first"))
            return self.task_result(record.snapshot())
        if record.terminal:  # subscribe
            raise RpcError(ErrorCode.UNSUPPORTED_OPERATION,
                           f"Task {record.task_id} is in terminal state: {record.state}")
        snapshot = record.snapshot()
        return self.stream(record, self.adapter.subscribe(record), {"task": snapshot})

    def task(self, params: Mapping[str, Any]) -> TaskRecord:
        task_id: str = _get(params, "id", str, "a string", "id", required=True)
        # Another principal's task is not found: the answer must not say it exists.
        record = self.adapter.tasks.find(task_id, self.principal)
        if record is None:
            raise RpcError(ErrorCode.TASK_NOT_FOUND, "Task not found")
        return record

    def list(self, params: Mapping[str, Any]) -> RpcReply:
        context_id = _get(params, "contextId", str, "a string", "contextId")
        status = _get(params, "status", str, "a task state name", "status")
        state = None
        if status:
            state = p.state_from_wire(status)
            if state == p.UNSPECIFIED:
                raise RpcError(ErrorCode.INVALID_PARAMS,
                               f"Invalid params: 'status' is not a task state: {status!r}")
        size = _count(params, "pageSize", "pageSize") or DEFAULT_PAGE_SIZE
        size = min(size, MAX_PAGE_SIZE)
        token = _get(params, "pageToken", str, "a string", "pageToken")
        after = None
        if token:
            # ASCII digits only: str.isdigit() also takes '²', which int() refuses.
            if not (token.isascii() and token.isdigit()) or len(token) > 20:
                raise RpcError(ErrorCode.INVALID_PARAMS,
                               "Invalid params: 'pageToken' is not a token this server issued")
            after = int(token)
        history = _count(params, "historyLength", "historyLength")
        artifacts = _get(params, "includeArtifacts", bool, "a boolean", "includeArtifacts")
        # Only tasks whose status changed at or after this time (as a2a-sdk's stores).
        since = _timestamp(params, "statusTimestampAfter", "statusTimestampAfter")
        page, total, cursor = self.adapter.tasks.page(
            context_id=context_id, state=state, page_size=size, after_seq=after,
            principal=self.principal, status_since=since)
        return self.result({
            "tasks": [t.snapshot(history_length=history, include_artifacts=bool(artifacts))
                      for t in page],
            "nextPageToken": "" if cursor is None else str(cursor),
            "pageSize": size, "totalSize": total})

    async def send(self, params: dict[str, Any], *, stream: bool) -> RpcReply:
        adapter = self.adapter
        raw = _get(params, "message", dict, "an object", "message", required=True)
        msg = p.message_from_v03(raw) if self.v03 else raw
        try:
            payload = p.parts_to_payload(msg.get("parts"))
        except ValueError as exc:
            raise RpcError(ErrorCode.INVALID_PARAMS, f"Invalid params: 'message.parts': {exc}"
                           ) from None
        message_id = _get(msg, "messageId", str, "a string", "message.messageId")
        _get(msg, "role", str, "a string", "message.role")
        context_id = _get(msg, "contextId", str, "a string", "message.contextId")
        task_id = _get(msg, "taskId", str, "a string", "message.taskId")
        metadata = _get(msg, "metadata", dict, "an object", "message.metadata") or {}
        config = _get(params, "configuration", dict, "an object", "configuration") or {}
        history = _count(config, "historyLength", "configuration.historyLength")
        if self.v03:
            blocking = _get(config, "blocking", bool, "a boolean", "configuration.blocking")
            immediate = blocking is False
        else:
            immediate = bool(_get(config, "returnImmediately", bool, "a boolean",
                                  "configuration.returnImmediately"))
        if task_id is not None:
            self.follow_up(task_id, context_id)
        tenant = None if self.v03 else _get(params, "tenant", str, "a string", "tenant")
        try:
            headers = adapter.headers_for({"tenant": tenant} if tenant else {})
        except A2ARequestError:
            raise RpcError(ErrorCode.INVALID_PARAMS, (
                "Invalid params: no tenant for this request: send 'params.tenant' (A2A 1.0) "
                "or configure A2AServerAdapter(default_headers={'tenant': ...})")) from None
        trace_id, parent, sampled = uuid.uuid4().hex, None, True
        tp = self.traceparent
        # The caller's trace is joined by its first request only: a retry under the
        # same traceparent (RemoteNode after a cancel) must not land in a trace the
        # flow may still be cancelling. Later ones run under a fresh trace id, with
        # no parent span (that span is in another trace).
        if tp is not None and adapter._join_caller_trace(tp[0]):
            trace_id, parent, sampled = tp[0], tp[1], traceparent_sampled(tp)
        redact = adapter.redact_headers
        meta = {k: v for k, v in metadata.items() if k.lower() not in redact}
        message = Message(payload=payload, headers=headers, trace_id=trace_id, meta=meta)
        user = {"messageId": message_id or str(uuid.uuid4()), "role": "ROLE_USER",
                "parts": msg["parts"]}
        try:
            record = await adapter.open_task(
                message=message, task_id=str(uuid.uuid4()), user_message=user,
                context_id=context_id or str(uuid.uuid4()), parent_span_id=parent,
                parent_sampled=sampled,
                method=self.method, owner=self.principal)
        except A2ARequestError as exc:
            raise RpcError(ErrorCode.INTERNAL_ERROR, str(exc.detail)) from None
        if stream:
            snapshot = record.snapshot()
            sub = adapter.subscribe(record)
            adapter.spawn(adapter.launch(record, message))
            return self.stream(record, sub, {"task": snapshot})
        if immediate:
            snapshot = record.snapshot(history_length=history)
            adapter.spawn(adapter.launch(record, message))
        else:
            await adapter.launch(record, message)
            await record.done.wait()
            snapshot = record.snapshot(history_length=history)
        return self.result(p.send_result_to_v03({"task": snapshot}) if self.v03
                           else {"task": snapshot})

    def follow_up(self, task_id: str, context_id: str | None) -> None:
        record = self.adapter.tasks.find(task_id, self.principal)
        if record is None:
            raise RpcError(ErrorCode.TASK_NOT_FOUND, f"Task {task_id} not found")
        if context_id is not None and context_id != record.context_id:
            raise RpcError(ErrorCode.INVALID_PARAMS, (
                f"Invalid params: context {context_id} does not match context "
                f"{record.context_id} of task {task_id}"))
        if record.terminal:
            raise RpcError(ErrorCode.UNSUPPORTED_OPERATION,
                           f"Task {task_id} is in terminal state: {record.state}")
        # Flows never pause for input, so a task is never waiting for a follow-up.
        raise RpcError(ErrorCode.UNSUPPORTED_OPERATION, (
            f"Task {task_id} is still running and does not accept messages; start a new "
            f"task in context {record.context_id} instead"))

    def stream(self, record: TaskRecord, sub: Subscriber, first: dict[str, Any]) -> RpcReply:
        return RpcReply(stream=self.frames(record, sub, first), cut=sub.cut)

    def frame(self, result: dict[str, Any]) -> bytes:
        body = p.stream_result_to_v03(result) if self.v03 else result
        return b"data: " + p.wire_json({"result": body, "id": self.rpc_id, "jsonrpc": "2.0"},
                                       separators=None).encode() + b"\r\n\r\n"

    async def frames(self, record: TaskRecord, sub: Subscriber,
                     first: dict[str, Any]) -> AsyncIterator[bytes]:
        try:
            yield self.frame(first)
            while True:
                try:
                    event = await asyncio.wait_for(sub.queue.get(), PING_S)
                except TimeoutError:
                    yield b": ping\r\n\r\n"
                    continue
                if event is None:
                    return
                yield self.frame(event.result)
                if event.final:
                    return
        finally:
            record.subscribers.discard(sub)
