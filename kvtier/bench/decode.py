"""Decode-step speed: SmolLM2-135M decoding with DynamicCache, QuantizedCache and TieredCache.

For each context: prefill the first ``context`` tokens of the document prompt, then decode
``--tokens`` tokens greedily, one forward per token. The caches run interleaved, round by
round (``--runs`` rounds), so that each ratio compares runs made side by side on this shared
machine; the tables give medians over rounds.

Per cache and context: tok/s; ms per step split into compute (the step minus the time spent
in kvtier calls), store (kvtier calls: retrieve_many, add, prefetch), I/O wait (the part of
store time retrieves waited for prefetches still loading) and modeled I/O (the device
model's time for the reads, UFS 4.0, accounted, not slept) with the overlap: the modeled I/O
not waited for; DRAM: the KV bytes held at the end (DynamicCache: its tensors; TieredCache:
adapter sinks and window plus engine DRAM) and the process RSS.

TieredCache runs with a 10% fetch budget and an engine DRAM budget of 10% of the full KV
cache at the final context, reading flash with O_DIRECT (``tiered-<policy>``) or through the
page cache (``tiered-<policy>-pagecache``: on a machine whose disk is a virtual one, its
latency is not a phone's; the modeled I/O column gives the UFS 4.0 time either way).

    python -m bench.decode [--contexts 2048,8192] [--tokens 256] [--runs 3] [--out bench/results]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from kvtier.bench.tables import md_table


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _kv_bytes_dynamic(cache) -> int:
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if t is not None:
                total += t.numel() * t.element_size()
    return total


def _make_cache(kind: str, model, full_bytes: int, device=None):
    from transformers import DynamicCache

    if kind == "dynamic":
        return DynamicCache(config=model.config)
    if kind.startswith("quantized-"):
        from transformers import QuantizedCache

        return QuantizedCache(backend=kind.split("-", 1)[1], config=model.config, nbits=4)
    from kvtier.adapters.torch import TieredCache

    policy = kind.split("-")[1]
    return TieredCache(model, budget=0.1, policy=policy, dram_budget=max(full_bytes // 10, 1 << 20), device=device,
                       direct_io=False if kind.endswith("-pagecache") else "auto")


def run_one(model, kind: str, ids, context: int, tokens: int, device=None) -> dict:
    import torch

    full = model.config.num_hidden_layers * model.config.num_key_value_heads * \
        (model.config.hidden_size // model.config.num_attention_heads) * 2 * 4 * (context + tokens)
    cache = _make_cache(kind, model, full, device)
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
        if tiered:
            s1 = cache.stats()
            d = {k: s1[k] - s0[k] for k in ("retrieve_seconds", "add_seconds", "prefetch_seconds",
                                             "io_wait_seconds", "modeled_io_seconds")}
            store = d["retrieve_seconds"] + d["add_seconds"] + d["prefetch_seconds"]
            r.update(store_ms=1e3 * store / tokens, compute_ms=1e3 * (dt - store) / tokens,
                     io_wait_ms=1e3 * d["io_wait_seconds"] / tokens,
                     modeled_io_ms=1e3 * d["modeled_io_seconds"] / tokens,
                     overlap_ms=1e3 * max(0.0, d["modeled_io_seconds"] - d["io_wait_seconds"]) / tokens,
                     kv_bytes=s1["dram_bytes"], kv_peak_bytes=s1["dram_peak_bytes"],
                     full_kv_bytes=s1["full_cache_bytes"])
        else:
            r.update(store_ms=0.0, compute_ms=r["step_ms"], io_wait_ms=0.0, modeled_io_ms=0.0, overlap_ms=0.0,
                     kv_bytes=_kv_bytes_dynamic(cache) if kind == "dynamic" else None)
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

    lines = ["# Decode-step speed (SmolLM2-135M, CPU)", "",
             f"Command: `{meta['command']}`. Medians of {meta['runs']} interleaved rounds; "
             f"{meta['threads']} torch threads on a shared 2-core machine. "
             "Ratio: tok/s over DynamicCache's at the same context, medians of the same rounds.", "",
             md_table(["context", "cache", "tok/s", "ratio", "step ms", "compute", "store", "I/O wait", "modeled I/O",
                       "overlap", "KV held MiB", "RSS MiB"],
                      [[r["context"], r["cache"], f"{r['tok_s']:.2f}", f"{r['ratio']:.2f}", f"{r['step_ms']:.1f}",
                        f"{r['compute_ms']:.1f}", f"{r['store_ms']:.1f}", f"{r['io_wait_ms']:.2f}",
                        f"{r['modeled_io_ms']:.2f}", f"{r['overlap_ms']:.2f}", mib(r["kv_bytes"]), mib(r["rss_bytes"])]
                       for r in rows], "ll" + "r" * 10)]
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
    p.add_argument("--caches", default="dynamic,quantized-quanto,quantized-hqq,tiered-static,tiered-adaptive,tiered-local",
                   help="caches to compare (comma-separated)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the other core for loader threads)")
    p.add_argument("--device", default=None,
                   help="TieredCache's flash device model (e.g. ufs4.0, for the modeled I/O columns); "
                        "None: the real file only (modeled I/O then reads 0)")
    p.add_argument("--out", default=os.path.join("bench", "results"), help="results directory")
    p.add_argument("--name", default="decode", help="results file name (NAME.json, NAME.md)")
    a = p.parse_args(argv)
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
    meta = {"command": "python -m bench.decode " + " ".join(argv if argv is not None else sys.argv[1:]),
            "runs": a.runs, "threads": a.threads, "skipped": skipped, "torch": torch.__version__}
    os.makedirs(a.out, exist_ok=True)
    rows: list = []
    planned, done, t0 = len(contexts) * a.runs * len(kinds), 0, time.perf_counter()
    for context in contexts:
        ids = document_prompt(tok, context + a.tokens + 8)[:, : context + a.tokens]
        if ids.shape[1] < context:
            raise SystemExit(f"the document prompt has only {ids.shape[1]} tokens, fewer than context {context}")
        runs = {k: [] for k in kinds}
        if context == contexts[0]:  # warm-up, untimed: first-call costs (kernel selection, quanto's setup)
            for k in kinds:
                run_one(model, k, ids, min(context, 256), 2)
        for rnd in range(a.runs):
            for k in kinds:
                r = run_one(model, k, ids, context, a.tokens, a.device)
                runs[k].append(r)
                done += 1
                el = time.perf_counter() - t0  # later contexts take longer: the estimate is a floor
                print(f"[{done}/{planned}, {el / 60:.1f} min, at least {el / done * (planned - done) / 60:.1f} min left] "
                      f"ctx {context} round {rnd} {k}: {r['tok_s']:.2f} tok/s, store {r['store_ms']:.1f} ms/step",
                      file=sys.stderr, flush=True)
            # what is measured so far, rewritten after every round: a stopped run keeps it
            _write(a, meta, rows + _medians(runs, kinds), contexts, final=False)
        rows += _medians(runs, kinds)
    md = _write(a, meta, rows, contexts, final=True)
    print(md)
    return 0


def _medians(runs: dict, kinds: list) -> list:
    out = []
    med = {k: _median(v) for k, v in runs.items() if v}
    for k in kinds:
        if k not in med:
            continue
        ratios = [x["tok_s"] / y["tok_s"] for x, y in zip(runs[k], runs["dynamic"])] if runs.get("dynamic") else []
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
