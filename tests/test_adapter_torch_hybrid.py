"""TieredCache on hybrid models (sliding-window layers beside full-attention ones), on a tiny
random Gemma 3: only the full layers are tiered, the sliding ones keep their window as
transformers' own layer does; a budget that fetches everything reproduces full attention;
``prefill_from`` starts a TieredCache from a dense prefill; ``stats()`` and ``estimate_dram``
count both kinds of layer; the estimated zone lives in the tiered layers only; operations the
cache refuses (crop, beam reordering, batch changes) leave every layer, sliding ones included, as
it was; the models still refused say why.
"""
import numpy as np
import pytest

from conftest import torch_adapter_stack

torch, _ = torch_adapter_stack()

from transformers import DynamicCache, Gemma3ForCausalLM, Gemma3TextConfig  # noqa: E402

import kvtier  # noqa: E402
from kvtier.adapters.torch import TieredCache, check_model, estimate_dram  # noqa: E402
from test_adapter_torch import full_logits, run  # noqa: E402  (the same helpers as for Llama)
from test_adapter_torch_estimate import estimate_errors  # noqa: E402

VOCAB = 96
WINDOW = 16
TYPES = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention", "full_attention"]


def tiny_gemma3(seed=0, **over):
    torch.manual_seed(seed)
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=len(TYPES),
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=WINDOW,
              max_position_embeddings=1024, layer_types=TYPES, attn_implementation="sdpa")
    kw.update(over)
    return Gemma3ForCausalLM(Gemma3TextConfig(**kw)).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_gemma3()


@pytest.fixture(scope="module")
def tokens():
    return torch.from_numpy(np.random.default_rng(1).integers(0, VOCAB, size=(1, 150)))


def test_geometry_lists_layer_kinds(model):
    geo = check_model(model)
    assert geo["layer_types"] == TYPES
    assert geo["sliding_windows"] == [WINDOW, None, WINDOW, WINDOW, None]


@pytest.mark.parametrize("sinks,window", [(4, 8), (0, 0)])
def test_full_budget_equals_full_attention(model, tokens, sinks, window):
    """Prefill, two chunks, then decoding well past the sliding window: the sliding layers'
    masks and the tiered layers' fetches together give full attention's logits."""
    ref = full_logits(model, tokens)
    with TieredCache(model, budget=1.0, sinks=sinks, window=window, store_dtype="float32") as cache:
        got = run(model, cache, tokens, prefill=60, chunks=(20, 7))
        st = cache.stats()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert st["tiered_layers"] == 2 and st["sliding_layers"] == 3
    assert st["tokens_seen"] == 150 and st["stored_tokens"] == 150 - sinks - window
    steps = 150 - 87
    assert st["retrieves"] == (steps + 2) * 2 * 2  # (steps + 2 chunks) x tiered layers x KV heads


def test_only_full_layers_have_collections(model, tokens):
    with TieredCache(model, budget=0.5) as cache:
        names = sorted(c for c in cache.store.collections())
        run(model, cache, tokens[:, :40], prefill=30)
        sliding = [cache.layers[i] for i in (0, 2, 3)]
    assert names == ["L1.H0", "L1.H1", "L4.H0", "L4.H1"]
    # transformers' own sliding layer, holding window - 1 tokens once past the window
    assert all(type(l).__name__ == "DynamicSlidingWindowLayer" for l in sliding)
    assert all(l.keys.shape[2] == WINDOW - 1 and l.cumulative_length == 40 for l in sliding)


def test_sparse_budget_differs_from_full_and_respects_budget(model, tokens):
    """A partial budget is not silently full attention: it changes the logits, and each
    retrieve stays within its entries."""
    ref = full_logits(model, tokens)
    with TieredCache(model, budget=0.1, sinks=2, window=4, store_dtype="float32") as cache:
        got = run(model, cache, tokens, prefill=60)
        st = cache.stats()
    assert not torch.allclose(got[60:], ref[60:], atol=1e-3)
    assert 0 < st["fetched_per_retrieve"] <= 0.1 * 150 + 1


def test_stats_count_both_kinds_of_layer(model, tokens):
    with TieredCache(model, budget=0.2, sinks=4, window=8) as cache:
        run(model, cache, tokens[:, :100], prefill=70)
        st = cache.stats()
        est = cache.estimate_dram(100)
    per_token = 2 * 16 * 2 * 4  # KV heads x head dim x (K, V) x float32
    assert st["sliding_dram_bytes"] == 3 * (WINDOW - 1) * per_token
    assert st["adapter_dram_bytes"] == st["sliding_dram_bytes"] + 2 * 12 * per_token
    assert st["full_cache_bytes"] == (2 * 100 + 3 * (WINDOW - 1)) * per_token
    assert st["global_kv_float16_bytes"] == 2 * 100 * per_token // 2
    assert st["adapter_dram_peak_bytes"] >= st["adapter_dram_bytes"]
    # the estimate, made without running, agrees with what the run holds
    assert est["sliding_bytes"] == st["sliding_dram_bytes"]
    assert est["adapter_bytes"] == st["adapter_dram_bytes"]
    assert est["full_cache_bytes"] == st["full_cache_bytes"]
    assert est["global_kv_float16_bytes"] == st["global_kv_float16_bytes"]
    assert est["engine"]["collections"] == 4 and est["engine"]["n_entries"] == 100 - 12
    assert est["dram_minimum"] == est["adapter_bytes"] + est["engine_minimum"]
    assert 0 < est["engine_minimum"] <= st["engine_dram_peak_bytes"]


def test_estimate_dram_grows_with_the_context_only_in_full_layers(model):
    a, b = estimate_dram(model, 1000), estimate_dram(model, 4000)
    assert a["sliding_bytes"] == b["sliding_bytes"] and a["tiered_dram_bytes"] == b["tiered_dram_bytes"]
    assert b["engine_minimum"] > a["engine_minimum"] and b["full_cache_bytes"] > a["full_cache_bytes"]
    with pytest.raises(kvtier.InvalidArgumentError, match="context"):
        estimate_dram(model, 0)


def test_prefill_from_a_dense_prefill(model, tokens):
    """A chunked DynamicCache prefill handed to prefill_from decodes as full attention (budget
    1) and stores what a TieredCache's own prefill stores; the DynamicCache is left as it was."""
    ref = full_logits(model, tokens)
    dense = DynamicCache(config=model.config)
    with torch.no_grad():
        model(tokens[:, :40], cache=dense, use_cache=True)
        model(tokens[:, 40:60], cache=dense, use_cache=True)
    before = [(l.keys.clone(), l.values.clone()) for l in dense.layers]
    with TieredCache(model, budget=1.0, sinks=4, window=8, store_dtype="float32") as cache:
        cache.prefill_from(dense)
        st0 = cache.stats()
        out = []
        with torch.no_grad():
            for t in range(60, 150):
                out.append(model(tokens[:, t:t + 1], cache=cache, use_cache=True).logits[0])
        st = cache.stats()
    torch.testing.assert_close(torch.cat(out), ref[60:], rtol=1e-4, atol=1e-4)
    assert st0["tokens_seen"] == 60 and st0["stored_tokens"] == 48 and st0["retrieves"] == 0
    assert st["decode_steps"] == 90 and st["tokens_seen"] == 150
    with TieredCache(model, budget=1.0, sinks=4, window=8, store_dtype="float32") as own:
        with torch.no_grad():
            model(tokens[:, :60], cache=own, use_cache=True)
        st1 = own.stats()
    for k in ("stored_tokens", "sliding_dram_bytes", "adapter_dram_bytes", "add_calls"):
        assert st0[k] == st1[k], k
    for (k, v), l in zip(before, dense.layers):
        assert torch.equal(k, l.keys) and torch.equal(v, l.values)


def test_prefill_from_refuses_what_does_not_fit(model, tokens):
    dense = DynamicCache(config=model.config)
    with TieredCache(model) as cache:
        with pytest.raises(kvtier.InvalidArgumentError, match="cache"):
            cache.prefill_from(dense)  # empty
        with pytest.raises(kvtier.InvalidArgumentError, match="DynamicCache"):
            cache.prefill_from(object())
        plain = DynamicCache()  # no config: every layer a full DynamicLayer
        with torch.no_grad():
            model(tokens[:, :30], cache=plain, use_cache=True)
        with pytest.raises(kvtier.InvalidArgumentError, match="DynamicSlidingWindowLayer"):
            cache.prefill_from(plain)
        with torch.no_grad():
            model(tokens[:, :30], cache=dense, use_cache=True)
        cache.prefill_from(dense)
        with pytest.raises(kvtier.InvalidArgumentError, match="empty"):
            cache.prefill_from(dense)


def test_all_sliding_model_refused():
    m = tiny_gemma3(layer_types=["sliding_attention"] * len(TYPES))
    with pytest.raises(kvtier.InvalidArgumentError, match="only sliding-window layers"):
        TieredCache(m)


def test_softcapping_model_refused():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=8)
    with pytest.raises(kvtier.InvalidArgumentError, match="softcapping"):
        TieredCache(Gemma2ForCausalLM(cfg))


@pytest.mark.parametrize("op", [lambda c: c.crop(-2), lambda c: c.reorder_cache(torch.tensor([0, 0])),
                                lambda c: c.batch_repeat_interleave(2),
                                lambda c: c.batch_select_indices(torch.tensor([0, 0]))],
                         ids=["crop", "reorder_cache", "batch_repeat_interleave", "batch_select_indices"])
def test_refused_operations_change_nothing(model, tokens, op):
    """transformers' Cache applies these layer by layer: layer 0 slides, layer 1 is tiered, so the
    refusal must come before layer 0 is touched; the cache then decodes on as if never asked."""
    ref = full_logits(model, tokens[:, :40])
    with TieredCache(model, budget=1.0, sinks=2, window=4, store_dtype="float32") as cache:
        with torch.no_grad():
            first = model(tokens[:, :12], cache=cache, use_cache=True).logits[0]  # below the window
        before = [(l.keys.clone(), l.values.clone()) for l in (cache.layers[i] for i in (0, 2, 3))]
        st = cache.stats()
        with pytest.raises(NotImplementedError, match="not supported"):
            op(cache)
        for (k, v), l in zip(before, (cache.layers[i] for i in (0, 2, 3))):
            assert torch.equal(k, l.keys) and torch.equal(v, l.values)
        assert cache.stats()["tokens_seen"] == st["tokens_seen"] == 12
        rest = run(model, cache, tokens[:, 12:40], prefill=1)
    torch.testing.assert_close(torch.cat([first, rest]), ref, rtol=1e-4, atol=1e-4)


def test_estimate_on_a_hybrid_model(model, tokens):
    """The estimated zone exists only in the tiered layers: exact with a budget that fetches
    everything, and closer to full attention than without it at a partial budget."""
    ref = full_logits(model, tokens)
    with TieredCache(model, budget=1.0, sinks=4, window=8, store_dtype="float32", estimate=True) as cache:
        got = run(model, cache, tokens, prefill=60, chunks=(9,))
        assert all(c.params["value_sums"] for i in cache.tiered for c in cache.layers[i].colls)
        st = cache.stats()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert st["estimated_per_retrieve"] == 0 and st["sliding_layers"] == 3
    err = estimate_errors(model, tokens)
    assert err["all"] < 0.5 * err[False], err


@pytest.mark.parametrize("prefetch,virtualize", [(False, False), (True, True)])
def test_full_budget_exact_with_prefetch_or_virtualize(model, tokens, prefetch, virtualize):
    ref = full_logits(model, tokens)
    with TieredCache(model, budget=1.0, sinks=4, window=8, store_dtype="float32", prefetch=prefetch,
                     virtualize=virtualize) as cache:
        got = run(model, cache, tokens, prefill=60)
        st = cache.stats()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert st["prefetch"] == prefetch and st["tiered_layers"] == 2
