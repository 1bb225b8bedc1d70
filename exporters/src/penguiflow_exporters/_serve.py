"""The child's end of a writer pipe (see _writer_proc.py): frames, and the serve loop.

Protocol: frames of one op byte, an 8-byte big-endian length, and a payload.
Parent to child: ``I`` (init, a pickled dict of options), ``W`` (a batch: the
handler's own payload), ``Q`` (quit). Child to parent: ``K`` (the pickled result)
or ``E`` (a pickled :func:`describe` of the exception; the loop goes on).

Standard library only, and not asyncio: the SQLite writer process imports this
and its start is on the first batch's path (importing asyncio was ~40% of the
child's start-up, measured). The parent's end is _writer_proc.AsyncWriterProcess.
"""

from __future__ import annotations

import gc
import pickle
import struct
import sys
from typing import Any, BinaryIO, Protocol

__all__ = ["HEADER", "Handler", "describe", "read_frame", "serve", "write_frame"]

#: A frame's header: the op byte and the payload's length.
HEADER = struct.Struct(">cQ")


def write_frame(out: BinaryIO, op: bytes, payload: bytes) -> None:
    """Write one frame (see the module docstring) and flush it."""
    out.write(HEADER.pack(op, len(payload)))
    out.write(payload)
    out.flush()


def read_frame(inp: BinaryIO) -> tuple[bytes, bytes]:
    """Read one frame; raises EOFError when the other end is gone."""
    header = inp.read(HEADER.size)
    if len(header) < HEADER.size:
        raise EOFError("the other end of the writer pipe closed")
    op, size = HEADER.unpack(header)
    payload = inp.read(size)
    if len(payload) < size:
        raise EOFError("the other end of the writer pipe closed mid-frame")
    return op, payload


class Handler(Protocol):
    """What a writer process serves: ``init`` once, then ``write`` per batch."""

    def init(self, options: dict[str, Any]) -> None: ...

    def write(self, payload: bytes) -> Any: ...


def serve(handler: Handler, inp: BinaryIO | None = None, out: BinaryIO | None = None) -> None:
    """Serve ``handler`` on the pipe (default: stdin/stdout) until ``Q`` or EOF.

    A handler's exception is reported (``E``) and the loop goes on: the parent
    decides what a failed batch means.
    """
    if inp is None or out is None:
        inp, out = sys.stdin.buffer, sys.stdout.buffer
        sys.stdout = sys.stderr  # a stray print must not corrupt the pipe
    # Its heap is a batch at a time, freed by reference counting: collect rarely.
    gc.set_threshold(100_000, 50, 50)
    ready = False
    while True:
        try:
            op, payload = read_frame(inp)
        except EOFError:
            return  # the store (or its process) is gone
        try:
            if op == b"Q":
                write_frame(out, b"K", pickle.dumps(None))
                return
            if op == b"I":
                handler.init(pickle.loads(payload))
                ready = True
                result: Any = None
            elif op == b"W" and ready:
                result = handler.write(payload)
            else:
                raise ValueError(f"unexpected frame {op!r} (init first)")
        except Exception as exc:
            write_frame(out, b"E", pickle.dumps(describe(exc)))
            continue
        write_frame(out, b"K", pickle.dumps(result))


def describe(exc: BaseException) -> dict[str, Any]:
    """What the parent needs of a handler's exception: its class names (most derived
    first), the SQLite error code if any, and the message."""
    return {"types": [t.__name__ for t in type(exc).__mro__],
            "code": getattr(exc, "sqlite_errorcode", None),
            "message": f"{type(exc).__name__}: {exc}"}
