"""The kvtier command: help, demo dispatch, calibrate, inspect."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import kvtier
from conftest import make_data
from kvtier.calibrate import load_profile
import kvtier.cli
from kvtier.cli import main

COMMANDS = ("demo", "bench", "calibrate", "inspect", "verify", "estimate")


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as ei:
        main(["--help"])
    assert ei.value.code == 0
    out = capsys.readouterr().out
    for cmd in COMMANDS:
        assert f"\n    {cmd}" in out


def test_module_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "kvtier.cli", "--version"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == f"kvtier {kvtier.__version__}"


def test_demo_dispatches_to_kvtier_demo(monkeypatch):
    """`kvtier demo` parses its options and runs kvtier.demo.main with them (the demo itself,
    on a tiny model, is tests/test_demo.py)."""
    import kvtier.demo

    seen = []
    monkeypatch.setattr(kvtier.demo, "main", lambda args: seen.append(args) or 0)
    assert main(["demo", "--new-tokens", "64", "--budget", "0.2", "--policy", "static",
                 "--dram-budget", "4MiB", "--device", "emmc5.1"]) == 0
    a = seen[0]
    assert (a.new_tokens, a.budget, a.policy, a.dram_budget, a.device) == (64, 0.2, "static", "4MiB", "emmc5.1")


@pytest.fixture
def small_store(tmp_path):
    path = tmp_path / "store"
    with kvtier.open(path, dram_budget="8MiB") as s:
        c = s.collection("L3.H1", dim=16, value_dim=8)
        c.add(*make_data(1500))
        e = s.collection("emb", dim=32, value_dim=0, dtype="float32", metric="l2")
        e.add(np.random.default_rng(1).standard_normal((300, 32)))
        s.flush()  # the write buffers' tails go to flash: the stats are then what inspect reads
        expect = {name: (s.collection(name).stats(), np.sort(s.collection(name).cluster_sizes()))
                  for name in ("L3.H1", "emb")}
    return path, expect


def test_inspect_prints_the_collections(small_store, capsys):
    path, expect = small_store
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "format: catalog 1, data files 3 " in out and "(format 3)" in out  # read from each file's header
    for name, (st, sizes) in expect.items():
        assert f"collection {name!r}" in out
        assert f"entries {st['entries']:,}  clusters {st['clusters']:,}  pools {st['pools']:,}" in out
        assert f"min {sizes[0]} " in out and f"max {sizes[-1]} " in out
    assert "metric=l2" in out and "dram_budget" in out


def test_inspect_json_matches_the_store(small_store, capsys):
    path, expect = small_store
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {c["name"] for c in info["collections"]} == set(expect)
    for c in info["collections"]:
        st, sizes = expect[c["name"]]
        assert c["entries"] == st["entries"] and c["clusters"] == st["clusters"] == len(sizes)
        assert c["pools"] == st["pools"] and c["data_file_bytes"] == st["data_file_bytes"]
        assert c["cluster_sizes"]["min"] == sizes[0] and c["cluster_sizes"]["max"] == sizes[-1]
        assert c["cluster_sizes"]["median"] == pytest.approx(float(np.median(sizes)))
        assert c["file_size"] == os.path.getsize(path / c["data_file"]) > 0
        assert set(c["more"]) == set(st) - set(kvtier.cli._SHOWN_COLL_STATS)  # nothing dropped
    assert info["collections"][0]["params"]["dim"] in (16, 32)
    assert info["stats"]["dram_budget"] == 256 << 20
    # inspecting changes nothing: the store reopens with the same contents
    with kvtier.open(path) as s:
        assert len(s.collection("L3.H1")) == 1500 and len(s.collection("emb")) == 300


def test_inspect_refuses_a_non_store_without_creating_one(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nothing")]) == 1
    assert "is not a kvtier store" in capsys.readouterr().err
    assert not (tmp_path / "nothing").exists()


def test_inspect_of_a_store_in_use_says_so(small_store, capsys):
    path, _ = small_store
    with kvtier.open(path):
        assert main(["inspect", str(path)]) == 1
    assert "open in another process" in capsys.readouterr().err


def test_calibrate_quick_saves_a_loadable_profile_and_plots(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (the bench extra)")
    (tmp_path / "dev").mkdir()
    prof, png = tmp_path / "p.json", tmp_path / "p.png"
    assert main(["calibrate", str(tmp_path / "dev"), "--quick", "--save", str(prof), "--plot", str(png),
                 "--name", "here"]) == 0
    out = capsys.readouterr().out
    assert "qd1 MB/s" in out and "qd32 IOPS" in out and "profile 'here'" in out
    assert os.listdir(tmp_path / "dev") == []
    p = load_profile(prof)
    assert p.name == "here" and p.bandwidth_Bps > 0 and p.iops > 0 and p.queue_depth == 32
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_calibrate_json_and_bad_arguments(tmp_path, capsys):
    assert main(["calibrate", str(tmp_path), "--sizes", "4KiB,64KiB", "--queue-depths", "1,2",
                 "--duration", "0.01", "--runs", "1", "--file-size", "1MiB", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [(p["size"], p["queue_depth"]) for p in doc["calibration"]["points"]] == [
        (4096, 1), (4096, 2), (65536, 1), (65536, 2)]
    assert main(["calibrate", str(tmp_path / "missing"), "--quick"]) == 1
    assert "path" in capsys.readouterr().err
    assert main(["calibrate", str(tmp_path), "--queue-depths", "1,x"]) == 1
    assert "--queue-depths" in capsys.readouterr().err
    assert main(["calibrate", str(tmp_path), "--quick", "--save", str(tmp_path / "no" / "p.json")]) == 1
    assert "save" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []  # refused before measuring


def test_estimate_prints_per_collection_and_total(capsys):
    assert main(["estimate", "8192", "--dim", "64", "--collections", "90"]) == 0
    out = capsys.readouterr().out
    assert "per collection x 90 collections = " in out and "minimum DRAM budget" in out
    assert main(["estimate", "1000", "--dim", "8", "--json"]) == 0
    e = json.loads(capsys.readouterr().out)
    assert e["minimum"] <= e["recommended"] and e["collections"] == 1


def test_every_help_shows_defaults(capsys):
    """Each subcommand's --help states its defaults (argparse's formatter or the text)."""
    from kvtier.bench.decode import main as decode

    for argv, want in ((["estimate", "--help"], "(default: adaptive)"), (["verify", "--help"], "default 256MiB"),
                       (["inspect", "--help"], "default 256MiB"), (["calibrate", "--help"], "default 1,32"),
                       (["bench", "--help"], "quick:"), (["demo", "--help"], "default 256")):
        with pytest.raises(SystemExit):
            main(argv)
        assert want in capsys.readouterr().out, argv
    with pytest.raises(SystemExit):
        decode(["--help"])
    assert "(default: 2048,8192)" in capsys.readouterr().out


def test_every_benchmark_runs_as_kvtier_bench_name(capsys):
    """``kvtier bench NAME`` for every benchmark of kvtier.bench (each module with a main), and
    its --help shows the defaults; the light ones are run here, the others only found."""
    import ast
    import importlib.util
    import pathlib

    from kvtier.bench import BENCHMARKS

    here = pathlib.Path(kvtier.__file__).parent / "bench"
    with_main = {p.stem for p in here.glob("*.py")
                 if any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in ast.parse(p.read_text()).body)}
    assert with_main == set(BENCHMARKS)
    for name in BENCHMARKS:
        assert importlib.util.find_spec(f"kvtier.bench.{name}") is not None, name
    for name, want in (("cache", "default: W1,W2,W3"), ("policies", "default: "), ("adaptive16", "default: "),
                       ("write_buffer", "default: ")):
        with pytest.raises(SystemExit) as ei:
            main(["bench", name, "--help"])
        out = capsys.readouterr().out
        assert ei.value.code == 0 and out.startswith(f"usage: kvtier bench {name} ") and want in out, name
    with pytest.raises(SystemExit) as ei:
        main(["bench", "cache", "--no-such-option"])
    assert ei.value.code == 2 and "kvtier bench cache: error" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in BENCHMARKS)


def test_store_stats_are_grouped(tmp_path):
    import numpy as np

    with kvtier.open(tmp_path / "s") as s:
        s.collection("c", dim=4, value_dim=0).add(np.ones((10, 4)))
        st = s.stats()
        assert st["dram_bytes"] == st.engine["dram_bytes"] and "read_bytes" in st.io and "cache_hits" in st.cache
        assert st["dram_peak_bytes"] >= st["dram_bytes"]
        assert set(st.grouped()) <= {"engine", "cache", "io", "other"}
        assert sum(len(g) for g in st.grouped().values()) == len(st)
