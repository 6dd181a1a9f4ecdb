"""Fault-injection sweeps, beyond the single faults of test_faults.py: for each kind of I/O
(write, sync, read) and each error (EIO; ENOSPC and KVT_EINJECTED, which also leave a torn
half-write behind), the n-th I/O of a step of adaptive work fails, with n swept across the
step: adds that land in flagged clusters (pending entries), splits of clusters read into DRAM,
forced loads when the pending budget overflows, a retrieve, a search, a flush (pending writes,
fdatasync). Every fault must surface as the exception of its code naming the system call and
the data file, or be absorbed by a split that is retried later, or by a write buffer's eviction
that keeps its entries for later (both counted); the call that failed
must change nothing; the store must stay usable (the step is retried and succeeds); and every
committed entry must come back bit for bit, also after a reopen.

Short reads have no hook: a read that ends early is reported as CorruptionError, which the
truncation cases of test_fuzz.py and test_faults.py cover.
"""
from __future__ import annotations

import errno
import shutil

import numpy as np
import pytest

import kvtier
from test_crash import bits, entries

KVT_EINJECTED = -30007
EXPECTED = {errno.EIO: kvtier.StorageIOError, errno.ENOSPC: kvtier.StorageFullError,
            KVT_EINJECTED: kvtier.InjectedFaultError}
SYSCALL = {"w": "pwrite", "s": "fdatasync", "r": "pread"}
# tau_factor 2: these keys are random, without structure, so the first partition's variance
# (measured on the points k-means placed its centroids for) understates how far new keys fall,
# and the default rule splits clusters to about 5 entries; their index would outgrow the small
# budget that keeps this sweep's reads on flash. At 2 they stay near init_cluster_size.
PARAMS = dict(dim=16, value_dim=8, dtype="float16", policy="adaptive", init_cluster_size=8,
              max_cluster_size=16, pending_budget=16, kmeans_iters=4, tau_factor=2.0)
BUDGET = "256KiB"
BATCH = 90
COUNTER = {"w": "write_ops", "s": "sync_ops", "r": "read_ops"}
G_SEED = 10


class Sweep:
    """One store under fault injection and what it must hold."""

    def __init__(self, path):
        self.path = path
        self.s = kvtier.open(path, dram_budget=BUDGET)
        self.c = self.s.collection("f", **PARAMS)
        # a second collection, so that a flush checkpoints (and syncs) twice before its commit
        self.g = self.s.collection("g", dim=16, value_dim=8, dtype="float16", policy="static")
        self.n = self.ng = 0
        self.fired = self.absorbed = self.reached = 0

    def add_ok(self, m: int) -> None:
        k, v = entries(self.n, self.n + m)
        assert self.c.add(k, v).tolist() == list(range(self.n, self.n + m))
        self.n += m

    def step(self, fault: tuple[str, int] | None) -> list[Exception]:
        """Adds a batch, retrieves, searches and flushes; with a fault armed, each call may
        fail once: it is then checked and retried without the fault."""
        errors = []
        k, v = entries(self.n, self.n + BATCH)
        q = k[:2].astype(np.float32)

        def attempt(fn, undo_check=None):
            try:
                return fn()
            except kvtier.KvtierError as e:
                errors.append(e)
                if undo_check:
                    undo_check()
                self.s._inject_fault(fault[0], 0, 0)  # disarm (it fires once anyway)
                return fn()

        def add():
            return self.c.add(k, v)

        def unchanged():
            assert len(self.c) == self.n, "a failed add must add nothing"

        ids = attempt(add, unchanged)
        assert ids.tolist() == list(range(self.n, self.n + BATCH))
        self.n += BATCH
        kg, vg = entries(self.ng, self.ng + 10, seed=G_SEED)

        def unchanged_g():
            assert len(self.g) == self.ng, "a failed add must add nothing"

        attempt(lambda: self.g.add(kg, vg), unchanged_g)
        self.ng += 10
        got = attempt(lambda: self.c.retrieve(q, budget=0.2))
        assert np.array_equal(bits(got.keys), bits(entries_cache(self.n)[0][got.ids]))
        attempt(lambda: self.c.search(q, k=5))
        attempt(self.s.flush)
        return errors

    def check(self, full: bool = False) -> None:
        assert len(self.g) == self.ng
        kg, vg = entries(0, self.ng, seed=G_SEED)
        gk, gv = self.g.get(np.arange(self.ng))
        assert np.array_equal(bits(gk), bits(kg)) and np.array_equal(bits(gv), bits(vg))
        assert len(self.c) == self.n
        k, v = entries_cache(self.n)
        ids = np.arange(self.n) if full else np.unique(np.r_[0:20, self.n - BATCH:self.n])
        gk, gv = self.c.get(ids)
        assert np.array_equal(bits(gk), bits(k[ids])) and np.array_equal(bits(gv), bits(v[ids]))

    def cold(self) -> None:
        """Closes and reopens without checks: an empty cache, so the next step reads flash."""
        self.s.close()
        self.s = kvtier.open(self.path, dram_budget=BUDGET)
        self.c, self.g = self.s.collection("f"), self.s.collection("g")

    def reopen(self) -> None:
        """Closes, checks every entry (with a budget that holds one full retrieve) and goes on
        under the small budget."""
        self.s.close()
        with kvtier.open(self.path, dram_budget="16MiB") as s:
            self.s, self.c, self.g = s, s.collection("f"), s.collection("g")
            self.check(full=True)
            got = self.c.retrieve(np.ones((1, 16), np.float32), budget=self.n)
            k, v = entries_cache(self.n)
            assert np.array_equal(np.sort(got.ids), np.arange(self.n))
            assert np.array_equal(bits(got.keys), bits(k[got.ids])) and np.array_equal(bits(got.values), bits(v[got.ids]))
        self.s = kvtier.open(self.path, dram_budget=BUDGET)
        self.c, self.g = self.s.collection("f"), self.s.collection("g")


_cache: dict = {}


def entries_cache(n: int):
    """entries(0, n), grown incrementally (the sweeps ask for it after every step)."""
    k, v = _cache.get("kv", (np.zeros((0, 16), np.float16), np.zeros((0, 8), np.float16)))
    if len(k) < n:
        k2, v2 = entries(len(k), n)
        k, v = np.concatenate([k, k2]), np.concatenate([v, v2])
        _cache["kv"] = (k, v)
    return k[:n], v[:n]


@pytest.mark.parametrize("op,code", [("w", errno.EIO), ("w", errno.ENOSPC), ("w", KVT_EINJECTED),
                                     ("s", errno.EIO), ("s", KVT_EINJECTED),
                                     ("r", errno.EIO), ("r", KVT_EINJECTED)])
def test_fault_sweep(tmp_path, op, code, record_property):
    sw = Sweep(tmp_path / "s")
    sw.add_ok(400)
    sw.s.flush()
    # how many I/Os of this kind one step issues: the sweep covers them and a little beyond
    if op == "r":  # reads: every step starts cold, or the cache would soon serve them all
        sw.cold()
    before = sw.s.stats()[COUNTER[op]]
    sw.step(None)
    per_step = sw.s.stats()[COUNTER[op]] - before
    assert per_step > 0, f"a step issued no {COUNTER[op]}"
    if op == "s":  # a flush syncs each collection once: fail the first or the second, often
        positions = [0, 1] * 5
    else:
        positions = sorted(set(np.linspace(0, per_step + 2, 14).astype(int).tolist()))
    for i, nth in enumerate(positions):
        if op == "r":
            sw.cold()
        cs = sw.c.stats()
        split_errors = cs["split_errors"] + cs["write_buffer_errors"]
        done = sw.s.stats()[COUNTER[op]]
        sw.s._inject_fault(op, nth, code)
        try:
            errors = sw.step((op, code))
        finally:
            sw.s._inject_fault(op, 0, 0)
        for e in errors:
            assert type(e) is EXPECTED[code], f"{op}#{nth}: {type(e).__name__}: {e}"
            assert SYSCALL[op] in str(e) and ".kvd" in str(e), str(e)
            assert e.code == code
        cs = sw.c.stats()
        absorbed = cs["split_errors"] + cs["write_buffer_errors"] - split_errors
        # more successful calls than nth after arming: the nth call certainly failed, and
        # its failure must show (raised, or counted as a split left for later)
        if sw.s.stats()[COUNTER[op]] - done > nth:
            sw.reached += 1
            assert errors or absorbed, f"{op}#{nth}: an injected fault was swallowed without a trace"
        sw.fired += len(errors)
        sw.absorbed += absorbed
        sw.check()
        if i % 4 == 3:
            sw.reopen()
    sw.reopen()
    sw.s.close()
    msg = (f"fault sweep {op}/{code}: {len(positions)} positions over a step of {per_step} "
           f"{COUNTER[op]}, {sw.reached} certainly reached: {sw.fired} faults raised, {sw.absorbed} "
           f"absorbed (splits, write-buffer evictions), {sw.n + sw.ng} entries intact")
    print("[faults]", msg)
    record_property("reliability", msg)
    assert sw.reached >= len(positions) // 2, "most armed faults should have been reached"


def test_catalog_commit_failure_leaves_the_store_usable(tmp_path, monkeypatch, record_property):
    """The LMDB commit of a flush fails (after the data file was synced): the flush raises,
    nothing is committed, retired pool heads stay retired (the catalog still names them), and
    the next flush commits everything."""
    import lmdb

    sw = Sweep(tmp_path / "s")
    sw.add_ok(400)
    sw.s.flush()
    committed = sw.n
    real = sw.s._catalog.commit
    fails = {"left": 1}

    def failing_commit(*a, **kw):
        if fails["left"]:
            fails["left"] -= 1
            raise lmdb.DiskError("injected: the catalog commit failed")
        return real(*a, **kw)

    monkeypatch.setattr(sw.s._catalog, "commit", failing_commit)
    sw.add_ok(300)
    for _ in range(3):  # retrieves split clusters: their old heads are retired
        sw.c.retrieve(entries(sw.n - 50, sw.n)[0][:2].astype(np.float32), budget=0.2)
    with pytest.raises((lmdb.Error, kvtier.KvtierError)):
        sw.s.flush()
    # reopening now would show the last commit: check it through a copy of the files
    shutil.copytree(tmp_path / "s", tmp_path / "copy", ignore=shutil.ignore_patterns("LOCK", "lock.mdb"))
    with kvtier.open(tmp_path / "copy", dram_budget=BUDGET) as s2:
        assert len(s2.collection("f")) == committed
    sw.add_ok(100)  # splits after the failed commit write to fresh heads, never retired ones
    sw.s.flush()
    sw.check()
    sw.reopen()
    sw.s.close()
    record_property("reliability", "catalog commit failure: 1 fault, store usable, data intact")


def test_catalog_map_full_grows_and_commits(tmp_path):
    """A commit that overflows the LMDB map takes the grow-and-retry path."""
    sw = Sweep(tmp_path / "s")
    sw.add_ok(200)
    sw.s.flush()
    env = sw.s._catalog.env
    small = (env.info()["last_pgno"] + 2) * env.stat()["psize"]
    env.set_mapsize(small)  # no room for the bigger directory of the next flush
    sw.add_ok(3000)
    sw.s.flush()
    assert env.info()["map_size"] > small
    sw.reopen()
    sw.s.close()
