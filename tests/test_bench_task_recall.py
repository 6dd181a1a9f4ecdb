"""kvtier.bench.task_recall in small: the per-step measures against a direct computation, and a
whole case on a tiny random Gemma 3 (one full-attention layer) with a byte tokenizer: a
TieredCache fetching everything sees all of the attention and the whole needle, a small
budget sees less."""
import argparse
import json

import numpy as np
import pytest

from conftest import torch_adapter_stack

torch, transformers = torch_adapter_stack()

from transformers import Gemma3ForCausalLM, Gemma3TextConfig  # noqa: E402

from kvtier.bench import task_recall as R  # noqa: E402
from kvtier.bench import tasks as T  # noqa: E402


class OffsetByteTokenizer:
    """One token per UTF-8 byte (a BOS of 1 with special tokens), with character offsets."""
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
        if isinstance(text, list):
            raise TypeError("one text at a time")
        ids, offs = [], []
        for i, ch in enumerate(text):
            b = list(ch.encode())
            ids += b
            offs += [(i, i + 1)] * len(b)
        if add_special_tokens:
            ids, offs = [1] + ids, [(0, 0)] + offs
        return argparse.Namespace(input_ids=ids, offset_mapping=offs)

    def decode(self, ids):
        return bytes(int(i) for i in ids if i > 1).decode(errors="replace")


def test_step_measures_against_a_direct_computation():
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(4, 16)), rng.normal(size=(50, 16))
    w = np.exp(q @ k.T * 0.25)
    w /= w.sum(1, keepdims=True)
    vis = np.zeros(50, bool)
    vis[:4] = vis[40:] = True
    vis[[10, 20]] = True
    m = R.step_measures(q, k, vis, slice(4, 40), 2, 0.25, [10, 11])
    assert m["recall"] == pytest.approx(w[:, vis].sum(1).mean())
    best = 4 + np.argsort(-w[:, 4:40].max(0))[:2]
    ora = np.ones(50, bool)
    ora[4:40] = False
    ora[best] = True
    assert m["oracle"] == pytest.approx(w[:, ora].sum(1).mean()) and m["oracle"] >= m["recall"] - 1e-12
    assert m["hit"] == 0.5
    every = R.step_measures(q, k, np.ones(50, bool), slice(4, 40), 36, 0.25, [10])
    assert every["recall"] == pytest.approx(1.0) and every["oracle"] == pytest.approx(1.0) and every["hit"] == 1.0


def test_answer_positions():
    tok = OffsetByteTokenizer()
    text = "ab 12345 cd 12345"
    enc = tok(text, add_special_tokens=True, return_offsets_mapping=True)
    (pos,) = R.answer_positions(text, enc.offset_mapping, ["12345"])
    assert pos == [4, 5, 6, 7, 8] and tok.decode([enc.input_ids[i] for i in pos]) == "12345"
    with pytest.raises(ValueError):
        R.answer_positions(text, enc.offset_mapping, ["999"])


def test_a_case_end_to_end_on_a_tiny_model():
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=64,
                           max_position_embeddings=4096, attn_implementation="sdpa",
                           layer_types=["sliding_attention", "full_attention"])
    model = Gemma3ForCausalLM(cfg).eval()
    tok = OffsetByteTokenizer()
    case = T.make_case("niah_single", 700, 0, tok, T.Haystack(tok), base_seed=1, reserve=120)
    args = argparse.Namespace(chunk=256, dram_share=0.1, sinks=4, window=16, device=None)
    everything = R.measure(model, tok, case, T.parse_method("adaptive@1.0"), args, log=lambda s: None)
    small = R.measure(model, tok, case, T.parse_method("static@0.02:8"), args, log=lambda s: None)
    (a,), (b,) = everything, small
    assert list(a["layers"]) == ["1"] and a["tokens"] > 500
    la, lb = a["layers"]["1"], b["layers"]["1"]
    assert la["recall"] == pytest.approx(1.0) and la["hit_first"] == 1.0 and la["hit_answer"] == 1.0
    assert lb["recall"] < 0.99 and lb["oracle"] >= lb["recall"] - 1e-9 and lb["hit_first"] < 1.0
    md = R.markdown(everything + small, ["adaptive@1.0", "static@0.02:8"], "cmd")
    assert "| adaptive@1.0" in md and "L1 recall" in md


def test_summarize_needs_no_model(tmp_path, monkeypatch):
    row = {"task": "niah_single", "length": 600, "case": 0, "question": 0, "method": "adaptive@0.1", "score": 1.0,
           "answer": "1", "expected": ["1"], "tokens": 600,
           "layers": {"1": {"recall": 0.9, "oracle": 0.95, "hit_first": 1.0, "hit_answer": 0.5}}}
    (tmp_path / "r.jsonl").write_text(json.dumps(row) + "\n")
    monkeypatch.setattr(R, "load", None)  # --summarize must not load a model
    argv = ["--length", "600", "--methods", "adaptive@0.1", "--out", str(tmp_path), "--name", "r", "--summarize"]
    assert R.main(argv) == 0
    md = (tmp_path / "r.md").read_text()
    assert "0.900" in md and "0.950" in md and "--summarize" not in md
    with pytest.raises(SystemExit):
        R.main(["--methods", "full", "--out", str(tmp_path), "--summarize"])
