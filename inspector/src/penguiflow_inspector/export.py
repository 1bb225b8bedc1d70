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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TextIO
from urllib.parse import urlsplit, urlunsplit

from penguiflow._spans import spans_from_events
from penguiflow.spandata import SpanData
from penguiflow.state import StateStoreError
from penguiflow_exporters import default_store_url, open_store
from penguiflow_exporters.otel import OTLPExportError, export_spans, otlp_json, signal_endpoint

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

EXIT_OK: Final = 0
#: The store or the collector failed (or the output file could not be written).
EXIT_FAILURE: Final = 1
#: The command line was wrong: bad flags, an unknown or ambiguous trace id.
EXIT_USAGE: Final = 2
#: The longest one OTLP request (retries included) may take.
DEFAULT_TIMEOUT_S: Final = 10.0
#: Candidates an "ambiguous prefix" message names.
_SHOWN_CANDIDATES: Final = 5


class ExportError(Exception):
    """A failure ``pf export`` reports as one line and an exit status."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


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
    try:
        store = open_store(store_url)
    except ValueError as exc:
        raise ExportError(str(exc).replace(store_url, redact(store_url)), EXIT_USAGE) from None
    if store_url.startswith("memory:"):
        raise ExportError(
            "memory:// is empty in a new process (an in-memory store lives only as long as "
            "the flow that recorded into it); pass --store sqlite:///... or postgresql://...",
            EXIT_USAGE)
    path = getattr(store, "path", None)
    if isinstance(path, Path) and not path.exists():
        # Opening a SQLite store creates the file; exporting from a typo must not.
        raise ExportError(
            f"no trace store at {str(path)!r}: nothing was recorded there; "
            "pass --store URL or set PENGUIFLOW_STORE to where the flow recorded its trace")
    try:
        try:  # a store opens itself on first use
            candidates = await store.resolve_trace_id(reference)
            trace_id = _choose(reference, candidates, store_url)
            events = list(await store.load_history(trace_id))
        finally:
            await store.close()
    except StateStoreError as exc:  # its message names the store and the likely fix
        raise ExportError(f"trace store: {_one_line(exc)}") from None
    except OSError as exc:  # a driver error the store did not translate
        raise ExportError(
            f"cannot reach the trace store {redact(store_url)}: {_one_line(exc)}") from None
    if not events:  # resolved a moment ago, then gone (deleted meanwhile)
        raise ExportError(f"trace {trace_id} has no stored events in {redact(store_url)}")
    return LoadedTrace(trace_id, len(events), spans_from_events(events))


def _choose(reference: str, candidates: Sequence[str], store_url: str) -> str:
    if reference in candidates:
        return reference
    if not candidates:
        raise ExportError(
            f"no trace id starts with {reference!r} in {redact(store_url)}; check the id, "
            "or pass --store URL (or set PENGUIFLOW_STORE) to where the trace was recorded",
            EXIT_USAGE)
    if len(candidates) == 1:
        return candidates[0]
    shown = ", ".join(sorted(candidates)[:_SHOWN_CANDIDATES])
    more = "" if len(candidates) <= _SHOWN_CANDIDATES else ", ..."
    raise ExportError(
        f"trace id prefix {reference!r} is ambiguous ({len(candidates)}"
        f"{'+' if len(candidates) >= 10 else ''} traces match: {shown}{more}); "
        "give more characters", EXIT_USAGE)


def redact(url: str) -> str:
    """``url`` without the password of its user info (safe to print)."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
    except ValueError:
        return url.split("://", 1)[0] + "://***"  # unparsable: show the scheme only
    user, host = parts.netloc.rsplit("@", 1)
    return urlunsplit(parts._replace(netloc=f"{user.split(':', 1)[0]}:***@{host}"))


def _reason(reason: str) -> str:
    """The first thing the OTLP exporter said went wrong, without its retry chatter."""
    said = " ".join(reason.split()).split("; ")
    # "Failed to export spans batch due to timeout, max retries or shutdown." is the
    # exporter's generic last word; a status code or connection error says more.
    specific = [line for line in said if "due to timeout, max retries" not in line]
    first = (specific or said)[0].split(" encountered while exporting", 1)[0]
    return first.removeprefix("Transient error ").rstrip(".")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def run(ns: argparse.Namespace, stdout: TextIO | None = None,
        stderr: TextIO | None = None) -> int:
    """Run ``pf export`` for parsed arguments; returns the exit status.

    Prints the outcome as one line on ``stderr``: a summary on success, the
    reason on failure (no traceback).
    """
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    store_url: str = ns.store or default_store_url()
    try:
        trace = asyncio.run(load_trace(store_url, ns.trace_id))
        where = _deliver(trace, ns, out)
    except ExportError as exc:
        print(f"pf export: {exc.message}", file=err)
        return exc.exit_code
    print(f"exported {len(trace.spans)} spans of trace {trace.trace_id} "
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
