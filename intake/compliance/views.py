"""Compliance pages."""

from __future__ import annotations

from datetime import datetime

from flask import Blueprint, abort, render_template, request
from flask.typing import ResponseReturnValue
from sqlalchemy import select

from intake.extensions import db
from intake.models import AuditEvent
from intake.staff.auth import roles_required

bp = Blueprint("compliance", __name__, url_prefix="/compliance", template_folder="templates")
PAGE = 100


def audit_query(args: dict[str, str]) -> tuple[object, dict[str, str]]:
    """The audit search of ``args`` (actor, action, reference, since, until, before)."""
    filters = {
        k: (args.get(k) or "").strip() for k in ("actor", "action", "reference", "since", "until")
    }
    query = select(AuditEvent)
    if filters["actor"]:
        query = query.where(AuditEvent.actor == filters["actor"])
    if filters["action"]:
        query = query.where(AuditEvent.action == filters["action"])
    if filters["reference"]:
        query = query.where(AuditEvent.reference == filters["reference"].upper())
    for key, op in (("since", "__ge__"), ("until", "__le__")):
        if filters[key]:
            try:
                moment = datetime.fromisoformat(filters[key])
            except ValueError:
                abort(400)
            if moment.tzinfo is None:
                from datetime import UTC

                moment = moment.replace(tzinfo=UTC)
            query = query.where(getattr(AuditEvent.created_at, op)(moment))
    return query, filters


@bp.get("/audit")
@roles_required("compliance")
def audit() -> ResponseReturnValue:
    query, filters = audit_query(request.args.to_dict())
    before = request.args.get("before", type=int)
    if before:
        query = query.where(AuditEvent.seq < before)  # type: ignore[attr-defined]
    events = (
        db.session.execute(
            query.order_by(AuditEvent.seq.desc()).limit(PAGE)  # type: ignore[attr-defined]
        )
        .scalars()
        .all()
    )
    return render_template(
        "compliance/audit.html",
        events=events,
        filters=filters,
        next_before=events[-1].seq if len(events) == PAGE else None,
    )
