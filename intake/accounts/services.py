"""Staff accounts: passwords (argon2id), TOTP second factor, login throttling, server-side
sessions.

Why: staff sessions open PHI, so a stolen password alone must not be enough (TOTP), a TOTP
code seen over a shoulder must not work twice (the last used time step is stored), guessing
must be slow however many addresses the guesser has (per-client and per-account delays that
grow, a frozen second factor after repeated wrong codes; see :func:`authenticate`) without
letting an attacker lock a real user out of her own workstation, passwords must be hard to
guess in the first place (a strength estimator, not a word list), and ending a session must
really end it: the cookie only carries a random token whose server-side row can be ended by
logout, a new password, an admin disabling the account, 15 idle minutes or 12 hours.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import secrets
import threading
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pyotp
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import joinedload
from zxcvbn import zxcvbn

from intake.audit.chain import record_event
from intake.crypto import phi
from intake.extensions import DbSession
from intake.models import ROLES, LoginThrottle, StaffSession, Team, User, UserTeam
from intake.ops import metrics
from intake.requests import outbox

MIN_PASSWORD_LENGTH = 12
# What the login form accepts: a longer password could be set but never typed in.
MAX_PASSWORD_LENGTH = 256
ABSOLUTE_SESSION_LIFETIME = timedelta(hours=12)
TOTP_ISSUER = "Intake"
# After this many failures in a row, each further failure locks the account for a delay that
# doubles from FIRST_LOCK up to MAX_LOCK.
FREE_FAILURES = 5
FIRST_LOCK = timedelta(seconds=30)
MAX_LOCK = timedelta(minutes=15)
DEFAULT_HASH_CONCURRENCY = 4
# How long an attempt waits for a free password-check slot before it is answered "busy".
HASH_SLOT_WAIT_SECONDS = 0.25
# zxcvbn's score: 3 is "safely unguessable: moderate protection from offline slow-hash
# scenarios" (about 10**8 guesses or more), far beyond what the login delays let through.
MIN_PASSWORD_SCORE = 3
# Only the first characters are estimated (zxcvbn's time grows fast with length, and it
# raises ValueError past its max_length of 72); a longer password is at least as strong as
# its first 72 characters.
ESTIMATED_CHARACTERS = 72
# Words every guesser of this system tries first.
SITE_WORDS = ("intake", "pharmacy", "pharmacist", "refill", "specialty", "staff", "infusion")

_hasher = PasswordHasher()  # argon2id with the library's current recommended parameters
# A well-formed hash of a random password, verified when the username is unknown so that an
# unknown user costs the same time as a wrong password.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


class AccountError(ValueError):
    """A request about an account that cannot be carried out; the message says why."""


def check_password_policy(username: str, password: str) -> None:
    """Refuse a password that is short, holds the username, or is easy to guess.

    Why: the login delays bound an online guesser to a few hundred guesses a day per account,
    and a stolen database to the cost of argon2id per guess; both assume the password is not
    among the first guesses. zxcvbn estimates the guesses needed against common passwords,
    names, words, keyboard patterns, dates, l33t and reversed spellings, and the username and
    this site's own words, so "Password123!", "pharmacy2026" and the username backwards fail.
    """
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AccountError(f"the password must have at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise AccountError(f"the password must have at most {MAX_PASSWORD_LENGTH} characters")
    if username.lower() in password.lower():
        raise AccountError("the password must not contain the username")
    user_inputs = [username, *username.replace("_", ".").replace("-", ".").split("."), *SITE_WORDS]
    estimate = zxcvbn(password[:ESTIMATED_CHARACTERS], user_inputs=user_inputs)
    if estimate["score"] < MIN_PASSWORD_SCORE:
        feedback = estimate["feedback"]
        hints = [feedback.get("warning") or "", *feedback.get("suggestions", [])]
        why = " ".join(hint for hint in hints if hint) or "Add another word or two."
        raise AccountError(f"that password is too easy to guess. {why}")


def _user_row_id(user_id: int) -> str:
    return f"user:{user_id}"


def _seal_totp(keyring: phi.Keyring, user: User, secret: str) -> None:
    data_key, wrapped = phi.new_data_key(keyring, _user_row_id(user.id))
    user.kek_id, user.wrapped_key = wrapped.kek_id, wrapped.blob
    user.totp_secret = phi.seal(data_key, _user_row_id(user.id), "totp", {"secret": secret})
    user.last_totp_step = 0
    # Wrong codes counted (or a freeze) against the old secret say nothing about the new one.
    user.otp_failures = 0
    user.otp_frozen_at = None


def totp_secret(keyring: phi.Keyring, user: User) -> str:
    data_key = phi.unwrap_data_key(
        keyring, _user_row_id(user.id), phi.WrappedKey(user.kek_id, user.wrapped_key)
    )
    return str(phi.open_sealed(data_key, _user_row_id(user.id), "totp", user.totp_secret)["secret"])


def provisioning_uri(username: str, secret: str) -> str:
    return pyotp.TOTP(secret).provisioning_uri(name=username, issuer_name=TOTP_ISSUER)


@dataclass(frozen=True)
class NewUser:
    user: User
    totp_secret: str

    @property
    def otpauth_uri(self) -> str:
        return provisioning_uri(self.user.username, self.totp_secret)


def create_user(
    session: DbSession,
    keyring: phi.Keyring,
    *,
    username: str,
    password: str,
    role: str,
    teams: list[str],
    actor: str,
    demo: bool = False,
    languages: list[str] | None = None,
    known_languages: Collection[str] | None = None,
) -> NewUser:
    """Create an account with a fresh TOTP secret; audited as ``user.created``.

    ``languages`` are the ones the person works in (English when none are given); with
    ``known_languages``, any other code is refused.
    """
    import re

    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{1,63}", username):
        raise AccountError("usernames are 2-64 lower-case letters, digits, '.', '_' or '-'")
    if role not in ROLES:
        raise AccountError(f"role must be one of {', '.join(ROLES)}")
    check_password_policy(username, password)
    if session.execute(select(User.id).where(User.username == username)).first():
        raise AccountError(f"user {username!r} already exists")
    known = set(session.execute(select(Team.id)).scalars())
    unknown = [t for t in teams if t not in known]
    if unknown:
        raise AccountError(f"unknown team {unknown[0]!r} (create it with: intake teams create)")
    if role == "staff" and not teams:
        raise AccountError("staff users need at least one --team")
    codes = check_languages(languages or ["en"], known_languages)
    user = User(
        username=username,
        role=role,
        languages=",".join(codes),
        password_hash=_hasher.hash(password),
        demo=demo,
        kek_id="",
        wrapped_key=b"",
        totp_secret=b"",
    )
    session.add(user)
    session.flush()
    secret = pyotp.random_base32()
    _seal_totp(keyring, user, secret)
    for team in sorted(set(teams)):
        session.add(UserTeam(user_id=user.id, team_id=team))
    record_event(
        session,
        actor=actor,
        action="user.created",
        details={
            "username": username,
            "role": role,
            "teams": sorted(set(teams)),
            "languages": codes,
        },
    )
    session.flush()
    return NewUser(user, secret)


LANGUAGE_CODE_RE = r"[a-z]{2,3}"


def check_languages(languages: Iterable[str], known: Collection[str] | None) -> list[str]:
    """Normalize language codes (lower case, each once, in the order given); refuse bad ones."""
    import re

    codes: list[str] = []
    for raw in languages:
        code = raw.strip().lower()
        if not re.fullmatch(LANGUAGE_CODE_RE, code):
            raise AccountError(f"{raw!r} is not a language code (use e.g. en, es, vi)")
        if known is not None and code not in known:
            raise AccountError(
                f"unknown language {code!r}: the routing file lists {', '.join(sorted(known))}"
            )
        if code not in codes:
            codes.append(code)
    if not codes:
        raise AccountError("give at least one language")
    return codes


def set_languages(
    session: DbSession,
    username: str,
    languages: list[str],
    actor: str,
    known_languages: Collection[str] | None = None,
) -> list[str]:
    """Replace the languages USERNAME works in; audited as ``user.changed``. Returns them."""
    user = _user(session, username)
    codes = check_languages(languages, known_languages)
    previous = user.language_codes
    user.languages = ",".join(codes)
    record_event(
        session,
        actor=actor,
        action="user.changed",
        details={
            "username": username,
            "change": "languages",
            "languages": codes,
            "previous_languages": previous,
        },
    )
    return codes


def _user(session: DbSession, username: str) -> User:
    user = session.execute(select(User).where(User.username == username)).scalar_one_or_none()
    if user is None:
        raise AccountError(f"no user {username!r}")
    return user


def end_sessions(session: DbSession, user_id: int, now: datetime, reason: str) -> None:
    session.execute(
        update(StaffSession)
        .where(StaffSession.user_id == user_id, StaffSession.ended_at.is_(None))
        .values(ended_at=now, end_reason=reason)
    )


def disable_user(session: DbSession, username: str, actor: str, now: datetime) -> None:
    user = _user(session, username)
    user.disabled = True
    end_sessions(session, user.id, now, "disabled")
    record_event(
        session,
        actor=actor,
        action="user.changed",
        details={"username": username, "change": "disabled"},
    )


def reset_mfa(
    session: DbSession, keyring: phi.Keyring, username: str, actor: str, now: datetime
) -> NewUser:
    user = _user(session, username)
    secret = pyotp.random_base32()
    _seal_totp(keyring, user, secret)
    end_sessions(session, user.id, now, "mfa_reset")
    record_event(
        session,
        actor=actor,
        action="user.changed",
        details={"username": username, "change": "mfa_reset"},
    )
    return NewUser(user, secret)


def create_team(session: DbSession, team_id: str, name: str, spanish: bool, actor: str) -> Team:
    import re

    if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,63}", team_id):
        raise AccountError("team names are lower-case letters, digits and '-'")
    if session.get(Team, team_id) is not None:
        raise AccountError(f"team {team_id!r} already exists")
    team = Team(id=team_id, name=name, spanish=spanish)
    session.add(team)
    record_event(
        session, actor=actor, action="team.created", details={"team": team_id, "spanish": spanish}
    )
    return team


# -- login ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoginPolicy:
    """The numbers of the lockout policy a compliance officer configures (``INTAKE_LOGIN_*``;
    docs/compliance.md, "Lockout policy")."""

    # Failures of one typed username from anywhere before each further one doubles a delay
    # (0 turns the per-account delay off), the quiet time after which the count starts over,
    # and the delays.
    account_budget: int = 20
    account_window: timedelta = timedelta(hours=24)
    account_first_delay: timedelta = timedelta(seconds=60)
    account_max_delay: timedelta = timedelta(minutes=15)
    # Wrong codes in a row after the right password before the second factor is frozen
    # (0: never frozen).
    otp_freeze_after: int = 5

    @classmethod
    def from_settings(cls, settings: Any) -> LoginPolicy:
        return cls(
            account_budget=settings.login_account_budget,
            account_window=timedelta(minutes=settings.login_account_window_minutes),
            account_first_delay=timedelta(seconds=settings.login_account_first_delay_seconds),
            account_max_delay=timedelta(seconds=settings.login_account_max_delay_seconds),
            otp_freeze_after=settings.login_otp_freeze_after,
        )

    def account_delay(self, failures: int) -> timedelta:
        if not self.account_budget or failures < self.account_budget:
            return timedelta(0)
        doublings = min(failures - self.account_budget, 30)
        return min(self.account_first_delay * (2**doublings), self.account_max_delay)


DEFAULT_POLICY = LoginPolicy()


class HashSlots:
    """A cap on the password checks (argon2id, 64 MiB each) running at once in this process.

    Why: each check holds 64 MiB and a core for tens of milliseconds, so a few clients posting
    logins in parallel could exhaust memory and CPU for everyone. Over the cap, an attempt
    waits a moment for a slot and is then answered "busy" (503) instead of queueing without
    bound; it is not counted as a failure, since no password was checked.
    """

    def __init__(self, limit: int, wait_seconds: float = HASH_SLOT_WAIT_SECONDS) -> None:
        self.limit = limit
        self.wait_seconds = wait_seconds
        self._semaphore = threading.BoundedSemaphore(limit)

    @contextlib.contextmanager
    def slot(self) -> Iterator[bool]:
        """Yield whether a slot was free within the wait; release it afterwards."""
        acquired = self._semaphore.acquire(timeout=self.wait_seconds)
        try:
            yield acquired
        finally:
            if acquired:
                self._semaphore.release()


_slots_lock = threading.Lock()
_slots: dict[int, HashSlots] = {}


def hash_slots(limit: int) -> HashSlots:
    """The process-wide :class:`HashSlots` for a cap of ``limit`` (one per process and cap)."""
    with _slots_lock:
        if limit not in _slots:
            _slots[limit] = HashSlots(limit)
        return _slots[limit]


@dataclass(frozen=True)
class LoginResult:
    user: User | None
    token: str | None = None
    # For the audit trail: unknown_user, bad_password, bad_otp, otp_reused, mfa_frozen,
    # disabled, locked, busy. Never shown: every failure but locked and busy reads the same.
    reason: str | None = None
    retry_after: int = 0
    # Committed with the attempt, published after commit: alerts to the supervisors.
    outbox_ids: tuple[int, ...] = ()


def _matching_step(secret: str, code: str, now: datetime) -> int | None:
    """The TOTP time step ``code`` belongs to (one step of drift either way), or None.

    ASCII digits only: ``str.isdigit`` also accepts other scripts' digits, which
    ``hmac.compare_digest`` refuses with an error, and an error only after the right password
    would tell a guesser it was right.
    """
    if not (len(code) == 6 and code.isascii() and code.isdigit()):
        return None
    totp = pyotp.TOTP(secret)
    step = int(now.timestamp()) // totp.interval
    for candidate in (step - 1, step, step + 1):
        if hmac.compare_digest(totp.generate_otp(candidate), code):
            return candidate
    return None


def _lock_delay(failures: int) -> timedelta:
    extra = failures - FREE_FAILURES
    if extra < 0:
        return timedelta(0)
    return min(FIRST_LOCK * (2**extra), MAX_LOCK)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _throttle_row(session: DbSession, key: str, now: datetime) -> LoginThrottle:
    """The throttle row ``key``, created if need be, locked until the transaction ends.

    Inserted with "on conflict do nothing" first, so attempts arriving together for a name
    nobody tried yet (a spray from many addresses) all lock the same row instead of failing
    on a duplicate key.
    """
    dialect = session.get_bind().dialect.name
    insert = postgresql_insert if dialect == "postgresql" else sqlite_insert
    session.execute(
        insert(LoginThrottle)
        .values(key=key, failures=0, updated_at=now)
        .on_conflict_do_nothing(index_elements=["key"])
    )
    return session.execute(
        select(LoginThrottle)
        .where(LoginThrottle.key == key)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).scalar_one()


def client_throttle_key(keyring: phi.Keyring, username: str, client: str | None) -> str:
    return phi.blind_index(keyring, "login", f"{username}|{client or '-'}")


def account_throttle_key(keyring: phi.Keyring, username: str) -> str:
    return phi.blind_index(keyring, "login-account", username)


def _wait_seconds(until: datetime | None, now: datetime) -> int:
    if until is None or until <= now:
        return 0
    return int((until - now).total_seconds()) + 1


def _verify_password(password_hash: str, password: str) -> bool:
    try:
        return bool(_hasher.verify(password_hash, password))
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def authenticate(
    session: DbSession,
    keyring: phi.Keyring,
    *,
    username: str,
    password: str,
    otp: str,
    now: datetime,
    ip_hmac: str | None,
    client: str | None = None,
    known_device: str | None = None,
    policy: LoginPolicy = DEFAULT_POLICY,
    slots: HashSlots | None = None,
) -> LoginResult:
    """Check password and TOTP; on success start a server-side session. Every outcome is
    audited in the same transaction; the caller commits, then publishes ``outbox_ids``.

    Why: guessing must stay slow however many addresses the guesser has, without letting one
    workstation's mistakes lock everyone out, and without letting refused attempts cost a
    password check. Three counters, all keyed on the *typed* username so unknown names are
    counted, timed and answered exactly like real ones:

    - per (username, client): ``client`` is the pseudonym of the client's network (an IPv6
      /64 counts as one), or of a device that logged in to this account before
      (``known_device``); a few free failures, then delays doubling from 30 s to 15 minutes;
    - per username from anywhere: ``policy.account_budget`` failures, then doubling, capped
      delays (attempts from a known device are exempt from this one, so an attacker spending
      the budget does not lock a pharmacist out of her own workstation);
    - per account, wrong codes in a row after the right password: at
      ``policy.otp_freeze_after`` the second factor is frozen until an admin clears it, and
      the supervisors are alerted. The frozen account answers like a wrong password, so the
      freeze does not tell the guesser that the password was right.

    A locked attempt is answered before any password check; the checks themselves share the
    process's :class:`HashSlots`.
    """
    typed = username.strip().lower()
    if known_device is not None:
        client = f"device:{known_device}"
    elif client is None:
        client = ip_hmac
    by_client = _throttle_row(session, client_throttle_key(keyring, typed, client), now)
    by_client.updated_at = now
    by_account = _throttle_row(session, account_throttle_key(keyring, typed), now)
    user = session.execute(
        select(User).where(User.username == typed).with_for_update()
    ).scalar_one_or_none()
    actor = f"user:{user.id}" if user else "anonymous"
    role = user.role if user else None

    def failed(reason: str) -> None:
        record_event(
            session,
            actor=actor,
            actor_role=role,
            action="user.login_failed",
            outcome="failure",
            ip_hmac=ip_hmac,
            details={"reason": reason},
        )

    wait = _wait_seconds(by_client.locked_until, now)
    if known_device is None:
        wait = max(wait, _wait_seconds(by_account.locked_until, now))
    if wait:
        failed("locked")
        return LoginResult(user, reason="locked", retry_after=wait)

    with (slots or hash_slots(DEFAULT_HASH_CONCURRENCY)).slot() as free:
        if not free:
            failed("busy")
            return LoginResult(user, reason="busy", retry_after=1)
        # Unknown names cost the same check as a wrong password: no timing tells them apart.
        password_ok = _verify_password(user.password_hash if user else _DUMMY_HASH, password)

    reason = None
    step = None
    outbox_ids: list[int] = []
    if user is None:
        reason = "unknown_user"
    elif not password_ok:
        reason = "bad_password"
    elif user.otp_frozen_at is not None:
        reason = "mfa_frozen"
    else:
        step = _matching_step(totp_secret(keyring, user), otp.strip(), now)
        if step is None:
            reason = "bad_otp"
            outbox_ids += _count_wrong_code(session, user, policy, now, ip_hmac)
        elif step <= user.last_totp_step:
            reason = "otp_reused"
        elif user.disabled:
            reason = "disabled"
    if reason is not None:
        failed(reason)
        if reason != "disabled":
            by_client.failures += 1
            delay = _lock_delay(by_client.failures)
            if delay:
                by_client.locked_until = now + delay
                _record_lock(session, actor, role, ip_hmac, "client", delay, by_client.failures)
            if known_device is None:
                outbox_ids += _count_account_failure(
                    session, by_account, user, actor, role, policy, now, ip_hmac
                )
        return LoginResult(user, reason=reason, outbox_ids=tuple(outbox_ids))
    assert user is not None and step is not None
    session.delete(by_client)
    if known_device is None:
        # Her routine logins from a known device say nothing about a guesser elsewhere, so
        # they must not hand the guesser a fresh budget; a login from a new computer does
        # clear the count (those failures were most likely her own).
        session.delete(by_account)
    user.otp_failures = 0
    user.last_totp_step = step
    user.last_login_at = now
    token = secrets.token_urlsafe(32)
    session.add(
        StaffSession(
            token_hash=hash_token(token), user_id=user.id, created_at=now, last_seen_at=now
        )
    )
    record_event(session, actor=actor, actor_role=user.role, action="user.login", ip_hmac=ip_hmac)
    return LoginResult(user, token=token)


def _record_lock(
    session: DbSession,
    actor: str,
    role: str | None,
    ip_hmac: str | None,
    scope: str,
    delay: timedelta,
    failures: int,
) -> None:
    """Audit a lock of one throttle (``client``: typed name at one address; ``account``)."""
    metrics.ACCOUNT_LOCKS.labels(scope).inc()
    record_event(
        session,
        actor=actor,
        actor_role=role,
        action="user.locked",
        ip_hmac=ip_hmac,
        details={"scope": scope, "seconds": int(delay.total_seconds()), "failures": failures},
    )


def _count_account_failure(
    session: DbSession,
    row: LoginThrottle,
    user: User | None,
    actor: str,
    role: str | None,
    policy: LoginPolicy,
    now: datetime,
    ip_hmac: str | None,
) -> list[int]:
    """Count one failure against the typed username's budget; lock it once the budget is
    spent. The supervisors hear of the first lock of a spell (real accounts only)."""
    if not policy.account_budget:
        return []
    if row.failures and now - row.updated_at > policy.account_window:
        row.failures = 0  # a quiet window: start over
    row.failures += 1
    row.updated_at = now
    delay = policy.account_delay(row.failures)
    if not delay:
        return []
    row.locked_until = now + delay
    _record_lock(session, actor, role, ip_hmac, "account", delay, row.failures)
    if user is None or row.failures != policy.account_budget:
        return []
    message = outbox.enqueue_account_alert(session, user.id, "account_locked")
    session.flush()
    return [message.id]


def _count_wrong_code(
    session: DbSession, user: User, policy: LoginPolicy, now: datetime, ip_hmac: str | None
) -> list[int]:
    """Count a wrong code typed after the right password; freeze the second factor at the
    policy's limit, audited, with an alert to the supervisors."""
    user.otp_failures += 1
    if not policy.otp_freeze_after or user.otp_failures < policy.otp_freeze_after:
        return []
    user.otp_frozen_at = now
    record_event(
        session,
        actor=f"user:{user.id}",
        actor_role=user.role,
        action="user.locked",
        ip_hmac=ip_hmac,
        details={"scope": "mfa", "reason": "mfa_frozen", "failures": user.otp_failures},
    )
    message = outbox.enqueue_account_alert(session, user.id, "mfa_frozen")
    session.flush()
    return [message.id]


def purge_login_throttles(session: DbSession, now: datetime, policy: LoginPolicy) -> int:
    """Delete throttle rows that lock nothing and saw no attempt for the policy's window.

    Why: every typed username leaves rows behind (a spray of made-up names leaves two an
    attempt), and a row that quiet would restart its count anyway; the locks in force stay.
    """
    from sqlalchemy import delete, or_

    stale = now - max(policy.account_window, MAX_LOCK)
    result = session.execute(
        delete(LoginThrottle).where(
            LoginThrottle.updated_at < stale,
            or_(LoginThrottle.locked_until.is_(None), LoginThrottle.locked_until < now),
        )
    )
    session.commit()
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def unfreeze(
    session: DbSession, keyring: phi.Keyring, username: str, actor: str, now: datetime
) -> list[str]:
    """Clear an account's frozen second factor and its per-account delay; audited as
    ``user.changed``. Returns what was cleared (nothing: an empty list, still audited)."""
    user = _user(session, username)
    cleared: list[str] = []
    if user.otp_frozen_at is not None or user.otp_failures:
        cleared.append("mfa_frozen" if user.otp_frozen_at is not None else "otp_failures")
        user.otp_frozen_at = None
        user.otp_failures = 0
    row = session.get(LoginThrottle, account_throttle_key(keyring, user.username))
    if row is not None:
        if row.locked_until is not None and row.locked_until > now:
            cleared.append("account_delay")
        session.delete(row)
    record_event(
        session,
        actor=actor,
        action="user.changed",
        details={"username": user.username, "change": "unfrozen", "cleared": cleared},
    )
    return cleared


def set_password(
    session: DbSession, username: str, password: str, actor: str, now: datetime
) -> None:
    """Give ``username`` a new password (checked by the policy) and end all of their
    sessions; audited as ``user.changed`` (what changed, never the password)."""
    user = _user(session, username)
    check_password_policy(user.username, password)
    if _verify_password(user.password_hash, password):
        raise AccountError("that is the account's current password; choose a new one")
    user.password_hash = _hasher.hash(password)
    end_sessions(session, user.id, now, "password_changed")
    record_event(
        session,
        actor=actor,
        action="user.changed",
        details={"username": user.username, "change": "password_set"},
    )


def load_session(
    session: DbSession, token: str, now: datetime, idle: timedelta, refresh: bool = True
) -> tuple[StaffSession, User] | None:
    """The live session for ``token``, refreshed; None if it ended, idled out or is too old.

    ``refresh=False`` is for requests a page makes on its own (the queue polling for changes):
    they must not count as activity, or an open queue would never idle out.
    """
    # One statement for the session, its user and the user's teams: every staff page runs it.
    found = (
        session.execute(
            select(StaffSession, User)
            .outerjoin(User, User.id == StaffSession.user_id)
            .where(StaffSession.token_hash == hash_token(token))
            .options(joinedload(User.teams))
        )
        .unique()
        .one_or_none()
    )
    if found is None or found[0].ended_at is not None:
        return None
    row, user = found
    reason = None
    if user is None or user.disabled:
        reason = "disabled"
    elif now - row.last_seen_at > idle:
        reason = "idle_timeout"
    elif now - row.created_at > ABSOLUTE_SESSION_LIFETIME:
        reason = "lifetime"
    if reason is not None:
        row.ended_at, row.end_reason = now, reason
        if user is not None:
            record_event(
                session,
                actor=f"user:{user.id}",
                actor_role=user.role,
                action="user.logout",
                details={"reason": reason},
            )
        session.commit()
        return None
    # Refresh at most once a minute, so busy pages do not write on every request.
    if refresh and now - row.last_seen_at > timedelta(seconds=60):
        row.last_seen_at = now
        session.commit()
    assert user is not None
    return row, user


def logout(session: DbSession, token: str, now: datetime, ip_hmac: str | None) -> None:
    row = session.execute(
        select(StaffSession).where(
            StaffSession.token_hash == hash_token(token), StaffSession.ended_at.is_(None)
        )
    ).scalar_one_or_none()
    if row is None:
        return
    row.ended_at, row.end_reason = now, "logout"
    user = session.get(User, row.user_id)
    record_event(
        session,
        actor=f"user:{row.user_id}",
        actor_role=user.role if user else None,
        action="user.logout",
        ip_hmac=ip_hmac,
        details={"reason": "logout"},
    )
    session.commit()
