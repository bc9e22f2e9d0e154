"""Break-glass review: every emergency access outside a user's teams is looked at by compliance.

Why: break-glass is the emergency access procedure (45 CFR 164.312(a)(2)(ii)): anyone may open
any request in an emergency, typing a reason, so that care never waits on permissions. The
safeguard is the review afterwards: each ``phi.break_glass`` event stays "pending" until a
reviewer other than the person who broke the glass records a review, and the review itself is
an audit event written in the same transaction as its row. Reviewers are compliance officers,
and supervisors too where the pharmacy says so (``INTAKE_BREAK_GLASS_REVIEWERS``): a pharmacy
with one compliance officer could otherwise never have that officer's accesses reviewed.

Each review has an outcome (appropriate, not appropriate, escalated) kept with the comment in
the ``break_glass.reviewed`` event: the trail is the record, tamper-evident like every other
event, so no column outside it holds the verdict.

The review comment goes into the append-only trail in the clear, so it passes the same filter
for patient details as every other staff-typed reason (no numbers, dates or e-mail addresses).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import aliased

from intake.compliance.reports import actor_is_user, seq_in_range
from intake.extensions import DbSession
from intake.models import AuditEvent, BreakGlassReview, User
from intake.requests.casework import Actor, CaseworkError, check_reason

MIN_COMMENT = 5
MAX_COMMENT = 1000
REVIEWER_ROLES = ("compliance",)
# What a reviewer concluded, as stored in ``break_glass.reviewed`` (``review_outcome``).
OUTCOMES = {
    "appropriate": "Appropriate",
    "not_appropriate": "Not appropriate",
    "escalated": "Escalated",
}
ROLE_NAMES = {"compliance": "compliance officer", "supervisor": "supervisor"}
# Only break-glass accesses that happened are reviewed; a refused attempt is in the trail only.
HAPPENED = AuditEvent.outcome == "success"


class ReviewError(CaseworkError):
    """A review that cannot be recorded; ``status`` is the HTTP status to answer with."""


@dataclass(frozen=True)
class BreakGlassEntry:
    seq: int
    at: datetime
    actor: str
    username: str | None
    role: str | None
    reference: str | None
    reason: str
    reviewer: str | None
    reviewed_at: datetime | None
    comment: str | None
    outcome: str | None = None

    @property
    def pending(self) -> bool:
        return self.reviewed_at is None

    @property
    def outcome_name(self) -> str:
        return OUTCOMES.get(self.outcome or "", "not recorded")


def review_outcomes(session: DbSession) -> dict[int, str]:
    """Per break-glass event seq, the outcome its review recorded in the trail."""
    found: dict[int, str] = {}
    for raw in session.execute(
        select(AuditEvent.details).where(AuditEvent.action == "break_glass.reviewed")
    ).scalars():
        details = json.loads(raw) if raw else {}
        seq, outcome = details.get("break_glass_seq"), details.get("review_outcome")
        if isinstance(seq, int) and isinstance(outcome, str):
            found[seq] = outcome
    return found


def break_glass_entries(session: DbSession, reviewed_limit: int = 200) -> list[BreakGlassEntry]:
    """Every pending break-glass access (oldest first), then the latest reviewed ones."""
    reviewer = aliased(User)
    base = (
        select(
            AuditEvent.seq,
            AuditEvent.created_at,
            AuditEvent.actor,
            User.username,
            AuditEvent.actor_role,
            AuditEvent.reference,
            AuditEvent.details,
            reviewer.username,
            BreakGlassReview.reviewed_at,
            BreakGlassReview.comment,
        )
        .outerjoin(User, actor_is_user())
        .outerjoin(BreakGlassReview, BreakGlassReview.audit_seq == AuditEvent.seq)
        .outerjoin(reviewer, reviewer.id == BreakGlassReview.reviewer_id)
        .where(AuditEvent.action == "phi.break_glass", HAPPENED)
    )
    pending = session.execute(
        base.where(BreakGlassReview.audit_seq.is_(None)).order_by(AuditEvent.seq.asc())
    ).all()
    reviewed = session.execute(
        base.where(BreakGlassReview.audit_seq.is_not(None))
        .order_by(AuditEvent.seq.desc())
        .limit(reviewed_limit)
    ).all()
    outcomes = review_outcomes(session) if reviewed else {}
    entries = []
    for row in [*pending, *reviewed]:
        details: dict[str, Any] = json.loads(row[6]) if row[6] else {}
        entries.append(
            BreakGlassEntry(
                seq=row[0],
                at=row[1],
                actor=row[2],
                username=row[3],
                role=row[4],
                reference=row[5],
                reason=str(details.get("reason", "")),
                reviewer=row[7],
                reviewed_at=row[8],
                comment=row[9],
                outcome=outcomes.get(row[0]),
            )
        )
    return entries


def pending_count(session: DbSession) -> int:
    return int(
        session.execute(
            select(func.count())
            .select_from(AuditEvent)
            .outerjoin(BreakGlassReview, BreakGlassReview.audit_seq == AuditEvent.seq)
            .where(
                AuditEvent.action == "phi.break_glass",
                HAPPENED,
                BreakGlassReview.audit_seq.is_(None),
            )
        ).scalar_one()
    )


def may_review(role: str, reviewers: tuple[str, ...] = REVIEWER_ROLES) -> bool:
    """True when ``role`` reviews break-glass accesses under the pharmacy's policy."""
    return role in reviewers and role in ROLE_NAMES


def check_comment(comment: str) -> str:
    """A review comment as stored: 5 to 1000 characters and nothing like patient details.

    The filter is the one staff reasons pass (``casework.check_reason``); the comment itself is
    kept as typed, line breaks included.
    """
    comment = comment.strip()
    try:
        check_reason(
            comment,
            MIN_COMMENT,
            f"write a comment of {MIN_COMMENT} to {MAX_COMMENT} characters",
            maximum=MAX_COMMENT,
        )
    except CaseworkError as error:
        raise ReviewError(str(error)) from None
    if len(comment) > MAX_COMMENT:
        raise ReviewError(f"write a comment of {MIN_COMMENT} to {MAX_COMMENT} characters")
    return comment


def review_break_glass(
    session: DbSession,
    actor: Actor,
    seq: int,
    comment: str,
    now: datetime,
    reviewers: tuple[str, ...] = REVIEWER_ROLES,
    outcome: str = "appropriate",
) -> BreakGlassReview:
    """Mark break-glass event ``seq`` reviewed with ``outcome`` and record
    ``break_glass.reviewed``; one transaction, committed here. Only a role of ``reviewers``
    reviews, never the person who broke the glass."""
    if outcome not in OUTCOMES:
        raise ReviewError("choose an outcome: appropriate, not appropriate or escalated", 400)
    if not may_review(actor.role, reviewers):
        raise ReviewError("there is no break-glass access with that number", 404)
    event = session.get(AuditEvent, seq) if seq_in_range(seq) else None
    if event is None or event.action != "phi.break_glass" or event.outcome != "success":
        raise ReviewError("there is no break-glass access with that number", 404)
    if event.actor == actor.audit_name:
        others = " or ".join(ROLE_NAMES[r] for r in reviewers if r in ROLE_NAMES)
        raise ReviewError(f"another {others} must review your own break-glass access", 409)
    comment = check_comment(comment)
    if session.get(BreakGlassReview, seq) is not None:
        raise ReviewError("this break-glass access has already been reviewed", 409)
    review = BreakGlassReview(
        audit_seq=seq, reviewer_id=actor.user_id, reviewed_at=now, comment=comment
    )
    session.add(review)
    try:
        session.flush()
    except IntegrityError as error:
        session.rollback()
        raise ReviewError("this break-glass access has already been reviewed", 409) from error
    actor.record(
        session,
        "break_glass.reviewed",
        event.reference,
        break_glass_seq=seq,
        accessed_by=event.actor,
        review_outcome=outcome,
        comment=comment,
    )
    session.commit()
    return review
