"""kvtier's benchmarks, shipped in the installed package: each runs as
``python -m kvtier.bench.NAME`` from any directory and writes JSON and a Markdown table (the
checkout keeps them under ``bench/results/``, gathered by ``python -m bench.report``).

The benchmarks: ``suite`` (what ``kvtier bench`` runs: the grid of tier configurations),
``decode`` and ``tasks`` (``kvtier bench decode`` / ``tasks``: decode-step speed and long-context
tasks of the torch caches), ``policies`` and ``adaptive16`` (clustering policies' recall),
``flash``, ``flash_real`` and ``write_buffer`` (the flash layout: modeled, on this disk, write
buffers), ``cache`` (cache policies against the DRAM budget), ``memory`` (phone-sized budgets),
``virtualize`` (group virtualization), ``pipeline`` (prefetch behind compute), ``w4_search``
(search against hnswlib and faiss), ``nprobe_default``, ``torch_quality`` and ``needle`` (model
quality and a pass key through TieredCache), ``llama_cpp`` (TieredLlama against llama.cpp),
``task_recall`` (on the task cases, what each tiered layer fetches while the answer is decoded).

What they share: ``capture`` records real key/value/query traces of SmolLM2-135M-Instruct (the
workloads of docs/design.md §8) and caches them; ``kvreplay`` replays a trace through the
public API as a KV cache uses it and measures attention recall and I/O; ``tables`` and
``plots`` lay out the results; ``runtime`` what the long-context ones share.
"""
