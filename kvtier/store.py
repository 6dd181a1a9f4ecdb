"""The Python face of the store: ``kvtier.open``, ``Store`` and ``Collection``.

This layer validates every argument (so that a rejected call changes nothing), converts
arrays to what the engine takes, keeps the catalog, and otherwise hands work to the C engine
with the GIL released.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvtier import _engine
from kvtier.catalog import Catalog, StoreLock
from kvtier.config import MIN_DRAM_BUDGET, parse_size, resolve_device
from kvtier.errors import BudgetError, CorruptionError, InvalidArgumentError, NotFoundError, StoreClosedError
from kvtier.params import DEFAULT_POLICY, budget_arg, budget_entries, new_params  # noqa: F401 (DEFAULT_POLICY: kvtier.store.DEFAULT_POLICY)
from kvtier.params import as_matrix as _as_matrix
from kvtier.params import positive_int as _positive_int
from kvtier.stats import Stats

DEFAULT_DRAM_BUDGET = "256MiB"
_DIRECT = {"auto": -1, False: 0, True: 1}
CACHE_POLICIES = _engine.CACHE_POLICIES  # name -> engine value (kvtier.h KVT_CACHE_POLICIES)
#: search() without nprobe reads every cluster of a collection this small (the reads are few)
EXACT_ENTRIES = 4096
#: tune_nprobe's defaults: sample queries, and the recall@10 they must reach. The target sits
#: above the 0.9 promised so that a sample of 64 queries x 10 neighbours (standard error about
#: 0.01) still lands above it on other queries of the same kind.
TUNE_QUERIES = 64
TUNE_TARGET = 0.95
#: the default nprobe's share of the clusters when a DRAM budget at its minimum leaves no room
#: to measure it (a search needs less: one cluster at a time)
FALLBACK_SHARE = 0.25


def _no_ids() -> np.ndarray:
    return np.empty(0, dtype=np.int64)


@dataclass(frozen=True)
class SearchHits:
    """Approximate top-k: ``ids`` (int64, -1 where fewer than k) and ``scores`` (float32;
    inner product for ``ip``, negative squared distance for ``l2``), best first.
    ``unreadable``: with ``on_corrupt="skip"``, the ids of damaged entries the search met and
    left out (int64, sorted; empty when all was intact)."""

    ids: np.ndarray
    scores: np.ndarray
    unreadable: np.ndarray = field(default_factory=_no_ids)


@dataclass(frozen=True)
class Retrieved:
    """Whole clusters fetched by ``retrieve``: parallel arrays over the fetched entries."""

    ids: np.ndarray
    keys: np.ndarray
    values: np.ndarray
    clusters: np.ndarray
    #: With ``retrieve(..., estimate=...)``: the estimated zone per query row (None without):
    #: ``est_lse`` [rows] float32, log sum over the estimated clusters of n_j exp(scale q.mean_j)
    #: (-inf when none); ``est_values`` [rows, value_dim] float32, their mass-weighted mean
    #: value; ``est_clusters`` / ``est_entries`` how many clusters and entries it stands for.
    est_lse: np.ndarray | None = None
    est_values: np.ndarray | None = None
    est_clusters: int = 0
    est_entries: int = 0
    #: With ``on_corrupt="skip"``: the ids of damaged entries left out (int64, sorted).
    unreadable: np.ndarray = field(default_factory=_no_ids)

    def __len__(self) -> int:
        return len(self.ids)


class Entries(tuple):
    """What ``get`` returns: the pair ``(keys, values)`` (so ``keys, values = coll.get(ids)``),
    also as ``.keys`` and ``.values``, with ``.ids`` the ids their rows hold (the ids asked
    for, in their order; with ``on_corrupt="skip"`` without the damaged ones) and
    ``.unreadable`` the damaged ids left out (sorted; empty when all was intact)."""

    ids: np.ndarray
    unreadable: np.ndarray

    def __new__(cls, keys: np.ndarray, values: np.ndarray, ids: np.ndarray, unreadable: np.ndarray):
        self = super().__new__(cls, (keys, values))
        self.ids = ids
        self.unreadable = unreadable
        return self

    @property
    def keys(self) -> np.ndarray:
        return self[0]

    @property
    def values(self) -> np.ndarray:
        return self[1]



@dataclass(frozen=True)
class RetrievedMany:
    """What ``Store.retrieve_many`` fetched for a group of n collections, one row each:
    member i's entries are ``ids[i, :counts[i]]`` (and the same rows of ``keys``, ``values``,
    ``clusters``), exactly ``requests[i]``'s ``retrieve``; later rows hold id and cluster -1.
    Arrays are (n, cap), (n, cap, dim), (n, cap, value_dim), (n, cap) and (n,); pass the
    object back as ``out=`` to reuse them (torch views them with ``torch.from_numpy``)."""

    ids: np.ndarray
    keys: np.ndarray
    values: np.ndarray
    clusters: np.ndarray
    counts: np.ndarray
    #: With ``on_corrupt="skip"``: member index -> ids of damaged entries left out (only
    #: members that met damage; rewritten by every call that reuses the object)
    unreadable: dict = field(default_factory=dict)

    def member(self, i: int) -> Retrieved:
        """Member i's result as a ``Retrieved`` (views, no copy)."""
        m = int(self.counts[i])
        return Retrieved(self.ids[i, :m], self.keys[i, :m], self.values[i, :m], self.clusters[i, :m],
                         unreadable=self.unreadable.get(i, _no_ids()))

def _estimate_args(estimate, scale, variance) -> tuple[int, float, int]:
    """``retrieve``'s estimate arguments as the engine takes them: (clusters, -1 for all;
    scale, 0 for 1/sqrt(dim); variance 0 or 1)."""
    if estimate is True or estimate is None:
        m = -1
    elif isinstance(estimate, (int, np.integer)) and not isinstance(estimate, (bool, np.bool_)) and estimate >= 0:
        m = int(estimate)
    else:
        raise InvalidArgumentError(
            "estimate: False, True/None (all clusters not fetched) or a cluster count >= 0 expected, "
            f"got {estimate!r}")
    if scale is None:
        s = 0.0
    elif isinstance(scale, (int, float, np.integer, np.floating)) and not isinstance(scale, bool) \
            and math.isfinite(scale) and scale > 0:
        s = float(scale)
    else:
        raise InvalidArgumentError(f"scale: a finite number > 0 expected (None: 1/sqrt(dim)), got {scale!r}")
    if not isinstance(variance, (bool, np.bool_)):
        raise InvalidArgumentError(f"variance: True or False expected, got {variance!r}")
    return m, s, int(bool(variance))


@dataclass
class StepOut:
    """Where ``Store.step_layer`` puts a group of n collections' retrieve, reused step after
    step: member i's entries are ``ids[i, :counts[i]]`` and ``clusters[i, :counts[i]]``
    ((n, cap) arrays, later rows -1), and rows ``[offset, offset + counts[i])`` of ``keys[i]``
    and ``values[i]`` ((n, rows, dim) and (n, rows, value_dim), float32 — a float16
    collection's entries widened exactly — or the collections' dtype; the other rows are not
    touched). So ``keys`` and ``values`` may be numpy views of buffers that hold other rows
    too: for an LLM, a layer's attention keys and values with the sinks and the window beside
    the fetched entries (``torch.from_numpy`` / ``tensor.numpy()`` share the memory). With an
    estimate: ``lse`` (n, nq), ``est_values`` (n, nq, value_dim) float32 and ``est_entries``
    (n,): ``Retrieved``'s ``est_lse``, ``est_values`` and ``est_entries`` per member."""

    ids: np.ndarray
    clusters: np.ndarray
    counts: np.ndarray
    keys: np.ndarray
    values: np.ndarray
    offset: int = 0
    lse: np.ndarray | None = None
    est_values: np.ndarray | None = None
    est_entries: np.ndarray | None = None
    #: With ``on_corrupt="skip"``: member index -> ids of damaged entries left out
    unreadable: dict = field(default_factory=dict)

    @classmethod
    def allocate(cls, n: int, cap: int, dim: int, value_dim: int, dtype=np.float32, keys=None, values=None,
                 offset: int = 0) -> StepOut:
        """ids, clusters and counts for n members of ``cap`` rows; keys and values given (views
        of the caller's buffers) or new (n, cap, dim) and (n, cap, value_dim) zeros of ``dtype``."""
        if keys is None:
            keys = np.zeros((n, cap, dim), dtype)
        if values is None:
            values = np.zeros((n, cap, value_dim), dtype)
        return cls(np.full((n, cap), -1, np.int64), np.full((n, cap), -1, np.int32), np.zeros(n, np.uint64),
                   keys, values, offset)

    @property
    def cap(self) -> int:
        return self.ids.shape[1]

    def member(self, i: int) -> Retrieved:
        """Member i's entries as a ``Retrieved`` (views, no copy; the estimate stays in
        ``lse``, ``est_values`` and ``est_entries``)."""
        m = int(self.counts[i])
        o = self.offset
        return Retrieved(self.ids[i, :m], self.keys[i, o:o + m], self.values[i, o:o + m], self.clusters[i, :m],
                         unreadable=self.unreadable.get(i, _no_ids()))


class _Gate:
    """Lets many calls run at once and ``close`` wait for them (GIL is released inside)."""

    def __init__(self):
        self._cv = threading.Condition()
        self._active = 0
        self.closed = False

    def __enter__(self):
        with self._cv:
            if self.closed:
                raise StoreClosedError("the store is closed")
            self._active += 1

    def __exit__(self, *exc):
        with self._cv:
            self._active -= 1
            if self._active == 0:
                self._cv.notify_all()

    def close(self):
        with self._cv:
            self.closed = True
            while self._active:
                self._cv.wait()

    def reopen(self):
        with self._cv:
            self.closed = False


class Collection:
    """A named set of (key, value) entries with stable int64 ids 0, 1, 2, … in insertion order."""

    def __init__(self, store: Store, name: str, params: dict, handle):
        self._store = store
        self.name = name
        self.params = params
        self._h = handle
        self.dim: int = params["dim"]
        self.value_dim: int = params["value_dim"]
        self.dtype = np.dtype(params["dtype"])
        self.metric: str = params["metric"]
        self.policy: str = params["policy"]

    def __repr__(self):
        return (f"Collection({self.name!r}, dim={self.dim}, value_dim={self.value_dim}, "
                f"dtype={self.dtype.name!r}, metric={self.metric!r}, policy={self.policy!r}, "
                f"entries={len(self) if not self._store.closed else '?'})")

    def __len__(self) -> int:
        with self._store._gate:
            return int(self._h.count())

    def _corrupt_mode(self, on_corrupt) -> int:
        return _engine.ON_CORRUPT[self._store.on_corrupt if on_corrupt is None else on_corrupt_arg(on_corrupt)]

    def _unreadable(self) -> np.ndarray:
        """The ids of this collection the thread's last engine read met damaged."""
        u = _engine.last_unreadable()
        return u[u[:, 0] == self.params["no"], 1].copy()

    def _read(self, call, *args):
        """An engine read; a CorruptionError it raises gets ``collection`` (this name) and
        ``ids`` (the damaged ids it met, int64)."""
        try:
            return call(*args)
        except CorruptionError as e:
            u = getattr(e, "unreadable", None)
            e.collection = self.name
            e.ids = u[u[:, 0] == self.params["no"], 1].copy() if u is not None else _no_ids()
            raise

    def add(self, keys, values=None) -> np.ndarray:
        """Appends entries; returns their ids (int64, consecutive). Nothing is added on error."""
        k, _ = _as_matrix("keys", keys, self.dim, self.dtype)
        if values is None:
            if self.value_dim:
                raise InvalidArgumentError(
                    f"values: shape (n, {self.value_dim}) expected, got None; collection {self.name!r} keeps a "
                    f"value of {self.value_dim} per key (value_dim defaults to dim): to store keys alone, "
                    "create it with value_dim=0")
            v = np.empty((k.shape[0], 0), dtype=self.dtype)
        else:
            if self.value_dim:
                v, _ = _as_matrix("values", values, self.value_dim, self.dtype)
            else:
                try:
                    size = np.asarray(values).size
                except Exception:  # ragged lists and the like
                    size = -1
                if size != 0:
                    raise InvalidArgumentError(f"values: collection {self.name!r} has value_dim=0: "
                                               "None or an empty array expected")
                v = np.empty((k.shape[0], 0), dtype=self.dtype)
            if v.shape[0] != k.shape[0]:
                raise InvalidArgumentError(
                    f"values: one row per key expected ({k.shape[0]}), got {v.shape[0]}")
        with self._store._gate:
            try:
                first = self._h.add(k, v)
            except BudgetError as e:
                raise self._store._budget_error(e, self, k.shape[0]) from None
        return np.arange(first, first + k.shape[0], dtype=np.int64)

    def search(self, queries, k: int = 10, nprobe: int | None = None,
               on_corrupt: str | None = None) -> SearchHits:
        """Approximate top-k per query: representatives are scored, the ``nprobe`` best
        clusters are read and their entries rescored exactly. A 1-d query gives 1-d rows.
        ``on_corrupt`` ("raise" or "skip"; default the store's): what a damaged entry does,
        see :func:`kvtier.open`."""
        q, one = _as_matrix("queries", queries, self.dim, np.float32)
        k = _positive_int("k", k, 1, 1 << 20)
        if nprobe is None:
            nprobe = self.params.get("nprobe") or 0
        nprobe = _positive_int("nprobe", nprobe, 0, 2**31 - 1)
        mode = self._corrupt_mode(on_corrupt)
        if nprobe == 0:
            nprobe = self.default_nprobe()
        with self._store._gate:
            try:
                ids, scores = self._read(self._h.search, q, k, nprobe, mode)
            except BudgetError as e:
                raise self._store._budget_error(e, self, 0) from None
            bad = self._unreadable()
        return SearchHits(ids[0], scores[0], bad) if one else SearchHits(ids, scores, bad)

    def default_nprobe(self) -> int:
        """The clusters ``search`` reads per query when not told (``nprobe=None`` here and at
        creation): chosen from the collection so that recall@10 reaches 0.9, by
        :meth:`tune_nprobe` on sample queries. A collection of at most ``EXACT_ENTRIES``
        entries is searched exactly (every cluster: the reads are few). The choice is kept
        (committed with the collection's parameters at the next flush) and made again when the
        cluster count has changed 1.5-fold or the entries 2-fold since; in between it scales
        with the cluster count. Under a DRAM budget too tight to measure, a quarter of the
        clusters (``FALLBACK_SHARE``), not kept."""
        if self.policy == "none":
            return 1  # exact top-k: nothing to probe
        with self._store._gate:
            st = self._h.stats()
        n, clusters = int(st["entries"]), int(st["clusters"])
        if n <= EXACT_ENTRIES or clusters <= 8:
            return max(clusters, 1)
        auto = self.params.get("nprobe_auto")
        if not auto or not (auto["clusters"] / 1.5 <= clusters <= auto["clusters"] * 1.5
                            and auto["entries"] / 2 <= n <= auto["entries"] * 2):
            try:
                auto = self.tune_nprobe()
            except BudgetError:  # no room beside the index to measure: a quarter of the clusters
                return max(1, math.ceil(clusters * FALLBACK_SHARE))
        return max(1, min(clusters, math.ceil(auto["nprobe"] * clusters / auto["clusters"])))

    def tune_nprobe(self, queries=None, k: int = 10, target: float = TUNE_TARGET, keep: bool = True) -> dict:
        """Measures, in one pass over the collection, the fewest clusters a search must read
        for ``queries`` to find ``target`` of their true top-``k`` (the engine ranks each true
        neighbour's cluster as search would): returns ``{"nprobe", "recall", "clusters",
        "entries", "queries"}`` and, with ``keep``, makes it the default (:meth:`default_nprobe`).
        ``queries`` default: ``TUNE_QUERIES`` drawn from a Gaussian fitted to a sample of the
        stored keys (mean and spread per dimension), which is exactly random vectors' query
        distribution; give real queries when they differ from the keys (an LLM's queries do:
        their own recall is then what is measured)."""
        if not (isinstance(target, (int, float)) and 0 < target <= 1):
            raise InvalidArgumentError(f"target: a recall in (0, 1] expected, got {target!r}")
        k = _positive_int("k", k, 1, 1 << 20)
        if queries is None:
            q = self._tune_queries()
        else:
            q, _ = _as_matrix("queries", queries, self.dim, np.float32)
        with self._store._gate:
            st = self._h.stats()
            if q is None or self.policy == "none":
                nprobe, recall = max(int(st["clusters"]), 1), 1.0
            else:
                nprobe, recall = self._read(self._h.tune_nprobe, q, k, float(target))
        out = {"nprobe": int(nprobe), "recall": float(recall), "clusters": max(int(st["clusters"]), 1),
               "entries": int(st["entries"]), "queries": 0 if q is None else int(q.shape[0]), "k": k,
               "target": float(target)}
        if keep:
            self.params["nprobe_auto"] = out
        return out

    def _tune_queries(self) -> np.ndarray | None:
        """Sample queries for tune_nprobe: a Gaussian fitted to up to 4096 stored keys."""
        n = len(self)
        if not n:
            return None
        rng = np.random.default_rng(int(self.params.get("seed", 0)) + n)
        ids = np.sort(rng.choice(n, size=min(n, 4096), replace=False))
        keys = self.get(ids, on_corrupt="skip")[0].astype(np.float32)
        if not len(keys):
            return None
        mean, std = keys.mean(axis=0), keys.std(axis=0)
        return (mean + rng.standard_normal((TUNE_QUERIES, self.dim)) * std).astype(np.float32)

    def _entries(self, budget) -> int:
        return budget_entries(budget_arg(budget), self._h.count())

    def retrieve(self, query_group, budget: int | float = 0.1, estimate: bool | int | None = False,
                 scale: float | None = None, variance: bool = False,
                 on_corrupt: str | None = None) -> Retrieved:
        """Whole clusters, best first by the group's max score, whose sizes fit in ``budget``
        entries: an int count, or a float fraction of ``len(self)`` in (0, 1].

        ``estimate`` also returns, per query row, an estimate of the attention the clusters
        not fetched would receive, from the sizes, mean keys and value sums kept in DRAM (no
        extra read): False (default) none; an int M the next M clusters of the ranking not
        fetched; True or None all of them. Each cluster j weighs n_j exp(scale q.mean_j)
        with value mean vsum_j / n_j; ``scale`` defaults to 1/sqrt(dim) (the attention
        scale). The collection must keep value sums (``value_sums=True``). ``variance``
        takes each cluster's keys as Gaussian around the mean (its mass gains
        scale^2/2 sum_k q_k^2 var_k: per-dimension variances when the collection keeps them,
        ``score_temp`` > 0, else the mean variance) instead of all equal to the mean.
        The result's ``est_*`` fields carry it. Policy ``none`` has no clusters and
        estimates nothing (est_lse -inf). ``on_corrupt`` ("raise" or "skip"; default the
        store's): what a damaged entry does, see :func:`kvtier.open`; skipped ids are in the
        result's ``unreadable``."""
        q, _ = _as_matrix("query_group", query_group, self.dim, np.float32)
        mode = self._corrupt_mode(on_corrupt)
        if estimate is False:
            if scale is not None or variance:
                raise InvalidArgumentError("scale, variance: only meaningful with estimate=")
            with self._store._gate:
                try:
                    ids, keys, values, clusters = self._read(self._h.retrieve, q, self._entries(budget), mode)
                except BudgetError as e:
                    raise self._store._budget_error(e, self, 0) from None
                bad = self._unreadable()
            return Retrieved(ids, keys, values, clusters, unreadable=bad)
        m, s, v = _estimate_args(estimate, scale, variance)
        self._check_value_sums()
        with self._store._gate:
            try:
                ids, keys, values, clusters, lse, ev, ecl, ent = self._read(
                    self._h.retrieve_est, q, self._entries(budget), m, s, v, mode)
            except BudgetError as e:
                raise self._store._budget_error(e, self, 0) from None
            bad = self._unreadable()
        return Retrieved(ids, keys, values, clusters, lse, ev, ecl, ent, bad)

    def _check_value_sums(self) -> None:
        if not self.params.get("value_sums") and self.policy != "none":
            raise InvalidArgumentError(
                f"estimate: collection {self.name!r} keeps no value sums (create it with value_sums=True)")

    def prefetch(self, query_group, budget: int | float = 0.1) -> int:
        """Starts reading in the background what ``retrieve(query_group, budget)`` would read
        from flash, and returns at once (the number of clusters queued). A later call on this
        collection waits only for what is still loading; results are exactly retrieve's."""
        q, _ = _as_matrix("query_group", query_group, self.dim, np.float32)
        with self._store._gate:
            return int(self._h.prefetch(q, self._entries(budget)))

    def get(self, ids, on_corrupt: str | None = None) -> Entries:
        """Keys and values of the given ids, in the given order: the pair ``(keys, values)``
        (an :class:`Entries`, which also has ``.ids`` and ``.unreadable``). ``on_corrupt``
        ("raise" or "skip"; default the store's): with "skip" the rows of damaged entries are
        left out, ``.ids`` says which ids the rows hold and ``.unreadable`` which were left
        out."""
        try:
            a = np.asarray(ids)
        except Exception as e:  # ragged lists and the like
            raise InvalidArgumentError(f"ids: a 1-d array of integer ids expected ({e})") from None
        if a.size == 0 and a.ndim <= 1 and a.dtype.kind in "iuf":  # [] is float64 to numpy
            a = a.astype(np.int64)
        if a.dtype.kind not in "iu" or a.ndim > 1:
            raise InvalidArgumentError(f"ids: a 1-d array of integer ids expected, got dtype {a.dtype} shape {a.shape}")
        a = np.ascontiguousarray(a.reshape(-1), dtype=np.int64)
        mode = self._corrupt_mode(on_corrupt)
        with self._store._gate:
            n = self._h.count()
            if a.size and (a.min() < 0 or a.max() >= n):
                missing = int(a[(a < 0) | (a >= n)][0])
                raise NotFoundError(f"ids: id {missing} is not in collection {self.name!r} (valid ids are 0..{n - 1})")
            keys, values = self._read(self._h.get, a, mode)
            bad = self._unreadable() if a.size else _no_ids()
        if bad.size:
            ok = ~np.isin(a, bad)
            return Entries(keys[ok], values[ok], a[ok], bad)
        return Entries(keys, values, a, bad)

    def verify(self) -> dict:
        """Reads every record of this collection from its data file (not the cache) and checks
        it, and the file's header page: counts, ``header_damaged``, and ``unreadable`` (the
        damaged ids, int64 sorted). ``kvtier.verify(path)`` does every collection of a store."""
        with self._store._gate:
            return self._h.verify()

    def stats(self) -> dict:
        """Entries, clusters, mean/max cluster size, mean variance, pools, cached clusters."""
        with self._store._gate:
            s = self._h.stats()
        s["name"] = self.name
        s["policy"] = self.policy
        return s

    def cluster_sizes(self) -> np.ndarray:
        with self._store._gate:
            return self._h.cluster_sizes()

    def value_sums(self) -> tuple[np.ndarray, np.ndarray]:
        """Every cluster slot's entry count and float32 value sum, by the cluster number
        ``Retrieved.clusters`` reports (free slots: 0 and zeros): the summaries
        ``retrieve(..., estimate=)`` estimates from. Raises InvalidArgumentError for a
        collection that keeps none (policy ``none``, ``value_dim`` 0)."""
        with self._store._gate:
            return self._h.value_sums()

    @property
    def parked(self) -> bool:
        """True while the collection sits in the swap area (see :meth:`Store.park`)."""
        with self._store._gate:
            return self._h.parked




class Store:
    """An open store: a directory with an LMDB catalog and one data file per collection."""

    def __init__(self, path: str | os.PathLike, dram_budget=DEFAULT_DRAM_BUDGET, device=None,
                 direct_io: bool | str = "auto", merge_gap=None, cache_policy: str = "cluster",
                 write_buffer=None, on_corrupt: str = "raise", create: bool | None = None):
        path = os.fspath(path)
        self.on_corrupt = on_corrupt_arg(on_corrupt)
        budget = parse_size(dram_budget, "dram_budget")
        if budget < MIN_DRAM_BUDGET:
            raise InvalidArgumentError(
                f"dram_budget: at least {MIN_DRAM_BUDGET // 1024}KiB expected, got {budget} bytes")
        self.device, dev = resolve_device(device)
        if direct_io not in _DIRECT:
            raise InvalidArgumentError(f"direct_io: True, False or 'auto' expected, got {direct_io!r}")
        if merge_gap is None:
            # the device's knee: below it, reading a gap costs less than one more request
            merge_gap = int(self.device.knee_bytes) if self.device and self.device.iops else 4096
        merge_gap = parse_size(merge_gap, "merge_gap")
        if cache_policy not in CACHE_POLICIES:
            raise InvalidArgumentError(f"cache_policy: one of {sorted(CACHE_POLICIES)} expected, got {cache_policy!r}")
        self.cache_policy = cache_policy
        # a thirty-second of the budget: its DRAM comes out of the cache, so it is kept small
        # (kvtier.bench.write_buffer: the tail evictions it saves against the cache hits it costs)
        write_buffer = budget // 32 if write_buffer is None else parse_size(write_buffer, "write_buffer")
        if write_buffer > budget // 2:
            raise InvalidArgumentError(f"write_buffer: at most half the dram_budget ({budget // 2} bytes) expected, "
                                       f"got {write_buffer} bytes")
        self.write_buffer = write_buffer
        _prepare_dir(path, create)
        self.path = path
        self._lock = StoreLock(path)
        try:
            self._catalog = Catalog(path)
            self._engine = _engine.Engine(path, budget, dev, _DIRECT[direct_io], merge_gap,
                                          CACHE_POLICIES[cache_policy], write_buffer)
        except BaseException:
            self._lock.release()
            raise
        self._gate = _Gate()
        self._meta = threading.Lock()  # collection table and flush
        self._colls: dict[str, Collection] = {}
        self._committed = self._catalog.collections()
        self._next_no = self._catalog.next_no()

    # -- context manager --------------------------------------------------------------------
    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def closed(self) -> bool:
        return self._gate.closed

    def __repr__(self):
        return f"Store({self.path!r}, {'closed' if self.closed else f'{len(self.collections())} collections'})"

    # -- collections ------------------------------------------------------------------------
    def collections(self) -> list[str]:
        """Names of the committed and the open collections."""
        with self._meta:
            return sorted(set(self._committed) | set(self._colls))

    def collection(self, name: str, dim: int | None = None, value_dim: int | None = None,
                   dtype: str | None = None, metric: str | None = None, policy: str | None = None,
                   init_cluster_size: int = 32, max_cluster_size: int = 64, kmeans_iters: int = 10,
                   seed: int = 0, nprobe: int | None = None, tau: float | None = None,
                   tau_factor: float = 1.0, pending_budget: int = 16, local_window: int = 64,
                   local_cluster_size: int = 16, score_temp: float = 0.0,
                   colocate_after: int = 32, layout: str | None = None,
                   value_sums: bool | None = None) -> Collection:
        """Creates or reopens a collection. Reopening checks that what is given matches.

        ``dim`` key dimension; ``value_dim`` value dimension (default: ``dim``); ``dtype``
        float16 (default) or float32, for keys and values; ``metric`` ip (default) or l2;
        ``policy`` how new entries
        join clusters; ``init_cluster_size`` target size of the first batch's clusters;
        ``max_cluster_size`` sets the pool size (two clusters of this size share a pool);
        ``nprobe`` default clusters probed by search; ``layout`` where records live on flash:
        ``colocated`` (default: each cluster contiguous in dual-head pools, and clusters often
        retrieved together rewritten next to each other after ``colocate_after`` retrieves),
        ``clustered`` (the pools without co-location) or ``token`` (one log in insertion
        order, a baseline: a cluster is read as runs of consecutive ids). Policy ``none``
        keeps token order whatever the layout. ``value_sums`` (default False) keeps each
        cluster's value sum in DRAM (value_dim float32 per cluster, within the DRAM budget),
        which ``retrieve(..., estimate=)`` needs.
        """
        if not isinstance(name, str) or not name or "/" in name or len(name.encode()) > 400:
            raise InvalidArgumentError(
                f"name: a non-empty string without '/' (at most 400 bytes) expected, got {name!r}")
        given = {"dim": dim, "value_dim": value_dim, "dtype": dtype, "metric": metric, "policy": policy,
                 "layout": layout, "value_sums": value_sums}
        with self._gate, self._meta:
            if name in self._colls:
                coll = self._colls[name]
                self._check_same(name, coll.params, given)
                return coll
            if name in self._committed:
                params = self._committed[name]
                self._check_same(name, params, given)
                blob, chunks = self._catalog.load(params["no"])
                try:
                    h = self._engine.open_coll(params["no"], params, blob, chunks, _engine.ON_CORRUPT[self.on_corrupt])
                except CorruptionError as e:
                    e.collection = name
                    raise
            else:
                params = new_params(dim, value_dim, dtype, metric, policy, init_cluster_size,
                                          max_cluster_size, kmeans_iters, seed, nprobe, tau,
                                          tau_factor, pending_budget, local_window,
                                          local_cluster_size, score_temp, colocate_after, layout, value_sums)
                params["no"], params["name"] = self._next_no, name
                h = self._engine.create(params["no"], params)
                self._next_no += 1
            coll = Collection(self, name, params, h)
            self._colls[name] = coll
            return coll

    @staticmethod
    def _check_same(name, params, given):
        for key, v in given.items():
            if v is None:
                continue
            if key == "dtype":
                with contextlib.suppress(TypeError):
                    v = np.dtype(v).name
            if v != params.get(key, {"layout": "colocated", "value_sums": False}.get(key)):
                raise InvalidArgumentError(
                    f"{key}: collection {name!r} exists with {key}={params.get(key, False)!r}, got {v!r}")

    # -- durability -------------------------------------------------------------------------
    def flush(self) -> None:
        """Makes everything added so far durable: data files synced, then one catalog commit."""
        with self._gate, self._meta:
            self._flush_locked()

    def _flush_locked(self):
        records, cps = [], []
        for name, coll in self._colls.items():
            if coll._h.parked and name in self._committed and not coll._h.changed():
                continue  # committed as it stands: left parked, no swap-in
            cp = coll._h.checkpoint()
            cps.append((coll, cp))
            records.append((name, coll.params, cp.dir, cp.chunks))
        self._catalog.commit(self._next_no, records)
        for coll, cp in cps:
            coll._h.committed(cp)
            self._committed[coll.name] = coll.params

    def close(self) -> None:
        """Flushes and closes. Further calls raise StoreClosedError; closing twice is fine. If
        the flush fails, the error is raised and the store stays open (nothing is lost)."""
        if self._gate.closed:
            return
        with self._meta:
            if self._gate.closed:
                return
            self._gate.close()  # waits for calls in flight, refuses new ones
            try:
                self._flush_locked()
            except BaseException:
                # nothing is lost: the store stays open so that the caller can fix the cause
                # (disk space, budget) and close again
                self._gate.reopen()
                raise
            self._engine.close()
            self._catalog.close()
            self._lock.release()

    def _budget_error(self, e: BudgetError, coll: Collection, adding: int) -> BudgetError:
        """The engine's BudgetError, with the minimum budget the store's collections need
        (kvtier.estimate at their sizes, ``coll`` counting the ``adding`` entries)."""
        from kvtier.budget import PARAMS, estimate
        index, buffers = 0, 0
        try:
            for c in list(self._colls.values()):
                p = {k: v for k, v in c.params.items() if k in PARAMS}
                n = int(c._h.count()) + (adding if c is coll else 0)
                est = estimate(n, c.dim, c.value_dim, c.dtype.name, c.policy, write_buffer=0, **p)
                index += est.index
                buffers = max(buffers, est.buffers)
        except Exception:  # the hint must not hide the error itself
            return e
        need = index + buffers
        hint = (f" The minimum for this store's collections is {need:,} bytes (kvtier.estimate: index "
                f"{index:,} + buffers {buffers:,}); the dram_budget is {self._engine.stats()['dram_budget']:,}.")
        if need <= self._engine.stats()["dram_budget"]:
            hint += (" The index fits: lower write_buffer or pending_budget, add in smaller batches, "
                     "or raise dram_budget.")
        else:
            hint += " Raise dram_budget, or use larger clusters (init_cluster_size, max_cluster_size)."
        return type(e)(str(e) + hint, e.code)

    # -- introspection ----------------------------------------------------------------------
    def stats(self) -> Stats:
        """DRAM (bytes, budget, peak), cache and I/O counters, the device model's time: a dict of
        flat keys, also grouped (``.engine``, ``.cache``, ``.io``; ``print()`` shows the groups)."""
        with self._gate:
            s: dict[str, Any] = dict(self._engine.stats())
        s["device"] = self.device.name if self.device else None
        s["cache_policy"] = self.cache_policy
        s["simd"] = _engine.simd_kernel()
        reads = s["read_ops"]
        s["mean_read_entries"] = s["read_entries"] / reads if reads else 0.0
        # a read that crossed gaps counts once per gap-free piece: the contiguity of the layout
        # itself, apart from merging across gaps (merge_gap)
        pieces = s["contiguous_reads"]
        s["mean_contiguous_entries"] = s["read_entries"] / pieces if pieces else 0.0
        return Stats(s)

    def prefetch(self, requests) -> int:
        """Prefetch for a group of collections (for an LLM: the KV heads of one layer):
        ``requests`` is an iterable of ``(collection, query_group, budget)``."""
        total = 0
        for coll, query_group, budget in requests:
            if not isinstance(coll, Collection) or coll._store is not self:
                raise InvalidArgumentError(
                    f"requests: (collection of this store, query_group, budget) expected, got {coll!r}")
            total += coll.prefetch(query_group, budget)
        return total

    def retrieve_many(self, requests, out: RetrievedMany | None = None,
                      on_corrupt: str | None = None) -> RetrievedMany:
        """``retrieve`` for a group of collections of one shape (for an LLM: the KV heads of
        one layer) in one engine call: ``requests`` is an iterable of ``(collection,
        query_group, budget)``, every query group with the same number of queries. Results go
        into ``out`` when its arrays are large enough (at least the largest budget in rows per
        member), otherwise into new arrays; see ``RetrievedMany``. ``on_corrupt`` ("raise" or
        "skip"; default the store's): see :func:`kvtier.open`."""
        mode = _engine.ON_CORRUPT[self.on_corrupt if on_corrupt is None else on_corrupt_arg(on_corrupt)]
        try:
            reqs = list(requests)
        except TypeError:
            raise InvalidArgumentError(
                f"requests: an iterable of (collection, query_group, budget) expected, got {requests!r}") from None
        if not reqs:
            raise InvalidArgumentError("requests: at least one (collection, query_group, budget) expected")
        for r in reqs:
            if not (isinstance(r, tuple) and len(r) == 3):
                raise InvalidArgumentError(
                    f"requests: (collection of this store, query_group, budget) expected, got {r!r}")
        colls = self._group([r[0] for r in reqs], "retrieve_many", arg="requests")
        qs: list[np.ndarray] = []
        c0 = colls[0]
        for c in colls:
            if (c.dim, c._h.value_dim, c._h.dtype) != (c0.dim, c0._h.value_dim, c0._h.dtype):
                raise InvalidArgumentError("requests: collections of one dim, value_dim and dtype expected; "
                                           f"{c.name!r} differs from {c0.name!r}")
        for _, qg, _ in reqs:
            q, _ = _as_matrix("query_group", qg, c0.dim, np.float32)
            if qs and q.shape[0] != qs[0].shape[0]:
                raise InvalidArgumentError(f"query_group: {qs[0].shape[0]} queries per collection expected "
                                           f"(as the first request), got {q.shape[0]}")
            qs.append(q)
        n, dt = len(colls), c0._h.dtype
        with self._gate:
            b = np.array([c._entries(r[2]) for c, r in zip(colls, reqs, strict=True)], dtype=np.uint64)
            cap = int(b.max())
            if out is not None:
                if not isinstance(out, RetrievedMany):
                    raise InvalidArgumentError(f"out: a RetrievedMany expected, got {out!r}")
                ok = (len(out.counts) == n and out.ids.shape[1] >= cap and out.keys.shape[2:] == (c0.dim,)
                      and out.values.shape[2:] == (c0._h.value_dim,) and out.keys.dtype == dt)
                if not ok:
                    out = None
            if out is None:
                cap = max(cap, 1)
                out = RetrievedMany(np.empty((n, cap), np.int64), np.empty((n, cap, c0.dim), dt),
                                    np.empty((n, cap, c0._h.value_dim), dt), np.empty((n, cap), np.int32),
                                    np.empty(n, np.uint64))
            try:
                self._engine.retrieve_batch([c._h for c in colls], np.stack(qs), b, out.ids, out.keys,
                                            out.values, out.clusters, out.counts, mode)
            except CorruptionError as e:
                u = getattr(e, "unreadable", None)
                if u is not None and len(u):
                    c = next(c for c in colls if c.params["no"] == u[0, 0])
                    e.collection, e.ids = c.name, u[u[:, 0] == u[0, 0], 1].copy()
                raise
            u = _engine.last_unreadable()
        out.unreadable.clear()
        for i, c in enumerate(colls):
            bad = u[u[:, 0] == c.params["no"], 1]
            if bad.size:
                out.unreadable[i] = bad.copy()
        return out

    def step_layer(self, retrieve=None, out: StepOut | None = None, *, add=None, prefetch=None,
                   estimate: bool | int | None = False, scale: float | None = None, variance: bool = False,
                   on_corrupt: str | None = None) -> tuple[StepOut | None, int]:
        """What a decoding step does with a layer's collections, in one engine call (the GIL
        released): ``add`` = (collections, keys (n, rows, dim), values (n, rows, value_dim)):
        each collection appends its rows (for an LLM: the tokens that left the previous
        layer's window); ``prefetch`` = (collections, query groups (n, nq, dim), budget): as
        ``Store.prefetch`` (the next layer's); ``retrieve`` = (collections, query groups
        (n, nq, dim), budget): as ``retrieve_many`` (``retrieve`` with ``estimate``,
        ``scale``, ``variance``) into ``out`` (a ``StepOut`` whose cap is at least the
        budget in entries; None: a new one, float32 keys and values). The parts run in that
        order, each with the result of the separate call; any may be None. Returns (out or
        None without a retrieve, the clusters the prefetch queued). A refused call changes
        nothing stored."""
        mode = _engine.ON_CORRUPT[self.on_corrupt if on_corrupt is None else on_corrupt_arg(on_corrupt)]
        a_colls, a_k, a_v = self._step_add(add)
        p_colls, p_q, p_b = self._step_group(prefetch, "prefetch")
        r_colls, r_q, r_b = self._step_group(retrieve, "retrieve")
        est = None
        if estimate is not False:
            est = _estimate_args(estimate, scale, variance)
            for c in r_colls:
                c._check_value_sums()
        elif scale is not None or variance:
            raise InvalidArgumentError("scale, variance: only meaningful with estimate=")
        res: StepOut | None = None
        with self._gate:
            pb = np.array([c._entries(p_b) for c in p_colls], np.uint64)
            rb = np.array([c._entries(r_b) for c in r_colls], np.uint64)
            if r_colls:
                res = self._step_out(out, r_colls, int(rb.max()), r_q.shape[1], est is not None)
            ids = clusters = counts = keys = values = lse = est_values = est_entries = None
            offset = 0
            if res is not None:
                ids, clusters, counts, keys, values, offset = (res.ids, res.clusters, res.counts, res.keys,
                                                               res.values, res.offset)
                if est is not None:
                    lse, est_values, est_entries = res.lse, res.est_values, res.est_entries
            try:
                queued = self._engine.step_batch(
                    [c._h for c in a_colls], a_k, a_v, [c._h for c in p_colls], p_q, pb, [c._h for c in r_colls],
                    r_q, rb, ids, clusters, counts, keys, values, offset, est, lse, est_values, est_entries,
                    on_corrupt=mode)
            except BudgetError as e:
                c0 = (a_colls or r_colls or p_colls)[0]
                raise self._budget_error(e, c0, a_k.shape[1] if a_colls else 0) from None
            except CorruptionError as e:
                u = getattr(e, "unreadable", None)
                if u is not None and len(u):
                    c = next((c for c in r_colls if c.params["no"] == u[0, 0]), None)
                    e.collection, e.ids = (c.name if c else None), u[u[:, 0] == u[0, 0], 1].copy()
                raise
            u = _engine.last_unreadable()
        if res is None:
            return None, int(queued)
        res.unreadable.clear()
        for i, c in enumerate(r_colls):
            bad = u[u[:, 0] == c.params["no"], 1]
            if bad.size:
                res.unreadable[i] = bad.copy()
        return res, int(queued)

    def _step_add(self, add) -> tuple[list, Any, Any]:
        if add is None:
            return [], None, None
        if not (isinstance(add, tuple) and len(add) == 3):
            raise InvalidArgumentError(f"add: (collections, keys, values) expected, got {add!r}")
        colls = self._group(add[0], "step_layer", arg="add")
        c0 = self._one_shape(colls, "add")
        k, v = np.asarray(add[1]), np.asarray(add[2])
        n = len(colls)
        if k.ndim != 3 or k.shape[0] != n or k.shape[2] != c0.dim:
            raise InvalidArgumentError(f"add: keys of shape ({n}, rows, {c0.dim}) expected, got {k.shape}")
        if v.shape != (n, k.shape[1], c0.value_dim):
            raise InvalidArgumentError(
                f"add: values of shape ({n}, {k.shape[1]}, {c0.value_dim}) expected, got {v.shape}")
        if k.shape[1] == 0:
            raise InvalidArgumentError("add: at least one row per collection expected")
        return colls, np.ascontiguousarray(k, c0.dtype), np.ascontiguousarray(v, c0.dtype)

    def _step_group(self, part, what: str) -> tuple[list, Any, Any]:
        if part is None:
            return [], None, None
        if not (isinstance(part, tuple) and len(part) == 3):
            raise InvalidArgumentError(f"{what}: (collections, query groups, budget) expected, got {part!r}")
        colls = self._group(part[0], "step_layer", arg=what)
        c0 = self._one_shape(colls, what)
        q = np.asarray(part[1])
        if q.ndim != 3 or q.shape[0] != len(colls) or q.shape[2] != c0.dim or q.shape[1] == 0:
            raise InvalidArgumentError(
                f"{what}: query groups of shape ({len(colls)}, queries >= 1, {c0.dim}) expected, got {q.shape}")
        if not np.isfinite(q).all():
            raise InvalidArgumentError(f"{what}: query groups must be finite")
        budget_arg(part[2])
        return colls, np.ascontiguousarray(q, np.float32), part[2]

    def _one_shape(self, colls: list, what: str):
        if not colls:
            raise InvalidArgumentError(f"{what}: at least one collection expected")
        c0 = colls[0]
        for c in colls:
            if (c.dim, c._h.value_dim, c._h.dtype) != (c0.dim, c0._h.value_dim, c0._h.dtype):
                raise InvalidArgumentError(f"{what}: collections of one dim, value_dim and dtype expected; "
                                           f"{c.name!r} differs from {c0.name!r}")
        return c0

    def _step_out(self, out, colls: list, cap: int, nq: int, est: bool) -> StepOut:
        c0, n = colls[0], len(colls)
        if out is None:
            out = StepOut.allocate(n, max(cap, 1), c0.dim, c0.value_dim)
        if not isinstance(out, StepOut):
            raise InvalidArgumentError(f"out: a StepOut expected, got {out!r}")
        rows = out.offset + out.cap
        ok = (out.ids.shape == (n, out.cap) and out.clusters.shape == out.ids.shape and out.counts.shape == (n,)
              and out.cap >= cap and out.keys.shape[0] == n and out.keys.shape[1] >= rows
              and out.keys.shape[2:] == (c0.dim,) and out.values.shape == (*out.keys.shape[:2], c0.value_dim)
              and out.keys.dtype in (np.float32, c0.dtype) and out.values.dtype == out.keys.dtype)
        if not ok:
            raise InvalidArgumentError(
                f"out: a StepOut for {n} collections with cap >= {cap} rows, keys (n, >= offset + cap, {c0.dim}) "
                f"and values (n, rows, {c0.value_dim}) of float32 or {c0.dtype} expected")
        if est and (out.lse is None or out.lse.shape != (n, nq)):
            out.lse, out.est_values = np.empty((n, nq), np.float32), np.empty((n, nq, c0.value_dim), np.float32)
            out.est_entries = np.empty(n, np.uint64)
        return out

    def _group(self, collections, what: str, arg: str = "collections") -> list:
        if isinstance(collections, Collection):
            collections = [collections]
        try:
            group = list(collections)
        except TypeError:
            raise InvalidArgumentError(
                f"{arg}: an iterable of collections of this store expected, got {collections!r}") from None
        for c in group:
            if not isinstance(c, Collection) or c._store is not self:
                raise InvalidArgumentError(f"{arg}: collections of this store expected in {what}, got {c!r}")
        if len({id(c) for c in group}) != len(group):
            raise InvalidArgumentError(f"{arg}: each collection at most once in {what}")
        return group

    def park(self, collections, keep_cache: bool = True) -> None:
        """Moves a group of collections (for an LLM: the KV heads of one layer) out of DRAM:
        their representatives, id maps and pending entries go to a swap area on flash, as
        one contiguous range per group, and their DRAM returns to the budget. With
        ``keep_cache`` (default) the clusters they used since they were last brought in go
        along and come back with them; their other cached clusters (clean copies of the data
        files) are dropped, all of them with ``keep_cache=False``. Results do not change:
        an operation on a parked collection brings it back first. Use :meth:`unpark` to
        bring a group back ahead of use."""
        if not isinstance(keep_cache, (bool, np.bool_)):
            raise InvalidArgumentError(f"keep_cache: True or False expected, got {keep_cache!r}")
        group = self._group(collections, "park")
        with self._gate:
            self._engine.park([c._h for c in group], keep_cache=bool(keep_cache))

    def unpark(self, collections, wait: bool = True) -> None:
        """Brings parked collections back with one sequential read per contiguous range.
        With ``wait=False`` the reads run on the loader threads and the call returns at
        once; an operation on a collection still loading waits for it."""
        group = self._group(collections, "unpark")
        with self._gate:
            self._engine.park([c._h for c in group], unpark=True, async_=not wait)

    def reset_io_stats(self) -> None:
        """Zeroes I/O and cache counters and restarts the DRAM peak from current use."""
        with self._gate:
            self._engine.reset_io_stats()

    def step(self) -> None:
        """Marks the end of a decoding step (every layer of the model has run once).

        The ``cluster`` cache policy measures how long a cluster stays hot in steps: a
        cluster that layer l used or updated keeps its place until layer l runs again, however
        many other layers read in between. Adapters call it once per generated token."""
        with self._gate:
            self._engine.step()

    def _inject_fault(self, op: str, nth: int, code: int) -> None:
        """Test hook: the nth next I/O of kind op ('r', 'w', 's') fails with code."""
        with self._gate:
            self._engine.inject_fault(op, nth, code)


def _prepare_dir(path: str, create: bool | None) -> None:
    """Where a store may be opened (see ``open``'s ``create``); makes the directory."""
    if create not in (None, True, False):
        raise InvalidArgumentError(f"create: None, True or False expected, got {create!r}")
    if os.path.exists(path) and not os.path.isdir(path):
        raise InvalidArgumentError(f"path: a directory expected, {path!r} is a file")
    is_store = os.path.isdir(os.path.join(path, "catalog"))
    if create is False and not is_store:
        raise NotFoundError(f"path: no kvtier store at {path!r} (create=False opens existing stores only)")
    if create is None and not is_store:
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise InvalidArgumentError(
                f"path: the parent directory {parent!r} does not exist; create it first, or pass create=True "
                "to make the whole tree")
        names = os.listdir(path) if os.path.isdir(path) else []
        if any(re.fullmatch(r"c\d+\.kvd", f) for f in names):
            raise CorruptionError(f"catalog: {path!r} holds kvtier data files but no catalog/: the catalog was lost")
        foreign = [f for f in names if f not in ("LOCK", "swap.kvs")]  # a store another process is making
        if foreign:
            raise InvalidArgumentError(
                f"path: {path!r} is a directory that is not a kvtier store (it has no catalog/ and holds "
                f"{len(foreign)} other entries, e.g. {sorted(foreign)[0]!r}); pass create=True to make a store in "
                "it anyway")
    os.makedirs(path, exist_ok=True)


def on_corrupt_arg(v: Any) -> str:
    if v not in ("raise", "skip"):
        raise InvalidArgumentError(f"on_corrupt: 'raise' or 'skip' expected, got {v!r}")
    return v


def open(path, dram_budget=DEFAULT_DRAM_BUDGET, device=None, direct_io="auto", merge_gap=None,
         cache_policy="cluster", write_buffer=None, on_corrupt="raise", create=None) -> Store:
    """Opens (creating if needed) the store at ``path``.

    ``create``: None (default) opens an existing store or makes a new one in a directory that
    does not exist yet (its parent must) or is empty, and refuses any other directory (it will
    not turn a directory holding other files into a store, nor make a missing parent tree);
    True makes the store wherever asked (parents included); False only opens an existing store
    (NotFoundError otherwise).

    ``dram_budget`` is a hard cap on what the engine holds in DRAM (bytes or "256MiB");
    ``device`` is None (real file, unthrottled), a profile name (ufs4.0, ufs3.1, emmc5.1,
    nvme), a :class:`DeviceProfile` or the path of a saved profile; ``direct_io`` True, False
    or "auto"; ``merge_gap`` (bytes) reads neighbouring extents of one retrieve as one request
    when the gap between them is at most this (default: the device's knee, else 4 KiB);
    ``cache_policy`` which cached clusters make room: ``cluster`` (default: clusters updated in
    the last few decoding steps keep a reserved share; then clusters their collection's latest
    retrieve did not read leave first; then the coolest, the most recently read first, which
    under decoding's layer cycle is the one needed last; mark steps with :meth:`Store.step`),
    ``lru`` or ``lfu``;
    ``write_buffer`` (bytes, default a thirty-second of the budget, 0 to turn off) is the DRAM
    shared by the collections' page-aligned write buffers: the clusters appended to most
    recently keep their newest entries in DRAM until a whole 4 KiB flash page can be written,
    so no page is programmed twice (``stats()["partial_page_writes"]`` counts those that are).
    ``on_corrupt`` is what a read does when a record it needs is damaged (fails its checksum,
    does not match the catalog, lies past the end of a truncated file): "raise" (default) a
    :class:`CorruptionError` whose ``ids`` and ``collection`` name the damaged entries; "skip"
    answer from the intact entries and name the others in the result's ``unreadable``
    (``search``, ``retrieve``, ``get``, ``retrieve_many`` take it per call too). With "skip"
    a collection whose data file header page is damaged opens (the catalog has its
    geometry). ``kvtier verify STORE`` checks every record.
    """
    return Store(path, dram_budget=dram_budget, device=device, direct_io=direct_io,
                 merge_gap=merge_gap, cache_policy=cache_policy, write_buffer=write_buffer,
                 on_corrupt=on_corrupt, create=create)
