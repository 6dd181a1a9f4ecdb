"""Micro-benchmarks of the engine's hot paths, through the public API (pytest-benchmark).

What each one times, on 64-d float16 keys and values (an LLM head's KV entries):
  assign_single     add() of one entry to a collection of 8192 entries in ~256 clusters:
                    scoring every representative, appending to the nearest cluster's pool, and
                    (adaptive) the splits the appends trigger
  first_batch       add() of 8192 entries to an empty collection: the first batch's k-means
                    (none: token-level, no clustering)
  add_batch         add() of 1024 entries to a collection of 8192 (batched assignment)
  settle_splits     retrieve() of everything right after the first batch: under adaptive, the
                    deferred splits of the clusters the first batch flagged (count in extra_info)
  retrieve_cached   retrieve() of a 3-query GQA group at a 10% budget, every cluster in DRAM
  retrieve_cold     the same with a DRAM budget of what stays resident + 160KiB: reads from
                    flash (O_DIRECT where the file system allows it), fresh queries every call
  search            search() of 16 queries, k=10, default nprobe, clusters cached
  get_cached        get() of 256 random ids, clusters cached
  get_cold          get() of 256 random ids (fresh ones every call) from flash
The read benchmarks run on settled collections (no deferred split pending).
The cached ones skip policy none (token-level: no cluster cache, it reads flash every call).
Each is parametrised by every policy of the API (static, local, adaptive, none); a policy the
engine build lacks is skipped with the engine's reason. The cold/cached benchmarks check the
cache counters, so that "cold" really read from flash and "cached" really did not.

Run (not part of the tests/ suite):
    pytest bench/test_micro.py
Compare against the stored baseline (fails if a median got more than 30% slower; on a busy
shared machine run-to-run noise alone reaches ~20%, so treat a single failure as a hint):
    pytest bench/test_micro.py --benchmark-storage=bench/baseline \\
        --benchmark-compare=0001 --benchmark-compare-fail=median:30%
Re-record the baseline (pytest-benchmark keeps one folder per machine/interpreter, so on
another machine record your own first):
    pytest bench/test_micro.py --benchmark-storage=bench/baseline --benchmark-save=baseline
Absolute times on a shared machine are noisy; compare medians from the same machine.
"""
import numpy as np
import pytest

import kvtier
from kvtier.config import POLICIES

pytest.importorskip("pytest_benchmark", reason="micro-benchmarks need pytest-benchmark (the bench extra)")

DIM = 64
N_BASE = 8192
BATCH = 1024

policies = pytest.mark.parametrize("policy", POLICIES)


def _collection(store, name, policy, **kw):
    """Creates a collection, skipping (with the engine's reason) a policy this build lacks."""
    try:
        return store.collection(name, dim=DIM, value_dim=DIM, policy=policy, **kw)
    except kvtier.InvalidArgumentError as e:
        if "not implemented" in str(e):
            pytest.skip(f"policy {policy!r}: {e}")
        raise


def _data(n, seed):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, DIM)).astype(np.float16),
            rng.standard_normal((n, DIM)).astype(np.float16))


def _queries(n, group, seed):
    return np.random.default_rng(seed).standard_normal((n, group, DIM)).astype(np.float32)


@pytest.fixture(scope="module")
def base_data():
    return _data(N_BASE, 0)


def _filled(tmp_path_factory, base_data, policy, cold=False):
    """A store whose collection 'c' holds N_BASE entries, written then reopened (caches empty).
    cold: the DRAM budget is what the reopened collection keeps resident plus 160KiB, so that
    nearly every cluster a call needs comes from flash."""
    path = tmp_path_factory.mktemp(f"micro-{policy}")
    with kvtier.open(path, dram_budget="64MiB") as s:
        c = _collection(s, "c", policy)
        c.add(*base_data)
        _settle(c)
    budget = "64MiB"
    if cold:
        with kvtier.open(path, dram_budget="64MiB") as s:
            s.collection("c")
            budget = s.stats()["dram_bytes"] + (160 << 10)
    return kvtier.open(path, dram_budget=budget)


def _settle(c):
    """Runs the splits the adaptive policy deferred (flagged clusters split when next read), so
    that the read benchmarks measure reads, not a split storm that depends on how many calls
    pytest-benchmark happens to make. Split cost is measured on its own (test_settle_splits)."""
    ones = np.ones((1, DIM), np.float32)
    for _ in range(8):
        if not c.stats().get("flagged_clusters"):
            return
        c.retrieve(ones, budget=1.0)
    assert not c.stats().get("flagged_clusters"), c.stats()


# Token-level retrieval keeps its keys resident and reads the selected entries from flash on
# every call: it has no cluster cache, so "cached" benchmarks do not apply to it.
UNCACHED_POLICIES = ("none",)


@pytest.fixture(scope="module", params=POLICIES)
def warm(request, tmp_path_factory, base_data):
    """Generous budget, and every cluster brought into the cache: no benchmark on it reads flash."""
    if request.param in UNCACHED_POLICIES:
        pytest.skip(f"policy {request.param!r} has no cluster cache (token-level reads)")
    s = _filled(tmp_path_factory, base_data, request.param)
    c = s.collection("c")
    c.retrieve(np.ones((1, DIM), np.float32), budget=1.0)
    assert c.stats()["cached_clusters"] == c.stats()["clusters"]
    s.reset_io_stats()
    yield s, c
    assert s.stats()["read_ops"] == 0, "a cached benchmark read from flash"
    s.close()


@pytest.fixture(scope="module", params=POLICIES)
def cold(request, tmp_path_factory, base_data):
    s = _filled(tmp_path_factory, base_data, request.param, cold=True)
    yield s, s.collection("c")
    s.close()


class _Counted:
    """Calls fn on successive argument sets and counts the entries returned, so that a cold
    benchmark can check that most of them were read from flash during it."""

    def __init__(self, fn, args):
        self.fn, self.args, self.i, self.entries = fn, args, 0, 0

    def __call__(self):
        out = self.fn(self.args[self.i % len(self.args)])
        self.i += 1
        self.entries += len(out[0]) if isinstance(out, tuple) else len(out)
        return out

    def check_mostly_from_flash(self, store):
        st = store.stats()
        assert st["read_ops"] > 0 and st["read_entries"] >= 0.5 * self.entries, (self.entries, st)


@policies
def test_assign_single(benchmark, tmp_path, base_data, policy):
    with kvtier.open(tmp_path / "s", dram_budget="64MiB") as s:
        c = _collection(s, "c", policy)
        c.add(*base_data)
        keys, values = _data(3000, 1)
        rows = iter(range(len(keys)))

        def add_one():
            i = next(rows)
            c.add(keys[i], values[i:i + 1])

        benchmark.pedantic(add_one, rounds=2900, warmup_rounds=100)
        assert len(c) == N_BASE + 3000


@policies
def test_first_batch(benchmark, tmp_path, base_data, policy):
    with kvtier.open(tmp_path / "s", dram_budget="128MiB") as s:
        n = iter(range(100))

        def fresh():
            return (_collection(s, f"c{next(n)}", policy),), {}

        def add_all(c):
            c.add(*base_data)

        benchmark.pedantic(add_all, setup=fresh, rounds=5)
        c0 = s.collection("c0")
        assert len(c0) == N_BASE and (policy in UNCACHED_POLICIES or c0.stats()["clusters"] > 1)


@policies
def test_add_batch(benchmark, tmp_path, base_data, policy):
    keys, values = _data(BATCH, 2)
    with kvtier.open(tmp_path / "s", dram_budget="128MiB") as s:
        n = iter(range(100))

        def filled():
            c = _collection(s, f"c{next(n)}", policy)
            c.add(*base_data)
            return (c,), {}

        benchmark.pedantic(lambda c: c.add(keys, values), setup=filled, rounds=10)
        assert len(s.collection("c0")) == N_BASE + BATCH


@policies
def test_settle_splits(benchmark, tmp_path, base_data, policy):
    """retrieve() of everything right after the first batch: under adaptive this runs every split
    the first batch flagged (the clusters are in DRAM anyway); the other policies only read."""
    with kvtier.open(tmp_path / "s", dram_budget="128MiB") as s:
        n = iter(range(100))
        ones = np.ones((1, DIM), np.float32)

        def filled():
            c = _collection(s, f"c{next(n)}", policy)
            c.add(*base_data)
            return (c,), {}

        benchmark.pedantic(lambda c: c.retrieve(ones, budget=1.0), setup=filled, rounds=3)
        st = s.collection("c0").stats()
        benchmark.extra_info.update(splits=st.get("splits", 0), clusters=st["clusters"])
        assert len(s.collection("c0").retrieve(ones, budget=1.0)) == N_BASE


def test_retrieve_cached(benchmark, warm):
    s, c = warm
    qs = _queries(16, 3, 3)
    it = iter(range(1 << 30))
    got = benchmark(lambda: c.retrieve(qs[next(it) % len(qs)], budget=0.1))
    assert len(got) > 0


def test_retrieve_cold(benchmark, cold):
    s, c = cold
    call = _Counted(lambda q: c.retrieve(q, budget=0.1), _queries(4000, 3, 4))
    s.reset_io_stats()
    got = benchmark(call)
    assert len(got) > 0
    call.check_mostly_from_flash(s)


def test_search(benchmark, warm):
    s, c = warm
    qs = _queries(16, 1, 5)[:, 0]
    hits = benchmark(lambda: c.search(qs, k=10))
    assert hits.ids.shape == (16, 10) and (hits.ids >= 0).all()


def test_get_cached(benchmark, warm):
    s, c = warm
    ids = np.random.default_rng(6).integers(0, N_BASE, 256)
    k, v = benchmark(lambda: c.get(ids))
    assert k.shape == (256, DIM) and v.shape == (256, DIM)


def test_get_cold(benchmark, cold):
    s, c = cold
    call = _Counted(c.get, np.random.default_rng(7).integers(0, N_BASE, (1000, 256)))
    s.reset_io_stats()
    k, v = benchmark(call)
    assert k.shape == (256, DIM) and v.shape == (256, DIM)
    call.check_mostly_from_flash(s)
