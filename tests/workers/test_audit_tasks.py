"""The beat job that signs audit checkpoints, called directly as a worker would run it."""

from __future__ import annotations

import json
from datetime import timedelta

from sqlalchemy import select

from intake.audit.chain import record_event
from intake.audit.checkpoints import checkpoints_path, verify_trail
from intake.extensions import db
from intake.models import AuditEvent


def test_the_beat_job_signs_new_events_and_skips_an_idle_chain(app):
    from workers.tasks import sign_audit_checkpoint

    settings = app.extensions["intake.settings"]
    with app.app_context():
        assert sign_audit_checkpoint.run() is None  # nothing to sign yet
        record_event(db.session, actor="system:test", action="request.routed")
        db.session.commit()
        assert sign_audit_checkpoint.run() == 1
        assert sign_audit_checkpoint.run() is None  # only its own event since: idle
        lines = checkpoints_path(settings).read_text().splitlines()
        assert [json.loads(line)["seq"] for line in lines] == [1]
        event = db.session.execute(select(AuditEvent).where(AuditEvent.seq == 2)).scalar_one()
        assert (event.action, event.actor) == ("audit.checkpointed", "system:sign_audit_checkpoint")
        assert verify_trail(db.session, settings).chain.ok


def test_beat_runs_the_job_every_audit_checkpoint_seconds(app):
    from workers.celery_app import celery_init_app

    app.extensions["intake.settings"] = app.extensions["intake.settings"].replace(
        audit_checkpoint_seconds=120.0
    )
    entry = celery_init_app(app).conf.beat_schedule["sign-audit-checkpoint"]
    assert entry["task"] == "workers.tasks.sign_audit_checkpoint"
    assert entry["schedule"] == timedelta(seconds=120)
