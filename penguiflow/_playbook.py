"""Playbooks: run a subflow for one message and return its first result (spec §11).

Who cancels what: the parent trace's cancel event (``ensure_trace_event``) is
raced against the subflow's first Rookery item; if the parent is cancelled
first, the same trace id is cancelled in the subflow and ``TraceCancelled`` is
raised. If the *caller* is cancelled (its node invocation interrupted), the
subflow's trace is cancelled too. Either way the subflow is stopped, shielded
from further cancellation, before ``call_playbook`` returns or raises.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Protocol

from ._traces import TraceCancelled
from .types import Message

if TYPE_CHECKING:
    from .registry import ModelRegistry

__all__ = ["call_playbook", "emit_parent"]

#: The invocation a subflow's message comes from, while ``call_playbook`` emits it:
#: the runtime gives it as the origin of an OpenSea emit, so the subflow's entry
#: invocation names it as its parent (stored ``parent_invocation_ids``, and its
#: node span nests under the calling node's span). Set only around that emit.
emit_parent: ContextVar[str | None] = ContextVar("penguiflow_emit_parent", default=None)


# What call_playbook uses of a PenguiFlow, as shapes: this module is imported by
# penguiflow.core (and by contexts), so it does not import core, even for types.
class _Subflow(Protocol):
    @property
    def running(self) -> bool: ...

    def run(self, *, registry: ModelRegistry | None = None) -> None: ...

    async def emit(self, msg: Any) -> None: ...

    async def fetch(self) -> Any: ...

    async def cancel(self, trace_id: str) -> bool: ...

    async def stop(self) -> None: ...


class _ParentFlow(Protocol):
    def ensure_trace_event(self, trace_id: str) -> asyncio.Event: ...


async def call_playbook(
    playbook: Callable[[], tuple[_Subflow, ModelRegistry | None]],
    parent_msg: Message,
    timeout: float | None = None,
    *,
    runtime: _ParentFlow | None = None,
    invocation_id: str | None = None,
) -> Any:
    """Run a subflow for ``parent_msg`` and return its first Rookery payload.

    ``playbook`` returns ``(PenguiFlow, ModelRegistry | None)``; ``runtime`` is
    the parent ``PenguiFlow`` (or None). The subflow gets ``parent_msg`` itself
    (same trace id, headers, meta). With ``runtime``, the parent trace's
    cancellation cancels the subflow's trace and raises :class:`TraceCancelled`.
    The subflow is always stopped before this returns or raises.

    ``invocation_id`` (keyword-only addition; ``Context.call_playbook`` passes
    its own): the calling invocation. The subflow's entry invocation then names
    it as its parent, so in a store and in the exported trace the subflow's work
    hangs under the node that called it, not beside it under the root.

    Raises:
        TraceCancelled: the parent trace is (or becomes) cancelled.
        TimeoutError: no result within ``timeout`` seconds.
    """
    flow, registry = playbook()
    flow.run(registry=registry)
    trace_id = getattr(parent_msg, "trace_id", None)
    cancel_wait: asyncio.Task[bool] | None = None
    fetch: asyncio.Task[Any] | None = None
    try:
        if runtime is not None and trace_id is not None:
            cancel_event = runtime.ensure_trace_event(trace_id)
            if cancel_event.is_set():
                raise TraceCancelled(trace_id)
            cancel_wait = asyncio.ensure_future(cancel_event.wait())
        token = emit_parent.set(invocation_id)
        try:
            await flow.emit(parent_msg)
        finally:
            emit_parent.reset(token)
        fetch = asyncio.ensure_future(flow.fetch())
        waiting = {fetch} if cancel_wait is None else {fetch, cancel_wait}
        done, _ = await asyncio.wait(waiting, timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if fetch in done:
            result = fetch.result()
            return result.payload if isinstance(result, Message) else result
        if cancel_wait is not None and cancel_wait in done:
            raise TraceCancelled(trace_id)
        raise TimeoutError(f"playbook produced no result within {timeout}s")
    except (TraceCancelled, asyncio.CancelledError):
        if trace_id is not None and flow.running:
            with contextlib.suppress(Exception):
                await asyncio.shield(flow.cancel(trace_id))
        raise
    finally:
        for task in (cancel_wait, fetch):
            if task is not None and not task.done():
                task.cancel()
        pending = [t for t in (cancel_wait, fetch) if t is not None]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        await asyncio.shield(flow.stop())
        if runtime is not None and trace_id is not None:
            # The cancel event above made the parent hold state for this trace; with
            # no work of it there (a call outside any node), nothing else drops it.
            discard = getattr(runtime, "_discard_idle_trace", None)
            if discard is not None:
                discard(trace_id)
