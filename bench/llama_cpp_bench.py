"""`python -m bench.llama_cpp_bench`: TieredLlama against plain llama.cpp (the same as
`python -m kvtier.bench.llama_cpp`: quality, speed and session switching); the code is
kvtier.bench.llama_cpp.
"""
import sys

from kvtier.bench.llama_cpp import *  # noqa: F401,F403  (the names scripts imported from here)
from kvtier.bench.llama_cpp import main

if __name__ == "__main__":
    sys.exit(main())
