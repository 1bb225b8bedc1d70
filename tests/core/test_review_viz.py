"""Visualisation (spec §18): review regressions for identifiers DOT / Mermaid reject."""

from __future__ import annotations

import itertools
from types import SimpleNamespace
from typing import Any

import pytest

from penguiflow.core import OPEN_SEA, ROOKERY, Floe
from penguiflow.node import Node, NodePolicy
from penguiflow.viz import flow_to_dot, flow_to_mermaid


async def _noop(message: Any, ctx: Any) -> None:
    return None


def _node(name: Any) -> Node:
    return Node(_noop, name=name, policy=NodePolicy(validate="none"))


def _flow(*edges: tuple[Any, Any]) -> Any:
    """A stand-in flow exposing ``floes`` in a known order."""
    return SimpleNamespace(floes=tuple(Floe(src, dst, maxsize=1) for src, dst in edges))


def _chain(*names: Any) -> Any:
    nodes = [_node(name) for name in names]
    edges = [(OPEN_SEA, nodes[0]), *itertools.pairwise(nodes), (nodes[-1], ROOKERY)]
    return _flow(*edges)


@pytest.mark.parametrize("name", ["node", "edge", "graph", "digraph", "subgraph", "strict"])
def test_dot_quotes_a_keyword_identifier(name: str) -> None:
    # Bare, `node -> x` is a syntax error (`node` starts a default-attribute statement).
    for spelling in (name, name.upper(), name.capitalize()):
        dot = flow_to_dot(_chain(spelling, "x"))
        assert f'    "{spelling}" [label="{spelling}"]' in dot.splitlines()
        assert f'    OpenSea -> "{spelling}" [label="ingress"]' in dot.splitlines()
        assert f'    "{spelling}" -> x' in dot.splitlines()
        # The attribute statement and other identifiers stay as the spec writes them.
        assert "    node [shape=box, style=rounded]" in dot.splitlines()
        assert '    x -> Rookery [label="egress"]' in dot.splitlines()


def test_dot_quotes_an_identifier_starting_with_a_digit() -> None:
    dot = flow_to_dot(_chain("1st step", "step2"))
    assert dot.splitlines()[3:] == [
        '    OpenSea [label="OpenSea", shape=oval, style="filled", fillcolor="#e0f2fe"]',
        '    "1st_step" [label="1st step"]',
        '    step2 [label="step2"]',
        '    Rookery [label="Rookery", shape=oval, style="filled", fillcolor="#e0f2fe"]',
        '    OpenSea -> "1st_step" [label="ingress"]',
        '    "1st_step" -> step2',
        '    step2 -> Rookery [label="egress"]',
        "}",
    ]


@pytest.mark.parametrize("name", ["end", "End", "END"])
def test_mermaid_suffixes_an_end_identifier(name: str) -> None:
    # `end` closes a subgraph: as a node id it breaks the whole flowchart.
    assert flow_to_mermaid(_chain(name, "end_2")).splitlines() == [
        "graph TD",
        '    OpenSea["OpenSea"]',
        f'    {name}_3["{name}"]',
        '    end_2["end_2"]',
        '    Rookery["Rookery"]',
        "    classDef endpoint fill:#e0f2fe,stroke:#0369a1,stroke-width:1px",
        "    class OpenSea endpoint",
        "    class Rookery endpoint",
        f"    OpenSea -->|ingress| {name}_3",
        f"    {name}_3 --> end_2",
        "    end_2 -->|egress| Rookery",
    ]


def test_mermaid_end_only_changes_in_mermaid() -> None:
    mermaid = flow_to_mermaid(_chain("end"))
    assert '    end_2["end"]' in mermaid.splitlines()
    assert "    OpenSea -->|ingress| end_2" in mermaid.splitlines()
    assert '    end [label="end"]' in flow_to_dot(_chain("end")).splitlines()


def test_ordinary_identifiers_are_unchanged() -> None:
    assert flow_to_dot(_chain("nodes", "ending")).splitlines()[4:6] == [
        '    nodes [label="nodes"]',
        '    ending [label="ending"]',
    ]
    assert flow_to_mermaid(_chain("nodes", "ending")).splitlines()[2:4] == [
        '    nodes["nodes"]',
        '    ending["ending"]',
    ]


@pytest.mark.parametrize(
    ("name", "label", "ident"), [(123, "123", '"123"'), (b"x", "b'x'", "b_x_")]
)
def test_a_node_name_that_is_not_a_str_is_labelled_by_its_text(
    name: Any, label: str, ident: str
) -> None:
    # 2.1 raised "TypeError: expected string or bytes-like object, got 'int'".
    flow = _chain(name)
    assert f'    {ident} [label="{_dot(label)}"]' in flow_to_dot(flow).splitlines()
    mermaid_ident = ident.strip('"')
    assert f'    {mermaid_ident}["{label}"]' in flow_to_mermaid(flow).splitlines()


def _dot(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def test_a_line_break_in_a_name_stays_inside_its_label() -> None:
    # A raw line break in a label ended the Mermaid line (the diagram no longer
    # parsed) and put a raw newline in a DOT string; a tab was kept as is.
    flow = _chain("two\nlines", "cr\r\nlf", "tab\there")
    mermaid = flow_to_mermaid(flow)
    assert '["two<br/>lines"]' in mermaid and '["cr<br/>lf"]' in mermaid
    assert '["tab here"]' in mermaid
    assert all(line.startswith(("graph ", "    ")) for line in mermaid.split("\n"))
    dot = flow_to_dot(flow)
    assert 'label="two\\nlines"' in dot and 'label="tab here"' in dot
    assert all(line.startswith(("digraph ", "    ", "}")) for line in dot.split("\n"))
    # Names without controls are written exactly as the spec says: quotes escaped,
    # an emoji's zero-width joiner, a no-break space and an ideographic space kept.
    assert '["plain \\"q\\""]' in flow_to_mermaid(_chain('plain "q"'))
    family = "\U0001F468\u200d\U0001F469 a\u00a0b\u3000c"
    assert f'["{family}"]' in flow_to_mermaid(_chain(family))
    assert f'label="{family}"' in flow_to_dot(_chain(family))
