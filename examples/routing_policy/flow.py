"""Policy-driven routing: a JSON file, not code, decides where each tenant's work goes.

``predicate_router`` proposes ``standard`` for everything; a ``DictRoutingPolicy`` loaded
from ``policy.json`` (next to this file) overrides that per tenant. ``update_mapping``
then changes the routing of a running flow without restarting it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from penguiflow import (
    Context,
    DictRoutingPolicy,
    Headers,
    Message,
    Node,
    RoutingRequest,
    create,
    predicate_router,
)

POLICY_FILE = Path(__file__).parent / "policy.json"


def tenant_of(request: RoutingRequest) -> str:
    return request.message.headers.tenant


def lane(name: str) -> Node:
    async def serve(msg: Message, ctx: Context) -> str:
        return f"{msg.headers.tenant} -> {name}"

    return Node(serve, name=name)


async def main() -> None:
    policy = DictRoutingPolicy.from_json_file(POLICY_FILE, default="standard",
                                              key_getter=tenant_of)
    router = predicate_router("router", lambda msg: "standard", policy=policy)
    premium, standard = lane("premium"), lane("standard")
    flow = create(router.to(premium, standard), premium.to(), standard.to())

    async def send(tenant: str) -> None:
        await flow.emit(Message(payload="job", headers=Headers(tenant=tenant)))
        print(f"  {await asyncio.wait_for(flow.fetch(), timeout=2)}")

    flow.run()
    try:
        print(f"policy loaded from {POLICY_FILE.name}:")
        for tenant in ("acme", "globex", "initech"):  # initech is not listed: default
            await send(tenant)
        policy.update_mapping({"globex": "premium"})
        print("after update_mapping({'globex': 'premium'}):")
        await send("globex")
    finally:
        await flow.stop()


if __name__ == "__main__":
    asyncio.run(main())
