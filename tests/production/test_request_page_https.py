"""The staff request page on the production stack (gunicorn behind nginx TLS, PostgreSQL,
Redis, the real worker): a pharmacist reads a copay request in plain words over https, and
the page reloading itself leaves one "viewed" line in the timeline, not one per load."""

from __future__ import annotations

import re
from html import unescape

import pytest

from tests.production.conftest import Door, ProductionStack
from tests.production.test_patient_https import PATIENT_FIELDS, send_like_a_person
from tests.workers.conftest import wait_until

pytestmark = pytest.mark.postgres

TIME_RE = re.compile(r'<time datetime="[^"]+\+00:00" title="\d{4}-\d\d-\d\d \d\d:\d\d UTC">')


def timeline_lines(html: str) -> list[str]:
    block = re.search(r'<ol class="timeline">(.*?)</ol>', html, re.S)
    assert block, html[:2000]
    return [unescape(t) for t in re.findall(r'<span class="timeline__text">(.*?)</span>', block[1])]


def test_a_copay_request_reads_in_plain_words_over_https(
    production_stack: ProductionStack, door: Door
) -> None:
    stack = production_stack
    patient = stack.client(door.source)
    fields = {**PATIENT_FIELDS, "topic": "copay", "message": "Help with my copay, please."}
    reference = send_like_a_person(patient, {"/contact": fields})["/contact"]
    stack.wait_for_status(reference, "queued")
    # The worker's team notice comes after routing: wait for it, the timeline names it.
    wait_until(
        lambda: stack.query(
            "SELECT 1 FROM audit_events WHERE reference = :r AND action = 'notification.sent'",
            r=reference,
        ),
        30,
        message="the benefits team's notice",
    )
    user = stack.create_staff("plain-words", teams=("benefits",))
    pharmacist = stack.client(door.source)
    assert pharmacist.log_in(user.username, user.password, user.otp()).status == 303

    for _ in range(3):
        page = pharmacist.get(f"/staff/requests/{reference}")
        assert page.status == 200, page.text[:500]
    html = page.text

    assert "<h1>Contact request" in html
    assert '<dd id="topic">Copay assistance</dd>' in html
    assert '<dd id="current-team">Benefits and copay assistance</dd>' in html
    assert '<dd id="status" data-status="queued">Queued</dd>' in html
    assert '<a href="tel:+12025550112">(202) 555-0112</a>' in html
    assert "+12025550112<" not in html and ">copay<" not in html
    received = re.search(r'<dd id="received">(.*?)</dd>', html, re.S)
    assert received and TIME_RE.search(received[1]), html[:3000]
    assert re.search(r"C[SD]T</time>", received[1]), received[1]  # the pharmacy's Chicago time

    assert timeline_lines(html) == [
        "Received from the patient",
        "Routed to Benefits and copay assistance, normal priority",
        "Benefits and copay assistance notified",
        "Viewed by plain-words, 3 times",
    ]
