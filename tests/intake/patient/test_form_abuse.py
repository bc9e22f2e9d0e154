"""Attacks on the patient forms: one request must never cost more than a form's worth of work,
and every POST counts against the client's limit, with or without a CSRF token."""

from __future__ import annotations

import pytest

from intake.patient import forms as F
from intake.patient.views import PATIENT_FORM_MAX_BYTES
from tests.conftest import hidden_fields, reference_from, valid_refill
from tests.intake.patient.test_forms import counts

HUGE_RX = "\n".join(f"{n:07d}" for n in range(40_000))  # 320,000 bytes, all distinct


@pytest.fixture(params=["sqlite"])
def backend(request):
    return request.param


def test_the_rx_parser_stops_reading_at_the_eleventh_distinct_number(monkeypatch):
    """Today's cost is 11 lines, whatever was pasted; the old parser compared 40,000 lines
    with every line before them."""
    read = 0
    real = F.rx_lines

    def counting(text):
        nonlocal read
        for line in real(text):
            read += 1
            yield line

    monkeypatch.setattr(F, "rx_lines", counting)
    with pytest.raises(F.ValidationError) as refused:
        F.clean_rx_numbers(HUGE_RX)
    assert str(refused.value) == str(F.RX_TOO_MANY)
    assert read == F.MAX_RX_NUMBERS + 1


def test_duplicates_and_blank_lines_still_collapse():
    assert F.clean_rx_numbers("1234567\n\n1234567\r\n 7654321 \n") == ["1234567", "7654321"]


@pytest.mark.parametrize("with_token", [True, False])
def test_a_40000_line_rx_field_is_refused_unread_and_counted(app, settings, client, with_token):
    app.extensions["intake.settings"] = settings.replace(submit_rate_limit="2/minute")
    before = counts(app)
    hidden = hidden_fields(client.get("/refill").get_data(as_text=True))
    if not with_token:
        hidden.pop("csrf_token")
    statuses = [
        client.post("/refill", data={**valid_refill(rx_numbers=HUGE_RX), **hidden}).status_code
        for _ in range(2)
    ]
    assert statuses == [413, 413]
    assert len(HUGE_RX) > PATIENT_FORM_MAX_BYTES
    # The two refused posts used up the client's limit: a valid form now gets 429.
    hidden = hidden_fields(client.get("/refill").get_data(as_text=True))
    assert client.post("/refill", data={**valid_refill(), **hidden}).status_code == 429
    assert counts(app) == before


def test_posts_without_a_csrf_token_count_against_the_limit(app, settings, client):
    app.extensions["intake.settings"] = settings.replace(submit_rate_limit="3/minute")
    statuses = [client.post("/contact", data={"first_name": "x"}).status_code for _ in range(5)]
    assert statuses == [400, 400, 400, 429, 429]


def test_an_oversized_field_under_the_body_limit_is_refused_before_validation(app, client):
    before = counts(app)
    hidden = hidden_fields(client.get("/refill").get_data(as_text=True))
    many = "\n".join("1234567" for _ in range(5000))  # 50 KB encoded: under the body limit
    response = client.post("/refill", data={**valid_refill(rx_numbers=many), **hidden})
    assert response.status_code == 400
    assert "This is too long." in response.get_data(as_text=True)
    assert counts(app) == before


def test_a_csrf_failed_post_is_shown_again_without_running_the_validators(app, client):
    hidden = hidden_fields(client.get("/refill").get_data(as_text=True))
    hidden.pop("csrf_token")
    response = client.post(
        "/refill", data={**valid_refill(phone="not a phone", first_name="Ana"), **hidden}
    )
    html = response.get_data(as_text=True)
    assert response.status_code == 400
    assert 'value="Ana"' in html  # what the patient typed comes back
    assert str(F.PHONE_INVALID) not in html  # but nothing was validated
    # And the page it gives back can be sent.
    fresh = hidden_fields(html)
    assert "csrf_token" in fresh
    reference_from(client.post("/refill", data={**valid_refill(), **fresh}))


def test_sixty_thousand_tiny_fields_are_refused_unparsed(app, client):
    """Many ``rx_numbers=`` parameters in one urlencoded body: the body limit refuses them
    before Werkzeug builds a 60,000-entry MultiDict."""
    before = counts(app)
    hidden = hidden_fields(client.get("/refill").get_data(as_text=True))
    body = "&".join(f"{k}={v}" for k, v in hidden.items()) + "&rx_numbers=" * 60_000
    response = client.post("/refill", data=body, content_type="application/x-www-form-urlencoded")
    assert response.status_code == 413
    assert counts(app) == before


def test_many_tiny_fields_under_the_body_limit_are_just_a_bad_form(app, client):
    """Under 64 KiB, 20,000 empty parameters are one form that fails validation: WTForms reads
    the first value of each of its fields, and the rest is never looked at."""
    before = counts(app)
    hidden = hidden_fields(client.get("/refill").get_data(as_text=True))
    body = "&".join(f"{k}={v}" for k, v in hidden.items()) + "&r=" * 20_000
    assert len(body) < PATIENT_FORM_MAX_BYTES
    response = client.post("/refill", data=body, content_type="application/x-www-form-urlencoded")
    assert response.status_code == 400
    assert counts(app) == before


def test_a_large_multipart_upload_is_refused(app, client):
    import io

    before = counts(app)
    hidden = hidden_fields(client.get("/refill").get_data(as_text=True))
    data = {**valid_refill(), **hidden, "attachment": (io.BytesIO(b"x" * (1 << 20)), "scan.pdf")}
    response = client.post("/refill", data=data, content_type="multipart/form-data")
    assert response.status_code == 413
    assert counts(app) == before
