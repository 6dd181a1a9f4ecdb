"""Three memory tiers for a KV cache: a design, and a CPU simulation driven by a real trace.

**What this is.** A simulation, not the engine running three tiers. kvtier's API has one DRAM
budget per store: a cluster is either in that store's DRAM cache or on its flash, and a read
cannot be told to come from, or land in, a faster memory. Two stores with two budgets do not
make a hierarchy either: they partition the entries (each lives in exactly one store, and moving
it means re-adding it, with a new id and a new cluster), so they give two separate DRAM pools,
not a small fast tier in front of a larger one. So the hierarchy is simulated, and the
simulation is fed and checked by the real engine:

1. **Access stream (real).** The real SmolLM2-135M trace (W2: Python's pydoc text, post-RoPE
   keys, values and queries, from ``kvtier.bench.capture.load_trace``) is replayed through a real
   kvtier store exactly as ``bench/kvreplay.py`` does: one collection per (layer, KV head), the
   prefill as one batch, one ``add`` per decoded token leaving the recent window, and every
   ``--every`` steps a ``retrieve`` of whole clusters under a 10% fetch budget for the GQA
   group's real queries. Each retrieve's fetched clusters (``Retrieved.clusters``) and their
   sizes are recorded. Which clusters a retrieve fetches does not depend on the DRAM budget
   (it is decided on the representatives), so one run gives the stream for every tier layout.
   Clusters that the policy splits get new ids, and are cold in every tier.
2. **Check (real vs simulated).** The same run's store has a DRAM budget; its cluster cache
   is the engine's own two-tier hierarchy (DRAM over flash; opened with ``cache_policy="lru"``
   so that it evicts whole clusters least recently used first, as the simulator does). The
   simulator's two-tier LRU at the engine's mean cache size (sampled every round; it moves
   as write buffers and results take their share of the budget) should come close to the
   engine's counted misses and entries read from flash; both are printed.
3. **Tiers (simulated).** T0 is a small fast memory next to the compute (an NPU's on-chip
   memory of a few MiB, or a discrete GPU's memory), T1 the larger host DRAM, T2 the flash.
   Attention runs where T0 is, so every fetched byte must be in T0 for the step. Layouts at the
   same total memory (T0 + T1):
   - ``2 tiers``: today's engine: DRAM cache over flash; every fetched cluster crosses from
     DRAM to the compute each step (T0 holds nothing between steps);
   - ``3 tiers, inclusive``: T0 an LRU of clusters that are also in T1;
   - ``3 tiers, exclusive``: T0 and T1 hold different clusters; a T1 hit moves the cluster up,
     T0's victims move down into T1 (so the total capacity is T0 + T1);
   - ``3 tiers, excl., pinned``: the same, but T0 serves only the first collections (by
     layer) whose largest fetch fits in it; the others go between T1 and flash. Each step
     visits every layer in turn, so a cluster's reuse distance is one whole step's fetch: an
     LRU T0 smaller than that evicts every cluster before its reuse, while a T0 reserved for
     some layers keeps theirs.
   All tiers hold whole clusters, least recently used out first; as in the engine, a cluster
   larger than half a tier is not cached in it. A cluster grown by appends is charged its new
   size (appended entries come from the write buffer, not from flash).

**Cost model (assumptions, printed).** Flash reads use kvtier's device profile (default
``ufs4.0``: each retrieve's misses are one batch costing ``latency + max(ops/IOPS,
bytes/bandwidth)``, one op per cluster). A T1 -> T0 transfer costs ``bytes / --xfer-gbps`` plus
``--xfer-latency-us`` per retrieve that moves anything. T0 reads are free. Bytes moved per step
do not depend on these assumptions; the modeled times do.

**What the engine would need** for real tiers: per-tier budgets in one store (for instance
``dram_budget=["8MiB", "64MiB"]``), a second LRU list in ``cache.c`` with exclusive demotion
(an evicted T0 cluster goes to T1 instead of being freed), a per-tier cost in the device model,
and retrieve results that say which tier served each cluster.

    python examples/multi_tier.py [--decode 2048] [--every 8] [--memory 8MiB] [--t0 512KiB,1MiB,2MiB,4MiB]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from collections import OrderedDict

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

import kvtier  # noqa: E402
from kvtier.config import parse_size, resolve_device  # noqa: E402
from kvtier.bench.capture import load_trace  # noqa: E402

REC_HEADER = 16  # bytes before key and value in an engine record (id + checksum)


# ----------------------------------------------------------------- the access stream

def capture_stream(trace, layers, policy, budget, sinks, window, every, dram_budget, device, progress=True):
    """Replays the trace through a real store; returns (stream, engine stats, record size).

    ``stream`` is a list of retrieves, each a list of (collection, cluster, entries) in the
    order the engine returned them. The engine's cache size is sampled after every round of
    retrieves: it moves as other reservations (write buffers, results) come and go."""
    g, d = trace.group_size, trace.head_dim
    P, T = trace.prefill, trace.length
    if P <= sinks + window:
        raise ValueError(f"prefill ({P}) must exceed sinks + window ({sinks + window})")
    esz = REC_HEADER + 2 * d * 2  # float16 key and value
    stream, cache_samples = [], []
    with tempfile.TemporaryDirectory(prefix="kvtier-tiers-") as tmp:
        # LRU, the policy the simulator models (the engine's default cache policy is another).
        with kvtier.open(tmp, dram_budget=dram_budget, device=device, cache_policy="lru") as store:
            colls = {}
            for l in layers:
                for h in range(trace.n_kv_heads):
                    c = store.collection(f"L{l}.H{h}", dim=d, value_dim=d, dtype="float16", policy=policy)
                    c.add(trace.keys[l, h, sinks:P - window], trace.values[l, h, sinks:P - window])
                    colls[l, h] = c
            store.reset_io_stats()
            in_store = P - window
            started, last = time.perf_counter(), 0.0
            for t in range(P, T):
                while in_store <= t - window:
                    for (l, h), c in colls.items():
                        c.add(trace.keys[l, h, in_store:in_store + 1], trace.values[l, h, in_store:in_store + 1])
                    in_store += 1
                if (t - P) % every:
                    continue
                n_budget = int(math.ceil(budget * (t + 1)))
                for ci, ((l, h), c) in enumerate(colls.items()):
                    got = c.retrieve(trace.queries[l, h * g:(h + 1) * g, t].astype(np.float32), budget=n_budget)
                    cl, first, counts = np.unique(got.clusters, return_index=True, return_counts=True)
                    order = np.argsort(first)
                    stream.append([(ci, int(cl[i]), int(counts[i])) for i in order])
                cache_samples.append(store.stats()["cache_bytes"])
                if progress and time.perf_counter() - last > 10:
                    last = time.perf_counter()
                    print(f"  replay: step {t - P + 1}/{T - P} ({last - started:.0f} s)", flush=True)
            stats = store.stats()
            # Reads the engine makes for its own upkeep (cluster splits) are not retrieves.
            stats["split_read_bytes"] = sum(c.stats().get("split_read_bytes", 0) for c in colls.values())
    stats["cache_bytes_samples"] = cache_samples
    return stream, stats, esz


# ------------------------------------------------------------------------ the tiers

class LRU:
    """Whole clusters, least recently used out first; bytes per cluster; the engine's rule
    that a cluster above half the capacity is not cached."""

    def __init__(self, capacity: int):
        self.capacity, self.used, self.items = capacity, 0, OrderedDict()

    def __contains__(self, key):
        return key in self.items

    def touch(self, key, size):
        self.used += size - self.items[key]
        self.items[key] = size
        self.items.move_to_end(key)

    def remove(self, key):
        self.used -= self.items.pop(key)

    def put(self, key, size):
        """Inserts (most recent); returns the evicted (key, size) pairs."""
        if size > self.capacity // 2:
            return []
        out = []
        while self.used + size > self.capacity and self.items:
            k, s = self.items.popitem(last=False)
            self.used -= s
            out.append((k, s))
        self.items[key] = size
        self.used += size
        return out


def simulate(stream, esz, layout, t0, t1, flash, xfer_Bps, xfer_lat_s, pinned=None):
    """Runs the stream through a tier layout; returns totals. ``pinned``: the collections T0
    serves (None: all); the others' clusters go between T1 and flash as in two tiers."""
    T0, T1 = LRU(t0), LRU(t1)
    n = t0_hits = t1_hits = misses = 0
    flash_bytes = xfer_bytes = 0
    flash_s = xfer_s = 0.0
    for fetch in stream:
        f_ops = f_bytes = x_bytes = 0
        for ci, cl, entries in fetch:
            key, size = (ci, cl), entries * esz
            n += 1
            if layout == "2 tiers" or (pinned is not None and ci not in pinned):
                # T1 is all the DRAM; nothing stays next to the compute between steps.
                if key in T1:
                    T1.touch(key, size)
                    t1_hits += 1
                else:
                    T1.put(key, size)
                    misses += 1
                    f_ops, f_bytes = f_ops + 1, f_bytes + size
                x_bytes += size
            elif key in T0:
                T0.touch(key, size)
                if layout == "3 tiers, inclusive" and key in T1:
                    T1.touch(key, size)
                t0_hits += 1
            else:
                fits_t0 = size <= T0.capacity // 2
                if key in T1:
                    t1_hits += 1
                    if layout == "3 tiers, exclusive" and fits_t0:
                        T1.remove(key)  # moves up
                    else:
                        T1.touch(key, size)
                else:
                    misses += 1
                    f_ops, f_bytes = f_ops + 1, f_bytes + size
                    if layout == "3 tiers, inclusive" or not fits_t0:
                        for k, _ in T1.put(key, size):
                            if k in T0:
                                T0.remove(k)  # inclusion: what leaves T1 leaves T0
                x_bytes += size
                if fits_t0:
                    victims = T0.put(key, size)
                    if layout == "3 tiers, exclusive":
                        for k, s in victims:
                            T1.put(k, s)  # moves down (T1's own victims go back to flash)
        if f_ops:
            flash_s += flash.latency_s + max(f_ops / flash.iops, f_bytes / flash.bandwidth_Bps)
        if x_bytes:
            xfer_s += xfer_lat_s + x_bytes / xfer_Bps
        flash_bytes += f_bytes
        xfer_bytes += x_bytes
    return {"lookups": n, "t0_hit": t0_hits / n, "t1_hit": t1_hits / n, "miss": misses / n,
            "misses": misses, "flash_bytes": flash_bytes, "xfer_bytes": xfer_bytes,
            "flash_s": flash_s, "xfer_s": xfer_s}


def _size_list(text, name):
    return [parse_size(x.strip(), name) for x in text.split(",") if x.strip()]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", default="W2", choices=("W1", "W2"))
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=2048)
    ap.add_argument("--layers", default="all", help="'all' or comma-separated layer numbers")
    ap.add_argument("--policy", default="adaptive", help="kvtier cluster policy (passed through)")
    ap.add_argument("--budget", type=float, default=0.1, help="fetch budget, fraction of context")
    ap.add_argument("--every", type=int, default=8, help="retrieve every N decoding steps")
    ap.add_argument("--memory", default="8MiB", help="total memory T0 + T1 (also the engine's DRAM budget)")
    ap.add_argument("--t0", default="512KiB,1MiB,2MiB,4MiB", help="T0 sizes to simulate")
    ap.add_argument("--device", default="ufs4.0", help="flash profile (kvtier device name)")
    ap.add_argument("--xfer-gbps", type=float, default=25.0, help="T1 -> T0 bandwidth, GB/s (assumed)")
    ap.add_argument("--xfer-latency-us", type=float, default=5.0, help="T1 -> T0 setup per retrieve (assumed)")
    args = ap.parse_args(argv)
    memory = parse_size(args.memory, "--memory")
    t0_sizes = _size_list(args.t0, "--t0")
    if any(not 0 < s < memory for s in t0_sizes):
        ap.error("--t0: every size must be positive and below --memory")
    flash, _ = resolve_device(args.device)

    trace = load_trace(args.workload, prefill=args.prefill, decode=args.decode)
    try:
        layers = list(range(trace.n_layers)) if args.layers == "all" else [int(x) for x in args.layers.split(",")]
    except ValueError:
        layers = []
    if not layers or not all(0 <= l < trace.n_layers for l in layers):
        ap.error(f"--layers: 'all' or layer numbers in [0, {trace.n_layers}) expected, got {args.layers!r}")
    if args.every < 1 or not 0 < args.budget <= 1:
        ap.error("--every must be >= 1 and --budget in (0, 1]")
    print(f"replaying {args.workload} ({trace.prefill} + {trace.decode} tokens) through kvtier: "
          f"{len(layers)} layers x {trace.n_kv_heads} KV heads, policy {args.policy}, DRAM budget {args.memory}")
    started = time.perf_counter()
    stream, eng, esz = capture_stream(trace, layers, args.policy, args.budget, 4, 32, args.every,
                                      memory, flash)
    wall = time.perf_counter() - started
    steps = len(range(trace.prefill, trace.length, args.every))
    kv_bytes = len(layers) * trace.n_kv_heads * (trace.length - 36) * esz
    fetched = sum(n for f in stream for _, _, n in f) * esz

    # Check: the simulator's two-tier LRU at the engine's mean cache size against the engine.
    samples = np.array(eng["cache_bytes_samples"], dtype=np.float64)
    check = simulate(stream, esz, "2 tiers", 0, int(samples.mean()), flash, 1, 0)
    eng_lookups = eng["cache_hits"] + eng["cache_misses"]

    # Layer-pinned T0: the first collections (by layer) whose largest fetch fits, all of them
    # in T0 (a cyclic pass over every layer defeats an LRU smaller than one step's fetch).
    n_coll = len(layers) * trace.n_kv_heads
    largest = np.zeros(n_coll)
    for fetch in stream:
        if fetch:
            largest[fetch[0][0]] = max(largest[fetch[0][0]], sum(n for _, _, n in fetch) * esz)

    def pinned_for(t0):
        fits = np.cumsum(largest) <= 0.9 * t0  # margin: cluster sizes vary around the mean
        return set(np.flatnonzero(fits).tolist())

    rows = [("2 tiers", 0, memory, None)]
    for t0 in t0_sizes:
        rows += [("3 tiers, inclusive", t0, memory - t0, None), ("3 tiers, exclusive", t0, memory - t0, None),
                 ("3 tiers, excl., pinned", t0, memory - t0, pinned_for(t0))]
    xfer_Bps, xfer_lat = args.xfer_gbps * 1e9, args.xfer_latency_us * 1e-6
    layout_of = {"3 tiers, excl., pinned": "3 tiers, exclusive"}
    results = [(name, t0, t1, pin, simulate(stream, esz, layout_of.get(name, name), t0, t1, flash,
                                            xfer_Bps, xfer_lat, pin))
               for name, t0, t1, pin in rows]

    mib = 2 ** 20
    print()
    print(f"trace {args.workload}: {steps} retrieve steps x {len(layers) * trace.n_kv_heads} collections, "
          f"fetch budget {args.budget:.0%} of the context; KV on flash {kv_bytes / mib:.1f} MiB; "
          f"fetched per step {fetched / steps / mib:.2f} MiB (replay {wall:.0f} s)")
    print(f"check, engine (measured) vs simulator at the engine's mean cache size "
          f"({samples.mean() / mib:.2f} MiB; it moved between {samples.min() / mib:.2f} and "
          f"{samples.max() / mib:.2f} MiB of the {args.memory} budget):")
    split_entries = eng["split_read_bytes"] // esz
    print(f"  cluster lookups {eng_lookups} vs {check['lookups']}; misses {eng['cache_misses']} vs "
          f"{check['misses']}; entries read from flash for retrieves {eng['read_entries'] - split_entries} vs "
          f"{check['flash_bytes'] // esz}"
          + (f" (the engine also read {split_entries} entries to split clusters)" if split_entries else "")
          + f"; modeled flash time {eng['modeled_io_seconds'] / steps * 1e3:.2f} vs "
          f"{check['flash_s'] / steps * 1e3:.2f} ms/step (the engine merges and splits reads its own way)")
    print(f"\nsimulated tiers, same total memory {args.memory}; flash {flash.name}, "
          f"T1->T0 {args.xfer_gbps:g} GB/s + {args.xfer_latency_us:g} us per retrieve (assumed)\n")
    head = ("| layout                 | T0 MiB | T1 MiB | T0 hit | T1 hit | flash | flash MiB/step | "
            "T1->T0 MiB/step | flash ms/step | T1->T0 ms/step | total ms/step |")
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
    for name, t0, t1, pin, r in results:
        print(f"| {name:<22} | {t0 / mib:6.2f} | {t1 / mib:6.2f} | {r['t0_hit']:6.3f} | {r['t1_hit']:6.3f} | "
              f"{r['miss']:5.3f} | {r['flash_bytes'] / steps / mib:14.3f} | {r['xfer_bytes'] / steps / mib:15.3f} | "
              f"{r['flash_s'] / steps * 1e3:13.3f} | {r['xfer_s'] / steps * 1e3:14.3f} | "
              f"{(r['flash_s'] + r['xfer_s']) / steps * 1e3:13.3f} |")
    print("\nhit rates are shares of cluster lookups; MiB and ms are per retrieve step (all collections).")
    for name, t0, t1, pin, r in results:
        if pin is not None:
            print(f"pinned at T0 = {t0 / mib:g} MiB: {len(pin)} of {n_coll} collections "
                  f"(largest fetch of one collection {largest.max() / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
