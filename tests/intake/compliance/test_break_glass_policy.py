"""The break-glass policy a pharmacy configures: who may break the glass, whose access alerts
the supervisors at once, who reviews; and review comments that keep patient details out of
the append-only trail."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import func, select

from config import Settings
from config.settings import SettingsError
from intake.compliance.reports import access_report
from intake.extensions import db
from intake.models import AuditEvent, BreakGlassReview, OutboxMessage, Request
from intake.requests.routing import load_routing
from tests.conftest import hidden_fields
from tests.intake.compliance.conftest import submit_routed
from tests.intake.compliance.test_break_glass import REASON, break_glass, review
from tests.workers.conftest import SAMPLE_ROUTING, smtp_server  # noqa: F401 - a fixture

PATIENT_PHI = ["Maria", "Núñez", "1980-03-15", "555-0143", "+12025550143", "maria@example.com"]


def use_policy(app, **changes) -> None:
    """Run the app under another break-glass policy, as if its environment said so."""
    app.extensions["intake.settings"] = app.extensions["intake.settings"].replace(**changes)


def last_seq(app) -> int:
    with app.app_context():
        return int(db.session.scalar(select(func.max(AuditEvent.seq))) or 0)


def events_after(app, seq: int) -> list[AuditEvent]:
    with app.app_context():
        rows = db.session.scalars(select(AuditEvent).where(AuditEvent.seq > seq)).all()
        db.session.expunge_all()
        return list(rows)


def break_glass_through_the_page(client, reference, reason=REASON):
    page = client.get(f"/staff/requests/{reference}")
    token = hidden_fields(client.get("/staff/login").get_data(as_text=True))["csrf_token"]
    response = client.post(
        f"/staff/requests/{reference}/break-glass", data={"csrf_token": token, "reason": reason}
    )
    return page, response


def test_a_review_comment_holding_patient_details_is_refused_and_stores_nothing(
    app, patient, staff, officer_client
):
    reference, team = submit_routed(app, patient)
    outsider = next(t for t in app.extensions["intake.routing"].teams if t != team)
    seq = break_glass(app, reference, staff.create("dana", "staff", (outsider,)))
    since = last_seq(app)

    for comment in (
        "Called her back on 202 555 0143, fine",  # a phone number
        "Patient seen 3/15/80 at the counter",  # a date
        "Born 1980-03-15, on-call roster agrees",  # an ISO date
        "Asked maria@example.com to confirm",  # an e-mail address
    ):
        response = review(officer_client, seq, comment)
        html = response.get_data(as_text=True)
        assert response.status_code == 400, comment
        assert "no numbers, dates or e-mail addresses" in html, comment
        assert 'aria-invalid="true"' in html

    assert last_seq(app) == since
    with app.app_context():
        assert db.session.scalars(select(BreakGlassReview)).all() == []
    assert "Pending review (1)" in officer_client.get("/compliance/break-glass").get_data(
        as_text=True
    )
    # Without the details the same review goes through.
    assert review(officer_client, seq, "Checked with the on-call roster").status_code == 303


def test_a_role_left_out_of_the_policy_cannot_break_the_glass(app, patient, staff, officer):
    use_policy(app, break_glass_roles=("staff", "supervisor"))
    reference, _team = submit_routed(app, patient)
    olivia = staff.login(officer)
    since = last_seq(app)

    page, response = break_glass_through_the_page(olivia, reference)

    assert page.status_code == 404
    assert "Open with break-glass" not in page.get_data(as_text=True)
    assert "ask a supervisor" in page.get_data(as_text=True)
    html = response.get_data(as_text=True)
    assert response.status_code == 403
    assert "Your role may not break the glass at this pharmacy" in html
    assert not [value for value in PATIENT_PHI if value in html]
    # Only the refused attempt is recorded: no PHI view, nothing pending review.
    events = events_after(app, since)
    assert [(e.action, e.outcome, e.reference) for e in events] == [
        ("phi.break_glass", "refused", reference)
    ]
    assert json.loads(events[0].details) == {"username": "olivia", "refused": "role_not_allowed"}
    carlos = staff.login(staff.create("carlos", "compliance"))
    listing = carlos.get("/compliance/break-glass").get_data(as_text=True)
    assert "Pending review (0)" in listing
    assert review(carlos, events[0].seq, "Nothing to review here").status_code == 404
    # The access report lists the attempt as refused, not as a view of the patient's data.
    with app.app_context():
        report = access_report(db.session, reference)
    attempt = next(e for e in report.entries if e.seq == events[0].seq)
    assert attempt.outcome == "refused" and not attempt.saw_phi and not attempt.break_glass
    assert attempt.what == "Refused: tried to break the glass (role not allowed)"
    olivia_line = next(p for p in report.people if p.who == "olivia")
    assert (olivia_line.phi_views, olivia_line.break_glass) == (0, 0)


def test_staff_can_be_left_out_too(app, patient, staff):
    use_policy(app, break_glass_roles=("compliance",))
    reference, team = submit_routed(app, patient)
    outsider = next(t for t in app.extensions["intake.routing"].teams if t != team)
    dana = staff.login(staff.create("dana", "staff", (outsider,)))

    _page, response = break_glass_through_the_page(dana, reference)

    assert response.status_code == 403
    assert "Maria" not in response.get_data(as_text=True)


def supervisors_by_email(tmp_path):
    text = SAMPLE_ROUTING.read_text()
    head = '[supervisors]\nname = "Pharmacy supervisors"\nnotify = ["log"]'
    assert head in text
    path = tmp_path / "routing.toml"
    path.write_text(
        text.replace(
            head,
            '[supervisors]\nname = "Pharmacy supervisors"\nnotify = ["email"]\n'
            'email = "supervisors@pharmacy.test"',
        )
    )
    return load_routing(path)


def test_a_compliance_officers_break_glass_alerts_the_supervisors(
    app,
    patient,
    staff,
    officer,
    tmp_path,
    smtp_server,  # noqa: F811 - the fixture
):
    smtp_url, mailbox = smtp_server
    reference, team = submit_routed(app, patient)
    outsider = next(t for t in app.extensions["intake.routing"].teams if t != team)
    dana = staff.login(staff.create("dana", "staff", (outsider,)))
    olivia = staff.login(officer)

    # A staff member's break-glass is reviewed later, as before; no alert.
    assert break_glass_through_the_page(dana, reference)[1].status_code == 200
    # A compliance officer's alerts the supervisors in the same transaction.
    since = last_seq(app)
    assert break_glass_through_the_page(olivia, reference)[1].status_code == 200
    with app.app_context():
        request_id = db.session.scalar(select(Request.id).where(Request.reference == reference))
        alerts = db.session.scalars(
            select(OutboxMessage).where(OutboxMessage.task == "notify_break_glass")
        ).all()
        assert [(a.request_id, a.status) for a in alerts] == [(request_id, "pending")]
        alert_id = alerts[0].id
        glass = db.session.scalars(
            select(AuditEvent).where(AuditEvent.seq > since, AuditEvent.action == "phi.break_glass")
        ).one()
        assert json.loads(glass.details)["supervisors_alerted"] is True

    # The worker's task sends it (run eagerly here) to the supervisors' e-mail channel.
    from workers.tasks import notify_break_glass

    app.extensions["intake.routing"] = supervisors_by_email(tmp_path)
    use_policy(app, smtp_url=smtp_url)
    with app.app_context():
        notify_break_glass.apply(args=[request_id], kwargs={"outbox_id": alert_id}).get()
        assert db.session.get(OutboxMessage, alert_id).status == "done"
        sent = db.session.scalars(
            select(AuditEvent).where(AuditEvent.action == "notification.sent")
        ).all()[-1]
        assert json.loads(sent.details)["reason"] == "break_glass"

    assert len(mailbox.messages) == 1
    message = mailbox.messages[0]
    assert message["To"] == "supervisors@pharmacy.test"
    assert message["Subject"] == f"Break-glass access to {reference} by olivia (compliance)"
    body = mailbox.bodies()[0]
    assert "/compliance/break-glass" in body and reference in body
    # Reference and who, never the patient nor the typed reason.
    assert not [value for value in [*PATIENT_PHI, REASON] if value in body + message["Subject"]]


def test_a_supervisor_reviews_when_the_pharmacy_names_them_never_their_own(
    app, patient, staff, officer
):
    reference, _team = submit_routed(app, patient)
    sofia_account = staff.create("sofia", "supervisor")
    sofia = staff.login(sofia_account)
    olivia = staff.login(officer)
    assert break_glass_through_the_page(olivia, reference)[1].status_code == 200
    with app.app_context():
        seq = int(db.session.scalar(select(func.max(AuditEvent.seq))) or 0) - 1

    # By default supervisors do not review: the page is not there for them.
    assert sofia.get("/compliance/break-glass").status_code == 404
    use_policy(app, break_glass_reviewers=("supervisor", "compliance"))

    listing = sofia.get("/compliance/break-glass")
    html = listing.get_data(as_text=True)
    assert listing.status_code == 200 and "Pending review (1)" in html
    assert 'href="/compliance/break-glass"' in html  # in the navigation
    assert "/compliance/access/" not in html  # the access report stays compliance's
    for page in ("/compliance/", "/compliance/audit", f"/compliance/access/{reference}"):
        assert sofia.get(page).status_code == 404, page
    # Breaking the glass herself does not make it reviewable by herself.
    sofia_glass = break_glass_through_the_page(sofia, reference, "Checking the on-call handover")
    assert sofia_glass[1].status_code == 200
    with app.app_context():
        own = int(db.session.scalar(select(func.max(AuditEvent.seq))) or 0) - 1
    refused = review(sofia, own, "Reviewing my own access")
    assert refused.status_code == 409
    assert "Another supervisor or compliance officer must review" in refused.get_data(as_text=True)

    assert review(sofia, seq, "Confirmed with olivia: audit of a complaint").status_code == 303
    with app.app_context():
        row = db.session.get(BreakGlassReview, seq)
        assert row.reviewer_id == sofia_account.user_id
        assert db.session.get(BreakGlassReview, own) is None
        event = db.session.scalars(
            select(AuditEvent).where(AuditEvent.action == "break_glass.reviewed")
        ).one()
        assert event.actor_role == "supervisor"


def test_the_policy_is_read_from_the_environment():
    default = Settings.from_env({})
    assert default.break_glass_roles == ("staff", "supervisor", "compliance")
    assert default.break_glass_alert_roles == ("compliance",)
    assert default.break_glass_reviewers == ("compliance",)
    read = Settings.from_env(
        {
            "INTAKE_BREAK_GLASS_ROLES": " Staff, supervisor ",
            "INTAKE_BREAK_GLASS_ALERT_ROLES": "none",
            "INTAKE_BREAK_GLASS_REVIEWERS": "supervisor,compliance",
        }
    )
    assert read.break_glass_roles == ("staff", "supervisor")
    assert read.break_glass_alert_roles == ()
    assert read.break_glass_reviewers == ("supervisor", "compliance")
    for name, value in (
        ("INTAKE_BREAK_GLASS_ROLES", "staff,admin"),
        ("INTAKE_BREAK_GLASS_ROLES", "none"),
        ("INTAKE_BREAK_GLASS_REVIEWERS", "staff"),
        ("INTAKE_BREAK_GLASS_REVIEWERS", "none"),
        ("INTAKE_BREAK_GLASS_ALERT_ROLES", "everyone"),
    ):
        with pytest.raises(SettingsError, match=name):
            Settings.from_env({name: value})


@pytest.mark.parametrize(
    "comment",
    [
        "Called her back on 20 25 55 01 43, all fine",  # a phone in pairs
        "Rang back on 202.555.0143 after the shift",  # a phone with dots
        "Her MRN 4417 29 matched the label",  # an MRN-like number
        "Confirmed birth date 3 15 80 with her",  # a date with spaces
        "Seen 3/5 at the counter, she agreed",  # day and month only
        "Born March 15 1980, on-call roster agrees",  # a date in words
        "Born March 15th, the roster agrees",  # month and day in words
        "Her birthday is 15 Mar, roster agrees",  # day before the month
        "Full-width digits \uff12\uff10\uff12 \uff15\uff15\uff15",  # other scripts' digits
        "Called at 10:30 on 20 25 55 01 43",  # a time does not hide a phone
        "Ref 12:30:45 checked",  # nor does a run that only looks like a time
    ],
)
def test_patient_details_in_other_shapes_are_refused(comment):
    from intake.compliance.break_glass import ReviewError, check_comment

    with pytest.raises(ReviewError, match="no numbers, dates or e-mail addresses"):
        check_comment(comment)


@pytest.mark.parametrize(
    "comment",
    [
        "Checked with the on-call roster",
        "Called back twenty five minutes later, all fine",  # spelled-out numbers
        "Covering team 2 on shift 3 this week",  # a couple of small numbers
        "We may need a second look at this one",  # a month name that is a word
        "After-hours call at 10:30 pm, justified",  # a time of day
    ],
)
def test_comments_without_patient_details_still_pass(comment):
    from intake.compliance.break_glass import check_comment

    assert check_comment(comment) == comment
