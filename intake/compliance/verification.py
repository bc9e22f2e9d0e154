"""Verify the audit trail from the compliance pages, and say what was found in plain words.

The check is the thorough one (``checkpoints.verify_trail``: the chain, every signed checkpoint
and its Merkle root, the anchor, checkpoint freshness); what the page needs besides the
verdict (the anchor's own state, the latest signed checkpoint and who cosigned it) goes into the
``audit.verified`` event with it, so the page shows what was recorded, never a second look.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, select

from config import Settings
from intake.audit import anchor, checkpoints
from intake.audit.verify import record_verification, report_details
from intake.audit.witnesses import configured_witnesses
from intake.extensions import DbSession
from intake.models import AuditEvent
from intake.requests.casework import Actor


def check_for_officer(session: DbSession, settings: Settings) -> dict[str, Any]:
    """The verdict (``ok``, ``events``, ``first_bad_seq``, ``problem``...) plus the anchor's,
    the checkpoints' and the witnesses' state."""
    try:
        trail = checkpoints.verify_trail(session, settings)
    except checkpoints.CheckpointError as error:
        result: dict[str, Any] = {
            "ok": False,
            "events": None,
            "first_bad_seq": None,
            "problem": f"the signed checkpoints could not be checked: {error}",
        }
    else:
        result = report_details(trail.chain)
        result.update(
            checkpoint_lines=trail.lines,
            checkpoint_seq=trail.last_seq,
            tree_size=trail.latest.size if trail.latest else None,
            cosigned_by=list(trail.cosigned_by),
        )
    try:
        found = anchor.compare(session, anchor.anchor_for(settings))
        result.update(anchor_ok=found.ok, anchor_problem=found.problem)
    except anchor.AnchorError as error:
        result.update(anchor_ok=False, anchor_problem=f"the anchor could not be read: {error}")
    result["witnesses"] = [w.name for w in configured_witnesses(settings)]
    signed_at = session.scalar(
        select(func.max(AuditEvent.created_at)).where(
            AuditEvent.action == checkpoints.CHECKPOINT_ACTION
        )
    )
    result["last_signed_at"] = signed_at.isoformat() if isinstance(signed_at, datetime) else None
    return result


def run_officer_verification(session: DbSession, settings: Settings, actor: Actor) -> AuditEvent:
    """Check the whole trail, then record ``audit.verified`` with what was found; commit.

    The event is written after the check, so it is never part of what it vouches for.
    """
    return record_verification(session, actor, check_for_officer(session, settings))


def ago(moment: datetime, now: datetime) -> str:
    """'5 minutes ago', '2 hours ago', '3 days ago' ('just now' under a minute)."""
    seconds = max(0, int((now - moment).total_seconds()))
    for size, unit in ((86400, "day"), (3600, "hour"), (60, "minute")):
        if seconds >= size:
            n = seconds // size
            return f"{n} {unit}{'' if n == 1 else 's'} ago"
    return "just now"
