"""Decode-step speed: SmolLM2-135M decoding with DynamicCache, QuantizedCache and TieredCache.

For each context: prefill the first ``context`` tokens of the document prompt, then decode
``--tokens`` tokens greedily, one forward per token. The caches run interleaved, round by
round (``--runs`` rounds), so that each ratio compares runs made side by side on this shared
machine; the tables give medians over rounds.

Per cache and context: tok/s; ms per step split into compute (the step minus the time spent
in kvtier calls and the adapter's glue), engine, wait and glue (``_tiered_figures``: the
profile of a step, so that a regression shows where it came from) and modeled I/O (the
device model's time for the reads, UFS 4.0, accounted, not slept); DRAM: the KV bytes held
at the end (DynamicCache: its tensors; TieredCache: adapter sinks and window plus engine
DRAM) and the process RSS.

TieredCache runs with a 10% fetch budget and an engine DRAM budget of 10% of the float16 KV
cache at the final context (issue 31's setting), reading flash with O_DIRECT
(``tiered-<policy>``) or through the page cache (``tiered-<policy>-pagecache``: on a
machine whose disk is a virtual one, its latency is not a phone's; the modeled I/O column
gives the UFS 4.0 time either way). A ``-separate`` suffix (``tiered-adaptive-separate``,
``tiered-adaptive-pagecache-separate``) decodes through the former path, for comparison in
the same rounds: a retrieve, adds and prefetches as separate engine calls per layer and the
attention's inputs concatenated and converted in Python (issue 31's "before").

    python -m kvtier.bench.decode [--contexts 2048,8192] [--tokens 256] [--runs 3] [--out bench/results]

Gemma 3 270M (``--model gemma3``, a hybrid model: TieredCache tiers its 3 full-attention
layers, the 15 sliding ones keep their 512-token window) to 32K: each context is prefilled once
(dense, in chunks; minutes at 32K on this machine) and every run starts from a copy of that
state; the engine's DRAM budget is 10% of the full-attention layers' float16 KV; the prefill's
time and the process's peak RSS are reported:

    kvtier bench decode --model gemma3 --contexts 8192,32768 --tokens 64 --runs 3 \\
        --caches dynamic,tiered-adaptive,tiered-adaptive-pagecache --name decode_gemma3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


from kvtier.bench.runtime import kv_bytes as _kv_bytes_dynamic
from kvtier.bench.runtime import rss as _rss
from kvtier.bench.tables import md_table
from kvtier.benchargs import show_defaults


def _make_cache(kind: str, model, kv_f16_bytes: int, device=None):
    from transformers import DynamicCache

    if kind == "dynamic":
        return DynamicCache(config=model.config)
    if kind.startswith("quantized-"):
        from transformers import QuantizedCache

        return QuantizedCache(backend=kind.split("-", 1)[1], config=model.config, nbits=4)
    from kvtier.adapters.torch import TieredCache

    policy = kind.split("-")[1]
    cache = TieredCache(model, budget=0.1, policy=policy, dram_budget=max(kv_f16_bytes // 10, 1 << 20),
                        device=device, direct_io=False if "-pagecache" in kind else "auto")
    return _separate(cache, kind)


def _separate(cache, kind: str):
    """With a ``-separate`` kind, the cache decodes through its former path (separate engine
    calls, the attention's inputs concatenated in Python): its decoding path switched off."""
    if kind.endswith("-separate"):
        cache._ring_path = lambda layer, q_len: False
    return cache


def _tiered_figures(r: dict, s0: dict, s1: dict, dt: float, tokens: int) -> dict:
    """Adds a TieredCache run's profile of a step and its DRAM to ``r``, from its stats before
    (``s0``) and after (``s1``); returns ``s1``. Per step, in ms:

    - ``store_ms``: wall time in store calls (retrieve, add, prefetch, step, park/unpark);
    - ``engine_ms``: the calling thread's CPU time inside them (the engine's own work);
    - ``wait_ms``: the rest of the store time, when the calling thread did not run: reads it
      waited for (O_DIRECT reads, prefetches still loading) or the machine's other work;
      ``io_wait_ms`` is the part of it the engine counted waiting for prefetches;
    - ``read_wait_ms``: wall time of the calling thread's read system calls (reads on demand,
      the engine's own clock; their CPU time is in ``engine_ms``, the rest in ``wait_ms``):
      I/O wait as measured, beside ``modeled_io_ms``;
    - ``glue_ms``: the adapter's Python around the store calls and the attention arithmetic
      (queries to numpy, fetched entries to torch, concatenations, the spill);
    - ``compute_ms``: the rest of the step (the model's layers, the attention arithmetic, the
      LM head); ``modeled_io_ms``: the device model's time for the step's reads (UFS 4.0),
      accounted, not slept, and ``overlap_ms`` the part of it no retrieve waited for;
    - ``store_share``: (engine + wait + glue) / step, what issue 31 asks to bring under 15%."""
    d = {k: s1[k] - s0[k] for k in ("retrieve_seconds", "add_seconds", "prefetch_seconds", "step_seconds",
                                     "other_store_seconds",
                                     "engine_cpu_seconds", "attend_seconds", "attention_seconds",
                                     "io_wait_seconds", "modeled_io_seconds")}
    store = sum(d[k] for k in ("retrieve_seconds", "add_seconds", "prefetch_seconds", "step_seconds",
                                "other_store_seconds"))
    glue = max(0.0, d["attend_seconds"] - d["attention_seconds"] - store + d["other_store_seconds"])
    engine = min(d["engine_cpu_seconds"], store)
    r.update(store_ms=1e3 * store / tokens, engine_ms=1e3 * engine / tokens, wait_ms=1e3 * (store - engine) / tokens,
             glue_ms=1e3 * glue / tokens, compute_ms=1e3 * (dt - store - glue) / tokens,
             store_share=(store + glue) / dt,
             io_wait_ms=1e3 * d["io_wait_seconds"] / tokens,
             modeled_io_ms=1e3 * d["modeled_io_seconds"] / tokens,
             overlap_ms=1e3 * max(0.0, d["modeled_io_seconds"] - d["io_wait_seconds"]) / tokens,
             kv_bytes=s1["dram_bytes"], kv_peak_bytes=s1["dram_peak_bytes"],
             full_kv_bytes=s1["full_cache_bytes"])
    # I/O wait as measured, apart from the modeled time: the calling thread's read system calls
    # (the store's read_seconds: reads on demand; loader threads' reads are not in it) and
    # its waits for prefetches still loading (io_wait_ms)
    st0, st1 = s0.get("store", {}), s1.get("store", {})
    r["read_wait_ms"] = 1e3 * (st1.get("read_seconds", 0.0) - st0.get("read_seconds", 0.0)) / tokens
    # where the reads came from, per step: the store's bytes and requests, the prefetches'
    # share and those evicted unused, the cache's hits and misses
    for k in ("read_bytes", "read_ops", "prefetch_read_bytes", "cache_hits", "cache_misses"):
        r[k + "_per_step"] = (s1.get(k, 0) - s0.get(k, 0)) / tokens
    for k in ("prefetch_issued", "prefetch_hits", "prefetch_evicted"):
        r[k + "_per_step"] = (st1.get(k, 0) - st0.get(k, 0)) / tokens
    r["fetched_per_retrieve"] = s1["fetched_per_step"]
    return s1


_DENSE_PROFILE = {"store_ms": 0.0, "engine_ms": 0.0, "wait_ms": 0.0, "glue_ms": 0.0, "store_share": 0.0,
                  "io_wait_ms": 0.0, "read_wait_ms": 0.0, "modeled_io_ms": 0.0, "overlap_ms": 0.0}


def run_one(model, kind: str, ids, context: int, tokens: int, device=None) -> dict:
    import torch

    from kvtier.bench.runtime import global_kv_f16

    cache = _make_cache(kind, model, global_kv_f16(model, context + tokens), device)
    tiered = kind.startswith("tiered-")
    try:
        with torch.inference_mode():
            out = model(ids[:, :context], cache=cache, use_cache=True, logits_to_keep=1)
            tok = out.logits[:, -1:].argmax(-1)
            s0 = cache.stats() if tiered else None
            t0 = time.perf_counter()
            for _ in range(tokens):
                out = model(tok, cache=cache, use_cache=True)
                tok = out.logits[:, -1:].argmax(-1)
            dt = time.perf_counter() - t0
        r = {"cache": kind, "context": context, "tokens": tokens, "tok_s": tokens / dt,
             "step_ms": 1e3 * dt / tokens, "rss_bytes": _rss()}
        if s0 is not None:  # tiered
            _tiered_figures(r, s0, cache.stats(), dt, tokens)
        else:
            r.update(_DENSE_PROFILE, compute_ms=r["step_ms"],
                     kv_bytes=_kv_bytes_dynamic(cache) if kind == "dynamic" else None)
        return r
    finally:
        if tiered:
            cache.close()


def run_prefilled(model, kind: str, dense, first: int, tokens: int, device=None) -> dict:
    """One run of ``kind`` from a copy of the dense prefill ``dense`` (DynamicCache deep copy,
    or ``TieredCache.prefill_from`` with an engine DRAM budget of 10% of the full-attention
    layers' float16 KV at the final context): ``tokens`` greedy steps from token ``first``."""
    import copy

    import torch

    from kvtier.bench.runtime import global_kv_f16

    n = dense.get_seq_length()
    tiered = kind.startswith("tiered-")
    if tiered:
        from kvtier.adapters.torch import TieredCache

        budget = max(global_kv_f16(model, n + tokens) // 10, 1 << 20)
        cache = _separate(TieredCache(model, budget=0.1, policy=kind.split("-")[1], dram_budget=budget,
                                      device=device, direct_io=False if "-pagecache" in kind else "auto"), kind)
        cache.prefill_from(dense)
    else:
        cache = copy.deepcopy(dense)
    try:
        s0 = cache.stats() if tiered else None
        tok = torch.tensor([[first]])
        with torch.inference_mode():
            t0 = time.perf_counter()
            for _ in range(tokens):
                out = model(tok, cache=cache, use_cache=True, logits_to_keep=1)
                tok = out.logits[:, -1:].argmax(-1)
            dt = time.perf_counter() - t0
        r = {"cache": kind, "context": n, "tokens": tokens, "tok_s": tokens / dt, "step_ms": 1e3 * dt / tokens,
             "rss_bytes": _rss()}
        if s0 is not None:  # tiered
            s1 = _tiered_figures(r, s0, cache.stats(), dt, tokens)
            r.update(engine_dram_peak_bytes=s1["engine_dram_peak_bytes"], engine_dram_budget=s1["engine_dram_budget"],
                     global_kv_float16_bytes=s1["global_kv_float16_bytes"])
        else:
            r.update(_DENSE_PROFILE, compute_ms=r["step_ms"], kv_bytes=_kv_bytes_dynamic(cache))
        return r
    finally:
        if tiered:
            cache.close()


def _median(rows: list[dict]) -> dict:
    out = dict(rows[0])
    for k, v in rows[0].items():
        if isinstance(v, float) or (isinstance(v, int) and k not in ("context", "tokens")):
            vals = [r[k] for r in rows if r.get(k) is not None]
            out[k] = statistics.median(vals) if vals else None
    out["runs"] = len(rows)
    out["tok_s_all"] = [r["tok_s"] for r in rows]
    return out


def markdown(rows: list[dict], meta: dict) -> str:
    def mib(b):
        return "—" if b is None else f"{b / 2**20:.1f}"

    lines = [f"# Decode-step speed ({meta.get('model_name', 'SmolLM2-135M')}, CPU)", "",
             f"Command: `{meta['command']}`. Medians of {meta['runs']} interleaved rounds; "
             f"{meta['threads']} torch threads on a shared 2-core machine. "
             "Ratio: tok/s over DynamicCache's at the same context, medians of the same rounds.", "",
             "Profile of a step (ms): compute (the model's layers, attention arithmetic, LM head), engine "
             "(the calling thread's CPU inside store calls), wait (store time that thread did not run: reads, "
             "prefetches still loading, or the machine's other work; prefetch wait: the engine's own count), "
             "read calls (wall time of the calling thread's read system calls, reads on demand, the engine's own "
             "clock: I/O wait as measured; its CPU is in engine, the rest in wait), glue (the adapter's Python "
             "around them); store share = (engine + wait + glue) / step. Modeled I/O: the UFS 4.0 model's time "
             "for the step's reads (accounted, not slept).",
             "",
             md_table(["context", "cache", "tok/s", "ratio", "step ms", "compute", "engine", "wait",
                       "read calls", "of which prefetch wait", "glue", "store share", "modeled I/O",
                       "KV held MiB", "RSS MiB"],
                      [[r["context"], r["cache"], f"{r['tok_s']:.2f}", f"{r['ratio']:.2f}", f"{r['step_ms']:.1f}",
                        f"{r['compute_ms']:.1f}", f"{r['engine_ms']:.1f}", f"{r['wait_ms']:.1f}",
                        f"{r.get('read_wait_ms', 0.0):.1f}", f"{r['io_wait_ms']:.2f}", f"{r['glue_ms']:.1f}",
                        f"{100 * r['store_share']:.0f}%", f"{r['modeled_io_ms']:.2f}", mib(r["kv_bytes"]),
                        mib(r["rss_bytes"])]
                       for r in rows], "ll" + "r" * 13)]
    io_rows = [r for r in rows if r.get("read_ops_per_step") is not None]
    if io_rows:
        lines += ["", "Reads per step (medians of the same rounds): requests and MiB read (prefetches' included), "
                  "the cache's hits and misses (clusters), clusters prefetched, used, and evicted before any read "
                  "used them.", "",
                  md_table(["context", "cache", "reads", "MiB read", "of which prefetched", "hits", "misses",
                            "prefetched", "prefetch used", "prefetch evicted unused"],
                           [[r["context"], r["cache"], f"{r['read_ops_per_step']:.0f}",
                             f"{r['read_bytes_per_step'] / 2**20:.2f}",
                             f"{r['prefetch_read_bytes_per_step'] / 2**20:.2f}", f"{r['cache_hits_per_step']:.0f}",
                             f"{r['cache_misses_per_step']:.0f}", f"{r.get('prefetch_issued_per_step', 0):.0f}",
                             f"{r.get('prefetch_hits_per_step', 0):.0f}",
                             f"{r.get('prefetch_evicted_per_step', 0):.0f}"] for r in io_rows], "ll" + "r" * 8)]
    pre = [r for r in rows if r.get("prefill_seconds") is not None and r["cache"] == rows[0]["cache"]]
    if pre:
        lines += ["", "Each context prefilled once (dense, in chunks; every cache decodes from a copy of that "
                  "state; TieredCache's engine DRAM budget is 10% of the full-attention layers' float16 KV): "
                  + "; ".join(f"{r['context']} tokens: prefill {r['prefill_seconds']:.0f} s, peak RSS "
                              f"{mib(r['prefill_peak_rss'])} MiB" for r in pre)]
    eng = [r for r in rows if r.get("engine_dram_peak_bytes") is not None]
    if eng:
        peaks = (f"{r['context']} {r['cache']}: {mib(r['engine_dram_peak_bytes'])} MiB of "
                 f"{mib(r['global_kv_float16_bytes'])} MiB "
                 f"({100 * r['engine_dram_peak_bytes'] / r['global_kv_float16_bytes']:.1f}%)" for r in eng)
        lines += ["", "Engine DRAM peak against the full-attention layers' float16 KV: " + "; ".join(peaks)]
    if meta["skipped"]:
        lines += ["", "Not run: " + "; ".join(meta["skipped"])]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind in dict.fromkeys(r["cache"] for r in rows):
        pts = sorted((r["context"], r["tok_s"]) for r in rows if r["cache"] == kind)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=kind)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode tok/s (median)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def _available(kind: str):
    """None if the cache can run here, else why not."""
    if kind == "quantized-quanto":
        try:
            import optimum.quanto  # noqa: F401
        except Exception as e:
            return f"QuantizedCache(quanto): optimum-quanto does not import ({e})"
    if kind == "quantized-hqq":
        try:
            import hqq  # noqa: F401
        except Exception as e:
            return f"QuantizedCache(HQQ): hqq does not import ({e})"
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="kvtier bench decode", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="The defaults take about 25 minutes here (6 caches x 3 rounds x 2 contexts x "
                                       "256 tokens); --contexts 1024 --tokens 64 --runs 1 about 2. Results are "
                                       "rewritten after every round, so a stopped run keeps what it measured.")
    p.add_argument("--contexts", default="2048,8192", help="prompt lengths (comma-separated)")
    p.add_argument("--tokens", type=int, default=256, help="decoded tokens per run")
    p.add_argument("--runs", type=int, default=3, help="interleaved rounds (the tables give medians)")
    p.add_argument("--caches",
                   default="dynamic,quantized-quanto,quantized-hqq,tiered-static,tiered-adaptive,tiered-local",
                   help="caches to compare (comma-separated)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the other core for loader threads)")
    p.add_argument("--device", default=None,
                   help="TieredCache's flash device model (e.g. ufs4.0, for the modeled I/O columns); "
                        "None: the real file only (modeled I/O then reads 0)")
    p.add_argument("--out", default=os.path.join("bench", "results"), help="results directory")
    p.add_argument("--name", default="decode", help="results file name (NAME.json, NAME.md)")
    p.add_argument("--model", default="smollm2", choices=("smollm2", "gemma3"),
                   help="gemma3: Gemma 3 270M (hybrid; needs the gemma extra), each context prefilled once")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="the model's dtype")
    p.add_argument("--prefill-once", action="store_true",
                   help="prefill each context once (dense, in chunks) and start every run from a copy "
                        "(always with --model gemma3: a 32K prefill takes minutes here)")
    a = show_defaults(p).parse_args(argv)
    if a.model == "gemma3" or a.prefill_once:
        return _main_prefilled(a, argv)
    import torch

    from kvtier.demo import document_prompt

    torch.set_num_threads(a.threads)
    contexts = [int(x) for x in a.contexts.replace(",", " ").split()]
    kinds, skipped = [], ["DynamicCache(offloading=True): offloads to an accelerator; this machine has none"]
    for k in a.caches.replace(",", " ").split():
        why = _available(k)
        (skipped.append(why) if why else kinds.append(k))
    from kvtier import models

    model, tok = models.smollm2()
    meta = {"command": "python -m kvtier.bench.decode " + " ".join(argv if argv is not None else sys.argv[1:]),
            "runs": a.runs, "threads": a.threads, "skipped": skipped, "torch": torch.__version__}
    os.makedirs(a.out, exist_ok=True)
    rows: list = []
    planned, done, t0 = len(contexts) * a.runs * len(kinds), 0, time.perf_counter()
    for context in contexts:
        ids = document_prompt(tok, context + a.tokens + 8)[:, : context + a.tokens]
        if ids.shape[1] < context:
            raise SystemExit(f"the document prompt has only {ids.shape[1]} tokens, fewer than context {context}")
        runs: dict[str, list[dict]] = {k: [] for k in kinds}
        if context == contexts[0]:  # warm-up, untimed: first-call costs (kernel selection, quanto's setup)
            for k in kinds:
                run_one(model, k, ids, min(context, 256), 2)
        done = _rounds(a, meta, rows, runs, kinds, contexts, context, done, planned, t0,
                       lambda k, ids=ids, context=context: run_one(model, k, ids, context, a.tokens, a.device))
        rows += _medians(runs, kinds)
    md = _write(a, meta, rows, contexts, final=True)
    print(md)
    return 0


def _rounds(a, meta, rows, runs, kinds, contexts, context, done, planned, t0, one) -> int:
    """``a.runs`` interleaved rounds of ``one(kind)`` for every kind into ``runs``, the results
    rewritten after every round; returns the runs done so far."""
    for rnd in range(a.runs):
        for k in kinds:
            r = one(k)
            runs[k].append(r)
            done += 1
            el = time.perf_counter() - t0  # later contexts take longer: the estimate is a floor
            print(f"[{done}/{planned}, {el / 60:.1f} min, at least {el / done * (planned - done) / 60:.1f} min left] "
                  f"ctx {context} round {rnd} {k}: {r['tok_s']:.2f} tok/s, step {r['step_ms']:.1f} ms = compute "
                  f"{r['compute_ms']:.1f} + engine {r['engine_ms']:.1f} + wait {r['wait_ms']:.1f} + glue "
                  f"{r['glue_ms']:.1f} (store share {100 * r['store_share']:.0f}%)",
                  file=sys.stderr, flush=True)
        # what is measured so far, rewritten after every round: a stopped run keeps it
        _write(a, meta, rows + _medians(runs, kinds), contexts, final=False)
    return done


def _main_prefilled(a, argv) -> int:
    """``main`` with every context prefilled once: interleaved rounds of every cache from copies."""
    import torch

    from kvtier.bench import runtime
    from kvtier.bench.tasks import Haystack

    torch.set_num_threads(a.threads)
    contexts = [int(x) for x in a.contexts.replace(",", " ").split()]
    kinds = [k for k in a.caches.replace(",", " ").split() if not k.startswith("quantized-")]
    skipped = [f"{k}: not run from a prefilled state" for k in a.caches.replace(",", " ").split()
               if k.startswith("quantized-")]
    model, tok = runtime.load(a.model, a.dtype)
    ids = tok(Haystack(tok).text, add_special_tokens=True).input_ids
    meta = {"command": "kvtier bench decode " + " ".join(argv if argv is not None else sys.argv[1:]),
            "runs": a.runs, "threads": a.threads, "skipped": skipped, "torch": torch.__version__,
            "model_name": {"gemma3": "Gemma 3 270M", "smollm2": "SmolLM2-135M"}[a.model] + f", {a.dtype}"}
    os.makedirs(a.out, exist_ok=True)
    rows: list = []
    planned, done, t0 = len(contexts) * a.runs * len(kinds), 0, time.perf_counter()
    for context in contexts:
        if len(ids) < context + 1:
            raise SystemExit(f"the document has only {len(ids)} tokens, fewer than context {context} + 1")
        t1 = time.perf_counter()
        dense = runtime.prefill(model, ids[:context], 1024)
        pre_s, pre_rss = time.perf_counter() - t1, runtime.peak_rss()
        print(f"ctx {context}: prefill {pre_s:.0f} s, peak RSS {pre_rss / 2**20:.0f} MiB", file=sys.stderr, flush=True)

        def one(k, dense=dense, context=context, pre_s=pre_s, pre_rss=pre_rss):
            r = run_prefilled(model, k, dense, ids[context], a.tokens, a.device)
            r["prefill_seconds"], r["prefill_peak_rss"] = pre_s, pre_rss
            return r

        runs: dict[str, list[dict]] = {k: [] for k in kinds}
        done = _rounds(a, meta, rows, runs, kinds, contexts, context, done, planned, t0, one)
        rows += _medians(runs, kinds)
        del one, dense  # the prefilled KV goes before the next context's prefill
    print(_write(a, meta, rows, contexts, final=True))
    return 0


def _medians(runs: dict, kinds: list) -> list:
    out = []
    med = {k: _median(v) for k, v in runs.items() if v}
    for k in kinds:
        if k not in med:
            continue
        pairs = zip(runs[k], runs.get("dynamic") or [], strict=False)  # rounds both ran
        ratios = [x["tok_s"] / y["tok_s"] for x, y in pairs]
        med[k]["ratio"] = statistics.median(ratios) if ratios else float("nan")
        out.append(med[k])
    return out


def _write(a, meta: dict, rows: list, contexts: list, final: bool) -> str:
    with open(os.path.join(a.out, a.name + ".json"), "w") as f:
        json.dump({"meta": {**meta, "complete": final}, "rows": rows}, f, indent=1)
    md = markdown(rows, meta) + ("" if final else "\n(partial: the run was still going)\n")
    with open(os.path.join(a.out, a.name + ".md"), "w") as f:
        f.write(md)
    if final and len(contexts) > 1:
        os.makedirs(os.path.join(a.out, "plots"), exist_ok=True)
        plot(rows, os.path.join(a.out, "plots", a.name + ".png"))
    return md


if __name__ == "__main__":
    sys.exit(main())
