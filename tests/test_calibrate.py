"""kvtier.calibrate: the measured curve, the derived profile, saving/loading, the O_DIRECT fallback."""
import errno
import fcntl
import json
import mmap
import os

import pytest

import kvtier
from kvtier.calibrate import CalibrationResult, calibrate, load_profile

# Tiny runs: the tests check the mechanics, not the device.
TINY = dict(sizes=(4096, 1 << 20), queue_depths=(1, 4), duration=0.01, runs=2, file_size="8MiB")


def _direct_supported(directory) -> bool:
    """Independent of kvtier: does this file system take an O_DIRECT read?"""
    if not hasattr(os, "O_DIRECT"):
        return False
    p = os.path.join(directory, "probe")
    with open(p, "wb") as f:
        f.write(os.urandom(8192))
    try:
        fd = os.open(p, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    buf = mmap.mmap(-1, 4096)
    try:
        os.preadv(fd, [buf], 0)
        return True
    except OSError:
        return False
    finally:
        buf.close()
        os.close(fd)
        os.unlink(p)


def test_curve_profile_and_cleanup(tmp_path):
    direct = _direct_supported(tmp_path)
    res = calibrate(tmp_path, **TINY)
    assert isinstance(res, CalibrationResult)
    assert os.listdir(tmp_path) == []  # the test file is gone
    assert res.direct == direct and (res.note == "" or not direct or "memory-backed" in res.note)
    assert res.sizes == [4096, 1 << 20] and res.queue_depths == [1, 4]
    for p in res.points:
        assert len(p.runs_Bps) == 2 and p.requests >= 2 * p.queue_depth
        assert min(p.runs_Bps) <= p.bandwidth_Bps <= max(p.runs_Bps) and p.bandwidth_Bps > 0
        assert p.iops == pytest.approx(p.bandwidth_Bps / p.size)
        assert p.latency_s > 0
    # A request has a fixed cost besides its bytes, so 1 MiB requests move more bytes per
    # second than 4 KiB ones on any device (and in the page cache).
    assert res.point(1 << 20, 1).bandwidth_Bps > res.point(4096, 1).bandwidth_Bps
    pr = res.profile
    assert pr.name == "calibrated" and pr.queue_depth == 4 and pr.page_size == mmap.PAGESIZE
    assert pr.bandwidth_Bps == max(p.bandwidth_Bps for p in res.points)
    assert pr.iops == max(p.iops for p in res.points if p.queue_depth == 4)
    assert pr.latency_s == res.point(4096, 1).latency_s
    assert "kvtier.calibrate" in pr.source
    table = res.table()
    assert "4 KiB" in table and "1 MiB" in table and "qd4 IOPS" in table


def test_save_load_roundtrip_and_open_with_profile(tmp_path):
    out = tmp_path / "dev.json"
    (tmp_path / "m").mkdir()
    res = calibrate(tmp_path / "m", save=out, name="mydisk", **TINY)
    loaded = load_profile(out)
    assert loaded == res.profile and loaded.name == "mydisk"
    doc = json.loads(out.read_text())
    assert len(doc["calibration"]["points"]) == 4 and doc["calibration"]["direct"] == res.direct
    with kvtier.open(tmp_path / "store", dram_budget="4MiB", device=loaded) as store:
        assert store.stats()["device"] == "mydisk"


def test_load_profile_rejects_what_is_not_a_profile(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{not json")
    with pytest.raises(kvtier.InvalidArgumentError, match="not a JSON device profile"):
        load_profile(bad)
    bad.write_text(json.dumps({"name": "x"}))
    with pytest.raises(kvtier.InvalidArgumentError, match="not a kvtier device profile"):
        load_profile(bad)
    bad.write_text(json.dumps({"format": "kvtier-device-profile", "version": 1,
                               "profile": {"name": "x", "iops": 1.0}}))
    with pytest.raises(kvtier.InvalidArgumentError, match="missing"):
        load_profile(bad)
    bad.write_text(json.dumps({"format": "kvtier-device-profile", "version": 1,
                               "profile": {"name": "x", "iops": 1.0, "bandwidth_Bps": -1, "latency_s": 0}}))
    with pytest.raises(kvtier.InvalidArgumentError, match="bandwidth_Bps"):
        load_profile(bad)
    with pytest.raises(kvtier.InvalidArgumentError, match="cannot read"):
        load_profile(tmp_path / "missing.json")


@pytest.mark.parametrize("kw, match", [
    (dict(sizes=(4096, 6000)), "sizes"),
    (dict(sizes=()), "sizes"),
    (dict(sizes=4096), "sizes"),
    (dict(queue_depths=(0,)), "queue_depths"),
    (dict(queue_depths=32), "queue_depths"),
    (dict(duration=0), "duration"),
    (dict(runs=0), "runs"),
    (dict(file_size="1MiB", sizes=(1 << 20,)), "file_size"),
    (dict(file_size="1EB"), "file_size"),
    (dict(name=""), "name"),
])
def test_bad_arguments_name_the_argument(tmp_path, kw, match):
    with pytest.raises(kvtier.InvalidArgumentError, match=match):
        calibrate(tmp_path, quick=True, **kw)
    assert os.listdir(tmp_path) == []


def test_path_must_be_a_directory(tmp_path):
    with pytest.raises(kvtier.InvalidArgumentError, match="path"):
        calibrate(tmp_path / "missing", quick=True)


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="the fallback is from O_DIRECT, which this platform lacks")
@pytest.mark.parametrize("where", ["open", "read"])
def test_refused_o_direct_falls_back_and_says_so(tmp_path, monkeypatch, where):
    real_open, real_preadv = os.open, os.preadv

    def refusing_open(path, flags, *a):
        if where == "open" and flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)

    def refusing_preadv(fd, bufs, offset):
        if where == "read" and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, bufs, offset)

    monkeypatch.setattr(os, "open", refusing_open)
    monkeypatch.setattr(os, "preadv", refusing_preadv)
    res = calibrate(tmp_path, **TINY)
    assert res.direct is False
    assert "O_DIRECT" in res.note and "page-cache numbers" in res.note and where in res.note
    assert "buffered" in res.profile.source
    assert all(p.bandwidth_Bps > 0 for p in res.points)
    assert os.listdir(tmp_path) == []


def test_io_error_propagates_and_the_file_is_removed(tmp_path, monkeypatch):
    real_preadv = os.preadv
    calls = []

    def failing(fd, bufs, offset):
        calls.append(offset)
        if len(calls) > 3:
            raise OSError(errno.EIO, "Input/output error")
        return real_preadv(fd, bufs, offset)

    monkeypatch.setattr(os, "preadv", failing)
    with pytest.raises(OSError) as ei:
        calibrate(tmp_path, **TINY)
    assert ei.value.errno == errno.EIO
    assert os.listdir(tmp_path) == []


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib", reason="plots need matplotlib (the bench extra)")
    (tmp_path / "m").mkdir()
    res = calibrate(tmp_path / "m", **TINY)
    res.plot(tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
