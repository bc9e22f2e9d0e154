"""What every patient page tells the patient: who the pharmacy is, how to call it, in which
languages help is free; the landing page's calls to action; the thanks page's summary; the
language switch that keeps what was typed; the legal texts on their own pages."""

from __future__ import annotations

import html as html_lib
import re

import pytest
from flask_babel import force_locale
from sqlalchemy import func, select

from config import Settings
from intake.extensions import db
from intake.models import AuditEvent, ConsentAcceptance, OutboxMessage, Request
from intake.patient import forms as F
from tests.conftest import hidden_fields, reference_from, valid_contact, valid_refill


@pytest.fixture(params=["sqlite"])
def backend(request):
    """Pages do not depend on the database: SQLite only."""
    return request.param


PATIENT_PAGES = [
    "/",
    "/refill",
    "/contact",
    "/contact?topic=copay",
    "/status",
    "/thanks/R-7K3M-Q9P2",
    "/legal/terms",
    "/legal/privacy",
    "/legal/npp",
    "/legal/contact",
    "/nowhere",
]


def text_of(page: str) -> str:
    """The page's text as a person reads it (tags dropped, entities decoded)."""
    body = re.sub(r"<(script|style)\b.*?</\1>", "", page, flags=re.S)
    body = re.sub(r"</?(a|span|strong|em|bdi)\b[^>]*>", "", body)  # inline: no space
    return html_lib.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", body)))


def counts(app) -> tuple[int, ...]:
    with app.app_context():
        return tuple(
            db.session.scalar(select(func.count()).select_from(model))
            for model in (Request, ConsentAcceptance, OutboxMessage, AuditEvent)
        )


def render(app, message, language: str) -> str:
    with app.test_request_context(), force_locale(language):
        return str(message)


# -- the pharmacy on every page ---------------------------------------------------------------


@pytest.mark.parametrize("lang", ["en", "es"])
@pytest.mark.parametrize("path", PATIENT_PAGES)
def test_every_patient_page_names_the_pharmacy_and_offers_a_call(client, path, lang):
    response = client.get(path + ("&" if "?" in path else "?") + f"lang={lang}")
    assert response.status_code == (404 if path == "/nowhere" else 200)
    page = response.get_data(as_text=True)
    assert f'<html lang="{lang}">' in page
    title = re.search(r"<title>(.*?)</title>", page, re.S).group(1)
    assert title.strip().endswith("Riverbend Specialty Pharmacy")
    assert 'class="brand" href="/">Riverbend Specialty Pharmacy</a>' in page
    assert 'href="tel:+18005550142"' in page and "(800) 555-0142" in page
    assert 'href="tel:711"' in page  # TTY through the relay service
    assert "Specialty Pharmacy<" not in page.replace("Riverbend Specialty Pharmacy<", "")


def test_the_environment_overrides_name_phone_and_time_zone(make_app, settings):
    app = make_app(
        settings.replace(
            pharmacy_name="Casa Salud Pharmacy",
            pharmacy_phone="(312) 555-0199",
            timezone="America/Los_Angeles",
        )
    )
    client = app.test_client()
    for path in ("/", "/refill", "/thanks/R-7K3M-Q9P2", "/nowhere"):
        page = client.get(path).get_data(as_text=True)
        assert "Casa Salud Pharmacy" in page and "Riverbend" not in page, path
        assert 'href="tel:+13125550199"' in page and "(312) 555-0199" in page, path
        assert "tel:+18005550142" not in page, path
    # The 1557 notice uses the overriding phone too, and times are Pacific.
    assert "Pacific Time" in client.get("/").get_data(as_text=True)


HOSTILE = '<script src="//evil.example/x.js"></script><img src=x onerror=alert(1)>'


def test_hostile_pharmacy_values_are_shown_as_text_on_every_page(make_app, settings, tmp_path):
    """A pharmacy name (INTAKE_PHARMACY_NAME) or file value holding markup is shown as text:
    in the title, header, footer, printout, notice and error pages, never as HTML."""
    from config.settings import DEFAULT_PHARMACY_FILE

    text = DEFAULT_PHARMACY_FILE.read_text(encoding="utf-8")
    text = text.replace('"1200 Harbor Avenue, Suite 300"', f"'{HOSTILE}'")
    text = re.sub(r'(?m)^en = "Monday to Friday.*$', f"en = '{HOSTILE} Monday to Friday'", text)
    text = re.sub(
        r'(?m)^notice = "ATTENTION: If you speak English.*$',
        f"notice = '{HOSTILE} Call {{phone}} (TTY: {{tty}}).'",
        text,
    )
    hostile_file = tmp_path / "pharmacy.toml"
    hostile_file.write_text(text, encoding="utf-8")
    app = make_app(settings.replace(pharmacy_name=HOSTILE, pharmacy_file=hostile_file))
    client = app.test_client()
    for path in [*PATIENT_PAGES, "/legal/privacy/2026-11"]:
        page = client.get(path).get_data(as_text=True)
        assert '<script src="//evil' not in page and "<img src=x" not in page, path
        assert html_lib.escape(HOSTILE, quote=True) in page or "&lt;script" in page, path
    hidden = hidden_fields(client.get("/refill").get_data(as_text=True))
    stale = client.post("/refill", data={**valid_refill(), **hidden, "csrf_token": "expired"})
    assert stale.status_code == 400 and "<img src=x" not in stale.get_data(as_text=True)


def test_settings_read_the_pharmacy_overrides_from_the_environment(tmp_path):
    settings = Settings.from_env(
        {
            "INTAKE_PHARMACY_NAME": " Casa Salud ",
            "INTAKE_PHARMACY_PHONE": "3125550199",
            "INTAKE_TIMEZONE": "America/New_York",
            "INTAKE_PHARMACY_FILE": str(tmp_path / "pharmacy.toml"),
            "INTAKE_CONSENTS_DIR": str(tmp_path / "consents"),
        }
    )
    assert (settings.pharmacy_name, settings.pharmacy_phone, settings.timezone) == (
        "Casa Salud",
        "3125550199",
        "America/New_York",
    )
    assert settings.pharmacy_file == tmp_path / "pharmacy.toml"
    assert settings.consents_dir == tmp_path / "consents"
    defaults = Settings.from_env({})
    assert defaults.pharmacy_file.name == "pharmacy.toml" and defaults.pharmacy_name is None


@pytest.mark.parametrize("lang", ["en", "es"])
@pytest.mark.parametrize(
    "path", ["/", "/refill", "/contact", "/status", "/thanks/R-7K3M-Q9P2", "/legal/npp", "/nope"]
)
def test_the_language_assistance_notice_is_on_every_patient_page(client, path, lang):
    page = client.get(f"{path}?lang={lang}").get_data(as_text=True)
    notice = re.search(r'<section class="language-assistance".*?</section>', page, re.S)
    assert notice, path
    block = notice.group(0)
    english = re.search(r'<li lang="en" dir="ltr">(.*?)</li>', block, re.S).group(1)
    spanish = re.search(r'<li lang="es" dir="ltr">(.*?)</li>', block, re.S).group(1)
    assert text_of(english).strip() == (
        "ATTENTION: If you speak English, language assistance services, free of charge, are "
        "available to you. Call (800) 555-0142 (TTY: 711)."
    )
    assert text_of(spanish).strip() == (
        "ATENCIÓN: Si habla español, tiene a su disposición servicios gratuitos de asistencia "
        "lingüística. Llame al (800) 555-0142 (TTY: 711)."
    )
    for sentence in (english, spanish):
        assert 'href="tel:+18005550142"' in sentence and 'href="tel:711"' in sentence
    # Every language of the file, each marked with its language (and direction) for readers.
    assert re.findall(r'<li lang="([^"]+)"', block) == [
        "en", "es", "zh-Hant", "vi", "ko", "tl", "ru", "ar", "ht", "fr",
    ]  # fmt: skip
    assert '<li lang="ar" dir="rtl">' in block


def test_staff_pages_keep_their_own_header_and_footer(client):
    page = client.get("/staff/login").get_data(as_text=True)
    assert "language-assistance" not in page
    assert "Riverbend Specialty Pharmacy" in page  # in the title only


# -- landing page and calls to action -------------------------------------------------------


@pytest.mark.parametrize("lang", ["en", "es"])
def test_landing_page_leads_with_the_calls_to_action(app, client, lang):
    page = client.get(f"/?lang={lang}").get_data(as_text=True)
    main = re.search(r"<main.*?</main>", page, re.S).group(0)
    links = re.findall(r'<a href="([^"]+)">([^<]+)</a>', main)
    expected = [
        ("tel:+18005550142", "Call for free IVIG information"),
        ("/contact?topic=copay", "Get copay assistance: start here"),
        ("/contact?topic=specialist", "Talk to an IVIG specialist"),
        ("/refill", "Request a prescription refill"),
        ("/contact", "Ask us to contact you"),
        ("/status", "Check the status of a request"),
    ]
    from flask_babel import lazy_gettext

    assert links == [(href, render(app, lazy_gettext(label), lang)) for href, label in expected]


def selected_topic(page: str) -> str | None:
    select_html = re.search(r'<select[^>]*id="topic".*?</select>', page, re.S).group(0)
    chosen = re.search(r'<option selected value="([^"]*)"', select_html) or re.search(
        r'<option value="([^"]*)" selected', select_html
    )
    return chosen.group(1) if chosen else None


@pytest.mark.parametrize("topic", ["copay", "specialist", "question", "side_effect"])
def test_a_call_to_action_opens_the_contact_form_with_its_topic_chosen(client, topic):
    assert selected_topic(client.get(f"/contact?topic={topic}").get_data(as_text=True)) == topic


@pytest.mark.parametrize("topic", ["", "lottery", "<script>", "copay%00"])
def test_an_unknown_topic_in_the_address_chooses_nothing(client, topic):
    response = client.get(f"/contact?topic={topic}")
    assert response.status_code in (200, 400)
    if response.status_code == 200:
        assert selected_topic(response.get_data(as_text=True)) in (None, "")


def test_the_preselected_topic_is_sent_with_the_form(app, client):
    page = client.get("/contact?topic=specialist").get_data(as_text=True)
    fields = valid_contact(topic="specialist")
    reference = reference_from(client.post("/contact", data={**hidden_fields(page), **fields}))
    with app.app_context():
        row = db.session.execute(select(Request).filter_by(reference=reference)).scalar_one()
    assert row.topic == "specialist"


# -- the thanks page ---------------------------------------------------------------------------


def main_text(response) -> str:
    page = response.get_data(as_text=True)
    return text_of(re.search(r"<main.*?</main>", page, re.S).group(0))


def test_thanks_page_summarizes_a_refill_without_phi(app, patient, client):
    reference = reference_from(
        patient.refill(fulfillment="delivery", address="12 Elm St", rx_numbers="1234567\n7654321")
    )
    text = main_text(client.get(f"/thanks/{reference}"))
    assert reference in text
    assert re.search(
        r"Received on \w+day, \w+ \d{1,2}, \d{4} at \d{1,2}:\d{2}\s[AP]M \(Central Time\)", text
    ), text
    assert "Request Prescription refill" in text
    assert "Prescriptions 2" in text
    assert "How you receive it Local delivery" in text
    assert "Pharmacy location Main Street Pharmacy" in text
    assert "How we contact you Text message" in text
    # Main Street refills: 1 business day, in words and with the day.
    assert re.search(
        r"by text message within 1 business day \(by \w+, \w+ \d{1,2}, \d{4}\)", text
    ), text
    for phi in ("Maria", "Núñez", "1980", "555-0143", "1234567", "12 Elm", "maria@"):
        assert phi not in text, phi


def test_thanks_page_says_a_side_effect_report_is_urgent(patient, client):
    reference = reference_from(patient.contact(lang="es", topic="side_effect"))
    text = main_text(client.get(f"/thanks/{reference}"))
    assert "Tratamos su reporte como urgente." in text
    assert re.search(
        r"Un farmacéutico le llamará en 1 hora, (hacia las \d{1,2}:\d{2}|a más tardar el .+)\.",
        text,
    ), text
    assert "llame al 911 ahora mismo" in text
    assert "Tema Reportar un efecto secundario" in text


def test_thanks_page_for_another_browser_shows_only_the_reference(patient, app):
    reference = reference_from(patient.refill())
    stranger = app.test_client()
    text = main_text(stranger.get(f"/thanks/{reference}"))
    assert reference in text
    assert "What you sent" not in text and "Received on" not in text
    # ...and exactly what a made-up reference gets: the page is no existence oracle.
    made_up = main_text(stranger.get("/thanks/R-0000-0000")).replace("R-0000-0000", reference)
    assert made_up == text


def test_thanks_summary_survives_more_submissions_from_the_same_browser(patient, client):
    first = reference_from(patient.refill())
    second = reference_from(patient.contact(topic="copay"))
    assert "Prescription refill" in main_text(client.get(f"/thanks/{first}"))
    assert "Help paying for my medication" in main_text(client.get(f"/thanks/{second}"))


def test_many_submissions_keep_the_session_cookie_small_and_free_of_phi(app, patient, client):
    """A patient (or a script) sending many requests from one browser must not grow the
    session cookie past what browsers keep (4 KiB), which would break every page; and the
    cookie is signed, not encrypted, so it holds no PHI."""
    import base64
    import json
    import zlib

    rx = "\n".join(f"10000{n:02d}" for n in range(10))
    references = []
    for n in range(12):
        sent = patient.refill(rx_numbers=rx) if n % 2 else patient.contact(topic="side_effect")
        references.append(reference_from(sent))
    cookie = client.get_cookie("intake_session")
    assert cookie is not None and len(cookie.value) < 4000
    payload = cookie.value.lstrip(".").split(".")[0]
    raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    session = json.loads(zlib.decompress(raw) if cookie.value.startswith(".") else raw)
    text = json.dumps(session)
    # Phone numbers as digits and as typed: a bare "555" would match a timestamp's microseconds.
    phones = ("5550143", "5550178", "555-0143", "555-0178")
    names = ("Maria", "John", "Núñez", "O'Brien")
    for phi in (*names, "1980-03-15", "1962-07-04", *phones, "1000001"):
        assert phi not in text, phi
    # The newest summaries are kept; every page still renders.
    assert "What you sent" in main_text(client.get(f"/thanks/{references[-1]}"))
    assert client.get("/refill").status_code == 200


def test_a_forged_or_stale_receipt_in_the_session_shows_the_plain_page(app, client):
    with client.session_transaction() as session:
        session["receipts"] = {
            "R-7K3M-Q9P2": {"kind": "refill", "at": "2000-01-01T00:00:00+00:00"},
            "R-AAAA-AAAA": {"kind": "refill", "at": "not a date"},
            "R-BBBB-BBBB": "junk",
        }
    for reference in ("R-7K3M-Q9P2", "R-AAAA-AAAA", "R-BBBB-BBBB"):
        response = client.get(f"/thanks/{reference}")
        assert response.status_code == 200
        assert "What you sent" not in main_text(response)


# -- the language switch --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["refill", "contact"])
def test_the_language_switch_keeps_typed_values_and_stores_nothing(app, client, kind):
    page = client.get(f"/{kind}?lang=en").get_data(as_text=True)
    assert 'name="switch_language" value="es"' in page and 'form="patient-form"' in page
    typed = valid_refill(notes="Llamen después de las 3") if kind == "refill" else valid_contact()
    before = counts(app)
    response = client.post(
        f"/{kind}", data={**hidden_fields(page), **typed, "switch_language": "es"}
    )
    assert response.status_code == 200
    switched = response.get_data(as_text=True)
    assert '<html lang="es">' in switched
    assert (
        'value="Núñez-Ortiz"' in switched if kind == "refill" else 'value="O&#39;Brien"' in switched
    )
    assert re.search(r'<input checked[^>]*id="consent_privacy"', switched)
    if kind == "refill":
        assert "Llamen después de las 3</textarea>" in switched
        assert re.search(r'<option selected value="main"', switched)
    assert 'class="field__error"' not in switched  # not validated
    assert 'name="switch_language" value="en"' in switched  # and back again
    assert "intake_lang=es" in response.headers.get("Set-Cookie", "")
    assert counts(app) == before
    # The form still works from there: sending it stores one request, in Spanish.
    reference = reference_from(client.post(f"/{kind}", data={**hidden_fields(switched), **typed}))
    with app.app_context():
        row = db.session.execute(select(Request).filter_by(reference=reference)).scalar_one()
    assert row.language == "es"


def test_the_language_switch_does_not_count_against_the_submission_limit(app, settings, client):
    app.extensions["intake.settings"] = settings.replace(submit_rate_limit="2/minute")
    page = client.get("/refill").get_data(as_text=True)
    for lang in ("es", "en", "es", "en", "es"):
        response = client.post(
            "/refill", data={**hidden_fields(page), **valid_refill(), "switch_language": lang}
        )
        assert response.status_code == 200


def test_an_unknown_language_is_not_a_switch(app, client):
    page = client.get("/refill").get_data(as_text=True)
    before = counts(app)
    response = client.post(
        "/refill", data={**hidden_fields(page), **valid_refill(), "switch_language": "fr"}
    )
    assert response.status_code == 303  # an ordinary submission
    assert counts(app)[0] == before[0] + 1


def test_no_typed_value_goes_into_an_address(client):
    page = client.get("/refill").get_data(as_text=True)
    response = client.post(
        "/refill", data={**hidden_fields(page), **valid_refill(), "switch_language": "es"}
    )
    switched = response.get_data(as_text=True)
    for href in re.findall(r'(?:href|action)="([^"]*)"', switched):
        assert (
            "Maria" not in href
            and "1980" not in href
            and "555" not in href.replace("tel:+18005550142", "")
        )


# -- errors, honeypot, favicon --------------------------------------------------------------


@pytest.mark.parametrize("lang", ["en", "es"])
def test_the_error_summary_links_each_error_to_its_field(app, patient, lang):
    response = patient.refill(
        lang=lang,
        first_name="",
        rx_numbers="",
        fulfillment="ship",
        address="",
        consent_contact=None,
    )
    page = response.get_data(as_text=True)
    summary = re.search(r'<div class="error-summary"[^>]*>.*?</div>', page, re.S).group(0)
    assert 'role="alert"' in summary and 'tabindex="-1"' in summary
    links = [
        (href, html_lib.unescape(text))
        for href, text in re.findall(r'<a href="#([^"]+)">([^<]+)</a>', summary)
    ]
    assert links == [
        ("first_name", render(app, F.FIRST_NAME_NEEDED, lang)),
        ("rx_numbers", render(app, F.RX_NONE, lang)),
        ("address", render(app, F.ADDRESS_NEEDED, lang)),
        ("consent_contact", render(app, F.CONSENT_CONTACT_NEEDED, lang)),
    ]
    for target, _message in links:
        assert f'id="{target}"' in page
    # A radio group's link goes to its first option.
    radio = patient.refill(lang=lang, fulfillment="teleport").get_data(as_text=True)
    assert '<a href="#fulfillment-0">' in radio and 'id="fulfillment-0"' in radio


def test_the_honeypot_label_is_not_in_the_page_text(app, client):
    page = client.get("/refill").get_data(as_text=True)
    label = render(app, F.PatientForm.extra_comments.args[0], "en")
    assert label in page  # still in the markup, for bots...
    with client.get("/static/intake.css") as response:
        css = response.get_data(as_text=True)
    assert re.search(r"\.honeypot\s*\{\s*display:\s*none", css)  # ...but never rendered
    assert 'class="honeypot"' in page


def test_favicon_is_served(client):
    with client.get("/favicon.ico") as response:
        assert response.status_code == 200
        assert response.data[:4] == b"\x00\x00\x01\x00"  # an ICO file
    page = client.get("/").get_data(as_text=True)
    assert 'rel="icon" href="/static/favicon.svg"' in page and 'href="/favicon.ico"' in page
    with client.get("/static/favicon.svg") as response:
        assert response.status_code == 200 and b"<svg" in response.data


# -- legal texts ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("document", "en_title", "es_title"),
    [
        ("terms", "Terms of Use", "Términos de uso"),
        ("privacy", "Privacy Policy", "Política de privacidad"),
        ("npp", "Notice of Privacy Practices", "Aviso de Prácticas de Privacidad"),
    ],
)
def test_each_legal_text_has_its_own_page_in_both_languages(client, document, en_title, es_title):
    from intake.requests.consents import current_consent

    for lang, title in (("en", en_title), ("es", es_title)):
        response = client.get(f"/legal/{document}?lang={lang}")
        page = response.get_data(as_text=True)
        assert response.status_code == 200
        assert re.search(rf"<h1>{title} \(version|<h1>{title} \(versión", page), page[:500]
        with client.application.app_context():
            text = current_consent(document, lang)
        assert text.sha256 in page
        assert html_lib.escape(text.paragraphs[1], quote=True) in page
        assert "Sample text" in text_of(page) or "Texto de muestra" in text_of(page)


@pytest.mark.parametrize(
    "path",
    [
        "/legal/terms/..%2f..%2fconsents.toml",
        "/legal/terms/..%2Fprivacy-2026-12",
        "/legal/..%2fconsents",
        "/legal/terms/2026-12.en.txt",
        "/legal/terms/2026-12.en",
        "/legal/terms/..",
        "/legal/terms/%2e%2e/%2e%2e/pharmacy.toml",
        "/legal/terms/2026-12/extra",
        "/legal/consents.toml",
        "/legal/TERMS",
        "/legal/terms/" + "9" * 5000,
    ],
)
def test_legal_pages_read_only_published_texts(client, path):
    """No path reaches a file: the document and version are looked up among the texts read at
    start-up, never joined into a file name."""
    response = client.get(path)
    assert response.status_code in (400, 404), path
    page = response.get_data(as_text=True)
    assert "[terms]" not in page and "version =" not in page and "timezone" not in page


def test_an_earlier_version_stays_readable_and_unknown_ones_are_404(client):
    old = client.get("/legal/privacy/2026-11").get_data(as_text=True)
    assert "This is an earlier version" in old and 'href="/legal/privacy"' in old
    assert client.get("/legal/privacy/1999-01").status_code == 404
    assert client.get("/legal/cookies").status_code == 404


@pytest.mark.parametrize("kind", ["refill", "contact"])
def test_the_privacy_box_accepts_terms_privacy_policy_and_npp_with_links(
    app, client, patient, kind
):
    page = client.get(f"/{kind}").get_data(as_text=True)
    box = re.search(r'<div class="field consent">(.*?)id="consent_privacy"', page, re.S).group(1)
    for document in ("terms", "privacy", "npp"):
        assert f'href="/legal/{document}/2026-12"' in box
    reference = reference_from(patient.refill() if kind == "refill" else patient.contact())
    with app.app_context():
        row = db.session.execute(select(Request).filter_by(reference=reference)).scalar_one()
        accepted = db.session.execute(
            select(ConsentAcceptance.document).filter_by(request_id=row.id)
        ).scalars()
        documents = sorted(accepted)
    expected = ["npp", "privacy", "terms"] + (["contact"] if kind == "refill" else [])
    assert documents == sorted(expected)


def test_each_stored_digest_is_the_digest_of_the_file_patients_read(app):
    import hashlib

    from intake.requests.consents import library

    with app.app_context():
        texts = library()
    for (document, version, language), text in texts.texts.items():
        body = (texts.folder / f"{document}-{version}.{language}.txt").read_text(encoding="utf-8")
        assert text.sha256 == hashlib.sha256(body.encode()).hexdigest()
    # The texts accepted before the Terms of Use and NPP existed keep their digests.
    assert texts.text("privacy", "2026-11", "en").sha256.startswith(
        hashlib.sha256(
            (texts.folder / "privacy-2026-11.en.txt").read_bytes().replace(b"\r\n", b"\n")
        ).hexdigest()[:12]
    )


def test_a_switch_without_a_valid_token_is_counted_like_any_post(app, settings, client):
    app.extensions["intake.settings"] = settings.replace(submit_rate_limit="2/minute")
    codes = [
        client.post("/refill", data={**valid_refill(), "switch_language": "es"}).status_code
        for _ in range(4)
    ]
    assert codes[:2] == [400, 400] and 429 in codes[2:]


def test_a_switch_with_a_huge_body_is_refused_like_any_post(client):
    page = client.get("/refill").get_data(as_text=True)
    response = client.post(
        "/refill",
        data={**hidden_fields(page), **valid_refill(notes="x" * 100_000), "switch_language": "es"},
    )
    assert response.status_code == 413


def test_a_resent_form_whose_first_answer_was_lost_still_gets_the_summary(app, client):
    page = client.get("/refill").get_data(as_text=True)
    form = {**hidden_fields(page), **valid_refill(fulfillment="ship", address="1 Elm St")}
    first = reference_from(client.post("/refill", data=form))
    with client.session_transaction() as session:
        session.pop("receipts")  # the browser never got the first answer's cookie
    again = reference_from(client.post("/refill", data=form))  # the same one-time key
    assert again == first
    text = main_text(client.get(f"/thanks/{first}"))
    assert "How you receive it Ship to my address" in text and "Prescriptions 2" in text


def test_a_resent_form_keeps_the_summary_it_already_has(app, client):
    page = client.get("/contact").get_data(as_text=True)
    form = {**hidden_fields(page), **valid_contact(topic="insurance")}
    reference = reference_from(client.post("/contact", data=form))
    with client.session_transaction() as session:
        kept = dict(session["receipts"][reference])
    assert reference_from(client.post("/contact", data=form)) == reference
    with client.session_transaction() as session:
        assert session["receipts"][reference] == kept
