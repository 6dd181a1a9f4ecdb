"""TieredLlama: ``llama_cpp.Llama`` whose KV cache never holds more than ``dram_tokens`` cells.

llama.cpp has no pluggable KV backend, so this adapter works through llama-cpp-python's public
API and llama.h. Every ``refresh_every`` decoded tokens, and after every prompt chunk of
``prefill_chunk`` tokens, it refreshes what llama.cpp can see:

1. **History into kvtier.** The cells decoded since the last refresh are marked with a parking
   sequence id (``llama_memory_seq_cp`` to seq 1: metadata only in a unified cache) and copied
   out with ``llama_state_seq_get_data(seq 1)``: llama.cpp's own state blob, holding the
   post-RoPE K and the V exactly as stored (float16; parsed by ``_state.py``). Each (layer, KV
   head) row goes to its own kvtier collection ``<session>.g<n>.L<layer>.H<head>``, so the
   store holds the whole conversation, sinks and window included.
2. **Retrieval.** The eval callback (``cb_eval``, nodes ``Qcur-<layer>``, ``_query.py``) keeps
   the RoPE'd queries of the last ``query_tokens`` tokens (spread over a prompt chunk). Every KV
   head's GQA group, over those tokens, retrieves whole clusters from its collection
   (``Collection.retrieve``, ``overfetch`` x B entries); of the fetched entries that are not
   sinks, window or rolled back, each head keeps its B best by exact score (max over the
   group). Every head gets the same B because llama.cpp's cells are shared by all heads.
3. **Rebuild.** Everything after the sinks is removed (``llama_memory_seq_rm``); one blob, built
   in numpy, is loaded with ``llama_state_seq_set_data`` into parking seq 2 and moved to seq 0
   (``seq_cp`` + ``seq_rm``): B "slot" cells, then the last ``window`` tokens at their own
   positions. Slot ``j`` carries, for every (layer, head), that head's ``j``-th selected entry
   in position order, so each head sees its own clusters, as in the paper, in one shared cell.
   K is stored post-RoPE, so a cell's position only feeds the causal mask: slot ``j`` gets the
   nominal position ``sinks + j`` (below the window, hence visible). When every entry is
   selected this *is* the original position and the cells sit at the same indices as in an
   unbounded run, so greedy decoding is bit-identical (tested).

Visible context: ``sinks + B + window`` plus the tokens since the refresh, with
``B = min(budget x context, dram_tokens - sinks - window - max(refresh_every, prefill_chunk))``
(``stats()["slots"]``); ``budget=0`` is the sink+window (StreamingLLM) baseline.

Choices and their costs (measured with ``bench/llama_cpp_bench.py`` and the notes below):

- Blobs, not tensor pointers: ``state_seq_get/set_data`` is public API that copies only the
  cells asked for; the adapter never writes llama.cpp's buffers behind its back. The price is
  one copy of ``B + window`` cells per refresh (23 KiB per cell for SmolLM2-135M), amortised
  over ``refresh_every`` tokens. Parking sequence ids (``n_seq_max=3``, ``kv_unified=True``,
  set by the adapter) make selecting cells for the copy, and moving loaded ones in, free.
- K for the index comes from the blobs (exact cache contents, nothing recomputed); queries
  need the eval callback: one Python call per graph node (~1100 per token for a 30-layer
  Llama), about 1 ms per token here, within the run-to-run noise of decoding.
- The whole visible block is rebuilt each refresh (not only the slots): the cache stays
  compact and in position order, which is what makes the budget-holds-all case bit-identical
  and lets a session snapshot come back cell for cell.
- Queries of 8 recent tokens rather than the last one: with exact token-level selection (an
  oracle) at 10% of a 1K context, dNLL fell from 0.107 to 0.031 nats/token. Smaller prompt
  chunks (64 vs 128) roughly halved dNLL at the cost of more refreshes. ``overfetch=2``
  lowered dNLL at 4K/10% from 0.031 to 0.010 but doubled the fetch I/O and halved decode speed,
  so the default is 1.
- Each refresh re-fetches every head's selection; kvtier's cache (its DRAM budget) should hold
  one refresh's fetch (~ heads x B x 256 bytes), or every refresh reads it from flash again.

Sessions (``save_session`` / ``load_session`` / ``switch_session``): the history already lives
in the session's collections; a record adds the token ids, the id map, the recent queries and
the resident cells (a state blob, float16 byte planes split for zstd: 0.86 of raw vs 0.92
unsplit), written atomically to ``<store>/llama_sessions/<name>.kvs``. A switch moves at most
``dram_tokens`` cells, where llama.cpp's ``llama_state_save_file``/``load_file`` move the whole
context; many conversations share one llama.cpp context and one kvtier DRAM budget.
``durable=True`` also flushes the store (fsync of every dirty collection and one catalog
commit), which dominates its cost.

Refused, each with a clear error: recurrent/hybrid, encoder-decoder, diffusion and
sliding-window models; models without RoPE (ALiBi or absolute positions) or with multi-axis
RoPE; per-layer KV widths (MLA); quantized KV (``type_k``/``type_v``); GPU offload;
``logits_all`` (logprobs); embeddings; LoRA and draft models; ``save_state``/``load_state``
(use sessions). Rolled-back tokens stay in the append-only store, marked dead; when the dead
outnumber the live, the live ones are copied to fresh collections.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import re
import shutil
import struct
import tempfile
import time
import weakref
from typing import Any, Optional, Sequence, Union

import llama_cpp
import numpy as np
from llama_cpp import Llama
from llama_cpp import _internals as internals
from threadpoolctl import ThreadpoolController

import kvtier
from kvtier.errors import InvalidArgumentError
from kvtier.params import budget_arg, budget_entries, positive_int
from kvtier.stats import Stats

from ._query import QueryCapture
from ._state import KVLayout, StateFormatError

SEQ_MAIN, SEQ_DUMP, SEQ_LOAD = 0, 1, 2
SESSION_DIR = "llama_sessions"
SESSION_MAGIC = b"KVTLSES1"
SESSION_VERSION = 1
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")

# llama kwargs this adapter refuses, with the reason.
_REFUSED = {
    "logits_all": (lambda v: bool(v), "logits for every token (logprobs) are not kept"),
    "embedding": (lambda v: bool(v), "embedding contexts have no KV cache to tier"),
    "draft_model": (lambda v: v is not None, "speculative decoding is not supported"),
    "lora_path": (lambda v: v is not None, "LoRA adapters are not supported (the context is rebuilt)"),
    "vocab_only": (lambda v: bool(v), "a vocab-only model cannot decode"),
    "n_gpu_layers": (lambda v: v not in (0, None), "CPU only: the query capture reads host tensors"),
    "type_k": (lambda v: v not in (None, llama_cpp.GGML_TYPE_F16), "the KV cache must stay float16"),
    "type_v": (lambda v: v not in (None, llama_cpp.GGML_TYPE_F16), "the KV cache must stay float16"),
    "n_seq_max": (lambda v: True, "the adapter sets it (it uses parking sequence ids)"),
    "kv_unified": (lambda v: True, "the adapter sets it (parking sequences need a unified cache)"),
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
        self.alive[ids] = False
        self.pos_id[p:] = -1

    @property
    def dead(self) -> int:
        return int(self.n - self.alive[:self.n].sum())


class _TieredContext(internals.LlamaContext):
    """The llama context with Llama.generate's rollbacks (``kv_cache_seq_rm(-1, p, -1)``) routed
    to the adapter, which also has to forget the rolled-back tokens in kvtier."""

    def __init__(self, owner: "TieredLlama", **kw):
        super().__init__(**kw)
        self._owner = weakref.ref(owner)

    def kv_cache_seq_rm(self, seq_id: int, p0: int, p1: int) -> bool:
        owner = self._owner()
        if owner is None or seq_id not in (-1, SEQ_MAIN) or p1 >= 0:
            return super().kv_cache_seq_rm(seq_id, p0, p1)
        owner._truncate(max(p0, 0))
        return True


class TieredLlama(Llama):
    """``llama_cpp.Llama`` with llama.cpp's KV cache bounded to ``dram_tokens`` cells and the
    whole history in a kvtier store.

    ``budget``: entries each KV head sees besides sinks and window, as a fraction of the context
    (float) or a count (int); capped by what ``dram_tokens`` leaves (``stats()["slots_max"]``).
    ``dram_tokens``: most cells llama.cpp ever holds (its context is created with this size,
    which llama.cpp rounds up to a multiple of 256 when allocating). ``policy``: the kvtier
    collection policy (None: the store's default). ``sinks``/``window``: first and last tokens
    always visible. ``refresh_every``: decoded tokens between retrievals. ``prefill_chunk``:
    prompt tokens per batch, each batch followed by a retrieval (default min(n_batch, 64)).
    ``query_tokens``: how many recent tokens' queries form each retrieval's query group.
    ``overfetch``: kvtier is asked for overfetch x budget entries per head, of which the best
    ``budget`` by exact score are shown (more recall for more I/O). ``store``: a kvtier store
    path or an open ``kvtier.Store`` (None: a temporary store removed on close);
    ``store_dram_budget``/``device`` open it; ``collection_kwargs`` go to
    ``Store.collection``. ``session``: name of the conversation (its collections are
    ``<session>.g<n>.L<layer>.H<head>``). ``compress_level``: zstd level of session records.
    ``n_ctx`` (in ``llama_kwargs``): the logical context length (0, the default: the model's
    training context). Other ``llama_kwargs`` go to ``llama_cpp.Llama``.
    """

    def __init__(self, model_path: str, budget: Union[int, float] = 0.25, dram_tokens: int = 1024,
                 policy: Optional[str] = None, *, sinks: int = 4, window: int = 64,
                 refresh_every: int = 16, prefill_chunk: Optional[int] = None, query_tokens: int = 8,
                 overfetch: float = 1.0,
                 store: Union[None, str, os.PathLike, "kvtier.Store"] = None,
                 store_dram_budget="64MiB", device=None, session: str = "default",
                 collection_kwargs: Optional[dict] = None, compress_level: int = 1,
                 **llama_kwargs):
        self._store = None
        self._owns_store = None          # "temp", "path" or None (caller's Store)
        self._budget = budget_arg(budget)
        self._dram = positive_int("dram_tokens", dram_tokens, 2, 1 << 24)
        self._S = positive_int("sinks", sinks, 0, 1 << 20)
        self._W = positive_int("window", window, 1, 1 << 20)
        self._N = positive_int("refresh_every", refresh_every, 1, 1 << 20)
        self._R = positive_int("query_tokens", query_tokens, 1, 4096)
        if isinstance(overfetch, bool) or not isinstance(overfetch, (int, float)) or not 1.0 <= overfetch <= 64:
            raise InvalidArgumentError(f"overfetch: a number in [1, 64] expected, got {overfetch!r}")
        self._overfetch = float(overfetch)
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
        self._B_max = self._dram - self._S - self._W - max(self._N, self._C)
        if self._B_max < 0:
            raise InvalidArgumentError(
                f"dram_tokens: {self._dram} cannot hold sinks ({self._S}) + window ({self._W}) + "
                f"max(refresh_every, prefill_chunk) ({max(self._N, self._C)}); raise it or shrink those")

        super().__init__(model_path, n_ctx=self._dram, n_batch=n_batch, **llama_kwargs)
        try:
            self._check_model()
            self._n_layer = llama_cpp.llama_model_n_layer(self.model)
            self._n_head = llama_cpp.llama_model_n_head(self.model)
            self._n_head_kv = llama_cpp.llama_model_n_head_kv(self.model)
            if self._n_head_kv <= 0 or self._n_head % self._n_head_kv:
                raise UnsupportedModelError(f"{self._n_head} query heads do not group over "
                                            f"{self._n_head_kv} KV heads")
            self._g = self._n_head // self._n_head_kv
            self._setup_context()
            self._layout = self._probe()
            # The per-head rescoring is many tiny matmuls: handing each to OpenBLAS's thread pool
            # costs milliseconds on a busy machine (and competes with llama.cpp's threads).
            self._blas = ThreadpoolController()
            self._logical_n_ctx = n_ctx or llama_cpp.llama_model_n_ctx_train(self.model)
            self._n_ctx = self._logical_n_ctx
            self.input_ids = np.zeros((self._logical_n_ctx,), dtype=np.intc)
            self._open_store(store, store_dram_budget, device)
            self._reset_counters()
            self._start(session)
        except BaseException:
            self.close()
            raise

    # -- setup ------------------------------------------------------------------------------
    def _check_model(self):
        m = self.model
        desc = self.metadata.get("general.architecture", "this model")
        checks = [
            (llama_cpp.llama_model_is_recurrent(m), "it is recurrent (its state is not a KV cache)"),
            (llama_cpp.llama_model_is_hybrid(m), "it is hybrid (part of its state is recurrent)"),
            (llama_cpp.llama_model_has_encoder(m), "it is an encoder-decoder model"),
            (llama_cpp.llama_model_is_diffusion(m), "it is a diffusion (non-causal) model"),
            (llama_cpp.llama_model_n_swa(m) > 0, "it uses sliding-window attention (a two-part iSWA cache)"),
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

    def _setup_context(self):
        """Replaces Llama's context by one with parking sequences and the query callback."""
        self._qcap = QueryCapture(self._n_layer, self._n_head, keep=self._R)
        p = self.context_params
        p.n_seq_max = 3
        p.kv_unified = True
        p.cb_eval = self._qcap.callback
        p.cb_eval_user_data = None
        self._ctx.close()
        self._ctx = self._stack.enter_context(contextlib.closing(
            _TieredContext(self, model=self._model, params=p, verbose=self.verbose)))
        self._mem = llama_cpp.llama_get_memory(self.ctx)

    def _probe(self) -> KVLayout:
        """Decodes one token to check that the queries are captured for every layer and that the
        state blob has the layout KVLayout reads; fails at construction rather than mid-chat."""
        tok = self.token_bos()
        self._batch.set_batch(batch=[tok if tok >= 0 else 0], n_past=0, logits_all=False)
        self._ctx.decode(self._batch)
        q = self._qcap
        if q.error or not q.seen.all():
            missing = np.flatnonzero(~q.seen).tolist()
            raise UnsupportedModelError(
                f"model_path: the eval callback did not deliver post-RoPE queries (Qcur-<layer>) "
                f"for layers {missing[:8]}{'...' if len(missing) > 8 else ''}: {q.error or 'not found in the graph'}")
        try:
            layout = KVLayout.from_probe(self._seq_blob(SEQ_MAIN), self._n_layer, self._n_head_kv)
        except StateFormatError as e:
            raise UnsupportedModelError(f"model_path: unsupported KV cache layout: {e}") from None
        if layout.head_dim != q.q.shape[3]:
            raise UnsupportedModelError(f"model_path: key head size {layout.head_dim} differs from query head "
                                        f"size {q.q.shape[3]}")
        llama_cpp.llama_memory_clear(self._mem, True)
        q.seen[:] = False
        q.reset()
        return layout

    def _open_store(self, store, dram_budget, device):
        if store is None:
            self._tmpdir = tempfile.mkdtemp(prefix="kvtier-llama-")
            self._store = kvtier.open(self._tmpdir, dram_budget=dram_budget, device=device)
            self._owns_store = "temp"
        elif isinstance(store, kvtier.Store):
            self._store = store
        elif isinstance(store, (str, os.PathLike)):
            self._store = kvtier.open(store, dram_budget=dram_budget, device=device)
            self._owns_store = "path"
        else:
            raise InvalidArgumentError(f"store: None, a path or a kvtier.Store expected, got {store!r}")

    def _reset_counters(self):
        self._t = {"decode": 0.0, "sync": 0.0, "retrieve": 0.0, "load": 0.0, "session_save": 0.0,
                   "session_load": 0.0}
        self._c = {"refreshes": 0, "retrieves": 0, "fetched_entries": 0, "visible_slots": 0,
                   "rebuilds": 0, "compactions": 0, "session_saves": 0, "session_loads": 0}
        self._cells_peak = 0
        self._n_peak = 0

    # -- conversation state -----------------------------------------------------------------
    def _start(self, session: str, gen: Optional[int] = None):
        """An empty conversation in fresh collections ``<session>.g<gen>.*``."""
        llama_cpp.llama_memory_clear(self._mem, True)
        self._session = session
        self._gen = self._next_gen(session) if gen is None else gen
        self._colls = self._collections(session, self._gen)
        self._ids = _IdMap(self._logical_n_ctx)
        self.n_tokens = 0
        self._requires_eval = True
        self._n = 0                 # positions the adapter holds (llama.cpp + store)
        self._synced = 0            # positions [0, synced) are in the store
        self._last_refresh = 0
        self._tail_lo = self._S     # positions >= tail_lo (and < n) are resident at their own cells
        self._slots = 0             # slot cells resident after the sinks
        self._cells = 0             # cells llama.cpp holds (checked against llama.cpp)
        self._stale = False         # resident cells no longer match the positions (deep rollback)
        self._qcap.reset()

    def _next_gen(self, session: str) -> int:
        pat = re.compile(re.escape(session) + r"\.g(\d+)\.L0\.H0")
        gens = [int(m.group(1)) for n in self._store.collections() if (m := pat.fullmatch(n))]
        return max(gens) + 1 if gens else 0

    def _collections(self, session: str, gen: int) -> list:
        d = self._layout.head_dim
        return [[self._store.collection(f"{session}.g{gen}.L{layer}.H{h}", dim=d, value_dim=d, dtype="float16",
                                        metric="ip", policy=self._policy, **self._coll_kwargs)
                 for h in range(self._n_head_kv)] for layer in range(self._n_layer)]

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

    def _cells_now(self) -> int:
        return self._layout.cells_from_size(llama_cpp.llama_state_seq_get_size(self.ctx, SEQ_MAIN))

    def _observe_cells(self) -> None:
        now = self._cells_now()
        if now != self._cells:
            raise RuntimeError(f"internal: llama.cpp holds {now} cells, the adapter expected {self._cells}")
        self._cells_peak = max(self._cells_peak, now)
        self._n_peak = max(self._n_peak, self._n)

    def _dump(self, lo: int, hi: int):
        """Positions, K, V of the resident cells with positions in [lo, hi), position order."""
        llama_cpp.llama_memory_seq_cp(self._mem, SEQ_MAIN, SEQ_DUMP, lo, hi)
        try:
            pos, k, v = self._layout.parse(self._seq_blob(SEQ_DUMP))
        finally:
            llama_cpp.llama_memory_seq_rm(self._mem, SEQ_DUMP, -1, -1)
        if not np.array_equal(pos, np.arange(lo, hi)):
            order = np.argsort(pos, kind="stable")
            pos, k, v = pos[order], k[:, order], v[:, order]
            if not np.array_equal(pos, np.arange(lo, hi)):
                raise RuntimeError(f"internal: positions [{lo}, {hi}) are not all resident")
        return pos, k, v

    def _store_rows(self, pos: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
        if not len(pos):
            return
        first = self._ids.n
        for layer, row in enumerate(self._colls):
            for h, coll in enumerate(row):
                ids = coll.add(k[layer, :, h], v[layer, :, h])
                if ids[0] != first:
                    raise RuntimeError(f"internal: collection {coll.name} is out of step "
                                       f"(id {ids[0]}, expected {first})")
        self._ids.append(pos)

    # -- eval -------------------------------------------------------------------------------
    def n_ctx(self) -> int:
        """The logical context length (llama.cpp's own context is ``dram_tokens`` cells)."""
        return getattr(self, "_logical_n_ctx", None) or super().n_ctx()

    def eval(self, tokens: Sequence[int]):
        """Decodes ``tokens`` after the first ``n_tokens``, refreshing the visible context
        every ``refresh_every`` tokens; same contract as ``Llama.eval``."""
        tokens = list(tokens)
        self._truncate(self.n_tokens)
        if self._stale:
            self._rebuild()
        i, m = 0, len(tokens)
        while i < m:
            c = min(m - i, self._C)
            n = self.n_tokens
            if n + c > self._logical_n_ctx:
                raise ValueError(f"the context window of {self._logical_n_ctx} tokens is full "
                                 f"({n} + {c} tokens)")
            if n - self._W > self._S and (n - self._last_refresh >= self._N or self._cells + c > self._dram):
                self._refresh()
            batch = tokens[i:i + c]
            self._batch.set_batch(batch=batch, n_past=n, logits_all=False)
            t0 = time.perf_counter()
            self._ctx.decode(self._batch)
            self._t["decode"] += time.perf_counter() - t0
            if self._qcap.error:
                raise RuntimeError(f"query capture failed: {self._qcap.error}")
            self.input_ids[n:n + c] = batch
            self.n_tokens = self._n = n + c
            self._cells += c
            self._observe_cells()
            i += c
        self._requires_eval = False

    def _slot_count(self, n: int, middle: int) -> int:
        want = budget_entries(self._budget, n)
        return max(0, min(want, middle, self._B_max))

    def _refresh(self):
        """Stores the new tokens, retrieves every head's slots, rebuilds the resident cells."""
        t0 = time.perf_counter()
        n = self._n
        win_lo = max(self._S, n - self._W)
        # Resident at their own cells: the sinks and [tail_lo, n); [synced, n) is not stored yet
        # (synced < sinks only before anything was stored, when tail_lo == sinks).
        lo = min(self._synced, win_lo)
        if lo >= self._S:
            lo = max(lo, self._tail_lo)
        pos, k, v = self._dump(lo, n)
        new = self._synced - lo
        self._store_rows(pos[new:], k[:, new:], v[:, new:])
        self._synced = n
        if win_lo < lo:
            # a rollback left fewer than `window` tokens resident: the rest comes from the store
            fk, fv = self._fetch(np.arange(win_lo, lo))
            pos = np.concatenate([np.arange(win_lo, lo, dtype=pos.dtype), pos])
            k, v = np.concatenate([fk, k], axis=1), np.concatenate([fv, v], axis=1)
            lo = win_lo
        t1 = time.perf_counter()
        b = self._slot_count(n, win_lo - self._S)
        w = win_lo - lo
        shape = (self._n_layer, b + len(pos) - w, self._n_head_kv, self._layout.head_dim)
        rk, rv = np.empty(shape, np.float16), np.empty(shape, np.float16)
        self._select(b, win_lo, rk[:, :b], rv[:, :b])
        rk[:, b:], rv[:, b:] = k[:, w:], v[:, w:]
        t2 = time.perf_counter()
        self._load_resident(np.concatenate([np.arange(self._S, self._S + b, dtype=np.int32), pos[w:]]), rk, rv,
                            keep_sinks=True)
        self._cells = self._S + b + (n - win_lo)
        self._observe_cells()
        self._last_refresh, self._tail_lo, self._slots = n, win_lo, b
        self._c["refreshes"] += 1
        self._c["visible_slots"] += b
        self._t["sync"] += t1 - t0
        self._t["retrieve"] += t2 - t1
        self._t["load"] += time.perf_counter() - t2

    def _load_resident(self, pos, k, v, keep_sinks: bool):
        """Replaces the resident cells after the sinks (or all of them) by (pos, k, v) in order."""
        if keep_sinks:
            llama_cpp.llama_memory_seq_rm(self._mem, SEQ_MAIN, self._S, -1)
            if not len(pos):
                return
            self._set_blob(self._layout.build(pos, k, v, SEQ_LOAD), SEQ_LOAD)
            llama_cpp.llama_memory_seq_cp(self._mem, SEQ_LOAD, SEQ_MAIN, -1, -1)
            llama_cpp.llama_memory_seq_rm(self._mem, SEQ_LOAD, -1, -1)
        else:
            llama_cpp.llama_memory_clear(self._mem, True)
            if len(pos):
                self._set_blob(self._layout.build(pos, k, v, SEQ_MAIN), SEQ_MAIN)

    def _select(self, b: int, win_lo: int, out_k: np.ndarray, out_v: np.ndarray) -> None:
        """Per (layer, KV head): the b best live entries of [sinks, win_lo) among the clusters
        kvtier fetches for the GQA group's recent queries, in position order, written to
        out_k/out_v [L, b, H, D]. kvtier is asked for overfetch x b entries (whole clusters);
        the exact scores against the same queries keep the best b."""
        if b == 0:
            return
        q = self._qcap.recent()
        if q is None:
            raise RuntimeError("internal: no captured queries to retrieve with")
        n_ids = self._ids.n
        others = n_ids - (win_lo - self._S)          # sinks, window, dead: fetched but not shown
        want = min(n_ids, math.ceil(b * self._overfetch) + others)
        with self._blas.limit(limits=1, user_api="blas"):
            self._select_heads(b, win_lo, q, want, out_k, out_v)

    def _select_heads(self, b, win_lo, q, want, out_k, out_v):
        L, H, D, g = self._n_layer, self._n_head_kv, self._layout.head_dim, self._g
        n_ids = self._ids.n
        id_pos, alive = self._ids.pos[:n_ids], self._ids.alive[:n_ids]
        for layer in range(L):
            colls = self._colls[layer]
            qgs = [np.ascontiguousarray(q[:, layer, h * g:(h + 1) * g].reshape(-1, D)) for h in range(H)]
            # one engine call for the layer's KV heads (GIL released); a head whose clusters hold
            # too few live candidates asks again alone with a doubled budget
            many = self._store.retrieve_many([(colls[h], qgs[h], want) for h in range(H)])
            for h in range(H):
                qg, req = qgs[h], want
                m = int(many.counts[h])
                ids, keys, values = many.ids[h, :m], many.keys[h, :m], many.values[h, :m]
                while True:
                    self._c["retrieves"] += 1
                    self._c["fetched_entries"] += len(ids)
                    p = id_pos[ids]
                    idx = np.flatnonzero(alive[ids] & (p >= self._S) & (p < win_lo))
                    if len(idx) >= b or req >= n_ids:
                        break
                    req = min(n_ids, 2 * req)
                    got = colls[h].retrieve(qg, budget=req)
                    ids, keys, values = got.ids, got.keys, got.values
                if len(idx) < b:
                    raise RuntimeError(f"internal: {colls[h].name} returned {len(idx)} "
                                       f"candidates for {b} slots with its whole content requested")
                if len(idx) > b:
                    score = (keys[idx].astype(np.float32) @ qg.T).max(axis=1)
                    idx = idx[np.argpartition(-score, b - 1)[:b]]
                idx = idx[np.argsort(p[idx], kind="stable")]
                out_k[layer, :, h] = keys[idx]
                out_v[layer, :, h] = values[idx]

    # -- rollbacks ---------------------------------------------------------------------------
    def _truncate(self, p: int) -> None:
        """Forgets positions >= p (Llama.generate rolls back to a common prefix)."""
        if p >= self._n:
            return
        self._ids.truncate(p)
        self._synced = min(self._synced, p)
        if p >= self._tail_lo or p <= self._S:
            # everything at positions >= p sits in its own cell: a plain removal is exact
            llama_cpp.llama_memory_seq_rm(self._mem, SEQ_MAIN, p, -1)
            if p <= self._S:
                self._slots, self._tail_lo = 0, self._S
            self._n = p
            self._cells = min(self._S, p) + self._slots + max(0, p - self._tail_lo)
            self._last_refresh = min(self._last_refresh, p)
        else:
            self._n = p
            self._stale = True
        self.n_tokens = min(self.n_tokens, p)
        if self._ids.dead >= 64 and self._ids.dead > self._ids.n - self._ids.dead:
            self._compact()

    def _compact(self) -> None:
        """Moves the live entries to fresh collections (the store cannot delete entries)."""
        live = np.flatnonzero(self._ids.alive[:self._ids.n])
        live = live[np.argsort(self._ids.pos[live], kind="stable")]
        old = self._colls
        self._gen = self._next_gen(self._session)
        self._colls = self._collections(self._session, self._gen)
        positions = self._ids.pos[live].copy()
        self._ids = _IdMap(self._logical_n_ctx)
        if len(live):
            for layer in range(self._n_layer):
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
        L, H, D = self._n_layer, self._n_head_kv, self._layout.head_dim
        fk = np.empty((L, len(ids), H, D), np.float16)
        fv = np.empty_like(fk)
        for layer in range(L):
            for h in range(H):
                fk[layer, :, h], fv[layer, :, h] = self._colls[layer][h].get(ids)
        return fk, fv

    def _rebuild(self) -> None:
        """Rebuilds the resident cells from the store after a rollback into the retrieved part."""
        n = self._n
        s = min(self._S, n)
        win_lo = max(self._S, n - self._W)
        b = self._slot_count(n, max(0, win_lo - self._S))
        fixed = np.concatenate([np.arange(s), np.arange(win_lo, n)]).astype(np.int64)
        fk, fv = self._fetch(fixed)
        shape = (self._n_layer, len(fixed) + b, self._n_head_kv, self._layout.head_dim)
        rk, rv = np.empty(shape, np.float16), np.empty(shape, np.float16)
        self._select(b, win_lo, rk[:, s:s + b], rv[:, s:s + b])
        rk[:, :s], rv[:, :s], rk[:, s + b:], rv[:, s + b:] = fk[:, :s], fv[:, :s], fk[:, s:], fv[:, s:]
        pos = np.concatenate([fixed[:s], np.arange(self._S, self._S + b), fixed[s:]]).astype(np.int32)
        self._load_resident(pos, rk, rv, keep_sinks=False)
        self._cells = len(pos)
        self._observe_cells()
        self._last_refresh, self._tail_lo, self._slots, self._stale = n, win_lo, b, False
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
        zstandard = _zstd()

        t0 = time.perf_counter()
        if self._stale:
            self._rebuild()
        if self._synced < self._n:
            pos, k, v = self._dump(self._synced, self._n)
            self._store_rows(pos, k, v)
            self._synced = self._n
        resident = self._seq_blob(SEQ_MAIN)
        n_ids = self._ids.n
        arrays = {
            "input_ids": np.ascontiguousarray(self.input_ids[:self.n_tokens], np.int32),
            "id_pos": self._ids.pos[:n_ids].copy(),
            "alive": self._ids.alive[:n_ids].copy(),
            "query": self._qcap.recent() if self._qcap.filled else np.zeros((0,), np.float32),
            # float16 planes: high bytes (sign, exponent) apart from low bytes compress far better
            "resident": _shuffle16(resident),
        }
        header = {
            "version": SESSION_VERSION, "session": self._session, "gen": self._gen, "model": self._fingerprint(),
            "sinks": self._S, "n_tokens": int(self.n_tokens), "n": self._n, "synced": self._synced,
            "last_refresh": self._last_refresh, "tail_lo": self._tail_lo, "slots": self._slots,
            "cells": self._cells, "n_ids": n_ids,
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
        if header["cells"] > self._dram:
            # fewer is fine: the next eval refreshes to this instance's own sizes first
            raise SessionError(f"{path}: {header['cells']} resident cells do not fit dram_tokens={self._dram}")
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
        llama_cpp.llama_memory_clear(self._mem, True)
        self._session, self._gen, self._colls, self._ids = name, header["gen"], colls, ids
        self._n, self._synced = header["n"], header["synced"]
        self._last_refresh, self._tail_lo = header["last_refresh"], header["tail_lo"]
        self._slots, self._cells, self._stale = header["slots"], header["cells"], False
        self.n_tokens = header["n_tokens"]
        self.input_ids[:self.n_tokens] = arrays["input_ids"]
        self._qcap.reset(arrays["query"] if arrays["query"].size else None)
        if len(resident) > 16:
            self._set_blob(resident, SEQ_MAIN)
        self._observe_cells()
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
        """llama.cpp cells (peak and now, against dram_tokens), KV bytes against a full context,
        refresh counts and times, and the kvtier store's DRAM and I/O figures: a
        :class:`kvtier.stats.Stats` (``.adapter``, ``.engine``, ``.cache``, ``.io``)."""
        cell = self._layout.cell_bytes
        allocated = llama_cpp.llama_n_ctx(self.ctx)
        r = max(self._c["refreshes"], 1)
        st = self._store.stats()
        own = {
            "kv_cells_peak": self._cells_peak,
            "kv_cells": self._cells_now(),
            "dram_tokens": self._dram,
            "kv_cells_allocated": allocated,
            "kv_bytes_per_cell": cell,
            "kv_bytes_peak": self._cells_peak * cell,
            "kv_bytes_allocated": allocated * cell,
            "full_context_tokens_peak": self._n_peak,
            "full_context_kv_bytes": self._n_peak * cell,
            "n_tokens": int(self.n_tokens),
            "slots": self._slots,
            "slots_max": self._B_max,
            "mean_slots": self._c["visible_slots"] / r,
            "stored_entries": self._ids.n,
            "dead_entries": self._ids.dead,
            "fetched_per_retrieve": self._c["fetched_entries"] / max(self._c["retrieves"], 1),
            **self._c,
            "seconds": dict(self._t),
            "session": self._session,
        }
        # the store's figures, grouped beside the adapter's (engine, cache, io); "store" keeps them
        # as one dict for older scripts
        return Stats({**own, **{k: v for k, v in st.items() if k not in own}, "store": st},
                     adapter_keys=own, hidden=("store",))

    def close(self) -> None:
        store, owns = getattr(self, "_store", None), getattr(self, "_owns_store", None)
        try:
            if hasattr(self, "_stack"):
                super().close()
        finally:
            if store is not None and owns and not store.closed:
                store.close()
            if owns == "temp":
                shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._owns_store = None
