"""Log lines written during a remote call carry its A2A contextId and taskId.

A RemoteNode calls a real a2a-sdk 1.3 agent on 127.0.0.1 (``sdk_agent.serve_agent``)
through A2AClientTransport, with ``configure_logging`` rendering every line as
JSON. From the moment an answer names the task, every line of the invocation --
the client's own, httpx's, the runtime's ``remote_*`` events -- has the call's
``context_id`` and ``task_id``; lines before that, and lines of other
invocations, do not.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from typing import Any

from sdk_agent import serve_agent

from penguiflow import Headers, Message, NodePolicy, create
from penguiflow.remote import RemoteNode
from penguiflow.state import InMemoryStateStore
from penguiflow_a2a.client import A2AClientTransport
from penguiflow_exporters.logging import configure_logging

WAIT = 10.0  # hang guard for one awaited step


async def _call(flow: Any, message: Message) -> None:
    await flow.emit(message)
    async with asyncio.timeout(WAIT):
        while not isinstance(await flow.fetch(), str):
            pass  # stream chunks before the result


async def test_lines_during_a_remote_call_carry_its_context_and_task_ids() -> None:
    stream = io.StringIO()
    store = InMemoryStateStore()
    async with serve_agent() as agent, \
            A2AClientTransport(timeout_s=WAIT, resubscribe_backoff_s=0.01) as transport:
        node = RemoteNode(transport=transport, skill="echo", agent_url=agent.base_url,
                          name="remote", streaming=True, policy=NodePolicy(validate="none"))
        flow = create(node.to(), state_store=store)
        # The first call's stream is cut after 3 frames (task, WORKING, a chunk): the
        # client logs the drop and resubscribes, all after the task was named.
        agent.cut_next_stream_after = 3

        async def release_when_subscribed() -> None:
            await agent.subscribed.wait()
            agent.release.set()

        helper = asyncio.create_task(release_when_subscribed())
        first = Message(payload="slow resub", headers=Headers(tenant="t"))
        second = Message(payload="again", headers=Headers(tenant="t"))
        with configure_logging(json=True, level=logging.INFO, stream=stream):
            flow.run()
            try:
                await _call(flow, first)
                await helper
                await _call(flow, second)
            finally:
                await flow.stop()
            logging.getLogger("app").info("after the flow")

    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    ids = {}
    for message in (first, second):
        (success,) = [e for e in await store.load_history(message.trace_id)
                      if e.kind == "remote_call_success"]
        ids[message.trace_id] = (success.payload["remote_context_id"],
                                 success.payload["remote_task_id"])
    assert len(set(ids.values())) == 2 and all(all(pair) for pair in ids.values())

    def of(trace_id: str) -> list[dict[str, Any]]:
        return [line for line in lines if line.get("trace_id") == trace_id]

    for trace_id, (context_id, task_id) in ids.items():
        own = of(trace_id)
        kinds = [line["event"] for line in own]
        start = kinds.index("remote_call_start")
        # Before the agent named the task, nothing to carry.
        assert "task_id" not in own[start] and "context_id" not in own[start]
        named = [line for line in own[start:] if "task_id" in line]
        assert {(line["context_id"], line["task_id"]) for line in named} == {
            (context_id, task_id)}
        assert {"remote_stream_event", "remote_call_success", "node_success"} <= {
            line["event"] for line in named}
    # The client's own line and httpx's request line of the resubscription.
    first_lines = of(first.trace_id)
    (dropped,) = [line for line in first_lines if line["logger"] == "penguiflow_a2a.client"]
    assert "resubscribing" in dropped["event"]
    assert (dropped["context_id"], dropped["task_id"]) == ids[first.trace_id]
    assert dropped["node"] == "remote"
    httpx_lines = [line for line in first_lines if line["logger"] == "httpx"]
    assert httpx_lines and all(line["task_id"] == ids[first.trace_id][1]
                               for line in httpx_lines if "task_id" in line)
    assert any("task_id" in line for line in httpx_lines)  # SubscribeToTask's
    # Outside any invocation: no remote ids linger.
    (after,) = [line for line in lines if line["event"] == "after the flow"]
    assert "task_id" not in after and "context_id" not in after
