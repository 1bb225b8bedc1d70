"""Flows the distributed tests run in several processes (``pf worker dist_flows:<name>``).

Every builder returns a fresh flow; the same builder runs in the client, the
workers, and a single-process reference run. Node behaviour is steered by the
message (``payload``/``meta``), never by process-global state, so that every
process runs the same code.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from penguiflow import WM, FinalAnswer, Headers, Message, ModelRegistry, Node, NodePolicy, create
from penguiflow.core import PenguiFlow
from penguiflow.patterns import join_k, predicate_router

NONE = NodePolicy(validate="none")


class Order(BaseModel):
    """A registry-validated payload: it must cross as a model and come back as one."""

    sku: str
    qty: int
    tags: list[str] = []


def message(payload: Any, **meta: Any) -> Message:
    return Message(payload=payload, headers=Headers(tenant="t"), meta=dict(meta))


def _step(name: str) -> Node:
    async def step(msg: Message, ctx: Any) -> Message:
        delay = msg.meta.get("delay", 0.0)
        if delay:
            await asyncio.sleep(delay)
        return msg.model_copy(update={"payload": f"{msg.payload}{name}"})
    return Node(step, name=name, policy=NONE)


def chain() -> PenguiFlow:
    """a -> b -> c -> d -> e, each appending its name."""
    nodes = [_step(n) for n in "abcde"]
    return create(*(n.to(m) for n, m in itertools.pairwise(nodes)), nodes[-1].to(),
                  name="chain")


def fanout() -> PenguiFlow:
    """split -> (left, right) -> join_k(2) -> total: sums what the branches computed."""
    async def split(msg: Message, ctx: Any) -> Message:
        return msg

    async def left(msg: Message, ctx: Any) -> Message:
        delay = msg.meta.get("delay", 0.0)
        if delay:
            await asyncio.sleep(delay)
        return msg.model_copy(update={"payload": msg.payload * 2})

    async def right(msg: Message, ctx: Any) -> Message:
        return msg.model_copy(update={"payload": msg.payload * 3})

    async def total(msg: Message, ctx: Any) -> Message:
        return msg.model_copy(update={"payload": sum(msg.payload)})

    s, lt, rt = (Node(split, name="split", policy=NONE), Node(left, name="left", policy=NONE),
                 Node(right, name="right", policy=NONE))
    j, t = join_k("join", 2), Node(total, name="total", policy=NONE)
    return create(s.to(lt, rt), lt.to(j), rt.to(j), j.to(t), t.to(), name="fanout")


def routing() -> PenguiFlow:
    """router -> even | odd, by the payload's parity."""
    async def even(msg: Message, ctx: Any) -> Message:
        return msg.model_copy(update={"payload": f"even:{msg.payload}"})

    async def odd(msg: Message, ctx: Any) -> Message:
        return msg.model_copy(update={"payload": f"odd:{msg.payload}"})

    e, o = Node(even, name="even", policy=NONE), Node(odd, name="odd", policy=NONE)
    router = predicate_router("router", lambda m: ["even"] if m.payload % 2 == 0 else ["odd"])
    return create(router.to(e, o), e.to(), o.to(), name="routing")


def controller() -> PenguiFlow:
    """A controller loop: adds a fact per hop, answers after three."""
    async def think(msg: Message, ctx: Any) -> Message:
        wm = msg.payload
        if len(wm.facts) >= 3:
            return msg.model_copy(update={"payload": FinalAnswer(text="|".join(wm.facts))})
        facts = [*wm.facts, f"f{wm.hops}"]
        return msg.model_copy(update={"payload": wm.model_copy(update={"facts": facts})})

    node = Node(think, name="think", allow_cycle=True, policy=NONE)
    return create(node.to(node), name="controller")


def streaming() -> PenguiFlow:
    """source -> talker; talker streams three chunks then returns its answer."""
    async def source(msg: Message, ctx: Any) -> Message:
        return msg

    async def talker(msg: Message, ctx: Any) -> Message:
        for i in range(3):
            await ctx.emit_chunk(parent=msg, text=f"{msg.payload}-{i}", done=i == 2)
        return msg.model_copy(update={"payload": f"said:{msg.payload}"})

    s, t = Node(source, name="source", policy=NONE), Node(talker, name="talker", policy=NONE)
    return create(s.to(t), t.to(), name="streaming")


def validated() -> tuple[PenguiFlow, ModelRegistry]:
    """intake -> pack, both validating Orders through a registry."""
    async def intake(order: Order, ctx: Any) -> Order:
        return order.model_copy(update={"tags": [*order.tags, "in"]})

    async def pack(order: Order, ctx: Any) -> Order:
        return order.model_copy(update={"qty": order.qty * 10, "tags": [*order.tags, "packed"]})

    registry = ModelRegistry()
    registry.register("intake", Order, Order)
    registry.register("pack", Order, Order)
    i, p = Node(intake, name="intake"), Node(pack, name="pack")
    return create(i.to(p), p.to(), name="validated"), registry


def blocking() -> PenguiFlow:
    """gate -> hold: hold waits until cancelled and then writes ``meta['mark']``."""
    async def gate(msg: Message, ctx: Any) -> Message:
        return msg

    async def hold(msg: Message, ctx: Any) -> Message:
        # Tiny files: a blocking write is the simplest signal another process can see.
        Path(msg.meta["started"]).write_text(str(os.getpid()))  # noqa: ASYNC240
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            Path(msg.meta["mark"]).write_text(str(os.getpid()))  # noqa: ASYNC240
            raise
        return msg

    g, h = Node(gate, name="gate", policy=NONE), Node(hold, name="hold", policy=NONE)
    return create(g.to(h), h.to(), name="blocking")


def controller_message(query: str) -> Message:
    return message(WM(query=query, budget_hops=10))
