"""The package reads top-down: no import circle between ditloc's modules, the core never imports
the apps above it, localization never imports editing, and no module grows past 500 lines.

Imports are read with `ast` from every module of src/ditloc, top-level and function-local alike
(a local import is still a dependency), relative ones resolved against the module's package."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "ditloc"
#: packages of the core that never import the apps built on them
CORE = ("ditloc.engine", "ditloc.adapters", "ditloc.localization", "ditloc.edit")
APPS = ("ditloc.toy", "ditloc.cli", "ditloc.demo")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The ditloc modules `name` imports (a name imported from a package counts as its module
    where one exists, else the package)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target.startswith("ditloc") and target != name:
                out.add(target)
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def _inside(name: str, packages) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def test_the_reader_sees_the_imports(graph):
    """The graph is not empty by accident: known edges are in it."""
    assert "ditloc.noise" in graph["ditloc.edit.train"]
    assert "ditloc.registry" in graph["ditloc.options"]
    assert "ditloc.localization.search" in graph["ditloc.localization"]


def test_no_import_circle(graph):
    """No module reaches itself through the imports of other modules (a package's __init__
    importing its own submodules is how packages are built, so edges into a parent package
    from its own submodules are the only ones left out)."""
    def edges(name):
        return {t for t in graph[name] if not name.startswith(t + ".")}

    state: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(name):
        state[name] = 1
        stack.append(name)
        for target in sorted(edges(name)):
            if state.get(target) == 1:
                circles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_the_core_imports_no_app(graph):
    bad = sorted(f"{a} -> {b}" for a, targets in graph.items() if _inside(a, CORE)
                 for b in targets if _inside(b, APPS))
    assert not bad, bad


def test_localization_imports_no_editing(graph):
    bad = sorted(f"{a} -> {b}" for a, targets in graph.items() if _inside(a, ("ditloc.localization",))
                 for b in targets if _inside(b, ("ditloc.edit",)))
    assert not bad, bad


def test_no_module_over_500_lines():
    long = sorted(f"{p.relative_to(PACKAGE)} ({n})" for p in PACKAGE.rglob("*.py")
                  if (n := len(p.read_text().splitlines())) > 500)
    assert not long, long
