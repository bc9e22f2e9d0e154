"""Automatic assignment through the real pipeline: a patient form, redis-server and a Celery
worker process; the routed request arrives assigned, with its audit event."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa

from intake.extensions import db
from intake.models import AuditEvent, Request, User
from tests.conftest import reference_from
from tests.intake.staff.conftest import create_teams
from tests.workers.conftest import email_routing_file, wait_until
from tests.workers.test_language_routing import add_user


@pytest.fixture
def settings(base_settings, database_url, tmp_path, redis_server):
    path = email_routing_file(tmp_path)
    text = path.read_text()
    team = 'id = "benefits"\nname = "Benefits and copay assistance"\n'
    assert team in text
    path.write_text(text.replace(team, team + 'assignment = "round_robin"\ncap = 5\n'))
    return base_settings.replace(
        database_url=database_url,
        data_dir=tmp_path / "data",
        redis_url=redis_server.url,
        routing_file=path,
        outbox_sweep_seconds=1,
        outbox_republish_seconds=10,
        broker_visibility_timeout=5,
    )


def assignee(app, reference) -> tuple[str, str | None] | None:
    with app.app_context():
        row = db.session.execute(
            sa.select(Request.status, User.username)
            .outerjoin(User, User.id == Request.assignee_id)
            .where(Request.reference == reference)
        ).first()
        db.session.rollback()
        return (row.status, row.username) if row and row.username else None


def test_a_routed_request_arrives_assigned(app, patient, celery_processes, settings):
    create_teams(app)
    add_user(app, "ana", ["benefits"], ["en"])
    add_user(app, "quinn", ["benefits"], ["en"])
    celery_processes(settings).wait_ready()

    first = reference_from(patient.contact(topic="copay"))
    assert wait_until(lambda: assignee(app, first), 30, message="first assigned") == (
        "queued",
        "ana",
    )
    # Sent once the first is dealt: two requests routed at once by the worker's two processes
    # may be dealt in either order, and round robin follows the order they are dealt in.
    second = reference_from(patient.contact(topic="insurance"))
    assert wait_until(lambda: assignee(app, second), 30, message="second assigned") == (
        "queued",
        "quinn",
    )
    with app.app_context():
        reasons = {
            e.reference: json.loads(e.details)["reason"]
            for e in db.session.execute(
                sa.select(AuditEvent).where(AuditEvent.action == "request.assigned")
            ).scalars()
        }
    assert reasons == {
        first: "assigned to ana: next in turn, 0 of 5 open",
        second: "assigned to quinn: next in turn, 0 of 5 open",
    }
