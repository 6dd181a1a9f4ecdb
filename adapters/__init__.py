"""Bindings of kvtier into decoding stacks, installed as ``kvtier.adapters``.

Each adapter imports kvtier (never the reverse) and imports its framework lazily, so that
``import kvtier`` never pulls in torch or llama.cpp. What they share (the store they own and its
cleanup, the grid of collections per layer and KV head, per-layer adds and retrieves, the
counters' names) is :mod:`kvtier.adapters._core`; ``torch`` and ``llama_cpp`` keep only what binds
kvtier to their runtime.
"""
