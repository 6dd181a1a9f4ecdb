"""Retrieval reads on this machine's disk with O_DIRECT, against what ``kvtier.calibrate``
measures at the same request sizes.

1. ``kvtier.calibrate(DIR)``: random O_DIRECT reads of 4 KiB .. 256 KiB at queue depths 1
   and 32 (median of runs), on the device holding DIR.
2. A store in DIR (direct_io=True, no device model, so nothing is throttled) holds a
   captured trace's keys and values (kvtier.bench.capture; 10 layers x 3 KV heads of SmolLM2,
   adaptive policy, co-located layout), written and synced first, then reopened with a
   small DRAM budget so retrieves read from the disk.
3. Each decoding step's query groups retrieve 10% of the context. A retrieve's merged runs
   are issued together (io_uring where the kernel allows it: ``stats()["io_backend"]``).
   The engine measures the wall time of its read calls by request-size bucket.
4. For each bucket: retrieval bandwidth (bytes / seconds in the read calls) beside the
   calibrated bandwidth at the bucket's mean request size (log-interpolated between the
   calibrated sizes), at queue depth 1 and 32. Overall: retrieval's bytes / seconds against
   the time the calibrated curve would take for the same reads.

Real timings on a shared machine are noisy: the retrieval pass is repeated and the median of
the per-pass figures is reported.

    python -m kvtier.bench.flash_real --out bench/results [--dir DIR] [--workload W1] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import itertools

import numpy as np

import kvtier
from kvtier.bench.capture import load_trace
from kvtier.bench.tables import md_table
from kvtier.benchargs import show_defaults

SIZES = tuple(4096 << i for i in range(7))  # 4 KiB .. 256 KiB: where retrieval reads fall


def _without_paths(o):
    """The calibration record without the measured directory: no machine's paths in results."""
    if isinstance(o, dict):
        return {k: _without_paths(v) for k, v in o.items() if k != "path"}
    if isinstance(o, list):
        return [_without_paths(v) for v in o]
    return o


def cal_bw(cal, size: float, qd: int) -> float:
    """Calibrated bandwidth at a request size, log-log interpolated (clamped at the ends)."""
    pts = sorted((p.size, p.bandwidth_Bps) for p in cal.points if p.queue_depth == qd)
    if size <= pts[0][0]:
        return pts[0][1]
    for (s0, b0), (s1, b1) in itertools.pairwise(pts):
        if size <= s1:
            f = (math.log(size) - math.log(s0)) / (math.log(s1) - math.log(s0))
            return math.exp(math.log(b0) + f * (math.log(b1) - math.log(b0)))
    return pts[-1][1]


def build(trace, path, layers, policy, layout):
    with kvtier.open(path, dram_budget="256MiB", direct_io=True) as s:
        for layer in layers:
            for h in range(trace.n_kv_heads):
                c = s.collection(f"L{layer}.H{h}", dim=trace.head_dim, value_dim=trace.head_dim,
                                 dtype="float16", policy=policy, layout=layout)
                P = trace.prefill
                c.add(trace.keys[layer, h, :P], trace.values[layer, h, :P])
                for t in range(P, trace.length, 16):  # decoding appends, a few at a time
                    c.add(trace.keys[layer, h, t:t + 16], trace.values[layer, h, t:t + 16])


def retrieval_pass(trace, path, layers, dram, steps, backend):
    # the engine picks its read backend when a store opens; KVTIER_IO_URING=0 asks for pread
    if backend == "pread":
        os.environ["KVTIER_IO_URING"] = "0"
    else:
        os.environ.pop("KVTIER_IO_URING", None)
    with kvtier.open(path, dram_budget=dram, direct_io=True) as s:
        colls = {(layer, h): s.collection(f"L{layer}.H{h}") for layer in layers for h in range(trace.n_kv_heads)}
        g = trace.group_size
        s.reset_io_stats()
        t0 = time.perf_counter()
        for t in steps:
            for (layer, h), c in colls.items():
                c.retrieve(trace.queries[layer, h * g:(h + 1) * g, t].astype(np.float32), budget=0.1)
        wall = time.perf_counter() - t0
        st = s.stats()
    return st, wall


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default=None, help="a directory on the disk to measure (default: a temporary one)")
    ap.add_argument("--workload", default="W1")
    ap.add_argument("--layers", default="0,3,6,9,12,15,18,21,24,27")
    ap.add_argument("--policy", default="adaptive")
    ap.add_argument("--layout", default="colocated")
    ap.add_argument("--dram-budget", default="4MiB")
    ap.add_argument("--steps", type=int, default=64, help="decoding steps whose queries retrieve")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backends", default="io_uring,pread",
                    help="read backends to compare (the first is the one reported per bucket)")
    ap.add_argument("--out", default=None)
    a = show_defaults(ap).parse_args(argv)
    layers = [int(x) for x in a.layers.split(",")]
    trace = load_trace(a.workload, prefill=512, decode=2048)
    root = a.dir or tempfile.mkdtemp(prefix="kvtier-flash-real-")
    os.makedirs(root, exist_ok=True)
    try:
        print("calibrating (O_DIRECT random reads, QD1 and QD32) ...", flush=True)
        cal = kvtier.calibrate(root, sizes=SIZES)
        print(cal.table(), flush=True)
        store = os.path.join(root, "store")
        shutil.rmtree(store, ignore_errors=True)
        build(trace, store, layers, a.policy, a.layout)
        steps = list(np.linspace(trace.prefill + 64, trace.length - 1, a.steps).astype(int))
        by_backend: dict[str, list] = {}
        for r in range(a.repeats):
            for be in a.backends.split(","):
                st, wall = retrieval_pass(trace, store, layers, a.dram_budget, steps, be)
                by_backend.setdefault(be, []).append((st, wall))
                mbps = st["read_bytes"] / max(st["read_seconds"], 1e-12) / 1e6
                print(f"pass {r + 1}: asked {be}, backend {st['io_backend']}, direct {st['direct_io']}, "
                      f"{st['read_ops']} reads, {st['read_bytes'] / 2**20:.1f} MiB in {st['read_seconds']:.3f} s "
                      f"of read calls ({mbps:.0f} MB/s), wall {wall:.2f} s", flush=True)
    finally:
        os.environ.pop("KVTIER_IO_URING", None)
        if a.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    passes = by_backend[a.backends.split(",")[0]]
    # per bucket: medians over passes
    rows = []
    for b in range(24):
        if not passes[0][0]["read_size_histogram"][b]:
            continue
        n = passes[0][0]["read_size_histogram"][b]
        nbytes = passes[0][0]["read_size_bytes"][b]
        mean_size = nbytes / n
        bw = statistics.median(p[0]["read_size_bytes"][b] / max(p[0]["read_size_seconds"][b], 1e-12) for p in passes)
        c1, c32 = cal_bw(cal, mean_size, 1), cal_bw(cal, mean_size, 32)
        rows.append({"bucket_min_bytes": 512 << b if b else 0, "reads": n, "bytes": nbytes, "mean_request": mean_size,
                     "retrieval_Bps": bw, "calibrated_qd1_Bps": c1, "calibrated_qd32_Bps": c32,
                     "vs_qd1": bw / c1, "vs_qd32": bw / c32})
    # overall: the calibrated curve's time for the same reads
    totals = []
    for st, _ in passes:
        secs_q1 = secs_q32 = 0.0
        for b in range(24):
            n, nb = st["read_size_histogram"][b], st["read_size_bytes"][b]
            if n:
                secs_q1 += nb / cal_bw(cal, nb / n, 1)
                secs_q32 += nb / cal_bw(cal, nb / n, 32)
        real = st["read_bytes"] / max(st["read_seconds"], 1e-12)
        totals.append((real, st["read_bytes"] / secs_q1, st["read_bytes"] / secs_q32))
    real, q1, q32 = (statistics.median(x[i] for x in totals) for i in range(3))
    st0 = passes[0][0]
    batches = len(steps) * len(layers) * trace.n_kv_heads
    md = (f"Backend `{st0['io_backend']}`, O_DIRECT {st0['direct_io']}, {st0['read_ops']} reads per pass "
          f"({st0['read_ops'] / batches:.1f} per retrieve, {st0['mean_read_entries']:.1f} entries each); "
          f"medians of {a.repeats} passes.\n\n")
    md += md_table(["request size bucket", "reads", "mean request KiB", "retrieval MB/s", "calibrate QD1 MB/s",
                    "calibrate QD32 MB/s", "vs QD1", "vs QD32"],
                   [[f">= {r['bucket_min_bytes'] >> 10} KiB", r["reads"], f"{r['mean_request'] / 1024:.1f}",
                     f"{r['retrieval_Bps'] / 1e6:.0f}", f"{r['calibrated_qd1_Bps'] / 1e6:.0f}",
                     f"{r['calibrated_qd32_Bps'] / 1e6:.0f}", f"{r['vs_qd1']:.2f}", f"{r['vs_qd32']:.2f}"]
                    for r in rows], "r" * 8) + "\n"
    for be, ps in by_backend.items():
        mbps = statistics.median(p[0]["read_bytes"] / max(p[0]["read_seconds"], 1e-12) for p in ps) / 1e6
        md += (f"\n{be}: retrieval reads at {mbps:.0f} MB/s "
               f"in their read calls (backend in force: {ps[0][0]['io_backend']}; median of {len(ps)})")
    md += (f"\n\nOverall ({a.backends.split(',')[0]}): retrieval {real / 1e6:.0f} MB/s in its read calls; "
           f"the calibrated curve at the same request sizes gives {q1 / 1e6:.0f} MB/s at QD1 ({real / q1:.2f}x) "
           f"and {q32 / 1e6:.0f} MB/s at QD32 ({real / q32:.2f}x).\n")
    print()
    print(md)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        meta = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "args": vars(a),
                "calibration": _without_paths(cal.to_dict())}
        with open(os.path.join(a.out, "flash_real.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows,
                       "backends": {be: [p[0]["read_bytes"] / max(p[0]["read_seconds"], 1e-12) for p in ps]
                                    for be, ps in by_backend.items()},
                       "overall": {"retrieval_Bps": real, "calibrated_qd1_Bps": q1,
                                                                 "calibrated_qd32_Bps": q32}}, f, indent=1)
        with open(os.path.join(a.out, "flash_real.md"), "w") as f:
            f.write(f"# Retrieval reads vs calibrate on this disk (O_DIRECT)\n\n"
                    f"`python -m kvtier.bench.flash_real {' '.join(argv or sys.argv[1:])}`\n\n{md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
