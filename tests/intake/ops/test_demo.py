"""Demo data a pharmacist would believe: due after received, a realistic backlog, a week of it."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from intake.clock import utcnow
from intake.extensions import db
from intake.models import OPEN_STATUSES, Request
from intake.ops import demo


def test_demo_requests_are_due_after_they_arrive_with_a_realistic_share_overdue(app):
    with app.app_context():
        demo.seed(app, count=40)
        now = utcnow()
        rows = db.session.execute(
            select(Request.created_at, Request.sla_due_at, Request.status)
        ).all()
    assert len(rows) == 40
    assert all(due is not None and due > received for received, due, _ in rows)
    overdue = [1 for _, due, status in rows if status in OPEN_STATUSES and due < now]
    assert 0.10 <= len(overdue) / len(rows) <= 0.20, len(overdue)
    # Several days of history, and a living queue of requests not yet due.
    received = [r for r, _, _ in rows]
    assert max(received) - min(received) >= timedelta(days=3)
    assert any(status in OPEN_STATUSES and due > now for _, due, status in rows)
    assert any(status == "completed" for _, _, status in rows)
