"""Log lines that join spans: structlog plus stdlib, with PenguiFlow's ids on every line.

:func:`configure_logging` sets up one rendering pipeline for both worlds:

* ``structlog.get_logger().info("...")`` from application code, and
* stdlib records -- the runtime's ``penguiflow.*`` loggers (event logs whose
  ``extra`` carries ``trace_id``/``node_name``), and any other library's --
  rendered by structlog's ``ProcessorFormatter`` through the same processors.

:func:`add_trace_ids` is the processor that matters: it adds ``trace_id``,
``span_id``, ``node``, ``invocation_id``, ``context_id`` and ``task_id`` from
the node invocation the line was written in (:data:`penguiflow.tracing.current_scope`,
which configure_logging turns on) and from the current OTel span, so a log
line joins its span on ``(trace_id, span_id)`` in any backend. Keys the
caller set explicitly are never overwritten.

Everything it changes is global (structlog's configuration, a root-logger
handler and level, the runtime's scope switch); the returned
:class:`LoggingHandle` puts it all back.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from types import TracebackType
from typing import Any, Final, TextIO

import structlog
from opentelemetry import trace as trace_api

from penguiflow.tracing import current_scope, log_scope_enabled, set_log_scope_enabled

__all__ = ["ID_KEYS", "LoggingHandle", "add_trace_ids", "configure_logging"]

#: The keys :func:`add_trace_ids` may add (``otel_trace_id`` only when the
#: penguiflow trace id is not itself a 32-hex OTel id).
ID_KEYS: Final = ("trace_id", "span_id", "node", "invocation_id", "context_id", "task_id",
                  "otel_trace_id")

EventDict = MutableMapping[str, Any]


def add_trace_ids(logger: Any, method_name: str, event_dict: EventDict) -> EventDict:
    """structlog processor: add the ids of the invocation and span the line was logged in.

    Sources, in order: the runtime's log scope (trace id as ``pf inspect``
    shows it, the node span id, node name, invocation id, A2A contextId and
    taskId), then the current OTel span when valid (its 32/16-hex ids; its
    span id wins, since a span the user started inside a node is the more
    precise place). A stdlib record's ``node_name`` extra (the runtime's event
    logs) becomes ``node``. Keys already in ``event_dict`` (unless None) are kept;
    a line that names another trace than the scope's or the span's gets none of
    their ids (a span id of one trace beside the trace id of another matches no
    span anywhere).
    """
    fields: dict[str, Any] = {}
    scope = current_scope.get()
    if scope is not None:
        fields = {"trace_id": scope.trace_id, "span_id": scope.span_id,
                  "node": scope.node_name, "invocation_id": scope.invocation_id,
                  "context_id": scope.context_id, "task_id": scope.task_id}
        if scope.otel_trace_id and scope.otel_trace_id != scope.trace_id:
            fields["otel_trace_id"] = scope.otel_trace_id
    span_context = trace_api.get_current_span().get_span_context()
    if span_context.is_valid:
        trace_hex = f"{span_context.trace_id:032x}"
        fields["span_id"] = f"{span_context.span_id:016x}"
        if scope is None or scope.otel_trace_id != trace_hex:
            # No scope, or a span of another trace than the invocation's: the
            # line belongs to the span.
            fields["trace_id"] = trace_hex
            fields.pop("otel_trace_id", None)
    given = event_dict.get("trace_id")
    if given is not None and fields and str(given) not in {
            fields.get("trace_id"), fields.get("otel_trace_id"),
            scope.otel_trace_id if scope is not None else None}:
        # The line names its own trace (the runtime's events do: a node of trace A
        # cancelling trace B logs trace_cancel_start for B): the invocation and span
        # it was logged in belong to another trace, so none of their ids are its.
        fields = {}
    if fields.get("node") is None and event_dict.get("node_name") is not None:
        fields["node"] = event_dict["node_name"]
    for key, value in fields.items():
        # A None the caller passed (the runtime's trace-less events) is "unknown", not a value.
        if value is not None and event_dict.get(key) is None:
            event_dict[key] = value
    return event_dict


class LoggingHandle:
    """Undoes :func:`configure_logging`; a context manager, :meth:`restore` is idempotent."""

    def __init__(self, handler: logging.Handler, root_level: int,
                 structlog_config: dict[str, Any] | None, scope_was_enabled: bool) -> None:
        self.handler: Final = handler
        """The handler rendering every line (attached to the root logger)."""
        self._root_level = root_level
        self._structlog_config = structlog_config
        self._scope_was_enabled = scope_was_enabled
        self._restored = False

    def restore(self) -> None:
        """Put back the root logger, structlog's configuration and the runtime's scope switch."""
        if self._restored:
            return
        self._restored = True
        root = logging.getLogger()
        root.removeHandler(self.handler)
        root.setLevel(self._root_level)
        if self._structlog_config is None:
            structlog.reset_defaults()
        else:
            structlog.configure(**self._structlog_config)
        set_log_scope_enabled(self._scope_was_enabled)

    def __enter__(self) -> LoggingHandle:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.restore()


def configure_logging(*, json: bool = False, level: int | str = logging.INFO,
                      stream: TextIO | None = None) -> LoggingHandle:
    """Render structlog and stdlib log lines with PenguiFlow's ids, to ``stream``.

    Args:
        json: one JSON object per line (for log shippers); else structlog's
            aligned ``key=value`` console format, without colours.
        level: the root logger's level (``"DEBUG"`` shows the runtime's
            per-node ``node_start`` events too).
        stream: where lines go (default ``sys.stderr``).

    Returns:
        A :class:`LoggingHandle`; call ``restore()`` (or leave its ``with``
        block) to undo every global change made here.

    It configures structlog to hand its events to stdlib logging, adds one
    handler with a ``ProcessorFormatter`` to the root logger, sets the root
    level, and enables :func:`penguiflow.tracing.set_log_scope_enabled`.
    """
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_trace_ids,
    ]
    renderer: list[Any] = (
        [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()] if json
        # ConsoleRenderer formats exc_info itself (and warns if it was done before).
        else [structlog.dev.ConsoleRenderer(colors=False)])
    formatter = structlog.stdlib.ProcessorFormatter(
        # ExtraAdder first: the runtime's ids arrive as `extra` on the LogRecord.
        foreign_pre_chain=[structlog.stdlib.ExtraAdder(), *shared],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderer],
    )
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter)

    previous = structlog.get_config() if structlog.is_configured() else None
    structlog.configure(
        processors=[structlog.stdlib.filter_by_level, *shared,
                    structlog.processors.StackInfoRenderer(),
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: restore() must reach loggers created while configured.
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    handle = LoggingHandle(handler, root.level, previous, log_scope_enabled())
    root.addHandler(handler)
    root.setLevel(level)
    set_log_scope_enabled(True)
    return handle
