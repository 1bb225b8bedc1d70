"""Package boundaries, enforced (an import-linter's contracts, as tests).

1. No package reaches into another one's private modules or names: what
   ``penguiflow_exporters``, ``penguiflow_inspector``, ``penguiflow_a2a`` (and
   ``penguiflow_distributed``) use of each other and of ``penguiflow`` is public
   and documented. Relative imports inside a package are its own business.
2. ``penguiflow`` (the core) imports none of those packages.
3. ``penguiflow``'s own modules import each other without a cycle at import
   time (module-level imports; ``if TYPE_CHECKING:`` blocks and imports inside
   functions do not run at import time).
4. The runtime's collaborators (contexts, workers, the runtime object) do not
   import ``penguiflow.core`` at all, not even for types: ``core`` builds them.

The checks read the source (``ast``): nothing is imported, and every import
statement counts, wherever it is (inside functions and ``TYPE_CHECKING`` too)
for contracts 1, 2 and 4.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Every top-level package of the workspace, by import name.
PACKAGES = frozenset({
    "penguiflow",
    "penguiflow_a2a",
    "penguiflow_distributed",
    "penguiflow_exporters",
    "penguiflow_inspector",
})

#: Where each package's source lives (a package not there yet is skipped).
SOURCES = {
    "penguiflow": ROOT / "penguiflow",
    "penguiflow_a2a": ROOT / "penguiflow_a2a",
    "penguiflow_distributed": ROOT / "distributed" / "src" / "penguiflow_distributed",
    "penguiflow_exporters": ROOT / "exporters" / "src" / "penguiflow_exporters",
    "penguiflow_inspector": ROOT / "inspector" / "src" / "penguiflow_inspector",
}

#: Cross-package private imports still to be removed, as (file, private name) pairs.
#: Each is being fixed elsewhere; the list may only shrink. A pair that no longer
#: occurs fails ``test_pending_private_import_is_still_there`` (strict xfail): delete it
#: here then.
#: Format: ``("inspector/src/penguiflow_inspector/model.py", "penguiflow._ids"): "why"``.
#: (The last ones, penguiflow._ids/_spans and penguiflow_exporters._gc in the
#: inspector, are gone: the ids and spans became penguiflow.tracing's, and the
#: exporters' _gc went with the store rewrite.)
_PENDING: dict[tuple[str, str], str] = {}


def _is_private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def _python_files(package: str) -> Iterator[Path]:
    source = SOURCES[package]
    if source.is_dir():
        yield from sorted(source.rglob("*.py"))


def _imports(path: Path) -> Iterator[tuple[int, str, list[str]]]:
    """``(line, absolute module, imported names)`` of every absolute import in ``path``."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            yield node.lineno, node.module, [alias.name for alias in node.names]


def _private_reach(owner: str, module: str, names: list[str]) -> str | None:
    """The private dotted name ``owner`` reaches in another package, or None."""
    parts = module.split(".")
    if parts[0] not in PACKAGES or parts[0] == owner:
        return None
    for index, part in enumerate(parts):
        if _is_private(part):
            return ".".join(parts[: index + 1])
    for name in names:
        if _is_private(name):
            return f"{module}.{name}"
    return None


def _cross_package_private_imports() -> dict[tuple[str, str], list[int]]:
    found: dict[tuple[str, str], list[int]] = {}
    for package in sorted(PACKAGES - {"penguiflow"}):
        for path in _python_files(package):
            for line, module, names in _imports(path):
                reached = _private_reach(package, module, names)
                if reached is not None:
                    key = (path.relative_to(ROOT).as_posix(), reached)
                    found.setdefault(key, []).append(line)
    return found


def test_no_package_imports_another_ones_private_names() -> None:
    offenders = {
        key: lines for key, lines in _cross_package_private_imports().items()
        if key not in _PENDING
    }
    assert not offenders, (
        "private modules/names of another package imported (make them public and "
        "documented there, then import that):\n" + "\n".join(
            f"  {file}:{','.join(map(str, lines))}: {name}"
            for (file, name), lines in sorted(offenders.items())))


@pytest.mark.parametrize(
    "pair",
    [pytest.param(pair, marks=pytest.mark.xfail(reason=f"pending: {why}", strict=True),
                  id=f"{pair[0]}:{pair[1]}")
     for pair, why in sorted(_PENDING.items())] or [pytest.param(None, id="nothing-pending")],
)
def test_pending_private_import_is_still_there(pair: tuple[str, str] | None) -> None:
    # Each pending pair is reported as xfailed while the import exists; once it is
    # gone this passes, which strict xfail turns into a failure: delete the pair.
    assert pair is None or pair not in _cross_package_private_imports()


def test_the_checker_sees_private_reaches() -> None:
    assert _private_reach("penguiflow_inspector", "penguiflow._ids", ["x"]) == "penguiflow._ids"
    assert _private_reach("penguiflow_a2a", "penguiflow.state", ["_X", "Y"]) == \
        "penguiflow.state._X"
    assert _private_reach("penguiflow_a2a", "penguiflow", ["_memory_store"]) == \
        "penguiflow._memory_store"
    assert _private_reach("penguiflow_exporters", "penguiflow_exporters._batch", []) is None
    assert _private_reach("penguiflow_a2a", "penguiflow.state", ["__version__"]) is None
    assert _private_reach("penguiflow_a2a", "asyncio._private", []) is None


def test_the_core_imports_no_other_package() -> None:
    offenders = [
        f"{path.relative_to(ROOT).as_posix()}:{line}: {module}"
        for path in _python_files("penguiflow")
        for line, module, _ in _imports(path)
        if module.split(".")[0] in PACKAGES - {"penguiflow"}
    ]
    assert not offenders, "penguiflow must not depend on the other packages:\n" + "\n".join(
        offenders)


# --- penguiflow's own import graph ----------------------------------------------------------


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_time_statements(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """Import statements that run when the module is imported."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from _import_time_statements(node.body)
            yield from _import_time_statements(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, *(h.body for h in node.handlers), node.orelse,
                          node.finalbody):
                yield from _import_time_statements(block)
        elif isinstance(node, ast.With):
            yield from _import_time_statements(node.body)


def _targets(module: str, is_package: bool, node: ast.Import | ast.ImportFrom,
             modules: set[str]) -> set[str]:
    """The penguiflow modules an import statement of ``module`` loads."""
    found: set[str] = set()
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in modules}
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    for alias in node.names:
        submodule = f"{target}.{alias.name}"
        if submodule in modules:
            found.add(submodule)  # ``from . import semconv``: the submodule, not __init__
        elif target in modules:
            found.add(target)
    return found


def _penguiflow_import_graph(*, import_time: bool) -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in _python_files("penguiflow")}
    modules = set(paths)
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        statements = (_import_time_statements(tree.body) if import_time else
                      (n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)))
        edges: set[str] = set()
        for node in statements:
            edges |= _targets(name, path.name == "__init__.py", node, modules)
        edges.discard(name)
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def test_penguiflow_has_no_import_cycle_at_import_time() -> None:
    graph = _penguiflow_import_graph(import_time=True)
    cycles = _cycles(graph)
    assert not cycles, "import cycles among penguiflow's modules:\n" + "\n".join(
        "  " + ", ".join(f"{m} -> {sorted(graph[m] & set(c))}" for m in c) for c in cycles)


def test_the_cycle_finder_finds_cycles() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_contexts_and_workers_do_not_import_the_flow() -> None:
    graph = _penguiflow_import_graph(import_time=False)
    for module in ("penguiflow._context", "penguiflow._worker", "penguiflow._runtime"):
        assert "penguiflow.core" not in graph[module], (
            f"{module} imports penguiflow.core: it must see only the runtime object "
            "(penguiflow._runtime.FlowRuntime), which core builds")


def test_core_is_in_no_cycle_even_counting_type_only_imports() -> None:
    # The tracer and the metrics read flows through a protocol (ObservedFlow), and the
    # context and worker through FlowRuntime: nothing core imports imports it back.
    graph = _penguiflow_import_graph(import_time=False)
    with_core = [c for c in _cycles(graph) if "penguiflow.core" in c]
    assert not with_core, with_core
