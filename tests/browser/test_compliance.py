"""A compliance officer in a real Chromium: log in with a TOTP code, find a request's events,
open its access report, print it, export the CSV, review a break-glass access.

Screenshots, the print rendering (PDF) and axe reports land in ``test-output/<test name>/``.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import pyotp
import pytest
from flask import Flask

from intake.accounts import services as accounts
from intake.audit.checkpoints import AnchorCursor
from intake.audit.signer import sign_once
from intake.clock import utcnow
from intake.extensions import db
from intake.requests import casework
from tests.browser.test_patient_forms import run_axe
from tests.conftest import Patient
from tests.intake.compliance.conftest import Staff, submit_routed

pytestmark = pytest.mark.browser

REASON = "After-hours call from the infusion nurse about tonight's dose"


def seed(app: Flask) -> tuple[Any, str, str]:
    """Teams, a compliance officer, a request worked by its team and opened by an outsider."""
    with app.app_context():
        for team in app.extensions["intake.routing"].teams.values():
            accounts.create_team(db.session, team.id, team.name, team.spanish, "system:test")
        db.session.commit()
    staff = Staff(app)
    officer = staff.create("olivia", "compliance")
    reference, team = submit_routed(app, Patient(app.test_client()))
    other = next(t for t in app.extensions["intake.routing"].teams if t != team)
    alice = staff.create("alice", "staff", (team,))
    bob = staff.create("bob", "staff", (other,))
    keyring = app.extensions["intake.keyring"]
    with app.app_context():
        now = utcnow()
        casework.open_request(db.session, keyring, reference, alice.actor(), now)
        casework.claim(db.session, reference, alice.actor(), now)
        casework.change_status(db.session, reference, alice.actor(), "in_progress", now)
        casework.open_request(
            db.session, keyring, reference, bob.actor(), now, break_glass_reason=REASON
        )
    # Another request, so the filter has something to leave out.
    submit_routed(app, Patient(app.test_client()))
    return officer, reference, team


def log_in(page: Any, live_server: str, officer: Any) -> None:
    page.goto(f"{live_server}/staff/login")
    page.get_by_label("Username").fill(officer.username)
    page.get_by_label("Password").fill(officer.password)
    page.get_by_label("Authenticator code").fill(pyotp.TOTP(officer.secret).now())
    page.keyboard.press("Enter")
    # Compliance officers land on their dashboard.
    page.wait_for_url(f"{live_server}/compliance/")
    page.goto(f"{live_server}/compliance/audit")


def table_texts(page: Any, table: str) -> list[list[str]]:
    rows: list[list[str]] = page.eval_on_selector_all(
        f"#{table} tbody tr",
        "rows => rows.map(r => [...r.cells].map(c => c.innerText.trim()))",
    )
    return rows


def test_officer_finds_who_saw_a_request_and_exports_it(
    page: Any, live_server: str, app: Flask, output_dir: Path
) -> None:
    officer, reference, _team = seed(app)
    log_in(page, live_server, officer)
    nav = page.get_by_role("navigation", name="Staff")
    assert nav.get_by_role("link", name="Audit trail").get_attribute("aria-current") == "page"

    # Filter the trail by reference, typed as a patient would read it out.
    page.get_by_label("Reference").fill(reference.lower().replace("-", " "))
    page.get_by_role("button", name="Search").click()
    page.wait_for_url("**/compliance/audit?*")
    rows = table_texts(page, "audit-events")
    assert rows and {row[7] for row in rows} == {reference}
    assert {"phi.viewed", "phi.break_glass", "request.submitted"} <= {row[5] for row in rows}
    assert "Break-glass access" in {row[6] for row in rows}  # plain names beside the codes
    page.screenshot(path=str(output_dir / "audit-filtered.png"), full_page=True)
    run_axe(page, output_dir, "audit")

    # Export exactly what is shown.
    with page.expect_download() as download_info:
        page.get_by_role("link", name="Export these events as CSV").click()
    download = download_info.value
    assert download.suggested_filename.startswith("audit-")
    saved = output_dir / "export.csv"
    download.save_as(saved)
    exported = list(csv.reader(io.StringIO(saved.read_text(encoding="utf-8"))))
    assert exported[0][:3] == ["Seq", "Time (UTC)", "Actor"]
    # Cell for cell what is shown, but the details: JSON in the file, key: value on the page.
    details = exported[0].index("Details")
    assert [r[:details] + r[details + 1 :] for r in exported[1:]] == [
        r[:details] + r[details + 1 :] for r in rows
    ]

    # The access report: who, when, why, with the break-glass reason.
    page.get_by_role("link", name=f"Access report for {reference}").click()
    page.wait_for_url(f"{live_server}/compliance/access/{reference}")
    assert page.get_by_role("heading", level=1).inner_text() == f"Access report {reference}"
    people = {row[0]: row for row in table_texts(page, "access-people")}
    assert people["alice"][4] == "1" and people["bob"][5] == "1"
    glass = page.locator("#access-events tr[data-action='phi.break_glass']")
    assert glass.locator("td").nth(2).inner_text() == "bob"
    assert glass.locator("td").nth(5).inner_text() == REASON
    page.screenshot(path=str(output_dir / "access-report.png"), full_page=True)
    run_axe(page, output_dir, "access-report")

    # Printed, the report drops navigation and forms and says who produced it.
    page.emulate_media(media="print")
    assert not page.locator(".site-header").is_visible()
    assert page.get_by_text(f"by {officer.username} from the audit trail").is_visible()
    page.pdf(path=str(output_dir / "access-report.pdf"))
    page.screenshot(path=str(output_dir / "access-report-print.png"), full_page=True)
    page.emulate_media(media="screen")

    # The export itself is in the trail, with its filter.
    page.goto(f"{live_server}/compliance/audit?action=audit.exported")
    [export_row] = table_texts(page, "audit-events")
    assert export_row[3] == "olivia"
    assert f"filter reference: {reference}" in " ".join(export_row[9].split())


def test_officer_reviews_break_glass_and_verifies_by_keyboard(
    page: Any, live_server: str, app: Flask, output_dir: Path
) -> None:
    officer, reference, _team = seed(app)
    log_in(page, live_server, officer)

    page.get_by_role("link", name="Dashboard").click()
    assert page.locator("#pending-reviews").inner_text() == "1"
    assert page.locator("svg#chart-requests > title").text_content().startswith("Requests")
    page.screenshot(path=str(output_dir / "dashboard.png"), full_page=True)
    run_axe(page, output_dir, "dashboard")

    page.get_by_role("link", name="Break-glass").click()
    page.screenshot(path=str(output_dir / "break-glass-pending.png"), full_page=True)
    run_axe(page, output_dir, "break-glass")
    page.get_by_label("Appropriate", exact=True).focus()
    page.keyboard.press("Space")
    comment = page.get_by_label("Reason for this outcome (no patient details)")
    comment.focus()
    page.keyboard.type("Checked the on-call roster: bob was covering. Justified.")
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")
    page.wait_for_url(f"{live_server}/compliance/break-glass")
    assert page.get_by_role("status").inner_text().endswith("reviewed: appropriate.")
    assert page.locator("#no-pending").is_visible()
    reviewed = table_texts(page, "reviewed")
    assert reviewed[0][2] == "bob" and reviewed[0][3] == reference
    assert reviewed[0][5] == "Appropriate" and reviewed[0][6] == "olivia"
    page.screenshot(path=str(output_dir / "break-glass-reviewed.png"), full_page=True)

    # The signer (its own process in a deployment) has signed what happened so far.
    sign_once(app, AnchorCursor())
    page.get_by_role("link", name="Audit trail").click()
    page.get_by_role("button", name="Verify the audit trail").click()
    page.wait_for_url("**/compliance/verify/*")
    assert page.locator("#verify-result").inner_text().startswith("Intact.")
    page.screenshot(path=str(output_dir / "verified.png"), full_page=True)
