"""The patient's status page: reference + date of birth, nothing else, in their language."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from intake.clock import utcnow
from intake.extensions import db
from intake.models import AuditEvent, Request
from intake.routing import route_request
from tests.conftest import hidden_fields, reference_from


def look_up(client, reference: str, dob: str, lang: str = "en"):
    page = client.get(f"/status?lang={lang}")
    token = hidden_fields(page.get_data(as_text=True))["csrf_token"]
    return client.post(
        "/status", data={"csrf_token": token, "reference": reference, "date_of_birth": dob}
    )


def test_the_right_pair_shows_a_coarse_status_in_the_patients_language(app, client, patient):
    reference = reference_from(patient.refill())
    answer = look_up(client, reference, "1980-03-15", "es")
    assert answer.status_code == 200
    assert "Ya tenemos su solicitud" in answer.get_data(as_text=True)
    with app.app_context():
        row = db.session.execute(select(Request).where(Request.reference == reference)).scalar_one()
        route_request(db.session, app.extensions["intake.routing"], row.id, utcnow())
        row.status = "waiting_on_patient"
        db.session.commit()
    later = look_up(client, reference.lower().replace("-", " "), "1980-03-15")
    assert "We need to hear from you" in later.get_data(as_text=True)


def test_a_wrong_birth_date_gets_the_same_answer_as_an_unknown_reference(app, client, patient):
    reference = reference_from(patient.refill())
    wrong = look_up(client, reference, "1980-03-16").get_data(as_text=True)
    unknown = look_up(client, "R-0000-0000", "1980-03-15").get_data(as_text=True)
    marker = "We could not find a request with that reference number and date of birth."
    assert marker in wrong and marker in unknown
    assert reference not in unknown
    with app.app_context():
        events = (
            db.session.execute(
                select(AuditEvent)
                .where(AuditEvent.action == "status.looked_up")
                .order_by(AuditEvent.seq)
            )
            .scalars()
            .all()
        )
    # The patient sees no difference; the trail names the real request that was guessed at.
    assert [(e.outcome, e.reference) for e in events] == [
        ("not_found", reference),
        ("not_found", None),
    ]
    assert all("1980" not in e.details for e in events)


def test_a_found_lookup_is_audited_with_its_reference(app, client, patient):
    reference = reference_from(patient.contact(date_of_birth="1975-06-01"))
    assert "We have your request" in look_up(client, reference, "1975-06-01").get_data(as_text=True)
    with app.app_context():
        event = db.session.execute(
            select(AuditEvent).where(AuditEvent.action == "status.looked_up")
        ).scalar_one()
    assert (event.outcome, event.reference, event.actor) == ("success", reference, "patient")


@pytest.mark.parametrize(("reference", "dob"), [("nonsense", "1980-03-15"), ("R-0000-0000", "")])
def test_malformed_lookups_are_refused_beside_the_field(client, reference, dob):
    answer = look_up(client, reference, dob)
    assert answer.status_code == 400
    assert 'class="field__error"' in answer.get_data(as_text=True)


def test_status_lookups_are_rate_limited(app, settings, client):
    app.extensions["intake.settings"] = settings.replace(submit_rate_limit="3/minute")
    codes = [look_up(client, "R-0000-0000", "1980-03-15").status_code for _ in range(5)]
    assert codes[:3] == [200, 200, 200] and 429 in codes[3:]


def test_guessing_birth_dates_locks_the_reference_for_an_hour(app, client, patient):
    reference = reference_from(patient.refill())
    for day in range(1, 6):
        assert "could not find" in look_up(client, reference, f"1980-01-0{day}").get_data(
            as_text=True
        )
    # Even the right date of birth gets the same answer now: guessing cannot go on.
    assert "could not find" in look_up(client, reference, "1980-03-15").get_data(as_text=True)
    with app.app_context():
        outcomes = (
            db.session.execute(
                select(AuditEvent.outcome)
                .where(AuditEvent.action == "status.looked_up", AuditEvent.reference == reference)
                .order_by(AuditEvent.seq)
            )
            .scalars()
            .all()
        )
    assert outcomes == ["not_found"] * 5 + ["throttled"]
