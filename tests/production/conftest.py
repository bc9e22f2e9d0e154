"""The production profile as deployed, on this machine: nginx terminating TLS in front of
gunicorn, PostgreSQL (an owner role for migrations, an app role for the processes), a
password-protected Redis, Celery workers (one pool routing, one notifying) and beat, the audit
signer (the only process given the checkpoint signing key), an SMTP relay that insists on
STARTTLS.

``production_stack`` (one per test session) starts every piece as a process of its own. The
migrate, web, worker, notifier, beat and signer processes run the very commands of
docker-compose.yml (gunicorn's flags included; only the bind address and the proxy address
differ), and nginx runs Debian's binary with the server config rendered from
``deploy/nginx/intake.conf.template``, the file compose mounts into its nginx, so the stack
tested here and the one deployed cannot drift apart.
Secrets are random and long, chosen here, and nothing else from the outer ``INTAKE_*``
environment reaches the processes.

The stack serves ``https://localhost:<port>`` with a certificate from a throwaway CA
(``trustme``); Python clients trust it through ``ssl_context()``, Chromium through an NSS
database in a temporary HOME. Without nginx, Chromium, certutil or PostgreSQL these tests are
skipped, except under ``CI=true`` where a missing piece is a failure.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlencode, urlsplit

import pyotp
import pytest
import sqlalchemy as sa
import yaml

from intake.crypto.phi import Keyring, ip_pseudonym
from intake_verify.note import generate_key
from tests.browser.conftest import CHROMIUM, CHROMIUM_ARGS, OUTPUT_ROOT
from tests.conftest import HIDDEN_RE, IN_CI, POSTGRES_URL, _admin_engine, _with_database
from tests.workers.conftest import (
    Mailbox,
    RedisServer,
    email_routing_file,
    free_port,
    running_smtp,
    wait_until,
)

ROOT = Path(__file__).parents[2]
COMPOSE_SERVICES: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())[
    "services"
]
NGINX_TEMPLATE = ROOT / "deploy" / "nginx" / "intake.conf.template"
# The official nginx image's envsubst fills in ${NAME} (and bare $NAME) for names in its
# environment; the template uses the braced form only, for upper-case names only.
PLACEHOLDER_RE = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")
BARE_PLACEHOLDER_RE = re.compile(r"\$[A-Z]")
VENV_BIN = Path(sys.executable).parent
SIGNER_SECONDS = 2
PROXY_ADDRESS = "127.0.0.1"  # nginx connects to gunicorn from here: the one trusted proxy
STAFF_PASSWORD_BYTES = 18


def missing(message: str) -> NoReturn:
    if IN_CI:
        pytest.fail(f"{message} (required under CI=true)")
    pytest.skip(message)


def render_nginx_config(values: Mapping[str, str]) -> str:
    """The template with its placeholders filled in, as the nginx image's envsubst does."""
    text = NGINX_TEMPLATE.read_text()
    assert not BARE_PLACEHOLDER_RE.search(text), "write placeholders as ${NAME}"
    unfilled = sorted(set(PLACEHOLDER_RE.findall(text)) - set(values))
    assert not unfilled, f"no value for the nginx template's {unfilled}"
    return PLACEHOLDER_RE.sub(lambda match: values[match.group(1)], text)


def compose_argv(service: str, options: Mapping[str, str] | None = None) -> list[str]:
    """The command of a docker-compose.yml service, run from this virtualenv, with the value
    after each option in ``options`` replaced (every one of them must be there)."""
    argv = [str(part) for part in COMPOSE_SERVICES[service]["command"]]
    argv[0] = str(VENV_BIN / argv[0])
    for option, value in (options or {}).items():
        assert option in argv, f"docker-compose.yml's {service} command has no {option}"
        argv[argv.index(option) + 1] = value
    return argv


class Service:
    """One process of the stack, in its own process group, writing to its own log file."""

    def __init__(self, name: str, argv: list[str], env: Mapping[str, str], folder: Path) -> None:
        self.name = name
        self.log = folder / f"{name}.log"
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                argv,
                env=dict(env),
                cwd=folder,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def running(self) -> bool:
        return self.process.poll() is None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait_for_log(self, text: str, timeout: float) -> None:
        wait_until(
            lambda: text in self.log_text() or not self.running(),
            timeout,
            message=f"{self.name} to log {text!r}",
        )
        assert self.running(), f"{self.name} exited:\n{self.tail()}"

    def stop(self) -> None:
        if self.running():
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)


@dataclass(frozen=True)
class StaffUser:
    username: str
    password: str
    totp_secret: str

    def otp(self) -> str:
        return pyotp.TOTP(self.totp_secret).now()


@dataclass
class Response:
    status: int
    headers: http.client.HTTPMessage
    text: str

    def header(self, name: str) -> str | None:
        return self.headers.get(name)


class WebClient:
    """A non-browser client that connects from a source address of its choice.

    Every loopback address (127.0.0.0/8) works on Linux, so tests can be several clients at
    once. Cookies are kept by name (Secure ones too, also over the plain-HTTP door straight to
    gunicorn); redirects are not followed, so tests see each answer as it was sent.
    """

    def __init__(self, base_url: str, source: str, context: ssl.SSLContext | None = None) -> None:
        parts = urlsplit(base_url)
        self.base_url = base_url
        self.https = parts.scheme == "https"
        self.host, self.port = parts.hostname or "localhost", parts.port or 443
        self.source, self.context = source, context
        self.cookies: dict[str, str] = {}

    def request(
        self,
        method: str,
        path: str,
        form: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        connection: http.client.HTTPConnection
        if self.https:
            connection = http.client.HTTPSConnection(
                self.host,
                self.port,
                context=self.context,
                source_address=(self.source, 0),
                timeout=30,
            )
        else:
            connection = http.client.HTTPConnection(
                self.host, self.port, source_address=(self.source, 0), timeout=30
            )
        sent = dict(headers or {})
        if self.cookies:
            sent["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        body = None
        if form is not None:
            body = urlencode(form).encode()
            sent["Content-Type"] = "application/x-www-form-urlencoded"
        try:
            connection.request(method, path, body=body, headers=sent)
            answer = connection.getresponse()
            text = answer.read().decode(errors="replace")
        finally:
            connection.close()
        for raw in answer.headers.get_all("Set-Cookie") or []:
            for name, morsel in SimpleCookie(raw).items():
                if morsel["max-age"] == "0" or not morsel.value:
                    self.cookies.pop(name, None)
                else:
                    self.cookies[name] = morsel.value
        return Response(answer.status, answer.headers, text)

    def get(self, path: str, headers: Mapping[str, str] | None = None) -> Response:
        return self.request("GET", path, headers=headers)

    def post_form(
        self, path: str, fields: Mapping[str, str], headers: Mapping[str, str] | None = None
    ) -> Response:
        """GET the form at ``path``, then POST it back with ``fields``, as a browser would
        (same-origin ``Origin`` and ``Referer`` over HTTPS)."""
        page = self.get(path, headers)
        assert page.status == 200, (page.status, page.text[:500])
        hidden = dict(HIDDEN_RE.findall(page.text))
        sent = dict(headers or {})
        if self.https:
            sent.setdefault("Origin", self.base_url)
            sent.setdefault("Referer", self.base_url + path)
        return self.request("POST", path, {**hidden, **fields}, sent)

    def log_in(
        self, username: str, password: str, otp: str, headers: Mapping[str, str] | None = None
    ) -> Response:
        fields = {"username": username, "password": password, "otp": otp}
        return self.post_form("/staff/login", fields, headers)


class ProductionStack:
    """What a test needs of the running stack: addresses, the CA, the database, the logs."""

    def __init__(
        self,
        *,
        folder: Path,
        base_url: str,
        http_url: str,
        gunicorn_url: str,
        database_url: str,
        env: Mapping[str, str],
        keyring: Keyring,
        ca_file: Path,
        mailbox: Mailbox,
    ) -> None:
        self.folder = folder
        self.base_url = base_url  # https://localhost:<port>, through nginx
        self.http_url = http_url  # nginx's plain-HTTP port, which only redirects
        self.gunicorn_url = gunicorn_url  # the web process itself, bypassing the proxy
        self.database_url = database_url
        self.env = dict(env)
        self.keyring = keyring
        self.ca_file = ca_file
        self.mailbox = mailbox
        self.services: dict[str, Service] = {}
        # The private key only the signer process is given (for tests that look for it).
        self.signing_key = ""
        # The routing worker's metrics port (INTAKE_WORKER_METRICS_PORT, that worker's alone).
        self.worker_metrics_port = 0
        self.engine = sa.create_engine(database_url, pool_pre_ping=True)

    # -- clients --------------------------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext:
        """Verifies the stack's certificate against the test CA, and nothing else."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    def client(self, source: str) -> WebClient:
        """A client of the https site (through nginx) connecting from ``source``."""
        return WebClient(self.base_url, source, self.ssl_context())

    def direct_client(self, source: str) -> WebClient:
        """A client of gunicorn itself, skipping the proxy, connecting from ``source``."""
        return WebClient(self.gunicorn_url, source)

    # -- operator commands ----------------------------------------------------------------

    def intake(self, *args: str, stdin: str = "") -> str:
        """Run the ``intake`` command with the stack's environment; return what it printed."""
        done = subprocess.run(
            [str(VENV_BIN / "intake"), *args],
            env=self.env,
            cwd=self.folder,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, f"intake {' '.join(args)}: {done.stderr[-2000:]}"
        return done.stdout

    def ensure_team(self, team: str) -> None:
        exists = self.query("SELECT 1 FROM teams WHERE id = :team", team=team)
        if not exists:
            self.intake("teams", "create", team)

    def create_staff(
        self, username: str, teams: tuple[str, ...] = ("refills-main",), role: str = "staff"
    ) -> StaffUser:
        """An account made as an operator makes one: ``intake users create --json``."""
        import json

        for team in teams:
            self.ensure_team(team)
        password = secrets.token_urlsafe(STAFF_PASSWORD_BYTES)
        team_args = [arg for team in teams for arg in ("--team", team)]
        printed = self.intake(
            "users",
            "create",
            username,
            "--role",
            role,
            *team_args,
            "--json",
            stdin=password + "\n",
        )
        created = json.loads(printed)
        assert created["username"] == username
        return StaffUser(username, password, created["totp_secret"])

    # -- what is stored -------------------------------------------------------------------

    def query(self, sql: str, **params: Any) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(sa.text(sql), params))

    def last_audit_seq(self) -> int:
        return int(self.query("SELECT coalesce(max(seq), 0) FROM audit_events")[0][0])

    def audit_events_after(self, seq: int, action: str | None = None) -> list[Any]:
        sql = "SELECT seq, actor, action, reference, ip_hmac FROM audit_events WHERE seq > :seq"
        if action:
            sql += " AND action = :action"
        return self.query(sql + " ORDER BY seq", seq=seq, action=action)

    def ip_pseudonym(self, address: str) -> str:
        """What the audit trail and the rate limiter call a client at ``address``."""
        pseudonym = ip_pseudonym(self.keyring, address)
        assert pseudonym
        return pseudonym

    def request_status(self, reference: str) -> str | None:
        rows = self.query("SELECT status FROM requests WHERE reference = :r", r=reference)
        return rows[0][0] if rows else None

    def wait_for_status(self, reference: str, status: str, timeout: float = 30) -> None:
        wait_until(
            lambda: self.request_status(reference) == status,
            timeout,
            0.25,
            f"{reference} to become {status!r} (now {self.request_status(reference)!r})",
        )

    # -- processes ------------------------------------------------------------------------

    def start(
        self, name: str, argv: list[str], extra_env: Mapping[str, str] | None = None
    ) -> Service:
        service = Service(name, argv, {**self.env, **(extra_env or {})}, self.folder)
        self.services[name] = service
        return service

    def log_files(self) -> list[Path]:
        """Every log the stack writes: each process's output and nginx's own logs."""
        files = [service.log for service in self.services.values()]
        files += [self.folder / "nginx-access.log", self.folder / "nginx-error.log"]
        files += sorted((self.folder / "data" / "logs").glob("*"))
        return [path for path in files if path.is_file()]

    def logs(self, lines: int = 40) -> str:
        """The end of every process's log, for a failing test's report."""
        parts = []
        for service in self.services.values():
            state = "running" if service.running() else f"exited {service.process.returncode}"
            parts.append(f"--- {service.name} ({state}): {service.log}\n{service.tail(lines)}")
        return "\n".join(parts)


def _https_ready(stack: ProductionStack) -> bool:
    try:
        return stack.client(PROXY_ADDRESS).get("/healthz").status == 200
    except OSError:
        return False


def _gunicorn_ready(stack: ProductionStack) -> bool:
    try:
        return stack.direct_client(PROXY_ADDRESS).get("/readyz").status == 200
    except OSError:
        return False


def _create_database(admin: sa.Engine, cleanup: contextlib.ExitStack) -> tuple[str, str, str]:
    """A fresh database and an app role of its own, set up as compose's PostgreSQL init script
    does (the role owns nothing; only it and the owner may connect); dropped at cleanup.
    Return the owner's URL, the app role's URL and the role's name."""
    suffix = uuid.uuid4().hex[:12]
    name, role, password = f"intake_prod_{suffix}", f"intake_app_{suffix}", secrets.token_hex(16)
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        conn.execute(
            sa.text(
                f"CREATE ROLE \"{role}\" LOGIN PASSWORD '{password}' "
                "NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS"
            )
        )
        conn.execute(sa.text(f'REVOKE ALL ON DATABASE "{name}" FROM PUBLIC'))
        conn.execute(sa.text(f'GRANT CONNECT ON DATABASE "{name}" TO "{role}"'))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            conn.execute(sa.text(f'DROP ROLE IF EXISTS "{role}"'))

    cleanup.callback(drop)
    owner_url = _with_database(POSTGRES_URL, name)
    app_url = sa.make_url(owner_url).set(username=role, password=password)
    return owner_url, app_url.render_as_string(hide_password=False), role


def _write_certificates(folder: Path) -> tuple[Path, Path]:
    """A throwaway CA and a certificate from it for localhost and 127.0.0.1, laid out as the
    compose nginx expects (``fullchain.pem``, ``privkey.pem``); return that folder and the CA."""
    import trustme

    ca = trustme.CA(organization_name="Intake test CA")
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    certs = folder / "certs"
    certs.mkdir()
    (certs / "fullchain.pem").write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(certs / "privkey.pem"))
    ca_file = folder / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return certs, ca_file


def _process_env(settings: Mapping[str, str], home: Path) -> dict[str, str]:
    """The stack's environment: this one without any ``INTAKE_*`` the test did not choose."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("INTAKE_") and k != "FORWARDED_ALLOW_IPS"
    }
    env.update(settings)
    env["INTAKE_LOG_LEVEL"] = "INFO"
    env["PYTHONUNBUFFERED"] = "1"
    # gunicorn keeps a control socket in $HOME/.gunicorn: one per stack, not shared with others.
    env["HOME"] = str(home)
    return env


def _nginx_main_config(folder: Path, server_config: Path) -> str:
    """The outer nginx.conf of the test: everything nginx writes stays in ``folder``.

    The official image's own nginx.conf plays this part in compose; the server blocks, which
    are what matter, come from the shared template either way.
    """
    temp = folder / "temp"
    for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (temp / name).mkdir(parents=True, exist_ok=True)
    # Run as root (as here), nginx would hand its workers to "nobody", who cannot enter the
    # test's private temporary folder; keep them as the user running the tests.
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name};" if os.geteuid() == 0 else ""
    return f"""{user}
worker_processes 1;
pid {folder / "nginx.pid"};
error_log {folder / "nginx-error.log"} info;
events {{ worker_connections 256; }}
http {{
    client_body_temp_path {temp / "client_body"};
    proxy_temp_path {temp / "proxy"};
    fastcgi_temp_path {temp / "fastcgi"};
    uwsgi_temp_path {temp / "uwsgi"};
    scgi_temp_path {temp / "scgi"};
    include {server_config};
}}
"""


@pytest.fixture(scope="session")
def production_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProductionStack]:
    nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    if nginx is None:
        missing("nginx is not installed (apt-get install nginx)")
    admin = _admin_engine()
    try:
        with admin.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError as error:
        admin.dispose()
        missing(f"PostgreSQL unreachable at {POSTGRES_URL}: {error}")
    folder = tmp_path_factory.mktemp("production")
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(admin.dispose)
        database_url, app_database_url, app_role = _create_database(admin, cleanup)

        redis_folder = folder / "redis"
        redis_folder.mkdir()
        redis = RedisServer(redis_folder, password=secrets.token_urlsafe(32))
        redis.start()
        cleanup.callback(redis.stop)

        certs, ca_file = _write_certificates(folder)

        # The mail relay insists on STARTTLS before MAIL FROM, so every message that arrives
        # came encrypted, to a server the worker verified against the test CA.
        mailbox = Mailbox()
        smtp_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        smtp_tls.load_cert_chain(certs / "fullchain.pem", certs / "privkey.pem")
        smtp = cleanup.enter_context(
            running_smtp(mailbox, tls_context=smtp_tls, require_starttls=True)
        )

        https_port, http_port, web_port = free_port(), free_port(), free_port()
        base_url = f"https://localhost:{https_port}"
        data_dir = folder / "data"
        data_dir.mkdir(mode=0o700)
        home = folder / "home"
        home.mkdir(mode=0o700)
        keyring = Keyring.generate()
        # The signer's key pair: the private half goes to the signer process alone (compose:
        # signer.env), the public half to everyone. Anchor and checkpoints share a folder
        # apart from the data folder, as compose's intake-audit volume.
        signing_key, verify_key = generate_key(f"localhost:{https_port}/intake-audit")
        audit_dir = folder / "audit"
        audit_dir.mkdir(mode=0o700)
        env = _process_env(
            {
                "INTAKE_PROFILE": "production",
                "INTAKE_DATA_DIR": str(data_dir),
                # web, worker, beat and operator commands connect as the app role, as in compose.
                "INTAKE_DATABASE_URL": app_database_url,
                "INTAKE_REDIS_URL": redis.url,
                "INTAKE_SECRET_KEY": secrets.token_urlsafe(36),  # 48 characters
                "INTAKE_KEYRING": keyring.to_json(),
                "INTAKE_AUDIT_VERIFY_KEYS": verify_key,
                "INTAKE_AUDIT_ANCHOR": str(audit_dir / "audit-anchor.log"),
                "INTAKE_AUDIT_CHECKPOINTS": str(audit_dir / "audit-checkpoints.jsonl"),
                "INTAKE_PUBLIC_URL": base_url,
                "INTAKE_TRUSTED_PROXIES": PROXY_ADDRESS,
                "INTAKE_SMTP_URL": f"smtp+starttls://127.0.0.1:{smtp.port}",
                "INTAKE_SMTP_CA_FILE": str(ca_file),
                "INTAKE_SMTP_FROM": "intake@pharmacy.test",
                "INTAKE_ROUTING_FILE": str(email_routing_file(folder)),
                # GET /metrics (web) and the routing worker's own port answer with this token.
                "INTAKE_METRICS_TOKEN": secrets.token_urlsafe(36),  # 48 characters
            },
            home,
        )
        stack = ProductionStack(
            folder=folder,
            base_url=base_url,
            http_url=f"http://localhost:{http_port}",
            gunicorn_url=f"http://127.0.0.1:{web_port}",
            database_url=database_url,
            env=env,
            keyring=keyring,
            ca_file=ca_file,
            mailbox=mailbox,
        )
        stack.signing_key = signing_key
        stack.worker_metrics_port = free_port()
        cleanup.callback(stack.engine.dispose)

        # Migrations run as the owner and grant the app role its privileges, as in compose.
        owner_env = {
            **env,
            "INTAKE_DATABASE_URL": database_url,
            "INTAKE_DATABASE_APP_ROLE": app_role,
        }
        migrate = subprocess.run(
            compose_argv("migrate"),
            env=owner_env,
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert migrate.returncode == 0, f"intake db upgrade failed:\n{migrate.stderr[-3000:]}"

        web = stack.start(
            "web",
            compose_argv(
                "web",
                {"--bind": f"127.0.0.1:{web_port}", "--forwarded-allow-ips": PROXY_ADDRESS},
            ),
        )
        cleanup.callback(web.stop)
        worker = stack.start(
            "worker",
            compose_argv("worker"),
            {"INTAKE_WORKER_METRICS_PORT": str(stack.worker_metrics_port)},
        )
        cleanup.callback(worker.stop)
        notifier = stack.start("notifier", compose_argv("notifier"))
        cleanup.callback(notifier.stop)
        beat = stack.start("beat", compose_argv("beat"))
        cleanup.callback(beat.stop)
        signer = stack.start(
            "signer",
            compose_argv("signer"),
            {
                "INTAKE_AUDIT_SIGNING_KEY": signing_key,
                # Often, so tests see checkpoints soon; web and worker keep the default.
                "INTAKE_AUDIT_CHECKPOINT_SECONDS": str(SIGNER_SECONDS),
            },
        )
        cleanup.callback(signer.stop)

        server_config = folder / "intake.conf"
        server_config.write_text(
            render_nginx_config(
                {
                    "NGINX_HTTPS_LISTEN": f"127.0.0.1:{https_port}",
                    "NGINX_HTTP_LISTEN": f"127.0.0.1:{http_port}",
                    "NGINX_CERTS": str(certs),
                    "NGINX_UPSTREAM": f"127.0.0.1:{web_port}",
                    "NGINX_ACCESS_LOG": str(folder / "nginx-access.log"),
                    "INTAKE_PUBLIC_URL": base_url,
                }
            )
        )
        main_config = folder / "nginx.conf"
        main_config.write_text(_nginx_main_config(folder, server_config))
        nginx_argv = [nginx, "-p", str(folder), "-c", str(main_config)]
        nginx_argv += ["-e", str(folder / "nginx-error.log")]
        checked = subprocess.run([*nginx_argv, "-t"], capture_output=True, text=True, timeout=30)
        assert checked.returncode == 0, f"nginx refused its config:\n{checked.stderr}"

        try:
            wait_until(lambda: _gunicorn_ready(stack) or not web.running(), 90, 0.5, "gunicorn")
            assert web.running(), f"gunicorn exited:\n{web.tail()}"
            worker.wait_for_log("ready.", 90)
            notifier.wait_for_log("ready.", 90)
            beat.wait_for_log("beat: Starting", 60)
            signer.wait_for_log("audit_signer_started", 60)
            # In the foreground, as the nginx image runs it.
            proxy = stack.start("nginx", [*nginx_argv, "-g", "daemon off;"])
            cleanup.callback(proxy.stop)
            wait_until(lambda: _https_ready(stack) or not proxy.running(), 30, 0.2, "nginx")
            assert proxy.running(), f"nginx exited:\n{(folder / 'nginx-error.log').read_text()}"
        except AssertionError as error:
            raise AssertionError(f"{error}\n{stack.logs()}") from None
        yield stack


@pytest.fixture(autouse=True)
def _stack_still_running(request: pytest.FixtureRequest) -> None:
    """A process that died during an earlier test fails the next one by name, not by timeout."""
    if "production_stack" not in request.fixturenames:
        return
    stack: ProductionStack = request.getfixturevalue("production_stack")
    stopped = [name for name, service in stack.services.items() if not service.running()]
    assert not stopped, f"stopped: {', '.join(stopped)}\n{stack.logs()}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A failing test's report shows the end of every process log, and ``page`` learns of it."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    stack = getattr(item, "funcargs", {}).get("production_stack")
    if report.failed and isinstance(stack, ProductionStack):
        report.sections.append(("production stack logs", stack.logs()))
    return report


# -- the browser ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def chromium(
    production_stack: ProductionStack, tmp_path_factory: pytest.TempPathFactory, playwright: Any
) -> Iterator[Any]:
    """Debian's Chromium trusting the stack's CA for real, as a managed desktop would.

    Chromium on Linux reads the user's NSS database in ``$HOME/.pki/nssdb``: the CA goes into a
    fresh one in a temporary HOME, and no certificate error is ignored anywhere.
    """
    if not CHROMIUM.exists():
        missing(f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    certutil = shutil.which("certutil")
    if certutil is None:
        missing("certutil is not installed (apt-get install libnss3-tools)")
    home = tmp_path_factory.mktemp("browser-home")
    nssdb = home / ".pki" / "nssdb"
    nssdb.mkdir(parents=True)
    for args in (
        ["-N", "--empty-password"],
        ["-A", "-t", "C,,", "-n", "intake-test-ca", "-i", str(production_stack.ca_file)],
    ):
        done = subprocess.run(
            [certutil, "-d", f"sql:{nssdb}", *args], capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, done.stderr
    browser = playwright.chromium.launch(
        executable_path=str(CHROMIUM),
        args=CHROMIUM_ARGS,
        headless=True,
        env={**os.environ, "HOME": str(home)},
    )
    try:
        yield browser
    finally:
        browser.close()


@pytest.fixture
def output_dir(request: pytest.FixtureRequest) -> Path:
    """``test-output/production/<test name>/``, emptied, for screenshots."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name).strip("_")
    folder = OUTPUT_ROOT / "production" / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


@dataclass
class Contexts:
    """Browser contexts for one test (a patient's, a pharmacist's...), closed afterwards."""

    browser: Any
    made: list[Any] = field(default_factory=list)

    def new_page(self, **options: Any) -> Any:
        settings = {"locale": "en-US", "viewport": {"width": 1280, "height": 900}, **options}
        context = self.browser.new_context(**settings)
        context.set_default_timeout(15_000)
        self.made.append(context)
        return context.new_page()


@pytest.fixture
def browser_pages(
    chromium: Any, request: pytest.FixtureRequest, output_dir: Path
) -> Iterator[Contexts]:
    contexts = Contexts(chromium)
    yield contexts
    report = getattr(request.node, "report_call", None)
    for index, context in enumerate(contexts.made):
        if report is not None and report.failed:
            for number, page in enumerate(context.pages):
                with contextlib.suppress(Exception):
                    page.screenshot(path=str(output_dir / f"failure-{index}-{number}.png"))
        context.close()


# -- a browser from an address of its own -----------------------------------------------------


class Relay:
    """A TCP relay on 127.0.0.1 that reaches nginx's https port from a chosen source address.

    Chromium always connects to the loopback from 127.0.0.1, so every browser test would be
    the same client to the rate limits; through a relay of its own, a test's browser is a
    client of its own. Bytes pass unchanged (TLS is still between Chromium and nginx, checked
    against the test CA); only the TCP peer nginx sees differs, as behind a NAT. Answers can be
    held back (``response_delay``) to play a slow network.
    """

    def __init__(self, target: tuple[str, int], source: str) -> None:
        self.target, self.source = target, source
        self.response_delay = 0.0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._serve, name=f"relay-{source}", daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _peer = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, 10, (self.source, 0))
        except OSError:
            client.close()
            return
        with self._lock:
            self._sockets += [client, upstream]
        back = threading.Thread(target=self._copy, args=(upstream, client, True), daemon=True)
        back.start()
        self._copy(client, upstream, False)
        back.join()
        client.close()
        upstream.close()

    def _copy(self, source: socket.socket, sink: socket.socket, answers: bool) -> None:
        try:
            while data := source.recv(65536):
                if answers and self.response_delay:
                    time.sleep(self.response_delay)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


@dataclass
class Door:
    """The https site as one test's browser reaches it: its own client address."""

    base_url: str
    source: str
    relay: Relay


_door_addresses = (
    f"127.0.{third}.{fourth}" for third in range(20, 250) for fourth in range(1, 255)
)


@pytest.fixture
def door(production_stack: ProductionStack) -> Iterator[Door]:
    """``https://localhost:<port>`` through a relay connecting from an address no other test
    uses, so rate limits and audit pseudonyms of one test never meet another's."""
    https_port = urlsplit(production_stack.base_url).port
    assert https_port is not None
    source = next(_door_addresses)
    relay = Relay(("127.0.0.1", https_port), source)
    try:
        yield Door(f"https://localhost:{relay.port}", source, relay)
    finally:
        relay.close()
