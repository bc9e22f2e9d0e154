"""Fixtures: an app on a fresh database per test (SQLite and PostgreSQL), a client, a patient.

Each test run migrates one template database per backend, then every test gets its own copy
(a file copy on SQLite, ``CREATE DATABASE ... TEMPLATE`` on PostgreSQL) and drops it afterwards.
PostgreSQL comes from ``INTAKE_TEST_POSTGRES_URL`` (default: the local server); without it the
PostgreSQL tests are skipped, except under ``CI=true`` where a missing server is a failure.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient

from config import Settings
from intake import create_app
from intake.crypto.phi import Keyring

POSTGRES_URL = os.environ.get(
    "INTAKE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
IN_CI = os.environ.get("CI", "").lower() == "true"
BACKENDS = ("sqlite", "postgresql")


def _admin_engine() -> sa.Engine:
    return sa.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT", pool_pre_ping=True)


def _with_database(url: str, name: str) -> str:
    return sa.make_url(url).set(database=name).render_as_string(hide_password=False)


def _migrate(settings: Settings) -> None:
    from flask_migrate import upgrade

    app = create_app(settings)
    with app.app_context():
        upgrade()
        from intake.extensions import db

        db.engine.dispose()


@pytest.fixture(scope="session")
def keyring() -> Keyring:
    return Keyring.generate()


@pytest.fixture(scope="session")
def base_settings(tmp_path_factory: pytest.TempPathFactory, keyring: Keyring) -> Settings:
    data_dir = tmp_path_factory.mktemp("intake-data")
    return Settings(
        data_dir=data_dir,
        secret_key="test-secret-key-" + uuid.uuid4().hex,
        keyring=keyring.to_json(),
        min_fill_seconds=0,
        submit_rate_limit="10000/minute",
        login_rate_limit="10000/minute",
    )


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory, base_settings: Settings) -> Path:
    path = tmp_path_factory.mktemp("sqlite-template") / "template.sqlite3"
    _migrate(base_settings.replace(database_url=f"sqlite:///{path}"))
    return path


@pytest.fixture(scope="session")
def postgres_template(base_settings: Settings) -> Iterator[str]:
    engine = _admin_engine()
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError as error:
        if IN_CI:
            pytest.fail(f"PostgreSQL is required in CI but unreachable at {POSTGRES_URL}: {error}")
        pytest.skip(f"PostgreSQL unreachable at {POSTGRES_URL}")
    name = f"intake_tpl_{uuid.uuid4().hex[:12]}"
    with engine.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        _migrate(base_settings.replace(database_url=_with_database(POSTGRES_URL, name)))
        yield name
    finally:
        with engine.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@contextlib.contextmanager
def fresh_database(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path, name: str = "intake"
) -> Iterator[str]:
    """The URL of a fresh, migrated, empty database (``name``: its SQLite file's), dropped
    afterwards."""
    if backend == "sqlite":
        template: Path = request.getfixturevalue("sqlite_template")
        path = tmp_path / f"{name}.sqlite3"
        shutil.copyfile(template, path)
        yield f"sqlite:///{path}"
        return
    template_name: str = request.getfixturevalue("postgres_template")
    database = f"intake_test_{uuid.uuid4().hex[:12]}"
    engine = _admin_engine()
    with engine.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{database}" TEMPLATE "{template_name}"'))
    try:
        yield _with_database(POSTGRES_URL, database)
    finally:
        with engine.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
        engine.dispose()


@pytest.fixture
def database_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, migrated, empty database for one test."""
    with fresh_database(backend, request, tmp_path) as url:
        yield url


@pytest.fixture
def settings(base_settings: Settings, database_url: str, tmp_path: Path) -> Settings:
    return base_settings.replace(database_url=database_url, data_dir=tmp_path / "data")


@pytest.fixture
def app(settings: Settings) -> Iterator[Flask]:
    app = create_app(settings)
    app.config["TESTING"] = True
    yield app
    from intake.extensions import db

    publisher = app.extensions.get("intake.publisher")
    if hasattr(publisher, "close"):  # revokes still being sent, before their pool closes
        publisher.close()
    app.extensions["celery"].close()
    with app.app_context():
        db.session.remove()
        db.engine.dispose()


@pytest.fixture
def make_app() -> Iterator[Any]:
    """Build more apps in a test (another keyring, profile...); their pools close afterwards."""
    from intake.extensions import db

    apps: list[Flask] = []

    def make(settings: Settings) -> Flask:
        made = create_app(settings)
        apps.append(made)
        return made

    yield make
    for made in apps:
        with made.app_context():
            db.session.remove()
            db.engine.dispose()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def runner(app: Flask) -> Any:
    return app.test_cli_runner()


HIDDEN_RE = re.compile(r'<input[^>]*name="(csrf_token|rendered_at)"[^>]*value="([^"]*)"')


def hidden_fields(html: str) -> dict[str, str]:
    return {name: value for name, value in HIDDEN_RE.findall(html)}


def valid_refill(**overrides: Any) -> dict[str, Any]:
    form = {
        "first_name": "Maria",
        "last_name": "Núñez-Ortiz",
        "date_of_birth": "1980-03-15",
        "phone": "(202) 555-0143",
        "email": "maria@example.com",
        "contact_method": "sms",
        "rx_numbers": "1234567\n7654321",
        "medication": "Immune globulin",
        "location": "main",
        "fulfillment": "pickup",
        "address": "",
        "needed_by": "",
        "notes": "",
        "consent_privacy": "y",
        "consent_contact": "y",
        "extra_comments": "",
    }
    form.update(overrides)
    return {k: v for k, v in form.items() if v is not None}


def valid_contact(**overrides: Any) -> dict[str, Any]:
    form = {
        "first_name": "John",
        "last_name": "O'Brien",
        "date_of_birth": "1962-07-04",
        "phone": "202-555-0178",
        "email": "",
        "contact_method": "phone",
        "topic": "copay",
        "message": "I need help paying for my medication.",
        "callback_time": "after 3 pm",
        "consent_privacy": "y",
        "extra_comments": "",
    }
    form.update(overrides)
    return {k: v for k, v in form.items() if v is not None}


class Patient:
    """Fills the patient forms the way a browser does: GET the form, then POST it back."""

    def __init__(self, client: FlaskClient) -> None:
        self.client = client

    def get_form(self, kind: str, lang: str | None = None) -> tuple[Any, dict[str, str]]:
        page = self.client.get(f"/{kind}" + (f"?lang={lang}" if lang else ""))
        assert page.status_code == 200
        return page, hidden_fields(page.get_data(as_text=True))

    def submit(self, kind: str, fields: dict[str, Any], lang: str | None = None) -> Any:
        _page, hidden = self.get_form(kind, lang)
        return self.client.post(f"/{kind}", data={**hidden, **fields})

    def refill(self, lang: str | None = None, **overrides: Any) -> Any:
        return self.submit("refill", valid_refill(**overrides), lang)

    def contact(self, lang: str | None = None, **overrides: Any) -> Any:
        return self.submit("contact", valid_contact(**overrides), lang)


@pytest.fixture
def patient(client: FlaskClient) -> Patient:
    return Patient(client)


def reference_from(response: Any) -> str:
    assert response.status_code == 303, response.get_data(as_text=True)[:2000]
    match = re.search(r"/thanks/([RC]-[0-9A-Z]{4}-[0-9A-Z]{4})$", response.headers["Location"])
    assert match, response.headers["Location"]
    return match.group(1)


@pytest.fixture(scope="session")
def playwright() -> Iterator[Any]:
    """One Playwright driver for the whole run: its sync API refuses a second one while the
    first is running, and both the embedded and the production browser tests need one."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        yield driver
