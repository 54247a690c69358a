"""Imports go one way (DESIGN.md): nothing imports a part above it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "shoal"

# top-level modules below every part, importable from all of them
SHARED = {"errors", "_atomic", "_closing", "_devices", "_extras", "_progress", "_yaml"}

# part -> the parts it may import (besides itself and SHARED)
ALLOWED: dict[str, set[str]] = {
    "checkpoint": set(),
    "ops": set(),
    "recipe": {"checkpoint"},
    "merge": {"recipe", "ops", "checkpoint"},
    "tasks": {"checkpoint"},
    "testbed": {"checkpoint", "tasks"},
    "executors": {"tasks", "merge", "recipe", "ops", "checkpoint", "testbed"},
    "search": {"executors", "tasks", "merge", "recipe", "ops", "checkpoint", "testbed"},
    "adapt": {"tasks", "merge", "recipe", "ops", "checkpoint"},
    "report": {"search", "recipe", "checkpoint"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_part_imports_only_below_it(part: str) -> None:
    offenders = []
    for path in sorted((SRC / part).rglob("*.py")):
        for module in _imports(path):
            parts = module.split(".")
            if parts[0] != "shoal" or len(parts) < 2 or parts[1] in {part, *SHARED}:
                continue
            if parts[1] not in ALLOWED[part]:
                offenders.append(f"{path.relative_to(SRC)} imports {module}")
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize("name", sorted(SHARED))
def test_shared_modules_import_no_part(name: str) -> None:
    offenders = []
    for module in _imports(SRC / f"{name}.py"):
        parts = module.split(".")
        if parts[0] == "shoal" and (len(parts) < 2 or parts[1] not in SHARED):
            offenders.append(f"{name}.py imports {module}")
    assert not offenders, "\n".join(offenders)
