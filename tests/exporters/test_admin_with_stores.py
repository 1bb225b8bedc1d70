"""`penguiflow-admin` reads any PenguiFlow store through `penguiflow_exporters:default_store`."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from penguiflow import Headers, Message, Node, NodePolicy, create
from penguiflow_exporters import default_store_url, open_store

ADMIN = Path(sys.executable).with_name("penguiflow-admin")


async def record_a_trace(url: str, *trace_ids: str) -> str:
    """Run one message per trace id (one random one by default); the last trace id."""
    async def shout(message: Any, ctx: Any) -> Any:
        return message.model_copy(update={"payload": str(message.payload).upper()})

    async with open_store(url) as store:
        node = Node(shout, policy=NodePolicy(validate="none"))
        flow = create(node.to(), state_store=store)
        flow.run()
        messages = [Message(payload="hi", headers=Headers(tenant="t"), trace_id=t)
                    for t in trace_ids] or [Message(payload="hi", headers=Headers(tenant="t"))]
        try:
            for message in messages:
                await flow.emit(message)
                await asyncio.wait_for(flow.fetch(), 5)
        finally:
            await flow.stop()
    return messages[-1].trace_id


def admin(*args: str, store_url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PENGUIFLOW_STORE": store_url}
    return subprocess.run([str(ADMIN), *args, "--state-store",
                           "penguiflow_exporters:default_store"],
                          capture_output=True, text=True, timeout=60, env=env, check=False)


def test_history_and_replay_from_a_sqlite_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/traces.db"
    trace_id = asyncio.run(record_a_trace(url))
    history = admin("history", trace_id, store_url=url)
    assert history.returncode == 0, history.stderr
    lines = [json.loads(line) for line in history.stdout.splitlines()]
    assert [(r["event"], r["node_name"]) for r in lines] == [
        ("node_start", "shout"), ("node_success", "shout")]
    assert {r["trace_id"] for r in lines} == {trace_id}
    replay = admin("replay", trace_id, "--tail", "1", store_url=url)
    assert replay.stdout.splitlines()[0] == f"# replay trace={trace_id} events=1"


def test_unknown_trace_and_unreachable_store_fail_cleanly(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/traces.db"
    asyncio.run(record_a_trace(url))
    replay = admin("replay", "nope", store_url=url)
    assert replay.returncode == 0 and replay.stdout.strip() == "# trace nope has no stored events"
    down = admin("history", "x", store_url="postgresql://postgres@127.0.0.1:1/none")
    assert down.returncode == 1
    assert down.stderr.startswith("error: ") and "Traceback" not in down.stderr


def test_default_store_url_prefers_the_environment(monkeypatch: Any) -> None:
    monkeypatch.delenv("PENGUIFLOW_STORE", raising=False)
    assert default_store_url() == "sqlite:///.penguiflow/traces.db"
    monkeypatch.setenv("PENGUIFLOW_STORE", "memory://")
    assert default_store_url() == "memory://"


def test_history_resolves_trace_id_prefixes_like_pf_inspect(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/traces.db"
    asyncio.run(record_a_trace(url, "abc100", "abc200", "def300"))
    exact = admin("history", "abc100", store_url=url)
    unique = admin("history", "de", store_url=url)
    assert exact.returncode == unique.returncode == 0, exact.stderr + unique.stderr
    assert {json.loads(line)["trace_id"] for line in unique.stdout.splitlines()} == {"def300"}
    assert [json.loads(line)["trace_id"] for line in exact.stdout.splitlines()] == [
        "abc100", "abc100"]

    ambiguous = admin("history", "abc", store_url=url)
    assert ambiguous.returncode == 1 and ambiguous.stdout == ""
    assert ambiguous.stderr == ("error: trace id prefix 'abc' is ambiguous (2 traces match: "
                                "abc100, abc200); give more characters\n")
    unknown = admin("history", "zzz", store_url=url)
    assert unknown.returncode == 1 and unknown.stdout == ""
    assert unknown.stderr.startswith("error: no trace id starts with 'zzz'")
