"""Group virtualization: Store.park / Store.unpark move a group of collections' DRAM state to
the swap area on flash and back, changing no result, holding the budget, losing nothing."""
import errno
import os
import threading

import numpy as np
import pytest

import kvtier
from kvtier.config import MIN_DRAM_BUDGET

DIM, VDIM, N = 16, 8, 700


def _group(s, layer, policy="static", heads=3, n=N, seed=0, batch=None):
    rng = np.random.default_rng(seed + layer)
    cs = []
    for h in range(heads):
        c = s.collection(f"L{layer}.H{h}", dim=DIM, value_dim=VDIM, policy=policy)
        keys, values = rng.standard_normal((n, DIM)).astype(np.float16), rng.standard_normal((n, VDIM)).astype(np.float16)
        for i in range(0, n, batch or n):
            c.add(keys[i:i + (batch or n)], values[i:i + (batch or n)])
        cs.append(c)
    return cs


def _queries(seed=1):
    return np.random.default_rng(seed).standard_normal((2, DIM)).astype(np.float32)


@pytest.mark.parametrize("policy", ["adaptive", "static", "local", "none"])
def test_park_changes_no_result(tmp_path, policy):
    # a twin group in a store that never parks takes the same calls: a retrieve may change
    # clusters (adaptive splits the flagged clusters it reads), parking must not
    with kvtier.open(tmp_path / "s", dram_budget="64MiB", device="ufs4.0") as s, \
            kvtier.open(tmp_path / "t", dram_budget="64MiB", device="ufs4.0") as t:
        cs, twins = _group(s, 0, policy), _group(t, 0, policy)
        q = _queries()
        for c, tw in zip(cs, twins):
            first = c.retrieve(q, 0.1)
            assert np.array_equal(first.ids, tw.retrieve(q, 0.1).ids)
        resident = s.stats()["dram_bytes"]
        s.park(cs)
        st = s.stats()
        assert st["parked_collections"] == 3 and all(c.parked for c in cs)
        assert st["dram_bytes"] < resident / 4, (st["dram_bytes"], resident)
        assert st["swap_outs"] == 3 and st["swap_file_bytes"] > 0
        # a parked collection's stats come from the park, without a swap-in
        assert cs[0].stats()["parked"] and cs[0].stats()["entries"] == N
        assert s.stats()["swap_ins"] == 0
        for c, tw in zip(cs, twins):  # on demand
            got, w = c.retrieve(q, 0.1), tw.retrieve(q, 0.1)
            assert np.array_equal(got.ids, w.ids) and np.array_equal(got.keys, w.keys)
            assert np.array_equal(c.search(q, k=5).ids, tw.search(q, k=5).ids)
        st = s.stats()
        assert st["swap_demand_ins"] == 3 and st["parked_collections"] == 0
        k, v = cs[1].get(np.arange(N))
        s.park(cs)
        assert np.array_equal(cs[1].get(np.arange(N))[0], k)


def test_unpark_reads_a_group_in_one_request(tmp_path):
    with kvtier.open(tmp_path / "s", dram_budget="64MiB", device="ufs4.0") as s:
        g0, g1 = _group(s, 0), _group(s, 1)
        s.park(g0)
        s.park(g1)
        s.reset_io_stats()
        s.unpark(g1)
        st = s.stats()
        assert st["read_ops"] == 1 and st["swap_ins"] == 3
        assert st["read_bytes"] == st["swap_read_bytes"] == st["read_bytes_by_cause"]["swap"]
        assert st["modeled_io_seconds"] > 0
        assert not any(c.parked for c in g1) and all(c.parked for c in g0)
        # unparking what is resident does nothing
        s.unpark(g1)
        assert s.stats()["read_ops"] == 1


def test_async_unpark_then_use(tmp_path):
    with kvtier.open(tmp_path / "s", dram_budget="64MiB") as s:
        cs = _group(s, 0)
        q = _queries()
        want = [c.retrieve(q, 0.2).ids for c in cs]
        s.park(cs)
        s.unpark(cs, wait=False)
        for c, w in zip(cs, want):
            assert np.array_equal(c.retrieve(q, 0.2).ids, w)
        st = s.stats()
        assert st["swap_ins"] == 3 and st["swap_demand_ins"] == 0
        assert st["read_bytes_by_cause"]["swap"] == st["swap_read_bytes"] > 0
        assert st["read_bytes_by_cause"]["prefetch"] == 0  # a swap-in is not a prefetch


def test_park_bounds_dram_by_the_active_group(tmp_path):
    """Eight groups that together exceed the budget run one at a time within it."""
    budget = 160 << 10
    with kvtier.open(tmp_path / "s", dram_budget=budget) as s:
        groups = []
        for layer in range(8):
            groups.append(_group(s, layer, n=500))
            s.park(groups[-1])
        q = _queries()
        for _ in range(2):
            for g in groups:
                s.unpark(g)
                for c in g:
                    assert len(c.retrieve(q, 0.1)) > 0
                s.park(g)
        st = s.stats()
        assert st["dram_peak_bytes"] <= budget
    # without explicit parks the engine pages the idle groups out itself (demand paging),
    # least recently used first, with the same results and within the same budget
    # (adds of 250: the engine stages an add larger than the budget holds in chunks, which
    # changes its clusters; these are never chunked, so the clusters do not depend on it;
    # 1,000 entries a collection: with the 2-byte id map 500 took 53,893 B of index in all,
    # less than the least budget kvtier.open takes)
    with kvtier.open(tmp_path / "u", dram_budget="64MiB") as u:
        roomy = [_group(u, layer, n=1000, batch=250) for layer in range(8)]
        index = u.stats()["dram_by_use"]["index"]
        # half of what every group's index takes, or the least kvtier.open takes, which is
        # still less than that index: idle groups must be paged out
        budget = max(index // 2, MIN_DRAM_BUDGET)
        assert budget < index
        with kvtier.open(tmp_path / "t", dram_budget=budget) as t:
            paged = [_group(t, layer, n=1000, batch=250) for layer in range(8)]
            for _ in range(2):
                for g, h in zip(paged, roomy):
                    for c, d in zip(g, h):
                        assert sorted(c.retrieve(q, 0.1).ids) == sorted(d.retrieve(q, 0.1).ids)
            st = t.stats()
            assert st["swap_pressure_outs"] > 0 and st["swap_demand_ins"] > 0
            assert st["dram_peak_bytes"] <= budget
        assert u.stats()["swap_pressure_outs"] == 0 and u.stats()["swap_outs"] == 0


def test_flush_leaves_unchanged_parked_collections_parked(tmp_path):
    with kvtier.open(tmp_path / "s", dram_budget="64MiB") as s:
        cs = _group(s, 0)
        s.flush()
        s.park(cs)
        ins = s.stats()["swap_ins"]
        s.flush()
        assert s.stats()["swap_ins"] == ins and all(c.parked for c in cs)
        cs[0].add(np.ones((5, DIM), np.float16), np.ones((5, VDIM), np.float16))  # demand swap-in
        s.park(cs[:1])
        s.flush()  # changed since the last commit: checkpointed, and left parked
        assert cs[0].parked
    assert not os.path.exists(tmp_path / "s" / "swap.kvs")  # volatile: removed on close
    with kvtier.open(tmp_path / "s") as s:
        assert len(s.collection("L0.H0")) == N + 5
        assert len(s.collection("L0.H1")) == N


def test_crash_while_parked_keeps_what_was_flushed(tmp_path):
    s = kvtier.open(tmp_path / "s", dram_budget="64MiB")
    cs = _group(s, 0)
    k0, _ = cs[0].get(np.arange(N))
    s.flush()
    cs[0].add(np.ones((7, DIM), np.float16), np.ones((7, VDIM), np.float16))
    s.park(cs)
    # a crash: the engine goes without a flush
    s._engine.close()
    s._catalog.close()
    s._lock.release()
    s._gate.closed = True
    with kvtier.open(tmp_path / "s") as s2:
        c = s2.collection("L0.H0")
        assert len(c) == N and np.array_equal(c.get(np.arange(N))[0], k0)
        s2.park([c])  # the leftover swap file is recreated, not trusted
        assert np.array_equal(c.get(np.arange(N))[0], k0)


def test_park_write_fault_leaves_the_collection_resident(tmp_path):
    with kvtier.open(tmp_path / "s", dram_budget="64MiB") as s:
        cs = _group(s, 0)
        q = _queries()
        want = cs[0].retrieve(q, 0.1).ids
        s._inject_fault("w", 0, errno.EIO)
        with pytest.raises(kvtier.StorageIOError, match="swap.kvs"):
            s.park(cs[:1])
        assert not cs[0].parked
        assert np.array_equal(cs[0].retrieve(q, 0.1).ids, want)
        s.park(cs[:1])
        s._inject_fault("r", 0, errno.EIO)
        with pytest.raises(kvtier.StorageIOError):
            s.unpark(cs[:1])
        assert cs[0].parked
        assert np.array_equal(cs[0].retrieve(q, 0.1).ids, want)


def test_bad_arguments(tmp_path):
    with kvtier.open(tmp_path / "s") as s, kvtier.open(tmp_path / "t") as t:
        cs = _group(s, 0, heads=1)
        other = _group(t, 0, heads=1)
        for bad in ([cs[0], cs[0]], [other[0]], ["L0.H0"], 3):
            with pytest.raises(kvtier.InvalidArgumentError, match="collections"):
                s.park(bad)
            with pytest.raises(kvtier.InvalidArgumentError, match="collections"):
                s.unpark(bad)
        assert not cs[0].parked
        s.park(cs[0])  # a single collection is a group of one
        assert cs[0].parked


def test_threads_park_and_retrieve(tmp_path):
    with kvtier.open(tmp_path / "s", dram_budget="64MiB") as s:
        cs = _group(s, 0)
        q = _queries()
        want = [c.retrieve(q, 0.2).ids for c in cs]
        errors = []
        stop = threading.Event()

        def reader(i):
            try:
                while not stop.is_set():
                    assert np.array_equal(cs[i].retrieve(q, 0.2).ids, want[i])
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        ts = [threading.Thread(target=reader, args=(i,)) for i in range(3)]
        for t in ts:
            t.start()
        for r in range(60):
            s.park(cs)
            s.unpark(cs, wait=bool(r % 2))
        stop.set()
        for t in ts:
            t.join()
        assert not errors, errors[0]


def _decode_like(path, budget, layers=8, heads=3, prefill=2400, steps=24, d=16):
    """A decoding-shaped workload over layers x heads adaptive collections: one large first
    add each (a prefill), then per step one new entry and one retrieve per collection, with
    keys that drift so that clusters split. Returns each step's retrieved ids, the cluster
    sizes at the end, and the store's stats."""
    rng = np.random.default_rng(7)
    centers = rng.standard_normal((24, d)).astype(np.float32) * 3
    total = prefill + steps

    def keys_of(n, shift):
        k = centers[rng.integers(0, len(centers), n)] + rng.standard_normal((n, d)).astype(np.float32)
        return (k + shift).astype(np.float16)

    data = {(la, h): keys_of(total, np.linspace(0, 2, total)[:, None].astype(np.float32)) for la in range(layers)
            for h in range(heads)}
    queries = {k: v[prefill:].astype(np.float32) + 0.1 for k, v in data.items()}
    got = []
    with kvtier.open(path, dram_budget=budget, write_buffer=0) as s:
        colls = {}
        for (la, h), k in data.items():
            colls[la, h] = s.collection(f"L{la}.H{h}", dim=d, value_dim=d, dtype="float16", policy="adaptive")
            colls[la, h].add(k[:prefill], k[:prefill])
        for t in range(steps):
            for key, c in colls.items():
                k = data[key]
                c.add(k[prefill + t:prefill + t + 1], k[prefill + t:prefill + t + 1])
                got.append(sorted(c.retrieve(queries[key][t:t + 1], budget=0.1).ids.tolist()))
            s.step()
        sizes = {key: c.cluster_sizes().tolist() for key, c in colls.items()}
        splits = sum(c.stats()["splits"] for c in colls.values())
        return got, sizes, splits, s.stats()


def test_splits_do_not_depend_on_paging(tmp_path):
    """Issue 26: the clusters, and so every retrieve, are the same whether the budget holds
    every collection or pages most of them out. A first add's chunk, the entries a flagged
    cluster holds for its split and the room a split needs are decided by parameters and
    reserved before anything changes (RUN_READY pages other collections out to make it), not
    taken from what happens to be free. Before, the tight store partitioned later
    collections' first adds in smaller chunks, wrote held entries early and skipped splits."""
    big = _decode_like(tmp_path / "big", 64 << 20)
    est = kvtier.estimate(2424, 16, 16, collections=24, groups=8)
    # about 6 of 24 collections' share, and enough that each 2,400-entry prefill is staged in
    # one chunk: a first add's chunk is a share of the budget (add.c, by design), and below
    # about 340 KB these prefills are partitioned in two chunks, a first partition that then
    # differs from the large budget's for that reason, not for paging
    tight_budget = max(est.minimum, 6 * est.recommended // 24, 360_000)
    tight = _decode_like(tmp_path / "tight", tight_budget)
    assert tight[3]["swap_pressure_outs"] > 0 and big[3]["swap_pressure_outs"] == 0  # paging happened
    assert big[2] > 0  # clusters split
    assert tight[1] == big[1]
    assert tight[0] == big[0]
    assert tight[2] == big[2]
    assert tight[3]["dram_peak_bytes"] <= tight_budget
