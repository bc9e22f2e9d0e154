"""The transactional outbox: tasks recorded with the change, published after commit.

Why: publishing a Celery task inside the database transaction risks a task for a request that
then rolls back; publishing after commit risks losing the task if the process dies or the broker
is down in between. The outbox row is written in the same transaction as the request, published
after commit, and a periodic sweep republishes any row still pending, so a request may be
delayed by a broker outage but never lost. Consumers are idempotent, so publishing twice is safe.

This module is the one narrow door from the domain to the task queue, and it knows nothing of
Celery or of ``workers/``: the shell (``create_app``) hands it a publisher (``init_app``).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import structlog
from flask import Flask, current_app, has_app_context
from sqlalchemy import or_, select, update

from intake.clock import utcnow
from intake.extensions import DbSession
from intake.models import OutboxMessage

log = structlog.get_logger(__name__)

Publisher = Callable[[str, str, int], None]
"""Publish task ``name`` for its subject (a request id, or a user id for an account alert) and
outbox row id; raise if the broker fails."""

ACCOUNT_ALERT_TASK = "notify_account_alert"

# A message published but not marked done after INTAKE_OUTBOX_REPUBLISH_SECONDS is published
# again: the broker may have lost it (a Redis restart without persistence) or no worker took it.


def init_app(app: Flask, publisher: Publisher | None) -> None:
    """Connect the outbox to the task queue through ``publisher`` (None: rows stay pending)."""
    app.extensions["intake.publisher"] = publisher


def get_publisher() -> Publisher | None:
    return current_app.extensions.get("intake.publisher") if has_app_context() else None


def enqueue(session: DbSession, request_id: str, task: str) -> OutboxMessage:
    """Record a task for ``request_id`` in the caller's transaction."""
    message = OutboxMessage(request_id=request_id, task=task)
    session.add(message)
    return message


def enqueue_account_alert(session: DbSession, user_id: int, alert: str) -> OutboxMessage:
    """Record, in the caller's transaction, an alert to the supervisors about a staff account
    (``alert`` names what happened, e.g. ``mfa_frozen``); it carries no request and no PHI."""
    message = OutboxMessage(request_id=None, user_id=user_id, alert=alert, task=ACCOUNT_ALERT_TASK)
    session.add(message)
    return message


def publish(session: DbSession, message_ids: list[int]) -> int:
    """Publish committed outbox rows; return how many reached the broker.

    A failure leaves the rows pending for the sweep; it is logged, never raised, so a patient
    whose request is saved always gets the thanks page.
    """
    publisher = get_publisher()
    if publisher is None or not message_ids:
        return 0
    rows = session.execute(
        select(
            OutboxMessage.id, OutboxMessage.task, OutboxMessage.request_id, OutboxMessage.user_id
        ).where(OutboxMessage.id.in_(message_ids), OutboxMessage.status == "pending")
    ).all()
    published: list[int] = []
    for row in rows:
        subject = row.request_id if row.request_id is not None else str(row.user_id)
        try:
            publisher(row.task, subject, row.id)
        except Exception as error:  # noqa: BLE001 - any broker failure means "try later"
            log.warning("outbox_publish_failed", outbox_id=row.id, error=type(error).__name__)
            break
        published.append(row.id)
    session.rollback()
    if published:
        session.execute(
            update(OutboxMessage)
            .where(OutboxMessage.id.in_(published))
            .values(published_at=utcnow(), attempts=OutboxMessage.attempts + 1)
        )
        session.commit()
    return len(published)


def sweep(session: DbSession, limit: int = 500, republish_after: float | None = None) -> int:
    """Publish pending rows never published, or published too long ago without being done."""
    if republish_after is None:
        republish_after = current_app.extensions["intake.settings"].outbox_republish_seconds
    stale = utcnow() - timedelta(seconds=republish_after)
    ids = list(
        session.execute(
            select(OutboxMessage.id)
            .where(
                OutboxMessage.status == "pending",
                or_(OutboxMessage.published_at.is_(None), OutboxMessage.published_at < stale),
            )
            .order_by(OutboxMessage.id)
            .limit(limit)
        ).scalars()
    )
    session.rollback()
    count = publish(session, ids)
    if ids:
        log.info("outbox_swept", pending=len(ids), published=count)
    return count


def mark_done(
    session: DbSession,
    request_id: str,
    task: str,
    outbox_id: int | None = None,
    status: str = "done",
) -> int:
    """Mark pending rows done (one row, or all of a request's rows for ``task``) in the
    consumer's transaction; return how many were still pending."""
    condition = [
        OutboxMessage.request_id == request_id,
        OutboxMessage.task == task,
        OutboxMessage.status == "pending",
    ]
    if outbox_id is not None:
        condition.append(OutboxMessage.id == outbox_id)
    result = session.execute(
        update(OutboxMessage).where(*condition).values(status=status, done_at=utcnow())
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]
