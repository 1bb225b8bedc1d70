"""``pf export``: a recorded trace leaves as the same spans the live tracer made.

A real flow (a retried node, a fan-out joined by ``join_k``, a streaming
RemoteNode over the in-memory A2A transport) runs with a live SDK
TracerProvider (PenguiFlow's id generator, an InMemorySpanExporter; nothing
global) and records into a real SQLite file (and Postgres, when there is one).
Then ``pf export`` -- in-process through ``main()`` and as a real subprocess --
sends the stored trace to a real OTLP/HTTP receiver on 127.0.0.1, or writes
OTLP-JSON; what arrives must equal the live spans in ids, parents, names,
kinds, times, attributes, statuses, events and links. Failures (unknown or
ambiguous id, unreachable store, collector down/refusing/stalled) must end in
one line on stderr and the documented exit status, within a bounded time.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from inspector_support import fresh_database
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from otlp_receiver import OTLPReceiver, ReceivedSpan, any_value, down_url

from penguiflow import Headers, Message, Node, NodePolicy, create
from penguiflow.patterns import join_k
from penguiflow.remote import InMemoryAgent, InMemoryTransport, RemoteNode
from penguiflow_exporters import open_store
from penguiflow_exporters.otel import PenguiFlowIdGenerator
from penguiflow_inspector.cli import main

AGENT_URL = "http://agents.example:8080/a2a"
#: The trace under test, and two more whose ids share the prefix "feed".
MAIN_TRACE = "c0ffee" + uuid.uuid4().hex[:26]
OTHER_TRACES = ("feed" + "0" * 27 + "1", "feed" + "0" * 27 + "2")
PREFIX = MAIN_TRACE[:8]
HANG_GUARD_S = 10.0

SpanView = dict[str, Any]


@dataclass(frozen=True)
class Recording:
    store_url: str
    live: list[ReadableSpan]  # the spans of MAIN_TRACE as the live tracer ended them


# -- recording a real flow -------------------------------------------------------------------


def _node(func: Any, name: str, **policy: Any) -> Node:
    return Node(func, name=name, policy=NodePolicy(validate="none", **policy))


async def _record(store_url: str) -> list[ReadableSpan]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(id_generator=PenguiFlowIdGenerator())
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    failed_once: set[str] = set()

    async def flaky(msg: Message, ctx: Any) -> Message:
        if msg.trace_id not in failed_once:  # the first attempt of each trace fails
            failed_once.add(msg.trace_id)
            raise ConnectionError("transient")
        return msg

    async def work(msg: Message, ctx: Any) -> Message:
        return msg

    a = _node(flaky, "a", max_retries=1, backoff_base=0.0)
    w0, w1 = _node(work, "w0"), _node(work, "w1")
    join = join_k("join", 2)
    transport = InMemoryTransport({AGENT_URL: InMemoryAgent(chunks=["x", "y", "z"])})
    remote = RemoteNode(transport=transport, skill="summarise", agent_url=AGENT_URL,
                        name="remote", streaming=True, policy=NodePolicy(validate="none"))
    try:
        async with open_store(store_url) as store:
            flow = create(a.to(w0, w1), w0.to(join), w1.to(join), join.to(remote), remote.to(),
                          name="export-demo", state_store=store, tracer_provider=provider)
            flow.run()
            try:
                for trace_id in (MAIN_TRACE, *OTHER_TRACES):
                    await flow.emit(Message(payload="q", headers=Headers(tenant="acme"),
                                            trace_id=trace_id))
                finals = 0
                while finals < 3:  # stream chunks first, then each trace's final result
                    item = await asyncio.wait_for(flow.fetch(), HANG_GUARD_S)
                    finals += not hasattr(item, "done")
            finally:
                await flow.stop()  # ends the root spans and flushes the store
    finally:
        provider.shutdown()
    return [s for s in exporter.get_finished_spans() if f"{s.context.trace_id:032x}" == MAIN_TRACE]


def _recording(store_url: str) -> Recording:
    live = asyncio.run(_record(store_url))
    # The scenario is rich enough to mean something: a retry, a join's links, a CLIENT span.
    assert len(live) >= 7
    assert any(e.name == "pf.node.retry" for s in live for e in s.events)
    assert any(len(s.links) == 2 for s in live)
    assert any(s.name == "invoke_agent summarise" and s.kind.name == "CLIENT" for s in live)
    return Recording(store_url, live)


@pytest.fixture(scope="module")
def sqlite_recording(tmp_path_factory: pytest.TempPathFactory) -> Recording:
    path = tmp_path_factory.mktemp("pf-export") / "traces.db"
    return _recording(f"sqlite:///{path}")


@pytest.fixture(scope="module")
def pg_recording(pg_dsn: str) -> Iterator[Recording]:
    """The same flow recorded into a fresh Postgres database (the store's default schema)."""
    with fresh_database(pg_dsn, "pf_export") as url:
        yield _recording(url)


# -- comparable views of live, received and JSON spans ------------------------------------------


def _live_view(span: ReadableSpan) -> SpanView:
    return {
        "trace_id": span.context.trace_id,
        "span_id": span.context.span_id,
        "parent_span_id": span.parent.span_id if span.parent else None,
        "name": span.name,
        "kind": span.kind.value,
        "start": span.start_time,
        "end": span.end_time,
        "attributes": dict(span.attributes or {}),
        "status": (span.status.status_code.value, span.status.description or ""),
        "events": [(e.name, e.timestamp, dict(e.attributes or {})) for e in span.events],
        "links": [(link.context.trace_id, link.context.span_id, dict(link.attributes or {}))
                  for link in span.links],
    }


def _pb_attrs(attributes: Any) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in attributes}


def _received_view(got: ReceivedSpan) -> SpanView:
    span = got.span
    return {
        "trace_id": got.trace_id,
        "span_id": got.span_id,
        "parent_span_id": got.parent_span_id,
        "name": span.name,
        "kind": span.kind - 1,  # protobuf SPAN_KIND_INTERNAL is 1; the SDK's INTERNAL is 0
        "start": span.start_time_unix_nano,
        "end": span.end_time_unix_nano,
        "attributes": got.attributes,
        "status": (span.status.code, span.status.message),
        "events": [(e.name, e.time_unix_nano, _pb_attrs(e.attributes)) for e in span.events],
        "links": [(int.from_bytes(link.trace_id, "big"), int.from_bytes(link.span_id, "big"),
                   _pb_attrs(link.attributes)) for link in span.links],
    }


def _json_any(value: dict[str, Any]) -> Any:
    ((kind, inner),) = value.items()
    if kind == "arrayValue":
        return tuple(_json_any(v) for v in inner.get("values", []))
    if kind == "intValue":
        return int(inner)  # 64-bit integers are decimal strings in OTLP/JSON
    return inner


def _json_attrs(attributes: list[dict[str, Any]]) -> dict[str, Any]:
    return {kv["key"]: _json_any(kv["value"]) for kv in attributes}


def _nanos(text: Any) -> int:
    assert isinstance(text, str) and text.isdigit(), f"not a decimal string: {text!r}"
    return int(text)


def _hex_id(text: Any, width: int) -> int:
    assert isinstance(text, str) and len(text) == width, f"not {width} hex: {text!r}"
    assert text == text.lower()
    return int(text, 16)


def _json_views(document: dict[str, Any]) -> tuple[list[SpanView], list[dict[str, Any]]]:
    views: list[SpanView] = []
    resources: list[dict[str, Any]] = []
    for resource_spans in document["resourceSpans"]:
        resources.append(_json_attrs(resource_spans["resource"]["attributes"]))
        for scope_spans in resource_spans["scopeSpans"]:
            assert scope_spans["scope"]["name"] == "penguiflow"
            for span in scope_spans["spans"]:
                status = span.get("status", {})
                views.append({
                    "trace_id": _hex_id(span["traceId"], 32),
                    "span_id": _hex_id(span["spanId"], 16),
                    "parent_span_id": (_hex_id(span["parentSpanId"], 16)
                                       if "parentSpanId" in span else None),
                    "name": span["name"],
                    "kind": span["kind"] - 1,
                    "start": _nanos(span["startTimeUnixNano"]),
                    "end": _nanos(span["endTimeUnixNano"]),
                    "attributes": _json_attrs(span.get("attributes", [])),
                    "status": (status.get("code", 0), status.get("message", "")),
                    "events": [(e["name"], _nanos(e["timeUnixNano"]),
                                _json_attrs(e.get("attributes", [])))
                               for e in span.get("events", [])],
                    "links": [(_hex_id(link["traceId"], 32), _hex_id(link["spanId"], 16),
                               _json_attrs(link.get("attributes", [])))
                              for link in span.get("links", [])],
                })
    return views, resources


def _assert_same_spans(live: list[ReadableSpan], got: list[SpanView]) -> None:
    expected = {v["span_id"]: v for v in map(_live_view, live)}
    actual = {v["span_id"]: v for v in got}
    assert len(actual) == len(got), "a span arrived twice"
    assert set(actual) == set(expected)
    for span_id, view in expected.items():
        assert actual[span_id] == view, f"span {span_id:016x} ({view['name']}) differs"


def _one_line(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {err!r}"
    return lines[0]


def _pf(*args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OTEL_", "PENGUIFLOW_STORE"))}
    return subprocess.run([sys.executable, "-m", "penguiflow_inspector.cli", *args],
                          capture_output=True, text=True, timeout=timeout_s, check=False,
                          env=env)


# -- the round trip: OTLP/HTTP ------------------------------------------------------------------


def test_export_over_otlp_sends_the_live_spans(
        sqlite_recording: Recording, otlp_receiver: OTLPReceiver,
        capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["export", PREFIX, "--store", sqlite_recording.store_url,
                 "--otlp", otlp_receiver.url, "--service-name", "checkout"])
    out, err = capsys.readouterr()
    assert code == 0
    assert out == ""
    n = len(sqlite_recording.live)
    assert _one_line(err).startswith(
        f"exported {n} spans of trace {MAIN_TRACE} (")
    assert err.rstrip().endswith(f"to {otlp_receiver.url}/v1/traces")
    received = otlp_receiver.wait_for_spans(n)
    _assert_same_spans(sqlite_recording.live, [_received_view(s) for s in received])
    assert {s.resource["service.name"] for s in received} == {"checkout"}
    assert otlp_receiver.requests == 1


def test_export_as_a_subprocess_with_the_full_id(
        sqlite_recording: Recording, otlp_receiver: OTLPReceiver) -> None:
    proc = _pf("export", MAIN_TRACE, "--store", sqlite_recording.store_url,
               "--otlp", otlp_receiver.url)
    assert proc.returncode == 0, proc.stderr
    assert _one_line(proc.stderr).startswith(f"exported {len(sqlite_recording.live)} spans")
    received = otlp_receiver.wait_for_spans(len(sqlite_recording.live))
    _assert_same_spans(sqlite_recording.live, [_received_view(s) for s in received])
    # Without --service-name (and no OTEL_SERVICE_NAME) the resource names the runtime.
    assert {s.resource["service.name"] for s in received} == {"penguiflow"}


def test_export_from_postgres_sends_the_live_spans(
        pg_recording: Recording, otlp_receiver: OTLPReceiver,
        capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["export", PREFIX, "--store", pg_recording.store_url,
                 "--otlp", otlp_receiver.url])
    assert code == 0, capsys.readouterr().err
    received = otlp_receiver.wait_for_spans(len(pg_recording.live))
    _assert_same_spans(pg_recording.live, [_received_view(s) for s in received])


# -- the round trip: OTLP-JSON ------------------------------------------------------------------


def test_export_json_file_holds_the_live_spans(
        sqlite_recording: Recording, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "trace.json"
    code = main(["export", PREFIX, "--store", sqlite_recording.store_url, "--json", str(target),
                 "--service-name", "checkout"])
    out, err = capsys.readouterr()
    assert code == 0
    assert out == ""
    assert _one_line(err).endswith(f"to {target}")
    views, resources = _json_views(json.loads(target.read_text(encoding="utf-8")))
    _assert_same_spans(sqlite_recording.live, views)
    assert [r["service.name"] for r in resources] == ["checkout"]


def test_export_without_a_target_writes_json_to_stdout(
        sqlite_recording: Recording, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", PREFIX, "--store", sqlite_recording.store_url]) == 0
    out, err = capsys.readouterr()
    assert _one_line(err).endswith("to stdout")
    views, _ = _json_views(json.loads(out))
    _assert_same_spans(sqlite_recording.live, views)


def test_export_json_as_a_subprocess(sqlite_recording: Recording) -> None:
    proc = _pf("export", PREFIX, "--store", sqlite_recording.store_url, "--json", "-")
    assert proc.returncode == 0, proc.stderr
    _one_line(proc.stderr)
    views, _ = _json_views(json.loads(proc.stdout))
    _assert_same_spans(sqlite_recording.live, views)


def test_the_store_defaults_to_penguiflow_store(
        sqlite_recording: Recording, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PENGUIFLOW_STORE", sqlite_recording.store_url)
    assert main(["export", PREFIX]) == 0
    views, _ = _json_views(json.loads(capsys.readouterr().out))
    _assert_same_spans(sqlite_recording.live, views)


# -- errors: one line, the right exit status, no traceback ---------------------------------------


def test_unknown_trace_id_is_a_usage_error(
        sqlite_recording: Recording, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "0123abcd", "--store", sqlite_recording.store_url]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    line = _one_line(err)
    assert line.startswith("pf export: no trace id starts with '0123abcd'")
    assert "--store" in line


def test_ambiguous_prefix_lists_the_candidates(
        sqlite_recording: Recording, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "feed", "--store", sqlite_recording.store_url]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "ambiguous" in line and "2 traces match" in line
    for trace_id in OTHER_TRACES:
        assert trace_id in line
    assert "give more characters" in line


def test_unreachable_postgres_fails_in_one_line() -> None:
    started = time.monotonic()
    proc = _pf("export", "abc", "--store", "postgresql://pf:s3cret@127.0.0.1:1/x",
               "--otlp", "http://127.0.0.1:1")
    assert proc.returncode == 1
    assert proc.stdout == ""
    line = _one_line(proc.stderr)
    assert line.startswith("pf export: trace store:")
    assert "127.0.0.1:1" in line
    assert "s3cret" not in line
    assert time.monotonic() - started < 30


def test_a_missing_sqlite_file_is_not_created(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "nowhere" / "traces.db"
    assert main(["export", "abc", "--store", f"sqlite:///{path}"]) == 2
    assert "no trace store at" in _one_line(capsys.readouterr().err)
    assert not path.exists() and not path.parent.exists()


def test_a_file_that_is_not_a_store_fails_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "notes.db"
    text = b"these are not the traces you are looking for" * 100
    path.write_bytes(text)
    assert main(["export", "abc", "--store", f"sqlite:///{path}"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("pf export: SQLite store") and "not a penguiflow trace" in line
    assert path.read_bytes() == text


@pytest.mark.parametrize("url", ["memory://", "redis://localhost/0"])
def test_a_store_url_export_cannot_read_is_a_usage_error(
        url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "abc", "--store", url]) == 2
    _one_line(capsys.readouterr().err)


def test_otlp_and_json_are_mutually_exclusive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["export", "abc", "--otlp", "http://127.0.0.1:1", "--json", "x.json"])
    assert info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_an_unwritable_json_file_fails_in_one_line(
        sqlite_recording: Recording, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "missing-dir" / "trace.json"
    assert main(["export", PREFIX, "--store", sqlite_recording.store_url,
                 "--json", str(target)]) == 1
    assert _one_line(capsys.readouterr().err).startswith(f"pf export: cannot write {target}")


def test_json_through_a_symlink_or_a_fifo_writes_through_it(
        sqlite_recording: Recording, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The file was written beside the name and renamed over it: a symlink became a
    # regular file (its target untouched) and a FIFO's reader got nothing.
    real = tmp_path / "real.json"
    link = tmp_path / "link.json"
    link.symlink_to(real)
    assert main(["export", PREFIX, "--store", sqlite_recording.store_url,
                 "--json", str(link)]) == 0
    capsys.readouterr()
    assert link.is_symlink()
    views, _ = _json_views(json.loads(real.read_text(encoding="utf-8")))
    _assert_same_spans(sqlite_recording.live, views)

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received: list[bytes] = []
    import threading

    def read() -> None:
        with open(fifo, "rb") as pipe:
            received.append(pipe.read())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert main(["export", PREFIX, "--store", sqlite_recording.store_url,
                 "--json", str(fifo)]) == 0
    reader.join(HANG_GUARD_S)
    assert not reader.is_alive()
    assert fifo.is_fifo()
    views, _ = _json_views(json.loads(received[0]))
    _assert_same_spans(sqlite_recording.live, views)


@pytest.mark.parametrize("where", ["", ".", "/", "dir"])
def test_json_naming_a_directory_is_a_usage_error(
        where: str, sqlite_recording: Recording, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    if where == "dir":
        where = str(tmp_path)
    assert main(["export", PREFIX, "--store", sqlite_recording.store_url,
                 "--json", where]) == 2  # before: a ValueError traceback
    assert "names a directory, not a file" in _one_line(capsys.readouterr().err)


def test_export_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    # `pf export ID | head -c 100`: the reader goes; before, a BrokenPipeError traceback.
    # A trace whose JSON is far bigger than a pipe's buffer: written after the close.
    from penguiflow.state import StoredEvent

    url = f"sqlite:///{tmp_path}/big.db"
    trace_id = "b" * 32

    async def record() -> None:
        async with open_store(url) as store:
            await store.save_events([StoredEvent(
                trace_id, 1.7e9 + i, "node_start" if i % 2 == 0 else "node_success",
                "n", "n", {}, invocation_id=f"{i // 2:016x}", flow_id="f", seq=i + 1)
                for i in range(4000)])

    asyncio.run(record())
    proc = subprocess.Popen([sys.executable, "-m", "penguiflow_inspector.cli", "export",
                             trace_id, "--store", url],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.read(10) == b'{"resource'
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=HANG_GUARD_S) == 0
    assert "Traceback" not in err and "BrokenPipe" not in err


def test_a_write_failing_midway_leaves_the_file_there_untouched(
        sqlite_recording: Recording, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import errno

    from penguiflow_inspector import export

    target = tmp_path / "trace.json"
    target.write_text("the previous export\n")

    def half_then_full_disk(spans: Any, out: Any, **_: Any) -> None:
        out.write('{"resourceSpans": [')
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "write_otlp_json", half_then_full_disk)
    assert main(["export", PREFIX, "--store", sqlite_recording.store_url,
                 "--json", str(target)]) == 1
    assert "No space left on device" in _one_line(capsys.readouterr().err)
    assert target.read_text() == "the previous export\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trace.json"]


def test_collector_down_fails_in_one_line_within_the_timeout(
        sqlite_recording: Recording) -> None:
    url = down_url()
    started = time.monotonic()
    proc = _pf("export", PREFIX, "--store", sqlite_recording.store_url, "--otlp", url,
               "--timeout", "2")
    elapsed = time.monotonic() - started
    assert proc.returncode == 1
    line = _one_line(proc.stderr)
    assert line.startswith(f"pf export: OTLP export to {url}/v1/traces failed after 0 of "
                           f"{len(sqlite_recording.live)} spans")
    assert "--json" in line
    assert elapsed < 20  # interpreter start + the 2 s export budget, with slack for slow CI


@pytest.mark.parametrize("mode", ["reject", "unavailable", "stall"])
def test_a_refusing_or_stalled_collector_fails_within_the_timeout(
        sqlite_recording: Recording, otlp_receiver: OTLPReceiver, mode: Any,
        capsys: pytest.CaptureFixture[str]) -> None:
    otlp_receiver.mode = mode
    started = time.monotonic()
    code = main(["export", PREFIX, "--store", sqlite_recording.store_url,
                 "--otlp", otlp_receiver.url, "--timeout", "1"])
    elapsed = time.monotonic() - started
    assert code == 1
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"pf export: OTLP export to {otlp_receiver.url}/v1/traces failed")
    assert otlp_receiver.requests >= 1
    assert otlp_receiver.spans() == []
    assert elapsed < 10


# -- ids the runtime did not make ---------------------------------------------------------------


def test_export_nests_spans_whose_ids_are_not_hex(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # save_event takes any invocation id; an id that is no 16-hex span id (or is
    # all zeros) must still export, as a derived span id its children agree on.
    from penguiflow.state import StoredEvent

    ids = {"root": "inv-1", "child": "inv-2 \u00e9", "zero": "0" * 16}
    parents = {"root": (), "child": ("inv-1",), "zero": ("inv-2 \u00e9",)}

    def event(kind: str, name: str, ts: float, seq: int) -> StoredEvent:
        inv = ids[name]
        return StoredEvent("t-nonhex", ts, kind, name, name, {"latency_ms": 1.0},
                           invocation_id=inv, span_id=inv,
                           parent_invocation_ids=parents[name], flow_id="f", seq=seq)

    async def record(url: str) -> None:
        async with open_store(url) as store:
            for seq, name in enumerate(ids):
                await store.save_event(event("node_start", name, 1.7e9 + seq, 2 * seq + 1))
                await store.save_event(event("node_success", name, 1.7e9 + seq + 0.5,
                                             2 * seq + 2))

    url = f"sqlite:///{tmp_path / 'traces.db'}"
    asyncio.run(record(url))
    target = tmp_path / "trace.json"
    assert main(["export", "t-nonhex", "--store", url, "--json", str(target)]) == 0
    assert _one_line(capsys.readouterr().err).startswith("exported 4 spans of trace t-nonhex")
    views, _ = _json_views(json.loads(target.read_text(encoding="utf-8")))
    by_name = {v["attributes"].get("gen_ai.agent.name", "root span"): v for v in views}
    root, first = by_name["root span"], by_name["root"]
    assert first["parent_span_id"] == root["span_id"]
    assert by_name["child"]["parent_span_id"] == first["span_id"]
    assert by_name["zero"]["parent_span_id"] == by_name["child"]["span_id"]
    assert len({v["span_id"] for v in views}) == 4 and 0 not in {v["span_id"] for v in views}
    assert {v["attributes"].get("pf.invocation.id") for v in views} == {*ids.values(), None}
