"""FlowTestKit: run one message, check the path it took, inject transient failures.

``simulate_error`` builds a node function that fails twice, then succeeds; with
``max_retries=2`` the flow still answers. ``run_one`` starts the flow, emits one message,
returns the first Rookery item and always stops the flow; ``assert_node_sequence`` checks
the order in which nodes ran for that trace (retries of one node count once).
"""

from __future__ import annotations

import asyncio

from penguiflow import FlowErrorCode, Headers, Message, Node, NodePolicy, create, testkit


async def parse(msg: Message, ctx: object) -> Message:
    return msg.model_copy(update={"payload": {"amount": int(msg.payload)}})


async def receipt(msg: Message, ctx: object) -> Message:
    return msg.model_copy(update={"payload": f"receipt: {msg.payload}"})


async def main() -> None:
    # Fails with RuntimeError("[NODE_EXCEPTION] simulated failure in charge (attempt n)")
    # on calls 1 and 2, then returns result_factory(message).
    charge = testkit.simulate_error(
        "charge", FlowErrorCode.NODE_EXCEPTION, fail_times=2,
        result_factory=lambda m: m.model_copy(update={"payload": {**m.payload, "ok": True}}),
    )
    parse_node, receipt_node = Node(parse), Node(receipt)
    charge_node = Node(charge, policy=NodePolicy(max_retries=2, backoff_base=0.01))
    flow = create(parse_node.to(charge_node), charge_node.to(receipt_node), receipt_node.to())

    # A readable trace id keeps the assertion messages below easy to follow.
    message = Message(payload="42", headers=Headers(tenant="demo"), trace_id="order-42")
    result = await testkit.run_one(flow, message, timeout_s=2.0)
    print(f"result: {result.payload}")
    print(f"flow stopped by run_one: {not flow.running}")
    print(f"charge calls: attempts={charge.simulation.attempts} "
          f"failures={charge.simulation.failures}")

    testkit.assert_node_sequence(message.trace_id, ["parse", "charge", "receipt"])
    print("assert_node_sequence(['parse', 'charge', 'receipt']): passed")

    try:
        testkit.assert_node_sequence(message.trace_id, ["parse", "receipt"])
    except AssertionError as exc:
        print(f"assert_node_sequence(['parse', 'receipt']) raised: {exc}")

    try:
        testkit.assert_node_sequence("never-ran", ["parse"])
    except AssertionError as exc:
        print(f"unknown trace raised: {exc}")


if __name__ == "__main__":
    asyncio.run(main())
