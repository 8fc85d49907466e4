"""dtask.cron: parsing, fire instants in zones and across DST, misfire plans (fake instants)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from croniter import croniter
from hypothesis import given, settings
from hypothesis import strategies as st

from dtask.cron import (
    MISFIRE_POLICIES,
    OVERLAP_POLICIES,
    CronError,
    Schedule,
    Tick,
    check_misfire_policy,
    check_overlap_policy,
    misfire,
    parse,
    validate_policy,
)
from dtask.cron import schedule as cron_module

S = 1_000_000  # one second in microseconds
M, H, D = 60 * S, 3600 * S, 86400 * S


def at(text: str, tz: str = "UTC") -> int:
    """An instant from local wall-clock ISO text (or text with an explicit offset)."""
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=ZoneInfo(tz))
    return int(dt.timestamp()) * S


def z(text: str) -> int:
    """An instant from UTC ISO text."""
    return at(text, "UTC")


def fires(sched: Schedule, after: int, until: int) -> list[int]:
    out, t = [], sched.next_after(after)
    while t <= until:
        out.append(t)
        t = sched.next_after(t)
    return out


def utc_text(ticks: list[int]) -> list[str]:
    return [datetime.fromtimestamp(t // S, UTC).strftime("%m-%d %H:%M:%S") for t in ticks]


# -- syntax -------------------------------------------------------------------------


def test_five_fields_in_utc():
    s = parse("*/15 9-17 * * mon-fri")
    assert s.next_after(z("2024-07-05T16:50")) == z("2024-07-05T17:00")  # a Friday
    assert s.next_after(z("2024-07-05T17:45")) == z("2024-07-08T09:00")  # -> Monday
    assert s.next_after(z("2024-07-05T17:00")) == z("2024-07-05T17:15")  # strictly after
    assert s.next_after(z("2024-07-05T16:59:59") + 999_999) == z("2024-07-05T17:00")


def test_seconds_field_is_the_sixth_and_last():
    every_10s = parse("* * * * * */10")
    assert every_10s.next_after(z("2024-01-01T00:00:05")) == z("2024-01-01T00:00:10")
    noon_30s = parse("0 12 * * * 30")  # 12:00:30, not minute 30
    assert noon_30s.next_after(z("2024-01-01T00:00")) == z("2024-01-01T12:00:30")
    assert parse("* * * * *").next_after(z("2024-01-01T00:00:05")) == z("2024-01-01T00:01")


@pytest.mark.parametrize(
    "macro, expr",
    [("@yearly", "0 0 1 1 *"), ("@annually", "0 0 1 1 *"), ("@monthly", "0 0 1 * *"),
     ("@weekly", "0 0 * * 0"), ("@daily", "0 0 * * *"), ("@midnight", "0 0 * * *"),
     ("@hourly", "0 * * * *"), ("@DAILY", "0 0 * * *")],
)
def test_macros(macro, expr):
    a, b = parse(macro), parse(expr)
    t = z("2024-05-17T13:14:15")
    assert fires(a, t, t + 400 * D)[:5] == fires(b, t, t + 400 * D)[:5]
    assert a.periodic == b.periodic == (macro == "@hourly")


def test_calendar_corners():
    assert parse("0 0 29 2 *").next_after(z("2025-01-01")) == z("2028-02-29")
    assert parse("0 0 L * *").next_after(z("2024-02-02")) == z("2024-02-29")
    assert parse("0 0 * * 1#2").next_after(z("2024-07-01")) == z("2024-07-08")  # 2nd Monday
    assert parse("0 0 * * L5").next_after(z("2024-07-01")) == z("2024-07-26")  # last Friday
    # both day fields restricted: either matches (cron's OR)
    assert parse("0 0 13 * 5").next_after(z("2024-07-01")) == z("2024-07-05")
    assert parse("0 0 * * 7").next_after(z("2024-07-01")) == z("2024-07-07")  # 7 is Sunday


@pytest.mark.parametrize(
    "expr, message",
    [
        ("61 * * * *", "bad cron expression '61 * * * *': minute must be 0-59, not '61'"),
        ("0 24 * * *", "bad cron expression '0 24 * * *': hour must be 0-23, not '24'"),
        ("0 0 0 * *", "day-of-month must be 1-31 or L, not '0'"),
        ("0 0 * 13 *", "month must be 1-12 or jan-dec, not '13'"),
        ("0 0 * foo *", "month must be 1-12 or jan-dec, not 'foo'"),
        ("0 0 * * 8", "day-of-week must be 0-7 or sun-sat"),
        ("* * * * * 60", "second must be 0-59, not '60'"),
        ("*/0 * * * *", "minute must be 0-59, not '*/0'"),
        ("0 0 15W * *", "day-of-month must be 1-31 or L, not '15W'"),
        ("H * * * *", "minute must be 0-59, not 'H'"),
        ("* * * *", "expected 5 fields (minute hour day-of-month month day-of-week) or 6"),
        ("0 0 1 1 * 0 2030", "got 7"),
        ("0 0 30 2 *", "bad cron expression '0 0 30 2 *': it never fires (no such date)"),
        ("0 0 31 4,6,9,11 *", "it never fires"),
        ("0 0 15 * 1#2", "day-of-week '#' or 'L' needs day-of-month '*'"),
        ("0 0 * * 1#2,3", "day-of-week must be 0-7 or sun-sat, optionally 1#2"),
        ("@reboot", "'@reboot' is not supported"),
        ("@often", "unknown cron macro '@often'"),
        ("   ", "empty cron expression"),
    ],
)
def test_bad_expressions_get_one_line_messages(expr, message):
    with pytest.raises(CronError) as err:
        parse(expr)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("tz", ["Mars/Olympus", "", "../../etc/passwd", "/etc/localtime", 5])
def test_unknown_time_zone(tz):
    with pytest.raises(CronError, match="unknown time zone"):
        parse("* * * * *", tz)


def test_schedule_is_an_immutable_hashable_value():
    a, b = parse("*/5 * * * *", "Europe/Berlin"), Schedule("*/5 * * * *", "Europe/Berlin")
    assert a == b and hash(a) == hash(b) and len({a, b, parse("*/5 * * * *")}) == 2
    with pytest.raises(AttributeError):
        a.expr = "* * * * *"
    assert repr(a) == "Schedule(expr='*/5 * * * *', tz='Europe/Berlin')"


def test_policy_names():
    assert MISFIRE_POLICIES == ("skip", "once", "all")
    assert OVERLAP_POLICIES == ("allow", "skip", "queue_one", "replace")
    validate_policy("once", "queue_one")
    assert check_misfire_policy("all") == "all" and check_overlap_policy("replace") == "replace"
    with pytest.raises(CronError, match="unknown overlap policy 'queue'"):
        check_overlap_policy("queue")
    # the broker imports everything from the one module
    for name in ("parse", "misfire", "Schedule", "FirePlan", "CronError",
                 "check_misfire_policy", "check_overlap_policy"):
        assert hasattr(cron_module, name)
    with pytest.raises(CronError, match="unknown misfire policy 'later': use one of skip"):
        validate_policy(misfire="later")
    with pytest.raises(CronError, match="unknown overlap policy 'kill'"):
        validate_policy(overlap="kill")


# -- time zones and DST -------------------------------------------------------------


def test_zone_without_dst_half_hour_offset():
    s = parse("0 9 * * *", "Asia/Kolkata")  # +05:30
    assert s.next_after(z("2024-07-01T00:00")) == z("2024-07-01T03:30")
    assert s.next_after(z("2024-07-01T03:30")) == z("2024-07-02T03:30")


def test_daily_job_in_the_spring_forward_gap_fires_once_when_the_gap_ends():
    # Berlin 2024-03-31: 02:00 CET -> 03:00 CEST (01:00Z). 02:30 does not exist.
    for expr in ("30 2 * * *", "0,30 2 * * *", "0 2,3 * * *"):
        s = parse(expr, "Europe/Berlin")
        day = fires(s, z("2024-03-30T23:00"), z("2024-03-31T22:00"))  # local Mar 31
        assert day == [z("2024-03-31T01:00")], expr
    s = parse("30 2 * * *", "Europe/Berlin")
    assert utc_text(fires(s, z("2024-03-29T00:00"), z("2024-04-02T00:00"))) == [
        "03-29 01:30:00", "03-30 01:30:00", "03-31 01:00:00", "04-01 00:30:00",
    ]
    # New York 2024-03-10: 02:00 EST -> 03:00 EDT (07:00Z)
    s = parse("30 2 * * *", "America/New_York")
    assert utc_text(fires(s, z("2024-03-09T00:00"), z("2024-03-11T12:00"))) == [
        "03-09 07:30:00", "03-10 07:00:00", "03-11 06:30:00",
    ]
    # a time just after the gap keeps its own instant
    s = parse("30 3 * * *", "Europe/Berlin")
    assert s.next_after(z("2024-03-30T23:00")) == z("2024-03-31T01:30")


def test_daily_job_in_the_repeated_hour_fires_once_at_the_first_pass():
    # Berlin 2024-10-27: 03:00 CEST -> 02:00 CET (01:00Z). 02:30 happens twice.
    s = parse("30 2 * * *", "Europe/Berlin")
    assert utc_text(fires(s, z("2024-10-26T00:00"), z("2024-10-28T12:00"))) == [
        "10-26 00:30:00", "10-27 00:30:00", "10-28 01:30:00",
    ]
    # New York 2024-11-03: 02:00 EDT -> 01:00 EST (06:00Z). 01:30 happens twice.
    s = parse("30 1 * * *", "America/New_York")
    assert utc_text(fires(s, z("2024-11-02T00:00"), z("2024-11-04T12:00"))) == [
        "11-02 05:30:00", "11-03 05:30:00", "11-04 06:30:00",
    ]
    # asked from inside the second pass, it waits for tomorrow
    assert s.next_after(z("2024-11-03T06:10")) == z("2024-11-04T06:30")


def test_every_15_minutes_across_spring_forward():
    s = parse("*/15 * * * *", "Europe/Berlin")
    local_day = fires(s, at("2024-03-31T00:00", "Europe/Berlin") - 1,
                      at("2024-04-01T00:00", "Europe/Berlin") - 1)
    assert len(local_day) == 23 * 4  # a 23-hour day
    around = fires(s, z("2024-03-31T00:30"), z("2024-03-31T01:30"))
    assert utc_text(around) == [  # 01:45 CET, then 03:00 CEST: still 15 real minutes
        "03-31 00:45:00", "03-31 01:00:00", "03-31 01:15:00", "03-31 01:30:00",
    ]
    assert all(b - a == 15 * M for a, b in zip(local_day, local_day[1:], strict=False))


def test_every_15_minutes_across_fall_back_keeps_real_intervals():
    s = parse("*/15 * * * *", "America/New_York")
    local_day = fires(s, at("2024-11-03T00:00", "America/New_York") - 1,
                      at("2024-11-04T00:00", "America/New_York") - 1)
    assert len(local_day) == 25 * 4  # a 25-hour day
    assert all(b - a == 15 * M for a, b in zip(local_day, local_day[1:], strict=False))
    around = fires(s, z("2024-11-03T05:30"), z("2024-11-03T06:30"))
    # 01:45 EDT, 01:00 EST, 01:15 EST, ... (the wall clock repeats, real time does not)
    assert utc_text(around) == [
        "11-03 05:45:00", "11-03 06:00:00", "11-03 06:15:00", "11-03 06:30:00",
    ]
    hourly = parse("@hourly", "America/New_York")
    assert utc_text(fires(hourly, z("2024-11-03T04:30"), z("2024-11-03T07:30"))) == [
        "11-03 05:00:00", "11-03 06:00:00", "11-03 07:00:00",  # 01:00 EDT, 01:00 EST, 02:00
    ]


def test_periodic_job_restricted_to_the_skipped_hour_does_not_fire_that_day():
    s = parse("*/15 2 * * *", "Europe/Berlin")
    assert s.periodic
    assert utc_text(fires(s, z("2024-03-30T12:00"), z("2024-04-01T12:00"))) == [
        "04-01 00:00:00", "04-01 00:15:00", "04-01 00:30:00", "04-01 00:45:00",
    ]
    # ... and in the repeated hour it fires through both passes
    assert len(fires(s, z("2024-10-26T22:00"), z("2024-10-27T22:00"))) == 8


def test_lord_howe_half_hour_dst():
    # 2024-10-06 02:00 +10:30 -> 02:30 +11:00 (15:30Z); 2024-04-07 02:00 +11 -> 01:30 +10:30
    s = parse("*/15 * * * *", "Australia/Lord_Howe")
    assert utc_text(fires(s, z("2024-10-05T15:00"), z("2024-10-05T16:00"))) == [
        "10-05 15:15:00", "10-05 15:30:00", "10-05 15:45:00", "10-05 16:00:00",
    ]
    daily = parse("45 1 * * *", "Australia/Lord_Howe")  # 01:45 repeats in April
    assert utc_text(fires(daily, z("2024-04-05T12:00"), z("2024-04-08T12:00"))) == [
        "04-05 14:45:00", "04-06 14:45:00", "04-07 15:15:00",
    ]
    gap = parse("15 2 * * *", "Australia/Lord_Howe")  # 02:15 is skipped in October
    assert gap.next_after(z("2024-10-05T12:00")) == z("2024-10-05T15:30")


def brute_force_ticks(expr: str, tz: str, a: int, b: int, periodic: bool) -> list[int]:
    """The DST rules of docs/cron.md, applied minute by minute with croniter.match."""
    info, out = ZoneInfo(tz), []

    def local(u):
        return datetime.fromtimestamp(u, UTC).astimezone(info)

    for u in range(a - a % 60 + 60, b + 1, 60):
        dt = local(u)
        hit = croniter.match(expr, dt.replace(tzinfo=None, fold=0)) and (
            dt.fold == 0 or periodic)  # fold=1: the second pass of a repeated time
        before, after = local(u - 1).utcoffset(), dt.utcoffset()
        if not hit and not periodic and after > before:  # u ends a gap: any match in it?
            gap = local(u - 1).replace(tzinfo=None) + timedelta(seconds=1)
            hit = any(croniter.match(expr, gap + timedelta(minutes=i))
                      for i in range(int((after - before).total_seconds()) // 60))
        if hit:
            out.append(u * S)
    return out


@pytest.mark.parametrize("tz, transition", [
    ("Europe/Berlin", "2024-03-31T01:00"), ("Europe/Berlin", "2024-10-27T01:00"),
    ("America/New_York", "2024-03-10T07:00"), ("America/New_York", "2024-11-03T06:00"),
    ("Australia/Lord_Howe", "2024-04-06T15:00"), ("Australia/Lord_Howe", "2024-10-05T15:30"),
])
def test_dst_rules_agree_with_a_brute_force_oracle(tz, transition):
    a, b = (z(transition) - 3 * H) // S, (z(transition) + 3 * H) // S
    for expr in ("30 2 * * *", "45 1 * * *", "*/15 * * * *", "@hourly", "*/20 2 * * *",
                 "0,30 1-3 * * *"):
        s = parse(expr, tz)
        assert fires(s, a * S, b * S) == brute_force_ticks(expr, tz, a, b, s.periodic), expr


def test_count_and_latest_agree_with_enumeration_across_transitions():
    for expr in ("30 2 * * *", "*/15 * * * *", "0,30 2 * * *", "* 2 * * * */20"):
        s = parse(expr, "Europe/Berlin")
        for a, b in ((z("2024-03-30T00:00"), z("2024-04-02T00:00")),
                     (z("2024-10-26T00:00"), z("2024-10-29T00:00"))):
            ticks = fires(s, a, b)
            assert s.count_between(a, b) == len(ticks), expr
            assert s.ticks_between(a, b, 3) == ticks[-3:]
            assert s.last_at_or_before(b, a) == ticks[-1]


# -- properties ---------------------------------------------------------------------

FIELD_CHOICES = (
    ["*", "*/7", "5", "0,30", "10-20", "*/15"],
    ["*", "2", "*/5", "1-3", "0,12"],
    ["*", "1", "15", "L", "1-5", "29,31"],
    ["*", "2", "3", "*/4", "10-12"],
    ["*", "0", "1-5", "sat,sun", "3"],
)
expressions = st.tuples(*(st.sampled_from(c) for c in FIELD_CHOICES),
                        st.sampled_from([None, "0", "*/20", "7,42"])).map(
    lambda f: " ".join(x for x in f if x is not None))
instants = st.integers(z("1975-01-01"), z("2090-01-01")).map(lambda t: t - t % 1000)
ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Asia/Kolkata"]


@settings(max_examples=300, deadline=None)
@given(expressions, instants, st.sampled_from(ZONES))
def test_next_after_is_strictly_later_and_nothing_is_skipped(expr, t, tz):
    s = parse(expr, tz)
    n = s.next_after(t)
    assert n > t and n % S == 0
    assert s.ticks_between(t, n - 1, 5) == []
    assert s.count_between(t, n - 1) == 0
    assert s.last_at_or_before(n, t) == n
    assert s.next_after(n) > n


@settings(max_examples=300, deadline=None)
@given(expressions, instants)
def test_utc_agrees_with_croniter(expr, t):
    # in UTC there is no DST, so croniter (on naive datetimes) is a fair oracle
    start = datetime(1970, 1, 1) + timedelta(microseconds=t)
    expected = croniter(expr, start).get_next(datetime)
    got = datetime(1970, 1, 1) + timedelta(microseconds=parse(expr).next_after(t))
    assert got == expected


@settings(max_examples=200, deadline=None)
@given(expressions, instants, st.integers(0, 3 * 86400 * S), st.sampled_from(ZONES[1:4]))
def test_count_and_latest_agree_with_enumeration(expr, t, span, tz):
    s = parse(expr, tz)
    ticks = fires(s, t, t + span)
    assert s.count_between(t, t + span) == len(ticks)
    assert s.last_at_or_before(t + span, t) == (ticks[-1] if ticks else None)
    assert s.ticks_between(t, t + span, 2) == ticks[-2:]


# -- misfire ------------------------------------------------------------------------

T0 = z("2024-07-01T00:00")


def plan(expr, last, now, **kw):
    return misfire(parse(expr), last, now, **kw)


def test_on_time_ticks_fire_individually_under_every_policy():
    for policy in MISFIRE_POLICIES:
        p = plan("* * * * * *", T0, T0 + 3 * S + 200, policy=policy, grace_us=5 * S)
        assert p.ticks == tuple(Tick(T0 + i * S, False) for i in (1, 2, 3))
        assert p.skipped == 0 and p.last_handled_us == T0 + 3 * S


def test_misfire_policies():
    # every minute; last handled 00:00; now 00:10:30 with 45 s grace: 00:10 is on
    # time, 00:01..00:09 are misfired
    now, grace = T0 + 10 * M + 30 * S, 45 * S
    skip = plan("* * * * *", T0, now, policy="skip", grace_us=grace)
    assert skip.ticks == (Tick(T0 + 10 * M, False),) and skip.skipped == 9
    once = plan("* * * * *", T0, now, policy="once", grace_us=grace)
    assert once.ticks == (Tick(T0 + 9 * M, True), Tick(T0 + 10 * M, False))
    assert once.skipped == 8
    every = plan("* * * * *", T0, now, policy="all", grace_us=grace, max_catchup=4)
    assert every.ticks == tuple(Tick(T0 + i * M, True) for i in (6, 7, 8, 9)) + (
        Tick(T0 + 10 * M, False),)
    assert every.skipped == 5
    for p in (skip, once, every):
        assert p.last_handled_us == T0 + 10 * M


def test_catchup_window_and_nothing_after_now_is_consumed():
    now = T0 + 10 * M + 30 * S
    p = plan("* * * * *", T0, now, policy="all", max_catchup=100, catchup_window_us=3 * M)
    # 00:08 and 00:09 are inside the 3-minute window, 00:10 is late by 30 s > grace 0
    assert [f.at_us for f in p.ticks] == [T0 + 8 * M, T0 + 9 * M, T0 + 10 * M]
    assert all(f.catch_up for f in p.ticks) and p.skipped == 7
    assert p.last_handled_us == T0 + 10 * M
    none_in_window = plan("0 * * * *", T0, T0 + 5 * H + 10 * M, catchup_window_us=5 * M)
    assert none_in_window.ticks == () and none_in_window.skipped == 5
    assert none_in_window.last_handled_us == T0 + 5 * H


def test_no_tick_due_and_clock_behind():
    p = plan("0 * * * *", T0, T0 + 30 * M)
    assert p.ticks == () and p.skipped == 0 and p.last_handled_us == T0
    p = plan("0 * * * *", T0 + H, T0)  # a new leader whose clock is behind
    assert p.ticks == () and p.last_handled_us == T0 + H
    with pytest.raises(CronError, match="unknown misfire policy"):
        plan("0 * * * *", T0, T0 + H, policy="later")
    with pytest.raises(CronError, match="grace must not be negative"):
        plan("0 * * * *", T0, T0 + H, grace_us=-1)


def test_week_long_gap_of_a_per_second_job_is_bounded_work(monkeypatch):
    calls = 0
    real = Schedule._next_s

    def counting(self, t):
        nonlocal calls
        calls += 1
        return real(self, t)

    monkeypatch.setattr(Schedule, "_next_s", counting)
    week = 7 * D
    now = T0 + week + 400_000
    once = plan("* * * * * *", T0, now, policy="once", grace_us=2 * S)
    # on time: ticks within 2 s of now (T0+week-1 s, T0+week); the rest are misfired
    assert once.ticks == (Tick(T0 + week - 2 * S, True),) + tuple(
        Tick(T0 + week - i * S, False) for i in (1, 0))
    assert once.skipped == 7 * 86400 - 3 and once.last_handled_us == T0 + week
    every = plan("* * * * * *", T0, now, policy="all", max_catchup=50)
    assert [f.at_us for f in every.ticks] == [T0 + week - i * S for i in range(49, -1, -1)]
    assert all(f.catch_up for f in every.ticks) and every.skipped == 7 * 86400 - 50
    skip = plan("* * * * * *", T0, now, policy="skip")
    assert skip.ticks == () and skip.skipped == 7 * 86400 and skip.last_handled_us == T0 + week
    assert calls < 1000  # not 604,800


def test_misfire_across_dst_counts_real_ticks():
    s = parse("*/15 * * * *", "America/New_York")
    last, now = z("2024-11-03T00:00"), z("2024-11-04T00:00")  # 24 real hours
    p = misfire(s, last, now, policy="once")
    assert p.skipped + len(p.ticks) == 96 and p.last_handled_us == now
