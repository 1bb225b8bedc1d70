"""Routing policies: let configuration, not code, decide where a router sends a message.

A router node (see :mod:`penguiflow.patterns`) first computes the successors it would pick
on its own, then hands a :class:`RoutingRequest` to a policy, whose decision replaces the
proposal. A policy is either an object with a ``select(request)`` method
(:class:`RoutingPolicy`) or a plain callable taking the request (:data:`PolicyCallable`);
both may be sync or async. :func:`evaluate_policy` is the single place that tells the two
forms apart and awaits the result.

A decision (:data:`RoutingDecisionType`) is ``None`` (drop the message), a successor
:class:`~penguiflow.node.Node`, a successor name, or a sequence of those.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from penguiflow.errors import InvalidArgumentType
from penguiflow.node import Node

if TYPE_CHECKING:
    from penguiflow.core import Context

__all__ = [
    "DictRoutingPolicy",
    "PolicyCallable",
    "PolicyLike",
    "RoutingDecisionType",
    "RoutingPolicy",
    "RoutingRequest",
    "evaluate_policy",
]

RoutingDecisionType = Node | str | Sequence[Node | str] | None
"""What a policy may return: ``None`` drops the message; otherwise the chosen successor(s),
as Nodes or node names."""


@dataclass(slots=True)
class RoutingRequest:
    """Everything a policy may look at to pick the successors of one message."""

    message: Any
    """The object being routed (for ``union_router``, the validated object)."""
    context: Context
    """The router node's context."""
    node: Node
    """The router node itself."""
    proposed: tuple[Node, ...]
    """The successors the router picked on its own, in order."""
    trace_id: str | None
    """The message's ``trace_id`` attribute, or ``None`` when it has none."""

    @property
    def node_name(self) -> str:
        """The router's name, or its ``node_id`` when it is nameless."""
        return self.node.name or self.node.node_id

    @property
    def proposed_names(self) -> tuple[str, ...]:
        """Names (``node_id`` for nameless nodes) of the proposed successors, in order."""
        return tuple(node.name or node.node_id for node in self.proposed)


@runtime_checkable
class RoutingPolicy(Protocol):
    """An object that picks successors; any object with a ``select`` attribute qualifies."""

    def select(
        self, request: RoutingRequest
    ) -> RoutingDecisionType | Awaitable[RoutingDecisionType]:
        """Return the routing decision for ``request`` (or an awaitable of it)."""
        ...


PolicyCallable = Callable[[RoutingRequest], RoutingDecisionType | Awaitable[RoutingDecisionType]]
"""A plain (sync or async) callable used as a policy."""

PolicyLike = RoutingPolicy | PolicyCallable
"""Either form of policy accepted by the routers."""


async def evaluate_policy(policy: PolicyLike, request: RoutingRequest) -> RoutingDecisionType:
    """Evaluate ``policy`` against ``request``.

    Args:
        policy: An object with a ``select`` attribute (preferred when present) or a
            callable taking the request. Either may return an awaitable.
        request: The routing request.

    Returns:
        The decision, awaited if the policy returned an awaitable. It is not normalised:
        resolving names to successors is the router's job.

    Raises:
        TypeError: If ``policy`` has no callable ``select`` and is not callable itself.
    """
    select = getattr(policy, "select", None)
    if select is None:
        select = policy
    if not callable(select):
        # Builtin TypeError: evaluated in a router's attempt, whose FlowError
        # reports the type.
        raise TypeError(
            f"Routing policy must be callable or have a select() method; got {policy!r}"
        )
    decision = select(request)
    if inspect.isawaitable(decision):
        decision = await decision
    result: RoutingDecisionType = decision
    return result


def _trace_key(request: RoutingRequest) -> str | None:
    return request.trace_id


class DictRoutingPolicy:
    """A policy that looks the decision up in a mapping.

    The key is ``key_getter(request)`` (by default the request's ``trace_id``). A ``None``
    key, or a key absent from the mapping, yields ``default``. Decisions are returned as
    stored, so mapping values are node names (or lists of names) when loaded from JSON.
    """

    __slots__ = ("_default", "_key_getter", "_mapping")

    def __init__(
        self,
        mapping: Mapping[str, RoutingDecisionType],
        *,
        default: RoutingDecisionType = None,
        key_getter: Callable[[RoutingRequest], str | None] | None = None,
    ) -> None:
        """Build the policy.

        Args:
            mapping: Key -> decision. Copied, so later changes to it are not seen.
            default: Decision for missing or ``None`` keys; ``None`` drops the message.
            key_getter: Computes the lookup key from a request; defaults to its trace id.
        """
        self._mapping: dict[str, RoutingDecisionType] = dict(mapping)
        self._default = default
        self._key_getter = key_getter if key_getter is not None else _trace_key

    def select(self, request: RoutingRequest) -> RoutingDecisionType:
        """Return the decision stored for ``request``'s key, else the default."""
        key = self._key_getter(request)
        if key is None:
            return self._default
        return self._mapping.get(key, self._default)

    def update_mapping(self, mapping: Mapping[str, RoutingDecisionType]) -> None:
        """Merge ``mapping`` into the stored one (its entries win, like ``dict.update``)."""
        self._mapping.update(mapping)

    def set_default(self, decision: RoutingDecisionType) -> None:
        """Replace the decision used for missing or ``None`` keys."""
        self._default = decision

    @classmethod
    def from_json(cls, payload: str | bytes | bytearray, **kwargs: Any) -> DictRoutingPolicy:
        """Build a policy from a JSON object of key -> decision.

        Args:
            payload: JSON text whose top level must be an object.
            **kwargs: Passed on to the constructor (``default``, ``key_getter``).

        Raises:
            json.JSONDecodeError: If ``payload`` is not valid JSON.
            InvalidArgumentType: (a ``TypeError``) If the JSON is valid but not an object.
        """
        data = json.loads(payload)
        if not isinstance(data, dict):
            raise InvalidArgumentType(
                f"Routing policy JSON must be an object, got {type(data).__name__}")
        return cls(data, **kwargs)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike[str], **kwargs: Any) -> DictRoutingPolicy:
        """Build a policy from a UTF-8 JSON file; see :meth:`from_json`.

        Raises:
            OSError: If the file cannot be read.
            InvalidArgumentType: (a ``TypeError``) If the JSON is not an object.
        """
        return cls.from_json(Path(path).read_text(encoding="utf-8"), **kwargs)

    @classmethod
    def from_env(
        cls,
        env_var: str,
        *,
        loader: Callable[[str], Any] | None = None,
        default: RoutingDecisionType = None,
        key_getter: Callable[[RoutingRequest], str | None] | None = None,
    ) -> DictRoutingPolicy:
        """Build a policy from an environment variable.

        Args:
            env_var: Name of the variable holding the mapping.
            loader: Parses the variable's text; defaults to ``json.loads``.
            default: See the constructor.
            key_getter: See the constructor.

        Raises:
            KeyError: If the variable is not set.
            InvalidArgumentType: (a ``TypeError``) If the parsed value is not a mapping.
        """
        raw = os.environ.get(env_var)
        if raw is None:
            raise KeyError(f"Environment variable '{env_var}' is not set")
        data = (loader or json.loads)(raw)
        if not isinstance(data, Mapping):
            raise InvalidArgumentType(
                f"Routing policy from '{env_var}' must be a mapping, got {type(data).__name__}"
            )
        return cls(data, default=default, key_getter=key_getter)
