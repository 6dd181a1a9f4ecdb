"""Imports point one way: cli -> library -> engine, benchmarks -> library, adapters -> library.

Walks every module of kvtier/, adapters/ (installed as kvtier.adapters) and bench/, reads its
imports with ast (module level and inside functions alike: a late import is still a
dependency) and fails on any cycle, naming it.
"""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TREES = {"kvtier": "kvtier", "adapters": "kvtier.adapters", "bench": "bench"}


def _modules() -> dict:
    mods = {}
    for top, pkg in TREES.items():
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            rel = os.path.relpath(dirpath, os.path.join(ROOT, top))
            parts = [] if rel == "." else rel.split(os.sep)
            if "__pycache__" in parts:
                continue
            for f in files:
                if f.endswith(".py"):
                    name = f[:-3]
                    mod = ".".join([pkg] + parts + ([] if name == "__init__" else [name]))
                    mods[mod] = os.path.join(dirpath, f)
    return mods


def _graph(mods: dict) -> dict:
    known = set(mods) | {"kvtier._engine"}
    graph = {}
    for mod, path in mods.items():
        is_pkg = path.endswith("__init__.py")
        with open(path) as fh:
            tree = ast.parse(fh.read(), path)
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
            else:
                continue
            for n in names:
                while n and n not in known:  # a name inside a module: the module
                    n = n.rpartition(".")[0]
                if n and n != mod:
                    deps.add(n)
        graph[mod] = deps
    return graph


def _cycle(graph: dict):
    state = {}
    stack = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_the_walk_sees_the_known_edges():
    g = _graph(_modules())
    assert "kvtier._engine" in g["kvtier.store"]
    assert "kvtier.benchargs" in g["kvtier.cli"] and "kvtier.benchargs" in g["bench.suite"]
    assert "kvtier.store" in g["kvtier.adapters.torch.cache"] or "kvtier" in g["kvtier.adapters.torch.cache"]


def test_a_cycle_is_found():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = _cycle(_graph(_modules()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
