"""Every third-party package the code imports is a declared dependency (pyproject.toml).

The imports are read with `ast` from every .py file (top-level and function-local
imports, `importlib.import_module("x")` / `__import__("x")` with a literal name), mapped
to distributions with `importlib.metadata.packages_distributions()` (PIL -> pillow,
yaml -> pyyaml) and compared with the names in `[project] dependencies`."""
from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "ditloc"


def _normalize(name: str) -> str:
    """PEP 503 name: Pillow, pillow and PIL-low compare equal; so do PyYAML and pyyaml."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, f"cannot read a distribution name from requirement {requirement!r}"
    return _normalize(match.group(1))


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _declared(*extras: str) -> set[str]:
    project = _pyproject()["project"]
    requirements = list(project.get("dependencies", []))
    for extra in extras:
        requirements += project.get("optional-dependencies", {}).get(extra, [])
    return {_requirement_name(r) for r in requirements}


def imported_modules(files) -> dict[str, list[str]]:
    """Top-level module name -> ['path:line', ...] for every absolute import in `files`."""
    found: dict[str, list[str]] = {}
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                    if not node.args[0].value.startswith("."):
                        names = [node.args[0].value]
            for name in names:
                found.setdefault(name.split(".")[0], []).append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def third_party(found: dict[str, list[str]], local: set[str]) -> dict[str, list[str]]:
    return {
        name: where for name, where in found.items()
        if name not in local and name not in sys.stdlib_module_names
    }


def undeclared(found: dict[str, list[str]], declared: set[str]) -> list[str]:
    """One line per imported module none of whose distributions is declared."""
    distributions = importlib.metadata.packages_distributions()
    problems = []
    for name, where in sorted(found.items()):
        # a module that is not installed here cannot be mapped: take its own name as the distribution
        candidates = {_normalize(d) for d in distributions.get(name, [])} or {_normalize(name)}
        if not candidates & declared:
            problems.append(
                f"{name} (distribution {' or '.join(sorted(candidates))}) imported at {', '.join(where[:3])}"
                f"{' ...' if len(where) > 3 else ''}"
            )
    return problems


def test_every_imported_package_is_a_declared_dependency():
    found = third_party(imported_modules(sorted(PACKAGE.rglob("*.py"))), local={"ditloc"})
    # the check must see the imports it exists for; an empty scan would pass vacuously
    assert {"torch", "diffusers", "transformers", "peft", "PIL"} <= set(found), sorted(found)
    problems = undeclared(found, _declared())
    assert not problems, (
        "src/ditloc imports packages that pyproject.toml [project] dependencies does not declare:\n  "
        + "\n  ".join(problems)
    )


def test_every_package_the_tests_import_is_declared_for_the_tests():
    tests = sorted((ROOT / "tests").rglob("*.py"))
    local = {"ditloc"} | {p.stem for p in tests}
    found = third_party(imported_modules(tests), local=local)
    problems = undeclared(found, _declared("test"))
    assert not problems, (
        "tests/ import packages that neither [project] dependencies nor the 'test' extra declares:\n  "
        + "\n  ".join(problems)
    )


def test_the_check_catches_an_undeclared_import():
    """The comparison itself: drop peft from the declared names and it is reported."""
    found = third_party(imported_modules(sorted(PACKAGE.rglob("*.py"))), local={"ditloc"})
    problems = undeclared(found, _declared() - {"peft"})
    assert any(p.startswith("peft ") for p in problems), problems
