"""For one request, the access report, its CSV, the audit search it links to and the dashboard
tell the same truth: the same events, counted the same way."""

from __future__ import annotations

import csv
import io
from collections import Counter
from html import unescape

from intake.clock import utcnow
from intake.compliance.reports import ACCESS_COLUMNS, PHI_VIEW_DEFINITION
from intake.extensions import db
from intake.requests import casework
from tests.conftest import hidden_fields
from tests.intake.compliance.conftest import submit_routed
from tests.intake.compliance.test_access_report import table_rows
from tests.intake.compliance.test_audit_search import page_rows

REASON = "Covering the on-call line for the infusion team tonight"


def a_realistic_morning(app, patient, staff):
    """Opened twice, listed on two queue pages, found by a search, broken into, noted, moved on."""
    reference, team = submit_routed(app, patient)
    other_team = next(t for t in app.extensions["intake.routing"].teams if t != team)
    alice = staff.create("alice", "staff", (team,))
    bob = staff.create("bob", "staff", (other_team,))
    client = staff.login(alice)
    for _ in range(2):
        assert reference in client.get("/staff/queue").get_data(as_text=True)
    form = client.get("/staff/search").get_data(as_text=True)
    found = client.post("/staff/search", data={**hidden_fields(form), "phone": "202-555-0143"})
    assert reference in found.get_data(as_text=True)
    for _ in range(2):
        assert client.get(f"/staff/requests/{reference}").status_code == 200
    keyring = app.extensions["intake.keyring"]
    with app.app_context():
        now = utcnow()
        casework.claim(db.session, reference, alice.actor(), now)
        casework.change_status(db.session, reference, alice.actor(), "in_progress", now)
        casework.add_note(db.session, keyring, reference, alice.actor(), "Left a voicemail", now)
        casework.open_request(
            db.session, keyring, reference, bob.actor(), now, break_glass_reason=REASON
        )
        casework.change_status(db.session, reference, alice.actor(), "completed", now)
    return reference


def test_report_csv_audit_search_and_dashboard_agree(app, patient, staff, officer_client):
    reference = a_realistic_morning(app, patient, staff)

    # The access report.
    page = officer_client.get(f"/compliance/access/{reference}")
    html = page.get_data(as_text=True)
    report = table_rows(html, "access-events")
    report_seqs = [int(row[0]) for row in report]
    assert report_seqs == sorted(report_seqs), "oldest first"
    counts = Counter(row[6] for row in report)
    assert counts["PHI view"] == 3  # alice twice, bob once (break-glass)
    assert counts["break-glass"] == 1 and counts["queue list view"] == 2
    assert counts["search result"] == 1
    people = {row[0]: row for row in table_rows(html, "access-people")}
    assert (people["alice"][4], people["bob"][4], people["bob"][5]) == ("2", "1", "1")
    assert people["alice"][6] == "2" and people["alice"][7] == "1"
    assert 'id="total-phi-views">3<' in html and f'id="total-events">{len(report)}<' in html
    assert PHI_VIEW_DEFINITION in unescape(html)
    assert "not listed here" not in html  # the old footnote that contradicted the table

    # Its CSV: named after the request, the same events, oldest first, plain names beside codes.
    export = officer_client.get(f"/compliance/access/{reference}.csv")
    assert export.status_code == 200 and export.mimetype == "text/csv"
    disposition = export.headers["Content-Disposition"]
    assert disposition == f'attachment; filename="access-{reference}.csv"'
    body = list(csv.reader(io.StringIO(export.get_data(as_text=True))))
    assert tuple(body[0]) == ACCESS_COLUMNS
    assert [int(row[0]) for row in body[1:]] == report_seqs
    action, plain, kind = (
        ACCESS_COLUMNS.index(c) for c in ("Action", "Action (plain)", "Counts as")
    )
    assert Counter(row[kind] for row in body[1:]) == counts
    assert {(row[action], row[plain]) for row in body[1:]} >= {
        ("phi.viewed", "PHI viewed"),
        ("phi.break_glass", "Break-glass access"),
        ("request.searched", "Requests searched"),
    }

    # The audit search the report links to, and its CSV: the same events.
    link = f'href="/compliance/audit?reference={reference}"'
    assert link in html
    searched = page_rows(officer_client, f"?reference={reference}")
    assert sorted(int(row[0]) for row in searched) == report_seqs
    audit_csv = officer_client.get(f"/compliance/audit.csv?reference={reference}")
    rows = list(csv.reader(io.StringIO(audit_csv.get_data(as_text=True))))[1:]
    assert sorted(int(row[0]) for row in rows) == report_seqs

    # The dashboard: the same PHI views per person (this is the only request).
    dashboard = officer_client.get("/compliance/").get_data(as_text=True)
    views = {row[0]: row for row in table_rows(dashboard, "chart-views-table")}
    assert {user: int(row[2]) for user, row in views.items()} == {"alice": 2, "bob": 1}
    assert int(views["alice"][4]) == 2  # queue list views
    assert PHI_VIEW_DEFINITION in unescape(dashboard)
    # And the per-user report.
    alice = table_rows(
        officer_client.get("/compliance/users/alice").get_data(as_text=True), "views-per-day"
    )
    assert [row[1] for row in alice] == ["2"]
