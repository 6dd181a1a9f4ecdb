"""What every adapter does the same way, whatever runtime it binds kvtier to.

- :class:`StoreOwner`: the store an adapter decodes into, opened from a path, made in a
  temporary directory, or the caller's own; closing the adapter (``close()`` or garbage
  collection through :meth:`StoreOwner.finalize`) closes what the adapter opened, removes
  what it made, then runs the adapter's own cleanup.
- :func:`open_grid`: one collection per (tiered layer, KV head), named from one pattern.
- :func:`add_layer`, :func:`retrieve_layer`, :func:`prefetch_layer`: a layer's KV heads in one
  call each (an add per head, one engine call for all heads' retrieves), into buffers reused
  from step to step (:func:`layer_buffers`).
- :class:`Counters` and :func:`adapter_stats`: the counts every adapter reports, under one set
  of names, merged with the store's figures into a :class:`kvtier.stats.Stats`.

Counter names (both adapters): ``retrieves`` (collection retrieves: one per layer, KV head
and retrieval), ``fetched_entries`` (entries they returned) and ``fetched_per_retrieve`` (their
mean). ``fetched_per_step`` and ``estimated_per_step``, TieredCache's names for
``fetched_per_retrieve`` and ``estimated_per_retrieve`` in kvtier 0.1, stay in its ``stats()``
as aliases (:data:`ALIASES`) for one release, hidden from the grouped views.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

import kvtier
from kvtier.errors import InvalidArgumentError
from kvtier.stats import Stats

#: Old stats names kept for one release -> the name they stand for.
ALIASES = {"fetched_per_step": "fetched_per_retrieve", "estimated_per_step": "estimated_per_retrieve"}


class StoreOwner:
    """The store of one adapter and whether the adapter owns it.

    ``store``: None (a temporary store in a new directory named ``prefix...``, removed on
    close), a path (opened here and closed on close) or an open ``kvtier.Store`` (the caller's:
    left open). ``open_kw`` go to :func:`kvtier.open` when the store is opened here.
    ``close()`` is idempotent; callbacks registered with :meth:`on_close` run after the store
    is closed, even when closing it raised."""

    def __init__(self, store: Any = None, *, prefix: str, arg: str = "store", **open_kw: Any):
        self.tmpdir: str | None = None
        self.owned = False
        self._then: list[tuple[Callable[..., Any], tuple]] = []
        if store is None:
            self.tmpdir = tempfile.mkdtemp(prefix=prefix)
            try:
                self.store = kvtier.open(self.tmpdir, **open_kw)
            except BaseException:
                shutil.rmtree(self.tmpdir, ignore_errors=True)
                raise
            self.owned = True
        elif isinstance(store, kvtier.Store):
            self.store = store
        elif isinstance(store, (str, os.PathLike)):
            self.store = kvtier.open(store, **open_kw)
            self.owned = True
        else:
            raise InvalidArgumentError(f"{arg}: None, a path or a kvtier.Store expected, got {store!r}")

    def on_close(self, fn: Callable[..., Any], *args: Any) -> None:
        """Runs ``fn(*args)`` when this owner closes (after the store)."""
        self._then.append((fn, args))

    def finalize(self, adapter: object) -> weakref.finalize:
        """Closes this owner when ``adapter`` is garbage collected, or when the returned
        finalizer is called (``adapter.close()``); ``.alive`` is False once it ran."""
        return weakref.finalize(adapter, self.close)

    def close(self) -> None:
        then, self._then = self._then, []
        try:
            if self.owned and not self.store.closed:
                self.store.close()
        finally:
            self.owned = False
            if self.tmpdir is not None:
                shutil.rmtree(self.tmpdir, ignore_errors=True)
                self.tmpdir = None
            for fn, args in then:
                fn(*args)


def open_grid(store: kvtier.Store, name: str, layers: Iterable[int], heads: int,
              **collection_kwargs: Any) -> list[list[kvtier.Collection]]:
    """One collection per (layer, KV head): ``name.format(layer=l, head=h)``, made or opened
    with ``collection_kwargs``; one row per layer of ``layers``, in their order."""
    return [[store.collection(name.format(layer=layer, head=h), **collection_kwargs) for h in range(heads)]
            for layer in layers]


def add_layer(row: Sequence[kvtier.Collection], heads: Iterable[tuple[Any, Any]], first: int | None = None) -> None:
    """Adds each KV head's (keys, values) of ``heads`` to its collection of ``row``, in order.
    ``first``: the id every collection must give the first of them (the collections of an
    adapter receive the same rows in the same order; one out of step is a bug, raised)."""
    for coll, (k, v) in zip(row, heads, strict=True):
        ids = coll.add(k, v)
        if first is not None and ids[0] != first:
            raise RuntimeError(f"internal: collection {coll.name} is out of step (id {ids[0]}, expected {first})")


def layer_buffers(out: kvtier.RetrievedMany | None, heads: int, want: int, dim: int, value_dim: int,
                  dtype: Any) -> kvtier.RetrievedMany:
    """``out`` when it holds ``want`` entries per head, else new buffers with room for a
    quarter more (the budget grows with the context: reallocated every quarter, not every
    step). Zeros, not empty: rows past a head's count may be read masked (torch's attention),
    and a masked row must hold finite numbers."""
    if out is not None and out.ids.shape[1] >= want:
        return out
    cap = want + want // 4 + 64
    return kvtier.RetrievedMany(np.full((heads, cap), -1, np.int64), np.zeros((heads, cap, dim), dtype),
                                np.zeros((heads, cap, value_dim), dtype), np.full((heads, cap), -1, np.int32),
                                np.zeros(heads, np.uint64))


def retrieve_layer(store: kvtier.Store, row: Sequence[kvtier.Collection], queries: np.ndarray, budget: int,
                   out: kvtier.RetrievedMany, *, checked: bool = True,
                   read_ahead: bool = False) -> kvtier.RetrievedMany:
    """One engine call retrieving ``budget`` entries for each KV head of a layer: head h's
    query group ``queries[h]`` ([heads, rows, dim] float32) in ``row[h]``, into ``out``.

    ``checked=False`` calls the engine directly, for a caller whose arguments are its own
    (collections of one shape, C-contiguous float32 queries from the model, ``out`` from
    :func:`layer_buffers` large enough): the public call's checks then cost more than the
    engine's work at a few hundred entries per head. ``read_ahead`` (with ``checked=False``)
    first queues every head's reads on the store's loader threads (:func:`prefetch_layer`'s,
    the same queries and budget: exactly what each head's retrieve reads), so that the heads'
    reads are in flight together rather than one head's after another's."""
    if checked:
        if read_ahead:
            raise ValueError("retrieve_layer: read_ahead is for checked=False")
        return store.retrieve_many([(coll, queries[h], budget) for h, coll in enumerate(row)], out=out)
    budgets = np.full(len(row), budget, np.uint64)
    with store._gate:
        if read_ahead:
            _queue(row, queries, budget)
        store._engine.retrieve_batch([c._h for c in row], queries, budgets, out.ids, out.keys, out.values,
                                     out.clusters, out.counts)
    return out


def _queue(row: Sequence[kvtier.Collection], queries: np.ndarray, budget: int) -> int:
    """Each head's prefetch, the store's gate held by the caller; the clusters queued."""
    return sum(int(coll._h.prefetch(queries[h], budget)) for h, coll in enumerate(row))


def prefetch_layer(store: kvtier.Store, row: Sequence[kvtier.Collection], queries: np.ndarray, budget: int, *,
                   checked: bool = True) -> int:
    """Queues on the store's loader threads what :func:`retrieve_layer` with these arguments
    would read from flash; returns the clusters queued. ``checked=False``: as
    :func:`retrieve_layer`'s."""
    if checked:
        return store.prefetch([(coll, queries[h], budget) for h, coll in enumerate(row)])
    with store._gate:
        return _queue(row, queries, budget)


class Counters:
    """An adapter's counts (``c``) and wall times in seconds (``t``): ``retrieves`` and
    ``fetched_entries`` first, then the adapter's own."""

    def __init__(self, counts: Iterable[str] = (), seconds: Iterable[str] = ()):
        self.c: dict[str, int] = dict.fromkeys(("retrieves", "fetched_entries", *counts), 0)
        self.t: dict[str, float] = dict.fromkeys(seconds, 0.0)

    def per_retrieve(self, key: str = "fetched_entries") -> float:
        """``c[key]`` per retrieve (0.0 before the first)."""
        return self.c[key] / self.c["retrieves"] if self.c["retrieves"] else 0.0

    def retrieval(self) -> dict:
        """The retrieval counts under the names every adapter reports."""
        return {"retrieves": self.c["retrieves"], "fetched_entries": self.c["fetched_entries"],
                "fetched_per_retrieve": self.per_retrieve()}


def adapter_stats(own: dict, store: dict, keep: Iterable[str] | None = None, engine: Iterable[str] = (),
                  aliases: dict[str, str] | None = None) -> Stats:
    """An adapter's ``stats()``: its own figures; ``aliases`` (old name -> new, e.g.
    :data:`ALIASES`) beside the new names; the store's figures (``keep`` of them, None: all)
    where the adapter has none of that name; the store's whole stats under ``"store"``
    (hidden from the grouped views, as the aliases are). ``engine``: keys of ``own`` grouped
    with the engine's, not the adapter's."""
    out = dict(own)
    old_names = [old for old, new in (aliases or {}).items() if new in out]
    for old in old_names:
        out[old] = out[(aliases or {})[old]]
    wanted = store if keep is None else [k for k in keep if k in store]
    for k in wanted:
        out.setdefault(k, store[k])
    out["store"] = store
    return Stats(out, adapter_keys=set(own) - set(engine), hidden=("store", *old_names))
