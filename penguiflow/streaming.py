"""Streaming helpers: render StreamChunks for SSE / WebSockets and pump chunk streams.

Chunks are produced with ``Context.emit_chunk`` (which handles per-stream sequence numbers
and per-trace backpressure); this module only formats them (:func:`format_sse_event`,
:func:`chunk_to_ws_json`), turns an arbitrary async event source into chunks
(:func:`emit_stream_events`), and consumes a running flow's Rookery as a stream
(:func:`stream_flow`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
from collections import OrderedDict
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from penguiflow.errors import InvalidArgumentType
from penguiflow.types import StreamChunk

if TYPE_CHECKING:
    from penguiflow.core import Context, PenguiFlow
    from penguiflow.node import Node
    from penguiflow.types import Message

__all__ = ["chunk_to_ws_json", "emit_stream_events", "format_sse_event", "stream_flow"]

logger = logging.getLogger("penguiflow.streaming")

# The line ends of SSE (WHATWG HTML, "event stream interpretation"): CRLF, LF, CR.
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
# UTF-16 surrogate code points: a str may hold them (lone, or as two code points that
# would pair in UTF-16), but UTF-8 cannot encode them, so a text holding one cannot
# be sent.
_SURROGATE = re.compile("[\ud800-\udfff]")
# How json writes a non-finite float used as a dict key (a key is a string, so these
# are valid JSON and are kept).
_NON_FINITE_KEYS = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float (in dicts, lists, tuples) as ``None``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {
            (_NON_FINITE_KEYS[repr(float(key))]
             if isinstance(key, float) and not math.isfinite(key) else key): _finite(item)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def _json_text(value: Any) -> str:
    """``value`` as strict JSON (RFC 8259) text, ``ensure_ascii=False`` otherwise.

    Python's json writes NaN and the infinities as bare ``NaN`` / ``Infinity``, which
    no strict parser (JavaScript's ``JSON.parse``) accepts: each is written as ``null``,
    as ``JSON.stringify`` does. A surrogate code point (which UTF-8 cannot encode) is
    written as its ``\\uXXXX`` escape, which a parser reads back (a pair as the one
    character it stands for). Anything else is exactly ``json.dumps(value,
    ensure_ascii=False)``.
    """
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False)
    except ValueError as exc:
        if "Out of range float" not in str(exc):
            raise
        text = json.dumps(_finite(value), ensure_ascii=False, allow_nan=False)
    # Surrogates only occur inside JSON strings, where an escape stands for the char.
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _sse_text(text: str) -> str:
    """``text`` made UTF-8 encodable: a surrogate pair becomes the character it stands
    for, a lone surrogate U+FFFD (as a UTF-8 decoder reads an invalid byte)."""
    if _SURROGATE.search(text) is None:
        return text
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def format_sse_event(
    chunk: StreamChunk, *, event_name: str | None = None, retry_ms: int | None = None
) -> str:
    """Render a chunk as one Server-Sent Events frame.

    The frame's lines are ``event: <name>`` (``event_name``, else ``done`` for a final
    chunk and ``chunk`` otherwise), ``id: <seq>``, ``data: <text>``, then
    ``data: <meta as JSON>`` when the chunk has meta, then ``retry: <ms>`` when
    ``retry_ms`` is given. A multi-line text becomes one ``data:`` line per line, as SSE
    requires (a single-line text gives exactly one); a lone CR ends a line too, as
    it does for every SSE reader, so no text can add a field or an event.

    The frame is always valid to send: the meta is strict JSON (a NaN or infinite
    float is ``null``, a surrogate code point a ``\\uXXXX`` escape), and a surrogate in
    the text or ``event_name`` (which UTF-8 cannot encode) is replaced: a pair by the
    character it stands for, a lone one by U+FFFD. Other values render exactly as
    ``json.dumps(meta, ensure_ascii=False)`` and the text as is.

    Returns:
        The frame, terminated by a blank line (it ends with ``"\\n\\n"``).

    Raises:
        ValueError: ``event_name`` holds a line break.
        TypeError: ``retry_ms`` is not an int (a bool is refused too) or None
            (:class:`~penguiflow.errors.InvalidArgumentType`).
    """
    if event_name is not None and _LINE_BREAK.search(event_name):
        raise ValueError(f"event_name must be one line (SSE ends a field at CR or LF); "
                         f"got {event_name!r}")
    if retry_ms is not None and (isinstance(retry_ms, bool) or not isinstance(retry_ms, int)):
        # Rendered as is, a str could add fields or events ("1\nevent: x"), and
        # a float is a retry field every SSE reader ignores.
        raise InvalidArgumentType(
            f"retry_ms must be an int (milliseconds) or None, got "
            f"{type(retry_ms).__name__} {retry_ms!r}")
    name = _sse_text(event_name or ("done" if chunk.done else "chunk"))
    lines = [f"event: {name}", f"id: {chunk.seq}"]
    # Every line break SSE knows (CRLF, LF, and a lone CR) starts another data line:
    # left inside one, it would end the field there and let the text after it write
    # fields (an event name, an id) or whole events of its own.
    lines.extend(f"data: {line}" for line in _LINE_BREAK.split(_sse_text(chunk.text)))
    if chunk.meta:
        lines.append(f"data: {_json_text(chunk.meta)}")
    if retry_ms is not None:
        lines.append(f"retry: {retry_ms}")
    return "\n".join(lines) + "\n\n"


def chunk_to_ws_json(chunk: StreamChunk, *, extra: Mapping[str, Any] | None = None) -> str:
    """Render a chunk as a JSON text for a WebSocket message.

    Args:
        chunk: The chunk.
        extra: Keys merged on top of ``stream_id``, ``seq``, ``text``, ``done``, ``meta``
            (they win on collisions).

    Returns:
        ``json.dumps(payload, ensure_ascii=False)``, except that the text is always
        strict JSON a WebSocket can carry: a NaN or infinite float is ``null`` (not
        the bare ``NaN`` / ``Infinity`` ``JSON.parse`` refuses) and a surrogate code
        point (which UTF-8 cannot encode) is its ``\\uXXXX`` escape.

    Raises:
        TypeError: If the meta or ``extra`` hold values JSON cannot encode.
    """
    payload: dict[str, Any] = {
        "stream_id": chunk.stream_id,
        "seq": chunk.seq,
        "text": chunk.text,
        "done": chunk.done,
        "meta": chunk.meta,
    }
    if extra:
        payload.update(extra)
    return _json_text(payload)


#: How many trace ids :func:`stream_flow` remembers having emitted, to tell an
#: earlier call's leftover (dropped) from this call's answer.
RECENT_TRACES = 4096
_STREAMED: OrderedDict[Any, None] = OrderedDict()


def _is_hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


async def stream_flow(
    flow: PenguiFlow,
    parent_msg: Any,
    *,
    to: Node | Sequence[Node] | None = None,
    timeout: float | None = None,
    include_final: bool = False,
) -> AsyncIterator[Any]:
    """Emit ``parent_msg`` into a running flow and yield what reaches its Rookery.

    Each fetched item is reduced to its ``payload`` (or kept as is when it has none).
    StreamChunks are yielded; a ``done`` chunk ends the stream unless ``include_final``,
    in which case fetching continues. The first non-chunk payload (for instance a
    FlowError, or the final answer) is yielded and ends the stream.

    An item of a trace an earlier ``stream_flow`` call emitted (say the final answer
    that call left in Rookery when it stopped at its ``done`` chunk) is fetched and
    dropped, and a WARNING on the ``penguiflow.streaming`` logger says how many were
    dropped: 2.1 yielded it, handing one request another request's result. Any other
    item is this call's, as in 2.1: a node may answer with a new ``Message`` (a fresh
    trace id), or a plain value. The last :data:`RECENT_TRACES` trace ids this
    function emitted are remembered for this. Items are consumed, so do not run
    other traces through the same flow concurrently.

    The caller must have started the flow and remains responsible for stopping it; this
    generator never stops it.

    Args:
        flow: A running flow.
        parent_msg: The object to emit.
        to: Ingress node(s) to emit to; ``None`` broadcasts.
        timeout: Seconds to wait for each item of the trace (items of other traces
            skipped meanwhile do not restart it); ``None`` waits forever.
        include_final: Keep going after a ``done`` chunk until a non-chunk payload.

    Raises:
        TimeoutError: If the next item of the trace takes longer than ``timeout``.
    """
    trace_id = getattr(parent_msg, "trace_id", None)
    skipped: list[Any] = []
    earlier = _STREAMED

    def report_skipped() -> None:
        if skipped:
            logger.warning(
                "stream_flow skipped %d Rookery item(s) of other traces (%s) while "
                "streaming trace %r; run one trace at a time through a flow that "
                "stream_flow reads, or fetch each call's leftovers (include_final=True)",
                len(skipped), ", ".join(sorted({repr(t) for t in skipped})[:5]), trace_id)
            skipped.clear()

    await flow.emit(parent_msg, to=to)
    if trace_id is not None:
        try:
            earlier[trace_id] = None
            earlier.move_to_end(trace_id)
            if len(earlier) > RECENT_TRACES:
                earlier.popitem(last=False)
        except TypeError:  # an unhashable id (refused by emit already, in practice)
            pass
    loop = asyncio.get_running_loop()

    async def next_item() -> Any:
        while True:
            item = await flow.fetch()
            item_trace = getattr(item, "trace_id", None)
            if (item_trace is None or item_trace == trace_id
                    or not _is_hashable(item_trace) or item_trace not in earlier):
                return item
            skipped.append(item_trace)

    try:
        while True:
            if timeout is None:
                item = await next_item()
            else:
                # One deadline for the item, skipped items included; an item already
                # there is taken even when the time is up (wait_for(0) would not).
                async with asyncio.timeout_at(loop.time() + timeout):
                    item = await next_item()
            report_skipped()
            payload = getattr(item, "payload", item)
            yield payload
            if not isinstance(payload, StreamChunk) or (payload.done and not include_final):
                return
    finally:
        # A timeout (or the caller leaving) after skipping: still say so.
        report_skipped()


async def emit_stream_events(
    source: AsyncIterable[Any],
    ctx: Context,
    parent_msg: Message,
    *,
    adapter: Callable[[Any], tuple[str, bool, Mapping[str, Any]]] | None = None,
    to: Node | Sequence[Node] | None = None,
    final_meta: Mapping[str, Any] | None = None,
) -> None:
    """Turn each event of ``source`` into a chunk emitted from ``ctx``.

    Every event becomes ``ctx.emit_chunk(parent=parent_msg, text, done, meta, to=to)`` with
    ``(text, done, meta) = adapter(event)`` (default ``(str(event), False, {})``). If no
    event was ``done``, a closing chunk with empty text, ``done=True`` and meta
    ``final_meta or {}`` is emitted afterwards, so consumers always see the end.

    Args:
        source: Async iterable of events, consumed to exhaustion.
        ctx: Context of the producing node; it must be attached to a running flow.
        parent_msg: The message whose trace the chunks belong to.
        adapter: Maps an event to ``(text, done, meta)``.
        to: Target(s) for the chunks; ``None`` means all of the context's successors.
        final_meta: Meta of the closing chunk.

    Raises:
        RuntimeError: If ``ctx`` is detached (from ``emit_chunk``).
    """
    finished = False
    meta: Mapping[str, Any]
    async for event in source:
        if adapter is None:
            text, done, meta = str(event), False, {}
        else:
            text, done, meta = adapter(event)
        await ctx.emit_chunk(parent=parent_msg, text=text, done=done, meta=dict(meta), to=to)
        finished = finished or done
    if not finished:
        await ctx.emit_chunk(
            parent=parent_msg, text="", done=True, meta=dict(final_meta or {}), to=to
        )
