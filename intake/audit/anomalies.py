"""Unusual bursts of PHI access: the rule that flags a user's hour for a compliance review.

Why: an insider browsing patients out of curiosity (or copying them) opens far more records in
an hour than their work needs. The rule compares each clock hour with the same user's own
recent habit, so a busy pharmacist is not flagged for a normal busy day and a quiet one is
flagged when they suddenly open dozens of records.

The rule: for each user and clock hour (UTC), ``count`` is the number of different requests
whose PHI the user opened in that hour. The hour is flagged when

    count >= max(FLOOR, FACTOR x median)

where ``median`` is the median of the user's counts over the hours *with activity* in the
BASELINE (30 days) before that hour; a user with no earlier activity has median 0, so only the
floor applies. The hour itself is left out of its own baseline so a burst cannot hide itself.
It assumes the counts given are complete for the baseline period (the caller fetches 30 days
more than the period it wants flagged) and is a screening aid: a flagged hour is a question to
ask, not a finding.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from statistics import median

FLOOR = 20
FACTOR = 3
BASELINE = timedelta(days=30)


@dataclass(frozen=True)
class HourCount:
    """How many different requests ``user`` opened in the clock hour starting at ``hour``."""

    user: str
    hour: datetime
    count: int


@dataclass(frozen=True)
class Anomaly:
    user: str
    hour: datetime
    count: int
    median: float
    threshold: float
    baseline_hours: int


def threshold(baseline: list[int], *, floor: int = FLOOR, factor: float = FACTOR) -> float:
    """The count at or above which an hour is flagged, given the user's usual hourly counts."""
    usual = median(baseline) if baseline else 0
    return max(float(floor), factor * usual)


def find_anomalies(
    counts: Iterable[HourCount],
    *,
    since: datetime | None = None,
    floor: int = FLOOR,
    factor: float = FACTOR,
    window: timedelta = BASELINE,
) -> list[Anomaly]:
    """Flag the (user, hour) pairs at or after ``since`` whose count breaks the rule above.

    Newest hour first, then the highest count.
    """
    by_user: dict[str, list[HourCount]] = defaultdict(list)
    for item in counts:
        if item.count > 0:
            by_user[item.user].append(item)
    flagged = []
    for user, items in by_user.items():
        items.sort(key=lambda c: c.hour)
        hours = [c.hour for c in items]
        for index, item in enumerate(items):
            if since is not None and item.hour < since:
                continue
            start = bisect_left(hours, item.hour - window, 0, index)
            baseline = [c.count for c in items[start:index]]
            limit = threshold(baseline, floor=floor, factor=factor)
            if item.count >= limit:
                flagged.append(
                    Anomaly(
                        user=user,
                        hour=item.hour,
                        count=item.count,
                        median=float(median(baseline)) if baseline else 0.0,
                        threshold=limit,
                        baseline_hours=len(baseline),
                    )
                )
    flagged.sort(key=lambda a: (a.hour, a.count), reverse=True)
    return flagged
