"""The package's shape: folders that show its layers, imports that only go down, a public API,
no import cycle, torch-free schedule tools, no file over 450 lines.

The layers, bottom up, and what each may import (besides itself):

    core    the schedule as data                      nothing: no torch, no DeepSpeed
    models  the models as layer lists                 core
    ring    the update rules, the Reference           core, models (no DeepSpeed)
    pipe    the DeepSpeed glue                        core, models, ring
    train   the training application                  every library layer
    tools   benchmark, speed map, one-GPU check       everything

The import graph is read from the source (every ``import`` statement, function-local ones
included), so an import hidden inside a function body counts too.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys

import ouroboros_ds

PKG = os.path.dirname(os.path.abspath(ouroboros_ds.__file__))
LAYERS = ["core", "models", "ring", "pipe", "train", "tools"]
MAY_IMPORT = {"core": set(), "models": {"core"}, "ring": {"core", "models"}, "pipe": {"core", "models", "ring"},
              "train": {"core", "models", "ring", "pipe"}, "tools": {"core", "models", "ring", "pipe", "train"}}
MODULES = sorted(f"{d}.{f[:-3]}" for d in LAYERS for f in os.listdir(os.path.join(PKG, d))
                 if f.endswith(".py") and f != "__init__.py")
MAX_LINES = 450


def _resolve(folder: str, level: int, module: str | None, name: str | None) -> str | None:
    """The ``layer.module`` an import names, or None outside the package's modules."""
    if level == 0:
        parts = (module or "").split(".")
        if parts[0] != "ouroboros_ds":
            return None
        parts = parts[1:] + ([name] if name else [])
    else:
        base = [folder] if level == 1 else []
        parts = base + (module.split(".") if module else []) + ([name] if name else [])
    dotted = ".".join(parts[:2])
    return dotted if dotted in MODULES else None


def _imports(mod: str) -> set[str]:
    """The package modules that ``ouroboros_ds.<mod>`` imports, anywhere in its source."""
    folder = mod.split(".")[0]
    tree = ast.parse(open(os.path.join(PKG, *mod.split(".")) + ".py").read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for a in node.names:
                hit = _resolve(folder, node.level, node.module, a.name) or _resolve(folder, node.level, node.module, None)
                if hit:
                    out.add(hit)
        elif isinstance(node, ast.Import):
            for a in node.names:
                hit = _resolve(folder, 0, a.name, None)
                if hit:
                    out.add(hit)
    return out - {mod}


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
    assert graph["pipe.engine"] >= {"pipe.p2p", "pipe.checkpoint", "pipe.instructions"}, "the import reader misses imports"
    assert "core.schedule" in graph["ring.reference"], "the import reader misses cross-folder imports"
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


def test_top_level_holds_only_the_layers():
    entries = sorted(e for e in os.listdir(PKG) if not e.startswith(("__pycache__", ".")))
    assert entries == sorted(["__init__.py", *LAYERS]), entries
    for layer in LAYERS:
        doc = ast.get_docstring(ast.parse(open(os.path.join(PKG, layer, "__init__.py")).read()))
        assert doc and "import" in doc.lower(), f"{layer}/__init__.py: a docstring that says what the layer may import"


def test_imports_only_go_down_the_layers():
    bad = []
    for m in MODULES:
        layer = m.split(".")[0]
        for dep in sorted(_imports(m)):
            if dep.split(".")[0] not in MAY_IMPORT[layer] | {layer}:
                bad.append(f"ouroboros_ds.{m} imports ouroboros_ds.{dep}")
    assert not bad, "\n".join(bad)


def test_layers_below_deepspeed_do_not_import_it():
    """The schedule core imports neither torch nor DeepSpeed; the models and the ring's update rules
    (the Reference among them) run without DeepSpeed."""
    core = ", ".join(f"ouroboros_ds.{m}" for m in MODULES if m.startswith("core."))
    code = (f"import sys, ouroboros_ds, {core}; "
            "print(sorted(m for m in ('torch', 'deepspeed', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    lower = ", ".join(f"ouroboros_ds.{m}" for m in MODULES if m.split(".")[0] in ("models", "ring"))
    code = f"import sys, {lower}; print('deepspeed' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"


def test_no_file_over_the_line_limit():
    long = {m: n for m in MODULES if (n := len(open(os.path.join(PKG, *m.split(".")) + ".py").readlines())) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines: {long}"


def test_schedule_functions_are_functions_whatever_the_import_order():
    code = ("import ouroboros_ds.core.simulate, ouroboros_ds.core.validate, ouroboros_ds as od; "
            "print(callable(od.simulate) and callable(od.validate) and od.simulate.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "ouroboros_ds.core.simulate"


def test_public_api():
    for name in ouroboros_ds.__all__:
        assert getattr(ouroboros_ds, name) is not None, name
    assert ouroboros_ds.initialize.__module__ == "ouroboros_ds.pipe.launch"
    assert ouroboros_ds.OuroborosEngine.__module__ == "ouroboros_ds.pipe.engine"
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
