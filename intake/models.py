"""Database tables. PHI lives only in sealed columns (named ``*_encrypted``)."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    SmallInteger,
    String,
    Text,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from intake.clock import UTCDateTime, utcnow
from intake.extensions import db

KINDS = ("refill", "contact")
STATUSES = (
    "received",
    "queued",
    "in_progress",
    "waiting_on_patient",
    "waiting_on_prescriber",
    "completed",
    "cancelled",
)
PRIORITIES = ("urgent", "high", "normal", "low")
PRIORITY_RANK = {name: rank for rank, name in enumerate(PRIORITIES)}
OPEN_STATUSES = ("queued", "in_progress", "waiting_on_patient", "waiting_on_prescriber")
ROLES = ("staff", "supervisor", "compliance", "admin")
TOPICS = ("question", "copay", "specialist", "insurance", "transfer", "side_effect")
FULFILLMENT = ("pickup", "delivery", "ship")


def new_uuid() -> str:
    return str(uuid.uuid4())


class Request(db.Model):  # type: ignore[name-defined]
    """A patient's refill or contact request: routing fields in the clear, PHI sealed."""

    __tablename__ = "requests"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_uuid)
    reference: Mapped[str] = mapped_column(String(16), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    topic: Mapped[str | None] = mapped_column(String(32))
    location: Mapped[str | None] = mapped_column(String(32))
    language: Mapped[str] = mapped_column(String(8))
    # The language the patient asked an interpreter for on the form, if any (a code, not PHI).
    interpreter_language: Mapped[str | None] = mapped_column(String(8))
    # Set by routing when nobody who speaks the request's language could take it: the code of
    # the language still needed ("needs Spanish" on the queue); cleared when a speaker claims it.
    language_need: Mapped[str | None] = mapped_column(String(8))
    status: Mapped[str] = mapped_column(String(32), default="received")
    priority: Mapped[str] = mapped_column(String(16), default="normal")
    # 0 = urgent ... 3 = low: the queue sorts by it, so it is kept beside ``priority``.
    priority_rank: Mapped[int] = mapped_column(SmallInteger, default=2)
    team: Mapped[str | None] = mapped_column(String(64))
    assignee_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    # Who last gave the request back to the pool (released it, put it back in the queue, or let
    # the claim time out): automatic assignment does not hand it straight back to them.
    returned_by_id: Mapped[int | None] = mapped_column(Integer)
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_activity_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    escalated_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)
    routed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    sla_due_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    # Envelope encryption: the data key wrapped by KEK ``kek_id``, and the PHI it seals.
    # Shredding a request nulls the wrapped key; the ciphertext then opens for no one.
    kek_id: Mapped[str | None] = mapped_column(String(32))
    wrapped_key: Mapped[bytes | None] = mapped_column("wrapped_key_encrypted", LargeBinary)
    phi: Mapped[bytes] = mapped_column("phi_encrypted", LargeBinary)
    # First name and last initial, sealed apart so the queue never opens the whole document.
    display_name: Mapped[bytes | None] = mapped_column("display_name_encrypted", LargeBinary)

    # Blind indexes for exact-match search (HMAC, see intake.crypto.phi).
    phone_index: Mapped[str | None] = mapped_column(String(64), index=True)
    email_index: Mapped[str | None] = mapped_column(String(64), index=True)
    name_dob_index: Mapped[str | None] = mapped_column(String(64), index=True)
    # HMAC of the one-time key the patient's form carried (see intake.requests.submit): unique, so
    # a form sent twice, even by two requests at the same instant, stores one request.
    submission_key_index: Mapped[str | None] = mapped_column(String(64), index=True, unique=True)

    consents: Mapped[list[ConsentAcceptance]] = relationship(
        back_populates="request", cascade="all, delete-orphan", order_by="ConsentAcceptance.id"
    )

    __table_args__ = (
        Index("ix_requests_status_team", "status", "team"),
        Index("ix_requests_created_at", "created_at"),
        # The queue: open requests in priority, then due-time order, paged by keyset.
        Index(
            "ix_requests_open_queue",
            "priority_rank",
            "sla_due_at",
            "id",
            postgresql_where=text(
                "status IN ('queued', 'in_progress', 'waiting_on_patient', 'waiting_on_prescriber')"
            ),
            sqlite_where=text(
                "status IN ('queued', 'in_progress', 'waiting_on_patient', 'waiting_on_prescriber')"
            ),
        ),
        Index("ix_requests_team_queue", "team", "status", "priority_rank", "sla_due_at", "id"),
        Index(
            "ix_requests_overdue",
            "sla_due_at",
            postgresql_where=text("escalated_at IS NULL"),
            sqlite_where=text("escalated_at IS NULL"),
        ),
    )


class ConsentAcceptance(db.Model):  # type: ignore[name-defined]
    """Which consent text (document, version, language, digest) a patient accepted, and when."""

    __tablename__ = "consent_acceptances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # Indexed: the request page reads a request's consents by it.
    request_id: Mapped[str] = mapped_column(
        ForeignKey("requests.id", ondelete="CASCADE"), index=True
    )
    document: Mapped[str] = mapped_column(String(32))
    version: Mapped[str] = mapped_column(String(32))
    language: Mapped[str] = mapped_column(String(8))
    sha256: Mapped[str] = mapped_column(String(64))
    accepted_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    request: Mapped[Request] = relationship(back_populates="consents")


class OutboxMessage(db.Model):  # type: ignore[name-defined]
    """A task to publish once the transaction that created it has committed.

    Written in the same transaction as the change it announces, so a request can never be
    saved without its routing task, nor a task published for a request that was rolled back.
    Most rows are about a request; an alert about a staff account (``alert`` says which, e.g.
    ``mfa_frozen``) names the user instead and no request.
    """

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_id: Mapped[str | None] = mapped_column(ForeignKey("requests.id", ondelete="CASCADE"))
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    alert: Mapped[str | None] = mapped_column(String(32))
    task: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Set with status "sending" by the worker that took the row to send it (intake.requests.outbox).
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    done_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # The trace id (intake.ops.tracing) bound when the row was written: a task published from
    # elsewhere (the sweep, a routing batch) still logs under the trace of what caused it.
    trace_id: Mapped[str | None] = mapped_column(String(32))

    __table_args__ = (
        Index("ix_outbox_status_id", "status", "id"),
        # Routing and notices close a request's rows by it (intake.requests.outbox.mark_done).
        Index("ix_outbox_request_task", "request_id", "task"),
    )


class AuditEvent(db.Model):  # type: ignore[name-defined]
    """One link of the append-only, hash-chained audit trail (see intake.audit.chain)."""

    __tablename__ = "audit_events"

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    actor: Mapped[str] = mapped_column(String(64))
    actor_role: Mapped[str | None] = mapped_column(String(32))
    action: Mapped[str] = mapped_column(String(64))
    reference: Mapped[str | None] = mapped_column(String(16))
    outcome: Mapped[str] = mapped_column(String(16))
    details: Mapped[str] = mapped_column(Text)
    ip_hmac: Mapped[str | None] = mapped_column(String(64))
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64), unique=True)

    # Compliance searches filter on one of these and page newest first by seq.
    __table_args__ = (
        Index("ix_audit_events_actor_seq", "actor", "seq"),
        Index("ix_audit_events_action_seq", "action", "seq"),
        Index("ix_audit_events_reference_seq", "reference", "seq"),
        # A time window's first and last seq, read from the index alone (compliance.reports).
        Index("ix_audit_events_created_at_seq", "created_at", "seq"),
    )


class AuditListing(db.Model):  # type: ignore[name-defined]
    """One reference a queue view or search listed, and its event (see intake.audit.listings)."""

    __tablename__ = "audit_listings"

    reference: Mapped[str] = mapped_column(String(64), primary_key=True)
    # No foreign key: events are never deleted, and one would put system triggers on
    # audit_events and a lookup in every listing's insert.
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)

    # Verify reads the listings grouped by event, in seq order (intake.audit.listings).
    __table_args__ = (Index("ix_audit_listings_seq_reference", "seq", "reference"),)


class Team(db.Model):  # type: ignore[name-defined]
    """A team of pharmacy staff; its id matches a team of the routing file."""

    __tablename__ = "teams"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(120))
    spanish: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # Round robin's memory (intake.requests.assignment): the member automatic assignment gave
    # this team's last request to. A plain id, not a foreign key: a deleted user just restarts
    # the rotation.
    last_assignee_id: Mapped[int | None] = mapped_column(Integer)


class User(db.Model):  # type: ignore[name-defined]
    """A staff, supervisor, compliance or admin account: password plus TOTP."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    # The languages the person works in, as comma-separated codes ("en,es"): routing assigns a
    # request needing a language the team does not serve to a member who speaks it.
    languages: Mapped[str] = mapped_column(String(64), default="en", server_default="en")
    password_hash: Mapped[str] = mapped_column(String(255))
    # The TOTP secret, sealed like PHI under its own data key (row id "user:<id>").
    kek_id: Mapped[str] = mapped_column(String(32))
    wrapped_key: Mapped[bytes] = mapped_column("wrapped_key_encrypted", LargeBinary)
    totp_secret: Mapped[bytes] = mapped_column("totp_secret_encrypted", LargeBinary)
    last_totp_step: Mapped[int] = mapped_column(BigInteger, default=0)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    demo: Mapped[bool] = mapped_column(Boolean, default=False)
    failed_logins: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_login_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Wrong authenticator codes typed after the right password, in a row; at the policy's limit
    # the second factor is frozen (``otp_frozen_at``) until an admin clears it.
    otp_failures: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    otp_frozen_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Automatic assignment (intake.requests.assignment): the skills the person holds, as
    # comma-separated names ("ivig"); their own cap on open requests assigned to them (None:
    # their team's); since when they are away (None: available); when they were last given one.
    skills: Mapped[str] = mapped_column(String(128), default="", server_default="")
    assignment_cap: Mapped[int | None] = mapped_column(Integer)
    away_since: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_assigned_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    teams: Mapped[list[UserTeam]] = relationship(cascade="all, delete-orphan")

    @property
    def team_ids(self) -> list[str]:
        return sorted(t.team_id for t in self.teams)

    @property
    def language_codes(self) -> list[str]:
        return [code for code in (self.languages or "").split(",") if code]

    @property
    def skill_names(self) -> list[str]:
        return [name for name in (self.skills or "").split(",") if name]


class UserTeam(db.Model):  # type: ignore[name-defined]
    __tablename__ = "user_teams"

    user_id: Mapped[int] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id"), primary_key=True)


class LoginThrottle(db.Model):  # type: ignore[name-defined]
    """Failed logins for one (username, client) pair, or for one typed username from anywhere:
    the delay before the next try.

    Keyed by an HMAC of the typed username and the client network's pseudonym (or of the typed
    username alone, for the per-account budget), known user or not, so a lock says nothing
    about whether the account exists. The per-client rows keep an attacker elsewhere from
    locking a real user out of her own workstation quickly; the per-account row bounds the
    guesses against one account however many addresses the attacker has.
    """

    __tablename__ = "login_throttle"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)


class StaffSession(db.Model):  # type: ignore[name-defined]
    """A server-side login session: ending the row ends the session, whatever the cookie says."""

    __tablename__ = "staff_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    end_reason: Mapped[str | None] = mapped_column(String(32))


class Note(db.Model):  # type: ignore[name-defined]
    """A staff note on a request, sealed under the request's data key."""

    __tablename__ = "notes"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_uuid)
    request_id: Mapped[str] = mapped_column(
        ForeignKey("requests.id", ondelete="CASCADE"), index=True
    )
    author_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    text: Mapped[bytes] = mapped_column("text_encrypted", LargeBinary)


class BreakGlassReview(db.Model):  # type: ignore[name-defined]
    """A compliance officer's review of one break-glass access (an audit event)."""

    __tablename__ = "break_glass_reviews"

    audit_seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    reviewer_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    reviewed_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    comment: Mapped[str] = mapped_column(Text)
