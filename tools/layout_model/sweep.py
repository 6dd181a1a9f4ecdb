"""The split threshold / cluster size sweep (issue 29's last acceptance point) as one table,
from kvtier.bench.flash results (JSON) of one setting each: the adaptive rows of every file
against the local and none (token-level) rows of the same workload and length.

    python tools/layout_model/sweep.py bench/results/split_sweep/flash_*.json [--md out.md]
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def key(row, meta):
    return row["workload"], meta["args"]["prefill"] + meta["args"]["decode"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", nargs="+")
    ap.add_argument("--md")
    a = ap.parse_args(argv)
    base, rows, meta_of = {}, [], {}
    for p in a.results:
        with open(p) as f:
            d = json.load(f)
        meta_of[os.path.basename(p)] = d["meta"]
        for r in d["rows"]:
            if r.get("fits") is False:
                continue
            k = key(r, d["meta"])
            if r["policy"] in ("local", "none"):
                base[k + (r["policy"],)] = r
            elif r["policy"] == "adaptive":
                setting = " ".join(f"{n}={v}" for n, v in sorted(r.get("params", {}).items())) or "default"
                rows.append((k, setting, r, os.path.basename(p)))
    out = ["| workload | tokens | adaptive setting | recall | / token-level | modeled I/O ms/step | local / adaptive "
           "| entries per gap-free read | data file / token | split writes / decoding's appends | real read ms/step | results |",
           "|:--|--:|:--|--:|--:|--:|--:|--:|--:|--:|--:|:--|"]
    order = {"default": 0}
    rows.sort(key=lambda x: (x[0], order.get(x[1], 1), x[1]))
    for k, setting, r, src in rows:
        loc, tok = base.get(k + ("local",)), base.get(k + ("none",))
        # appended_bytes counts the prefill's adds too; decoding's share of the stored tokens is
        # decode / (prefill + decode - sinks - window) (kvreplay's sinks 4 and window 32)
        args = meta_of[src]["args"]
        decoded = args["decode"] / (args["prefill"] + args["decode"] - 36)
        appended = r["appended_bytes"] * decoded / max(1, r["steps"]) / 1024
        cells = [k[0], f"{k[1]}", setting, f"{r['recall']:.3f}",
                 f"{r['recall'] / tok['recall']:.2f}" if tok else "",
                 f"{r['modeled_io_ms_per_step']:.3f}",
                 f"{loc['modeled_io_ms_per_step'] / r['modeled_io_ms_per_step']:.2f}" if loc else "",
                 f"{r['entries_per_contiguous_read']:.1f}",
                 f"{r['data_file_bytes'] / tok['data_file_bytes']:.2f}" if tok else "",
                 f"{r['split_write_kib_per_step'] / appended:.2f}",
                 f"{r['real_read_ms_per_step']:.1f}", src]
        out.append("| " + " | ".join(cells) + " |")
    for (w, n, pol), r in sorted(base.items()):
        out.append(f"| {w} | {n} | ({pol}) | {r['recall']:.3f} | | {r['modeled_io_ms_per_step']:.3f} | | "
                   f"{r['entries_per_contiguous_read']:.1f} | | | {r['real_read_ms_per_step']:.1f} | |")
    md = "\n".join(out) + "\n"
    print(md)
    if a.md:
        with open(a.md, "w") as f:
            f.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
