"""The anomaly rule: a user's hour is flagged when far above their own usual hour."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from intake.audit.anomalies import FACTOR, FLOOR, HourCount, find_anomalies, threshold

NOON = datetime(2026, 11, 20, 12, tzinfo=UTC)


def hours(user: str, counts: list[int], end: datetime = NOON, step=timedelta(hours=1)):
    """``counts`` for consecutive hours ending at ``end``."""
    return [HourCount(user, end - step * (len(counts) - 1 - i), c) for i, c in enumerate(counts)]


def flagged(counts, **kw):
    return [(a.user, a.hour, a.count) for a in find_anomalies(counts, **kw)]


def test_the_rule_is_the_documented_one():
    assert (FLOOR, FACTOR) == (20, 3)
    assert threshold([]) == 20
    assert threshold([2, 4, 100]) == 20  # median 4: 12, below the floor
    assert threshold([10, 10, 11]) == 30
    assert threshold([8, 10, 12, 14]) == 33  # median of an even count: 11


def test_a_user_without_history_is_flagged_at_the_floor_only():
    assert flagged(hours("new", [19])) == []
    assert flagged(hours("new", [20])) == [("new", NOON, 20)]


def test_a_busy_user_is_judged_against_their_own_median():
    busy = hours("busy", [10, 12, 9, 10, 11, 29])
    assert flagged(busy) == []
    burst = hours("busy", [10, 12, 9, 10, 11, 30])
    [anomaly] = find_anomalies(burst)
    assert (anomaly.count, anomaly.median, anomaly.threshold, anomaly.baseline_hours) == (
        30,
        10.0,
        30.0,
        5,
    )


def test_the_flagged_hour_is_not_part_of_its_own_baseline():
    # With the burst in its own baseline the median would be 20 and the threshold 60.
    counts = hours("x", [20, 60], step=timedelta(days=1))
    assert flagged(counts)[0] == ("x", NOON, 60)


def test_only_the_last_30_days_of_active_hours_count():
    old_busy = hours("y", [40, 40, 40], end=NOON - timedelta(days=31))
    assert flagged([*old_busy, HourCount("y", NOON, 25)], since=NOON) == [("y", NOON, 25)]
    recent_busy = hours("y", [40, 40, 40], end=NOON - timedelta(days=29))
    assert flagged([*recent_busy, HourCount("y", NOON, 25)], since=NOON) == []


def test_users_are_judged_apart_and_quiet_hours_do_not_lower_the_bar_below_the_floor():
    counts = [
        *hours("steady", [15] * 10),
        *hours("quiet", [1] * 10 + [20]),
        HourCount("idle", NOON, 0),
    ]
    assert flagged(counts) == [("quiet", NOON, 20)]


def test_since_limits_the_flags_not_the_baseline_and_newest_come_first():
    counts = [
        HourCount("a", NOON - timedelta(days=2), 25),
        HourCount("a", NOON - timedelta(hours=5), 80),
        HourCount("b", NOON - timedelta(hours=5), 90),
        HourCount("b", NOON, 21),
    ]
    result = flagged(counts, since=NOON - timedelta(days=1))
    assert result == [
        ("b", NOON - timedelta(hours=5), 90),
        ("a", NOON - timedelta(hours=5), 80),
    ]
    # b's 21 at noon sits below 3 x 90; a's earlier 25 is before ``since``.
