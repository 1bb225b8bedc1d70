"""The A2A protocol's vocabulary, in one place: versions, methods, states, codes, parts.

PenguiFlow speaks A2A **1.0** (ProtoJSON: camelCase fields, ``TASK_STATE_*`` /
``ROLE_*`` enums, parts as ``{"text": ...}`` / ``{"data": ...}``, stream events
wrapped as ``{"task" | "message" | "statusUpdate" | "artifactUpdate": {...}}``) and
accepts **0.3** (slash method names, kebab states, ``kind`` discriminators, ``final``
on status updates). Everything inside the client and the server is 1.0 JSON; the
two ``*_to_v03`` / ``*_from_v03`` functions below convert at the wire, so no other
module knows that 0.3 exists beyond choosing the method name.

Facts (method names, error codes, which states end a stream) are those of the A2A
1.0 specification and of a2a-sdk 1.3 as captured in the project's shared spec
notes (``a2a.md`` §2-§9).
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable, Mapping
from typing import Any, Final

__all__ = [
    "wire_json",
    "VERSION_HEADER",
    "V1_0",
    "V0_3",
    "SUPPORTED_VERSIONS",
    "METHODS_V1",
    "METHODS_V03",
    "method_name",
    "operation_of",
    "PUSH_CONFIG_METHODS",
    "TERMINAL_STATES",
    "INTERRUPTED_STATES",
    "FINAL_STATES",
    "state_from_wire",
    "state_to_v03",
    "ErrorCode",
    "ERROR_MESSAGES",
    "payload_to_parts",
    "parts_to_payload",
    "message_to_v03",
    "message_from_v03",
    "task_to_v03",
    "task_from_v03",
    "stream_result_to_v03",
    "stream_result_from_v03",
    "send_result_to_v03",
    "send_result_from_v03",
    "parse_version",
]

#: The HTTP header (and query parameter) that carries the protocol version.
VERSION_HEADER: Final = "A2A-Version"
V1_0: Final = "1.0"
V0_3: Final = "0.3"
SUPPORTED_VERSIONS: Final = (V1_0, V0_3)

# Logical operation -> JSON-RPC method name, per version. 0.3 has no ListTasks.
METHODS_V1: Final[Mapping[str, str]] = {
    "send": "SendMessage",
    "stream": "SendStreamingMessage",
    "get": "GetTask",
    "list": "ListTasks",
    "cancel": "CancelTask",
    "subscribe": "SubscribeToTask",
}
METHODS_V03: Final[Mapping[str, str]] = {
    "send": "message/send",
    "stream": "message/stream",
    "get": "tasks/get",
    "cancel": "tasks/cancel",
    "subscribe": "tasks/resubscribe",
}
#: The push-notification config methods (method -> version). This implementation has
#: no push notifications (card: ``pushNotifications: false``); a server answers them
#: -32003 PushNotificationNotSupported, as a2a-sdk does (a2a.md §3, §8).
PUSH_CONFIG_METHODS: Final[Mapping[str, str]] = {
    "CreateTaskPushNotificationConfig": V1_0,
    "GetTaskPushNotificationConfig": V1_0,
    "ListTaskPushNotificationConfigs": V1_0,
    "DeleteTaskPushNotificationConfig": V1_0,
    "tasks/pushNotificationConfig/set": V0_3,
    "tasks/pushNotificationConfig/get": V0_3,
    "tasks/pushNotificationConfig/list": V0_3,
    "tasks/pushNotificationConfig/delete": V0_3,
}
_OP_V1 = {name: op for op, name in METHODS_V1.items()}
_OP_V03 = {name: op for op, name in METHODS_V03.items()}


def method_name(operation: str, version: str) -> str:
    """The JSON-RPC method of ``operation`` (``"send"``, ``"stream"``, ...) in ``version``.

    Raises:
        KeyError: the operation does not exist in that version (``list`` in 0.3).
    """
    return (METHODS_V1 if version == V1_0 else METHODS_V03)[operation]


def operation_of(method: str) -> tuple[str, str] | None:
    """``(operation, version)`` of a JSON-RPC method name, or None if unknown.

    PascalCase names are 1.0's and slash names 0.3's, whatever header came with
    them; the server checks the header against the answer.
    """
    op = _OP_V1.get(method)
    if op is not None:
        return op, V1_0
    op = _OP_V03.get(method)
    if op is not None:
        return op, V0_3
    return None


def parse_version(value: str | None) -> str | None:
    """Normalise an ``A2A-Version`` value: missing/empty -> ``"0.3"`` (spec 3.6.2).

    The patch part is ignored (``1.0.1`` is ``1.0``). Returns None for a version
    this implementation does not speak.
    """
    if value is None or not value.strip():
        return V0_3
    parts = value.strip().split(".")
    major_minor = ".".join(parts[:2]) if len(parts) >= 2 else parts[0]
    if major_minor in ("1", "1.0"):
        return V1_0
    if major_minor == "0.3":
        return V0_3
    return None


# -- task states ------------------------------------------------------------------------
# Inside PenguiFlow a state is its 1.0 name.
SUBMITTED: Final = "TASK_STATE_SUBMITTED"
WORKING: Final = "TASK_STATE_WORKING"
COMPLETED: Final = "TASK_STATE_COMPLETED"
FAILED: Final = "TASK_STATE_FAILED"
CANCELED: Final = "TASK_STATE_CANCELED"
REJECTED: Final = "TASK_STATE_REJECTED"
INPUT_REQUIRED: Final = "TASK_STATE_INPUT_REQUIRED"
AUTH_REQUIRED: Final = "TASK_STATE_AUTH_REQUIRED"
UNSPECIFIED: Final = "TASK_STATE_UNSPECIFIED"

#: States after which a task never changes again.
TERMINAL_STATES: Final = frozenset({COMPLETED, FAILED, CANCELED, REJECTED})
#: States where the agent waits for the client; streams close on them too.
INTERRUPTED_STATES: Final = frozenset({INPUT_REQUIRED, AUTH_REQUIRED})
#: Every state after which a stream closes.
FINAL_STATES: Final = TERMINAL_STATES | INTERRUPTED_STATES

_V03_STATES: Final[Mapping[str, str]] = {
    SUBMITTED: "submitted",
    WORKING: "working",
    COMPLETED: "completed",
    FAILED: "failed",
    CANCELED: "canceled",
    REJECTED: "rejected",
    INPUT_REQUIRED: "input-required",
    AUTH_REQUIRED: "auth-required",
    UNSPECIFIED: "unknown",
}
_FROM_V03_STATES = {v: k for k, v in _V03_STATES.items()}


def state_from_wire(value: Any) -> str:
    """The 1.0 name of a state written in either version (unknown -> UNSPECIFIED)."""
    if isinstance(value, str):
        if value in _V03_STATES:
            return value
        return _FROM_V03_STATES.get(value, UNSPECIFIED)
    return UNSPECIFIED


def state_to_v03(state: str) -> str:
    """The 0.3 spelling of a 1.0 state name."""
    return _V03_STATES.get(state, "unknown")


# -- error codes ------------------------------------------------------------------------
class ErrorCode:
    """JSON-RPC error codes of JSON-RPC 2.0 and A2A 1.0 (spec 5.4 / 9.5)."""

    PARSE_ERROR: Final = -32700
    INVALID_REQUEST: Final = -32600
    METHOD_NOT_FOUND: Final = -32601
    INVALID_PARAMS: Final = -32602
    INTERNAL_ERROR: Final = -32603
    TASK_NOT_FOUND: Final = -32001
    TASK_NOT_CANCELABLE: Final = -32002
    PUSH_NOT_SUPPORTED: Final = -32003
    UNSUPPORTED_OPERATION: Final = -32004
    CONTENT_TYPE_NOT_SUPPORTED: Final = -32005
    INVALID_AGENT_RESPONSE: Final = -32006
    EXTENDED_CARD_NOT_CONFIGURED: Final = -32007
    EXTENSION_SUPPORT_REQUIRED: Final = -32008
    VERSION_NOT_SUPPORTED: Final = -32009


#: The name of each code, as the spec spells the error (used in messages).
ERROR_MESSAGES: Final[Mapping[int, str]] = {
    ErrorCode.PARSE_ERROR: "JSONParseError",
    ErrorCode.INVALID_REQUEST: "InvalidRequestError",
    ErrorCode.METHOD_NOT_FOUND: "MethodNotFoundError",
    ErrorCode.INVALID_PARAMS: "InvalidParamsError",
    ErrorCode.INTERNAL_ERROR: "InternalError",
    ErrorCode.TASK_NOT_FOUND: "TaskNotFoundError",
    ErrorCode.TASK_NOT_CANCELABLE: "TaskNotCancelableError",
    ErrorCode.PUSH_NOT_SUPPORTED: "PushNotificationNotSupportedError",
    ErrorCode.UNSUPPORTED_OPERATION: "UnsupportedOperationError",
    ErrorCode.CONTENT_TYPE_NOT_SUPPORTED: "ContentTypeNotSupportedError",
    ErrorCode.INVALID_AGENT_RESPONSE: "InvalidAgentResponseError",
    ErrorCode.EXTENDED_CARD_NOT_CONFIGURED: "ExtendedAgentCardNotConfiguredError",
    ErrorCode.EXTENSION_SUPPORT_REQUIRED: "ExtensionSupportRequiredError",
    ErrorCode.VERSION_NOT_SUPPORTED: "VersionNotSupportedError",
}


# -- JSON on the wire -------------------------------------------------------------------
def wire_json(value: Any, *, separators: tuple[str, str] | None = (",", ":"),
              default: Callable[[Any], Any] | None = None) -> str:
    """``value`` as strict JSON text (RFC 8259), for every body and frame on the wire.

    Python's ``json`` writes NaN and the infinities as ``NaN`` / ``Infinity``, which
    are not JSON: strict parsers (JavaScript's, this server's own, a2a-sdk's) refuse
    the whole message, and Starlette's encoder raises (an HTTP 500). A flow's result
    holding one (a score of ``nan``) is therefore written with each non-finite
    float as ``null``, as JavaScript's ``JSON.stringify`` writes them; everything else
    is unchanged. Encoding is strict first, so values without them cost one pass.
    """
    try:
        return json.dumps(value, allow_nan=False, separators=separators, default=default)
    except ValueError as exc:
        if "Out of range float" not in str(exc):
            raise
    return json.dumps(_finite(value, default), allow_nan=False, separators=separators,
                      default=default)


def _finite(value: Any, default: Callable[[Any], Any] | None) -> Any:
    """``value`` with every non-finite float (in dicts, lists and tuples) as None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _finite(v, default) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v, default) for v in value]
    if default is not None and not isinstance(value, str | int | bool | type(None)):
        return _finite(default(value), None)
    return value


# -- parts and payloads -------------------------------------------------------------------
def payload_to_parts(payload: Any) -> list[dict[str, Any]]:
    """1.0 parts for a PenguiFlow payload: str -> one text part, anything else -> data.

    A pydantic model is dumped in JSON mode; a value that is not a JSON object
    (a list, a number) still travels as one data part (1.0's ``data`` is any
    JSON value).
    """
    if isinstance(payload, str):
        return [{"text": payload}]
    dump = getattr(payload, "model_dump", None)
    if callable(dump):
        payload = dump(mode="json")
    return [{"data": payload}]


def parts_to_payload(parts: Any) -> Any:
    """The payload that 1.0 ``parts`` stand for.

    Text parts are joined with ``"\\n"``; a single data part is its value;
    several data parts (or data mixed with text) become a list of the values in
    order, texts included as strings. File parts (``url`` / ``raw``) become a
    dict ``{"url" | "raw", "mediaType", "filename"}``.

    Raises:
        ValueError: ``parts`` is not a non-empty list of part objects.
    """
    if not isinstance(parts, list) or not parts:
        raise ValueError("a message needs a non-empty list of parts")
    texts: list[str] = []
    values: list[Any] = []
    for part in parts:
        if not isinstance(part, Mapping):
            raise ValueError(f"a part must be an object, got {type(part).__name__}")
        if "text" in part:
            if not isinstance(part["text"], str):
                raise ValueError("a text part's 'text' must be a string")
            texts.append(part["text"])
            values.append(part["text"])
        elif "data" in part:
            values.append(part["data"])
        elif "url" in part or "raw" in part:
            for key, v03 in (("url", "file.uri"), ("raw", "file.bytes")):
                if key in part and not isinstance(part[key], str):
                    kind = "a URL" if key == "url" else "base64 text"
                    raise ValueError(
                        f"a file part's {key!r} (0.3: {v03!r}) must be {kind} in a "
                        f"string, got {type(part[key]).__name__}")
            values.append({k: part[k] for k in ("url", "raw", "mediaType", "filename")
                           if k in part})
        else:
            raise ValueError("a part needs one of 'text', 'data', 'url' or 'raw'")
    if len(texts) == len(values):
        return "\n".join(texts)
    if len(values) == 1:
        return values[0]
    return values


def _part_to_v03(part: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any]
    if "text" in part:
        out = {"kind": "text", "text": part["text"]}
    elif "data" in part:
        out = {"kind": "data", "data": part["data"]}
    else:
        file: dict[str, Any] = {}
        if "url" in part:
            file["uri"] = part["url"]
        if "raw" in part:
            file["bytes"] = part["raw"]
        if "mediaType" in part:
            file["mimeType"] = part["mediaType"]
        if "filename" in part:
            file["name"] = part["filename"]
        out = {"kind": "file", "file": file}
    if "metadata" in part:
        out["metadata"] = part["metadata"]
    return out


def _part_from_v03(part: Any) -> Any:
    if not isinstance(part, Mapping):
        return part
    kind = part.get("kind")
    out: dict[str, Any]
    if kind == "text" or (kind is None and "text" in part):
        out = {"text": part.get("text")}
    elif kind == "data" or (kind is None and "data" in part):
        out = {"data": part.get("data")}
    elif kind == "file" or "file" in part:
        file = part.get("file") or {}
        if not isinstance(file, Mapping):
            # Not a 0.3 file object ("file": "uri", 5): passed on as it came, for
            # the 1.0 part checks to refuse as bad params (not a TypeError here).
            return dict(part)
        out = {}
        if "uri" in file:
            out["url"] = file["uri"]
        if "bytes" in file:
            raw = file["bytes"]
            # bytes (a Python caller) are encoded; anything else but text (5, [1, 2],
            # true from a hostile peer) is passed on for the part check to refuse as
            # bad params, not a TypeError (-32603) here.
            out["raw"] = (base64.b64encode(raw).decode()
                          if isinstance(raw, (bytes, bytearray)) else raw)
        if "mimeType" in file:
            out["mediaType"] = file["mimeType"]
        if "name" in file:
            out["filename"] = file["name"]
    else:
        return dict(part)
    if "metadata" in part:
        out["metadata"] = part["metadata"]
    return out


# -- objects: 1.0 <-> 0.3 -------------------------------------------------------------------
_ROLE_TO_V03 = {"ROLE_USER": "user", "ROLE_AGENT": "agent"}
_ROLE_FROM_V03 = {v: k for k, v in _ROLE_TO_V03.items()}


def message_to_v03(message: Mapping[str, Any]) -> dict[str, Any]:
    """A 1.0 Message as 0.3 writes it (``kind``, lowercase role, ``kind`` parts)."""
    out = {k: v for k, v in message.items() if k not in ("parts", "role")}
    out["kind"] = "message"
    out["role"] = _ROLE_TO_V03.get(message.get("role", ""), "agent")
    out["parts"] = [_part_to_v03(p) for p in message.get("parts", ())]
    return out


def message_from_v03(message: Mapping[str, Any]) -> dict[str, Any]:
    """A 0.3 Message in 1.0 form; a 1.0 message comes back unchanged (but copied)."""
    out = {k: v for k, v in message.items() if k not in ("kind", "parts", "role")}
    role = message.get("role")
    out["role"] = _ROLE_FROM_V03.get(role, role) if isinstance(role, str) else "ROLE_USER"
    parts = message.get("parts")
    out["parts"] = [_part_from_v03(p) for p in parts] if isinstance(parts, list) else parts
    return out


def _status_to_v03(status: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(status)
    out["state"] = state_to_v03(str(status.get("state", UNSPECIFIED)))
    if isinstance(status.get("message"), Mapping):
        out["message"] = message_to_v03(status["message"])
    return out


def _status_from_v03(status: Any) -> Any:
    if not isinstance(status, Mapping):
        return status
    out = dict(status)
    out["state"] = state_from_wire(status.get("state"))
    if isinstance(status.get("message"), Mapping):
        out["message"] = message_from_v03(status["message"])
    return out


def _artifact_to_v03(artifact: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(artifact)
    out["parts"] = [_part_to_v03(p) for p in artifact.get("parts", ())]
    return out


def _artifact_from_v03(artifact: Any) -> Any:
    if not isinstance(artifact, Mapping):
        return artifact
    out = dict(artifact)
    parts = artifact.get("parts")
    if isinstance(parts, list):
        out["parts"] = [_part_from_v03(p) for p in parts]
    return out


def task_to_v03(task: Mapping[str, Any]) -> dict[str, Any]:
    """A 1.0 Task as 0.3 writes it."""
    out = dict(task)
    out["kind"] = "task"
    if isinstance(task.get("status"), Mapping):
        out["status"] = _status_to_v03(task["status"])
    if "artifacts" in task:
        out["artifacts"] = [_artifact_to_v03(a) for a in task["artifacts"]]
    if "history" in task:
        out["history"] = [message_to_v03(m) for m in task["history"]]
    return out


def task_from_v03(task: Mapping[str, Any]) -> dict[str, Any]:
    """A 0.3 Task in 1.0 form."""
    out = {k: v for k, v in task.items() if k != "kind"}
    out["status"] = _status_from_v03(task.get("status"))
    if isinstance(task.get("artifacts"), list):
        out["artifacts"] = [_artifact_from_v03(a) for a in task["artifacts"]]
    if isinstance(task.get("history"), list):
        out["history"] = [message_from_v03(m) if isinstance(m, Mapping) else m
                          for m in task["history"]]
    return out


def stream_result_to_v03(result: Mapping[str, Any]) -> dict[str, Any]:
    """A 1.0 StreamResponse (``{"task"|"message"|"statusUpdate"|"artifactUpdate": …}``)
    as the bare 0.3 object with its ``kind`` (and ``final`` on status updates)."""
    if "task" in result:
        return task_to_v03(result["task"])
    if "message" in result:
        return message_to_v03(result["message"])
    if "statusUpdate" in result:
        update = dict(result["statusUpdate"])
        state = str(update.get("status", {}).get("state", UNSPECIFIED))
        update["status"] = _status_to_v03(update.get("status", {}))
        update["kind"] = "status-update"
        update["final"] = state in FINAL_STATES
        return update
    update = dict(result["artifactUpdate"])
    update["artifact"] = _artifact_to_v03(update.get("artifact", {}))
    update["kind"] = "artifact-update"
    update["append"] = bool(update.get("append", False))
    update["lastChunk"] = bool(update.get("lastChunk", False))
    return update


def stream_result_from_v03(result: Mapping[str, Any]) -> dict[str, Any]:
    """A 0.3 stream result (bare object with ``kind``) as a 1.0 StreamResponse.

    Raises:
        ValueError: the object has no ``kind`` this module knows.
    """
    kind = result.get("kind")
    if kind == "task":
        return {"task": task_from_v03(result)}
    if kind == "message":
        return {"message": message_from_v03(result)}
    if kind == "status-update":
        update = {k: v for k, v in result.items() if k not in ("kind", "final")}
        update["status"] = _status_from_v03(result.get("status"))
        return {"statusUpdate": update}
    if kind == "artifact-update":
        update = {k: v for k, v in result.items() if k != "kind"}
        update["artifact"] = _artifact_from_v03(result.get("artifact"))
        return {"artifactUpdate": update}
    raise ValueError(f"unknown A2A 0.3 result kind {kind!r}")


def send_result_to_v03(result: Mapping[str, Any]) -> dict[str, Any]:
    """A 1.0 SendMessageResponse (``{"task": …}`` or ``{"message": …}``) in 0.3 form."""
    return stream_result_to_v03(result)


def send_result_from_v03(result: Mapping[str, Any]) -> dict[str, Any]:
    """A 0.3 ``message/send`` result (a bare Task or Message) in 1.0 form."""
    return stream_result_from_v03(result)
