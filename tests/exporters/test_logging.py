"""configure_logging: every line carries the ids of the invocation and span it was written in.

Each test configures logging into a StringIO and restores the global state
(structlog, root logger, the runtime's scope switch) through the handle.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
import structlog
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from penguiflow import Headers, Message, Node, NodePolicy, create
from penguiflow.tracing import LogScope, current_scope, log_scope_enabled, note_remote_ids
from penguiflow_exporters.logging import LoggingHandle, add_trace_ids, configure_logging
from penguiflow_exporters.otel import PenguiFlowIdGenerator

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SCOPE = LogScope(trace_id=TRACE, otel_trace_id=TRACE, span_id="00f067aa0ba902b7",
                 node_name="retrieve", node_id="retrieve-1", invocation_id="00f067aa0ba902b7",
                 context_id="ctx-1", task_id="task-9")


@pytest.fixture
def stream() -> io.StringIO:
    return io.StringIO()


@pytest.fixture
def json_logs(stream: io.StringIO) -> Iterator[LoggingHandle]:
    with configure_logging(json=True, level=logging.INFO, stream=stream) as handle:
        yield handle


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


@pytest.mark.usefixtures("json_logs")
def test_structlog_lines_carry_the_scope_ids(stream: io.StringIO) -> None:
    token = current_scope.set(SCOPE)
    try:
        structlog.get_logger("app").info("fetched", rows=3)
    finally:
        current_scope.reset(token)
    structlog.get_logger("app").info("outside")
    inside, outside = _lines(stream)
    assert inside["event"] == "fetched" and inside["rows"] == 3 and inside["level"] == "info"
    assert {key: inside[key] for key in ("trace_id", "span_id", "node", "invocation_id",
                                         "context_id", "task_id")} == {
        "trace_id": TRACE, "span_id": "00f067aa0ba902b7", "node": "retrieve",
        "invocation_id": "00f067aa0ba902b7", "context_id": "ctx-1", "task_id": "task-9"}
    assert "otel_trace_id" not in inside  # the penguiflow id is the OTel id here
    assert not {"trace_id", "span_id", "node"} & outside.keys()


@pytest.mark.usefixtures("json_logs")
def test_lines_in_an_otel_span_carry_its_ids(stream: io.StringIO) -> None:
    provider = TracerProvider(id_generator=PenguiFlowIdGenerator(), shutdown_on_exit=False)
    tracer = provider.get_tracer("app")
    log = structlog.get_logger("app")
    with tracer.start_as_current_span("mine") as span:
        log.info("in a span")
    token = current_scope.set(SCOPE)
    try:
        node_span = trace.NonRecordingSpan(trace.SpanContext(
            int(TRACE, 16), int(SCOPE.span_id or "0", 16), is_remote=False))
        with trace.use_span(node_span), tracer.start_as_current_span("user child") as child:
            log.info("in a child of the node span")
    finally:
        current_scope.reset(token)
    provider.shutdown()
    plain, nested = _lines(stream)
    context = span.get_span_context()
    assert plain["trace_id"] == f"{context.trace_id:032x}"
    assert plain["span_id"] == f"{context.span_id:016x}"
    assert "node" not in plain
    # Inside a node: the user's own span is the more precise place; node ids stay.
    assert nested["trace_id"] == TRACE
    assert nested["span_id"] == f"{child.get_span_context().span_id:016x}"
    assert nested["node"] == "retrieve" and nested["invocation_id"] == SCOPE.invocation_id


def test_a_span_of_another_trace_wins_over_the_scope() -> None:
    provider = TracerProvider(shutdown_on_exit=False)
    token = current_scope.set(SCOPE)
    try:
        with provider.get_tracer("app").start_as_current_span("detached") as span:
            fields = add_trace_ids(None, "info", {"event": "x"})
    finally:
        current_scope.reset(token)
    provider.shutdown()
    assert fields["trace_id"] == f"{span.get_span_context().trace_id:032x}" != TRACE
    assert fields["node"] == "retrieve"


def test_a_line_naming_another_trace_gets_none_of_the_scopes_or_spans_ids() -> None:
    # A node of trace A cancelling trace B: the runtime logs trace_cancel_start with
    # B's trace id from inside A's invocation. It got A's span id, node and
    # invocation id beside B's trace id: a (trace, span) pair that matches no span.
    other = "b" * 32
    token = current_scope.set(SCOPE)
    try:
        fields = add_trace_ids(None, "info", {"event": "trace_cancel_start",
                                              "trace_id": other, "node_name": "OpenSea"})
        same = add_trace_ids(None, "info", {"event": "node_start", "trace_id": TRACE})
    finally:
        current_scope.reset(token)
    assert fields["trace_id"] == other
    assert "span_id" not in fields and "invocation_id" not in fields
    assert fields["node"] == "OpenSea"  # the record's own node name
    assert same["span_id"] == SCOPE.span_id and same["node"] == "retrieve"
    provider = TracerProvider(shutdown_on_exit=False)  # and inside another trace's span
    with provider.get_tracer("app").start_as_current_span("ingress"):
        fields = add_trace_ids(None, "info", {"event": "x", "trace_id": other})
    provider.shutdown()
    assert fields == {"event": "x", "trace_id": other}


def test_a_non_hex_trace_id_also_gives_the_otel_one() -> None:
    scope = LogScope(trace_id="order-42", otel_trace_id="ab" * 16, span_id="1" * 16,
                     node_name="n", node_id=None, invocation_id="1" * 16)
    token = current_scope.set(scope)
    try:
        fields = add_trace_ids(None, "info", {"event": "x", "node": "explicit"})
    finally:
        current_scope.reset(token)
    assert fields["trace_id"] == "order-42" and fields["otel_trace_id"] == "ab" * 16
    assert fields["node"] == "explicit"  # what the caller set is kept
    assert "context_id" not in fields  # None values are left out


@pytest.mark.usefixtures("json_logs")
def test_stdlib_penguiflow_logs_are_rendered_with_ids(stream: io.StringIO) -> None:
    logging.getLogger("penguiflow.core").warning(
        "node_timeout", extra={"trace_id": TRACE, "node_name": "slow", "attempt": 1})
    token = current_scope.set(SCOPE)
    try:
        logging.getLogger("penguiflow.custom").info("from user code via stdlib")
    finally:
        current_scope.reset(token)
    try:
        raise ValueError("bad input")
    except ValueError:
        logging.getLogger("penguiflow.core").exception("node_error",
                                                       extra={"node_name": "parse"})
    event, scoped, failed = _lines(stream)
    assert (event["event"], event["logger"], event["level"]) == (
        "node_timeout", "penguiflow.core", "warning")
    assert (event["trace_id"], event["node"], event["attempt"]) == (TRACE, "slow", 1)
    assert scoped["span_id"] == SCOPE.span_id and scoped["node"] == "retrieve"
    assert failed["node"] == "parse" and "ValueError: bad input" in failed["exception"]


@pytest.mark.parametrize("level", ["DEBUG", "INFO"])
async def test_a_flow_logs_its_events_and_node_code_logs_with_ids(
        stream: io.StringIO, level: str) -> None:
    with configure_logging(json=True, level=level, stream=stream):
        await _run_one_node_flow()
    lines = _lines(stream)
    (working,) = [line for line in lines if line["event"] == "working"]
    (success,) = [line for line in lines if line["event"] == "node_success"]
    trace_id = working["payload"]
    assert success["logger"] == "penguiflow.core"
    assert (success["trace_id"], success["node"]) == (trace_id, "work")
    assert (working["trace_id"], working["node"]) == (trace_id, "work")
    assert len(working["span_id"]) == 16 and working["invocation_id"] == working["span_id"]


async def _run_one_node_flow() -> None:
    async def work(msg: Message, ctx: Any) -> Message:
        structlog.get_logger("app.work").info("working", payload=msg.trace_id)
        return msg

    node = Node(work, name="work", policy=NodePolicy(validate="none"))
    flow = create(node.to())
    flow.run()
    try:
        await flow.emit(Message(payload="hi", headers=Headers(tenant="demo")))
        await flow.fetch()
    finally:
        await flow.stop()


def test_text_lines_carry_the_ids_too(stream: io.StringIO) -> None:
    with configure_logging(stream=stream):
        token = current_scope.set(SCOPE)
        try:
            structlog.get_logger("app").info("hello")
        finally:
            current_scope.reset(token)
    line = stream.getvalue()
    assert "hello" in line and f"trace_id={TRACE}" in line and "node=retrieve" in line


def test_restore_undoes_every_global_change(stream: io.StringIO) -> None:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    configured, scope_on = structlog.is_configured(), log_scope_enabled()
    handle = configure_logging(json=True, level="DEBUG", stream=stream)
    assert handle.handler in root.handlers and root.level == logging.DEBUG
    assert log_scope_enabled() and structlog.is_configured()
    handle.restore()
    handle.restore()  # idempotent
    assert root.handlers == handlers and root.level == level
    assert structlog.is_configured() == configured and log_scope_enabled() == scope_on
    structlog.get_logger("app").info("after restore")  # no longer ours
    assert stream.getvalue() == ""


def test_restore_brings_back_an_earlier_structlog_configuration(stream: io.StringIO) -> None:
    structlog.configure(processors=[structlog.processors.KeyValueRenderer()])
    try:
        before = structlog.get_config()["processors"]
        with configure_logging(stream=stream):
            assert structlog.get_config()["processors"] != before
        assert structlog.get_config()["processors"] == before
    finally:
        structlog.reset_defaults()


def test_remote_ids_join_the_scope_of_the_invocation_only(stream: io.StringIO) -> None:
    with configure_logging(json=True, stream=stream):
        note_remote_ids("ctx-outside", "task-outside")  # no invocation: nothing to join
        assert current_scope.get() is None
        token = current_scope.set(replace(SCOPE, context_id=None, task_id=None))
        try:
            note_remote_ids("ctx-2", None)  # contextId first (a message answer) ...
            note_remote_ids(None, "task-7")  # ... then the task: None keeps what is known
            structlog.get_logger("app").info("polling")
        finally:
            current_scope.reset(token)
        structlog.get_logger("app").info("after")
    polling, after = _lines(stream)
    assert (polling["context_id"], polling["task_id"]) == ("ctx-2", "task-7")
    assert polling["trace_id"] == TRACE
    assert "context_id" not in after and "task_id" not in after


def test_a_retried_remote_call_logs_its_own_task_id_not_the_last_ones(
        stream: io.StringIO) -> None:
    # The scope kept the first call's task id until the invocation ended: the
    # retry's remote_call_start and its transport's lines said task-1.
    from penguiflow.remote import RemoteCallResult, RemoteNode

    transport_log = logging.getLogger("app.transport")

    class Flaky:
        calls = 0

        async def send(self, request: Any) -> Any:
            Flaky.calls += 1
            n = Flaky.calls
            transport_log.info("sending", extra={"call": n})
            note_remote_ids("ctx", f"task-{n}")  # the agent's answer names the task
            if n == 1:
                raise RuntimeError("the agent failed task-1")
            return RemoteCallResult(result="ok", context_id="ctx", task_id=f"task-{n}")

        def stream(self, request: Any) -> Any:
            raise NotImplementedError

        async def cancel(self, *, agent_url: str, task_id: str) -> None:
            return None

    async def run() -> None:
        node = RemoteNode(transport=Flaky(), skill="s", agent_url="http://agent:1/", name="r",
                          policy=NodePolicy(validate="none", max_retries=1, backoff_base=0.001))
        flow = create(node.to())
        flow.run()
        try:
            await flow.emit(Message(payload=1, headers=Headers(tenant="t")))
            assert await flow.fetch() == "ok"
        finally:
            await flow.stop()

    with configure_logging(json=True, level=logging.INFO, stream=stream):
        asyncio.run(run())
    lines = _lines(stream)
    starts = [line.get("task_id") for line in lines if line["event"] == "remote_call_start"]
    sends = [(line.get("call"), line.get("task_id")) for line in lines
             if line["event"] == "sending"]
    assert starts == [None, None]  # neither call knows its task when it starts
    assert sends == [(1, None), (2, None)]
    (done,) = [line for line in lines if line["event"] == "remote_call_success"]
    assert done["task_id"] == "task-2"

