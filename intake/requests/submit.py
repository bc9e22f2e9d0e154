"""Accept a patient's request: seal its PHI and record it, its consents, its routing task and
its audit event in one transaction.

Why the submission key: a patient sometimes sends one form twice (a double click, a resend
after a lost answer, back and send again), and staff must not work the same refill twice. Each
form carries a random one-time key; the request stores an HMAC of it (never the key) under a
unique index, so the database itself keeps a second request with that key out, even when both
arrive at the same instant on different web processes. The one that loses finds the winner's
reference and answers with it, but only when it carries the same answers
(:func:`same_as_first`): the key sits in the page, so a shared computer's history or a saved
page can hand it to someone else, who must not learn the first patient's reference. The HMAC
keeps a database reader from replaying it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from intake.audit.chain import record_event
from intake.crypto import phi
from intake.extensions import DbSession
from intake.models import ConsentAcceptance, OutboxMessage, Request, new_uuid
from intake.requests import outbox
from intake.requests.consents import ConsentText
from intake.requests.references import new_reference

ROUTE_TASK = "route_request"


@dataclass(frozen=True)
class Submission:
    kind: str
    language: str
    phi: Mapping[str, Any]
    consents: list[ConsentText]
    topic: str | None = None
    location: str | None = None
    # The language the patient asked an interpreter for (a plain code; routing serves it).
    interpreter_language: str | None = None
    ip_hmac: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)
    # The form's one-time key: a second submission with the same key stores nothing.
    submission_key: str | None = None


@dataclass(frozen=True)
class Accepted:
    request_id: str
    reference: str
    # None when ``duplicate``: the first submission's routing task is already on its way.
    outbox_id: int | None
    # True when this key had already been accepted: nothing new was stored.
    duplicate: bool = False

    @property
    def outgoing(self) -> list[outbox.Outgoing]:
        """The routing task to publish once committed (none for a duplicate)."""
        if self.outbox_id is None:
            return []
        return [outbox.Outgoing(self.outbox_id, ROUTE_TASK, self.request_id)]


def _indexes(keyring: phi.Keyring, document: Mapping[str, Any]) -> dict[str, str | None]:
    dob = document.get("date_of_birth")
    return {
        "phone_index": phi.phone_index(keyring, document["phone"])
        if document.get("phone")
        else None,
        "email_index": phi.email_index(keyring, document["email"])
        if document.get("email")
        else None,
        "name_dob_index": (
            phi.name_dob_index(keyring, document["last_name"], dob) if dob else None
        ),
    }


def display_name(document: Mapping[str, Any]) -> str:
    """First name and last initial: what the queue shows, and no more."""
    last = str(document.get("last_name", "")).strip()
    return f"{document.get('first_name', '')} {last[:1]}.".strip()


def submission_key_index(keyring: phi.Keyring, key: str) -> str:
    return phi.blind_index(keyring, "submission_key", key)


def find_submission(session: DbSession, keyring: phi.Keyring, key: str) -> Accepted | None:
    """The request already accepted with submission ``key``, if any."""
    row = session.execute(
        select(Request.id, Request.reference).where(
            Request.submission_key_index == submission_key_index(keyring, key)
        )
    ).first()
    if row is None:
        return None
    return Accepted(request_id=row.id, reference=row.reference, outbox_id=None, duplicate=True)


def same_as_first(
    session: DbSession, keyring: phi.Keyring, first: Accepted, document: Mapping[str, Any]
) -> bool:
    """Whether ``document`` is what the request ``first`` stored: a resend, not another request.

    Why: the submission key sits in the page, so whoever gets hold of it (a shared computer's
    history, a saved page) could send other answers with it and be told the first patient's
    reference. Only the same answers again get the first one's reference; anyone who can send
    those knows them already. The stored PHI is opened for the comparison only, never shown.
    """
    row = session.get(Request, first.request_id)
    if row is None or row.wrapped_key is None or row.kek_id is None:
        return False  # shredded: nothing left to be the same as
    try:
        stored = phi.open_phi(
            keyring, row.id, phi.SealedPHI(phi.WrappedKey(row.kek_id, row.wrapped_key), row.phi)
        )
    except phi.SealError:
        return False
    return phi.canonical_json(stored) == phi.canonical_json(document)


def submit_request(session: DbSession, keyring: phi.Keyring, submission: Submission) -> Accepted:
    """Store a request atomically; the caller publishes the outbox row after this returns.

    With a ``submission_key`` that was accepted before, store nothing and return the first
    request (``duplicate``); the database's unique index decides between simultaneous ones.
    """
    key = submission.submission_key
    key_index = submission_key_index(keyring, key) if key else None
    for attempt in range(3):
        request_id = new_uuid()
        data_key, wrapped = phi.new_data_key(keyring, request_id)
        document = submission.phi
        sealed = phi.seal(data_key, request_id, phi.PHI_PURPOSE, document)
        display = phi.seal(
            data_key, request_id, phi.DISPLAY_PURPOSE, {"name": display_name(document)}
        )
        # Unique in the database: a reference drawn twice fails the insert and is drawn again.
        reference = new_reference(submission.kind)
        row = Request(
            id=request_id,
            reference=reference,
            kind=submission.kind,
            topic=submission.topic,
            location=submission.location,
            language=submission.language,
            interpreter_language=submission.interpreter_language,
            status="received",
            kek_id=wrapped.kek_id,
            wrapped_key=wrapped.blob,
            phi=sealed,
            display_name=display,
            submission_key_index=key_index,
            **_indexes(keyring, submission.phi),
        )
        try:
            message = _insert(session, row, submission)
            outbox_id = message.id  # known since the flush; commit expires the object
            session.commit()
        except IntegrityError:
            # Either this form's key was accepted a moment ago by another request (the unique
            # index waited for it to commit), or two submissions drew the same reference.
            session.rollback()
            first = find_submission(session, keyring, key) if key else None
            if first is not None:
                return first
            if attempt == 2:
                raise
            continue
        return Accepted(request_id=request_id, reference=reference, outbox_id=outbox_id)
    raise AssertionError("unreachable")


def _insert(session: DbSession, row: Request, submission: Submission) -> OutboxMessage:
    """Add the request, its consents, its routing task and its audit event; flush, not commit."""
    request_id, reference = row.id, row.reference
    session.add(row)
    session.flush()  # the request row first: consents and the outbox refer to it
    for text in submission.consents:
        session.add(
            ConsentAcceptance(
                request_id=request_id,
                document=text.document,
                version=text.version,
                language=text.language,
                sha256=text.sha256,
            )
        )
    message = outbox.enqueue(session, request_id, ROUTE_TASK, published_by_caller=True)
    record_event(
        session,
        actor="patient",
        action="request.submitted",
        reference=reference,
        ip_hmac=submission.ip_hmac,
        details={
            "kind": submission.kind,
            "topic": submission.topic,
            "location": submission.location,
            "language": submission.language,
            "interpreter_language": submission.interpreter_language,
            "consents": [f"{c.document}-{c.version}.{c.language}" for c in submission.consents],
            **submission.details,
        },
    )
    return message
