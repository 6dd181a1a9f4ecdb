"""KV-head (and layer) pairing, measured before building it (issue 29, item 4).

The question: a layer's KV heads retrieve at the same decoding step (TieredLlama reads them
together), each from its own collection. If the clusters that different heads retrieve at the
same step were laid next to each other (a dual-head pool holding one cluster of each of two
heads, or pools of one layer's heads interleaved by co-retrieval), would a gap-free read serve
more entries, and would modeled I/O per step drop?

From the engine's own events (record.py; collection c is replay layer c // 3, KV head c % 3):

1. correlation of misses across heads: for each cluster x that head a misses, its partner in
   head b is the cluster of b missed most often at the same retrieves as x in the first half
   of the run; how often is that partner missed when x is in the second half (against the
   partner's own miss rate)? The same within one head (x's partner among the other clusters of
   its own head) is the reference: that is what placement inside a collection can use; and
   the same head of the next recorded layer (record.py --layers 0,1,...,9 for adjacent ones).
2. entries per gap-free read of the missed clusters under the hindsight co-retrieval chain
   (model.py's chain_order, an upper bound for any co-retrieval matrix) built per head (today's
   scope), over a layer's three heads (one interleaved log per layer), and over two layers'
   six heads (replay layers, three model layers apart);
3. modeled I/O per retrieval step for each, with one device batch per retrieve (the replay)
   or per layer (a layer's heads submitted together).

    python tools/layout_model/heads.py EVENTS [EVENTS...] [--md out.md] [--json out.json]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from events import Retrieve, Split, parse
from model import device_time, order_reads, summarize

HEADS = 3
BIG = 1 << 20  # cluster ids of merged collections: member * BIG + cluster


def misses(ev):
    """Per retrieve of one collection: {cluster: entries read from flash} of its misses."""
    out = []
    for e in ev:
        if isinstance(e, Retrieve):
            out.append({s.cl: s.n - s.pend for s in e.sel if not s.cached and s.n - s.pend > 0})
    return out


def correlation(per):
    """Section 1: how often a missed cluster's partner is missed with it, across and within
    heads. The partner is picked on the first half of the run's retrieves (the cluster most
    often missed at the same retrieves) and checked on the second half, so that chance
    coincidences of a rare cluster do not count; clusters missed at least twice in each half."""
    M = {c: misses(ev) for c, ev in per.items()}
    nr = min(len(m) for m in M.values())
    half = nr // 2
    res = {}
    for scope in ("within", "across", "next_layer"):
        hit, base = [], []
        for c in per:
            others = {"within": [c], "across": [d for d in per if d // HEADS == c // HEADS and d != c],
                      "next_layer": [c + HEADS] if c + HEADS in per else []}[scope]
            for d in others:
                co = collections.defaultdict(collections.Counter)
                for r in range(half):
                    for x in M[c][r]:
                        co[x].update(y for y in M[d][r] if d != c or y != x)
                for x, cnt in co.items():
                    if not cnt or sum(1 for r in range(half) if x in M[c][r]) < 2:
                        continue
                    y = cnt.most_common(1)[0][0]
                    later = [r for r in range(half, nr) if x in M[c][r]]
                    if len(later) < 2:
                        continue
                    hit.append(sum(1 for r in later if y in M[d][r]) / len(later))
                    base.append(sum(1 for r in range(half, nr) if y in M[d][r]) / (nr - half))
        res[scope] = {"partner_missed_with_it": float(np.mean(hit)),
                      "partner_miss_rate": float(np.mean(base)), "clusters": len(hit)}
    return res


def merge(per, members):
    """One event list for several collections: their clusters renamed member * BIG + cl, their
    r-th retrieves joined into one (what a shared log of those collections would see)."""
    tl = {m: per[m] for m in members}
    pos = {m: 0 for m in members}
    out = []
    for m in members:  # the first partitions
        ev = tl[m]
        while pos[m] < len(ev) and isinstance(ev[pos[m]], tuple):
            out.append(("A", members.index(m) * BIG + ev[pos[m]][1]))
            pos[m] += 1
    while True:
        sel, step, done = [], 0, False
        for k, m in enumerate(members):
            ev = tl[m]
            while pos[m] < len(ev) and not isinstance(ev[pos[m]], Retrieve):
                e = ev[pos[m]]
                if isinstance(e, tuple):
                    out.append(("A", k * BIG + e[1]))
                else:
                    out.append(Split(e.step, k * BIG + e.src, [(k * BIG + cl, n) for cl, n in e.children], None))
                pos[m] += 1
            if pos[m] >= len(ev):
                done = True
                continue
            e = ev[pos[m]]
            pos[m] += 1
            step = e.step
            for s in e.sel:
                sel.append(type(s)(k * BIG + s.cl, s.n, s.pend, s.cached))
        if done:
            return out
        out.append(Retrieve(step, sel, 0))


def per_retrieve_reads(per, kind):
    """Each collection's gap-free reads (entries each) per retrieve under an order, misses only."""
    out = {}
    for c, ev in per.items():
        runs = iter(order_reads({c: ev}, kind)["miss"])
        rows = []
        for m in misses(ev):
            # order_reads pools the runs of every retrieve in order; a retrieve's runs hold
            # exactly its missed entries, so they are cut back apart by that sum
            need, got, mine = sum(m.values()), 0, []
            while got < need:
                mine.append(next(runs))
                got += mine[-1]
            rows.append(mine)
        out[c] = rows
    return out


def t_batch(reads):
    """Device time of one batch of gap-free reads (entries each)."""
    return device_time(len(reads), sum(reads))


def analyse(path):
    per, steps = parse(path)
    cs = sorted(per)
    layers = [cs[i:i + HEADS] for i in range(0, len(cs), HEADS)]
    res = {"events": os.path.basename(path), "collections": len(cs), "correlation": correlation(per)}
    scopes = {"head": [[c] for c in cs], "layer": layers,
              "two_layers": [layers[i] + layers[i + 1] for i in range(0, len(layers) - 1, 2)]}
    reads = {}
    for name, groups in scopes.items():
        merged = {tuple(g): (per[g[0]] if len(g) == 1 else merge(per, g)) for g in groups}
        rr = per_retrieve_reads(merged, "chain")
        reads[name] = rr
        res[f"chain_{name}"] = summarize([n for g in rr.values() for one in g for n in one])
    nr = min(len(v) for v in reads["head"].values())  # retrieves per collection = retrieval steps
    t_head = sum(t_batch(reads["head"][(c,)][r]) for c in cs for r in range(nr))
    t_sub = sum(t_batch([n for c in g for n in reads["head"][(c,)][r]]) for g in layers for r in range(nr))
    t_lay = sum(t_batch(reads["layer"][tuple(g)][r]) for g in layers for r in range(nr))
    res["modeled_ms_per_step"] = {"head_layout_batch_per_retrieve": t_head / nr * 1e3,
                                  "head_layout_batch_per_layer": t_sub / nr * 1e3,
                                  "layer_layout_batch_per_layer": t_lay / nr * 1e3}
    res["retrieval_steps"] = nr
    return res


def markdown(results, cmd):
    lines = ["# KV-head pairing: what co-retrieval across heads can buy (issue 29, item 4)", "",
             "```", cmd, "```", ""]
    lines += ["A missed cluster's partner (picked on the run's first half) missed with it on the second "
              "half, and (in brackets) the partner's own miss rate:", "",
              "| events | within its head | another KV head of its layer | its head in the next recorded layer |",
              "|:--|--:|--:|--:|"]
    for r in results:
        cells = [f"{x['partner_missed_with_it']:.2f} ({x['partner_miss_rate']:.2f})"
                 for x in (r["correlation"][k] for k in ("within", "across", "next_layer"))]
        lines.append(f"| {r['events']} | " + " | ".join(cells) + " |")
    lines += ["", "Entries per gap-free read of the missed clusters under the hindsight co-retrieval chain "
              "(mean, p50, p90, max), and modeled I/O per retrieval step (ms):", "",
              "| events | chain per head | chain per layer (3 heads) | chain per 2 layers (6 heads) | "
              "head layout, batch per retrieve | head layout, batch per layer | layer layout, batch per layer |",
              "|:--|:--|:--|:--|--:|--:|--:|"]
    for r in results:
        f = lambda s: f"{s['mean']:.1f} ({s['p50']:.0f}, {s['p90']:.0f}, {s['max']})"  # noqa: E731
        m = r["modeled_ms_per_step"]
        lines.append(f"| {r['events']} | {f(r['chain_head'])} | {f(r['chain_layer'])} | {f(r['chain_two_layers'])} | "
                     f"{m['head_layout_batch_per_retrieve']:.3f} | {m['head_layout_batch_per_layer']:.3f} | "
                     f"{m['layer_layout_batch_per_layer']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("events", nargs="+")
    ap.add_argument("--md")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    results = []
    for p in a.events:
        r = analyse(p)
        print(json.dumps(r, indent=1), flush=True)
        results.append(r)
    cmd = "python tools/layout_model/heads.py " + " ".join(os.path.basename(p) for p in a.events)
    md = markdown(results, cmd)
    print(md)
    if a.md:
        with open(a.md, "w") as f:
            f.write(md)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
