"""TieredLlama: ``llama_cpp.Llama`` whose KV cache holds at most ``dram_tokens`` cells while it
decodes, the whole history in a kvtier store.

llama.cpp has no pluggable KV backend. The adapter works through llama.h and the eval callback
(``cb_eval``), and writes retrieved entries straight into llama.cpp's KV cache tensors:

1. **Cells.** The main sequence holds the first ``sinks`` tokens and the *tail* (the last
   ``window`` tokens, plus up to max(16, prefill_chunk) newer ones) in the cells they were
   decoded into, and ``slots``: cells whose nominal position lies below the tail (so every
   query sees them) and whose K and V, per (layer, KV head), hold whichever stored entry that
   head selected last. K is stored post-RoPE, so a cell's position only feeds the causal mask.
2. **History into kvtier.** Tokens leaving the tail are read from the cache tensors and added,
   per (layer, KV head), to the collection ``<session>.g<n>.L<layer>.H<head>``; their cells
   become slots while the slot count is below its target (each then holds its own token in
   every head) or are freed.
3. **Retrieval inside the graph.** When layer l's queries (``Qcur-l``) are computed and before
   its attention runs, the callback hands them to :meth:`TieredLlama._on_layer`: each KV head's
   GQA group retrieves whole clusters from its collection (``Store.retrieve_many``, one engine
   call per layer), the first ``slots`` eligible entries (or, with ``overfetch``, the best by
   exact score) are kept, and only the slots whose entry left the selection are rewritten
   (``_kvbuf.py``). So every layer of every decoded token attends to entries chosen by its own
   current query, as ``TieredCache`` does in transformers, and a prompt chunk's layer by all of
   the chunk's queries.
4. **Prefill.** ``prefill="dense"``: a prompt on a conversation that has lost nothing yet is
   computed in a context with every cell it needs; the tokens older than the window go to the
   store; at the next eval a ``dram_tokens`` context takes over with sinks, window and empty
   slots, which the first step's retrieval fills. Peak KV DRAM is then the prompt's KV
   (``stats()["prefill_kv_mib_peak"]``). ``prefill="bounded"``: the prompt runs in the
   ``dram_tokens`` cells, ``prefill_chunk`` tokens at a time, each chunk's layers retrieving
   ``prefill_budget`` entries per head (default: all the room the cells leave), which the
   decoding budget then trims.

Visible context while decoding: ``sinks + slots + tail`` with ``slots = min(budget x context,
stored positions below the tail, dram_tokens - sinks - window - max(16, prefill_chunk))``
(``stats()["slots"]``, ``["slots_max"]``); ``budget=0`` is the sink+window (StreamingLLM)
baseline. When the budget covers every stored position the slots hold them in position order
in the cells an unbounded run would use, and greedy decoding is bit-identical to plain
llama.cpp (tested, both prefill modes, across rollbacks).

Choices and what they cost (``python -m kvtier.bench.llama_cpp``; bench/results/llama_cpp_*.md):

- Retrieval at every step and every layer with the current query, not a refresh of the
  visible set every N tokens (W2, 10% budget, dense prefill, llama_cpp_quality_2k.md and
  _8k.md): ΔNLL 0.010 at 1900 + 256 tokens when every step retrieved, 0.30 every 4 steps, 0.41
  every 16 (sink + window alone: 0.65); at 7900 + 128, 0.14, 1.45 and 2.08 (alone: 2.64). Adding
  the queries of the last 8 tokens to each retrieval made it worse (0.089 at 2K). A selection a
  few tokens old misses what the current query needs most (a third of the slots change at each
  step; plausibly, on W2's repeated phrases, the entries after an earlier occurrence of the
  current token, which copying heads read: not measured).
- Window 64: 32 and 128 changed ΔNLL by less than its standard error (2K: 0.004, 0.010,
  -0.002 for 32, 64, 128; 8K: 0.134 and 0.138 for 32 and 64). overfetch 1: 2.0 took top-1 from
  0.88 to 0.91 at 2K for 4x the retrieval time and 5x the store's reads.
- Writing into the cache tensors rather than loading state blobs: a retrieval rewrites only
  the changed (layer, head, cell) rows, 128 bytes each, in place; a blob would copy every cell
  of every layer. The tensors are found by name in the probe decode's graph and checked
  against the state blob; writes happen only while no ggml thread runs (invariants in
  ``_kvbuf.py``). New cells (after a dense prefill, a rollback or a session load) arrive as a
  state blob and are found by a tag.
- Per-layer retrieval costs one Python call per layer and step (``stats()["seconds"]
  ["retrieve"]``); kvtier's DRAM budget should hold one step's fetch over all layers (~ layers x
  heads x slots x 256 bytes), or every step reads it from flash again.
- Where a decoding step's time goes (W2 at 7900 + 112 tokens, 10%, kvtier DRAM 55 MiB, one
  llama.cpp thread; cProfile, thread CPU time, perf and the store's counters per step):
  llama.cpp's own compute 35-45 ms over 1024 cells (plain llama.cpp over the whole context:
  150-180 ms), the 30 per-layer retrievals' Python side ~25 ms, kvtier's CPU ~40 ms, and waits
  for the store's reads (O_DIRECT). The first ~48 steps cost most: the cache is cold after the
  prompt (~780 reads, 6 MiB per step) and each collection is rewritten once for co-location
  after its first 32 retrieves (8 MiB more per step while it runs); past them, ~130-270 reads
  of 8-10 KiB per step.
- The store the adapter opens caches clusters by LRU (``cache_policy="lru"``), not by kvtier's
  cluster-aligned default: that one reads slightly fewer bytes but chooses each victim by
  scanning up to 2048 cached clusters in three passes, and a step at 8K evicts hundreds; its
  victim choice was 30% of the process's perf samples and decoding ran 0.32x llama.cpp against
  LRU's 0.60x (llama_cpp_speed.md). What is retrieved does not depend on the cache.
- Each layer's KV heads read together (``prefetch=True``): before a layer's retrieve, every
  head's reads are queued on the store's loader threads with that head's own queries and budget
  (what the retrieve would read, so nothing changes but when the reads start; with the
  ``adaptive`` policy, when clusters split may). Without it the heads' retrieves ran one after
  another, each waiting for its own reads: at 7900 + 96 tokens past the first 48 steps, ~130-270
  reads per step of 8-10 KiB, a 94% cache hit rate, and still ~175 ms per step waiting on the
  reads (90 round trips of ~2 ms), against ~85 ms of CPU. Read together: ~60 ms of waits, a step
  0.182 s instead of 0.286 s (2K: 0.097 s instead of 0.170 s). Prefetching the *next* layer with
  the previous token's queries (the first design) predicted few reads (3.7K hits for 64K misses):
  a third of each step's selection is new.

Sessions (``save_session`` / ``load_session`` / ``switch_session``): the history already lives
in the session's collections; a record adds the token ids, the id map, the recent queries, the
slots' contents and the resident cells (a state blob, float16 byte planes split for zstd),
written atomically to ``<store>/llama_sessions/<name>.kvs``. A switch moves at most
``dram_tokens`` cells, where llama.cpp's ``llama_state_save_file``/``load_file`` move the whole
context; a record whose cells do not fit the loading instance (saved right after a dense
prefill, or with a wider window) is continued from the store. ``durable=True`` also flushes the
store (fsync of every dirty collection and one catalog commit), which dominates its cost.

Models with sliding-window layers (Gemma 2/3; ``llama_model_n_swa`` > 0): llama.cpp keeps
those layers in a cache of its own (iSWA: two KV caches, the global layers' and the sliding
ones'), which the adapter never touches but to move it between contexts; only the global
layers are tiered (``stats()["tiered_layers"]``; collections ``L<layer>`` of those layers).
The public API reaches the two caches apart: a state blob is the header, the global cache's
state, then the sliding cache's (``_state.py``), and ``LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY``
reads or replaces the sliding part alone; the eval callback shows each layer's own cache tensor
and destination cells, and the probe matches the blob's global layers to them by content. It
does not separate the sequence operations: ``llama_memory_seq_rm`` removes a position from both
caches. So a position leaves the global layers' cells (tail -> store or slot) only once it has
left the sliding window too: the tail is at least ``n_swa`` tokens (``window`` is raised to it;
``stats()["window"]``), and ``dram_tokens`` must hold sinks + ``n_swa`` + the sync room. After a
dense prefill the shrunk context receives the sliding cache's last ``n_swa`` positions with the
sinks and tail, and that window is kept (``stats()["swa_checkpoint_bytes"]``) to put back when
a rollback returns to the prefill's end after llama.cpp reused its cells. Refused on such a
model, with a clear error: a rollback to before the tail and sessions (both need the sliding
layers' older KV, which neither llama.cpp nor the store keeps). ``stats()`` adds the sliding
cache's cells and bytes (``swa_cells``, ``swa_kv_bytes``).

Refused, each with a clear error: recurrent/hybrid (SSM), encoder-decoder and diffusion
models; models without RoPE (ALiBi or absolute positions) or with multi-axis
RoPE; per-layer KV widths (MLA); quantized KV (``type_k``/``type_v``); GPU offload;
``logits_all`` (logprobs); embeddings; LoRA and draft models; ``save_state``/``load_state``
(use sessions). Rolled-back tokens stay in the append-only store, marked dead; when the dead
outnumber the live, the live ones are copied to fresh collections.
"""
from __future__ import annotations

import ctypes
import json
import math
import os
import re
import struct
import time
import weakref
from collections.abc import Sequence
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import Llama
from llama_cpp import _internals as internals
from threadpoolctl import ThreadpoolController

import kvtier
from kvtier.adapters import _core
from kvtier.errors import InvalidArgumentError
from kvtier.params import budget_arg, budget_entries, positive_int

from ._graph import GraphHook
from ._kvbuf import KVBufferError, KVBuffers, cache_rows
from ._state import EMPTY_STATE, KVLayout, StateFormatError, trailing_state, with_header

SEQ_MAIN, SEQ_DUMP, SEQ_LOAD = 0, 1, 2
SESSION_DIR = "llama_sessions"
SESSION_MAGIC = b"KVTLSES1"
SESSION_VERSION = 2
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
#: Tokens gathered past the window before they move to the store (one copy of their cells each
#: time); with the prompt chunk, the room the cells keep beside sinks, slots and window.
SYNC_TOKENS = 16
#: The defaults, chosen for a phone user (why: the class docstring and the module's notes).
DEFAULTS: dict[str, Any] = {"budget": 0.1, "dram_tokens": 1024, "sinks": 4, "window": 64, "prefill": "dense",
                            "refresh_every": 1, "query_tokens": 1, "overfetch": 1.0, "prefetch": True,
                            "cache_policy": "lru"}

# llama kwargs this adapter refuses, with the reason.
_REFUSED = {
    "logits_all": (lambda v: bool(v), "logits for every token (logprobs) are not kept"),
    "embedding": (lambda v: bool(v), "embedding contexts have no KV cache to tier"),
    "draft_model": (lambda v: v is not None, "speculative decoding is not supported"),
    "lora_path": (lambda v: v is not None, "LoRA adapters are not supported (the context is rebuilt)"),
    "vocab_only": (lambda v: bool(v), "a vocab-only model cannot decode"),
    "n_gpu_layers": (lambda v: v not in (0, None),
                     "CPU only: the adapter reads and writes the KV cache in host memory"),
    "type_k": (lambda v: v not in (None, llama_cpp.GGML_TYPE_F16), "the KV cache must stay float16"),
    "type_v": (lambda v: v not in (None, llama_cpp.GGML_TYPE_F16), "the KV cache must stay float16"),
    "n_seq_max": (lambda v: True, "the adapter sets it (it uses parking sequence ids)"),
    "kv_unified": (lambda v: True, "the adapter sets it (parking sequences need a unified cache)"),
    "n_ubatch": (lambda v: True, "the adapter sets it to n_batch (one ubatch per decode)"),
}


class UnsupportedModelError(ValueError):
    """The model's attention or memory is not a plain RoPE KV cache this adapter can tier."""


class SessionError(RuntimeError):
    """A session record is missing, damaged, or does not fit this model or configuration."""


def _zstd():
    try:
        import zstandard
    except ImportError as e:
        raise ImportError(f"sessions are compressed with zstandard (pip install 'kvtier[llama]'): {e}") from e
    return zstandard


def _shuffle16(b: np.ndarray) -> np.ndarray:
    """Byte planes of an even-length byte array read as uint16: all low bytes, then all high.
    float16 K/V compress ~2x better with zstd this way (sign and exponent bytes repeat)."""
    a = b.view(np.uint16)
    out = np.empty(len(b), np.uint8)
    np.bitwise_and(a, 0xFF, out=out[:len(a)], casting="unsafe")
    np.right_shift(a, 8, out=out[len(a):], casting="unsafe")
    return out


def _unshuffle16(b: np.ndarray) -> np.ndarray:
    h = len(b) // 2
    out = np.empty(h, np.uint16)
    out[:] = b[h:]
    out <<= 8
    out |= b[:h]
    return out.view(np.uint8)


class _IdMap:
    """kvtier ids <-> token positions. Every collection of a session receives the same rows in
    the same order, so one map serves all of them. Rolled-back entries stay in the store (it is
    append-only) but are marked dead and never shown again."""

    def __init__(self, n_ctx: int):
        self.pos = np.empty(0, np.int64)
        self.alive = np.empty(0, bool)
        self.n = 0
        self.pos_id = np.full(n_ctx, -1, np.int64)
        self.n_dead = 0

    def append(self, positions: np.ndarray) -> None:
        m = len(positions)
        if self.n + m > len(self.pos):
            cap = max(1024, 2 * (self.n + m))
            self.pos = np.resize(self.pos, cap)
            self.alive = np.resize(self.alive, cap)
        self.pos[self.n:self.n + m] = positions
        self.alive[self.n:self.n + m] = True
        self.pos_id[positions] = np.arange(self.n, self.n + m)
        self.n += m

    def truncate(self, p: int) -> None:
        ids = self.pos_id[p:]
        ids = ids[ids >= 0]
        self.n_dead += int(self.alive[ids].sum())
        self.alive[ids] = False
        self.pos_id[p:] = -1

    def recount(self) -> None:
        """After ``alive`` was set from outside (a session record)."""
        self.n_dead = int(self.n - self.alive[:self.n].sum())

    @property
    def dead(self) -> int:
        return self.n_dead


class _TieredContext(internals.LlamaContext):
    """The llama context with Llama.generate's rollbacks (``kv_cache_seq_rm(-1, p, -1)``) routed
    to the adapter, which also has to forget the rolled-back tokens in kvtier."""

    def __init__(self, owner: TieredLlama, **kw):
        super().__init__(**kw)
        self._owner = weakref.ref(owner)

    def kv_cache_seq_rm(self, seq_id: int, p0: int, p1: int) -> bool:
        owner = self._owner()
        if owner is None or seq_id not in (-1, SEQ_MAIN) or p1 >= 0:
            return super().kv_cache_seq_rm(seq_id, p0, p1)
        owner._truncate(max(p0, 0))
        return True


class TieredLlama(Llama):
    """``llama_cpp.Llama`` with llama.cpp's KV cache bounded to ``dram_tokens`` cells while it
    decodes, and the whole history in a kvtier store.

    ``budget``: entries each KV head sees while decoding besides sinks and window, as a share
    of the context (float) or a count (int); capped by what ``dram_tokens`` leaves
    (``stats()["slots_max"]``). ``dram_tokens``: most cells llama.cpp holds while decoding (its
    context is created with this size, which llama.cpp rounds up to a multiple of 256 when
    allocating). ``policy``: the kvtier collection policy (None: the store's default).
    ``sinks``/``window``: first and last tokens always visible. ``prefill``: ``"dense"`` (a
    prompt on a conversation nothing has left yet is computed with every cell it needs, then
    moved to kvtier; the cells shrink to ``dram_tokens`` for decoding) or ``"bounded"`` (the
    prompt runs in the ``dram_tokens`` cells too, chunk by chunk, each chunk seeing sinks, window
    and ``prefill_budget`` retrieved entries per head). ``prefill_budget``: retrieved entries per
    head during a bounded prefill (share of the context or count; None: all the room the cells
    leave). ``prefill_chunk``: prompt tokens per batch in a bounded prefill (default
    min(n_batch, 64)). ``refresh_every``: decoded tokens between retrievals (each layer retrieves
    when its queries are computed, before its attention). ``query_tokens``: recent tokens whose
    queries join the current ones in each retrieval's query group. ``overfetch``: kvtier is asked
    for overfetch x budget entries per head, of which the best ``budget`` by exact score are shown
    (more recall for more I/O). ``prefetch``: a layer's KV heads queue their reads together on
    the store's loader threads before the layer retrieves (exactly what each head's retrieve
    reads; off: each head reads in turn).
    ``store``: a kvtier store path or an open ``kvtier.Store`` (None: a
    temporary store removed on close); ``store_dram_budget``/``device``/``direct_io``/``cache_policy`` open it
    (a ``kvtier.Store`` passed in keeps its own);
    ``collection_kwargs`` go to ``Store.collection``. ``session``: name of the conversation (its
    collections are ``<session>.g<n>.L<layer>.H<head>``). ``compress_level``: zstd level of
    session records. ``n_ctx`` (in ``llama_kwargs``): the logical context length (0, the default:
    the model's training context). Other ``llama_kwargs`` go to ``llama_cpp.Llama``.

    Defaults, for a phone user (SmolLM2-135M, W2 teacher-forced at 10%,
    bench/results/llama_cpp_quality_2k.md, _8k.md, llama_cpp_speed.md):

    - ``prefill="dense"``: the answer's quality is TieredCache's (ΔNLL 0.010 at 2K, 0.14 at 8K;
      TieredCache with the same policy: -0.016 and 0.12) for a prefill peak of the prompt's KV
      (174 MiB at 7900 tokens for this model), held only while the prompt is computed and
      reported by ``stats()["prefill_kv_mib_peak"]``. Where that peak does not fit, choose
      ``prefill="bounded"`` with ``dram_tokens`` a quarter of the prompt: ΔNLL 0.050 at 2K and
      0.27 at 8K for a quarter of the peak (a tenth: 0.26 and 0.41).
    - ``refresh_every=1``, ``query_tokens=1``: every decoded token retrieves, per layer, with its
      own query; every 4 or 16 tokens gave ΔNLL 1.45 or 2.08 at 8K, close to sink + window alone
      (2.64). It is also what decoding spends its time on: on a shared 2-core x86 machine
      (load average 7-8), kvtier's DRAM at 1.5x one step's fetch, reading this machine's
      virtual disk, 0.53x llama.cpp's tokens/s at 2K and 0.61x at 8K over 112 steps (0.77x and
      0.82x over their second half, past the cold cache and the co-location rewrite), where
      sink + window alone runs 2.2-2.65x (the cells it attends to are fewer).
    - ``cache_policy="lru"``, ``prefetch=True``: what decodes fastest here (module notes; at 8K
      prefetch off: 0.53x, second half 0.63x, in the same interleaved rounds).
    - ``budget=0.1``, ``dram_tokens=1024`` (22.5 MiB of cells for this model: room for 10% of a
      context up to about 8.9K tokens), ``window=64`` (32 and 128 measured the same),
      ``overfetch=1.0`` (2.0: top-1 +0.02 at 2K for 4x the retrieval time), ``sinks=4``.
    """

    # Set up in __init__: the store (_open_store), the KV layout and the cache tensors (the probe
    # decode of _new_context). _kv is None only while a context is replaced or after close().
    _store: kvtier.Store
    _layout: KVLayout
    _kv: KVBuffers

    def __init__(self, model_path: str, budget: int | float = DEFAULTS["budget"],
                 dram_tokens: int = DEFAULTS["dram_tokens"], policy: str | None = None, *,
                 sinks: int = DEFAULTS["sinks"], window: int = DEFAULTS["window"],
                 prefill: str = DEFAULTS["prefill"], prefill_budget: int | float | None = None,
                 prefill_chunk: int | None = None, refresh_every: int = DEFAULTS["refresh_every"],
                 query_tokens: int = DEFAULTS["query_tokens"], overfetch: float = DEFAULTS["overfetch"],
                 prefetch: bool = DEFAULTS["prefetch"],
                 store: str | os.PathLike | kvtier.Store | None = None,
                 store_dram_budget="64MiB", device=None, direct_io: bool | str = "auto",
                 cache_policy: str = DEFAULTS["cache_policy"],
                 session: str = "default", collection_kwargs: dict | None = None, compress_level: int = 1,
                 **llama_kwargs):
        self._owner: _core.StoreOwner | None = None   # what close() closes or removes
        self._contexts: list = []
        self._budget = budget_arg(budget)
        self._dram = positive_int("dram_tokens", dram_tokens, 2, 1 << 24)
        self._S = positive_int("sinks", sinks, 0, 1 << 20)
        self._W = positive_int("window", window, 1, 1 << 20)
        if prefill not in ("dense", "bounded"):
            raise InvalidArgumentError(f"prefill: 'dense' or 'bounded' expected, got {prefill!r}")
        self._prefill = prefill
        self._pf_budget = None if prefill_budget is None else budget_arg(prefill_budget, "prefill_budget")
        self._N = positive_int("refresh_every", refresh_every, 1, 1 << 20)
        self._R = positive_int("query_tokens", query_tokens, 1, 4096)
        if isinstance(overfetch, bool) or not isinstance(overfetch, (int, float)) or not 1.0 <= overfetch <= 64:
            raise InvalidArgumentError(f"overfetch: a number in [1, 64] expected, got {overfetch!r}")
        self._overfetch = float(overfetch)
        self._prefetch = bool(prefetch)
        self._policy = policy
        self._coll_kwargs = dict(collection_kwargs or {})
        self._level = positive_int("compress_level", compress_level, -7, 22)
        if not isinstance(session, str) or not _NAME.fullmatch(session):
            raise InvalidArgumentError(f"session: 1-64 letters, digits, '_' or '-' expected, got {session!r}")
        for k, v in llama_kwargs.items():
            if k in _REFUSED and _REFUSED[k][0](v):
                raise InvalidArgumentError(f"{k}={v!r} is not supported by TieredLlama: {_REFUSED[k][1]}")
        n_ctx = positive_int("n_ctx", llama_kwargs.pop("n_ctx", 0), 0, 1 << 24)
        n_batch = min(positive_int("n_batch", llama_kwargs.pop("n_batch", 512), 1), self._dram)
        if prefill_chunk is None:
            self._C = min(n_batch, 64)
        else:
            self._C = min(positive_int("prefill_chunk", prefill_chunk, 1), n_batch)
        # tokens gathered past the window before they move to the store (and a chunk's room)
        self._room = max(SYNC_TOKENS, self._C)
        self._B_max = self._dram - self._S - self._W - self._room
        if self._B_max < 0:
            raise InvalidArgumentError(
                f"dram_tokens: {self._dram} cannot hold sinks ({self._S}) + window ({self._W}) + "
                f"max({SYNC_TOKENS}, prefill_chunk) ({self._room}); raise it or shrink those")

        super().__init__(model_path, n_ctx=self._dram, n_batch=n_batch, n_ubatch=n_batch, **llama_kwargs)
        try:
            self._check_model()
            self._n_layer = llama_cpp.llama_model_n_layer(self.model)
            self._n_head = llama_cpp.llama_model_n_head(self.model)
            self._n_head_kv = llama_cpp.llama_model_n_head_kv(self.model)
            if self._n_head_kv <= 0 or self._n_head % self._n_head_kv:
                raise UnsupportedModelError(f"{self._n_head} query heads do not group over "
                                            f"{self._n_head_kv} KV heads")
            self._g = self._n_head // self._n_head_kv
            self._hybrid_window()
            # Every layer of a plain RoPE model is tiered; of a model with sliding-window layers,
            # only the others (the probe finds which: _probe).
            self._tiered_layers: list[int] = []
            self._tidx = np.full(self._n_layer, -1, np.int64)   # model layer -> row of _colls
            self._swa_ckpt: tuple[int, np.ndarray] | None = None  # (position, sliding state) to roll back to
            self._hook = GraphHook(self._n_layer, self._n_head, keep=self._R)
            self._hook.on_layer = self._on_layer
            self._rout: dict = {}               # per layer: retrieve_many's buffers, reused
            self._layout = None  # type: ignore[assignment]  # the first probe below sets it
            # The per-head rescoring is many tiny matmuls: handing each to OpenBLAS's thread pool
            # costs milliseconds on a busy machine (and competes with llama.cpp's threads).
            self._blas = ThreadpoolController()
            self._ctx.close()                   # Llama's own context: replaced by ours
            self._new_context(self._dram)
            self._dense = False                 # a dense prefill's context is current
            self._logical_n_ctx = n_ctx or llama_cpp.llama_model_n_ctx_train(self.model)
            self._n_ctx = self._logical_n_ctx
            self.input_ids = np.zeros((self._logical_n_ctx,), dtype=np.intc)
            # _place's stamps: one span of n_ctx + 1 per KV head
            self._mark = np.zeros((self._logical_n_ctx + 1) * self._n_head_kv, np.int64)
            self._stamp = 0
            self._span_off = np.arange(self._n_head_kv, dtype=np.int64)[:, None] * (self._logical_n_ctx + 1)
            self._rows = np.arange(self._n_head_kv)[:, None]
            self._open_store(store, store_dram_budget, device, direct_io, cache_policy)
            self._reset_counters()
            self._start(session)
        except BaseException:
            self.close()
            raise

    # -- setup ------------------------------------------------------------------------------
    def _hybrid_window(self) -> None:
        """A model with sliding-window layers (Gemma 2/3, ...): llama.cpp keeps those layers' KV
        in a cache of its own (iSWA), which the adapter leaves alone; only the other layers are
        tiered. llama.cpp's sequence operations (``llama_memory_seq_rm``) act on both caches at
        once, so a cell may leave the global layers' cells only once its position has left the
        sliding window too: the tail is at least the window (``n_swa``) tokens."""
        self._n_swa = max(0, int(llama_cpp.llama_model_n_swa(self.model)))
        self._hybrid = self._n_swa > 0
        if not self._hybrid or self._n_swa <= self._W:
            return
        self._W = self._n_swa
        self._B_max = self._dram - self._S - self._W - self._room
        if self._B_max < 0:
            raise InvalidArgumentError(
                f"dram_tokens: {self._dram} cannot hold sinks ({self._S}) + the model's sliding window "
                f"({self._n_swa}, the least tail of a model with sliding-window layers) + "
                f"max({SYNC_TOKENS}, prefill_chunk) ({self._room}); raise it")

    def _not_hybrid(self, what: str) -> None:
        if self._hybrid:
            raise UnsupportedModelError(
                f"{what} is not supported for a model with sliding-window layers: llama.cpp keeps their KV "
                f"only for the last {self._n_swa} positions, and the adapter does not store it")

    def _check_model(self):
        m = self.model
        desc = self.metadata.get("general.architecture", "this model")
        checks = [
            (llama_cpp.llama_model_is_recurrent(m), "it is recurrent (its state is not a KV cache)"),
            (llama_cpp.llama_model_is_hybrid(m), "it is hybrid (part of its state is recurrent)"),
            (llama_cpp.llama_model_has_encoder(m), "it is an encoder-decoder model"),
            (llama_cpp.llama_model_is_diffusion(m), "it is a diffusion (non-causal) model"),
            (llama_cpp.llama_model_rope_type(m) == llama_cpp.LLAMA_ROPE_TYPE_NONE,
             "it has no RoPE (ALiBi or absolute positions): only the cells of RoPE models, whose keys "
             "carry their position, can be re-placed"),
            (llama_cpp.llama_model_rope_type(m) not in (llama_cpp.LLAMA_ROPE_TYPE_NONE, llama_cpp.LLAMA_ROPE_TYPE_NORM,
                                                       llama_cpp.LLAMA_ROPE_TYPE_NEOX),
             "it uses multi-axis RoPE (M-RoPE): cells carry 2-D positions"),
        ]
        for bad, why in checks:
            if bad:
                raise UnsupportedModelError(f"model_path: {desc} cannot be tiered by TieredLlama: {why}")

    def _new_context(self, n_cells: int) -> None:
        """Replaces the llama context by a new one of ``n_cells`` cells (parking sequences, the
        graph hook) and finds its KV buffers with a probe decode."""
        self._kv = None  # type: ignore[assignment]  # the old context's tensors: gone
        old = getattr(self, "_ctx", None)
        if old is not None:
            old.close()
            if old in self._contexts:
                self._contexts.remove(old)
        p = type(self.context_params).from_buffer_copy(self.context_params)
        p.n_ctx = n_cells
        p.n_seq_max = 3
        p.kv_unified = True
        p.n_batch = p.n_ubatch = self.n_batch
        p.cb_eval = self._hook.callback
        p.cb_eval_user_data = None
        p.swa_full = False   # the sliding layers' cache holds their window, not every cell
        self._ctx = _TieredContext(self, model=self._model, params=p, verbose=self.verbose)
        self._contexts.append(self._ctx)
        self._mem = llama_cpp.llama_get_memory(self.ctx)
        self._probe()

    def _probe(self) -> None:
        """Decodes one token in a parking sequence: checks that every layer's queries are seen,
        reads the state blob's layout and finds the KV cache tensors; fails at construction
        rather than mid-chat."""
        hook = self._hook
        ring = hook.recent()
        tok = self.token_bos()
        self._batch.set_batch(batch=[tok if tok >= 0 else 0], n_past=0, logits_all=False)
        self._batch.batch.seq_id[0][0] = SEQ_DUMP
        hook.seen[:] = False
        hook.on_layer, hook.discover, hook.error = None, True, None
        hook.k_tensors.clear()
        hook.v_tensors.clear()
        hook.begin()
        try:
            self._ctx.decode(self._batch)
        finally:
            hook.discover = False
            hook.on_layer = self._on_layer
        if hook.error or not hook.seen.all():
            missing = np.flatnonzero(~hook.seen).tolist()
            raise UnsupportedModelError(
                f"model_path: the eval callback did not deliver post-RoPE queries (Qcur-<layer>) "
                f"for layers {missing[:8]}{'...' if len(missing) > 8 else ''}: "
                f"{hook.error or 'not found in the graph'}")
        blob = self._seq_blob(SEQ_DUMP)
        try:
            if self._hybrid:   # the global layers' part: the sliding layers' stays with llama.cpp
                blob, _ = trailing_state(blob)
            layout = KVLayout.from_probe(blob, None if self._hybrid else self._n_layer, self._n_head_kv)
        except StateFormatError as e:
            raise UnsupportedModelError(f"model_path: unsupported KV cache layout: {e}") from None
        assert hook.q is not None  # every layer's queries were seen
        if layout.head_dim != hook.q.shape[3]:
            raise UnsupportedModelError(f"model_path: key head size {layout.head_dim} differs from query head "
                                        f"size {hook.q.shape[3]}")
        if self._layout is not None and layout != self._layout:
            raise RuntimeError(f"internal: a new context has KV layout {layout}, the first had {self._layout}")
        self._layout = layout
        try:
            _, k, v = layout.parse(blob)
            tiered = self._find_tiered(layout, k)
            if self._tiered_layers and tiered != self._tiered_layers:
                raise RuntimeError(f"internal: a new context tiers layers {tiered}, the first {self._tiered_layers}")
            self._tiered_layers = tiered
            self._tidx[:] = -1
            self._tidx[tiered] = np.arange(len(tiered))
            hook.read_cells_of(tiered[0])
            hook.cells = hook.layer_cells.get(tiered[0])
            kv = KVBuffers(layout, {j: hook.k_tensors[il] for j, il in enumerate(tiered)},
                           {j: hook.v_tensors[il] for j, il in enumerate(tiered) if il in hook.v_tensors})
            if hook.cells is None or len(hook.cells) != 1:
                raise KVBufferError("the graph showed no destination cell for the probe token")
            k2, v2 = kv.read(hook.cells)
            if not (np.array_equal(k, k2) and np.array_equal(v, v2)):
                raise KVBufferError("the cache tensors found in the graph do not hold what the state blob holds")
        except KVBufferError as e:
            raise UnsupportedModelError(f"model_path: the KV cache cannot be addressed directly: {e}") from None
        self._kv = kv
        llama_cpp.llama_memory_clear(self._mem, True)
        hook.reset(ring)            # the probe token's queries are not the conversation's

    def _find_tiered(self, layout: KVLayout, k: np.ndarray) -> list[int]:
        """The model layers whose K the probe blob holds, in its order: every layer, or (a model
        with sliding-window layers) the cache tensors whose probe row equals the blob's."""
        hook = self._hook
        if not self._hybrid:
            if sorted(hook.k_tensors) != list(range(self._n_layer)):
                raise KVBufferError(f"the graph showed K cache tensors for layers {sorted(hook.k_tensors)[:8]}")
            return list(range(self._n_layer))
        out = []
        for j in range(layout.n_layer):
            want = k[j].reshape(-1)
            hits = [il for il, t in sorted(hook.k_tensors.items()) if il in hook.layer_cells
                    and np.array_equal(cache_rows(t, il, hook.layer_cells[il], layout.row).reshape(-1), want)]
            if len(hits) != 1:
                raise KVBufferError(f"layer {j} of the global cache matches the K cache tensors of layers {hits}")
            out += hits
        if out != sorted(set(out)) or not out:
            raise KVBufferError(f"the global cache's layers {out} are not in model order")
        return out

    def _open_store(self, store, dram_budget, device, direct_io, cache_policy):
        self._owner = _core.StoreOwner(store, prefix="kvtier-llama-", dram_budget=dram_budget, device=device,
                                       direct_io=direct_io, cache_policy=cache_policy)
        self._store = self._owner.store

    def _reset_counters(self):
        self._counters = _core.Counters(
            ("decode_steps", "prefill_chunks", "retrievals", "slot_writes", "visible_slots", "syncs",
             "dense_prefills", "rebuilds", "compactions", "session_saves", "session_loads"),
            ("decode", "retrieve", "sync", "dense_prefill", "load", "session_save", "session_load"))
        self._c, self._t = self._counters.c, self._counters.t
        self._peak = {"prefill_cells": 0, "prefill_allocated": 0, "decode_cells": 0, "decode_allocated": 0}
        self._n_peak = 0

    # -- conversation state -----------------------------------------------------------------
    def _start(self, session: str, gen: int | None = None):
        """An empty conversation in fresh collections ``<session>.g<gen>.*``."""
        self._leave_dense()
        llama_cpp.llama_memory_clear(self._mem, True)
        self._session = session
        self._gen = self._next_gen(session) if gen is None else gen
        self._set_colls(self._collections(session, self._gen))
        self._ids = _IdMap(self._logical_n_ctx)
        self.n_tokens = 0
        self._requires_eval = True
        self._n = 0                 # positions the adapter holds (llama.cpp + store)
        self._synced = 0            # positions [0, synced) are in the store
        self._tail_lo = self._S     # positions [tail_lo, n) and [0, sinks) sit in cells of their own
        self._cell_of = np.full(self._logical_n_ctx, -1, np.int64)    # their cell indices
        self._set_slots(np.empty(0, np.int64), np.empty(0, np.int64),
                        np.empty((len(self._tiered_layers), self._n_head_kv, 0), np.int64))
        self._cells = 0             # cells llama.cpp holds in the main sequence (checked against it)
        self._stale = False         # resident cells no longer match the positions (deep rollback)
        self._since_retrieval = 0   # decoded tokens since the slots were last retrieved
        self._hook.reset()

    def _leave_dense(self) -> None:
        """Drops a dense prefill's context for one of ``dram_tokens`` cells (its content is being
        replaced anyway)."""
        if getattr(self, "_dense", False):
            self._new_context(self._dram)
            self._dense = False

    def _set_slots(self, cells: np.ndarray, nominal: np.ndarray, content: np.ndarray) -> None:
        """Slot cells: cell index, nominal position (distinct, in [sinks, tail_lo): always visible)
        and, per (layer, KV head), the position whose K and V the cell holds (-1: not yet written)."""
        self._slot_cell, self._slot_nom, self._slot_pos = cells, nominal, content
        self._invalid = bool((content < 0).any())

    @property
    def _nslot(self) -> int:
        return len(self._slot_cell)

    def _next_gen(self, session: str) -> int:
        pat = re.compile(re.escape(session) + r"\.g(\d+)\.L0\.H0")
        gens = [int(m.group(1)) for n in self._store.collections() if (m := pat.fullmatch(n))]
        return max(gens) + 1 if gens else 0

    def _set_colls(self, colls: list) -> None:
        self._colls = colls

    def _collections(self, session: str, gen: int) -> list:
        d = self._layout.head_dim
        return _core.open_grid(self._store, f"{session}.g{gen}.L{{layer}}.H{{head}}", self._tiered_layers,
                               self._n_head_kv, dim=d, value_dim=d, dtype="float16", metric="ip",
                               policy=self._policy, **self._coll_kwargs)

    # -- llama.cpp state helpers ------------------------------------------------------------
    def _seq_blob(self, seq: int) -> np.ndarray:
        size = llama_cpp.llama_state_seq_get_size(self.ctx, seq)
        buf = np.empty(size, np.uint8)
        got = llama_cpp.llama_state_seq_get_data(self.ctx, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)),
                                                 size, seq)
        if got != size:
            raise RuntimeError(f"llama_state_seq_get_data copied {got} of {size} bytes")
        return buf

    def _set_blob(self, blob: np.ndarray, seq: int) -> None:
        got = llama_cpp.llama_state_seq_set_data(self.ctx, blob.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)),
                                                 len(blob), seq)
        if got == 0:
            raise RuntimeError(f"llama_state_seq_set_data refused a blob of {len(blob)} bytes "
                               f"(not enough free cells in the context?)")

    def _load_cells(self, pos: np.ndarray, k: np.ndarray, v: np.ndarray, swa: np.ndarray | None = None) -> np.ndarray:
        """Adds cells (pos[i], k[:, i], v[:, i]) to the main sequence; returns their cell indices.
        Loaded through a state blob into a parking sequence (whose cells llama.cpp picks), then
        moved to the main one; the cells are found by a tag in layer 0's keys (``_kvbuf.py``).
        A model with sliding-window layers: ``swa`` (a state of their cache, :meth:`_swa_state`)
        comes along into that cache; None adds nothing there."""
        if not len(pos):
            return np.empty(0, np.int64)
        k = k.copy()
        real0 = self._kv.tag(k)
        blob = self._layout.build(pos.astype(np.int32), k, v, SEQ_LOAD)
        if self._hybrid:
            blob = np.concatenate([blob, EMPTY_STATE if swa is None else swa])
        self._set_blob(blob, SEQ_LOAD)
        llama_cpp.llama_memory_seq_cp(self._mem, SEQ_LOAD, SEQ_MAIN, -1, -1)
        llama_cpp.llama_memory_seq_rm(self._mem, SEQ_LOAD, -1, -1)
        return self._kv.locate(real0)

    def _cells_now(self) -> int:
        size = llama_cpp.llama_state_seq_get_size(self.ctx, SEQ_MAIN)
        if self._hybrid:   # the global part alone: the sliding part's size comes apart
            size -= llama_cpp.llama_state_seq_get_size_ext(self.ctx, SEQ_MAIN,
                                                            llama_cpp.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY) - 8
        return self._layout.cells_from_size(size)

    def _swa_state(self, seq: int) -> np.ndarray:
        """The sliding layers' cache state of ``seq`` (without the blob header)."""
        flag = llama_cpp.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY
        size = llama_cpp.llama_state_seq_get_size_ext(self.ctx, seq, flag)
        buf = np.empty(size, np.uint8)
        got = llama_cpp.llama_state_seq_get_data_ext(self.ctx, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)),
                                                     size, seq, flag)
        if got != size:
            raise RuntimeError(f"llama_state_seq_get_data_ext copied {got} of {size} bytes")
        return buf[8:]

    def _swa_cell_bytes(self) -> int:
        """Bytes of one position in the sliding layers' cache (float16 K and V of each)."""
        return (self._n_layer - len(self._tiered_layers)) * self._layout.row * 2 * 2 if self._hybrid else 0

    def _swa_cells(self) -> int:
        """Cells of the main sequence in the sliding layers' cache (0 for other models)."""
        if not self._hybrid:
            return 0
        lo = llama_cpp.llama_memory_seq_pos_min(self._mem, SEQ_MAIN)
        return 0 if lo < 0 else llama_cpp.llama_memory_seq_pos_max(self._mem, SEQ_MAIN) - lo + 1

    def _observe_cells(self, prefill: bool) -> None:
        now = self._cells_now()
        if now != self._cells:
            raise RuntimeError(f"internal: llama.cpp holds {now} cells, the adapter expected {self._cells}")
        what = "prefill" if prefill else "decode"
        self._peak[what + "_cells"] = max(self._peak[what + "_cells"], now)
        self._peak[what + "_allocated"] = max(self._peak[what + "_allocated"], llama_cpp.llama_n_ctx(self.ctx))
        self._n_peak = max(self._n_peak, self._n)

    def _store_rows(self, pos: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
        if not len(pos):
            return
        first = self._ids.n
        for layer, row in enumerate(self._colls):    # k, v [L, m, H, D]: a layer's heads first
            _core.add_layer(row, zip(k[layer].swapaxes(0, 1), v[layer].swapaxes(0, 1), strict=True), first)
        self._ids.append(pos)

    # -- eval -------------------------------------------------------------------------------
    def n_ctx(self) -> int:
        """The logical context length (llama.cpp's own context is ``dram_tokens`` cells)."""
        return getattr(self, "_logical_n_ctx", None) or super().n_ctx()

    def eval(self, tokens: Sequence[int]):
        """Decodes ``tokens`` after the first ``n_tokens``; same contract as ``Llama.eval``. A
        prompt (more than one token) runs densely or in bounded chunks (``prefill``); single
        tokens retrieve every ``refresh_every`` steps."""
        tokens = list(tokens)
        self._truncate(self.n_tokens)
        m = len(tokens)
        if not m:
            return
        if self.n_tokens + m > self._logical_n_ctx:
            raise ValueError(f"the context window of {self._logical_n_ctx} tokens is full "
                             f"({self.n_tokens} + {m} tokens)")
        prefill = m > 1
        if (prefill and self._prefill == "dense" and not self._dense and self._tail_lo == self._S
                and not self._nslot and self._n + m > self._S + self._W + self._room):
            # nothing has left the cells yet: the prompt is computed with every cell it needs
            self._dense_prefill(tokens)
            self._requires_eval = False
            return
        if self._dense:
            self._shrink()
        if self._stale:
            self._rebuild()
        i = 0
        while i < m:
            c = min(m - i, self._C)
            self._decode(tokens[i:i + c], prefill)
            i += c
        self._requires_eval = False

    def _slot_target(self, n: int, prefill: bool) -> int:
        """Slots each KV head gets: the budget, within the stored middle and the cells' room."""
        if prefill:
            want = self._B_max if self._pf_budget is None else budget_entries(self._pf_budget, n)
        else:
            want = budget_entries(self._budget, n)
        return max(0, min(want, self._tail_lo - self._S, self._B_max))

    def _decode(self, batch: list, prefill: bool) -> None:
        """One ubatch in the main context: the tail moves to the store if the batch would not fit,
        the slot count follows the budget, each layer retrieves (when due) from its queries."""
        n, c = self._n, len(batch)
        if n - self._tail_lo + c > self._W + self._room and n - self._W > self._tail_lo:
            self._sync(n - self._W, prefill)
        target = self._slot_target(n, prefill)
        if self._nslot > target:
            self._drop_slots(self._nslot - target)
        middle = self._tail_lo - self._S
        due = prefill or self._invalid or self._since_retrieval + 1 >= self._N
        retrieving = bool(self._nslot) and due and (self._nslot < middle or self._invalid)
        self._retrieving = retrieving
        if retrieving:
            self._c["retrievals"] += 1
            self._c["visible_slots"] += self._nslot
        self._batch.set_batch(batch=batch, n_past=n, logits_all=False)
        hook = self._hook
        hook.begin()
        hook.error = None
        t0 = time.perf_counter()
        try:
            with self._blas.limit(limits=1, user_api="blas"):
                self._ctx.decode(self._batch)
        finally:
            self._retrieving = False
        self._t["decode"] += time.perf_counter() - t0
        if hook.error:
            raise RuntimeError(f"the graph hook failed: {hook.error}")
        if retrieving:
            self._store.step()           # the cluster cache policy counts decoding steps
            self._invalid = False        # every layer placed a full selection
        if hook.cells is None or len(hook.cells) != c:
            raise RuntimeError(f"internal: the graph showed {None if hook.cells is None else len(hook.cells)} "
                               f"destination cells for {c} tokens")
        self._since_retrieval = 0 if retrieving else self._since_retrieval + 1
        self._cell_of[n:n + c] = hook.cells
        self.input_ids[n:n + c] = batch
        self.n_tokens = self._n = n + c
        self._cells += c
        self._c["prefill_chunks" if prefill else "decode_steps"] += 1
        self._observe_cells(prefill)

    _retrieving = False

    def _sync(self, new_lo: int, prefill: bool) -> None:
        """Moves positions [tail_lo, new_lo) out of the tail: into the store (those not there yet),
        and their cells become slots while the slot count is below its target (the most recent
        first; each holds its own position in every head until a retrieval replaces it), or are
        removed."""
        t0 = time.perf_counter()
        lo = self._tail_lo
        cells = self._cell_of[lo:new_lo].copy()
        if (cells < 0).any():
            raise RuntimeError(f"internal: positions [{lo}, {new_lo}) are not all in cells of their own")
        if self._synced < new_lo:
            self._store_resident(new_lo)
        self._tail_lo = new_lo
        r = max(0, min(self._slot_target(self._n, prefill) - self._nslot, new_lo - lo))
        keep_from = new_lo - r
        if keep_from > lo:
            llama_cpp.llama_memory_seq_rm(self._mem, SEQ_MAIN, lo, keep_from)
            self._cells -= keep_from - lo
        if r:
            pos = np.arange(keep_from, new_lo, dtype=np.int64)
            content = np.broadcast_to(pos, (len(self._colls), self._n_head_kv, r))
            inv = self._invalid
            self._set_slots(np.concatenate([self._slot_cell, cells[keep_from - lo:]]),
                            np.concatenate([self._slot_nom, pos]),
                            np.concatenate([self._slot_pos, content], axis=2))
            self._invalid = inv
        self._cell_of[lo:new_lo] = -1
        self._c["syncs"] += 1
        self._t["sync"] += time.perf_counter() - t0

    def _store_resident(self, hi: int) -> None:
        """Stores positions [synced, hi), all in cells of their own (sinks and tail)."""
        a = self._synced
        src = self._cell_of[a:hi]
        if (src < 0).any():
            raise RuntimeError(f"internal: positions [{a}, {hi}) are not all in cells of their own")
        k, v = self._kv.read(src)
        self._store_rows(np.arange(a, hi, dtype=np.int64), k, v)
        self._synced = hi

    def _drop_slots(self, k: int) -> None:
        """Removes the last ``k`` slot cells (by nominal position: each is distinct)."""
        keep = self._nslot - k
        for p in self._slot_nom[keep:]:
            llama_cpp.llama_memory_seq_rm(self._mem, SEQ_MAIN, int(p), int(p) + 1)
        self._cells -= k
        inv = self._invalid
        self._set_slots(self._slot_cell[:keep], self._slot_nom[:keep], self._slot_pos[:, :, :keep])
        self._invalid = inv and bool((self._slot_pos < 0).any())

    # -- retrieval inside the graph --------------------------------------------------------
    def _on_layer(self, layer: int, q: np.ndarray) -> None:
        """Runs when ``layer``'s queries are computed, before its attention: per KV head, the
        GQA group's queries (this ubatch's and up to query_tokens - 1 earlier ones) retrieve from
        the store, the first ``nslot`` eligible entries (stored positions in [sinks, tail_lo);
        with ``overfetch``, the best by exact score) are kept, and the slots whose entries left
        that selection are overwritten in llama.cpp's cache with the newcomers. The KV heads of a
        layer are handled together (one engine call, array operations over heads). A sliding
        layer is not tiered: llama.cpp's own cache serves it. From here on ``layer`` is the row
        of the tiered layers (``_colls``, the slots, the KV buffers)."""
        if not self._retrieving or self._tidx[layer] < 0:
            return
        t0 = time.perf_counter()
        c = q.shape[0]
        if c < self._R:
            prev = self._hook.previous(layer, self._R - c)
            if len(prev):
                q = np.concatenate([q, prev], axis=0)
        layer = int(self._tidx[layer])
        H, D, g = self._n_head_kv, self._layout.head_dim, self._g
        b = self._nslot
        n_ids = self._ids.n
        want = min(n_ids, math.ceil(b * self._overfetch) + (n_ids - (self._tail_lo - self._S)))
        qh = np.ascontiguousarray(q.reshape(q.shape[0], H, g, D).transpose(1, 0, 2, 3).reshape(H, -1, D))
        many = self._retrieve_layer(layer, qh, want)
        counts = many.counts
        m = int(counts.max())
        self._c["retrieves"] += H
        self._c["fetched_entries"] += int(counts.sum())
        ids = many.ids[:, :m]
        full = int(counts.min()) == m
        if not full:
            ids = np.where(np.arange(m) < counts[:, None], ids, 0)
        pos = self._ids.pos[ids]
        ok = (pos >= self._S) & (pos < self._tail_lo)
        if self._ids.n_dead:
            ok &= self._ids.alive[ids]
        if not full:
            ok &= np.arange(m) < counts[:, None]
        n_ok = ok.sum(axis=1)
        if (n_ok < b).any():
            self._retrieve_more(layer, qh, want, b, n_ok)
            return
        if self._overfetch > 1 and (n_ok > b).any():
            # the best b by exact score (max over the group), the others pushed below any score
            score = np.matmul(many.keys[:, :m].astype(np.float32), qh.transpose(0, 2, 1)).max(axis=2)
            score[~ok] = -np.inf
            pick = np.argpartition(-score, b - 1, axis=1)[:, :b]
        elif ok[:, :b].all():
            # rows come in the clusters' score order (the partly taken cluster last)
            pick = None
        else:
            # the first b eligible rows: what a retrieve of b entries without the others gives (a
            # stable sort puts every head's eligible rows first, in order)
            pick = np.argsort(~ok, axis=1, kind="stable")[:, :b]
        newp = pos[:, :b] if pick is None else np.take_along_axis(pos, pick, axis=1)
        self._place(layer, newp, many.keys, many.values, pick)
        self._t["retrieve"] += time.perf_counter() - t0

    def _retrieve_layer(self, layer: int, qh: np.ndarray, want: int):
        """``Store.retrieve_many`` for the layer's KV heads, into buffers reused across steps. The
        engine is called directly: the arguments are the adapter's own (the collections, float32
        queries of one shape, one budget), and the public call's checks cost more than the
        engine's work at a few hundred entries per head."""
        d = self._layout.head_dim
        out = self._rout[layer] = _core.layer_buffers(self._rout.get(layer), self._n_head_kv, want, d, d, np.float16)
        # with prefetch, every head's reads are queued on the loader threads first, with the same
        # queries and budget (exactly what each retrieve reads): the heads' reads are in flight
        # together, and each retrieve waits only for what is still loading
        return _core.retrieve_layer(self._store, self._colls[layer], qh, want, out, checked=False,
                                    read_ahead=self._prefetch)

    def _retrieve_more(self, layer: int, qh: np.ndarray, want: int, b: int, n_ok: np.ndarray) -> None:
        """Heads whose fetched clusters held fewer than b eligible entries ask again, alone, with
        a doubled budget until they have b (the rare case: sinks, window or rolled-back entries
        filled their clusters)."""
        t0 = time.perf_counter()
        H, D = self._n_head_kv, self._layout.head_dim
        n_ids = self._ids.n
        out_p = np.empty((H, b), np.int64)
        out_k = np.empty((H, b, D), np.float16)
        out_v = np.empty((H, b, D), np.float16)
        for h in range(H):
            req = want
            while True:
                got = self._colls[layer][h].retrieve(qh[h], budget=req)
                self._c["retrieves"] += 1
                self._c["fetched_entries"] += len(got.ids)
                p = self._ids.pos[got.ids]
                idx = np.flatnonzero(self._ids.alive[got.ids] & (p >= self._S) & (p < self._tail_lo))
                if len(idx) >= b or req >= n_ids:
                    break
                req = min(n_ids, 2 * req)
            if len(idx) < b:
                raise RuntimeError(f"internal: {self._colls[layer][h].name} returned {len(idx)} "
                                   f"candidates for {b} slots with its whole content requested")
            if len(idx) > b:
                score = (got.keys[idx].astype(np.float32) @ qh[h].T).max(axis=1)
                idx = idx[np.argpartition(-score, b - 1)[:b]]
            out_p[h], out_k[h], out_v[h] = p[idx], got.keys[idx], got.values[idx]
        self._place(layer, out_p, out_k, out_v, None)
        self._t["retrieve"] += time.perf_counter() - t0

    def _place(self, layer: int, newp: np.ndarray, keys: np.ndarray, values: np.ndarray,
               pick: np.ndarray | None) -> None:
        """Makes the slots of every KV head of ``layer`` hold the positions ``newp`` [H, b], whose
        K and V are rows ``pick`` [H, b] (None: 0..b-1) of keys, values [H, m, D]: slots already
        holding one keep it, the free ones receive the rest (only their rows are gathered). When
        every slot of the layer is free (its first fill), the newcomers go in position order into
        slot order (which is nominal position order), so that when every entry is
        selected each sits at its own position. Set membership is read from stamps: one int64
        per (head, position), stamped with a fresh value per call, never cleared."""
        cur = self._slot_pos[layer]                       # [H, b], -1: unwritten
        span = self._logical_n_ctx + 1
        newf = newp + self._span_off
        curf = np.where(cur >= 0, cur, span - 1) + self._span_off   # position span-1 is never stamped
        self._stamp += 2
        st, mark = self._stamp, self._mark
        mark[newf] = st
        stay = mark[curf] == st
        if stay.all():
            return
        mark[curf] = st + 1
        fresh = mark[newf] != st + 1
        free_h, free_j = np.nonzero(~stay)                # by head, then slot order
        if len(free_h) == cur.size:
            order = np.argsort(newp, axis=1, kind="stable")
            new_h, new_j = free_h, order.reshape(-1)
        else:
            new_h, new_j = np.nonzero(fresh)
            if len(new_h) != len(free_h):
                raise RuntimeError("internal: new entries and free slots differ in number")
        src = new_j if pick is None else pick[new_h, new_j]
        self._kv.write_heads(layer, free_h, self._slot_cell[free_j], keys[new_h, src], values[new_h, src])
        cur[free_h, free_j] = newp[new_h, new_j]
        self._c["slot_writes"] += len(free_h)

    # -- dense prefill ----------------------------------------------------------------------
    def _dense_prefill(self, tokens: list) -> None:
        """Computes ``tokens`` with every cell they need: the conversation so far (all still in
        cells of its own) moves into a context of n + len(tokens) cells, the tokens are decoded
        there in n_batch batches and everything goes to the store. That context stays until the
        next eval (its logits are the prompt's: sampling reads them), which first shrinks the
        cells to ``dram_tokens`` (:meth:`_shrink`)."""
        t0 = time.perf_counter()
        n0, m = self._n, len(tokens)
        total = n0 + m
        swa = None
        if n0:
            hist = np.arange(n0, dtype=np.int64)
            hk, hv = self._kv.read(self._cell_of[:n0])
            if self._hybrid:
                swa = self._swa_state(SEQ_MAIN)
        self._new_context(total)
        self._dense = True
        if n0:
            self._cell_of[:n0] = self._load_cells(hist, hk, hv, swa)
            del hk, hv
        self._cells = n0
        hook = self._hook
        for i in range(0, m, self.n_batch):
            batch = tokens[i:i + self.n_batch]
            n = n0 + i
            self._batch.set_batch(batch=batch, n_past=n, logits_all=False)
            hook.begin()
            hook.error = None
            t1 = time.perf_counter()
            self._ctx.decode(self._batch)
            self._t["decode"] += time.perf_counter() - t1
            if hook.error:
                raise RuntimeError(f"the graph hook failed: {hook.error}")
            self._cell_of[n:n + len(batch)] = hook.cells
            self.input_ids[n:n + len(batch)] = batch
            self.n_tokens = self._n = n + len(batch)
            self._cells += len(batch)
            self._c["prefill_chunks"] += 1
            self._observe_cells(True)
        # the store, one collection at a time (no second copy of the whole cache); the window
        # stays out of it until it leaves the cells (a retrieval would only skip it)
        a, hi = self._synced, max(self._S, total - self._W)
        cells = self._cell_of[a:hi]
        first = self._ids.n
        d, vt = self._layout.head_dim, self._layout.v_trans
        for layer, row in enumerate(self._colls if hi > a else ()):
            kl, vl = self._kv.k[layer], self._kv.v[layer]
            # one head's copy at a time (a generator)
            _core.add_layer(row, ((kl[cells, h * d:(h + 1) * d],
                                   vl[h * d:(h + 1) * d, cells].T if vt else vl[cells, h * d:(h + 1) * d])
                                  for h in range(len(row))), first)
        self._ids.append(np.arange(a, hi, dtype=np.int64))
        self._synced = hi
        self._c["dense_prefills"] += 1
        self._t["dense_prefill"] += time.perf_counter() - t0

    def _shrink(self) -> None:
        """After a dense prefill: a context of ``dram_tokens`` cells takes over with the sinks, the
        window and the decoding budget's slots (filled by the next decode's retrieval)."""
        t0 = time.perf_counter()
        n = self._n
        s, win_lo = min(self._S, n), max(self._S, n - self._W)
        if self._synced < win_lo:
            self._store_resident(win_lo)   # a rollback and new tokens since the prefill
        keep = np.concatenate([np.arange(s), np.arange(win_lo, n)]).astype(np.int64)
        kk, vv = self._kv.read(self._cell_of[keep])
        swa = None
        if self._hybrid:
            # the sliding layers' window, as llama.cpp would keep it (this context is dropped next)
            llama_cpp.llama_memory_seq_rm(self._mem, SEQ_MAIN, 0, max(0, n - self._n_swa))
            swa = self._swa_state(SEQ_MAIN)
            self._swa_ckpt = (n, swa)
        self._new_context(self._dram)
        self._dense = False
        self._cell_of[:n] = -1
        self._tail_lo = win_lo
        self._cells = 0
        self._place_resident(keep, kk, vv, swa)
        self._t["dense_prefill"] += time.perf_counter() - t0

    def _place_resident(self, fixed: np.ndarray, fk: np.ndarray, fv: np.ndarray, swa: np.ndarray | None = None) -> None:
        """Loads, into an emptied main sequence, the sinks and tail (``fixed`` positions with
        their K/V) and the slots the decoding budget allows, at nominal positions sinks ..
        sinks + b - 1, unwritten: the next decode's retrieval fills them, in position order (so
        that when b covers the whole stored middle, every slot holds its own position)."""
        s = int(np.searchsorted(fixed, self._S))
        b = self._slot_target(self._n, False)
        nom = np.arange(self._S, self._S + b, dtype=np.int64)
        blank = np.zeros((len(self._colls), b, self._n_head_kv, self._layout.head_dim), np.float16)
        pos = np.concatenate([fixed[:s], nom, fixed[s:]])
        k = np.concatenate([fk[:, :s], blank, fk[:, s:]], axis=1)
        v = np.concatenate([fv[:, :s], blank, fv[:, s:]], axis=1)
        cells = self._load_cells(pos, k, v, swa)
        self._cell_of[fixed[:s]] = cells[:s]
        self._cell_of[fixed[s:]] = cells[s + b:]
        self._set_slots(cells[s:s + b], nom, np.full((len(self._colls), self._n_head_kv, b), -1, np.int64))
        self._cells = len(pos)
        self._observe_cells(False)

    # -- rollbacks ---------------------------------------------------------------------------
    def _truncate(self, p: int) -> None:
        """Forgets positions >= p (Llama.generate rolls back to a common prefix)."""
        if p >= self._n:
            return
        if self._hybrid and self._S < p < self._tail_lo:
            self._not_hybrid(f"rolling back to position {p}, before the tail (from {self._tail_lo}),")
        self._ids.truncate(p)
        self._synced = min(self._synced, p)
        if p >= self._tail_lo or p <= self._S:
            # every cell at a position >= p holds that position itself (slots sit below tail_lo)
            llama_cpp.llama_memory_seq_rm(self._mem, SEQ_MAIN, p, -1)
            if p <= self._S:
                self._set_slots(np.empty(0, np.int64), np.empty(0, np.int64),
                                np.empty((len(self._tiered_layers), self._n_head_kv, 0), np.int64))
                self._tail_lo = self._S
            self._cell_of[p:self._n] = -1
            self._n = p
            self._cells = min(self._S, p) + self._nslot + max(0, p - self._tail_lo)
            if self._hybrid:
                self._swa_restore(p)
        else:
            self._n = p
            self._stale = True
        self.n_tokens = min(self.n_tokens, p)
        if self._ids.dead >= 64 and self._ids.dead > self._ids.n - self._ids.dead:
            self._compact()

    def _swa_restore(self, p: int) -> None:
        """After a rollback to ``p`` on a model with sliding-window layers: llama.cpp's sliding
        cache may have reused the cells of positions the token at ``p`` must see (it keeps the
        window of the newest token only). The window as it was at the end of the last dense
        prefill is put back when ``p`` is that end; elsewhere a loss is an error, not a silently
        narrower window."""
        lo = llama_cpp.llama_memory_seq_pos_min(self._mem, SEQ_MAIN)
        need = max(0, p - self._n_swa + 1)
        if p == 0 or 0 <= lo <= need:
            return
        ckpt = self._swa_ckpt
        if ckpt is None or ckpt[0] != p:
            self._not_hybrid(f"rolling back to position {p} (the sliding layers' cache starts at {lo})")
        assert ckpt is not None
        blob = with_header(ckpt[1], SEQ_MAIN)
        got = llama_cpp.llama_state_seq_set_data_ext(self.ctx, blob.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)),
                                                     len(blob), SEQ_MAIN, llama_cpp.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY)
        if got == 0:
            raise RuntimeError("llama_state_seq_set_data_ext refused the sliding layers' window")

    def _compact(self) -> None:
        """Moves the live entries to fresh collections (the store cannot delete entries)."""
        live = np.flatnonzero(self._ids.alive[:self._ids.n])
        live = live[np.argsort(self._ids.pos[live], kind="stable")]
        old = self._colls
        self._gen = self._next_gen(self._session)
        self._set_colls(self._collections(self._session, self._gen))
        positions = self._ids.pos[live].copy()
        self._ids = _IdMap(self._logical_n_ctx)
        if len(live):
            for layer in range(len(old)):
                for h in range(self._n_head_kv):
                    keys, vals = old[layer][h].get(live)
                    self._colls[layer][h].add(keys, vals)
            self._ids.append(positions)
        self._c["compactions"] += 1

    def _fetch(self, positions: np.ndarray):
        """K, V [L, m, H, D] of stored positions, read back from the store."""
        ids = self._ids.pos_id[positions]
        if (ids < 0).any():
            raise RuntimeError("internal: positions needed again are not in the store")
        L, H, D = len(self._colls), self._n_head_kv, self._layout.head_dim
        fk = np.empty((L, len(ids), H, D), np.float16)
        fv = np.empty_like(fk)
        for layer in range(L):
            for h in range(H):
                fk[layer, :, h], fv[layer, :, h] = self._colls[layer][h].get(ids)
        return fk, fv

    def _rebuild(self) -> None:
        """Rebuilds the resident cells from the store after a rollback into the stored part: sinks,
        window and slots in position order in an emptied cache (as an unbounded run lays them)."""
        n = self._n
        s = min(self._S, n)
        win_lo = max(self._S, n - self._W)
        fixed = np.concatenate([np.arange(s), np.arange(win_lo, n)]).astype(np.int64)
        fk, fv = self._fetch(fixed)
        llama_cpp.llama_memory_clear(self._mem, True)
        self._cell_of[:] = -1
        self._tail_lo = win_lo
        self._place_resident(fixed, fk, fv)
        self._stale = False
        self._c["rebuilds"] += 1

    # -- sessions ----------------------------------------------------------------------------
    @property
    def session(self) -> str:
        """Name of the current conversation."""
        return self._session

    def _session_path(self, name: str) -> str:
        return os.path.join(self._store.path, SESSION_DIR, name + ".kvs")

    def sessions(self) -> list[str]:
        """Names of the sessions saved in the store."""
        d = os.path.join(self._store.path, SESSION_DIR)
        if not os.path.isdir(d):
            return []
        return sorted(f[:-4] for f in os.listdir(d) if f.endswith(".kvs"))

    def _fingerprint(self) -> dict:
        return {"n_layer": self._n_layer, "n_head": self._n_head, "n_head_kv": self._n_head_kv,
                "head_dim": self._layout.head_dim, "n_vocab": self.n_vocab(),
                "desc": self.metadata.get("general.name", ""), "arch": self.metadata.get("general.architecture", "")}

    def save_session(self, durable: bool = True) -> dict:
        """Saves the current conversation: its new tokens go to its collections, and a record with
        the token ids, id map, last queries and resident cells (zstd) goes next to the store.
        ``durable``: flush the store and fsync the record (crash-safe) before returning."""
        self._not_hybrid("a session record")
        zstandard = _zstd()

        t0 = time.perf_counter()
        if self._stale:
            self._rebuild()
        if self._synced < self._n:
            self._store_resident(self._n)
        # a dense prefill's cells are not kept: the next load rebuilds the resident ones
        resident = self._layout.build(np.empty(0, np.int32), *(np.empty((len(self._colls), 0), np.float16),) * 2) \
            if self._dense else self._seq_blob(SEQ_MAIN)
        n_ids = self._ids.n
        arrays = {
            "input_ids": np.ascontiguousarray(self.input_ids[:self.n_tokens], np.int32),
            "id_pos": self._ids.pos[:n_ids].copy(),
            "alive": self._ids.alive[:n_ids].copy(),
            "query": self._hook.recent() if self._hook.filled else np.zeros((0,), np.float32),
            "slot_nom": self._slot_nom.astype(np.int64),
            "slot_pos": np.ascontiguousarray(self._slot_pos, np.int64),
            # float16 planes: high bytes (sign, exponent) apart from low bytes compress far better
            "resident": _shuffle16(resident),
        }
        header = {
            "version": SESSION_VERSION, "session": self._session, "gen": self._gen, "model": self._fingerprint(),
            "sinks": self._S, "n_tokens": int(self.n_tokens), "n": self._n, "synced": self._synced,
            "tail_lo": self._tail_lo, "window": self._W if not self._dense else self._n,
            "cells": 0 if self._dense else self._cells,
            "n_ids": n_ids,
            "arrays": [[k, str(a.dtype), list(a.shape), int(a.nbytes)] for k, a in arrays.items()],
        }
        hb = json.dumps(header).encode()
        raw_size = 4 + len(hb) + sum(a.nbytes for a in arrays.values())
        if durable:
            self._store.flush()
        path = self._session_path(self._session)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(SESSION_MAGIC)
            # streamed: no concatenated copy of the record; the frame carries its content size
            cctx = zstandard.ZstdCompressor(level=self._level)
            with cctx.stream_writer(f, size=raw_size, closefd=False) as zw:
                zw.write(struct.pack("<I", len(hb)))
                zw.write(hb)
                for a in arrays.values():
                    zw.write(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data)
            file_bytes = f.tell()
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            fd = os.open(os.path.dirname(path), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        dt = time.perf_counter() - t0
        self._t["session_save"] += dt
        self._c["session_saves"] += 1
        return {"session": self._session, "tokens": int(self.n_tokens), "resident_cells": self._cells,
                "raw_bytes": raw_size, "file_bytes": file_bytes, "seconds": dt}

    def load_session(self, name: str) -> dict:
        """Makes the saved conversation ``name`` the current one (the current one is dropped
        from llama.cpp; save it first to keep it). Continues exactly where it was saved."""
        self._not_hybrid("a session record")
        zstandard = _zstd()

        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InvalidArgumentError(f"name: 1-64 letters, digits, '_' or '-' expected, got {name!r}")
        t0 = time.perf_counter()
        path = self._session_path(name)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise SessionError(f"name: no saved session {name!r} in {self._store.path} "
                               f"(saved: {self.sessions()})") from None
        if data[:len(SESSION_MAGIC)] != SESSION_MAGIC:
            raise SessionError(f"{path}: not a TieredLlama session record")
        try:
            raw = zstandard.ZstdDecompressor().decompress(data[len(SESSION_MAGIC):])
            (hl,) = struct.unpack_from("<I", raw)
            header = json.loads(raw[4:4 + hl])
            arrays, off = {}, 4 + hl
            for key, dt, shape, nb in header["arrays"]:
                arrays[key] = np.frombuffer(raw, dtype=dt, count=nb // np.dtype(dt).itemsize,
                                            offset=off).reshape(shape)      # read-only views
                off += nb
        except Exception as e:
            raise SessionError(f"{path}: damaged session record ({type(e).__name__}: {e})") from None
        if header.get("version") != SESSION_VERSION:
            raise SessionError(f"{path}: session format {header.get('version')}, this adapter reads {SESSION_VERSION}")
        if header["model"] != self._fingerprint():
            raise SessionError(f"{path}: saved with model {header['model']}, this is {self._fingerprint()}")
        if header["sinks"] != self._S:
            raise SessionError(f"{path}: saved with sinks={header['sinks']}, this TieredLlama has sinks={self._S}")
        if header["n_tokens"] > self._logical_n_ctx:
            raise SessionError(f"{path}: {header['n_tokens']} tokens exceed n_ctx={self._logical_n_ctx}")
        # The record's resident cells come back as they were when they fit this instance (fewer
        # slots or a shorter tail are fine: the next eval adjusts them); otherwise (saved after a
        # dense prefill, or with a wider window) they are rebuilt from the store, which holds
        # every position of a saved session.
        as_saved = header["cells"] <= self._dram and header["window"] <= self._W
        colls = self._collections(name, header["gen"])
        n_ids = header["n_ids"]
        have = len(colls[0][0])
        if have < n_ids:
            raise SessionError(f"{path}: the store holds {have} of the session's {n_ids} entries "
                               f"(saved with durable=False and not flushed?)")
        ids = _IdMap(self._logical_n_ctx)
        if have:
            ids.append(np.zeros(have, np.int64))
            ids.pos[:n_ids] = arrays["id_pos"]
            ids.alive[:n_ids] = arrays["alive"]
            ids.alive[n_ids:have] = False    # added after the save: not part of this session
            ids.pos_id[:] = -1
            live = np.flatnonzero(ids.alive[:have])
            ids.pos_id[ids.pos[live]] = live
        resident = _unshuffle16(arrays["resident"])
        if self._layout.cells_from_size(len(resident)) != header["cells"]:
            raise SessionError(f"{path}: resident blob does not hold {header['cells']} cells")
        if header["synced"] != header["n"]:
            raise SessionError(f"{path}: the record says {header['synced']} of {header['n']} positions are stored")
        if not as_saved:
            resident, header = resident[:16], dict(header, cells=0, tail_lo=self._S)
            arrays = dict(arrays, slot_nom=np.empty(0, np.int64),
                          slot_pos=np.empty((len(self._tiered_layers), self._n_head_kv, 0), np.int64))
        k: np.ndarray | None = None
        v: np.ndarray | None = None
        pos = np.empty(0, np.int32)
        if header["cells"]:
            pos, k, v = self._layout.parse(resident)
        nom = np.asarray(arrays["slot_nom"], np.int64)
        tail_lo = header["tail_lo"]
        own = (pos < self._S) | (pos >= tail_lo)
        order = np.argsort(nom)
        j = (order[np.minimum(np.searchsorted(nom[order], pos[~own]), len(nom) - 1)] if len(nom)
             else np.empty(0, np.int64))
        if len(j) != len(nom) or (len(nom) and not np.array_equal(nom[j], pos[~own])):
            raise SessionError(f"{path}: the resident cells do not match the recorded slots")
        self._leave_dense()
        llama_cpp.llama_memory_clear(self._mem, True)
        ids.recount()
        self._session, self._gen, self._ids = name, header["gen"], ids
        self._set_colls(colls)
        self._n, self._synced, self._tail_lo = header["n"], header["synced"], tail_lo
        self._cell_of[:] = -1
        cells = (self._load_cells(pos.astype(np.int64), k, v) if k is not None and v is not None and len(pos)
                 else np.empty(0, np.int64))
        self._cell_of[pos[own]] = cells[own]
        slot_cell = np.empty(len(nom), np.int64)
        slot_cell[j] = cells[~own]
        self._set_slots(slot_cell, nom.copy(), np.array(arrays["slot_pos"], np.int64))
        self._cells, self._stale, self._since_retrieval = header["cells"], not as_saved and header["n"] > 0, 0
        self.n_tokens = header["n_tokens"]
        self.input_ids[:self.n_tokens] = arrays["input_ids"]
        self._hook.reset(arrays["query"] if arrays["query"].size else None)
        self._observe_cells(False)
        self._requires_eval = True      # llama.cpp's logits belong to whatever ran before
        dt = time.perf_counter() - t0
        self._t["session_load"] += dt
        self._c["session_loads"] += 1
        return {"session": name, "tokens": int(self.n_tokens), "resident_cells": self._cells,
                "file_bytes": len(data), "seconds": dt}

    def new_session(self, name: str) -> None:
        """Starts an empty conversation ``name`` (the current one is dropped; save it first)."""
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InvalidArgumentError(f"name: 1-64 letters, digits, '_' or '-' expected, got {name!r}")
        self._start(name)

    def switch_session(self, name: str, durable: bool = False) -> dict:
        """Saves the current conversation and continues ``name`` (saved before) or starts it."""
        saved = self.save_session(durable=durable)
        if name in self.sessions():
            loaded = self.load_session(name)
        else:
            self.new_session(name)
            loaded = {"session": name, "tokens": 0}
        return {"saved": saved, "loaded": loaded}

    def save_state(self):
        raise NotImplementedError("TieredLlama's state spans llama.cpp and the kvtier store: "
                                  "use save_session()/load_session()")

    def load_state(self, state):
        raise NotImplementedError("TieredLlama's state spans llama.cpp and the kvtier store: "
                                  "use save_session()/load_session()")

    # -- introspection -----------------------------------------------------------------------
    def stats(self) -> dict:
        """llama.cpp's cells and KV bytes at their peak while prefilling and while decoding (and
        now), against dram_tokens and a full context; retrieval counts and times; the kvtier
        store's DRAM and I/O figures: a :class:`kvtier.stats.Stats` (``.adapter``, ``.engine``,
        ``.cache``, ``.io``)."""
        cell = self._layout.cell_bytes
        allocated = llama_cpp.llama_n_ctx(self.ctx)
        pk = self._peak
        r = max(self._c["retrievals"], 1)
        st = self._store.stats()
        own = {
            "kv_cells_peak": max(pk["prefill_cells"], pk["decode_cells"]),
            "prefill_kv_cells_peak": pk["prefill_cells"],
            "prefill_kv_mib_peak": pk["prefill_allocated"] * cell / 2**20,
            "decode_kv_cells_peak": pk["decode_cells"],
            "decode_kv_mib_peak": pk["decode_allocated"] * cell / 2**20,
            "kv_cells": self._cells_now(),
            "tiered_layers": list(self._tiered_layers),
            "window": self._W,
            "sliding_window": self._n_swa,
            # the sliding layers' cells of the conversation (llama.cpp's iSWA cache), their bytes
            # and the bytes llama.cpp allocates for that cache (its cells x their layers)
            "swa_cells": self._swa_cells(),
            "swa_kv_bytes": self._swa_cells() * self._swa_cell_bytes(),
            "swa_checkpoint_bytes": 0 if self._swa_ckpt is None else int(self._swa_ckpt[1].nbytes),
            "dram_tokens": self._dram,
            "kv_cells_allocated": allocated,
            "kv_bytes_per_cell": cell,
            "kv_bytes_peak": max(pk["prefill_cells"], pk["decode_cells"]) * cell,
            "kv_bytes_allocated": allocated * cell,
            "full_context_tokens_peak": self._n_peak,
            "full_context_kv_bytes": self._n_peak * cell,
            "n_tokens": int(self.n_tokens),
            "prefill": self._prefill,
            "slots": self._nslot,
            "slots_max": self._B_max,
            "mean_slots": self._c["visible_slots"] / r,
            "stored_entries": self._ids.n,
            "dead_entries": self._ids.dead,
            "fetched_per_retrieve": self._counters.per_retrieve(),
            "slot_writes_per_retrieval": self._c["slot_writes"] / r,
            **self._c,
            "seconds": dict(self._t),
            "session": self._session,
        }
        # the store's figures, grouped beside the adapter's (engine, cache, io); "store" keeps them
        # as one dict for older scripts
        return _core.adapter_stats(own, st)

    def close(self) -> None:
        owner = getattr(self, "_owner", None)
        try:
            self._kv = None  # type: ignore[assignment]  # closed: the tensors go with the contexts
            for c in getattr(self, "_contexts", ()):
                c.close()
            if hasattr(self, "_stack"):
                super().close()
        finally:
            if owner is not None:
                owner.close()
