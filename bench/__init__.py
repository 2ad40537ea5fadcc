"""The `linrec bench` workloads: each runs linrec beside a peer in one process and reports ratios.

Nothing in engine/, models/, kernels/ or server/ imports this package; it imports them.
"""
