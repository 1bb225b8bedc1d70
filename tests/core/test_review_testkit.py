"""FlowTestKit (spec §17): review regressions for run_one."""

from __future__ import annotations

import asyncio
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
