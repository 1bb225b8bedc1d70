"""``pf``: inspect, list, follow, export and demo PenguiFlow traces; migrate a store.

Every command reads the store ``--store URL`` names, else ``$PENGUIFLOW_STORE``,
else the SQLite default (``sqlite:///.penguiflow/traces.db``); the readers open it
read-only (they never create or alter anything), ``pf demo`` and ``pf migrate``
for writing. Output: the
terminal UI when stdout is a terminal (``inspect``, ``traces``, ``demo``),
else ``--plain`` text; ``--json`` for scripts. Failures are one line on
stderr (``pf <command>: ...``), never a traceback.

Exit status: 0 success, 1 a runtime failure (store, collector, output file),
2 a usage error (bad flags or values, an unknown or ambiguous trace id, a store
URL naming something that is not a trace store it can read).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import importlib
import json
import math
import re
import sys
import time
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Final, NoReturn, TextIO, cast

from penguiflow.state import (
    TERMINAL_KINDS,
    StateStoreError,
    StoredEvent,
    StoreUnavailable,
    TraceFilter,
    TraceStore,
    TraceSummary,
)
from penguiflow_exporters import open_store

from . import export, migrate, render
from ._store import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    CommandError,
    choose,
    ensure_not_empty,
    one_line,
    reading,
    redact,
    store_url,
)
from .demo import record_demo
from .model import TraceView, build_trace, format_duration, printable, status_word

#: (command, one-line help) in the order ``pf --help`` lists them.
COMMANDS: tuple[tuple[str, str], ...] = (
    ("inspect", "open the trace viewer on one trace (a unique id prefix is enough)"),
    ("traces", "list recent traces, newest first, with filters"),
    ("tail", "follow live traces as their events arrive"),
    ("export", "rebuild a stored trace's spans and send them over OTLP or write OTLP-JSON"),
    ("demo", "run a built-in demo flow, record it, and print its trace id"),
    ("migrate", "upgrade a trace store to the current schema (the readers refuse older ones)"),
    ("worker", "run a share of a flow's nodes over Redis Streams (penguiflow-distributed)"),
)
#: What ``pf worker`` says when penguiflow-distributed is not installed.
WORKER_MISSING: Final = (
    "pf worker: needs penguiflow-distributed, which is not installed: "
    "pip install penguiflow-distributed (in this repository: uv sync --all-packages)")
#: ``--status`` values: the inspector's words and the store's.
STATUSES: Final = {"ok": "succeeded", "error": "failed", "cancelled": "cancelled",
                   "running": "running", "incomplete": "incomplete",
                   "succeeded": "succeeded", "failed": "failed"}
#: How often ``pf tail`` polls a store that cannot push events across processes.
POLL_INTERVAL_S: Final = 0.2
#: Traces ``pf tail`` (without an id) watches when it polls: the most recently started.
TAIL_TRACES: Final = 200
#: How long ``pf tail`` polls a store that became unavailable before it gives up.
TAIL_GRACE_S: Final = 30.0
#: Events ``pf tail`` reads per ``load_history_page`` call: a trace's history and its
#: new events are read page by page, never the whole trace again.
TAIL_PAGE: Final = 2000
_STORE_HELP: Final = ("where traces are recorded: sqlite:///path.db or "
                      "postgresql://user@host:port/db (default: $PENGUIFLOW_STORE, "
                      "else sqlite:///.penguiflow/traces.db)")
_UNITS: Final = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``pf traces: error: ...``), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


#: The largest count a flag takes (a store's 64-bit integer).
MAX_COUNT = 2**63 - 1


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more: {text!r}")
    if value > MAX_COUNT:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_COUNT}: {text!r}")
    return value


def parse_when(text: str, now: float | None = None) -> float:
    """Epoch seconds from ``10m`` / ``2h`` / ``3d`` / ``45s`` / ``1w`` ago, or an ISO time.

    An ISO time without a zone is local time. Raises ``ArgumentTypeError``.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if match:
        base = time.time() if now is None else now
        return base - float(match.group(1)) * _UNITS[match.group(2)]
    try:
        return dt.datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a time: {text!r} (give e.g. 10m, 2h, 3d ago, or 2025-01-31T12:00)") from None


def _output_flags(cmd: argparse.ArgumentParser) -> None:
    fmt = cmd.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="JSON for scripts")
    fmt.add_argument("--plain", action="store_true",
                     help="plain text (the default when stdout is not a terminal)")


def version_line() -> str:
    """``pf (penguiflow-inspector) X.Y.Z; penguiflow A.B.C`` (``pf --version``)."""

    def of(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:  # run from a source tree that was never installed
            return "unknown"

    return f"pf (penguiflow-inspector) {of('penguiflow-inspector')}; penguiflow {of('penguiflow')}"


def build_parser() -> argparse.ArgumentParser:
    """Return the ``pf`` argument parser."""
    parser = _Parser(prog="pf", description="Inspect, follow and export PenguiFlow traces.")
    parser.add_argument("--version", action="version", version=version_line(),
                        help="print pf's and penguiflow's versions and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    cmds = {name: sub.add_parser(name, help=text, description=text) for name, text in COMMANDS}

    inspect = cmds["inspect"]
    inspect.add_argument("trace_id", metavar="TRACE_ID",
                         help="the trace; a unique prefix of its id is enough")
    inspect.add_argument("--store", metavar="URL", help=_STORE_HELP)
    _output_flags(inspect)

    traces = cmds["traces"]
    traces.add_argument("--store", metavar="URL", help=_STORE_HELP)
    traces.add_argument("--status", choices=sorted(STATUSES), metavar="STATUS",
                        help="ok, error, cancelled, running or incomplete (the store "
                             "lost some of its events)")
    traces.add_argument("--node", metavar="NAME", help="only traces in which this node ran")
    traces.add_argument("--errors", action="store_true", help="only traces with errors")
    traces.add_argument("--since", type=parse_when, metavar="WHEN",
                        help="started at or after WHEN: 10m, 2h, 3d (ago) or an ISO time")
    traces.add_argument("--until", type=parse_when, metavar="WHEN",
                        help="started before WHEN")
    traces.add_argument("--slowest", action="store_true",
                        help="slowest first instead of newest first")
    traces.add_argument("--limit", type=_positive_int, default=None, metavar="N",
                        help=f"at most N traces (default {LIST_LIMIT}; the terminal "
                             f"UI: {TUI_LIST_LIMIT})")
    _output_flags(traces)

    tail = cmds["tail"]
    tail.add_argument("trace_id", metavar="TRACE_ID", nargs="?",
                      help="follow this trace only (its history is printed first); "
                           "pf tail exits when it has ended")
    tail.add_argument("--store", metavar="URL", help=_STORE_HELP)
    _output_flags(tail)

    export.add_arguments(cmds["export"])

    demo = cmds["demo"]
    demo.add_argument("--store", metavar="URL", help=_STORE_HELP)
    demo.add_argument("--no-open", action="store_true",
                      help="do not open the inspector on the recorded trace")
    _output_flags(demo)

    migrate.add_arguments(cmds["migrate"])
    cmds["worker"].add_argument("rest", nargs=argparse.REMAINDER,
                                help="MODULE:ATTR --bus URL ... (pf worker --help)")
    return parser


def _worker(argv: Sequence[str]) -> int:
    """``pf worker``: handed whole to penguiflow-distributed, found at run time (the
    inspector does not depend on it)."""
    try:
        worker = importlib.import_module("penguiflow_distributed.worker")
    except ImportError:
        print(WORKER_MISSING, file=sys.stderr)
        return EXIT_USAGE
    return int(worker.main(list(argv), prog="pf worker"))


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``pf``; returns the process exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["worker"]:
        return _worker(args[1:])
    parser = build_parser()
    ns = parser.parse_args(args)
    if ns.command is None:
        parser.print_help()
        return EXIT_USAGE
    out, err = sys.stdout, sys.stderr
    for stream in (out, err):
        # A terminal or pipe that cannot encode the bars and arrows (LANG=C,
        # PYTHONIOENCODING=ascii): escaped, not a UnicodeEncodeError traceback.
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None and (getattr(stream, "encoding", "") or "").lower() \
                .replace("-", "") not in ("utf8", "utf16", "utf32"):
            with contextlib.suppress(Exception):
                reconfigure(errors="backslashreplace")
    try:
        if ns.command == "export":
            return export.run(ns)
        return int(_COMMANDS[ns.command](ns, out, err))
    except CommandError as exc:  # may quote store text (ids, names): escaped
        print(f"pf {ns.command}: {printable(exc.message)}", file=err)
        return exc.exit_code
    except KeyboardInterrupt:
        # Ctrl-C is how `pf tail` ends (success); any other command was cut short,
        # its output maybe partial (`--json` half written): 130, as a shell says.
        return EXIT_OK if ns.command == "tail" else EXIT_INTERRUPTED
    except BrokenPipeError:  # `pf traces | head`: the reader has gone
        with contextlib.suppress(OSError):
            sys.stdout = open("/dev/null", "w")  # noqa: SIM115 -- silence the final flush
        return EXIT_OK


def _fmt(ns: argparse.Namespace, out: TextIO) -> str:
    """``json``, ``plain`` or ``tui`` (a terminal and neither flag)."""
    if ns.json:
        return "json"
    if ns.plain or not _is_terminal(out):
        return "plain"
    return "tui"


def _is_terminal(stream: TextIO) -> bool:
    """Whether ``stream`` is a terminal (a seam for tests)."""
    return stream.isatty()


def _run_tui(err: TextIO, **kwargs: Any) -> int | None:
    """Run the Textual app; None when it cannot be imported (then print plain text)."""
    try:
        from .app import InspectorApp
    except ImportError as exc:
        print(f"pf: the terminal UI is not available ({one_line(exc)}); "
              "showing plain text", file=err)
        return None
    app = InspectorApp(**kwargs)
    app.run()
    return int(app.return_code or 0)


def _dump(data: Any, out: TextIO) -> None:
    """Write ``data`` as JSON and a newline: a top-level object or list one item per
    line (``{"trace_id": ..., "events": [`` then one event per line), written as it
    is encoded.

    The values of a top-level object may be iterators (see
    :func:`render.trace_json_parts`): their items are encoded and written one at a
    time, so a 200k-event trace is never held as data. Each item is encoded by
    ``json``'s C encoder on one line: with ``indent`` Python's pure-Python encoder
    runs instead (3.8 s of the 8.6 s ``pf inspect --json`` took at 200k events,
    measured). The text is JSON that ``json.loads`` reads as ``json.dumps(data)``.
    Writes are batched (~64 KiB): under an unbuffered stdout
    (``PYTHONUNBUFFERED=1``) each write is a system call.
    """
    encode = strict_json
    chunk: list[str] = []
    size = 0

    def write(text: str) -> None:
        nonlocal size
        chunk.append(text)
        size += len(text)
        if size > 65536:
            out.write("".join(chunk))
            chunk.clear()
            size = 0

    def items(values: Any, pad: str) -> None:
        first = True
        for value in values:
            write(("[\n" if first else ",\n") + pad + "  " + encode(value))
            first = False
        write("[]" if first else "\n" + pad + "]")

    if isinstance(data, list):
        items(data, "")
    elif isinstance(data, dict) and data:
        for n, (key, value) in enumerate(data.items()):
            write(("{\n  " if n == 0 else ",\n  ") + encode(key) + ": ")
            if isinstance(value, list | Iterator):
                items(value, "  ")
            else:
                write(encode(value))
        write("\n}")
    else:
        write(encode(data))
    write("\n")
    out.write("".join(chunk))
    out.flush()


# -- inspect ----------------------------------------------------------------------------------


async def _resolve_checked(store: TraceStore, reference: str, url: str) -> str:
    candidates = await store.resolve_trace_id(reference)
    if not candidates:
        await ensure_not_empty(store, url)  # "holds no traces" says more than "no such id"
    return choose(reference, candidates, url)


async def load_view(url: str, reference: str) -> TraceView:
    """Resolve ``reference`` in the store at ``url`` and build its view.

    Raises:
        CommandError: see :mod:`penguiflow_inspector._store`.
    """
    async with reading(url) as store:
        trace_id = await _resolve_checked(store, reference, url)
        events = await store.load_history(trace_id)
    if not events:  # resolved a moment ago, then deleted
        raise CommandError(f"trace {trace_id} has no stored events in {redact(url)}")
    return build_trace(events)


async def _resolve_only(url: str, reference: str) -> str:
    async with reading(url) as store:
        return await _resolve_checked(store, reference, url)


def _inspect(ns: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    url = store_url(ns.store)
    fmt = _fmt(ns, out)
    if fmt == "tui":
        trace_id = asyncio.run(_resolve_only(url, ns.trace_id))  # errors before the UI
        code = _run_tui(err, store_url=url, trace_id=trace_id, mode="trace")
        if code is not None:
            return code
    view = asyncio.run(load_view(url, ns.trace_id))
    if fmt == "json":
        _dump(dict(render.trace_json_parts(view)), out)
    else:
        out.write(render.trace_text(view))
    return EXIT_OK


# -- traces -----------------------------------------------------------------------------------


#: ``pf traces``' default --limit when it prints, and when it opens the terminal UI
#: (a screen scrolls: it showed the 200 newest before it took the flags).
LIST_LIMIT = 50
TUI_LIST_LIMIT = 200


def trace_filter(ns: argparse.Namespace, *, tui: bool = False) -> TraceFilter:
    """The ``TraceFilter`` of ``pf traces``' flags (``tui``: for the terminal UI)."""
    if ns.since is not None and ns.until is not None and ns.since >= ns.until:
        raise CommandError("--since must be before --until", EXIT_USAGE)
    return TraceFilter(status=STATUSES[ns.status] if ns.status else None, node=ns.node,
                       has_errors=True if ns.errors else None, since=ns.since,
                       until=ns.until, order="slowest" if ns.slowest else "newest",
                       limit=ns.limit if ns.limit is not None
                       else TUI_LIST_LIMIT if tui else LIST_LIMIT)


async def _list(url: str, wanted: TraceFilter) -> list[Any]:
    async with reading(url) as store:
        found = await store.list_traces(wanted)
        if not found:
            await ensure_not_empty(store, url)
        return found


def _traces(ns: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    url = store_url(ns.store)
    wanted = trace_filter(ns)
    fmt = _fmt(ns, out)
    if fmt == "tui":
        asyncio.run(_list(url, TraceFilter(limit=1)))  # store errors before the UI
        code = _run_tui(err, store_url=url, mode="traces",
                        trace_filter=trace_filter(ns, tui=True))
        if code is not None:
            return code
    found = asyncio.run(_list(url, wanted))
    if fmt == "json":
        _dump([render.summary_json(s) for s in found], out)
    elif found:
        out.write(render.summary_table(found))
    else:
        print("no traces match these filters", file=err)
    return EXIT_OK


# -- tail -------------------------------------------------------------------------------------


_strict = json.JSONEncoder(allow_nan=False).encode


def strict_json(value: Any) -> str:
    """``value`` as JSON every parser reads: a stored NaN or infinity (nothing checks
    payload numbers on the way in) is written ``null``, never ``NaN``/``Infinity``."""
    try:
        return _strict(value)
    except ValueError:
        return _strict(_finite_tree(value))


def _finite_tree(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_tree(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_tree(v) for v in value]
    return value


def _tail(ns: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    url = store_url(ns.store)
    fmt = "json" if ns.json else "plain"

    def show(event: StoredEvent) -> None:
        line = (strict_json(render.event_json(event)) if fmt == "json"
                else render.event_line(event))
        out.write(line + "\n")
        out.flush()

    asyncio.run(tail(url, ns.trace_id, show, err))
    return EXIT_OK


async def tail(url: str, reference: str | None, show: Any, err: TextIO,
               interval_s: float = POLL_INTERVAL_S) -> None:
    """Print a trace's history (with ``reference``), then every event stored from now on.

    Works across processes for every durable store: it reads the traces'
    summaries, and the new events of those whose event count grew, every
    ``interval_s`` -- and, on Postgres, as soon as ``store.follow`` (LISTEN/
    NOTIFY) says something was committed. ``follow`` alone is not enough: it
    starts when first iterated (Postgres listens from then; a read-only SQLite
    store polls its file every 0.2 s from then), so events committed before
    would be missed; the summaries' counts leave no gap. New events are read with
    ``load_history_page`` from the count already shown, so a poll costs what is
    new, not the trace's whole history. Runs until cancelled (Ctrl-C).
    """
    # Invocations of the followed trace started and not yet ended, from the events
    # shown: a trace whose store lost events reads "incomplete", whether it still
    # runs or not, so that word alone cannot end the tail.
    open_invocations: set[str] = set()
    show_event = show

    def tracked(event: StoredEvent) -> None:
        if event.invocation_id is not None:
            if event.kind == "node_start":
                open_invocations.add(event.invocation_id)
            elif event.kind in TERMINAL_KINDS:
                open_invocations.discard(event.invocation_id)
        show_event(event)

    show = tracked

    async with reading(url) as store:
        trace_id = None if reference is None else await _resolve_checked(store, reference, url)
        if trace_id is not None:
            counts = {trace_id: await _show_from(store, trace_id, 0, show)}
        else:  # only what is stored from now on
            counts = {s.trace_id: s.event_count
                      for s in await store.list_traces(TraceFilter(limit=TAIL_TRACES))}
        what = f"trace {printable(trace_id)}" if trace_id else "every trace"
        print(f"pf tail: following {what} in {redact(url)} (Ctrl-C to stop)", file=err,
              flush=True)
        wake = asyncio.Event()
        pushed = (asyncio.create_task(_wake_on_commit(store, trace_id, wake))
                  if url.startswith(("postgresql:", "postgres:")) else None)
        try:
            ended = await _poll(store, trace_id, counts, show, interval_s, wake, err,
                                open_invocations, getattr(store, "generation", None))
            if ended is not None:
                print(f"pf tail: trace {printable(ended.trace_id)} ended: "
                      f"{printable(status_word(ended.status))} after "
                      f"{format_duration(ended.duration_ms)}, "
                      f"{ended.event_count} events", file=err, flush=True)
        finally:
            if pushed is not None:
                pushed.cancel()
                with contextlib.suppress(asyncio.CancelledError, StateStoreError):
                    await pushed


async def _wake_on_commit(store: TraceStore, trace_id: str | None,
                          wake: asyncio.Event) -> None:
    """Set ``wake`` whenever ``store.follow`` yields (Postgres: any process committed)."""
    # The stores' follow() is an async generator: close it to release its connection.
    stream = cast("AsyncGenerator[StoredEvent, None]", store.follow(trace_id))
    async with contextlib.aclosing(stream):
        async for _ in stream:
            wake.set()


async def _show_from(store: TraceStore, trace_id: str, offset: int, show: Any) -> int:
    """Show the events of ``trace_id`` after the first ``offset``, a page at a time;
    returns the count shown so far (``offset`` plus the events read)."""
    while True:
        page = await store.load_history_page(trace_id, offset=offset, limit=TAIL_PAGE)
        for event in page:
            show(event)
        offset += len(page)
        if len(page) < TAIL_PAGE:  # a short page is the last (TraceStore's contract)
            return offset


async def _poll(store: TraceStore, trace_id: str | None, counts: dict[str, int], show: Any,
                interval_s: float, wake: asyncio.Event, err: TextIO,
                open_invocations: set[str] | None = None,
                generation: int | None = None) -> TraceSummary | None:
    """Show new events until cancelled, or, following one trace, until it has ended:
    returns its summary once its status has left ``running`` and stayed so, with no
    new event, for one more poll (a chain's next node may start a moment after the
    previous one's end is stored, when no invocation is open).

    A store unavailable for a moment (its file rotated or replaced, so missing or
    empty a while, a database restarting) is polled again, for up to
    :data:`TAIL_GRACE_S`; longer, its error ends the command. A file found replaced
    by another (the store's ``generation`` changed) is read from its start: the
    counts shown so far were the old file's."""
    ended_seen: int | None = None  # the event count when the trace was first seen ended
    away_since: float | None = None
    # The event count when the followed trace was first seen incomplete, wholly
    # shown, with invocations open; -1 once that has been said.
    stuck_seen: int | None = None
    while True:
        try:
            followed: TraceSummary | None = None
            if trace_id is not None:
                followed = summary = await store.get_trace(trace_id)
                changed = [summary] if summary is not None else []
                generation = _read_anew(store, generation, counts, open_invocations)
                if summary is not None and summary.status != "running" and not (
                        summary.status == "incomplete" and open_invocations):
                    if ended_seen == summary.event_count == counts.get(trace_id):
                        return summary
                    ended_seen = summary.event_count
                else:
                    ended_seen = None
            else:
                changed = await store.list_traces(TraceFilter(limit=TAIL_TRACES))
                generation = _read_anew(store, generation, counts, open_invocations)
            for summary in sorted(changed, key=lambda s: s.started_ts):
                before = counts.get(summary.trace_id, 0)
                if summary.event_count > before:
                    try:
                        counts[summary.trace_id] = await _show_from(
                            store, summary.trace_id, before, show)
                    except StoreUnavailable:
                        raise
                    except StateStoreError as exc:
                        if trace_id is not None:  # the trace asked for: its error ends it
                            raise
                        # Following every trace, one that cannot be read (a corrupt
                        # block) is said once and passed over, not the end of the tail.
                        print(f"pf tail: trace {printable(summary.trace_id)} skipped: "
                              f"{one_line(exc)}", file=err, flush=True)
                        counts[summary.trace_id] = summary.event_count
            if followed is not None and stuck_seen != -1:
                stuck_seen = _say_if_stuck(followed, counts, open_invocations, stuck_seen, err)
            if away_since is not None:
                print("pf tail: the trace store is back", file=err, flush=True)
                away_since = None
        except StoreUnavailable as exc:  # missing, or empty while made anew
            now = time.monotonic()
            if away_since is None:
                away_since = now
                print(f"pf tail: {one_line(exc)}; trying again for up to {TAIL_GRACE_S:.0f} s",
                      file=err, flush=True)
            elif now - away_since > TAIL_GRACE_S:
                raise
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), interval_s)
        wake.clear()


def _read_anew(store: TraceStore, generation: int | None, counts: dict[str, int],
               open_invocations: set[str] | None) -> int | None:
    """The store's file generation now; when it changed (the file was replaced by
    another), forget what was shown of the old one, so the new one is read from its
    start (its traces and positions say nothing of the old file's)."""
    now = getattr(store, "generation", None)
    if now != generation:
        counts.clear()
        if open_invocations is not None:
            open_invocations.clear()
    return now


def _say_if_stuck(summary: TraceSummary, counts: dict[str, int],
                  open_invocations: set[str] | None, seen: int | None,
                  err: TextIO) -> int | None:
    """Say, once, that a followed trace may never be seen to end: it lost events,
    everything stored is shown, invocations are still open, and nothing came for
    one more poll (the ends of those may be among the lost events: the tail ends
    only when every invocation shown has ended). Returns the new ``seen`` mark:
    the event count first seen so, None, or -1 once said."""
    if not (summary.status == "incomplete" and open_invocations
            and counts.get(summary.trace_id) == summary.event_count):
        return None
    if seen != summary.event_count:
        return summary.event_count
    print(f"pf tail: trace {printable(summary.trace_id)} lost {summary.events_lost} events; "
          f"{len(open_invocations)} invocation(s) shown have no end yet, and if their ends "
          "were lost the tail will not end by itself (Ctrl-C to stop)", file=err, flush=True)
    return -1


# -- demo -------------------------------------------------------------------------------------


async def _record(url: str) -> str:
    try:
        store = open_store(url)
    except ValueError as exc:
        raise CommandError(str(exc).replace(url, redact(url)), EXIT_USAGE) from None
    if url.startswith("memory:"):
        raise CommandError("memory:// would forget the demo trace when pf exits; pass "
                           "--store sqlite:///... or postgresql://...", EXIT_USAGE)
    try:
        try:
            opener = getattr(store, "open", None)
            if opener is not None:  # fail here, not as warnings from the flow's writer
                await opener()
            trace_id = (await record_demo(store)).trace_id
            if await store.get_trace(trace_id) is None:
                raise CommandError(f"the demo ran but its trace was not stored in "
                                   f"{redact(url)}; is the store writable?")
            return trace_id
        finally:
            await store.close()
    except StateStoreError as exc:
        raise CommandError(f"trace store: {one_line(exc)}") from None
    except OSError as exc:
        raise CommandError(
            f"cannot reach the trace store {redact(url)}: {one_line(exc)}") from None


def _demo(ns: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    url = store_url(ns.store)
    trace_id = asyncio.run(_record(url))
    fmt = _fmt(ns, out)
    if fmt == "json":
        _dump({"trace_id": trace_id, "store": redact(url)}, out)
        return EXIT_OK
    if fmt == "tui" and not ns.no_open:
        code = _run_tui(err, store_url=url, trace_id=trace_id, mode="trace")
        if code is not None:
            return code
        out.write(render.trace_text(asyncio.run(load_view(url, trace_id))))
        return EXIT_OK
    out.write(printable(trace_id) + "\n")
    store_flag = "" if ns.store is None else f" --store {redact(url)}"
    print(f"pf demo: recorded a trace with a fan-out and join, a retry, a timeout, two "
          f"streaming remote agents and a cancel to {redact(url)}; see it with: "
          f"pf inspect {trace_id[:8]}{store_flag}", file=err)
    return EXIT_OK


#: ``pf <command>``'s function: ``(namespace, out, err) -> exit code``.
_COMMANDS: Final[dict[str, Callable[[argparse.Namespace, TextIO, TextIO], int]]] = {
    "inspect": _inspect, "traces": _traces, "tail": _tail, "demo": _demo,
    "migrate": migrate.run, "worker": lambda ns, _out, _err: _worker(ns.rest)}


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
