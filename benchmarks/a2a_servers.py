"""Echo agents for the A2A benchmark rows, each served by uvicorn in its own process.

python benchmarks/a2a_servers.py KIND PORT [CHUNKS]

KIND:
  ours         a one-node PenguiFlow (echo) served by penguiflow_a2a.create_a2a_app
  sdk          the same echo agent on a2a-sdk's DefaultRequestHandler
  ours-stream  a PenguiFlow node streaming CHUNKS chunks, then its result
  sdk-stream   an a2a-sdk executor streaming CHUNKS artifact updates, then COMPLETED

Prints ``ready`` on stdout once the socket listens. Both kinds echo the same way
(one artifact holding the input text, then COMPLETED), so a round trip measures
the servers, not the agents.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import uvicorn

HOST = "127.0.0.1"


def ours_app(port: int, chunks: int) -> Any:
    from penguiflow import Message, Node, NodePolicy, create
    from penguiflow_a2a import A2AServerAdapter, create_a2a_app

    async def echo(message: Message, ctx: Any) -> Any:
        if chunks:
            for i in range(chunks):
                await ctx.emit_chunk(parent=message, text=f"chunk {i} ")
        return message.payload

    node = Node(echo, name="echo", policy=NodePolicy(validate="none"))
    flow = create(node.to(), name="echo")
    adapter = A2AServerAdapter(
        flow, agent_card={"name": "echo", "description": "echoes its input"},
        agent_url=f"http://{HOST}:{port}", default_headers={"tenant": "bench"})
    return create_a2a_app(adapter, include_docs=False)


def sdk_app(port: int, chunks: int) -> Any:
    from a2a.server.agent_execution import AgentExecutor, RequestContext
    from a2a.server.events import EventQueue
    from a2a.server.request_handlers import DefaultRequestHandler
    from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes
    from a2a.server.tasks import InMemoryTaskStore, TaskUpdater
    from a2a.types import (
        AgentCapabilities,
        AgentCard,
        AgentInterface,
        AgentSkill,
        Part,
        Task,
        TaskState,
        TaskStatus,
    )
    from starlette.applications import Starlette

    class Echo(AgentExecutor):
        async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
            text = context.get_user_input()
            task = context.current_task or Task(
                id=context.task_id, context_id=context.context_id,
                status=TaskStatus(state=TaskState.TASK_STATE_SUBMITTED),
                history=[context.message])
            await event_queue.enqueue_event(task)
            up = TaskUpdater(event_queue, context.task_id, context.context_id)
            for i in range(chunks):
                await up.add_artifact([Part(text=f"chunk {i} ")], artifact_id="stream",
                                      name="stream", append=i > 0)
            await up.add_artifact([Part(text=text)], artifact_id="result", name="result",
                                  last_chunk=True)
            await up.complete()

        async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
            up = TaskUpdater(event_queue, context.task_id, context.context_id)
            await up.cancel()

    base = f"http://{HOST}:{port}"
    card = AgentCard(
        name="echo", description="echoes its input", version="1.0.0",
        supported_interfaces=[AgentInterface(protocol_binding="JSONRPC", protocol_version="1.0",
                                             url=f"{base}/")],
        capabilities=AgentCapabilities(streaming=True, push_notifications=False),
        default_input_modes=["text/plain"], default_output_modes=["text/plain"],
        skills=[AgentSkill(id="echo", name="echo", description="echo", tags=["echo"])])
    handler = DefaultRequestHandler(agent_executor=Echo(), task_store=InMemoryTaskStore(),
                                    agent_card=card)
    return Starlette(routes=[*create_agent_card_routes(card),
                             *create_jsonrpc_routes(handler, rpc_url="/")])


def main() -> None:
    kind, port = sys.argv[1], int(sys.argv[2])
    chunks = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    app = ours_app(port, chunks) if kind.startswith("ours") else sdk_app(port, chunks)
    server = uvicorn.Server(uvicorn.Config(app, host=HOST, port=port, log_level="warning",
                                           access_log=False))

    async def serve() -> None:
        task = asyncio.create_task(server.serve())
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        print("ready", flush=True)
        await task

    asyncio.run(serve())


if __name__ == "__main__":
    main()
