"""Hostile inputs on the failure path: unprintable exceptions and bad trace ids.

A node whose exception cannot be printed (``__repr__``/``__str__`` raise, or
recurse too deep) must be an ordinary node failure, and a trace id that some
observer cannot handle must be refused at emit, never kill a worker (a dead
worker leaves every later message of its node waiting forever).
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pfcore_support import Recorder, msg

from penguiflow import FlowError, Headers, Message, Node, NodePolicy, create
from penguiflow.errors import SAFE_TEXT_LIMIT, safe_repr, safe_str
from penguiflow.patterns import join_k
from penguiflow.semconv import utf8_text
from penguiflow.state import InMemoryStateStore
from penguiflow.types import check_trace_id

HANG_GUARD = 5.0


class ReprRaises(ValueError):
    def __repr__(self) -> str:
        raise RuntimeError("no repr for you")

    def __str__(self) -> str:
        raise RuntimeError("no str either")


def deep_dict(depth: int = 10_000) -> dict[str, Any]:
    root: dict[str, Any] = {}
    cur = root
    for _ in range(depth):
        cur["k"] = {}
        cur = cur["k"]
    return root


def recursion_error() -> ValueError:
    # repr/str of the args recurse past the recursion limit: RecursionError.
    return ValueError(deep_dict())


HOSTILE: dict[str, tuple[Callable[[], Exception], str, str]] = {
    "raising_repr_and_str": (lambda: ReprRaises(), "ReprRaises", "RuntimeError"),
    "recursion_in_repr": (recursion_error, "ValueError", "RecursionError"),
}


def alive(flow: Any) -> bool:
    """Every worker task of the flow is still running."""
    return bool(flow._workers) and all(
        w.task is not None and not w.task.done() for w in flow._workers
    )


@pytest.fixture
async def started() -> AsyncIterator[list[Any]]:
    flows: list[Any] = []
    yield flows
    for flow in flows:
        await asyncio.wait_for(flow.stop(), HANG_GUARD)


# --------------------------------------------------------------------- safe_repr


def test_safe_repr_and_safe_str_never_raise() -> None:
    assert safe_repr(ReprRaises()) == "<unprintable ReprRaises: repr raised RuntimeError>"
    assert safe_str(ReprRaises()) == "<unprintable ReprRaises: str raised RuntimeError>"
    assert safe_repr(recursion_error()) == ("<unprintable ValueError: repr raised RecursionError>")
    assert safe_str(recursion_error()) == "<unprintable ValueError: str raised RecursionError>"
    assert safe_repr(ValueError("x")) == "ValueError('x')"
    assert safe_str("plain") == "plain"


def test_safe_text_is_bounded_and_marks_the_cut() -> None:
    text = safe_str("x" * (SAFE_TEXT_LIMIT + 123))
    assert text == "x" * SAFE_TEXT_LIMIT + "… [cut: 123 more characters]"
    assert safe_repr("abcdef", limit=3) == "'ab… [cut: 5 more characters]"
    assert safe_str("y" * 1_000_000, limit=10).endswith("… [cut: 999,990 more characters]")
    assert safe_str("a" * 10, limit=10) == "a" * 10


def test_safe_text_always_encodes_to_utf8() -> None:
    text = safe_str(ValueError("lone \ud800 and nul \x00"))
    text.encode("utf-8")
    assert "\\ud800" in text and "\\x00" in text
    safe_repr(ValueError("\udfff")).encode("utf-8")


@given(st.text())
def test_utf8_text_encodes_anything_and_keeps_what_already_encodes(text: str) -> None:
    out = utf8_text(text)
    out.encode("utf-8")  # never raises
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        assert len(out) <= len(text) and "\ufffd" in out
    else:
        assert out == text


def test_utf8_text_replaces_only_the_lone_surrogate() -> None:
    assert utf8_text("a\ud800b\udfffc") == "a\ufffdb\ufffdc"
    assert utf8_text("\U0001f427 \ud800") == "\U0001f427 \ufffd"


# ------------------------------------------------------- unprintable exceptions


@pytest.mark.parametrize("case", sorted(HOSTILE))
async def test_unprintable_exception_is_an_ordinary_failure(case: str, started: list[Any]) -> None:
    make_exc, type_name, raised = HOSTILE[case]
    placeholder = f"<unprintable {type_name}: repr raised {raised}>"
    attempts: list[Any] = []

    async def flaky(m: Message, ctx: Any) -> Message:
        attempts.append(m.payload)
        if m.payload == "boom":
            raise make_exc()
        return m

    store = InMemoryStateStore()
    recorder = Recorder()
    node = Node(
        flaky, name="flaky", policy=NodePolicy(validate="none", max_retries=2, backoff_base=0.0)
    )
    flow = create(node.to(), emit_errors_to_rookery=True, state_store=store, middlewares=[recorder])
    flow.run()
    started.append(flow)

    bad = msg("boom")
    await flow.emit(bad)
    err = await asyncio.wait_for(flow.fetch(), HANG_GUARD)

    # Retried per policy: 1 + max_retries attempts.
    assert attempts == ["boom"] * 3
    # Routed like any error: a FlowError in Rookery, printable.
    assert isinstance(err, FlowError)
    assert err.trace_id == bad.trace_id and err.node_name == "flaky"
    assert err.code == "NODE_EXCEPTION"
    assert isinstance(err.unwrap(), ValueError)
    assert err.message == (
        f"Node 'flaky' raised {type_name}: <unprintable {type_name}: str raised {raised}>"
    )
    assert err.metadata["exception_repr"] == placeholder
    assert err.message in str(err)
    payload = err.to_payload()
    assert payload["message"] == err.message and payload["exception_type"] == type_name

    # Recorded: events carry the placeholder (middleware and store alike).
    assert [e.extra["exception"] for e in recorder.of("node_error")] == [placeholder] * 3
    assert len(recorder.of("node_retry")) == 2
    history = await flow.load_history(bad.trace_id)
    failed = [e for e in history if e.kind == "node_failed"]
    assert len(failed) == 1
    assert failed[0].payload["exception"] == placeholder
    assert failed[0].payload["flow_error"]["message"] == err.message

    # The worker survived: the next message for the same node is processed.
    good = msg("fine")
    await flow.emit(good)
    out = await asyncio.wait_for(flow.fetch(), HANG_GUARD)
    assert isinstance(out, Message) and out.trace_id == good.trace_id
    assert alive(flow)


@pytest.mark.parametrize("case", sorted(HOSTILE))
async def test_unprintable_exception_without_observers(case: str, started: list[Any]) -> None:
    make_exc = HOSTILE[case][0]

    async def fails_first(m: Message, ctx: Any) -> Message:
        if m.payload == "boom":
            raise make_exc()
        return m

    node = Node(fails_first, name="n", policy=NodePolicy(validate="none"))
    flow = create(node.to())  # no store, no middleware, errors not sent to Rookery
    flow.run()
    started.append(flow)
    await flow.emit(msg("boom"))
    good = msg("fine")
    await flow.emit(good)
    out = await asyncio.wait_for(flow.fetch(), HANG_GUARD)
    assert out.trace_id == good.trace_id
    assert alive(flow)


async def test_a_runtime_error_costs_one_item_not_the_worker(
    caplog: pytest.LogCaptureFixture, started: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Safety net: whatever escapes the envelope (here: delivering the FlowError
    # fails) is logged and counted, and the worker goes on with the next item.
    async def boom(m: Message, ctx: Any) -> Message:
        if m.payload == "boom":
            raise ValueError("x")
        return m

    flow = create(
        Node(boom, name="boom", policy=NodePolicy(validate="none")).to(),
        emit_errors_to_rookery=True,
    )

    async def broken_delivery(*args: Any) -> None:
        raise ReprRaises()

    # The runtime the workers deliver through (a slotted instance: patch its class).
    monkeypatch.setattr(type(flow._rt), "deliver_rookery", broken_delivery)
    flow.run()
    started.append(flow)
    await flow.emit(msg("boom"))
    good = msg("fine")
    await flow.emit(good)
    out = await asyncio.wait_for(flow.fetch(), HANG_GUARD)
    assert out.trace_id == good.trace_id
    assert alive(flow)
    assert flow.observer_failures["worker_error"] == 1
    errors = [r for r in caplog.records if r.getMessage() == "node_worker_error"]
    assert [r.error for r in errors] == [  # type: ignore[attr-defined]
        "<unprintable ReprRaises: repr raised RuntimeError>"
    ]


async def test_unprintable_exception_logged_at_debug(
    caplog: pytest.LogCaptureFixture, started: list[Any]
) -> None:
    async def boom(m: Message, ctx: Any) -> Message:
        raise ReprRaises()

    flow = create(
        Node(boom, name="boom", policy=NodePolicy(validate="none")).to(),
        emit_errors_to_rookery=True,
    )
    flow.run()
    started.append(flow)
    with caplog.at_level(logging.DEBUG, logger="penguiflow.core"):
        await flow.emit(msg("x"))
        err = await asyncio.wait_for(flow.fetch(), HANG_GUARD)
    assert isinstance(err, FlowError)
    failed = [r for r in caplog.records if getattr(r, "event", None) == "node_failed"]
    assert [r.exception for r in failed] == [  # type: ignore[attr-defined]
        "<unprintable ReprRaises: repr raised RuntimeError>"
    ]


# ------------------------------------------------------------------- trace ids


INVALID_IDS = {
    "nul": ("a\x00b", "U+0000 (NUL) at position 1"),
    "lone_surrogate": ("\ud800", "lone surrogate U+D800 (not encodable as UTF-8) at position 0"),
    "newline": ("ab\n", "U+000A (LF) at position 2"),
    "c1_control": ("x\x85", "U+0085 at position 1"),
    "five_mb": ("x" * 5_000_000, "5000000 characters long (at most 256)"),
    "empty": ("", "it is empty"),
    "unhashable": (["a"], "a list that cannot be hashed or printed"),
    "int_too_long": (10**300, "301 characters long (at most 256)"),
}


def bad_message(trace_id: Any) -> Message:
    # Message validation would refuse a non-str id; model_construct skips it.
    return Message.model_construct(
        payload="p",
        headers=Headers(tenant="acme"),
        trace_id=trace_id,
        deadline_s=None,
        meta={},
        ts=0.0,
    )


def echo_flow(**kwargs: Any) -> Any:
    async def echo(m: Any, ctx: Any) -> Any:
        return m

    return create(Node(echo, name="echo", policy=NodePolicy(validate="none")).to(), **kwargs)


@pytest.mark.parametrize("case", sorted(INVALID_IDS))
async def test_invalid_trace_id_refused_at_emit(case: str, started: list[Any]) -> None:
    trace_id, problem = INVALID_IDS[case]
    flow = echo_flow(state_store=InMemoryStateStore())
    flow.run()
    started.append(flow)
    for emit in (flow.emit, flow.emit_nowait):
        with pytest.raises(ValueError, match="invalid trace_id") as info:
            result = emit(bad_message(trace_id))
            if asyncio.iscoroutine(result):
                await result
        text = str(info.value)
        assert problem in text
        assert "1 to 256 characters" in text  # the rule, so the caller can fix it
        assert len(text) < 1000
    # Nothing was put anywhere; the flow works on.
    assert flow.context(flow.nodes[0]).queue_depth_in() == 0
    good = msg("ok")
    await flow.emit(good)
    out = await asyncio.wait_for(flow.fetch(), HANG_GUARD)
    assert out.trace_id == good.trace_id
    assert alive(flow)


async def test_invalid_trace_id_refused_at_context_emit(started: list[Any]) -> None:
    async def first(m: Message, ctx: Any) -> None:
        await ctx.emit(m.model_copy(update={"trace_id": "bad\x00id"}))

    async def second(m: Message, ctx: Any) -> Message:
        return m

    a = Node(first, name="first", policy=NodePolicy(validate="none"))
    b = Node(second, name="second", policy=NodePolicy(validate="none"))
    flow = create(a.to(b), b.to(), emit_errors_to_rookery=True)
    flow.run()
    started.append(flow)
    await flow.emit(msg("x"))
    err = await asyncio.wait_for(flow.fetch(), HANG_GUARD)
    assert isinstance(err, FlowError) and err.node_name == "first"
    assert isinstance(err.unwrap(), ValueError)
    assert "U+0000 (NUL) at position 3" in err.message
    assert alive(flow)


async def test_context_emit_nowait_refuses_before_any_put(started: list[Any]) -> None:
    flow = echo_flow()
    flow.run()
    started.append(flow)
    with pytest.raises(ValueError, match="lone surrogate"):
        flow.context(flow.nodes[0]).emit_nowait(bad_message("a\udc00"))
    assert flow.context(flow.nodes[0]).queue_depth_out() == 0


@pytest.mark.parametrize(
    "trace_id",
    [
        "abc-123:x",
        "заказ-7",
        "日本語 id",
        "a" * 256,
        "00f067aa0ba902b7" * 2,
        "123e4567-e89b-12d3-a456-426614174000",
        "order 42 / tenant=acme",
        "é",
    ],
)
async def test_unusual_valid_trace_ids_accepted(trace_id: str, started: list[Any]) -> None:
    assert check_trace_id(trace_id) == trace_id
    recorder = Recorder()
    flow = echo_flow(state_store=InMemoryStateStore(), middlewares=[recorder])
    flow.run()
    started.append(flow)
    await flow.emit(msg("p", trace_id=trace_id))
    out = await asyncio.wait_for(flow.fetch(), HANG_GUARD)
    assert out.trace_id == trace_id
    assert [e.trace_id for e in recorder.of("node_success")] == [trace_id]
    history = await flow.load_history(trace_id)
    assert [e.kind for e in history][-1] == "node_success"


async def test_an_objects_own_trace_id_type_is_taken_as_in_2_1(started: list[Any]) -> None:
    # 2.1 keyed per-trace accounting (and join_k's buckets) by any trace_id an
    # object carried: an order number, a UUID. Such ids were refused as "not a str".
    @dataclasses.dataclass
    class Part:
        trace_id: Any
        value: str

    class Unprintable:
        def __hash__(self) -> int:
            return 1

        def __str__(self) -> str:
            raise RuntimeError("no text")

    store = InMemoryStateStore()
    join = join_k("join", 2)
    flow = create(join.to(), state_store=store)
    flow.run()
    started.append(flow)
    order = uuid.UUID(int=5)
    for tid in (7, order):
        for value in "ab":
            await flow.emit(Part(tid, value))
        joined = await asyncio.wait_for(flow.fetch(), HANG_GUARD)
        assert [(p.trace_id, p.value) for p in joined] == [(tid, "a"), (tid, "b")]
    # Keyed by the object's id at run time; recorded as its text.
    assert [e.kind for e in await store.load_history("7")] == ["node_start", "node_success"] * 2
    assert await store.load_history(str(order)) != []
    with pytest.raises(ValueError, match="Unprintable that cannot be hashed or printed"):
        await flow.emit(Part(Unprintable(), "x"))
    assert alive(flow)


def test_default_trace_ids_take_the_fast_path() -> None:
    for _ in range(100):
        tid = Message(payload=None, headers=Headers(tenant="t")).trace_id
        assert tid.isascii() and tid.isalnum() and check_trace_id(tid) == tid


async def test_weird_node_name_and_returned_trace_id_do_not_kill_observers(
    caplog: pytest.LogCaptureFixture, started: list[Any]
) -> None:
    # A node may return a Message with any trace id (results are not checked):
    # stores, logs and middlewares must cope with any str.
    async def rename(m: Message, ctx: Any) -> Message:
        return m.model_copy(update={"trace_id": "x\ud800\x00"})

    node = Node(rename, name="n\udcff\x00", policy=NodePolicy(validate="none"))
    flow = create(node.to(), state_store=InMemoryStateStore(), middlewares=[Recorder()])
    flow.run()
    started.append(flow)
    with caplog.at_level(logging.DEBUG, logger="penguiflow.core"):
        await flow.emit(msg("p"))
        out = await asyncio.wait_for(flow.fetch(), HANG_GUARD)
    assert out.trace_id == "x\ud800\x00"
    assert alive(flow)
    assert not flow.observer_failures


# ------------------------------------------------------------------ hypothesis


class Hostile(Exception):
    """An exception whose repr/str may raise, recurse or be huge."""

    def __init__(self, arg: Any, how: str, index: int) -> None:
        super().__init__(arg)
        self.how = how
        self.index = index

    def __repr__(self) -> str:
        if self.how == "raise":
            raise KeyError("repr")
        if self.how == "huge":
            return "H" * 100_000
        if self.how == "not_str":
            return 42  # type: ignore[return-value]  # repr() raises TypeError
        return super().__repr__()

    def __str__(self) -> str:
        if self.how == "raise":
            raise ZeroDivisionError
        if self.how == "surrogate":
            return "bad \ud800 text \x00"
        return super().__str__()


DEEP = "<a dict nested 3,000 deep>"
text_any = st.text(st.characters(exclude_categories=()), max_size=40)
exc_args = st.one_of(
    text_any,
    st.integers(),
    st.just(DEEP),  # replaced by a deeply nested dict in the node (kept out of the
    # example itself, so hypothesis can print a failing example)
    st.recursive(st.none() | text_any, lambda c: st.lists(c, max_size=3), max_leaves=6),
)
behaviours = st.one_of(
    st.just(None),  # succeed
    st.tuples(exc_args, st.sampled_from(["raise", "huge", "not_str", "surrogate", "plain"])),
)
trace_ids = st.one_of(
    st.none(),  # the default uuid4().hex
    st.text(st.characters(exclude_categories=()), max_size=12),
    st.sampled_from(["a\x00", "\ud800", "x" * 300, "ok-1:é"]),
    st.integers(),
)
items = st.lists(st.tuples(text_any, behaviours, trace_ids), min_size=1, max_size=4)


@pytest.fixture
def debug_log() -> Iterator[io.StringIO]:
    sink = io.StringIO()
    handler = logging.StreamHandler(sink)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s %(trace_id)s"))
    core = logging.getLogger("penguiflow.core")
    old = core.level
    core.addHandler(handler)
    core.setLevel(logging.DEBUG)
    yield sink
    core.removeHandler(handler)
    core.setLevel(old)


async def _run_batch(batch: list[tuple[str, Any, Any]]) -> None:
    behaviour_of: dict[int, Any] = {}

    async def node(m: Message, ctx: Any) -> Message:
        plan = behaviour_of[m.meta["i"]]
        if plan is not None:
            arg, how = plan
            raise Hostile(deep_dict(3_000) if arg == DEEP else arg, how, m.meta["i"])
        return m

    seen: list[Any] = []

    async def middleware(event: Any) -> None:
        seen.append(event.to_payload())
        event.tag_values()

    worker = Node(
        node, name="hostile", policy=NodePolicy(validate="none", max_retries=1, backoff_base=0.0)
    )
    flow = create(
        worker.to(),
        emit_errors_to_rookery=True,
        state_store=InMemoryStateStore(),
        middlewares=[middleware],
    )
    flow.run()
    try:
        expected: dict[int, Any] = {}
        for i, (payload, plan, trace_id) in enumerate(batch):
            behaviour_of[i] = plan
            m = msg(payload, meta={"i": i})
            if trace_id is not None:
                m = Message.model_construct(
                    payload=payload,
                    headers=m.headers,
                    trace_id=trace_id,
                    ts=m.ts,
                    deadline_s=None,
                    meta={"i": i},
                )
            try:
                # An id that is not a str counts by its text (2.1 took any id).
                tid = m.trace_id
                check_trace_id(tid if isinstance(tid, str) else str(tid))
                valid = True
            except ValueError:
                valid = False
            if valid:
                await flow.emit(m)
                expected[i] = plan
            else:
                with pytest.raises(ValueError, match="invalid trace_id"):
                    await flow.emit(m)
        for _ in range(len(expected)):
            out = await asyncio.wait_for(flow.fetch(), HANG_GUARD)
            if isinstance(out, FlowError):
                exc = out.unwrap()
                assert isinstance(exc, Hostile)
                assert expected.pop(exc.index) is not None
                str(out)
                out.to_payload()
                assert len(out.message) < SAFE_TEXT_LIMIT + 100
                out.message.encode("utf-8")
            else:
                assert isinstance(out, Message)
                assert expected.pop(out.meta["i"]) is None
        assert expected == {}
        assert alive(flow)
        assert "worker_error" not in flow.observer_failures
    finally:
        await asyncio.wait_for(flow.stop(), HANG_GUARD)


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=items)
def test_hostile_inputs_never_kill_a_worker(
    debug_log: io.StringIO, batch: list[tuple[str, Any, Any]]
) -> None:
    asyncio.run(_run_batch(batch))
