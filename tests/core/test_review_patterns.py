"""Patterns (spec §12): review regressions (ambiguous successor names, max_concurrency)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from penguiflow.core import create
from penguiflow.errors import FlowError
from penguiflow.node import Node, NodePolicy
from penguiflow.patterns import map_concurrent, predicate_router
from penguiflow.types import Headers, Message

TIMEOUT = 5.0


def _msg(payload: Any = None) -> Message:
    return Message(payload=payload, headers=Headers(tenant="acme"))


def _leaf(tag: str) -> Node:
    async def leaf(message: Message, ctx: Any) -> Message:
        return message.model_copy(update={"payload": tag})

    return Node(leaf, name="worker", policy=NodePolicy(validate="none"))


async def test_routing_to_a_name_two_successors_share_fails_the_invocation() -> None:
    first, second = _leaf("first"), _leaf("second")
    router = predicate_router("r", lambda m: "worker")
    flow = create(router.to(first, second), first.to(), second.to(), emit_errors_to_rookery=True)
    message = _msg("x")
    flow.run()
    try:
        await flow.emit(message)
        error = await asyncio.wait_for(flow.fetch(), TIMEOUT)
    finally:
        await flow.stop()
    # 2.1 silently sent every message to the first successor named 'worker'.
    assert isinstance(error, FlowError)
    assert (error.node_name, error.trace_id) == ("r", message.trace_id)
    assert error.exception_type == "LookupError"
    text = str(error.unwrap())
    assert text.startswith(
        "Ambiguous successor name 'worker': router 'r' has 2 successors named so"
    )
    assert first.node_id in text and second.node_id in text


async def test_routing_to_the_node_object_still_works_with_shared_names() -> None:
    first, second = _leaf("first"), _leaf("second")
    router = predicate_router("r", lambda m: second)
    flow = create(router.to(first, second), first.to(), second.to(), emit_errors_to_rookery=True)
    flow.run()
    try:
        await flow.emit(_msg("x"))
        result = await asyncio.wait_for(flow.fetch(), TIMEOUT)
    finally:
        await flow.stop()
    assert result.payload == "second"


@pytest.mark.parametrize("max_concurrency", [2.5, None, "4", True])
async def test_map_concurrent_refuses_a_max_concurrency_that_is_not_an_int(
    max_concurrency: Any,
) -> None:
    calls: list[int] = []

    async def worker(item: int) -> int:
        calls.append(item)
        return item

    consumed: list[int] = []

    def items() -> Any:
        for item in range(3):
            consumed.append(item)
            yield item

    # 2.1: "'float' object cannot be interpreted as an integer" / "'>' not supported
    # between instances of 'NoneType' and 'int'".
    with pytest.raises(TypeError, match=r"^map_concurrent: max_concurrency must be an int "):
        await map_concurrent(items(), worker, max_concurrency=max_concurrency)
    assert calls == [] and consumed == []  # refused up front


async def test_map_concurrent_int_like_values_still_work() -> None:
    class Width:
        def __index__(self) -> int:
            return 2

    async def double(item: int) -> int:
        return item * 2

    assert await map_concurrent(range(4), double, max_concurrency=0) == [0, 2, 4, 6]
    assert await map_concurrent(range(4), double, max_concurrency=Width()) == [0, 2, 4, 6]  # type: ignore[arg-type]
