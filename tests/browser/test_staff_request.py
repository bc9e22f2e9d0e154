"""The staff request page in plain words, in a real Chromium: labels instead of codes, the
pharmacy's time with UTC on hover, a dialable phone link, a timeline whose reloads fold into
one "viewed" line, no sideways scrolling on a 390 px phone, and no axe violation at all.

Screenshots and axe reports land in ``test-output/<test name>/``.
"""

from __future__ import annotations

import json
import re
from datetime import timedelta
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa

from intake.clock import utcnow
from intake.extensions import db
from intake.models import Request
from tests.browser.test_patient_forms import format_violations
from tests.browser.test_staff import log_in
from tests.intake.staff.conftest import create_staff_user, create_teams, submit_routed

pytestmark = pytest.mark.browser

CHICAGO = ZoneInfo("America/Chicago")  # the sample pharmacy's zone (config/pharmacy.toml)
UTC_TITLE_RE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d UTC$")


def no_axe_violations(page, output_dir, name: str) -> None:
    """axe-core on the page: not one violation, whatever its impact."""
    from axe_playwright_python.sync_playwright import Axe

    violations = Axe().run(page).response["violations"]
    (output_dir / f"{name}-axe.json").write_text(
        json.dumps(violations, indent=2, ensure_ascii=False), encoding="utf-8"
    )
    assert violations == [], format_violations(violations)


def test_a_pharmacist_reads_a_request_in_plain_words(app, live_server, page, output_dir, patient):
    from playwright.sync_api import expect

    create_teams(app)
    pharmacist = create_staff_user(app, "pharm2", teams=("infusion",))
    reference = submit_routed(
        app,
        patient,
        "refill",
        utcnow() - timedelta(minutes=20),
        location="infusion",
        fulfillment="pickup",
        phone="(202) 555-0105",
    )
    with app.app_context():
        received = db.session.execute(
            sa.select(Request.created_at).where(Request.reference == reference)
        ).scalar_one()

    page.goto(f"{live_server}/staff/login")
    log_in(page, pharmacist)
    page.goto(f"{live_server}/staff/requests/{reference}")

    expect(page.get_by_role("heading", level=1)).to_have_text(f"Refill request {reference}")
    expect(page.locator("#location")).to_have_text("Infusion Center")
    expect(page.locator("#fulfillment")).to_have_text("Pickup at the pharmacy")
    expect(page.locator("#status")).to_have_text("Queued")
    expect(page.locator("#current-team")).to_have_text("Infusion center")
    expect(page.locator("#assignee")).to_have_text("Unassigned")
    expect(page.locator("#contact-method")).to_have_text("Text message")
    call = page.get_by_role("link", name="(202) 555-0105")
    expect(call).to_have_attribute("href", "tel:+12025550105")
    expect(page.locator("main")).not_to_contain_text("+12025550105")

    # The received time in Chicago's clock, the UTC time on hover.
    local = received.astimezone(CHICAGO)
    shown = page.locator("#received time")
    expect(shown).to_have_attribute("title", received.strftime("%Y-%m-%d %H:%M UTC"))
    expect(shown).to_have_attribute("title", UTC_TITLE_RE)
    text = shown.inner_text().replace("\u202f", " ")
    assert f"{local:%-I:%M %p} {local.tzname()}" in text, text
    assert f"{local:%b} {local.day}, {local.year}" in text, text

    for _ in range(3):
        page.reload()
    timeline = page.locator("ol.timeline")
    viewed = timeline.locator('li[data-action="phi.viewed"]')
    expect(viewed).to_have_count(1)
    expect(viewed).to_contain_text("Viewed by pharm2, 4 times")
    expect(timeline.locator("li").first).to_contain_text("Received from the patient")
    expect(timeline).to_contain_text("Routed to Infusion center, high priority")
    expect(timeline).not_to_contain_text("user:")
    expect(timeline).not_to_contain_text("phi.viewed")

    page.get_by_role("button", name="Claim").click()
    expect(page.locator("#assignee")).to_have_text("pharm2")
    expect(timeline).to_contain_text("Claimed by pharm2")
    expect(viewed).to_have_count(1)
    expect(viewed).to_contain_text("Viewed by pharm2, 5 times")
    no_axe_violations(page, output_dir, "request-desktop")

    page.set_viewport_size({"width": 390, "height": 844})
    page.reload()
    widths = page.evaluate(
        "() => ({scroll: document.documentElement.scrollWidth, inner: window.innerWidth})"
    )
    assert widths["inner"] == 390
    assert widths["scroll"] <= widths["inner"], widths
    page.screenshot(path=str(output_dir / "request-390.png"), full_page=True)
    no_axe_violations(page, output_dir, "request-390")
