"""Flash layouts (colocated, clustered, token-order baseline) and write accounting."""
import numpy as np
import pytest

import kvtier

DIM, VDIM = 16, 8
ESZ = 16 + 2 * DIM + 2 * VDIM  # record: id, crc, size, float16 key and value (8-byte multiple)


def _data(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, DIM)).astype(np.float16), rng.standard_normal((n, VDIM)).astype(np.float16)


def _fill(c, k, v, first=800, step=5):
    c.add(k[:first], v[:first])
    for i in range(first, len(k), step):
        c.add(k[i:i + step], v[i:i + step])


@pytest.mark.parametrize("policy", ["static", "adaptive", "local"])
def test_layouts_return_the_same_entries_correctly(tmp_path, policy):
    k, v = _data(1600)
    out = {}
    for layout in ("colocated", "clustered", "token"):
        with kvtier.open(tmp_path / layout, dram_budget="192KiB", device="ufs4.0") as s:
            c = s.collection("c", dim=DIM, value_dim=VDIM, policy=policy, layout=layout)
            _fill(c, k, v)
            s.reset_io_stats()
            got = []
            for t in range(40):
                q = np.random.default_rng(t).standard_normal((2, DIM)).astype(np.float32)
                r = c.retrieve(q, 0.1)
                assert np.array_equal(r.keys, k[r.ids]) and np.array_equal(r.values, v[r.ids])
                got.append(sorted(r.ids.tolist()))
            st, cs = s.stats(), c.stats()
            out[layout] = (got, st, cs)
            assert np.array_equal(c.get(np.arange(len(k)))[0], k)
        with kvtier.open(tmp_path / layout) as s:  # reopen: the layout is part of the collection
            c = s.collection("c")
            assert c.params["layout"] == layout
            assert np.array_equal(c.get(np.arange(len(k)))[1], v)
            r = c.retrieve(np.ones((1, DIM), np.float32), len(k))
            assert sorted(r.ids.tolist()) == list(range(len(k)))
    tok = out["token"][2]
    assert tok["split_write_bytes"] == 0  # a split moves nothing in a log
    assert tok["data_file_bytes"] == 4096 + len(k) * ESZ
    assert out["clustered"][2]["relayouts"] == 0 and tok["relayouts"] == 0
    if policy == "static":
        # the same clusters whatever the layout: only where the records sit differs
        assert out["token"][0] == out["clustered"][0] == out["colocated"][0]
        assert out["token"][1]["read_ops"] > out["clustered"][1]["read_ops"]


def test_layout_argument_checked_and_kept(tmp_path):
    with kvtier.open(tmp_path / "s") as s:
        with pytest.raises(kvtier.InvalidArgumentError, match="layout"):
            s.collection("a", dim=DIM, layout="rows")
        assert s.collections() == []
        s.collection("a", dim=DIM, layout="token")
        with pytest.raises(kvtier.InvalidArgumentError, match="layout"):
            s.collection("a", layout="colocated")
        assert s.collection("b", dim=DIM).params["layout"] == "colocated"
        assert s.collection("c", dim=DIM, layout="clustered").params["colocate_after"] == 0


@pytest.mark.parametrize("write_buffer", [0, "256KiB"])
def test_appends_never_move_existing_data(tmp_path, write_buffer):
    """Clustered layout, static policy: every byte written is an entry's record (plus the
    header page): appends go to a head's free end, nothing already written moves. Without a
    write buffer small appends land inside pages written before (partial-page rewrites); with
    one, hot clusters write whole pages only, and a flush writes each tail once."""
    k, v = _data(3000)
    with kvtier.open(tmp_path / "s", dram_budget="4MiB", device="ufs4.0", write_buffer=write_buffer) as s:
        c = s.collection("c", dim=DIM, value_dim=VDIM, policy="static", layout="clustered")
        c.add(k[:1000], v[:1000])
        # a bulk load pairs two clusters in a pool sized for both (format 3): at most the page
        # where their runs meet is written twice, once per pool
        assert c.stats()["partial_page_writes"] <= c.stats()["pools"]
        for i in range(1000, 3000, 10):
            c.add(k[i:i + 10], v[i:i + 10])
        cs = c.stats()
        if write_buffer:
            assert cs["write_buffer_entries"] > 0 and cs["write_buffer_evictions"] == 0
            assert cs["partial_page_writes"] == 0
        else:
            assert cs["write_buffer_entries"] == 0 and cs["partial_page_writes"] > 0
        s.flush()
        st, cs = s.stats(), c.stats()
        assert cs["write_buffer_entries"] == 0
        assert st["write_bytes"] == 4096 + 3000 * ESZ  # ESZ divides the page: no padding here
        assert cs["naive_move_bytes"] > 20 * st["write_bytes"]  # what a packed layout would have moved
        assert st["partial_page_writes"] == cs["partial_page_writes"]
        if write_buffer:
            assert cs["partial_page_writes"] == 0  # the flush wrote each tail from a page start
    with kvtier.open(tmp_path / "s") as s:
        c = s.collection("c")
        got_k, got_v = c.get(np.arange(3000))
        assert np.array_equal(got_k, k) and np.array_equal(got_v, v)


def test_page_padding_is_the_only_extra_write(tmp_path):
    """Records of 72 B: 56 to a 4 KiB page and 64 B of padding. Bytes written are the
    entries' bytes plus at most one padding per page, no record crosses a page, and every
    entry reads back."""
    vdim = 12
    esz = 16 + 2 * DIM + 2 * vdim
    rpp = 4096 // esz
    rng = np.random.default_rng(3)
    k = rng.standard_normal((2000, DIM)).astype(np.float16)
    v = rng.standard_normal((2000, vdim)).astype(np.float16)
    with kvtier.open(tmp_path / "s", dram_budget="4MiB", write_buffer=0) as s:
        c = s.collection("c", dim=DIM, value_dim=vdim, policy="static", layout="clustered")
        c.add(k[:1200], v[:1200])
        for i in range(1200, 2000, 7):
            c.add(k[i:i + 7], v[i:i + 7])
        s.flush()
        st = s.stats()
        extra = st["write_bytes"] - 4096 - 2000 * esz
        assert extra >= 0 and extra % (4096 - rpp * esz) == 0
        assert extra <= (2000 // rpp + c.stats()["clusters"]) * (4096 - rpp * esz)
        got_k, got_v = c.get(np.arange(2000))
        assert np.array_equal(got_k, k) and np.array_equal(got_v, v)
        assert len(c.retrieve(k[0].astype(np.float32), budget=1.0)) == 2000


def _cold_reads(path, queries):
    """Read requests per retrieve, each on a freshly opened store (an empty cache)."""
    ops = []
    for q in queries:
        with kvtier.open(path, dram_budget="4MiB", device="ufs4.0", merge_gap=4096) as s:
            c = s.collection("c")
            s.reset_io_stats()
            c.retrieve(q, budget=300)
            ops.append(s.stats()["read_ops"])
    return float(np.mean(ops))


def test_colocation_makes_co_retrieved_clusters_one_read(tmp_path):
    """After the one-off rewrite, clusters that the first retrieves fetched together sit next
    to each other: the same queries on an empty cache need clearly fewer read requests than
    with the clustered layout (each cluster in its own place). Deterministic: seeded data,
    request counts."""
    rng = np.random.default_rng(0)
    cent = rng.standard_normal((40, DIM))
    k = (cent[rng.integers(0, 40, 4000)] + 0.3 * rng.standard_normal((4000, DIM))).astype(np.float16)
    v = rng.standard_normal((4000, VDIM)).astype(np.float16)
    qs = (cent[rng.integers(0, 40, 32)] + 0.3 * rng.standard_normal((32, DIM))).astype(np.float32)
    reads = {}
    for layout in ("clustered", "colocated"):
        path = tmp_path / layout
        with kvtier.open(path, dram_budget="4MiB", device="ufs4.0", merge_gap=4096) as s:
            c = s.collection("c", dim=DIM, value_dim=VDIM, policy="static", layout=layout, init_cluster_size=32,
                             max_cluster_size=64, **({"colocate_after": 32} if layout == "colocated" else {}))
            c.add(k, v)
            for t in range(40):
                c.retrieve(qs[t % 32], budget=300)
            assert c.stats()["relayouts"] == (layout == "colocated")
        reads[layout] = _cold_reads(path, qs)
    # 0.58 here; 0.72 when the rewrite put each chain neighbour one pool too far
    assert reads["colocated"] < 0.65 * reads["clustered"], reads


def test_split_keeps_one_child_in_place(tmp_path):
    """Format 3: a split keeps its larger child where the parent was and writes only the other
    child, whose records there become dead slots. Reads drop the dead slots (counted in
    dead_bytes) and every entry reads back, from the cache, from flash after a reopen, and in
    verify, which counts the live records alone. Pools are sized to what they hold: the data
    file is well under what pools of 2 x max_cluster_size records would take."""
    rng = np.random.default_rng(7)
    cent = rng.standard_normal((30, DIM))
    n = 4000
    k = (cent[rng.integers(0, 30, n)] + 0.5 * rng.standard_normal((n, DIM))).astype(np.float16)
    v = rng.standard_normal((n, VDIM)).astype(np.float16)
    path = tmp_path / "s"
    with kvtier.open(path, dram_budget="2MiB", device="ufs4.0") as s:
        c = s.collection("c", dim=DIM, value_dim=VDIM, policy="adaptive", init_cluster_size=16,
                         max_cluster_size=96)
        c.add(k[:1000], v[:1000])
        for i in range(1000, n, 10):
            c.add(k[i:i + 10], v[i:i + 10])
            c.retrieve(k[i].astype(np.float32), budget=150)
        cs = c.stats()
        assert cs["splits"] > 20 and cs["dead_slots"] > 0, cs
        # both children copied would write every split record; in place writes the smaller child
        assert cs["split_write_bytes"] < 0.6 * cs["append_bytes"], cs
        # pools of 2 x max_cluster_size records (12 KiB here), two clusters to a pool, would take
        # at least this; sized pools take one or two 4 KiB units for these ~11-entry clusters
        fixed = 4096 + (cs["clusters"] + 1) // 2 * -(-2 * 96 * ESZ // 4096) * 4096
        assert cs["data_file_bytes"] < 0.6 * fixed, (cs, fixed)
        got_k, got_v = c.get(np.arange(n))
        assert np.array_equal(got_k, k) and np.array_equal(got_v, v)
        dead = cs["dead_slots"]
    with kvtier.open(path, dram_budget="2MiB", device="ufs4.0") as s:
        c = s.collection("c")
        assert c.stats()["dead_slots"] == dead  # the directory keeps them
        r = c.retrieve(k[0].astype(np.float32), budget=1.0)
        assert np.array_equal(np.sort(r.ids), np.arange(n))
        order = np.argsort(r.ids)
        assert np.array_equal(np.asarray(r.keys)[order], k)
        assert s.stats()["dead_bytes"] > 0  # read with their extents, dropped
        ver = c.verify()
        assert ver["damaged"] == 0 and ver["records"] + ver["in_dram"] == n, ver


def test_split_whose_staying_child_has_nothing_on_flash(tmp_path):
    """A split in place keeps the parent's segments for the child with more of the parent's
    early records (flash or tail); when none of that child's records are on the parent's flash
    it would keep only dead slots, and its records were once numbered from slot 0, over
    them: after a reopen, get() found other records there (hypothesis found this sequence in
    the model test). Such a split now writes both children fresh."""
    rng = np.random.default_rng(15746)
    batches = [(rng.standard_normal((4, 8)), rng.standard_normal((4, 4)))]
    rng = np.random.default_rng(83)
    batches.append((rng.standard_normal((13, 8)), rng.standard_normal((13, 4))))
    keys = np.concatenate([b[0] for b in batches]).astype(np.float16)
    vals = np.concatenate([b[1] for b in batches]).astype(np.float16)

    def open_coll(s):
        return s.collection("m", dim=8, value_dim=4, init_cluster_size=4, max_cluster_size=8, layout="colocated",
                            policy="adaptive")
    with kvtier.open(tmp_path / "s", dram_budget="1MiB") as s:
        c = open_coll(s)
        c.add(keys[:4], vals[:4])
        s.flush()
        c.add(keys[4:], vals[4:])
        assert c.stats()["splits"] >= 3  # the sequence splits, in place and not
    with kvtier.open(tmp_path / "s", dram_budget="1MiB") as s:
        c = open_coll(s)
        got_k, got_v = c.get(np.arange(len(keys)))
        assert np.array_equal(got_k, keys) and np.array_equal(got_v, vals)
