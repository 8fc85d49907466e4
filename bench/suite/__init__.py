"""The side-by-side benchmark suite: DTask against Celery, Huey, RQ, Dramatiq,
procrastinate (tasks) and PySyncObj (Raft), run by `python -m bench`.

One module per idea: `stats` (median/min/max), `report` (tables, RESULTS.md),
`procs` (worker subprocesses), `mark` (the end-of-run sentinel task), one `peer_*`
module per system (its app, its no-op task, its scenarios), `systems` (the registry),
`raft` (the Raft layer alone), `cli` (the command line).
"""
