"""SLA escalation: an overdue open request goes one priority step up, once, and supervisors
are told."""

from __future__ import annotations

from datetime import timedelta

import sqlalchemy as sa

from intake.extensions import db
from intake.models import OutboxMessage
from intake.requests import casework
from tests.intake.staff.conftest import events_since, last_seq, request_state


def escalate(app, at):
    with app.app_context():
        return casework.escalate_overdue(db.session, at)


def supervisor_messages(app) -> list[tuple[str, str]]:
    with app.app_context():
        rows = db.session.execute(
            sa.select(OutboxMessage.request_id, OutboxMessage.status)
            .where(OutboxMessage.task == "notify_supervisors")
            .order_by(OutboxMessage.id)
        ).all()
        return [tuple(row) for row in rows]


def test_overdue_requests_go_one_step_up_once(app, route, clock, make_user, staff_login):
    t0 = clock()
    made = {
        "normal": route("refill", location="main", at=t0 - timedelta(days=5)),  # due 1bd
        "high": route("refill", location="infusion", at=t0 - timedelta(days=1)),  # due 8h
        "urgent": route("contact", topic="side_effect", at=t0 - timedelta(hours=2)),  # due 1h
        "not_due": route("refill", location="main", at=t0),
        "closed": route("refill", location="main", at=t0 - timedelta(days=5)),
    }
    ana = staff_login(make_user("ana", teams=("refills-main", "infusion", "clinical")))
    ana.act(made["closed"], "status", status="cancelled")
    since = last_seq(app)

    escalated = escalate(app, t0)

    overdue = {made["normal"], made["high"], made["urgent"]}
    assert {reference for reference, _outbox_id in escalated} == overdue
    priorities = {name: request_state(app, ref)["priority"] for name, ref in made.items()}
    assert priorities == {
        "normal": "high",
        "high": "urgent",
        "urgent": "urgent",  # nothing above urgent, but the supervisors still hear of it
        "not_due": "normal",
        "closed": "normal",
    }
    events = events_since(app, since)
    assert sorted((e.action, e.reference) for e in events) == sorted(
        ("request.escalated", ref) for ref in overdue
    )
    by_reference = {e.reference: e.details for e in events}
    assert by_reference[made["normal"]]["old_priority"] == "normal"
    assert by_reference[made["normal"]]["new_priority"] == "high"
    assert all(e.actor == "system:escalate_overdue" for e in events)
    ids = {request_state(app, ref)["id"] for ref in overdue}
    assert sorted(supervisor_messages(app)) == sorted((i, "pending") for i in ids)
    assert {outbox_id for _ref, outbox_id in escalated} == set(
        _outbox_ids(app, "notify_supervisors")
    )

    # The next beat run, and the one after, change nothing more.
    since = last_seq(app)
    assert escalate(app, t0 + timedelta(minutes=1)) == []
    assert escalate(app, t0 + timedelta(hours=20)) == []  # "not_due" is due in 1bd
    assert events_since(app, since) == []
    assert len(supervisor_messages(app)) == 3
    assert request_state(app, made["normal"])["priority"] == "high"

    # Staff see it: the request now carries the higher priority and says why.
    page = ana.get(f"/staff/requests/{made['normal']}").get_data(as_text=True)
    assert '<span class="badge badge--high" data-priority="high">High</span>' in page
    assert "Priority raised to high: past its due time" in page
    assert "(overdue)" in page


def _outbox_ids(app, task: str) -> list[int]:
    with app.app_context():
        return list(
            db.session.execute(sa.select(OutboxMessage.id).where(OutboxMessage.task == task))
            .scalars()
            .all()
        )
