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

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from datetime import timedelta
from typing import Any, NamedTuple

import structlog
from flask import Flask, current_app, has_app_context
from sqlalchemy import and_, or_, select, update

from intake.clock import utcnow
from intake.extensions import DbSession
from intake.models import OutboxMessage
from intake.ops import metrics, tracing

log = structlog.get_logger(__name__)

Publisher = Callable[[str, str, int, int], None]
"""Publish task ``name`` for its subject (a request id, or a user id for an account alert),
outbox row id and attempt (1 for the row's first publish, then one more for each republish);
raise if the broker fails. A publisher may also have a ``batch()`` context
manager: what is published in it goes to the broker together when it ends, or it raises then
(see :func:`_batch`)."""

ACCOUNT_ALERT_TASK = "notify_account_alert"

# A message published but not marked done after INTAKE_OUTBOX_REPUBLISH_SECONDS is published
# again: the broker may have lost it (a Redis restart without persistence) or no worker took it.
# So one row can be in the queue twice, and two workers can hold it at once: a consumer that talks
# to the outside world (an e-mail cannot be taken back) first claims the row (status "sending").
# Only the claim's holder sends; a claim older than the lease belongs to a sender that died, and
# the row is taken again (the sweep republishes it). The lease outlasts the slowest send: each of
# a notification's network steps times out after NOTIFY_TIMEOUT_SECONDS.
NOTIFY_TIMEOUT_SECONDS = 10
OPEN = ("pending", "sending")


def claim_lease() -> timedelta:
    """How long a claim holds before its row may be taken again."""
    republish = current_app.extensions["intake.settings"].outbox_republish_seconds
    return timedelta(seconds=max(republish, 3 * NOTIFY_TIMEOUT_SECONDS))


def claim(session: DbSession, outbox_id: int, lease: timedelta | None = None) -> bool:
    """Take a row to send it, and commit; False when it is done or another worker holds it.

    One UPDATE decides: PostgreSQL re-checks its condition once a concurrent claimer's row lock
    is released, and SQLite runs writers one at a time, so two claimers never both win.
    """
    moment = utcnow()
    expired = moment - (lease if lease is not None else claim_lease())
    result = session.execute(
        update(OutboxMessage)
        .where(
            OutboxMessage.id == outbox_id,
            or_(
                OutboxMessage.status == "pending",
                and_(OutboxMessage.status == "sending", OutboxMessage.claimed_at < expired),
            ),
        )
        .values(status="sending", claimed_at=moment)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return bool(result.rowcount)  # type: ignore[attr-defined]


def release(session: DbSession, outbox_id: int) -> None:
    """Give a claimed row back (the send failed and will be retried); commit."""
    session.execute(
        update(OutboxMessage)
        .where(OutboxMessage.id == outbox_id, OutboxMessage.status == "sending")
        .values(status="pending", claimed_at=None)
    )
    session.commit()


def init_app(app: Flask, publisher: Publisher | None) -> None:
    """Connect the outbox to the task queue through ``publisher`` (None: rows stay pending)."""
    app.extensions["intake.publisher"] = publisher


def get_publisher() -> Publisher | None:
    return current_app.extensions.get("intake.publisher") if has_app_context() else None


class Outgoing(NamedTuple):
    """What publishing an outbox row takes, held by the code that wrote the row."""

    id: int
    task: str
    subject: str
    # The trace to publish it under; None: the current one.
    trace_id: str | None = None
    # Which publish of the row this is: 1 the first, more when the sweep sends it again.
    attempt: int = 1


def _batch(publisher: Publisher, count: int) -> AbstractContextManager[Any]:
    """The publisher's batch, for several rows where it has one: one broker round trip."""
    batch = getattr(publisher, "batch", None)
    return batch() if batch is not None and count > 1 else contextlib.nullcontext()


def enqueue(
    session: DbSession, request_id: str, task: str, *, published_by_caller: bool = False
) -> OutboxMessage:
    """Record a task for ``request_id`` in the caller's transaction.

    ``published_by_caller``: the caller publishes the row itself right after commit
    (:func:`publish_outgoing`), so the row is written as published now and costs no second
    write when the broker takes it. Should that process die before publishing, the sweep
    republishes the row once ``INTAKE_OUTBOX_REPUBLISH_SECONDS`` have passed, as it does a
    message the broker lost; a publish that fails marks the row unpublished at once.
    """
    message = OutboxMessage(request_id=request_id, task=task, trace_id=tracing.current())
    if published_by_caller:
        message.published_at = utcnow()
        message.attempts = 1
    session.add(message)
    return message


def enqueue_account_alert(session: DbSession, user_id: int, alert: str) -> OutboxMessage:
    """Record, in the caller's transaction, an alert to the supervisors about a staff account
    (``alert`` names what happened, e.g. ``mfa_frozen``); it carries no request and no PHI."""
    message = OutboxMessage(
        request_id=None,
        user_id=user_id,
        alert=alert,
        task=ACCOUNT_ALERT_TASK,
        trace_id=tracing.current(),
    )
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
            OutboxMessage.id,
            OutboxMessage.task,
            OutboxMessage.request_id,
            OutboxMessage.user_id,
            OutboxMessage.trace_id,
            OutboxMessage.attempts,
        ).where(OutboxMessage.id.in_(message_ids), OutboxMessage.status.in_(OPEN))
    ).all()
    # Under the trace each row was written in, not the sweep's or the caller's.
    sent = _send(
        publisher,
        [
            Outgoing(
                row.id,
                row.task,
                row.request_id if row.request_id is not None else str(row.user_id),
                row.trace_id,
                row.attempts + 1,
            )
            for row in rows
        ],
        bind_every_trace=True,
    )
    published = [row.id for row in rows[:sent]]
    session.rollback()
    if published:
        locked = _lock_in_id_order(session, OutboxMessage.id.in_(published))
        session.execute(
            update(OutboxMessage)
            .where(OutboxMessage.id.in_(locked))
            .values(published_at=utcnow(), attempts=OutboxMessage.attempts + 1)
        )
        session.commit()
    return len(published)


def _lock_in_id_order(session: DbSession, *conditions: Any) -> list[int]:
    """Lock the rows matching ``conditions`` in id order, until commit; return their ids.

    Why: an UPDATE of several rows locks them in the order its plan visits them (by id for
    the sweep marking rows published, by request for a routing batch closing them, physical
    order in a bitmap scan), and two transactions taking the same rows in opposite orders
    deadlock: PostgreSQL kills one, a batch that then routes its own request alone or a
    sweep whose rows are published again. Every UPDATE of several outbox rows locks them in
    one order first. (SQLite runs one writer at a time.)
    """
    return [row_id for row_id, _subject in _lock_rows_in_id_order(session, *conditions)]


def _lock_rows_in_id_order(session: DbSession, *conditions: Any) -> list[tuple[int, str | None]]:
    """:func:`_lock_in_id_order`, returning (id, request id) pairs."""
    rows = session.execute(
        select(OutboxMessage.id, OutboxMessage.request_id)
        .where(*conditions)
        .order_by(OutboxMessage.id)
        .with_for_update(key_share=True)
    )
    return [(row_id, request_id) for row_id, request_id in rows]


def publish_outgoing(session: DbSession, messages: Sequence[Outgoing]) -> int:
    """Publish rows the caller wrote with ``published_by_caller`` and has committed; return how
    many reached the broker.

    The hot path: no query when the broker takes them all (the rows already say published).
    Rows the broker refused are marked unpublished, so the next sweep publishes them; a failure
    is logged, never raised.
    """
    if not messages:
        return 0
    publisher = get_publisher()
    published = _send(publisher, messages) if publisher is not None else 0
    unpublished = [message.id for message in messages[published:]]
    if unpublished:
        session.rollback()
        locked = _lock_in_id_order(
            session, OutboxMessage.id.in_(unpublished), OutboxMessage.status == "pending"
        )
        session.execute(
            update(OutboxMessage)
            .where(OutboxMessage.id.in_(locked), OutboxMessage.status == "pending")
            .values(published_at=None, attempts=OutboxMessage.attempts - 1)
        )
        session.commit()
    return published


def _send(
    publisher: Publisher, messages: Sequence[Outgoing], *, bind_every_trace: bool = False
) -> int:
    """Publish ``messages`` in order, in one batch where the publisher has batches; return how
    many the broker took: up to the first that failed, or none when the batch failed as a
    whole. ``bind_every_trace``: publish each under its own trace, also a missing one."""
    published = 0
    try:
        with _batch(publisher, len(messages)):
            for message in messages:
                bound = bind_every_trace or message.trace_id is not None
                with tracing.bound(message.trace_id) if bound else contextlib.nullcontext():
                    try:
                        publisher(message.task, message.subject, message.id, message.attempt)
                    except Exception as error:  # noqa: BLE001 - any broker failure: try later
                        _failed(message, error)
                        break
                published += 1
    except Exception as error:  # noqa: BLE001 - the batch as a whole: none known to arrive
        _failed(messages[0], error)
        return 0
    return published


def _failed(message: Outgoing, error: Exception) -> None:
    log.warning("outbox_publish_failed", outbox_id=message.id, error=type(error).__name__)
    metrics.PUBLISH_FAILURES.labels(message.task).inc()


def sweep(session: DbSession, limit: int = 500, republish_after: float | None = None) -> int:
    """Publish pending rows never published, or published too long ago without being done, and
    rows whose sender's claim expired."""
    if republish_after is None:
        republish_after = current_app.extensions["intake.settings"].outbox_republish_seconds
    moment = utcnow()
    stale = moment - timedelta(seconds=republish_after)
    abandoned = moment - claim_lease()
    ids = list(
        session.execute(
            select(OutboxMessage.id)
            .where(
                or_(
                    and_(
                        OutboxMessage.status == "pending",
                        or_(
                            OutboxMessage.published_at.is_(None),
                            OutboxMessage.published_at < stale,
                        ),
                    ),
                    # Its sender died mid-send (its task may have been acknowledged already).
                    and_(OutboxMessage.status == "sending", OutboxMessage.claimed_at < abandoned),
                ),
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
    """Mark open rows done (one row, or all of a request's rows for ``task``) in the
    consumer's transaction; return how many were still open (pending or being sent)."""
    condition = [
        OutboxMessage.request_id == request_id,
        OutboxMessage.task == task,
        OutboxMessage.status.in_(OPEN),
    ]
    if outbox_id is not None:
        condition.append(OutboxMessage.id == outbox_id)
    result = session.execute(
        update(OutboxMessage)
        .where(*condition)
        .values(status=status, done_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def mark_done_for(
    session: DbSession, request_ids: Sequence[str], task: str
) -> dict[str, list[int]]:
    """Mark the open ``task`` rows of several requests done in one statement, in the consumer's
    transaction; return the ids of the rows closed, by request."""
    if not request_ids:
        return {}
    locked = _lock_rows_in_id_order(
        session,
        OutboxMessage.request_id.in_(request_ids),
        OutboxMessage.task == task,
        OutboxMessage.status.in_(OPEN),
    )
    if not locked:
        return {}
    session.execute(
        update(OutboxMessage)
        .where(OutboxMessage.id.in_([row_id for row_id, _ in locked]))
        .values(status="done", done_at=utcnow())
    )
    closed: dict[str, list[int]] = {}
    for row_id, request_id in locked:
        closed.setdefault(str(request_id), []).append(row_id)
    return closed
