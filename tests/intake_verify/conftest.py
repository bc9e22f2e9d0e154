"""A signed audit log of 100,001 events, built once, that proof and CLI tests cut proofs from."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest

from intake_verify.checkpoint import Checkpoint, time_extension
from intake_verify.cosignature import cosign
from intake_verify.leaf import leaf_data, leaf_record
from intake_verify.merkle import MerkleTree, leaf_hash
from intake_verify.note import ALG_COSIGNATURE_V1, Signer, generate_key, sign_note
from intake_verify.proof import make_proof, proof_event

ORIGIN = "intake.example/audit"
REFERENCE = "R-7K3M-Q9P2"
SIZE = 100_001
SIGNED_AT = datetime(2026, 11, 24, 10, 40, tzinfo=UTC)


@dataclass
class AuditLog:
    """The log's keys, its leaves, a witness, and the cosigned checkpoint over all of it."""

    log_skey: str
    log_vkey: str
    witness_skey: str
    witness_vkey: str
    records: list[dict[str, Any]]
    openings: dict[int, tuple[str, str]]
    tree: MerkleTree
    checkpoint: str
    request_seqs: list[int]

    def proof(self, with_openings: bool = True) -> dict[str, Any]:
        """The proof file for REFERENCE's events, as ``intake audit prove`` would write it."""
        events = [
            proof_event(
                self.records[seq - 1],
                self.tree.inclusion_proof(seq - 1),
                self.openings[seq] if with_openings else None,
            )
            for seq in self.request_seqs
        ]
        return make_proof(ORIGIN, REFERENCE, self.checkpoint, events, pending=2)


def canonical_event(seq: int, reference: str) -> str:
    """An event as the app's chain hashes it (docs/audit-trail.md, "The hash chain")."""
    body = {
        "action": "phi.viewed",
        "actor": "staff:17",
        "actor_role": "pharmacist",
        "created_at": f"2026-11-24T10:{seq % 60:02d}:14.541465Z",
        "details": {"field": "medication"},
        "ip_hmac": None,
        "outcome": "success",
        "reference": reference,
        "seq": seq,
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


@pytest.fixture(scope="session")
def audit_log() -> AuditLog:
    rng = random.Random(12)
    request_seqs = sorted(rng.sample(range(1, SIZE + 1), 3))
    records, openings = [], {}
    for seq in range(1, SIZE + 1):
        if seq in request_seqs:
            prev_hash = hashlib.sha256(str(seq - 1).encode()).hexdigest()
            canonical = canonical_event(seq, REFERENCE)
            chain_hash = hashlib.sha256(f"{prev_hash}\n{canonical}".encode()).hexdigest()
            openings[seq] = (prev_hash, canonical)
            event = json.loads(canonical)
            records.append(
                leaf_record(
                    seq,
                    event["created_at"],
                    "phi.viewed",
                    REFERENCE,
                    "success",
                    "pharmacist",
                    "ivig-es",
                    chain_hash,
                )  # fmt: skip
            )
        else:
            chain_hash = hashlib.sha256(str(seq).encode()).hexdigest()
            records.append(
                leaf_record(
                    seq,
                    "2026-11-24T10:00:00.000000Z",
                    "request.viewed",
                    f"R-{seq:08d}",
                    "success",
                    None,
                    None,
                    chain_hash,
                )  # fmt: skip
            )
    tree = MerkleTree(leaf_hash(leaf_data(r)) for r in records)
    log_skey, log_vkey = generate_key(ORIGIN)
    witness_skey, witness_vkey = generate_key("witness.example/w1", ALG_COSIGNATURE_V1)
    body = Checkpoint(ORIGIN, SIZE, tree.root(), (time_extension(SIGNED_AT),)).body()
    note = sign_note(body, Signer.from_skey(log_skey))
    note += cosign(body, Signer.from_skey(witness_skey), int(SIGNED_AT.timestamp()) + 5)
    return AuditLog(
        log_skey, log_vkey, witness_skey, witness_vkey, records, openings, tree, note, request_seqs
    )
