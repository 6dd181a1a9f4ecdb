"""llama.cpp decoding with a bounded KV cache and the whole history in kvtier.

    from kvtier.adapters.llama_cpp import TieredLlama
    llm = TieredLlama("model.gguf", budget=0.25, dram_tokens=1024)
    print(llm("Once upon a time", max_tokens=64)["choices"][0]["text"])

See :mod:`kvtier.adapters.llama_cpp.tiered` for how it works and what it costs. llama-cpp-python
is imported only when ``TieredLlama`` is first used (``pip install 'kvtier[llama]'``).
"""
from __future__ import annotations

__all__ = ["TieredLlama", "UnsupportedModelError", "SessionError"]


def __getattr__(name):
    if name in __all__:
        try:
            from kvtier.adapters.llama_cpp import tiered
        except ImportError as e:
            if getattr(e, "name", None) in ("llama_cpp", "threadpoolctl"):
                raise ImportError(f"kvtier.adapters.llama_cpp needs llama-cpp-python and threadpoolctl "
                                  f"(pip install 'kvtier[llama]'): {e}") from e
            raise
        return getattr(tiered, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
