"""Proof files: they verify offline with the public key alone, and fail after any one-bit change."""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Iterator
from typing import Any

import pytest

from intake_verify.leaf import LEAF_PREFIX, check_opening, leaf_data
from intake_verify.merkle import ProofError
from intake_verify.note import generate_key
from intake_verify.proof import verify_proof

from .conftest import ORIGIN, REFERENCE, SIZE, AuditLog

Path = tuple[str | int, ...]


def test_a_proof_verifies_with_the_public_key_alone(audit_log: AuditLog) -> None:
    text = json.dumps(audit_log.proof())
    report = verify_proof(text, [audit_log.log_vkey], [audit_log.witness_vkey])
    assert report.ok, report.problem
    assert [e["seq"] for e in report.events] == audit_log.request_seqs
    assert {e["team"] for e in report.events} == {"ivig-es"}
    assert (report.size, report.origin, report.reference) == (SIZE, ORIGIN, REFERENCE)
    assert report.cosigned_by == ("witness.example/w1",)
    assert report.checkpoint_time is not None and report.pending == 2


def test_a_proof_without_openings_verifies(audit_log: AuditLog) -> None:
    assert verify_proof(audit_log.proof(with_openings=False), [audit_log.log_vkey]).ok


def test_another_log_key_or_a_missing_witness_is_refused(audit_log: AuditLog) -> None:
    _, stranger = generate_key(ORIGIN)
    report = verify_proof(audit_log.proof(), [stranger])
    assert not report.ok and "not signed by a trusted key" in str(report.problem)
    # The log key rotated: the old one still verifies old checkpoints.
    assert verify_proof(audit_log.proof(), [stranger, audit_log.log_vkey]).ok
    _, other_witness = generate_key("witness.example/w2", 0x04)
    report = verify_proof(audit_log.proof(), [audit_log.log_vkey], [other_witness])
    assert not report.ok and "witness.example/w2" in str(report.problem)


def test_an_event_of_another_request_is_refused(audit_log: AuditLog) -> None:
    proof = audit_log.proof()
    seq = audit_log.request_seqs[0] + 1
    proof["events"].insert(
        1,
        {
            "leaf_index": seq - 1,
            "leaf": audit_log.records[seq - 1],
            "inclusion": [],
        },
    )
    report = verify_proof(proof, [audit_log.log_vkey])
    assert not report.ok and "is not an event of" in str(report.problem)


def values(node: Any, path: Path = ()) -> Iterator[tuple[Path, Any]]:
    """Every leaf value of a JSON document with its path."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from values(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from values(value, (*path, i))
    else:
        yield path, node


def with_value(doc: dict[str, Any], path: Path, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    node: Any = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return out


def one_bit_changes(value: Any, rng: random.Random, samples: int) -> Iterator[Any]:
    """Values that differ from ``value`` in one bit of its JSON content."""
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, int):
        for bit in range(min(samples, 24)):
            yield value ^ (1 << bit)
        return
    assert isinstance(value, str)
    for _ in range(samples):
        i = rng.randrange(len(value))
        # Bits of the character's UTF-8 encoding for ASCII, of its code point otherwise.
        bit = rng.randrange(7 if ord(value[i]) < 128 else 16)
        yield value[:i] + chr(ord(value[i]) ^ (1 << bit)) + value[i + 1 :]


def test_any_one_bit_change_of_a_value_fails(audit_log: AuditLog) -> None:
    rng = random.Random(1212)
    proof = audit_log.proof()
    keys = ([audit_log.log_vkey], [audit_log.witness_vkey])
    tried = 0
    for path, value in values(proof):
        if path == ("pending",):
            continue  # the log's unproven word, see test_pending_is_reported_as_unproven
        samples = 400 if path == ("checkpoint",) else 24
        for changed in one_bit_changes(value, rng, samples):
            report = verify_proof(with_value(proof, path, changed), *keys)
            assert not report.ok, f"changing {path} to {changed!r} went unnoticed"
            tried += 1
    assert tried > 2000


def test_any_one_bit_change_of_the_file_fails(audit_log: AuditLog) -> None:
    """The same over the bytes of the file, as an attacker editing it would change them."""
    rng = random.Random(99)
    text = json.dumps(audit_log.proof()).encode()
    keys = ([audit_log.log_vkey], [audit_log.witness_vkey])
    pending_at = text.index(b'"pending": ') + len(b'"pending": ')
    for _ in range(1500):
        i = rng.randrange(len(text))
        if i == pending_at:
            continue
        changed = bytearray(text)
        changed[i] ^= 1 << rng.randrange(8)
        try:
            report = verify_proof(bytes(changed), *keys)
        except UnicodeDecodeError:
            continue  # not text any more: json.loads refuses it before the verifier sees it
        assert not report.ok, f"flipping a bit at {i} went unnoticed"


def test_pending_is_reported_as_unproven(audit_log: AuditLog) -> None:
    proof = audit_log.proof()
    proof["pending"] = 3
    report = verify_proof(proof, [audit_log.log_vkey])
    assert report.ok and report.pending == 3
    proof["pending"] = -1
    assert not verify_proof(proof, [audit_log.log_vkey]).ok
    proof["pending"] = True
    assert not verify_proof(proof, [audit_log.log_vkey]).ok


def test_structure_problems_are_reports_not_crashes(audit_log: AuditLog) -> None:
    proof = audit_log.proof()
    broken: list[Any] = [
        "not json",
        "[]",
        json.dumps(proof).replace('"pending"', '"pending": 1, "pending"'),  # repeated key
        {**proof, "extra": 1},
        {**proof, "events": {}},
        {**proof, "events": [{}]},
        {**proof, "events": [{**proof["events"][0], "leaf": {}}]},
        {**proof, "events": [{**proof["events"][0], "inclusion": [1]}]},
        {**proof, "events": [{**proof["events"][0], "opening": {"prev_hash": "0"}}]},
        {**proof, "events": [proof["events"][1], proof["events"][0]]},  # out of order
        {**proof, "events": [proof["events"][0], proof["events"][0]]},  # repeated
        {**proof, "checkpoint": 5},
    ]
    for data in broken:
        report = verify_proof(data, [audit_log.log_vkey])
        assert not report.ok and report.problem


def test_leaf_encoding_and_openings(audit_log: AuditLog) -> None:
    seq = audit_log.request_seqs[0]
    record = audit_log.records[seq - 1]
    data = leaf_data(record)
    assert data.startswith(LEAF_PREFIX)
    assert json.loads(data[len(LEAF_PREFIX) :]) == record
    prev_hash, canonical = audit_log.openings[seq]
    check_opening(record, prev_hash, canonical)
    other_team = {**record, "team": "oncology"}  # the team is the log's word: not in the chain
    check_opening(other_team, prev_hash, canonical)
    with pytest.raises(ProofError, match="does not hash"):
        check_opening(record, prev_hash, canonical.replace("staff:17", "staff:18"))
    # An opening whose hash matches but whose public fields are not the leaf's.
    for key, value in [("action", "request.viewed"), ("seq", seq + 1), ("actor_role", None)]:
        with pytest.raises(ProofError, match="differs"):
            check_opening({**record, key: value}, prev_hash, canonical)
    with pytest.raises(ProofError):
        leaf_data({**record, "extra": 1})
    with pytest.raises(ProofError):
        leaf_data({**record, "chain_hash": record["chain_hash"].upper()})
