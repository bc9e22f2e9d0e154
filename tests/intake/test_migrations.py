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
