"""Node and NodePolicy: a typed async function plus its reliability policy."""

from __future__ import annotations

import inspect
import math
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import InvalidArgument, InvalidArgumentType

if TYPE_CHECKING:
    from .registry import ModelRegistry

__all__ = ["Node", "NodeFunc", "NodePolicy"]

NodeFunc = Callable[[Any, Any], Awaitable[Any]]

_VALIDATE_MODES = ("both", "in", "out", "none")
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


@dataclass(slots=True)
class NodePolicy:
    """How a node is validated, timed out and retried.

    Attributes:
        validate: ``"both"``, ``"in"``, ``"out"`` or ``"none"``: which side of the
            node is validated against its registry models.
        timeout_s: per-attempt timeout in seconds (None: no timeout).
        max_retries: retries after the first attempt (total attempts = max_retries + 1).
        backoff_base: sleep before the first retry, in seconds.
        backoff_mult: multiplier of the sleep for each further retry.
        max_backoff: cap on the sleep, in seconds (None: no cap).
    """

    validate: str = "both"
    timeout_s: float | None = None
    max_retries: int = 0
    backoff_base: float = 0.5
    backoff_mult: float = 2.0
    max_backoff: float | None = None

    def __post_init__(self) -> None:
        if self.validate not in _VALIDATE_MODES:
            raise InvalidArgument("validate must be one of 'both', 'in', 'out', 'none'",
                                  hint=f"NodePolicy(validate=...) got {self.validate!r}")
        for name in ("timeout_s", "backoff_base", "max_backoff"):
            value = getattr(self, name)
            # ``not >= 0`` also refuses NaN (a config value read as "nan"), which
            # ``< 0`` lets through: a NaN timeout timed out every attempt at once, a
            # NaN cap removed the cap.
            if value is not None and not value >= 0:
                raise InvalidArgument(
                    f"NodePolicy.{name} must be >= 0 (or None); got {value!r}")
        if not self.backoff_mult >= 0:  # NaN too: its sleep never ended
            raise InvalidArgument(
                f"NodePolicy.backoff_mult must be >= 0; got {self.backoff_mult!r}")
        if self.max_retries < 0:
            raise InvalidArgument(
                f"NodePolicy.max_retries must be >= 0; got {self.max_retries!r}")

    def backoff_for(self, attempt: int) -> float:
        """Seconds to sleep before ``attempt`` (1-based retry number): ``backoff_base *
        backoff_mult ** (attempt - 1)``, at most ``max_backoff``. Never raises: a
        power too large for a float is infinite (so the cap, when there is one)."""
        try:
            delay = self.backoff_base * self.backoff_mult ** (attempt - 1)
        except OverflowError:  # 2.0 ** 1024: a policy retrying for ever, capped
            delay = math.inf if self.backoff_base else 0.0
        if self.max_backoff is not None:
            delay = min(delay, self.max_backoff)
        return delay


def _is_async_callable(func: object) -> bool:
    if inspect.iscoroutinefunction(func):
        return True
    # Callable objects whose __call__ is ``async def`` behave like coroutine functions.
    call = getattr(func, "__call__", None)  # noqa: B004 - we need the bound method itself
    return not inspect.isfunction(func) and inspect.iscoroutinefunction(call)


@dataclass(slots=True)
class Node:
    """A unit of work: ``async def func(message, ctx)`` with a name and a policy.

    Raises:
        InvalidArgumentType: (a ``TypeError``) ``func`` is not an ``async def``
            function.
        InvalidArgument: (a ``ValueError``) ``func`` does not take exactly two
            parameters, or its second (context) parameter is keyword-only.
    """

    func: NodeFunc
    name: str | None = None
    policy: NodePolicy = field(default_factory=NodePolicy)
    allow_cycle: bool = False
    node_id: str = field(init=False)

    def __post_init__(self) -> None:
        func = self.func
        # The messages below are the 2.1 contract, word for word: suites match
        # them exactly, so the node is named only where 2.1 names it.
        if not _is_async_callable(func):
            raise InvalidArgumentType(
                "Node function must be declared with async def",
                hint=f"got {func!r}; write `async def name(message, ctx): ...` (a lambda "
                     "or a plain def cannot be a node)")
        if self.name is None:
            self.name = getattr(func, "__name__", None) or type(func).__name__
        params = list(inspect.signature(func).parameters.values())
        if len(params) != 2:
            raise InvalidArgument(
                f"Node '{self.name}' must accept exactly two parameters (message, ctx); "
                f"got {len(params)}"
            )
        if params[1].kind not in _POSITIONAL:
            raise InvalidArgument(
                "Context parameter must be positional",
                hint=f"node '{self.name}': declare it as `async def f(message, ctx)`, "
                     "not after a `*` (keyword-only)")
        self.node_id = uuid.uuid4().hex

    def __hash__(self) -> int:
        return hash(self.node_id)

    def to(self, *nodes: Node) -> tuple[Node, tuple[Node, ...]]:
        """Return ``(self, nodes)``: an adjacency entry for :func:`penguiflow.create`."""
        return self, nodes

    async def invoke(self, message: Any, ctx: Any, *, registry: ModelRegistry | None) -> Any:
        """Run the node on ``message``, validating per ``policy.validate``.

        With a registry and ``validate != "none"`` the whole incoming object is
        validated (and coerced) by the node's in-model before ``func`` sees it,
        and a non-None result by its out-model. ``ctx`` is passed through
        untouched.

        Raises:
            KeyError: the registry has no entry for this node.
            pydantic.ValidationError: the input or output failed validation.
        """
        validate = self.policy.validate
        if registry is None or validate == "none":
            return await self.func(message, ctx)
        in_adapter, out_adapter = registry.adapters(self.name or self.node_id)
        if validate != "out":
            message = in_adapter.validate_python(message)
        result = await self.func(message, ctx)
        if result is None or validate == "in":
            return result
        return out_adapter.validate_python(result)
