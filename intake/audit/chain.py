"""The tamper-evident audit trail: append events to a hash chain, and verify it.

Why: a compliance officer must be able to show who read or changed a patient's request, and an
auditor must be able to trust that nobody (an insider with database access included) removed or
edited an event afterwards. Each event's hash covers the previous event's hash and the event's own
canonical form, so changing, deleting or reordering any event breaks every later link. The
database refuses UPDATE and DELETE on the table (triggers made by the migrations), signed
checkpoints kept outside the database catch a chain recomputed from scratch, and the anchor
(intake.audit.anchor) receives every event's (seq, hash) before its transaction commits, so
even the events after the last checkpoint cannot be removed or rewritten unseen.

Events are written in the caller's transaction: if the action rolls back so does its event, and
if the event cannot be written the action does not happen. Writers are serialized (an advisory
transaction lock on PostgreSQL; SQLite transactions begin IMMEDIATE) so the chain never forks.

Verification streams the stored rows straight from the driver (no ORM objects: it must keep up
with millions of events), recomputes every link, holds the chain against the signed checkpoints
of intake.audit.checkpoints when given them, and names the first bad seq and what is wrong with it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from json.encoder import encode_basestring_ascii as _json_string
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Select,
    String,
    and_,
    case,
    func,
    literal,
    select,
    text,
    type_coerce,
)

from intake.audit import anchor, listings
from intake.clock import utcnow
from intake.extensions import DbSession
from intake.models import AuditEvent, AuditListing

GENESIS_HASH = "0" * 64
# Arbitrary constant naming the PostgreSQL advisory lock that serializes chain writers.
CHAIN_LOCK_KEY = 0x1A7D17
CHECKPOINT_ACTION = "audit.checkpointed"
# Rows fetched per round trip while verifying: large enough to amortize, small enough for memory.
VERIFY_BATCH = 10_000
NON_CANONICAL_TIME = "not-a-canonical-time"

ACTIONS = (
    "request.submitted",
    "request.routed",
    "request.claimed",
    "request.released",
    "request.assigned",
    "request.left_in_pool",
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
    "backup.created",
    "backup.restored",
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


def _canonical(
    seq: int,
    created_at: str,
    actor: str,
    actor_role: str | None,
    action: str,
    reference: str | None,
    outcome: str,
    details: str,
    ip_hmac: str | None,
) -> str:
    # Byte for byte what ``json.dumps(body, sort_keys=True, separators=(",", ":"),
    # ensure_ascii=True)`` gives for the event, built by hand because verification runs this
    # hundreds of thousands of times a second. ``details`` goes in as stored: record_event writes
    # it in exactly that canonical form, and hashing the stored text means any edit of it, even a
    # reformatting, breaks the link. Every other text is JSON-escaped, so no column can borrow
    # characters from its neighbour and two different events never share a canonical form.
    return (
        f'{{"action":{_json_string(action)},"actor":{_json_string(actor)},'
        f'"actor_role":{"null" if actor_role is None else _json_string(actor_role)},'
        f'"created_at":{_json_string(created_at)},"details":{details},'
        f'"ip_hmac":{"null" if ip_hmac is None else _json_string(ip_hmac)},'
        f'"outcome":{_json_string(outcome)},'
        f'"reference":{"null" if reference is None else _json_string(reference)},"seq":{seq}}}'
    )


def canonical_event(event: AuditEvent) -> bytes:
    """The bytes an event's hash covers: every column but the hashes, in a fixed form."""
    return _canonical(
        event.seq,
        format_time(event.created_at),
        event.actor,
        event.actor_role,
        event.action,
        event.reference,
        event.outcome,
        event.details,
        event.ip_hmac,
    ).encode()


def event_hash(prev_hash: str, event: AuditEvent) -> str:
    return hashlib.sha256(prev_hash.encode() + b"\n" + canonical_event(event)).hexdigest()


def _lock_chain(session: DbSession) -> None:
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": CHAIN_LOCK_KEY})


def record_event(
    session: DbSession,
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
    [event] = record_events(
        session,
        [NewEvent(actor, action, reference, outcome, details, actor_role, ip_hmac)],
    )
    return event


@dataclass(frozen=True)
class NewEvent:
    """An event to append (:func:`record_events`); the fields of :func:`record_event`."""

    actor: str
    action: str
    reference: str | None = None
    outcome: str = "success"
    details: Mapping[str, Any] | None = None
    actor_role: str | None = None
    ip_hmac: str | None = None


def record_events(session: DbSession, new: Sequence[NewEvent]) -> list[AuditEvent]:
    """Append events to the chain, in order, inside the caller's transaction: one turn of the
    writers' lock, one read of the chain head, one INSERT and one durable anchor write for all
    of them (a routing batch writes one event per request it routed)."""
    for item in new:
        if item.action not in ACTIONS:
            raise ValueError(f"unknown audit action {item.action!r}")
    checked = [_check_details(item.details or {}) for item in new]
    if not new:
        return []
    # The caller's pending writes go first: the chain's lock, taken next, is held until commit,
    # and every writer of the trail waits on it.
    session.flush()
    _lock_chain(session)
    last = session.execute(
        select(AuditEvent.seq, AuditEvent.hash).order_by(AuditEvent.seq.desc()).limit(1)
    ).first()
    head = (last[0], last[1]) if last else (0, GENESIS_HASH)
    seq, prev_hash = head
    events = []
    for item, details in zip(new, checked, strict=True):
        seq += 1
        event = AuditEvent(
            seq=seq,
            created_at=utcnow(),
            actor=item.actor,
            actor_role=item.actor_role,
            action=item.action,
            reference=item.reference,
            outcome=item.outcome,
            details=json.dumps(details, sort_keys=True, separators=(",", ":")),
            ip_hmac=item.ip_hmac,
            prev_hash=prev_hash,
        )
        event.hash = prev_hash = event_hash(prev_hash, event)
        events.append(event)
    session.add_all(events)
    session.flush()
    for event, item, details in zip(events, new, checked, strict=True):
        listed = listings.listed_references(item.action, item.reference, details)
        listings.record_listing(session, event.seq, listed)
    # Still under the writers' lock: the (seq, hash) pairs are durable outside the database
    # before this transaction can commit (intake.audit.anchor).
    anchor.prepare_events(session, [(event.seq, event.hash) for event in events], head)
    return events


@dataclass(frozen=True)
class ChainHead:
    """The last event of the chain (seq 0 and the genesis hash when it is empty)."""

    seq: int
    hash: str
    action: str | None


def chain_head(session: DbSession) -> ChainHead:
    """Take the writers' lock for this transaction and return the chain's last event."""
    _lock_chain(session)
    last = session.execute(
        select(AuditEvent.seq, AuditEvent.hash, AuditEvent.action)
        .order_by(AuditEvent.seq.desc())
        .limit(1)
    ).first()
    return ChainHead(*last) if last else ChainHead(0, GENESIS_HASH, None)


@dataclass(frozen=True)
class CheckpointClaim:
    """What one line of the checkpoints file says about the chain (see intake.audit.checkpoints).

    ``number`` is the line's position in the file (1 = first checkpoint). ``problem`` is set when
    the line cannot be trusted: unreadable, or its signature does not verify.
    """

    number: int
    seq: int | None
    hash: str | None
    count: int | None
    problem: str | None = None


@dataclass(frozen=True)
class ChainReport:
    ok: bool
    events: int
    first_bad_seq: int | None = None
    problem: str | None = None
    last_seq: int = 0
    last_hash: str = GENESIS_HASH
    # How many signed checkpoints were found in the chain with the hash they sign.
    checkpoints: int = 0


# What verification reads of each event, in this order; ``created_at`` already canonical.
Row = tuple[int, str, str, str | None, str, str | None, str, str, str | None, str, str]
_Finding = tuple[int | None, str]


def _claims_in_order(
    claims: Sequence[CheckpointClaim],
) -> tuple[list[CheckpointClaim], _Finding | None]:
    """Split the trustworthy claims from the first bad line of the checkpoints file."""
    trusted: list[CheckpointClaim] = []
    for claim in claims:
        if claim.problem is not None:
            return trusted, (claim.seq, claim.problem)
        assert claim.seq is not None
        if trusted and claim.seq <= trusted[-1].seq:  # type: ignore[operator]
            # Checkpoints only move forward: a line that goes back (or repeats) was replayed,
            # for instance to make a truncated chain look covered.
            return trusted, (
                claim.seq,
                f"replayed checkpoint {claim.number}: it signs seq {claim.seq}, "
                f"after checkpoint {trusted[-1].number} signed seq {trusted[-1].seq}",
            )
        trusted.append(claim)
    return trusted, None


def _diagnose(row: Row, expected_seq: int, prev_hash: str, rest: Iterator[Row]) -> _Finding:
    """Name what is wrong with ``row``, the first event that does not follow ``prev_hash``."""
    seq, *fields, row_prev, row_hash = row
    if not isinstance(seq, int):
        return expected_seq, "event changed (its seq is not a number)"
    if seq > expected_seq:
        return expected_seq, "missing event"
    if seq < expected_seq:
        return seq, "repeated event"
    if row_prev == prev_hash:
        return seq, "event changed"
    # The event that belongs here (the one linking to ``prev_hash``) sits further on.
    if any(later[9] == prev_hash for later in rest):
        return seq, "reordered"
    if seq > 1 and _row_hash(row_prev, seq, *fields) == row_hash:
        # This event is intact but links to another version of the one before it: that one
        # was changed and its own hash recomputed to hide it.
        return seq - 1, "event changed (its hash was recomputed)"
    return seq, "event changed"


def _row_hash(prev_hash: str, *fields: Any) -> str:
    return hashlib.sha256(f"{prev_hash}\n{_canonical(*fields)}".encode()).hexdigest()


def _verify_rows(
    rows: Iterator[Row],
    claims: Sequence[CheckpointClaim] | None,
    start: tuple[int, str] = (0, GENESIS_HASH),
    listed: listings.ListingCheck | None = None,
) -> ChainReport:
    """Recompute the chain over ``rows`` and hold it against every trustworthy checkpoint.

    ``listed`` holds ``audit_listings`` against the events as they stream by: each listing
    event, and each event the table has rows for, goes to it, and it names the first event
    whose rows are missing or extra (intake.audit.listings.ListingCheck).
    """
    trusted, file_finding = _claims_in_order(claims or ())
    listing_actions = frozenset(listings.LISTING_ACTIONS)
    listing_finding: _Finding | None = None
    marks = iter(trusted)
    mark = next(marks, None)
    mark_seq = mark.seq if mark else -1
    prev_seq, prev_hash = start
    count = matched = 0
    named: list[tuple[int, str]] = []  # audit.checkpointed events: (event seq, details)
    chain_finding: _Finding | None = None
    sha256, canonical = hashlib.sha256, _canonical
    try:
        for row in rows:
            seq, at, actor, role, action, ref, outcome, details, ip, row_prev, row_hash = row
            count += 1
            if seq != prev_seq + 1 or row_prev != prev_hash:
                chain_finding = _diagnose(row, prev_seq + 1, prev_hash, rows)
                break
            text = canonical(seq, at, actor, role, action, ref, outcome, details, ip)
            if sha256(f"{prev_hash}\n{text}".encode()).hexdigest() != row_hash:
                chain_finding = _diagnose(row, prev_seq + 1, prev_hash, rows)
                break
            if seq == mark_seq:
                assert mark is not None
                if row_hash != mark.hash:
                    since = matched and trusted[matched - 1].seq
                    chain_finding = (
                        seq,
                        f"chain does not match checkpoint {mark.number}: an event after seq "
                        f"{since} was changed and the chain recomputed",
                    )
                    break
                if mark.count != start[0] + count:
                    chain_finding = (
                        seq,
                        f"chain does not match checkpoint {mark.number}: it counts "
                        f"{mark.count} events up to seq {seq}",
                    )
                    break
                matched += 1
                mark = next(marks, None)
                mark_seq = mark.seq if mark else -1
            if action == CHECKPOINT_ACTION:
                named.append((seq, details))
            if listed is not None and (action in listing_actions or seq >= listed.next_seq):
                found = listed.at(seq, action, ref, details)
                listing_finding = listing_finding or found
            prev_seq, prev_hash = seq, row_hash
    except (TypeError, AttributeError):
        # A column holding a value of the wrong type (SQLite stores what it is given).
        chain_finding = (prev_seq + 1, "event changed (a column holds a value of the wrong type)")
    findings: list[_Finding] = []
    if file_finding:
        findings.append(file_finding)
    if listed is not None and chain_finding is None:
        listing_finding = listing_finding or listed.after_chain()
    if listing_finding:
        findings.append(listing_finding)
    if chain_finding:
        findings.append(chain_finding)
    elif mark is not None:
        assert mark.seq is not None
        findings.append(
            (
                prev_seq + 1,
                f"truncated after checkpoint {mark.number}: it signs seq {mark.seq}, "
                f"the chain ends at seq {prev_seq}",
            )
        )
    if claims is not None:
        findings.extend(_unfiled_checkpoints(named, trusted))
    if not findings:
        return ChainReport(True, count, None, None, prev_seq, prev_hash, matched)
    # Report the earliest damage; a line that names no seq only when nothing else is wrong.
    first_seq, problem = min(findings, key=lambda f: float("inf") if f[0] is None else f[0])
    return ChainReport(False, count, first_seq, problem, prev_seq, prev_hash, matched)


def _unfiled_checkpoints(
    named: list[tuple[int, str]], trusted: list[CheckpointClaim]
) -> list[_Finding]:
    """Find checkpoints the chain says were written but the file lacks (a file cut short)."""
    filed = {(claim.seq, claim.hash) for claim in trusted}
    findings: list[_Finding] = []
    for event_seq, details in named:
        try:
            signed = json.loads(details)
            key = (signed["checkpoint_seq"], signed["checkpoint_hash"])
        except (ValueError, TypeError, KeyError):
            continue  # an event changed this way breaks its hash, reported on its own
        if key not in filed:
            findings.append(
                (key[0], f"checkpoint missing from the file (event {event_seq} records it)")
            )
    return findings


def _event_rows(events: Iterable[AuditEvent]) -> Iterator[Row]:
    for e in events:
        yield (
            e.seq,
            format_time(e.created_at),
            e.actor,
            e.actor_role,
            e.action,
            e.reference,
            e.outcome,
            e.details,
            e.ip_hmac,
            e.prev_hash,
            e.hash,
        )


def verify_events(
    events: Iterable[AuditEvent], checkpoints: Sequence[CheckpointClaim] | None = None
) -> ChainReport:
    """Recompute the chain over ``events`` (in ``seq`` order) and name the first broken link."""
    return _verify_rows(_event_rows(events), checkpoints)


def _created_at_column(session: DbSession) -> ColumnElement[str]:
    """``created_at`` as the canonical text, formatted by the database (no datetime objects)."""
    column = AuditEvent.__table__.c.created_at
    text_time: ColumnElement[Any]
    if session.get_bind().dialect.name == "postgresql":
        text_time = func.to_char(func.timezone("UTC", column), 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
    else:
        # SQLite stores the text SQLAlchemy wrote, always "YYYY-MM-DD HH:MM:SS.ffffff". Text in
        # any other form was not written by record_event (and may read back as another time),
        # so it becomes a value no event was ever hashed with: the event shows as changed.
        text_time = case(
            (
                and_(
                    func.typeof(column) == "text",
                    func.length(column) == 26,
                    func.substr(column, 11, 1) == " ",
                ),
                func.substr(column, 1, 10) + literal("T") + func.substr(column, 12) + "Z",
            ),
            else_=literal(NON_CANONICAL_TIME),
        )
    return type_coerce(text_time, String())


def stored_row_columns(session: DbSession) -> tuple[ColumnElement[Any], ...]:
    """The columns of a :data:`Row`, in its order, ``created_at`` as the database's text."""
    c = AuditEvent.__table__.c
    return (
        c.seq,
        _created_at_column(session),
        c.actor,
        c.actor_role,
        c.action,
        c.reference,
        c.outcome,
        c.details,
        c.ip_hmac,
        c.prev_hash,
        c.hash,
    )


def _stored_rows(session: DbSession, after_seq: int) -> Generator[Row, None, None]:
    """Stream the chain's raw rows after ``after_seq`` (a server-side cursor on PostgreSQL)."""
    c = AuditEvent.__table__.c
    statement = select(*stored_row_columns(session)).where(c.seq > after_seq).order_by(c.seq)
    return _stream(session, statement, f"intake_audit_verify_{after_seq}")


def _listing_rows(session: DbSession, after_seq: int) -> Generator[Any, None, None]:
    """Stream ``audit_listings`` grouped by event after ``after_seq``, in seq order."""
    statement = listings.listings_by_event(session.get_bind().dialect.name, after_seq)
    return _stream(session, statement, f"intake_audit_listings_{after_seq}")


def _listing_references(session: DbSession, seq: Any) -> set[Any]:
    """Event ``seq``'s rows of ``audit_listings``, one by one, as the driver hands them over."""
    c = AuditListing.__table__.c
    return set(session.execute(select(c.reference).where(c.seq == seq)).scalars())


def _stream(session: DbSession, statement: Select[Any], name: str) -> Generator[Any, None, None]:
    """Rows of ``statement`` straight from the driver, in the session's transaction."""
    connection = session.connection()
    compiled = statement.compile(dialect=connection.dialect)
    params = compiled.construct_params()
    args = [params[key] for key in compiled.positiontup or ()] if compiled.positional else params
    driver = connection.connection.dbapi_connection
    assert driver is not None
    # Rows straight from the driver: building SQLAlchemy rows would cost more than hashing
    # them. On PostgreSQL a named (server-side) cursor keeps the memory flat however long the
    # chain is.
    if connection.dialect.name == "postgresql":
        cursor = driver.cursor(name=name)
    else:
        cursor = driver.cursor()
    try:
        cursor.execute(str(compiled), args)
        while batch := cursor.fetchmany(VERIFY_BATCH):
            yield from batch
    finally:
        cursor.close()


def verify_chain(
    session: DbSession,
    checkpoints: Sequence[CheckpointClaim] | None = None,
    *,
    after: tuple[int, str] | None = None,
    with_listings: bool = False,
) -> ChainReport:
    """Verify the chain stored in the database, against ``checkpoints`` when given.

    ``after`` is a (seq, hash) already proven, for instance by the last checkpoint: only the
    events after it are read, once the event at that seq is found to still carry that hash.

    ``with_listings`` also holds ``audit_listings`` against the events' details, in the same
    pass (intake.audit.listings). Why: the table is not hashed, so a database owner who deletes
    a reference's rows hides a queue view from that patient's access report while the chain
    stays intact; this names the first event whose rows are missing or extra.
    """
    start = (0, GENESIS_HASH) if after is None else after
    if start[0]:
        stored = session.scalar(select(AuditEvent.hash).where(AuditEvent.seq == start[0]))
        if stored != start[1]:
            problem = "missing event" if stored is None else "chain does not match the checkpoint"
            return ChainReport(False, 0, start[0], problem)
    rows = _stored_rows(session, start[0])
    listed = None
    try:
        if with_listings:
            # The events' query runs first, so under READ COMMITTED the listings' (later)
            # snapshot holds the rows of every event read: each event and its rows commit
            # together. Rows of events committed in between sort after the chain's end.
            first = next(rows, None)
            listed = _listing_rows(session, start[0])
            check = listings.ListingCheck(
                listed,
                lambda seq: _listing_references(session, seq),
                lambda seqs: _first_without_event(session, seqs),
            )
            return _verify_rows(
                itertools.chain(() if first is None else (first,), rows), checkpoints, start, check
            )
        return _verify_rows(rows, checkpoints, start)
    finally:
        rows.close()
        if listed is not None:
            listed.close()


def _first_without_event(session: DbSession, seqs: list[int]) -> int | None:
    """The first of ``seqs`` (listing rows past the chain read) that no event holds now.

    Rows of an event committed after the chain was read are fine; rows of no event are not.
    """
    for at in range(0, len(seqs), 1000):
        chunk = seqs[at : at + 1000]
        held = set(session.scalars(select(AuditEvent.seq).where(AuditEvent.seq.in_(chunk))))
        orphan = next((seq for seq in chunk if seq not in held), None)
        if orphan is not None:
            return orphan
    return None
