"""Runnable examples: python -m comms.examples.<name> (each module says what it shows)."""
