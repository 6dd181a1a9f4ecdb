"""A memory-bounded engine: estimates told in advance, DRAM split by use, tiny budgets."""
import numpy as np
import pytest

import kvtier

POLICIES = ["adaptive", "static", "local", "none"]


def data(n, d=16, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((32, d)).astype(np.float32) * 3
    keys = (centers[rng.integers(0, 32, n)] + rng.standard_normal((n, d))).astype(np.float16)
    return keys, rng.standard_normal((n, d)).astype(np.float16)


# -- estimate ---------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", POLICIES)
def test_estimate_orders_and_grows(policy):
    a = kvtier.estimate(10_000, 64, policy=policy)
    b = kvtier.estimate(100_000, 64, policy=policy)
    assert 0 < a.minimum <= a.recommended
    assert a.minimum == a.index + a.buffers
    assert b.index > a.index and b.minimum > a.minimum and b.recommended > a.recommended
    assert a.entry_bytes == kvtier.estimate(1, 64, policy=policy).entry_bytes
    assert "minimum DRAM budget" in str(a)


def test_estimate_bigger_clusters_need_less_index():
    small = kvtier.estimate(100_000, 64, init_cluster_size=32, max_cluster_size=64)
    big = kvtier.estimate(100_000, 64, init_cluster_size=128, max_cluster_size=256)
    assert big.clusters < small.clusters
    assert big.index < small.index
    assert big.resident_bytes_per_entry < small.resident_bytes_per_entry


def test_estimate_collections_scale_the_resident_parts():
    one = kvtier.estimate(2560, 64, collections=1, write_buffer=0)
    twelve = kvtier.estimate(2560, 64, collections=12, write_buffer=0)
    assert twelve.index == 12 * one.index
    assert twelve.buffers == one.buffers  # one operation at a time
    assert twelve.minimum == twelve.index + twelve.buffers


@pytest.mark.parametrize("bad", [
    dict(n_entries=-1, dim=8), dict(n_entries=10, dim=0), dict(n_entries=10, dim=8, policy="nope"),
    dict(n_entries=10, dim=8, dtype="int8"), dict(n_entries=10, dim=8, fetch=2.0),
    dict(n_entries=10, dim=8, collections=0), dict(n_entries=10, dim=8, colour="red"),
])
def test_estimate_rejects_bad_arguments(bad):
    with pytest.raises(kvtier.InvalidArgumentError):
        kvtier.estimate(**bad)


# -- stats by use -----------------------------------------------------------------------------

def test_dram_split_by_use_sums_and_peaks(tmp_path):
    keys, vals = data(3000)
    with kvtier.open(tmp_path / "s", dram_budget="4MiB") as s:
        c = s.collection("c", dim=16, dtype="float16")
        c.add(keys, vals)
        c.search(keys[:4].astype(np.float32), k=5)
        st = s.stats()
        use, peak = st["dram_by_use"], st["dram_peak_by_use"]
        assert set(use) == {"index", "cache", "pending", "buffers"}
        assert sum(use.values()) == st["dram_bytes"]
        assert use["cache"] == st["cache_bytes"]
        assert use["buffers"] == 0  # nothing transient outlives a call
        assert use["index"] > 0
        for k in use:
            assert use[k] <= peak[k] <= st["dram_peak_bytes"]
        assert st["dram_fixed_peak_bytes"] >= use["index"] + use["pending"]
        assert st["dram_fixed_peak_bytes"] <= st["dram_peak_bytes"] <= st["dram_budget"]


def test_budget_error_says_what_uses_dram(tmp_path):
    with kvtier.open(tmp_path / "s", dram_budget="64KiB") as s:
        c = s.collection("c", dim=256, value_dim=256, dtype="float32", init_cluster_size=1)
        k = np.ones((2000, 256), np.float32)
        with pytest.raises(kvtier.BudgetError) as ei:
            c.add(k, k)
        msg = str(ei.value)
        for word in ("index", "cache", "pending", "buffers", "dram_budget", "minimum"):
            assert word in msg
        assert len(c) == 0


# -- tiny budgets -----------------------------------------------------------------------------

@pytest.mark.parametrize("policy", POLICIES)
def test_failed_add_changes_nothing(tmp_path, policy):
    n, d = 3000, 16
    keys, vals = data(n, d)
    with kvtier.open(tmp_path / "s", dram_budget="64KiB", write_buffer=0) as s:
        c = s.collection("c", dim=d, dtype="float16", policy=policy)
        c.add(keys[:200], vals[:200])
        before = (len(c), c.stats()["clusters"], s.stats()["dram_by_use"]["index"])
        big = np.repeat(keys, 40, axis=0)  # far more entries than 64 KiB can index
        with pytest.raises(kvtier.BudgetError):
            c.add(big, np.repeat(vals, 40, axis=0))
        assert (len(c), c.stats()["clusters"]) == before[:2]
        hits = c.search(keys[:4].astype(np.float32), k=3)
        assert (hits.ids < 200).all()
        c.add(keys[200:400], vals[200:400])  # and it goes on working
        assert len(c) == 400
