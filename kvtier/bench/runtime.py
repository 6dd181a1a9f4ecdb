"""What the long-context benchmarks share (``kvtier.bench.tasks``, ``kvtier.bench.decode``): the
models at a dtype, a dense prefill in chunks, and the memory figures they report."""
from __future__ import annotations

import os
from collections.abc import Sequence


def load(model_name: str, dtype: str):
    """(model, tokenizer) of ``kvtier.models``' ``gemma3`` or ``smollm2`` at ``dtype``."""
    import torch

    from kvtier import models

    model, tok = {"gemma3": models.gemma3, "smollm2": models.smollm2}[model_name]()
    return model.to(getattr(torch, dtype)), tok


def rss() -> int:
    """The process's resident set now (bytes)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """The process's peak resident set so far (bytes)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def kv_bytes(cache) -> int:
    """Bytes of the key and value tensors a transformers cache holds (DynamicCache and kin)."""
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if t is not None:
                total += t.numel() * t.element_size()
    return total


def global_kv_f16(model, tokens: int) -> int:
    """The full-attention layers' keys and values at float16 for ``tokens`` tokens."""
    from kvtier.adapters.torch import check_model

    geo = check_model(model)
    n_full = sum(w is None for w in geo["sliding_windows"])
    return n_full * geo["kv_heads"] * geo["head_dim"] * 2 * 2 * tokens


def prefill(model, ids: Sequence[int], chunk: int):
    """A DynamicCache holding ``ids``, prefilled in chunks through the model's body (no LM head)."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    base = body_of(model)
    with torch.inference_mode():
        for s in range(0, len(ids), chunk):
            base(torch.tensor([list(ids[s:s + chunk])]), cache=cache, use_cache=True)
    return cache


def body_of(model):
    """The model without its LM head (a causal LM's ``.model``), else the model itself."""
    base = getattr(model, "model", None)
    return base if base is not None and hasattr(model, "lm_head") else model
