"""Property-based tests: a hypothesis state machine drives a store and a plain numpy reference
model side by side (add, search, retrieve, prefetch, get, flush, reopen, crash, park/unpark)
and checks they agree. Every machine starts from an empty collection and every read rule runs
from the first step, so reads meet an empty collection, one entry and a few (k and budgets
past the entry count), before and after reopens and crashes, for every policy and for the
token layout. (There is no delete call: "after everything was deleted" has no counterpart;
a crash that loses every unflushed add is the nearest, and is covered.)"""
import shutil
import tempfile

import numpy as np
import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import kvtier

DIM, VDIM = 8, 4


class StoreVsReference(RuleBasedStateMachine):
    LAYOUT = "colocated"
    POLICY = "adaptive"

    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="kvt-model-")
        self.budget = "1MiB"
        self.store = kvtier.open(self.dir, dram_budget=self.budget)
        self.dtype = np.float16
        self.coll = self._create()
        self.keys = np.zeros((0, DIM), self.dtype)
        self.values = np.zeros((0, VDIM), self.dtype)
        self.flushed = 0

    def _create(self):
        return self.store.collection("m", dim=DIM, value_dim=VDIM, init_cluster_size=4, max_cluster_size=8,
                                     layout=self.LAYOUT, policy=self.POLICY, local_window=8, local_cluster_size=2)

    def teardown(self):
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(n=st.integers(1, 40), seed=st.integers(0, 2**32 - 1))
    def add(self, n, seed):
        rng = np.random.default_rng(seed)
        k = rng.standard_normal((n, DIM)).astype(self.dtype)
        v = rng.standard_normal((n, VDIM)).astype(self.dtype)
        ids = self.coll.add(k, v)
        assert ids.tolist() == list(range(len(self.keys), len(self.keys) + n))
        self.keys = np.concatenate([self.keys, k])
        self.values = np.concatenate([self.values, v])

    @rule(data=st.data())
    def get(self, data):
        n = len(self.keys)
        ids = data.draw(st.lists(st.integers(0, n - 1), min_size=0, max_size=20)) if n else []
        k, v = self.coll.get(ids)
        assert np.array_equal(k, self.keys[ids]) and np.array_equal(v, self.values[ids])
        with pytest.raises(kvtier.NotFoundError):  # one past the end, on an empty one too
            self.coll.get([n])

    @rule(seed=st.integers(0, 1000), k=st.integers(1, 12))
    def search_default(self, seed, k):
        """The default nprobe, k past the entry count: ids of the collection, then -1 padding."""
        q = np.random.default_rng(seed).standard_normal((2, DIM)).astype(np.float32)
        hits = self.coll.search(q, k=k)
        n = len(self.keys)
        assert hits.ids.shape == (2, k)
        assert ((hits.ids >= 0) & (hits.ids < n) | (hits.ids == -1)).all()
        assert (hits.ids[:, min(k, n):] == -1).all() and np.isinf(hits.scores[:, min(k, n):]).all()

    @rule(seed=st.integers(0, 1000), k=st.integers(1, 12))
    def search_exhaustive_is_exact(self, seed, k):
        q = np.random.default_rng(seed).standard_normal((2, DIM)).astype(np.float32)
        hits = self.coll.search(q, k=k, nprobe=1 << 30)
        scores = q @ self.keys.astype(np.float32).T
        kk = min(k, len(self.keys))
        for row in range(2):
            got = hits.scores[row, :kk]
            want = np.sort(scores[row])[::-1][:kk]
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
            assert set(hits.ids[row, :kk].tolist()) <= set(range(len(self.keys)))
            np.testing.assert_allclose(scores[row, hits.ids[row, :kk]], got, rtol=1e-4, atol=1e-4)

    @rule(seed=st.integers(0, 1000), count=st.integers(0, 60))
    def retrieve_count(self, seed, count):
        """A budget in entries, often past the entry count: min(budget, n) entries, exact data."""
        q = np.random.default_rng(seed).standard_normal((2, DIM)).astype(np.float32)
        got = self.coll.retrieve(q, budget=count)
        assert len(got) == min(count, len(self.keys))
        assert len(set(got.ids.tolist())) == len(got)
        assert np.array_equal(got.keys, self.keys[got.ids]) and np.array_equal(got.values, self.values[got.ids])

    @rule(seed=st.integers(0, 1000), count=st.integers(0, 60))
    def prefetch(self, seed, count):
        q = np.random.default_rng(seed).standard_normal((2, DIM)).astype(np.float32)
        assert self.coll.prefetch(q, budget=count) >= 0

    @rule(seed=st.integers(0, 1000), frac=st.floats(0.0, 1.0))
    def retrieve(self, seed, frac):
        q = np.random.default_rng(seed).standard_normal((3, DIM)).astype(np.float32)
        got = self.coll.retrieve(q, budget=frac)
        assert len(got) <= int(np.ceil(frac * len(self.keys)))
        assert len(set(got.ids.tolist())) == len(got)
        assert np.array_equal(got.keys, self.keys[got.ids]) and np.array_equal(got.values, self.values[got.ids])
        full = self.coll.retrieve(q, budget=len(self.keys))
        assert sorted(full.ids.tolist()) == list(range(len(self.keys)))
        # every entry is in exactly one cluster, after whatever adds, splits (this retrieve's
        # included: clusters are reported after them) and reopens came before
        sizes = np.asarray(self.coll.cluster_sizes())
        if self.POLICY != "none":  # no clusters: every entry reports cluster -1
            assert int(sizes.sum()) == len(self.keys)
            assert np.array_equal(np.bincount(full.clusters, minlength=len(sizes))[:len(sizes)], sizes)

    @rule()
    def park(self):
        """Parking moves the collection to the swap area; nothing it answers may change."""
        self.store.park([self.coll])
        assert self.coll.parked
        assert self.store.stats()["parked_collections"] == 1

    @rule(wait=st.booleans())
    def unpark(self, wait):
        self.store.unpark([self.coll], wait=wait)
        if wait:
            assert not self.coll.parked

    @rule()
    def flush(self):
        self.store.flush()
        self.flushed = len(self.keys)

    @rule()
    def reopen(self):
        self.store.close()
        self.store = kvtier.open(self.dir, dram_budget=self.budget)
        self.coll = self.store.collection("m")
        self.flushed = len(self.keys)

    @rule()
    def crash_and_reopen(self):
        """Drop the engine without flushing: only what was flushed survives."""
        s = self.store
        s._engine.close()
        s._catalog.close()
        s._lock.release()
        s._gate.closed = True
        self.store = kvtier.open(self.dir, dram_budget=self.budget)
        if self.flushed == 0 and "m" not in self.store.collections():
            self.coll = self._create()
        else:
            self.coll = self.store.collection("m")
        self.keys = self.keys[: self.flushed]
        self.values = self.values[: self.flushed]

    @invariant()
    def sizes_agree(self):
        assert len(self.coll) == len(self.keys)
        st_ = self.store.stats()
        assert st_["dram_peak_bytes"] <= st_["dram_budget"]
        # entries waiting in DRAM (for a split, or in a write buffer's tail) are entries
        cs = self.coll.stats()
        assert cs["pending_entries"] + cs["write_buffer_entries"] <= len(self.keys)


class TokenLayoutVsReference(StoreVsReference):
    """The same machine on the token-order layout baseline (a log; clusters as id runs)."""
    LAYOUT = "token"


class StaticVsReference(StoreVsReference):
    POLICY = "static"


class LocalVsReference(StoreVsReference):
    POLICY = "local"


class NoneVsReference(StoreVsReference):
    POLICY = "none"


StoreVsReference.TestCase.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)
TestStoreVsReference = StoreVsReference.TestCase
TokenLayoutVsReference.TestCase.settings = settings(max_examples=25, stateful_step_count=25, deadline=None)
TestTokenLayoutVsReference = TokenLayoutVsReference.TestCase
for _m in (StaticVsReference, LocalVsReference, NoneVsReference):
    _m.TestCase.settings = settings(max_examples=20, stateful_step_count=25, deadline=None)
TestStaticVsReference = StaticVsReference.TestCase
TestLocalVsReference = LocalVsReference.TestCase
TestNoneVsReference = NoneVsReference.TestCase
