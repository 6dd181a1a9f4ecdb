"""Store.retrieve_many: one engine call for a group of collections, results exactly those of
per-collection retrieves (every policy, also as state evolves), reusable output buffers,
and bad input rejected before anything is retrieved."""
import numpy as np
import pytest

import kvtier
from conftest import make_data
from kvtier.errors import InvalidArgumentError


def _heads(s, heads, n, policy="static", seed=0):
    cs = [s.collection(f"h{h}", dim=16, value_dim=8, policy=policy) for h in range(heads)]
    for h, c in enumerate(cs):
        c.add(*make_data(n, seed=seed + h))
    return cs


def _twin(tmp_path, policy):
    stores = [kvtier.open(tmp_path / name, dram_budget="1MiB") for name in ("batched", "single")]
    return stores, [_heads(s, 3, 3000, policy, seed=100) for s in stores]


@pytest.mark.parametrize("policy", ["static", "adaptive", "local", "none"])
def test_retrieve_many_equals_per_collection_retrieve(tmp_path, policy):
    stores, (batched, single) = _twin(tmp_path, policy)
    rng = np.random.default_rng(5)
    out = None
    for step in range(12):
        qs = [rng.standard_normal((4, 16)).astype(np.float32) for _ in batched]
        budgets = [0.05, 0.1, 200][: len(batched)]
        out = stores[0].retrieve_many(list(zip(batched, qs, budgets)), out=out)
        for i, (c, q, b) in enumerate(zip(single, qs, budgets)):
            want, got = c.retrieve(q, budget=b), out.member(i)
            for x, y in zip((want.ids, want.keys, want.values, want.clusters),
                            (got.ids, got.keys, got.values, got.clusters)):
                assert np.array_equal(x, y)
            assert np.all(out.ids[i, len(want):] == -1) and np.all(out.clusters[i, len(want):] == -1)
        if step % 4 == 3:  # the collections grow between steps, the same in both stores
            for cs in (batched, single):
                for h, c in enumerate(cs):
                    c.add(*make_data(50, seed=1000 + 10 * step + h))
    for s in stores:
        s.close()


def test_retrieve_many_reuses_out_and_rejects_bad_input(tmp_path):
    with kvtier.open(tmp_path / "s", dram_budget="1MiB") as s:
        cs = _heads(s, 2, 2000)
        q = np.ones((2, 16), np.float32)
        out = s.retrieve_many([(c, q, 100) for c in cs])
        again = s.retrieve_many([(c, q, 80) for c in cs], out=out)
        assert again.ids is out.ids  # large enough: filled in place
        bigger = s.retrieve_many([(c, q, 300) for c in cs], out=out)
        assert bigger.ids is not out.ids and bigger.ids.shape[1] >= 300
        before = [c.stats() for c in cs]
        other = s.collection("other", dim=8, value_dim=8)
        other.add(*make_data(500, dim=8))
        with pytest.raises(InvalidArgumentError, match="requests"):
            s.retrieve_many([(cs[0], q, 10), (other, np.ones((2, 8)), 10)])
        with pytest.raises(InvalidArgumentError, match="query_group"):
            s.retrieve_many([(cs[0], q, 10), (cs[1], q[:1], 10)])
        with pytest.raises(InvalidArgumentError, match="at most once"):
            s.retrieve_many([(cs[0], q, 10), (cs[0], q, 10)])
        with pytest.raises(InvalidArgumentError, match="budget"):
            s.retrieve_many([(cs[0], q, -1), (cs[1], q, 10)])
        with pytest.raises(InvalidArgumentError, match="requests"):
            s.retrieve_many([])
        assert [c.stats() for c in cs] == before  # rejected calls retrieved nothing
