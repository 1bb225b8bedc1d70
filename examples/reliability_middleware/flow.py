"""Reliability metrics from FlowEvents, and observers that cannot break the flow.

``NodeMetrics`` is a middleware: it sees every FlowEvent and aggregates per-node latency
and retry counts from ``metric_samples()`` / ``tag_values()``, the shapes a metrics backend
(Prometheus, MLflow, StatsD) wants. ``broken_exporter`` raises on every success: the flow
still answers, and the failures are counted in ``flow.observer_failures`` and logged.
The runtime logs every event on logger ``penguiflow.core``; a handler prints those records.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import defaultdict

from penguiflow import FlowEvent, Headers, Message, Node, NodePolicy, create


class NodeMetrics:
    """Per-node success latencies and retry counts."""

    def __init__(self) -> None:
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.retries: dict[str, int] = defaultdict(int)

    async def __call__(self, event: FlowEvent) -> None:
        tags, samples = event.tag_values(), event.metric_samples()
        node = tags.get("node_name", "?")
        if tags["event_type"] == "node_success":
            self.latencies[node].append(samples["latency_ms"])
        elif tags["event_type"] == "node_retry":
            self.retries[node] += 1


async def broken_exporter(event: FlowEvent) -> None:
    if event.event_type == "node_success":
        raise ConnectionError("metrics backend is down")


class PrintRecords(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        # Event records carry the FlowEvent payload as attributes (event, node_name, ...);
        # a middleware_error record carries the event it failed on and the error.
        event = getattr(record, "event", "?")
        if record.getMessage() == "middleware_error":
            print(f"  log {record.levelname:<5} middleware_error while delivering {event}: "
                  f"{getattr(record, 'error', '?')}")
        else:
            print(f"  log {record.levelname:<5} {event:<12} "
                  f"node={getattr(record, 'node_name', '?')}")


calls = itertools.count(1)


async def lookup(msg: Message, ctx: object) -> Message:
    if next(calls) == 1:
        raise TimeoutError("index warming up")  # transient: the retry succeeds
    return msg.model_copy(update={"payload": [msg.payload, "facts"]})


async def rank(msg: Message, ctx: object) -> Message:
    return msg.model_copy(update={"payload": sorted(msg.payload)})


async def main() -> None:
    core_logger = logging.getLogger("penguiflow.core")
    core_logger.addHandler(PrintRecords(level=logging.INFO))
    core_logger.setLevel(logging.INFO)

    metrics = NodeMetrics()
    lookup_node = Node(lookup, policy=NodePolicy(max_retries=1, backoff_base=0.01))
    rank_node = Node(rank)
    flow = create(lookup_node.to(rank_node), rank_node.to(),
                  middlewares=[broken_exporter, metrics])
    flow.run()
    try:
        await flow.emit(Message(payload="query", headers=Headers(tenant="demo")))
        result = await asyncio.wait_for(flow.fetch(), timeout=2)
    finally:
        await flow.stop()

    print(f"result despite the broken middleware: {result.payload}")
    print(f"observer failures: {flow.observer_failures}")
    for node in ("lookup", "rank"):
        latencies = metrics.latencies[node]
        print(f"metrics {node}: successes={len(latencies)} retries={metrics.retries[node]} "
              f"latency_ms={max(latencies):.2f}")


if __name__ == "__main__":
    asyncio.run(main())
