"""``python -m comms.run``: the single-host launcher (comms.launch.run)."""
import sys

from .launch.run import launch, main, parse_args  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
