"""The write-behind persister: the leader's applied changes mirrored into a database.

`rows` turns scheduler objects into rows, `schema` owns the tables, `store` is one
connection (PostgreSQL or SQLite), `writer.Persister` writes batches on its own
thread and `history.HistoryReader` answers history reads on another.
"""

from .history import HistoryReader
from .rows import (
    ATTEMPT_COLUMNS,
    CRON_COLUMNS,
    TASK_COLUMNS,
    WORKER_COLUMNS,
    Batch,
    attempt_rows,
    task_row,
)
from .store import Store, StoreUnavailable, open_store
from .writer import Persister

__all__ = [
    "ATTEMPT_COLUMNS", "CRON_COLUMNS", "TASK_COLUMNS", "WORKER_COLUMNS", "Batch", "HistoryReader",
    "Persister", "Store", "StoreUnavailable", "attempt_rows", "open_store", "task_row",
]
