"""Replay a captured trace through kvtier's public API the way a KV cache uses it.

For each (layer, KV head) one collection: the prefill's keys and values enter as one batch,
then each decoding step moves the token leaving the recent window into the store (one
``add`` of one entry). The first ``sinks`` positions and the last ``window`` positions are
always resident and never in the store. Every ``every`` steps the GQA group's queries
``retrieve`` clusters under a budget of ``budget`` x context entries, and the step's
attention recall is measured:

    recall = (attention mass of the fetched entries) / (attention mass of all stored entries)

with attention = softmax(q . k / sqrt(d)) over every position <= t, averaged over the query
heads of the group (docs/design.md §8, "Metrics").

Each decoding step ends with ``Store.step()``, as the torch adapter does, so the cache policy
sees the model's steps. A multi-turn trace (W3) lists its user turns in
``meta["user_spans"]``: their positions enter the store like any other, but they are a
prefill chunk, not decoding steps, so nothing is retrieved (or stepped) there.

With ``virtualize=True`` the replay runs layer by layer as decoding does, and keeps only the
layers in use in DRAM (docs/design.md §2.3): when layer l starts, layer l+1's group is brought back
from the swap area in the background (``Store.unpark(wait=False)``); when layer l is done,
its group is parked (``Store.park``).
"""
from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import kvtier

#: The store options of each flash layout the benchmarks compare (kvtier.bench.flash, kvtier bench).
LAYOUTS: dict[str, dict[str, Any]] = {"token": {"layout": "token"}, "clustered": {"layout": "clustered"},
                                      "colocated": {"layout": "colocated", "colocate_after": 32}}

@dataclass
class ReplayResult:
    policy: str
    budget: float
    recall: float                       # mean over steps, layers and heads
    oracle_recall: float                # token-level exact top-budget by attention (upper bound)
    steps: int
    retrieves: int
    fetched_per_retrieve: float
    read_ops_per_retrieve: float
    read_bytes_per_retrieve: float
    modeled_io_s_per_retrieve: float
    mean_read_entries: float
    clusters: float                     # mean over collections at the end
    mean_cluster_size: float
    mean_variance: float
    dram_peak_bytes: int
    dram_budget: int
    wall_s: float
    per_layer_recall: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def row(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("per_layer_recall", "extra")}


def _softmax_rows(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=-1, keepdims=True)
    return x


def group_recall(trace, layer: int, h: int, t: int, ids: np.ndarray, n_budget: int, sinks: int,
                 in_store: int) -> tuple[float, float]:
    """Attention recall at step t of the entries ``ids`` (store ids: position - sinks) that
    layer l, KV head h fetched, and the token-level oracle's at the same budget; the store
    holds positions [sinks, in_store)."""
    g = trace.group_size
    q = trace.queries[layer, h * g:(h + 1) * g, t].astype(np.float32)
    logits = (q @ trace.keys[layer, h, :t + 1].astype(np.float32).T) * (1.0 / math.sqrt(trace.head_dim))
    p = _softmax_rows(logits)
    stored = p[:, sinks:in_store]
    mass = stored.sum(axis=1)
    r = (p[:, ids + sinks].sum(axis=1) / np.maximum(mass, 1e-30)).mean()
    # token-level oracle at the same budget: the best entries for the group
    k_or = min(n_budget, stored.shape[1])
    if k_or:
        top = np.argpartition(-stored.max(axis=0), k_or - 1)[:k_or]
        o = (stored[:, top].sum(axis=1) / np.maximum(mass, 1e-30)).mean()
    else:
        o = 0.0
    return float(r), float(o)


def replay(trace, policy: str = "static", budget: float = 0.1, sinks: int = 4, window: int = 32,
           every: int = 4, layers: Iterable[int] | None = None, dram_budget="256MiB",
           device="ufs4.0", store_dir: str | None = None, progress=None, direct_io="auto",
           collect_stats: bool = False, store_kwargs: dict | None = None,
           virtualize: bool = False, park_keep_cache: bool = True, prefetch: bool = False,
           order: str = "step", **collection_kwargs) -> ReplayResult:
    """Runs the replay and returns averaged metrics. ``budget`` is a fraction of the
    context (positions <= t) or an int entry count; ``progress`` a tqdm-like callable.
    ``direct_io=False`` lets accuracy runs read through the page cache (the modeled device
    time is charged either way; only real time differs). ``prefetch=True`` does what the
    torch adapter does while a layer computes: before layer l retrieves, layer l+1's
    collections prefetch with the queries they retrieved with at the previous sampled step,
    so the loader threads read in the background (``stats()["prefetch_read_bytes"]``).

    ``order="step"`` (default) runs as decoding does: each step goes through every layer, and
    ends with ``Store.step()``. ``order="collection"`` replays one collection's whole sequence
    (its adds and retrieves over every step) before the next one's, as a store of independent
    vector collections queried one at a time would see them, and marks no steps: the access
    pattern a cache policy tuned for decoding's layer cycle must not lose on."""
    if order not in ("step", "collection"):
        raise ValueError(f"order: 'step' or 'collection' expected, got {order!r}")
    if order == "collection" and (virtualize or prefetch):
        raise ValueError("order='collection' replays without virtualize or prefetch")
    layers = list(range(trace.n_layers)) if layers is None else list(layers)
    g = trace.group_size
    d = trace.head_dim
    P, T = trace.prefill, trace.length
    if sinks + window >= P:
        raise ValueError(f"prefill ({P}) must exceed sinks + window ({sinks + window})")
    tmp = None
    if store_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="kvtier-replay-")
        store_dir = tmp.name
    steps = list(range(P, T, every))
    recalls, oracle = [], []
    per_layer: dict[int, list] = {layer: [] for layer in layers}
    fetched = 0
    n_retrieves = 0
    retrieve_s = 0.0
    t0 = time.perf_counter()
    store = kvtier.open(store_dir, dram_budget=dram_budget, device=device, direct_io=direct_io,
                        **(store_kwargs or {}))
    try:
        colls = {}
        for layer in layers:
            for h in range(trace.n_kv_heads):
                c = store.collection(f"L{layer}.H{h}", dim=d, value_dim=d, dtype="float16",
                                     policy=policy, **collection_kwargs)
                c.add(trace.keys[layer, h, sinks:P - window], trace.values[layer, h, sinks:P - window])
                colls[layer, h] = c
            if virtualize:
                store.park([colls[layer, h] for h in range(trace.n_kv_heads)])
        group = {layer: [colls[layer, h] for h in range(trace.n_kv_heads)] for layer in layers}
        store.reset_io_stats()
        if virtualize:  # the first layer, ahead of the first step (later ones: one layer ahead)
            store.unpark(group[layers[0]], wait=False)
        in_store = P - window  # positions [sinks, in_store) are stored

        last_q: dict = {}  # (layer, head) -> the query group of its last retrieve

        def recall_head(layer, h, t, n_budget, in_store):
            nonlocal fetched, n_retrieves, retrieve_s
            q = trace.queries[layer, h * g:(h + 1) * g, t].astype(np.float32)
            last_q[layer, h] = q
            t1 = time.perf_counter()
            got = colls[layer, h].retrieve(q, budget=n_budget)
            retrieve_s += time.perf_counter() - t1
            n_retrieves += 1
            fetched += len(got)
            r, o = group_recall(trace, layer, h, t, got.ids, n_budget, sinks, in_store)
            recalls.append(r)
            oracle.append(o)
            per_layer[layer].append(r)

        def recall_layer(layer, t, n_budget):
            for h in range(trace.n_kv_heads):
                recall_head(layer, h, t, n_budget, in_store)

        user = np.zeros(T, bool)  # positions of user turns after the prefill (W3)
        for a, b in trace.meta.get("user_spans", []):
            user[a:b] = True
        steps = [t for t in steps if not user[t]]
        if order == "collection":
            pairs = [(layer, h) for layer in layers for h in range(trace.n_kv_heads)]
            it_c = pairs if progress is None else progress(pairs, desc=f"replay {policy}", unit="collection")
            for layer, h in it_c:
                stored = P - window
                for t in range(P, T):
                    lo, stored = stored, max(stored, t - window + 1)
                    if lo < stored:
                        colls[layer, h].add(trace.keys[layer, h, lo:stored], trace.values[layer, h, lo:stored])
                    if (t - P) % every == 0 and not user[t]:
                        n_budget = math.ceil(budget * (t + 1)) if isinstance(budget, float) else int(budget)
                        recall_head(layer, h, t, n_budget, stored)
        it = range(P, T) if order == "step" else range(0)
        if progress is not None and order == "step":
            it = progress(it, desc=f"replay {policy}", unit="step")
        for t in it:
            # token t - window leaves the window and enters the store
            lo = in_store
            in_store = max(in_store, t - window + 1)
            sampled = (t - P) % every == 0 and not user[t]
            n_budget = math.ceil(budget * (t + 1)) if isinstance(budget, float) else int(budget)
            for i, layer in enumerate(layers):
                if virtualize:
                    store.unpark(group[layers[(i + 1) % len(layers)]], wait=False)
                if lo < in_store:
                    for h in range(trace.n_kv_heads):
                        colls[layer, h].add(trace.keys[layer, h, lo:in_store], trace.values[layer, h, lo:in_store])
                if sampled:
                    nxt = layers[(i + 1) % len(layers)]
                    if prefetch and (nxt, 0) in last_q:
                        for h in range(trace.n_kv_heads):
                            colls[nxt, h].prefetch(last_q[nxt, h], n_budget)
                    recall_layer(layer, t, n_budget)
                if virtualize:
                    store.park(group[layer], keep_cache=park_keep_cache)
            if not user[t]:
                store.step()

        st = store.stats()
        cs = [c.stats() for c in colls.values()]
    finally:
        store.close()
        if tmp is not None:
            tmp.cleanup()
    n = max(n_retrieves, 1)
    return ReplayResult(
        policy=policy, budget=budget, recall=float(np.mean(recalls)),
        oracle_recall=float(np.mean(oracle)), steps=len(steps), retrieves=n_retrieves,
        fetched_per_retrieve=fetched / n, read_ops_per_retrieve=st["read_ops"] / n,
        read_bytes_per_retrieve=st["read_bytes"] / n,
        modeled_io_s_per_retrieve=st["modeled_io_seconds"] / n,
        mean_read_entries=st["mean_read_entries"],
        clusters=float(np.mean([c["clusters"] for c in cs])),
        mean_cluster_size=float(np.mean([c["mean_cluster_size"] for c in cs])),
        mean_variance=float(np.mean([c["mean_variance"] for c in cs])),
        dram_peak_bytes=st["dram_peak_bytes"], dram_budget=st["dram_budget"],
        wall_s=time.perf_counter() - t0,
        per_layer_recall={layer: float(np.mean(v)) for layer, v in per_layer.items() if v},
        extra={"store": st, "collections": cs, "read_seconds": retrieve_s} if collect_stats else {},
    )


def replay_switch(traces: dict, policy: str = "adaptive", budget: float = 0.1, sinks: int = 4,
                  window: int = 32, every: int = 4, layers: Iterable[int] | None = None,
                  dram_budget="256MiB", device="ufs4.0", turn: int = 256, direct_io=False,
                  store_kwargs: dict | None = None, **collection_kwargs) -> dict:
    """Several conversations in one store under one DRAM budget, taking turns (the session
    tiering a chat app on a phone needs): ``traces`` maps a name to a trace. Each conversation
    has its own collections (``<name>.L<l>.H<h>``), prefilled in turn and then parked. They
    then decode ``turn`` steps each, round robin, until every trace ends: a conversation's
    collections are unparked when its turn starts and parked with their cached clusters
    (``keep_cache=True``) when it ends, so what the budget can keep of a conversation's cache
    survives the others' turns. User turns of a multi-turn trace enter the store without
    decoding steps, as in :func:`replay`. Returns the store's stats, the recall over every
    retrieve of every conversation and the decoding steps made."""
    names = list(traces)
    if not names:
        raise ValueError("traces: at least one conversation expected")
    tmp = tempfile.TemporaryDirectory(prefix="kvtier-switch-")
    store = kvtier.open(tmp.name, dram_budget=dram_budget, device=device, direct_io=direct_io,
                        **(store_kwargs or {}))
    recalls: list = []
    n_retrieves = steps = 0
    try:
        conv = {}
        for name in names:
            tr = traces[name]
            ls = list(range(tr.n_layers)) if layers is None else list(layers)
            if tr.prefill <= sinks + window:
                raise ValueError(f"{name}: prefill ({tr.prefill}) must exceed sinks + window ({sinks + window})")
            colls = {}
            for layer in ls:
                for h in range(tr.n_kv_heads):
                    c = store.collection(f"{name}.L{layer}.H{h}", dim=tr.head_dim, value_dim=tr.head_dim,
                                         dtype="float16", policy=policy, **collection_kwargs)
                    c.add(tr.keys[layer, h, sinks:tr.prefill - window], tr.values[layer, h, sinks:tr.prefill - window])
                    colls[layer, h] = c
            user = np.zeros(tr.length, bool)
            for a, b in tr.meta.get("user_spans", []):
                user[a:b] = True
            # parked and brought back a layer (its KV heads) at a time, as the torch adapter
            # does: one layer's image at a time in DRAM
            groups = [[colls[layer, h] for h in range(tr.n_kv_heads)] for layer in ls]
            conv[name] = {"trace": tr, "layers": ls, "colls": colls, "groups": groups, "t": tr.prefill,
                          "in_store": tr.prefill - window, "user": user}
            for grp in groups:
                store.park(grp)
        store.reset_io_stats()
        while any(cv["t"] < cv["trace"].length for cv in conv.values()):
            for name in names:
                cv = conv[name]
                tr, colls, user = cv["trace"], cv["colls"], cv["user"]
                if cv["t"] >= tr.length:
                    continue
                for grp in cv["groups"]:
                    store.unpark(grp)
                for t in range(cv["t"], min(cv["t"] + turn, tr.length)):
                    lo, cv["in_store"] = cv["in_store"], max(cv["in_store"], t - window + 1)
                    sampled = (t - tr.prefill) % every == 0 and not user[t]
                    n_budget = math.ceil(budget * (t + 1)) if isinstance(budget, float) else int(budget)
                    for layer in cv["layers"]:
                        for h in range(tr.n_kv_heads):
                            if lo < cv["in_store"]:
                                hi = cv["in_store"]
                                colls[layer, h].add(tr.keys[layer, h, lo:hi], tr.values[layer, h, lo:hi])
                            if sampled:
                                q = tr.queries[layer, h * tr.group_size:(h + 1) * tr.group_size, t].astype(np.float32)
                                got = colls[layer, h].retrieve(q, budget=n_budget)
                                r, _ = group_recall(tr, layer, h, t, got.ids, n_budget, sinks, cv["in_store"])
                                recalls.append(r)
                                n_retrieves += 1
                    if not user[t]:
                        store.step()
                        steps += 1
                    cv["t"] = t + 1
                for grp in cv["groups"]:
                    store.park(grp, keep_cache=True)
        st = store.stats()
    finally:
        store.close()
        tmp.cleanup()
    return {"store": st, "recall": float(np.mean(recalls)) if recalls else float("nan"),
            "retrieves": n_retrieves, "decode_steps": steps}
