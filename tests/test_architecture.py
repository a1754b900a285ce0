"""The package's layers (docs/architecture.md): who may import whom, and module sizes."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import adasap

PACKAGE = Path(adasap.__file__).parent
LAYERS = {
    "errors": 0, "io": 0, "checks": 0, "devices": 0, "settings": 0, "distributed": 0,
    "registry": 0, "alignment": 0,
    "data": 1, "models": 1, "method": 1,
    "tasks": 2,
    "training": 3,
    "robustness": 4, "deploy": 4,
    "experiments": 5,
    "cli": 6, "integrations": 6, "__init__": 6,
    "__main__": 7,  # python -m adasap: the command line's entry point
}  # fmt: skip
# Imports inside a function, allowed across layers because they are paid only when used.
LAZY_EXCEPTIONS = {("training", "deploy")}
MAX_LINES = 420  # "no module over about 400 lines"


def unit_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported adasap unit, inside a function) for every import of ``path``."""
    tree = ast.parse(path.read_text())
    nested: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            nested.update(id(n) for n in ast.walk(node) if n is not node)
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
            if node.module == "adasap":
                names = [f"adasap.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "adasap" and len(parts) > 1:
                found.append((parts[1], id(node) in nested))
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_follow_the_layers(path):
    unit = unit_of(path)
    assert unit in LAYERS, f"{unit} has no layer: add it to docs/architecture.md and LAYERS"
    for imported, lazy in imports(path):
        if imported == unit:
            continue
        assert imported in LAYERS, imported
        if lazy and (unit, imported) in LAZY_EXCEPTIONS:
            continue
        below = LAYERS[imported] < LAYERS[unit]
        foundation = LAYERS[imported] == 0
        assert below or foundation, f"{unit} (layer {LAYERS[unit]}) imports {imported}"


def test_the_method_runs_without_the_rest_of_adasap():
    """``method/`` needs only the foundation; ``registry`` is allowed because criteria are
    registered in one, ``settings`` because ``PrunerSettings`` is checked by it, ``alignment``
    because it resolves ``round_to: auto``, and none imports anything of adasap but
    ``errors``."""
    allowed = {"method", "errors", "checks", "distributed", "registry", "settings", "alignment"}
    for path in (PACKAGE / "method").rglob("*.py"):
        assert {u for u, _ in imports(path)} <= allowed, path


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_stay_small(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.name} has {lines} lines: split it by responsibility"
