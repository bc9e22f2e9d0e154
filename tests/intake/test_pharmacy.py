"""The pharmacy file and the consents folder are checked at start-up; a mistake stops the app
with a message naming the file (and line), and times are shown in the pharmacy's time zone."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest
from flask_babel import force_locale

from config.settings import DEFAULT_CONSENTS_DIR, DEFAULT_PHARMACY_FILE
from intake import create_app
from intake.pharmacy import PharmacyError, local_datetime, parse_pharmacy
from intake.requests.consents import ConsentError


@pytest.fixture(params=["sqlite"])
def backend(request):
    return request.param


SAMPLE = DEFAULT_PHARMACY_FILE.read_text(encoding="utf-8")


def write_pharmacy(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pharmacy.toml"
    path.write_text(text, encoding="utf-8")
    return path


def line_of(text: str, needle: str) -> int:
    return next(n for n, line in enumerate(text.splitlines(), start=1) if needle in line)


NO_PHONE_IN_NOTICE = (
    'Call {phone} (TTY: {tty})."\n\n[[language_assistance]]\nlanguage = "es"',
    'Call us."\n\n[[language_assistance]]\nlanguage = "es"',
)
BROKEN = {
    "phone": (
        ('phone = "1-800-555-0142"', 'phone = "call us"'),
        "'phone' 'call us' is not a valid phone number",
    ),
    "timezone": (
        ('timezone = "America/Chicago"', 'timezone = "Mars/Olympus"'),
        "'timezone' 'Mars/Olympus' is not a known time zone",
    ),
    "tty": (('tty = "711"', 'tty = "12"'), "'tty' '12' is not a valid phone number"),
    # Every "call the pharmacy" link would dial the emergency number.
    "phone-911": (
        ('phone = "1-800-555-0142"', 'phone = "911"'),
        "'phone' '911' is not a valid phone number",
    ),
    "tty-911": (('tty = "711"', 'tty = "911"'), "'tty' '911' is not a valid phone number"),
    "phone-markup": (
        ('phone = "1-800-555-0142"', 'phone = "+44 20 7946 0958 <script>alert(1)</script>"'),
        "is not a valid phone number",
    ),
    "phone-uri": (
        ('phone = "1-800-555-0142"', 'phone = "javascript:alert(1)//+18005550142"'),
        "is not a valid phone number",
    ),
    "name": (
        ('name = "Riverbend Specialty Pharmacy"', 'name = ""'),
        "'name' must be the pharmacy's name",
    ),
    "hours": (
        ('en = "Monday to Friday', 'fr = "Monday to Friday'),
        "'hours' needs an 'en' and an 'es' text",
    ),
    "notice": (NO_PHONE_IN_NOTICE, "needs a 'notice' sentence with {phone}"),
    "twice": (('language = "fr"', 'language = "es"'), "language 'es' is listed twice"),
    "dir": (('dir = "rtl"', 'dir = "up"'), "'dir' must be 'ltr' or 'rtl'"),
    "unknown-key": (("address = [", "adress = ["), "unknown key 'adress'"),
}


@pytest.mark.parametrize(("change", "message"), list(BROKEN.values()), ids=list(BROKEN))
def test_a_broken_pharmacy_file_is_refused_naming_the_line(settings, tmp_path, change, message):
    old, new = change
    assert old in SAMPLE, old
    text = SAMPLE.replace(old, new, 1)
    path = write_pharmacy(tmp_path, text)
    with pytest.raises(PharmacyError) as refused:
        create_app(settings.replace(pharmacy_file=path))
    assert message in str(refused.value)
    assert str(refused.value).startswith(f"{path}:")
    if "hours" not in message:  # a table is named by its header line
        changed_line = text[: SAMPLE.index(old)].count("\n") + 1
        assert str(refused.value).startswith(f"{path}:{changed_line}:"), refused.value


def test_a_pharmacy_file_with_a_toml_mistake_names_the_line(settings, tmp_path):
    path = write_pharmacy(tmp_path, SAMPLE.replace('tty = "711"', "tty = 711 711"))
    with pytest.raises(PharmacyError, match=rf"^{path}: .*line {line_of(SAMPLE, 'tty =')}"):
        create_app(settings.replace(pharmacy_file=path))


def test_a_missing_pharmacy_file_is_refused(settings, tmp_path):
    with pytest.raises(PharmacyError, match="cannot read the pharmacy file"):
        create_app(settings.replace(pharmacy_file=tmp_path / "nowhere.toml"))


def test_the_page_languages_must_have_a_notice(tmp_path):
    text = SAMPLE.split('[[language_assistance]]\nlanguage = "es"')[0]
    with pytest.raises(PharmacyError, match="must include 'es'"):
        parse_pharmacy(text, tmp_path / "p.toml", {})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"phone": "555"}, "INTAKE_PHARMACY_PHONE: the phone number '555' is not a valid"),
        ({"timezone": "Central"}, "INTAKE_TIMEZONE: the time zone 'Central' is not a known"),
    ],
)
def test_bad_environment_overrides_are_refused_by_name(tmp_path, overrides, message):
    with pytest.raises(PharmacyError, match=message):
        parse_pharmacy(SAMPLE, tmp_path / "p.toml", overrides)


@pytest.mark.parametrize(
    ("typed", "display", "href"),
    [
        ("+44 20 7946 0958 \u202e", "+44 20 7946 0958", "tel:+442079460958"),
        ("+44 (20) 7946-0958", "+44 20 7946 0958", "tel:+442079460958"),
        ("1 (800) 555 0142", "(800) 555-0142", "tel:+18005550142"),
    ],
)
def test_a_phone_is_shown_as_formatted_never_as_typed(tmp_path, typed, display, href):
    """A stray character in the file (a right-to-left override, odd punctuation) never reaches
    the pages: they show the number's standard form and dial its E.164 form."""
    pharmacy = parse_pharmacy(SAMPLE, tmp_path / "p.toml", {"phone": typed})
    assert (pharmacy.phone.display, pharmacy.phone.href) == (display, href)


def test_the_shipped_file_is_a_realistic_fictional_pharmacy(app):
    pharmacy = app.extensions["intake.pharmacy"]
    assert pharmacy.name == "Riverbend Specialty Pharmacy"
    assert (pharmacy.phone.display, pharmacy.phone.href) == ("(800) 555-0142", "tel:+18005550142")
    assert pharmacy.tty is not None and pharmacy.tty.href == "tel:711"
    assert pharmacy.timezone == "America/Chicago"
    assert pharmacy.hours_in("es").startswith("De lunes a viernes")
    assert len(pharmacy.language_assistance) >= 10


@pytest.mark.parametrize(
    ("when", "language", "shown"),
    [
        # 19:41 UTC in December is 1:41 PM in Chicago (CST, UTC-6)...
        (
            datetime(2026, 12, 1, 19, 41, tzinfo=UTC),
            "en",
            "Tuesday, December 1, 2026 at 1:41\u202fPM",
        ),
        (
            datetime(2026, 12, 1, 19, 41, tzinfo=UTC),
            "es",
            "martes, 1 de diciembre de 2026 a las 13:41",
        ),
        # ...and in July 2:41 PM (CDT, UTC-5); just after midnight UTC is still the day before.
        (datetime(2026, 7, 1, 19, 41, tzinfo=UTC), "en", "Wednesday, July 1, 2026 at 2:41\u202fPM"),
        (datetime(2026, 7, 2, 0, 30, tzinfo=UTC), "en", "Wednesday, July 1, 2026 at 7:30\u202fPM"),
    ],
)
def test_times_are_shown_in_the_pharmacys_time_zone_and_language(app, when, language, shown):
    with app.test_request_context(), force_locale(language):
        assert local_datetime(when) == shown


def test_the_time_zone_override_changes_every_time_shown(make_app, settings):
    app = make_app(settings.replace(timezone="America/New_York"))
    with app.test_request_context(), force_locale("en"):
        assert local_datetime(datetime(2026, 12, 1, 19, 41, tzinfo=UTC)).endswith("2:41\u202fPM")


# -- the consents folder --------------------------------------------------------------------


@pytest.fixture
def consents_copy(tmp_path) -> Path:
    folder = tmp_path / "consents"
    shutil.copytree(DEFAULT_CONSENTS_DIR, folder)
    return folder


@pytest.mark.parametrize(
    "missing", ["terms-2026-12.es.txt", "npp-2026-12.en.txt", "privacy-2026-11.es.txt"]
)
def test_a_consent_document_missing_a_language_stops_start_up(settings, consents_copy, missing):
    (consents_copy / missing).unlink()
    with pytest.raises(ConsentError) as refused:
        create_app(settings.replace(consents_dir=consents_copy))
    assert str(refused.value).startswith(f"{consents_copy / missing}: missing")


def test_an_operator_folder_supplies_the_texts_patients_accept(settings, consents_copy):
    (consents_copy / "terms-2027-01.en.txt").write_text("Terms of Use (version 2027-01)\n\nOurs.\n")
    (consents_copy / "terms-2027-01.es.txt").write_text(
        "Términos de uso (versión 2027-01)\n\nLos nuestros.\n"
    )
    manifest = consents_copy / "consents.toml"
    manifest.write_text(
        manifest.read_text().replace(
            '[terms]\nversion = "2026-12"\nsample = true', '[terms]\nversion = "2027-01"'
        )
    )
    app = create_app(settings.replace(consents_dir=consents_copy))
    client = app.test_client()
    page = client.get("/legal/terms?lang=es").get_data(as_text=True)
    assert "Los nuestros." in page and "Texto de muestra" not in page
    assert 'href="/legal/terms/2027-01"' in client.get("/refill").get_data(as_text=True)


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda f: (f / "consents.toml").unlink(), "cannot read the consents manifest"),
        (
            lambda f: (f / "consents.toml").write_text("[terms]\nversion = 1\n"),
            "[terms] needs a 'version'",
        ),
        (lambda f: (f / "notes.txt").write_text("hello"), "not a consent text name"),
        (lambda f: (f / "terms-2026-12.en.txt").write_text("  \n"), "the text is empty"),
    ],
    ids=["no-manifest", "bad-version", "stray-file", "empty"],
)
def test_a_broken_consents_folder_stops_start_up(settings, consents_copy, breakage, message):
    breakage(consents_copy)
    with pytest.raises(ConsentError, match=message.replace("[", r"\[").replace("]", r"\]")):
        create_app(settings.replace(consents_dir=consents_copy))


def test_the_manifest_must_present_a_version_that_exists(settings, consents_copy):
    manifest = consents_copy / "consents.toml"
    manifest.write_text(
        manifest.read_text().replace('version = "2026-12"', 'version = "2031-01"', 1)
    )
    with pytest.raises(ConsentError, match=r"terms-2031-01\.en\.txt: missing"):
        create_app(settings.replace(consents_dir=consents_copy))


def test_production_is_told_when_it_shows_the_shipped_samples(app, settings, caplog):
    from intake import _warn_about_samples

    _warn_about_samples(settings, app.extensions["intake.consents"].samples)
    messages = [r.getMessage() for r in caplog.records]
    assert any("sample_pharmacy_in_use" in m for m in messages)
    assert any("sample_consents_in_use" in m and "npp" in m for m in messages)
