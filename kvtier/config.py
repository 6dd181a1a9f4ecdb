"""Configuration values: byte sizes, device profiles, collection defaults."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re

from kvtier import _engine
from kvtier.errors import InvalidArgumentError

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}


def parse_size(value: int | float | str, name: str = "size") -> int:
    """Bytes from an int or a string like ``"64MiB"``, ``"1.5 GB"``, ``"4096"``."""
    if isinstance(value, bool):
        raise InvalidArgumentError(f"{name}: a byte count or a string like '64MiB' expected, got {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0 or value != int(value):
            raise InvalidArgumentError(f"{name}: a non-negative whole number of bytes expected, got {value!r}")
        return int(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", value)
        if m and m.group(2).lower() in _UNITS:
            return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    raise InvalidArgumentError(f"{name}: a byte count or a string like '64MiB' expected, got {value!r}")


@dataclasses.dataclass(frozen=True)
class DeviceProfile:
    """A flash device as the engine's device model sees it.

    A batch of reads issued together costs ``latency_s + max(ops / iops, bytes / bandwidth)``,
    so effective bandwidth at request size s is ``min(bandwidth, iops * s)``. With
    ``throttle=True`` the engine also sleeps to the modeled time.
    """

    name: str
    bandwidth_Bps: float
    iops: float
    latency_s: float
    queue_depth: int = 32
    page_size: int = 4096
    throttle: bool = False
    source: str = ""

    def __post_init__(self):
        for f in ("bandwidth_Bps", "iops", "latency_s"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise InvalidArgumentError(f"DeviceProfile.{f}: a finite non-negative number expected, got {v!r}")
        if self.page_size <= 0 or self.queue_depth <= 0:
            raise InvalidArgumentError("DeviceProfile: page_size and queue_depth must be positive")

    @property
    def knee_bytes(self) -> float:
        """Request size above which reads are bandwidth-bound rather than IOPS-bound."""
        return self.bandwidth_Bps / self.iops if self.iops else 0.0

    def engine_tuple(self) -> tuple:
        return (float(self.latency_s), float(self.iops), float(self.bandwidth_Bps),
                int(self.queue_depth), int(self.page_size), int(bool(self.throttle)))

    def replace(self, **kw) -> DeviceProfile:
        return dataclasses.replace(self, **kw)


# Figures are rounded public numbers for each interface's class of parts; they set the shape
# of the bandwidth-vs-size curve, not any one phone's exact speed. `kvtier.calibrate` measures
# a real device.
PROFILES: dict[str, DeviceProfile] = {
    "ufs4.0": DeviceProfile(
        "ufs4.0", bandwidth_Bps=2.9e9, iops=120e3, latency_s=100e-6, queue_depth=32,
        source="JEDEC UFS 4.0 (JESD220F): 2 lanes of HS-G5 (~2.9 GB/s per lane as the DynaKV paper "
               "measured); ~120K random-read IOPS from vendor sheets of 2023 parts; knee near 24 KB"),
    "ufs3.1": DeviceProfile(
        "ufs3.1", bandwidth_Bps=2.1e9, iops=70e3, latency_s=150e-6, queue_depth=32,
        source="JEDEC UFS 3.1 (JESD220E): HS-G4 x2, ~2.1 GB/s sequential read, ~70K random-read IOPS on vendor sheets"),
    "emmc5.1": DeviceProfile(
        "emmc5.1", bandwidth_Bps=0.3e9, iops=10e3, latency_s=300e-6, queue_depth=32,
        source="JEDEC eMMC 5.1 (JESD84-B51): HS400, ~300 MB/s sequential read, ~10K random-read IOPS, "
               "command queue 32"),
    "nvme": DeviceProfile(
        "nvme", bandwidth_Bps=3.5e9, iops=600e3, latency_s=60e-6, queue_depth=64,
        source="a PCIe 3.0 x4 NVMe SSD: ~3.5 GB/s sequential read, ~600K random-read IOPS at depth 32+"),
}

NO_DEVICE = (0.0, 0.0, 0.0, 1, 4096, 0)


def resolve_device(device) -> tuple[DeviceProfile | None, tuple]:
    """(profile, engine tuple) for ``device=``: None, a profile name or a DeviceProfile."""
    if device is None:
        return None, NO_DEVICE
    if isinstance(device, DeviceProfile):
        return device, device.engine_tuple()
    if isinstance(device, str) and device in PROFILES:
        return PROFILES[device], PROFILES[device].engine_tuple()
    if isinstance(device, (str, os.PathLike)) and os.path.isfile(device):
        p = load_profile(device)
        return p, p.engine_tuple()
    raise InvalidArgumentError(
        f"device: None, a DeviceProfile, one of {sorted(PROFILES)} or the path of a saved "
        f"profile JSON expected, got {device!r}")


PROFILE_FORMAT = "kvtier-device-profile"
PROFILE_FORMAT_VERSION = 1


def load_profile(path: str | os.PathLike) -> DeviceProfile:
    """The :class:`DeviceProfile` saved by ``calibrate(..., save=path)`` or ``CalibrationResult.save``."""
    path = os.fspath(path)
    try:
        with open(path) as f:
            doc = json.load(f)
    except OSError as e:
        raise InvalidArgumentError(f"path: cannot read device profile {path!r}: {e.strerror}") from None
    except ValueError as e:
        raise InvalidArgumentError(f"path: {path!r} is not a JSON device profile ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != PROFILE_FORMAT or not isinstance(doc.get("profile"), dict):
        raise InvalidArgumentError(f"path: {path!r} is not a kvtier device profile (no format {PROFILE_FORMAT!r})")
    if doc.get("version") != PROFILE_FORMAT_VERSION:
        raise InvalidArgumentError(
            f"path: {path!r} has profile format version {doc.get('version')!r}, "
            f"this kvtier reads {PROFILE_FORMAT_VERSION}")
    fields = {f.name for f in dataclasses.fields(DeviceProfile)}
    raw = doc["profile"]
    missing = {"name", "bandwidth_Bps", "iops", "latency_s"} - set(raw)
    unknown = set(raw) - fields
    if missing or unknown:
        raise InvalidArgumentError(
            f"path: {path!r}: profile fields missing {sorted(missing)} / unknown {sorted(unknown)}")
    return DeviceProfile(**raw)


#: The clustering policies, from the engine's table (kvtier.h KVT_POLICIES): the baselines,
#: then the method.
POLICIES = tuple(_engine.POLICIES)
# the least dram_budget kvtier.open accepts (and so the least minimum kvtier.estimate gives)
MIN_DRAM_BUDGET = 64 * 1024
METRICS = ("ip", "l2")
DTYPES = ("float16", "float32")
LAYOUTS = ("colocated", "clustered", "token")
