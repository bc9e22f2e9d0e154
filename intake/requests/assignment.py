"""Automatic assignment: which team member gets a routed request, and work back to the pool.

A team of ``config/routing.toml`` with ``assignment = "round_robin"`` or ``"least_loaded"``
gives each request routed to it to one eligible member: on the team, not away, under their cap
(their own, else the team's ``cap``), speaking the language the request needs when it is not
English and every language the team requires, holding every skill the team asks for (IVIG).
Round robin takes the eligible members in a fixed order and remembers, per team, who got the
last request; least loaded takes whoever has the fewest open requests assigned, and on a tie
whoever has waited longest since their last. When nobody is eligible the request stays
unassigned in the pool.

Work comes back to people as they free up (backfill): releasing, completing or cancelling a
request, coming back from away and a raised cap queue a backfill task for that person through
the transactional outbox, which gives them the oldest unassigned requests they are eligible
for. A beat sweep does the rest every minute: it returns to the pool assigned requests nobody
started within the team's ``claim_timeout_minutes`` (and gives them to someone else), and
gives out whatever is still unassigned (requests transferred in, people who came back while
the broker was down).

Why the locks: several workers assign at once (worker processes, the sweep beside the route
task). Each assignment is one transaction that locks, in this order, the request row (``FOR
UPDATE``), the team, and every member of the team by id, and only then counts their open
requests: a second worker waits for the first to commit and then sees its assignment, so one
request never goes to two people and nobody is pushed over their cap, even when two teams
share a person. Team and members are locked with transaction advisory locks (two-key form, a
key space apart from the audit chain's lock), not row locks, so a login updating a user row
while holding the chain's lock can never deadlock against an assignment; the fixed order
(request, team, members by id, chain last) keeps assignments from deadlocking each other. The
request changes by a conditional UPDATE (still queued, still unassigned) as a second guard.
SQLite runs one writer at a time (``BEGIN IMMEDIATE``), which gives the same. Caps bound
automatic assignment only: a person may still claim more by hand.

Every decision is an audit event with its reason in plain words, never PHI:
``request.assigned`` ("assigned to pharm2: speaks Spanish, 3 of 8 open"),
``request.left_in_pool`` (nobody eligible when it was routed, and why), and
``request.released`` by ``system:assign`` for a claim timeout.
"""

from __future__ import annotations

import zlib
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from flask import current_app, has_app_context
from sqlalchemy import event, func, select, text, update
from sqlalchemy.orm import Session

from intake.audit.chain import record_event
from intake.clock import utcnow
from intake.extensions import DbSession
from intake.models import OPEN_STATUSES, OutboxMessage, Request, Team, User, UserTeam
from intake.requests import outbox
from intake.requests.routing import (
    BASE_LANGUAGE,
    MAX_CAP,
    SKILL_RE,
    RoutingTable,
    needed_language,
)
from intake.requests.routing import Team as TeamRules

log = structlog.get_logger(__name__)

ACTOR = "system:assign"
ASSIGN_TASK = "assign_request"
BACKFILL_TASK = "backfill_assignments"
WORKERS = ("staff", "supervisor")
# Advisory lock key spaces (pg_advisory_xact_lock(space, key)): one team, one person.
TEAM_LOCK_SPACE = 7301
USER_LOCK_SPACE = 7302
# Outbox rows of this transaction to publish once it commits (see _publish_after_commit).
PENDING_KEY = "intake.assignment.outbox"
NEVER = datetime(1970, 1, 1, tzinfo=UTC)


class AssignmentError(ValueError):
    """A setting an admin or a person asked for cannot be made; the message says why."""


@dataclass(frozen=True)
class Member:
    id: int
    username: str
    languages: frozenset[str]
    skills: frozenset[str]
    cap: int
    away: bool
    last_assigned_at: datetime | None
    open_requests: int


@dataclass(frozen=True)
class Outcome:
    """What one assignment attempt did: ``assignee`` is None when the request was not given."""

    request_id: str
    reference: str | None = None
    assignee: str | None = None
    assignee_id: int | None = None
    reason: str = ""
    # True when the one person asked about (backfill) is at their cap: stop offering them more.
    person_full: bool = False


# -- who may get a request --------------------------------------------------------------------


def _lock(session: DbSession, space: int, key: int) -> None:
    if session.get_bind().dialect.name == "postgresql":
        session.execute(
            text("SELECT pg_advisory_xact_lock(:space, :key)"), {"space": space, "key": key}
        )


def _team_key(team_id: str) -> int:
    return zlib.crc32(team_id.encode()) & 0x7FFFFFFF


def _members(session: DbSession, team: TeamRules) -> list[Member]:
    """The team's working members, locked (by id, in order), with their open request counts."""
    ids = list(
        session.execute(
            select(User.id)
            .join(UserTeam, UserTeam.user_id == User.id)
            .where(UserTeam.team_id == team.id, User.role.in_(WORKERS))
            .order_by(User.id)
        ).scalars()
    )
    for user_id in ids:
        _lock(session, USER_LOCK_SPACE, user_id)
    # Read and counted after the locks, in statements of their own: they see every change
    # committed by whoever held the locks before us (an assignment, a cap, someone going away).
    rows = session.execute(
        select(
            User.id,
            User.username,
            User.languages,
            User.skills,
            User.assignment_cap,
            User.away_since,
            User.last_assigned_at,
        )
        .where(User.id.in_(ids), User.disabled.is_(False))
        .order_by(User.id)
    ).all()
    counts = dict(
        session.execute(
            select(Request.assignee_id, func.count(Request.id))
            .where(Request.assignee_id.in_(ids), Request.status.in_(OPEN_STATUSES))
            .group_by(Request.assignee_id)
        ).all()
    )
    return [
        Member(
            id=row.id,
            username=row.username,
            languages=frozenset(_split(row.languages)),
            skills=frozenset(_split(row.skills)),
            cap=row.assignment_cap or team.cap,
            away=row.away_since is not None,
            last_assigned_at=row.last_assigned_at,
            open_requests=int(counts.get(row.id, 0)),
        )
        for row in rows
    ]


def _split(value: str | None) -> list[str]:
    return [item for item in (value or "").split(",") if item]


def why_not(member: Member, team: TeamRules, need: str) -> str | None:
    """Why ``member`` may not be given a request of ``team`` needing ``need``; None if they may."""
    if member.away:
        return "away"
    if member.open_requests >= member.cap:
        return "at cap"
    if need != BASE_LANGUAGE and need not in member.languages:
        return "language"
    if not team.required_languages <= member.languages:
        return "team language"
    if not team.skills <= member.skills:
        return "skill"
    return None


def choose(eligible: list[Member], strategy: str, last_assignee_id: int | None) -> Member | None:
    """The member who gets the next request: the next in turn after the last one (round
    robin), or the one with the fewest open requests, longest waiting on a tie (least
    loaded)."""
    if not eligible:
        return None
    if strategy == "round_robin":
        ordered = sorted(eligible, key=lambda m: m.id)
        after = [m for m in ordered if last_assignee_id is not None and m.id > last_assignee_id]
        return (after or ordered)[0]
    return min(eligible, key=lambda m: (m.open_requests, m.last_assigned_at or NEVER, m.username))


def _language_name(table: RoutingTable, code: str) -> str:
    return table.language_name(code)


def _reason(table: RoutingTable, team: TeamRules, member: Member, need: str, trigger: str) -> str:
    parts = []
    if need != BASE_LANGUAGE:
        parts.append(f"speaks {_language_name(table, need)}")
    for code in sorted(team.required_languages - {need}):
        parts.append(f"speaks {_language_name(table, code)}")
    if team.skills:
        parts.append("has " + ", ".join(sorted(team.skills)).upper())
    if trigger == "routed" or trigger == "sweep":
        parts.append("next in turn" if team.assignment == "round_robin" else "fewest open")
    else:
        parts.append(trigger)
    parts.append(f"{member.open_requests} of {member.cap} open")
    return f"assigned to {member.username}: " + ", ".join(parts)


def _nobody_reason(table: RoutingTable, team: TeamRules, members: list[Member], need: str) -> str:
    if not members:
        return f"nobody eligible: {team.name} has no working members"
    counts: dict[str, int] = {}
    for member in members:
        reason = why_not(member, team, need)
        if reason is not None:
            counts[reason] = counts.get(reason, 0) + 1
    words = {
        "away": "away",
        "at cap": "at their cap",
        "language": f"do not speak {_language_name(table, need)}",
        "team language": "do not speak the team's required languages",
        "skill": f"without {', '.join(sorted(team.skills)).upper()}",
    }
    return "nobody eligible: " + ", ".join(
        f"{count} {words[reason]}" for reason, count in counts.items()
    )


# -- giving a request to someone --------------------------------------------------------------


def assign_request(
    session: DbSession,
    table: RoutingTable,
    request_id: str,
    now: datetime,
    *,
    trigger: str = "routed",
    only_user: int | None = None,
    exclude_user: int | None = None,
    record_unassigned: bool = False,
) -> Outcome:
    """Give one queued, unassigned request of an assigning team to an eligible member, in one
    transaction (see the module's note on locks); commits or rolls back.

    ``only_user`` offers it to that person alone (backfill), ``exclude_user`` to anyone but them
    (a claim that timed out). ``record_unassigned`` writes ``request.left_in_pool`` when nobody
    is eligible (once, when the request is routed; the sweep's retries are not recorded).
    """
    row = session.execute(
        select(
            Request.reference,
            Request.status,
            Request.team,
            Request.assignee_id,
            Request.language,
            Request.interpreter_language,
            Request.language_need,
            Request.returned_by_id,
        )
        .where(Request.id == request_id)
        .with_for_update()
    ).first()
    team = table.teams.get(row.team or "") if row is not None else None
    if row is None or team is None or not team.assigns:
        session.rollback()
        return Outcome(request_id)
    if row.status != "queued" or row.assignee_id is not None:
        session.rollback()
        return Outcome(request_id, row.reference)
    _lock(session, TEAM_LOCK_SPACE, _team_key(team.id))
    last = session.execute(select(Team.last_assignee_id).where(Team.id == team.id)).scalar()
    members = _members(session, team)
    need = needed_language(row.language, row.interpreter_language)
    # Not straight back to whoever just gave it back (released it, or let its claim time out).
    excluded = {exclude_user, row.returned_by_id}
    offered = [
        m for m in members if (only_user is None or m.id == only_user) and m.id not in excluded
    ]
    eligible = [m for m in offered if why_not(m, team, need) is None]
    chosen = choose(eligible, team.assignment, last)
    if chosen is None:
        full = only_user is not None and any(
            why_not(m, team, need) in ("at cap", "away") for m in offered
        )
        reason = _nobody_reason(table, team, offered, need)
        if record_unassigned:
            record_event(
                session,
                actor=ACTOR,
                action="request.left_in_pool",
                reference=row.reference,
                details={"team": team.id, "strategy": team.assignment, "reason": reason},
            )
            session.commit()
        else:
            session.rollback()
        return Outcome(request_id, row.reference, reason=reason, person_full=full)
    changed = session.execute(
        update(Request)
        .where(
            Request.id == request_id,
            Request.status == "queued",
            Request.assignee_id.is_(None),
        )
        .values(
            assignee_id=chosen.id,
            claimed_at=now,
            last_activity_at=now,
            updated_at=now,
            language_need=(None if row.language_need in chosen.languages else row.language_need),
        )
    ).rowcount  # type: ignore[attr-defined]
    if changed != 1:
        session.rollback()
        return Outcome(request_id, row.reference)
    session.execute(update(User).where(User.id == chosen.id).values(last_assigned_at=now))
    session.execute(update(Team).where(Team.id == team.id).values(last_assignee_id=chosen.id))
    reason = _reason(table, team, chosen, need, trigger)
    record_event(
        session,
        actor=ACTOR,
        action="request.assigned",
        reference=row.reference,
        details={
            "by": ACTOR,
            "assignee": chosen.username,
            "assignee_id": f"user:{chosen.id}",
            "team": team.id,
            "strategy": team.assignment,
            "trigger": trigger,
            "open_before": chosen.open_requests,
            "cap": chosen.cap,
            "reason": reason,
        },
    )
    session.commit()
    return Outcome(request_id, row.reference, chosen.username, chosen.id, reason)


def _unassigned(
    session: DbSession, teams: Collection[str], limit: int, exclude: Collection[str] = ()
) -> list[str]:
    """Ids of the oldest queued, unassigned requests of ``teams``."""
    if not teams:
        return []
    query = (
        select(Request.id)
        .where(
            Request.team.in_(list(teams)),
            Request.status == "queued",
            Request.assignee_id.is_(None),
        )
        .order_by(Request.created_at, Request.id)
        .limit(limit)
    )
    if exclude:
        query = query.where(Request.id.not_in(list(exclude)))
    ids = list(session.execute(query).scalars())
    session.rollback()
    return ids


def assigning_teams(table: RoutingTable) -> list[str]:
    return [team.id for team in table.teams.values() if team.assigns]


def backfill(
    session: DbSession,
    table: RoutingTable,
    user_id: int,
    now: datetime,
    *,
    trigger: str = "freed up",
    limit: int = 200,
) -> list[Outcome]:
    """Give ``user_id`` the oldest unassigned requests of their assigning teams that they are
    eligible for, one transaction each, until they reach their cap."""
    user = session.get(User, user_id)
    if user is None or user.disabled or user.away_since is not None or user.role not in WORKERS:
        session.rollback()
        return []
    teams = [t for t in user.team_ids if t in table.teams and table.teams[t].assigns]
    given = []
    for request_id in _unassigned(session, teams, limit):
        outcome = assign_request(
            session, table, request_id, now, trigger=f"backfill ({trigger})", only_user=user_id
        )
        if outcome.assignee is not None:
            given.append(outcome)
        elif outcome.person_full:
            break
    return given


@dataclass(frozen=True)
class SweepReport:
    released: int
    assigned: int


def release_timed_out(
    session: DbSession, table: RoutingTable, now: datetime
) -> list[tuple[str, int]]:
    """Return to the pool the queued requests of teams with a claim timeout whose assignee has
    not touched them within it; one transaction each. Returns (request id, previous user)."""
    released = []
    for team in table.teams.values():
        if team.claim_timeout_minutes is None:
            continue
        cutoff = now - timedelta(minutes=team.claim_timeout_minutes)
        stale = session.execute(
            select(Request.id, Request.reference, Request.assignee_id, Request.last_activity_at)
            .where(
                Request.team == team.id,
                Request.status == "queued",
                Request.assignee_id.is_not(None),
                Request.last_activity_at < cutoff,
            )
            .order_by(Request.last_activity_at)
            .limit(200)
        ).all()
        session.rollback()
        for row in stale:
            changed = session.execute(
                update(Request)
                .where(
                    Request.id == row.id,
                    Request.status == "queued",
                    Request.assignee_id == row.assignee_id,
                    Request.last_activity_at == row.last_activity_at,
                )
                .values(
                    assignee_id=None,
                    claimed_at=None,
                    last_activity_at=None,
                    returned_by_id=row.assignee_id,
                    updated_at=now,
                )
            ).rowcount  # type: ignore[attr-defined]
            if changed != 1:
                session.rollback()
                continue
            record_event(
                session,
                actor=ACTOR,
                action="request.released",
                reference=row.reference,
                details={
                    "by": ACTOR,
                    "previous_assignee": row.assignee_id,
                    "team": team.id,
                    "reason": (
                        f"claim timeout: not started within {team.claim_timeout_minutes} "
                        "minutes of being assigned, back to the pool"
                    ),
                },
            )
            session.commit()
            released.append((row.id, int(row.assignee_id)))
    return released


def sweep(session: DbSession, table: RoutingTable, now: datetime, limit: int = 200) -> SweepReport:
    """Release timed-out claims (giving each to someone else), then give out what is left."""
    released = release_timed_out(session, table, now)
    assigned = 0
    for request_id, previous in released:
        outcome = assign_request(
            session, table, request_id, now, trigger="claim timeout", exclude_user=previous
        )
        assigned += outcome.assignee is not None
    done = {request_id for request_id, _ in released}
    for request_id in _unassigned(session, assigning_teams(table), limit, exclude=done):
        outcome = assign_request(session, table, request_id, now, trigger="sweep")
        assigned += outcome.assignee is not None
    return SweepReport(len(released), assigned)


# -- triggers through the outbox --------------------------------------------------------------


def _table() -> RoutingTable | None:
    if not has_app_context():
        return None
    table = current_app.extensions.get("intake.routing")
    return table if isinstance(table, RoutingTable) else None


def _remember(session: DbSession, message: OutboxMessage) -> int:
    session.flush()
    session.info.setdefault(PENDING_KEY, []).append(
        (message.task, message.request_id or str(message.user_id), message.id)
    )
    return message.id


def queue_backfill(session: DbSession, user_id: int | None) -> int | None:
    """Record, in the caller's transaction, a backfill for a person who just freed up, when
    they work on a team that assigns; published after the commit. Returns the outbox id."""
    table = _table()
    if user_id is None or table is None or not assigning_teams(table):
        return None
    on_assigning_team = session.execute(
        select(UserTeam.team_id).where(
            UserTeam.user_id == user_id, UserTeam.team_id.in_(assigning_teams(table))
        )
    ).first()
    if on_assigning_team is None:
        return None
    message = OutboxMessage(request_id=None, user_id=user_id, task=BACKFILL_TASK)
    session.add(message)
    return _remember(session, message)


def queue_assignment(session: DbSession, request_id: str, team: str | None) -> int | None:
    """Record, in the caller's transaction, an assignment for a request that just arrived in
    ``team`` (a transfer), when that team assigns; published after the commit."""
    table = _table()
    rules = table.teams.get(team or "") if table is not None else None
    if rules is None or not rules.assigns:
        return None
    return _remember(session, outbox.enqueue(session, request_id, ASSIGN_TASK))


@event.listens_for(Session, "after_commit")
def _publish_after_commit(session: Session) -> None:
    """Publish this transaction's assignment and backfill rows once it has committed.

    Why here: the staff actions that free someone up (release, complete, transfer) are used by
    several views and commands; publishing where the commit happens covers them all, and a
    row that fails to publish stays pending for the outbox sweep, like any other.
    """
    pending = session.info.pop(PENDING_KEY, None)
    publisher = outbox.get_publisher()
    if not pending or publisher is None:
        return
    for task, subject, outbox_id in pending:
        try:
            publisher(task, subject, outbox_id, 1)
        except Exception as error:  # noqa: BLE001 - any broker failure means "the sweep will"
            log.warning(
                "assignment_publish_failed", outbox_id=outbox_id, error=type(error).__name__
            )
            return


@event.listens_for(Session, "after_rollback")
def _forget_after_rollback(session: Session) -> None:
    session.info.pop(PENDING_KEY, None)


def finish(session: DbSession, outbox_id: int | None) -> None:
    """Mark a backfill's or assignment's outbox row done; commit."""
    if outbox_id is None:
        return
    session.execute(
        update(OutboxMessage)
        .where(OutboxMessage.id == outbox_id, OutboxMessage.status.in_(outbox.OPEN))
        .values(status="done", done_at=utcnow())
    )
    session.commit()


# -- people: skills, caps, away ---------------------------------------------------------------


def _user(session: DbSession, username: str) -> User:
    user = session.execute(select(User).where(User.username == username)).scalar_one_or_none()
    if user is None:
        raise AssignmentError(f"no user {username!r}")
    return user


def check_skills(skills: Iterable[str], known: Collection[str]) -> list[str]:
    """Normalize skill names (lower case, each once); refuse ones no team asks for."""
    names: list[str] = []
    for raw in skills:
        name = raw.strip().lower()
        if not SKILL_RE.match(name):
            raise AssignmentError(f"{raw!r} is not a skill name (lower-case letters, digits, -)")
        if name not in known:
            listed = ", ".join(sorted(known)) or "none"
            raise AssignmentError(
                f"unknown skill {name!r}: the routing file's teams ask for {listed}"
            )
        if name not in names:
            names.append(name)
    return names


def set_skills(
    session: DbSession, username: str, skills: Iterable[str], actor: str, known: Collection[str]
) -> list[str]:
    """Replace the skills USERNAME holds; audited as ``user.changed``. Returns them."""
    user = _user(session, username)
    names = check_skills(skills, known)
    previous = user.skill_names
    user.skills = ",".join(names)
    record_event(
        session,
        actor=actor,
        action="user.changed",
        details={
            "username": username,
            "change": "skills",
            "skills": names,
            "previous_skills": previous,
        },
    )
    if set(names) - set(previous):
        queue_backfill(session, user.id)
    return names


def set_cap(session: DbSession, username: str, cap: int | None, actor: str) -> None:
    """Set USERNAME's own cap on open requests assigned to them (None: their team's)."""
    if cap is not None and not 1 <= cap <= MAX_CAP:
        raise AssignmentError(f"a cap is a whole number from 1 to {MAX_CAP}")
    user = _user(session, username)
    previous, user.assignment_cap = user.assignment_cap, cap
    record_event(
        session,
        actor=actor,
        action="user.changed",
        details={"username": username, "change": "cap", "cap": cap, "previous_cap": previous},
    )
    if previous is not None and (cap is None or cap > previous):
        queue_backfill(session, user.id)


def set_away(
    session: DbSession,
    user_id: int,
    away: bool,
    now: datetime,
    *,
    actor: str,
    actor_role: str | None = None,
    ip_hmac: str | None = None,
) -> bool:
    """Mark a person away (given no new work) or back (backfilled at once); audited as
    ``user.changed``. Returns False when nothing changed."""
    user = session.get(User, user_id)
    if user is None:
        raise AssignmentError("no such user")
    if (user.away_since is not None) == away:
        return False
    user.away_since = now if away else None
    record_event(
        session,
        actor=actor,
        actor_role=actor_role,
        ip_hmac=ip_hmac,
        action="user.changed",
        details={"username": user.username, "change": "away", "away": away},
    )
    if not away:
        queue_backfill(session, user.id)
    return True


def is_away(session: DbSession, user_id: int) -> bool:
    return session.execute(select(User.away_since).where(User.id == user_id)).scalar() is not None


def describe(session: DbSession, table: RoutingTable, username: str) -> dict[str, Any]:
    """What automatic assignment knows of USERNAME, for the admin CLI."""
    user = _user(session, username)
    open_requests = session.execute(
        select(func.count(Request.id)).where(
            Request.assignee_id == user.id, Request.status.in_(OPEN_STATUSES)
        )
    ).scalar_one()
    return {
        "username": user.username,
        "languages": user.language_codes,
        "skills": user.skill_names,
        "cap": user.assignment_cap,
        "away": user.away_since is not None,
        "open": int(open_requests),
        "teams": {t: table.teams[t].assignment for t in user.team_ids if t in table.teams},
    }
