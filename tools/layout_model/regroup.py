"""Dynamic placement by co-retrieval (issue 29, session 3): does rewriting what a retrieve
brought into DRAM, next to each other, make later misses contiguous?

model.py measured static orders (creation, split tree, a hindsight co-retrieval chain). This
replays the same events (record.py) with a layout that changes as the run goes: the data
file is a log of positions; the prefill's clusters in creation order, a split's larger child
where its parent was and the smaller at the log's end (format 3), and a *regroup* rewrites,
within a byte budget, a group of clusters that are in DRAM at a retrieve back to back at the
log's end (copy on write: the old places become free). Groups:

- `miss`: the clusters the retrieve missed (just read);
- `sel`: every selected cluster with records on flash (the cached ones are in DRAM too);
- `lastsel`: at a retrieve with misses, the missed ones placed next to the clusters they were
  last selected with (their previous co-selection), as the paper's co-retrieval matrix would.

Which clusters miss is the engine's own (the `cached` flag of each selected cluster), so the
cache is the engine's and only placement changes. A gap-free read is a run of missed
clusters with no other live cluster between them on the log. Also reported: for the misses
of a retrieve, in how many distinct earlier retrieves they were last selected (if few, a
group rewritten at that earlier retrieve would hold them together).

    python tools/layout_model/regroup.py EVENTS [EVENTS...] [--budget 0.5,1,2,1000] [--md out.md]
"""
from __future__ import annotations

import argparse
import bisect
import collections
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from events import Retrieve, Split, parse  # noqa: E402
from model import prefill, summarize  # noqa: E402


class Log:
    """Positions of live clusters on a log; adjacency is by rank among live clusters."""

    def __init__(self):
        self.pos, self.keys, self.end = {}, [], 0.0

    def place(self, cl, p=None):
        self.remove(cl)
        if p is None:
            p, self.end = self.end, self.end + 1.0
        self.pos[cl] = p
        bisect.insort(self.keys, (p, cl))

    def remove(self, cl):
        p = self.pos.pop(cl, None)
        if p is not None:
            del self.keys[bisect.bisect_left(self.keys, (p, cl))]

    def rank(self, cl):
        return bisect.bisect_left(self.keys, (self.pos[cl], cl))


def runs(log, miss, sizes):
    rk = sorted(log.rank(cl) for cl in miss)
    out, acc, prev = [], 0, None
    by_rank = {log.rank(cl): cl for cl in miss}
    for r in rk:
        if prev is not None and r != prev + 1:
            out.append(acc)
            acc = 0
        acc += sizes[by_rank[r]]
        prev = r
    out.append(acc)
    return out


def replay(per, group, budget):
    """Entries per gap-free read of the misses; rewrite bytes in entries."""
    reads, rewritten, appended, lastsel_spread = [], 0, 0, []
    for ev in per.values():
        n, i = prefill(ev)
        log = Log()
        for cl in sorted(n):
            log.place(cl)
        tokens = 0.0      # rewrite budget, in entries
        last = {}         # cluster -> (retrieve index, its selection) when last selected
        r_idx = 0
        for e in ev[i:]:
            if isinstance(e, tuple):
                appended += 1
                tokens += budget
                if e[1] not in log.pos:
                    log.place(e[1])
                continue
            if isinstance(e, Split):
                ch = sorted(e.children, key=lambda x: -x[1])
                p = log.pos.get(e.src)
                log.remove(e.src)
                log.place(ch[0][0], p)          # larger child in place
                for cl, _ in ch[1:]:
                    log.place(cl)               # the smaller written at the log's end
                if e.src in last:
                    for cl, _ in ch:
                        last[cl] = last[e.src]
                continue
            r_idx += 1
            sizes = {s.cl: s.n - s.pend for s in e.sel}
            for s in e.sel:
                if s.cl not in log.pos:
                    log.place(s.cl)
            miss = [s.cl for s in e.sel if not s.cached and sizes[s.cl] > 0]
            onflash = [s.cl for s in e.sel if sizes[s.cl] > 0]
            if miss:
                reads += runs(log, miss, sizes)
                lastsel_spread.append(len(set(last[cl][0] for cl in miss if cl in last)))
            if group == "miss" and len(miss) > 1:
                g = miss
            elif group == "sel" and miss:
                g = onflash
            elif group == "lastsel" and miss:
                # each missed cluster next to its last co-selection's clusters (those in DRAM now)
                g, seen = [], set()
                for cl in miss:
                    for x in (last[cl][1] if cl in last else [cl]) + [cl]:
                        if x in sizes and sizes[x] > 0 and x not in seen:
                            seen.add(x)
                            g.append(x)
            else:
                g = []
            if g:
                rk = sorted(log.rank(cl) for cl in g)
                contiguous = rk[-1] - rk[0] == len(rk) - 1
                cost = sum(sizes[cl] for cl in g)
                if not contiguous and cost <= tokens:
                    tokens -= cost
                    rewritten += cost
                    for cl in g:
                        log.place(cl)
            sel = [s.cl for s in e.sel]
            for cl in sel:
                last[cl] = (r_idx, sel)
    return reads, rewritten, appended, lastsel_spread


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("events", nargs="+")
    ap.add_argument("--groups", default="none,miss,sel,lastsel")
    ap.add_argument("--budget", default="0.5,1,2,1000",
                    help="rewrite budget: entries rewritten per entry appended")
    ap.add_argument("--md")
    a = ap.parse_args(argv)
    rows = []
    for path in a.events:
        per, steps = parse(path)
        for gname in a.groups.split(","):
            for b in ([0.0] if gname == "none" else [float(x) for x in a.budget.split(",")]):
                rd, rw, ap_, spread = replay(per, gname, b)
                s = summarize(rd)
                row = {"events": os.path.basename(path), "group": gname, "budget": b,
                       "entries_per_read": s, "rewrite_over_appended": rw / max(1, ap_),
                       "misses_last_selected_in_distinct_retrieves": float(np.mean(spread))}
                rows.append(row)
                print(json.dumps(row), flush=True)
    if a.md:
        cmd = "python tools/layout_model/regroup.py " + " ".join(argv if argv is not None else sys.argv[1:])
        lines = ["# Dynamic placement by co-retrieval (issue 29)\n", f"`{cmd}`\n",
                 "| events | regroup | budget (rewritten/appended, allowed) | entries per gap-free read (p50, p90, max) | rewritten / appended | misses' last selections |",
                 "|:--|:--|--:|:--|--:|--:|"]
        for r in rows:
            s = r["entries_per_read"]
            lines.append(f"| {r['events']} | {r['group']} | {r['budget']:g} | {s['mean']:.1f} ({s['p50']:.0f}, {s['p90']:.0f}, {s['max']}) | "
                         f"{r['rewrite_over_appended']:.2f} | {r['misses_last_selected_in_distinct_retrieves']:.1f} |")
        with open(a.md, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
