"""Writer processes: a store's batches written by a child Python process, over a pipe.

Why. Python runs Python on one core at a time per process (the GIL). A store
writing on a thread of the flow's process takes its CPU (folding, encoding,
binding rows: ~2-4 us per event) from the flow, and every time the driver gives
the GIL up for I/O it must win it back from the busy event loop, waiting out the
switch interval (5 ms). A child process does that work on another core; the
flow's process only encodes each batch (already needed) and writes it to a pipe.

The child runs ``python -m <module>`` (a module whose main() calls
:func:`~penguiflow_exporters._serve.serve` with its handler); such modules import
nothing from penguiflow, nor asyncio for SQLite's, so a child starts in well
under 0.1 s instead of the ~0.8 s the core takes to import. Its stderr is the
parent's. The frame protocol is described in _serve.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]
import pickle
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from ._blocks import plain, safe_row
from ._packs import Pack, PackedBatch
from ._records import WriteReply, plain_rows, rows_of
from ._serve import HEADER as _HEADER
from ._serve import Handler, describe, read_frame, serve, write_frame
from .writer import WriteResult

__all__ = ["AsyncWriterProcess", "Handler", "ProcessWriter", "WriterError", "describe",
           "as_sent", "dumps_batch", "dumps_rows", "pack_rows", "read_frame", "serve",
           "write_frame"]


class WriterError(Exception):
    """The writer process reported a failure (``types``: the exception's class names,
    most derived first; ``code``: its SQLite error code, if any), or is gone
    (``gone`` True)."""

    def __init__(self, message: str, code: int | None = None, *, gone: bool = False,
                 types: Sequence[str] = (), starting: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.gone = gone
        self.types = tuple(types)
        #: It happened while starting a writer (spawning it, or its init), not
        #: while it wrote a batch: no writer process can be had, as things stand.
        self.starting = starting


#: Starts in a row that fail, after a writer was ready, before the store gives up on
#: writer processes (see AsyncWriterProcess._running).
_STARTS_BEFORE_GIVING_UP = 3

# Reaping tasks of killed writers (a reference, so they are not collected mid-way).
_REAPING: set[asyncio.Task[None]] = set()


class AsyncWriterProcess:
    """The parent's end, on the event loop: one writer process, started on first use.

    The pipe is the loop's (asyncio subprocess streams), not a thread's: a thread
    handing batches over had to win the GIL back from the busy loop at every
    step, and the loop re-takes the GIL at each turn without letting a waiting
    thread ask for it, so encoding the next batch and writing the previous one
    took turns instead of overlapping (measured). Requests are serialised (one
    frame in flight). A writer that dies is reported once (:class:`WriterError`
    with ``gone``) and started anew by the next request.
    """

    def __init__(self, module: str, init: Mapping[str, Any]) -> None:
        #: The module the child runs (``python -m module``); its main() calls serve().
        self.module = module
        self._init = dict(init)
        self._proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()
        #: Processes started so far (1 unless one died).
        self.started = 0
        #: Processes that got ready (took their options) so far.
        self.ready = 0
        self._failed_starts = 0  # in a row, since the last that got ready

    @property
    def pid(self) -> int | None:
        """The running writer's process id, if one is running."""
        proc = self._proc
        return None if proc is None or proc.returncode is not None else proc.pid

    async def start(self) -> None:
        """Start the writer now, if none is running (requests start one anyway).

        Raises:
            WriterError: it could not be started, or refused its options.
        """
        async with self._lock:
            await self._running()

    async def _running(self) -> asyncio.subprocess.Process:
        proc = self._proc
        if proc is not None and proc.returncode is None:
            return proc
        if proc is not None:
            await self._reap(proc)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", self.module, stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, env=_child_env())
        except OSError as exc:
            self._failed_starts += 1
            raise WriterError(f"cannot start the writer process ({exc})", gone=True,
                              starting=self._cannot_start()) from exc
        self._proc = proc
        self.started += 1
        _widen(proc)
        try:
            await self._exchange(proc, b"I", pickle.dumps(self._init))
        except WriterError as exc:
            if not exc.gone:  # it refused its options: a writer that can't write
                await self._reap(proc)
                exc.starting = True
            else:
                # It died before it was ready. One such death after a writer was ready
                # is a death like any other (the OOM killer twice in a row); only a
                # writer that never got ready, or that cannot start again (its
                # environment changed under a long-lived service), means none can be
                # had here: the store then writes without one.
                self._failed_starts += 1
                exc.starting = self._cannot_start()
            raise
        self.ready += 1
        self._failed_starts = 0
        return proc

    def _cannot_start(self) -> bool:
        return not self.ready or self._failed_starts >= _STARTS_BEFORE_GIVING_UP

    async def request(self, op: bytes, payload: bytes) -> Any:
        """Send one frame and return the reply's result.

        Raises:
            WriterError: the writer failed (the transaction was rolled back), or
                could not be started, or died.
        """
        async with self._lock:
            return await self._exchange(await self._running(), op, payload)

    async def _exchange(self, proc: asyncio.subprocess.Process, op: bytes,
                        payload: bytes) -> Any:
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(_HEADER.pack(op, len(payload)))
            proc.stdin.write(payload)
            await proc.stdin.drain()
            kind, size = _HEADER.unpack(await proc.stdout.readexactly(_HEADER.size))
            reply = await proc.stdout.readexactly(size)
        except (OSError, EOFError, asyncio.IncompleteReadError) as exc:
            await self._reap(proc)
            raise WriterError(f"the writer process exited (code {proc.returncode})",
                              gone=True) from exc
        except asyncio.CancelledError:
            # Mid-frame: its reply would answer the next request. That writer is done.
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            raise
        if kind == b"E":
            error = pickle.loads(reply)
            raise WriterError(error["message"], error["code"], types=error["types"])
        return pickle.loads(reply)

    async def _reap(self, proc: asyncio.subprocess.Process) -> None:
        # ``_proc`` is cleared once it is reaped, not before: a close cancelled while
        # waiting leaves it for kill_soon() to find.
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 5.0)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        if self._proc is proc:
            self._proc = None

    def kill_soon(self) -> None:
        """Kill the writer now and reap it in the background (for a cancelled close)."""
        proc = self._proc
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        task = asyncio.get_running_loop().create_task(self._reap(proc))
        _REAPING.add(task)
        task.add_done_callback(_REAPING.discard)

    async def kill(self) -> None:
        """Kill the writer now (it hangs) and reap it; the next request starts a new one."""
        proc = self._proc
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await self._reap(proc)

    async def close(self) -> None:
        """Ask the writer to quit and wait for it (killed after 5 s); idempotent."""
        async with self._lock:
            proc = self._proc
            if proc is None:
                return
            if proc.returncode is None:
                with contextlib.suppress(WriterError):
                    await self._exchange(proc, b"Q", b"")
            await self._reap(proc)


# Bytes the pipe to a writer holds (Linux: F_SETPIPE_SZ; 1 MiB is the default
# /proc/sys/fs/pipe-max-size). With the default 64 KiB, a batch (~1-2 MB) went into
# the pipe 64 KiB per turn of the loop, which the next batch's encoding holds for a
# few ms at a time: sending took as long as encoding (measured).
_PIPE_BYTES = 1 << 20


def _widen(proc: asyncio.subprocess.Process) -> None:
    """Enlarge the pipe to ``proc``'s stdin where the platform allows (best effort)."""
    setpipe = getattr(fcntl, "F_SETPIPE_SZ", None) if fcntl is not None else None
    transport = getattr(proc.stdin, "transport", None)
    pipe = transport.get_extra_info("pipe") if transport is not None else None
    if setpipe is None or pipe is None:
        return
    with contextlib.suppress(OSError):  # above the system's limit, or not a pipe
        fcntl.fcntl(pipe.fileno(), setpipe, _PIPE_BYTES)


# The directory holding this package, put on the child's path whatever put it on ours.
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_ROOT, env.get("PYTHONPATH")]))
    return env



# -- the EventWriter over a writer process ---------------------------------------------------

class _RowPickler(pickle.Pickler):
    """Pickles plain tuples of plain data (the child imports no penguiflow).

    The C pickler calls reducer_override only for objects not of an exact built-in
    type, so rows of plain values cost nothing here; anything odd (a read-only
    mapping, an enum, a user object in ``extra``) becomes its plain equivalent or its
    text, as the JSON encoder would write it (``_blocks.plain``).
    """

    def reducer_override(self, obj: Any) -> Any:
        if (isinstance(obj, type) or (callable(obj) and type(obj).__name__ in (
                "builtin_function_or_method", "function"))) \
                and getattr(obj, "__module__", None) == "builtins":
            # The constructors the reductions below name (str, dict, tuple, ...).
            # Any other class or function (a user's, in an event's extra) goes as
            # its text: pickled by reference, it would make the child import the
            # user's module (or fail, and lose the event).
            return NotImplemented
        if isinstance(obj, tuple):  # a named tuple (a Row, an EventRecord)
            return (tuple, (tuple(obj),))
        value = plain(obj)
        return (type(value), (value,))


_PLAIN = {tuple}
_RUNTIME_LEN = 23  # an EventRecord's values

# Rows pickled between two yields to the event loop (a few ms of work).
_SLICE = 2000


def dumps_rows(items: Sequence[Any]) -> bytes:
    """``items`` (EventRecords, StoredEvents, Rows) as one pickle of plain tuples (a
    slice of the child's ``W`` payload; ``_records.loads_rows`` reads them back).

    An EventRecord goes as its 23 values (the child adds the payload column), a
    StoredEvent as a whole row: plain tuples, so the pickler's per-object hook runs
    only for odd values (~0.5 us per event, against ~1.4 through Row objects).
    """
    buffer = io.BytesIO()
    # The runtime's batches are plain tuples already (its values path): pickled as
    # they are, without a pass that copies the list (~0.1 us an event, measured).
    rows = items if type(items) is list and set(map(type, items)) == _PLAIN \
        else plain_rows(items)
    try:
        _RowPickler(buffer, 5).dump(rows)
    except (pickle.PicklingError, TypeError, ValueError, RecursionError, AttributeError):
        buffer = io.BytesIO()
        _RowPickler(buffer, 5).dump([tuple(safe_row(row)) for row in rows_of(items)])
    return buffer.getvalue()


def pack_rows(items: list[Any]) -> Pack | None:
    """``items`` (the runtime's plain tuples) as a :class:`~._packs.Pack`: one slice of
    a ``W`` payload; None when one is not a plain tuple or the fast pickling fails
    (they are then left as they are, and ``dumps_rows`` handles them in the batch).
    """
    if set(map(type, items)) != _PLAIN:
        return None
    buffer = io.BytesIO()
    try:
        _RowPickler(buffer, 5).dump(items)
    except (pickle.PicklingError, TypeError, ValueError, RecursionError, AttributeError):
        return None
    return Pack(buffer.getvalue(), len(items))


def as_sent(values: tuple[Any, ...]) -> tuple[Any, ...]:
    """A runtime event's values as a writer process is sent them: the odd values of
    its extra (a read-only mapping, an enum, a user object) made plain, as pickling
    them for the writer does, so a follower gets the same event packed or not.
    Values without an extra are returned as they are."""
    if len(values) != _RUNTIME_LEN or values[-1] is None:
        return values
    buffer = io.BytesIO()
    try:
        _RowPickler(buffer, 5).dump(tuple(values))
    except (pickle.PicklingError, TypeError, ValueError, RecursionError, AttributeError):
        return values
    return pickle.loads(buffer.getvalue())  # type: ignore[no-any-return]


async def dumps_batch(items: Sequence[Any]) -> bytes:
    """A batch as the child's ``W`` payload: pickles of ``_SLICE`` rows back to back,
    the event loop served between two (a 50k-event batch held it ~0.4 s in one go).
    A :class:`~._packs.PackedBatch`'s packs go as they are, its other items as slices."""
    if type(items) is PackedBatch:
        return await _dumps_packed(items)
    if len(items) <= _SLICE:
        return dumps_rows(items)
    parts: list[bytes] = []
    for start in range(0, len(items), _SLICE):
        if start:
            await asyncio.sleep(0)
        parts.append(dumps_rows(items[start:start + _SLICE]))
    return b"".join(parts)


async def _dumps_packed(batch: PackedBatch) -> bytes:
    parts: list[bytes] = []
    loose: list[Any] = []
    for entry in [*batch.entries, *batch.tail]:
        if type(entry) is Pack:
            if loose:
                parts.append(await dumps_batch(loose))
                loose = []
            parts.append(entry.data)
        else:
            loose.append(entry)
    if loose:
        parts.append(await dumps_batch(loose))
    return b"".join(parts)


class ProcessWriter:
    """An :class:`~penguiflow_exporters.writer.EventWriter` run by a child process.

    ``module`` is run as ``python -m module``; its ``main()`` serves a handler whose
    ``init(options)`` opens the backend's writer and whose ``write(payload)`` stores
    ``_records.loads_rows`` of the payload and returns a :class:`~._records.WriteReply`.
    ``translate`` turns a :class:`WriterError` into the store's error: a
    ``StoreUnavailable`` (retried) or another ``StateStoreError`` (the batch is split).
    """

    def __init__(self, module: str, options: Mapping[str, Any], *,
                 translate: Any) -> None:
        self.process = AsyncWriterProcess(module, options)
        self._translate = translate

    async def start(self) -> None:
        """Start the child now (the first write would anyway)."""
        try:
            await self.process.start()
        except WriterError as exc:
            raise self._translate(exc) from exc

    async def write(self, items: Sequence[Any]) -> WriteResult:
        return await self.write_prepared(items, await dumps_batch(items))

    def pack(self, items: list[Any]) -> Pack | None:
        """``items`` pickled now, to be sent with a later batch (see ``_packs``)."""
        return pack_rows(items)

    async def prepare(self, items: Sequence[Any]) -> bytes:
        """``items`` as the child's payload: the processor prepares the next batch
        while the child writes the previous one (see ``writer.py``)."""
        return await dumps_batch(items)

    async def write_prepared(self, items: Sequence[Any], prepared: bytes) -> WriteResult:
        """:meth:`write` of ``items``, which :meth:`prepare` made ``prepared``."""
        try:
            reply: WriteReply = await self.process.request(b"W", prepared)
        except WriterError as exc:
            raise self._translate(exc) from exc
        skipped, rejected, notices = reply
        return WriteResult(skipped, rejected, notices)

    async def close(self) -> None:
        """Ask the child to quit; kill it when it does not within 2 s (a hung database)."""
        try:
            await asyncio.wait_for(self.process.close(), 2.0)
        except TimeoutError:
            await self.process.kill()
        except asyncio.CancelledError:  # the caller's own deadline: do not leave it running
            self.process.kill_soon()
            raise
