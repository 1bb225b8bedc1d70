"""Opening a trace store for a ``pf`` command, and the errors every command reports alike.

Every failure a user can cause or fix (an unknown or ambiguous trace id, a store
URL that is not supported, a SQLite file that does not exist or is not a trace
store, a store that cannot be reached) is a :class:`CommandError`: one line for
stderr and an exit status. ``pf`` prints it as ``pf <command>: <message>``, never
a traceback.

Readers never write: ``pf inspect``, ``pf traces``, ``pf tail``, ``pf export`` and
the terminal UI open their store with ``open_store(url, readonly=True)``, which
creates nothing and refuses (leaving it byte-for-byte unchanged) a file that is
missing, empty, foreign or of another schema version. Only ``pf demo`` and ``pf
migrate`` open a store for writing.

Store selection, for every command: ``--store URL``, else ``$PENGUIFLOW_STORE``,
else the SQLite default (:func:`penguiflow_exporters.default_store_url`).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit, urlunsplit

from penguiflow.state import StateStoreError, StoreUnavailable, TraceFilter, TraceStore
from penguiflow_exporters import default_store_url, open_store

__all__ = [
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "CommandError",
    "choose",
    "ensure_not_empty",
    "one_line",
    "open_for_reading",
    "open_reader",
    "reading",
    "redact",
    "resolve",
    "store_url",
]

EXIT_OK: Final = 0
#: The store (or a collector, or an output file) failed.
EXIT_FAILURE: Final = 1
#: The command line was wrong: bad flags, an unknown or ambiguous trace id.
EXIT_USAGE: Final = 2
#: Cut short by Ctrl-C (but ``pf tail``, which ends so): 128 + SIGINT, as shells say.
EXIT_INTERRUPTED: Final = 130
#: Candidates an "ambiguous prefix" message names.
_SHOWN_CANDIDATES: Final = 5


class CommandError(Exception):
    """A failure a ``pf`` command reports as one line and an exit status."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def store_url(option: str | None) -> str:
    """``--store`` if given, else ``$PENGUIFLOW_STORE``, else the SQLite default."""
    return option or default_store_url()


def open_for_reading(url: str) -> TraceStore:
    """Build the store ``url`` names, read-only (``readonly=True``), not yet opened.

    Raises:
        CommandError: (exit 2) the scheme is not supported, or is ``memory://``
            (which is empty in a new process), or the SQLite path does not exist or
            is a directory.
    """
    try:
        store = open_store(url, readonly=True)
    except ValueError as exc:
        raise CommandError(str(exc).replace(url, redact(url)), EXIT_USAGE) from None
    if url.startswith("memory:"):
        raise CommandError(
            "memory:// is empty in a new process (an in-memory store lives only as long as "
            "the flow that recorded into it); pass --store sqlite:///... or postgresql://...",
            EXIT_USAGE)
    path = getattr(store, "path", None)
    if isinstance(path, Path) and path.is_dir():
        raise CommandError(
            f"{str(path)!r} is a directory, not a trace store; pass the store's file: "
            "--store sqlite:///path/to/traces.db (or set PENGUIFLOW_STORE to it)", EXIT_USAGE)
    if isinstance(path, Path) and not path.exists():
        # (The read-only store refuses it too; this says what pf users can do.)
        raise CommandError(
            f"no trace store at {str(path)!r}: nothing was recorded there; "
            "pass --store URL or set PENGUIFLOW_STORE to where the flow recorded its trace",
            EXIT_USAGE)
    return store


async def open_reader(url: str) -> TraceStore:
    """Build and open, read-only, the store ``url`` names; the caller closes it.

    Raises:
        CommandError: (exit 2) as :func:`open_for_reading`, or the store refused
            to be read: an empty or foreign file, another schema version (the
            store's one-line message says which and what to do); (exit 1) the
            store cannot be reached or opened (down, locked, no permission).
    """
    store = open_for_reading(url)
    opener = getattr(store, "open", None)
    if opener is None:
        return store
    try:
        await opener()
    except StateStoreError as exc:
        await _close_quietly(store)
        message = one_line(exc).replace(url, redact(url))
        if isinstance(exc, StoreUnavailable):  # down, locked, no permission
            raise CommandError(f"trace store: {message}") from None
        raise CommandError(message, EXIT_USAGE) from None  # refused: not a store it can read
    except OSError as exc:  # a driver error the store did not translate
        await _close_quietly(store)
        raise CommandError(
            f"cannot reach the trace store {redact(url)}: {one_line(exc)}") from None
    return store


async def _close_quietly(store: TraceStore) -> None:
    with contextlib.suppress(StateStoreError, OSError):
        await store.close()


@asynccontextmanager
async def reading(url: str) -> AsyncIterator[TraceStore]:
    """Open the store ``url`` names read-only (:func:`open_reader`) for the block, and
    close it after.

    Store and driver errors raised in the block become :class:`CommandError`
    (exit 1) naming the store; CommandErrors pass through.
    """
    store = await open_reader(url)
    try:
        try:
            yield store
        finally:
            await store.close()
    except StateStoreError as exc:  # its message names the store and the likely fix
        raise CommandError(f"trace store: {one_line(exc)}") from None
    except BrokenPipeError:
        raise  # the output's reader has gone (`pf tail | head`): not the store's failure
    except OSError as exc:  # a driver error the store did not translate
        raise CommandError(
            f"cannot reach the trace store {redact(url)}: {one_line(exc)}") from None


async def resolve(store: TraceStore, reference: str, url: str) -> str:
    """The one trace id ``reference`` (a full id or a unique prefix) names in ``store``.

    Raises:
        CommandError: the store holds no traces at all (exit 1, as every command
            says it), or no trace or several traces match (exit 2).
    """
    candidates = await store.resolve_trace_id(reference)
    if not candidates:
        await ensure_not_empty(store, url)  # "holds no traces" says more than "no such id"
    return choose(reference, candidates, url)


def choose(reference: str, candidates: Sequence[str], url: str) -> str:
    """``reference`` itself if it is a candidate, else the only candidate.

    Raises:
        CommandError: no candidate, or several (exit 2).
    """
    if reference in candidates:
        return reference
    if not candidates:
        raise CommandError(
            f"no trace id starts with {reference!r} in {redact(url)}; check the id, "
            "or pass --store URL (or set PENGUIFLOW_STORE) to where the trace was recorded",
            EXIT_USAGE)
    if len(candidates) == 1:
        return candidates[0]
    shown = ", ".join(sorted(candidates)[:_SHOWN_CANDIDATES])
    more = "" if len(candidates) <= _SHOWN_CANDIDATES else ", ..."
    raise CommandError(
        f"trace id prefix {reference!r} is ambiguous ({len(candidates)}"
        f"{'+' if len(candidates) >= 10 else ''} traces match: {shown}{more}); "
        "give more characters", EXIT_USAGE)


async def ensure_not_empty(store: TraceStore, url: str) -> None:
    """Raise :class:`CommandError` (exit 1) when ``store`` holds no trace at all."""
    if not await store.list_traces(TraceFilter(limit=1)):
        raise CommandError(
            f"the trace store {redact(url)} holds no traces yet; run a flow with "
            "state_store= (or `pf demo`) to record one, or pass --store URL "
            "(or set PENGUIFLOW_STORE) to where your traces are")


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


def one_line(exc: BaseException) -> str:
    """``exc``'s message on one line (its class name when it has none)."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
