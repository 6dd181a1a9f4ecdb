"""Cache replacement on real KV traces: hit rate and bytes read against the DRAM budget.

Replays captured SmolLM2 traces (kvtier.bench.capture, kvtier.bench.kvreplay) with the adaptive
clustering policy (``--clustering`` for another) at a 10% fetch budget on the UFS 4.0 profile,
for each cache policy (lru, lfu, cluster) and each DRAM budget, and reports the cache hit rate
(hits / cluster lookups), bytes read from flash per decoding step and per retrieve, modeled
device time, attention recall and the engine's DRAM peak. ``all`` as a budget means the whole
cache: enough DRAM for every replayed entry and the index, so nothing is evicted. The replay
marks every decoding step (``Store.step()``). Policies run side by side on the same trace and the engine is
deterministic, so one run per point gives exact ratios.

The summary compares the policies at 1, 2 and 4 MiB: per workload, the median over those
budgets of LRU's bytes / cluster's bytes and LFU's bytes / cluster's bytes.

    python -m kvtier.bench.cache --out bench/results [--workloads W1,W2,W3] [--budgets 0.5,1,2,4,all]
    python -m kvtier.bench.cache --switch ...        # the workloads as conversations taking turns
    python -m kvtier.bench.cache --prefetch ...      # with the torch adapter's next-layer read-ahead
    python -m kvtier.bench.cache --clustering static # recall must not depend on the cache policy
    python -m kvtier.bench.cache --order collection  # one collection's whole sequence, then the next
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from kvtier.bench.capture import load_trace
from kvtier.bench.kvreplay import replay, replay_switch
from kvtier.bench.tables import command, md_table, write_results
from kvtier.benchargs import show_defaults
from kvtier.store import CACHE_POLICIES

MIB = 1 << 20
SUMMARY_BUDGETS = (1.0, 2.0, 4.0)  # MiB: the acceptance budgets (EVAL.md, "Cache")


def kv_bytes(trace, layers) -> int:
    """Bytes of the replayed entries on flash: key + value (float16) + 16 bytes of id and
    bookkeeping per entry."""
    return len(layers) * trace.n_kv_heads * trace.length * (16 + 2 * trace.head_dim * 2)


def parse_budgets(text: str) -> list:
    """'0.5,1,all' -> [0.5, 1.0, 'all'] (MiB, or the whole cache)."""
    out: list[float | str] = []
    for x in text.split(","):
        x = x.strip()
        if x == "all":
            out.append("all")
            continue
        try:
            v = float(x)
        except ValueError:
            raise SystemExit(f"--budgets: MiB numbers or 'all' expected, got {x!r}") from None
        if v <= 0:
            raise SystemExit(f"--budgets: positive MiB expected, got {x!r}")
        out.append(v)
    return out


def _row(workload, budget_mib, budget, policy, st, recall, decode_steps, retrieves, prefetch=False) -> dict:
    """One result row from a replay's store stats."""
    hits, misses, rb = st["cache_hits"], st["cache_misses"], st["read_bytes"]
    return {"workload": workload, "dram_mib": budget_mib, "dram_budget": budget, "cache_policy": policy,
            "hit_rate": hits / max(1, hits + misses), "cache_hits": hits, "cache_misses": misses,
            "evictions": st["evictions"], "read_bytes": rb, "read_bytes_per_step": rb / max(1, decode_steps),
            "read_bytes_per_retrieve": rb / max(1, retrieves),
            "modeled_io_us_per_retrieve": st["modeled_io_seconds"] / max(1, retrieves) * 1e6,
            "swap_read_bytes": st["swap_read_bytes"], "recall": recall,
            "dram_peak_bytes": st["dram_peak_bytes"], "over_budget": st["dram_peak_bytes"] > budget,
            "decode_steps": decode_steps, "retrieves": retrieves, "prefetch": prefetch,
            "prefetch_read_bytes": st["prefetch_read_bytes"],
            "hidden_share": st["prefetch_read_bytes"] / rb if rb else 0.0}


def run_point(trace, workload, layers, every, budget_mib, whole, policy, prefetch=False, clustering="adaptive",
              order="step") -> dict:
    budget = whole if budget_mib == "all" else int(budget_mib * MIB)
    r = replay(trace, policy=clustering, budget=0.1, layers=layers, every=every, dram_budget=budget,
               device="ufs4.0", direct_io=False, collect_stats=True, store_kwargs={"cache_policy": policy},
               prefetch=prefetch, order=order)
    decode_steps = trace.length - trace.prefill - sum(b - a for a, b in trace.meta.get("user_spans", []))
    return _row(workload, budget_mib, budget, policy, r.extra["store"], r.recall, decode_steps, r.retrieves, prefetch)


def run_switch_point(traces, layers, every, budget_mib, whole, policy, turn) -> dict:
    """The conversations of ``traces`` taking turns of ``turn`` steps in one store."""
    budget = whole if budget_mib == "all" else int(budget_mib * MIB)
    r = replay_switch(traces, policy="adaptive", budget=0.1, layers=layers, every=every, dram_budget=budget,
                      device="ufs4.0", turn=turn, store_kwargs={"cache_policy": policy})
    return _row("+".join(traces) + f" (turns of {turn})", budget_mib, budget, policy, r["store"], r["recall"],
                r["decode_steps"], r["retrieves"])


def summary(rows) -> list[dict]:
    """Per workload: bytes ratios against cluster at each summary budget, and their medians."""
    out = []
    for w in dict.fromkeys(r["workload"] for r in rows):
        by = {(r["dram_mib"], r["cache_policy"]): r["read_bytes"] for r in rows if r["workload"] == w}
        ratios: dict[str, list[float]] = {"lru": [], "lfu": []}
        for b in SUMMARY_BUDGETS:
            c = by.get((b, "cluster"))
            for base in ratios:
                if c is not None and (b, base) in by:
                    ratios[base].append(by[(b, base)] / c if c else float("inf"))
        if ratios["lru"] or ratios["lfu"]:
            out.append({"workload": w, "budgets_mib": list(SUMMARY_BUDGETS),
                        "lru_over_cluster": ratios["lru"], "lfu_over_cluster": ratios["lfu"],
                        "median_lru_over_cluster": statistics.median(ratios["lru"]) if ratios["lru"] else None,
                        "median_lfu_over_cluster": statistics.median(ratios["lfu"]) if ratios["lfu"] else None})
    return out


def markdown(rows, summ) -> str:
    by = {(r["workload"], r["dram_mib"], r["cache_policy"]): r for r in rows}
    body = []
    for r in rows:
        ratio = []
        for base in ("lru", "lfu"):
            b = by.get((r["workload"], r["dram_mib"], base))
            ratio.append(f"{b['read_bytes'] / r['read_bytes']:.2f}" if b and r["read_bytes"] else "-")
        dram = "whole cache" if r["dram_mib"] == "all" else f"{r['dram_mib']:g} MiB"
        body.append([r["workload"], dram, r["cache_policy"], f"{r['hit_rate']:.3f}",
                     f"{r['read_bytes_per_step'] / 1024:.2f}", f"{r['read_bytes_per_retrieve'] / 1024:.2f}", *ratio,
                     f"{r['recall']:.4f}", f"{r['dram_peak_bytes'] >> 10}{' (over!)' if r['over_budget'] else ''}",
                     f"{r.get('hidden_share', 0.0):.2f}"])
    md = md_table(["workload", "DRAM", "policy", "hit rate", "KiB read / step", "KiB read / retrieve", "lru / this",
                   "lfu / this", "recall", "DRAM peak (KiB)", "read by prefetch"], body, "lllrrrrrrrr") + "\n"
    if summ:
        f = lambda v: ", ".join(f"{x:.3f}" for x in v)  # noqa: E731
        g = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        md += ("\nBytes read, baseline / cluster, at 1, 2 and 4 MiB (median; target: LRU ≥ 1.12, LFU ≥ 1.05)\n\n"
               + md_table(["workload", "lru / cluster", "median", "lfu / cluster", "median"],
                          [[s["workload"], f(s["lru_over_cluster"]), g(s["median_lru_over_cluster"]),
                            f(s["lfu_over_cluster"]), g(s["median_lfu_over_cluster"])] for s in summ], "llrlr") + "\n")
    return md


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--workloads", default="W1,W2,W3")
    ap.add_argument("--budgets", default="0.5,1,1.5,2,3,4,6,all",
                    help="DRAM budgets in MiB, or 'all' (the whole cache)")
    ap.add_argument("--policies", default=",".join(CACHE_POLICIES))
    ap.add_argument("--layers", default="6,12,17,23", help="replayed layers (four, spread over the depth)")
    ap.add_argument("--every", type=int, default=4, help="retrieve every this many decoding steps")
    ap.add_argument("--clustering", default="adaptive",
                    help="the collections' clustering policy (adaptive, static, local, none); "
                         "other than adaptive writes cache_<policy>.json/.md")
    ap.add_argument("--prefetch", action="store_true",
                    help="prefetch each next layer while one retrieves, as the torch adapter does "
                         "(writes cache_prefetch.json/.md)")
    ap.add_argument("--switch", action="store_true",
                    help="the workloads are conversations sharing one store and budget, taking turns "
                         "(writes cache_switch.json/.md)")
    ap.add_argument("--turn", type=int, default=256, help="decoding steps per turn with --switch")
    ap.add_argument("--order", choices=("step", "collection"), default="step",
                    help="step: every layer per decoding step, as decoding runs (default); collection: one "
                         "collection's whole sequence, then the next, no steps marked "
                         "(writes cache_collection.json/.md)")
    ap.add_argument("--out", default=None)
    a = show_defaults(ap).parse_args(argv)
    layers = [int(x) for x in a.layers.split(",")]
    budgets = parse_budgets(a.budgets)
    rows = []
    if a.switch:
        traces = {w: load_trace(w, prefill=512, decode=2048) for w in a.workloads.split(",")}
        whole = 2 * sum(kv_bytes(tr, layers) for tr in traces.values())
        for b in budgets:
            for pol in a.policies.split(","):
                row = run_switch_point(traces, layers, a.every, b, whole, pol, a.turn)
                rows.append(row)
                print(f"{row['workload']} DRAM {b} MiB {pol:7s} hit rate {row['hit_rate']:.3f} read "
                      f"{row['read_bytes_per_step'] / 1024:.2f} KiB/step recall {row['recall']:.4f} "
                      f"peak {row['dram_peak_bytes'] >> 10} KiB swap-in {row['swap_read_bytes'] >> 10} KiB", flush=True)
    for w in ([] if a.switch else a.workloads.split(",")):
        trace = load_trace(w, prefill=512, decode=2048)
        kvb = kv_bytes(trace, layers)
        whole = 2 * kvb  # every entry plus the index and scratch: nothing is evicted
        for b in budgets:
            for pol in a.policies.split(","):
                row = run_point(trace, w, layers, a.every, b, whole, pol, a.prefetch, a.clustering, a.order)
                row["order"] = a.order
                row["clustering"] = a.clustering
                row["kv_bytes"] = kvb
                rows.append(row)
                print(f"{w} DRAM {b} MiB {pol:7s} hit rate {row['hit_rate']:.3f} read "
                      f"{row['read_bytes_per_step'] / 1024:.2f} KiB/step recall {row['recall']:.4f} "
                      f"peak {row['dram_peak_bytes'] >> 10} KiB hidden {row['hidden_share']:.2f}", flush=True)
    summ = summary(rows)
    md = markdown(rows, summ)
    print()
    print(md)
    if a.out:
        name = "cache_switch" if a.switch else "cache_prefetch" if a.prefetch else "cache"
        if a.order == "collection":
            name = "cache_collection"
        if a.clustering != "adaptive":
            name += "_" + a.clustering
        write_results(a.out, name, {"args": vars(a), "rows": rows, "summary": summ}, "Cache policies on real traces",
                      command("kvtier.bench.cache", argv), md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
