"""Attacks on the staff session read in one statement (intake.accounts.services.load_session).

The session row, its user and the user's teams come back from one joined select. Whatever
changed in the database since the last page must count on the very next one: a team taken
away, an account disabled (even behind the app's back), a session ended by logout, a new
password or a reset second factor, an idle or too old session. Kept as tests: none of these
found a hole, and each would if the joined read ever served a stale or foreign user.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from intake.accounts import services as accounts
from intake.extensions import db
from intake.models import StaffSession, User
from tests.intake.staff.conftest import PASSWORD, queue_references
from tests.intake.staff.test_login import COOKIE

NORTH = {"location": "north", "phone": "(202) 555-0161"}


@pytest.fixture
def two_requests(route):
    """A refills-main request and a refills-north one."""
    return route("refill", location="main", phone="(202) 555-0143"), route("refill", **NORTH)


def logged_out(response) -> bool:
    return response.status_code == 302 and "/staff/login" in response.headers["Location"]


def session_rows(app, user_id: int) -> list[tuple[object, str | None]]:
    with app.app_context():
        return [
            (row.ended_at, row.end_reason)
            for row in db.session.scalars(
                sa.select(StaffSession).where(StaffSession.user_id == user_id)
            )
        ]


def test_a_team_taken_away_mid_session_is_gone_on_the_next_page(
    app, make_user, staff_login, two_requests
):
    main, north = two_requests
    bea = staff_login(make_user("bea", teams=("refills-main", "refills-north")))
    assert sorted(queue_references(bea.queue_html())) == sorted([main, north])

    with app.app_context():
        db.session.execute(
            sa.text("DELETE FROM user_teams WHERE team_id = 'refills-north' AND user_id = :u"),
            {"u": bea.user.id},
        )
        db.session.commit()

    assert queue_references(bea.queue_html()) == [main]
    assert bea.get("/staff/queue?team=refills-north").status_code == 404
    assert bea.get("/staff/queue/version?team=refills-north").status_code == 404
    assert bea.get(f"/staff/requests/{north}").status_code == 404
    assert bea.act(north, "claim").status_code == 404


def test_a_user_with_no_teams_sees_no_request(app, make_user, staff_login, two_requests):
    main, north = two_requests
    user = make_user("noteam", teams=("refills-main",))
    nobody = staff_login(user)
    with app.app_context():  # the last team taken away (the CLI refuses to create such a user)
        db.session.execute(sa.text("DELETE FROM user_teams WHERE user_id = :u"), {"u": user.id})
        db.session.commit()

    assert queue_references(nobody.queue_html()) == []
    for reference in (main, north):
        assert nobody.get(f"/staff/requests/{reference}").status_code == 404
    assert nobody.get("/staff/queue?team=refills-main").status_code == 404


def test_two_people_logged_in_each_get_their_own_teams(app, make_user, staff_login, two_requests):
    main, north = two_requests
    ana = staff_login(make_user("ana", teams=("refills-main",)))
    ned = staff_login(make_user("ned", teams=("refills-north",)))

    for _ in range(2):  # interleaved, so a user cached from another request would show
        assert queue_references(ana.queue_html()) == [main]
        assert queue_references(ned.queue_html()) == [north]


def test_disabling_behind_the_apps_back_ends_the_session(app, make_user, staff_login):
    """Only the flag is set (no end_sessions): the session must end on its next page."""
    cal = staff_login(make_user("cal", teams=("refills-main",)))
    assert cal.get("/staff/queue").status_code == 200
    with app.app_context():
        db.session.execute(sa.update(User).where(User.id == cal.user.id).values(disabled=True))
        db.session.commit()

    assert logged_out(cal.get("/staff/queue"))
    assert [reason for _ended, reason in session_rows(app, cal.user.id)] == ["disabled"]
    assert logged_out(cal.get("/staff/queue"))


@pytest.mark.parametrize("change", ["disable", "password", "mfa_reset"])
def test_account_changes_end_every_session(app, make_user, staff_login, clock, change):
    user = make_user("dee", teams=("refills-main",))
    first, second = staff_login(user), staff_login(user)
    with app.app_context():
        if change == "disable":
            accounts.disable_user(db.session, "dee", "system:test", clock())
        elif change == "password":
            accounts.set_password(db.session, "dee", PASSWORD[::-1] + "-x9", "system:test", clock())
        else:
            accounts.reset_mfa(
                db.session, app.extensions["intake.keyring"], "dee", "system:test", clock()
            )
        db.session.commit()

    assert logged_out(first.get("/staff/queue"))
    assert logged_out(second.get("/staff/queue"))


def test_logout_idle_and_lifetime_end_the_session(app, make_user, staff_login, clock):
    user = make_user("eve", teams=("refills-main",))
    out = staff_login(user)
    cookie = out.client.get_cookie(COOKIE).value
    out.post("/staff/logout")
    assert logged_out(out.get("/staff/queue"))
    replay = app.test_client()
    replay.set_cookie(COOKIE, cookie)
    assert logged_out(replay.get("/staff/queue"))

    idle = staff_login(user)
    minutes = app.extensions["intake.settings"].session_idle_minutes
    clock.advance(minutes=minutes + 1)
    assert logged_out(idle.get("/staff/queue"))

    old = staff_login(user)
    started, response = clock(), None
    while clock() - started <= accounts.ABSOLUTE_SESSION_LIFETIME:
        clock.advance(minutes=minutes - 1)  # busy all along: never idle
        response = old.get("/staff/queue")
        if logged_out(response):
            break
    assert response is not None and logged_out(response)
    assert clock() - started > accounts.ABSOLUTE_SESSION_LIFETIME


def test_a_session_whose_user_row_is_gone_is_refused(app, make_user, staff_login):
    """The join is an outer one: a session row left without its user must not log anyone in."""
    fay = staff_login(make_user("fay", teams=("refills-main",)))
    with app.app_context():
        if db.session.get_bind().dialect.name == "postgresql":
            db.session.execute(
                sa.text(
                    "ALTER TABLE staff_sessions DROP CONSTRAINT IF EXISTS "
                    "fk_staff_sessions_user_id_users"
                )
            )
        else:
            db.session.execute(sa.text("PRAGMA foreign_keys = OFF"))
        db.session.execute(sa.text("DELETE FROM user_teams WHERE user_id = :u"), {"u": fay.user.id})
        db.session.execute(sa.text("DELETE FROM users WHERE id = :u"), {"u": fay.user.id})
        db.session.commit()
    response = fay.get("/staff/queue")
    assert logged_out(response)


@pytest.mark.parametrize(("role", "queue_status"), [("supervisor", 200), ("compliance", 404)])
def test_roles_keep_their_reach(app, make_user, staff_login, two_requests, role, queue_status):
    main, north = two_requests
    person = staff_login(make_user(f"{role}1", role=role))
    response = person.get("/staff/queue")
    assert response.status_code == queue_status
    if role == "supervisor":
        assert sorted(queue_references(response.get_data(as_text=True))) == sorted([main, north])
