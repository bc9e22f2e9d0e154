"""The audit chain from day one: linked hashes, append-only in the database."""

from __future__ import annotations

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import DatabaseError

from intake.audit.chain import GENESIS_HASH, record_event, verify_chain, verify_events
from intake.extensions import db
from intake.models import AuditEvent


def write_events(count: int) -> None:
    for index in range(count):
        record_event(
            db.session,
            actor="system:test",
            action="request.routed",
            reference=f"R-0000-000{index % 10}",
            details={"n": index},
        )
    db.session.commit()


def test_events_form_a_chain(app):
    with app.app_context():
        write_events(5)
        events = db.session.execute(select(AuditEvent).order_by(AuditEvent.seq)).scalars().all()
        assert [e.seq for e in events] == [1, 2, 3, 4, 5]
        assert events[0].prev_hash == GENESIS_HASH
        assert all(b.prev_hash == a.hash for a, b in zip(events, events[1:], strict=False))
        report = verify_chain(db.session)
        assert report.ok and report.events == 5 and report.last_hash == events[-1].hash


def test_update_and_delete_are_refused_by_the_database(app):
    with app.app_context():
        write_events(2)
        for statement in (
            "UPDATE audit_events SET actor = 'someone-else' WHERE seq = 1",
            "DELETE FROM audit_events WHERE seq = 2",
        ):
            with pytest.raises(DatabaseError, match="append-only"):
                db.session.execute(text(statement))
            db.session.rollback()
        assert verify_chain(db.session).ok
        assert (
            db.session.scalar(select(AuditEvent.actor).where(AuditEvent.seq == 1)) == "system:test"
        )


def test_verify_names_the_first_changed_event(app):
    with app.app_context():
        write_events(4)
        events = db.session.execute(select(AuditEvent).order_by(AuditEvent.seq)).scalars().all()
        db.session.expunge_all()
        events[2].outcome = "failure"
        report = verify_events(events)
        assert not report.ok and report.first_bad_seq == 3
        missing = verify_events([events[0], events[1], events[3]])
        assert (missing.ok, missing.first_bad_seq, missing.problem) == (False, 3, "missing event")


def test_details_must_be_plain_values(app):
    with app.app_context(), pytest.raises(TypeError):
        record_event(
            db.session,
            actor="patient",
            action="request.submitted",
            details={"form": {"first_name": "x"}},
        )


def test_unknown_actions_are_refused(app):
    with app.app_context(), pytest.raises(ValueError):
        record_event(db.session, actor="patient", action="request.vanished")
