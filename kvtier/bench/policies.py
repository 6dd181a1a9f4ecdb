"""Clustering policies on real KV traces (issue: accuracy at coarse granularity).

Replays captured SmolLM2 traces (kvtier.bench.capture: W1 long generation, W2 document +
continuation) through kvtier's public API as a KV cache uses it (kvtier.bench.kvreplay) for each
policy and fetch budget, and reports attention recall beside cluster count, mean size,
variance and reads per retrieve. Every policy runs on the same trace, the same store code and
the same I/O path, at the same number of fetched entries per step.

    python -m kvtier.bench.policies --out bench/results [--workloads W1,W2] [--budgets 0.05,0.1,0.2]
        [--policies none,static,local,adaptive] [--layers 0,5,10,...] [--decode 2048]
        [--param adaptive.tau_factor=1.0 ...]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from kvtier.bench.capture import load_trace
from kvtier.bench.kvreplay import replay
from kvtier.bench.tables import md_table, save
from kvtier.benchargs import show_defaults
from kvtier.config import POLICIES  # the baselines, then the method


def _parse_params(items):
    """``policy.name=value`` pairs into {policy: {name: value}}."""
    out: dict[str, dict] = {}
    for it in items or []:
        key, _, val = it.partition("=")
        pol, _, name = key.partition(".")
        try:
            v = json.loads(val)
        except ValueError:
            v = val
        out.setdefault(pol, {})[name] = v
    return out


def run(workloads, budgets, policies, layers, prefill, decode, every, dram_budget, params, progress=True):
    rows = []
    for w in workloads:
        trace = load_trace(w, prefill=prefill, decode=decode, progress=progress)
        for b in budgets:
            for pol in policies:
                kw = params.get(pol, {})
                r = replay(trace, policy=pol, budget=b, layers=layers, every=every,
                           dram_budget=dram_budget, device="ufs4.0", direct_io=False, **kw)
                row = {"workload": w, **r.row(), "params": kw}
                rows.append(row)
                print(f"{w} budget={b:.0%} {pol:9s} recall={r.recall:.3f} (oracle {r.oracle_recall:.3f}) "
                      f"clusters={r.clusters:.0f} size={r.mean_cluster_size:.1f} var={r.mean_variance:.2f} "
                      f"reads/retrieve={r.read_ops_per_retrieve:.2f} entries/read={r.mean_read_entries:.1f} "
                      f"[{r.wall_s:.0f}s]", flush=True)
    return rows


def table(rows) -> str:
    return md_table(["workload", "budget", "policy", "recall", "oracle", "clusters", "mean size", "mean variance",
                     "reads/retrieve", "entries/read", "modeled I/O us/retrieve"],
                    [[r["workload"], f"{r['budget']:.0%}", r["policy"], f"{r['recall']:.3f}",
                      f"{r['oracle_recall']:.3f}", f"{r['clusters']:.0f}", f"{r['mean_cluster_size']:.1f}",
                      f"{r['mean_variance']:.2f}",
                      f"{r['read_ops_per_retrieve']:.2f}", f"{r['mean_read_entries']:.1f}",
                      f"{r['modeled_io_s_per_retrieve'] * 1e6:.1f}"] for r in rows], "lrl" + "r" * 8) + "\n"


def ratios(rows) -> str:
    """adaptive against static and local, per workload and budget (the targets' ratios)."""
    out = []
    by = {(r["workload"], r["budget"], r["policy"]): r for r in rows}
    for (w, b, p), r in sorted(by.items()):
        if p != "adaptive":
            continue
        s, loc = by.get((w, b, "static")), by.get((w, b, "local"))
        parts = [f"{w} {b:.0%}:"]
        if s:
            parts.append(f"recall adaptive/static = {r['recall'] / s['recall']:.2f}")
        if loc:
            parts.append(f"adaptive/local = {r['recall'] / loc['recall']:.2f}, "
                         f"size adaptive/local = {r['mean_cluster_size'] / loc['mean_cluster_size']:.2f}")
        out.append(" ".join(parts))
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workloads", default="W1,W2")
    ap.add_argument("--budgets", default="0.05,0.1,0.2")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--layers", default="all", help="'all' or comma-separated layer numbers")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=2048)
    ap.add_argument("--every", type=int, default=4, help="retrieve every N decoding steps")
    ap.add_argument("--dram-budget", default="64MiB")
    ap.add_argument("--param", action="append", help="policy.name=value, e.g. adaptive.tau_factor=1.2")
    ap.add_argument("--out", default=None, help="directory for policies.json and policies.md")
    a = show_defaults(ap).parse_args(argv)
    layers = None if a.layers == "all" else [int(x) for x in a.layers.split(",")]
    budgets = [float(x) for x in a.budgets.split(",")]
    t0 = time.time()
    rows = run(a.workloads.split(","), budgets, a.policies.split(","), layers, a.prefill, a.decode,
               a.every, a.dram_budget, _parse_params(a.param))
    md = table(rows) + "\n" + ratios(rows) + "\n"
    print()
    print(md)
    if a.out:
        save(a.out, "policies", "Policies on real traces", "kvtier.bench.policies", argv, a, t0, {"rows": rows}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
