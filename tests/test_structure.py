"""The structure rules of docs/architecture.md ("Layers") that import contracts cannot state.

- No import cycle between modules of the project's packages, counting function-level imports
  too (a loop hidden inside a function is still a loop).
- A function-level import carries its reason on the same line or the line above: an optional
  dependency, or start-up time.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import grimp
import pytest

ROOT: Final = Path(__file__).resolve().parent.parent
PACKAGES: Final = ("coordinator", "agent", "ops", "mesh", "vpn", "lab", "bench")


def _packages() -> list[str]:
    return [p for p in PACKAGES if (ROOT / p / "__init__.py").exists()]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_no_import_cycle_between_modules() -> None:
    sys.path.insert(0, str(ROOT))  # bench is not installed; grimp finds packages on sys.path
    try:
        built = grimp.build_graph(*_packages(), cache_dir=None)
    finally:
        sys.path.remove(str(ROOT))
    graph = {m: set(built.find_modules_directly_imported_by(m)) for m in built.modules}
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(graph) == [["a", "b", "c"]]


def _local_imports_without_reason(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    found: list[str] = []

    def walk(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom) and nested:
                line = lines[child.lineno - 1]
                above = lines[child.lineno - 2].strip() if child.lineno > 1 else ""
                if "#" not in line and not above.startswith("#"):
                    found.append(f"{path.relative_to(ROOT)}:{child.lineno}: {line.strip()}")
            walk(child, nested or isinstance(
                child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef))

    walk(ast.parse("\n".join(lines)), False)
    return found


@pytest.mark.parametrize("package", _packages())
def test_function_level_imports_say_why(package: str) -> None:
    found = [hit for f in sorted((ROOT / package).rglob("*.py"))
             for hit in _local_imports_without_reason(f)]
    assert found == []
