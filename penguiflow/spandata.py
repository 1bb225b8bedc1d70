"""SpanData: a span as plain data, the one shape live tracing and ``pf export`` share.

The runtime's span model (:mod:`penguiflow._spans`) turns a trace's events
into :class:`SpanData` records, and only then does anything OTel-specific
with them: the live tracer replays the same decisions through the
``opentelemetry-api`` as events happen, and ``pf export`` turns the records
built from *stored* events into SDK spans. One model, so the two agree in ids,
names, parents and timings by construction.

A recorded exception is an event named ``exception`` with the standard
``exception.type`` / ``exception.message`` / ``exception.stacktrace``
attributes, as ``Span.record_exception`` writes it. Ids are ints as OTel
holds them (``trace_id`` 128-bit, span ids 64-bit); times are epoch
nanoseconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["SpanData", "SpanEventData", "SpanLinkData"]

AttributeValue = str | bool | int | float | tuple[str, ...]


@dataclass(slots=True)
class SpanEventData:
    """A timed event on a span (``Span.add_event``)."""

    name: str
    time_ns: int
    attributes: dict[str, AttributeValue] = field(default_factory=dict)


@dataclass(slots=True)
class SpanLinkData:
    """A link to another span (fan-in: one per upstream invocation)."""

    trace_id: int
    span_id: int
    attributes: dict[str, AttributeValue] = field(default_factory=dict)


@dataclass(slots=True)
class SpanData:
    """One span, finished or still open (``end_ns`` None)."""

    name: str
    trace_id: int
    span_id: int
    parent_span_id: int | None
    kind: Literal["internal", "client", "server", "producer", "consumer"]
    start_ns: int
    end_ns: int | None = None
    attributes: dict[str, AttributeValue] = field(default_factory=dict)
    events: list[SpanEventData] = field(default_factory=list)
    links: list[SpanLinkData] = field(default_factory=list)
    status: Literal["unset", "ok", "error"] = "unset"
    status_description: str | None = None
    #: The trace's root span (``invoke_workflow``), even when it has a parent: a
    #: trace continuing a caller's (``PenguiFlow.adopt_trace_parent``).
    root: bool = False
    #: A node span whose first chunk came from its remote call's stream: that call's
    #: CLIENT span measures the time to it (metrics count one stream once).
    remote_first_chunk: bool = False

    @property
    def trace_id_hex(self) -> str:
        """The 32-hex trace id (as Jaeger shows it)."""
        return f"{self.trace_id:032x}"

    @property
    def span_id_hex(self) -> str:
        """The 16-hex span id."""
        return f"{self.span_id:016x}"
