"""Reusable flow shapes: bounded concurrency, fan-in joins and routers.

Routers (:func:`predicate_router`, :func:`union_router`) are nodes that emit to a subset
of their own successors and return ``None``; names in a decision are resolved among those
successors only. :func:`join_k` is a stateful node that gathers ``k`` messages per trace.
All nodes built here use ``validate="none"``: they accept any object, so a registry never
needs entries for them.
"""

from __future__ import annotations

import asyncio
import inspect
import operator
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import TypeAdapter

from penguiflow.binding import current_binding
from penguiflow.errors import InvalidArgument, InvalidArgumentType
from penguiflow.node import Node, NodePolicy
from penguiflow.policies import (
    PolicyLike,
    RoutingDecisionType,
    RoutingRequest,
    evaluate_policy,
)
from penguiflow.types import Message

if TYPE_CHECKING:
    from penguiflow.core import Context

__all__ = ["join_k", "map_concurrent", "predicate_router", "union_router"]

T = TypeVar("T")
R = TypeVar("R")

_MISSING: Any = object()


async def map_concurrent(
    items: Iterable[T],
    worker: Callable[[T], Awaitable[R]],
    *,
    max_concurrency: int = 8,
) -> list[R]:
    """Run ``await worker(item)`` for every item, at most ``max_concurrency`` at a time.

    Args:
        items: The inputs; consumed once, up front.
        worker: Async function applied to each item.
        max_concurrency: Upper bound on in-flight calls, an int; values below 1 count
            as 1.

    Returns:
        The results in input order (not completion order).

    Raises:
        InvalidArgumentType: (a ``TypeError``) ``max_concurrency`` is not an int (a
            bool, a float such as ``2.5``, ``None``); raised before ``items`` is read
            or ``worker`` called.
        Exception: The first exception raised by ``worker``; the calls still running are
            cancelled and awaited before it propagates.
    """
    if isinstance(max_concurrency, bool):
        limit: int | None = None
    else:
        try:
            limit = operator.index(max_concurrency)
        except TypeError:
            limit = None
    if limit is None:
        # 2.1 failed later with "'float' object cannot be interpreted as an integer"
        # or "'>' not supported between instances of 'NoneType' and 'int'".
        raise InvalidArgumentType(
            f"map_concurrent: max_concurrency must be an int (the number of calls "
            f"in flight; values below 1 count as 1), got {type(max_concurrency).__name__} "
            f"{max_concurrency!r}")
    pending = list(enumerate(items))
    results: list[Any] = [_MISSING] * len(pending)
    # A fixed pool of lanes pulling from one iterator bounds concurrency without a task
    # (or semaphore waiter) per item; safe because only one lane runs between awaits.
    feed = iter(pending)

    async def lane() -> None:
        for index, item in feed:
            results[index] = await worker(item)

    width = min(max(1, limit), len(pending))
    lanes = [asyncio.ensure_future(lane()) for _ in range(width)]
    try:
        await asyncio.gather(*lanes)
    except BaseException:
        for task in lanes:
            task.cancel()
        await asyncio.gather(*lanes, return_exceptions=True)
        raise
    return results


def _successor_named(ctx: Context, name: str) -> Node:
    found = [
        target for target in ctx._outgoing if isinstance(target, Node) and target.name == name
    ]
    if len(found) == 1:
        return found[0]
    if found:
        # Several successors share the name: 2.1 silently took the first. A builtin
        # LookupError raised in the router's attempt, so it fails that invocation as
        # the other router errors do (its type is the node's FlowError's).
        owner = getattr(ctx.owner, "name", None)
        ids = ", ".join(node.node_id for node in found)
        raise LookupError(
            f"Ambiguous successor name '{name}': router '{owner}' has {len(found)} "
            f"successors named so (node ids {ids}); route to the Node object, or give "
            f"the successors distinct names")
    # A plain KeyError with 2.1's exact text: raised inside the router's attempt, its
    # type is what the node's FlowError reports, and spec §12 documents both.
    raise KeyError(f"No successor named '{name}'")


def _resolve(ctx: Context, decision: Node | str | Sequence[Node | str]) -> tuple[Node, ...]:
    """Normalise a non-None decision to de-duplicated successor Nodes, order kept."""
    items: Sequence[object]
    if isinstance(decision, Node | str):
        items = (decision,)
    elif isinstance(decision, Sequence):
        items = decision
    else:
        items = (decision,)
    nodes: dict[Node, None] = {}
    for item in items:
        if isinstance(item, Node):
            nodes[item] = None
        elif isinstance(item, str):
            nodes[_successor_named(ctx, item)] = None
        else:
            # Builtin TypeError: raised in the router's attempt (see _successor_named).
            raise TypeError(
                f"Routing decision items must be Node or str, got {type(item).__name__}"
            )
    return tuple(nodes)


async def _route(
    message: Any,
    ctx: Context,
    router: Node,
    decision: Node | str | Sequence[Node | str],
    policy: PolicyLike | None,
) -> None:
    targets = _resolve(ctx, decision)
    if policy is not None:
        request = RoutingRequest(
            message=message,
            context=ctx,
            node=router,
            proposed=targets,
            trace_id=getattr(message, "trace_id", None),
        )
        chosen = await evaluate_policy(policy, request)
        if chosen is None:
            return
        targets = _resolve(ctx, chosen)
    if targets:
        await ctx.emit(message, to=list(targets))


def predicate_router(
    name: str,
    predicate: Callable[[Any], RoutingDecisionType | Awaitable[RoutingDecisionType]],
    *,
    policy: PolicyLike | None = None,
) -> Node:
    """Build a node that forwards each message to the successors ``predicate`` picks.

    Args:
        name: The node's name.
        predicate: Called with the incoming object (awaited if it returns an awaitable);
            returns ``None`` to drop the message, or a successor Node, a successor name,
            or a sequence of those.
        policy: Optional policy; it receives a :class:`RoutingRequest` whose ``proposed``
            holds the predicate's choice, and its decision replaces that choice (``None``
            drops the message). Not consulted when the predicate itself returns ``None``.

    Returns:
        A ``validate="none"`` node that emits the *original* object and returns ``None``.
        When it runs: a name that is not a successor raises
        ``KeyError("No successor named '<n>'")``, and an item that is neither a Node nor
        a str raises ``TypeError``; both are node errors (retry rules apply).
    """

    async def route(message: Any, ctx: Context) -> None:
        decision = predicate(message)
        if inspect.isawaitable(decision):
            decision = await decision
        if decision is None:
            return
        await _route(message, ctx, node, decision, policy)

    node = Node(route, name=name, policy=NodePolicy(validate="none"))
    return node


def union_router(name: str, union_model: Any, *, policy: PolicyLike | None = None) -> Node:
    """Build a node that validates into a union and routes on the variant.

    Args:
        name: The node's name.
        union_model: Any type pydantic's ``TypeAdapter`` accepts, typically
            ``Annotated[A | B, Field(discriminator="kind")]``.
        policy: Optional policy, applied as in :func:`predicate_router`; its request's
            ``message`` is the validated object.

    Returns:
        A ``validate="none"`` node that sends the *validated* object to the successor
        named after its ``kind`` attribute (its class name when ``kind`` is missing or
        not a str) and returns ``None``. When it runs, a validation failure raises
        pydantic's ``ValidationError`` and a missing successor raises ``KeyError``.
    """
    adapter: TypeAdapter[Any] = TypeAdapter(union_model)

    async def route(message: Any, ctx: Context) -> None:
        validated = adapter.validate_python(message)
        kind = getattr(validated, "kind", None)
        target = kind if isinstance(kind, str) else type(validated).__name__
        await _route(validated, ctx, node, target, policy)

    node = Node(route, name=name, policy=NodePolicy(validate="none"))
    return node


def _joined(bucket: list[Any]) -> Any:
    """A complete group as join_k returns it (see there)."""
    first = bucket[0]
    if isinstance(first, Message):
        payloads = [getattr(item, "payload", item) for item in bucket]
        # model_copy is shallow: give the joined message its own meta dict.
        return first.model_copy(update={"payload": payloads, "meta": dict(first.meta)})
    return bucket


def join_k(name: str, k: int) -> Node:
    """Build a node that joins ``k`` messages of the same trace into one.

    Args:
        name: The node's name.
        k: How many messages make a group; must be positive.

    Returns:
        A ``validate="none"`` node. It returns ``None`` until ``k`` messages of a trace
        have arrived, then forgets that trace and returns, if the first message is a
        :class:`~penguiflow.types.Message`, a copy of it whose ``payload`` is the list of
        the ``k`` payloads in arrival order, else the list of the ``k`` objects. When it
        runs, an object without a ``trace_id`` raises ``ValueError``. Incomplete groups
        are held until completed (they are not expired), except that the group of a
        cancelled trace is dropped once the cancel has finished
        (``trace_cancel_finish``), or at once when nothing of the trace was still in
        flight (``cancel`` returned False: say the group's other inputs failed), and
        at ``stop()``, except the groups of traces with items still queued (which
        complete them after ``run()``). Groups are the flow's: a node shared by
        several flows keeps each one's apart, and one flow's cancel or stop leaves the
        others' groups of that trace id.

    Raises:
        InvalidArgument: (a ``ValueError``) If ``k <= 0``.
    """
    if k <= 0:
        raise InvalidArgument(f"k must be a positive integer, got {k}")
    # Groups by (the flow's runtime, trace id): one node may serve several flows at
    # once (a playbook's subflows, built anew per call from module-level nodes), and
    # a flow's cancel or stop must not touch another's groups.
    buckets: dict[tuple[Any, Any], list[Any]] = {}
    # The upstream invocations of each bucket: the completing invocation reports
    # them all as its parents, so spans link every joined input (fan-in) and the
    # critical path sees the join wait on its slowest input.
    upstreams: dict[tuple[Any, Any], list[str]] = {}

    async def join(message: Any, ctx: Context) -> Any:
        trace_id = getattr(message, "trace_id", None)
        if trace_id is None:
            # Builtin ValueError: raised in the join's attempt, its type is the
            # node's FlowError's exception_type, as in 2.1.
            raise ValueError(
                f"join_k node '{name}' requires messages with a trace_id; got a "
                f"{type(message).__name__}: send Messages (or objects with a trace_id) into "
                "a join, so that it can group them by trace")
        bound = current_binding()
        if bound is not None:
            # Over a delivering bus the inputs land in any process: the group is
            # the bus's, shared (and safe under redelivery; see BusBinding.gather).
            group = await bound.gather(name, str(trace_id), message, k)
            if group is None:
                return None
            return _joined(group)
        key = (getattr(ctx, "_rt", None), trace_id)
        bucket = buckets.get(key)
        if bucket is None:
            bucket = buckets[key] = []
        bucket.append(message)
        parents = getattr(ctx, "_parents", ())
        if parents:
            upstreams.setdefault(key, []).extend(parents)
        if len(bucket) < k:
            return None
        del buckets[key]
        joined = upstreams.pop(key, None)
        if joined and hasattr(ctx, "_parents"):
            ctx._parents = tuple(dict.fromkeys(joined))
        return _joined(bucket)

    def forget(trace_id: Any, runtime: Any = None) -> None:
        # The trace was cancelled: its incomplete group can never complete, and a
        # later trace reusing the id must not be joined with its leftovers.
        buckets.pop((runtime, trace_id), None)
        upstreams.pop((runtime, trace_id), None)

    def forget_all(runtime: Any, keep: Collection[Any]) -> None:
        # The flow stopped: its groups go, but those of traces in ``keep`` (items still
        # queued, which complete them after run()); other flows' groups stay.
        for key in [key for key in buckets if key[0] is runtime and key[1] not in keep]:
            del buckets[key]
            upstreams.pop(key, None)

    # The runtime calls these once a cancelled trace has drained, or when cancel()
    # finds nothing in flight (the rest of the group failed), and at stop().
    join._forget_trace = forget  # type: ignore[attr-defined]
    join._forget_all = forget_all  # type: ignore[attr-defined]
    return Node(join, name=name, policy=NodePolicy(validate="none"))
