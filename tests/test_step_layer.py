"""Store.step_layer: a decoding step's add, prefetch and retrieve for a layer in one engine
call, equal to the separate calls on a twin store (every policy, with and without an
estimate, keys widened to float32 inside a larger buffer), and bad input refused before
anything is stored."""
import numpy as np
import pytest

import kvtier
from conftest import make_data
from kvtier.errors import InvalidArgumentError

H, DIM = 3, 16


def _layers(s, policy, seed):
    layers = []
    for l in range(2):
        cs = [s.collection(f"L{l}.H{h}", dim=DIM, value_dim=8, dtype="float16", policy=policy,
                           value_sums=True) for h in range(H)]
        for h, c in enumerate(cs):
            c.add(*make_data(1500, seed=seed + 10 * l + h))
        layers.append(cs)
    return layers


@pytest.mark.parametrize("policy", ["static", "adaptive", "local", "none"])
def test_step_layer_equals_separate_calls(tmp_path, policy):
    sep, one = (kvtier.open(tmp_path / n, dram_budget="1MiB", device="ufs4.0") for n in ("sep", "one"))
    a, b = _layers(sep, policy, 7), _layers(one, policy, 7)
    rng = np.random.default_rng(3)
    rows = 5 + 4 + 1  # sinks, window, the new token: rows of the buffer the fetched entries follow
    buf_k = np.full((H, rows + 120, DIM), 7.0, np.float32)
    buf_v = np.full((H, rows + 120, 8), 7.0, np.float32)
    out = kvtier.StepOut.allocate(H, 120, DIM, 8, keys=buf_k, values=buf_v, offset=rows)
    for step in range(16):
        q = rng.standard_normal((H, 2, DIM)).astype(np.float32)
        k, v = make_data(H, seed=500 + step)
        k, v = k.reshape(H, 1, DIM), v.reshape(H, 1, 8)
        est = step % 4 == 3 and policy != "none"
        # the separate calls, in the adapter's order: layer 0's spill, layer 0's prefetch
        # (the next layer's in the adapter), layer 1's retrieve
        for h, c in enumerate(a[0]):
            c.add(k[h], v[h])
        sep.prefetch([(c, q[h], 60) for h, c in enumerate(a[0])])
        if est:
            want = [c.retrieve(q[h], budget=100, estimate=2, scale=0.3) for h, c in enumerate(a[1])]
        else:
            many = sep.retrieve_many([(c, q[h], 100) for h, c in enumerate(a[1])])
            want = [many.member(h) for h in range(H)]
        got, queued = one.step_layer((b[1], q, 100), out, add=(b[0], k, v), prefetch=(b[0], q, 60),
                                     estimate=2 if est else False, scale=0.3 if est else None)
        assert got is out and queued >= 0
        for h, w in enumerate(want):
            m = len(w)
            assert int(out.counts[h]) == m > 0
            assert np.array_equal(out.ids[h, :m], w.ids) and np.array_equal(out.clusters[h, :m], w.clusters)
            assert np.all(out.ids[h, m:] == -1) and np.all(out.clusters[h, m:] == -1)
            assert np.array_equal(buf_k[h, rows:rows + m], w.keys.astype(np.float32))  # widened exactly
            assert np.array_equal(buf_v[h, rows:rows + m], w.values.astype(np.float32))
            assert np.all(buf_k[h, :rows] == 7.0)  # the rows before the fetched ones are not touched
            if est:
                assert np.array_equal(out.lse[h], w.est_lse) and np.array_equal(out.est_values[h], w.est_values)
                assert int(out.est_entries[h]) == w.est_entries
    for x, y in zip(a, b):
        assert [len(c) for c in x] == [len(c) for c in y]
    sep.close()
    one.close()


def test_step_layer_parts_alone_and_new_out(tmp_path):
    with kvtier.open(tmp_path / "s", dram_budget="1MiB") as s:
        (l0, l1) = _layers(s, "static", 1)
        k, v = make_data(2 * H, seed=9)
        got, queued = s.step_layer(add=(l0, k.reshape(H, 2, DIM), v.reshape(H, 2, 8)))
        assert got is None and queued == 0 and [len(c) for c in l0] == [1502] * H
        q = np.ones((H, 1, DIM), np.float32)
        got, _ = s.step_layer((l1, q, 50))
        assert got.keys.dtype == np.float32 and got.cap >= 50  # a new StepOut: float32, rows from 0
        for h, c in enumerate(l1):
            want = c.retrieve(q[h], budget=50)
            assert np.array_equal(got.member(h).ids, want.ids)
            assert np.array_equal(got.member(h).keys, want.keys.astype(np.float32))


def test_step_layer_rejects_bad_input_and_stores_nothing(tmp_path):
    with kvtier.open(tmp_path / "s", dram_budget="1MiB") as s:
        (l0, l1) = _layers(s, "static", 2)
        k, v = make_data(H, seed=3)
        k, v = k.reshape(H, 1, DIM), v.reshape(H, 1, 8)
        q = np.ones((H, 2, DIM), np.float32)
        small = kvtier.StepOut.allocate(H, 10, DIM, 8)
        before = [len(c) for c in l0]
        bad = [
            (dict(retrieve=(l1, q, 50), out=small, add=(l0, k, v)), "out"),
            (dict(add=(l0, k[:2], v)), "add"),
            (dict(add=(l0, k, v[:, :, :4])), "add"),
            (dict(add=([l0[0], l0[0], l0[1]], k, v)), "at most once"),
            (dict(retrieve=(l1, q[:, :, :8], 50), add=(l0, k, v)), "retrieve"),
            (dict(prefetch=(l1, q, -1), add=(l0, k, v)), "budget"),
            (dict(retrieve=(l1, q, 50), add=(l0, k, v), scale=0.5), "scale"),
            (dict(retrieve=(l1, q, 50), add=(l0, k, v), estimate="x"), "estimate"),
            (dict(retrieve=(l1, np.full((H, 2, DIM), np.nan, np.float32), 50), add=(l0, k, v)), "finite"),
            (dict(add=(l0, k, v), retrieve=([l1[0], l0[1]], q[:2], 5), out="x"), "out"),
        ]
        for kw, match in bad:
            with pytest.raises(InvalidArgumentError, match=match):
                s.step_layer(**kw)
        assert [len(c) for c in l0] == before  # refused calls added nothing
        other = s.collection("other", dim=8, value_dim=8)
        with pytest.raises(InvalidArgumentError, match="one dim"):
            s.step_layer(retrieve=([l1[0], other], np.ones((2, 1, DIM), np.float32), 5))
