"""The Markdown tables of the benchmark reports, laid out by tabulate."""
from __future__ import annotations

from collections.abc import Iterable, Sequence

from tabulate import tabulate


def md_table(head: Sequence[str], rows: Iterable[Sequence], align: str) -> str:
    """A Markdown (pipe) table. ``head``: the column titles; ``rows``: the cells, shown as given
    (not re-parsed as numbers, so a formatted "0.100" stays "0.100"); ``align``: one letter per
    column, ``l`` or ``r``. A row shorter than the header ends in empty cells (a refused
    configuration: its error, then nothing)."""
    if len(align) != len(head):
        raise ValueError(f"align: one letter per column expected ({len(head)}), got {align!r}")
    cells = [[str(c) for c in r] + [""] * (len(head) - len(r)) for r in rows]
    return tabulate(cells, list(head), tablefmt="pipe", disable_numparse=True,
                    colalign=["left" if a == "l" else "right" for a in align])
