"""``python -m bench``: see :mod:`bench.driver` and bench/README.md."""
import sys

from .driver import main

if __name__ == "__main__":
    sys.exit(main())
