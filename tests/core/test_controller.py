"""§8 controller loops: WM / FinalAnswer post-processing, hop/token/deadline budgets."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from pfcore_support import Recorder, msg, within

from penguiflow import WM, FinalAnswer, FlowError, Message, Node, NodePolicy, create

NONE = NodePolicy(validate="none")


def controller(step: Any, *, name: str = "controller", self_edge: bool = True, **kw: Any) -> Any:
    """Build a controller node; ``step(message, calls)`` returns the node result."""
    calls: list[Message] = []

    async def fn(message: Any, ctx: Any) -> Any:
        calls.append(message)
        return await step(message, calls)

    node = Node(fn, name=name, policy=NONE, allow_cycle=self_edge)
    adjacency = node.to(node) if self_edge else node.to()
    return node, adjacency, calls


async def unchanged(message: Message, calls: list[Message]) -> Message:
    return message


async def test_runtime_increments_hops_until_budget(start: Any, recorder: Recorder) -> None:
    _node, adj, calls = controller(unchanged)
    flow = start(create(adj, middlewares=[recorder]))
    m = msg(WM(query="q", budget_hops=3))
    await flow.emit(m)
    out = await within(flow.fetch())
    assert isinstance(out, Message)
    assert out.payload == FinalAnswer(text="Hop budget exhausted")
    assert out.trace_id == m.trace_id
    assert [c.payload.hops for c in calls] == [0, 1, 2]
    # Each invocation finished with node_success; the loop ran exactly three times.
    await recorder.wait_for("node_success", count=3, trace_id=m.trace_id)
    assert recorder.kinds(trace_id=m.trace_id).count("node_start") == 3
    # Delivered exactly once: the next item is a later probe's.
    probe = msg(FinalAnswer(text="probe"))
    await flow.emit(probe)
    assert (await within(flow.fetch())).trace_id == probe.trace_id
    assert len(calls) == 4


async def test_default_hop_budget_is_eight(start: Any) -> None:
    _node, adj, calls = controller(unchanged)
    flow = start(create(adj))
    await flow.emit(msg(WM(query="q")))
    out = await within(flow.fetch())
    assert out.payload.text == "Hop budget exhausted"
    assert len(calls) == 8


async def test_budget_of_one_exhausts_on_first_hop(start: Any) -> None:
    _node, adj, calls = controller(unchanged)
    flow = start(create(adj))
    await flow.emit(msg(WM(query="q", budget_hops=1)))
    out = await within(flow.fetch())
    assert out.payload == FinalAnswer(text="Hop budget exhausted")
    assert len(calls) == 1


async def test_controller_that_increments_hops_itself_is_not_double_counted(start: Any) -> None:
    async def step(message: Message, calls: list[Message]) -> Message:
        wm = message.payload
        return message.model_copy(update={"payload": wm.model_copy(update={"hops": wm.hops + 1})})

    _node, adj, calls = controller(step)
    flow = start(create(adj))
    await flow.emit(msg(WM(query="q", budget_hops=4)))
    out = await within(flow.fetch())
    assert out.payload.text == "Hop budget exhausted"
    assert [c.payload.hops for c in calls] == [0, 1, 2, 3]


async def test_hops_start_from_the_result_when_the_input_was_not_a_wm(start: Any) -> None:
    """A controller turning a plain query into a WM: the first WM keeps its own hops."""

    async def step(message: Message, calls: list[Message]) -> Message:
        if isinstance(message.payload, str):
            return message.model_copy(update={"payload": WM(query=message.payload, budget_hops=3)})
        return message

    _node, adj, calls = controller(step)
    flow = start(create(adj))
    await flow.emit(msg("question"))
    out = await within(flow.fetch())
    assert out.payload == FinalAnswer(text="Hop budget exhausted")
    labels = [c.payload.hops if isinstance(c.payload, WM) else c.payload for c in calls]
    assert labels == ["question", 0, 1, 2]


async def test_result_hops_beyond_budget_exhaust_immediately(start: Any) -> None:
    async def step(message: Message, calls: list[Message]) -> Message:
        wm = message.payload
        return message.model_copy(update={"payload": wm.model_copy(update={"hops": 7})})

    _node, adj, calls = controller(step)
    flow = start(create(adj))
    await flow.emit(msg(WM(query="q", budget_hops=5)))
    out = await within(flow.fetch())
    assert out.payload.text == "Hop budget exhausted"
    assert len(calls) == 1


async def test_token_budget(start: Any) -> None:
    async def step(message: Message, calls: list[Message]) -> Message:
        wm = message.payload
        update = {"tokens_used": wm.tokens_used + 10, "facts": [*wm.facts, len(calls)]}
        return message.model_copy(update={"payload": wm.model_copy(update=update)})

    _node, adj, calls = controller(step)
    flow = start(create(adj))
    m = msg(WM(query="q", budget_tokens=25, budget_hops=None))
    await flow.emit(m)
    out = await within(flow.fetch())
    assert out.payload == FinalAnswer(text="Token budget exhausted")
    assert out.trace_id == m.trace_id
    assert len(calls) == 3
    assert calls[-1].payload.facts == [1, 2]


async def test_token_budget_checked_before_hop_budget(start: Any) -> None:
    async def step(message: Message, calls: list[Message]) -> Message:
        wm = message.payload
        return message.model_copy(update={"payload": wm.model_copy(update={"tokens_used": 99})})

    _node, adj, _calls = controller(step)
    flow = start(create(adj))
    await flow.emit(msg(WM(query="q", budget_tokens=10, budget_hops=1)))
    out = await within(flow.fetch())
    assert out.payload.text == "Token budget exhausted"


async def test_deadline_passed_in_result(start: Any) -> None:
    async def step(message: Message, calls: list[Message]) -> Message:
        return message.model_copy(update={"deadline_s": time.time() - 1})

    _node, adj, calls = controller(step)
    flow = start(create(adj))
    m = msg(WM(query="q", budget_tokens=0), deadline_s=time.time() + 60)
    await flow.emit(m)
    out = await within(flow.fetch())
    # The deadline check comes first, even though the token budget is also exhausted.
    assert out.payload == FinalAnswer(text="Deadline exceeded")
    assert len(calls) == 1


async def test_final_answer_bypasses_successors(start: Any, recorder: Recorder) -> None:
    summarized: list[Any] = []

    async def summarize(message: Any, ctx: Any) -> Any:
        summarized.append(message)
        return message

    async def step(message: Message, calls: list[Message]) -> Message:
        return message.model_copy(update={"payload": FinalAnswer(text="42")})

    node, _, _calls = controller(step, self_edge=False)
    summarizer = Node(summarize, name="summarizer", policy=NONE)
    flow = start(create(node.to(summarizer), summarizer.to(), middlewares=[recorder]))
    m = msg("what?")
    await flow.emit(m)
    # The controller has no egress floe of its own: the graph's first egress floe is used.
    out = await within(flow.fetch(from_=summarizer))
    assert out.payload == FinalAnswer(text="42")
    assert out.trace_id == m.trace_id
    await recorder.wait_for("node_success", trace_id=m.trace_id, node="controller")
    assert summarized == []
    assert recorder.of("node_start", node="summarizer") == []


async def test_non_controller_results_go_to_successors(start: Any) -> None:
    async def step(message: Message, calls: list[Message]) -> Message:
        return message.model_copy(update={"payload": "plain"})

    async def tail(message: Any, ctx: Any) -> Any:
        return message.model_copy(update={"payload": f"tail:{message.payload}"})

    node, _, _ = controller(step, self_edge=False)
    tail_node = Node(tail, name="tail", policy=NONE)
    flow = start(create(node.to(tail_node), tail_node.to()))
    await flow.emit(msg("x"))
    assert (await within(flow.fetch())).payload == "tail:plain"


async def test_unbounded_loop_streams_progress_snapshots(start: Any) -> None:
    async def step(message: Message, calls: list[Message]) -> Message:
        wm = message.payload
        if wm.hops >= 2:
            return message.model_copy(update={"payload": FinalAnswer(text="finished")})
        facts = [*wm.facts, wm.hops]
        return message.model_copy(update={"payload": wm.model_copy(update={"facts": facts})})

    _node, adj, calls = controller(step)
    flow = start(create(adj))
    m = msg(WM(query="q", budget_hops=None, budget_tokens=None))
    await flow.emit(m)
    items = [await within(flow.fetch()) for _ in range(3)]
    assert [type(i.payload).__name__ for i in items] == ["WM", "WM", "FinalAnswer"]
    assert [i.payload.hops for i in items[:2]] == [1, 2]
    assert items[0].payload.facts == [0]
    assert items[1].payload.facts == [0, 1]
    assert items[2].payload.text == "finished"
    assert all(i.trace_id == m.trace_id for i in items)
    assert [c.payload.hops for c in calls] == [0, 1, 2]
    # Snapshots are deep copies, independent of what the controller works on next.
    assert items[0].payload is not calls[1].payload
    assert items[0].payload.facts is not calls[1].payload.facts


async def test_a_loop_whose_facts_cannot_be_deep_copied_loops_once(start: Any) -> None:
    # The snapshot's deep copy raised after the loop was emitted: the attempt failed
    # and its retry emitted a second loop, so each hop doubled the loops (1+2+4+...).
    import threading

    async def step(message: Message, calls: list[Message]) -> Message:
        wm = message.payload
        if wm.hops >= 3:
            return message.model_copy(update={"payload": FinalAnswer(text="finished")})
        return message

    node, _adj, calls = controller(step)
    node.policy = NodePolicy(validate="none", max_retries=1, backoff_base=0.001)
    flow = start(create(node.to(node), emit_errors_to_rookery=True))
    lock = threading.Lock()  # a client holding one, say: no deep copy of it
    await flow.emit(msg(WM(query="q", budget_hops=None, facts=[lock])))
    items = [await within(flow.fetch()) for _ in range(4)]
    assert [type(i.payload).__name__ for i in items] == ["WM", "WM", "WM", "FinalAnswer"]
    assert [c.payload.hops for c in calls] == [0, 1, 2, 3]
    assert items[0].payload.facts == [lock]  # shared: the one object there is
    assert items[0].payload.facts is not calls[1].payload.facts


async def test_re_emitting_a_delivered_snapshot_is_dropped(start: Any) -> None:
    blocked = asyncio.Event()
    gate = asyncio.Event()

    async def step(message: Message, calls: list[Message]) -> Message:
        wm = message.payload
        if not isinstance(wm, WM):
            return message
        if wm.hops == 1:
            blocked.set()
            await gate.wait()
            return message.model_copy(update={"payload": FinalAnswer(text="done")})
        return message

    _node, adj, calls = controller(step)
    flow = start(create(adj))
    m = msg(WM(query="q", budget_hops=None, budget_tokens=None))
    await flow.emit(m)
    snapshot = await within(flow.fetch())
    assert snapshot.payload.hops == 1
    await within(blocked.wait())
    # A caller echoing the progress back must not fork the loop.
    await within(flow.emit(snapshot))
    flow.emit_nowait(snapshot.model_copy(deep=True))
    gate.set()
    final = await within(flow.fetch())
    assert final.payload == FinalAnswer(text="done")
    # A probe is processed after anything that might have been queued before it.
    probe = msg(FinalAnswer(text="probe"))
    await flow.emit(probe)
    assert (await within(flow.fetch())).trace_id == probe.trace_id
    labels = [c.payload.hops if isinstance(c.payload, WM) else "probe" for c in calls]
    assert labels == [0, 1, "probe"]


async def test_wm_memory_is_cleared_when_trace_completes(start: Any) -> None:
    async def step(message: Message, calls: list[Message]) -> Message:
        wm = message.payload
        if isinstance(wm, WM) and wm.hops >= 2:
            return message.model_copy(update={"payload": FinalAnswer(text="end")})
        return message

    _node, adj, calls = controller(step)
    flow = start(create(adj))
    m = msg(WM(query="q", budget_hops=None, budget_tokens=None))
    await flow.emit(m)
    first_run = [await within(flow.fetch()) for _ in range(3)]
    snapshot = first_run[0]
    assert snapshot.payload.hops == 1
    assert first_run[2].payload == FinalAnswer(text="end")
    # Once the worker has moved on to another trace, m's trace has fully drained.
    probe = msg(FinalAnswer(text="probe"))
    await flow.emit(probe)
    assert (await within(flow.fetch())).trace_id == probe.trace_id
    # The hops memory was cleared with the trace: the old snapshot now runs again.
    await flow.emit(snapshot)
    second_run = [await within(flow.fetch()) for _ in range(2)]
    assert second_run[0].payload.hops == 2
    assert second_run[1].payload == FinalAnswer(text="end")
    labels = [c.payload.hops if isinstance(c.payload, WM) else "probe" for c in calls]
    assert labels == [0, 1, 2, "probe", 1, 2]


async def test_wm_without_self_edge_is_a_node_error(start: Any, recorder: Recorder) -> None:
    _node, adj, calls = controller(unchanged, self_edge=False)
    flow = start(create(adj, emit_errors_to_rookery=True, middlewares=[recorder]))
    m = msg(WM(query="q"))
    await flow.emit(m)
    err = await within(flow.fetch())
    assert isinstance(err, FlowError)
    assert err.code == "NODE_EXCEPTION"
    assert err.exception_type == "KeyError"
    assert isinstance(err.unwrap(), KeyError)
    assert err.trace_id == m.trace_id
    (error,) = recorder.of("node_error", trace_id=m.trace_id)
    assert "KeyError" in error.extra["exception"]
    assert len(calls) == 1
    # 2.1's KeyError and message, with the fix said beside them.
    assert str(err.unwrap()) == "'Unknown target controller for controller'"
    assert "allow_cycle=True" in err.metadata["hint"]
    assert "node.to(node" in err.metadata["hint"]


async def test_more_traces_looping_at_once_than_the_queue_holds_all_finish(
        start: Any) -> None:
    # The loop back to itself waited for room on the node's own floe, which only
    # its own worker drains: past queue_maxsize looping traces, every one hung.
    depths: list[int] = []

    async def twenty_hops(message: Message, calls: list[Message]) -> Message:
        depths.append(ctx_of[0].queue_depth_in())
        await asyncio.sleep(0)  # a step that awaits something (a model call)
        if message.payload.hops >= 20:
            return message.model_copy(update={"payload": FinalAnswer(text="done")})
        return message

    ctx_of: list[Any] = []
    node, adj, calls = controller(twenty_hops)
    flow = start(create(adj, queue_maxsize=4))
    ctx_of.append(flow.context(node))
    sent = [msg(WM(query=str(i), budget_hops=100)) for i in range(40)]

    async def fetch_all() -> list[Any]:
        return [await flow.fetch() for _ in sent]

    *_, answers = await within(asyncio.gather(*map(flow.emit, sent), fetch_all()))
    assert sorted(a.trace_id for a in answers) == sorted(m.trace_id for m in sent)
    assert all(a.payload == FinalAnswer(text="done") for a in answers)
    assert len(calls) == 40 * 21  # hops 0..20 each
    # Still bounded: its floe to itself goes first while full (at most maxsize + 1),
    # so the node holds at most that plus its bounded incoming floe. (Admitting a
    # request per loop step grew it with every request, to hundreds.)
    assert max(depths) <= 4 + 1 + 4
