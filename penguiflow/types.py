"""Message models: the envelope that travels through a flow and controller data.

All models are ordinary pydantic v2 models (default config, mutable) because
user code and the runtime rely on ``model_copy(update=...)``. Mutable defaults
are fresh per instance.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, Field

from .errors import InvalidTraceId

__all__ = ["TRACE_ID_MAX_LEN", "FinalAnswer", "Headers", "Message", "PlanStep", "StreamChunk",
           "Thought", "WM", "check_trace_id"]

#: The longest valid trace id, in characters.
TRACE_ID_MAX_LEN = 256

TRACE_ID_RULE = (
    "a trace id must be a str of 1 to 256 characters, without control characters "
    "(U+0000-U+001F, U+007F-U+009F) and without lone surrogates (it must encode to "
    "UTF-8); leave Message.trace_id to its default (uuid4().hex), or use e.g. a UUID "
    "or 'order-42'"
)
# Control characters (Unicode category Cc) and surrogate code points.
_BAD_TRACE_CHAR = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_CHAR_NAMES = {0: "NUL", 9: "TAB", 10: "LF", 13: "CR", 27: "ESC", 127: "DEL"}


def check_trace_id(trace_id: object) -> str:
    """Return ``trace_id`` if it is a valid trace id, else raise ``InvalidTraceId``.

    A valid trace id is a ``str`` of 1 to :data:`TRACE_ID_MAX_LEN` (256)
    characters that contains no control character (Unicode category ``Cc``:
    U+0000-U+001F and U+007F-U+009F, so no NUL, tab or newline) and no lone
    surrogate (U+D800-U+DFFF: the id must encode to UTF-8). Anything else is
    allowed: letters of any script, digits, spaces, punctuation
    (``"abc-123:x"``, ``"заказ-7"``). The default ``uuid4().hex`` ids and W3C
    trace ids (32 hex digits) are valid. ``PenguiFlow.emit`` / ``emit_nowait``
    and ``Context.emit`` / ``emit_nowait`` / ``emit_chunk`` refuse a message
    whose trace id is invalid (an object whose ``trace_id`` is None has no
    trace and is not checked).

    Raises:
        InvalidTraceId: (a ``ValueError``) naming the problem (type, length, or
            the offending character and its position) and the rule above.
    """
    if (type(trace_id) is str and trace_id.isascii() and trace_id.isalnum()
            and len(trace_id) <= TRACE_ID_MAX_LEN):
        return trace_id  # the common case (hex ids): no scan
    if not isinstance(trace_id, str):
        raise InvalidTraceId(f"invalid trace_id: got {type(trace_id).__name__}, not a str; "
                         f"{TRACE_ID_RULE}")
    size = len(trace_id)
    if size == 0:
        raise InvalidTraceId(f"invalid trace_id: it is empty; {TRACE_ID_RULE}")
    if size > TRACE_ID_MAX_LEN:
        raise InvalidTraceId(f"invalid trace_id: {size} characters long (at most "
                         f"{TRACE_ID_MAX_LEN}); {TRACE_ID_RULE}")
    bad = _BAD_TRACE_CHAR.search(trace_id)
    if bad is not None:
        code = ord(bad.group())
        if 0xD800 <= code <= 0xDFFF:
            what = f"a lone surrogate U+{code:04X} (not encodable as UTF-8)"
        else:
            name = _CHAR_NAMES.get(code)
            what = f"a control character U+{code:04X}" + (f" ({name})" if name else "")
        # repr() escapes controls and surrogates: the message itself is printable.
        raise InvalidTraceId(f"invalid trace_id {trace_id[:40]!r}: {what} at position "
                         f"{bad.start()}; {TRACE_ID_RULE}")
    return trace_id


def _new_trace_id() -> str:
    # 32 lowercase hex: it doubles as the OpenTelemetry trace id (see docs/concepts/events.md).
    return uuid.uuid4().hex


class Headers(BaseModel):
    """Routing headers carried by every :class:`Message`."""

    tenant: str
    topic: str | None = None
    priority: int = 0


class Message(BaseModel):
    """The envelope nodes exchange.

    ``trace_id`` identifies one run of one message through a flow (and is the
    OpenTelemetry trace id); ``deadline_s`` is an absolute wall-clock deadline in
    epoch seconds; ``meta`` is a per-instance dict for user metadata.

    A trace id must be a ``str`` of 1 to 256 characters with no control
    characters (U+0000-U+001F, U+007F-U+009F, e.g. NUL) and no lone surrogates
    (it must encode to UTF-8); see :func:`check_trace_id`. The default (a fresh
    ``uuid4().hex``) always is. Building a Message does not check it; emitting
    one (``PenguiFlow.emit*``, ``Context.emit*``) does, and refuses an invalid
    id with a ``ValueError``.
    """

    payload: Any
    headers: Headers
    trace_id: str = Field(default_factory=_new_trace_id)
    ts: float = Field(default_factory=time.time)
    deadline_s: float | None = None
    meta: dict[str, Any] = Field(default_factory=dict)


class StreamChunk(BaseModel):
    """One chunk of a stream; ``seq`` is per stream id, starting at 0."""

    stream_id: str
    seq: int
    text: str
    done: bool = False
    meta: dict[str, Any] = Field(default_factory=dict)


class PlanStep(BaseModel):
    """One step of a controller's plan (data only)."""

    kind: Literal["retrieve", "web", "sql", "summarize", "route", "stop"]
    args: dict[str, Any] = Field(default_factory=dict)
    max_concurrency: int = 1


class Thought(BaseModel):
    """A controller's plan (data only)."""

    steps: list[PlanStep]
    rationale: str
    done: bool = False


class WM(BaseModel):
    """Controller working memory; budgets are enforced by the runtime (spec §8)."""

    query: str
    facts: list[Any] = Field(default_factory=list)
    hops: int = 0
    budget_hops: int | None = 8
    tokens_used: int = 0
    budget_tokens: int | None = None
    confidence: float = 0.0


class FinalAnswer(BaseModel):
    """A controller's final answer; delivered straight to Rookery."""

    text: str
    citations: list[str] = Field(default_factory=list)
