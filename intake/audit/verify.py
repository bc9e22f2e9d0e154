"""Verify the audit trail on a compliance officer's request, and record that it was verified."""

from __future__ import annotations

import dataclasses
from typing import Any

from intake.audit import chain as audit
from intake.audit import checkpoints
from intake.extensions import DbSession
from intake.models import AuditEvent
from intake.requests.casework import Actor


def report_details(report: Any) -> dict[str, Any]:
    """A verification report's plain fields (ok, events, first_bad_seq, problem, ...)."""
    if dataclasses.is_dataclass(report) and not isinstance(report, type):
        fields = dataclasses.asdict(report)
    else:
        fields = dict(vars(report))
    return {k: v for k, v in fields.items() if isinstance(v, str | int | float | bool | None)}


def check_trail(session: DbSession) -> dict[str, Any]:
    """The most thorough check there is: the chain held against its signed checkpoints."""
    try:
        return report_details(checkpoints.verify_all(session))
    except checkpoints.CheckpointError as error:
        return {
            "ok": False,
            "events": None,
            "first_bad_seq": None,
            "problem": f"the signed checkpoints could not be checked: {error}",
        }


def record_verification(session: DbSession, actor: Actor, result: dict[str, Any]) -> AuditEvent:
    """Record ``audit.verified`` with the result of a check already made; commit.

    Called after the check, so the event is never part of what it vouches for. The check only
    read: its transaction (and the streaming cursor's connection) ends first, so the write
    starts a clean one.
    """
    session.rollback()
    event = audit.record_event(
        session,
        actor=actor.audit_name,
        actor_role=actor.role,
        action="audit.verified",
        outcome="success" if result.get("ok") else "failure",
        ip_hmac=actor.ip_hmac,
        details={"username": actor.username, **result},
    )
    session.commit()
    return event
