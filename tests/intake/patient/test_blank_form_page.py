"""The blank form page is rendered once per process and language, and filled per visitor.

What would hurt if it broke: two patients handed one submission key (the second one's request
taken for a resend of the first and never stored), one patient's CSRF token in another's page,
or a Spanish speaker served the English page.
"""

from __future__ import annotations

from sqlalchemy import func, select

from intake.extensions import db
from intake.models import Request
from intake.patient import views
from tests.conftest import Patient, hidden_fields, reference_from, valid_refill


def test_two_patients_get_their_own_token_and_key_and_both_requests_are_kept(app):
    maria, ana = Patient(app.test_client()), Patient(app.test_client())
    _page, maria_fields = maria.get_form("refill")
    _page, ana_fields = ana.get_form("refill")
    assert maria_fields["csrf_token"] != ana_fields["csrf_token"]
    assert maria_fields["rendered_at"] != ana_fields["rendered_at"]

    first = maria.client.post("/refill", data={**maria_fields, **valid_refill()})
    second = ana.client.post(
        "/refill", data={**ana_fields, **valid_refill(first_name="Ana", phone="(202) 555-0199")}
    )
    assert reference_from(first) != reference_from(second)
    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(Request)) == 2


def test_one_patients_token_does_not_work_in_anothers_session(app):
    maria, ana = Patient(app.test_client()), Patient(app.test_client())
    _page, maria_fields = maria.get_form("refill")
    ana.get_form("refill")  # Ana's session has a token of its own
    stolen = ana.client.post("/refill", data={**maria_fields, **valid_refill()})
    assert stolen.status_code == 400
    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(Request)) == 0


def test_the_page_comes_in_the_language_asked_for_and_leaves_no_slot_behind(client):
    english = client.get("/refill?lang=en").get_data(as_text=True)
    spanish = client.get("/refill?lang=es").get_data(as_text=True)
    assert '<html lang="en">' in english and '<html lang="es">' in spanish
    assert "Fecha de nacimiento" in spanish and "Date of birth" in english
    for page in (english, spanish):
        assert views.CSRF_SLOT not in page and views.STAMP_SLOT not in page
        assert set(hidden_fields(page)) == {"csrf_token", "rendered_at"}


def test_a_topic_chosen_by_a_link_is_kept_apart_from_the_plain_page(client):
    chosen = client.get("/contact?topic=copay").get_data(as_text=True)
    plain = client.get("/contact").get_data(as_text=True)
    assert 'value="copay" selected' in chosen or 'selected value="copay"' in chosen
    assert 'value="copay" selected' not in plain and 'selected value="copay"' not in plain


def test_an_unknown_topic_does_not_make_a_page_of_its_own(app, client):
    for number in range(20):
        assert client.get(f"/contact?topic=x{number}").status_code == 200
    assert len(app.extensions["intake.blank_pages"]) == 1
