"""`python -m bench.w4_search`: W4: kvtier search against hnswlib and faiss;
the code is kvtier.bench.w4_search.
"""
import sys

from kvtier.bench.w4_search import *  # noqa: F401,F403  (the names scripts imported from here)
from kvtier.bench.w4_search import main

if __name__ == "__main__":
    sys.exit(main())
