"""The audit log's Merkle leaf: what a proof discloses about one event.

Intake's hash chain hashes every column of an event, some of which must stay private (which
staff member, the details, the client's IP pseudonym). A leaf carries only the public fields a
patient may see (when, what, which team, with which outcome) plus the event's chain hash, which
commits to the rest without revealing it. The application builds its tree from these leaves and
this package checks proofs over them, so both use this one definition.

Leaf index = seq - 1, and the tree size is the number of events (the head's seq).

An *opening* (the event's ``prev_hash`` and its canonical JSON text, as the chain hashed them)
lets an auditor who is entitled to the full event check it against the leaf: the chain hash
must be SHA-256(prev_hash + "\\n" + canonical), and the canonical's public fields must be the
leaf's.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from intake_verify.merkle import ProofError

LEAF_PREFIX = b"intake-audit-leaf/v1\n"
LEAF_KEYS = frozenset(
    ("seq", "created_at", "action", "reference", "outcome", "actor_role", "team", "chain_hash")
)
# Fields the leaf shares with the chain's canonical event (``team`` is not a column there).
_SHARED_KEYS = ("seq", "created_at", "action", "reference", "outcome", "actor_role")
_HEX_HASH = re.compile(r"[0-9a-f]{64}")


def leaf_record(
    seq: int,
    created_at: str,
    action: str,
    reference: str | None,
    outcome: str,
    actor_role: str | None,
    team: str | None,
    chain_hash: str,
) -> dict[str, Any]:
    """The leaf's fields for one event; ``created_at`` as the chain's canonical text."""
    record = {
        "seq": seq,
        "created_at": created_at,
        "action": action,
        "reference": reference,
        "outcome": outcome,
        "actor_role": actor_role,
        "team": team,
        "chain_hash": chain_hash,
    }
    _check_record(record)
    return record


def leaf_data(record: dict[str, Any]) -> bytes:
    """The bytes the Merkle tree hashes as this leaf: a prefix and the record's canonical JSON."""
    _check_record(record)
    text = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return LEAF_PREFIX + text.encode("ascii")


def check_opening(record: dict[str, Any], prev_hash: str, canonical: str) -> None:
    """Check that the chain event ``canonical`` (after ``prev_hash``) is the one in the leaf."""
    _check_record(record)
    if not isinstance(prev_hash, str) or not _HEX_HASH.fullmatch(prev_hash):
        raise ProofError("the opening's prev_hash is not a SHA-256 hex digest")
    if not isinstance(canonical, str):
        raise ProofError("the opening's canonical event is not text")
    digest = hashlib.sha256(f"{prev_hash}\n{canonical}".encode()).hexdigest()
    if digest != record["chain_hash"]:
        raise ProofError(f"seq {record['seq']}: the opening does not hash to the chain hash")
    try:
        event = json.loads(canonical)
    except ValueError as exc:
        raise ProofError(f"seq {record['seq']}: the opening is not JSON") from exc
    if not isinstance(event, dict):
        raise ProofError(f"seq {record['seq']}: the opening is not an event")
    for key in _SHARED_KEYS:
        # Compare types too: in JSON (and Python) 1 == 1.0 == true, but they are not the same.
        if key not in event or (type(event[key]), event[key]) != (type(record[key]), record[key]):
            raise ProofError(f"seq {record['seq']}: the opening's {key} differs from the leaf's")


def _check_record(record: object) -> None:
    if not isinstance(record, dict) or set(record) != LEAF_KEYS:
        raise ProofError("a leaf record has exactly the keys " + ", ".join(sorted(LEAF_KEYS)))
    seq = record["seq"]
    if type(seq) is not int or seq < 1:
        raise ProofError("a leaf's seq is a positive integer")
    for key in ("created_at", "action", "outcome"):
        if not isinstance(record[key], str):
            raise ProofError(f"a leaf's {key} is text")
    for key in ("reference", "actor_role", "team"):
        if record[key] is not None and not isinstance(record[key], str):
            raise ProofError(f"a leaf's {key} is text or null")
    if not isinstance(record["chain_hash"], str) or not _HEX_HASH.fullmatch(record["chain_hash"]):
        raise ProofError("a leaf's chain_hash is a lowercase SHA-256 hex digest")
