"""Misuse raises a PenguiFlow UsageError that is still the 2.1 builtin type, 2.1's text intact."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pfcore_support import msg, within
from pydantic import BaseModel

from penguiflow import Context, FlowError, ModelRegistry, Node, NodePolicy, create
from penguiflow.core import OPEN_SEA, CycleError
from penguiflow.errors import (
    ConfigurationError,
    ContextDetached,
    FlowAlreadyRunning,
    FlowNotRunning,
    InvalidArgument,
    InvalidArgumentType,
    InvalidTraceId,
    PenguiFlowError,
    UnknownTarget,
    UsageError,
)

NONE = NodePolicy(validate="none")


async def echo(message: Any, ctx: Any) -> Any:
    return message


def one_node(**kwargs: Any) -> Any:
    return create(Node(echo, name="echo", policy=NONE).to(), **kwargs)


def assert_usage(exc: BaseException, builtin: type[BaseException]) -> None:
    assert isinstance(exc, UsageError)
    assert isinstance(exc, PenguiFlowError)
    assert isinstance(exc, builtin)
    # Nothing is added to the 2.1 text: no notes (pytest's match= reads them too).
    assert not getattr(exc, "__notes__", None)


async def test_run_twice(start: Any) -> None:
    flow = start(one_node())
    with pytest.raises(FlowAlreadyRunning, match=r"^PenguiFlow already running$") as info:
        flow.run()
    assert_usage(info.value, RuntimeError)
    assert info.value.hint is not None and "stop()" in info.value.hint


async def test_cancel_emit_and_fetch_on_a_flow_that_is_not_running() -> None:
    flow = one_node()
    with pytest.raises(FlowNotRunning, match=r"^PenguiFlow is not running$") as info:
        await flow.cancel("t")
    assert_usage(info.value, RuntimeError)
    assert info.value.hint is not None and "run()" in info.value.hint
    flow.run()
    await flow.stop()
    with pytest.raises(FlowNotRunning, match=r"call run\(\) again") as info:
        await flow.emit(msg(1))
    assert_usage(info.value, RuntimeError)
    with pytest.raises(FlowNotRunning, match=r"call run\(\) first"):
        await flow.fetch()


async def test_a_fetch_pending_when_stop_runs_is_told_to_run_again() -> None:
    flow = one_node()
    flow.run()
    waiting = asyncio.ensure_future(flow.fetch())
    await within(flow.stop())
    # Waiting already (fail_waiters) or not yet started (stopped, Rookery empty):
    # either way it ends, and says what to do.
    with pytest.raises(FlowNotRunning, match=r"call run\(\) (again )?first"):
        await within(waiting)


async def test_registry_missing_a_validating_node() -> None:
    class Model(BaseModel):
        x: int

    flow = create(Node(echo, name="checked").to())
    with pytest.raises(ConfigurationError,
                       match=r"^ModelRegistry is missing entries for nodes requiring "
                             r"validation: checked$") as info:
        flow.run(registry=ModelRegistry())
    assert_usage(info.value, RuntimeError)
    assert info.value.hint is not None and "registry.register" in info.value.hint
    registry = ModelRegistry()
    registry.register("checked", Model, Model)
    flow.run(registry=registry)
    await flow.stop()


async def test_load_history_without_a_store() -> None:
    with pytest.raises(ConfigurationError,
                       match=r"^PenguiFlow was created without a state_store$") as info:
        await one_node().load_history("t")
    assert_usage(info.value, RuntimeError)
    assert info.value.hint is not None and "state_store=" in info.value.hint


async def test_a_detached_context_cannot_emit() -> None:
    ctx = Context(Node(echo, name="n", policy=NONE))
    with pytest.raises(ContextDetached,
                       match=r"^Context is not attached to a running flow$") as info:
        await ctx.emit(msg(1))
    assert_usage(info.value, RuntimeError)
    assert info.value.hint is not None and "Node.invoke" in info.value.hint


async def test_a_hand_built_context_with_the_flows_floe_feeds_the_flow(start: Any) -> None:
    # spec section 9: Context(owner, flow) wired by hand puts on the floes it was given;
    # here that is the flow's own a -> b floe, so b runs the message and it reaches fetch.
    a = Node(echo, name="a", policy=NONE)
    b = Node(echo, name="b", policy=NONE)
    flow = start(create(a.to(b), b.to()))
    ctx = Context(a, flow)
    ctx.add_outgoing_floe(flow.context(a)._outgoing[b])
    await within(ctx.emit(msg(1)))
    assert (await within(flow.fetch())).payload == 1
    with pytest.raises(ContextDetached) as info:  # only a detached context refuses
        await Context(a).emit(msg(2))
    assert info.value.hint is not None and "Node.invoke" in info.value.hint


async def test_what_a_hand_built_context_puts_belongs_to_its_trace(start: Any) -> None:
    # Counted like the flow's own puts: a cancel of the trace finds it in b and
    # stops it (before, the trace had nothing counted and the cancel found nothing).
    holding = asyncio.Event()

    async def hold(message: Any, ctx: Any) -> Any:
        holding.set()
        await asyncio.Event().wait()

    a = Node(echo, name="a", policy=NONE)
    b = Node(hold, name="b", policy=NONE)
    flow = start(create(a.to(b), b.to()))
    ctx = Context(a, flow)
    ctx.add_outgoing_floe(flow.context(a)._outgoing[b])
    message = msg(1)
    await within(ctx.emit(message))
    await within(holding.wait())
    assert await within(flow.cancel(message.trace_id))


async def test_fetch_from_a_context_without_inputs(start: Any) -> None:
    flow = start(one_node())
    with pytest.raises(ConfigurationError,
                       match=r"^context has no incoming floes to fetch from$") as info:
        await flow.context(OPEN_SEA).fetch()
    assert_usage(info.value, RuntimeError)
    assert info.value.hint is not None and "flow.fetch()" in info.value.hint


async def test_emit_to_a_node_that_is_not_an_ingress(start: Any) -> None:
    a = Node(echo, name="a", policy=NONE)
    b = Node(echo, name="b", policy=NONE)
    flow = start(create(a.to(b), b.to()))
    with pytest.raises(UnknownTarget, match=r"Unknown target b for OpenSea") as info:
        await flow.emit(msg(1), to=b)
    assert_usage(info.value, KeyError)
    assert info.value.args == ("Unknown target b for OpenSea",)
    assert info.value.hint is not None and "known ones are: a" in info.value.hint


async def test_inside_a_node_an_unknown_target_stays_the_2_1_key_error(start: Any) -> None:
    # Raised in the node's attempt, the type is what its FlowError reports (spec §8).
    async def stray(message: Any, ctx: Any) -> Any:
        await ctx.emit(message, to=Node(echo, name="elsewhere", policy=NONE))

    flow = start(create(Node(stray, name="stray", policy=NONE).to(),
                        emit_errors_to_rookery=True))
    await flow.emit(msg(1))
    err = await within(flow.fetch())
    assert isinstance(err, FlowError)
    assert err.exception_type == "KeyError"
    assert type(err.unwrap()) is KeyError


async def test_invalid_trace_id(start: Any) -> None:
    flow = start(one_node())
    with pytest.raises(InvalidTraceId, match="invalid trace_id") as info:
        await flow.emit(msg(1, trace_id="bad\nid"))
    assert isinstance(info.value, InvalidArgument)
    assert_usage(info.value, ValueError)


def test_cycle() -> None:
    a = Node(echo, name="a", policy=NONE)
    b = Node(echo, name="b", policy=NONE)
    with pytest.raises(CycleError,
                       match=r"^Flow contains a cycle; enable allow_cycles to bypass$") as info:
        create(a.to(b), b.to(a))
    assert_usage(info.value, RuntimeError)
    assert info.value.nodes == ("a", "b")
    assert info.value.hint is not None and "a, b" in info.value.hint


def test_node_definitions() -> None:
    with pytest.raises(InvalidArgumentType,
                       match=r"^Node function must be declared with async def$") as info:
        Node(lambda m, c: m)  # type: ignore[arg-type,return-value]
    assert_usage(info.value, TypeError)
    assert info.value.hint is not None and "async def" in info.value.hint

    async def one(message: Any) -> Any:
        return message

    with pytest.raises(InvalidArgument, match=r"exactly two parameters \(message, ctx\); got 1"):
        Node(one)  # type: ignore[arg-type]

    async def keyword_ctx(message: Any, *, ctx: Any) -> Any:
        return message

    with pytest.raises(InvalidArgument, match=r"^Context parameter must be positional$") as info:
        Node(keyword_ctx)
    assert_usage(info.value, ValueError)
    with pytest.raises(InvalidArgument,
                       match=r"^validate must be one of 'both', 'in', 'out', 'none'$"):
        NodePolicy(validate="sometimes")
    with pytest.raises(InvalidArgumentType, match=r"did you mean a.to\(\)\?"):
        create(Node(echo, name="a"))  # type: ignore[arg-type]
