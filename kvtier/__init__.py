"""kvtier: tiered KV-cache and vector storage for memory-starved devices.

    import kvtier
    with kvtier.open("store", dram_budget="256MiB", device="ufs4.0") as store:
        coll = store.collection("L3.H1", dim=64, value_dim=64, dtype="float16")
        ids = coll.add(keys, values)
        hits = coll.search(queries, k=10)
        got = coll.retrieve(query_group, budget=0.1)
"""
from kvtier.budget import Estimate, estimate
from kvtier.calibrate import CalibrationResult, calibrate, load_profile
from kvtier.config import PROFILES, DeviceProfile, parse_size
from kvtier.errors import (
    BudgetError,
    CorruptionError,
    FormatVersionError,
    InjectedFaultError,
    InvalidArgumentError,
    KvtierError,
    NotFoundError,
    StorageFullError,
    StorageIOError,
    StoreClosedError,
    StoreLockedError,
)
from kvtier.store import Collection, Entries, Retrieved, RetrievedMany, SearchHits, StepOut, Store, open
from kvtier.verify import VerifyReport, verify

__version__ = "0.1.0"

__all__ = [
    "open", "estimate", "Estimate", "Store", "Collection", "SearchHits", "Retrieved", "RetrievedMany", "StepOut",
    "Entries",
    "verify", "VerifyReport", "DeviceProfile", "PROFILES",
    "parse_size", "calibrate", "load_profile", "CalibrationResult",
    "KvtierError", "InvalidArgumentError", "CorruptionError", "BudgetError",
    "NotFoundError", "FormatVersionError", "StoreClosedError", "StoreLockedError",
    "StorageIOError", "StorageFullError", "InjectedFaultError", "__version__",
]
