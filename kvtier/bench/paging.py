"""Do splits and retrieves depend on the DRAM budget? A real KV trace replayed on two stores in
lockstep (docs/design.md §2.3, issue 26).

Every (layer, KV head) of the trace is an adaptive collection in each store, as TieredCache
makes them: the prefill (sinks and window aside) in one add, then per decoding step the token
leaving the window added and a retrieve of ``--budget`` of the context with the step's query
group. One store has a tight budget (by default 5% of the trace's float16 KV, so that most
layers are paged out while another runs), the other a large one. After the prefill and after
every step the two are compared: each collection's cluster sizes and split counters, and
each retrieve's ids. Any difference is printed where it first appears and counted.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time

import numpy as np

import kvtier
from kvtier.bench.tables import command, md_table, write_results
from kvtier.benchargs import show_defaults

COUNTERS = ("clusters", "splits", "forced_loads", "unsplittable", "split_skipped", "split_errors")


def _budget(spec: str, kv_bytes: int) -> int:
    """'5%' of the trace's float16 KV, or a size ('64MiB', bytes)."""
    if spec.endswith("%"):
        return int(float(spec[:-1]) / 100 * kv_bytes)
    return kvtier.parse_size(spec)


def _state(colls: dict) -> dict:
    return {key: (tuple(c.stats()[k] for k in COUNTERS), tuple(c.cluster_sizes().tolist()))
            for key, c in colls.items()}


def _differing(a: dict, b: dict) -> list:
    return [key for key in a if a[key] != b[key]]


def run(workload: str, prefill: int, steps: int, budgets: list[str], fetch: float, sinks: int = 4,
        window: int = 32, trace_prefill: int = 4096, trace_decode: int = 4096) -> dict:
    from kvtier.bench.capture import load_trace
    tr = load_trace(workload, prefill=trace_prefill, decode=trace_decode, progress=False)
    if not (sinks + window < prefill and prefill + steps <= tr.length):
        raise ValueError(f"prefill + steps must lie inside the trace ({tr.length} tokens) and prefill exceed "
                         f"sinks + window")
    g, d = tr.group_size, tr.head_dim
    kv_bytes = tr.n_layers * tr.n_kv_heads * (prefill + steps) * d * 2 * 2
    sizes = [_budget(b, kv_bytes) for b in budgets]
    stores, grids, tmps = [], [], []
    row: dict = {"workload": workload, "prefill": prefill, "steps": steps, "fetch": fetch, "budgets": sizes,
                 "collections": tr.n_layers * tr.n_kv_heads}
    for size in sizes:
        tmp = tempfile.TemporaryDirectory(prefix="kvtier-paging-")
        tmps.append(tmp)
        st = kvtier.open(tmp.name, dram_budget=size, device="ufs4.0", direct_io=False)
        t0 = time.perf_counter()
        colls = {}
        for la in range(tr.n_layers):
            for h in range(tr.n_kv_heads):
                c = st.collection(f"L{la}.H{h}", dim=d, value_dim=d, dtype="float16", policy="adaptive")
                c.add(tr.keys[la, h, sinks:prefill - window], tr.values[la, h, sinks:prefill - window])
                colls[la, h] = c
        print(f"DRAM {size:,}: prefill of {len(colls)} collections in {time.perf_counter() - t0:.1f} s", flush=True)
        stores.append(st)
        grids.append(colls)
    try:
        first = _differing(*[_state(g_) for g_ in grids])
        row["differing_after_prefill"] = len(first)
        in_store = prefill - window
        steps_differing = retrieves_differing = 0
        for t in range(prefill, prefill + steps):
            lo, in_store = in_store, max(in_store, t - window + 1)
            nb = math.ceil(fetch * (t + 1))
            got = []
            for st, colls in zip(stores, grids, strict=True):
                ids = {}
                for (la, h), c in colls.items():
                    if lo < in_store:
                        c.add(tr.keys[la, h, lo:in_store], tr.values[la, h, lo:in_store])
                    q = tr.queries[la, h * g:(h + 1) * g, t].astype(np.float32)
                    ids[la, h] = c.retrieve(q, budget=nb).ids.tolist()
                st.step()
                got.append(ids)
            bad = _differing(*got)
            if bad:
                steps_differing += 1
                retrieves_differing += len(bad)
                if steps_differing == 1:
                    print(f"step {t}: retrieves differ in {len(bad)} collections, first {bad[:4]}", flush=True)
        row["differing_at_end"] = len(_differing(*[_state(g_) for g_ in grids]))
        row["steps_differing"] = steps_differing
        row["retrieves_differing"] = retrieves_differing
        row["retrieves"] = steps * len(grids[0])
        row["splits"] = [sum(c.stats()["splits"] for c in g_.values()) for g_ in grids]
        row["pending_flushes"] = [sum(c.stats()["pending_flushes"] for c in g_.values()) for g_ in grids]
        row["store"] = [{k: st.stats()[k] for k in ("dram_peak_bytes", "swap_pressure_outs", "swap_write_bytes",
                                                    "read_bytes", "modeled_io_seconds")} for st in stores]
    finally:
        for st in stores:
            st.close()
        for tmp in tmps:
            tmp.cleanup()
    return row


def markdown(rows: list[dict]) -> str:
    body = []
    for r in rows:
        a, b = r["budgets"]
        body.append([r["workload"], f"{r['prefill']:,} + {r['steps']}", r["collections"], f"{a:,}", f"{b:,}",
                     r["differing_after_prefill"], r["differing_at_end"],
                     f"{r['retrieves_differing']} of {r['retrieves']:,}", f"{r['splits'][0]} / {r['splits'][1]}",
                     f"{r['store'][0]['swap_pressure_outs']:,}", f"{r['store'][0]['dram_peak_bytes']:,}"])
    return md_table(["trace", "prefill + steps", "collections", "tight budget", "large budget",
                     "collections differing after prefill", "... at the end", "retrieves differing",
                     "splits (tight / large)", "page-outs (tight)", "peak (tight)"], body, "lrrrrrrrrrr")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workloads", default="W2", help="comma-separated traces")
    ap.add_argument("--prefill", type=int, default=7900)
    ap.add_argument("--steps", type=int, default=64, help="decoding steps replayed after the prefill")
    ap.add_argument("--budgets", default="5%,64MiB",
                    help="two DRAM budgets: a share of the trace's float16 KV ('5%%') or a size")
    ap.add_argument("--fetch", type=float, default=0.1, help="entries a retrieve fetches, share of the context")
    ap.add_argument("--out", default=None)
    a = show_defaults(ap).parse_args(argv)
    budgets = a.budgets.split(",")
    if len(budgets) != 2:
        raise SystemExit("--budgets: two budgets expected")
    rows = [run(wl, a.prefill, a.steps, budgets, a.fetch) for wl in a.workloads.split(",")]
    md = markdown(rows)
    print(md)
    if a.out:
        write_results(a.out, "paging", {"args": vars(a), "rows": rows}, "Splits and retrieves against the DRAM budget",
                      command("kvtier.bench.paging", argv), md)
    return 0 if all(r["differing_at_end"] == 0 and r["retrieves_differing"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
