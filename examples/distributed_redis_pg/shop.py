"""The shop flow: what every process of the example builds, workers and client alike.

``pf worker shop:build`` imports this module by name, so it must be importable in
the worker's process (the example puts its folder on ``PYTHONPATH``).

    receive --> price --+
            \\          +--> pack (join_k, 2) --> invoice --> Rookery
             -> stock --+

Every process builds the same flow under the same ``name=``: the name is what
the Redis keys are named after, so processes of different flows never mix.
Payloads are plain JSON (dicts), as everything that crosses a process boundary
must be (``penguiflow.wire``). The nodes have no side effects but their result:
a node may run twice when its worker dies after running it and before
acknowledging its input (at-least-once), so make real nodes idempotent.
"""

from __future__ import annotations

import asyncio

from penguiflow import Context, Message, Node, NodePolicy, PenguiFlow, create, join_k

FLOW_NAME = "shop"
PRICES = {"kettle": 24.5, "teapot": 31.0, "mug": 6.25, "tray": 12.0}
NO_CHECK = NodePolicy(validate="none")  # dict payloads: nothing to validate against


async def receive(msg: Message, ctx: Context) -> Message:
    return msg  # one result goes to every successor: price and stock both get it


async def price(msg: Message, ctx: Context) -> Message:
    await asyncio.sleep(0.08)  # a pricing service
    order = msg.payload
    total = round(PRICES[order["sku"]] * order["qty"], 2)
    return msg.model_copy(update={"payload": {"part": "price", "total": total}})


async def stock(msg: Message, ctx: Context) -> Message:
    await asyncio.sleep(0.06)  # an inventory service
    order = msg.payload
    return msg.model_copy(update={"payload": {"part": "stock", "in_stock": order["qty"] <= 3}})


async def invoice(msg: Message, ctx: Context) -> Message:
    # pack (join_k) hands over both parts of this trace, in arrival order.
    parts = {part["part"]: part for part in msg.payload}
    return msg.model_copy(update={"payload": {
        "total": parts["price"]["total"], "in_stock": parts["stock"]["in_stock"]}})


def build() -> PenguiFlow:
    """The flow (``pf worker shop:build`` calls this in every worker)."""
    nodes = {name: Node(fn, name=name, policy=NO_CHECK)
             for name, fn in (("receive", receive), ("price", price), ("stock", stock),
                              ("invoice", invoice))}
    pack = join_k("pack", 2)
    return create(
        nodes["receive"].to(nodes["price"], nodes["stock"]),
        nodes["price"].to(pack),
        nodes["stock"].to(pack),
        pack.to(nodes["invoice"]),
        nodes["invoice"].to(),
        name=FLOW_NAME,
    )
