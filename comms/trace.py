"""``python -m comms.trace analyze DIR``: the flight-recorder analysis (comms.diag.trace)."""
import sys

from .diag.trace import main

if __name__ == "__main__":
    sys.exit(main())
