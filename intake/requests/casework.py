"""What staff do to a request: open it, claim, release, change status, note, transfer, find.

Every function here is one audited transaction: the change and its audit event commit together
or not at all. Access follows the minimum-necessary rule: staff see their own teams' requests,
supervisors every team's, compliance officers and anyone else only through break-glass, which
records the typed reason and flags the access for review.

Need-to-know inside a team: a request claimed by one person (a claim idle for less than
``CLAIM_IDLE``) is worked by that person or a supervisor only. A teammate's status change,
transfer or note is refused with 409 and recorded as ``refused`` in its own transaction, so the
attempt is in the trail and the request is unchanged. An unclaimed request (or one whose claim
went idle) may be worked by anyone on its team, as before: the claim is how staff say "mine".
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Row, and_, case, func, literal, or_, select, tuple_, update

from intake.audit.chain import record_event
from intake.clock import UTCDateTime
from intake.crypto import phi
from intake.extensions import DbSession
from intake.models import (
    OPEN_STATUSES,
    PRIORITIES,
    PRIORITY_RANK,
    STATUSES,
    AuditEvent,
    ConsentAcceptance,
    Note,
    Request,
    Team,
    User,
)
from intake.requests import assignment, outbox
from intake.requests.notifications import BREAK_GLASS_TASK
from intake.requests.references import normalize_reference
from intake.requests.routing import needed_language
from intake.requests.timeline import TimelineLine, build_timeline

CLAIM_IDLE = timedelta(minutes=30)
TRANSITIONS: dict[str, tuple[str, ...]] = {
    "received": ("cancelled",),
    "queued": ("in_progress", "cancelled"),
    "in_progress": (
        "waiting_on_patient",
        "waiting_on_prescriber",
        "completed",
        "cancelled",
        "queued",
    ),
    "waiting_on_patient": ("in_progress", "completed", "cancelled"),
    "waiting_on_prescriber": ("in_progress", "completed", "cancelled"),
    "completed": (),
    "cancelled": (),
}
NOTIFY_TASK = "notify_team"
BREAK_GLASS_ALERT_TASK = BREAK_GLASS_TASK
MAX_REASON = 300
MAX_NOTE = 4000


REASON_LOOKS_LIKE_PHI = (
    "leave patient details out of the reason: no numbers, dates or e-mail addresses"
)


CLAIMED_BY_OTHER = "claimed by {name} — ask them or a supervisor"
ROLE_MAY_NOT_BREAK_GLASS = (
    "your role may not break the glass at this pharmacy; ask a supervisor to open the request"
)


def check_reason(
    text: str, minimum: int, too_short: str | None = None, maximum: int = MAX_REASON
) -> str:
    """Normalize a reason typed by staff, refusing what looks like patient details.

    Reasons go into the audit trail in the clear, forever (the trail is append-only), so
    numbers, dates and e-mail addresses are refused; names cannot be detected, so the form says
    not to type them. Digits are counted, not matched as runs: a phone, MRN or date can be
    typed in pairs or with spaces ("20 25 55 01 43", "3 15 80"), so more than
    ``MAX_REASON_DIGITS`` digits anywhere (a time of day aside), a day and month ("3/5") or a
    month name beside a number ("March 15", "15 Mar") is refused. Spelled-out numbers pass.
    """
    reason = " ".join(text.split())
    visible = sum(1 for c in reason if c.isalnum())
    if visible < minimum or len(reason) > maximum:
        raise CaseworkError(too_short or f"give a reason of {minimum} to {maximum} characters")
    if (
        "@" in reason
        or sum(1 for c in _TIME_OF_DAY.sub("", reason) if c.isdigit()) > MAX_REASON_DIGITS
        or _DAY_AND_MONTH.search(reason)
    ):
        raise CaseworkError(REASON_LOOKS_LIKE_PHI)
    return reason


# More digits than "team 2, shift 3" needs: the start of a phone, MRN, date or year.
MAX_REASON_DIGITS = 2
# A time of day ("called at 10:30") is not counted: after-hours reasons name one.
_TIME_OF_DAY = re.compile(r"(?<![\d:])(?:[01]?\d|2[0-3]):[0-5]\d(?![\d:])")
_MONTHS = (
    "january|february|march|april|may|june|july|august|september|october|november|december"
    "|jan|feb|mar|apr|jun|jul|aug|sept|sep|oct|nov|dec"
)
_DAY_AND_MONTH = re.compile(
    rf"\d\s*/\s*\d|\b(?:{_MONTHS})\.?\s*\d|\d(?:st|nd|rd|th)?\s*(?:of\s+)?(?:{_MONTHS})\b",
    re.IGNORECASE,
)


class CaseworkError(Exception):
    """An action that cannot be done; ``status`` is the HTTP status to answer with."""

    status = 400

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status


class NotFound(CaseworkError):
    status = 404


class Conflict(CaseworkError):
    status = 409


class Forbidden(CaseworkError):
    status = 403


@dataclass(frozen=True)
class BreakGlassPolicy:
    """Who may break the glass, and whose break-glass alerts the supervisors at once.

    Why: break-glass lets anyone in ``roles`` read any request after typing a reason, and the
    review comes later. For the people who also run the review (compliance officers), a later
    review is weak oversight, so their accesses can alert the supervisors' channel the moment
    they happen (``alert_roles``). The alert names the request's reference, never its PHI.
    """

    roles: tuple[str, ...] = ("staff", "supervisor", "compliance")
    alert_roles: tuple[str, ...] = ("compliance",)

    @classmethod
    def from_settings(cls, settings: Any) -> BreakGlassPolicy:
        return cls(settings.break_glass_roles, settings.break_glass_alert_roles)


@dataclass(frozen=True)
class Actor:
    """Who is acting: a logged-in user, with their role and teams."""

    user_id: int
    username: str
    role: str
    teams: tuple[str, ...]
    ip_hmac: str | None = None

    @property
    def audit_name(self) -> str:
        return f"user:{self.user_id}"

    def in_scope(self, request: Request) -> bool:
        if self.role == "supervisor":
            return True
        return self.role == "staff" and request.team in self.teams

    def record(
        self,
        session: DbSession,
        action: str,
        reference: str | None,
        outcome: str = "success",
        **details: Any,
    ) -> None:
        record_event(
            session,
            actor=self.audit_name,
            actor_role=self.role,
            action=action,
            reference=reference,
            outcome=outcome,
            ip_hmac=self.ip_hmac,
            details={"username": self.username, **details},
        )


def _data_key(keyring: phi.Keyring, request: Request) -> bytes:
    if request.wrapped_key is None or request.kek_id is None:
        raise CaseworkError("this request's data was purged", 410)
    return phi.unwrap_data_key(
        keyring, request.id, phi.WrappedKey(request.kek_id, request.wrapped_key)
    )


def get_request(
    session: DbSession,
    reference: str,
    actor: Actor,
    *,
    lock: bool = False,
    break_glass: bool = False,
) -> Request:
    """The request, if ``actor`` may act on it; 404 otherwise (existence is not revealed)."""
    query = select(Request).where(Request.reference == reference)
    if lock:
        query = query.with_for_update()
    request = session.execute(query).scalar_one_or_none()
    if request is None or not (break_glass or actor.in_scope(request)):
        raise NotFound("no such request in your teams' queues")
    return request


@dataclass
class OpenedRequest:
    request: Request
    phi: dict[str, Any]
    notes: list[dict[str, Any]]
    consents: list[ConsentAcceptance]
    timeline: list[TimelineLine]
    break_glass: bool = False
    claim_active: bool = False
    assignee: str | None = None
    transitions: Sequence[str] = field(default_factory=tuple)
    # Set when this opening alerted the supervisors: publish it after the commit.
    alert_outbox_id: int | None = None

    def claimed_by_other(self, actor: Actor) -> bool:
        """True when someone else's live claim keeps ``actor`` from working the request."""
        return (
            self.claim_active
            and self.request.assignee_id != actor.user_id
            and actor.role != "supervisor"
        )


def claim_is_active(request: Request, now: datetime) -> bool:
    return (
        request.assignee_id is not None
        and request.last_activity_at is not None
        and now - request.last_activity_at < CLAIM_IDLE
    )


def open_request(
    session: DbSession,
    keyring: phi.Keyring,
    reference: str,
    actor: Actor,
    now: datetime,
    break_glass_reason: str | None = None,
    policy: BreakGlassPolicy | None = None,
    team_names: dict[str, str] | None = None,
) -> OpenedRequest:
    """Decrypt a request for ``actor`` and record ``phi.viewed`` (or ``phi.break_glass``).

    Break-glass follows ``policy``: a role it leaves out is refused (403, recorded as a
    ``refused`` break-glass whether or not the request exists, so the answer reveals nothing),
    and a role it names for alerts queues a supervisors' notification in the same transaction.
    """
    policy = policy or BreakGlassPolicy()
    reason = (break_glass_reason or "").strip()
    if break_glass_reason is not None:
        if actor.role not in ("staff", "supervisor", "compliance"):
            raise NotFound("no such request")
        if actor.role not in policy.roles:
            actor.record(
                session,
                "phi.break_glass",
                normalize_reference(reference),
                outcome="refused",
                refused="role_not_allowed",
            )
            session.commit()
            raise Forbidden(ROLE_MAY_NOT_BREAK_GLASS)
        reason = check_reason(
            reason, 10, "type a reason of at least 10 characters to break the glass"
        )
        request = get_request(session, reference, actor, break_glass=True)
    else:
        request = get_request(session, reference, actor)
    data_key = _data_key(keyring, request)
    document = phi.open_sealed(data_key, request.id, phi.PHI_PURPOSE, request.phi)
    notes = []
    for note in session.execute(
        select(Note).where(Note.request_id == request.id).order_by(Note.created_at)
    ).scalars():
        author = session.get(User, note.author_id)
        body = phi.open_sealed(data_key, request.id, f"note:{note.id}", note.text)
        notes.append(
            {
                "at": note.created_at,
                "author": author.username if author else "?",
                "text": body["text"],
            }
        )
    glass = break_glass_reason is not None
    alert = None
    if glass:
        alerted = actor.role in policy.alert_roles
        actor.record(
            session,
            "phi.break_glass",
            reference,
            reason=reason[:MAX_REASON],
            review="pending",
            supervisors_alerted=alerted,
        )
        if alerted:
            # Queued after the event: the alert names the latest break-glass recorded before it.
            alert = outbox.enqueue(session, request.id, BREAK_GLASS_ALERT_TASK)
    # The request's team goes in the event (and so in its public Merkle leaf): the patient's
    # status page and proof say which team opened the request, never which person. So does
    # the team's name then: the ``teams`` table is not in the chain, so a name looked up at
    # display time could be changed in the database unseen.
    team = session.get(Team, request.team) if request.team else None
    actor.record(
        session,
        "phi.viewed",
        reference,
        break_glass=glass,
        notes=len(notes),
        team=request.team,
        team_name=team.name if team is not None else None,
    )
    session.commit()
    consents = list(
        session.execute(
            select(ConsentAcceptance)
            .where(ConsentAcceptance.request_id == request.id)
            .order_by(ConsentAcceptance.id)
        ).scalars()
    )
    timeline = build_timeline(
        session.execute(
            select(AuditEvent).where(AuditEvent.reference == reference).order_by(AuditEvent.seq)
        ).scalars(),
        team_names or {},
    )
    assignee = session.get(User, request.assignee_id) if request.assignee_id else None
    return OpenedRequest(
        request=request,
        phi=document,
        notes=notes,
        consents=consents,
        timeline=timeline,
        break_glass=glass,
        claim_active=claim_is_active(request, now),
        assignee=assignee.username if assignee else None,
        transitions=TRANSITIONS.get(request.status, ()),
        alert_outbox_id=alert.id if alert is not None else None,
    )


def _touch(request: Request, now: datetime, actor: Actor) -> None:
    request.updated_at = now
    # Only the assignee's own work keeps a claim alive: a supervisor stepping in, or a teammate
    # acting on a claim gone idle, does not revive someone else's claim.
    if request.assignee_id is not None and request.assignee_id == actor.user_id:
        request.last_activity_at = now


def _meet_language_need(session: DbSession, request: Request, user_id: int) -> dict[str, str]:
    """Clear a request's "needs <language>" flag when the person taking it speaks it; the
    audit details saying so."""
    if request.language_need is None:
        return {}
    user = session.get(User, user_id)
    if user is None or request.language_need not in user.language_codes:
        return {}
    met, request.language_need = request.language_need, None
    return {"language_need_met": met}


def _refuse_if_claimed_by_other(
    session: DbSession,
    request: Request,
    actor: Actor,
    now: datetime,
    action: str,
    **details: Any,
) -> None:
    """Refuse ``action`` (409) when someone else's live claim covers the request.

    The refusal is its own audited transaction: everything of the attempt is rolled back, then
    an ``action`` event with outcome ``refused`` (who holds the claim, what was tried; never a
    note's text) is committed, so the attempt is in the trail and the chain stays one chain.
    """
    if (
        actor.role == "supervisor"
        or request.assignee_id in (None, actor.user_id)
        or not claim_is_active(request, now)
    ):
        return
    holder = session.get(User, request.assignee_id)
    name = holder.username if holder else "another team member"
    reference, holder_id = request.reference, request.assignee_id
    session.rollback()
    actor.record(
        session,
        action,
        reference,
        outcome="refused",
        refused="claimed_by_other",
        assignee=f"user:{holder_id}",
        **details,
    )
    session.commit()
    raise Conflict(CLAIMED_BY_OTHER.format(name=name))


def claim(session: DbSession, reference: str, actor: Actor, now: datetime) -> None:
    request = get_request(session, reference, actor, lock=True)
    if request.status not in OPEN_STATUSES:
        raise Conflict("only an open request can be claimed")
    if claim_is_active(request, now) and request.assignee_id != actor.user_id:
        raise Conflict("another team member is working on this request")
    previous = request.assignee_id
    request.assignee_id, request.claimed_at, request.last_activity_at = actor.user_id, now, now
    request.updated_at = now
    met = _meet_language_need(session, request, actor.user_id)
    actor.record(session, "request.claimed", reference, previous_assignee=previous, **met)
    session.commit()


def release(session: DbSession, reference: str, actor: Actor, now: datetime) -> None:
    request = get_request(session, reference, actor, lock=True)
    if request.assignee_id is None:
        raise Conflict("this request is not claimed")
    if request.assignee_id != actor.user_id and actor.role != "supervisor":
        raise Conflict("only the assignee or a supervisor can release this claim")
    previous = request.assignee_id
    request.assignee_id = request.claimed_at = request.last_activity_at = None
    request.returned_by_id = previous
    request.updated_at = now
    actor.record(session, "request.released", reference, previous_assignee=previous)
    # Whoever let it go has room for the next one (automatic assignment's backfill).
    assignment.queue_backfill(session, previous)
    session.commit()


def change_status(
    session: DbSession, reference: str, actor: Actor, new_status: str, now: datetime
) -> None:
    request = get_request(session, reference, actor, lock=True)
    # What was asked for is recorded only when it is a status: the field comes from the browser.
    asked = new_status if new_status in TRANSITIONS else None
    _refuse_if_claimed_by_other(
        session, request, actor, now, "request.status_changed", old=request.status, new=asked
    )
    allowed = TRANSITIONS.get(request.status, ())
    if new_status not in allowed:
        raise Conflict(
            f"a request that is {request.status.replace('_', ' ')} cannot become "
            f"{new_status.replace('_', ' ')}"
        )
    old = request.status
    request.status = new_status
    met: dict[str, str] = {}
    if new_status in ("completed", "cancelled", "queued"):
        assignment.queue_backfill(session, request.assignee_id)
        if new_status == "queued":
            request.returned_by_id = request.assignee_id
        request.assignee_id = request.claimed_at = request.last_activity_at = None
    elif request.assignee_id is None or (
        not claim_is_active(request, now) and actor.role != "supervisor"
    ):
        # Starting work on a request claims it (a claim gone idle passes to whoever does).
        request.assignee_id, request.claimed_at, request.last_activity_at = (
            actor.user_id,
            now,
            now,
        )
        met = _meet_language_need(session, request, actor.user_id)
    _touch(request, now, actor)
    actor.record(session, "request.status_changed", reference, old=old, new=new_status, **met)
    session.commit()


def add_note(
    session: DbSession, keyring: phi.Keyring, reference: str, actor: Actor, text: str, now: datetime
) -> None:
    text = text.strip()
    if not text:
        raise CaseworkError("a note cannot be empty")
    if len(text) > MAX_NOTE:
        raise CaseworkError(f"a note holds at most {MAX_NOTE} characters")
    request = get_request(session, reference, actor, lock=True)
    _refuse_if_claimed_by_other(session, request, actor, now, "note.added", length=len(text))
    note = Note(request_id=request.id, author_id=actor.user_id, created_at=now, text=b"")
    session.add(note)
    session.flush()
    note.text = phi.seal(_data_key(keyring, request), request.id, f"note:{note.id}", {"text": text})
    _touch(request, now, actor)
    actor.record(session, "note.added", reference, note_id=note.id, length=len(text))
    session.commit()


def transfer(
    session: DbSession,
    reference: str,
    actor: Actor,
    team: str,
    reason: str,
    known_teams: Sequence[str],
    now: datetime,
    team_languages: Mapping[str, Collection[str]] | None = None,
) -> int:
    """Move a request to another team's queue; returns the notification's outbox id.

    With ``team_languages`` (each team's languages in the routing file), a request needing a
    language is flagged "needs <language>" when the new team does not serve it, and unflagged
    when it does: it arrives unassigned.
    """
    [outbox_id] = bulk_transfer(
        session, [reference], actor, team, reason, known_teams, now, team_languages
    )
    return outbox_id


# -- several requests at once ------------------------------------------------------------------

MAX_BULK = 50
NOTHING_CHANGED = "nothing was changed"
REFERENCE_SHAPE = re.compile(r"^[RC]-[0-9A-Z]{4}-[0-9A-Z]{4}$")


@dataclass(frozen=True)
class TransferPreview:
    """What a transfer will do to one request, shown for confirmation before it is done."""

    reference: str
    from_team: str | None
    assignee: str | None


def _bulk_requests(session: DbSession, references: Sequence[str], actor: Actor) -> list[Request]:
    """The requests named, locked in id order, if ``actor`` may act on every one of them.

    Why: a batch is checked whole before anything changes. A reference outside the actor's
    teams (a tampered form, or a page gone stale after a transfer) refuses the batch with 404,
    the same answer as for a reference that does not exist, so nothing about other teams'
    requests is revealed and none of the batch is changed. Rows are locked in id order so two
    batches over the same requests wait for each other instead of deadlocking.
    """
    wanted = list(dict.fromkeys(r.strip().upper() for r in references if r.strip()))
    if not wanted:
        raise CaseworkError("choose at least one request")
    if len(wanted) > MAX_BULK:
        raise CaseworkError(f"choose at most {MAX_BULK} requests at once")
    shaped = [r for r in wanted if REFERENCE_SHAPE.match(r)]
    found = {
        r.reference: r
        for r in session.execute(
            select(Request)
            .where(Request.reference.in_(shaped))
            .order_by(Request.id)
            .with_for_update()
        ).scalars()
    }
    missing = [r for r in wanted if r not in found or not actor.in_scope(found[r])]
    if missing:
        if len(wanted) == 1:
            raise NotFound("no such request in your teams' queues")
        raise NotFound(f"{NOTHING_CHANGED}: not in your teams' queues: {', '.join(missing[:10])}")
    return [found[r] for r in wanted]


def _usernames(session: DbSession, ids: Collection[int | None]) -> dict[int, str]:
    wanted = {i for i in ids if i is not None}
    if not wanted:
        return {}
    return dict(session.execute(select(User.id, User.username).where(User.id.in_(wanted))).all())


def bulk_claim(
    session: DbSession, references: Sequence[str], actor: Actor, now: datetime
) -> list[str]:
    """Claim every request named, each with its own ``request.claimed`` event, or none."""
    requests = _bulk_requests(session, references, actor)
    names = _usernames(session, [r.assignee_id for r in requests])
    problems: dict[str, str] = {}
    for request in requests:
        if request.status not in OPEN_STATUSES:
            problems[request.reference] = "only an open request can be claimed"
        elif claim_is_active(request, now) and request.assignee_id != actor.user_id:
            name = names.get(request.assignee_id or 0, "another team member")
            problems[request.reference] = f"{name} is working on this request"
    if problems:
        raise _bulk_error(problems, Conflict, len(requests))
    for request in requests:
        previous = request.assignee_id
        request.assignee_id, request.claimed_at, request.last_activity_at = (
            actor.user_id,
            now,
            now,
        )
        request.updated_at = now
        met = _meet_language_need(session, request, actor.user_id)
        if previous not in (None, actor.user_id):
            assignment.queue_backfill(session, previous)  # their expired claim was taken over
        actor.record(
            session,
            "request.claimed",
            request.reference,
            previous_assignee=previous,
            **_batch(requests),
            **met,
        )
    session.commit()
    return [r.reference for r in requests]


def assignable_people(session: DbSession) -> list[tuple[int, str, tuple[str, ...]]]:
    """Everyone who works the queue and can be given a request: (id, username, their teams)."""
    people = session.execute(
        select(User)
        .where(User.role.in_(("staff", "supervisor")), User.disabled.is_(False))
        .order_by(User.username)
    ).scalars()
    return [(u.id, u.username, tuple(u.team_ids)) for u in people if u.team_ids]


def bulk_assign(
    session: DbSession,
    references: Sequence[str],
    actor: Actor,
    assignee_id: int,
    now: datetime,
) -> list[str]:
    """A supervisor gives every request named to one person on each request's team, or none.

    Each assignment is its own ``request.claimed`` event, by the supervisor (the actor), with
    the person it was given to (``assigned_to``) and who gave it (``assigned_by``): the trail
    says who decided, and the claim is the assignee's from then on. A person who is not on a
    request's team would see a request outside their need to know, so the batch is refused.
    """
    if actor.role != "supervisor":
        raise Forbidden("only a supervisor can assign requests to someone")
    person = session.get(User, assignee_id)
    if person is None or person.disabled or person.role not in ("staff", "supervisor"):
        raise CaseworkError("choose someone who works the queue")
    teams = set(person.team_ids)
    requests = _bulk_requests(session, references, actor)
    problems: dict[str, str] = {}
    for request in requests:
        if request.status not in OPEN_STATUSES:
            problems[request.reference] = "only an open request can be assigned"
        elif request.team not in teams:
            problems[request.reference] = (
                f"{person.username} is not on the team of this request ({request.team})"
            )
    if problems:
        raise _bulk_error(problems, Conflict, len(requests))
    for request in requests:
        previous = request.assignee_id
        request.assignee_id, request.claimed_at, request.last_activity_at = person.id, now, now
        request.updated_at = now
        met = _meet_language_need(session, request, person.id)
        if previous not in (None, person.id):
            assignment.queue_backfill(session, previous)
        actor.record(
            session,
            "request.claimed",
            request.reference,
            previous_assignee=previous,
            assigned_to=f"user:{person.id}",
            assigned_to_username=person.username,
            assigned_by=actor.username,
            **_batch(requests),
            **met,
        )
    session.commit()
    return [r.reference for r in requests]


def bulk_transfer(
    session: DbSession,
    references: Sequence[str],
    actor: Actor,
    team: str,
    reason: str,
    known_teams: Sequence[str],
    now: datetime,
    team_languages: Mapping[str, Collection[str]] | None = None,
) -> list[int]:
    """Move every request named to ``team``'s queue, or none; the notifications' outbox ids.

    Each move is its own ``request.transferred`` event with the one reason given. A request
    a teammate holds a live claim on refuses the batch as it refuses one transfer: the attempt
    is rolled back and a ``refused`` event per such request is committed (see
    ``_refuse_if_claimed_by_other``).
    """
    requests, reason = _check_transfer(session, references, actor, team, reason, known_teams, now)
    outbox_ids = []
    for request in requests:
        old_team = request.team
        request.team, request.status = team, "queued"
        # The one who held it has room again; the new team's automatic assignment deals it.
        assignment.queue_backfill(session, request.assignee_id)
        assignment.queue_assignment(session, request.id, team)
        request.assignee_id = request.claimed_at = request.last_activity_at = None
        request.returned_by_id = None
        request.updated_at = now
        flag: dict[str, Any] = {}
        need = needed_language(request.language, request.interpreter_language)
        if team_languages is not None and need != "en":
            request.language_need = None if need in team_languages.get(team, ("en",)) else need
            flag = {"language_need": request.language_need}
        actor.record(
            session,
            "request.transferred",
            request.reference,
            from_team=old_team,
            to_team=team,
            reason=reason,
            **_batch(requests),
            **flag,
        )
        outbox_ids.append(outbox.enqueue(session, request.id, NOTIFY_TASK))
    session.commit()
    return [message.id for message in outbox_ids]


def preview_transfer(
    session: DbSession,
    references: Sequence[str],
    actor: Actor,
    team: str,
    reason: str,
    known_teams: Sequence[str],
    now: datetime,
) -> list[TransferPreview]:
    """What ``bulk_transfer`` would do, checked the same way, with nothing changed."""
    requests, _reason = _check_transfer(session, references, actor, team, reason, known_teams, now)
    names = _usernames(session, [r.assignee_id for r in requests])
    preview = [
        TransferPreview(r.reference, r.team, names.get(r.assignee_id or 0)) for r in requests
    ]
    session.rollback()  # the locks go; the confirmed POST checks again
    return preview


def _check_transfer(
    session: DbSession,
    references: Sequence[str],
    actor: Actor,
    team: str,
    reason: str,
    known_teams: Sequence[str],
    now: datetime,
) -> tuple[list[Request], str]:
    if team not in known_teams:
        raise CaseworkError("choose one of the teams")
    reason = check_reason(reason, 5)
    requests = _bulk_requests(session, references, actor)
    held = [
        r
        for r in requests
        if actor.role != "supervisor"
        and r.assignee_id not in (None, actor.user_id)
        and claim_is_active(r, now)
    ]
    if held:
        names = _usernames(session, [r.assignee_id for r in held])
        refused = [(r.reference, r.assignee_id, r.team) for r in held]
        problems = {
            r.reference: CLAIMED_BY_OTHER.format(
                name=names.get(r.assignee_id or 0, "another team member")
            )
            for r in held
        }
        session.rollback()
        for reference, holder_id, from_team in refused:
            actor.record(
                session,
                "request.transferred",
                reference,
                outcome="refused",
                refused="claimed_by_other",
                assignee=f"user:{holder_id}",
                from_team=from_team,
                to_team=team,
            )
        session.commit()
        raise _bulk_error(problems, Conflict, len(requests))
    problems = {}
    for request in requests:
        if request.status not in OPEN_STATUSES:
            problems[request.reference] = "only an open request can be transferred"
        elif request.team == team:
            problems[request.reference] = "the request is already in that team's queue"
    if problems:
        raise _bulk_error(problems, Conflict, len(requests))
    return requests, reason


def _batch(requests: Sequence[Request]) -> dict[str, Any]:
    """The audit detail saying an event was one of a batch, and of how many."""
    return {"batch_of": len(requests)} if len(requests) > 1 else {}


def _bulk_error(
    problems: Mapping[str, str], error: type[CaseworkError], batch: int
) -> CaseworkError:
    """One error for a batch: one request's problem as it is, else each with its reference."""
    if batch == 1:
        return error(next(iter(problems.values())))
    listed = "; ".join(f"{reference}: {problem}" for reference, problem in problems.items())
    return error(f"{NOTHING_CHANGED}. {listed}")


# -- the queue ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueueRow:
    reference: str
    kind: str
    topic: str | None
    language: str
    status: str
    priority: str
    team: str | None
    sla_due_at: datetime | None
    assignee: str | None
    display_name: str
    cursor: str
    interpreter_language: str | None = None
    language_need: str | None = None
    created_at: datetime | None = None


# What a queue cursor may hold (see ``parse_cursor``).
CURSOR_RANKS = frozenset(str(rank) for rank in range(len(PRIORITIES)))
CURSOR_DUE_RANGE = (datetime(2000, 1, 1, tzinfo=UTC), datetime(2201, 1, 1, tzinfo=UTC))
MAX_CURSOR_ID = 36

# The columns the queue sorts by; "-" before one reverses it. "priority" is the default order
# (urgent first, then soonest due), served by the ``ix_requests_open_queue`` index.
QUEUE_SORTS = ("priority", "due", "received", "status")
ASSIGNEE_FILTERS = ("mine", "unassigned")
# A request not routed yet has no due time: it sorts after every due time, as in the default.
NO_DUE_TIME = datetime(2200, 1, 1, tzinfo=UTC)
STATUS_ORDER = {status: rank for rank, status in enumerate(STATUSES)}


def sort_key(sort: str | None) -> str:
    """``sort`` if the queue knows it (``-`` for the reverse), else the default order."""
    if sort and sort.removeprefix("-") in QUEUE_SORTS and sort != "priority":
        return sort
    return "priority"


def _due() -> Any:
    return func.coalesce(Request.sla_due_at, literal(NO_DUE_TIME, UTCDateTime()))


def _sort_columns(sort: str) -> list[Any]:
    """The columns of a non-default order, the request id last so the order is total."""
    name = sort.removeprefix("-")
    status_rank = case(STATUS_ORDER, value=Request.status, else_=len(STATUSES))
    columns = {
        "priority": [Request.priority_rank, _due()],
        "due": [_due(), Request.priority_rank],
        "received": [Request.created_at],
        "status": [status_rank, Request.priority_rank, _due()],
    }[name]
    return [*columns, Request.id]


def _sort_values(request: Request | Row[Any], sort: str) -> list[Any]:
    due = request.sla_due_at or NO_DUE_TIME
    table: dict[str, list[Any]] = {
        "priority": [request.priority_rank, due],
        "due": [due, request.priority_rank],
        "received": [request.created_at],
        "status": [STATUS_ORDER.get(request.status, len(STATUSES)), request.priority_rank, due],
    }
    return [*table[sort.removeprefix("-")], request.id]


def _cursor(request: Request | Row[Any], sort: str = "priority") -> str:
    if sort == "priority":
        due = request.sla_due_at.isoformat() if request.sla_due_at else ""
        return f"{request.priority_rank}|{due}|{request.id}"
    values = [
        v.isoformat() if isinstance(v, datetime) else str(v) for v in _sort_values(request, sort)
    ]
    return "~".join([sort, *values])


def parse_cursor(after: str) -> tuple[int, datetime | None, str] | None:
    """The (priority rank, due time, id) of a cursor as ``_cursor`` writes it; None otherwise.

    The cursor comes back from the browser, so it is read as strictly as any input: a known
    rank, a timezone-aware due time within ``CURSOR_DUE_RANGE`` or none, an id no longer than
    a request id. Anything else (a rank too big for the database column, a naive due time the
    UTC column refuses, a year no request is due in) is not a cursor the app issued.
    """
    parts = after.split("|")
    if len(parts) != 3:
        return None
    rank_text, due_text, last_id = parts
    if rank_text not in CURSOR_RANKS or not 0 < len(last_id) <= MAX_CURSOR_ID:
        return None
    due = None
    if due_text:
        due = _cursor_time(due_text)
        if due is None:
            return None
    return int(rank_text), due, last_id


def _cursor_time(text: str) -> datetime | None:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return None
    earliest, latest = CURSOR_DUE_RANGE
    if when.tzinfo is None or not earliest <= when < latest:
        return None
    return when


def parse_sort_cursor(after: str, sort: str) -> list[Any] | None:
    """The sort values of a cursor ``_cursor`` wrote for ``sort``; None for anything else.

    Read as strictly as ``parse_cursor``: the same sort, each value of its column's kind (a
    small integer, a time within ``CURSOR_DUE_RANGE``), an id no longer than a request id.
    """
    parts = after.split("~")
    if not parts or parts[0] != sort:
        return None
    values = parts[1:]
    kinds = {
        "priority": "it",
        "due": "ti",
        "received": "t",
        "status": "iit",
    }[sort.removeprefix("-")]
    if len(values) != len(kinds) + 1 or not 0 < len(values[-1]) <= MAX_CURSOR_ID:
        return None
    parsed: list[Any] = []
    for kind, text in zip(kinds, values, strict=False):
        if kind == "i":
            if not text.isdigit() or len(text) > 2:
                return None
            parsed.append(int(text))
        else:
            when = _cursor_time(text)
            if when is None:
                return None
            parsed.append(when)
    return [*parsed, values[-1]]


def _queue_conditions(
    actor: Actor,
    *,
    status: str | None = None,
    team: str | None = None,
    kind: str | None = None,
    language_need: str | None = None,
    assignee: str | None = None,
) -> list[Any]:
    """The WHERE of the queue: what ``actor`` may see, narrowed by the filters in force."""
    conditions: list[Any] = []
    if status:
        conditions.append(Request.status == status)
    else:
        conditions.append(Request.status.in_(OPEN_STATUSES))
    if actor.role != "supervisor":
        conditions.append(Request.team.in_(actor.teams))
    if team:
        conditions.append(Request.team == team)
    if kind:
        conditions.append(Request.kind == kind)
    if language_need == "any":
        conditions.append(Request.language_need.is_not(None))
    elif language_need:
        conditions.append(Request.language_need == language_need)
    if assignee == "mine":
        conditions.append(Request.assignee_id == actor.user_id)
    elif assignee == "unassigned":
        conditions.append(Request.assignee_id.is_(None))
    return conditions


def queue_query(
    actor: Actor,
    *,
    status: str | None = None,
    team: str | None = None,
    kind: str | None = None,
    language_need: str | None = None,
    assignee: str | None = None,
    sort: str | None = None,
    after: str | None = None,
    limit: int = 50,
) -> Any:
    """Open requests (or ``status``) of the actor's teams, urgent first, then soonest due.

    Keyset pagination on (priority_rank, sla_due_at, id), which the partial index
    ``ix_requests_open_queue`` serves in order: no sort and no OFFSET. The cursor's priority is
    also an index bound, so a later page starts its scan at its own priority level. A cursor
    that ``parse_cursor`` refuses is ignored: the first page. ``language_need`` keeps the
    requests flagged as needing that language ("any": needing any); ``assignee`` those of the
    actor ("mine") or of nobody ("unassigned").

    Another ``sort`` (``QUEUE_SORTS``, "-" for the reverse) pages by keyset on that order's
    columns compared as one row value, the id last; a queue is a few hundred open requests,
    so that sort is cheap without an index of its own.
    """
    query = select(Request).where(
        *_queue_conditions(
            actor,
            status=status,
            team=team,
            kind=kind,
            language_need=language_need,
            assignee=assignee,
        )
    )
    order = sort_key(sort)
    if order != "priority":
        columns = _sort_columns(order)
        values = parse_sort_cursor(after, order) if after else None
        if values is not None:
            bound = tuple_(*[literal(v, c.type) for c, v in zip(columns, values, strict=True)])
            row = tuple_(*columns)
            query = query.where(row < bound if order.startswith("-") else row > bound)
        direction = (lambda c: c.desc()) if order.startswith("-") else (lambda c: c.asc())
        return query.order_by(*[direction(c) for c in columns]).limit(limit)
    cursor = parse_cursor(after) if after else None
    if cursor is not None:
        rank, due, last_id = cursor
        query = query.where(Request.priority_rank >= rank)
        # Requests not routed yet have no due time; they sort last within their priority.
        if due is None:
            query = query.where(
                or_(
                    Request.priority_rank > rank,
                    and_(
                        Request.priority_rank == rank,
                        Request.sla_due_at.is_(None),
                        Request.id > last_id,
                    ),
                )
            )
        else:
            query = query.where(
                or_(
                    Request.priority_rank > rank,
                    and_(
                        Request.priority_rank == rank,
                        or_(Request.sla_due_at > due, Request.sla_due_at.is_(None)),
                    ),
                    and_(
                        Request.priority_rank == rank,
                        Request.sla_due_at == due,
                        Request.id > last_id,
                    ),
                )
            )
    return query.order_by(
        Request.priority_rank, Request.sla_due_at.asc().nulls_last(), Request.id
    ).limit(limit)


@dataclass(frozen=True)
class QueueCounts:
    """How many requests the filters in force hold, and how many of them are overdue, the
    actor's own, or nobody's. Numbers only: counting opens no patient data."""

    total: int
    overdue: int
    mine: int
    unassigned: int


def queue_counts(
    session: DbSession,
    actor: Actor,
    now: datetime,
    *,
    status: str | None = None,
    team: str | None = None,
    kind: str | None = None,
    language_need: str | None = None,
) -> QueueCounts:
    """Count the queue under its filters (not the "mine"/"unassigned" one: those are counted)."""
    conditions = _queue_conditions(
        actor, status=status, team=team, kind=kind, language_need=language_need
    )
    overdue = and_(Request.sla_due_at < now, Request.status.in_(OPEN_STATUSES))
    row = session.execute(
        select(
            func.count(),
            func.count(case((overdue, 1))),
            func.count(case((Request.assignee_id == actor.user_id, 1))),
            func.count(case((Request.assignee_id.is_(None), 1))),
        ).where(*conditions)
    ).one()
    return QueueCounts(*(int(n or 0) for n in row))


# What the queue's version stamp fingerprints of each row shown (with the counts above them):
# its id, its updated_at (which every change to a request moves) and what the page shows of it
# that can change. A page whose stamp differs from its poller's reloads its rows.
VERSION_COLUMNS = (
    Request.id,
    Request.status,
    Request.priority,
    Request.assignee_id,
    Request.updated_at,
    Request.language_need,
)
# What the queue page reads of a request: what it shows, sorts and pages by, the sealed display
# name with the wrapped data key that opens it, and the version's columns. Not the sealed PHI
# document, the notes or the blind indexes.
PAGE_COLUMNS = (
    *VERSION_COLUMNS,
    Request.reference,
    Request.kind,
    Request.topic,
    Request.language,
    Request.interpreter_language,
    Request.priority_rank,
    Request.team,
    Request.sla_due_at,
    Request.created_at,
    Request.kek_id,
    Request.wrapped_key,
    Request.display_name,
)


@dataclass(frozen=True)
class QueueView:
    """One queue page: its rows, the counts above them, and the version stamp of both."""

    rows: list[QueueRow]
    counts: QueueCounts
    version: str


def queue_fingerprint(rows: Sequence[Any], counts: QueueCounts) -> str:
    """The version stamp of a page of ``rows`` (``VERSION_COLUMNS`` first) under ``counts``.

    No PHI goes in: ids, statuses, priorities, assignees, times and numbers only.
    """
    width = len(VERSION_COLUMNS)
    fingerprint = repr(([tuple(map(str, row[:width])) for row in rows], counts))
    return hashlib.sha256(fingerprint.encode()).hexdigest()[:16]


def _counted(filters: Mapping[str, Any]) -> dict[str, Any]:
    """The filters ``queue_counts`` takes: all but the assignee one, whose choices it counts."""
    return {key: value for key, value in filters.items() if key != "assignee"}


def queue_version(
    session: DbSession,
    actor: Actor,
    now: datetime,
    *,
    sort: str | None = None,
    after: str | None = None,
    limit: int = 50,
    **filters: Any,
) -> str:
    """The version stamp ``queue_view`` gives the same page, read without opening any PHI."""
    query = queue_query(actor, sort=sort, after=after, limit=limit, **filters)
    rows = session.execute(query.with_only_columns(*VERSION_COLUMNS)).all()
    return queue_fingerprint(rows, queue_counts(session, actor, now, **_counted(filters)))


def queue_view(
    session: DbSession,
    keyring: phi.Keyring,
    actor: Actor,
    now: datetime,
    *,
    sort: str | None = None,
    after: str | None = None,
    limit: int = 50,
    **filters: Any,
) -> QueueView:
    """A page of the queue with its counts and version stamp: two statements, no ORM objects.

    The version is the fingerprint of the very rows and counts the page shows, so it equals
    ``queue_version`` until one of them changes, and a change made between the two statements
    makes the page's poller see a difference and reload once more: it is never missed.
    """
    order = sort_key(sort)
    query = (
        queue_query(actor, sort=order, after=after, limit=limit, **filters)
        .with_only_columns(*PAGE_COLUMNS, User.username)
        .outerjoin(User, User.id == Request.assignee_id)
    )
    found = session.execute(query).all()
    counts = queue_counts(session, actor, now, **_counted(filters))
    rows = [_queue_row(keyring, row, row.username, order) for row in found]
    return QueueView(rows, counts, queue_fingerprint(found, counts))


def queue_page(
    session: DbSession,
    keyring: phi.Keyring,
    actor: Actor,
    *,
    limit: int = 50,
    sort: str | None = None,
    **filters: Any,
) -> list[QueueRow]:
    requests = (
        session.execute(queue_query(actor, limit=limit, sort=sort, **filters)).scalars().all()
    )
    return queue_rows_for(session, keyring, requests, sort=sort_key(sort))


def queue_rows_for(
    session: DbSession,
    keyring: phi.Keyring,
    requests: Sequence[Request],
    *,
    sort: str = "priority",
) -> list[QueueRow]:
    usernames = _usernames(session, [r.assignee_id for r in requests])
    return [
        _queue_row(keyring, request, usernames.get(request.assignee_id or 0), sort)
        for request in requests
    ]


def _queue_row(
    keyring: phi.Keyring, request: Request | Row[Any], assignee: str | None, sort: str
) -> QueueRow:
    """A queue row of a request (an ORM object or a row of ``PAGE_COLUMNS``)."""
    name = "?"
    if request.display_name and request.wrapped_key and request.kek_id:
        try:
            data_key = phi.unwrap_data_key(
                keyring, request.id, phi.WrappedKey(request.kek_id, request.wrapped_key)
            )
            opened = phi.open_sealed(
                data_key, request.id, phi.DISPLAY_PURPOSE, request.display_name
            )
            name = opened["name"]
        except phi.SealError:
            name = "(unreadable)"
    return QueueRow(
        reference=request.reference,
        kind=request.kind,
        topic=request.topic,
        language=request.language,
        status=request.status,
        priority=request.priority,
        team=request.team,
        sla_due_at=request.sla_due_at,
        assignee=assignee if request.assignee_id else None,
        display_name=name,
        cursor=_cursor(request, sort),
        interpreter_language=request.interpreter_language,
        language_need=request.language_need,
        created_at=request.created_at,
    )


# -- finding a request -------------------------------------------------------------------------


def search(
    session: DbSession,
    keyring: phi.Keyring,
    actor: Actor,
    *,
    reference: str | None = None,
    phone_e164: str | None = None,
    last_name: str | None = None,
    date_of_birth: str | None = None,
) -> list[Request]:
    """Exact-match search through blind indexes; audited without the search terms."""
    query = select(Request)
    if reference:
        query, by = query.where(Request.reference == reference), "reference"
    elif phone_e164:
        query, by = (
            query.where(Request.phone_index == phi.phone_index(keyring, phone_e164)),
            "phone",
        )
    elif last_name and date_of_birth:
        query, by = (
            query.where(
                Request.name_dob_index == phi.name_dob_index(keyring, last_name, date_of_birth)
            ),
            "name_dob",
        )
    else:
        raise CaseworkError("search by reference, phone, or last name and date of birth")
    found = [
        r
        for r in session.execute(query.order_by(Request.created_at.desc()).limit(50)).scalars()
        if actor.in_scope(r)
    ]
    # The references found (never the terms searched for) let access reports list this search.
    actor.record(
        session,
        "request.searched",
        None,
        by=by,
        results=len(found),
        references=[r.reference for r in found],
    )
    session.commit()
    return found


# -- SLA escalation ----------------------------------------------------------------------------


def escalate_overdue(session: DbSession, now: datetime, limit: int = 200) -> list[tuple[str, int]]:
    """Raise overdue open requests one priority step, once each; returns (reference, outbox id)
    pairs for the supervisor notifications to publish."""
    overdue = (
        session.execute(
            select(Request)
            .where(
                Request.status.in_(OPEN_STATUSES),
                Request.sla_due_at < now,
                Request.escalated_at.is_(None),
            )
            .order_by(Request.sla_due_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        .scalars()
        .all()
    )
    published = []
    for request in overdue:
        old = request.priority
        # From the priority itself: one step up from what staff see, whatever the rank says.
        rank = max(0, PRIORITY_RANK.get(old, request.priority_rank) - 1)
        changed = session.execute(
            update(Request)
            .where(Request.id == request.id, Request.escalated_at.is_(None))
            .values(priority=PRIORITIES[rank], priority_rank=rank, escalated_at=now)
        ).rowcount  # type: ignore[attr-defined]
        if changed != 1:
            continue
        record_event(
            session,
            actor="system:escalate_overdue",
            action="request.escalated",
            reference=request.reference,
            details={
                "old_priority": old,
                "new_priority": PRIORITIES[rank],
                "team": request.team,
                "sla_due_at": request.sla_due_at.isoformat() if request.sla_due_at else None,
            },
        )
        message = outbox.enqueue(session, request.id, "notify_supervisors")
        session.flush()
        published.append((request.reference, message.id))
    session.commit()
    return published
