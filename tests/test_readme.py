"""The README as a new user meets it: its first block holds the two first commands, every
fenced code block is either run as written by scripts/check_readme.py or carries a directive
the page explains, and the blocks that run as written (the store API, damage, the LLM blocks,
the command line) do run, in order, in an empty directory. The shortened forms (bootstrap +
a short demo, the quick benchmark) run in CI's own step (`.ci/run` calls check_readme.py on
every block); here they would take minutes."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def _checker():
    spec = importlib.util.spec_from_file_location("check_readme", ROOT / "scripts" / "check_readme.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_first_block_is_the_two_first_commands():
    first = _checker().blocks(README.read_text())[0]
    lines = [l for l in first["source"].splitlines() if l.strip()]
    assert lines[0].startswith("./scripts/bootstrap.sh && .venv/bin/kvtier demo")
    assert lines[1].startswith("./scripts/bootstrap.sh && .venv/bin/python -m pytest -q tests")
    # its shortened form in CI still bootstraps and runs the demo
    assert first["run"].startswith("./scripts/bootstrap.sh && .venv/bin/kvtier demo")


def test_every_fenced_block_is_checked():
    """A block in a language the checker does not run (or without a language) would escape
    the check: every fence on the page is python or sh."""
    text = README.read_text()
    fences = [l.strip() for l in text.splitlines() if l.startswith("```") and l.strip() != "```"]
    found = _checker().blocks(text)
    assert len(fences) == len(found), f"fences {fences}, checked {len(found)}"
    for b in found:
        if b.get("run"):  # a shortened form: the page must say so next to the block
            assert "ci-runs-elsewhere" not in b


def test_the_blocks_that_run_as_written_run(tmp_path):
    mod = _checker()
    found = mod.blocks(README.read_text())
    as_written = [str(n) for n, b in enumerate(found, 1) if not b.get("run") and not b.get("ci-runs-elsewhere")]
    assert len(as_written) >= 4
    if not (ROOT / ".venv" / "bin" / "python").exists():
        pytest.skip("the README's blocks run with the checkout's .venv (scripts/bootstrap.sh makes it)")
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_readme.py"), "--only", ",".join(as_written),
                        "--keep", str(tmp_path / "work")], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count(": ok in ") == len(as_written), p.stdout
