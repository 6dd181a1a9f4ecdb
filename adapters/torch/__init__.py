"""kvtier as the KV cache of transformers decoding.

    from kvtier.adapters.torch import TieredCache
    with TieredCache(model, budget=0.1, sinks=4, window=32, device="ufs4.0") as cache:
        out = model.generate(ids, cache=cache, max_new_tokens=2000)  # or past_key_values=cache
        print(cache.stats())

The model's attention is bound to kvtier's while a TieredCache built for it is open (the same
model run with any other cache, or none, still gets ordinary SDPA attention). Each step, per
layer and KV head, attention is exact over the 4 sink tokens, the 32 most recent tokens, the
current token and the clusters that the group's queries retrieve from the store under the
budget (10% of the context here); tokens leaving the window go to the store. With
``prefetch=True`` (the default) each layer's attention first queues, on the store's loader
threads, the flash reads the next layer's previous-step queries select, so reads overlap compute.

Supported: transformers 5.x (``SUPPORTED_TRANSFORMERS``), decoder-only models of full causal
attention layers over rotary (post-RoPE) keys computed through transformers'
``AttentionInterface`` (Llama, Qwen2/3, Mistral-style, SmolLM2, ...), optionally interleaved with
sliding-window layers (Gemma 3: only the full-attention layers are tiered, the sliding ones
keep their window in DRAM as transformers defines it), one sequence (batch size 1) without
padding. Models with only sliding-window layers (nothing to tier), chunked attention, attention
logit softcapping, hybrid linear-attention or SSM layers, and encoder-decoder models are
refused when the cache is constructed.

``estimate_dram(model, context, ...)`` says before a run what a TieredCache will hold in DRAM
(sliding windows, sinks and windows, the engine's minimum and recommended budget);
``TieredCache.prefill_from(dynamic_cache)`` starts a TieredCache from a dense prefill.
"""
from kvtier.adapters.torch.cache import (
    ATTENTION_NAME,
    SUPPORTED_TRANSFORMERS,
    TieredCache,
    check_model,
    estimate_dram,
)

__all__ = ["TieredCache", "check_model", "estimate_dram", "ATTENTION_NAME", "SUPPORTED_TRANSFORMERS"]
