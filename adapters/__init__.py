"""Bindings of kvtier into decoding stacks, installed as ``kvtier.adapters``.

Each adapter imports kvtier (never the reverse) and imports its framework lazily, so that
``import kvtier`` never pulls in torch or llama.cpp.
"""
