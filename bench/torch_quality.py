"""Model quality of kvtier as the KV cache of a real model (EVAL.md W1, W2; teacher-forced).

SmolLM2-135M-Instruct decodes a captured token sequence one token at a time (teacher-forced:
every method sees the same tokens) with

- ``full``: transformers' DynamicCache and SDPA, the reference;
- ``sink+window``: TieredCache with budget 0 (StreamingLLM-style: sinks + recent window);
- one TieredCache per store policy (``none``, ``static``, ``local``, ``adaptive``) at the
  same fetch budget (default 10% of the context per layer, KV head and step).

For each: ΔNLL (mean over decoded tokens of NLL - NLL(full), nats/token, with its standard
error), top-1 agreement with full attention, decoding tokens/s (same process, same threads,
measured side by side), entries fetched per retrieve, DRAM peak (adapter tensors + engine)
against the full cache, and the store's I/O per step on the modeled device. Policies the
store does not implement in this build are reported as unavailable, not replaced.

    python -m bench.torch_quality --workloads W1,W2 --prefill 512 --decode 512 \\
        --out bench/results/torch_quality.json

Pipelining (TieredCache's ``prefetch``: the next layer's reads overlap this layer's compute):
``--prefetch both`` runs every kvtier method without and with it, alternating, ``--repeats``
times, and reports the median tokens/s beside the store's time per step, the modeled I/O, the
time retrieves waited for loads and the prefetch hit count. Reads only take real time on a
throttled device model (``--throttle``: every read sleeps to its modeled time) and only reach
flash under a small engine DRAM budget:

    python -m bench.torch_quality --workloads W1 --methods adaptive --prefill 512 --decode 256 \\
        --dram-budget 6MiB --throttle --prefetch both --repeats 3 \\
        --out bench/results/torch_pipelining.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

METHODS = ("sink+window", "none", "static", "local", "adaptive")


def teacher_forced(model, cache, tokens: np.ndarray, prefill: int, progress=None):
    """Prefill ``tokens[:prefill]`` in one forward, then feed tokens ``prefill..T-2`` one by
    one; returns (nll, top1, prefill_seconds, decode_seconds) of the predictions of tokens
    ``prefill+1..T-1``."""
    import torch

    ids = torch.from_numpy(tokens.astype(np.int64))[None]
    steps = range(prefill, len(tokens) - 1)
    nll = np.empty(len(steps), np.float64)
    top = np.empty(len(steps), np.int64)
    with torch.inference_mode():
        t0 = time.perf_counter()
        model(ids[:, :prefill], cache=cache, use_cache=True, logits_to_keep=1)
        t1 = time.perf_counter()
        it = steps if progress is None else progress(steps)
        for i, t in enumerate(it):
            logits = model(ids[:, t:t + 1], cache=cache, use_cache=True).logits[0, -1].float()
            nll[i] = -float(torch.log_softmax(logits, -1)[ids[0, t + 1]])
            top[i] = int(logits.argmax())
        t2 = time.perf_counter()
    return nll, top, t1 - t0, t2 - t1


def _device(args):
    """--device, throttled (reads sleep to their modeled time) with --throttle."""
    if not args.throttle:
        return args.device
    import kvtier

    if args.device not in kvtier.PROFILES:
        raise SystemExit(f"--throttle: needs a device profile name ({', '.join(kvtier.PROFILES)}), got {args.device!r}")
    return kvtier.PROFILES[args.device].replace(throttle=True)


def _median_run(runs: list[dict]) -> dict:
    """The run of median tokens/s (its other figures belong to that same run), with every
    run's tokens/s; quality figures are the same in every run (deterministic decoding)."""
    ranked = sorted(runs, key=lambda r: r["tokens_per_s"])
    row = dict(ranked[(len(ranked) - 1) // 2])
    row["tokens_per_s_runs"] = [r["tokens_per_s"] for r in runs]
    if any(r.get("nll") != row.get("nll") for r in runs):
        raise RuntimeError(f"{row['workload']} {row['method']}: NLL differs between repeats")
    return row


def run_workload(model, workload: str, args, progress=None) -> list[dict]:
    from transformers import DynamicCache

    import kvtier
    from bench.capture import load_trace
    from kvtier.adapters.torch import TieredCache

    trace = load_trace(workload, prefill=args.prefill, decode=max(args.trace_decode, args.decode),
                       progress=progress is not None)
    tokens = trace.tokens[: args.prefill + args.decode]
    bar = (lambda desc: (lambda it: progress(it, desc=desc, unit="tok", leave=False))) if progress else (lambda desc: None)

    full_runs = []
    for _ in range(args.repeats):
        nll_ref, top_ref, pre_s, dec_s = teacher_forced(model, DynamicCache(config=model.config), tokens,
                                                        args.prefill, bar(f"{workload} full"))
        full_runs.append((len(nll_ref) / dec_s, pre_s))
    steps = len(nll_ref)
    elem = next(model.parameters()).element_size()
    cfg = model.config
    # the last token is predicted, never fed: the cache ends one short of the sequence
    full_bytes = (cfg.num_hidden_layers * cfg.num_key_value_heads * (len(tokens) - 1) * 2
                  * (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads) * elem)
    tps = sorted(full_runs)[(len(full_runs) - 1) // 2]
    rows = [{"workload": workload, "method": "full", "status": "ok", "steps": steps,
             "nll": float(nll_ref.mean()), "delta_nll": 0.0, "delta_nll_se": 0.0, "top1": 1.0,
             "tokens_per_s": tps[0], "tokens_per_s_runs": [r[0] for r in full_runs], "prefill_s": tps[1],
             "dram_peak_bytes": full_bytes, "full_cache_bytes": full_bytes}]
    device = _device(args)
    for method in args.methods:
        budget, policy = (0, None) if method == "sink+window" else (args.budget, method)
        # budget 0 never retrieves, so there is nothing to prefetch: one setting is enough
        modes = [False] if method == "sink+window" else args.prefetch_modes
        runs = {pf: [] for pf in modes}
        unavailable = None
        for _ in range(args.repeats):  # alternating settings: drift on a shared machine hits both
            for pf in modes:
                row = {"workload": workload, "method": method, "policy": policy, "budget": budget, "prefetch": pf}
                try:
                    cache = TieredCache(model, budget=budget, policy=policy, sinks=args.sinks, window=args.window,
                                        dram_budget=args.dram_budget, device=device, prefetch=pf)
                except kvtier.InvalidArgumentError as e:
                    unavailable = dict(row, status="unavailable", reason=str(e))
                    break
                try:
                    nll, top, pre_s, dec_s = teacher_forced(
                        model, cache, tokens, args.prefill,
                        bar(f"{workload} {method}{' prefetch' if pf else ''}"))
                    st = cache.stats()
                    health = cache.cluster_stats()
                finally:
                    cache.close()
                d = nll - nll_ref
                per_step = max(st["decode_steps"], 1)
                row.update(
                    status="ok", policy=st["policy"], steps=steps, nll=float(nll.mean()),
                    delta_nll=float(d.mean()), delta_nll_se=float(d.std(ddof=1) / math.sqrt(len(d))),
                    top1=float((top == top_ref).mean()), tokens_per_s=steps / dec_s, prefill_s=pre_s,
                    fetched_per_step=st["fetched_per_step"], prefetchable_share=st["prefetchable_share"],
                    dram_peak_bytes=st["dram_peak_bytes"], adapter_dram_peak_bytes=st["adapter_dram_peak_bytes"],
                    engine_dram_peak_bytes=st["engine_dram_peak_bytes"], engine_dram_budget=st["engine_dram_budget"],
                    full_cache_bytes=st["full_cache_bytes"],
                    read_ops_per_step=st["read_ops"] / per_step, read_bytes_per_step=st["read_bytes"] / per_step,
                    mean_read_entries=st["mean_read_entries"],
                    modeled_io_ms_per_step=1e3 * st["modeled_io_seconds"] / per_step,
                    store_ms_per_step=1e3 * (st["retrieve_seconds"] + st["add_seconds"] + st["prefetch_seconds"])
                    / per_step,
                    io_wait_ms_per_step=1e3 * st["io_wait_seconds"] / per_step,
                    prefetch_ms_per_step=1e3 * st["prefetch_seconds"] / per_step,
                    prefetch_issued=st["prefetch_issued"], prefetch_hits=st["prefetch_hits"],
                    prefetch_read_bytes_per_step=st["prefetch_read_bytes"] / per_step,
                    cache_hits=st["cache_hits"], cache_misses=st["cache_misses"],
                    **health)
                runs[pf].append(row)
            if unavailable:
                break
        if unavailable:
            rows.append(unavailable)
            continue
        rows += [_median_run(runs[pf]) for pf in modes]
    return rows


def _mib(b):
    return f"{b / 2**20:.1f}"


def _pf(r) -> str:
    return {True: "on", False: "off"}.get(r.get("prefetch"), "—")


def markdown(rows: list[dict]) -> str:
    cols = ["workload", "method", "prefetch", "ΔNLL (nats/token)", "top-1 vs full", "fetched/retrieve",
            "DRAM peak MiB: adapter + engine (full cache)", "tok/s", "reads/step", "entries/read",
            "modeled I/O ms/step"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [r["workload"], r["method"], _pf(r)]
        if r["status"] != "ok":
            cells += ["unavailable in this build"] + [""] * (len(cols) - 4)
        elif r["method"] == "full":
            cells += ["—", "—", "—", f"{_mib(r['dram_peak_bytes'])} ({_mib(r['full_cache_bytes'])})",
                      f"{r['tokens_per_s']:.1f}", "—", "—", "—"]
        else:
            cells += [f"{r['delta_nll']:+.4f} ± {r['delta_nll_se']:.4f}", f"{100 * r['top1']:.1f}%",
                      f"{r['fetched_per_step']:.1f}",
                      f"{_mib(r['adapter_dram_peak_bytes'])} + {_mib(r['engine_dram_peak_bytes'])} "
                      f"({_mib(r['full_cache_bytes'])})",
                      f"{r['tokens_per_s']:.1f}", f"{r['read_ops_per_step']:.1f}",
                      f"{r['mean_read_entries']:.1f}", f"{r['modeled_io_ms_per_step']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pipelining_markdown(rows: list[dict]) -> str:
    """Without vs with prefetch, per kvtier method measured both ways (empty if none)."""
    cols = ["workload", "method", "prefetch", "tok/s median (runs)", "store ms/step (of which prefetch calls)",
            "waited for loads ms/step",
            "modeled I/O ms/step", "read KiB/step (prefetched)", "reads/step", "prefetch hits / issued"]
    both = {(r["workload"], r["method"]) for r in rows if r.get("prefetch") is True} & \
           {(r["workload"], r["method"]) for r in rows if r.get("prefetch") is False}
    if not both:
        return ""
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        if (r["workload"], r["method"]) not in both or r["status"] != "ok":
            continue
        runs = ", ".join(f"{x:.1f}" for x in r.get("tokens_per_s_runs", [r["tokens_per_s"]]))
        lines.append("| " + " | ".join([
            r["workload"], r["method"], _pf(r), f"{r['tokens_per_s']:.2f} ({runs})",
            f"{r['store_ms_per_step']:.2f} ({r.get('prefetch_ms_per_step', 0.0):.2f})",
            f"{r.get('io_wait_ms_per_step', 0.0):.2f}", f"{r['modeled_io_ms_per_step']:.2f}",
            f"{r['read_bytes_per_step'] / 1024:.0f} ({r.get('prefetch_read_bytes_per_step', 0) / 1024:.0f})",
            f"{r['read_ops_per_step']:.1f}", f"{r.get('prefetch_hits', 0)} / {r.get('prefetch_issued', 0)}"]) + " |")
    return "\n".join(lines)


def targets(rows: list[dict]) -> list[str]:
    """The issue's acceptance targets, checked where both sides were measured."""
    out = []
    for w in sorted({r["workload"] for r in rows}):
        # quality does not depend on prefetch (checked below): the first row of each method
        by = {}
        for r in rows:
            if r["workload"] == w and r["status"] == "ok":
                by.setdefault(r["method"], r)
        for m in sorted({r["method"] for r in rows if r["workload"] == w and r["status"] == "ok"}):
            pair = [r for r in rows if r["workload"] == w and r["method"] == m and r.get("prefetch") is not None]
            if len({r["prefetch"] for r in pair}) == 2:
                same = len({(r["nll"], r["top1"]) for r in pair}) == 1
                out.append(f"{w}: {m} NLL and top-1 identical with and without prefetch: {'yes' if same else 'NO'}")
        if "adaptive" in by and "static" in by:
            ok = by["adaptive"]["delta_nll"] <= 0.5 * by["static"]["delta_nll"]
            out.append(f"{w}: ΔNLL(adaptive) <= 1/2 ΔNLL(static): {'met' if ok else 'NOT met'}")
        else:
            out.append(f"{w}: ΔNLL(adaptive) <= 1/2 ΔNLL(static): not measured (needs both adaptive and static)")
        if "adaptive" in by and "none" in by:
            ok = by["adaptive"]["top1"] >= by["none"]["top1"] - 0.02
            out.append(f"{w}: top-1(adaptive) within 2 points of none: {'met' if ok else 'NOT met'}")
        else:
            out.append(f"{w}: top-1(adaptive) within 2 points of none: not measured (needs both adaptive and none)")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.torch_quality", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default="W1,W2")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=512, help="tokens after the prefill that are decoded")
    ap.add_argument("--trace-decode", type=int, default=2048,
                    help="length of the captured trace the tokens are cut from (reuses the cached capture)")
    ap.add_argument("--budget", type=float, default=0.1, help="fetch budget, fraction of the context")
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    ap.add_argument("--dram-budget", default="16MiB", help="the engine's DRAM budget")
    ap.add_argument("--device", default="ufs4.0", help="flash device model for the I/O figures")
    ap.add_argument("--throttle", action="store_true",
                    help="reads sleep to the device model's time (so prefetch has real reads to overlap)")
    ap.add_argument("--prefetch", choices=("on", "off", "both"), default="on",
                    help="TieredCache's pipelining; both: every kvtier method without and with it")
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs per method (alternating prefetch settings); the median tokens/s is reported")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: steadier timings on a shared machine)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "torch_quality.json"))
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--report", metavar="JSON", help="only print the tables of an earlier result file")
    args = ap.parse_args(argv)
    if args.report:
        result = json.loads(Path(args.report).read_text())
        print(markdown(result["rows"]))
        pipe = pipelining_markdown(result["rows"])
        if pipe:
            print("\n" + pipe)
        print("\n".join(["", *result["targets"]]))
        return 0
    args.methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        ap.error(f"unknown methods {bad}; choose from {METHODS}")
    if args.repeats < 1:
        ap.error("--repeats: at least 1")
    args.prefetch_modes = {"on": [True], "off": [False], "both": [False, True]}[args.prefetch]

    import torch
    import transformers

    import kvtier
    from bench.capture import load_model

    torch.set_num_threads(args.threads)
    progress = None
    if not args.no_progress:
        from tqdm.auto import tqdm as progress
    model, _ = load_model()
    started = time.perf_counter()
    rows = []
    for w in args.workloads.split(","):
        rows += run_workload(model, w, args, progress)
    result = {
        "benchmark": "torch_quality",
        "params": {k: v for k, v in vars(args).items() if k not in ("out", "no_progress", "report", "prefetch_modes")},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "versions": {"kvtier": kvtier.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "model_dtype": str(next(model.parameters()).dtype),
        "seconds": time.perf_counter() - started,
        "rows": rows,
        "targets": targets(rows),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nSmolLM2-135M, {args.prefill} prefill + {args.decode} decoded tokens (teacher-forced), "
          f"budget {args.budget:g} of the context, {args.sinks} sinks + {args.window}-token window, "
          f"engine DRAM budget {args.dram_budget}, device {args.device}{' (throttled)' if args.throttle else ''}, "
          f"prefetch {args.prefetch}, {args.threads} torch thread(s), median of {args.repeats} run(s)\n")
    print(markdown(rows))
    pipe = pipelining_markdown(rows)
    if pipe:
        print("\nPipelining: without vs with prefetch (tok/s: decoding only, median of the runs listed)\n")
        print(pipe)
    for r in rows:
        if r["status"] != "ok":
            print(f"\n{r['workload']} {r['method']}: {r['reason']}")
    print()
    for line in result["targets"]:
        print(line)
    print(f"\nwritten {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
