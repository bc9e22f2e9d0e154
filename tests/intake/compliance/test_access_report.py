"""The access report answers "who saw or changed this patient's request, when and why"."""

from __future__ import annotations

import re
from html.parser import HTMLParser

from sqlalchemy import select

from intake.clock import utcnow
from intake.extensions import db
from intake.models import AuditEvent
from intake.requests import casework
from tests.conftest import hidden_fields
from tests.intake.compliance.conftest import submit_routed

REASON = "Patient called the after-hours line; on-call pharmacist needed the refill history"


class TableReader(HTMLParser):
    """The text of each row of the table with ``id``, cell by cell."""

    def __init__(self, table_id: str) -> None:
        super().__init__()
        self.table_id, self.depth, self.rows = table_id, 0, []
        self.row: list[str] | None = None
        self.cell: list[str] | None = None
        self.in_body = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table" and attrs.get("id") == self.table_id:
            self.depth = 1
        elif tag == "table" and self.depth:
            self.depth += 1
        if not self.depth:
            return
        if tag == "tbody":
            self.in_body = True
        elif tag == "tr" and self.in_body:
            self.row = []
        elif tag in ("td", "th") and self.row is not None:
            self.cell = []

    def handle_endtag(self, tag):
        if not self.depth:
            return
        if tag in ("td", "th") and self.cell is not None and self.row is not None:
            self.row.append(" ".join("".join(self.cell).split()))
            self.cell = None
        elif tag == "tr" and self.row is not None:
            self.rows.append(self.row)
            self.row = None
        elif tag == "tbody":
            self.in_body = False
        elif tag == "table":
            self.depth -= 1

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)


def table_rows(html: str, table_id: str) -> list[list[str]]:
    reader = TableReader(table_id)
    reader.feed(html)
    return reader.rows


def event_rows(html: str) -> list[list[str]]:
    """The access report's events, the "What" cell without the action code shown beside it."""
    rows = table_rows(html, "access-events")
    for row in rows:
        row[4] = row[4].rsplit(" ", 1)[0]
    return rows


def work_a_request(app, patient, staff):
    """A refill worked by its team, opened by an outsider through break-glass, transferred."""
    reference, team = submit_routed(app, patient)
    other_team = next(t for t in app.extensions["intake.routing"].teams if t != team)
    alice = staff.create("alice", "staff", (team,))
    bob = staff.create("bob", "staff", (other_team,))
    sam = staff.create("sam", "supervisor")
    keyring = app.extensions["intake.keyring"]
    with app.app_context():
        now = utcnow()
        casework.open_request(db.session, keyring, reference, alice.actor(), now)
        casework.claim(db.session, reference, alice.actor(), now)
        casework.change_status(db.session, reference, alice.actor(), "in_progress", now)
        casework.add_note(db.session, keyring, reference, alice.actor(), "Called Rx office", now)
        casework.open_request(db.session, keyring, reference, alice.actor(), now)
        casework.open_request(
            db.session, keyring, reference, bob.actor(), now, break_glass_reason=REASON
        )
        casework.open_request(db.session, keyring, reference, sam.actor(), now)
        casework.transfer(
            db.session,
            reference,
            sam.actor(),
            other_team,
            "Needs the IVIG nurse",
            list(app.extensions["intake.routing"].teams),
            now,
        )
    return reference, team, other_team, (alice, bob, sam)


def test_report_lists_every_phi_view_by_every_user_with_the_break_glass_reason(
    app, patient, staff, officer_client
):
    reference, team, other_team, (alice, bob, sam) = work_a_request(app, patient, staff)
    with app.app_context():
        views = db.session.execute(
            select(AuditEvent.seq, AuditEvent.actor).where(
                AuditEvent.reference == reference, AuditEvent.action == "phi.viewed"
            )
        ).all()
    assert len(views) == 4

    page = officer_client.get(f"/compliance/access/{reference}")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    events = event_rows(html)
    seqs = {int(row[0]) for row in events}
    assert {seq for seq, _ in views} <= seqs
    viewed = [row for row in events if row[6] == "PHI view" and row[4].startswith("Opened")]
    assert sorted(row[2] for row in viewed) == ["alice", "alice", "bob", "sam"]
    assert [row[3] for row in viewed if row[2] == "sam"] == ["supervisor"]
    glass = [row for row in events if row[4].startswith("Broke the glass")]
    assert len(glass) == 1 and glass[0][2] == "bob" and glass[0][5] == REASON
    assert any(row[2] == "bob" and "(break-glass)" in row[4] for row in viewed)

    what = {row[4]: row for row in events}
    assert (
        "in progress" in what["Changed the status"][5]
        and "queued →" in what["Changed the status"][5]
    )
    assert what[f"Transferred from {team} to {other_team}"][5] == "Needs the IVIG nurse"
    assert "Claimed the request" in what and "Submitted by the patient" in what
    assert f"Routed to {team}" in what
    assert any(k.startswith("Added a note") for k in what)
    # Every event naming the reference is listed, oldest first.
    with app.app_context():
        all_seqs = db.session.scalars(
            select(AuditEvent.seq).where(AuditEvent.reference == reference).order_by(AuditEvent.seq)
        ).all()
    assert [int(row[0]) for row in events] == list(all_seqs)

    people = {row[0]: row for row in table_rows(html, "access-people")}
    assert people["alice"][4] == "2" and people["bob"][4] == "1" and people["bob"][5] == "1"
    assert people["sam"][1] == "supervisor" and people["the patient"][1] == "–"
    # The report shows routing facts, never PHI, and is printable.
    assert "Maria" not in html and "555-0143" not in html and "Called Rx office" not in html
    assert 'class="muted print-only"' in html


def test_report_for_unknown_or_malformed_references(officer_client):
    assert officer_client.get("/compliance/access/R-0000-0000").status_code == 404
    assert officer_client.get("/compliance/access/not-a-reference").status_code == 404
    typed = officer_client.get("/compliance/access?reference=r 7k3m q9p2")
    assert typed.status_code == 303 and typed.headers["Location"].endswith(
        "/compliance/access/R-7K3M-Q9P2"
    )
    bad = officer_client.get("/compliance/access?reference=hello")
    assert bad.status_code == 400 and "R-7K3M-Q9P2" in bad.get_data(as_text=True)
    lower = officer_client.get("/compliance/access/r-7k3m-q9p2")
    assert lower.status_code == 301


def test_viewing_a_report_records_nothing(app, patient, staff, officer_client):
    reference, *_ = work_a_request(app, patient, staff)
    with app.app_context():
        before = db.session.scalar(select(AuditEvent.seq).order_by(AuditEvent.seq.desc()))
    assert officer_client.get(f"/compliance/access/{reference}").status_code == 200
    assert officer_client.get("/compliance/users/alice").status_code == 200
    with app.app_context():
        after = db.session.scalar(select(AuditEvent.seq).order_by(AuditEvent.seq.desc()))
    assert after == before
    assert re.search(r"R-[0-9A-Z]{4}-[0-9A-Z]{4}", reference)


def test_report_lists_queue_views_and_searches_that_showed_the_request(
    app, patient, staff, officer_client
):
    reference, team = submit_routed(app, patient)
    other, _team = submit_routed(app, patient, phone="(202) 555-0111")
    alice = staff.create("alice", "staff", (team,))
    client = staff.login(alice)
    assert reference in client.get("/staff/queue").get_data(as_text=True)
    search_page = client.get("/staff/search").get_data(as_text=True)
    found = client.post(
        "/staff/search", data={**hidden_fields(search_page), "phone": "202-555-0143"}
    )
    assert reference in found.get_data(as_text=True)

    html = officer_client.get(f"/compliance/access/{reference}").get_data(as_text=True)
    events = event_rows(html)
    listed = [row for row in events if row[2] == "alice"]
    assert [row[4] for row in listed] == [
        "Saw the first name and last initial in a queue list",
        "Found it with a search",
    ]
    assert [row[6] for row in listed] == ["queue list view", "search result"]
    assert all(row[6] != "PHI view" for row in listed), "a list view is not a full PHI view"
    # The other request was in the same queue page but its search did not find it.
    other_html = officer_client.get(f"/compliance/access/{other}").get_data(as_text=True)
    other_rows = [row for row in event_rows(other_html) if row[2] == "alice"]
    assert [row[4] for row in other_rows] == ["Saw the first name and last initial in a queue list"]
