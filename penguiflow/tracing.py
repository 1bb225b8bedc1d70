"""The tracing seam: span ids, ids handed to an OTel SDK, log scopes, W3C propagation.

The core depends on ``opentelemetry-api`` only. What lives here is the small
contract between the runtime and whatever SDK the application configures:

* **Ids.** PenguiFlow decides span ids itself, so that stored events, live
  spans and spans rebuilt later by ``pf export`` or read by ``pf inspect``
  agree without talking to each other:

  - the penguiflow trace id *is* the OTel trace id when it is 32 hex digits,
    else :func:`otel_trace_id` derives one from it;
  - a trace's root span id is :func:`root_span_id` of the trace id;
  - an invocation id *is* its node span's id;
  - the CLIENT span of the ``index``-th remote call of an invocation is
    ``derived_span_id(trace_id, invocation_id, "remote", str(index))``.

  :func:`spans_from_events` rebuilds a trace's spans from its stored events
  with the same model the live tracer uses.
* **Pending ids.** The OTel API cannot pass ids to ``start_span``; instead the
  runtime parks them here right before it starts a span, and an id generator
  that asks :func:`take_pending_span_id` / :func:`take_pending_trace_id` first
  returns them. The live tracer puts such a generator in front of the provider's
  own on the penguiflow tracer of an SDK ``TracerProvider`` (whatever id
  generator the application configured; other tracers keep theirs), and
  ``penguiflow_exporters.otel.PenguiFlowIdGenerator`` does the same for a whole
  provider. ``start_span`` is synchronous, so a thread-local slot is enough:
  nothing else can run between parking and taking.
* **Span writers.** A tracing SDK can offer a cheaper way to record a span that
  is already finished than ``start_span`` + ``end``: :func:`register_span_writer`
  takes a factory the live tracer asks, once per tracer provider, for a
  *writer*. The writer gets each finished :class:`~penguiflow.spandata.SpanData`
  and returns True when it recorded it, False to have the runtime go through
  the API instead (so a writer may decline any span it cannot record exactly
  as the SDK would). Installed packages offer factories through the
  :data:`SPAN_WRITERS_ENTRY_POINT` entry-point group, loaded the first time a
  writer is asked for; ``penguiflow-exporters`` offers one for the OTel SDK's
  ``TracerProvider``, so the fast path needs no import of it by the application.
* **Log scope.** While enabled (``penguiflow_exporters.logging`` enables it),
  the runtime sets :data:`current_scope` around each node invocation so log
  lines written by user code can carry the trace, span, node and invocation
  ids even without an OTel SDK; a remote call adds its A2A ids with
  :func:`note_remote_ids` as soon as it learns them. Disabled, it costs nothing.
* **Propagation.** :func:`inject_trace_headers` / :func:`extract_trace_context`
  wrap the global W3C ``traceparent``/``tracestate`` propagator for transports
  (the A2A client and server use them).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, MutableMapping
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Final

from ._ids import otel_trace_id, root_span_id
from ._spans import derived_span_id, spans_from_events
from .errors import peer_text

if TYPE_CHECKING:
    from collections.abc import Callable

    from opentelemetry.context import Context as OtelContext

    from .spandata import SpanData

    #: Records one finished span; True when recorded, False to fall back to the API.
    SpanWriter = Callable[[SpanData], bool]
    #: ``factory(tracer_provider, instrumentation_version)``: a writer, or None to decline.
    SpanWriterFactory = Callable[[Any, str], SpanWriter | None]

__all__ = [
    "SPAN_WRITERS_ENTRY_POINT",
    "LogScope",
    "current_scope",
    "derived_span_id",
    "extract_trace_context",
    "inject_trace_headers",
    "log_scope_enabled",
    "note_remote_ids",
    "otel_trace_id",
    "park_ids",
    "register_span_writer",
    "root_span_id",
    "set_log_scope_enabled",
    "span_writer_for",
    "spans_from_events",
    "take_pending_span_id",
    "take_pending_trace_id",
]

logger = logging.getLogger("penguiflow.tracing")

#: The entry-point group of span-writer factories (see :func:`register_span_writer`):
#: each entry point names a ``factory(tracer_provider, version)``.
SPAN_WRITERS_ENTRY_POINT: Final = "penguiflow.span_writers"


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
_entry_points_loaded = False


def register_span_writer(factory: SpanWriterFactory) -> None:
    """Offer the live tracer a cheaper way to record finished spans (see the module doc).

    ``factory(tracer_provider, version)`` is called once per tracer provider the
    runtime traces through; it returns a writer, or None when it does not know
    that provider. The factory registered last is asked first; factories found
    through :data:`SPAN_WRITERS_ENTRY_POINT` are asked after every registered
    one. Registering the same factory twice has no effect.
    """
    if factory not in _WRITER_FACTORIES:
        _WRITER_FACTORIES.append(factory)


def _load_entry_points() -> None:
    """Add the factories installed packages declare, behind the registered ones (once)."""
    global _entry_points_loaded
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    # Scanning the installed distributions costs ~25 ms (measured): once per
    # process, at the first run() of a flow traced through an SDK.
    for point in entry_points(group=SPAN_WRITERS_ENTRY_POINT):
        try:
            factory = point.load()
        except Exception:  # a broken plugin costs its fast path, never the flow
            logger.warning("span writer entry point %s = %s could not be loaded; spans "
                           "go through start_span + end", point.name, point.value,
                           exc_info=True)
            continue
        if factory not in _WRITER_FACTORIES:
            _WRITER_FACTORIES.insert(0, factory)


def span_writer_for(tracer_provider: Any, version: str) -> SpanWriter | None:
    """The writer a factory offers for ``tracer_provider``, or None.

    Registered factories are asked first (the last registered first), then
    those of :data:`SPAN_WRITERS_ENTRY_POINT`. A factory that raises is logged
    and skipped.
    """
    if not _entry_points_loaded:
        _load_entry_points()
    for factory in reversed(_WRITER_FACTORIES):
        try:
            writer = factory(tracer_provider, version)
        except Exception:
            logger.warning("span writer factory %r failed for %r; trying the next one",
                           factory, tracer_provider, exc_info=True)
            continue
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


def note_remote_ids(context_id: str | None, task_id: str | None) -> None:
    """Put a remote call's A2A ``contextId``/``taskId`` in the current log scope.

    Transports and ``RemoteNode`` call it as soon as they learn the ids, so the
    log lines written from then until the invocation ends (the call's own, the
    HTTP client's, the runtime's ``remote_*`` events) carry ``context_id`` and
    ``task_id``, until the next remote call of the invocation (a retry) starts
    without them. A None leaves that id as it is. Outside a node invocation, or
    with log scopes disabled (:func:`set_log_scope_enabled`), it does nothing.
    The scope is a context variable: the ids stay until the runtime resets the
    scope at the end of the invocation, and a task started afterwards (a remote
    cancel) inherits them.
    """
    scope = current_scope.get()
    if scope is None:
        return
    # Bounded and escaped: the ids come from the peer (a 5 MB task id would be in
    # every log line of the invocation).
    context_id = scope.context_id if context_id is None else peer_text(context_id)
    task_id = scope.task_id if task_id is None else peer_text(task_id)
    if (context_id, task_id) != (scope.context_id, scope.task_id):
        current_scope.set(replace(scope, context_id=context_id, task_id=task_id))


def _forget_remote_ids() -> None:
    """A new remote call starts (a retry, a second call): the ids of the previous
    one must not label its lines. Called by ``RemoteNode`` before each call."""
    scope = current_scope.get()
    if scope is not None and (scope.context_id is not None or scope.task_id is not None):
        current_scope.set(replace(scope, context_id=None, task_id=None))


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
