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
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TextIO

from penguiflow.spandata import SpanData
from penguiflow.tracing import spans_from_events
from penguiflow_exporters.otel import OTLPExportError, export_spans, otlp_json, signal_endpoint

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
                        help="where the trace was recorded: sqlite:///path.db, "
                             "postgresql://user@host:port/db or memory:// "
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
        try:
            export_spans(trace.spans, endpoint=ns.otlp, service_name=ns.service_name,
                         timeout_s=ns.timeout)
        except OTLPExportError as exc:
            raise ExportError(
                f"OTLP export to {exc.endpoint} failed after {exc.sent} of {exc.total} spans: "
                f"{_reason(exc.reason)}; is an OTLP/HTTP collector listening "
                "there (Jaeger: port 4318)? Or write the trace with --json FILE") from None
        return signal_endpoint("traces", ns.otlp)
    text = json.dumps(otlp_json(trace.spans, service_name=ns.service_name), indent=2) + "\n"
    if ns.json is None or ns.json == "-":
        out.write(text)
        out.flush()
        return "stdout"
    try:
        Path(ns.json).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise ExportError(f"cannot write {ns.json}: {exc.strerror or exc}") from None
    return str(ns.json)
