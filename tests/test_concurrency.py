"""Many threads reading while one adds and flushes: no deadlock, no wrong answer."""
import threading

import numpy as np

import kvtier
from conftest import make_data


def test_readers_and_a_writer(tmp_path):
    k, v = make_data(4000, seed=3)
    with kvtier.open(tmp_path / "s", dram_budget="2MiB") as s:
        c = s.collection("c", dim=16, value_dim=8)
        c.add(k[:1000], v[:1000])
        errors = []
        stop = threading.Event()

        def reader(seed):
            rng = np.random.default_rng(seed)
            try:
                while not stop.is_set():
                    n = len(c)
                    ids = rng.integers(0, n, 32)
                    gk, gv = c.get(ids)
                    assert np.array_equal(gk, k[ids]) and np.array_equal(gv, v[ids])
                    got = c.retrieve(rng.standard_normal((2, 16)), budget=0.05)
                    assert np.array_equal(got.keys, k[got.ids])
                    c.search(rng.standard_normal((4, 16)), k=5)
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for start in range(1000, 4000, 250):
            c.add(k[start:start + 250], v[start:start + 250])
            s.flush()
        stop.set()
        for t in threads:
            t.join(timeout=60)
            assert not t.is_alive()
        assert not errors, errors
        assert len(c) == 4000


def test_close_waits_for_calls_in_flight(tmp_path):
    k, v = make_data(2000)
    s = kvtier.open(tmp_path / "s")
    c = s.collection("c", dim=16, value_dim=8)
    c.add(k, v)
    results = []

    def worker():
        try:
            for _ in range(50):
                c.search(k[:16], k=5)
        except kvtier.StoreClosedError:
            results.append("closed")
        else:
            results.append("done")

    t = threading.Thread(target=worker)
    t.start()
    s.close()
    t.join(timeout=60)
    assert results and results[0] in ("closed", "done")
