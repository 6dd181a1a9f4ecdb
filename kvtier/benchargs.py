"""What the command line and the benchmark suite share, kept in the library so that imports
point one way (cli -> library, bench -> library): the options of ``kvtier bench`` and the
JSON encoding of numpy values."""
from __future__ import annotations

import argparse

import numpy as np


def bench_arguments(p) -> None:
    """The options of ``kvtier bench`` (``python -m kvtier.bench.suite`` takes the same). They are
    declared here, in the library, rather than in the suite, so that ``--help`` works, and every other
    command stays independent of the source tree; the presets' numbers quoted in the help are
    checked against kvtier.bench.suite.Settings by the tests."""
    from kvtier.config import PROFILES

    p.add_argument("--quick", action="store_true",
                   help="the small preset: 3 layers, 512+1024 tokens (W1's tokens ship with kvtier: one forward "
                        "pass to capture), retrieval every 8th step, one device, a 20000-key W4 set from the same "
                        "W1 trace; about 3 minutes of CPU from a fresh checkout (longer in wall time on a busy "
                        "machine). Without it the full preset runs every "
                        "device profile and more of everything (hours). A stopped run resumes where it was when "
                        "started again with the same options (the finished replays are kept in DIR/.partial)")
    # required: a full run takes hours and `python -m bench.report` reads bench/results, so where
    # results land is the caller's explicit choice
    p.add_argument("--out", metavar="DIR", required=True,
                   help="results directory (required): bench.json, bench.md, plots/*.png, w4/; "
                        "bench/results is what `python -m bench.report` reads")
    p.add_argument("--workloads", nargs="+", metavar="W", help="of W1, W2 (replayed), W4 (search); default all")
    p.add_argument("--devices", nargs="+", metavar="DEV",
                   help=f"device profiles ({', '.join(PROFILES)}), 'calibrated' (the profile this run measures "
                        "on DIR) or saved profile files; quick: ufs4.0; full: every profile")
    p.add_argument("--dram-budgets", nargs="+", metavar="B",
                   help="DRAM budgets: shares of the replayed KV bytes (25%%, 0.25) or sizes (4MiB); "
                        "quick: 20%%,100%%; full: 10%%,20%%,50%%,100%%")
    p.add_argument("--policies", nargs="+", metavar="P", help="of none, static, local, adaptive; default all")
    p.add_argument("--layouts", nargs="+", metavar="L", help="of clustered, colocated; default both")
    p.add_argument("--cache-policies", nargs="+", metavar="C", help="of lru, lfu, cluster; default all")
    p.add_argument("--budgets", nargs="+", metavar="F",
                   help="fetch budgets of the recall sweep (fractions of the context; the grid uses 0.1); "
                        "quick: 0.05,0.1,0.2; full: 0.02,0.05,0.1,0.2,0.3")
    p.add_argument("--layers", nargs="+", metavar="N",
                   help="replayed layers; default: quick 3 spread over the depth, full every 3rd")
    p.add_argument("--every", type=int, metavar="N", help="retrieve every N decoding steps; quick: 8; full: 4")
    p.add_argument("--prefill", type=int, metavar="N", help="context tokens before decoding (default 512)")
    p.add_argument("--decode", type=int, metavar="N", help="decoded tokens; quick: 1024; full: 2048")
    p.add_argument("--repeats", type=int, metavar="N",
                   help="runs of the I/O-vs-context replays, for medians of real time; quick: 1; full: 3")
    p.add_argument("--w4-keys", type=int, metavar="N", help="W4 data vectors; quick: 20000; full: 200000")
    p.add_argument("--w4-queries", type=int, metavar="N", help="W4 queries; quick: 200; full: 1000")
    p.add_argument("--no-calibrate", action="store_true",
                   help="skip measuring DIR's read bandwidth (the bandwidth plot then shows profile models only)")
    p.add_argument("--trace-dir", metavar="DIR",
                   help="trace cache (default $KVTIER_TRACE_DIR, else bench/.cache in a source checkout, "
                        "else ~/.cache/kvtier/traces)")


def show_defaults(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Makes ``--help`` show each option's default (where its help does not already say it):
    what every benchmark's parser passes through, so ``kvtier bench NAME --help`` lists them."""
    for a in p._actions:
        if (a.option_strings and a.default not in (None, False, argparse.SUPPRESS) and a.nargs != 0
                and "default" not in (a.help or "") and a.help != argparse.SUPPRESS):
            a.help = f"{a.help} (default: %(default)s)" if a.help else "default: %(default)s"
    return p


def json_default(o):
    """json.dumps default for numpy scalars and arrays."""
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
