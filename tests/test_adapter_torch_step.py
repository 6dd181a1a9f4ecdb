"""TieredCache's decoding path (``_attend_ring``): one engine call per layer and step
(``Store.step_layer``) and the attention over one reused buffer the engine writes into. It
must fetch exactly what the separate calls fetched, give the same logits up to float
rounding (the keys are the same, in another order), and hand the window back in token
order when a chunk of several tokens follows decoding steps."""
import numpy as np
import pytest

from conftest import torch_adapter_stack

torch, _ = torch_adapter_stack()

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import kvtier  # noqa: E402
import kvtier.adapters.torch.cache as cache_mod  # noqa: E402
from kvtier.adapters.torch import TieredCache  # noqa: E402


def _model(layers=3):
    torch.manual_seed(7)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


def _run(model, ids, ring, monkeypatch, estimate=False, virtualize=False):
    """Prefill 80, 30 decoding steps, a chunk of 6, 20 more steps: logits, every retrieve's
    ids in order, stats and engine calls by kind."""
    fetched, calls = [], {"step_layer": 0, "retrieve_many": 0}
    real_many, real_step = kvtier.Store.retrieve_many, kvtier.Store.step_layer

    def many(self, requests, out=None):
        reqs = list(requests)
        calls["retrieve_many"] += 1
        got = real_many(self, reqs, out)
        fetched.extend(got.member(i).ids.copy() for i in range(len(reqs)))
        return got

    def step(self, retrieve=None, out=None, **kw):
        calls["step_layer"] += 1
        got, queued = real_step(self, retrieve, out, **kw)
        if retrieve is not None:
            fetched.extend(got.member(i).ids.copy() for i in range(len(retrieve[0])))
        return got, queued

    def per_head(self, query_group, budget=0.1, **kw):  # the estimating path retrieves per head
        got = real_retrieve(self, query_group, budget, **kw)
        fetched.append(got.ids.copy())
        return got

    real_retrieve = kvtier.Collection.retrieve
    with monkeypatch.context() as m:
        m.setattr(kvtier.Store, "retrieve_many", many)
        m.setattr(kvtier.Store, "step_layer", step)
        m.setattr(kvtier.Collection, "retrieve", per_head)
        if not ring:
            m.setattr(cache_mod.TieredCache, "_ring_path", lambda self, layer, q_len: False)
        out = []
        with torch.no_grad(), TieredCache(model, budget=0.25, sinks=4, window=8, policy="adaptive",
                                          dram_budget="256KiB", estimate=estimate, virtualize=virtualize,
                                          collection_options={"init_cluster_size": 4}) as cache:
            pos = 0
            for n in [80] + [1] * 30 + [6] + [1] * 20:
                out.append(model(ids[:, pos:pos + n], cache=cache, use_cache=True).logits[0])
                pos += n
            st = cache.stats()
    return torch.cat(out), fetched, st, calls


@pytest.mark.parametrize("estimate,virtualize", [(False, False), (2, False), (False, True)])
def test_ring_path_fetches_the_same_and_attends_the_same(monkeypatch, estimate, virtualize):
    model = _model()
    ids = torch.from_numpy(np.random.default_rng(2).integers(0, 96, size=(1, 140)))
    ref, ref_fetched, ref_st, ref_calls = _run(model, ids, False, monkeypatch, estimate, virtualize)
    got, got_fetched, st, calls = _run(model, ids, True, monkeypatch, estimate, virtualize)
    assert len(got_fetched) == len(ref_fetched) > 0
    assert all(np.array_equal(a, b) for a, b in zip(got_fetched, ref_fetched))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    for k in ("stored_tokens", "resident_tokens", "retrieves", "add_calls", "fetched_per_step",
              "prefetch_calls", "prefetch_queued", "estimated_per_step", "adapter_dram_bytes"):
        assert st[k] == ref_st[k], k
    # the decoding steps after the window filled took one engine call per layer (plus the last
    # layer's add) instead of a retrieve and separate adds and prefetches
    assert ref_calls["step_layer"] == 0 and calls["step_layer"] > 0
    assert st["step_seconds"] > 0 and ref_st["step_seconds"] == 0


def test_ring_path_needs_a_full_window_and_the_cpu(monkeypatch):
    model = _model(layers=2)
    ids = torch.from_numpy(np.random.default_rng(3).integers(0, 96, size=(1, 30)))
    used = []
    real = cache_mod.TieredCache._attend_ring
    monkeypatch.setattr(cache_mod.TieredCache, "_attend_ring",
                        lambda self, t, layer, *a: used.append(layer.seen) or real(self, t, layer, *a))
    with torch.no_grad(), TieredCache(model, budget=0.5, sinks=4, window=8) as cache:
        for t in range(30):  # token by token from the start: sinks, then the window fill first
            model(ids[:, t:t + 1], cache=cache, use_cache=True)
    assert used and min(used) == 4 + 8 + 1  # the first step after sinks and window are full
