"""The adaptive policy's accuracy (issue 16, items 1, 2 and 5) on the replayed KV traces.

For each workload, every policy replays the same trace at the same fetch budget through the
public API (kvtier.bench.kvreplay), at a large DRAM budget; adaptive runs once more at a small
one, since the budget may change I/O but never which clusters exist. Reported per run: attention
recall, the splits by trigger (variance rule, size cap, pending overflow), the mean fill of the
entry budget (returned entries / budget) and the cluster count and size at the end; then the
ratios the targets are stated in.

    python -m kvtier.bench.adaptive16 --out bench/results [--workloads W1,W2] [--budget 0.1]
        [--every 4,16] [--decode 2048] [--dram-budgets 64MiB,2MiB]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from kvtier.bench.capture import load_trace
from kvtier.bench.kvreplay import replay
from kvtier.bench.tables import md_table, save
from kvtier.benchargs import show_defaults
from kvtier.config import POLICIES  # the baselines, then the method

TRIGGERS = ("splits_variance", "splits_size", "splits_pending")


def _sum(cs, key):
    return int(sum(c.get(key, 0) for c in cs))


def one(trace, workload, policy, budget, every, dram_budget, layers=None):
    r = replay(trace, policy=policy, budget=budget, every=every, dram_budget=dram_budget, layers=layers,
               device="ufs4.0", direct_io=False, collect_stats=True)
    cs, st = r.extra["collections"], r.extra["store"]
    row = {"workload": workload, "every": every, "dram_budget_arg": dram_budget,
           "layers": "all" if layers is None else ",".join(map(str, layers)), **r.row(),
           "splits": _sum(cs, "splits") if policy == "adaptive" else 0,
           "split_skipped": _sum(cs, "split_skipped"), "forced_loads": _sum(cs, "forced_loads"),
           "split_read_bytes": _sum(cs, "split_read_bytes")}
    for t in TRIGGERS:
        row[t] = _sum(cs, t)
    fills = [c["mean_fill"] for c in cs if "mean_fill" in c]
    row["mean_fill"] = float(np.mean(fills)) if fills else None
    row["store_read_ops"] = st["read_ops"]
    row["split_errors"] = _sum(cs, "split_errors")
    print(f"{workload} every={every} {policy:9s} dram={dram_budget:6s} recall={r.recall:.3f} "
          f"(oracle {r.oracle_recall:.3f}) "
          f"clusters={r.clusters:.0f} size={r.mean_cluster_size:.1f} splits={row['splits']} "
          f"(var {row['splits_variance']}, size {row['splits_size']}, pending {row['splits_pending']}) "
          f"fill={row['mean_fill']} skipped={row['split_skipped']} errors={row['split_errors']} "
          f"forced={row['forced_loads']} [{r.wall_s:.0f}s]", flush=True)
    return row


def run(workloads, budget, everys, prefill, decode, dram_budgets, dram_layers):
    """Every policy on every layer at the first DRAM budget; then adaptive at each budget on
    dram_layers, side by side (every layer's index alone exceeds a small budget)."""
    rows = []
    for w in workloads:
        trace = load_trace(w, prefill=prefill, decode=decode, progress=False)
        for every in everys:
            rows += [one(trace, w, pol, budget, every, dram_budgets[0]) for pol in POLICIES]
            rows += [one(trace, w, "adaptive", budget, every, db, dram_layers) for db in dram_budgets]
    return rows


def table(rows) -> str:
    def f(x, fmt):
        return "-" if x is None else format(x, fmt)
    return md_table(["workload", "every", "policy", "layers", "DRAM", "recall", "oracle", "clusters", "mean size",
                     "splits", "by variance", "by size cap", "by pending", "mean fill", "entries/read"],
                    [[r["workload"], r["every"], r["policy"], r["layers"], r["dram_budget_arg"], f"{r['recall']:.3f}",
                      f"{r['oracle_recall']:.3f}", f"{r['clusters']:.0f}", f"{r['mean_cluster_size']:.1f}",
                      r["splits"], r["splits_variance"], r["splits_size"], r["splits_pending"],
                      f(r["mean_fill"], ".3f"), f"{r['mean_read_entries']:.1f}"] for r in rows],
                    "lrlll" + "r" * 10) + "\n"


def ratios(rows, dram_budgets) -> tuple[str, dict]:
    out, summary = [], {}
    for w, every in dict.fromkeys((r["workload"], r["every"]) for r in rows):
        mine = [r for r in rows if r["workload"] == w and r["every"] == every]
        by = {(r["policy"], r["layers"], r["dram_budget_arg"]): r for r in mine}
        big = dram_budgets[0]
        a = by[("adaptive", "all", big)]
        s = {"adaptive/static": a["recall"] / by[("static", "all", big)]["recall"],
             "adaptive/local": a["recall"] / by[("local", "all", big)]["recall"],
             "adaptive/none": a["recall"] / by[("none", "all", big)]["recall"],
             "variance share of splits": a["splits_variance"] / a["splits"] if a["splits"] else None}
        sub = [r for r in mine if r["layers"] != "all"]
        for r in sub[1:]:
            s[f"recall {big} - {r['dram_budget_arg']} (layers {r['layers']})"] = sub[0]["recall"] - r["recall"]
        summary[f"{w} every {every}"] = s
        out.append(f"- {w}, retrieve every {every}: "
                   + ", ".join(f"{k} = {'-' if v is None else format(v, '.3f')}" for k, v in s.items()))
    return "\n".join(out) + "\n", summary


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workloads", default="W1,W2")
    ap.add_argument("--budget", type=float, default=0.1)
    ap.add_argument("--every", default="4,16", help="retrieve every N decoding steps (a list runs each)")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=2048)
    ap.add_argument("--dram-budgets", default="64MiB,2MiB",
                    help="the first for every policy, the others for adaptive only")
    ap.add_argument("--dram-layers", default="0,6,12,18,24",
                    help="layers of the DRAM-budget comparison")
    ap.add_argument("--out", default=None, help="directory for adaptive16.json and adaptive16.md")
    ap.add_argument("--name", default="adaptive16", help="file name stem of the results")
    a = show_defaults(ap).parse_args(argv)
    t0 = time.time()
    dbs = a.dram_budgets.split(",")
    rows = run(a.workloads.split(","), a.budget, [int(x) for x in a.every.split(",")], a.prefill, a.decode, dbs,
               [int(x) for x in a.dram_layers.split(",")])
    rt, summary = ratios(rows, dbs)
    md = table(rows) + "\n" + rt
    print()
    print(md)
    if a.out:
        save(a.out, a.name, "Adaptive accuracy (issue 16)", "kvtier.bench.adaptive16", argv, a, t0,
             {"rows": rows, "summary": summary}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
