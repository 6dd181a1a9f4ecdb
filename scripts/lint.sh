#!/usr/bin/env bash
# The static checks CI runs (.ci/run), in one command: ruff and mypy over the Python package
# (configured in pyproject.toml: ruff and mypy over kvtier/ and adapters/), then the
# C engine's checks (make -C engine_c -j2 check: the clang-format layout, clang-tidy, the engine's
# shape).
# Fails on the first check that finds anything.
#
#   scripts/lint.sh        everything
#   PYTHON=...             the interpreter with ruff and mypy (default: .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
echo "== ruff check kvtier adapters"
"$PY" -m ruff check kvtier adapters
echo "== mypy (kvtier/ adapters/)"
"$PY" -m mypy
echo "== make -C engine_c check"
make -C engine_c -j2 check
