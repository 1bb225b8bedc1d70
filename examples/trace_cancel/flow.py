"""Per-trace cancellation: cancel one request mid-node while another completes.

Two traces enter the same flow. While trace "A" is inside ``slow_step``, ``flow.cancel``
cancels it: the node coroutine sees ``CancelledError``, nothing of "A" reaches Rookery, and
trace "B" carries on. A middleware prints the cancellation events as the runtime emits them.
"""

from __future__ import annotations

import asyncio

from penguiflow import FlowEvent, Headers, Message, Node, create

CANCEL_KINDS = {"trace_cancel_start", "node_trace_cancelled", "trace_cancel_finish"}
labels: dict[str, str] = {}  # trace id -> "A" / "B", for readable output
started = {"A": asyncio.Event(), "B": asyncio.Event()}
release = asyncio.Event()  # lets the node finish; set only after "A" was cancelled
a_drained = asyncio.Event()


async def slow_step(msg: Message, ctx: object) -> Message:
    started[msg.payload].set()
    try:
        await release.wait()  # stands for a long model or tool call
    except asyncio.CancelledError:
        print(f"slow_step({msg.payload}): saw CancelledError, cleaning up")
        raise
    return msg.model_copy(update={"payload": f"{msg.payload} done"})


async def print_cancel_events(event: FlowEvent) -> None:
    if event.event_type in CANCEL_KINDS:
        print(f"  event {event.event_type:<20} node={event.node_name:<9} "
              f"trace={labels[event.trace_id or '']} pending={event.trace_pending} "
              f"inflight={event.trace_inflight} cancelled={event.trace_cancelled}")
    if event.event_type == "trace_cancel_finish":
        a_drained.set()


async def main() -> None:
    step = Node(slow_step, name="slow_step")
    flow = create(step.to(), middlewares=[print_cancel_events])
    flow.run()
    try:
        a = Message(payload="A", headers=Headers(tenant="demo"))
        b = Message(payload="B", headers=Headers(tenant="demo"))
        labels.update({a.trace_id: "A", b.trace_id: "B"})
        await flow.emit(a)
        await flow.emit(b)  # queued behind "A": a node handles one message at a time
        await asyncio.wait_for(started["A"].wait(), timeout=2)

        print(f"cancel(A) -> {await flow.cancel(a.trace_id)}")
        await asyncio.wait_for(a_drained.wait(), timeout=2)
        release.set()

        result = await asyncio.wait_for(flow.fetch(), timeout=2)
        print(f"fetched: {result.payload!r} (trace B: {result.trace_id == b.trace_id})")
        print(f"cancel(A) again -> {await flow.cancel(a.trace_id)} (nothing left to cancel)")
    finally:
        await flow.stop()


if __name__ == "__main__":
    asyncio.run(main())
