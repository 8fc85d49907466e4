"""DTask: a distributed task scheduler.

    import dtask
    client = dtask.Client("tcp://127.0.0.1:7301,tcp://127.0.0.1:7302,tcp://127.0.0.1:7303")
    task_id = client.submit("shell", {"cmd": "echo hello"})
    print(client.wait(task_id)["status"])

`@dtask.task` registers a Python function that workers can run by name.
"""

from .client import (
    BadRequest,
    Client,
    Conflict,
    DTaskError,
    TaskNotFound,
    TooLarge,
    Unavailable,
)
from .worker.registry import task

__all__ = ["BadRequest", "Client", "Conflict", "DTaskError", "TaskNotFound", "TooLarge",
           "Unavailable", "task"]
