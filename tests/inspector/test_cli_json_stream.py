"""``pf inspect --json`` and ``pf traces --json`` are written as they are encoded.

At 200k events the whole view as data was ~170 MB more and ``json.dumps(indent=2)``
took seconds (issue 15 §3: now under 5 s and 500 MB, see
``benchmarks/inspector_scale.py``). These guards are cheap: the text is the
same data ``render.trace_json`` gives, and output leaves before the last item
is even made.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Iterator
from typing import Any

from penguiflow_exporters import open_store
from penguiflow_inspector import cli, render
from penguiflow_inspector.demo import record_demo
from penguiflow_inspector.model import build_trace


def test_the_streamed_view_is_the_views_data() -> None:
    async def demo() -> Any:
        async with open_store("memory://") as store:
            run = await record_demo(store)
            return build_trace(list(await store.load_history(run.trace_id)))

    view = asyncio.run(demo())
    out = io.StringIO()
    cli._dump(dict(render.trace_json_parts(view)), out)
    assert json.loads(out.getvalue()) == json.loads(json.dumps(render.trace_json(view)))
    lines = out.getvalue().splitlines()
    assert lines[0] == "{" and lines[-1] == "}"
    assert len(lines) > len(view.events)  # one event per line, greppable


def test_output_leaves_before_the_last_item_is_made() -> None:
    out = io.StringIO()
    written_at_half: list[int] = []

    def events(n: int) -> Iterator[dict[str, Any]]:
        for i in range(n):
            if i == n // 2:
                written_at_half.append(len(out.getvalue()))
            yield {"seq": i, "kind": "node_start", "extra": {}}

    cli._dump({"trace_id": "t", "events": events(40_000), "empty": iter(())}, out)
    assert written_at_half[0] > 500_000  # half the ~1.6 MB were out already
    data = json.loads(out.getvalue())
    assert [e["seq"] for e in data["events"]] == list(range(40_000))
    assert data["empty"] == [] and data["trace_id"] == "t"


def test_lists_and_scalars_are_plain_json() -> None:
    for value in ([], [{"a": 1}, {"b": [1, 2]}], {}, {"x": None}, "s\x1b", 3):
        out = io.StringIO()
        cli._dump(value, out)
        assert json.loads(out.getvalue()) == value
        assert "\x1b" not in out.getvalue()  # JSON escapes control characters itself
