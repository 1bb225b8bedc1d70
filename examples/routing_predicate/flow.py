"""``predicate_router``: send each message to successors chosen from its content.

The predicate returns a successor name, a list of names (send to several), or ``None``
(drop the message). The router forwards the original message and returns nothing itself.
"""

from __future__ import annotations

import asyncio

from pydantic import BaseModel

from penguiflow import Context, Headers, Message, Node, create, predicate_router


class Item(BaseModel):
    text: str
    priority: int


def choose(msg: Message) -> str | list[str] | None:
    item: Item = msg.payload
    if not item.text:
        return None  # drop: nothing to do
    if item.priority >= 5:
        return ["urgent", "audit"]  # several successors get the same message
    return "normal"


def handler(name: str) -> Node:
    async def handle(msg: Message, ctx: Context) -> str:
        return f"{name} handled {msg.payload.text!r}"

    return Node(handle, name=name)


async def main() -> None:
    router = predicate_router("triage", choose)
    urgent, normal, audit = handler("urgent"), handler("normal"), handler("audit")
    flow = create(router.to(urgent, normal, audit), urgent.to(), normal.to(), audit.to())

    items = [Item(text="disk full", priority=9), Item(text="typo in footer", priority=1),
             Item(text="", priority=3)]
    flow.run()
    try:
        for item in items:
            await flow.emit(Message(payload=item, headers=Headers(tenant="demo")))
            received: list[str] = []
            try:
                while True:  # collect everything this message produces
                    received.append(await asyncio.wait_for(flow.fetch(), timeout=0.2))
            except TimeoutError:
                pass
            print(f"{item.text or '<empty>'!r} -> {sorted(received) or 'dropped'}")
    finally:
        await flow.stop()


if __name__ == "__main__":
    asyncio.run(main())
