# Typed stub of the Cython binding (kvtier/_engine.pyx).
from typing import Any, TypedDict

import numpy as np
from typing_extensions import disjoint_base

FORMAT_VERSION: int
LOC_CHUNK: int
POLICIES: dict[str, int]
CACHE_POLICIES: dict[str, int]
STORE_STAT_KEYS: tuple[str, ...]
COLL_STAT_KEYS: tuple[str, ...]

# ---- generated from engine_c/include/kvtier.h by scripts/gen_engine_stub.py: do not edit ----

class DramByUse(TypedDict):
    cache: int
    index: int
    pending: int
    buffers: int

class ReadBytesByCause(TypedDict):
    prefetch: int
    swap: int
    split: int
    relayout: int
    retrieve: int

class DramPeakByUse(TypedDict):
    index: int
    cache: int
    pending: int
    buffers: int

class StoreStats(TypedDict):
    dram_bytes: int
    dram_budget: int
    dram_peak_bytes: int
    cache_bytes: int
    dram_by_use: DramByUse
    cached_clusters: int
    cache_hits: int
    cache_misses: int
    evictions: int
    read_ops: int
    read_bytes: int
    read_entries: int
    contiguous_reads: int
    gap_bytes: int
    dead_bytes: int
    write_ops: int
    write_bytes: int
    sync_ops: int
    modeled_io_seconds: float
    direct_io: bool
    read_size_histogram: list[int]
    prefetch_issued: int
    prefetch_hits: int
    prefetch_evicted: int
    prefetch_read_bytes: int
    read_bytes_by_cause: ReadBytesByCause
    prefetch_errors: int
    io_wait_seconds: float
    parked_collections: int
    swap_outs: int
    swap_ins: int
    swap_demand_ins: int
    swap_pressure_outs: int
    swap_write_bytes: int
    swap_unchanged_bytes: int
    swap_read_bytes: int
    swap_file_bytes: int
    partial_page_writes: int
    write_buffer_entries: int
    write_buffer_evictions: int
    write_buffer_errors: int
    read_seconds: float
    read_size_seconds: list[float]
    read_size_bytes: list[int]
    dram_peak_by_use: DramPeakByUse
    dram_fixed_peak_bytes: int
    io_backend: str

class CollStats(TypedDict):
    entries: int
    clusters: int
    pools: int
    data_file_bytes: int
    mean_cluster_size: float
    max_cluster_size: int
    mean_variance: float
    cached_clusters: int
    tau: float
    splits: int
    unsplittable: int
    deferred_splits: int
    forced_loads: int
    pending_entries: int
    flagged_clusters: int
    split_read_bytes: int
    split_write_bytes: int
    split_errors: int
    split_skipped: int
    relayouts: int
    relayout_bytes: int
    relayout_read_bytes: int
    append_bytes: int
    naive_move_bytes: int
    parked: bool
    partial_page_writes: int
    write_buffer_entries: int
    write_buffer_evictions: int
    write_buffer_errors: int
    pending_flushes: int
    keys_on_flash: bool
    splits_variance: int
    splits_size: int
    splits_pending: int
    mean_fill: float
    damaged_reads: int
    header_damaged: bool
    dead_slots: int
    consolidations: int
    consolidate_bytes: int

# ---- end of generated code ----

def simd_kernel() -> str: ...
def strerror(code: int) -> str: ...
def budget_estimate(params: dict[str, Any], n: int, write_buffer: int, fetch: float) -> dict[str, Any]: ...
def last_unreadable() -> np.ndarray: ...

ON_CORRUPT: dict[str, int]

@disjoint_base
class Engine:
    path: str
    def __new__(cls, path: str, dram_budget: int, device: tuple, direct: int, merge_gap: int = 4096,
                cache_policy: int = 2, write_buffer: int = 0) -> Engine: ...
    def close(self) -> None: ...
    def stats(self) -> StoreStats: ...
    def reset_io_stats(self) -> None: ...
    def step(self) -> None: ...
    def retrieve_batch(self, colls: list[Coll], q: np.ndarray, budgets: np.ndarray, ids: np.ndarray,
                       keys: np.ndarray, values: np.ndarray, clusters: np.ndarray, counts: np.ndarray,
                       on_corrupt: int = 0) -> None: ...
    def step_batch(self, add_colls: list[Coll], add_keys: Any, add_values: Any, pf_colls: list[Coll], pf_q: Any,
                   pf_budgets: Any, colls: list[Coll], q: Any, budgets: Any, ids: Any, clusters: Any, counts: Any,
                   keys: Any, values: Any, offset: int = 0, est: tuple[int, float, int] | None = None,
                   lse: Any = None, est_values: Any = None, est_entries: Any = None, on_corrupt: int = 0) -> int: ...
    def inject_fault(self, op: str, nth: int, code: int) -> None: ...
    def park(self, colls: list[Coll], unpark: bool = False, async_: bool = False, keep_cache: bool = True) -> None: ...
    def create(self, no: int, params: dict[str, Any]) -> Coll: ...
    def open_coll(self, no: int, params: dict[str, Any], dir_blob: bytes, chunks: list[bytes],
                  on_corrupt: int = 0) -> Coll: ...

@disjoint_base
class Coll:
    dim: int
    value_dim: int
    dtype: np.dtype
    def count(self) -> int: ...
    def add(self, keys: np.ndarray, values: np.ndarray) -> int: ...
    def search(self, q: np.ndarray, k: int, nprobe: int, on_corrupt: int = 0) -> tuple[np.ndarray, np.ndarray]: ...
    def retrieve(self, q: np.ndarray, budget: int, on_corrupt: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]: ...
    def get(self, ids: np.ndarray, on_corrupt: int = 0) -> tuple[np.ndarray, np.ndarray]: ...
    def retrieve_est(self, q: np.ndarray, budget: int, clusters: int, scale: float, variance: int = 0,
                     on_corrupt: int = 0) -> tuple[
        np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, int]: ...
    def verify(self) -> dict[str, Any]: ...
    def tune_nprobe(self, q: np.ndarray, k: int, target: float) -> tuple[int, float]: ...
    def prefetch(self, q: np.ndarray, budget: int) -> int: ...
    def stats(self) -> CollStats: ...
    def cluster_sizes(self) -> np.ndarray: ...
    def value_sums(self) -> tuple[np.ndarray, np.ndarray]: ...
    def checkpoint(self) -> Checkpoint: ...
    def committed(self, cp: Checkpoint) -> None: ...
    @property
    def parked(self) -> bool: ...
    def changed(self) -> bool: ...

@disjoint_base
class Checkpoint:
    dir: bytes
    chunks: dict[int, bytes]
