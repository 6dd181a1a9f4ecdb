"""``kvtier bench decode --model gemma3`` (each context prefilled once, every cache from a copy)
on a tiny random Gemma 3 with a byte tokenizer: rows for every cache and context, ratios to
DynamicCache, the engine's budget at 10% of the full layers' float16 KV, the prefill reported."""
import json

import pytest

torch = pytest.importorskip("torch", reason="the decode benchmark needs torch")
transformers = pytest.importorskip("transformers", reason="the decode benchmark needs transformers")
if int(transformers.__version__.split(".")[0]) != 5:
    pytest.skip(f"the torch adapter supports transformers 5.x, found {transformers.__version__}",
                allow_module_level=True)

from kvtier.bench import decode, runtime  # noqa: E402
from test_bench_tasks import ByteTokenizer, model  # noqa: E402,F401  (the tiny Gemma 3 fixture)


def test_prefilled_runs(model, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setattr(runtime, "load", lambda name, dtype: (model, ByteTokenizer()))
    assert decode.main(["--model", "gemma3", "--contexts", "300,600", "--tokens", "4", "--runs", "2",
                        "--caches", "dynamic,tiered-adaptive-pagecache,quantized-quanto",
                        "--out", str(tmp_path), "--name", "d"]) == 0
    data = json.loads((tmp_path / "d.json").read_text())
    rows = data["rows"]
    assert [(r["context"], r["cache"]) for r in rows] == [(300, "dynamic"), (300, "tiered-adaptive-pagecache"),
                                                         (600, "dynamic"), (600, "tiered-adaptive-pagecache")]
    for r in rows:
        assert r["runs"] == 2 and r["tok_s"] > 0 and r["prefill_seconds"] > 0 and r["prefill_peak_rss"] > 0
    t = rows[3]
    # 1 full layer x 1 KV head x 16 dims x (K, V) x 2 bytes x (600 + 4) tokens; 10% of it, at least 1 MiB
    assert t["global_kv_float16_bytes"] == 16 * 2 * 2 * 604
    assert t["engine_dram_budget"] == 1 << 20 and t["engine_dram_peak_bytes"] <= t["engine_dram_budget"]
    assert rows[2]["ratio"] == 1.0
    # the profile of a step (medians of two rounds: means, so the parts still add up)
    parts = t["compute_ms"] + t["engine_ms"] + t["wait_ms"] + t["glue_ms"]
    assert abs(parts - t["step_ms"]) <= 1e-6 * t["step_ms"]
    assert t["engine_ms"] >= 0 and t["wait_ms"] >= 0 and t["glue_ms"] >= 0 and 0 < t["store_share"] < 1
    assert rows[2]["store_share"] == 0.0
    # measured I/O wait beside the modeled time, and the step's reads with what prefetch did
    assert 0 <= t["read_wait_ms"] <= t["engine_ms"] + t["wait_ms"] and rows[2]["read_wait_ms"] == 0.0
    assert min(t["prefetch_issued_per_step"], t["prefetch_hits_per_step"], t["prefetch_evicted_per_step"]) >= 0
    md = (tmp_path / "d.md").read_text()
    assert "prefilled once" in md and "Engine DRAM peak" in md and "quantized-quanto" in md
    assert "Reads per step" in md and "read calls" in md
