"""§5 ModelRegistry."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, TypeAdapter, ValidationError

from penguiflow import ModelRegistry
from penguiflow import registry as pf_registry


class In(BaseModel):
    x: int


class Out(BaseModel):
    y: str


def test_registry_module_exposes_the_same_class() -> None:
    assert pf_registry.ModelRegistry is ModelRegistry


def test_adapters_returns_in_and_out_type_adapters() -> None:
    reg = ModelRegistry()
    reg.register("n", In, Out)
    in_adapter, out_adapter = reg.adapters("n")
    assert isinstance(in_adapter, TypeAdapter)
    assert isinstance(out_adapter, TypeAdapter)
    assert in_adapter.validate_python({"x": "4"}) == In(x=4)
    assert out_adapter.validate_python({"y": "a"}) == Out(y="a")
    with pytest.raises(ValidationError):
        in_adapter.validate_python({"x": "four"})


def test_several_nodes_can_share_models() -> None:
    reg = ModelRegistry()
    reg.register("a", In, Out)
    reg.register("b", Out, In)
    assert reg.adapters("b")[0].validate_python({"y": "z"}) == Out(y="z")


def test_duplicate_registration_is_rejected() -> None:
    reg = ModelRegistry()
    reg.register("n", In, Out)
    with pytest.raises(ValueError) as info:
        reg.register("n", In, Out)
    assert str(info.value) == "Node 'n' already registered"


@pytest.mark.parametrize(
    ("in_model", "out_model"),
    [(dict, Out), (In, dict), (In(x=1), Out), (In, int), ("In", Out)],
)
def test_non_basemodel_models_are_rejected(in_model: object, out_model: object) -> None:
    reg = ModelRegistry()
    with pytest.raises(TypeError):
        reg.register("n", in_model, out_model)  # type: ignore[arg-type]
    # The failed registration left nothing behind.
    with pytest.raises(KeyError):
        reg.adapters("n")


def test_unknown_node_raises_key_error() -> None:
    reg = ModelRegistry()
    with pytest.raises(KeyError) as info:
        reg.adapters("ghost")
    assert info.value.args[0] == "Node 'ghost' not registered"
