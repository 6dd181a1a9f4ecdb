"""``kvtier.verify``: read every record of a store back from its data files and check it.

Each collection's data file is read from end to end (never from the cache): every record's
CRC-32C, that it holds the id the catalog puts there, records the catalog names past the end
of a truncated file, and the header page (its fields against the catalog, its page checksum).
Data files no collection names and collections whose data file is missing are reported too.
The result names what is damaged by collection and id range, and is recorded in the catalog
(``meta/verify``) so that ``kvtier inspect`` can say when the store was last found damaged or
intact. Reading a damaged store: ``kvtier.open(path, on_corrupt="skip")``.
"""
from __future__ import annotations

import glob
import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvtier.errors import InvalidArgumentError, KvtierError


def id_ranges(ids, limit: int = 12) -> str:
    """"3, 7-9, 12" for sorted ids, at most ``limit`` ranges then "... (N ids)"."""
    ids = np.asarray(ids, dtype=np.int64)
    if not ids.size:
        return "none"
    breaks = np.flatnonzero(np.diff(ids) != 1)
    starts = np.r_[ids[0], ids[breaks + 1]]
    ends = np.r_[ids[breaks], ids[-1]]
    parts = [f"{a}" if a == b else f"{a}-{b}" for a, b in zip(starts[:limit], ends[:limit], strict=True)]
    more = f", ... ({ids.size:,} ids in {len(starts):,} ranges)" if len(starts) > limit else ""
    return ", ".join(parts) + more


@dataclass
class VerifyReport:
    """What ``kvtier.verify`` found: one dict per collection (``name``, ``data_file``,
    ``entries``, ``records`` checked, ``damaged``, ``unreadable`` (the damaged ids, int64),
    ``in_dram``, ``header_damaged``, ``header_checksummed``, ``file_bytes``, ``named_bytes``,
    or ``error`` when the collection cannot be read at all), and data files no collection
    names (``orphans``)."""

    path: str
    collections: list = field(default_factory=list)
    orphans: list = field(default_factory=list)
    when: float = 0.0
    seconds: float = 0.0

    @property
    def damaged(self) -> int:
        """Damaged records in all collections."""
        return sum(int(c.get("damaged", 0)) for c in self.collections)

    @property
    def ok(self) -> bool:
        return not self.orphans and all(
            not c.get("error") and not c.get("damaged") and not c.get("header_damaged") for c in self.collections)

    def summary(self) -> str:
        lines = [f"store {self.path}: {'intact' if self.ok else 'DAMAGED'} "
                 f"({len(self.collections)} collection{'s' if len(self.collections) != 1 else ''}, "
                 f"{sum(int(c.get('records', 0)) for c in self.collections):,} records checked "
                 f"in {self.seconds:.1f} s)"]
        for c in self.collections:
            head = f"  collection {c['name']!r} ({c.get('data_file', '?')})"
            if c.get("error"):
                lines.append(f"{head}: cannot be read: {c['error']}")
                continue
            what = []
            if c["damaged"]:
                what.append(f"{c['damaged']:,} damaged record{'s' if c['damaged'] != 1 else ''}: "
                            f"ids {id_ranges(c['unreadable'])}")
            if c["named_bytes"] > c["file_bytes"]:
                what.append(f"file truncated ({c['file_bytes']:,} bytes, the catalog names records up to "
                            f"{c['named_bytes']:,})")
            if c["header_damaged"]:
                what.append("header page damaged (no entry affected: open with on_corrupt='skip' to read)")
            state = "DAMAGED: " + "; ".join(what) if what else "intact"
            extra = f", {c['in_dram']:,} not on flash" if c.get("in_dram") else ""
            lines.append(f"{head}: {c['records']:,} records checked{extra}: {state}")
        lines.extend(f"  {f}: a data file no collection names (left from a crash or a lost catalog record)"
                     for f in self.orphans)
        if not self.ok:
            lines.append("  read what is intact with kvtier.open(path, on_corrupt='skip')")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        cols = [{k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in c.items()} for c in self.collections]
        return {"path": self.path, "ok": self.ok, "damaged": self.damaged, "when": self.when,
                "seconds": self.seconds, "collections": cols, "orphans": self.orphans}

    def record(self) -> dict:
        """The short form kept in the catalog for ``kvtier inspect``."""
        return {"when": self.when, "ok": self.ok, "damaged": self.damaged,
                "collections": {c["name"]: (c["error"] if c.get("error") else
                                            {"damaged": int(c["damaged"]), "ids": id_ranges(c["unreadable"]),
                                             "header_damaged": bool(c["header_damaged"]),
                                             "truncated": c["named_bytes"] > c["file_bytes"]})
                                for c in self.collections
                                if c.get("error") or c["damaged"] or c["header_damaged"]},
                "orphans": self.orphans}


def verify(path, dram_budget="256MiB", record: bool = True) -> VerifyReport:
    """Checks every record of the store at ``path`` (see the module's docstring); returns a
    :class:`VerifyReport` and, with ``record``, keeps its short form in the catalog."""
    from kvtier.store import open as open_store

    path = os.fspath(path)
    if not os.path.isdir(os.path.join(path, "catalog")):
        raise InvalidArgumentError(f"STORE: {path!r} is not a kvtier store (no catalog/ directory in it)")
    report = VerifyReport(os.path.abspath(path), when=time.time())
    t0 = time.perf_counter()
    named = set()
    with open_store(path, dram_budget=dram_budget, create=False, on_corrupt="skip") as store:
        for name in store.collections():
            no = store._committed.get(name, {}).get("no")
            data_file = f"c{no}.kvd" if no is not None else "?"
            named.add(data_file)
            entry: dict[str, Any] = {"name": name, "data_file": data_file}
            if no is not None and not os.path.exists(os.path.join(path, data_file)):
                entry["error"] = f"its data file {data_file} is missing"
                report.collections.append(entry)
                continue
            try:
                coll = store.collection(name)
                entry["entries"] = len(coll)
                entry.update(coll.verify())
            except KvtierError as e:
                entry["error"] = str(e)
            report.collections.append(entry)
        report.orphans = sorted(os.path.basename(f) for f in glob.glob(os.path.join(path, "c*.kvd"))
                                if re.fullmatch(r"c\d+\.kvd", os.path.basename(f))
                                and os.path.basename(f) not in named)
        report.seconds = time.perf_counter() - t0
        if record:
            store._catalog.put_meta("verify", json.dumps(report.record()).encode())
    return report


def last_verified(catalog) -> dict | None:
    """The short form of the last ``verify`` of a store (None if never verified)."""
    raw = catalog.get_meta("verify")
    if raw is None:
        return None
    try:
        return json.loads(bytes(raw))
    except ValueError:
        return {"unreadable": True}
