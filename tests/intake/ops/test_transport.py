"""Transport settings: which mail and Redis URLs Intake accepts, and the rate limiter over TLS.

The limiter's counters live in Redis; over ``rediss://`` they must reach only a server whose
certificate the operator's CA vouches for.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from config import Settings
from config.settings import SettingsError
from tests.intake.patient.test_status import look_up
from tests.workers.conftest import RedisServer, TlsFiles, free_port, issue_tls_files

PRODUCTION = Settings(profile="production")


@pytest.mark.parametrize(
    "url",
    [
        "smtp+starttls://mail.pharmacy.test:587",
        "smtps://intake:pw@mail.pharmacy.test",
        "smtp://127.0.0.1:25",
        "smtp://localhost:1025",
    ],
)
def test_production_accepts_tls_mail_and_clear_text_only_on_this_machine(url):
    PRODUCTION.replace(smtp_url=url).check_transport()


def test_production_refuses_clear_text_mail_to_another_host():
    with pytest.raises(SettingsError, match="INTAKE_SMTP_URL sends mail to mail.pharmacy.test"):
        PRODUCTION.replace(smtp_url="smtp://mail.pharmacy.test:25").check_transport()
    # A relay on a network the operator trusts, said out loud.
    PRODUCTION.replace(smtp_url="smtp://relay:25", smtp_allow_plaintext=True).check_transport()


def test_no_profile_sends_an_smtp_password_in_clear_text_off_this_machine():
    for settings in (PRODUCTION, Settings()):
        with pytest.raises(SettingsError, match="password in clear text") as refused:
            settings.replace(
                smtp_url="smtp://intake:hunter2-secret@mail.pharmacy.test",
                smtp_allow_plaintext=True,
            ).check_transport()
        assert "hunter2" not in str(refused.value)


def test_transport_settings_are_read_and_checked_from_the_environment(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    settings = Settings.from_env(
        {
            "INTAKE_DATA_DIR": str(tmp_path),
            "INTAKE_SMTP_URL": "smtp+starttls://mail.pharmacy.test",
            "INTAKE_SMTP_CA_FILE": str(ca),
            "INTAKE_REDIS_URL": "rediss://:pw@redis.pharmacy.test:6380/0",
            "INTAKE_REDIS_CA_FILE": str(ca),
            "INTAKE_SMTP_ALLOW_PLAINTEXT": "0",
            "INTAKE_DATABASE_APP_ROLE": "intake_app",
        }
    )
    assert (settings.smtp_ca_file, settings.redis_ca_file) == (ca, ca)
    assert settings.database_app_role == "intake_app" and not settings.smtp_allow_plaintext
    for env, complaint in (
        ({"INTAKE_SMTP_URL": "smtp+tls://mail"}, "INTAKE_SMTP_URL must look like"),
        ({"INTAKE_SMTP_URL": "smtp://127.0.0.1", "INTAKE_SMTP_CA_FILE": str(ca)}, "needs an smtp+"),
        ({"INTAKE_SMTP_URL": "smtps://m", "INTAKE_SMTP_CA_FILE": "/nope.pem"}, "no such file"),
        ({"INTAKE_REDIS_URL": "redis://r:6379/0", "INTAKE_REDIS_CA_FILE": str(ca)}, "rediss://"),
        ({"INTAKE_SMTP_ALLOW_PLAINTEXT": "perhaps"}, "INTAKE_SMTP_ALLOW_PLAINTEXT must be"),
    ):
        with pytest.raises(SettingsError, match=complaint.replace("+", r"\+")):
            Settings.from_env({"INTAKE_DATA_DIR": str(tmp_path), **env})


@pytest.mark.parametrize(
    "query",
    [
        "ssl_cert_reqs=none",
        "ssl_cert_reqs=CERT_NONE",
        "ssl_cert_reqs=optional",
        "ssl_check_hostname=false",
        "db=0&ssl_check_hostname=0",
    ],
)
def test_a_redis_url_cannot_switch_the_certificate_check_off(tmp_path, query):
    """Attack: ``?ssl_cert_reqs=none`` (hosted-Redis guides print it) in INTAKE_REDIS_URL.

    redis-py lets the URL's query override the options the limiter passes, and kombu replaces
    ``broker_use_ssl`` with the query's ``ssl_*`` values, so both the broker and the limiter
    would accept an impostor's certificate (or any name). The setting is refused instead.
    """
    url = f"rediss://:pw-long-enough-0123@redis.pharmacy.test:6380/0?{query}"
    with pytest.raises(SettingsError, match="INTAKE_REDIS_URL turns off") as refused:
        Settings.from_env({"INTAKE_DATA_DIR": str(tmp_path), "INTAKE_REDIS_URL": url})
    assert "pw-long-enough" not in str(refused.value)
    for harmless in ("ssl_cert_reqs=required", "ssl_check_hostname=true", "db=1"):
        ok = url.split("?")[0] + "?" + harmless
        Settings.from_env({"INTAKE_DATA_DIR": str(tmp_path), "INTAKE_REDIS_URL": ok})


# -- the rate limiter over rediss:// -------------------------------------------------------------

trustme = pytest.importorskip("trustme")


@pytest.fixture
def certificates(tmp_path) -> tuple[TlsFiles, TlsFiles]:
    """Files from the operator's CA, and from an impostor's."""
    return (
        issue_tls_files(trustme.CA(), tmp_path / "trusted"),
        issue_tls_files(trustme.CA(), tmp_path / "impostor"),
    )


@pytest.fixture
def limited(
    settings, tmp_path, certificates
) -> Iterator[tuple[Settings, RedisServer, RedisServer]]:
    trusted, impostor = certificates
    servers = [
        RedisServer(tmp_path / "good", password="limits-secret", tls=trusted),
        RedisServer(tmp_path / "bad", password="limits-secret", tls=impostor),
    ]
    for server in servers:
        server.folder.mkdir()
        server.start()
    yield (
        settings.replace(submit_rate_limit="3/minute", redis_ca_file=trusted.ca_file),
        *servers,
    )
    for server in servers:
        server.stop()


def limiter_keys(server: RedisServer) -> list[bytes]:
    with server.client() as client:
        return [key for key in client.keys("*") if b"intake-limits" in key]


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_the_limiter_counts_in_redis_over_verified_tls(limited, make_app):
    settings, good, _bad = limited
    app = make_app(settings.replace(redis_url=good.url))
    app.config["TESTING"] = True
    client = app.test_client()
    answers = [look_up(client, "R-0000-0000", "1980-01-01").status_code for _ in range(4)]
    assert answers == [200, 200, 200, 429]
    assert limiter_keys(good), "the limiter kept its counters somewhere else"
    app.extensions["celery"].close()


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_the_limiter_sends_nothing_to_redis_with_an_impostor_certificate(limited, make_app):
    settings, _good, bad = limited
    app = make_app(settings.replace(redis_url=bad.url))
    app.config["TESTING"] = True
    client = app.test_client()
    # Patients are still served (and still limited, in memory), but Redis learns nothing.
    answers = [look_up(client, "R-0000-0000", "1980-01-01").status_code for _ in range(4)]
    assert answers == [200, 200, 200, 429]
    assert limiter_keys(bad) == []
    app.extensions["celery"].close()


# -- PostgreSQL over TLS: the sslmode the docs tell operators to use ----------------------------


class TlsPostgres:
    """A throwaway PostgreSQL server of our own with ``ssl = on`` and a test CA's certificate."""

    def __init__(self, files: TlsFiles) -> None:
        binaries = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
        if not binaries:
            pytest.skip("PostgreSQL server binaries not installed")
        self.bin = binaries[-1].parent
        self.files, self.port = files, free_port()
        # initdb refuses root: run the server as the postgres user, in a folder it owns.
        self.user = "postgres" if os.geteuid() == 0 else None
        self.folder = Path(tempfile.mkdtemp(prefix="intake-pg-tls-"))

    def _run(self, *argv: str) -> None:
        prefix = ["runuser", "-u", self.user, "--"] if self.user else []
        done = subprocess.run(  # noqa: S603
            [*prefix, *argv], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, f"{argv[0]}: {done.stdout[-1500:]}{done.stderr[-1500:]}"

    def start(self) -> None:
        for name, source in (
            ("server.pem", self.files.cert_file),
            ("server.key", self.files.key_file),
        ):
            shutil.copyfile(source, self.folder / name)
        (self.folder / "server.key").chmod(0o600)
        if self.user:
            shutil.chown(self.folder, self.user)
            for path in self.folder.iterdir():
                shutil.chown(path, self.user)
        data = self.folder / "data"
        self._run(
            str(self.bin / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"
        )
        options = (
            f"-c port={self.port} -c listen_addresses=127.0.0.1"
            f" -c unix_socket_directories={self.folder} -c ssl=on"
            f" -c ssl_cert_file={self.folder / 'server.pem'}"
            f" -c ssl_key_file={self.folder / 'server.key'}"
        )
        # -l: the server writes to a log file, not to (and holding open) our pipes.
        log = str(self.folder / "server.log")
        self._run(
            str(self.bin / "pg_ctl"), "-D", str(data), "-o", options, "-l", log, "-w", "start"
        )

    def stop(self) -> None:
        data = self.folder / "data"
        if (data / "postmaster.pid").exists():
            self._run(str(self.bin / "pg_ctl"), "-D", str(data), "-m", "immediate", "-s", "stop")
        shutil.rmtree(self.folder, ignore_errors=True)

    def url(self, host: str, sslmode: str, ca_file: Path) -> str:
        return (
            f"postgresql+psycopg://postgres@{host}:{self.port}/postgres"
            f"?sslmode={sslmode}&sslrootcert={ca_file}"
        )


@pytest.fixture
def tls_postgres(certificates) -> Iterator[TlsPostgres]:
    trusted, _impostor = certificates
    server = TlsPostgres(issue_tls_files(trustme.CA(), trusted.ca_file.parent / "pg", "127.0.0.1"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


def connects_over_tls(url: str) -> bool | str:
    """True when the session is encrypted; the driver's message when the connection fails."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return bool(
                conn.execute(
                    sa.text("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
                ).scalar()
            )
    except sa.exc.OperationalError as error:
        return str(error.orig)
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_sslmode_verify_full_checks_the_database_servers_certificate_and_name(tls_postgres):
    ca = tls_postgres.files.ca_file
    assert connects_over_tls(tls_postgres.url("127.0.0.1", "verify-full", ca)) is True
    other_ca = tls_postgres.folder.parent / f"{tls_postgres.folder.name}-other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    try:
        refused = connects_over_tls(tls_postgres.url("127.0.0.1", "verify-full", other_ca))
    finally:
        other_ca.unlink()
    assert isinstance(refused, str) and "certificate verify failed" in refused
    # The certificate names 127.0.0.1, not localhost: verify-full notices, verify-ca does not.
    wrong_name = connects_over_tls(tls_postgres.url("localhost", "verify-full", ca))
    assert isinstance(wrong_name, str) and "does not match host name" in wrong_name
    assert connects_over_tls(tls_postgres.url("localhost", "verify-ca", ca)) is True
