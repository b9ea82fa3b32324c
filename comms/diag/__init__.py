"""Diagnostics: tagged logging (log), the flight recorder (flight), Chrome/Perfetto timelines
(timeline) and the post-mortem analysis of flight-recorder dumps (trace, ``python -m comms.trace``)."""
