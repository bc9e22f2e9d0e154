"""Tell a patient the coarse status of their request, given its reference and date of birth.

Why: the patient has no account, so the reference alone must not be enough (references are
shared over the phone and printed). A wrong date of birth gets exactly the answer an unknown
reference gets, so the page never confirms that a reference exists. Each look-up is audited;
the date of birth is compared inside this function and never logged or audited.
"""

from __future__ import annotations

import hmac

from sqlalchemy import select

from intake import phi
from intake.audit import record_event
from intake.extensions import DbSession
from intake.models import Request

COARSE = {
    "received": "received",
    "queued": "received",
    "in_progress": "in_progress",
    "waiting_on_patient": "waiting_on_patient",
    "waiting_on_prescriber": "waiting_on_prescriber",
    "completed": "completed",
    "cancelled": "cancelled",
}


# After this many failed look-ups of one reference within an hour, even the right date of birth
# gets "not found" until the hour has passed: guessing a birth date takes years, not minutes.
MAX_FAILURES_PER_HOUR = 5


def _recent_failures(session: DbSession, reference: str) -> int:
    from datetime import timedelta

    from sqlalchemy import func

    from intake.clock import now
    from intake.models import AuditEvent

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
) -> str | None:
    """Return the coarse status, or None when the pair matches no request."""
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
    session.commit()
    return status
