"""The staff request page's words for coded values, times and phone numbers."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from flask_babel import force_locale

from intake.requests import labels


@pytest.fixture(params=["sqlite"])
def backend(request):
    return request.param


@pytest.fixture
def page(app):
    """A request context of the app, as a page renders in (the sample pharmacy: Chicago)."""
    with app.test_request_context():
        yield app


@pytest.mark.parametrize(
    ("label", "code", "english", "spanish"),
    [
        (labels.kind_label, "refill", "Refill", "Resurtido"),
        (
            labels.status_label,
            "waiting_on_prescriber",
            "Waiting on prescriber",
            "Esperando al médico",
        ),
        (labels.status_label, "in_progress", "In progress", "En curso"),
        (labels.priority_label, "urgent", "Urgent", "Urgente"),
        (labels.topic_label, "copay", "Copay assistance", "Ayuda con el copago"),
        (labels.topic_label, "side_effect", "Side-effect report", "Reporte de efecto secundario"),
        (labels.fulfillment_label, "pickup", "Pickup at the pharmacy", "Recoger en la farmacia"),
        (labels.contact_method_label, "sms", "Text message", "Mensaje de texto"),
        (labels.form_language_label, "es", "Spanish", "Español"),
        (
            labels.consent_label,
            "npp",
            "Notice of Privacy Practices",
            "Aviso de Prácticas de Privacidad",
        ),
    ],
)
def test_each_code_reads_as_words_in_the_pages_language(page, label, code, english, spanish):
    with force_locale("en"):
        assert label(code) == english
    with force_locale("es"):
        assert label(code) == spanish


def test_an_unknown_code_is_shown_as_it_is_and_a_missing_one_as_a_dash(page):
    assert labels.status_label("on_hold") == "on_hold"
    assert labels.topic_label(None) == "–"


def test_locations_languages_and_teams_come_from_the_routing_file(page):
    table = page.extensions["intake.routing"]
    with force_locale("en"):
        assert labels.location_label(table, "infusion") == "Infusion Center"
        assert labels.language_label(table, "vi") == "Vietnamese"
    with force_locale("es"):
        assert labels.location_label(table, "infusion") == "Centro de Infusión"
        assert labels.language_label(table, "vi") == "vietnamita"
    teams = {t.id: t.name for t in table.teams.values()}
    assert labels.team_label(teams, "ivig") == "IVIG clinical team"
    assert labels.team_label(teams, "gone-team") == "gone-team"


def test_a_time_is_local_to_the_pharmacy_with_utc_for_the_hover(page):
    # 02:30 UTC on December 2 is still December 1 in Chicago (CST, UTC-6).
    shown = labels.moment(datetime(2026, 12, 2, 2, 30, tzinfo=UTC))
    assert shown.iso == "2026-12-02T02:30:00+00:00"
    assert shown.utc == "2026-12-02 02:30 UTC"
    assert shown.local.replace("\u202f", " ") == "Dec 1, 2026, 8:30 PM CST"
    summer = labels.moment(datetime(2026, 7, 1, 17, 0, tzinfo=UTC))
    assert summer.local.replace("\u202f", " ") == "Jul 1, 2026, 12:00 PM CDT"


def test_the_time_zone_override_moves_every_time(make_app, settings):
    app = make_app(settings.replace(timezone="America/New_York"))
    with app.test_request_context(), force_locale("en"):
        shown = labels.moment(datetime(2026, 12, 2, 2, 30, tzinfo=UTC))
    assert shown.local.replace("\u202f", " ") == "Dec 1, 2026, 9:30 PM EST"


def test_a_date_of_birth_is_a_calendar_day_in_the_pages_language(page):
    with force_locale("en"):
        assert labels.calendar_day("1980-03-15") == "March 15, 1980"
    with force_locale("es"):
        assert labels.calendar_day("1980-03-15") == "15 de marzo de 1980"
    assert labels.calendar_day("not a date") == "not a date"


@pytest.mark.parametrize(
    ("stored", "display", "href"),
    [
        ("+12025550105", "(202) 555-0105", "tel:+12025550105"),
        ("+525512345678", "+52 55 1234 5678", "tel:+525512345678"),
        ("", "–", None),
        ("call the clinic", "call the clinic", None),
    ],
)
def test_a_phone_number_reads_as_people_dial_it(stored, display, href):
    phone = labels.phone_for_people(stored)
    assert (phone.display, phone.href) == (display, href)
