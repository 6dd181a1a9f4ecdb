"""Parse the probe's event log (record.py) into per-collection event lists."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Sel:
    cl: int
    n: int
    pend: int
    cached: bool


@dataclass
class Retrieve:
    step: int
    sel: list          # list[Sel] in score order
    part: int          # entries taken from the last (partial) cluster, 0 if none


@dataclass
class Split:
    step: int
    src: int
    children: list     # [(cluster, count)], children[0][0] == src
    ids: list          # per child, the entry ids it holds (in order), or None


def parse(path):
    """Returns (events per collection: list of ('A', cl) | Retrieve | Split, number of steps)."""
    per = {}
    step = 0
    with open(path) as f:
        for line in f:
            t = line.split()
            if not t:
                continue
            kind = t[0]
            if kind == "T":
                step += 1
                continue
            c = int(t[1])
            ev = per.setdefault(c, [])
            if kind == "A":
                ev.append(("A", int(t[2])))
            elif kind == "R":
                sel = []
                for x in t[4:]:
                    cl, n, pend, cached = x.split(":")
                    sel.append(Sel(int(cl), int(n), int(pend), cached == "1"))
                ev.append(Retrieve(step, sel, int(t[3])))
            elif kind == "S":
                nt = int(t[4])
                ch = [tuple(int(v) for v in x.split(":")) for x in t[5:5 + nt]]
                ids = None
                if len(t) > 5 + nt:  # " | id id ... | id ..." per child
                    ids, cur = [], None
                    for x in t[5 + nt:]:
                        if x == "|":
                            cur = []
                            ids.append(cur)
                        else:
                            cur.append(int(x))
                ev.append(Split(step, int(t[2]), ch, ids))
    return per, step
