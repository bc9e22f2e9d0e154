"""A notification's outbox row is claimed before it is sent: one sender, and none lost."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from intake.extensions import db
from intake.models import OutboxMessage, Request
from intake.requests import outbox
from tests.conftest import reference_from


def _notify_row(app, patient) -> int:
    reference = reference_from(patient.contact(topic="copay"))
    with app.app_context():
        request = db.session.execute(
            select(Request).where(Request.reference == reference)
        ).scalar_one()
        message = outbox.enqueue(db.session, request.id, "notify_team")
        db.session.commit()
        return message.id


def test_only_one_of_two_claimers_gets_the_row(app, patient):
    row_id = _notify_row(app, patient)
    with app.app_context():
        assert outbox.claim(db.session, row_id) is True
        assert outbox.claim(db.session, row_id) is False
        row = db.session.get(OutboxMessage, row_id)
        assert row is not None and row.status == "sending" and row.claimed_at is not None


def test_a_claim_whose_sender_died_is_taken_again_after_the_lease(app, patient):
    row_id = _notify_row(app, patient)
    with app.app_context():
        assert outbox.claim(db.session, row_id)
        assert outbox.claim(db.session, row_id, lease=timedelta(0)) is True


def test_the_sweep_republishes_an_abandoned_claim_but_not_a_live_one(app, patient):
    row_id = _notify_row(app, patient)
    published: list[int] = []
    with app.app_context():
        app.extensions["intake.publisher"] = lambda _task, _subject, outbox_id, _attempt: (
            published.append(outbox_id)
        )
        assert outbox.claim(db.session, row_id)
        outbox.sweep(db.session, republish_after=3600)
        assert row_id not in published, "a row being sent right now was published again"
        row = db.session.get(OutboxMessage, row_id)
        assert row is not None and row.claimed_at is not None
        row.claimed_at -= timedelta(hours=1)  # the sender died an hour ago
        db.session.commit()
        outbox.sweep(db.session, republish_after=3600)
        assert row_id in published, "a row whose sender died was left sending forever"


def test_a_released_row_can_be_claimed_and_a_done_row_cannot(app, patient):
    row_id = _notify_row(app, patient)
    with app.app_context():
        assert outbox.claim(db.session, row_id)
        outbox.release(db.session, row_id)
        assert outbox.claim(db.session, row_id)
        row = db.session.get(OutboxMessage, row_id)
        assert row is not None and row.request_id is not None
        assert outbox.mark_done(db.session, row.request_id, "notify_team", row_id) == 1
        db.session.commit()
        assert outbox.claim(db.session, row_id, lease=timedelta(0)) is False
