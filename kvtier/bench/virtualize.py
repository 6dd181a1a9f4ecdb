"""Group virtualization on a 30-layer model's worth of collections: DRAM against I/O.

Replays a captured SmolLM2 trace (kvtier.bench.capture, kvtier.bench.kvreplay; 30 layers x 3 KV heads, one
collection each) layer by layer, as decoding runs, at a 10% fetch budget, for a sweep of
DRAM budgets, in three modes: every collection resident (the engine's budget must hold all
90 indexes and whatever clusters it caches); virtualized (kvreplay's ``virtualize``: a
layer's group is parked after use with its cache working set and brought back, in the
background, one layer ahead); and virtualized with only the index parked (cached clusters
dropped at park, read again from the data files on use).
For each run: the DRAM peak, modeled UFS 4.0 read time per decoding step (every layer; swap
reads included), bytes read by cause and bytes written to the swap area per step.

The saving is read off the sweep: the smallest budget each mode runs at (the resident mode
fails with BudgetError below its index), and for each virtualized point the smallest
resident budget whose modeled I/O per step is no worse.

Every decoding step retrieves (``--every 1``): a virtualized layer is parked and brought back
at every step, so sampling steps would charge swap traffic to steps that read nothing.

    python -m kvtier.bench.virtualize --out bench/results [--workload W1] [--budgets-kib 512,1024,...]
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import kvtier
from kvtier.bench.capture import load_trace
from kvtier.bench.kvreplay import replay
from kvtier.bench.tables import command, md_table, write_results
from kvtier.benchargs import show_defaults

MODES = {"resident": (False, True), "virtualized": (True, True), "virtualized-index": (True, False)}


def run(trace, policy, dram, mode, every, layers):
    virtualize, keep = MODES[mode]
    t0 = time.perf_counter()
    try:
        r = replay(trace, policy=policy, budget=0.1, layers=layers, every=every, dram_budget=dram,
                   device="ufs4.0", direct_io=False, collect_stats=True, virtualize=virtualize,
                   park_keep_cache=keep)
    except kvtier.BudgetError as e:
        return {"mode": mode, "virtualize": virtualize, "dram_budget": dram, "fits": False,
                "error": str(e).split(" — ")[0]}
    st = r.extra["store"]
    steps = max(1, r.steps)
    return {
        "mode": mode, "virtualize": virtualize, "dram_budget": dram, "fits": True, "recall": r.recall,
        "dram_peak_bytes": st["dram_peak_bytes"],
        "modeled_io_ms_per_step": st["modeled_io_seconds"] / steps * 1e3,
        "read_bytes_per_step": st["read_bytes"] / steps,
        "read_bytes_by_cause_per_step": {k: v / steps for k, v in st["read_bytes_by_cause"].items()},
        "swap_write_bytes_per_step": st["swap_write_bytes"] / steps,
        "swap_demand_ins": st["swap_demand_ins"], "wall_s": time.perf_counter() - t0,
    }


def saving(rows):
    """For each virtualized point: the smallest resident budget with no more I/O per step."""
    res = sorted((r for r in rows if not r["virtualize"] and r["fits"]), key=lambda r: r["dram_budget"])
    out = []
    for v in (r for r in rows if r["virtualize"] and r["fits"]):
        match = next((r for r in res if r["modeled_io_ms_per_step"] <= v["modeled_io_ms_per_step"]), None)
        out.append({"mode": v["mode"], "virtualized_budget": v["dram_budget"], "virtualized_peak": v["dram_peak_bytes"],
                    "io_ms_per_step": v["modeled_io_ms_per_step"],
                    "resident_budget_for_same_io": match["dram_budget"] if match else None,
                    "resident_peak_for_same_io": match["dram_peak_bytes"] if match else None,
                    "saving": match["dram_peak_bytes"] / v["dram_peak_bytes"] if match else None})
    return out


def _cells(r) -> list[str]:
    """A row's measured cells, or why it has none."""
    if not r["fits"]:
        return ["does not fit"]
    swap = r["read_bytes_by_cause_per_step"]["swap"]
    return [f"{r['dram_peak_bytes'] / 2**20:.2f}", f"{r['modeled_io_ms_per_step']:.3f}",
            f"{r['read_bytes_per_step'] / 1024:.1f} ({swap / 1024:.1f})",
            f"{r['swap_write_bytes_per_step'] / 1024:.1f}", f"{r['recall']:.3f}"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", default="W1")
    ap.add_argument("--policy", default="adaptive")
    ap.add_argument("--budgets-kib", default="512,1024,1536,2048,3072,4096,6144,8192,12288,16384,24576")
    # every step retrieves, as decoding does: a virtualized layer is parked and brought back at
    # every step, so sampling steps would charge it swap traffic for steps that read nothing
    ap.add_argument("--every", type=int, default=1)
    ap.add_argument("--modes", default="resident,virtualized,virtualized-index",
                    help="resident; virtualized (a parked group keeps its cache working set); "
                         "virtualized-index (only the index is parked, cached clusters dropped)")
    ap.add_argument("--decode", type=int, default=1024)
    ap.add_argument("--out", default=None)
    a = show_defaults(ap).parse_args(argv)
    trace = load_trace(a.workload, prefill=512, decode=a.decode)
    layers = list(range(trace.n_layers))
    rows = []
    for kib in (int(x) for x in a.budgets_kib.split(",")):
        for mode in a.modes.split(","):
            row = run(trace, a.policy, kib << 10, mode, a.every, layers)
            row.update(workload=a.workload, policy=a.policy)
            rows.append(row)
            if row["fits"]:
                print(f"{kib:6d} KiB {mode:17s} peak {row['dram_peak_bytes'] / 2**20:6.2f} MiB "
                      f"I/O {row['modeled_io_ms_per_step']:7.3f} ms/step "
                      f"read {row['read_bytes_per_step'] / 1024:8.1f} KiB/step "
                      f"swap write {row['swap_write_bytes_per_step'] / 1024:7.1f} KiB/step recall {row['recall']:.3f}",
                      flush=True)
            else:
                print(f"{kib:6d} KiB {mode:17s} does not fit ({row['error']})", flush=True)
    sv = saving(rows)
    md = md_table(["DRAM budget", "mode", "DRAM peak MiB", "modeled I/O ms/step", "KiB read/step (swap)",
                   "swap KiB written/step", "recall"],
                  [[f"{r['dram_budget'] >> 10} KiB", r["mode"], *_cells(r)] for r in rows], "rlrrrrr")
    md += "\n\n" + md_table(
        ["mode", "budget", "its peak MiB", "I/O ms/step", "resident peak MiB for no more I/O", "saving"],
        [[s["mode"], f"{s['virtualized_budget'] >> 10} KiB", f"{s['virtualized_peak'] / 2**20:.2f}",
          f"{s['io_ms_per_step']:.3f}",
          f"{s['resident_peak_for_same_io'] / 2**20:.2f}" if s["resident_peak_for_same_io"] else "none in the sweep",
          f"{s['saving']:.2f}x" if s["saving"] else "-"] for s in sv], "lrrrrr") + "\n"
    print()
    print(md)
    if a.out:
        write_results(a.out, f"virtualize_{a.workload}", {"rows": rows, "saving": sv, "args": vars(a)},
                      "Group virtualization", command("kvtier.bench.virtualize", argv), md)


if __name__ == "__main__":
    main()
