"""Sending a patient form in a real Chromium: no request lost, none stored twice.

The fill-time check runs on real time here (``min_fill_seconds`` of a few seconds), so the
test waits the way a patient does. Each flow runs in English and in Spanish; expected texts come
from the app's catalog. Screenshots land in ``test-output/<test name>/``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, request
from flask_babel import lazy_gettext
from playwright.sync_api import Error as PlaywrightError
from sqlalchemy import func, select

from intake.extensions import db
from intake.models import Request
from intake.patient import views as patient_views
from intake.patient.forms import CONSENT_CONTACT_NEEDED

pytestmark = pytest.mark.browser

LANGS = [
    pytest.param("en", id="en"),
    pytest.param("es", id="es", marks=pytest.mark.browser_context(locale="es-MX")),
]
THANKS = "**/thanks/R-*"


def in_language(app: Flask, message: Any, lang: str) -> str:
    with app.test_request_context(f"/?lang={lang}"):
        text = str(message)
    if lang != "en":
        with app.test_request_context("/?lang=en"):
            assert text != str(message), f"no translation for {message!r}: catalog compiled?"
    return text


def with_fill_time(app: Flask, settings: Any, seconds: float) -> None:
    app.extensions["intake.settings"] = settings.replace(min_fill_seconds=seconds)


def requests_stored(app: Flask) -> list[tuple[str, str, str]]:
    with app.app_context():
        rows = db.session.execute(select(Request.reference, Request.kind, Request.language))
        return [tuple(row) for row in rows]  # type: ignore[misc]


def fill_refill(page: Any, *, tick_contact: bool = True) -> None:
    page.fill("#first_name", "María")
    page.fill("#last_name", "Núñez-Ortiz")
    page.fill("#date_of_birth", "1980-03-15")
    page.fill("#phone", "(202) 555-0143")
    page.fill("#rx_numbers", "1234567")
    page.fill("#medication", "Gamunex")
    page.select_option("#location", "main")
    page.check("#consent_privacy")
    if tick_contact:
        page.check("#consent_contact")


def send(page: Any) -> Any:
    """Click Send; return the POST's response once the next page has loaded."""
    with (
        page.expect_navigation(),
        page.expect_response(lambda r: r.request.method == "POST") as response,
    ):
        page.click("form button[type=submit]")
    return response.value


def wait_until(started: float, seconds: float) -> None:
    left = started + seconds - time.monotonic()
    if left > 0:
        time.sleep(left)


@pytest.mark.parametrize("lang", LANGS)
def test_a_correction_sent_at_once_is_stored_with_a_real_reference(
    page: Any, live_server: str, app: Flask, settings: Any, output_dir: Path, lang: str
) -> None:
    with_fill_time(app, settings, 2)
    page.goto(f"{live_server}/refill?lang={lang}")
    shown_at = time.monotonic()
    fill_refill(page, tick_contact=False)
    wait_until(shown_at, 2.5)  # a patient takes longer than that to fill the form
    error = send(page)
    assert error.status == 400
    assert (
        page.locator("#consent_contact-error")
        .inner_text()
        .strip()
        .endswith(in_language(app, CONSENT_CONTACT_NEEDED, lang))
    )
    corrected_at = time.monotonic()
    page.check("#consent_contact")
    response = send(page)
    # Within the fill time of the error page: today's bug would have dropped it as a bot.
    assert time.monotonic() - corrected_at < 2, "the correction was not sent quickly enough"
    page.screenshot(path=str(output_dir / "after-correction.png"), full_page=True)
    assert response.status == 303, page.locator("main").inner_text()[:500]
    page.wait_for_url(THANKS)
    reference = page.locator("#reference").inner_text().strip()
    assert page.url.endswith(f"/thanks/{reference}")
    assert requests_stored(app) == [(reference, "refill", lang)]


@pytest.mark.parametrize("lang", LANGS)
def test_a_first_post_sent_too_soon_comes_back_with_its_values(
    page: Any, live_server: str, app: Flask, settings: Any, output_dir: Path, lang: str
) -> None:
    with_fill_time(app, settings, 4)
    page.goto(f"{live_server}/refill?lang={lang}")
    shown_at = time.monotonic()
    fill_refill(page)  # as fast as autofill
    response = send(page)
    assert time.monotonic() - shown_at < 4, "the form was not sent soon enough to be too fast"
    page.screenshot(path=str(output_dir / "too-fast.png"), full_page=True)
    assert response.status == 400
    assert page.url.endswith(f"/refill?lang={lang}") or page.url.endswith("/refill")
    assert page.locator("#reference").count() == 0, "no confirmation for a request not stored"
    notice = page.locator(".notice--error[role=alert]").inner_text().strip()
    assert notice == in_language(app, patient_views.FORM_SEND_AGAIN, lang)
    assert page.input_value("#first_name") == "María"
    assert page.input_value("#date_of_birth") == "1980-03-15"
    assert page.input_value("#rx_numbers") == "1234567"
    assert page.input_value("#medication") == "Gamunex"
    assert page.input_value("#location") == "main"
    assert page.is_checked("#consent_privacy") and page.is_checked("#consent_contact")
    assert requests_stored(app) == []

    wait_until(shown_at, 4.2)  # the patient reads the message and sends it again
    again = send(page)
    assert again.status == 303
    page.wait_for_url(THANKS)
    reference = page.locator("#reference").inner_text().strip()
    assert requests_stored(app) == [(reference, "refill", lang)]


@pytest.mark.parametrize("lang", LANGS)
def test_a_filled_honeypot_stores_nothing_and_no_person_meets_it(
    page: Any, live_server: str, app: Flask, settings: Any, lang: str
) -> None:
    with_fill_time(app, settings, 1)
    page.goto(f"{live_server}/refill?lang={lang}")
    trap = page.locator("[name=extra_comments]")
    assert trap.count() == 1 and not trap.is_visible()
    assert trap.get_attribute("autocomplete") == "off"
    label = in_language(app, lazy_gettext("Leave this field empty"), lang)
    assert label not in page.locator("body").inner_text()
    # Not in the accessibility tree, so no screen reader announces it.
    assert label not in (page.locator("form").aria_snapshot() or "")
    # Tabbing from the last field before it goes on to a real control, never into the trap.
    page.focus("#first_name")
    for _ in range(40):
        page.keyboard.press("Tab")
        assert page.evaluate("() => document.activeElement.name") != "extra_comments"

    fill_refill(page)
    page.evaluate("() => { document.querySelector('[name=extra_comments]').value = 'cheap' }")
    time.sleep(1.2)
    response = send(page)
    assert response.status == 200  # the decoy: a bot learns nothing
    assert page.locator("#reference").count() == 1
    assert requests_stored(app) == []


@pytest.mark.parametrize("lang", LANGS)
def test_a_double_click_on_send_stores_one_request(
    page: Any, live_server: str, app: Flask, settings: Any, output_dir: Path, lang: str
) -> None:
    with_fill_time(app, settings, 2)

    # A slow network or a busy server: the first answer is still on its way when the second
    # click lands, so the browser really sends the form twice.
    @app.before_request
    def slow_submissions() -> None:
        if request.method == "POST" and request.path == "/refill":
            time.sleep(0.8)

    posts: list[str] = []
    page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
    page.goto(f"{live_server}/refill?lang={lang}")
    shown_at = time.monotonic()
    fill_refill(page)
    wait_until(shown_at, 2.5)
    # Two clicks as far apart as a person's double click: Playwright's dblclick fires both at
    # the same moment, and Chromium folds those into one submission.
    button = page.locator("form button[type=submit]")
    button.scroll_into_view_if_needed()
    box = button.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.click(x, y)
    time.sleep(0.15)
    page.mouse.click(x, y)
    try:
        page.wait_for_url(THANKS, timeout=15_000)
    except PlaywrightError as error:
        # The second click aborts the first navigation; the second one lands on the thanks page.
        if "ERR_ABORTED" not in str(error):
            raise
        page.wait_for_url(THANKS, timeout=15_000)
    page.wait_for_load_state("load")
    time.sleep(1)  # let the server finish the request the browser gave up on
    page.screenshot(path=str(output_dir / "after-double-click.png"), full_page=True)
    assert len(posts) == 2, f"the browser sent {len(posts)} POSTs: the test did not double-send"
    reference = page.locator("#reference").inner_text().strip()
    assert requests_stored(app) == [(reference, "refill", lang)]
    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(Request)) == 1


PHONE = {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True}


@pytest.mark.parametrize(
    "lang",
    [
        pytest.param("en", id="en"),
        pytest.param(
            "es", id="es-phone", marks=pytest.mark.browser_context(locale="es-MX", **PHONE)
        ),
    ],
)
def test_the_status_answer_reads_well_and_passes_axe(
    page: Any, live_server: str, app: Flask, output_dir: Path, lang: str
) -> None:
    from tests.browser.test_patient_forms import run_axe
    from tests.conftest import Patient, reference_from

    reference = reference_from(Patient(app.test_client()).contact(topic="specialist"))
    with app.app_context():
        row = db.session.execute(select(Request).filter_by(reference=reference)).scalar_one()
        row.status = "waiting_on_patient"
        db.session.commit()
    page.goto(f"{live_server}/status?lang={lang}")
    page.fill("#reference", reference.lower().replace("-", " "))
    page.fill("#date_of_birth", "1962-07-04")
    assert send(page).status == 200
    answer = page.locator("[data-status=waiting_on_patient]")
    assert answer.is_visible()
    assert in_language(app, patient_views.NEXT_STEP["waiting_on_patient"], lang) in (
        answer.inner_text()
    )
    # A warning's colour, not success's.
    colour = answer.evaluate("e => getComputedStyle(e).borderTopColor")
    success = page.evaluate(
        "() => { const p = document.createElement('div'); p.className = 'panel panel--success';"
        " document.body.append(p); const c = getComputedStyle(p).borderTopColor; p.remove();"
        " return c; }"
    )
    assert colour != success
    sizes = page.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
    assert sizes[0] <= sizes[1], sizes
    run_axe(page, output_dir, "status-answer")
