"""Flash layout on real KV traces (issue: continuity-centric flash management).

Replays captured SmolLM2 traces (kvtier.bench.capture) through kvtier as a KV cache (kvtier.bench.kvreplay)
on the UFS 4.0 device profile, with a DRAM budget small enough that retrievals reach flash
and a 10% fetch budget, for each policy and layout, and reports what the device sees:

- entries per read (mean contiguous read length) and reads per retrieve;
- effective bandwidth: bytes read / modeled device time (the profile's sequential bandwidth
  is the ceiling);
- modeled I/O time per decoding step (all layers and KV heads of one step), deterministic;
- real time of the same reads with O_DIRECT on this machine's disk (noisy, shown beside);
- bytes moved by updates (splits, co-location, format 3's consolidations) against what a naive
  cluster-by-cluster layout, with no room for clusters to grow, would have moved for the same
  appends.

The ``none`` policy keeps every key in DRAM to score it, so it is given the key bytes on top
of the same DRAM budget.

Layouts: ``token`` (the baseline: one log in insertion order, a cluster read as runs of
consecutive ids, runs closer than the merge gap read as one request), ``clustered`` (each
cluster contiguous in a dual-head pool head, no co-location),
``colocated`` (the same, rewritten once after the first retrieves so that clusters fetched
together are neighbours, and neighbouring extents of a retrieve merged into one read).

    python -m kvtier.bench.flash --out bench/results [--workloads W1,W2] [--layers 0,3,6,...]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

import kvtier
from kvtier.bench.capture import load_trace
from kvtier.bench.kvreplay import LAYOUTS, replay
from kvtier.bench.tables import md_table
from kvtier.benchargs import show_defaults
from kvtier.config import POLICIES


def add_setting_args(ap):
    """The replay setting of this benchmark (also kvtier.bench.write_buffer's): 10 layers, 512 + 2048
    tokens, 10% fetch budget every 4 steps, 4 MiB of DRAM, UFS 4.0."""
    ap.add_argument("--layers", default="0,3,6,9,12,15,18,21,24,27")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=2048)
    ap.add_argument("--budget", type=float, default=0.1)
    ap.add_argument("--every", type=int, default=4)
    ap.add_argument("--dram-budget", default="4MiB")
    ap.add_argument("--device", default="ufs4.0")


def parse_params(ap, items):
    """NAME=VALUE strings as collection keyword arguments (int, then float, else the string)."""
    out: dict = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name.isidentifier():
            ap.error(f"--adaptive: NAME=VALUE expected, got {item!r}")
        value: object = text
        for conv in (int, float):
            try:
                value = conv(text)
                break
            except ValueError:
                pass
        out[name] = value
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workloads", default="W1,W2")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--layouts", default="token,clustered,colocated")
    add_setting_args(ap)
    ap.add_argument("--merge-gap", type=int, default=None,
                    help="bytes (default: the device's knee); 0 reads only touching extents as one "
                         "request, so entries/read is the mean contiguous run length")
    ap.add_argument("--adaptive", action="append", default=[], metavar="NAME=VALUE",
                    help="a collection parameter of the adaptive policy's collections (repeatable), "
                         "e.g. tau_factor=0.5 or init_cluster_size=16: the split threshold / cluster size sweep")
    ap.add_argument("--tag", default="", help="suffix of the output files (flash<tag>.json/.md)")
    ap.add_argument("--out", default=None)
    a = show_defaults(ap).parse_args(argv)
    layers = [int(x) for x in a.layers.split(",")]
    adaptive_params = parse_params(ap, a.adaptive)
    prof = kvtier.PROFILES[a.device]
    rows = []
    t0 = time.time()
    for w in a.workloads.split(","):
        trace = load_trace(w, prefill=a.prefill, decode=a.decode)
        heads = len(layers) * trace.n_kv_heads
        for pol in a.policies.split(","):
            for lay in a.layouts.split(","):
                if pol == "none" and lay != "clustered":
                    continue  # no clusters to place
                dram = kvtier.parse_size(a.dram_budget)
                if pol == "none":
                    # a system without clusters scores every key: it keeps them all in DRAM,
                    # so it gets that much on top of the same cache budget
                    dram += heads * trace.length * trace.head_dim * 2 * 3 // 2  # + growth slack
                try:
                    r = replay(trace, policy=pol, budget=a.budget, layers=layers, every=a.every,
                               dram_budget=dram, device=a.device, direct_io=True,
                               collect_stats=True, **LAYOUTS[lay],
                               **(adaptive_params if pol == "adaptive" else {}),
                               store_kwargs={} if a.merge_gap is None else {"merge_gap": a.merge_gap})
                except kvtier.BudgetError as e:  # a baseline whose index does not fit: say so
                    why = str(e).split(" — ")[0]
                    print(f"{w} {pol:9s} {lay:10s} does not fit in {a.dram_budget}: {why}", flush=True)
                    rows.append({"workload": w, "policy": pol, "layout": lay, "fits": False, "error": "BudgetError"})
                    continue
                st = r.extra["store"]
                cs = r.extra["collections"]
                # splits, co-location rewrites and (format 3) consolidations of split clusters
                moved = sum(c["split_write_bytes"] + c["relayout_bytes"] + c.get("consolidate_bytes", 0) for c in cs)
                naive = sum(c["naive_move_bytes"] for c in cs)
                appended = sum(c["append_bytes"] for c in cs)
                partial = sum(c["partial_page_writes"] for c in cs)
                steps = r.retrieves / heads
                bw = st["read_bytes"] / st["modeled_io_seconds"] if st["modeled_io_seconds"] else 0.0
                row = {
                    "workload": w, "policy": pol, "layout": lay, "recall": r.recall,
                    "params": adaptive_params if pol == "adaptive" else {},
                    "entries_per_read": st["mean_read_entries"],
                    # reads as a gap-free layout counts them (a merged read: one per piece)
                    "entries_per_contiguous_read": st["mean_contiguous_entries"],
                    "gap_kib_per_retrieve": st["gap_bytes"] / max(1, r.retrieves) / 1024,
                    "split_write_kib_per_step": sum(c["split_write_bytes"] for c in cs) / max(1, steps) / 1024,
                    "consolidate_kib_per_step": sum(c.get("consolidate_bytes", 0) for c in cs) / max(1, steps) / 1024,
                    "dead_slots": sum(c.get("dead_slots", 0) for c in cs),
                    "data_file_bytes": sum(c["data_file_bytes"] for c in cs),
                    "reads_per_retrieve": r.read_ops_per_retrieve,
                    "kib_per_retrieve": r.read_bytes_per_retrieve / 1024,
                    "effective_bw_GBps": bw / 1e9, "bw_share_of_profile": bw / prof.bandwidth_Bps,
                    "modeled_io_ms_per_step": st["modeled_io_seconds"] / steps * 1e3,
                    "real_read_ms_per_step": r.extra["read_seconds"] / steps * 1e3,
                    "cache_hit_rate": st["cache_hits"] / max(1, st["cache_hits"] + st["cache_misses"]),
                    "moved_bytes": moved, "naive_move_bytes": naive, "appended_bytes": appended,
                    "mean_cluster_size": r.mean_cluster_size, "steps": steps,
                    "partial_page_writes": partial, "write_ops": st["write_ops"],
                    "write_buffer_evictions": st["write_buffer_evictions"],
                    "fetched_per_retrieve": r.fetched_per_retrieve,
                }
                rows.append(row)
                print(f"{w} {pol:9s} {lay:10s} recall={r.recall:.3f} entries/read={row['entries_per_read']:.1f} "
                      f"contiguous={row['entries_per_contiguous_read']:.1f} gap={row['gap_kib_per_retrieve']:.1f}KiB "
                      f"reads/retrieve={row['reads_per_retrieve']:.2f} bw={row['effective_bw_GBps']:.2f}GB/s "
                      f"modeled={row['modeled_io_ms_per_step']:.3f}ms/step "
                      f"real={row['real_read_ms_per_step']:.2f}ms/step "
                      f"moved={moved / 2**20:.1f}MiB naive={naive / 2**20:.1f}MiB [{r.wall_s:.0f}s]", flush=True)
    md = md_table(["workload", "policy", "layout", "recall", "entries/read", "entries/contiguous read",
                   "gap KiB/retrieve", "reads/retrieve", "KiB/retrieve",
                   "eff. BW GB/s", "share of profile BW", "modeled I/O ms/step", "real read ms/step", "hit rate",
                   "moved MiB", "naive MiB", "split writes KiB/step", "consolidation KiB/step", "data file MiB",
                   "partial-page writes"],
                  [[r["workload"], r["policy"], r["layout"]]
                   + (["does not fit in the DRAM budget"] if r.get("fits") is False else
                      [f"{r['recall']:.3f}", f"{r['entries_per_read']:.1f}",
                       f"{r['entries_per_contiguous_read']:.1f}", f"{r['gap_kib_per_retrieve']:.1f}",
                       f"{r['reads_per_retrieve']:.2f}",
                       f"{r['kib_per_retrieve']:.1f}", f"{r['effective_bw_GBps']:.2f}",
                       f"{r['bw_share_of_profile']:.0%}",
                       f"{r['modeled_io_ms_per_step']:.3f}", f"{r['real_read_ms_per_step']:.2f}",
                       f"{r['cache_hit_rate']:.2f}", f"{r['moved_bytes'] / 2**20:.1f}",
                       f"{r['naive_move_bytes'] / 2**20:.1f}", f"{r['split_write_kib_per_step']:.1f}",
                       f"{r['consolidate_kib_per_step']:.1f}", f"{r['data_file_bytes'] / 2**20:.1f}",
                       r["partial_page_writes"]])
                   for r in rows], "lll" + "r" * 17) + "\n"
    by = {(r["workload"], r["policy"], r["layout"]): r for r in rows if r.get("fits", True)}
    notes = []
    for w in a.workloads.split(","):
        best = by.get((w, "adaptive", "colocated")) or by.get((w, "adaptive", "clustered"))
        if not best:
            continue
        for base in ("static", "local"):
            b = by.get((w, base, "colocated")) or by.get((w, base, "clustered"))
            if b and best["modeled_io_ms_per_step"]:
                notes.append(f"{w}: modeled I/O per step, {base} / adaptive = "
                             f"{b['modeled_io_ms_per_step'] / best['modeled_io_ms_per_step']:.2f}")
        b = by.get((w, "none", "clustered"))
        if b and best["modeled_io_ms_per_step"]:
            notes.append(f"{w}: modeled I/O per step, none / adaptive = "
                         f"{b['modeled_io_ms_per_step'] / best['modeled_io_ms_per_step']:.2f}")
        # whole clusters only: a policy whose clusters outgrow the budget fetches fewer
        # entries than it may, so its I/O per step is also shown per entry fetched
        for base in ("static", "local", "none"):
            b = by.get((w, base, "colocated")) or by.get((w, base, "clustered"))
            if (b and b.get("fetched_per_retrieve") and best.get("fetched_per_retrieve")
                    and best["modeled_io_ms_per_step"]):
                per = lambda r: r["modeled_io_ms_per_step"] / r["fetched_per_retrieve"]  # noqa: E731
                notes.append(f"{w}: entries fetched per retrieve, {base} {b['fetched_per_retrieve']:.0f} vs adaptive "
                             f"{best['fetched_per_retrieve']:.0f}; modeled I/O per entry fetched, {base} / adaptive = "
                             f"{per(b) / per(best):.2f}")
    md += "\n" + "\n".join(notes) + "\n"
    print()
    print(md)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        meta = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
                "versions": {"kvtier": kvtier.__version__, "numpy": np.__version__},
                "profile": prof.__dict__, "args": vars(a), "seconds": time.time() - t0}
        with open(os.path.join(a.out, f"flash{a.tag}.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        with open(os.path.join(a.out, f"flash{a.tag}.md"), "w") as f:
            cmd = " ".join(argv or sys.argv[1:])
            f.write(f"# Flash layout on real traces\n\n`python -m kvtier.bench.flash {cmd}`\n\n{md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
