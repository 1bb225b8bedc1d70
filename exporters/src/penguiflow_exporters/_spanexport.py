"""Stored spans to OTLP: SDK spans, the wire, and OTLP/JSON (what ``pf export`` uses).

:class:`penguiflow.spandata.SpanData` records are rebuilt from stored events by
the runtime's span model; here they become SDK ``ReadableSpan`` objects with
exactly the recorded ids, parents, times, events, links, status and kind, so
a trace recorded without a collector can be sent to one later, or written as
OTLP/JSON and opened in Jaeger, and look the same as if it had been live.
Public names are re-exported by :mod:`penguiflow_exporters.otel`.
"""

from __future__ import annotations

import base64
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Final

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.status import Status, StatusCode

import penguiflow
from penguiflow.errors import PenguiFlowError
from penguiflow.spandata import SpanData

__all__ = [
    "DEFAULT_SERVICE_NAME",
    "OTLPExportError",
    "export_spans",
    "make_resource",
    "otlp_json",
    "readable_span",
    "readable_spans",
    "signal_endpoint",
]

#: ``service.name`` when neither the argument nor ``OTEL_SERVICE_NAME`` /
#: ``OTEL_RESOURCE_ATTRIBUTES`` gives one.
DEFAULT_SERVICE_NAME: Final = "penguiflow"
#: The instrumentation scope of every span the runtime produces.
SCOPE_NAME: Final = "penguiflow"
_HTTP_BASE: Final = "http://localhost:4318"
_GRPC_BASE: Final = "http://localhost:4317"
# Spans per OTLP request: far below the exporter's 64 MiB request cap even with
# large attributes, and what the SDK's BatchSpanProcessor sends at most.
_BATCH: Final = 512

_KINDS: Final = {
    "internal": SpanKind.INTERNAL, "client": SpanKind.CLIENT, "server": SpanKind.SERVER,
    "producer": SpanKind.PRODUCER, "consumer": SpanKind.CONSUMER,
}
_STATUS: Final = {"unset": StatusCode.UNSET, "ok": StatusCode.OK, "error": StatusCode.ERROR}
_SAMPLED: Final = TraceFlags(TraceFlags.SAMPLED)
_UNSET: Final = Status(StatusCode.UNSET)


class OTLPExportError(PenguiFlowError, RuntimeError):
    """The collector refused the spans, or could not be reached in time."""

    def __init__(self, endpoint: str, reason: str, *, sent: int, total: int) -> None:
        self.endpoint = endpoint
        self.reason = reason
        self.sent = sent
        """Spans accepted before the failing request."""
        self.total = total
        super().__init__(
            f"OTLP export to {endpoint} failed after {sent} of {total} spans: {reason}. "
            "Check that an OTLP/HTTP collector listens there (Jaeger takes OTLP/HTTP on "
            "port 4318), or write the trace as OTLP/JSON instead.")


def signal_endpoint(signal: str, endpoint: str | None, *, grpc: bool = False) -> str:
    """The URL one signal (``traces``/``metrics``) is exported to.

    Resolution: ``endpoint`` as a base URL (``/v1/<signal>`` appended; a URL
    already ending in ``/v1/traces`` or ``/v1/metrics`` is re-based), else
    ``OTEL_EXPORTER_OTLP_<SIGNAL>_ENDPOINT`` as is, else
    ``OTEL_EXPORTER_OTLP_ENDPOINT`` as a base, else ``http://localhost:4318``.
    gRPC endpoints carry no path (default ``http://localhost:4317``).
    """
    if endpoint:
        if grpc:
            return endpoint
        base = endpoint.rstrip("/")
        for suffix in ("/v1/traces", "/v1/metrics"):
            base = base.removesuffix(suffix)
        return f"{base}/v1/{signal}"
    per_signal = os.environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT")
    if per_signal:
        return per_signal
    env_base = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if grpc:
        return env_base or _GRPC_BASE
    return f"{(env_base or _HTTP_BASE).rstrip('/')}/v1/{signal}"


def make_resource(service_name: str | None = None,
                  attributes: Mapping[str, Any] | None = None) -> Resource:
    """The SDK resource: ``attributes`` over ``OTEL_RESOURCE_ATTRIBUTES``, plus ``service.name``.

    ``service.name`` is ``service_name``, else ``attributes["service.name"]``,
    else ``OTEL_SERVICE_NAME`` / the one in ``OTEL_RESOURCE_ATTRIBUTES``, else
    :data:`DEFAULT_SERVICE_NAME`.
    """
    attrs = dict(attributes or {})
    if service_name:
        attrs["service.name"] = service_name
    resource = Resource.create(attrs)
    # Resource.create falls back to "unknown_service[:exe]"; ours names the runtime.
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": DEFAULT_SERVICE_NAME}))
    return resource


def readable_spans(spans: Sequence[SpanData], resource: Resource | None = None
                   ) -> list[ReadableSpan]:
    """SDK spans with exactly the ids, parents, times, events, links, status and kind given.

    Args:
        spans: the records (``penguiflow.spandata.SpanData``).
        resource: the resource to attach (default :func:`make_resource`).

    A span still open (``end_ns`` None, an in-flight trace) ends at its last
    known instant -- its latest event, else its start -- because OTLP requires
    an end time. The instrumentation scope is ``penguiflow`` at the runtime's
    version.
    """
    resource = resource if resource is not None else make_resource()
    scope = InstrumentationScope(SCOPE_NAME, penguiflow.__version__)
    return [readable_span(span, resource, scope) for span in spans]


def readable_span(span: SpanData, resource: Resource, scope: InstrumentationScope, *,
                  copy: bool = True) -> ReadableSpan:
    """One :class:`SpanData` as an SDK ``ReadableSpan`` (see :func:`readable_spans`).

    ``copy=False`` hands the record's attribute dicts to the span as they are;
    only for a caller that never touches the record again (the live writer).
    """
    context = SpanContext(span.trace_id, span.span_id, is_remote=False, trace_flags=_SAMPLED)
    parent = None
    if span.parent_span_id:
        # A SERVER span's parent came over the wire (W3C traceparent), as live.
        parent = SpanContext(span.trace_id, span.parent_span_id,
                             is_remote=span.kind == "server", trace_flags=_SAMPLED)
    end_ns = span.end_ns
    if end_ns is None:
        end_ns = max([span.start_ns, *(event.time_ns for event in span.events)])
    code = _STATUS[span.status]
    if code is StatusCode.UNSET:
        status = _UNSET
    else:
        # The SDK accepts a description on ERROR only (and logs a warning otherwise).
        status = Status(code, span.status_description if code is StatusCode.ERROR else None)
    return ReadableSpan(
        name=span.name,
        context=context,
        parent=parent,
        resource=resource,
        attributes=dict(span.attributes) if copy else span.attributes,
        events=[Event(e.name, dict(e.attributes) if copy else e.attributes, e.time_ns)
                for e in span.events] if span.events else (),
        links=[Link(SpanContext(link.trace_id, link.span_id, is_remote=False,
                                trace_flags=_SAMPLED),
                    dict(link.attributes) if copy else link.attributes)
               for link in span.links] if span.links else (),
        kind=_KINDS[span.kind],
        status=status,
        start_time=span.start_ns,
        end_time=end_ns,
        instrumentation_scope=scope,
    )


class _ThreadErrors(logging.Handler):
    """Collects the exporter's warnings/errors logged on this thread (its only reasons)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self._thread = threading.get_ident()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self._thread:
            message = record.getMessage()
            if message not in self.messages:
                self.messages.append(message)


def export_spans(spans: Sequence[SpanData], endpoint: str | None = None, *,
                 headers: Mapping[str, str] | None = None, timeout_s: float = 10.0,
                 service_name: str | None = None,
                 resource_attributes: Mapping[str, Any] | None = None) -> int:
    """Send ``spans`` to an OTLP/HTTP collector through the SDK's ``OTLPSpanExporter``.

    Blocking (run it in a thread from async code). Transient failures (503,
    connection refused) are retried by the exporter within ``timeout_s`` per
    request of at most 512 spans.

    Args:
        spans: the records to send; an empty sequence sends nothing.
        endpoint: the collector's base URL, resolved like
            :func:`configure_tracing`'s (``OTEL_EXPORTER_OTLP_*``, else
            ``http://localhost:4318``).
        headers: extra request headers (merged over ``OTEL_EXPORTER_OTLP_HEADERS``).
        timeout_s: the longest one request (retries included) may take.
        service_name: ``service.name`` of the resource (see :func:`make_resource`).
        resource_attributes: further resource attributes.

    Returns:
        The number of spans the collector accepted (all of them).

    Raises:
        OTLPExportError: a request was refused or timed out; ``.sent`` says how
            many spans went through before it.
    """
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    url = signal_endpoint("traces", endpoint)
    ready = readable_spans(spans, make_resource(service_name, resource_attributes))
    if not ready:
        return 0
    exporter = OTLPSpanExporter(endpoint=url, headers=headers, timeout=timeout_s)
    # The exporter returns a bare FAILURE; the why (status code, connection
    # error) is only in what it logs, so listen on this thread while it runs.
    errors = _ThreadErrors()
    exporter_log = logging.getLogger(OTLPSpanExporter.__module__)
    exporter_log.addHandler(errors)
    try:
        for start in range(0, len(ready), _BATCH):
            try:
                result = exporter.export(ready[start:start + _BATCH])
            except Exception as exc:
                raise OTLPExportError(url, repr(exc), sent=start, total=len(ready)) from exc
            if result is not SpanExportResult.SUCCESS:
                reason = "; ".join(errors.messages) or "the exporter reported a failure"
                raise OTLPExportError(url, reason, sent=start, total=len(ready))
    finally:
        exporter_log.removeHandler(errors)
        exporter.shutdown()  # type: ignore[no-untyped-call]  # the SDK leaves it unannotated
    return len(ready)


def _hex_ids(obj: dict[str, Any]) -> None:
    # Proto3 JSON writes bytes as base64; OTLP/JSON wants trace/span ids as hex.
    for key in ("traceId", "spanId", "parentSpanId"):
        if key in obj:
            obj[key] = base64.b64decode(obj[key]).hex()


def otlp_json(spans: Sequence[SpanData], *, service_name: str | None = None,
              resource_attributes: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The OTLP/JSON ``ExportTraceServiceRequest`` for ``spans`` (Jaeger's JSON upload reads it).

    The same protobuf message the OTLP exporter sends, in the JSON encoding the
    OTLP spec defines: lowerCamelCase field names, trace and span ids as
    lowercase hex, enums as integers, 64-bit integers (``startTimeUnixNano``,
    ``intValue``) as decimal strings, default values omitted.
    """
    # protobuf ships no type information (no py.typed, types-protobuf not a dependency).
    from google.protobuf.json_format import MessageToDict  # type: ignore[import-untyped]

    request = encode_spans(readable_spans(spans, make_resource(service_name,
                                                                resource_attributes)))
    data: dict[str, Any] = MessageToDict(request, use_integers_for_enums=True)
    data.setdefault("resourceSpans", [])
    for resource_spans in data["resourceSpans"]:
        for scope_spans in resource_spans.get("scopeSpans", []):
            for span in scope_spans.get("spans", []):
                _hex_ids(span)
                for link in span.get("links", []):
                    _hex_ids(link)
    return data
