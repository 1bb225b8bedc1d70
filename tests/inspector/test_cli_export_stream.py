"""``pf export --json`` streams what ``otlp_json`` would give, span by span.

The streamed writer builds each span's OTLP/JSON from its record instead of
going through SDK spans, protobuf and ``MessageToDict`` (16 s and 1.4 GB for a
100k-span trace): here its output must equal ``otlp_json``'s, parsed, for the
demo trace (client, server-free, retried, timed-out, cancelled spans with
events, links and statuses) and for every attribute type and a still-open span.
"""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any

import pytest

from penguiflow.spandata import SpanData, SpanEventData, SpanLinkData
from penguiflow.tracing import spans_from_events
from penguiflow_exporters import open_store
from penguiflow_exporters.otel import otlp_json
from penguiflow_inspector.cli import main
from penguiflow_inspector.demo import record_demo
from penguiflow_inspector.export import write_otlp_json


def _without_instance_id(data: dict[str, Any]) -> dict[str, Any]:
    # Resource.create gives each resource a random service.instance.id.
    for resource_spans in data["resourceSpans"]:
        attributes = resource_spans["resource"]["attributes"]
        resource_spans["resource"]["attributes"] = [
            a for a in attributes if a["key"] != "service.instance.id"]
    return data


def streamed(spans: list[SpanData], service_name: str | None = None) -> dict[str, Any]:
    out = io.StringIO()
    write_otlp_json(spans, out, service_name=service_name)
    return _without_instance_id(json.loads(out.getvalue()))


def reference(spans: list[SpanData], service_name: str | None = None) -> dict[str, Any]:
    return _without_instance_id(otlp_json(spans, service_name=service_name))


def test_the_demo_trace_streams_as_otlp_json_gives_it() -> None:
    async def demo() -> list[SpanData]:
        async with open_store("memory://") as store:
            run = await record_demo(store)
            return spans_from_events(list(await store.load_history(run.trace_id)))

    spans = asyncio.run(demo())
    assert len(spans) > 10
    assert streamed(spans, "svc") == reference(spans, "svc")


def test_every_attribute_type_an_open_span_a_link_and_a_remote_parent() -> None:
    attributes: dict[str, Any] = {"s": "", "t": True, "f": False, "i": 0, "big": 2**62,
                                  "d": 1.5, "whole": 2.0, "nan": float("nan"),
                                  "inf": float("-inf"), "arr": ("a", "b"), "empty": ()}
    spans = [
        SpanData("root", 0xABC, 1, None, "internal", 10, 20, attributes=attributes,
                 status="ok"),
        SpanData("open", 0xABC, 2, 1, "client", 11, None,
                 events=[SpanEventData("chunk", 15, {"n": 1}), SpanEventData("bare", 18)]),
        SpanData("served", 0xABC, 3, 2, "server", 12, 19, status="error",
                 status_description="boom \x1b",
                 links=[SpanLinkData(0xABC, 1, {"why": "join"}), SpanLinkData(0xDEF, 9)]),
        SpanData("failed quietly", 0xABC, 4, 1, "consumer", 13, 14, status="error"),
        SpanData("sent", 0xABC, 5, 1, "producer", 13, 14),
    ]
    got, want = streamed(spans), reference(spans)
    # NaN != NaN: compare the text of the attributes, the rest as data.
    assert json.dumps(got, sort_keys=True) == json.dumps(want, sort_keys=True)


def test_no_spans_is_an_empty_request() -> None:
    assert streamed([]) == reference([]) == {"resourceSpans": []}


def test_an_unwritable_file_is_one_line_exit_1(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path}/t.db"
    assert main(["demo", "--store", url, "--no-open", "--plain"]) == 0
    trace = capsys.readouterr().out.strip()
    assert main(["export", trace, "--store", url, "--json", str(tmp_path / "no" / "x.json")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("pf export: cannot write ") and "\n" not in err
    target = tmp_path / "out.json"
    assert main(["export", trace, "--store", url, "--json", str(target)]) == 0
    assert json.loads(target.read_text())["resourceSpans"][0]["scopeSpans"][0]["spans"]
