"""The estimated zone (issue 21): value sums per cluster and ``retrieve(..., estimate=)``.

Checked against direct computation: an exact estimate when every cluster is one entry;
value sums equal to the sums of the stored values (read back with ``get``) after adds,
splits, regroupings, park/unpark, reopen, an upgrade of a directory written before sums
existed, and a crash; reads identical with and without an estimate; and the torch merge
equal to full attention when the estimated zone is exact or empty.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import kvtier

D, VD = 16, 8


def lse(x, axis=-1):
    m = x.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def rep16(m):
    """Representatives as the engine keeps them: float16 (docs/design.md §2.3)."""
    return np.asarray(m, np.float64).astype(np.float16).astype(np.float64)


def rep_tol(q, means, scale):
    """Bound on |scale * q . (kept mean - exact mean)| per query row: a float16 mean kept by
    running (Welford) updates, each rounded, lies within a few units in the last place of the
    exact mean (2 here, and 4 allowed); lse moves by at most its largest input's change."""
    ulp = np.spacing(np.abs(rep16(means)).astype(np.float16)).astype(np.float64)
    return scale * (np.abs(q) @ (4 * ulp).T).max(axis=1) + 1e-5


def data(n, seed=0, centres=6):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, D)) * 3
    k = c[rng.integers(0, centres, n)] + rng.standard_normal((n, D))
    v = rng.standard_normal((n, VD))
    return k.astype(np.float32), v.astype(np.float32)


def check_sums(coll, rtol=1e-4, atol=1e-3):
    """value_sums equals the per-cluster sums of the values ``get`` reads back; cluster
    membership from a retrieve that fetches everything. Returns the number of clusters."""
    n = len(coll)
    r = coll.retrieve(np.zeros((1, coll.dim), np.float32), budget=n)
    assert len(r) == n
    sizes, sums = coll.value_sums()
    _, vals = coll.get(r.ids)
    want = np.zeros_like(sums, dtype=np.float64)
    np.add.at(want, r.clusters, vals.astype(np.float64))
    assert sizes.sum() == n
    np.testing.assert_array_equal(sizes, np.bincount(r.clusters, minlength=len(sizes)))
    np.testing.assert_allclose(sums, want, rtol=rtol, atol=atol)
    return int((sizes > 0).sum())


def test_singleton_clusters_give_the_exact_estimate(tmp_path):
    k, v = data(80, seed=1, centres=80)
    with kvtier.open(tmp_path) as s:
        c = s.collection("c", dim=D, value_dim=VD, dtype="float32", policy="static", init_cluster_size=1,
                         value_sums=True)
        c.add(k, v)
        assert (c.cluster_sizes() == 1).all() and len(c.cluster_sizes()) == 80
        q = np.random.default_rng(2).standard_normal((3, D)).astype(np.float32)
        scale = 1 / np.sqrt(D)
        for m in (None, True, 0, 5, 30, 1000):
            r = c.retrieve(q, budget=12, estimate=m)
            fetched = np.zeros(80, bool)
            fetched[r.ids] = True
            rest = np.flatnonzero(~fetched)
            if m is not True and m is not None:  # the next m of the ranking (group max score)
                score = (q @ rep16(k[rest]).T).max(0)
                rest = rest[np.lexsort((rest, -score))][:m]
            assert r.est_clusters == len(rest) and r.est_entries == len(rest)
            if not len(rest):
                assert np.isneginf(r.est_lse).all() and not r.est_values.any()
                continue
            s_ = q @ rep16(k[rest]).T * scale  # a singleton's mean is its key, kept in float16
            np.testing.assert_allclose(r.est_lse, lse(s_), rtol=1e-5, atol=1e-5)
            w = np.exp(s_ - lse(s_)[:, None])
            np.testing.assert_allclose(r.est_values, w @ v[rest], rtol=1e-4, atol=1e-5)
        # singletons have no variance: the Gaussian mass is the same
        r2 = c.retrieve(q, budget=12, estimate=True, variance=True)
        r1 = c.retrieve(q, budget=12, estimate=True)
        np.testing.assert_allclose(r2.est_lse, r1.est_lse, rtol=1e-6)
        # another scale
        r = c.retrieve(q, budget=12, estimate=True, scale=0.5)
        rest = np.setdiff1d(np.arange(80), r.ids)
        np.testing.assert_allclose(r.est_lse, lse(0.5 * q @ rep16(k[rest]).T), rtol=1e-5, atol=1e-5)


def test_estimate_of_a_cluster_is_its_mean_key_and_mean_value(tmp_path):
    k, v = data(300, seed=3)
    with kvtier.open(tmp_path) as s:
        c = s.collection("c", dim=D, value_dim=VD, dtype="float32", policy="static", init_cluster_size=30,
                         value_sums=True)
        c.add(k, v)
        q = np.random.default_rng(4).standard_normal((2, D)).astype(np.float32)
        r = c.retrieve(q, budget=40, estimate=True)
        full = c.retrieve(q, budget=300)
        sizes, sums = c.value_sums()
        rest = np.setdiff1d(np.flatnonzero(sizes), np.unique(r.clusters))
        means = np.stack([k[full.ids[full.clusters == j]].mean(0) for j in rest])
        lw = np.log(sizes[rest]) + q @ rep16(means).T / np.sqrt(D)
        tol = rep_tol(q, means, 1 / np.sqrt(D))
        assert (np.abs(r.est_lse - lse(lw)) <= tol).all(), (r.est_lse - lse(lw), tol)
        w = np.exp(lw - lse(lw)[:, None])
        vmean = sums[rest] / sizes[rest, None]  # a weight moves by at most ~2 x tol (relative)
        assert (np.abs(r.est_values - w @ vmean) <= 2 * tol[:, None] * np.abs(vmean).max() + 1e-5).all()
        assert r.est_entries == sizes[rest].sum()


def test_variance_adds_the_gaussian_term(tmp_path):
    k, v = data(300, seed=3)
    with kvtier.open(tmp_path) as s:
        for temp in (0.0, 0.25):  # mean variance, or per-dimension variances (score_temp > 0)
            c = s.collection(f"c{temp}", dim=D, value_dim=VD, dtype="float32", policy="static",
                             init_cluster_size=30, score_temp=temp, value_sums=True)
            c.add(k, v)
            q = np.random.default_rng(4).standard_normal((2, D)).astype(np.float32)
            r = c.retrieve(q, budget=40, estimate=True, variance=True)
            full = c.retrieve(q, budget=300)
            sizes, sums = c.value_sums()
            rest = np.setdiff1d(np.flatnonzero(sizes), np.unique(r.clusters))
            members = [k[full.ids[full.clusters == j]].astype(np.float64) for j in rest]
            means = np.stack([m.mean(0) for m in members])
            var = np.stack([m.var(0) for m in members])  # per dimension
            if temp == 0:
                var = np.repeat(var.mean(1, keepdims=True), D, 1)
            t = 1 / np.sqrt(D)
            lw = np.log(sizes[rest]) + t * q @ rep16(means).T + 0.5 * t * t * (q * q) @ var.T
            tol = rep_tol(q, means, t) + 1e-4
            assert (np.abs(r.est_lse - lse(lw)) <= tol).all(), (r.est_lse - lse(lw), tol)


def test_budget_covering_everything_leaves_nothing_to_estimate(tmp_path):
    k, v = data(200)
    with kvtier.open(tmp_path) as s:
        c = s.collection("c", dim=D, value_dim=VD, policy="adaptive", init_cluster_size=16, value_sums=True)
        c.add(k, v)
        r = c.retrieve(k[:3], budget=1.0, estimate=True)
        assert len(r) == 200 and r.est_clusters == 0 and np.isneginf(r.est_lse).all()


@pytest.mark.parametrize("policy", ["static", "local", "adaptive"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_sums_after_adds_splits_park_and_reopen(tmp_path, policy, dtype):
    k, v = data(1200, seed=5)
    kw = dict(dim=D, value_dim=VD, dtype=dtype, policy=policy, init_cluster_size=16, max_cluster_size=32,
              value_sums=True)
    if policy == "local":
        kw.update(local_window=64, local_cluster_size=16)
    tol = dict(rtol=1e-3, atol=1e-2) if dtype == "float16" else {}
    with kvtier.open(tmp_path, dram_budget="4MiB") as s:
        c = s.collection("c", **kw)
        c.add(k[:300], v[:300])
        for i in range(300, 1200, 75):  # appends, with retrieves between them (adaptive splits in DRAM)
            c.add(k[i:i + 75], v[i:i + 75])
            c.retrieve(k[i:i + 2], budget=0.2, estimate=4)
        st = c.stats()
        if policy != "static":
            assert st["splits"] > 0, st
        check_sums(c, **tol)
        s.park([c])
        check_sums(c, **tol)  # brought back from its image
        s.flush()
    with kvtier.open(tmp_path, dram_budget="4MiB") as s:
        check_sums(s.collection("c"), **tol)


def test_value_sums_refused_without_values(tmp_path):
    with kvtier.open(tmp_path) as s:
        c = s.collection("c", dim=D, value_dim=VD, policy="none", value_sums=True)
        c.add(*data(50))
        with pytest.raises(kvtier.InvalidArgumentError, match="value_sums"):
            c.value_sums()
        r = c.retrieve(np.ones((2, D), np.float32), budget=5, estimate=True)  # none: ignored
        assert len(r) == 5 and r.est_clusters == 0 and np.isneginf(r.est_lse).all()


def test_estimate_arguments_checked(tmp_path):
    with kvtier.open(tmp_path) as s:
        c = s.collection("c", dim=D, value_dim=VD, value_sums=True)
        c.add(*data(50))
        q = np.ones((1, D), np.float32)
        for bad in (-1, 1.5, "all"):
            with pytest.raises(kvtier.InvalidArgumentError, match="estimate"):
                c.retrieve(q, budget=5, estimate=bad)
        for bad in (0, -1.0, float("nan"), float("inf")):
            with pytest.raises(kvtier.InvalidArgumentError, match="scale"):
                c.retrieve(q, budget=5, estimate=True, scale=bad)
        with pytest.raises(kvtier.InvalidArgumentError, match="variance"):
            c.retrieve(q, budget=5, estimate=True, variance=1)
        with pytest.raises(kvtier.InvalidArgumentError, match="only meaningful"):
            c.retrieve(q, budget=5, scale=0.5)


@pytest.mark.parametrize("policy", ["static", "local", "adaptive"])
def test_reads_identical_with_and_without_estimate(tmp_path, policy):
    """Two stores built alike; the same retrieves, one with estimates: the same reads."""
    k, v = data(2000, seed=7)
    qs = np.random.default_rng(8).standard_normal((20, 3, D)).astype(np.float32) * 2
    seen = []
    for est in (False, True, 3):
        path = tmp_path / f"s{est}"
        path.mkdir()
        with kvtier.open(path, dram_budget="256KiB", write_buffer=0) as s:
            c = s.collection("c", dim=D, value_dim=VD, policy=policy, init_cluster_size=16, max_cluster_size=48,
                             value_sums=True)
            for i in range(0, 2000, 250):
                c.add(k[i:i + 250], v[i:i + 250])
            s.reset_io_stats()
            got = [c.retrieve(q, budget=0.05, estimate=est).ids.tolist() for q in qs]
            st = s.stats()
            seen.append((got, st["read_ops"], st["read_bytes"], st["read_entries"]))
    assert seen[0][1] > 0
    assert seen[1] == seen[0] and seen[2] == seen[0]


def test_value_sums_are_opt_in_and_kept_across_reopen(tmp_path):
    """Without value_sums a collection keeps none (no DRAM for them) and refuses estimates;
    the setting is part of the collection's parameters; the frozen format fixtures (written
    before sums existed) open without them."""
    with kvtier.open(tmp_path / "a") as s:
        c = s.collection("c", dim=D, value_dim=VD)
        c.add(*data(100))
        with pytest.raises(kvtier.InvalidArgumentError, match="value_sums"):
            c.retrieve(np.ones((1, D), np.float32), budget=5, estimate=True)
        with pytest.raises(kvtier.InvalidArgumentError, match="value_sums"):
            c.value_sums()
        s.collection("w", dim=D, value_dim=VD, value_sums=True).add(*data(100))
        with pytest.raises(kvtier.InvalidArgumentError, match="value_sums"):
            s.collection("c", value_sums=True)
        with pytest.raises(kvtier.InvalidArgumentError, match="value_sums"):
            s.collection("x", dim=D, value_sums=1)
        s.flush()
    with kvtier.open(tmp_path / "a") as s:
        assert check_sums(s.collection("w", value_sums=True)) > 1
        assert s.collection("c").params["value_sums"] is False
    fixtures = sorted(p for p in (Path(__file__).parent / "fixtures").glob("store_v*") if (p / "MANIFEST.json").exists())
    assert fixtures
    for src in fixtures:
        manifest = json.loads((src / "MANIFEST.json").read_text())
        dst = tmp_path / src.name
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("MANIFEST.json"))
        with kvtier.open(dst, dram_budget="4MiB") as s:
            for name in manifest["collections"]:
                assert not s.collection(name).params.get("value_sums")


CHILD = textwrap.dedent("""
    import os, sys, numpy as np, kvtier
    sys.path.insert(0, {tests!r})
    from test_estimate import data, D, VD
    k, v = data(900, seed=11)
    s = kvtier.open({path!r}, dram_budget="2MiB")
    c = s.collection("c", dim=D, value_dim=VD, policy="adaptive", init_cluster_size=16, max_cluster_size=32,
                     pending_budget=16, value_sums=True)
    c.add(k[:300], v[:300])
    for i in range(300, 600, 50):
        c.add(k[i:i + 50], v[i:i + 50])
        c.retrieve(k[i:i + 2], budget=0.2)
    s.flush()
    for i in range(600, 900, 50):  # never committed: lost in the crash
        c.add(k[i:i + 50], v[i:i + 50])
        c.retrieve(k[i:i + 2], budget=0.2)
    os._exit(0)  # a crash: no close, no flush
""")


def test_sums_after_crash_recovery(tmp_path):
    path = tmp_path / "s"
    path.mkdir()
    code = CHILD.format(tests=str(Path(__file__).parent), path=str(path))
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    with kvtier.open(path, dram_budget="4MiB") as s:
        c = s.collection("c")
        assert len(c) == 600
        assert check_sums(c) > 1


def test_merge_equals_full_attention():
    torch = pytest.importorskip("torch", reason="the torch merge needs torch")
    from kvtier.adapters.torch import estimate as est

    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 2, 16, generator=g) * 3  # [heads, T, d]
    k = torch.randn(3, 50, 16, generator=g) * 3
    v = torch.randn(3, 50, 8, generator=g)
    scale = 0.25
    full = torch.softmax(q @ k.transpose(-1, -2) * scale, -1) @ v
    # zone B computed exactly stands in for an estimate: the merge is then full attention
    out_b, lse_b = est.exact_attention(q, k[:, 30:], v[:, 30:], scale)
    got = est.attend(q, k[:, :30], v[:, :30], scale, est_lse=lse_b, est_val=out_b)
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)
    # an empty zone (-inf) changes nothing, whatever its value
    none = torch.full((3, 2), float("-inf"))
    got = est.attend(q, k, v, scale, est_lse=none, est_val=torch.full((3, 2, 8), 1e30))
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)
    # stable for huge logits
    out_b, lse_b = est.exact_attention(q * 100, k[:, 30:], v[:, 30:], scale)
    got = est.attend(q * 100, k[:, :30], v[:, :30], scale, est_lse=lse_b, est_val=out_b)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, torch.softmax(q * 100 @ k.transpose(-1, -2) * scale, -1) @ v, rtol=1e-4, atol=1e-4)
