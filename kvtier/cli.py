"""The ``kvtier`` command: demo, bench, calibrate, inspect, verify, estimate.

Each subcommand is a thin shell over a library call (``kvtier.calibrate``, ``kvtier.open``), so
that what the command prints is what a script gets. ``main(argv)`` returns the exit status:
0 success, 1 a kvtier or OS error (printed on one line), 2 bad usage or a command this version
does not have yet.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import textwrap
import time as _time
from collections.abc import Sequence
from typing import Any

import numpy as np

import kvtier
from kvtier.bench import BENCHMARKS
from kvtier.benchargs import bench_arguments, json_default, show_defaults
from kvtier.config import POLICIES, parse_size
from kvtier.errors import InvalidArgumentError, KvtierError
from kvtier.params import DEFAULT_POLICY

EXIT_ERROR = 1
EXIT_UNAVAILABLE = 2

# Commands the spec names whose machinery lands later. They are listed so that `--help` shows
# the whole tool, and refuse to run rather than pretend.
_NOT_YET: dict = {}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvtier",
        description="kvtier: tiered KV-cache and vector storage (vectors on flash, a budgeted DRAM hot set).")
    p.add_argument("--version", action="version", version=f"kvtier {kvtier.__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    from kvtier import demo  # its options; torch is imported only when it runs
    demo.add_arguments(sub.add_parser(
        "demo", help="long decoding of a real model with its KV cache in kvtier",
        description=demo.DESCRIPTION))
    b = sub.add_parser(
        "bench", help="benchmark tier configurations on real traces; JSON results and PNG plots "
                      "(`kvtier bench NAME --help` for one benchmark: decode, tasks, cache, ...)",
        description="Device profile x DRAM budget x policy x layout x cache policy, replayed on real "
                    "SmolLM2 KV traces (W1 long generation, W2 document + continuation) as a KV cache; "
                    "recall vs fetch budget, I/O time per step vs context length, hit rate vs DRAM budget, "
                    "read bandwidth vs request size (measured on DIR's file system and modeled), and W4 "
                    "search recall vs queries/s against hnswlib and faiss. Writes DIR/bench.json (machine, "
                    "versions, profiles, parameters, medians and spreads), DIR/bench.md and DIR/plots/*.png. "
                    "Runs from any directory (the measuring code is the kvtier.bench package); a trace "
                    "not in the trace cache is captured with the real model first (the llm extra).",
        epilog="Lists take commas or spaces: --policies static,adaptive. `python -m bench.report` turns "
               "bench/results/ into bench/REPORT.md.\n\nOne benchmark, with its own options: kvtier bench NAME "
               "[options] (the same as python -m kvtier.bench.NAME; NAME --help shows its defaults):\n"
               + "\n".join(f"  {name:15s} {what}" for name, what in BENCHMARKS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_arguments(b)
    show_defaults(b)

    c = sub.add_parser(
        "calibrate", help="measure a device's read bandwidth vs request size; save it as a profile",
        description="Writes a random test file under PATH (a directory on the device to measure), reads "
                    "it at random aligned offsets with O_DIRECT for each request size at queue depths 1 "
                    "and 32, prints the curve and the derived device profile, then removes the file. "
                    "Where the file system refuses O_DIRECT the reads are buffered and the output says so.",
        epilog="Use a saved profile: from kvtier.calibrate import load_profile; "
               "kvtier.open(path, device=load_profile(FILE)).")
    c.add_argument("path", metavar="PATH", help="a directory on the device to measure")
    c.add_argument("--save", metavar="FILE", help="write the profile (and the measured curve) as JSON")
    c.add_argument("--plot", metavar="FILE.png", help="plot bandwidth vs request size (needs matplotlib)")
    c.add_argument("--quick", action="store_true", help="a ~1 s run: fewer sizes, a small file, short runs")
    c.add_argument("--name", help="profile name (default: calibrated)")
    c.add_argument("--sizes", metavar="LIST",
                   help="request sizes, e.g. 4KiB,64KiB,1MiB (default 4KiB..4MiB, powers of two)")
    c.add_argument("--queue-depths", metavar="LIST", default="1,32", help="concurrent requests (default 1,32)")
    c.add_argument("--duration", type=float, metavar="SECONDS", help="seconds per timed run (default 0.15)")
    c.add_argument("--runs", type=int, help="timed runs per point; the median is reported (default 5)")
    c.add_argument("--file-size", metavar="SIZE", help="test file size (default 256MiB)")
    c.add_argument("--json", action="store_true", help="print the full result as JSON instead of a table")

    i = sub.add_parser(
        "inspect", help="show a store's collections, clusters, pools, format and stats",
        description="Opens STORE (it takes the store's exclusive lock: close other users first), prints "
                    "its format version, each collection's parameters, entries, cluster count and size "
                    "distribution, pools and data file bytes, the nprobe search uses by default, what the "
                    "last `kvtier verify` found, then the store's stats. Closing commits the catalog "
                    "(with the default nprobe it measured, if it had to); no entry changes.")
    i.add_argument("store", metavar="STORE", help="a store directory (made by kvtier.open)")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.add_argument("--dram-budget", default="256MiB", metavar="SIZE",
                   help="DRAM budget to open with; must hold every collection's representatives (default 256MiB)")

    e = sub.add_parser(
        "estimate", help="the DRAM budget collections need, before you run (kvtier.estimate)",
        description="Prints the minimum DRAM budget (below it calls raise BudgetError) and the recommended "
                    "one for COLLECTIONS collections of N entries each, from the engine's own sizes. For an "
                    "LLM's KV cache through TieredCache: one collection per layer x KV head, N the tokens "
                    "(SmolLM2-135M: 30 x 3 = 90 collections, dim 64).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("n_entries", metavar="N", type=int, help="entries per collection")
    e.add_argument("--dim", type=int, required=True, default=argparse.SUPPRESS, help="key dimension (required)")
    e.add_argument("--value-dim", type=int, default=argparse.SUPPRESS,
                   help="value dimension (default: the key dimension; 0 for keys alone)")
    e.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="keys' and values' dtype")
    e.add_argument("--policy", default=DEFAULT_POLICY, choices=POLICIES,
                   help="clustering policy")
    e.add_argument("--collections", type=int, default=1, help="collections of that size")
    e.add_argument("--fetch", type=float, default=0.1, help="share of the entries one retrieve fetches")
    e.add_argument("--dram-budget", default=argparse.SUPPRESS, metavar="SIZE",
                   help="the budget you plan: it sizes the write buffer as kvtier.open does (default: none "
                        "planned, the write buffer sized from the recommended budget)")
    e.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")

    v = sub.add_parser(
        "verify", help="read every record back and check it; name what is damaged",
        description="Opens STORE (its exclusive lock: close other users first) and reads every collection's "
                    "data file from end to end: each record's checksum and that it holds the id the catalog "
                    "puts there, records the catalog names past the end of a truncated file, and each data "
                    "file's header page; also data files no collection names. Prints what is damaged by "
                    "collection and id range and keeps the finding in the catalog, where `kvtier inspect` "
                    "shows it. Nothing else changes. Exit status: 0 intact, 4 damage found, 1 could not "
                    "verify.",
        epilog="Read what is intact: kvtier.open(STORE, on_corrupt='skip').")
    v.add_argument("store", metavar="STORE", help="a store directory (made by kvtier.open)")
    v.add_argument("--json", action="store_true", help="machine-readable output (every damaged id)")
    v.add_argument("--dram-budget", default="256MiB", metavar="SIZE",
                   help="DRAM budget to open with (default 256MiB)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    if words[:1] == ["bench"] and len(words) > 1 and words[1] in BENCHMARKS:
        return _bench_one(words[1], words[2:])
    args = _parser().parse_args(argv)
    args._argv = argv
    if args.command in _NOT_YET:
        print(f"kvtier {args.command}: not available yet: {_NOT_YET[args.command]}.", file=sys.stderr)
        return EXIT_UNAVAILABLE
    try:
        if args.command == "demo":
            from kvtier.demo import main as demo
            return demo(args)
        return {"bench": _bench, "calibrate": _calibrate, "inspect": _inspect, "verify": _verify,
                "estimate": _estimate}[args.command](args)
    except BrokenPipeError:  # `kvtier inspect S | head`: stop quietly, and keep Python's exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # flush from failing again
        return EXIT_ERROR
    except (KvtierError, OSError) as e:
        print(f"kvtier {args.command}: error: {e}", file=sys.stderr)
        return EXIT_ERROR


# -- bench --------------------------------------------------------------------------------------
def _bench_one(name: str, argv: list[str]) -> int:
    """``kvtier bench NAME ...``: the benchmark's own main, with its own options (its usage line
    names the command as typed)."""
    import importlib

    module = importlib.import_module(f"kvtier.bench.{name}")
    prog, sys.argv[0] = sys.argv[0], f"kvtier bench {name}"
    try:
        status = module.main(argv)
    finally:
        sys.argv[0] = prog
    return int(status or 0)



def _bench(args) -> int:
    from kvtier.bench import suite  # loaded when it runs, like every subcommand's machinery

    settings, out = suite.settings_from_args(args)
    argv = sys.argv[1:] if args._argv is None else list(args._argv)
    started = _time.perf_counter()
    report = suite.run_suite(settings, out, command=suite.command_line(argv[1:] if argv[:1] == ["bench"] else argv))
    took = _time.perf_counter() - started
    print(f"\nkvtier bench ({report['mode']}): {took / 60:.1f} min; wrote {out}/bench.json, {out}/bench.md and "
          f"{len(report['plots'])} plots: {', '.join(os.path.join(out, p) for p in report['plots'])}")
    for e in report["stage_errors"]:
        print(f"kvtier bench: error: {e}", file=sys.stderr)
    return EXIT_ERROR if report["stage_errors"] else 0


# -- calibrate ----------------------------------------------------------------------------------

def _size_list(text: str, name: str) -> list[int]:
    try:
        return [parse_size(t.strip(), name) for t in text.split(",") if t.strip()]
    except InvalidArgumentError:
        raise InvalidArgumentError(
            f"{name}: a comma-separated list of sizes like 4KiB,64KiB expected, got {text!r}") from None


def _int_list(text: str, name: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise InvalidArgumentError(f"{name}: a comma-separated list of integers expected, got {text!r}") from None


def _calibrate(args) -> int:
    from kvtier.calibrate import _check_writable_dir, calibrate

    if args.plot:  # fail before a 20-second run, not after it
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise InvalidArgumentError("--plot: needs matplotlib (pip install 'kvtier[bench]')") from None
        _check_writable_dir("--plot", args.plot)
    res = calibrate(
        args.path, quick=args.quick, name=args.name, save=args.save, duration=args.duration, runs=args.runs,
        sizes=_size_list(args.sizes, "--sizes") if args.sizes else None,
        queue_depths=_int_list(args.queue_depths, "--queue-depths"),
        file_size=args.file_size)
    if args.plot:
        res.plot(args.plot)
    if args.json:
        print(json.dumps(res.to_dict(), indent=1))
    else:
        print(res.table())
        if args.save:
            print(f"profile saved to {args.save}")
        if args.plot:
            print(f"plot saved to {args.plot}")
    return 0


# -- estimate -----------------------------------------------------------------------------------

def _estimate(args) -> int:
    # options left out are absent (argparse.SUPPRESS keeps '(default: None)' out of --help)
    e = kvtier.estimate(args.n_entries, dim=args.dim, value_dim=getattr(args, "value_dim", None), dtype=args.dtype,
                        policy=args.policy, collections=args.collections, fetch=args.fetch,
                        dram_budget=getattr(args, "dram_budget", None))
    if getattr(args, "json", False):
        print(json.dumps(e.as_dict(), indent=1))
    else:
        print(e)
    return 0


# -- verify -------------------------------------------------------------------------------------

EXIT_DAMAGED = 4


def _verify(args) -> int:
    from kvtier.verify import verify

    report = verify(args.store, dram_budget=args.dram_budget)
    if args.json:
        print(json.dumps(report.to_dict(), indent=1, default=json_default))
    else:
        print(report.summary())
    return 0 if report.ok else EXIT_DAMAGED


# -- inspect ------------------------------------------------------------------------------------

_SHOWN_COLL_STATS = ("entries", "clusters", "pools", "data_file_bytes", "mean_cluster_size",
                     "max_cluster_size", "mean_variance", "cached_clusters", "name", "policy")
_PARAM_ORDER = ("dim", "value_dim", "dtype", "metric", "policy", "init_cluster_size", "max_cluster_size")


def inspect_store(path: str, dram_budget="256MiB") -> dict:
    """Everything ``kvtier inspect`` shows, as a JSON-ready dict."""
    from kvtier import _engine
    from kvtier.catalog import CATALOG_FORMAT

    # kvtier.open would create a store where there is none; inspect must not.
    if not os.path.isdir(os.path.join(path, "catalog")):
        raise InvalidArgumentError(f"STORE: {path!r} is not a kvtier store (no catalog/ directory in it)")
    out: dict[str, Any] = {"path": os.path.abspath(path), "kvtier": kvtier.__version__,
                           "format": {"catalog": CATALOG_FORMAT, "data": int(_engine.FORMAT_VERSION), "data_files": []},
                           "collections": []}
    from kvtier.verify import last_verified

    with kvtier.open(path, dram_budget=dram_budget, create=False) as store:
        out["last_verify"] = last_verified(store._catalog)
        for name in store.collections():
            try:
                coll = store.collection(name)
            except kvtier.KvtierError as e:  # a damaged header or catalog record: say so, go on
                out["collections"].append({"name": name, "error": str(e)})
                continue
            st = coll.stats()
            sizes = np.asarray(coll.cluster_sizes())
            data_file = f"c{coll.params['no']}.kvd"  # the engine's naming (README "On disk")
            params = {k: coll.params[k] for k in _PARAM_ORDER if k in coll.params}
            params.update({k: v for k, v in sorted(coll.params.items())
                           if k not in params and k not in ("no", "nprobe_auto")})
            # the nprobe search uses when not told: given at creation, else measured (and kept)
            if coll.policy != "none" and params.get("nprobe") is None:
                params["nprobe"] = coll.default_nprobe()
                auto = coll.params.get("nprobe_auto")
                params["nprobe_chosen"] = (
                    f"measured: recall@{auto['k']} {auto['recall']:.2f} on {auto['queries']} sample queries "
                    f"at {auto['entries']:,} entries" if auto else "every cluster (a small collection)")
            dist = ({"min": int(sizes.min()), "p10": float(np.percentile(sizes, 10)),
                     "median": float(np.median(sizes)), "p90": float(np.percentile(sizes, 90)),
                     "max": int(sizes.max()), "mean": float(sizes.mean())} if sizes.size else None)
            out["collections"].append({
                "name": name, "params": params, "entries": int(st["entries"]),
                "clusters": int(st["clusters"]), "cluster_sizes": dist,
                "mean_variance": float(st["mean_variance"]), "pools": int(st["pools"]),
                "data_file": data_file, "data_file_bytes": int(st["data_file_bytes"]),
                "file_size": _file_size(os.path.join(path, data_file)),
                "data_format": _data_format(os.path.join(path, data_file)),
                "cached_clusters": int(st["cached_clusters"]),
                # whatever else the engine reports for this collection (policy counters: splits,
                # tau, deferred and pending entries, ...), as it grows
                "more": {k: v for k, v in st.items() if k not in _SHOWN_COLL_STATS}})
        out["stats"] = store.stats()
    out["format"]["data_files"] = sorted({c["data_format"] for c in out["collections"] if c.get("data_format")})
    data = sum(c.get("data_file_bytes", 0) for c in out["collections"])
    out["disk_bytes"] = {"data_files": data, "catalog": _du(os.path.join(path, "catalog"))}
    return out


def _file_size(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:  # a collection created but never written
        return None


def _data_format(path: str) -> int | None:
    """The format version in a data file's header (README "On disk"), None if unreadable."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except OSError:
        return None
    return int.from_bytes(head[8:12], "little") if len(head) == 12 and head[:8] == b"KVTDATA1" else None


def _du(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):  # gone since the walk listed it
                total += os.stat(os.path.join(root, f)).st_blocks * 512
    return total


def _inspect(args) -> int:
    info = inspect_store(args.store, dram_budget=args.dram_budget)
    if args.json:
        print(json.dumps(info, indent=1, default=json_default))
        return 0
    colls = info["collections"]
    print(f"store {info['path']}")
    found = ", ".join(str(v) for v in info["format"]["data_files"]) or "none yet"
    print(f"  format: catalog {info['format']['catalog']}, data files {found} "
          f"(kvtier {info['kvtier']} reads data formats 1 to {info['format']['data']}, "
          f"writes {info['format']['data']})")
    print(f"  disk: {info['disk_bytes']['data_files']:,} bytes allocated in data files, "
          f"{info['disk_bytes']['catalog']:,} bytes of catalog")
    print(f"  {len(colls)} collection{'s' if len(colls) != 1 else ''}")
    print(f"  damage: {_damage_line(info)}")
    for c in colls:
        if c.get("error"):
            print(f"\ncollection {c['name']!r}\n  DAMAGED: cannot be opened: {c['error']}")
            continue
        p = c["params"]
        print(f"\ncollection {c['name']!r}")
        print(textwrap.fill(" ".join(f"{k}={'default' if v is None else v}" for k, v in p.items()),
                            width=100, initial_indent="  ", subsequent_indent="  "))
        # data_file_bytes is the space the engine has given to pools (written or not);
        # the file itself can be shorter until the last pool fills.
        print(f"  entries {c['entries']:,}  clusters {c['clusters']:,}  pools {c['pools']:,}  "
              f"{c['data_file']} (format {c['data_format'] or '?'}): {c['data_file_bytes']:,} bytes allocated, "
              f"{'missing' if c['file_size'] is None else format(c['file_size'], ',') + ' bytes on disk'}")
        d = c["cluster_sizes"]
        if d:
            print(f"  cluster sizes: min {d['min']}  p10 {d['p10']:g}  median {d['median']:g}  "
                  f"p90 {d['p90']:g}  max {d['max']}  (mean {d['mean']:.1f}); "
                  f"mean variance {c['mean_variance']:.4g}")
        if c["more"]:
            print(textwrap.fill("  ".join(f"{k} {_num(v)}" for k, v in c["more"].items()), width=100,
                                initial_indent="  ", subsequent_indent="  "))
    s = dict(info["stats"])
    print("\nstore stats (this process, since opening):")
    hist = s.pop("read_size_histogram", None)
    width = max(map(len, s))
    for k, v in s.items():
        print(f"  {k:<{width}}  {_num(v)}")
    if hist and any(hist):
        # bucket i holds reads of [2^(i+9), 2^(i+10)) bytes, bucket 0 everything under 1 KiB
        print("  reads by size: " + ", ".join(
            f"{'<1KiB' if i == 0 else '>=' + _pow2(i + 9)}: {n:,}" for i, n in enumerate(hist) if n))
    return 0


def _damage_line(info: dict) -> str:
    """What is known about damage: the last `kvtier verify`, and what opening found now."""
    import datetime

    now = [c["name"] for c in info["collections"] if c.get("error")]
    now += [c["name"] for c in info["collections"]
            if not c.get("error") and (c["more"].get("header_damaged") or c["more"].get("damaged_reads"))]
    last = info.get("last_verify")
    if last is None:
        said = "never verified (kvtier verify STORE reads and checks every record)"
    elif last.get("unreadable"):
        said = "the last verify's record is unreadable"
    else:
        when = datetime.datetime.fromtimestamp(last["when"]).isoformat(sep=" ", timespec="seconds")
        if last["ok"]:
            said = f"verified intact on {when}"
        else:
            parts = []
            for name, d in last["collections"].items():
                if isinstance(d, str):
                    parts.append(f"{name!r} unreadable")
                    continue
                bits = [f"ids {d['ids']}"] if d["damaged"] else []
                bits += ["header page"] * d["header_damaged"] + ["truncated"] * d["truncated"]
                parts.append(f"{name!r}: {', '.join(bits)}")
            parts += [f"orphan {f}" for f in last.get("orphans", [])]
            said = f"DAMAGED when verified on {when}: {'; '.join(parts)}"
    if now:
        said += f"; DAMAGED now (found on opening): {', '.join(repr(n) for n in now)}"
    return said


def _num(v) -> str:
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return f"{v:,}"
    if isinstance(v, (float, np.floating)):
        return f"{v:.4g}"
    return str(v)


def _pow2(e: int) -> str:
    return f"{1 << (e - 20)}MiB" if e >= 20 else f"{1 << (e - 10)}KiB" if e >= 10 else f"{1 << e}B"


if __name__ == "__main__":
    sys.exit(main())
