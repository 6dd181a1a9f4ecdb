"""``kvtier demo``: its core on a tiny randomly initialised Llama (the real model is too slow for a
test), its table, and its command line."""
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the demo needs torch")
transformers = pytest.importorskip("transformers", reason="the demo needs transformers")
if int(transformers.__version__.split(".")[0]) != 5:
    pytest.skip(f"the torch adapter supports transformers 5.x, found {transformers.__version__}",
                allow_module_level=True)

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import kvtier  # noqa: E402
from kvtier import demo  # noqa: E402
from kvtier.cli import main  # noqa: E402

VOCAB = 96
FIELDS = ("dram_bytes", "dram_peak_bytes", "full_cache_bytes", "tokens_per_s", "full_tokens_per_s",
          "top1_agreement", "reads_per_step", "entries_per_read", "modeled_io_ms_per_step", "fetched_per_step")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def prompt():
    return torch.from_numpy(np.random.default_rng(1).integers(0, VOCAB, size=(1, 120)))


def test_core_returns_the_table_fields(model, prompt):
    res = demo.run_demo(model, prompt, new_tokens=24, budget=0.2, sinks=4, window=8, dram_budget="64KiB",
                        device="ufs4.0", seed=3)
    for k in FIELDS:
        assert k in res, k
        assert np.isfinite(res[k]) and res[k] >= 0, (k, res[k])
    assert res["prompt_tokens"] == 120 and res["new_tokens"] == 24 and len(res["generated_ids"]) == 24
    assert all(0 <= t < VOCAB for t in res["generated_ids"])
    # the cache ends one token short: the last sampled token is never fed back
    layers, kv, d = 2, 2, 16
    assert res["full_cache_bytes"] == layers * kv * (120 + 24 - 1) * d * 2 * 4
    assert res["adapter_dram_bytes"] == layers * kv * (4 + 8) * d * 2 * 4
    assert res["stored_tokens"] == 120 + 24 - 1 - 12
    assert 0 < res["fetched_per_step"] <= np.ceil(0.2 * (120 + 24))
    assert res["reads_per_step"] > 0 and res["modeled_io_ms_per_step"] > 0 and res["device"] == "ufs4.0"
    assert 0.0 <= res["top1_agreement"] <= 1.0
    assert model.config._attn_implementation == "sdpa"  # the cache was closed, the model unbound
    text = demo.table(res)
    for label in ("DRAM used: kvtier", "DRAM used: a full cache", "decode tokens/s: kvtier",
                  "decode tokens/s: full cache", "top-1 agreement with full attention",
                  "I/O per step: reads, entries per read", "I/O per step: modeled ufs4.0 read time"):
        assert label in text, label


def test_full_budget_agrees_with_full_attention(model, prompt):
    """With every stored entry fetched, kvtier's top-1 is full attention's (a check of the
    replay's alignment: an off-by-one would agree at about 1 step in 96)."""
    res = demo.run_demo(model, prompt, new_tokens=16, budget=1.0, sinks=4, window=8, compare_full=False,
                        seed=1)
    assert res["top1_agreement"] >= 0.9  # float16 store rounding may flip a near tie; misaligned: ~1/96
    assert res["full_tokens_per_s"] is None and "tokens/s: full cache" not in demo.table(res)


def test_full_attention_replay_matches_one_forward(model, prompt):
    seq = torch.cat([prompt, torch.from_numpy(np.random.default_rng(2).integers(0, VOCAB, (1, 300)))], dim=1)
    top = demo._full_attention_top1(model, seq, prompt.shape[1], chunk=128)
    with torch.no_grad():
        ref = model(seq).logits[0, prompt.shape[1] - 1:-1].argmax(-1).tolist()
    assert top == ref


def test_bad_arguments(model, prompt):
    with pytest.raises(kvtier.InvalidArgumentError, match="budget"):
        demo.run_demo(model, prompt, new_tokens=4, budget=2.0)
    with pytest.raises(kvtier.InvalidArgumentError, match="prompt"):
        demo.run_demo(model, prompt[0], new_tokens=4)
    assert main(["demo", "--new-tokens", "1"]) == 1  # refused before any model loads


def test_cli_help():
    r = subprocess.run([sys.executable, "-m", "kvtier.cli", "demo", "--help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0
    for opt in ("--new-tokens", "--budget", "--policy", "--dram-budget", "--device", "--context"):
        assert opt in r.stdout
    assert "temporary directory" in r.stdout and "agreement with full attention" in r.stdout
