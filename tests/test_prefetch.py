"""Asynchronous prefetch: same results as retrieve alone, budget held, threads, shutdown."""
import threading

import numpy as np
from hypothesis import given, settings, strategies as st

import kvtier
from conftest import make_data


def _pair(tmp_path, budget="512KiB", policy="static"):
    k, v = make_data(4000, seed=11)
    stores = [kvtier.open(tmp_path / name, dram_budget=budget, cache_policy="lru") for name in ("a", "b")]
    colls = [s.collection("c", dim=16, value_dim=8, policy=policy, colocate_after=0) for s in stores]
    for c in colls:
        c.add(k, v)
    return stores, colls, k


def test_prefetch_then_retrieve_equals_retrieve(tmp_path):
    stores, (plain, pre), k = _pair(tmp_path)
    rng = np.random.default_rng(2)
    queued = 0
    for _ in range(25):
        q = rng.standard_normal((3, 16)).astype(np.float32)
        queued += pre.prefetch(q, budget=0.05)
        a, b = plain.retrieve(q, budget=0.05), pre.retrieve(q, budget=0.05)
        for x, y in zip((a.ids, a.keys, a.values, a.clusters), (b.ids, b.keys, b.values, b.clusters)):
            assert np.array_equal(x, y)
    st_ = stores[1].stats()
    assert queued > 0 and st_["prefetch_issued"] == queued and st_["prefetch_hits"] > 0
    assert st_["dram_peak_bytes"] <= st_["dram_budget"]
    for s in stores:
        s.close()


@settings(max_examples=15, deadline=None)
@given(budget_kib=st.integers(96, 2048), frac=st.floats(0.01, 0.5), seed=st.integers(0, 1000))
def test_budget_never_exceeded_with_prefetch(tmp_path_factory, budget_kib, frac, seed):
    path = tmp_path_factory.mktemp("p")
    rng = np.random.default_rng(seed)
    with kvtier.open(path, dram_budget=budget_kib * 1024) as s:
        c = s.collection("c", dim=16, value_dim=16, policy="adaptive")
        c.add(*make_data(1500, 16, 16, seed=seed))
        for i in range(20):
            q = rng.standard_normal((2, 16))
            c.prefetch(q, budget=frac)
            if i % 3 == 0:
                c.add(*make_data(20, 16, 16, seed=seed + i))
            c.retrieve(q, budget=frac)
        st_ = s.stats()
        assert st_["dram_peak_bytes"] <= st_["dram_budget"]


def test_threads_prefetch_and_retrieve(tmp_path):
    stores, (plain, pre), k = _pair(tmp_path, budget="1MiB")
    errors = []

    def worker(seed):
        rng = np.random.default_rng(seed)
        try:
            for _ in range(40):
                q = rng.standard_normal((2, 16)).astype(np.float32)
                pre.prefetch(q, budget=0.03)
                got = pre.retrieve(q, budget=0.03)
                assert np.array_equal(got.keys, k[got.ids])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
        assert not t.is_alive()
    assert not errors, errors
    for s in stores:
        s.close()


def test_close_with_reads_in_flight(tmp_path):
    stores, (plain, pre), k = _pair(tmp_path, budget="4MiB")
    pre.prefetch(np.ones((2, 16), np.float32), budget=1.0)
    stores[1].close()  # must not hang, crash or leak
    stores[0].close()
    with kvtier.open(tmp_path / "b") as s:
        assert len(s.collection("c")) == 4000


def test_group_prefetch(tmp_path):
    with kvtier.open(tmp_path / "s", dram_budget="1MiB") as s:
        heads = [s.collection(f"L0.H{h}", dim=16, value_dim=8) for h in range(3)]
        for h, c in enumerate(heads):
            c.add(*make_data(1000, seed=h))
        q = np.ones((3, 16), np.float32)
        s.prefetch([(c, q, 0.1) for c in heads])
        for c in heads:
            assert len(c.retrieve(q, budget=0.1)) > 0


def test_prefetch_on_a_collection_without_clusters_queues_nothing(tmp_path):
    with kvtier.open(tmp_path / "s", dram_budget="1MiB") as s:
        c = s.collection("c", dim=16, value_dim=8, policy="none")
        c.add(*make_data(300))
        before = s.stats()["dram_bytes"]
        assert c.prefetch(np.ones(16), budget=0.1) == 0
        assert s.stats()["dram_bytes"] == before  # nothing reserved, nothing released
