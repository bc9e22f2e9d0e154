"""The tamper-evident audit trail: append events to a hash chain, and verify it.

Why: a compliance officer must be able to show who read or changed a patient's request, and an
auditor must be able to trust that nobody (an insider with database access included) removed or
edited an event afterwards. Each event's hash covers the previous event's hash and the event's own
canonical form, so changing, deleting or reordering any event breaks every later link. The
database refuses UPDATE and DELETE on the table (triggers made by the migrations), and signed
checkpoints kept outside the database catch a chain recomputed from scratch.

Events are written in the caller's transaction: if the action rolls back so does its event, and
if the event cannot be written the action does not happen. Writers are serialized (an advisory
transaction lock on PostgreSQL; SQLite transactions begin IMMEDIATE) so the chain never forks.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from intake.clock import utcnow
from intake.models import AuditEvent

GENESIS_HASH = "0" * 64
# Arbitrary constant naming the PostgreSQL advisory lock that serializes chain writers.
CHAIN_LOCK_KEY = 0x1A7D17

ACTIONS = (
    "request.submitted",
    "request.routed",
    "request.claimed",
    "request.released",
    "request.status_changed",
    "request.transferred",
    "request.searched",
    "request.escalated",
    "note.added",
    "phi.viewed",
    "phi.break_glass",
    "status.looked_up",
    "notification.sent",
    "notification.failed",
    "user.login",
    "user.login_failed",
    "user.locked",
    "user.logout",
    "user.created",
    "user.changed",
    "team.created",
    "audit.exported",
    "audit.verified",
    "audit.checkpointed",
    "break_glass.reviewed",
    "key.rotated",
    "retention.purged",
)

Scalar = str | int | float | bool | None


def _check_details(details: Mapping[str, Any]) -> dict[str, Any]:
    clean: dict[str, Any] = {}
    for key, value in details.items():
        if isinstance(value, list | tuple):
            if not all(isinstance(v, Scalar) for v in value):  # type: ignore[arg-type]
                raise TypeError(f"audit detail {key!r} must hold plain values")
            clean[key] = list(value)
        elif isinstance(value, Scalar):  # type: ignore[arg-type]
            clean[key] = value
        else:
            raise TypeError(f"audit detail {key!r} must be a plain value")
    return clean


def format_time(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def canonical_event(event: AuditEvent) -> bytes:
    """The bytes an event's hash covers: every column but the hashes, in a fixed form."""
    body = {
        "seq": event.seq,
        "created_at": format_time(event.created_at),
        "actor": event.actor,
        "actor_role": event.actor_role,
        "action": event.action,
        "reference": event.reference,
        "outcome": event.outcome,
        "details": json.loads(event.details),
        "ip_hmac": event.ip_hmac,
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def event_hash(prev_hash: str, event: AuditEvent) -> str:
    return hashlib.sha256(prev_hash.encode() + b"\n" + canonical_event(event)).hexdigest()


def _lock_chain(session: Session) -> None:
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": CHAIN_LOCK_KEY})


def record_event(
    session: Session,
    *,
    actor: str,
    action: str,
    reference: str | None = None,
    outcome: str = "success",
    details: Mapping[str, Any] | None = None,
    actor_role: str | None = None,
    ip_hmac: str | None = None,
) -> AuditEvent:
    """Append an event to the chain inside the caller's transaction.

    ``details`` must never hold PHI: ids, counts, status names, reasons typed by staff.
    """
    if action not in ACTIONS:
        raise ValueError(f"unknown audit action {action!r}")
    _lock_chain(session)
    session.flush()
    last = session.execute(
        select(AuditEvent.seq, AuditEvent.hash).order_by(AuditEvent.seq.desc()).limit(1)
    ).first()
    seq, prev_hash = (last[0] + 1, last[1]) if last else (1, GENESIS_HASH)
    event = AuditEvent(
        seq=seq,
        created_at=utcnow(),
        actor=actor,
        actor_role=actor_role,
        action=action,
        reference=reference,
        outcome=outcome,
        details=json.dumps(_check_details(details or {}), sort_keys=True, separators=(",", ":")),
        ip_hmac=ip_hmac,
        prev_hash=prev_hash,
    )
    event.hash = event_hash(prev_hash, event)
    session.add(event)
    session.flush()
    return event


@dataclass(frozen=True)
class ChainReport:
    ok: bool
    events: int
    first_bad_seq: int | None = None
    problem: str | None = None
    last_seq: int = 0
    last_hash: str = GENESIS_HASH


def verify_events(events: Iterable[AuditEvent]) -> ChainReport:
    """Recompute the chain over ``events`` (in ``seq`` order) and name the first broken link."""
    prev_hash, expected_seq, count = GENESIS_HASH, 1, 0
    for event in events:
        count += 1
        if event.seq != expected_seq:
            problem = "missing event" if event.seq > expected_seq else "reordered or repeated event"
            return ChainReport(False, count, expected_seq, problem, expected_seq - 1, prev_hash)
        if event.prev_hash != prev_hash:
            return ChainReport(False, count, event.seq, "broken link to the previous event")
        if event_hash(prev_hash, event) != event.hash:
            return ChainReport(False, count, event.seq, "event changed after it was written")
        prev_hash, expected_seq = event.hash, expected_seq + 1
    return ChainReport(True, count, last_seq=expected_seq - 1, last_hash=prev_hash)


def verify_chain(session: Session) -> ChainReport:
    """Verify the whole chain stored in the database."""
    events = session.execute(
        select(AuditEvent).order_by(AuditEvent.seq).execution_options(yield_per=5000)
    ).scalars()
    return verify_events(events)
