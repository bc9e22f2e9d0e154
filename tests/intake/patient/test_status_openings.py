"""Who looked at my request: the status page lists staff openings by team, never by person.

Only opening the request's own page counts (``phi.viewed`` naming it); a queue list, which shows
a first name and last initial among many requests, is said not to be counted and is not listed.
"""

from __future__ import annotations

import re

from sqlalchemy import select

from intake.clock import utcnow
from intake.extensions import db
from intake.models import AuditEvent, Team
from intake.requests import casework
from tests.intake.patient.test_status import look_up
from tests.intake.staff.conftest import create_staff_user, create_teams, submit_routed

ROW_RE = re.compile(r'<tr data-team="([^"]*)">')


def open_as(app, user, reference: str) -> None:
    """Staff open the request's page (what GET /staff/requests/<reference> does)."""
    with app.app_context():
        actor = casework.Actor(user.id, user.username, user.role, user.teams)
        casework.open_request(
            db.session, app.extensions["intake.keyring"], reference, actor, utcnow()
        )


def routed_team(app, reference: str) -> tuple[str, str]:
    with app.app_context():
        event = db.session.execute(
            select(AuditEvent).where(
                AuditEvent.reference == reference, AuditEvent.action == "request.routed"
            )
        ).scalar_one()
        team_id = __import__("json").loads(event.details)["team"]
        return team_id, db.session.get(Team, team_id).name


def test_openings_are_listed_by_team_and_queue_views_are_not(app, client, patient):
    create_teams(app)
    reference = submit_routed(app, patient)
    team_id, team_name = routed_team(app, reference)
    nurse = create_staff_user(app, "rosa.staff", teams=(team_id,))
    before = look_up(client, reference, "1980-03-15").get_data(as_text=True)
    assert "No one on our staff has opened your request yet." in before
    assert "are not counted here" in before
    open_as(app, nurse, reference)
    open_as(app, nurse, reference)
    # A queue list naming the request: recorded, but not an opening of the request.
    with app.app_context():
        casework.Actor(nurse.id, nurse.username, "staff", (team_id,)).record(
            db.session, "phi.viewed", None, view="queue", references=[reference]
        )
        db.session.commit()
    page = look_up(client, reference, "1980-03-15").get_data(as_text=True)
    assert ROW_RE.findall(page) == [team_name, team_name]
    assert page.count(f"<td>{team_name}</td>") == 2
    assert "rosa.staff" not in page and "rosa" not in page.lower()


def test_the_opening_event_records_the_requests_team(app, patient):
    create_teams(app)
    reference = submit_routed(app, patient)
    team_id, _name = routed_team(app, reference)
    open_as(app, create_staff_user(app, "lee", teams=(team_id,)), reference)
    with app.app_context():
        viewed = db.session.execute(
            select(AuditEvent).where(AuditEvent.action == "phi.viewed")
        ).scalar_one()
    assert f'"team":"{team_id}"' in viewed.details


def test_openings_in_spanish(app, client, patient):
    create_teams(app)
    reference = submit_routed(app, patient)
    team_id, team_name = routed_team(app, reference)
    open_as(app, create_staff_user(app, "ana", teams=(team_id,)), reference)
    page = look_up(client, reference, "1980-03-15", "es").get_data(as_text=True)
    assert "Quién abrió su solicitud" in page
    assert ROW_RE.findall(page) == [team_name]
    assert "Descargar la prueba" in page


def test_an_opening_recorded_before_teams_were_written_shows_a_pharmacy_team(app, client, patient):
    create_teams(app)
    reference = submit_routed(app, patient)
    with app.app_context():
        casework.Actor(1, "old", "staff", ()).record(db.session, "phi.viewed", reference)
        db.session.commit()
    page = look_up(client, reference, "1980-03-15").get_data(as_text=True)
    assert ROW_RE.findall(page) == [""]
    assert "A pharmacy team" in page


def test_the_proof_download_needs_a_recent_lookup_in_this_browser(app, client, patient):
    reference = submit_routed(app, patient)
    page = client.get("/status").get_data(as_text=True)
    token = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', page)[1]
    refused = client.post("/status/proof", data={"csrf_token": token})
    assert refused.status_code == 403
    assert "enter your reference number and date of birth again" in refused.get_data(as_text=True)
    assert client.post("/status/proof", data={}).status_code == 400
    assert reference not in refused.get_data(as_text=True)


def download_proof(client, page_html: str):
    token = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', page_html)[1]
    return client.post("/status/proof", data={"csrf_token": token})


def test_the_patient_downloads_a_proof_that_verifies_offline_without_staff_names(
    app, client, patient, tmp_path
):
    import json
    import subprocess
    import sys
    from pathlib import Path

    from intake.audit import checkpoints

    create_teams(app)
    reference = submit_routed(app, patient)
    team_id, _name = routed_team(app, reference)
    open_as(app, create_staff_user(app, "rosa.staff", teams=(team_id,)), reference)
    page = look_up(client, reference, "1980-03-15").get_data(as_text=True)
    assert "not ready yet" in download_proof(client, page).get_data(as_text=True)
    with app.app_context():
        checkpoints.write_checkpoint(
            db.session, app.extensions["intake.settings"], actor="system:test"
        )
        vkey = checkpoints.trusted_verifiers(app.extensions["intake.settings"])[0].vkey
    page = look_up(client, reference, "1980-03-15").get_data(as_text=True)
    answer = download_proof(client, page)
    assert answer.status_code == 200
    assert answer.headers["Content-Disposition"].startswith("attachment;")
    assert reference not in answer.request.url and "1980" not in answer.request.url
    text = answer.get_data(as_text=True)
    data = json.loads(text)
    assert [e["leaf"]["action"] for e in data["events"]] == [
        "request.submitted",
        "request.routed",
        "phi.viewed",
        "status.looked_up",  # the first look-up; the second one is pending
    ]
    assert data["pending"] >= 1
    assert all("opening" not in e for e in data["events"])
    # Hashes and signatures are long hex or base64 runs, where "1980" or "rosa" turns up by
    # chance; a name or a birth date is never one of those runs.
    words = re.sub(r'"[A-Za-z0-9+/=]{40,}"', '""', text)
    assert "rosa" not in words and "user:" not in words and "1980" not in words
    assert data["events"][2]["leaf"]["team"] == team_id
    proof_file = tmp_path / "proof.json"
    proof_file.write_text(text)
    verifier = Path(sys.executable).parent / "intake-verify"
    checked = subprocess.run(
        [str(verifier), "proof", str(proof_file), "--key", vkey], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    with app.app_context():
        exported = db.session.execute(
            select(AuditEvent).where(AuditEvent.action == "audit.exported")
        ).scalar_one()
    assert (exported.actor, exported.reference) == ("patient", reference)
    assert '"openings":false' in exported.details


def test_the_proof_grant_lasts_a_few_minutes(app, client, patient):
    from tests.intake.staff.conftest import install_clock

    reference = submit_routed(app, patient)
    clock = install_clock(app)
    page = look_up(client, reference, "1980-03-15").get_data(as_text=True)
    clock.advance(minutes=11)
    assert download_proof(client, page).status_code == 403


def test_proof_downloads_are_rate_limited_like_the_look_up(app, settings, client, patient):
    reference = submit_routed(app, patient)
    page = look_up(client, reference, "1980-03-15").get_data(as_text=True)
    app.extensions["intake.settings"] = settings.replace(submit_rate_limit="2/minute")
    codes = [download_proof(client, page).status_code for _ in range(4)]
    assert codes[:2] == [200, 200] and 429 in codes[2:]
