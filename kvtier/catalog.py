"""The catalog: an LMDB environment inside the store directory.

Keys (all bytes):
  meta/format             catalog format version (ASCII int)
  meta/next_no            next collection number (ASCII int)
  meta/verify             the last kvtier verify's findings (JSON, kvtier.verify.last_verified)
  coll/<name>             JSON parameters of a collection, with its number "no"
  dir/<no>                the engine's cluster directory blob for collection no
  loc/<no>/<chunk>        the engine's id-map chunk blobs

One flush is one write transaction, committed only after the data files were synced, so the
catalog never names data that is not on stable storage.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Any

import lmdb

from kvtier.errors import CorruptionError, FormatVersionError, StorageIOError, StoreLockedError

CATALOG_FORMAT = 1

_kill: dict[str, Any] = {"name": None, "left": -1}


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
        try:
            self._check_length()
            self._init_format(readonly)
        except BaseException:
            self.env.close()
            raise

    def _check_length(self):
        """LMDB maps the file and trusts it: a page past the end of a truncated data.mdb is a
        SIGBUS, not an error. Refuse a file shorter than the pages its meta page names."""
        data = os.path.join(self.path, "data.mdb")
        need = (self.env.info()["last_pgno"] + 1) * self.env.stat()["psize"]
        have = os.path.getsize(data) if os.path.exists(data) else 0
        if have < need:
            raise CorruptionError(f"catalog: {data} is truncated ({have} bytes, its last page ends at {need})")

    def _init_format(self, readonly):
        with _lmdb_errors("open"), self.env.begin(write=not readonly) as txn:
            fmt = txn.get(b"meta/format")
            if fmt is None:
                if readonly:
                    raise CorruptionError(f"catalog: {self.path} holds no kvtier catalog")
                data = glob.glob(os.path.join(os.path.dirname(self.path), "c*.kvd"))
                if data:  # an empty catalog over data files would forget (and reuse) them
                    raise CorruptionError(f"catalog: {self.path} is missing or empty but the store holds "
                                          f"{len(data)} data files: the catalog was lost")
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
        with _lmdb_errors("read"), self.env.begin() as txn:
            cur = txn.cursor()
            if cur.set_range(b"coll/"):
                for k, v in cur:
                    if not k.startswith(b"coll/"):
                        break
                    try:
                        name, params = k[5:].decode(), json.loads(v)
                    except ValueError as e:
                        raise CorruptionError(f"catalog: collection record {k!r} is not valid JSON") from e
                    out[name] = _check_params(name, params)
            listed = txn.get(b"meta/collections")
        if listed is not None:
            try:
                listed = json.loads(bytes(listed))
            except ValueError:
                listed = None
            if not isinstance(listed, list) or sorted(listed) != sorted(out):
                raise CorruptionError(f"catalog: the collection records ({sorted(out)}) do not match "
                                      f"the list of collections ({listed}): a damaged catalog page")
        return out

    def next_no(self) -> int:
        with _lmdb_errors("read"), self.env.begin() as txn:
            v = txn.get(b"meta/next_no", b"0")
        if not v.isdigit():
            raise CorruptionError(f"catalog: meta/next_no is not a number ({bytes(v)!r})")
        # never below a number in use: a damaged counter must not reuse (truncate) a data file
        return max([int(v)] + [p["no"] + 1 for p in self.collections().values()])

    def load(self, no: int) -> tuple[bytes, list[bytes]]:
        """The committed directory blob and id-map chunks of collection ``no``."""
        with _lmdb_errors("read"), self.env.begin() as txn:
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

    def get_meta(self, name: str):
        """The value of meta/<name> (bytes), None if absent."""
        with _lmdb_errors("read"), self.env.begin() as txn:
            v = txn.get(_k("meta", name))
        return None if v is None else bytes(v)

    def put_meta(self, name: str, value: bytes) -> None:
        """Sets meta/<name> in a transaction of its own (notes such as the last verify)."""
        try:
            with self.env.begin(write=True) as txn:
                txn.put(_k("meta", name), value)
        except lmdb.Error as e:
            raise StorageIOError(f"catalog: write of meta/{name} to {self.path} failed: {e}") from e

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
                # the names of every collection, so that a record lost to a damaged page
                # (LMDB pages carry no checksum) is noticed on open rather than missing quietly
                txn.put(b"meta/collections", json.dumps(sorted(_names(txn))).encode())
        try:
            try:
                write()
                kill_point("catalog.committed")
            except lmdb.MapFullError:
                self.env.set_mapsize(self.env.info()["map_size"] * 2 + sum(
                    len(r[2]) + sum(len(b) for b in r[3].values()) for r in records))
                write()
        except lmdb.Error as e:
            raise StorageIOError(f"catalog: commit to {self.path} failed: {e}") from e


def _names(txn) -> list[str]:
    cur = txn.cursor()
    out = []
    if cur.set_range(b"coll/"):
        for k in cur.iternext(values=False):
            if not k.startswith(b"coll/"):
                break
            out.append(bytes(k[5:]).decode())
    return out


class _lmdb_errors:
    """Turns an LMDB error (a damaged page, a failed read) into CorruptionError."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self):
        return self

    def __exit__(self, tp, e, tb):
        if tp is not None and issubclass(tp, lmdb.Error):
            raise CorruptionError(f"catalog: {self.what} failed: {e}") from e
        return False


# A collection record's fields and their types: a record missing one or holding another type
# is damaged (JSON carries no checksum of its own).
_PARAM_TYPES: dict[str, type | tuple[type, ...]] = {
    "no": int, "dim": int, "value_dim": int, "dtype": str, "metric": str, "policy": str,
    "init_cluster_size": int, "max_cluster_size": int, "kmeans_iters": int, "seed": int,
    "tau_factor": (int, float), "pending_budget": int, "local_window": int, "local_cluster_size": int}


def _check_params(name: str, p) -> dict:
    bad = not isinstance(p, dict) or any(
        not isinstance(p.get(k), t) or isinstance(p.get(k), bool) for k, t in _PARAM_TYPES.items())
    if not bad:
        from kvtier.config import DTYPES, METRICS, POLICIES

        bad = (p["dtype"] not in DTYPES or p["metric"] not in METRICS or p["policy"] not in POLICIES
               or not 0 <= p["no"] < 2**32 or p.get("name", name) != name)
    if bad:
        raise CorruptionError(f"catalog: the record of collection {name!r} is damaged ({str(p)[:200]})")
    return p


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
