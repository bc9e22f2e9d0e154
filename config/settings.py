"""Read the ``INTAKE_*`` environment once into a typed settings object."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

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
    trusted_proxies: int = 0
    # The pharmacy's identity and legal texts (issue 9): the file and folder are checked at
    # start-up; name, phone and time zone override the file's values when set.
    pharmacy_file: Path = DEFAULT_PHARMACY_FILE
    pharmacy_name: str | None = None
    pharmacy_phone: str | None = None
    timezone: str | None = None
    consents_dir: Path = DEFAULT_CONSENTS_DIR

    @property
    def embedded(self) -> bool:
        return self.profile == "embedded"

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
            keyring=env.get("INTAKE_KEYRING") or None,
            audit_signing_key=env.get("INTAKE_AUDIT_SIGNING_KEY") or None,
            audit_checkpoints=Path(env["INTAKE_AUDIT_CHECKPOINTS"])
            if env.get("INTAKE_AUDIT_CHECKPOINTS")
            else None,
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
            trusted_proxies=_int(env, "INTAKE_TRUSTED_PROXIES", 0),
        )
        settings = replace(
            settings,
            pharmacy_file=Path(env.get("INTAKE_PHARMACY_FILE") or DEFAULT_PHARMACY_FILE),
            pharmacy_name=(env.get("INTAKE_PHARMACY_NAME") or "").strip() or None,
            pharmacy_phone=(env.get("INTAKE_PHARMACY_PHONE") or "").strip() or None,
            timezone=(env.get("INTAKE_TIMEZONE") or "").strip() or None,
            consents_dir=Path(env.get("INTAKE_CONSENTS_DIR") or DEFAULT_CONSENTS_DIR),
        )
        settings.check()
        return settings

    def check(self) -> None:
        """Refuse a production profile that lacks its secrets."""
        if self.profile == "production":
            missing = [
                name
                for name, value in (
                    ("INTAKE_SECRET_KEY", self.secret_key),
                    ("INTAKE_KEYRING", self.keyring),
                    ("INTAKE_DATABASE_URL", self.database_url),
                    ("INTAKE_AUDIT_SIGNING_KEY", self.audit_signing_key),
                )
                if not value
            ]
            if missing:
                raise SettingsError(
                    "the production profile needs "
                    + ", ".join(missing)
                    + "; secrets are never generated outside the embedded profile"
                )

    def replace(self, **changes: Any) -> Settings:
        return replace(self, **changes)
