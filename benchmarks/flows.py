"""PenguiFlow graphs for the benchmark workloads, and the named observer set-ups.

penguiflow is imported lazily so that ``run.py --floor-only`` works without it.

Adding an observer row (StateStore, OTel SDK, ...): write a class satisfying
:class:`ObserverSetup` and register a factory in :data:`OBSERVERS`. The factory is
called once per benchmark run (raise :class:`ObserverUnavailable` when an optional
dependency is missing: the row is then printed with a note instead of a number);
``flow_kwargs`` and ``install`` are called for every flow built; ``aclose`` once at the
end.

Optional async hooks (looked up with ``getattr``): ``check()`` once after the factory
(may raise :class:`ObserverUnavailable`, e.g. a server that does not answer);
``prepare()`` before each flow is built and ``settle()`` after its warm-up, both
outside the timed window; ``release(expected_events)`` after the flow stopped, which
returns how many of the events the flow recorded the observer does not hold.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from stores import BenchStore, StoreKind

    from penguiflow import FlowEvent, Message, PenguiFlow

QUEUE_MAXSIZE = 64
FAN_WIDTH = 8


async def identity(msg: Any, ctx: Any) -> Any:
    return msg


def make_messages(m: int) -> list[Message]:
    from penguiflow import Headers, Message

    return [Message(payload=i, headers=Headers(tenant="bench")) for i in range(m)]


# --------------------------------------------------------------------------- observers


class ObserverUnavailable(RuntimeError):
    """Raised by an observer factory whose optional dependency is not installed."""


class ObserverSetup(Protocol):
    def flow_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments for ``create`` (e.g. ``state_store=...``)."""
        ...

    def install(self, flow: PenguiFlow) -> None:
        """Hook the observer into a freshly built flow, before ``run()``."""
        ...

    async def aclose(self) -> None:
        """Release resources once every repetition has finished."""
        ...


async def _noop_middleware(event: FlowEvent) -> None:
    return None


class NoopMiddleware:
    """A middleware that does nothing: every FlowEvent is materialised and dispatched."""

    def flow_kwargs(self) -> dict[str, Any]:
        return {}

    def install(self, flow: PenguiFlow) -> None:
        flow.add_middleware(_noop_middleware)

    async def aclose(self) -> None:
        return None


class OtelSdkObserver:
    """The OTel SDK: a TracerProvider (PenguiFlow's id generator) with a
    BatchSpanProcessor over an exporter that discards spans, passed to the flow as
    ``tracer_provider`` (no global state). Every node invocation and the trace's root
    become SDK spans; the cost of exporting them is not counted, as in the guide."""

    def __init__(self) -> None:
        try:
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import (
                BatchSpanProcessor,
                SpanExporter,
                SpanExportResult,
            )

            from penguiflow_exporters.otel import PenguiFlowIdGenerator
        except ImportError as exc:  # pragma: no cover - the workspace installs it
            raise ObserverUnavailable(f"opentelemetry-sdk not importable: {exc}") from exc

        class _Discard(SpanExporter):
            def export(self, spans: Any) -> SpanExportResult:
                return SpanExportResult.SUCCESS

        self.provider = TracerProvider(id_generator=PenguiFlowIdGenerator())
        self.provider.add_span_processor(BatchSpanProcessor(_Discard(), max_queue_size=65536))

    def flow_kwargs(self) -> dict[str, Any]:
        return {"tracer_provider": self.provider}

    def install(self, flow: PenguiFlow) -> None:
        return None

    async def aclose(self) -> None:
        self.provider.shutdown()


class OtelSdkApiPath(OtelSdkObserver):
    """The same SDK set-up plus a processor with its own ``on_start`` (doing nothing):
    PenguiFlow's SDK writer declines such a provider, so every span goes through
    ``start_span`` + ``end``. Shows what tracing costs without the writer."""

    def __init__(self) -> None:
        super().__init__()
        from opentelemetry.sdk.trace import SpanProcessor

        class _OnStart(SpanProcessor):
            def on_start(self, span: Any, parent_context: Any = None) -> None:
                return None

        self.provider.add_span_processor(_OnStart())


class OtelSdkAndStore(OtelSdkObserver):
    """The OTel SDK set-up and a SQLiteStateStore together."""

    has_store = True

    def __init__(self) -> None:
        super().__init__()
        self._store = StoreObserver.factory(_kind("sqlite"))()
        self.failed = 0

    async def check(self) -> None:
        await self._store.check()

    async def prepare(self) -> None:
        await self._store.prepare()

    async def settle(self) -> None:
        await self._store.settle()

    async def release(self, expected_events: int) -> int:
        missing = await self._store.release(expected_events)
        self.failed = self._store.failed
        return missing

    def flow_kwargs(self) -> dict[str, Any]:
        return {**super().flow_kwargs(), **self._store.flow_kwargs()}

    async def aclose(self) -> None:
        await self._store.aclose()
        await super().aclose()


class StoreObserver:
    """A TraceStore as the flow's ``state_store``: a fresh, opened, empty store per flow.

    ``prepare`` opens it (a new SQLite file, a new Postgres schema) and ``settle``
    flushes the warm-up's events, so the timed window starts with an empty buffer and
    an open connection, as in a long-running service. ``release`` counts what the
    store holds once the flow stopped (``stop()`` flushes), then deletes it.
    """

    has_store = True

    def __init__(self, kind: StoreKind) -> None:
        self._kind = kind
        self._store: BenchStore | None = None
        #: Events the stores dropped or failed to write (their ``failures`` counters).
        self.failed = 0

    @classmethod
    def factory(cls, make_kind: Callable[[], StoreKind]) -> Callable[[], StoreObserver]:
        def build() -> StoreObserver:
            import stores

            try:
                return cls(make_kind())
            except stores.StoreUnavailable as exc:
                raise ObserverUnavailable(str(exc)) from exc

        return build

    async def check(self) -> None:
        import stores

        try:
            await self._kind.check()
        except stores.StoreUnavailable as exc:
            await self._kind.aclose()
            raise ObserverUnavailable(str(exc)) from exc

    async def prepare(self) -> None:
        self._store = await self._kind.new()

    def flow_kwargs(self) -> dict[str, Any]:
        if self._store is None:
            raise RuntimeError("StoreObserver.prepare() was not awaited before the flow")
        return {"state_store": self._store}

    def install(self, flow: PenguiFlow) -> None:
        return None

    async def settle(self) -> None:
        assert self._store is not None
        await self._store.flush()

    async def release(self, expected_events: int) -> int:
        import stores

        store, self._store = self._store, None
        assert store is not None
        try:
            self.failed += stores.failures_of(store)
            return expected_events - await stores.stored_count(store)
        finally:
            await self._kind.discard(store)

    async def aclose(self) -> None:
        if self._store is not None:
            await self._kind.discard(self._store)
            self._store = None
        await self._kind.aclose()


def _kind(name: str, **options: Any) -> Callable[[], StoreKind]:
    def make() -> StoreKind:
        import stores

        return {"memory": stores.MemoryKind, "sqlite": stores.SQLiteKind,
                "postgres": stores.PostgresKind}[name](**options)

    return make


# Named observer set-ups for the "with observers" rows (chain N=5, ratio to no observers).
OBSERVERS: dict[str, Callable[[], ObserverSetup]] = {
    "no-op middleware": NoopMiddleware,
    "InMemoryStateStore": StoreObserver.factory(_kind("memory")),
    "SQLiteStateStore": StoreObserver.factory(_kind("sqlite")),
    # The same store with its writer on a thread: whether the writer process still pays.
    "SQLiteStateStore writer=thread": StoreObserver.factory(_kind("sqlite", writer="thread")),
    "PostgresStateStore": StoreObserver.factory(_kind("postgres")),
    "OTel SDK + BatchSpanProcessor": OtelSdkObserver,
    "OTel SDK via start_span (writer declined)": OtelSdkApiPath,
    "OTel SDK + SQLiteStateStore": OtelSdkAndStore,
}


# --------------------------------------------------------------------------- graphs


def _flow(adjacencies: list[Any], setup: ObserverSetup | None) -> PenguiFlow:
    from penguiflow import create

    kwargs = setup.flow_kwargs() if setup is not None else {}
    flow = create(*adjacencies, queue_maxsize=QUEUE_MAXSIZE, **kwargs)
    if setup is not None:
        setup.install(flow)
    return flow


@contextlib.asynccontextmanager
async def _running(flow: PenguiFlow) -> AsyncIterator[PenguiFlow]:
    flow.run()
    try:
        yield flow
    finally:
        await flow.stop()


def build_chain(n: int, setup: ObserverSetup | None = None) -> PenguiFlow:
    """A linear chain of ``n`` identity nodes, not started."""
    from penguiflow import Node, NodePolicy

    policy = NodePolicy(validate="none")
    nodes = [Node(identity, name=f"s{i}", policy=policy) for i in range(n)]
    adj: list[Any] = [nodes[i].to(nodes[i + 1]) for i in range(n - 1)]
    adj.append(nodes[-1].to())
    return _flow(adj, setup)


def chain(
    n: int, setup: ObserverSetup | None = None
) -> contextlib.AbstractAsyncContextManager[PenguiFlow]:
    """A running linear chain of ``n`` identity nodes."""
    return _running(build_chain(n, setup))


def fan_out(
    width: int = FAN_WIDTH, setup: ObserverSetup | None = None
) -> contextlib.AbstractAsyncContextManager[PenguiFlow]:
    """A running ``fan -> w0..w{width-1} -> join_k("join", width) -> Rookery``."""
    from penguiflow import Node, NodePolicy
    from penguiflow.patterns import join_k

    policy = NodePolicy(validate="none")
    fan = Node(identity, name="fan", policy=policy)
    workers = [Node(identity, name=f"w{i}", policy=policy) for i in range(width)]
    join = join_k("join", width)
    adj: list[Any] = [fan.to(*workers)]
    adj += [w.to(join) for w in workers]
    adj.append(join.to())
    return _running(_flow(adj, setup))
