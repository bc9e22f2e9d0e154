"""The dashboard's charts: server-drawn SVG with text alternatives and the numbers behind them."""

from __future__ import annotations

import re
from collections import Counter
from datetime import timedelta

from sqlalchemy import select, update

from intake.clock import utcnow
from intake.compliance import charts
from intake.extensions import db
from intake.models import Request
from intake.requests import casework
from tests.conftest import reference_from
from tests.intake.compliance.conftest import submit_routed
from tests.intake.compliance.test_access_report import table_rows


def set_request(app, reference, **values):
    """Move a request's clock (test set-up: requests are not append-only)."""
    with app.app_context():
        db.session.execute(update(Request).where(Request.reference == reference).values(**values))
        db.session.commit()


def test_dashboard_charts_show_the_numbers(app, patient, staff, officer_client):
    now = utcnow()
    today, three_days_ago = now.date(), (now - timedelta(days=3)).date()
    done, team = submit_routed(app, patient)
    late_open, _ = submit_routed(app, patient)
    old, _ = submit_routed(app, patient)
    reference_from(patient.contact())
    alice = staff.create("alice", "staff", (team,))
    keyring = app.extensions["intake.keyring"]
    with app.app_context():
        for _ in range(3):
            casework.open_request(db.session, keyring, done, alice.actor(), now)
        casework.change_status(db.session, done, alice.actor(), "in_progress", now)
        casework.change_status(db.session, done, alice.actor(), "completed", now)
        completed_at = now  # the event's time is within a second of this
    # ``done`` arrived 5 hours before it was completed, due 1 hour after arrival: late.
    set_request(
        app,
        done,
        created_at=completed_at - timedelta(hours=5),
        sla_due_at=completed_at - timedelta(hours=4),
    )
    set_request(app, late_open, sla_due_at=now - timedelta(minutes=10))
    set_request(app, old, created_at=now - timedelta(days=3))

    page = officer_client.get("/compliance/")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert "style=" not in html and "<script" not in html

    # Requests per day by kind.
    per_day = {row[0]: row[1:] for row in table_rows(html, "chart-requests-table")}
    refills = Counter([today, three_days_ago, (completed_at - timedelta(hours=5)).date()])
    expected = {
        day.isoformat(): [
            str(refills[day]),
            str(int(day == today)),
            str(refills[day] + (day == today)),
        ]
        for day in (today, three_days_ago, (completed_at - timedelta(hours=5)).date())
    }
    assert {day: per_day[day] for day in expected} == expected  # refill, contact, total
    assert len(per_day) == 30
    assert sum(int(row[2]) for row in per_day.values()) == 4
    svg = html.split('<svg class="chart" id="chart-requests"')[1].split("</svg>")[0]
    assert (
        'role="img"' in svg and 'aria-labelledby="chart-requests-title chart-requests-desc"' in svg
    )
    assert f"<title>{today.strftime('%m-%d')}, contact: 1</title>" in svg
    assert "4 requests in all (refill 3, contact 1)" in svg

    # Median time to completion, in hours, for the week of completion.
    medians = table_rows(html, "chart-completion-table")
    week = completed_at.date() - timedelta(days=completed_at.weekday())
    assert medians == [[week.isoformat(), "5 h (n=1)", "–", "5 h (n=1)"]]
    assert "<title>" in html.split('id="chart-completion"')[1].split("</svg>")[0]

    # SLA breaches per team: one completed late, one open past due.
    names = {t.id: t.name for t in app.extensions["intake.routing"].teams.values()}
    breaches = {row[0]: row for row in table_rows(html, "chart-breaches-table")}
    assert breaches[names[team]][1:] == ["3", "1", "1", "67 %"]
    assert "2 breaches of 3 requests" in html

    # PHI views per user per day: alice opened a request three times today.
    views = table_rows(html, "chart-views-table")
    assert views == [["alice", today.isoformat(), "3", "1", "0"]]
    heat = html.split('id="chart-views"')[1].split("</svg>")[0]
    assert re.search(r'font-weight="bold" fill="#ffffff">3</text>', heat)
    assert f"<title>alice, {today.strftime('%m-%d')}: 3</title>" in heat

    # The same numbers on alice's activity report.
    user = officer_client.get("/compliance/users/alice").get_data(as_text=True)
    assert table_rows(user, "views-per-day") == [[today.isoformat(), "3", "1", "0"]]
    counts = {row[0]: row[1:] for row in table_rows(user, "action-counts")}
    assert counts == {
        "phi.viewed": ["3", "PHI viewed"],
        "request.status_changed": ["2", "Status changed"],
    }
    with app.app_context():
        assert db.session.scalar(select(Request.status).where(Request.reference == done)) == (
            "completed"
        )


def test_an_empty_dashboard_says_so(officer_client):
    html = officer_client.get("/compliance/").get_data(as_text=True)
    assert html.count("none in this period.") == 4
    assert "Nothing in this period." in html


def test_bar_chart_geometry_is_scaled_and_labelled():
    chart = charts.bar_chart(
        "c", "T", "D", ["a", "b"], [("x", [1, 3]), ("y", [1, 0])], stacked=True
    )
    assert [charts.axis(n) for n in (0, 2, 3, 7, 37, 120)] == [
        (1, 1),
        (2, 1),
        (3, 1),
        (8, 2),
        (40, 10),
        (150, 50),
    ]
    assert charts.axis(5.5, integer=False) == (6, 2) and charts.axis(0.3, integer=False) == (
        0.3,
        0.1,
    )
    assert [label.text for label in chart.labels[:4]] == ["0", "1", "2", "3"]
    heights = [r.height for r in chart.rects]
    assert len(chart.rects) == 3 and abs(heights[2] - 3 * heights[0]) < 0.05
    assert [r.title for r in chart.rects] == ["a, x: 1", "a, y: 1", "b, x: 3"]
    # Stacked: a's second bar sits on its first.
    assert abs(chart.rects[1].y + chart.rects[1].height - chart.rects[0].y) < 0.05
    assert chart.legend == [(charts.PALETTE[0], "x"), (charts.PALETTE[1], "y")]
