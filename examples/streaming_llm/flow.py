"""Streaming tokens: a node emits chunks as it "generates", the caller renders them live.

The node calls ``ctx.emit_chunk`` once per token; every chunk is a ``Message`` carrying a
``StreamChunk`` that travels to Rookery like any result. ``stream_flow`` emits the question
and yields chunk payloads as they arrive, then the node's final answer. Each chunk is
rendered twice: as a Server-Sent Events frame and as a WebSocket JSON text.
"""

from __future__ import annotations

import asyncio

from penguiflow import (
    FinalAnswer,
    Headers,
    Message,
    Node,
    StreamChunk,
    chunk_to_ws_json,
    create,
    format_sse_event,
    stream_flow,
)
from penguiflow.core import Context

TOKENS = ["Penguins ", "swim ", "with ", "their ", "wings."]


async def fake_llm(msg: Message, ctx: Context) -> Message:
    """Stream the answer token by token, then return it whole."""
    for i, token in enumerate(TOKENS):
        last = i == len(TOKENS) - 1
        # stream_id defaults to the trace id; a fixed one keeps this output stable.
        await ctx.emit_chunk(parent=msg, text=token, done=last, stream_id="answer",
                             meta={"model": "fake-llm"} if last else None)
        await asyncio.sleep(0)  # a real model would await the network here
    return msg.model_copy(update={"payload": FinalAnswer(text="".join(TOKENS))})


async def main() -> None:
    llm = Node(fake_llm, name="llm")
    flow = create(llm.to())
    flow.run()
    try:
        question = Message(payload="How do penguins swim?", headers=Headers(tenant="demo"))
        frames: list[tuple[str, str]] = []  # (SSE frame, WebSocket JSON) per chunk
        live = ""
        # include_final=True: keep fetching after the done chunk until the final answer.
        stream = stream_flow(flow, question, timeout=2.0, include_final=True)
        async for item in stream:
            if isinstance(item, StreamChunk):
                live += item.text
                print(f"chunk seq={item.seq} done={item.done} text so far: {live!r}")
                frames.append((format_sse_event(item),
                               chunk_to_ws_json(item, extra={"role": "assistant"})))
            else:
                print(f"final answer: {item.text}")
        print(f"first SSE frame:\n{frames[0][0]}last SSE frame:\n{frames[-1][0]}", end="")
        print(f"last WebSocket JSON: {frames[-1][1]}")
    finally:
        await flow.stop()


if __name__ == "__main__":
    asyncio.run(main())
