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


# ----------------------------------------------------------------------------- DVC code dependencies
ROOT = SRC.parents[1]


def module_file(mod: str) -> Path:
    rel = Path(*mod.split("."))
    path = SRC.parent / rel.with_suffix(".py")
    return path if path.is_file() else SRC.parent / rel / "__init__.py"


def script_imports(script: Path) -> set[str]:
    """The ``magdi`` modules a stage script imports (anywhere in it)."""
    out = set()
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("magdi"):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("magdi")}
    return out


def loaded_modules(script: Path) -> set[str]:
    """Every ``magdi`` module the script can load: its imports, what those import (at module level or inside a
    function), and the packages above each (importing ``a.b`` runs ``a/__init__``)."""
    graph = import_graph()
    seen: set[str] = set()
    todo = list(script_imports(script))
    while todo:
        m = todo.pop()
        if m in seen or m not in graph:
            continue
        seen.add(m)
        todo += list(graph[m])
        parts = m.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
    return seen


def covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(ROOT).as_posix()
    return any(rel == d or rel.startswith(d.rstrip("/") + "/") for d in deps)


def test_every_module_a_stage_loads_is_in_its_dvc_deps() -> None:
    """Edit any module a stage can load and DVC must see the stage as changed: each stage's code deps in dvc.yaml
    cover its script and every module it loads (pipeline stage scripts import only their own pipeline module)."""
    import yaml

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    problems = []
    for name, st in stages.items():
        script = next((w for w in st["cmd"].split() if w.startswith("stages/")), None)
        if script is None:
            continue
        deps = [d if isinstance(d, str) else next(iter(d)) for d in st.get("deps", [])]
        files = [ROOT / script] + [module_file(m) for m in sorted(loaded_modules(ROOT / script))]
        problems += [f"{name}: {f.relative_to(ROOT)}" for f in files if not covered(f, deps)]
    assert not problems, "modules a stage loads but does not depend on: " + ", ".join(problems)


def test_loaded_modules_follow_imports_by_hand() -> None:
    """The stage that builds MAGs loads mag.py (the module whose absence from the training deps started this)."""
    assert "magdi.mag" in loaded_modules(ROOT / "stages" / "train.py")
    assert "magdi.report.tables" in loaded_modules(ROOT / "stages" / "report.py")
    assert "magdi.pipeline.mags" not in loaded_modules(ROOT / "stages" / "train.py")
