"""Attacks on verify's grouped listings check (intake.audit.listings.ListingCheck).

The check reads each event's ``audit_listings`` rows joined into one string with their row
count, and trusts the joined text when it splits into exactly that many pieces. A database
owner can do more than insert and delete rows: drop the primary key and the NOT NULL, store
values of another type (SQLite), use odd characters. Each attack must still be named by
``intake audit verify`` at the event it changed, as the per-row check before it did.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from sqlalchemy import text

from intake.extensions import db
from tests.intake.audit.test_verify_listings import (
    OTHER,
    STRANGER,
    VIEWED,
    as_listings_owner,
    listing_trail,
)


def postgres() -> bool:
    return db.session.get_bind().dialect.name == "postgresql"


def without_constraints(*statements: str) -> None:
    """Take the primary key and NOT NULL off audit_listings, as its owner can, then run SQL."""
    if postgres():
        as_listings_owner(
            "ALTER TABLE audit_listings DROP CONSTRAINT pk_audit_listings",
            "ALTER TABLE audit_listings ALTER COLUMN reference DROP NOT NULL",
            *statements,
        )
        return
    as_listings_owner(
        "ALTER TABLE audit_listings RENAME TO audit_listings_old",
        "CREATE TABLE audit_listings (reference VARCHAR(64), seq BIGINT)",
        "INSERT INTO audit_listings SELECT reference, seq FROM audit_listings_old",
        "DROP TABLE audit_listings_old",
        *statements,
    )


def merge_two_rows_beside_a_null() -> None:
    # string_agg skips NULL, count(*) does not: "A,B" plus a NULL row split into two pieces
    # for two rows, exactly the two rows they replaced.
    without_constraints(
        "DELETE FROM audit_listings WHERE seq = 2",
        f"INSERT INTO audit_listings (reference, seq) VALUES ('{VIEWED},{OTHER}', 2)",
        "INSERT INTO audit_listings (reference, seq) VALUES (NULL, 2)",
    )


def add_a_null_row() -> None:
    without_constraints("INSERT INTO audit_listings (reference, seq) VALUES (NULL, 2)")


def duplicate_a_row() -> None:
    without_constraints(f"INSERT INTO audit_listings (reference, seq) VALUES ('{VIEWED}', 2)")


def add_an_empty_reference() -> None:
    as_listings_owner("INSERT INTO audit_listings (reference, seq) VALUES ('', 2)")


def replace_a_reference_by_one_with_a_nul() -> None:
    if postgres():
        pytest.skip("PostgreSQL text cannot hold NUL")
    as_listings_owner(
        f"DELETE FROM audit_listings WHERE reference = '{VIEWED}' AND seq = 2",
        f"INSERT INTO audit_listings (reference, seq) VALUES ('{VIEWED}' || char(0), 2)",
    )


def add_a_reference_in_other_case() -> None:
    as_listings_owner(f"INSERT INTO audit_listings (reference, seq) VALUES ('{VIEWED.lower()}', 2)")


def move_a_row_onto_a_non_listing_event() -> None:
    as_listings_owner(
        f"DELETE FROM audit_listings WHERE reference = '{OTHER}' AND seq = 3",
        f"INSERT INTO audit_listings (reference, seq) VALUES ('{OTHER}', 1)",
    )


def add_a_row_far_past_the_end() -> None:
    as_listings_owner(f"INSERT INTO audit_listings (reference, seq) VALUES ('{STRANGER}', {2**62})")


def add_a_row_before_the_start() -> None:
    as_listings_owner(f"INSERT INTO audit_listings (reference, seq) VALUES ('{STRANGER}', -5)")


def add_a_blob_beside_its_text() -> None:
    if postgres():
        pytest.skip("PostgreSQL stores text in audit_listings.reference")
    as_listings_owner(
        f"INSERT INTO audit_listings (reference, seq) VALUES (CAST('{VIEWED}' AS BLOB), 2)"
    )


def sqlite_only() -> None:
    if postgres():
        pytest.skip("PostgreSQL's BIGINT seq holds integers only")


def add_a_row_with_a_text_seq() -> None:
    # SQLite keeps text that is no number in the INTEGER column; it sorts after every seq.
    sqlite_only()
    as_listings_owner(f"INSERT INTO audit_listings (reference, seq) VALUES ('{STRANGER}', 'x')")


def add_a_text_seq_and_one_past_the_end() -> None:
    sqlite_only()
    as_listings_owner(
        f"INSERT INTO audit_listings (reference, seq) VALUES ('{STRANGER}', 'x')",
        f"INSERT INTO audit_listings (reference, seq) VALUES ('{STRANGER}', 99)",
    )


def add_a_row_with_a_blob_seq() -> None:
    sqlite_only()
    as_listings_owner(f"INSERT INTO audit_listings (reference, seq) VALUES ('{STRANGER}', x'02')")


def add_a_row_with_a_fractional_seq() -> None:
    sqlite_only()
    as_listings_owner(f"INSERT INTO audit_listings (reference, seq) VALUES ('{STRANGER}', 2.5)")


# (attack, first bad seq, what the problem names)
ATTACKS: list[tuple[Callable[[], None], float | None, str]] = [
    (merge_two_rows_beside_a_null, 2, "listings index does not match event 2"),
    (add_a_null_row, 2, "listings index does not match event 2"),
    (duplicate_a_row, 2, "audit_listings holds one of its rows twice (rows added)"),
    (add_an_empty_reference, 2, "audit_listings names , which the event does not list"),
    (replace_a_reference_by_one_with_a_nul, 2, f"it lists {VIEWED} but audit_listings has no"),
    (add_a_reference_in_other_case, 2, f"audit_listings names {VIEWED.lower()}, which"),
    (move_a_row_onto_a_non_listing_event, 1, f"audit_listings names {OTHER}, which the event"),
    (add_a_row_far_past_the_end, 2**62, "which the chain does not hold"),
    (add_a_row_before_the_start, -5, "names event -5, which the chain does not hold"),
    (add_a_blob_beside_its_text, 2, "which the event does not list (rows added)"),
    # Before: "event changed (a column holds a value of the wrong type)" at the intact seq 4.
    (add_a_row_with_a_text_seq, None, "names event 'x', which is not a seq (rows added)"),
    # Before: verify stopped with a TypeError, comparing 99 with 'x'.
    (add_a_text_seq_and_one_past_the_end, 99, "names event 99, which the chain does not hold"),
    (add_a_row_with_a_blob_seq, None, "names event b'\\x02', which is not a seq"),
    (add_a_row_with_a_fractional_seq, 2.5, "names event 2.5, which the chain does not hold"),
]


@pytest.mark.parametrize(
    ("attack", "first_bad_seq", "problem"), ATTACKS, ids=[a.__name__ for a, *_ in ATTACKS]
)
def test_verify_names_the_changed_listing(app, runner, attack, first_bad_seq, problem):
    with app.app_context():
        listing_trail()
        attack()
    result = runner.invoke(args=["audit", "verify", "--json"])
    assert result.exit_code == 1, result.output
    out = json.loads(result.stdout)
    assert out["ok"] is False and out["first_bad_seq"] == first_bad_seq, out
    assert problem in out["problem"], out["problem"]


def test_a_trail_rebuilt_without_constraints_but_unchanged_verifies(app, runner):
    """The duplicate and NULL checks do not fire on rows that are exactly right."""
    with app.app_context():
        listing_trail()
        without_constraints()
        rows = db.session.execute(text("SELECT count(*) FROM audit_listings")).scalar_one()
        assert rows == 3
    result = runner.invoke(args=["audit", "verify", "--json"])
    assert result.exit_code == 0, result.output
