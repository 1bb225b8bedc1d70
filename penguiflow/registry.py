"""ModelRegistry: per-node input/output models with cached TypeAdapters."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, TypeAdapter

__all__ = ["ModelRegistry"]


class ModelRegistry:
    """Maps node names to ``(in, out)`` pydantic ``TypeAdapter`` pairs.

    Adapters are built once at registration, so validation on the hot path
    costs only the validation itself.
    """

    __slots__ = ("_adapters", "_models")

    def __init__(self) -> None:
        self._adapters: dict[str, tuple[TypeAdapter[Any], TypeAdapter[Any]]] = {}
        self._models: list[type[BaseModel]] = []

    def register(
        self, node_name: str, in_model: type[BaseModel], out_model: type[BaseModel]
    ) -> None:
        """Register the models of ``node_name``.

        Raises:
            TypeError: a model is not a pydantic ``BaseModel`` subclass.
            ValueError: ``node_name`` is already registered.
        """
        for role, model in (("in_model", in_model), ("out_model", out_model)):
            if not (isinstance(model, type) and issubclass(model, BaseModel)):
                raise TypeError(
                    f"{role} for node '{node_name}' must be a pydantic BaseModel subclass, "
                    f"got {model!r}"
                )
        if node_name in self._adapters:
            raise ValueError(f"Node '{node_name}' already registered")
        self._adapters[node_name] = (TypeAdapter(in_model), TypeAdapter(out_model))
        self._models += (in_model, out_model)

    def adapters(self, node_name: str) -> tuple[TypeAdapter[Any], TypeAdapter[Any]]:
        """Return ``(in_adapter, out_adapter)``; ``KeyError`` if unknown."""
        try:
            return self._adapters[node_name]
        except KeyError:
            raise KeyError(f"Node '{node_name}' not registered") from None

    def __contains__(self, node_name: object) -> bool:
        return node_name in self._adapters

    def names(self) -> frozenset[str]:
        """The registered node names."""
        return frozenset(self._adapters)

    def models(self) -> tuple[type[BaseModel], ...]:
        """Every registered model class, in and out, once each (PenguiFlow addition:
        a flow bound to a delivering bus rebuilds payloads of these types by name)."""
        return tuple(dict.fromkeys(self._models))
