"""RedisMessageBus: a flow's edges as Redis Streams, consumed by consumer groups.

Layout, for a flow named ``F`` under namespace ``N`` (``P = "N:F"``):

* ``P:edge:<source>-><target>`` — one stream per edge whose target is a node; every
  process running the target reads it in the consumer group ``pf`` (its consumer
  name is its worker id), so each entry goes to one of them;
* ``P:reply:<worker id>`` — the results (``-> Rookery`` edges) of the traces one
  process emitted, read by that process only. It has no capacity (a result never
  waits for its reader) and expires ``reply_ttl_s`` after its last write or its
  reader's last refresh, so a client that went away leaves nothing behind for long;
  a clean stop deletes it at once;
* ``P:dead:<source>-><target>`` — entries delivered ``max_deliveries`` times without
  being settled (every process that took them died): kept there, not run again;
* ``P:control`` — cancels, read by every process (no group: a broadcast);
* ``P:hop:<hop>`` — one key per sent parcel (TTL ``dedup_ttl_s``): a parcel sent
  twice (its producer ran again after a crash) is dropped the second time;
* ``P:join:<node>|<trace>:items`` / ``:members`` — ``join_k`` groups shared by every
  process running the join (TTL ``join_ttl_s``).

Delivery is at-least-once: an entry is acknowledged (and deleted, so that a
stream's length is what it holds undelivered + unacknowledged, which the edge's
capacity bounds) only when the flow settles it, after the node's outputs are sent.
Entries a process holds are kept alive (XCLAIM, every ``claim_idle_s / 3``); the
entries of a process that died go idle, and after ``claim_idle_s`` any process
reading that edge claims them (XPENDING + XCLAIM) and runs them again. A reader
whose link broke reads back, once reconnected, the entries Redis handed it on the
lost reply (its consumer's pending entries not held here: ``stats["recovered"]``),
with XPENDING and XRANGE, which count no delivery towards ``max_deliveries``.

Redis unreachable (or a link silent for ``link_timeout_s``): every loop backs off
(up to ``max_backoff_s``) and retries, a send waits (its input stays
unacknowledged), and the counts are in :attr:`stats`, logged, and exported as
OpenTelemetry metrics (``penguiflow.bus.*``). A Redis that restarts keeps entries
only if it persists them (AOF): see the distributed guide.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import math
import re
import socket
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote_plus, urlencode, urlsplit

import redis.asyncio as aioredis
from pydantic import BaseModel
from redis.asyncio.connection import parse_url
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    ClusterDownError,
    MasterDownError,
    MaxConnectionsError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from penguiflow.binding import BusBinding, Inbound, Parcel
from penguiflow.bus import BusEnvelope
from penguiflow.errors import (
    ConfigurationError,
    FlowNotRunning,
    InvalidArgument,
    PenguiFlowError,
    safe_repr,
    safe_str,
)

from . import _scripts

__all__ = ["BusBindError", "RedisMessageBus"]

logger = logging.getLogger("penguiflow_distributed")

GROUP = "pf"
#: Errors that mean "Redis is not reachable now": retried with backoff.
_LINK_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)
#: Redis refusing the credentials (WRONGPASS, NOAUTH, a user that may not log in):
#: redis-py raises them as ConnectionError subclasses, but waiting does not fix a
#: wrong password. While binding they fail the bind (BusBindError); once bound
#: (credentials rotated under a running process) they are retried like a broken
#: link, so that nothing held is lost when the credentials are fixed.
_REFUSALS = (AuthenticationError, AuthorizationError)
#: Error replies that mean "Redis refuses this now, not for ever": out of memory
#: under ``noeviction``, a replica after a failover (READONLY), a script running
#: too long (BUSY), a failover or a cluster in progress. Retried with backoff like
#: a broken link: failing the send would fail the node, whose input is then
#: acknowledged, and the trace would be lost although nothing reached its edge.
#: redis-py maps some to classes (and strips their prefix); the rest are read from
#: the text, which inside a script's error reply is not at its start.
_TEMPORARY_CLASSES = (OutOfMemoryError, ReadOnlyError, TryAgainError, MasterDownError,
                      ClusterDownError)
_TEMPORARY_STARTS = ("BUSY ", "NOREPLICAS", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN")
_TEMPORARY_WITHIN = ("OOM command not allowed", "READONLY You can't write")


def _temporary(exc: ResponseError) -> bool:
    if isinstance(exc, _TEMPORARY_CLASSES):
        return True
    text = str(exc)
    return text.startswith(_TEMPORARY_STARTS) or any(t in text for t in _TEMPORARY_WITHIN)
#: Connections a bus keeps for its script calls (:meth:`RedisMessageBus._eval`):
#: enough for the sends of a busy worker in flight together, few enough that the
#: pool (shared with the readers, the keep-alive and the claimer) never runs dry.
_SPARE_MAX = 8
#: The cap of the bus's own pool (URL given, no max_connections in it): none.
#: redis-py's default, 100, would make a burst of concurrent sends wait
#: (``pool_waits``, ``bus_pool_exhausted``) for a pool the user never sized.
_UNCAPPED = 2**31
#: Pool connections a bus needs beyond one per reader: the control reader's, and
#: one each for the keep-alive, the claimer and a script call (see _connect).
_POOL_OTHERS = 4
#: TCP keep-alive: a probe after 30 s of silence, every 10 s, 3 unanswered = dead
#: (the OS default waits 2 hours): keeps a NAT's or firewall's entry for an idle
#: connection alive, and notices a dead peer on a connection waiting for nothing.
_KEEPALIVE: dict[int, int] = {
    opt: value for name, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10),
                                   ("TCP_KEEPCNT", 3))
    if (opt := getattr(socket, name, None)) is not None}
#: Settled entries remembered (see RedisMessageBus._claim): far more than the
#: entries one claim can return (``prefetch``) that a reader could have settled
#: while the claim was in flight.
_SETTLED_LATELY_MAX = 4096
#: A dead-lettered entry keeps all its fields up to this many (see _dead_letter).
_DEAD_FIELDS_MAX = 256
_PARCEL_FIELDS = frozenset({b"e", b"d", b"t", b"m"})
#: Longest duration option: a TTL Redis accepts (its limit is ~9.2e15 s: the
#: expiry time in milliseconds must fit 64 bits), and ``claim_idle_s`` in ms too.
_SECONDS_MAX = 10**15
#: The keywords that may ride on the URL (``from_url``), with their types.
_URL_KEYWORDS: dict[str, type] = {
    "namespace": str, "claim_idle_s": float, "dedup_ttl_s": float, "join_ttl_s": float,
    "reply_ttl_s": float, "max_deliveries": int, "block_ms": int, "max_backoff_s": float,
    "prefetch": int, "link_timeout_s": float}
_STATS = ("sent", "duplicates", "full_waits", "delivered", "claimed", "settled",
          "cancels_sent", "cancels_received", "link_errors", "reconnects", "undecodable",
          "dead_lettered", "recovered", "read_errors", "pool_waits", "deliver_errors")


class BusBindError(PenguiFlowError, RuntimeError):
    """The bus could not start (Redis refused it: bad credentials, a wrong database,
    a key of another type under the namespace); ready(), every send and cancel raise it."""


@dataclass(frozen=True, slots=True)
class _Handle:
    """Where a delivered entry lives: what :meth:`RedisMessageBus.settle` acknowledges."""

    stream: str
    entry: str

    def __str__(self) -> str:
        return f"{self.stream}/{self.entry}"


class RedisMessageBus:
    """A delivering message bus on Redis Streams (see the module docstring).

    Args:
        url: the Redis URL (``redis://host:6379/0``, ``rediss://`` for TLS).
        namespace: prefix of every key this bus touches.
        claim_idle_s: how long an entry stays with a process that stopped
            refreshing it (it died) before another process claims it.
        dedup_ttl_s: how long a sent hop is remembered: a producer that runs again
            within it (its process died before settling its input) is not sent
            twice. Each hop key costs Redis ~100 bytes for this long, so the
            default (1 h) holds ~360 MB at 1,000 hops/s; keep it well above
            ``claim_idle_s`` plus the longest a backlog waits.
        join_ttl_s: how long a ``join_k`` group is kept after its last new input.
        reply_ttl_s: how long a reply stream outlives its reader (a client that
            stopped without a clean stop, or is cut off from Redis this long).
        max_deliveries: how many times an entry is handed out before it is moved
            to the edge's dead-letter stream (``message_undeliverable``) instead
            of being run again: a message that kills every process taking it.
        block_ms: longest wait of one blocking read (a stop is seen this late).
        max_backoff_s: longest pause between retries while Redis is unreachable.
        prefetch: most entries one read takes per edge.
        types: pydantic models to rebuild by name on receipt, beyond the
            registry's and penguiflow's own.
        client: an existing ``redis.asyncio.Redis`` to use instead of ``url``
            (not closed by the bus).
        meter_provider: where the ``penguiflow.bus.*`` counters go (default: the
            global OpenTelemetry MeterProvider; a no-op until one is configured).
        link_timeout_s: longest wait for a reply (beyond ``block_ms`` for a
            blocking read) before the connection counts as broken: closed,
            reconnected, the call retried. A link that died silently (a NAT or a
            firewall dropping it, a frozen Redis) is noticed this late, not after
            TCP's ~15 minutes. With a ``client`` you pass, the bus's own
            exchanges (scripts, reads) use it; redis-py's calls keep the
            client's ``socket_timeout``.

    Raises:
        InvalidArgument: (a ``ValueError``) a value out of range.
    """

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", *,
                 namespace: str = "penguiflow", claim_idle_s: float = 30.0,
                 dedup_ttl_s: float = 3600.0, join_ttl_s: float = 3600.0,
                 reply_ttl_s: float = 3600.0, max_deliveries: int = 5,
                 block_ms: int = 1000, max_backoff_s: float = 5.0, prefetch: int = 16,
                 types: Iterable[type[BaseModel]] = (), client: Any = None,
                 meter_provider: Any = None, link_timeout_s: float = 30.0) -> None:
        for name, value in (("claim_idle_s", claim_idle_s), ("max_backoff_s", max_backoff_s),
                            ("link_timeout_s", link_timeout_s)):
            if not 0 < value <= _SECONDS_MAX:  # NaN too
                raise InvalidArgument(
                    f"{name} must be > 0 and at most {_SECONDS_MAX:.0e} seconds; got "
                    f"{value!r}")
        for name, value in (("dedup_ttl_s", dedup_ttl_s), ("join_ttl_s", join_ttl_s),
                            ("reply_ttl_s", reply_ttl_s)):
            # Redis TTLs are whole seconds (EX/EXPIRE): 0 would delete at once, and
            # Redis refuses one past its expiry limit ("invalid expire time").
            if not 1 <= value <= _SECONDS_MAX:
                raise InvalidArgument(
                    f"{name} must be from 1 second (a Redis TTL) to {_SECONDS_MAX:.0e} "
                    f"seconds (Redis's expiry limit); got {value!r}")
        if block_ms < 1 or prefetch < 1 or max_deliveries < 1:
            raise InvalidArgument(
                f"block_ms, prefetch and max_deliveries must be >= 1; got "
                f"block_ms={block_ms!r}, prefetch={prefetch!r}, "
                f"max_deliveries={max_deliveries!r}")
        if not namespace or any(c in namespace for c in ": \n\r\t"):
            raise InvalidArgument(
                f"namespace must be a non-empty name without ':' or whitespace; got "
                f"{namespace!r}")
        if client is None:
            _check_url(url)
        else:
            _check_client(client)
        self.url = url
        self.namespace = namespace
        self.claim_idle_s = float(claim_idle_s)
        self.dedup_ttl_s = float(math.ceil(dedup_ttl_s))
        self.join_ttl_s = float(math.ceil(join_ttl_s))
        self.reply_ttl_s = float(math.ceil(reply_ttl_s))
        self.max_deliveries = int(max_deliveries)
        self.block_ms = int(block_ms)
        self.max_backoff_s = float(max_backoff_s)
        self.prefetch = int(prefetch)
        #: Longest wait for a reply (beyond a blocking read's ``block_ms``) before the
        #: link counts as broken: closed, reconnected, the call retried. A link that
        #: died silently (a NAT or firewall dropping an idle connection, a peer
        #: frozen) would otherwise hold a call until TCP gives up, ~15 minutes.
        self.link_timeout_s = float(link_timeout_s)
        #: Extra models rebuilt by name on receipt (the flow adds its registry's).
        self.types: tuple[type[BaseModel], ...] = tuple(types)
        self._meter_provider = meter_provider
        self._worker_id = ""
        self._own_client = client is None
        self._redis: Any = client
        self._binding: BusBinding | None = None
        self._ready = asyncio.Event()
        #: Set when unbind finished (cleared by the next bind): ready(), sends and
        #: cancels then raise FlowNotRunning instead of waiting for a bind.
        self._unbound = False
        #: Set when unbind starts: sends, cancels and ready() waiting for the bind or
        #: retrying while Redis is away end (FlowNotRunning) instead of waiting on.
        self._unbinding = asyncio.Event()
        self._stopping = False
        self._reading = True
        self._tasks: list[asyncio.Task[None]] = []
        #: Entries delivered here and not settled yet, per stream (kept alive).
        self._in_hand: dict[str, set[str]] = {}
        self._edge_streams: list[str] = []
        self._stream_edges: dict[str, str] = {}
        self._drained = asyncio.Event()
        self._drained.set()
        #: Settles due, flushed together by one task (one Redis call for all of them).
        self._settling: list[tuple[str, str]] = []
        self._settle_due = asyncio.Event()
        self._flushed = asyncio.Event()
        self._flushed.set()
        self._down_since: float | None = None
        self._bind_error: BusBindError | None = None
        self._scripts: dict[str, Any] = {}
        #: Idle connections of the bus's own for script calls (see :meth:`_eval`).
        self._spare: list[Any] = []
        #: The last entries settled here, (stream, entry id), oldest first: a claim
        #: sent before one was settled may still return it (see :meth:`_claim`).
        self._settled_lately: OrderedDict[tuple[str, str], None] = OrderedDict()
        #: Counters (see the module docstring); also OTel metrics ``penguiflow.bus.<name>``.
        self.stats: dict[str, int] = dict.fromkeys(_STATS, 0)

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> RedisMessageBus:
        """A bus from a URL whose query may carry the keywords
        (``redis://h:6379/0?namespace=x&claim_idle_s=2``); ``overrides`` win.

        Raises:
            InvalidArgument: (a ``ValueError``) an unknown keyword, or a value that
                is not of the keyword's type.
        """
        if url.partition(":")[0].lower() not in ("redis", "rediss", "unix"):
            raise InvalidArgument(
                f"a Redis URL starts with redis://, rediss:// or unix://; got "
                f"{_redact(url)!r}")
        _check_url(url)  # as written: the query rebuilt below would hide what is wrong
        parts = urlsplit(url)
        keep: list[tuple[str, str]] = []
        options: dict[str, Any] = {}
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            kind = _URL_KEYWORDS.get(key)
            if kind is None:
                keep.append((key, value))  # redis-py's own (socket_timeout, ...)
                continue
            try:
                options[key] = kind(value)
            except ValueError:
                raise InvalidArgument(
                    f"{key} in the bus URL must be a {kind.__name__}; got {value!r}") from None
        options.update(overrides)
        # The URL as written, with only the query changed: urlunsplit would drop the
        # empty authority of unix:///path (unix:/path, which redis-py refuses).
        head = url.partition("#")[0].partition("?")[0]
        query = urlencode(keep)
        plain = (head + (f"?{query}" if query else "")
                 + (f"#{parts.fragment}" if parts.fragment else ""))
        return cls(plain, **options)

    def __repr__(self) -> str:
        return f"RedisMessageBus({_redact(self.url)!r}, namespace={self.namespace!r})"

    # -- names ----------------------------------------------------------------------

    def _prefix(self) -> str:
        binding = self._binding
        assert binding is not None, "bound first"
        return f"{self.namespace}:{binding.flow_name}"

    def edge_stream(self, label: str) -> str:
        """The stream of edge ``label`` (``source->target``)."""
        return f"{self._prefix()}:edge:{label}"

    def reply_stream(self, worker_id: str) -> str:
        """The stream of the results of the traces ``worker_id`` emitted."""
        return f"{self._prefix()}:reply:{worker_id}"

    def dead_stream(self, label: str) -> str:
        """The dead-letter stream of edge ``label`` (see ``max_deliveries``)."""
        return f"{self._prefix()}:dead:{label}"

    # -- the 2.1 hook ---------------------------------------------------------------

    async def publish(self, envelope: BusEnvelope) -> None:
        """Not used: a flow bound to this bus sends every put through :meth:`send`."""

    # -- binding ----------------------------------------------------------------------

    async def bind(self, binding: BusBinding) -> None:
        """Create the consumer groups of ``binding``'s local edges and start reading."""
        if self._binding is not None:
            raise ConfigurationError(
                "this RedisMessageBus is bound to a running flow already",
                hint="give each flow (and each run) its own RedisMessageBus")
        self._binding = binding
        self._unbinding.clear()
        self._unbound = False
        self._bind_error = None
        self._stopping = False
        self._reading = True
        streams = [self.edge_stream(e.label) for e in binding.edges.values()
                   if e.local and not e.to_rookery]
        streams.append(self.reply_stream(binding.worker_id))
        control = f"{self._prefix()}:control"
        try:
            # Inside the try: whatever makes the client fail (a URL redis-py cannot
            # take, a pool too small for the readers) fails the bind, said by ready()
            # and every send, instead of leaving them waiting for a bind that ended.
            self._connect(len(streams))
            await self._retrying("create the consumer groups", self._create_groups, streams,
                                 fail_refused=True)
            last = await self._retrying("read past cancels", self._past_cancels, control,
                                        fail_refused=True)
        except FlowNotRunning:
            raise  # unbind started meanwhile: no refusal of Redis's
        except Exception as exc:
            # Not a link problem (those are retried above), so retrying will not
            # help: ready() and every send say why, none waits for ever.
            if isinstance(exc, (InvalidArgument, ConfigurationError)):
                hint = f" ({exc.hint})" if exc.hint else ""
                self._bind_error = BusBindError(
                    f"the bus for flow {binding.flow_name!r} cannot start: {exc}{hint}")
                self._ready.set()
                raise self._bind_error from exc
            if isinstance(exc, ResponseError):
                why = str(exc)
            elif isinstance(exc, _REFUSALS):
                why = (f"{type(exc).__name__}: {exc} (check the user name and password in "
                       f"the bus URL)")
            else:  # redis-py's repr() of its errors drops their message
                why = f"{type(exc).__name__}: {safe_str(exc, 500)}"
            self._bind_error = BusBindError(
                f"Redis at {_redact(self.url)} refused the bus for flow "
                f"{binding.flow_name!r} (namespace {self.namespace!r}): {why}")
            self._ready.set()
            raise self._bind_error from exc
        # What each stream may carry: its own edge's entries; the reply stream,
        # results (an edge to Rookery). An entry naming another edge is refused.
        self._stream_edges = {self.edge_stream(e.label): e.label
                              for e in binding.edges.values()
                              if e.local and not e.to_rookery}
        self._tasks = [asyncio.create_task(self._read(s), name=f"pf-bus:read:{s}")
                       for s in streams]
        self._tasks.append(asyncio.create_task(self._control(control, last),
                                               name="pf-bus:control"))
        self._tasks.append(asyncio.create_task(self._settler(), name="pf-bus:settle"))
        self._edge_streams = streams[:-1]
        self._tasks.append(asyncio.create_task(self._keep_alive(), name="pf-bus:refresh"))
        self._tasks.append(asyncio.create_task(self._claimer(), name="pf-bus:claim"))
        self._worker_id = binding.worker_id
        self._register_metrics()
        self._ready.set()
        logger.info("bus_bound", extra={
            "worker_id": binding.worker_id, "flow": binding.flow_name,
            "namespace": self.namespace,
            "nodes": sorted(binding.local_nodes), "url": _redact(self.url)})

    def _connect(self, streams: int) -> None:
        """Make the client (from :attr:`url`, unless one was passed), and check that its
        pool can serve this bus: ``streams`` readers each keep a connection, and the
        control reader, the keep-alive, the claimer and the script calls need theirs.

        The bus's own pool is uncapped (redis-py's default cap, 100, would make
        a burst of concurrent sends wait for connections), unless the URL sets
        ``max_connections``: then, as for a ``client=``, that cap is checked.

        Raises:
            ConfigurationError: a pool capped below that.
            InvalidArgument: a URL redis-py cannot take.
        """
        need = streams + _POOL_OTHERS
        if self._redis is None:
            _check_url(self.url)
            # For redis-py's own calls (keep-alive, claims, cancels, set-up); the
            # bus's exchanges set theirs (see _own). A socket_timeout or a
            # max_connections in the URL (redis-py's own options) wins over ours.
            self._redis = aioredis.Redis.from_url(
                self.url, socket_connect_timeout=5, health_check_interval=10,
                socket_timeout=self.link_timeout_s + self.block_ms / 1000,
                socket_keepalive=True, socket_keepalive_options=_KEEPALIVE,
                max_connections=_UNCAPPED)
        r = self._redis
        self._scripts = {name: r.register_script(getattr(_scripts, name))
                         for name in ("SEND", "SETTLE", "GATHER", "RETIRE", "DEAD")}
        cap = getattr(r.connection_pool, "max_connections", None)
        if isinstance(cap, int) and cap < need:
            whose, fix = (
                (f"the client's connection pool is capped at max_connections={cap}",
                 f"pass a client with max_connections >= {need + _SPARE_MAX} (room for "
                 f"concurrent sends), or pass the URL instead of a client")
                if not self._own_client else
                (f"the bus URL caps the bus's connection pool at max_connections={cap}",
                 f"raise max_connections in the bus URL to >= {need + _SPARE_MAX} (room "
                 f"for concurrent sends), or drop it: the bus's own pool is uncapped"))
            raise ConfigurationError(
                f"{whose}, and this bus needs at least {need} ({streams} blocking "
                f"readers, one per stream it reads, keep a connection each; "
                f"{_POOL_OTHERS} more serve cancels, keep-alives, claims and sends); with "
                f"fewer, every send would wait for a connection for ever", hint=fix)

    async def ready(self) -> None:
        """Return once :meth:`bind` finished (the process reads its edges).

        Raises:
            BusBindError: Redis refused the bus (bind finished without reading).
            FlowNotRunning: (a ``RuntimeError``) the flow stopped first.
        """
        await self._bound("the bus never read")

    async def _bound(self, unmade: str) -> BusBinding:
        """Wait until :meth:`bind` finished; the binding. ``unmade``: what the caller
        says did not happen when the flow stops first.

        Raises:
            BusBindError: Redis refused the bus.
            FlowNotRunning: the flow stopped (unbind started) before, or meanwhile.
        """
        if self._unbound:
            # The flow stopped: nothing will set _ready. A run() just made may have
            # scheduled its bind, which starts (and clears this) at the next turn.
            await asyncio.sleep(0)
            if self._unbound:
                raise FlowNotRunning(
                    f"PenguiFlow is stopped (its bus on Redis at {_redact(self.url)} is "
                    f"unbound): {unmade}; call run() again first")
        await self._ready.wait()
        if self._bind_error is not None:
            raise self._bind_error
        binding = self._binding
        if binding is None or self._unbinding.is_set():
            raise FlowNotRunning(
                f"PenguiFlow stopped before its bus was bound (Redis at "
                f"{_redact(self.url)} had not answered): {unmade}; call run() again first")
        return binding

    async def _create_groups(self, streams: Sequence[str]) -> None:
        for stream in streams:
            await self._ensure_group(stream)

    async def _ensure_group(self, stream: str) -> None:
        try:
            await self._redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _past_cancels(self, control: str) -> bytes:
        # Cancels broadcast before this process started still hold for entries
        # still queued: the last ones are applied first.
        binding = self._binding
        assert binding is not None
        entries = await self._redis.xrevrange(control, count=1000)
        for entry, fields in reversed(entries):
            trace = fields.get(b"cancel")
            if trace:
                try:
                    await binding.cancelled_elsewhere(trace.decode("utf-8", "surrogatepass"))
                except Exception as exc:
                    # Anyone who can write to Redis can write here: one bad entry
                    # loses only itself, never the start of every later process.
                    logger.error("bus_cancel_failed", extra={
                        "entry": _str(entry), "error": safe_repr(exc, 300)})
        return entries[0][0] if entries else b"0-0"

    async def drain(self, timeout: float | None) -> int:
        """Stop taking new entries and wait (up to ``timeout`` s) until those held here
        are settled; returns how many were not (they will be claimed elsewhere)."""
        self._reading = False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drained.wait(), timeout)
        return sum(len(ids) for ids in self._in_hand.values())

    async def unbind(self) -> None:
        """Stop every loop, tidy up and close the connection.

        Entries held and not settled are left pending, to be claimed by another
        process after ``claim_idle_s``. Tidying (best effort, at most 2 s): this
        process's reply stream is deleted (its results have no reader any more), and
        its consumer leaves each edge's group where it holds no pending entry.
        """
        self._reading = False
        # Sends, cancels and ready() waiting for the bind, or retrying while Redis is
        # away, end now (FlowNotRunning); settles still due are flushed below.
        self._unbinding.set()
        self._ready.set()
        if not self._flushed.is_set() and self._bind_error is None:
            # Settles still due are flushed first (else their entries would run again).
            with contextlib.suppress(Exception, TimeoutError):
                await asyncio.wait_for(self._flushed.wait(), 2.0)
        self._stopping = True
        self._settle_due.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._binding is not None and self._redis is not None and self._bind_error is None:
            await self._tidy(self._binding.worker_id)
        while self._spare:
            await _drop(self._redis.connection_pool, self._spare.pop())
        if self._redis is not None and self._own_client:
            with contextlib.suppress(Exception):
                await self._redis.aclose()
            self._redis = None
        self._binding = None
        self._bind_error = None
        self._ready.clear()
        self._unbound = True
        self._in_hand.clear()
        self._settling.clear()
        self._flushed.set()
        self._drained.set()

    async def _tidy(self, worker_id: str) -> None:
        async def tidy() -> None:
            await self._redis.delete(self.reply_stream(worker_id))
            if self._edge_streams:
                await self._eval("RETIRE", self._edge_streams, [GROUP, worker_id])
        try:
            await asyncio.wait_for(tidy(), 2.0)
        except (Exception, TimeoutError) as exc:  # Redis away: the TTLs tidy up later
            logger.info("bus_tidy_skipped", extra={"error": safe_repr(exc, 300)})

    # -- sending ---------------------------------------------------------------------

    async def send(self, parcel: Parcel, *, maxsize: int) -> str | None:
        """Add ``parcel`` to its edge's stream (see :class:`penguiflow.binding.DeliveringBus`).

        Waits while the edge is full and while Redis is unreachable.

        Raises:
            BusBindError: Redis refused the bus.
            FlowNotRunning: (a ``RuntimeError``) the flow stopped while the send
                waited (for the bind, for Redis, or for room on the edge).
        """
        binding = await self._bound("this send was not made")
        hop_key = f"{self._prefix()}:hop:{parcel.hop}"
        edge = binding.edges.get(parcel.edge)
        if edge is not None and edge.to_rookery:
            # A result never waits for its reader (a departed client would stall the
            # senders for ever): no capacity, and the stream expires without a reader.
            stream = self.reply_stream(parcel.reply_to)
            head: list[Any] = [0, int(self.dedup_ttl_s), b"ttl", int(self.reply_ttl_s)]
        else:
            stream = self.edge_stream(parcel.edge)
            head = [max(maxsize, 0), int(self.dedup_ttl_s)]
        # Four fields, not eight: redis-py encodes each argument and parses each reply
        # string in Python, per hop. ``m`` joins the generated ASCII ids (no spaces).
        args = [*head, b"e", parcel.edge, b"d", parcel.data, b"t", _text(parcel.trace_id),
                b"m", f"{parcel.reply_to} {parcel.hop} {parcel.inv or '-'} {parcel.ts!r} "
                      f"{parcel.traceparent or '-'}"]
        pause = 0.0005
        while True:
            result = await self._retrying(
                "send", self._eval, "SEND", [stream, hop_key], args)
            if result == -1:  # the edge is full: wait for its consumers
                self.stats["full_waits"] += 1
                await asyncio.sleep(pause)
                pause = min(pause * 2, 0.05)
                if self._unbinding.is_set():
                    raise FlowNotRunning(
                        f"PenguiFlow stopped while this send waited for room on edge "
                        f"{parcel.edge!r} (full): it was not sent; call run() again first")
                continue
            if result == 0:
                self.stats["duplicates"] += 1
                return None
            self.stats["sent"] += 1
            return result.decode() if isinstance(result, bytes) else str(result)

    # -- delivering ------------------------------------------------------------------

    async def _read(self, stream: str) -> None:
        binding = self._binding
        assert binding is not None
        consumer = binding.worker_id
        # A blocking read holds a connection anyway: this reader keeps its own and
        # sends one command packed once, past redis-py's per-call pool, retry and
        # reply-callback layers (about 40 us per read here, on every hop's path).
        pool = self._redis.connection_pool
        conn: Any = None
        packed: Any = None
        # First, the entries Redis counts as handed to this consumer already: those
        # an earlier run of this flow (same worker id) took and did not settle
        # before it stopped (stop() drops them from the local queues). Read back at
        # once, not claimed after claim_idle_s; none for a new worker id.
        recover = True
        try:
            while not self._stopping:
                if not self._reading:
                    await asyncio.sleep(0.05)
                    continue
                try:
                    if conn is None:
                        conn = _own(await pool.get_connection())
                        packed = conn.pack_command(
                            "XREADGROUP", "GROUP", GROUP, consumer, "COUNT", self.prefetch,
                            "BLOCK", self.block_ms, "STREAMS", stream, ">")
                    if recover:
                        await self._recover(conn, stream, consumer)
                        recover = False
                    async with asyncio.timeout(self.block_ms / 1000 + self.link_timeout_s):
                        await conn.send_packed_command(packed, check_health=False)
                        reply = await conn.read_response()
                    self._link_up()
                except _LINK_ERRORS as exc:
                    await _drop(pool, conn)
                    conn = None
                    # A read whose reply the broken link lost still handed its entries
                    # to this consumer: read them back first (a reply stream has no
                    # claimer; an edge's would wait claim_idle_s).
                    recover = True
                    await self._link_down("read", exc)
                    continue
                except ResponseError as exc:
                    # The stream is gone: lost by a restart without AOF (NOGROUP), or
                    # deleted or expired under the blocked read (UNBLOCKED): again.
                    if "NOGROUP" in str(exc) or "UNBLOCKED" in str(exc):
                        await self._retrying("recreate a group", self._ensure_group, stream)
                        continue
                    if _temporary(exc):  # a replica after a failover: wait it out
                        await self._link_down("read", exc)
                        continue
                    # Anything else: said and retried, never a reader that silently died
                    # (its edge, or its client's results, would wait for ever).
                    await self._read_failed(stream, exc)
                    continue
                if not reply:
                    continue
                # RESP2: [[stream, entries]]; RESP3: {stream: entries}. An entry is
                # [id, [field, value, ...]].
                for _stream, entries in (reply.items() if isinstance(reply, dict) else reply):
                    # All of the read is in hand (refreshed) at once: delivering one may
                    # wait for room on its floe, and the rest must not go idle meanwhile.
                    for entry, _flat in entries:
                        self._hold(stream, _str(entry))
                    for entry, flat in entries:
                        await self._deliver_or_let_go(stream, entry, flat, 1)
                # Let the nodes just handed work start before the next read is sent
                # (a trace's path; the read only waits): -40 us per hop at low load.
                await asyncio.sleep(0)
        finally:
            # Stopped (or cancelled) mid-read: the reply may still come, so the
            # connection cannot serve another command; closed, then handed back.
            await _drop(pool, conn)

    async def _recover(self, conn: Any, stream: str, consumer: str) -> None:
        """Deliver the entries Redis counts as handed to this consumer on ``stream``
        and this process does not hold (a read's reply lost with the link).

        Found with XPENDING (this consumer's) and read with XRANGE: neither counts
        as a delivery. XREADGROUP with an id would add one to every pending entry,
        those being run here included, each time a link breaks, until a healthy
        entry reached ``max_deliveries`` and was dead-lettered by a claimer.
        """
        start = "-"
        while True:
            async with asyncio.timeout(self.link_timeout_s):
                await conn.send_packed_command(conn.pack_command(
                    "XPENDING", stream, GROUP, start, "+", self.prefetch, consumer),
                    check_health=False)
                rows = await conn.read_response()
            if not rows:
                return
            # Checked against the live set and the entries settled lately, and held,
            # with no await in between: the claimer must see every entry held here
            # (setdefault: the set it looks at), or both would deliver it; and an
            # entry run and settled since XPENDING answered is not run again.
            held = self._in_hand.setdefault(stream, set())
            found: list[tuple[str, int]] = []
            for row in rows:
                entry_id = _str(row[0])
                if entry_id in held or (stream, entry_id) in self._settled_lately:
                    continue
                self._hold(stream, entry_id)
                found.append((entry_id, int(row[3])))
            start = _after(_str(rows[-1][0]))
            if not found:
                continue
            # Held from here on: whatever cuts this short (the link breaking before
            # XRANGE answers, a stop) lets go of those not yet delivered, or they
            # would stay held here for ever: skipped by the next recovery, kept
            # alive (so never claimed) and never run.
            undelivered = dict(found)
            try:
                async with asyncio.timeout(self.link_timeout_s):
                    await conn.send_packed_command(conn.pack_commands(
                        [("XRANGE", stream, entry_id, entry_id) for entry_id, _n in found]),
                        check_health=False)
                    replies = [await conn.read_response() for _ in found]
                for (entry_id, times), reply in zip(found, replies, strict=True):
                    del undelivered[entry_id]
                    if not reply or not reply[0][1]:
                        # Deleted while pending: nothing to run, only to drop.
                        self._let_go(stream, entry_id)
                        await self._redis.xack(stream, GROUP, entry_id)
                        continue
                    self.stats["recovered"] += 1
                    await self._deliver_or_let_go(stream, entry_id, reply[0][1],
                                                  max(times, 1))
            finally:
                for entry_id in undelivered:
                    self._let_go(stream, entry_id)

    async def _deliver_or_let_go(self, stream: str, entry: bytes | str, flat: Any,
                                 deliveries: int) -> None:
        """:meth:`_deliver`, for a reader: an entry that breaks it anyway (a hostile
        one whose error cannot even be rendered, a binding that failed on it) is
        logged (``bus_deliver_failed``), counted (``deliver_errors``) and let go:
        claimed again after ``claim_idle_s``, and dead-lettered after
        ``max_deliveries``. The reader goes on with the next entry."""
        try:
            await self._deliver(stream, entry, _pairs(flat), deliveries)
        except Exception as exc:
            entry_id = _str(entry) if isinstance(entry, (bytes, str)) else safe_repr(entry)
            self.stats["deliver_errors"] += 1
            logger.error("bus_deliver_failed", extra={
                "stream": stream, "entry": entry_id,
                "error": f"{type(exc).__name__}: {safe_str(exc, 300)}"})
            self._let_go(stream, entry_id)

    async def _deliver(self, stream: str, entry: bytes | str, fields: Mapping[bytes, bytes],
                       deliveries: int, *, previous: str | None = None) -> None:
        binding = self._binding
        assert binding is not None
        entry_id = entry.decode() if isinstance(entry, bytes) else entry
        handle = self._hold(stream, entry_id)
        try:
            parcel = _parcel(fields)
        except (KeyError, ValueError, UnicodeDecodeError) as exc:
            self.stats["undecodable"] += 1
            logger.error("bus_entry_undecodable", extra={
                "stream": stream, "entry": entry_id, "error": safe_repr(exc, 500)})
            await self.settle(Inbound(None, 0.0, None, "?", handle, "", "", deliveries))
            return
        self.stats["delivered"] += 1
        misplaced = self._misplaced(stream, parcel.edge)
        if misplaced is not None:
            await binding.reject(parcel, handle=handle, deliveries=deliveries,
                                 reason=misplaced)
            return
        try:
            await binding.deliver(parcel, handle=handle, deliveries=deliveries,
                                  previous=previous)
        except Exception as exc:
            # An entry whose fields decode yet break delivery (written by someone
            # else than a bus) loses only itself: the reader that took it goes on.
            await binding.reject(parcel, handle=handle, deliveries=deliveries,
                                 reason=f"cannot deliver it: {type(exc).__name__}: "
                                        f"{safe_str(exc, 300)}")

    def _misplaced(self, stream: str, edge: str) -> str | None:
        """Why an entry of ``stream`` naming ``edge`` cannot be delivered, or None.

        A stream carries its own edge's entries, the reply stream only results: an
        entry naming another edge (not written by a bus) would be put on a queue
        that no node here takes from, and held, never settled, for ever."""
        binding = self._binding
        assert binding is not None
        expected = self._stream_edges.get(stream)
        if expected is not None:
            if edge == expected:
                return None
        else:
            found = binding.edges.get(edge)
            if found is not None and found.to_rookery:
                return None
        return (f"an entry of stream {stream!r} names edge {edge!r}: a stream carries "
                f"only {'its edge ' + repr(expected) if expected else 'results'}")

    def _hold(self, stream: str, entry_id: str) -> _Handle:
        """Count an entry as in hand (kept alive, awaited by :meth:`drain`) until its
        settle is written; its handle."""
        self._in_hand.setdefault(stream, set()).add(entry_id)
        self._drained.clear()
        return _Handle(stream, entry_id)

    def _let_go(self, stream: str, entry_id: str) -> None:
        """Stop holding an entry not settled (it goes idle: claimable again)."""
        held = self._in_hand.get(stream)
        if held is not None:
            held.discard(entry_id)
        if not any(self._in_hand.values()):
            self._drained.set()

    async def settle(self, inbound: Inbound) -> None:
        """Acknowledge and delete the entry of ``inbound``.

        Returns at once: the settles due are flushed together by one task, in one
        Redis call (retried while Redis is away; an entry not flushed by unbind is
        delivered again). The entry stays in hand (refreshed, counted by
        :meth:`drain`) until its settle is written.
        """
        handle = inbound.handle
        if not isinstance(handle, _Handle):
            return
        self._settling.append((handle.stream, handle.entry))
        self._flushed.clear()
        self._settle_due.set()

    async def _settler(self) -> None:
        while not self._stopping:
            await self._settle_due.wait()
            # One loop turn later: what else is ready (a delivery, a node's output) goes
            # first, being on a trace's path, and more settles join this batch.
            await asyncio.sleep(0)
            self._settle_due.clear()
            while self._settling:
                batch, self._settling = self._settling, []
                try:
                    failed = await self._retrying(
                        "settle", self._eval, "SETTLE", [s for s, _ in batch],
                        [GROUP, *(e for _, e in batch)])
                except _LINK_ERRORS:
                    raise  # only when stopping: the entries will be delivered again
                except Exception as exc:  # not the script's own refusals (see SETTLE)
                    failed = list(range(1, len(batch) + 1))
                    logger.error("bus_settle_failed", extra={
                        "entries": len(batch), "error": safe_repr(exc, 300)})
                if failed:  # each refused entry loses only itself (a key of another type)
                    logger.error("bus_settle_refused", extra={
                        "entries": [f"{batch[int(i) - 1][0]}/{batch[int(i) - 1][1]}"
                                    for i in failed[:20]], "refused": len(failed)})
                self.stats["settled"] += len(batch) - len(failed or ())
                refused = {int(i) - 1 for i in failed or ()}
                lately = self._settled_lately
                for at, (stream, entry) in enumerate(batch):
                    held = self._in_hand.get(stream)
                    if held is not None:
                        held.discard(entry)
                    if at not in refused:  # a refused one is still pending: claimable
                        lately[stream, entry] = None
                while len(lately) > _SETTLED_LATELY_MAX:
                    lately.popitem(last=False)
                if not any(self._in_hand.values()):
                    self._drained.set()
            self._flushed.set()

    async def _keep_alive(self) -> None:
        """Refresh the entries held here, and the reply stream's TTL."""
        binding = self._binding
        assert binding is not None
        consumer = binding.worker_id
        # Often enough for the reply stream's TTL too (it must not expire under us).
        period = min(self.claim_idle_s, self.reply_ttl_s) / 3
        reply = self.reply_stream(consumer)
        while not self._stopping:
            await asyncio.sleep(period)
            try:
                # The reply stream lives while its reader does (see reply_ttl_s); this
                # is also the command that proves the link is up when idle.
                await self._redis.expire(reply, int(self.reply_ttl_s))
                for stream, held in list(self._in_hand.items()):
                    if held:  # JUSTID: resets the idle time, not the delivery count
                        await self._redis.xclaim(stream, GROUP, consumer, 0, list(held),
                                                 justid=True)
                self._link_up()
            except _LINK_ERRORS as exc:
                await self._link_down("refresh", exc)
            except ResponseError as exc:
                if _temporary(exc):
                    await self._link_down("refresh", exc)
                else:
                    logger.error("bus_refresh_failed", extra={"error": str(exc)[:300]})
            except Exception as exc:  # never a keep-alive that silently died
                logger.error("bus_refresh_failed", extra={"error": safe_repr(exc, 300)})

    async def _claimer(self) -> None:
        """Claim the idle entries of dead processes. A task of its own, apart from
        :meth:`_keep_alive`: delivering a claimed entry may wait for room on its floe,
        and meanwhile the entries held here must still be refreshed (else they go
        idle, are claimed elsewhere and count deliveries towards ``max_deliveries``)."""
        binding = self._binding
        assert binding is not None
        consumer = binding.worker_id
        idle_ms = int(self.claim_idle_s * 1000)
        while not self._stopping:
            await asyncio.sleep(self.claim_idle_s / 3)
            if not self._reading:
                continue
            try:
                for stream in self._edge_streams:
                    await self._claim(stream, consumer, idle_ms)
                self._link_up()
            except _LINK_ERRORS as exc:
                await self._link_down("claim", exc)
            except ResponseError as exc:
                if _temporary(exc):
                    await self._link_down("claim", exc)
                elif "NOGROUP" not in str(exc):
                    logger.error("bus_claim_failed", extra={"error": str(exc)})
            except Exception as exc:  # never a claimer that silently died
                logger.error("bus_claim_failed", extra={"error": safe_repr(exc, 300)})

    async def _claim(self, stream: str, consumer: str, idle_ms: int) -> None:
        """Take over the entries idle for ``idle_ms`` (their process stopped refreshing
        them: it died). XPENDING first, for who held them and how often they were
        delivered (the store records both), then XCLAIM, which skips any entry its
        holder refreshed meanwhile."""
        rows = await self._redis.xpending_range(stream, GROUP, min="-", max="+",
                                                count=self.prefetch, idle=idle_ms)
        if not rows:
            return
        held = {_str(row["message_id"]): (_str(row["consumer"]), int(row["times_delivered"]))
                for row in rows}
        mine = self._in_hand.get(stream, set())
        # An entry this process holds is being run here (refreshed, or read back by
        # a reader after a broken link): claiming it would run it twice.
        held = {entry: row for entry, row in held.items() if entry not in mine}
        if not held:
            return
        claimed = await self._redis.xclaim(stream, GROUP, consumer, idle_ms, list(held))
        # A reader recovering after a broken link may have taken one of these while
        # XCLAIM was in flight, and even run and settled it since: checked against
        # the live set and the entries settled lately, and held with no await in
        # between, so each entry is delivered once here.
        mine = self._in_hand.setdefault(stream, set())
        lately = self._settled_lately
        taken = {entry_id for entry_id in map(_str, (e for e, _f in claimed))
                 if entry_id in mine or (stream, entry_id) in lately}
        for entry, fields in claimed:  # all in hand at once, as a read's (see _read)
            if fields and _str(entry) not in taken:
                self._hold(stream, _str(entry))
        found = set()
        for entry, fields in claimed:
            entry_id = _str(entry)
            found.add(entry_id)
            if not fields or entry_id in taken:
                continue
            previous, times = held.get(entry_id, (None, 1))
            try:
                if times >= self.max_deliveries:
                    await self._dead_letter(stream, entry_id, fields, times, previous)
                    continue
                self.stats["claimed"] += 1
                await self._deliver(stream, entry, fields, times + 1, previous=previous)
            except Exception as exc:
                # One entry Redis refuses to move (a dead-letter key of another type)
                # loses only its turn: let go of it (claimed again later), go on with
                # the rest, which are held and would otherwise never be delivered.
                logger.error("bus_claim_entry_failed", extra={
                    "stream": stream, "entry": entry_id, "error": safe_repr(exc, 300)})
                self._let_go(stream, entry_id)
        for gone in set(held) - found:
            # Deleted while pending (or claimed by another process first): nothing to
            # run here; XACK drops a deleted one from the pending list, else a no-op.
            if not await self._redis.xrange(stream, min=gone, max=gone):
                await self._redis.xack(stream, GROUP, gone)

    async def _dead_letter(self, stream: str, entry_id: str, fields: Mapping[bytes, bytes],
                           times: int, previous: str | None) -> None:
        """Move an entry handed out ``times`` times, never settled, to the edge's
        dead-letter stream, then settle it (``message_undeliverable``)."""
        binding = self._binding
        assert binding is not None
        label = fields.get(b"e", b"?").decode("utf-8", "replace")
        reason = (f"delivered {times} times (max_deliveries={self.max_deliveries}) and "
                  f"never settled: every process that took it stopped (last: "
                  f"{previous or '?'}); kept in {self.dead_stream(label)}")
        # Moved in one step (the DEAD script): a crash cannot leave it both here and
        # there. The settle below (a no-op at Redis by then) ends its time in hand;
        # a process dying before it records message_undeliverable loses only that
        # event. A foreign entry of very many fields keeps the parcel's own (the
        # script passes them through Lua's unpack, which takes ~8,000 values).
        kept = fields if len(fields) <= _DEAD_FIELDS_MAX else {
            k: v for k, v in fields.items() if k in _PARCEL_FIELDS}
        pairs = {**kept, b"entry": entry_id, b"deliveries": str(times),
                 b"previous_worker": previous or "", b"reason": reason}
        if kept is not fields:
            pairs[b"dropped_fields"] = str(len(fields) - len(kept))
        await self._retrying("dead-letter", self._eval, "DEAD",
                             [self.dead_stream(label), stream],
                             [GROUP, entry_id, *(x for kv in pairs.items() for x in kv)])
        self.stats["dead_lettered"] += 1
        handle = self._hold(stream, entry_id)
        try:
            parcel = _parcel(fields)
        except (KeyError, ValueError, UnicodeDecodeError):
            await self.settle(Inbound(None, 0.0, None, label, handle, "", "", times))
            return
        await binding.reject(parcel, handle=handle, deliveries=times, reason=reason)

    # -- cancellation ----------------------------------------------------------------

    async def cancel(self, trace_id: str) -> None:
        """Broadcast that ``trace_id`` is cancelled (every bound process applies it).

        Raises:
            BusBindError: Redis refused the bus.
            FlowNotRunning: (a ``RuntimeError``) the flow stopped while the cancel
                waited (for the bind, or for Redis).
        """
        await self._bound("this cancel was not broadcast")
        await self._retrying("cancel", self._redis.xadd, f"{self._prefix()}:control",
                             {b"cancel": trace_id.encode("utf-8", "surrogatepass")},
                             maxlen=10_000, approximate=True)
        self.stats["cancels_sent"] += 1

    async def _control(self, control: str, last: bytes) -> None:
        binding = self._binding
        assert binding is not None
        while not self._stopping:
            try:
                reply = await self._redis.xread({control: last}, block=self.block_ms,
                                                count=100)
                self._link_up()
                entries = list(_read_entries(reply))
            except _LINK_ERRORS as exc:
                await self._link_down("control", exc)
                continue
            except ResponseError as exc:
                if "UNBLOCKED" in str(exc):  # Redis became a replica under the read: again
                    continue
                if _temporary(exc):
                    await self._link_down("control", exc)
                else:
                    await self._read_failed(control, exc)
                continue
            except Exception as exc:
                # Never a control reader that silently died: cancels from other
                # processes would no longer be applied here.
                await self._read_failed(control, exc)
                continue
            for entry, fields in entries:
                last = entry
                trace = fields.get(b"cancel")
                if trace:
                    self.stats["cancels_received"] += 1
                    try:
                        await binding.cancelled_elsewhere(
                            trace.decode("utf-8", "surrogatepass"))
                    except Exception as exc:
                        logger.error("bus_cancel_failed", extra={"error": safe_repr(exc)})

    async def _read_failed(self, stream: str, exc: Exception) -> None:
        """A read Redis refused (not a link error, not a temporary refusal: a key of
        another type, ...): logged, counted (``read_errors``), retried after
        ``max_backoff_s``."""
        self.stats["read_errors"] += 1
        logger.error("bus_read_failed", extra={
            "stream": stream, "error": f"{type(exc).__name__}: {safe_str(exc, 300)}"})
        await asyncio.sleep(self.max_backoff_s)

    # -- join_k ----------------------------------------------------------------------

    async def gather(self, key: str, member: str, data: bytes, k: int
                     ) -> tuple[list[bytes] | None, bool]:
        """Add ``data`` (once per ``member``) to the shared group ``key``; the group's
        first ``k`` items once complete (else None), and whether ``member`` was new."""
        base = f"{self._prefix()}:join:{key}"
        reply = await self._retrying(
            "join", self._eval, "GATHER", [f"{base}:items", f"{base}:members"],
            [member, data, k, int(self.join_ttl_s)])
        complete, new = int(reply[0]), bool(int(reply[1]))
        return (list(reply[2:]) if complete else None), new

    async def _eval(self, name: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """Run script ``name`` by its SHA, loaded again if Redis lost it (a restart
        empties the script cache).

        On a connection of the bus's own (:attr:`_spare`), with the command packed
        and its reply read directly: redis-py's ``execute_command`` takes a pooled
        connection (a lock, connection metrics, a readiness probe), wraps the call in
        its retry layer and releases it, ~40 us of a SEND's ~100 here, on every
        hop's path. A connection whose exchange did not complete (a broken link, a
        cancel mid-reply) may hold part of a reply: it is closed, never reused; one
        that carried a whole reply, an error reply included, is kept, up to
        :data:`_SPARE_MAX` (more go back to the pool, which the other loops share).
        A kept connection idle past the client's health-check interval is pinged
        before use; a link error drops every kept one (after a Redis restart they
        are all dead).
        """
        script = self._scripts[name]
        pool = self._redis.connection_pool
        conn = self._spare.pop() if self._spare else _own(await pool.get_connection())
        whole = False
        try:
            async with asyncio.timeout(self.link_timeout_s):
                try:
                    await conn.send_packed_command(conn.pack_command(
                        "EVALSHA", script.sha, len(keys), *keys, *args), check_health=True)
                    reply = await conn.read_response()
                except NoScriptError:
                    await conn.send_packed_command(conn.pack_command(
                        "SCRIPT", "LOAD", script.script), check_health=False)
                    await conn.read_response()
                    await conn.send_packed_command(conn.pack_command(
                        "EVALSHA", script.sha, len(keys), *keys, *args), check_health=False)
                    reply = await conn.read_response()
            whole = True
            return reply
        except ResponseError:
            whole = True  # an error reply is a whole reply: the link is in step
            raise
        except _LINK_ERRORS:
            while self._spare:
                await _drop(pool, self._spare.pop())
            raise
        finally:
            if not whole or self._stopping:
                await _drop(pool, conn)
            elif len(self._spare) < _SPARE_MAX:
                self._spare.append(conn)
            else:
                await pool.release(_shared(pool, conn))

    # -- the link --------------------------------------------------------------------

    async def _retrying(self, doing: str, call: Any, *args: Any, fail_refused: bool = False,
                        **kwargs: Any) -> Any:
        """``await call(...)``, retried with backoff while Redis is unreachable.

        ``fail_refused``: a refusal of the credentials (:data:`_REFUSALS`) is raised,
        not retried (binding: a wrong password is no outage to wait out).

        Raises:
            FlowNotRunning: unbind started. Not for a settle: unbind flushes the
                settles due first; once it stops, a settle raises its link error.
        """
        settle = doing == "settle"
        failed: Exception | None = None
        while True:
            if self._unbinding.is_set() and not settle:
                if failed is None:
                    raise FlowNotRunning(
                        f"PenguiFlow stopped before this {doing} was sent to Redis; call "
                        f"run() again first")
                raise FlowNotRunning(
                    f"PenguiFlow stopped while this {doing} was retried (Redis at "
                    f"{_redact(self.url)}: {type(failed).__name__}: {failed}): it may not "
                    f"have reached Redis; call run() again first") from failed
            try:
                result = await call(*args, **kwargs)
            except _LINK_ERRORS as exc:
                if fail_refused and isinstance(exc, _REFUSALS):
                    raise
                if self._stopping and settle:
                    raise
                failed = exc
                await self._link_down(doing, exc, interrupt=not settle)
                continue
            except ResponseError as exc:
                if not _temporary(exc) or (self._stopping and settle):
                    raise
                failed = exc
                await self._link_down(doing, exc, interrupt=not settle)
                continue
            self._link_up()
            return result

    async def _link_down(self, doing: str, exc: BaseException, *,
                         interrupt: bool = False) -> None:
        """Count and log (once per outage) a failed call, then back off.

        ``interrupt``: the back-off ends early when unbind starts (a send or a
        cancel, which then ends instead of retrying)."""
        if isinstance(exc, MaxConnectionsError):
            # Not Redis: the pool is out of connections (a capped client= shared
            # with other users, or a max_connections in the URL). Waited out, said
            # as what it is.
            self.stats["pool_waits"] += 1
            if self.stats["pool_waits"] == 1 or self.stats["pool_waits"] % 1000 == 0:
                logger.warning("bus_pool_exhausted", extra={
                    "doing": doing, "waits": self.stats["pool_waits"],
                    "hint": ("the connection pool of the client passed as client= "
                             "(max_connections) is too small for this bus and its "
                             "other users: raise its max_connections"
                             if not self._own_client else
                             "max_connections in the bus URL is too small for this "
                             "bus's concurrent sends: raise it, or drop it (the bus's "
                             "own pool is then uncapped)")})
            await self._back_off(0.01, interrupt)
            return
        self.stats["link_errors"] += 1
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
            logger.warning("bus_redis_unreachable", extra={
                "doing": doing, "error": safe_repr(exc, 300), "url": _redact(self.url)})
        down = now - self._down_since
        await self._back_off(min(self.max_backoff_s, 0.05 * 2 ** min(down, 10)), interrupt)

    async def _back_off(self, pause: float, interrupt: bool) -> None:
        """Sleep ``pause`` s; ``interrupt``: ended early when unbind starts."""
        if interrupt:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await self._unbinding.wait()
        else:
            await asyncio.sleep(pause)

    def _link_up(self) -> None:
        if self._down_since is not None:
            down = time.monotonic() - self._down_since
            self._down_since = None
            self.stats["reconnects"] += 1
            logger.warning("bus_redis_reconnected", extra={
                "down_s": round(down, 3), "link_errors": self.stats["link_errors"],
                "reconnects": self.stats["reconnects"]})

    def _register_metrics(self) -> None:
        """Report :attr:`stats` as ``penguiflow.bus.<name>`` counters, one point per bus
        (attribute ``pf.worker.id``). Instruments are made once per meter provider
        (a second one of the same name would be refused), for every bus using it."""
        key = self._meter_provider if self._meter_provider is not None else _GLOBAL_METER
        buses = _METERED.get(key)
        if buses is None:
            buses = _METERED[key] = weakref.WeakSet()
            _make_instruments(self._meter_provider, buses)
        buses.add(self)


_GLOBAL_METER = type("_GlobalMeterProvider", (), {})()
#: The buses each meter provider reports (instruments made once per provider).
_METERED: weakref.WeakKeyDictionary[Any, weakref.WeakSet[RedisMessageBus]] = (
    weakref.WeakKeyDictionary())


def _make_instruments(provider: Any, buses: weakref.WeakSet[RedisMessageBus]) -> None:
    from opentelemetry import metrics

    meter = (provider.get_meter("penguiflow_distributed") if provider is not None
             else metrics.get_meter("penguiflow_distributed"))

    def observe(name: str) -> Any:
        def callback(_options: Any) -> Iterable[metrics.Observation]:
            for bus in list(buses):
                binding_id = bus._worker_id
                yield metrics.Observation(bus.stats[name], {"pf.worker.id": binding_id})
        return callback

    for name in _STATS:
        meter.create_observable_counter(f"penguiflow.bus.{name}", callbacks=[observe(name)])


def _read_entries(reply: Any) -> Iterator[tuple[Any, Any]]:
    """``(id, fields)`` of each entry of an XREAD reply as redis-py parses it: RESP2
    ``[[stream, entries]]``; RESP3 ``{stream: [entries]}``, where redis-py's parser
    (8.x) wraps each stream's entries in one more list."""
    if not reply:
        return
    groups = reply.values() if isinstance(reply, dict) else (group for _s, group in reply)
    for group in groups:
        for item in group:
            if item and isinstance(item[0], (bytes, str)):
                yield item[0], item[1]
            else:  # the RESP3 wrapper: a list of entries
                for entry in item:
                    yield entry[0], entry[1]


def _own(conn: Any) -> Any:
    """A pool's connection taken for the bus's own exchanges (scripts, blocking
    reads), whose deadlines the bus sets itself (``asyncio.timeout`` around each
    exchange): redis-py's ``socket_timeout`` would wrap every write in
    ``asyncio.wait_for``, a task and a loop turn more per send on every hop. The
    connection's own timeout is kept aside for :func:`_shared`."""
    if not hasattr(conn, "_pf_socket_timeout"):
        conn._pf_socket_timeout = conn.socket_timeout
    conn.socket_timeout = None
    return conn


def _shared(pool: Any, conn: Any) -> Any:
    """``conn`` with its own socket timeout again (see :func:`_own`), to be given back
    to ``pool`` (a user's client's pool keeps its settings)."""
    if hasattr(conn, "_pf_socket_timeout"):
        conn.socket_timeout = conn._pf_socket_timeout
    return conn


async def _drop(pool: Any, conn: Any) -> None:
    """Close a connection of the bus's own and give it back to ``pool`` (None:
    nothing). The slot goes back to the pool even when closing fails or the caller
    is cancelled meanwhile, so the pool's connection cap is never eaten away."""
    if conn is not None:
        try:
            with contextlib.suppress(Exception):
                await conn.disconnect(nowait=True)
        finally:
            with contextlib.suppress(Exception):
                await pool.release(_shared(pool, conn))


def _check_url(url: str) -> None:
    """Refuse, now, a Redis URL redis-py would refuse on the first connection, or
    would read otherwise than meant: an ``@`` after the host part (a password
    holding an unescaped ``/``, ``?`` or ``#`` is read as the host, the port or
    the path). redis-py's reason is given with the URL's user part masked.

    Raises:
        InvalidArgument: a port that is no number, an option of the wrong type, ...
    """
    if _userinfo_misread(url):
        # Refused even where redis-py would take it: it would read another host,
        # port or option than meant (and show the password in its errors).
        raise InvalidArgument(
            f"the bus URL {_redact(url)!r} cannot be used: an '@' stands after its "
            f"host part, so a user name or password before it that holds an unescaped "
            f"'/', '?' or '#' would be read as the host, port, path or options; "
            f"percent-encode them, e.g. urllib.parse.quote(password, safe='') (an '@' "
            f"in the path or the options: %40)")
    try:
        parse_url(url)
    except ValueError as exc:
        raise InvalidArgument(
            f"the bus URL {_redact(url)!r} cannot be used: {_scrub(str(exc), url)} (e.g. "
            f"redis://host:6379/0?socket_timeout=5)") from None


def _userinfo_span(url: str) -> tuple[int, int] | None:
    """Where the URL's user part is (None: it has none): the authority's, up to its
    last ``@``; or, when the URL is misread (:func:`_userinfo_misread`), everything
    from after ``://`` to the URL's last ``@`` (failing closed: the password may
    run into what urllib reads as the path or the options). An ``@`` in the path or
    the options of a URL read as meant (``?client_name=me@host``) is none."""
    start = url.find("://")
    if start < 0 or url.find("@", start + 3) < 0:
        return None
    if not _userinfo_misread(url):
        netloc = urlsplit(url).netloc
        user = netloc.rpartition("@")[0]
        if not user and "@" not in netloc:
            return None
        if url.startswith(netloc, start + 3):
            return start + 3, start + 3 + len(user)
    return start + 3, url.rfind("@")


@functools.cache
def _option_names() -> frozenset[str]:
    """The options a Redis URL's query may name: redis-py's (it hands any other on
    to its connection, which refuses it) and the bus's own (:meth:`from_url`)."""
    from redis.asyncio import connection

    names = set(connection.URL_QUERY_ARGUMENT_PARSERS) | set(_URL_KEYWORDS)
    for cls in (connection.AbstractConnection, connection.Connection,
                connection.SSLConnection, connection.UnixDomainSocketConnection,
                connection.ConnectionPool):
        with contextlib.suppress(TypeError, ValueError):
            names.update(inspect.signature(cls.__init__).parameters)
    return frozenset(names - {"self", "args", "kwargs"})


def _userinfo_misread(url: str) -> bool:
    """Whether an ``@`` of the URL may end a user part urllib (and redis-py) do not
    read as one: a user name or password holding an unescaped ``/``, ``?`` or ``#``
    cuts the authority short, and the rest of it is read as the host, the port,
    the path or the options.

    Not when each ``@`` past the authority's own user part (if any) sits where it
    is read as meant: in the socket path of a unix URL without a user part
    (``unix:///run/r@1.sock``), or in an
    option's value, redis-py's or the bus's, with text before it and no ``/``,
    ``?`` or ``:`` after it (``?client_name=worker@host-1``). An ``@`` in a Redis
    db, in the fragment, in any other query item, or before what looks like a port
    or a path
    (``redis://u:9?a=pw@host:6379/0``) is misread; so is an authority without a
    user part, followed by an ``@``, that is no host[:port] (a port that is no
    number: ``redis://u:p?w@host``)."""
    start = url.find("://")
    if start < 0 or url.find("@", start + 3) < 0:
        return False
    try:
        parts = urlsplit(url)
    except ValueError:  # an unbalanced '[' ...
        return True
    if "@" in parts.fragment:
        return True
    if parts.scheme == "unix":
        # A socket path may hold an '@' when the URL has no user part (one there
        # may be a password's end); the authority is empty, or a user part.
        return (parts.netloc.rpartition("@")[2] != ""
                or ("@" in parts.netloc and "@" in parts.path)
                or _query_misread(parts.query))
    if "@" not in parts.netloc:
        # No user part: an authority cut short by one is no host[:port].
        try:
            parts.port  # noqa: B018 - raises on a port that is no number
        except ValueError:
            return True
        if not parts.hostname:
            return True
    # The path is a db number: an '@' there was not meant for it.
    return "@" in parts.path or _query_misread(parts.query)


def _query_misread(query: str) -> bool:
    """Whether an ``@`` in ``query`` may end a user part (see
    :func:`_userinfo_misread`)."""
    for item in query.split("&"):
        if "@" not in item:
            continue
        name, equals, value = item.partition("=")
        if not equals or name not in _option_names():
            return True
        before, _at, after = value.rpartition("@")
        if not before or any(c in after for c in "/?:"):
            return True  # '=@host', or a host:port or a path after it
    return False


def _scrub(text: str, url: str) -> str:
    """``text`` (redis-py's reason) without any piece of ``url``'s user part, its
    password, or a secret-looking query value: each shown as ``***``."""
    pieces: set[str] = set()
    span = _userinfo_span(url)
    if span is not None:
        zone = url[span[0]:span[1]]
        pieces.add(zone)
        pieces.update(re.split(r"[:/?#@&=;]", zone))
        pieces.update(unquote_plus(p) for p in list(pieces))
    with contextlib.suppress(ValueError):
        parts = urlsplit(url)
        if parts.password:
            pieces.update((parts.password, unquote_plus(parts.password)))
        for name, value in parse_qsl(parts.query, keep_blank_values=True):
            if any(w in name.lower() for w in _SECRET_WORDS):
                pieces.add(value)
    for piece in sorted((p for p in pieces if p), key=len, reverse=True):
        if len(piece) >= 4:
            text = text.replace(piece, "***")
        else:  # short: only where it stands alone ('u' of a user name, not of 'out')
            text = re.sub(rf"(?<![0-9A-Za-z]){re.escape(piece)}(?![0-9A-Za-z])", "***", text)
    return text


def _check_client(client: Any) -> None:
    """Refuse a client the bus cannot read entries with.

    Raises:
        InvalidArgument: a client that decodes replies (``decode_responses=True``).
    """
    pool = getattr(client, "connection_pool", None)
    kwargs = getattr(pool, "connection_kwargs", None) or {}
    if kwargs.get("decode_responses"):
        raise InvalidArgument(
            "client= decodes replies (decode_responses=True): the bus stores binary "
            "payloads and reads entries as bytes, so every entry would be refused as "
            "undecodable and deleted; pass a client made without decode_responses "
            "(another client of the same URL may keep it), or pass the URL instead")


def _pairs(flat: Any) -> Mapping[bytes, bytes]:
    """An entry's ``[field, value, ...]`` as a mapping (RESP3 may give one already)."""
    if isinstance(flat, dict):
        return flat
    it = iter(flat)
    return dict(zip(it, it, strict=True))


def _after(entry_id: str) -> str:
    """The smallest stream entry id after ``entry_id`` (``ms-seq``)."""
    ms, _, seq = entry_id.partition("-")
    return f"{ms}-{int(seq or 0) + 1}"


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _text(value: str | None) -> bytes:
    return b"" if value is None else value.encode("utf-8", "surrogatepass")


def _none(value: bytes | None) -> str | None:
    return value.decode("utf-8", "surrogatepass") if value else None


def _parcel(fields: Mapping[bytes, bytes]) -> Parcel:
    """A stream entry's fields as the Parcel that was sent."""
    reply_to, hop, inv, ts, traceparent = fields[b"m"].decode().split(" ")
    return Parcel(
        edge=fields[b"e"].decode(), data=fields[b"d"], trace_id=_none(fields.get(b"t")),
        reply_to=reply_to, hop=hop, inv=None if inv == "-" else inv, ts=float(ts),
        traceparent=None if traceparent == "-" else traceparent)


#: Query items whose value is hidden by :func:`_redact` (redis-py takes a
#: ``?password=`` as the password, and a name with any of these parts may be one).
_SECRET_WORDS = ("pass", "pwd", "secret", "token", "auth", "credential", "key")


def _redact(url: str) -> str:
    """``url`` without its password: in the user part (``redis://u:***@h``) and in
    any query item whose name looks like a secret (``?password=***``).

    Fails closed: when an ``@`` past the authority urllib reads may end a user part
    (a password with an unescaped ``/``, ``?`` or ``#``: :func:`_userinfo_misread`),
    everything between ``://`` and the last ``@`` is masked (``redis://***@h``). An
    ``@`` read as meant (``?client_name=worker@host-1``) masks nothing: the host,
    port and db show; a query holding an ``@`` is masked whole (``?***``)."""
    span = _userinfo_span(url)
    if span is not None:
        if _userinfo_misread(url):
            url = url[:span[0]] + "***" + url[span[1]:]
        else:
            user, colon, _password = url[span[0]:span[1]].partition(":")
            url = url[:span[0]] + user + (":***" if colon else "") + url[span[1]:]
    base, question, rest = url.partition("?")
    query, hash_, fragment = rest.partition("#")
    if "@" in unquote_plus(query):
        # A value holding an '@' may end a password whose '?' urllib read as the
        # query's start (redis://admin:9?x&client_name=Secret@host): its items all
        # may be that password's, so none is shown.
        return base + question + "***" + hash_ + fragment
    items = []
    for item in query.split("&") if query else ():
        name, sep, _value = item.partition("=")
        if sep and any(w in unquote_plus(name).lower() for w in _SECRET_WORDS):
            item = f"{name}=***"
        items.append(item)
    return base + question + "&".join(items) + hash_ + fragment
