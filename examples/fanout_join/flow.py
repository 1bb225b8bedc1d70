"""Fan-out / fan-in: one node feeds three workers and ``join_k`` gathers them per trace.

The workers answer with different delays, and the delays are reversed for the second
query, so the join sees its inputs in a different order each time. ``join_k`` keeps
arrival order; sorting the joined list makes the result independent of it.
"""

from __future__ import annotations

import asyncio

from penguiflow import Context, Headers, Message, Node, create, join_k

WORKERS = ("alpha", "beta", "gamma")


async def fan_out(msg: Message, ctx: Context) -> Message:
    return msg  # an ordinary result goes to every successor: all three workers


def make_worker(index: int) -> Node:
    name = WORKERS[index]

    async def work(msg: Message, ctx: Context) -> Message:
        # "forward" makes alpha fastest; "reverse" makes gamma fastest.
        rank = index if msg.payload == "forward" else len(WORKERS) - 1 - index
        await asyncio.sleep(0.02 * (rank + 1))
        return msg.model_copy(update={"payload": f"{name}({msg.payload})"})

    return Node(work, name=name)


async def main() -> None:
    source = Node(fan_out)
    workers = [make_worker(i) for i in range(len(WORKERS))]
    join = join_k("join", len(WORKERS))
    flow = create(source.to(*workers), *(w.to(join) for w in workers), join.to())

    flow.run()
    try:
        for query in ("forward", "reverse"):
            msg = Message(payload=query, headers=Headers(tenant="demo"))
            await flow.emit(msg)
            result = await asyncio.wait_for(flow.fetch(), timeout=2)
            print(f"{query}: {len(result.payload)} results joined, same trace id: "
                  f"{result.trace_id == msg.trace_id}")
            print(f"{query}: arrival order {result.payload}")
            print(f"{query}: sorted        {sorted(result.payload)}")
    finally:
        await flow.stop()


if __name__ == "__main__":
    asyncio.run(main())
