#!/usr/bin/env python3
"""The C engine's shape, checked: run by CI (.ci/run through `make -C engine_c check`) and by
tests/test_imports.py.

1. Size: no function in engine_c/src longer than MAX_FUNCTION lines (signature to closing
   brace), no file longer than MAX_FILE lines.
2. Layers: the engine's own headers include each other without a cycle; every .c file
   includes the header named after it, if there is one; and the files of the collection
   layer depend on each other one way (a.c includes b.h: a.c -> b.c), without a cycle, as
   engine_c/README.md draws them (`--map` prints the arrows).
3. Policies: the policy switch is in one place, the table (policy.c: no other file names a
   value of enum kvt_policy), and each policy's state (the structs of policy.h, embedded in
   store.h's kvt_coll and kvt_cluster, see POLICY_STATE) is touched only by the policy's own
   file; everyone else goes through the table's hooks (c->ops).

    python scripts/check_engine.py            # prints what is wrong, exit status 1 if anything
    python scripts/check_engine.py --map      # the dependency arrows of engine_c/README.md
"""
from __future__ import annotations

import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "engine_c", "src")
MAX_FUNCTION = 80
MAX_FILE = 700

#: A policy's state: the member through which its struct is reached (``c->adapt``,
#: ``k->ad`` ...) and the file that may touch it.
POLICY_STATE: dict[str, tuple[str, ...]] = {
    "adapt": ("adapt.c",),  # kvt_coll.adapt: the split threshold
    "ad": ("adapt.c",),     # kvt_cluster.ad: flagged for a split, and why; the hold size
    "local": ("local.c",),  # kvt_coll.local: the staging cluster
    "exact": ("token.c",),  # kvt_coll.exact: policy none's resident keys
}
#: The file that turns a policy number into its behaviour.
POLICY_TABLE = "policy.c"


def strip_c(text: str) -> str:
    """Comments and string/char literals blanked, line breaks kept (so line numbers hold)."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif c in "\"'":
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            out.append(c + re.sub(r"[^\n]", " ", text[i + 1:j]) + c)
            i = j + 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def functions(text: str) -> list[tuple[str, int, int]]:
    """(name, first line, last line) of every function definition in C source `text`."""
    s = strip_c(text)
    s = re.sub(r"^[ \t]*#.*(\\\n.*)*$", lambda m: re.sub(r"[^\n]", " ", m.group(0)), s, flags=re.M)
    found = []
    depth = 0
    head_start = 0  # where the text before the current top-level brace starts
    i = 0
    while i < len(s):
        ch = s[i]
        if ch == "{":
            if depth == 0:
                head = s[head_start:i]
                m = re.search(r"(\w+)\s*\([^;{}]*\)\s*$", head)
                is_func = m and not re.search(r"\b(struct|union|enum|typedef)\b[^(]*$", head.split("(")[0]) \
                    and "=" not in head.split("(")[0]
                if is_func:
                    start = head_start + len(head) - len(head.lstrip())
                    found.append([m.group(1), s.count("\n", 0, start) + 1, None, i])
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                if found and found[-1][2] is None:
                    found[-1][2] = s.count("\n", 0, i) + 1
                head_start = i + 1
        elif ch == ";" and depth == 0:
            head_start = i + 1
        i += 1
    return [(name, a, b) for name, a, b, _ in found if b is not None]


def check_sizes(src: str = SRC) -> list[str]:
    bad = []
    for f in sorted(os.listdir(src)):
        if not f.endswith((".c", ".h")):
            continue
        with open(os.path.join(src, f)) as fh:
            text = fh.read()
        lines = text.count("\n")
        if lines > MAX_FILE:
            bad.append(f"{f}: {lines} lines (at most {MAX_FILE})")
        for name, a, b in functions(text):
            if b - a + 1 > MAX_FUNCTION:
                bad.append(f"{f}:{a}: {name} is {b - a + 1} lines (at most {MAX_FUNCTION})")
    return bad


def include_graph(src: str = SRC) -> dict[str, set[str]]:
    """file -> the engine headers it includes (quoted includes that exist in src)."""
    g = {}
    for f in sorted(os.listdir(src)):
        if f.endswith((".c", ".h")):
            with open(os.path.join(src, f)) as fh:
                inc = re.findall(r'^#include "([\w.]+)"', fh.read(), flags=re.M)
            g[f] = {h for h in inc if os.path.exists(os.path.join(src, h))}
    return g


#: Headers beneath the collection layer (and its shared structures, store.h): the arrows
#: between the layer's files leave them out.
BENEATH = {"common.h", "io.h", "pool.h", "mem.h", "cache.h", "cluster.h", "simd.h", "store.h", "policy.h"}


def file_graph(src: str = SRC) -> dict[str, set[str]]:
    """a.c -> the .c files whose headers it includes, for the files of the collection layer
    (those that include store.h); beneath-layer headers are left out."""
    g = include_graph(src)
    out = {f: {h[:-2] + ".c" for h in g[f] if h not in BENEATH and h != f[:-2] + ".h"}
           for f in g if f.endswith(".c") and "store.h" in g[f]}
    # the policy table sits above the policies whose hooks it holds (policy.h: the upcalls)
    out[POLICY_TABLE] = set()
    for f in g:
        if f.endswith(".c") and f != POLICY_TABLE:
            with open(os.path.join(src, f)) as fh:
                if re.search(r"^const kvt_policy_ops kvt_policy_\w+ =", fh.read(), flags=re.M):
                    out[POLICY_TABLE].add(f)
    return out


def dependency_map(src: str = SRC) -> str:
    """The arrows, callers first (a file before every file it depends on)."""
    g = file_graph(src)
    order: list[str] = []
    seen: set[str] = set()

    def visit(n: str) -> None:
        if n in seen:
            return
        seen.add(n)
        for m in sorted(g.get(n, ())):
            visit(m)
        order.append(n)

    for n in sorted(g):
        visit(n)
    order.reverse()
    w = max(len(f) for f in order)
    return "\n".join(f"    {f:<{w}} → " + (", ".join(sorted(g[f])) or "(beneath only)") for f in order)


def _cycles(g: dict[str, set[str]], what: str) -> list[str]:
    bad = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if state.get(m) == 1:
                bad.append("cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
            elif not state.get(m):
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(g):
        if not state.get(n):
            visit(n)
    return [b.replace("cycle", what + " cycle", 1) for b in bad]


def check_layers(src: str = SRC) -> list[str]:
    g = include_graph(src)
    bad = _cycles({h: d for h, d in g.items() if h.endswith(".h")}, "include")
    bad += _cycles(file_graph(src), "dependency")
    for f in sorted(g):
        own = f[:-2] + ".h"
        if f.endswith(".c") and own in g and own not in g[f]:
            bad.append(f"{f} does not include its own header {own}")
    return bad


def check_policy_state(src: str = SRC) -> list[str]:
    bad = []
    switch = re.compile(r"\bKVT_POLICY_(STATIC|ADAPTIVE|LOCAL|NONE)\b")
    for f in sorted(os.listdir(src)):
        if f.endswith((".c", ".h")) and f != POLICY_TABLE:
            with open(os.path.join(src, f)) as fh:
                s = strip_c(fh.read())
            for ln, line in enumerate(s.split("\n"), 1):
                if switch.search(line):
                    bad.append(f"{f}:{ln}: names a policy ({switch.search(line).group(0)}): only {POLICY_TABLE}, the table, may")
    for member, owners in POLICY_STATE.items():
        rx = re.compile(r"(->|\.)" + re.escape(member) + r"\b")
        for f in sorted(os.listdir(src)):
            if not f.endswith((".c", ".h")) or f in owners:
                continue
            with open(os.path.join(src, f)) as fh:
                s = strip_c(fh.read())
            for ln, line in enumerate(s.split("\n"), 1):
                if rx.search(line):
                    bad.append(f"{f}:{ln}: touches policy state '{member}' (owned by {', '.join(owners)})")
    return bad


def main() -> int:
    if "--map" in sys.argv[1:]:
        print(dependency_map())
        return 0
    problems = check_sizes() + check_layers() + check_policy_state()
    for p in problems:
        print(p)
    if not problems:
        print(f"engine shape ok: functions <= {MAX_FUNCTION} lines, files <= {MAX_FILE}, headers and files "
              f"acyclic, the policy switch only in {POLICY_TABLE}, each policy's state ({len(POLICY_STATE)}) "
              "in its own file")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
