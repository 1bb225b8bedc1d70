"""Message models: the envelope that travels through a flow and controller data.

All models are ordinary pydantic v2 models (default config, mutable) because
user code and the runtime rely on ``model_copy(update=...)``. Mutable defaults
are fresh per instance.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, Field

__all__ = ["FinalAnswer", "Headers", "Message", "PlanStep", "StreamChunk", "Thought", "WM"]


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
