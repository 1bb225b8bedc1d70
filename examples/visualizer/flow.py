"""Visualise a flow: Mermaid and Graphviz DOT for a graph with a controller loop.

``triage`` feeds ``controller``, a node with a self-edge (``allow_cycle=True``) that loops
on a working memory (``WM``) until its hop budget is spent. ``flow_to_mermaid`` and
``flow_to_dot`` render every floe, including the OpenSea ingress, the Rookery egress and
the loop, and the example writes them to ``flow.mmd`` and ``flow.dot`` in the current
working directory.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from penguiflow import (
    WM,
    Headers,
    Message,
    Node,
    PenguiFlow,
    create,
    flow_to_dot,
    flow_to_mermaid,
)


async def triage(msg: Message, ctx: object) -> Message:
    # Not a WM yet: any node returning a WM is treated as a controller and re-enqueued to
    # itself, which needs a self-edge.
    return msg.model_copy(update={"payload": msg.payload.strip()})


async def controller(msg: Message, ctx: object) -> Message:
    wm = msg.payload if isinstance(msg.payload, WM) else WM(query=msg.payload, budget_hops=3)
    # Returning a WM loops back here (the runtime counts hops) until the budget is spent.
    return msg.model_copy(update={"payload": wm.model_copy(update={"facts": [*wm.facts, "x"]})})


def write_diagrams(flow: PenguiFlow) -> None:
    """Write flow.mmd and flow.dot to the working directory; print their key lines."""
    mermaid, dot = flow_to_mermaid(flow, direction="LR"), flow_to_dot(flow, rankdir="LR")
    for name, text in (("flow.mmd", mermaid), ("flow.dot", dot)):
        Path(name).write_text(text + "\n")
        lines = text.splitlines()
        print(f"wrote {name} ({len(lines)} lines), first line: {lines[0]}")
        for line in sorted(lines):  # line order is not guaranteed; their content is
            if "loop" in line or ("OpenSea" in line and "->" in line):
                print(f"  {line.strip()}")


async def main() -> None:
    triage_node = Node(triage)
    loop_node = Node(controller, allow_cycle=True)
    flow = create(triage_node.to(loop_node), loop_node.to(loop_node))

    write_diagrams(flow)

    flow.run()
    try:
        await flow.emit(Message(payload=" plan a trip ", headers=Headers(tenant="demo")))
        answer = await asyncio.wait_for(flow.fetch(), timeout=2)
    finally:
        await flow.stop()
    print(f"the loop runs too: {answer.payload.text!r}")
    print("render with: mmdc -i flow.mmd -o flow.svg  /  dot -Tsvg flow.dot -o flow.svg")


if __name__ == "__main__":
    asyncio.run(main())
