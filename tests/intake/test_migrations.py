"""Migrations: the schema they build matches the models, and upgrades keep existing data."""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from flask_migrate import upgrade

from intake.extensions import db
from tests.conftest import POSTGRES_URL, _admin_engine, _with_database


@pytest.fixture
def empty_database_url(backend, tmp_path, request):
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.sqlite3'}"
        return
    request.getfixturevalue("postgres_template")  # fails or skips like the other PG tests
    name = f"intake_mig_{uuid.uuid4().hex[:12]}"
    engine = _admin_engine()
    with engine.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    yield _with_database(POSTGRES_URL, name)
    with engine.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


def test_migrated_schema_matches_the_models(app):
    with app.app_context(), db.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, db.metadata) == []


def test_upgrading_keeps_requests_and_their_consents(base_settings, empty_database_url, tmp_path,
                                                     make_app):
    app = make_app(base_settings.replace(database_url=empty_database_url,
                                         data_dir=tmp_path / "data"))
    with app.app_context():
        upgrade(revision="0001")
        with db.engine.begin() as conn:
            conn.execute(sa.text(
                "INSERT INTO requests (id, reference, kind, language, status, priority, "
                "created_at, updated_at, phi_encrypted) VALUES ('r1', 'R-0000-0001', 'refill', "
                "'en', 'received', 'normal', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, :phi)"),
                {"phi": b"sealed"})
            conn.execute(sa.text(
                "INSERT INTO consent_acceptances (request_id, document, version, language, "
                "sha256, accepted_at) VALUES ('r1', 'privacy', '2026-11', 'en', 'x', "
                "CURRENT_TIMESTAMP)"))
            conn.execute(sa.text(
                "INSERT INTO outbox (request_id, task, status, attempts, created_at) "
                "VALUES ('r1', 'route_request', 'pending', 0, CURRENT_TIMESTAMP)"))
        upgrade()
        with db.engine.connect() as conn:
            assert conn.execute(sa.text("SELECT priority_rank FROM requests")).scalar() == 2
            assert conn.execute(sa.text("SELECT count(*) FROM consent_acceptances")).scalar() == 1
            assert conn.execute(sa.text("SELECT count(*) FROM outbox")).scalar() == 1


def _listings(conn: sa.Connection) -> list[tuple[str, int]]:
    rows = conn.execute(sa.text("SELECT reference, seq FROM audit_listings"))
    return sorted((str(reference), int(seq)) for reference, seq in rows)


# Events as the app writes them, and the listings each must give: queue views and searches
# index the string references their details list (once each); anything else indexes nothing.
LISTING_TRAIL: list[tuple[str, str | None, dict[str, object], list[str]]] = [
    ("phi.viewed", None, {"view": "queue", "references": ["R-AAAA-0001", "R-AAAA-0002"]},
     ["R-AAAA-0001", "R-AAAA-0002"]),
    ("request.searched", None, {"by": "phone", "references": ["C-BBBB-0003"]}, ["C-BBBB-0003"]),
    # The same reference twice, values that are not strings, an escaped character.
    ("phi.viewed", None, {"view": "queue", "references": ["R-AAAA-0001", 7, None, True,
                                                          "R-AAAA-0001", "R-Ñ\"-0004"]},
     ["R-AAAA-0001", "R-Ñ\"-0004"]),
    ("phi.viewed", None, {"view": "queue", "references": []}, []),
    ("phi.viewed", "R-AAAA-0005", {"references": ["R-AAAA-0006"]}, []),  # names its own request
    ("audit.exported", None, {"references": ["R-AAAA-0007"]}, []),  # not a listing action
    ("request.searched", None, {"references": "R-AAAA-0008"}, []),  # not a list
    ("request.searched", None, {"by": "name"}, []),
]  # fmt: skip


def test_migration_0014_derives_the_listings_record_event_writes_and_downgrades(
    base_settings, empty_database_url, tmp_path, make_app, backend
):
    from flask_migrate import downgrade

    from intake.audit.chain import record_event

    app = make_app(base_settings.replace(database_url=empty_database_url,
                                         data_dir=tmp_path / "data"))
    with app.app_context():
        upgrade()
        seqs = []
        for action, reference, details, _listed in LISTING_TRAIL:
            event = record_event(db.session, actor="user:1", action=action, reference=reference,
                                 details=details)
            seqs.append(event.seq)
        db.session.commit()
        expected = sorted((r, seq) for seq, (*_e, listed) in zip(seqs, LISTING_TRAIL, strict=True)
                          for r in listed)
        with db.engine.connect() as conn:
            written = _listings(conn)
        assert written == expected  # record_event's own rows, the reference for the migration

        downgrade(revision="0013")
        with db.engine.connect() as conn:
            assert "audit_listings" not in sa.inspect(conn).get_table_names()
            if backend == "postgresql":  # the trigger function goes with the table
                assert conn.execute(sa.text(
                    "SELECT count(*) FROM pg_proc WHERE proname = 'audit_listings_append_only'"
                )).scalar() == 0
            # The trail itself is untouched by the downgrade.
            assert conn.execute(sa.text("SELECT count(*) FROM audit_events")).scalar() == len(seqs)

        upgrade(revision="0014")
        with db.engine.connect() as conn:
            assert _listings(conn) == written
        # The derived rows are as append-only as the ones record_event writes.
        for statement in ("UPDATE audit_listings SET seq = seq + 1000",
                          "DELETE FROM audit_listings"):
            with pytest.raises(sa.exc.DatabaseError), db.engine.begin() as conn:
                conn.execute(sa.text(statement))

        # A second round trip over the derived table gives the same rows again.
        downgrade(revision="0013")
        upgrade()
        with db.engine.connect() as conn:
            assert _listings(conn) == written
        db.session.remove()
        db.engine.dispose()
