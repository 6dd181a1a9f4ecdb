"""``TieredCache``: a transformers ``Cache`` whose past keys and values live in a kvtier store.

How it binds (why it looks the way it does):

1. transformers computes attention in a function looked up by name in ``AttentionInterface``;
   ``Cache.update`` only receives the new keys and values, never the queries. Sparse
   attention needs both, so kvtier registers its own attention function (``"kvtier"``) and
   selects it on the model the cache is built for (``model.set_attn_implementation``, which
   touches that model's config only). ``update`` hands the layer's new states to that
   function through a thread-local slot; the function recognises them by identity, so the
   same model run with any other cache (or none) gets plain SDPA attention.
2. Per layer and KV head, the first ``sinks`` tokens and the last ``window`` tokens stay in
   DRAM as torch tensors; every older token is in a kvtier collection (one per layer x KV
   head, ids in token order: id i is position ``sinks + i``). A forward pass over q new
   tokens attends exactly to: the clusters the GQA group's queries ``retrieve`` under the
   budget, the sinks, the window and the q new tokens (causally among themselves). Then the
   new tokens join the window and what overflows it is ``add``-ed to the store, in one batch
   (a whole prompt at prefill, one entry per step while decoding).
3. The prefill (a first chunk on an empty cache) therefore is ordinary full attention: all
   its keys are in DRAM for the chunk, and only afterwards go to the store.
4. Pipelining (``prefetch=True``, the default): when layer l's attention starts, layer l+1's
   collections are asked to ``prefetch`` with the query groups layer l+1 retrieved with at the
   previous step (the current ones do not exist yet: they come out of layer l's output), so
   the flash reads of the clusters those queries select run on the store's loader threads
   while layer l retrieves, attends and runs its MLP. The last layer prefetches the first
   layer's clusters for the next step, overlapping the LM head and sampling. Consecutive
   steps' queries mostly select the same clusters (``stats()["prefetchable_share"]``); what
   they miss is read by the retrieve as without prefetch, and a prefetched cluster the
   retrieve does not take was read for nothing (it shows in ``read_bytes`` and
   ``modeled_io_seconds``). A retrieve returns exactly what it would without the prefetch.
   The whole run is therefore identical (logits bitwise) with every policy: ``adaptive``
   splits a flagged cluster when a retrieve reads it, from the records read, whether they
   came from a prefetch, the cache or flash, so neither prefetch nor the DRAM budget changes
   which clusters exist.
5. Nothing is kept with autograd history: decoding state is detached.
6. Hybrid models (Gemma 3, or any config whose ``layer_types`` mix ``sliding_attention`` with
   ``full_attention``): only the full-attention layers are tiered. A sliding-window layer is transformers'
   own ``DynamicSlidingWindowLayer``, holding the last ``sliding_window - 1`` tokens in DRAM
   as the model defines it; its states get no handoff, so its attention is SDPA under the
   model's sliding-window mask, exactly as with DynamicCache. Prefetch and virtualization
   step from one tiered layer to the next, skipping the sliding ones. A model whose every
   layer slides has nothing that grows, and is refused.
"""
from __future__ import annotations

import threading
import time
import weakref
from typing import Any

import numpy as np
import torch
import transformers
from transformers import AttentionInterface, PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicSlidingWindowLayer, get_layer_types_and_kwargs
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import kvtier
from kvtier.adapters import _core
from kvtier.adapters.torch import estimate as _estimate
from kvtier.config import DTYPES
from kvtier.errors import InvalidArgumentError
from kvtier.params import (
    DEFAULT_POLICY,
    budget_arg,
    budget_entries,
    estimate_clusters,
    flag,
    one_of,
    options,
    positive_int,
)

#: transformers versions this adapter is written against: [5.0, 6). It relies on 5.x's
#: ``CacheLayerMixin`` layers, ``get_layer_types_and_kwargs`` and the mask interface.
SUPPORTED_TRANSFORMERS = ((5, 0), (6, 0))
#: The name under which the attention and mask functions are registered.
ATTENTION_NAME = "kvtier"
#: Clusters estimated beyond the fetched ones with ``TieredCache(estimate=True)`` (None would
#: be all of them). 4: on SmolLM2-135M (W2, adaptive, bench/results/torch_estimate.md) the
#: next 4 clusters gave the lowest ΔNLL and highest top-1 at 5, 10 and 20% budgets, although
#: estimating all of them gives the lowest attention error; the differences are within a
#: standard error.
DEFAULT_ESTIMATE = 4


def _version_tuple(v: str) -> tuple[int, int]:
    parts = v.split(".")
    return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)


if not SUPPORTED_TRANSFORMERS[0] <= _version_tuple(transformers.__version__) < SUPPORTED_TRANSFORMERS[1]:
    raise ImportError(
        f"kvtier.adapters.torch supports transformers>=5.0,<6; found {transformers.__version__}")

# ----------------------------------------------------------------------------- binding

_HANDOFF = threading.local()  # .slot = (cache, layer_idx, key, value) between update and attention


def _kvtier_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The registered attention: kvtier's sparse attention when ``key`` is what a TieredCache's
    ``update`` just returned, else plain SDPA (the model run with another cache or none)."""
    slot = getattr(_HANDOFF, "slot", None)
    if slot is None or slot[2] is not key:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    _HANDOFF.slot = None
    cache, layer_idx = slot[0], slot[1]
    if getattr(module, "layer_idx", layer_idx) != layer_idx:
        raise RuntimeError(f"attention of layer {module.layer_idx} received the states cached for layer {layer_idx}")
    for name in ("s_aux", "sinks", "position_bias", "sliding_window"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(
                f"TieredCache: this model passes {name!r} to its attention, which kvtier's sparse attention does "
                "not handle")
    if dropout and module.training:
        raise NotImplementedError("TieredCache is for inference: attention dropout in training mode is not supported")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    return cache._attend(layer_idx, query, key, value, attention_mask, scaling), None


def _kvtier_mask(*args, **kwargs):
    """SDPA's mask: exact for the SDPA fallback; the sparse path checks it is plain causal."""
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register(ATTENTION_NAME, _kvtier_attention)
AttentionMaskInterface.register(ATTENTION_NAME, _kvtier_mask)

# model -> [attention implementation before binding, live TieredCaches bound to it]
_BINDINGS: weakref.WeakKeyDictionary[torch.nn.Module, list] = weakref.WeakKeyDictionary()
_BIND_LOCK = threading.Lock()


def _bind(model) -> None:
    with _BIND_LOCK:
        entry = _BINDINGS.get(model)
        if entry is None:
            previous = model.config._attn_implementation
            model.set_attn_implementation(ATTENTION_NAME)
            if model.config._attn_implementation != ATTENTION_NAME:
                raise InvalidArgumentError(
                    f"model: {type(model).__name__} did not accept the attention implementation "
                    f"{ATTENTION_NAME!r} (it does not compute attention through AttentionInterface)")
            _BINDINGS[model] = [previous, 1]
        else:
            entry[1] += 1


def _unbind(model_ref) -> None:
    model = model_ref()
    if model is None:
        return
    with _BIND_LOCK:
        entry = _BINDINGS.get(model)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _BINDINGS[model]
            model.set_attn_implementation(entry[0])


def check_model(model) -> dict:
    """Checks that ``model`` is an architecture TieredCache handles; returns its geometry
    (layers, q_heads, kv_heads, head_dim, layer_types: 'full_attention' or 'sliding_attention'
    per layer, sliding_windows: each layer's window, None for a full layer). Raises
    InvalidArgumentError naming what is not."""
    if not isinstance(model, PreTrainedModel):
        raise InvalidArgumentError(f"model: a transformers PreTrainedModel expected, got {type(model).__name__}")
    cfg = model.config
    name = f"{type(model).__name__} ({getattr(cfg, 'model_type', '?')})"
    if getattr(cfg, "is_encoder_decoder", False):
        raise InvalidArgumentError(
            f"model: {name} is an encoder-decoder model; TieredCache supports decoder-only models")
    text = cfg.get_text_config(decoder=True)
    if text is not cfg:
        raise InvalidArgumentError(
            f"model: {name} is a composite (multimodal) model; TieredCache supports text decoders")
    layer_types, layer_kwargs = get_layer_types_and_kwargs(cfg)
    odd = sorted({t for t in layer_types if t not in ("full_attention", "sliding_attention")})
    if odd:
        kind = ("chunked-attention" if set(odd) <= {"chunked_attention"}
                else "hybrid" if set(odd) & {"linear_attention", "conv", "hybrid", "hybrid_sliding", "mamba"}
                else "non-standard")
        raise InvalidArgumentError(
            f"model: {name} has {kind} layers ({', '.join(odd)}); TieredCache supports full causal attention "
            "layers, mixed with sliding-window layers")
    if "full_attention" not in layer_types:
        raise InvalidArgumentError(
            f"model: {name} has only sliding-window layers (window {getattr(cfg, 'sliding_window', '?')}): "
            "nothing grows past the window, so there is nothing for TieredCache to tier; use DynamicCache")
    windows = {kw.get("sliding_window") for t, kw in zip(layer_types, layer_kwargs, strict=True)
               if t == "sliding_attention"}
    if any(not isinstance(w, int) or w < 1 for w in windows):
        raise InvalidArgumentError(
            f"model: {name} has sliding-window layers without a positive sliding_window ({windows})")
    if getattr(cfg, "attn_logit_softcapping", None) is not None:
        raise InvalidArgumentError(
            f"model: {name} caps its attention logits (attn_logit_softcapping={cfg.attn_logit_softcapping}), "
            "which kvtier's sparse attention does not apply")
    if getattr(cfg, "use_bidirectional_attention", False):
        raise InvalidArgumentError(f"model: {name} uses bidirectional attention; TieredCache supports causal decoders")
    if not getattr(model, "_supports_attention_backend", False):
        raise InvalidArgumentError(
            f"model: {name} does not compute attention through transformers' AttentionInterface")
    n_q = getattr(cfg, "num_attention_heads", None)
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_q
    if not n_q or not n_kv or n_q % n_kv:
        raise InvalidArgumentError(f"model: {name} has {n_q} query heads and {n_kv} KV heads; a whole number of "
                                   "query heads per KV head expected")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_q
    return {"layers": len(layer_types), "q_heads": int(n_q), "kv_heads": int(n_kv), "head_dim": int(head_dim),
            "layer_types": list(layer_types),
            "sliding_windows": [kw.get("sliding_window") if t == "sliding_attention" else None
                                for t, kw in zip(layer_types, layer_kwargs, strict=True)]}


def estimate_dram(model, context: int, budget: int | float = 0.1, policy: str | None = None,
                  sinks: int = 4, window: int = 32, store_dtype: str = "float16", dram_budget=None,
                  collection_options: dict | None = None) -> dict:
    """DRAM a TieredCache for ``model`` holds at ``context`` tokens, before running it.

    Counts both kinds of layer: the sliding-window layers' windows (``sliding_bytes``, as
    transformers keeps them: ``window - 1`` tokens at the model's dtype), the full-attention
    layers' sinks and recent windows (``tiered_dram_bytes``), their sum ``adapter_bytes``,
    and the engine's ``engine_minimum`` / ``engine_recommended`` for the tiered collections
    (:func:`kvtier.estimate`, one collection per full layer and KV head, ``context - sinks -
    window`` entries each, fetching ``budget``, a layer's heads used together and the layers
    in turn, so that the engine pages idle layers out below the recommended budget);
    ``dram_minimum`` / ``dram_recommended`` are
    adapter plus engine. Beside them: ``full_cache_bytes`` what DynamicCache holds at that
    context and ``global_kv_float16_bytes`` the full layers' keys and values at float16."""
    geo = check_model(model)
    context = positive_int("context", context, 1, 1 << 40)
    budget = budget_arg(budget)
    sinks = positive_int("sinks", sinks, 0, 1 << 20)
    window = positive_int("window", window, 0, 1 << 20)
    elem = torch.finfo(model.dtype).bits // 8
    per_token = geo["kv_heads"] * geo["head_dim"] * 2
    wins = geo["sliding_windows"]
    n_tiered = sum(w is None for w in wins)
    sliding_tokens = sum(min(context, w - 1) for w in wins if w is not None)
    stored = max(context - sinks - window, 0)
    fetch = min(1.0, budget_entries(budget, context) / stored) if stored else 0.0
    opts = {k: v for k, v in (collection_options or {}).items() if k not in ("value_sums",)}
    eng = kvtier.estimate(stored, geo["head_dim"], dtype=store_dtype, policy=policy or DEFAULT_POLICY,
                          collections=n_tiered * geo["kv_heads"], groups=max(n_tiered, 1), fetch=fetch,
                          dram_budget=dram_budget, **opts)
    tiered = n_tiered * min(context, sinks + window) * per_token * elem
    sliding = sliding_tokens * per_token * elem
    return {"context": context, "tiered_layers": n_tiered, "sliding_layers": len(wins) - n_tiered,
            "sliding_bytes": sliding, "tiered_dram_bytes": tiered, "adapter_bytes": sliding + tiered,
            "engine_minimum": eng.minimum, "engine_recommended": eng.recommended,
            "dram_minimum": sliding + tiered + eng.minimum, "dram_recommended": sliding + tiered + eng.recommended,
            "full_cache_bytes": (n_tiered * context + sliding_tokens) * per_token * elem,
            "global_kv_float16_bytes": n_tiered * context * per_token * 2, "engine": eng.as_dict()}


# ------------------------------------------------------------------------------ cache


class _TieredLayer(CacheLayerMixin):
    """One layer's DRAM part (sinks, window) and its store collections (one per KV head)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, colls):
        super().__init__()
        self.colls = colls
        self.seen = 0          # tokens this layer has cached
        self.stored = 0        # of which in the store (same count in every KV head)
        # [kv_heads, n, head_dim] each, from lazy_initialization on (is_initialized)
        self.sink_k: Any = None
        self.sink_v: Any = None
        self.win_k: Any = None
        self.win_v: Any = None
        self.prev_clusters: list = [None] * len(colls)
        self.prev_query = None  # [kv_heads, rows, head_dim] float32: the last retrieve's query groups
        self.fetch_out = None   # kvtier.RetrievedMany: the layer's fetch buffers, reused every step
        # the decoding path (TieredCache._attend_ring): sinks and window in one tensor
        # [kv_heads, sinks + window, head_dim] whose window part is a ring; ``ring`` the slot of
        # the oldest window token (the next to leave), None outside that path, where sink_k and
        # win_k are tensors of their own, the window in token order
        self.sw_k = self.sw_v = None
        self.ring: int | None = None

    def lazy_initialization(self, key_states, value_states):
        self.device, self.dtype = key_states.device, key_states.dtype
        empty = key_states.new_empty((key_states.shape[1], 0, key_states.shape[3])).detach()
        self.sink_k = self.sink_v = self.win_k = self.win_v = empty
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):  # pragma: no cover - TieredCache.update is the entry
        raise RuntimeError("TieredCache layers are updated through TieredCache.update")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def resident_bytes(self) -> int:
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.sink_k, self.sink_v, self.win_k, self.win_v))

    def reset(self):
        raise NotImplementedError("TieredCache cannot be reset (stored entries cannot be removed): make a new one")

    def crop(self, tokens_to_remove: int):
        raise NotImplementedError("TieredCache cannot be cropped (assisted/speculative decoding is not supported)")

    def reorder_cache(self, beam_idx):
        raise NotImplementedError("TieredCache holds one sequence: beam search is not supported")

    def batch_repeat_interleave(self, repeats: int):
        raise NotImplementedError("TieredCache holds one sequence: batch expansion is not supported")

    def batch_select_indices(self, indices):
        raise NotImplementedError("TieredCache holds one sequence: batch selection is not supported")


def _clock() -> tuple[float, float]:
    """(wall, this thread's CPU) seconds: a store call's wall time minus its CPU time in the
    calling thread is the time that thread waited (reads, prefetches still loading, a
    descheduled thread on a busy machine)."""
    return time.perf_counter(), time.thread_time()


def _tensor_bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class TieredCache(Cache):
    """A transformers ``Cache`` keeping sinks and a recent window in DRAM and everything
    older in a kvtier store, from which each step fetches only the relevant clusters.

    ``model`` a transformers causal LM (see :func:`check_model` and the module docstring for
    what is supported); constructing the cache binds the model's attention to kvtier's
    (undone by ``close()``). ``budget`` entries fetched per layer, KV head and step: a float
    fraction in [0, 1] of the context (tokens seen so far, rounded up) or an int count; 0
    means sinks + window only (a StreamingLLM-style baseline). ``policy`` how new entries join
    clusters (``adaptive``, ``static``, ``local``, ``none``), passed to the store unchanged;
    None means the store's default (``kvtier.store.DEFAULT_POLICY``, the paper's
    ``adaptive``); a policy the store does not implement is refused, never replaced. ``sinks`` first tokens
    and ``window`` most recent tokens always attended from DRAM. ``dram_budget`` the engine's
    DRAM cap (bytes or "64MiB"; None: kvtier's default). ``device`` the flash device model
    (None, "ufs4.0", ... or a kvtier.DeviceProfile; not a torch device: tensors stay on the
    model's device). ``path`` the store directory (must not hold collections yet); None
    means a temporary store removed by ``close()``. ``prefetch`` (default True) overlaps the
    next layer's flash reads with this layer's compute (module docstring, point 4); False
    reads only when a layer retrieves (for comparison: the same results except that the
    ``adaptive`` policy's splits may take another course). ``store_dtype`` float16 (default, half
    the flash bytes) or float32 (exact values); ``collection_options`` extra arguments of
    ``Store.collection`` (init_cluster_size, max_cluster_size, ...). ``virtualize`` (default
    False) keeps only the layers in use in the engine's DRAM (``Store.park``): a layer's
    collections are parked when its attention is done and brought back in the background
    ahead of use (two layers ahead with prefetch, so that the next layer's prefetch finds
    its representatives; one layer ahead without), so the engine's DRAM is bounded by a few
    layers rather than all of them, at the price of reading each layer's index (and its
    cache working set) back from flash at every step; results are unchanged. ``write_buffer``
    the store's page-aligned write buffer (bytes; None: kvtier's default, a thirty-second of the
    DRAM budget; 0: every appended token is written at once). ``estimate`` (default False)
    also attends to the clusters not fetched, estimated from the sizes, mean keys and value
    sums the store keeps in DRAM (no extra read) and merged with the exact attention by
    log-sum-exp per query head (``kvtier.adapters.torch.estimate``): True estimates
    ``DEFAULT_ESTIMATE`` clusters beyond the fetched ones, an int that many, "all" all of them. It
    changes nothing when the budget fetches everything; the ``none`` policy has no clusters
    and estimates nothing. ``estimate_variance`` (default False) estimates each cluster's mass
    with its keys' variance (``Collection.retrieve``'s ``variance``). ``direct_io`` (default
    "auto") is ``kvtier.open``'s: True/"auto" read flash with O_DIRECT where the file system
    allows it (what a phone's DRAM budget means: no page cache holding the store), False
    through the page cache (a machine with DRAM to spare, or a virtual disk whose latency
    is not the phone's).

    Works with ``model.generate(..., cache=cache)`` and manual ``model(ids, cache=cache,
    use_cache=True)`` loops (``past_key_values=`` is transformers 5's deprecated alias of
    ``cache=``); one sequence (batch size 1), no padding; inference only.
    """

    #: one per model layer: a _TieredLayer (full attention) or transformers'
    #: DynamicSlidingWindowLayer (``tiered`` lists the former)
    layers: list[Any]

    def __init__(self, model, budget: int | float = 0.1, policy: str | None = None,
                 sinks: int = 4, window: int = 32, dram_budget=None, device=None, path=None, *,
                 prefetch: bool = True, store_dtype: str = "float16",
                 collection_options: dict | None = None, virtualize: bool = False, write_buffer=None,
                 estimate: bool | int | str = False, estimate_variance: bool = False,
                 direct_io: bool | str = "auto"):
        geo = check_model(model)
        # the estimated zone (adapters/torch/estimate.py): False off, else the clusters per retrieve
        self.estimate = estimate_clusters(estimate, DEFAULT_ESTIMATE)
        self.estimate_variance = flag("estimate_variance", estimate_variance)
        # not ``self.prefetch``: that is transformers' Cache.prefetch (offloading), kept intact
        self.prefetching = flag("prefetch", prefetch)
        self.virtualize = flag("virtualize", virtualize)
        self.budget = budget_arg(budget)
        self.sinks = positive_int("sinks", sinks, 0, 1 << 20)
        self.window = positive_int("window", window, 0, 1 << 20)
        self._store_dtype = one_of("store_dtype", store_dtype, DTYPES)
        self._collection_options = options("collection_options", collection_options)
        self.n_layers, self.n_kv, self.head_dim = geo["layers"], geo["kv_heads"], geo["head_dim"]
        self._dram_budget = dram_budget
        self.group = geo["q_heads"] // geo["kv_heads"]

        open_kw = {} if dram_budget is None else {"dram_budget": dram_budget}
        if write_buffer is not None:
            open_kw["write_buffer"] = write_buffer
        owner = _core.StoreOwner(path, prefix="kvtier-cache-", arg="path", device=device, direct_io=direct_io,
                                 **open_kw)
        self.store = owner.store
        try:
            if self.store.collections():
                raise InvalidArgumentError(
                    f"path: the store at {path!r} already holds collections; TieredCache needs a new or empty store")
            #: indices of the layers tiered into the store (full attention); the others slide
            self.tiered = [i for i, w in enumerate(geo["sliding_windows"]) if w is None]
            # value sums (the estimate's summaries) only when the estimate is on
            grid = iter(_core.open_grid(self.store, "L{layer}.H{head}", self.tiered, self.n_kv, dim=self.head_dim,
                                        value_dim=self.head_dim, dtype=store_dtype, metric="ip", policy=policy,
                                        value_sums=self.estimate is not False, **self._collection_options))
            # a sliding-window layer keeps its window in DRAM, as the model defines it
            layers: list[Any] = [_TieredLayer(next(grid)) if w is None else DynamicSlidingWindowLayer(sliding_window=w)
                                 for w in geo["sliding_windows"]]
            self.policy = layers[self.tiered[0]].colls[0].policy
            _bind(model)
        except BaseException:
            owner.close()
            raise
        super().__init__(layers=layers)
        self._model_ref = weakref.ref(model)
        owner.on_close(_unbind, self._model_ref)
        self._finalizer = owner.finalize(self)
        self._pending: int | None = None
        self._broken: str | None = None
        self._seen = [0] * self.n_layers  # tokens each layer has been given
        self._resident = 0  # adapter tensors: tiered layers' sinks and windows, sliding layers' windows
        self._peak = 0
        self._counters = _core.Counters(("decode_steps", "forwards", "adds", "overlap", "overlap_of", "prefetches",
                                         "prefetched", "estimated"),
                                        ("retrieve", "add", "prefetch", "step", "other", "engine_cpu", "attend",
                                         "attention"))
        # seconds: wall time in store calls by kind; "engine_cpu" the calling thread's CPU time
        # in them; "attend" wall time in the tiered layers' attention function (store calls,
        # attention arithmetic and the Python around them); "attention" its arithmetic (SDPA)
        self._counts, self._seconds = self._counters.c, self._counters.t
        # the decoding path: the token the last layer's step spilled, added by the next engine
        # call ((collections, keys, values) or None); the attention buffer and its StepOut
        self._pending_add: tuple | None = None
        self._att_kv: tuple | None = None
        self._att_out: kvtier.StepOut | None = None

    # -- context manager / lifetime --------------------------------------------------------
    def __enter__(self) -> TieredCache:
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        """Closes the store (removing it if temporary) and restores the model's attention
        implementation once no other TieredCache is bound to it. Closing twice is fine."""
        self._finalizer()

    def __repr__(self):
        return (f"TieredCache(layers={self.n_layers}, kv_heads={self.n_kv}, budget={self.budget!r}, "
                f"policy={self.policy!r}, sinks={self.sinks}, window={self.window}, "
                f"prefetch={self.prefetching}, tokens={self.get_seq_length()}{', closed' if self.closed else ''})")

    # -- Cache interface -------------------------------------------------------------------
    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        """Records the layer's new states for kvtier's attention function and returns them
        unchanged; the attention function does the retrieval, the attention and the spill."""
        if self.closed:
            raise kvtier.StoreClosedError("TieredCache is closed")
        if self._broken:
            raise RuntimeError(f"TieredCache is unusable after an earlier error ({self._broken}); make a new one")
        if self._pending is not None:
            self._broken = f"layer {self._pending}'s attention did not run through kvtier"
            raise RuntimeError(
                f"TieredCache: the attention of layer {self._pending} did not run through kvtier's attention "
                f"function (model attention implementation is {self._model_attn()!r}, {ATTENTION_NAME!r} expected)")
        b, h, q, d = key_states.shape
        if b != 1:
            raise ValueError(f"TieredCache holds one sequence: batch size 1 expected, got {b}")
        if h != self.n_kv or d != self.head_dim or value_states.shape != key_states.shape:
            raise ValueError(
                f"TieredCache: key/value states of shape ({self.n_kv} KV heads, {self.head_dim} dims) expected, "
                f"got keys {tuple(key_states.shape)}, values {tuple(value_states.shape)}")
        layer = self.layers[layer_idx]
        if layer_idx == 0:
            if self._counts["forwards"]:  # the previous forward ran every layer: a step ended
                t0 = _clock()
                self.store.step()
                self._store_time("other", t0)
            self._counts["forwards"] += 1
            self._counts["decode_steps"] += q == 1
        elif self._seen[layer_idx] != self._seen[0] - q:
            self._broken = "layers out of step"
            raise RuntimeError(
                "TieredCache: layers are out of step (an earlier forward was interrupted); make a new cache")
        self._seen[layer_idx] += q
        if not isinstance(layer, _TieredLayer):
            # a sliding-window layer: transformers' own layer keeps the last window - 1 tokens and
            # returns them with the new ones; the attention function sees no handoff for these
            # states and runs SDPA under the model's sliding-window mask
            before = _tensor_bytes(layer.keys, layer.values) if layer.is_initialized else 0
            keys, values = layer.update(key_states, value_states)
            if layer.keys.untyped_storage().nbytes() > 2 * _tensor_bytes(layer.keys):
                # the kept window is a view of this chunk's states: copy it so that a long prompt's
                # tensor is not held after the attention (DynamicCache keeps it until the next step)
                layer.keys, layer.values = layer.keys.clone(), layer.values.clone()
            after = _tensor_bytes(layer.keys, layer.values)
            self._peak = max(self._peak, self._resident - before + _tensor_bytes(keys, values))
            self._resident += after - before
            return keys, values
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, value_states)
        layer.seen += q
        self._pending = layer_idx
        _HANDOFF.slot = (self, layer_idx, key_states, value_states)
        return key_states, value_states

    def _model_attn(self):
        model = self._model_ref()
        return None if model is None else model.config._attn_implementation

    # -- the sparse attention ------------------------------------------------------------
    def _attend(self, idx: int, query, key, value, mask, scaling: float):
        t0 = time.perf_counter()
        try:
            out = self._attend_unchecked(idx, query, key, value, mask, scaling)
        except BaseException as e:
            self._broken = f"{type(e).__name__} in layer {idx}: {e}"
            raise
        finally:
            self._pending = None
            self._seconds["attend"] += time.perf_counter() - t0
        return out

    def _store_time(self, kind: str, t0: tuple[float, float]) -> None:
        """Adds the wall and calling-thread CPU seconds since ``t0`` (``_clock()``) to ``kind``."""
        wall, cpu = _clock()
        self._seconds[kind] += wall - t0[0]
        self._seconds["engine_cpu"] += cpu - t0[1]

    def _attend_unchecked(self, idx, query, key, value, mask, scaling):
        layer: _TieredLayer = self.layers[idx]
        g, n_kv, d = self.group, self.n_kv, self.head_dim
        q_len = query.shape[2]
        if mask is not None:
            _check_causal(mask, q_len, layer.seen)
        new_k, new_v = key[0].detach(), value[0].detach()  # [kv_heads, q_len, d]
        fetched = est = None
        n_budget = self._entries(layer.seen)
        t = self.tiered.index(idx)  # this layer's place among the tiered ones (sliding layers skipped)
        if self.virtualize:
            ahead = self.layers[self.tiered[(t + (2 if self.prefetching else 1)) % len(self.tiered)]]
            t0 = _clock()
            self.store.unpark(ahead.colls, wait=False)
            self._store_time("other", t0)
        if self._ring_path(layer, q_len):
            out = self._attend_ring(t, layer, query, new_k, new_v, n_budget, scaling)
            if self.virtualize:  # the spill before the park, as below: no add brings a parked layer back
                self._flush_adds()
                t0 = _clock()
                self.store.park(layer.colls)
                self._store_time("other", t0)
            return out
        self._flush_adds()  # the spill an earlier layer left to this one's engine call
        self._leave_ring(layer)
        if self.prefetching:
            # before this layer's own retrieve, so the next tiered layer's reads overlap it too
            if t + 1 < len(self.tiered):  # the next tiered layer is about to see the same tokens
                self._prefetch(self.layers[self.tiered[t + 1]], n_budget)
            else:  # the first tiered layer of the next forward, assumed one decoded token
                self._prefetch(self.layers[self.tiered[0]], self._entries(layer.seen + 1))
        if layer.stored and n_budget:
            # Queries grouped by KV head: [kv_heads, group * q_len, d] (query head h*g+j uses KV head h).
            fetched, est = self._fetch(layer, query[0].reshape(n_kv, g * q_len, d), n_budget, scaling)
        if q_len == 1:
            out, transient = self._attend_step(layer, query, new_k, new_v, fetched, scaling, est)
        else:
            out, transient = self._attend_chunk(layer, query, new_k, new_v, fetched, scaling, est)
        self._peak = max(self._peak, self._resident + transient)
        self._spill(layer, new_k, new_v)
        if self.virtualize:
            t0 = _clock()
            self.store.park(layer.colls)
            self._store_time("other", t0)
        return out.transpose(0, 1).unsqueeze(0)  # [1, q_len, q_heads, d], as transformers' attention returns

    # -- the decoding path: one engine call per layer, attention over one reused buffer ----------
    def _ring_path(self, layer, q_len: int) -> bool:
        """Whether this step of ``layer`` takes ``_attend_ring``: one new token, sinks and window
        full, tensors on the CPU (the engine writes into their memory) in float32 or the store's
        dtype (what it writes)."""
        if q_len != 1 or not self.window or layer.device.type != "cpu":
            return False
        if layer.dtype != torch.float32 and not (layer.dtype == torch.float16 and self._store_dtype == "float16"):
            return False
        return layer.ring is not None or (layer.sink_k.shape[1] == self.sinks and layer.win_k.shape[1] == self.window)

    def _attend_ring(self, t: int, layer, query, new_k, new_v, n_budget: int, scaling: float):
        """One decoding step of a tiered layer with one engine call (``Store.step_layer``): the
        previous tiered layer's spilled token is added, the next one's clusters prefetched and
        this layer's retrieved — the separate calls' order, so the store does exactly what
        they did — the fetched keys and values landing (widened to float32 by the engine)
        in the attention buffer beside a copy of the sinks, the window and the new token: no
        concatenation and no dtype conversion in Python. The window is a ring: the token
        leaving it is replaced in place by the new one and handed to the next engine call.
        The attention sees the same keys as ``_attend_step``, in another order (the logits
        equal to float rounding)."""
        g, n_kv, d, S, W = self.group, self.n_kv, self.head_dim, self.sinks, self.window
        if layer.ring is None:  # sinks and window into one tensor, outside inference mode so that
            with torch.inference_mode(False):  # it can be written in place under no_grad too
                layer.sw_k = torch.cat([layer.sink_k, layer.win_k], dim=1)
                layer.sw_v = torch.cat([layer.sink_v, layer.win_v], dim=1)
            layer.sink_k, layer.win_k = layer.sw_k[:, :S], layer.sw_k[:, S:]
            layer.sink_v, layer.win_v = layer.sw_v[:, :S], layer.sw_v[:, S:]
            layer.ring = 0
        pf = None
        if self.prefetching:  # as _prefetch: the next tiered layer, or the first of the next step
            nxt, nb = ((self.layers[self.tiered[t + 1]], n_budget) if t + 1 < len(self.tiered)
                       else (self.layers[self.tiered[0]], self._entries(layer.seen + 1)))
            if nxt.prev_query is not None and nxt.stored and nb:
                pf = (nxt.colls, nxt.prev_query, nb)
        ret = out = None
        if layer.stored and n_budget:
            qn = np.ascontiguousarray(query[0].reshape(n_kv, g, d).detach().to(torch.float32).numpy())
            layer.prev_query = qn
            ret, out = (layer.colls, qn, n_budget), self._step_buffers(layer, n_budget)
        add, self._pending_add = self._pending_add, None
        est_on = self.estimate is not False and ret is not None
        t0 = _clock()
        out, queued = self.store.step_layer(ret, out, add=add, prefetch=pf,
                                            estimate=self.estimate if est_on else False,
                                            scale=scaling if est_on else None,
                                            variance=self.estimate_variance if est_on else False)
        self._store_time("step", t0)
        c = self._counts
        if pf is not None:
            c["prefetches"] += n_kv
            c["prefetched"] += queued
        if add is not None:
            c["adds"] += n_kv
        A = S + W
        keys, values = self._att_kv if self._att_kv is not None else (None, None)
        if keys is None or ret is None:  # nothing retrieved yet: a buffer of sinks, window and the token
            keys = torch.empty((n_kv, A + 1, d), dtype=layer.dtype)
            values = torch.empty_like(keys)
        width, attn_mask, est = 0, None, None
        if ret is not None:
            counts = self._count_fetched(layer, out)
            width = int(counts.max())
            if int(counts.min()) < width:  # [kv_heads, 1, keys], rows past a head's count masked
                attn_mask = torch.ones((n_kv, 1, A + 1 + width), dtype=torch.bool)
                attn_mask[:, 0, A + 1:] = torch.arange(width)[None, :] < torch.from_numpy(counts)[:, None]
            if est_on:
                c["estimated"] += int(out.est_entries.sum())
                est = torch.from_numpy(out.lse), torch.from_numpy(out.est_values)
        keys[:, :A].copy_(layer.sw_k)
        values[:, :A].copy_(layer.sw_v)
        keys[:, A], values[:, A] = new_k[:, 0], new_v[:, 0]
        keys, values = keys[:, :A + 1 + width], values[:, :A + 1 + width]
        qg = query[0].reshape(n_kv, g, d)
        t1 = time.perf_counter()
        if est is not None:
            o = _estimate.attend(qg, keys, values, scaling, attn_mask, est[0], est[1])
        else:
            o = torch.nn.functional.scaled_dot_product_attention(qg, keys, values, attn_mask=attn_mask, scale=scaling)
        self._seconds["attention"] += time.perf_counter() - t1
        # the working set of one attention call: the buffer (kept between calls) and the mask
        transient = (attn_mask.numel() if attn_mask is not None else 0) + _tensor_bytes(*self._att_kv or ())
        self._peak = max(self._peak, self._resident + transient)
        # the spill: the oldest window token leaves for the store (in the next engine call), the
        # new one takes its slot
        slot = S + layer.ring
        dt = torch.float16 if self._store_dtype == "float16" else torch.float32
        gone_k = layer.sw_k[:, slot:slot + 1].to(dt, copy=True).numpy()  # a copy: the slot is overwritten
        gone_v = layer.sw_v[:, slot:slot + 1].to(dt, copy=True).numpy()
        layer.sw_k[:, slot], layer.sw_v[:, slot] = new_k[:, 0], new_v[:, 0]
        layer.ring = (layer.ring + 1) % W
        layer.stored += 1
        self._pending_add = (layer.colls, gone_k, gone_v)
        if t + 1 == len(self.tiered):
            self._flush_adds()  # the step's last engine call: nothing is left pending between forwards
        return o.reshape(n_kv * g, 1, d).transpose(0, 1).unsqueeze(0)

    def _step_buffers(self, layer, n_budget: int):
        """The attention buffer every tiered layer's decoding step reuses: keys and values
        [kv_heads, sinks + window + 1 + cap, head_dim] (the model's dtype) and the
        ``kvtier.StepOut`` viewing them, into which the engine writes the fetched entries from
        row sinks + window + 1; reallocated with headroom when the budget outgrows cap."""
        out = self._att_out
        kv = self._att_kv
        if out is not None and kv is not None and out.cap >= n_budget and kv[0].dtype == layer.dtype:
            return out
        A, cap = self.sinks + self.window + 1, n_budget + n_budget // 4 + 64
        # zeros: rows past a head's count are masked and must hold finite numbers
        with torch.inference_mode(False):
            k = torch.zeros((self.n_kv, A + cap, self.head_dim), dtype=layer.dtype)
            v = torch.zeros_like(k)
        self._att_kv = (k, v)
        self._att_out = kvtier.StepOut.allocate(self.n_kv, cap, self.head_dim, self.head_dim, keys=k.numpy(),
                                                values=v.numpy(), offset=A)
        return self._att_out

    def _count_fetched(self, layer, out) -> np.ndarray:
        """Counts a retrieve's entries (and those in clusters the head fetched last time);
        returns its per-head counts."""
        c = self._counts
        c["retrieves"] += len(layer.colls)
        counts = out.counts.astype(np.int64)
        for h, m in enumerate(counts.tolist()):
            c["fetched_entries"] += m
            cl = out.clusters[h, :m]
            prev = layer.prev_clusters[h]
            if prev is not None and m:  # entries in clusters this head fetched last time
                c["overlap"] += int(np.isin(cl, prev).sum())
                c["overlap_of"] += m
            layer.prev_clusters[h] = cl.copy()  # the buffer is reused by the next call
        return counts

    def _flush_adds(self) -> None:
        """Adds the token a decoding step's layer left for the next engine call, on its own."""
        if self._pending_add is None:
            return
        add, self._pending_add = self._pending_add, None
        t0 = _clock()
        self.store.step_layer(add=add)
        self._store_time("add", t0)
        self._counts["adds"] += len(add[0])

    def _leave_ring(self, layer) -> None:
        """Back from the decoding path: sinks and window as tensors of their own, the window in
        token order (the oldest first, as ``_spill`` takes it)."""
        if layer.ring is None:
            return
        S = self.sinks
        layer.sink_k, layer.sink_v = layer.sw_k[:, :S].clone(), layer.sw_v[:, :S].clone()
        layer.win_k = torch.roll(layer.sw_k[:, S:], -layer.ring, dims=1)
        layer.win_v = torch.roll(layer.sw_v[:, S:], -layer.ring, dims=1)
        layer.sw_k = layer.sw_v = layer.ring = None

    def _attend_step(self, layer, query, new_k, new_v, fetched, scaling, est=None):
        """One new token: all KV heads in one batched SDPA; the fetched part is padded to the
        longest head and masked. Returns ([q_heads, 1, d], working-set bytes)."""
        g, n_kv, d = self.group, self.n_kv, self.head_dim
        dev, dt = layer.device, layer.dtype
        parts_k, parts_v, valid = [], [], None
        if fetched is not None and fetched[2].max() > 0:
            fk, fv, lens = fetched
            width = int(lens.max())
            # views of the engine's output buffers: no padding copy (rows past a head's count
            # are finite leftovers, masked below); .to() converts to the model dtype
            parts_k.append(torch.from_numpy(fk[:, :width]).to(dev, dt))
            parts_v.append(torch.from_numpy(fv[:, :width]).to(dev, dt))
            if int(lens.min()) < width:
                valid = torch.arange(width, device=dev)[None, :] < torch.from_numpy(lens).to(dev)[:, None]
        keys = torch.cat([*parts_k, layer.sink_k, layer.win_k, new_k], dim=1)
        values = torch.cat([*parts_v, layer.sink_v, layer.win_v, new_v], dim=1)
        attn_mask = None
        if valid is not None:  # [kv_heads, 1, keys], broadcast over the group's queries
            attn_mask = torch.ones((n_kv, 1, keys.shape[1]), dtype=torch.bool, device=dev)
            attn_mask[:, 0, : valid.shape[1]] = valid
        qg = query[0].reshape(n_kv, g, d)
        t0 = time.perf_counter()
        if est is not None:  # [kv_heads, g] and [kv_heads, g, d]: one row per query head
            out = _estimate.attend(qg, keys, values, scaling, attn_mask, est[0], est[1])
        else:
            out = torch.nn.functional.scaled_dot_product_attention(
                qg, keys.to(qg.dtype), values.to(qg.dtype), attn_mask=attn_mask, scale=scaling)
        self._seconds["attention"] += time.perf_counter() - t0
        transient = 2 * keys.numel() * keys.element_size() + (attn_mask.numel() if attn_mask is not None else 0)
        return out.reshape(n_kv * g, 1, d), transient

    def _attend_chunk(self, layer, query, new_k, new_v, fetched, scaling, est=None):
        """Several new tokens (a prefill or a chunk): one SDPA per KV head over its own keys,
        causal among the new tokens; a chunk on an empty cache is plain causal attention
        (no mask materialised, so a long prompt costs no [q, q] mask per head)."""
        g, d = self.group, self.head_dim
        dev, dt = layer.device, layer.dtype
        q_len = query.shape[2]
        outs, transient = [], 0
        for h in range(self.n_kv):
            parts_k, parts_v = [], []
            if fetched is not None and fetched[2][h]:
                m = int(fetched[2][h])
                parts_k.append(torch.from_numpy(fetched[0][h, :m]).to(dev, dt))
                parts_v.append(torch.from_numpy(fetched[1][h, :m]).to(dev, dt))
            keys = torch.cat([*parts_k, layer.sink_k[h], layer.win_k[h], new_k[h]])[None]
            values = torch.cat([*parts_v, layer.sink_v[h], layer.win_v[h], new_v[h]])[None]
            qh = query[0, h * g:(h + 1) * g]  # [g, q_len, d]
            t0 = time.perf_counter()
            past = keys.shape[1] - q_len
            mask_bytes = 0
            if est is not None:  # rows of head h: [g * q_len] -> [g, q_len]
                attn_mask = torch.ones((q_len, keys.shape[1]), dtype=torch.bool, device=dev)
                attn_mask[:, past:] = torch.ones((q_len, q_len), dtype=torch.bool, device=dev).tril()
                o = _estimate.attend(qh, keys, values, scaling, attn_mask,
                                     est[0][h].reshape(g, q_len), est[1][h].reshape(g, q_len, d))
                mask_bytes = attn_mask.numel()
            elif past == 0:
                o = torch.nn.functional.scaled_dot_product_attention(
                    qh, keys.to(qh.dtype), values.to(qh.dtype), is_causal=True, scale=scaling)
            else:
                attn_mask = torch.ones((q_len, keys.shape[1]), dtype=torch.bool, device=dev)
                attn_mask[:, past:] = torch.ones((q_len, q_len), dtype=torch.bool, device=dev).tril()
                o = torch.nn.functional.scaled_dot_product_attention(
                    qh, keys.to(qh.dtype), values.to(qh.dtype), attn_mask=attn_mask, scale=scaling)
                mask_bytes = attn_mask.numel()
            self._seconds["attention"] += time.perf_counter() - t0
            outs.append(o)
            # one head's keys, values and mask are alive at a time
            transient = max(transient, 2 * keys.numel() * keys.element_size() + mask_bytes)
        return torch.cat(outs), transient

    def _entries(self, context: int) -> int:
        return budget_entries(self.budget, context)

    def _prefetch(self, layer, n_budget: int) -> None:
        """Queues on the store's loader threads the clusters ``layer``'s previous query groups
        select under ``n_budget`` (nothing before its first retrieve: after a prefill no layer
        has retrieved yet)."""
        if layer.prev_query is None or not layer.stored or not n_budget:
            return
        t0 = _clock()
        queued = _core.prefetch_layer(self.store, layer.colls, layer.prev_query, n_budget)
        self._store_time("prefetch", t0)
        self._counts["prefetches"] += len(layer.colls)
        self._counts["prefetched"] += queued

    def _fetch(self, layer, qg, n_budget, scaling):
        """One ``retrieve_many`` per layer (one engine call for all KV heads) with each head's
        GQA group's queries ([kv_heads, rows, d]), into the layer's reusable buffers; with
        ``estimate``, one estimating ``retrieve`` per KV head copied into the same buffers.
        Returns ((keys [kv_heads, cap, d], values, counts) numpy arrays, head h's entries
        first; the estimated zone as tensors (lse [kv_heads, rows], values [kv_heads, rows, d])
        with ``estimate``, else None)."""
        qn = np.ascontiguousarray(qg.detach().to(torch.float32).cpu().numpy())
        layer.prev_query = qn  # the next step's prefetch for this layer (a fresh array each call)
        # the rows past a head's count are masked in attention: layer_buffers' zeros keep them
        # finite (a NaN key or value would leak through SDPA)
        c0 = layer.colls[0]
        out = layer.fetch_out = _core.layer_buffers(layer.fetch_out, len(layer.colls), n_budget, c0.dim,
                                                    c0.value_dim, c0.dtype)
        t0 = _clock()
        got = None
        if self.estimate is False:
            out = layer.fetch_out = _core.retrieve_layer(self.store, layer.colls, qn, n_budget, out)
        else:
            got = [coll.retrieve(qn[h], budget=n_budget, estimate=self.estimate, scale=scaling,
                                 variance=self.estimate_variance)
                   for h, coll in enumerate(layer.colls)]
            if max(len(r) for r in got) > out.ids.shape[1]:
                raise AssertionError("a retrieve returned more entries than its budget")
            for h, r in enumerate(got):
                out.keys[h, :len(r)], out.values[h, :len(r)], out.clusters[h, :len(r)] = r.keys, r.values, r.clusters
                out.counts[h] = len(r)
        self._store_time("retrieve", t0)
        counts = self._count_fetched(layer, out)
        est = None
        if got is not None:
            self._counts["estimated"] += sum(r.est_entries for r in got)
            est = (torch.from_numpy(np.stack([r.est_lse for r in got])).to(layer.device),
                   torch.from_numpy(np.stack([r.est_values for r in got])).to(layer.device))
        return (out.keys, out.values, counts), est

    def _spill(self, layer: _TieredLayer, new_k, new_v):
        """New tokens fill the sinks first, then join the window; what overflows the window
        goes to the store in one add per KV head."""
        before = layer.resident_bytes()
        take = min(self.sinks - layer.sink_k.shape[1], new_k.shape[1])
        if take > 0:
            layer.sink_k = torch.cat([layer.sink_k, new_k[:, :take]], dim=1)
            layer.sink_v = torch.cat([layer.sink_v, new_v[:, :take]], dim=1)
            new_k, new_v = new_k[:, take:], new_v[:, take:]
        win_k = torch.cat([layer.win_k, new_k], dim=1)
        win_v = torch.cat([layer.win_v, new_v], dim=1)
        over = win_k.shape[1] - self.window
        if over > 0:
            dt = torch.float16 if layer.colls[0].dtype == np.float16 else torch.float32
            out_k = win_k[:, :over].to(dt).cpu().numpy()
            out_v = win_v[:, :over].to(dt).cpu().numpy()
            # clone: a slice would keep the whole prompt's tensor alive after a prefill
            win_k, win_v = win_k[:, over:].clone(), win_v[:, over:].clone()
            t0 = _clock()
            _core.add_layer(layer.colls, zip(out_k, out_v, strict=True))
            self._store_time("add", t0)
            layer.stored += over
            self._counts["adds"] += len(layer.colls)
        layer.win_k, layer.win_v = win_k, win_v
        self._resident += layer.resident_bytes() - before

    # -- starting from a dense prefill -------------------------------------------------------
    def prefill_from(self, cache) -> None:
        """Fills this empty TieredCache with the state of ``cache``, a transformers
        ``DynamicCache`` built with the same model's config (``DynamicCache(config=...)``)
        after a prefill: each full-attention layer keeps the first ``sinks`` and last
        ``window`` tokens in DRAM and adds the rest to its collections in one batch per KV head,
        exactly as a prefill run through this cache stores them; each sliding-window layer
        copies the window. So one dense prefill (chunked, however long the prompt) can start
        several TieredCaches, each decoding on its own. ``cache`` is not changed."""
        if self.closed:
            raise kvtier.StoreClosedError("TieredCache is closed")
        if self._seen[0] or self._broken:
            raise InvalidArgumentError("cache: prefill_from needs a new, empty TieredCache")
        src = getattr(cache, "layers", None)
        if not isinstance(cache, Cache) or src is None or len(src) != self.n_layers:
            raise InvalidArgumentError(
                f"cache: a DynamicCache of the same model ({self.n_layers} layers) expected, got {type(cache).__name__}"
                + (f" with {len(src)} layers" if src is not None else ""))
        n = None
        for i, (mine, theirs) in enumerate(zip(self.layers, src, strict=True)):
            sliding = not isinstance(mine, _TieredLayer)
            ok = (isinstance(theirs, DynamicSlidingWindowLayer) and theirs.sliding_window == mine.sliding_window
                  if sliding else type(theirs).__name__ == "DynamicLayer")
            if not ok or not theirs.is_initialized:
                raise InvalidArgumentError(
                    f"cache: layer {i} is {type(theirs).__name__}"
                    f"{'' if theirs.is_initialized else ' (empty)'}; a filled "
                    + (f"DynamicSlidingWindowLayer of window {mine.sliding_window}" if sliding else "DynamicLayer")
                    + " expected (DynamicCache(config=model.config) after a prefill)")
            k = theirs.keys
            if k.dim() != 4 or k.shape[0] != 1 or k.shape[1] != self.n_kv or k.shape[3] != self.head_dim:
                raise InvalidArgumentError(
                    f"cache: layer {i} holds keys of shape {tuple(k.shape)}; (1, {self.n_kv}, tokens, "
                    f"{self.head_dim}) expected")
            m = theirs.get_seq_length()
            if n is None:
                n = m
            elif m != n:
                raise InvalidArgumentError(f"cache: layer {i} has seen {m} tokens, layer 0 {n}")
            if not sliding and k.shape[2] != m:
                raise InvalidArgumentError(f"cache: full layer {i} holds {k.shape[2]} of its {m} tokens")
        if not n:
            raise InvalidArgumentError("cache: holds no tokens")
        for mine, theirs in zip(self.layers, src, strict=True):
            k, v = theirs.keys.detach(), theirs.values.detach()
            mine.lazy_initialization(k, v)
            if isinstance(mine, _TieredLayer):
                mine.seen = n
                self._spill(mine, k[0], v[0])
            else:
                mine.keys, mine.values = k.clone(), v.clone()
                mine.cumulative_length = theirs.cumulative_length
                self._resident += _tensor_bytes(mine.keys, mine.values)
        self._seen = [n] * self.n_layers
        self._peak = max(self._peak, self._resident)
        self._counts["forwards"] += 1  # the prefill: the next forward starts a new store step

    def estimate_dram(self, context: int) -> dict:
        """:func:`estimate_dram` for this cache's model and settings at ``context`` tokens."""
        return estimate_dram(self._model_ref(), context, budget=self.budget, policy=self.policy, sinks=self.sinks,
                             window=self.window, store_dtype=self._store_dtype, dram_budget=self._dram_budget,
                             collection_options=self._collection_options)

    # -- unsupported Cache operations ------------------------------------------------------
    # Refused here, before any layer is touched: transformers' Cache runs these layer by layer, so
    # on a hybrid model a sliding layer ahead of the first tiered one would be changed before the
    # tiered layer refuses, and a refused call must leave the cache as it was.
    def reset(self):
        raise NotImplementedError("TieredCache cannot be reset (stored entries cannot be removed): make a new one")

    def crop(self, tokens_to_remove: int):
        self.layers[self.tiered[0]].crop(tokens_to_remove)  # raises, naming what is not supported

    def reorder_cache(self, beam_idx):
        self.layers[self.tiered[0]].reorder_cache(beam_idx)  # raises

    def batch_repeat_interleave(self, repeats: int):
        self.layers[self.tiered[0]].batch_repeat_interleave(repeats)  # raises

    def batch_select_indices(self, indices):
        self.layers[self.tiered[0]].batch_select_indices(indices)  # raises

    # -- introspection ---------------------------------------------------------------------
    def stats(self) -> dict:
        """What the cache did so far.

        ``tokens_seen``; ``tiered_layers`` / ``sliding_layers`` (a hybrid model's full
        attention layers are tiered, its sliding-window layers keep their window in DRAM);
        ``stored_tokens`` / ``resident_tokens`` per tiered (layer, KV head) in the store and in
        DRAM; ``sliding_dram_bytes`` the sliding layers' windows; ``decode_steps`` forwards of
        one token; ``retrieves`` calls (one per layer, KV head and step), ``fetched_entries`` the
        entries they returned and ``fetched_per_retrieve`` their mean (``fetched_per_step``: its
        old name, kept for one release); ``add_calls`` (one per layer and KV head whenever tokens
        leave the window); ``prefetchable_share`` of the fetched entries, those in clusters the
        same layer and head fetched at its previous retrieve (what prefetching the previous
        step's clusters could overlap); ``adapter_dram_bytes`` the sink and window tensors
        (the sliding layers' windows included),
        ``adapter_dram_peak_bytes`` their peak plus the largest per-layer working set (keys,
        values and mask assembled for one attention call); ``engine_dram_bytes`` /
        ``engine_dram_peak_bytes`` the store's; ``dram_bytes`` / ``dram_peak_bytes`` their
        sums (the peak sum is an upper bound: the two peaks need not coincide; it is never below
        ``dram_bytes``);
        ``full_cache_bytes`` what a full cache (DynamicCache) of the model's dtype would hold
        now (sliding layers at their window); ``global_kv_bytes`` / ``global_kv_float16_bytes``
        the full-attention layers' share of it, at the model's dtype and at float16;
        ``retrieve_seconds`` / ``add_seconds`` / ``prefetch_seconds`` wall time in store
        calls (with prefetch, ``retrieve_seconds`` includes waiting for reads still loading),
        ``step_seconds`` in the one call per layer of the decoding path (``Store.step_layer``:
        the previous layer's add, the next layer's prefetch and this layer's retrieve),
        ``other_store_seconds`` in the others (``step``, and ``park``/``unpark`` with
        ``virtualize``), ``engine_cpu_seconds`` the calling thread's CPU time in all of them
        (their wall time minus it is time that thread waited: reads, prefetches still loading,
        or the machine's other work); ``attend_seconds`` wall time in the tiered layers'
        attention function (store calls, the attention arithmetic, and the Python that
        assembles its inputs and spills the window), ``attention_seconds`` its arithmetic
        (the scaled dot-product attention calls);
        ``prefetch`` whether pipelining is on, ``prefetch_calls`` collections asked (one per
        layer, KV head and step), ``prefetch_queued`` clusters they queued; the store's I/O
        figures (``read_ops``, ``read_bytes``, ``mean_read_entries``, ``modeled_io_seconds``,
        ``cache_hits``, ``cache_misses``, ``write_bytes``, ``prefetch_issued``,
        ``prefetch_hits`` (prefetched clusters a retrieve then used), ``prefetch_read_bytes``,
        ``io_wait_seconds`` (time retrieves waited for prefetches still loading),
        ``swap_ins`` / ``swap_demand_ins`` / ``swap_read_bytes`` / ``swap_write_bytes`` (with
        ``virtualize``), ...) and ``store`` its whole stats; ``estimate`` the clusters estimated
        per retrieve (False: off, None: all) and ``estimated_per_retrieve`` the entries they stood for, per retrieve
        (``estimated_per_step``: its old name, kept for one release).
        """
        s = self.store.stats()
        c = self._counts
        first = self.layers[self.tiered[0]]
        seen = self._seen[0]
        elem = first.sink_k.element_size() if first.is_initialized else 4
        per_token = self.n_kv * self.head_dim * 2  # key and value numbers per token and layer
        sliding = [i for i in range(self.n_layers) if i not in self.tiered]
        global_tokens = len(self.tiered) * seen
        # what DynamicCache would hold: every token of a full layer, window - 1 of a sliding one
        dense_tokens = global_tokens + sum(min(seen, self.layers[i].sliding_window - 1) for i in sliding)
        out = {
            "tokens_seen": seen,
            "tiered_layers": len(self.tiered),
            "sliding_layers": len(sliding),
            "stored_tokens": first.stored,
            "resident_tokens": seen - first.stored,
            "sliding_dram_bytes": sum(_tensor_bytes(self.layers[i].keys, self.layers[i].values)
                                      for i in sliding if self.layers[i].is_initialized),
            "decode_steps": c["decode_steps"],
            "forwards": c["forwards"],
            **self._counters.retrieval(),
            "add_calls": c["adds"],
            "estimated_per_retrieve": self._counters.per_retrieve("estimated"),
            "estimate": self.estimate,
            "prefetchable_share": c["overlap"] / c["overlap_of"] if c["overlap_of"] else 0.0,
            "adapter_dram_bytes": self._resident,
            "adapter_dram_peak_bytes": self._peak,
            "engine_dram_bytes": s["dram_bytes"],
            "engine_dram_peak_bytes": s["dram_peak_bytes"],
            "engine_dram_budget": s["dram_budget"],
            "dram_bytes": self._resident + s["dram_bytes"],
            "dram_peak_bytes": self._peak + s["dram_peak_bytes"],
            "full_cache_bytes": dense_tokens * per_token * elem,
            "global_kv_bytes": global_tokens * per_token * elem,
            "global_kv_float16_bytes": global_tokens * per_token * 2,
            "retrieve_seconds": self._seconds["retrieve"],
            "add_seconds": self._seconds["add"],
            "prefetch_seconds": self._seconds["prefetch"],
            "step_seconds": self._seconds["step"],
            "other_store_seconds": self._seconds["other"],
            "engine_cpu_seconds": self._seconds["engine_cpu"],
            "attend_seconds": self._seconds["attend"],
            "attention_seconds": self._seconds["attention"],
            "prefetch": self.prefetching,
            "virtualize": self.virtualize,
            "prefetch_calls": c["prefetches"],
            "prefetch_queued": c["prefetched"],
            "budget": self.budget,
            "policy": self.policy,
            "sinks": self.sinks,
            "window": self.window,
        }
        # the store's main I/O and cache figures beside the adapter's; the engine's DRAM stays
        # under engine_* (dram_bytes and dram_peak_bytes above are the adapter's and the engine's
        # together, so the peak is never below the current value); the store's stats as they are
        # under "store" (older scripts read them there)
        return _core.adapter_stats(
            out, s, keep=("read_ops", "read_bytes", "read_entries", "mean_read_entries", "modeled_io_seconds",
                          "cache_hits", "cache_misses", "evictions", "write_ops", "write_bytes", "device",
                          "prefetch_issued", "prefetch_hits", "prefetch_read_bytes", "prefetch_errors",
                          "io_wait_seconds", "swap_ins", "swap_demand_ins", "swap_read_bytes", "swap_write_bytes"),
            engine=("engine_dram_bytes", "engine_dram_peak_bytes", "engine_dram_budget"), aliases=_core.ALIASES)

    def cluster_stats(self) -> dict:
        """Mean clusters, cluster size and variance over all collections (cluster health)."""
        cs = [c.stats() for i in self.tiered for c in self.layers[i].colls]
        return {"clusters": float(np.mean([c["clusters"] for c in cs])),
                "mean_cluster_size": float(np.mean([c["mean_cluster_size"] for c in cs])),
                "mean_variance": float(np.mean([c["mean_variance"] for c in cs]))}


# ----------------------------------------------------------------------------- checks


def _check_causal(mask, q_len: int, kv_len: int) -> None:
    """The sparse path builds its own causal layout; refuse anything else (padding, custom masks)."""
    if mask.dtype != torch.bool or mask.shape[-2:] != (q_len, kv_len):
        raise NotImplementedError(
            f"TieredCache: an unexpected attention mask (dtype {mask.dtype}, shape {tuple(mask.shape)}) for "
            f"{q_len} queries over {kv_len} keys; padding and custom masks are not supported")
    past = kv_len - q_len
    m = mask.reshape(-1, q_len, kv_len)
    expect = torch.ones((q_len, q_len), dtype=torch.bool, device=mask.device).tril()
    if not (bool(m[:, :, :past].all()) and bool((m[:, :, past:] == expect).all())):
        raise NotImplementedError(
            "TieredCache: the attention mask is not plain causal (padding or a custom mask); "
            "TieredCache supports one unpadded sequence")
