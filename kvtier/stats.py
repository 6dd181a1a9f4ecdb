"""Statistics as a reader meets them: the flat keys the engine reports, grouped.

``Store.stats()`` and the adapters' ``stats()`` return a :class:`Stats`: a plain ``dict`` of
the flat keys every script already reads (``s["read_bytes"]``), which also offers them by
group: ``s.engine`` (DRAM: budget, use, peaks; the build), ``s.cache`` (cached clusters,
hits, evictions, prefetch), ``s.io`` (reads, writes, device time, swap) and, from an adapter,
``s.adapter`` (what the adapter itself counts and holds). ``print(s)`` shows the groups, each
key once. The grouping is by key name, so keys the engine adds later land in a group (or in
``other``) without code here changing.
"""
from __future__ import annotations

from collections.abc import Iterable

GROUPS = ("adapter", "engine", "cache", "io", "other")

# first match wins: (group, exact names, prefixes)
_RULES: tuple = (
    ("engine", {"dram_bytes", "dram_budget", "dram_peak_bytes", "dram_by_use", "dram_peak_by_use",
                "dram_fixed_peak_bytes", "simd", "direct_io", "io_backend", "parked_collections",
                "engine_dram_bytes", "engine_dram_peak_bytes", "engine_dram_budget", "device"},
     ("dram_",)),
    ("cache", {"cache_policy", "evictions", "io_wait_seconds"}, ("cache_", "cached_", "prefetch_")),
    ("io", {"mean_read_entries", "mean_contiguous_entries", "contiguous_reads", "gap_bytes",
            "modeled_io_seconds", "sync_ops", "partial_page_writes", "read_bytes_by_cause"},
     ("read_", "write_", "swap_")),
)


def group_of(key: str, adapter_keys: Iterable[str] = ()) -> str:
    if key in adapter_keys:
        return "adapter"
    for name, exact, prefixes in _RULES:
        if key in exact or key.startswith(prefixes):
            return name
    return "other"


class Stats(dict):
    """A dict of flat statistics with grouped views (see the module docstring)."""

    def __init__(self, flat: dict, adapter_keys: Iterable[str] = (), hidden: Iterable[str] = ()):
        super().__init__(flat)
        self._adapter_keys = frozenset(adapter_keys)
        self._hidden = frozenset(hidden)  # kept for old scripts, left out of the grouped views

    def group(self, name: str) -> dict:
        if name not in GROUPS:
            raise KeyError(f"no stats group {name!r}; groups are {GROUPS}")
        return {k: v for k, v in self.items() if k not in self._hidden and group_of(k, self._adapter_keys) == name}

    def grouped(self) -> dict:
        """{group: {key: value}} over every key, each in one group (empty groups left out)."""
        out: dict = {}
        for k, v in self.items():
            if k not in self._hidden:
                out.setdefault(group_of(k, self._adapter_keys), {})[k] = v
        return {g: out[g] for g in GROUPS if g in out}

    @property
    def adapter(self) -> dict:
        return self.group("adapter")

    @property
    def engine(self) -> dict:
        return self.group("engine")

    @property
    def cache(self) -> dict:
        return self.group("cache")

    @property
    def io(self) -> dict:
        return self.group("io")

    def __str__(self) -> str:
        lines = []
        for g, items in self.grouped().items():
            lines.append(f"{g}:")
            width = max(map(len, items))
            for k, v in items.items():
                if isinstance(v, dict) and len(str(v)) > 80:
                    v = "{" + ", ".join(f"{a}: {_fmt(b)}" for a, b in v.items()) + "}"
                lines.append(f"  {k:<{width}}  {_fmt(v)}")
        return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list) and len(v) > 8:
        return f"[{len(v)} values]"
    return str(v)
