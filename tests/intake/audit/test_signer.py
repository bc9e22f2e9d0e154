"""The signer: the only process that signs checkpoints (it replaced the beat job of workers)."""

from __future__ import annotations

import json
import threading

import pytest
from sqlalchemy import select

from intake.audit import keys
from intake.audit.chain import record_event
from intake.audit.checkpoints import AnchorCursor, checkpoints_path, verify_trail
from intake.audit.signer import run_signer, sign_once
from intake.extensions import db
from intake.models import AuditEvent


def test_the_signer_signs_new_events_and_skips_an_idle_chain(app):
    settings = app.extensions["intake.settings"]
    cursor = AnchorCursor()
    assert sign_once(app, cursor) is None  # nothing to sign yet
    with app.app_context():
        record_event(db.session, actor="system:test", action="request.routed")
        db.session.commit()
    assert sign_once(app, cursor) == 1
    assert cursor.mark is not None and cursor.mark.seq == 1  # the next one reads only what is new
    assert sign_once(app, cursor) is None  # only its own event since: idle
    with app.app_context():
        record_event(db.session, actor="system:test", action="request.routed")
        db.session.commit()
    assert sign_once(app, cursor) == 3
    with app.app_context():
        lines = checkpoints_path(settings).read_text().splitlines()
        assert [json.loads(line)["seq"] for line in lines] == [1, 3]
        event = db.session.execute(select(AuditEvent).where(AuditEvent.seq == 2)).scalar_one()
        assert (event.action, event.actor) == ("audit.checkpointed", "system:signer")
        assert verify_trail(db.session, settings).chain.ok


def test_the_signer_signs_on_start_then_every_checkpoint_seconds(app):
    app.extensions["intake.settings"] = app.extensions["intake.settings"].replace(
        audit_checkpoint_seconds=0.2
    )
    with app.app_context():
        record_event(db.session, actor="system:test", action="request.routed")
        db.session.commit()
    stop = threading.Event()
    thread = threading.Thread(target=run_signer, args=(app, stop))
    thread.start()
    try:
        path = checkpoints_path(app.extensions["intake.settings"])
        for _ in range(50):
            if path.exists():
                break
            stop.wait(0.05)
        assert len(path.read_text().splitlines()) == 1  # signed on start
        with app.app_context():
            record_event(db.session, actor="system:test", action="request.routed")
            db.session.commit()
        for _ in range(50):
            if len(path.read_text().splitlines()) == 2:
                break
            stop.wait(0.05)
        assert len(path.read_text().splitlines()) == 2  # and again at the next tick
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()


def test_workers_no_longer_sign(app):
    from workers.celery_app import celery_init_app

    schedule = celery_init_app(app).conf.beat_schedule
    tasks = [entry["task"] for entry in schedule.values()]
    assert tasks and not any("checkpoint" in task or "sign_audit" in task for task in tasks)
    import workers.tasks

    assert not hasattr(workers.tasks, "sign_audit_checkpoint")


def test_the_signer_command_signs_once_and_keys_generate_prints_a_pair(app, runner):
    with app.app_context():
        record_event(db.session, actor="system:test", action="request.routed")
        db.session.commit()
    result = runner.invoke(args=["audit", "signer", "--once"])
    assert result.exit_code == 0, result.output
    assert len(checkpoints_path(app.extensions["intake.settings"]).read_text().splitlines()) == 1
    printed = runner.invoke(args=["audit", "keys", "generate", "--name", "rx.example/intake-audit"])
    lines = dict(
        line.split("=", 1) for line in printed.output.splitlines() if not line.startswith("#")
    )
    signer = keys.parse_skey(lines["INTAKE_AUDIT_SIGNING_KEY"], "unused")
    verifier = keys.parse_vkey(lines["INTAKE_AUDIT_VERIFY_KEYS"], "unused")
    assert signer.name == verifier.name == "rx.example/intake-audit"
    assert signer.verifier.raw == verifier.raw
    assert "PRIVATE" not in lines["INTAKE_AUDIT_VERIFY_KEYS"]


def test_the_origin_comes_from_the_public_url_unless_set(settings):
    assert keys.log_origin(settings.replace(public_url="https://rx.example.org")) == (
        "rx.example.org/intake-audit"
    )
    assert keys.log_origin(settings.replace(audit_origin="audit.example/log")) == (
        "audit.example/log"
    )


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_production_web_and_workers_refuse_the_signing_key(settings):
    from config.settings import SettingsError
    from intake import create_app

    skey, _ = keys.generate_keys("rx.example/intake-audit")
    production = settings.replace(profile="production", audit_signing_key=skey)
    with pytest.raises(SettingsError, match="INTAKE_AUDIT_SIGNING_KEY is set, but only the signer"):
        create_app(production)


def test_the_signer_refuses_a_key_nobody_could_verify(app):
    skey, _ = keys.generate_keys("rx.example/intake-audit")
    _, other = keys.generate_keys("rx.example/intake-audit")
    app.extensions["intake.settings"] = app.extensions["intake.settings"].replace(
        audit_signing_key=skey, audit_verify_keys=other
    )
    with pytest.raises(keys.AuditKeyError, match="not in INTAKE_AUDIT_VERIFY_KEYS"):
        run_signer(app, once=True)


def test_a_running_signer_refuses_and_says_so_when_older_history_is_changed(app, caplog):
    """Damage before the last checkpoint: each tick reads only what is new, so the signer also
    holds the whole trail on start and every FULL_CHECK_TICKS ticks, and refuses until repaired."""
    from intake.audit.checkpoints import CheckpointError
    from tests.intake.audit.test_database_attacker import as_database_owner

    cursor = AnchorCursor()
    with app.app_context():
        for _ in range(4):
            record_event(db.session, actor="system:test", action="request.routed")
        db.session.commit()
    assert sign_once(app, cursor) == 4
    with app.app_context():
        # A database owner rewrites event 2, already signed; its stored hash is left alone, so
        # the signed head (seq 4) still matches and a check of what is new sees nothing.
        as_database_owner("UPDATE audit_events SET actor = 'system:someone-else' WHERE seq = 2")
        record_event(db.session, actor="system:test", action="request.routed")
        db.session.commit()
    with pytest.raises(CheckpointError, match="damaged at seq 2"):
        run_signer(app, once=True)
    with app.app_context():
        signed = [
            json.loads(line)["seq"]
            for line in checkpoints_path(app.extensions["intake.settings"]).read_text().splitlines()
        ]
    assert signed == [4], "a checkpoint was signed over a damaged trail"
