"""Exceptions raised by kvtier.

Every engine error code maps to exactly one class through ``ENGINE_ERRORS`` (kvtier's own
negative codes) and ``ERRNO_ERRORS`` (system errno values); argument checks in the Python
layer raise :class:`InvalidArgumentError` naming the argument.
"""
from __future__ import annotations

import errno as _errno
from typing import Any


class KvtierError(Exception):
    """Base class of every kvtier error. ``code`` is the engine's error code, if any."""

    code: int = 0

    def __init__(self, message: str, code: int = 0):
        super().__init__(message)
        self.code = code


class InvalidArgumentError(KvtierError, ValueError):
    """An argument is of the wrong type, shape, dtype or range; nothing was changed."""


class CorruptionError(KvtierError):
    """Data read back failed a checksum or does not match the catalog. Where the engine names
    the damage, ``collection`` is the collection's name and ``ids`` its damaged ids (int64)."""

    collection: str | None = None
    ids: Any = None


class BudgetError(KvtierError, MemoryError):
    """The DRAM budget cannot hold what the operation must keep resident."""


class NotFoundError(KvtierError, LookupError):
    """An id (or collection) that does not exist."""


class FormatVersionError(KvtierError):
    """The store was written by an incompatible format version."""


class StoreClosedError(KvtierError, RuntimeError):
    """The store (or collection) was used after close()."""


class StoreLockedError(KvtierError, RuntimeError):
    """Another process holds the store open for writing."""


class StorageIOError(KvtierError, OSError):
    """A system call on a data file failed; ``errno`` holds the system's code."""

    def __init__(self, message: str, code: int = 0):
        KvtierError.__init__(self, message, code)
        self.errno = code
        self.strerror = message


class StorageFullError(StorageIOError):
    """The device is full (ENOSPC or EDQUOT)."""


class InjectedFaultError(StorageIOError):
    """A fault injected by a test hook."""


# The tables: one code, one class. Codes mirror engine_c/include/kvtier.h.
ENGINE_ERRORS: dict[int, type[KvtierError]] = {
    -30001: InvalidArgumentError,
    -30002: CorruptionError,
    -30003: BudgetError,
    -30004: NotFoundError,
    -30005: FormatVersionError,
    -30006: StoreClosedError,
    -30007: InjectedFaultError,
}
ERRNO_ERRORS: dict[int, type[KvtierError]] = {
    _errno.ENOSPC: StorageFullError,
    _errno.EDQUOT: StorageFullError,
}


def error_class(code: int) -> type[KvtierError]:
    """The exception class for an engine return code."""
    if code < 0:
        return ENGINE_ERRORS.get(code, KvtierError)
    return ERRNO_ERRORS.get(code, StorageIOError)
