"""Staff fixtures: teams, users with TOTP, logging in through the real form, routed requests.

Requests are made the way they are in production: a patient fills the real form, then
``intake.requests.routing.route_request`` routes it (at a time the test chooses, which sets its due
time). Staff log in through ``/staff/login`` with a code computed from their TOTP secret at the
app's clock, which the ``clock`` fixture replaces with one the test moves by hand.

The plain functions (``create_teams``, ``create_staff_user``, ``login``, ``submit_routed``...)
take the app as an argument, so the browser tests and tests that build their own app can use
them too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pyotp
import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient

from intake.accounts import services as accounts
from intake.clock import now, utcnow
from intake.extensions import db
from intake.models import AuditEvent, Request, Team
from intake.requests import routing
from tests.conftest import Patient, hidden_fields, reference_from

PASSWORD = "Cedar-Lantern-4417-harbor"
QUEUE_LINK_RE = re.compile(r'<a href="/staff/requests/([RC]-[0-9A-Z]{4}-[0-9A-Z]{4})"[^>]*>')


# -- the clock ----------------------------------------------------------------------------------


class FakeClock:
    """The app's clock, moved only by the test."""

    def __init__(self, start: datetime) -> None:
        self.current = start

    def __call__(self) -> datetime:
        return self.current

    def advance(self, **delta: float) -> datetime:
        self.current += timedelta(**delta)
        return self.current


def install_clock(app: Flask, start: datetime | None = None) -> FakeClock:
    clock = FakeClock(start or utcnow().replace(microsecond=0))
    app.extensions["intake.clock"] = clock
    return clock


@pytest.fixture
def clock(app: Flask) -> FakeClock:
    return install_clock(app)


# -- teams and users ----------------------------------------------------------------------------


def create_teams(app: Flask) -> list[str]:
    """Every team of the routing file, as the operator would create them."""
    with app.app_context():
        table = app.extensions["intake.routing"]
        for team in table.teams.values():
            if db.session.get(Team, team.id) is None:
                accounts.create_team(db.session, team.id, team.name, team.spanish, "system:test")
        db.session.commit()
        return sorted(table.teams)


@pytest.fixture
def teams(app: Flask) -> list[str]:
    return create_teams(app)


@dataclass
class StaffUser:
    username: str
    password: str
    totp_secret: str
    role: str
    teams: tuple[str, ...]
    id: int
    last_step: int = 0

    def code(self, at: datetime) -> str:
        return pyotp.TOTP(self.totp_secret).at(at)

    @property
    def actor(self) -> str:
        return f"user:{self.id}"


def create_staff_user(
    app: Flask, username: str, role: str = "staff", teams: tuple[str, ...] | list[str] = ()
) -> StaffUser:
    with app.app_context():
        created = accounts.create_user(
            db.session,
            app.extensions["intake.keyring"],
            username=username,
            password=PASSWORD,
            role=role,
            teams=list(teams),
            actor="system:test",
        )
        db.session.commit()
        return StaffUser(
            username, PASSWORD, created.totp_secret, role, tuple(teams), created.user.id
        )


@pytest.fixture
def make_user(app: Flask, teams: list[str]) -> Callable[..., StaffUser]:
    def make(username: str, role: str = "staff", teams: tuple[str, ...] = ()) -> StaffUser:
        return create_staff_user(app, username, role, teams)

    return make


# -- logging in ---------------------------------------------------------------------------------


def fresh_code(user: StaffUser, clock: FakeClock | None) -> str:
    """A code for the clock's current time step, moving the clock on if that step was used
    (the app refuses a code twice, as it should)."""
    at = clock() if clock is not None else utcnow()
    step = int(at.timestamp()) // 30
    if step <= user.last_step:
        assert clock is not None, "a second login in the same 30 s needs the fake clock"
        at = clock.advance(seconds=30 * (user.last_step - step + 1))
        step = int(at.timestamp()) // 30
    user.last_step = step
    return user.code(at)


def post_login(
    client: FlaskClient,
    username: str,
    password: str,
    otp: str,
    *,
    next_url: str | None = None,
    **kwargs: Any,
) -> Any:
    """GET the login form, then POST it back the way a browser does."""
    page = client.get("/staff/login", **kwargs)
    assert page.status_code == 200
    data = {
        "csrf_token": hidden_fields(page.get_data(as_text=True))["csrf_token"],
        "username": username,
        "password": password,
        "otp": otp,
    }
    if next_url is not None:
        data["next"] = next_url
    return client.post("/staff/login", data=data, **kwargs)


def login(
    client: FlaskClient,
    user: StaffUser,
    clock: FakeClock | None = None,
    *,
    next_url: str | None = None,
    **kwargs: Any,
) -> Any:
    response = post_login(
        client, user.username, user.password, fresh_code(user, clock), next_url=next_url, **kwargs
    )
    assert response.status_code == 303, response.get_data(as_text=True)[:2000]
    return response


class StaffClient:
    """A logged-in staff member's browser: a test client that sends the CSRF token."""

    def __init__(self, client: FlaskClient, user: StaffUser) -> None:
        self.client = client
        self.user = user
        self._csrf: str | None = None

    def csrf_token(self) -> str:
        if self._csrf is None:
            # The login page carries a token and, unlike the request pages, records nothing.
            page = self.client.get("/staff/login")
            self._csrf = hidden_fields(page.get_data(as_text=True))["csrf_token"]
        return self._csrf

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.client.get(path, **kwargs)

    def post(self, path: str, data: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        return self.client.post(
            path, data={"csrf_token": self.csrf_token(), **(data or {})}, **kwargs
        )

    def act(self, reference: str, action: str, **fields: Any) -> Any:
        return self.post(f"/staff/requests/{reference}/{action}", fields)

    def queue_html(self, query: str = "") -> str:
        response = self.get("/staff/queue" + query)
        assert response.status_code == 200, response.status_code
        return str(response.get_data(as_text=True))


@pytest.fixture
def staff_login(app: Flask, clock: FakeClock) -> Callable[[StaffUser], StaffClient]:
    """Log ``user`` in through the real form in a browser of their own."""

    def log_in(user: StaffUser) -> StaffClient:
        client = app.test_client()
        login(client, user, clock)
        staff = StaffClient(client, user)
        staff.csrf_token()
        return staff

    return log_in


# -- requests -----------------------------------------------------------------------------------


def submit_routed(
    app: Flask, patient: Patient, kind: str = "refill", at: datetime | None = None, **fields: Any
) -> str:
    """Submit a request through the patient form and route it at ``at``; its reference."""
    response = patient.refill(**fields) if kind == "refill" else patient.contact(**fields)
    reference = reference_from(response)
    with app.app_context():
        request_id = db.session.execute(
            sa.select(Request.id).where(Request.reference == reference)
        ).scalar_one()
        routed = routing.route_request(
            db.session, app.extensions["intake.routing"], request_id, at or now()
        )
        assert routed is not None, f"{reference} was not routed"
    return reference


@pytest.fixture
def route(app: Flask, patient: Patient, clock: FakeClock) -> Callable[..., str]:
    def make(kind: str = "refill", at: datetime | None = None, **fields: Any) -> str:
        return submit_routed(app, patient, kind, at or clock(), **fields)

    return make


def request_state(app: Flask, reference: str) -> dict[str, Any]:
    with app.app_context():
        row = db.session.execute(
            sa.select(Request).where(Request.reference == reference)
        ).scalar_one()
        return {
            "id": row.id,
            "status": row.status,
            "priority": row.priority,
            "team": row.team,
            "assignee_id": row.assignee_id,
            "updated_at": row.updated_at,
            "sla_due_at": row.sla_due_at,
            "escalated_at": row.escalated_at,
        }


# -- the audit trail and the raw database -------------------------------------------------------


@dataclass(frozen=True)
class Event:
    seq: int
    actor: str
    action: str
    reference: str | None
    outcome: str
    details: dict[str, Any]
    raw_details: str


def events_since(app: Flask, seq: int = 0) -> list[Event]:
    with app.app_context():
        rows = db.session.execute(
            sa.select(AuditEvent).where(AuditEvent.seq > seq).order_by(AuditEvent.seq)
        ).scalars()
        return [
            Event(
                e.seq, e.actor, e.action, e.reference, e.outcome, json.loads(e.details), e.details
            )
            for e in rows
        ]


def last_seq(app: Flask) -> int:
    with app.app_context():
        return int(db.session.execute(sa.select(sa.func.max(AuditEvent.seq))).scalar() or 0)


def database_values(app: Flask) -> list[bytes | str]:
    """Every value of every row of every table, bytes as bytes."""
    values: list[bytes | str] = []
    with app.app_context(), db.engine.connect() as conn:
        for table in sa.inspect(db.engine).get_table_names():
            for row in conn.execute(sa.text(f'SELECT * FROM "{table}"')):
                for value in row:
                    if isinstance(value, bytes | memoryview):
                        values.append(bytes(value))
                    elif value is not None:
                        values.append(str(value))
    return values


def sqlite_file_bytes(database_url: str) -> bytes:
    path = Path(sa.make_url(database_url).database or "")
    raw = path.read_bytes()
    wal = path.with_name(path.name + "-wal")
    if wal.exists():
        raw += wal.read_bytes()
    return raw


def queue_references(html: str) -> list[str]:
    return QUEUE_LINK_RE.findall(html)
