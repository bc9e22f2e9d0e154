"""The compliance dashboard: the reports' numbers as charts and tables."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from intake.compliance import charts, reports
from intake.extensions import DbSession
from intake.models import KINDS

DAYS = 30
WEEKS = 12


@dataclass
class Panel:
    """One chart with the numbers behind it, as a table: header row, then rows."""

    chart: charts.Chart
    caption: str
    header: list[str]
    rows: list[list[str]]


def _short(day: date) -> str:
    return day.strftime("%m-%d")


def requests_panel(session: DbSession, now: datetime) -> Panel:
    since = reports.start_of_day(now) - timedelta(days=DAYS - 1)
    counts = reports.requests_per_day(session, since)
    days = reports.day_range(since.date(), now.date())
    series = [(kind, [counts.get((day, kind), 0) for day in days]) for kind in KINDS]
    total = sum(counts.values())
    chart = charts.bar_chart(
        "chart-requests",
        f"Requests received per day by kind, last {DAYS} days",
        f"Stacked bars, one per UTC day from {days[0]} to {days[-1]}: {total} requests in all "
        f"({', '.join(f'{k} {sum(v)}' for k, v in series)}). The table below lists each day.",
        [_short(d) for d in days],
        series,
        label_every=5,
    )
    rows = [
        [day.isoformat(), *(str(v[i]) for _, v in series), str(sum(v[i] for _, v in series))]
        for i, day in enumerate(days)
    ]
    return Panel(chart, "Requests per day", ["Day (UTC)", *KINDS, "total"], rows)


def completion_panel(session: DbSession, now: datetime) -> Panel:
    monday = reports.start_of_day(now) - timedelta(days=now.weekday())
    since = monday - timedelta(weeks=WEEKS - 1)
    medians = {(m.week, m.kind): m for m in reports.completion_medians(session, since)}
    weeks = [since.date() + timedelta(weeks=n) for n in range(WEEKS)]
    series = [
        (kind, [medians[(w, kind)].hours if (w, kind) in medians else 0 for w in weeks])
        for kind in KINDS
    ]
    chart = charts.bar_chart(
        "chart-completion",
        f"Median hours from submission to completion, per week, last {WEEKS} weeks",
        "Side-by-side bars per week (starting Monday, UTC) for each kind of request; "
        "a missing bar means nothing was completed. The table below lists the medians and "
        "how many requests each is taken over.",
        [_short(w) for w in weeks],
        series,
        stacked=False,
        label_every=2,
        unit="h",
        integer=False,
    )

    def cell(week: date, kind: str) -> str:
        found = medians.get((week, kind))
        return f"{found.hours:g} h (n={found.requests})" if found else "–"

    rows = [
        [w.isoformat(), *(cell(w, kind) for kind in (*KINDS, "all"))]
        for w in weeks
        if any((w, kind) in medians for kind in KINDS)
    ]
    return Panel(chart, "Median time to completion", ["Week of (UTC)", *KINDS, "all kinds"], rows)


def breaches_panel(session: DbSession, now: datetime, team_names: Mapping[str, str]) -> Panel:
    since = reports.start_of_day(now) - timedelta(days=DAYS - 1)
    teams = reports.sla_breaches(session, since, now)
    chart = charts.bar_chart(
        "chart-breaches",
        f"SLA breaches per team, requests received in the last {DAYS} days",
        f"Stacked bars per team: completed after the due time, and still open past it. "
        f"{sum(t.breaches for t in teams)} breaches of {sum(t.requests for t in teams)} "
        "requests. The table below lists each team.",
        [team_names.get(t.team, t.team) for t in teams],
        [
            ("completed late", [t.completed_late for t in teams]),
            ("open past due", [t.open_overdue for t in teams]),
        ],
    )
    rows = [
        [
            team_names.get(t.team, t.team),
            str(t.requests),
            str(t.completed_late),
            str(t.open_overdue),
            f"{100 * t.breaches / t.requests:.0f} %" if t.requests else "–",
        ]
        for t in teams
    ]
    header = ["Team", "Requests", "Completed late", "Open past due", "Breach rate"]
    return Panel(chart, "SLA breaches per team", header, rows)


def views_panel(session: DbSession, now: datetime, limit_users: int = 25) -> Panel:
    since = reports.start_of_day(now) - timedelta(days=DAYS - 1)
    per_user = reports.views_per_day(session, since)
    days = reports.day_range(since.date(), now.date())
    totals = {u: sum(v[0] for v in d.values()) for u, d in per_user.items()}
    users = sorted((u for u in totals if totals[u]), key=lambda u: (-totals[u], u))[:limit_users]
    values = {
        (user, _short(day)): per_user[user].get(day, (0, 0, 0))[0] for user in users for day in days
    }
    chart = charts.heat_map(
        "chart-views",
        f"PHI views per user per day, last {DAYS} days",
        "A grid with one row per user and one column per UTC day; each numbered cell is how "
        "many times that user opened a request's page that day (darker is more). The table "
        "below lists every non-zero cell.",
        users,
        [_short(d) for d in days],
        values,
        label_every=5,
    )
    rows: list[list[str]] = []
    for user in users:
        for day in days:
            views, requests, listing = per_user[user].get(day, (0, 0, 0))
            if views:
                rows.append([user, day.isoformat(), str(views), str(requests), str(listing)])
    header = ["User", "Day (UTC)", "Request views", "Different requests", "Queue list views"]
    return Panel(chart, "PHI views per user per day", header, rows)


def build(session: DbSession, now: datetime, team_names: Mapping[str, str]) -> dict[str, Any]:
    """Every panel of the dashboard, in page order."""
    return {
        "panels": [
            requests_panel(session, now),
            completion_panel(session, now),
            breaches_panel(session, now, team_names),
            views_panel(session, now),
        ]
    }
