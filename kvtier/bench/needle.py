"""A task-level check on the real model: a pass key planted early in a long prompt, answered
by greedy decoding (issue 16; docs/design.md §8's "a fact planted early in the prompt").

SmolLM2-135M-Instruct reads the classic pass-key prompt (an instruction, a filler sentence
repeated to the wanted length, the pass key planted at a relative position, then the cue):

    There is an important info hidden inside a lot of irrelevant text. ...
    The grass is green. The sky is blue. ... The pass key is 68291. Remember it. 68291 is the
    pass key. The grass is green. ... What is the pass key? The pass key is

and greedily continues it. A case is solved when the pass key's five digits appear in the
continuation. Why this format (checked with full attention before choosing it): in the chat
template the 135M model answers "The pass key is the pass key is ..." (0 of 6 cases at 1K
tokens), in the plain completion format it solves them (6 of 6); with real text as the haystack
(the Python reference, W2's text, question in the chat template) it recovered the key in 1 of 8
cases at 500 tokens. So the filler is the repeated sentence of the original pass-key test, and
the prompt is plain text.

Every method sees the same tokens. The prompt up to the end of the filler is prefilled in one
forward pass; the cue ("What is the pass key? The pass key is") is then fed one token at a
time, as decoding steps, and ``--answer`` tokens are decoded greedily. So every token that must
find the pass key attends through the cache under test: a TieredCache prefill attends to its own
chunk in full, only decoding steps fetch from the store, and the pass key lies far outside the
recent window. Methods: ``full`` (transformers' DynamicCache), ``sink+window`` (TieredCache with
budget 0: the sparse baseline that cannot see the pass key, showing the cue really needs it)
and TieredCache with the store policies ``none`` (token-level top-k), ``static``, ``local``,
``adaptive`` at the same fetch budget (default 10% of the context), each policy at its default
settings. The store is read through the page cache unless ``--direct-io`` (the same entries are
read either way: the answers do not depend on it). The same cases through llama.cpp (the GGUF of
the same model, kvtier.bench.llama_cpp): ``llama.cpp`` (the whole context), ``tiered-llama``
(TieredLlama at its defaults but ``--budget``) and ``tiered-llama-bounded`` (a bounded prefill
in cells capped at a quarter of the prompt).

    python -m kvtier.bench.needle --lengths 1000,2000,3000,4000 --positions 0.1,0.5 --seeds 3 \\
        --methods full,adaptive --out bench/results

(bench/results/needle.md: 24 cases; about 20 minutes on a shared 2-core machine: a 4K case takes
about 60 s through TieredCache against 17 s through DynamicCache. Lengths up to 8K and the other
methods are supported: ``--lengths 1000,2000,4000,7800 --methods full,sink+window,none,static,adaptive``.)
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from kvtier.bench.policies import save
from kvtier.bench.tables import md_table
from kvtier.benchargs import show_defaults
from kvtier.config import POLICIES

METHODS = ("full", "sink+window", *POLICIES)
# the same cases through llama.cpp (the GGUF the torch model is read from): kvtier.bench.llama_cpp
LLAMA_METHODS = ("llama.cpp", "tiered-llama", "tiered-llama-bounded")
INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about the important information there. ")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
CUE = "What is the pass key? The pass key is"


def make_case(tokenizer, length: int, position: float, seed: int) -> dict:
    """One prompt of about ``length`` tokens: (context ids, cue ids, pass key). The pass key
    (five digits drawn from ``seed``) sits after ``position`` of the filler sentences."""
    key = str(np.random.default_rng(seed).integers(10000, 100000))
    per = len(tokenizer(FILLER, add_special_tokens=False).input_ids)
    n = max(1, (length - len(tokenizer(INSTRUCTION + NEEDLE.format(key=key) + CUE, add_special_tokens=False).input_ids))
            // per)
    k = round(position * n)
    context = (INSTRUCTION + FILLER * k + NEEDLE.format(key=key) + FILLER * (n - k)).rstrip(" ")
    # the space before the cue is part of its first token, as when the whole prompt is tokenized
    ctx = tokenizer(context, add_special_tokens=False).input_ids
    cue = tokenizer(" " + CUE, add_special_tokens=False).input_ids
    return {"length": length, "position": position, "seed": seed, "key": key,
            "context": np.asarray(ctx, np.int64), "cue": np.asarray(cue, np.int64),
            "needle_at": len(tokenizer(INSTRUCTION + FILLER * k, add_special_tokens=False).input_ids)}


def answer(model, cache, context: np.ndarray, cue: np.ndarray, n_answer: int) -> tuple[list[int], float]:
    """Prefill ``context``, feed ``cue`` one token at a time, then greedily decode ``n_answer``
    tokens; returns (the answer's tokens, seconds)."""
    import torch

    t0 = time.perf_counter()
    out = []
    with torch.inference_mode():
        model(torch.from_numpy(context)[None], cache=cache, use_cache=True, logits_to_keep=1)
        for t in cue[:-1]:
            model(torch.tensor([[int(t)]]), cache=cache, use_cache=True, logits_to_keep=1)
        nxt = int(cue[-1])
        for _ in range(n_answer):
            logits = model(torch.tensor([[nxt]]), cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
            nxt = int(logits.argmax())
            out.append(nxt)
    return out, time.perf_counter() - t0


def run(model, tokenizer, cases: list[dict], methods: list[str], args, log=print) -> list[dict]:
    from transformers import DynamicCache

    from kvtier.adapters.torch import TieredCache

    rows = []
    for c in cases:
        row = {k: c[k] for k in ("length", "position", "seed", "key", "needle_at")}
        row["context_tokens"] = int(c["context"].size)
        row["cue_tokens"] = int(c["cue"].size)
        for m in methods:
            if m in LLAMA_METHODS:
                from kvtier.bench import llama_cpp as lb
                llm = lb.needle_llm(m, lb.model_path(), int(c["context"].size + c["cue"].size) + args.answer + 1,
                                    args.budget, threads=args.threads)
                try:
                    ids, secs = lb.needle_answer(llm, c["context"], c["cue"], args.answer)
                finally:
                    llm.close()
                text = tokenizer.decode(ids)
                row[m] = {"answer": text, "solved": c["key"] in text, "seconds": secs}
                log(f"L={c['length']} pos={c['position']} seed={c['seed']} key={c['key']} {m}: {text!r} "
                    f"{'solved' if c['key'] in text else 'missed'} ({secs:.1f} s)")
                continue
            cache: Any
            if m == "full":
                cache = DynamicCache(config=model.config)
            else:
                cache = TieredCache(model, budget=0 if m == "sink+window" else args.budget,
                                    policy=None if m == "sink+window" else m, sinks=args.sinks, window=args.window,
                                    dram_budget=args.dram_budget, device=args.device, direct_io=args.direct_io)
            try:
                ids, secs = answer(model, cache, c["context"], c["cue"], args.answer)
            finally:
                if m != "full":
                    cache.close()
            text = tokenizer.decode(ids)
            row[m] = {"answer": text, "solved": c["key"] in text, "seconds": secs}
            log(f"L={c['length']} pos={c['position']} seed={c['seed']} key={c['key']} {m}: {text!r} "
                f"{'solved' if c['key'] in text else 'missed'} ({secs:.1f} s)")
        rows.append(row)
    return rows


def summary(rows: list[dict], methods: list[str]) -> dict:
    lengths = sorted({r["length"] for r in rows})
    out = {}
    for m in methods:
        out[m] = {"solved": sum(r[m]["solved"] for r in rows), "cases": len(rows),
                  "by_length": {str(L): sum(r[m]["solved"] for r in rows if r["length"] == L) for L in lengths},
                  "seconds": sum(r[m]["seconds"] for r in rows)}
    return out


def markdown(rows: list[dict], methods: list[str], summ: dict, args) -> str:
    lengths = sorted({r["length"] for r in rows})
    per_len = {L: sum(r["length"] == L for r in rows) for L in lengths}
    head = ["method"] + [f"{L} tokens ({per_len[L]})" for L in lengths] + ["all", "seconds"]
    lines = [[m] + [summ[m]["by_length"][str(L)] for L in lengths]
             + [f"{summ[m]['solved']} / {summ[m]['cases']}", f"{summ[m]['seconds']:.0f}"] for m in methods]
    parts = [f"{len(rows)} cases. SmolLM2-135M-Instruct, pass key planted at relative positions {args.positions} "
             f"of the filler, {args.seeds} seed(s) per length and position; cue fed as decoding steps, "
             f"{args.answer} tokens decoded greedily. TieredCache: fetch budget {args.budget:g} of the context, "
             f"{args.sinks} sinks + {args.window}-token window, engine DRAM budget {args.dram_budget}; "
             "each policy at its defaults.",
             "", "Cases solved (the pass key appears in the greedy answer), per prompt length:", "",
             md_table(head, lines, "l" + "r" * (len(head) - 1)), ""]
    if "full" in methods:
        for m in methods:
            if m == "full":
                continue
            lost = sum(r["full"]["solved"] and not r[m]["solved"] for r in rows)
            gained = sum(r[m]["solved"] and not r["full"]["solved"] for r in rows)
            parts.append(f"- {m}: {summ[m]['solved']} solved against full attention's {summ['full']['solved']} "
                         f"({lost} of full's cases missed, {gained} solved that full missed)")
        parts.append("")
    cols = ["length", "position", "seed", "pass key", *methods]
    parts += ["Every case (the answer's first characters; ✓ solved):", "",
              md_table(cols, [[r["context_tokens"] + r["cue_tokens"], r["position"], r["seed"], r["key"]]
                              + [("✓ " if r[m]["solved"] else "✗ ") + repr(r[m]["answer"][:16]) for m in methods]
                              for r in rows], "l" * len(cols))]
    return "\n".join(parts) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvtier.bench.needle", description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="1000,2000,4000,7800", help="prompt lengths in tokens (about)")
    ap.add_argument("--positions", default="0.1,0.25,0.5", help="relative positions of the pass key")
    ap.add_argument("--seeds", type=int, default=2, help="pass keys per length and position")
    ap.add_argument("--methods", default="full,sink+window,none,static,adaptive",
                    help=f"comma-separated subset of {METHODS}")
    ap.add_argument("--budget", type=float, default=0.1, help="fetch budget, fraction of the context")
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--dram-budget", default="16MiB", help="the engine's DRAM budget")
    ap.add_argument("--device", default="ufs4.0", help="flash device model")
    ap.add_argument("--direct-io", action="store_true",
                    help="read and write the store with O_DIRECT (default: through the page cache; the "
                         "answers are the same either way, only the time differs)")
    ap.add_argument("--answer", type=int, default=8, help="tokens decoded greedily after the cue")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--out", default=os.path.join("bench", "results"),
                    help="results directory (default: bench/results)")
    ap.add_argument("--name", default="needle", help="stem of the result files")
    args = show_defaults(ap).parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS + LLAMA_METHODS]
    if bad:
        ap.error(f"--methods: unknown {bad}; choose from {METHODS + LLAMA_METHODS}")
    lengths = [int(x) for x in args.lengths.split(",") if x]
    positions = [float(x) for x in args.positions.split(",") if x]
    if not lengths or min(lengths) < 64 or max(lengths) > 8192 - args.answer - 16:
        ap.error("--lengths: token counts in [64, 8192 - answer - 16] expected (SmolLM2's context is 8192)")
    if not positions or not all(0.0 <= p <= 1.0 for p in positions):
        ap.error("--positions: fractions in [0, 1] expected")
    if args.seeds < 1 or args.answer < 1:
        ap.error("--seeds and --answer: at least 1")

    import torch

    from kvtier.bench.capture import load_model

    torch.set_num_threads(args.threads)
    t0 = time.time()
    if any(m in METHODS for m in methods):
        model, tokenizer = load_model()
    else:   # llama.cpp methods only: the tokenizer is all the cases need from transformers
        from transformers import AutoTokenizer

        from kvtier.bench.capture import model_path
        model, tokenizer = None, AutoTokenizer.from_pretrained(*model_path()[:1], gguf_file=model_path()[1])
    # one round of every length and position per seed: results written after each case cover
    # every length early, should a run be cut short (the files say how many cases were run)
    cases = [make_case(tokenizer, L, p, 1000 + 100 * i + s) for s in range(args.seeds)
             for i, (L, p) in enumerate((L, p) for L in lengths for p in positions)]
    rows = []
    for c in cases:
        rows += run(model, tokenizer, [c], methods, args, log=lambda s: print(s, flush=True))
        summ = summary(rows, methods)
        md = markdown(rows, methods, summ, args)
        save(args.out, args.name, "Pass-key retrieval on SmolLM2-135M (task-level check)", "kvtier.bench.needle", argv,
             args, t0, {"methods": methods, "cases_planned": len(cases), "summary": summ, "cases": rows}, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
