"""What a run shows: Prometheus metrics (``metrics``), experiment loggers (``loggers``) and the
end-of-run report (``report``).
"""
