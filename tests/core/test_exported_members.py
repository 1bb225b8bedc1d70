"""The public surface (§0, §1) is a tested decision."""

from __future__ import annotations

import importlib
import types

import pytest

import penguiflow

EXPECTED_ALL = [
    "__version__",
    "Context",
    "CycleError",
    "PenguiFlow",
    "DEFAULT_QUEUE_MAXSIZE",
    "Node",
    "NodePolicy",
    "ModelRegistry",
    "Middleware",
    "FlowEvent",
    "FlowError",
    "FlowErrorCode",
    "MessageBus",
    "BusEnvelope",
    "call_playbook",
    "Headers",
    "Message",
    "StreamChunk",
    "PlanStep",
    "Thought",
    "WM",
    "FinalAnswer",
    "map_concurrent",
    "join_k",
    "predicate_router",
    "union_router",
    "DictRoutingPolicy",
    "RoutingPolicy",
    "RoutingRequest",
    "format_sse_event",
    "chunk_to_ws_json",
    "stream_flow",
    "emit_stream_events",
    "flow_to_mermaid",
    "flow_to_dot",
    "create",
    "testkit",
    "StateStore",
    "StoredEvent",
    "RemoteBinding",
    "RemoteTransport",
    "RemoteCallRequest",
    "RemoteCallResult",
    "RemoteStreamEvent",
    "RemoteNode",
]

MODULE_NAMES = {
    "penguiflow.core": [
        "create",
        "PenguiFlow",
        "CycleError",
        "Context",
        "Floe",
        "call_playbook",
        "DEFAULT_QUEUE_MAXSIZE",
        "TraceCancelled",
        "Endpoint",
        "OPEN_SEA",
        "ROOKERY",
    ],
    "penguiflow.node": ["Node", "NodePolicy"],
    "penguiflow.types": [
        "Headers",
        "Message",
        "StreamChunk",
        "PlanStep",
        "Thought",
        "WM",
        "FinalAnswer",
    ],
    "penguiflow.metrics": ["FlowEvent"],
    "penguiflow.registry": ["ModelRegistry"],
    "penguiflow.patterns": ["join_k", "map_concurrent", "predicate_router", "union_router"],
    "penguiflow.errors": ["FlowError", "FlowErrorCode"],
    "penguiflow.state": ["RemoteBinding", "StateStore", "StoredEvent"],
    "penguiflow.bus": ["BusEnvelope", "MessageBus"],
    "penguiflow.remote": [
        "RemoteCallRequest",
        "RemoteCallResult",
        "RemoteStreamEvent",
        "RemoteTransport",
        "RemoteNode",
    ],
    "penguiflow.viz": ["flow_to_dot", "flow_to_mermaid"],
    "penguiflow.admin": ["load_state_store", "main", "render_events"],
    "penguiflow.middlewares": ["Middleware", "FlowEvent"],
    "penguiflow.policies": [
        "DictRoutingPolicy",
        "RoutingPolicy",
        "RoutingRequest",
        "PolicyCallable",
        "PolicyLike",
        "RoutingDecisionType",
        "evaluate_policy",
    ],
    "penguiflow.streaming": [
        "format_sse_event",
        "chunk_to_ws_json",
        "stream_flow",
        "emit_stream_events",
    ],
    "penguiflow.testkit": ["run_one", "assert_node_sequence", "simulate_error"],
    "penguiflow_a2a": [
        "A2AAgentCard",
        "A2ASkill",
        "A2AMessagePayload",
        "A2ATaskCancelRequest",
        "A2AServerAdapter",
        "create_a2a_app",
    ],
    "penguiflow_a2a.server": [
        "A2AAgentCard",
        "A2ASkill",
        "A2AMessagePayload",
        "A2ATaskCancelRequest",
        "A2AServerAdapter",
        "create_a2a_app",
        "A2ARequestError",
    ],
}


def test_version() -> None:
    assert penguiflow.__version__ == "2.1.0"


def test_root_all_is_exactly_the_contract() -> None:
    assert list(penguiflow.__all__) == EXPECTED_ALL


def test_every_root_name_is_importable() -> None:
    for name in EXPECTED_ALL:
        assert hasattr(penguiflow, name), name


def test_testkit_is_the_submodule() -> None:
    assert isinstance(penguiflow.testkit, types.ModuleType)
    assert penguiflow.testkit is importlib.import_module("penguiflow.testkit")


def test_core_all() -> None:
    core = importlib.import_module("penguiflow.core")
    assert list(core.__all__) == [
        "Context",
        "Floe",
        "PenguiFlow",
        "CycleError",
        "call_playbook",
        "create",
        "DEFAULT_QUEUE_MAXSIZE",
    ]


def _param(module_name: str, *values: object) -> object:
    return pytest.param(module_name, *values, id=module_name)


@pytest.mark.parametrize("module_name", [_param(m) for m in sorted(MODULE_NAMES)])
def test_module_exposes_its_names(module_name: str) -> None:
    module = importlib.import_module(module_name)
    missing = [name for name in MODULE_NAMES[module_name] if not hasattr(module, name)]
    assert missing == []


@pytest.mark.parametrize(
    ("module_name", "expected_all"),
    [
        ("penguiflow.testkit", ["run_one", "assert_node_sequence", "simulate_error"]),
        ("penguiflow.admin", ["load_state_store", "render_events", "main"]),
        _param(
            "penguiflow_a2a",
            [
                "A2AAgentCard",
                "A2ASkill",
                "A2AMessagePayload",
                "A2ATaskCancelRequest",
                "A2AServerAdapter",
                "create_a2a_app",
            ],
        ),
    ],
)
def test_submodule_all(module_name: str, expected_all: list[str]) -> None:
    module = importlib.import_module(module_name)
    assert list(module.__all__) == expected_all


def test_root_names_are_the_submodule_objects() -> None:
    from penguiflow import bus, core, errors, metrics, node, registry, state
    from penguiflow import types as pf_types

    assert penguiflow.create is core.create
    assert penguiflow.PenguiFlow is core.PenguiFlow
    assert penguiflow.Context is core.Context
    assert penguiflow.CycleError is core.CycleError
    assert penguiflow.call_playbook is core.call_playbook
    assert penguiflow.DEFAULT_QUEUE_MAXSIZE == core.DEFAULT_QUEUE_MAXSIZE
    assert penguiflow.Node is node.Node
    assert penguiflow.Message is pf_types.Message
    assert penguiflow.FlowEvent is metrics.FlowEvent
    assert penguiflow.FlowError is errors.FlowError
    assert penguiflow.ModelRegistry is registry.ModelRegistry
    assert penguiflow.StateStore is state.StateStore
    assert penguiflow.MessageBus is bus.MessageBus


def test_a2a_request_error_is_not_exported() -> None:
    server = importlib.import_module("penguiflow_a2a.server")
    assert "A2ARequestError" not in getattr(server, "__all__", [])
    assert "A2ARequestError" not in importlib.import_module("penguiflow_a2a").__all__


def test_the_a2a_client_is_an_addition_outside_the_21_all() -> None:
    import penguiflow_a2a
    from penguiflow_a2a import client, errors

    assert penguiflow_a2a.A2AClientTransport is client.A2AClientTransport
    assert penguiflow_a2a.A2ATaskFailed is errors.A2ATaskFailed
    assert "A2AClientTransport" not in penguiflow_a2a.__all__
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        _ = penguiflow_a2a.Nope
