"""Recall@10 of ``search`` at its default nprobe (no nprobe given), on random and real vectors.

Each data set is stored in a fresh collection with default parameters (float16, inner
product, the adaptive policy, value_dim 0), flushed, reopened cold, then searched with
``search(queries, k=10)``: the collection chooses its nprobe (``Collection.default_nprobe``:
an exact measure on sample queries drawn from a Gaussian fitted to its keys). Recall@10 is
against exact top-10 by numpy on the same float16 keys. For comparison the table also gives
the recall at the rule used before (1/16 of the clusters, at least 8) and the reads per query.

Data sets:
  ``random10k``  10,000 standard-normal 64-d keys, 1,000 standard-normal queries
  ``random1m``   1,000,000 of them, 1,000 queries (about 11 minutes to build here, niced)
  ``real``       W4: post-RoPE keys of SmolLM2 pooled over layers and heads, with the model's
                 own queries (``kvtier.bench.capture.w4_vectors``, from a trace under
                 KVTIER_TRACE_DIR; 200,000 keys, 1,000 queries)

    python -m kvtier.bench.nprobe_default --out bench/results
    python -m kvtier.bench.nprobe_default --datasets random10k --out /tmp/r
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np

import kvtier
from kvtier.bench.tables import md_table, write_results
from kvtier.benchargs import show_defaults

DATASETS = ("random10k", "random1m", "real")
K = 10


def exact_top(keys: np.ndarray, queries: np.ndarray, k: int = K, block: int = 50_000) -> np.ndarray:
    """Exact top-k ids by inner product, in blocks of keys (float32 products)."""
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.zeros((len(queries), k), np.int64)
    for a in range(0, len(keys), block):
        s = queries @ keys[a:a + block].astype(np.float32).T
        i = np.argpartition(-s, min(k, s.shape[1] - 1), axis=1)[:, :k]
        cs = np.concatenate([best_s, np.take_along_axis(s, i, 1)], 1)
        ci = np.concatenate([best_i, i + a], 1)
        o = np.argsort(-cs, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(cs, o, 1), np.take_along_axis(ci, o, 1)
    return best_i


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / len(t) for f, t in zip(found, truth, strict=True)]))


def load(name: str, seed: int, n_queries: int):
    rng = np.random.default_rng(seed)
    if name.startswith("random"):
        n = {"random10k": 10_000, "random1m": 1_000_000}[name]
        return (rng.standard_normal((n, 64)).astype(np.float16),
                rng.standard_normal((n_queries, 64)).astype(np.float32), f"standard normal, {n:,} x 64")
    from kvtier.bench.capture import w4_vectors

    w4 = w4_vectors(200_000, n_queries, seed, workload=os.environ.get("KVTIER_W4_WORKLOAD", "W2"), progress=False)
    src = w4.meta["source"]
    return (w4.keys.astype(np.float16), w4.queries.astype(np.float32),
            f"W4: SmolLM2 post-RoPE keys, {src['workload']} {src['prefill']}+{src['decode']}, "
            f"{len(w4.keys):,} keys")


def run_one(name: str, root: str, seed: int, n_queries: int, budget: str) -> dict:
    keys, queries, what = load(name, seed, n_queries)
    truth = exact_top(keys, queries)
    path = os.path.join(root, name)
    t0 = time.perf_counter()
    with kvtier.open(path, dram_budget=budget, create=True) as s:
        c = s.collection("v", dim=keys.shape[1], value_dim=0)
        for a in range(0, len(keys), 100_000):
            c.add(keys[a:a + 100_000])
            print(f"  {name}: added {min(a + 100_000, len(keys)):,} of {len(keys):,}", flush=True)
    build = time.perf_counter() - t0
    with kvtier.open(path, dram_budget=budget) as s:  # cold: the choice is made on first search
        c = s.collection("v")
        clusters = int(c.stats()["clusters"])
        t0 = time.perf_counter()
        nprobe = c.default_nprobe()
        tune_s = time.perf_counter() - t0
        auto = dict(c.params.get("nprobe_auto") or {})
        s.reset_io_stats()
        t0 = time.perf_counter()
        found = c.search(queries, k=K).ids
        search_s = time.perf_counter() - t0
        st = s.stats()
        old = max(8, -(-clusters // 16))
        found_old = c.search(queries, k=K, nprobe=old).ids
    shutil.rmtree(path, ignore_errors=True)
    return {"dataset": name, "what": what, "entries": len(keys), "queries": len(queries), "clusters": clusters,
            "default_nprobe": nprobe, "share_probed": nprobe / clusters, "recall_at_default": recall(found, truth),
            "tuned_on_sample": auto, "tune_seconds": tune_s, "old_rule_nprobe": old,
            "recall_at_old_rule": recall(found_old, truth), "build_seconds": build,
            "search_ms_per_query": 1e3 * search_s / len(queries),
            "read_bytes_per_query": st["read_bytes"] / len(queries), "dram_budget": budget}


def write(args, command: str, rows: list[dict], final: bool) -> None:
    """Prints the table (at the end) and, with --out, writes nprobe_default.json and .md."""
    head = ["data set", "entries", "clusters", "default nprobe", "share read", "recall@10", "old rule nprobe",
            "old rule recall@10", "ms/query", "KiB read/query", "choice took s"]
    table = md_table(head, [[r["dataset"], f"{r['entries']:,}", f"{r['clusters']:,}", r["default_nprobe"],
                             f"{r['share_probed']:.1%}", f"{r['recall_at_default']:.3f}", r["old_rule_nprobe"],
                             f"{r['recall_at_old_rule']:.3f}", f"{r['search_ms_per_query']:.2f}",
                             f"{r['read_bytes_per_query'] / 1024:.0f}", f"{r['tune_seconds']:.1f}"] for r in rows],
                     "lrrrrrrrrrr")
    md = (f"{table}\n\n"
          + "\n".join(f"- {r['dataset']}: {r['what']}; {r['queries']} queries; built in {r['build_seconds']:.0f} s"
                      for r in rows) + "\n\n"
          "The default nprobe is measured on the collection (`Collection.tune_nprobe`: the fewest clusters "
          "with which 64 sample queries drawn from a Gaussian fitted to the stored keys find 95% of their "
          "true top-10) and kept; the recall column is on the data set's own queries. The old rule probed "
          "1/16 of the clusters, at least 8.\n")
    if final:
        print(md)
    if args.out:
        meta = {"command": command, "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
                "versions": {"kvtier": kvtier.__version__, "numpy": np.__version__,
                             "python": platform.python_version()},
                "params": vars(args), "complete": final, "results": rows}
        write_results(args.out, "nprobe_default", meta, "Recall@10 at search's default nprobe", command, md,
                      default=lambda o: o.item() if hasattr(o, "item") else str(o))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvtier.bench.nprobe_default", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated, of " + ", ".join(DATASETS))
    ap.add_argument("--queries", type=int, default=1000, help="queries per data set")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random data and the query draws")
    ap.add_argument("--dram-budget", default="256MiB", help="the store's DRAM budget")
    ap.add_argument("--out", default=None, help="directory for nprobe_default.json and .md (default: print only)")
    args = show_defaults(ap).parse_args(argv)
    names = [d.strip() for d in args.datasets.split(",") if d.strip()]
    bad = [d for d in names if d not in DATASETS]
    if bad:
        ap.error(f"--datasets: unknown {bad}; choose from {DATASETS}")
    command = "python -m kvtier.bench.nprobe_default " + " ".join(argv if argv is not None else sys.argv[1:])
    root = tempfile.mkdtemp(prefix="kvt-nprobe-")
    rows: list[dict] = []
    try:
        for name in names:
            print(f"{name} ...", flush=True)
            rows.append(run_one(name, root, args.seed, args.queries, args.dram_budget))
            r = rows[-1]
            print(f"  recall@10 {r['recall_at_default']:.3f} at the default nprobe {r['default_nprobe']} of "
                  f"{r['clusters']} clusters (old rule {r['old_rule_nprobe']}: {r['recall_at_old_rule']:.3f})",
                  flush=True)
            # the rows so far, after each data set: a killed run keeps what it finished
            write(args, command.strip(), rows, final=len(rows) == len(names))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
