"""A real OTLP/HTTP receiver on 127.0.0.1 for wire tests (no mocks of HTTP).

It accepts ``POST /v1/traces`` and ``POST /v1/metrics`` (protobuf, optionally
gzip/deflate), decodes them with ``opentelemetry.proto`` and keeps what it
received. Tests wait for data with :meth:`OTLPReceiver.wait_for_spans` (a
condition variable, never a sleep) and switch the receiver's behaviour to
simulate a broken collector:

* ``mode = "ok"``: 200 with an empty ``Export*ServiceResponse``;
* ``mode = "unavailable"``: 503 (the exporter retries it);
* ``mode = "reject"``: 400 (not retryable);
* ``mode = "stall"``: the request is held unanswered until :meth:`release`
  (or :meth:`close`), as a collector that accepts connections and hangs.

``down_url()`` is the URL of a port nothing listens on (connection refused).
"""

from __future__ import annotations

import asyncio
import gzip
import socket
import threading
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span

Mode = Literal["ok", "unavailable", "reject", "stall"]
# A stalled request is released at the latest after this long, so a test that
# forgets release() cannot keep a server thread alive for ever.
_MAX_STALL_S = 30.0


@dataclass
class ReceivedSpan:
    """One span as it arrived, with the resource and scope it came under."""

    span: Span
    resource: dict[str, Any]
    scope_name: str
    scope_version: str

    @property
    def trace_id(self) -> int:
        return int.from_bytes(self.span.trace_id, "big")

    @property
    def span_id(self) -> int:
        return int.from_bytes(self.span.span_id, "big")

    @property
    def parent_span_id(self) -> int | None:
        return int.from_bytes(self.span.parent_span_id, "big") if self.span.parent_span_id else None

    @property
    def attributes(self) -> dict[str, Any]:
        return {kv.key: any_value(kv.value) for kv in self.span.attributes}


def any_value(value: Any) -> Any:
    """A protobuf ``AnyValue`` as a Python value (arrays as tuples)."""
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return tuple(any_value(v) for v in value.array_value.values)
    return getattr(value, kind) if kind else None


@dataclass
class _Store:
    traces: list[ExportTraceServiceRequest] = field(default_factory=list)
    metrics: list[ExportMetricsServiceRequest] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    requests: int = 0


class OTLPReceiver:
    """An OTLP/HTTP collector stand-in; start with :meth:`start`, stop with :meth:`close`."""

    def __init__(self) -> None:
        self.mode: Mode = "ok"
        self._store = _Store()
        self._cond = threading.Condition()
        self._release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # silence stderr
                pass

            def do_POST(self) -> None:
                receiver._handle(self)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        # A short poll interval: close() (serve_forever's shutdown) waits up to one.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,),
                                        name="otlp-receiver", daemon=True)

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> OTLPReceiver:
        self._thread.start()
        return self

    def close(self) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    @property
    def url(self) -> str:
        """The base URL (``http://127.0.0.1:<port>``), as ``endpoint=`` takes it."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def release(self) -> None:
        """Answer the requests held by ``mode="stall"`` (and any later ones)."""
        self._release.set()

    # -- what arrived ----------------------------------------------------------------
    @property
    def requests(self) -> int:
        """POSTs received so far (answered or not)."""
        with self._cond:
            return self._store.requests

    @property
    def trace_requests(self) -> list[ExportTraceServiceRequest]:
        with self._cond:
            return list(self._store.traces)

    @property
    def metric_requests(self) -> list[ExportMetricsServiceRequest]:
        with self._cond:
            return list(self._store.metrics)

    @property
    def headers(self) -> list[dict[str, str]]:
        """The request headers of every accepted POST, lower-cased names."""
        with self._cond:
            return list(self._store.headers)

    def spans(self) -> list[ReceivedSpan]:
        with self._cond:
            return _flatten(self._store.traces)

    def wait_for_spans(self, count: int, timeout_s: float = 10.0) -> list[ReceivedSpan]:
        """Block until at least ``count`` spans arrived; AssertionError after ``timeout_s``."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(_flatten(self._store.traces)) >= count,
                                       timeout_s):
                got = len(_flatten(self._store.traces))
                raise AssertionError(f"expected {count} spans within {timeout_s}s, got {got}")
            return _flatten(self._store.traces)

    async def wait_for_spans_async(self, count: int,
                                   timeout_s: float = 10.0) -> list[ReceivedSpan]:
        """:meth:`wait_for_spans` for async tests (waits on a worker thread)."""
        return await asyncio.to_thread(self.wait_for_spans, count, timeout_s)

    def wait_for_requests(self, count: int, timeout_s: float = 10.0) -> None:
        """Block until ``count`` POSTs reached the server (whatever it answered)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._store.requests >= count, timeout_s):
                raise AssertionError(f"expected {count} requests within {timeout_s}s, "
                                     f"got {self._store.requests}")

    def wait_for_metrics(self, timeout_s: float = 10.0) -> list[ExportMetricsServiceRequest]:
        with self._cond:
            if not self._cond.wait_for(lambda: bool(self._store.metrics), timeout_s):
                raise AssertionError(f"no metrics within {timeout_s}s")
            return list(self._store.metrics)

    # -- the handler -----------------------------------------------------------------
    def _handle(self, request: BaseHTTPRequestHandler) -> None:
        body = request.rfile.read(int(request.headers.get("Content-Length") or 0))
        with self._cond:
            self._store.requests += 1
            self._cond.notify_all()
        mode = self.mode
        if mode == "stall":
            self._release.wait(_MAX_STALL_S)
        elif mode in ("unavailable", "reject"):
            self._reply(request, 503 if mode == "unavailable" else 400, b"")
            return
        encoding = (request.headers.get("Content-Encoding") or "").lower()
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        if request.path == "/v1/traces":
            message: Any = ExportTraceServiceRequest.FromString(body)
            reply = ExportTraceServiceResponse()
        elif request.path == "/v1/metrics":
            message = ExportMetricsServiceRequest.FromString(body)
            reply = ExportMetricsServiceResponse()
        else:
            self._reply(request, 404, b"")
            return
        with self._cond:
            target = (self._store.traces if isinstance(message, ExportTraceServiceRequest)
                      else self._store.metrics)
            target.append(message)
            self._store.headers.append({k.lower(): v for k, v in request.headers.items()})
            self._cond.notify_all()
        self._reply(request, 200, reply.SerializeToString())

    @staticmethod
    def _reply(request: BaseHTTPRequestHandler, status: int, body: bytes) -> None:
        try:
            request.send_response(status)
            request.send_header("Content-Type", "application/x-protobuf")
            request.send_header("Content-Length", str(len(body)))
            request.end_headers()
            request.wfile.write(body)
        except OSError:  # the client gave up (timeout) while we stalled
            pass


def _flatten(requests: list[ExportTraceServiceRequest]) -> list[ReceivedSpan]:
    out: list[ReceivedSpan] = []
    for req in requests:
        for resource_spans in req.resource_spans:
            resource = {kv.key: any_value(kv.value)
                        for kv in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    out.append(ReceivedSpan(span, resource, scope_spans.scope.name,
                                            scope_spans.scope.version))
    return out


def down_url() -> str:
    """A base URL on 127.0.0.1 where nothing listens (connection refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"
