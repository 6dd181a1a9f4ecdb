"""W4 search benchmark: kvtier against hnswlib, faiss IVF-flat and exact search.

W4 (docs/design.md §8) is the post-RoPE keys of SmolLM2-135M pooled across layers and heads, with
the model's own queries as inner-product queries (see :func:`kvtier.bench.capture.w4_vectors`).
Every method answers the same queries for the top 10 by inner product; recall@10 is
measured against exact brute force (numpy).

- ``exact``: numpy matrix product + partial sort (the ground truth; recall 1 by definition).
- ``hnswlib``: HNSW graph, space ``ip``; sweeps ``ef``.
- ``faiss-ivf``: ``IndexIVFFlat`` with ``METRIC_INNER_PRODUCT``; sweeps ``nprobe``.
- ``kvtier``: a store on the local disk, built offline (``add`` + ``flush`` under a build
  DRAM budget, default the data size), closed, and reopened cold under each serving DRAM
  budget: the whole data and a fraction of it (default 10%); sweeps ``nprobe`` (clusters
  read per query). Its device model (default: the ``ufs4.0`` profile, accounting only)
  turns the reads into modeled phone-flash time, compared with the I/O floor (bytes read /
  profile bandwidth).

Each method runs in its own fresh process (so its RSS is its own), builds its index, then
answers all queries once as a warm-up (for kvtier: the cold pass, whose I/O is reported
separately) and ``--repeats`` more times; queries/s is from the median pass. Search uses
``--threads`` threads (default 1) for hnswlib, faiss and numpy (kvtier's search is
single-threaded); builds use all cores. Results go to ``<out>/w4_search.json`` (machine,
versions, parameters, results), ``<out>/w4_search.md`` (the table printed at the end) and
``<out>/w4_search.png`` (recall@10 against queries/s).

    python -m kvtier.bench.w4_search --out bench/results
    python -m kvtier.bench.w4_search --n-keys 50000 --n-queries 200 --methods hnswlib,kvtier
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import gc
import importlib
import json
import multiprocessing
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kvtier.bench.tables import md_table
from kvtier.benchargs import show_defaults

METHODS = ("exact", "hnswlib", "faiss-ivf", "kvtier")
K = 10


# ------------------------------------------------------------------------- helpers


def exact_topk(keys: np.ndarray, queries: np.ndarray, k: int, chunk: int = 256) -> np.ndarray:
    """Ids of the k largest inner products per query, best first (chunked over queries)."""
    out = np.empty((queries.shape[0], k), np.int64)
    for start in range(0, queries.shape[0], chunk):
        scores = queries[start : start + chunk] @ keys.T
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
        out[start : start + chunk] = np.take_along_axis(top, order, axis=1)
    return out


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / k."""
    k = truth.shape[1]
    hits = sum(len(np.intersect1d(f, t, assume_unique=False)) for f, t in zip(found, truth, strict=True))
    return hits / (k * truth.shape[0])


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process image.

    Linux's VmHWM starts afresh at exec; ``ru_maxrss`` does not (a spawned worker would
    report its parent's peak), so it is only the fallback.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def timed_passes(search: Callable[[], np.ndarray], repeats: int) -> tuple[np.ndarray, list[float]]:
    """Run ``search`` ``repeats`` times; return (last result, seconds per pass)."""
    if repeats < 1:
        raise ValueError(f"repeats: at least 1 expected, got {repeats}")
    seconds: list[float] = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = search()
        seconds.append(time.perf_counter() - started)
    return result, seconds


def point(params: dict, found: np.ndarray, truth: np.ndarray, seconds: list[float],
          n_queries: int, **extra) -> dict:
    """One operating point of a method: recall@k and queries/s of the median pass."""
    median = statistics.median(seconds)
    return {
        "params": params,
        "recall_at_10": recall_at_k(found, truth),
        "qps": n_queries / median,
        "seconds_per_pass": seconds,
        **extra,
    }


# ------------------------------------------------------------------- method workers
# Each worker runs in a fresh process: it loads the data, builds, searches and returns a
# JSON-ready dict. RSS is measured after the data's own copy is released, so the delta
# approximates what the index (or store) itself keeps resident.


def _load(data_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """Queries and ground truth; each worker loads the keys itself, after its RSS baseline."""
    d = Path(data_dir)
    return np.load(d / "queries.npy"), np.load(d / "truth.npy")


def _run_exact(data_dir: str, cfg: dict) -> dict:
    queries, truth = _load(data_dir)
    rss0 = rss_bytes()
    keys = np.load(Path(data_dir) / "keys.npy")
    search = lambda: exact_topk(keys, queries, K)  # noqa: E731
    search()
    found, seconds = timed_passes(search, cfg["repeats"])
    return {
        "build_s": 0.0,
        "index_bytes": int(keys.nbytes),
        "rss_delta_bytes": rss_bytes() - rss0,
        "peak_rss_bytes": peak_rss_bytes(),
        "points": [point({}, found, truth, seconds, len(queries))],
    }


def _run_hnswlib(data_dir: str, cfg: dict) -> dict:
    import hnswlib

    queries, truth = _load(data_dir)
    rss0 = rss_bytes()
    keys = np.load(Path(data_dir) / "keys.npy")
    index = hnswlib.Index(space="ip", dim=keys.shape[1])
    started = time.perf_counter()
    index.init_index(max_elements=len(keys), M=cfg["hnsw_m"],
                     ef_construction=cfg["hnsw_ef_construction"], random_seed=cfg["seed"])
    index.add_items(keys, np.arange(len(keys)), num_threads=os.cpu_count() or 1)
    build_s = time.perf_counter() - started
    del keys
    _release_freed_memory()
    rss_built = rss_bytes() - rss0
    index.set_num_threads(cfg["threads"])
    points = []
    for ef in cfg["hnsw_ef"]:
        index.set_ef(max(ef, K))
        search = lambda: index.knn_query(queries, k=K)[0].astype(np.int64)  # noqa: E731
        search()
        found, seconds = timed_passes(search, cfg["repeats"])
        points.append(point({"ef": ef}, found, truth, seconds, len(queries)))
    return {
        "build_s": build_s,
        "build_params": {"M": cfg["hnsw_m"], "ef_construction": cfg["hnsw_ef_construction"]},
        # hnswlib's own figure for its serialized size: vectors, links and labels, which
        # is what it keeps in memory.
        "index_bytes": int(index.index_file_size()),
        "rss_delta_bytes": max(rss_built, rss_bytes() - rss0),
        "peak_rss_bytes": peak_rss_bytes(),
        "points": points,
    }


def _run_faiss(data_dir: str, cfg: dict) -> dict:
    import faiss

    queries, truth = _load(data_dir)
    rss0 = rss_bytes()
    keys = np.load(Path(data_dir) / "keys.npy")
    nlist = cfg["ivf_nlist"] or round(4 * np.sqrt(len(keys)))
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    quantizer = faiss.IndexFlatIP(keys.shape[1])
    index = faiss.IndexIVFFlat(quantizer, keys.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = cfg["seed"]
    started = time.perf_counter()
    index.train(keys)
    index.add(keys)
    build_s = time.perf_counter() - started
    del keys
    _release_freed_memory()
    rss_built = rss_bytes() - rss0
    faiss.omp_set_num_threads(cfg["threads"])
    points = []
    for nprobe in cfg["ivf_nprobe"]:
        if nprobe > nlist:
            continue
        index.nprobe = nprobe
        search = lambda: index.search(queries, K)[1].astype(np.int64)  # noqa: E731
        search()
        found, seconds = timed_passes(search, cfg["repeats"])
        points.append(point({"nprobe": nprobe}, found, truth, seconds, len(queries)))
    return {
        "build_s": build_s,
        "build_params": {"nlist": nlist},
        "index_bytes": int(faiss.serialize_index(index).nbytes),
        "rss_delta_bytes": max(rss_built, rss_bytes() - rss0),
        "peak_rss_bytes": peak_rss_bytes(),
        "points": points,
    }


def _run_kvtier(data_dir: str, cfg: dict) -> dict:
    """Build the store offline under the build budget, then reopen it under the serving
    budget (cold: nothing cached) and search."""
    import kvtier

    queries, truth = _load(data_dir)
    budget = cfg["kvtier_budget_bytes"]
    build_budget = max(cfg["kvtier_build_budget_bytes"], budget)
    device = None if cfg["kvtier_device"] in (None, "none") else cfg["kvtier_device"]
    store_dir = tempfile.mkdtemp(prefix="kvtier-w4-", dir=cfg["workdir"])
    params = {
        "dim": queries.shape[1], "value_dim": 0, "dtype": "float32", "metric": "ip",
        "policy": "static",
    }
    phase = "build"
    try:
        rss0 = rss_bytes()
        keys = np.load(Path(data_dir) / "keys.npy")
        with kvtier.open(store_dir, dram_budget=build_budget, device=device) as store:
            # Cluster sizes left unset take the engine's defaults.
            tuning = {
                name: cfg[f"kvtier_{name}"]
                for name in ("init_cluster_size", "max_cluster_size")
                if cfg[f"kvtier_{name}"] is not None
            }
            coll = store.collection("w4", **params, **tuning, seed=cfg["seed"])
            created = dict(coll.params)
            started = time.perf_counter()
            ids = coll.add(keys)
            build_s = time.perf_counter() - started
            if not np.array_equal(ids, np.arange(len(keys))):
                raise RuntimeError("kvtier returned ids other than 0..n-1")
            started = time.perf_counter()
            store.flush()
            flush_s = time.perf_counter() - started
            build_dram_peak = int(store.stats()["dram_peak_bytes"])
        build_peak_rss = peak_rss_bytes()
        del keys, ids, coll, store
        _release_freed_memory()

        phase = "reopen under the serving budget"
        started = time.perf_counter()
        store = kvtier.open(store_dir, dram_budget=budget, device=device)
        error = None
        try:
            coll = store.collection("w4", **params)
            open_s = time.perf_counter() - started
            rss_open = rss_bytes() - rss0
            coll_stats = coll.stats()
            points = []
            for nprobe in cfg["kvtier_nprobe"]:
                if nprobe > coll_stats["clusters"]:
                    continue
                phase = f"search with nprobe={nprobe}"
                search = lambda nprobe=nprobe: coll.search(queries, k=K, nprobe=nprobe).ids  # noqa: E731
                # The first pass starts from whatever the previous point left cached (the
                # first point starts cold); the timed passes after it give the steady state.
                store.reset_io_stats()
                try:
                    search()
                    first = _io_per_query(store.stats(), len(queries))
                    store.reset_io_stats()
                    found, seconds = timed_passes(search, cfg["repeats"])
                except kvtier.KvtierError as exc:  # keep the points already measured
                    error = f"{phase}: {type(exc).__name__}: {exc}"
                    break
                stats = store.stats()
                steady = _io_per_query(stats, len(queries) * cfg["repeats"])
                points.append(point(
                    {"nprobe": nprobe}, found, truth, seconds, len(queries),
                    io_first_pass=first, io_steady=steady,
                    dram_peak_bytes=int(stats["dram_peak_bytes"]),
                    cache_hit_rate=_hit_rate(stats),
                ))
            final = store.stats()
            rss_after = rss_bytes() - rss0
        finally:
            store.close()
        return {
            "build_s": build_s,
            "flush_s": flush_s,
            "open_s": open_s,
            "build_params": {
                **params,
                "init_cluster_size": created.get("init_cluster_size"),
                "max_cluster_size": created.get("max_cluster_size"),
                "build_dram_budget_bytes": build_budget,
                "device": device,
                "clusters": coll_stats["clusters"],
                "mean_cluster_size": coll_stats.get("mean_cluster_size"),
                "max_cluster_size_seen": coll_stats.get("max_cluster_size"),
            },
            "index_bytes": int(final["dram_peak_bytes"]),
            "dram_budget_bytes": budget,
            "dram_peak_bytes": int(max((p["dram_peak_bytes"] for p in points), default=0)),
            "dram_peak_build_bytes": build_dram_peak,
            "peak_rss_build_bytes": build_peak_rss,
            "data_file_bytes": int(coll_stats.get("data_file_bytes", 0)),
            "direct_io": bool(final.get("direct_io")),
            "simd": final.get("simd"),
            "rss_after_open_bytes": rss_open,
            "rss_delta_bytes": max(rss_open, rss_after),
            "peak_rss_bytes": peak_rss_bytes(),
            "points": points,
            **({"error": error} if error else {}),
        }
    except Exception as exc:
        # Re-raised as a plain RuntimeError naming the phase: it crosses the process
        # boundary intact whatever the original exception class.
        raise RuntimeError(f"{phase}: {type(exc).__name__}: {exc}") from None
    finally:
        shutil.rmtree(store_dir, ignore_errors=True)


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc), so RSS deltas measure live memory."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _io_per_query(stats: dict, n_queries: int) -> dict:
    return {
        "read_ops": stats["read_ops"] / n_queries,
        "read_bytes": stats["read_bytes"] / n_queries,
        "modeled_io_s": stats.get("modeled_io_seconds", 0.0) / n_queries,
        "mean_read_entries": stats.get("mean_read_entries", 0.0),
    }


def _hit_rate(stats: dict) -> float | None:
    lookups = stats.get("cache_hits", 0) + stats.get("cache_misses", 0)
    return stats["cache_hits"] / lookups if lookups else None


WORKERS: dict[str, Callable[[str, dict], dict]] = {
    "exact": _run_exact,
    "hnswlib": _run_hnswlib,
    "faiss-ivf": _run_faiss,
    "kvtier": _run_kvtier,
}


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    """Set environment variables for processes started inside the block."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run_isolated(method: str, data_dir: str, cfg: dict) -> dict:
    """Run one method's worker in a fresh process (spawned, so nothing is inherited)."""
    ctx = multiprocessing.get_context("spawn")
    # numpy's BLAS picks its thread count when it is loaded, so the limit must be in the
    # child's environment from the start. Only exact search uses BLAS to answer queries.
    env = {"OPENBLAS_NUM_THREADS": str(cfg["threads"]), "OMP_NUM_THREADS": str(cfg["threads"]),
           "MKL_NUM_THREADS": str(cfg["threads"])} if method == "exact" else {}
    with _environment(env), concurrent.futures.ProcessPoolExecutor(
        max_workers=1, mp_context=ctx
    ) as pool:
        # Refer to the worker through the importable module, not ``__main__``, so the
        # child resolves it the same way however this file was started.
        worker = getattr(importlib.import_module(__name__ if __name__ != "__main__"
                                                 else "kvtier.bench.w4_search"),
                         WORKERS[method].__name__)
        return pool.submit(worker, data_dir, cfg).result()


# ------------------------------------------------------------------------ reporting


def machine_info() -> dict:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }
    if hasattr(os, "sched_getaffinity"):
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        info["memory_bytes"] = int(pages)
    except (ValueError, OSError):
        pass
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def versions() -> dict:
    import importlib.metadata as md

    out: dict[str, Any] = {}
    for dist in ("numpy", "hnswlib", "faiss-cpu", "kvtier", "transformers", "torch"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    try:
        import kvtier

        out["kvtier"] = out["kvtier"] or getattr(kvtier, "__version__", None)
    except ImportError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
            cwd=Path(__file__).resolve().parent, timeout=10,
        )
        out["git_commit"] = commit.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    return out


def _mib(n: float | None) -> str:
    return "–" if n is None else f"{n / 2**20:.1f}"


def label(entry: dict) -> str:
    if entry["method"] != "kvtier":
        return entry["method"]
    return f"kvtier (DRAM {entry['budget_fraction']:.0%})"


def markdown_table(results: list[dict], data_bytes: int) -> str:
    rows = []
    for entry in results:
        dram = entry.get("dram_peak_bytes", entry.get("index_bytes"))
        for p in entry.get("points", []):
            params = ", ".join(f"{k}={v}" for k, v in p["params"].items()) or "–"
            io = p.get("io_steady")
            floor = p.get("io_floor_s")
            cells = [
                label(entry), params, f"{p['recall_at_10']:.4f}", f"{p['qps']:.0f}",
                f"{entry['build_s']:.1f}",
                _mib(p.get("dram_peak_bytes", dram)), _mib(entry["rss_delta_bytes"]),
                f"{io['read_ops']:.1f}" if io else "–",
                f"{io['read_bytes'] / 1024:.1f}" if io else "–",
                f"{io['modeled_io_s'] * 1e6:.1f}" if io else "–",
                f"{floor * 1e6:.1f}" if floor is not None else "–",
            ]
            rows.append(cells)
        if "error" in entry:
            rows.append([label(entry), "–", f"error: {entry['error']}"])
    head = ["method", "params", "recall@10", "queries/s", "build s", "index/DRAM MiB", "RSS Δ MiB", "reads/query",
            "KiB read/query", "modeled I/O µs/query", "I/O floor µs/query"]
    return (md_table(head, rows, "ll" + "r" * 9) + f"\n\nData: {data_bytes / 2**20:.1f} MiB of float32 keys. "
            "Index/DRAM: hnswlib and faiss index size; kvtier engine-accounted DRAM peak; exact the key matrix.")


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    markers = iter("osD^vP*X")
    for entry in results:
        if not entry.get("points"):
            continue
        qps = [p["qps"] for p in entry["points"]]
        recall = [p["recall_at_10"] for p in entry["points"]]
        ax.plot(qps, recall, marker=next(markers), label=label(entry))
    ax.axhline(0.95, color="grey", linestyle=":", linewidth=1, label="recall 0.95 target")
    ax.set_xscale("log")
    ax.set_xlabel("throughput (queries/s, log scale)")
    ax.set_ylabel("recall@10")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------ CLI


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _float_list(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kvtier.bench.w4_search",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench/results",
                   help="output directory (default bench/results)")
    p.add_argument("--n-keys", type=int, default=200_000, help="data vectors (default 200000)")
    p.add_argument("--n-queries", type=int, default=1000, help="queries (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the W4 draws and index builds")
    p.add_argument("--trace-decode", type=int, default=2048,
                   help="decode length of the W1 trace the vectors come from (default 2048)")
    p.add_argument("--cache-dir", default=None,
                   help="trace cache (default bench/.cache in a source checkout, else ~/.cache/kvtier/traces)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per point (median)")
    p.add_argument("--threads", type=int, default=1, help="search threads (default 1)")
    p.add_argument("--hnsw-m", type=int, default=16)
    p.add_argument("--hnsw-ef-construction", type=int, default=200)
    p.add_argument("--hnsw-ef", type=_int_list, default=[10, 20, 40, 80, 160, 320, 640, 1280])
    p.add_argument("--ivf-nlist", type=int, default=0, help="IVF lists (0: 4*sqrt(n))")
    p.add_argument("--ivf-nprobe", type=_int_list, default=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512])
    p.add_argument("--kvtier-budgets", type=_float_list, default=[1.0, 0.1],
                   help="DRAM budgets as fractions of the data bytes (default 1.0,0.1)")
    p.add_argument("--kvtier-build-budget", type=float, default=1.0,
                   help="DRAM budget of the offline build, as a fraction of the data bytes; "
                        "the store is then reopened under each serving budget (default 1.0)")
    p.add_argument("--kvtier-nprobe", type=_int_list, default=[4, 8, 16, 32, 64, 128, 256, 512])
    p.add_argument("--kvtier-init-cluster-size", type=int, default=None,
                   help="target size of the initial clusters (default: the engine's)")
    p.add_argument("--kvtier-max-cluster-size", type=int, default=None,
                   help="maximum cluster size, which sets the pool size (default: the engine's)")
    p.add_argument("--kvtier-device", default="ufs4.0",
                   help="device profile for modeled I/O time, or 'none' (default ufs4.0)")
    p.add_argument("--workdir", default=None,
                   help="where kvtier stores live during the run (default: the trace cache)")
    args = show_defaults(p).parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from kvtier.bench.capture import resolve_cache_dir, w4_vectors

    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started_all = time.perf_counter()

    w4 = w4_vectors(args.n_keys, args.n_queries, args.seed,
                    decode=args.trace_decode, cache_dir=args.cache_dir)
    data_bytes = int(w4.keys.nbytes)
    print(f"W4: {w4.keys.shape[0]} keys x {w4.keys.shape[1]} ({data_bytes / 2**20:.1f} MiB), "
          f"{w4.queries.shape[0]} queries", flush=True)
    started = time.perf_counter()
    truth = exact_topk(w4.keys, w4.queries, K)
    print(f"ground truth in {time.perf_counter() - started:.1f} s", flush=True)

    workdir = Path(args.workdir) if args.workdir else resolve_cache_dir(args.cache_dir)
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = {
        "repeats": args.repeats, "threads": args.threads, "seed": args.seed,
        "hnsw_m": args.hnsw_m, "hnsw_ef_construction": args.hnsw_ef_construction,
        "hnsw_ef": args.hnsw_ef, "ivf_nlist": args.ivf_nlist, "ivf_nprobe": args.ivf_nprobe,
        "kvtier_nprobe": args.kvtier_nprobe,
        "kvtier_init_cluster_size": args.kvtier_init_cluster_size,
        "kvtier_max_cluster_size": args.kvtier_max_cluster_size,
        "kvtier_device": args.kvtier_device, "workdir": str(workdir),
    }
    bandwidth = _profile_bandwidth(args.kvtier_device) if "kvtier" in args.methods else None

    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="w4-data-", dir=workdir) as data_dir:
        np.save(Path(data_dir) / "keys.npy", w4.keys)
        np.save(Path(data_dir) / "queries.npy", w4.queries)
        np.save(Path(data_dir) / "truth.npy", truth)
        runs: list[tuple[str, dict]] = []
        for method in args.methods:
            if method == "kvtier":
                for fraction in args.kvtier_budgets:
                    budget = max(int(fraction * data_bytes), 64 * 1024)
                    runs.append((method, {**cfg, "kvtier_budget_bytes": budget,
                                          "kvtier_build_budget_bytes":
                                              int(args.kvtier_build_budget * data_bytes),
                                          "budget_fraction": fraction}))
            else:
                runs.append((method, cfg))
        for method, run_cfg in runs:
            entry: dict[str, Any] = {"method": method}
            if method == "kvtier":
                entry["budget_fraction"] = run_cfg["budget_fraction"]
            print(f"running {label(entry)} ...", flush=True)
            started = time.perf_counter()
            try:
                entry.update(run_isolated(method, data_dir, run_cfg))
            except Exception as exc:  # one failing method must not sink the others
                entry["error"] = (str(exc) if type(exc) is RuntimeError
                                  else f"{type(exc).__name__}: {exc}")
            entry["wall_s"] = time.perf_counter() - started
            if bandwidth and "points" in entry:
                for p in entry["points"]:
                    if "io_steady" in p:
                        p["io_floor_s"] = p["io_steady"]["read_bytes"] / bandwidth
            status = "; ".join(filter(None, [
                f"best recall {max(p['recall_at_10'] for p in entry['points']):.4f}"
                if entry.get("points") else "no points",
                entry.get("error"),
            ]))
            print(f"  {label(entry)}: {entry['wall_s']:.1f} s, {status}", flush=True)
            results.append(entry)

    table = markdown_table(results, data_bytes)
    report = {
        "benchmark": "w4_search",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "versions": versions(),
        "parameters": {
            **{k: v for k, v in vars(args).items() if k not in ("out", "cache_dir", "workdir")},
            "k": K,
            "data_bytes": data_bytes,
            "w4": w4.meta,
            "kvtier_device_bandwidth_Bps": bandwidth,
        },
        "results": results,
        "total_s": time.perf_counter() - started_all,
    }
    (out / "w4_search.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "w4_search.md").write_text(table + "\n")
    plot(results, out / "w4_search.png",
         f"W4: {args.n_keys // 1000}K SmolLM2 keys, {args.n_queries} queries, top-{K} inner "
         f"product, {args.threads} search thread{'s' if args.threads > 1 else ''}")
    print()
    print(table)
    print(f"\nwrote {out / 'w4_search.json'}, {out / 'w4_search.md'}, {out / 'w4_search.png'} "
          f"in {report['total_s']:.0f} s")
    return 0


def _profile_bandwidth(device: str | None) -> float | None:
    """Sequential bandwidth (bytes/s) of a kvtier device profile, for the I/O floor."""
    if device in (None, "none"):
        return None
    try:
        import kvtier

        return float(kvtier.PROFILES[device].bandwidth_Bps)
    except (ImportError, KeyError, AttributeError):
        return None


if __name__ == "__main__":
    sys.exit(main())
