"""Compliance pages in a real browser: axe finds nothing, and a phone needs no sideways scroll."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from tests.browser.test_compliance import log_in, seed
from tests.browser.test_patient_forms import format_violations

PHONE = {"locale": "en-US", "viewport": {"width": 390, "height": 844}, "is_mobile": True}


def axe_clean(page: Any, output_dir: Path, name: str) -> None:
    """Run axe-core on the page and fail on any violation at all, whatever its impact."""
    from axe_playwright_python.sync_playwright import Axe

    violations = Axe().run(page).response["violations"]
    page.screenshot(path=str(output_dir / f"{name}.png"), full_page=True)
    assert not violations, f"axe on {page.url}:\n" + format_violations(violations)


def no_sideways_scroll(page: Any) -> None:
    widths = page.evaluate(
        "() => [document.documentElement.scrollWidth, window.innerWidth, document.body.scrollWidth]"
    )
    assert max(widths[0], widths[2]) <= widths[1], f"page is {widths} px wide at 390 px"


def visit_patient_report(page: Any, live_server: str) -> None:
    page.goto(f"{live_server}/compliance/patients")
    page.get_by_label("Phone").fill("202-555-0143")
    page.get_by_role("button", name="Find the patient's requests").click()
    page.wait_for_url("**/compliance/patients/*")


def test_audit_access_patient_and_dashboard_pages_have_no_axe_violations(
    page: Any, live_server: str, app: Flask, output_dir: Path
) -> None:
    officer, reference, _team = seed(app)
    log_in(page, live_server, officer)
    axe_clean(page, output_dir, "audit")
    # A long row's details fold away, and open on demand without script.
    more = page.locator("details.kv-more").first
    if more.count():
        more.locator("summary").click()
        assert more.evaluate("d => d.open")
    page.goto(f"{live_server}/compliance/access/{reference}")
    axe_clean(page, output_dir, "access")
    page.goto(f"{live_server}/compliance/")
    axe_clean(page, output_dir, "dashboard")
    visit_patient_report(page, live_server)
    assert page.get_by_role("heading", level=1).inner_text() == "Access report for one patient"
    axe_clean(page, output_dir, "patient-report")
    page.goto(f"{live_server}/compliance/users/alice")
    axe_clean(page, output_dir, "user")


@pytest.mark.browser_context(**PHONE)
def test_audit_and_access_pages_fit_a_phone(
    page: Any, live_server: str, app: Flask, output_dir: Path
) -> None:
    officer, reference, _team = seed(app)
    log_in(page, live_server, officer)
    no_sideways_scroll(page)
    # The time stays on one line, and no row is taller than a few lines of text.
    heights = page.eval_on_selector_all(
        "#audit-events time", "ts => ts.map(t => t.getClientRects().length)"
    )
    assert heights and set(heights) == {1}
    page.screenshot(path=str(output_dir / "audit-390.png"), full_page=True)
    for path in (f"/compliance/access/{reference}", "/compliance/", "/compliance/users/alice"):
        page.goto(f"{live_server}{path}")
        no_sideways_scroll(page)
    axe_clean(page, output_dir, "user-390")
