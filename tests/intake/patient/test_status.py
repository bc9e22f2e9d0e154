"""The patient's status page: reference + date of birth, nothing else, in their language.

A found request shows its kind (and topic), when it was received and last changed in the
pharmacy's time zone, and what to do next; only a completed request looks like success.
"""

from __future__ import annotations

import re
import uuid

import pytest
from sqlalchemy import select

from intake.clock import utcnow
from intake.extensions import db
from intake.models import AuditEvent, Request
from intake.requests.routing import route_request
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


def look_up_from(client, address: str, reference: str, dob: str, lang: str = "en"):
    """A look-up from the client at ``address``, with its own session and CSRF token."""
    environ = {"REMOTE_ADDR": address}
    page = client.get(f"/status?lang={lang}", environ_base=environ)
    token = hidden_fields(page.get_data(as_text=True))["csrf_token"]
    return client.post(
        "/status",
        data={"csrf_token": token, "reference": reference, "date_of_birth": dob},
        environ_base=environ,
    )


STRANGER, PATIENT = "198.51.100.7", "203.0.113.20"


def throttled_text(app, lang: str) -> str:
    from flask_babel import force_locale

    from intake.patient.views import STATUS_THROTTLED

    with app.test_request_context(), force_locale(lang):
        return str(STATUS_THROTTLED)


def lookup_outcomes(app, reference: str) -> list[str]:
    with app.app_context():
        return list(
            db.session.execute(
                select(AuditEvent.outcome)
                .where(AuditEvent.action == "status.looked_up", AuditEvent.reference == reference)
                .order_by(AuditEvent.seq)
            )
            .scalars()
            .all()
        )


@pytest.mark.parametrize("lang", ["en", "es"])
def test_five_wrong_birth_dates_from_one_client_do_not_lock_out_the_patient(app, patient, lang):
    """Issue 11: anyone who read a reference off a printout could enter five wrong birth dates
    and keep the patient's right one answered "not found" for an hour, with no explanation."""
    reference = reference_from(patient.refill())
    stranger, own = app.test_client(), app.test_client()
    for day in range(1, 6):
        wrong = look_up_from(stranger, STRANGER, reference, f"1980-01-0{day}", lang)
        assert wrong.status_code == 200
    # That client is stopped, and told so, with the pharmacy's phone, in its language.
    stopped = look_up_from(stranger, STRANGER, reference, "1980-03-15", lang)
    html = stopped.get_data(as_text=True).replace("&#39;", "'")
    assert stopped.status_code == 429 and int(stopped.headers["Retry-After"]) > 0
    assert throttled_text(app, lang) in html
    assert 'href="tel:+18005550142"' in html.split('id="status-throttled"')[1].split("</div>")[0]
    assert 'data-status="' not in html
    # The patient, from their own phone, still gets their answer.
    found = look_up_from(own, PATIENT, reference, "1980-03-15", lang)
    assert found.status_code == 200 and 'data-status="received"' in found.get_data(as_text=True)
    assert lookup_outcomes(app, reference) == ["not_found"] * 5 + ["throttled", "success"]


def without_token(html: str) -> str:
    import re

    return re.sub(r'name="csrf_token" type="hidden" value="[^"]*"', "", html)


def test_being_stopped_says_nothing_about_whether_a_reference_exists(app, patient):
    """Unknown references are counted like real ones, so "too many tries" is no oracle."""
    real = reference_from(patient.refill())
    answers = {}
    for reference in (real, "R-0000-0000"):
        client = app.test_client()
        pages = [
            look_up_from(client, STRANGER, reference, f"1980-01-0{day}") for day in range(1, 8)
        ]
        answers[reference] = [
            (p.status_code, without_token(p.get_data(as_text=True).replace(reference, "REF")))
            for p in pages
        ]
    assert [code for code, _ in answers[real]] == [200] * 5 + [429, 429]
    assert answers[real] == answers["R-0000-0000"]


def test_many_clients_together_hit_the_per_reference_ceiling_then_it_clears(app, patient):
    from intake.requests.status_lookup import FAILURES_PER_CLIENT, FAILURES_PER_REFERENCE
    from tests.intake.staff.conftest import install_clock

    clock = install_clock(app)
    reference = reference_from(patient.refill())
    clients = FAILURES_PER_REFERENCE // FAILURES_PER_CLIENT
    for n in range(clients):
        client = app.test_client()
        for day in range(1, FAILURES_PER_CLIENT + 1):
            address = f"192.0.2.{10 + n}"
            assert look_up_from(client, address, reference, f"1981-01-0{day}").status_code == 200
    # Guessing from yet more addresses is stopped for everyone, the patient included (who is
    # told to call); an hour later the patient gets in.
    late = look_up_from(app.test_client(), PATIENT, reference, "1980-03-15", "es")
    assert late.status_code == 429 and throttled_text(app, "es") in late.get_data(as_text=True)
    clock.advance(hours=1, seconds=1)
    again = look_up_from(app.test_client(), PATIENT, reference, "1980-03-15")
    assert again.status_code == 200 and 'data-status="received"' in again.get_data(as_text=True)


def test_one_ipv6_customer_is_one_client_for_the_look_up_throttle(app, patient):
    reference = reference_from(patient.refill())
    client = app.test_client()
    for n in range(1, 6):
        look_up_from(client, f"2001:db8:1:2::{n}", reference, f"1980-01-0{n}")
    assert look_up_from(client, "2001:db8:1:2::99", reference, "1980-03-15").status_code == 429


# -- what the answer tells the patient ----------------------------------------------------------


def answer_of(html: str) -> dict[str, str]:
    """The answer panel's pieces, as text (tags dropped, spaces folded)."""
    import html as html_lib
    import re

    panel = re.search(
        r'<section class="([^"]*)"[^>]*data-status="([^"]+)"(.*?)</section>', html, re.S
    )
    assert panel, "no status answer on the page"
    inside = panel.group(3)

    def text(pattern: str) -> str:
        found = re.search(pattern, inside, re.S)
        if not found:
            return ""
        plain = html_lib.unescape(re.sub(r"<[^>]+>", "", found.group(1)))
        return " ".join(plain.replace("\u202f", " ").split())

    return {
        "class": panel.group(1),
        "status": panel.group(2),
        "headline": text(r'<h2 id="status-headline">(.*?)</h2>'),
        "kind": text(r'<dd id="status-kind">(.*?)</dd>'),
        "received": text(r'<time id="status-received"[^>]*>(.*?)</time>'),
        "received_at": text(r'id="status-received" datetime="([^"]+)"'),
        "changed": text(r'<time id="status-changed"[^>]*>(.*?)</time>'),
        "changed_at": text(r'id="status-changed" datetime="([^"]+)"'),
        "next": text(r'<p id="status-next">(.*?)</p>'),
        "call": text(r'<p class="call-us">(.*?)</p>'),
        "tel": text(r'href="(tel:[^"]+)"'),
    }


def received_at(app, reference: str, moment) -> None:
    with app.app_context():
        row = db.session.execute(select(Request).where(Request.reference == reference)).scalar_one()
        row.created_at = moment
        db.session.commit()


def change_status(app, reference: str, *statuses: str) -> None:
    """Move the request through ``statuses`` as a supervisor would, audited."""
    from intake.clock import now
    from intake.requests import casework
    from tests.intake.staff.conftest import create_staff_user, create_teams

    create_teams(app)
    boss = create_staff_user(app, f"boss{uuid.uuid4().hex[:8]}", "supervisor")
    actor = casework.Actor(boss.id, boss.username, "supervisor", ())
    with app.app_context():
        row = db.session.execute(select(Request).where(Request.reference == reference)).scalar_one()
        if row.status == "received":
            route_request(db.session, app.extensions["intake.routing"], row.id, utcnow())
        for status in statuses:
            casework.change_status(db.session, reference, actor, status, now())


def test_a_contact_request_can_be_looked_up_as_the_thanks_page_says(client, patient):
    sent = patient.contact(topic="copay", date_of_birth="1975-06-01")
    thanks = client.get(sent.headers["Location"]).get_data(as_text=True)
    assert "date of birth" in thanks  # what the thanks page tells the patient to bring
    answer = answer_of(look_up(client, reference_from(sent), "1975-06-01").get_data(as_text=True))
    assert answer["kind"] == (
        "Request to contact you: Help paying for my medication (copay assistance)"
    )


def test_a_contact_request_without_a_date_of_birth_is_refused(app, patient):
    response = patient.contact(date_of_birth="")
    assert response.status_code == 400
    assert 'id="date_of_birth-error"' in response.get_data(as_text=True)
    with app.app_context():
        assert db.session.execute(select(Request)).first() is None


EXPECTED = {
    "en": {
        "kind": "Prescription refill",
        "received": "November 29, 2026, 9:30 PM CST",
        "headline": "A member of our pharmacy team is working on your request.",
        "next": "You do not need to do anything now. We will contact you the way you chose.",
    },
    "es": {
        "kind": "Resurtido de receta",
        "received": "29 de noviembre de 2026, 21:30 CST",
        "headline": "Un miembro del equipo de la farmacia está atendiendo su solicitud.",
        "next": "Por ahora no necesita hacer nada. Nos comunicaremos con usted de la forma que"
        " eligió.",
    },
}


@pytest.mark.parametrize("lang", ["en", "es"])
def test_the_answer_shows_kind_dates_and_next_step_in_the_pharmacys_time(
    app, client, patient, lang
):
    from datetime import UTC, datetime

    app.extensions["intake.timezone"] = "America/Chicago"
    reference = reference_from(patient.refill())
    # 03:30 UTC on the 30th is still the evening of the 29th in Chicago.
    received_at(app, reference, datetime(2026, 11, 30, 3, 30, tzinfo=UTC))
    change_status(app, reference, "in_progress")
    with app.app_context():
        changed = db.session.execute(
            select(AuditEvent.created_at).where(AuditEvent.action == "request.status_changed")
        ).scalar_one()

    answer = answer_of(look_up(client, reference, "1980-03-15", lang).get_data(as_text=True))
    assert {k: answer[k] for k in EXPECTED[lang]} == EXPECTED[lang]
    assert answer["received_at"] == "2026-11-30T03:30:00+00:00"
    assert answer["changed_at"] == changed.isoformat()
    assert answer["changed"].endswith(" CST") and answer["changed"] != answer["received"]
    assert "panel--success" not in answer["class"]


def test_waiting_on_the_patient_asks_for_a_call_and_is_not_styled_as_success(app, client, patient):
    # The phone of the pharmacy's configuration (config/pharmacy.toml).
    reference = reference_from(patient.refill())
    change_status(app, reference, "in_progress", "waiting_on_patient")

    answer = answer_of(look_up(client, reference, "1980-03-15").get_data(as_text=True))
    assert answer["status"] == "waiting_on_patient"
    assert "panel--warning" in answer["class"] and "panel--success" not in answer["class"]
    assert answer["headline"] == "We need to hear from you. Please call the pharmacy."
    assert answer["next"] == (
        "Please call us as soon as you can, and have your reference number ready."
    )
    assert answer["call"] == "Call us: (800) 555-0142"
    assert answer["tel"] == "tel:+18005550142"

    spanish = answer_of(look_up(client, reference, "1980-03-15", "es").get_data(as_text=True))
    assert spanish["call"] == "Llámenos: (800) 555-0142"
    assert spanish["next"].startswith("Por favor, llámenos lo antes posible")


def test_only_a_completed_request_looks_like_success(app, client, patient):
    reference = reference_from(patient.refill())
    received = answer_of(look_up(client, reference, "1980-03-15").get_data(as_text=True))
    assert received["status"] == "received" and "panel--success" not in received["class"]
    assert received["call"] == ""  # nothing to call about
    change_status(app, reference, "in_progress", "completed")
    done = answer_of(look_up(client, reference, "1980-03-15").get_data(as_text=True))
    assert done["status"] == "completed" and "panel--success" in done["class"]


@pytest.mark.parametrize("lang", ["en", "es"])
def test_an_empty_status_form_says_what_to_enter_in_the_pages_language(client, lang):
    from flask_babel import force_locale

    from intake.patient import forms as F

    page = client.get(f"/status?lang={lang}")
    token = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', page.get_data(as_text=True))
    response = client.post("/status", data={"csrf_token": token.group(1)})
    html = response.get_data(as_text=True).replace("&#39;", "'")
    assert response.status_code == 400
    with client.application.test_request_context(), force_locale(lang):
        expected = [str(F.REFERENCE_INVALID), str(F.DOB_NEEDED)]
        generic = str(F.REQUIRED)
    for message in expected:
        assert message in html
    assert generic not in html
