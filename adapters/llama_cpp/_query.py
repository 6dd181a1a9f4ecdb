"""The decoding step's post-RoPE queries, read through llama.cpp's eval callback.

llama.cpp names the RoPE'd query of layer ``il`` ``Qcur-<il>`` (``cb(Qcur, "Qcur", il)`` in the
model graphs) and its op is ``GGML_OP_ROPE``. The scheduler calls the callback once per graph
node with ``ask=True`` ("do you want this tensor?") and, for the nodes we claim, again with
``ask=False`` once the tensor is computed; we then copy the last token's row [n_head, head_dim]
into a [n_layer, n_head, head_dim] float32 array. Every node costs one Python call in the ask
phase (about 37 per layer for Llama), which is the price of this route; it is measured in the
benchmark (tokens/s with and without the adapter).

``struct ggml_tensor`` is read through ctypes with the layout of ggml.h (checked against the
size the library reports where it can); op ids are looked up by name with ``ggml_op_name`` so
that a renumbered enum cannot silently break the match.
"""
from __future__ import annotations

import ctypes
import os
from typing import Optional

import numpy as np

GGML_MAX_DIMS = 4
GGML_MAX_SRC = 10
GGML_MAX_OP_PARAMS = 64
GGML_MAX_NAME = 64
GGML_TYPE_F32 = 0


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


def _ggml_base():
    import llama_cpp  # the package ships its ggml next to libllama

    libdir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll", "libggml.so"):
        p = os.path.join(libdir, name)
        if os.path.exists(p):
            return ctypes.CDLL(p)
    raise RuntimeError(f"cannot find ggml's base library in {libdir}: the query capture needs ggml_op_name")


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


class QueryCapture:
    """Holds the RoPE'd queries of the last ``keep`` decoded tokens: ``q[token, layer, head, :]``
    (a ring; ``filled`` rows are valid, in no particular order).

    ``callback`` is the ctypes function to put in ``llama_context_params.cb_eval``; keep this
    object alive as long as the context is.
    """

    def __init__(self, n_layer: int, n_head: int, keep: int = 1):
        import llama_cpp

        self.n_layer, self.n_head, self.keep = n_layer, n_head, keep
        self.q: Optional[np.ndarray] = None     # [keep, n_layer, n_head, head_dim], on first use
        self.filled = 0
        self._next = 0                          # ring slot of the next token
        self._rows = np.zeros(0, np.int64)      # ring slots of the current ubatch's captured tokens
        self._tok = np.zeros(0, np.int64)       # which tokens of the ubatch they are
        self.seen = np.zeros(n_layer, dtype=bool)
        self.error: Optional[str] = None
        rope = ggml_op_id("ROPE")
        from_int = ctypes.c_int.from_address
        string_at = ctypes.string_at

        def cb(t, ask, _user):
            # Hot path: one call per graph node. Reject everything but RoPE nodes by op id
            # first (one int read), then by name.
            if from_int(t + _OP_OFF).value != rope:
                return False
            name = string_at(t + _NAME_OFF)
            if not name.startswith(b"Qcur-"):
                return False
            if ask:
                return True
            try:
                self._take(t, int(name[5:]))
            except Exception as e:  # never raise through C; report at the next check
                self.error = f"{type(e).__name__}: {e}"
            return True

        self.callback = llama_cpp.ggml_backend_sched_eval_callback(cb)

    def _take(self, t: int, layer: int):
        ten = GgmlTensor.from_address(t)
        if ten.type != GGML_TYPE_F32:
            raise RuntimeError(f"Qcur-{layer} has ggml type {ten.type}, float32 expected")
        d, h, n = ten.ne[0], ten.ne[1], ten.ne[2]
        if h != self.n_head or ten.ne[3] != 1:
            raise RuntimeError(f"Qcur-{layer} has shape {tuple(ten.ne)}, [head_dim, {self.n_head}, tokens] expected")
        if self.q is None:
            self.q = np.zeros((self.keep, self.n_layer, h, d), np.float32)
        m = min(n, self.keep)
        if layer == 0:
            # Layers arrive in order for each ubatch: layer 0 opens the ubatch's ring slots. A
            # prompt chunk contributes rows spread over the chunk (always its last token), so
            # the next retrieval sees what the whole chunk attended to, not only its tail.
            self._rows = (self._next + np.arange(m)) % self.keep
            self._tok = np.unique(np.linspace(n - 1, 0, m).round().astype(np.int64))
            self._next = (self._next + m) % self.keep
            self.filled = min(self.keep, self.filled + m)
        nb0, nb1, nb2 = ten.nb[0], ten.nb[1], ten.nb[2]
        for row, tok in zip(self._rows, self._tok):
            base = ten.data + nb2 * int(tok)
            if nb0 == 4 and nb1 == 4 * d:
                ctypes.memmove(self.q[row, layer].ctypes.data, base, h * d * 4)
            else:
                span = (h - 1) * nb1 + (d - 1) * nb0 + 4
                raw = np.frombuffer((ctypes.c_char * span).from_address(base), dtype=np.uint8)
                self.q[row, layer] = np.lib.stride_tricks.as_strided(raw.view(np.float32), (h, d), (nb1, nb0))
        self.seen[layer] = True

    def recent(self) -> Optional[np.ndarray]:
        """A copy of the valid rows: [rows, n_layer, n_head, head_dim]."""
        return None if self.q is None or not self.filled else self.q[:self.filled].copy()

    def reset(self, rows: Optional[np.ndarray] = None) -> None:
        """Empties the ring, or fills it with ``rows`` (as returned by :meth:`recent`)."""
        self.filled = 0
        self._next = 0
        if rows is not None and len(rows):
            if self.q is None:
                self.q = np.zeros((self.keep,) + rows.shape[1:], np.float32)
            m = min(len(rows), self.keep)
            self.q[:m] = rows[-m:]
            self.filled = m
            self._next = m % self.keep
