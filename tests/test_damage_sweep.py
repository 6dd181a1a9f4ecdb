"""A byte flipped anywhere in a data file, swept across the whole file of a small store of
every policy and layout: each flip is either found by ``kvtier.verify`` (the header page, or
the one id whose record holds the byte) and survived by ``on_corrupt="skip"`` reads (every
other entry comes back bit for bit), or it is harmless: verify says intact and every read, in
the default ``on_corrupt="raise"`` mode, returns every entry bit for bit.

Which bytes may be harmless: bytes no reader takes for a record. The test names them from
the pristine file itself (not from the engine): the header page never is (its fields are
compared with the catalog, the rest of the page is under its checksum); a byte inside a copy
of a record may be harmless only when that id has another copy in the file (a stale copy left
by a split, a co-location rewrite or a consolidation, which no catalog names); every other
harmless byte is slack: the zeros after the last record of a layout page, the room of a pool
past its heads, free runs between pools. The format-3 pool and segment tables are not in the
data file: they live in the catalog, whose flips test_fuzz.py makes.

``KVTIER_SWEEP_STRIDE=n`` flips every n-th byte of the whole file instead of the sample (the
sample: the header page's fields and trailer, 40 offsets uniform over the file, 30 inside
records).
"""
from __future__ import annotations

import os
import random

import numpy as np
import pytest

import kvtier

N = 160
DIM, VDIM = 6, 3  # 16 + 12 + 6 = 34 bytes of record, 40 with its rounding: 6 bytes of record slack
POLICIES = ["adaptive", "static", "local", "none"]
TAG = b"KVTHPAGE"  # the header page's trailer tag: the page ends 4 bytes after it


def build(path, policy: str, layout: str):
    rng = np.random.default_rng(7)
    keys = rng.standard_normal((N, DIM)).astype(np.float16)
    values = rng.standard_normal((N, VDIM)).astype(np.float16)
    with kvtier.open(path, dram_budget="4MiB") as s:
        c = s.collection("c", dim=DIM, value_dim=VDIM, policy=policy, layout=layout,
                         init_cluster_size=8, max_cluster_size=16, local_window=32, local_cluster_size=8)
        for a in range(0, N, 20):  # in batches, with retrieves between: splits (adaptive: ~24), windows
            c.add(keys[a:a + 20], values[a:a + 20])
            for i in range(0, a + 20, 3):
                c.retrieve(keys[i:i + 2].astype(np.float32), budget=0.3)
        st = c.stats()
    assert policy not in ("adaptive", "local") or st["splits"] > 0, "the store was meant to have split"
    return keys, values


def record_copies(raw: bytes, keys, values, header: int) -> list[tuple[int, int]]:
    """(offset, id) of every 8-aligned place past the header page holding a record of an id:
    its id field and its key and value bytes (live copies and stale ones alike)."""
    esz = (16 + (DIM + VDIM) * 2 + 7) // 8 * 8
    out = []
    for off in range(header, len(raw) - 16 - (DIM + VDIM) * 2 + 1, 8):
        rid = int.from_bytes(raw[off:off + 8], "little", signed=True)
        if 0 <= rid < N and raw[off + 16:off + 16 + DIM * 2] == keys[rid].tobytes() \
                and raw[off + 16 + DIM * 2:off + 16 + (DIM + VDIM) * 2] == values[rid].tobytes():
            out.append((off, rid))
    assert esz == 40
    return out


def offsets_to_flip(raw: bytes, copies, header: int, rnd: random.Random) -> list[int]:
    stride = int(os.environ.get("KVTIER_SWEEP_STRIDE", "0"))
    if stride > 0:
        return list(range(rnd.randrange(stride), len(raw), stride))
    picks = set(range(0, 64, 5)) | {header - 12, header - 5, header - 1, rnd.randrange(64, header - 12)}
    picks |= {rnd.randrange(len(raw)) for _ in range(40)}
    picks |= {o + rnd.randrange(40) for o, _ in rnd.sample(copies, min(30, len(copies)))}
    return sorted(picks)


def read_all(path, on_corrupt, keys, q):
    """Every entry through get, retrieve (budget: all) and search (every cluster), on_corrupt
    as given: (get's entries, retrieve's result, search's hits)."""
    with kvtier.open(path, dram_budget="4MiB", on_corrupt=on_corrupt) as s:
        c = s.collection("c")
        e = c.get(np.arange(N))
        r = c.retrieve(q, budget=N)
        h = c.search(q, k=N, nprobe=1 << 20)
    return e, r, h


@pytest.mark.parametrize("layout", ["colocated", "token"])
@pytest.mark.parametrize("policy", POLICIES)
def test_every_flip_is_found_or_harmless(tmp_path, policy, layout, record_property):
    path = str(tmp_path / "s")
    keys, values = build(path, policy, layout)
    files = {}
    for d, _, names in os.walk(path):
        for f in names:
            if f != "LOCK":
                with open(os.path.join(d, f), "rb") as fh:
                    files[os.path.join(d, f)] = fh.read()
    data = os.path.join(path, "c0.kvd")
    raw = files[data]
    header = raw.find(TAG) + len(TAG) + 4
    assert header in (4096, 16384), header
    copies = record_copies(raw, keys, values, header)
    ncopies = np.bincount([i for _, i in copies], minlength=N)
    assert (ncopies >= 1).all(), "every entry has a record in the data file"
    q = keys[[1, 80]].astype(np.float32)
    rnd = random.Random(f"{policy}/{layout}")
    tally = {"header found": 0, "record found": 0, "stale copy, harmless": 0,
             "record rounding, harmless": 0, "slack, harmless": 0}
    wrong = []
    for off in offsets_to_flip(raw, copies, header, rnd):
        for p, b in files.items():  # the pristine store, then one byte of its data file flipped
            with open(p, "wb") as f:
                f.write(b)
        mask = 1 << rnd.randrange(8)
        with open(data, "r+b") as f:
            f.seek(off)
            f.write(bytes([raw[off] ^ mask]))
        holders = {i for o, i in copies if o <= off < o + 40}
        rep = kvtier.verify(path)
        col = rep.collections[0]
        bad = col.get("unreadable", np.zeros(0, np.int64)).tolist()
        where = f"offset {off} (mask {mask:#x}, holders {sorted(holders)})"
        if col.get("error"):
            wrong.append(f"{where}: verify could not read the collection: {col['error']}")
            continue
        if off < header:
            if not col["header_damaged"] or bad:
                wrong.append(f"{where}: a header byte, verify says header_damaged={col['header_damaged']} ids {bad}")
            tally["header found"] += 1
            e, r, h = read_all(path, "skip", keys, q)  # the catalog's word holds the geometry
            if e.ids.tolist() != list(range(N)) or not np.array_equal(e.keys, keys):
                wrong.append(f"{where}: a damaged header page lost entries in skip mode")
            continue
        if col["header_damaged"]:
            wrong.append(f"{where}: a byte past the header page reported as header damage")
            continue
        if bad:
            if len(bad) != 1 or bad[0] not in holders:
                wrong.append(f"{where}: verify names ids {bad}")
                continue
            tally["record found"] += 1
            e, r, h = read_all(path, "skip", keys, q)
            intact = [i for i in range(N) if i not in bad]
            if e.ids.tolist() != intact or e.unreadable.tolist() != bad \
                    or not np.array_equal(e.keys, keys[intact]) or not np.array_equal(e.values, values[intact]):
                wrong.append(f"{where}: get(on_corrupt='skip') did not return every intact entry")
            if sorted(r.ids.tolist()) != intact or not np.array_equal(r.keys, keys[r.ids]) \
                    or not np.array_equal(r.values, values[r.ids]) or r.unreadable.tolist() != bad:
                wrong.append(f"{where}: retrieve(on_corrupt='skip') did not return every intact entry")
            found = np.sort(h.ids[0][h.ids[0] >= 0]).tolist()
            if found != intact:
                wrong.append(f"{where}: search(on_corrupt='skip') found {len(found)} of {len(intact)} intact")
            with pytest.raises(kvtier.CorruptionError) as ce:
                read_all(path, "raise", keys, q)
            if ce.value.ids.tolist() != bad:
                wrong.append(f"{where}: the raised CorruptionError names {ce.value.ids.tolist()}, not {bad}")
            continue
        # verify says intact: harmless only if every read returns every entry bit for bit
        try:
            e, r, h = read_all(path, "raise", keys, q)
        except kvtier.KvtierError as ex:
            wrong.append(f"{where}: verify says intact, a read raised {type(ex).__name__}: {ex}")
            continue
        if not (np.array_equal(e.keys, keys) and np.array_equal(e.values, values)
                and sorted(r.ids.tolist()) == list(range(N)) and np.array_equal(r.keys, keys[r.ids])
                and np.array_equal(r.values, values[r.ids])):
            wrong.append(f"{where}: verify says intact, reads return changed entries")
            continue
        into = [off - o for o, i in copies if o <= off < o + 40]
        if into and min(into) >= 34:
            tally["record rounding, harmless"] += 1  # past the record's 34 bytes: never read as data
        elif holders:
            if all(ncopies[i] == 1 for i in holders):
                wrong.append(f"{where}: the only copy of a record changed and nothing noticed")
                continue
            tally["stale copy, harmless"] += 1
        else:
            tally["slack, harmless"] += 1
    msg = f"{policy}/{layout}: {len(raw):,}-byte data file, {sum(tally.values())} flips: " + \
        ", ".join(f"{v} {k}" for k, v in tally.items())
    record_property("sweep", msg)
    print(msg)
    assert not wrong, msg + "\n" + "\n".join(wrong[:20])
    assert tally["record found"] > 0 and tally["header found"] > 0
