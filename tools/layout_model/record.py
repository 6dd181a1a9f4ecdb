"""Record the engine's own cluster events on a trace replay, for the placement model.

Needs an engine built with probe.patch (a measurement hook, not part of kvtier: it writes
one line per event to the file named by $KVTIER_PROBE):

    A <coll> <cluster>                      an entry appended to a cluster (prefill and decode)
    R <coll> <taken> <part> <cl:n:pend:cached>...   a retrieve's selection, before its reads
    S <coll> <src> <first_new> <nt> <cl:n>...       a split (regroup): src keeps child 0
    T                                       Store.step() (one decoding step of every layer)

Build the probed engine in a scratch copy of the checkout (never in the worktree)::

    git archive HEAD | tar -x -C SCRATCH && (cd SCRATCH && patch -p0 < tools/layout_model/probe.patch)
    (cd SCRATCH && python setup.py build_ext --inplace)
    PYTHONPATH=SCRATCH python tools/layout_model/record.py --workload W2 --out events-W2.txt

The replay is kvtier.bench.flash's setting (10 layers, 10% fetch budget every 4 steps, UFS 4.0,
merge gap 0), one policy per process, so that the probe's file holds one store's events.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", default="W1")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=2048)
    ap.add_argument("--layers", default="0,3,6,9,12,15,18,21,24,27")
    ap.add_argument("--dram-budget", default="4MiB")
    ap.add_argument("--policy", default="adaptive")
    ap.add_argument("--layout", default="clustered")
    ap.add_argument("--out", required=True, help="event log (the probe writes it)")
    a = ap.parse_args(argv)
    os.environ["KVTIER_PROBE"] = a.out  # read by the probe at its first event
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import kvtier
    from kvtier.bench.capture import load_trace
    from kvtier.bench.kvreplay import LAYOUTS, replay
    trace = load_trace(a.workload, prefill=a.prefill, decode=a.decode)
    layers = [int(x) for x in a.layers.split(",")]
    r = replay(trace, policy=a.policy, budget=0.1, layers=layers, every=4,
               dram_budget=kvtier.parse_size(a.dram_budget), device="ufs4.0", direct_io=True,
               collect_stats=True, store_kwargs={"merge_gap": 0}, **LAYOUTS[a.layout])
    st = r.extra["store"]
    cs = r.extra["collections"]
    summary = {
        "args": vars(a), "recall": r.recall, "retrieves": r.retrieves, "steps": r.steps,
        "mean_contiguous_entries": st["mean_contiguous_entries"],
        "modeled_io_seconds": st["modeled_io_seconds"], "read_ops": st["read_ops"],
        "read_bytes": st["read_bytes"], "cache_hits": st["cache_hits"], "cache_misses": st["cache_misses"],
        "split_write_bytes": sum(c["split_write_bytes"] for c in cs),
        "append_bytes": sum(c["append_bytes"] for c in cs),
        "data_file_bytes": sum(c["data_file_bytes"] for c in cs),
        "head_dim": trace.head_dim, "n_kv_heads": trace.n_kv_heads, "layers": layers,
    }
    with open(a.out + ".json", "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
