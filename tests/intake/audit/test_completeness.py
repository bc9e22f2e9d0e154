"""Every audit action Intake knows is really written by the code path that does it.

One scenario walks a request from submission to retention through the same functions the
pages, workers and commands call; the test fails if any action of ``intake.audit.chain.ACTIONS`` was
never written, or if something wrote an action the list does not know.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy import select

from intake.accounts import services as accounts
from intake.audit.chain import ACTIONS
from intake.clock import utcnow
from intake.compliance.break_glass import review_break_glass
from intake.crypto.rotation import record_rotation
from intake.extensions import db
from intake.models import AuditEvent, OutboxMessage, Request
from intake.ops.backup import create_backup, restore_backup
from intake.requests import assignment, casework, routing
from intake.requests.notifications import send_outbox_notice
from intake.requests.retention import purge_expired
from intake.requests.routing import load_routing
from intake.requests.status_lookup import look_up_status
from tests.conftest import hidden_fields, reference_from
from tests.workers.conftest import email_routing_file, free_port

PASSWORD = "Tall-Cactus-4417-x"


@pytest.fixture(params=["sqlite"])
def backend(request):
    return request.param


def login(client, username: str, password: str, otp: str) -> int:
    page = client.get("/staff/login")
    data = {
        **hidden_fields(page.get_data(as_text=True)),
        "username": username,
        "password": password,
        "otp": otp,
    }
    return client.post("/staff/login", data=data).status_code


def test_every_audit_action_is_written_by_its_code_path(app, patient, runner, settings, tmp_path):
    import pyotp

    keyring = app.extensions["intake.keyring"]
    table = app.extensions["intake.routing"]
    now = utcnow()
    with app.app_context():
        for team in table.teams.values():
            accounts.create_team(db.session, team.id, team.name, team.spanish, "system:test")
        made = {
            name: accounts.create_user(
                db.session,
                keyring,
                username=name,
                password=PASSWORD,
                role=role,
                teams=teams,
                actor="system:test",
            )
            for name, role, teams in (
                ("ana", "staff", ["refills-main"]),
                ("ben", "staff", ["clinical"]),
                ("pia", "staff", ["patient-services"]),
                ("olga", "compliance", []),
            )
        }
        db.session.commit()
        ids = {name: new.user.id for name, new in made.items()}

    reference = reference_from(patient.refill())
    with app.app_context():
        row = db.session.execute(select(Request).where(Request.reference == reference)).scalar_one()
        routed = routing.route_request(db.session, table, row.id, now)
        assert routed is not None
        settings_now = app.extensions["intake.settings"]
        send_outbox_notice(
            db.session,
            task="notify_team",
            request_id=row.id,
            outbox_id=routed.notify_outbox_id,
            settings=settings_now,
            table=table,
            attempt=0,
            max_retries=0,
        )
        # A team reached only by e-mail, through an SMTP port where nothing listens.
        failing = load_routing(email_routing_file(tmp_path))
        extra = casework.outbox.enqueue(db.session, row.id, "notify_team")
        db.session.commit()
        send_outbox_notice(
            db.session,
            task="notify_team",
            request_id=row.id,
            outbox_id=extra.id,
            settings=settings_now.replace(smtp_url=f"smtp://127.0.0.1:{free_port()}"),
            table=failing,
            attempt=0,
            max_retries=0,
        )

    # Automatic assignment (patient services assigns): nobody available, then someone back.
    transfer_request = reference_from(patient.contact(topic="transfer"))
    with app.app_context():
        pending = db.session.execute(
            select(Request).where(Request.reference == transfer_request)
        ).scalar_one()
        assignment.set_away(db.session, ids["pia"], True, now, actor="system:test")
        db.session.commit()
        assert routing.route_request(db.session, table, pending.id, now) is not None
        left = assignment.assign_request(db.session, table, pending.id, now, record_unassigned=True)
        assert left.assignee is None
        assignment.set_away(db.session, ids["pia"], False, now, actor="system:test")
        db.session.commit()
        given = assignment.assign_request(db.session, table, pending.id, now, trigger="back")
        assert given.assignee == "pia"

    # Logins: a success, failures up to a lock, a logout.
    client = app.test_client()
    secret = made["ana"].totp_secret
    for _ in range(5):
        login(app.test_client(), "ana", "wrong-password-xx", "000000")
    assert login(client, "ben", PASSWORD, pyotp.TOTP(made["ben"].totp_secret).now()) == 303
    client.post(
        "/staff/logout", data=hidden_fields(client.get("/staff/search").get_data(as_text=True))
    )
    assert secret

    with app.app_context():
        ana = casework.Actor(ids["ana"], "ana", "staff", ("refills-main",))
        ben = casework.Actor(ids["ben"], "ben", "staff", ("clinical",))
        officer = casework.Actor(ids["olga"], "olga", "compliance", ())
        casework.open_request(db.session, keyring, reference, ana, now)
        casework.claim(db.session, reference, ana, now)
        casework.release(db.session, reference, ana, now)
        casework.change_status(db.session, reference, ana, "in_progress", now)
        casework.add_note(db.session, keyring, reference, ana, "Called the prescriber", now)
        casework.search(db.session, keyring, ana, reference=reference)
        casework.open_request(
            db.session,
            keyring,
            reference,
            ben,
            now,
            break_glass_reason="Covering the on-call shift",
        )
        glass = db.session.execute(
            select(AuditEvent.seq).where(AuditEvent.action == "phi.break_glass")
        ).scalar_one()
        review_break_glass(db.session, officer, glass, "Confirmed with the on-call roster", now)
        casework.escalate_overdue(db.session, now + timedelta(days=30))
        casework.transfer(
            db.session,
            reference,
            ana,
            "refills-north",
            "Patient moved north",
            list(table.teams),
            now,
        )
        look_up_status(db.session, keyring, reference, "1980-03-15", None)
        accounts.disable_user(db.session, "ben", "system:test", now)
        record_rotation(db.session, keyring, keyring.with_new_primary(), "system:test")
        casework.change_status(
            db.session,
            reference,
            casework.Actor(ids["ana"], "ana", "supervisor", ()),
            "cancelled",
            now,
        )
        db.session.commit()
        assert purge_expired(db.session, now + timedelta(days=10_000), days=1) == [reference]

    officer_client = app.test_client()
    assert (
        login(officer_client, "olga", PASSWORD, pyotp.TOTP(made["olga"].totp_secret).now()) == 303
    )
    assert officer_client.get("/compliance/audit.csv?action=phi.viewed").status_code == 200
    assert runner.invoke(args=["audit", "checkpoint"]).exit_code == 0
    assert runner.invoke(args=["audit", "verify"]).exit_code == 0

    # A backup, restored into a new installation: backup.restored is in the restored trail.
    backup = create_backup(settings, tmp_path / "backups", actor="system:test")
    restored_url = f"sqlite:///{tmp_path / 'restored.sqlite3'}"
    restored = restore_backup(
        settings.replace(data_dir=tmp_path / "restored"),
        backup.path,
        restored_url,
        keyring=keyring,
        actor="system:test",
    )
    assert restored.event_seq is not None and restored.notes == []

    with app.app_context():
        written = set(db.session.execute(select(AuditEvent.action).distinct()).scalars())
        assert db.session.execute(select(OutboxMessage)).first() is not None
    engine = sa.create_engine(restored_url, poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        written |= set(conn.scalars(select(AuditEvent.action).distinct()))
    engine.dispose()
    assert written - set(ACTIONS) == set(), "an action missing from intake.audit.chain.ACTIONS"
    assert set(ACTIONS) - written == set(), "actions no code path wrote"
