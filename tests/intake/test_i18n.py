"""Patient pages are complete in English and Spanish, and the language choice sticks."""

from __future__ import annotations

from pathlib import Path

import pytest
from babel.messages.pofile import read_po

CATALOG = (
    Path(__file__).parents[2] / "intake" / "translations" / "es" / "LC_MESSAGES" / "messages.po"
)


def test_spanish_catalog_is_complete_and_current():
    with CATALOG.open("rb") as po, CATALOG.parents[2].joinpath("messages.pot").open("rb") as pot:
        catalog, template = read_po(po), read_po(pot)
    missing = [m.id for m in catalog if m.id and (not m.string or m.fuzzy)]
    assert missing == [], "untranslated or fuzzy entries"
    stale = sorted({m.id for m in template if m.id} - {m.id for m in catalog if m.id})
    assert stale == [], "run scripts/update-translations"


@pytest.fixture(params=["sqlite"])
def backend(request):
    return request.param


@pytest.mark.parametrize("path", ["/", "/refill", "/contact", "/status", "/nowhere"])
def test_lang_parameter_gives_spanish_and_is_remembered(client, path):
    first = client.get(f"{path}?lang=es")
    assert '<html lang="es">' in first.get_data(as_text=True)
    assert "intake_lang=es" in first.headers.get("Set-Cookie", "")
    again = client.get(path)
    assert '<html lang="es">' in again.get_data(as_text=True)
    back = client.get(f"{path}?lang=en")
    assert '<html lang="en">' in back.get_data(as_text=True)


def test_accept_language_decides_without_a_choice(client):
    spanish = client.get("/refill", headers={"Accept-Language": "es-MX,es;q=0.9,en;q=0.5"})
    html = spanish.get_data(as_text=True)
    assert '<html lang="es">' in html and "resurtido" in html
    english = client.get("/refill", headers={"Accept-Language": "fr-FR,en;q=0.5"})
    assert '<html lang="en">' in english.get_data(as_text=True)


def test_every_page_offers_the_other_language(client):
    english = client.get("/").get_data(as_text=True)
    assert 'href="?lang=es"' in english and ">Español<" in english
    spanish = client.get("/?lang=es").get_data(as_text=True)
    assert 'href="?lang=en"' in spanish and ">English<" in spanish


def test_spanish_refill_page_has_no_english_left(client):
    html = client.get("/refill?lang=es").get_data(as_text=True)
    for english in (
        "First name",
        "Date of birth",
        "Prescription numbers",
        "Send refill request",
        "Pick up at the pharmacy",
        "Notice of Privacy Practices",
    ):
        assert english not in html, english
