"""`python -m bench.suite`: the benchmark suite (the same as `kvtier bench`);
the code is kvtier.bench.suite.
"""
import sys

from kvtier.bench.suite import *  # noqa: F401,F403  (the names scripts imported from here)
from kvtier.bench.suite import main

if __name__ == "__main__":
    sys.exit(main())
