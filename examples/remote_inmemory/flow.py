"""Delegating to remote agents: a streamed answer, and a long task cancelled mid-stream.

Two ``RemoteNode``s call agents through the in-memory transport, which behaves like an
A2A agent on the wire (task states, latency, chunk intervals, slow cancel acknowledgements).
The writer's chunks are printed as they arrive. The researcher is held by its ``gate``
until the writer is done; once its first chunk arrives, ``flow.cancel`` cancels the trace,
and the RemoteNode cancels the remote task (``remote_call_cancelled``).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

from penguiflow import FlowEvent, Headers, Message, StreamChunk, create, stream_flow
from penguiflow.remote import InMemoryAgent, InMemoryTransport, RemoteCallRequest, RemoteNode

WRITER, RESEARCHER = "inmemory://writer", "inmemory://researcher"
events: list[FlowEvent] = []
seen: defaultdict[tuple[str, str | None], asyncio.Event] = defaultdict(asyncio.Event)


async def record(event: FlowEvent) -> None:
    events.append(event)
    seen[event.event_type, event.trace_id].set()


async def compose(request: RemoteCallRequest) -> str:
    return "Emperor penguins huddle."  # the writer's final result, after its chunks


def first(kind: str, trace_id: str) -> FlowEvent:
    return next(e for e in events if e.event_type == kind and e.trace_id == trace_id)


async def main() -> None:
    gate = asyncio.Event()
    transport = InMemoryTransport({
        WRITER: InMemoryAgent(handler=compose, chunks=["Emperor ", "penguins ", "huddle."],
                              latency_s=0.01),
        RESEARCHER: InMemoryAgent(chunks=[f"finding {i}; " for i in range(10)], gate=gate,
                                  chunk_interval_s=0.2, cancel_latency_s=0.05),
    })
    writer = RemoteNode(transport=transport, skill="write", agent_url=WRITER,
                        name="writer", streaming=True)
    researcher = RemoteNode(transport=transport, skill="research", agent_url=RESEARCHER,
                            name="researcher", streaming=True)
    flow = create(writer.to(), researcher.to(), middlewares=[record])
    flow.run()
    try:
        research = Message(payload="survey colonies", headers=Headers(tenant="demo"))
        await flow.emit(research, to=researcher)  # held at the agent's gate for now
        task = await asyncio.wait_for(transport.next_task(RESEARCHER), 2)
        print(f"researcher task opened, state: {task.state}")

        write = Message(payload="Write one line on penguins", headers=Headers(tenant="demo"))
        async for item in stream_flow(flow, write, to=writer, timeout=2, include_final=True):
            if isinstance(item, StreamChunk):
                print(f"writer chunk {item.seq}: {item.text!r} done={item.done}")
            else:
                print(f"writer result: {item!r}")

        gate.set()  # the researcher starts streaming, one chunk every 0.2 s
        chunk = (await asyncio.wait_for(flow.fetch(), 2)).payload
        print(f"researcher chunk {chunk.seq}: {chunk.text!r}; cancelling the trace")
        print(f"cancel -> {await flow.cancel(research.trace_id)}")
        await asyncio.wait_for(seen["remote_call_cancelled", research.trace_id].wait(), 2)
    finally:
        await flow.stop()

    for trace_id in (write.trace_id, research.trace_id):
        start = first("remote_call_start", trace_id)
        print(f"{start.node_name}: agent {start.extra['remote_agent_url']} "
              f"skill {start.extra['remote_skill']} via {start.extra['remote_transport']}")
        print(f"  request bytes > 0: {start.extra['remote_request_bytes'] > 0}")
        stream = first("remote_stream_event", trace_id).extra
        print(f"  context id: {'yes' if stream.get('remote_context_id') else 'no'}, "
              f"task id: {'yes' if stream.get('remote_task_id') else 'no'}")
    done = first("remote_call_success", write.trace_id).extra
    print(f"writer: response bytes > 0: {done['remote_response_bytes'] > 0}, "
          f"stream events: {done['remote_stream_events']}")
    cancelled = first("remote_call_cancelled", research.trace_id)
    print(f"researcher: remote_call_cancelled reason={cancelled.extra['remote_cancel_reason']}"
          f" status={cancelled.extra['remote_status']}, cancel round trip >= 50 ms: "
          f"{(cancelled.latency_ms or 0) >= 50} ({cancelled.latency_ms:.1f} ms)")
    for task in transport.tasks.values():  # the agents' own view of each task
        print(f"task at {task.agent_url}: {' -> '.join(s for s, _ in task.history)}")


if __name__ == "__main__":
    asyncio.run(main())
