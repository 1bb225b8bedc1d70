"""fetch_traced: a result names its trace even when a node returns a plain value.

A server running many requests through one flow (the A2A adapter) must answer each
request with its own result; nodes commonly return plain dicts, which carry no
trace id, and results arrive in any order.
"""

from __future__ import annotations

import asyncio
from typing import Any

from pfcore_support import msg, within

from penguiflow import Message, Node, NodePolicy, create
from penguiflow.errors import FlowError


async def test_plain_results_of_concurrent_traces_come_back_with_their_trace(start: Any) -> None:
    release: dict[str, asyncio.Event] = {}

    async def work(message: Message, ctx: Any) -> dict[str, Any]:
        await release[message.payload].wait()
        return {"answer": message.payload}  # no trace id of its own

    node = Node(work, name="work", policy=NodePolicy(validate="none"))
    flow = start(create(node.to(), queue_maxsize=0))
    messages = [msg(f"p{i}") for i in range(5)]
    for m in messages:
        release[m.payload] = asyncio.Event()
    # One worker, so release them in reverse order of emission, one at a time.
    for m in messages:
        await flow.emit(m)
    seen: dict[str, Any] = {}
    for m in reversed(messages):
        release[m.payload].set()
    for _ in messages:
        trace_id, item = await within(flow.fetch_traced())
        seen[trace_id] = item
    assert seen == {m.trace_id: {"answer": m.payload} for m in messages}


async def test_messages_errors_and_unobserved_flows_carry_their_own_trace(start: Any) -> None:
    async def boom(message: Message, ctx: Any) -> Message:
        if message.payload == "fail":
            raise ValueError("no")
        return message

    node = Node(boom, name="boom", policy=NodePolicy(validate="none"))
    flow = start(create(node.to(), emit_errors_to_rookery=True))
    ok, bad = msg("ok"), msg("fail")
    await flow.emit(ok)
    trace_id, item = await within(flow.fetch_traced())
    assert (trace_id, item.payload) == (ok.trace_id, "ok")
    await flow.emit(bad)
    trace_id, item = await within(flow.fetch_traced())
    assert isinstance(item, FlowError) and trace_id == bad.trace_id


async def test_a_value_put_in_by_hand_has_no_trace(start: Any) -> None:
    async def echo(value: Any, ctx: Any) -> Any:
        return value

    node = Node(echo, name="echo", policy=NodePolicy(validate="none"))
    flow = start(create(node.to()))
    await flow.emit({"plain": 1})  # neither the item nor its input has a trace id
    assert await within(flow.fetch_traced()) == (None, {"plain": 1})
