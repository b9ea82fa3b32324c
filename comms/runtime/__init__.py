"""The runtime under a communicator: the native engine's wrapper (engine), init (bootstrap, hostid),
the topology detector (topology), failure reports (failures) and shared-memory cleanup (cleanup)."""
