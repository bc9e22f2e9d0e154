"""Celery tasks: thin wrappers that call the domain in ``intake/``. Arguments are ids only."""

from __future__ import annotations

from typing import Any

import structlog
from celery import shared_task
from flask import current_app
from sqlalchemy import select
from sqlalchemy.exc import InterfaceError, OperationalError

from intake import casework, outbox, routing
from intake.audit import record_event
from intake.clock import now, utcnow
from intake.extensions import db
from intake.models import OutboxMessage, Request
from intake.notifications import Notice, NotificationError, deliver

log = structlog.get_logger(__name__)

# A lost database connection is worth retrying; a bug is not.
TRANSIENT = (OperationalError, InterfaceError)
NOTIFY_MAX_RETRIES = 6


@shared_task(
    acks_late=True,
    reject_on_worker_lost=True,
    autoretry_for=TRANSIENT,
    retry_backoff=2,
    retry_backoff_max=60,
    max_retries=20,
)
def route_request(request_id: str, outbox_id: int | None = None) -> None:
    """Route a received request to its team (idempotent), then publish its notification."""
    structlog.contextvars.bind_contextvars(task="route_request", request_id=request_id)
    try:
        table = current_app.extensions["intake.routing"]
        routed = routing.route_request(db.session, table, request_id, utcnow())
        if routed is None:
            log.info("route_skipped", reason="already routed or unknown")
            return
        log.info(
            "request_routed", reference=routed.reference, team=routed.team, priority=routed.priority
        )
        outbox.publish(db.session, [routed.notify_outbox_id])
    finally:
        structlog.contextvars.unbind_contextvars("task", "request_id")


@shared_task(
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    autoretry_for=TRANSIENT,
    retry_backoff=2,
    max_retries=20,
)
def notify_team(self: Any, request_id: str, outbox_id: int | None = None) -> None:
    """Tell the request's team it is waiting; a failed channel retries, then is recorded."""
    settings = current_app.extensions["intake.settings"]
    table = current_app.extensions["intake.routing"]
    pending = select(OutboxMessage.id).where(
        OutboxMessage.request_id == request_id,
        OutboxMessage.task == routing.NOTIFY_TASK,
        OutboxMessage.status == "pending",
    )
    if outbox_id is not None:
        pending = pending.where(OutboxMessage.id == outbox_id)
    if db.session.execute(pending).first() is None:
        log.info("notify_skipped", request_id=request_id, reason="already sent")
        return
    request = db.session.get(Request, request_id)
    if request is None or request.team not in table.teams:
        outbox.mark_done(db.session, request_id, routing.NOTIFY_TASK, outbox_id, status="failed")
        db.session.commit()
        return
    team = table.teams[request.team]
    notice = Notice(
        reference=request.reference,
        kind=request.kind,
        topic=request.topic,
        priority=request.priority,
        team=team.id,
        team_name=team.name,
        sla_due_at=request.sla_due_at,
        link=f"{settings.public_url}/staff/requests/{request.reference}",
    )
    db.session.rollback()  # hold no lock while talking to the outside world
    try:
        channels = deliver(team, notice, settings.smtp_url, settings.smtp_from)
    except NotificationError as error:
        if self.request.retries >= NOTIFY_MAX_RETRIES:
            record_event(
                db.session,
                actor="system:notify_team",
                action="notification.failed",
                reference=notice.reference,
                outcome="failure",
                details={"team": team.id, "error": str(error)},
            )
            outbox.mark_done(
                db.session, request_id, routing.NOTIFY_TASK, outbox_id, status="failed"
            )
            db.session.commit()
            log.error("notify_failed", reference=notice.reference, team=team.id)
            return
        log.warning(
            "notify_retry",
            reference=notice.reference,
            team=team.id,
            attempt=self.request.retries + 1,
            error=str(error),
        )
        raise self.retry(exc=error, countdown=min(2**self.request.retries * 5, 600)) from None
    record_event(
        db.session,
        actor="system:notify_team",
        action="notification.sent",
        reference=notice.reference,
        details={"team": team.id, "channels": channels},
    )
    outbox.mark_done(db.session, request_id, routing.NOTIFY_TASK, outbox_id)
    db.session.commit()


@shared_task(acks_late=True, autoretry_for=TRANSIENT, max_retries=3)
def sweep_outbox() -> int:
    """Publish outbox rows still pending: a broker outage delays requests, never loses them."""
    return outbox.sweep(db.session)


@shared_task(acks_late=True, autoretry_for=TRANSIENT, max_retries=3)
def escalate_overdue() -> int:
    """Raise overdue requests one priority step (once each) and tell the supervisors."""
    escalated = casework.escalate_overdue(db.session, now())
    if escalated:
        outbox.publish(db.session, [outbox_id for _reference, outbox_id in escalated])
        log.info("requests_escalated", count=len(escalated))
    return len(escalated)


@shared_task(
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    autoretry_for=TRANSIENT,
    retry_backoff=2,
    max_retries=20,
)
def notify_supervisors(self: Any, request_id: str, outbox_id: int | None = None) -> None:
    """Tell the supervisors' channel that a request is overdue; reference and link only."""
    settings = current_app.extensions["intake.settings"]
    table = current_app.extensions["intake.routing"]
    pending = select(OutboxMessage.id).where(
        OutboxMessage.request_id == request_id,
        OutboxMessage.task == "notify_supervisors",
        OutboxMessage.status == "pending",
    )
    if outbox_id is not None:
        pending = pending.where(OutboxMessage.id == outbox_id)
    if db.session.execute(pending).first() is None:
        return
    request = db.session.get(Request, request_id)
    if request is None:
        outbox.mark_done(db.session, request_id, "notify_supervisors", outbox_id, status="failed")
        db.session.commit()
        return
    supervisors = table.supervisors
    notice = Notice(
        reference=request.reference,
        kind=request.kind,
        topic=request.topic,
        priority=request.priority,
        team=supervisors.id,
        team_name=supervisors.name,
        sla_due_at=request.sla_due_at,
        link=f"{settings.public_url}/staff/requests/{request.reference}",
        reason="overdue",
    )
    db.session.rollback()
    try:
        channels = deliver(supervisors, notice, settings.smtp_url, settings.smtp_from)
    except NotificationError as error:
        if self.request.retries >= NOTIFY_MAX_RETRIES:
            record_event(
                db.session,
                actor="system:notify_supervisors",
                action="notification.failed",
                reference=notice.reference,
                outcome="failure",
                details={"team": supervisors.id, "error": str(error)},
            )
            outbox.mark_done(
                db.session, request_id, "notify_supervisors", outbox_id, status="failed"
            )
            db.session.commit()
            return
        raise self.retry(exc=error, countdown=min(2**self.request.retries * 5, 600)) from None
    record_event(
        db.session,
        actor="system:notify_supervisors",
        action="notification.sent",
        reference=notice.reference,
        details={"team": supervisors.id, "channels": channels, "reason": "overdue"},
    )
    outbox.mark_done(db.session, request_id, "notify_supervisors", outbox_id)
    db.session.commit()


@shared_task(acks_late=True, autoretry_for=TRANSIENT, max_retries=3)
def rewrap_data_keys() -> int:
    """After a key rotation, rewrap a batch of data keys under the new primary KEK."""
    from intake.keys import rewrap_data_keys as rewrap

    return rewrap(db.session, current_app.extensions["intake.keyring"])


@shared_task(acks_late=True, autoretry_for=TRANSIENT, max_retries=3)
def purge_expired() -> int:
    """Crypto-shred requests closed longer than the retention period."""
    from intake.retention import purge_expired as purge

    days = current_app.extensions["intake.settings"].retention_days
    return len(purge(db.session, now(), days))


@shared_task(acks_late=True, autoretry_for=TRANSIENT, max_retries=3)
def sign_audit_checkpoint() -> int | None:
    """Sign the audit chain's head into the checkpoints file, unless nothing happened since."""
    from intake.checkpoints import write_checkpoint

    signed = write_checkpoint(
        db.session,
        current_app.extensions["intake.settings"],
        actor="system:sign_audit_checkpoint",
        skip_idle=True,
    )
    return signed.seq if signed else None
