"""The outside review's attacks (issue 11), rerun against the stack as deployed, through nginx.

Guessing one pharmacist's password from many addresses spends the account's budget, after
which even the right password and code from a new address are refused; a pasted 40,000-line
prescription field is refused at once with the app's own plain page and stores nothing.
Clients connect from loopback addresses of their own (see test_proxy_trust.py); nginx tells
gunicorn who they are.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from config import Settings
from intake.accounts.services import FREE_FAILURES
from intake.patient.views import PATIENT_FORM_MAX_BYTES
from tests.conftest import HIDDEN_RE
from tests.production.conftest import Contexts, Door, ProductionStack
from tests.production.test_https_browser import wait_like_a_person
from tests.production.test_patient_https import PHARMACY, PHONE_HREF, fill_refill, submitted_from
from tests.workers.conftest import wait_until

pytestmark = pytest.mark.postgres

BUDGET = Settings.login_account_budget  # the stack keeps INTAKE_LOGIN_ACCOUNT_BUDGET's default
WRONG = "not-the-password-at-all"
HUGE_RX = "\n".join(f"{n:07d}" for n in range(40_000))  # 320,000 bytes, every line distinct
TOO_MUCH = "That was too much to send"


def test_guessing_one_password_from_many_addresses_is_refused_after_the_budget(
    production_stack: ProductionStack,
) -> None:
    """The review's attack: a few wrong passwords from each of many addresses, so that no one
    address is ever locked or rate limited, then the right credentials from a new one."""
    stack = production_stack
    user = stack.create_staff("budget-spray")
    per_address = FREE_FAILURES - 1  # under each address's own lock and rate limit
    addresses = [f"127.0.11.{n}" for n in range(1, BUDGET // per_address + 2)]
    mark = stack.last_audit_seq()

    statuses = []
    for address in addresses:
        client = stack.client(address)
        for _ in range(per_address):
            statuses.append(client.log_in(user.username, WRONG, "000000").status)
    spent = BUDGET // per_address * per_address
    assert statuses[:spent] == [400] * spent, statuses
    assert set(statuses[spent:]) == {429}, statuses

    started = time.monotonic()
    refused = stack.client("127.0.12.1").log_in(user.username, user.password, user.otp())
    assert refused.status == 429, (refused.status, refused.text[:500])
    assert "Too many failed attempts. Try again in" in refused.text
    assert refused.header("Retry-After")
    assert time.monotonic() - started < 5
    assert stack.audit_events_after(mark, "user.login") == []
    locks = stack.query(
        "SELECT details FROM audit_events WHERE seq > :seq AND action = 'user.locked' "
        "AND actor = (SELECT 'user:' || id FROM users WHERE username = :u)",
        seq=mark,
        u=user.username,
    )
    assert any('"account"' in details for (details,) in locks), locks

    # The supervisors hear of it from the notification pool (their channel here is the log).
    worker = stack.services["notifier"]
    wait_until(
        lambda: any(
            "account_locked" in line and user.username in line
            for line in worker.log_text().splitlines()
        ),
        30,
        0.25,
        "the supervisors' alert about the locked account",
    )


def post_huge_refill(
    stack: ProductionStack, source: str, with_token: bool
) -> tuple[int, str, float]:
    client = stack.client(source)
    page = client.get("/refill")
    hidden = dict(HIDDEN_RE.findall(page.text))
    if not with_token:
        hidden.pop("csrf_token")
    fields = {
        **hidden,
        "first_name": "Bulk",
        "last_name": "Paste",
        "date_of_birth": "1970-01-01",
        "phone": "202-555-0101",
        "contact_method": "phone",
        "rx_numbers": HUGE_RX,
        "location": "main",
        "fulfillment": "pickup",
        "consent_privacy": "y",
        "consent_contact": "y",
        "website": "",
    }
    started = time.monotonic()
    answer = client.request(
        "POST",
        "/refill",
        fields,
        {"Origin": client.base_url, "Referer": client.base_url + "/refill"},
    )
    return answer.status, answer.text, time.monotonic() - started


@pytest.mark.parametrize("with_token", [True, False], ids=["with-token", "without-token"])
def test_a_40000_line_rx_field_is_refused_at_once_with_the_apps_page(
    production_stack: ProductionStack, with_token: bool
) -> None:
    stack = production_stack
    assert PATIENT_FORM_MAX_BYTES < len(HUGE_RX) < 1024 * 1024  # the app's limit, not nginx's
    source = "127.0.13.1" if with_token else "127.0.13.2"
    status, text, seconds = post_huge_refill(stack, source, with_token)
    assert status == 413, (status, text[:800])
    assert seconds < 2, f"{seconds:.1f} s to refuse it"
    # The app's plain page (the patient's language, the pharmacy's phone), not nginx's.
    assert TOO_MUCH in text and PHARMACY in text and PHONE_HREF in text
    assert "nginx" not in text.lower()
    assert submitted_from(stack, source) == []


def test_a_patient_pasting_40000_prescription_numbers_sees_a_plain_page(
    production_stack: ProductionStack, browser_pages: Contexts, door: Door, output_dir: Path
) -> None:
    from playwright.sync_api import expect

    page = browser_pages.new_page(locale="es-MX")
    page.goto(f"{door.base_url}/refill?lang=es")
    shown_at = time.monotonic()
    fill_refill(page)
    page.evaluate("(text) => { document.querySelector('#rx_numbers').value = text }", HUGE_RX)
    wait_like_a_person(shown_at)
    with (
        page.expect_navigation(),
        page.expect_response(lambda r: r.request.method == "POST") as posted,
    ):
        page.click("form#patient-form button.button[type=submit]")
    page.screenshot(path=str(output_dir / "too-much.png"), full_page=True)
    assert posted.value.status == 413
    expect(page.get_by_role("heading", level=1)).to_have_text(
        "Lo que intentó enviar era demasiado grande"
    )
    expect(page.locator(f"main a[href='{PHONE_HREF}']")).to_be_visible()
    assert PHARMACY in page.title()
    assert submitted_from(production_stack, door.source) == []


def test_a_body_over_nginxs_own_limit_gets_the_same_plain_page(
    production_stack: ProductionStack,
) -> None:
    """Over 2 MiB nginx answers itself, before Intake sees a byte: with Intake's page, in the
    patient's language, never nginx's default one."""
    stack = production_stack
    source = "127.0.13.3"
    client = stack.client(source)
    page = client.get("/refill")
    fields = {**dict(HIDDEN_RE.findall(page.text)), "notes": "x" * (3 * 1024 * 1024)}
    started = time.monotonic()
    answer = client.request(
        "POST",
        "/refill",
        fields,
        {
            "Origin": client.base_url,
            "Referer": client.base_url + "/refill",
            "Accept-Language": "es-MX,es;q=0.9",
        },
    )
    assert time.monotonic() - started < 5
    assert answer.status == 413, (answer.status, answer.text[:800])
    assert "nginx" not in answer.text.lower(), answer.text[:800]
    assert "Lo que intentó enviar era demasiado grande" in answer.text
    assert PHARMACY in answer.text and PHONE_HREF in answer.text
    assert answer.header("Content-Security-Policy")
    assert submitted_from(stack, source) == []
