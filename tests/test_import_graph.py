"""modadapt's modules import each other without cycles.

The graph is read from the source with `ast`: every `import` and `from ... import`, at module
level, inside functions or under `TYPE_CHECKING`, with relative imports resolved. A cycle means
no module of it can be understood (or imported first) on its own.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "modadapt"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

#: Cycles that exist today and are allowed until their fix lands; each entry names its reason.
#: Delete an entry once its cycle is gone (the test then fails if the cycle comes back).
KNOWN_CYCLES: set[frozenset[str]] = set()


def module_name(path: Path, root: Path = ROOT, package: str = PACKAGE) -> str:
    parts = [package, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(tree: ast.AST, name: str, is_package: bool, modules: set[str]) -> set[str]:
    """The modules of `modules` that the module `name` imports anywhere in `tree`."""
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # `from . import varlen` imports the module varlen; `from .x import name` the module x.
            targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in modules else prefix for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `a.b.c` imports the deepest known module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(root: Path = ROOT, package: str = PACKAGE) -> dict[str, set[str]]:
    files = {module_name(p, root, package): p for p in sorted(root.rglob("*.py"))}
    modules = set(files)
    return {
        name: imported_modules(ast.parse(path.read_text(), str(path)), name, path.name == "__init__.py", modules)
        for name, path in files.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan), or a self-import."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[frozenset[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                out.append(frozenset(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return out


def test_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "e"}, "e": set(), "f": {"f"}}
    assert sorted(map(sorted, cycles(graph))) == [["a", "b", "c"], ["f"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_graph_reads_every_kind_of_import(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import x\n")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import x\n    import pkg.sub.c\n")
    (pkg / "sub" / "c.py").write_text("from .. import a\n")
    graph = import_graph(pkg, "pkg")
    assert graph == {
        "pkg": {"pkg.a"},
        "pkg.a": {"pkg.sub.b"},
        "pkg.sub": set(),
        "pkg.sub.b": {"pkg.a", "pkg.sub.c"},
        "pkg.sub.c": {"pkg.a"},
    }
    assert cycles(graph) == [frozenset({"pkg.a", "pkg.sub.b", "pkg.sub.c"})]
    (pkg / "a.py").write_text("import os\n")
    assert cycles(import_graph(pkg, "pkg")) == []


def test_modadapt_has_no_import_cycles():
    found = set(cycles(import_graph()))
    unexpected = [sorted(c) for c in found - KNOWN_CYCLES]
    assert not unexpected, f"import cycles: {unexpected}"


@pytest.mark.parametrize("known", sorted(KNOWN_CYCLES, key=sorted), ids=lambda c: "+".join(sorted(c)))
def test_known_cycles_still_exist(known):
    """An allowed cycle that is gone must leave the allow-list, so it cannot come back unnoticed."""
    assert known in set(cycles(import_graph())), f"{sorted(known)} is no longer a cycle: remove it from KNOWN_CYCLES"
