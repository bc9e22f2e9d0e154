"""Signed checkpoints of the audit chain, kept in a file outside the database.

Why: the hash chain (intake.audit.chain) shows that no event was changed, removed or reordered, but
only relative to the chain itself. Someone who can write to the database can rewrite an event
and recompute every later hash, or cut the tail off; the chain then verifies. A checkpoint is
an Ed25519 signature over the chain's head (last seq, last hash, event count, time), appended
as one JSON line to a file that is not in the database, made with a key that is not in the
database either. A rewritten chain no longer has the hash a checkpoint signed; a truncated one
no longer reaches the seq a checkpoint signed; a forged checkpoint does not verify against the
key; an old line appended again goes backwards. This assumes the attacker holds neither the
signing key nor every copy of the checkpoints file: ship the file elsewhere (it holds no
secret and no PHI) so that a checkpoint cannot be quietly removed either.

Order of events: a checkpoint signs the chain head first, then records ``audit.checkpointed``
(naming the seq and hash it signed) in the chain. That event is therefore not covered by the
checkpoint that records it, but by the next one. Verification also checks that every
checkpoint the chain records is still in the file.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC
from pathlib import Path
from typing import Any

import structlog
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import func, select

from config import Settings
from intake.audit import anchor, keys
from intake.audit.anchor import AnchorMark
from intake.audit.chain import (
    CHECKPOINT_ACTION,
    ChainReport,
    CheckpointClaim,
    chain_head,
    format_time,
    record_event,
    verify_chain,
)
from intake.clock import now
from intake.extensions import DbSession
from intake.models import AuditEvent

log = structlog.get_logger(__name__)

CHECKPOINTS_FILE = "audit-checkpoints.jsonl"
FORMAT_VERSION = 1
# Prefixed to what is signed, so a checkpoint signature can never be taken for another message.
SIGNING_CONTEXT = b"intake audit checkpoint v1\n"
SIGNED_FIELDS = ("v", "seq", "hash", "count", "time", "key_id")
# The last line is found by reading this much of the file's end; a line is about 300 bytes.
TAIL_BYTES = 8192



class CheckpointError(RuntimeError):
    """A checkpoint cannot be written: no usable key, or the chain or file is not as signed."""


@dataclass(frozen=True)
class Checkpoint:
    """One signed statement of the chain's head."""

    seq: int
    hash: str
    count: int
    time: str
    key_id: str
    signature: str = ""

    def signed_bytes(self) -> bytes:
        body = {"v": FORMAT_VERSION, "seq": self.seq, "hash": self.hash, "count": self.count}
        body |= {"time": self.time, "key_id": self.key_id}
        return SIGNING_CONTEXT + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    def to_line(self) -> str:
        body = {"v": FORMAT_VERSION, "seq": self.seq, "hash": self.hash, "count": self.count}
        body |= {"time": self.time, "key_id": self.key_id, "signature": self.signature}
        return json.dumps(body, separators=(",", ":")) + "\n"


def signing_key(settings: Settings) -> Ed25519PrivateKey:
    """The checkpoint signing key: for the signer only (intake.audit.keys.load_signer)."""
    try:
        return keys.load_signer(settings).private_key
    except keys.AuditKeyError as error:
        raise CheckpointError(str(error)) from None


def public_keys(settings: Settings) -> dict[str, Ed25519PublicKey]:
    """Every public key checkpoints may carry, by key id (old ones kept after a rotation)."""
    try:
        return keys.verifiers_by_id(keys.load_verifiers(settings))
    except keys.AuditKeyError as error:
        raise CheckpointError(str(error)) from None


PublicKeys = Ed25519PublicKey | Mapping[str, Ed25519PublicKey] | None


def _key_for_line(line: str, known: PublicKeys) -> Ed25519PublicKey | None:
    """The public key a line says signed it, among ``known`` (any one when none matches)."""
    if known is None or isinstance(known, Ed25519PublicKey):
        return known
    try:
        named = json.loads(line).get("key_id")
    except (ValueError, AttributeError):
        named = None
    if isinstance(named, str) and named in known:
        return known[named]
    return next(iter(known.values()), None)


def key_id(public_key: Ed25519PublicKey) -> str:
    """The public key's fingerprint, written on every checkpoint it signs."""
    return "ed25519:" + hashlib.sha256(public_key.public_bytes_raw()).hexdigest()[:32]


def checkpoints_path(settings: Settings) -> Path:
    if settings.audit_checkpoints:
        return Path(settings.audit_checkpoints)
    return Path(settings.data_dir) / CHECKPOINTS_FILE


def _parse_line(number: int, line: str, public_key: Ed25519PublicKey | None) -> CheckpointClaim:
    """Read one line of the checkpoints file and check its signature."""
    try:
        body = json.loads(line)
        seq, digest, count = body["seq"], body["hash"], body["count"]
        checkpoint = Checkpoint(seq, digest, count, body["time"], body["key_id"])
        signature = base64.b64decode(body["signature"], validate=True)
        well_formed = (
            body["v"] == FORMAT_VERSION
            and all(type(v) is int and v > 0 for v in (seq, count))
            and all(isinstance(v, str) for v in (digest, checkpoint.time, checkpoint.key_id))
        )
    except (ValueError, TypeError, KeyError, binascii.Error):
        well_formed = False
    if not well_formed:
        return CheckpointClaim(number, None, None, None, f"unreadable checkpoint {number}")
    claim = CheckpointClaim(number, seq, digest, count)
    if public_key is None:
        why = "no signing key here to check it"
    elif checkpoint.key_id != key_id(public_key):
        why = f"signed by unknown key {checkpoint.key_id}"
    else:
        try:
            public_key.verify(signature, checkpoint.signed_bytes())
            return claim
        except InvalidSignature:
            why = "the signature does not match"
    return CheckpointClaim(
        number, seq, digest, count, f"bad checkpoint signature (checkpoint {number}: {why})"
    )


def read_checkpoints(path: Path, public_key: PublicKeys) -> list[CheckpointClaim]:
    """Every checkpoint in ``path`` (none if it does not exist), each with its signature checked."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [
        _parse_line(number, line, _key_for_line(line, public_key))
        for number, line in enumerate(lines, 1)
    ]


def _last_checkpoint(path: Path, public_key: PublicKeys) -> CheckpointClaim | None:
    """The file's last checkpoint, read from its end so a long file costs nothing."""
    try:
        with path.open("rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(0, size - TAIL_BYTES))
            tail = handle.read()
    except FileNotFoundError:
        return None
    if not tail:
        return None
    if not tail.endswith(b"\n"):
        raise CheckpointError(f"{path} ends in a partial line; run `intake audit verify`")
    last = tail[:-1].rsplit(b"\n", 1)[-1].decode("utf-8", "replace")
    # 0: its position is not known (nor needed)
    claim = _parse_line(0, last, _key_for_line(last, public_key))
    if claim.problem:
        raise CheckpointError(f"the last checkpoint in {path} does not verify ({claim.problem})")
    return claim


def _append_line(path: Path, line: str) -> None:
    """Append one line and make it durable before the chain records that it exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(
    session: DbSession,
    settings: Settings,
    *,
    actor: str,
    path: Path | None = None,
    skip_idle: bool = False,
    cursor: AnchorCursor | None = None,
) -> Checkpoint | None:
    """Sign the chain's head into the checkpoints file, record ``audit.checkpointed``; commit.

    Returns None when there is nothing to sign: the chain is empty, its head is already signed,
    or (``skip_idle``, for the periodic job) nothing but the last checkpoint's own event
    happened since. Refuses (CheckpointError) to sign a chain that does not extend the last
    checkpoint intact, or that the anchor does not vouch for: signing it would vouch for the
    damage. ``cursor`` (the signer's) remembers where in the anchor the last checkpoint was
    made, so the next one reads only what is new.
    """
    key = signing_key(settings)
    path = path or checkpoints_path(settings)
    cursor = cursor or AnchorCursor()
    try:
        check_anchor(session, settings, cursor)
        checkpoint = _sign_head(session, key, path, skip_idle, public_keys(settings))
        if checkpoint is None:
            session.rollback()  # releases the writers' lock
            return None
        # The line is durable before the event that says it exists is committed: a crash in
        # between leaves a checkpoint nobody recorded, never a recorded one that is missing.
        _append_line(path, checkpoint.to_line())
        record_event(
            session,
            actor=actor,
            action=CHECKPOINT_ACTION,
            details={
                "checkpoint_seq": checkpoint.seq,
                "checkpoint_hash": checkpoint.hash,
                "key_id": checkpoint.key_id,
            },
        )
        session.commit()
    except BaseException:
        session.rollback()
        raise
    cursor.advance(checkpoint.seq)
    log.info("audit_checkpoint_signed", seq=checkpoint.seq, key_id=checkpoint.key_id)
    return checkpoint


def _sign_head(
    session: DbSession,
    key: Ed25519PrivateKey,
    path: Path,
    skip_idle: bool,
    old_keys: Mapping[str, Ed25519PublicKey] | None = None,
) -> Checkpoint | None:
    """Lock the chain, check it extends the file's last checkpoint, and sign its head."""
    public_key = key.public_key()
    head = chain_head(session)  # holds the writers' lock until commit: the head cannot move
    if head.seq == 0:
        return None
    # The last checkpoint may carry a key rotated out since: any listed public key will do.
    last = _last_checkpoint(path, {**(old_keys or {}), key_id(public_key): public_key})
    if last is not None:
        assert last.seq is not None and last.hash is not None
        if last.seq == head.seq and last.hash == head.hash:
            return None
        if last.seq >= head.seq:
            raise CheckpointError(
                f"the chain's head (seq {head.seq}) does not extend the last checkpoint "
                f"(seq {last.seq}); run `intake audit verify`"
            )
        if skip_idle and head.seq == last.seq + 1 and head.action == CHECKPOINT_ACTION:
            return None
    after = (last.seq, last.hash) if last else None
    report = verify_chain(session, after=after)  # type: ignore[arg-type]
    if not report.ok or report.last_seq != head.seq:
        log.error("audit_chain_broken", first_bad_seq=report.first_bad_seq, problem=report.problem)
        raise CheckpointError(
            f"refusing to sign a broken chain: seq {report.first_bad_seq}: {report.problem}"
        )
    count = report.events + (last.count if last is not None and last.count else 0)
    unsigned = Checkpoint(head.seq, head.hash, count, format_time(now()), key_id(public_key))
    signature = base64.b64encode(key.sign(unsigned.signed_bytes())).decode()
    return replace(unsigned, signature=signature)


@dataclass
class AnchorCursor:
    """Where the signer's last anchor comparison ended, to read only what is new next time."""

    mark: AnchorMark | None = None
    pending: AnchorMark | None = None

    def advance(self, signed_seq: int) -> None:
        """A checkpoint at ``signed_seq`` was committed: later comparisons may start there."""
        if self.pending is not None and self.pending.seq == signed_seq:
            self.mark = self.pending


def check_anchor(session: DbSession, settings: Settings, cursor: AnchorCursor) -> None:
    """Take the writers' lock and refuse (CheckpointError) a chain the anchor does not vouch for.

    Why: a checkpoint signed over events a database attacker deleted, changed or forged since
    the last one would vouch for the damage. The lock (held until the transaction ends) keeps
    the head still while the comparison runs; it is logged as ``audit_anchor_mismatch``.
    """
    head = chain_head(session)
    report = anchor.compare(session, anchor.anchor_for(settings), since=cursor.mark)
    if not report.ok:
        log.error(
            "audit_anchor_mismatch",
            first_bad_seq=report.first_bad_seq,
            problem=report.problem,
            anchor=report.anchor,
        )
        cursor.mark = None  # compare everything again next time
        raise CheckpointError(
            f"refusing to sign: the chain disagrees with the audit anchor at seq "
            f"{report.first_bad_seq}: {report.problem}; run `intake audit verify`"
        )
    cursor.pending = AnchorMark(head.seq, report.end)


@dataclass(frozen=True)
class TrailReport:
    """A chain report plus what was read of the checkpoints file."""

    chain: ChainReport
    path: Path
    lines: int
    last_seq: int | None

    def summary(self) -> dict[str, Any]:
        return {
            "file": str(self.path),
            "lines": self.lines,
            "verified": self.chain.checkpoints,
            "last_seq": self.last_seq,
        }


def verify_trail(
    session: DbSession,
    settings: Settings,
    path: Path | None = None,
    *,
    with_anchor: bool = True,
) -> TrailReport:
    """Verify the chain, every checkpoint in the file (the configured one by default), the
    anchor, and that no event waited too long for a checkpoint. Public keys only."""
    path = path or checkpoints_path(settings)
    # The file first: every checkpoint in it signs events already committed, so the chain read
    # next holds them, even while another process appends a checkpoint.
    claims = read_checkpoints(path, public_keys(settings))
    report = verify_chain(session, claims)
    seqs = [claim.seq for claim in claims if claim.seq is not None]
    last_seq = max(seqs) if seqs else None
    if with_anchor:
        report = _worst(report, _anchor_finding(session, settings))
    if report.ok:
        report = _worst(report, _freshness_finding(session, settings, path, last_seq))
    return TrailReport(report, path, len(claims), last_seq)


def _worst(report: ChainReport, finding: tuple[int | None, str] | None) -> ChainReport:
    """``report`` with ``finding`` as its problem, when that comes earlier in the chain."""
    if finding is None:
        return report
    seq, problem = finding
    if report.ok or (seq is not None and (report.first_bad_seq or 0) > seq):
        return replace(report, ok=False, first_bad_seq=seq, problem=problem)
    return report


def _anchor_finding(session: DbSession, settings: Settings) -> tuple[int | None, str] | None:
    found = anchor.compare(session, anchor.anchor_for(settings))
    return None if found.ok else (found.first_bad_seq, str(found.problem))


def _freshness_finding(
    session: DbSession, settings: Settings, path: Path, last_seq: int | None
) -> tuple[int | None, str] | None:
    """Fail a trail whose checkpoints are missing, or whose events wait too long for one.

    Why: an attacker who can stop the signer (or delete the checkpoints file) would otherwise
    leave every new event protected by the anchor alone, and ``verify`` would still say intact.
    An ``audit.checkpointed`` event is never covered by the checkpoint it records, so it does
    not count as waiting.
    """
    waiting = session.execute(
        select(func.min(AuditEvent.seq), func.min(AuditEvent.created_at)).where(
            AuditEvent.seq > (last_seq or 0), AuditEvent.action != CHECKPOINT_ACTION
        )
    ).first()
    first_seq, oldest = waiting if waiting else (None, None)
    if last_seq is None:
        total = session.scalar(select(func.count()).select_from(AuditEvent)) or 0
        if total:
            return (
                1,
                f"no signed checkpoints: {path} is missing or empty, yet the database holds "
                f"{total} events (is the signer running?)",
            )
        return None
    if first_seq is None or oldest is None:
        return None
    if oldest.tzinfo is None:
        oldest = oldest.replace(tzinfo=UTC)
    age = (now() - oldest).total_seconds()
    if age <= settings.max_unsigned_seconds:
        return None
    since = _last_checkpoint_time(path) or "never"
    return (
        first_seq,
        f"stale: event {first_seq} (written {format_time(oldest)}) and those after it have "
        f"not been signed since {since}, over {int(settings.max_unsigned_seconds)} seconds "
        "(is the signer running?)",
    )


def _last_checkpoint_time(path: Path) -> str | None:
    """When the file's last checkpoint was signed, as it says."""
    try:
        with path.open("rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(0, size - TAIL_BYTES))
            last = handle.read().rstrip(b"\n").rsplit(b"\n", 1)[-1]
        found = json.loads(last).get("time")
    except (OSError, ValueError, AttributeError):
        return None
    return found if isinstance(found, str) else None


def verify_all(session: DbSession) -> ChainReport:
    """Verify the chain and the app's signed checkpoints file."""
    from flask import current_app

    return verify_trail(session, current_app.extensions["intake.settings"]).chain
