"""Controller loop: a node with a self-edge iterates on a ``WM`` until a ``FinalAnswer``.

While the node returns a ``WM`` the runtime sends it back to the same node, counting
hops. Returning a ``FinalAnswer`` ends the loop. If the hop or token budget runs out
first, the runtime ends it instead with a ``FinalAnswer`` saying which budget ran out.
"""

from __future__ import annotations

import asyncio
from collections import Counter

from penguiflow import WM, Context, FinalAnswer, Headers, Message, Node, create

FACTS_NEEDED = 3
TOKENS_PER_HOP = 20
calls: Counter[str] = Counter()  # controller invocations per trace id


async def controller(msg: Message, ctx: Context) -> Message:
    calls[msg.trace_id] += 1
    wm: WM = msg.payload
    if len(wm.facts) >= FACTS_NEEDED:
        answer = FinalAnswer(text=f"{wm.query}: {', '.join(wm.facts)} (after {wm.hops} hops)")
        return msg.model_copy(update={"payload": answer})
    # Gather one more fact; the runtime increments `hops` when we loop.
    more = wm.model_copy(update={"facts": [*wm.facts, f"fact{len(wm.facts) + 1}"],
                                 "tokens_used": wm.tokens_used + TOKENS_PER_HOP})
    return msg.model_copy(update={"payload": more})


async def main() -> None:
    node = Node(controller, allow_cycle=True)
    flow = create(node.to(node))  # the self-edge is the loop

    runs = [
        ("enough budget", WM(query="q1")),  # budget_hops defaults to 8
        ("hop budget 2", WM(query="q2", budget_hops=2)),
        ("token budget 50", WM(query="q3", budget_tokens=50)),
    ]
    flow.run()
    try:
        for label, wm in runs:
            msg = Message(payload=wm, headers=Headers(tenant="demo"))
            await flow.emit(msg)
            result = await asyncio.wait_for(flow.fetch(), timeout=2)
            print(f"{label}: {result.payload.text!r} "
                  f"[controller ran {calls[msg.trace_id]} times]")
    finally:
        await flow.stop()


if __name__ == "__main__":
    asyncio.run(main())
