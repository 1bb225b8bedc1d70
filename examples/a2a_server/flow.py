"""Serve a flow over A2A: any A2A 1.0 (or 0.3) client can call it.

``uv run python examples/a2a_server/flow.py`` serves a one-node flow on
127.0.0.1 and prints its URL until Ctrl-C; ``--demo`` starts it, calls itself
once through PenguiFlow's own A2A client (a RemoteNode in a second flow),
prints what came back, and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
from typing import Any

import uvicorn

from penguiflow import Headers, Message, Node, NodePolicy, StreamChunk, create
from penguiflow.remote import RemoteNode
from penguiflow_a2a import A2AClientTransport, A2AServerAdapter, create_a2a_app


async def haiku(message: Message, ctx: Any) -> str:
    """Stream a haiku about the request, line by line; return it whole."""
    lines = [f"{message.payload} on the ice,", "one penguin, then a thousand:", "the sea waits."]
    for line in lines:
        await ctx.emit_chunk(parent=message, text=line + "\n")
    return "\n".join(lines)


def build_app(port: int) -> Any:
    node = Node(haiku, name="haiku", policy=NodePolicy(validate="none"))
    flow = create(node.to(), name="haiku-agent")
    adapter = A2AServerAdapter(
        flow,
        agent_card={"name": "haiku-agent", "description": "Writes a haiku about a topic.",
                    "skills": [{"name": "haiku", "description": "a three-line poem"}]},
        agent_url=f"http://127.0.0.1:{port}",
        # A2A 1.0 requests may name their tenant; others get this one.
        default_headers={"tenant": "public"})
    return create_a2a_app(adapter)


async def call_myself(url: str) -> None:
    transport = A2AClientTransport(timeout_s=10)
    remote = RemoteNode(transport=transport, skill="haiku", agent_url=url, name="poet",
                        streaming=True, policy=NodePolicy(validate="none"))
    caller = create(remote.to(), name="caller")
    caller.run()
    try:
        await caller.emit(Message(payload="winter", headers=Headers(tenant="demo")))
        while True:
            item = await asyncio.wait_for(caller.fetch(), 10)
            chunk = getattr(item, "payload", None)  # chunks reach Rookery inside a Message
            if isinstance(chunk, StreamChunk):
                if chunk.text:
                    print(f"chunk {chunk.seq}: {chunk.text!r}")
                continue
            print(f"result:\n{item}")
            break
    finally:
        await caller.stop()
        await transport.aclose()


async def main(port: int, demo: bool) -> None:
    server = uvicorn.Server(uvicorn.Config(build_app(port), host="127.0.0.1", port=port,
                                           log_level="warning"))
    serving = asyncio.create_task(server.serve())
    while not server.started:
        if serving.done():
            serving.result()  # it failed to start: say why
        await asyncio.sleep(0.02)
    url = f"http://127.0.0.1:{port}"
    print(f"serving haiku-agent at {url}/ (card: {url}/.well-known/agent-card.json)")
    if not demo:
        print("A2A 1.0 JSON-RPC at POST /, the 2.1 routes at /message/send; Ctrl-C stops")
        await serving
        return
    try:
        await call_myself(url)
    finally:
        server.should_exit = True
        await serving
    print("demo done")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="default: a free port")
    parser.add_argument("--demo", action="store_true", help="call the agent once and exit")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how a served agent stops
        asyncio.run(main(args.port or _free_port(), args.demo))
