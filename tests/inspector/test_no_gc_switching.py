"""The inspector never switches Python's garbage collector (issue 14).

``gc.disable()``, ``gc.freeze()`` or new thresholds would change every other
library's memory behaviour in the process that imports the inspector (an
application embedding the TUI, a test run). Big traces are kept fast by
keeping few long-lived objects instead (see ``model.build_trace``). The
contract is checked on the source: no module of ``penguiflow_inspector``
imports ``gc``.
"""

from __future__ import annotations

import ast
import gc
from pathlib import Path

from test_model_perf import chain

import penguiflow_inspector
from penguiflow_inspector.model import build_trace

PACKAGE = Path(penguiflow_inspector.__file__).parent


def _imports_gc(path: Path) -> list[int]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return [node.lineno for node in ast.walk(tree)
            if (isinstance(node, ast.Import) and any(a.name == "gc" for a in node.names))
            or (isinstance(node, ast.ImportFrom) and node.module == "gc")]


def test_no_module_of_the_inspector_imports_gc() -> None:
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 10  # the package, not an empty folder
    offenders = {str(p.relative_to(PACKAGE)): lines for p in modules
                 if (lines := _imports_gc(p))}
    assert offenders == {}


def test_building_and_replaying_a_big_trace_leaves_the_collector_as_it_was() -> None:
    settings = (gc.isenabled(), gc.get_threshold(), gc.get_freeze_count())
    view = build_trace(chain(20_000))
    view.at((view.start + view.end) / 2)
    assert (gc.isenabled(), gc.get_threshold(), gc.get_freeze_count()) == settings
