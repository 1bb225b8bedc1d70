"""Playbooks: a node runs a retrieval subflow with ``ctx.call_playbook`` and awaits it.

The playbook is a zero-argument function that builds a fresh subflow. ``call_playbook``
starts it, emits the parent's message into it, returns the payload of its first result
and stops it. The subflow sees the parent's trace id, headers and meta.
"""

from __future__ import annotations

import asyncio
from typing import Any

from penguiflow import (
    Context,
    FinalAnswer,
    Headers,
    Message,
    ModelRegistry,
    Node,
    PenguiFlow,
    create,
)

CORPUS = {"doc-3": "penguins dive", "doc-1": "penguins swim", "doc-2": "seals bark"}
seen: dict[str, Any] = {}  # what the subflow observed
subflows: list[PenguiFlow] = []


async def retrieve(msg: Message, ctx: Context) -> Message:
    seen.update(trace_id=msg.trace_id, tenant=msg.headers.tenant, meta=dict(msg.meta))
    hits = [doc for doc, text in CORPUS.items() if msg.payload in text]
    return msg.model_copy(update={"payload": hits})


async def rank(msg: Message, ctx: Context) -> Message:
    return msg.model_copy(update={"payload": sorted(msg.payload)})


def retrieval_playbook() -> tuple[PenguiFlow, ModelRegistry | None]:
    retrieve_node, rank_node = Node(retrieve), Node(rank)
    subflow = create(retrieve_node.to(rank_node), rank_node.to())
    subflows.append(subflow)
    return subflow, None


async def answer(msg: Message, ctx: Context) -> Message:
    docs = await ctx.call_playbook(retrieval_playbook, msg, timeout=1.0)
    final = FinalAnswer(text=f"{len(docs)} documents mention {msg.payload!r}", citations=docs)
    return msg.model_copy(update={"payload": final})


async def main() -> None:
    flow = create(Node(answer).to())
    flow.run()
    try:
        question = Message(payload="penguins", headers=Headers(tenant="acme"),
                           meta={"request_id": "req-7", "locale": "en"})
        await flow.emit(question)
        result = await asyncio.wait_for(flow.fetch(), timeout=2)
    finally:
        await flow.stop()

    print(f"answer: {result.payload.text}, citations={result.payload.citations}")
    print(f"subflow reused the parent's trace id: {seen['trace_id'] == question.trace_id}")
    print(f"subflow saw tenant={seen['tenant']!r} meta={seen['meta']}")
    print(f"subflow still running after the call: {subflows[0].running}")


if __name__ == "__main__":
    asyncio.run(main())
