"""kvtier's benchmark results (``bench/results/``), their report (``bench/REPORT.md``) and the
script that writes it (``python -m bench.report``). The benchmarks themselves are the installed
package ``kvtier.bench`` (``python -m kvtier.bench.NAME``; bench/README.md).
"""
