"""What TieredLlama sees of llama.cpp's compute graph, through the eval callback (``cb_eval``).

The scheduler calls the callback once per graph node with ``ask=True`` ("do you want this
tensor?") and, for the nodes claimed, again with ``ask=False`` once the tensor is computed,
before any later node runs. Three things are read that way (names from llama.cpp's graph
builders and KV cache):

1. ``Qcur-<il>`` (op ROPE): the RoPE'd queries of layer ``il`` for the ubatch's tokens. Claimed;
   when it is computed, layer ``il``'s attention has not run yet, so ``on_layer(il, q)`` can
   still change what that attention will read (TieredLlama writes the layer's retrieved
   entries into its slot cells there). The last ``keep`` tokens' rows are also kept (a ring).
2. The ubatch's destination cells: the SET_ROWS node writing ``cache_k_l<il>`` of layer
   ``cells_layer`` has the cell index of each token as its second source (``attn_inp_k_idxs``,
   int64, an input set before the graph runs). Read in the ask phase, never claimed. (A model
   with sliding-window layers has two caches, each with its own cells: the adapter reads those
   of a layer it tiers.)
3. With ``discover`` set (one probe decode per context), every ``cache_k_l<il>`` and
   ``cache_v_l<il>`` tensor met as a source: the KV cache's own buffers (``_kvbuf.py``), and
   every layer's destination cells (``layer_cells``).

Every node costs one Python call in the ask phase (about 37 per layer for Llama); the op id
is compared first (one int read) so that rejecting a node is cheap. ``struct ggml_tensor`` is
read with the layout of ggml.h; op ids are looked up by name (``ggml_op_name``) so that a
renumbered enum cannot silently break the match.
"""
from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

import numpy as np

GGML_MAX_DIMS = 4
GGML_MAX_SRC = 10
GGML_MAX_OP_PARAMS = 64
GGML_MAX_NAME = 64
GGML_TYPE_F32 = 0
GGML_TYPE_F16 = 1
GGML_TYPE_I64 = 27


class GgmlTensor(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * GGML_MAX_NAME),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


_OP_OFF = GgmlTensor.op.offset
_NAME_OFF = GgmlTensor.name.offset
_SRC_OFF = GgmlTensor.src.offset


def _ggml_base():
    import llama_cpp  # the package ships its ggml next to libllama

    libdir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll", "libggml.so"):
        p = os.path.join(libdir, name)
        if os.path.exists(p):
            return ctypes.CDLL(p)
    raise RuntimeError(f"cannot find ggml's base library in {libdir}: the graph hook needs ggml_op_name")


def ggml_op_id(op_name: str) -> int:
    lib = _ggml_base()
    lib.ggml_op_name.restype = ctypes.c_char_p
    lib.ggml_op_name.argtypes = [ctypes.c_int]
    for i in range(512):
        name = lib.ggml_op_name(i)
        if name is None:
            break
        if name.decode() == op_name:
            return i
        if name.decode() == "COUNT":
            break
    raise RuntimeError(f"ggml has no op named {op_name!r}")


class CacheTensor:
    """One layer's K or V cache tensor as the graph showed it: address, shape, strides, type."""

    __slots__ = ("data", "nb", "ne", "type")

    def __init__(self, t: GgmlTensor):
        self.data = int(t.data or 0)
        self.ne = tuple(int(x) for x in t.ne)
        self.nb = tuple(int(x) for x in t.nb)
        self.type = int(t.type)


class GraphHook:
    """The eval callback of a TieredLlama context (``callback`` goes into
    ``llama_context_params.cb_eval``; keep this object alive as long as the context).

    ``q`` holds the RoPE'd queries of the last ``keep`` tokens, ``q[row, layer, head, :]`` (a
    ring; ``filled`` rows are valid, in no particular order); ``last[layer]`` the latest token's
    (while a ubatch runs: for the layers it has not reached, the previous token's). ``cells`` are the destination
    cells of the last ubatch's tokens. ``on_layer(layer, q_ubatch)`` (q_ubatch: [tokens,
    n_head, head_dim] float32, valid during the call only) runs when a layer's queries are
    computed and before its attention; an exception there is kept in ``error`` (nothing may
    raise through C) and the caller checks it after the decode.
    """

    def __init__(self, n_layer: int, n_head: int, keep: int = 1):
        import llama_cpp

        self.n_layer, self.n_head, self.keep = n_layer, n_head, keep
        self.q: np.ndarray | None = None     # [keep, n_layer, n_head, head_dim], on first use
        self.last: np.ndarray | None = None  # [n_layer, n_head, head_dim]: each layer's latest token
        self.filled = 0
        self._next = 0                          # ring slot of the next token
        self._rows = np.zeros(0, np.int64)      # ring slots of the current ubatch's captured tokens
        self._tok = np.zeros(0, np.int64)       # which tokens of the ubatch they are
        self._before = 0                        # rows of earlier tokens valid during this ubatch
        self.seen = np.zeros(n_layer, dtype=bool)
        self.cells: np.ndarray | None = None
        self.cells_layer = 0
        self._cells_name = b"cache_k_l0"
        self.layer_cells: dict[int, np.ndarray] = {}
        self.error: str | None = None
        self.on_layer: Callable[[int, np.ndarray], None] | None = None
        self.discover = False
        self.k_tensors: dict[int, CacheTensor] = {}
        self.v_tensors: dict[int, CacheTensor] = {}
        self._want_cells = False
        rope, set_rows = ggml_op_id("ROPE"), ggml_op_id("SET_ROWS")
        from_int = ctypes.c_int.from_address
        from_ptr = ctypes.c_void_p.from_address
        string_at = ctypes.string_at

        def cb(t, ask, _user):
            # Hot path: one call per graph node. Reject by op id first (one int read).
            op = from_int(t + _OP_OFF).value
            if self.discover and ask:
                self._look_for_cache(t)
            if op == set_rows:
                if ask and self._want_cells:
                    self._read_cells(t)
                return False
            if op != rope:
                return False
            name = string_at(t + _NAME_OFF)
            if not name.startswith(b"Qcur-"):
                return False
            if ask:
                return True
            try:
                self._take(t, int(name[5:]))
            except Exception as e:  # never raise through C; reported after the decode
                if self.error is None:
                    self.error = f"{type(e).__name__}: {e}"
            return True

        self._from_ptr = from_ptr
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(cb)

    # -- graph reading ------------------------------------------------------------------------
    def _look_for_cache(self, t: int) -> None:
        ten = GgmlTensor.from_address(t)
        for s in ten.src:
            if not s:
                continue
            st = GgmlTensor.from_address(s)
            if st.view_src:
                continue
            name = st.name
            for prefix, where in ((b"cache_k_l", self.k_tensors), (b"cache_v_l", self.v_tensors)):
                if name.startswith(prefix) and name[len(prefix):].isdigit():
                    where[int(name[len(prefix):])] = CacheTensor(st)

    def _read_cells(self, t: int) -> None:
        ten = GgmlTensor.from_address(t)
        src = ten.src
        if not (src[1] and src[2]):
            return
        dst = GgmlTensor.from_address(src[2])
        base = GgmlTensor.from_address(dst.view_src) if dst.view_src else dst
        name = base.name
        if name != self._cells_name and not (self.discover and name.startswith(b"cache_k_l")):
            return
        idx = GgmlTensor.from_address(src[1])
        if idx.type != GGML_TYPE_I64 or idx.nb[0] != 8:
            self.error = self.error or f"the K cache's row indices have ggml type {idx.type}, int64 expected"
            return
        n = int(idx.ne[0])
        cells = np.ctypeslib.as_array(ctypes.cast(idx.data, ctypes.POINTER(ctypes.c_int64)), shape=(n,)).copy()
        if self.discover and name[9:].isdigit():
            self.layer_cells[int(name[9:])] = cells
        if name == self._cells_name:
            self.cells = cells
            self._want_cells = self.discover   # a probe reads every layer's

    def read_cells_of(self, layer: int) -> None:
        """The destination cells are read from ``layer``'s K cache from the next decode on."""
        self.cells_layer = layer
        self._cells_name = b"cache_k_l%d" % layer

    def _take(self, t: int, layer: int) -> None:
        ten = GgmlTensor.from_address(t)
        if ten.type != GGML_TYPE_F32:
            raise RuntimeError(f"Qcur-{layer} has ggml type {ten.type}, float32 expected")
        d, h, n = ten.ne[0], ten.ne[1], ten.ne[2]
        if h != self.n_head or ten.ne[3] != 1:
            raise RuntimeError(f"Qcur-{layer} has shape {tuple(ten.ne)}, [head_dim, {self.n_head}, tokens] expected")
        if self.q is None:
            self.q = np.zeros((self.keep, self.n_layer, h, d), np.float32)
            self.last = np.zeros((self.n_layer, h, d), np.float32)
        nb0, nb1, nb2 = ten.nb[0], ten.nb[1], ten.nb[2]
        if nb0 == 4 and nb1 == 4 * d and nb2 == 4 * d * h:
            cur = np.ctypeslib.as_array(ctypes.cast(ten.data, ctypes.POINTER(ctypes.c_float)), shape=(n, h, d))
        else:
            span = (n - 1) * nb2 + (h - 1) * nb1 + (d - 1) * nb0 + 4
            raw = np.frombuffer((ctypes.c_char * span).from_address(ten.data), dtype=np.uint8)
            cur = np.lib.stride_tricks.as_strided(raw.view(np.float32), (n, h, d), (nb2, nb1, nb0))
        m = min(n, self.keep)
        if layer == 0:
            self._before = min(self.filled, self.keep - m)   # earlier tokens' rows this ubatch keeps
            # Layers arrive in order for each ubatch: layer 0 opens the ubatch's ring slots. A
            # prompt chunk contributes rows spread over the chunk (always its last token).
            self._rows = (self._next + np.arange(m)) % self.keep
            self._tok = np.unique(np.linspace(n - 1, 0, m).round().astype(np.int64))
            self._next = (self._next + m) % self.keep
            self.filled = min(self.keep, self.filled + m)
        if self.on_layer is not None:
            # the previous tokens' rows, before this ubatch overwrites its ring slots
            self.on_layer(layer, cur)
        assert self.q is not None and self.last is not None  # allocated above; on_layer keeps them
        self.q[self._rows, layer] = cur[self._tok]
        self.last[layer] = cur[n - 1]
        self.seen[layer] = True

    # -- per decode ----------------------------------------------------------------------------
    def begin(self) -> None:
        """Called before each decode: the ubatch's destination cells are read afresh."""
        self.cells = None
        self._want_cells = True

    def previous(self, layer: int, rows: int) -> np.ndarray:
        """Up to ``rows`` queries of tokens before the current ubatch for ``layer``:
        [rows', n_head, head_dim] (rows' <= rows; none before anything was captured)."""
        k = min(rows, self._before)
        if self.q is None or k <= 0:
            return np.zeros((0, self.n_head, 1), np.float32)
        start = int(self._rows[0]) if len(self._rows) else self._next
        return self.q[(start - 1 - np.arange(k)) % self.keep, layer]

    def recent(self) -> np.ndarray | None:
        """A copy of the valid rows, oldest first: [rows, n_layer, n_head, head_dim]."""
        if self.q is None or not self.filled:
            return None
        return self.q[(self._next - self.filled + np.arange(self.filled)) % self.keep]   # oldest first

    def reset(self, rows: np.ndarray | None = None) -> None:
        """Empties the ring, or fills it with ``rows`` (as returned by :meth:`recent`)."""
        self.filled = 0
        self._next = 0
        self._before = 0
        self._rows = np.zeros(0, np.int64)
        if rows is not None and len(rows):
            if self.q is None:
                self.q = np.zeros((self.keep, *rows.shape[1:]), np.float32)
            m = min(len(rows), self.keep)
            self.q[:m] = rows[-m:]
            self.filled = m
            self._next = m % self.keep
