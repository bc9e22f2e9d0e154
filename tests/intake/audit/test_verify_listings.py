"""``intake audit verify`` holds ``audit_listings`` against the events' details.

The listings index is not hashed into the chain, so a database owner who deletes a reference's
rows (triggers bypassed or dropped) hides a staff member's queue view of that patient's request
from "who touched this request" while the chain stays intact. Before the cross-check, verify
said intact; now it names the first event whose rows are missing or extra, and exits 1.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from sqlalchemy import text

from intake.audit.chain import record_event
from intake.audit.checkpoints import write_checkpoint
from intake.compliance import reports
from intake.extensions import db
from tests.intake.audit.test_database_attacker import as_database_owner

VIEWED = "R-7K3M-Q9P2"
OTHER = "R-7K3M-Q9P3"
STRANGER = "R-0000-0000"


def settings():
    from flask import current_app

    return current_app.extensions["intake.settings"]


def listing_trail() -> None:
    """Seq 1 a routed request, 2 a queue view of two requests, 3 a search listing one, then a
    checkpoint (its event is 4)."""
    record_event(db.session, actor="system:test", action="request.routed", reference=VIEWED)
    record_event(
        db.session,
        actor="user:1",
        action="phi.viewed",
        details={"references": [VIEWED, OTHER], "view": "queue"},
    )
    record_event(
        db.session, actor="user:1", action="request.searched", details={"references": [OTHER]}
    )
    db.session.commit()
    assert write_checkpoint(db.session, settings(), actor="system:test") is not None


def as_listings_owner(*statements: str, drop_triggers: bool = False) -> None:
    """Bypass audit_listings' append-only triggers as the schema's owner can, then run SQL."""
    postgres = db.session.get_bind().dialect.name == "postgresql"
    if postgres and not drop_triggers:
        db.session.execute(text("ALTER TABLE audit_listings DISABLE TRIGGER USER"))
    elif postgres:
        db.session.execute(text("DROP TRIGGER audit_listings_no_update_delete ON audit_listings"))
    else:
        db.session.execute(text("DROP TRIGGER audit_listings_no_delete"))
    for statement in statements:
        db.session.execute(text(statement))
    db.session.commit()


def delete_a_reference() -> None:
    as_listings_owner(f"DELETE FROM audit_listings WHERE reference = '{VIEWED}'")


def delete_with_triggers_dropped() -> None:
    as_listings_owner(
        f"DELETE FROM audit_listings WHERE reference = '{VIEWED}'", drop_triggers=True
    )


def add_another_reference() -> None:
    as_listings_owner(f"INSERT INTO audit_listings (reference, seq) VALUES ('{STRANGER}', 2)")


def list_a_non_listing_event() -> None:
    as_listings_owner(f"INSERT INTO audit_listings (reference, seq) VALUES ('{STRANGER}', 1)")


def list_an_event_that_never_was() -> None:
    as_listings_owner(f"INSERT INTO audit_listings (reference, seq) VALUES ('{STRANGER}', 99)")


def list_before_the_chain() -> None:
    as_listings_owner(f"INSERT INTO audit_listings (reference, seq) VALUES ('{STRANGER}', 0)")


def move_a_row_to_the_next_listing() -> None:
    as_listings_owner(
        f"DELETE FROM audit_listings WHERE reference = '{VIEWED}' AND seq = 2",
        f"INSERT INTO audit_listings (reference, seq) VALUES ('{VIEWED}', 3)",
    )


def merge_two_rows_into_one_joined() -> None:
    # Verify reads each event's rows joined by a comma: one row holding both references
    # joined must not pass for the two rows it replaced.
    as_listings_owner(
        "DELETE FROM audit_listings WHERE seq = 2",
        f"INSERT INTO audit_listings (reference, seq) VALUES ('{VIEWED},{OTHER}', 2)",
    )


def add_a_joined_row() -> None:
    as_listings_owner(f"INSERT INTO audit_listings (reference, seq) VALUES ('{VIEWED},', 2)")


def replace_a_row_by_its_bytes() -> None:
    # SQLite keeps a BLOB in a text column: it joins as the same text, yet a search for the
    # reference never finds it. PostgreSQL casts it to text, so the row is found there.
    if db.session.get_bind().dialect.name == "postgresql":
        pytest.skip("PostgreSQL stores text in audit_listings.reference, whatever is inserted")
    as_listings_owner(
        f"DELETE FROM audit_listings WHERE reference = '{VIEWED}' AND seq = 2",
        f"INSERT INTO audit_listings (reference, seq) VALUES (CAST('{VIEWED}' AS BLOB), 2)",
    )


# (attack, first bad seq, what the problem names)
ATTACKS: list[tuple[Callable[[], None], int, str]] = [
    (move_a_row_to_the_next_listing, 2, f"it lists {VIEWED} but audit_listings has no row"),
    (merge_two_rows_into_one_joined, 2, "but audit_listings has no row for that (rows deleted)"),
    (add_a_joined_row, 2, f"audit_listings names {VIEWED},, which the event does not list"),
    (replace_a_row_by_its_bytes, 2, f"it lists {VIEWED} but audit_listings has no row"),
    (delete_a_reference, 2, f"it lists {VIEWED} but audit_listings has no row"),
    (delete_with_triggers_dropped, 2, f"it lists {VIEWED} but audit_listings has no row"),
    (add_another_reference, 2, f"audit_listings names {STRANGER}, which the event does not"),
    (list_a_non_listing_event, 1, f"audit_listings names {STRANGER}, which the event does not"),
    (list_an_event_that_never_was, 99, "names event 99, which the chain does not hold"),
    (list_before_the_chain, 0, "names event 0, which the chain does not hold"),
]


@pytest.mark.parametrize(
    ("attack", "first_bad_seq", "problem"), ATTACKS, ids=[a.__name__ for a, *_ in ATTACKS]
)
def test_verify_names_the_first_event_whose_listings_were_changed(
    app, runner, attack, first_bad_seq, problem
):
    with app.app_context():
        listing_trail()
        attack()
    result = runner.invoke(args=["audit", "verify", "--json"])
    assert result.exit_code == 1, result.output
    out = json.loads(result.stdout)
    assert out["ok"] is False and out["first_bad_seq"] == first_bad_seq, out
    assert out["problem"].startswith("listings index "), out["problem"]
    assert problem in out["problem"], out["problem"]


def test_the_deleted_listing_is_what_the_access_report_lost(app, runner):
    with app.app_context():
        listing_trail()
        before = [row.seq for row in reports.request_events(db.session, [VIEWED])]
        delete_a_reference()
        after = [row.seq for row in reports.request_events(db.session, [VIEWED])]
    assert before == [1, 2] and after == [1]  # the queue view vanished from the report
    result = runner.invoke(args=["audit", "verify"])
    assert result.exit_code == 1
    assert result.output.startswith("AUDIT TRAIL BROKEN at seq 2: listings index")


def test_an_intact_trail_with_listings_verifies(app, runner):
    with app.app_context():
        listing_trail()
    result = runner.invoke(args=["audit", "verify", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["ok"] is True


def test_a_broken_link_before_a_listing_problem_is_named_first(app, runner):
    with app.app_context():
        listing_trail()
        add_another_reference()
        as_database_owner("UPDATE audit_events SET actor = 'x' WHERE seq = 1")
    out = json.loads(runner.invoke(args=["audit", "verify", "--json"]).stdout)
    assert out["ok"] is False and out["first_bad_seq"] == 1, out


def test_listings_of_any_shape_that_record_event_indexed_verify(app, runner):
    """References with the separator verify joins by, repeated ones, and items that are not
    references: each event's rows are exactly what record_event derived, so verify passes."""
    with app.app_context():
        listing_trail()
        record_event(
            db.session,
            actor="user:1",
            action="phi.viewed",
            details={"references": [f"{VIEWED},{OTHER}", VIEWED, VIEWED, 7, None, ""]},
        )
        record_event(db.session, actor="user:1", action="request.searched", details={"n": 1})
        record_event(db.session, actor="user:1", action="phi.viewed", details={"references": "R-1"})
        db.session.commit()
        rows = db.session.execute(text("SELECT reference FROM audit_listings WHERE seq = 5"))
        assert sorted(r for (r,) in rows) == ["", VIEWED, f"{VIEWED},{OTHER}"]
    result = runner.invoke(args=["audit", "verify", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["ok"] is True


def test_a_listing_without_its_joined_reference_is_named(app, runner):
    with app.app_context():
        listing_trail()
        record_event(
            db.session,
            actor="user:1",
            action="phi.viewed",
            details={"references": [f"{VIEWED},{OTHER}", VIEWED]},
        )
        db.session.commit()
        as_listings_owner(f"DELETE FROM audit_listings WHERE reference = '{VIEWED},{OTHER}'")
    out = json.loads(runner.invoke(args=["audit", "verify", "--json"]).stdout)
    assert out["ok"] is False and out["first_bad_seq"] == 5, out
    assert f"it lists {VIEWED},{OTHER} but audit_listings has no row" in out["problem"], out
