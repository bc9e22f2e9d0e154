"""The patient forms: each field's good and bad values, in both languages, and abuse guards."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import date, timedelta

import pytest
from flask_babel import force_locale
from sqlalchemy import func, select

from intake.extensions import db
from intake.models import AuditEvent, ConsentAcceptance, OutboxMessage, Request
from intake.patient import forms as F
from tests.conftest import hidden_fields, reference_from, valid_refill


@pytest.fixture(params=["sqlite"])
def backend(request):
    """Validation does not depend on the database: run these on SQLite only."""
    return request.param


def counts(app) -> tuple[int, int, int, int]:
    with app.app_context():
        return tuple(  # type: ignore[return-value]
            db.session.scalar(select(func.count()).select_from(model))
            for model in (Request, ConsentAcceptance, OutboxMessage, AuditEvent)
        )


@pytest.fixture
def in_language(app):
    """Render a lazy message as the app would in ``language``."""

    def render(message, language: str) -> str:
        with app.test_request_context(), force_locale(language):
            return str(message)

    return render


def error_beside(html: str, field: str) -> str:
    match = re.search(rf'<p class="field__error" id="{field}-error">(.*?)</p>', html, re.S)
    assert match, f"no error shown beside {field}"
    text = re.sub(r'<span class="visually-hidden">.*?</span>', "", match.group(1))
    return re.sub(r"<[^>]+>", "", text).replace("&#39;", "'").strip()




def days_from_today(days: int) -> Callable[[], str]:
    """A date relative to the day the test runs, not the day it was collected: a run that
    crosses midnight must not turn "today" into "yesterday"."""
    return lambda: (date.today() + timedelta(days=days)).isoformat()


REFILL_BAD = [
    ("first_name", "", F.FIRST_NAME_NEEDED),
    ("first_name", "R2-D2", F.NAME_INVALID),
    ("first_name", "<script>", F.NAME_INVALID),
    ("first_name", "A" * 61, F.NAME_TOO_LONG),
    ("last_name", "   ", F.LAST_NAME_NEEDED),
    ("last_name", "---", F.NAME_INVALID),
    ("date_of_birth", "", F.DOB_NEEDED),
    ("date_of_birth", "15/03/1980", F.DATE_INVALID),
    ("date_of_birth", "1980-02-30", F.DATE_INVALID),
    ("date_of_birth", days_from_today(1), F.DOB_FUTURE),
    ("date_of_birth", days_from_today(0), F.DOB_FUTURE),
    ("date_of_birth", "1890-01-01", F.DOB_TOO_OLD),
    ("phone", "", F.PHONE_NEEDED),
    ("phone", "12345", F.PHONE_INVALID),
    ("phone", "call me maybe", F.PHONE_INVALID),
    ("phone", "(202) 555-01", F.PHONE_INVALID),
    ("email", "not-an-email", F.EMAIL_INVALID),
    ("email", "a@b", F.EMAIL_INVALID),
    ("rx_numbers", "", F.RX_NONE),
    ("rx_numbers", "12345", F.RX_INVALID),
    ("rx_numbers", "1234567890123", F.RX_INVALID),
    ("rx_numbers", "12AB567", F.RX_INVALID),
    ("rx_numbers", "\n".join(str(1000000 + i) for i in range(11)), F.RX_TOO_MANY),
    ("medication", "x" * 101, F.TOO_LONG),
    ("location", "", F.LOCATION_NEEDED),
    ("location", "atlantis", F.CHOICE_INVALID),
    ("fulfillment", "teleport", F.CHOICE_INVALID),
    ("contact_method", "pigeon", F.CHOICE_INVALID),
    ("needed_by", days_from_today(-1), F.NEEDED_BY_PAST),
    ("needed_by", days_from_today(400), F.NEEDED_BY_FAR),
    ("needed_by", "soon", F.DATE_INVALID),
    ("notes", "x" * 2001, F.TOO_LONG),
    ("consent_privacy", None, F.CONSENT_PRIVACY_NEEDED),
    ("consent_contact", None, F.CONSENT_CONTACT_NEEDED),
]


@pytest.mark.parametrize("language", ["en", "es"])
@pytest.mark.parametrize(("field", "value", "message"), REFILL_BAD)
def test_refill_bad_value_is_refused_beside_its_field(
    app, patient, in_language, language, field, value, message
):
    before = counts(app)
    if callable(value):
        value = value()
    response = patient.refill(lang=language, **{field: value})
    html = response.get_data(as_text=True)
    assert response.status_code == 400
    assert error_beside(html, field) == in_language(message, language)
    assert f'<html lang="{language}">' in html
    assert counts(app) == before, "an invalid form must write nothing"


@pytest.mark.parametrize("language", ["en", "es"])
@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"fulfillment": "delivery", "address": ""}, "address", F.ADDRESS_NEEDED),
        ({"fulfillment": "ship", "address": "  "}, "address", F.ADDRESS_NEEDED),
        ({"contact_method": "email", "email": ""}, "email", F.EMAIL_NEEDED),
    ],
)
def test_refill_fields_required_by_other_answers(
    app, patient, in_language, language, fields, field, message
):
    response = patient.refill(lang=language, **fields)
    assert response.status_code == 400
    assert error_beside(response.get_data(as_text=True), field) == in_language(message, language)


CONTACT_BAD = [
    ("date_of_birth", "", F.DOB_NEEDED),
    ("topic", "", F.TOPIC_NEEDED),
    ("topic", "lottery", F.CHOICE_INVALID),
    ("message", "", F.MESSAGE_NEEDED),
    ("message", "x" * 4001, F.TOO_LONG),
    ("callback_time", "x" * 101, F.TOO_LONG),
    ("date_of_birth", "3000-01-01", F.DOB_FUTURE),
    ("phone", "555", F.PHONE_INVALID),
    ("consent_privacy", None, F.CONSENT_PRIVACY_NEEDED),
]


@pytest.mark.parametrize("language", ["en", "es"])
@pytest.mark.parametrize(("field", "value", "message"), CONTACT_BAD)
def test_contact_bad_value_is_refused_beside_its_field(
    app, patient, in_language, language, field, value, message
):
    before = counts(app)
    response = patient.contact(lang=language, **{field: value})
    assert response.status_code == 400
    assert error_beside(response.get_data(as_text=True), field) == in_language(message, language)
    assert counts(app) == before


def test_spanish_messages_are_translated(in_language):
    for message in (
        F.FIRST_NAME_NEEDED,
        F.PHONE_INVALID,
        F.RX_INVALID,
        F.CONSENT_PRIVACY_NEEDED,
        F.DOB_FUTURE,
    ):
        assert in_language(message, "es") != in_language(message, "en")


def test_invalid_form_keeps_valid_values_and_focuses_first_error(patient):
    response = patient.refill(phone="123", medication="Gamunex")
    html = response.get_data(as_text=True)
    assert 'value="Maria"' in html and 'value="Gamunex"' in html
    focused = re.findall(r"<(?:input|select|textarea)[^>]*autofocus[^>]*>", html)
    assert len(focused) == 1 and 'id="phone"' in focused[0]
    assert 'aria-invalid="true"' in focused[0] and "phone-error" in focused[0]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("first_name", "José María"),
        ("first_name", "Zoë"),
        ("last_name", "D'Angelo-Smith Jr."),
        ("phone", "+1 202 555 0143"),
        ("phone", "202.555.0143"),
        ("email", ""),
        ("rx_numbers", "123456\n\n  7654-321  \n123456"),
        ("rx_numbers", "\n".join(str(1000000 + i) for i in range(10))),
        ("fulfillment", "ship"),
        ("needed_by", days_from_today(7)()),
        ("date_of_birth", "1935-12-31"),
    ],
)
def test_refill_good_values_are_accepted(app, patient, field, value):
    extra = {"address": "12 Elm St, Springfield"} if field == "fulfillment" else {}
    reference = reference_from(patient.refill(**{field: value}, **extra))
    assert reference.startswith("R-")


def test_values_are_normalized_before_sealing(app, patient):
    from intake.crypto.phi import SealedPHI, WrappedKey, open_phi

    reference = reference_from(
        patient.refill(
            phone="(202) 555-0143",
            email=" Maria@Example.COM ",
            rx_numbers="123456\n123456\n 7654-321 ",
            first_name="  Maria   Luisa ",
        )
    )
    with app.app_context():
        row = db.session.execute(select(Request).where(Request.reference == reference)).scalar_one()
        document = open_phi(
            app.extensions["intake.keyring"],
            row.id,
            SealedPHI(WrappedKey(row.kek_id, row.wrapped_key), row.phi),
        )
    assert document["phone"] == "+12025550143"
    assert document["email"] == "Maria@example.com"
    assert document["rx_numbers"] == ["123456", "7654-321"]
    assert document["first_name"] == "Maria Luisa"


@pytest.mark.parametrize(
    "topic", ["question", "copay", "specialist", "insurance", "transfer", "side_effect"]
)
def test_contact_every_topic_is_accepted(app, patient, topic):
    reference = reference_from(patient.contact(topic=topic))
    assert reference.startswith("C-")
    with app.app_context():
        row = db.session.execute(select(Request).where(Request.reference == reference)).scalar_one()
        assert (row.kind, row.topic, row.status) == ("contact", topic, "received")


# -- abuse guards -------------------------------------------------------------------------------


def test_missing_or_wrong_csrf_token_is_refused_and_writes_nothing(app, client):
    before = counts(app)
    hidden = hidden_fields(client.get("/refill").get_data(as_text=True))
    no_token = client.post("/refill", data={**valid_refill(), "rendered_at": hidden["rendered_at"]})
    assert no_token.status_code == 400
    wrong = client.post("/refill", data={**valid_refill(), **hidden, "csrf_token": "forged"})
    assert wrong.status_code == 400
    plain = client.post("/status", data={"reference": "R-0000-0000", "date_of_birth": "1980-01-01"})
    assert plain.status_code == 400
    assert counts(app) == before


def test_expired_form_comes_back_with_its_values(app, client, in_language):
    app.config["WTF_CSRF_TIME_LIMIT"] = 1
    hidden = hidden_fields(client.get("/refill?lang=es").get_data(as_text=True))
    import time

    time.sleep(2.1)
    response = client.post("/refill", data={**valid_refill(), **hidden})
    html = response.get_data(as_text=True)
    assert response.status_code == 400
    assert 'value="Maria"' in html
    from intake.patient.views import FORM_STALE

    assert in_language(FORM_STALE, "es").split(",")[0] in html.replace("&#39;", "'")


def test_honeypot_gets_a_thanks_page_but_nothing_is_stored(app, patient, caplog):
    before = counts(app)
    response = patient.refill(extra_comments="http://spam.example")
    assert response.status_code == 200
    assert re.search(r'id="reference">R-[0-9A-Z]{4}-[0-9A-Z]{4}<', response.get_data(as_text=True))
    assert counts(app) == before
    assert any(
        "submission_decision" in r.getMessage() and "honeypot" in r.getMessage()
        for r in caplog.records
    )


def test_a_form_without_its_render_stamp_is_sent_back_not_stored(app, client):
    before = counts(app)
    hidden = hidden_fields(client.get("/refill").get_data(as_text=True))
    response = client.post(
        "/refill",
        data={**valid_refill(), "csrf_token": hidden["csrf_token"], "rendered_at": "tampered"},
    )
    assert response.status_code == 400
    assert counts(app) == before


def test_a_body_over_one_mebibyte_gets_413(app, patient):
    before = counts(app)
    response = patient.refill(notes="x" * (1024 * 1024 + 10))
    assert response.status_code == 413
    assert counts(app) == before


def test_submissions_are_rate_limited_per_client(app, settings, patient):
    app.extensions["intake.settings"] = settings.replace(submit_rate_limit="2/minute")
    assert patient.refill().status_code == 303
    statuses = [patient.refill().status_code for _ in range(3)]
    assert 429 in statuses


@pytest.mark.parametrize(
    "payload",
    [
        {"first_name": "\x00\x01"},
        {"date_of_birth": "9999-99-99"},
        {"rx_numbers": "\u202e" * 50},
        {"location": ["main", "north"]},
        {"phone": "+" + "9" * 500},
        {"email": "a@" + "b" * 300 + ".com"},
        {"contact_method": ""},
        {"fulfillment": ""},
    ],
)
def test_hostile_input_never_causes_a_500(app, patient, payload):
    response = patient.refill(**payload)
    # Either refused beside a field, or (a repeated select value) read as its first value.
    assert response.status_code in (303, 400)
    if response.status_code == 400:
        assert 'class="field__error"' in response.get_data(as_text=True)


def test_control_characters_a_patient_pasted_are_dropped_not_stored(app, patient):
    from intake.crypto.phi import SealedPHI, WrappedKey, open_phi

    reference = reference_from(
        patient.refill(first_name="Ma\x00ria", notes="line one\r\nline\x1b two\ttabbed")
    )
    with app.app_context():
        row = db.session.execute(select(Request).where(Request.reference == reference)).scalar_one()
        document = open_phi(
            app.extensions["intake.keyring"],
            row.id,
            SealedPHI(WrappedKey(row.kek_id, row.wrapped_key), row.phi),
        )
    assert document["first_name"] == "Maria"
    assert document["notes"] == "line one\nline two\ttabbed"
