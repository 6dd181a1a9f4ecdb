#!/usr/bin/env bash
# kvtier as a user gets it: build the wheel, install it into a fresh venv outside the checkout
# and run `kvtier bench --help` and one quick bench (a small synthetic trace, no model, no torch)
# from a directory that is not the checkout. The wheel's dependencies (numpy, lmdb, matplotlib)
# are borrowed from .venv through a .pth path line, which adds those directories only (their
# own .pth files, the editable kvtier among them, are not read); kvtier itself must come from
# the wheel, which is checked.
set -euo pipefail
cd "$(dirname "$0")/.."
CHECKOUT=$(pwd -P)
VPY=$CHECKOUT/.venv/bin/python
TMP=$(mktemp -d)
[ -e build ] && KEEP_BUILD=1 || KEEP_BUILD=0  # the wheel build's scratch: removed unless it was there
trap 'rm -rf "$TMP"; [ "$KEEP_BUILD" = 1 ] || rm -rf "$CHECKOUT/build"' EXIT

"$VPY" -m pip wheel -q --no-deps -w "$TMP/dist" . >/dev/null  # build requirements as bootstrap gets them
"$VPY" -m venv --without-pip "$TMP/venv"
PY=$TMP/venv/bin/python
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$VPY" -m pip --python "$PY" install -q --no-deps --no-index "$TMP"/dist/kvtier-*.whl
"$VPY" -c 'import sys; print("\n".join(p for p in sys.path if p.endswith("site-packages")))' \
    > "$SITE/zz_borrowed_from_dev_venv.pth"

mkdir "$TMP/run" && cd "$TMP/run"
CHECKOUT=$CHECKOUT "$PY" -c '
import os, kvtier, kvtier.bench, kvtier._engine
where = os.path.realpath(kvtier.__file__)
assert not where.startswith(os.environ["CHECKOUT"] + os.sep), f"kvtier imported from the checkout: {where}"
print("installed kvtier", kvtier.__version__, "at", os.path.dirname(where))
from kvtier.bench import capture
assert capture.shipped_w1_tokens(0) is not None, "the W1 tokens of kvtier/bench/data are not in the wheel"'
"$TMP/venv/bin/kvtier" bench --help >/dev/null
"$PY" - <<'EOF'
# a W1 trace of the real one's shape (2 layers, 2 KV heads, 4 query heads, dim 32), random
import numpy as np
from pathlib import Path
from kvtier.bench.capture import Trace, save_trace, trace_path

rng = np.random.default_rng(0)
n = 128 + 64
half = lambda *shape: rng.standard_normal(shape).astype(np.float16)
trace = Trace(workload="W1", keys=half(2, 2, n, 32), values=half(2, 2, n, 32), queries=half(2, 4, n, 32),
              tokens=np.arange(n, dtype=np.int32), nll=np.ones(n - 1, np.float32), prefill=128,
              meta={"workload": "W1", "seed": 0, "model_file": "synthetic"})
save_trace(trace, trace_path("W1", 128, 64, 0, Path("traces")))
EOF
"$TMP/venv/bin/kvtier" bench --quick --out out --trace-dir traces --workloads W1 --policies static,adaptive \
    --layouts clustered --cache-policies lru --dram-budgets 1MiB --prefill 128 --decode 64 --layers 1 \
    --no-calibrate
"$PY" -c 'import json; d = json.load(open("out/bench.json")); assert d["replays"]["grid"] and not d["stage_errors"], d["stage_errors"]'
echo "installed package: kvtier bench --help and a quick bench ran outside the checkout"
