"""Attacks on the issue 12 audit trail (anchor, signer, proofs) that the mutation suite missed.

Each test is an attack that worked before its fix: the database attacker (full SQL, no files,
no keys), a misconfiguration an operator would plausibly make.
"""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select

from intake.audit import anchor
from intake.audit.chain import event_hash, record_event
from intake.audit.checkpoints import CheckpointError, verify_trail, write_checkpoint
from intake.extensions import db
from intake.models import AuditEvent
from tests.intake.audit.test_database_attacker import (
    as_database_owner,
    prepare_trail,
    settings,
)

FAR_AHEAD = 2**60


def insert_far_ahead() -> None:
    """Forge one event with a seq far beyond the head: Intake's next event follows it."""
    as_database_owner()
    head = db.session.scalars(select(AuditEvent).order_by(AuditEvent.seq.desc())).first()
    assert head is not None
    forged = AuditEvent(
        seq=FAR_AHEAD,
        created_at=head.created_at,
        actor="system:test",
        action="request.routed",
        reference=None,
        outcome="success",
        details="{}",
        prev_hash=head.hash,
    )
    forged.hash = event_hash(head.hash, forged)
    db.session.add(forged)
    db.session.commit()
    # The app keeps working: its next event takes seq FAR_AHEAD + 1, and the anchor records it.
    record_event(db.session, actor="system:test", action="request.routed", details={"n": 1})
    db.session.commit()


def test_a_seq_far_ahead_is_refused_not_a_crash_of_the_signer_and_verify(app, runner):
    """Before: the anchor's table (32 bytes per seq) was grown to the forged seq, so compare
    raised OverflowError (or, for a seq like 10**9, tried to allocate 32 GB): the signer
    died instead of refusing, and verify crashed instead of naming the event."""
    with app.app_context():
        prepare_trail()
        insert_far_ahead()
        report = anchor.compare(db.session, anchor.anchor_for(settings()))
        assert not report.ok and report.first_bad_seq == 10, report
        with pytest.raises(CheckpointError, match="audit anchor at seq 10: "):
            write_checkpoint(db.session, settings(), actor="system:test")
        db.session.rollback()
        assert not verify_trail(db.session, settings()).chain.ok
    result = runner.invoke(args=["audit", "verify", "--json"])
    assert result.exit_code == 1, result.output
    assert json.loads(result.stdout)["first_bad_seq"] == 10


# -- misconfiguration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "why"),
    [
        ("not-a-key", "INTAKE_AUDIT_WITNESSES: the key of https://w.example"),
        ("LOG", "not a witness (cosignature, type 0x04) key"),
    ],
    ids=["garbage", "the log's own key"],
)
def test_a_witness_key_that_can_never_verify_is_refused_at_start(key, why):
    """Before: any text passed for the key. Every cosignature was then dropped as bad (a log
    line per checkpoint), verify named no witness, and nothing told the operator why; with
    the log's own public key pasted in (a natural slip), no cosignature could ever verify."""
    from config import Settings
    from config.settings import SettingsError
    from intake_verify import note

    _skey, log_vkey = note.generate_key("pharmacy.example/intake-audit")
    entry = f"https://w.example {log_vkey if key == 'LOG' else key}"
    with pytest.raises(SettingsError, match=why.replace("(", r"\(").replace(")", r"\)")):
        Settings.from_env({"INTAKE_AUDIT_WITNESSES": entry})
    _wskey, witness_vkey = note.generate_key("w.example", note.ALG_COSIGNATURE_V1)
    configured = Settings.from_env({"INTAKE_AUDIT_WITNESSES": f"https://w.example {witness_vkey}"})
    assert configured.audit_witnesses == (f"https://w.example {witness_vkey}",)
