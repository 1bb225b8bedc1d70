"""``map_concurrent`` inside a node: bounded concurrency, results in input order.

A node receives a batch of items and processes them with at most ``LIMIT`` in flight.
A counter records how many workers are running at once, so the peak is measured, not
guessed. Calls finish out of order, yet the results come back in input order.
"""

from __future__ import annotations

import asyncio

from penguiflow import Context, Headers, Message, Node, create, map_concurrent

LIMIT = 3


class Gauge:
    """Counts in-flight calls and remembers the highest count seen."""

    def __init__(self) -> None:
        self.current = 0
        self.peak = 0


async def process_batch(msg: Message, ctx: Context) -> Message:
    gauge = Gauge()
    finished: list[int] = []
    items: list[int] = msg.payload

    async def square(item: int) -> int:
        gauge.current += 1
        gauge.peak = max(gauge.peak, gauge.current)
        try:
            await asyncio.sleep(0.01 * (len(items) - item))  # later items are quicker
            finished.append(item)
            return item * item
        finally:
            gauge.current -= 1

    results = await map_concurrent(items, square, max_concurrency=LIMIT)
    summary = {"results": results, "finished": finished, "peak": gauge.peak}
    return msg.model_copy(update={"payload": summary})


async def main() -> None:
    node = Node(process_batch)
    flow = create(node.to())
    flow.run()
    try:
        await flow.emit(Message(payload=list(range(8)), headers=Headers(tenant="demo")))
        result = await asyncio.wait_for(flow.fetch(), timeout=2)
    finally:
        await flow.stop()

    summary = result.payload
    print(f"completion order: {summary['finished']}")
    print(f"results in input order: {summary['results']}")
    print(f"peak concurrency observed: {summary['peak']} (max_concurrency={LIMIT})")


if __name__ == "__main__":
    asyncio.run(main())
