"""No import cycles among companion's modules.

The graph has an edge A -> B for every ``import``/``from ... import`` of a companion module B written in A's
source, at module level *and inside functions*. A function-level import that exists only to dodge a cycle (the
classic "import here, or the two modules import each other") is the same cycle, deferred: the two modules still
cannot be understood or loaded one without the other. Lazy imports of *third-party* packages (for import speed)
are not edges, and neither are imports under ``if TYPE_CHECKING:`` (they never run). A parent package's
``__init__`` running before its submodule is Python's doing, not an edge written in the source.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "companion"


def module_files(package: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its source (``from pkg import sub`` counts as
    importing ``pkg.sub`` when that is a module, else ``pkg``)."""

    def known(dotted: str) -> str | None:
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                found.update(filter(None, (known(a.name) for a in child.names)))
            elif isinstance(child, ast.ImportFrom):
                if child.level:  # relative: resolve against this module's package
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                for alias in child.names:
                    sub = f"{target}.{alias.name}"
                    found.update(filter(None, [sub if sub in modules else known(target)]))
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    found.discard(name)
    return found


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    modules = module_files(package)
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle ``[a, b, ..., a]`` if the graph has any (depth-first search, deterministic order)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := dfs(start)):
            return cycle
    return None


def test_no_import_cycles_among_companion_modules():
    graph = import_graph()
    assert len(graph) > 20 and "companion.tokenization.base" in graph  # the walk found the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_graph_sees_function_level_and_relative_imports(tmp_path):
    """The detector itself: a cycle hidden in a function body, or written with a relative import, is found;
    TYPE_CHECKING imports are not edges."""
    pkg = tmp_path / "companion"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .a import f\n")
    (pkg / "sub" / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                      "    from companion.c import C\n\ndef f():\n    from companion.sub.b import g\n")
    (pkg / "sub" / "b.py").write_text("from . import a\n")
    (pkg / "c.py").write_text("import companion.sub.a\n")
    graph = import_graph(pkg)
    assert graph["companion.sub.a"] == {"companion.sub.b"}
    assert graph["companion.sub.b"] == {"companion.sub.a"}
    assert graph["companion.sub"] == {"companion.sub.a"} and graph["companion.c"] == {"companion.sub.a"}
    assert find_cycle(graph) == ["companion.sub.a", "companion.sub.b", "companion.sub.a"]
    del graph["companion.sub.b"]
    assert find_cycle(graph) is None


@pytest.mark.parametrize("module", ["companion.objectives", "companion.tokenization.base"])
def test_former_cycle_partners_no_longer_import_back(module):
    graph = import_graph()
    partners = {"companion.objectives": {"companion.pipeline"},
                "companion.tokenization.base": {"companion.tokenization.bpe", "companion.tokenization.char"}}
    assert not graph[module] & partners[module]
