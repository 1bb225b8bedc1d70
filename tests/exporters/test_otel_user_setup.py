"""PenguiFlow's spans under the application's own OpenTelemetry set-up.

Services set OTel up themselves: a plain ``TracerProvider`` + ``BatchSpanProcessor``
registered globally, :func:`configure_tracing`, an id generator of their own.
Whatever the set-up, one message run is one trace holding every span -- the
runtime's, the user's, a library's -- a span opened in a node is a child of that
node's span, and the span ids stored with the run's events are the ids the
exporter received (so ``pf inspect``, the store and the backend agree).

Set-ups that register a global provider take the ``otel_globals`` fixture, which
restores OpenTelemetry's once-only globals afterwards.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import SpanKind

from penguiflow import Headers, Message, Node, NodePolicy, create
from penguiflow._tracer import tracer_for
from penguiflow.remote import InMemoryAgent, InMemoryTransport, RemoteNode
from penguiflow.state import InMemoryStateStore, StoredEvent
from penguiflow.tracing import register_span_writer, root_span_id, spans_from_events
from penguiflow_exporters.otel import configure_tracing

URL = "http://agents.example:8080/a2a"
WAIT = 10.0  # hang guard for one awaited step


class RecordingIds(RandomIdGenerator):
    """A foreign id generator: random ids, and a record of every one handed out."""

    def __init__(self) -> None:
        self.span_ids: set[int] = set()
        self.trace_ids: set[int] = set()

    def generate_span_id(self) -> int:
        span_id = super().generate_span_id()
        self.span_ids.add(span_id)
        return span_id

    def generate_trace_id(self) -> int:
        trace_id = super().generate_trace_id()
        self.trace_ids.add(trace_id)
        return trace_id


class OnStart(SpanProcessor):
    """A processor with its own on_start (as Logfire's are): the SDK writer declines
    such a provider, so every span goes through start_span + end."""

    def __init__(self) -> None:
        self.started = 0

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        self.started += 1


@dataclass
class Setup:
    """One application set-up: the provider, where its spans end up, how to flush."""

    provider: TracerProvider
    exporter: InMemorySpanExporter
    writer_path: bool
    ids: RecordingIds | None = None
    closers: list[Callable[[], object]] = field(default_factory=list)

    def finished(self) -> list[ReadableSpan]:
        assert self.provider.force_flush(5_000)
        return list(self.exporter.get_finished_spans())


def _plain_global(otel_globals: None) -> Setup:
    # What most services do: a stock provider, a batch processor, set globally.
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return Setup(provider, exporter, writer_path=True, closers=[provider.shutdown])


def _configure_tracing_global(otel_globals: None) -> Setup:
    exporter = InMemorySpanExporter()
    handle = configure_tracing("user-setup", exporter=exporter, metrics=False)
    assert trace.get_tracer_provider() is handle.tracer_provider
    return Setup(handle.tracer_provider, exporter, writer_path=True, closers=[handle.shutdown])


def _random_ids(otel_globals: None) -> Setup:
    ids = RecordingIds()
    exporter = InMemorySpanExporter()
    provider = TracerProvider(id_generator=ids)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return Setup(provider, exporter, writer_path=True, ids=ids, closers=[provider.shutdown])


def _random_ids_through_the_api(otel_globals: None) -> Setup:
    setup = _random_ids(otel_globals)
    setup.provider.add_span_processor(OnStart())
    setup.writer_path = False
    return setup


SETUPS: dict[str, Callable[[None], Setup]] = {
    "plain TracerProvider, global": _plain_global,
    "configure_tracing, global": _configure_tracing_global,
    "random id generator": _random_ids,
    "random id generator, start_span path": _random_ids_through_the_api,
}


@pytest.fixture(params=list(SETUPS))
def setup(request: pytest.FixtureRequest, otel_globals: None) -> Iterator[Setup]:
    built = SETUPS[request.param](otel_globals)
    try:
        yield built
    finally:
        for close in built.closers:
            close()


async def _work(msg: Message, ctx: Any) -> Message:
    # The user's own instrumentation and a library's, through the global API.
    with (trace.get_tracer("app").start_as_current_span(f"app.{msg.payload}"),
          trace.get_tracer("lib.db").start_as_current_span("db.query")):
        pass
    return msg


def _node(func: Any, name: str) -> Node:
    return Node(func, name=name, policy=NodePolicy(validate="none"))


async def _run(flow: Any, message: Message) -> None:
    flow.run()
    try:
        await flow.emit(message)
        async with asyncio.timeout(WAIT):
            while not isinstance(await flow.fetch(), Message):
                pass  # stream chunks before the result
    finally:
        await flow.stop()


def _hex(value: int, width: int) -> str:
    return f"{value:0{width}x}"


def _assert_one_trace_and_stored_ids(spans: list[ReadableSpan], history: list[StoredEvent],
                                     message: Message) -> dict[str, ReadableSpan]:
    """The contract, for any set-up; returns the runtime's spans by name."""
    ours = {s.context.span_id: s for s in spans
            if s.instrumentation_scope and s.instrumentation_scope.name == "penguiflow"}
    by_name = {s.name: s for s in ours.values()}
    assert len(by_name) == len(ours), [s.name for s in ours.values()]
    # One trace per run, and it is the message's.
    assert {_hex(s.context.trace_id, 32) for s in spans} == {message.trace_id}
    # One root; every other span's parent was exported (nothing orphaned).
    ids = {s.context.span_id for s in spans}
    (root,) = [s for s in spans if s.parent is None]
    assert root.name.startswith("invoke_workflow")
    assert _hex(root.context.span_id, 16) == root_span_id(message.trace_id)
    for span in spans:
        assert span.parent is None or span.parent.span_id in ids, span.name
    # The stored events name the exported spans, parents included.
    for event in history:
        if event.span_id is not None:
            assert int(event.span_id, 16) in ids, event.kind
        if event.parent_span_id is not None:
            assert int(event.parent_span_id, 16) in ids, event.kind
    starts = {e.node_name: e for e in history if e.kind == "node_start"}
    for name, start in starts.items():
        span = by_name[f"invoke_agent {name}"]
        assert start.span_id == start.invocation_id == _hex(span.context.span_id, 16)
        assert start.parent_span_id == _hex(span.parent.span_id, 16)
    # pf export rebuilds the same spans from the store.
    rebuilt = {s.span_id: s for s in spans_from_events(history)}
    assert set(rebuilt) == set(ours)
    for span_id, data in rebuilt.items():
        assert data.parent_span_id == (ours[span_id].parent.span_id
                                       if ours[span_id].parent else None)
    return by_name


async def test_a_run_is_one_trace_with_user_spans_under_their_node(setup: Setup) -> None:
    store = InMemoryStateStore()
    transport = InMemoryTransport({URL: InMemoryAgent(chunks=["a", "b"])})
    remote = RemoteNode(transport=transport, skill="summarise", agent_url=URL, name="remote",
                        streaming=True, policy=NodePolicy(validate="none"))
    a, b = _node(_work, "a"), _node(_work, "b")
    # No tracer_provider argument: the flow traces through the global one.
    flow = create(a.to(b), b.to(remote), remote.to(), name="checkout", state_store=store)
    m = Message(payload="x", headers=Headers(tenant="t"))
    await _run(flow, m)

    spans = setup.finished()
    history = list(await store.load_history(m.trace_id))
    by_name = _assert_one_trace_and_stored_ids(spans, history, m)
    node_a, node_b = by_name["invoke_agent a"], by_name["invoke_agent b"]
    # The user's span and the library span it opened nest under the node they ran in.
    users = [s for s in spans if s.name == "app.x"]
    assert len(users) == 2
    assert {u.parent.span_id for u in users} == {node_a.context.span_id, node_b.context.span_id}
    for db in (s for s in spans if s.name == "db.query"):
        assert db.parent.span_id in {u.context.span_id for u in users}
    assert node_b.parent.span_id == node_a.context.span_id
    client = by_name["invoke_agent summarise"]
    assert client.kind is SpanKind.CLIENT
    assert client.parent.span_id == by_name["invoke_agent remote"].context.span_id

    penguiflow = [s for s in spans if s.instrumentation_scope.name == "penguiflow"]
    assert len(penguiflow) == 5
    writer = getattr(tracer_for(setup.provider), "_writer", None)
    written = writer.written if writer is not None else 0
    assert written == (len(penguiflow) if setup.writer_path else 0)
    if setup.ids is not None:
        # The application's generator still names its own spans; the runtime's
        # spans carry the runtime's ids, which the generator never handed out.
        assert {u.context.span_id for u in users} <= setup.ids.span_ids
        assert not {s.context.span_id for s in penguiflow} & setup.ids.span_ids
        assert not setup.ids.trace_ids


async def test_spans_of_concurrent_runs_stay_in_their_own_traces(setup: Setup) -> None:
    store = InMemoryStateStore()
    a_busy, b_busy = asyncio.Event(), asyncio.Event()

    async def first(msg: Message, ctx: Any) -> Message:
        if msg.payload == "1":  # the second run, while b works on the first
            a_busy.set()
            await b_busy.wait()
        return await _work(msg, ctx)

    async def second(msg: Message, ctx: Any) -> Message:
        if msg.payload == "0":  # the first run, while a works on the second
            b_busy.set()
            await a_busy.wait()
        return await _work(msg, ctx)

    a, b = _node(first, "a"), _node(second, "b")
    flow = create(a.to(b), b.to(), state_store=store)
    messages = [Message(payload=str(i), headers=Headers(tenant="t")) for i in range(2)]
    flow.run()
    try:
        for m in messages:
            await flow.emit(m)
        async with asyncio.timeout(WAIT):
            for _ in messages:
                await flow.fetch()
    finally:
        await flow.stop()

    spans = setup.finished()
    for i, m in enumerate(messages):
        own = [s for s in spans if _hex(s.context.trace_id, 32) == m.trace_id]
        assert sorted(s.name for s in own) == sorted([
            "invoke_workflow penguiflow", "invoke_agent a", "invoke_agent b",
            f"app.{i}", f"app.{i}", "db.query", "db.query"])
        _assert_one_trace_and_stored_ids(own, list(await store.load_history(m.trace_id)), m)
    assert len(spans) == 2 * 7


# -- the fast path without penguiflow_exporters.otel -----------------------------------

_NO_IMPORT = """
import asyncio, json, sys
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from penguiflow import Headers, Message, Node, NodePolicy, create
from penguiflow._tracer import tracer_for

async def echo(msg, ctx):
    return msg

async def main():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    node = Node(echo, name="n", policy=NodePolicy(validate="none"))
    flow = create(node.to(), tracer_provider=provider)
    flow.run()
    m = Message(payload=1, headers=Headers(tenant="t"))
    await flow.emit(m)
    await flow.fetch()
    await flow.stop()
    spans = exporter.get_finished_spans()
    print(json.dumps({
        "written": tracer_for(provider)._writer.written,
        "spans": len(spans),
        "trace_ids": sorted({f"{s.context.trace_id:032x}" for s in spans}),
        "trace_id": m.trace_id,
        "otel_imported": "penguiflow_exporters.otel" in sys.modules,
    }))

asyncio.run(main())
"""


def test_a_stock_provider_takes_the_fast_path_without_importing_the_exporters() -> None:
    proc = subprocess.run([sys.executable, "-c", _NO_IMPORT], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["otel_imported"] is False
    assert out["spans"] == out["written"] == 2  # root + node, both through the writer
    assert out["trace_ids"] == [out["trace_id"]]


# -- error paths -----------------------------------------------------------------------


class _IdlessTracer:
    """A vendor-style tracer around the SDK's that exposes no id generator: the
    runtime cannot give it ids."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def start_span(self, *args: Any, **kwargs: Any) -> Any:
        return self._inner.start_span(*args, **kwargs)


class _IdlessProvider(trace.TracerProvider):
    def __init__(self, inner: TracerProvider) -> None:
        self._inner = inner

    def get_tracer(self, *args: Any, **kwargs: Any) -> Any:
        return _IdlessTracer(self._inner.get_tracer(*args, **kwargs))


async def test_a_provider_that_takes_no_ids_is_reported_once_and_the_flow_goes_on(
        caplog: pytest.LogCaptureFixture) -> None:
    exporter = InMemorySpanExporter()
    sdk = TracerProvider()
    sdk.add_span_processor(SimpleSpanProcessor(exporter))
    provider = _IdlessProvider(sdk)
    flow = create(_node(_work, "a").to(), tracer_provider=provider)
    messages = [Message(payload="x", headers=Headers(tenant="t")) for _ in range(2)]
    with caplog.at_level(logging.WARNING, logger="penguiflow.tracing"):
        for m in messages:
            await _run(flow, m)
    tracer = tracer_for(provider)
    assert tracer is not None and tracer.foreign_ids >= 2
    warnings = [r for r in caplog.records if "otel_foreign_span_ids" in r.getMessage()]
    assert len(warnings) == 1
    assert "_IdlessProvider" in warnings[0].getMessage()
    # Still recorded, never raised: root + node per run (the user's spans go to the
    # global provider, which this test leaves unset).
    assert len(exporter.get_finished_spans()) == 2 * 2
    sdk.shutdown()


async def test_a_span_writer_factory_that_raises_costs_nothing_but_a_log_line(
        caplog: pytest.LogCaptureFixture) -> None:
    def broken(provider: Any, version: str) -> Any:
        raise RuntimeError("plugin bug")

    exporter = InMemorySpanExporter()
    provider = TracerProvider(id_generator=RecordingIds())
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    store = InMemoryStateStore()
    flow = create(_node(_work, "a").to(), tracer_provider=provider, state_store=store)
    m = Message(payload="x", headers=Headers(tenant="t"))
    from penguiflow import tracing

    register_span_writer(broken)  # asked first: registered last
    try:
        with caplog.at_level(logging.WARNING, logger="penguiflow.tracing"):
            await _run(flow, m)  # run() asks the factories for this provider's writer
    finally:
        tracing._WRITER_FACTORIES.remove(broken)
    (failed,) = [r for r in caplog.records if "span writer factory" in r.getMessage()]
    assert failed.exc_info is not None and "plugin bug" in str(failed.exc_info[1])
    # The next factory (the SDK writer) answered; the run is traced as usual.
    writer = getattr(tracer_for(provider), "_writer", None)
    assert writer is not None and writer.written == 2
    _assert_one_trace_and_stored_ids(list(exporter.get_finished_spans()),
                                     list(await store.load_history(m.trace_id)), m)
    provider.shutdown()


async def test_ids_a_remote_peer_sends_are_bounded_and_utf8_in_span_attributes() -> None:
    # A peer's taskId of 5 MB made one CLIENT span bigger than a collector takes (the
    # batch of 512 spans refused with it), and a lone surrogate in its contextId made
    # the OTLP encoder log an error and drop the attribute at every export.
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    from penguiflow.errors import PEER_TEXT_LIMIT
    from penguiflow.remote import RemoteCallResult

    class HostilePeer:
        async def send(self, request: Any) -> RemoteCallResult:
            return RemoteCallResult(result="ok", context_id="ctx\ud800",
                                    task_id="t" * 5_000_000, agent_url=request.agent_url,
                                    meta={"task_state": "s" * 10_000})

        async def stream(self, request: Any) -> Any:
            raise NotImplementedError

        async def cancel(self, **_: Any) -> None:
            pass

    exporter = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    remote = RemoteNode(transport=HostilePeer(), skill="s", agent_url="http://a:1/x",
                        name="remote", policy=NodePolicy(validate="none"))
    flow = create(remote.to(), tracer_provider=provider)
    flow.run()
    try:
        await flow.emit(Message(payload="x", headers=Headers(tenant="t")))
        await asyncio.wait_for(flow.fetch(), 5)
    finally:
        await flow.stop()
    spans = list(exporter.get_finished_spans())
    provider.shutdown()
    [client] = [s for s in spans if s.kind is SpanKind.CLIENT]
    attributes = client.attributes or {}
    for key in ("a2a.task.id", "gen_ai.conversation.id"):
        value = attributes[key]
        assert isinstance(value, str) and len(value) < PEER_TEXT_LIMIT + 50
        value.encode("utf-8")  # encodable: no lone surrogate left
    assert attributes["a2a.task.id"].startswith("t" * PEER_TEXT_LIMIT + "… [cut:")
    assert len(encode_spans(spans).SerializeToString()) < 20_000


async def test_a_node_cut_by_stop_ends_as_unfinished_around_what_ran_in_it() -> None:
    # A node interrupted by stop() was exported as a 0 ms span at its own start with no
    # error: interrupted work looked like an instant success, and the user's span in
    # it outlived its parent.
    exporter = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    inside = asyncio.Event()

    async def slow(message: Message, ctx: Any) -> Message:
        with trace.get_tracer("app", tracer_provider=provider).start_as_current_span(
                "user.work"):
            inside.set()
            await asyncio.Event().wait()  # works until the flow stops
        return message

    flow = create(Node(slow, name="slow", policy=NodePolicy(validate="none")).to(),
                  tracer_provider=provider)
    flow.run()
    await flow.emit(Message(payload="x", headers=Headers(tenant="t")))
    await asyncio.wait_for(inside.wait(), 5)
    await flow.stop()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    provider.shutdown()
    node, user, root = spans["invoke_agent slow"], spans["user.work"], spans[
        "invoke_workflow penguiflow"]
    assert node.status.status_code.name == "ERROR"
    assert (node.attributes or {})["error.type"] == "unfinished"
    assert node.start_time <= user.start_time and user.end_time <= node.end_time
    assert node.end_time <= root.end_time
