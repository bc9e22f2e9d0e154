"""The queue in a real Chromium: worked from the keyboard, bulk-assigned by a supervisor, a new
request highlighted as it arrives, readable on a 390 px phone, and axe-clean.

Screenshots and axe reports land in ``test-output/<test name>/``.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest

from intake.clock import utcnow
from tests.browser.test_patient_pages import axe_clean
from tests.browser.test_staff import log_in, queue_row
from tests.intake.staff.conftest import (
    create_staff_user,
    create_teams,
    events_since,
    last_seq,
    request_state,
    submit_routed,
)

pytestmark = pytest.mark.browser

REFRESH_MS = 10_000  # queue.js polls every 5 s
PHONE = {"width": 390, "height": 844}


@pytest.fixture
def morning(app, patient):
    """Three refills for refills-main, oldest due first, and an urgent side-effect report."""
    create_teams(app)
    ana = create_staff_user(app, "ana", teams=("clinical", "refills-main"))
    sofia = create_staff_user(app, "sofia", role="supervisor")
    now = utcnow()
    refills = [
        submit_routed(app, patient, "refill", now - timedelta(minutes=30 - i), first_name=name)
        for i, name in enumerate(("Ada", "Bea", "Cy"))
    ]
    urgent = submit_routed(app, patient, "contact", now, topic="side_effect", first_name="Dee")
    return ana, sofia, refills, urgent


def focused(page: Any) -> str:
    return str(page.evaluate("() => document.activeElement && document.activeElement.id || ''"))


def selected_reference(page: Any) -> str | None:
    return page.evaluate(
        "() => { const r = document.querySelector('#queue-rows tr.is-selected');"
        " return r && r.dataset.reference; }"
    )


def test_a_pharmacist_works_a_request_with_the_keyboard_only(
    app, live_server, page, output_dir, morning
):
    from playwright.sync_api import expect

    ana, _sofia, refills, urgent = morning
    page.goto(f"{live_server}/staff/login")
    log_in(page, ana)
    order = [urgent, *refills]  # urgent first, then soonest due

    # The skip link is the first thing in the page's content: a few Tabs, then Enter.
    for _ in range(8):
        page.keyboard.press("Tab")
        if page.evaluate("() => document.activeElement.textContent") == "Skip to the first request":
            break
    else:
        pytest.fail("no skip link to the first request within 8 Tabs")
    page.keyboard.press("Enter")
    assert focused(page) == "first-request"
    assert selected_reference(page) == order[0]

    page.keyboard.press("j")
    page.keyboard.press("j")
    page.keyboard.press("k")
    assert selected_reference(page) == order[1]
    expect(queue_row(page, order[1])).to_have_class(re.compile(r"\bis-selected\b"))

    page.keyboard.press("?")
    expect(page.get_by_role("dialog", name="Keyboard shortcuts")).to_be_visible()
    page.screenshot(path=str(output_dir / "help.png"))
    page.keyboard.press("Escape")
    expect(page.get_by_role("dialog")).to_be_hidden()

    since = last_seq(app)
    with page.expect_navigation():
        page.keyboard.press("c")
    expect(page.get_by_text(f"You claimed {order[1]}.")).to_be_visible()
    expect(queue_row(page, order[1])).to_contain_text("ana")
    assert request_state(app, order[1])["assignee_id"] == ana.id
    assert [(e.action, e.reference) for e in events_since(app, since)][:1] == [
        ("request.claimed", order[1])
    ]

    page.keyboard.press("j")
    page.keyboard.press("j")
    assert selected_reference(page) == order[1]
    with page.expect_navigation():
        page.keyboard.press("Enter")
    expect(page.get_by_role("heading", level=1)).to_contain_text(order[1])
    expect(page.locator("#assignee")).to_have_text("ana")
    page.screenshot(path=str(output_dir / "opened.png"), full_page=True)


def test_a_new_request_is_highlighted_and_counted_in_the_title(
    app, live_server, page, patient, morning
):
    from playwright.sync_api import expect

    ana, _sofia, _refills, _urgent = morning
    page.goto(f"{live_server}/staff/login")
    log_in(page, ana)
    title = page.title()
    expect(page.locator("#queue-counts [data-count=total] strong")).to_have_text("4")

    arrived = submit_routed(app, patient, "contact", utcnow(), topic="side_effect")

    row = queue_row(page, arrived)
    expect(row).to_have_class(re.compile(r"\bis-new\b"), timeout=REFRESH_MS)
    expect(row).to_contain_text("new")
    assert page.title() == f"(1 new) {title}"
    expect(page.locator("#queue-news")).to_have_text("1 new request arrived.")
    expect(page.locator("#queue-counts [data-count=total] strong")).to_have_text("5")

    # Moving onto it is seeing it: the highlight and the count go.
    assert page.title() == f"(1 new) {title}"  # passing over other rows changes nothing
    for _ in range(5):
        page.keyboard.press("j")
        if selected_reference(page) == arrived:
            break
    assert selected_reference(page) == arrived
    expect(row).not_to_have_class(re.compile(r"\bis-new\b"))
    assert page.title() == title


def test_a_supervisor_bulk_assigns_three_requests(app, live_server, page, output_dir, morning):
    from playwright.sync_api import expect

    ana, sofia, refills, _urgent = morning
    page.goto(f"{live_server}/staff/login")
    log_in(page, sofia)
    expect(page.get_by_label("Team")).to_contain_text("all teams")
    since = last_seq(app)

    for reference in refills:
        page.get_by_label(f"Select {reference}").check()
    page.get_by_label("Assign to").select_option(
        label="ana (Clinical pharmacists, Refills: Main Street)"
    )
    with page.expect_navigation():
        page.get_by_role("button", name="Assign", exact=True).click()

    expect(page.get_by_text("Assigned 3 requests")).to_be_visible()
    for reference in refills:
        expect(queue_row(page, reference)).to_contain_text("ana")
        assert request_state(app, reference)["assignee_id"] == ana.id
    events = events_since(app, since)
    claimed = [e for e in events if e.action == "request.claimed"]
    assert sorted(e.reference for e in claimed) == sorted(refills)
    assert {(e.actor, e.details["assigned_to"], e.details["assigned_by"]) for e in claimed} == {
        (f"user:{sofia.id}", f"user:{ana.id}", "sofia")
    }
    page.screenshot(path=str(output_dir / "assigned.png"), full_page=True)


@pytest.mark.browser_context(viewport=PHONE, is_mobile=True, has_touch=True)
def test_the_queue_fits_a_390px_phone(app, live_server, page, output_dir, morning):
    _ana, sofia, refills, _urgent = morning
    page.goto(f"{live_server}/staff/login")
    log_in(page, sofia)  # the supervisor's queue is the widest: it has "Assign to" too

    width = page.evaluate("() => document.documentElement.clientWidth")
    assert width == PHONE["width"]
    assert page.evaluate("() => document.documentElement.scrollWidth") <= width
    for reference in refills:
        box = queue_row(page, reference).bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= width
    page.screenshot(path=str(output_dir / "phone.png"), full_page=True)
    axe_clean(page, output_dir, "queue-phone")

    page.get_by_label(f"Select {refills[0]}").check()
    page.get_by_label("Transfer to").select_option(label="Refills: North Clinic")
    page.get_by_label("Reason").fill("North has the stock")
    with page.expect_navigation():
        page.get_by_role("button", name="Transfer…").click()
    assert page.evaluate("() => document.documentElement.scrollWidth") <= width
    page.screenshot(path=str(output_dir / "confirm.png"), full_page=True)


def test_the_queue_has_no_axe_violations(live_server, page, output_dir, morning):
    ana, _sofia, _refills, _urgent = morning
    page.goto(f"{live_server}/staff/login")
    log_in(page, ana)
    page.locator("body").press("j")  # with a selection, as it is being worked
    axe_clean(page, output_dir, "queue")
    page.goto(f"{live_server}/staff/queue?sort=-due&assignee=unassigned")
    axe_clean(page, output_dir, "queue-sorted")
