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

__all__ = ["SAFE_TEXT_LIMIT", "FlowError", "FlowErrorCode", "safe_repr", "safe_str"]

#: Default bound, in characters, of :func:`safe_repr` / :func:`safe_str` (8 KiB).
SAFE_TEXT_LIMIT = 8192


def safe_repr(obj: object, limit: int = SAFE_TEXT_LIMIT) -> str:
    """``repr(obj)`` that never raises, bounded to ``limit`` characters.

    This is how the runtime renders user objects (exceptions a node raised,
    observers' errors) into events, logs, FlowErrors and spans, so that an
    unprintable object is an ordinary failure and not a dead worker:

    * if ``repr`` raises (including ``RecursionError`` from a deeply nested
      value), the text is a placeholder naming the type and what went wrong,
      e.g. ``"<unprintable ValueError: repr raised RecursionError>"``;
    * text longer than ``limit`` is cut to ``limit`` characters and the cut is
      marked: ``"…[+N chars]"`` (N = the characters left out);
    * the result is a plain ``str`` that encodes to UTF-8: NUL and lone
      surrogates are written as ``\\x00`` / ``\\udXXX`` escapes.
    """
    try:
        text = repr(obj)
    except Exception as exc:
        return _unprintable(obj, "repr", exc)
    return _bounded(text, limit)


def safe_str(obj: object, limit: int = SAFE_TEXT_LIMIT) -> str:
    """``str(obj)`` that never raises; same guarantees as :func:`safe_repr`.

    A ``str`` is returned as is (only bounded and escaped): no ``__str__`` is called.
    """
    if type(obj) is str:
        return _bounded(obj, limit)
    try:
        text = str(obj)
    except Exception as exc:
        return _unprintable(obj, "str", exc)
    return _bounded(text, limit)


def _type_name(obj: object) -> str:
    try:
        name = type(obj).__name__
    except Exception:
        return "object"
    return name if type(name) is str else "object"


def _unprintable(obj: object, how: str, exc: BaseException) -> str:
    return _bounded(f"<unprintable {_type_name(obj)}: {how} raised {_type_name(exc)}>",
                    SAFE_TEXT_LIMIT)


def _part(value: object) -> str:
    # A str as is (unbounded, like an f-string); anything else through safe_str.
    return value if type(value) is str else safe_str(value)


def _bounded(text: str, limit: int) -> str:
    if type(text) is not str:  # a str subclass returned by __repr__/__str__
        text = str.__str__(text)
    if len(text) > limit:
        cut = max(limit, 0)
        text = f"{text[:cut]}…[+{len(text) - cut} chars]"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    return text


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
        # The parts may be anything a user passed: str() of a FlowError must not raise.
        text = f"[{_part(self.code)}] {_part(self.message)}"
        if self.trace_id:
            text += f" trace={_part(self.trace_id)}"
        if self.node_name:
            text += f" node={_part(self.node_name)}"
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
        """Build a FlowError wrapping ``exc``; ``message`` defaults to ``str(exc)``.

        ``str(exc)`` goes through :func:`safe_str`: an exception whose ``__str__``
        raises gives a placeholder message instead of a second exception.
        """
        if message is None:
            message = safe_str(exc) or _type_name(exc)
        return cls(
            trace_id=trace_id,
            node_name=node_name,
            node_id=node_id,
            code=code,
            message=message,
            original_exc=exc,
            metadata=metadata,
        )
