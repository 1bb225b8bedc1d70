"""The tracing seam: ids handed to an OTel SDK, log scopes, W3C propagation.

The core depends on ``opentelemetry-api`` only. What lives here is the small
contract between the runtime and whatever SDK the application configures:

* **Pending ids.** PenguiFlow decides span ids itself (an invocation id *is*
  its node span's id, a root span id is derived from the trace id, and the
  penguiflow trace id *is* the OTel trace id; see :mod:`penguiflow._ids`), so
  that stored events, live spans and spans rebuilt later by ``pf export`` agree.
  The OTel API cannot pass ids to ``start_span``; instead the runtime parks
  them here right before it starts a span, and an SDK ``IdGenerator`` that asks
  :func:`take_pending_span_id` / :func:`take_pending_trace_id` first returns
  them (``penguiflow_exporters.otel.PenguiFlowIdGenerator`` does). A foreign
  generator ignores them: spans still nest correctly, only the ids differ from
  the stored ones. ``start_span`` is synchronous, so a thread-local slot is
  enough: nothing else can run between parking and taking.
* **Span writers.** A tracing SDK can offer a cheaper way to record a span that
  is already finished than ``start_span`` + ``end``: :func:`register_span_writer`
  takes a factory the live tracer asks, once per tracer provider, for a
  *writer*. The writer gets each finished :class:`~penguiflow.spandata.SpanData`
  and returns True when it recorded it, False to have the runtime go through
  the API instead (so a writer may decline any span it cannot record exactly
  as the SDK would). ``penguiflow_exporters.otel`` registers one for the OTel
  SDK's ``TracerProvider``.
* **Log scope.** While enabled (``penguiflow_exporters.logging`` enables it),
  the runtime sets :data:`current_scope` around each node invocation so log
  lines written by user code can carry the trace, span, node and invocation
  ids even without an OTel SDK. Disabled, it costs nothing.
* **Propagation.** :func:`inject_trace_headers` / :func:`extract_trace_context`
  wrap the global W3C ``traceparent``/``tracestate`` propagator for transports
  (the A2A client and server use them).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, MutableMapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

    from opentelemetry.context import Context as OtelContext

    from .spandata import SpanData

    #: Records one finished span; True when recorded, False to fall back to the API.
    SpanWriter = Callable[[SpanData], bool]
    #: ``factory(tracer_provider, instrumentation_version)``: a writer, or None to decline.
    SpanWriterFactory = Callable[[Any, str], SpanWriter | None]

__all__ = [
    "LogScope",
    "current_scope",
    "extract_trace_context",
    "inject_trace_headers",
    "log_scope_enabled",
    "park_ids",
    "register_span_writer",
    "span_writer_for",
    "set_log_scope_enabled",
    "take_pending_span_id",
    "take_pending_trace_id",
]


class _Pending(threading.local):
    trace_id = 0
    span_id = 0


_pending = _Pending()


def park_ids(trace_id: int, span_id: int) -> None:
    """Park the ids of the span about to be started on this thread (0 = no wish)."""
    _pending.trace_id = trace_id
    _pending.span_id = span_id


def take_pending_span_id() -> int:
    """Return and clear the parked span id; 0 when none is parked."""
    value = _pending.span_id
    _pending.span_id = 0
    return value


def take_pending_trace_id() -> int:
    """Return and clear the parked trace id; 0 when none is parked."""
    value = _pending.trace_id
    _pending.trace_id = 0
    return value


_WRITER_FACTORIES: list[SpanWriterFactory] = []


def register_span_writer(factory: SpanWriterFactory) -> None:
    """Offer the live tracer a cheaper way to record finished spans (see the module doc).

    ``factory(tracer_provider, version)`` is called once per tracer provider the
    runtime traces through; it returns a writer, or None when it does not know
    that provider. The factory registered last is asked first. Registering the
    same factory twice has no effect.
    """
    if factory not in _WRITER_FACTORIES:
        _WRITER_FACTORIES.append(factory)


def span_writer_for(tracer_provider: Any, version: str) -> SpanWriter | None:
    """The writer a registered factory offers for ``tracer_provider``, or None."""
    for factory in reversed(_WRITER_FACTORIES):
        writer = factory(tracer_provider, version)
        if writer is not None:
            return writer
    return None


@dataclass(frozen=True, slots=True)
class LogScope:
    """The ids of the node invocation a log line was written in."""

    trace_id: str | None
    """The penguiflow trace id (``Message.trace_id``)."""
    otel_trace_id: str | None
    """The 32-hex OTel trace id (equal to ``trace_id`` when that is 32 hex)."""
    span_id: str | None
    """The 16-hex id of the node span (= ``invocation_id``)."""
    node_name: str | None
    node_id: str | None
    invocation_id: str | None
    attempt: int = 0
    context_id: str | None = None
    """The A2A contextId of the remote call in progress, if any."""
    task_id: str | None = None
    """The A2A taskId of the remote call in progress, if any."""


#: The scope of the node invocation running in this context (None outside one).
current_scope: ContextVar[LogScope | None] = ContextVar("penguiflow_log_scope", default=None)


class _Switch:
    __slots__ = ("on",)

    def __init__(self) -> None:
        self.on = False


_log_scope = _Switch()


def set_log_scope_enabled(enabled: bool) -> None:
    """Turn on (or off) the per-invocation :data:`current_scope` for later invocations."""
    _log_scope.on = bool(enabled)


def log_scope_enabled() -> bool:
    """Whether the runtime sets :data:`current_scope` around invocations."""
    return _log_scope.on


def inject_trace_headers(headers: MutableMapping[str, str],
                         context: OtelContext | None = None) -> MutableMapping[str, str]:
    """Write W3C ``traceparent`` (and ``tracestate``) for ``context`` into ``headers``.

    ``context`` defaults to the current OTel context. With no SDK configured, or
    no recording span current, nothing is written. Returns ``headers``.
    """
    from opentelemetry import propagate

    propagate.inject(headers, context=context)
    return headers


def extract_trace_context(headers: Mapping[str, Any]) -> OtelContext:
    """The OTel context carried by W3C headers (case-insensitive keys).

    Use it as the parent of a server span: ``tracer.start_span(...,
    context=extract_trace_context(request.headers))``.
    """
    from opentelemetry import propagate

    lowered = {str(k).lower(): v for k, v in headers.items()}
    return propagate.extract(lowered)
