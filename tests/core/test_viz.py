"""Visualisation (spec §18): flow_to_mermaid and flow_to_dot."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from penguiflow.core import OPEN_SEA, ROOKERY, Endpoint, Floe, create
from penguiflow.node import Node
from penguiflow.viz import flow_to_dot, flow_to_mermaid


async def _noop(message: Any, ctx: Any) -> None:
    return None


def _node(name: str | None, *, allow_cycle: bool = False) -> Node:
    node = Node(_noop, name=name or "x", allow_cycle=allow_cycle)
    node.name = name
    return node


def _flow(*edges: tuple[Any, Any]) -> Any:
    """A stand-in flow exposing ``floes`` in a known order (a real flow's is unspecified)."""
    return SimpleNamespace(floes=tuple(Floe(src, dst, maxsize=1) for src, dst in edges))


def _loop_flow() -> Any:
    a, b = _node("a"), _node("b", allow_cycle=True)
    return _flow((OPEN_SEA, a), (a, b), (b, b), (b, ROOKERY))


def test_mermaid_exact_output() -> None:
    assert flow_to_mermaid(_loop_flow()) == "\n".join(
        [
            "graph TD",
            '    OpenSea["OpenSea"]',
            '    a["a"]',
            '    b["b"]',
            '    Rookery["Rookery"]',
            "    classDef controller_loop fill:#fef3c7,stroke:#b45309,stroke-width:1px",
            "    classDef endpoint fill:#e0f2fe,stroke:#0369a1,stroke-width:1px",
            "    class OpenSea endpoint",
            "    class b controller_loop",
            "    class Rookery endpoint",
            "    OpenSea -->|ingress| a",
            "    a --> b",
            "    b -->|loop| b",
            "    b -->|egress| Rookery",
        ]
    )


def test_dot_exact_output() -> None:
    assert flow_to_dot(_loop_flow(), rankdir="LR") == "\n".join(
        [
            "digraph PenguiFlow {",
            "    rankdir=LR",
            "    node [shape=box, style=rounded]",
            '    OpenSea [label="OpenSea", shape=oval, style="filled", fillcolor="#e0f2fe"]',
            '    a [label="a"]',
            '    b [label="b", style="rounded,filled", fillcolor="#fef3c7"]',
            '    Rookery [label="Rookery", shape=oval, style="filled", fillcolor="#e0f2fe"]',
            '    OpenSea -> a [label="ingress"]',
            "    a -> b",
            '    b -> b [label="loop"]',
            '    b -> Rookery [label="egress"]',
            "}",
        ]
    )


def test_defaults_direction_and_rankdir() -> None:
    flow = _loop_flow()
    assert flow_to_mermaid(flow).startswith("graph TD\n")
    assert flow_to_mermaid(flow, direction="LR").startswith("graph LR\n")
    assert "\n    rankdir=TB\n" in flow_to_dot(flow)
    assert not flow_to_mermaid(flow).endswith("\n")
    assert flow_to_dot(flow).endswith("\n}")


def test_self_edge_marks_controller_loop_without_allow_cycle() -> None:
    node = _node("ctl")
    text = flow_to_mermaid(_flow((node, node)))
    assert "    class ctl controller_loop" in text
    assert "    ctl -->|loop| ctl" in text
    assert "classDef endpoint" not in text


def test_allow_cycle_marks_controller_loop_without_self_edge() -> None:
    node = _node("ctl", allow_cycle=True)
    dot = flow_to_dot(_flow((OPEN_SEA, node)))
    assert '    ctl [label="ctl", style="rounded,filled", fillcolor="#fef3c7"]' in dot


def test_only_classes_in_use_are_defined() -> None:
    a, b = _node("a"), _node("b")
    text = flow_to_mermaid(_flow((a, b)))
    assert text == "\n".join(["graph TD", '    a["a"]', '    b["b"]', "    a --> b"])


def test_identifiers_are_sanitised_and_deduplicated() -> None:
    first, second, third = _node("dup"), _node("dup"), _node("dup_2")
    spaced, quoted = _node("my node-1"), _node('say "hi"')
    flow = _flow((first, second), (second, third), (spaced, quoted))
    text = flow_to_mermaid(flow)
    assert '    dup["dup"]' in text
    assert '    dup_2["dup"]' in text
    assert '    dup_2_2["dup_2"]' in text
    assert "    dup --> dup_2" in text
    assert "    dup_2 --> dup_2_2" in text
    assert '    my_node_1["my node-1"]' in text
    assert '    say__hi_["say \\"hi\\""]' in text

    dot = flow_to_dot(flow)
    assert '    say__hi_ [label="say \\"hi\\""]' in dot
    assert "    my_node_1 -> say__hi_" in dot


def test_nameless_nodes_use_node_id_and_empty_ids_become_node() -> None:
    nameless = _node(None)
    odd = Endpoint("")
    text = flow_to_mermaid(_flow((odd, nameless)))
    assert f'    {nameless.node_id}["{nameless.node_id}"]' in text
    assert '    node[""]' in text
    assert f"    node -->|ingress| {nameless.node_id}" in text


def test_empty_flow() -> None:
    flow = create()
    assert flow_to_mermaid(flow) == "graph TD"
    assert flow_to_dot(flow) == (
        "digraph PenguiFlow {\n    rankdir=TB\n    node [shape=box, style=rounded]\n}"
    )


def test_real_flow_has_every_floe() -> None:
    a, b, c = _node("a"), _node("b"), _node("c")
    flow = create(a.to(b, c), b.to(), c.to())
    lines = set(flow_to_mermaid(flow).splitlines())
    assert {
        "    OpenSea -->|ingress| a",
        "    a --> b",
        "    a --> c",
        "    b -->|egress| Rookery",
        "    c -->|egress| Rookery",
        "    class OpenSea endpoint",
        "    class Rookery endpoint",
    } <= lines
    assert sum(" --> " in line or " -->|" in line for line in lines) == 5

    dot_lines = set(flow_to_dot(flow).splitlines())
    assert '    OpenSea -> a [label="ingress"]' in dot_lines
    assert '    b -> Rookery [label="egress"]' in dot_lines
    assert "    a -> c" in dot_lines


def test_real_controller_loop() -> None:
    controller = _node("controller", allow_cycle=True)
    flow = create(controller.to(controller))
    lines = set(flow_to_mermaid(flow).splitlines())
    assert {
        "    controller -->|loop| controller",
        "    OpenSea -->|ingress| controller",
        "    controller -->|egress| Rookery",
        "    class controller controller_loop",
    } <= lines
    dot = flow_to_dot(flow)
    assert '    controller -> controller [label="loop"]' in dot
