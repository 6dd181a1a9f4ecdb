"""kvtier/bench/needle.py (the pass-key check) on a tiny random Llama and a byte-level tokenizer.

The real check runs SmolLM2 for many minutes; here the prompt construction and the decoding
loop run in seconds: the pass key sits where the case says, the cue is tokenized apart, and a
TieredCache whose budget fetches everything gives the same greedy answer as DynamicCache.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the pass-key check needs torch")
transformers = pytest.importorskip("transformers", reason="the pass-key check needs transformers")
if int(transformers.__version__.split(".")[0]) != 5:
    pytest.skip(f"the torch adapter supports transformers 5.x, found {transformers.__version__}",
                allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # bench/ is a source-tree package
    sys.path.insert(0, str(REPO))

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from kvtier.bench import needle  # noqa: E402


class ByteTokenizer:
    """One token per UTF-8 byte: what the check needs of a tokenizer (call, decode)."""

    def __call__(self, text, add_special_tokens=False):
        return argparse.Namespace(input_ids=list(text.encode()))

    def decode(self, ids):
        return bytes(int(i) for i in ids).decode(errors="replace")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("position", [0.0, 0.3, 1.0])
def test_case_plants_the_key_where_asked(position):
    tok = ByteTokenizer()
    c = needle.make_case(tok, 1200, position, seed=7)
    text = tok.decode(c["context"])
    needle_text = needle.NEEDLE.format(key=c["key"])
    assert len(c["key"]) == 5 and c["key"].isdigit()
    assert text.count(c["key"]) == 2 and needle_text.strip() in text
    assert text.index(needle_text.strip()) == c["needle_at"]
    fillers = text.count(needle.FILLER.strip())
    before = text[:c["needle_at"]].count(needle.FILLER.strip())
    assert before == round(position * fillers)
    assert list(c["cue"]) == tok(" " + needle.CUE).input_ids
    assert abs(c["context"].size + c["cue"].size - 1200) <= len(needle.FILLER)
    assert needle.make_case(tok, 1200, position, seed=7)["key"] == c["key"]
    assert needle.make_case(tok, 1200, position, seed=8)["key"] != c["key"]


def test_full_budget_answers_as_full_attention(model):
    tok = ByteTokenizer()
    cases = [needle.make_case(tok, 600, 0.2, seed=s) for s in (1, 2)]
    args = argparse.Namespace(budget=1.0, sinks=4, window=8, dram_budget="16MiB", device=None,
                              direct_io=False, answer=6)
    rows = needle.run(model, tok, cases, ["full", "sink+window", "adaptive"], args, log=lambda s: None)
    assert [r["key"] for r in rows] == [c["key"] for c in cases]
    for r in rows:
        assert r["adaptive"]["answer"] == r["full"]["answer"]
        for m in ("full", "sink+window", "adaptive"):
            assert r[m]["solved"] == (r["key"] in r[m]["answer"]) and r[m]["seconds"] > 0
    summ = needle.summary(rows, ["full", "adaptive"])
    assert summ["full"]["cases"] == 2 and summ["adaptive"]["solved"] == summ["full"]["solved"]
    md = needle.markdown(rows, ["full", "adaptive"], summ, argparse.Namespace(
        positions="0.2", seeds=2, answer=6, budget=1.0, sinks=4, window=8, dram_budget="16MiB"))
    assert "600 tokens (2)" in md and f"{summ['full']['solved']} / 2" in md


def test_bad_arguments_are_refused(capsys):
    for argv, word in ((["--lengths", "9000"], "--lengths"), (["--positions", "1.5"], "--positions"),
                       (["--methods", "full,bogus"], "--methods")):
        with pytest.raises(SystemExit):
            needle.main(argv)
        assert word in capsys.readouterr().err
