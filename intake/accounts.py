"""Staff accounts: passwords (argon2id), TOTP second factor, login throttling, server-side
sessions.

Why: staff sessions open PHI, so a stolen password alone must not be enough (TOTP), a TOTP
code seen over a shoulder must not work twice (the last used time step is stored), guessing
must be slow (per-account delays that grow, per-IP limits) without letting an attacker lock a
real user out for long (delays are capped at 15 minutes), and ending a session must really end
it: the cookie only carries a random token whose server-side row can be ended by logout, an
admin disabling the account, 15 idle minutes or 12 hours.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import secrets
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache
from importlib import resources

import pyotp
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import select, update

from intake import phi
from intake.audit import record_event
from intake.extensions import DbSession
from intake.models import ROLES, LoginThrottle, StaffSession, Team, User, UserTeam

MIN_PASSWORD_LENGTH = 12
ABSOLUTE_SESSION_LIFETIME = timedelta(hours=12)
TOTP_ISSUER = "Intake"
# After this many failures in a row, each further failure locks the account for a delay that
# doubles from FIRST_LOCK up to MAX_LOCK.
FREE_FAILURES = 5
FIRST_LOCK = timedelta(seconds=30)
MAX_LOCK = timedelta(minutes=15)

_hasher = PasswordHasher()  # argon2id with the library's current recommended parameters
# A well-formed hash of a random password, verified when the username is unknown so that an
# unknown user costs the same time as a wrong password.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


class AccountError(ValueError):
    """A request about an account that cannot be carried out; the message says why."""


@cache
def common_passwords() -> frozenset[str]:
    text = resources.files("intake").joinpath("data", "common-passwords.txt").read_text("utf-8")
    return frozenset(
        line.strip().lower() for line in text.splitlines() if line.strip() and line[0] != "#"
    )


def check_password_policy(username: str, password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AccountError(f"the password must have at least {MIN_PASSWORD_LENGTH} characters")
    lowered = password.lower()
    if lowered in common_passwords():
        raise AccountError("that password is in the list of common passwords")
    if username.lower() in lowered:
        raise AccountError("the password must not contain the username")
    if len(set(password)) < 4:
        raise AccountError("the password repeats too few different characters")


def _user_row_id(user_id: int) -> str:
    return f"user:{user_id}"


def _seal_totp(keyring: phi.Keyring, user: User, secret: str) -> None:
    data_key, wrapped = phi.new_data_key(keyring, _user_row_id(user.id))
    user.kek_id, user.wrapped_key = wrapped.kek_id, wrapped.blob
    user.totp_secret = phi.seal(data_key, _user_row_id(user.id), "totp", {"secret": secret})
    user.last_totp_step = 0


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
class LoginResult:
    user: User | None
    token: str | None = None
    reason: str | None = None  # for the audit trail: bad_password, bad_otp, locked, disabled
    retry_after: int = 0


def _matching_step(secret: str, code: str, now: datetime) -> int | None:
    """The TOTP time step ``code`` belongs to (one step of drift either way), or None."""
    if not (code.isdigit() and len(code) == 6):
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


def _throttle(
    session: DbSession, keyring: phi.Keyring, username: str, ip_hmac: str | None
) -> LoginThrottle:
    key = phi.blind_index(keyring, "login", f"{username}|{ip_hmac or '-'}")
    row = session.get(LoginThrottle, key, with_for_update=True)
    if row is None:
        row = LoginThrottle(key=key, failures=0)
        session.add(row)
    return row


def authenticate(
    session: DbSession,
    keyring: phi.Keyring,
    *,
    username: str,
    password: str,
    otp: str,
    now: datetime,
    ip_hmac: str | None,
) -> LoginResult:
    """Check password and TOTP; on success start a server-side session. Every outcome is
    audited in the same transaction; the caller commits.

    Failures are counted per (typed username, client): after a few, each further failure
    doubles the wait, up to 15 minutes. Unknown usernames are counted and timed exactly like
    real ones, so neither the answers nor the locks reveal which accounts exist.
    """
    typed = username.strip().lower()
    throttle = _throttle(session, keyring, typed, ip_hmac)
    throttle.updated_at = now
    user = session.execute(
        select(User).where(User.username == typed).with_for_update()
    ).scalar_one_or_none()
    actor = f"user:{user.id}" if user else "anonymous"
    role = user.role if user else None
    if throttle.locked_until is not None and throttle.locked_until > now:
        with contextlib.suppress(VerificationError):
            _hasher.verify(_DUMMY_HASH, password)
        wait = int((throttle.locked_until - now).total_seconds()) + 1
        record_event(
            session,
            actor=actor,
            actor_role=role,
            action="user.login_failed",
            outcome="failure",
            ip_hmac=ip_hmac,
            details={"reason": "locked"},
        )
        return LoginResult(user, reason="locked", retry_after=wait)

    reason = None
    step = None
    if user is None:
        with contextlib.suppress(VerificationError):
            _hasher.verify(_DUMMY_HASH, password)
        reason = "unknown_user"
    else:
        password_ok: bool
        try:
            password_ok = _hasher.verify(user.password_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            password_ok = False
        step = _matching_step(totp_secret(keyring, user), otp.strip(), now) if password_ok else None
        if not password_ok:
            reason = "bad_password"
        elif step is None:
            reason = "bad_otp"
        elif step <= user.last_totp_step:
            reason = "otp_reused"
        elif user.disabled:
            reason = "disabled"
    if reason is not None:
        if reason != "disabled":
            throttle.failures += 1
        record_event(
            session,
            actor=actor,
            actor_role=role,
            action="user.login_failed",
            outcome="failure",
            ip_hmac=ip_hmac,
            details={"reason": reason},
        )
        delay = _lock_delay(throttle.failures)
        if delay:
            throttle.locked_until = now + delay
            record_event(
                session,
                actor=actor,
                actor_role=role,
                action="user.locked",
                ip_hmac=ip_hmac,
                details={"seconds": int(delay.total_seconds()), "failures": throttle.failures},
            )
        return LoginResult(user, reason=reason)
    assert user is not None and step is not None
    session.delete(throttle)
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


def load_session(
    session: DbSession, token: str, now: datetime, idle: timedelta, refresh: bool = True
) -> tuple[StaffSession, User] | None:
    """The live session for ``token``, refreshed; None if it ended, idled out or is too old.

    ``refresh=False`` is for requests a page makes on its own (the queue polling for changes):
    they must not count as activity, or an open queue would never idle out.
    """
    row = session.execute(
        select(StaffSession).where(StaffSession.token_hash == hash_token(token))
    ).scalar_one_or_none()
    if row is None or row.ended_at is not None:
        return None
    user = session.get(User, row.user_id)
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
