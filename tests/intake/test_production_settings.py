"""The production profile refuses to start on unsafe settings, naming the variable; files that
Intake writes are readable by its own user only."""

from __future__ import annotations

import base64
import os
import secrets
import stat
from pathlib import Path

import pytest

from config import Settings, SettingsError
from intake import create_app
from intake.audit import keys
from intake.crypto.phi import Keyring
from tests.conftest import Patient, reference_from


@pytest.fixture(params=["sqlite"])
def backend(request):
    return request.param


SKEY, VKEY = keys.generate_keys("intake.pharmacy.test/intake-audit")


def production_env(tmp_path: Path, **overrides: str) -> dict[str, str]:
    env = {
        "INTAKE_PROFILE": "production",
        "INTAKE_DATA_DIR": str(tmp_path / "data"),
        "INTAKE_SECRET_KEY": secrets.token_urlsafe(48),
        "INTAKE_KEYRING": Keyring.generate().to_json(),
        # The signer's key: the settings accept it, create_app refuses it outside the signer.
        "INTAKE_AUDIT_SIGNING_KEY": base64.b64encode(os.urandom(32)).decode(),
        "INTAKE_AUDIT_VERIFY_KEYS": VKEY,
        "INTAKE_DATABASE_URL": "postgresql+psycopg://intake:Vq7-db-pass-91@db:5432/intake",
        "INTAKE_REDIS_URL": "redis://:Rk2-redis-pass-55@redis:6379/0",
        "INTAKE_PUBLIC_URL": "https://intake.pharmacy.test",
    }
    env.update(overrides)
    return {k: v for k, v in env.items() if v}


def test_safe_production_settings_are_accepted(tmp_path):
    assert Settings.from_env(production_env(tmp_path)).profile == "production"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"INTAKE_SECRET_KEY": "change-me"}, "INTAKE_SECRET_KEY is a placeholder"),
        ({"INTAKE_SECRET_KEY": "short-but-real-7Hq"}, "INTAKE_SECRET_KEY is 18 bytes"),
        ({"INTAKE_AUDIT_SIGNING_KEY": "change-me"}, "INTAKE_AUDIT_SIGNING_KEY is a placeholder"),
        (
            {"INTAKE_KEYRING": '{"primary": "k1", "keks": {"k1": "..."}}'},
            "INTAKE_KEYRING is a placeholder",
        ),
        ({"INTAKE_DATABASE_URL": "sqlite:////var/lib/intake/intake.sqlite3"}, "SQLite"),
        (
            {"INTAKE_DATABASE_URL": "postgresql+psycopg://intake:change-me-postgres@db/intake"},
            "INTAKE_DATABASE_URL holds a placeholder password",
        ),
        ({"INTAKE_REDIS_URL": "redis://redis:6379/0"}, "INTAKE_REDIS_URL has no password"),
        (
            {"INTAKE_REDIS_URL": "redis://:change-me-redis@redis:6379/0"},
            "INTAKE_REDIS_URL holds a placeholder password",
        ),
        ({"INTAKE_REDIS_URL": ""}, "needs INTAKE_REDIS_URL"),
        # Every process verifies checkpoints with public keys, never with the private one.
        ({"INTAKE_AUDIT_VERIFY_KEYS": ""}, "needs INTAKE_AUDIT_VERIFY_KEYS"),
        ({"INTAKE_AUDIT_VERIFY_KEYS": "change-me"}, "INTAKE_AUDIT_VERIFY_KEYS is a placeholder"),
        ({"INTAKE_AUDIT_VERIFY_KEYS": SKEY}, "INTAKE_AUDIT_VERIFY_KEYS holds a private key"),
        # Ways around the checks above: one character repeated, a user with an empty password,
        # a password of percent-encoded blanks, and one short enough to guess by volume.
        ({"INTAKE_SECRET_KEY": "a" * 48}, "INTAKE_SECRET_KEY is a placeholder"),
        ({"INTAKE_SECRET_KEY": "  CHANGE-ME  "}, "INTAKE_SECRET_KEY is a placeholder"),
        ({"INTAKE_REDIS_URL": "redis://default:@redis:6379/0"}, "INTAKE_REDIS_URL has no password"),
        ({"INTAKE_REDIS_URL": "redis://:%20%20%20@redis:6379/0"}, "INTAKE_REDIS_URL has no pass"),
        ({"INTAKE_REDIS_URL": "redis://:Rk2-redis-55@redis/0"}, "password is 12 characters"),
        # Staff links in team e-mails come from INTAKE_PUBLIC_URL: unset, they pointed at
        # http://127.0.0.1:8000; over http://, a reference crossed the network in clear text.
        ({"INTAKE_PUBLIC_URL": ""}, "INTAKE_PUBLIC_URL is 'http://127.0.0.1:8000'"),
        ({"INTAKE_PUBLIC_URL": "http://intake.pharmacy.test"}, "INTAKE_PUBLIC_URL is 'http:"),
        ({"INTAKE_PUBLIC_URL": "https://"}, "INTAKE_PUBLIC_URL is 'https:"),
    ],
)
def test_unsafe_production_settings_stop_start_up_naming_the_variable(
    tmp_path, overrides, message
):
    with pytest.raises(SettingsError, match=message):
        Settings.from_env(production_env(tmp_path, **overrides))


def test_the_example_env_file_is_refused_as_it_stands(tmp_path):
    """An operator who copies .env.example and forgets a value is told which one."""
    example = Path(__file__).parents[2] / ".env.example"
    values = {}
    for line in example.read_text().splitlines():
        if line and not line.startswith("#") and "=" in line:
            name, value = line.split("=", 1)
            values[name] = value
    env = production_env(
        tmp_path,
        INTAKE_SECRET_KEY=values["INTAKE_SECRET_KEY"],
        INTAKE_KEYRING=values["INTAKE_KEYRING"],
        INTAKE_AUDIT_VERIFY_KEYS=values["INTAKE_AUDIT_VERIFY_KEYS"],
    )
    with pytest.raises(SettingsError, match="INTAKE_SECRET_KEY is a placeholder"):
        Settings.from_env(env)


def test_the_signer_example_env_file_is_refused_as_it_stands(tmp_path):
    example = Path(__file__).parents[2] / "signer.env.example"
    name, value = next(
        line.split("=", 1)
        for line in example.read_text().splitlines()
        if line.startswith("INTAKE_AUDIT_SIGNING_KEY=")
    )
    with pytest.raises(SettingsError, match="INTAKE_AUDIT_SIGNING_KEY is a placeholder"):
        Settings.from_env(production_env(tmp_path, **{name: value}))


def test_production_web_and_workers_refuse_the_signing_key_but_the_signer_takes_it(tmp_path):
    settings = Settings.from_env(production_env(tmp_path, INTAKE_AUDIT_SIGNING_KEY=SKEY))
    with pytest.raises(SettingsError, match="INTAKE_AUDIT_SIGNING_KEY is set, but only the signer"):
        create_app(settings)
    signer = create_app(settings, signer=True)
    assert keys.load_signer(signer.extensions["intake.settings"]).verifier.vkey == VKEY


def test_the_embedded_profiles_generated_keys_are_refused_in_production(tmp_path):
    data = tmp_path / "data"
    create_app(Settings(data_dir=data))  # the embedded profile writes its keys
    for name, variable in (("secret_key", "INTAKE_SECRET_KEY"), ("keyring.json", "INTAKE_KEYRING")):
        path = data / name
        with pytest.raises(SettingsError, match=f"{variable} points at .*{name}"):
            Settings.from_env(production_env(tmp_path, **{variable: str(path)}))
        with pytest.raises(SettingsError, match=f"{variable} is the key the embedded profile"):
            Settings.from_env(production_env(tmp_path, **{variable: path.read_text()}))


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_data_folder_database_wal_and_logs_are_private_after_start(tmp_path):
    data = tmp_path / "var"
    data.mkdir(mode=0o755)
    old_log = data / "logs"
    old_log.mkdir(mode=0o755)
    (old_log / "intake.log").write_text("")
    (old_log / "intake.log").chmod(0o644)
    previous = os.umask(0o022)
    try:
        from flask_migrate import upgrade

        app = create_app(Settings(data_dir=data, min_fill_seconds=0))
        with app.app_context():
            upgrade()
        app.config["TESTING"] = True
        reference_from(Patient(app.test_client()).refill())
        from intake.audit import checkpoints

        with app.app_context():
            from intake.extensions import db

            checkpoints.write_checkpoint(
                db.session, app.extensions["intake.settings"], actor="system:test"
            )
            # While the database is open, its write-ahead log exists too.
            modes = {p.name: _mode(p) for p in data.rglob("*") if p.is_file()}
            db.engine.dispose()
        assert os.umask(0o077) == 0o077
    finally:
        os.umask(previous)
    assert _mode(data) == 0o700
    assert _mode(data / "logs") == 0o700
    assert {"intake.sqlite3", "intake.sqlite3-wal", "intake.log", "secret_key"} <= set(modes)
    assert any("checkpoint" in name for name in modes), modes
    assert {name: oct(mode) for name, mode in modes.items() if mode & 0o077} == {}


def test_a_secret_given_as_a_file_path_is_checked_like_the_value(tmp_path):
    """The path form of a secret setting is read and judged by its content: a short or
    placeholder secret in a file is refused as it would be inline."""
    for content, message in (
        ("short-but-real-7Hq\n", "INTAKE_SECRET_KEY is 18 bytes"),
        ("  Change-Me  \n", "INTAKE_SECRET_KEY is a placeholder"),
    ):
        secret_file = tmp_path / "flask-secret"
        secret_file.write_text(content)
        with pytest.raises(SettingsError, match=message):
            Settings.from_env(production_env(tmp_path, INTAKE_SECRET_KEY=f" {secret_file} "))
