"""Proofs that anyone can check offline: one request's events, and one checkpoint extending another.

Why: the trail is only as trustworthy as the people who can check it. A proof file
(``intake-audit-proof/v1``, read by intake_verify.proof) holds the latest signed checkpoint,
with its witnesses' cosignatures, and for each event naming the request its public leaf record
and its inclusion proof in the checkpoint's Merkle tree. ``intake-verify proof FILE --key
VKEY`` checks it with the log's public key alone: no database, no app. A compliance proof also
holds each event's opening (its previous hash and canonical form), so an auditor can see that
the leaf's chain hash covers the whole event; a patient's proof holds only the public fields
(never a staff member's name or a client pseudonym).

The proofs are built from the database but trusted only after the tree's root is found equal
to the signed one and every inclusion proof is checked here before it is handed out: a
changed event cannot be proven, it is reported instead. Events after the checkpoint are
counted as pending, never silently left out.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select

from config import Settings
from intake.audit import checkpoints
from intake.audit.chain import _canonical, record_event, stored_row_columns
from intake.audit.tree import chain_tree, team_of
from intake.extensions import DbSession
from intake.models import AuditEvent
from intake_verify import leaf, merkle
from intake_verify.proof import FORMAT, make_proof, proof_event

PROOF_FORMAT = FORMAT
EXPORT_ACTION = "audit.exported"
NO_CHECKPOINT = "no signed Merkle checkpoint yet: run `intake audit checkpoint` (or the signer)"
TREE_MISMATCH = (
    "the chain does not match the latest signed checkpoint (size {size}): run `intake audit verify`"
)
EVENT_MISMATCH = (
    "event seq {seq} does not match the latest signed checkpoint: run `intake audit verify`"
)


class ProofUnavailable(RuntimeError):
    """No proof can be built: no signed tree head yet, or the chain does not match it."""


@dataclass
class RequestProof:
    """A proof file's content for one request, and what it covers."""

    reference: str
    size: int
    data: dict[str, Any]
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def pending(self) -> int:
        return int(self.data["pending"])

    @property
    def filename(self) -> str:
        return f"intake-proof-{self.reference}-{self.size}.json"

    def to_json(self) -> str:
        return json.dumps(self.data, indent=1, sort_keys=True) + "\n"


def _b64(hashes: list[bytes]) -> list[str]:
    return [base64.b64encode(h).decode() for h in hashes]


def _verified_tree(session: DbSession, head: checkpoints.SignedHead) -> merkle.MerkleTree:
    """The cached tree of the chain, once its root at the head's size is the signed root."""
    tree = chain_tree(session, head.size)
    if len(tree) < head.size or tree.root(head.size) != head.root:
        # The database changed under the cache, or was changed: rebuild once from scratch.
        tree = chain_tree(session, head.size, fresh=True)
        if len(tree) < head.size or tree.root(head.size) != head.root:
            raise ProofUnavailable(TREE_MISMATCH.format(size=head.size))
    return tree


def build_request_proof(
    session: DbSession, settings: Settings, reference: str, *, openings: bool
) -> RequestProof:
    """The proof of every event naming ``reference`` against the latest signed checkpoint."""
    try:
        head = checkpoints.latest_signed_head(settings)
    except checkpoints.CheckpointError as error:
        # The file ends in a line still being written (or cut by a crash), or a key setting
        # cannot be read: no proof now, said as such, never a server error.
        raise ProofUnavailable(str(error)) from None
    if head is None:
        raise ProofUnavailable(NO_CHECKPOINT)
    c = AuditEvent.__table__.c
    rows = session.execute(
        select(*stored_row_columns(session))
        .where(c.reference == reference, c.seq <= head.size)
        .order_by(c.seq)
    ).all()
    pending = session.scalar(
        select(func.count())
        .select_from(AuditEvent)
        .where(AuditEvent.reference == reference, AuditEvent.seq > head.size)
    )
    tree = _verified_tree(session, head) if rows else None
    events = []
    for seq, at, actor, role, action, ref, outcome, details, ip, prev, chain_hash in rows:
        assert tree is not None
        path = tree.inclusion_proof(seq - 1, head.size)
        try:
            record = leaf.leaf_record(
                seq, at, action, ref, outcome, role, team_of(details), chain_hash
            )
            merkle.verify_inclusion(
                seq - 1, head.size, merkle.leaf_hash(leaf.leaf_data(record)), path, head.root
            )
        except merkle.ProofError:
            raise ProofUnavailable(EVENT_MISMATCH.format(seq=seq)) from None
        opening = None
        if openings:
            opening = (prev, _canonical(seq, at, actor, role, action, ref, outcome, details, ip))
        events.append(proof_event(record, path, opening))
    data = make_proof(head.origin, reference, head.note, events, int(pending or 0))
    return RequestProof(reference, head.size, data, events)


def _export_details(proof: RequestProof, openings: bool) -> dict[str, Any]:
    return {
        "export": "proof",
        "openings": openings,
        "checkpoint_size": proof.size,
        "events": len(proof.events),
        "pending": proof.pending,
    }


def patient_proof(
    session: DbSession, settings: Settings, reference: str, *, ip_hmac: str | None
) -> RequestProof:
    """The patient's proof (public fields only), recorded as ``audit.exported``; commit.

    Recorded and committed before a byte is sent: a proof that cannot be audited is not given.
    """
    proof = build_request_proof(session, settings, reference, openings=False)
    record_event(
        session,
        actor="patient",
        action=EXPORT_ACTION,
        reference=reference,
        ip_hmac=ip_hmac,
        details=_export_details(proof, False),
    )
    session.commit()
    return proof


def recorded_proof(
    session: DbSession,
    settings: Settings,
    reference: str,
    *,
    actor: str,
    actor_role: str | None = None,
    ip_hmac: str | None = None,
    username: str | None = None,
) -> RequestProof:
    """A compliance proof (with openings), recorded as ``audit.exported``; commit."""
    proof = build_request_proof(session, settings, reference, openings=True)
    details = _export_details(proof, True)
    if username is not None:
        details = {"username": username, **details}
    record_event(
        session,
        actor=actor,
        actor_role=actor_role,
        action=EXPORT_ACTION,
        reference=reference,
        ip_hmac=ip_hmac,
        details=details,
    )
    session.commit()
    return proof


@dataclass(frozen=True)
class Consistency:
    """A consistency proof between two signed checkpoints, with both notes."""

    old: checkpoints.SignedHead
    new: checkpoints.SignedHead
    proof: list[bytes]

    def proof_text(self) -> str:
        """The proof as tlog-witness writes it: one base64 hash per line."""
        return "".join(line + "\n" for line in _b64(self.proof))


def consistency_between(
    session: DbSession, settings: Settings, old_size: int, new_size: int | None = None
) -> Consistency:
    """Prove that the signed checkpoint of ``new_size`` (default: latest) extends ``old_size``'s."""
    heads = {head.size: head for head in checkpoints.signed_heads(settings)}
    if not heads:
        raise ProofUnavailable(NO_CHECKPOINT)
    new_size = new_size or max(heads)
    missing = [size for size in (old_size, new_size) if size not in heads]
    if missing:
        raise ProofUnavailable(
            f"no signed Merkle checkpoint of size {missing[0]} (sizes: "
            f"{', '.join(map(str, sorted(heads)))})"
        )
    if old_size > new_size:
        raise ProofUnavailable("the old size must not be larger than the new one")
    old, new = heads[old_size], heads[new_size]
    tree = _verified_tree(session, new)
    if tree.root(old_size) != old.root:
        raise ProofUnavailable(TREE_MISMATCH.format(size=old_size))
    proof = tree.consistency_proof(old_size, new_size)
    merkle.verify_consistency(old_size, new_size, old.root, new.root, proof)
    return Consistency(old, new, proof)
