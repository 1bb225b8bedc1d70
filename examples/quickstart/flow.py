"""Quickstart: three typed nodes, one question in, one answer out."""

from __future__ import annotations

import asyncio

from pydantic import BaseModel

from penguiflow import Headers, Message, ModelRegistry, Node, create


class Question(BaseModel):
    text: str


class Words(BaseModel):
    words: list[str]


class Answer(BaseModel):
    text: str


async def tokenize(msg: Message, ctx: object) -> Message:
    words = Words(words=msg.payload.text.split())
    return msg.model_copy(update={"payload": words})


async def count(msg: Message, ctx: object) -> Message:
    longest = max(msg.payload.words, key=len)
    answer = Answer(text=f"{len(msg.payload.words)} words, longest: {longest!r}")
    return msg.model_copy(update={"payload": answer})


async def shout(msg: Message, ctx: object) -> Message:
    return msg.model_copy(update={"payload": Answer(text=msg.payload.text.upper())})


async def main() -> None:
    tokenize_node, count_node, shout_node = Node(tokenize), Node(count), Node(shout)
    # emit_errors_to_rookery: a failing node's FlowError reaches fetch() instead of
    # leaving it waiting for a result that never comes.
    flow = create(tokenize_node.to(count_node), count_node.to(shout_node), shout_node.to(),
                  emit_errors_to_rookery=True)

    # Each node validates its input and output; the envelope is a Message whose
    # payload type changes from node to node.
    registry = ModelRegistry()
    for name in ("tokenize", "count", "shout"):
        registry.register(name, Message, Message)

    flow.run(registry=registry)
    try:
        question = Message(payload=Question(text="how do penguins fly underwater"),
                           headers=Headers(tenant="demo"))
        await flow.emit(question)
        result = await asyncio.wait_for(flow.fetch(), timeout=5)
    finally:
        await flow.stop()

    print(f"answer: {result.payload.text}")
    print(f"trace:  {result.trace_id} (same id from emit to fetch: "
          f"{result.trace_id == question.trace_id})")


if __name__ == "__main__":
    asyncio.run(main())
