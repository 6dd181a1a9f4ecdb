"""`python -m bench.capture`: trace capture; the code is kvtier.bench.capture."""
import sys

from kvtier.bench.capture import *  # noqa: F401,F403  (the names scripts imported from here)
from kvtier.bench.capture import main

if __name__ == "__main__":
    sys.exit(main())
