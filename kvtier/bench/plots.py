"""PNG plots of benchmark results, drawn from the rows the benchmarks write as JSON.

Every function takes plain dicts (a results file's rows, as ``json.load`` returns them), so
``kvtier bench`` draws them as it finishes and ``python -m bench.report`` redraws them later
from ``bench/results/`` without rerunning anything. Every plot has a title, axes labelled with
units and a legend; a panel with nothing to show says so in the panel rather than vanishing.

matplotlib's object API (``Figure``) is used rather than ``pyplot``: no global figure state and
no display backend, so plots can be drawn from any thread or a headless machine.
"""
from __future__ import annotations

import os
import textwrap
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

# One colour and marker per policy / cache policy across every plot, so a reader can compare
# figures at a glance.
POLICY_STYLE = {"none": ("tab:gray", "s"), "static": ("tab:blue", "o"),
                "local": ("tab:orange", "^"), "adaptive": ("tab:green", "D")}
CACHE_STYLE = {"lru": ("tab:red", "o"), "lfu": ("tab:purple", "s"), "cluster": ("tab:green", "D")}
LAYOUT_HATCH = {"token": "xx", "clustered": "", "colocated": "//", "n/a": ".."}
_FALLBACK = [("tab:brown", "v"), ("tab:pink", "P"), ("tab:olive", "X"), ("tab:cyan", "*")]


def _figure(nrows: int, ncols: int, width: float = 5.2, height: float = 3.6):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise RuntimeError("plots need matplotlib (pip install 'kvtier[bench]')") from None
    fig = Figure(figsize=(width * ncols, height * nrows + 0.6), dpi=110)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _style(table: Mapping[str, tuple], key: str, seen: dict) -> tuple:
    if key in table:
        return table[key]
    if key not in seen:
        seen[key] = _FALLBACK[len(seen) % len(_FALLBACK)]
    return seen[key]


def _save(fig, path, title: str) -> str:
    # wrap each line of the title to the figure's width (~11 characters per inch at 11 pt)
    width = max(40, int(fig.get_figwidth() * 11))
    fig.suptitle("\n".join(textwrap.fill(line, width) for line in title.split("\n")), fontsize=11)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(os.fspath(path))
    return os.fspath(path)


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9,
            color="grey", wrap=True)


def _ordered(values: Iterable[str], order: Sequence[str]) -> list[str]:
    vals = list(dict.fromkeys(values))
    return sorted(vals, key=lambda v: (order.index(v) if v in order else len(order), v))


def _log_y(ax) -> None:
    """Log y axis labelled with plain numbers (50, 200, 1000), not 2x10^2."""
    from matplotlib.ticker import FuncFormatter

    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if str(f"{v:g}")[0] in "25" else ""))


def _ok(rows: Iterable[dict]) -> list[dict]:
    """Rows that measured something (error rows, e.g. a DRAM budget too small, are skipped)."""
    return [r for r in rows if not r.get("error")]


def _median(v) -> float:
    """A figure that is either a number or {median, min, max, runs}."""
    return float(v["median"]) if isinstance(v, Mapping) else float(v)


def _spread(v) -> tuple[float, float]:
    if isinstance(v, Mapping):
        return float(v["min"]), float(v["max"])
    return float(v), float(v)


# -- recall vs fetch budget ---------------------------------------------------------------------

def _workload_panels(rows: Sequence[dict], min_width: float, total_width: float, empty: str):
    """A figure with one panel per workload: (fig, [(ax, workload, its rows)]); a panel
    without rows says `empty`."""
    workloads = sorted({r["workload"] for r in rows}) or ["(none)"]
    fig, axes = _figure(1, len(workloads), width=max(min_width, total_width / len(workloads)))
    panels = []
    for ax, w in zip(axes[0], workloads, strict=True):
        wr = [r for r in rows if r["workload"] == w]
        if not wr:
            _empty(ax, empty)
        panels.append((ax, w, wr))
    return fig, panels


def recall_vs_budget(rows: Sequence[dict], path, subtitle: str = "") -> str:
    """Attention recall against the fetch budget, one line per policy, one panel per workload.

    Rows: ``workload``, ``policy``, ``budget`` (fraction of the context), ``recall``,
    ``oracle_recall`` (token-level exact top-budget: the bound no selection can beat)."""
    fig, panels = _workload_panels(_ok(rows), 5.2, 8.0, "no successful replay")
    seen: dict = {}
    for ax, w, wr in panels:
        for pol in _ordered((r["policy"] for r in wr), list(POLICY_STYLE)):
            pr = sorted((r for r in wr if r["policy"] == pol), key=lambda r: r["budget"])
            colour, marker = _style(POLICY_STYLE, pol, seen)
            ax.plot([100 * r["budget"] for r in pr], [r["recall"] for r in pr], color=colour,
                    marker=marker, label=pol)
        oracle: dict = {}
        for r in wr:  # the oracle depends on the trace and the budget only
            oracle.setdefault(r["budget"], r["oracle_recall"])
        if oracle:
            b = sorted(oracle)
            ax.plot([100 * x for x in b], [oracle[x] for x in b], "k--", lw=1,
                    label="token-level oracle (exact top-k)")
        ax.set_title(f"{w}", fontsize=10)
        ax.set_xlabel("fetch budget (% of the context's entries per step)")
        ax.set_ylabel("attention recall (share of stored attention mass fetched)", fontsize=8)
        ax.set_ylim(0, 1.02)
        ax.grid(True, alpha=0.3)
        if wr:
            ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path, "Attention recall vs fetch budget, per policy" + (f"\n{subtitle}" if subtitle else ""))


# -- I/O time per step vs context length ---------------------------------------------------------

def io_vs_context(rows: Sequence[dict], path, subtitle: str = "", device: str = "") -> str:
    """Modeled device time and real wall time of the retrievals of one decoding step (per layer),
    against the context length, one line per policy; rows of panels per workload.

    Rows: ``workload``, ``policy``, ``context_tokens``, ``modeled_us_per_step_layer``,
    ``real_us_per_step_layer`` (a number or {median, min, max}: the band is min to max)."""
    rows = _ok(rows)
    workloads = sorted({r["workload"] for r in rows}) or ["(none)"]
    fig, axes = _figure(len(workloads), 2, width=5.4, height=3.6)
    seen: dict = {}
    for (ax_m, ax_r), w in zip(axes, workloads, strict=True):
        wr = [r for r in rows if r["workload"] == w]
        mixed = len({r.get("dram") for r in wr}) > 1  # e.g. none at the least budget it fits in
        for ax, key, ls in ((ax_m, "modeled_us_per_step_layer", "-"), (ax_r, "real_us_per_step_layer", "--")):
            hidden = 0
            for pol in _ordered((r["policy"] for r in wr), list(POLICY_STYLE)):
                pr = sorted((r for r in wr if r["policy"] == pol), key=lambda r: r["context_tokens"])
                # log scale: a span with no reads at all (every cluster cached) or a real time that
                # run-to-run noise made negative cannot be drawn; the note counts them
                shown = [r for r in pr if _median(r[key]) > 0]
                hidden += len(pr) - len(shown)
                colour, marker = _style(POLICY_STYLE, pol, seen)
                label = pol + (f" (DRAM {pr[0]['dram']})" if mixed and pr else "")
                x = [r["context_tokens"] for r in shown]
                ax.plot(x, [_median(r[key]) for r in shown], color=colour, marker=marker, ls=ls, label=label)
                spreads = [_spread(r[key]) for r in shown]
                lo, hi = [max(s[0], 1e-3) for s in spreads], [s[1] for s in spreads]
                if any(a != b for a, b in zip(lo, hi, strict=True)):
                    ax.fill_between(x, lo, hi, color=colour, alpha=0.15)
            ax.set_xlabel("context length (tokens; middle of the measured span)" + (
                f"\n{hidden} span(s) not drawn: " + ("no reads (all cached)" if key.startswith("modeled")
                                                      else "no reads, or noise larger than the span's time")
                if hidden else ""), fontsize=9)
        for ax, what in ((ax_m, f"modeled device time{f' ({device})' if device else ''}"),
                         (ax_r, "real wall time of retrieve() (scoring + reads, this machine)")):
            ax.set_title(f"{w}: {what}", fontsize=9)
            ax.set_ylabel("time per decoding step and layer (µs)")
            ax.grid(True, which="both", alpha=0.3)
            if wr:
                _log_y(ax)
                ax.legend(fontsize=7, title="policy", title_fontsize=8, loc="best")
            else:
                _empty(ax, "no successful replay")
    return _save(fig, path, "Retrieval I/O time per decoding step vs context length"
                 + (f"\n{subtitle}" if subtitle else ""))


# -- bandwidth vs request size --------------------------------------------------------------------

def bandwidth_vs_request_size(calibration: dict | None, profiles: Mapping[str, dict], path,
                              achieved: Sequence[dict] = (), subtitle: str = "") -> str:
    """Read bandwidth against request size: the curve measured by ``kvtier.calibrate`` (its
    ``to_dict()``; medians with a min-max band per queue depth), each device profile's model
    min(bandwidth, IOPS x size), and where the replays' reads landed (mean request size,
    modeled effective bandwidth) per policy.

    ``achieved`` rows: ``policy``, ``device``, ``mean_read_bytes``, ``effective_bw_Bps``."""
    fig, axes = _figure(1, 1, width=8.4, height=5.0)
    ax = axes[0][0]
    sizes = [4096 << i for i in range(11)]
    cal = (calibration or {}).get("calibration")
    if cal and cal.get("points"):
        sizes = sorted({p["size"] for p in cal["points"]} | set(sizes))
        for qd in sorted({p["queue_depth"] for p in cal["points"]}):
            pts = sorted((p for p in cal["points"] if p["queue_depth"] == qd), key=lambda p: p["size"])
            x = np.array([p["size"] for p in pts]) / 1024
            line, = ax.plot(x, [p["bandwidth_Bps"] / 1e6 for p in pts], marker="o", lw=2,
                            label=f"measured here, queue depth {qd} "
                                  f"({'O_DIRECT' if cal.get('direct') else 'buffered: page cache'}, "
                                  f"{cal.get('filesystem', '?')})")
            ax.fill_between(x, [min(p["runs_Bps"]) / 1e6 for p in pts], [max(p["runs_Bps"]) / 1e6 for p in pts],
                            color=line.get_color(), alpha=0.15)
    grid = np.geomspace(min(sizes), max(sizes), 200)
    styles = iter(["--", "-.", ":", (0, (5, 1, 1, 1)), (0, (1, 1))])
    for name, pr in profiles.items():
        model = np.minimum(pr["bandwidth_Bps"], pr["iops"] * grid)
        ax.plot(grid / 1024, model / 1e6, color="black", ls=next(styles, "--"), lw=1,
                label=f"profile {name}: min({pr['bandwidth_Bps'] / 1e9:.1f} GB/s, "
                      f"{pr['iops'] / 1e3:.0f}K IOPS x size)")
    seen: dict = {}
    for r in _ok(achieved):
        if not r.get("mean_read_bytes") or not r.get("effective_bw_Bps"):
            continue
        colour, marker = _style(POLICY_STYLE, r["policy"], seen)
        ax.scatter([r["mean_read_bytes"] / 1024], [r["effective_bw_Bps"] / 1e6], s=70, color=colour,
                   marker=marker, edgecolors="black", zorder=5,
                   label=f"replay reads, {r['policy']} ({r.get('layout', '')}, modeled on {r['device']})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ticks = [s for s in sizes if s >= 4096]
    ax.set_xticks([s / 1024 for s in ticks], [_size_label(s) for s in ticks], fontsize=8)
    ax.minorticks_off()
    ax.set_xlabel("request size (one read)")
    ax.set_ylabel("read bandwidth (MB/s, 10^6 B/s)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    if not cal:
        ax.text(0.02, 0.97, "no calibration in these results: profile models only", transform=ax.transAxes,
                fontsize=8, va="top", color="grey")
    return _save(fig, path, "Read bandwidth vs request size: measured, modeled, and where the replays read"
                 + (f"\n{subtitle}" if subtitle else ""))


def _size_label(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


# -- cache hit rate vs DRAM budget ----------------------------------------------------------------

def hit_rate_vs_dram(rows: Sequence[dict], path, subtitle: str = "") -> str:
    """Cache hit rate and bytes read from flash per retrieve against the DRAM budget, one line
    per cache policy; a row of panels per workload.

    Rows: ``workload``, ``cache_policy``, ``dram_fraction`` (of the replayed KV bytes),
    ``hit_rate``, ``read_bytes_per_retrieve``."""
    rows = _ok(rows)
    workloads = sorted({r["workload"] for r in rows}) or ["(none)"]
    fig, axes = _figure(len(workloads), 2, width=5.2, height=3.4)
    seen: dict = {}
    for (ax_h, ax_b), w in zip(axes, workloads, strict=True):
        wr = [r for r in rows if r["workload"] == w]
        for pol in _ordered((r["cache_policy"] for r in wr), list(CACHE_STYLE)):
            pr = sorted((r for r in wr if r["cache_policy"] == pol), key=lambda r: r["dram_fraction"])
            colour, marker = _style(CACHE_STYLE, pol, seen)
            x = [100 * r["dram_fraction"] for r in pr]
            ax_h.plot(x, [r["hit_rate"] for r in pr], color=colour, marker=marker, label=pol)
            ax_b.plot(x, [r["read_bytes_per_retrieve"] / 1024 for r in pr], color=colour, marker=marker, label=pol)
        ax_h.set_ylabel("cache hit rate (hits / cluster lookups)")
        ax_h.set_ylim(0, 1.02)
        ax_b.set_ylabel("read from flash per retrieve (KiB)")
        for ax, what in ((ax_h, "hit rate"), (ax_b, "bytes read")):
            ax.set_title(f"{w}: {what}", fontsize=9)
            ax.set_xlabel("DRAM budget (% of the replayed KV bytes)")
            ax.grid(True, alpha=0.3)
            if wr:
                ax.legend(fontsize=8, title="cache policy", title_fontsize=8)
            else:
                _empty(ax, "no successful replay")
    return _save(fig, path, "Cache hit rate and flash reads vs DRAM budget, per cache policy"
                 + (f"\n{subtitle}" if subtitle else ""))


# -- W4 search ----------------------------------------------------------------------------------

def search_recall_vs_qps(results: Sequence[dict], path, subtitle: str = "") -> str:
    """recall@10 against queries/s for each method of ``kvtier.bench.w4_search`` (its ``results``)."""
    fig, axes = _figure(1, 1, width=8.0, height=5.0)
    ax = axes[0][0]
    styles = {"exact": ("black", "*"), "hnswlib": ("tab:blue", "o"), "faiss-ivf": ("tab:orange", "s")}
    kv_colours = iter(["tab:green", "tab:olive", "tab:cyan", "tab:brown"])
    drawn, failed = 0, []
    for entry in results:
        label = entry["method"] if entry["method"] != "kvtier" else \
            f"kvtier (DRAM {entry.get('budget_fraction', float('nan')):.0%} of the data)"
        pts = entry.get("points") or []
        if not pts:
            failed.append(f"{label}: {entry.get('error', 'no points')}")
            continue
        colour, marker = styles.get(entry["method"]) or (next(kv_colours, "tab:green"), "D")
        if entry.get("error"):
            label += ": stopped at an error (see the table)"
        # points in parameter order (ef, nprobe growing): a backtrack is timing noise, visibly
        ax.plot([p["qps"] for p in pts], [p["recall_at_10"] for p in pts], color=colour,
                marker=marker, label=label)
        drawn += 1
    ax.axhline(0.95, color="grey", ls=":", lw=1, label="recall 0.95 (docs/design.md §8 target)")
    ax.set_xscale("log")
    # a method without points is named under the axis (never over the curves)
    note = textwrap.shorten("no points: " + "; ".join(failed), 220, placeholder=" ...") if failed else ""
    ax.set_xlabel("throughput (queries/s, log scale)" + ("\n" + textwrap.fill(note, 110) if note else ""),
                  fontsize=9)
    ax.set_ylabel("recall@10 (share of the exact top 10 found)")
    ax.set_ylim(0, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    if not drawn:
        _empty(ax, "no method produced points")
    return _save(fig, path, "W4 search: recall@10 vs queries/s (kvtier, hnswlib, faiss IVF-flat)"
                 + (f"\n{subtitle}" if subtitle else ""))


# -- flash layout / tier configurations ---------------------------------------------------------

def io_by_policy_layout(rows: Sequence[dict], path, subtitle: str = "") -> str:
    """Grouped bars per policy and layout: modeled I/O time per decoding step and mean
    contiguous read length; a row of panels per workload.

    Rows: ``workload``, ``policy``, ``layout``, ``modeled_io_ms_per_step``, ``entries_per_read``."""
    rows = _ok(rows)
    workloads = sorted({r["workload"] for r in rows}) or ["(none)"]
    fig, axes = _figure(len(workloads), 2, width=5.2, height=3.4)
    for (ax_t, ax_e), w in zip(axes, workloads, strict=True):
        wr = [r for r in rows if r["workload"] == w]
        pols = _ordered((r["policy"] for r in wr), list(POLICY_STYLE))
        lays = _ordered((r["layout"] for r in wr), list(LAYOUT_HATCH))
        width = 0.8 / max(1, max((len({r["layout"] for r in wr if r["policy"] == p}) for p in pols), default=1))
        for ax, key in ((ax_t, "modeled_io_ms_per_step"), (ax_e, "entries_per_read")):
            labelled = set()
            for i, pol in enumerate(pols):
                mine = [lay for lay in lays if any(r["policy"] == pol and r["layout"] == lay for r in wr)]
                for j, lay in enumerate(mine):  # a policy's bars centred on its tick
                    r = next(r for r in wr if r["policy"] == pol and r["layout"] == lay)
                    ax.bar([i + (j - (len(mine) - 1) / 2) * width], [r[key]], width=width * 0.95,
                           color=POLICY_STYLE.get(pol, ("tab:brown",))[0], hatch=LAYOUT_HATCH.get(lay, "xx"),
                           edgecolor="black")
                    labelled.add(lay)
            if labelled:  # the legend explains the hatches; colours are the policies' (ticks)
                from matplotlib.patches import Patch
                handles = [Patch(facecolor="white", edgecolor="black", hatch=LAYOUT_HATCH.get(lay, "xx"),
                                 label=f"layout {lay}") for lay in lays if lay in labelled]
                ax.legend(handles=handles, fontsize=8, loc="upper center", ncol=len(handles))
                top = max(r[key] for r in wr)  # head room above the bars for the legend
                if key == "modeled_io_ms_per_step" and all(r[key] > 0 for r in wr):
                    _log_y(ax)
                    ax.set_ylim(top=top * 6)
                else:
                    ax.set_ylim(0, top * 1.25)
        drams = [r.get("dram") for r in wr]
        common = max(set(drams), key=drams.count) if drams else None
        ticks = []
        for pol in pols:  # a policy measured at another DRAM budget than the rest says so
            d = {r.get("dram") for r in wr if r["policy"] == pol}
            ticks.append(pol if d == {common} else f"{pol}\n(DRAM {'/'.join(sorted(map(str, d)))})")
        for ax, ylabel, what in ((ax_t, "modeled I/O per decoding step (ms)", "modeled I/O time"),
                                 (ax_e, "entries per read request (merged)", "entries per read")):
            ax.set_xticks(range(len(pols)), ticks)
            ax.set_xlabel("policy")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{w}: {what}", fontsize=9)
            ax.grid(True, axis="y", alpha=0.3)
            if not wr:
                _empty(ax, "no successful replay")
    return _save(fig, path, "Flash I/O by policy and layout" + (f"\n{subtitle}" if subtitle else ""))


# -- pipelining ---------------------------------------------------------------------------------

def pipeline_steps(rows: Mapping[str, dict], path, subtitle: str = "") -> str:
    """Step time per mode of ``kvtier.bench.pipeline`` (median with a min-max bar over its repeats)
    against the target 1.15 x max(compute, I/O)."""
    fig, axes = _figure(1, 1, width=7.0, height=4.2)
    ax = axes[0][0]
    modes = [m for m in ("compute", "io", "sequential", "pipelined") if m in rows] + \
            [m for m in rows if m not in ("compute", "io", "sequential", "pipelined")]
    med = [rows[m]["step_ms"] for m in modes]
    runs = [rows[m].get("step_ms_all") or [rows[m]["step_ms"]] for m in modes]
    err = np.array([[v - min(r) for v, r in zip(med, runs, strict=True)],
                    [max(r) - v for v, r in zip(med, runs, strict=True)]])
    colours = ["tab:gray", "tab:blue", "tab:red", "tab:green", "tab:purple"]
    for i, m in enumerate(modes):
        ax.bar([i], [med[i]], yerr=err[:, i:i + 1], capsize=4, color=colours[i % len(colours)],
               label=f"{m}: {med[i]:.2f} ms")
    if "compute" in rows and "io" in rows:
        bound = max(rows["compute"]["step_ms"], rows["io"]["step_ms"])
        ax.axhline(1.15 * bound, color="black", ls="--", lw=1, label="target: 1.15 x max(compute, I/O)")
    ax.set_xticks(range(len(modes)), modes)
    ax.set_xlabel("mode")
    ax.set_ylabel("time per decoding step (ms; median, bar: min-max)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path, "Pipelining: step time with and without prefetch" + (f"\n{subtitle}" if subtitle else ""))


# -- ΔNLL vs fetch budget, with and without the estimated zone ------------------------------------


def delta_nll_vs_budget(rows: Sequence[dict], path, subtitle: str = "") -> str:
    """ΔNLL against full attention by fetch budget, one line per policy and estimate setting
    (solid: exact zone only; dashed: with the estimated zone), one panel per workload; the
    sinks + window baseline as a dotted level.

    Rows (kvtier.bench.torch_quality): ``workload``, ``method``, ``budget``, ``estimate`` ("off",
    "all" or a cluster count), ``delta_nll``."""
    rows = [r for r in _ok(rows) if r.get("method") not in (None, "full")]
    fig, panels = _workload_panels(rows, 5.8, 9.0, "no successful run")
    seen: dict = {}
    for ax, w, wr in panels:
        for r in wr:
            if r["method"] == "sink+window":
                ax.axhline(r["delta_nll"], color="k", ls=":", lw=1, label="sinks + window only")
        for pol in _ordered((r["method"] for r in wr if r["method"] != "sink+window"), list(POLICY_STYLE)):
            colour, marker = _style(POLICY_STYLE, pol, seen)
            for est in sorted({str(r.get("estimate", "off")) for r in wr if r["method"] == pol}):
                pr = sorted((r for r in wr if r["method"] == pol and str(r.get("estimate", "off")) == est),
                            key=lambda r: r["budget"])
                ax.plot([100 * r["budget"] for r in pr], [max(r["delta_nll"], 1e-4) for r in pr], color=colour,
                        marker=marker, ls="-" if est == "off" else "--",
                        label=pol if est == "off" else f"{pol} + estimate ({est})")
        ax.set_title(w, fontsize=10)
        ax.set_xlabel("fetch budget (% of the context's entries per step)")
        ax.set_ylabel("ΔNLL vs full attention (nats/token, log)")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3, which="both")
        if wr:
            ax.legend(fontsize=7, loc="upper right")
    title = "ΔNLL vs fetch budget, with and without the estimated zone"
    return _save(fig, path, title + (f"\n{subtitle}" if subtitle else ""))
