"""Regenerates ``bench/REPORT.md`` (tables + PNG plots) from the results under ``bench/results/``.

    python -m bench.report [--results bench/results] [--report bench/REPORT.md]

Nothing is rerun: each benchmark's JSON (and the Markdown table it wrote beside it) is read,
its plots are redrawn into ``<results>/plots/``, and each section names the command that
reproduces it. A benchmark whose results are absent gets a one-line note with that command
instead of a section. Sections, in order: the ``kvtier bench`` suite (``bench.json``), policies,
flash layout, real-disk reads vs calibrate, cache policies, group virtualization, pipelining,
W4 search, model quality through torch, llama.cpp, the micro-benchmark baseline
(``bench/baseline``), the long-context tasks (``kvtier bench tasks``, Gemma 3 and SmolLM2) and
Gemma 3's decode speed at long context.

Commands are shown with this repository's relative paths: an output path recorded by a run is
rewritten to the results directory, so the report never carries one machine's directories.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

from kvtier.bench.tables import md_table

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent


class Section:
    """One benchmark's part of the report: a title, the command, Markdown body, plot files."""

    def __init__(self, title: str, command: str, body: str = "", plots: Optional[list] = None,
                 missing: bool = False):
        self.title, self.command, self.body = title, command, body
        self.plots = plots or []
        self.missing = missing


# -- helpers ------------------------------------------------------------------------------------

def _load(path: Path) -> Optional[Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def _md_parts(path: Path) -> tuple[Optional[str], str]:
    """(recorded command, the rest) of a results .md: its '# ' title dropped, its first
    backticked line taken as the command."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None, ""
    cmd, keep = None, []
    for line in text.splitlines():
        s = line.strip()
        if cmd is None and re.fullmatch(r"`[^`]+`", s):
            cmd = s.strip("`")
            continue
        if s.startswith("# ") and not keep:
            continue
        keep.append(line)
    return cmd, "\n".join(keep).strip()


# The benchmarks that were scripts of bench/ before they joined the installed package: results
# recorded then name them by their old module (bench/README.md), the report by the new one.
MOVED = {f"bench.{m}": f"kvtier.bench.{m}" for m in (
    "adaptive16", "cache", "capture", "decode", "flash", "flash_real", "memory", "needle", "pipeline", "policies",
    "suite", "torch_quality", "virtualize", "w4_search", "write_buffer")} | {"bench.llama_cpp_bench": "kvtier.bench.llama_cpp"}


def portable(cmd: str, results_rel: str) -> str:
    """``cmd`` with output paths pointing into the results directory and any other absolute
    path reduced to its file name, so no machine's directories end up in the report, and a
    benchmark's old module (``python -m bench.cache``) spelled as it runs now (MOVED)."""
    try:
        parts = shlex.split(cmd)
    except ValueError:
        return cmd
    out = []
    prev = None
    for part in parts:
        if "=" in part and part.startswith("--"):
            key, _, val = part.partition("=")
            out.append(f"{key}={_path_arg(key, val, results_rel)}")
        elif prev == "-m":
            out.append(MOVED.get(part, part))
        elif prev is not None and prev.startswith("--"):
            out.append(_path_arg(prev, part, results_rel))
        else:
            out.append(part)
        prev = part
    return " ".join(shlex.quote(p) for p in out)


def _path_arg(key: str, val: str, results_rel: str) -> str:
    if key == "--out":
        if val == "OUT" or os.path.isabs(val) or val.startswith("bench/results"):
            base = os.path.basename(val.rstrip("/"))
            return f"{results_rel}/{base}" if "." in base else results_rel
        return val
    if os.path.isabs(val):
        return os.path.basename(val.rstrip("/")) or val
    return val


def _args_command(module: str, args: dict, skip=("out",), extra: str = "") -> str:
    """``python -m module --key value ...`` from an argparse namespace saved as a dict."""
    parts = [f"python -m {module}"]
    for k, v in args.items():
        if k in skip or v is None or v is False:
            continue
        flag = "--" + k.replace("_", "-")
        if v is True:
            parts.append(flag)
        elif isinstance(v, (list, tuple)):
            parts.append(f"{flag} {','.join(map(str, v))}")
        else:
            parts.append(f"{flag} {shlex.quote(str(v))}")
    return " ".join(parts) + (f" {extra}" if extra else "")


def _rel(path, start: Path) -> str:
    return os.path.relpath(path, start).replace(os.sep, "/")


def _try_plot(fn: Callable[[], str], notes: list) -> list:
    try:
        return [fn()]
    except Exception as e:  # noqa: BLE001 - a plot that cannot be drawn is noted, the tables stay
        notes.append(f"_plot not drawn: {type(e).__name__}: {e}_")
        return []


def _when(path: Path) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(path.stat().st_mtime))


# -- sections -----------------------------------------------------------------------------------

def suite_section(results: Path, plots_dir: Path, report_dir: Path, rr: str) -> Section:
    cmd = "kvtier bench --out " + rr
    data = _load(results / "bench.json")
    if data is None:
        return Section("Tier configurations (`kvtier bench`)", cmd, missing=True)
    from kvtier.bench import suite

    notes: list = []
    made = _try_plot(lambda: suite.make_plots(data, plots_dir), notes)
    body = suite.markdown(data, plot_prefix=_rel(plots_dir, report_dir) + "/", plots_made=made[0] if made else [])
    # demote the suite's headings one level below the report's section
    lines = body.splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    body = "\n".join(("#" + ln if ln.startswith("#") else ln) for ln in lines).strip()
    rec = data.get("command")
    return Section("Tier configurations (`kvtier bench`)", portable(rec, rr) if rec else cmd,
                   "\n\n".join([body] + notes), [])  # the suite's body embeds its own plots


def _results_section(title: str, stem: str, module: str, plot=None, fallback_table=None, args_key="meta"):
    """A section from a benchmark's ``<stem>.md`` table (and ``<stem>.json`` rows): the
    recorded command, the table, and ``plot(rows, plots_dir, args)`` when given (it returns
    the PNG path). ``fallback_table`` renders the rows when the .md is missing; ``args_key``
    says where the JSON keeps the run's arguments ("meta" -> meta.args, else top-level args)."""
    def section(results: Path, plots_dir: Path, report_dir: Path, rr: str) -> Section:
        cmd = f"python -m {module} --out {rr}"
        data = _load(results / f"{stem}.json")
        rec, table = _md_parts(results / f"{stem}.md")
        if (data is None or plot is None and fallback_table is None) and not table:
            return Section(title, cmd, missing=True)
        notes: list = []
        made = []
        if data and data.get("rows"):
            args = ((data.get("meta") or {}).get("args", {}) if args_key == "meta" else data.get("args", {}))
            if plot is not None:
                made = _try_plot(lambda: plot(data["rows"], plots_dir, args), notes)
            if not table and fallback_table is not None:
                table = plots_table(data["rows"], fallback_table)
        return Section(title, portable(rec, rr) if rec else cmd, "\n\n".join([table] + notes), made)
    return section


def _plot_policies(rows, plots_dir, args):
    from kvtier.bench import plots
    return plots.recall_vs_budget(
        rows, plots_dir / "policies_recall_vs_budget.png",
        f"python -m kvtier.bench.policies: layers {args.get('layers', '?')}, every {args.get('every', '?')} steps, "
        f"prefill {args.get('prefill', '?')} + decode {args.get('decode', '?')}, DRAM {args.get('dram_budget', '?')}")


def _plot_flash(rows, plots_dir, args):
    from kvtier.bench import plots
    return plots.io_by_policy_layout(
        rows, plots_dir / "flash_io_by_policy_layout.png",
        f"python -m kvtier.bench.flash: device {args.get('device', '?')}, DRAM {args.get('dram_budget', '?')}, "
        f"fetch budget {args.get('budget', '?')}, layers {args.get('layers', '?')}")


def _plot_cache(rows, plots_dir, args):
    from kvtier.bench import plots
    return plots.hit_rate_vs_dram(
        rows, plots_dir / "cache_hit_rate_vs_dram.png",
        f"python -m kvtier.bench.cache: policy adaptive, fetch budget 10%, layers {args.get('layers', '?')}, "
        f"every {args.get('every', '?')} steps")


policies_section = _results_section(
    "Clustering policies: attention recall on real traces", "policies", "kvtier.bench.policies", _plot_policies,
    fallback_table=("workload", "budget", "policy", "recall", "oracle_recall", "clusters", "mean_cluster_size",
                    "read_ops_per_retrieve"))
flash_section = _results_section("Flash layout: what the device sees", "flash", "kvtier.bench.flash", _plot_flash)
flash_gap0_section = _results_section("Flash layout: contiguous runs (merge gap 0)", "flash_gap0", "kvtier.bench.flash")
flash_8k_section = _results_section("Flash layout at an 8K context (W2, 4096 + 4096 tokens)", "flash_8k", "kvtier.bench.flash")
flash_real_section = _results_section("Retrieval reads on this disk vs calibrate (O_DIRECT)", "flash_real",
                                      "kvtier.bench.flash_real")
write_buffer_section = _results_section("Page-aligned write buffers: partial-page writes vs buffer size",
                                        "write_buffer", "kvtier.bench.write_buffer")
cache_section = _results_section("Cache policies: hit rate and flash reads vs DRAM budget", "cache", "kvtier.bench.cache",
                                 _plot_cache, args_key="args")
virtualize_section = _results_section("Group virtualization: DRAM against I/O, 30 layers", "virtualize_W1",
                                      "kvtier.bench.virtualize")


def pipeline_section(results: Path, plots_dir: Path, report_dir: Path, rr: str) -> Section:
    title = "Pipelining: prefetch against per-layer compute"
    data = _load(results / "pipeline.json")
    if data is None:
        return Section(title, f"python -m kvtier.bench.pipeline --out {rr}", missing=True)
    rows = data.get("rows", {})
    lines = [md_table(["mode", "step ms (median)", "runs ms", "modeled I/O ms/step", "waited for I/O ms/step",
                       "prefetch hits / issued"],
                      [[mode, f"{r['step_ms']:.2f}", ", ".join(f"{x:.2f}" for x in r.get("step_ms_all", [])),
                        f"{r.get('modeled_io_ms_per_step', 0):.2f}", f"{r.get('io_wait_ms_per_step', 0):.2f}",
                        f"{r.get('prefetch_hits', 0)} / {r.get('prefetch_issued', 0)}"] for mode, r in rows.items()],
                      "lrlrrr")]
    if "ratio" in data:
        lines += ["", f"pipelined / max(compute, I/O) = {data['ratio']:.2f} (target <= 1.15); "
                      f"{data.get('matmuls_per_layer', '?')} matmuls per layer of synthetic compute"]
    notes: list = []
    from kvtier.bench import plots
    args = data.get("args", {})
    made = _try_plot(lambda: plots.pipeline_steps(
        rows, plots_dir / "pipeline_step_time.png",
        f"python -m kvtier.bench.pipeline: {args.get('compute_ms', '?')} ms compute per layer, {args.get('steps', '?')} steps, "
        f"DRAM {args.get('dram_budget', '?')}, UFS 4.0 throttled"), notes)
    return Section(title, _args_command("kvtier.bench.pipeline", args, extra=f"--out {rr}"),
                   "\n".join(lines) + ("\n\n" + "\n\n".join(notes) if notes else ""), made)


def w4_section(results: Path, plots_dir: Path, report_dir: Path, rr: str) -> Section:
    title = "W4 search: kvtier against hnswlib and faiss"
    data = _load(results / "w4_search.json")
    _, table = _md_parts(results / "w4_search.md")
    if data is None:
        return Section(title, f"python -m kvtier.bench.w4_search --out {rr}", missing=True)
    from kvtier.bench import plots, w4_search
    params = data.get("parameters", {})
    defaults = vars(w4_search.parse_args([]))
    changed = {k: v for k, v in params.items() if k in defaults and k not in ("out", "cache_dir", "workdir")
               and v != defaults[k]}
    notes: list = []
    made = _try_plot(lambda: plots.search_recall_vs_qps(
        data.get("results", []), plots_dir / "w4_search_recall_vs_qps.png",
        f"{params.get('n_keys')} SmolLM2 keys, {params.get('n_queries')} queries, top-10 inner product, "
        f"{params.get('threads', 1)} search thread(s)"), notes)
    if not table:
        table = w4_search.markdown_table(data.get("results", []), params.get("data_bytes", 0))
    return Section(title, _args_command("kvtier.bench.w4_search", changed, extra=f"--out {rr}"),
                   "\n\n".join([table] + notes), made)


def torch_section(results: Path, plots_dir: Path, report_dir: Path, rr: str) -> Section:
    title = "Model quality: kvtier as the KV cache of SmolLM2 (torch)"
    data = _load(results / "torch_quality.json")
    if data is None:
        return Section(title, f"python -m kvtier.bench.torch_quality --out {rr}/torch_quality.json", missing=True)
    from kvtier.bench import torch_quality
    try:
        table = torch_quality.markdown(data["rows"])
    except (KeyError, TypeError) as e:
        table = f"_table not rendered ({type(e).__name__}: {e}); raw rows in torch_quality.json_"
    lines = [table, ""] + [f"- {t}" for t in data.get("targets", [])]
    if data.get("prefetch"):
        lines.append(f"- prefetch: {data['prefetch']}")
    return Section(title, _args_command("kvtier.bench.torch_quality", data.get("params", {}),
                                        extra=f"--out {rr}/torch_quality.json"), "\n".join(lines))


def llama_section(results: Path, plots_dir: Path, report_dir: Path, rr: str) -> Section:
    title = "llama.cpp with a bounded KV cache (TieredLlama)"
    stems = ("llama_cpp_quality_2k", "llama_cpp_quality_8k", "llama_cpp_quality_heldout_2k", "llama_cpp_speed",
             "llama_cpp_speed_ufs40", "llama_cpp_switch")
    found = [(stem,) + _md_parts(results / f"{stem}.md") for stem in stems if (results / f"{stem}.md").exists()]
    if not found:
        return Section(title, f"python -m kvtier.bench.llama_cpp quality --out {rr}/llama_cpp_quality.json",
                       missing=True)
    cmds = [portable(cmd, rr) for _, cmd, _ in found if cmd]
    body = "\n\n".join(f"**{stem.split('_', 2)[-1]}**" + (f" (`{portable(cmd, rr)}`)" if cmd else "") + f"\n\n{text}"
                        for stem, cmd, text in found)
    return Section(title, cmds[0] if cmds else "python -m kvtier.bench.llama_cpp quality", body)


def micro_section(results: Path, plots_dir: Path, report_dir: Path, rr: str) -> Section:
    title = "Micro-benchmarks of the engine's hot paths (stored baseline)"
    cmd = ("pytest bench/test_micro.py --benchmark-storage=bench/baseline --benchmark-compare=0001 "
           "--benchmark-compare-fail=median:30%")
    files = sorted(glob.glob(str(BENCH_DIR / "baseline" / "*" / "*.json")))
    if not files:
        return Section(title, "pytest bench/test_micro.py --benchmark-storage=bench/baseline --benchmark-save=baseline",
                       missing=True)
    data = _load(Path(files[-1]))
    mi = data.get("machine_info", {})
    lines = [f"Baseline `{Path(files[-1]).name}` ({data.get('datetime', '')[:16]}, commit "
             f"{(data.get('commit_info') or {}).get('id', '?')[:7]}, {mi.get('cpu', {}).get('brand_raw', mi.get('processor', '?'))}, "
             f"Python {mi.get('python_version', '?')}).", "",
             md_table(["benchmark", "median µs", "IQR µs", "rounds"],
                      [[b["name"], f"{b['stats']['median'] * 1e6:.1f}", f"{b['stats']['iqr'] * 1e6:.1f}",
                        b["stats"]["rounds"]] for b in data.get("benchmarks", [])], "lrrr")]
    return Section(title, cmd, "\n".join(lines))


def _tasks_section(title: str, stem: str):
    """The long-context task suite (kvtier bench tasks): its Markdown tables and its score plot."""
    def section(results: Path, plots_dir: Path, report_dir: Path, rr: str) -> Section:
        rec, table = _md_parts(results / f"{stem}.md")
        if not table:
            return Section(title, f"kvtier bench tasks --out {rr}", missing=True)
        data, notes = _load(results / f"{stem}.json"), []
        made = []
        if data and data.get("summary"):
            from kvtier.bench import tasks
            made = [p for p in _try_plot(lambda: tasks.plot(data["summary"], [], str(plots_dir / f"{stem}.png"),
                                                             f"{title}: score vs context length"), notes) if p]
        return Section(title, portable(rec, rr) if rec else f"kvtier bench tasks --out {rr}",
                       "\n\n".join([table] + notes), made)
    return section


tasks_gemma3_section = _tasks_section("Long-context tasks through each cache: Gemma 3 270M", "tasks_gemma3")
tasks_gemma3_8k_section = _tasks_section("Long-context tasks at 8K, 20 questions per task: Gemma 3 270M",
                                         "tasks_gemma3_8k_s6")
tasks_smollm2_section = _tasks_section("Long-context tasks through each cache: SmolLM2-135M", "tasks_smollm2")
decode_gemma3_section = _results_section("Decode speed at long context: Gemma 3 270M", "decode_gemma3",
                                         "kvtier.bench.decode")

SECTIONS = (suite_section, policies_section, flash_section, flash_gap0_section, flash_8k_section, flash_real_section,
            write_buffer_section, cache_section, virtualize_section, pipeline_section, w4_section, torch_section, llama_section, micro_section,
            tasks_gemma3_section, tasks_gemma3_8k_section, tasks_smollm2_section, decode_gemma3_section)


def plots_table(rows: list, keys: tuple) -> str:
    """A plain Markdown table of the given keys (numbers to 3 decimals)."""
    return md_table(keys, [[f"{r.get(k):.3f}" if isinstance(r.get(k), float) else str(r.get(k, "–")) for k in keys]
                           for r in rows], "l" * len(keys))


# -- the report -------------------------------------------------------------------------------

def build(results, report_path) -> str:
    """Writes the report (and the plots under ``<results>/plots``); returns its text."""
    results = Path(results).resolve()
    report_path = Path(report_path).resolve()
    if not results.is_dir():
        raise SystemExit(f"--results: {results.name!r} is not a directory")
    report_dir = report_path.parent
    plots_dir = results / "plots"
    rr = _results_arg(results)
    sections = [fn(results, plots_dir, report_dir, rr) for fn in SECTIONS]
    present = [s for s in sections if not s.missing]
    missing = [s for s in sections if s.missing]
    files = sorted(p.name for p in results.iterdir() if p.suffix in (".json", ".md"))
    L = ["# kvtier benchmark report", "",
         f"Generated by `python -m bench.report --results {rr}` from {', '.join(f'`{f}`' for f in files) or 'no files'}"
         f" ({time.strftime('%Y-%m-%d %H:%M')}). Do not edit: rerun the commands below, then regenerate.", "",
         "Absolute times come from a shared 2-core machine and are noisy; recall, bytes, read counts and "
         "modeled device times are deterministic, and ratios measured side by side in one run are what to "
         "compare (docs/design.md §8, Reporting).", ""]
    if present:
        L += ["Contents:"] + [f"- [{s.title}](#{_anchor(s.title)})" for s in present] + [""]
    for s in present:
        L += [f"## {s.title}", "", "Reproduce:", "", "```", s.command, "```", ""]
        if s.body:
            L += [s.body, ""]
        for p in s.plots:
            L += [f"![{Path(p).stem}]({_rel(p, report_dir)})", ""]
    if missing:
        L += ["## Not in these results", ""]
        L += [f"- {s.title}: no results file; `{s.command}` produces it." for s in missing]
        L.append("")
    text = "\n".join(L).rstrip() + "\n"
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(text)
    return text


def _results_arg(results: Path) -> str:
    """The results directory as a command argument: relative to the repository root when
    inside it, else just its name (no machine path in the report)."""
    try:
        return _rel(results, REPO) if REPO in results.parents or results == REPO else results.name
    except ValueError:
        return results.name


def _anchor(title: str) -> str:
    a = re.sub(r"[^\w\- ]", "", title.lower()).strip().replace(" ", "-")
    return a


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=str(BENCH_DIR / "results"), help="results directory (default bench/results)")
    ap.add_argument("--report", default=None, help="output Markdown file (default: REPORT.md beside the results "
                                                   "directory's parent, i.e. bench/REPORT.md)")
    a = ap.parse_args(argv)
    report = a.report or str(Path(a.results).resolve().parent / "REPORT.md")
    text = build(a.results, report)
    pngs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    missing = text.split("\n## Not in these results", 1)[1].count("\n- ") if "## Not in these results" in text else 0
    sections = text.count("\n## ") - (1 if missing else 0)
    print(f"wrote {report}: {sections} sections, {len(pngs)} plots; {missing} benchmark(s) without results")
    return 0


if __name__ == "__main__":
    sys.exit(main())
