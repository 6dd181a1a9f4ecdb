"""kvtier benchmarks.

``bench.capture`` records real key/value/query traces of SmolLM2-135M-Instruct (the
workloads of docs/design.md §8); the other modules in this package replay them against kvtier and
its baselines and write results under ``bench/results/``.
"""
