"""Tell a patient the coarse status of their request, given its reference and date of birth.

Why: the patient has no account, so the reference alone must not be enough (references are
shared over the phone and printed). A wrong date of birth gets exactly the answer an unknown
reference gets, so the page never confirms that a reference exists. Each look-up is audited;
the date of birth is compared inside this function and never logged or audited.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select

from intake import phi
from intake.audit import record_event
from intake.extensions import DbSession
from intake.models import AuditEvent, Request

COARSE = {
    "received": "received",
    "queued": "received",
    "in_progress": "in_progress",
    "waiting_on_patient": "waiting_on_patient",
    "waiting_on_prescriber": "waiting_on_prescriber",
    "completed": "completed",
    "cancelled": "cancelled",
}


# The audited actions that change what the patient is told (routing keeps it "received").
STATUS_CHANGES = ("request.status_changed", "request.transferred")


@dataclass(frozen=True)
class StatusAnswer:
    """What a patient may learn about their own request: no PHI, no team or staff names."""

    status: str  # one of the coarse statuses above
    kind: str
    topic: str | None
    received_at: datetime
    changed_at: datetime


# After this many failed look-ups of one reference within an hour, even the right date of birth
# gets "not found" until the hour has passed: guessing a birth date takes years, not minutes.
MAX_FAILURES_PER_HOUR = 5


def _recent_failures(session: DbSession, reference: str) -> int:
    from datetime import timedelta

    from intake.clock import now

    return int(
        session.execute(
            select(func.count())
            .select_from(AuditEvent)
            .where(
                AuditEvent.reference == reference,
                AuditEvent.action == "status.looked_up",
                AuditEvent.outcome != "success",
                AuditEvent.created_at > now() - timedelta(hours=1),
            )
        ).scalar_one()
    )


def look_up_status(
    session: DbSession,
    keyring: phi.Keyring,
    reference: str,
    date_of_birth: str,
    ip_hmac: str | None,
) -> StatusAnswer | None:
    """Return what the patient may see, or None when the pair matches no request."""
    row = session.execute(
        select(Request).where(Request.reference == reference)
    ).scalar_one_or_none()
    status: str | None = None
    throttled = row is not None and _recent_failures(session, reference) >= MAX_FAILURES_PER_HOUR
    if row is not None and not throttled and row.wrapped_key is not None and row.kek_id is not None:
        try:
            document = phi.open_phi(
                keyring, row.id, phi.SealedPHI(phi.WrappedKey(row.kek_id, row.wrapped_key), row.phi)
            )
        except phi.SealError:
            document = {}
        stored = str(document.get("date_of_birth", ""))
        if stored and hmac.compare_digest(stored.encode(), date_of_birth.encode()):
            status = COARSE.get(row.status, "received")
    # Failed look-ups of a real request name it, so its access report shows guessing attempts.
    record_event(
        session,
        actor="patient",
        action="status.looked_up",
        reference=reference if row is not None else None,
        outcome="success" if status else ("throttled" if throttled else "not_found"),
        ip_hmac=ip_hmac,
    )
    answer = _answer(session, row, status) if row is not None and status else None
    session.commit()
    return answer


def _answer(session: DbSession, row: Request, status: str) -> StatusAnswer:
    changed = session.execute(
        select(AuditEvent.created_at)
        .where(AuditEvent.reference == row.reference, AuditEvent.action.in_(STATUS_CHANGES))
        .order_by(AuditEvent.seq.desc())
        .limit(1)
    ).scalar_one_or_none()
    return StatusAnswer(
        status=status,
        kind=row.kind,
        topic=row.topic,
        received_at=row.created_at,
        changed_at=max(changed, row.created_at) if changed else row.created_at,
    )
