"""Break-glass review: pending accesses first, a review writes its row and its audit event."""

from __future__ import annotations

import json

from sqlalchemy import select

from intake.clock import utcnow
from intake.extensions import db
from intake.models import AuditEvent, BreakGlassReview
from intake.requests import casework
from tests.conftest import hidden_fields
from tests.intake.compliance.conftest import submit_routed
from tests.intake.compliance.test_access_report import table_rows

REASON = "Covering the weekend on-call for the infusion team"


def break_glass(app, reference, account, reason=REASON) -> int:
    with app.app_context():
        casework.open_request(
            db.session,
            app.extensions["intake.keyring"],
            reference,
            account.actor(),
            utcnow(),
            break_glass_reason=reason,
        )
        return int(
            db.session.scalar(
                select(AuditEvent.seq)
                .where(AuditEvent.action == "phi.break_glass")
                .order_by(AuditEvent.seq.desc())
            )
        )


def review(client, seq, comment, outcome: str | None = "appropriate"):
    page = client.get("/compliance/break-glass")
    token = hidden_fields(page.get_data(as_text=True))["csrf_token"]
    data = {"csrf_token": token, "comment": comment}
    if outcome is not None:
        data["outcome"] = outcome
    return client.post(f"/compliance/break-glass/{seq}/review", data=data)


def test_review_writes_the_row_and_the_event_together(app, patient, staff, officer, officer_client):
    reference, team = submit_routed(app, patient)
    outsider_team = next(t for t in app.extensions["intake.routing"].teams if t != team)
    dana = staff.create("dana", "staff", (outsider_team,))
    first = break_glass(app, reference, dana)
    second = break_glass(app, reference, dana, "Second look for the on-call pharmacist")

    page = officer_client.get("/compliance/break-glass").get_data(as_text=True)
    assert "Pending review (2)" in page
    assert page.index(f'id="bg-{first}"') < page.index(f'id="bg-{second}"')
    assert REASON in page and f'for="comment-{first}"' in page

    response = review(
        officer_client, first, "Confirmed with the on-call roster: justified.", "appropriate"
    )
    assert response.status_code == 303
    with app.app_context():
        row = db.session.get(BreakGlassReview, first)
        assert row.reviewer_id == officer.user_id
        assert row.comment == "Confirmed with the on-call roster: justified."
        event = db.session.scalars(
            select(AuditEvent).where(AuditEvent.action == "break_glass.reviewed")
        ).one()
        assert event.actor == f"user:{officer.user_id}" and event.reference == reference
        assert json.loads(event.details) == {
            "username": "olivia",
            "break_glass_seq": first,
            "accessed_by": f"user:{dana.user_id}",
            "review_outcome": "appropriate",
            "comment": "Confirmed with the on-call roster: justified.",
        }
        # One transaction: the row's time is the event's time, to the second.
        assert abs((row.reviewed_at - event.created_at).total_seconds()) < 5

    after = officer_client.get("/compliance/break-glass").get_data(as_text=True)
    assert "Pending review (1)" in after
    reviewed = table_rows(after, "reviewed")
    assert len(reviewed) == 1
    assert reviewed[0][0] == str(first) and reviewed[0][2] == "dana"
    assert reviewed[0][4] == REASON and reviewed[0][5] == "Appropriate"
    assert reviewed[0][6] == "olivia"
    assert reviewed[0][8] == "Confirmed with the on-call roster: justified."
    # The review shows in the request's access report too, with its outcome.
    report = officer_client.get(f"/compliance/access/{reference}").get_data(as_text=True)
    assert "Reviewed a break-glass access: appropriate" in report


def test_a_review_needs_an_outcome_and_the_list_shows_each_outcome(
    app, patient, staff, officer, officer_client
):
    reference, team = submit_routed(app, patient)
    outsider_team = next(t for t in app.extensions["intake.routing"].teams if t != team)
    dana = staff.create("dana", "staff", (outsider_team,))
    first = break_glass(app, reference, dana)
    second = break_glass(app, reference, dana, "Second look for the on-call pharmacist")
    page = officer_client.get("/compliance/break-glass").get_data(as_text=True)
    for value in ("appropriate", "not_appropriate", "escalated"):
        assert f'id="outcome-{first}-{value}"' in page

    missing = review(officer_client, first, "Looked at the roster for that night", outcome=None)
    assert missing.status_code == 400 and "Choose an outcome." in missing.get_data(as_text=True)
    made_up = review(officer_client, first, "Looked at the roster for that night", "fine")
    assert made_up.status_code == 400
    with app.app_context():
        assert db.session.scalars(select(BreakGlassReview)).all() == []
        assert not db.session.scalars(
            select(AuditEvent).where(AuditEvent.action == "break_glass.reviewed")
        ).all()

    assert (
        review(officer_client, first, "Not on call that night", "not_appropriate").status_code
        == 303
    )
    assert (
        review(officer_client, second, "Sent to the privacy officer", "escalated").status_code
        == 303
    )
    reviewed = {
        row[0]: row
        for row in table_rows(
            officer_client.get("/compliance/break-glass").get_data(as_text=True), "reviewed"
        )
    }
    assert reviewed[str(first)][5] == "Not appropriate"
    assert reviewed[str(first)][8] == "Not on call that night"
    assert reviewed[str(second)][5] == "Escalated"
    with app.app_context():
        outcomes = [
            json.loads(e.details)["review_outcome"]
            for e in db.session.scalars(
                select(AuditEvent)
                .where(AuditEvent.action == "break_glass.reviewed")
                .order_by(AuditEvent.seq)
            )
        ]
    assert outcomes == ["not_appropriate", "escalated"]


def test_a_review_cannot_be_repeated_faked_or_self_approved(
    app, patient, staff, officer, officer_client
):
    reference, _team = submit_routed(app, patient)
    first = break_glass(app, reference, officer)  # compliance officers may break the glass too
    own = review(officer_client, first, "I reviewed myself, all fine")
    assert own.status_code == 409 and "Another compliance officer must review" in own.get_data(
        as_text=True
    )

    colleague = staff.create("carlos", "compliance")
    carlos = staff.login(colleague)
    short = review(carlos, first, "ok")
    assert short.status_code == 400
    assert 'aria-invalid="true"' in short.get_data(as_text=True)
    assert f'aria-describedby="comment-{first}-error"' in short.get_data(as_text=True)
    assert review(carlos, first, "Checked with Olivia: audit prep").status_code == 303
    again = review(carlos, first, "Second opinion")
    assert again.status_code == 409 and "already been reviewed" in again.get_data(as_text=True)

    with app.app_context():
        not_glass = db.session.scalar(
            select(AuditEvent.seq).where(AuditEvent.action == "request.submitted")
        )
    assert review(carlos, not_glass, "Not a break-glass event").status_code == 404
    assert review(carlos, 999999, "No such event at all").status_code == 404
    no_token = carlos.post(f"/compliance/break-glass/{first}/review", data={"comment": "x" * 9})
    assert no_token.status_code == 400
    with app.app_context():
        assert db.session.scalars(select(BreakGlassReview)).all()[0].comment == (
            "Checked with Olivia: audit prep"
        )
        assert (
            len(
                db.session.scalars(
                    select(AuditEvent).where(AuditEvent.action == "break_glass.reviewed")
                ).all()
            )
            == 1
        )
