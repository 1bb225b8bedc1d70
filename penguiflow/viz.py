"""Render a flow's graph as Mermaid or Graphviz DOT text.

Both renderers walk every floe of the flow (node->node, ingress, egress, self-loops) in
the flow's floe order. Entities are labelled by node name (``node_id`` if nameless) or
endpoint name (``OpenSea`` / ``Rookery``); identifiers are labels made safe for both
languages and de-duplicated with ``_2``, ``_3``, ... suffixes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from penguiflow.node import Node

if TYPE_CHECKING:
    from penguiflow.core import PenguiFlow

__all__ = ["flow_to_dot", "flow_to_mermaid"]

_UNSAFE = re.compile(r"[^0-9A-Za-z_]")
# DOT's keywords (matched case-insensitively by Graphviz): as a bare identifier each is
# a syntax error or, worse, a statement (``node -> edge``); quoted, it is a plain ID.
_DOT_KEYWORDS = frozenset({"node", "edge", "graph", "digraph", "subgraph", "strict"})

_MERMAID_CLASSDEFS = {
    "controller_loop": "fill:#fef3c7,stroke:#b45309,stroke-width:1px",
    "endpoint": "fill:#e0f2fe,stroke:#0369a1,stroke-width:1px",
}
_DOT_STYLES = {
    "controller_loop": 'style="rounded,filled", fillcolor="#fef3c7"',
    "endpoint": 'shape=oval, style="filled", fillcolor="#e0f2fe"',
}


@dataclass(slots=True)
class _Entity:
    ident: str
    label: str
    classes: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Graph:
    entities: list[_Entity]
    edges: list[tuple[str, str, str | None]]


def _describe(flow: PenguiFlow) -> _Graph:
    by_key: dict[object, _Entity] = {}
    used: set[str] = set()
    edges: list[tuple[str, str, str | None]] = []

    def entity(obj: object) -> _Entity:
        found = by_key.get(obj)
        if found is not None:
            return found
        if isinstance(obj, Node):
            # str(): a name that is not a str (Node(name=123)) is labelled by its text.
            label = str(obj.name or obj.node_id)
            classes = ["controller_loop"] if obj.allow_cycle else []
        else:
            label = str(getattr(obj, "name", obj))
            classes = ["endpoint"]
        base = _UNSAFE.sub("_", label) or "node"
        ident, n = base, 1
        while ident in used:
            n += 1
            ident = f"{base}_{n}"
        used.add(ident)
        found = by_key[obj] = _Entity(ident, label, classes)
        return found

    for floe in flow.floes:
        source, target = entity(floe.source), entity(floe.target)
        if floe.source is floe.target:
            label: str | None = "loop"
            if "controller_loop" not in source.classes:
                source.classes.append("controller_loop")
        elif not isinstance(floe.source, Node):
            label = "ingress"
        elif not isinstance(floe.target, Node):
            label = "egress"
        else:
            label = None
        edges.append((source.ident, target.ident, label))
    return _Graph(list(by_key.values()), edges)


def flow_to_mermaid(flow: PenguiFlow, *, direction: str = "TD") -> str:
    """Render ``flow`` as a Mermaid flowchart.

    Lines: ``graph <direction>``; ``    <id>["<label>"]`` per entity (double quotes
    backslash-escaped); a ``classDef`` per class in use, sorted by class name
    (``controller_loop``, ``endpoint``); ``    class <id> <class>`` per styled entity;
    then ``    <a> -->|<label>| <b>`` for ``loop`` / ``ingress`` / ``egress`` edges and
    ``    <a> --> <b>`` otherwise.

    Returns:
        The lines joined by ``"\\n"``, without a trailing newline.
    """
    graph = _describe(flow)
    ids = _mermaid_ids(graph)
    lines = [f"graph {direction}"]
    for ent in graph.entities:
        label = _mermaid_lines(ent.label).replace('"', '\\"')
        lines.append(f'    {ids[ent.ident]}["{label}"]')
    in_use = sorted({name for ent in graph.entities for name in ent.classes})
    lines.extend(f"    classDef {name} {_MERMAID_CLASSDEFS[name]}" for name in in_use)
    lines.extend(
        f"    class {ids[ent.ident]} {','.join(ent.classes)}"
        for ent in graph.entities
        if ent.classes
    )
    for source, target, edge_label in graph.edges:
        arrow = "-->" if edge_label is None else f"-->|{edge_label}|"
        lines.append(f"    {ids[source]} {arrow} {ids[target]}")
    return "\n".join(lines)


def _mermaid_ids(graph: _Graph) -> dict[str, str]:
    """Each identifier as Mermaid gets it: itself, except ``end`` (in any case).

    ``end`` closes a subgraph in Mermaid, so a node with that id breaks the whole
    flowchart; it gets the next free de-duplication suffix (``end_2``, ...) instead.
    """
    # Compared case-insensitively, so the new id cannot clash with another id in any case.
    used = {ent.ident.lower() for ent in graph.entities}
    ids: dict[str, str] = {}
    for ent in graph.entities:
        ident = ent.ident
        if ident.lower() == "end":
            n = 1
            while ident.lower() in used:
                n += 1
                ident = f"{ent.ident}_{n}"
            used.add(ident.lower())
        ids[ent.ident] = ident
    return ids


#: Control characters (Unicode Cc): what a label may not hold as is. Format and
#: space characters (a zero-width joiner in an emoji, U+00A0) are kept.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def _mermaid_lines(text: str) -> str:
    """``text`` with its line breaks as Mermaid's ``<br/>`` and other control
    characters as spaces: a raw line break ended the node's line, breaking the whole
    diagram (the spec is silent on them; other labels are unchanged)."""
    if not _CONTROL.search(text):
        return text
    text = text.replace("\r\n", "<br/>").replace("\n", "<br/>").replace("\r", "<br/>")
    return _CONTROL.sub(" ", text)


def _dot_quote(text: str) -> str:
    quoted = text.replace("\\", "\\\\").replace('"', '\\"')
    if not _CONTROL.search(quoted):
        return quoted
    # A line break as DOT's own \n (a centred line), other controls as spaces.
    quoted = quoted.replace("\r\n", "\\n").replace("\n", "\\n").replace("\r", "\\n")
    return _CONTROL.sub(" ", quoted)


def _dot_id(ident: str) -> str:
    """``ident`` as a DOT ID: quoted when bare it is a DOT keyword (any case) or starts
    with a digit (not a DOT ID: ``1st_step`` reads as ``1`` then ``st_step``), else as is.
    """
    if ident.lower() in _DOT_KEYWORDS or ident[:1].isdigit():
        return f'"{ident}"'
    return ident


def flow_to_dot(flow: PenguiFlow, *, rankdir: str = "TB") -> str:
    """Render ``flow`` as a Graphviz ``digraph PenguiFlow``.

    Lines: ``digraph PenguiFlow {``, ``    rankdir=<rankdir>``,
    ``    node [shape=box, style=rounded]``; ``    <id> [label="<label>"]`` per entity,
    with ``shape=oval, style="filled", fillcolor="#e0f2fe"`` appended for endpoints and
    ``style="rounded,filled", fillcolor="#fef3c7"`` for controller loops; then
    ``    <a> -> <b> [label="<label>"]`` for ``loop`` / ``ingress`` / ``egress`` edges and
    ``    <a> -> <b>`` otherwise; finally ``}``.

    Returns:
        The lines joined by ``"\\n"``, without a trailing newline.
    """
    graph = _describe(flow)
    lines = [
        "digraph PenguiFlow {",
        f"    rankdir={rankdir}",
        "    node [shape=box, style=rounded]",
    ]
    for ent in graph.entities:
        attrs = [f'label="{_dot_quote(ent.label)}"']
        attrs.extend(_DOT_STYLES[name] for name in ent.classes)
        lines.append(f"    {_dot_id(ent.ident)} [{', '.join(attrs)}]")
    for source, target, edge_label in graph.edges:
        suffix = "" if edge_label is None else f' [label="{edge_label}"]'
        lines.append(f"    {_dot_id(source)} -> {_dot_id(target)}{suffix}")
    lines.append("}")
    return "\n".join(lines)
