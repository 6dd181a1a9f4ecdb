"""The Markdown tables of the benchmark reports, laid out by tabulate, and the result files
every benchmark writes (write_results, save)."""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

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


def command(module: str, argv: Sequence[str] | None) -> str:
    """The command line a result file names: ``python -m module`` and the arguments it ran with
    (``argv``, or the process's own when none were passed)."""
    return f"python -m {module} {' '.join(argv or sys.argv[1:])}"


def write_results(out: str, stem: str, payload: dict, title: str | None = None, cmd: str = "", md: str = "",
                  **dump: Any) -> None:
    """Writes ``out/stem.json`` (``payload``; ``dump``: more json.dump options) and, with a
    title, ``out/stem.md``: the title, the command in backticks on a line of its own (what
    ``bench.report`` shows), then ``md``."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{stem}.json"), "w") as f:
        json.dump(payload, f, indent=1, **dump)
    if title is not None:
        with open(os.path.join(out, f"{stem}.md"), "w") as f:
            f.write(f"# {title}\n\n`{cmd}`\n\n{md}")


def save(out, stem, title, module, argv, args, t0, payload, md):
    """Writes out/stem.json (the machine, versions, arguments and run time, then payload) and
    out/stem.md (title, the command, md)."""
    import numpy as np

    import kvtier

    meta = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                        "python": sys.version.split()[0]},
            "versions": {"kvtier": kvtier.__version__, "numpy": np.__version__},
            "args": vars(args), "seconds": time.time() - t0}
    write_results(out, stem, {"meta": meta, **payload}, title, command(module, argv), md)
