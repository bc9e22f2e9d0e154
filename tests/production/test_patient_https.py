"""What a patient notices, in Chromium over https through nginx, on the production stack.

Each test that sends a form has a browser of its own client address (``door``), so the
submission rate limit of one test never meets another's, and "nothing was stored" is checked
as "no ``request.submitted`` came from this address". Requests are found by reference.
Expected texts are the app's English messages and, for Spanish, their translation in the
compiled catalog, so a missing translation fails here as a patient would see it.
Screenshots land in ``test-output/production/<test name>/``.
"""

from __future__ import annotations

import re
import time
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from babel.support import Translations

from tests.conftest import HIDDEN_RE
from tests.production.conftest import Contexts, Door, ProductionStack, WebClient
from tests.production.test_https_browser import MIN_FILL_SECONDS, wait_like_a_person

pytestmark = [pytest.mark.browser, pytest.mark.postgres]

ROOT = Path(__file__).parents[2]
CATALOG = Translations.load(str(ROOT / "intake" / "translations"), ["es"])
PHARMACY = "Riverbend Specialty Pharmacy"  # config/pharmacy.toml, which the stack uses
PHONE_HREF = "tel:+18005550142"
PHONE_DISPLAY = "(800) 555-0142"
THANKS_RE = re.compile(r"/thanks/([RC]-[0-9A-HJKMNP-TV-Z]{4}-[0-9A-HJKMNP-TV-Z]{4})$")
LANGS = ["en", "es"]
SPANISH = {"locale": "es-MX"}
PHONE_SIZED = {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True}


def say(message: str, lang: str, **values: Any) -> str:
    """``message`` as the page in ``lang`` shows it."""
    text = message
    if lang == "es":
        text = CATALOG.gettext(message)
        assert text != message, f"no Spanish for {message!r}: catalog compiled?"
    return text % values if values else text


def context_for(lang: str) -> dict[str, Any]:
    return SPANISH if lang == "es" else {}


def submitted_from(stack: ProductionStack, source: str) -> list[str]:
    """References of the requests stored for a client at ``source`` (the audit trail's view)."""
    rows = stack.query(
        "SELECT reference FROM audit_events WHERE action = 'request.submitted' "
        "AND ip_hmac = :ip ORDER BY seq",
        ip=stack.ip_pseudonym(source),
    )
    return [reference for (reference,) in rows]


def send(page: Any) -> Any:
    """Click the form's own Send button; return the POST's answer once the next page loaded."""
    with (
        page.expect_navigation(),
        page.expect_response(lambda r: r.request.method == "POST") as posted,
    ):
        page.click("form#patient-form button.button[type=submit], form.form button[type=submit]")
    return posted.value


def reference_on(page: Any) -> str:
    page.wait_for_url(THANKS_RE)
    reference = str(page.locator("#reference").inner_text()).strip()
    match = THANKS_RE.search(page.url)
    assert match and match.group(1) == reference, (page.url, reference)
    return reference


def fill_refill(page: Any, *, tick_contact: bool = True) -> None:
    page.fill("#first_name", "María")
    page.fill("#last_name", "Núñez-Ortiz")
    page.fill("#date_of_birth", "1980-03-15")
    page.fill("#phone", "(202) 555-0143")
    page.fill("#rx_numbers", "1234567\n7654321")
    page.fill("#medication", "Gamunex")
    page.select_option("#location", "main")
    page.check("#consent_privacy")
    if tick_contact:
        page.check("#consent_contact")


def fill_contact(page: Any, message: str) -> None:
    page.fill("#first_name", "Ana")
    page.fill("#last_name", "Ruiz")
    page.fill("#date_of_birth", "1975-06-01")
    page.fill("#phone", "202-555-0178")
    page.fill("#message", message)
    page.check("#consent_privacy")


# -- keyboard helpers (as in tests/browser/test_patient_forms.py, which this suite cannot import:
# its marks are registered only when tests/browser runs) ----------------------------------------


def focused(page: Any) -> str:
    return str(
        page.evaluate(
            "() => document.activeElement ? document.activeElement.outerHTML.slice(0, 120) : ''"
        )
    )


def press_tab_to(page: Any, target: str, *, passing: tuple[str, ...] = (), limit: int = 8) -> None:
    """Press Tab until ``target`` has focus; on the way focus may only stay on the element it
    starts from (a date input's segments) or rest on elements matching ``passing``."""
    start = page.evaluate_handle("() => document.activeElement")
    stops: list[str] = []
    for _ in range(limit):
        page.keyboard.press("Tab")
        stops.append(focused(page))
        if page.evaluate("(sel) => document.activeElement.matches(sel)", target):
            return
        on_start = page.evaluate("(el) => document.activeElement === el", start)
        allowed = any(
            page.evaluate("(sel) => document.activeElement.matches(sel)", sel) for sel in passing
        )
        assert on_start or allowed, f"Tab went to {stops[-1]} on the way to {target}: {stops}"
    raise AssertionError(f"{target} not reached after {limit} Tab presses: {stops}")


def date_field_order(page: Any) -> str:
    """'dmy' or 'mdy': the order this Chromium takes a date input's digits in (by experiment)."""
    scratch = page.context.new_page()
    try:
        scratch.set_content('<html><body><input type="date" id="d"></body></html>')
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


# -- who the pharmacy is, on every page ---------------------------------------------------------

PATIENT_PAGES = {
    "/": 200,
    "/refill": 200,
    "/contact": 200,
    "/status": 200,
    "/thanks/R-7K3M-Q9P2": 200,
    "/legal/terms": 200,
    "/nowhere": 404,
}


@pytest.mark.parametrize("lang", LANGS)
def test_every_patient_page_names_the_pharmacy_its_phone_and_free_language_help(
    production_stack: ProductionStack, browser_pages: Contexts, output_dir: Path, lang: str
) -> None:
    from playwright.sync_api import expect

    page = browser_pages.new_page(**context_for(lang))
    for path, status in PATIENT_PAGES.items():
        answer = page.goto(f"{production_stack.base_url}{path}?lang={lang}")
        assert answer is not None and answer.status == status, (path, answer and answer.status)
        assert page.evaluate("() => document.documentElement.lang") == lang, path
        assert PHARMACY in page.title(), (path, page.title())
        expect(page.locator("header .brand")).to_have_text(PHARMACY)
        header_call = page.locator(f"header a[href='{PHONE_HREF}']")
        expect(header_call).to_contain_text(PHONE_DISPLAY)
        expect(header_call).to_contain_text(say("Call", lang))
        # Section 1557: the notice, with tap-to-call numbers, in the page's language and others.
        notice = page.locator("section.language-assistance")
        expect(notice.get_by_role("heading")).to_have_text(say("Free language assistance", lang))
        for tag, words in (("en", "ATTENTION: If you speak English"), ("es", "ATENCIÓN")):
            line = notice.locator(f"li[lang='{tag}']")
            expect(line).to_contain_text(words)
            expect(line.locator(f"a[href='{PHONE_HREF}']")).to_have_text(PHONE_DISPLAY)
        name = path.strip("/").replace("/", "-") or "home"
        page.screenshot(path=str(output_dir / f"{name}.png"), full_page=True)
    expect(page.get_by_role("heading", level=1)).to_have_text(say("Page not found", lang))


@pytest.mark.parametrize("lang", LANGS)
def test_the_landing_pages_calls_to_action_choose_the_topic(
    production_stack: ProductionStack, browser_pages: Contexts, lang: str
) -> None:
    from playwright.sync_api import expect

    page = browser_pages.new_page(**context_for(lang))
    for label, topic in (
        ("Get copay assistance: start here", "copay"),
        ("Talk to an IVIG specialist", "specialist"),
    ):
        page.goto(f"{production_stack.base_url}/?lang={lang}")
        expect(
            page.get_by_role("link", name=say("Call for free IVIG information", lang))
        ).to_have_attribute("href", PHONE_HREF)
        with page.expect_navigation():
            page.get_by_role("link", name=say(label, lang)).click()
        assert page.url.startswith(f"{production_stack.base_url}/contact"), page.url
        expect(page.locator("#topic")).to_have_value(topic)


# -- no request lost, none stored twice, none stored for a bot ----------------------------------


@pytest.mark.parametrize("lang", LANGS)
def test_a_correction_sent_at_once_is_stored_and_routed(
    production_stack: ProductionStack, browser_pages: Contexts, door: Door, lang: str
) -> None:
    stack = production_stack
    page = browser_pages.new_page(**context_for(lang))
    page.goto(f"{door.base_url}/refill?lang={lang}")
    shown_at = time.monotonic()
    fill_refill(page, tick_contact=False)
    wait_like_a_person(shown_at)
    assert send(page).status == 400
    error = page.locator("#consent_contact-error").inner_text().strip()
    assert error.endswith(say("Agree to be contacted about this request to send it.", lang))
    corrected_at = time.monotonic()
    page.check("#consent_contact")
    answer = send(page)
    # Sent within the minimum fill time of the page with the error: not taken for a bot.
    assert time.monotonic() - corrected_at < MIN_FILL_SECONDS
    assert answer.status == 303, page.locator("main").inner_text()[:500]
    reference = reference_on(page)
    assert reference.startswith("R-")
    stack.wait_for_status(reference, "queued")  # routed by the real worker
    [(kind, language, team)] = stack.query(
        "SELECT kind, language, team FROM requests WHERE reference = :r", r=reference
    )
    assert (kind, language) == ("refill", lang)
    assert team  # which team is config/routing.toml's business (Spanish may go elsewhere)
    assert submitted_from(stack, door.source) == [reference]


def test_a_double_click_on_send_over_a_slow_network_stores_one_request(
    production_stack: ProductionStack, browser_pages: Contexts, door: Door, output_dir: Path
) -> None:
    stack = production_stack
    page = browser_pages.new_page()
    posts: list[str] = []
    page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
    page.goto(f"{door.base_url}/refill")
    shown_at = time.monotonic()
    fill_refill(page)
    wait_like_a_person(shown_at)
    button = page.locator("form#patient-form button.button[type=submit]")
    button.scroll_into_view_if_needed()
    box = button.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    # The answer to the first click is still on its way when the second click lands.
    door.relay.response_delay = 1.0
    page.mouse.click(x, y)
    time.sleep(0.15)
    page.mouse.click(x, y)
    # The second click aborts the first navigation (net::ERR_ABORTED), so wait for where the
    # page ends up rather than for one navigation to finish.
    from playwright.sync_api import expect

    expect(page).to_have_url(THANKS_RE, timeout=20_000)
    door.relay.response_delay = 0.0
    page.wait_for_load_state("load")
    reference = reference_on(page)
    page.screenshot(path=str(output_dir / "after-double-click.png"), full_page=True)
    assert len(posts) == 2, f"the browser sent {len(posts)} POSTs: the test did not double-send"
    # The server finishes the POST the browser gave up on; still only one request.
    time.sleep(1.5)
    assert submitted_from(stack, door.source) == [reference]
    stack.wait_for_status(reference, "queued")


@pytest.mark.parametrize("lang", LANGS)
def test_a_filled_honeypot_gets_a_decoy_and_stores_nothing(
    production_stack: ProductionStack, browser_pages: Contexts, door: Door, lang: str
) -> None:
    stack = production_stack
    page = browser_pages.new_page(**context_for(lang))
    page.goto(f"{door.base_url}/refill?lang={lang}")
    shown_at = time.monotonic()
    trap = page.locator("[name=extra_comments]")
    assert trap.count() == 1 and not trap.is_visible()
    assert say("Leave this field empty", lang) not in page.locator("body").inner_text()
    fill_refill(page)
    page.evaluate("() => { document.querySelector('[name=extra_comments]').value = 'cheap' }")
    wait_like_a_person(shown_at)
    answer = send(page)
    assert answer.status == 200  # the decoy: a bot learns nothing
    decoy = page.locator("#reference").inner_text().strip()
    assert decoy.startswith("R-")
    assert stack.request_status(decoy) is None
    assert submitted_from(stack, door.source) == []


def test_switching_language_mid_form_keeps_what_was_typed_and_sends_nothing(
    production_stack: ProductionStack, browser_pages: Contexts, door: Door, output_dir: Path
) -> None:
    stack = production_stack
    page = browser_pages.new_page()
    page.goto(f"{door.base_url}/refill?lang=en")
    fill_refill(page, tick_contact=False)
    page.check("#fulfillment-2")  # ship
    page.fill("#address", "100 Calle Principal")
    fields = ("#first_name", "#last_name", "#date_of_birth", "#phone", "#medication", "#address")
    before = [page.input_value(field) for field in fields]
    for lang in ("es", "en"):
        with page.expect_navigation():
            page.click("header button.lang-switch")
        assert page.url == f"{door.base_url}/refill"  # a POST: nothing typed is in the address
        assert page.evaluate("() => document.documentElement.lang") == lang
        assert [page.input_value(field) for field in fields] == before
        assert page.input_value("#rx_numbers").replace("\r\n", "\n") == "1234567\n7654321"
        assert page.input_value("#location") == "main"
        assert page.is_checked("#fulfillment-2") and page.is_checked("#consent_privacy")
        assert page.locator(".field__error").count() == 0  # not validated, not sent
        page.screenshot(path=str(output_dir / f"switched-{lang}.png"), full_page=True)
    assert submitted_from(stack, door.source) == []


# -- after sending: the thanks page and the status look-up --------------------------------------


def test_the_thanks_page_tells_a_side_effect_reporter_what_happens_next(
    production_stack: ProductionStack, browser_pages: Contexts, door: Door, output_dir: Path
) -> None:
    from playwright.sync_api import expect

    stack = production_stack
    page = browser_pages.new_page()
    page.goto(f"{door.base_url}/contact?topic=side_effect")
    shown_at = time.monotonic()
    expect(page.locator("#topic")).to_have_value("side_effect")
    fill_contact(page, "I have a headache after the infusion.")
    wait_like_a_person(shown_at)
    assert send(page).status == 303
    reference = reference_on(page)
    page.screenshot(path=str(output_dir / "thanks.png"), full_page=True)
    main = page.locator("main")
    expect(main.get_by_role("heading", name="What happens next")).to_be_visible()
    expect(main).to_contain_text("We treat your report as urgent.")
    expect(main).to_contain_text("A pharmacist will call you within 1 hour, by about ")
    expect(main).to_contain_text("call 911 now")
    expect(main.locator(f"a[href='{PHONE_HREF}']").first).to_have_text(PHONE_DISPLAY)
    expect(page.locator("#received-at")).to_contain_text("Central Time")
    summary = page.locator("dl.summary")
    expect(summary).to_contain_text("Contact request")
    expect(summary).to_contain_text("Report a side effect")
    expect(summary).to_contain_text("Phone call")
    text = main.inner_text()
    assert "Ana" not in text and "Ruiz" not in text and "headache" not in text
    expect(page.locator("button[data-print]")).to_be_visible()

    stack.wait_for_status(reference, "queued")
    [(team, priority)] = stack.query(
        "SELECT team, priority FROM requests WHERE reference = :r", r=reference
    )
    assert (team, priority) == ("clinical", "urgent")


def send_like_a_person(client: WebClient, paths: dict[str, dict[str, str]]) -> dict[str, str]:
    """GET each form, wait as a person filling them would, POST each; return the references."""
    forms = {}
    for path in paths:
        page = client.get(path)
        assert page.status == 200
        forms[path] = dict(HIDDEN_RE.findall(page.text))
    time.sleep(MIN_FILL_SECONDS + 0.5)
    references = {}
    for path, fields in paths.items():
        answer = client.request(
            "POST",
            path,
            {**forms[path], **fields},
            {"Origin": client.base_url, "Referer": client.base_url + path},
        )
        assert answer.status == 303, (path, answer.status, answer.text[:800])
        match = THANKS_RE.search(answer.header("Location") or "")
        assert match, answer.header("Location")
        references[path] = match.group(1)
    return references


PATIENT_FIELDS = {
    "first_name": "Rosa",
    "last_name": "Delgado",
    "date_of_birth": "1962-07-04",
    "phone": "202-555-0112",
    "contact_method": "phone",
    "consent_privacy": "y",
    "website": "",
}


def test_the_status_page_answers_for_a_refill_and_a_contact_request_in_both_languages(
    production_stack: ProductionStack, browser_pages: Contexts, door: Door
) -> None:
    from playwright.sync_api import expect

    stack = production_stack
    sender = stack.client(door.source)  # the patient's own computer, sending both requests
    references = send_like_a_person(
        sender,
        {
            "/refill": {
                **PATIENT_FIELDS,
                "rx_numbers": "1234567",
                "location": "main",
                "fulfillment": "pickup",
                "consent_contact": "y",
            },
            "/contact": {**PATIENT_FIELDS, "topic": "copay", "message": "Copay card declined."},
        },
    )
    for reference in references.values():
        stack.wait_for_status(reference, "queued")

    for (path, reference), lang in zip(
        [*references.items(), *references.items()], ["en", "en", "es", "es"], strict=True
    ):
        page = browser_pages.new_page(**context_for(lang))
        page.goto(f"{door.base_url}/status?lang={lang}")
        page.fill("#reference", reference.lower().replace("-", " "))  # as read over the phone
        page.fill("#date_of_birth", "1962-07-04")
        assert send(page).status == 200
        answer = page.locator("section.status-answer")
        expect(answer).to_have_attribute("data-status", "received")
        expect(answer.get_by_role("heading", level=2)).to_have_text(
            say("We have your request. It is waiting for a member of our team.", lang)
        )
        expect(answer).to_contain_text(reference)
        kind = "Prescription refill" if path == "/refill" else "Request to contact you"
        expect(page.locator("#status-kind")).to_contain_text(say(kind, lang))
        if path == "/contact":
            topic = "Help paying for my medication (copay assistance)"
            expect(page.locator("#status-kind")).to_contain_text(say(topic, lang))
        expect(page.locator("#status-received")).not_to_be_empty()
        expect(page.locator("#status-next")).to_have_text(
            say("You do not need to do anything now. We will contact you the way you chose.", lang)
        )
        page.context.close()

    # The wrong birth date tells nothing about the reference.
    page = browser_pages.new_page()
    page.goto(f"{door.base_url}/status")
    page.fill("#reference", references["/refill"])
    page.fill("#date_of_birth", "1962-07-05")
    assert send(page).status == 200
    expect(page.locator("section.status-answer")).to_have_count(0)
    expect(page.get_by_role("status")).to_contain_text("We could not find a request")


# -- on a phone, by keyboard only ---------------------------------------------------------------


def test_a_refill_on_a_phone_sized_screen_by_keyboard_only(
    production_stack: ProductionStack, browser_pages: Contexts, door: Door, output_dir: Path
) -> None:
    stack = production_stack
    page = browser_pages.new_page(**PHONE_SIZED)
    page.goto(f"{door.base_url}/refill")
    shown_at = time.monotonic()
    order = date_field_order(page)
    sizes = page.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
    assert sizes[0] <= sizes[1], f"wider than the phone: {sizes}"

    page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.matches('a.skip-link')")
    page.keyboard.press("Enter")
    page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.id") == "first_name"
    page.keyboard.type("María")
    press_tab_to(page, "#last_name")
    page.keyboard.type("Núñez-Ortiz")
    press_tab_to(page, "#date_of_birth")
    page.keyboard.type(date_keys(date(1980, 3, 15), order))
    assert page.input_value("#date_of_birth") == "1980-03-15"
    press_tab_to(page, "#phone")
    page.keyboard.type("(202) 555-0143")
    press_tab_to(page, "#email")
    press_tab_to(page, "#contact_method-0")
    page.keyboard.press("ArrowDown")
    assert page.is_checked("#contact_method-1")  # sms
    press_tab_to(page, "#rx_numbers")
    page.keyboard.type("1234567")
    press_tab_to(page, "#medication")
    press_tab_to(page, "#location")
    page.keyboard.press("ArrowDown")
    assert page.input_value("#location") == "main"
    press_tab_to(page, "#fulfillment-0")
    assert page.is_checked("#fulfillment-0")  # pick-up: no address asked for
    press_tab_to(page, "#needed_by", passing=("#address",))
    press_tab_to(page, "#notes")
    press_tab_to(
        page,
        "#consent_privacy",
        passing=("#interpreter", "#interpreter_language", "details.consent__text > summary"),
    )
    page.keyboard.press("Space")
    press_tab_to(page, "#consent_contact", passing=("details.consent__text > summary",))
    page.keyboard.press("Space")
    press_tab_to(page, "form button[type=submit]")
    page.screenshot(path=str(output_dir / "filled.png"), full_page=True)
    wait_like_a_person(shown_at)
    with (
        page.expect_navigation(),
        page.expect_response(lambda r: r.request.method == "POST") as posted,
    ):
        page.keyboard.press("Enter")
    assert posted.value.status == 303, page.locator("main").inner_text()[:500]
    reference = reference_on(page)
    page.screenshot(path=str(output_dir / "thanks.png"), full_page=True)
    sizes = page.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
    assert sizes[0] <= sizes[1], f"the thanks page is wider than the phone: {sizes}"
    stack.wait_for_status(reference, "queued")
    assert submitted_from(stack, door.source) == [reference]
