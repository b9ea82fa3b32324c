"""Algorithm selection: the cost model (model), the rules' grammar and layers (rules), the link
figures measured at init (calibrate), the one timing mechanism (online) and the explicit tuning
step built on it (tune, ``python -m comms.tune``)."""
