"""Crash consistency: a child process adds and flushes in a loop and is killed with SIGKILL,
at random moments and at each kill point of the engine and the catalog; after every kill the
store reopens with every entry flushed before the kill there bit for bit (ids 0..n-1 in
insertion order), every entry retrieved exactly once, and nothing unflushed damaging it; the
next child then goes on adding from len(coll), so one store lives through all the kills.

Entry i comes from a deterministic generator (it depends only on SEED and i), so the parent
knows what every id must hold without the child telling it; the child only reports, on its
stdout pipe, how many entries it had flushed each time flush() returned. The workload (topic
shifts, runs of identical keys, a small DRAM and pending budget, retrieves between adds) makes
the adaptive policy flag, defer, force-load and split clusters, so kills land inside splits,
pending writes, reuse of retired pool heads and catalog commits.

Knobs for longer runs: KVTIER_CRASH_KILLS (random kills, default 40), KVTIER_CRASH_SEED.
Each test reports its counts (kills survived, entries verified) with print (seen with -s) and
record_property("reliability", ...) (the JUnit XML, and a terminal-summary hook under -q).
"""
from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import time

import numpy as np

import kvtier
from kvtier.config import parse_size

SEED = 9
DIM, VDIM = 16, 8
NAME = "crash"
BUDGET = "1MiB"
VERIFY_BUDGET = "64MiB"
PARAMS = dict(dim=DIM, value_dim=VDIM, dtype="float16", init_cluster_size=8, max_cluster_size=24,
              pending_budget=24, kmeans_iters=4)
BLOCK = 64
CHILD_TIMEOUT = 60.0


def entries(lo: int, hi: int, seed: int = SEED, dim: int = DIM, vdim: int = VDIM,
            dtype=np.float16) -> tuple[np.ndarray, np.ndarray]:
    """Keys and values of entries lo..hi-1. Block b (BLOCK entries) draws from its own
    generator, so entry i never depends on how the adds were batched. Every 256 entries the
    topic moves to new centres (new entries land in clusters they do not fit: splits), and
    every 16th block repeats one key (clusters that cannot split)."""
    if hi <= lo:
        return np.zeros((0, dim), dtype), np.zeros((0, vdim), dtype)
    ks, vs = [], []
    for b in range(lo // BLOCK, (hi - 1) // BLOCK + 1):
        rng = np.random.default_rng((seed, b))
        centres = np.random.default_rng((seed, 1 << 20, b // 4)).standard_normal((4, dim)) * 3
        if b % 16 == 15:
            k = np.repeat(centres[:1], BLOCK, axis=0)
        else:
            k = centres[rng.integers(0, 4, BLOCK)] + rng.standard_normal((BLOCK, dim))
        ks.append(k.astype(dtype))
        vs.append(rng.standard_normal((BLOCK, vdim)).astype(dtype))
    k, v = np.concatenate(ks), np.concatenate(vs)
    off = lo - (lo // BLOCK) * BLOCK
    return k[off:off + hi - lo], v[off:off + hi - lo]


def bits(a: np.ndarray) -> np.ndarray:
    """An array's raw bits, so that comparisons are bit for bit (NaN payloads, -0.0 too)."""
    return np.ascontiguousarray(a).view(np.uint8)


# -- the child ---------------------------------------------------------------------------------

def child_budget(n: int) -> int:
    """The child's DRAM budget: what cannot be evicted grows with the store (the directory and
    the id map, some 60 bytes per entry here), so the budget grows with it and leaves the
    cache a constant, small share (BUDGET): clusters keep leaving DRAM, so entries for flagged
    clusters wait as pending entries and splits need forced loads."""
    return parse_size(BUDGET) + 96 * (n + 4000)


def child_main(path: str, policy: str, target: int, seed: int, budget: int) -> None:
    """Adds entries len(coll).. in random batches until `target`, flushing often; prints
    "ready n" once open, then "flushed n <counters>" after every flush() returned."""
    s = kvtier.open(path, dram_budget=budget)
    c = s.collection(NAME, policy=policy, **PARAMS)
    n = len(c)
    print("ready", n, flush=True)
    rng = np.random.default_rng((seed, n))
    most_pending = 0
    while n < target:
        b = int(rng.integers(1, 80))
        k, v = entries(n, n + b)
        c.add(k, v)
        n += b
        r = rng.random()
        if r < 0.35:  # reads clusters into DRAM: the adaptive policy splits flagged ones there
            c.retrieve(k[:2].astype(np.float32), budget=0.05)
        elif r < 0.45:
            c.search(k[:4].astype(np.float32), k=5)
        st = c.stats()
        most_pending = max(most_pending, st["pending_entries"])
        if rng.random() < 0.6:
            s.flush()
            print("flushed", n, st["splits"], st["forced_loads"], most_pending, st["deferred_splits"],
                  flush=True)
    s.close()
    print("flushed", n, "done", flush=True)


# -- the parent --------------------------------------------------------------------------------

class Run:
    """One child: its exit status and what it reported."""

    def __init__(self, proc: subprocess.Popen, ready: bool, lines: list[str]):
        self.returncode = proc.returncode
        self.ready = ready
        self.flushed = 0
        self.counters = [0, 0, 0, 0]  # splits, forced loads, peak pending entries, deferred splits
        for ln in lines:
            f = ln.split()
            if len(f) >= 2 and f[0] == "flushed":
                self.flushed = int(f[1])
                if len(f) >= 6:
                    self.counters = [int(x) for x in f[2:6]]

    @property
    def killed(self) -> bool:
        return self.returncode == -signal.SIGKILL


def spawn(path, policy: str, target: int, seed: int, kill_at: str | None = None, n: int = 0) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("KVTIER_KILL_AT", None)
    if kill_at:
        env["KVTIER_KILL_AT"] = kill_at
    return subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--child", os.fspath(path), policy, str(target), str(seed),
         str(child_budget(n))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def run_child(path, policy: str, target: int, seed: int, kill_after: float | None = None,
              kill_at: str | None = None, n: int = 0) -> Run:
    """Runs a child to its end, or SIGKILLs it `kill_after` seconds after it reported ready.
    `n`: the entries the store holds now (sets the child's budget)."""
    p = spawn(path, policy, target, seed, kill_at, n)
    lines: list[str] = []
    ready = False
    deadline = time.monotonic() + CHILD_TIMEOUT
    try:
        if kill_after is not None:
            while not ready and time.monotonic() < deadline:
                r, _, _ = select.select([p.stdout], [], [], deadline - time.monotonic())
                if not r:
                    break
                ln = p.stdout.readline()
                if not ln:  # the child ended before it was ready
                    break
                lines.append(ln)
                ready = ln.startswith("ready")
            if ready:
                time.sleep(kill_after)
                p.send_signal(signal.SIGKILL)
        out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise AssertionError(f"crash child hung for {CHILD_TIMEOUT} s") from None
    lines += out.splitlines()
    ready = ready or any(ln.startswith("ready") for ln in lines)
    run = Run(p, ready, lines)
    if not run.killed and p.returncode != 0:
        raise AssertionError(f"crash child failed (exit {p.returncode}):\n{err[-3000:]}")
    return run


def verify(path, flushed: int, policy: str) -> int:
    """Reopens the store and checks everything committed; returns the entry count. The budget
    is larger than the child's so that one retrieve can return every entry."""
    with kvtier.open(path, dram_budget=VERIFY_BUDGET) as s:
        if NAME not in s.collections():
            assert flushed == 0, f"collection lost after {flushed} entries were flushed"
            return 0
        c = s.collection(NAME)
        assert c.policy == policy
        n = len(c)
        assert n >= flushed, f"{flushed} entries were flushed but only {n} survived the kill"
        if n == 0:
            return 0
        k, v = entries(0, n)
        # get() reads record by record: a sample from flash (the newest entries, where a kill
        # does its damage, and random older ones); the full retrieve below checks them all
        ids = np.unique(np.concatenate([np.arange(max(0, n - 200), n),
                                        np.random.default_rng(n).integers(0, n, 200)]))
        gk, gv = c.get(ids)
        bad = ids[(bits(gk).reshape(len(ids), -1) != bits(k[ids]).reshape(len(ids), -1)).any(1)
                  | (bits(gv).reshape(len(ids), -1) != bits(v[ids]).reshape(len(ids), -1)).any(1)]
        assert bad.size == 0, f"{bad.size} entries differ after the kill, first id {bad[:1]}"
        q = k[[0, n // 2, n - 1]].astype(np.float32)
        got = c.retrieve(q, budget=n)
        order = np.argsort(got.ids)
        assert np.array_equal(got.ids[order], np.arange(n)), "a full retrieve must return every id once"
        bad = np.nonzero((bits(got.keys[order]).reshape(n, -1) != bits(k).reshape(n, -1)).any(1)
                         | (bits(got.values[order]).reshape(n, -1) != bits(v).reshape(n, -1)).any(1))[0]
        assert bad.size == 0, f"{bad.size} of {n} entries differ after the kill, first id {bad[:1]}"
        # a search probing every cluster is exact: its scores are the true top 5
        top = min(5, n)
        hits = c.search(q, k=top, nprobe=1 << 30)
        want = np.sort(q @ k.astype(np.float32).T, axis=1)[:, ::-1][:, :top]
        assert ((hits.ids >= 0) & (hits.ids < n)).all()
        np.testing.assert_allclose(hits.scores, want, rtol=1e-4, atol=1e-3)
        return n


def report(record_property, msg: str) -> None:
    """Prints the counts (seen with -s) and records them (a terminal-summary hook or the JUnit
    XML shows them with -q)."""
    print("[crash]", msg, flush=True)
    record_property("reliability", msg)


def test_random_kills_over_one_store(tmp_path, record_property):
    kills = int(os.environ.get("KVTIER_CRASH_KILLS", "40"))
    seed = int(os.environ.get("KVTIER_CRASH_SEED", "20260611"))
    rnd = random.Random(seed)
    path = tmp_path / "store"
    n = survived = verified = peak_pending = 0
    totals = np.zeros(4, np.int64)
    for i in range(kills):
        if rnd.random() < 0.1:  # while it starts: imports, open, catalog creation
            run = _kill_early(path, n + 20000, seed + i, rnd, n)
        else:
            run = run_child(path, "adaptive", n + 20000, seed + i, kill_after=rnd.uniform(0.0, 0.45), n=n)
        totals += np.array(run.counters)
        peak_pending = max(peak_pending, run.counters[2])
        survived += int(run.killed)
        m = verify(path, run.flushed, "adaptive")
        assert m >= n, f"kill {i}: {n} entries were committed before this child, {m} after"
        verified += m
        n = m
    report(record_property, f"random kills: {survived} kills survived of {kills} runs, {n} entries in the store, "
           f"{verified} entries verified; child counters: splits {totals[0]}, forced loads {totals[1]}, "
           f"deferred splits {totals[3]}, peak pending entries {peak_pending} (seed {seed})")
    assert survived == kills, "every child must have been killed mid-run"
    assert n > 0 and totals[0] > 0, "the workload must have split clusters"
    assert totals[1] + totals[3] > 0 and peak_pending > 0, "the workload must defer and force splits"


def _kill_early(path, target, seed, rnd, n) -> Run:
    """Kills a child at a random moment of its start (imports, open, catalog creation)."""
    p = spawn(path, "adaptive", target, seed, n=n)
    time.sleep(rnd.uniform(0.1, 0.6))
    p.send_signal(signal.SIGKILL)
    out, err = p.communicate(timeout=CHILD_TIMEOUT)
    run = Run(p, any(ln.startswith("ready") for ln in out.splitlines()), out.splitlines())
    if not run.killed and p.returncode != 0:
        raise AssertionError(f"crash child failed (exit {p.returncode}):\n{err[-3000:]}")
    return run


KILL_POINTS = ["add.written", "split.written", "checkpoint.pending_written", "checkpoint.synced",
               "catalog.before_commit", "catalog.committed"]


def test_kill_points(tmp_path, record_property):
    """Every kill point, at several of its passes, over one store per point: the child must die
    there (a point never reached fails the test) and the store must reopen intact, holding
    exactly the last commit: the entries of the flush in progress only if its catalog
    transaction had committed."""
    kills = verified = 0
    for point in KILL_POINTS:
        path = tmp_path / point
        n = 0
        for nth in (0, 1, 3, 6):
            run = run_child(path, "adaptive", n + 3000, 100 + nth, kill_at=f"{point}:{nth}", n=n)
            assert run.killed, f"kill point {point}:{nth} was never reached (the child ran to its end)"
            kills += 1
            m = verify(path, run.flushed, "adaptive")
            if point == "catalog.committed":  # that flush committed: its entries survive too
                assert m > max(run.flushed, n), (point, nth, n, run.flushed, m)
            else:  # the flush in progress never committed: exactly the last one survives
                assert m == max(run.flushed, n), (point, nth, n, run.flushed, m)
            verified += m
            n = m
    report(record_property, f"kill points: {kills} kills survived at {len(KILL_POINTS)} points, {verified} entries verified")


def test_random_kills_other_policies(tmp_path, record_property):
    """A shorter run of random kills for the policies that move entries differently: local
    reclusters windows (regroup to fresh heads), static only appends."""
    rnd = random.Random(7)
    total = 0
    for policy in ("local", "static"):
        path = tmp_path / policy
        n = 0
        for i in range(6):
            run = run_child(path, policy, n + 50000, 300 + i, kill_after=rnd.uniform(0.0, 0.35), n=n)
            m = verify(path, run.flushed, policy)
            assert m >= n
            total += int(run.killed)
            n = m
    report(record_property, f"other policies: {total} kills survived (local, static)")
    assert total == 12, "every child must have been killed mid-run"


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    child_main(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
