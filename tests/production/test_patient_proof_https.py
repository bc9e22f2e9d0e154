"""Who looked at my request, on the production stack: gunicorn behind nginx with TLS,
PostgreSQL, Redis, the real worker. A pharmacist opens the request over https, the signer
process signs a checkpoint, and the patient's status page (Chromium, English and Spanish) lists
that opening by team, never by name, and hands out a proof that ``intake-verify`` checks with
the public key alone.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.production.conftest import VENV_BIN, Contexts, Door, ProductionStack
from tests.production.test_patient_https import (
    PATIENT_FIELDS,
    context_for,
    say,
    send,
    send_like_a_person,
)
from tests.workers.conftest import wait_until

pytestmark = [pytest.mark.browser, pytest.mark.postgres]


def signed_through(stack: ProductionStack, seq: int) -> bool:
    """Whether the signer process has signed a checkpoint covering event ``seq``."""
    rows = stack.query(
        "SELECT details FROM audit_events WHERE action = 'audit.checkpointed' ORDER BY seq DESC "
        "LIMIT 1"
    )
    return bool(rows) and json.loads(rows[0][0])["checkpoint_seq"] >= seq


def test_the_status_page_lists_team_openings_and_its_proof_verifies_offline(
    production_stack: ProductionStack, browser_pages: Contexts, door: Door, output_dir: Path
) -> None:
    from playwright.sync_api import expect

    stack = production_stack
    patient = stack.client(door.source)
    fields = {
        **PATIENT_FIELDS,
        "rx_numbers": "1234567",
        "location": "main",
        "fulfillment": "pickup",
        "consent_contact": "y",
    }
    reference = send_like_a_person(patient, {"/refill": fields})["/refill"]
    stack.wait_for_status(reference, "queued")
    [(team_id,)] = stack.query("SELECT team FROM requests WHERE reference = :r", r=reference)
    # A pharmacist of the team opens the request's page over https.
    user = stack.create_staff("proof-https", teams=(team_id,))  # creates the team if needed
    [(team_name,)] = stack.query("SELECT name FROM teams WHERE id = :t", t=team_id)
    pharmacist = stack.client(door.source)
    assert pharmacist.log_in(user.username, user.password, user.otp()).status == 303
    assert pharmacist.get(f"/staff/requests/{reference}").status == 200
    # The signer process (the only one with the private key) signs every few seconds.
    viewed = stack.last_audit_seq()
    wait_until(lambda: signed_through(stack, viewed), 60, message="a checkpoint over the view")

    for lang in ("en", "es"):
        page: Any = browser_pages.new_page(**context_for(lang))
        page.goto(f"{door.base_url}/status?lang={lang}")
        page.fill("#reference", reference)
        page.fill("#date_of_birth", PATIENT_FIELDS["date_of_birth"])
        assert send(page).status == 200
        section = page.get_by_role("region", name=say("Who opened your request", lang))
        expect(section.locator("#status-openings tbody tr")).to_have_count(1)
        expect(section.locator("#status-openings tbody td").nth(1)).to_have_text(team_name)
        assert user.username not in page.content()
        page.screenshot(path=str(output_dir / f"status-{lang}.png"), full_page=True)
        with page.expect_download() as download_info:
            section.get_by_role("button", name=say("Download the proof", lang)).click()
        download = download_info.value
        assert download.url.startswith(door.base_url) and reference not in download.url
        saved = output_dir / f"proof-{lang}.json"
        download.save_as(saved)
        data = json.loads(saved.read_text())
        assert "phi.viewed" in [event["leaf"]["action"] for event in data["events"]]
        assert user.username not in saved.read_text()
        checked = subprocess.run(
            [
                str(VENV_BIN / "intake-verify"),
                "proof",
                str(saved),
                "--key",
                stack.env["INTAKE_AUDIT_VERIFY_KEYS"],
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
        page.context.close()
    exports = stack.query(
        "SELECT actor FROM audit_events WHERE action = 'audit.exported' AND reference = :r",
        r=reference,
    )
    assert [actor for (actor,) in exports] == ["patient", "patient"]
