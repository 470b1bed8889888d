"""No import circles in lvface_mm: every module imports on its own, and the import graph has no cycle
at module level (and, inside `models`, none even through function-level imports)."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lvface_mm"

# Function-level imports that close a cycle on purpose: a registry module lazily imports the
# built-in backends, which import the registry to register themselves (faces.detection's detector
# backends; vlm's model families and processors). A cycle anywhere else fails the test.
ALLOWED_LAZY_CYCLES_IN = ("lvface_mm.faces", "lvface_mm.vlm")


def module_names() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if parts[-1] != "__main__":
            out[name] = path
    return out


def import_graph(module_level_only: bool) -> dict[str, set[str]]:
    """module -> the lvface_mm modules it imports (at module level, or anywhere in its code)."""
    modules = module_names()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        nodes = tree.body if module_level_only else list(ast.walk(tree))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in nodes:
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(max(node.level - 1, 0)):
                    base = base.rpartition(".")[0]
                target = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
                targets = [target] + [f"{target}.{a.name}" for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph)))
    try:
        for v in graph:
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return found


def test_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [{"a", "b", "c"}]


def test_no_module_level_import_cycle():
    assert cycles(import_graph(module_level_only=True)) == []


def test_models_have_no_cycle_even_through_lazy_imports():
    # The registry <-> checkpoint circle used to hide behind function-level imports.
    found = cycles(import_graph(module_level_only=False))
    assert [c for c in found if any(m.startswith("lvface_mm.models") for m in c)] == []
    for component in found:
        inside = [p for p in ALLOWED_LAZY_CYCLES_IN if all(m == p or m.startswith(p + ".") for m in component)]
        assert inside, f"new import cycle: {sorted(component)}"


@pytest.fixture
def clean_lvface_mm():
    """Unload every lvface_mm module for the test and put the originals back afterwards, so the rest
    of the session keeps its classes and registries."""
    saved = {k: v for k, v in sys.modules.items() if k == "lvface_mm" or k.startswith("lvface_mm.")}
    yield
    for k in [k for k in sys.modules if k == "lvface_mm" or k.startswith("lvface_mm.")]:
        del sys.modules[k]
    sys.modules.update(saved)


def test_every_module_imports_on_its_own(clean_lvface_mm):
    """Each module imported first, with no other lvface_mm module loaded: an import circle shows up as
    an ImportError for whichever module the cycle is entered from. Third-party packages stay loaded
    (they cannot take part in our circles), which keeps this to seconds."""
    failures = []
    for name in module_names():
        for k in [k for k in sys.modules if k == "lvface_mm" or k.startswith("lvface_mm.")]:
            del sys.modules[k]
        try:
            importlib.import_module(name)
        except Exception as exc:  # report every module, not just the first
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
    assert failures == []
