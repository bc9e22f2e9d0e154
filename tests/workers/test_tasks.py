"""Task functions called directly, as Celery would run them in a worker."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa
from structlog.testing import capture_logs

from intake.extensions import db
from intake.models import AuditEvent, OutboxMessage, Request
from tests.conftest import reference_from
from tests.workers.conftest import email_routing_file, free_port


@pytest.fixture
def settings(base_settings, database_url, tmp_path):
    # E-mail to a port where nothing listens: every delivery fails.
    return base_settings.replace(
        database_url=database_url,
        data_dir=tmp_path / "data",
        smtp_url=f"smtp://127.0.0.1:{free_port()}",
        routing_file=email_routing_file(tmp_path),
    )


def routed(app, patient, **fields) -> tuple[str, str, int]:
    """A contact request (``fields`` over the defaults) submitted and routed; its outbox row."""
    from workers.tasks import route_request

    reference = reference_from(patient.contact(**{"topic": "copay", **fields}))
    with app.app_context():
        request_id = db.session.execute(
            sa.select(Request.id).where(Request.reference == reference)
        ).scalar_one()
        route_request.run(request_id)
        outbox_id = db.session.execute(
            sa.select(OutboxMessage.id).where(
                OutboxMessage.request_id == request_id, OutboxMessage.task == "notify_team"
            )
        ).scalar_one()
    return reference, request_id, outbox_id


def test_a_failing_channel_is_retried_with_growing_delays(app, patient, caplog):
    import re

    from workers.tasks import NOTIFY_MAX_RETRIES, notify_team

    _reference, request_id, outbox_id = routed(app, patient)
    with app.app_context():
        # Run eagerly: Celery replays each retry at once, logging the delay it would wait.
        notify_team.apply(args=[request_id], kwargs={"outbox_id": outbox_id})
    delays = [int(d) for d in re.findall(r"Retry in (\d+)s", caplog.text)]
    assert delays == [5, 10, 20, 40, 80, 160][:NOTIFY_MAX_RETRIES]


def test_a_channel_failing_past_its_retries_is_recorded_and_stops(app, patient):
    from workers.tasks import NOTIFY_MAX_RETRIES, notify_team

    reference, request_id, outbox_id = routed(app, patient)
    with app.app_context(), capture_logs() as logs:
        notify_team.apply(
            args=[request_id], kwargs={"outbox_id": outbox_id}, retries=NOTIFY_MAX_RETRIES
        )
        status = db.session.scalar(
            sa.select(OutboxMessage.status).where(OutboxMessage.id == outbox_id)
        )
        failed = db.session.execute(
            sa.select(AuditEvent).where(AuditEvent.action == "notification.failed")
        ).scalar_one()
        row = db.session.execute(
            sa.select(Request).where(Request.reference == reference)
        ).scalar_one()
    assert status == "failed"
    assert failed.reference == reference and failed.outcome == "failure"
    assert row.status == "queued", "a failed notification never undoes the routing"
    # The worker's log says it gave up, once, with ids and the error class: no address.
    [given_up] = [line for line in logs if line["event"] == "notification_failed"]
    assert given_up["log_level"] == "error" and given_up["task"] == "notify_team"
    assert (given_up["request_id"], given_up["outbox_id"]) == (request_id, outbox_id)
    assert given_up["reference"] == reference and given_up["error"].startswith("smtp: ")
    assert "@" not in json.dumps(given_up, default=str)
    assert not [line for line in logs if line["event"] == "notification_sent"]


def test_routing_twice_is_a_no_op(app, patient):
    from workers.tasks import route_request

    reference, request_id, _outbox_id = routed(app, patient)
    with app.app_context():
        route_request.run(request_id)
        route_request.run(request_id)
        events = (
            db.session.execute(
                sa.select(AuditEvent.action).where(AuditEvent.reference == reference)
            )
            .scalars()
            .all()
        )
        notifications = db.session.scalar(
            sa.select(sa.func.count())
            .select_from(OutboxMessage)
            .where(OutboxMessage.task == "notify_team")
        )
    assert events.count("request.routed") == 1 and notifications == 1


def test_sweep_publishes_pending_rows_when_the_broker_is_back(app, patient, monkeypatch):
    from workers.tasks import sweep_outbox

    published = []
    app.extensions["intake.publisher"] = lambda task, rid, oid, _attempt: published.append(
        (task, oid)
    )
    reference_from(patient.refill())
    reference_from(patient.refill())
    assert len(published) == 2
    with app.app_context():
        db.session.execute(sa.update(OutboxMessage).values(published_at=None))
        db.session.commit()
        assert sweep_outbox.run() == 2
    assert [task for task, _ in published] == ["route_request"] * 4
