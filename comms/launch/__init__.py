"""Starting ranks on one host: the launcher (run, ``python -m comms.run``) and CPU binding (binding)."""
