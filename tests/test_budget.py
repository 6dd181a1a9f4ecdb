"""The DRAM budget is a hard cap, even with ten times the budget in data."""
import numpy as np

import kvtier


def test_ten_times_the_budget(tmp_path):
    budget = 2 << 20
    with kvtier.open(tmp_path / "s", dram_budget=budget) as s:
        # a KV head's key and value in float32: engine metadata (id map, representatives)
        # stays a small share of the data
        c = s.collection("big", dim=64, value_dim=64, dtype="float32")
        rng = np.random.default_rng(0)
        entry_bytes = 2 * 64 * 4
        added = 0
        while added * entry_bytes < 10 * budget:
            k = rng.standard_normal((5000, 64)).astype(np.float32)
            v = rng.standard_normal((5000, 64)).astype(np.float32)
            c.add(k, v)
            added += 5000
            c.retrieve(k[:4], budget=0.1)
            c.search(k[:8], k=10)
        st = s.stats()
        assert added * entry_bytes >= 10 * budget
        assert st["dram_peak_bytes"] <= st["dram_budget"] == budget
        assert st["evictions"] > 0  # the cache really was under pressure
        # and every entry is still there
        got = c.retrieve(k[:1], budget=1.0)
        assert len(got) == added


def test_budget_too_small_is_a_clear_error(tmp_path):
    with kvtier.open(tmp_path / "s", dram_budget="64KiB") as s:
        c = s.collection("c", dim=256, value_dim=256, dtype="float32", init_cluster_size=1)
        k = np.ones((2000, 256), np.float32)
        try:
            c.add(k, k)
        except kvtier.BudgetError as e:
            assert "DRAM budget" in str(e)
            assert len(c) == 0
        else:  # it fitted after all: then the budget held
            assert s.stats()["dram_peak_bytes"] <= 64 * 1024
