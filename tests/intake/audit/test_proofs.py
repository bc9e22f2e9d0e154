"""Proofs an outsider checks with the public key alone: signed Merkle tree heads over the chain,
inclusion proofs for a request's events, consistency proofs between checkpoints.

The verifier is the standalone one, run as the auditor would (``intake-verify`` in a
subprocess: no database, no app), and every proof must fail after any one-bit change.
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

from sqlalchemy import insert, select

from intake.audit import anchor, checkpoints, keys, proofs, tree
from intake.audit.chain import GENESIS_HASH, _canonical, format_time, record_event
from intake.audit.checkpoints import verify_trail, write_checkpoint
from intake.clock import utcnow
from intake.extensions import db
from intake.models import AuditEvent
from intake_verify import leaf, merkle
from intake_verify.proof import verify_proof

# The auditor's command, as installed by the package (pyproject: intake-verify).
VERIFY = [str(Path(sys.executable).parent / "intake-verify")]
TEAMS = ("ivig", "ivig-es", "specialty", None)


def settings():
    from flask import current_app

    return current_app.extensions["intake.settings"]


def vkey() -> str:
    return checkpoints.trusted_verifiers(settings())[0].vkey


def bulk_events(count: int, references: int = 500, start: int = 1, prev: str = GENESIS_HASH):
    """Append ``count`` hash-chained events straight into the table (fast), as record_event
    would write them; one request in ``references`` per event, some with a team."""
    rows = []
    base = utcnow().replace(microsecond=0) - timedelta(days=1)
    for seq in range(start, start + count):
        at = base + timedelta(milliseconds=seq)
        team = TEAMS[seq % len(TEAMS)]
        details = json.dumps({"team": team} if team else {"n": seq}, separators=(",", ":"))
        action = "phi.viewed" if seq % 3 == 0 else "request.routed"
        reference = f"R-{seq % references:04d}-TEST"
        fields = (
            seq,
            format_time(at),
            "user:7",
            "staff",
            action,
            reference,
            "success",
            details,
            None,
        )
        digest = hashlib.sha256(f"{prev}\n{_canonical(*fields)}".encode()).hexdigest()
        rows.append(
            {
                "seq": seq,
                "created_at": at,
                "actor": "user:7",
                "actor_role": "staff",
                "action": action,
                "reference": reference,
                "outcome": "success",
                "details": details,
                "ip_hmac": None,
                "prev_hash": prev,
                "hash": digest,
            }
        )
        prev = digest
    for index in range(0, len(rows), 5000):
        db.session.execute(insert(AuditEvent.__table__), rows[index : index + 5000])
    # What record_event does for each event: its (seq, hash) goes to the anchor too.
    entries = [(row["seq"], row["hash"]) for row in rows]
    sink = anchor.anchor_for(settings())
    sink.prepare(entries)
    db.session.commit()
    sink.commit(entries)
    return prev


def sign():
    signed = write_checkpoint(db.session, settings(), actor="system:test")
    assert signed is not None
    return signed


def run_verifier(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*VERIFY, *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )


def test_the_fast_leaf_is_the_standalone_verifiers_leaf(app):
    with app.app_context():
        record_event(
            db.session,
            actor="user:1",
            actor_role="staff",
            action="phi.viewed",
            reference="R-AAAA-BBBB",
            details={"team": "ivig-es", "notes": 2},
        )
        record_event(db.session, actor="patient", action="status.looked_up", details={})
        db.session.commit()
        rows = list(tree._stored_rows(db.session, 0))
        for row in rows:
            record = tree.row_record(row)
            assert tree.row_leaf_hash(row) == merkle.leaf_hash(leaf.leaf_data(record))
        assert [tree.row_record(r)["team"] for r in rows] == ["ivig-es", None]


def test_checkpoints_are_signed_tree_heads_that_extend_their_compact_range(app):
    with app.app_context():
        bulk_events(37)
        first = sign()
        assert first.note.startswith(keys.log_origin(settings()) + "\n37\n")
        record_event(db.session, actor="system:test", action="request.routed", details={})
        db.session.commit()
        second = sign()
        heads = checkpoints.signed_heads(settings())
        assert [h.size for h in heads] == [37, 39]
        rows = list(tree._stored_rows(db.session, 0))
        db.session.rollback()
        assert heads[1].root == merkle.MerkleTree(map(tree.row_leaf_hash, rows)).root(39)
        assert second.compact and heads[1].compact_range() is not None
        report = verify_trail(db.session, settings())
        assert report.chain.ok and report.latest.size == 39


def test_version_1_lines_still_verify_and_the_next_checkpoint_hashes_the_whole_tree(app):
    with app.app_context():
        bulk_events(10)
        key = checkpoints.signing_key(settings())
        head = db.session.execute(
            select(AuditEvent.seq, AuditEvent.hash).order_by(AuditEvent.seq.desc()).limit(1)
        ).one()
        old = checkpoints.Checkpoint(
            head.seq,
            head.hash,
            head.seq,
            "2026-01-01T00:00:00.000000Z",
            checkpoints.key_id(key.public_key()),
        )
        import base64

        line = checkpoints.Checkpoint(
            **{**old.__dict__, "signature": base64.b64encode(key.sign(old.signed_bytes())).decode()}
        ).to_line()
        checkpoints.checkpoints_path(settings()).write_text(line)
        record_event(db.session, actor="system:test", action="request.routed", details={})
        db.session.commit()
        sign()
        report = verify_trail(db.session, settings())
        assert report.chain.ok, report.chain.problem
        assert report.chain.checkpoints == 2 and report.latest.size == 11


def test_a_signed_root_that_is_not_this_chains_fails_verification(app):
    with app.app_context():
        bulk_events(20)
        sign()
        path = checkpoints.checkpoints_path(settings())
        line = json.loads(path.read_text())
        # The key holder signs a tree head whose root is not the chain's (same head hash).
        signer = keys.AuditSigner(keys.log_origin(settings()), checkpoints.signing_key(settings()))
        from intake_verify import checkpoint as tlog
        from intake_verify import note

        body = tlog.Checkpoint(signer.name, 20, b"\x07" * 32, ("time 2026-01-01T00:00:00Z",))
        line["note"] = note.sign_note(body.body(), signer.note_signer())
        path.write_text(json.dumps(line) + "\n")
        report = verify_trail(db.session, settings()).chain
        assert not report.ok and report.first_bad_seq == 20
        assert "signed Merkle root is not the root of this chain" in report.problem


def flip_bit(text: str, rng: random.Random, avoid: tuple[int, int]) -> bytes:
    raw = bytearray(text.encode())
    while True:
        position = rng.randrange(len(raw))
        if not avoid[0] <= position < avoid[1]:
            break
    raw[position] ^= 1 << rng.randrange(8)
    return bytes(raw)


def test_proofs_of_random_events_over_100000_verify_offline_and_fail_after_any_bit_flip(
    app, tmp_path, backend, monkeypatch
):
    rng = random.Random(12)
    hashed = []
    leaf_hash = tree.row_leaf_hash
    monkeypatch.setattr(tree, "row_leaf_hash", lambda row: hashed.append(1) or leaf_hash(row))
    with app.app_context():
        bulk_events(100_000)
        started = time.perf_counter()
        sign()
        signing = time.perf_counter() - started
        record_event(
            db.session,
            actor="user:7",
            action="phi.viewed",
            reference="R-0042-TEST",
            details={"team": "ivig"},
        )
        db.session.commit()
        tree.forget_trees()
        references = ["R-0042-TEST", *(f"R-{rng.randrange(500):04d}-TEST" for _ in range(3))]
        timings, leaves_hashed, built = [], [], []
        for reference in references:
            hashed.clear()
            started = time.perf_counter()
            proof = proofs.build_request_proof(db.session, settings(), reference, openings=True)
            timings.append(time.perf_counter() - started)
            leaves_hashed.append(len(hashed))
            built.append(proof)
        db.session.rollback()
        key = vkey()
    print(
        f"\n{backend}: sign 100k {signing:.2f}s; proofs {', '.join(f'{t:.3f}s' for t in timings)}"
    )
    assert built[0].pending == 1 and len(built[0].events) == 200
    # The first proof builds the tree (every leaf hashed once); later ones only walk the
    # process's cached tree, O(log n) node hashes per event and no leaf hashed again.
    assert leaves_hashed == [100_000, 0, 0, 0]
    for proof in built:
        path = tmp_path / proof.filename
        path.write_text(proof.to_json())
        checked = run_verifier("proof", path, "--key", key)
        assert checked.returncode == 0, checked.stdout + checked.stderr
    text = built[1].to_json()
    # ``pending`` is the log's word, not signed (intake_verify.proof): every other byte counts.
    at = text.index('"pending"')
    avoid = (at, text.index("\n", at))
    for _ in range(300):
        report = verify_proof(flip_bit(text, rng, avoid), [key])
        assert not report.ok
    for n in range(3):
        path = tmp_path / f"flipped-{n}.json"
        path.write_bytes(flip_bit(text, rng, avoid))
        assert run_verifier("proof", path, "--key", key).returncode == 1


def test_consistency_proofs_between_checkpoints_verify_offline(app, runner, tmp_path):
    with app.app_context():
        prev = bulk_events(1000)
        sign()
        prev = bulk_events(777, start=1002, prev=_after_checkpoint_event(prev))
        sign()
        sizes = [h.size for h in checkpoints.signed_heads(settings())]
    assert sizes == [1000, 1778]
    result = runner.invoke(args=["audit", "consistency", "1000", "1778", "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()
    checked = run_verifier(
        "consistency",
        tmp_path / "checkpoint-1000.note",
        tmp_path / "checkpoint-1778.note",
        tmp_path / "consistency-1000-1778.proof",
        "--key",
        _vkey_in(app),
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    proof = (tmp_path / "consistency-1000-1778.proof").read_text().splitlines()
    proof[1] = proof[1][:5] + ("A" if proof[1][5] != "A" else "B") + proof[1][6:]
    (tmp_path / "bad.proof").write_text("\n".join(proof) + "\n")
    bad = run_verifier(
        "consistency",
        tmp_path / "checkpoint-1000.note",
        tmp_path / "checkpoint-1778.note",
        tmp_path / "bad.proof",
        "--key",
        _vkey_in(app),
    )
    assert bad.returncode == 1


def _after_checkpoint_event(prev: str) -> str:
    """The hash of seq 1001, the audit.checkpointed event the first checkpoint recorded."""
    return db.session.scalar(select(AuditEvent.hash).where(AuditEvent.seq == 1001))


def _vkey_in(app) -> str:
    with app.app_context():
        return vkey()


def test_prove_writes_a_proof_file_and_records_the_export(app, runner, tmp_path):
    with app.app_context():
        bulk_events(50, references=5)
        sign()
    out = tmp_path / "proof.json"
    result = runner.invoke(args=["audit", "prove", "R-0003-TEST", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "10 events of R-0003-TEST" in result.output
    data = json.loads(out.read_text())
    assert all("opening" in event for event in data["events"])
    assert run_verifier("proof", out, "--key", _vkey_in(app)).returncode == 0
    with app.app_context():
        exported = db.session.execute(
            select(AuditEvent).where(AuditEvent.action == "audit.exported")
        ).scalar_one()
        assert exported.reference == "R-0003-TEST"
        assert json.loads(exported.details)["export"] == "proof"


def test_no_proof_before_the_first_signed_tree_head(app, runner):
    with app.app_context():
        bulk_events(5)
    result = runner.invoke(args=["audit", "prove", "R-0001-TEST"])
    assert result.exit_code == 1
    assert "no signed Merkle checkpoint yet" in result.output
