"""Celery tasks: thin wrappers that call the domain in ``intake/``. Arguments are ids only."""

from __future__ import annotations

from datetime import UTC
from typing import Any

import structlog
from celery import shared_task
from flask import current_app
from sqlalchemy.exc import InterfaceError, OperationalError

from intake.clock import now, utcnow
from intake.extensions import db
from intake.ops import metrics, tracing
from intake.requests import assignment, casework, outbox, routing
from intake.requests.notifications import RetryLater, send_account_alert, send_outbox_notice
from workers.publish import CeleryPublisher, task_id

log = structlog.get_logger(__name__)

# A lost database connection is worth retrying; a bug is not.
TRANSIENT = (OperationalError, InterfaceError)
NOTIFY_MAX_RETRIES = 6


# Every notification task: redelivered if a worker dies mid-send, retried with growing delays
# while the channel fails (the outbox row records the outcome once), bound for its retry count.
notify_task = shared_task(
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    autoretry_for=TRANSIENT,
    retry_backoff=2,
    max_retries=20,
)


@shared_task(
    acks_late=True,
    reject_on_worker_lost=True,
    autoretry_for=TRANSIENT,
    retry_backoff=2,
    retry_backoff_max=60,
    max_retries=20,
)
def route_request(request_id: str, outbox_id: int | None = None) -> None:
    """Route a received request to its team (idempotent), with up to ROUTING_BATCH others
    waiting, then publish their notifications."""
    structlog.contextvars.bind_contextvars(task="route_request", request_id=request_id)
    try:
        table = current_app.extensions["intake.routing"]
        batch = routing.route_received(db.session, table, request_id, utcnow())
        if not batch:
            # At debug: after a burst most routing tasks find their request routed by a batch.
            log.debug("route_skipped", reason="already routed or unknown")
            return
        # Every request's notices first, then the assignments (each its own transaction): a
        # slow or failing assignment of one request must not keep the others' teams waiting,
        # and a retry of this task finds them all routed and would do none of it. The notices
        # go to the broker together, each under its own request's trace.
        for routed in batch:
            structlog.contextvars.bind_contextvars(request_id=routed.request_id)
            with tracing.bound(routed.trace_id):
                _routed(routed, batched=routed.request_id != request_id)
        structlog.contextvars.bind_contextvars(request_id=request_id)
        outbox.publish_outgoing(db.session, [m for routed in batch for m in routed.outgoing])
        _revoke_routed(batch, request_id)
        for routed in batch:
            if routed.assignee is None and table.teams[routed.team].assigns:
                structlog.contextvars.bind_contextvars(request_id=routed.request_id)
                with tracing.bound(routed.trace_id):
                    _assign_routed(table, routed)
    finally:
        structlog.contextvars.unbind_contextvars("task", "request_id")


def _revoke_routed(batch: list[routing.Routed], request_id: str) -> None:
    """The other requests of the batch were routed here: their own routing tasks, queued
    behind this one, can only find that out. Revoke them, so workers drop them unrun."""
    publisher = outbox.get_publisher()
    if isinstance(publisher, CeleryPublisher):
        publisher.revoke(
            [
                task_id(routing.ROUTE_TASK, routed.request_id, outbox_id)
                for routed in batch
                if routed.request_id != request_id
                for outbox_id in routed.route_outbox_ids
            ]
        )


def _routed(routed: routing.Routed, *, batched: bool) -> None:
    """What follows one request's routing commit: its log line and its metrics."""
    log.info(
        "request_routed",
        reference=routed.reference,
        team=routed.team,
        priority=routed.priority,
        language_outcome=routed.language_outcome,
        **({"batched": True} if batched else {}),
    )
    metrics.ROUTED.labels(routed.team).inc()
    if routed.received_at is not None:
        received = routed.received_at
        received = received if received.tzinfo else received.replace(tzinfo=UTC)
        metrics.ROUTING_LATENCY.observe(max((utcnow() - received).total_seconds(), 0.0))


def _assign_routed(table: routing.RoutingTable, routed: routing.Routed) -> None:
    """Give a just-routed request of an assigning team to a member. A database error here is
    left to the assignment sweep (beat), which gives out every unassigned request: retrying
    the task would not, as it finds its request routed and stops."""
    try:
        _assign(table, routed.request_id, trigger="routed", record_unassigned=True)
    except TRANSIENT as error:
        db.session.rollback()
        log.warning("assignment_deferred", reference=routed.reference, error=type(error).__name__)


def _assign(table: routing.RoutingTable, request_id: str, **options: Any) -> None:
    outcome = assignment.assign_request(db.session, table, request_id, utcnow(), **options)
    log.info(
        "request_assigned" if outcome.assignee else "request_left_in_pool",
        reference=outcome.reference,
        assignee=outcome.assignee,
    )


# Assignment tasks: idempotent (each attempt re-checks the request under its locks).
assign_task = shared_task(
    acks_late=True,
    reject_on_worker_lost=True,
    autoretry_for=TRANSIENT,
    retry_backoff=2,
    retry_backoff_max=60,
    max_retries=10,
)


@assign_task
def assign_request(request_id: str, outbox_id: int | None = None) -> None:
    """Give a request that arrived in an assigning team (a transfer) to an eligible member."""
    _assign(current_app.extensions["intake.routing"], request_id, trigger="transferred in")
    assignment.finish(db.session, outbox_id)


@assign_task
def backfill_assignments(user_id: str, outbox_id: int | None = None) -> int:
    """Give someone who just freed up the oldest unassigned requests they may take."""
    given = assignment.backfill(
        db.session, current_app.extensions["intake.routing"], int(user_id), utcnow()
    )
    assignment.finish(db.session, outbox_id)
    if given:
        log.info("backfilled", user_id=user_id, count=len(given))
    return len(given)


@shared_task(acks_late=True, autoretry_for=TRANSIENT, max_retries=3)
def sweep_assignments() -> int:
    """Return timed-out claims to the pool and give out unassigned requests (beat)."""
    report = assignment.sweep(db.session, current_app.extensions["intake.routing"], utcnow())
    if report.released or report.assigned:
        log.info("assignments_swept", released=report.released, assigned=report.assigned)
    return report.assigned


def _notify(task: Any, name: str, request_id: str, outbox_id: int | None) -> None:
    try:
        send_outbox_notice(
            db.session,
            task=name,
            request_id=request_id,
            outbox_id=outbox_id,
            settings=current_app.extensions["intake.settings"],
            table=current_app.extensions["intake.routing"],
            attempt=task.request.retries,
            max_retries=NOTIFY_MAX_RETRIES,
        )
    except RetryLater as later:
        raise task.retry(exc=later.error, countdown=later.countdown) from None


@notify_task
def notify_team(self: Any, request_id: str, outbox_id: int | None = None) -> None:
    """Tell the request's team it is waiting; a failed channel retries, then is recorded."""
    _notify(self, routing.NOTIFY_TASK, request_id, outbox_id)


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
        metrics.SLA_BREACHES.inc(len(escalated))
    return len(escalated)


@notify_task
def notify_supervisors(self: Any, request_id: str, outbox_id: int | None = None) -> None:
    """Tell the supervisors' channel that a request is overdue; reference and link only."""
    _notify(self, "notify_supervisors", request_id, outbox_id)


@notify_task
def notify_account_alert(self: Any, user_id: str, outbox_id: int | None = None) -> None:
    """Tell the supervisors' channel about a staff account (e.g. a frozen second factor)."""
    if outbox_id is None:
        return
    try:
        send_account_alert(
            db.session,
            outbox_id=outbox_id,
            settings=current_app.extensions["intake.settings"],
            table=current_app.extensions["intake.routing"],
            attempt=self.request.retries,
            max_retries=NOTIFY_MAX_RETRIES,
        )
    except RetryLater as later:
        raise self.retry(exc=later.error, countdown=later.countdown) from None


@shared_task(acks_late=True, autoretry_for=TRANSIENT, max_retries=3)
def purge_login_throttles() -> int:
    """Forget login failure counts that lock nothing and have been quiet for the window."""
    from intake.accounts.services import LoginPolicy
    from intake.accounts.services import purge_login_throttles as purge

    policy = LoginPolicy.from_settings(current_app.extensions["intake.settings"])
    return purge(db.session, now(), policy)


@notify_task
def notify_language_need(self: Any, request_id: str, outbox_id: int | None = None) -> None:
    """Tell the supervisors' channel that nobody who speaks a request's language could take
    it; reference, language and link only."""
    _notify(self, routing.LANGUAGE_NOTICE_TASK, request_id, outbox_id)


@notify_task
def notify_break_glass(self: Any, request_id: str, outbox_id: int | None = None) -> None:
    """Alert the supervisors' channel to a break-glass access; who, reference and link only."""
    _notify(self, casework.BREAK_GLASS_ALERT_TASK, request_id, outbox_id)


@shared_task(acks_late=True, autoretry_for=TRANSIENT, max_retries=3)
def rewrap_data_keys() -> int:
    """After a key rotation, rewrap a batch of data keys under the new primary KEK."""
    from intake.crypto.rotation import rewrap_data_keys as rewrap

    return rewrap(db.session, current_app.extensions["intake.keyring"])


@shared_task(acks_late=True, autoretry_for=TRANSIENT, max_retries=3)
def purge_expired() -> int:
    """Crypto-shred requests closed longer than the retention period."""
    from intake.requests.retention import purge_expired as purge

    days = current_app.extensions["intake.settings"].retention_days
    return len(purge(db.session, now(), days))
