"""Each statistics counter and each policy name is written once, in the engine's header
(engine_c/include/kvtier.h: KVT_STORE_STATS, KVT_COLL_STATS, KVT_POLICIES,
KVT_CACHE_POLICIES): the binding's dicts, its type stub and the Python names come from those
tables. These tests read the header's text and hold the built binding to it."""
import importlib.util
import os
import re

import numpy as np

import kvtier
from kvtier import _engine, config, store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = os.path.join(ROOT, "engine_c", "include", "kvtier.h")


def _gen():
    spec = importlib.util.spec_from_file_location("gen_engine_stub", os.path.join(ROOT, "scripts", "gen_engine_stub.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


def _names(macro):
    with open(HEADER) as fh:
        text = fh.read()
    body = text[text.index(f"#define {macro}(X)"):]
    lines = []
    for line in body.split("\n"):
        lines.append(line)
        if not line.rstrip().endswith("\\"):
            break
    return re.findall(r"X\(\w+,\s*(\d+),\s*(\w+)\)", re.sub(r"/\*.*?\*/", "", "\n".join(lines)))


def _used_store(tmp_path):
    s = kvtier.open(str(tmp_path / "s"), dram_budget="8MiB")
    c = s.collection("c", dim=8, value_dim=8, policy="adaptive")
    rng = np.random.default_rng(0)
    c.add(rng.standard_normal((300, 8)).astype(np.float16), rng.standard_normal((300, 8)).astype(np.float16))
    c.retrieve(rng.standard_normal((2, 8)).astype(np.float32), 40)
    return s, c


def test_the_store_stats_keys_are_the_headers_table(tmp_path):
    want = _gen().keys("KVT_STORE_STATS")
    assert len(want) == len(set(want)), "a key is listed twice in KVT_STORE_STATS"
    s, _ = _used_store(tmp_path)
    got = _flat(s._engine.stats())
    assert sorted(got) == sorted(want)
    assert _engine.STORE_STAT_KEYS == tuple(want)
    s.close()


def test_the_collection_stats_keys_are_the_headers_table(tmp_path):
    want = _gen().keys("KVT_COLL_STATS")
    assert len(want) == len(set(want)), "a key is listed twice in KVT_COLL_STATS"
    s, c = _used_store(tmp_path)
    got = c._h.stats()
    assert sorted(got) == sorted(want)
    assert _engine.COLL_STAT_KEYS == tuple(want)
    s.close()


def test_the_values_have_the_stubs_types(tmp_path):
    """Each value is of the type the stub (generated from the table) declares."""
    dicts = _gen().typed_dicts()
    s, c = _used_store(tmp_path)
    py = {"int": int, "float": float, "bool": bool, "str": str, "list[int]": list, "list[float]": list}

    def check(d, cls):
        for k, t in dicts[cls].items():
            if t in dicts:
                check(d[k], t)
            else:
                assert type(d[k]) is py[t], f"{cls}.{k}: {type(d[k]).__name__}, stub says {t}"
                if t.startswith("list["):
                    assert all(type(x) is py[t[5:-1]] for x in d[k]), f"{cls}.{k}: elements"

    check(s._engine.stats(), "StoreStats")
    check(c._h.stats(), "CollStats")
    s.close()


def test_the_stub_is_generated_from_the_header():
    assert _gen().main(["--check"]) == 0, "kvtier/_engine.pyi is stale: run python scripts/gen_engine_stub.py"
    for cls, fields in _gen().typed_dicts().items():  # the binding builds the same TypedDicts
        assert list(getattr(_engine, cls).__annotations__) == list(fields), cls


def test_policy_names_are_the_headers_table():
    pol = _names("KVT_POLICIES")
    assert [n for _, n in pol] == list(_engine.POLICIES) == list(config.POLICIES)
    assert {n: int(v) for v, n in pol} == _engine.POLICIES
    cache = _names("KVT_CACHE_POLICIES")
    assert {n: int(v) for v, n in cache} == _engine.CACHE_POLICIES == store.CACHE_POLICIES


def test_no_other_source_lists_the_policies():
    """The policy list is spelled once (the header's table): no Python source of the package,
    the adapters or the benchmarks writes all the policy names, or all the cache-policy names,
    in one literal sequence again (they take kvtier.config.POLICIES / kvtier.store.CACHE_POLICIES)."""
    names = "|".join(config.POLICIES)
    cache = "|".join(store.CACHE_POLICIES)
    seq = [re.compile(r"[\"']({0})[\"']\s*,\s*".format(n) * (k - 1) + r"[\"']({0})[\"']".format(n))
           for n, k in ((names, len(config.POLICIES)), (cache, len(store.CACHE_POLICIES)))]
    # a comma-separated default in one string ("none,static,local,adaptive") counts too
    joined = [re.compile(r"[\"']" + r",".join([f"({n})"] * k) + r"[\"']")
              for n, k in ((names, len(config.POLICIES)), (cache, len(store.CACHE_POLICIES)))]
    found = []
    for tree in ("kvtier", "adapters"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, tree)):
            for f in files:
                if f.endswith((".py", ".pyx", ".pyi")):
                    text = open(os.path.join(dirpath, f), encoding="utf-8").read()
                    found += [f"{f}: {m.group(0)}" for r in seq + joined for m in r.finditer(text)]
    assert not found, found


def test_a_policy_goes_to_the_engine_by_its_table_value(tmp_path):
    """Every policy name creates a collection that reports back its own name."""
    s = kvtier.open(str(tmp_path / "s"), dram_budget="8MiB")
    for name in config.POLICIES:
        c = s.collection(name, dim=4, value_dim=4, policy=name)
        assert c.policy == name
    s.close()
