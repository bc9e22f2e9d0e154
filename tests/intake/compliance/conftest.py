"""Fixtures for the compliance pages: teams, staff accounts made by ``accounts.create_user``,
logged-in clients (password + TOTP through the login form), routed requests."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import pyotp
import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from intake.accounts import services as accounts
from intake.clock import utcnow
from intake.extensions import db
from intake.models import Request, User
from intake.requests import casework, routing
from tests.conftest import Patient, hidden_fields, reference_from


@dataclass
class Account:
    username: str
    password: str
    secret: str
    user_id: int
    role: str
    teams: tuple[str, ...]

    def actor(self, ip_hmac: str | None = None) -> casework.Actor:
        return casework.Actor(self.user_id, self.username, self.role, self.teams, ip_hmac)


@dataclass
class Staff:
    """Make accounts and log them in, each with a client of its own."""

    app: Flask

    def create(self, username: str, role: str, teams: tuple[str, ...] = ()) -> Account:
        password = "pw-" + secrets.token_urlsafe(12)
        with self.app.app_context():
            made = accounts.create_user(
                db.session,
                self.app.extensions["intake.keyring"],
                username=username,
                password=password,
                role=role,
                teams=list(teams),
                actor="system:test",
            )
            db.session.commit()
            user_id = made.user.id
        return Account(username, password, made.totp_secret, user_id, role, tuple(sorted(teams)))

    def login(self, account: Account, remote_addr: str = "127.0.0.1") -> FlaskClient:
        client = self.app.test_client()
        client.environ_base["REMOTE_ADDR"] = remote_addr
        page = client.get("/staff/login")
        response = client.post(
            "/staff/login",
            data={
                **hidden_fields(page.get_data(as_text=True)),
                "username": account.username,
                "password": account.password,
                "otp": pyotp.TOTP(account.secret).now(),
            },
        )
        assert response.status_code == 303, response.get_data(as_text=True)[:500]
        return client


@pytest.fixture
def staff(app: Flask) -> Staff:
    with app.app_context():
        for team in app.extensions["intake.routing"].teams.values():
            accounts.create_team(db.session, team.id, team.name, team.spanish, "system:test")
        db.session.commit()
    return Staff(app)


@pytest.fixture
def officer(staff: Staff) -> Account:
    return staff.create("olivia", "compliance")


@pytest.fixture
def officer_client(staff: Staff, officer: Account) -> FlaskClient:
    return staff.login(officer)


def submit_routed(app: Flask, patient: Patient, **overrides: Any) -> tuple[str, str]:
    """Submit a refill through the patient form and route it; returns (reference, team)."""
    reference = reference_from(patient.refill(**overrides))
    with app.app_context():
        request_id = db.session.execute(
            select(Request.id).where(Request.reference == reference)
        ).scalar_one()
        routed = routing.route_request(
            db.session, app.extensions["intake.routing"], request_id, utcnow()
        )
        assert routed is not None
        return reference, routed.team


def user_id(app: Flask, username: str) -> int:
    with app.app_context():
        return int(
            db.session.execute(select(User.id).where(User.username == username)).scalar_one()
        )
