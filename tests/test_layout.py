"""The code's layout: the import graph of ``src/magdi`` has no cycle (imports inside functions included: a lazy
import only hides a cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "magdi"


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def internal_imports(path: Path) -> set[str]:
    """``magdi.*`` modules that ``path`` imports anywhere in its body, relative imports resolved."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("magdi")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("magdi"):
                out.add(mod)
                out |= {f"{mod}.{a.name}" for a in node.names}  # `from . import x` imports module x
    modules = {module_name(p) for p in SRC.rglob("*.py")}
    return {m for m in out if m in modules and m != me}


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): internal_imports(p) for p in SRC.rglob("*.py")}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_find_cycle_finds_a_cycle_by_hand() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_magdi_import_graph_has_no_cycle() -> None:
    graph = import_graph()
    assert "magdi.official" in graph and "magdi.discussion" in graph["magdi.official"]
    ignore_pkg = {k: {m for m in v if not (k.startswith(m + ".") or m.startswith(k + "."))} for k, v in graph.items()}
    assert find_cycle(ignore_pkg) is None, " -> ".join(find_cycle(ignore_pkg) or [])
