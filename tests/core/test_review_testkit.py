"""FlowTestKit (spec §17): review regressions for run_one."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from penguiflow.core import create
from penguiflow.errors import FlowAlreadyRunning
from penguiflow.node import Node, NodePolicy
from penguiflow.testkit import run_one
from penguiflow.types import Headers, Message

TIMEOUT = 5.0


def _msg(payload: Any = None) -> Message:
    return Message(payload=payload, headers=Headers(tenant="acme"))


async def test_run_one_refuses_a_running_flow_and_leaves_it_running() -> None:
    async def echo(message: Message, ctx: Any) -> Message:
        return message.model_copy(update={"payload": f"echo {message.payload}"})

    flow = create(Node(echo, name="echo", policy=NodePolicy(validate="none")).to())
    flow.run()
    try:
        with pytest.raises(FlowAlreadyRunning, match=r"^PenguiFlow already running$"):
            await run_one(flow, _msg("refused"))
        # 2.1 stopped the caller's flow on the way out of the refused call.
        assert flow.running
        await flow.emit(_msg("still served"))
        result = await asyncio.wait_for(flow.fetch(), TIMEOUT)
        assert result.payload == "echo still served"
    finally:
        await flow.stop()


async def test_run_one_does_not_return_a_result_an_earlier_run_left_behind(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Two egress nodes: the first run returns a's answer, b's stays in Rookery
    # through stop(); 2.1 returned it to the next run ("b saw TEST-1").
    b_done = asyncio.Event()

    async def a(message: Message, ctx: Any) -> Message:
        await b_done.wait()  # b answers first: its answer is there before a's
        return message.model_copy(update={"payload": f"a saw {message.payload}"})

    async def b(message: Message, ctx: Any) -> Message:
        b_done.set()
        return message.model_copy(update={"payload": f"b saw {message.payload}"})

    na = Node(a, name="a", policy=NodePolicy(validate="none"))
    nb = Node(b, name="b", policy=NodePolicy(validate="none"))
    flow = create(na.to(), nb.to())
    first = _msg("TEST-1")
    assert (await run_one(flow, first, timeout_s=TIMEOUT)).payload == "b saw TEST-1"
    b_done.clear()
    message = _msg("TEST-2")
    with caplog.at_level(logging.WARNING, logger="penguiflow.testkit"):
        result = await run_one(flow, message, timeout_s=TIMEOUT)
    assert result.payload == "b saw TEST-2"
    assert result.trace_id == message.trace_id
    assert not flow.running
    (record,) = [r for r in caplog.records if r.name == "penguiflow.testkit"]
    assert record.levelno == logging.WARNING
    assert "run_one skipped 1 Rookery item(s) of other traces" in record.getMessage()
    assert repr(first.trace_id) in record.getMessage()


async def test_run_one_returns_a_new_message_a_node_answers_with() -> None:
    # A node may answer with a new Message (a fresh default trace id): valid 2.1
    # code whose answer a first version of the leftover filter dropped (a timeout).
    async def answer(message: Message, ctx: Any) -> Message:
        return Message(payload=42, headers=message.headers)

    flow = create(Node(answer, name="answer", policy=NodePolicy(validate="none")).to())
    await run_one(flow, _msg("earlier"), timeout_s=TIMEOUT)  # an earlier run, finished
    result = await run_one(flow, _msg("mine"), timeout_s=TIMEOUT)
    assert result.payload == 42
    assert not flow.running
