"""Every third-party module the shipped packages import when they load comes with a plain install (no extras).

The test environment installs every extra, so a module-level import of a package only an extra brings (redis-py
once came only with ``test``) passes every other test and breaks ``pip install airflow-provider-imagegen`` at
import time; ``scripts/demo.sh`` on a fresh machine was where it showed.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("imagegen_provider", "imagegen_gateway")
DISTRIBUTION = "airflow-provider-imagegen"
#: Modules that may import an extra's packages at load time, because nothing imports them at load time.
LAZY = {
    "imagegen_provider.operators.lineage": "imported by the operators' get_openlineage_facets_* methods, which only "
                                           "the OpenLineage provider's listener calls",
}


def _module_level_imports(tree: ast.Module, *, full: bool = False) -> set[str]:
    """Names imported when the module loads (top-level packages, or full dotted names with ``full``): not those
    inside functions, ``if TYPE_CHECKING`` or a ``try`` that handles ImportError."""
    found: set[str] = set()

    def name(dotted: str) -> str:
        return dotted if full else dotted.split(".")[0]

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.Import):
                found.update(name(alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(name(node.module))
                found.update(f"{node.module}.{alias.name}" for alias in node.names if full)
            elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try) and not any(
                "ImportError" in ast.unparse(handler.type or ast.Name("BaseException")) for handler in node.handlers
            ):
                visit(node.body)

    visit(tree.body)
    return found


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", requirement).lower()


def _base_closure() -> set[str]:
    """Distributions a plain install brings: the base requirements, and theirs, without any extra."""
    seen: set[str] = set()
    queue = [DISTRIBUTION]
    while queue:
        name = _name(queue.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requirements = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for text in requirements:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                queue.append(requirement.name)
    return seen


def test_every_module_level_import_comes_with_a_plain_install() -> None:
    providers = importlib.metadata.packages_distributions()
    closure = _base_closure()
    missing: list[str] = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            if ".".join(path.relative_to(REPO).with_suffix("").parts) in LAZY:
                continue
            for module in _module_level_imports(ast.parse(path.read_text(), filename=str(path))):
                if module in PACKAGES or module in sys.stdlib_module_names or module == "__future__":
                    continue
                distributions = {_name(d) for d in providers.get(module, [])}
                if not distributions & closure:
                    missing.append(f"{path.relative_to(REPO)} imports {module} ({', '.join(sorted(distributions))})")
    assert not missing, "only an extra installs:\n" + "\n".join(missing)


def test_the_lazy_modules_are_imported_by_no_module_at_load_time() -> None:
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            imports = _module_level_imports(ast.parse(path.read_text(), filename=str(path)), full=True)
            assert not imports & set(LAZY), f"{path.relative_to(REPO)} imports {sorted(imports & set(LAZY))} at load"


def test_the_check_sees_an_import_only_an_extra_brings() -> None:
    # moto is installed here by the "test" extra only: a module importing it at load time must be caught.
    tree = ast.parse("import json\nimport moto\ndef f():\n    import duckdb\n")
    imports = _module_level_imports(tree)
    assert imports == {"json", "moto"}
    providers = importlib.metadata.packages_distributions()
    assert not {_name(d) for d in providers["moto"]} & _base_closure()
