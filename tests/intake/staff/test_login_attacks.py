"""The login attacks of the outside review, run against the app: guessing one account from many
addresses (IPv4 and one IPv6 /64), locked attempts that still cost a password check, parallel
checks that exhaust memory, and wrong codes typed after a stolen password."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from intake.accounts import services as accounts
from intake.extensions import db
from intake.models import OutboxMessage
from intake.requests.notifications import send_account_alert
from intake.requests.routing import load_routing
from intake.staff.views import BUSY, LOGIN_FAILED
from tests.intake.staff.conftest import (
    PASSWORD,
    create_staff_user,
    create_teams,
    events_since,
    fresh_code,
    install_clock,
    last_seq,
    login,
    post_login,
)
from tests.workers.conftest import smtp_server  # noqa: F401 - a fixture

WRONG = "Wrong-password-4417"
BUDGET = 20  # INTAKE_LOGIN_ACCOUNT_BUDGET's default


class CountingHasher:
    """The real argon2 hasher, counting its password checks and how many ran at once."""

    def __init__(self, real: accounts.PasswordHasher, pause: float = 0.0) -> None:
        self.real = real
        self.pause = pause
        self.verified = 0
        self.running = 0
        self.most_at_once = 0
        self._lock = threading.Lock()

    def verify(self, password_hash: str, password: str) -> bool:
        with self._lock:
            self.verified += 1
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        try:
            time.sleep(self.pause)
            return self.real.verify(password_hash, password)
        finally:
            with self._lock:
                self.running -= 1

    def hash(self, password: str) -> str:
        return self.real.hash(password)


@pytest.fixture
def hasher(monkeypatch) -> CountingHasher:
    spy = CountingHasher(accounts._hasher)
    monkeypatch.setattr(accounts, "_hasher", spy)
    return spy


@pytest.fixture
def lena(make_user):
    return make_user("lena", teams=("refills-main",))


def app_with(make_app, settings, **changes):
    """An app with other lockout numbers (fewer password checks make a faster test)."""
    app = make_app(settings.replace(**changes))
    create_teams(app)
    user = create_staff_user(app, "ines", teams=("refills-main",))
    return app, install_clock(app), user


def from_address(address: str) -> dict:
    return {"environ_base": {"REMOTE_ADDR": address}}


def attempt(app, username: str, password: str, otp: str, address: str):
    return post_login(app.test_client(), username, password, otp, **from_address(address))


def spray(app, username: str, addresses: list[str], per_address: int, otp: str = "123456"):
    """Wrong passwords for ``username``, ``per_address`` from each address in turn."""
    return [
        attempt(app, username, WRONG, otp, address).status_code
        for address in addresses
        for _ in range(per_address)
    ]


def alerts(app) -> list[tuple[int | None, str | None, str]]:
    with app.app_context():
        rows = db.session.execute(
            sa.select(OutboxMessage.user_id, OutboxMessage.alert, OutboxMessage.status)
            .where(OutboxMessage.task == "notify_account_alert")
            .order_by(OutboxMessage.id)
        ).all()
        return [tuple(row) for row in rows]


def test_guessing_from_many_addresses_spends_the_accounts_budget(app, clock, lena):
    eight = [f"198.51.100.{n}" for n in range(1, 9)]
    since = last_seq(app)

    # 40 wrong passwords, 5 from each of 8 addresses: the review's attack.
    statuses = spray(app, "lena", eight, per_address=5)

    assert statuses == [400] * BUDGET + [429] * (40 - BUDGET)
    # The right password and code from a 9th address are refused while the budget is spent,
    # with the same answer an unknown name gets.
    refused = attempt(app, "lena", PASSWORD, lena.code(clock()), "203.0.113.9")
    assert refused.status_code == 429
    assert "Too many failed attempts. Try again in 61 seconds." in refused.get_data(as_text=True)
    events = events_since(app, since)
    assert "user.login" not in [e.action for e in events]
    account_locks = [
        e for e in events if e.action == "user.locked" and e.details["scope"] == "account"
    ]
    assert [(e.actor, e.details["failures"]) for e in account_locks] == [(lena.actor, BUDGET)]
    assert alerts(app) == [(lena.id, "account_locked", "pending")]

    # The delay passes: the right credentials get in from anywhere, and the count starts over.
    clock.advance(seconds=61)
    login(app.test_client(), lena, clock, **from_address("203.0.113.9"))
    assert spray(app, "lena", ["192.0.2.1"], per_address=1) == [400]


def test_further_guesses_double_the_delay_up_to_its_cap(make_app, settings):
    app, clock, _ines = app_with(make_app, settings, login_account_budget=3)
    addresses = iter(f"198.51.100.{n}" for n in range(1, 100))
    spray(app, "ines", [next(addresses) for _ in range(3)], per_address=1)  # the budget
    since = last_seq(app)

    for delay in (120, 240, 480, 900, 900):
        clock.advance(seconds=delay)  # more than the delay before
        assert spray(app, "ines", [next(addresses)], per_address=1) == [400]
        assert spray(app, "ines", [next(addresses)], per_address=1) == [429]

    locks = [e.details for e in events_since(app, since) if e.action == "user.locked"]
    assert [d["seconds"] for d in locks if d["scope"] == "account"] == [120, 240, 480, 900, 900]


def test_addresses_of_one_ipv6_64_count_as_one_client(app, clock, lena):
    one_64 = [f"2001:db8:4417:1::{n:x}" for n in range(1, 7)]

    statuses = spray(app, "lena", one_64, per_address=1)

    # Five failures lock that client; the sixth address of the same /64 is the same client.
    assert statuses == [400] * 5 + [429]
    assert attempt(app, "lena", PASSWORD, lena.code(clock()), one_64[0]).status_code == 429
    # Lena, in another network, is not held up (the account's budget is not spent).
    login(app.test_client(), lena, clock, **from_address("2001:db8:4417:2::15"))


def test_the_rate_limit_counts_an_ipv6_64_as_one_client(make_app, settings):
    app = make_app(settings.replace(login_rate_limit="3/minute"))
    create_teams(app)
    user = create_staff_user(app, "ines", teams=("refills-main",))
    clock = install_clock(app)
    one_64 = [f"2001:db8:77:5::{n}" for n in range(1, 4)]
    for address in one_64:
        assert attempt(app, "ines", WRONG, "000000", address).status_code == 400

    blocked = attempt(app, "ines", PASSWORD, fresh_code(user, clock), "2001:db8:77:5::99")

    assert blocked.status_code == 429
    assert "Too many attempts" in blocked.get_data(as_text=True)
    login(app.test_client(), user, clock, **from_address("2001:db8:77:6::1"))


def test_locked_attempts_are_answered_without_a_password_check(make_app, settings, hasher):
    app, clock, ines = app_with(make_app, settings, login_account_budget=8)
    assert spray(app, "ines", ["198.51.100.7"], per_address=5) == [400] * 5
    assert spray(app, "nobody-here", ["198.51.100.7"], per_address=5) == [400] * 5
    assert hasher.verified == 10

    # The locked client tries again and again, with the right password too.
    for _ in range(5):
        assert attempt(app, "ines", PASSWORD, ines.code(clock()), "198.51.100.7").status_code == 429
        assert attempt(app, "nobody-here", WRONG, "123456", "198.51.100.7").status_code == 429
    assert hasher.verified == 10

    # Spend the account's budget from elsewhere; then no address's attempt costs a check.
    assert spray(app, "ines", ["192.0.2.1", "192.0.2.2", "192.0.2.3"], 1) == [400] * 3
    for n in range(10):
        locked = attempt(app, "ines", PASSWORD, ines.code(clock()), f"203.0.113.{n}")
        assert locked.status_code == 429
    assert hasher.verified == 13


def test_checks_over_the_cap_are_answered_busy_at_once(app, clock, lena, hasher):
    slots = accounts.hash_slots(app.extensions["intake.settings"].login_hash_concurrency)
    since = last_seq(app)
    with contextlib.ExitStack() as held:  # the test itself holds every slot
        assert all(held.enter_context(slots.slot()) for _ in range(slots.limit))
        started = time.monotonic()
        busy = attempt(app, "lena", PASSWORD, lena.code(clock()), "198.51.100.8")
        elapsed = time.monotonic() - started

    assert busy.status_code == 503
    # Flask-Limiter may raise Retry-After to its own window's end.
    assert int(busy.headers["Retry-After"]) >= 1
    assert BUSY in busy.get_data(as_text=True)
    assert elapsed < 2
    assert hasher.verified == 0
    assert [e.details.get("reason") for e in events_since(app, since)] == ["busy"]
    # A busy answer is no failure: the next attempt checks the password as usual.
    login(app.test_client(), lena, clock, **from_address("198.51.100.8"))


@pytest.mark.parametrize("backend", ["postgresql"])
def test_parallel_logins_never_run_more_checks_than_the_cap(make_app, settings, monkeypatch):
    app = make_app(settings.replace(login_hash_concurrency=2))
    create_teams(app)
    for n in range(8):
        create_staff_user(app, f"user{n}", teams=("refills-main",))
    spy = CountingHasher(accounts._hasher, pause=0.2)
    monkeypatch.setattr(accounts, "_hasher", spy)
    statuses: list[int] = []

    def guess(n: int) -> None:
        response = attempt(app, f"user{n}", WRONG, "123456", f"198.51.100.{n + 1}")
        statuses.append(response.status_code)

    threads = [threading.Thread(target=guess, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert len(statuses) == 8 and set(statuses) <= {400, 503}
    assert 1 <= spy.most_at_once <= 2


def test_a_known_workstation_still_logs_in_while_the_budget_is_spent(app, clock, lena):
    workstation = app.test_client()
    login(workstation, lena, clock, **from_address("10.20.0.15"))

    spray(app, "lena", [f"198.51.100.{n}" for n in range(1, 5)], per_address=5)
    stranger = attempt(app, "lena", PASSWORD, lena.code(clock()), "10.20.0.15")

    # The same address without her browser's cookie is a stranger...
    assert stranger.status_code == 429
    # ...while her own browser, which logged in as her before, gets in.
    assert workstation.get_cookie("intake_device", path="/staff/login") is not None
    login(workstation, lena, clock, **from_address("10.20.0.15"))
    # Her login does not hand the guesser a fresh budget.
    assert attempt(app, "lena", PASSWORD, "000000", "203.0.113.50").status_code == 429
    # The cookie names her only: for another name it is a browser like any other.
    assert post_login(workstation, "omar", WRONG, "123456").status_code == 400


def _supervisor_email_routing(folder: Path) -> Path:
    text = (Path(__file__).parents[3] / "config" / "routing.toml").read_text()
    text = text.replace(
        'name = "Pharmacy supervisors"\nnotify = ["log"]',
        'name = "Pharmacy supervisors"\nnotify = ["email"]\nemail = "supervisors@pharmacy.test"',
    )
    path = folder / "routing.toml"
    path.write_text(text)
    return path


def test_wrong_codes_after_the_right_password_freeze_the_second_factor(
    app,
    clock,
    lena,
    runner,
    smtp_server,  # noqa: F811 - the fixture
    tmp_path,
):
    since = last_seq(app)
    right = lena.code(clock())
    wrong = f"{(int(right) + 1) % 1_000_000:06d}"
    # Someone with lena's password guesses codes, each from another address.
    for n in range(5):
        answer = attempt(app, "lena", PASSWORD, wrong, f"198.51.100.{n + 1}")
        assert answer.status_code == 400
        assert LOGIN_FAILED in answer.get_data(as_text=True)

    # Frozen: even the right code is refused, with the answer a wrong password gets.
    frozen = attempt(app, "lena", PASSWORD, fresh_code(lena, clock), "10.20.0.15")
    assert frozen.status_code == 400
    assert LOGIN_FAILED in frozen.get_data(as_text=True)
    events = events_since(app, since)
    freezes = [e for e in events if e.action == "user.locked" and e.details["scope"] == "mfa"]
    assert [(e.actor, e.details) for e in freezes] == [
        (lena.actor, {"scope": "mfa", "reason": "mfa_frozen", "failures": 5})
    ]
    assert [e.details["reason"] for e in events if e.action == "user.login_failed"] == [
        "bad_otp"
    ] * 5 + ["mfa_frozen"]

    # The supervisors are told, by the outbox path of every other notification.
    assert alerts(app) == [(lena.id, "mfa_frozen", "pending")]
    smtp_url, mailbox = smtp_server
    with app.app_context():
        outbox_id = db.session.execute(
            sa.select(OutboxMessage.id).where(OutboxMessage.alert == "mfa_frozen")
        ).scalar_one()
        settings = app.extensions["intake.settings"].replace(smtp_url=smtp_url)
        table = load_routing(_supervisor_email_routing(tmp_path))
        sent = send_account_alert(
            db.session,
            outbox_id=outbox_id,
            settings=settings,
            table=table,
            attempt=0,
            max_retries=0,
        )
        again = send_account_alert(
            db.session,
            outbox_id=outbox_id,
            settings=settings,
            table=table,
            attempt=0,
            max_retries=0,
        )
    assert (sent, again) == ("sent", "skipped")
    [message] = mailbox.messages
    assert message["To"] == "supervisors@pharmacy.test"
    assert message["Subject"] == "Staff account lena: second factor frozen"
    body = mailbox.bodies()[0]
    assert "intake users unfreeze lena" in body
    assert "no patient information" in body
    assert "198.51.100" not in body and PASSWORD not in body
    notified = [e for e in events_since(app, since) if e.action == "notification.sent"]
    assert [(e.reference, e.details["alert"], e.details["user_id"]) for e in notified] == [
        (None, "mfa_frozen", lena.id)
    ]

    # An admin clears it; lena logs in with her code again.
    cleared = runner.invoke(args=["users", "unfreeze", "lena"])
    assert cleared.exit_code == 0, cleared.output
    assert "the frozen second factor" in cleared.output
    changes = [e.details for e in events_since(app, since) if e.action == "user.changed"]
    assert changes == [{"username": "lena", "change": "unfrozen", "cleared": ["mfa_frozen"]}]
    login(app.test_client(), lena, clock, **from_address("10.20.0.16"))


def test_wrong_codes_count_only_in_a_row(app, clock, lena):
    def wrong_codes(count: int) -> None:
        right = lena.code(clock())
        for n in range(count):
            wrong = f"{(int(right) + 1 + n) % 1_000_000:06d}"
            assert attempt(app, "lena", PASSWORD, wrong, f"198.51.100.{n + 1}").status_code == 400

    wrong_codes(4)
    login(app.test_client(), lena, clock, **from_address("10.20.0.15"))  # she gets it right
    wrong_codes(4)

    login(app.test_client(), lena, clock, **from_address("10.20.0.15"))
    assert alerts(app) == []


def test_the_policy_numbers_come_from_the_environment(make_app, settings):
    from config import Settings
    from config.settings import SettingsError

    env = {
        "INTAKE_LOGIN_ACCOUNT_BUDGET": "3",
        "INTAKE_LOGIN_ACCOUNT_FIRST_DELAY_SECONDS": "300",
        "INTAKE_LOGIN_OTP_FREEZE_AFTER": "2",
        "INTAKE_LOGIN_HASH_CONCURRENCY": "8",
    }
    parsed = Settings.from_env(env)
    assert (
        parsed.login_account_budget,
        parsed.login_account_first_delay_seconds,
        parsed.login_account_max_delay_seconds,
        parsed.login_otp_freeze_after,
        parsed.login_hash_concurrency,
    ) == (3, 300, 900, 2, 8)
    with pytest.raises(SettingsError, match="INTAKE_LOGIN_ACCOUNT_BUDGET must not be negative"):
        Settings.from_env({"INTAKE_LOGIN_ACCOUNT_BUDGET": "-1"})
    with pytest.raises(SettingsError, match="INTAKE_LOGIN_HASH_CONCURRENCY"):
        Settings.from_env({"INTAKE_LOGIN_HASH_CONCURRENCY": "0"})

    app, clock, ines = app_with(
        make_app, settings, login_account_budget=3, login_account_first_delay_seconds=300
    )
    since = last_seq(app)
    four = ["198.51.100.1", "198.51.100.2", "198.51.100.3", "198.51.100.4"]
    known = spray(app, "ines", four, per_address=1)
    refused = attempt(app, "ines", PASSWORD, fresh_code(ines, clock), "198.51.100.5")
    unknown = spray(app, "nobody-here", four, per_address=1)

    assert known == unknown == [400, 400, 400, 429]
    assert refused.status_code == 429
    assert "Try again in 301 seconds" in refused.get_data(as_text=True)
    locks = [e for e in events_since(app, since) if e.action == "user.locked"]
    assert [(e.actor, e.details) for e in locks] == [
        (ines.actor, {"scope": "account", "seconds": 300, "failures": 3}),
        ("anonymous", {"scope": "account", "seconds": 300, "failures": 3}),
    ]
    # The supervisors hear of the real account only: an unknown name has no one to tell.
    assert alerts(app) == [(ines.id, "account_locked", "pending")]


def test_the_alert_reaches_the_broker_and_the_worker_delivers_it(app, clock, lena, caplog):
    from workers.tasks import notify_account_alert

    right = lena.code(clock())
    for n in range(5):
        wrong = f"{(int(right) + 1 + n) % 1_000_000:06d}"
        assert attempt(app, "lena", PASSWORD, wrong, f"198.51.100.{n + 1}").status_code == 400
    with app.app_context():
        row = db.session.execute(
            sa.select(OutboxMessage).where(OutboxMessage.alert == "mfa_frozen")
        ).scalar_one()
        # Published after the login attempt's commit, to the embedded broker, like any task.
        assert row.published_at is not None and row.request_id is None
        outbox_id = row.id
        db.session.rollback()
        notify_account_alert.apply(args=[str(lena.id)], kwargs={"outbox_id": outbox_id})
        notify_account_alert.apply(args=[str(lena.id)], kwargs={"outbox_id": outbox_id})

    # The routing file's [supervisors] channel is the log: one line, no PHI, no address.
    lines = [r.getMessage() for r in caplog.records if "team_notified" in r.getMessage()]
    assert len(lines) == 1
    assert "mfa_frozen" in lines[0] and "lena" in lines[0] and "198.51.100" not in lines[0]
    assert alerts(app) == [(lena.id, "mfa_frozen", "done")]


def throttle_rows(app) -> int:
    from intake.models import LoginThrottle

    with app.app_context():
        return int(
            db.session.execute(sa.select(sa.func.count()).select_from(LoginThrottle)).scalar()
        )


def test_beat_forgets_quiet_counts_and_keeps_the_locks_in_force(make_app, settings):
    from workers.tasks import purge_login_throttles

    app, clock, ines = app_with(make_app, settings, login_account_budget=3)
    spray(app, "made-up-name", ["198.51.100.1"], per_address=1)
    spray(app, "ines", ["198.51.100.2", "198.51.100.3", "198.51.100.4"], per_address=1)
    assert throttle_rows(app) == 2 + 4  # one per (name, client), one per name
    clock.advance(hours=25)
    # Still guessing: the account is locked again (the quiet day restarted its count).
    spray(app, "ines", ["198.51.100.5", "198.51.100.6", "198.51.100.7"], per_address=1)

    with app.app_context():
        purged = purge_login_throttles.run()

    # The made-up name's rows and ines's old per-client rows are gone; her lock is kept.
    assert purged == 2 + 3
    assert spray(app, "ines", ["198.51.100.8"], per_address=1) == [429]
    clock.advance(seconds=61)
    login(app.test_client(), ines, clock, **from_address("198.51.100.8"))


# Six Arabic-Indic digits: the form's \d and str.isdigit() accept them, hmac.compare_digest
# cannot compare them with an ASCII code.
NON_ASCII_CODE = "\u0661\u0662\u0663\u0664\u0665\u0666"


def test_a_non_ascii_code_after_the_right_password_reads_like_any_wrong_one(app, clock, lena):
    """A code of non-ASCII digits must not tell the guesser the password was right (an error
    page only for the right password, rolled back uncounted)."""
    wrong = attempt(app, "lena", WRONG, NON_ASCII_CODE, "198.51.100.1")
    right = attempt(app, "lena", PASSWORD, NON_ASCII_CODE, "198.51.100.2")

    assert wrong.status_code == right.status_code == 400
    for answer in (wrong, right):
        assert "Enter the 6-digit code." in answer.get_data(as_text=True)
    # Past the form, the service itself reads such a code as a wrong one.
    assert accounts._matching_step("JBSWY3DPEHPK3PXP", NON_ASCII_CODE, clock()) is None


@pytest.mark.parametrize("typed", ["Lena", "LENA", " lena ", "lena\t"])
def test_spellings_of_one_name_spend_one_budget(app, clock, lena, typed):
    spray(app, "lena", [f"198.51.100.{n}" for n in range(1, 5)], per_address=BUDGET // 4)
    answer = attempt(app, typed, PASSWORD, lena.code(clock()), "203.0.113.9")
    assert answer.status_code == 429


def test_a_lookalike_name_is_another_unknown_name(app, clock, lena):
    """Full-width letters (NFKC would fold them into "lena") neither log in as her nor share
    her budget."""
    lookalike = "\uff4c\uff45\uff4e\uff41"
    answer = attempt(app, lookalike, PASSWORD, lena.code(clock()), "198.51.100.1")
    assert answer.status_code == 400
    assert LOGIN_FAILED in answer.get_data(as_text=True)
    login(app.test_client(), lena, clock, **from_address("198.51.100.2"))


def test_wrong_codes_without_the_password_never_freeze_the_second_factor(app, clock, lena):
    """Only someone who has the password can freeze her second factor: wrong codes typed
    with a wrong password are ordinary wrong passwords."""
    for n in range(8):
        attempt(app, "lena", WRONG, f"{n:06d}", f"198.51.100.{n + 1}")
    with app.app_context():
        user = db.session.execute(sa.select(accounts.User).where(accounts.User.username == "lena"))
        row = user.scalar_one()
        assert (row.otp_failures, row.otp_frozen_at) == (0, None)
    assert alerts(app) == []
    login(app.test_client(), lena, clock, **from_address("10.20.0.15"))


def test_a_password_longer_than_the_login_form_takes_is_refused_when_set():
    """The login form refuses passwords over its limit before any check (no argon2 on a huge
    body); a password set longer than that could never be typed in."""
    from intake.staff.forms import LoginForm

    limit = next(v.max for v in LoginForm.password.kwargs["validators"] if hasattr(v, "max"))
    assert limit == accounts.MAX_PASSWORD_LENGTH
    too_long = "Correct horse battery staple, " * 10  # 300 characters, very strong
    with pytest.raises(accounts.AccountError, match="at most"):
        accounts.check_password_policy("lena", too_long[: limit + 1])
    accounts.check_password_policy("lena", too_long[:limit])


def test_a_forged_or_borrowed_device_cookie_buys_no_fresh_budget(app, clock, lena, make_user):
    """A device cookie signed with another key, or a real one that names someone else, is a
    browser like any other: the spent budget refuses it."""
    from itsdangerous import URLSafeTimedSerializer

    mallory = make_user("mallory", teams=("refills-main",))
    attacker = app.test_client()
    login(attacker, mallory, clock, **from_address("203.0.113.7"))  # her own, real cookie
    own = attacker.get_cookie("intake_device", path="/staff/login")
    assert own is not None
    spray(app, "lena", [f"198.51.100.{n}" for n in range(1, 5)], per_address=BUDGET // 4)

    forged = URLSafeTimedSerializer("not-the-secret-key", salt="intake.known-device")
    for value in (forged.dumps({"lena": "made-up"}), own.value):
        attacker.set_cookie("intake_device", value, path="/staff/login")
        answer = post_login(attacker, "lena", PASSWORD, lena.code(clock()))
        assert answer.status_code == 429


def test_posts_that_carry_no_checkable_password_never_reach_argon2(app, clock, lena, hasher):
    """No CSRF token, an empty password, a 200 KB one, a body over the app's limit: each is
    refused by the form (or the body limit) before any password check, so none costs argon2
    and none can answer a guess."""
    client = app.test_client()
    no_token = client.post(
        "/staff/login", data={"username": "lena", "password": PASSWORD, "otp": "123456"}
    )
    empty = post_login(client, "lena", "", "123456")
    huge = post_login(client, "lena", "x" * 200_000, "123456")
    over_limit = client.post("/staff/login", data={"password": "x" * (2 << 20)})

    assert [r.status_code for r in (no_token, empty, huge)] == [400, 400, 400]
    assert over_limit.status_code == 413
    assert hasher.verified == 0
    login(app.test_client(), lena, clock)
