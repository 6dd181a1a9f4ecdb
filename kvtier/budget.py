"""Know before you run: how much DRAM a collection needs (``kvtier.estimate``).

The numbers come from the engine (``kvt_estimate``), which sizes the same structures it
reserves against the budget, so they cannot drift from what ``stats()`` later accounts.

    >>> e = kvtier.estimate(49_152, dim=64, dtype="float16")
    >>> e.minimum, e.recommended          # bytes
    >>> print(e)                          # what each part is for
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from kvtier import _engine
from kvtier.config import MIN_DRAM_BUDGET, parse_size
from kvtier.errors import InvalidArgumentError
from kvtier.params import new_params, positive_int


@dataclass(frozen=True)
class Estimate:
    """DRAM a store needs for ``collections`` collections of ``n_entries`` entries each.

    ``minimum``: below it an operation raises :class:`kvtier.BudgetError`; at it the engine
    works with an empty cache and without write buffers. It is never below the 64 KiB
    ``kvtier.open`` accepts (``MIN_DRAM_BUDGET``), so ``open(path, dram_budget=e.minimum)``
    always opens. With ``groups`` > 1 the collections
    are used a group at a time (an LLM's layers, each a group of KV heads) and the engine
    pages idle groups out to the swap file when the budget is short (demand paging,
    ``stats()["swap_pressure_outs"]``), so the minimum holds one group's index, one more
    collection's image being brought in, and the buffers: not every collection's index.
    ``recommended``: room for the index to grow, the write buffers and pending entries, and a
    cache holding one retrieve of ``fetch`` x the entries of every collection. ``index`` is what stays resident per
    collection (directory, representatives, id map, pool table); ``keys`` the token-level
    policy's resident keys (``none`` scans them from flash when they do not fit);
    ``buffers`` the working memory of one add chunk or one cluster read; ``pending`` the
    write buffer and adaptive pending entries; ``cache`` the recommended cache."""

    n_entries: int
    collections: int
    groups: int
    entry_bytes: int
    clusters: int
    index: int
    keys: int
    buffers: int
    pending: int
    cache: int
    minimum: int
    recommended: int
    resident_bytes_per_entry: float

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        n = self.collections
        per = f" x {n} collections" if n > 1 else ""
        if self.groups > 1:
            per += f" in {self.groups} groups used in turn (idle groups paged out)"
        index = (f"index {_size(self.index // n)} per collection x {n} collections = {_size(self.index)}"
                 if n > 1 else f"index {_size(self.index)}")
        return (f"{self.n_entries:,} entries{per}, {self.entry_bytes} bytes each on flash, about "
                f"{self.clusters:,} clusters per collection\n"
                f"  minimum DRAM budget     {_size(self.minimum)} ({index} + buffers {_size(self.buffers)})\n"
                f"  recommended DRAM budget {_size(self.recommended)} (adds index growth, keys "
                f"{_size(self.keys)}, write/pending buffers {_size(self.pending)}, cache {_size(self.cache)})\n"
                f"  resident index: {self.resident_bytes_per_entry:.1f} bytes per entry")


def _size(b: int) -> str:
    for unit, s in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if b >= 1 << s:
            return f"{b / (1 << s):.2f} {unit}"
    return f"{b} B"


# the collection parameters estimate() takes, with Store.collection's defaults
PARAMS = dict(metric=None, init_cluster_size=32, max_cluster_size=64, kmeans_iters=10, seed=0,
              nprobe=None, tau=None, tau_factor=1.0, pending_budget=16, local_window=64,
              local_cluster_size=16, score_temp=0.0, colocate_after=32, layout=None, value_sums=None)


def estimate(n_entries: int, dim: int, value_dim: int | None = None, dtype="float16",
             policy: str = "adaptive", *, collections: int = 1, groups: int = 1, fetch: float = 0.1,
             dram_budget=None, write_buffer=None, **collection_params) -> Estimate:
    """The minimum and the recommended DRAM budget for ``collections`` collections of
    ``n_entries`` entries each, created with these parameters (as ``Store.collection`` takes
    them), used ``groups`` groups at a time (``collections`` must be a multiple of it; 1: all
    of them together). ``write_buffer`` (bytes, shared by the collections) defaults as ``kvtier.open``
    does: a thirty-second of ``dram_budget``, or of the recommended budget when none is
    given. ``fetch`` is the share of entries a retrieve fetches, for the recommended cache."""
    n = positive_int("n_entries", n_entries, 0, 1 << 40)
    ncoll = positive_int("collections", collections, 1, 1 << 20)
    ngroups = positive_int("groups", groups, 1, 1 << 20)
    if ncoll % ngroups:
        raise InvalidArgumentError(f"groups: a divisor of collections ({ncoll}) expected, got {ngroups}")
    if isinstance(fetch, bool) or not isinstance(fetch, (int, float)) or not 0 <= fetch <= 1:
        raise InvalidArgumentError(f"fetch: a share in [0, 1] expected, got {fetch!r}")
    defaults = dict(PARAMS)
    unknown = set(collection_params) - set(defaults)
    if unknown:
        raise InvalidArgumentError(f"{sorted(unknown)[0]}: not a collection parameter")
    defaults.update(collection_params)
    params = new_params(dim, value_dim, dtype, defaults.pop("metric"), policy, **defaults)
    budget = None if dram_budget is None else parse_size(dram_budget, "dram_budget")
    wb = None if write_buffer is None else parse_size(write_buffer, "write_buffer")
    share = (wb if wb is not None else budget // 32 if budget is not None else 0) // ncoll
    e = _engine.budget_estimate(params, n, share, float(fetch))
    buffers = e["buffers"]
    index = e["index"] * ncoll
    per_group = ncoll // ngroups
    # paged: one group resident, and while a collection of the next comes in, its image
    # read into a buffer beside the arrays it installs (virtualize.c unpark_now)
    minimum = max((index if ngroups == 1 else e["index"] * (per_group + 2)) + buffers, MIN_DRAM_BUDGET)
    pending = e["pending"] * ncoll
    rec = (e["index_grown"] + e["keys"] + e["pending"] + e["cache"]) * ncoll + buffers
    if wb is None and budget is None:  # the default write buffer is a 32nd of the budget
        rec = rec * 32 // 31 + 1
        pending += rec // 32
    return Estimate(n_entries=n, collections=ncoll, groups=ngroups, entry_bytes=e["entry_bytes"],
                    clusters=e["clusters"], index=index, keys=e["keys"] * ncoll, buffers=buffers, pending=pending,
                    cache=e["cache"] * ncoll, minimum=minimum, recommended=max(rec, minimum),
                    resident_bytes_per_entry=e["resident_per_entry"])
