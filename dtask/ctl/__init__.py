"""`dtaskctl`: the command line for DTask clusters (docs/cli.md).

`main` is the click group behind the `dtaskctl` console script; importing the
command modules registers their commands on it.
"""

from . import cluster, cron, tasks  # noqa: F401  (registers the commands)
from .app import main

__all__ = ["main"]
