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


async def record_a_trace(url: str) -> str:
    async def shout(message: Any, ctx: Any) -> Any:
        return message.model_copy(update={"payload": str(message.payload).upper()})

    async with open_store(url) as store:
        node = Node(shout, policy=NodePolicy(validate="none"))
        flow = create(node.to(), state_store=store)
        flow.run()
        message = Message(payload="hi", headers=Headers(tenant="t"))
        try:
            await flow.emit(message)
            await asyncio.wait_for(flow.fetch(), 5)
        finally:
            await flow.stop()
    return message.trace_id


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
