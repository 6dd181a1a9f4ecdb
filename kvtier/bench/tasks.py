"""Long-context tasks through the cache under test (RULER-style, CPU, offline): ``kvtier bench tasks``.

What a user sees of a KV cache is whether the model still finds and uses what is in its
context. Each case is a prompt of about ``length`` tokens built from text that ships with
Python (``pydoc_data.topics``, the W2 document) and a fixed seed, with one or more questions:

- ``niah_single``: one needle, "One of the special magic numbers for <key> is: <7 digits>.",
  planted at a random depth of the haystack; the question asks for the number.
- ``niah_multikey``: four needles of different keys; each key is asked in turn (one question
  per key, the other three are distractors).
- ``niah_multivalue``: two keys with four numbers each, at eight depths; each key is asked in
  turn for all its numbers (score: the share found; the other key's numbers are distractors).
  After each number the lead-in is fed again ("Another one of the special magic numbers for
  <key> is:"), four rounds at most.
- ``vt`` (variable tracking): two chains of five assignments each, "VAR ABCDE = 12345."
  then "VAR FGHIJ = VAR ABCDE." ... spread over the haystack; each chain's value is asked in
  turn: "find all variables that are assigned the value 12345" (score: the share of the
  chain's five names found).
- ``fwe`` (aggregation, frequent words extraction): the context is words of the document drawn
  from a Zipf distribution (exponent ``--fwe-alpha``); the question asks for the three most
  frequent (score: the share found).
- ``heldout``: not a question: a stretch of the document teacher-forced for ``--heldout-tokens``
  tokens after the prefill; NLL and top-1 agreement against full attention (ΔNLL, top-1).

Each case's context is prefilled ONCE, dense (``DynamicCache``, in chunks of ``--chunk``
tokens, through the model's body without the LM head); every method then starts from a copy
of that state (full attention: a copy of the DynamicCache; a TieredCache: ``prefill_from``,
which stores what its own prefill would). The question is fed one token at a time as decoding
steps and the answer decoded greedily, so every token that has to find the answer attends
through the cache under test. The answer is the decoded text up to its first line break (or
``max_tokens``); decoding stops as soon as every expected answer is in it. A question is
scored by the share of its expected strings that the answer contains (case-insensitive).

Methods: ``full`` (DynamicCache), ``llama.cpp`` (full attention in llama-cpp-python on the
model's GGUF, every cell kept: it prefills each case itself, once, and each question starts from
the end of that prefill), ``llama.cpp+<policy>@<budget>`` (TieredLlama on the same GGUF, its own
dense prefill once per case, each question rolled back to its end; on Gemma 3 its global layers
tiered, the sliding ones in llama.cpp's own cache), ``sink+window`` (TieredCache, budget 0) and
``<policy>@<budget>[:<cluster size>][+var][+est]`` (TieredCache with that store policy and
fetch budget, the first partition's clusters of that size instead of the store's 32 (the
largest twice that), clusters ranked by their expected attention rather than their mean key
(``+var``: the collections' ``score_temp`` set to the model's attention scale s, so a cluster
scores q.mean + s/2 sum_k q_k^2 var_k, its Gaussian log-mean-exp over s), with
``estimate=True``), e.g. ``adaptive@0.1``, ``adaptive@0.1:8``, ``adaptive@0.1+var``,
``adaptive@0.05+est``, ``none@0.1``.
TieredCache runs with ``--sinks`` + ``--window`` tokens in DRAM and an engine DRAM budget of
``--dram-share`` of the tiered layers' float16 KV at that length (at least 4 MiB).

Results: ``<out>/<name>.rows.jsonl`` (one line per case, question and method, appended as they
finish: a killed run resumes where it stopped), ``<name>.json`` and ``<name>.md`` (score per
task, length and method, the ratio to full attention, tok/s and DRAM held per length, the
acceptance checks) and ``plots/<name>.png`` (score against context length per method).
Before running, the cost of the grid is estimated from a short calibration (``--plan`` prints
it and stops); while running, a line per case gives the time spent and an ETA.

    kvtier bench tasks --model gemma3 --lengths 4096,8192,16384,32768 --cases 5 --out bench/results
    kvtier bench tasks --model smollm2 --lengths 1024,2048,4096,8000 --cases 5 --out bench/results
    kvtier bench tasks --model gemma3 --plan ...      # the cost estimate only
"""
from __future__ import annotations

import argparse
import atexit
import copy
import dataclasses
import fcntl
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import zlib
from collections.abc import Callable, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from kvtier.bench.runtime import body_of as _body
from kvtier.bench.runtime import global_kv_f16, load, prefill
from kvtier.bench.runtime import kv_bytes as dense_bytes
from kvtier.bench.runtime import peak_rss as _peak_rss
from kvtier.bench.runtime import rss as _rss
from kvtier.bench.tables import md_table
from kvtier.benchargs import show_defaults
from kvtier.config import POLICIES

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "vt", "fwe", "heldout")
#: the tasks whose answer is a fact stated somewhere in the context
RETRIEVAL = ("niah_single", "niah_multikey", "niah_multivalue", "vt")
DEFAULT_METHODS = ("full,sink+window,none@0.1,static@0.1,local@0.1,adaptive@0.1,adaptive@0.1+est,"
                   "none@0.05,static@0.05,local@0.05,adaptive@0.05,adaptive@0.05+est,static@0.1+est,"
                   "local@0.1+est,static@0.05+est,local@0.05+est")
MODELS = {"gemma3": 32768, "smollm2": 8192}  # name: context the model was trained for

# -- the prompts (RULER's wording, in plain completion form for base and small models) -------------

NIAH_HEADER = ("Some special magic numbers are hidden within the following text. Make sure to memorize "
               "them. I will quiz you about the numbers afterwards.\n")
NIAH_NEEDLE = "One of the special magic numbers for {key} is: {value}."
# the answer's lead-in repeats the needle's own words up to the value, so that the model can
# complete it (a 270M base model answers the first needle it saw to RULER's lead-in "The special
# magic number for <key> mentioned in the provided text is")
NIAH_QUESTION = ("\nWhat is the special magic number for {key} mentioned in the provided text?\n"
                 "One of the special magic numbers for {key} is:")
MV_QUESTION = ("\nWhat are all the special magic numbers for {key} mentioned in the provided text?\n"
               "One of the special magic numbers for {key} is:")
MV_NEXT = "\nAnother one of the special magic numbers for {key} is:"
VT_HEADER = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n")
VT_FIRST = "VAR {name} = {value}."
VT_NEXT = "VAR {name} = VAR {prev}."
VT_QUESTION = ("\nQuestion: What is the value of VAR {last}? Follow the chain of assignments back to a "
               "number.\nAnswer: VAR {last} = VAR")
VT_FOLLOW = " VAR {name} = VAR"
VT_LAST = " VAR {name} ="
FWE_HEADER = "Read the following text and track the frequency of each word.\n"
FWE_QUESTION = ("\nQuestion: What are the three most frequently appeared words in the above text? "
                "Answer: According to the text above, the three most frequently appeared words are:")
# keys of the needles: an adjective and a noun (about 2,500 pairs)
ADJECTIVES = ["ancient", "bitter", "brave", "calm", "clever", "cold", "curious", "damp", "eager", "early", "faint",
              "fancy", "fierce", "gentle", "gloomy", "golden", "grumpy", "hidden", "hollow", "humble", "icy", "jolly",
              "kind", "lazy", "lively", "lonely", "loud", "lucky", "mellow", "misty", "modest", "narrow", "noisy",
              "odd", "pale", "polite", "proud", "quiet", "rapid", "rough", "rusty", "shy", "silent", "silver", "sleepy",
              "smooth", "sour", "steady", "sticky", "stormy", "sunny", "tender", "tidy"]
NOUNS = ["anchor", "apple", "badger", "basket", "beacon", "bridge", "candle", "canyon", "castle", "cellar", "comet",
         "compass", "cottage", "crystal", "dolphin", "donkey", "falcon", "feather", "fiddle", "forest", "fountain",
         "garden", "glacier", "harbor", "helmet", "island", "kettle", "ladder", "lantern", "lemon", "meadow", "mirror",
         "needle", "orchard", "otter", "parrot", "pebble", "pillow", "planet", "puzzle", "quarry", "rabbit", "river",
         "saddle", "spider", "teapot", "thimble", "tulip", "violin", "walnut", "wizard"]
FILLER_WORD = re.compile(r"\b[a-z]{4,9}\b")
VT_CHAIN = 4  # variables per chain: three hops from the asked one, then its value
VT_NAME = re.compile(r"\b([A-Z]{5})\b")
VT_VALUE = re.compile(r"\b(\d{5})\b")


@dataclasses.dataclass
class Question:
    """One question about a case's context: the text fed as decoding steps, the strings whose
    presence in the answer scores it, the most tokens its answer may take (per round).

    ``kind``: "line" (one answer, up to its first line break); "repeat" (``len(answers)``
    rounds: after each answer, ``follow`` is fed and the model answers again: the multi-value
    needle); "chain" (variable tracking, one hop per round: the model completes "VAR X =" with
    "VAR Y." or a number; the next round feeds " VAR Y =" with the name the model wrote, so a
    wrong hop is followed as the model wrote it; ``follow`` is that template)."""
    cue: str
    answers: list
    max_tokens: int
    kind: str = "line"
    follow: str = ""


@dataclasses.dataclass
class Case:
    task: str
    length: int
    index: int
    seed: int
    context: str
    questions: list
    notes: dict


def case_seed(task: str, length: int, index: int, base: int) -> int:
    """A seed of its own per task, length and case (stable across runs and processes)."""
    return zlib.crc32(f"{base}:{task}:{length}:{index}".encode())


class Haystack:
    """The document (``pydoc_data.topics``, its topics in sorted order) as lines with their token
    counts under one tokenizer, so that a context of a given token length is cut without
    tokenizing it again and again."""

    def __init__(self, tokenizer):
        try:
            from pydoc_data.topics import topics
        except ImportError:
            raise RuntimeError("the tasks' text is CPython's pydoc_data.topics, missing from this Python") from None
        text = "\n".join(topics[k] for k in sorted(topics))
        self.text = text
        self.lines = [ln for ln in text.split("\n") if ln.strip()]
        enc = tokenizer(self.lines, add_special_tokens=False).input_ids if _batch_ok(tokenizer) else \
            [tokenizer(ln, add_special_tokens=False).input_ids for ln in self.lines]
        self.tokens = np.array([len(e) + 1 for e in enc], np.int64)  # +1: the line break
        self.words = sorted(set(FILLER_WORD.findall(text)))
        self.ids: list | None = None  # the whole text's tokens, when a heldout case needs them

    def take(self, rng, n_tokens: int) -> list:
        """Consecutive lines from a random start (wrapping around) adding up to about n_tokens."""
        out, total = [], 0
        i = int(rng.integers(len(self.lines)))
        while total < n_tokens:
            out.append(self.lines[i])
            total += int(self.tokens[i])
            i = (i + 1) % len(self.lines)
        if len(out) > 1 and total - n_tokens > n_tokens * 0.02:
            out.pop()
        return out


def _batch_ok(tokenizer) -> bool:
    try:
        r = tokenizer(["a", "b"], add_special_tokens=False).input_ids
        return isinstance(r, list) and len(r) == 2 and isinstance(r[0], list)
    except Exception:
        return False


def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def _insert(lines: list, items: list, depths) -> str:
    """The lines with each item placed before the line at its relative depth."""
    at: dict[int, list] = {}
    for item, d in zip(items, depths, strict=True):
        at.setdefault(min(len(lines), round(d * len(lines))), []).append(item)
    out = []
    for i in range(len(lines) + 1):
        out += at.get(i, [])
        if i < len(lines):
            out.append(lines[i])
    return "\n".join(out)


def _keys(rng, n: int) -> list:
    pairs: set[str] = set()
    while len(pairs) < n:
        pairs.add(f"{ADJECTIVES[rng.integers(len(ADJECTIVES))]}-{NOUNS[rng.integers(len(NOUNS))]}")
    return sorted(pairs, key=lambda _: rng.random())


def _number(rng) -> str:
    return str(int(rng.integers(1_000_000, 10_000_000)))


def _var(rng, taken: set) -> str:
    while True:
        v = "".join(chr(65 + int(c)) for c in rng.integers(0, 26, 5))
        if v not in taken:
            taken.add(v)
            return v


def make_case(task: str, length: int, index: int, tokenizer, hay: Haystack, base_seed: int = 0,
              reserve: int = 160, fwe_alpha: float = 2.0) -> Case:
    """Case ``index`` of ``task`` at ``length`` tokens: the context (to be prefilled) and its
    questions. ``reserve`` tokens are left for the question and the answer."""
    if task not in TASKS:
        raise ValueError(f"task: one of {TASKS} expected, got {task!r}")
    seed = case_seed(task, length, index, base_seed)
    rng = np.random.default_rng(seed)
    budget = length - reserve
    notes: dict = {}
    if task in ("niah_single", "niah_multikey", "niah_multivalue"):
        n_keys = {"niah_single": 1, "niah_multikey": 4, "niah_multivalue": 2}[task]
        n_vals = 4 if task == "niah_multivalue" else 1
        keys = _keys(rng, n_keys)
        values = {k: [_number(rng) for _ in range(n_vals)] for k in keys}
        needles = [NIAH_NEEDLE.format(key=k, value=v) for k in keys for v in values[k]]
        fixed = _n_tokens(tokenizer, NIAH_HEADER) + sum(_n_tokens(tokenizer, n) + 1 for n in needles)
        lines = hay.take(rng, max(budget - fixed, 16))
        depths = rng.uniform(0.0, 1.0, len(needles))
        order = rng.permutation(len(needles))
        needles = [needles[i] for i in order]
        context = NIAH_HEADER + _insert(lines, needles, depths)
        if task == "niah_multivalue":
            questions = [Question(MV_QUESTION.format(key=k), list(values[k]), 12, "repeat", MV_NEXT.format(key=k))
                         for k in keys]
        else:
            questions = [Question(NIAH_QUESTION.format(key=k), list(values[k]), 12) for k in keys]
        notes["depths"] = [float(d) for d in depths]
    elif task == "vt":
        taken: set = set()
        chains, stmts = [], []
        for _ in range(2):
            value = str(int(rng.integers(10_000, 100_000)))
            names = [_var(rng, taken) for _ in range(VT_CHAIN)]
            chains.append((value, names))
            stmts.append([VT_FIRST.format(name=names[0], value=value)]
                         + [VT_NEXT.format(name=names[i], prev=names[i - 1]) for i in range(1, VT_CHAIN)])
        fixed = _n_tokens(tokenizer, VT_HEADER) + sum(_n_tokens(tokenizer, s) + 1 for c in stmts for s in c)
        lines = hay.take(rng, max(budget - fixed, 16))
        items: list = []
        chain_depths: list = []
        for c in stmts:  # each chain in order, at increasing depths
            d = np.sort(rng.uniform(0.0, 1.0, len(c)))
            items += c
            chain_depths += list(d)
        context = VT_HEADER + _insert(lines, items, chain_depths)
        # asked from the last variable: the answers are the earlier names, then the value
        questions = [Question(VT_QUESTION.format(last=names[-1]), [*names[-2::-1], v], 10, "chain", VT_FOLLOW)
                     for v, names in chains]
        notes["depths"] = [float(d) for d in chain_depths]
    elif task == "fwe":
        vocab = list(rng.choice(hay.words, size=min(400, len(hay.words)), replace=False))
        ranks = np.arange(1, len(vocab) + 1, dtype=np.float64)
        p = ranks ** -fwe_alpha
        p /= p.sum()
        room = budget - _n_tokens(tokenizer, FWE_HEADER)
        drawn = rng.choice(len(vocab), size=max(16, room), p=p)  # every word is at least one token
        lines, total = [], 0
        for i in range(0, len(drawn), 16):  # lines of 16 words while they fit
            line = " ".join(vocab[j] for j in drawn[i:i + 16])
            total += _n_tokens(tokenizer, line) + 1
            if total > room and lines:
                break
            lines.append(line)
        drawn = drawn[:16 * len(lines)]
        counts = np.bincount(drawn, minlength=len(vocab))
        top = [str(vocab[i]) for i in np.argsort(-counts, kind="stable")[:3]]
        body = "\n".join(lines)
        context = FWE_HEADER + body
        questions = [Question(FWE_QUESTION, top, 16)]
        notes["top_counts"] = [int(c) for c in np.sort(counts)[::-1][:4]]
    else:  # heldout: the document itself; the question slot carries the continuation
        if hay.ids is None:  # tokenized once per run
            hay.ids = tokenizer(hay.text, add_special_tokens=False).input_ids
        ids = hay.ids
        start = int(rng.integers(0, max(1, len(ids) - length - 1)))
        context = tokenizer.decode(ids[start:start + budget])
        follow = tokenizer.decode(ids[start + budget:start + budget + reserve])
        questions = [Question(follow, [], 0)]
        notes["start"] = start
    return Case(task, length, index, seed, context, questions, notes)


def score(answer: str, expected: Sequence[str]) -> float:
    """The share of ``expected`` strings found in ``answer`` (case-insensitive); RULER's
    string-match-all."""
    if not expected:
        return float("nan")
    a = answer.lower()
    return sum(e.lower() in a for e in expected) / len(expected)


def answer_text(text: str) -> str:
    """The answer: the decoded text up to its first line break after some content."""
    s = text.lstrip()
    cut = s.find("\n")
    return s if cut < 0 else s[:cut]


# -- methods ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    policy: str | None = None  # None: full attention (DynamicCache)
    budget: float = 0.0
    estimate: bool = False
    cluster: int = 0  # the collections' first-partition cluster size (0: the store's default)
    variance: bool = False  # clusters ranked by their expected attention (score_temp: the model's scale)
    llama: bool = False  # through llama.cpp (LLAMA_CPP: every cell kept; else TieredLlama)

    @property
    def tiered(self) -> bool:
        return self.name not in ("full", LLAMA_CPP)


#: full attention in llama.cpp (llama-cpp-python, every cell kept: its own prefill, not the dense one)
LLAMA_CPP = "llama.cpp"


def parse_method(text: str) -> Method:
    t = text.strip()
    if t in ("full", LLAMA_CPP):
        return Method(t, llama=t == LLAMA_CPP)
    if t.startswith(LLAMA_CPP + "+"):  # TieredLlama: llama.cpp's cells bounded, the history in kvtier
        inner = parse_method(t[len(LLAMA_CPP) + 1:])
        if inner.name == "sink+window" or inner.estimate or inner.variance or inner.cluster:
            raise ValueError(f"method {t!r}: {LLAMA_CPP}+<policy>@<budget> expected (TieredLlama takes no "
                             f"cluster size, +var or +est here)")
        return dataclasses.replace(inner, name=t, llama=True)
    if t == "sink+window":
        return Method(t, policy="adaptive", budget=0.0)
    m = re.fullmatch(r"([a-z]+)@([0-9.]+)(?::([0-9]+))?(\+var)?(\+est)?", t)
    if not m or m.group(1) not in POLICIES:
        raise ValueError(f"method {t!r}: 'full', '{LLAMA_CPP}', 'sink+window', "
                         f"<policy>@<budget>[:<cluster size>][+var][+est] with a policy of {POLICIES} "
                         f"or {LLAMA_CPP}+<policy>@<budget> expected")
    cluster = int(m.group(3) or 0)
    if m.group(3) and (m.group(1) == "none" or not 2 <= cluster <= 4096):
        raise ValueError(f"method {t!r}: a cluster size in [2, 4096] of a clustering policy expected")
    budget = float(m.group(2))
    if not 0 < budget <= 1:
        raise ValueError(f"method {t!r}: a budget in (0, 1] expected")
    if (m.group(4) or m.group(5)) and m.group(1) == "none":
        raise ValueError(f"method {t!r}: the none policy has no clusters to rank by variance or to estimate")
    return Method(t, policy=m.group(1), budget=budget, estimate=bool(m.group(5)), cluster=cluster,
                  variance=bool(m.group(4)))


# -- running ----------------------------------------------------------------------------------------

def make_cache(model, method: Method, dense, args):
    """A cache for ``method`` starting from the dense prefill ``dense`` (left unchanged)."""
    if not method.tiered:
        return copy.deepcopy(dense)
    from kvtier.adapters.torch import TieredCache

    n = dense.get_seq_length()
    dram = max(int(args.dram_share * global_kv_f16(model, n)), 4 << 20)
    cache = TieredCache(model, budget=method.budget, policy=method.policy, sinks=args.sinks, window=args.window,
                        dram_budget=dram, device=args.device, direct_io=False, estimate=method.estimate,
                        collection_options=cluster_options(method.cluster,
                                                           attention_scale(model) if method.variance else 0))
    try:
        cache.prefill_from(dense)
    except BaseException:
        cache.close()
        raise
    return cache


def cluster_options(size: int, score_temp: float = 0.0) -> dict | None:
    """The collections' options: a first partition of ``size``-entry clusters (0: the store's
    default; the largest cluster stays twice the first size, as the store's defaults have it),
    and ``score_temp`` (0: off) to rank clusters by their expected attention."""
    out: dict = {}
    if size:
        out.update(init_cluster_size=size, max_cluster_size=2 * size)
    if score_temp:
        out["score_temp"] = float(score_temp)
    return out or None


def attention_scale(model) -> float:
    """The scale the model's attention applies to q.k (its attention modules' ``scaling``, e.g.
    Gemma 3's query_pre_attn_scalar ** -0.5), else 1/sqrt(head_dim)."""
    for mod in model.modules():
        if hasattr(mod, "layer_idx") and isinstance(getattr(mod, "scaling", None), float):
            return float(mod.scaling)
    cfg = model.config
    return float(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads) ** -0.5


class TorchSteps:
    """Decoding steps of a transformers model through ``cache``: ``feed`` a token (the body only,
    no LM head), or ``next`` a token and get the next token's logits."""

    def __init__(self, model, cache):
        self.model, self.body, self.cache = model, _body(model), cache

    def feed(self, t: int) -> None:
        import torch

        self.body(torch.tensor([[int(t)]]), cache=self.cache, use_cache=True)

    def next(self, t: int):
        import torch

        return self.model(torch.tensor([[int(t)]]), cache=self.cache, use_cache=True, logits_to_keep=1).logits[0, -1]


class LlamaSteps:
    """The same steps through a llama-cpp-python ``Llama`` (its context holds the case's prefill)."""

    def __init__(self, llm):
        self.llm = llm

    def feed(self, t: int) -> None:
        self.llm.eval([int(t)])

    def next(self, t: int):
        import llama_cpp
        import torch

        self.llm.eval([int(t)])
        ptr = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return torch.from_numpy(np.ctypeslib.as_array(ptr, shape=(self.llm.n_vocab(),)).copy())


def ask(model, tokenizer, cache, question: Question, steps_through=None) -> dict:
    """Feeds the question one token per step (the body only, but for its last token), then
    decodes greedily, round by round (see :class:`Question`); a round ends at its first
    line break or full stop after some content, at ``max_tokens``, or when every expected
    string is in the answer. Returns the answer, its score, steps and seconds.
    ``steps_through``: the steps to take (default ``TorchSteps(model, cache)``)."""
    import torch

    step = steps_through or TorchSteps(model, cache)
    eos = getattr(tokenizer, "eos_token_id", None)
    steps, answer_tokens = 0, 0
    parts: list[str] = []
    feed = question.cue
    pending: list[int] = []  # the last decoded token, not yet fed
    t0 = time.perf_counter()
    with torch.inference_mode():
        rounds = len(question.answers) if question.kind != "line" else 1
        for r in range(rounds):
            ids = pending + tokenizer(feed, add_special_tokens=False).input_ids
            for t in ids[:-1]:
                step.feed(t)
            steps += len(ids) - 1
            nxt, out, text = int(ids[-1]), [], ""
            for _ in range(question.max_tokens):
                nxt = int(step.next(nxt).argmax())
                out.append(nxt)
                text = tokenizer.decode(out)
                body_text = text.lstrip()
                if (nxt == eos or "\n" in body_text or score(" ".join([*parts, text]), question.answers) == 1.0
                        or (question.kind != "line" and body_text.endswith("."))):
                    break
            steps += len(out)
            answer_tokens += len(out)
            pending = [nxt]
            parts.append(answer_text(text))
            if score(" ".join(parts), question.answers) == 1.0 or nxt == eos:
                break
            if question.kind == "repeat":
                feed = question.follow
            elif question.kind == "chain":
                m = VT_NAME.search(parts[-1])
                if not m or VT_VALUE.search(parts[-1]):
                    break  # a number (the end of the chain, right or wrong) or no name to follow
                # the model's own answer closes the statement; the next hop starts from it
                last = r + 2 == rounds  # the chain's length is known (RULER states it too): its end is a number
                feed = (("" if parts[-1].rstrip().endswith(".") else ".")
                        + (VT_LAST if last else question.follow).format(name=m.group(1)))
    secs = time.perf_counter() - t0
    ans = " | ".join(parts)
    return {"answer": ans, "score": score(ans, question.answers), "steps": steps,
            "answer_tokens": answer_tokens, "seconds": secs}


def teacher_force(model, cache, ids: Sequence[int], steps_through=None) -> dict:
    """Feeds ``ids`` one token per step; returns per-step log-probabilities of the next token
    and the argmax predictions."""
    import torch

    step = steps_through or TorchSteps(model, cache)
    nll, top = [], []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(len(ids) - 1):
            logits = step.next(ids[i]).float()
            lp = torch.log_softmax(logits, -1)
            nll.append(float(-lp[int(ids[i + 1])]))
            top.append(int(logits.argmax()))
    return {"nll": nll, "top": top, "steps": len(ids) - 1, "seconds": time.perf_counter() - t0}


_LLAMA: dict = {}


def _tokenizer(model_name: str):
    """The model's tokenizer alone (read from its GGUF, the same as ``load``'s)."""
    from transformers import AutoTokenizer

    from kvtier import models

    directory, name = os.path.split({"gemma3": models.gemma3_gguf, "smollm2": models.smollm2_gguf}[model_name]())
    return AutoTokenizer.from_pretrained(directory, gguf_file=name)


def llama_context(model_name: str, n_ctx: int, threads: int):
    """One llama-cpp-python ``Llama`` of the model's GGUF per process, with room for ``n_ctx``
    tokens (made again, larger, when a longer case needs it). Every cell is kept (``swa_full``:
    the sliding layers' masks still apply; a question's cells can then be dropped exactly)."""
    from llama_cpp import Llama

    from kvtier import models

    llm = _LLAMA.get(model_name)
    if llm is None or llm.n_ctx() < n_ctx:
        if llm is not None:
            llm.close()
        path = {"gemma3": models.gemma3_gguf, "smollm2": models.smollm2_gguf}[model_name]()
        if not _LLAMA:  # closed before the interpreter's teardown (llama-cpp-python's own __del__ then fails)
            atexit.register(lambda: [x.close() for x in _LLAMA.values()])
        llm = _LLAMA[model_name] = Llama(path, n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads,
                                         swa_full=True, logits_all=False, verbose=False, seed=1)
    return llm


def tiered_llama(model_name: str, method: Method, n_ctx: int, args):
    """A TieredLlama of the model's GGUF for ``method`` with a logical context of ``n_ctx``
    tokens: ``dram_tokens`` holds the sinks, the tail (on a model with sliding-window layers, at
    least the window: the adapter's docstring), its sync room and the budget's slots at
    ``n_ctx``; the store's DRAM is ``--dram-share`` of the tiered layers' float16 KV."""
    from kvtier import models
    from kvtier.adapters.llama_cpp import TieredLlama
    from kvtier.adapters.llama_cpp.tiered import DEFAULTS, SYNC_TOKENS

    path = {"gemma3": models.gemma3_gguf, "smollm2": models.smollm2_gguf}[model_name]()
    window = max(args.window, DEFAULTS["window"])
    kw = dict(n_ctx=n_ctx, n_batch=512, n_threads=args.threads, n_threads_batch=args.threads, verbose=False, seed=1)
    probe = TieredLlama(path, budget=0, dram_tokens=args.sinks + window + 512 + 64, sinks=args.sinks,
                        window=window, **kw)
    try:
        s = probe.stats()
        tail, per_token = s["window"], s["kv_bytes_per_cell"]
    finally:
        probe.close()
    slots = math.ceil(method.budget * n_ctx)
    dram = args.sinks + tail + max(SYNC_TOKENS, 64) + slots
    store_dram = max(int(args.dram_share * per_token * n_ctx), 4 << 20)
    return TieredLlama(path, budget=method.budget, dram_tokens=dram, policy=method.policy, sinks=args.sinks,
                       window=window, store_dram_budget=store_dram, device=args.device, direct_io=False, **kw)


def llama_memory(llm) -> dict:
    """The llama.cpp context's KV cells for the sequence (its state's size, every cell kept);
    of a TieredLlama, its cells (the tiered layers', the sliding layers') and the store's DRAM."""
    import llama_cpp

    if hasattr(llm, "stats") and callable(llm.stats):
        s = llm.stats()
        kv = s["kv_cells"] * s["kv_bytes_per_cell"] + s["swa_kv_bytes"]
        peak = s["decode_kv_cells_peak"] * s["kv_bytes_per_cell"] + s["swa_kv_bytes"]
        return {"dram_bytes": kv + s["dram_bytes"], "dram_peak_bytes": peak + s["dram_peak_bytes"],
                "engine_dram_bytes": s["dram_bytes"], "engine_dram_peak_bytes": s["dram_peak_bytes"],
                "adapter_dram_bytes": kv, "sliding_dram_bytes": s["swa_kv_bytes"], "slots": s["slots"],
                "fetched_per_retrieve": s["fetched_per_retrieve"], "read_bytes": s["read_bytes"],
                "modeled_io_seconds": s["modeled_io_seconds"]}
    b = int(llama_cpp.llama_state_seq_get_size(llm.ctx, 0))
    return {"dram_bytes": b, "dram_peak_bytes": b, "engine_dram_bytes": 0, "engine_dram_peak_bytes": 0}


def cache_memory(cache, method: Method) -> dict:
    if not method.tiered:
        b = dense_bytes(cache)
        return {"dram_bytes": b, "dram_peak_bytes": b, "engine_dram_bytes": 0, "engine_dram_peak_bytes": 0}
    s = cache.stats()
    keep = ("dram_bytes", "dram_peak_bytes", "engine_dram_bytes", "engine_dram_peak_bytes", "engine_dram_budget",
            "adapter_dram_bytes", "sliding_dram_bytes", "full_cache_bytes", "global_kv_float16_bytes",
            "fetched_per_retrieve", "estimated_per_retrieve", "read_bytes", "modeled_io_seconds", "retrieve_seconds")
    return {k: s[k] for k in keep if k in s}


class Rows:
    """The finished rows, one JSON line each, appended under a lock (several processes may share
    the file with ``--shard``) and read back to resume."""

    def __init__(self, path: str):
        self.path = path
        self.done: dict = {}
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        r = json.loads(line)
                    except json.JSONDecodeError:  # a line cut by a kill: that row is run again
                        continue
                    self.done[self.key(r)] = r

    @staticmethod
    def key(r: dict) -> tuple:
        return (r["model"], r["task"], r["length"], r["case"], r["question"], r["method"])

    def add(self, r: dict) -> None:
        line = json.dumps(r) + "\n"
        with open(self.path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                f.write(line)
                f.flush()
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
        self.done[self.key(r)] = r


def run_case(model, tokenizer, case: Case, methods: Sequence[Method], args, rows: Rows, model_name: str,
             log: Callable = print) -> dict:
    """Prefills ``case`` once and runs every (question, method) not in ``rows`` yet. Returns
    timings: prefill seconds and seconds per method."""
    todo = [(qi, m) for qi in range(len(case.questions)) for m in methods
            if (model_name, case.task, case.length, case.index, qi, m.name) not in rows.done]
    if not todo:
        return {"prefill_seconds": 0.0, "ran": 0}
    ids = tokenizer(case.context, add_special_tokens=True).input_ids
    # heldout: the context's last token is the first teacher-forced step (its logits predict
    # the continuation's first token), so the prefill stops before it
    pre = ids[:-1] if case.task == "heldout" else ids
    t0 = time.perf_counter()
    dense = prefill(model, pre, args.chunk) if any(not m.llama for _, m in todo) else None
    t_prefill = time.perf_counter() - t0
    # per llama.cpp method: its own prefill of this case, once (seconds), rolled back per question
    llama_prefill: dict = {}
    llamas: dict = {}  # the TieredLlama of each such method, closed with the case
    base = {"model": model_name, "task": case.task, "length": case.length, "case": case.index, "seed": case.seed,
            "context_tokens": len(ids), "prefill_seconds": t_prefill, "prefill_peak_rss": _peak_rss()}
    ref_top = {}
    if case.task == "heldout":  # full attention first: the others' top-1 is measured against it
        order = sorted(todo, key=lambda x: x[1].tiered)
        if order and order[0][1].tiered and (model_name, case.task, case.length, case.index, 0, "full") in rows.done:
            ref_top[0] = rows.done[(model_name, case.task, case.length, case.index, 0, "full")]["top"]
        todo = order
    try:
        for qi, m in todo:
            q = case.questions[qi]
            t1 = time.perf_counter()
            steps, extra = None, {}
            if m.llama:
                if m.name == LLAMA_CPP:
                    llm = llama_context(model_name, case.length + 1024, args.threads)
                else:
                    if m.name not in llamas:
                        llamas[m.name] = tiered_llama(model_name, m, case.length + 1024, args)
                    llm = llamas[m.name]
                cache, steps = None, LlamaSteps(llm)
                if m.name not in llama_prefill:
                    steps.llm.reset()
                    steps.llm.eval(list(pre))
                    llama_prefill[m.name] = time.perf_counter() - t1
                steps.llm.n_tokens = len(pre)  # back to the end of the prefill: eval drops the cells after it
                # its own prefill
                extra = {"prefill_seconds": llama_prefill[m.name], "dense_prefill_seconds": t_prefill}
            else:
                cache = make_cache(model, m, dense, args)
            t_build = time.perf_counter() - t1
            try:
                if case.task == "heldout":
                    follow = tokenizer(q.cue, add_special_tokens=False).input_ids[:args.heldout_tokens + 1]
                    got = teacher_force(model, cache, [ids[-1], *follow], steps)
                    res = {"nll": got["nll"], "top": got["top"], "steps": got["steps"], "seconds": got["seconds"],
                           "mean_nll": float(np.mean(got["nll"]))}
                    if m.name == "full":
                        ref_top[qi] = got["top"]
                    if qi in ref_top:
                        res["top1"] = float(np.mean(np.asarray(got["top"]) == np.asarray(ref_top[qi])))
                    res["score"] = float("nan")
                else:
                    res = ask(model, tokenizer, cache, q, steps)
                    res["expected"] = q.answers
                res.update(cache_memory(cache, m) if steps is None else llama_memory(steps.llm), **extra)
            finally:
                if m.tiered and cache is not None:
                    cache.close()
                del cache
            r = dict(base, question=qi, method=m.name, build_seconds=t_build, tok_s=res["steps"] / res["seconds"],
                     rss=_rss())
            r.update(res)
            rows.add(r)
            if case.task != "heldout":
                log(f"  {case.task} L={case.length} case {case.index} q{qi} {m.name}: {res['score']:.2f} "
                    f"{res['answer'][:40]!r} ({res['seconds']:.1f} s + build {t_build:.1f} s)")
    finally:
        for llm in llamas.values():
            llm.close()
    return {"prefill_seconds": t_prefill, "ran": len(todo)}


# -- planning -------------------------------------------------------------------------------------

@dataclasses.dataclass
class CostModel:
    """Seconds as a function of the context length: prefill a*L + b*L^2, a decoding step
    c + d*L (dense) or e + f*L (tiered), building a TieredCache g*L. Fitted on a short
    calibration run, then on the run's own timings as they come."""
    a: float
    b: float
    c: float
    d: float
    e: float
    f: float
    g: float

    def prefill(self, L):
        return self.a * L + self.b * L * L

    def question(self, L, method: Method, steps: int):
        if not method.tiered:
            return steps * (self.c + self.d * L) + 1e-9 * L
        return steps * (self.e + self.f * L) + self.g * L


def calibrate(model, tokenizer, hay: Haystack, args, log=print) -> CostModel:
    """Times prefills of two short contexts and a few decoding steps through each kind of
    cache, and fits :class:`CostModel` (a rough guide: the machine is shared)."""
    pts = {}
    rng = np.random.default_rng(0)
    steps = 6
    for L in (args.calibrate // 2, args.calibrate):
        ids = tokenizer("\n".join(hay.take(rng, L)), add_special_tokens=True).input_ids[:L]
        t0 = time.perf_counter()
        dense = prefill(model, ids[:-steps], args.chunk)
        tp = time.perf_counter() - t0
        c = make_cache(model, Method("full"), dense, args)
        td = _time_steps(model, c, ids[-steps:])
        t0 = time.perf_counter()
        c = make_cache(model, parse_method("adaptive@0.1"), dense, args)
        tb = time.perf_counter() - t0
        tt = _time_steps(model, c, ids[-steps:])
        c.close()
        pts[len(ids)] = (tp, td, tt, tb)
        log(f"calibration at {len(ids)} tokens: prefill {tp:.1f} s, step {td * 1e3:.0f} ms dense, "
            f"{tt * 1e3:.0f} ms tiered, TieredCache build {tb:.1f} s")
    (L1, (p1, d1, t1, _)), (L2, (p2, d2, t2, b2)) = sorted(pts.items())
    # prefill: a*L + b*L^2 through both points (b >= 0)
    b = max(0.0, (p2 / L2 - p1 / L1) / (L2 - L1))
    a = max(1e-9, p2 / L2 - b * L2)
    d = max(0.0, (d2 - d1) / (L2 - L1))
    f = max(0.0, (t2 - t1) / (L2 - L1))
    return CostModel(a, b, max(1e-4, d2 - d * L2), d, max(1e-4, t2 - f * L2), f, max(1e-6, b2 / L2))


def _time_steps(model, cache, ids) -> float:
    """Seconds per decoding step (with the LM head) over ``ids``, after one untimed step."""
    import torch

    with torch.inference_mode():
        model(torch.tensor([[int(ids[0])]]), cache=cache, use_cache=True, logits_to_keep=1)
        t0 = time.perf_counter()
        for t in ids[1:]:
            model(torch.tensor([[int(t)]]), cache=cache, use_cache=True, logits_to_keep=1)
    return (time.perf_counter() - t0) / max(1, len(ids) - 1)


def plan(cases: Sequence[Case], methods: Sequence[Method], cost: CostModel, tokenizer) -> dict:
    """Estimated seconds per (task, length) and in all."""
    out: dict = {}
    for c in cases:
        s = cost.prefill(c.length)
        for q in c.questions:
            steps = (len(tokenizer(q.cue, add_special_tokens=False).input_ids) + q.max_tokens // 2) \
                if c.task != "heldout" else 64
            s += sum(cost.question(c.length, m, steps) for m in methods)
        out[(c.task, c.length)] = out.get((c.task, c.length), 0.0) + s
    return out


# -- summary --------------------------------------------------------------------------------------

def _mean(v):
    v = [x for x in v if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(v)) if v else float("nan")


def summarize(rows: Sequence[dict], methods: Sequence[str]) -> dict:
    """Per (task, length, method): mean score (or ΔNLL and top-1 for heldout), questions,
    contexts; per (length, method): median tok/s and DRAM held."""
    cells: dict = {}
    full_nll = {(r["task"], r["length"], r["case"], r["question"]): r["mean_nll"]
                for r in rows if r["task"] == "heldout" and r["method"] == "full"}
    full_score = {(r["task"], r["length"], r["case"], r["question"]): r["score"]
                  for r in rows if r["task"] != "heldout" and r["method"] == "full"}
    for r in rows:
        k = (r["task"], r["length"], r["method"])
        c = cells.setdefault(k, {"scores": [], "contexts": set(), "dnll": [], "top1": [], "tok_s": [],
                                 "dram": [], "engine": [], "peak": [], "prefill": [], "rss": [], "full": []})
        if r["task"] != "heldout":  # full attention's score on the same questions (a method may run on fewer)
            c["full"].append(full_score.get((r["task"], r["length"], r["case"], r["question"])))
        if r["task"] == "heldout":
            ref = full_nll.get((r["task"], r["length"], r["case"], r["question"]))
            if ref is not None:
                c["dnll"].append(r["mean_nll"] - ref)
            if "top1" in r:
                c["top1"].append(r["top1"])
        else:
            c["scores"].append(r["score"])
        c["contexts"].add(r["case"])
        c["tok_s"].append(r["tok_s"])
        c["dram"].append(r.get("dram_bytes"))
        c["engine"].append(r.get("engine_dram_peak_bytes"))
        c["peak"].append(r.get("dram_peak_bytes"))
        c["prefill"].append(r["prefill_seconds"])
        c["rss"].append(r.get("prefill_peak_rss"))
    out = {}
    for (task, L, m), c in cells.items():
        out[f"{task}|{L}|{m}"] = {
            "task": task, "length": L, "method": m, "questions": len(c["scores"]) or len(c["dnll"]),
            "contexts": len(c["contexts"]), "score": _mean(c["scores"]),
            "full_score": _mean(c["full"]) if c["full"] and None not in c["full"] else float("nan"),
            "dnll": _mean(c["dnll"]), "dnll_se": float(np.std(c["dnll"]) / math.sqrt(len(c["dnll"])))
            if len(c["dnll"]) > 1 else float("nan"),
            "top1": _mean(c["top1"]), "tok_s": float(statistics.median(c["tok_s"])),
            "dram_bytes": _median([x for x in c["dram"] if x is not None]),
            "dram_peak_bytes": _median([x for x in c["peak"] if x is not None]),
            "engine_dram_peak_bytes": _median([x for x in c["engine"] if x is not None]),
            "prefill_seconds": _median(c["prefill"]),
            "prefill_peak_rss": max([x for x in c["rss"] if x is not None], default=None)}
    return out


def _median(v):
    return float(statistics.median(v)) if v else None


def _ordered(methods_seen, methods):
    return [m for m in methods if m in methods_seen] + sorted(set(methods_seen) - set(methods))


def acceptance(summ: dict, target_method: str = "adaptive@0.1", lengths=(8192, 16384, 32768),
               min_questions: int = 20, ratio: float = 0.95) -> list:
    """The issue's task claim, cell by cell: ``target_method`` >= ratio x full's score."""
    lines = []
    for task in RETRIEVAL:
        for L in lengths:
            f, t = summ.get(f"{task}|{L}|full"), summ.get(f"{task}|{L}|{target_method}")
            if not f or not t:
                continue
            n = t["questions"]
            fs = t["full_score"]  # full attention on the same questions
            r = t["score"] / fs if fs > 0 else float("nan")
            ok = (r >= ratio or (fs == 0 and t["score"] == 0)) and n >= min_questions
            lines.append(f"{task} at {L}: {target_method} {t['score']:.3f} vs full {fs:.3f} = {r:.2f}x "
                         f"over {n} questions ({t['contexts']} contexts): "
                         + ("met" if ok else "NOT met"
                            + ("" if n >= min_questions else f" (fewer than {min_questions} questions)")))
    return lines


def markdown(summ: dict, methods: Sequence[str], meta: dict) -> str:
    tasks = [t for t in TASKS if any(v["task"] == t for v in summ.values())]
    lengths = sorted({v["length"] for v in summ.values()})
    seen = _ordered({v["method"] for v in summ.values()}, methods)
    parts = [meta.get("header", ""), ""]
    for task in tasks:
        if task == "heldout":
            continue
        Ls = [L for L in lengths if any(v["task"] == task and v["length"] == L for v in summ.values())]
        head = ["method"] + [f"{L}" for L in Ls]
        body = []
        for m in seen:
            cells = []
            for L in Ls:
                v = summ.get(f"{task}|{L}|{m}")
                f = summ.get(f"{task}|{L}|full")
                if not v:
                    cells.append("—")
                    continue
                fs = v["full_score"]
                rel = (f" ({v['score'] / fs:.2f}x" + ("" if v["questions"] == f["questions"] else f" of {fs:.3f}")
                       + f", {v['questions']})") if f and fs > 0 and m != "full" else \
                    (f" ({v['questions']})" if m != "full" else "")
                cells.append(f"{v['score']:.3f}{rel}")
            body.append([m, *cells])
        ns = [summ.get(f"{task}|{L}|full") or next(v for v in summ.values() if v["task"] == task and v["length"] == L)
              for L in Ls]
        parts += [f"**{task}** — mean score (share of expected answers found) per context length; in brackets "
                  "the ratio to full attention's score on the same questions (that score when a method ran on "
                  "fewer questions than full) and the number of questions. Full attention's questions (contexts) "
                  "per length: "
                  + ", ".join(f"{L}: {n['questions']} ({n['contexts']})" for L, n in zip(Ls, ns, strict=True)), "",
                  md_table(head, body, "l" + "r" * len(Ls)), ""]
    if "heldout" in tasks:
        Ls = [L for L in lengths if any(v["task"] == "heldout" and v["length"] == L for v in summ.values())]
        body = []
        for m in seen:
            if m == "full":
                continue
            cells = []
            for L in Ls:
                v = summ.get(f"heldout|{L}|{m}")
                cells.append("—" if not v else f"{v['dnll']:+.3f} ± {v['dnll_se']:.3f} / {100 * v['top1']:.1f}%")
            body.append([m, *cells])
        parts += ["**heldout** — the document teacher-forced after the prefill: ΔNLL against full attention "
                  "(nats/token, ± standard error over contexts) / top-1 agreement with full attention", "",
                  md_table(["method"] + [str(L) for L in Ls], body, "l" + "r" * len(Ls)), ""]
    # speed and memory per length (over every task's rows)
    body = []
    for L in lengths:
        for m in seen:
            vs = [v for v in summ.values() if v["length"] == L and v["method"] == m]
            if not vs:
                continue
            tok = statistics.median(v["tok_s"] for v in vs)
            dram = _median([v["dram_bytes"] for v in vs if v["dram_bytes"] is not None])
            peak = _median([v["dram_peak_bytes"] for v in vs if v["dram_peak_bytes"] is not None])
            eng = _median([v["engine_dram_peak_bytes"] for v in vs if v["engine_dram_peak_bytes"]])
            body.append([L, m, f"{tok:.2f}", _mib(dram), _mib(peak), _mib(eng)])
    parts += ["Decoding speed and memory per context length (medians over the rows of every task): tok/s of the "
              "question and answer steps; KV held at the end of the answer (DynamicCache: its tensors; TieredCache: "
              "adapter tensors, sliding windows included, plus the engine's DRAM) and its peak; the engine's DRAM "
              "peak.", "",
              md_table(["length", "method", "tok/s", "KV held MiB", "KV peak MiB", "engine peak MiB"], body, "llrrrr"),
              ""]
    pre = []
    for L in lengths:
        vs = [v for v in summ.values() if v["length"] == L and v["method"] == "full"] or \
             [v for v in summ.values() if v["length"] == L and not v["method"].startswith(LLAMA_CPP)]
        p = _median([v["prefill_seconds"] for v in vs])
        rss = max([v["prefill_peak_rss"] or 0 for v in vs], default=0)
        pre.append([L, f"{p:.1f}" if p is not None else "—", _mib(rss)])
    parts += ["Dense prefill per context (once per case, shared by every method): median seconds and the process's "
              "peak RSS.", "", md_table(["length", "prefill s", "peak RSS MiB"], pre, "lrr"), ""]
    own = [(v["method"], L, v["prefill_seconds"]) for L in lengths for v in summ.values()
           if v["length"] == L and v["method"].startswith(LLAMA_CPP) and v["prefill_seconds"] is not None]
    if own:
        parts += [f"The {LLAMA_CPP} methods prefill each context themselves ({LLAMA_CPP}: every cell kept; "
                  f"{LLAMA_CPP}+<policy>: TieredLlama's dense prefill): median seconds "
                  + ", ".join(f"{m} at {L}: {p:.1f}" for m, L, p in own)
                  + " (several tasks at one length: one figure each, in the order of the tables).", ""]
    acc = acceptance(summ)
    if acc:
        parts += ["Acceptance (TieredCache adaptive at 10% >= 0.95x full attention on each retrieval task, >= 20 "
                  "questions):", ""] + [f"- {a}" for a in acc] + [""]
    agg = estimate_gap(summ)
    if agg:
        parts += ["Aggregation (fwe): share of the gap to full attention that estimate=True closes:", ""] + \
                 [f"- {a}" for a in agg] + [""]
    return "\n".join(parts)


def estimate_gap(summ: dict) -> list:
    out = []
    for v in sorted(summ.values(), key=lambda v: (v["length"], v["method"])):
        if v["task"] != "fwe" or not v["method"].endswith("+est"):
            continue
        base = summ.get(f"fwe|{v['length']}|{v['method'][:-4]}")
        if not base or base["questions"] != v["questions"]:
            continue
        full = v["full_score"]  # on the same questions as both
        gap = full - base["score"]
        closed = (v["score"] - base["score"]) / gap if gap > 0 else float("nan")
        out.append(f"{v['length']}: {v['method'][:-4]} {base['score']:.3f} -> +est {v['score']:.3f} "
                   f"(full {full:.3f}, {v['questions']} questions): "
                   + (f"{100 * closed:.0f}% of the gap closed" if gap > 0 else "no gap to close"))
    return out


def _mib(b):
    return "—" if not b else f"{b / 2**20:.1f}"


def plot(summ: dict, methods: Sequence[str], path: str, title: str) -> str | None:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in TASKS if t != "heldout" and any(v["task"] == t for v in summ.values())]
    if not tasks:
        return None
    seen = _ordered({v["method"] for v in summ.values()}, methods)
    n = len(tasks)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for m in seen:
            pts = sorted((v["length"], v["score"]) for v in summ.values() if v["task"] == task and v["method"] == m)
            if pts:
                style = "-" if not m.endswith("+est") else "--"
                lw = 2.2 if m in ("full", "adaptive@0.1") else 1.0
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", ms=3, lw=lw, label=m)
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(task)
        ax.set_xlabel("context (tokens)")
    axes[0][0].set_ylabel("score")
    axes[0][-1].legend(fontsize=6, loc="lower left", bbox_to_anchor=(1.02, 0.0))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- command line ---------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvtier bench tasks", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Lists take commas. Results resume: rerun the same command to finish a "
                                       "killed run.")
    p.add_argument("--model", default="gemma3", choices=sorted(MODELS))
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="the model's dtype (bfloat16: the prefill about 3.5x faster on a CPU with avx512_bf16)")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--lengths", default="4096,8192,16384,32768", help="context lengths in tokens")
    p.add_argument("--cases", default="5",
                   help="contexts per task and length: one number, or task:n pairs (niah_single:20,vt:10,...) "
                        "with an optional default first (5,fwe:3)")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help="full, sink+window, <policy>@<budget>[:<cluster size>][+var][+est]; a method may be "
                        "limited to lengths up to L with <method>/L and to the first N cases of each task and "
                        "length with <method>#N, e.g. static@0.05/8192#5")
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--dram-share", type=float, default=0.25,
                   help="the engine's DRAM budget as a share of the tiered layers' float16 KV (at least 4 MiB); "
                        "it changes only time, never an answer (retrieves return the same entries at any budget); "
                        "Gemma 3's index with estimate's value sums is about 8%% of that KV")
    p.add_argument("--device", default="ufs4.0", help="flash device model of the stores (accounting only)")
    p.add_argument("--chunk", type=int, default=1024, help="prefill chunk in tokens")
    p.add_argument("--heldout-tokens", type=int, default=64, help="tokens teacher-forced per heldout case")
    p.add_argument("--fwe-alpha", type=float, default=2.0, help="Zipf exponent of the fwe task's words")
    p.add_argument("--seed", type=int, default=0, help="base seed of the cases")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--shard", default="0/1", help="k/n: run every n-th case from the k-th (for parallel processes)")
    p.add_argument("--calibrate", type=int, default=2048, help="longest calibration context (0: skip)")
    p.add_argument("--plan", action="store_true", help="print the cost estimate and stop")
    p.add_argument("--summarize", action="store_true",
                   help="only rewrite the tables and the plot from the rows on disk (after --shard runs)")
    p.add_argument("--out", default=os.path.join("bench", "results"))
    p.add_argument("--name", default=None, help="stem of the result files (default tasks_<model>)")
    return p


def _cases_per(text: str, tasks: Sequence[str]) -> dict:
    out, default = {}, None
    for part in filter(None, (x.strip() for x in text.split(","))):
        if ":" in part:
            k, v = part.split(":", 1)
            if k not in TASKS:
                raise ValueError(f"--cases: unknown task {k!r}")
            out[k] = int(v)
        else:
            default = int(part)
    return {t: out.get(t, default if default is not None else 5) for t in tasks}


def main(argv: Sequence[str] | None = None) -> int:
    a = show_defaults(_parser()).parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    tasks = [t for t in a.tasks.split(",") if t]
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise SystemExit(f"--tasks: unknown {bad}; choose from {TASKS}")
    lengths = [int(x) for x in a.lengths.split(",") if x]
    if not lengths or min(lengths) < 256 or max(lengths) > MODELS[a.model]:
        raise SystemExit(f"--lengths: token counts in [256, {MODELS[a.model]}] expected for {a.model}")
    per = _cases_per(a.cases, tasks)
    methods, limit, first = [], {}, {}
    for spec in filter(None, (x.strip() for x in a.methods.split(","))):
        spec, _, n_cases = spec.partition("#")
        name, _, cap = spec.partition("/")
        try:
            m = parse_method(name)
            if cap:
                limit[m.name] = int(cap)
            if n_cases:
                first[m.name] = int(n_cases)
        except ValueError as e:
            raise SystemExit(f"--methods: {e}") from None
        methods.append(m)
    k, n = (int(x) for x in a.shard.split("/"))
    name = a.name or f"tasks_{a.model}"
    os.makedirs(a.out, exist_ok=True)
    if a.summarize:  # the tables and the plot from the rows on disk (every shard's), no model
        write(Rows(os.path.join(a.out, f"{name}.rows.jsonl")), methods, a, argv, name, time.time(), final=True)
        return 0

    import torch

    torch.set_num_threads(a.threads)
    t_start = time.time()
    if all(m.llama for m in methods):  # llama.cpp alone: the tokenizer, not the torch model
        model, tok = None, _tokenizer(a.model)
        a.calibrate = 0
    else:
        model, tok = load(a.model, a.dtype)
    hay = Haystack(tok)
    # round-robin over (task, length): a run cut short still covers every cell
    cases = [make_case(t, L, i, tok, hay, a.seed, fwe_alpha=a.fwe_alpha)
             for i in range(max(per.values())) for L in lengths for t in tasks if i < per[t]]
    cases = cases[k::n]

    def methods_for(c: Case):
        return [m for m in methods
                if limit.get(m.name, c.length) >= c.length and c.index < first.get(m.name, c.index + 1)]

    cost = None
    if a.calibrate:
        cost = calibrate(model, tok, hay, a, log=lambda s: print(s, flush=True))
        est: dict = {}
        for c in cases:
            for key, s in plan([c], methods_for(c), cost, tok).items():
                est[key] = est.get(key, 0.0) + s
        total = sum(est.values())
        print(f"plan: {len(cases)} contexts, {sum(len(c.questions) for c in cases)} questions, "
              f"about {total / 3600:.1f} h in all (a rough estimate):", flush=True)
        for L in lengths:
            print(f"  {L}: " + ", ".join(f"{t} {est.get((t, L), 0) / 60:.0f} min" for t in tasks), flush=True)
        if a.plan:
            return 0
    rows = Rows(os.path.join(a.out, f"{name}.rows.jsonl"))
    spent: dict = {}
    t_run = time.time()
    for i, c in enumerate(cases):
        t0 = time.time()
        r = run_case(model, tok, c, methods_for(c), a, rows, a.model, log=lambda s: print(s, flush=True))
        if r["ran"]:
            spent.setdefault(c.length, []).append(time.time() - t0)
        left = 0.0
        for c2 in cases[i + 1:]:
            obs = spent.get(c2.length)
            if obs:
                left += statistics.mean(obs)
            elif cost:
                left += sum(plan([c2], methods_for(c2), cost, tok).values())
        if r["ran"]:
            print(f"[{i + 1}/{len(cases)}] {c.task} L={c.length} case {c.index}: prefill {r['prefill_seconds']:.0f} s, "
                  f"case {time.time() - t0:.0f} s; elapsed {(time.time() - t_run) / 60:.1f} min, "
                  f"ETA {left / 60:.0f} min", flush=True)
        write(rows, methods, a, argv, name, t_start)
    write(rows, methods, a, argv, name, t_start, final=True)
    return 0


def write(rows: Rows, methods: Sequence[Method], a, argv, name: str, t_start: float, final: bool = False) -> dict:
    import torch
    import transformers

    import kvtier

    mine = [r for r in rows.done.values() if r["model"] == a.model]
    names = [m.name for m in methods]
    summ = summarize(mine, names)
    cmd = "kvtier bench tasks " + " ".join(x for x in argv if x != "--summarize")  # the run's command
    header = (f"# Long-context tasks through the cache under test ({a.model}, {a.dtype})\n\n`{cmd}`\n\n"
              f"Each context prefilled once (dense, chunks of {a.chunk}); every method decodes from a copy of that "
              f"state: the question fed as decoding steps, the answer decoded greedily through the cache under test. "
              f"TieredCache: {a.sinks} sinks + {a.window}-token window, engine DRAM budget {a.dram_share:g} of the "
              f"tiered layers' float16 KV (at least 4 MiB), device model {a.device}. Seed {a.seed}.")
    meta = {"command": cmd, "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                        "python": sys.version.split()[0]},
            "versions": {"kvtier": kvtier.__version__, "torch": torch.__version__,
                         "transformers": transformers.__version__, "numpy": np.__version__},
            "args": vars(a), "seconds": time.time() - t_start, "rows": len(mine), "header": header}
    out = {"meta": meta, "summary": summ, "acceptance": acceptance(summ), "estimate_gap": estimate_gap(summ)}
    with open(os.path.join(a.out, f"{name}.json"), "w") as f:
        json.dump(out, f, indent=1, default=str)
    md = markdown(summ, names, meta)
    with open(os.path.join(a.out, f"{name}.md"), "w") as f:
        f.write(md)
    if final:
        plot(summ, names, os.path.join(a.out, "plots", f"{name}.png"),
             f"{a.model}: score vs context length per method")
        print(md)
    return out


if __name__ == "__main__":
    sys.exit(main())
