"""A memory-bounded engine at phone-sized DRAM budgets: does it run, what does it cost, and
did ``kvtier.estimate`` say so in advance.

Four cases (issues 17 and 26):

- ``small``: 49,152 entries of 64-d float16 keys and values (12.6 MB) in one collection at a
  DRAM budget of 10% of the data, added in batches of 4096 and in one batch, for every
  policy: whether the adds succeed, search recall@10 against exact top-10 (and the same run
  at 64 MiB, side by side), the engine's DRAM peak by use against the budget, and the
  estimate beside the measured peaks.
- ``real``: 49,152 real keys and values (SmolLM2's W2 trace at 8K tokens, layers 0 and 10)
  in one collection at 10% of the data, in batches of 4096 and in one batch: adds, search
  recall@10 (at the default nprobe, and at the nprobe ``tune_nprobe`` finds on 200 held-out
  real queries for recall@10 0.95), a retrieve and a get of 1,000 ids, beside the same at
  64 MiB.
- ``kv``: a captured SmolLM2 trace replayed as a KV cache (bench.kvreplay), 4 layers x 3 KV
  heads, 10% fetch budget, UFS 4.0 profile, at 1 MiB and at 64 MiB of DRAM: recall of every
  policy at both, and the I/O per decoding step.
- ``large``: 1,048,576 entries of 64-d float16 at 5% of the data: ingest, search, reopen;
  resident bytes per entry, and the process RSS growth beside the engine's accounting.

The data of ``small`` and ``large`` is a Gaussian mixture (seeded): clustered like real keys,
so recall measures the index and not the noise. Numbers are from one deterministic run per
setting (the engine is deterministic; wall times are not reported as results).

    python -m kvtier.bench.memory --out bench/results [--cases small,kv,large]
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

import kvtier
from kvtier.bench.tables import command, md_table, write_results
from kvtier.benchargs import show_defaults
from kvtier.config import POLICIES

TUNED_TARGET = 0.95  # issue 26's recall target for the real keys


def mixture(n: int, d: int, seed: int, centers: int = 512):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, d)).astype(np.float32) * 2.0
    lab = rng.integers(0, centers, n)
    keys = (c[lab] + rng.standard_normal((n, d)).astype(np.float32)).astype(np.float16)
    vals = rng.standard_normal((n, d)).astype(np.float16)
    q = (c[rng.integers(0, centers, 200)] + rng.standard_normal((200, d)).astype(np.float32))
    return keys, vals, q.astype(np.float32)


def exact_top(keys: np.ndarray, q: np.ndarray, k: int = 10) -> np.ndarray:
    kf = keys.astype(np.float32)
    out = np.empty((len(q), k), np.int64)
    for i in range(0, len(q), 50):
        s = q[i:i + 50] @ kf.T
        out[i:i + 50] = np.argsort(-s, axis=1)[:, :k]
    return out


def recall_at(ids: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ids.tolist(), truth.tolist(), strict=True)]))


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def run_collection(keys, vals, q, truth, budget, policy, batch, coll_kwargs=None, reopen=False, tune=None):
    """Adds keys/values in batches into a fresh store, searches, optionally reopens and
    searches again. Returns a result row. ``tune``: held-out queries (not ``q``) on which
    ``tune_nprobe`` finds the clusters a search must read for recall@10 TUNED_TARGET; the
    row then has the recall of ``q`` at that nprobe beside the default's."""
    n, d = keys.shape
    row = {"policy": policy, "batch": batch, "dram_budget": budget, "n": n}
    est = kvtier.estimate(n, d, dtype="float16", policy=policy, dram_budget=budget, **(coll_kwargs or {}))
    row["estimate"] = est.as_dict()
    with tempfile.TemporaryDirectory(prefix="kvtier-mem-") as t:
        rss0 = rss_bytes()
        s = kvtier.open(t, dram_budget=budget, device="ufs4.0", direct_io=False)
        try:
            c = s.collection("c", dim=d, value_dim=d, dtype="float16", policy=policy, **(coll_kwargs or {}))
            added, t0 = 0, time.perf_counter()
            try:
                for i in range(0, n, batch):
                    c.add(keys[i:i + batch], vals[i:i + batch])
                    added += len(keys[i:i + batch])
                row["add"] = "ok"
            except kvtier.BudgetError as e:
                row["add"] = f"BudgetError after {added} entries: {e}"
            row["add_s"] = time.perf_counter() - t0
            row["added"] = added
            st = s.stats()
            row["after_add"] = {k: st[k] for k in ("dram_bytes", "dram_peak_bytes", "dram_by_use",
                                                   "dram_peak_by_use", "dram_fixed_peak_bytes")}
            if added == n:
                row["default_nprobe"] = c.default_nprobe()
                hits = c.search(q, k=10)
                row["recall@10"] = recall_at(hits.ids, truth)
                cs = c.stats()
                row["clusters"] = cs["clusters"]
                if tune is not None and policy != "none":
                    tuned = c.tune_nprobe(tune, k=10, target=TUNED_TARGET, keep=False)
                    row["tuned_nprobe"] = tuned["nprobe"]
                    row["tuned_recall@10"] = recall_at(c.search(q, k=10, nprobe=tuned["nprobe"]).ids, truth)
                # the other reads a user makes, under the same budget: a retrieve of 10% and a
                # get of a thousand ids spread over the collection
                r = c.retrieve(q[:4], budget=0.1)
                ids = np.linspace(0, n - 1, 1000).astype(np.int64)
                got = c.get(ids)
                row["retrieve_entries"] = len(r.ids)
                row["get_ok"] = bool(np.array_equal(np.asarray(got.keys, np.float16), keys[ids]))
            st = s.stats()
            row["dram_peak_bytes"] = st["dram_peak_bytes"]
            row["dram_fixed_peak_bytes"] = st["dram_fixed_peak_bytes"]
            row["dram_peak_by_use"] = st["dram_peak_by_use"]
            row["index_bytes"] = st["dram_by_use"]["index"]
            row["resident_bytes_per_entry"] = st["dram_by_use"]["index"] / max(added, 1)
            row["rss_growth_bytes"] = rss_bytes() - rss0
        finally:
            s.close()
        if reopen and row.get("add") == "ok":
            rss1 = rss_bytes()
            with kvtier.open(t, dram_budget=budget, device="ufs4.0", direct_io=False) as s2:
                c2 = s2.collection("c")
                row["reopen_count"] = len(c2)
                hits = c2.search(q, k=10)
                row["reopen_recall@10"] = recall_at(hits.ids, truth)
                st = s2.stats()
                row["reopen_dram_peak_bytes"] = st["dram_peak_bytes"]
                row["reopen_index_bytes"] = st["dram_by_use"]["index"]
            row["reopen_rss_growth_bytes"] = rss_bytes() - rss1
    row["peak_within_budget"] = row["dram_peak_bytes"] <= budget
    return row


def _sweep(name, keys, vals, q, truth, policies, out_rows, more, tune=None):
    """One collection per policy, added in batches of 4096 and in one batch, at 10% of the data
    and at 64 MiB; ``more(r)`` is what the progress line adds for the case; ``tune`` as in
    run_collection."""
    data = keys.nbytes + vals.nbytes
    for policy in policies:
        for batch in (4096, len(keys)):
            for budget in (data // 10, 64 << 20):
                r = run_collection(keys, vals, q, truth, budget, policy, batch, tune=tune)
                r["case"] = name
                r["dram_share"] = budget / data
                out_rows.append(r)
                print(f"{name} {policy:8s} batch {batch:6d} DRAM {budget:>9,}: {r['add'][:60]:60s} "
                      f"recall@10 {r.get('recall@10', float('nan')):.3f} {more(r)}", flush=True)


def case_small(policies, out_rows):
    keys, vals, q = mixture(49_152, 64, 0)
    _sweep("small", keys, vals, q, exact_top(keys, q), policies, out_rows,
           lambda r: f"peak {r['dram_peak_bytes']:,} fixed peak {r['dram_fixed_peak_bytes']:,} "
                     f"estimate min {r['estimate']['minimum']:,}")


def case_real(policies, out_rows):
    """49,152 real keys and values in one collection (SmolLM2, W2 at 8K tokens: layers 0 and
    10, 3 KV heads each) at 10% of the data, added in batches of 4096 and in one batch."""
    from kvtier.bench.capture import load_trace
    tr = load_trace("W2", prefill=4096, decode=4096, progress=False)
    keys = np.ascontiguousarray(tr.keys[[0, 10]].reshape(-1, tr.head_dim), np.float16)
    vals = np.ascontiguousarray(tr.values[[0, 10]].reshape(-1, tr.head_dim), np.float16)
    rng = np.random.default_rng(3)
    qs = tr.queries[[0, 10]].reshape(-1, tr.head_dim)
    pick = rng.choice(len(qs), 400, replace=False)
    q, held_out = qs[pick[:200]].astype(np.float32), qs[pick[200:]].astype(np.float32)
    _sweep("real", keys, vals, q, exact_top(keys, q), policies, out_rows,
           lambda r: f"retrieve {r.get('retrieve_entries')} get {r.get('get_ok')} peak {r['dram_peak_bytes']:,} "
                     f"nprobe {r.get('default_nprobe')}/{r.get('clusters')} tuned {r.get('tuned_nprobe')} "
                     f"recall {r.get('tuned_recall@10', float('nan')):.3f}", tune=held_out)


def case_kv(policies, out_rows, layers, every, workloads=("W1",), drams=(1 << 20, 64 << 20)):
    from kvtier.bench.capture import load_trace
    for wl in workloads:
        trace = load_trace(wl, prefill=512, decode=2048, progress=False)
        for policy in policies:
            for dram in drams:
                case_kv_one(trace, wl, policy, dram, out_rows, layers, every)


def case_kv_one(trace, wl, policy, dram, out_rows, layers, every):
    from kvtier.bench.kvreplay import replay
    n_per = trace.length
    row = {"case": "kv" if wl == "W1" else f"kv {wl}", "policy": policy, "dram_budget": dram, "layers": layers,
           "every": every, "workload": wl}
    est = kvtier.estimate(n_per, trace.head_dim, policy=policy, collections=len(layers) * trace.n_kv_heads,
                          dram_budget=dram)
    row["estimate"] = est.as_dict()
    try:
        r = replay(trace, policy=policy, budget=0.1, layers=layers, every=every, dram_budget=dram,
                   device="ufs4.0", direct_io=False, collect_stats=True)
    except kvtier.BudgetError as e:
        row["result"] = f"BudgetError: {e}"
        print(f"kv {wl} {policy:8s} DRAM {dram:>9,}: {row['result'][:100]}", flush=True)
        out_rows.append(row)
        return
    st = r.extra["store"]
    steps = max(1, r.retrieves // (len(layers) * trace.n_kv_heads))
    row.update(result="ok", recall=r.recall, retrieves=r.retrieves,
               read_bytes_per_step=st["read_bytes"] / steps, read_ops_per_step=st["read_ops"] / steps,
               modeled_io_ms_per_step=st["modeled_io_seconds"] / steps * 1e3,
               dram_peak_bytes=st["dram_peak_bytes"], dram_fixed_peak_bytes=st["dram_fixed_peak_bytes"],
               dram_peak_by_use=st["dram_peak_by_use"], swap_pressure_outs=st["swap_pressure_outs"],
               swap_write_bytes_per_step=st["swap_write_bytes"] / steps)
    out_rows.append(row)
    print(f"kv {wl} {policy:8s} DRAM {dram:>9,}: recall {r.recall:.4f} read {row['read_bytes_per_step'] / 1024:.1f} "
          f"KiB/step modeled {row['modeled_io_ms_per_step']:.3f} ms/step peak {st['dram_peak_bytes']:,} "
          f"fixed peak {st['dram_fixed_peak_bytes']:,} estimate min {est.minimum:,}", flush=True)


def case_large(out_rows, policy, coll_kwargs):
    n, d = 1 << 20, 64
    keys, vals, q = mixture(n, d, 1, centers=4096)
    truth = exact_top(keys, q)
    budget = (keys.nbytes + vals.nbytes) // 20
    r = run_collection(keys, vals, q, truth, budget, policy, 65536, coll_kwargs=coll_kwargs, reopen=True)
    r["case"] = "large"
    r["collection_params"] = coll_kwargs
    out_rows.append(r)
    print(f"large {policy} {coll_kwargs} DRAM {budget:,}: {r['add'][:80]} "
          f"recall@10 {r.get('recall@10', float('nan')):.3f} reopen {r.get('reopen_count')} "
          f"peak {r['dram_peak_bytes']:,} resident {r['resident_bytes_per_entry']:.2f} B/entry "
          f"RSS growth {r['rss_growth_bytes']:,} estimate min {r['estimate']['minimum']:,}", flush=True)


def markdown(rows) -> str:
    body = []
    for r in rows:
        res = r.get("add", r.get("result", ""))
        res = "ok" if res == "ok" else res.split(":")[0]
        rec = r.get("recall@10", r.get("recall"))
        fixed = r.get("dram_fixed_peak_bytes")
        em = r["estimate"]["minimum"]
        io = r.get("read_bytes_per_step")
        ms = r.get("modeled_io_ms_per_step")
        body.append([r["case"], r["policy"], r.get("batch", ""), f"{r['dram_budget']:,}", res,
                     "" if rec is None else f"{rec:.4f}", "" if io is None else f"{io / 1024:.1f}",
                     "" if ms is None else f"{ms:.3f}", f"{r.get('dram_peak_bytes', 0):,}", f"{fixed or 0:,}",
                     f"{em:,}", "" if not fixed else f"{em / fixed:.2f}"])
    return md_table(["case", "policy", "batch", "DRAM budget", "result", "recall", "KiB read/step",
                     "modeled I/O ms/step", "DRAM peak", "non-cache peak", "estimate min", "est/non-cache"],
                    body, "llrrlrrrrrrr") + "\n" + tuned_table(rows)


def tuned_table(rows) -> str:
    """Search at the default nprobe and at the nprobe tune_nprobe found on held-out queries
    for recall@10 TUNED_TARGET (the route the docs give for queries unlike the keys)."""
    body = [[r["case"], r["policy"], r.get("batch", ""), f"{r['dram_budget']:,}", r["clusters"], r["default_nprobe"],
             f"{r['recall@10']:.4f}", r["tuned_nprobe"], f"{r['tuned_recall@10']:.4f}"]
            for r in rows if "tuned_nprobe" in r]
    if not body:
        return ""
    return ("\n## Search recall at the default nprobe and tuned on held-out queries for recall@10 "
            f"{TUNED_TARGET}\n\n" + md_table(["case", "policy", "batch", "DRAM budget", "clusters", "default nprobe",
                                                "recall@10", "tuned nprobe", "tuned recall@10"],
                                               body, "llrrrrrrr") + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="small,kv,large")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--layers", default="0,10,20,29")
    ap.add_argument("--every", type=int, default=16)
    ap.add_argument("--workloads", default="W1", help="kv case: comma-separated traces (W1,W2,W3)")
    ap.add_argument("--kv-budgets", default="1MiB,64MiB", help="kv case: comma-separated DRAM budgets")
    ap.add_argument("--large-policy", default="adaptive")
    ap.add_argument("--large-cluster-size", type=int, default=128,
                    help="init_cluster_size of the large case (max_cluster_size twice it)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--name", default=None,
                    help="file stem of the JSON and Markdown written under --out (default memory_<cases>)")
    a = show_defaults(ap).parse_args(argv)
    rows: list[dict] = []
    policies = a.policies.split(",")
    cases = a.cases.split(",")
    if "small" in cases:
        case_small(policies, rows)
    if "real" in cases:
        case_real(policies, rows)
    if "kv" in cases:
        drams = [kvtier.parse_size(x) for x in a.kv_budgets.split(",")]
        case_kv(policies, rows, [int(x) for x in a.layers.split(",")], a.every, a.workloads.split(","), drams)
    if "large" in cases:
        cs = a.large_cluster_size
        case_large(rows, a.large_policy, {"init_cluster_size": cs, "max_cluster_size": 2 * cs})
    md = markdown(rows)
    print(md)
    if a.out:
        tag = a.name or "memory_" + "_".join(cases)
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        write_results(a.out, tag, {"args": vars(a), "rows": rows, "maxrss_kib": maxrss}, "Memory-bounded engine",
                      command("kvtier.bench.memory", argv), md, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
