"""Flower, docker-compose.yml's `monitoring` profile: its own command and environment, run against
a throwaway password-protected Redis and the compose worker's own command, as an operator (and an
attacker who reaches its port) would meet it."""

from __future__ import annotations

import base64
import http.client
import importlib.util
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from celery import Celery

from tests.conftest import IN_CI
from tests.test_docker_compose import COMPOSE, ROOT, SERVICES
from tests.workers.conftest import (
    RedisServer,
    free_port,
    process_env,
    stop_process_groups,
    wait_until,
)

FLOWER = SERVICES["flower"]
USER, PASSWORD = "pharmacy-ops", "flower-" + uuid.uuid4().hex
BIN = str(Path(sys.executable).parent)


def interpolate(value: str, variables: dict[str, str]) -> str:
    """What `docker compose` does to a value: ``${NAME}``, ``${NAME:-default}``, ``$$``."""

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return variables.get(match.group(1)) or (match.group(2) or "")

    return re.sub(r"\$\$|\$\{([A-Z_][A-Z0-9_]*)(?::-([^}]*))?\}", substitute, value)


def flower_argv() -> list[str]:
    return [interpolate(str(part), {}) for part in FLOWER["command"]]


def flower_env(redis: RedisServer | None, basic_auth: str | None, port: int) -> dict[str, str]:
    """The service's own environment, with Redis on loopback and Flower on a free port."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INTAKE_", "FLOWER_"))}
    env = {k: v for k, v in env.items() if k != "CELERY_BROKER_URL"}
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")
    variables = {"REDIS_PASSWORD": redis.password if redis else "x"}
    if basic_auth is not None:
        variables["FLOWER_BASIC_AUTH"] = basic_auth
    for name, value in FLOWER["environment"].items():
        env[name] = interpolate(str(value), variables).replace("@redis:6379", "@127.0.0.1:")
    if redis:
        env["CELERY_BROKER_URL"] = env["CELERY_BROKER_URL"].replace(
            "@127.0.0.1:", f"@127.0.0.1:{redis.port}"
        )
    # Flower reads its options from FLOWER_* variables, as it reads FLOWER_BASIC_AUTH.
    env.update({"FLOWER_PORT": str(port), "FLOWER_ADDRESS": "127.0.0.1"})
    return env


def test_flower_is_for_the_monitoring_profile_on_loopback_only():
    """`docker compose up` leaves it off; when on, only the Docker host's loopback reaches it."""
    assert FLOWER["profiles"] == ["monitoring"]
    assert [name for name, s in SERVICES.items() if s.get("profiles")] == ["flower"]
    # The same image as the Intake services, without their secrets: no env_file, no keyring.
    assert FLOWER["image"] == SERVICES["web"]["image"] and FLOWER["build"] == "."
    assert "env_file" not in FLOWER
    assert set(FLOWER["environment"]) == {"FLOWER_BASIC_AUTH", "CELERY_BROKER_URL"}
    assert FLOWER["ports"] and all(str(p).startswith("127.0.0.1:") for p in FLOWER["ports"])
    assert set(FLOWER["networks"]) == {"backend", "monitoring"}
    # Its own network for the published port: no other service joins it.
    assert [n for n, s in SERVICES.items() if "monitoring" in (s.get("networks") or [])] == [
        "flower"
    ]
    assert COMPOSE["networks"]["backend"]["internal"] is True
    script = " ".join(flower_argv())
    assert "--read_only=true" in script
    # The password comes from the environment, never a command line that `ps` shows.
    assert not re.search(r"--basic[-_]auth", script)
    example = (ROOT / ".env.example").read_text()
    assert re.search(r"^# FLOWER_BASIC_AUTH=\S+:\S+", example, re.M)
    assert not re.search(r"^FLOWER_BASIC_AUTH=", example, re.M)


@pytest.mark.parametrize(
    "basic_auth",
    [None, "", "pharmacy-ops", ":" + PASSWORD, f"{USER}:short", f"{USER}:{PASSWORD},other:"],
)
def test_flower_refuses_to_start_without_credentials(basic_auth):
    port = free_port()
    result = subprocess.run(  # noqa: S603
        flower_argv(), env=flower_env(None, basic_auth, port), capture_output=True, timeout=30
    )
    assert result.returncode != 0
    assert b"FLOWER_BASIC_AUTH" in result.stderr, result.stderr.decode()[-500:]


class Client:
    """Raw HTTP to Flower: any header, Host included, exactly as sent."""

    def __init__(self, port: int) -> None:
        self.port = port

    def get(
        self, path: str, auth: str | None = None, method: str = "GET", **headers: str
    ) -> tuple[int, str]:
        sent = {k.replace("_", "-"): v for k, v in headers.items()}
        if auth is not None:
            sent["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, body=b"" if method == "POST" else None, headers=sent)
            response = conn.getresponse()
            return response.status, response.read().decode(errors="replace")
        finally:
            conn.close()


@pytest.fixture
def flower_installed() -> None:
    if importlib.util.find_spec("flower") is None:
        if IN_CI:
            pytest.fail("flower is required in CI (pyproject.toml's test extras)")
        pytest.skip("flower not installed")


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_flower_behind_basic_auth_shows_the_worker_and_never_the_redis_password(
    flower_installed, settings, tmp_path
):
    redis = RedisServer(tmp_path, password="redis-" + uuid.uuid4().hex)
    redis.start()
    processes: list[subprocess.Popen[bytes]] = []
    log_path = tmp_path / "services.log"
    port = free_port()
    client = Client(port)
    right = f"{USER}:{PASSWORD}"
    try:
        with log_path.open("ab") as log:
            worker = [
                a if a != "celery" else str(Path(BIN) / "celery")
                for a in (str(part) for part in SERVICES["worker"]["command"])
            ]
            own = settings.replace(redis_url=redis.url, data_dir=tmp_path / "data")
            for argv, env in (
                (worker, process_env(own)),
                (flower_argv(), flower_env(redis, right, port)),
            ):
                processes.append(
                    subprocess.Popen(  # noqa: S603
                        argv,
                        env=env,
                        cwd=tmp_path,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )

        def workers() -> dict[str, dict[str, object]] | None:
            assert all(p.poll() is None for p in processes), log_path.read_text()[-3000:]
            try:
                status, body = client.get("/api/workers?refresh=1", right)
            except OSError:
                return None
            return json.loads(body) if status == 200 and body.strip() != "{}" else None

        listed = wait_until(workers, 30, 0.5, "Flower to list the compose worker")
        [name] = listed
        assert [q["name"] for q in listed[name]["active_queues"]] == ["routing"]

        # Without, with wrong and with almost-right credentials: 401, whatever the headers say.
        refused = [
            None,
            f"{USER}:wrong",
            f"{USER}:{PASSWORD[:-1]}",
            f"{USER}:{PASSWORD}x",
            f"{USER}:",
            f"{USER.upper()}:{PASSWORD}",
            PASSWORD,
            f"{USER}:{PASSWORD},",
        ]
        for auth in refused:
            for path in ("/", "/broker", "/api/workers", f"/worker/{name}"):
                status, _ = client.get(
                    path,
                    auth,
                    X_Forwarded_For="127.0.0.1",
                    X_Real_Ip="127.0.0.1",
                    Host="localhost",
                    X_Forwarded_User=USER,
                )
                assert status == 401, (auth, path, status)
        b64 = base64.b64encode(right.encode()).decode()
        for header in (
            f"basic {b64}",
            f"Bearer {b64}",
            f"Basic {b64} {b64}",
            "Basic !!!",
            "Basic " + base64.b64encode(b"\xff\xfe:x").decode(),
            f"Basic{b64}",
        ):
            assert client.get("/", Authorization=header)[0] == 401, header
        # A header past Tornado's limit is refused (or the connection closed), and Flower goes on.
        try:
            status, _ = client.get("/", right, X_Padding="a" * 100_000)
            assert status in (400, 431), status
        except (http.client.HTTPException, ConnectionError):
            pass
        # A long Authorization just under it is read, and refused.
        assert client.get("/", f"{USER}:{PASSWORD}" + "y" * 40_000)[0] == 401

        # The right credentials: every page, none of which shows the Redis password (the broker
        # page masks it) or Flower's own; a forged Host ends up in no link.
        pages = {}
        for path in (
            "/",
            "/workers",
            f"/worker/{name}",
            "/broker",
            "/tasks",
            "/api/workers",
            "/api/tasks",
            "/api/task/types",
            "/api/queues/length",
            "/metrics",
        ):
            status, body = client.get(path, right, Host="evil.example", X_Forwarded_Host="evil")
            assert status == 200, (path, status, body[:300])
            pages[path] = body
        assert name in pages["/"] and name in pages[f"/worker/{name}"]
        assert "redis://:**@" in pages["/broker"]
        for path, body in pages.items():
            assert redis.password not in body, path
            assert PASSWORD not in body, path
            assert "evil" not in body, path

        # Read-only: no shutting the worker down, revoking or sending tasks, even with the
        # password; and a cross-site page in the operator's browser is refused first.
        for path in (
            f"/api/worker/shutdown/{name}",
            "/api/task/revoke/" + str(uuid.uuid4()),
            "/api/task/send-task/workers.tasks.purge_expired",
            f"/api/worker/pool/shrink/{name}",
        ):
            status, body = client.get(path, right, method="POST")
            assert (status, "Read only" in body) == (403, True), (path, status, body)
            status, body = client.get(
                path,
                right,
                method="POST",
                Origin="https://evil.example",
            )
            assert status == 403 and "forbidden" in body, (path, status, body)
            status, _ = client.get(path, right, method="POST", Sec_Fetch_Site="cross-site")
            assert status == 403, path

        # Flower turns the workers' task events on itself, every few seconds (the compose workers
        # run without -E): a task sent from then on shows, with what it carries: an id.
        sent: list[str] = []
        producer = Celery(broker=redis.url)

        def seen() -> dict[str, object] | None:
            tasks = json.loads(client.get("/api/tasks", right)[1])
            done = [t for t in tasks.values() if t.get("state") == "SUCCESS"]
            if not done:
                sent.append(str(uuid.uuid4()))
                producer.send_task("workers.tasks.route_request", args=sent[-1:], queue="routing")
            return done[0] if done else None

        try:
            task = wait_until(seen, 20, 0.5, "Flower to show a routed task")
        finally:
            producer.close()
        assert task["name"] == "workers.tasks.route_request"
        assert task["args"] in {repr([request_id]) for request_id in sent}
        assert all(p.poll() is None for p in processes), "read-only Flower stopped a process"
    finally:
        stop_process_groups(processes)
        redis.stop()
