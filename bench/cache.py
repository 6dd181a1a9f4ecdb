"""Cache replacement on real KV traces: hit rate and bytes read against the DRAM budget.

Replays a captured SmolLM2 trace (kvtier.bench.capture, kvtier.bench.kvreplay) with the adaptive policy at a
10% fetch budget, for each cache policy (lru, lfu, cluster) and DRAM budgets from 20% to 50% of
the KV bytes (at 5% and 10% the engine's own index -- id map and representatives, about a tenth
of the KV bytes for 64-d float16 keys and values -- did not fit in the budget), and reports cache hit rate and bytes read from flash per retrieve.
Policies run side by side on the same trace, so their ratios are exact (the engine is
deterministic).

    python -m bench.cache --out bench/results [--workload W1] [--fractions 0.2,0.3,0.4,0.5]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from kvtier.bench.capture import load_trace
from kvtier.bench.kvreplay import replay
from kvtier.bench.tables import md_table


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", default="W1")
    ap.add_argument("--fractions", default="0.2,0.3,0.4,0.5", help="DRAM budget as a share of the KV bytes")
    ap.add_argument("--policies", default="lru,lfu,cluster")
    ap.add_argument("--layers", default="0,5,10,15,20,25")
    ap.add_argument("--every", type=int, default=4)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    trace = load_trace(a.workload, prefill=512, decode=2048)
    layers = [int(x) for x in a.layers.split(",")]
    kv_bytes = len(layers) * trace.n_kv_heads * trace.length * (16 + 2 * trace.head_dim * 2)
    rows = []
    for frac in (float(x) for x in a.fractions.split(",")):
        budget = max(256 << 10, int(frac * kv_bytes))
        for pol in a.policies.split(","):
            r = replay(trace, policy="adaptive", budget=0.1, layers=layers, every=a.every,
                       dram_budget=budget, device="ufs4.0", direct_io=False, collect_stats=True,
                       store_kwargs={"cache_policy": pol})
            st = r.extra["store"]
            hits, misses = st["cache_hits"], st["cache_misses"]
            row = {"workload": a.workload, "dram_fraction": frac, "dram_budget": budget, "cache_policy": pol,
                   "hit_rate": hits / max(1, hits + misses), "read_bytes_per_retrieve": r.read_bytes_per_retrieve,
                   "modeled_io_us_per_retrieve": r.modeled_io_s_per_retrieve * 1e6, "recall": r.recall,
                   "dram_peak_bytes": st["dram_peak_bytes"]}
            rows.append(row)
            print(f"DRAM {frac:.0%} ({budget >> 10} KiB) {pol:7s} hit rate {row['hit_rate']:.3f} "
                  f"read {row['read_bytes_per_retrieve'] / 1024:.2f} KiB/retrieve recall {r.recall:.3f}", flush=True)
    lru = {r["dram_fraction"]: r["read_bytes_per_retrieve"] for r in rows if r["cache_policy"] == "lru"}
    md = md_table(["DRAM (share of KV)", "policy", "hit rate", "KiB read / retrieve", "lru / this (bytes)"],
                  [[f"{r['dram_fraction']:.0%}", r["cache_policy"], f"{r['hit_rate']:.3f}",
                    f"{r['read_bytes_per_retrieve'] / 1024:.2f}",
                    f"{lru[r['dram_fraction']] / r['read_bytes_per_retrieve'] if r['read_bytes_per_retrieve'] else float('inf'):.2f}"]
                   for r in rows], "rlrrr") + "\n"
    print()
    print(md)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "cache.json"), "w") as f:
            json.dump({"args": vars(a), "kv_bytes": kv_bytes, "rows": rows}, f, indent=1)
        with open(os.path.join(a.out, "cache.md"), "w") as f:
            f.write(f"# Cache policies on real traces\n\n`python -m bench.cache {' '.join(argv or sys.argv[1:])}`\n\n{md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
