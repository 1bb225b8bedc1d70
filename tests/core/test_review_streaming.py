"""Streaming helpers (spec §14): review regressions.

Frames that must be sendable (strict JSON, UTF-8 encodable) and stream_flow that only
yields its own trace's items.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import AsyncIterator
from typing import Any

import pytest

from penguiflow.core import Context, PenguiFlow, create
from penguiflow.node import Node, NodePolicy
from penguiflow.streaming import chunk_to_ws_json, format_sse_event, stream_flow
from penguiflow.types import Headers, Message, StreamChunk

TIMEOUT = 5.0


def _strict_loads(text: str) -> Any:
    """json.loads as JavaScript's JSON.parse: bare NaN / Infinity are errors."""

    def refuse(token: str) -> Any:
        raise ValueError(f"not JSON: {token}")

    return json.loads(text, parse_constant=refuse)


# --- strict JSON: non-finite floats -----------------------------------------------------


def test_sse_meta_with_nan_and_infinities_is_strict_json() -> None:
    chunk = StreamChunk(
        stream_id="s",
        seq=2,
        text="x",
        meta={"score": math.nan, "hi": math.inf, "lo": [-math.inf, 1.5], "ok": "é"},
    )
    frame = format_sse_event(chunk)
    assert frame == (
        "event: chunk\nid: 2\ndata: x\n"
        'data: {"score": null, "hi": null, "lo": [null, 1.5], "ok": "é"}\n\n'
    )
    meta_line = frame.split("\n")[3]
    assert _strict_loads(meta_line.removeprefix("data: ")) == {
        "score": None,
        "hi": None,
        "lo": [None, 1.5],
        "ok": "é",
    }


def test_ws_json_with_nan_and_infinities_is_strict_json() -> None:
    chunk = StreamChunk(stream_id="s", seq=0, text="x", meta={"score": math.nan})
    text = chunk_to_ws_json(chunk, extra={"cost": math.inf, "t": (math.nan, 2)})
    assert _strict_loads(text) == {
        "stream_id": "s",
        "seq": 0,
        "text": "x",
        "done": False,
        "meta": {"score": None},
        "cost": None,
        "t": [None, 2],
    }


def test_a_non_finite_float_key_keeps_its_json_spelling() -> None:
    # A key is written as a string ("NaN"), which is valid JSON: unchanged.
    chunk = StreamChunk(stream_id="s", seq=0, text="x", meta={"v": math.nan})
    chunk.meta[math.nan] = 1  # type: ignore[index]
    assert _strict_loads(chunk_to_ws_json(chunk))["meta"] == {"v": None, "NaN": 1}


def test_ordinary_values_render_exactly_as_json_dumps() -> None:
    meta = {"lang": "français", "n": [1, 2.5, None, True], "nested": {"emoji": "😀"}}
    chunk = StreamChunk(stream_id="s", seq=4, text="héllo", done=True, meta=meta)
    assert chunk_to_ws_json(chunk, extra={"type": "delta"}) == json.dumps(
        {"stream_id": "s", "seq": 4, "text": "héllo", "done": True, "meta": meta, "type": "delta"},
        ensure_ascii=False,
    )
    assert format_sse_event(chunk) == (
        f"event: done\nid: 4\ndata: héllo\ndata: {json.dumps(meta, ensure_ascii=False)}\n\n"
    )


# --- UTF-8: surrogate code points -------------------------------------------------------


def test_ws_json_escapes_surrogates_so_it_can_be_sent() -> None:
    chunk = StreamChunk(
        stream_id="s\ud800", seq=0, text="a\udc00b\ud83d\ude00", meta={"k": "\ud800"}
    )
    text = chunk_to_ws_json(chunk)
    text.encode("utf-8")  # raised UnicodeEncodeError: surrogates not allowed
    assert '"text": "a\\udc00b\\ud83d\\ude00"' in text
    decoded = _strict_loads(text)
    # Read back as written; the escaped pair is the one character it stands for.
    assert (decoded["stream_id"], decoded["text"], decoded["meta"]) == (
        "s\ud800",
        "a\udc00b😀",
        {"k": "\ud800"},
    )


def test_sse_frame_with_surrogates_can_be_sent() -> None:
    chunk = StreamChunk(stream_id="s", seq=0, text="a\udc00b\ud83d\ude00", meta={"k": "\ud800"})
    frame = format_sse_event(chunk, event_name="ev\ud800")
    frame.encode("utf-8")  # raised UnicodeEncodeError: surrogates not allowed
    # Text: a lone surrogate is U+FFFD, a pair the character it stands for.
    assert frame == 'event: ev\ufffd\nid: 0\ndata: a\ufffdb😀\ndata: {"k": "\\ud800"}\n\n'


# --- retry_ms ---------------------------------------------------------------------------


@pytest.mark.parametrize("retry_ms", ["1\nevent: pwn", "1500", 1.5, True, False])
def test_retry_ms_must_be_an_int(retry_ms: Any) -> None:
    chunk = StreamChunk(stream_id="s", seq=1, text="x")
    with pytest.raises(TypeError, match=r"retry_ms must be an int \(milliseconds\) or None"):
        format_sse_event(chunk, retry_ms=retry_ms)


def test_retry_ms_int_still_renders() -> None:
    chunk = StreamChunk(stream_id="s", seq=1, text="x")
    assert format_sse_event(chunk, retry_ms=0) == "event: chunk\nid: 1\ndata: x\nretry: 0\n\n"


# --- stream_flow: only the caller's trace -----------------------------------------------


def _llm_flow() -> PenguiFlow:
    async def llm(message: Message, ctx: Context) -> Message:
        for i, token in enumerate(["hel", "lo"]):
            await ctx.emit_chunk(parent=message, text=token, done=(i == 1))
        return message.model_copy(update={"payload": f"final answer for {message.payload}"})

    return create(Node(llm, name="llm", policy=NodePolicy(validate="none")).to())


def _req(payload: str) -> Message:
    return Message(payload=payload, headers=Headers(tenant="acme"))


async def _collect(stream: AsyncIterator[Any]) -> list[Any]:
    async def drain() -> list[Any]:
        return [getattr(item, "text", item) async for item in stream]

    return await asyncio.wait_for(drain(), TIMEOUT)


async def test_stream_flow_does_not_hand_a_request_another_requests_result(
    caplog: pytest.LogCaptureFixture,
) -> None:
    flow = _llm_flow()
    flow.run()
    try:
        first = await _collect(stream_flow(flow, _req("A"), timeout=TIMEOUT))
        second_msg = _req("B")
        with caplog.at_level(logging.WARNING, logger="penguiflow.streaming"):
            # A's final answer is still in Rookery (include_final=False stopped at done):
            # 2.1 returned ['final answer for A'] here.
            second = await _collect(
                stream_flow(flow, second_msg, timeout=TIMEOUT, include_final=True)
            )
    finally:
        await flow.stop()
    assert first == ["hel", "lo"]
    assert second == ["hel", "lo", "final answer for B"]
    (record,) = [r for r in caplog.records if r.name == "penguiflow.streaming"]
    assert record.levelno == logging.WARNING
    assert "skipped 1 Rookery item(s) of other traces" in record.getMessage()
    assert repr(second_msg.trace_id) in record.getMessage()


async def test_stream_flow_timeout_still_reports_the_skipped_items(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def answer_old(message: Message, ctx: Context) -> Message | None:
        if message.payload == "old":
            await ctx.emit_chunk(parent=message, text="o", done=True)
            return message  # left in Rookery: the first call stops at its done chunk
        return None

    flow = create(Node(answer_old, name="answer_old", policy=NodePolicy(validate="none")).to())
    flow.run()
    try:
        stale = _req("old")
        assert await _collect(stream_flow(flow, stale, timeout=TIMEOUT)) == ["o"]
        with (
            caplog.at_level(logging.WARNING, logger="penguiflow.streaming"),
            pytest.raises(TimeoutError),
        ):
            await _collect(stream_flow(flow, _req("new"), timeout=0.3))
    finally:
        await flow.stop()
    messages = [r.getMessage() for r in caplog.records if r.name == "penguiflow.streaming"]
    assert len(messages) == 1
    assert "skipped 1 Rookery item(s) of other traces" in messages[0]
    assert repr(stale.trace_id) in messages[0]


async def test_stream_flow_yields_a_new_message_a_node_answers_with() -> None:
    # Valid 2.1: a node answers with a new Message (a fresh trace id); a first
    # version of the leftover filter dropped it and timed out.
    async def answer(message: Message, ctx: Context) -> Message:
        return Message(payload=42, headers=message.headers)

    flow = create(Node(answer, name="answer", policy=NodePolicy(validate="none")).to())
    flow.run()
    try:
        assert await _collect(stream_flow(flow, _req("a"), timeout=TIMEOUT)) == [42]
        assert await _collect(stream_flow(flow, _req("b"), timeout=TIMEOUT)) == [42]
    finally:
        await flow.stop()
