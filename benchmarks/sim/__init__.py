"""Discrete-event simulator of an rlsys cluster run (see README.md in this folder).

``cost`` is the cost model (calibrated seconds per unit of work), ``model`` the event engine
that replays rlsys's own scheduling and staleness rules on a virtual clock, ``run`` the CLI.
"""
