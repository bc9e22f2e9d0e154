"""docker-compose.yml: Docker does not run here, so check the topology it declares (nginx the
only published door, trusted as the one proxy), run its services' own commands against the
local PostgreSQL and a throwaway password-protected Redis, and check a request goes through.
The same stack behind Debian's nginx is tested in tests/production/."""

from __future__ import annotations

import http.cookiejar
import ipaddress
import os
import re
import shlex
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from intake.crypto.phi import Keyring
from intake_verify.note import generate_key
from tests.conftest import valid_refill
from tests.workers.conftest import RedisServer, free_port, stop_process_groups, wait_until

ROOT = Path(__file__).parents[1]
SKEY, VKEY = generate_key("intake.pharmacy.test/intake-audit")
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
NGINX_TEMPLATE = ROOT / "deploy" / "nginx" / "intake.conf.template"


def test_compose_declares_a_production_topology():
    assert {"postgres", "redis", "migrate", "web", "worker", "notifier", "beat", "signer"} <= set(
        SERVICES
    )
    redis_cmd = " ".join(SERVICES["redis"]["command"])
    assert "--requirepass" in redis_cmd and "--appendonly yes" in redis_cmd
    for name in ("postgres", "redis", "web"):
        assert "healthcheck" in SERVICES[name], name
    for name in ("web", "worker", "notifier", "beat"):
        depends = SERVICES[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert depends["redis"]["condition"] == "service_healthy"
    assert SERVICES["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("migrate", "web", "worker", "notifier", "beat"):
        assert SERVICES[name]["env_file"] == ".env"
        assert SERVICES[name]["environment"]["INTAKE_PROFILE"] == "production"
    example = (ROOT / ".env.example").read_text()
    for variable in ("POSTGRES_PASSWORD", "REDIS_PASSWORD", "INTAKE_SECRET_KEY", "INTAKE_KEYRING",
                     "INTAKE_AUDIT_VERIFY_KEYS"):
        assert re.search(rf"^{variable}=", example, re.M), variable


def test_only_the_signer_gets_the_signing_key_and_the_anchor_is_apart_from_postgres():
    example = (ROOT / ".env.example").read_text()
    assert not re.search(r"^INTAKE_AUDIT_SIGNING_KEY=", example, re.M)
    signer_example = (ROOT / "signer.env.example").read_text()
    assert re.search(r"^INTAKE_AUDIT_SIGNING_KEY=", signer_example, re.M)
    signer = SERVICES["signer"]
    assert signer["env_file"] == [".env", "signer.env"]
    assert signer["command"] == ["intake", "audit", "signer"]
    for name, service in SERVICES.items():
        if name != "signer":
            assert "signer.env" not in str(service.get("env_file", "")), name
            assert "INTAKE_AUDIT_SIGNING_KEY" not in (service.get("environment") or {}), name
    anchor = signer["environment"]["INTAKE_AUDIT_ANCHOR"]
    checkpoints = signer["environment"]["INTAKE_AUDIT_CHECKPOINTS"]
    folder = str(Path(anchor).parent)
    assert str(Path(checkpoints).parent) == folder
    for name in ("web", "worker", "beat", "signer"):
        mounts = [str(volume) for volume in SERVICES[name]["volumes"]]
        assert f"intake-audit:{folder}" in mounts, name
        assert SERVICES[name]["environment"]["INTAKE_AUDIT_ANCHOR"] == anchor, name
    assert not any("intake-audit" in str(v) for v in SERVICES["postgres"]["volumes"])


def networks_of(service: str) -> set[str]:
    return set(SERVICES[service].get("networks") or ["default"])


def option(service: str, name: str) -> str:
    argv = [str(part) for part in SERVICES[service]["command"]]
    return argv[argv.index(name) + 1]


def test_only_the_tls_proxy_is_published():
    """From outside, the stack is nginx on 443 (and 80, which redirects); nothing else."""
    published = {name for name, service in SERVICES.items() if service.get("ports")}
    # Besides Flower (`monitoring` profile), on the host's loopback only: tests/test_flower.py.
    assert published == {"nginx", "flower"}
    assert all(str(port).startswith("127.0.0.1:") for port in SERVICES["flower"]["ports"])
    assert set(SERVICES["nginx"]["ports"]) == {"443:443", "80:80"}
    assert not any("network_mode" in service for service in SERVICES.values())
    for network in networks_of("postgres") | networks_of("redis"):
        assert COMPOSE["networks"][network].get("internal") is True, network
    assert networks_of("nginx") == {"edge"}
    assert {name for name in SERVICES if "edge" in networks_of(name)} == {"nginx", "web"}
    # Only the pool that sends e-mail and webhooks can reach outside; routing cannot.
    assert {name for name in SERVICES if "egress" in networks_of(name)} == {"notifier"}
    assert option("worker", "-Q") == "routing"
    assert option("notifier", "-Q") == "notifications"


def test_the_proxy_runs_the_repository_template_with_every_placeholder_set():
    nginx = SERVICES["nginx"]
    assert nginx["image"].startswith("nginx:")
    volumes = set(nginx["volumes"])
    assert (
        "./deploy/nginx/intake.conf.template:/etc/nginx/templates/default.conf.template:ro"
        in volumes
    )
    assert "./deploy/certs:/etc/nginx/certs:ro" in volumes
    template = NGINX_TEMPLATE.read_text()
    placeholders = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)\}", template))
    assert placeholders and placeholders <= set(nginx["environment"]), placeholders
    assert nginx["environment"]["NGINX_UPSTREAM"] == "web:8000"
    assert option("web", "--bind") == "0.0.0.0:8000"
    assert nginx["depends_on"]["web"]["condition"] == "service_healthy"
    # What Intake relies on (intake.ops.proxies): one hop that overwrites the client address.
    for line in (
        "proxy_set_header X-Forwarded-For $remote_addr;",
        "proxy_set_header X-Forwarded-Proto https;",
        "proxy_set_header Host $http_host;",
        'proxy_set_header X-Forwarded-Host "";',
    ):
        assert line in template, line


def test_forwarded_headers_are_believed_from_nginx_alone():
    """Not from the whole edge subnet: it also holds the bridge's gateway, the source address of
    every process on the Docker host that connects to a container (any local user could then
    reach web:8000 and pick an X-Forwarded-For), and web itself with its replicas."""
    [edge] = COMPOSE["networks"]["edge"]["ipam"]["config"]
    subnet = ipaddress.ip_network(edge["subnet"])
    nginx = ipaddress.ip_address(SERVICES["nginx"]["networks"]["edge"]["ipv4_address"])
    gateway = next(subnet.hosts())
    assert nginx in subnet and nginx != gateway
    # Docker hands out addresses from ip_range only, so no container can take nginx's.
    dynamic = ipaddress.ip_network(edge["ip_range"])
    assert dynamic.subnet_of(subnet) and nginx not in dynamic and gateway not in dynamic
    assert option("web", "--forwarded-allow-ips") == str(nginx)
    assert SERVICES["web"]["environment"]["INTAKE_TRUSTED_PROXIES"] == str(nginx)
    for name in ("migrate", "worker", "beat"):
        assert "INTAKE_TRUSTED_PROXIES" not in SERVICES[name]["environment"], name


def command(service: str, port: int) -> list[str]:
    argv = [str(part) for part in SERVICES[service]["command"]]
    argv = [a.replace("0.0.0.0:8000", f"127.0.0.1:{port}") for a in argv]
    if argv[0] in ("intake", "gunicorn", "celery"):
        binary = Path(sys.executable).with_name(argv[0])
        argv[0] = str(binary)
    return argv


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_compose_services_run_and_route_a_request(database_url, settings, tmp_path):
    redis = RedisServer(tmp_path, password="s3cret-" + os.urandom(8).hex())
    redis.start()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("INTAKE_")}
    env.update(
        {
            "INTAKE_PROFILE": "production",
            "INTAKE_DATABASE_URL": database_url,
            "INTAKE_REDIS_URL": redis.url,
            "INTAKE_DATA_DIR": str(tmp_path / "data"),
            "INTAKE_SECRET_KEY": settings.secret_key,
            "INTAKE_KEYRING": settings.keyring,
            "INTAKE_AUDIT_VERIFY_KEYS": VKEY,
            "INTAKE_MIN_FILL_SECONDS": "0",
            "INTAKE_PUBLIC_URL": "https://intake.pharmacy.test",
        }
    )
    processes: list[subprocess.Popen[bytes]] = []
    logs = tmp_path / "services.log"
    try:
        migrate = subprocess.run(
            command("migrate", port),
            env=env,
            cwd=tmp_path,  # noqa: S603
            capture_output=True,
            timeout=120,
        )
        assert migrate.returncode == 0, migrate.stderr.decode()[-2000:]
        with logs.open("ab") as log:
            for service in ("web", "worker", "notifier", "beat", "signer"):
                # signer.env: the private key goes to the signer alone.
                own = env
                if service == "signer":
                    own = {**env, "INTAKE_AUDIT_SIGNING_KEY": SKEY}
                    own["INTAKE_AUDIT_CHECKPOINT_SECONDS"] = "1"
                processes.append(
                    subprocess.Popen(  # noqa: S603
                        command(service, port),
                        env=own,
                        cwd=tmp_path,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        base = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            try:
                with urllib.request.urlopen(base + "/readyz", timeout=2) as response:  # noqa: S310
                    return response.status == 200
            except OSError:
                return False

        wait_until(ready, 60, 0.5, "gunicorn ready: " + shlex.join(command("web", port)))
        # The access log must not keep query strings (search terms) or client addresses.
        with urllib.request.urlopen(base + "/healthz?probe=2025550143", timeout=5):  # noqa: S310
            pass
        jar = http.cookiejar.CookieJar()
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        # Production sets Secure cookies; over plain loopback HTTP keep them anyway for the test.
        form = opener.open(base + "/refill").read().decode()
        hidden = dict(re.findall(r'name="(csrf_token|rendered_at)"[^>]*value="([^"]*)"', form))
        for cookie in jar:
            cookie.secure = False
        body = urllib.parse.urlencode({**valid_refill(), **hidden}).encode()
        request = urllib.request.Request(
            base + "/refill", data=body, headers={"Referer": base + "/refill"}
        )
        response = opener.open(request)
        assert "/thanks/R-" in response.geturl(), response.read().decode()[:500]
        reference = response.geturl().rsplit("/", 1)[1]

        engine = sa.create_engine(database_url)

        def status() -> str | None:
            with engine.connect() as conn:
                return conn.execute(
                    sa.text("SELECT status FROM requests WHERE reference = :r"), {"r": reference}
                ).scalar()

        try:
            wait_until(lambda: status() == "queued", 30, 0.5, "routed by the compose worker")
        finally:
            engine.dispose()
        # The signer signed on start; verifying needs the public key alone.
        wait_until(
            lambda: (tmp_path / "data" / "audit-checkpoints.jsonl").exists(), 30, 0.5, "signed"
        )
        verified = subprocess.run(  # noqa: S603
            [str(Path(sys.executable).with_name("intake")), "audit", "verify"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert verified.returncode == 0, verified.stdout + verified.stderr[-2000:]
        assert "Audit trail intact" in verified.stdout
        access = [line for line in logs.read_text().splitlines() if '"GET /healthz' in line]
        assert access, "gunicorn wrote no access log line"
        assert all("2025550143" not in line and "127.0.0.1" not in line for line in access)
    finally:
        stop_process_groups(processes)
        redis.stop()


@pytest.mark.parametrize("service", ["migrate", "web", "worker", "notifier", "beat", "signer"])
def test_each_compose_command_refuses_an_unsafe_environment(tmp_path, service):
    """Every process compose starts reads its settings through the production check: the
    same weak secret stops migrate, gunicorn, the worker and beat, each naming the variable,
    before any of them listens, connects or writes a file."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INTAKE_")}
    env.update(
        {
            "INTAKE_PROFILE": "production",
            "INTAKE_DATA_DIR": str(tmp_path / "data"),
            "INTAKE_SECRET_KEY": "a" * 48,
            "INTAKE_KEYRING": Keyring.generate().to_json(),
            "INTAKE_AUDIT_VERIFY_KEYS": VKEY,
            "INTAKE_DATABASE_URL": "postgresql+psycopg://intake_app:Vq7-db-pass-91@db/intake",
            "INTAKE_REDIS_URL": "redis://:Rk2-redis-pass-55-long@127.0.0.1:9/0",
            "INTAKE_PUBLIC_URL": "https://intake.pharmacy.test",
        }
    )
    if service == "signer":
        env["INTAKE_AUDIT_SIGNING_KEY"] = SKEY
    argv = command(service, free_port())
    if service == "web":
        argv.insert(1, "--check-config")  # gunicorn loads the app, then exits
    done = subprocess.run(  # noqa: S603
        argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0, done.stdout[-1000:]
    assert "INTAKE_SECRET_KEY is a placeholder" in done.stdout + done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "data").exists()
