"""The catalog: an LMDB environment inside the store directory.

Keys (all bytes):
  meta/format             catalog format version (ASCII int)
  meta/next_no            next collection number (ASCII int)
  coll/<name>             JSON parameters of a collection, with its number "no"
  dir/<no>                the engine's cluster directory blob for collection no
  loc/<no>/<chunk>        the engine's id-map chunk blobs

One flush is one write transaction, committed only after the data files were synced, so the
catalog never names data that is not on stable storage.
"""
from __future__ import annotations

import json
import os

import lmdb

from kvtier.errors import CorruptionError, FormatVersionError, StoreLockedError

CATALOG_FORMAT = 1

_kill = {"name": None, "left": -1}


def kill_point(name: str) -> None:
    """Crash testing, as the engine's kvt_kill_point: KVTIER_KILL_AT=name:n kills this process
    with SIGKILL the n-th time it reaches the named point."""
    if _kill["name"] is None:
        spec = os.environ.get("KVTIER_KILL_AT", "")
        point, _, n = spec.rpartition(":")
        _kill["name"], _kill["left"] = (point, int(n)) if point and n.lstrip("-").isdigit() else ("", -1)
    if _kill["left"] >= 0 and name == _kill["name"]:
        left, _kill["left"] = _kill["left"], _kill["left"] - 1
        if left == 0:
            import signal

            os.kill(os.getpid(), signal.SIGKILL)


def _k(*parts) -> bytes:
    return "/".join(str(p) for p in parts).encode()


class Catalog:
    def __init__(self, path: str, readonly: bool = False):
        self.path = os.path.join(path, "catalog")
        try:
            self.env = lmdb.open(self.path, map_size=1 << 30, subdir=True, max_dbs=0,
                                 readonly=readonly, lock=True, metasync=True, sync=True,
                                 create=not readonly)
        except lmdb.Error as e:
            raise CorruptionError(f"catalog: cannot open the LMDB environment at {self.path}: {e}") from e
        with self.env.begin(write=not readonly) as txn:
            fmt = txn.get(b"meta/format")
            if fmt is None:
                if readonly:
                    raise CorruptionError(f"catalog: {self.path} holds no kvtier catalog")
                txn.put(b"meta/format", str(CATALOG_FORMAT).encode())
                txn.put(b"meta/next_no", b"0")
            elif fmt != str(CATALOG_FORMAT).encode():
                raise FormatVersionError(
                    f"catalog: store format {fmt.decode(errors='replace')} is not supported "
                    f"(this kvtier reads format {CATALOG_FORMAT})")

    def close(self):
        self.env.close()

    def collections(self) -> dict[str, dict]:
        out = {}
        with self.env.begin() as txn:
            cur = txn.cursor()
            if cur.set_range(b"coll/"):
                for k, v in cur:
                    if not k.startswith(b"coll/"):
                        break
                    try:
                        out[k[5:].decode()] = json.loads(v)
                    except ValueError as e:
                        raise CorruptionError(f"catalog: collection record {k!r} is not valid JSON") from e
        return out

    def next_no(self) -> int:
        with self.env.begin() as txn:
            return int(txn.get(b"meta/next_no", b"0"))

    def load(self, no: int) -> tuple[bytes, list[bytes]]:
        """The committed directory blob and id-map chunks of collection ``no``."""
        with self.env.begin() as txn:
            d = txn.get(_k("dir", f"{no:08d}"))
            if d is None:
                raise CorruptionError(f"catalog: collection {no} has no cluster directory")
            chunks = []
            cur = txn.cursor()
            prefix = _k("loc", f"{no:08d}") + b"/"
            if cur.set_range(prefix):
                for k, v in cur:
                    if not k.startswith(prefix):
                        break
                    chunks.append(bytes(v))
            return bytes(d), chunks

    def commit(self, next_no: int, records: list[tuple[str, dict, bytes, dict[int, bytes]]]):
        """One transaction: for each collection (name, params, dir blob, {chunk: blob})."""
        def write():
            kill_point("catalog.before_commit")
            with self.env.begin(write=True) as txn:
                txn.put(b"meta/next_no", str(next_no).encode())
                for name, params, dir_blob, chunks in records:
                    no = params["no"]
                    txn.put(_k("coll", name), json.dumps(params, sort_keys=True).encode())
                    txn.put(_k("dir", f"{no:08d}"), dir_blob)
                    for ch, blob in chunks.items():
                        txn.put(_k("loc", f"{no:08d}", f"{ch:012d}"), blob)
        try:
            write()
            kill_point("catalog.committed")
        except lmdb.MapFullError:
            self.env.set_mapsize(self.env.info()["map_size"] * 2 + sum(
                len(r[2]) + sum(len(b) for b in r[3].values()) for r in records))
            write()


class StoreLock:
    """An exclusive advisory lock on the store directory, held while it is open."""

    def __init__(self, path: str):
        import fcntl

        self.fd = os.open(os.path.join(path, "LOCK"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise StoreLockedError(
                f"store {path!r} is open in another process (or another Store object); "
                "close it there first") from None

    def release(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
