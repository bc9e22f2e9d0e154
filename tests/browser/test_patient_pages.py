"""The patient pages in a real Chromium: the language switch keeps what was typed, the address
appears for delivery, error-summary links move focus, a thanks page prints with the pharmacy's
name and phone, and axe-core finds nothing on any page, on a phone and a desktop, in English
and Spanish. Screenshots and axe reports land in ``test-output/<test name>/``."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from intake.patient import forms as patient_forms
from tests.browser.test_patient_forms import format_violations, open_request_phi, spanish

pytestmark = pytest.mark.browser

SPANISH = pytest.mark.browser_context(locale="es-MX")
PHONE_VIEWPORT = {"width": 390, "height": 844}
DESKTOP_VIEWPORT = {"width": 1280, "height": 900}
PHARMACY = "Riverbend Specialty Pharmacy"
THANKS_URL_RE = re.compile(r"/thanks/[RC]-[0-9A-HJKMNP-TV-Z]{4}-[0-9A-HJKMNP-TV-Z]{4}$")


def fill_refill(page: Any) -> None:
    page.fill("#first_name", "María")
    page.fill("#last_name", "Núñez-Ortiz")
    page.fill("#date_of_birth", "1980-03-15")
    page.fill("#phone", "(202) 555-0143")
    page.fill("#rx_numbers", "1234567\n7654321")
    page.select_option("#location", "north")
    page.check("#fulfillment-2")  # ship
    page.fill("#address", "100 Calle Principal")
    page.fill("#notes", "Por favor llamen después de las 3.")
    page.check("#consent_privacy")


def typed_values(page: Any) -> dict[str, Any]:
    return {
        "first_name": page.input_value("#first_name"),
        "last_name": page.input_value("#last_name"),
        "date_of_birth": page.input_value("#date_of_birth"),
        "phone": page.input_value("#phone"),
        "rx_numbers": page.input_value("#rx_numbers").replace("\r\n", "\n"),
        "location": page.input_value("#location"),
        "ship": page.is_checked("#fulfillment-2"),
        "address": page.input_value("#address"),
        "notes": page.input_value("#notes"),
        "consent_privacy": page.is_checked("#consent_privacy"),
        "consent_contact": page.is_checked("#consent_contact"),
    }


def axe_clean(page: Any, output_dir: Path, name: str) -> None:
    """Run axe-core; fail on any violation at all, listed readably."""
    from axe_playwright_python.sync_playwright import Axe

    violations = Axe().run(page).response["violations"]
    (output_dir / f"{name}-axe.json").write_text(
        json.dumps(violations, indent=2, ensure_ascii=False), encoding="utf-8"
    )
    page.screenshot(path=str(output_dir / f"{name}.png"), full_page=True)
    assert not violations, f"axe found violations on {page.url}:\n" + format_violations(violations)


def submit(page: Any) -> None:
    """Click the form's own Send button and wait for the answer."""
    with page.expect_navigation():
        page.click("form#patient-form button.button[type=submit]")


# -- the language switch --------------------------------------------------------------------


def test_switching_language_mid_form_keeps_what_was_typed(
    page: Any, live_server: str, app: Flask, output_dir: Path
) -> None:
    page.goto(f"{live_server}/refill?lang=en")
    fill_refill(page)
    before = typed_values(page)
    with page.expect_navigation():
        page.click("header button.lang-switch")
    assert page.url == f"{live_server}/refill"  # a POST: nothing typed is in the address
    assert page.evaluate("() => document.documentElement.lang") == "es"
    page.screenshot(path=str(output_dir / "switched.png"), full_page=True)
    assert typed_values(page) == before
    assert page.locator(".field__error").count() == 0  # not validated, not sent

    # And back to English, still with everything, then send: one request, with those values.
    with page.expect_navigation():
        page.click("header button.lang-switch")
    assert page.evaluate("() => document.documentElement.lang") == "en"
    assert typed_values(page) == before
    page.check("#consent_contact")
    submit(page)
    page.wait_for_url(THANKS_URL_RE)
    reference = page.locator("#reference").inner_text().strip()
    row, document, _consents = open_request_phi(app, reference)
    assert (row.location, document["first_name"], document["address"]) == (
        "north",
        "María",
        "100 Calle Principal",
    )


def test_enter_in_a_field_sends_the_form_and_never_switches_the_language(
    page: Any, live_server: str, app: Flask
) -> None:
    page.goto(f"{live_server}/contact?lang=en&topic=copay")
    assert page.input_value("#topic") == "copay"  # the call to action's topic
    page.fill("#first_name", "John")
    page.fill("#last_name", "O'Brien")
    page.fill("#date_of_birth", "1975-06-01")
    page.fill("#phone", "202-555-0178")
    page.fill("#message", "I need help paying for my medication.")
    page.check("#consent_privacy")
    page.focus("#last_name")
    with page.expect_navigation():
        page.keyboard.press("Enter")
    page.wait_for_url(THANKS_URL_RE)
    assert page.evaluate("() => document.documentElement.lang") == "en"


# -- the delivery address -------------------------------------------------------------------


def test_the_address_appears_only_for_delivery_or_shipping(page: Any, live_server: str) -> None:
    page.goto(f"{live_server}/refill")
    address = page.locator("#address")
    assert page.is_checked("#fulfillment-0") and not address.is_visible()
    page.check("#fulfillment-1")  # local delivery
    assert address.is_visible()
    assert page.locator("#address-hint").is_visible()
    page.check("#fulfillment-0")  # back to pick-up
    assert not address.is_visible()
    page.check("#fulfillment-2")  # ship
    address.fill("12 Elm St")
    assert address.is_visible()


@pytest.mark.browser_context(java_script_enabled=False)
def test_without_javascript_the_address_stays_visible_with_its_hint(
    page: Any, live_server: str, app: Flask
) -> None:
    page.goto(f"{live_server}/refill")
    assert page.locator("#address").is_visible()
    assert (
        page.locator("#address-hint").inner_text().strip() == "Required for delivery or shipping."
    )
    # No print button that could not work, and the language switch still works (a plain POST).
    page.goto(f"{live_server}/thanks/R-7K3M-Q9P2")
    assert page.locator("button[data-print]").count() == 1
    assert not page.locator("button[data-print]").is_visible()
    page.goto(f"{live_server}/refill")
    page.fill("#first_name", "Zoë")
    with page.expect_navigation():
        page.click("header button.lang-switch")
    assert page.evaluate("() => document.documentElement.lang") == "es"
    assert page.input_value("#first_name") == "Zoë"


# -- the error summary ----------------------------------------------------------------------


@SPANISH
def test_error_summary_links_move_focus_to_their_field(
    page: Any, live_server: str, app: Flask, output_dir: Path
) -> None:
    page.goto(f"{live_server}/refill?lang=es")
    page.check("#fulfillment-1")  # delivery, without an address
    submit(page)
    summary = page.locator("#error-summary")
    assert summary.get_attribute("role") == "alert"
    page.screenshot(path=str(output_dir / "summary.png"), full_page=True)
    links = summary.locator("a")
    texts = [t.strip() for t in links.all_inner_texts()]
    assert texts[:3] == [
        spanish(app, patient_forms.FIRST_NAME_NEEDED),
        spanish(app, patient_forms.LAST_NAME_NEEDED),
        spanish(app, patient_forms.DOB_NEEDED),
    ]
    assert spanish(app, patient_forms.ADDRESS_NEEDED) in texts
    for index in range(links.count()):
        link = links.nth(index)
        target = (link.get_attribute("href") or "")[1:]
        page.evaluate("() => window.scrollTo(0, 0)")
        link.click()
        assert page.evaluate("() => document.activeElement.id") == target
        assert page.locator(f"#{target}").is_visible() or page.locator(f"#{target}").is_checked()
    # The summary itself can take focus (a script or a screen reader user may send it there).
    summary.focus()
    assert page.evaluate("() => document.activeElement.id") == "error-summary"


def test_the_honeypot_label_is_not_in_the_visible_page_text(
    page: Any, live_server: str, app: Flask
) -> None:
    page.goto(f"{live_server}/refill")
    with app.test_request_context("/?lang=en"):
        label = str(patient_forms.PatientForm.extra_comments.args[0])
    assert label not in page.inner_text("body")
    assert page.locator("input[name=extra_comments]").count() == 1


# -- the thanks page and printing -----------------------------------------------------------


@SPANISH
def test_thanks_page_shows_the_summary_and_prints_with_the_pharmacy(
    page: Any, live_server: str, output_dir: Path
) -> None:
    page.goto(f"{live_server}/contact?lang=es&topic=side_effect")
    page.fill("#first_name", "Ana")
    page.fill("#last_name", "Ruiz")
    page.fill("#date_of_birth", "1975-06-01")
    page.fill("#phone", "202-555-0178")
    page.fill("#message", "Tengo dolor de cabeza después de la infusión.")
    page.check("#consent_privacy")
    submit(page)
    page.wait_for_url(THANKS_URL_RE)
    main = page.inner_text("main")
    assert "Tratamos su reporte como urgente." in main
    assert re.search(r"Recibida el \w+, \d{1,2} de \w+ de \d{4} a las \d{1,2}:\d{2}", main), main
    assert "Ana" not in main and "Ruiz" not in main and "cabeza" not in main
    button = page.locator("button[data-print]")
    assert button.is_visible() and button.inner_text().strip() == "Imprimir esta página"
    page.screenshot(path=str(output_dir / "thanks.png"), full_page=True)

    page.emulate_media(media="print")
    page.screenshot(path=str(output_dir / "thanks-print.png"), full_page=True)
    printed = page.inner_text("body")
    assert PHARMACY in printed and "(800) 555-0142" in printed
    assert page.locator(".print-header").is_visible()
    assert not page.locator(".site-header").is_visible()
    assert not button.is_visible()
    page.pdf(path=str(output_dir / "thanks.pdf"))


# -- axe on every changed page --------------------------------------------------------------

AXE_PAGES = {
    "home": "/",
    "refill": "/refill",
    "contact-copay": "/contact?topic=copay",
    "status": "/status",
    "thanks-plain": "/thanks/R-7K3M-Q9P2",
    "terms": "/legal/terms",
    "npp": "/legal/npp",
    "privacy-old": "/legal/privacy/2026-11",
    "not-found": "/nowhere",
}
WIDTHS = {"phone": PHONE_VIEWPORT, "desktop": DESKTOP_VIEWPORT}


@pytest.fixture
def sized(page: Any, request: pytest.FixtureRequest) -> Any:
    page.set_viewport_size(WIDTHS[request.node.callspec.params["width"]])
    return page


def fits(page: Any) -> bool:
    sizes = page.evaluate(
        "() => ({scroll: document.documentElement.scrollWidth, inner: window.innerWidth})"
    )
    return bool(sizes["scroll"] <= sizes["inner"])


@pytest.mark.parametrize("width", list(WIDTHS))
@pytest.mark.parametrize(
    "lang", [pytest.param("en", id="en"), pytest.param("es", id="es", marks=SPANISH)]
)
@pytest.mark.parametrize("path", list(AXE_PAGES.values()), ids=list(AXE_PAGES))
def test_axe_finds_no_violations_on_the_patient_pages(
    sized: Any, live_server: str, output_dir: Path, path: str, lang: str, width: str
) -> None:
    page = sized
    page.goto(f"{live_server}{path}{'&' if '?' in path else '?'}lang={lang}")
    assert page.evaluate("() => document.documentElement.lang") == lang
    assert PHARMACY in page.title()
    assert page.locator("a[href^='tel:']").count() >= 2
    assert fits(page), "the page is wider than the screen"
    axe_clean(page, output_dir, f"{width}")


@pytest.mark.parametrize("width", list(WIDTHS))
@pytest.mark.parametrize(
    "lang", [pytest.param("en", id="en"), pytest.param("es", id="es", marks=SPANISH)]
)
def test_axe_finds_no_violations_on_errors_switch_and_receipt(
    sized: Any, live_server: str, output_dir: Path, lang: str, width: str
) -> None:
    page = sized
    page.goto(f"{live_server}/refill?lang={lang}")
    page.check("#fulfillment-1")
    submit(page)
    assert page.locator("#error-summary").is_visible()
    assert fits(page)
    axe_clean(page, output_dir, f"{width}-errors")

    with page.expect_navigation():
        page.click("header button.lang-switch")
    axe_clean(page, output_dir, f"{width}-switched")

    page.goto(f"{live_server}/refill?lang={lang}")
    fill_refill(page)
    page.check("#consent_contact")
    submit(page)
    page.wait_for_url(THANKS_URL_RE)
    assert page.locator("#received-at").is_visible()
    assert fits(page)
    axe_clean(page, output_dir, f"{width}-thanks")
