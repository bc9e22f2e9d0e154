"""Patients and staff over HTTPS in a real Chromium, against the production stack as deployed.

The browser trusts the test CA through its NSS database (see ``chromium`` in conftest.py); no
certificate error is ignored, so a broken chain or name fails here as it would for a patient.
Forms keep the production minimum fill time (3 s): the tests wait like a person typing would.
Screenshots land in ``test-output/production/<test name>/``.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from html import escape
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.production.conftest import Contexts, ProductionStack, StaffUser
from tests.workers.conftest import wait_until

pytestmark = [pytest.mark.browser, pytest.mark.postgres]

THANKS_RE = re.compile(r"/thanks/([RC]-[0-9A-HJKMNP-TV-Z]{4}-[0-9A-HJKMNP-TV-Z]{4})$")
MIN_FILL_SECONDS = 3.0  # the production default of INTAKE_MIN_FILL_SECONDS
PATIENT = {
    "first_name": "Maria",
    "last_name": "Núñez-Ortiz",
    "date_of_birth": "1980-03-15",
    "phone": "(202) 555-0143",
    "email": "maria.nunez@example.com",
}
# What must never reach a log, a URL or an e-mail: the patient's data as typed and as stored.
PHI_NEEDLES = ("Núñez", "Nunez", "1980-03-15", "555-0143", "5550143", "maria.nunez")
NOTE = "Called the prescriber's office; refill approved."


def wait_like_a_person(rendered_at: float) -> None:
    """Let the form's minimum fill time pass, as it always does for a person typing."""
    time.sleep(max(0.0, rendered_at + MIN_FILL_SECONDS + 0.5 - time.monotonic()))


def fill_about_you(page: Any) -> None:
    for field, value in PATIENT.items():
        page.fill(f"#{field}", value)


def send(page: Any, button: str) -> str:
    """Click the form's send button; check the 303 to /thanks/<reference>; return the reference."""
    with page.expect_response(lambda r: r.request.method == "POST") as posted:
        page.get_by_role("button", name=button).click()
    assert posted.value.status == 303, (posted.value.status, page.content()[:2000])
    page.wait_for_url(THANKS_RE)
    reference = page.locator("#reference").inner_text().strip()
    match = THANKS_RE.search(page.url)
    assert match and match.group(1) == reference, page.url
    return reference


def team_email(stack: ProductionStack, reference: str) -> str:
    def find() -> str | None:
        for body in stack.mailbox.bodies():
            if reference in body:
                return body
        return None

    body: str = wait_until(find, 30, 0.25, f"the team e-mail about {reference}")
    return body


def assert_no_phi_anywhere(stack: ProductionStack, *texts: str) -> None:
    for path in stack.log_files():
        text = path.read_text(errors="replace")
        for needle in PHI_NEEDLES:
            assert needle not in text, f"{needle!r} in {path}"
    for text in texts:
        for needle in PHI_NEEDLES:
            assert needle not in text, needle


def log_in(page: Any, stack: ProductionStack, user: StaffUser) -> None:
    page.goto(f"{stack.base_url}/staff/login")
    page.fill("#username", user.username)
    page.fill("#password", user.password)
    page.fill("#otp", user.otp())
    with page.expect_navigation():
        page.get_by_role("button", name="Log in").click()


def test_a_refill_sent_over_https_is_worked_by_a_pharmacist(
    production_stack: ProductionStack, browser_pages: Contexts, output_dir: Any
) -> None:
    from playwright.sync_api import expect

    stack = production_stack
    patient = browser_pages.new_page()
    response = patient.goto(f"{stack.base_url}/refill")
    assert response is not None and response.status == 200
    rendered_at = time.monotonic()
    assert response.headers["strict-transport-security"].startswith("max-age=")
    assert response.request.url.startswith("https://localhost:")

    fill_about_you(patient)
    patient.check("#contact_method-1")  # sms
    patient.fill("#rx_numbers", "1234567\n7654321")
    patient.fill("#medication", "Immune globulin")
    patient.select_option("#location", "main")
    patient.check("#consent_privacy")
    patient.check("#consent_contact")
    wait_like_a_person(rendered_at)
    reference = send(patient, "Send refill request")
    assert reference.startswith("R-")
    patient.screenshot(path=str(output_dir / "thanks.png"), full_page=True)
    patient_cookies = patient.context.cookies()
    assert patient_cookies and all(c["secure"] for c in patient_cookies), patient_cookies

    # Stored, routed by the real worker, and the team told by e-mail with a link, not PHI.
    stack.wait_for_status(reference, "queued")
    [(kind, team)] = stack.query(
        "SELECT kind, team FROM requests WHERE reference = :r", r=reference
    )
    assert (kind, team) == ("refill", "refills-main")
    email = team_email(stack, reference)
    assert f"{stack.base_url}/staff/requests/{reference}" in email

    user = stack.create_staff("ana-https", teams=("refills-main",))
    staff = browser_pages.new_page()
    log_in(staff, stack, user)
    assert staff.url == f"{stack.base_url}/staff/queue"
    cookies = {c["name"]: c for c in staff.context.cookies()}
    session = cookies["__Host-intake_session"]
    assert session["secure"] and session["httpOnly"] and session["sameSite"] == "Lax"
    assert all(c["secure"] for c in cookies.values()), cookies

    staff.get_by_role("link", name=reference).click()
    expect(staff.get_by_role("heading", level=1)).to_contain_text(reference)
    expect(staff.get_by_text("Maria Núñez-Ortiz")).to_be_visible()
    expect(staff.get_by_text("1234567, 7654321")).to_be_visible()

    staff.get_by_role("button", name="Claim").click()
    expect(staff.get_by_text("You claimed this request.")).to_be_visible()
    expect(staff.locator("#assignee")).to_have_text(user.username)
    staff.get_by_label("Change status to").select_option("in_progress")
    staff.get_by_role("button", name="Change status").click()
    expect(staff.locator("#status")).to_have_text("In progress")
    staff.get_by_label("Add a note").fill(NOTE)
    staff.get_by_role("button", name="Add note").click()
    expect(staff.get_by_text("Note added.")).to_be_visible()
    expect(staff.locator("article.note")).to_contain_text(NOTE)
    staff.screenshot(path=str(output_dir / "request-worked.png"), full_page=True)

    staff.get_by_role("button", name="Log out").click()
    expect(staff.get_by_role("heading", name="Staff login")).to_be_visible()
    staff.goto(f"{stack.base_url}/staff/queue")
    expect(staff.get_by_role("heading", name="Staff login")).to_be_visible()

    [(status,)] = stack.query("SELECT status FROM requests WHERE reference = :r", r=reference)
    assert status == "in_progress"
    [(user_id,)] = stack.query("SELECT id FROM users WHERE username = :u", u=user.username)
    actions = [
        action
        for (action,) in stack.query(
            "SELECT action FROM audit_events WHERE reference = :r AND actor = :a ORDER BY seq",
            r=reference,
            a=f"user:{user_id}",
        )
    ]
    for action in ("phi.viewed", "request.claimed", "request.status_changed", "note.added"):
        assert action in actions, actions
    logins = stack.query(
        "SELECT action FROM audit_events WHERE actor = :a AND action LIKE 'user.log%' ORDER BY seq",
        a=f"user:{user_id}",
    )
    assert [a for (a,) in logins] == ["user.login", "user.logout"]
    assert_no_phi_anywhere(stack, email, staff.url, patient.url)


def test_a_contact_request_sent_over_https_is_queued_for_its_team(
    production_stack: ProductionStack, browser_pages: Contexts, output_dir: Any
) -> None:
    stack = production_stack
    page = browser_pages.new_page()
    response = page.goto(f"{stack.base_url}/contact")
    assert response is not None and response.status == 200
    rendered_at = time.monotonic()
    fill_about_you(page)
    page.fill("#callback_time", "weekdays after 3 pm")
    page.select_option("#topic", "copay")
    page.fill("#message", "My copay card was declined at the pharmacy.")
    page.check("#consent_privacy")
    wait_like_a_person(rendered_at)
    reference = send(page, "Send")
    assert reference.startswith("C-")
    page.screenshot(path=str(output_dir / "thanks.png"), full_page=True)

    stack.wait_for_status(reference, "queued")
    [(kind, topic, team)] = stack.query(
        "SELECT kind, topic, team FROM requests WHERE reference = :r", r=reference
    )
    assert (kind, topic, team) == ("contact", "copay", "benefits")
    assert_no_phi_anywhere(stack, team_email(stack, reference))


# -- another site's page posting to ours ------------------------------------------------------


class ForgingSite(ThreadingHTTPServer):
    """Another origin (plain HTTP on 127.0.0.1) whose pages post a form to Intake by script."""

    target = ""
    forms: dict[str, dict[str, str]] = {}


class ForgingPage(BaseHTTPRequestHandler):
    server: ForgingSite

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        target = self.path.removesuffix("-forged")
        fields = self.server.forms.get(target) if target != self.path else None
        if fields is None:
            self.send_error(404)
            return
        inputs = "".join(
            f'<input type="hidden" name="{escape(k)}" value="{escape(v)}">'
            for k, v in fields.items()
        )
        action = escape(self.server.target + target)
        body = (
            f'<!doctype html><html><body><form method="post" action="{action}">{inputs}'
            "</form><script>document.forms[0].submit();</script></body></html>"
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the API's name
        """Keep the test output quiet."""


@pytest.fixture
def forging_site(production_stack: ProductionStack) -> Iterator[ForgingSite]:
    server = ForgingSite(("127.0.0.1", 0), ForgingPage)
    server.target = production_stack.base_url
    server.forms = {}
    thread = threading.Thread(target=server.serve_forever, name="forging-site", daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(10)


def forged_post(page: Any, site: ForgingSite, path: str) -> Any:
    """Open the other site's page and return Intake's answer to the POST it sends."""
    host, port = site.server_address[:2]
    with page.expect_response(lambda r: r.request.method == "POST") as posted:
        page.goto(f"http://{host!s}:{port}{path}-forged")
    return posted.value


def test_a_form_posted_from_another_site_is_refused(
    production_stack: ProductionStack, browser_pages: Contexts, forging_site: ForgingSite
) -> None:
    """Another site cannot send a request in a visitor's name, nor log a browser into an
    account of its choosing (login CSRF), even with that account's real password and code."""
    from playwright.sync_api import expect

    stack = production_stack
    mallory = stack.create_staff("mallory-https", teams=("refills-main",))
    forging_site.forms = {
        "/contact": {
            "first_name": "Forged",
            "last_name": "Visitor",
            "phone": "202-555-0199",
            "contact_method": "phone",
            "topic": "question",
            "message": "sent by another site",
            "consent_privacy": "y",
            "website": "",
        },
        "/staff/login": {
            "username": mallory.username,
            "password": mallory.password,
            "otp": mallory.otp(),
        },
    }
    page = browser_pages.new_page()
    # The visitor has been on the pharmacy's site before: a session cookie exists.
    page.goto(f"{stack.base_url}/contact")
    requests_before = stack.query("SELECT count(*) FROM requests")[0][0]
    mark = stack.last_audit_seq()

    answer = forged_post(page, forging_site, "/contact")
    assert answer.status == 400
    assert answer.request.all_headers().get("sec-fetch-site") == "cross-site"
    expect(page.get_by_role("heading", level=1)).to_have_text(
        "Something was wrong with that request"
    )
    assert stack.query("SELECT count(*) FROM requests")[0][0] == requests_before

    answer = forged_post(page, forging_site, "/staff/login")
    assert answer.status == 400
    page.goto(f"{stack.base_url}/staff/queue")
    expect(page.get_by_role("heading", name="Staff login")).to_be_visible()
    assert stack.audit_events_after(mark, "user.login") == []
    assert stack.audit_events_after(mark, "request.submitted") == []


@pytest.mark.parametrize("opaque", ["data: URL", "file: URL", "sandboxed iframe"])
def test_a_form_from_an_opaque_origin_is_refused(
    production_stack: ProductionStack, browser_pages: Contexts, tmp_path: Any, opaque: str
) -> None:
    """Pages with an opaque origin send ``Origin: null``, as our own pages do under
    ``Referrer-Policy: no-referrer``; Intake accepts ``null`` only from browsers without fetch
    metadata. Chromium labels these posts ``Sec-Fetch-Site: cross-site``, so they are refused
    before the token is looked at, like any other site's."""
    from urllib.parse import quote

    stack = production_stack
    form = (
        f'<form method="post" action="{escape(stack.base_url)}/contact">'
        '<input type="hidden" name="first_name" value="Forged"></form>'
        # After a moment, so Playwright has attached to the (out-of-process) frame first.
        "<script>setTimeout(() => document.forms[0].submit(), 300);</script>"
    )
    if opaque == "data: URL":
        url = "data:text/html," + quote(form)
    else:
        page_file = tmp_path / "forged.html"
        if opaque == "sandboxed iframe":
            form = f'<iframe sandbox="allow-forms allow-scripts" srcdoc="{escape(form)}"></iframe>'
        page_file.write_text(form)
        url = page_file.as_uri()
    page = browser_pages.new_page()
    page.goto(f"{stack.base_url}/contact")  # a session cookie exists
    requests_before = stack.query("SELECT count(*) FROM requests")[0][0]
    # The request, then its answer: a sandboxed frame's answer may come after goto returns.
    with page.expect_request(lambda r: r.method == "POST") as posted:
        page.goto(url)
    sent = posted.value.all_headers()
    assert (sent.get("origin"), sent.get("sec-fetch-site")) == ("null", "cross-site")
    answer = posted.value.response()
    assert answer is not None and answer.status == 400
    assert stack.query("SELECT count(*) FROM requests")[0][0] == requests_before
