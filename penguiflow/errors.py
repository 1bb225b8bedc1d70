"""Traceable flow errors.

Hierarchy::

    Exception
     ├── FlowError            a node's final failure, delivered to Rookery on request
     ├── TraceCancelled       (penguiflow.core) a trace was cancelled
     └── RuntimeError
          └── CycleError      (penguiflow.core) the graph has a cycle
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import Any

__all__ = ["FlowError", "FlowErrorCode"]


class FlowErrorCode(str, Enum):
    """Error codes; the runtime produces ``NODE_TIMEOUT`` and ``NODE_EXCEPTION``."""

    NODE_TIMEOUT = "NODE_TIMEOUT"
    NODE_EXCEPTION = "NODE_EXCEPTION"
    TRACE_CANCELLED = "TRACE_CANCELLED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    HOP_BUDGET_EXHAUSTED = "HOP_BUDGET_EXHAUSTED"
    TOKEN_BUDGET_EXHAUSTED = "TOKEN_BUDGET_EXHAUSTED"


class FlowError(Exception):
    """A failure attributed to one node of one trace.

    ``code`` is always stored as a plain ``str``; ``unwrap()`` returns the very
    exception that was raised.
    """

    def __init__(
        self,
        *,
        trace_id: str | None,
        node_name: str | None,
        code: FlowErrorCode | str,
        message: str,
        original_exc: BaseException | None = None,
        node_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.trace_id = trace_id
        self.node_name = node_name
        self.node_id = node_id
        self.code: str = code.value if isinstance(code, FlowErrorCode) else str(code)
        self.message = message
        self.original_exc = original_exc
        self.metadata: dict[str, Any] = dict(metadata) if metadata is not None else {}
        self.exception_type: str | None = (
            type(original_exc).__name__ if original_exc is not None else None
        )

    def __str__(self) -> str:
        text = f"[{self.code}] {self.message}"
        if self.trace_id:
            text += f" trace={self.trace_id}"
        if self.node_name:
            text += f" node={self.node_name}"
        return text

    def unwrap(self) -> BaseException | None:
        """Return the original exception (identity preserved), or None."""
        return self.original_exc

    def to_payload(self) -> dict[str, Any]:
        """Return a JSON-friendly dict: ``code``, ``message`` and the set ids."""
        payload: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.trace_id is not None:
            payload["trace_id"] = self.trace_id
        if self.node_name is not None:
            payload["node_name"] = self.node_name
        if self.node_id is not None:
            payload["node_id"] = self.node_id
        if self.exception_type is not None:
            payload["exception_type"] = self.exception_type
        if self.metadata:
            payload["metadata"] = dict(self.metadata)
        return payload

    @classmethod
    def from_exception(
        cls,
        *,
        trace_id: str | None,
        node_name: str | None,
        node_id: str | None,
        exc: BaseException,
        code: FlowErrorCode | str,
        message: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> FlowError:
        """Build a FlowError wrapping ``exc``; ``message`` defaults to ``str(exc)``."""
        if message is None:
            message = str(exc) or type(exc).__name__
        return cls(
            trace_id=trace_id,
            node_name=node_name,
            node_id=node_id,
            code=code,
            message=message,
            original_exc=exc,
            metadata=metadata,
        )
