"""The ``penguiflow-admin`` CLI: print or replay a trace's persisted events.

The CLI reaches a store through the same seam the runtime uses: ``--state-store``
names a zero-argument factory (``"package.module:callable"``) returning an object
with the three :class:`~penguiflow.state.StateStore` methods. Only
``load_history`` is called.

Usage::

    penguiflow-admin history <trace_id> --state-store myapp.stores:make_store [--tail N]
    penguiflow-admin replay <trace_id> --state-store myapp.stores:make_store \\
        [--tail N] [--delay SECONDS]

``<trace_id>`` may be a prefix of the id, as with ``pf inspect``, when the store
can resolve one (``resolve_trace_id``: PenguiFlow's in-memory, SQLite and
Postgres stores): a prefix of exactly one trace is that trace; of several, an
error listing them; ``history`` of an id no trace starts with is an error too.
An id with stored events is used as given, and its output is unchanged.

Exit status: 0 on success, 1 when the command fails (the message is printed to
stderr as ``error: <exc>``), 2 on a usage error (argparse).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import json
import math
import os
import sys
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

from penguiflow.state import StateStore, StoredEvent

__all__ = ["load_state_store", "render_events", "main"]

_SPEC_FORM = "'package.module:callable'"
_REQUIRED_METHODS = ("save_event", "load_history", "save_remote_binding")
_SHOWN_CANDIDATES = 10
_Handler = Callable[[argparse.Namespace], Coroutine[Any, Any, None]]


async def load_state_store(spec: str) -> StateStore:
    """Build a state store from a ``"package.module:callable"`` factory spec.

    The module is imported, the callable (a dotted attribute path is allowed, e.g.
    ``"app.stores:Stores.make"``) is called with no arguments and its result is
    awaited when awaitable, so both sync and async factories work.

    Args:
        spec: ``"package.module:callable"``.

    Returns:
        The store the factory produced.

    Raises:
        ValueError: ``spec`` has no ``:`` or an empty module or callable part.
        ModuleNotFoundError: the module cannot be imported.
        AttributeError: the module has no such attribute.
        TypeError: the attribute is not callable, or the object it returned lacks
            one of ``save_event``, ``load_history``, ``save_remote_binding``.
        Exception: whatever the module import or the factory raises.
    """
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path:
        raise ValueError(
            f"invalid state store spec {spec!r}: expected the form {_SPEC_FORM}, "
            "e.g. 'myapp.stores:make_store'"
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            f"cannot import {module_name!r} from state store spec {spec!r}: {exc}; "
            "install the package or add its directory to PYTHONPATH",
            name=exc.name,
        ) from exc

    factory: Any = module
    for part in attr_path.split("."):
        try:
            factory = getattr(factory, part)
        except AttributeError as exc:
            raise AttributeError(
                f"{module_name!r} has no attribute {attr_path!r} (state store spec {spec!r}); "
                f"name a callable defined in {module_name!r}"
            ) from exc
    if not callable(factory):
        raise TypeError(
            f"{spec!r} names an object of type {type(factory).__name__}, which is not "
            "callable; the part after ':' must be a factory that takes no arguments "
            "and returns the store"
        )

    store: Any = factory()
    if inspect.isawaitable(store):
        store = await store
    missing = [name for name in _REQUIRED_METHODS if not callable(getattr(store, name, None))]
    if missing:
        raise TypeError(
            f"{spec!r} returned an object of type {type(store).__name__} "
            f"lacking {', '.join(missing)}; "
            "a state store must define async save_event(event), load_history(trace_id) "
            "and save_remote_binding(binding) (subclass penguiflow.state.StateStore)"
        )
    return cast(StateStore, store)


def render_events(events: Iterable[StoredEvent], *, tail: int | None = None) -> list[str]:
    """Render stored events as JSON lines, one per event, in the given order.

    Each line is the JSON (keys sorted, non-serialisable values rendered with
    ``str``) of a copy of ``event.payload`` in which ``event`` (from ``kind``),
    ``trace_id``, ``node_name``, ``node_id`` and ``ts`` are added only where the
    payload lacks the key: existing payload keys win, even when ``None``.

    Args:
        events: the events to render; ``payload`` must have string keys.
        tail: keep only the last ``tail`` events; ``None`` keeps all and
            ``tail <= 0`` keeps none.

    Returns:
        One JSON string per kept event, without trailing newlines.
    """
    selected = list(events)
    if tail is not None:
        selected = selected[-tail:] if tail > 0 else []
    lines: list[str] = []
    for event in selected:
        record = dict(event.payload)
        record.setdefault("event", event.kind)
        record.setdefault("trace_id", event.trace_id)
        record.setdefault("node_name", event.node_name)
        record.setdefault("node_id", event.node_id)
        record.setdefault("ts", event.ts)
        lines.append(json.dumps(record, sort_keys=True, default=str))
    return lines


async def _load_history(spec: str, reference: str, *, unknown_is_error: bool,
                        ) -> tuple[str, Sequence[StoredEvent]]:
    store = await load_state_store(spec)
    try:
        history = await store.load_history(reference)
        if history:
            return reference, history  # an exact id: exactly as in 2.1
        trace_id = await _resolve(store, reference, unknown_is_error=unknown_is_error)
        if trace_id == reference:
            return reference, history
        return trace_id, await store.load_history(trace_id)
    finally:
        # Stores that hold connections or threads (PenguiFlow's SQLite/Postgres
        # stores) are closed here; a plain 2.1 store needs no close().
        close = getattr(store, "close", None)
        if close is not None and inspect.iscoroutinefunction(close):
            await close()


async def _resolve(store: Any, reference: str, *, unknown_is_error: bool) -> str:
    """The one trace id ``reference`` is a prefix of, for a store that can tell
    (``resolve_trace_id``, as PenguiFlow's stores and ``pf inspect`` have); else
    ``reference`` itself (a 2.1 store: no events is simply no output).

    Raises:
        LookupError: several traces match (they are listed), or, with
            ``unknown_is_error``, none does.
    """
    resolve = getattr(store, "resolve_trace_id", None)
    if not callable(resolve):
        return reference
    candidates = sorted(await resolve(reference))
    if reference in candidates:
        return reference
    if len(candidates) == 1:
        return str(candidates[0])
    if not candidates:
        if unknown_is_error:
            raise LookupError(f"no trace id starts with {reference!r} in this store; check "
                              "the id, or point --state-store at where the trace was recorded")
        return reference
    shown = ", ".join(candidates[:_SHOWN_CANDIDATES])
    more = ", ..." if len(candidates) > _SHOWN_CANDIDATES else ""
    # resolve_trace_id returns at most 10: 10 may mean more.
    count = f"{len(candidates)}{'+' if len(candidates) >= 10 else ''}"
    raise LookupError(f"trace id prefix {reference!r} is ambiguous ({count} traces match: "
                      f"{shown}{more}); give more characters")


async def _history(args: argparse.Namespace) -> None:
    _, history = await _load_history(args.state_store, args.trace_id, unknown_is_error=True)
    for line in render_events(history, tail=args.tail):
        print(line)


async def _replay(args: argparse.Namespace) -> None:
    # Spec §19: a trace with no events is a comment line, not an error.
    trace_id, history = await _load_history(args.state_store, args.trace_id,
                                            unknown_is_error=False)
    if not history:
        print(f"# trace {trace_id} has no stored events")
        return
    lines = render_events(history, tail=args.tail)
    print(f"# replay trace={trace_id} events={len(lines)}", flush=True)
    for index, line in enumerate(lines):
        if index and args.delay:
            await asyncio.sleep(args.delay)
        # Flushed so a pipe reader sees each event when it is replayed.
        print(line, flush=True)


def _delay(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="penguiflow-admin",
        description="Inspect the events a PenguiFlow StateStore persisted for a trace.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str, handler: _Handler) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("trace_id", help="the trace whose events to load (or a prefix of "
                         "its id, with a store that resolves prefixes)")
        sub.add_argument(
            "--state-store",
            required=True,
            metavar="SPEC",
            help="factory returning the store, as 'package.module:callable' (may be async)",
        )
        sub.add_argument(
            "--tail", type=int, default=None, metavar="N", help="only the last N events"
        )
        sub.set_defaults(handler=handler)
        return sub

    add("history", "Print one JSON line per stored event.", _history)
    replay = add("replay", "Print a header, then the events, pausing between them.", _replay)
    replay.add_argument(
        "--delay",
        type=_delay,
        default=0.0,
        metavar="SECONDS",
        help="pause between events (default: 0)",
    )
    return parser


@contextmanager
def _cwd_importable() -> Iterator[None]:
    # A console script's sys.path holds the script's directory, not the working
    # directory (unlike `python -m`), so `--state-store myapp.stores:make` would not
    # find ./myapp. Appended, not prepended, so nothing installed is shadowed.
    cwd = os.getcwd()
    if cwd in sys.path or "" in sys.path:
        yield
        return
    sys.path.append(cwd)
    try:
        yield
    finally:
        if cwd in sys.path:
            sys.path.remove(cwd)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``penguiflow-admin``; the console-script entry point.

    The command runs under :func:`asyncio.run`, so call ``main`` where no event
    loop is running (from async code, use ``await asyncio.to_thread(main, argv)``).
    The working directory is importable while the command runs, so specs naming
    local modules work from a console script too.

    Args:
        argv: the arguments without the program name; ``None`` reads ``sys.argv[1:]``.

    Returns:
        0 on success; 1 when the command failed, after printing ``error: <exc>``
        to stderr (also when called inside a running event loop).

    Raises:
        SystemExit: with status 2 on a usage error, 0 for ``--help``.
    """
    args = _build_parser().parse_args(argv)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        print(
            "error: penguiflow.admin.main() cannot run inside a running event loop; "
            "call it from a worker thread, e.g. await asyncio.to_thread(main, argv)",
            file=sys.stderr,
        )
        return 1
    handler: _Handler = args.handler
    try:
        with _cwd_importable():
            asyncio.run(handler(args))
    except Exception as exc:
        print(f"error: {str(exc) or type(exc).__name__}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
