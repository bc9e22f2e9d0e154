"""Retention: crypto-shred requests closed longer than the retention period.

Why: data kept forever is data that can leak forever. A request completed or cancelled more
than ``INTAKE_RETENTION_DAYS`` ago loses its wrapped data key, its sealed documents, its notes
and its blind indexes, so nothing can ever decrypt or find it again, even in old backups once
they expire. The row's skeleton (reference, kind, status, times) and the audit trail stay: the
trail must still prove who did what.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import delete, select, update

from intake.audit.chain import record_event
from intake.extensions import DbSession
from intake.models import Note, Request

CLOSED = ("completed", "cancelled")


def purge_expired(session: DbSession, now: datetime, days: int, batch: int = 500) -> list[str]:
    """Shred up to ``batch`` expired requests; returns their references."""
    cutoff = now - timedelta(days=days)
    rows = session.execute(
        select(Request.id, Request.reference)
        .where(
            Request.status.in_(CLOSED),
            Request.updated_at < cutoff,
            Request.wrapped_key.is_not(None),
        )
        .limit(batch)
    ).all()
    if not rows:
        return []
    ids = [row.id for row in rows]
    session.execute(delete(Note).where(Note.request_id.in_(ids)))
    session.execute(
        update(Request)
        .where(Request.id.in_(ids))
        .values(
            wrapped_key=None,
            kek_id=None,
            phi=b"",
            display_name=None,
            phone_index=None,
            email_index=None,
            name_dob_index=None,
        )
        .execution_options(synchronize_session=False)
    )
    for row in rows:
        record_event(
            session,
            actor="system:retention",
            action="retention.purged",
            reference=row.reference,
            details={"retention_days": days},
        )
    session.commit()
    return [row.reference for row in rows]
