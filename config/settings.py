"""Read the ``INTAKE_*`` environment once into a typed settings object."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(value: str) -> tuple[IPNetwork, ...]:
    """Parse ``10.0.0.5, 172.16.0.0/12, ::1`` into networks; raise ValueError on a bad entry."""
    items = (item.strip() for item in value.split(","))
    return tuple(ipaddress.ip_network(item, strict=False) for item in items if item)


PROFILES = ("embedded", "production")
DEFAULT_ROUTING_FILE = Path(__file__).with_name("routing.toml")
DEFAULT_PHARMACY_FILE = Path(__file__).with_name("pharmacy.toml")
DEFAULT_CONSENTS_DIR = Path(__file__).with_name("consents")


class SettingsError(ValueError):
    """The environment holds a value Intake cannot use."""


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number of seconds, not {raw!r}") from None
    if value < 0:
        raise SettingsError(f"{name} must not be negative")
    return value


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a whole number, not {raw!r}") from None


def _networks(env: Mapping[str, str], name: str) -> tuple[IPNetwork, ...]:
    raw = (env.get(name) or "").strip()
    if not raw:
        return ()
    if raw.isdigit():
        raise SettingsError(
            f"{name} lists the addresses or networks of your reverse proxies "
            f"(e.g. 127.0.0.1 or 10.0.0.0/8), not a count of them: {raw!r}"
        )
    try:
        return parse_networks(raw)
    except ValueError as error:
        raise SettingsError(f"{name}: an entry is no address or network ({error})") from None


def _login_lockout_settings(env: Mapping[str, str]) -> dict[str, int]:
    """The lockout policy's numbers (docs/compliance.md, "Lockout policy"), each checked."""
    defaults = Settings()
    values = {
        "login_account_budget": _int(
            env, "INTAKE_LOGIN_ACCOUNT_BUDGET", defaults.login_account_budget
        ),
        "login_account_window_minutes": _int(
            env, "INTAKE_LOGIN_ACCOUNT_WINDOW_MINUTES", defaults.login_account_window_minutes
        ),
        "login_account_first_delay_seconds": _int(
            env,
            "INTAKE_LOGIN_ACCOUNT_FIRST_DELAY_SECONDS",
            defaults.login_account_first_delay_seconds,
        ),
        "login_account_max_delay_seconds": _int(
            env, "INTAKE_LOGIN_ACCOUNT_MAX_DELAY_SECONDS", defaults.login_account_max_delay_seconds
        ),
        "login_otp_freeze_after": _int(
            env, "INTAKE_LOGIN_OTP_FREEZE_AFTER", defaults.login_otp_freeze_after
        ),
        "login_hash_concurrency": _int(
            env, "INTAKE_LOGIN_HASH_CONCURRENCY", defaults.login_hash_concurrency
        ),
    }
    for field, value in values.items():
        if value < 0:
            raise SettingsError(f"INTAKE_{field.upper()} must not be negative")
    if values["login_hash_concurrency"] < 1:
        raise SettingsError("INTAKE_LOGIN_HASH_CONCURRENCY must be at least 1")
    if values["login_account_budget"] and (
        values["login_account_first_delay_seconds"] < 1
        or values["login_account_max_delay_seconds"] < values["login_account_first_delay_seconds"]
    ):
        raise SettingsError(
            "INTAKE_LOGIN_ACCOUNT_FIRST_DELAY_SECONDS must be at least 1 and no more than "
            "INTAKE_LOGIN_ACCOUNT_MAX_DELAY_SECONDS"
        )
    return values


# Who may ever break the glass, and who may ever review it: admins never read requests, and
# staff do not judge their colleagues' emergency accesses.
BREAK_GLASS_ROLES = ("staff", "supervisor", "compliance")
BREAK_GLASS_REVIEWER_ROLES = ("supervisor", "compliance")


def _roles(
    env: Mapping[str, str],
    name: str,
    allowed: tuple[str, ...],
    default: tuple[str, ...],
    *,
    allow_none: bool = False,
) -> tuple[str, ...]:
    """A comma-separated list of roles out of ``allowed``; ``none`` for no role at all."""
    raw = (env.get(name) or "").strip().lower()
    if not raw:
        return default
    if raw == "none":
        if allow_none:
            return ()
        raise SettingsError(f"{name} needs at least one of {', '.join(allowed)}")
    roles = tuple(dict.fromkeys(item.strip() for item in raw.split(",") if item.strip()))
    unknown = [role for role in roles if role not in allowed]
    if unknown or not roles:
        raise SettingsError(
            f"{name} lists roles out of {', '.join(allowed)}"
            + (" (or none)" if allow_none else "")
            + f", not {', '.join(unknown) or repr(raw)}"
        )
    return roles


MIN_SECRET_BYTES = 32
# What the embedded profile writes into its data folder (intake.ops.embedded,
# intake.audit.checkpoints).
GENERATED_SECRET_FILES = ("secret_key", "keyring.json", "audit-signing-key", "signer/signing-key")
# "xxxx", "aaaa...": one character repeated is a stand-in, whatever its length.
PLACEHOLDER_RE = re.compile(
    r"change[-_ ]?me|replace[-_ ]?me|\.\.\.|^(.)\1*$|^secret$|^password$", re.I
)
# Redis answers AUTH as fast as the network allows and never locks anyone out, so its password
# must resist guessing by volume (Redis's own security notes say the same).
MIN_METRICS_TOKEN_CHARS = 32
MIN_REDIS_PASSWORD_CHARS = 16


def _is_placeholder(value: str) -> bool:
    return bool(PLACEHOLDER_RE.search(value.strip()))


def read_secret_setting(value: str) -> str:
    """A secret setting holds the secret itself or the path of a file that holds it."""
    candidate = value.strip()
    if candidate and not candidate.startswith("{") and "\n" not in candidate:
        path = Path(candidate)
        if path.is_file():
            return path.read_text(encoding="utf-8").strip()
    return candidate


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = (env.get(name) or "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise SettingsError(f"{name} must be 1 or 0, not {raw!r}")


def _witnesses(text: str) -> tuple[str, ...]:
    """INTAKE_AUDIT_WITNESSES: ``URL VKEY`` entries, one per line or separated by ``;``."""
    entries = []
    for entry in text.replace(";", "\n").splitlines():
        parts = entry.split()
        if not parts:
            continue
        if len(parts) != 2 or not parts[0].startswith(("http://", "https://")):
            raise SettingsError(
                "INTAKE_AUDIT_WITNESSES entries must be 'URL VKEY' (the witness's address "
                f"and its public key), one per line or separated by ';': got {entry.strip()!r}"
            )
        _check_witness_key(parts[0], parts[1])
        entries.append(" ".join(parts))
    return tuple(entries)


def _check_witness_key(url: str, vkey: str) -> None:
    """Refuse a witness key no cosignature could ever verify with (garbage, or a log key).

    Why: the signer would drop every cosignature as bad and verify would name no witness,
    with nothing at start to say the setting is wrong.
    """
    from intake_verify import note  # standard library and cryptography only

    try:
        verifier = note.Verifier.from_vkey(vkey)
    except note.NoteError as error:
        raise SettingsError(
            f"INTAKE_AUDIT_WITNESSES: the key of {url} is not a public key ({error}); give "
            "the witness's own vkey, as printed by `intake-verify keygen NAME --witness`"
        ) from None
    if verifier.alg != note.ALG_COSIGNATURE_V1:
        raise SettingsError(
            f"INTAKE_AUDIT_WITNESSES: the key of {url} ({verifier.name}) is not a witness "
            "(cosignature, type 0x04) key; is it the log's own public key? Give the witness's "
            "vkey, as printed by `intake-verify keygen NAME --witness`"
        )


def _path(env: Mapping[str, str], name: str) -> Path | None:
    return Path(env[name]) if env.get(name) else None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _redis_tls_weakened(url: str) -> str | None:
    """The query parameter of a Redis URL that would switch certificate checks off, or None.

    Why: redis-py lets a URL's query override the options Intake passes (the limiter's storage),
    and kombu replaces its whole ``broker_use_ssl`` with the query's ``ssl_*`` values (the
    broker), so ``rediss://...?ssl_cert_reqs=none`` - as hosted-Redis guides often print it -
    would quietly accept any certificate for both, and ``ssl_check_hostname=false`` any
    certificate for any name.
    """
    for name, value in parse_qsl(urlsplit(url).query, keep_blank_values=True):
        name, value = name.lower(), value.strip().lower()
        if name == "ssl_cert_reqs" and value not in ("required", "cert_required"):
            return f"{name}={value}"
        if name == "ssl_check_hostname" and value not in ("true", "1", "yes", "on"):
            return f"{name}={value}"
    return None


# INTAKE_SMTP_URL schemes: clear text, STARTTLS on the submission port, TLS from the first byte.
SMTP_SCHEMES = ("smtp", "smtp+starttls", "smtps")


@dataclass(frozen=True)
class Settings:
    """Everything an Intake process needs to know about its deployment."""

    profile: str = "embedded"
    data_dir: Path = Path("var")
    database_url: str | None = None
    redis_url: str | None = None
    secret_key: str | None = None
    keyring: str | None = None
    audit_signing_key: str | None = None
    audit_checkpoints: Path | None = None
    # Audit trail: public keys for verifying, the log's name, the anchor file, staleness.
    audit_verify_keys: str | None = None
    audit_origin: str | None = None
    audit_anchor: Path | None = None
    audit_max_unsigned_seconds: float | None = None
    smtp_url: str | None = None
    public_url: str = "http://127.0.0.1:8000"
    routing_file: Path = DEFAULT_ROUTING_FILE
    submit_rate_limit: str = "10/minute;60/hour"
    login_rate_limit: str = "10/minute"
    min_fill_seconds: float = 3.0
    max_form_age_seconds: float = 7200.0
    max_content_length: int = 1024 * 1024
    session_idle_minutes: int = 15
    log_level: str = "INFO"
    smtp_from: str = "intake@localhost"
    broker_visibility_timeout: float = 300.0
    outbox_sweep_seconds: float = 5.0
    outbox_republish_seconds: float = 60.0
    audit_checkpoint_seconds: float = 300.0
    retention_days: int = 2190
    trusted_proxies: tuple[IPNetwork, ...] = ()
    # -- database roles and transport security --
    database_app_role: str | None = None
    smtp_ca_file: Path | None = None
    smtp_allow_plaintext: bool = False
    redis_ca_file: Path | None = None
    # Staff login: the per-account failure budget, the second-factor freeze and the cap on
    # concurrent password checks (docs/compliance.md, "Lockout policy").
    login_account_budget: int = 20
    login_account_window_minutes: int = 1440
    login_account_first_delay_seconds: int = 60
    login_account_max_delay_seconds: int = 900
    login_otp_freeze_after: int = 5
    login_hash_concurrency: int = 4
    # The pharmacy's identity and legal texts (issue 9): the file and folder are checked at
    # start-up; name, phone and time zone override the file's values when set.
    pharmacy_file: Path = DEFAULT_PHARMACY_FILE
    pharmacy_name: str | None = None
    pharmacy_phone: str | None = None
    timezone: str | None = None
    consents_dir: Path = DEFAULT_CONSENTS_DIR
    # Break-glass policy (docs/compliance.md, "Break-glass policy").
    break_glass_roles: tuple[str, ...] = ("staff", "supervisor", "compliance")
    break_glass_alert_roles: tuple[str, ...] = ("compliance",)
    break_glass_reviewers: tuple[str, ...] = ("compliance",)
    # Witnesses that cosign audit checkpoints (docs/audit-trail.md, "Witnesses"): "URL VKEY"
    # entries, one per line (or separated by ";").
    audit_witnesses: tuple[str, ...] = ()
    # Prometheus (docs/deploy.md, "Monitoring"): GET /metrics answers only with this bearer
    # token (404 while unset); a Celery worker serves its own on this port when set.
    metrics_token: str | None = None
    worker_metrics_port: int | None = None

    @property
    def embedded(self) -> bool:
        return self.profile == "embedded"

    @property
    def max_unsigned_seconds(self) -> float:
        """How old an event may get before a missing checkpoint over it fails verification."""
        return self.audit_max_unsigned_seconds or 3 * self.audit_checkpoint_seconds

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'intake.sqlite3').resolve()}"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``env`` (``os.environ`` by default)."""
        env = os.environ if env is None else env
        profile = env.get("INTAKE_PROFILE", "embedded") or "embedded"
        if profile not in PROFILES:
            raise SettingsError(f"INTAKE_PROFILE must be one of {', '.join(PROFILES)}")
        settings = cls(
            profile=profile,
            data_dir=Path(env.get("INTAKE_DATA_DIR") or "var"),
            database_url=env.get("INTAKE_DATABASE_URL") or None,
            redis_url=env.get("INTAKE_REDIS_URL") or None,
            secret_key=env.get("INTAKE_SECRET_KEY") or None,
            metrics_token=env.get("INTAKE_METRICS_TOKEN") or None,
            worker_metrics_port=_int(env, "INTAKE_WORKER_METRICS_PORT", 0) or None,
            keyring=env.get("INTAKE_KEYRING") or None,
            audit_signing_key=env.get("INTAKE_AUDIT_SIGNING_KEY") or None,
            audit_checkpoints=Path(env["INTAKE_AUDIT_CHECKPOINTS"])
            if env.get("INTAKE_AUDIT_CHECKPOINTS")
            else None,
            audit_verify_keys=env.get("INTAKE_AUDIT_VERIFY_KEYS") or None,
            audit_origin=(env.get("INTAKE_AUDIT_ORIGIN") or "").strip() or None,
            audit_anchor=_path(env, "INTAKE_AUDIT_ANCHOR"),
            audit_max_unsigned_seconds=_float(env, "INTAKE_AUDIT_MAX_UNSIGNED_SECONDS", 0.0)
            or None,
            smtp_url=env.get("INTAKE_SMTP_URL") or None,
            public_url=(env.get("INTAKE_PUBLIC_URL") or cls.public_url).rstrip("/"),
            routing_file=Path(env.get("INTAKE_ROUTING_FILE") or DEFAULT_ROUTING_FILE),
            submit_rate_limit=env.get("INTAKE_SUBMIT_RATE_LIMIT") or cls.submit_rate_limit,
            login_rate_limit=env.get("INTAKE_LOGIN_RATE_LIMIT") or cls.login_rate_limit,
            min_fill_seconds=_float(env, "INTAKE_MIN_FILL_SECONDS", cls.min_fill_seconds),
            max_form_age_seconds=_float(
                env, "INTAKE_MAX_FORM_AGE_SECONDS", cls.max_form_age_seconds
            ),
            session_idle_minutes=_int(env, "INTAKE_SESSION_IDLE_MINUTES", 15),
            log_level=(env.get("INTAKE_LOG_LEVEL") or "INFO").upper(),
            smtp_from=env.get("INTAKE_SMTP_FROM") or cls.smtp_from,
            broker_visibility_timeout=_float(env, "INTAKE_BROKER_VISIBILITY_TIMEOUT", 300.0),
            outbox_sweep_seconds=_float(env, "INTAKE_OUTBOX_SWEEP_SECONDS", 5.0),
            outbox_republish_seconds=_float(env, "INTAKE_OUTBOX_REPUBLISH_SECONDS", 60.0),
            audit_checkpoint_seconds=_float(env, "INTAKE_AUDIT_CHECKPOINT_SECONDS", 300.0),
            retention_days=_int(env, "INTAKE_RETENTION_DAYS", 2190),
            trusted_proxies=_networks(env, "INTAKE_TRUSTED_PROXIES"),
            # -- database roles and transport security --
            database_app_role=env.get("INTAKE_DATABASE_APP_ROLE") or None,
            smtp_ca_file=_path(env, "INTAKE_SMTP_CA_FILE"),
            smtp_allow_plaintext=_flag(env, "INTAKE_SMTP_ALLOW_PLAINTEXT"),
            redis_ca_file=_path(env, "INTAKE_REDIS_CA_FILE"),
        )
        settings = settings.replace(**_login_lockout_settings(env))
        settings = replace(
            settings,
            pharmacy_file=Path(env.get("INTAKE_PHARMACY_FILE") or DEFAULT_PHARMACY_FILE),
            pharmacy_name=(env.get("INTAKE_PHARMACY_NAME") or "").strip() or None,
            pharmacy_phone=(env.get("INTAKE_PHARMACY_PHONE") or "").strip() or None,
            timezone=(env.get("INTAKE_TIMEZONE") or "").strip() or None,
            consents_dir=Path(env.get("INTAKE_CONSENTS_DIR") or DEFAULT_CONSENTS_DIR),
            break_glass_roles=_roles(
                env, "INTAKE_BREAK_GLASS_ROLES", BREAK_GLASS_ROLES, cls.break_glass_roles
            ),
            break_glass_alert_roles=_roles(
                env,
                "INTAKE_BREAK_GLASS_ALERT_ROLES",
                BREAK_GLASS_ROLES,
                cls.break_glass_alert_roles,
                allow_none=True,
            ),
            break_glass_reviewers=_roles(
                env,
                "INTAKE_BREAK_GLASS_REVIEWERS",
                BREAK_GLASS_REVIEWER_ROLES,
                cls.break_glass_reviewers,
            ),
            audit_witnesses=_witnesses(env.get("INTAKE_AUDIT_WITNESSES") or ""),
        )
        settings.check()
        settings.check_transport()
        return settings

    def check(self) -> None:
        """Refuse a production profile that lacks its secrets or would run unsafely.

        Why: a deployment that starts with a placeholder secret, the embedded profile's generated
        key files, an SQLite file or a Redis without a password looks healthy and is not. Each
        refusal names the variable to fix, so the operator learns at start-up, not from a breach.
        """
        if self.profile != "production":
            return
        missing = [
            name
            for name, value in (
                ("INTAKE_SECRET_KEY", self.secret_key),
                ("INTAKE_KEYRING", self.keyring),
                ("INTAKE_DATABASE_URL", self.database_url),
                ("INTAKE_REDIS_URL", self.redis_url),
                # Public keys: every process verifies; only the signer also holds the private
                # key (INTAKE_AUDIT_SIGNING_KEY, refused anywhere else: intake.audit.keys).
                ("INTAKE_AUDIT_VERIFY_KEYS", self.audit_verify_keys),
            )
            if not value
        ]
        if missing:
            raise SettingsError(
                "the production profile needs "
                + ", ".join(missing)
                + "; secrets are never generated outside the embedded profile"
            )
        problems: list[str] = []
        for name, raw in (
            ("INTAKE_SECRET_KEY", self.secret_key),
            ("INTAKE_KEYRING", self.keyring),
            ("INTAKE_AUDIT_SIGNING_KEY", self.audit_signing_key),
        ):
            if name != "INTAKE_AUDIT_SIGNING_KEY" or raw:
                problems += self._secret_problems(name, raw or "")
        verify_keys = read_secret_setting(self.audit_verify_keys or "")
        if _is_placeholder(verify_keys):
            problems.append(
                "INTAKE_AUDIT_VERIFY_KEYS is a placeholder; put the public key printed by "
                "`intake audit keys generate` there"
            )
        elif "PRIVATE+KEY" in verify_keys:
            problems.append(
                "INTAKE_AUDIT_VERIFY_KEYS holds a private key; give it the public keys only "
                "(the INTAKE_AUDIT_VERIFY_KEYS= line of `intake audit keys generate`)"
            )
        secret = read_secret_setting(self.secret_key or "")
        if len(secret.encode()) < MIN_SECRET_BYTES:
            problems.append(
                f"INTAKE_SECRET_KEY is {len(secret.encode())} bytes; use at least "
                f'{MIN_SECRET_BYTES} random bytes (python -c "import secrets; '
                f'print(secrets.token_urlsafe(48))")'
            )
        database = self.database_url or ""
        if database.startswith("sqlite"):
            problems.append(
                "INTAKE_DATABASE_URL is an SQLite file; the production profile runs on PostgreSQL"
            )
        elif _is_placeholder(urlsplit(database).password or ""):
            problems.append("INTAKE_DATABASE_URL holds a placeholder password")
        redis_password = unquote(urlsplit(self.redis_url or "").password or "").strip()
        if not redis_password:
            problems.append(
                "INTAKE_REDIS_URL has no password (redis://:PASSWORD@host:6379/0); a Redis "
                "without one lets anyone on its network read and inject tasks"
            )
        elif _is_placeholder(redis_password):
            problems.append("INTAKE_REDIS_URL holds a placeholder password")
        elif len(redis_password) < MIN_REDIS_PASSWORD_CHARS:
            problems.append(
                f"INTAKE_REDIS_URL's password is {len(redis_password)} characters; use at least "
                f"{MIN_REDIS_PASSWORD_CHARS} random ones (Redis lets anyone who reaches it "
                "guess passwords as fast as the network allows)"
            )
        token = read_secret_setting(self.metrics_token or "")
        if self.metrics_token and (_is_placeholder(token) or len(token) < MIN_METRICS_TOKEN_CHARS):
            problems.append(
                f"INTAKE_METRICS_TOKEN must be at least {MIN_METRICS_TOKEN_CHARS} random "
                "characters (python -c \"import secrets; print(secrets.token_urlsafe(32))\"), "
                "or unset to turn /metrics off"
            )
        public = urlsplit(self.public_url)
        if public.scheme != "https" or not public.hostname:
            # Staff links in team e-mails are built from it, never from the request's Host: an
            # unset one sends pharmacists to http://127.0.0.1:8000, a plain http:// one puts
            # every reference in clear text on the wire before nginx redirects.
            problems.append(
                f"INTAKE_PUBLIC_URL is {self.public_url!r}; set it to the https:// address "
                "people use (links in team e-mails point there)"
            )
        if problems:
            raise SettingsError("unsafe production settings: " + "; ".join(problems))

    def _secret_problems(self, name: str, raw: str) -> list[str]:
        """Placeholders and the embedded profile's generated key files, for one secret."""
        value = read_secret_setting(raw)
        if _is_placeholder(value):
            return [f"{name} is a placeholder; put the real secret there"]
        data_dir = self.data_dir.resolve()
        for generated in GENERATED_SECRET_FILES:
            path = data_dir / generated
            if raw.strip() and Path(raw.strip()).resolve() == path:
                return [f"{name} points at {path}, a key file the embedded profile generated"]
            if path.is_file() and path.read_text(encoding="utf-8").strip() == value:
                return [f"{name} is the key the embedded profile generated into {path}"]
        return []

    def check_transport(self) -> None:
        """Refuse settings that would talk to the mail server or Redis unprotected.

        Why: a notification carries a reference and a staff link, and an SMTP login carries a
        password; on a network the pharmacy does not control, clear text gives both away. So
        production refuses clear-text SMTP to anything but this machine unless the operator says
        the relay sits on a trusted network (INTAKE_SMTP_ALLOW_PLAINTEXT=1), and no profile ever
        sends an SMTP password in clear text off this machine. Messages name the variable, never
        the URL (it may hold a password).
        """
        if self.smtp_url:
            parts = urlsplit(self.smtp_url)
            if parts.scheme not in SMTP_SCHEMES or not parts.hostname:
                raise SettingsError(
                    "INTAKE_SMTP_URL must look like smtp+starttls://host:587, smtps://host:465"
                    " or smtp://host:25"
                )
            clear_off_machine = parts.scheme == "smtp" and not _is_loopback(parts.hostname)
            if clear_off_machine and parts.username:
                raise SettingsError(
                    "INTAKE_SMTP_URL would send the SMTP password in clear text to "
                    f"{parts.hostname}; use smtp+starttls:// or smtps://"
                )
            if clear_off_machine and not self.embedded and not self.smtp_allow_plaintext:
                raise SettingsError(
                    f"INTAKE_SMTP_URL sends mail to {parts.hostname} in clear text; use "
                    "smtp+starttls:// or smtps://, or set INTAKE_SMTP_ALLOW_PLAINTEXT=1 for a "
                    "relay on a trusted network"
                )
        if self.smtp_ca_file:
            if not self.smtp_url or urlsplit(self.smtp_url).scheme == "smtp":
                raise SettingsError(
                    "INTAKE_SMTP_CA_FILE needs an smtp+starttls:// or smtps:// INTAKE_SMTP_URL"
                )
            if not self.smtp_ca_file.is_file():
                raise SettingsError(f"INTAKE_SMTP_CA_FILE: no such file {self.smtp_ca_file}")
        weakened = _redis_tls_weakened(self.redis_url or "")
        if weakened:
            raise SettingsError(
                f"INTAKE_REDIS_URL turns off Redis's certificate check ({weakened}); remove it "
                "from the URL and name a private CA with INTAKE_REDIS_CA_FILE instead"
            )
        if self.redis_ca_file:
            if not (self.redis_url or "").startswith("rediss://"):
                raise SettingsError("INTAKE_REDIS_CA_FILE needs a rediss:// INTAKE_REDIS_URL")
            if not self.redis_ca_file.is_file():
                raise SettingsError(f"INTAKE_REDIS_CA_FILE: no such file {self.redis_ca_file}")

    def replace(self, **changes: Any) -> Settings:
        return replace(self, **changes)
