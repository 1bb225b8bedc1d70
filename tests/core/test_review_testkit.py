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
    delivered = asyncio.Event()

    async def answer(message: Message, ctx: Any) -> None:
        await ctx.emit(message.model_copy(update={"payload": f"answer to {message.payload}"}))
        delivered.set()

    flow = create(Node(answer, name="answer", policy=NodePolicy(validate="none")).to())
    earlier = _msg("earlier")
    flow.run()
    try:
        await flow.emit(earlier)
        await asyncio.wait_for(delivered.wait(), TIMEOUT)  # its answer is in Rookery
    finally:
        await flow.stop()
    message = _msg("mine")
    with caplog.at_level(logging.WARNING, logger="penguiflow.testkit"):
        result = await run_one(flow, message, timeout_s=TIMEOUT)
    # 2.1 returned "answer to earlier" (the leftover of another trace).
    assert result.payload == "answer to mine"
    assert result.trace_id == message.trace_id
    assert not flow.running
    (record,) = [r for r in caplog.records if r.name == "penguiflow.testkit"]
    assert record.levelno == logging.WARNING
    assert "run_one skipped 1 Rookery item(s) of other traces" in record.getMessage()
    assert repr(earlier.trace_id) in record.getMessage()


async def test_run_one_times_out_when_only_other_traces_arrive() -> None:
    async def answer(message: Message, ctx: Any) -> None:
        await ctx.emit(message.model_copy(update={"trace_id": "someone-else"}))

    flow = create(Node(answer, name="answer", policy=NodePolicy(validate="none")).to())
    with pytest.raises(TimeoutError):
        await run_one(flow, _msg("mine"), timeout_s=0.2)
    assert not flow.running
