"""A compliance officer's patient-level access report over HTTPS, on the production stack."""

from __future__ import annotations

import csv
import io
import json
import time
from typing import Any

import pytest

from tests.production.conftest import Contexts, ProductionStack
from tests.production.test_https_browser import log_in, send, wait_like_a_person

pytestmark = [pytest.mark.browser, pytest.mark.postgres]

LAST_NAME = "Okonkwo-Lindqvist"
BIRTH = "1972-06-09"


def send_refill(page: Any, stack: ProductionStack, date_of_birth: str, phone: str) -> str:
    page.goto(f"{stack.base_url}/refill")
    rendered_at = time.monotonic()
    for field, value in {
        "first_name": "Ruth",
        "last_name": LAST_NAME,
        "date_of_birth": date_of_birth,
        "phone": phone,
    }.items():
        page.fill(f"#{field}", value)
    page.check("#contact_method-0")
    page.fill("#rx_numbers", "2345678")
    page.select_option("#location", "main")
    page.check("#consent_privacy")
    page.check("#consent_contact")
    wait_like_a_person(rendered_at)
    return send(page, "Send refill request")


def test_an_officer_finds_one_patients_requests_and_exports_them_over_https(
    production_stack: ProductionStack, browser_pages: Contexts, output_dir: Any
) -> None:
    stack = production_stack
    patient = browser_pages.new_page()
    hers = send_refill(patient, stack, BIRTH, "(202) 555-0161")
    namesake = send_refill(patient, stack, "1972-06-10", "(202) 555-0162")
    stack.wait_for_status(hers, "queued")
    stack.wait_for_status(namesake, "queued")

    officer = stack.create_staff("olga-https", teams=(), role="compliance")
    page = browser_pages.new_page()
    log_in(page, stack, officer)
    page.goto(f"{stack.base_url}/compliance/patients")
    page.get_by_label("Last name").fill(LAST_NAME.lower())
    page.get_by_label("Date of birth").fill(BIRTH)
    mark = stack.last_audit_seq()
    with page.expect_response(lambda r: r.request.method == "POST") as posted:
        page.get_by_role("button", name="Find the patient's requests").click()
    assert posted.value.status == 303
    page.wait_for_url("**/compliance/patients/*")
    assert page.url.startswith("https://") and BIRTH not in page.url
    html = page.content()
    assert hers in html and namesake not in html
    assert LAST_NAME not in html and BIRTH not in html
    page.screenshot(path=str(output_dir / "patient-report.png"), full_page=True)

    [(seq, raw)] = stack.query(
        "SELECT seq, details FROM audit_events WHERE seq > :seq AND action = 'request.searched'",
        seq=mark,
    )
    details = raw if isinstance(raw, dict) else json.loads(raw)
    assert details["references"] == [hers] and details["by"] == "name_dob"
    assert "okonkwo" not in json.dumps(details).lower() and "1972" not in json.dumps(details)

    # Printable, and exported as CSV through nginx.
    page.emulate_media(media="print")
    assert not page.locator(".site-header").is_visible()
    page.emulate_media(media="screen")
    with page.expect_download() as download_info:
        page.get_by_role("link", name="Export as CSV").click()
    download = download_info.value
    assert download.suggested_filename == f"access-patient-{seq}.csv"
    saved = output_dir / "patient.csv"
    download.save_as(saved)
    rows = list(csv.reader(io.StringIO(saved.read_text(encoding="utf-8"))))
    assert rows[0][:3] == ["Seq", "Time (UTC)", "Request"]
    assert {r[2] for r in rows[1:]} == {hers}
    assert any(r[5] == "request.submitted" for r in rows[1:])
