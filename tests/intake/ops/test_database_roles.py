"""Least privilege on PostgreSQL: migrations as an owner role, the app as a role that owns nothing.

Each test makes its own owner role, app role (with compose's init script) and database, migrates
as the owner and drops all three afterwards. The app role must run the whole pipeline, and must
be refused by PostgreSQL's privileges (not only by the append-only triggers) when it tries to
change or remove the audit trail.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from config import Settings
from intake.audit.chain import verify_chain
from intake.extensions import db
from intake.models import Request
from tests.conftest import IN_CI, POSTGRES_URL, Patient, _migrate, reference_from
from tests.intake.patient.test_status import look_up

ROOT = Path(__file__).parents[3]
INIT_SCRIPT = ROOT / "deploy" / "postgres" / "10-intake-app-role.sh"
# What an app role's permission failures look like, as opposed to the triggers' own refusal.
REFUSED_BY_PRIVILEGES = ("permission denied", "must be owner")
TRIGGER_MESSAGE = "append-only"

pytestmark = pytest.mark.postgres


@dataclass(frozen=True)
class RoleDatabase:
    name: str
    owner: str
    app: str

    def url(self, role: str) -> str:
        return (
            sa.make_url(POSTGRES_URL)
            .set(username=role, password=None, database=self.name)
            .render_as_string(hide_password=False)
        )

    @property
    def owner_url(self) -> str:
        return self.url(self.owner)

    @property
    def app_url(self) -> str:
        return self.url(self.app)


def admin_engine() -> sa.Engine:
    return sa.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")


def run_init_script(database: str, app_role: str) -> subprocess.CompletedProcess[str]:
    """Run compose's PostgreSQL init script as the container would, against the test server."""
    url = sa.make_url(POSTGRES_URL)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "POSTGRES_"))}
    env.update(
        {
            "PGHOST": url.host or "127.0.0.1",
            "PGPORT": str(url.port or 5432),
            "POSTGRES_USER": url.username or "postgres",
            "POSTGRES_DB": database,
            "POSTGRES_APP_USER": app_role,
            "POSTGRES_APP_PASSWORD": "app-" + uuid.uuid4().hex,
        }
    )
    if url.password:
        env["PGPASSWORD"] = url.password
    return subprocess.run(  # noqa: S603
        ["bash", str(INIT_SCRIPT)], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def roles() -> Iterator[RoleDatabase]:
    """A database owned by a fresh owner role, and a fresh app role made by the init script."""
    engine = admin_engine()
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError as error:
        engine.dispose()
        if IN_CI:
            pytest.fail(f"PostgreSQL is required in CI but unreachable at {POSTGRES_URL}: {error}")
        pytest.skip(f"PostgreSQL unreachable at {POSTGRES_URL}")
    suffix = uuid.uuid4().hex[:10]
    made = RoleDatabase(f"intake_roles_{suffix}", f"intake_owner_{suffix}", f"intake_app_{suffix}")
    with engine.connect() as conn:
        conn.execute(sa.text(f'CREATE ROLE "{made.owner}" LOGIN'))
        conn.execute(sa.text(f'CREATE DATABASE "{made.name}" OWNER "{made.owner}"'))
    try:
        script = run_init_script(made.name, made.app)
        assert script.returncode == 0, script.stderr
        yield made
    finally:
        with engine.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{made.name}" WITH (FORCE)'))
            conn.execute(sa.text(f'DROP ROLE IF EXISTS "{made.app}"'))
            conn.execute(sa.text(f'DROP ROLE IF EXISTS "{made.owner}"'))
        engine.dispose()


@pytest.fixture
def owner_settings(base_settings: Settings, roles: RoleDatabase, tmp_path: Path) -> Settings:
    return base_settings.replace(
        database_url=roles.owner_url, data_dir=tmp_path / "data", database_app_role=roles.app
    )


@pytest.fixture
def app_settings(owner_settings: Settings, roles: RoleDatabase) -> Settings:
    return owner_settings.replace(database_url=roles.app_url, database_app_role=None)


@pytest.fixture
def migrated(owner_settings: Settings) -> Settings:
    """Upgrade as the owner; INTAKE_DATABASE_APP_ROLE makes the upgrade grant the app role."""
    _migrate(owner_settings)
    return owner_settings


def refusal(url: str, statement: str) -> str | None:
    """Run ``statement`` as the role in ``url``; the error message, or None if it succeeded."""
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(statement))
    except sa.exc.DBAPIError as error:
        return str(error.orig)
    finally:
        engine.dispose()
    return None


def execute(url: str, statement: str) -> None:
    """Run ``statement`` as the role in ``url`` and commit."""
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(statement))
    finally:
        engine.dispose()


def submit_and_route(app, client) -> str:
    from workers.tasks import route_request

    reference = reference_from(Patient(client).refill())
    with app.app_context():
        request_id = db.session.execute(
            sa.select(Request.id).where(Request.reference == reference)
        ).scalar_one()
        route_request.run(request_id)
    return reference


def test_the_app_role_runs_the_pipeline(migrated, app_settings, make_app):
    app = make_app(app_settings)
    app.config["TESTING"] = True
    client = app.test_client()
    reference = submit_and_route(app, client)
    reference_from(Patient(client).contact(topic="side_effect"))
    answer = look_up(client, reference, "1980-03-15")
    assert answer.status_code == 200 and "We have your request" in answer.get_data(as_text=True)
    with app.app_context():
        row = db.session.execute(sa.select(Request).where(Request.reference == reference)).one()[0]
        assert row.status == "queued" and row.team
        report = verify_chain(db.session)
    assert report.ok and report.events >= 4


ATTACKS = {
    "update an event": "UPDATE audit_events SET actor = 'someone-else'",
    "delete events": "DELETE FROM audit_events",
    "truncate the trail": "TRUNCATE audit_events",
    "drop the row trigger": "DROP TRIGGER audit_events_no_update_delete ON audit_events",
    "drop the truncate trigger": "DROP TRIGGER audit_events_no_truncate ON audit_events",
    "disable the triggers": "ALTER TABLE audit_events DISABLE TRIGGER ALL",
    "drop the trigger function": "DROP FUNCTION audit_events_append_only() CASCADE",
    "drop the table": "DROP TABLE audit_events",
    "rename the table": "ALTER TABLE audit_events RENAME TO old_events",
    "rewrite the schema version": "UPDATE alembic_version SET version_num = '0001'",
    "plant a table": "CREATE TABLE audit_events_shadow (seq bigint)",
}


def test_the_app_role_cannot_change_or_remove_the_audit_trail(migrated, app_settings, make_app):
    app = make_app(app_settings)
    submit_and_route(app, app.test_client())
    allowed = []
    for what, statement in ATTACKS.items():
        message = refusal(app_settings.effective_database_url, statement)
        refused = message is not None and any(m in message for m in REFUSED_BY_PRIVILEGES)
        if not refused or TRIGGER_MESSAGE in (message or ""):
            allowed.append(f"{what}: {message or 'succeeded'}")
    assert allowed == [], "the app role could:\n" + "\n".join(allowed)
    with app.app_context():
        assert verify_chain(db.session).ok


def test_privileges_hold_even_when_the_triggers_are_gone(migrated, roles):
    execute(
        roles.app_url,
        "INSERT INTO audit_events (seq, created_at, actor, action, outcome, details, prev_hash,"
        " hash) VALUES (1, now(), 'x', 'audit.verified', 'success', '{}', repeat('0', 64),"
        " repeat('1', 64))",
    )
    execute(roles.owner_url, "ALTER TABLE audit_events DISABLE TRIGGER ALL")
    for statement in ("UPDATE audit_events SET actor = 'y'", "DELETE FROM audit_events"):
        message = refusal(roles.app_url, statement)
        assert message and "permission denied for table audit_events" in message, statement


def test_without_the_setting_an_upgrade_grants_nothing_and_grant_app_fixes_it(
    owner_settings, app_settings, roles, make_app
):
    _migrate(owner_settings.replace(database_app_role=None))
    assert "permission denied" in (refusal(roles.app_url, "SELECT 1 FROM requests") or "")

    owner_app = make_app(owner_settings.replace(database_app_role=None))
    result = owner_app.test_cli_runner().invoke(args=["db", "grant-app", roles.app])
    assert result.exit_code == 0, result.output
    assert "audit_events: SELECT, INSERT" in result.output
    assert "requests: SELECT, INSERT, UPDATE, DELETE" in result.output

    app = make_app(app_settings)
    app.config["TESTING"] = True
    assert submit_and_route(app, app.test_client())


def test_grant_app_takes_back_a_privilege_granted_by_hand(migrated, roles, make_app):
    execute(roles.owner_url, f'GRANT ALL ON audit_events TO "{roles.app}", PUBLIC')
    # Only the trigger stands in the way now.
    assert TRIGGER_MESSAGE in (refusal(roles.app_url, "TRUNCATE audit_events") or "")

    owner_app = make_app(migrated.replace(database_app_role=None))
    result = owner_app.test_cli_runner().invoke(args=["db", "grant-app", roles.app])
    assert result.exit_code == 0, result.output
    for statement in ("TRUNCATE audit_events", "DELETE FROM audit_events"):
        message = refusal(roles.app_url, statement)
        assert message and "permission denied" in message, statement


def test_grant_app_refuses_an_owner_a_superuser_and_an_unknown_role(migrated, roles, make_app):
    runner = make_app(migrated.replace(database_app_role=None)).test_cli_runner()
    superuser = sa.make_url(POSTGRES_URL).username or "postgres"
    for role, complaint in (
        (roles.owner, "must own nothing"),
        (superuser, "superuser"),
        ("nobody_" + uuid.uuid4().hex[:8], "does not exist"),
    ):
        result = runner.invoke(args=["db", "grant-app", role])
        assert result.exit_code == 1 and complaint in result.output, (role, result.output)


def test_compose_migrates_as_the_owner_and_runs_the_app_as_the_app_role():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]

    def user(service: str) -> str | None:
        return sa.make_url(services[service]["environment"]["INTAKE_DATABASE_URL"]).username

    owner = services["postgres"]["environment"]["POSTGRES_USER"]
    migrate = services["migrate"]["environment"]
    assert user("migrate") == owner and migrate["INTAKE_DATABASE_APP_ROLE"] == "intake_app"
    for service in ("web", "worker", "beat"):
        assert user(service) == "intake_app", service
        assert "INTAKE_DATABASE_APP_ROLE" not in services[service]["environment"], service
    assert "./deploy/postgres:/docker-entrypoint-initdb.d:ro" in services["postgres"]["volumes"]
    assert "POSTGRES_APP_PASSWORD=" in (ROOT / ".env.example").read_text()
