"""A pharmacist's shift in a real Chromium: log in with a TOTP code, take the oldest urgent
request, open it, note, complete it; the queue keeps itself current; axe on every page.

Screenshots and axe reports land in ``test-output/<test name>/``.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pyotp
import pytest

from intake.clock import utcnow
from intake.extensions import db
from intake.requests import casework
from tests.browser.test_patient_forms import run_axe
from tests.intake.staff.conftest import (
    StaffUser,
    create_staff_user,
    create_teams,
    install_clock,
    request_state,
    submit_routed,
)

pytestmark = pytest.mark.browser

NOTE = "Called Dr Alvarez's office: the new prescription is on its way."
REFRESH_SECONDS = 10  # queue.js polls every 5 s


def log_in(page: Any, user: StaffUser) -> None:
    page.fill("#username", user.username)
    page.fill("#password", user.password)
    page.fill("#otp", pyotp.TOTP(user.totp_secret).now())
    with page.expect_navigation():
        page.get_by_role("button", name="Log in").click()


def queue_row(page: Any, reference: str) -> Any:
    return page.locator("#queue-rows tr").filter(has=page.get_by_role("link", name=reference))


@pytest.fixture
def shift(app, patient):
    """Ana's teams' queue: two urgent side-effect reports and a routine refill."""
    create_teams(app)
    ana = create_staff_user(app, "ana", teams=("clinical", "refills-main"))
    boris = create_staff_user(app, "boris", teams=("clinical",))
    now = utcnow()
    made = {
        "newer_urgent": submit_routed(
            app,
            patient,
            "contact",
            now - timedelta(minutes=5),
            topic="side_effect",
            first_name="Rosa",
            last_name="Delgado",
        ),
        "refill": submit_routed(app, patient, "refill", now - timedelta(minutes=30)),
        "oldest_urgent": submit_routed(
            app,
            patient,
            "contact",
            now - timedelta(minutes=20),
            topic="side_effect",
            first_name="Helen",
            last_name="Park",
        ),
    }
    return ana, boris, made


def test_a_pharmacist_works_the_oldest_urgent_request(app, live_server, page, output_dir, shift):
    from playwright.sync_api import expect

    ana, _boris, made = shift
    page.goto(f"{live_server}/staff/queue")
    expect(page.get_by_role("heading", name="Staff login")).to_be_visible()
    run_axe(page, output_dir, "login")
    log_in(page, ana)

    assert page.url == f"{live_server}/staff/queue"
    first_urgent = page.locator("#queue-rows tr.priority-urgent").first
    expect(first_urgent).to_contain_text(made["oldest_urgent"])
    expect(first_urgent).to_contain_text("Helen P.")
    expect(page.locator("#queue")).not_to_contain_text("Park")
    run_axe(page, output_dir, "queue")

    first_urgent.get_by_role("link", name=made["oldest_urgent"]).click()
    expect(page.get_by_role("heading", level=1)).to_contain_text(made["oldest_urgent"])
    expect(page.get_by_text("Helen Park")).to_be_visible()
    timeline = page.locator("ol.timeline")
    expect(timeline).to_contain_text("Viewed by ana")

    page.get_by_role("button", name="Claim").click()
    expect(page.get_by_text("You claimed this request.")).to_be_visible()
    expect(page.locator("#assignee")).to_have_text("ana")
    expect(timeline).to_contain_text("Claimed by ana")
    run_axe(page, output_dir, "request")

    page.get_by_label("Add a note").fill(NOTE)
    page.get_by_role("button", name="Add note").click()
    expect(page.get_by_text("Note added.")).to_be_visible()
    expect(page.locator("article.note")).to_contain_text(NOTE)
    expect(timeline).to_contain_text("Note added by ana")

    for status, shown in (("in_progress", "In progress"), ("completed", "Completed")):
        page.get_by_label("Change status to").select_option(status)
        page.get_by_role("button", name="Change status").click()
        expect(page.locator("#status")).to_have_text(shown)
    expect(timeline.locator("li", has_text="Status:")).to_have_count(2)
    expect(timeline).to_contain_text("Status: completed, by ana (was in progress)")
    expect(timeline).not_to_contain_text("{")  # words, not audit details
    page.screenshot(path=str(output_dir / "request-completed.png"), full_page=True)
    assert request_state(app, made["oldest_urgent"])["status"] == "completed"

    page.get_by_role("link", name="Queue").click()
    expect(page.locator("#queue")).not_to_contain_text(made["oldest_urgent"])
    expect(page.locator("#queue-rows tr.priority-urgent").first).to_contain_text(
        made["newer_urgent"]
    )
    page.screenshot(path=str(output_dir / "queue-after.png"), full_page=True)


def test_the_queue_updates_itself_when_a_request_changes(app, live_server, page, output_dir, shift):
    from playwright.sync_api import expect

    ana, boris, made = shift
    page.goto(f"{live_server}/staff/login")
    log_in(page, ana)
    row = queue_row(page, made["newer_urgent"])
    expect(row).to_contain_text("queued")
    page.evaluate("() => { window.__sameDocument = true; }")

    # A colleague starts work on it from their own computer.
    with app.app_context():
        actor = casework.Actor(boris.id, boris.username, "staff", boris.teams)
        casework.change_status(db.session, made["newer_urgent"], actor, "in_progress", utcnow())

    expect(row).to_contain_text("in progress", timeout=REFRESH_SECONDS * 1000)
    expect(row).to_contain_text("boris")
    assert page.evaluate("() => window.__sameDocument === true"), "the page was reloaded"
    assert re.search(r"/staff/queue$", page.url)
    page.screenshot(path=str(output_dir / "queue-refreshed.png"), full_page=True)


def test_an_idle_queue_page_goes_back_to_the_login_page(app, live_server, page, shift):
    """Polling is not activity: after 15 idle minutes the names leave the screen by themselves."""
    from playwright.sync_api import expect

    ana, _boris, made = shift
    clock = install_clock(app)
    page.goto(f"{live_server}/staff/login")
    log_in(page, ana)
    expect(queue_row(page, made["oldest_urgent"])).to_contain_text("Helen P.")

    clock.advance(minutes=15, seconds=5)

    expect(page.get_by_role("heading", name="Staff login")).to_be_visible(
        timeout=REFRESH_SECONDS * 1000
    )
    expect(page.locator("body")).not_to_contain_text("Helen P.")
