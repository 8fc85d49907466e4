"""Which ticks of a cron job to fire now: on-time ticks, and the misfire (catch-up) policy.

The leader calls `misfire` with the job's last handled tick and its own "now", and puts
the answer in a log entry; followers apply the entry, never this function, so its
result only has to be right, not reproducible on another clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from dtask.cron.policies import CronError, check_misfire_policy

if TYPE_CHECKING:
    from dtask.cron.schedule import Schedule


@dataclass(frozen=True, slots=True)
class Tick:
    """One tick to run: its instant, and whether it runs late as a catch-up."""

    at_us: int
    catch_up: bool


@dataclass(frozen=True, slots=True)
class FirePlan:
    """What to do now: `ticks` to run, ascending; `skipped` misfired ticks not run;
    `last_handled_us` the new last handled tick (>= every tick at or before now)."""

    ticks: tuple[Tick, ...]
    skipped: int
    last_handled_us: int


def misfire(
    schedule: Schedule,
    last_tick_us: int,
    now_us: int,
    policy: str = "once",
    grace_us: int = 0,
    catchup_window_us: int = 0,
    max_catchup: int = 1,
) -> FirePlan:
    """Plan the ticks in (last_tick_us, now_us].

    A tick with now - tick <= grace_us is on time and fires, always and on its own. Older
    ones are misfired and follow `policy`: "skip" runs none, "once" runs the latest,
    "all" runs the latest `max_catchup`. Misfired ticks before now - catchup_window_us
    never run (0: no window; a window shorter than the grace is taken as the grace).
    Work: O(fires * log(tick interval) + days in the gap), never O(ticks missed).
    """
    check_misfire_policy(policy)
    for name, value in (("grace", grace_us), ("catch-up window", catchup_window_us),
                        ("max catch-up", max_catchup)):
        if value < 0:
            raise CronError(f"{name} must not be negative, got {value}")
    if now_us <= last_tick_us:
        return FirePlan((), 0, last_tick_us)

    on_time_from = now_us - grace_us  # ticks at or after this are on time
    on_time = []
    t = schedule.next_after(max(last_tick_us, on_time_from - 1))
    while t <= now_us:
        on_time.append(Tick(t, False))
        t = schedule.next_after(t)

    late_until = on_time_from - 1  # misfired ticks lie in (last_tick_us, late_until]
    missed = schedule.count_between(last_tick_us, late_until)
    catchup: list[int] = []
    if missed and policy != "skip":
        run_after = last_tick_us
        if catchup_window_us:
            window_from = now_us - max(catchup_window_us, grace_us)
            run_after = max(run_after, window_from - 1)
        limit = 1 if policy == "once" else max_catchup
        catchup = schedule.ticks_between(run_after, late_until, limit)

    if on_time:
        last = on_time[-1].at_us
    elif catchup:
        last = catchup[-1]
    elif missed:
        last = schedule.last_at_or_before(late_until, last_tick_us)
    else:
        last = last_tick_us  # no tick in (last_tick_us, now_us]
    ticks = tuple(Tick(t, True) for t in catchup) + tuple(on_time)
    return FirePlan(ticks, missed - len(catchup), last)
