"""Page-aligned write buffers on real KV traces: partial-page rewrites against buffer size.

Replays a captured SmolLM2 trace (kvtier.bench.capture, kvtier.bench.kvreplay) as a KV cache on the UFS 4.0
profile, the flash benchmark's setting (10 layers x 3 KV heads, 4 MiB DRAM, 10% fetch
budget, adaptive policy, co-located layout), once per write-buffer size, and reports:

- partial-page writes: writes that programmed a flash page already holding data (the page
  where an append meets the cluster's earlier records), each a read-modify-write on a real
  device; per 1,000 appended entries;
- tail evictions: buffers written out before they filled a page, to make room (the cluster's
  next page write is then a partial one);
- write requests and bytes written (padding included), and the entries waiting in buffers
  at the end;
- what the buffers cost the reads: modeled I/O time per step and the cache hit rate, since
  their DRAM comes out of the same budget; and recall, which buffering must not change.

A flush at the end writes the tails; it is not counted (the counts are taken before it).

    python -m kvtier.bench.write_buffer --out bench/results [--workload W1] [--sizes 0,16KiB,64KiB,...]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import kvtier
from kvtier.bench.capture import load_trace
from kvtier.bench.flash import add_setting_args
from kvtier.bench.kvreplay import replay
from kvtier.bench.tables import command, md_table, write_results
from kvtier.benchargs import show_defaults


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", default="W1")
    ap.add_argument("--policy", default="adaptive")
    add_setting_args(ap)
    ap.add_argument("--sizes", default="0,64KiB,128KiB,256KiB,1MiB",
                    help="write-buffer sizes (128KiB is the default at a 4 MiB budget: a thirty-second)")
    ap.add_argument("--out", default=None)
    a = show_defaults(ap).parse_args(argv)
    layers = [int(x) for x in a.layers.split(",")]
    trace = load_trace(a.workload, prefill=a.prefill, decode=a.decode)
    heads = len(layers) * trace.n_kv_heads
    rows = []
    t0 = time.time()
    for size in a.sizes.split(","):
        wb = kvtier.parse_size(size)
        r = replay(trace, policy=a.policy, budget=a.budget, layers=layers, every=a.every,
                   dram_budget=a.dram_budget, device=a.device, direct_io=True, collect_stats=True,
                   layout="colocated", colocate_after=32, store_kwargs={"write_buffer": wb})
        st, cs = r.extra["store"], r.extra["collections"]
        appended = sum(c["append_bytes"] for c in cs) / (cs[0]["append_bytes"] / cs[0]["entries"])
        steps = r.retrieves / heads
        row = {
            "write_buffer": wb, "recall": r.recall, "appended_entries": int(appended),
            "partial_page_writes": st["partial_page_writes"],
            "partial_per_1k_appends": st["partial_page_writes"] / appended * 1e3,
            "write_buffer_evictions": st["write_buffer_evictions"],
            "buffered_at_end": st["write_buffer_entries"],
            "write_ops": st["write_ops"], "write_bytes": st["write_bytes"],
            "modeled_io_ms_per_step": st["modeled_io_seconds"] / steps * 1e3,
            "cache_hit_rate": st["cache_hits"] / max(1, st["cache_hits"] + st["cache_misses"]),
            "dram_peak_bytes": st["dram_peak_bytes"],
        }
        rows.append(row)
        print(f"write_buffer={size:>7s} partial={row['partial_page_writes']} "
              f"({row['partial_per_1k_appends']:.0f}/1k appends) evictions={row['write_buffer_evictions']} "
              f"write_ops={row['write_ops']} modeled={row['modeled_io_ms_per_step']:.3f}ms/step "
              f"hit={row['cache_hit_rate']:.3f} recall={row['recall']:.3f} [{r.wall_s:.0f}s]", flush=True)
    md = md_table(["write buffer", "partial-page writes", "per 1k appends", "tail evictions", "buffered at end",
                   "write ops", "MiB written", "modeled I/O ms/step", "hit rate", "recall"],
                  [[f"{r['write_buffer'] // 1024} KiB", r["partial_page_writes"], f"{r['partial_per_1k_appends']:.0f}",
                    r["write_buffer_evictions"], r["buffered_at_end"], r["write_ops"],
                    f"{r['write_bytes'] / 2**20:.1f}", f"{r['modeled_io_ms_per_step']:.3f}",
                    f"{r['cache_hit_rate']:.3f}", f"{r['recall']:.3f}"]
                   for r in rows], "r" * 10) + "\n"
    off = next((r for r in rows if r["write_buffer"] == 0), None)
    if off and off["partial_page_writes"]:
        md += "\n" + "\n".join(
            f"{r['write_buffer'] // 1024} KiB: "
            f"partial-page writes x{r['partial_page_writes'] / off['partial_page_writes']:.3f} "
            f"of no buffer, modeled I/O per step x{r['modeled_io_ms_per_step'] / off['modeled_io_ms_per_step']:.3f}"
            for r in rows if r["write_buffer"]) + "\n"
    print()
    print(md)
    if a.out:
        meta = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
                "versions": {"kvtier": kvtier.__version__}, "args": vars(a), "seconds": time.time() - t0}
        write_results(a.out, "write_buffer", {"meta": meta, "rows": rows}, "Page-aligned write buffers on real traces",
                      command("kvtier.bench.write_buffer", argv), md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
