"""Pipelining: does prefetch hide flash reads behind per-layer compute?

Decoding runs layer by layer. While layer l computes, kvtier can prefetch for layer l+1 the
clusters layer l+1's queries selected at the previous step (the current ones are not known
yet). This benchmark replays a captured SmolLM2 trace (kvtier.bench.capture) through 30 layers x 3 KV
heads with a synthetic per-layer compute (a numpy matmul that releases the GIL, of a chosen
length) on the UFS 4.0 profile in throttle mode (every read sleeps to its modeled time), and
measures the time per decoding step:

- compute only, I/O only (retrieves alone), sequential (retrieve then compute, no prefetch),
  and pipelined (prefetch layer l+1, retrieve layer l, compute layer l);
- the target: pipelined <= 1.15 x max(compute, I/O).

    python -m kvtier.bench.pipeline [--compute-ms 1.0] [--steps 48] [--dram-budget 4MiB] [--out DIR]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The synthetic compute runs on one core (as a phone's decode runs on its accelerator or a
# core of its own), so that the loader threads are not competing with BLAS threads for the
# other; set before numpy loads its BLAS.
for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import numpy as np

import kvtier
from kvtier.bench.capture import load_trace
from kvtier.bench.tables import write_results
from kvtier.benchargs import show_defaults


def _compute(a, b, reps):
    for _ in range(reps):
        np.dot(a, b)


def run(trace, mode, steps, compute_reps, dram_budget, budget=0.1, sinks=4, window=32):
    prof = kvtier.PROFILES["ufs4.0"].replace(throttle=True)
    P = trace.prefill
    g = trace.group_size
    a = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)
    with tempfile.TemporaryDirectory() as d, kvtier.open(d, dram_budget=dram_budget, device=prof) as s:
        colls = {}
        for layer in range(trace.n_layers):
            for h in range(trace.n_kv_heads):
                c = s.collection(f"L{layer}.H{h}", dim=trace.head_dim, value_dim=trace.head_dim,
                                 policy="static", colocate_after=0)
                c.add(trace.keys[layer, h, sinks:P - window], trace.values[layer, h, sinks:P - window])
                colls[layer, h] = c
        s.reset_io_stats()
        t0 = time.perf_counter()
        for t in range(P, P + steps):
            n_budget = int(np.ceil(budget * (t + 1)))
            for layer in range(trace.n_layers):
                if mode == "pipelined" and layer + 1 < trace.n_layers:
                    for h in range(trace.n_kv_heads):
                        qp = trace.queries[layer + 1, h * g:(h + 1) * g, t - 1].astype(np.float32)
                        colls[layer + 1, h].prefetch(qp, budget=n_budget)
                if mode != "compute":
                    for h in range(trace.n_kv_heads):
                        q = trace.queries[layer, h * g:(h + 1) * g, t].astype(np.float32)
                        colls[layer, h].retrieve(q, budget=n_budget)
                if mode != "io":
                    _compute(a, a, compute_reps)
        wall = time.perf_counter() - t0
        st = s.stats()
    return {"mode": mode, "step_ms": wall / steps * 1e3,
            "modeled_io_ms_per_step": st["modeled_io_seconds"] / steps * 1e3, "read_ops": st["read_ops"],
            "prefetch_hits": st["prefetch_hits"], "prefetch_issued": st["prefetch_issued"],
            "io_wait_ms_per_step": st["io_wait_seconds"] / steps * 1e3, "dram_peak_bytes": st["dram_peak_bytes"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--compute-ms", type=float, default=1.0, help="synthetic compute per layer")
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--dram-budget", default="4MiB")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    a = show_defaults(ap).parse_args(argv)
    trace = load_trace("W1", prefill=512, decode=2048)
    # calibrate the matmul count that takes compute-ms here
    x = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)
    t0 = time.perf_counter()
    _compute(x, x, 200)
    per = (time.perf_counter() - t0) / 200
    reps = max(1, round(a.compute_ms / 1e3 / per))
    rows = {}
    for mode in ("compute", "io", "sequential", "pipelined"):
        runs = [run(trace, mode, a.steps, reps, a.dram_budget) for _ in range(a.repeats)]
        med = sorted(runs, key=lambda r: r["step_ms"])[len(runs) // 2]
        med["step_ms_all"] = [r["step_ms"] for r in runs]
        rows[mode] = med
        print(f"{mode:10s} step {med['step_ms']:.2f} ms (runs {', '.join(f'{x:.2f}' for x in med['step_ms_all'])}) "
              f"modeled I/O {med['modeled_io_ms_per_step']:.2f} ms, waited {med['io_wait_ms_per_step']:.2f} ms, "
              f"prefetch hits {med['prefetch_hits']}/{med['prefetch_issued']}", flush=True)
    bound = max(rows["compute"]["step_ms"], rows["io"]["step_ms"])
    ratio = rows["pipelined"]["step_ms"] / bound
    print(f"\npipelined / max(compute, I/O) = {ratio:.2f} (target <= 1.15); "
          f"sequential / max = {rows['sequential']['step_ms'] / bound:.2f}")
    if a.out:
        write_results(a.out, "pipeline", {"args": vars(a), "matmuls_per_layer": reps, "rows": rows, "ratio": ratio})
    return 0


if __name__ == "__main__":
    sys.exit(main())
