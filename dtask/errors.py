"""The errors of the DTask client: one exception class per error code of the protocol.

Every error reply (docs/protocol.md) becomes a DTaskError with its code; the common
codes have subclasses so that callers can catch them by kind.
"""

from __future__ import annotations

from . import protocol as p


class DTaskError(Exception):
    """An error reply from the scheduler (or a client-side failure), with its code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    def __reduce__(self) -> tuple:  # picklable with both fields (e.g. across processes)
        return (type(self), (self.code, self.message))


class TaskNotFound(DTaskError):
    """NOT_FOUND: no task with that id (never existed, or purged after retention)."""


class Conflict(DTaskError):
    """CONFLICT: the request contradicts the task's state (e.g. cancel a finished task)."""


class BadRequest(DTaskError, ValueError):
    """BAD_REQUEST: an invalid request, refused by the scheduler or before sending."""


class TooLarge(DTaskError, ValueError):
    """TOO_LARGE: a payload, batch or message over the limit."""


class Unavailable(DTaskError):
    """No leader answered within the timeout (or the cluster has no quorum).

    For a submit the outcome is unknown: the task may exist. Resubmitting with the
    same `idempotency_key` is safe.
    """


_ERRORS: dict[str, type[DTaskError]] = {
    p.NOT_FOUND: TaskNotFound, p.CONFLICT: Conflict, p.BAD_REQUEST: BadRequest,
    p.TOO_LARGE: TooLarge, p.UNAVAILABLE: Unavailable,
}
CLOSED = "CLOSED"  # client-side code: the client was closed with the request outstanding


def error_for(code: str, message: str) -> DTaskError:
    """The exception for an error reply's code (DTaskError for codes without a subclass)."""
    return _ERRORS.get(code, DTaskError)(code, message)
