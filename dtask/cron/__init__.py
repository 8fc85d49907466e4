"""Cron schedules for DTask: the pure part (no clock, no I/O).

`parse` validates an expression in an IANA time zone and returns a `Schedule`, whose
`next_after` gives fire instants (int microseconds since the epoch, UTC) with the DST
rules in docs/cron.md; `misfire` plans which due ticks to fire, catch up or skip.
Everything is importable from `dtask.cron.schedule` too. The replicated job state and
the leader's firing loop live in `dtask.broker`.

Modules: `schedule` (parsing, Schedule, DST), `misfire` (the plan), `policies` (policy
names, CronError), `wallclock` (field matching), `zone` (UTC-offset transitions).
"""

from dtask.cron.schedule import (
    DEFAULT_MISFIRE_POLICY,
    DEFAULT_OVERLAP_POLICY,
    MACROS,
    MISFIRE_POLICIES,
    OVERLAP_POLICIES,
    CronError,
    FirePlan,
    Schedule,
    Tick,
    check_misfire_policy,
    check_overlap_policy,
    misfire,
    parse,
    validate_policy,
)

__all__ = [
    "DEFAULT_MISFIRE_POLICY",
    "DEFAULT_OVERLAP_POLICY",
    "MACROS",
    "MISFIRE_POLICIES",
    "OVERLAP_POLICIES",
    "CronError",
    "FirePlan",
    "Schedule",
    "Tick",
    "check_misfire_policy",
    "check_overlap_policy",
    "misfire",
    "parse",
    "validate_policy",
]
