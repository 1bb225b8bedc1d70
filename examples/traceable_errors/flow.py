"""Traceable errors: retries with backoff, then a FlowError delivered to Rookery.

``fetch_quote`` fails every time: the runtime retries it twice with exponential backoff,
then gives up and, because the flow was built with ``emit_errors_to_rookery=True``, sends
a ``FlowError`` to Rookery instead of leaving the caller waiting. ``summarize`` exceeds its
``timeout_s`` and fails with ``NODE_TIMEOUT``.
"""

from __future__ import annotations

import asyncio

from penguiflow import FlowError, FlowEvent, Headers, Message, Node, NodePolicy, create

original_errors: list[Exception] = []  # every exception fetch_quote raised


async def fetch_quote(msg: Message, ctx: object) -> Message:
    error = ConnectionError(f"quote service unavailable (call {len(original_errors) + 1})")
    original_errors.append(error)
    raise error


async def summarize(msg: Message, ctx: object) -> Message:
    await asyncio.Event().wait()  # never finishes: stands for a hung dependency
    return msg


async def print_retries(event: FlowEvent) -> None:
    if event.event_type in {"node_error", "node_retry", "node_timeout", "node_failed"}:
        sleep = f" sleep_s={event.extra['sleep_s']}" if "sleep_s" in event.extra else ""
        print(f"  event {event.event_type:<12} node={event.node_name} "
              f"attempt={event.attempt}{sleep}")


def show(err: FlowError) -> None:
    print(f"FlowError code={err.code} node={err.node_name}")
    print(f"  message: {err.message}")
    print(f"  metadata['attempt']: {err.metadata['attempt']}")
    print(f"  unwrap(): {err.unwrap()!r}")


async def main() -> None:
    quote = Node(fetch_quote, policy=NodePolicy(max_retries=2, backoff_base=0.02))
    summary = Node(summarize, policy=NodePolicy(timeout_s=0.05))
    flow = create(quote.to(), summary.to(), emit_errors_to_rookery=True,
                  middlewares=[print_retries])
    flow.run()
    try:
        msg = Message(payload="ACME", headers=Headers(tenant="demo"))
        await flow.emit(msg, to=quote)
        err = await asyncio.wait_for(flow.fetch(), timeout=2)
        assert isinstance(err, FlowError)
        show(err)
        print(f"  same trace as the request: {err.trace_id == msg.trace_id}")
        print(f"  unwrap() is the last raised exception: {err.unwrap() is original_errors[-1]}")

        await flow.emit(Message(payload="ACME", headers=Headers(tenant="demo")), to=summary)
        err = await asyncio.wait_for(flow.fetch(), timeout=2)
        show(err)
        print(f"  metadata['timeout_s']: {err.metadata['timeout_s']}")
    finally:
        await flow.stop()


if __name__ == "__main__":
    asyncio.run(main())
