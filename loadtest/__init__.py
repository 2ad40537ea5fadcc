"""Server load tests: locust users (locustfile.py), the one command that runs them against a fresh
server (run.py, also `linrec bench serve`), and the summary they produce (summary.py)."""
