"""Test support: :func:`spawn` runs a function on several local ranks (harness), the numpy
reference kernels the native ones are checked against bit for bit (reference), and the in-memory
plan simulator that runs every algorithm's plans in one process (simulate)."""
from .harness import FAIL_GRACE_S, RankFailed, SpawnTimeout, spawn

__all__ = ["FAIL_GRACE_S", "RankFailed", "SpawnTimeout", "spawn"]
