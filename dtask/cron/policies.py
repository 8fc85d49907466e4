"""The names a user picks for a cron job's policies, and the error for bad input.

Kept apart from the schedule arithmetic so the misfire planner and the schedule can both
use them without importing each other.
"""

from __future__ import annotations

MISFIRE_POLICIES = ("skip", "once", "all")
OVERLAP_POLICIES = ("allow", "skip", "queue_one", "replace")
DEFAULT_MISFIRE_POLICY = "once"
DEFAULT_OVERLAP_POLICY = "skip"


class CronError(ValueError):
    """A cron expression, time zone or policy that DTask cannot use; a one-line message."""


def check_misfire_policy(name: str) -> str:
    """Return `name` if it is a misfire policy, else raise CronError."""
    if name not in MISFIRE_POLICIES:
        raise CronError(
            f"unknown misfire policy '{name}': use one of {', '.join(MISFIRE_POLICIES)}"
        )
    return name


def check_overlap_policy(name: str) -> str:
    """Return `name` if it is an overlap policy, else raise CronError."""
    if name not in OVERLAP_POLICIES:
        raise CronError(
            f"unknown overlap policy '{name}': use one of {', '.join(OVERLAP_POLICIES)}"
        )
    return name


def validate_policy(misfire: str | None = None, overlap: str | None = None) -> None:
    """Check both names at once (None is not checked); raise CronError on a bad one."""
    if misfire is not None:
        check_misfire_policy(misfire)
    if overlap is not None:
        check_overlap_policy(overlap)
