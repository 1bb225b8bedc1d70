"""Server-sent events: an incremental decoder and a frame encoder.

The decoder follows the WHATWG "event stream" parsing rules that A2A peers
rely on: lines end in CRLF, LF or a lone CR (a CR at the end of one network
chunk may be the first half of a CRLF in the next); lines starting with ``:``
are comments (a2a-sdk sends ``: ping`` every 15 s); several ``data:`` lines of
one event are joined with ``"\\n"``; a blank line dispatches the event; an event
with no data is not dispatched; an unfinished event at end of stream is
discarded. Bytes that are not UTF-8 are replaced (U+FFFD), never raised on.

The decoder is bounded: one event larger than ``max_event_bytes`` raises
:class:`SSEError` instead of growing a buffer without limit (a peer that
never sends a blank line).
"""

from __future__ import annotations

import codecs
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass

__all__ = ["SSEError", "SSEEvent", "SSEDecoder", "aiter_sse", "encode_sse"]

#: Default cap on one event's size (data lines and pending line included).
DEFAULT_MAX_EVENT_BYTES = 16 * 1024 * 1024


class SSEError(ValueError):
    """The byte stream is not a valid event stream (an event past the size cap)."""


@dataclass(slots=True)
class SSEEvent:
    """One dispatched event: its ``event`` type (default ``"message"``), data, id."""

    data: str
    event: str = "message"
    id: str | None = None


class SSEDecoder:
    """Turns chunks of bytes into :class:`SSEEvent`s, in order."""

    __slots__ = ("_began", "_cr", "_data", "_decoder", "_event", "_id", "_max", "_pending",
                 "_pending_len", "_size")

    def __init__(self, *, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # The text after the last line break seen, in pieces: a line that never
        # ends must cost each chunk its own length, not the whole line again
        # (joined and rescanned per chunk, 16 MB in 4 KB chunks took 18 s of loop).
        self._pending: list[str] = []
        self._pending_len = 0
        self._cr = False  # the pending text ends with a CR (its LF may follow)
        self._data: list[str] = []
        self._event = ""
        self._id: str | None = None
        self._max = max_event_bytes
        self._size = 0
        self._began = False  # some text was decoded (a leading BOM is behind us)

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Decode ``chunk``; return the events it completed (maybe none)."""
        piece = self._decoder.decode(chunk)
        if not self._began and piece:
            piece = self._without_bom(piece)
        if not self._cr and "\n" not in piece and "\r" not in piece:
            if piece:
                self._pending.append(piece)
                self._pending_len += len(piece)
                if self._pending_len + self._size > self._max:
                    raise SSEError(f"an event stream event exceeds {self._max} bytes")
            return []
        text = "".join(self._pending) + piece
        events: list[SSEEvent] = []
        start = 0
        n = len(text)
        while True:
            cr = text.find("\r", start)
            lf = text.find("\n", start)
            if cr < 0 and lf < 0:
                break
            if cr < 0 or (0 <= lf < cr):
                end, nxt = lf, lf + 1
            elif cr == n - 1:
                break  # a CR at the end: its LF may come with the next chunk
            else:
                end = cr
                nxt = cr + 2 if text[cr + 1] == "\n" else cr + 1
            self._line(text[start:end], events)
            start = nxt
        rest = text[start:]
        self._pending = [rest] if rest else []
        self._pending_len = len(rest)
        self._cr = rest.endswith("\r")
        if self._pending_len + self._size > self._max:
            raise SSEError(f"an event stream event exceeds {self._max} bytes")
        return events

    def _without_bom(self, text: str) -> str:
        """The stream's first text without its byte order mark: WHATWG strips one
        leading U+FEFF (else the first field reads as "\ufeffdata" and is ignored)."""
        self._began = True
        return text[1:] if text[0] == "\ufeff" else text

    def _line(self, line: str, events: list[SSEEvent]) -> None:
        if not line:
            if self._data:
                events.append(SSEEvent("\n".join(self._data), self._event or "message",
                                       self._id))
            self._data = []
            self._event = ""
            self._size = 0
            return
        if line[0] == ":":
            return
        field, sep, value = line.partition(":")
        if sep and value[:1] == " ":
            value = value[1:]
        if field == "data":
            self._data.append(value)
            self._size += len(value) + 1
            if self._size > self._max:
                raise SSEError(f"an event stream event exceeds {self._max} bytes")
        elif field == "event":
            self._event = value
        elif field == "id" and "\x00" not in value:
            self._id = value
        # "retry" and unknown fields are ignored, as the standard says.

    def close(self) -> list[SSEEvent]:
        """End of stream: a last line without its break still counts; an
        undispatched event is discarded (WHATWG)."""
        last = self._decoder.decode(b"", final=True)
        if not self._began and last:
            last = self._without_bom(last)
        tail = "".join(self._pending) + last
        self._pending = []
        self._pending_len = 0
        self._cr = False
        events: list[SSEEvent] = []
        if tail:
            self._line(tail.rstrip("\r"), events)
        return events


async def aiter_sse(chunks: AsyncIterable[bytes], *,
                    max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> AsyncIterator[SSEEvent]:
    """Events of an async iterable of byte chunks (e.g. ``response.aiter_raw()``)."""
    decoder = SSEDecoder(max_event_bytes=max_event_bytes)
    async for chunk in chunks:
        for event in decoder.feed(chunk):
            yield event
    for event in decoder.close():
        yield event


def encode_sse(data: str, *, event: str | None = None) -> bytes:
    """One SSE frame: optional ``event:`` line, one ``data:`` line per line of ``data``.

    A line break inside ``data`` (any of CR, LF, CRLF) becomes another ``data:``
    line, so a payload can never end the frame early or inject a field.
    """
    lines = data.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    head = f"event: {event.replace(chr(13), '').replace(chr(10), '')}\n" if event else ""
    return (head + "".join(f"data: {line}\n" for line in lines) + "\n").encode()
