"""The end-to-end benchmark suite that ``kvtier bench`` runs: tier configurations on real traces.

Four measurements, all through kvtier's public API on captured SmolLM2 traces (docs/design.md §8, W1, W2
replayed as a KV cache by :func:`kvtier.bench.kvreplay.replay`; W4 searched by
:mod:`kvtier.bench.w4_search`), written to one directory:

- **grid**: every tier configuration device profile x DRAM budget x policy x layout x cache
  policy at a 10% fetch budget: attention recall, reads and bytes per retrieve, mean
  contiguous read, cache hit rate, modeled device time and real wall time per step, DRAM
  peak against the budget. Policy ``none`` (token-level: no clusters to lay out, no cluster
  cache) runs once per device and DRAM budget, with layout and cache policy ``n/a``.
- **recall vs fetch budget** per policy, at the largest DRAM budget.
- **I/O time per step vs context length** per policy. The replay of a prefix of the trace is
  exactly the first part of the replay of the whole trace (the engine is deterministic and the
  absolute DRAM budget is the same), so the difference of the totals of two prefix replays is
  what the steps between them cost: per-span figures of one decoding run, not of separate runs.
- **W4 search**: recall@10 against queries/s for kvtier, hnswlib and faiss IVF-flat on a small
  W4 set, each method in its own process (kvtier.bench.w4_search).

Before them ``kvtier.calibrate`` measures read bandwidth against request size on the output
directory's file system (the replays' stores live there too, so the real times are that
device's). Results: ``bench.json`` (machine, versions, device profiles, parameters, every row;
repeated figures as median, min, max and the runs), ``bench.md`` (tables) and ``plots/*.png``.

DRAM budgets are given as a share of the replayed KV bytes (``25%`` or ``0.25``: entries of
the replayed layers x KV heads x tokens, key + value + 16 bytes of id and bookkeeping, as
kvtier.bench.cache counts them) or as sizes (``4MiB``). A configuration the engine refuses (a budget
too small for what must stay resident) is a row with its error, not a failed run.

Traces come from kvtier.bench.capture's trace cache (``bench/.cache`` in a checkout). A
shorter trace is cut from a longer cached capture of the same prefill when there is one
(attention is causal, so the prefix of a sequence's keys, values and queries is the shorter
sequence's), else it is captured (minutes).

    python -m kvtier.bench.suite --quick --out DIR        (the same as: kvtier bench --quick --out DIR)
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from kvtier.bench.capture import Trace, load_trace, read_trace, resolve_cache_dir, trace_path
from kvtier.bench.kvreplay import LAYOUTS, replay
from kvtier.bench.tables import md_table
from kvtier.benchargs import json_default, show_defaults
from kvtier.config import POLICIES as CLUSTERINGS
from kvtier.config import PROFILES, DeviceProfile, parse_size
from kvtier.errors import InvalidArgumentError, KvtierError
from kvtier.store import CACHE_POLICIES as _CACHE_POLICIES

FORMAT = 1
REPLAY_WORKLOADS = ("W1", "W2")
WORKLOADS = (*REPLAY_WORKLOADS, "W4")
POLICIES = CLUSTERINGS  # the baselines, then the method (kvtier.config.POLICIES)
CACHE_POLICIES = tuple(_CACHE_POLICIES)
CALIBRATED = "calibrated"  # device name: the profile measured on --out by this run
# bytes per stored entry besides the key and value (id and bookkeeping), as kvtier.bench.cache counts
ENTRY_OVERHEAD = 16
NA = "n/a"  # layout and cache policy of policy none (token-level: no clusters, no cluster cache)
# what a run keeps as it goes (finished replays, the W4 stage's settings), under --out; removed
# when the run completes, so that only a stopped run is resumed
PARTIAL = ".partial"


@dataclasses.dataclass
class Settings:
    """Everything a run depends on; ``quick`` and ``full`` below are the two presets."""

    quick: bool = True
    workloads: list = dataclasses.field(default_factory=lambda: list(WORKLOADS))
    devices: list = dataclasses.field(default_factory=lambda: ["ufs4.0"])
    dram_budgets: list = dataclasses.field(default_factory=lambda: ["20%", "100%"])
    policies: list = dataclasses.field(default_factory=lambda: list(POLICIES))
    layouts: list = dataclasses.field(default_factory=lambda: ["clustered", "colocated"])  # full: + token
    cache_policies: list = dataclasses.field(default_factory=lambda: list(CACHE_POLICIES))
    fetch_budget: float = 0.1                      # the grid's, docs/design.md §8's 10%
    budgets: list = dataclasses.field(default_factory=lambda: [0.05, 0.1, 0.2])  # recall sweep
    layers: list | None = None                  # None: 3 spread layers (quick), every 3rd (full)
    every: int = 8                                 # retrieve every N decoding steps
    prefill: int = 512
    decode: int = 1024
    context_points: int = 4                        # spans of the I/O-vs-context measurement
    repeats: int = 1                               # runs of the I/O-vs-context replays (real time)
    sinks: int = 4
    window: int = 32
    seed: int = 0
    calibrate: bool = True
    w4_keys: int = 20_000
    w4_queries: int = 200
    w4_repeats: int = 3
    w4_methods: list = dataclasses.field(default_factory=lambda: ["exact", "hnswlib", "faiss-ivf", "kvtier"])
    w4_trace_decode: int = 1024                    # the W1 capture W4's vectors come from (quick: the replays')
    cache_dir: str | None = None                # trace cache (default: capture.DEFAULT_CACHE_DIR)

    @classmethod
    def preset(cls, quick: bool) -> Settings:
        if quick:
            return cls(quick=True)
        return cls(quick=False, devices=list(PROFILES), dram_budgets=["10%", "20%", "50%", "100%"],
                   layouts=list(LAYOUTS), budgets=[0.02, 0.05, 0.1, 0.2, 0.3], every=4, decode=2048, repeats=3,
                   w4_keys=200_000, w4_queries=1000, w4_trace_decode=2048)

    def replay_layers(self, n_layers: int) -> list[int]:
        if self.layers is not None:
            bad = [layer for layer in self.layers if not 0 <= layer < n_layers]
            if bad:
                raise InvalidArgumentError(f"--layers: the traces have layers 0..{n_layers - 1}, got {bad}")
            return sorted(set(self.layers))
        if self.quick:  # three layers spread over the depth, away from the first and the last
            return sorted({round(x) for x in np.linspace(0, n_layers - 1, 5)[1:-1]})
        return list(range(0, n_layers, 3))

    def validate(self) -> None:
        def check(name, values, allowed):
            if not values:
                raise InvalidArgumentError(f"{name}: at least one value expected")
            bad = [v for v in values if v not in allowed]
            if bad:
                raise InvalidArgumentError(f"{name}: unknown {bad}; choose from {list(allowed)}")
        check("--workloads", self.workloads, WORKLOADS)
        check("--policies", self.policies, POLICIES)
        check("--layouts", self.layouts, tuple(LAYOUTS))
        check("--cache-policies", self.cache_policies, CACHE_POLICIES)
        if not self.devices:
            raise InvalidArgumentError("--devices: at least one value expected")
        for d in self.devices:
            if d != CALIBRATED and d not in PROFILES and not os.path.isfile(d):
                raise InvalidArgumentError(
                    f"--devices: {d!r} is neither a profile ({', '.join(PROFILES)}), {CALIBRATED!r} "
                    "(the profile this run measures) nor a saved profile file")
        if CALIBRATED in self.devices and not self.calibrate:
            raise InvalidArgumentError(f"--devices: {CALIBRATED!r} needs the calibration (drop --no-calibrate)")
        for spec in self.dram_budgets:
            parse_dram(spec)
        for b in [*self.budgets, self.fetch_budget]:
            if not 0 < b <= 1:
                raise InvalidArgumentError(f"--budgets: fractions of the context in (0, 1] expected, got {b}")
        for name in ("every", "prefill", "decode", "context_points", "repeats", "w4_keys", "w4_queries",
                     "w4_repeats"):
            if getattr(self, name) < 1:
                raise InvalidArgumentError(f"--{name.replace('_', '-')}: a positive integer expected, "
                                           f"got {getattr(self, name)}")
        if self.prefill <= self.sinks + self.window:
            raise InvalidArgumentError(f"--prefill: more than sinks + window ({self.sinks + self.window}) "
                                       f"tokens expected, got {self.prefill}")
        if self.decode < self.every * self.context_points:
            raise InvalidArgumentError(f"--decode: at least every x context points "
                                       f"({self.every * self.context_points}) expected, got {self.decode}")


def parse_dram(spec: str) -> tuple[str, float]:
    """``25%`` or ``0.25`` -> ("fraction", 0.25); ``4MiB`` or ``4194304`` -> ("bytes", 4194304)."""
    text = str(spec).strip()
    try:
        v = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        v = None
    if v is not None and (text.endswith("%") or v <= 1):  # a share of the KV bytes
        if not (0 < v <= 1 and math.isfinite(v)):
            raise InvalidArgumentError(f"--dram-budgets: a share in (0, 100%] expected, got {spec!r}")
        return "fraction", v
    try:
        return "bytes", float(parse_size(text, "--dram-budgets"))
    except InvalidArgumentError:
        raise InvalidArgumentError(
            f"--dram-budgets: a share of the KV bytes (25% or 0.25) or a size (4MiB) expected, got {spec!r}") from None


def kv_bytes(n_layers: int, n_kv_heads: int, length: int, head_dim: int) -> int:
    """Bytes of the replayed KV entries: float16 key + value + the per-entry overhead."""
    return n_layers * n_kv_heads * length * (ENTRY_OVERHEAD + 2 * head_dim * 2)


# -- traces ---------------------------------------------------------------------------------

def slice_trace(trace: Trace, length: int) -> Trace:
    """The first ``length`` positions of a trace (views, no copy)."""
    if not trace.prefill < length <= trace.length:
        raise ValueError(f"cannot cut {length} positions from a trace of {trace.length} (prefill {trace.prefill})")
    return dataclasses.replace(
        trace, keys=trace.keys[:, :, :length], values=trace.values[:, :, :length],
        queries=trace.queries[:, :, :length], tokens=trace.tokens[:length], nll=trace.nll[:length - 1],
        meta={**trace.meta, "cut_to": length})


def load_cached_trace(workload: str, prefill: int, decode: int, seed: int = 0,
                      cache_dir=None, log: Callable[[str], None] = print) -> tuple[Trace, dict]:
    """(trace, where it came from): the cached capture, else the prefix of a longer cached capture
    of the same prefill, else a new capture (minutes of model time; cached for next time)."""
    cache = resolve_cache_dir(cache_dir)
    exact = trace_path(workload, prefill, decode, seed, cache)
    if exact.exists():
        return read_trace(exact), {"file": exact.name, "cut_from_decode": None}
    head, tail = exact.name.split(f"-d{decode}", 1)
    longer = []
    for p in cache.glob(f"{head}-d*{tail}"):
        m = re.fullmatch(re.escape(head) + r"-d(\d+)" + re.escape(tail), p.name)
        if m and int(m.group(1)) > decode:
            longer.append((int(m.group(1)), p))
    if longer:
        d, p = min(longer)
        return slice_trace(read_trace(p), prefill + decode), {"file": p.name, "cut_from_decode": d}
    log(f"no cached {workload} trace of {prefill}+{decode} tokens (or longer) in the trace cache: "
        "capturing it with the real model (one forward pass when its tokens are at hand: W2 is Python's own "
        "docs, W1's 512+1024 ship with kvtier; else minutes of sampling, kept as they come so that a stopped "
        "capture resumes)")
    t = load_trace(workload, prefill, decode, seed, cache_dir)
    return t, {"file": exact.name, "cut_from_decode": None, "captured_now": True}


# -- replays --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Config:
    workload: str
    device: str
    dram: str            # as given (25%, 4MiB)
    dram_bytes: int
    policy: str
    layout: str
    cache_policy: str
    budget: float
    decode: int


class Runner:
    """Runs replays, each configuration once per repeat however many measurements ask for it.
    Every finished replay is appended to ``partial`` (JSON lines) as it ends: a run that was
    stopped and is started again with the same settings takes them from there instead of
    replaying them (resumed_replays counts them). A replay is kept under its configuration and
    its trace (workload, lengths, seed, when it was captured): a recaptured trace replays anew."""

    def __init__(self, settings: Settings, store_root: str, devices: dict, log: Callable[[str], None],
                 partial: Path | None = None):
        self.s = settings
        self.store_root = store_root
        self.devices = devices          # name -> DeviceProfile
        self.log = log
        self.runs: dict[Config, list] = {}
        self.done = 0
        self.planned = 0
        self.resumed = 0
        self.measured = 0  # rows that replayed something in this run
        self.t0 = time.perf_counter()
        self.partial = partial
        self.kept: dict[str, list] = {}
        if partial is not None and partial.exists():
            lines = partial.read_text().splitlines(keepends=True)
            good = 0
            for line in lines:
                try:
                    d = json.loads(line)
                    self.kept.setdefault(d["key"], []).append(d["run"])
                except (ValueError, KeyError):
                    break  # a line cut by the kill: what follows it is not trusted
                good += 1
            if good < len(lines) or (lines and not lines[-1].endswith("\n")):
                partial.write_text("".join(lines[:good]).rstrip("\n") + ("\n" if good else ""))  # appends start clean

    def _key(self, trace: Trace, layers: list[int], cfg: Config) -> str:
        s = self.s
        return json.dumps([dataclasses.asdict(cfg), layers, trace.workload, trace.prefill, trace.decode,
                           trace.meta.get("seed"), trace.meta.get("resumed_at"), trace.meta.get("created"),
                           s.sinks, s.window, s.every],
                          sort_keys=True)

    def run(self, trace: Trace, layers: list[int], cfg: Config, repeats: int = 1) -> dict:
        runs = self.runs.setdefault(cfg, [])
        key = self._key(trace, layers, cfg)
        kept = self.kept.get(key, [])
        ran = False
        while len(runs) < repeats and not (runs and "error" in runs[0]):
            if len(runs) < len(kept):
                runs.append(kept[len(runs)])
                self.resumed += 1
                continue
            runs.append(self._one(trace, layers, cfg))
            ran = True
            if self.partial is not None:
                with open(self.partial, "a") as f:
                    f.write(json.dumps({"key": key, "run": runs[-1]}, default=json_default) + "\n")
        self.done += 1
        self.measured += ran
        row = _combine(cfg, runs[:repeats], layers)
        el = time.perf_counter() - self.t0
        # the time left at this run's pace: rows it measured (not those kept from a stopped run)
        left = (f"about {el / self.measured * (self.planned - self.done) / 60:.1f} min left" if self.measured
                else "time left: after the first replay of this run")
        self.log(f"[{self.done}/{self.planned} {int(el // 60)}m{int(el % 60):02d}s, {left}] " + _describe(row)
                 + ("" if ran or not kept else " (kept from the stopped run)"))
        return row

    def _one(self, trace: Trace, layers: list[int], cfg: Config) -> dict:
        prof = self.devices[cfg.device]
        kw = dict(LAYOUTS.get(cfg.layout, {"colocate_after": 0}))
        cache_policy = "cluster" if cfg.cache_policy == NA else cfg.cache_policy
        with tempfile.TemporaryDirectory(prefix="kvtier-bench-", dir=self.store_root) as d:
            try:
                r = replay(trace, policy=cfg.policy, budget=cfg.budget, sinks=self.s.sinks, window=self.s.window,
                           every=self.s.every, layers=layers, dram_budget=cfg.dram_bytes, device=prof,
                           store_dir=d, direct_io="auto", collect_stats=True,
                           store_kwargs={"cache_policy": cache_policy}, **kw)
            except (KvtierError, InvalidArgumentError) as e:  # e.g. a budget too small: a result
                return {"error": f"{type(e).__name__}: {e}"}
        st, cs = r.extra["store"], r.extra["collections"]
        heads = len(layers) * trace.n_kv_heads
        steps = r.retrieves / heads  # decoding steps with a retrieval
        modeled = st["modeled_io_seconds"]
        lookups = st["cache_hits"] + st["cache_misses"]
        return {
            "recall": r.recall, "oracle_recall": r.oracle_recall, "retrieves": r.retrieves,
            "retrieval_steps": steps, "fetched_per_retrieve": r.fetched_per_retrieve,
            "read_ops_per_retrieve": r.read_ops_per_retrieve, "read_bytes_per_retrieve": r.read_bytes_per_retrieve,
            "entries_per_read": st["mean_read_entries"],
            "mean_read_bytes": st["read_bytes"] / st["read_ops"] if st["read_ops"] else 0.0,
            "modeled_io_s_total": modeled,
            "modeled_io_ms_per_step": modeled / steps * 1e3 if steps else 0.0,
            "effective_bw_Bps": st["read_bytes"] / modeled if modeled else 0.0,
            "bw_share_of_profile": (st["read_bytes"] / modeled / prof.bandwidth_Bps
                                    if modeled and prof.bandwidth_Bps else 0.0),
            "real_retrieve_s_total": r.extra["read_seconds"],
            "hit_rate": st["cache_hits"] / lookups if lookups else None,
            "cache_hits": st["cache_hits"], "cache_misses": st["cache_misses"], "evictions": st["evictions"],
            "dram_peak_bytes": st["dram_peak_bytes"], "dram_budget_bytes": st["dram_budget"],
            "direct_io": bool(st["direct_io"]),
            "clusters": r.clusters, "mean_cluster_size": r.mean_cluster_size, "mean_variance": r.mean_variance,
            "moved_bytes": sum(c.get("split_write_bytes", 0) + c.get("relayout_bytes", 0) for c in cs),
            "naive_move_bytes": sum(c.get("naive_move_bytes", 0) for c in cs),
            "wall_s": r.wall_s,
        }


# Figures that must not change between repeats of one configuration (the engine and the device
# model are deterministic); real times do change and are reported as median and spread.
_DETERMINISTIC = ("recall", "read_ops_per_retrieve", "read_bytes_per_retrieve", "modeled_io_s_total", "cache_hits")


def _summary(values: Sequence[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": list(values)}


def _combine(cfg: Config, runs: list, layers: list[int]) -> dict:
    row = {"workload": cfg.workload, "device": cfg.device, "dram": cfg.dram, "dram_budget_bytes": cfg.dram_bytes,
           "policy": cfg.policy, "layout": cfg.layout, "cache_policy": cfg.cache_policy, "budget": cfg.budget,
           "decode": cfg.decode, "layers": layers}
    if "error" in runs[0]:
        row["error"] = runs[0]["error"]
        return row
    row.update(runs[0])
    row["repeats"] = len(runs)
    row["deterministic"] = all(r[k] == runs[0][k] for r in runs for k in _DETERMINISTIC)
    steps = runs[0]["retrieval_steps"]
    real = [r["real_retrieve_s_total"] / steps * 1e3 for r in runs] if steps else [0.0]
    row["real_retrieve_ms_per_step"] = _summary(real) if len(runs) > 1 else real[0]
    row["wall_s"] = _summary([r["wall_s"] for r in runs]) if len(runs) > 1 else runs[0]["wall_s"]
    row["runs_real_retrieve_s_total"] = [r["real_retrieve_s_total"] for r in runs]
    return row


def _describe(row: dict) -> str:
    head = (f"{row['workload']} {row['device']} DRAM {row['dram']} {row['policy']} {row['layout']} "
            f"{row['cache_policy']} budget {row['budget']:.0%} decode {row['decode']}: ")
    if "error" in row:
        return head + "refused: " + row["error"][:160]
    hr = row["hit_rate"]
    return head + (f"recall {row['recall']:.3f}, {row['read_ops_per_retrieve']:.2f} reads/retrieve, "
                   f"{row['entries_per_read']:.1f} entries/read, hit rate {'-' if hr is None else f'{hr:.2f}'}, "
                   f"modeled {row['modeled_io_ms_per_step']:.3f} ms/step, "
                   f"real {_median(row['real_retrieve_ms_per_step']):.2f} ms/step "
                   f"[{_median(row['wall_s']):.1f} s]")


def _median(v) -> float:
    return float(v["median"]) if isinstance(v, dict) else float(v)


def _pick(preferred: str, values: Sequence[str]) -> str:
    return preferred if preferred in values else values[0]


# -- the run ----------------------------------------------------------------------------------

def run_suite(settings: Settings, out, log: Callable[[str], None] = print, command: str = "") -> dict:
    """Runs every measurement the settings ask for, writes ``bench.json``, ``bench.md`` and
    ``plots/*.png`` under ``out`` and returns the report (the JSON's content)."""
    settings.validate()
    _need_matplotlib()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / PARTIAL
    settings_now = json.dumps(_public_settings(settings), default=json_default, sort_keys=True)
    if partial.exists() and (not (partial / "settings.json").exists()
                             or (partial / "settings.json").read_text() != settings_now):
        shutil.rmtree(partial)  # a stopped run with other settings: nothing of it applies
    for stale in out.glob("kvtier-bench-*"):  # the store a replay had open when its run was stopped
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    partial.mkdir(exist_ok=True)
    (partial / "settings.json").write_text(settings_now)
    started = time.perf_counter()
    from kvtier.bench.w4_search import machine_info, versions

    report: dict[str, Any] = {
        "benchmark": "kvtier-bench", "format": FORMAT, "mode": "quick" if settings.quick else "full",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": command,
        "machine": {**machine_info(), "load_average_start": _loadavg()},
        "versions": {**versions(), "matplotlib": _version("matplotlib")},
        "parameters": _public_settings(settings), "traces": {}, "devices": {},
        "replays": {"grid": [], "recall_vs_budget": [], "io_vs_context": []},
        "stage_errors": [], "seconds": {},
    }

    # 1. calibration first: it measures the disk before the replays' stores churn it
    devices: dict[str, DeviceProfile] = {}
    if settings.calibrate:
        t = time.perf_counter()
        try:
            from kvtier.calibrate import calibrate

            how = "quick" if settings.quick else "full"
            log(f"calibrating read bandwidth vs request size on the output directory ({how})")
            cal = calibrate(out, quick=settings.quick, name=CALIBRATED)
            d = cal.to_dict()
            d["calibration"]["path"] = "<out>"  # this machine's path stays out of the results
            report["calibration"] = d
            cal.save(out / "calibrated_profile.json")
            devices[CALIBRATED] = cal.profile
            log(cal.table())
        except (KvtierError, OSError) as e:
            report["calibration"] = {"error": f"{type(e).__name__}: {e}"}
            report["stage_errors"].append(f"calibration: {type(e).__name__}: {e}")
        report["seconds"]["calibration"] = time.perf_counter() - t
    for name in settings.devices:
        if name in PROFILES:
            devices[name] = PROFILES[name]
        elif name != CALIBRATED:
            from kvtier.calibrate import load_profile
            devices[name] = load_profile(name)
    missing = [d for d in settings.devices if d not in devices]
    report["devices"] = {n: dataclasses.asdict(devices[n]) for n in settings.devices if n in devices}
    grid_devices = [d for d in settings.devices if d in devices]
    if missing:
        report["stage_errors"].append(f"devices {missing}: no profile (the calibration failed)")

    # 2. replays
    replay_wls = [w for w in settings.workloads if w in REPLAY_WORKLOADS]
    t = time.perf_counter()
    if replay_wls and grid_devices:
        try:
            _replays(settings, out, report, replay_wls, grid_devices, devices, log)
        except (KvtierError, OSError, RuntimeError, ValueError) as e:
            report["stage_errors"].append(f"replays: {type(e).__name__}: {e}")
            log(traceback.format_exc())
    report["seconds"]["replays"] = time.perf_counter() - t

    # 3. W4 search
    if "W4" in settings.workloads:
        t = time.perf_counter()
        try:
            report["w4_search"] = _w4(settings, out, log)
        except Exception as e:  # a failed stage is reported, the others still count
            report["w4_search"] = {"error": f"{type(e).__name__}: {e}"}
            report["stage_errors"].append(f"W4 search: {type(e).__name__}: {e}")
            log(traceback.format_exc())
        report["seconds"]["w4_search"] = time.perf_counter() - t

    # 4. plots, tables
    t = time.perf_counter()
    report["plots"] = make_plots(report, out / "plots")
    report["seconds"]["plots"] = time.perf_counter() - t
    report["seconds"]["total"] = time.perf_counter() - started
    report["machine"]["load_average_end"] = _loadavg()
    (out / "bench.json").write_text(json.dumps(report, indent=1, default=json_default) + "\n")
    (out / "bench.md").write_text(markdown(report) + "\n")
    shutil.rmtree(out / PARTIAL, ignore_errors=True)  # complete: nothing to resume
    return report


def _replays(settings, out, report, workloads, grid_devices, devices, log):
    s = settings
    base_device = grid_devices[0]
    base_layout = _pick("colocated", s.layouts)
    base_cache = _pick("cluster", s.cache_policies)
    runner = Runner(s, str(out), devices, log, partial=out / PARTIAL / "replays.jsonl")
    if runner.kept:
        log(f"resuming: {sum(map(len, runner.kept.values()))} replays of a stopped run with these settings are "
            f"kept in {out / PARTIAL}")
    plan = []
    for w in workloads:
        trace, origin = load_cached_trace(w, s.prefill, s.decode, s.seed, s.cache_dir, log)
        layers = s.replay_layers(trace.n_layers)
        kvb = kv_bytes(len(layers), trace.n_kv_heads, trace.length, trace.head_dim)
        report["traces"][w] = {**origin, "prefill": trace.prefill, "decode": trace.decode,
                               "layers": layers, "kv_heads": trace.n_kv_heads, "q_heads": trace.n_q_heads,
                               "head_dim": trace.head_dim, "replayed_kv_bytes": kvb,
                               "model_file": trace.meta.get("model_file")}
        drams = {}
        for spec in s.dram_budgets:
            kind, v = parse_dram(spec)
            drams[spec] = int(v * kvb) if kind == "fraction" else int(v)
        plan.append((w, trace, layers, kvb, drams))
    n_combos = sum(1 for p in s.policies if p != "none") * len(s.layouts) * len(s.cache_policies) + \
        ("none" in s.policies)
    runner.planned = len(plan) * (len(grid_devices) * len(s.dram_budgets) * n_combos
                                  + len(s.policies) * (len(s.budgets) + s.context_points))
    log(f"replays: {runner.planned} measurements planned (configurations shared between them run once)")
    runner.t0 = time.perf_counter()  # the time left is estimated from the replays alone

    def cfg(w, dev, dram_spec, drams, pol, lay, cache, budget, decode):
        if pol == "none":
            lay, cache = NA, NA
        return Config(w, dev, dram_spec, drams[dram_spec], pol, lay, cache, budget, decode)

    for w, trace, layers, kvb, drams in plan:
        def add_fraction(row, kvb=kvb):
            row["dram_fraction"] = row["dram_budget_bytes"] / kvb
            return row
        # grid: every tier configuration
        for dev, spec, pol in itertools.product(grid_devices, s.dram_budgets, s.policies):
            for lay, cache in itertools.product(s.layouts, s.cache_policies):
                c = cfg(w, dev, spec, drams, pol, lay, cache, s.fetch_budget, s.decode)
                row = add_fraction(runner.run(trace, layers, c))
                report["replays"]["grid"].append(row)
                if pol == "none":
                    break  # layout and cache policy do not apply: one run
        # recall vs fetch budget, at the largest DRAM budget (every policy fits there if anywhere)
        big = max(s.dram_budgets, key=lambda sp: drams[sp])
        for pol, b in itertools.product(s.policies, s.budgets):
            c = cfg(w, base_device, big, drams, pol, base_layout, base_cache, b, s.decode)
            report["replays"]["recall_vs_budget"].append(add_fraction(runner.run(trace, layers, c)))
        # I/O per step vs context length: at the smallest DRAM budget every clustered policy ran
        # in (the same budget for all of them: the flash reads are what differ), else the largest.
        # Token-level `none` must keep every key resident: it runs at the smallest budget it fits.
        ok: dict = {}
        for r in report["replays"]["grid"]:
            if (r["workload"] == w and r["device"] == base_device and r["layout"] in (base_layout, NA)
                    and r["cache_policy"] in (base_cache, NA) and "error" not in r):
                ok.setdefault(r["dram"], set()).add(r["policy"])

        def smallest(pols, ok=ok, drams=drams, big=big):
            fits = [sp for sp in s.dram_budgets if ok.get(sp, set()) >= set(pols)]
            return min(fits, key=lambda sp: drams[sp]) if fits else big
        ref = {"dram": smallest([p for p in s.policies if p != "none"]), "none_dram": smallest(["none"]),
               "device": base_device, "layout": base_layout, "cache_policy": base_cache}
        report["traces"][w]["reference"] = ref
        report["replays"]["io_vs_context"] += _context(runner, trace, layers, w, ref, drams, cfg, add_fraction)
    report["resumed_replays"] = runner.resumed


def _context(runner, trace, layers, w, ref, drams, cfg, add_fraction) -> list[dict]:
    """Per-span figures of one decoding run from the differences of prefix replays."""
    s = runner.s
    dev, layout, cache = ref["device"], ref["layout"], ref["cache_policy"]
    n = s.context_points
    # spans end on multiples of `every`, so a prefix's retrieval steps are the first ones of the whole
    ends = sorted({max(s.every, round(trace.decode * k / n / s.every) * s.every) for k in range(1, n + 1)})
    ends[-1] = trace.decode
    rows = []
    for pol in s.policies:
        prev = None
        dram = ref["none_dram"] if pol == "none" else ref["dram"]
        for end in ends:
            sub = slice_trace(trace, trace.prefill + end) if end < trace.decode else trace
            row = add_fraction(runner.run(sub, layers, cfg(w, dev, dram, drams, pol, layout, cache,
                                                           s.fetch_budget, end), repeats=s.repeats))
            if "error" in row:
                rows.append({**{k: row[k] for k in ("workload", "device", "dram", "policy", "layout",
                                                    "cache_policy", "budget")}, "error": row["error"]})
                break
            start = 0 if prev is None else prev["decode"]
            steps = row["retrieval_steps"] - (prev["retrieval_steps"] if prev else 0)
            modeled = row["modeled_io_s_total"] - (prev["modeled_io_s_total"] if prev else 0.0)
            real = [a - b for a, b in zip(row["runs_real_retrieve_s_total"],
                                          prev["runs_real_retrieve_s_total"] if prev else
                                          [0.0] * len(row["runs_real_retrieve_s_total"]), strict=True)]
            per = steps * len(layers)
            real_us = [x / per * 1e6 for x in real]
            rows.append({
                "workload": w, "device": dev, "dram": dram, "dram_budget_bytes": row["dram_budget_bytes"],
                "dram_fraction": row["dram_fraction"], "policy": pol, "layout": row["layout"],
                "cache_policy": row["cache_policy"], "budget": s.fetch_budget,
                "span": [trace.prefill + start, trace.prefill + end],
                "context_tokens": trace.prefill + (start + end) / 2, "retrieval_steps": steps,
                "modeled_us_per_step_layer": modeled / per * 1e6,
                "real_us_per_step_layer": _summary(real_us) if len(real_us) > 1 else real_us[0],
                "deterministic": row["deterministic"] and (prev is None or prev["deterministic"]),
            })
            prev = row
    return rows


def _w4(settings: Settings, out: Path, log) -> dict:
    """kvtier.bench.w4_search on a small W4 set; its own files go to ``out/w4``."""
    from kvtier.bench import w4_search

    s = settings
    argv = ["--out", str(out / "w4"), "--n-keys", str(s.w4_keys), "--n-queries", str(s.w4_queries),
            "--repeats", str(s.w4_repeats), "--methods", ",".join(s.w4_methods),
            "--trace-decode", str(s.w4_trace_decode), "--workdir", str(out)]
    if s.quick:
        argv += ["--hnsw-ef", "10,20,40,80,160,320,640", "--ivf-nprobe", "1,2,4,8,16,32,64,128",
                 "--kvtier-nprobe", "4,8,16,32,64,128,256"]
    if s.cache_dir:
        argv += ["--cache-dir", str(s.cache_dir)]
    done = out / PARTIAL / "w4_argv.json"
    if done.exists() and json.loads(done.read_text()) == argv and (out / "w4" / "w4_search.json").exists():
        log("W4 search: finished by the stopped run with these settings; kept")
    else:
        log("W4 search: python -m kvtier.bench.w4_search " + " ".join(shlex.quote(a) for a in argv))
        w4_search.main(argv)
        done.write_text(json.dumps(argv))
    res = json.loads((out / "w4" / "w4_search.json").read_text())
    # the arguments as given, with this machine's paths written relative to the output directory
    res["argv"] = [a.replace(str(out), "<out>") if a.startswith(str(out)) else a for a in argv]
    if s.cache_dir:
        res["argv"][res["argv"].index("--cache-dir") + 1] = "<trace cache>"
    return res


# -- plots and tables -------------------------------------------------------------------------

def make_plots(report: dict, plot_dir, prefix: str = "bench_") -> list[str]:
    """Draws the suite's PNGs from a report (as run_suite returns it or bench.json holds it)."""
    from kvtier.bench import plots

    plot_dir = Path(plot_dir)
    rep = report.get("replays", {})
    p = report.get("parameters", {})
    devs = report.get("devices", {})
    base_dev = next(iter(devs), "")
    mode = f"kvtier bench ({report.get('mode', '?')})"
    layers = {w: len(t["layers"]) for w, t in report.get("traces", {}).items()}
    lay_txt = ", ".join(f"{w} {n} layers" for w, n in layers.items())
    made = []
    if rep.get("recall_vs_budget"):
        made.append(plots.recall_vs_budget(
            rep["recall_vs_budget"], plot_dir / f"{prefix}recall_vs_budget.png",
            f"{mode}: {lay_txt}, every {p.get('every')} steps, prefill {p.get('prefill')} + decode {p.get('decode')}"))
    if rep.get("io_vs_context"):
        drams = sorted({t["reference"]["dram"] for t in report.get("traces", {}).values() if t.get("reference")}) \
            or ["?"]
        made.append(plots.io_vs_context(
            rep["io_vs_context"], plot_dir / f"{prefix}io_vs_context.png",
            f"{mode}: fetch budget {p.get('fetch_budget', 0.1):.0%}, DRAM budget {'/'.join(drams)} of the KV bytes "
            f"(none: the least it fits in), {lay_txt}", device=base_dev))
    grid = [r for r in rep.get("grid", []) if not r.get("error")]
    # the reference configuration of each workload (the I/O-vs-context one): its grid rows show
    # where each policy's reads land and how policies and layouts compare
    refs = {w: t["reference"] for w, t in report.get("traces", {}).items() if t.get("reference")}

    def at_reference(r, any_layout=False):
        ref = refs.get(r["workload"])
        if not ref:
            return False
        return r["device"] == ref["device"] and \
            r["dram"] == (ref["none_dram"] if r["policy"] == "none" else ref["dram"]) and \
            (any_layout or r["layout"] in (ref["layout"], NA)) and r["cache_policy"] in (ref["cache_policy"], NA)
    first = next(iter(refs), None)
    achieved = [r for r in grid if r["workload"] == first and at_reference(r)]
    cal = report.get("calibration")
    cal = cal if cal and "error" not in cal else None
    profiles = {n: d for n, d in devs.items() if n != CALIBRATED}
    if cal or profiles:
        made.append(plots.bandwidth_vs_request_size(
            cal, profiles, plot_dir / f"{prefix}bandwidth_vs_request_size.png", achieved,
            (f"replay points: {first}, fetch budget {p.get('fetch_budget', 0.1):.0%}; " if achieved else "")
            + "model: a batch of reads at full queue depth"))
    if grid:
        # hit rate vs DRAM: one policy and layout on the first device, every cache policy
        pols = {r["policy"] for r in grid}
        pol = "adaptive" if "adaptive" in pols else sorted(pols - {"none"} or pols)[0]
        lay = "colocated" if any(r["layout"] == "colocated" for r in grid) else grid[0]["layout"]
        sel = [r for r in grid if r["policy"] == pol and r["layout"] in (lay, NA) and r["device"] == grid[0]["device"]]
        if sel and pol != "none":
            made.append(plots.hit_rate_vs_dram(
                sel, plot_dir / f"{prefix}hit_rate_vs_dram.png",
                f"{mode}: policy {pol}, layout {lay}, device {grid[0]['device']}, fetch budget "
                f"{p.get('fetch_budget', 0.1):.0%}, {lay_txt}"))
        sel = [r for r in grid if at_reference(r, any_layout=True)]
        if sel:
            ref = refs[sel[0]["workload"]]
            made.append(plots.io_by_policy_layout(
                sel, plot_dir / f"{prefix}io_by_policy_layout.png",
                f"{mode}: device {ref['device']}, DRAM {ref['dram']} of the KV bytes (none: "
                f"{ref['none_dram']}, the least it fits in), cache {ref['cache_policy']}, fetch budget "
                f"{p.get('fetch_budget', 0.1):.0%}, {lay_txt}"))
    w4 = report.get("w4_search")
    if w4 and w4.get("results"):
        wp = w4.get("parameters", {})
        made.append(plots.search_recall_vs_qps(
            w4["results"], plot_dir / f"{prefix}search_recall_vs_qps.png",
            f"{wp.get('n_keys')} SmolLM2 keys, {wp.get('n_queries')} queries, top-10 inner product, "
            f"{wp.get('threads', 1)} search thread(s)"))
    return [os.path.relpath(m, plot_dir.parent) for m in made]


def _fmt(v, spec: str = ".3f") -> str:
    if v is None:
        return "–"
    if isinstance(v, dict):
        return f"{v['median']:{spec}} ({v['min']:{spec}}–{v['max']:{spec}})"
    return f"{v:{spec}}"


def markdown(report: dict, plot_prefix: str = "plots/", plots_made: Sequence[str] | None = None) -> str:
    """The run's tables: tier configurations, recall vs budget, I/O vs context, calibration, W4.
    Plots are linked as ``plot_prefix + name`` when ``plots_made`` (default: the report's own
    list) holds them."""
    made = {os.path.basename(x) for x in (report.get("plots", []) if plots_made is None else plots_made)}

    def img(name: str, alt: str) -> list:
        return [f"![{alt}]({plot_prefix}{name})", ""] if name in made else []
    p = report.get("parameters", {})
    m = report.get("machine", {})
    L = [f"# kvtier bench ({report.get('mode')})", ""]
    if report.get("command"):
        L += [f"`{report['command']}`", ""]
    la0, la1 = m.get("load_average_start"), m.get("load_average_end")
    ver = report.get("versions", {})
    L.append(f"{report.get('created', '')}; {m.get('processor', '?')}, {m.get('cpus_usable', m.get('cpu_count'))} "
             f"CPUs; kvtier {ver.get('kvtier')} ({ver.get('git_commit')}); "
             f"{report.get('seconds', {}).get('total', 0):.0f} s.")
    L.append("")
    if la0 and la1:
        busy = max(la0[0], la1[0]) > 1.2 * (m.get("cpus_usable") or m.get("cpu_count") or 1)
        L.append(f"Load average {la0[0]:.1f} at the start, {la1[0]:.1f} at the end"
                 + (": the machine was shared, so real times are inflated; modeled times, bytes and recall are "
                    "deterministic and unaffected." if busy else "."))
        L.append("")
    for w, t in report.get("traces", {}).items():
        cut = f", cut from a {t['cut_from_decode']}-token decode" if t.get("cut_from_decode") else ""
        L.append(f"- {w}: prefill {t['prefill']} + decode {t['decode']} tokens ({t['file']}{cut}); "
                 f"layers {t['layers']} x {t['kv_heads']} KV heads; {t['replayed_kv_bytes'] / 2**20:.1f} MiB of KV")
    L.append(f"- retrieval every {p.get('every')} steps, {p.get('sinks')} sinks + {p.get('window')}-token window, "
             f"fetch budget {p.get('fetch_budget', 0.1):.0%} of the context in the grid")
    for e in report.get("stage_errors", []):
        L.append(f"- **stage failed**: {e}")
    L.append("")

    grid = report.get("replays", {}).get("grid", [])
    if grid:
        L += ["## Tier configurations", "",
              "Modeled times are the device profile's (deterministic); real times are the wall time of `retrieve()` "
              "(scoring + reads, O_DIRECT where the file system allows) on this machine.", "",
              md_table(["workload", "device", "DRAM", "policy", "layout", "cache", "recall", "reads/retrieve",
                        "entries/read", "KiB/retrieve", "hit rate", "modeled I/O ms/step",
                        "eff. BW (share of profile)", "real ms/step", "DRAM peak / budget KiB"],
                       [[r["workload"], r["device"], r["dram"], r["policy"], r["layout"], r["cache_policy"]]
                        + (["refused: " + r["error"][:140].replace("|", "/")] if r.get("error") else
                           [f"{r['recall']:.3f}", f"{r['read_ops_per_retrieve']:.2f}", f"{r['entries_per_read']:.1f}",
                            f"{r['read_bytes_per_retrieve'] / 1024:.1f}", _fmt(r["hit_rate"], ".2f"),
                            f"{r['modeled_io_ms_per_step']:.3f}",
                            f"{r['effective_bw_Bps'] / 1e9:.2f} GB/s ({r['bw_share_of_profile']:.0%})",
                            _fmt(r["real_retrieve_ms_per_step"], ".2f"),
                            f"{r['dram_peak_bytes'] / 1024:.0f} / {r['dram_budget_bytes'] / 1024:.0f}"])
                        for r in grid], "llrlll" + "r" * 9), ""]
    rec = report.get("replays", {}).get("recall_vs_budget", [])
    if rec:
        L += ["## Attention recall vs fetch budget", "",
              *img("bench_recall_vs_budget.png", "recall vs budget"),
              md_table(["workload", "policy", "budget", "recall", "token-level oracle", "mean cluster size"],
                       [[r["workload"], r["policy"], f"{r['budget']:.0%}"]
                        + (["refused: " + r["error"][:100]] if r.get("error") else
                           [f"{r['recall']:.3f}", f"{r['oracle_recall']:.3f}", f"{r['mean_cluster_size']:.1f}"])
                        for r in rec], "llrrrr"), ""]
    ctx = report.get("replays", {}).get("io_vs_context", [])
    if ctx:
        L += ["## I/O time per decoding step vs context length", "",
              *img("bench_io_vs_context.png", "I/O vs context"),
              "Each span's figures are the difference of two prefix replays of one decoding run.", "",
              md_table(["workload", "policy", "DRAM", "context span (tokens)", "modeled µs / step / layer",
                        "real µs / step / layer"],
                       [[r["workload"], r["policy"], r["dram"]]
                        + (["refused: " + r["error"][:100]] if r.get("error") else
                           [f"{r['span'][0]}–{r['span'][1]}", f"{r['modeled_us_per_step_layer']:.1f}",
                            _fmt(r["real_us_per_step_layer"], ".1f")])
                        for r in ctx], "llrlrr"), ""]
    if grid:
        L += ["## Hit rate vs DRAM budget; I/O by policy and layout", "",
              *img("bench_hit_rate_vs_dram.png", "hit rate vs DRAM"),
              *img("bench_io_by_policy_layout.png", "I/O by policy and layout")]
    cal = report.get("calibration")
    if cal:
        L += ["## Read bandwidth vs request size", "",
              *img("bench_bandwidth_vs_request_size.png", "bandwidth vs request size")]
        if "error" in cal:
            L += [f"Calibration failed: {cal['error']}", ""]
        else:
            c = cal["calibration"]
            qds = sorted({x["queue_depth"] for x in c["points"]})
            pts = {(x["size"], x["queue_depth"]): x for x in c["points"]}
            L.append(md_table(["request"] + [f"qd{q} MB/s (min–max)" for q in qds],
                              [[f"{size // 1024} KiB"]
                               + [f"{pt['bandwidth_Bps'] / 1e6:.0f} ({min(pt['runs_Bps']) / 1e6:.0f}"
                                  f"–{max(pt['runs_Bps']) / 1e6:.0f})" for pt in (pts[size, q] for q in qds)]
                               for size in sorted({x["size"] for x in c["points"]})], "r" * (1 + len(qds))))
            note = f"; note: {c['note']}" if c.get("note") else ""
            L += ["", f"O_DIRECT: {'yes' if c['direct'] else 'no'}; file system {c['filesystem']}; medians of "
                      f"{c['runs']} runs of {c['duration_s']:g} s{note}", ""]
    w4 = report.get("w4_search")
    if w4:
        L += ["## W4 search", "", *img("bench_search_recall_vs_qps.png", "search recall vs queries/s")]
        if "error" in w4:
            L += [f"W4 search failed: {w4['error']}", ""]
        else:
            from kvtier.bench.w4_search import markdown_table
            L += [markdown_table(w4["results"], w4["parameters"]["data_bytes"]), ""]
    return "\n".join(L)


# -- helpers ----------------------------------------------------------------------------------

def _need_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InvalidArgumentError(
            "kvtier bench draws PNG plots: it needs matplotlib (pip install 'kvtier[bench]')") from None


def _loadavg() -> list | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _version(dist: str) -> str | None:
    import importlib.metadata as md
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _public_settings(s: Settings) -> dict:
    d = dataclasses.asdict(s)
    d["cache_dir"] = None if s.cache_dir is None else "<given>"  # no machine paths in results
    return d


# -- command line -------------------------------------------------------------------------------

def _items(values) -> list[str]:
    """``--x a,b c`` -> [a, b, c]."""
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def settings_from_args(a) -> tuple[Settings, str]:
    s = Settings.preset(a.quick)
    for name in ("workloads", "devices", "dram_budgets", "policies", "layouts", "cache_policies"):
        v = getattr(a, name)
        if v:
            setattr(s, name, _items(v))
    try:
        if a.budgets:
            s.budgets = [float(x) for x in _items(a.budgets)]
        if a.layers:
            s.layers = [int(x) for x in _items(a.layers)]
    except ValueError as e:
        raise InvalidArgumentError(f"--budgets/--layers: numbers expected ({e})") from None
    for name in ("every", "prefill", "decode", "repeats", "w4_keys", "w4_queries"):
        if getattr(a, name) is not None:
            setattr(s, name, getattr(a, name))
    if s.fetch_budget not in s.budgets:
        s.budgets = sorted([*s.budgets, s.fetch_budget])
    s.calibrate = not a.no_calibrate
    s.cache_dir = a.trace_dir
    return s, a.out


def command_line(argv: Sequence[str], prog: str = "kvtier bench") -> str:
    """The command as typed, with the output directory (a path of this machine) written OUT."""
    args, skip = [], False
    for x in argv:
        if skip:
            args.append("OUT")
            skip = False
        elif x == "--out":
            args.append(x)
            skip = True
        elif x.startswith("--out="):
            args.append("--out=OUT")
        else:
            args.append(x)
    return " ".join([prog] + [shlex.quote(x) for x in args])


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    from kvtier.benchargs import bench_arguments

    p = argparse.ArgumentParser(prog="python -m kvtier.bench.suite", description=__doc__.split("\n\n")[0])
    bench_arguments(p)
    a = show_defaults(p).parse_args(argv)
    s, out = settings_from_args(a)
    cmd = command_line(sys.argv[1:] if argv is None else argv, "python -m kvtier.bench.suite")
    report = run_suite(s, out, command=cmd)
    return 1 if report["stage_errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
