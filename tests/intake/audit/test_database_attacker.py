"""An attacker who can change the database, and nothing else, cannot hide a single event.

The attacker is a database owner: they switch off the append-only triggers, then delete,
change, reorder, truncate, forge or rebuild events, each time recomputing the hashes so the
chain itself looks intact. They hold no key and cannot touch files, so the anchor
(intake.audit.anchor) and the checkpoints file are out of reach. Every attack must make
``intake audit verify`` exit 1 naming the first bad event, and make the next checkpoint refuse.

Before issue 12 (no anchor; signing re-verified from the last checkpoint only) every attack on
the events after the last checkpoint went unnoticed: verify said intact and the next checkpoint
signed the result. Only the rebuild of the whole chain was caught, by the last checkpoint. The
``caught_without_anchor`` column records that, and is checked against the chain and the
checkpoints alone.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable

import pytest
from sqlalchemy import select, text

from intake.audit import anchor
from intake.audit.chain import GENESIS_HASH, event_hash, record_event
from intake.audit.checkpoints import (
    CheckpointError,
    checkpoints_path,
    verify_trail,
    write_checkpoint,
)
from intake.extensions import db
from intake.models import AuditEvent


def settings():
    from flask import current_app

    return current_app.extensions["intake.settings"]


def write_events(count: int, start: int = 0) -> None:
    for index in range(start, start + count):
        record_event(
            db.session,
            actor="system:test",
            action="request.routed",
            reference=f"R-0000-00{index:02d}",
            details={"n": index, "team": "ivig"},
        )
    db.session.commit()


def as_database_owner(*statements: str) -> None:
    """Switch off the append-only triggers as the database owner can, then run SQL."""
    if db.session.get_bind().dialect.name == "postgresql":
        db.session.execute(text("ALTER TABLE audit_events DISABLE TRIGGER USER"))
    else:
        db.session.execute(text("DROP TRIGGER IF EXISTS audit_events_no_update"))
        db.session.execute(text("DROP TRIGGER IF EXISTS audit_events_no_delete"))
    for statement in statements:
        db.session.execute(text(statement))
    db.session.commit()


def rehash_from(seq: int) -> None:
    """Recompute every link from ``seq`` on, so the chain verifies on its own."""
    before = db.session.scalar(select(AuditEvent.hash).where(AuditEvent.seq == seq - 1))
    prev = before or GENESIS_HASH
    for event in db.session.scalars(
        select(AuditEvent).where(AuditEvent.seq >= seq).order_by(AuditEvent.seq)
    ):
        event.prev_hash = prev
        event.hash = prev = event_hash(prev, event)
    db.session.commit()


def delete_newest() -> None:
    as_database_owner("DELETE FROM audit_events WHERE seq = 9")


def change_newest() -> None:
    as_database_owner("UPDATE audit_events SET reference = 'R-FAKE-FAKE' WHERE seq = 9")
    rehash_from(9)


def reorder_two_newest() -> None:
    as_database_owner(
        "UPDATE audit_events SET seq = -1 WHERE seq = 8",
        "UPDATE audit_events SET seq = 8 WHERE seq = 9",
        "UPDATE audit_events SET seq = 9 WHERE seq = -1",
    )
    rehash_from(8)


def truncate_several() -> None:
    as_database_owner("DELETE FROM audit_events WHERE seq >= 7")


def forge_at_the_tail() -> None:
    as_database_owner()
    head = db.session.scalars(select(AuditEvent).order_by(AuditEvent.seq.desc())).first()
    assert head is not None
    forged = AuditEvent(
        seq=10,
        created_at=head.created_at,
        actor="user:1",
        action="phi.viewed",
        reference="R-0000-0007",
        outcome="success",
        details="{}",
        prev_hash=head.hash,
    )
    forged.hash = event_hash(head.hash, forged)
    db.session.add(forged)
    db.session.commit()


def rebuild_the_whole_chain() -> None:
    as_database_owner("UPDATE audit_events SET actor = 'system:other' WHERE seq = 2")
    rehash_from(1)


# (attack, first bad seq, what verify says, caught by the chain and checkpoints alone)
ATTACKS: list[tuple[Callable[[], None], int, str, bool]] = [
    (delete_newest, 9, "missing event", False),
    (change_newest, 9, "event changed or replaced", False),
    (reorder_two_newest, 8, "event changed or replaced", False),
    (truncate_several, 7, "missing event", False),
    (forge_at_the_tail, 10, "event not in the anchor", False),
    (rebuild_the_whole_chain, 2, "event changed or replaced", True),
]


def prepare_trail() -> None:
    """Events 1-5, a checkpoint over them (its event is 6), then events 7-9 not yet signed."""
    write_events(5)
    assert write_checkpoint(db.session, settings(), actor="system:test") is not None
    write_events(3, start=5)


@pytest.mark.parametrize(
    ("attack", "first_bad_seq", "problem", "caught_without_anchor"),
    ATTACKS,
    ids=[attack.__name__ for attack, *_ in ATTACKS],
)
def test_a_database_attack_is_named_and_never_signed(
    app, runner, attack, first_bad_seq, problem, caught_without_anchor
):
    with app.app_context():
        prepare_trail()
        lines = checkpoints_path(settings()).read_text()
        attack()
        # The chain and the checkpoints alone (the code before issue 12, but for staleness).
        alone = verify_trail(db.session, settings(), with_anchor=False).chain
        db.session.rollback()
        assert alone.ok is not caught_without_anchor, alone
        with pytest.raises(CheckpointError, match=f"audit anchor at seq {first_bad_seq}: "):
            write_checkpoint(db.session, settings(), actor="system:test")
        assert checkpoints_path(settings()).read_text() == lines  # nothing signed
    result = runner.invoke(args=["audit", "verify", "--json"])
    assert result.exit_code == 1, result.output
    out = json.loads(result.stdout)
    assert {"ok", "events", "first_bad_seq", "problem"} <= set(out)
    assert out["ok"] is False and out["first_bad_seq"] == first_bad_seq
    assert out["problem"].startswith(problem), out["problem"]
    plain = runner.invoke(args=["audit", "verify"])
    assert plain.exit_code == 1
    assert plain.output.startswith(f"AUDIT TRAIL BROKEN at seq {first_bad_seq}: ")


def test_an_intact_trail_matches_its_anchor(app, runner):
    with app.app_context():
        prepare_trail()
        report = anchor.compare(db.session, anchor.anchor_for(settings()))
        assert report.ok and report.events == 9
        path = anchor.anchor_path(settings())
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        kinds = [line.split(" ")[0] for line in path.read_text().splitlines()]
        assert kinds.count("p") == kinds.count("c") == 9 and kinds[0] == "b"
        db.session.rollback()
    result = runner.invoke(args=["audit", "verify"])
    assert result.exit_code == 0 and result.output.startswith("Audit trail intact")


def test_a_rolled_back_event_leaves_a_harmless_prepared_line(app):
    with app.app_context():
        prepare_trail()
        record_event(db.session, actor="system:test", action="request.routed", details={"n": 99})
        db.session.rollback()  # its seq (10) is used again by the next event
        write_events(1, start=20)
        lines = anchor.anchor_path(settings()).read_text().splitlines()
        assert len([line for line in lines if line.startswith("p 10 ")]) == 2
        assert len([line for line in lines if line.startswith("c 10 ")]) == 1
        assert anchor.compare(db.session, anchor.anchor_for(settings())).ok


def test_an_event_whose_committed_line_was_lost_is_vouched_for_by_its_prepared_line(app):
    with app.app_context():
        prepare_trail()
        path = anchor.anchor_path(settings())
        # A crash between the commit and the committed line: only "p 9" remains.
        kept = [line for line in path.read_text().splitlines() if not line.startswith("c 9 ")]
        path.write_text("\n".join(kept) + "\n")
        assert anchor.compare(db.session, anchor.anchor_for(settings())).ok
        # ... which also means that deleting event 9 now is not seen by the anchor, only by a
        # committed line: say so plainly rather than pretend.
        delete_newest()
        assert anchor.compare(db.session, anchor.anchor_for(settings())).ok


def test_the_signer_reads_only_the_anchor_written_since_its_last_checkpoint(app):
    from intake.audit.checkpoints import AnchorCursor

    with app.app_context():
        cursor = AnchorCursor()
        write_events(5)
        assert write_checkpoint(db.session, settings(), actor="t", cursor=cursor) is not None
        assert cursor.mark is not None and cursor.mark.seq == 5 and cursor.mark.offset > 0
        write_events(3, start=5)
        since = anchor.compare(db.session, anchor.anchor_for(settings()), since=cursor.mark)
        assert since.ok and since.end > cursor.mark.offset
        delete_newest()
        with pytest.raises(CheckpointError, match="audit anchor at seq 9: missing event"):
            write_checkpoint(db.session, settings(), actor="t", cursor=cursor)
        assert cursor.mark is None  # after a refusal, compare everything again


def test_a_missing_anchor_fails_verify(app, runner):
    with app.app_context():
        prepare_trail()
        os.unlink(anchor.anchor_path(settings()))
        with pytest.raises(CheckpointError, match="anchor missing"):
            write_checkpoint(db.session, settings(), actor="system:test")
    result = runner.invoke(args=["audit", "verify", "--json"])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["problem"].startswith("anchor missing: ")


def test_missing_checkpoints_fail_verify(app, runner):
    with app.app_context():
        write_events(3)
    result = runner.invoke(args=["audit", "verify", "--json"])
    assert result.exit_code == 1
    out = json.loads(result.stdout)
    assert out["first_bad_seq"] == 1 and out["problem"].startswith("no signed checkpoints: ")


def test_events_left_unsigned_too_long_fail_verify_as_stale(app, runner, monkeypatch):
    from datetime import timedelta

    from intake.audit import checkpoints
    from intake.clock import now

    with app.app_context():
        prepare_trail()
        signed_at = json.loads(checkpoints_path(settings()).read_text().splitlines()[-1])["time"]
    later = now() + timedelta(seconds=settings_of(app).max_unsigned_seconds + 5)
    monkeypatch.setattr(checkpoints, "now", lambda: later)
    result = runner.invoke(args=["audit", "verify", "--json"])
    assert result.exit_code == 1
    out = json.loads(result.stdout)
    assert out["first_bad_seq"] == 7  # 6 is the checkpoint's own event: it never waits
    assert out["problem"].startswith("stale: event 7 (written ")
    assert f"not been signed since {signed_at}" in out["problem"]


def test_only_the_checkpoints_own_event_after_it_is_not_stale(app, runner, monkeypatch):
    from datetime import timedelta

    from intake.audit import checkpoints
    from intake.clock import now

    with app.app_context():
        write_events(5)
        write_checkpoint(db.session, settings(), actor="system:test")
    later = now() + timedelta(seconds=settings_of(app).max_unsigned_seconds + 5)
    monkeypatch.setattr(checkpoints, "now", lambda: later)
    result = runner.invoke(args=["audit", "verify", "--json"])
    assert result.exit_code == 0, result.output


def test_the_staleness_limit_is_a_setting(settings):
    from config import Settings

    assert settings.max_unsigned_seconds == 3 * settings.audit_checkpoint_seconds
    env = {"INTAKE_AUDIT_MAX_UNSIGNED_SECONDS": "60", "INTAKE_AUDIT_ANCHOR": "/x/anchor.log"}
    configured = Settings.from_env(env)
    assert configured.max_unsigned_seconds == 60
    assert str(anchor.anchor_path(configured)) == "/x/anchor.log"


def settings_of(app):
    return app.extensions["intake.settings"]
