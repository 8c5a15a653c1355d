"""The shape the developer guide asks of the package: no function longer than 60 lines (complexity and
statement counts are ruff's C901/PLR0915, configured in pyproject.toml and run by scripts/lint.sh)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("imagegen_provider", "imagegen_gateway")
MAX_LINES = 60


def _functions() -> list[tuple[str, int]]:
    found = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    # From the def line (decorators excluded) to the last line of the body, docstring included.
                    lines = (node.end_lineno or node.lineno) - node.lineno + 1
                    found.append((f"{path.relative_to(REPO)}:{node.lineno} {node.name}", lines))
    return found


def test_the_package_has_functions_to_measure():
    assert len(_functions()) > 300


@pytest.mark.parametrize("package", PACKAGES)
def test_no_function_is_longer_than_sixty_lines(package):
    long = [f"{name} ({lines} lines)" for name, lines in _functions() if name.startswith(package) and lines > MAX_LINES]
    assert not long, "split these into named stages:\n" + "\n".join(long)
