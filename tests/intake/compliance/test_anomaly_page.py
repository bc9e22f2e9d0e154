"""The anomalies page flags a burst of record openings and nothing else."""

from __future__ import annotations

from datetime import timedelta

from intake.audit import chain as audit
from intake.clock import utcnow
from intake.extensions import db
from intake.requests import casework
from tests.intake.compliance.conftest import submit_routed
from tests.intake.compliance.test_access_report import table_rows


def open_as(app, account, reference, at, monkeypatch):
    monkeypatch.setattr(audit, "utcnow", lambda: at)
    with app.app_context():
        casework.open_request(
            db.session, app.extensions["intake.keyring"], reference, account.actor(), at
        )
    monkeypatch.undo()


def test_a_burst_of_openings_is_flagged_against_the_users_habit(
    app, patient, staff, officer_client, monkeypatch
):
    made = [submit_routed(app, patient) for _ in range(21)]
    team = made[0][1]
    assert {t for _, t in made} == {team}
    references = [r for r, _ in made]
    eve = staff.create("eve", "staff", (team,))
    frank = staff.create("frank", "staff", (team,))

    burst_hour = (utcnow() - timedelta(hours=2)).replace(minute=0, second=0, microsecond=0)
    # eve's habit: two requests an hour on five earlier days.
    for days_ago in range(3, 8):
        for reference in references[:2]:
            open_as(app, eve, reference, burst_hour - timedelta(days=days_ago), monkeypatch)
    # Then 21 different requests in one hour, one of them three times (counted once).
    for minute, reference in enumerate(references):
        open_as(app, eve, reference, burst_hour + timedelta(minutes=minute), monkeypatch)
    for again in (1, 2):
        open_as(app, eve, references[0], burst_hour + timedelta(minutes=30 + again), monkeypatch)
    # frank opens five: normal.
    for reference in references[:5]:
        open_as(app, frank, reference, burst_hour + timedelta(minutes=5), monkeypatch)

    page = officer_client.get("/compliance/anomalies")
    assert page.status_code == 200
    rows = table_rows(page.get_data(as_text=True), "anomalies")
    assert rows == [
        ["eve", burst_hour.strftime("%Y-%m-%d %H:00"), "21", "2", "20", "5", "See the views"]
    ]
    html = page.get_data(as_text=True)
    assert "at least 20 different requests" in html and "3 times as many" in html
    # The dashboard counts it; eve's activity report points to it.
    assert 'id="anomaly-count">1<' in officer_client.get("/compliance/").get_data(as_text=True)
    assert "flagged as unusual" in officer_client.get("/compliance/users/eve").get_data(
        as_text=True
    )
    assert "flagged as unusual" not in officer_client.get("/compliance/users/frank").get_data(
        as_text=True
    )
    # The link to the views lists exactly the burst's events.
    link = html.split('href="/compliance/audit?')[1].split('"')[0].replace("&amp;", "&")
    views = table_rows(
        officer_client.get("/compliance/audit?" + link).get_data(as_text=True), "audit-events"
    )
    assert len(views) == 23 and {row[3] for row in views} == {"eve"}
    assert officer_client.get("/compliance/anomalies?days=2").status_code == 404
    assert officer_client.get("/compliance/anomalies?days=1").status_code == 200
