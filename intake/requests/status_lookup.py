"""Tell a patient the coarse status of their request, given its reference and date of birth.

Why: the patient has no account, so the reference alone must not be enough (references are
shared over the phone and printed). A wrong date of birth gets exactly the answer an unknown
reference gets, so the page never confirms that a reference exists. Each look-up is audited;
the date of birth is compared inside this function and never logged or audited.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import select

from intake.accounts.services import _throttle_row
from intake.audit.chain import record_event
from intake.clock import now
from intake.crypto import phi
from intake.extensions import DbSession
from intake.models import AuditEvent, LoginThrottle, Request, Team

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
    openings: tuple[StaffOpening, ...] = field(default=())


@dataclass(frozen=True)
class StaffOpening:
    """One time staff opened the request's page: when, and the team's name (no person).

    ``team`` is None for openings recorded before the team was written into the event.
    ``emergency`` marks a break-glass opening by someone outside the request's team.
    """

    at: datetime
    team: str | None
    emergency: bool = False


def staff_openings(session: DbSession, reference: str) -> tuple[StaffOpening, ...]:
    """Every time staff opened ``reference``'s page (queue list views not counted), oldest first."""
    rows = session.execute(
        select(AuditEvent.created_at, AuditEvent.details)
        .where(
            AuditEvent.reference == reference,
            AuditEvent.action == "phi.viewed",
            AuditEvent.outcome == "success",
        )
        .order_by(AuditEvent.seq)
    ).all()
    names = {team_id: name for team_id, name in session.execute(select(Team.id, Team.name))}
    openings = []
    for at, details in rows:
        try:
            recorded = json.loads(details) if details else {}
        except ValueError:
            recorded = {}
        team = recorded.get("team") if isinstance(recorded, dict) else None
        # The name recorded in the (hash-chained) event; the current one for older events.
        name = recorded.get("team_name") if isinstance(recorded, dict) else None
        if not isinstance(name, str):
            name = names.get(team, team) if isinstance(team, str) else None
        openings.append(
            StaffOpening(
                at=at,
                team=name,
                emergency=bool(isinstance(recorded, dict) and recorded.get("break_glass")),
            )
        )
    return tuple(openings)


# Failed look-ups are counted per (typed reference, client) and per typed reference from
# anywhere, known reference or not. One client (a stranger who read a reference off a printout)
# gets five tries an hour at one reference; then that client waits an hour, while the patient,
# from their own phone or computer, still gets in. The per-reference ceiling bounds guessing
# from many addresses. Unknown references are counted exactly like real ones, so being told
# "too many tries" says nothing about whether a reference exists.
FAILURES_PER_CLIENT = 5
FAILURES_PER_REFERENCE = 20
WINDOW = timedelta(hours=1)


@dataclass(frozen=True)
class Throttled:
    """Too many failed look-ups of this reference (from this client, or from everywhere)."""

    retry_after_seconds: int


def client_throttle_key(keyring: phi.Keyring, reference: str, client: str | None) -> str:
    return phi.blind_index(keyring, "status-lookup", f"{reference}|{client or '-'}")


def reference_throttle_key(keyring: phi.Keyring, reference: str) -> str:
    return phi.blind_index(keyring, "status-lookup-reference", reference)


def _counting(row: LoginThrottle, now: datetime) -> LoginThrottle:
    """The row with its count restarted when its window has passed and it locks nothing."""
    locked = row.locked_until is not None and row.locked_until > now
    if not locked and row.updated_at is not None and row.updated_at <= now - WINDOW:
        row.failures = 0
        row.locked_until = None
    return row


def _locked_for(rows: tuple[LoginThrottle, ...], now: datetime) -> int:
    until = [r.locked_until for r in rows if r.locked_until is not None and r.locked_until > now]
    return int((max(until) - now).total_seconds()) + 1 if until else 0


def look_up_status(
    session: DbSession,
    keyring: phi.Keyring,
    reference: str,
    date_of_birth: str,
    ip_hmac: str | None,
    client: str | None = None,
) -> StatusAnswer | Throttled | None:
    """Return what the patient may see, ``Throttled``, or None when the pair matches nothing.

    ``client`` names the client for the throttle (its network's pseudonym); by default the
    audit trail's ``ip_hmac``.
    """
    moment = now()
    client = client or ip_hmac
    # Locked in this order (client's row, then the reference's) by every look-up, until commit.
    rows = (
        _counting(
            _throttle_row(session, client_throttle_key(keyring, reference, client), moment), moment
        ),
        _counting(
            _throttle_row(session, reference_throttle_key(keyring, reference), moment), moment
        ),
    )
    row = session.execute(
        select(Request).where(Request.reference == reference)
    ).scalar_one_or_none()
    wait = _locked_for(rows, moment)
    status: str | None = None
    if row is not None and not wait and row.wrapped_key is not None and row.kek_id is not None:
        try:
            document = phi.open_phi(
                keyring, row.id, phi.SealedPHI(phi.WrappedKey(row.kek_id, row.wrapped_key), row.phi)
            )
        except phi.SealError:
            document = {}
        stored = str(document.get("date_of_birth", ""))
        if stored and hmac.compare_digest(stored.encode(), date_of_birth.encode()):
            status = COARSE.get(row.status, "received")
    if not wait and status is None:
        for counted, limit in zip(rows, (FAILURES_PER_CLIENT, FAILURES_PER_REFERENCE), strict=True):
            counted.failures += 1
            counted.updated_at = moment
            if counted.failures >= limit:
                counted.locked_until = moment + WINDOW
    elif status is not None:
        rows[0].failures, rows[0].locked_until, rows[0].updated_at = 0, None, moment
    # Failed look-ups of a real request name it, so its access report shows guessing attempts.
    record_event(
        session,
        actor="patient",
        action="status.looked_up",
        reference=reference if row is not None else None,
        outcome="success" if status else ("throttled" if wait else "not_found"),
        ip_hmac=ip_hmac,
    )
    answer = _answer(session, row, status) if row is not None and status else None
    session.commit()
    if wait:
        return Throttled(retry_after_seconds=wait)
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
        openings=staff_openings(session, row.reference),
    )
