"""The bare-asyncio floor: bounded ``asyncio.Queue`` chains with one task per stage.

No validation, no events, no tracing: the practical lower bound for an asyncio runtime.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

QUEUE_MAXSIZE = 64
FAN_WIDTH = 8


class FloorMsg:
    __slots__ = ("payload", "trace_id")

    def __init__(self, payload: Any, trace_id: str) -> None:
        self.payload = payload
        self.trace_id = trace_id


def make_messages(m: int) -> list[FloorMsg]:
    return [FloorMsg(i, uuid.uuid4().hex) for i in range(m)]


async def identity(msg: Any, ctx: Any) -> Any:
    return msg


StageFn = Callable[[Any, Any], Awaitable[Any]]
Queue = asyncio.Queue[Any]


async def _stage(q_in: Queue, q_out: Queue, fn: StageFn) -> None:
    while True:
        m = await q_in.get()
        r = await fn(m, None)
        await q_out.put(r)


async def _fan(q_in: Queue, outs: list[Queue], fn: StageFn) -> None:
    while True:
        m = await q_in.get()
        r = await fn(m, None)
        for q in outs:
            await q.put(r)


async def _join(q_in: Queue, q_out: Queue, k: int) -> None:
    buckets: dict[str, list[Any]] = {}
    while True:
        m = await q_in.get()
        tid = m.trace_id
        bucket = buckets.get(tid)
        if bucket is None:
            bucket = buckets[tid] = []
        bucket.append(m.payload)
        if len(bucket) == k:
            del buckets[tid]
            await q_out.put(FloorMsg(bucket, tid))


@dataclass(slots=True)
class FloorPipe:
    """Entry and exit queues of a running floor graph; ``emit``/``fetch`` mirror a flow."""

    q_in: Queue
    q_out: Queue

    async def emit(self, msg: Any) -> None:
        await self.q_in.put(msg)

    async def fetch(self) -> Any:
        return await self.q_out.get()


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def chain(n: int) -> AsyncIterator[FloorPipe]:
    """A linear chain of ``n`` identity stages."""
    qs: list[Queue] = [asyncio.Queue(maxsize=QUEUE_MAXSIZE) for _ in range(n + 1)]
    tasks = [asyncio.create_task(_stage(qs[i], qs[i + 1], identity)) for i in range(n)]
    try:
        yield FloorPipe(qs[0], qs[-1])
    finally:
        await _cancel(tasks)


@contextlib.asynccontextmanager
async def fan_out(width: int = FAN_WIDTH) -> AsyncIterator[FloorPipe]:
    """fan -> w0..w{width-1} -> join (bucketing by trace_id) -> out."""
    q_in: Queue = asyncio.Queue(maxsize=QUEUE_MAXSIZE)
    worker_qs: list[Queue] = [asyncio.Queue(maxsize=QUEUE_MAXSIZE) for _ in range(width)]
    q_join: Queue = asyncio.Queue(maxsize=QUEUE_MAXSIZE)
    q_out: Queue = asyncio.Queue(maxsize=QUEUE_MAXSIZE)
    tasks = [asyncio.create_task(_fan(q_in, worker_qs, identity))]
    tasks += [asyncio.create_task(_stage(q, q_join, identity)) for q in worker_qs]
    tasks.append(asyncio.create_task(_join(q_join, q_out, width)))
    try:
        yield FloorPipe(q_in, q_out)
    finally:
        await _cancel(tasks)
