"""Test helpers stay out of the core: no library or training module imports `lvface_mm.vlm.testing` or
`lvface_mm.vqa.testing`, except where a program explicitly chooses test models (`--tiny`, card "tiny"),
and then only inside the function that makes that choice. Parsed with `ast`, so aliases, relative
imports and `from ..vlm import testing` are all caught."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTING_MODULES = {"lvface_mm.vlm.testing", "lvface_mm.vqa.testing"}
# The test builders themselves.
EXEMPT_FILES = {"lvface_mm/vlm/testing.py", "lvface_mm/vqa/testing.py"}
# Programs that build test models on request; the import sits in the function that decides it.
PROGRAM_CHOICES = {
    ("lvface_mm/gallery/workbench.py", "_make_vlm"),  # demo --tiny / WorkbenchConfig(tiny=True)
    ("training/adapter.py", "_tiny_llm_config"),  # model.card: tiny
    ("training/adapter.py", "build_vlm"),  # model.card: tiny
}
PROGRAM_DIRS = ("lvface_mm/cli/", "lvface_mm/demo/")  # command-line programs (--tiny)


def _module_name(rel: str) -> str:
    parts = list(Path(rel).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> set[str]:
    """Absolute names a statement imports (modules, and `module.name` for from-imports)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        anchor = package[: len(package) - (node.level - 1)]
        base = ".".join([*anchor, *([base] if base else [])])
    return {base} | {f"{base}.{alias.name}" for alias in node.names}


def _offences(source: str, rel: str) -> list[str]:
    """Imports of the test builders in `source` (the file at `rel`, relative to the repository) that no rule allows."""
    tree = ast.parse(source)
    module = _module_name(rel)
    found: list[str] = []

    def visit(node: ast.AST, function: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, child.name)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                names = _imported(child, module, rel.endswith("__init__.py"))
                if names & TESTING_MODULES:
                    allowed = function is not None and (
                        (rel, function) in PROGRAM_CHOICES or rel.startswith(PROGRAM_DIRS)
                    )
                    if not allowed:
                        found.append(f"{rel}:{child.lineno} ({function or 'module level'})")
            visit(child, function)

    visit(tree, None)
    return found


def test_no_library_module_imports_the_test_builders() -> None:
    files = [p for d in ("lvface_mm", "training") for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 50
    offences = [
        o
        for p in files
        if (rel := p.relative_to(ROOT).as_posix()) not in EXEMPT_FILES
        for o in _offences(p.read_text(encoding="utf-8"), rel)
    ]
    assert offences == []


def test_the_checker_catches_every_spelling() -> None:
    # The checker itself can fail: each of these forms is reported.
    rel = "lvface_mm/vlm/model.py"
    spellings = [
        "from .testing import tiny_card",
        "from . import testing",
        "from ..vqa.testing import TinyLLMConfig",
        "import lvface_mm.vlm.testing as t",
        "def f():\n    from lvface_mm.vlm.testing import build_tiny_vlm",
    ]
    for text in spellings:
        assert _offences(text + "\n", rel), text
    assert _offences("from .config import IdentityAdapterConfig\nimport torch.testing\n", rel) == []
    assert _offences("from . import testing\n", "lvface_mm/vlm/__init__.py")  # the package's own __init__
    tiny = "def _make_vlm():\n    from ..vlm.testing import tiny_identity_vlm\n"
    assert _offences(tiny, "lvface_mm/gallery/workbench.py") == []  # a program's explicit choice
    assert _offences(tiny.replace("_make_vlm", "load"), "lvface_mm/gallery/workbench.py")


def test_importing_the_library_does_not_load_the_test_builders() -> None:
    code = (
        "import sys, lvface_mm.vlm, lvface_mm.vlm.config, lvface_mm.vlm.model, lvface_mm.vqa;"
        "print(sorted(m for m in sys.modules if m.endswith('.testing') and m.startswith('lvface_mm')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
