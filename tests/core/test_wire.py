"""penguiflow.wire: what crosses a process boundary, and what it refuses."""

from __future__ import annotations

import contextlib
import json
import math
import threading
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from penguiflow import WM, FinalAnswer, Headers, Message, StreamChunk
from penguiflow.errors import FlowError, WireDecodingError, WireEncodingError
from penguiflow.wire import WireTypes, dumps_item, loads_item, type_tag


class Quote(BaseModel):
    symbol: str
    price: float


def roundtrip(item: Any, types: WireTypes | None = None) -> Any:
    return loads_item(dumps_item(item, edge="a->b"), types or WireTypes([Quote]))


def test_a_message_comes_back_equal_with_its_model_payload() -> None:
    msg = Message(payload=Quote(symbol="PF", price=1.5), headers=Headers(tenant="t", topic="x"),
                  deadline_s=123.0, meta={"k": [1, {"n": None}]})
    back = roundtrip(msg)
    assert back == msg and type(back.payload) is Quote


@pytest.mark.parametrize("item", [
    WM(query="q", facts=["a"], hops=2), FinalAnswer(text="t", citations=["c"]),
    StreamChunk(stream_id="s", seq=3, text="x", done=True), {"a": [1, 2.5, None, True]},
    "text", 7, None,
])
def test_penguiflow_models_and_json_data_round_trip(item: Any) -> None:
    back = roundtrip(item)
    assert back == item and type(back) is type(item)


def test_a_model_the_receiver_does_not_know_arrives_as_its_data() -> None:
    assert roundtrip(Quote(symbol="A", price=2.0), WireTypes()) == {"symbol": "A", "price": 2.0}


def test_a_flow_error_crosses_without_its_exception_object() -> None:
    error = FlowError.from_exception(trace_id="t", node_name="n", node_id="id",
                                     exc=KeyError("k"), code="NODE_EXCEPTION",
                                     metadata={"attempt": 2})
    back = roundtrip(error)
    assert back.to_payload() == error.to_payload() and back.unwrap() is None
    assert back.exception_type == "KeyError"


def test_what_json_lacks_arrives_as_its_nearest_json_form() -> None:
    assert roundtrip({"s": {1, 2}, "t": (1, "x")}) == {"s": [1, 2], "t": [1, "x"]}
    back = roundtrip([math.nan, math.inf, -math.inf])
    assert math.isnan(back[0]) and back[1:] == [math.inf, -math.inf]


@pytest.mark.parametrize("payload", [object(), b"\xff", "\udc80", Headers])
def test_a_value_with_no_json_form_is_refused_naming_edge_and_type(payload: Any) -> None:
    with pytest.raises(WireEncodingError) as info:
        dumps_item(Message(payload=payload, headers=Headers(tenant="t")), edge="x->y")
    assert f"cannot send a {type(payload).__name__} on edge 'x->y'" in str(info.value)
    assert isinstance(info.value, TypeError)


def test_a_meta_value_with_no_json_form_is_named_not_the_payload() -> None:
    with pytest.raises(WireEncodingError) as info:
        dumps_item(Message(payload="fine", headers=Headers(tenant="t"),
                           meta={"ok": 1, "lock": threading.Lock()}), edge="x->y")
    assert "cannot send a lock on edge 'x->y' (in the Message's 'meta')" in str(info.value)
    assert "a str" not in str(info.value)


@pytest.mark.parametrize("fields", [
    {"trace_id": ["not", "text"]}, {"node_name": {"a": 1}}, {"node_id": 3},
    {"exception_type": 1.5}, {"code": 7}, {"message": None}, {"metadata": [1]}])
def test_a_flow_error_with_fields_of_the_wrong_type_is_refused(fields: dict[str, Any]) -> None:
    e = {"trace_id": "t", "node_name": "n", "node_id": "i", "code": "C", "message": "m",
         "metadata": None, **fields}
    with pytest.raises(WireDecodingError) as info:
        loads_item(json.dumps({"e": e}).encode(), WireTypes())
    assert next(iter(fields)) in str(info.value) or "strings" in str(info.value)


def test_wire_types_must_be_models() -> None:
    with pytest.raises(WireEncodingError, match="wire types must be pydantic model classes"):
        WireTypes([dict])  # type: ignore[list-item]
    assert Quote in WireTypes([Quote]) and Quote not in WireTypes()
    assert type_tag(Quote) == f"{__name__}:Quote"


@pytest.mark.parametrize("data", [b"", b"[]", b"{}", b'{"m": 3}', b'{"t": "x"}',
                                  b'{"e": {}}', b'{"m": {}, "p": {"t": null, "v": 1}}',
                                  b'{"t": "penguiflow.types:WM", "v": {"hops": "many"}}'])
def test_bytes_that_are_no_encoded_item_are_refused(data: bytes) -> None:
    with pytest.raises(WireDecodingError) as info:
        loads_item(data, WireTypes())
    assert isinstance(info.value, ValueError)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=200, deadline=None)
@given(payload=JSON, meta=st.dictionaries(st.text(), JSON, max_size=3))
def test_any_json_payload_round_trips_or_is_refused_cleanly(payload: Any,
                                                             meta: dict[str, Any]) -> None:
    msg = Message(payload=payload, headers=Headers(tenant="t"), meta=meta)
    try:
        data = dumps_item(msg, edge="e")
    except WireEncodingError:
        return  # e.g. a lone surrogate: refused with the edge and type named
    assert loads_item(data, WireTypes()) == msg


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200))
def test_arbitrary_bytes_decode_or_are_refused_never_crash(data: bytes) -> None:
    with contextlib.suppress(WireDecodingError):
        loads_item(data, WireTypes())


def test_a_deeply_nested_payload_is_refused_not_a_crash() -> None:
    deep: Any = []
    for _ in range(10_000):
        deep = [deep]
    try:
        data = dumps_item(deep, edge="e")
    except WireEncodingError:
        return
    with pytest.raises(WireDecodingError):
        loads_item(data, WireTypes())
