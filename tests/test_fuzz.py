"""Fuzzing. (1) The on-disk format: copies of a small store (built like the frozen fixture by
tests/fixtures/make_fixture.py, with this kvtier) get a byte flipped, a run zeroed or
randomised, a file truncated, removed or extended, in the data files' header pages and pool
records, in the engine's blobs inside the catalog (cluster directory, id map), and in the
catalog's LMDB file itself (collection records, meta values, keys, LMDB's own pages); then
everything is opened and read. Each case must end in a kvtier error (CorruptionError,
FormatVersionError, StorageIOError) or in exactly the right data: never a crash, a hang, a
foreign exception or wrong data; the data group's damage is also read with on_corrupt="skip"
(every entry returned intact or named unreadable, nothing else) and checked by kvtier.verify
(which must find damage wherever reading raised CorruptionError). Cases run in a worker
process, so a segfault, a SIGBUS or an
abort is caught as the failure of that case (the worker restarts), and a case that stops
making progress is a hang. The catalog group, and one minimal reproduction per problem it
finds, are expected failures (strict) until kvtier/catalog.py is hardened. (2) The API's
inputs: hypothesis draws shapes, dtypes, values, budgets and ids; each call either works or
raises InvalidArgumentError / NotFoundError, and a rejected call changes nothing stored.

atheris is not used: the engine's parsers (directory, id map, header) are reached only through
blobs protected by CRC-32C, which a coverage-guided byte fuzzer cannot get past without a
harness that recomputes checksums; the seeded structural mutations below reach the checks
behind the CRCs directly, and hypothesis covers the Python argument layer.

Knobs: KVTIER_FUZZ_CASES (data group, default 160; the catalog group runs half as many),
KVTIER_FUZZ_SEED, KVTIER_API_FUZZ_EXAMPLES (default 400).
"""
from __future__ import annotations

import faulthandler
import importlib.util
import json
import os
import random
import select
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures"
CASE_TIMEOUT = 30.0
# What a damaged store may raise: anything else (KeyError, lmdb.Error, ValueError, ...) is a
# bug, as is an InvalidArgumentError about arguments the caller got right.
CLEAN = ("CorruptionError", "FormatVersionError", "StorageIOError", "StorageFullError")


def load_maker():
    spec = importlib.util.spec_from_file_location("make_fixture", FIXTURES / "make_fixture.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def bits(a):
    return np.ascontiguousarray(a).view(np.uint8)


# -- mutations ---------------------------------------------------------------------------------

def catalog_values(store: Path) -> list[tuple[bytes, bytes]]:
    """The catalog's (key, value) pairs, read from the intact store."""
    import lmdb

    env = lmdb.open(os.fspath(store / "catalog"), subdir=True, readonly=True, lock=False)
    with env.begin() as txn:
        items = [(bytes(k), bytes(v)) for k, v in txn.cursor()]
    env.close()
    return items


def make_cases(store: Path, group: str, n: int, seed: int) -> list[dict]:
    """A seeded mix of mutations. Group "data": the data files (header page, pool records,
    truncation, removal, appended garbage) and the engine's blobs in the catalog (cluster
    directory, id map), all under kvtier's own checksums. Group "catalog": LMDB's pages, the
    catalog file truncated, the collection records (JSON) and meta values, every key."""
    rnd = random.Random(seed)
    raw = (store / "catalog" / "data.mdb").read_bytes()
    # (what, offset, length) of each kvtier key and value inside data.mdb. The fixture's
    # catalog is compacted, so a record's bytes are live wherever they appear (a key also
    # appears in the branch pages above its leaf; both are fair targets).
    records = []
    for k, v in catalog_values(store):
        for what, b in (("key", k), ("value", v)):
            at = raw.find(b)
            while at >= 0 and len(b) >= 2:
                records.append((f"{what} {k.decode()}", at, len(b)))
                at = raw.find(b, at + 1)
    assert records, "no catalog record found in the fixture's data.mdb"
    blobs = [r for r in records if r[0].startswith(("value dir/", "value loc/"))]
    others = [r for r in records if r not in blobs]
    kvd = sorted(p.name for p in store.glob("c*.kvd"))
    sizes = {p: (store / p).stat().st_size for p in kvd}
    cases = []
    for i in range(n):
        r = rnd.random()
        if group == "catalog":
            if r < 0.45:  # a collection record, a meta value or any key
                what, at, ln = rnd.choice(others)
                c = dict(file="catalog/data.mdb", op="flip", off=at + rnd.randrange(ln),
                         mask=1 << rnd.randrange(8), what=what)
            elif r < 0.85:  # LMDB's own pages: headers, branch and leaf structure
                c = dict(file="catalog/data.mdb", op=rnd.choice(["flip", "flip", "zero", "rand"]),
                         off=rnd.randrange(len(raw)), len=rnd.choice([1, 8, 64]),
                         mask=1 << rnd.randrange(8), what="lmdb page")
            else:
                c = dict(file="catalog/data.mdb", op="trunc", off=rnd.randrange(len(raw)),
                         what="catalog truncated")
        elif r < 0.15:
            what, at, ln = rnd.choice(blobs)
            c = dict(file="catalog/data.mdb", op="flip", off=at + rnd.randrange(ln),
                     mask=1 << rnd.randrange(8), what=what)
        elif r < 0.30:
            f = rnd.choice(kvd)
            c = dict(file=f, op="flip", off=rnd.randrange(64), mask=1 << rnd.randrange(8), what="data header")
        elif r < 0.75:
            f = rnd.choice(kvd)
            c = dict(file=f, op=rnd.choice(["flip", "flip", "zero", "rand"]), off=rnd.randrange(4096, sizes[f]),
                     len=rnd.choice([1, 4, 16, 4096]), mask=1 << rnd.randrange(8), what="pool records")
        elif r < 0.90:
            f = rnd.choice(kvd)
            c = dict(file=f, op="trunc", off=rnd.randrange(sizes[f]), what="data file truncated")
        elif r < 0.95:
            c = dict(file=rnd.choice(kvd), op="delete", what="data file removed")
        else:
            c = dict(file=rnd.choice(kvd), op="extend", len=rnd.choice([17, 4096, 70000]), what="garbage appended")
        c["i"] = i
        c["seed"] = rnd.randrange(1 << 30)
        c["skip"] = group == "data"
        cases.append(c)
    return cases


def mutate(root: Path, c: dict) -> None:
    p = root / c["file"]
    if c["op"] == "delete":
        p.unlink()
        return
    raw = bytearray(p.read_bytes())
    rng = random.Random(c["seed"])
    if c["op"] == "trunc":
        del raw[c["off"]:]
    elif c["op"] == "extend":
        raw += bytes(rng.randrange(256) for _ in range(c["len"]))
    else:
        end = min(len(raw), c["off"] + c.get("len", 1))
        for j in range(c["off"], end):
            if c["op"] == "flip":
                raw[j] ^= c["mask"]
            elif c["op"] == "zero":
                raw[j] = 0
            else:
                raw[j] = rng.randrange(256)
    p.write_bytes(bytes(raw))


# -- the worker --------------------------------------------------------------------------------

def read_raise(c, n, k, v, name) -> str:
    """on_corrupt="raise": every entry bit for bit by retrieve, a sample by get, search inside."""
    q = k[[0, n // 2, n - 1]].astype(np.float32)
    got = c.retrieve(q, budget=n)
    order = np.argsort(got.ids)
    if not (np.array_equal(got.ids[order], np.arange(n))
            and np.array_equal(bits(got.keys[order]), bits(k))
            and np.array_equal(bits(got.values[order]), bits(v))):
        return f"WRONG:{name}: retrieve returned other data"
    ids = np.unique(np.r_[0:8, n - 8:n, np.random.default_rng(n).integers(0, n, 48)])
    gk, gv = c.get(ids)  # record by record, so a sample; retrieve checked them all
    if not (np.array_equal(bits(gk), bits(k[ids])) and np.array_equal(bits(gv), bits(v[ids]))):
        return f"WRONG:{name}: get returned other data"
    hits = c.search(q, k=3, nprobe=1 << 30)
    if not ((hits.ids >= 0) & (hits.ids < n)).all():
        return f"WRONG:{name}: search returned ids outside the collection"
    return "ok"


def read_skip(c, n, k, v, name) -> str:
    """on_corrupt="skip": every entry either returned with exactly its data or named as
    unreadable (retrieve and get), never both, never neither."""
    q = k[[0, n // 2, n - 1]].astype(np.float32)
    got = c.retrieve(q, budget=n)
    if sorted(np.concatenate([got.ids, got.unreadable]).tolist()) != list(range(n)):
        return (f"WRONG:{name}: skip retrieve returned {len(got)} + {got.unreadable.size} unreadable, "
                f"not a partition of the {n} ids")
    if not (np.array_equal(bits(got.keys), bits(k[got.ids])) and np.array_equal(bits(got.values), bits(v[got.ids]))):
        return f"WRONG:{name}: skip retrieve returned other data"
    e = c.get(np.arange(n))
    if sorted(e.ids.tolist() + e.unreadable.tolist()) != list(range(n)) or not np.array_equal(
            bits(e.keys), bits(k[e.ids])):
        return f"WRONG:{name}: skip get is not the intact entries"
    return "ok" if not got.unreadable.size else "skipped"


def check_store(root: Path, manifest: dict, mk, on_corrupt: str = "raise") -> list[str]:
    """Opens the damaged copy and reads every collection (read_raise or read_skip); one
    outcome per collection: the right data, or a clean kvtier error."""
    import kvtier

    read = read_raise if on_corrupt == "raise" else read_skip
    outcomes = []
    try:
        store = kvtier.open(root, dram_budget="4MiB", on_corrupt=on_corrupt)
    except kvtier.KvtierError as e:
        return [f"err:{type(e).__name__}"]
    try:
        for name, spec in manifest["collections"].items():
            try:
                c = store.collection(name)
                n = spec["n"]
                if len(c) != n or c.dim != spec["dim"] or c.value_dim != spec["value_dim"]:
                    outcomes.append(f"WRONG:{name}: {len(c)} entries of dim {c.dim}, expected {n} of {spec['dim']}")
                    continue
                k, v = mk.entries(spec["index"], 0, n, spec["dim"], spec["value_dim"], spec["dtype"])
                outcomes.append(read(c, n, k, v, name))
            except kvtier.KvtierError as e:
                outcomes.append(f"err:{type(e).__name__}" if type(e).__name__ in CLEAN
                                else f"UNCLEAR:{name}: {type(e).__name__}: {str(e)[:200]}")
    except Exception as e:  # noqa: BLE001 - every foreign exception is the finding
        outcomes.append(f"FOREIGN:{type(e).__name__}: {str(e)[:200]} @ {traceback.format_tb(e.__traceback__)[-1].strip()[:200]}")
    finally:
        try:
            store.close()
        except kvtier.KvtierError as e:
            outcomes.append(f"err:{type(e).__name__}")
        except Exception as e:  # noqa: BLE001
            outcomes.append(f"FOREIGN:close: {type(e).__name__}: {str(e)[:200]}")
    return outcomes


def check_verify(root: Path, raise_outcomes: list[str]) -> list[str]:
    """kvtier.verify on the damaged copy: where reading raised a CorruptionError, verify must
    have found damage (it reads every record and the header pages)."""
    import kvtier

    try:
        report = kvtier.verify(root, dram_budget="4MiB", record=False)
    except kvtier.KvtierError as e:
        return [f"err:{type(e).__name__}"]
    if report.ok and any(o == "err:CorruptionError" for o in raise_outcomes):
        return [f"WRONG:verify found nothing where reading raised CorruptionError: {report.summary()[:300]}"]
    return ["verified-ok" if report.ok else "verified-damaged"]


def worker_main(base: str, work: str) -> None:
    """Reads cases (JSON lines) on stdin; prints "start i" before and a JSON result after each."""
    mk = load_maker()
    manifest = json.loads((Path(base).parent / "manifest.json").read_text())
    for line in sys.stdin:
        c = json.loads(line)
        root = Path(work) / "case"
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(base, root)
        mutate(root, c)
        print("start", c["i"], flush=True)
        faulthandler.dump_traceback_later(CASE_TIMEOUT * 0.8, exit=False)
        try:
            out = check_store(root, manifest, mk)
            if c.get("skip"):  # the data group: the same damage read with on_corrupt="skip", and verify
                out += check_store(root, manifest, mk, "skip") + check_verify(root, out)
        except Exception as e:  # noqa: BLE001
            out = [f"FOREIGN:open: {type(e).__name__}: {str(e)[:200]}"]
        faulthandler.cancel_dump_traceback_later()
        print(json.dumps({"i": c["i"], "out": out}), flush=True)


class Worker:
    """A worker process and a line reader over its stdout's raw descriptor (select() on a
    buffered file would miss lines already pulled into the buffer)."""

    def __init__(self, base: Path, work: Path):
        # stderr goes to a file: a pipe nobody drains would block a chatty worker (a false hang)
        self.err = open(work / "worker.err", "w+")
        self.p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", os.fspath(base),
                                   os.fspath(work)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err)
        self.buf = b""

    def stderr_tail(self) -> str:
        self.err.seek(0)
        return self.err.read()[-2000:]

    def readline(self, deadline: float) -> str | None:
        """The next line, "" at end of file, None at the deadline."""
        while b"\n" not in self.buf:
            r, _, _ = select.select([self.p.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not r:
                return None
            chunk = os.read(self.p.stdout.fileno(), 65536)
            if not chunk:
                return ""
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode() + "\n"

    def run(self, case: dict) -> list[str]:
        """The case's outcomes, or ["CRASH ..."] / ["HANG ..."] (the worker is then dead)."""
        self.p.stdin.write((json.dumps(case) + "\n").encode())
        self.p.stdin.flush()
        deadline = time.monotonic() + CASE_TIMEOUT
        while True:
            ln = self.readline(deadline)
            if ln is None:
                err = self.stderr_tail()
                self.kill()
                return [f"HANG: {err}"]
            if not ln:
                self.p.wait()
                return [f"CRASH: exit {self.p.returncode}: {self.stderr_tail()}"]
            if ln.startswith("{"):
                return json.loads(ln)["out"]

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
        self.p.communicate()
        self.err.close()

    def close(self):
        self.p.stdin.close()
        self.p.wait(timeout=CASE_TIMEOUT)
        self.p.stdout.close()
        self.err.close()


def run_cases(base: Path, cases: list[dict], work: Path) -> list[tuple[dict, list[str]]]:
    results = []
    w = Worker(base, work)
    for c in cases:
        out = w.run(c)
        results.append((c, out))
        if out[0].startswith(("CRASH", "HANG")):
            w = Worker(base, work)
    w.close()
    return results


def build_base(root: Path) -> Path:
    """A store like the frozen fixture, written by this kvtier (so that what is fuzzed is the
    format written today), with its manifest beside it."""
    mk = load_maker()
    base = root / "base"
    manifest = mk.build(os.fspath(base))
    (root / "manifest.json").write_text(json.dumps(manifest))
    for f in ("LOCK", "catalog/lock.mdb"):
        if (base / f).exists():
            (base / f).unlink()
    return base


def fuzz(group: str, n: int, seed: int, root: Path, record_property) -> None:
    base = build_base(root)
    cases = make_cases(base, group, n, seed)
    results = run_cases(base, cases, root)
    tally: dict[str, int] = {}
    bad = []
    for c, out in results:
        for o in out:
            key = o.split(":")[0] + (":" + o.split(":")[1] if o.startswith("err:") else "")
            tally[key] = tally.get(key, 0) + 1
        if any(o.startswith(("WRONG", "FOREIGN", "UNCLEAR", "CRASH", "HANG")) for o in out):
            bad.append((c, [o for o in out if not o.startswith(("ok", "err"))]))
    msg = (f"on-disk fuzz ({group}): {len(results)} cases (seed {seed}), "
           f"outcomes per collection: {dict(sorted(tally.items()))}, misbehaved: {len(bad)}")
    print("[fuzz]", msg)
    record_property("reliability", msg)
    assert not bad, f"{len(bad)} of {len(results)} cases misbehaved, e.g.:\n" + "\n".join(
        f"  {c}: {o}" for c, o in bad[:12])


def test_data_files_and_engine_blobs(tmp_path, record_property):
    """Damage behind kvtier's own checksums: every case a clear error or the right data."""
    fuzz("data", int(os.environ.get("KVTIER_FUZZ_CASES", "160")),
         int(os.environ.get("KVTIER_FUZZ_SEED", "9")), tmp_path, record_property)


def test_catalog_structure(tmp_path, record_property):
    """Damage to the LMDB catalog itself: its pages, its length, the collection records."""
    fuzz("catalog", int(os.environ.get("KVTIER_FUZZ_CASES", "160")) // 2,
         int(os.environ.get("KVTIER_FUZZ_SEED", "9")) + 1, tmp_path, record_property)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    worker_main(sys.argv[2], sys.argv[3])


# -- catalog damage, one case each: minimal reproductions of what the fuzzing above finds ------



def _small_store(path: Path, n: int = 300) -> None:
    import kvtier

    with kvtier.open(path) as s:
        s.collection("old", dim=8, value_dim=0).add(np.random.default_rng(0).standard_normal((n, 8)))


def _in_child(code: str, path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, os.fspath(path)], capture_output=True, text=True,
                          timeout=CASE_TIMEOUT)


def test_truncated_catalog_is_an_error_not_a_crash(tmp_path):
    _small_store(tmp_path / "s")
    os.truncate(tmp_path / "s" / "catalog" / "data.mdb", 8192)  # its two meta pages only
    r = _in_child("import sys, kvtier\ntry:\n    kvtier.open(sys.argv[1])\n"
                  "except kvtier.CorruptionError as e:\n    print('clean', e)\n", tmp_path / "s")
    assert r.returncode == 0 and r.stdout.startswith("clean"), (r.returncode, r.stderr[-500:])


def test_damaged_collection_record_is_a_corruption_error(tmp_path):
    import kvtier

    _small_store(tmp_path / "s")
    p = tmp_path / "s" / "catalog" / "data.mdb"
    p.write_bytes(p.read_bytes().replace(b'"policy"', b'"polica"'))  # same length, valid JSON
    with pytest.raises(kvtier.CorruptionError):
        with kvtier.open(tmp_path / "s") as s:
            s.collection("old")


def test_damaged_next_no_never_reuses_a_data_file(tmp_path):
    import kvtier
    import lmdb

    _small_store(tmp_path / "s")
    env = lmdb.open(os.fspath(tmp_path / "s" / "catalog"))
    with env.begin(write=True) as txn:
        txn.put(b"meta/next_no", b"0")
    env.close()
    try:
        with kvtier.open(tmp_path / "s") as s:
            s.collection("new", dim=4, value_dim=0).add(np.ones((5, 4)))
    except kvtier.CorruptionError:
        pass  # refusing is fine too; reusing collection 0's data file is not
    with kvtier.open(tmp_path / "s") as s:
        assert len(s.collection("old").get(np.arange(300))[0]) == 300


def test_lost_catalog_is_not_an_empty_store(tmp_path):
    import kvtier

    _small_store(tmp_path / "s")
    (tmp_path / "s" / "catalog" / "data.mdb").unlink()
    with pytest.raises(kvtier.CorruptionError):
        kvtier.open(tmp_path / "s").close()


# -- API inputs --------------------------------------------------------------------------------

def _api_values():
    """Anything a caller might pass where an array, a count or a budget is expected."""
    from hypothesis import strategies as st
    from hypothesis.extra import numpy as hnp

    dtypes = st.sampled_from([np.float16, np.float32, np.float64, np.int8, np.int64, np.uint16,
                              np.bool_, np.complex64, np.dtype("U2"), np.dtype("O")])
    shapes = st.one_of(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5),
                       st.tuples(st.integers(0, 4), st.sampled_from([0, 3, 4, 7, 8, 9])),
                       st.sampled_from([(8,), (4,), (1, 8), (3, 8)]))

    def arrays(dt, shape):
        if dt == np.dtype("O"):
            return st.just(np.full(shape, None, dtype=object))
        if dt == np.dtype("U2"):
            return st.just(np.full(shape, "a", dtype="U2"))
        elems = None
        if np.dtype(dt).kind == "f":
            elems = st.floats(allow_nan=True, allow_infinity=True, width=np.dtype(dt).itemsize * 8)
        return hnp.arrays(dt, shape, elements=elems)

    anything = st.tuples(dtypes, shapes).flatmap(lambda t: arrays(*t))
    # rows of the right width, mostly plausible: a call must often succeed to test anything
    rows = st.tuples(st.sampled_from([np.float16, np.float32, np.float64, np.int16]),
                     st.sampled_from([(8,), (1, 8), (3, 8), (5, 8), (2, 4), (3, 0), (0, 8)])).flatmap(
        lambda t: hnp.arrays(t[0], t[1], elements=st.floats(-1e3, 1e3, width=16) if np.dtype(t[0]).kind == "f"
                             else st.integers(-100, 100)))
    ids = st.one_of(hnp.arrays(np.int64, st.integers(0, 6), elements=st.integers(-2, 260)),
                    st.lists(st.integers(0, 199), max_size=6), hnp.arrays(np.uint8, 3))
    arr = st.one_of(rows, rows, ids, anything)
    junk = st.sampled_from([None, "abc", [[1.0, 2.0], [3.0]], {}, 3, 2.5, True, b"\x00" * 32])
    numbers = st.one_of(st.integers(-3, 12), st.integers(1, 300), st.floats(0, 1), st.integers(-2**70, 2**70),
                        st.floats(allow_nan=True), st.booleans(), st.none(), st.just("5"),
                        st.sampled_from([np.int64(3), np.float32(0.5), np.float64(0.25), np.uint64(2**63 + 1)]))
    return arr, junk, numbers


def test_api_inputs(tmp_path, record_property):
    """Random arguments to add/search/retrieve/get: a call works or raises InvalidArgumentError
    or NotFoundError naming the argument; what is stored never changes on a rejected call."""
    import kvtier
    from hypothesis import HealthCheck, given, settings, strategies as st
    from kvtier.params import budget_arg, budget_entries

    arr, junk, numbers = _api_values()
    rng = np.random.default_rng(5)
    s = kvtier.open(tmp_path / "s", dram_budget="1MiB")
    colls = {"f16": s.collection("f16", dim=8, value_dim=4, dtype="float16", policy="adaptive",
                                 init_cluster_size=8, max_cluster_size=16),
             "f32": s.collection("f32", dim=8, value_dim=0, dtype="float32", metric="l2", policy="static")}
    # and one empty collection per policy: every read call meets them before any add, then at
    # one entry and a few (k and budgets past their size), as the fuzzed adds fill them
    for policy in ("adaptive", "static", "local", "none"):
        colls[f"empty-{policy}"] = s.collection(f"empty-{policy}", dim=8, value_dim=4, policy=policy,
                                                init_cluster_size=4, max_cluster_size=8, local_window=8,
                                                local_cluster_size=2)
    model = {}
    for name, c in colls.items():
        n = 0 if name.startswith("empty") else 200
        k = rng.standard_normal((n, 8)).astype(c.dtype)
        v = rng.standard_normal((n, c.value_dim)).astype(c.dtype)
        if n:
            c.add(k, v if c.value_dim else None)
        model[name] = [k, v]
    counts = {"calls": 0, "ok": 0, "rejected": 0}
    allowed = (kvtier.InvalidArgumentError, kvtier.NotFoundError)

    def mostly(valid, other):
        return st.one_of(valid, valid, valid, other)  # one_of picks a branch uniformly

    @settings(max_examples=int(os.environ.get("KVTIER_API_FUZZ_EXAMPLES", "400")), deadline=None,
              suppress_health_check=list(HealthCheck), derandomize=True)
    @given(name=st.sampled_from(sorted(colls)), op=st.sampled_from(["add", "search", "retrieve", "get", "prefetch"]),
           data=st.data())
    def call(name, op, data):
        a = data.draw(st.one_of(arr, arr, junk), label="first argument")
        if op == "add":
            b = data.draw(st.one_of(arr, junk, st.none()), label="values")
        elif op == "search":
            b = data.draw(mostly(st.integers(1, 12), numbers), label="k")
            x = data.draw(mostly(st.one_of(st.none(), st.integers(1, 40)), numbers), label="nprobe")
        elif op in ("retrieve", "prefetch"):
            b = data.draw(mostly(st.one_of(st.integers(0, 300), st.floats(0, 1)), numbers), label="budget")
        c = colls[name]
        k0, v0 = model[name]
        n0 = len(c)
        counts["calls"] += 1
        try:
            if op == "add":
                ids = c.add(a, b)
            elif op == "search":
                hits = c.search(a, k=b, nprobe=x)
            elif op == "retrieve":
                got = c.retrieve(a, budget=b)
            elif op == "prefetch":
                queued = c.prefetch(a, budget=b)
            else:
                gk, gv = c.get(a)
        except allowed as e:
            counts["rejected"] += 1
            assert str(e), "an error must say what was wrong"
            assert len(c) == n0, f"a rejected {op} changed the entry count"
            return
        counts["ok"] += 1
        if op == "add":
            m = len(ids)
            assert ids.tolist() == list(range(n0, n0 + m)) and len(c) == n0 + m
            keys = np.ascontiguousarray(np.asarray(a).reshape(m, 8), dtype=c.dtype)
            vals = (np.ascontiguousarray(np.asarray(b).reshape(m, c.value_dim), dtype=c.dtype)
                    if c.value_dim else np.zeros((m, 0), c.dtype))
            gk, gv = c.get(ids)
            assert np.array_equal(bits(gk), bits(keys)) and np.array_equal(bits(gv), bits(vals))
            model[name] = [np.concatenate([k0, keys]), np.concatenate([v0, vals])]
        elif op == "search":
            assert ((hits.ids >= -1) & (hits.ids < n0)).all()
        elif op == "retrieve":
            assert len(set(got.ids.tolist())) == len(got)
            assert np.array_equal(bits(got.keys), bits(k0[got.ids]))
            want = budget_entries(budget_arg(b), n0)
            assert len(got) == min(want, n0), (len(got), want, n0)  # every policy fills its budget
        elif op == "prefetch":
            assert queued >= 0
        else:
            ids = np.asarray(a).reshape(-1).astype(np.int64)  # [] is float64 to numpy
            assert np.array_equal(bits(gk), bits(k0[ids])) and np.array_equal(bits(gv), bits(v0[ids]))

    try:
        call()
        for name, c in colls.items():  # everything stored is still exactly the model
            k0, v0 = model[name]
            gk, gv = c.get(np.arange(len(k0)))
            assert len(c) == len(k0)
            assert np.array_equal(bits(gk), bits(k0)) and np.array_equal(bits(gv), bits(v0))
    finally:
        s.close()
    msg = f"API input fuzz: {counts['calls']} calls, {counts['ok']} accepted, {counts['rejected']} rejected cleanly"
    print("[fuzz]", msg)
    record_property("reliability", msg)




def test_values_for_a_collection_without_values_are_rejected_clearly(tmp_path):
    import kvtier

    with kvtier.open(tmp_path / "s") as s:
        c = s.collection("c", dim=8, value_dim=0)
        with pytest.raises(kvtier.InvalidArgumentError, match="values"):
            c.add(np.zeros((1, 8)), np.zeros((1, 8)))
        assert len(c) == 0


def test_ragged_ids_are_rejected_clearly(tmp_path):
    import kvtier

    with kvtier.open(tmp_path / "s") as s:
        c = s.collection("c", dim=8, value_dim=0)
        c.add(np.zeros((3, 8)))
        with pytest.raises(kvtier.InvalidArgumentError, match="ids"):
            c.get([[0, 1], [2]])
