"""kvtier benchmark scripts (``python -m bench.NAME``) and their results (``bench/results/``).

The measuring code they share (trace capture, replay, W4 search, the suite, plots) is the
installed package ``kvtier.bench``; ``bench.suite``, ``bench.capture``, ``bench.w4_search`` and
``bench.decode`` are its command lines, kept here so that ``python -m bench.NAME`` still runs them.
"""
