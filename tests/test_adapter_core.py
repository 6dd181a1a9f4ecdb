"""kvtier.adapters._core, the part both adapters share (no torch or llama.cpp needed): store
ownership and cleanup, the collection grid, per-layer adds and retrieves, counters and stats
names; and the adapters' argument checks in kvtier.params."""
import gc
import os

import numpy as np
import pytest

import kvtier
from kvtier.adapters import _core
from kvtier.params import estimate_clusters, flag, one_of, options


class Adapter:
    pass


def test_temporary_store_is_removed_and_callbacks_run_after_it(tmp_path):
    order = []
    owner = _core.StoreOwner(None, prefix="kvtier-test-")
    store, tmp = owner.store, owner.tmpdir
    assert owner.owned and os.path.isdir(tmp) and os.path.basename(tmp).startswith("kvtier-test-")
    owner.on_close(lambda: order.append(("then", store.closed)))
    owner.close()
    assert store.closed and not os.path.exists(tmp) and order == [("then", True)]
    owner.close()  # twice: nothing more happens
    assert order == [("then", True)]


def test_path_store_is_closed_callers_store_is_left_open(tmp_path):
    owner = _core.StoreOwner(str(tmp_path / "s"), prefix="x-")
    assert owner.owned and owner.tmpdir is None
    owner.close()
    assert owner.store.closed and os.path.isdir(tmp_path / "s")  # closed, not removed
    with kvtier.open(str(tmp_path / "t")) as mine:
        owner = _core.StoreOwner(mine, prefix="x-")
        assert owner.store is mine and not owner.owned
        owner.close()
        assert not mine.closed


def test_bad_store_argument_names_itself():
    with pytest.raises(kvtier.InvalidArgumentError, match=r"^path: None, a path or a kvtier.Store expected"):
        _core.StoreOwner(3.5, prefix="x-", arg="path")


def test_finalize_closes_when_the_adapter_is_collected():
    a = Adapter()
    owner = _core.StoreOwner(None, prefix="kvtier-test-")
    fin = owner.finalize(a)
    tmp = owner.tmpdir
    assert fin.alive
    del a
    gc.collect()
    assert not fin.alive and owner.store.closed and not os.path.exists(tmp)


def test_grid_add_and_retrieve_layer(tmp_path):
    rng = np.random.default_rng(0)
    with kvtier.open(str(tmp_path / "s")) as store:
        grid = _core.open_grid(store, "S.L{layer}.H{head}", [1, 3], 2, dim=8, value_dim=8, dtype="float32",
                               metric="ip", policy="static")
        assert [[c.name for c in row] for row in grid] == [["S.L1.H0", "S.L1.H1"], ["S.L3.H0", "S.L3.H1"]]
        k = rng.standard_normal((2, 300, 8)).astype(np.float32)
        v = rng.standard_normal((2, 300, 8)).astype(np.float32)
        _core.add_layer(grid[0], zip(k, v, strict=True), first=0)
        with pytest.raises(RuntimeError, match="out of step"):
            _core.add_layer(grid[1], zip(k[:, :5], v[:, :5], strict=True), first=7)
        q = np.ascontiguousarray(rng.standard_normal((2, 3, 8)).astype(np.float32))
        out = _core.layer_buffers(None, 2, 40, 8, 8, np.float32)
        assert out.ids.shape == (2, 40 + 10 + 64) and (out.keys == 0).all() and (out.ids == -1).all()
        assert _core.layer_buffers(out, 2, 100, 8, 8, np.float32) is out  # room enough: reused
        # a prefetch queues at most the clusters the retrieve then reads, and changes nothing it returns
        assert 0 <= _core.prefetch_layer(store, grid[0], q, 40) <= 2 * 40
        assert _core.prefetch_layer(store, grid[0], q, 40, checked=False) >= 0
        with pytest.raises(ValueError, match="read_ahead"):
            _core.retrieve_layer(store, grid[0], q, 40, out, read_ahead=True)
        checked = _core.retrieve_layer(store, grid[0], q, 40, out)
        got = [checked.member(h) for h in range(2)]
        ids = [g.ids.copy() for g in got]
        direct = _core.retrieve_layer(store, grid[0], q, 40,
                                      _core.layer_buffers(None, 2, 40, 8, 8, np.float32), checked=False)
        ahead = _core.retrieve_layer(store, grid[0], q, 40, _core.layer_buffers(None, 2, 40, 8, 8, np.float32),
                                     checked=False, read_ahead=True)
        for h in range(2):
            assert np.array_equal(direct.member(h).ids, ids[h]) and len(ids[h]) == 40
            assert np.array_equal(ahead.member(h).ids, ids[h])
            assert np.array_equal(ids[h], grid[0][h].retrieve(q[h], budget=40).ids)


def test_counters_and_stats_names():
    c = _core.Counters(("adds",), ("retrieve",))
    assert c.retrieval() == {"retrieves": 0, "fetched_entries": 0, "fetched_per_retrieve": 0.0}
    c.c["retrieves"] += 4
    c.c["fetched_entries"] += 10
    own = {**c.retrieval(), "estimated_per_retrieve": 0.5, "engine_dram_bytes": 1}
    st = _core.adapter_stats(own, {"read_bytes": 3, "dram_bytes": 9, "fetched_entries": -1}, keep=("read_bytes",),
                             engine=("engine_dram_bytes",), aliases=_core.ALIASES)
    assert st["fetched_per_retrieve"] == st["fetched_per_step"] == 2.5 and st["estimated_per_step"] == 0.5
    assert st["read_bytes"] == 3 and "dram_bytes" not in st and st["store"]["dram_bytes"] == 9
    assert st["fetched_entries"] == 10  # the adapter's own figure wins over the store's
    assert "fetched_per_step" not in st.adapter and "engine_dram_bytes" in st.engine
    assert "fetched_per_step" not in _core.adapter_stats(own, {})


def test_params_helpers():
    assert flag("x", np.bool_(True)) is True
    with pytest.raises(kvtier.InvalidArgumentError, match=r"^prefetch: True or False expected, got 1"):
        flag("prefetch", 1)
    assert one_of("store_dtype", "float16", ("float16", "float32")) == "float16"
    with pytest.raises(kvtier.InvalidArgumentError, match=r"^store_dtype: one of \('float16',\) expected"):
        one_of("store_dtype", "int8", ("float16",))
    d = {"a": 1}
    assert options("o", None) == {} and options("o", d) == d and options("o", d) is not d
    with pytest.raises(kvtier.InvalidArgumentError, match=r"^o: a dict expected, got list"):
        options("o", [1])
    assert estimate_clusters(True, 4) == 4 and estimate_clusters(False, 4) is False
    assert estimate_clusters("all", 4) is None and estimate_clusters(np.int64(2), 4) == 2
    for bad in (-1, "some", 1.5):
        with pytest.raises(kvtier.InvalidArgumentError, match=r"^estimate: True, False, 'all'"):
            estimate_clusters(bad, 4)
