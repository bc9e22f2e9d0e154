"""Staff who are not compliance officers cannot fetch a compliance proof (with openings)."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import func, select

from intake.audit import checkpoints
from intake.extensions import db
from intake.models import AuditEvent
from tests.intake.compliance.conftest import submit_routed


@pytest.mark.parametrize("role", ["staff", "supervisor"])
def test_only_a_compliance_officer_gets_a_proof_with_openings(app, patient, staff, role):
    reference, team = submit_routed(app, patient)
    settings = app.extensions["intake.settings"]
    # A supervisor configured as a break-glass reviewer may see the review pages, not this.
    app.extensions["intake.settings"] = settings.replace(break_glass_reviewers=("supervisor",))
    with app.app_context():
        checkpoints.write_checkpoint(db.session, settings, actor="system:test")
    client = staff.login(staff.create(f"mallory-{role}", role, teams=(team,)))
    pages = [client.get(p, follow_redirects=True).get_data(as_text=True) for p in ("/staff/queue",)]
    token = next(m[1] for p in pages if (m := re.search(r'name="csrf_token" value="([^"]+)"', p)))
    answer = client.post(f"/compliance/access/{reference}/proof", data={"csrf_token": token})
    assert answer.status_code == 404
    assert b"canonical" not in answer.data and b"prev_hash" not in answer.data
    with app.app_context():
        exported = db.session.scalar(
            select(func.count())
            .select_from(AuditEvent)
            .where(AuditEvent.action == "audit.exported")
        )
    assert exported == 0
