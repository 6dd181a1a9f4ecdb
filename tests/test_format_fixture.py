"""Format regression: every frozen store under tests/fixtures/store_v*/ (written by
tests/fixtures/make_fixture.py with an earlier kvtier) must open in this version with every
entry bit for bit, search and retrieve working and new entries appendable, or, if this
kvtier no longer reads that format, fail with FormatVersionError. Each test works on a copy:
the fixture itself is never opened (opening writes a lock file and may commit)."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import kvtier
from kvtier import _engine
from kvtier.catalog import CATALOG_FORMAT

FIXTURES = Path(__file__).parent / "fixtures"
STORES = sorted(p for p in FIXTURES.glob("store_v*") if (p / "MANIFEST.json").exists())


def load_maker():
    spec = importlib.util.spec_from_file_location("make_fixture", FIXTURES / "make_fixture.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def bits(a):
    return np.ascontiguousarray(a).view(np.uint8)


def test_fixtures_exist():
    assert STORES, "tests/fixtures/store_v1 is missing (see tests/fixtures/make_fixture.py)"


@pytest.fixture(params=STORES, ids=[p.name for p in STORES])
def fixture_copy(request, tmp_path):
    src = request.param
    manifest = json.loads((src / "MANIFEST.json").read_text())
    for rel, digest in manifest["files"].items():
        got = hashlib.sha256((src / rel).read_bytes()).hexdigest()
        assert got == digest, f"{src.name}/{rel} changed: frozen fixtures are never rewritten"
    dst = tmp_path / src.name
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("MANIFEST.json"))
    return dst, manifest


def test_fixture_opens_with_every_entry_intact(fixture_copy, record_property):
    path, manifest = fixture_copy
    same_format = (manifest["engine_format"] == _engine.FORMAT_VERSION
                   and manifest["catalog_format"] == CATALOG_FORMAT)
    mk = load_maker()
    try:
        store = kvtier.open(path, dram_budget="4MiB")
        names = {n: store.collection(n) for n in manifest["collections"]}
    except kvtier.FormatVersionError:
        if same_format:
            raise
        pytest.skip(f"{path.name}: format {manifest['engine_format']}/{manifest['catalog_format']} is "
                    f"no longer read (this kvtier: {_engine.FORMAT_VERSION}/{CATALOG_FORMAT}), "
                    "and says so with FormatVersionError")
    checked = 0
    with store:
        assert sorted(store.collections()) == sorted(manifest["collections"])
        for name, spec in manifest["collections"].items():
            c = names[name]
            for key in ("dim", "value_dim", "dtype", "metric", "policy"):
                assert c.params[key] == spec[key], (name, key)
            n = spec["n"]
            assert len(c) == n, name
            k, v = mk.entries(spec["index"], 0, n, spec["dim"], spec["value_dim"], spec["dtype"])
            gk, gv = c.get(np.arange(n))
            assert np.array_equal(bits(gk), bits(k)) and np.array_equal(bits(gv), bits(v)), name
            q = k[[0, n // 3, n - 1]].astype(np.float32)
            got = c.retrieve(q, budget=n)
            order = np.argsort(got.ids)
            assert np.array_equal(got.ids[order], np.arange(n)), name
            assert np.array_equal(bits(got.keys[order]), bits(k)), name
            assert np.array_equal(bits(got.values[order]), bits(v)), name
            # exhaustive search is exact under the collection's metric
            hits = c.search(q, k=5, nprobe=1 << 30)
            kf = k.astype(np.float32)
            s = q @ kf.T if spec["metric"] == "ip" else -((q[:, None, :] - kf[None]) ** 2).sum(-1)
            np.testing.assert_allclose(hits.scores, np.sort(s, 1)[:, ::-1][:, :5], rtol=1e-3, atol=1e-3)
            # an old store takes new entries, and keeps them across a reopen
            k2, v2 = mk.entries(spec["index"], n, n + 40, spec["dim"], spec["value_dim"], spec["dtype"])
            assert c.add(k2, v2).tolist() == list(range(n, n + 40))
            checked += n
    with kvtier.open(path, dram_budget="4MiB") as store:
        for name, spec in manifest["collections"].items():
            c = store.collection(name)
            n = spec["n"] + 40
            k, v = mk.entries(spec["index"], 0, n, spec["dim"], spec["value_dim"], spec["dtype"])
            gk, gv = c.get(np.arange(n))
            assert np.array_equal(bits(gk), bits(k)) and np.array_equal(bits(gv), bits(v)), name
    msg = f"format fixture {path.name}: {len(manifest['collections'])} collections, {checked} entries verified"
    print("[fixture]", msg)
    record_property("reliability", msg)


def test_newer_format_is_refused_clearly(fixture_copy):
    """A store from a future kvtier (a higher catalog format) fails with FormatVersionError."""
    import lmdb

    path, _ = fixture_copy
    env = lmdb.open(os.fspath(path / "catalog"), subdir=True, map_size=1 << 30)
    with env.begin(write=True) as txn:
        txn.put(b"meta/format", str(CATALOG_FORMAT + 1).encode())
    env.close()
    with pytest.raises(kvtier.FormatVersionError, match="format"):
        kvtier.open(path)


def test_newer_data_file_format_is_refused_clearly(fixture_copy):
    """A data file whose header carries a later engine format fails with FormatVersionError
    when its collection opens; the other collections still open."""
    path, manifest = fixture_copy
    name, spec = next(iter(manifest["collections"].items()))
    data = path / f"c{spec['stored_params']['no']}.kvd"
    raw = bytearray(data.read_bytes())
    raw[8:12] = int(_engine.FORMAT_VERSION + 1).to_bytes(4, "little")
    data.write_bytes(bytes(raw))
    with kvtier.open(path) as store:
        with pytest.raises(kvtier.FormatVersionError, match="format version"):
            store.collection(name)
        other = [n for n in manifest["collections"] if n != name][0]
        assert len(store.collection(other)) == manifest["collections"][other]["n"]
