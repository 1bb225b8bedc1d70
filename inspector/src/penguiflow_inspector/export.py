"""``pf export``: rebuild a stored trace's spans and send them over OTLP or write OTLP-JSON.

A trace recorded without a collector can still be opened in Jaeger later: the
spans are rebuilt from the trace's stored events alone by the runtime's own
span model (:func:`penguiflow._spans.spans_from_events`), so they carry the
same trace id, span ids, parents, names and times the live tracer would have
given them.

Every failure the user can cause or fix (an unknown or ambiguous id, a store
that cannot be opened, a collector that refuses or is down, a file that cannot
be written) is an :class:`ExportError`: one line for stderr and an exit status
(1 for a runtime failure, 2 for a usage error). ``pf`` prints it without a
traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import stat
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TextIO

import penguiflow
from penguiflow.spandata import SpanData
from penguiflow.tracing import spans_from_events

from ._store import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    CommandError,
    reading,
    redact,
    resolve,
)
from ._store import (
    store_url as _store_url,
)
from .model import printable

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_USAGE",
    "ExportError",
    "LoadedTrace",
    "add_arguments",
    "load_trace",
    "redact",
    "run",
    "write_otlp_json",
]

#: The longest one OTLP request (retries included) may take.
DEFAULT_TIMEOUT_S: Final = 10.0

#: ``pf export``'s failures are the commands' shared :class:`CommandError`.
ExportError = CommandError


@dataclass(frozen=True, slots=True)
class LoadedTrace:
    """A stored trace: its full id, how many events it has, and its rebuilt spans."""

    trace_id: str
    event_count: int
    spans: list[SpanData]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``pf export``'s arguments to its sub-parser."""
    parser.add_argument("trace_id", metavar="TRACE_ID",
                        help="the trace to export; a unique prefix of its id is enough")
    parser.add_argument("--store", metavar="URL", default=None,
                        help="where the trace was recorded: sqlite:///path.db or "
                             "postgresql://user@host:port/db "
                             "(default: $PENGUIFLOW_STORE, else sqlite:///.penguiflow/traces.db)")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--otlp", metavar="URL", default=None,
                        help="send the spans to this OTLP/HTTP collector, e.g. "
                             "http://localhost:4318 (/v1/traces is appended)")
    target.add_argument("--json", metavar="FILE", default=None,
                        help="write OTLP-JSON to FILE ('-' for stdout); "
                             "the default when --otlp is not given is stdout")
    parser.add_argument("--service-name", metavar="NAME", default=None,
                        help="service.name of the exported spans (default: "
                             "$OTEL_SERVICE_NAME, else 'penguiflow')")
    parser.add_argument("--timeout", metavar="SECONDS", type=_positive_float,
                        default=DEFAULT_TIMEOUT_S,
                        help=f"the longest one OTLP request may take, retries included "
                             f"(default {DEFAULT_TIMEOUT_S:g})")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0: {text!r}")
    return value


async def load_trace(store_url: str, reference: str) -> LoadedTrace:
    """Resolve ``reference`` (a full id or a unique prefix) in the store and rebuild its spans.

    Raises:
        ExportError: the store cannot be opened or read (exit 1), its URL is
            not supported (exit 2), or no / several traces match (exit 2).
    """
    async with reading(store_url) as store:
        trace_id = await resolve(store, reference, store_url)
        events = list(await store.load_history(trace_id))
    if not events:  # resolved a moment ago, then gone (deleted meanwhile)
        raise ExportError(f"trace {trace_id} has no stored events in {redact(store_url)}")
    return LoadedTrace(trace_id, len(events), spans_from_events(events))


def _reason(reason: str) -> str:
    """The first thing the OTLP exporter said went wrong, without its retry chatter."""
    said = " ".join(reason.split()).split("; ")
    # "Failed to export spans batch due to timeout, max retries or shutdown." is the
    # exporter's generic last word; a status code or connection error says more.
    specific = [line for line in said if "due to timeout, max retries" not in line]
    first = (specific or said)[0].split(" encountered while exporting", 1)[0]
    return first.removeprefix("Transient error ").rstrip(".")


def run(ns: argparse.Namespace, stdout: TextIO | None = None,
        stderr: TextIO | None = None) -> int:
    """Run ``pf export`` for parsed arguments; returns the exit status.

    Prints the outcome as one line on ``stderr``: a summary on success, the
    reason on failure (no traceback).
    """
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    url = _store_url(ns.store)
    try:
        trace = asyncio.run(load_trace(url, ns.trace_id))
        where = _deliver(trace, ns, out)
    except ExportError as exc:
        print(f"pf export: {printable(exc.message)}", file=err)
        return exc.exit_code
    print(f"exported {len(trace.spans)} spans of trace {printable(trace.trace_id)} "
          f"({trace.event_count} events) to {where}", file=err)
    return EXIT_OK


def _deliver(trace: LoadedTrace, ns: argparse.Namespace, out: TextIO) -> str:
    """Send or write the spans; returns where they went (for the summary line)."""
    if ns.otlp is not None:
        # Imported here: the OTel SDK is ~120 ms of every pf command's start otherwise.
        from penguiflow_exporters.otel import OTLPExportError, export_spans, signal_endpoint

        try:
            export_spans(trace.spans, endpoint=ns.otlp, service_name=ns.service_name,
                         timeout_s=ns.timeout)
        except OTLPExportError as exc:
            raise ExportError(
                f"OTLP export to {exc.endpoint} failed after {exc.sent} of {exc.total} spans: "
                f"{_reason(exc.reason)}; is an OTLP/HTTP collector listening "
                "there (Jaeger: port 4318)? Or write the trace with --json FILE") from None
        return signal_endpoint("traces", ns.otlp)
    if ns.json is None or ns.json == "-":
        write_otlp_json(trace.spans, out, service_name=ns.service_name)
        out.flush()
        return "stdout"
    target = Path(ns.json)
    if not target.name or target.is_dir():
        raise ExportError(f"--json {ns.json!r} names a directory, not a file: give a file "
                          "name (--json trace.json), or - for standard output", EXIT_USAGE)
    try:
        if _replaceable(target):
            # Streamed into a temporary file beside FILE, renamed over it once
            # complete: a failure midway never leaves a truncated FILE (nor
            # destroys the one there).
            partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
            try:
                with partial.open("w", encoding="utf-8") as file:
                    write_otlp_json(trace.spans, file, service_name=ns.service_name)
                os.replace(partial, target)
            finally:
                partial.unlink(missing_ok=True)
        else:
            # A symlink, a FIFO, a device, /dev/fd/N, a shell's >(...): written
            # through, as a shell's > would; renaming over it would replace the link
            # or pipe itself with a file, and its reader would get nothing.
            with target.open("w", encoding="utf-8") as file:
                write_otlp_json(trace.spans, file, service_name=ns.service_name)
    except OSError as exc:
        raise ExportError(f"cannot write {ns.json}: {exc.strerror or exc}") from None
    return str(ns.json)


def _replaceable(target: Path) -> bool:
    """Whether ``target`` is a regular file, or nothing yet (not a symlink to one)."""
    try:
        mode = target.lstat().st_mode
    except FileNotFoundError:
        return True
    return stat.S_ISREG(mode)


# -- OTLP/JSON, streamed ------------------------------------------------------------------------

#: OTLP ``SpanKind`` numbers; ``SpanFlags`` bits (the context's is-remote flag is known).
_KIND: Final = {"internal": 1, "server": 2, "client": 3, "producer": 4, "consumer": 5}
#: The instrumentation scope the exporters give the spans (``readable_spans``).
_SCOPE_NAME: Final = "penguiflow"
_HAS_IS_REMOTE: Final = 0x100
_IS_REMOTE: Final = 0x200


def _any_value(value: Any) -> dict[str, Any]:
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, str):
        return {"stringValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}
    if isinstance(value, float):
        if math.isfinite(value):
            return {"doubleValue": value}
        return {"doubleValue": "NaN" if math.isnan(value) else
                ("Infinity" if value > 0 else "-Infinity")}
    if isinstance(value, list | tuple):
        return {"arrayValue": {"values": [_any_value(v) for v in value]} if value else {}}
    return {"stringValue": str(value)}


def _attributes(attributes: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [{"key": key, "value": _any_value(value)} for key, value in attributes.items()]


def _otlp_span(span: SpanData) -> dict[str, Any]:
    """One span as OTLP/JSON: what ``otlp_json`` gives for it (same keys, same order)."""
    out: dict[str, Any] = {"traceId": f"{span.trace_id:032x}", "spanId": f"{span.span_id:016x}"}
    if span.parent_span_id:
        out["parentSpanId"] = f"{span.parent_span_id:016x}"
    end_ns = span.end_ns
    if end_ns is None:  # still open: ends at its last known instant (as readable_span)
        end_ns = max([span.start_ns, *(event.time_ns for event in span.events)])
    out["name"] = span.name
    out["kind"] = _KIND[span.kind]
    out["startTimeUnixNano"] = str(span.start_ns)
    out["endTimeUnixNano"] = str(end_ns)
    if span.attributes:
        out["attributes"] = _attributes(span.attributes)
    if span.events:
        out["events"] = [{"timeUnixNano": str(e.time_ns), "name": e.name,
                          **({"attributes": _attributes(e.attributes)} if e.attributes else {})}
                         for e in span.events]
    if span.links:
        out["links"] = [{"traceId": f"{link.trace_id:032x}", "spanId": f"{link.span_id:016x}",
                         **({"attributes": _attributes(link.attributes)}
                            if link.attributes else {}),
                         "flags": _HAS_IS_REMOTE} for link in span.links]
    if span.status == "error":
        out["status"] = ({"message": span.status_description, "code": 2}
                         if span.status_description else {"code": 2})
    else:
        out["status"] = {"code": 1} if span.status == "ok" else {}
    # A SERVER span's parent came over the wire (W3C traceparent): a remote parent.
    remote = span.parent_span_id and span.kind == "server"
    out["flags"] = _HAS_IS_REMOTE | (_IS_REMOTE if remote else 0)
    return out


def write_otlp_json(spans: Sequence[SpanData], out: TextIO, *,
                    service_name: str | None = None) -> None:
    """Write the OTLP/JSON ``ExportTraceServiceRequest`` for ``spans`` to ``out``, one
    span per line: the same data as :func:`~penguiflow_exporters.otel.otlp_json`
    (``json.loads`` of both is equal but for the resource's random
    ``service.instance.id``), written as it is encoded.

    Why not ``otlp_json``: it goes through SDK spans, protobuf and ``MessageToDict``
    and holds the whole request as dicts; with ``json.dumps(indent=2)`` a
    100k-span trace took 16 s and 1.4 GB. Here each span is a dict made
    directly from its record and encoded by ``json``'s C encoder, then dropped.
    """
    if not spans:
        out.write('{"resourceSpans": []}\n')
        return
    from penguiflow_exporters.otel import make_resource  # (the SDK: see _deliver)

    resource = make_resource(service_name)
    scope = {"name": _SCOPE_NAME, "version": penguiflow.__version__}
    dumps = json.JSONEncoder(ensure_ascii=True).encode
    out.write('{"resourceSpans": [{\n "resource": '
              + dumps({"attributes": _attributes(dict(resource.attributes))})
              + ',\n "scopeSpans": [{\n  "scope": ' + dumps(scope) + ',\n  "spans": [\n')
    last = len(spans) - 1
    for n, span in enumerate(spans):
        out.write("   " + dumps(_otlp_span(span)) + (",\n" if n < last else "\n"))
    out.write("  ]}]\n}]}\n")
