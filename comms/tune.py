"""``python -m comms.tune``: time every algorithm here and keep the winners (comms.selection.tune)."""
from .selection.tune import main

if __name__ == "__main__":
    raise SystemExit(main())
