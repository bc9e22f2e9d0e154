"""What compliance officers ask of the audit trail: searches, access reports, activity, trends.

Everything here reads plain columns (``requests``' routing fields, ``audit_events``) and event
details, which never hold PHI; nothing is decrypted. Aggregates are computed in SQL (grouped
counts and sums); only medians, which SQLite cannot compute, are taken in Python over rows.
Times are UTC; day and hour buckets are UTC calendar days and clock hours.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from statistics import median
from typing import Any

from sqlalchemy import (
    JSON,
    ColumnElement,
    Select,
    String,
    and_,
    case,
    cast,
    false,
    func,
    literal,
    or_,
    select,
)
from sqlalchemy.orm import aliased

from intake.audit.anomalies import HourCount
from intake.audit.listings import LISTING_ACTIONS
from intake.extensions import DbSession
from intake.models import OPEN_STATUSES, AuditEvent, AuditListing, Request, User

PAGE = 100
SEQ_MAX = 2**63 - 1  # audit_events.seq is a BIGINT; a larger number cannot even be asked about
EXPORT_CHUNK = 2000
YIELD_PER = 500
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
# Actor values as stored: anything else typed in the actor filter is taken as a username.
ACTOR_ID_RE = re.compile(r"^(user:\d+|patient|anonymous|system:[\w.:-]+)$")
AUDIT_COLUMNS = (
    "Seq",
    "Time (UTC)",
    "Actor",
    "User",
    "Role",
    "Action",
    "Action (plain)",
    "Reference",
    "Outcome",
    "Details",
    "Client (pseudonym)",
)
# What each event counts as, in every compliance view (access report, its CSV, the audit search
# by reference, the dashboard, the per-user report): one definition, in SQL, used by all.
#
# A "PHI view" is one opening of a request's page, which shows all of its PHI: a ``phi.viewed``
# event that names the request (break-glass openings included). The ``phi.break_glass`` event
# that precedes such an opening holds the reason and is counted as a break-glass, not as a
# second view. Queue pages show first name and last initial of every request listed; they are
# recorded as ``phi.viewed`` without a reference (the references shown are in the details) and
# are counted apart as "queue list views". Searches are "search results".
PHI_VIEW = and_(
    AuditEvent.action == "phi.viewed",
    AuditEvent.reference.is_not(None),
    AuditEvent.outcome == "success",
)
LIST_VIEW = and_(AuditEvent.action == "phi.viewed", AuditEvent.reference.is_(None))
SEARCH_RESULT = AuditEvent.action == "request.searched"
BREAK_GLASS = and_(AuditEvent.action == "phi.break_glass", AuditEvent.outcome == "success")
KINDS_OF_EVENT = {
    "phi_view": "PHI view",
    "list_view": "queue list view",
    "search_result": "search result",
    "break_glass": "break-glass",
    "other": "",
}
EVENT_KIND = case(
    (PHI_VIEW, literal("phi_view")),
    (LIST_VIEW, literal("list_view")),
    (SEARCH_RESULT, literal("search_result")),
    (BREAK_GLASS, literal("break_glass")),
    else_=literal("other"),
)
PHI_VIEW_DEFINITION = (
    "A PHI view is one opening of a request's page, which shows all of its patient "
    "information: one phi.viewed event naming the request (break-glass openings included; the "
    "break-glass reason is a separate event, counted as a break-glass, not as a second view). "
    "Queue pages, which show first name and last initial, are counted apart as queue list "
    "views, and searches that found the request as search results."
)

# Plain names of the actions, shown beside the codes on every page and in every CSV.
ACTION_NAMES = {
    "request.submitted": "Request submitted",
    "request.routed": "Request routed to a team",
    "request.claimed": "Request claimed",
    "request.released": "Claim released",
    "request.status_changed": "Status changed",
    "request.transferred": "Request transferred",
    "request.searched": "Requests searched",
    "request.escalated": "Request escalated (overdue)",
    "note.added": "Note added",
    "phi.viewed": "PHI viewed",
    "phi.break_glass": "Break-glass access",
    "status.looked_up": "Status looked up by the patient",
    "notification.sent": "Notification sent",
    "notification.failed": "Notification failed",
    "user.login": "Logged in",
    "user.login_failed": "Login refused",
    "user.locked": "Login delayed or frozen",
    "user.logout": "Logged out",
    "user.created": "User created",
    "user.changed": "User changed",
    "team.created": "Team created",
    "audit.exported": "Audit export",
    "audit.verified": "Audit trail verified",
    "audit.checkpointed": "Checkpoint signed",
    "break_glass.reviewed": "Break-glass reviewed",
    "key.rotated": "Key rotated",
    "retention.purged": "PHI shredded (retention)",
    "backup.created": "Backup made",
    "backup.restored": "Backup restored",
}


def action_name(action: str, details: dict[str, Any] | None = None) -> str:
    """The plain name of ``action`` (a queue page's ``phi.viewed`` is a queue list view)."""
    if action == "phi.viewed" and (details or {}).get("view") == "queue":
        return "Queue page viewed"
    return ACTION_NAMES.get(action, action)


def names_reference(reference: str | list[str]) -> ColumnElement[bool]:
    """The events that name ``reference`` (or any of several): as their target, or among the
    requests a queue page or a search listed (their details hold the references shown, never
    the search terms).

    The events are found by seq through two indexes, ``ix_audit_events_reference_seq`` and
    the listings index (intake.audit.listings), never by reading details. Each event found is
    then held against itself, reference or details, so an index row that does not match its
    event (added by hand) names nothing.
    """
    references = [reference] if isinstance(reference, str) else list(reference)
    named = select(AuditEvent.seq).where(AuditEvent.reference.in_(references))
    listed = select(AuditListing.seq).where(AuditListing.reference.in_(references))
    return and_(
        AuditEvent.seq.in_(named.union(listed)),
        or_(
            AuditEvent.reference.in_(references),
            and_(
                AuditEvent.reference.is_(None),
                AuditEvent.action.in_(LISTING_ACTIONS),
                or_(*(AuditEvent.details.contains(f'"{r}"', autoescape=True) for r in references)),
            ),
        ),
    )


# -- SQL building blocks ----------------------------------------------------------------------


def _dialect(session: DbSession) -> str:
    return session.get_bind().dialect.name


def _bucket(session: DbSession, column: Any, unit: str) -> ColumnElement[str]:
    """``column``'s UTC day ('2026-11-24') or clock hour ('2026-11-24 09:00') as text."""
    postgres, sqlite = {
        "day": ("YYYY-MM-DD", "%Y-%m-%d"),
        "hour": ("YYYY-MM-DD HH24:00", "%Y-%m-%d %H:00"),
    }[unit]
    if _dialect(session) == "postgresql":
        return func.to_char(func.timezone("UTC", column), postgres, type_=String)
    return func.strftime(sqlite, column, type_=String)


def _detail(session: DbSession, key: str) -> ColumnElement[str]:
    """One top-level value of an event's JSON details, as text."""
    if _dialect(session) == "postgresql":
        return func.json_extract_path_text(cast(AuditEvent.details, JSON), key, type_=String)
    return func.json_extract(AuditEvent.details, f"$.{key}", type_=String)


def actor_is_user(user: Any = User) -> ColumnElement[bool]:
    """Join condition: the event's actor is ``user:<id>`` of this user row."""
    return AuditEvent.actor == literal("user:") + cast(user.id, String)


def parse_day(text: str) -> date:
    return date.fromisoformat(text)


def parse_hour(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%d %H:%M").replace(tzinfo=UTC)


def day_range(start: date, end: date) -> list[date]:
    return [start + timedelta(days=n) for n in range((end - start).days + 1)]


def start_of_day(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


# -- audit search -----------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditFilter:
    """An audit search: exact actor (or username), action and reference; a UTC time range.

    ``since`` is inclusive and ``until`` exclusive; ``since_text`` and ``until_text`` keep what
    the officer typed, for links and for the record of an export.
    """

    actor: str | None = None
    action: str | None = None
    reference: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    since_text: str | None = None
    until_text: str | None = None
    # The window's own first and last seq, once read (``resolve_window``); (1, 0) when the
    # window holds no event. Not part of what the officer asked: never in links or records.
    window_seqs: tuple[int, int] | None = field(default=None, compare=False, repr=False)

    def args(self) -> dict[str, str]:
        """The filter as query-string arguments (only those set)."""
        values = {
            "actor": self.actor,
            "action": self.action,
            "reference": self.reference,
            "since": self.since_text,
            "until": self.until_text,
        }
        return {k: v for k, v in values.items() if v}

    def as_details(self) -> dict[str, str | None]:
        """The filter for an audit event's details: ``filter_<name>``, unset ones as null."""
        return {
            "filter_actor": self.actor,
            "filter_action": self.action,
            "filter_reference": self.reference,
            "filter_since": self.since_text,
            "filter_until": self.until_text,
        }


def resolve_actor(session: DbSession, filt: AuditFilter) -> AuditFilter:
    """``filt`` with a username turned into the actor id it stands for (``user:<id>``), so the
    database can use the actor index with a known value."""
    if not filt.actor or ACTOR_ID_RE.match(filt.actor):
        return filt
    user_id = session.execute(
        select(User.id).where(User.username == filt.actor.strip().lower())
    ).scalar_one_or_none()
    return replace(filt, actor=f"user:{user_id}") if user_id is not None else filt


def _conditions(filt: AuditFilter) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = []
    if filt.actor:
        if ACTOR_ID_RE.match(filt.actor):
            conditions.append(AuditEvent.actor == filt.actor)
        else:
            named = aliased(User)
            actor_id = (
                select(literal("user:") + cast(named.id, String))
                .where(named.username == filt.actor.strip().lower())
                .scalar_subquery()
            )
            conditions.append(AuditEvent.actor == actor_id)
    if filt.action:
        conditions.append(AuditEvent.action == filt.action)
    if filt.reference:
        conditions.append(names_reference(filt.reference))
    # Once the window's seq range is known (``resolve_window``), the walk of that range is the
    # way in, and the time filter is only checked on the rows it reads: ``coalesce`` of a NOT
    # NULL column is the column itself, but no index serves it. Left indexable, PostgreSQL,
    # which takes seq and time for unrelated and so expects few rows in both ranges, reads
    # every event of the window from the (created_at, seq) index and sorts them all for the
    # newest hundred (at 10M events, most of the page's time).
    created_at: Any = (
        func.coalesce(AuditEvent.created_at, AuditEvent.created_at)
        if filt.window_seqs is not None
        else AuditEvent.created_at
    )
    if filt.since is not None:
        conditions.append(created_at >= filt.since)
    if filt.until is not None:
        conditions.append(created_at < filt.until)
    if filt.since is not None and filt.until is not None:
        if filt.until <= filt.since:
            conditions.append(false())
        elif filt.window_seqs is not None:
            conditions.append(AuditEvent.seq.between(*filt.window_seqs))
        else:
            low, high = window_seq_bounds(filt.since, filt.until)
            conditions.append(AuditEvent.seq.between(low, high))
    return conditions


def resolve_window(session: DbSession, filt: AuditFilter) -> AuditFilter:
    """``filt`` with its since/until window's first and last seq read once, as numbers.

    Why: as scalar subqueries (``window_seq_bounds``) the bounds are computed again by every
    statement of a page (the page and its "older" and "newer" checks: six scans of the
    window's index entries, at 10M events most of the page's time). Read here once, they go
    into each statement as plain values, and PostgreSQL plans each walk of the primary key
    for the range it really is. Events are immutable and every one in the window has a seq
    between the two, so the answer is the same; an event written after this read is one the
    page would have missed had it been read a moment earlier.
    """
    if filt.since is None or filt.until is None or filt.until <= filt.since:
        return filt
    if filt.window_seqs is not None:
        return filt
    in_window = and_(AuditEvent.created_at >= filt.since, AuditEvent.created_at < filt.until)
    low, high = session.execute(
        select(func.min(AuditEvent.seq + 0), func.max(AuditEvent.seq + 0)).where(in_window)
    ).one()
    bounds = (1, 0) if low is None else (int(low), int(high))
    return replace(filt, window_seqs=bounds)


def window_seq_bounds(since: datetime, until: datetime) -> tuple[Any, Any]:
    """The smallest and largest seq of the events in ``[since, until)``, as scalar subqueries.

    The page and the export read them once instead (``resolve_window``); these serve a query
    built from a filter that was not resolved.

    Why: the search pages newest first by seq, and PostgreSQL, which takes time and seq for
    unrelated, would walk the primary key backwards from the newest event and filter on time,
    reading every event newer than the window (5M rows at 10M events for a two-day window in
    the middle). Bounding seq by the window's own first and last seq keeps that walk inside the
    window. The bounds are read by an index-only scan of ``ix_audit_events_created_at_seq`` over
    the window's rows; ``seq + 0`` keeps PostgreSQL from answering min/max with the same
    backwards walk of the primary key. The time filter stays, so the answer is the same even
    where times are not in seq order (clocks of several machines): every event in the window
    has a seq between the two bounds by definition, and an empty window has NULL bounds, which
    match nothing.
    """
    window = aliased(AuditEvent)
    in_window = and_(window.created_at >= since, window.created_at < until)
    low = select(func.min(window.seq + 0)).where(in_window).scalar_subquery()
    high = select(func.max(window.seq + 0)).where(in_window).scalar_subquery()
    return low, high


def audit_query(filt: AuditFilter) -> Select[*tuple[Any, ...]]:
    """The events matching ``filt``, with the acting user's name: the one query behind both the
    search page and the CSV export."""
    return (
        select(
            AuditEvent.seq,
            AuditEvent.created_at,
            AuditEvent.actor,
            AuditEvent.actor_role,
            AuditEvent.action,
            AuditEvent.reference,
            AuditEvent.outcome,
            AuditEvent.details,
            AuditEvent.ip_hmac,
            User.username,
            EVENT_KIND.label("kind"),
        )
        .outerjoin(User, actor_is_user())
        .where(*_conditions(filt))
    )


@dataclass(frozen=True)
class AuditRow:
    seq: int
    created_at: datetime
    actor: str
    actor_role: str | None
    action: str
    reference: str | None
    outcome: str
    details: str
    ip_hmac: str | None
    username: str | None
    kind: str = "other"

    @property
    def action_name(self) -> str:
        return action_name(self.action, self.detail_values)

    @property
    def counts_as(self) -> str:
        return KINDS_OF_EVENT.get(self.kind, "")

    @property
    def detail_items(self) -> list[tuple[str, str]]:
        """The details as (key, value) pairs in words, for key: value lists."""
        values = self.detail_values
        if values.get("username") != self.username:
            # Not the actor's own name (already in its column): whom the event is about.
            values = {**values, "user": values.pop("username")} if "username" in values else values
        return detail_items(values)

    @property
    def detail_summary(self) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """(the few lines shown in the row, every line when some are folded away, else [])."""
        items = self.detail_items
        shown = [
            (k, v if len(v) <= DETAIL_CHARS else v[: DETAIL_CHARS - 1] + "…")
            for k, v in items[:DETAIL_SHOWN]
        ]
        folded = len(items) > DETAIL_SHOWN or any(len(v) > DETAIL_CHARS for _k, v in items)
        return shown, items if folded else []

    @property
    def cells(self) -> tuple[str, ...]:
        """The row as shown, column by column (``AUDIT_COLUMNS``): page and CSV alike."""
        return (
            str(self.seq),
            self.created_at.strftime(TIME_FORMAT),
            self.actor,
            self.username or "",
            self.actor_role or "",
            self.action,
            self.action_name,
            self.reference or "",
            self.outcome,
            self.details,
            (self.ip_hmac or "")[:12],
        )

    @property
    def detail_values(self) -> dict[str, Any]:
        try:
            values = json.loads(self.details)
        except ValueError:
            return {}
        return values if isinstance(values, dict) else {}


def _audit_row(row: Any) -> AuditRow:
    return AuditRow(*row)


@dataclass(frozen=True)
class AuditPage:
    rows: list[AuditRow]
    older_than: int | None  # there are older events: link with ``before=<this>``
    newer_than: int | None  # there are newer events: link with ``after=<this>``


def _any(session: DbSession, filt: AuditFilter, *more: ColumnElement[bool]) -> bool:
    found = session.execute(
        select(AuditEvent.seq).where(*_conditions(filt), *more).limit(1)
    ).first()
    return found is not None


def audit_page(
    session: DbSession,
    filt: AuditFilter,
    *,
    before: int | None = None,
    after: int | None = None,
    limit: int | None = None,
) -> AuditPage:
    """One page of the search, newest first, by keyset on ``seq`` (``before`` or ``after``)."""
    limit = limit or PAGE
    filt = resolve_window(session, resolve_actor(session, filt))
    query = audit_query(filt)
    if after is not None:
        found = list(
            session.execute(
                query.where(AuditEvent.seq > after).order_by(AuditEvent.seq.asc()).limit(limit)
            ).all()
        )
        found.reverse()
    else:
        if before is not None:
            query = query.where(AuditEvent.seq < before)
        found = list(session.execute(query.order_by(AuditEvent.seq.desc()).limit(limit)).all())
    rows = [_audit_row(r) for r in found]
    if not rows:
        return AuditPage(rows, None, None)
    oldest, newest = rows[-1].seq, rows[0].seq
    return AuditPage(
        rows,
        oldest if _any(session, filt, AuditEvent.seq < oldest) else None,
        newest if _any(session, filt, AuditEvent.seq > newest) else None,
    )


def seq_in_range(seq: int) -> bool:
    """Whether ``seq`` fits the column: a bound or a number outside it is bad input."""
    return 0 <= seq <= SEQ_MAX


def event_row(session: DbSession, seq: int) -> AuditRow | None:
    if not seq_in_range(seq):
        return None
    found = session.execute(audit_query(AuditFilter()).where(AuditEvent.seq == seq)).first()
    return _audit_row(found) if found else None


def last_seq(session: DbSession) -> int:
    return int(session.execute(select(func.coalesce(func.max(AuditEvent.seq), 0))).scalar_one())


def export_rows(
    session: DbSession, filt: AuditFilter, up_to_seq: int, chunk: int | None = None
) -> Iterator[AuditRow]:
    """Every event of ``filt`` with ``seq <= up_to_seq``, newest first, for streaming.

    Read in chunks of ``EXPORT_CHUNK`` by keyset, each in its own short read transaction
    (streamed with ``yield_per``), so an export of millions of events neither holds memory nor,
    on SQLite where a transaction takes the write lock, blocks writers while the client reads.
    Events are immutable and ``up_to_seq`` fixes the end, so the chunks add up to one
    consistent answer.
    """
    size = chunk or EXPORT_CHUNK
    cursor = up_to_seq + 1
    # The window's bounds are read after the export's own event committed: every event up to
    # ``up_to_seq`` is in them.
    query = audit_query(resolve_window(session, resolve_actor(session, filt)))
    while True:
        result = session.execute(
            query.where(AuditEvent.seq < cursor)
            .order_by(AuditEvent.seq.desc())
            .limit(size)
            .execution_options(yield_per=YIELD_PER)
        )
        count = 0
        try:
            for row in result:
                count += 1
                cursor = row.seq
                yield _audit_row(row)
        finally:
            result.close()
            session.rollback()
        if count < size:
            return


# -- access report ----------------------------------------------------------------------------

DETAIL_SHOWN = 3  # key: value lines shown in a row; the rest fold away under <details>
DETAIL_CHARS = 60  # a longer value is cut short in the row and shown whole when unfolded


def _detail_value(value: Any) -> str:
    if value is None:
        return "–"
    if value is True:
        return "yes"
    if value is False:
        return "no"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) if value else "none"
    return str(value)


def detail_items(details: dict[str, Any]) -> list[tuple[str, str]]:
    """An event's details as (key, value) pairs in words: ``break_glass: no``."""
    return [
        (key.replace("_", " "), _detail_value(value))
        for key, value in sorted(details.items())
        if key != "username"
    ]


@dataclass(frozen=True)
class AccessEntry:
    seq: int
    at: datetime
    actor: str
    username: str | None
    role: str | None
    action: str
    what: str
    why: str
    kind: str
    outcome: str
    client: str
    references: tuple[str, ...] = ()  # the report's requests this event names

    @property
    def who(self) -> str:
        if self.username:
            return self.username
        return {"patient": "the patient", "anonymous": "someone not logged in"}.get(
            self.actor, self.actor
        )

    @property
    def action_name(self) -> str:
        return ACTION_NAMES.get(self.action, self.action)

    @property
    def counts_as(self) -> str:
        return KINDS_OF_EVENT.get(self.kind, "")

    @property
    def saw_phi(self) -> bool:
        return self.kind == "phi_view"

    @property
    def break_glass(self) -> bool:
        return self.kind == "break_glass"


@dataclass
class PersonSummary:
    actor: str
    who: str
    role: str | None
    first: datetime
    last: datetime
    phi_views: int = 0
    list_views: int = 0
    search_results: int = 0
    break_glass: int = 0
    other_actions: int = 0

    def count(self, kind: str) -> None:
        field_name = {
            "phi_view": "phi_views",
            "list_view": "list_views",
            "search_result": "search_results",
            "break_glass": "break_glass",
        }.get(kind, "other_actions")
        setattr(self, field_name, getattr(self, field_name) + 1)


@dataclass
class AccessReport:
    references: list[str]
    requests: list[Request]
    entries: list[AccessEntry]
    people: list[PersonSummary] = field(default_factory=list)

    @property
    def reference(self) -> str:
        return self.references[0] if self.references else ""

    @property
    def request(self) -> Request | None:
        return self.requests[0] if self.requests else None

    def total(self, kind: str) -> int:
        return sum(1 for e in self.entries if e.kind == kind)


def _words(value: Any) -> str:
    return str(value).replace("_", " ") if value is not None else "?"


def describe(action: str, details: dict[str, Any]) -> tuple[str, str]:
    """What happened and why, in words, from an event's action and (PHI-free) details."""
    d = details
    if d.get("refused") == "claimed_by_other":
        what, why = describe(action, {k: v for k, v in d.items() if k != "refused"})
        held = f"claimed by {d.get('assignee')}"
        return f"Refused attempt: {what[:1].lower()}{what[1:]}", f"{why}; {held}" if why else held
    if d.get("refused") == "role_not_allowed":
        return "Refused: tried to break the glass (role not allowed)", ""
    if action == "phi.viewed" and d.get("view") == "queue":
        return "Saw the first name and last initial in a queue list", ""
    if action == "request.searched":
        if d.get("purpose") == "patient_report":
            return "Found it with a patient search for a compliance report", (
                f"by {_words(d.get('by'))}"
            )
        return "Found it with a search", f"by {_words(d.get('by'))}"
    if action == "phi.viewed":
        what = "Opened the request and saw its PHI"
        if d.get("break_glass"):
            what += " (break-glass)"
        return what, ""
    if action == "phi.break_glass":
        return "Broke the glass to open a request outside their teams", str(d.get("reason", ""))
    if action == "request.status_changed":
        return "Changed the status", f"{_words(d.get('old'))} → {_words(d.get('new'))}"
    if action == "request.transferred":
        return (
            f"Transferred from {d.get('from_team') or '?'} to {d.get('to_team') or '?'}",
            str(d.get("reason", "")),
        )
    if action == "note.added":
        return "Added a note (sealed; the text is not in the trail)", f"{d.get('length')} chars"
    if action == "request.submitted":
        return "Submitted by the patient", f"{d.get('kind')}, language {d.get('language')}"
    if action == "request.routed":
        return (
            f"Routed to {d.get('team')}",
            f"priority {d.get('priority')}, rule {d.get('rule')!s}",
        )
    if action == "request.escalated":
        return "Escalated (past its due time)", (
            f"priority {d.get('old_priority')} → {d.get('new_priority')}"
        )
    if action == "break_glass.reviewed":
        outcome = d.get("review_outcome")
        what = "Reviewed a break-glass access"
        if outcome:
            what += f": {REVIEW_OUTCOME_NAMES.get(str(outcome), _words(outcome))}"
        return what, str(d.get("comment", ""))
    simple = {
        "request.claimed": "Claimed the request",
        "request.released": "Released the claim",
        "status.looked_up": "Status looked up with reference and date of birth",
        "notification.sent": "Team notified (no PHI in the message)",
        "notification.failed": "Team notification failed",
        "retention.purged": "PHI shredded by the retention policy",
    }
    if action in simple:
        return simple[action], ""
    extra = detail_items(d)
    return ACTION_NAMES.get(action, action), "; ".join(f"{k}: {v}" for k, v in extra)


# Outcomes of a break-glass review, as stored in ``break_glass.reviewed`` details.
REVIEW_OUTCOME_NAMES = {
    "appropriate": "appropriate",
    "not_appropriate": "not appropriate",
    "escalated": "escalated",
}


def request_events(session: DbSession, references: list[str]) -> list[AuditRow]:
    """Every event naming any of ``references``, oldest first.

    The one query behind the access report, its CSV, the audit search by reference (the same
    ``names_reference`` condition) and, through ``EVENT_KIND``, the dashboard's counts.
    """
    if not references:
        return []
    query = (
        audit_query(AuditFilter()).where(names_reference(references)).order_by(AuditEvent.seq.asc())
    )
    return [_audit_row(row) for row in session.execute(query).all()]


def _named(row: AuditRow, references: list[str]) -> tuple[str, ...]:
    if row.reference is not None:
        return (row.reference,)
    listed = row.detail_values.get("references") or []
    return tuple(r for r in references if r in listed)


def access_report(session: DbSession, reference: str | list[str]) -> AccessReport:
    """Every event naming ``reference`` (or any of several: one patient's requests), oldest
    first, with who did it and why, and per person what each event counts as."""
    references = [reference] if isinstance(reference, str) else list(reference)
    found = {
        r.reference: r
        for r in session.execute(select(Request).where(Request.reference.in_(references))).scalars()
    }
    report = AccessReport(references, [found[r] for r in references if r in found], [])
    people: dict[str, PersonSummary] = {}
    for row in request_events(session, references):
        what, why = describe(row.action, row.detail_values)
        entry = AccessEntry(
            seq=row.seq,
            at=row.created_at,
            actor=row.actor,
            username=row.username,
            role=row.actor_role,
            action=row.action,
            what=what,
            why=why,
            kind=row.kind,
            outcome=row.outcome,
            client=(row.ip_hmac or "")[:12],
            references=_named(row, references),
        )
        report.entries.append(entry)
        person = people.setdefault(
            row.actor,
            PersonSummary(row.actor, entry.who, row.actor_role, row.created_at, row.created_at),
        )
        person.last = row.created_at
        person.count(row.kind)
    report.people = sorted(people.values(), key=lambda p: p.first)
    return report


ACCESS_COLUMNS = (
    "Seq",
    "Time (UTC)",
    "Request",
    "Who",
    "Role",
    "Action",
    "Action (plain)",
    "What",
    "Why / details",
    "Counts as",
    "Outcome",
    "Client (pseudonym)",
)


def access_cells(entry: AccessEntry) -> tuple[str, ...]:
    """One access-report line as CSV cells (``ACCESS_COLUMNS``)."""
    return (
        str(entry.seq),
        entry.at.strftime(TIME_FORMAT),
        " ".join(entry.references),
        entry.who,
        entry.role or "",
        entry.action,
        entry.action_name,
        entry.what,
        entry.why,
        entry.counts_as,
        entry.outcome,
        entry.client,
    )


# -- one user's activity ----------------------------------------------------------------------


@dataclass(frozen=True)
class DayViews:
    day: date
    views: int
    requests: int
    list_views: int


@dataclass
class UserActivity:
    user: User
    since: datetime
    counts: list[tuple[str, int]]
    days: list[DayViews]
    recent: list[AuditRow]


def user_activity(session: DbSession, user: User, now: datetime, days: int = 30) -> UserActivity:
    """A user's events of the last ``days`` days: counts by action and PHI views per day."""
    actor = f"user:{user.id}"
    since = start_of_day(now) - timedelta(days=days - 1)
    in_window = and_(AuditEvent.actor == actor, AuditEvent.created_at >= since)
    counts = [
        (action, int(n))
        for action, n in session.execute(
            select(AuditEvent.action, func.count())
            .where(in_window)
            .group_by(AuditEvent.action)
            .order_by(func.count().desc(), AuditEvent.action)
        ).all()
    ]
    per_day = views_per_day(session, since, actor=actor)
    mine = per_day.get(user.username, {})
    day_rows = [
        DayViews(day, *mine.get(day, (0, 0, 0)))
        for day in day_range(since.date(), start_of_day(now).date())
    ]
    recent = audit_page(session, AuditFilter(actor=actor), limit=50).rows
    return UserActivity(user, since, counts, day_rows, recent)


def views_per_day(
    session: DbSession, since: datetime, actor: str | None = None
) -> dict[str, dict[date, tuple[int, int, int]]]:
    """Per username and UTC day: (request views, different requests, list views)."""
    inner = (
        select(
            User.username.label("username"),
            _bucket(session, AuditEvent.created_at, "day").label("day"),
            AuditEvent.reference.label("reference"),
            case((PHI_VIEW, 1), else_=0).label("record"),
            case((LIST_VIEW, 1), else_=0).label("listing"),
        )
        .join(User, actor_is_user())
        .where(AuditEvent.action == "phi.viewed", AuditEvent.created_at >= since)
    )
    if actor is not None:
        inner = inner.where(AuditEvent.actor == actor)
    sub = inner.subquery()
    rows = session.execute(
        select(
            sub.c.username,
            sub.c.day,
            func.sum(sub.c.record),
            func.count(sub.c.reference.distinct()),
            func.sum(sub.c.listing),
        ).group_by(sub.c.username, sub.c.day)
    ).all()
    result: dict[str, dict[date, tuple[int, int, int]]] = defaultdict(dict)
    for username, day, views, requests, listing in rows:
        result[username][parse_day(day)] = (int(views or 0), int(requests or 0), int(listing or 0))
    return result


# -- anomalies --------------------------------------------------------------------------------


def hourly_request_views(session: DbSession, since: datetime) -> list[HourCount]:
    """Per username and UTC clock hour: how many different requests' PHI they opened."""
    sub = (
        select(
            User.username.label("username"),
            _bucket(session, AuditEvent.created_at, "hour").label("hour"),
            AuditEvent.reference.label("reference"),
        )
        .join(User, actor_is_user())
        .where(PHI_VIEW, AuditEvent.created_at >= since)
        .subquery()
    )
    rows = session.execute(
        select(sub.c.username, sub.c.hour, func.count(sub.c.reference.distinct())).group_by(
            sub.c.username, sub.c.hour
        )
    ).all()
    return [HourCount(username, parse_hour(hour), int(n)) for username, hour, n in rows]


# -- dashboard --------------------------------------------------------------------------------


def requests_per_day(session: DbSession, since: datetime) -> dict[tuple[date, str], int]:
    """Requests received per UTC day and kind since ``since``."""
    sub = (
        select(
            _bucket(session, Request.created_at, "day").label("day"),
            Request.kind.label("kind"),
        )
        .where(Request.created_at >= since)
        .subquery()
    )
    rows = session.execute(
        select(sub.c.day, sub.c.kind, func.count()).group_by(sub.c.day, sub.c.kind)
    ).all()
    return {(parse_day(day), kind): int(n) for day, kind, n in rows}


def _completions(session: DbSession, since: datetime) -> Any:
    """Per reference: when its status first became ``completed`` (on or after ``since``)."""
    return (
        select(
            AuditEvent.reference.label("reference"),
            func.min(AuditEvent.created_at).label("completed_at"),
        )
        .where(
            AuditEvent.action == "request.status_changed",
            AuditEvent.outcome == "success",  # a refused attempt completed nothing
            AuditEvent.created_at >= since,
            _detail(session, "new") == "completed",
        )
        .group_by(AuditEvent.reference)
        .subquery()
    )


@dataclass(frozen=True)
class WeekMedian:
    week: date  # the Monday
    kind: str  # a request kind, or "all"
    hours: float
    requests: int


def completion_medians(session: DbSession, since: datetime) -> list[WeekMedian]:
    """Median hours from submission to completion, per week of completion, by kind and overall.

    Submission time is the request's ``created_at`` (written with ``request.submitted``);
    completion is its first ``request.status_changed`` event to ``completed``.
    """
    done = _completions(session, since)
    rows = session.execute(
        select(Request.kind, Request.created_at, done.c.completed_at).join(
            done, done.c.reference == Request.reference
        )
    ).all()
    samples: dict[tuple[date, str], list[float]] = defaultdict(list)
    for kind, created, completed in rows:
        week = completed.date() - timedelta(days=completed.weekday())
        hours = max(0.0, (completed - created).total_seconds() / 3600)
        samples[(week, kind)].append(hours)
        samples[(week, "all")].append(hours)
    return [
        WeekMedian(week, kind, round(median(values), 1), len(values))
        for (week, kind), values in sorted(samples.items())
    ]


@dataclass(frozen=True)
class TeamBreaches:
    team: str
    requests: int
    completed_late: int
    open_overdue: int

    @property
    def breaches(self) -> int:
        return self.completed_late + self.open_overdue


def sla_breaches(session: DbSession, since: datetime, now: datetime) -> list[TeamBreaches]:
    """Per team, of the requests received since ``since`` that have a due time: how many were
    completed after it, and how many are still open past it."""
    done = _completions(session, since)
    late = case(
        (and_(done.c.completed_at.is_not(None), done.c.completed_at > Request.sla_due_at), 1),
        else_=0,
    )
    overdue = case((and_(Request.status.in_(OPEN_STATUSES), Request.sla_due_at < now), 1), else_=0)
    rows = session.execute(
        select(Request.team, func.count(), func.sum(late), func.sum(overdue))
        .outerjoin(done, done.c.reference == Request.reference)
        .where(Request.sla_due_at.is_not(None), Request.created_at >= since)
        .group_by(Request.team)
        .order_by(Request.team)
    ).all()
    return [
        TeamBreaches(team or "(none)", int(n), int(late_n or 0), int(over_n or 0))
        for team, n, late_n, over_n in rows
    ]


def latest_event(session: DbSession, action: str) -> AuditRow | None:
    found = session.execute(
        audit_query(AuditFilter(action=action)).order_by(AuditEvent.seq.desc()).limit(1)
    ).first()
    return _audit_row(found) if found else None
