"""Staff login: password plus TOTP, throttling, sessions that really end, safe redirects."""

from __future__ import annotations

import re
from datetime import timedelta
from urllib.parse import parse_qs, urlsplit

import pytest

from intake.staff.views import LOGIN_FAILED
from tests.intake.staff.conftest import (
    PASSWORD,
    create_staff_user,
    create_teams,
    database_values,
    events_since,
    fresh_code,
    install_clock,
    last_seq,
    login,
    post_login,
)

NEXT_FIELD_RE = re.compile(r'<input[^>]*name="next"[^>]*value="([^"]*)"')
COOKIE = "intake_session"


def is_login_redirect(response) -> bool:
    return response.status_code == 302 and urlsplit(response.headers["Location"]).path == (
        "/staff/login"
    )


def failure_reasons(app, since: int) -> list[str]:
    return [
        e.details["reason"] for e in events_since(app, since) if e.action == "user.login_failed"
    ]


@pytest.fixture
def lena(make_user):
    return make_user("lena", teams=("refills-main",))


def test_password_and_code_open_the_queue(app, clock, lena):
    client = app.test_client()
    assert is_login_redirect(client.get("/staff/queue"))
    since = last_seq(app)

    response = login(client, lena, clock)

    assert response.headers["Location"] == "/staff/queue"
    queue = client.get("/staff/queue")
    assert queue.status_code == 200
    assert "lena (staff)" in queue.get_data(as_text=True)
    assert [e.action for e in events_since(app, since)][:1] == ["user.login"]


def test_a_wrong_password_is_refused_like_an_unknown_user(app, clock, lena):
    client = app.test_client()
    since = last_seq(app)

    wrong = post_login(client, "lena", "Not-the-password-991", lena.code(clock()))
    unknown = post_login(client, "nobody", PASSWORD, lena.code(clock()))

    for response in (wrong, unknown):
        assert response.status_code == 400
        assert LOGIN_FAILED in response.get_data(as_text=True)
    assert is_login_redirect(client.get("/staff/queue"))
    assert failure_reasons(app, since) == ["bad_password", "unknown_user"]


def test_a_wrong_code_is_refused(app, clock, lena):
    client = app.test_client()
    since = last_seq(app)
    right = lena.code(clock())
    wrong = f"{(int(right) + 1) % 1_000_000:06d}"
    # One time step of drift is allowed either way; two steps back is too old.
    too_old = lena.code(clock() - timedelta(seconds=61))

    for code in (wrong, too_old):
        response = post_login(client, "lena", PASSWORD, code)
        assert response.status_code == 400
        assert LOGIN_FAILED in response.get_data(as_text=True)
    assert is_login_redirect(client.get("/staff/queue"))
    assert failure_reasons(app, since) == ["bad_otp", "bad_otp"]


def test_a_code_works_only_once(app, clock, lena):
    first = app.test_client()
    code = fresh_code(lena, clock)
    assert post_login(first, "lena", PASSWORD, code).status_code == 303
    since = last_seq(app)

    # Someone who saw the code over a shoulder tries it within the same 30 seconds.
    reused = post_login(app.test_client(), "lena", PASSWORD, code)

    assert reused.status_code == 400
    assert LOGIN_FAILED in reused.get_data(as_text=True)
    assert failure_reasons(app, since) == ["otp_reused"]
    # The next time step's code works.
    login(app.test_client(), lena, clock)


def test_failures_lock_the_account_for_growing_capped_delays_then_release_it(
    app, clock, lena, make_user
):
    omar = make_user("omar", teams=("refills-main",))
    client = app.test_client()
    since = last_seq(app)
    for _ in range(4):  # the first failures cost nothing but the attempt
        assert (
            post_login(client, "lena", "Wrong-password-4417", lena.code(clock())).status_code == 400
        )

    for delay in (30, 60, 120, 240, 480, 900, 900):  # doubling, capped at 15 minutes
        failed = post_login(client, "lena", "Wrong-password-4417", lena.code(clock()))
        assert failed.status_code == 400
        # Even the right password and code are refused while the account is locked.
        locked = post_login(client, "lena", PASSWORD, lena.code(clock()))
        assert locked.status_code == 429
        # Flask-Limiter may raise Retry-After to its own window's end; never lower it.
        assert int(locked.headers["Retry-After"]) >= delay
        assert f"Try again in {delay + 1} seconds" in locked.get_data(as_text=True)
        clock.advance(seconds=delay - 1)
        assert post_login(client, "lena", PASSWORD, lena.code(clock())).status_code == 429
        clock.advance(seconds=1)

    # Another account on the same computer was never locked.
    login(app.test_client(), omar, clock)
    # The delay has passed: the right password and code get in, and the count starts over.
    login(client, lena, clock)
    events = events_since(app, since)
    assert [e.details["seconds"] for e in events if e.action == "user.locked"] == [
        30,
        60,
        120,
        240,
        480,
        900,
        900,
    ]
    assert post_login(app.test_client(), "lena", "Wrong-password-4417", "000000").status_code == 400
    login(app.test_client(), lena, clock)


def test_too_many_attempts_from_one_address_get_429(make_app, settings):
    app = make_app(settings.replace(login_rate_limit="3/minute"))
    create_teams(app)
    user = create_staff_user(app, "ines", teams=("refills-main",))
    clock = install_clock(app)
    client = app.test_client()
    for _ in range(3):
        assert post_login(client, "ines", "Wrong-password-4417", "000000").status_code == 400

    blocked = post_login(client, "ines", PASSWORD, fresh_code(user, clock))

    assert blocked.status_code == 429
    assert "Too many attempts" in blocked.get_data(as_text=True)
    assert is_login_redirect(client.get("/staff/queue"))
    # The limit is per address: the same user from another computer gets in.
    login(app.test_client(), user, clock, environ_base={"REMOTE_ADDR": "10.20.30.40"})


def test_logging_in_starts_a_new_session(app, clock, lena):
    serializer = app.session_interface.get_signing_serializer(app)
    client = app.test_client()
    client.get("/staff/login")
    before = client.get_cookie(COOKIE).value

    login(client, lena, clock)

    after = client.get_cookie(COOKIE).value
    assert after != before
    old, new = serializer.loads(before), serializer.loads(after)
    assert "_user_id" not in old and new["_user_id"]
    # Nothing from before the login survives it (its CSRF token included).
    assert old["csrf_token"] != new.get("csrf_token")
    # A cookie planted before the login (session fixation) is still not logged in.
    planted = app.test_client()
    planted.set_cookie(COOKIE, before)
    assert is_login_redirect(planted.get("/staff/queue"))
    # Each login gets its own token, and the database keeps only its hash.
    other = app.test_client()
    login(other, lena, clock)
    assert serializer.loads(other.get_cookie(COOKIE).value)["_user_id"] != new["_user_id"]
    assert not [v for v in database_values(app) if new["_user_id"] in str(v)]


def test_logout_ends_the_session_even_for_a_replayed_cookie(app, staff_login, lena):
    staff = staff_login(lena)
    cookie = staff.client.get_cookie(COOKIE).value
    since = last_seq(app)

    response = staff.post("/staff/logout")

    assert response.status_code == 303 and response.headers["Location"] == "/staff/login"
    assert is_login_redirect(staff.get("/staff/queue"))
    replay = app.test_client()
    replay.set_cookie(COOKIE, cookie)
    answer = replay.get("/staff/queue", follow_redirects=True)
    assert answer.request.path == "/staff/login"
    assert "Staff login" in answer.get_data(as_text=True)
    assert [(e.action, e.details.get("reason")) for e in events_since(app, since)] == [
        ("user.logout", "logout")
    ]


def test_an_idle_session_ends_after_15_minutes(app, clock, staff_login, lena):
    assert app.extensions["intake.settings"].session_idle_minutes == 15
    staff = staff_login(lena)
    since = last_seq(app)

    clock.advance(minutes=14)
    assert staff.get("/staff/queue").status_code == 200
    clock.advance(minutes=14)  # 28 minutes after login, 14 after the last click
    assert staff.get("/staff/queue").status_code == 200
    clock.advance(minutes=15, seconds=1)
    answer = staff.get("/staff/queue")

    assert is_login_redirect(answer)
    assert parse_qs(urlsplit(answer.headers["Location"]).query)["next"] == ["/staff/queue"]
    assert ("user.logout", {"reason": "idle_timeout"}) in [
        (e.action, e.details) for e in events_since(app, since)
    ]
    # Ended for good: turning the clock back does not revive it.
    clock.advance(minutes=-20)
    assert is_login_redirect(staff.get("/staff/queue"))


def test_a_page_reads_the_session_its_user_and_teams_in_one_statement(app, staff_login, make_user):
    """Every staff page loads its session: the row, the user and the user's teams together."""
    import sqlalchemy as sa

    from intake.extensions import db

    staff = staff_login(make_user("nadia", teams=("refills-main", "infusion")))
    seen: list[str] = []
    with app.app_context():
        engine = db.engine
    sa.event.listen(engine, "before_cursor_execute", lambda _c, _k, sql, *_r: seen.append(sql))

    html = staff.get("/staff/queue?team=infusion").get_data(as_text=True)

    reads = [sql for sql in seen if "staff_sessions" in sql or "user_teams" in sql]
    assert len(reads) == 1 and "JOIN user_teams" in reads[0], reads
    # Both teams came with it: the filter offers them, and a team of hers is allowed.
    assert 'value="refills-main"' in html and 'value="infusion" selected' in html
    assert staff.get("/staff/queue?team=clinical").status_code == 404


def test_the_queue_refreshing_itself_does_not_keep_an_idle_session_alive(
    app, clock, staff_login, lena
):
    staff = staff_login(lena)
    assert staff.get("/staff/queue").status_code == 200

    # Nobody touches the computer; the open queue page polls every 5 seconds.
    for _ in range(14):
        clock.advance(minutes=1)
        assert staff.get("/staff/queue/version").status_code == 200
        assert staff.get("/staff/queue?fragment=1").status_code == 200
    clock.advance(minutes=1, seconds=1)

    assert staff.get("/staff/queue/version").status_code == 302
    assert is_login_redirect(staff.get("/staff/queue"))


@pytest.mark.parametrize(
    "target",
    ["//evil.example/phish", "https://evil.example/phish", "/\\evil.example/phish"],
    ids=["scheme-relative", "absolute", "backslash"],
)
def test_login_ignores_a_next_address_on_another_site(app, clock, lena, target):
    client = app.test_client()
    page = client.get("/staff/login", query_string={"next": target})
    assert NEXT_FIELD_RE.search(page.get_data(as_text=True)).group(1) == ""

    response = login(client, lena, clock, next_url=target)  # posted by hand, as an attacker would

    assert response.headers["Location"] == "/staff/queue"


def test_login_returns_to_the_page_that_asked_for_it(app, clock, lena):
    client = app.test_client()
    asked = client.get("/staff/search")
    assert is_login_redirect(asked)
    page = client.get(asked.headers["Location"])
    next_url = NEXT_FIELD_RE.search(page.get_data(as_text=True)).group(1)
    assert next_url == "/staff/search"

    response = login(client, lena, clock, next_url=next_url)

    assert response.headers["Location"] == "/staff/search"
    assert "Find a request" in client.get("/staff/search").get_data(as_text=True)


def _statuses(client, username: str, attempts: int) -> list[int]:
    return [
        post_login(client, username, "Wrong-password-4417", "123456").status_code
        for _ in range(attempts)
    ]


def test_unknown_usernames_are_throttled_exactly_like_real_ones(app, clock, lena):
    """Neither the answers nor the lock tell an attacker which usernames exist."""
    real = _statuses(app.test_client(), "lena", 7)
    unknown = _statuses(app.test_client(), "nobody-here", 7)
    assert real == unknown == [400] * 5 + [429, 429]


def test_a_lock_from_one_address_does_not_lock_the_user_out_elsewhere(app, clock, lena):
    attacker = app.test_client()
    attacker.environ_base["REMOTE_ADDR"] = "198.51.100.66"
    assert _statuses(attacker, "lena", 6)[-1] == 429
    assert post_login(attacker, "lena", PASSWORD, lena.code(clock())).status_code == 429
    # Lena, at her own workstation, logs in as usual.
    workstation = app.test_client()
    workstation.environ_base["REMOTE_ADDR"] = "10.20.0.15"
    login(workstation, lena, clock)
