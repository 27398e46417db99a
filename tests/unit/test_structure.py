"""The package's shape: a public API, no import cycle, torch-free schedule tools.

The import graph is read from the source (every ``import`` statement, function-local ones
included), so a cycle hidden inside a function body counts too.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys

import ouroboros_ds

PKG = os.path.dirname(os.path.abspath(ouroboros_ds.__file__))
MODULES = sorted(f[:-3] for f in os.listdir(PKG) if f.endswith(".py") and f != "__init__.py")


def _imports(name: str) -> set[str]:
    """The package modules that ``ouroboros_ds.<name>`` imports, anywhere in its source."""
    tree = ast.parse(open(os.path.join(PKG, f"{name}.py")).read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:  # from .x import y
                out.add(node.module.split(".")[0])
            elif node.level == 1:  # from . import x, y
                out.update(a.name for a in node.names)
            elif node.module and node.module.startswith("ouroboros_ds."):
                out.add(node.module.split(".")[1])
            elif node.module == "ouroboros_ds":
                out.update(a.name for a in node.names if a.name in MODULES)
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("ouroboros_ds."))
    return out & set(MODULES)


def _cycle(graph: dict) -> list | None:
    """One import cycle of ``graph`` (a path that ends where it starts), or None."""
    state: dict = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_cycle_finder_is_not_blind():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_inside_the_package():
    graph = {m: _imports(m) for m in MODULES}
    assert graph["engine"] >= {"p2p", "checkpoint", "instructions"}, "the import reader misses imports"
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


def test_schedule_tools_do_not_import_torch():
    """The schedule, its validator and its simulator are plain Python: importing the package and
    them must not pull torch or DeepSpeed in (the public names are imported on first use)."""
    code = ("import sys, ouroboros_ds, ouroboros_ds.schedule, ouroboros_ds.validate, ouroboros_ds.simulate; "
            "print(sorted(m for m in ('torch', 'deepspeed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_public_api():
    for name in ouroboros_ds.__all__:
        assert getattr(ouroboros_ds, name) is not None, name
    assert ouroboros_ds.initialize.__module__ == "ouroboros_ds.launch"
    assert ouroboros_ds.OuroborosEngine.__module__ == "ouroboros_ds.engine"
    try:
        ouroboros_ds.no_such_name
    except AttributeError as e:
        assert "no_such_name" in str(e)
    else:
        raise AssertionError("unknown names must raise AttributeError")


def test_test_files_have_unique_names():
    """The tiers have no __init__.py, so pytest imports test files by basename: two files with one
    name in different tiers stop the whole collection ("import file mismatch")."""
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    seen: dict = {}
    for folder, _, files in os.walk(tests):
        for name in files:
            if name.startswith("test_") and name.endswith(".py"):
                seen.setdefault(name, []).append(os.path.relpath(os.path.join(folder, name), tests))
    assert not {n: p for n, p in seen.items() if len(p) > 1}
