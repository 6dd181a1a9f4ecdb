"""`kvtier bench`, kvtier.bench (suite, plots) and bench/report.py on tiny synthetic traces.

The real suite replays SmolLM2 traces for minutes; here traces of the same shape (random keys,
values and queries, a few layers and positions) are written into a temporary trace cache, so
the whole plumbing runs in seconds: trace loading and cutting, the grid, the recall sweep, the
prefix-difference spans, the calibration, W4 through kvtier.bench.w4_search, the JSON, the Markdown
and every PNG, and the report built from a results directory.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # bench/ (bench.report) is a source-tree package
    sys.path.insert(0, str(REPO))

from kvtier.cli import main  # noqa: E402
from kvtier.errors import InvalidArgumentError  # noqa: E402

pytest.importorskip("matplotlib", reason="the suite draws PNG plots (the bench extra)")

from kvtier.bench import suite  # noqa: E402
from kvtier.bench.capture import Trace, save_trace, trace_path  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synthetic_trace(workload, prefill, decode, layers=2, kv_heads=2, q_heads=4, dim=32, seed=0):
    """A Trace with the real one's fields and dtypes: random float16 states, GQA groups of 2."""
    rng = np.random.default_rng(seed)
    T = prefill + decode
    keys = rng.standard_normal((layers, kv_heads, T, dim)).astype(np.float16)
    queries = rng.standard_normal((layers, q_heads, T, dim)).astype(np.float16)
    return Trace(workload=workload, keys=keys, values=rng.standard_normal(keys.shape).astype(np.float16),
                 queries=queries, tokens=np.arange(T, dtype=np.int32), nll=np.ones(T - 1, np.float32),
                 prefill=prefill, meta={"workload": workload, "seed": 0, "model_file": "synthetic"})


@pytest.fixture(scope="module")
def trace_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("traces")
    # longer than asked for: the suite cuts the prefix it needs
    save_trace(synthetic_trace("W1", 128, 192, seed=1), trace_path("W1", 128, 192, 0, d))
    # W4 draws its vectors from a W1 capture with a 512-token prefill
    save_trace(synthetic_trace("W1", 512, 64, seed=9), trace_path("W1", 512, 64, 0, d))
    return d


def settings(trace_dir, **kw):
    s = suite.Settings(quick=True, workloads=["W1"], devices=["ufs4.0", "calibrated"],
                       dram_budgets=["70%", "1MiB"], policies=["static", "adaptive", "none"],
                       layouts=["clustered", "colocated"], cache_policies=["lru", "cluster"],
                       fetch_budget=0.3, budgets=[0.3, 0.5], every=8, prefill=128, decode=160,
                       context_points=3, repeats=2,
                       calibrate=True, cache_dir=str(trace_dir))
    for k, v in kw.items():
        setattr(s, k, v)
    return s


@pytest.fixture(scope="module")
def run(trace_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-out")
    report = suite.run_suite(settings(trace_dir), out, log=lambda m: None, command="kvtier bench --out OUT")
    return out, report


def test_suite_writes_json_markdown_and_plots(run):
    out, report = run
    assert report["stage_errors"] == []
    data = json.loads((out / "bench.json").read_text())
    for key in ("machine", "versions", "devices", "parameters", "calibration", "traces", "replays", "seconds"):
        assert key in data, key
    assert set(data["devices"]) == {"ufs4.0", "calibrated"}
    assert data["devices"]["ufs4.0"]["bandwidth_Bps"] == pytest.approx(2.9e9)
    assert data["calibration"]["calibration"]["points"]
    # the trace is 128+160 tokens cut from the cached 128+192 capture
    assert data["traces"]["W1"]["decode"] == 160 and data["traces"]["W1"]["cut_from_decode"] == 192
    # grid: devices x DRAM budgets x (2 clustered policies x 2 layouts x 2 cache policies + none once)
    grid = data["replays"]["grid"]
    assert len(grid) == 2 * 2 * (2 * 2 * 2 + 1)
    ok = [r for r in grid if "error" not in r]
    assert ok, "every configuration refused"
    for r in ok:
        assert 0.0 < r["recall"] <= 1.0 and r["dram_peak_bytes"] <= r["dram_budget_bytes"]
    assert {r["layout"] for r in grid if r["policy"] == "none"} == {"n/a"}
    # the recall sweep covers every policy and budget
    rec = data["replays"]["recall_vs_budget"]
    assert {(r["policy"], r["budget"]) for r in rec} == {(p, b) for p in ("static", "adaptive", "none")
                                                         for b in (0.3, 0.5)}
    names = sorted(p.name for p in (out / "plots").iterdir())
    assert names == sorted(os.path.basename(p) for p in data["plots"])
    for want in ("bench_recall_vs_budget.png", "bench_io_vs_context.png", "bench_bandwidth_vs_request_size.png",
                 "bench_hit_rate_vs_dram.png", "bench_io_by_policy_layout.png"):
        assert want in names
        blob = (out / "plots" / want).read_bytes()
        assert blob.startswith(PNG_MAGIC) and len(blob) > 10_000
    md = (out / "bench.md").read_text()
    assert "## Tier configurations" in md and "![recall vs budget](plots/bench_recall_vs_budget.png)" in md


def test_context_spans_add_up_to_the_whole_run(run):
    """The spans come from differences of prefix replays: summed back they must give the
    modeled I/O of the whole run at the same configuration (the engine is deterministic)."""
    out, report = run
    layers = {w: len(t["layers"]) for w, t in report["traces"].items()}
    spans = [r for r in report["replays"]["io_vs_context"] if "error" not in r]
    assert spans
    for (w, pol), rows in _group(spans).items():
        assert [r["span"][0] for r in rows][1:] == [r["span"][1] for r in rows][:-1]  # contiguous
        assert all(r["deterministic"] for r in rows)
        assert all(len(r["real_us_per_step_layer"]["runs"]) == 2 for r in rows)  # --repeats 2
        total = sum(r["modeled_us_per_step_layer"] * r["retrieval_steps"] * layers[w] for r in rows) / 1e6
        ref = report["traces"][w]["reference"]
        dram = ref["none_dram"] if pol == "none" else ref["dram"]
        whole = [g for g in report["replays"]["grid"] if g["workload"] == w and g["policy"] == pol
                 and g["device"] == ref["device"] and g["dram"] == dram and "error" not in g
                 and g["layout"] in (ref["layout"], "n/a") and g["cache_policy"] in (ref["cache_policy"], "n/a")]
        assert len(whole) == 1
        assert total == pytest.approx(whole[0]["modeled_io_s_total"], rel=1e-9, abs=1e-12)


def _group(rows):
    out = {}
    for r in rows:
        out.setdefault((r["workload"], r["policy"]), []).append(r)
    return {k: sorted(v, key=lambda r: r["span"][0]) for k, v in out.items()}


def test_report_from_a_results_directory(run, tmp_path):
    """bench.report turns a results directory into REPORT.md with plots and commands, and notes
    what is missing; no absolute path of this machine ends up in it."""
    from bench import report

    out, _ = run
    results = tmp_path / "results"
    results.mkdir()
    (results / "bench.json").write_text((out / "bench.json").read_text())
    rows = [{"workload": "W1", "budget": b, "policy": p, "recall": 0.1 + b + (p == "adaptive") * 0.2,
             "oracle_recall": 0.9, "clusters": 10, "mean_cluster_size": 30.0, "read_ops_per_retrieve": 0.5}
            for p in ("static", "adaptive") for b in (0.05, 0.1)]
    (results / "policies.json").write_text(json.dumps({"meta": {"args": {"layers": "all"}}, "rows": rows}))
    # recorded before the benchmarks moved into kvtier.bench: the report spells it as it runs now
    (results / "policies.md").write_text(f"# Policies\n\n`python -m bench.policies --out {tmp_path}/elsewhere`\n\n"
                                         "| a | b |\n|---|---|\n| 1 | 2 |\n")
    path = tmp_path / "REPORT.md"
    text = report.build(results, path)
    assert path.read_text() == text
    assert "## Tier configurations (`kvtier bench`)" in text and "## Clustering policies" in text
    assert "python -m kvtier.bench.policies --out results" in text  # the recorded --out, made portable
    assert "python -m bench.policies" not in text
    assert str(tmp_path) not in text
    assert "## Not in these results" in text and "python -m kvtier.bench.flash --out results" in text
    links = [ln.split("](")[1].rstrip(")") for ln in text.splitlines() if ln.startswith("![")]
    assert "results/plots/policies_recall_vs_budget.png" in links
    assert "results/plots/bench_io_vs_context.png" in links
    for link in links:
        assert (tmp_path / link).read_bytes().startswith(PNG_MAGIC), link


def test_w4_search_through_the_suite(trace_dir, tmp_path):
    pytest.importorskip("hnswlib", reason="W4 compares against hnswlib (the bench extra)")
    s = settings(trace_dir, workloads=["W4"], calibrate=False, devices=["ufs4.0"], w4_keys=1500, w4_queries=30,
                 w4_repeats=1, w4_methods=["exact", "hnswlib", "kvtier"], w4_trace_decode=64)
    report = suite.run_suite(s, tmp_path, log=lambda m: None)
    assert report["stage_errors"] == []
    res = {(e["method"], e.get("budget_fraction")): e for e in report["w4_search"]["results"]}
    assert res["exact", None]["points"][0]["recall_at_10"] == 1.0
    assert res["hnswlib", None]["points"] and res["kvtier", 1.0]["points"]
    assert str(tmp_path) not in json.dumps(report["w4_search"]["argv"])
    assert (tmp_path / "plots" / "bench_search_recall_vs_qps.png").read_bytes().startswith(PNG_MAGIC)
    assert "## W4 search" in (tmp_path / "bench.md").read_text()


def test_cli_bench_runs_the_suite(trace_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["bench", "--quick", "--out", str(out), "--workloads", "W1", "--policies", "static",
               "--layouts", "clustered", "--cache-policies", "lru,cluster", "--dram-budgets", "50%", "100%",
               "--prefill", "128", "--decode", "64", "--layers", "1", "--no-calibrate", "--trace-dir", str(trace_dir)])
    assert rc == 0
    data = json.loads((out / "bench.json").read_text())
    assert data["command"].startswith("kvtier bench --quick --out OUT ")
    assert data["parameters"]["dram_budgets"] == ["50%", "100%"] and data["parameters"]["layers"] == [1]
    assert data["parameters"]["budgets"] == [0.05, 0.1, 0.2]
    assert len(data["replays"]["grid"]) == 4
    assert any(p.endswith(".png") for p in data["plots"])
    assert "kvtier bench (quick)" in capsys.readouterr().out


def test_bench_help_lists_the_axes_and_the_presets(capsys):
    with pytest.raises(SystemExit) as ei:
        main(["bench", "--help"])
    assert ei.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for opt in ("--quick", "--out", "--workloads", "--devices", "--dram-budgets", "--policies", "--layouts",
                "--cache-policies"):
        assert opt in text
    # the preset numbers the help quotes are the suite's
    q, f = suite.Settings.preset(True), suite.Settings.preset(False)
    assert f"quick: {','.join(q.dram_budgets)}; full: {','.join(f.dram_budgets)}" in text
    assert f"quick: {','.join(map(str, q.budgets))}; full: {','.join(map(str, f.budgets))}" in text
    assert f"quick: {q.every}; full: {f.every}" in text
    assert f"quick: {q.decode}; full: {f.decode}" in text
    assert f"quick: {q.repeats}; full: {f.repeats}" in text
    assert f"quick: {q.w4_keys}; full: {f.w4_keys}" in text and f"quick: {q.w4_queries}; full: {f.w4_queries}" in text
    assert q.devices == ["ufs4.0"] and "quick: ufs4.0; full: every profile" in text
    from kvtier.config import PROFILES
    assert set(f.devices) == set(PROFILES)


def test_bench_runs_outside_the_source_tree(trace_dir, tmp_path):
    """The measuring code ships in the package: from a directory that is not a checkout, with
    the checkout off sys.path, `kvtier bench` imports nothing from the source tree's bench/."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = tmp_path / "out"
    code = ("import sys; from kvtier.cli import main; rc = main(sys.argv[1:]); "
            "assert 'bench' not in sys.modules, 'imported the source tree bench/'; sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, "bench", "--quick", "--out", str(out), "--workloads", "W1",
                        "--policies", "static", "--layouts", "clustered", "--cache-policies", "lru",
                        "--dram-budgets", "100%", "--prefill", "128", "--decode", "64", "--layers", "1",
                        "--no-calibrate", "--trace-dir", str(trace_dir)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "bench.json").read_text())["replays"]["grid"]


@pytest.mark.parametrize("kw, name", [
    ({"policies": ["static", "bogus"]}, "--policies"),
    ({"layouts": ["diagonal"]}, "--layouts"),
    ({"cache_policies": ["fifo"]}, "--cache-policies"),
    ({"workloads": ["W9"]}, "--workloads"),
    ({"devices": ["floppy"]}, "--devices"),
    ({"dram_budgets": ["lots"]}, "--dram-budgets"),
    ({"dram_budgets": ["150%"]}, "--dram-budgets"),
    ({"budgets": [0.0]}, "--budgets"),
    ({"every": 0}, "--every"),
    ({"prefill": 20}, "--prefill"),
])
def test_bad_settings_name_the_option(trace_dir, kw, name):
    with pytest.raises(InvalidArgumentError, match=name):
        settings(trace_dir, **kw).validate()


def test_presets_are_valid():
    for quick in (True, False):
        suite.Settings.preset(quick).validate()


def test_dram_budget_specs():
    assert suite.parse_dram("25%") == ("fraction", 0.25)
    assert suite.parse_dram("0.5") == ("fraction", 0.5)
    assert suite.parse_dram("1") == ("fraction", 1.0)
    assert suite.parse_dram("4MiB") == ("bytes", 4 * 2**20)
    assert suite.parse_dram("65536") == ("bytes", 65536)


def test_replay_virtualized_equals_resident_and_saving_reads_the_sweep():
    """bench.kvreplay's virtualize mode parks each layer after use and brings the next one back
    ahead: recall (static policy) is identical, DRAM lower, swap traffic counted; and
    kvtier.bench.virtualize.saving picks the smallest resident budget with no more I/O."""
    from kvtier.bench.kvreplay import replay
    from kvtier.bench.virtualize import saving
    tr = synthetic_trace("W1", 96, 48, layers=3, seed=3)
    res = {}
    for virt in (False, True):
        res[virt] = replay(tr, policy="static", budget=0.2, every=1, dram_budget="2MiB", device="ufs4.0",
                           direct_io=False, collect_stats=True, virtualize=virt)
    assert res[True].recall == res[False].recall
    on, off = res[True].extra["store"], res[False].extra["store"]
    assert on["swap_ins"] > 0 and on["swap_demand_ins"] == 0 and off["swap_ins"] == 0
    assert on["dram_peak_bytes"] < off["dram_peak_bytes"]
    rows = [{"mode": "resident", "virtualize": False, "fits": True, "dram_budget": b, "dram_peak_bytes": b,
             "modeled_io_ms_per_step": io} for b, io in ((4, 9.0), (8, 5.0))]
    rows.append({"mode": "resident", "virtualize": False, "fits": False, "dram_budget": 2})
    rows.append({"mode": "virtualized", "virtualize": True, "fits": True, "dram_budget": 2, "dram_peak_bytes": 1,
                 "modeled_io_ms_per_step": 11.0})
    rows.append({"mode": "virtualized", "virtualize": True, "fits": True, "dram_budget": 3, "dram_peak_bytes": 1,
                 "modeled_io_ms_per_step": 6.0})
    sv = saving(rows)
    assert [s["resident_budget_for_same_io"] for s in sv] == [4, 8] and sv[0]["saving"] == 4.0


def test_replay_switch_takes_turns_without_changing_results():
    """Conversations taking turns in one store (kvreplay.replay_switch) retrieve what each
    would alone (static policy: recall identical to the mean of the separate replays, weighted
    by retrieves), decode every step of every trace, and bring the parked layers back from
    the swap area at each turn."""
    from kvtier.bench.kvreplay import replay, replay_switch
    trs = {"A": synthetic_trace("W1", 96, 40, layers=2, seed=4), "B": synthetic_trace("W1", 96, 56, layers=2, seed=5)}
    alone = [replay(tr, policy="static", budget=0.2, every=2, dram_budget="8MiB", device="ufs4.0",
                    direct_io=False) for tr in trs.values()]
    both = replay_switch(trs, policy="static", budget=0.2, every=2, dram_budget="8MiB", turn=16)
    assert both["decode_steps"] == 40 + 56
    assert both["retrieves"] == sum(r.retrieves for r in alone)
    expect = sum(r.recall * r.retrieves for r in alone) / both["retrieves"]
    assert abs(both["recall"] - expect) < 1e-9
    # every turn brings back its conversation's collections (2 layers x 2 KV heads): A takes
    # 3 turns of 16 steps, B 4
    assert both["store"]["swap_ins"] == (3 + 4) * 2 * 2


class _Killed(BaseException):
    """Stands for a kill: raised out of the suite's log after some replays."""


def test_a_stopped_run_resumes_with_its_finished_replays(trace_dir, tmp_path):
    s = settings(trace_dir, devices=["ufs4.0"], calibrate=False, workloads=["W1"], repeats=1)
    whole = suite.run_suite(s, tmp_path / "whole", log=lambda m: None)
    seen = []

    def log(msg):
        seen.append(msg)
        if sum(m.startswith("[") for m in seen) == 7:
            raise _Killed()
    with pytest.raises(_Killed):
        suite.run_suite(settings(trace_dir, devices=["ufs4.0"], calibrate=False, workloads=["W1"], repeats=1),
                        tmp_path / "r", log=log)
    jsonl = tmp_path / "r" / suite.PARTIAL / "replays.jsonl"
    kept = jsonl.read_text().splitlines()
    assert len(kept) >= 7
    with open(jsonl, "a") as f:
        f.write('{"key": "a line cut by the kill')  # not trusted, and not in the way of the next appends
    (tmp_path / "r" / "kvtier-bench-killed").mkdir()  # the store a killed replay had open
    (tmp_path / "r" / "kvtier-bench-killed" / "c0.kvd").write_bytes(b"x" * 4096)
    msgs = []
    again = suite.run_suite(settings(trace_dir, devices=["ufs4.0"], calibrate=False, workloads=["W1"], repeats=1),
                            tmp_path / "r", log=msgs.append)
    assert again["resumed_replays"] == len(kept) and any(m.startswith("resuming:") for m in msgs)
    assert not (tmp_path / "r" / suite.PARTIAL).exists()  # complete: nothing left to resume
    assert not list((tmp_path / "r").glob("kvtier-bench-*"))  # nor the killed replay's store
    strip = ("wall_s", "real_retrieve_ms_per_step", "runs_real_retrieve_s_total", "real_retrieve_s_total")
    rows = lambda r: [{k: v for k, v in x.items() if k not in strip} for x in r["replays"]["grid"]]  # noqa: E731
    assert rows(again) == rows(whole)  # the resumed rows are the rows an unstopped run makes
    # other settings do not take a stopped run's replays
    with pytest.raises(_Killed):
        seen.clear()
        suite.run_suite(settings(trace_dir, devices=["ufs4.0"], calibrate=False, workloads=["W1"], repeats=1),
                        tmp_path / "o", log=log)
    other = suite.run_suite(settings(trace_dir, devices=["ufs4.0"], calibrate=False, workloads=["W1"], repeats=1,
                                     every=16), tmp_path / "o", log=lambda m: None)
    assert other["resumed_replays"] == 0


def test_w1_sampling_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    import torch

    from kvtier.bench import capture

    prompt = np.arange(5, dtype=np.int64)
    monkeypatch.setattr(capture, "w1_prompt_tokens", lambda: prompt)
    monkeypatch.setattr(capture, "shipped_w1_tokens", lambda seed: None)
    asked = {}

    def fake_sample(ids, n_new, desc, progress, checkpoint=None):
        asked.update(ids=ids[0].tolist(), n_new=n_new)
        streamer = capture._Checkpoint(checkpoint, ids, every=4)
        streamer.put(ids)
        out = ids
        for t in range(n_new):
            tok = torch.tensor([[1000 + t]])
            streamer.put(tok[0])
            out = torch.cat([out, tok], dim=1)
        streamer.end()
        return out

    monkeypatch.setattr(capture, "_sample", fake_sample)
    ck = tmp_path / "W1.tokens.npz"
    tokens, plen = capture.w1_tokens(30, 0, False, ck)
    assert plen == 5 and tokens.size == 30 and ck.exists()  # the checkpoint kept as sampling went
    with np.load(ck) as saved:
        assert saved["tokens"].size >= 5 + 20 and np.array_equal(saved["tokens"][:5], prompt)
    # a killed capture's checkpoint: 12 tokens kept; the next capture goes on from them
    np.savez(ck, tokens=np.r_[prompt, np.arange(500, 507)], rng=torch.get_rng_state().numpy())
    meta = {}
    tokens, _ = capture.w1_tokens(30, 0, False, ck, meta)
    assert asked["ids"] == list(np.r_[prompt, np.arange(500, 507)]) and asked["n_new"] == 30 - 12
    assert meta["resumed_at"] == 12 and tokens[:12].tolist() == asked["ids"]


def test_shipped_w1_tokens_are_the_quick_traces():
    from kvtier.bench import capture

    t = capture.shipped_w1_tokens(0)
    assert t is not None and t.size >= suite.Settings.preset(True).prefill + suite.Settings.preset(True).decode


def test_a_cut_line_of_kept_replays_is_dropped(tmp_path):
    jsonl = tmp_path / "replays.jsonl"
    jsonl.write_text('{"key": "a", "run": {"x": 1}}\n{"key": "b", "run": {"x"')
    runner = suite.Runner(suite.Settings(), str(tmp_path), {}, lambda m: None, partial=jsonl)
    assert runner.kept == {"a": [{"x": 1}]}
    assert jsonl.read_text() == '{"key": "a", "run": {"x": 1}}\n'  # the next run's appends start on a line
