"""`python -m bench.decode`: decode-step speed of the torch caches (the same as `kvtier bench decode`);
the code is kvtier.bench.decode.
"""
import sys

from kvtier.bench.decode import *  # noqa: F401,F403  (the names scripts imported from here)
from kvtier.bench.decode import main

if __name__ == "__main__":
    sys.exit(main())
