"""The resident index per stored entry: what ``kvtier.estimate`` says and what the engine holds.

Issue 26 asks for at most 8 bytes of resident index per stored entry at default settings,
measured by ``kvtier.estimate`` and by ``stats()["dram_by_use"]["index"]`` on real keys. This
benchmark prints both:

- ``estimate``: ``kvtier.estimate(n, 64).resident_bytes_per_entry`` (the minimum's index, no growth
  slack) at 2.5K, 8K and 1M entries, for every policy;
- ``real``: captured SmolLM2 keys and values (W1 at 512+2048 tokens, W2 at 4096+4096;
  layers 0 and 10, 3 KV heads each: one collection per head) at 64 MiB, the prefill added
  in one batch, then one token per decoding step with a retrieve of 10% every 8 steps and
  ``Store.step()`` after each, as a KV cache uses the store; at the end the index bytes the
  engine holds (``dram_by_use["index"]``) over the entries stored.

    python -m kvtier.bench.resident --out bench/results [--policies adaptive,static]
"""
from __future__ import annotations

import argparse
import math
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

import kvtier
from kvtier.bench.tables import md_table, save
from kvtier.benchargs import show_defaults
from kvtier.config import POLICIES

TITLE = "Resident index per stored entry (issue 26)"
TRACES = {"W1": (512, 2048), "W2": (4096, 4096)}
SIZES = (2560, 8192, 1 << 20)


def estimates(policies) -> list[dict]:
    return [{"policy": p, "entries": n, "per_entry": kvtier.estimate(n, 64, policy=p).resident_bytes_per_entry}
            for p in policies for n in SIZES]


def measure(trace, policy: str, layers, every: int = 8, budget: float = 0.1) -> dict:
    """Stores the trace's keys as a KV cache does (see the module's text) and returns the
    index bytes per stored entry at the end, with the estimate for that many entries."""
    P, T, g = trace.prefill, trace.length, trace.group_size
    with tempfile.TemporaryDirectory() as d:
        store = kvtier.open(d, dram_budget=64 << 20)
        try:
            colls = {(layer, h): store.collection(f"L{layer}.H{h}", dim=trace.head_dim, value_dim=trace.head_dim,
                                                  dtype="float16", policy=policy)
                     for layer in layers for h in range(trace.n_kv_heads)}
            for (layer, h), c in colls.items():
                c.add(trace.keys[layer, h, :P], trace.values[layer, h, :P])
            for t in range(P, T):
                for (layer, h), c in colls.items():
                    c.add(trace.keys[layer, h, t:t + 1], trace.values[layer, h, t:t + 1])
                    if (t - P) % every == 0:
                        c.retrieve(trace.queries[layer, h * g:(h + 1) * g, t].astype(np.float32),
                                   budget=math.ceil(budget * (t + 1)))
                store.step()
            st = store.stats()
            n = sum(len(c) for c in colls.values())
            cs = [c.stats() for c in colls.values()]
            index = st["dram_by_use"]["index"]
        finally:
            store.close()
    est = kvtier.estimate(T, trace.head_dim, value_dim=trace.head_dim, policy=policy)
    return {"workload": trace.workload, "policy": policy, "entries": n, "collections": len(layers) * trace.n_kv_heads,
            "index_bytes": index, "per_entry": index / n,
            "clusters": sum(x["clusters"] for x in cs), "pools": sum(x["pools"] for x in cs),
            "estimate_per_entry": est.resident_bytes_per_entry}


def markdown(est_rows, real_rows) -> str:
    pols = list(dict.fromkeys(r["policy"] for r in est_rows))
    e = md_table(["policy", *[f"{n:,}" for n in SIZES]],
                 [[p, *[f"{r['per_entry']:.2f}" for r in est_rows if r["policy"] == p]] for p in pols], "l" + "r" * 3)
    r = md_table(["trace", "policy", "entries", "clusters", "pools", "index bytes", "B/entry", "estimate B/entry"],
                 [[x["workload"], x["policy"], f"{x['entries']:,}", f"{x['clusters']:,}", f"{x['pools']:,}",
                   f"{x['index_bytes']:,}", f"{x['per_entry']:.2f}", f"{x['estimate_per_entry']:.2f}"]
                  for x in real_rows], "llrrrrrr")
    return ("Resident index per stored entry, `kvtier.estimate(n, 64)` (bytes):\n\n" + e +
            "\nMeasured on real SmolLM2 keys (layers 0 and 10, 3 KV heads, 64 MiB), "
            "`stats()['dram_by_use']['index']` over the entries stored:\n\n" + r)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--workloads", default=",".join(TRACES))
    ap.add_argument("--layers", default="0,10")
    ap.add_argument("--every", type=int, default=8)
    args = show_defaults(ap).parse_args(argv)
    t0 = time.time()
    pols = args.policies.split(",")
    for p in pols:
        if p not in POLICIES:
            ap.error(f"--policies: {p!r} is not one of {', '.join(POLICIES)}")
    layers = [int(x) for x in args.layers.split(",")]
    est_rows = estimates(pols)
    for r in est_rows:
        print(f"estimate {r['policy']:8s} {r['entries']:>9,}: {r['per_entry']:.2f} B/entry", flush=True)
    from kvtier.bench.capture import load_trace
    real_rows = []
    for wl in args.workloads.split(","):
        if wl not in TRACES:
            ap.error(f"--workloads: {wl!r} is not one of {', '.join(TRACES)}")
        trace = load_trace(wl, prefill=TRACES[wl][0], decode=TRACES[wl][1], progress=False)
        for p in pols:
            r = measure(trace, p, layers, args.every)
            real_rows.append(r)
            print(f"real {wl} {p:8s} {r['entries']:,} entries: index {r['index_bytes']:,} B = "
                  f"{r['per_entry']:.2f} B/entry, {r['clusters']} clusters, {r['pools']} pools "
                  f"(estimate {r['estimate_per_entry']:.2f})", flush=True)
            save(args.out, "resident", TITLE, "kvtier.bench.resident", argv, args, t0,
                 {"estimate": est_rows, "real": real_rows}, markdown(est_rows, real_rows))


if __name__ == "__main__":
    main()
