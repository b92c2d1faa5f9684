"""The package's import graph: no cycles (counting imports inside functions, which can hide one), and every
import inside a function says why it is not at the top (start-up time or an optional dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "minigrpo"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that can run while modules import each other: not those under `if TYPE_CHECKING:`,
    nor those in a module-level `__getattr__` (PEP 562: it runs only once its module has finished importing, so it
    cannot close a cycle; minigrpo/__init__.py loads the API that way)."""
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for child in node.body for n in ast.walk(child)}
    skip |= {id(n) for node in getattr(tree, "body", []) if isinstance(node, ast.FunctionDef)
             and node.name == "__getattr__" for n in ast.walk(node)}
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in skip]


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (a submodule's import also runs its packages' __init__)."""
    known = modules()
    graph: dict[str, set[str]] = {name: set() for name in known}
    for name, path in known.items():
        for node in runtime_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative import
                    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
                # `from minigrpo import tiny` imports the module minigrpo.tiny
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
            for target in targets:
                parts = target.split(".")
                for i in range(1, len(parts) + 1):  # the packages above it run first
                    prefix = ".".join(parts[:i])
                    if prefix in known and prefix != name:
                        graph[name].add(prefix)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_imports_inside_functions_and_packages():
    graph = import_graph()
    assert "minigrpo.train" in graph["minigrpo.cli"]  # imported inside cmd_train
    assert {"minigrpo.rollout", "minigrpo.rollout.types"} <= graph["minigrpo.train"]
    assert "minigrpo.tiny" in graph["minigrpo.model"]  # `from minigrpo import tiny`


def test_no_import_cycle_in_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_every_import_inside_a_function_says_why():
    """An import inside a function is for start-up time or an optional dependency; a comment on its line, or in
    the block of imports it belongs to, says which (ARCHITECTURE.md, "Imports at the top")."""
    silent = []
    for path in modules().values():
        lines = path.read_text().splitlines()
        tree = ast.parse(path.read_text())
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    start = node.lineno - 1  # the import's block: contiguous imports, blank lines and comments
                    while start > func.lineno and (not lines[start - 1].strip() or lines[start - 1].strip().startswith(
                            ("from ", "import ", "#", "if ", "else:"))):
                        start -= 1
                    if not any("#" in line for line in lines[start:node.lineno]):
                        where = f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
                        silent.append(f"{where}: {lines[node.lineno - 1].strip()}")
    assert not silent, "imports inside functions without a comment saying why:\n" + "\n".join(sorted(set(silent)))
