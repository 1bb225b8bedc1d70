"""PenguiFlow's errors: one tree, by audience.

Every error PenguiFlow raises on its own behalf is a :class:`PenguiFlowError`,
so ``except PenguiFlowError`` catches them all. Below it the tree separates
*misuse* (:class:`UsageError`: you called the API wrongly; the message says how
to fix it, or, where the 2.1 spec fixes the message word for word, the class
name and :attr:`UsageError.hint` do) from *run failures* (a node's
:class:`FlowError`, a store's, a remote agent's, an export's) and from the
control-flow signal :class:`TraceCancelled`.
A class that also names a builtin (``RuntimeError``, ``KeyError``, ...) is that
builtin too, so code written against penguiflow 2.1's ``except RuntimeError``
keeps working.

Hierarchy (``module:`` when the class is defined elsewhere; a builtin in
parentheses is a second base)::

    Exception
     └── PenguiFlowError               every error PenguiFlow raises on its own behalf
          ├── FlowError                a node's final failure (to Rookery on request)
          ├── TraceCancelled           signal: the trace was cancelled (never retried)
          ├── WireError                penguiflow.wire: an item cannot cross processes
          │    ├── WireEncodingError   (TypeError) no JSON form (names the edge and type)
          │    └── WireDecodingError   (ValueError) bytes that are no encoded item
          ├── UsageError               misuse of the API; says how to fix it
          │    ├── FlowNotRunning      (RuntimeError) emit/fetch/cancel, flow not running
          │    ├── FlowAlreadyRunning  (RuntimeError) run() on a running flow
          │    ├── ContextDetached     (RuntimeError) emit through a context no flow drives
          │    ├── ConfigurationError  (RuntimeError) no registry entry, store or floe
          │    ├── CycleError          (RuntimeError) the graph has a cycle
          │    ├── UnknownTarget       (KeyError) to= / from_= is not a neighbour
          │    ├── InvalidArgument     (ValueError) a value out of its domain
          │    │    └── InvalidTraceId a trace id that is not a clean str of 1-256 chars
          │    └── InvalidArgumentType (TypeError) not async def, an adjacency, a Message
          ├── StateStoreError          penguiflow.state: a store failed
          │    ├── StoreUnavailable    penguiflow.state: unreachable, or closed
          │    └── FollowerLagged      penguiflow.state: a follow() fell too far behind
          ├── RemoteError              penguiflow.remote: a remote call failed
          │    ├── RemoteStreamError   (RuntimeError) a transport broke the stream contract
          │    ├── RemoteAgentError    (RuntimeError) the in-memory fake agent failed
          │    └── A2AError            penguiflow_a2a.errors: the A2A client failed
          ├── A2ARequestError          penguiflow_a2a.server: a request the server refuses
          └── OTLPExportError          (RuntimeError) penguiflow_exporters.otel: export failed

``A2AError``'s own subtree (connection, timeout, protocol, JSON-RPC, task
errors) is drawn in :mod:`penguiflow_a2a.errors`. ``tests/core/test_errors.py``
checks this drawing against the classes.

Not errors: ``asyncio.QueueFull`` / ``QueueEmpty`` (``emit_nowait`` /
``fetch_nowait``), ``TimeoutError`` (``call_playbook``'s timeout) and a
``pydantic.ValidationError`` from a node's models keep their standard types.
"""

from __future__ import annotations

import traceback
from collections.abc import Mapping
from enum import Enum
from typing import Any

__all__ = [
    "SAFE_TEXT_LIMIT",
    "ConfigurationError",
    "ContextDetached",
    "CycleError",
    "FlowAlreadyRunning",
    "FlowError",
    "FlowErrorCode",
    "FlowNotRunning",
    "InvalidArgument",
    "InvalidArgumentType",
    "InvalidTraceId",
    "PenguiFlowError",
    "TraceCancelled",
    "UnknownTarget",
    "UsageError",
    "WireDecodingError",
    "WireEncodingError",
    "WireError",
    "safe_repr",
    "safe_str",
    "safe_traceback",
]

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
    * text longer than ``limit`` is cut to its first ``limit`` characters and
      the cut is said: ``"… [cut: 1,234 more characters]"`` (the characters
      left out);
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


def safe_traceback(exc: BaseException, limit: int = SAFE_TEXT_LIMIT) -> str:
    """``traceback.format_exception(exc)`` as one text that never raises, bounded.

    The text is what Python prints for an uncaught ``exc`` (its frames, its
    chained causes and contexts, its notes), cut like :func:`safe_repr` (the
    first ``limit`` characters, then ``"… [cut: N more characters]"``) and
    UTF-8-safe. An exception whose ``__str__`` raises shows Python's own
    ``<exception str() failed>`` in the last line; if formatting fails as a
    whole, the text is a placeholder such as
    ``"<traceback unavailable: ValueError, formatting raised TypeError>"``.

    Cost: it reads the source line of every frame (``linecache``, cached after
    the first read); call it on a failure path only.
    """
    try:
        text = "".join(traceback.format_exception(exc))
    except Exception as error:
        return _bounded(f"<traceback unavailable: {_type_name(exc)}, formatting raised "
                        f"{_type_name(error)}>", SAFE_TEXT_LIMIT)
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


#: The longest text a remote peer's id, state or method name is kept at (in span
#: attributes and log scopes): ids are tens of characters; more is a peer's bug.
PEER_TEXT_LIMIT = 256


def peer_text(value: object) -> str:
    """A value a remote peer sent (an A2A ``contextId``, ``taskId``, task state, ...)
    as text fit for a span attribute or a log line: :func:`safe_str` bounded at
    :data:`PEER_TEXT_LIMIT` characters (the cut marked), lone surrogates and NUL
    escaped. Never raises."""
    return safe_str(value, PEER_TEXT_LIMIT)


def _bounded(text: str, limit: int) -> str:
    if type(text) is not str:  # a str subclass returned by __repr__/__str__
        text = str.__str__(text)
    if len(text) > limit:
        cut = max(limit, 0)
        text = f"{text[:cut]}… [cut: {len(text) - cut:,} more characters]"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    return text


class PenguiFlowError(Exception):
    """Base of every error PenguiFlow raises on its own behalf (see the module docstring)."""


class UsageError(PenguiFlowError):
    """The API was used wrongly: fix the calling code, retrying will not help.

    Args:
        message: what went wrong and, unless the 2.1 spec fixes the text, how to
            fix it. A text the spec fixes is kept word for word, and nothing is
            added to ``str(exc)``, ``exc.args`` or the notes (2.1 suites match
            them exactly, e.g. ``pytest.raises(..., match=r"^...$")``, which
            reads notes too): the class name and :attr:`hint` carry the fix.
        hint: how to fix it, when the message cannot say so.
    """

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        #: How to fix the call, when the (2.1) message does not say it; else None.
        self.hint = hint


class FlowNotRunning(UsageError, RuntimeError):
    """The flow is not running (never started, or stopped): ``run()`` it first."""


class FlowAlreadyRunning(UsageError, RuntimeError):
    """``run()`` was called on a running flow: ``stop()`` it first."""


class ContextDetached(UsageError, RuntimeError):
    """A context no running flow drives was asked to emit (or a flow-only service)."""


class ConfigurationError(UsageError, RuntimeError):
    """The flow lacks what the call needs: a registry entry, a state store, a floe."""


class CycleError(UsageError, RuntimeError):
    """The flow's graph has a cycle and ``allow_cycles`` was not set.

    Attributes:
        nodes: names of the nodes on the cycle or downstream of it (sorted).
    """

    nodes: tuple[str, ...] = ()


class UnknownTarget(UsageError, KeyError):
    """``to=`` / ``from_=`` (or a router's decision) names no neighbour of the node.

    A ``KeyError``, as in 2.1, so ``str()`` shows the message quoted.
    """


class InvalidArgument(UsageError, ValueError):
    """A value is out of its domain: a NodePolicy field, a node's signature, ``join_k``'s k."""


class InvalidTraceId(InvalidArgument):
    """A trace id is not a str of 1-256 characters without control characters."""


class InvalidArgumentType(UsageError, TypeError):
    """An object of the wrong type: a node function that is not ``async def``, an
    adjacency that is not ``node.to(...)``, a RemoteNode input that is not a Message."""


class TraceCancelled(PenguiFlowError):
    """Signal: the trace was cancelled; raised where its work is refused or interrupted.

    Raised by the runtime around an interrupted invocation, by ``emit_chunk``,
    ``call_playbook`` and ``RemoteNode``. A node that raises it is recorded as
    cancelled, never retried (``penguiflow.core.TraceCancelled``, spec §11).
    """

    def __init__(self, trace_id: str | None) -> None:
        super().__init__(f"trace cancelled: {trace_id}")
        self.trace_id = trace_id


class WireError(PenguiFlowError):
    """An item cannot cross a process boundary (see :mod:`penguiflow.wire`)."""


class WireEncodingError(WireError, TypeError):
    """An item (or its payload) has no JSON form; the message names the edge and type."""


class WireDecodingError(WireError, ValueError):
    """Bytes from a bus are not an encoded item, or a known model refuses its data."""


class FlowErrorCode(str, Enum):
    """Error codes; the runtime produces ``NODE_TIMEOUT`` and ``NODE_EXCEPTION``."""

    NODE_TIMEOUT = "NODE_TIMEOUT"
    NODE_EXCEPTION = "NODE_EXCEPTION"
    TRACE_CANCELLED = "TRACE_CANCELLED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    HOP_BUDGET_EXHAUSTED = "HOP_BUDGET_EXHAUSTED"
    TOKEN_BUDGET_EXHAUSTED = "TOKEN_BUDGET_EXHAUSTED"


class FlowError(PenguiFlowError):
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

    def __reduce__(self) -> tuple[Any, ...]:
        # The keyword-only __init__ cannot take the default rebuild, FlowError(*args):
        # a FlowError crossing a process (a process pool, multiprocessing) failed
        # to unpickle. Rebuilt from its attributes; ``original_exc`` must pickle too.
        return (_restore_flow_error, (type(self), self.args, dict(self.__dict__)))

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


def _restore_flow_error(cls: type[FlowError], args: tuple[Any, ...],
                        state: dict[str, Any]) -> FlowError:
    """Unpickle a :class:`FlowError` (see ``FlowError.__reduce__``)."""
    err = cls.__new__(cls)
    err.args = args
    err.__dict__.update(state)
    return err
