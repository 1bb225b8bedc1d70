"""An orchestrator flow calling two A2A agents, recorded for `pf inspect`.

The example starts two agents on loopback, each a PenguiFlow flow served by
``create_a2a_app``: a *writer* that streams its answer, and a slow *researcher*.
The orchestrator's ``plan`` node fans one request out to both through
``RemoteNode``s over ``A2AClientTransport``. The writer's chunks arrive as they
are written; the researcher is still working when the orchestrator cancels the
trace, which sends ``CancelTask`` to it. All three flows record into one SQLite
store (``.penguiflow/traces.db``), so ``pf inspect <trace id>`` shows the remote
calls, their latencies and task states, the cancel and how long it took, and
the agents' own runs nested under the calls that caused them.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import uvicorn

from penguiflow import FlowEvent, Headers, Message, Node, NodePolicy, StreamChunk, create
from penguiflow.remote import RemoteNode
from penguiflow_a2a import A2AClientTransport, A2AServerAdapter, create_a2a_app
from penguiflow_exporters import open_store

STORE_URL = "sqlite:///.penguiflow/traces.db"
researcher_working = asyncio.Event()  # set by the researcher's node: sync without sleeps
researcher_bound = asyncio.Event()  # the orchestrator knows the researcher's task id
remote_cancelled = asyncio.Event()  # the researcher acknowledged the CancelTask


async def watch(event: FlowEvent) -> None:
    if event.node_name == "researcher" and event.extra.get("remote_task_id"):
        researcher_bound.set()
    if event.event_type in ("remote_call_cancelled", "remote_cancel_error"):
        remote_cancelled.set()


async def write(message: Message, ctx: Any) -> str:
    words = ["Penguins ", "dive ", "to ", "500 m."]
    for word in words:
        await ctx.emit_chunk(parent=message, text=word)
    return "".join(words)


async def research(message: Message, ctx: Any) -> str:
    researcher_working.set()
    await asyncio.Event().wait()  # a long search; only a cancel ends it
    return "never"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def agent(name: str, func: Any, store: Any) -> AsyncIterator[str]:
    """Serve a one-node flow as an A2A agent on a free loopback port; yield its URL."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    flow = create(Node(func, name=name, policy=NodePolicy(validate="none")).to(),
                  name=f"{name}-agent", state_store=store)
    adapter = A2AServerAdapter(flow, agent_card={"name": name, "description": f"the {name}"},
                               agent_url=url, default_headers={"tenant": "lab"})
    server = uvicorn.Server(uvicorn.Config(create_a2a_app(adapter), host="127.0.0.1",
                                           port=port, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    while not server.started:
        if serving.done():
            serving.result()
        await asyncio.sleep(0.02)
    try:
        yield url
    finally:
        server.should_exit = True
        await serving


async def plan(message: Message, ctx: Any) -> Message:
    return message


async def main() -> None:
    async with open_store(STORE_URL) as store, \
            agent("writer", write, store) as writer_url, \
            agent("researcher", research, store) as researcher_url:
        transport = A2AClientTransport(timeout_s=10)
        writer = RemoteNode(transport=transport, skill="write", agent_url=writer_url,
                            name="writer", streaming=True, policy=NodePolicy(validate="none"))
        researcher = RemoteNode(transport=transport, skill="research", name="researcher",
                                agent_url=researcher_url, streaming=True,
                                policy=NodePolicy(validate="none"))
        planner = Node(plan, name="plan", policy=NodePolicy(validate="none"))
        flow = create(planner.to(writer, researcher), writer.to(), researcher.to(),
                      name="orchestrator", state_store=store, middlewares=[watch])
        flow.run()
        request = Message(payload="How deep do emperor penguins dive?",
                          headers=Headers(tenant="lab"))
        try:
            await flow.emit(request)
            while True:
                item = await asyncio.wait_for(flow.fetch(), 10)
                chunk = getattr(item, "payload", None)  # chunks reach Rookery in a Message
                if isinstance(chunk, StreamChunk):
                    if chunk.text:
                        print(f"writer chunk {chunk.seq}: {chunk.text!r}")
                else:
                    print(f"writer result: {item!r}")
                    break
            # Cancel once the researcher works *and* its task id reached the orchestrator:
            # a CancelTask needs the id (a cancel before it is known can only stop the
            # local call).
            await asyncio.wait_for(researcher_working.wait(), 10)
            await asyncio.wait_for(researcher_bound.wait(), 10)
            print(f"researcher still working; cancel the trace -> "
                  f"{await flow.cancel(request.trace_id)}")
            # The remote CancelTask runs beside the flow: wait for its answer before
            # stopping (stop() would cut it short).
            await asyncio.wait_for(remote_cancelled.wait(), 10)
        finally:
            await flow.stop()
        await transport.aclose()

        history = await store.load_history(request.trace_id)
    ends = [e for e in history if e.kind in ("remote_call_success", "remote_call_cancelled")]
    for event in ends:
        p = event.payload
        print(f"{event.node_name}: {event.kind} state={p.get('remote_task_state')} "
              f"method={p.get('remote_method')} task id known: {bool(p.get('remote_task_id'))}"
              f" latency > 0: {(p.get('latency_ms') or 0) > 0}")
    served = sorted({e.flow_name for e in history if e.kind == "trace_parent"})
    print(f"agents that recorded their run in this trace: {', '.join(served)}")
    print(f"inspect it: uv run pf inspect {request.trace_id}")


if __name__ == "__main__":
    asyncio.run(main())
