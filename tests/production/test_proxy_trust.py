"""Who a client is, behind the real nginx: told apart by address, and unable to pick one.

Clients connect from loopback addresses of their own (127.0.0.2, 127.0.0.3...). Through nginx,
gunicorn sees the proxy (127.0.0.1, the one trusted address) and Intake takes the client from
the ``X-Forwarded-For`` that nginx overwrote; a client that reaches gunicorn directly is not a
proxy, so whatever ``X-Forwarded-For`` it sends is ignored. Identity shows in three places a
person would notice: the failed-login lock, the login rate limit, and the audit trail's IP
pseudonym (read with SQL, as a compliance officer's tooling would).

Each test uses its own addresses: the rate limits and locks of one must not meet another's.
"""

from __future__ import annotations

import re
import time

import pytest

from config import Settings
from intake.accounts.services import (
    FREE_FAILURES,  # the attempt after these failures finds the lock
)
from tests.conftest import HIDDEN_RE, valid_contact
from tests.production.conftest import ProductionStack, Response, WebClient
from tests.production.test_https_browser import MIN_FILL_SECONDS, team_email

pytestmark = pytest.mark.postgres

# INTAKE_LOGIN_RATE_LIMIT's default ("10/minute"), per client address: the stack keeps it.
LOGIN_RATE_LIMIT = int(Settings.login_rate_limit.split("/")[0])
LOCKED_TEXT = "Too many failed attempts"
RATE_LIMITED_TEXT = "Too many attempts"


def fail_logins(
    client: WebClient, username: str, count: int, spoof: str | None = None
) -> list[Response]:
    """``count`` logins with a wrong password; ``spoof`` makes each send a new X-Forwarded-For."""
    answers = []
    for attempt in range(count):
        headers = {"X-Forwarded-For": f"{spoof}.{attempt + 1}"} if spoof else None
        answers.append(client.log_in(username, "not-the-password-at-all", "000000", headers))
    return answers


def test_two_clients_behind_the_proxy_have_their_own_failed_login_lock(
    production_stack: ProductionStack,
):
    """An attacker guessing a pharmacist's password from one computer locks only themselves
    out: the pharmacist at another computer still logs in."""
    stack = production_stack
    user = stack.create_staff("lock-pair")
    attacker, pharmacist = stack.client("127.0.0.2"), stack.client("127.0.0.3")
    mark = stack.last_audit_seq()

    # The attacker also claims, in vain, to be someone else: nginx overwrites the header.
    answers = fail_logins(attacker, user.username, FREE_FAILURES, spoof="203.0.113")
    assert [a.status for a in answers] == [400] * FREE_FAILURES
    locked = attacker.log_in(user.username, user.password, user.otp())
    assert locked.status == 429 and LOCKED_TEXT in locked.text, (locked.status, locked.text[:300])

    logged_in = pharmacist.log_in(user.username, user.password, user.otp())
    assert logged_in.status == 303, (logged_in.status, logged_in.text[:500])
    assert logged_in.header("Location") == "/staff/queue"
    queue = pharmacist.get("/staff/queue")
    assert queue.status == 200 and "Log out" in queue.text

    failed = stack.audit_events_after(mark, "user.login_failed")
    assert len(failed) == FREE_FAILURES + 1
    assert {e.ip_hmac for e in failed} == {stack.ip_pseudonym("127.0.0.2")}
    [login] = stack.audit_events_after(mark, "user.login")
    assert login.ip_hmac == stack.ip_pseudonym("127.0.0.3")
    assert stack.ip_pseudonym("127.0.0.2") != stack.ip_pseudonym("127.0.0.3")
    forged = {stack.ip_pseudonym(f"203.0.113.{n}") for n in range(1, FREE_FAILURES + 1)}
    assert not forged & {e.ip_hmac for e in failed}


def test_two_clients_behind_the_proxy_have_their_own_login_rate_limit(
    production_stack: ProductionStack,
):
    """A flood of logins from one address is cut off at the limit; others are not."""
    stack = production_stack
    flooder, colleague = stack.client("127.0.0.4"), stack.client("127.0.0.5")
    answers = [
        flooder.log_in(f"nobody-{n}", "not-the-password-at-all", "000000")
        for n in range(LOGIN_RATE_LIMIT + 1)
    ]
    assert [a.status for a in answers[:LOGIN_RATE_LIMIT]] == [400] * LOGIN_RATE_LIMIT
    assert answers[-1].status == 429 and RATE_LIMITED_TEXT in answers[-1].text
    assert LOCKED_TEXT not in answers[-1].text  # the address limit, not an account lock

    other = colleague.log_in("nobody-else", "not-the-password-at-all", "000000")
    assert other.status == 400, other.text[:300]


def test_plain_http_to_the_proxy_is_sent_to_https(production_stack: ProductionStack):
    stack = production_stack
    answer = WebClient(stack.http_url, "127.0.0.1").get("/refill?lang=es")
    assert answer.status == 301
    assert answer.header("Location") == f"{stack.base_url}/refill?lang=es"


def test_a_client_reaching_gunicorn_directly_cannot_escape_the_failed_login_lock(
    production_stack: ProductionStack,
):
    """Skipping the proxy and sending a new X-Forwarded-For each time changes nothing: the
    attempts are counted together and audited under the client's real address."""
    stack = production_stack
    user = stack.create_staff("lock-direct")
    direct = stack.direct_client("127.0.0.6")
    mark = stack.last_audit_seq()

    answers = fail_logins(direct, user.username, FREE_FAILURES + 1, spoof="198.51.100")
    statuses = [a.status for a in answers]
    assert statuses == [400] * FREE_FAILURES + [429], statuses
    assert LOCKED_TEXT in answers[-1].text

    failed = stack.audit_events_after(mark, "user.login_failed")
    assert len(failed) == FREE_FAILURES + 1
    assert {e.ip_hmac for e in failed} == {stack.ip_pseudonym("127.0.0.6")}
    forged = {stack.ip_pseudonym(f"198.51.100.{n}") for n in range(1, FREE_FAILURES + 2)}
    assert not forged & {e.ip_hmac for e in failed}


def test_a_client_reaching_gunicorn_directly_cannot_escape_the_login_rate_limit(
    production_stack: ProductionStack,
):
    stack = production_stack
    direct = stack.direct_client("127.0.0.7")
    answers = [
        direct.log_in(
            f"nobody-{n}",
            "not-the-password-at-all",
            "000000",
            {"X-Forwarded-For": f"192.0.2.{n + 1}", "X-Forwarded-Proto": "https"},
        )
        for n in range(LOGIN_RATE_LIMIT + 1)
    ]
    statuses = [a.status for a in answers]
    assert statuses == [400] * LOGIN_RATE_LIMIT + [429], statuses
    assert RATE_LIMITED_TEXT in answers[-1].text


def test_a_forged_host_header_changes_no_link_or_redirect(production_stack: ProductionStack):
    """nginx forwards the client's Host as it came (Intake compares it with Origin), so an
    attacker may send any Host. Links in team e-mails come from INTAKE_PUBLIC_URL and
    redirects are relative, so a request with ``Host: intake.evil.example`` puts the evil name
    in neither: a pharmacist following the e-mail still lands on the real site."""
    stack = production_stack
    client = stack.client("127.0.0.8")
    forged = {"Host": "intake.evil.example", "Sec-Fetch-Site": "same-origin"}
    page = client.get("/contact", forged)
    assert page.status == 200, page.text[:300]
    time.sleep(MIN_FILL_SECONDS + 0.5)
    form = {**dict(HIDDEN_RE.findall(page.text)), **valid_contact(message="forged host")}
    answer = client.request("POST", "/contact", form, forged)
    assert answer.status == 303, answer.text[:300]
    location = answer.header("Location") or ""
    assert "evil" not in location
    match = re.search(r"/thanks/([RC]-[0-9A-Z]{4}-[0-9A-Z]{4})$", location)
    assert match, location
    email = team_email(stack, match.group(1))
    assert f"{stack.base_url}/staff/requests/{match.group(1)}" in email
    assert "evil" not in email
    redirect = client.get("/staff/queue", forged)
    assert redirect.status == 302 and "evil" not in (redirect.header("Location") or "")
