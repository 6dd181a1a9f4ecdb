"""kvtier's benchmarks, shipped in the installed package: each runs as
``python -m kvtier.bench.NAME`` from any directory and writes JSON and a Markdown table (the
checkout keeps them under ``bench/results/``, gathered by ``python -m bench.report``).

The benchmarks: ``suite`` (what ``kvtier bench`` runs: the grid of tier configurations),
``decode`` and ``tasks`` (``kvtier bench decode`` / ``tasks``: decode-step speed and long-context
tasks of the torch caches), ``policies`` and ``adaptive16`` (clustering policies' recall),
``flash``, ``flash_real`` and ``write_buffer`` (the flash layout: modeled, on this disk, write
buffers), ``cache`` (cache policies against the DRAM budget), ``memory`` (phone-sized budgets),
``resident`` (the resident index per stored entry, estimated and measured on real keys),
``virtualize`` (group virtualization), ``pipeline`` (prefetch behind compute), ``w4_search``
(search against hnswlib and faiss), ``nprobe_default``, ``torch_quality`` and ``needle`` (model
quality and a pass key through TieredCache), ``llama_cpp`` (TieredLlama against llama.cpp),
``task_recall`` (on the task cases, what each tiered layer fetches while the answer is decoded).

What they share: ``capture`` records real key/value/query traces of SmolLM2-135M-Instruct (the
workloads of docs/design.md §8) and caches them; ``kvreplay`` replays a trace through the
public API as a KV cache uses it and measures attention recall and I/O; ``tables`` and
``plots`` lay out the results; ``runtime`` what the long-context ones share.
"""

#: What ``kvtier bench NAME [options]`` runs (the same as ``python -m kvtier.bench.NAME``;
#: ``--help`` shows each option's default), one line each; ``kvtier bench`` alone runs ``suite``.
BENCHMARKS = {
    "suite": "the grid of tier configurations on real traces (what `kvtier bench` alone runs)",
    "decode": "decode-step speed and memory: DynamicCache, QuantizedCache and TieredCache on SmolLM2",
    "tasks": "long-context tasks (needles, variable tracking, word frequency) through each cache",
    "torch_quality": "model quality (ΔNLL, top-1) of TieredCache on real text, teacher-forced",
    "needle": "a pass key planted early in a long prompt, answered through each cache",
    "task_recall": "what each tiered layer fetches while a task's answer is decoded",
    "llama_cpp": "TieredLlama (llama.cpp with a bounded KV cache) against plain llama.cpp",
    "policies": "clustering policies' attention recall on replayed KV traces",
    "adaptive16": "the adaptive policy's accuracy, splits and clusters on replayed KV traces",
    "cache": "cache policies: hit rate and bytes read against the DRAM budget",
    "memory": "phone-sized DRAM budgets: does the engine run, and at what cost",
    "resident": "the resident index per stored entry: the estimate and what real keys take",
    "paging": "splits and retrieves at a tight DRAM budget against a large one, in lockstep",
    "virtualize": "group virtualization of a 30-layer model's collections: DRAM against I/O",
    "pipeline": "does prefetch hide flash reads behind per-layer compute",
    "flash": "the flash layout on replayed traces: reads, contiguity, modeled I/O",
    "flash_real": "retrieval reads on this machine's disk with O_DIRECT against the calibration",
    "write_buffer": "page-aligned write buffers: partial-page rewrites against buffer size",
    "w4_search": "vector search (W4): kvtier against hnswlib, faiss IVF-flat and exact search",
    "nprobe_default": "recall@10 of search at its default nprobe",
    "capture": "capture (and cache) the real KV traces the replays use",
}
