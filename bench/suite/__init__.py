"""The side-by-side benchmark suite: DTask against Celery, Huey, RQ, Dramatiq,
procrastinate (tasks) and PySyncObj (Raft), run by `python -m bench`.

One module per idea: `stats` (median/min/max), `report` (tables, RESULTS.md),
`procs` (worker subprocesses), `mark` (the end-of-run sentinel task), `latency` (paced
submissions, start stamps), `parallel` (several client processes), `failover` (DTask's
leader killed under load), one `peer_*` module per system (its app, its no-op task,
its scenarios), `systems` (the registry), `raft` (the Raft layer alone), `scenarios`
(which tables a run makes), `cli` (the command line).
"""
