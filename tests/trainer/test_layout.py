"""The trainer's package layout: grao's modules import each other without cycles, and every package says its job."""

from __future__ import annotations

import ast
import importlib
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2] / "grao"


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: pathlib.Path, modules: dict) -> set[str]:
    """The grao modules ``name`` imports anywhere in its file (a function-level import too)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in modules and m != name}


def test_grao_modules_import_each_other_without_cycles():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    # A package importing its own submodules (to re-export them) and a submodule importing a name of its package
    # are one unit, not a cycle between jobs.
    related = lambda a, b: a.startswith(b + ".") or b.startswith(a + ".")  # noqa: E731
    cycles = []

    def visit(start: str, node: str, path: list[str]) -> None:
        for nxt in sorted(graph[node]):
            if related(node, nxt):
                continue
            if nxt == start:
                cycles.append(" -> ".join([*path, start]))
            elif nxt not in path and len(path) < 8:
                visit(start, nxt, [*path, nxt])

    for name in sorted(graph):
        visit(name, name, [name])
    assert not cycles, f"{len(cycles)} import cycle(s), e.g. {cycles[:3]}"


def test_every_grao_package_says_its_job():
    for init in sorted(ROOT.rglob("__init__.py")):
        name = ".".join(init.parent.relative_to(ROOT.parent).parts)
        doc = importlib.import_module(name).__doc__
        assert doc and doc.strip(), f"{name} has no docstring"
