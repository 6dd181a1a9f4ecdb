"""The cluster-aligned cache policy through the Python API: decoding steps (Store.step), whole
clusters, the budget, and cached clusters that survive switching between conversations
(park/unpark) within the budget. The policy's own ordering is tested in the C suite
(test_cache_cluster_policy)."""
import numpy as np
import pytest

import kvtier

DIM, VDIM = 16, 16


def _conversation(s, name, layers=3, n=3000, seed=0):
    rng = np.random.default_rng(seed)
    cs = []
    for layer in range(layers):
        c = s.collection(f"{name}.L{layer}", dim=DIM, value_dim=VDIM, policy="adaptive")
        c.add(rng.standard_normal((n, DIM)).astype(np.float16), rng.standard_normal((n, VDIM)).astype(np.float16))
        cs.append(c)
    return cs


def _decode_step(s, cs, q, rng):
    """One decoding step: each layer appends a token and retrieves, then the step ends."""
    out = []
    for c in cs:
        c.add(rng.standard_normal((1, DIM)).astype(np.float16), rng.standard_normal((1, VDIM)).astype(np.float16))
        out.append(c.retrieve(q, 0.1))
    s.step()
    return out


def test_step_marks_steps_and_changes_no_result(tmp_path):
    """Results do not depend on the cache policy or on step marks (the engine is exact). The
    budget must be tight enough that clusters are evicted: 288 KiB (the 4-byte id map of
    f3f391b left 384 KiB room for every cluster these steps read)."""
    got = {}
    for pol, mark in (("lru", False), ("cluster", False), ("cluster", True)):
        with kvtier.open(tmp_path / f"{pol}{mark}", dram_budget="288KiB", device="ufs4.0", cache_policy=pol) as s:
            cs = _conversation(s, "a")
            rng = np.random.default_rng(5)
            q = np.random.default_rng(1).standard_normal((3, DIM)).astype(np.float32)
            ids = []
            for _ in range(6):
                for c in cs:
                    c.add(rng.standard_normal((1, DIM)).astype(np.float16),
                          rng.standard_normal((1, VDIM)).astype(np.float16))
                    ids.append(np.sort(c.retrieve(q, 0.1).ids))
                if mark:
                    s.step()
            st = s.stats()
            assert st["dram_peak_bytes"] <= st["dram_budget"]
            assert st["evictions"] > 0  # the budget was tight enough to matter
            got[pol, mark] = ids
    # static clustering would give identical ids; adaptive splits depend only on the data
    for key in got:
        assert all(np.array_equal(a, b) for a, b in zip(got[key], got["lru", False])), key


def test_step_on_a_closed_store(tmp_path):
    s = kvtier.open(tmp_path / "s", dram_budget="1MiB")
    s.step()
    s.close()
    with pytest.raises(kvtier.StoreClosedError):
        s.step()


def test_cached_clusters_survive_conversation_switches(tmp_path):
    """Two conversations share one budget: each is parked while the other decodes. A
    conversation's cached clusters come back with it (what fits in the budget), so its next
    step reads nothing from the data files, and the budget holds throughout."""
    with kvtier.open(tmp_path / "s", dram_budget="1536KiB", device="ufs4.0", cache_policy="cluster") as s:
        a, b = _conversation(s, "a", seed=1), _conversation(s, "b", seed=2)
        q = np.random.default_rng(3).standard_normal((3, DIM)).astype(np.float32)
        rng = np.random.default_rng(4)
        s.park(b)
        for _ in range(3):
            _decode_step(s, a, q, rng)
        cached_a = [c.stats()["cached_clusters"] for c in a]
        assert all(n > 0 for n in cached_a)
        s.park(a)
        s.unpark(b)
        for _ in range(3):
            _decode_step(s, b, q, rng)
        s.park(b)
        s.unpark(a)
        assert [c.stats()["cached_clusters"] for c in a] == cached_a
        s.reset_io_stats()
        for c in a:  # the same query again: the step's clusters are all cached
            c.retrieve(q, 0.1)
        st = s.stats()
        assert st["cache_misses"] == 0 and st["read_bytes"] == 0, st
        assert st["dram_peak_bytes"] <= st["dram_budget"]
