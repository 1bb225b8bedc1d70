"""§4 Node and NodePolicy."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from penguiflow import Context, ModelRegistry, Node, NodePolicy
from penguiflow import node as pf_node


class In(BaseModel):
    x: int


class Out(BaseModel):
    y: int


async def double(message: Any, ctx: Any) -> Any:
    return {"y": message.x * 2}


def test_node_module_exposes_the_same_classes() -> None:
    assert pf_node.Node is Node
    assert pf_node.NodePolicy is NodePolicy


# --- NodePolicy ---------------------------------------------------------------


def test_policy_defaults() -> None:
    p = NodePolicy()
    assert p.validate == "both"
    assert p.timeout_s is None
    assert p.max_retries == 0
    assert p.backoff_base == 0.5
    assert p.backoff_mult == 2.0
    assert p.max_backoff is None


def test_policy_is_a_slots_dataclass() -> None:
    assert dataclasses.is_dataclass(NodePolicy)
    assert hasattr(NodePolicy, "__slots__")
    assert [f.name for f in dataclasses.fields(NodePolicy)] == [
        "validate",
        "timeout_s",
        "max_retries",
        "backoff_base",
        "backoff_mult",
        "max_backoff",
    ]
    p = NodePolicy(
        validate="in",
        timeout_s=1.5,
        max_retries=3,
        backoff_base=0.1,
        backoff_mult=3.0,
        max_backoff=2.0,
    )
    assert (p.validate, p.timeout_s, p.max_retries) == ("in", 1.5, 3)
    assert (p.backoff_base, p.backoff_mult, p.max_backoff) == (0.1, 3.0, 2.0)


@pytest.mark.parametrize("mode", ["both", "in", "out", "none"])
def test_policy_accepts_every_validate_mode(mode: str) -> None:
    assert NodePolicy(validate=mode).validate == mode


@pytest.mark.parametrize("mode", ["all", "", "BOTH", "output"])
def test_policy_rejects_unknown_validate_mode(mode: str) -> None:
    with pytest.raises(ValueError) as info:
        NodePolicy(validate=mode)
    assert str(info.value) == "validate must be one of 'both', 'in', 'out', 'none'"


# --- Node construction ----------------------------------------------------------


def test_lambda_is_rejected() -> None:
    with pytest.raises(TypeError) as info:
        Node(lambda m, c: m)  # type: ignore[arg-type]
    assert str(info.value) == "Node function must be declared with async def"


def test_plain_function_is_rejected_before_the_arity_check() -> None:
    def sync(a: Any, b: Any, c: Any) -> Any:
        return a

    with pytest.raises(TypeError) as info:
        Node(sync)  # type: ignore[arg-type]
    assert str(info.value) == "Node function must be declared with async def"


def test_async_generator_is_rejected() -> None:
    async def agen(message: Any, ctx: Any) -> Any:
        yield message

    with pytest.raises(TypeError) as info:
        Node(agen)  # type: ignore[arg-type]
    assert str(info.value) == "Node function must be declared with async def"


def test_name_defaults_to_function_name() -> None:
    node = Node(double)
    assert node.name == "double"
    assert Node(double, name="twice").name == "twice"


async def _zero() -> None:
    return None


async def _one(message: Any) -> None:
    return None


async def _three(message: Any, ctx: Any, extra: Any) -> None:
    return None


@pytest.mark.parametrize(("func", "count"), [(_zero, 0), (_one, 1), (_three, 3)])
def test_wrong_parameter_count(func: Any, count: int) -> None:
    with pytest.raises(ValueError) as info:
        Node(func)
    assert str(info.value) == (
        f"Node '{func.__name__}' must accept exactly two parameters (message, ctx); got {count}"
    )


def test_wrong_parameter_count_uses_explicit_name() -> None:
    with pytest.raises(ValueError) as info:
        Node(_one, name="custom")
    assert str(info.value) == (
        "Node 'custom' must accept exactly two parameters (message, ctx); got 1"
    )


def test_keyword_only_context_is_rejected() -> None:
    async def kwonly(message: Any, *, ctx: Any) -> None:
        return None

    with pytest.raises(ValueError) as info:
        Node(kwonly)
    assert str(info.value) == "Context parameter must be positional"


def test_var_positional_context_is_rejected() -> None:
    async def varargs(message: Any, *ctx: Any) -> None:
        return None

    with pytest.raises(ValueError) as info:
        Node(varargs)
    assert str(info.value) == "Context parameter must be positional"


def test_positional_only_parameters_are_accepted() -> None:
    async def posonly(message: Any, ctx: Any, /) -> Any:
        return message

    assert Node(posonly).name == "posonly"


def test_node_id_is_fresh_hex_and_not_an_init_argument() -> None:
    a = Node(double)
    b = Node(double)
    assert re.fullmatch(r"[0-9a-f]{32}", a.node_id)
    assert a.node_id != b.node_id
    with pytest.raises(TypeError):
        Node(double, node_id="fixed")  # type: ignore[call-arg]


def test_node_defaults_and_dataclass_shape() -> None:
    node = Node(double)
    assert dataclasses.is_dataclass(Node)
    assert hasattr(Node, "__slots__")
    assert node.func is double
    assert node.allow_cycle is False
    assert isinstance(node.policy, NodePolicy)
    assert node.policy == NodePolicy()
    policy = NodePolicy(max_retries=2)
    custom = Node(double, name="d", policy=policy, allow_cycle=True)
    assert custom.policy is policy
    assert custom.allow_cycle is True


def test_hash_and_equality() -> None:
    a = Node(double)
    b = Node(double)
    assert hash(a) == hash(a.node_id)
    assert a == a
    assert a != b
    assert len({a, b, a}) == 2


def test_to_returns_adjacency_entry() -> None:
    a, b, c = Node(double, name="a"), Node(double, name="b"), Node(double, name="c")
    assert a.to(b, c) == (a, (b, c))
    src, succ = a.to()
    assert src is a
    assert tuple(succ) == ()


# --- Node.invoke -------------------------------------------------------------------


def _registry() -> ModelRegistry:
    reg = ModelRegistry()
    reg.register("double", In, Out)
    return reg


async def test_invoke_without_registry_passes_object_through() -> None:
    seen: list[Any] = []

    async def echo(message: Any, ctx: Any) -> Any:
        seen.append(message)
        return {"raw": True}

    node = Node(echo)
    assert await node.invoke({"x": 1}, object(), registry=None) == {"raw": True}
    assert seen == [{"x": 1}]


async def test_invoke_validates_input_and_output_with_both() -> None:
    received: list[Any] = []

    async def double(message: Any, ctx: Any) -> Any:
        received.append(message)
        return {"y": message.x * 2}

    node = Node(double)
    result = await node.invoke({"x": "3"}, object(), registry=_registry())
    assert isinstance(received[0], In)
    assert received[0].x == 3
    assert isinstance(result, Out)
    assert result.y == 6


async def test_invoke_none_result_skips_output_validation() -> None:
    async def double(message: Any, ctx: Any) -> Any:
        return None

    assert await Node(double).invoke({"x": 1}, object(), registry=_registry()) is None


async def test_invoke_in_only_does_not_validate_output() -> None:
    async def double(message: Any, ctx: Any) -> Any:
        assert isinstance(message, In)
        return {"not": "an Out"}

    node = Node(double, policy=NodePolicy(validate="in"))
    assert await node.invoke({"x": 1}, object(), registry=_registry()) == {"not": "an Out"}


async def test_invoke_out_only_does_not_validate_input() -> None:
    received: list[Any] = []

    async def double(message: Any, ctx: Any) -> Any:
        received.append(message)
        return {"y": "5"}

    node = Node(double, policy=NodePolicy(validate="out"))
    result = await node.invoke({"anything": True}, object(), registry=_registry())
    assert received == [{"anything": True}]
    assert result == Out(y=5)


async def test_invoke_none_mode_never_consults_registry() -> None:
    async def unregistered(message: Any, ctx: Any) -> Any:
        return message

    node = Node(unregistered, policy=NodePolicy(validate="none"))
    assert await node.invoke({"x": "a"}, object(), registry=ModelRegistry()) == {"x": "a"}


async def test_invoke_invalid_input_raises_validation_error() -> None:
    called: list[Any] = []

    async def double(message: Any, ctx: Any) -> Any:
        called.append(message)
        return {"y": 1}

    with pytest.raises(ValidationError) as info:
        await Node(double).invoke({"x": "not-int"}, object(), registry=_registry())
    assert isinstance(info.value, ValueError)
    assert called == []


async def test_invoke_invalid_output_raises_validation_error() -> None:
    async def double(message: Any, ctx: Any) -> Any:
        return {"y": "nope"}

    with pytest.raises(ValidationError):
        await Node(double).invoke({"x": 1}, object(), registry=_registry())


async def test_invoke_with_unregistered_node_raises_key_error() -> None:
    async def stranger(message: Any, ctx: Any) -> Any:
        return message

    with pytest.raises(KeyError) as info:
        await Node(stranger).invoke({"x": 1}, object(), registry=ModelRegistry())
    assert info.value.args[0] == "Node 'stranger' not registered"


async def test_invoke_accepts_detached_context() -> None:
    seen: list[Any] = []

    async def peek(message: Any, ctx: Any) -> Any:
        seen.append(ctx)
        return message

    node = Node(peek)
    ctx = Context(node)
    assert await node.invoke("hello", ctx, registry=None) == "hello"
    assert seen[0] is ctx
    assert ctx.runtime is None


async def test_invoke_propagates_node_exceptions() -> None:
    async def broken(message: Any, ctx: Any) -> Any:
        raise LookupError("missing")

    with pytest.raises(LookupError, match="missing"):
        await Node(broken).invoke(1, object(), registry=None)


@pytest.mark.parametrize(
    ("field", "value"),
    [("timeout_s", -1.0), ("backoff_base", -0.1), ("max_backoff", -2.0), ("max_retries", -1),
     # NaN (a config value read as "nan") compares False to everything: a NaN timeout
     # timed every attempt out at once, a NaN cap removed the cap.
     ("timeout_s", float("nan")), ("backoff_base", float("nan")),
     ("max_backoff", float("nan")), ("backoff_mult", float("nan")), ("backoff_mult", -2.0)],
)
def test_negative_policy_values_are_rejected(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"NodePolicy.{field} must be >= 0"):
        NodePolicy(**{field: value})


def test_backoff_is_capped_even_where_the_power_overflows_a_float() -> None:
    # A policy retrying "for ever, at most 30 s apart": 2.0 ** 1024 overflows.
    policy = NodePolicy(max_retries=10_000, max_backoff=30.0)
    assert policy.backoff_for(3) == 2.0
    assert policy.backoff_for(1_100) == 30.0
    assert NodePolicy(max_retries=10_000).backoff_for(1_100) == float("inf")  # no cap
    # No backoff at all stays none, however far the power would go.
    assert NodePolicy(max_retries=10_000, backoff_base=0.0).backoff_for(1_100) == 0.0
