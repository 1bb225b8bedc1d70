"""``Message.meta``: side-channel data that travels with a message through the flow.

Each node enriches meta by building a *new* dict (``{**msg.meta, ...}``) in
``model_copy(update=...)``, so the message the caller emitted is never changed. The end
shows why: ``model_copy`` is shallow, so a copy that does not replace ``meta`` shares it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from penguiflow import Context, Headers, Message, Node, create


def stamp(msg: Message, step: str, **extra: Any) -> dict[str, Any]:
    """Return new meta: the old keys, ``extra``, and ``step`` appended to ``path``."""
    path = [*msg.meta.get("path", []), step]  # a new list too: never append() in place
    return {**msg.meta, **extra, "path": path}


async def ingest(msg: Message, ctx: Context) -> Message:
    return msg.model_copy(update={"meta": stamp(msg, "ingest", source="api")})


async def enrich(msg: Message, ctx: Context) -> Message:
    return msg.model_copy(update={"payload": msg.payload.upper(),
                                  "meta": stamp(msg, "enrich", lang="en")})


async def finish(msg: Message, ctx: Context) -> Message:
    return msg.model_copy(update={"meta": stamp(msg, "finish", chars=len(msg.payload))})


async def main() -> None:
    a, b, c = Node(ingest), Node(enrich), Node(finish)
    flow = create(a.to(b), b.to(c), c.to())
    original = Message(payload="hello", headers=Headers(tenant="demo"),
                       meta={"request_id": "req-1"})
    flow.run()
    try:
        await flow.emit(original)
        result = await asyncio.wait_for(flow.fetch(), timeout=2)
    finally:
        await flow.stop()

    print(f"result meta:   {result.meta}")
    print(f"original meta: {original.meta} (unchanged)")

    shallow = original.model_copy(update={"payload": "other"})
    print(f"copy without a new meta shares the dict: {shallow.meta is original.meta}")
    safe = original.model_copy(update={"meta": {**original.meta, "retry": 1}})
    print(f"copy with {{**msg.meta, ...}} shares it: {safe.meta is original.meta}")
    one, two = (Message(payload=i, headers=Headers(tenant="demo")) for i in range(2))
    print(f"two new messages share a default meta: {one.meta is two.meta}")


if __name__ == "__main__":
    asyncio.run(main())
