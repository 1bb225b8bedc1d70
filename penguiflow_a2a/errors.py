"""Errors of the A2A client, one tree so a caller can catch at the level it needs.

Hierarchy::

    Exception
     └── A2AError                     anything the A2A client raises
          ├── A2AConnectionError      the agent could not be reached (refused, reset, DNS)
          ├── A2ATimeoutError         no answer within the timeout (also a TimeoutError)
          ├── A2AProtocolError        the answer is not A2A: not JSON, wrong shape, bad SSE
          ├── A2ARPCError             the agent answered a JSON-RPC error (``code``)
          │    ├── TaskNotFoundError        -32001
          │    ├── TaskNotCancelableError   -32002
          │    ├── UnsupportedOperationError -32004
          │    └── VersionNotSupportedError -32009
          └── A2ATaskError            the task ended badly
               ├── A2ATaskFailed      FAILED or REJECTED, with the agent's message
               └── A2ATaskInterrupted INPUT_REQUIRED or AUTH_REQUIRED

Every message names the agent URL and the JSON-RPC method, and the code or
state where there is one, so a log line alone says which call failed.
``A2ARequestError`` (the server's HTTP error of the 2.1 routes) lives in
:mod:`penguiflow_a2a.server`, as the 2.1 API has it.
"""

from __future__ import annotations

from typing import Any

from penguiflow.remote import RemoteError

from .protocol import ERROR_MESSAGES, ErrorCode

__all__ = [
    "A2AError",
    "A2AConnectionError",
    "A2ATimeoutError",
    "A2AProtocolError",
    "A2ARPCError",
    "TaskNotFoundError",
    "TaskNotCancelableError",
    "UnsupportedOperationError",
    "VersionNotSupportedError",
    "A2ATaskError",
    "A2ATaskFailed",
    "A2ATaskInterrupted",
    "rpc_error",
]


class A2AError(RemoteError):
    """Base of the A2A client's errors; ``agent_url`` and ``method`` say which call."""

    def __init__(self, message: str, *, agent_url: str | None = None,
                 method: str | None = None) -> None:
        super().__init__(message)
        self.agent_url = agent_url
        self.method = method


class A2AConnectionError(A2AError):
    """The agent could not be reached, or the connection broke mid-answer."""


class A2ATimeoutError(A2AError, TimeoutError):
    """The agent did not answer within the configured timeout."""


class A2AProtocolError(A2AError):
    """The agent's answer is not valid A2A (not JSON, wrong shape, bad event stream)."""


class A2ARPCError(A2AError):
    """The agent answered with a JSON-RPC error; ``code``, ``rpc_message``, ``data``."""

    def __init__(self, message: str, *, code: int, rpc_message: str = "", data: Any = None,
                 agent_url: str | None = None, method: str | None = None) -> None:
        super().__init__(message, agent_url=agent_url, method=method)
        self.code = code
        self.rpc_message = rpc_message
        self.data = data


class TaskNotFoundError(A2ARPCError):
    """-32001: the task id is unknown to the agent (or was purged)."""


class TaskNotCancelableError(A2ARPCError):
    """-32002: the task is already terminal."""


class UnsupportedOperationError(A2ARPCError):
    """-32004: e.g. subscribing to a terminal task, streaming on a non-streaming agent."""


class VersionNotSupportedError(A2ARPCError):
    """-32009: the agent does not speak the protocol version sent."""


class A2ATaskError(A2AError):
    """The remote task ended in a state that is not COMPLETED."""

    def __init__(self, message: str, *, state: str, task_id: str | None = None,
                 context_id: str | None = None, remote_message: str | None = None,
                 agent_url: str | None = None, method: str | None = None) -> None:
        super().__init__(message, agent_url=agent_url, method=method)
        self.state = state
        self.task_id = task_id
        self.context_id = context_id
        self.remote_message = remote_message


class A2ATaskFailed(A2ATaskError):
    """The task ended FAILED or REJECTED; ``remote_message`` is the agent's text."""


class A2ATaskInterrupted(A2ATaskError):
    """The task stopped in INPUT_REQUIRED or AUTH_REQUIRED: the agent wants more from the
    caller, which a RemoteNode cannot give; continue it with the same task id yourself."""


_BY_CODE: dict[int, type[A2ARPCError]] = {
    ErrorCode.TASK_NOT_FOUND: TaskNotFoundError,
    ErrorCode.TASK_NOT_CANCELABLE: TaskNotCancelableError,
    ErrorCode.UNSUPPORTED_OPERATION: UnsupportedOperationError,
    ErrorCode.VERSION_NOT_SUPPORTED: VersionNotSupportedError,
}


def rpc_error(error: Any, *, agent_url: str | None, method: str | None) -> A2ARPCError:
    """The exception for a JSON-RPC ``error`` object (any shape: a peer may be hostile)."""
    code = error.get("code") if isinstance(error, dict) else None
    if not isinstance(code, int) or isinstance(code, bool):
        code = ErrorCode.INTERNAL_ERROR
    text = error.get("message") if isinstance(error, dict) else None
    text = text if isinstance(text, str) else ""
    name = ERROR_MESSAGES.get(code, "JSON-RPC error")
    cls = _BY_CODE.get(code, A2ARPCError)
    shown = text if len(text) <= 500 else text[:500] + "…"
    return cls(f"A2A agent {agent_url} answered {method} with {name} ({code}): {shown!r}",
               code=code, rpc_message=text,
               data=error.get("data") if isinstance(error, dict) else None,
               agent_url=agent_url, method=method)
