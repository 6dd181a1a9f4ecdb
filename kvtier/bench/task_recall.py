"""Does the cache under test fetch what the answer needs? ``python -m kvtier.bench.task_recall``.

A direct measurement beside ``kvtier bench tasks``' scores: the same cases (one dense
prefill each, the question fed and the answer decoded greedily through each TieredCache), and
at every retrieve of every tiered (full-attention) layer:

- **attention recall**: the share of the step's attention, computed exactly over the prefill's
  keys (the dense cache's, as the model would attend with full attention), that falls on what
  the step attends to (the fetched entries, the sinks and the window), averaged over the GQA
  group's query heads; beside it the **oracle** recall of the same number of entries chosen
  token by token (the best ``budget`` positions by the group's largest weight);
- **answer hit**: the share of the expected answer's tokens (the needle's digits, a chain's
  names) among the fetched entries, at the step that decodes the answer's first token (the
  question's last token) and over the answer's steps.

So a wrong answer can be traced to a layer that did not fetch the needle, and a cache's
clusters compared with token-level selection at the same budget. Results: ``<name>.jsonl``
(one line per case, question and method) and ``<name>.md`` under ``--out``.

    python -m kvtier.bench.task_recall --model gemma3 --task niah_single --length 8192 \\
        --cases 5 --methods none@0.1,static@0.1,adaptive@0.1,adaptive@0.1:8 --out bench/results
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from kvtier.bench import tasks as T
from kvtier.bench.runtime import load, prefill
from kvtier.bench.tables import md_table
from kvtier.benchargs import show_defaults


def answer_positions(context: str, offsets, answers: Sequence[str]) -> list:
    """Token positions of each expected answer's first occurrence in ``context`` (character
    ``offsets`` per token, as a fast tokenizer's offset mapping gives them)."""
    out = []
    for ans in answers:
        c0 = context.find(ans)
        if c0 < 0:
            raise ValueError(f"answer {ans!r} is not in the context")
        c1 = c0 + len(ans)
        out.append([i for i, (s, e) in enumerate(offsets) if e > c0 and s < c1])
    return out


def step_measures(q: np.ndarray, keys: np.ndarray, visible: np.ndarray, stored: slice, n_budget: int,
                  scale: float, targets: Sequence[int]) -> dict:
    """One retrieve: ``q`` the group's queries [g, d], ``keys`` the prefill's keys [n, d],
    ``visible`` a boolean mask of the prefill positions the step attends to, ``stored`` the
    positions in the store, ``n_budget`` its fetch budget, ``targets`` the answer's positions.
    Returns recall, oracle recall and the share of ``targets`` visible."""
    w = q.astype(np.float64) @ keys.astype(np.float64).T * scale
    w = np.exp(w - w.max(1, keepdims=True))
    w /= w.sum(1, keepdims=True)
    region = np.arange(keys.shape[0])[stored]
    best = region[np.argsort(-w[:, region].max(0), kind="stable")[:n_budget]]
    oracle = np.ones(keys.shape[0], bool)
    oracle[region] = False
    oracle[best] = True
    hit = float(np.mean(visible[list(targets)])) if len(targets) else float("nan")
    return {"recall": float(w[:, visible].sum(1).mean()), "oracle": float(w[:, oracle].sum(1).mean()), "hit": hit}


def measure(model, tok, case, method, args, log=print) -> list:
    """Runs every question of ``case`` through ``method``'s TieredCache from one dense prefill;
    returns a row per question with per-layer means (see the module docstring)."""
    enc = tok(case.context, add_special_tokens=True, return_offsets_mapping=True)
    ids, offs = enc.input_ids, enc.offset_mapping
    dense = prefill(model, ids, args.chunk)
    n = len(ids)
    rows = []
    for qi, question in enumerate(case.questions):
        targets: list = [i for pos in answer_positions(case.context, offs, question.answers) for i in pos]
        cache = T.make_cache(model, method, dense, args)
        seen: list = []
        fetch = cache._fetch

        def recording(layer, qg, n_budget, scaling, _fetch=fetch, _cache=cache, _seen=seen):
            got = _fetch(layer, qg, n_budget, scaling)
            counts = got[0][2]
            ids_ = [layer.fetch_out.ids[h, :int(counts[h])].copy() for h in range(len(counts))]
            _seen.append((_cache.layers.index(layer), qg.detach().float().cpu().numpy(), ids_, n_budget, scaling,
                         layer.stored))
            return got

        cache._fetch = recording
        # decode through the path that calls _fetch (the one-call-per-layer path fetches the
        # same entries, tests/test_adapter_torch_step.py, but inside Store.step_layer)
        cache._ring_path = lambda layer, q_len: False
        try:
            res = T.ask(model, tok, cache, question)
            sinks = cache.sinks
            q_steps = len(tok(question.cue, add_special_tokens=False).input_ids)
            per: dict = {}
            step_of: dict = {}
            for (li, qg, got, n_budget, scaling, stored) in seen:
                s = step_of[li] = step_of.get(li, -1) + 1
                keys = dense.layers[li].keys[0].float().numpy()  # [kv_heads, n, d]
                end = min(sinks + stored, n)  # the prefill's positions past the store: the window
                for h in range(keys.shape[0]):
                    vis = np.zeros(n, bool)
                    vis[:sinks] = True
                    vis[end:] = True
                    pos = got[h] + sinks
                    vis[pos[pos < n]] = True
                    m = step_measures(qg[h], keys[h], vis, slice(sinks, end), n_budget, scaling, targets)
                    d = per.setdefault(li, {"recall": [], "oracle": [], "hit_first": [], "hit_answer": []})
                    d["recall"].append(m["recall"])
                    d["oracle"].append(m["oracle"])
                    if s == q_steps - 1:
                        d["hit_first"].append(m["hit"])
                    if s >= q_steps - 1:
                        d["hit_answer"].append(m["hit"])
        finally:
            cache.close()
        row = {"task": case.task, "length": case.length, "case": case.index, "question": qi, "method": method.name,
               "score": res["score"], "answer": res["answer"], "expected": question.answers, "tokens": n,
               "layers": {str(li): {k: float(np.mean(v)) if v else float("nan") for k, v in d.items()}
                          for li, d in sorted(per.items())}}
        rows.append(row)
        log(f"  {case.task} L={case.length} case {case.index} q{qi} {method.name}: score {res['score']:.2f} "
            + " ".join(f"L{li} recall {v['recall']:.3f}/{v['oracle']:.3f} hit {v['hit_first']:.2f}"
                       for li, v in row["layers"].items()))
    return rows


def markdown(rows: Sequence[dict], methods: Sequence[str], command: str) -> str:
    """Per method: mean score, and per tiered layer mean recall, oracle recall and answer hits."""
    layers = sorted({int(li) for r in rows for li in r["layers"]})
    head = ["method", "questions", "score"] + [f"L{li} {k}" for li in layers
                                               for k in ("recall", "oracle", "hit@1st", "hit")]
    body = []
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        if not mine:
            continue
        line = [m, str(len(mine)), f"{np.mean([r['score'] for r in mine]):.3f}"]
        for li in layers:
            for k in ("recall", "oracle", "hit_first", "hit_answer"):
                v = [r["layers"][str(li)][k] for r in mine if str(li) in r["layers"]]
                line.append(f"{np.nanmean(v):.3f}" if v else "—")
        body.append(line)
    cases = sorted({(r["task"], r["length"], r["case"]) for r in rows})
    return (f"# What the tiered layers fetch while the answer is decoded\n\n`{command}`\n\n"
            f"{len(cases)} contexts ({', '.join(sorted({f'{t} {L}' for t, L, _ in cases}))}). Per tiered layer, "
            "means over the questions' retrieves: recall, the share of the step's exact attention over the prefill "
            "that falls on what it attends to (fetched entries, sinks, window); oracle, the same with the budget's "
            "entries chosen token by token; hit@1st, the share of the answer's tokens fetched at the step that "
            "decodes the answer's first token; hit, the same over the answer's steps.\n\n"
            + md_table(head, body, "l" + "r" * (len(head) - 1)) + "\n")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kvtier.bench.task_recall", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma3", choices=sorted(T.MODELS))
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--task", default="niah_single", choices=T.RETRIEVAL)
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--cases", type=int, default=5)
    p.add_argument("--methods", default="none@0.1,static@0.1,adaptive@0.1,adaptive@0.1:8",
                   help="TieredCache methods as kvtier bench tasks names them")
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--dram-share", type=float, default=0.25)
    p.add_argument("--device", default="ufs4.0")
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join("bench", "results"))
    p.add_argument("--name", default=None, help="stem of the result files (default task_recall_<model>)")
    p.add_argument("--summarize", action="store_true", help="only rewrite the table from the rows on disk (no model)")
    return p


def measure_cases(a, methods, path: str, have: set, done: list) -> None:
    """Measures the cases of ``a`` not in ``have`` yet, appending each row to ``path`` and ``done``."""
    model, tok = load(a.model, a.dtype)
    hay = T.Haystack(tok)
    t0 = time.time()
    for i in range(a.cases):
        case = T.make_case(a.task, a.length, i, tok, hay, a.seed)
        for m in methods:
            if all((i, qi, m.name) in have for qi in range(len(case.questions))):
                continue
            for r in measure(model, tok, case, m, a, log=lambda s: print(s, flush=True)):
                with open(path, "a") as f:
                    f.write(json.dumps(r) + "\n")
                done.append(r)
        print(f"[{i + 1}/{a.cases}] case {i} done, {(time.time() - t0) / 60:.1f} min", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    a = show_defaults(_parser()).parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        methods = [T.parse_method(x) for x in a.methods.split(",") if x]
    except ValueError as e:
        raise SystemExit(f"--methods: {e}") from None
    if any(not m.tiered or m.estimate or m.budget == 0 for m in methods):
        raise SystemExit("--methods: TieredCache methods with a fetch budget and no +est expected")
    name = a.name or f"task_recall_{a.model}"
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, f"{name}.jsonl")
    done = []
    if os.path.exists(path):  # resume: rows already measured are kept
        with open(path) as f:
            done = [json.loads(x) for x in f if x.strip()]
    have = {(r["case"], r["question"], r["method"]) for r in done}
    if not a.summarize:
        measure_cases(a, methods, path, have, done)
    mine = [r for r in done if r["task"] == a.task and r["length"] == a.length]
    cmd = "python -m kvtier.bench.task_recall " + " ".join(x for x in argv if x != "--summarize")
    md = markdown(mine, [m.name for m in methods], cmd)
    with open(os.path.join(a.out, f"{name}.md"), "w") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
