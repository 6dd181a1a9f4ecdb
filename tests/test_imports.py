"""Imports point one way: cli -> library -> engine, benchmarks -> library, adapters -> library.

Walks every module of kvtier/, adapters/ (installed as kvtier.adapters) and bench/, reads its
imports with ast (module level and inside functions alike: a late import is still a
dependency; so is ``importlib.import_module("name")``) and fails on any cycle, naming it; and
checks the layers: nothing in the installed package imports the source tree's bench/ scripts,
and nothing but the command line imports the command line.
"""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TREES = {"kvtier": "kvtier", "adapters": "kvtier.adapters", "bench": "bench"}


def _modules(root: str = ROOT) -> dict:
    mods = {}
    for top, pkg in TREES.items():
        for dirpath, _, files in os.walk(os.path.join(root, top)):
            rel = os.path.relpath(dirpath, os.path.join(root, top))
            parts = [] if rel == "." else rel.split(os.sep)
            if "__pycache__" in parts:
                continue
            for f in files:
                if f.endswith(".py"):
                    name = f[:-3]
                    mod = ".".join([pkg] + parts + ([] if name == "__init__" else [name]))
                    mods[mod] = os.path.join(dirpath, f)
    return mods


def _is_import_module_call(node) -> bool:
    """``importlib.import_module("a.b")`` or ``import_module("a.b")`` with a literal name."""
    if not (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)):
        return False
    f = node.func
    return (isinstance(f, ast.Attribute) and f.attr == "import_module") or \
        (isinstance(f, ast.Name) and f.id == "import_module")


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
            elif _is_import_module_call(node):
                names = [node.args[0].value]
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


def _all_cycles(graph: dict) -> list:
    """One cycle per group of modules that import each other (a strongly connected component)."""
    reach = {}
    for n in graph:
        seen, todo = set(), [n]
        while todo:
            for m in graph.get(todo.pop(), ()):
                if m not in seen:
                    seen.add(m)
                    todo.append(m)
        reach[n] = seen
    groups = {frozenset(m for m in reach[n] if n in reach.get(m, ())) for n in graph if n in reach[n]}
    return sorted(_cycle({n: graph[n] & g for n in g}) for g in groups)


def test_the_walk_sees_the_known_edges():
    g = _graph(_modules())
    assert "kvtier._engine" in g["kvtier.store"]
    assert "kvtier.benchargs" in g["kvtier.cli"] and "kvtier.benchargs" in g["kvtier.bench.suite"]
    assert "kvtier.store" in g["kvtier.adapters.torch.cache"] or "kvtier" in g["kvtier.adapters.torch.cache"]


def test_a_cycle_is_found():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    two = {"a": {"b"}, "b": {"a", "c"}, "c": {"d"}, "d": {"c"}, "e": {"a"}}
    assert _all_cycles(two) == [["a", "b", "a"], ["c", "d", "c"]]


def test_no_import_cycle():
    cycles = _all_cycles(_graph(_modules()))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_layers_point_one_way():
    g = _graph(_modules())
    for mod, deps in g.items():
        if mod.startswith("kvtier."):  # the installed package, adapters included
            assert not {d for d in deps if d == "bench" or d.startswith("bench.")}, \
                f"{mod} imports the source tree's bench/: {sorted(deps)}"
        if mod != "kvtier.cli":
            assert "kvtier.cli" not in deps, f"{mod} imports the command line"


def test_a_late_import_by_name_is_an_edge(tmp_path):
    """A function-level import and ``importlib.import_module("...")`` count like top-level ones."""
    pkg = tmp_path / "kvtier"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from kvtier import b\n")
    (pkg / "b.py").write_text("import importlib\ndef g():\n    return importlib.import_module('kvtier.a')\n")
    assert _cycle(_graph(_modules(str(tmp_path)))) == ["kvtier.a", "kvtier.b", "kvtier.a"]


# ---- the C engine: the same one-way rule, and its size and policy rules (scripts/check_engine.py)

def _check_engine():
    import importlib.util
    spec = importlib.util.spec_from_file_location("check_engine", os.path.join(ROOT, "scripts", "check_engine.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_engine_functions_and_files_are_short():
    problems = _check_engine().check_sizes()
    assert not problems, "\n".join(problems)


def test_engine_layers_point_one_way():
    problems = _check_engine().check_layers()
    assert not problems, "\n".join(problems)


def test_engine_policy_switch_and_state_stay_in_their_files():
    problems = _check_engine().check_policy_state()
    assert not problems, "\n".join(problems)


def test_the_engine_map_in_the_readme_is_the_includes():
    ce = _check_engine()
    with open(os.path.join(ROOT, "engine_c", "README.md")) as fh:
        readme = fh.read()
    assert ce.dependency_map() in readme, "engine_c/README.md's arrows differ from `python scripts/check_engine.py --map`"


def test_the_engine_checks_can_fail(tmp_path):
    """Each rule finds a planted violation: a long function, a policy named outside the table,
    a policy's state touched from another file, a cycle between two files."""
    ce = _check_engine()
    long_fn = "int f(void) {\n" + "    x++;\n" * (ce.MAX_FUNCTION - 1) + "}\n"  # one line too long
    (tmp_path / "store.h").write_text("")
    (tmp_path / "a.h").write_text('#include "b.h"\n')
    (tmp_path / "b.h").write_text('#include "a.h"\n')
    (tmp_path / "a.c").write_text('#include "a.h"\n#include "store.h"\n' + long_fn
                                  + "int g(kvt_coll *c) { return c->p.policy == KVT_POLICY_NONE; }\n"
                                  + "int h(kvt_coll *c) { return c->adapt.tau > 0; }\n")
    assert any("f is 81 lines" in p for p in ce.check_sizes(str(tmp_path)))
    assert any("include cycle" in p for p in ce.check_layers(str(tmp_path)))
    found = ce.check_policy_state(str(tmp_path))
    assert any("KVT_POLICY_NONE" in p for p in found) and any("'adapt'" in p for p in found)
