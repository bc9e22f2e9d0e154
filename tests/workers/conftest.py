"""Real processes for pipeline tests: a throwaway redis-server, Celery workers and beat, and an
SMTP server (aiosmtpd) that keeps what it receives."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email import message_from_bytes
from pathlib import Path
from typing import Any

import pytest
import redis as redis_client

from config import Settings
from tests.conftest import IN_CI

ROOT = Path(__file__).parents[2]
SAMPLE_ROUTING = ROOT / "config" / "routing.toml"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    predicate: Callable[[], Any],
    timeout: float,
    interval: float = 0.2,
    message: str = "condition",
    explain: Callable[[], str] | None = None,
) -> Any:
    """Poll ``predicate`` until it is true; on timeout, fail with what ``explain`` says of the
    state then (the queue, the processes' logs), for a failure seen only in CI."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = f"\n{explain()}" if explain is not None else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {message}{detail}")
        time.sleep(interval)


def stop_process_groups(processes: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each process group started with ``start_new_session``; SIGKILL the ones that stay."""
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    for process in processes:
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


class RedisServer:
    """A redis-server of our own on a free port, which tests may stop and start again."""

    def __init__(
        self, folder: Path, password: str | None = None, tls: TlsFiles | None = None
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            if IN_CI:
                pytest.fail("redis-server is required in CI (scripts/test installs it)")
            pytest.skip("redis-server not installed")
        self.binary, self.folder, self.password, self.tls = binary, folder, password, tls
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{auth}127.0.0.1:{self.port}/0"

    def client(self) -> redis_client.Redis:
        if self.tls:  # trusts the CA that issued the server's own certificate
            return redis_client.Redis.from_url(
                self.url, ssl_ca_certs=str(self.tls.ca_file), ssl_check_hostname=True
            )
        return redis_client.Redis.from_url(self.url)

    def start(self) -> None:
        if self.tls:
            # TLS only (no clear-text port); clients prove themselves by password, not by cert.
            listen = ["--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no"]
            listen += ["--tls-cert-file", str(self.tls.cert_file)]
            listen += ["--tls-key-file", str(self.tls.key_file)]
            listen += ["--tls-ca-cert-file", str(self.tls.ca_file)]
        else:
            listen = ["--port", str(self.port)]
        argv = [
            self.binary,
            *listen,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.folder),
            "--daemonize",
            "no",
        ]
        if self.password:
            argv += ["--requirepass", self.password]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL)  # noqa: S603

        def answers() -> bool:
            try:
                with self.client() as client:
                    return bool(client.ping())
            except redis_client.RedisError:
                return False

        wait_until(answers, 10, 0.05, "redis-server to start")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for a test server: its certificate chain and key, and the CA that issued it."""

    ca_file: Path
    cert_file: Path
    key_file: Path


def issue_tls_files(ca: Any, folder: Path, *hosts: str) -> TlsFiles:
    """Issue a server certificate for ``hosts`` from ``ca`` (a ``trustme.CA``) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    cert = ca.issue_cert(*(hosts or ("127.0.0.1", "localhost")))
    files = TlsFiles(folder / "ca.pem", folder / "server.pem", folder / "server.key")
    ca.cert_pem.write_to_path(str(files.ca_file))
    cert.private_key_pem.write_to_path(str(files.key_file))
    files.cert_file.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    return files


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@dataclass
class Mailbox:
    messages: list[Any] = field(default_factory=list)

    async def handle_DATA(self, _server: Any, _session: Any, envelope: Any) -> str:  # noqa: N802
        self.messages.append(message_from_bytes(envelope.content))
        return "250 Message accepted for delivery"

    def bodies(self) -> list[str]:
        return [m.get_payload(decode=True).decode() for m in self.messages]


@contextlib.contextmanager
def running_smtp(handler: Any, **options: Any) -> Iterator[Any]:
    """An aiosmtpd server on a free port for the block; yields its controller.

    Stopping a controller does not close the connections still open on it (a worker killed
    mid-message, a client that gave up during TLS): their transports are left to the garbage
    collector, which would warn about them during whichever test runs next. On Python 3.11 a
    warning raised inside ``ast.parse`` breaks that parse with a SystemError, so an unrelated
    test would fail. They are collected here, where they are known to be the server's own.

    A connection accepted in the loop's last turn is worse off: its handshake task is
    cancelled before it starts, and the accepted socket is dropped, with its warning, inside
    ``stop()`` on the server's thread. Warning filters are process-wide, so ``stop()`` runs
    under them too.
    """
    from aiosmtpd.controller import Controller

    from intake.requests.notifications import close_smtp_sessions

    port = options.pop("port", None) or free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port, **options)
    controller.start()
    try:
        yield controller
    finally:
        close_smtp_sessions()  # this process's session to it, kept for the next message
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "unclosed transport", ResourceWarning)
            warnings.filterwarnings("ignore", "unclosed <socket.socket", ResourceWarning)
            controller.stop()
            controller.smtpd = None  # the last connection's protocol, holding its transport
            gc.collect()


@pytest.fixture
def smtp_server() -> Iterator[tuple[str, Mailbox]]:
    mailbox = Mailbox()
    with running_smtp(mailbox) as controller:
        yield f"smtp://127.0.0.1:{controller.port}", mailbox


@dataclass
class SlowMailbox(Mailbox):
    """A mail server that takes ``delay`` seconds to accept each message."""

    delay: float = 3.0
    started: int = 0
    url: str = ""

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        self.started += 1
        await asyncio.sleep(self.delay)
        return await super().handle_DATA(server, session, envelope)


@pytest.fixture
def slow_smtp_server() -> Iterator[SlowMailbox]:
    mailbox = SlowMailbox()
    with running_smtp(mailbox) as controller:
        mailbox.url = f"smtp://127.0.0.1:{controller.port}"
        yield mailbox


def email_routing_file(folder: Path) -> Path:
    """The sample routing rules, with every team notified by e-mail."""
    text = SAMPLE_ROUTING.read_text()
    lines = []
    team_id = None
    for line in text.splitlines():
        if line.startswith("id = "):
            team_id = line.split('"')[1]
        if line.startswith("notify = ") and team_id:
            line = f'notify = ["email"]\nemail = "{team_id}@pharmacy.test"'
        lines.append(line)
    path = folder / "routing.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def pipeline_settings(
    base: Settings,
    database_url: str,
    folder: Path,
    redis_url: str,
    smtp_url: str,
    routing_file: Path | None = None,
    **overrides: Any,
) -> Settings:
    """Settings for a pipeline with real parts: quick sweeps, e-mail to every team."""
    values: dict[str, Any] = {
        "database_url": database_url,
        "data_dir": folder / "data",
        "redis_url": redis_url,
        "smtp_url": smtp_url,
        "routing_file": routing_file or email_routing_file(folder),
        "outbox_sweep_seconds": 1,
        "outbox_republish_seconds": 10,
        "broker_visibility_timeout": 5,
    }
    return base.replace(**{**values, **overrides})


def process_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INTAKE_")}
    env.update(
        {
            "INTAKE_DATA_DIR": str(settings.data_dir),
            "INTAKE_DATABASE_URL": settings.effective_database_url,
            "INTAKE_ROUTING_FILE": str(settings.routing_file),
            "INTAKE_OUTBOX_SWEEP_SECONDS": str(settings.outbox_sweep_seconds),
            "INTAKE_OUTBOX_REPUBLISH_SECONDS": str(settings.outbox_republish_seconds),
            "INTAKE_BROKER_VISIBILITY_TIMEOUT": str(settings.broker_visibility_timeout),
            "INTAKE_LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
        }
    )
    # Secrets and services are passed only when the test set them; without them the process
    # uses the data folder's generated ones, as the embedded profile does.
    optional = {
        "INTAKE_SECRET_KEY": settings.secret_key,
        "INTAKE_KEYRING": settings.keyring,
        "INTAKE_REDIS_URL": settings.redis_url,
        "INTAKE_SMTP_URL": settings.smtp_url,
        "INTAKE_SMTP_CA_FILE": str(settings.smtp_ca_file) if settings.smtp_ca_file else None,
        "INTAKE_REDIS_CA_FILE": str(settings.redis_ca_file) if settings.redis_ca_file else None,
    }
    env.update({name: value for name, value in optional.items() if value})
    env.update(extra)
    return env


class CeleryProcess:
    """``celery -A workers worker|beat`` as a separate process group, logging to a file."""

    def __init__(self, settings: Settings, role: str, log_path: Path, *args: str) -> None:
        self.log_path = log_path
        argv = [sys.executable, "-m", "celery", "-A", "workers", role, "--loglevel", "INFO", *args]
        if role == "beat":
            argv += ["--schedule", str(log_path.with_suffix(".schedule"))]
        self._log = log_path.open("ab")
        self.process = subprocess.Popen(  # noqa: S603
            argv,
            env=process_env(settings),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 30) -> CeleryProcess:
        wait_until(
            lambda: b"ready." in self.log_path.read_bytes() or self.process.poll(),
            timeout,
            message=f"worker ready ({self.log_path})",
        )
        assert self.process.poll() is None, self.tail()
        return self

    def tail(self, chars: int = 3000) -> str:
        """The end of the process's log, for a failure message."""
        return f"--- {self.log_path.name}\n" + self.log_path.read_text()[-chars:]

    def kill(self) -> None:
        """SIGKILL the whole process group: main process and pool children, no goodbyes."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


@pytest.fixture
def celery_processes(tmp_path: Path) -> Iterator[Callable[..., CeleryProcess]]:
    started: list[CeleryProcess] = []

    def start(settings: Settings, role: str = "worker", *args: str) -> CeleryProcess:
        name = f"{role}-{len(started)}.log"
        if role == "worker":
            args = (
                "--pool",
                "prefork",
                "--concurrency",
                "2",
                "--without-gossip",
                "--without-mingle",
                "--hostname",
                f"w{len(started)}@%h",
                *args,
            )
        process = CeleryProcess(settings, role, tmp_path / name, *args)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()
