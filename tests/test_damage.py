"""Damage you can find and survive: a byte flipped in a data file (a record, the header page)
or a truncated file. ``kvtier.verify`` names the damaged ids; reads raise a CorruptionError
naming them (``on_corrupt="raise"``, the default) or return every intact entry and list the
others (``on_corrupt="skip"``), for every policy and layout."""
import os
import random

import numpy as np
import pytest

import kvtier
from kvtier import _engine

N, DIM, VDIM = 400, 16, 8
POLICIES = ["adaptive", "static", "local", "none"]


def build(path, policy, layout="colocated", n=N, seed=0):
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((n, DIM)).astype(np.float16)
    values = rng.standard_normal((n, VDIM)).astype(np.float16)
    with kvtier.open(path, dram_budget="4MiB") as s:
        c = s.collection("c", dim=DIM, value_dim=VDIM, policy=policy, layout=layout,
                         init_cluster_size=16, max_cluster_size=32)
        c.add(keys, values)
        # a few retrieves so that adaptive splits and the colocated layout rewrites: the damage
        # then lies wherever the engine has put the records by now
        for i in range(40):
            c.retrieve(keys[i:i + 2].astype(np.float32), budget=0.2)
    return keys, values


def record_offsets(path) -> dict:
    """id -> file offset of its record, from the records themselves (the header: int64 id,
    uint32 crc, uint32 size)."""
    raw = open(os.path.join(path, "c0.kvd"), "rb").read()
    esz = (16 + DIM * 2 + VDIM * 2 + 7) // 8 * 8
    out = {}
    page = 4096
    for off in range(page, len(raw) - esz + 1, 8):
        size = int.from_bytes(raw[off + 12:off + 16], "little")
        if size != esz:
            continue
        rid = int.from_bytes(raw[off:off + 8], "little", signed=True)
        if 0 <= rid < N:
            out.setdefault(rid, []).append(off)
    return out


def flip(path, off, mask=0x04):
    p = os.path.join(path, "c0.kvd")
    raw = bytearray(open(p, "rb").read())
    raw[off] ^= mask
    open(p, "wb").write(bytes(raw))


def live_offset(path, victim, keys):
    """The offset of the live copy of victim's record (splits and rewrites leave stale
    copies behind): the one whose key bytes are victim's key."""
    raw = open(os.path.join(path, "c0.kvd"), "rb").read()
    want = keys[victim].tobytes()
    offs = [o for o in record_offsets(path)[victim] if raw[o + 16:o + 16 + DIM * 2] == want]
    assert offs, "the record of the victim was not found"
    return offs


@pytest.mark.parametrize("layout", ["colocated", "token"])
@pytest.mark.parametrize("policy", POLICIES)
def test_flipped_record_is_named_and_skipped(tmp_path, policy, layout):
    path = tmp_path / "s"
    keys, values = build(path, policy, layout)
    victim = 157
    offs = live_offset(path, victim, keys)
    rnd = random.Random(policy + layout)
    flip(path, offs[0] + rnd.randrange(16 + DIM * 2 + VDIM * 2))  # anywhere in the record's bytes
    q = keys[[3, 200]].astype(np.float32)

    report = kvtier.verify(path)
    assert not report.ok and report.damaged == 1
    assert report.collections[0]["unreadable"].tolist() == [victim]
    assert "157" in report.summary()

    with kvtier.open(path) as s:  # raise: the error names the id and the collection
        c = s.collection("c")
        with pytest.raises(kvtier.CorruptionError) as e:
            c.retrieve(q, budget=N)
        assert e.value.ids.tolist() == [victim] and e.value.collection == "c"
        assert "id 157" in str(e.value)
        with pytest.raises(kvtier.CorruptionError, match="id 157"):
            c.get(np.arange(N))

    with kvtier.open(path, on_corrupt="skip") as s:  # skip: every intact entry
        c = s.collection("c")
        got = c.retrieve(q, budget=N)
        assert sorted(got.ids.tolist()) == [i for i in range(N) if i != victim]
        assert np.array_equal(got.keys, keys[got.ids]) and np.array_equal(got.values, values[got.ids])
        assert got.unreadable.tolist() == [victim]
        e = c.get(np.arange(N))
        k, v = e
        assert e.ids.tolist() == [i for i in range(N) if i != victim] and e.unreadable.tolist() == [victim]
        assert np.array_equal(k, keys[e.ids]) and np.array_equal(v, values[e.ids])
        hits = c.search(q, k=N, nprobe=1 << 30)
        assert victim not in hits.ids and hits.unreadable.tolist() == [victim]
        assert sorted(hits.ids[0][hits.ids[0] >= 0].tolist()) == [i for i in range(N) if i != victim]
        # per call: raise again on a skip store
        with pytest.raises(kvtier.CorruptionError):
            c.retrieve(q, budget=N, on_corrupt="raise")
        many = s.retrieve_many([(c, q, N)])
        assert many.unreadable[0].tolist() == [victim] and int(many.counts[0]) == N - 1
        assert c.stats()["damaged_reads"] >= 1
    assert kvtier.verify(path).damaged == 1  # reads never repair, split or move the damage away


@pytest.mark.parametrize("where", [100, 2000, 4090, 10])
def test_flipped_header_byte_is_found(tmp_path, where):
    path = tmp_path / "s"
    keys, values = build(path, "adaptive")
    flip(path, where)
    report = kvtier.verify(path)
    assert not report.ok and report.collections[0]["header_damaged"] and report.damaged == 0
    assert "header" in report.summary()
    with kvtier.open(path) as s:
        # a flipped format field reads as a later format: FormatVersionError, whose message says
        # it may be damage; anything else in the page is a CorruptionError
        with pytest.raises(kvtier.FormatVersionError if 8 <= where < 12 else kvtier.CorruptionError,
                           match="header") as e:
            s.collection("c")
    with kvtier.open(path, on_corrupt="skip") as s:
        c = s.collection("c")
        assert c.stats()["header_damaged"]
        got = c.retrieve(keys[:2].astype(np.float32), budget=N)
        assert sorted(got.ids.tolist()) == list(range(N)) and got.unreadable.size == 0


def test_truncated_file(tmp_path):
    path = tmp_path / "s"
    keys, values = build(path, "static", "clustered")
    p = os.path.join(path, "c0.kvd")
    last = max(o for offs in record_offsets(path).values() for o in offs)
    os.truncate(p, last + 5)
    report = kvtier.verify(path)
    lost = report.collections[0]["unreadable"]
    assert report.damaged >= 1 and report.collections[0]["named_bytes"] > report.collections[0]["file_bytes"]
    with kvtier.open(path, on_corrupt="skip") as s:
        got = s.collection("c").retrieve(keys[:2].astype(np.float32), budget=N)
        assert sorted(got.ids.tolist() + lost.tolist()) == list(range(N))
        assert np.array_equal(got.keys, keys[got.ids])


def test_intact_store_verifies_ok_and_inspect_says_so(tmp_path, capsys):
    from kvtier.cli import main

    path = tmp_path / "s"
    keys, _ = build(path, "adaptive")
    assert kvtier.verify(path).ok
    assert main(["verify", str(path)]) == 0
    out = capsys.readouterr().out
    assert "intact" in out
    assert main(["inspect", str(path)]) == 0
    assert "verified intact" in capsys.readouterr().out
    flip(path, live_offset(path, 5, keys)[0] + 20)
    assert main(["verify", str(path)]) == 4
    out = capsys.readouterr().out
    assert "DAMAGED" in out and "5" in out
    assert main(["inspect", str(path)]) == 0
    assert "DAMAGED" in capsys.readouterr().out


def test_old_fixtures_have_no_header_checksum_and_verify_intact():
    """Files written before the header page checksum existed: intact, and said to be older."""
    import shutil
    import tempfile

    for name in ("store_v1", "store_v2"):
        src = os.path.join(os.path.dirname(__file__), "fixtures", name)
        with tempfile.TemporaryDirectory() as d:
            shutil.copytree(src, os.path.join(d, name))
            report = kvtier.verify(os.path.join(d, name))
            assert report.ok, report.summary()
            assert all(not c["header_checksummed"] for c in report.collections if "header_checksummed" in c)


def test_on_corrupt_argument_is_checked(tmp_path):
    with pytest.raises(kvtier.InvalidArgumentError, match="on_corrupt"):
        kvtier.open(tmp_path / "s", on_corrupt="ignore")
    with kvtier.open(tmp_path / "s") as s:
        c = s.collection("c", dim=4, value_dim=0)
        c.add(np.ones((3, 4)))
        with pytest.raises(kvtier.InvalidArgumentError, match="on_corrupt"):
            c.get([0], on_corrupt=True)
        assert _engine.last_unreadable().shape == (0, 2)
