"""TieredCache(estimate=...): exact when the budget fetches everything, closer to full
attention than without the estimate at a partial budget, arguments checked."""
import numpy as np
import pytest

from conftest import torch_adapter_stack

torch, _ = torch_adapter_stack()

import kvtier  # noqa: E402
from kvtier.adapters.torch import TieredCache  # noqa: E402
from test_adapter_torch import full_logits, run, tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def tokens():
    return torch.from_numpy(np.random.default_rng(1).integers(0, 96, size=(1, 160)))


@pytest.mark.parametrize("estimate", [True, 2, "all"])
def test_full_budget_with_estimate_equals_full_attention(model, tokens, estimate):
    ref = full_logits(model, tokens)
    with TieredCache(model, budget=1.0, sinks=4, window=8, store_dtype="float32", estimate=estimate) as cache:
        got = run(model, cache, tokens, prefill=60, chunks=(9,))
        st = cache.stats()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert st["estimated_per_retrieve"] == 0 and st["retrieves"] > 0


def estimate_errors(model, tokens, policy=None):
    """Mean squared logit error against full attention after a 60-token prefill, at budget 0.1,
    without the estimate and with every cluster estimated (False, "all")."""
    ref = full_logits(model, tokens)
    err = {}
    for est in (False, "all"):
        with TieredCache(model, budget=0.1, sinks=2, window=4, policy=policy, store_dtype="float32",
                         collection_options={"init_cluster_size": 8}, estimate=est) as cache:
            got = run(model, cache, tokens, prefill=60, chunks=(5,))
            st = cache.stats()
        err[est] = float((got[60:] - ref[60:]).pow(2).mean())
        assert (st["estimated_per_retrieve"] > 0) == (est == "all")
    return err


@pytest.mark.parametrize("policy", ["static", "adaptive", "local"])
def test_estimate_brings_partial_budget_closer_to_full(model, tokens, policy):
    err = estimate_errors(model, tokens, policy)
    assert err["all"] < 0.5 * err[False], err


def test_none_policy_with_estimate_is_unchanged(model, tokens):
    outs = []
    for est in (False, True):
        with TieredCache(model, budget=0.2, sinks=2, window=4, policy="none", store_dtype="float32",
                         estimate=est) as cache:
            outs.append(run(model, cache, tokens, prefill=60))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bad", [-1, 1.5, "some", None])
def test_estimate_argument_checked(model, bad):
    with pytest.raises(kvtier.InvalidArgumentError, match="estimate"):
        TieredCache(model, estimate=bad)


def test_estimate_settings(model):
    from kvtier.adapters.torch.cache import DEFAULT_ESTIMATE

    for given, want in ((True, DEFAULT_ESTIMATE), (False, False), ("all", None), (3, 3)):
        with TieredCache(model, estimate=given) as cache:
            assert cache.stats()["estimate"] == want
            assert cache.layers[0].colls[0].params["value_sums"] == (want is not False)
