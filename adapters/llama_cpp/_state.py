"""llama.cpp per-sequence state blobs (``llama_state_seq_get_data`` / ``set_data``) as numpy.

The blob is llama.cpp's own serialisation of the KV cells of one sequence (llama-kv-cache.cpp,
``state_write``): a header, one metadata record per cell in cell-index order, then for every
layer the K rows of those cells, then the V rows (or, when V is stored transposed, one row per
V channel holding every cell). Parsing it gives the exact bytes llama.cpp attends over
(post-RoPE K, V, as stored); building it lets any set of rows become cells again. Only the
layout of one unified stream with float16 K and V and no per-cell extension (M-RoPE, PLE) is
accepted; :meth:`KVLayout.from_probe` checks a real blob against that and says what differs.

A model with sliding-window layers has an iSWA cache: two KV caches, the global layers' and
the sliding layers'. Its blob is the header (magic, seq_id) once, then the global cache's
state (from n_stream on, as below), then the sliding cache's; with
``LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY`` it is the header and the sliding cache's state alone,
and setting such a blob replaces the sequence's cells in the sliding cache only.
:class:`KVLayout` describes the global part; :func:`state_end` and :func:`trailing_state`
find where a part ends.

Layout (little endian)::

    u32 magic 0xaf143cd8 | i32 seq_id | u32 n_stream (=1) | u32 n_cells
    n_cells x (i32 pos | u32 n_seq_id (=1) | i32 seq_id)
    u32 v_trans | u32 n_layer
    n_layer x (i32 k_type | u64 k_row_bytes | n_cells x k_row)
    not v_trans: n_layer x (i32 v_type | u64 v_row_bytes | n_cells x v_row)
    v_trans:     n_layer x (i32 v_type | u32 v_elem_bytes | u32 n_embd_v | n_embd_v x n_cells x elem)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAGIC = 0xAF143CD8
GGML_TYPE_F16 = 1
_META = np.dtype([("pos", "<i4"), ("n_seq", "<u4"), ("seq", "<i4")])


#: the state of a KV cache holding no cell of the sequence: n_stream 1, n_cells 0
EMPTY_STATE = np.array([1, 0], "<u4").view(np.uint8)


class StateFormatError(RuntimeError):
    """A llama.cpp state blob does not have the layout this adapter reads and writes."""


@dataclass(frozen=True)
class KVLayout:
    """Shape of one cell's K and V in the blob: ``n_layer`` x ``n_head_kv`` x ``head_dim``."""

    n_layer: int
    n_head_kv: int
    head_dim: int
    v_trans: bool

    @property
    def row(self) -> int:
        """Elements of one cell's K (or V) in one layer."""
        return self.n_head_kv * self.head_dim

    @property
    def cell_bytes(self) -> int:
        """Bytes one cell takes in llama.cpp's KV buffers (K and V, every layer)."""
        return self.n_layer * self.row * 2 * 2

    def blob_size(self, n: int) -> int:
        if n == 0:
            return 16
        return 16 + n * _META.itemsize + 8 + self.n_layer * (12 + 12) + n * self.cell_bytes

    def cells_from_size(self, size: int) -> int:
        """Cell count of a sequence from ``llama_state_seq_get_size`` alone (no copy)."""
        if size <= 16:
            return 0
        fixed = 16 + 8 + self.n_layer * 24
        per = _META.itemsize + self.cell_bytes
        n, rest = divmod(size - fixed, per)
        if rest:
            raise StateFormatError(f"state size {size} is not a whole number of cells of {per} bytes")
        return n

    # -- reading -----------------------------------------------------------------------------
    @classmethod
    def from_probe(cls, blob: np.ndarray, n_layer: int | None, n_head_kv: int) -> KVLayout:
        """Derives (and checks) the layout from the blob of a one-cell sequence (of a hybrid
        model: its header and global part, :func:`trailing_state`). ``n_layer``: the layers
        expected in it (None: whatever it holds)."""
        b = np.ascontiguousarray(blob, dtype=np.uint8).data
        hdr = np.frombuffer(b[:16], dtype="<u4")
        if hdr[0] != MAGIC:
            raise StateFormatError(f"unknown state magic {hdr[0]:#x}")
        if hdr[2] != 1:
            raise StateFormatError(f"{hdr[2]} KV streams; a unified KV cache (one stream) is required")
        n = int(hdr[3])
        if n != 1:
            raise StateFormatError(f"the probe sequence holds {n} cells, 1 expected")
        off = 16 + _META.itemsize
        meta = np.frombuffer(b[16:off], dtype=_META)
        if meta["n_seq"][0] != 1:
            raise StateFormatError("cells carry a per-cell extension (M-RoPE or per-layer embeddings)")
        v_trans, nl = np.frombuffer(b[off:off + 8], dtype="<u4")
        if n_layer is not None and nl != n_layer:
            raise StateFormatError(f"the blob has {nl} layers with KV, the model {n_layer}: "
                                   "layers without their own KV (shared or cross-layer caches) are not supported")
        off += 8
        row = None
        for what in ("K", "V"):
            for layer in range(nl):
                typ = int(np.frombuffer(b[off:off + 4], dtype="<i4")[0])
                if what == "K" or not v_trans:
                    size = int(np.frombuffer(b[off + 4:off + 12], dtype="<u8")[0])
                    off += 12
                    elems = size // 2
                else:
                    el, elems = (int(x) for x in np.frombuffer(b[off + 4:off + 12], dtype="<u4"))
                    off += 12
                    size = el * elems
                    if el != 2:
                        typ = -1
                if typ != GGML_TYPE_F16:
                    raise StateFormatError(f"{what} cache of layer {layer} has ggml type {typ}; float16 is required "
                                           "(type_k/type_v must stay at their default)")
                if row is None:
                    row = elems
                if elems != row:
                    raise StateFormatError(f"layer {layer} has {what} rows of {elems} elements, layer 0 of {row}: "
                                           "per-layer KV widths (e.g. MLA or mixed heads) are not supported")
                off += size
        if off != len(b):
            raise StateFormatError(f"{len(b) - off} unexplained bytes at the end of the state blob")
        if row is None:
            raise StateFormatError("the state blob holds no layer")
        if row % n_head_kv:
            raise StateFormatError(f"K rows of {row} elements do not split into {n_head_kv} KV heads")
        return cls(n_layer=int(nl), n_head_kv=n_head_kv, head_dim=row // n_head_kv, v_trans=bool(v_trans))

    def parse(self, blob: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Positions [n] (int32) and K, V [n_layer, n, n_head_kv, head_dim] (float16), cells in
        the blob's order (llama.cpp's cell-index order)."""
        b = np.ascontiguousarray(blob, dtype=np.uint8)
        hdr = b[:16].view("<u4")
        if hdr[0] != MAGIC or hdr[2] != 1:
            raise StateFormatError("not a single-stream sequence state blob")
        n = int(hdr[3])
        L, H, D, R = self.n_layer, self.n_head_kv, self.head_dim, self.row
        if n == 0:
            z = np.empty((L, 0, H, D), np.float16)
            return np.empty(0, np.int32), z, z.copy()
        if len(b) != self.blob_size(n):
            raise StateFormatError(f"a blob of {n} cells should have {self.blob_size(n)} bytes, got {len(b)}")
        off = 16 + n * _META.itemsize
        pos = b[16:off].view(_META)["pos"].copy()
        off += 8
        per_layer = 12 + n * R * 2
        k = np.empty((L, n, R), np.float16)
        for layer in range(L):
            s = off + layer * per_layer + 12
            k[layer] = b[s:s + n * R * 2].view(np.float16).reshape(n, R)
        off += L * per_layer
        v = np.empty((L, n, R), np.float16)
        for layer in range(L):
            s = off + layer * per_layer + 12
            d = b[s:s + n * R * 2].view(np.float16)
            v[layer] = d.reshape(R, n).T if self.v_trans else d.reshape(n, R)
        return pos, k.reshape(L, n, H, D), v.reshape(L, n, H, D)

    # -- writing -----------------------------------------------------------------------------
    def build(self, pos: np.ndarray, k: np.ndarray, v: np.ndarray, seq_id: int = 0) -> np.ndarray:
        """The blob whose cells are ``pos[i]`` with K ``k[:, i]`` and V ``v[:, i]``, in order
        (``set_data`` places them in that order into free cells)."""
        n = len(pos)
        L, R = self.n_layer, self.row
        if k.shape[:2] != (L, n) or v.shape[:2] != (L, n):
            raise ValueError(f"k, v: shape ({L}, {n}, {self.n_head_kv}, {self.head_dim}) expected, "
                             f"got {k.shape} and {v.shape}")
        out = np.empty(self.blob_size(n), np.uint8)
        out[:16].view("<u4")[:] = (MAGIC, seq_id, 1, n)
        if n == 0:
            return out
        off = 16 + n * _META.itemsize
        meta = out[16:off].view(_META)
        meta["pos"] = pos
        meta["n_seq"] = 1
        meta["seq"] = seq_id
        out[off:off + 8].view("<u4")[:] = (int(self.v_trans), L)
        off += 8
        k2 = k.reshape(L, n, R)
        v2 = v.reshape(L, n, R)
        for layer in range(L):
            out[off:off + 4].view("<i4")[0] = GGML_TYPE_F16
            out[off + 4:off + 12].view("<u8")[0] = R * 2
            out[off + 12:off + 12 + n * R * 2].view(np.float16).reshape(n, R)[:] = k2[layer]
            off += 12 + n * R * 2
        for layer in range(L):
            out[off:off + 4].view("<i4")[0] = GGML_TYPE_F16
            if self.v_trans:
                out[off + 4:off + 12].view("<u4")[:] = (2, R)
                out[off + 12:off + 12 + n * R * 2].view(np.float16).reshape(R, n)[:] = v2[layer].T
            else:
                out[off + 4:off + 12].view("<u8")[0] = R * 2
                out[off + 12:off + 12 + n * R * 2].view(np.float16).reshape(n, R)[:] = v2[layer]
            off += 12 + n * R * 2
        return out


def state_end(blob: np.ndarray, off: int) -> int:
    """End offset of the single-stream KV state starting at ``off`` (at its n_stream)."""
    b = np.ascontiguousarray(blob, dtype=np.uint8)

    def u32(at: int, k: int = 1) -> np.ndarray:
        if at + 4 * k > len(b):
            raise StateFormatError(f"the state blob ends at {len(b)} bytes inside a KV state")
        return b[at:at + 4 * k].view("<u4")

    n_stream, n = (int(x) for x in u32(off, 2))
    if n_stream != 1:
        raise StateFormatError(f"{n_stream} KV streams; a unified KV cache (one stream) is required")
    if n == 0:
        return off + 8
    o = off + 8 + n * _META.itemsize
    v_trans, nl = (int(x) for x in u32(o, 2))
    o += 8
    for what in "KV":
        for _ in range(nl):
            if what == "K" or not v_trans:
                o += 12 + n * int(b[o + 4:o + 12].view("<u8")[0])
            else:
                el, ne = (int(x) for x in u32(o + 4, 2))
                o += 12 + el * ne * n
    if o > len(b):
        raise StateFormatError(f"the state blob ends at {len(b)} bytes inside a KV state of {n} cells")
    return o


def trailing_state(blob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A hybrid model's blob split into (header + global part, the sliding part's state)."""
    end = state_end(blob, 8)
    if state_end(blob, end) != len(blob):
        raise StateFormatError("a hybrid state blob should hold two KV states and nothing else")
    return blob[:end], blob[end:]


def with_header(state: np.ndarray, seq_id: int) -> np.ndarray:
    """A KV state (from n_stream on) behind a blob header, for ``llama_state_seq_set_data_ext``."""
    out = np.empty(8 + len(state), np.uint8)
    out[:8].view("<u4")[0] = MAGIC
    out[4:8].view("<i4")[0] = seq_id
    out[8:] = state
    return out
