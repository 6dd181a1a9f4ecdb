"""Injected I/O faults give clear exceptions; the store stays usable and committed data intact."""
import errno

import numpy as np
import pytest

import kvtier
from conftest import make_data


@pytest.mark.parametrize("op,nth,code,exc", [
    ("w", 1, errno.EIO, kvtier.StorageIOError),
    ("w", 1, errno.ENOSPC, kvtier.StorageFullError),  # also leaves a torn half-write behind
    ("s", 0, errno.EIO, kvtier.StorageIOError),
])
def test_write_side_faults(tmp_path, op, nth, code, exc):
    k, v = make_data(600)
    with kvtier.open(tmp_path / "s", dram_budget="1MiB") as s:
        c = s.collection("c", dim=16, value_dim=8)
        c.add(k[:300], v[:300])
        s.flush()
        s._inject_fault(op, nth, code)
        with pytest.raises(exc) as info:
            c.add(k[300:], v[300:])
            s.flush()
        msg = str(info.value)
        assert ("pwrite" in msg or "fdatasync" in msg) and ".kvd" in msg
        # the store stays usable: the next attempt succeeds
        if len(c) == 300:
            c.add(k[300:], v[300:])
        s.flush()
        assert np.array_equal(c.get(np.arange(600))[0], k)
    with kvtier.open(tmp_path / "s") as s:
        assert np.array_equal(s.collection("c").get(np.arange(600))[0], k)


def test_read_fault(tmp_path):
    k, v = make_data(300)
    with kvtier.open(tmp_path / "s", dram_budget="1MiB") as s:
        c = s.collection("c", dim=16, value_dim=8)
        c.add(k, v)
        s.flush()  # on flash: clusters smaller than a page wait in the write buffer until then
        s._inject_fault("r", 0, errno.EIO)
        with pytest.raises(kvtier.StorageIOError, match="pread"):
            c.retrieve(np.ones(16), budget=1.0)
        assert len(c.retrieve(np.ones(16), budget=1.0)) == 300


def test_corrupted_data_is_detected_not_returned(tmp_path):
    k, v = make_data(300)
    with kvtier.open(tmp_path / "s") as s:
        s.collection("c", dim=16, value_dim=8).add(k, v)
    data = next((tmp_path / "s").glob("c*.kvd"))
    raw = bytearray(data.read_bytes())
    raw[4096 + 20] ^= 0xFF  # inside the first record's key
    data.write_bytes(bytes(raw))
    with kvtier.open(tmp_path / "s") as s:
        c = s.collection("c")
        with pytest.raises(kvtier.CorruptionError, match="checksum"):
            c.retrieve(np.ones(16), budget=1.0)


def test_truncated_data_file_is_an_error(tmp_path):
    k, v = make_data(300)
    with kvtier.open(tmp_path / "s") as s:
        s.collection("c", dim=16, value_dim=8).add(k, v)
    data = next((tmp_path / "s").glob("c*.kvd"))
    data.write_bytes(data.read_bytes()[:6000])
    with kvtier.open(tmp_path / "s") as s:
        c = s.collection("c")
        with pytest.raises(kvtier.CorruptionError):
            c.retrieve(np.ones(16), budget=1.0)


def test_failed_close_keeps_the_store_open(tmp_path):
    k, v = make_data(200)
    s = kvtier.open(tmp_path / "s", dram_budget="1MiB")
    c = s.collection("c", dim=16, value_dim=8)
    c.add(k, v)
    s._inject_fault("s", 0, errno.EIO)
    with pytest.raises(kvtier.StorageIOError):
        s.close()
    assert not s.closed and len(c) == 200  # still open, nothing lost
    s.close()
    with kvtier.open(tmp_path / "s") as s2:
        assert np.array_equal(s2.collection("c").get(np.arange(200))[0], k)
