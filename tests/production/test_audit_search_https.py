"""The compliance officer's audit search over HTTPS, on the production stack: a reversed time
window gets its message beside the field, and a window around requests routed together finds
each one's own events."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.production.conftest import Contexts, ProductionStack
from tests.production.test_compliance_patient_https import send_refill
from tests.production.test_https_browser import log_in

pytestmark = [pytest.mark.browser, pytest.mark.postgres]


def test_an_officer_searches_a_time_window_by_keyboard_and_is_told_when_it_is_reversed(
    production_stack: ProductionStack, browser_pages: Contexts
) -> None:
    from playwright.sync_api import expect

    stack = production_stack
    patient = browser_pages.new_page()
    references = [
        send_refill(patient, stack, "1980-02-0" + str(day), f"(202) 555-017{day}")
        for day in (1, 2, 3)
    ]
    for reference in references:
        stack.wait_for_status(reference, "queued")

    officer = stack.create_staff("audit-window-https", teams=(), role="compliance")
    page = browser_pages.new_page()
    log_in(page, stack, officer)
    page.goto(f"{stack.base_url}/compliance/audit")
    today = datetime.now(UTC).date()
    tomorrow = today + timedelta(days=1)

    # From tomorrow until today: told so beside "Until", with what was typed kept.
    page.get_by_label("From (UTC)").fill(tomorrow.isoformat())
    page.get_by_label("Until (UTC)").fill(today.isoformat())
    with page.expect_response(lambda r: "/compliance/audit" in r.url) as answered:
        page.get_by_label("Until (UTC)").press("Enter")
    assert answered.value.status == 400
    until = page.get_by_label("Until (UTC)")
    expect(until).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#until-error")).to_contain_text("Until is before From")
    assert "until-error" in (until.get_attribute("aria-describedby") or "")
    expect(page.get_by_label("From (UTC)")).to_have_value(tomorrow.isoformat())
    expect(until).to_have_value(today.isoformat())
    expect(page.get_by_role("alert")).to_contain_text("Check the filter")

    # Today until tomorrow, and one request: its own submission and routing, however its
    # routing was batched with the others'.
    page.get_by_label("From (UTC)").fill(today.isoformat())
    page.get_by_label("Until (UTC)").fill(tomorrow.isoformat())
    page.get_by_label("Reference").fill(references[1])
    with page.expect_response(lambda r: "/compliance/audit" in r.url) as answered:
        page.get_by_label("Reference").press("Enter")
    assert answered.value.status == 200
    rows = page.locator("#audit-events tbody tr")
    actions = {row.get_attribute("data-action") for row in rows.all()}
    assert {"request.submitted", "request.routed"} <= actions, actions
    table = page.locator("#audit-events").inner_text()
    assert references[1] in table
    assert references[0] not in table and references[2] not in table
    routed = stack.query(
        "SELECT reference, count(*) FROM audit_events WHERE action = 'request.routed'"
        " AND reference = ANY(:refs) GROUP BY reference",
        refs=references,
    )
    assert dict(routed) == dict.fromkeys(references, 1)
    _no_error_page(page)


def _no_error_page(page: Any) -> None:
    assert "Internal Server Error" not in page.content()
