"""The package's import graph has no cycles, counting every import: module-level, function-level
and ``TYPE_CHECKING`` ones alike (a lazy import hides a cycle from Python, not from a reader)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "collapse_core"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _resolve(current: str, is_package: bool, level: int, module: str | None) -> str:
    base = current.split(".") if is_package else current.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, module] if module else base)


def import_graph() -> dict[str, set[str]]:
    """Module → the package modules it imports anywhere in its body.

    ``from .x import y`` is an edge to ``pkg.x.y`` when that is a module, else to ``pkg.x``; the
    implicit import of a parent package's ``__init__`` is not an edge (it is how Python
    finds a module, not a dependency the author wrote)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                origin = (
                    _resolve(name, is_package, node.level, node.module)
                    if node.level
                    else (node.module or "")
                )
                for alias in node.names:
                    sub = f"{origin}.{alias.name}"
                    targets.append(sub if sub in modules else origin)
            for target in targets:
                if target.split(".")[0] == PACKAGE and target in modules and target != name:
                    graph[name].add(target)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan 1972)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_cycle_finder_sees_a_cycle() -> None:
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_graph_sees_function_level_imports() -> None:
    graph = import_graph()
    # cli imports the pipeline only inside a command function.
    assert "collapse_core.pipeline" in graph["collapse_core.cli"]


def test_no_import_cycles() -> None:
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" ↔ ".join(c) for c in cycles)


@pytest.mark.parametrize(
    "compute",
    ["capture", "probing", "metrics", "pipeline", "embeddings", "evals", "train", "analysis"]
    + ["track", "integrations"],
)
def test_compute_modules_do_not_import_views(compute: str) -> None:
    graph = import_graph()
    views = {f"{PACKAGE}.views", f"{PACKAGE}.ui", f"{PACKAGE}.figures"}
    for name, deps in graph.items():
        if name == f"{PACKAGE}.{compute}" or name.startswith(f"{PACKAGE}.{compute}."):
            assert not deps & views, f"{name} imports {sorted(deps & views)}"


def test_readme_layout_names_every_module() -> None:
    """The README's layout section matches the tree: every module and subpackage is named."""
    readme = (ROOT.parent / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("```", 2)[1]
    words = set(layout.replace(",", " ").replace("/", " ").split())
    names = {p.stem for p in ROOT.glob("*.py") if not p.stem.startswith("_")}
    names |= {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    missing = sorted(names - words)
    assert not missing, f"README layout does not mention: {missing}"


def test_production_code_does_not_import_devtools() -> None:
    """Benchmarks and fault catalogues may use the library, never the other way round; only
    ``cli`` reaches them, to dispatch ``bench``."""
    devtools = f"{PACKAGE}.devtools"
    for name, deps in import_graph().items():
        if name.startswith(devtools) or name == f"{PACKAGE}.cli":
            continue
        bad = sorted(d for d in deps if d == devtools or d.startswith(devtools + "."))
        assert not bad, f"{name} imports {bad}"
