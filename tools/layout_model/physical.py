"""Physical simulation of pool formats on the engine's events (issue 29).

Replays appends, retrieves and splits (events.py) against a data file of dual-head pools and
measures what the format costs: data file size against the token layout's, bytes written by
splits and by consolidation, reads per missed cluster (segments), and dead slots read.

Formats:
- fixed:  today's format 2: every pool holds 2 x max_cluster_size records (9 pages for 64
          records of 272 bytes); a split writes both children to fresh heads.
- sized:  pools sized to what they hold, in power-of-two pages from a buddy allocator; a new
          pool gets room for twice what claims it; a split keeps the larger child in place
          (the other child's records there become dead slots) and writes the smaller one;
          a cluster whose head fills chains a new head with room for its size again; a
          cluster in DRAM (just read, or split) with more than one segment, or more dead than
          live slots, is rewritten into one head (consolidation, counted).

Writes are lazy: entries reach flash when a retrieve reads their cluster (the engine's
`pend` says how many are still in DRAM then), at a split, and at the end; so the model
writes larger runs than the engine's write buffer does, which changes no pool's fill.
"""
from __future__ import annotations

import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from events import Retrieve, Split, parse  # noqa: E402

RPP = 15          # records per 4 KiB page
ESZ = 272
PAGE = 4096


class Buddy:
    """Power-of-two page runs; a freed run merges with its free buddy."""

    def __init__(self):
        self.free = collections.defaultdict(set)  # order -> base pages
        self.end = 0
        self.peak = 0

    def alloc(self, order):
        o = order
        while o < 32 and not self.free[o]:
            o += 1
        if o < 32 and self.free[o]:
            base = min(self.free[o])
            self.free[o].discard(base)
            while o > order:  # split, keep the low half
                o -= 1
                self.free[o].add(base + (1 << o))
            return base
        base = -(-self.end // (1 << order)) * (1 << order)
        for p in range(self.end, base):  # the alignment hole becomes free single pages
            self.free_run(p, 0)
        self.end = base + (1 << order)
        self.peak = max(self.peak, self.end)
        return base

    def free_run(self, base, order):
        while True:
            bud = base ^ (1 << order)
            if bud in self.free[order]:
                self.free[order].discard(bud)
                base = min(base, bud)
                order += 1
            else:
                break
        self.free[order].add(base)


class FirstFit:
    """Page runs from a sorted free list (first fit, coalesced on free), else the file's end."""

    def __init__(self):
        self.free = []   # sorted [base, pages]
        self.end = 0
        self.peak = 0

    def alloc(self, pages):
        for k, (b, n) in enumerate(self.free):
            if n >= pages:
                if n == pages:
                    self.free.pop(k)
                else:
                    self.free[k] = [b + pages, n - pages]
                return b
        if self.free and self.free[-1][0] + self.free[-1][1] == self.end:  # grow the last hole
            b = self.free.pop()[0]
        else:
            b = self.end
        self.end = b + pages
        self.peak = max(self.peak, self.end)
        return b

    def free_run(self, base, pages):
        import bisect
        k = bisect.bisect(self.free, [base, pages])
        self.free.insert(k, [base, pages])
        if k + 1 < len(self.free) and base + pages == self.free[k + 1][0]:
            self.free[k][1] += self.free.pop(k + 1)[1]
        if k > 0 and self.free[k - 1][0] + self.free[k - 1][1] == base:
            self.free[k - 1][1] += self.free.pop(k)[1]


class Pools:
    def __init__(self, fmt, max_cluster=64, grow=2.0, alloc="buddy", pair_room=1.0):
        self.fmt = fmt
        self.grow = grow
        self.pair_room = pair_room
        self.alloc_kind = alloc
        self.ff = FirstFit()
        self.p = []          # [base_page, pages, cap, used0, used1, owner0, owner1]
        self.free_pools = []  # fixed format: pool indices fully free
        self.half = collections.defaultdict(list)  # sized: pools with one free head, by pages
        self.buddy = Buddy()
        self.fixed_pages = -(-2 * max_cluster // RPP)
        self.end = 0          # fixed format: pages in use

    def file_pages(self):
        if self.fmt != "sized":
            return self.end
        return self.buddy.peak if self.alloc_kind == "buddy" else self.ff.peak

    def room(self, i):
        q = self.p[i]
        return q[2] - q[3] - q[4]

    def claim(self, owner, need):
        """A head with room for `need` records: a free head paired with another cluster's."""
        if self.fmt == "fixed":
            for i in reversed(self.free_pools[-8:]):
                q = self.p[i]
                for h in (0, 1):
                    if q[5 + h] is None and q[6 - h] != owner and self.room(i) > 0:
                        q[5 + h] = owner
                        if q[6 - h] is not None:
                            self.free_pools.remove(i)
                        return i, h
            i = len(self.p)
            self.p.append([self.end, self.fixed_pages, self.fixed_pages * RPP, 0, 0, owner, None])
            self.end += self.fixed_pages
            self.free_pools.append(i)
            return i, 0
        # sized: the smallest pool with a free head and room for need
        for pages in sorted(self.half):
            lst = self.half[pages]
            for k in range(len(lst) - 1, max(-1, len(lst) - 9), -1):
                i = lst[k]
                q = self.p[i]
                h = 0 if q[5] is None else 1 if q[6] is None else -1
                if h < 0 or q[6 - h] == owner:
                    continue
                if self.room(i) >= self.pair_room * need:
                    q[5 + h] = owner
                    lst.pop(k)
                    return i, h
        want = max(1, -(-int(self.grow * need + 0.999) // RPP))
        if self.alloc_kind == "buddy":
            order = 0
            while (1 << order) < want:
                order += 1
            pages = 1 << order
            base = self.buddy.alloc(order)
        else:
            pages = want
            base = self.ff.alloc(pages)
        i = len(self.p)
        self.p.append([base, pages, pages * RPP, 0, 0, owner, None])
        self.half[pages].append(i)
        return i, 0

    def release(self, i, h):
        q = self.p[i]
        q[5 + h] = None
        q[3 + h] = 0
        if q[5] is None and q[6] is None:
            if self.fmt == "fixed":
                if i not in self.free_pools:
                    self.free_pools.append(i)
            else:
                lst = self.half[q[1]]
                if i in lst:
                    lst.remove(i)
                if self.alloc_kind == "buddy":
                    self.buddy.free_run(q[0], q[1].bit_length() - 1)
                else:
                    self.ff.free_run(q[0], q[1])
                q[1] = 0  # gone
        elif self.fmt == "fixed":
            if i not in self.free_pools:
                self.free_pools.append(i)
        else:
            self.half[q[1]].append(i)


def simulate(ev, fmt, consolidate=True, grow=2.0, alloc="firstfit", dead_ratio=2.0, max_segs=1, pair_room=1.0,
             rate_room=None):
    """rate_room: (factor, cap): room for a claim is need x (1 + factor x the lineage's appends
    per record, at most cap), and grow/pair_room apply to that room instead of to need."""
    P = Pools(fmt, grow=grow, alloc=alloc, pair_room=pair_room)
    born = collections.Counter()
    apps = collections.Counter()
    rate = collections.defaultdict(lambda: 1.0)
    segs = collections.defaultdict(list)   # cluster -> [[pool, head, slots]]
    live = collections.Counter()          # live records on flash
    n = collections.Counter()
    st = collections.Counter()

    def write(cl, k, counter):
        while k > 0:
            if not segs[cl] or P.room(segs[cl][-1][0]) == 0 or P.p[segs[cl][-1][0]][1] == 0:
                need = max(k, live[cl]) if fmt == "sized" else k
                if rate_room and fmt == "sized":
                    r = apps[cl] / born[cl] if born[cl] and apps[cl] else rate[cl]
                    need = max(1, int(need * (1 + min(rate_room[1], rate_room[0] * r)) / 2))
                i, h = P.claim(cl, need)
                segs[cl].append([i, h, 0])
            s = segs[cl][-1]
            w = min(k, P.room(s[0]))
            s[2] += w
            P.p[s[0]][3 + s[1]] += w
            live[cl] += w
            st[counter] += w
            k -= w

    def drop(cl):
        for i, h, _ in segs[cl]:
            P.release(i, h)
        segs[cl] = []
        live[cl] = 0

    def rewrite(cl, counter):
        k = live[cl]
        drop(cl)
        write(cl, k, counter)

    for e in ev:
        if isinstance(e, tuple):
            n[e[1]] += 1
            if st["prefilled"]:
                apps[e[1]] += 1
            else:
                born[e[1]] += 1
            continue
        if isinstance(e, Retrieve):
            if not st["prefilled"]:
                st["prefilled"] = 1
                for cl in sorted(n):
                    write(cl, n[cl], "prefill")
            for s in e.sel:
                n[s.cl] = s.n
                tgt = s.n - s.pend
                if live[s.cl] < tgt:
                    write(s.cl, tgt - live[s.cl], "append")
                if not s.cached and tgt > 0:
                    nseg = len(segs[s.cl])
                    slots = sum(x[2] for x in segs[s.cl])
                    st["missed"] += 1
                    st["reads"] += nseg
                    st["entries_read"] += live[s.cl]
                    st["slots_read"] += slots
                    if consolidate and fmt == "sized" and (nseg > max_segs or slots > dead_ratio * live[s.cl]):
                        rewrite(s.cl, "consolidate")
            continue
        # a split: flush what the parent still had in DRAM, then place the children
        src = e.src
        tot = sum(c for _, c in e.children)
        r = apps[src] / born[src] if born[src] else rate[src]
        for cl, cnt in e.children:
            rate[cl] = r
            born[cl] = cnt
            apps[cl] = 0
        if not st["prefilled"]:
            st["prefilled"] = 1
            for cl in sorted(n):
                write(cl, n[cl], "prefill")
        if fmt == "fixed" or len(e.children) != 2:  # today's copy on write (and local's regroups)
            drop(src)
            for cl, cnt in e.children:
                segs[cl] = []
                live[cl] = 0
                write(cl, cnt, "split")
                n[cl] = cnt
            continue
        (c0, n0), (c1, n1) = e.children
        stay, move = ((c0, n0), (c1, n1)) if n0 >= n1 else ((c1, n1), (c0, n0))
        parent_segs, parent_flash = segs[src], live[src]
        segs[src] = []
        live[src] = 0
        # the staying child keeps the parent's segments; its live records on flash are its
        # share of what the parent had there, the rest of its entries it writes after them
        segs[stay[0]] = parent_segs
        live[stay[0]] = min(stay[1], round(parent_flash * stay[1] / max(1, tot)))
        if live[stay[0]] < stay[1]:
            write(stay[0], stay[1] - live[stay[0]], "split")
        segs[move[0]] = []
        live[move[0]] = 0
        write(move[0], move[1], "split")
        n[c0], n[c1] = n0, n1
        if consolidate:
            slots = sum(x[2] for x in segs[stay[0]])
            if len(segs[stay[0]]) > max_segs or slots > dead_ratio * live[stay[0]]:
                rewrite(stay[0], "consolidate")
    # the end: everything on flash
    for cl in list(n):
        if live[cl] < n[cl]:
            write(cl, n[cl] - live[cl], "append")
    st["file_bytes"] = PAGE + P.file_pages() * PAGE
    st["entries"] = sum(n.values())
    return st


GRID = [("fixed", {}),
        ("sized", dict(consolidate=False, alloc="firstfit", grow=2.0)),
        ("sized", dict(alloc="firstfit", grow=2.0, max_segs=1)),
        ("sized", dict(alloc="firstfit", grow=1.5, max_segs=1)),
        ("sized", dict(alloc="firstfit", grow=2.0, max_segs=2)),
        ("sized", dict(alloc="firstfit", grow=3.0, max_segs=2)),
        ("sized", dict(alloc="buddy", grow=2.0, max_segs=1))]


def table(paths):
    lines = ["| events | format | data file / token | appended KiB/step | split KiB/step | consolidation KiB/step | "
             "segments per missed cluster | dead share of slots read |", "|:--|:--|--:|--:|--:|--:|--:|--:|"]
    for path in paths:
        per, steps = parse(path)
        appended = sum(1 for ev in per.values() for e in ev[prefill_end(ev):] if isinstance(e, tuple))
        for fmt, kw in GRID:
            tot = collections.Counter()
            for ev in per.values():
                tot.update(simulate(ev, fmt, **kw))
            token = tot["entries"] * ESZ + PAGE * len(per)
            kib = lambda x: x * ESZ / steps / 1024  # noqa: E731
            desc = fmt if fmt == "fixed" else f"sized ({kw.get('alloc')}, room {kw.get('grow')}x, " + (
                f"one segment kept by consolidation up to {kw.get('max_segs')})" if kw.get("consolidate", True) else "no consolidation)")
            lines.append(f"| {os.path.basename(path)} | {desc} | {tot['file_bytes'] / token:.2f} | {kib(appended):.1f} | "
                         f"{kib(tot['split']):.1f} | {kib(tot['consolidate']):.1f} | {tot['reads'] / max(1, tot['missed']):.2f} | "
                         f"{1 - tot['entries_read'] / max(1, tot['slots_read']):.2f} |")
            print(lines[-1], flush=True)
    return "\n".join(lines) + "\n"


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("events", nargs="+")
    ap.add_argument("--md")
    a = ap.parse_args(argv)
    md = table(a.events)
    if a.md:
        with open(a.md, "w") as f:
            f.write(md)
    return 0


def prefill_end(ev):
    i = 0
    while i < len(ev) and isinstance(ev[i], tuple):
        i += 1
    return i


if __name__ == "__main__":
    sys.exit(main())
