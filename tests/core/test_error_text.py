"""What a failed node leaves in its events: capped exception text and a traceback.

A node that raises an exception with a 1 MB message must not put 1 MB into each
of its events (a store row per attempt, a log record, the FlowError): the text
is capped at ``error_text_max`` characters (default 8192) and the cut is said.
The formatted traceback is stored beside it, under ``traceback``, capped the
same way, on ``node_error``, ``node_timeout`` and ``node_failed``.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pfcore_support import Recorder, msg, within

import penguiflow._worker as worker_module
from penguiflow import FlowError, Message, Node, NodePolicy, PenguiFlow, create
from penguiflow.errors import InvalidArgument, InvalidArgumentType, safe_traceback
from penguiflow.state import InMemoryStateStore

MB = 1_000_000
CUT = re.compile(r"… \[cut: ([\d,]+) more characters\]$")


class StrRaises(ValueError):
    def __repr__(self) -> str:
        raise RuntimeError("no repr")

    def __str__(self) -> str:
        raise RuntimeError("no str")


class NotesRaise(ValueError):
    @property
    def __notes__(self) -> Any:  # traceback formatting reads this and fails
        raise RuntimeError("no notes")


def cut_of(text: str) -> int:
    """The number of characters the cut marker says were left out."""
    found = CUT.search(text)
    assert found is not None, text[-200:]
    return int(found.group(1).replace(",", ""))


@pytest.fixture
async def flows() -> AsyncIterator[list[PenguiFlow]]:
    started: list[PenguiFlow] = []
    yield started
    for flow in started:
        await within(flow.stop())


async def fail_once(exc: BaseException, flows: list[PenguiFlow], **options: Any,
                    ) -> tuple[Any, list[Any]]:
    """Run one message through a node raising ``exc``; return (FlowError, stored events)."""

    async def explode(m: Message, ctx: Any) -> Message:
        raise exc

    store = InMemoryStateStore()
    node = Node(explode, name="explode", policy=NodePolicy(validate="none"))
    flow = create(node.to(), emit_errors_to_rookery=True, state_store=store, **options)
    flow.run()
    flows.append(flow)
    m = msg("x")
    await flow.emit(m)
    err = await within(flow.fetch())
    return err, list(await flow.load_history(m.trace_id))


def of(kind: str, history: list[Any]) -> Any:
    found = [e for e in history if e.kind == kind]
    assert len(found) == 1, [e.kind for e in history]
    return found[0]


# ------------------------------------------------------------------ the cap


async def test_a_1mb_exception_message_is_stored_capped_with_the_cut_said(
        flows: list[PenguiFlow]) -> None:
    err, history = await fail_once(ValueError("y" * MB), flows)

    error, failed = of("node_error", history), of("node_failed", history)
    for event in (error, failed):
        shown = event.payload["exception"]
        # repr: "ValueError('" + 1 MB of y + "')" -> the first 8192 characters kept.
        assert shown.startswith("ValueError('yyy")
        assert len(shown) < 8192 + 40
        assert cut_of(shown) == len("ValueError('')") + MB - 8192
    assert failed.payload["flow_error"]["message"].startswith("Node 'explode' raised ValueError: y")
    assert cut_of(failed.payload["flow_error"]["message"]) == MB - 8192
    # The FlowError delivered to Rookery carries the same capped text, and its
    # original exception is untouched.
    assert isinstance(err, FlowError) and len(err.message) < 8192 + 80
    assert err.metadata["exception_repr"] == failed.payload["exception"]
    assert len(str(err.unwrap())) == MB


async def test_the_traceback_is_stored_and_capped(flows: list[PenguiFlow]) -> None:
    _, history = await fail_once(ValueError("y" * MB), flows)

    for kind in ("node_error", "node_failed"):
        text = of(kind, history).payload["traceback"]
        assert text.startswith("Traceback (most recent call last):\n")
        assert "in explode\n    raise exc" in text  # the user's frame and its source line
        assert "ValueError: yyy" in text
        assert len(text) < 8192 + 40
        assert cut_of(text) > MB - 8192
    # node_retry repeats node_error's exception text only; it has no traceback.
    assert all("traceback" not in e.payload for e in history if e.kind == "node_retry")


async def test_error_text_max_sets_the_cap(flows: list[PenguiFlow]) -> None:
    err, history = await fail_once(ValueError("z" * 5000), flows, error_text_max=100)

    failed = of("node_failed", history)
    assert failed.payload["exception"] == "ValueError('" + "z" * 88 + (
        f"… [cut: {5000 + 2 - 88:,} more characters]")
    assert len(failed.payload["traceback"]) < 100 + 40
    # The exception's text inside the FlowError's message is capped the same way.
    assert err.message.startswith("Node 'explode' raised ValueError: " + "z" * 100 + "… [cut")
    assert cut_of(err.message) == 4900


async def test_short_texts_are_stored_whole(flows: list[PenguiFlow]) -> None:
    _, history = await fail_once(KeyError("missing"), flows)

    failed = of("node_failed", history)
    assert failed.payload["exception"] == "KeyError('missing')"
    assert failed.payload["traceback"].endswith("KeyError: 'missing'\n")
    assert CUT.search(failed.payload["traceback"]) is None


async def test_a_timeout_has_its_traceback(flows: list[PenguiFlow]) -> None:
    async def hang(m: Message, ctx: Any) -> Message:
        await asyncio.Event().wait()
        return m

    store = InMemoryStateStore()
    node = Node(hang, name="hang", policy=NodePolicy(validate="none", timeout_s=0.01))
    flow = create(node.to(), emit_errors_to_rookery=True, state_store=store)
    flow.run()
    flows.append(flow)
    m = msg("x")
    await flow.emit(m)
    assert isinstance(await within(flow.fetch()), FlowError)
    history = list(await flow.load_history(m.trace_id))
    timeout = of("node_timeout", history).payload["traceback"]
    assert "TimeoutError" in timeout and "CancelledError" in timeout  # asyncio.timeout's chain
    assert of("node_failed", history).payload["traceback"] == timeout


# ------------------------------------------------------ hostile exceptions


async def test_an_exception_whose_str_raises_still_has_a_placeholder_and_a_traceback(
        flows: list[PenguiFlow]) -> None:
    err, history = await fail_once(StrRaises(), flows)

    failed = of("node_failed", history)
    assert failed.payload["exception"] == "<unprintable StrRaises: repr raised RuntimeError>"
    text = failed.payload["traceback"]
    assert text.startswith("Traceback (most recent call last):\n")
    assert "in explode" in text
    assert text.endswith("StrRaises: <exception str() failed>\n")
    assert err.message == "Node 'explode' raised StrRaises: <unprintable StrRaises: str raised " \
        "RuntimeError>"


async def test_a_traceback_that_cannot_be_formatted_is_a_placeholder(
        flows: list[PenguiFlow]) -> None:
    err, history = await fail_once(NotesRaise("boom"), flows)

    failed = of("node_failed", history)
    assert failed.payload["traceback"] == (
        "<traceback unavailable: NotesRaise, formatting raised RuntimeError>")
    assert failed.payload["exception"] == "NotesRaise('boom')"
    assert isinstance(err, FlowError)


def test_safe_traceback_never_raises() -> None:
    assert safe_traceback(NotesRaise()) == (
        "<traceback unavailable: NotesRaise, formatting raised RuntimeError>")
    # Never raised: no frames, the exception line only.
    assert safe_traceback(ValueError("x")) == "ValueError: x\n"
    assert safe_traceback(ValueError("\ud800\x00")) == "ValueError: \\ud800\\x00\n"


# ------------------------------------------------------------ the option


@pytest.mark.parametrize("bad", ["8192", 8192.0, None, True])
def test_error_text_max_of_the_wrong_type_is_refused(bad: Any) -> None:
    with pytest.raises(InvalidArgumentType, match=r"^error_text_max must be an int, .*got "):
        create(error_text_max=bad)
    with pytest.raises(TypeError, match="error_text_max must be an int"):
        PenguiFlow(error_text_max=bad)


@pytest.mark.parametrize("bad", [0, -1])
def test_error_text_max_below_one_is_refused(bad: int) -> None:
    with pytest.raises(InvalidArgument, match=rf"^error_text_max must be >= 1 .*got {bad}$"):
        create(error_text_max=bad)
    with pytest.raises(ValueError, match="error_text_max must be >= 1"):
        PenguiFlow(error_text_max=bad)


def test_error_text_max_is_keyword_only() -> None:
    assert create(error_text_max=1) is not None
    with pytest.raises(TypeError):
        PenguiFlow(*(), 64, False, None, False, None, None, "n", None, None, 10)  # type: ignore[misc]


# -------------------------------------------- the hot path never formats


async def test_the_traceback_is_formatted_on_failure_only(
        flows: list[PenguiFlow], monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[BaseException] = []
    real = worker_module.safe_traceback

    def counting(exc: BaseException, limit: int = 8192) -> str:
        calls.append(exc)
        return real(exc, limit)

    monkeypatch.setattr(worker_module, "safe_traceback", counting)

    async def node_fn(m: Message, ctx: Any) -> Message:
        if m.payload == "fail":
            raise ValueError("fail")
        return m

    recorder = Recorder()
    node = Node(node_fn, name="n", policy=NodePolicy(validate="none"))
    flow = create(node.to(), emit_errors_to_rookery=True, middlewares=[recorder])
    flow.run()
    flows.append(flow)
    for _ in range(50):
        await flow.emit(msg("ok"))
        await within(flow.fetch())
    assert calls == []  # 50 successes, observed by a middleware: never formatted
    await flow.emit(msg("fail"))
    await within(flow.fetch())
    assert [type(e) for e in calls] == [ValueError]  # once per failed attempt
    assert recorder.of("node_failed")[0].extra["traceback"].endswith("ValueError: fail\n")


async def test_an_unobserved_failure_formats_no_traceback(
        flows: list[PenguiFlow], monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[BaseException] = []
    monkeypatch.setattr(worker_module, "safe_traceback",
                        lambda exc, limit=8192: calls.append(exc) or "")
    # No store, no middleware, and the runtime's logger below ERROR: nobody sees it.
    monkeypatch.setattr(logging.getLogger("penguiflow.core"), "disabled", True)

    async def explode(m: Message, ctx: Any) -> Message:
        raise ValueError("x")

    node = Node(explode, name="explode", policy=NodePolicy(validate="none"))
    flow = create(node.to(), emit_errors_to_rookery=True)
    flow.run()
    flows.append(flow)
    await flow.emit(msg("x"))
    assert isinstance(await within(flow.fetch()), FlowError)
    assert calls == []


# ------------------------------------------ an error that reaches no one


async def test_a_failure_nobody_receives_logs_one_warning_naming_the_fix(
        flows: list[PenguiFlow], caplog: pytest.LogCaptureFixture) -> None:
    recorder = Recorder()

    async def explode(m: Message, ctx: Any) -> Message:
        raise ValueError("x")

    node = Node(explode, name="explode",
                policy=NodePolicy(validate="none", max_retries=1, backoff_base=0.0))
    flow = create(node.to(), middlewares=[recorder])
    flow.run()
    flows.append(flow)
    m = msg("x")
    with caplog.at_level(logging.WARNING, logger="penguiflow.core"):
        await flow.emit(m)
        await recorder.wait_for("node_failed")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    assert m.trace_id in text and "'explode'" in text
    assert "emit_errors_to_rookery=True" in text


async def test_no_warning_when_the_error_goes_to_rookery(
        flows: list[PenguiFlow], caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="penguiflow.core"):
        await fail_once(ValueError("x"), flows)
    assert [r for r in caplog.records if r.levelno == logging.WARNING] == []
