"""A placement model for co-retrieval segments (issue 29), driven by the engine's own events.

record.py replays a trace through a probed engine and logs, per collection, every append
(which cluster an entry joined), every retrieve's selection (clusters in score order, their
sizes, entries still in DRAM, whether cached) and every split (which entries went to which
child). This model replays those events against candidate layouts and reports what the
device would see. It answers, before any format is built:

1. how many clusters a retrieve misses (the cache serves the rest), and what one read per
   retrieve would give (the ceiling of any placement);
2. entries per gap-free read for linear orders of the clusters on flash: creation order
   (a log: split children appended at the end, as today's pools place them), split-tree order
   (a split's children where their parent was), and a greedy co-retrieval chain built with
   hindsight from every selection of the run (an upper bound for any co-retrieval matrix);
   reading only missed clusters, or also the cached selected clusters that close a gap;
3. the same orders with no cache at all (every selected cluster read): how contiguous
   selections are in themselves;
4. with an LRU cache model (entries per collection): read-ahead of the flash segment around a
   miss, eviction by whole segments, read-ahead of the next-ranked clusters (needs the
   trace), and what submitting a layer's reads together does to modeled time;
5. split write bytes: both children copied (today) or the larger child in place;
6. appends per cluster generation (creation to split), which decides in-place growth room;
7. KV-head pairing: do the clusters that two KV heads of a layer miss at the same step hold
   the same tokens (needs the trace)?

    python tools/layout_model/model.py EVENTS [EVENTS...] [--trace W2:512:2048] [--cap 300]
        [--md out.md] [--json out.json]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from events import Retrieve, Split, parse  # noqa: E402

ESZ = 272                # record bytes (fp16, dim 64 key and value, 16-byte header)
RPP = 15                 # records per 4 KiB page
LAT, IOPS, BW = 100e-6, 120e3, 2.9e9   # the ufs4.0 profile
LAYERS = [0, 3, 6, 9, 12, 15, 18, 21, 24, 27]
SINKS = 4


def device_time(ops, entries):
    return LAT + max(ops / IOPS, entries * ESZ / BW) if ops else 0.0


def prefill(ev):
    """Sizes of the first partition (the appends before the first other event) and where it ends."""
    n = collections.Counter()
    i = 0
    while i < len(ev) and isinstance(ev[i], tuple):
        n[ev[i][1]] += 1
        i += 1
    return n, i


def runs_of(pos, need, sel, sizes):
    """Gap-free reads of one retrieve under a linear order (pos: cluster -> place): runs of
    consecutive selected clusters, kept only when they hold a missed one and trimmed to the
    missed ones at both ends; `sel` = need reads missed clusters only. Entries per read."""
    idx = sorted((pos[x], x) for x in sel)
    runs = []
    for p, x in idx:
        if runs and runs[-1][-1][0] == p - 1:
            runs[-1].append((p, x))
        else:
            runs.append([(p, x)])
    out = []
    for r in runs:
        flags = [x in need for _, x in r]
        if not any(flags):
            continue
        a = flags.index(True)
        b = len(flags) - flags[::-1].index(True)
        out.append(sum(sizes[x] for _, x in r[a:b]))
    return out


# ---- 1. what a retrieve misses ---------------------------------------------------------------

def miss_structure(per):
    nm, me, ns, se, newc = [], [], [], [], [0, 0]
    for ev in per.values():
        prev = set()
        for e in ev:
            if isinstance(e, Retrieve):
                miss = [s for s in e.sel if not s.cached and s.n - s.pend > 0]
                nm.append(len(miss))
                me.append(sum(s.n - s.pend for s in miss))
                ns.append(len(e.sel))
                se.append(sum(s.n for s in e.sel))
                newc[0] += len(miss)
                newc[1] += sum(1 for s in miss if s.cl not in prev)
                prev = set(s.cl for s in e.sel)
            elif isinstance(e, Split) and e.src in prev:
                prev.update(cl for cl, _ in e.children)
    nm, me = np.array(nm), np.array(me)
    jac = []
    for ev in per.values():
        prev = None
        for e in ev:
            if isinstance(e, Retrieve):
                s = set(x.cl for x in e.sel)
                if prev is not None:
                    jac.append(len(s & prev) / len(s | prev))
                prev = s
    return {"retrieves": int(len(nm)), "share_with_miss": float((nm > 0).mean()),
            "misses_per_retrieve_with_miss": float(nm[nm > 0].mean()),
            "missed_entries_per_retrieve_with_miss": float(me[nm > 0].mean()),
            "selected_clusters": float(np.mean(ns)), "selected_entries": float(np.mean(se)),
            "share_of_misses_new_to_selection": newc[1] / max(1, newc[0]),
            "selection_jaccard_consecutive": float(np.mean(jac))}


# ---- 2, 3. linear orders -----------------------------------------------------------------------

def chain_order(ev):
    """Greedy chain over the whole run's co-selection counts (hindsight)."""
    co = collections.defaultdict(collections.Counter)
    freq = collections.Counter()
    for e in ev:
        if isinstance(e, Retrieve):
            s = [x.cl for x in e.sel]
            for a in s:
                freq[a] += 1
                for b in s:
                    if a != b:
                        co[a][b] += 1
    order, placed = [], set()
    while len(placed) < len(freq):
        nxt = None
        if order and co[order[-1]]:
            cand = [(v, k) for k, v in co[order[-1]].items() if k not in placed]
            nxt = max(cand)[1] if cand else None
        if nxt is None:
            nxt = max((freq[k], k) for k in set(freq) - placed)[1]
        order.append(nxt)
        placed.add(nxt)
    return order


def order_reads(per, kind):
    """Entries per gap-free read under an order: misses only, misses bridged by cached
    selected clusters, and every selected cluster read (no cache)."""
    out = {"miss": [], "bridged": [], "whole_selection": []}
    for ev in per.values():
        n, i = prefill(ev)
        if kind == "chain":
            order = chain_order(ev)
            extra = [cl for cl in sorted(n) if cl not in set(order)]
            order += extra
        else:
            order = sorted(n)
        pos = {cl: k for k, cl in enumerate(order)}
        for e in ev[i:]:
            if isinstance(e, Retrieve):
                for s in e.sel:
                    if s.cl not in pos:
                        pos[s.cl] = len(pos)
                        order.append(s.cl)
                sizes = {s.cl: s.n - s.pend for s in e.sel}
                need = set(s.cl for s in e.sel if not s.cached and s.n - s.pend > 0)
                sel = set(s.cl for s in e.sel if s.n - s.pend > 0)
                if need:
                    out["miss"] += runs_of(pos, need, need, sizes)
                    out["bridged"] += runs_of(pos, need, sel, sizes)
                out["whole_selection"] += runs_of(pos, sel, sel, sizes)
            elif isinstance(e, Split) and kind != "chain":
                new = [cl for cl, _ in e.children]
                if kind == "tree" and e.src in order:   # children where the parent was
                    k = order.index(e.src)
                    order[k:k + 1] = new
                else:                    # log: the children appended at the end
                    if e.src in order:
                        order.remove(e.src)
                    order += [cl for cl in new if cl not in order]
                pos = {cl: k for k, cl in enumerate(order)}
    return out


# ---- 4. an LRU cache model ---------------------------------------------------------------------

class Lru:
    def __init__(self, cap):
        self.cap, self.used, self.d = cap, 0, collections.OrderedDict()

    def put(self, cl, size, hot=True, protect=()):
        if cl in self.d:
            self.used -= self.d.pop(cl)
        self.d[cl] = size
        self.used += size
        if not hot:
            self.d.move_to_end(cl, last=False)
        self.shrink(protect)

    def shrink(self, protect=(), group=None):
        while self.used > self.cap and self.d:
            victim = next((k for k in self.d if k not in protect), None)
            if victim is None:
                return
            for v in (group(victim) if group else [victim]):
                if v in self.d and v not in protect:
                    self.used -= self.d.pop(v)

    def drop(self, cl):
        if cl in self.d:
            self.used -= self.d.pop(cl)


def segments(order, n, seg_max):
    """The order cut into consecutive segments of at most seg_max entries: each cluster's
    segment, and each segment's clusters."""
    seg_of, sid, acc = {}, 0, 0
    members = collections.defaultdict(list)
    for cl in order:
        if acc + n[cl] > seg_max and acc > 0:
            sid, acc = sid + 1, 0
        seg_of[cl] = sid
        members[sid].append(cl)
        acc += n[cl]
    return seg_of, members


def cache_model(per, cap, mode="cluster", seg_max=0, scores=None, margin=0):
    """Replays selections against an LRU cache of `cap` entries per collection over the
    split-tree order. Modes: 'cluster' (read the missed clusters, bridged), 'readahead'
    (read the whole tree-order segment of up to seg_max entries around each miss, the
    unselected clusters cached at the cold end), 'segment_evict' (evict whole segments),
    'margin' (also read the next-ranked clusters, up to `margin` entries; needs scores).
    Returns totals and per-collection batches (ops, entries) per retrieve."""
    tot = collections.Counter()
    batches = {}
    for c, ev in per.items():
        n, i = prefill(ev)
        order = sorted(n)
        lru = Lru(cap)
        bl = []
        tracker = scores(c) if scores else None
        if tracker:
            for e in ev[:i]:
                tracker.append(e[1])
        for e in ev[i:]:
            if isinstance(e, tuple):
                n[e[1]] += 1
                if e[1] in lru.d:
                    lru.put(e[1], n[e[1]])
                if tracker:
                    tracker.append(e[1])
                continue
            if isinstance(e, Split):
                k = order.index(e.src) if e.src in order else len(order)
                order[k:k + 1] = [cl for cl, _ in e.children]
                lru.drop(e.src)
                for cl, cnt in e.children:
                    n[cl] = cnt
                    lru.put(cl, cnt)  # a split's children are in DRAM, just updated
                if tracker:
                    tracker.split(e)
                continue
            for s in e.sel:
                n[s.cl] = s.n
                if s.cl not in order:  # made outside a split (local's staging cluster)
                    order.append(s.cl)
            sel = [s.cl for s in e.sel if n[s.cl] > 0]
            selset = set(sel)
            miss = [cl for cl in sel if cl not in lru.d]
            for cl in sel:
                if cl in lru.d:
                    lru.d.move_to_end(cl)
            tot["retrieves"] += 1
            tot["selected"] += len(sel)
            tot["missed"] += len(miss)
            ranked = tracker.rank(e) if tracker and miss else None
            if not miss:
                bl.append((0, 0))
                continue
            tot["retrieves_with_miss"] += 1
            pos = {cl: k for k, cl in enumerate(order)}
            ops = ent = useful = 0
            if mode == "readahead":
                seg_of, members = segments(order, n, seg_max)
                touched = sorted(set(seg_of[cl] for cl in miss))
                runs = []
                for sgi in touched:
                    if runs and runs[-1][-1] == sgi - 1:
                        runs[-1].append(sgi)
                    else:
                        runs.append([sgi])
                for r in runs:
                    cls = [cl for sg in r for cl in members[sg]]
                    ops += 1
                    ent += sum(n[cl] for cl in cls)
                    useful += sum(n[cl] for cl in cls if cl in selset)
                    for cl in cls:
                        if cl not in lru.d or cl in selset:
                            lru.put(cl, n[cl], hot=cl in selset, protect=selset)
            else:
                reads = runs_of(pos, set(miss), selset, {cl: n[cl] for cl in sel})
                ops, ent = len(reads), sum(reads)
                useful = ent
                extra = []
                if mode == "margin" and ranked is not None:
                    acc = 0
                    for cl in ranked:
                        if acc >= margin:
                            break
                        if cl not in selset and cl not in lru.d and n[cl] > 0:
                            extra.append(cl)
                            acc += n[cl]
                    ops += len(extra)
                    ent += acc
                group = None
                if mode == "segment_evict":
                    seg_of, by = segments(order, n, seg_max)
                    group = lambda v: by[seg_of.get(v, -1)] or [v]  # noqa: E731
                for cl in miss:
                    lru.d[cl] = n[cl]
                    lru.used += n[cl]
                for cl in extra:
                    lru.put(cl, n[cl], hot=False, protect=selset)
                lru.shrink(selset, group)
            tot["ops"] += ops
            tot["entries_read"] += ent
            tot["useful_entries_read"] += useful
            bl.append((ops, ent))
        batches[c] = bl
    return tot, batches


def modeled_ms(batches, per_layer):
    """Modeled I/O per retrieval step: one device batch per retrieve, or per layer (a layer's
    KV heads submitted together)."""
    nb = min(len(b) for b in batches.values())
    t = 0.0
    cs = sorted(batches)
    groups = [cs[i:i + 3] for i in range(0, len(cs), 3)] if per_layer else [[c] for c in cs]
    for g in groups:
        for i in range(nb):
            t += device_time(sum(batches[c][i][0] for c in g), sum(batches[c][i][1] for c in g))
    return t / nb * 1e3


class ScoreTracker:
    """Each cluster's mean key, kept from the events (appends and splits, with the trace's
    keys), so that a retrieve's clusters can be ranked by the engine's score: the best over
    the query group of q . mean."""

    def __init__(self, trace, prefill_len, c):
        g = trace.group_size
        l, h = LAYERS[c // 3], c % 3
        self.K = trace.keys[l, h, SINKS:].astype(np.float32)
        self.Q = trace.queries[l, h * g:(h + 1) * g].astype(np.float32)
        self.P = prefill_len
        self.sums, self.n, self.nid = {}, collections.Counter(), 0

    def append(self, cl):
        self.sums[cl] = self.sums.get(cl, 0) + self.K[self.nid]
        self.n[cl] += 1
        self.nid += 1

    def split(self, e):
        for (cl, cnt), ids in zip(e.children, e.ids):
            self.n[cl] = cnt
            self.sums[cl] = self.K[np.array(ids)].sum(0)

    def rank(self, e):
        cls = [cl for cl in self.n if self.n[cl] > 0]
        C = np.stack([self.sums[cl] / self.n[cl] for cl in cls])
        sc = (self.Q[:, self.P + e.step] @ C.T).max(0)
        return [cls[k] for k in np.argsort(-sc)]


# ---- 5, 6. split writes, appends ---------------------------------------------------------------

def split_and_appends(per, steps):
    both = inplace = appended = 0
    apps, born = [], []
    for ev in per.values():
        n, i = prefill(ev)
        a, b = collections.Counter(), dict(n)
        for e in ev[i:]:
            if isinstance(e, tuple):
                a[e[1]] += 1
                appended += 1
            elif isinstance(e, Split):
                cnt = [c for _, c in e.children]
                both += sum(cnt)
                inplace += sum(cnt) - max(cnt)
                apps.append(a[e.src])
                born.append(b.get(e.src, 0))
                for cl, k in e.children:
                    a[cl], b[cl] = 0, k
        for cl in b:
            apps.append(a[cl])
            born.append(b[cl])
    apps = np.array(apps)
    kib = lambda x: x * ESZ / steps / 1024  # noqa: E731
    return {"appended_kib_per_step": kib(appended), "split_both_children_kib_per_step": kib(both),
            "split_larger_in_place_kib_per_step": kib(inplace),
            "appends_per_generation_mean": float(apps.mean()),
            "appends_per_generation_p50_p90": [float(x) for x in np.percentile(apps, [50, 90])],
            "generations_without_appends": float((apps == 0).mean()),
            "appended_share_in_generations_with_15_or_more": float(apps[apps >= 15].sum() / max(1, apps.sum())),
            "appends_over_birth_size": float(apps.sum() / max(1, sum(born)))}


# ---- 7. KV-head pairing ------------------------------------------------------------------------

def head_pairing(per):
    """For each cluster a KV head misses, the best token Jaccard with the clusters another KV
    head of the same layer misses at the same retrieve, against as many random clusters."""
    rng = np.random.default_rng(0)
    tl = {c: [] for c in per}
    for c, ev in per.items():
        r = 0
        for e in ev:
            if isinstance(e, Retrieve):
                r += 1
            tl[c].append((r, e))
    state = {c: [0, collections.defaultdict(set), 0] for c in per}
    same, rand = [], []
    for r in range(1, max(t[-1][0] for t in tl.values()) + 1):
        miss = {}
        for c in per:
            st = state[c]
            while st[0] < len(tl[c]) and tl[c][st[0]][0] < r:
                e = tl[c][st[0]][1]
                if isinstance(e, tuple):
                    st[1][e[1]].add(st[2])
                    st[2] += 1
                elif isinstance(e, Split):
                    for (cl, _), ids in zip(e.children, e.ids):
                        st[1][cl] = set(ids)
                st[0] += 1
            if st[0] < len(tl[c]) and isinstance(tl[c][st[0]][1], Retrieve):
                e = tl[c][st[0]][1]
                miss[c] = [s.cl for s in e.sel if not s.cached and s.n - s.pend > 0]
                st[0] += 1
        for L in range(len(per) // 3):
            for a in range(3 * L, 3 * L + 3):
                for b in range(a + 1, 3 * L + 3):
                    if not miss.get(a) or not miss.get(b):
                        continue
                    ma, mb = state[a][1], state[b][1]
                    pool = [cl for cl in mb if mb[cl]]
                    for x in miss[a]:
                        sx = ma[x]
                        if not sx:
                            continue
                        same.append(max(len(sx & mb[y]) / len(sx | mb[y]) for y in miss[b]))
                        ys = rng.choice(pool, size=min(len(miss[b]), len(pool)), replace=False)
                        rand.append(max(len(sx & mb[y]) / len(sx | mb[y]) for y in ys))
    return {"co_missed_token_jaccard": float(np.mean(same)), "random_token_jaccard": float(np.mean(rand))}


# ---- main -----------------------------------------------------------------------------------------

def summarize(reads):
    a = np.asarray(reads)
    return {"mean": float(a.mean()), "p50": float(np.median(a)), "p90": float(np.percentile(a, 90)),
            "max": int(a.max()), "reads": int(len(a))}


def analyse(path, cap, trace=None, margin=0):
    per, steps = parse(path)
    res = {"events": os.path.basename(path), "steps": steps, "collections": len(per)}
    if os.path.exists(path + ".json"):  # record.py's summary of the engine's own run
        with open(path + ".json") as f:
            eng = json.load(f)
        res["engine"] = eng
        res["engine_hit_rate"] = eng["cache_hits"] / max(1, eng["cache_hits"] + eng["cache_misses"])
    res["misses"] = miss_structure(per)
    res["orders"] = {}
    for kind in ("log", "tree", "chain"):
        r = order_reads(per, kind)
        res["orders"][kind] = {k: summarize(v) for k, v in r.items()}
    res["cache_model"] = {}
    variants = [("cluster", {}), ("readahead", {"seg_max": 45}), ("readahead", {"seg_max": 90}),
                ("segment_evict", {"seg_max": 80})]
    if trace is not None and margin:
        variants.append(("margin", {"scores": lambda c: ScoreTracker(trace[0], trace[1], c), "margin": margin}))
    for mode, kw in variants:
        tot, b = cache_model(per, cap, mode, **kw)
        name = mode + (f"_{kw['seg_max']}" if "seg_max" in kw else "") + (f"_{margin}" if mode == "margin" else "")
        res["cache_model"][name] = {
            "hit_rate": 1 - tot["missed"] / tot["selected"],
            "share_with_miss": tot["retrieves_with_miss"] / tot["retrieves"],
            "entries_per_read": tot["entries_read"] / max(1, tot["ops"]),
            "useful_share": tot["useful_entries_read"] / max(1, tot["entries_read"]),
            "ms_per_step_per_retrieve_batch": modeled_ms(b, False),
            "ms_per_step_per_layer_batch": modeled_ms(b, True)}
    res["writes"] = split_and_appends(per, steps)
    if all(isinstance(e, Split) and e.ids is not None for ev in per.values() for e in ev if isinstance(e, Split)):
        res["head_pairing"] = head_pairing(per)
    return res


def markdown(results, cmd):
    lines = [f"# Placement model: co-retrieval segments (issue 29)\n\n`{cmd}`\n"]
    for r in results:
        m = r["misses"]
        lines.append(f"## {r['events']}\n")
        lines.append(f"{m['retrieves']} retrieves; {m['share_with_miss']:.0%} read flash, missing "
                     f"{m['misses_per_retrieve_with_miss']:.1f} clusters ({m['missed_entries_per_retrieve_with_miss']:.0f} entries) "
                     f"of {m['selected_clusters']:.1f} selected ({m['selected_entries']:.0f} entries); "
                     f"{m['share_of_misses_new_to_selection']:.0%} of misses were not in the previous selection; "
                     f"consecutive selections overlap {m['selection_jaccard_consecutive']:.2f} (Jaccard).\n")
        lines.append("| order | misses only | bridged by cached selected | whole selection, no cache |")
        lines.append("|:--|--:|--:|--:|")
        for kind, v in r["orders"].items():
            lines.append(f"| {kind} | " + " | ".join(
                f"{v[k]['mean']:.1f} (p50 {v[k]['p50']:.0f}, max {v[k]['max']})" for k in ("miss", "bridged", "whole_selection")) + " |")
        lines.append("\nEntries per gap-free read; one read per retrieve would give "
                     f"{m['missed_entries_per_retrieve_with_miss']:.1f}.\n")
        lines.append(f"LRU cache model of {r.get('cache_model_cap_entries')} entries per collection (the engine's hit rate on this run: "
                     f"{r['engine_hit_rate']:.2f}).\n" if "engine_hit_rate" in r else "")
        lines.append("| cache model | hit rate | retrieves reading flash | entries/read | useful share | ms/step, batch per retrieve | ms/step, batch per layer |")
        lines.append("|:--|--:|--:|--:|--:|--:|--:|")
        for k, v in r["cache_model"].items():
            lines.append(f"| {k} | {v['hit_rate']:.3f} | {v['share_with_miss']:.2f} | {v['entries_per_read']:.1f} | "
                         f"{v['useful_share']:.2f} | {v['ms_per_step_per_retrieve_batch']:.2f} | {v['ms_per_step_per_layer_batch']:.2f} |")
        w = r["writes"]
        lines.append(f"\nWrites per decoding step: appended {w['appended_kib_per_step']:.1f} KiB; split children both copied "
                     f"{w['split_both_children_kib_per_step']:.1f} KiB, larger child in place {w['split_larger_in_place_kib_per_step']:.1f} KiB. "
                     f"Appends per cluster generation: mean {w['appends_per_generation_mean']:.1f}, p50/p90 "
                     f"{w['appends_per_generation_p50_p90'][0]:.0f}/{w['appends_per_generation_p50_p90'][1]:.0f}; "
                     f"{w['generations_without_appends']:.0%} of generations get none, "
                     f"{w['appended_share_in_generations_with_15_or_more']:.0%} of appended entries land in generations that get 15 or more.")
        if "head_pairing" in r:
            hp = r["head_pairing"]
            lines.append(f"\nKV-head pairing: a missed cluster's best token Jaccard with the clusters another KV head of its layer "
                         f"misses at the same retrieve is {hp['co_missed_token_jaccard']:.3f}, against {hp['random_token_jaccard']:.3f} "
                         "for as many random clusters of that head.")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("events", nargs="+", help="event logs (record.py), each optionally PATH:CAP")
    ap.add_argument("--cap", type=int, default=300, help="LRU cache model: entries per collection (CAP)")
    ap.add_argument("--trace", default=None, help="WORKLOAD:PREFILL:DECODE of the events, for the score-margin read-ahead")
    ap.add_argument("--margin", type=int, default=80)
    ap.add_argument("--md")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    trace = None
    if a.trace:
        from kvtier.bench.capture import load_trace
        w, p, d = a.trace.split(":")
        trace = (load_trace(w, prefill=int(p), decode=int(d), progress=False), int(p))
    results = []
    for spec in a.events:
        path, _, cap = spec.partition(":")
        r = analyse(path, int(cap) if cap else a.cap, trace, a.margin if trace else 0)
        r["cache_model_cap_entries"] = int(cap) if cap else a.cap
        results.append(r)
        print(json.dumps(r, indent=1), flush=True)
    cmd = "python tools/layout_model/model.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if a.md:
        with open(a.md, "w") as f:
            f.write(markdown(results, cmd))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"command": cmd, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
