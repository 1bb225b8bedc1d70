"""The 2.1 wire forms of a task's outcome (spec §16): the send reply and the SSE frames.

Kept byte-for-byte as 2.1 wrote them: non-chunk frames are
``event: <name>\\ndata: <json>\\n\\n``; chunk frames are ``format_sse_event`` of the
chunk with ``taskId`` / ``contextId`` added to its meta.

The stream's frames come as a :class:`LegacyFrames`, whose ``aclose`` ends a task
whose message was never emitted (see :meth:`A2AServerAdapter.abandon`), however
early the response was given up.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from typing import Any

from pydantic import BaseModel

from penguiflow.semconv import utf8_text
from penguiflow.streaming import format_sse_event

from ._tasks import Subscriber, TaskRecord
from .protocol import wire_json

__all__ = ["LegacyFrames", "jsonable", "legacy_frames", "legacy_response", "utf8"]


def utf8(text: str) -> bytes:
    """``text`` as UTF-8, a lone surrogate (legal in a Python str, not in UTF-8) as
    U+FFFD: a chunk's text goes on the wire raw (not as JSON, which could escape it),
    and one unencodable character must not cut the client's stream short."""
    return utf8_text(text).encode()


def jsonable(value: Any) -> Any:
    """Models -> ``model_dump()``; mappings and sequences converted recursively (spec §16)."""
    if isinstance(value, BaseModel):
        return jsonable(value.model_dump())
    if isinstance(value, Mapping):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def _frame(event: str, data: Mapping[str, Any]) -> bytes:
    return f"event: {event}\ndata: {wire_json(data, separators=None, default=str)}\n\n".encode()


def legacy_response(record: TaskRecord) -> dict[str, Any]:
    """The ``message/send`` reply of a finished task.

    Raises:
        LookupError: the task ended without a flow outcome (its ``detail`` says why).
    """
    ids = {"taskId": record.task_id, "contextId": record.context_id,
           "traceId": record.trace_id}
    outcome = record.outcome
    if outcome is None or outcome.kind == "error":
        raise LookupError(outcome.detail if outcome else "the task has not ended")
    if outcome.kind == "succeeded":
        response = {"status": "succeeded", **ids, "output": jsonable(outcome.value)}
        if outcome.meta:
            response["meta"] = outcome.meta
        return response
    if outcome.kind == "cancelled":
        return {"status": "cancelled", **ids}
    return {"status": "failed", **ids, "error": outcome.error.to_payload()}


async def legacy_frames(record: TaskRecord, sub: Subscriber,
                        launch: Callable[[], Awaitable[None]],
                        abandon: Callable[[], None]) -> AsyncGenerator[bytes, None]:
    """The ``message/stream`` frames; ``launch`` (the emit) runs on the first advance.

    ``abandon`` runs when the frames end however they end (it fails the task only if
    ``launch`` never ran: the frames were closed before their first advance, or the
    launch itself failed).
    """
    ids = {"taskId": record.task_id, "contextId": record.context_id}
    try:
        # Spec §16: the message is emitted when the iterator is first advanced, so a
        # caller that read the accepted frame can cancel a stream that is running.
        await launch()
        yield _frame("status", {"status": "accepted", **ids})
        while (event := await sub.queue.get()) is not None:
            if event.chunk is not None:
                chunk = event.chunk.model_copy(update={"meta": {**event.chunk.meta, **ids}})
                yield utf8(format_sse_event(chunk))
            elif event.final:
                break
        outcome = record.outcome
        if outcome is None:  # this stream fell behind and was cut off
            yield _frame("error", {**ids, "code": "INTERNAL_ERROR",
                                   "message": "stream dropped: client too slow"})
        elif outcome.kind == "succeeded":
            yield _frame("artifact", {**ids, "output": jsonable(outcome.value)})
        elif outcome.kind == "cancelled":
            yield _frame("error", {**ids, "code": "TRACE_CANCELLED",
                                   "message": "Trace cancelled"})
        elif outcome.kind == "failed":
            yield _frame("error", {**outcome.error.to_payload(), **ids})
        else:
            yield _frame("error", {**ids, "code": "INTERNAL_ERROR", "message": outcome.detail})
        yield _frame("done", ids)
    finally:
        record.subscribers.discard(sub)
        abandon()


class LegacyFrames:
    """The ``message/stream`` frames: an async iterator of bytes whose ``aclose`` is total.

    An async generator closed before its first advance never runs its ``finally``,
    so a response that never started streaming (its headers could not be sent, the
    client left first) left the task SUBMITTED and never launched, holding a task
    slot for ever. :meth:`aclose` always calls ``abandon`` (idempotent), and the app
    always calls :meth:`aclose`.
    """

    __slots__ = ("_abandon", "_frames")

    def __init__(self, frames: AsyncGenerator[bytes, None],
                 abandon: Callable[[], None]) -> None:
        self._frames = frames
        self._abandon = abandon

    def __aiter__(self) -> LegacyFrames:
        return self

    async def __anext__(self) -> bytes:
        return await self._frames.__anext__()

    async def aclose(self) -> None:
        """Close the frames; a task whose message was never emitted ends FAILED."""
        try:
            await self._frames.aclose()
        finally:
            self._abandon()
