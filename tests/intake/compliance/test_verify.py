"""Verifying the audit trail from the page: the result is shown and recorded after the check."""

from __future__ import annotations

import json
from html import escape
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import select

from intake.audit import chain as audit
from intake.audit import checkpoints
from intake.extensions import db
from intake.models import AuditEvent
from tests.conftest import hidden_fields


def press_verify(client):
    page = client.get("/compliance/audit")
    token = hidden_fields(page.get_data(as_text=True))["csrf_token"]
    assert 'id="verify-button"' in page.get_data(as_text=True)
    response = client.post("/compliance/verify", data={"csrf_token": token})
    assert response.status_code == 303
    return client.get(response.headers["Location"])


def last_event(app):
    with app.app_context():
        event = db.session.scalars(select(AuditEvent).order_by(AuditEvent.seq.desc())).first()
        db.session.expunge_all()
        return event


def test_an_intact_trail_is_reported_and_the_check_recorded(app, officer, officer_client):
    with app.app_context():  # the signer's checkpoint: a trail never signed is not intact
        checkpoints.write_checkpoint(db.session, app.extensions["intake.settings"], actor="x:t")
    before = last_event(app).seq
    result = press_verify(officer_client)
    html = result.get_data(as_text=True)
    assert result.status_code == 200 and "Intact." in html
    # In plain words: how many events, when last signed, what else was checked.
    assert f"The audit trail is intact: {before:,} events, last signed just now." in html
    assert "agrees with the database" in html  # the anchor
    assert "No witnesses are configured" in html
    for developer_words in ("ok True", "first bad seq", "True<", "None<", "–</td>"):
        assert developer_words not in html
    event = last_event(app)
    assert event.seq == before + 1 and event.action == "audit.verified"
    assert event.actor == f"user:{officer.user_id}"
    details = json.loads(event.details)
    assert details["ok"] is True and details["events"] == before
    assert details["first_bad_seq"] is None and details["username"] == "olivia"
    # The dashboard shows the latest result.
    assert "intact" in officer_client.get("/compliance/").get_data(as_text=True)


def test_a_changed_event_is_named(app, officer_client, backend):
    with app.app_context():
        if backend == "sqlite":
            db.session.execute(sa.text("DROP TRIGGER audit_events_no_update"))
        else:
            db.session.execute(
                sa.text("ALTER TABLE audit_events DISABLE TRIGGER audit_events_no_update_delete")
            )
        db.session.execute(sa.text("UPDATE audit_events SET outcome = 'failure' WHERE seq = 3"))
        db.session.commit()
    html = press_verify(officer_client).get_data(as_text=True)
    assert "Problem found." in html and "The first bad event is #3" in html
    assert "What to do:" in html and "do not try to repair" in html
    assert "The chain breaks at event #3." in html
    assert "intact" not in html.split('id="verify-result"')[1].split("</div>")[0]
    event = last_event(app)
    details = json.loads(event.details)
    assert details["ok"] is False and details["first_bad_seq"] == 3
    assert "changed" in details["problem"] and escape(details["problem"]) in html
    assert event.action == "audit.verified" and event.outcome == "failure"
    dashboard = officer_client.get("/compliance/").get_data(as_text=True)
    assert "PROBLEM" in dashboard


def test_verification_needs_a_csrf_token(officer_client):
    assert officer_client.post("/compliance/verify").status_code == 400
    assert (
        officer_client.get("/compliance/verify/1").status_code == 404
    )  # user.created, not a check


def test_the_page_reports_what_the_checkpoint_aware_verifier_found(
    app, officer_client, monkeypatch
):
    calls = []

    def verify_trail(session, settings, *args, **kwargs):
        calls.append(session)
        chain = audit.ChainReport(True, audit.verify_chain(session).events, checkpoints=4)
        return checkpoints.TrailReport(chain, Path("checkpoints"), 4, 3, None, ("w1.example",))

    monkeypatch.setattr(checkpoints, "verify_trail", verify_trail)
    html = press_verify(officer_client).get_data(as_text=True)
    assert calls and "Intact." in html and "cosigned by w1.example" in html
    assert "4 signed checkpoints agree with it" in html
    details = json.loads(last_event(app).details)
    assert details["checkpoints"] == 4 and details["cosigned_by"] == ["w1.example"]
    assert details["anchor_ok"] is True and details["checkpoint_lines"] == 4


def test_a_trail_never_signed_is_not_reported_intact(app, officer_client):
    html = press_verify(officer_client).get_data(as_text=True)
    assert "Intact." not in html and escape("no signed checkpoints") in html
