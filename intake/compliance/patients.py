"""Find one patient's requests for a compliance officer, through the blind indexes only.

Why: "who saw this patient's data" is asked about a person, not a request. The officer types a
last name and date of birth, or a phone number; they are turned into the same keyed hashes
(blind indexes) the requests carry, so nothing is decrypted and the terms are never stored.
The search is recorded as ``request.searched`` with the references found (never the terms),
so it appears in each of those requests' access reports, and the report page is addressed by
that event's number: the address holds no PHI and names only what the search found.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from sqlalchemy import select

from intake.audit.chain import record_event
from intake.compliance.reports import seq_in_range
from intake.crypto import phi
from intake.extensions import DbSession
from intake.models import AuditEvent, Request
from intake.requests.casework import Actor

PURPOSE = "patient_report"
MAX_REQUESTS = 500


@dataclass(frozen=True)
class PatientSearch:
    seq: int  # the ``request.searched`` event
    by: str
    references: list[str]


def find_patient(
    session: DbSession,
    keyring: phi.Keyring,
    actor: Actor,
    *,
    phone_e164: str | None = None,
    last_name: str | None = None,
    date_of_birth: str | None = None,
) -> PatientSearch:
    """Every request of one patient (by phone, or by last name and date of birth), oldest
    first; recorded with the references found and committed."""
    query = select(Request.reference)
    if phone_e164:
        index = phi.phone_index(keyring, phone_e164)
        query, by = query.where(Request.phone_index == index), "phone"
    elif last_name and date_of_birth:
        index = phi.name_dob_index(keyring, last_name, date_of_birth)
        query, by = query.where(Request.name_dob_index == index), "name_dob"
    else:
        raise ValueError("search by phone, or by last name and date of birth")
    references = list(
        session.execute(query.order_by(Request.created_at.asc()).limit(MAX_REQUESTS)).scalars()
    )
    event = record_event(
        session,
        actor=actor.audit_name,
        actor_role=actor.role,
        action="request.searched",
        ip_hmac=actor.ip_hmac,
        details={
            "username": actor.username,
            "by": by,
            "purpose": PURPOSE,
            "results": len(references),
            "references": references,
        },
    )
    session.commit()
    return PatientSearch(event.seq, by, references)


def recorded_search(session: DbSession, seq: int) -> PatientSearch | None:
    """The patient search recorded as event ``seq``, or None if it is not one."""
    event = session.get(AuditEvent, seq) if seq_in_range(seq) else None
    if event is None or event.action != "request.searched":
        return None
    details = json.loads(event.details or "{}")
    if details.get("purpose") != PURPOSE:
        return None
    return PatientSearch(event.seq, str(details.get("by")), list(details.get("references") or []))
