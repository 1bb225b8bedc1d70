"""``pf demo``: run a built-in flow that shows everything the inspector shows, and record it.

One trace, about a second long, over the in-memory remote transport::

    plan ──> fetch (fails once: retried) ──────┐
         ├─> slow_tool (times out once, then   ├─> join ──> summarize ──> researcher (remote,
         │   retried; the slow branch)   ──────┘                          streaming; cancelled
         ├─> writer (remote, streaming: submitted → working → 4 chunks → completed)
         └─> notify (its message is past its deadline: skipped)

Once the researcher has streamed two chunks, the demo cancels the trace: the
cancel propagates to the researcher's remote task (``remote_call_cancelled``,
with the agent's 50 ms acknowledgement) and is acknowledged when the trace has
drained. So the trace has retries, a timeout, a fan-out and a join (whose slow
branch is the critical path), stream chunks, remote latency split by task
state, a deadline skip, and a cancel that reaches a remote task.

Timing is driven by events, not sleeps: the researcher's agent is held by a
gate until the writer's call has completed, and the cancel is issued when the
researcher's second chunk has been recorded. The sleeps that remain are the
simulated work and the agents' latencies being shown.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Final

from penguiflow import FlowEvent, Headers, Message, Node, NodePolicy, create, join_k
from penguiflow.remote import InMemoryAgent, InMemoryTransport, RemoteCallRequest, RemoteNode
from penguiflow.state import TraceStore

__all__ = ["FLOW_NAME", "DemoRun", "record_demo"]

FLOW_NAME: Final = "pf-demo"
WRITER: Final = "inmemory://writer"
RESEARCHER: Final = "inmemory://researcher"
#: The longest the demo waits for any one thing before giving up (it takes ~1 s).
_GUARD_S: Final = 15.0


@dataclass(frozen=True, slots=True)
class DemoRun:
    """What ``record_demo`` recorded."""

    trace_id: str
    events: int
    """How many events the flow recorded for the trace (as the middleware saw them)."""


class _Watch:
    """A middleware that turns the events the demo waits for into asyncio.Events."""

    def __init__(self) -> None:
        self.writer_done = asyncio.Event()
        self.research_chunks = 0
        self.two_chunks = asyncio.Event()
        self.propagated = asyncio.Event()
        self.acknowledged = asyncio.Event()
        self.trace_id: str | None = None
        self.count = 0

    async def __call__(self, event: FlowEvent) -> None:
        if event.trace_id != self.trace_id:
            return  # flow-level events (node_cancelled at stop) are not the trace's
        self.count += 1
        kind, node = event.event_type, event.node_name
        if kind == "remote_call_success" and node == "writer":
            self.writer_done.set()
        elif (kind == "remote_stream_event" and node == "researcher"
              and event.extra.get("remote_text_bytes")):
            self.research_chunks += 1
            if self.research_chunks >= 2:
                self.two_chunks.set()
        elif kind == "remote_call_cancelled":
            self.propagated.set()
        elif kind == "trace_cancel_finish":
            self.acknowledged.set()


def _node(func: Any, name: str, **policy: Any) -> Node:
    return Node(func, name=name, policy=NodePolicy(validate="none", **policy))


async def _compose(request: RemoteCallRequest) -> str:
    return "Emperor penguins huddle to share heat."


async def _findings(request: RemoteCallRequest) -> AsyncIterator[str]:
    for i in range(20):  # far more than the demo lets it send: it is cancelled
        yield f"finding {i}; "


async def record_demo(store: TraceStore) -> DemoRun:
    """Run the demo flow once, recording into ``store``; returns the trace id.

    The store is flushed (``flow.stop()``) before this returns, but not closed.

    Raises:
        TimeoutError: a step did not happen within 15 s (a bug, not a user error).
    """
    watch = _Watch()
    gate = asyncio.Event()
    transport = InMemoryTransport({
        WRITER: InMemoryAgent(handler=_compose, latency_s=0.06, chunk_interval_s=0.05,
                              chunks=["Emperor ", "penguins ", "huddle ", "to share heat."]),
        RESEARCHER: InMemoryAgent(chunks=_findings, latency_s=0.08, gate=gate,
                                  chunk_interval_s=0.15, cancel_latency_s=0.05),
    })
    failed_once: set[str] = set()

    async def plan(msg: Message, ctx: Any) -> None:
        for target in (fetch, slow_tool, writer):
            await ctx.emit(msg, to=target)
        # A notification nobody waited for: its deadline is already past.
        late = msg.model_copy(update={"deadline_s": time.time() - 0.001})
        await ctx.emit(late, to=notify)

    async def fetch_docs(msg: Message, ctx: Any) -> Message:
        await asyncio.sleep(0.03)  # simulated I/O
        if msg.trace_id not in failed_once:  # the first attempt fails, the retry works
            failed_once.add(msg.trace_id)
            raise ConnectionError("search backend reset the connection")
        return msg.model_copy(update={"payload": "3 documents"})

    attempts: dict[str, int] = {}

    async def slow(msg: Message, ctx: Any) -> Message:
        attempt = attempts[msg.trace_id] = attempts.get(msg.trace_id, 0) + 1
        if attempt == 1:
            await asyncio.Event().wait()  # hangs: the 0.3 s timeout cuts it short
        await asyncio.sleep(0.2)  # simulated work: the branch the join waits for
        return msg.model_copy(update={"payload": "ranked"})

    async def summarize(msg: Message, ctx: Any) -> Message:
        await asyncio.sleep(0.02)
        return msg.model_copy(update={"payload": "summary of 3 documents"})

    async def notify_user(msg: Message, ctx: Any) -> None:  # never runs: deadline passed
        return None

    fetch = _node(fetch_docs, "fetch", max_retries=2, backoff_base=0.04)
    slow_tool = _node(slow, "slow_tool", timeout_s=0.3, max_retries=1, backoff_base=0.02)
    notify = _node(notify_user, "notify")
    join = join_k("join", 2)
    summary = _node(summarize, "summarize")
    writer = RemoteNode(transport=transport, skill="write", agent_url=WRITER, name="writer",
                        streaming=True, policy=NodePolicy(validate="none"))
    researcher = RemoteNode(transport=transport, skill="research", agent_url=RESEARCHER,
                            name="researcher", streaming=True,
                            policy=NodePolicy(validate="none"))
    planner = _node(plan, "plan")
    flow = create(
        planner.to(fetch, slow_tool, writer, notify), fetch.to(join), slow_tool.to(join),
        join.to(summary), summary.to(researcher), writer.to(), researcher.to(), notify.to(),
        name=FLOW_NAME, state_store=store, middlewares=[watch])
    message = Message(payload="How do emperor penguins keep warm?",
                      headers=Headers(tenant="demo"))
    watch.trace_id = message.trace_id
    flow.run()
    try:
        await flow.emit(message)
        await asyncio.wait_for(watch.writer_done.wait(), _GUARD_S)
        gate.set()  # the researcher's agent may start working now
        await asyncio.wait_for(watch.two_chunks.wait(), _GUARD_S)
        await flow.cancel(message.trace_id)
        await asyncio.wait_for(watch.propagated.wait(), _GUARD_S)
        await asyncio.wait_for(watch.acknowledged.wait(), _GUARD_S)
    finally:
        await flow.stop()  # flushes the store
    return DemoRun(message.trace_id, watch.count)
