#!/usr/bin/env python3
"""The statistics part of the binding's type stub (kvtier/_engine.pyi), generated from the
engine's tables in engine_c/include/kvtier.h (KVT_STORE_STATS, KVT_COLL_STATS), where each
counter is written once: one TypedDict per stats dict (and per nested dict: "a.b" keys).

    python scripts/gen_engine_stub.py           # rewrites the generated block of the stub
    python scripts/gen_engine_stub.py --check   # exit status 1 if the stub is out of date

tests/test_api.py checks that the stub is current and that the binding's dicts carry exactly
the tables' keys; the binding builds the same TypedDicts at import (kvtier._engine).
"""
from __future__ import annotations

import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = os.path.join(ROOT, "engine_c", "include", "kvtier.h")
STUB = os.path.join(ROOT, "kvtier", "_engine.pyi")
BEGIN = "# ---- generated from engine_c/include/kvtier.h by scripts/gen_engine_stub.py: do not edit ----\n"
END = "# ---- end of generated code ----\n"
TABLES = {"StoreStats": "KVT_STORE_STATS", "CollStats": "KVT_COLL_STATS"}
ENTRY = re.compile(r'X\((\w+),\s*(\w+),\s*(\w+),\s*"([\w.]*)",\s*"([\w.]*)"\)')


def table(macro: str, path: str = HEADER) -> list[tuple[str, str, str, str, str]]:
    """(ctype, field, kind, key, also) of each X of the table `macro`, in order."""
    with open(path) as fh:
        text = fh.read()
    start = text.index(f"#define {macro}(X)")
    body = []
    for line in text[start:].split("\n"):
        body.append(line)
        if not line.rstrip().endswith("\\"):
            break
    text = re.sub(r"/\*.*?\*/", " ", "\n".join(body), flags=re.S)
    return ENTRY.findall(text)


def keys(macro: str, path: str = HEADER) -> list[str]:
    """The keys of the binding's dict for table `macro` ("a.b": key b of nested dict a)."""
    return [k for _, _, kind, key, also in table(macro, path) if kind != "HIDDEN" for k in (key, also) if k]


def py_type(ctype: str, kind: str) -> str:
    if kind == "LIST":
        return "list[float]" if ctype.startswith("F64") else "list[int]"
    return {"INT": "int", "FLOAT": "float", "BOOL": "bool", "STR": "str"}[kind]


def typed_dicts(path: str = HEADER) -> dict[str, dict[str, str]]:
    """TypedDict name -> {key: type}, nested dicts first (class names in CamelCase)."""
    out: dict[str, dict[str, str]] = {}
    for name, macro in TABLES.items():
        top: dict[str, str] = {}
        for ctype, _, kind, key, also in table(macro, path):
            for k in (key, also):
                if not k or kind == "HIDDEN":
                    continue
                group, _, leaf = k.rpartition(".")
                if group:
                    cls = "".join(w.capitalize() for w in group.split("_"))
                    out.setdefault(cls, {})[leaf] = py_type(ctype, kind)
                    top.setdefault(group, cls)
                else:
                    top[leaf] = py_type(ctype, kind)
        out[name] = top
    return out


def stub_block(path: str = HEADER) -> str:
    lines = [BEGIN]
    for cls, fields in typed_dicts(path).items():
        lines.append(f"\nclass {cls}(TypedDict):\n")
        lines += [f"    {k}: {t}\n" for k, t in fields.items()]
    lines.append("\n" + END)
    return "".join(lines)


def main(argv: list[str]) -> int:
    with open(STUB) as fh:
        stub = fh.read()
    a, b = stub.index(BEGIN), stub.index(END) + len(END)
    new = stub[:a] + stub_block() + stub[b:]
    if "--check" in argv:
        if new != stub:
            print(f"{os.path.relpath(STUB, ROOT)} is out of date: run python scripts/gen_engine_stub.py")
            return 1
        return 0
    if new != stub:
        with open(STUB, "w") as fh:
            fh.write(new)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
