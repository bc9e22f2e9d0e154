"""Compliance officers download the same proof a patient gets, with every event's opening."""

from __future__ import annotations

import json

from sqlalchemy import select

from intake.audit import checkpoints
from intake.extensions import db
from intake.models import AuditEvent
from intake_verify.proof import verify_proof
from tests.intake.compliance.conftest import submit_routed

CSRF_RE = r'name="csrf_token" value="([^"]+)"'


def test_the_access_report_downloads_a_proof_with_openings(app, patient, officer_client):
    import re

    reference, _team = submit_routed(app, patient)
    settings = app.extensions["intake.settings"]
    with app.app_context():
        checkpoints.write_checkpoint(db.session, settings, actor="system:test")
        vkey = checkpoints.trusted_verifiers(settings)[0].vkey
    page = officer_client.get(f"/compliance/access/{reference}").get_data(as_text=True)
    assert "Download the proof" in page
    token = re.search(CSRF_RE, page)[1]
    answer = officer_client.post(
        f"/compliance/access/{reference}/proof", data={"csrf_token": token}
    )
    assert answer.status_code == 200
    data = json.loads(answer.get_data(as_text=True))
    assert [e["leaf"]["action"] for e in data["events"]] == ["request.submitted", "request.routed"]
    assert all("opening" in e for e in data["events"])
    report = verify_proof(data, [vkey])
    assert report.ok, report.problem
    with app.app_context():
        exported = db.session.execute(
            select(AuditEvent).where(AuditEvent.action == "audit.exported")
        ).scalar_one()
    assert exported.reference == reference and exported.actor.startswith("user:")
    assert json.loads(exported.details)["username"] == "olivia"
    # Without the page's token the download is refused.
    assert officer_client.post(f"/compliance/access/{reference}/proof").status_code == 400
