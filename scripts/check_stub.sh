#!/usr/bin/env bash
# The binding's stub (kvtier/_engine.pyi) agrees with the built binding: every function and
# method, its parameters and defaults (the binding is compiled with binding=True so that
# they can be introspected). Run after the build; fails on any drift.
set -euo pipefail
cd "$(dirname "$0")/.."
MYPYPATH=. .venv/bin/python -m mypy.stubtest --mypy-config-file scripts/stubtest.ini \
    --allowlist scripts/stubtest-allowlist.txt kvtier._engine
