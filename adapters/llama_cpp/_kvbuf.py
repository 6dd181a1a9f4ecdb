"""llama.cpp's KV cache buffers as numpy arrays: read and write one (layer, KV head) of a cell.

Invariants:
1. The arrays are views of the cache tensors of one llama context (``cache_k_l<il>``,
   ``cache_v_l<il>``, found by ``_graph.GraphHook`` in a probe decode); they are valid until that
   context is freed, and are dropped with it (``TieredLlama._new_context``).
2. Only float16 caches of one stream on the CPU backend are mapped (TieredLlama refuses the
   rest); K is ``[cells, n_head_kv * head_dim]``; V the same, or ``[n_head_kv * head_dim, cells]``
   when llama.cpp stores it transposed (no flash attention), as the state blob says.
3. Writes happen only between graph computations (before a decode or inside the eval callback,
   when no ggml thread runs), and only into cells whose metadata (position, sequence) the
   adapter owns: llama.cpp never learns of them and never needs to, since a cell's K and V are
   only read by attention.
4. A cell is located by what it holds: cells loaded from a state blob carry a tag (two NaN bit
   patterns and their index) in layer 0's first K elements until :meth:`locate` has found them
   and the real row is written back; a finite K never carries a NaN.
"""
from __future__ import annotations

import ctypes

import numpy as np

from ._graph import GGML_TYPE_F16, CacheTensor
from ._state import KVLayout

TAG0 = 0x7E4B          # float16 NaN bit patterns: a real (finite) key never has them
TAG1_BASE = 0x7C00     # | a nonce in 1..1023 (the mantissa of a NaN must be non-zero)


class KVBufferError(RuntimeError):
    """The cache tensors found in the graph do not have the layout the adapter writes."""


def _view(t: CacheTensor, what: str, layer: int, rows: int, cols: int) -> np.ndarray:
    if t.type != GGML_TYPE_F16:
        raise KVBufferError(f"{what} cache of layer {layer} has ggml type {t.type}, float16 expected")
    if t.ne[2] != 1 or t.ne[3] != 1:
        raise KVBufferError(f"{what} cache of layer {layer} has {t.ne[2]} streams, one (a unified cache) expected")
    n = t.ne[0] * t.ne[1]
    if n != rows * cols or t.nb[0] != 2 or t.nb[1] != 2 * t.ne[0]:
        raise KVBufferError(f"{what} cache of layer {layer}: shape {t.ne[:2]} strides {t.nb[:2]} do not hold "
                            f"{rows} x {cols} float16")
    a = np.ctypeslib.as_array(ctypes.cast(t.data, ctypes.POINTER(ctypes.c_uint16)), shape=(n,))
    return a.view(np.float16).reshape(rows, cols)


def cache_rows(t: CacheTensor, layer: int, cells: np.ndarray, row: int) -> np.ndarray:
    """A copy of the K rows of ``cells`` in one layer's cache tensor ([len(cells), row])."""
    return _view(t, "K", layer, t.ne[0] * t.ne[1] // row, row)[cells].copy()


class KVBuffers:
    """K and V of every layer of one context, by cell index."""

    def __init__(self, layout: KVLayout, k_tensors: dict, v_tensors: dict):
        L, R = layout.n_layer, layout.row
        missing = sorted(set(range(L)) - set(k_tensors) | set(range(L)) - set(v_tensors))
        if missing:
            raise KVBufferError(f"the graph showed no K/V cache tensor for layers {missing[:8]}")
        self.layout = layout
        self.n_cells = k_tensors[0].ne[1]
        self.k = [_view(k_tensors[i], "K", i, self.n_cells, R) for i in range(L)]
        if layout.v_trans:
            self.v = [_view(v_tensors[i], "V", i, R, self.n_cells) for i in range(L)]
        else:
            self.v = [_view(v_tensors[i], "V", i, self.n_cells, R) for i in range(L)]
        self._nonce = 0

    def read(self, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """K, V [n_layer, len(cells), n_head_kv, head_dim] float16 of the given cells."""
        lay = self.layout
        shape = (lay.n_layer, len(cells), lay.n_head_kv, lay.head_dim)
        k, v = np.empty(shape, np.float16), np.empty(shape, np.float16)
        for i in range(lay.n_layer):
            k[i] = self.k[i][cells].reshape(shape[1:])
            v[i] = (self.v[i][:, cells].T if lay.v_trans else self.v[i][cells]).reshape(shape[1:])
        return k, v

    def write(self, layer: int, head: int, cells: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
        """Sets head ``head`` of layer ``layer`` in ``cells`` to k, v [len(cells), head_dim]."""
        d = self.layout.head_dim
        lo = head * d
        self.k[layer][cells, lo:lo + d] = k
        if self.layout.v_trans:
            self.v[layer][lo:lo + d, cells] = v.T
        else:
            self.v[layer][cells, lo:lo + d] = v

    def write_heads(self, layer: int, heads: np.ndarray, cells: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
        """Sets head ``heads[i]`` of cell ``cells[i]`` in layer ``layer`` to k[i], v[i] ([m, head_dim])."""
        lay = self.layout
        H, D = lay.n_head_kv, lay.head_dim
        self.k[layer].reshape(self.n_cells, H, D)[cells, heads] = k
        if lay.v_trans:
            self.v[layer].reshape(H, D, self.n_cells)[heads, :, cells] = v
        else:
            self.v[layer].reshape(self.n_cells, H, D)[cells, heads] = v

    def write_cells(self, cells: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
        """Sets every layer and head of ``cells`` to k, v [n_layer, len(cells), n_head_kv, head_dim]."""
        lay = self.layout
        m = len(cells)
        for i in range(lay.n_layer):
            self.k[i][cells] = k[i].reshape(m, lay.row)
            if lay.v_trans:
                self.v[i][:, cells] = v[i].reshape(m, lay.row).T
            else:
                self.v[i][cells] = v[i].reshape(m, lay.row)

    # -- locating cells loaded from a blob ----------------------------------------------------
    def tag(self, k: np.ndarray) -> np.ndarray:
        """k [n_layer, m, ...] with layer 0's rows replaced by tags; returns the tagged copy of
        layer 0 for :meth:`locate` (the caller builds its blob from the tagged ``k``)."""
        self._nonce = self._nonce % 1023 + 1
        m = k.shape[1]
        if m >= 1 << 32:
            raise ValueError("too many cells to tag")
        real0 = k[0].copy()
        t = k[0].reshape(m, -1).view(np.uint16)
        t[:, 0] = TAG0
        t[:, 1] = TAG1_BASE | self._nonce
        idx = np.arange(m, dtype=np.uint32)
        t[:, 2] = idx & 0xFFFF
        t[:, 3] = idx >> 16
        return real0

    def locate(self, real0: np.ndarray) -> np.ndarray:
        """Cell index of each tagged row (in tag order), after the blob was loaded; writes the
        real layer-0 K rows back. Raises KVBufferError unless every tag is found exactly once."""
        m = len(real0)
        rows = self.k[0].view(np.uint16)
        hit = np.flatnonzero((rows[:, 0] == TAG0) & (rows[:, 1] == (TAG1_BASE | self._nonce)))
        which = rows[hit, 2].astype(np.int64) | (rows[hit, 3].astype(np.int64) << 16)
        if len(hit) != m or not np.array_equal(np.sort(which), np.arange(m)):
            raise KVBufferError(f"{len(hit)} tagged cells found for {m} loaded")
        cells = np.empty(m, np.int64)
        cells[which] = hit
        self.k[0][cells] = real0.reshape(m, -1)
        return cells
