"""Model quality of kvtier as the KV cache of a real model (docs/design.md §8, W1, W2; teacher-forced).

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

    python -m kvtier.bench.torch_quality --workloads W1,W2 --prefill 512 --decode 512 \\
        --out bench/results/torch_quality.json

Long contexts (W2's tokens come straight from its text, any length up to about 110K; W1's are
cut from the cached 512 + 2048-token capture; ``--md`` also writes the tables with the command).
SmolLM2's context is 8192 tokens; at 8K the static policy's index alone outgrows a 16 MiB
engine budget, hence 64 MiB there:

    python -m kvtier.bench.torch_quality --workloads W1,W2 --prefill 1900 --decode 256 --md \
        --out bench/results/torch_quality_2k.json
    python -m kvtier.bench.torch_quality --workloads W2 --prefill 7900 --decode 128 --dram-budget 64MiB \
        --methods none,static,local,adaptive --md --out bench/results/torch_quality_8k.json

Pipelining (TieredCache's ``prefetch``: the next layer's reads overlap this layer's compute):
``--prefetch both`` runs every kvtier method without and with it, alternating, ``--repeats``
times, and reports the median tokens/s beside the store's time per step, the modeled I/O, the
time retrieves waited for loads and the prefetch hit count. Reads only take real time on a
throttled device model (``--throttle``: every read sleeps to its modeled time) and only reach
flash under a small engine DRAM budget:

    python -m kvtier.bench.torch_quality --workloads W1 --methods adaptive --prefill 512 --decode 256 \\
        --dram-budget 6MiB --throttle --prefetch both --repeats 3 \\
        --out bench/results/torch_pipelining.json

The estimated zone (TieredCache's ``estimate``: the clusters not fetched stand in by their
sizes, mean keys and value sums, merged by log-sum-exp): ``--budgets`` sweeps fetch budgets,
``--estimate`` lists the settings (``off``, ``all``, or a cluster count M; ``none`` and
``sink+window`` run ``off`` only), and ``--attn-error`` records per layer the relative L2
error of the attention output against full attention over every cached token of the same
run (same queries and keys: the error the layer's sparse attention adds at that step):

    python -m kvtier.bench.torch_quality --workloads W2 --prefill 512 --decode 256 \\
        --budgets 0.025,0.05,0.1,0.2 --estimate off,all --attn-error \\
        --out bench/results/torch_estimate.json
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
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from kvtier.bench.tables import md_table
from kvtier.benchargs import show_defaults
from kvtier.config import POLICIES

METHODS = ("sink+window", *POLICIES)


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


def _est_label(est) -> str:
    return "off" if est is False else "all" if est is None else "all+var" if est == "var" else str(est)


def _parse_estimate(text: str) -> list:
    """--estimate: off -> False, all -> None (every cluster not fetched), var -> all with the
    keys' variance (estimate_variance), M -> int."""
    out: list[bool | str | int | None] = []
    for t in (x.strip() for x in text.split(",") if x.strip()):
        if t == "off":
            out.append(False)
        elif t == "all":
            out.append(None)
        elif t == "var":
            out.append("var")
        elif t.isdigit():
            out.append(int(t))
        else:
            raise SystemExit(f"--estimate: off, all or a cluster count expected, got {t!r}")
    return out


class AttnErrorProbe:
    """Per layer, the relative L2 error ||o - o_full|| / ||o_full|| of the cache's attention
    output at each decoding step against full attention over every token the layer has seen
    (kept here as a shadow copy), with the same queries and keys. Wraps one TieredCache."""

    def __init__(self, cache):
        import torch

        self.torch = torch
        self.cache = cache
        self.shadow_k: dict = {}
        self.shadow_v: dict = {}
        self.err: dict = {}
        self._inner = cache._attend_unchecked
        cache._attend_unchecked = self._attend

    def _attend(self, layer, query, key, value, mask, scaling):
        torch = self.torch
        out = self._inner(layer, query, key, value, mask, scaling)
        k = torch.cat([self.shadow_k[layer], key[0]], 1) if layer in self.shadow_k else key[0]
        v = torch.cat([self.shadow_v[layer], value[0]], 1) if layer in self.shadow_v else value[0]
        self.shadow_k[layer], self.shadow_v[layer] = k, v
        if query.shape[2] == 1:
            g = query.shape[1] // k.shape[0]
            full = torch.nn.functional.scaled_dot_product_attention(
                query[0].float(), k.repeat_interleave(g, 0).float(), v.repeat_interleave(g, 0).float(), scale=scaling)
            got = out[0].transpose(0, 1).float()  # [q_heads, 1, d]
            e = float(torch.linalg.vector_norm(got - full) / torch.linalg.vector_norm(full))
            self.err.setdefault(layer, []).append(e)
        return out

    def per_layer(self) -> list[float]:
        return [float(np.mean(self.err[layer])) for layer in sorted(self.err)]


def workload_tokens(workload: str, total: int, trace_prefill: int, trace_decode: int, progress: bool) -> np.ndarray:
    """The first ``total`` tokens of the workload (``stdlib-docs``: the held-out text of
    kvtier.bench.llama_cpp, tokenized alike). W2 is a fixed text: its tokens come straight
    from the tokenizer (the same tokens its captured trace holds), at any length the text
    has (about 110K tokens), with no capture. W1 and W3 are sampled: they are cut from the
    captured trace of ``trace_prefill`` + at least ``trace_decode`` tokens (lengthened to
    ``total``; captured and cached on a miss)."""
    from kvtier.bench.capture import load_trace, w2_tokens

    if workload == "W2":
        return w2_tokens(total)
    if workload == "stdlib-docs":
        # the held-out text of kvtier.bench.llama_cpp (standard-library module docstrings)
        from kvtier.bench.capture import load_model
        from kvtier.bench.llama_cpp import held_out_text
        tokens = np.asarray(load_model()[1](held_out_text(), add_special_tokens=False).input_ids, np.int64)
        if tokens.size < total:
            raise ValueError(f"the held-out text has only {tokens.size} tokens, asked for {total}")
        return tokens[:total]
    trace = load_trace(workload, prefill=trace_prefill, decode=max(trace_decode, total - trace_prefill),
                       progress=progress)
    return trace.tokens[:total]


def run_workload(model, workload: str, args, progress=None) -> list[dict]:
    from transformers import DynamicCache

    import kvtier
    from kvtier.adapters.torch import TieredCache

    tokens = workload_tokens(workload, args.prefill + args.decode, args.trace_prefill, args.trace_decode,
                             progress is not None)
    def bar(desc):
        return (lambda it: progress(it, desc=desc, unit="tok", leave=False)) if progress else None

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
    # (method, budget, estimate) in order; sink+window once (budget 0), none never estimates
    runs_todo: list[tuple[str, float, bool | str | int | None]] = []
    for method in args.methods:
        if method == "sink+window":
            runs_todo.append((method, 0, False))
            continue
        runs_todo += [(method, b, est) for b in args.budgets for est in args.estimates
                      if est is False or method != "none"]
    for method, budget, est in runs_todo:
        policy = None if method == "sink+window" else method
        # budget 0 never retrieves, so there is nothing to prefetch: one setting is enough
        modes = [False] if method == "sink+window" else args.prefetch_modes
        runs: dict[bool, list] = {pf: [] for pf in modes}
        unavailable = None
        for _ in range(args.repeats):  # alternating settings: drift on a shared machine hits both
            for pf in modes:
                row: dict[str, Any] = {"workload": workload, "method": method, "policy": policy, "budget": budget,
                                       "prefetch": pf, "estimate": _est_label(est)}
                try:
                    cache = TieredCache(model, budget=budget, policy=policy, sinks=args.sinks, window=args.window,
                                        dram_budget=args.dram_budget, device=device, prefetch=pf,
                                        estimate="all" if est in (None, "var") else est,
                                        estimate_variance=est == "var",
                                        collection_options={"score_temp": args.score_temp} if args.score_temp else None)
                except kvtier.InvalidArgumentError as e:
                    unavailable = dict(row, status="unavailable", reason=str(e))
                    break
                probe = AttnErrorProbe(cache) if args.attn_error else None
                try:
                    nll, top, pre_s, dec_s = teacher_forced(
                        model, cache, tokens, args.prefill,
                        bar(f"{workload} {method} {budget:g} est={_est_label(est)}{' prefetch' if pf else ''}"))
                    st = cache.stats()
                    health = cache.cluster_stats()
                    summaries = _summary_bytes(cache) if method not in ("sink+window", "none") else None
                finally:
                    cache.close()
                d = nll - nll_ref
                per_step = max(st["decode_steps"], 1)
                row.update(
                    status="ok", policy=st["policy"], steps=steps, nll=float(nll.mean()),
                    delta_nll=float(d.mean()), delta_nll_se=float(d.std(ddof=1) / math.sqrt(len(d))),
                    top1=float((top == top_ref).mean()), tokens_per_s=steps / dec_s, prefill_s=pre_s,
                    fetched_per_step=st["fetched_per_retrieve"], prefetchable_share=st["prefetchable_share"],
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
                    estimated_per_step=st.get("estimated_per_retrieve", 0.0),
                    **health)
                if summaries:
                    row.update(summaries)
                if probe is not None:
                    row["attn_rel_l2_per_layer"] = probe.per_layer()
                    row["attn_rel_l2"] = float(np.mean(row["attn_rel_l2_per_layer"]))
                runs[pf].append(row)
            if unavailable:
                break
        if unavailable:
            rows.append(unavailable)
            continue
        rows += [_median_run(runs[pf]) for pf in modes]
    return rows


def _summary_bytes(cache) -> dict:
    """DRAM of the value sums (one float32 vector of value_dim per cluster, live clusters),
    over all collections, per cluster and per stored entry."""
    clusters = entries = 0
    vdim = 0
    for layer in cache.layers:
        for c in layer.colls:
            st = c.stats()
            clusters += st["clusters"]
            entries += st["entries"]
            vdim = c.value_dim
    total = clusters * vdim * 4
    return {"summary_bytes": total, "summary_bytes_per_cluster": vdim * 4,
            "summary_bytes_per_entry": total / entries if entries else 0.0}


def _mib(b):
    return f"{b / 2**20:.1f}"


def _pf(r) -> str:
    return {True: "on", False: "off"}.get(r.get("prefetch"), "—")


def markdown(rows: list[dict]) -> str:
    cols = ["workload", "method", "prefetch", "ΔNLL (nats/token)", "top-1 vs full", "fetched/retrieve",
            "DRAM peak MiB: adapter + engine (full cache)", "tok/s", "reads/step", "entries/read",
            "modeled I/O ms/step"]
    lines = []
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
        lines.append(cells)
    return md_table(cols, lines, "l" * len(cols))


def pipelining_markdown(rows: list[dict]) -> str:
    """Without vs with prefetch, per kvtier method measured both ways (empty if none)."""
    cols = ["workload", "method", "prefetch", "tok/s median (runs)", "store ms/step (of which prefetch calls)",
            "waited for loads ms/step",
            "modeled I/O ms/step", "read KiB/step (prefetched)", "reads/step", "prefetch hits / issued"]
    both = {(r["workload"], r["method"]) for r in rows if r.get("prefetch") is True} & \
           {(r["workload"], r["method"]) for r in rows if r.get("prefetch") is False}
    if not both:
        return ""
    lines = []
    for r in rows:
        if (r["workload"], r["method"]) not in both or r["status"] != "ok":
            continue
        runs = ", ".join(f"{x:.1f}" for x in r.get("tokens_per_s_runs", [r["tokens_per_s"]]))
        lines.append([
            r["workload"], r["method"], _pf(r), f"{r['tokens_per_s']:.2f} ({runs})",
            f"{r['store_ms_per_step']:.2f} ({r.get('prefetch_ms_per_step', 0.0):.2f})",
            f"{r.get('io_wait_ms_per_step', 0.0):.2f}", f"{r['modeled_io_ms_per_step']:.2f}",
            f"{r['read_bytes_per_step'] / 1024:.0f} ({r.get('prefetch_read_bytes_per_step', 0) / 1024:.0f})",
            f"{r['read_ops_per_step']:.1f}", f"{r.get('prefetch_hits', 0)} / {r.get('prefetch_issued', 0)}"])
    return md_table(cols, lines, "l" * len(cols))


def estimate_markdown(rows: list[dict]) -> str:
    """Per workload, policy and budget: each estimate setting's ΔNLL, top-1, attention error."""
    cols = ["workload", "policy", "budget", "estimate", "ΔNLL (nats/token)", "top-1 vs full",
            "attn rel. L2 (mean over layers)", "fetched/retrieve", "estimated entries/retrieve",
            "summary bytes/cluster", "summary bytes/entry", "engine DRAM peak / budget MiB"]
    lines = []
    ok = [r for r in rows if r["status"] == "ok" and r["method"] != "full"]
    for r in sorted(ok, key=lambda r: (r["workload"], r["method"], r["budget"], str(r.get("estimate")))):
        err = f"{r['attn_rel_l2']:.4f}" if "attn_rel_l2" in r else "—"
        per_c = f"{r['summary_bytes_per_cluster']}" if "summary_bytes_per_cluster" in r else "—"
        per_e = f"{r['summary_bytes_per_entry']:.1f}" if "summary_bytes_per_entry" in r else "—"
        lines.append([
            r["workload"], r["method"], f"{100 * r['budget']:g}%", r.get("estimate", "off"),
            f"{r['delta_nll']:+.4f} ± {r['delta_nll_se']:.4f}", f"{100 * r['top1']:.1f}%", err,
            f"{r['fetched_per_step']:.1f}", f"{r.get('estimated_per_step', 0.0):.1f}", per_c, per_e,
            f"{_mib(r['engine_dram_peak_bytes'])} / {r['engine_dram_budget'] / 2**20:.0f}"])
    return md_table(cols, lines, "l" * len(cols))


def estimate_targets(rows: list[dict]) -> list[str]:
    """Issue 21's targets where measured: at 10%, adaptive with the estimate has ΔNLL <= none's
    and top-1 >= none's; at 5%, its ΔNLL <= 1/2 of adaptive without."""
    out = []
    ok = [r for r in rows if r["status"] == "ok"]

    def find(w, m, b, e):
        return next((r for r in ok if r["workload"] == w and r["method"] == m and r.get("budget") == b
                     and r.get("estimate") == e), None)

    for w in sorted({r["workload"] for r in ok}):
        for e in sorted({r["estimate"] for r in ok if r["method"] == "adaptive" and r.get("estimate", "off") != "off"}):
            a10, n10 = find(w, "adaptive", 0.1, e), find(w, "none", 0.1, "off")
            if a10 and n10:
                out.append(f"{w}: 10%: ΔNLL(adaptive, estimate {e}) {a10['delta_nll']:+.4f} <= ΔNLL(none) "
                           f"{n10['delta_nll']:+.4f}: {'met' if a10['delta_nll'] <= n10['delta_nll'] else 'NOT met'}; "
                           f"top-1 {100 * a10['top1']:.1f}% >= {100 * n10['top1']:.1f}%: "
                           f"{'met' if a10['top1'] >= n10['top1'] else 'NOT met'}")
            a5, o5 = find(w, "adaptive", 0.05, e), find(w, "adaptive", 0.05, "off")
            if a5 and o5:
                met = a5["delta_nll"] <= 0.5 * o5["delta_nll"]
                out.append(f"{w}: 5%: ΔNLL(adaptive, estimate {e}) {a5['delta_nll']:+.4f} <= 1/2 ΔNLL(adaptive, off) "
                           f"{o5['delta_nll']:+.4f}: {'met' if met else 'NOT met'}")
    return out


def targets(rows: list[dict]) -> list[str]:
    """The issue's acceptance targets, checked where both sides were measured."""
    out = []
    for w in sorted({r["workload"] for r in rows}):
        # quality does not depend on prefetch (checked below): the first row of each method
        by: dict[str, dict] = {}
        for r in rows:
            if r["workload"] == w and r["status"] == "ok":
                by.setdefault(r["method"], r)
        for m in sorted({r["method"] for r in rows if r["workload"] == w and r["status"] == "ok"}):
            pair = [r for r in rows if r["workload"] == w and r["method"] == m and r.get("prefetch") is not None]
            if len({r["prefetch"] for r in pair}) == 2:
                same = len({(r["nll"], r["top1"]) for r in pair}) == 1
                out.append(f"{w}: {m} NLL and top-1 identical with and without prefetch: {'yes' if same else 'NO'}")
        budgets = {r.get("budget") for r in rows if r["workload"] == w and r["method"] not in ("full", "sink+window")}
        if len(budgets) > 1 or any(r.get("estimate", "off") != "off" for r in rows):
            continue  # a budget or estimate sweep: estimate_targets speaks for it
        if "adaptive" in by and "static" in by:
            ok = by["adaptive"]["delta_nll"] <= 0.5 * by["static"]["delta_nll"]
            out.append(f"{w}: ΔNLL(adaptive) <= 1/2 ΔNLL(static): {'met' if ok else 'NOT met'}")
        else:
            out.append(f"{w}: ΔNLL(adaptive) <= 1/2 ΔNLL(static): not measured (needs both adaptive and static)")
        if "adaptive" in by and "none" in by:
            ok = by["adaptive"]["top1"] >= by["none"]["top1"] - 0.03
            out.append(f"{w}: top-1(adaptive) within 0.03 of none: {'met' if ok else 'NOT met'}")
        else:
            out.append(f"{w}: top-1(adaptive) within 0.03 of none: not measured (needs both adaptive and none)")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvtier.bench.torch_quality", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default="W1,W2")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=512, help="tokens after the prefill that are decoded")
    ap.add_argument("--trace-prefill", type=int, default=512,
                    help="prefill of the captured W1/W3 trace the tokens are cut from (reuses the cached capture)")
    ap.add_argument("--trace-decode", type=int, default=2048,
                    help="decoded length of the captured W1/W3 trace the tokens are cut from")
    ap.add_argument("--budget", type=float, default=0.1, help="fetch budget, fraction of the context")
    ap.add_argument("--budgets", help="comma-separated fetch budgets (fractions) to sweep; default: --budget")
    ap.add_argument("--estimate", default="off",
                    help="TieredCache estimate settings to run: comma-separated off, all, var (all, with the "
                         "clusters' key variance), or a cluster count")
    ap.add_argument("--score-temp", type=float, default=0.0,
                    help="the collections' score_temp (0: rank clusters by q . mean; > 0 keeps per-dimension "
                         "variances, which estimate var then uses)")
    ap.add_argument("--attn-error", action="store_true",
                    help="record per layer the relative L2 error of the attention output vs full attention")
    ap.add_argument("--plot", help="PNG of ΔNLL against the budget (with a budget sweep)")
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
    ap.add_argument("--out", default=str(Path("bench") / "results" / "torch_quality.json"))
    ap.add_argument("--md", action="store_true",
                    help="also write the tables, with this command, to a Markdown file beside --out")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--report", metavar="JSON", help="only print the tables of an earlier result file")
    args = show_defaults(ap).parse_args(argv)
    if args.report:
        result = json.loads(Path(args.report).read_text())
        print(markdown(result["rows"]))
        if any(r.get("estimate") for r in result["rows"]):
            print("\n" + estimate_markdown(result["rows"]))
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
    args.budgets = [float(x) for x in args.budgets.split(",")] if args.budgets else [args.budget]
    args.estimates = _parse_estimate(args.estimate)

    import torch
    import transformers

    import kvtier
    from kvtier.bench.capture import load_model

    torch.set_num_threads(args.threads)
    progress: Any = None
    if not args.no_progress:
        from tqdm.auto import tqdm as progress
    model, _ = load_model()
    started = time.perf_counter()
    rows = []
    for w in args.workloads.split(","):
        rows += run_workload(model, w, args, progress)
    result = {
        "benchmark": "torch_quality",
        "params": {k: v for k, v in vars(args).items()
                   if k not in ("out", "no_progress", "report", "prefetch_modes", "estimates", "md")},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "versions": {"kvtier": kvtier.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "model_dtype": str(next(model.parameters()).dtype),
        "seconds": time.perf_counter() - started,
        "rows": rows,
        "targets": targets(rows) + estimate_targets(rows),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    parts = [f"SmolLM2-135M, {args.prefill} prefill + {args.decode} decoded tokens (teacher-forced), "
             f"budget {args.budget:g} of the context, {args.sinks} sinks + {args.window}-token window, "
             f"engine DRAM budget {args.dram_budget}, device {args.device}{' (throttled)' if args.throttle else ''}, "
             f"prefetch {args.prefetch}, {args.threads} torch thread(s), median of {args.repeats} run(s); "
             f"{result['seconds']:.0f} s in all", "", markdown(rows)]
    if len(args.budgets) > 1 or args.estimates != [False]:
        parts += ["", "Estimated zone: per policy, budget and estimate setting", "", estimate_markdown(rows)]
    if args.plot:
        from kvtier.bench.plots import delta_nll_vs_budget

        parts.append("plot: " + str(delta_nll_vs_budget(
            rows, args.plot, f"SmolLM2-135M, {args.prefill} prefill + {args.decode} decoded tokens")))
    pipe = pipelining_markdown(rows)
    if pipe:
        parts += ["", "Pipelining: without vs with prefetch (tok/s: decoding only, median of the runs listed)", "",
                  pipe]
    parts += [f"{r['workload']} {r['method']}: {r['reason']}" for r in rows if r["status"] != "ok"]
    parts += [""] + [f"- {line}" for line in result["targets"]]
    text = "\n".join(parts)
    print("\n" + text)
    if args.md:
        md = out.with_suffix(".md")
        md.write_text(f"# Model quality through TieredCache\n\nCommand: `python -m kvtier.bench.torch_quality "
                      f"{' '.join(argv if argv is not None else sys.argv[1:])}`\n\n{text}\n")
        print(f"written {md}")
    print(f"\nwritten {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
