"""The measuring code of ``kvtier bench``, shipped in the installed package.

``capture`` records real key/value/query traces of SmolLM2-135M-Instruct (the workloads of
docs/design.md §8) and caches them; ``kvreplay`` replays a trace through the public API as a
KV cache uses it and measures attention recall and I/O; ``w4_search`` compares kvtier's search
with hnswlib and faiss; ``suite`` runs the grid of tier configurations that ``kvtier bench``
reports; ``plots`` draws its figures; ``decode`` is ``kvtier bench decode`` (decode-step speed
of the torch caches). The source tree's ``bench/`` holds the benchmark scripts built on these
and their results.
"""
