"""Routing policies (spec §13): RoutingRequest, evaluate_policy, DictRoutingPolicy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from penguiflow.node import Node
from penguiflow.policies import (
    DictRoutingPolicy,
    PolicyCallable,
    PolicyLike,
    RoutingDecisionType,
    RoutingPolicy,
    RoutingRequest,
    evaluate_policy,
)


async def _noop(message: Any, ctx: Any) -> None:
    return None


def _node(name: str) -> Node:
    return Node(_noop, name=name)


def _request(trace_id: str | None = "t1", **overrides: Any) -> RoutingRequest:
    fields: dict[str, Any] = {
        "message": {"payload": 1},
        "context": object(),
        "node": _node("router"),
        "proposed": (_node("a"), _node("b")),
        "trace_id": trace_id,
    }
    fields.update(overrides)
    return RoutingRequest(**fields)


def test_public_names_are_importable() -> None:
    assert RoutingDecisionType is not None
    assert PolicyCallable is not None
    assert PolicyLike is not None


def test_routing_request_fields_and_properties() -> None:
    router, a, b = _node("router"), _node("a"), _node("b")
    ctx = object()
    request = RoutingRequest(message="m", context=ctx, node=router, proposed=(a, b), trace_id="t")
    assert request.message == "m"
    assert request.context is ctx
    assert request.node is router
    assert request.proposed == (a, b)
    assert request.trace_id == "t"
    assert request.node_name == "router"
    assert request.proposed_names == ("a", "b")


def test_routing_request_names_fall_back_to_node_id() -> None:
    nameless = _node("x")
    nameless.name = None
    request = _request(node=nameless, proposed=(nameless,))
    assert request.node_name == nameless.node_id
    assert request.proposed_names == (nameless.node_id,)


def test_routing_request_has_slots() -> None:
    request = _request()
    with pytest.raises(AttributeError):
        request.unexpected = 1  # type: ignore[attr-defined]


async def test_evaluate_sync_callable() -> None:
    seen: list[RoutingRequest] = []

    def policy(request: RoutingRequest) -> str:
        seen.append(request)
        return "a"

    request = _request()
    assert await evaluate_policy(policy, request) == "a"
    assert seen == [request]


async def test_evaluate_async_callable() -> None:
    async def policy(request: RoutingRequest) -> list[str]:
        return ["a", "b"]

    assert await evaluate_policy(policy, _request()) == ["a", "b"]


async def test_evaluate_policy_object_sync_and_async_select() -> None:
    class SyncPolicy:
        def select(self, request: RoutingRequest) -> str:
            return f"sync:{request.trace_id}"

    class AsyncPolicy:
        async def select(self, request: RoutingRequest) -> None:
            return None

    assert await evaluate_policy(SyncPolicy(), _request("t9")) == "sync:t9"
    assert await evaluate_policy(AsyncPolicy(), _request()) is None
    assert isinstance(SyncPolicy(), RoutingPolicy)


async def test_evaluate_prefers_select_over_call() -> None:
    class Both:
        def __call__(self, request: RoutingRequest) -> str:
            return "call"

        def select(self, request: RoutingRequest) -> str:
            return "select"

    assert await evaluate_policy(Both(), _request()) == "select"


async def test_evaluate_rejects_non_policy() -> None:
    with pytest.raises(TypeError, match="select"):
        await evaluate_policy(42, _request())  # type: ignore[arg-type]

    class BadSelect:
        select = "not callable"

    with pytest.raises(TypeError):
        await evaluate_policy(BadSelect(), _request())  # type: ignore[arg-type]


def test_dict_policy_uses_trace_id_by_default() -> None:
    policy = DictRoutingPolicy({"t1": "a", "t2": ["a", "b"]}, default="b")
    assert isinstance(policy, RoutingPolicy)
    assert policy.select(_request("t1")) == "a"
    assert policy.select(_request("t2")) == ["a", "b"]
    assert policy.select(_request("missing")) == "b"
    assert policy.select(_request(None)) == "b"


def test_dict_policy_default_is_none() -> None:
    policy = DictRoutingPolicy({"t1": "a"})
    assert policy.select(_request("other")) is None


def test_dict_policy_key_getter_and_none_key() -> None:
    policy = DictRoutingPolicy(
        {"gold": "fast"},
        default="slow",
        key_getter=lambda request: request.message.get("tier"),
    )
    assert policy.select(_request(message={"tier": "gold"})) == "fast"
    assert policy.select(_request(message={"tier": "silver"})) == "slow"
    assert policy.select(_request(message={})) == "slow"


def test_dict_policy_copies_mapping_and_updates() -> None:
    source = {"t1": "a"}
    policy = DictRoutingPolicy(source)
    source["t1"] = "changed"
    assert policy.select(_request("t1")) == "a"

    policy.update_mapping({"t1": "b", "t2": "c"})
    assert policy.select(_request("t1")) == "b"
    assert policy.select(_request("t2")) == "c"

    policy.set_default("fallback")
    assert policy.select(_request("t3")) == "fallback"
    policy.set_default(None)
    assert policy.select(_request("t3")) is None


def test_dict_policy_may_map_to_nodes() -> None:
    a = _node("a")
    policy = DictRoutingPolicy({"t1": a})
    assert policy.select(_request("t1")) is a


def test_from_json_str_and_bytes_with_kwargs() -> None:
    payload = json.dumps({"t1": "a", "t2": ["a", "b"]})
    policy = DictRoutingPolicy.from_json(payload, default="z")
    assert policy.select(_request("t2")) == ["a", "b"]
    assert policy.select(_request("nope")) == "z"

    from_bytes = DictRoutingPolicy.from_json(payload.encode())
    assert from_bytes.select(_request("t1")) == "a"


@pytest.mark.parametrize("payload", ["[1, 2]", '"text"', "3", "null"])
def test_from_json_rejects_non_objects(payload: str) -> None:
    with pytest.raises(TypeError, match="object"):
        DictRoutingPolicy.from_json(payload)


def test_from_json_invalid_json_raises_decode_error() -> None:
    with pytest.raises(json.JSONDecodeError):
        DictRoutingPolicy.from_json("{not json")


def test_from_json_file(tmp_path: Path) -> None:
    path = tmp_path / "routes.json"
    path.write_text(json.dumps({"t1": "ünïcode"}), encoding="utf-8")
    policy = DictRoutingPolicy.from_json_file(path, default="d")
    assert policy.select(_request("t1")) == "ünïcode"
    assert policy.select(_request("t2")) == "d"
    assert DictRoutingPolicy.from_json_file(str(path)).select(_request("t1")) == "ünïcode"


def test_from_json_file_rejects_non_object(tmp_path: Path) -> None:
    path = tmp_path / "routes.json"
    path.write_text("[]", encoding="utf-8")
    with pytest.raises(TypeError):
        DictRoutingPolicy.from_json_file(path)


def test_from_json_file_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        DictRoutingPolicy.from_json_file(tmp_path / "absent.json")


def test_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PF_ROUTES", json.dumps({"t1": "a"}))
    policy = DictRoutingPolicy.from_env("PF_ROUTES", default="b")
    assert policy.select(_request("t1")) == "a"
    assert policy.select(_request("t2")) == "b"


def test_from_env_with_key_getter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PF_ROUTES", json.dumps({"x": "a"}))
    policy = DictRoutingPolicy.from_env("PF_ROUTES", key_getter=lambda request: "x")
    assert policy.select(_request(None)) == "a"


def test_from_env_unset_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PF_ROUTES_UNSET", raising=False)
    with pytest.raises(KeyError, match="PF_ROUTES_UNSET"):
        DictRoutingPolicy.from_env("PF_ROUTES_UNSET")


def test_from_env_custom_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PF_ROUTES", "t1=a;t2=b")

    def loader(text: str) -> dict[str, str]:
        return dict(pair.split("=") for pair in text.split(";"))  # type: ignore[misc]

    policy = DictRoutingPolicy.from_env("PF_ROUTES", loader=loader)
    assert policy.select(_request("t2")) == "b"


def test_from_env_rejects_non_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PF_ROUTES", "[1]")
    with pytest.raises(TypeError, match="mapping"):
        DictRoutingPolicy.from_env("PF_ROUTES")
    with pytest.raises(TypeError):
        DictRoutingPolicy.from_env("PF_ROUTES", loader=lambda text: ["a"])
