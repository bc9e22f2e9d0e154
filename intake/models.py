"""Database tables. PHI lives only in sealed columns (named ``*_encrypted``)."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, Index, Integer, LargeBinary, String, Text
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
    status: Mapped[str] = mapped_column(String(32), default="received")
    priority: Mapped[str] = mapped_column(String(16), default="normal")
    team: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)
    routed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    sla_due_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    # Envelope encryption: the data key wrapped by KEK ``kek_id``, and the PHI it seals.
    # Shredding a request nulls the wrapped key; the ciphertext then opens for no one.
    kek_id: Mapped[str | None] = mapped_column(String(32))
    wrapped_key: Mapped[bytes | None] = mapped_column("wrapped_key_encrypted", LargeBinary)
    phi: Mapped[bytes] = mapped_column("phi_encrypted", LargeBinary)

    # Blind indexes for exact-match search (HMAC, see intake.phi).
    phone_index: Mapped[str | None] = mapped_column(String(64), index=True)
    email_index: Mapped[str | None] = mapped_column(String(64), index=True)
    name_dob_index: Mapped[str | None] = mapped_column(String(64), index=True)

    consents: Mapped[list[ConsentAcceptance]] = relationship(
        back_populates="request", cascade="all, delete-orphan", order_by="ConsentAcceptance.id"
    )

    __table_args__ = (
        Index("ix_requests_status_team", "status", "team"),
        Index("ix_requests_created_at", "created_at"),
    )


class ConsentAcceptance(db.Model):  # type: ignore[name-defined]
    """Which consent text (document, version, language, digest) a patient accepted, and when."""

    __tablename__ = "consent_acceptances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_id: Mapped[str] = mapped_column(ForeignKey("requests.id", ondelete="CASCADE"))
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
    """

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_id: Mapped[str] = mapped_column(ForeignKey("requests.id", ondelete="CASCADE"))
    task: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    done_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    __table_args__ = (Index("ix_outbox_status_id", "status", "id"),)


class AuditEvent(db.Model):  # type: ignore[name-defined]
    """One link of the append-only, hash-chained audit trail (see intake.audit)."""

    __tablename__ = "audit_events"

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    actor: Mapped[str] = mapped_column(String(64), index=True)
    actor_role: Mapped[str | None] = mapped_column(String(32))
    action: Mapped[str] = mapped_column(String(64), index=True)
    reference: Mapped[str | None] = mapped_column(String(16), index=True)
    outcome: Mapped[str] = mapped_column(String(16))
    details: Mapped[str] = mapped_column(Text)
    ip_hmac: Mapped[str | None] = mapped_column(String(64))
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64), unique=True)
