"""'I need an interpreter' on both patient forms: labelled in the page's language, languages
listed in their own names, checked like every field, stored as a plain code beside (not in)
the sealed document."""

from __future__ import annotations

import json
import re

import pytest
from flask_babel import force_locale
from sqlalchemy import select

from intake.crypto import phi
from intake.extensions import db
from intake.models import AuditEvent, Request
from intake.patient import forms as F
from tests.conftest import reference_from

KINDS = ["refill", "contact"]


@pytest.fixture(params=["sqlite"])
def backend(request):
    """The form does not depend on the database: SQLite only (routing tests run both)."""
    return request.param


def spanish(app, message) -> str:
    with app.test_request_context(), force_locale("es"):
        return str(message)


def label_for(html: str, field: str) -> str:
    match = re.search(rf'<label[^>]*for="{field}"[^>]*>(.*?)</label>', html, re.S)
    assert match, f"no label for {field}"
    return re.sub(r"<[^>]+>", "", match.group(1)).strip()


def options_of(html: str, field: str) -> list[tuple[str, str]]:
    select_html = re.search(rf'<select[^>]*id="{field}"[^>]*>(.*?)</select>', html, re.S)
    assert select_html, f"no select {field}"
    return re.findall(r'<option[^>]*value="([^"]*)"[^>]*>([^<]*)</option>', select_html.group(1))


def stored(app, reference: str) -> Request:
    with app.app_context():
        row = db.session.execute(select(Request).where(Request.reference == reference)).scalar_one()
        db.session.expunge(row)
        return row


@pytest.mark.parametrize("kind", KINDS)
def test_the_field_is_labelled_in_the_pages_language(app, client, kind):
    english = client.get(f"/{kind}?lang=en").get_data(as_text=True)
    spanish_page = client.get(f"/{kind}?lang=es").get_data(as_text=True)

    assert label_for(english, "interpreter") == "I need an interpreter"
    assert label_for(english, "interpreter_language") == "Language I need"
    assert label_for(spanish_page, "interpreter") == "Necesito un intérprete"
    assert label_for(spanish_page, "interpreter_language") == "Idioma que necesito"
    # The checkbox's hint is tied to it for screen readers.
    assert re.search(r'id="interpreter"[^>]*aria-describedby="interpreter-hint"', english) or (
        re.search(r'aria-describedby="interpreter-hint"[^>]*id="interpreter"', english)
    )
    assert 'id="interpreter-hint"' in english


@pytest.mark.parametrize("kind", KINDS)
def test_languages_are_listed_in_their_own_names_then_the_pages(app, client, kind):
    english = options_of(
        client.get(f"/{kind}?lang=en").get_data(as_text=True), "interpreter_language"
    )
    spanish_page = options_of(
        client.get(f"/{kind}?lang=es").get_data(as_text=True), "interpreter_language"
    )

    table = app.extensions["intake.routing"]
    assert [code for code, _label in english] == ["", *table.languages]
    assert ("vi", "Tiếng Việt (Vietnamese)") in english
    assert ("vi", "Tiếng Việt (vietnamita)") in spanish_page
    assert ("es", "Español (Spanish)") in english and ("es", "Español") in spanish_page
    assert ("tl", "Tagalog") in english
    assert spanish_page[0] == ("", "Elija un idioma")


@pytest.mark.parametrize("kind", KINDS)
def test_ticking_the_box_without_a_language_asks_for_one(app, patient, kind):
    response = getattr(patient, kind)(lang="es", interpreter="y", interpreter_language="")
    html = response.get_data(as_text=True)

    assert response.status_code == 400
    message = spanish(app, F.INTERPRETER_LANGUAGE_NEEDED)
    assert 'id="interpreter_language-error"><span class="visually-hidden">' in html
    assert message in html
    assert re.search(r'<select[^>]*id="interpreter_language"[^>]*autofocus', html) or re.search(
        r'<select[^>]*autofocus[^>]*id="interpreter_language"', html
    )


@pytest.mark.parametrize("kind", KINDS)
def test_a_language_not_on_the_list_is_refused(app, patient, kind):
    response = getattr(patient, kind)(lang="en", interpreter="y", interpreter_language="xx")

    assert response.status_code == 400
    assert str(F.CHOICE_INVALID) in response.get_data(as_text=True)


@pytest.mark.parametrize("kind", KINDS)
def test_the_language_is_a_plain_column_not_part_of_the_sealed_document(app, patient, kind):
    reference = reference_from(
        getattr(patient, kind)(lang="en", interpreter="y", interpreter_language="vi")
    )

    row = stored(app, reference)
    assert (row.language, row.interpreter_language) == ("en", "vi")
    keyring = app.extensions["intake.keyring"]
    data_key = phi.unwrap_data_key(keyring, row.id, phi.WrappedKey(row.kek_id, row.wrapped_key))
    document = phi.open_sealed(data_key, row.id, phi.PHI_PURPOSE, row.phi)
    assert not {"interpreter", "interpreter_language"} & set(document)
    with app.app_context():
        details = json.loads(
            db.session.execute(
                select(AuditEvent.details).where(
                    AuditEvent.reference == reference, AuditEvent.action == "request.submitted"
                )
            ).scalar_one()
        )
    assert details["interpreter_language"] == "vi"


def test_choosing_a_language_asks_for_an_interpreter_even_unticked(app, patient):
    reference = reference_from(patient.contact(lang="en", interpreter_language="ko"))

    assert stored(app, reference).interpreter_language == "ko"


def test_no_interpreter_by_default(app, patient):
    reference = reference_from(patient.refill(lang="es"))

    row = stored(app, reference)
    assert (row.language, row.interpreter_language) == ("es", None)
