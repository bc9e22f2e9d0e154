"""The operator's commands: users create / disable / reset-mfa, teams create."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa

from intake.extensions import db
from intake.models import Team, User
from tests.intake.staff.conftest import (
    PASSWORD,
    StaffUser,
    events_since,
    fresh_code,
    last_seq,
    login,
    post_login,
)


def create(runner, username: str, password: str = PASSWORD, *extra: str):
    return runner.invoke(
        args=["users", "create", username, "--role", "staff", "--team", "refills-main", *extra],
        input=password + "\n",
    )


def user_exists(app, username: str) -> bool:
    with app.app_context():
        found = db.session.execute(sa.select(User.id).where(User.username == username)).first()
        return found is not None


def test_users_create_json_prints_a_secret_that_logs_in(app, runner, teams, clock):
    result = create(runner, "ivan", PASSWORD, "--json")

    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert set(printed) == {"username", "totp_secret"} and printed["username"] == "ivan"
    assert PASSWORD not in result.output
    with app.app_context():
        user_id = db.session.execute(sa.select(User.id).where(User.username == "ivan")).scalar()
    ivan = StaffUser("ivan", PASSWORD, printed["totp_secret"], "staff", ("refills-main",), user_id)
    client = app.test_client()
    login(client, ivan, clock)
    assert "ivan (staff)" in client.get("/staff/queue").get_data(as_text=True)


@pytest.mark.parametrize(
    ("username", "password", "message"),
    [
        ("weakling", "Short-pw-9", "at least 12 characters"),
        ("weakling", "password1234", "too easy to guess. This is a very common password"),
        ("weakling", "QWERTYUIOP123", "too easy to guess"),
        ("weakling", "Password123!", "too easy to guess. This is similar to a commonly used"),
        ("weakling", "pharmacy2026", "too easy to guess"),
        ("weakling", "Weakling-2026", "must not contain the username"),
        # The username backwards, as people do when told not to use their username.
        ("alexandra.petrova", "avortep.ardnaxela", "too easy to guess"),
        ("weakling", "11111111111111", "too easy to guess"),
    ],
    ids=[
        "short",
        "common",
        "keyboard",
        "common-variant",
        "site-word",
        "username",
        "reversed",
        "repeated",
    ],
)
def test_users_create_refuses_weak_passwords(app, runner, teams, username, password, message):
    since = last_seq(app)

    result = create(runner, username, password, "--json")

    assert result.exit_code != 0
    assert message in result.output
    assert password not in result.output
    assert not user_exists(app, username)
    assert events_since(app, since) == []


def test_users_create_refuses_unknown_teams_and_duplicates(app, runner, teams):
    assert create(runner, "ivan").exit_code == 0
    duplicate = create(runner, "ivan")
    unknown = runner.invoke(
        args=["users", "create", "jo", "--role", "staff", "--team", "nowhere"], input=PASSWORD
    )

    assert duplicate.exit_code != 0 and "already exists" in duplicate.output
    assert unknown.exit_code != 0 and "unknown team 'nowhere'" in unknown.output
    assert not user_exists(app, "jo")


def test_users_disable_ends_that_users_sessions(app, runner, make_user, staff_login, clock):
    lena = make_user("lena", teams=("refills-main",))
    omar = make_user("omar", teams=("refills-main",))
    lena_browser, omar_browser = staff_login(lena), staff_login(omar)

    result = runner.invoke(args=["users", "disable", "lena"])

    assert result.exit_code == 0, result.output
    answer = lena_browser.get("/staff/queue")
    assert answer.status_code == 302 and answer.headers["Location"].startswith("/staff/login")
    assert omar_browser.get("/staff/queue").status_code == 200
    # Nor can lena log in again, with the right password and code.
    again = post_login(app.test_client(), "lena", PASSWORD, fresh_code(lena, clock))
    assert again.status_code == 400
    assert [e.details.get("change") for e in events_since(app) if e.action == "user.changed"] == [
        "disabled"
    ]


def test_users_reset_mfa_makes_the_old_secret_fail(app, runner, make_user, staff_login, clock):
    lena = make_user("lena", teams=("refills-main",))
    browser = staff_login(lena)

    result = runner.invoke(args=["users", "reset-mfa", "lena", "--json"])

    assert result.exit_code == 0, result.output
    new_secret = json.loads(result.stdout)["totp_secret"]
    assert new_secret != lena.totp_secret
    assert browser.get("/staff/queue").status_code == 302  # the old session ended too
    old = post_login(app.test_client(), "lena", PASSWORD, fresh_code(lena, clock))
    assert old.status_code == 400
    lena.totp_secret = new_secret
    login(app.test_client(), lena, clock)


def test_teams_create_spanish(app, runner):
    result = runner.invoke(
        args=["teams", "create", "oncology", "--spanish", "--display-name", "Oncology team"]
    )

    assert result.exit_code == 0, result.output
    assert "Created team 'oncology' (Spanish-speaking)" in result.stdout
    assert "no rule routes to 'oncology'" in result.stderr
    with app.app_context():
        team = db.session.get(Team, "oncology")
        assert (team.name, team.spanish) == ("Oncology team", True)
    olga = runner.invoke(
        args=["users", "create", "olga", "--role", "staff", "--team", "oncology"], input=PASSWORD
    )
    assert olga.exit_code == 0, olga.output
    again = runner.invoke(args=["teams", "create", "oncology"])
    assert again.exit_code != 0 and "already exists" in again.output
    plain = runner.invoke(args=["teams", "create", "refills-main"])
    assert plain.exit_code == 0 and "Spanish" not in plain.stdout
    with app.app_context():
        assert db.session.get(Team, "refills-main").name == "Refills: Main Street"


NEW_PASSWORD = "Quartz-Meadow-8812-lantern"


def test_users_set_password_ends_sessions_and_is_audited(
    app, runner, make_user, staff_login, clock
):
    lena = make_user("lena", teams=("refills-main",))
    omar = make_user("omar", teams=("refills-main",))
    lena_browser, omar_browser = staff_login(lena), staff_login(omar)
    since = last_seq(app)

    result = runner.invoke(args=["users", "set-password", "lena"], input=NEW_PASSWORD + "\n")

    assert result.exit_code == 0, result.output
    assert "sessions are ended" in result.output and NEW_PASSWORD not in result.output
    answer = lena_browser.get("/staff/queue")
    assert answer.status_code == 302 and answer.headers["Location"].startswith("/staff/login")
    assert omar_browser.get("/staff/queue").status_code == 200
    old = post_login(app.test_client(), "lena", PASSWORD, fresh_code(lena, clock))
    assert old.status_code == 400
    lena.password = NEW_PASSWORD
    login(app.test_client(), lena, clock)
    events = events_since(app, since)
    assert [(e.actor.split(":")[:2], e.details) for e in events if e.action == "user.changed"] == [
        (["system", "cli"], {"username": "lena", "change": "password_set"})
    ]
    assert not [e for e in events if NEW_PASSWORD in e.raw_details or PASSWORD in e.raw_details]


@pytest.mark.parametrize(
    ("password", "message"),
    [
        ("Password123!", "too easy to guess"),
        ("pharmacy2026", "too easy to guess"),
        (PASSWORD, "current password"),
    ],
    ids=["common", "site-word", "unchanged"],
)
def test_users_set_password_refuses_a_weak_or_unchanged_password(
    app, runner, make_user, staff_login, password, message
):
    lena = make_user("lena", teams=("refills-main",))
    browser = staff_login(lena)
    since = last_seq(app)

    result = runner.invoke(args=["users", "set-password", "lena"], input=password + "\n")

    assert result.exit_code != 0
    assert message in result.output
    assert events_since(app, since) == []
    assert browser.get("/staff/queue").status_code == 200  # nothing changed, nobody logged out


def test_users_set_password_for_an_unknown_user(app, runner, teams):
    result = runner.invoke(args=["users", "set-password", "nobody"], input=NEW_PASSWORD + "\n")

    assert result.exit_code != 0 and "no user 'nobody'" in result.output
