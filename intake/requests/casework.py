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

import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_, select, update

from intake.audit.chain import record_event
from intake.crypto import phi
from intake.extensions import DbSession
from intake.models import (
    OPEN_STATUSES,
    PRIORITIES,
    PRIORITY_RANK,
    AuditEvent,
    ConsentAcceptance,
    Note,
    Request,
    Team,
    User,
)
from intake.requests import outbox
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
    request.updated_at = now
    actor.record(session, "request.released", reference, previous_assignee=previous)
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
    if team not in known_teams:
        raise CaseworkError("choose one of the teams")
    reason = check_reason(reason, 5)
    request = get_request(session, reference, actor, lock=True)
    _refuse_if_claimed_by_other(
        session, request, actor, now, "request.transferred", from_team=request.team, to_team=team
    )
    if request.status not in OPEN_STATUSES:
        raise Conflict("only an open request can be transferred")
    if team == request.team:
        raise Conflict("the request is already in that team's queue")
    old_team = request.team
    request.team, request.status = team, "queued"
    request.assignee_id = request.claimed_at = request.last_activity_at = None
    request.updated_at = now
    flag: dict[str, Any] = {}
    need = needed_language(request.language, request.interpreter_language)
    if team_languages is not None and need != "en":
        request.language_need = None if need in team_languages.get(team, ("en",)) else need
        flag = {"language_need": request.language_need}
    actor.record(
        session,
        "request.transferred",
        reference,
        from_team=old_team,
        to_team=team,
        reason=reason,
        **flag,
    )
    message = outbox.enqueue(session, request.id, NOTIFY_TASK)
    session.commit()
    return message.id


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


# What a queue cursor may hold (see ``parse_cursor``).
CURSOR_RANKS = frozenset(str(rank) for rank in range(len(PRIORITIES)))
CURSOR_DUE_RANGE = (datetime(2000, 1, 1, tzinfo=UTC), datetime(2201, 1, 1, tzinfo=UTC))
MAX_CURSOR_ID = 36


def _cursor(request: Request) -> str:
    due = request.sla_due_at.isoformat() if request.sla_due_at else ""
    return f"{request.priority_rank}|{due}|{request.id}"


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
        try:
            due = datetime.fromisoformat(due_text)
        except ValueError:
            return None
        earliest, latest = CURSOR_DUE_RANGE
        if due.tzinfo is None or not earliest <= due < latest:
            return None
    return int(rank_text), due, last_id


def queue_query(
    actor: Actor,
    *,
    status: str | None = None,
    team: str | None = None,
    kind: str | None = None,
    language_need: str | None = None,
    after: str | None = None,
    limit: int = 50,
) -> Any:
    """Open requests (or ``status``) of the actor's teams, urgent first, then soonest due.

    Keyset pagination on (priority_rank, sla_due_at, id), which the partial index
    ``ix_requests_open_queue`` serves in order: no sort and no OFFSET. The cursor's priority is
    also an index bound, so a later page starts its scan at its own priority level. A cursor
    that ``parse_cursor`` refuses is ignored: the first page. ``language_need`` keeps the
    requests flagged as needing that language ("any": needing any).
    """
    query = select(Request)
    if status:
        query = query.where(Request.status == status)
    else:
        query = query.where(Request.status.in_(OPEN_STATUSES))
    if actor.role != "supervisor":
        query = query.where(Request.team.in_(actor.teams))
    if team:
        query = query.where(Request.team == team)
    if kind:
        query = query.where(Request.kind == kind)
    if language_need == "any":
        query = query.where(Request.language_need.is_not(None))
    elif language_need:
        query = query.where(Request.language_need == language_need)
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


def queue_page(
    session: DbSession, keyring: phi.Keyring, actor: Actor, *, limit: int = 50, **filters: Any
) -> list[QueueRow]:
    requests = session.execute(queue_query(actor, limit=limit, **filters)).scalars().all()
    return queue_rows_for(session, keyring, requests)


def queue_rows_for(
    session: DbSession, keyring: phi.Keyring, requests: Sequence[Request]
) -> list[QueueRow]:
    usernames = dict(
        session.execute(
            select(User.id, User.username).where(
                User.id.in_({r.assignee_id for r in requests if r.assignee_id})
            )
        ).all()
    )
    rows = []
    for request in requests:
        name = "?"
        if request.display_name and request.wrapped_key and request.kek_id:
            try:
                name = phi.open_sealed(
                    _data_key(keyring, request),
                    request.id,
                    phi.DISPLAY_PURPOSE,
                    request.display_name,
                )["name"]
            except phi.SealError:
                name = "(unreadable)"
        rows.append(
            QueueRow(
                reference=request.reference,
                kind=request.kind,
                topic=request.topic,
                language=request.language,
                status=request.status,
                priority=request.priority,
                team=request.team,
                sla_due_at=request.sla_due_at,
                assignee=usernames.get(request.assignee_id) if request.assignee_id else None,
                display_name=name,
                cursor=_cursor(request),
                interpreter_language=request.interpreter_language,
                language_need=request.language_need,
            )
        )
    return rows


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
