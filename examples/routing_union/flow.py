"""``union_router``: validate into a discriminated union and route on the variant.

The router validates each incoming object (a dict or a model) against
``Annotated[Text | Number, Field(discriminator="kind")]`` and sends the *validated*
model to the successor whose name equals its ``kind``.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from penguiflow import Context, Node, create, union_router


class Text(BaseModel):
    kind: Literal["text"] = "text"
    body: str


class Number(BaseModel):
    kind: Literal["number"] = "number"
    value: float


Item = Annotated[Text | Number, Field(discriminator="kind")]


async def text(item: Text, ctx: Context) -> str:
    return f"text node got {type(item).__name__}: {item.body.upper()}"


async def number(item: Number, ctx: Context) -> str:
    return f"number node got {type(item).__name__}: {item.value * 2}"


async def main() -> None:
    router = union_router("by_kind", Item)
    text_node, number_node = Node(text), Node(number)  # names must match the kinds
    flow = create(router.to(text_node, number_node), text_node.to(), number_node.to())

    inputs: list[Any] = [
        {"kind": "text", "body": "hello"},  # a raw dict is validated into Text
        {"kind": "number", "value": "21"},  # "21" is coerced to 21.0
        Number(value=1.5),  # a model instance is accepted as is
    ]
    flow.run()
    try:
        for obj in inputs:
            await flow.emit(obj)
            print(await asyncio.wait_for(flow.fetch(), timeout=2))
    finally:
        await flow.stop()


if __name__ == "__main__":
    asyncio.run(main())
