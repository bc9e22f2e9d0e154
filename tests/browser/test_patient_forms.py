"""The patient forms in a real Chromium: keyboard only, in Spanish, accessible, on a phone.

Expected Spanish texts come from the app's own gettext catalog (``spanish()``), and each is
also checked to differ from the English, so a missing or uncompiled catalog fails loudly.
Screenshots and axe reports land in ``test-output/<test name>/``.
"""

from __future__ import annotations

import json
import re
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask_babel import lazy_gettext

from intake.patient import forms as patient_forms

pytestmark = pytest.mark.browser

SPANISH = pytest.mark.browser_context(locale="es-MX")
PHONE = pytest.mark.browser_context(
    viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True, has_touch=True
)
REFERENCE_RE = re.compile(r"^R-[0-9A-HJKMNP-TV-Z]{4}-[0-9A-HJKMNP-TV-Z]{4}$")
THANKS_URL_RE = re.compile(r"/thanks/(R-[0-9A-HJKMNP-TV-Z]{4}-[0-9A-HJKMNP-TV-Z]{4})$")
BLOCKING_IMPACTS = ("serious", "critical")

ACTIVE_ELEMENT_JS = """() => {
  const e = document.activeElement;
  return e ? {tag: e.tagName.toLowerCase(), id: e.id, name: e.getAttribute('name') || '',
              type: e.getAttribute('type') || '', cls: e.className || '',
              text: (e.innerText || '').trim().slice(0, 60)} : null;
}"""


# -- helpers --------------------------------------------------------------------------------


def spanish(app: Flask, message: Any) -> str:
    """``message`` (a lazy gettext string) as the app renders it for a Spanish page."""
    with app.test_request_context("/?lang=es"):
        text = str(message)
    original = english(app, message)
    assert text != original, f"no Spanish translation for {original!r}: is the catalog compiled?"
    return text


def english(app: Flask, message: Any) -> str:
    with app.test_request_context("/?lang=en"):
        return str(message)


def active(page: Any) -> dict[str, str]:
    result: dict[str, str] = page.evaluate(ACTIVE_ELEMENT_JS)
    return result


def press_tab_to(page: Any, target: str, *, passing: tuple[str, ...] = (), limit: int = 8) -> None:
    """Press Tab until the element matching CSS ``target`` has focus.

    On the way, focus may only stay on the element it starts from (a date input has a tab stop
    per segment and one for its calendar button) or rest on elements matching ``passing``;
    anything else is a wrong tab order and fails the test.
    """
    start = page.evaluate_handle("() => document.activeElement")
    stops: list[dict[str, str]] = []
    for _ in range(limit):
        page.keyboard.press("Tab")
        stops.append(active(page))
        if page.evaluate("(sel) => document.activeElement.matches(sel)", target):
            return
        still_on_start = page.evaluate("(el) => document.activeElement === el", start)
        allowed = any(
            page.evaluate("(sel) => document.activeElement.matches(sel)", sel) for sel in passing
        )
        assert still_on_start or allowed, f"Tab went to {stops[-1]} on the way to {target}: {stops}"
    raise AssertionError(f"{target} not reached after {limit} Tab presses: {stops}")


def tab_from_top_to(page: Any, target: str, limit: int = 60) -> list[dict[str, str]]:
    """Press Tab from the top of the page until ``target`` has focus; return the stops."""
    stops: list[dict[str, str]] = []
    for _ in range(limit):
        page.keyboard.press("Tab")
        stops.append(active(page))
        if page.evaluate("(sel) => document.activeElement.matches(sel)", target):
            return stops
    raise AssertionError(f"{target} not reached after {limit} Tab presses: {stops}")


def date_field_order(page: Any) -> str:
    """How this browser lays out ``<input type=date>``: 'dmy' or 'mdy' (found by typing).

    Chromium draws the segments in its own UI language, not the context's locale nor the
    page's ``lang``, so the order of the digits to type is found by experiment on a scratch page.
    """
    lang = page.evaluate("() => document.documentElement.lang") or "en"
    scratch = page.context.new_page()
    try:
        scratch.set_content(f'<html lang="{lang}"><body><input type="date" id="d"></body></html>')
        scratch.focus("#d")
        scratch.keyboard.type("01022000")
        value = scratch.input_value("#d")
    finally:
        scratch.close()
    orders = {"2000-02-01": "dmy", "2000-01-02": "mdy"}
    assert value in orders, f"unexpected date input layout: typing 01022000 gave {value!r}"
    return orders[value]


def date_keys(day: date, order: str) -> str:
    parts = {"d": f"{day.day:02d}", "m": f"{day.month:02d}", "y": f"{day.year:04d}"}
    return "".join(parts[c] for c in order)


def run_axe(page: Any, output_dir: Path, name: str) -> None:
    """Run axe-core on the page; fail on serious or critical violations, readably."""
    from axe_playwright_python.sync_playwright import Axe

    results = Axe().run(page)
    violations = results.response["violations"]
    (output_dir / f"{name}-axe.json").write_text(
        json.dumps(violations, indent=2, ensure_ascii=False), encoding="utf-8"
    )
    page.screenshot(path=str(output_dir / f"{name}.png"), full_page=True)
    for violation in violations:  # shown with -s or on failure, including minor ones
        print(f"axe {name}: {violation['id']} ({violation['impact']}): {violation['help']}")
    blocking = [v for v in violations if v["impact"] in BLOCKING_IMPACTS]
    assert not blocking, f"axe found serious violations on {page.url}:\n" + format_violations(
        blocking
    )


def format_violations(violations: list[dict[str, Any]]) -> str:
    lines: list[str] = []
    for violation in violations:
        lines.append(
            f"- {violation['id']} ({violation['impact']}): {violation['help']}"
            f" <{violation['helpUrl']}>"
        )
        for node in violation["nodes"]:
            lines.append(f"    at {' '.join(map(str, node['target']))}")
            lines.append(f"       {node['html'][:300]}")
            for summary_line in (node.get("failureSummary") or "").splitlines():
                lines.append(f"       {summary_line}")
    return "\n".join(lines)


def submit_with_enter(page: Any) -> Any:
    """Press Enter on the focused submit button; return the POST's response."""
    with (
        page.expect_navigation(),
        page.expect_response(lambda r: r.request.method == "POST") as response_info,
    ):
        page.keyboard.press("Enter")
    return response_info.value


def fail_submission_from_keyboard(page: Any) -> Any:
    # The form's own Send button (the header's language switch is a submit button too).
    tab_from_top_to(page, "form button[type=submit]")
    return submit_with_enter(page)


def open_request_phi(app: Flask, reference: str) -> tuple[Any, dict[str, Any], list[Any]]:
    from intake.crypto.phi import SealedPHI, WrappedKey, open_phi
    from intake.extensions import db
    from intake.models import ConsentAcceptance, Request

    with app.app_context():
        row = db.session.execute(db.select(Request).filter_by(reference=reference)).scalar_one()
        assert row.kek_id and row.wrapped_key
        document = open_phi(
            app.extensions["intake.keyring"],
            row.id,
            SealedPHI(WrappedKey(row.kek_id, row.wrapped_key), row.phi),
        )
        consents = (
            db.session.execute(db.select(ConsentAcceptance).filter_by(request_id=row.id))
            .scalars()
            .all()
        )
        db.session.expunge_all()
        return row, document, list(consents)


# -- tests ----------------------------------------------------------------------------------


@SPANISH
def test_spanish_refill_form_by_keyboard_only(
    page: Any, live_server: str, app: Flask, output_dir: Path
) -> None:
    page.goto(f"{live_server}/refill?lang=es")
    assert page.evaluate("() => document.documentElement.lang") == "es"
    assert page.evaluate("() => navigator.language") == "es-MX"
    heading = page.locator("h1").inner_text().strip()
    assert heading == spanish(app, lazy_gettext("Request a prescription refill"))
    order = date_field_order(page)
    print(f"date inputs take their digits in the order {order}")

    # From the top of the page: the skip link comes first and takes focus into <main>.
    page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.matches('a.skip-link')")
    page.keyboard.press("Enter")
    assert active(page)["id"] == "main"
    page.keyboard.press("Tab")
    assert active(page)["id"] == "first_name"
    page.keyboard.type("María")

    press_tab_to(page, "#last_name")
    page.keyboard.type("Núñez-Ortiz")

    press_tab_to(page, "#date_of_birth")
    born = date(1980, 3, 15)
    page.keyboard.type(date_keys(born, order))
    assert page.input_value("#date_of_birth") == "1980-03-15"

    press_tab_to(page, "#phone")
    page.keyboard.type("(202) 555-0143")
    press_tab_to(page, "#email")
    page.keyboard.type("maria@example.com")

    # A radio group is one tab stop, on the checked radio; arrows move and check.
    press_tab_to(page, "#contact_method-0")
    assert page.is_checked("#contact_method-0")  # "phone" is the default
    page.keyboard.press("ArrowDown")
    assert active(page)["id"] == "contact_method-1"
    assert page.is_checked("#contact_method-1")  # sms

    press_tab_to(page, "#rx_numbers")
    page.keyboard.type("1234567")
    page.keyboard.press("Enter")
    page.keyboard.type("7654321")
    press_tab_to(page, "#medication")
    page.keyboard.type("Inmunoglobulina")

    press_tab_to(page, "#location")
    page.keyboard.press("ArrowDown")  # "Elija una ubicación" -> main
    page.keyboard.press("ArrowDown")  # -> north
    assert page.input_value("#location") == "north"

    press_tab_to(page, "#fulfillment-0")
    assert page.is_checked("#fulfillment-0")  # pickup is the default
    page.keyboard.press("ArrowDown")
    assert page.is_checked("#fulfillment-1")  # local delivery

    press_tab_to(page, "#address")
    page.keyboard.type("100 Calle Principal")
    page.keyboard.press("Enter")
    page.keyboard.type("Depto. 4")

    press_tab_to(page, "#needed_by")
    needed_by = date.today() + timedelta(days=14)
    page.keyboard.type(date_keys(needed_by, order))
    assert page.input_value("#needed_by") == needed_by.isoformat()

    press_tab_to(page, "#notes")
    page.keyboard.type("Por favor llamen después de las 3.")

    # "I need an interpreter", then the language: the first on the list, Spanish.
    press_tab_to(page, "#interpreter")
    page.keyboard.press("Space")
    assert page.is_checked("#interpreter")
    press_tab_to(page, "#interpreter_language")
    page.keyboard.press("ArrowDown")
    assert page.input_value("#interpreter_language") == "es"

    # Each consent has a "read the full text" disclosure before its checkbox.
    press_tab_to(page, "#consent_privacy", passing=("details.consent__text > summary",))
    page.keyboard.press("Space")
    assert page.is_checked("#consent_privacy")
    press_tab_to(page, "#consent_contact", passing=("details.consent__text > summary",))
    page.keyboard.press("Space")
    assert page.is_checked("#consent_contact")

    press_tab_to(page, "form button[type=submit]")
    page.screenshot(path=str(output_dir / "filled-form.png"), full_page=True)
    response = submit_with_enter(page)
    assert response.status == 303, response.status

    page.wait_for_url(THANKS_URL_RE)
    match = THANKS_URL_RE.search(page.url)
    assert match, page.url
    reference = page.locator("#reference").inner_text().strip()
    assert REFERENCE_RE.match(reference), reference
    assert reference == match.group(1)
    assert page.evaluate("() => document.documentElement.lang") == "es"
    assert page.locator("h1").inner_text().strip() == spanish(
        app, lazy_gettext("We received your request")
    )
    page.screenshot(path=str(output_dir / "thanks.png"), full_page=True)

    row, document, consents = open_request_phi(app, reference)
    # A browser submits a textarea's line breaks as CRLF; whether the app keeps or folds them
    # is checked by test_textarea_filled_to_its_maxlength_is_accepted.
    document["address"] = document["address"].replace("\r\n", "\n")
    assert (row.kind, row.language, row.location, row.status) == (
        "refill",
        "es",
        "north",
        "received",
    )
    assert row.interpreter_language == "es"
    assert document == {
        "first_name": "María",
        "last_name": "Núñez-Ortiz",
        "date_of_birth": "1980-03-15",
        "phone": "+12025550143",
        "email": "maria@example.com",
        "contact_method": "sms",
        "rx_numbers": ["1234567", "7654321"],
        "medication": "Inmunoglobulina",
        "fulfillment": "delivery",
        "address": "100 Calle Principal\nDepto. 4",  # see the maxlength test for \r\n
        "needed_by": needed_by.isoformat(),
        "notes": "Por favor llamen después de las 3.",
    }
    assert sorted((c.document, c.language) for c in consents) == [
        ("contact", "es"),
        ("npp", "es"),
        ("privacy", "es"),
        ("terms", "es"),
    ]


@SPANISH
def test_spanish_empty_submission_shows_errors_by_the_fields(
    page: Any, live_server: str, app: Flask, output_dir: Path
) -> None:
    page.goto(f"{live_server}/refill?lang=es")
    response = fail_submission_from_keyboard(page)
    assert response.status == 400
    page.screenshot(path=str(output_dir / "errors.png"), full_page=True)

    assert page.evaluate("() => document.documentElement.lang") == "es"
    expected = {
        "first_name": spanish(app, patient_forms.FIRST_NAME_NEEDED),
        "last_name": spanish(app, patient_forms.LAST_NAME_NEEDED),
        "date_of_birth": spanish(app, patient_forms.DOB_NEEDED),
        "phone": spanish(app, patient_forms.PHONE_NEEDED),
        "rx_numbers": spanish(app, patient_forms.RX_NONE),
        "location": spanish(app, patient_forms.LOCATION_NEEDED),
        "consent_privacy": spanish(app, patient_forms.CONSENT_PRIVACY_NEEDED),
        "consent_contact": spanish(app, patient_forms.CONSENT_CONTACT_NEEDED),
    }
    # The summary on top lists every error, each linking to its field.
    summary = page.locator("#error-summary[role=alert]")
    assert summary.locator("a").all_inner_texts() == list(expected.values())
    assert page.evaluate("() => document.activeElement.id") == "first_name"

    invalid = page.eval_on_selector_all("form [aria-invalid=true]", "els => els.map(e => e.id)")
    assert sorted(invalid) == sorted(expected)

    for field_id, message in expected.items():
        field = page.locator(f"#{field_id}")
        assert field.get_attribute("aria-invalid") == "true"
        described_by = (field.get_attribute("aria-describedby") or "").split()
        error_id = f"{field_id}-error"
        assert error_id in described_by, (field_id, described_by)
        error = page.locator(f"#{error_id}")
        assert error.is_visible()
        assert message in error.inner_text(), (field_id, error.inner_text(), message)
        assert english(app, patient_forms.REQUIRED) not in error.inner_text()
        # "Next to the field": in the same field container, just before the control.
        assert page.evaluate(
            """([fieldId, errorId]) => {
                 const field = document.getElementById(fieldId);
                 const error = document.getElementById(errorId);
                 const box = field.closest('.field');
                 return !!box && box.contains(error) &&
                   !!(error.compareDocumentPosition(field) & Node.DOCUMENT_POSITION_FOLLOWING);
               }""",
            [field_id, error_id],
        ), field_id


AXE_PAGES = {
    "home": "/",
    "refill": "/refill",
    "contact": "/contact",
    "status": "/status",
    "thanks": "/thanks/R-7K3M-Q9P2",
}


@pytest.mark.parametrize(
    "lang",
    [pytest.param("en", id="en"), pytest.param("es", id="es", marks=SPANISH)],
)
@pytest.mark.parametrize("path", list(AXE_PAGES.values()), ids=list(AXE_PAGES))
def test_axe_finds_no_serious_violations(
    page: Any, live_server: str, output_dir: Path, path: str, lang: str
) -> None:
    page.goto(f"{live_server}{path}?lang={lang}")
    assert page.evaluate("() => document.documentElement.lang") == lang
    run_axe(page, output_dir, "page")


@pytest.mark.parametrize(
    "lang",
    [pytest.param("en", id="en"), pytest.param("es", id="es", marks=SPANISH)],
)
@pytest.mark.parametrize("kind", ["refill", "contact"])
def test_axe_finds_no_serious_violations_with_errors_shown(
    page: Any, live_server: str, output_dir: Path, kind: str, lang: str
) -> None:
    page.goto(f"{live_server}/{kind}?lang={lang}")
    response = fail_submission_from_keyboard(page)
    assert response.status == 400
    assert page.locator(".field__error").count() > 0
    run_axe(page, output_dir, "errors")


@PHONE
@pytest.mark.parametrize("lang", ["en", "es"])
def test_refill_form_fits_a_phone(page: Any, live_server: str, output_dir: Path, lang: str) -> None:
    page.goto(f"{live_server}/refill?lang={lang}")
    assert page.evaluate("() => window.innerWidth") == 390
    sizes = page.evaluate(
        "() => ({scroll: document.documentElement.scrollWidth, inner: window.innerWidth})"
    )
    page.screenshot(path=str(output_dir / "phone.png"), full_page=True)
    page.screenshot(path=str(output_dir / "phone-first-screen.png"))
    assert sizes["scroll"] <= sizes["inner"], sizes

    # With every error shown (longer texts, error borders) it must still fit.
    response = fail_submission_from_keyboard(page)
    assert response.status == 400
    sizes = page.evaluate(
        "() => ({scroll: document.documentElement.scrollWidth, inner: window.innerWidth})"
    )
    page.screenshot(path=str(output_dir / "phone-errors.png"), full_page=True)
    page.screenshot(path=str(output_dir / "phone-errors-first-screen.png"))
    assert sizes["scroll"] <= sizes["inner"], sizes


def test_textarea_filled_to_its_maxlength_is_accepted(
    page: Any, live_server: str, app: Flask, output_dir: Path
) -> None:
    """What the browser lets a patient type into a textarea, the server must accept.

    Chromium counts a line break as one character for ``maxlength`` but submits it as CRLF
    (two), so a multi-line address that exactly fits ``maxlength="300"`` arrives as 301+.
    """
    page.goto(f"{live_server}/refill?lang=en")
    page.fill("#first_name", "Maria")
    page.fill("#last_name", "Lopez")
    page.fill("#date_of_birth", "1980-03-15")
    page.fill("#phone", "(202) 555-0143")
    page.fill("#rx_numbers", "1234567")
    page.select_option("#location", "main")
    page.check("#fulfillment-2")  # ship: the address is required
    first, second = "742 Evergreen Terrace", "Springfield, OR 97403"
    limit = int(page.get_attribute("#address", "maxlength") or 0)
    assert limit == 300
    page.focus("#address")
    page.keyboard.type(first)
    page.keyboard.press("Enter")
    page.keyboard.type(second)
    page.keyboard.type("x" * (limit - len(first) - 1 - len(second)) + "overflow")
    typed = page.input_value("#address")
    assert len(typed) == limit  # the browser stopped the patient at maxlength
    assert page.evaluate("() => document.getElementById('address').validity.valid")
    page.check("#consent_privacy")
    page.check("#consent_contact")
    page.focus("form button[type=submit]")
    response = submit_with_enter(page)
    page.screenshot(path=str(output_dir / "after-submit.png"), full_page=True)
    errors = page.locator(".field__error").all_inner_texts()
    assert response.status == 303, f"the server refused what the browser allowed: {errors}"

    reference = page.locator("#reference").inner_text().strip()
    _row, document, _consents = open_request_phi(app, reference)
    assert document["address"].replace("\r\n", "\n") == typed
