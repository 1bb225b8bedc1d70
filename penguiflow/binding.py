"""One flow over several processes: what a delivering message bus and a flow share.

A 2.1 :class:`~penguiflow.bus.MessageBus` only *publishes* a copy of each floe put.
A **delivering bus** (:class:`DeliveringBus`; ``penguiflow_distributed.RedisMessageBus``
is one) carries the puts instead: when a flow runs with one,
``flow.run(message_bus=bus, nodes=[...])`` builds a :class:`BusBinding` and hands it
to ``bus.bind``. From then on, in this process:

* every put on a floe is sent through the bus (:meth:`BusBinding.send`): the item
  as JSON (:mod:`penguiflow.wire`) in a :class:`Parcel`, to the edge's queue in the
  broker; nothing goes on a local queue directly;
* the bus hands back the parcels of the edges whose target runs here
  (:meth:`BusBinding.deliver`): the nodes listed in ``nodes=``, and the results of
  the traces this process emitted (their ``-> Rookery`` edges), so ``fetch()``
  returns only those;
* a node's worker acknowledges a parcel (:meth:`DeliveringBus.settle`) only once the
  node's outputs are sent: at-least-once. A parcel whose worker died is delivered
  again elsewhere (``deliveries > 1``); every parcel carries a ``hop`` id derived
  from the parcel that caused it, so the outputs of a node run twice are the same
  hops, which the bus drops as duplicates;
* ``flow.cancel(trace_id)`` reaches every process (:meth:`DeliveringBus.cancel` ->
  :meth:`BusBinding.cancelled_elsewhere`), and parcels of a cancelled trace are
  acknowledged and dropped (``trace_cancel_drop``) instead of run.

Events added in this mode (none in a single-process flow): ``message_emit`` (a parcel
put on its edge; extra: ``edge``, ``entry`` (None for a duplicate, then also
``duplicate``), ``hop``, ``emitter``: the worker id the trace's results go to),
``message_fetch`` (taken by this process; extra: ``edge``, ``entry``, ``hop``,
``deliveries``, ``worker_id``, ``emitter``, and ``previous_worker`` for a parcel
claimed from a process that stopped; its ``queued_ts`` is when it was sent, so the wait
in the broker is ``ts - queued_ts``), ``stream_chunk`` (a streamed chunk sent) and
``message_undeliverable`` (a parcel that cannot be decoded, dropped).

The worker id of a process is its flow's ``flow_id``, which every stored event of the
process carries, and its invocation spans as ``pf.worker.id``. Spans: the trace id is
derived from the flow's trace id, so every process's spans are one OTel trace; an
invocation's parent is the span of the invocation that sent its input (the parcel's
``inv``, also sent as a W3C ``traceparent``); only the emitting process exports the
root ``invoke_workflow`` span.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from ._graph import OPEN_SEA, ROOKERY, Floe, owner_label
from .errors import (
    ConfigurationError,
    InvalidArgument,
    WireDecodingError,
    safe_repr,
    safe_str,
)
from .state import TERMINAL_KINDS
from .types import Message, StreamChunk
from .wire import WireTypes, dumps_item, loads_item

if TYPE_CHECKING:
    from ._context import Context
    from ._runtime import FlowRuntime
    from .bus import BusEnvelope

__all__ = [
    "BusBinding",
    "BusEdge",
    "DeliveringBus",
    "Inbound",
    "Parcel",
    "current_binding",
    "is_delivering",
]

logger = logging.getLogger("penguiflow.binding")

#: How many traces a process remembers as cancelled (oldest forgotten first), and
#: how many traces' emitters it remembers (to route their results home).
_REMEMBERED = 100_000
#: How long a claim waits for the store to list a trace's events (see
#: ``BusBinding._close_abandoned``).
_ABANDONED_READ_S = 10.0


class BusEdge(NamedTuple):
    """One edge of the flow as the bus sees it.

    ``label`` is the stable ``"source->target"`` name (streams are named from it);
    ``local``: this process consumes it (its target runs here, or it is an edge to
    Rookery: results come home to their emitter).
    """

    label: str
    source: str
    target: str
    local: bool
    to_rookery: bool


class Parcel(NamedTuple):
    """One item on its way along an edge: what a bus stores and hands back verbatim.

    ``data``: the item (:func:`penguiflow.wire.dumps_item`); ``reply_to``: the worker id
    of the process that emitted the trace (results go there); ``hop``: a stable id
    of this item across redeliveries (duplicates share it); ``inv``: the invocation
    that sent it (its span is the parent of the receiver's); ``ts``: when it was
    sent (epoch seconds); ``traceparent``: the W3C header of the sender's span.
    """

    edge: str
    data: bytes
    trace_id: str | None
    reply_to: str
    hop: str
    inv: str | None
    ts: float
    traceparent: str | None


class Inbound(NamedTuple):
    """The origin of an item a bus delivered here (what the worker settles).

    Its first two fields are an origin's (the sending invocation and when it was
    sent), so the runtime reads it like any origin. ``handle`` is the bus's own.
    """

    inv: str | None
    ts: float
    trace_id: str | None
    edge: str
    handle: Any
    reply_to: str
    hop: str
    deliveries: int


class DeliveringBus(Protocol):
    """A message bus that carries a flow's puts between processes (see the module)."""

    async def publish(self, envelope: BusEnvelope) -> None:
        """The 2.1 hook (not called while bound: the bus sees every put as a send)."""
        ...

    async def bind(self, binding: BusBinding) -> None:
        """Start delivering ``binding``'s local edges to it; returns once ready."""
        ...

    async def send(self, parcel: Parcel, *, maxsize: int) -> str | None:
        """Put ``parcel`` on its edge, waiting while the edge holds ``maxsize``
        unacknowledged parcels (``<= 0``: unbounded); the entry id, or None when a
        parcel with the same ``hop`` was sent before (a duplicate, dropped)."""
        ...

    async def settle(self, inbound: Inbound) -> None:
        """Acknowledge a delivered parcel: it is done and will not come again."""
        ...

    async def cancel(self, trace_id: str) -> None:
        """Tell every bound process that ``trace_id`` is cancelled."""
        ...

    async def unbind(self) -> None:
        """Stop delivering; parcels delivered and not settled will come again elsewhere."""
        ...


def is_delivering(bus: object) -> bool:
    """Whether ``bus`` delivers (has the :class:`DeliveringBus` methods), not only publishes."""
    return all(callable(getattr(bus, name, None))
               for name in ("bind", "send", "settle", "cancel", "unbind"))


class _Turn:
    """The parcel a task is handling, and how many items it sent so far (hop ids)."""

    __slots__ = ("binding", "hop", "inbound", "pending", "sent")

    def __init__(self, binding: BusBinding, inbound: Inbound) -> None:
        self.binding = binding
        self.inbound = inbound
        self.hop = inbound.hop
        self.sent = 0
        #: Sends started in the background (``emit_nowait``): the parcel is settled
        #: only once they are done.
        self.pending: list[asyncio.Task[Any]] = []


#: The parcel the current task (a node's worker, and tasks it starts) is handling.
_TURN: ContextVar[_Turn | None] = ContextVar("penguiflow_bus_turn", default=None)


def _hop(base: str, edge: str, n: int) -> str:
    return hashlib.blake2b(f"{base}|{edge}|{n}".encode("utf-8", "surrogatepass"),
                           digest_size=12).hexdigest()


class BusBinding:
    """What a delivering bus sees of one flow running in this process.

    Built by ``PenguiFlow.run`` (never by users). Attributes are read-only for the
    bus: ``flow_name``, ``worker_id``, ``edges`` (by label), ``local_nodes``,
    ``queue_maxsize`` and ``types`` (the models parcels are rebuilt with).
    """

    def __init__(self, *, rt: FlowRuntime, bus: DeliveringBus, floes: Mapping[str, Floe],
                 contexts: Mapping[Any, Context], local_nodes: frozenset[str],
                 types: WireTypes, cancel_local: Callable[[str], Awaitable[bool]]) -> None:
        self._rt = rt
        self.bus = bus
        self.flow_name: str = rt.name
        self.worker_id: str = rt.flow_id
        self.queue_maxsize: int = rt.queue_maxsize
        self.local_nodes = local_nodes
        self.types = types
        self._floes = dict(floes)
        self._contexts = contexts
        self._cancel_local = cancel_local
        self.edges: dict[str, BusEdge] = {}
        for label, floe in floes.items():
            to_rookery = floe.target is ROOKERY
            target = owner_label(floe.target)
            self.edges[label] = BusEdge(label, owner_label(floe.source), target,
                                        to_rookery or target in local_nodes, to_rookery)
        #: Traces cancelled anywhere (trace id -> when it was learned), oldest first.
        self._cancelled: OrderedDict[str, float] = OrderedDict()
        #: Emitters of the traces seen here: their results go home.
        self._replies: OrderedDict[str, str] = OrderedDict()
        #: Invocations this process has closed with ``node_abandoned``: parcels
        #: claimed together often share their sender (a fan-out), and each claim
        #: finds the same open invocations; each is closed once.
        self._abandoned: OrderedDict[str, float] = OrderedDict()
        #: Counters: parcels delivered, settled, dropped as cancelled or undeliverable,
        #: duplicates refused by the bus, redeliveries seen, background sends failed,
        #: invocations of stopped workers closed (``node_abandoned``).
        self.stats: dict[str, int] = dict.fromkeys(
            ("sent", "duplicates", "delivered", "redelivered", "settled", "cancel_drops",
             "undeliverable", "send_failures", "abandoned"), 0)
        #: Per task, its last background send (:meth:`send_soon`) not yet done: the
        #: task's next one waits for it, so they reach their edges in order, one
        #: connection at a time.
        self._soon_tail: dict[asyncio.Task[Any], asyncio.Task[Any]] = {}

    # -- sending (the runtime's puts) ----------------------------------------------

    def _reply_to(self, trace_id: str | None, turn: _Turn | None) -> str:
        if turn is not None:
            return turn.inbound.reply_to
        if trace_id is not None:
            home = self._replies.get(trace_id)
            if home is not None:
                return home
        return self.worker_id

    async def send(self, floe: Floe, item: Any, origin: Any, *,
                   data: bytes | None = None) -> None:
        """Send ``item`` along ``floe``'s edge (the runtime's put, while bound).

        ``data``: ``item`` encoded already (:meth:`send_soon`).

        Raises:
            WireEncodingError: (a ``TypeError``) ``item`` has no JSON form.
        """
        label = floe.label
        if data is None:
            data = dumps_item(item, edge=label)
        trace_id = item.trace_id if isinstance(item, Message) else getattr(item, "trace_id", None)
        if trace_id is not None and not isinstance(trace_id, str):
            trace_id = str(trace_id)
        turn = _TURN.get()
        self._refuse_cancelled(floe, trace_id, turn)
        if trace_id is None:
            # A plain value (a dict, a str) carries no trace id: the trace that made
            # it does (its origin, as in one process, or the parcel being handled),
            # so fetch_traced names it, a cancel drops it and its hop is recorded.
            if origin is not None and len(origin) > 2 and isinstance(origin[2], str):
                trace_id = origin[2]
            elif turn is not None:
                trace_id = turn.inbound.trace_id
        if turn is not None:
            hop = _hop(turn.hop, label, turn.sent)
            turn.sent += 1
        else:
            hop = uuid.uuid4().hex
        inv = origin[0] if origin is not None else None
        now = time.time()
        parcel = Parcel(label, data, trace_id, self._reply_to(trace_id, turn), hop, inv, now,
                        _traceparent(trace_id, inv))
        entry = await self.bus.send(parcel, maxsize=self.queue_maxsize)
        if entry is None:
            self.stats["duplicates"] += 1
        else:
            self.stats["sent"] += 1
        rt = self._rt
        if rt.events.listening and trace_id is not None:
            ctx = self._contexts.get(floe.source) or self._contexts[ROOKERY]
            extra: dict[str, Any] = {"edge": label, "entry": entry, "hop": hop,
                                     "emitter": parcel.reply_to}
            if entry is None:
                extra["duplicate"] = True
            kind = "stream_chunk" if isinstance(item, Message) and isinstance(
                item.payload, StreamChunk) else "message_emit"
            await rt.emit_event(kind, ctx, trace_id, extra=extra, invocation_id=inv)

    def _refuse_cancelled(self, floe: Floe, trace_id: str | None, turn: _Turn | None) -> None:
        """Refuse a new emit (from OpenSea, outside any node) of a trace id cancelled
        before: every process remembers a cancelled trace id and drops its parcels,
        so it would be dropped silently and its fetch() never return.

        Raises:
            InvalidArgument: (a ``ValueError``) ``trace_id`` was cancelled.
        """
        if (turn is None and trace_id is not None and floe.source is OPEN_SEA
                and trace_id in self._cancelled):
            raise InvalidArgument(
                f"trace id {trace_id!r} was cancelled: over a message bus a cancelled "
                f"trace id stays cancelled (every process drops its messages, including "
                f"ones emitted after the cancel); emit the new run under a new trace id "
                f"(e.g. {trace_id + ':2'!r})")

    def send_soon(self, floe: Floe, item: Any, origin: Any) -> None:
        """:meth:`send` in the background (``emit_nowait``), in order with the other
        sends of this task. ``item`` is encoded now, so an item with no JSON form
        fails the caller; the parcel being handled, if any, is settled only once
        the send is done (:meth:`sends_done`).

        Raises:
            WireEncodingError: (a ``TypeError``) ``item`` has no JSON form.
        """
        data = dumps_item(item, edge=floe.label)
        trace_id = getattr(item, "trace_id", None)
        self._refuse_cancelled(floe, trace_id if isinstance(trace_id, str) else None,
                               _TURN.get())
        caller = asyncio.current_task()
        previous = self._soon_tail.get(caller) if caller is not None else None
        task = self._rt.spawn(self._send_after(previous, floe, item, origin, data))
        if caller is not None:
            self._soon_tail[caller] = task
            task.add_done_callback(lambda done: self._forget_tail(caller, done))
        turn = _TURN.get()
        if turn is not None:
            turn.pending.append(task)

    async def _send_after(self, previous: asyncio.Task[Any] | None, floe: Floe, item: Any,
                          origin: Any, data: bytes) -> None:
        """:meth:`send`, once ``previous`` (the caller's last background send) is done
        (sent, failed or cancelled: each is accounted for by :meth:`sends_done`)."""
        if previous is not None and not previous.done():
            await asyncio.wait([previous])
        await self.send(floe, item, origin, data=data)

    def _forget_tail(self, caller: asyncio.Task[Any], task: asyncio.Task[Any]) -> None:
        if self._soon_tail.get(caller) is task:
            del self._soon_tail[caller]

    async def sends_done(self) -> bool:
        """Wait for the sends the current task started with :meth:`send_soon`.

        Returns False if one was cancelled (``stop()``): its output may not be on
        its edge, so the parcel must stay unsettled, to be delivered again. A send
        that failed otherwise is logged (``bus_send_failed``) and counted in
        ``stats["send_failures"]``: it could never succeed, and running its node
        again would not change that.
        """
        turn = _TURN.get()
        if turn is None or not turn.pending:
            return True
        pending, turn.pending = turn.pending, []
        await asyncio.wait(pending)
        sent = True
        for task in pending:
            if task.cancelled():
                sent = False
                continue
            exc = task.exception()
            if exc is not None:
                self.stats["send_failures"] += 1
                logger.error("bus_send_failed", extra={
                    "trace_id": safe_str(turn.inbound.trace_id),
                    "error": f"{type(exc).__name__}: {safe_str(exc)}"})
        return sent

    # -- delivering (the bus's side) -------------------------------------------------

    async def deliver(self, parcel: Parcel, *, handle: Any, deliveries: int = 1,
                      previous: str | None = None) -> None:
        """Put a parcel the bus took for this process on its local floe.

        ``deliveries``: how many times the bus handed it out, this time included;
        ``previous``: the worker id that held it before (a parcel claimed from a
        process that died), recorded on ``message_fetch`` as ``previous_worker``.

        Waits while the floe is full. A parcel of a cancelled trace is settled and
        dropped (``trace_cancel_drop``); one that cannot be decoded is settled and
        dropped too (``message_undeliverable``, logged): it could never succeed.
        """
        rt = self._rt
        floe = self._floes.get(parcel.edge)
        inbound = Inbound(parcel.inv, parcel.ts, parcel.trace_id, parcel.edge, handle,
                          parcel.reply_to, parcel.hop, deliveries)
        trace_id = parcel.trace_id
        if floe is None:
            await self._undeliverable(inbound, f"this flow has no edge {parcel.edge!r}")
            return
        ctx = self._contexts.get(floe.target)
        if trace_id is not None:
            if trace_id in self._cancelled:
                await self._drop_cancelled(inbound, ctx, trace_id)
                return
            self._remember(self._replies, trace_id, parcel.reply_to)
        try:
            item = loads_item(parcel.data, self.types)
        except WireDecodingError as exc:
            await self._undeliverable(inbound, safe_str(exc))
            return
        self.stats["delivered"] += 1
        if deliveries > 1:
            self.stats["redelivered"] += 1
        if ctx is not None and trace_id is not None and rt.events.listening:
            await rt.emit_event(
                "message_fetch", ctx, trace_id, parents=(parcel.inv,) if parcel.inv else (),
                queued_ts=parcel.ts,
                extra={"edge": parcel.edge, "entry": str(handle), "hop": parcel.hop,
                       "deliveries": deliveries, "worker_id": self.worker_id,
                       "emitter": parcel.reply_to,
                       **({"previous_worker": previous} if previous else {})})
        if previous and ctx is not None and trace_id is not None and floe.target is not ROOKERY:
            store = rt.events.state_store
            if store is not None:
                rt.spawn(self._close_abandoned(store, ctx, trace_id, previous, parcel,
                                               str(handle)))
        if trace_id is not None and trace_id in self._cancelled:
            # Cancelled while the event above was recorded (a store or middleware
            # may take its time): the trace had no item counted here yet, so the
            # cancel found nothing to stop; this parcel is dropped as it would
            # have been before.
            await self._drop_cancelled(inbound, ctx, trace_id)
            return
        if floe.target is ROOKERY:
            # A result is settled once it is here: fetch() is its end, and a process
            # that dies before fetching has no caller left to give it to.
            await self.bus.settle(inbound)
            inbound = inbound._replace(handle=None)
        # The item's own trace id (a plain value carries none, whatever the parcel
        # says): exactly what is given back if the put never happens.
        counted = rt.count(item)
        try:
            await floe.queue.put_tagged(item, inbound)
        except BaseException:
            if counted is not None and rt.release(counted):
                rt.spawn(rt.cancel_finished(counted))
            raise

    async def _close_abandoned(self, store: Any, ctx: Context, trace_id: str, worker: str,
                               parcel: Parcel, entry: str) -> None:
        """Record ``node_abandoned`` for the invocations ``worker`` started on this
        parcel and never ended: that worker stopped holding it (it was claimed from
        it), so they never will, and the trace would show as running for ever.

        Read from the store, where the stopped worker recorded them: an invocation
        of this node on that worker, with this parcel's sender as its parent,
        started and with no end. In the background (a claim is rare; the delivery
        does not wait), bounded, and, like any observer, never failing the flow:
        a store that cannot answer is logged and the invocation left open.
        """
        parents = (parcel.inv,) if parcel.inv else ()
        try:
            history = await asyncio.wait_for(store.load_history(trace_id), _ABANDONED_READ_S)
        except Exception as exc:
            logger.warning("bus_abandoned_lookup_failed", extra={
                "trace_id": trace_id, "worker_id": worker,
                "error": f"{type(exc).__name__}: {safe_str(exc)}"})
            return
        started: dict[str, int] = {}
        ended: set[str] = set()
        for ev in history:
            inv = ev.invocation_id
            if inv is None:
                continue
            if ev.kind == "node_start":
                if ev.flow_id == worker and ev.node_name == ctx.owner.name \
                        and tuple(ev.parent_invocation_ids or ()) == parents:
                    started[inv] = max(started.get(inv, 0), ev.attempt or 0)
            elif ev.kind in TERMINAL_KINDS:
                ended.add(inv)
        for inv, attempt in started.items():
            if inv in ended or inv in self._abandoned:
                continue
            # Marked before the await: a sibling claim's lookup may run meanwhile.
            self._remember(self._abandoned, inv, time.time())
            self.stats["abandoned"] += 1
            await self._rt.emit_event(
                "node_abandoned", ctx, trace_id, attempt=attempt, invocation_id=inv,
                parents=parents,
                extra={"worker_id": worker, "claimed_by": self.worker_id,
                       "edge": parcel.edge, "entry": entry})

    async def _drop_cancelled(self, inbound: Inbound, ctx: Context | None,
                              trace_id: str) -> None:
        self.stats["cancel_drops"] += 1
        await self.bus.settle(inbound)
        if ctx is not None:
            await self._rt.emit_event("trace_cancel_drop", ctx, trace_id,
                                      extra={"edge": inbound.edge,
                                             "entry": str(inbound.handle)})

    async def reject(self, parcel: Parcel, *, handle: Any, deliveries: int,
                     reason: str) -> None:
        """Settle a parcel the bus will not deliver again (it was handed out too many
        times; the bus keeps it elsewhere): ``message_undeliverable`` with ``reason``,
        logged and counted in ``stats["undeliverable"]``."""
        await self._undeliverable(
            Inbound(parcel.inv, parcel.ts, parcel.trace_id, parcel.edge, handle,
                    parcel.reply_to, parcel.hop, deliveries), reason)

    async def _undeliverable(self, inbound: Inbound, reason: str) -> None:
        self.stats["undeliverable"] += 1
        logger.error("message_undeliverable", extra={
            "edge": inbound.edge, "trace_id": inbound.trace_id, "error": reason})
        await self.bus.settle(inbound)
        ctx = self._contexts.get(ROOKERY)
        if ctx is not None and inbound.trace_id is not None:
            await self._rt.emit_event("message_undeliverable", ctx, inbound.trace_id,
                                      extra={"edge": inbound.edge, "error": reason[:2000]},
                                      level=logging.ERROR)

    async def settle(self, inbound: Inbound) -> None:
        """Acknowledge ``inbound`` (the worker, once the node's outputs are sent)."""
        if inbound.handle is None:
            return
        self.stats["settled"] += 1
        await self.bus.settle(inbound)

    # -- cancellation --------------------------------------------------------------

    def is_cancelled(self, trace_id: str) -> bool:
        """Whether ``trace_id`` was cancelled (here or in another process)."""
        return trace_id in self._cancelled

    async def cancelled_elsewhere(self, trace_id: str) -> None:
        """Apply a cancel another process (or this one) broadcast."""
        if trace_id in self._cancelled:
            return
        self._remember(self._cancelled, trace_id, time.time())
        await self._cancel_local(trace_id)

    async def cancel(self, trace_id: str) -> None:
        """Cancel ``trace_id`` here and tell every other process."""
        self._remember(self._cancelled, trace_id, time.time())
        await self._cancel_local(trace_id)
        await self.bus.cancel(trace_id)

    @staticmethod
    def _remember(table: OrderedDict[str, Any], key: str, value: Any) -> None:
        table[key] = value
        table.move_to_end(key)
        if len(table) > _REMEMBERED:
            table.popitem(last=False)

    # -- the worker's turn ------------------------------------------------------------

    def begin(self, inbound: Inbound) -> Any:
        """Mark the current task as handling ``inbound`` (a token for :meth:`end`)."""
        return _TURN.set(_Turn(self, inbound))

    @staticmethod
    def end(token: Any) -> None:
        """The current task is done with its parcel."""
        with contextlib.suppress(ValueError):
            _TURN.reset(token)

    @staticmethod
    def rebase(key: str) -> None:
        """Derive the current turn's next hop ids from ``key`` instead of its parcel:
        a join's output is then the same hop whichever input completed it."""
        turn = _TURN.get()
        if turn is not None:
            turn.hop = key
            turn.sent = 0

    @staticmethod
    def current() -> Inbound | None:
        """The parcel the current task is handling, if any."""
        turn = _TURN.get()
        return None if turn is None else turn.inbound

    # -- join_k across processes ----------------------------------------------------

    async def gather(self, node: str, trace_id: str, item: Any, k: int) -> list[Any] | None:
        """Add ``item`` to ``node``'s shared group for ``trace_id``; the ``k`` items in
        arrival order once the group is complete (in whichever process completes it),
        else None.

        The member id is the current parcel's hop, so a redelivered input counts
        once; a complete group is returned again to a redelivered input, and the
        join's output hop is derived from the group, so sending it again is a
        duplicate the bus drops. One group per trace and join node (for the bus's
        ``join_ttl_s``): an input beyond ``k`` gets the same group back, so its
        output is a duplicate, dropped.

        Raises:
            ConfigurationError: the bus cannot share groups (no ``gather``).
        """
        gather = getattr(self.bus, "gather", None)
        if gather is None:
            raise ConfigurationError(
                f"join_k node {node!r} runs over a bus that cannot share its groups",
                hint="use a bus with gather() (penguiflow_distributed.RedisMessageBus)")
        turn = _TURN.get()
        member = turn.inbound.hop if turn is not None else uuid.uuid4().hex
        key = f"{node}|{trace_id}"
        datas, _new = await gather(key, member, dumps_item(item, edge=f"join:{node}"), k)
        if datas is None:
            return None
        self.rebase(f"join|{key}")
        return [loads_item(data, self.types) for data in datas]

    def __repr__(self) -> str:
        return (f"BusBinding(flow={self.flow_name!r}, worker={self.worker_id!r}, "
                f"nodes={sorted(self.local_nodes)!r})")


def current_binding() -> BusBinding | None:
    """The binding whose parcel the current task handles (None outside a bound node)."""
    turn = _TURN.get()
    return None if turn is None else turn.binding


def _traceparent(trace_id: str | None, inv: str | None) -> str | None:
    if trace_id is None or inv is None:
        return None
    from ._ids import otel_trace_id
    try:
        return f"00-{otel_trace_id(trace_id)}-{inv}-01"
    except Exception as exc:  # an id the tracer cannot map: no header, not a failure
        logger.debug("traceparent_unavailable", extra={"error": safe_repr(exc)})
        return None

