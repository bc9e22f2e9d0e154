"""Who looked at my request, in a real Chromium: after reference and date of birth, the status
page lists when and by which team the request was opened, in English and Spanish, and the proof
it downloads verifies offline with the pharmacy's public key (``intake-verify``, no app)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from intake.audit import checkpoints
from intake.extensions import db
from tests.browser.test_patient_forms import spanish
from tests.browser.test_patient_pages import axe_clean
from tests.conftest import Patient
from tests.intake.patient.test_status_openings import open_as, routed_team
from tests.intake.staff.conftest import create_staff_user, create_teams, submit_routed

pytestmark = pytest.mark.browser


def prepare(app: Flask) -> tuple[str, str, str]:
    """A routed request opened twice by its team's staff, then signed; (reference, team, vkey)."""
    create_teams(app)
    reference = submit_routed(app, Patient(app.test_client()))
    team_id, team_name = routed_team(app, reference)
    nurse = create_staff_user(app, "rosa.staff", teams=(team_id,))
    open_as(app, nurse, reference)
    open_as(app, nurse, reference)
    settings = app.extensions["intake.settings"]
    with app.app_context():
        checkpoints.write_checkpoint(db.session, settings, actor="system:test")
        vkey = checkpoints.trusted_verifiers(settings)[0].vkey
    return reference, team_name, vkey


@pytest.mark.parametrize(
    ("lang", "heading", "button", "check"),
    [
        ("en", "Who opened your request", "Download the proof", "Check status"),
        ("es", "Quién abrió su solicitud", "Descargar la prueba", None),
    ],
)
def test_the_status_page_lists_team_openings_and_its_proof_verifies_offline(
    page: Any,
    live_server: str,
    app: Flask,
    output_dir: Path,
    lang: str,
    heading: str,
    button: str,
    check: str | None,
) -> None:
    reference, team_name, vkey = prepare(app)
    if check is None:
        from flask_babel import lazy_gettext

        check = spanish(app, lazy_gettext("Check status"))
    page.goto(f"{live_server}/status?lang={lang}")
    page.fill("#reference", reference)
    page.fill("#date_of_birth", "1980-03-15")
    with page.expect_navigation():
        page.get_by_role("button", name=check).click()
    section = page.get_by_role("region", name=heading)
    rows = section.locator("#status-openings tbody tr")
    assert rows.count() == 2
    assert [rows.nth(i).locator("td").nth(1).inner_text() for i in range(2)] == [team_name] * 2
    assert "rosa" not in page.content().lower()
    axe_clean(page, output_dir, f"status-{lang}")
    with page.expect_download() as download_info:
        section.get_by_role("button", name=button).click()
    download = download_info.value
    assert reference not in download.url and "1980" not in download.url
    saved = output_dir / "proof.json"
    download.save_as(saved)
    data = json.loads(saved.read_text())
    assert [e["leaf"]["action"] for e in data["events"]].count("phi.viewed") == 2
    verifier = Path(sys.executable).parent / "intake-verify"
    checked = subprocess.run(
        [str(verifier), "proof", str(saved), "--key", vkey],
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
