"""FlowTestKit: run one message through a flow, check the path it took, inject failures.

:func:`run_one` attaches a recording middleware to the flow (once per flow) that keeps the
FlowEvents of the last 64 traces in a module-wide store; :func:`assert_node_sequence`
reads that store. :func:`simulate_error` builds a node function that fails a set number
of times before succeeding, for exercising retry policies.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import weakref
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol, cast

from penguiflow.errors import FlowAlreadyRunning
from penguiflow.types import Message

if TYPE_CHECKING:
    from penguiflow.core import PenguiFlow
    from penguiflow.errors import FlowErrorCode
    from penguiflow.metrics import FlowEvent
    from penguiflow.registry import ModelRegistry

__all__ = ["run_one", "assert_node_sequence", "simulate_error"]

logger = logging.getLogger("penguiflow.testkit")

_MAX_TRACES = 64
# trace_id -> events in order of occurrence; the least recently started trace is evicted.
_EVENTS: OrderedDict[str, list[FlowEvent]] = OrderedDict()
#: The trace ids the last runs emitted: a Rookery item of one of them is an earlier
#: run's leftover (dropped), any other is the current run's answer.
_RUN_TRACES: deque[str] = deque(maxlen=1024)


class _Recorder:
    """Middleware storing every traced event in :data:`_EVENTS`; never raises."""

    __slots__ = ()

    async def __call__(self, event: FlowEvent) -> None:
        trace_id = event.trace_id
        if trace_id is None:
            return
        events = _EVENTS.get(trace_id)
        if events is None:
            events = _EVENTS[trace_id] = []
            while len(_EVENTS) > _MAX_TRACES:
                _EVENTS.popitem(last=False)
        events.append(event)


_RECORDER = _Recorder()
_RECORDED_FLOWS: weakref.WeakSet[PenguiFlow] = weakref.WeakSet()


def _attach_recorder(flow: PenguiFlow) -> None:
    if flow not in _RECORDED_FLOWS:
        flow.add_middleware(_RECORDER)
        _RECORDED_FLOWS.add(flow)


async def run_one(
    flow: PenguiFlow,
    message: Message,
    *,
    registry: ModelRegistry | None = None,
    timeout_s: float | None = 1.0,
) -> Any:
    """Run ``message`` through ``flow`` and return the first item that reaches Rookery.

    The flow must not be running: a running flow is refused with
    :class:`~penguiflow.errors.FlowAlreadyRunning` and left running (2.1 stopped the
    caller's flow on the way out). Otherwise it is started with ``registry``, the
    message is emitted to every ingress node, and the flow is stopped whatever happens.
    Events of the message's trace are recorded (replacing any earlier recording of the
    same trace) for :func:`assert_node_sequence`.

    An item of a trace an earlier ``run_one`` emitted (a result that run left in
    Rookery, say the second result of a fan-out) is fetched and dropped, and a
    WARNING on the ``penguiflow.testkit`` logger says how many were dropped (2.1
    returned it). Any other item is this run's, as in 2.1: a node may answer with
    a new ``Message`` (a fresh trace id) or a plain value.

    Args:
        flow: The flow under test.
        message: The message to emit.
        registry: Passed to ``flow.run``.
        timeout_s: Seconds allowed for emitting and fetching (items of other traces
            skipped included); ``None`` waits forever.

    Returns:
        The raw Rookery item: a Message, a plain value, or a FlowError.

    Raises:
        TypeError: If ``message`` is not a Message.
        TimeoutError: If nothing of the trace reaches Rookery within ``timeout_s``.
        FlowAlreadyRunning: (a ``RuntimeError``) The flow is running; it is left so.
        RuntimeError: From ``flow.run`` (registry gaps).
    """
    if not isinstance(message, Message):
        raise TypeError(f"run_one expects a penguiflow Message, got {type(message).__name__}")
    if flow.running:
        # Refused before anything is touched: the flow is the caller's, not ours to stop.
        raise FlowAlreadyRunning(
            "PenguiFlow already running",
            hint="run_one starts and stops the flow itself: pass a flow that is not "
                 "running (the running flow was left running)")
    _attach_recorder(flow)
    _EVENTS.pop(message.trace_id, None)
    skipped: list[str] = []
    earlier = set(_RUN_TRACES)
    _RUN_TRACES.append(message.trace_id)

    async def emit_and_fetch() -> Any:
        await flow.emit(message)
        while True:
            item = await flow.fetch()
            item_trace = getattr(item, "trace_id", None)
            if (item_trace is None or item_trace == message.trace_id
                    or not isinstance(item_trace, str) or item_trace not in earlier):
                return item
            skipped.append(item_trace)

    try:
        flow.run(registry=registry)
        if timeout_s is None:
            return await emit_and_fetch()
        return await asyncio.wait_for(emit_and_fetch(), timeout_s)
    finally:
        try:
            await flow.stop()
        finally:
            if skipped:
                logger.warning(
                    "run_one skipped %d Rookery item(s) of other traces (%s) while "
                    "waiting for trace %r: results an earlier run left in the flow",
                    len(skipped), ", ".join(sorted({repr(t) for t in skipped})[:5]),
                    message.trace_id)


def assert_node_sequence(trace_id: str, expected: Sequence[str]) -> None:
    """Assert the order in which nodes started for a trace recorded by :func:`run_one`.

    Consecutive starts of the same node (retries) count once.

    Raises:
        AssertionError: If nothing was recorded for ``trace_id`` (message contains
            ``"No recorded events"``), or if the sequence differs from ``expected``.
    """
    events = _EVENTS.get(trace_id)
    if not events:
        raise AssertionError(
            f"No recorded events for trace_id={trace_id!r}; run the flow with run_one() first"
        )
    actual: list[str | None] = []
    for event in events:
        if event.event_type == "node_start" and (not actual or actual[-1] != event.node_name):
            actual.append(event.node_name)
    if actual != list(expected):
        raise AssertionError(
            f"Node sequence mismatch for trace {trace_id!r}: "
            f"expected {list(expected)!r}, actual {actual!r}"
        )


class ErrorSimulation:
    """Call counters of a :func:`simulate_error` node function."""

    __slots__ = ("_attempts", "_fail_times")

    def __init__(self, fail_times: int) -> None:
        self._attempts = 0
        self._fail_times = fail_times

    @property
    def attempts(self) -> int:
        """Total number of calls so far."""
        return self._attempts

    @property
    def failures(self) -> int:
        """Number of calls that raised: ``min(attempts, fail_times)``."""
        return min(self._attempts, self._fail_times)


class SimulatedNodeFunc(Protocol):
    """The node function returned by :func:`simulate_error`."""

    simulation: ErrorSimulation

    def __call__(self, message: Any, ctx: Any, /) -> Coroutine[Any, Any, Any]: ...


def simulate_error(
    node_name: str,
    code: FlowErrorCode | str,
    *,
    fail_times: int = 1,
    result: Any = None,
    result_factory: Callable[[Any], Any | Awaitable[Any]] | None = None,
    exception_type: type[Exception] = RuntimeError,
) -> SimulatedNodeFunc:
    """Build an ``async (message, ctx)`` node function that fails, then succeeds.

    The first ``fail_times`` calls raise
    ``exception_type("[<code>] simulated failure in <node_name> (attempt <n>)")`` (``n``
    counts from 1); later calls return ``result_factory(message)`` (awaited if
    awaitable), else ``result`` if it is not None, else the message itself. The function's
    ``simulation`` attribute (:class:`ErrorSimulation`) exposes ``attempts`` and
    ``failures``; its ``__name__`` is ``node_name``, so ``Node(fn)`` is named after it.

    Raises:
        ValueError: If ``fail_times < 1`` or both ``result`` and ``result_factory`` are
            given.
    """
    if fail_times < 1:
        raise ValueError(f"fail_times must be >= 1, got {fail_times}")
    if result is not None and result_factory is not None:
        raise ValueError("Pass either result or result_factory, not both")
    code_text = str(code.value) if isinstance(code, Enum) else str(code)
    simulation = ErrorSimulation(fail_times)

    async def simulated(message: Any, ctx: Any) -> Any:
        simulation._attempts += 1
        attempt = simulation._attempts
        if attempt <= fail_times:
            raise exception_type(
                f"[{code_text}] simulated failure in {node_name} (attempt {attempt})"
            )
        if result_factory is not None:
            value = result_factory(message)
            if inspect.isawaitable(value):
                value = await value
            return value
        return message if result is None else result

    simulated.__name__ = simulated.__qualname__ = node_name
    func = cast(SimulatedNodeFunc, simulated)
    func.simulation = simulation
    return func
