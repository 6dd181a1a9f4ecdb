#!/usr/bin/env python3
"""Runs the README's code blocks as a reader would, and fails on the first that does not run.

Every fenced ``python`` and ``sh`` block of README.md runs, in order, in one new empty
directory (state carries over from block to block, as it does for a reader working down the
page), with the checkout's ``.venv/bin`` first on PATH (as after ``source .venv/bin/activate``)
and ``HF_HUB_OFFLINE=1``. A block may be preceded by a directive comment, invisible on the
rendered page, whose effect the page itself states next to the block:

    <!-- readme-check: in-repo -->         run it in the checkout instead (the block is about it)
    <!-- readme-check: ci-runs-elsewhere --> skip: .ci/run runs this exact command as its own step
    <!-- readme-check: run: CMD -->         run CMD instead (a shortened form: fewer tokens, a
                                           smaller run; the text beside the block must say so)
    <!-- readme-check: timeout: SECONDS --> the block's time limit (default 600)

    python scripts/check_readme.py [README.md] [--keep DIR] [--only N,M] [--list]

Exit status 0 when every block ran, 1 otherwise (the failing block's output is printed).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^```(\w+)?\s*$")
DIRECTIVE = re.compile(r"<!--\s*readme-check:\s*(.*?)\s*-->")
LANGS = {"python": "python", "py": "python", "sh": "sh", "bash": "sh", "shell": "sh"}


def blocks(text: str) -> list[dict]:
    """The runnable fenced blocks: language, source, first line number, directives."""
    out, lines, i = [], text.splitlines(), 0
    pending: dict = {}
    while i < len(lines):
        d = DIRECTIVE.search(lines[i])
        if d:
            key, _, value = d.group(1).partition(":")
            pending[key.strip()] = value.strip() or True
            i += 1
            continue
        m = FENCE.match(lines[i])
        if not m:
            if lines[i].strip():
                pending = {} if not lines[i].lstrip().startswith("<!--") else pending
            i += 1
            continue
        lang, start, body = (m.group(1) or "").lower(), i + 1, []
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        i += 1
        if lang in LANGS:
            out.append({"lang": LANGS[lang], "source": "\n".join(body) + "\n", "line": start, **pending})
        pending = {}
    return out


def run(block: dict, cwd: Path, env: dict) -> tuple[int, str, float]:
    cmd = block.get("run")
    timeout = float(block.get("timeout", 600))
    t0 = time.perf_counter()
    if cmd:
        argv, stdin = ["bash", "-euo", "pipefail", "-c", cmd], None
    elif block["lang"] == "python":
        argv, stdin = [str(ROOT / ".venv" / "bin" / "python"), "-"], block["source"]
    else:
        argv, stdin = ["bash", "-euo", "pipefail", "-s"], block["source"]
    try:
        p = subprocess.run(argv, input=stdin, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stdout + p.stderr, time.perf_counter() - t0
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return 124, out + f"\n(timed out after {timeout:.0f} s)", time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("readme", nargs="?", default=str(ROOT / "README.md"))
    ap.add_argument("--keep", metavar="DIR", help="work in DIR (kept) instead of a temporary directory")
    ap.add_argument("--only", metavar="N,M", help="run only these blocks (1-based, as --list numbers them)")
    ap.add_argument("--list", action="store_true", help="list the blocks and what would run")
    args = ap.parse_args(argv)
    found = blocks(Path(args.readme).read_text())
    only = {int(x) for x in args.only.split(",")} if args.only else None
    if args.list:
        for n, b in enumerate(found, 1):
            how = ("skipped (.ci/run runs it)" if b.get("ci-runs-elsewhere") else
                   f"runs: {b['run']}" if b.get("run") else "runs as written")
            print(f"{n:2}. line {b['line']:4} {b['lang']:6} {'in the checkout' if b.get('in-repo') else 'in the empty dir'}: {how}")
        return 0
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="kvtier-readme-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PATH=f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
               VIRTUAL_ENV=str(ROOT / ".venv"), PYTHONUNBUFFERED="1")
    failed = 0
    try:
        for n, b in enumerate(found, 1):
            if only and n not in only:
                continue
            where = ROOT if b.get("in-repo") else work
            if b.get("ci-runs-elsewhere"):
                print(f"block {n} (line {b['line']}): skipped, .ci/run runs it as its own step", flush=True)
                continue
            rc, out, took = run(b, where, env)
            how = f"as {b['run']!r}" if b.get("run") else "as written"
            print(f"block {n} (line {b['line']}, {b['lang']}, {how}): {'ok' if rc == 0 else f'FAILED (exit {rc})'} "
                  f"in {took:.1f} s", flush=True)
            if rc:
                failed += 1
                print("---- its source:\n" + b["source"] + "---- its output (last 4000 characters):\n" + out[-4000:])
                break
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
