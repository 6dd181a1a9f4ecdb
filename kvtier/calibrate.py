"""Measures a real device's read bandwidth against request size and turns it into a profile.

``kvtier.calibrate(dir)`` writes a file of random data under ``dir`` (on the device to measure),
syncs it, then reads it at random aligned offsets with ``O_DIRECT`` for every request size and
queue depth: queue depth q is q threads each issuing ``os.preadv`` into its own page-aligned
(mmap) buffer, which works because ``preadv`` releases the GIL. Each point is the median of a
few timed runs. The curve is the one docs/design.md §6 models, bandwidth(size) =
min(bandwidth, IOPS * size), and the derived :class:`~kvtier.config.DeviceProfile` can be saved
as JSON and loaded back with :func:`load_profile`.

Why these choices:
- ``O_DIRECT`` so that the numbers are the device's and not the page cache's. Where the file
  system refuses it (tmpfs, some network and FUSE file systems) the run falls back to buffered
  reads and says so (``direct=False`` and a note): those are page-cache numbers.
- Random offsets over a file much larger than one request, so that neither read-ahead nor a
  device's small read cache turns the run into a sequential scan.
- Threads rather than io_uring or libaio: no dependency, portable, and good up to a few hundred
  thousand requests per second. Above that the interpreter's per-request cost (a few
  microseconds, serialised on the GIL) caps small-request IOPS at high queue depth, so on very
  fast NVMe the small-read IOPS is a lower bound.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import datetime
import errno
import json
import mmap
import os
import platform
import random
import shutil
import statistics
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from tabulate import tabulate

from kvtier.config import PROFILE_FORMAT, PROFILE_FORMAT_VERSION, DeviceProfile, load_profile, parse_size  # noqa: F401 (load_profile re-exported)
from kvtier.errors import InvalidArgumentError

#: 4 KiB .. 4 MiB in powers of two: the phone-flash knee (~24 KB) sits in the middle.
DEFAULT_SIZES = tuple(4096 << i for i in range(11))
DEFAULT_QUEUE_DEPTHS = (1, 32)
QUICK_SIZES = (4096, 16384, 65536, 262144, 1048576)
_MEMORY_FILESYSTEMS = ("tmpfs", "ramfs", "devtmpfs", "hugetlbfs")

# Defaults keep a full run near 20 s (11 sizes x 2 depths x 5 runs x 0.15 s + writing the
# file); quick mode stays near 1 s for tests.
_DEFAULTS: dict[str, Any] = {"file_size": 256 << 20, "duration": 0.15, "runs": 5, "max_bytes_per_run": 1 << 30}
_QUICK: dict[str, Any] = {"file_size": 16 << 20, "duration": 0.03, "runs": 3, "max_bytes_per_run": 64 << 20}


@dataclasses.dataclass(frozen=True)
class CalibrationPoint:
    """One (request size, queue depth) point: medians over ``runs_Bps``."""

    size: int
    queue_depth: int
    bandwidth_Bps: float
    iops: float
    latency_s: float  # mean time one request takes (queue depth x elapsed / requests)
    runs_Bps: tuple
    requests: int  # over all runs


@dataclasses.dataclass(frozen=True)
class CalibrationResult:
    """The measured curve and the profile derived from it.

    ``direct`` is False when the file system refused ``O_DIRECT`` (then ``note`` says so and the
    numbers are page-cache numbers, not the device's).
    """

    points: tuple
    profile: DeviceProfile
    direct: bool
    note: str
    path: str
    filesystem: str
    file_size: int
    duration_s: float
    runs: int
    elapsed_s: float
    when: str
    machine: dict

    @property
    def sizes(self) -> list[int]:
        return sorted({p.size for p in self.points})

    @property
    def queue_depths(self) -> list[int]:
        return sorted({p.queue_depth for p in self.points})

    def point(self, size: int, queue_depth: int) -> CalibrationPoint:
        for p in self.points:
            if p.size == size and p.queue_depth == queue_depth:
                return p
        raise KeyError((size, queue_depth))

    def table(self) -> str:
        """A text table: one row per request size, bandwidth and IOPS per queue depth."""
        qds = self.queue_depths
        head = ["request"] + [f"qd{q} {unit}" for q in qds for unit in ("MB/s", "IOPS")]
        rows = [[_fmt_size(s)] + [v for q in qds for v in (self.point(s, q).bandwidth_Bps / 1e6, self.point(s, q).iops)]
                for s in self.sizes]
        lines = [tabulate(rows, head, tablefmt="plain", floatfmt=[""] + [".1f", ".0f"] * len(qds),
                          colalign=["right"] * len(head))]
        pr = self.profile
        lines.append("")
        lines.append(f"profile {pr.name!r}: bandwidth {pr.bandwidth_Bps / 1e6:.1f} MB/s, "
                     f"IOPS {pr.iops:.0f} (qd{pr.queue_depth}), latency {pr.latency_s * 1e6:.1f} us "
                     f"(qd{self.queue_depths[0]} {_fmt_size(self.sizes[0])}), "
                     f"knee {pr.knee_bytes / 1024:.1f} KiB")
        lines.append(f"O_DIRECT: {'yes' if self.direct else 'no'}; file system {self.filesystem}; "
                     f"{self.runs} runs of {self.duration_s:g} s per point; took {self.elapsed_s:.1f} s")
        if self.note:
            lines.append(f"note: {self.note}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "format": PROFILE_FORMAT,
            "version": PROFILE_FORMAT_VERSION,
            "profile": dataclasses.asdict(self.profile),
            "calibration": {
                "direct": self.direct, "note": self.note, "path": self.path,
                "filesystem": self.filesystem, "file_size": self.file_size,
                "duration_s": self.duration_s, "runs": self.runs, "elapsed_s": self.elapsed_s,
                "when": self.when, "machine": self.machine,
                "points": [dataclasses.asdict(p) for p in self.points],
            },
        }

    def save(self, path: str | os.PathLike) -> None:
        """Writes the profile (and the curve it came from) as JSON for :func:`load_profile`."""
        tmp = os.fspath(path) + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
            f.write("\n")
        os.replace(tmp, path)

    def plot(self, path: str | os.PathLike) -> None:
        """PNG of bandwidth vs request size per queue depth (log-log), with the profile's
        model min(bandwidth, IOPS * size) dashed for comparison."""
        try:
            from matplotlib.figure import Figure
            from matplotlib.ticker import NullLocator
        except ImportError:
            raise InvalidArgumentError(
                "plot: matplotlib is needed for plots (pip install 'kvtier[bench]')") from None
        fig = Figure(figsize=(7, 4.5), dpi=110)
        ax = fig.subplots()
        sizes = np.array(self.sizes, dtype=float)
        for q in self.queue_depths:
            bw = np.array([self.point(int(s), q).bandwidth_Bps for s in sizes])
            lo = np.array([min(self.point(int(s), q).runs_Bps) for s in sizes])
            hi = np.array([max(self.point(int(s), q).runs_Bps) for s in sizes])
            line, = ax.plot(sizes / 1024, bw / 1e6, marker="o", label=f"measured, queue depth {q}")
            ax.fill_between(sizes / 1024, lo / 1e6, hi / 1e6, color=line.get_color(), alpha=0.15)
        pr = self.profile
        grid = np.geomspace(sizes[0], sizes[-1], 200)
        model = np.minimum(pr.bandwidth_Bps, pr.iops * grid)
        ax.plot(grid / 1024, model / 1e6, "k--", lw=1,
                label=f"profile model: min({pr.bandwidth_Bps / 1e6:.0f} MB/s, {pr.iops / 1e3:.0f}K IOPS x size)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sizes / 1024, [_fmt_size(int(s)).replace(" ", "\n") for s in sizes], fontsize=8)
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("request size (random aligned reads)")
        ax.set_ylabel("read bandwidth (MB/s, 10^6 B/s)")
        kind = "O_DIRECT" if self.direct else "buffered: page cache, not the device"
        if self.filesystem in _MEMORY_FILESYSTEMS:
            kind += "; memory-backed, not a storage device"
        ax.set_title(f"Read bandwidth vs request size on {self.filesystem} ({kind})\n"
                     f"median of {self.runs} runs of {self.duration_s:g} s; band: min to max", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        fig.savefig(os.fspath(path))


def calibrate(path: str | os.PathLike, sizes: Sequence[int] | None = None,
              queue_depths: Iterable[int] = DEFAULT_QUEUE_DEPTHS, duration: float | None = None,
              runs: int | None = None, max_bytes_per_run: int | str | None = None,
              file_size: int | str | None = None, quick: bool = False,
              save: str | os.PathLike | None = None, name: str | None = None,
              seed: int = 0) -> CalibrationResult:
    """Measures random-read bandwidth vs request size on the device holding directory ``path``.

    ``sizes`` request sizes in bytes (multiples of the page size; default 4 KiB .. 4 MiB);
    ``queue_depths`` concurrent requests (default 1 and 32); ``duration`` seconds per timed run
    and ``runs`` runs per point (the median is reported); ``max_bytes_per_run`` ends a run early
    on fast devices; ``file_size`` the test file (default 256 MiB; larger defeats device caches
    better). ``quick`` shrinks everything for tests (about a second). ``save`` writes the
    profile JSON; ``name`` names the profile. The test file is removed afterwards.

    Costs: about sizes x depths x runs x duration seconds plus writing the file, except that every
    run waits for at least one request per queue slot (slow media at 4 MiB x 32 take longer);
    buffers of queue depth x request size (128 MiB at 4 MiB x 32) while a point runs.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise InvalidArgumentError(f"path: an existing directory on the device to measure expected, got {path!r}")
    base = _QUICK if quick else _DEFAULTS
    page = mmap.PAGESIZE
    if isinstance(sizes, (int, np.integer)):
        raise InvalidArgumentError(f"sizes: a sequence of request sizes expected, got {sizes!r}")
    sizes = tuple(sorted(set(QUICK_SIZES if quick else DEFAULT_SIZES))) if sizes is None else tuple(sorted(set(sizes)))
    if not sizes or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s <= 0 or s % page
                        for s in sizes):
        raise InvalidArgumentError(f"sizes: positive multiples of the page size ({page}) expected, got {sizes!r}")
    try:
        qds = tuple(sorted(set(queue_depths)))
    except TypeError:
        raise InvalidArgumentError(f"queue_depths: an iterable of integers expected, got {queue_depths!r}") from None
    if not qds or any(isinstance(q, bool) or not isinstance(q, (int, np.integer)) or not 1 <= q <= 1024 for q in qds):
        raise InvalidArgumentError(f"queue_depths: integers in [1, 1024] expected, got {queue_depths!r}")
    duration = base["duration"] if duration is None else duration
    if isinstance(duration, bool) or not isinstance(duration, (int, float)) or not 0 < duration <= 60:
        raise InvalidArgumentError(f"duration: seconds per run in (0, 60] expected, got {duration!r}")
    runs = base["runs"] if runs is None else runs
    if isinstance(runs, bool) or not isinstance(runs, int) or not 1 <= runs <= 100:
        raise InvalidArgumentError(f"runs: an integer in [1, 100] expected, got {runs!r}")
    max_bytes = parse_size(base["max_bytes_per_run"] if max_bytes_per_run is None else max_bytes_per_run,
                           "max_bytes_per_run")
    if max_bytes <= 0:
        raise InvalidArgumentError("max_bytes_per_run: a positive byte count expected")
    fsize = parse_size(base["file_size"] if file_size is None else file_size, "file_size")
    fsize -= fsize % page
    if fsize < 4 * sizes[-1]:
        raise InvalidArgumentError(
            f"file_size: at least 4x the largest request ({4 * sizes[-1]} bytes) expected, got {fsize}")
    free = shutil.disk_usage(path).free
    if fsize + (16 << 20) > free:
        raise InvalidArgumentError(f"file_size: {fsize} bytes do not fit in the {free} bytes free under {path!r}")
    if name is not None and (not isinstance(name, str) or not name):
        raise InvalidArgumentError(f"name: a non-empty string expected, got {name!r}")
    if save is not None:  # refuse before a 20-second measurement, not after it
        _check_writable_dir("save", save)

    t_start = time.perf_counter()
    test_file = os.path.join(path, f".kvtier-calibrate-{os.getpid()}-{uuid.uuid4().hex[:8]}.dat")
    fd = -1
    try:
        _write_random_file(test_file, fsize, seed)
        fd, direct, note = _open_for_reads(test_file, page)
        grid = [(size, qd) for size in sizes for qd in qds]
        samples: dict = {g: [] for g in grid}
        with concurrent.futures.ThreadPoolExecutor(max_workers=qds[-1],
                                                   thread_name_prefix="kvtier-calibrate") as pool:
            # A short untimed run starts the threads and wakes the device from power saving.
            _run(pool, fd, fsize, sizes[0], qds[-1], page, min(duration, 0.05), max_bytes, seed)
            # Rounds over the whole grid rather than all runs of one point back to back, so that
            # a burst of interference on a shared machine costs every point one sample, not one
            # point all of them.
            for r in range(runs):
                for i, (size, qd) in enumerate(grid):
                    samples[size, qd].append(
                        _run(pool, fd, fsize, size, qd, page, duration, max_bytes, seed + 1 + r * len(grid) + i))
        points = [_point(size, qd, samples[size, qd]) for size, qd in grid]
    finally:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(test_file)
    elapsed = time.perf_counter() - t_start

    fs = _filesystem_of(path)
    if fs in _MEMORY_FILESYSTEMS:
        mem = f"{fs} is memory-backed: these are memory numbers, not a storage device's"
        note = f"{note}; {mem}" if note else mem
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    top_qd = qds[-1]
    profile = DeviceProfile(
        name=name or "calibrated",
        bandwidth_Bps=max(p.bandwidth_Bps for p in points),
        iops=max(p.iops for p in points if p.queue_depth == top_qd),
        latency_s=next(p.latency_s for p in points if p.queue_depth == qds[0] and p.size == sizes[0]),
        queue_depth=top_qd, page_size=page,
        source=(f"kvtier.calibrate {when}: random reads on {fs}, "
                f"{'O_DIRECT' if direct else 'buffered (page cache, not the device)'}, "
                f"{_fmt_size(sizes[0])}..{_fmt_size(sizes[-1])} at queue depths {list(qds)}, "
                f"median of {runs} runs of {duration:g} s"))
    result = CalibrationResult(
        points=tuple(points), profile=profile, direct=direct, note=note, path=os.path.abspath(path),
        filesystem=fs, file_size=fsize, duration_s=float(duration), runs=runs, elapsed_s=elapsed,
        when=when, machine={"platform": platform.platform(), "machine": platform.machine(),
                            "cpus": os.cpu_count(), "python": platform.python_version()})
    if save is not None:
        result.save(save)
    return result


# -- internals --------------------------------------------------------------------------------

def _check_writable_dir(arg: str, path) -> None:
    parent = os.path.dirname(os.path.abspath(os.fspath(path)))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise InvalidArgumentError(f"{arg}: {os.fspath(path)!r} is not in a writable directory")


def _write_random_file(path: str, size: int, seed: int) -> None:
    """Fresh random bytes for every chunk, so that compressing or deduplicating devices cannot
    shortcut the reads; synced, then dropped from the page cache (matters for the fallback)."""
    rng = np.random.default_rng(seed)
    chunk = 8 << 20
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        left = size
        while left:
            n = min(chunk, left)
            buf = rng.bytes(n)
            view = memoryview(buf)
            while view:
                view = view[os.write(fd, view):]
            left -= n
        os.fsync(fd)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _open_for_reads(path: str, page: int) -> tuple[int, bool, str]:
    """(fd, direct, note). Some file systems accept O_DIRECT at open and refuse it at the first
    read, so a probe read decides."""
    o_direct = getattr(os, "O_DIRECT", 0)
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
    if o_direct:
        try:
            fd = os.open(path, flags | o_direct)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise
            reason = f"the file system refused O_DIRECT at open ({errno.errorcode.get(e.errno, e.errno)})"
        else:
            probe = mmap.mmap(-1, page)
            try:
                os.preadv(fd, [probe], 0)
                return fd, True, ""
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                    raise
                reason = f"the file system refused an O_DIRECT read ({errno.errorcode.get(e.errno, e.errno)})"
            finally:
                probe.close()
    else:
        reason = "this platform has no O_DIRECT"
    fd = os.open(path, flags)
    return fd, False, (f"{reason}; buffered reads were used, so these are page-cache numbers, "
                       "not the device's")


def _reader(fd: int, file_size: int, size: int, page: int, deadline: float, max_bytes: int,
            seed: int) -> int:
    """One queue slot: random aligned reads until the deadline or the byte cap. Returns reads."""
    buf = mmap.mmap(-1, size)  # page-aligned, as O_DIRECT requires
    try:
        bufs = [buf]
        slots = (file_size - size) // page + 1
        rnd = random.Random(seed).randrange
        clock = time.perf_counter
        n = done = 0
        while True:
            got = os.preadv(fd, bufs, rnd(slots) * page)
            if got != size:
                raise OSError(errno.EIO, f"calibrate: short read of {got} of {size} bytes")
            n += 1
            done += size
            if done >= max_bytes or clock() >= deadline:
                return n
    finally:
        buf.close()


def _run(pool, fd, file_size, size, qd, page, duration, max_bytes, seed) -> tuple[int, float]:
    """One timed run of qd concurrent readers: (requests, seconds)."""
    per_slot = max(size, max_bytes // qd)
    t0 = time.perf_counter()
    futs = [pool.submit(_reader, fd, file_size, size, page, t0 + duration, per_slot, seed * 131 + i)
            for i in range(qd)]
    n = sum(f.result() for f in futs)
    return n, time.perf_counter() - t0


def _point(size, qd, samples) -> CalibrationPoint:
    bws = tuple(n * size / dt for n, dt in samples)
    bw = statistics.median(bws)
    return CalibrationPoint(size=size, queue_depth=qd, bandwidth_Bps=bw, iops=bw / size,
                            latency_s=statistics.median(qd * dt / n for n, dt in samples),
                            runs_Bps=bws, requests=sum(n for n, _ in samples))


def _filesystem_of(path: str) -> str:
    """File system type of the mount holding path (from /proc/self/mounts), or 'unknown'."""
    real = os.path.realpath(path)
    best, fstype = "", "unknown"
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1].replace("\\040", " ")
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, fstype = mnt, parts[2]
    except OSError:
        pass
    return fstype


def _fmt_size(n: int) -> str:
    for unit, div in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div and n % div == 0:
            return f"{n // div} {unit}"
    return f"{n} B"
