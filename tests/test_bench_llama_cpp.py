"""kvtier.bench.llama_cpp's bookkeeping, without running a model: configurations, the cell cap
a configuration turns into, and the merged table (every run's command, TieredCache's rows)."""
import json
import math

import pytest

pytest.importorskip("llama_cpp", reason="kvtier.bench.llama_cpp measures llama.cpp")

from kvtier.bench import llama_cpp as lb  # noqa: E402


def test_configs_parse_into_typed_keyword_arguments():
    cfgs = lb.parse_configs("dense/refresh=4/qtok=8; bounded/cap=0.25/sdram=128MiB ;sink+window;;default")
    assert [c["label"] for c in cfgs] == ["dense/refresh=4/qtok=8", "bounded/cap=0.25/sdram=128MiB",
                                          "sink+window", "default"]
    assert cfgs[0]["kwargs"] == {"prefill": "dense", "refresh_every": 4, "query_tokens": 8}
    assert cfgs[1]["kwargs"] == {"prefill": "bounded", "dram_tokens": 0.25, "store_dram_budget": "128MiB"}
    assert cfgs[2]["kwargs"] == {"budget": 0.0} and cfgs[3]["kwargs"] == {}
    with pytest.raises(SystemExit, match="unknown key 'refrsh'"):
        lb.parse_configs("dense/refrsh=4")
    with pytest.raises(SystemExit, match="key=value expected"):
        lb.parse_configs("dense/4")


def test_cell_cap_is_a_share_of_the_prompt_or_what_the_budget_needs():
    kw = lb.tiered_kwargs({"prefill": "bounded", "dram_tokens": 0.25}, 7900, 8028)
    assert kw["dram_tokens"] == math.ceil(0.25 * 7900)
    kw = lb.tiered_kwargs({"budget": 0.1, "window": 32.0}, 1900, 2156)
    # sinks 4 + window 32 + room 64 + 10% of the context, rounded up to llama.cpp's 256 cells
    assert kw["dram_tokens"] == 512 and kw["window"] == 32 and isinstance(kw["window"], int)
    assert lb.tiered_kwargs({"dram_tokens": 700.0}, 1900, 2156)["dram_tokens"] == 700


def _row(config, dnll):
    return {"context": 1900, "decode": 256, "config": config, "agreement": 0.9, "dnll": dnll, "dnll_se": 0.01,
            "prefill_kv_cells_peak": 1900, "prefill_kv_mib_peak": 45.0, "decode_kv_cells_peak": 341,
            "decode_kv_mib_peak": 11.2, "full_kv_mib": 50.6, "mean_slots": 200, "retrieve_ms_per_step": 1.0,
            "slot_writes_per_retrieval": 10, "store_read_mib": 1.0}


def test_merge_lists_every_run_and_tiered_cache_beside(tmp_path):
    full = tmp_path / "a.json"
    full.write_text(json.dumps({"command": "python -m kvtier.bench.llama_cpp quality --configs dense",
                                "quality": [_row("dense", 0.01)]}))
    part = tmp_path / "b.json.partial"
    part.write_text(json.dumps({"command": "python -m kvtier.bench.llama_cpp quality --configs bounded",
                                "quality": [_row("bounded", 0.05), _row("bounded/cap=0.1", 0.26)]}))
    torch = tmp_path / "t.json"
    torch.write_text(json.dumps({"params": {"window": 32}, "rows": [
        {"workload": "W2", "method": "full", "top1": 1.0, "delta_nll": 0.0, "delta_nll_se": 0.0},
        {"workload": "W2", "method": "static", "top1": 0.843, "delta_nll": -0.016, "delta_nll_se": 0.026},
        {"workload": "W1", "method": "static", "top1": 0.5, "delta_nll": 0.9, "delta_nll_se": 0.1}]}))
    out = tmp_path / "m.json"
    assert lb.main(["merge", "quality", str(full), str(part), "--torch", f"1900:{torch}", "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    assert [r["config"] for r in d["quality"]] == ["dense", "bounded", "bounded/cap=0.1"]
    assert [(s["rows"], s["complete"]) for s in d["sources"]] == [(1, True), (2, False)]
    assert [(r["method"], r["dnll"]) for r in d["tiered_cache"]] == [("static", -0.016)]
    md = out.with_suffix(".md").read_text()
    assert "--configs dense`" in md and "--configs bounded` (2 rows, cut short" in md
    assert "| 1900      | static" in md and "bounded/cap=0.1" in md and "+0.260 ± 0.010" in md
