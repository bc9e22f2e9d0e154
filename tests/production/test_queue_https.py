"""The queue's bulk claim on the production stack: gunicorn behind nginx over TLS, PostgreSQL,
Redis and a real worker routing what patients sent. One POST claims three requests, each with
its own audit event, and the CSRF token and same-origin checks hold through the proxy.
"""

from __future__ import annotations

import re
import time

import pytest

from tests.conftest import HIDDEN_RE
from tests.production.conftest import ProductionStack
from tests.production.test_https_browser import MIN_FILL_SECONDS

pytestmark = pytest.mark.postgres

THANKS_RE = re.compile(r"/thanks/(R-[0-9A-Z]{4}-[0-9A-Z]{4})$")
REFILL = {
    "first_name": "Rosa",
    "last_name": "Delgado",
    "date_of_birth": "1962-07-04",
    "phone": "202-555-0112",
    "contact_method": "phone",
    "rx_numbers": "1234567",
    "location": "main",
    "fulfillment": "pickup",
    "consent_privacy": "y",
    "consent_contact": "y",
    "website": "",
}


def test_a_bulk_claim_over_https(production_stack: ProductionStack) -> None:
    stack = production_stack
    patient = stack.client("127.0.131.1")
    forms = []
    for _ in range(3):
        page = patient.get("/refill")
        assert page.status == 200
        forms.append(dict(HIDDEN_RE.findall(page.text)))
    time.sleep(MIN_FILL_SECONDS + 0.5)  # as long as a person filling the form takes
    origin = {"Origin": patient.base_url, "Referer": patient.base_url + "/refill"}
    references = []
    for hidden in forms:
        sent = patient.request("POST", "/refill", {**hidden, **REFILL}, origin)
        assert sent.status == 303, (sent.status, sent.text[:800])
        match = THANKS_RE.search(sent.header("Location") or "")
        assert match, sent.header("Location")
        references.append(match.group(1))
    for reference in references:
        stack.wait_for_status(reference, "queued")  # routed by the real worker

    user = stack.create_staff("queue-bulk-https", teams=("refills-main",))
    staff = stack.client("127.0.131.2")
    assert staff.log_in(user.username, user.password, user.otp()).status == 303
    # Newest first: the stack is shared with other tests, whose requests may fill a page.
    queue = staff.get("/staff/queue?assignee=unassigned&sort=-received")
    assert queue.status == 200
    assert all(reference in queue.text for reference in references)
    token = dict(HIDDEN_RE.findall(queue.text))["csrf_token"]
    same_origin = {"Origin": staff.base_url, "Referer": staff.base_url + "/staff/queue"}
    fields = [("reference", r) for r in references] + [
        ("action", "claim"),
        ("back_assignee", "unassigned"),
        ("back_sort", "-received"),
    ]
    mark = stack.last_audit_seq()

    # Without the page's token, or from another site, nothing is claimed.
    assert staff.request("POST", "/staff/queue/bulk", fields, same_origin).status == 400
    forged = {"Origin": "https://evil.example", "Referer": "https://evil.example/"}
    assert staff.request(
        "POST", "/staff/queue/bulk", [*fields, ("csrf_token", token)], forged
    ).status in (400, 403)
    assert stack.audit_events_after(mark, "request.claimed") == []

    claimed = staff.request(
        "POST", "/staff/queue/bulk", [*fields, ("csrf_token", token)], same_origin
    )

    assert claimed.status == 303, (claimed.status, claimed.text[:800])
    assert claimed.header("Location") == "/staff/queue?assignee=unassigned&sort=-received"
    events = stack.audit_events_after(mark, "request.claimed")
    assert sorted(e.reference for e in events) == sorted(references)
    assert len({e.actor for e in events}) == 1
    assignees = stack.query(
        "SELECT DISTINCT u.username FROM requests r JOIN users u ON u.id = r.assignee_id"
        " WHERE r.reference = ANY(:refs)",
        refs=list(references),
    )
    assert [row[0] for row in assignees] == ["queue-bulk-https"]
    after = staff.get("/staff/queue?assignee=mine&sort=-received")
    assert "You claimed 3 requests" in after.text
    assert all(reference in after.text for reference in references)
