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

A checkpoint is a Merkle tree head (intake.audit.tree, RFC 9162 hashing) in the
C2SP tlog-checkpoint format, signed as a C2SP note with the log's key and cosigned by
witnesses: line version 2 keeps the chain head (seq, hash, count) beside the signed note and
the compact range the next checkpoint extends. The tree's last leaf carries the head's chain
hash, so the signed root vouches for the head too; verification recomputes the root from the
chain. Version 1 lines (a signature over the head alone) still verify.

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
from intake.audit.tree import CompactRange, extend_range, roots_at
from intake.clock import now
from intake.extensions import DbSession
from intake.models import AuditEvent
from intake_verify import checkpoint as tlog
from intake_verify import note as notes

log = structlog.get_logger(__name__)

CHECKPOINTS_FILE = "audit-checkpoints.jsonl"
FORMAT_VERSION = 1
NOTE_VERSION = 2  # a signed tree head (C2SP checkpoint note) beside the chain head
# Prefixed to what is signed, so a checkpoint signature can never be taken for another message.
SIGNING_CONTEXT = b"intake audit checkpoint v1\n"
SIGNED_FIELDS = ("v", "seq", "hash", "count", "time", "key_id")
# The last line is found by reading this much of the file's end; a line is about 300 bytes
# (version 1) or 1 to 3 KiB (version 2: the note, its cosignatures and the compact range).
TAIL_BYTES = 65536


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
    # Version 2: the signed C2SP checkpoint note (with any cosignatures) and the compact range
    # of the tree it signs (hex), from which the next checkpoint extends the tree.
    note: str = ""
    compact: tuple[str, ...] = ()

    def signed_bytes(self) -> bytes:
        body = {"v": FORMAT_VERSION, "seq": self.seq, "hash": self.hash, "count": self.count}
        body |= {"time": self.time, "key_id": self.key_id}
        return SIGNING_CONTEXT + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    def to_line(self) -> str:
        if self.note:
            body = {"v": NOTE_VERSION, "seq": self.seq, "hash": self.hash, "count": self.count}
            body |= {"time": self.time, "key_id": self.key_id, "note": self.note}
            body["range"] = list(self.compact)
            return json.dumps(body, separators=(",", ":")) + "\n"
        body = {"v": FORMAT_VERSION, "seq": self.seq, "hash": self.hash, "count": self.count}
        body |= {"time": self.time, "key_id": self.key_id, "signature": self.signature}
        return json.dumps(body, separators=(",", ":")) + "\n"


@dataclass(frozen=True)
class SignedHead:
    """A version 2 line whose note verified: the signed tree head, as the file holds it."""

    number: int  # the line's position in the file (0 when read from the file's end)
    origin: str
    size: int
    root: bytes
    note: str
    compact: tuple[str, ...]

    def compact_range(self) -> CompactRange | None:
        """The line's compact range, if it is well formed and leads to the signed root."""
        try:
            compact = CompactRange(self.size, (bytes.fromhex(h) for h in self.compact))
        except ValueError:
            return None
        return compact if compact.root() == self.root else None


def note_verifiers(verifiers: list[keys.AuditVerifier]) -> list[notes.Verifier]:
    return [v.note_verifier() for v in verifiers]


def _open_tree_head(
    number: int, body: dict[str, Any], verifiers: list[keys.AuditVerifier]
) -> tuple[CheckpointClaim, SignedHead | None]:
    """Check a version 2 line: its note's signature, and that it signs the seq it names."""
    seq, digest, count = body["seq"], body["hash"], body["count"]
    text, compact = body["note"], body["range"]
    well_formed = (
        all(type(v) is int and v > 0 for v in (seq, count))
        and isinstance(digest, str)
        and isinstance(text, str)
        and isinstance(compact, list)
        and all(isinstance(h, str) for h in compact)
    )
    if not well_formed:
        return CheckpointClaim(number, None, None, None, f"unreadable checkpoint {number}"), None
    claim = CheckpointClaim(number, seq, digest, count)
    if not verifiers:
        why = "no public key here to check it"
    else:
        try:
            opened = notes.open_note(text, note_verifiers(verifiers))
            head = tlog.Checkpoint.parse(opened.text)
        except (notes.NoteError, tlog.CheckpointError) as error:
            why = str(error)
            if "not signed by a trusted key" in why:  # intake_verify.note's words
                why = _unknown_keys(text) or why
        else:
            if head.size == seq:
                signed = SignedHead(number, head.origin, head.size, head.root, text, tuple(compact))
                return claim, signed
            why = f"its note signs size {head.size}, not seq {seq}"
    problem = f"bad checkpoint signature (checkpoint {number}: {why})"
    return CheckpointClaim(number, seq, digest, count, problem), None


def signing_key(settings: Settings) -> Ed25519PrivateKey:
    """The checkpoint signing key: for the signer only (intake.audit.keys.load_signer)."""
    return load_signer(settings).private_key


def load_signer(settings: Settings) -> keys.AuditSigner:
    try:
        return keys.load_signer(settings)
    except keys.AuditKeyError as error:
        raise CheckpointError(str(error)) from None


def public_keys(settings: Settings) -> dict[str, Ed25519PublicKey]:
    """Every public key checkpoints may carry, by key id (old ones kept after a rotation)."""
    return keys.verifiers_by_id(trusted_verifiers(settings))


def key_id(public_key: Ed25519PublicKey) -> str:
    """The public key's fingerprint, written on every checkpoint it signs."""
    return "ed25519:" + hashlib.sha256(public_key.public_bytes_raw()).hexdigest()[:32]


def checkpoints_path(settings: Settings) -> Path:
    if settings.audit_checkpoints:
        return Path(settings.audit_checkpoints)
    return Path(settings.data_dir) / CHECKPOINTS_FILE


def _unknown_keys(text: str) -> str | None:
    """ "signed by unknown key NAME+HEX8" when no signature on the note is by a trusted key."""
    try:
        _body, signatures = notes.split_note(text)
    except notes.NoteError:
        return None
    names = [f"{sig.name}+{sig.key_id:08x}" for sig in signatures]
    return f"signed by unknown key {', '.join(names)}" if names else None


def _read_line(
    number: int, line: str, verifiers: list[keys.AuditVerifier]
) -> tuple[CheckpointClaim, SignedHead | None]:
    """Read one line of the checkpoints file (either version) and check its signature."""
    try:
        body = json.loads(line)
        if body["v"] == NOTE_VERSION:
            return _open_tree_head(number, body, verifiers)
    except (ValueError, TypeError, KeyError):
        return CheckpointClaim(number, None, None, None, f"unreadable checkpoint {number}"), None
    by_id = keys.verifiers_by_id(verifiers)
    return _parse_line(number, line, by_id), None


def _parse_line(
    number: int, line: str, public_keys: dict[str, Ed25519PublicKey]
) -> CheckpointClaim:
    """Read one version 1 line of the checkpoints file and check its signature."""
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
    public_key = public_keys.get(checkpoint.key_id)
    if not public_keys:
        why = "no signing key here to check it"
    elif public_key is None:
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


def read_lines(
    path: Path, verifiers: list[keys.AuditVerifier]
) -> list[tuple[CheckpointClaim, SignedHead | None]]:
    """Every checkpoint in ``path`` (none if it does not exist), each with its signature checked."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [_read_line(number, line, verifiers) for number, line in enumerate(lines, 1)]


def read_checkpoints(path: Path, verifiers: list[keys.AuditVerifier]) -> list[CheckpointClaim]:
    """Every checkpoint in ``path``'s claim about the chain, each with its signature checked."""
    return [claim for claim, _head in read_lines(path, verifiers)]


def trusted_verifiers(settings: Settings) -> list[keys.AuditVerifier]:
    """Every public key checkpoints may be signed with (old ones kept after a rotation)."""
    try:
        return keys.load_verifiers(settings)
    except keys.AuditKeyError as error:
        raise CheckpointError(str(error)) from None


def signed_heads(settings: Settings, path: Path | None = None) -> list[SignedHead]:
    """Every signed tree head in the checkpoints file whose signature verifies, oldest first."""
    verifiers = trusted_verifiers(settings)
    return [head for _c, head in read_lines(path or checkpoints_path(settings), verifiers) if head]


def latest_signed_head(settings: Settings, path: Path | None = None) -> SignedHead | None:
    """The file's last line as a signed tree head (None if there is none, or it is version 1)."""
    path = path or checkpoints_path(settings)
    last = _last_line(path)
    if last is None:
        return None
    _claim, head = _read_line(0, last, trusted_verifiers(settings))
    return head


def _last_line(path: Path) -> str | None:
    """The file's last complete line, read from its end so a long file costs nothing."""
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
    return tail[:-1].rsplit(b"\n", 1)[-1].decode("utf-8", "replace")


def _last_checkpoint(
    path: Path, verifiers: list[keys.AuditVerifier]
) -> tuple[CheckpointClaim, SignedHead | None] | None:
    """The file's last checkpoint (and its signed tree head, for a version 2 line)."""
    last = _last_line(path)
    if last is None:
        return None
    claim, head = _read_line(0, last, verifiers)  # 0: its position is not known (nor needed)
    if claim.problem:
        raise CheckpointError(f"the last checkpoint in {path} does not verify ({claim.problem})")
    return claim, head


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
    made, so the next one reads only what is new. With ``INTAKE_AUDIT_WITNESSES`` set, the
    witnesses' cosignatures go into the note before the line is written.
    """
    signer = load_signer(settings)
    verifiers = trusted_verifiers(settings)
    # A raw key (the version 1 format) carries no name: sign notes under the name its
    # published public key has, so that they verify with it.
    named = next((v.name for v in verifiers if v.raw == signer.verifier.raw), signer.name)
    signer = keys.AuditSigner(named, signer.private_key)
    path = path or checkpoints_path(settings)
    cursor = cursor or AnchorCursor()
    try:
        check_anchor(session, settings, cursor)
        signed = _sign_head(session, signer, path, skip_idle, verifiers)
        if signed is None:
            session.rollback()  # releases the writers' lock
            return None
        checkpoint, previous = signed
        if settings.audit_witnesses:
            checkpoint = _witnessed(session, settings, signer, path, checkpoint, previous)
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
    signer: keys.AuditSigner,
    path: Path,
    skip_idle: bool,
    old_keys: list[keys.AuditVerifier] | None = None,
) -> tuple[Checkpoint, SignedHead | None] | None:
    """Lock the chain, check it extends the file's last checkpoint, and sign its tree head.

    Returns the checkpoint and the last one's signed tree head (None if it was version 1).
    """
    head = chain_head(session)  # holds the writers' lock until commit: the head cannot move
    if head.seq == 0:
        return None
    # The last checkpoint may carry a key rotated out since: any listed public key will do.
    found = _last_checkpoint(path, [*(old_keys or []), signer.verifier])
    last, last_head = found if found is not None else (None, None)
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
    return _sign_tree_head(session, signer, head.seq, head.hash, count, last_head), last_head


def _sign_tree_head(
    session: DbSession,
    signer: keys.AuditSigner,
    seq: int,
    digest: str,
    count: int,
    last_head: SignedHead | None,
) -> Checkpoint:
    """Sign the Merkle tree head of the chain through ``seq`` as a C2SP checkpoint note.

    The tree grows from the last checkpoint's compact range (verified against its signed root),
    so only the events since are hashed; after a version 1 line (or none) every event is.
    """
    start = last_head.compact_range() if last_head is not None else None
    if start is None and last_head is not None:
        log.warning("audit_compact_range_rebuilt", size=last_head.size)
    tree = extend_range(session, start or CompactRange(), seq)
    if tree.size != seq:
        raise CheckpointError(
            f"refusing to sign a broken chain: seq {tree.size + 1}: missing event"
        )
    moment = now()
    body = tlog.Checkpoint(signer.name, seq, tree.root(), (tlog.time_extension(moment),)).body()
    return Checkpoint(
        seq,
        digest,
        count,
        format_time(moment),
        signer.verifier.key_id,
        note=notes.sign_note(body, signer.note_signer()),
        compact=tuple(tree.to_hex()),
    )


def _witnessed(
    session: DbSession,
    settings: Settings,
    signer: keys.AuditSigner,
    path: Path,
    checkpoint: Checkpoint,
    previous: SignedHead | None,
) -> Checkpoint:
    """The checkpoint with its witnesses' cosignatures in its note (intake.audit.witnesses).

    The writers' lock is released while the witnesses answer, so a slow or unreachable
    witness holds up no one; it is taken again before the line is written, and the file must
    still end with the checkpoint this one extends.
    """
    from intake.audit.tree import consistency_from_chain
    from intake.audit.witnesses import collect_cosignatures

    before = _last_line(path)
    session.rollback()  # releases the writers' lock

    def proof_from(old_size: int) -> list[bytes]:
        proof = consistency_from_chain(session, old_size, checkpoint.seq)
        session.rollback()  # SQLite transactions begin IMMEDIATE: hold no lock over HTTP
        return proof

    note = collect_cosignatures(
        settings,
        checkpoint.note,
        checkpoint.seq,
        proof_from,
        previous=(previous.note, previous.size) if previous is not None else None,
    )
    session.rollback()
    chain_head(session)  # the writers' lock again, until commit
    if _last_line(path) != before:
        raise CheckpointError(
            "another checkpoint was written while the witnesses answered; run it again"
        )
    return replace(checkpoint, note=note)


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
    # The file's last line as a signed tree head (None if it is version 1 or unreadable), and
    # the configured witnesses whose cosignature on it verifies.
    latest: SignedHead | None = None
    cosigned_by: tuple[str, ...] = ()

    def summary(self) -> dict[str, Any]:
        return {
            "file": str(self.path),
            "lines": self.lines,
            "verified": self.chain.checkpoints,
            "last_seq": self.last_seq,
            "tree_size": self.latest.size if self.latest else None,
            "cosigned_by": list(self.cosigned_by),
        }


def verify_trail(
    session: DbSession,
    settings: Settings,
    path: Path | None = None,
    *,
    with_anchor: bool = True,
    with_freshness: bool = True,
) -> TrailReport:
    """Verify the chain, every checkpoint in the file (the configured one by default) and its
    signed Merkle root, the anchor, and that no event waited too long for a checkpoint.
    Public keys only."""
    path = path or checkpoints_path(settings)
    # The file first: every checkpoint in it signs events already committed, so the chain read
    # next holds them, even while another process appends a checkpoint.
    lines = read_lines(path, trusted_verifiers(settings))
    claims = [claim for claim, _head in lines]
    report = verify_chain(session, claims, with_listings=True)
    report = _check_roots(session, report, [head for _claim, head in lines if head is not None])
    seqs = [claim.seq for claim in claims if claim.seq is not None]
    last_seq = max(seqs) if seqs else None
    if with_anchor:
        report = _worst(report, _anchor_finding(session, settings))
    if report.ok and with_freshness:
        report = _worst(report, _freshness_finding(session, settings, path, last_seq))
    latest = lines[-1][1] if lines else None
    cosigned: tuple[str, ...] = ()
    if latest is not None:
        from intake.audit.witnesses import cosigned_by

        cosigned = tuple(cosigned_by(settings, latest.note))
    return TrailReport(report, path, len(claims), last_seq, latest, cosigned)


def _check_roots(session: DbSession, report: ChainReport, heads: list[SignedHead]) -> ChainReport:
    """Hold each signed tree head's root against the tree of the chain, up to the first damage.

    The chain's hashes already match each checkpoint's head; this checks what an outside
    reader relies on, that the signed root is the root of this chain (whose last leaf carries
    that head's hash).
    """
    limit = report.last_seq if report.ok else (report.first_bad_seq or 1) - 1
    checked = [head for head in heads if head.size <= limit]
    roots = roots_at(session, [head.size for head in checked])
    for head in checked:
        if roots.get(head.size) != head.root:
            return replace(
                report,
                ok=False,
                first_bad_seq=head.size,
                problem=f"chain does not match checkpoint {head.number}: its signed Merkle root "
                "is not the root of this chain",
            )
    return report


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
