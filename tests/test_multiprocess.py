"""Concurrency. Threads: many readers (get, search, retrieve, stats) while one thread adds and
another flushes, under the adaptive policy with a small DRAM and pending budget, so splits,
forced loads and checkpoints run between the reads (a heavier variant of
test_concurrency.py). Processes: a second process opening an open store gets a clear
StoreLockedError, at any moment of the owner's adds and flushes, and changes nothing; the lock
dies with its owner (SIGKILL included); of several processes racing to open, one wins.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import numpy as np

import kvtier
from test_crash import bits, entries

PARAMS = dict(dim=16, value_dim=8, dtype="float16", policy="adaptive", init_cluster_size=8,
              max_cluster_size=16, pending_budget=16, kmeans_iters=4)


def test_threads_read_while_one_adds_and_another_flushes(tmp_path, record_property):
    total, batch = 6000, 20
    k_all, v_all = entries(0, total)
    kf = k_all.astype(np.float32)
    s = kvtier.open(tmp_path / "s", dram_budget="1MiB")
    c = s.collection("c", **PARAMS)
    c.add(k_all[:500], v_all[:500])
    errors: list[BaseException] = []
    stop = threading.Event()
    counts = {"get": 0, "search": 0, "retrieve": 0, "flush": 0}

    def guard(fn):
        def run(*a):
            try:
                fn(*a)
            except BaseException as e:  # noqa: BLE001 - reported by the main thread
                errors.append(e)
                stop.set()
        return run

    @guard
    def reader(seed):
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            n = len(c)
            ids = rng.integers(0, n, 24)
            gk, gv = c.get(ids)
            assert np.array_equal(bits(gk), bits(k_all[ids])) and np.array_equal(bits(gv), bits(v_all[ids]))
            q = kf[rng.integers(0, n, 2)] + rng.standard_normal((2, 16)).astype(np.float32) * 0.1
            got = c.retrieve(q, budget=0.03)
            assert len(set(got.ids.tolist())) == len(got)
            assert np.array_equal(bits(got.keys), bits(k_all[got.ids]))
            assert np.array_equal(bits(got.values), bits(v_all[got.ids]))
            hits = c.search(q, k=5)
            ok = hits.ids >= 0
            # every hit's score is its key's true score: no torn or misattributed entry
            want = np.einsum("qd,qkd->qk", q, kf[np.where(ok, hits.ids, 0)])
            np.testing.assert_allclose(hits.scores[ok], want[ok], rtol=1e-3, atol=1e-2)
            st = c.stats()
            assert st["entries"] >= n
            counts["get"] += 1
            counts["search"] += 1
            counts["retrieve"] += 1

    @guard
    def flusher():
        while not stop.is_set():
            s.flush()
            counts["flush"] += 1
            time.sleep(0.01)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
    threads.append(threading.Thread(target=flusher))
    for t in threads:
        t.start()
    try:
        for lo in range(500, total, batch):
            if stop.is_set():
                break
            assert c.add(k_all[lo:lo + batch], v_all[lo:lo + batch])[0] == lo
            time.sleep(0.004)  # let the readers and the flusher in between the adds
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors
    st = c.stats()
    s.close()
    with kvtier.open(tmp_path / "s", dram_budget="16MiB") as s:
        c = s.collection("c")
        assert len(c) == total
        got = c.retrieve(kf[:1], budget=total)
        order = np.argsort(got.ids)
        assert np.array_equal(got.ids[order], np.arange(total))
        assert np.array_equal(bits(got.keys[order]), bits(k_all))
    msg = (f"threads: {counts['get']} reader rounds (get+retrieve+search) and {counts['flush']} flushes "
           f"beside {total} adds; splits {st['splits']}, forced loads {st['forced_loads']}")
    print("[concurrency]", msg)
    record_property("reliability", msg)
    assert st["splits"] > 0 and counts["flush"] > 0 and counts["get"] > 0


# -- a second process ----------------------------------------------------------------------------

PROBE = """
import sys, time, kvtier
path, seconds = sys.argv[1], float(sys.argv[2])
end = time.monotonic() + seconds
locked = opened = 0
while True:
    try:
        kvtier.open(path).close()
        opened += 1
    except kvtier.StoreLockedError as e:
        assert path in str(e) and "another process" in str(e), str(e)
        locked += 1
    if time.monotonic() > end:
        break
    time.sleep(0.005)
print(locked, opened)
"""

HOLD = """
import sys, time, os, kvtier
path, go, hold = sys.argv[1], sys.argv[2], float(sys.argv[3])
while not os.path.exists(go):
    time.sleep(0.001)
try:
    s = kvtier.open(path)
except kvtier.StoreLockedError:
    print("locked", flush=True)
    sys.exit(0)
print("opened", flush=True)
time.sleep(hold)
s.close()
"""


def run_py(code: str, *args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_second_process_gets_store_locked_while_the_owner_writes(tmp_path, record_property):
    k, v = entries(0, 3000)
    path = tmp_path / "s"
    with kvtier.open(path, dram_budget="1MiB") as s:
        c = s.collection("c", **PARAMS)
        c.add(k[:200], v[:200])
        s.flush()
        probe = run_py(PROBE, path, 2.0)
        n = 200
        deadline = time.monotonic() + 30
        while probe.poll() is None and time.monotonic() < deadline:  # adds and flushes meanwhile
            m = min(100, 3000 - n)
            if m:
                c.add(k[n:n + m], v[n:n + m])
                n += m
            s.flush()
        out, err = probe.communicate(timeout=30)
        assert probe.returncode == 0, err[-2000:]
        locked, opened = map(int, out.split())
        assert opened == 0 and locked > 0
    # the refused opens changed nothing: everything the owner committed is there
    with kvtier.open(path, dram_budget="16MiB") as s:
        c = s.collection("c")
        assert len(c) == n
        gk, gv = c.get(np.arange(n))
        assert np.array_equal(bits(gk), bits(k[:n])) and np.array_equal(bits(gv), bits(v[:n]))
    msg = f"second process: {locked} opens refused with StoreLockedError while the owner wrote {n} entries"
    print("[concurrency]", msg)
    record_property("reliability", msg)


def test_the_lock_dies_with_its_owner(tmp_path):
    path = tmp_path / "s"
    with kvtier.open(path) as s:
        s.collection("c", dim=4, value_dim=0).add(np.ones((10, 4)))
    go = tmp_path / "go"
    go.touch()
    owner = run_py(HOLD, path, go, 60)
    assert owner.stdout.readline().strip() == "opened"
    try:
        try:
            kvtier.open(path)
            raise AssertionError("a second opener got in while the owner held the store")
        except kvtier.StoreLockedError:
            pass
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.communicate(timeout=30)
    with kvtier.open(path) as s:  # no stale lock after a SIGKILL
        assert len(s.collection("c")) == 10


def test_one_of_racing_processes_wins(tmp_path):
    path = tmp_path / "s"
    kvtier.open(path).close()
    go = tmp_path / "go"
    procs = [run_py(HOLD, path, go, 3.0) for _ in range(4)]
    time.sleep(0.8)  # let them start and wait for the signal
    go.touch()
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-500:] for _, e in outs]
    said = sorted(o.strip() for o, _ in outs)
    assert said.count("opened") == 1 and said.count("locked") == 3, said
